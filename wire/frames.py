"""Frame classes: one small frozen value class per frame type in protocol.md.

Theory of operation: a frame validates itself when it is built, so an illegal frame
cannot exist. ``to_wire()`` gives the CBOR map (text keys, ``type`` first) and
``FRAME_TYPES[name].from_wire(map)`` builds a frame from a decoded map, turning any
validation failure into :class:`~wire.errors.RemoteProtocolError` with
``INVALID_FIELD``. Unknown keys are ignored (forward compatibility); missing or
ill-typed keys are refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Self, TypeVar, dataclass_transform

from .errors import ErrorCode, RemoteProtocolError

F = TypeVar("F", bound="Frame")

__all__ = [
    "DELIVER_OVERHEAD_BYTES",
    "MAX_RECIPIENT_CHARS",
    "FRAME_TYPES",
    "PROTOCOL_VERSION",
    "Ack",
    "Cleanup",
    "CleanupResult",
    "Deliver",
    "Drained",
    "Error",
    "Frame",
    "Hello",
    "Ping",
    "Pong",
    "Pull",
    "Receipt",
    "RecipientResult",
    "Send",
    "Stats",
    "StatsResult",
    "Status",
    "Welcome",
    "Bye",
    "is_valid_mailbox_id",
    "is_valid_message_id",
    "max_recipients_within",
    "receipt_bound_bytes",
]

PROTOCOL_VERSION = 1
UINT_MAX = 2**63 - 1
"""Largest integer any field may carry (fits a signed 64-bit integer in every language)."""
DELIVER_OVERHEAD_BYTES = 256
"""Room a DELIVER needs besides its body: at most 222 bytes (keys, a 64-character id and
sender, three 64-bit integers, the body's header), rounded up. A body longer than
``max_frame_bytes - DELIVER_OVERHEAD_BYTES`` is refused (BODY_TOO_LARGE) so that every
accepted message can be delivered within ``max_frame_bytes``."""
MAX_TEXT = 4096
"""Longest free-text field (tokens, error messages), in characters."""
MAX_RECIPIENT_CHARS = 64
"""Longest element of SEND ``to`` (and so of a RECEIPT ``results`` key), in code points: as long as the
longest mailbox id. It bounds what a RECEIPT echoes per recipient, which is what keeps every RECEIPT within
the frame limit (see :func:`receipt_bound_bytes`)."""
RECEIPT_ENTRY_MAX_BYTES = 2 + 4 * MAX_RECIPIENT_CHARS + 24
"""Most bytes one ``results`` entry can take: the key (a head and up to 4 UTF-8 bytes a code point) and
``{"status": "refused", "code": <uint16>}`` (24 bytes)."""
RECEIPT_BASE_MAX_BYTES = 96
"""Most bytes a RECEIPT takes besides its entries: the map head, ``type``, ``id`` (a 64-character id),
the ``results`` key and the results map's head (85 bytes), rounded up."""


def receipt_bound_bytes(max_recipients: int) -> int:
    """The largest RECEIPT body a broker allowing ``max_recipients`` recipients per SEND can emit."""
    return RECEIPT_BASE_MAX_BYTES + max_recipients * RECEIPT_ENTRY_MAX_BYTES


def max_recipients_within(max_frame_bytes: int) -> int:
    """The most recipients per SEND whose largest RECEIPT still fits ``max_frame_bytes`` (the inverse of
    :func:`receipt_bound_bytes`)."""
    return max(0, (max_frame_bytes - RECEIPT_BASE_MAX_BYTES) // RECEIPT_ENTRY_MAX_BYTES)


_MAILBOX_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+\-]{0,63}")


def is_valid_mailbox_id(value: object) -> bool:
    """A mailbox id: 1-64 ASCII characters from ``A-Z a-z 0-9 . _ @ + -``, not starting with punctuation."""
    return type(value) is str and _MAILBOX_RE.fullmatch(value) is not None


def is_valid_message_id(value: object) -> bool:
    """A message id: 1-64 printable ASCII characters (0x21-0x7E), no spaces."""
    # Same set as the regex [\x21-\x7e]{1,64}, at a third of the cost (it runs per SEND and per ACKed id).
    return type(value) is str and 0 < len(value) <= 64 and value.isascii() and value.isprintable() and " " not in value


def _uint(name: str, value: object, *, minimum: int = 0) -> None:
    if type(value) is not int or not minimum <= value <= UINT_MAX:
        raise ValueError(f"{name} must be an integer from {minimum} to {UINT_MAX}")


def _text(name: str, value: object, *, min_len: int = 0, max_len: int = MAX_TEXT) -> None:
    if type(value) is not str or not min_len <= len(value) <= max_len:
        raise ValueError(f"{name} must be a text string of {min_len} to {max_len} characters")


def _bytes(name: str, value: object) -> None:
    if type(value) is not bytes:
        raise ValueError(f"{name} must be a byte string")


def _message_id(name: str, value: object) -> None:
    if not is_valid_message_id(value):
        raise ValueError(f"{name} must be 1-64 printable ASCII characters without spaces")


def _mailbox(name: str, value: object) -> None:
    if not is_valid_mailbox_id(value):
        raise ValueError(f"{name} must be a mailbox id (1-64 of A-Z a-z 0-9 . _ @ + -)")


def _tuple_of_text(name: str, value: object, *, min_len: int = 1, max_chars: int | None = None) -> tuple[str, ...]:
    if type(value) is list:
        value = tuple(value)
    if type(value) is not tuple or len(value) < min_len:
        raise ValueError(f"{name} must be an array of at least {min_len} text strings")
    for item in value:
        if type(item) is not str:
            raise ValueError(f"{name} must contain only text strings")
        if max_chars is not None and len(item) > max_chars:
            raise ValueError(f"{name} elements must be at most {max_chars} characters")
    return value


def _check_send(id: object, to: object, body: object, ttl_s: object) -> None:
    """SEND's rules (its one validator); raises ValueError. ``to`` may be a list or a tuple."""
    _message_id("id", id)
    _tuple_of_text("to", to, max_chars=MAX_RECIPIENT_CHARS)
    _bytes("body", body)
    if ttl_s is not None:
        _uint("ttl_s", ttl_s, minimum=1)


class Frame:
    """Base class of all frames. ``TYPE`` is the value of the ``type`` key on the wire."""

    __slots__ = ()
    TYPE: ClassVar[str]
    # (wire key, attribute name) for every field; wire keys differ only where the
    # wire name is a Python keyword ("from").
    _WIRE: ClassVar[tuple[tuple[str, str], ...]] = ()
    _unchecked: ClassVar[Callable[..., Any]]
    """Builds the frame from already-validated field values (see :func:`_unchecked_constructor`)."""

    def to_wire(self) -> dict[str, Any]:
        """The frame as a CBOR-ready map; optional fields that are ``None`` are left out."""
        out: dict[str, Any] = {"type": self.TYPE}
        for key, attr in self._WIRE:
            value = getattr(self, attr)
            if value is not None:
                out[key] = value
        return out

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> Self:
        """Build the frame from a decoded map; raises RemoteProtocolError(INVALID_FIELD).

        An optional field is either absent or well-typed: a CBOR null is refused, not
        taken as "absent". The frames that carry messages (SEND, DELIVER, ACK, RECEIPT)
        check the usual shape inline and build the frame with :meth:`_unchecked`; anything
        else takes this general path, which also words the error.
        """
        return cls._checked_from_wire(m)

    @classmethod
    def _checked_from_wire(cls, m: Mapping[str, Any]) -> Self:
        kwargs = {attr: m[key] for key, attr in cls._WIRE if key in m}
        try:
            if None in kwargs.values():
                raise ValueError("fields may not be null")
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise RemoteProtocolError(ErrorCode.INVALID_FIELD, f"{cls.TYPE}: {exc}") from None


@dataclass_transform(frozen_default=True, kw_only_default=True)
def _frame(type_name: str, *wire: str | tuple[str, str]) -> Callable[[type[F]], type[F]]:
    """Class decorator: a frozen, slotted, keyword-only dataclass registered under ``type_name``."""

    def wrap(cls: type[F]) -> type[F]:
        cls.TYPE = type_name
        cls._WIRE = tuple((w, w) if isinstance(w, str) else w for w in wire)
        cls = dataclass(frozen=True, slots=True, kw_only=True)(cls)
        cls._unchecked = staticmethod(_unchecked_constructor(cls, [attr for _, attr in cls._WIRE]))
        FRAME_TYPES[type_name] = cls
        return cls

    return wrap


def _unchecked_constructor(cls: type, attrs: list[str]) -> Callable[..., Any]:
    """``make(*values)``: a frame of ``cls`` with the fields in ``attrs`` order, skipping ``__init__``.

    No validation at all: only for values checked exactly as ``__post_init__`` would, or
    built from values that were (a decoder's fast path, the broker's receipts). It stores
    each slot directly, a quarter of the cost of the frozen ``__init__``. Generated source,
    as dataclasses generates ``__init__``, so there is no loop per field.
    """
    names = [f"v{i}" for i in range(len(attrs))]
    stores = "".join(f"    s{i}(obj, v{i})\n" for i in range(len(attrs)))
    source = f"def make({', '.join(names)}):\n    obj = new(cls)\n{stores}    return obj\n"
    namespace: dict[str, Any] = {"new": object.__new__, "cls": cls}
    namespace.update({f"s{i}": getattr(cls, attr).__set__ for i, attr in enumerate(attrs)})
    exec(source, namespace)
    return namespace["make"]  # type: ignore[no-any-return]


FRAME_TYPES: dict[str, type[Frame]] = {}
"""Every frame class by its wire ``type`` name."""


# ---------------------------------------------------------------- handshake


@_frame("hello", "version", "token", "agent")
class Hello(Frame):
    """Client -> broker, first frame: protocol version and a signed token."""

    version: int
    token: str
    agent: str | None = None

    def __post_init__(self) -> None:
        _uint("version", self.version, minimum=1)
        _text("token", self.token, min_len=1)
        if self.agent is not None:
            _text("agent", self.agent, max_len=256)


@_frame(
    "welcome",
    "version",
    "session",
    "mailbox",
    "pending",
    "max_frame_bytes",
    "max_inflight",
    "max_recipients",
    "default_ttl_s",
    "max_ttl_s",
    "keepalive_s",
)
class Welcome(Frame):
    """Broker -> client, answer to HELLO: the broker's limits and the mailbox's pending count.

    ``mailbox`` is absent for operator sessions, which have no mailbox.
    """

    version: int
    session: str
    mailbox: str | None = None
    pending: int
    max_frame_bytes: int
    max_inflight: int
    max_recipients: int
    default_ttl_s: int
    max_ttl_s: int
    keepalive_s: int

    def __post_init__(self) -> None:
        _uint("version", self.version, minimum=1)
        _text("session", self.session, min_len=1, max_len=64)
        if self.mailbox is not None:
            _mailbox("mailbox", self.mailbox)
        _uint("pending", self.pending)
        _uint("max_frame_bytes", self.max_frame_bytes, minimum=64)
        for name in ("max_inflight", "max_recipients", "default_ttl_s", "max_ttl_s", "keepalive_s"):
            _uint(name, getattr(self, name), minimum=1)


# ---------------------------------------------------------------- messages


@_frame("send", "id", "to", "body", "ttl_s")
class Send(Frame):
    """Client -> broker: one message (sender-chosen ``id``) to one or more recipients.

    ``to`` is kept exactly as sent (recipient syntax is judged per recipient by the
    broker, so one bad name refuses only that recipient); each element is at most
    ``MAX_RECIPIENT_CHARS`` characters. ``ttl_s`` absent means the broker's default.
    """

    id: str
    to: tuple[str, ...]
    body: bytes
    ttl_s: int | None = None

    def __post_init__(self) -> None:
        _check_send(self.id, self.to, self.body, self.ttl_s)
        if type(self.to) is not tuple:
            object.__setattr__(self, "to", tuple(self.to))

    @staticmethod
    def valid_fields(id: object, to: object, body: object, ttl_s: object = None) -> bool:
        """Whether ``Send(id=..., to=..., body=..., ttl_s=...)`` would accept these values (transition alias:
        use ``Connection.send_send``, which validates with the same rules)."""
        try:
            _check_send(id, to, body, ttl_s)
        except ValueError:
            return False
        return True

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> Self:
        mid, to, body, ttl_s = m.get("id"), m.get("to"), m.get("body"), m.get("ttl_s")
        if type(to) is list and (ttl_s is not None or "ttl_s" not in m) and cls.valid_fields(mid, to, body, ttl_s):
            return cls._unchecked(mid, tuple(to), body, ttl_s)  # type: ignore[no-any-return]
        return cls._checked_from_wire(m)


class Status(StrEnum):
    """What happened to a SEND for one recipient."""

    QUEUED = "queued"
    """Stored; the recipient is not connected to this broker now."""
    DELIVERED = "delivered"
    """Stored, and the recipient is connected: the broker is pushing it now (not yet ACKed)."""
    DUPLICATE = "duplicate"
    """This sender's message with this id is already held (or was ACKed): nothing new was stored."""
    REFUSED = "refused"
    """Not stored; ``code`` says why."""


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """The outcome of a SEND for one recipient: a status and, for REFUSED, an error code."""

    status: Status
    code: int | None = None
    """An :class:`ErrorCode` value; kept as a plain integer so codes newer than this client still decode."""

    def __post_init__(self) -> None:
        if (self.status is Status.REFUSED) != (self.code is not None):
            raise ValueError("a result has a code exactly when its status is refused")
        if self.code is not None:
            _uint("code", self.code, minimum=1000)

    def to_wire(self) -> dict[str, Any]:
        # Results repeat (a handful of statuses and codes): share one read-only map per value.
        wire = _RESULT_WIRE.get((self.status, self.code))
        if wire is None:
            wire = {"status": self.status.value}
            if self.code is not None:
                wire["code"] = int(self.code)
            if len(_RESULT_WIRE) < 256:
                _RESULT_WIRE[(self.status, self.code)] = wire
        return wire


_RESULT_WIRE: dict[tuple[Status, int | None], dict[str, Any]] = {}
_DECODED_RESULTS: dict[tuple[str, int | None], RecipientResult] = {}
"""Results already decoded and validated, by (status, code): receipts repeat a handful of them."""
_CODE_TYPES = (int, type(None))


@_frame("receipt", "id", "results", "code")
class Receipt(Frame):
    """Broker -> client: the answer to a SEND.

    Either one result per distinct recipient (``results``, keyed by the recipient as
    written), or, when the SEND was refused as a whole before any recipient was looked
    at, only ``code`` (TOO_MANY_RECIPIENTS or BODY_TOO_LARGE) and an empty ``results``.
    Exactly one of the two is on the wire.
    """

    id: str
    results: Mapping[str, RecipientResult] = field(default_factory=dict)
    code: int | None = None
    """The whole SEND was refused with this code; nothing was stored for anyone."""

    def __post_init__(self) -> None:
        _message_id("id", self.id)
        if not (type(self.results) is dict or isinstance(self.results, Mapping)):
            raise ValueError("results must be a map")
        if self.code is not None:
            _uint("code", self.code, minimum=1000)
            if self.results:
                raise ValueError("a receipt has either results or a code, not both")
        elif not self.results:
            raise ValueError("results must be a non-empty map (or the receipt must have a code)")
        for key, value in self.results.items():
            if type(key) is not str or not isinstance(value, RecipientResult):
                raise ValueError("results must map recipients to results")
            if len(key) > MAX_RECIPIENT_CHARS:
                raise ValueError(f"results keys must be at most {MAX_RECIPIENT_CHARS} characters")

    def to_wire(self) -> dict[str, Any]:
        if self.code is not None:
            return {"type": "receipt", "id": self.id, "code": self.code}
        return {
            "type": "receipt",
            "id": self.id,
            "results": {k: v.to_wire() for k, v in self.results.items()},
        }

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> Self:
        results = m.get("results")
        if "results" not in m:
            return cls._checked_from_wire(m)  # a whole-SEND refusal (or a receipt missing both)
        try:
            if "code" in m:
                raise ValueError("a receipt has either results or a code, not both")
            if type(results) is not dict:
                raise ValueError("results must be a map")
            parsed = {}
            for key, value in results.items():
                if type(value) is not dict:
                    raise ValueError("each result must be a map")
                if "code" in value and value["code"] is None:
                    raise ValueError("code may not be null")
                status, code = value.get("status"), value.get("code")
                result = (
                    _DECODED_RESULTS.get((status, code)) if type(status) is str and type(code) in _CODE_TYPES else None
                )
                if result is None:
                    result = RecipientResult(Status(str(status)), code)
                    if len(_DECODED_RESULTS) < 256:
                        _DECODED_RESULTS[(result.status.value, result.code)] = result
                if type(key) is not str:
                    raise ValueError("results must map recipients to results")
                if len(key) > MAX_RECIPIENT_CHARS:
                    raise ValueError(f"results keys must be at most {MAX_RECIPIENT_CHARS} characters")
                parsed[key] = result
            if not parsed:
                raise ValueError("results must be a non-empty map (or the receipt must have a code)")
            mid = m.get("id")
            _message_id("id", mid)
            return cls._unchecked(mid, parsed, None)  # type: ignore[no-any-return]
        except (TypeError, ValueError) as exc:
            raise RemoteProtocolError(ErrorCode.INVALID_FIELD, f"receipt: {exc}") from None


@_frame("deliver", "id", ("from", "sender"), "sent_at", "expires_at", "attempt", "body")
class Deliver(Frame):
    """Broker -> client: one message for the connection's mailbox.

    ``sender`` (wire key ``from``) is stamped by the broker from the sender's
    authenticated identity. Times are Unix epoch milliseconds.
    """

    id: str
    sender: str
    sent_at: int
    expires_at: int
    attempt: int
    body: bytes

    def __post_init__(self) -> None:
        _message_id("id", self.id)
        _mailbox("from", self.sender)
        _uint("sent_at", self.sent_at)
        _uint("expires_at", self.expires_at)
        _uint("attempt", self.attempt, minimum=1)
        _bytes("body", self.body)

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> Self:
        mid, sender, sent_at, expires_at = m.get("id"), m.get("from"), m.get("sent_at"), m.get("expires_at")
        attempt, body = m.get("attempt"), m.get("body")
        if (
            type(body) is bytes
            and type(sent_at) is int
            and type(expires_at) is int
            and type(attempt) is int
            and 0 <= sent_at <= UINT_MAX
            and 0 <= expires_at <= UINT_MAX
            and 1 <= attempt <= UINT_MAX
            and is_valid_message_id(mid)
            and is_valid_mailbox_id(sender)
        ):
            return cls._unchecked(mid, sender, sent_at, expires_at, attempt, body)  # type: ignore[no-any-return]
        return cls._checked_from_wire(m)


@_frame("ack", "ids")
class Ack(Frame):
    """Client -> broker: these messages of my mailbox are saved; delete them."""

    ids: tuple[str, ...]

    def __post_init__(self) -> None:
        ids = _tuple_of_text("ids", self.ids)
        for item in ids:
            _message_id("ids[]", item)
        object.__setattr__(self, "ids", ids)

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> Self:
        ids = m.get("ids")
        if type(ids) is list and ids:
            for item in ids:
                if not is_valid_message_id(item):
                    break
            else:
                return cls._unchecked(tuple(ids))  # type: ignore[no-any-return]
        return cls._checked_from_wire(m)


@_frame("pull")
class Pull(Frame):
    """Client -> broker: deliver every un-ACKed message again, oldest first, then DRAINED."""


@_frame("drained", "pending")
class Drained(Frame):
    """Broker -> client: every message pending at connect (or at PULL) has been delivered.

    ``pending`` is how many messages the mailbox still holds un-ACKed.
    """

    pending: int

    def __post_init__(self) -> None:
        _uint("pending", self.pending)


# ---------------------------------------------------------------- session


@_frame("ping")
class Ping(Frame):
    """Client -> broker keepalive; answered by PONG."""


@_frame("pong")
class Pong(Frame):
    """Broker -> client: answer to PING."""


@_frame("error", "code", "message", "close")
class Error(Frame):
    """Broker -> client: something went wrong. ``close`` true means the broker closes now."""

    code: int
    message: str
    close: bool

    def __post_init__(self) -> None:
        _uint("code", self.code, minimum=1000)
        _text("message", self.message)
        if type(self.close) is not bool:
            raise ValueError("close must be a boolean")


@_frame("bye")
class Bye(Frame):
    """Client -> broker: graceful close; un-ACKed deliveries go back to the queue."""


# ---------------------------------------------------------------- operator


@_frame("stats")
class Stats(Frame):
    """Client -> broker (operator token only): ask for the relay statistics."""


@_frame("stats_result", "stats")
class StatsResult(Frame):
    """Broker -> client: the relay statistics, a map of counter name to integer."""

    stats: Mapping[str, int]

    def __post_init__(self) -> None:
        if not isinstance(self.stats, Mapping):
            raise ValueError("stats must be a map")
        for key, value in self.stats.items():
            _text("stats key", key, min_len=1, max_len=64)
            _uint(f"stats[{key}]", value)

    def to_wire(self) -> dict[str, Any]:
        return {"type": "stats_result", "stats": dict(self.stats)}


@_frame("cleanup")
class Cleanup(Frame):
    """Client -> broker (operator token only): run the expiry sweep now."""


@_frame("cleanup_result", "purged")
class CleanupResult(Frame):
    """Broker -> client: how many expired messages the sweep removed."""

    purged: int

    def __post_init__(self) -> None:
        _uint("purged", self.purged)
