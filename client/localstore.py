"""The client's local message store: the durable copy a client keeps of its conversation.

Theory of operation. One SQLite file (stdlib ``sqlite3``, WAL, ``synchronous=FULL`` so a
committed batch survives a power cut) holds the messages a mailbox received, the messages
it sent, and what became of each sent message for each recipient.

**Identity.** A message is identified by its sender and its id, not by the id alone: the
broker holds at most one message per (recipient, id) at a time, but once a message has
expired (and its tombstone with it) any sender may use the id again. So incoming messages
are keyed by (mailbox, sender, id), and only a redelivery of the *same* sender's message is
a duplicate; saving it again is a no-op, which is how at-least-once delivery becomes
exactly-once in the store. (Sent messages are keyed by (mailbox, id): their sender is the
mailbox itself.) :meth:`LocalStore.save_incoming` saves a whole batch in one transaction and
says which messages were new; the client ACKs a batch only after that commit.

**Emitted.** Each incoming message also has an ``emitted`` flag, for a consumer that hands
messages on (``relay listen`` prints them): it marks a batch with :meth:`LocalStore.mark_emitted`
after handing it on, and on start hands on :meth:`LocalStore.unemitted` first, so a crash
between saving and handing on loses nothing (the consumer sees such messages at least once).

**Per-recipient state of sent messages** (protocol.md 9, "Delivery status"). The table
``recipient_states`` has one row per (mailbox, message id, recipient) for the recipients the
relay accepted a sent message for, holding two independent facts: the RECEIPT's word
(``queued``, ``delivered``: handed to an open session, or ``duplicate``), written by
:meth:`LocalStore.record_outgoing`, and the latest delivery STATUS (``delivered``: the
recipient's device saved and ACKed it; ``expired``: it expired un-ACKed), written by
:meth:`LocalStore.save_statuses`. They are kept apart because a status may arrive before the
receipt of its message (or for a message another client of the mailbox sent): each write fills
in its own columns and leaves the other's alone. :attr:`RecipientState.state` folds them into
one word, the same as the browser client's: ``delivered``, ``expired``, else ``queued``
(stored at the relay, not known to be on the device). A status is identified by its ``seq``: one
already saved (a redelivery) changes nothing, so the client may STATUS_ACK it again; a status
with a larger seq for the same (id, recipient) replaces the older one (an id used again after
its message expired). Overflow records (how many statuses the relay folded instead of keeping
them) go to ``status_overflows``, one row per ``first_seq`` (the seq the record had when the relay
created it): the latest seen of each, so the sum of their counts is exact. Statuses have an ``emitted`` flag too
(:meth:`LocalStore.unemitted_statuses`, :meth:`LocalStore.mark_statuses_emitted`).

**End-to-end encryption** (docs/e2e.md). Each message row keeps the *decrypted* body (the device is
the source of truth) and its ``security``: ``e2e`` (opened and verified, or sealed by this device),
``plaintext`` (sent or received in the clear) or ``failed`` (an envelope that did not open or verify:
kept with an empty body and ``security_error``, the reason, so it is ACKed once and never shown as
text from its sender). The device's private keys live here too: per mailbox one Ed25519 identity seed
(``identities``) and its X25519 encryption keys (``encryption_keys``: exactly one current, and
retired ones with ``retired_at``, kept while messages sealed to them may still be queued and then
deleted by :meth:`LocalStore.purge_retired_keys`), and the identity keys pinned for contacts
(``contacts``: the pinned ``ik`` and when, and a ``pending_ik`` when the directory showed another).
So the file (and its WAL and shared-memory files) is made mode 0600, and a new directory 0700. This
module stores bytes only; making and checking keys is ``wire.e2e``'s (through ``client._e2e``).

**Schema versions** live in ``PRAGMA user_version``: 0 with no table is a new file; 0 with
a ``messages`` table is the first schema (unique by (mailbox, direction, id), no
``emitted``); 2 has no per-recipient state; 3 has no keys, contacts or ``security``. Older
schemas are migrated in place to :data:`SCHEMA_VERSION` in one transaction, keeping every row: the
first schema's incoming rows count as emitted (it kept no record, and re-printing a whole history
after an upgrade would be worse), each sent message gets a ``recipient_states`` row per recipient
with no receipt word (not kept before) and ``notify`` false (those clients never asked for
statuses), and every message from before schema 4 is ``plaintext`` (there was no encryption). A
newer version than this code knows is refused.

Methods are blocking (the client calls them through ``trio.to_thread.run_sync``) and
thread-safe: one connection, serialised by a lock.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

__all__ = [
    "E2E",
    "FAILED",
    "INCOMING",
    "OUTGOING",
    "PLAINTEXT",
    "SCHEMA_VERSION",
    "SECURITY_NOTE",
    "SENT_NOTE",
    "Contact",
    "LocalStore",
    "MessageKey",
    "RecipientState",
    "SentMessage",
    "StatusNotice",
    "StoredKey",
    "StoredKeys",
    "StoredMessage",
    "StoredStatus",
    "status_json",
]

INCOMING = "in"
OUTGOING = "out"

E2E, PLAINTEXT, FAILED = "e2e", "plaintext", "failed"
"""A message's ``security``: end-to-end encrypted and verified, sent in the clear, or an envelope that failed."""

SCHEMA_VERSION = 4
"""``PRAGMA user_version`` of a current store. 1 (stored as 0) was unique by (mailbox, direction, id);
2 kept no per-recipient state of sent messages; 3 no keys, contacts or message security."""

FILE_MODE = 0o600
"""The store holds private keys and decrypted messages: readable and writable by its owner only."""
DIR_MODE = 0o700
"""A directory the store creates for itself."""

_TABLE = """
CREATE TABLE {name} (
    seq         INTEGER PRIMARY KEY,
    mailbox     TEXT    NOT NULL,
    direction   TEXT    NOT NULL CHECK (direction IN ('in', 'out')),
    id          TEXT    NOT NULL,
    sender      TEXT    NOT NULL,
    recipients  TEXT    NOT NULL,
    sent_at     INTEGER NOT NULL,
    expires_at  INTEGER,
    saved_at    INTEGER NOT NULL,
    body        BLOB    NOT NULL,
    emitted     INTEGER NOT NULL DEFAULT 0 CHECK (emitted IN (0, 1)),
    {security}
    UNIQUE (mailbox, direction, sender, id)
);
"""
_SECURITY_COLUMNS = (
    "security TEXT NOT NULL DEFAULT 'plaintext' CHECK (security IN ('e2e', 'plaintext', 'failed'))",
    "security_error TEXT",
)
"""Schema 4's columns of ``messages`` (added by ALTER TABLE to a schema 2 or 3 file: every older row is plaintext)."""
_KEY_TABLES = (
    # Per mailbox: its Ed25519 identity seed (the private key contacts pin the public half of).
    """
    CREATE TABLE identities (
        mailbox     TEXT    PRIMARY KEY,
        seed        BLOB    NOT NULL CHECK (length(seed) = 32),
        created_at  INTEGER NOT NULL
    ) WITHOUT ROWID
    """,
    # Per mailbox: its X25519 encryption keys; exactly one current (retired_at NULL), retired ones until purged.
    """
    CREATE TABLE encryption_keys (
        mailbox     TEXT    NOT NULL,
        kid         TEXT    NOT NULL,
        private     BLOB    NOT NULL CHECK (length(private) = 32),
        created_at  INTEGER NOT NULL,
        retired_at  INTEGER,
        PRIMARY KEY (mailbox, kid)
    ) WITHOUT ROWID
    """,
    "CREATE UNIQUE INDEX encryption_keys_current ON encryption_keys (mailbox) WHERE retired_at IS NULL",
    # Per (mailbox, contact): the identity key pinned on first use, and one the directory showed since, if other.
    """
    CREATE TABLE contacts (
        mailbox     TEXT    NOT NULL,
        contact     TEXT    NOT NULL,
        ik          BLOB    NOT NULL CHECK (length(ik) = 32),
        pinned_at   INTEGER NOT NULL,
        pending_ik  BLOB    CHECK (pending_ik IS NULL OR length(pending_ik) = 32),
        pending_at  INTEGER,
        PRIMARY KEY (mailbox, contact)
    ) WITHOUT ROWID
    """,
)
_STATE_TABLES = (
    # One row per (sender mailbox, message id, recipient): the receipt's word and the latest status.
    # ``notify``: whether statuses were asked for (1 also when a status came before the receipt).
    # ``emitted`` is about the status (a row with none has nothing to hand on: 1).
    """
    CREATE TABLE recipient_states (
        mailbox     TEXT    NOT NULL,
        id          TEXT    NOT NULL,
        recipient   TEXT    NOT NULL,
        receipt     TEXT    CHECK (receipt IN ('queued', 'delivered', 'duplicate')),
        notify      INTEGER NOT NULL DEFAULT 0 CHECK (notify IN (0, 1)),
        status      TEXT    CHECK (status IN ('delivered', 'expired')),
        status_at   INTEGER,
        status_seq  INTEGER,
        saved_at    INTEGER NOT NULL,
        emitted     INTEGER NOT NULL DEFAULT 1 CHECK (emitted IN (0, 1)),
        PRIMARY KEY (mailbox, id, recipient)
    ) WITHOUT ROWID
    """,
    # Overflow records, one per (mailbox, first_seq): the latest seen of each (it is renumbered as it grows).
    """
    CREATE TABLE status_overflows (
        mailbox     TEXT    NOT NULL,
        first_seq   INTEGER NOT NULL,
        seq         INTEGER NOT NULL,
        count       INTEGER NOT NULL CHECK (count >= 1),
        at          INTEGER NOT NULL,
        saved_at    INTEGER NOT NULL,
        emitted     INTEGER NOT NULL DEFAULT 0 CHECK (emitted IN (0, 1)),
        PRIMARY KEY (mailbox, first_seq)
    ) WITHOUT ROWID
    """,
)
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS messages_by_time ON messages (mailbox, sent_at)",
    "CREATE INDEX IF NOT EXISTS messages_unemitted ON messages (mailbox, seq) WHERE direction = 'in' AND emitted = 0",
    "CREATE INDEX IF NOT EXISTS recipient_states_unemitted ON recipient_states (mailbox, status_seq) WHERE emitted = 0",
)
_COLUMNS_V1 = "seq, mailbox, direction, id, sender, recipients, sent_at, expires_at, saved_at, body"
_STATES_FROM_V2 = (
    "INSERT OR IGNORE INTO recipient_states (mailbox, id, recipient, receipt, notify, saved_at, emitted)"
    " SELECT m.mailbox, m.id, r.value, NULL, 0, m.saved_at, 1 FROM messages AS m, json_each(m.recipients) AS r"
    " WHERE m.direction = 'out'"
)
_INSERT = (
    "INSERT OR IGNORE INTO messages (mailbox, direction, id, sender, recipients, sent_at, expires_at, saved_at, body,"
    " security, security_error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SELECT = (
    "SELECT mailbox, direction, id, sender, recipients, sent_at, expires_at, saved_at, body, emitted, security,"
    " security_error FROM messages"
)
_SELECT_KEYS = (
    "SELECT i.seed, k.kid, k.private, k.created_at, k.retired_at FROM identities AS i"
    " JOIN encryption_keys AS k ON k.mailbox = i.mailbox WHERE i.mailbox = ?"
    " ORDER BY k.retired_at IS NULL, k.created_at"
)
_SELECT_CONTACTS = "SELECT mailbox, contact, ik, pinned_at, pending_ik, pending_at FROM contacts"
_UPSERT_PIN = (
    "INSERT INTO contacts (mailbox, contact, ik, pinned_at) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (mailbox, contact) DO UPDATE SET ik = excluded.ik, pinned_at = excluded.pinned_at,"
    " pending_ik = NULL, pending_at = NULL WHERE ik != excluded.ik OR pending_ik IS NOT NULL"
)
"""Pin (or re-pin) a contact's identity key; pinning the key already pinned changes nothing (its time stays)."""
_SET_PENDING = (
    "UPDATE contacts SET pending_ik = ?, pending_at = ? WHERE mailbox = ? AND contact = ? AND ik != ?"
    " AND (pending_ik IS NULL OR pending_ik != ?)"
)
_UPSERT_RECEIPT = (
    "INSERT INTO recipient_states (mailbox, id, recipient, receipt, notify, saved_at) VALUES (?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (mailbox, id, recipient) DO UPDATE SET receipt = excluded.receipt,"
    " notify = max(notify, excluded.notify) WHERE receipt IS NULL"
)
"""The first receipt recorded for a recipient stays (a resend's "duplicate" says less); a status is left alone."""
_UPSERT_STATUS = (
    "INSERT INTO recipient_states (mailbox, id, recipient, notify, status, status_at, status_seq, saved_at, emitted)"
    " VALUES (?, ?, ?, 1, ?, ?, ?, ?, 0)"
    " ON CONFLICT (mailbox, id, recipient) DO UPDATE SET notify = 1, status = excluded.status,"
    " status_at = excluded.status_at, status_seq = excluded.status_seq, saved_at = excluded.saved_at, emitted = 0"
    " WHERE status_seq IS NULL OR status_seq < excluded.status_seq"
)
"""A status fills in its own columns (the receipt's are left alone); one with this seq or an older one changes
nothing."""
_UPSERT_OVERFLOW = (
    "INSERT INTO status_overflows (mailbox, first_seq, seq, count, at, saved_at) VALUES (?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (mailbox, first_seq) DO UPDATE SET seq = excluded.seq, count = excluded.count, at = excluded.at,"
    " saved_at = excluded.saved_at, emitted = 0 WHERE seq < excluded.seq"
)
"""An overflow record grown since (a larger seq, the same first_seq) replaces the one saved; a redelivery changes
nothing."""
_SELECT_STATES = "SELECT mailbox, id, recipient, receipt, notify, status, status_at, status_seq FROM recipient_states"
_UNEMITTED_STATUSES = (
    "SELECT seq, state, at, id, recipient, count, first_seq, saved_at FROM ("
    " SELECT status_seq AS seq, status AS state, status_at AS at, id, recipient, NULL AS count, NULL AS first_seq,"
    " saved_at FROM recipient_states WHERE mailbox = ? AND emitted = 0"
    " UNION ALL"
    " SELECT seq, 'overflow', at, NULL, NULL, count, first_seq, saved_at FROM status_overflows"
    " WHERE mailbox = ? AND emitted = 0"
    ") ORDER BY seq"
)

SECURITY_NOTE = (
    '*Messages are end-to-end encrypted unless marked: "unencrypted" travelled in the clear (the relay could'
    ' read it); "failed" was an encrypted message that did not open or verify on this device, so its text is'
    " not shown and it may not be from the sender named.*"
)
"""The line under a Markdown log's title when it holds an unencrypted or failed message."""

SENT_NOTE = (
    "*A sent message says, per recipient, what the relay last told this device: delivered (the recipient's"
    " device saved it; not that they read it), expired (it expired before their device saved it), or queued /"
    " sent to their open session (the relay's receipt: no status yet, or none was asked for).*"
)
"""The line under a Markdown log's title when it holds sent messages."""

MessageKey = tuple[str, str]
"""What identifies an incoming message within a mailbox: (sender, id)."""

STATUS_DELIVERED, STATUS_EXPIRED, STATUS_OVERFLOW = "delivered", "expired", "overflow"
"""The states of a delivery status (``wire.ReportState``'s values: this module does not import the wire)."""
STATE_QUEUED = "queued"
""":attr:`RecipientState.state` with no status: stored at the relay, not known to be on the recipient's device."""


class IncomingMessage(Protocol):
    """What :meth:`LocalStore.save_incoming` needs of a delivery (a :class:`client.Delivery` fits)."""

    id: str
    sender: str
    sent_at: int
    expires_at: int
    body: bytes
    """The body as the recipient sees it: the decrypted one, or empty for a failed message."""
    security: str
    """:data:`E2E`, :data:`PLAINTEXT` or :data:`FAILED`."""
    security_error: str | None
    """Why it failed (a reason of docs/e2e.md "Opening"); None unless ``security`` is :data:`FAILED`."""


class StatusNotice(Protocol):
    """What :meth:`LocalStore.save_statuses` needs of a delivery status (a ``wire.StatusReport`` fits):
    ``id`` and ``recipient`` for "delivered" / "expired", ``count`` and ``first_seq`` for "overflow"."""

    @property
    def seq(self) -> int: ...
    @property
    def state(self) -> str: ...
    @property
    def at(self) -> int: ...
    @property
    def id(self) -> str | None: ...
    @property
    def recipient(self) -> str | None: ...
    @property
    def count(self) -> int | None: ...
    @property
    def first_seq(self) -> int | None: ...


class SentMessage(NamedTuple):
    """A message this mailbox sent, for :meth:`LocalStore.record_outgoing`."""

    id: str
    receipts: Mapping[str, str]
    """Each recipient the relay accepted it for (stored, or a duplicate of a stored copy) and the receipt's
    word for them: ``queued``, ``delivered`` (handed to an open session) or ``duplicate``."""
    body: bytes
    notify: bool = False
    """Whether the SEND asked for delivery statuses."""
    security: str = PLAINTEXT
    """:data:`E2E` if it was sealed to every recipient, else :data:`PLAINTEXT` (``body`` is the plaintext either
    way)."""


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One message in the local store. Times are Unix epoch milliseconds."""

    mailbox: str
    direction: str
    """``"in"`` (received by ``mailbox``) or ``"out"`` (sent by it)."""
    id: str
    sender: str
    recipients: tuple[str, ...]
    sent_at: int
    expires_at: int | None
    saved_at: int
    body: bytes
    """The message as this device read or wrote it: decrypted; empty for a failed one."""
    emitted: bool = False
    """For incoming messages: whether a consumer marked it handed on (:meth:`LocalStore.mark_emitted`)."""
    security: str = PLAINTEXT
    """:data:`E2E`, :data:`PLAINTEXT` (sent in the clear) or :data:`FAILED` (see the module docstring)."""
    security_error: str | None = None
    """For a failed message: why (``bad_signature``, ``key_changed``, ...)."""

    @property
    def key(self) -> MessageKey:
        """(sender, id): the message's identity within its mailbox and direction."""
        return (self.sender, self.id)

    def body_json(self) -> dict[str, str]:
        """``{"body": text}`` if the body is valid UTF-8, else ``{"body_base64": ...}``."""
        return body_json(self.body)

    def security_json(self) -> dict[str, str]:
        """``{"security": ...}``, with ``"security_error"`` for a failed message."""
        return security_json(self.security, self.security_error)


class StoredKey(NamedTuple):
    """One of a mailbox's X25519 encryption keys as stored (``private`` is the raw 32-byte private key)."""

    kid: str
    private: bytes
    created_at: int
    retired_at: int | None
    """None for the current key; else when it was retired (Unix ms)."""


@dataclass(frozen=True, slots=True)
class StoredKeys:
    """A mailbox's private keys: the Ed25519 identity ``seed``, the ``current`` encryption key and the retired ones
    (oldest first)."""

    seed: bytes = field(repr=False)
    current: StoredKey = field(repr=False)
    retired: tuple[StoredKey, ...] = field(repr=False)


@dataclass(frozen=True, slots=True)
class Contact:
    """A contact of ``mailbox``: the identity key pinned for it (Unix ms ``pinned_at``) and, if the directory has
    shown another one since, that ``pending_ik`` (not trusted until accepted)."""

    mailbox: str
    contact: str
    ik: bytes
    pinned_at: int
    pending_ik: bytes | None = None
    pending_at: int | None = None


@dataclass(frozen=True, slots=True)
class RecipientState:
    """What became of a message ``mailbox`` sent, for one recipient (see the module docstring)."""

    mailbox: str
    id: str
    recipient: str
    receipt: str | None
    """The RECEIPT's word (``queued``, ``delivered``, ``duplicate``); None if no receipt was recorded (a status
    came first, another client of the mailbox sent it, or it was recorded before schema 3)."""
    notify: bool
    """Whether delivery statuses were asked for."""
    status: str | None
    """The latest delivery status: ``delivered`` (the device saved it) or ``expired``; None while there is none."""
    status_at: int | None
    """The status's time (Unix ms): when the recipient's ACK reached the relay, or when the message expired."""
    status_seq: int | None

    @property
    def state(self) -> str:
        """One word: the status if there is one (``delivered``, ``expired``), else ``queued``."""
        return self.status if self.status is not None else STATE_QUEUED

    def to_json(self) -> dict[str, Any]:
        """``{"state": ..., "at": ms (with a status), "receipt": word | null}``."""
        item: dict[str, Any] = {"state": self.state}
        if self.status_at is not None:
            item["at"] = self.status_at
        item["receipt"] = self.receipt
        return item


@dataclass(frozen=True, slots=True)
class StoredStatus:
    """A delivery status as the store keeps it (a :class:`StatusNotice`); ``saved_at`` in Unix ms."""

    mailbox: str
    seq: int
    state: str
    at: int
    id: str | None
    recipient: str | None
    count: int | None
    first_seq: int | None
    saved_at: int


def status_json(status: StatusNotice) -> dict[str, Any]:
    """A delivery status as JSON: ``{"seq", "state", "at", "id", "recipient"}``, or for an overflow
    ``{"seq", "state": "overflow", "at", "count", "first_seq"}``."""
    if status.state == STATUS_OVERFLOW:
        return {
            "seq": status.seq,
            "state": STATUS_OVERFLOW,
            "at": status.at,
            "count": status.count,
            "first_seq": status.first_seq,
        }
    return {
        "seq": status.seq,
        "state": str(status.state),
        "at": status.at,
        "id": status.id,
        "recipient": status.recipient,
    }


def body_json(body: bytes) -> dict[str, str]:
    """A body as JSON fields: ``{"body": text}`` for valid UTF-8, else ``{"body_base64": ...}``."""
    try:
        return {"body": body.decode("utf-8")}
    except UnicodeDecodeError:
        return {"body_base64": base64.b64encode(body).decode("ascii")}


def security_json(security: str, error: str | None) -> dict[str, str]:
    """A message's security as JSON fields: ``{"security": ...}`` plus ``"security_error"`` when it failed."""
    return {"security": security} if error is None else {"security": security, "security_error": error}


def _where(mailbox: str | None, direction: str | None) -> tuple[str, list[Any]]:
    """The ``WHERE`` clause (with its leading space, or empty) and arguments for the optional filters."""
    where, args = [], []
    if mailbox is not None:
        where.append("mailbox = ?")
        args.append(mailbox)
    if direction is not None:
        where.append("direction = ?")
        args.append(direction)
    return (" WHERE " + " AND ".join(where) if where else ""), args


class _Log(NamedTuple):
    """What the exports show."""

    messages: list[StoredMessage]
    states: dict[tuple[str, str], dict[str, RecipientState]]
    """Per sent message, by (mailbox, id): its recipients' states, in the order of its recipient list."""
    orphans: list[RecipientState]
    """States of messages not in the store (sent by another client of the mailbox, or a status before its receipt)."""
    overflows: list[StoredStatus]


def _messages_table(name: str) -> str:
    return _TABLE.format(name=name, security="".join(f"{c},\n    " for c in _SECURITY_COLUMNS))


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class LocalStore:
    """A SQLite file holding one or more mailboxes' received and sent messages.

    Opening creates the file (and its directory) if needed and migrates an older schema in
    place (see the module docstring). Raises ``sqlite3.Error`` (or ``OSError``) if the file
    cannot be opened, read or written, ``sqlite3.DatabaseError`` if it was written by a newer
    client (a schema version this code does not know).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        on_disk = str(path) != ":memory:"
        if on_disk:
            self.path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE))  # never readable by others, even briefly
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._prepare_schema()
            if on_disk:
                self._restrict_files()
        except BaseException:
            self._db.close()
            raise

    def _restrict_files(self) -> None:
        """Make the file and its WAL and shared-memory files mode 0600 (a store made before schema 4 may have been
        created readable by others). SQLite creates the WAL and -shm files with the database file's mode, so once
        it is 0600 they are too."""
        for suffix in ("", "-wal", "-shm"):
            name = self.path.with_name(self.path.name + suffix)
            try:
                mode = name.stat().st_mode & 0o777
            except FileNotFoundError:
                continue
            if mode != FILE_MODE:
                name.chmod(FILE_MODE)

    def _prepare_schema(self) -> None:
        """Create the schema in a new file, or migrate an older one step by step, in one transaction."""
        db = self._db
        if db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return  # the usual case: no write lock taken
        db.execute("BEGIN IMMEDIATE")  # decided under the lock: another process may be migrating too
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            has_table = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'messages'").fetchone()
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"the local store {self.path} has schema version {version}, newer than this client's"
                    f" ({SCHEMA_VERSION}): use a newer relay client"
                )
            if version == 0 and not has_table:  # a new file
                db.execute(_messages_table("messages"))
                for table in _STATE_TABLES:
                    db.execute(table)
            else:
                if version == 0:  # schema 1: unique by (mailbox, direction, id), no emitted flag
                    db.execute(_messages_table("messages_v2"))
                    db.execute(
                        f"INSERT INTO messages_v2 ({_COLUMNS_V1}, emitted) SELECT {_COLUMNS_V1}, 1 FROM messages"
                    )
                    db.execute("DROP TABLE messages")  # drops its index too
                    db.execute("ALTER TABLE messages_v2 RENAME TO messages")
                else:  # schemas 2 and 3: no message security (every row so far was plaintext: the default)
                    for column in _SECURITY_COLUMNS:
                        db.execute(f"ALTER TABLE messages ADD COLUMN {column}")
                if version <= 2:  # schema 2: no per-recipient state of sent messages
                    for table in _STATE_TABLES:
                        db.execute(table)
                    db.execute(_STATES_FROM_V2)
            for table in _KEY_TABLES:  # schema 4: device keys and contacts
                db.execute(table)
            for statement in _INDEXES:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close the file. Idempotent."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> LocalStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, statements: Iterable[tuple[str, Sequence[Any]]]) -> list[int]:
        """Run ``statements`` in one transaction; each one's rowcount. Committed (and synced) when this
        returns. Raises sqlite3.Error; then nothing was written."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                counts = [db.execute(sql, args).rowcount for sql, args in statements]
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return counts

    # ------------------------------------------------------------ writing

    def save_incoming(self, mailbox: str, messages: Sequence[IncomingMessage]) -> list[bool]:
        """Save received messages in one transaction; for each, whether it was new (not saved before).

        A message is new unless one with the same (sender, id) is already saved for ``mailbox``:
        a redelivery is not new, another sender's message that reuses an expired message's id is.
        Each is saved with its ``security`` (and ``security_error``) as given.
        Committed (and synced) when this returns. Raises sqlite3.Error; then nothing was saved.
        """
        saved_at = _now_ms()
        recipients = json.dumps([mailbox])
        counts = self._write(
            (
                _INSERT,
                (
                    mailbox,
                    INCOMING,
                    m.id,
                    m.sender,
                    recipients,
                    m.sent_at,
                    m.expires_at,
                    saved_at,
                    m.body,
                    m.security,
                    m.security_error,
                ),
            )
            for m in messages
        )
        return [n == 1 for n in counts]

    def record_outgoing(
        self,
        mailbox: str,
        messages: Iterable[SentMessage],
        *,
        sent_at: int | None = None,
        expires_at: int | None = None,
    ) -> int:
        """Record messages ``mailbox`` sent, with each accepted recipient's receipt word; returns how many
        messages were new.

        The message's recipient list is those the relay accepted it for (stored, or a duplicate of
        a stored copy); each gets a :class:`RecipientState` with the receipt's word, unless one was
        recorded before (a status saved before the receipt is kept). ``sent_at`` defaults to now (the
        broker's own timestamp is not in the receipt). Raises sqlite3.Error; then nothing was recorded.
        """
        sent_at = _now_ms() if sent_at is None else sent_at
        statements: list[tuple[str, Sequence[Any]]] = []
        kinds: list[bool] = []
        for m in messages:
            to = list(m.receipts)
            statements.append(
                (
                    _INSERT,
                    (
                        mailbox,
                        OUTGOING,
                        m.id,
                        mailbox,
                        json.dumps(to),
                        sent_at,
                        expires_at,
                        sent_at,
                        m.body,
                        m.security,
                        None,
                    ),
                )
            )
            kinds.append(True)
            for recipient, word in m.receipts.items():
                statements.append((_UPSERT_RECEIPT, (mailbox, m.id, recipient, str(word), int(m.notify), sent_at)))
                kinds.append(False)
        counts = self._write(statements)
        return sum(n for n, is_message in zip(counts, kinds, strict=True) if is_message)

    def save_statuses(self, mailbox: str, statuses: Sequence[StatusNotice]) -> list[bool]:
        """Save delivery statuses that reached ``mailbox`` (the sender) in one transaction; for each,
        whether it was new.

        A "delivered" / "expired" status goes to its (id, recipient)'s :class:`RecipientState`, a row
        made for it if the message is not recorded (yet: a status may arrive before its receipt); it is
        not new if that row already has this seq or a larger one (a redelivery). An "overflow" record is
        kept per ``first_seq``: new unless it is saved with this seq or a larger one. New statuses are
        unemitted. Committed (and synced) when this returns, so the caller may STATUS_ACK them all, new
        or not. Raises sqlite3.Error; then nothing was saved.
        """
        saved_at = _now_ms()
        statements: list[tuple[str, Sequence[Any]]] = []
        for s in statuses:
            if s.state == STATUS_OVERFLOW:
                statements.append((_UPSERT_OVERFLOW, (mailbox, s.first_seq, s.seq, s.count, s.at, saved_at)))
            else:
                statements.append((_UPSERT_STATUS, (mailbox, s.id, s.recipient, str(s.state), s.at, s.seq, saved_at)))
        return [n == 1 for n in self._write(statements)]

    # ------------------------------------------------------------ device keys and contacts

    def device_keys(self, mailbox: str) -> StoredKeys | None:
        """``mailbox``'s private keys, or None if this store has none for it yet."""
        with self._lock:
            rows = self._db.execute(_SELECT_KEYS, (mailbox,)).fetchall()
        if not rows:
            return None
        keys = [StoredKey(kid, bytes(private), created, retired) for _seed, kid, private, created, retired in rows]
        current = [k for k in keys if k.retired_at is None]
        if len(current) != 1:
            raise sqlite3.DatabaseError(f"the local store {self.path} has no current encryption key for {mailbox!r}")
        return StoredKeys(bytes(rows[0][0]), current[0], tuple(k for k in keys if k.retired_at is not None))

    def create_device_keys(self, mailbox: str, seed: bytes, kid: str, private: bytes) -> StoredKeys:
        """Store ``mailbox``'s first keys (identity ``seed``, encryption key ``kid``/``private``) unless it has keys
        already (another process made them first); returns the keys now stored. Raises sqlite3.Error."""
        now = _now_ms()
        self._write(
            [
                ("INSERT OR IGNORE INTO identities (mailbox, seed, created_at) VALUES (?, ?, ?)", (mailbox, seed, now)),
                (
                    "INSERT INTO encryption_keys (mailbox, kid, private, created_at)"
                    " SELECT ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM encryption_keys WHERE mailbox = ?)",
                    (mailbox, kid, private, now, mailbox),
                ),
            ]
        )
        keys = self.device_keys(mailbox)
        assert keys is not None
        return keys

    def rotate_encryption_key(self, mailbox: str, kid: str, private: bytes) -> StoredKeys:
        """Make ``kid``/``private`` ``mailbox``'s current encryption key and retire the one it replaces (kept until
        :meth:`purge_retired_keys`); the identity stays. Raises KeyError if ``mailbox`` has no keys here, ValueError
        if ``kid`` is one of its keys already, sqlite3.Error."""
        now = _now_ms()
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                if db.execute("SELECT 1 FROM identities WHERE mailbox = ?", (mailbox,)).fetchone() is None:
                    raise KeyError(mailbox)
                if db.execute("SELECT 1 FROM encryption_keys WHERE mailbox = ? AND kid = ?", (mailbox, kid)).fetchone():
                    raise ValueError(f"{mailbox!r} has an encryption key {kid!r} already")
                db.execute(
                    "UPDATE encryption_keys SET retired_at = ? WHERE mailbox = ? AND retired_at IS NULL", (now, mailbox)
                )
                db.execute(
                    "INSERT INTO encryption_keys (mailbox, kid, private, created_at) VALUES (?, ?, ?, ?)",
                    (mailbox, kid, private, now),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        keys = self.device_keys(mailbox)
        assert keys is not None
        return keys

    def purge_retired_keys(self, mailbox: str, retired_before: int) -> int:
        """Delete ``mailbox``'s encryption keys retired before ``retired_before`` (Unix ms): no message sealed to them
        can still be queued. Returns how many. Raises sqlite3.Error."""
        sql = "DELETE FROM encryption_keys WHERE mailbox = ? AND retired_at IS NOT NULL AND retired_at < ?"
        return self._write([(sql, (mailbox, retired_before))])[0]

    def contacts(self, mailbox: str, names: Iterable[str] | None = None) -> list[Contact]:
        """``mailbox``'s contacts (optionally only those in ``names``), sorted by contact."""
        sql, args = _SELECT_CONTACTS + " WHERE mailbox = ?", [mailbox]
        if names is not None:
            wanted = sorted(set(names))
            if not wanted:
                return []
            sql += f" AND contact IN ({', '.join('?' * len(wanted))})"
            args += wanted
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY contact", args).fetchall()
        return [
            Contact(mb, c, bytes(ik), at, None if pik is None else bytes(pik), pat) for mb, c, ik, at, pik, pat in rows
        ]

    def pin_keys(self, mailbox: str, pins: Mapping[str, bytes]) -> None:
        """Pin each contact's identity key (trust on first use, or a change accepted): it replaces the pinned one and
        clears a pending one; pinning the key already pinned changes nothing. One transaction. Raises sqlite3.Error."""
        now = _now_ms()
        self._write((_UPSERT_PIN, (mailbox, contact, ik, now)) for contact, ik in pins.items())

    def set_pending_keys(self, mailbox: str, pending: Mapping[str, bytes]) -> None:
        """Record, per contact, an identity key the directory showed that differs from the pinned one (a key change
        waiting for the user). A contact without a pin, or whose pin is that key, is left alone. Raises
        sqlite3.Error."""
        now = _now_ms()
        self._write((_SET_PENDING, (ik, now, mailbox, contact, ik, ik)) for contact, ik in pending.items())

    def accept_pending_key(self, mailbox: str, contact: str) -> Contact | None:
        """Pin ``contact``'s pending identity key (the user accepted the change); the contact as now stored, or None if
        no change was pending. Raises sqlite3.Error."""
        sql = (
            "UPDATE contacts SET ik = pending_ik, pinned_at = ?, pending_ik = NULL, pending_at = NULL"
            " WHERE mailbox = ? AND contact = ? AND pending_ik IS NOT NULL"
        )
        if not self._write([(sql, (_now_ms(), mailbox, contact))])[0]:
            return None
        return self.contacts(mailbox, [contact])[0]

    # ------------------------------------------------------------ reading

    def messages(self, mailbox: str | None = None, *, direction: str | None = None) -> list[StoredMessage]:
        """Messages in conversation order (sent_at, then the order they were saved), optionally filtered."""
        where, args = _where(mailbox, direction)
        return self._select(_SELECT + where + " ORDER BY sent_at, seq", args)

    def unemitted(self, mailbox: str, *, limit: int | None = None) -> list[StoredMessage]:
        """Incoming messages of ``mailbox`` not yet marked emitted, in the order they were saved
        (at most ``limit``). See :meth:`mark_emitted`."""
        sql = _SELECT + " WHERE mailbox = ? AND direction = 'in' AND emitted = 0 ORDER BY seq"
        args: list[Any] = [mailbox]
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return self._select(sql, args)

    def mark_emitted(self, mailbox: str, keys: Iterable[MessageKey]) -> int:
        """Mark incoming messages of ``mailbox``, given as (sender, id), as handed on by the consumer,
        in one transaction; returns how many changed (already marked and unknown keys count 0).

        Committed when this returns. Raises sqlite3.Error; then nothing was marked.
        """
        sql = (
            "UPDATE messages SET emitted = 1"
            " WHERE mailbox = ? AND direction = 'in' AND sender = ? AND id = ? AND emitted = 0"
        )
        return sum(self._write((sql, (mailbox, sender, mid)) for sender, mid in keys))

    def unemitted_statuses(self, mailbox: str, *, limit: int | None = None) -> list[StoredStatus]:
        """Delivery statuses of ``mailbox`` saved and not yet marked emitted, in seq order (the order the
        relay queued them), at most ``limit``. See :meth:`mark_statuses_emitted`."""
        sql = _UNEMITTED_STATUSES
        args: list[Any] = [mailbox, mailbox]
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [StoredStatus(mailbox, *row) for row in rows]

    def mark_statuses_emitted(self, mailbox: str, seqs: Iterable[int]) -> int:
        """Mark delivery statuses of ``mailbox``, given by seq, as handed on, in one transaction; returns
        how many changed. A status since replaced by a newer one (another seq) stays unemitted.

        Committed when this returns. Raises sqlite3.Error; then nothing was marked.
        """
        statements: list[tuple[str, Sequence[Any]]] = []
        for seq in seqs:
            statements.append(
                (
                    "UPDATE recipient_states SET emitted = 1 WHERE mailbox = ? AND status_seq = ? AND emitted = 0",
                    (mailbox, seq),
                )
            )
            statements.append(
                (
                    "UPDATE status_overflows SET emitted = 1 WHERE mailbox = ? AND seq = ? AND emitted = 0",
                    (mailbox, seq),
                )
            )
        return sum(self._write(statements))

    def recipient_states(self, mailbox: str | None = None, *, id: str | None = None) -> list[RecipientState]:
        """What became of sent messages per recipient (optionally of one mailbox, one message id), ordered by
        mailbox, id, recipient."""
        where, args = [], []
        if mailbox is not None:
            where.append("mailbox = ?")
            args.append(mailbox)
        if id is not None:
            where.append("id = ?")
            args.append(id)
        sql = _SELECT_STATES + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY mailbox, id, recipient"
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [
            RecipientState(mb, mid, rcpt, receipt, bool(notify), status, at, seq)
            for mb, mid, rcpt, receipt, notify, status, at, seq in rows
        ]

    def status_overflows(self, mailbox: str | None = None) -> list[StoredStatus]:
        """The overflow records saved (optionally for one mailbox), by mailbox and first_seq: the latest seen
        of each. Each says how many statuses the relay folded instead of keeping them, and the records are
        distinct, so the sum of their counts is how many statuses the relay did not keep."""
        sql = "SELECT mailbox, seq, 'overflow', at, NULL, NULL, count, first_seq, saved_at FROM status_overflows"
        args: list[Any] = []
        if mailbox is not None:
            sql += " WHERE mailbox = ?"
            args.append(mailbox)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY mailbox, first_seq", args).fetchall()
        return [StoredStatus(*row) for row in rows]

    def _select(self, sql: str, args: Sequence[Any]) -> list[StoredMessage]:
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [
            StoredMessage(mb, d, mid, snd, tuple(json.loads(rc)), sa, ea, sv, bytes(body), bool(em), sec, err)
            for mb, d, mid, snd, rc, sa, ea, sv, body, em, sec, err in rows
        ]

    def count(self, mailbox: str | None = None, *, direction: str | None = None) -> int:
        """How many messages :meth:`messages` would return."""
        where, args = _where(mailbox, direction)
        sql = "SELECT count(*) FROM messages" + where
        with self._lock:
            return int(self._db.execute(sql, args).fetchone()[0])

    def mailboxes(self) -> list[str]:
        """Every mailbox with a message in this file, sorted."""
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT DISTINCT mailbox FROM messages ORDER BY mailbox")]

    # ------------------------------------------------------------ export

    def _log(self, mailbox: str | None) -> _Log:
        """What the exports show, read once."""
        messages = self.messages(mailbox)
        by_message: dict[tuple[str, str], dict[str, RecipientState]] = {}
        for state in self.recipient_states(mailbox):
            by_message.setdefault((state.mailbox, state.id), {})[state.recipient] = state
        states: dict[tuple[str, str], dict[str, RecipientState]] = {}
        for m in messages:
            if m.direction == OUTGOING:
                known = by_message.pop((m.mailbox, m.id), {})
                ordered = {r: known.pop(r) for r in m.recipients if r in known}
                states[(m.mailbox, m.id)] = ordered | known
        orphans = [s for per_message in by_message.values() for s in per_message.values()]
        return _Log(messages, states, orphans, self.status_overflows(mailbox))

    def export_json(self, mailbox: str | None = None) -> str:
        """Every message as a JSON document: ``{"format": "relay-local-store/1", "messages": [...],
        "other_statuses": [...], "status_overflows": [...]}``. A sent message has ``notify`` and
        ``delivery``: per recipient ``{"state", "at" (with a status), "receipt"}``
        (:meth:`RecipientState.to_json`); every message has ``security`` (and ``security_error`` if it failed);
        ``other_statuses`` are statuses of messages not in the store
        (sent by another client of the mailbox), ``status_overflows`` the overflow statuses."""
        messages, states, orphans, overflows = self._log(mailbox)
        out: list[dict[str, Any]] = []
        for m in messages:
            item: dict[str, Any] = {
                "mailbox": m.mailbox,
                "direction": m.direction,
                "id": m.id,
                "from": m.sender,
                "to": list(m.recipients),
                "sent_at": m.sent_at,
                "expires_at": m.expires_at,
            }
            if m.direction == OUTGOING:
                per = states[(m.mailbox, m.id)]
                item["notify"] = any(s.notify for s in per.values())
                item["delivery"] = {r: s.to_json() for r, s in per.items()}
            item.update(m.body_json())
            item.update(m.security_json())
            out.append(item)
        doc = {
            "format": "relay-local-store/1",
            "messages": out,
            "other_statuses": [
                {"mailbox": s.mailbox, "id": s.id, "recipient": s.recipient, **s.to_json()} for s in orphans
            ],
            "status_overflows": [
                {"mailbox": o.mailbox, "first_seq": o.first_seq, "seq": o.seq, "count": o.count, "at": o.at}
                for o in overflows
            ],
        }
        return json.dumps(doc, ensure_ascii=False, indent=2) + "\n"

    def export_markdown(self, mailbox: str | None = None, *, tz: dt.tzinfo | None = None) -> str:
        """A readable conversation log: a heading per day, then ``**alice** → bob · 14:03:07`` and the body
        quoted below it; a sent message then says per recipient what became of it (``*delivered to bob
        14:05:01 · queued for carol*``). A message not end-to-end encrypted says so after its time
        (``· unencrypted``), and a failed one (``· failed (bad_signature)``) shows a note instead of a body;
        :data:`SECURITY_NOTE` under the title then explains the marks. Bodies that are not UTF-8 are shown as
        base64 with a note. ``tz`` defaults to the local time zone. If the log holds sent messages,
        :data:`SENT_NOTE` under the title says what those words mean; statuses the relay could not keep, and
        statuses of messages not in the store, are listed too."""
        messages, states, orphans, overflows = self._log(mailbox)

        def local(ms: int) -> dt.datetime:
            when = dt.datetime.fromtimestamp(ms / 1000, tz=tz or dt.UTC)
            return when.astimezone() if tz is None else when

        names = sorted({m.mailbox for m in messages}) if mailbox is None else [mailbox]
        lines = [f"# Relay conversation log — {', '.join(names) if names else 'no messages'}", ""]
        if any(m.security != E2E for m in messages):
            lines += [SECURITY_NOTE, ""]
        if any(m.direction == OUTGOING for m in messages) or orphans:
            lines += [SENT_NOTE, ""]
        missed = sum(o.count or 0 for o in overflows)
        if missed:
            lines += [
                f"*The relay could not keep {missed} delivery status{'' if missed == 1 else 'es'} (too many were"
                " waiting while the mailbox was away; latest at"
                f" {local(max(o.at for o in overflows)):%Y-%m-%d %H:%M:%S}): some sent messages below may say queued"
                " although they were delivered or expired.*",
                "",
            ]
        day = None
        for m in messages:
            when = local(m.sent_at)
            if when.date() != day:
                day = when.date()
                lines += [f"## {day.isoformat()}", ""]
            mark = {E2E: "", PLAINTEXT: " · unencrypted"}.get(m.security, f" · failed ({m.security_error})")
            lines.append(f"**{m.sender}** → {', '.join(m.recipients)} · {when:%H:%M:%S}{mark}")
            if m.security == FAILED:
                note = f"not shown: it did not open or verify on this device, so it may not be from {m.sender}"
                body_lines = [f"*({note})*"]
            else:
                try:
                    text = m.body.decode("utf-8")
                    body_lines = text.split("\n") if text else [""]
                except UnicodeDecodeError:
                    encoded = base64.b64encode(m.body).decode("ascii")
                    body_lines = [f"*(binary body, {len(m.body)} bytes, shown as base64)*", f"`{encoded}`"]
            lines += [f"> {line}".rstrip() for line in body_lines]
            if m.direction == OUTGOING and states[(m.mailbox, m.id)]:
                words = [_state_words(s, local, when.date()) for s in states[(m.mailbox, m.id)].values()]
                lines.append(f"*{' · '.join(words)}*")
            lines.append("")
        if orphans:
            lines += ["## Delivery statuses of messages not in this log", ""]
            lines += [f"- {s.mailbox} → `{s.id}`: {_state_words(s, local, None)}" for s in orphans]
            lines.append("")
        return "\n".join(lines)


def _state_words(s: RecipientState, local: Callable[[int], dt.datetime], day: dt.date | None) -> str:
    """How the Markdown log says one recipient's state: ``delivered to bob 14:05:01``, ``queued for carol``."""
    if s.status_at is not None:
        when = local(s.status_at)
        at = f"{when:%H:%M:%S}" if when.date() == day else f"{when:%Y-%m-%d %H:%M:%S}"
        return (
            f"delivered to {s.recipient} {at}"
            if s.status == STATUS_DELIVERED
            else f"expired before {s.recipient} got it {at}"
        )
    words = f"sent to {s.recipient}'s open session" if s.receipt == "delivered" else f"queued for {s.recipient}"
    return words if s.notify else f"{words} (no status asked)"
