"""The client's local message store: the durable copy a client keeps of its conversation.

Theory of operation. One SQLite file (stdlib ``sqlite3``, WAL, ``synchronous=FULL`` so a
committed batch survives a power cut) holds the messages a mailbox received and the
messages it sent.

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

**Schema versions** live in ``PRAGMA user_version``: 0 with no table is a new file; 0 with
a ``messages`` table is the first schema (unique by (mailbox, direction, id), no
``emitted``), which is migrated in place to :data:`SCHEMA_VERSION` in one transaction,
keeping every row (its incoming rows count as emitted: that schema kept no record, and
re-printing a whole history after an upgrade would be worse). A newer version than this
code knows is refused.

Methods are blocking (the client calls them through ``trio.to_thread.run_sync``) and
thread-safe: one connection, serialised by a lock.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

__all__ = ["INCOMING", "OUTGOING", "SCHEMA_VERSION", "SENT_NOTE", "LocalStore", "MessageKey", "StoredMessage"]

INCOMING = "in"
OUTGOING = "out"

SCHEMA_VERSION = 2
"""``PRAGMA user_version`` of a current store. 1 (stored as 0) was unique by (mailbox, direction, id)."""

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
    UNIQUE (mailbox, direction, sender, id)
);
"""
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS messages_by_time ON messages (mailbox, sent_at)",
    "CREATE INDEX IF NOT EXISTS messages_unemitted ON messages (mailbox, seq) WHERE direction = 'in' AND emitted = 0",
)
_COLUMNS_V1 = "seq, mailbox, direction, id, sender, recipients, sent_at, expires_at, saved_at, body"
_INSERT = (
    "INSERT OR IGNORE INTO messages (mailbox, direction, id, sender, recipients, sent_at, expires_at, saved_at, body)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SELECT = (
    "SELECT mailbox, direction, id, sender, recipients, sent_at, expires_at, saved_at, body, emitted FROM messages"
)

SENT_NOTE = (
    "*Sent messages list the recipients the relay accepted them for (queued or handed to a connection);"
    " the log does not know whether a recipient has received them.*"
)
"""The line under a Markdown log's title when it holds sent messages."""

MessageKey = tuple[str, str]
"""What identifies an incoming message within a mailbox: (sender, id)."""


class IncomingMessage(Protocol):
    """What :meth:`LocalStore.save_incoming` needs of a delivery (a :class:`client.Delivery` fits)."""

    id: str
    sender: str
    sent_at: int
    expires_at: int
    body: bytes


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
    emitted: bool = False
    """For incoming messages: whether a consumer marked it handed on (:meth:`LocalStore.mark_emitted`)."""

    @property
    def key(self) -> MessageKey:
        """(sender, id): the message's identity within its mailbox and direction."""
        return (self.sender, self.id)

    def body_json(self) -> dict[str, str]:
        """``{"body": text}`` if the body is valid UTF-8, else ``{"body_base64": ...}``."""
        return body_json(self.body)


def body_json(body: bytes) -> dict[str, str]:
    """A body as JSON fields: ``{"body": text}`` for valid UTF-8, else ``{"body_base64": ...}``."""
    try:
        return {"body": body.decode("utf-8")}
    except UnicodeDecodeError:
        return {"body_base64": base64.b64encode(body).decode("ascii")}


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
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._prepare_schema()
        except BaseException:
            self._db.close()
            raise

    def _prepare_schema(self) -> None:
        """Create the schema in a new file, or migrate an older one, in one transaction."""
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
            if version == 0 and has_table:  # schema 1: unique by (mailbox, direction, id), no emitted flag
                db.execute(_TABLE.format(name="messages_v2"))
                db.execute(f"INSERT INTO messages_v2 ({_COLUMNS_V1}, emitted) SELECT {_COLUMNS_V1}, 1 FROM messages")
                db.execute("DROP TABLE messages")  # drops its index too
                db.execute("ALTER TABLE messages_v2 RENAME TO messages")
            elif version == 0:
                db.execute(_TABLE.format(name="messages"))
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

    # ------------------------------------------------------------ writing

    def save_incoming(self, mailbox: str, messages: Sequence[IncomingMessage]) -> list[bool]:
        """Save received messages in one transaction; for each, whether it was new (not saved before).

        A message is new unless one with the same (sender, id) is already saved for ``mailbox``:
        a redelivery is not new, another sender's message that reuses an expired message's id is.
        Committed (and synced) when this returns. Raises sqlite3.Error; then nothing was saved.
        """
        saved_at = _now_ms()
        recipients = json.dumps([mailbox])
        new: list[bool] = []
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                for m in messages:
                    cur = db.execute(
                        _INSERT,
                        (mailbox, INCOMING, m.id, m.sender, recipients, m.sent_at, m.expires_at, saved_at, m.body),
                    )
                    new.append(cur.rowcount == 1)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return new

    def record_outgoing(
        self,
        mailbox: str,
        messages: Iterable[tuple[str, Sequence[str], bytes]],
        *,
        sent_at: int | None = None,
        expires_at: int | None = None,
    ) -> int:
        """Record messages ``mailbox`` sent, as (id, recipients, body); returns how many were new.

        ``recipients`` should be those the broker accepted the message for (stored or a
        duplicate of a stored copy); the record says only that the relay took the message,
        nothing about whether a recipient has received it. ``sent_at`` defaults to now (the
        broker's own timestamp is not in the receipt). Raises sqlite3.Error; then nothing was recorded.
        """
        sent_at = _now_ms() if sent_at is None else sent_at
        rows = [
            (mailbox, OUTGOING, mid, mailbox, json.dumps(list(to)), sent_at, expires_at, sent_at, body)
            for mid, to, body in messages
        ]
        with self._lock:
            db = self._db
            before = db.total_changes
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(_INSERT, rows)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return db.total_changes - before

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
        rows = [(mailbox, sender, mid) for sender, mid in keys]
        with self._lock:
            db = self._db
            before = db.total_changes
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(
                    "UPDATE messages SET emitted = 1"
                    " WHERE mailbox = ? AND direction = 'in' AND sender = ? AND id = ? AND emitted = 0",
                    rows,
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return db.total_changes - before

    def _select(self, sql: str, args: Sequence[Any]) -> list[StoredMessage]:
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [
            StoredMessage(mb, d, mid, snd, tuple(json.loads(rc)), sa, ea, sv, bytes(body), bool(em))
            for mb, d, mid, snd, rc, sa, ea, sv, body, em in rows
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

    def export_json(self, mailbox: str | None = None) -> str:
        """Every message as a JSON document: ``{"format": "relay-local-store/1", "messages": [...]}``."""
        out: list[dict[str, Any]] = []
        for m in self.messages(mailbox):
            item: dict[str, Any] = {
                "mailbox": m.mailbox,
                "direction": m.direction,
                "id": m.id,
                "from": m.sender,
                "to": list(m.recipients),
                "sent_at": m.sent_at,
                "expires_at": m.expires_at,
            }
            item.update(m.body_json())
            out.append(item)
        return json.dumps({"format": "relay-local-store/1", "messages": out}, ensure_ascii=False, indent=2) + "\n"

    def export_markdown(self, mailbox: str | None = None, *, tz: dt.tzinfo | None = None) -> str:
        """A readable conversation log: a heading per day, then ``**alice** → bob · 14:03:07`` and the body
        quoted below it. Bodies that are not UTF-8 are shown as base64 with a note. ``tz`` defaults to
        the local time zone. If the log holds sent messages, :data:`SENT_NOTE` under the title says
        what their recipient lists mean (the store knows what the relay accepted, not what was read)."""
        messages = self.messages(mailbox)
        names = sorted({m.mailbox for m in messages}) if mailbox is None else [mailbox]
        lines = [f"# Relay conversation log — {', '.join(names) if names else 'no messages'}", ""]
        if any(m.direction == OUTGOING for m in messages):
            lines += [SENT_NOTE, ""]
        day = None
        for m in messages:
            when = dt.datetime.fromtimestamp(m.sent_at / 1000, tz=tz or dt.UTC)
            if tz is None:
                when = when.astimezone()
            if when.date() != day:
                day = when.date()
                lines += [f"## {day.isoformat()}", ""]
            lines.append(f"**{m.sender}** → {', '.join(m.recipients)} · {when:%H:%M:%S}")
            try:
                text = m.body.decode("utf-8")
                body_lines = text.split("\n") if text else [""]
            except UnicodeDecodeError:
                encoded = base64.b64encode(m.body).decode("ascii")
                body_lines = [f"*(binary body, {len(m.body)} bytes, shown as base64)*", f"`{encoded}`"]
            lines += [f"> {line}".rstrip() for line in body_lines]
            lines.append("")
        return "\n".join(lines)
