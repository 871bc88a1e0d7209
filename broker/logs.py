"""The broker's log: one line per event, the session id first, as text or as JSON lines.

Theory of operation. Everything logs through the standard library (``logging.getLogger(__name__)``);
:func:`broker_logging` puts one handler on the root logger for the time the broker runs, at the
configured level (``log_level``), with one of two formatters (``log_format``):

- ``text`` (:class:`TextFormatter`): ``SESSION TIME LEVEL LOGGER: MESSAGE key=value ...``, e.g.
  ``3f9a1c0e5b7d2a64 2026-12-03T14:59:01.123Z INFO broker.session: open: alice``; ``-`` for an event
  outside any session. The session id comes first, so ``grep '^3f9a1c0e5b7d2a64 '`` is one connection's story.
- ``json`` (:class:`JsonFormatter`): one JSON object a line with the same fixed keys, in this order:
  ``session`` (null outside a session), ``time``, ``level``, ``logger``, ``message``, ``fields`` (an object,
  maybe empty; a traceback is its ``exception``).

Whose session: a record's ``session`` attribute if the call gave one (``extra={"session": ...}``, what
:func:`session_log` does for a session's own events, whichever task reports them), else the session of
the task that logs, :data:`current_session`, which :class:`broker.session.Session` sets when it starts to
run: trio copies the context into every task started from there, so the delivery pump, the outbox writer,
presence and the store's health log under the session that caused the event. It is read when the record is
formatted, in the logging call itself (the handler is synchronous).

Fields: ``extra={"fields": {...}}`` gives an event machine-readable values (``code``, ``mailbox``); the
text form appends them as ``key=value``. Every line is one line: control characters in the message, the
fields and a traceback are escaped (``\\n``), so no event spans lines and no value can forge another event.

What never goes in: a message body and a token. The broker logs ids, mailbox names, codes and the
broker's own messages, never the content of a frame or a credential (tests/broker/test_logs.py sends a
recognisable body and token over TCP, WebSocket and HTTP at DEBUG and finds neither in the log).
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TextIO

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "JsonFormatter",
    "TextFormatter",
    "broker_logging",
    "current_session",
    "session_log",
]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
"""The levels ``log_level`` may name (upper case; the configuration tidies the case)."""
LOG_FORMATS = ("text", "json")
"""The forms ``log_format`` may name."""

current_session: contextvars.ContextVar[str | None] = contextvars.ContextVar("relay_session", default=None)
"""The id of the session whose task is running (None outside any): set by :class:`broker.session.Session`."""

_NO_SESSION = "-"
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)} | {0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}


def _one_line(text: str) -> str:
    """``text`` with every control character escaped: it cannot span lines or end the line early."""
    return text.translate(_ESCAPES)


def _session_of(record: logging.LogRecord) -> str | None:
    given = getattr(record, "session", None)
    return str(given) if given is not None else current_session.get()


def _time_of(record: logging.LogRecord) -> str:
    """ISO 8601 UTC to the millisecond: ``2026-12-03T14:59:01.123Z``."""
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fields_of(formatter: logging.Formatter, record: logging.LogRecord) -> dict[str, Any]:
    given = getattr(record, "fields", None)
    fields = dict(given) if isinstance(given, Mapping) else {}
    if record.exc_info:
        fields["exception"] = formatter.formatException(record.exc_info)
    if record.stack_info:
        fields["stack"] = formatter.formatStack(record.stack_info)
    return fields


def _text_value(value: Any) -> str:
    """A field's value in the text form: bare if it is a simple word or number, else as JSON (quoted)."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int | float):
        return str(value)
    text = str(value)
    if text and all(c.isprintable() and not c.isspace() and c not in '"=\\' for c in text):
        return text
    return json.dumps(text, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``SESSION TIME LEVEL LOGGER: MESSAGE key=value ...`` on one line (module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"{_session_of(record) or _NO_SESSION} {_time_of(record)} {record.levelname} {record.name}: "
            f"{record.getMessage()}"
        )
        for key, value in _fields_of(self, record).items():
            line += f" {key}={_text_value(value)}"
        return _one_line(line)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``session``, ``time``, ``level``, ``logger``, ``message``, ``fields`` (module doc)."""

    def format(self, record: logging.LogRecord) -> str:
        event = {
            "session": _session_of(record),
            "time": _time_of(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "fields": _fields_of(self, record),
        }
        return json.dumps(event, ensure_ascii=False, default=str)  # JSON escapes every control character


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler writing to whatever ``sys.stderr`` is when it writes (tests swap it)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _: object) -> None:
        pass


@contextmanager
def broker_logging(level: str, form: str, stream: TextIO | None = None) -> Iterator[logging.Handler]:
    """While the block runs, the root logger writes every event at ``level`` or above to ``stream`` (default: the
    current ``sys.stderr``) in ``form`` (``text`` or ``json``); then the root logger is as it was.

    Any handlers the root logger had stay (pytest's, in tests). Raises ValueError for a level or form not in
    :data:`LOG_LEVELS` / :data:`LOG_FORMATS` (the configuration checks them first)."""
    if level not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, not {level!r}")
    if form not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {form!r}")
    handler: logging.Handler = _Stderr() if stream is None else logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if form == "json" else TextFormatter())
    root = logging.getLogger()
    before = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(before)


class _SessionLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs


def session_log(logger: logging.Logger, session_id: str) -> logging.LoggerAdapter:  # type: ignore[type-arg]
    """``logger`` for one session's own events: each record names ``session_id``, whichever task logs it (a session
    closed by another's takeover, or by the broker's shutdown, logs under its own id)."""
    return _SessionLog(logger, {"session": session_id})
