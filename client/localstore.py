"""The client's local message store: the durable copy a client keeps of its conversation.

Theory of operation. One SQLite file (stdlib ``sqlite3``, WAL, ``synchronous=FULL`` so a
committed batch survives a power cut) holds the messages a mailbox received and the
messages it sent. Incoming messages are keyed by (mailbox, id): saving a redelivered
message again is a no-op, which is how at-least-once delivery becomes exactly-once in the
store. :meth:`LocalStore.save_incoming` saves a whole batch in one transaction and says
which messages were new; the client ACKs a batch only after that commit.

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

__all__ = ["INCOMING", "OUTGOING", "LocalStore", "StoredMessage"]

INCOMING = "in"
OUTGOING = "out"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
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
    UNIQUE (mailbox, direction, id)
);
CREATE INDEX IF NOT EXISTS messages_by_time ON messages (mailbox, sent_at);
"""
_INSERT = (
    "INSERT OR IGNORE INTO messages (mailbox, direction, id, sender, recipients, sent_at, expires_at, saved_at, body)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


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

    def body_json(self) -> dict[str, str]:
        """``{"body": text}`` if the body is valid UTF-8, else ``{"body_base64": ...}``."""
        return body_json(self.body)


def body_json(body: bytes) -> dict[str, str]:
    """A body as JSON fields: ``{"body": text}`` for valid UTF-8, else ``{"body_base64": ...}``."""
    try:
        return {"body": body.decode("utf-8")}
    except UnicodeDecodeError:
        return {"body_base64": base64.b64encode(body).decode("ascii")}


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class LocalStore:
    """A SQLite file holding one or more mailboxes' received and sent messages.

    Raises ``sqlite3.Error`` (or ``OSError``) if the file cannot be opened or written.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> LocalStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ writing

    def save_incoming(self, mailbox: str, messages: Sequence[IncomingMessage]) -> list[bool]:
        """Save received messages in one transaction; for each, whether it was new (not saved before).

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

        ``sent_at`` defaults to now (the broker's own timestamp is not in the receipt).
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
        where, args = [], []
        if mailbox is not None:
            where.append("mailbox = ?")
            args.append(mailbox)
        if direction is not None:
            where.append("direction = ?")
            args.append(direction)
        sql = "SELECT mailbox, direction, id, sender, recipients, sent_at, expires_at, saved_at, body FROM messages"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY sent_at, seq"
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [
            StoredMessage(mb, d, mid, snd, tuple(json.loads(rc)), sa, ea, sv, bytes(body))
            for mb, d, mid, snd, rc, sa, ea, sv, body in rows
        ]

    def count(self, mailbox: str | None = None, *, direction: str | None = None) -> int:
        return len(self.messages(mailbox, direction=direction))

    def mailboxes(self) -> list[str]:
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
        the local time zone."""
        messages = self.messages(mailbox)
        names = sorted({m.mailbox for m in messages}) if mailbox is None else [mailbox]
        lines = [f"# Relay conversation log — {', '.join(names) if names else 'no messages'}", ""]
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
