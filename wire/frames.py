"""Frame classes: one small frozen value class per frame type in protocol.md.

Theory of operation: a frame validates itself when it is built, so an illegal frame
cannot exist. ``to_wire()`` gives the CBOR map (text keys, ``type`` first) and
``FRAME_TYPES[name].from_wire(map)`` builds a frame from a decoded map, turning any
validation failure into :class:`~wire.errors.RemoteProtocolError` with
``INVALID_FIELD``. Unknown keys are ignored (forward compatibility); missing, null or
ill-typed keys are refused.

Each frame's rules are written once. Most frames keep them in ``__post_init__`` and
decode through the constructor (STATUS and STATUS_ACK too). The four frames that carry
messages (SEND, RECEIPT, DELIVER, ACK) keep them in one ``_check_<frame>`` function that both ``__post_init__``
and ``from_wire`` call; ``from_wire`` then builds the frame with a hand-written trusted
constructor (``_trusted_<frame>``, like h11's ``_parsed=True``) that stores the checked
values in the slots without going through the frozen ``__init__`` and checking again.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Self, TypeVar, dataclass_transform

from .errors import ErrorCode, RemoteProtocolError
from .limits import (
    MAX_AGENT_CHARS,
    MAX_ID_CHARS,
    MAX_RECIPIENT_CHARS,
    MAX_STATS_KEY_CHARS,
    MAX_TEXT,
    MIN_MAX_FRAME_BYTES,
    UINT_MAX,
)

F = TypeVar("F", bound="Frame")

__all__ = [
    "FRAME_TYPES",
    "Ack",
    "Cleanup",
    "CleanupResult",
    "Deliver",
    "Drained",
    "Error",
    "Frame",
    "Hello",
    "KeyGet",
    "KeyGetResult",
    "KeyPut",
    "KeyPutResult",
    "KeyRecord",
    "Ping",
    "Pong",
    "Pull",
    "Receipt",
    "RecipientResult",
    "Refresh",
    "Refreshed",
    "ReportState",
    "Send",
    "Stats",
    "StatsResult",
    "Status",
    "StatusAck",
    "StatusReport",
    "Welcome",
    "Bye",
    "is_valid_mailbox_id",
    "is_valid_message_id",
]

_MAILBOX_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._@+\-]{{0,{MAX_ID_CHARS - 1}}}")


def is_valid_mailbox_id(value: object) -> bool:
    """A mailbox id: 1-64 ASCII characters from ``A-Z a-z 0-9 . _ @ + -``, not starting with punctuation."""
    return type(value) is str and _MAILBOX_RE.fullmatch(value) is not None


def is_valid_message_id(value: object) -> bool:
    """A message id: 1-64 printable ASCII characters (0x21-0x7E), no spaces."""
    # Same set as the regex [\x21-\x7e]{1,64}, at a third of the cost (it runs per SEND and per ACKed id).
    return (
        type(value) is str
        and 0 < len(value) <= MAX_ID_CHARS
        and value.isascii()
        and value.isprintable()
        and " " not in value
    )


# ---------------------------------------------------------------- field rules (each raises ValueError)
#
# The validators of the four frames that carry messages (``_check_send`` and the others below)
# run once per message and per frame decoded, so they state their fields' rules inline, each
# raising the error one of these builders words; the other frames call the helpers.


def _uint_error(name: str, minimum: int = 0) -> ValueError:
    return ValueError(f"{name} must be an integer from {minimum} to {UINT_MAX}")


def _bytes_error(name: str) -> ValueError:
    return ValueError(f"{name} must be a byte string")


def _message_id_error(name: str) -> ValueError:
    return ValueError(f"{name} must be 1-64 printable ASCII characters without spaces")


def _array_error(name: str) -> ValueError:
    return ValueError(f"{name} must be a non-empty array")


def _uint(name: str, value: object, *, minimum: int = 0) -> None:
    if type(value) is not int or not minimum <= value <= UINT_MAX:
        raise _uint_error(name, minimum)


def _text(name: str, value: object, *, min_len: int = 0, max_len: int = MAX_TEXT) -> None:
    if type(value) is not str or not min_len <= len(value) <= max_len:
        raise ValueError(f"{name} must be a text string of {min_len} to {max_len} characters")


def _mailbox_error(name: str) -> ValueError:
    return ValueError(f"{name} must be a mailbox id (1-64 of A-Z a-z 0-9 . _ @ + -)")


def _mailbox(name: str, value: object) -> None:
    if not is_valid_mailbox_id(value):
        raise _mailbox_error(name)


def _null_error(key: str) -> ValueError:
    """An optional field is absent or well-typed: a CBOR null for it is refused (``key in m`` with ``m[key]`` None)."""
    return ValueError(f"{key} may not be null")


def _invalid(type_name: str, exc: Exception) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.INVALID_FIELD, f"{type_name}: {exc}")


# ---------------------------------------------------------------- the frame base and its decorator


class Frame:
    """Base class of all frames. ``TYPE`` is the value of the ``type`` key on the wire."""

    __slots__ = ()
    TYPE: ClassVar[str]
    # (wire key, attribute name) for every field; wire keys differ only where the
    # wire name is a Python keyword ("from").
    _WIRE: ClassVar[tuple[tuple[str, str], ...]] = ()

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
        taken as "absent". This general path goes through the constructor; the frames
        that carry messages override it with their checker and trusted constructor.
        """
        kwargs = {attr: m[key] for key, attr in cls._WIRE if key in m}
        try:
            if None in kwargs.values():
                raise ValueError("fields may not be null")
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:  # TypeError: a required field is missing
            raise _invalid(cls.TYPE, exc) from None


@dataclass_transform(frozen_default=True, kw_only_default=True)
def _frame(type_name: str, *wire: str | tuple[str, str]) -> Callable[[type[F]], type[F]]:
    """Class decorator: a frozen, slotted, keyword-only dataclass registered under ``type_name``."""

    def wrap(cls: type[F]) -> type[F]:
        cls.TYPE = type_name
        cls._WIRE = tuple((w, w) if isinstance(w, str) else w for w in wire)
        cls = dataclass(frozen=True, slots=True, kw_only=True)(cls)
        FRAME_TYPES[type_name] = cls
        return cls

    return wrap


def _slot_setters(cls: type, *attrs: str) -> tuple[Callable[[object, object], None], ...]:
    """The slot descriptors' setters of ``cls`` for ``attrs``: what a trusted constructor stores with."""
    return tuple(cls.__dict__[attr].__set__ for attr in attrs)


_new = object.__new__

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
            _text("agent", self.agent, max_len=MAX_AGENT_CHARS)


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
    "expires_in_s",
)
class Welcome(Frame):
    """Broker -> client, answer to HELLO: the broker's limits and the mailbox's pending count.

    ``mailbox`` is absent for operator sessions, which have no mailbox. ``expires_in_s`` is how many whole
    seconds (rounded down) the session's token has left: the broker ends the session with TOKEN_EXPIRED then,
    unless a REFRESH has brought a newer token.
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
    expires_in_s: int

    def __post_init__(self) -> None:
        _uint("version", self.version, minimum=1)
        _text("session", self.session, min_len=1, max_len=MAX_ID_CHARS)
        if self.mailbox is not None:
            _mailbox("mailbox", self.mailbox)
        _uint("pending", self.pending)
        _uint("max_frame_bytes", self.max_frame_bytes, minimum=MIN_MAX_FRAME_BYTES)
        for name in ("max_inflight", "max_recipients", "default_ttl_s", "max_ttl_s", "keepalive_s"):
            _uint(name, getattr(self, name), minimum=1)
        _uint("expires_in_s", self.expires_in_s)


@_frame("refresh", "token")
class Refresh(Frame):
    """Client -> broker, in OPEN: a newer token for the session's own mailbox (or operator), before the old expires.

    Answered by REFRESHED, or the session ends (ERROR 2001, 2002 or 2004, ``close: true``).
    """

    token: str

    def __post_init__(self) -> None:
        _text("token", self.token, min_len=1)


@_frame("refreshed", "expires_in_s")
class Refreshed(Frame):
    """Broker -> client: the REFRESH's token now governs the session; it has ``expires_in_s`` whole seconds left."""

    expires_in_s: int

    def __post_init__(self) -> None:
        _uint("expires_in_s", self.expires_in_s)


# ---------------------------------------------------------------- messages


def _check_send(id: object, to: object, body: object, ttl_s: object, notify: object = False) -> None:
    """SEND's rules; raises ValueError. ``to`` may be a list or a tuple."""
    if not is_valid_message_id(id):
        raise _message_id_error("id")
    if not (type(to) is tuple or type(to) is list) or not to:
        raise _array_error("to")
    for rcpt in to:
        if type(rcpt) is not str or len(rcpt) > MAX_RECIPIENT_CHARS:
            raise ValueError(f"to must hold text strings of at most {MAX_RECIPIENT_CHARS} characters")
    if type(body) is not bytes:
        raise _bytes_error("body")
    if ttl_s is not None and (type(ttl_s) is not int or not 1 <= ttl_s <= UINT_MAX):
        raise _uint_error("ttl_s", 1)
    if notify is not False and notify is not True:
        raise ValueError("notify must be a boolean")


@_frame("send", "id", "to", "body", "ttl_s", "notify")
class Send(Frame):
    """Client -> broker: one message (sender-chosen ``id``) to one or more recipients.

    ``to`` is kept exactly as sent (recipient syntax is judged per recipient by the
    broker, so one bad name refuses only that recipient); each element is at most
    ``MAX_RECIPIENT_CHARS`` characters. ``ttl_s`` absent means the broker's default.
    ``notify`` true asks the broker for one STATUS per recipient the message is stored
    for (protocol.md section 9, rule 19); it is on the wire only when true, so a SEND
    without it has the bytes it had before the field existed.
    """

    id: str
    to: tuple[str, ...]
    body: bytes
    ttl_s: int | None = None
    notify: bool = False

    def __post_init__(self) -> None:
        _check_send(self.id, self.to, self.body, self.ttl_s, self.notify)
        if type(self.to) is not tuple:
            object.__setattr__(self, "to", tuple(self.to))

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "send", "id": self.id, "to": self.to, "body": self.body}
        if self.ttl_s is not None:
            out["ttl_s"] = self.ttl_s
        if self.notify:
            out["notify"] = True
        return out

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> Self:
        get = m.get
        mid: Any = get("id")
        to: Any = get("to")
        body: Any = get("body")
        ttl_s: Any = get("ttl_s")
        notify: Any = get("notify", False)
        try:
            if ttl_s is None and "ttl_s" in m:
                raise _null_error("ttl_s")
            if notify is None:
                raise _null_error("notify")
            _check_send(mid, to, body, ttl_s, notify)
        except ValueError as exc:
            raise _invalid(cls.TYPE, exc) from None
        return _trusted_send(mid, tuple(to), body, ttl_s, notify)  # type: ignore[return-value]


_SEND_SET = _slot_setters(Send, "id", "to", "body", "ttl_s", "notify")


def _trusted_send(id: str, to: tuple[str, ...], body: bytes, ttl_s: int | None, notify: bool) -> Send:
    """A SEND from values :func:`_check_send` accepted (``to`` a tuple), without checking again."""
    obj = _new(Send)
    set_id, set_to, set_body, set_ttl_s, set_notify = _SEND_SET
    set_id(obj, id)
    set_to(obj, to)
    set_body(obj, body)
    set_ttl_s(obj, ttl_s)
    set_notify(obj, notify)
    return obj


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
    """The outcome of a SEND for one recipient: a status and, for REFUSED, an error code.

    Raises ValueError when built with a status that is not a :class:`Status`, or with a
    code that is not there exactly when the status is REFUSED.
    """

    status: Status
    code: int | None = None
    """An :class:`ErrorCode` value; kept as a plain integer so codes newer than this client still decode."""

    def __post_init__(self) -> None:
        if not isinstance(self.status, Status):
            raise ValueError(f"status must be one of {', '.join(Status)}")
        if (self.status is Status.REFUSED) != (self.code is not None):
            raise ValueError("a result has a code exactly when its status is refused")
        if self.code is not None:
            _uint("code", self.code, minimum=1000)

    def to_wire(self) -> dict[str, Any]:
        """The result as a CBOR-ready map (a new one each time)."""
        if self.code is None:
            return {"status": self.status.value}
        return {"status": self.status.value, "code": self.code}

    @staticmethod
    def _from_wire(value: object) -> RecipientResult:
        """The result a decoded ``results`` value stands for; raises ValueError."""
        if type(value) is not dict:
            raise ValueError("each result must be a map")
        status: Any = value.get("status")
        code = value.get("code")
        if code is None:
            if "code" in value:
                raise _null_error("code")
            if type(status) is str:
                plain = _PLAIN_RESULTS.get(status)
                if plain is not None:
                    return plain
        return RecipientResult(Status(status), code)  # Status() raises ValueError for an unknown status


_PLAIN_RESULTS = {s.value: RecipientResult(s) for s in (Status.QUEUED, Status.DELIVERED, Status.DUPLICATE)}
"""The three results without a code, built once (they are immutable): most results of most receipts."""


def _check_receipt(id: object, results: object, code: object, retry_after_ms: object = None) -> None:
    """RECEIPT's rules; raises ValueError."""
    if not is_valid_message_id(id):
        raise _message_id_error("id")
    if not (type(results) is dict or isinstance(results, Mapping)):
        raise ValueError("results must be a map")
    if code is not None:
        if type(code) is not int or not 1000 <= code <= UINT_MAX:
            raise _uint_error("code", 1000)
        if results:
            raise ValueError("a receipt has either results or a code, not both")
    elif not results:
        raise ValueError("results must be a non-empty map (or the receipt must have a code)")
    if retry_after_ms is not None:
        if code is None:
            raise ValueError("retry_after_ms goes only with a code (a SEND refused as a whole)")
        _uint("retry_after_ms", retry_after_ms)
    for key, value in results.items():
        if type(key) is not str or not isinstance(value, RecipientResult):
            raise ValueError("results must map recipients to results")
        if len(key) > MAX_RECIPIENT_CHARS:
            raise ValueError(f"results keys must be at most {MAX_RECIPIENT_CHARS} characters")


@_frame("receipt", "id", "results", "code", "retry_after_ms")
class Receipt(Frame):
    """Broker -> client: the answer to a SEND.

    Either one result per distinct recipient (``results``, keyed by the recipient as
    written), or, when the SEND was refused as a whole before any recipient was looked
    at, only ``code`` (TOO_MANY_RECIPIENTS, BODY_TOO_LARGE, RATE_LIMITED or STORE_UNREACHABLE) and an empty
    ``results``. Exactly one of the two is on the wire.
    """

    id: str
    results: Mapping[str, RecipientResult] = field(default_factory=dict)
    code: int | None = None
    """The whole SEND was refused with this code: nothing was stored for anyone, except after
    STORE_UNREACHABLE, which leaves that unknown (resend with the same id)."""
    retry_after_ms: int | None = None
    """Only with ``code``: how long to wait before sending again (the broker sends it with RATE_LIMITED)."""

    def __post_init__(self) -> None:
        _check_receipt(self.id, self.results, self.code, self.retry_after_ms)

    def to_wire(self) -> dict[str, Any]:
        if self.code is not None:
            if self.retry_after_ms is not None:
                return {"type": "receipt", "id": self.id, "code": self.code, "retry_after_ms": self.retry_after_ms}
            return {"type": "receipt", "id": self.id, "code": self.code}
        return {
            "type": "receipt",
            "id": self.id,
            "results": {k: v.to_wire() for k, v in self.results.items()},
        }

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> Self:
        mid: Any = m.get("id")
        code: Any = m.get("code")
        retry: Any = m.get("retry_after_ms")
        try:
            if code is None and "code" in m:
                raise _null_error("code")
            if retry is None and "retry_after_ms" in m:
                raise _null_error("retry_after_ms")
            if "results" in m:
                if "code" in m:
                    raise ValueError("a receipt has either results or a code, not both")
                raw = m["results"]
                if type(raw) is not dict:
                    raise ValueError("results must be a map")
                results = {key: RecipientResult._from_wire(value) for key, value in raw.items()}
            else:
                results = {}
            _check_receipt(mid, results, code, retry)
        except ValueError as exc:
            raise _invalid(cls.TYPE, exc) from None
        return _trusted_receipt(mid, results, code, retry)  # type: ignore[return-value]


_RECEIPT_SET = _slot_setters(Receipt, "id", "results", "code", "retry_after_ms")


def _trusted_receipt(
    id: str, results: Mapping[str, RecipientResult], code: int | None, retry_after_ms: int | None = None
) -> Receipt:
    """A RECEIPT from values :func:`_check_receipt` accepts, without checking them."""
    obj = _new(Receipt)
    set_id, set_results, set_code, set_retry = _RECEIPT_SET
    set_id(obj, id)
    set_results(obj, results)
    set_code(obj, code)
    set_retry(obj, retry_after_ms)
    return obj


def _check_deliver(
    id: object, sender: object, sent_at: object, expires_at: object, attempt: object, body: object
) -> None:
    """DELIVER's rules; raises ValueError."""
    if not is_valid_message_id(id):
        raise _message_id_error("id")
    if not is_valid_mailbox_id(sender):
        raise _mailbox_error("from")
    if type(sent_at) is not int or not 0 <= sent_at <= UINT_MAX:
        raise _uint_error("sent_at")
    if type(expires_at) is not int or not 0 <= expires_at <= UINT_MAX:
        raise _uint_error("expires_at")
    if type(attempt) is not int or not 1 <= attempt <= UINT_MAX:
        raise _uint_error("attempt", 1)
    if type(body) is not bytes:
        raise _bytes_error("body")


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
        _check_deliver(self.id, self.sender, self.sent_at, self.expires_at, self.attempt, self.body)

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> Self:
        get = m.get
        values: tuple[Any, ...] = (
            get("id"),
            get("from"),
            get("sent_at"),
            get("expires_at"),
            get("attempt"),
            get("body"),
        )
        try:
            _check_deliver(*values)
        except ValueError as exc:
            raise _invalid(cls.TYPE, exc) from None
        return _trusted_deliver(*values)  # type: ignore[return-value]


_DELIVER_SET = _slot_setters(Deliver, "id", "sender", "sent_at", "expires_at", "attempt", "body")


def _trusted_deliver(id: str, sender: str, sent_at: int, expires_at: int, attempt: int, body: bytes) -> Deliver:
    """A DELIVER from values :func:`_check_deliver` accepted, without checking again."""
    obj = _new(Deliver)
    set_id, set_sender, set_sent_at, set_expires_at, set_attempt, set_body = _DELIVER_SET
    set_id(obj, id)
    set_sender(obj, sender)
    set_sent_at(obj, sent_at)
    set_expires_at(obj, expires_at)
    set_attempt(obj, attempt)
    set_body(obj, body)
    return obj


def _check_ack(ids: object) -> None:
    """ACK's rules; raises ValueError. ``ids`` may be a list or a tuple."""
    if not (type(ids) is tuple or type(ids) is list) or not ids:
        raise _array_error("ids")
    # A loop, not all(map(...)): a call from the interpreter's loop is cheaper than one from C in 3.11.
    for item in ids:
        if not is_valid_message_id(item):
            raise _message_id_error("ids[]")


@_frame("ack", "ids")
class Ack(Frame):
    """Client -> broker: these messages of my mailbox are saved; delete them."""

    ids: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_ack(self.ids)
        if type(self.ids) is not tuple:
            object.__setattr__(self, "ids", tuple(self.ids))

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> Self:
        ids: Any = m.get("ids")
        try:
            _check_ack(ids)
        except ValueError as exc:
            raise _invalid(cls.TYPE, exc) from None
        return _trusted_ack(tuple(ids))  # type: ignore[return-value]


_ACK_SET = _slot_setters(Ack, "ids")


def _trusted_ack(ids: tuple[str, ...]) -> Ack:
    """An ACK from ids :func:`_check_ack` accepted (a tuple), without checking again."""
    obj = _new(Ack)
    (set_ids,) = _ACK_SET
    set_ids(obj, ids)
    return obj


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


# ---------------------------------------------------------------- delivery status


class ReportState(StrEnum):
    """What a STATUS reports about a message the sender SENT with ``notify`` (protocol.md section 9, rule 19).

    Not to be confused with the RECEIPT result :attr:`Status.DELIVERED` ("stored, and the
    recipient is online, being pushed"): :attr:`ReportState.DELIVERED` means the recipient's
    device ACKed (saved) it.
    """

    DELIVERED = "delivered"
    """The recipient's ACK deleted the message: its device saved it."""
    EXPIRED = "expired"
    """The message expired before the recipient ACKed it."""
    OVERFLOW = "overflow"
    """The sender's mailbox held its bound of statuses: ``count`` statuses were folded into this one."""


_REPORT_STATES: Mapping[str, ReportState] = {s.value: s for s in ReportState}


@_frame("status", "seq", "state", "at", "id", "recipient", "count", "first_seq")
class StatusReport(Frame):
    """Broker -> client: what became of one message the session's mailbox sent with ``notify``, for one recipient.

    ``seq`` numbers it in the mailbox's status lane (increasing in the order the broker
    queued the statuses, not contiguous) and is what STATUS_ACK names. ``at`` is epoch ms.
    DELIVERED and EXPIRED name the message (``id``) and the ``recipient``; OVERFLOW has
    neither, but ``count`` (how many statuses were folded into it) and ``first_seq`` (the
    ``seq`` it had when it was created, which it keeps as it grows). Raises ValueError for
    any other combination.
    """

    seq: int
    state: ReportState
    at: int
    id: str | None = None
    recipient: str | None = None
    count: int | None = None
    first_seq: int | None = None

    def __post_init__(self) -> None:
        _uint("seq", self.seq, minimum=1)
        if not isinstance(self.state, ReportState):
            raise ValueError(f"state must be one of {', '.join(ReportState)}")
        _uint("at", self.at)
        if self.state is ReportState.OVERFLOW:
            if self.id is not None or self.recipient is not None:
                raise ValueError("an overflow status has no id and no recipient")
            if self.count is None or self.first_seq is None:
                raise ValueError("an overflow status has a count and a first_seq")
            _uint("count", self.count, minimum=1)
            _uint("first_seq", self.first_seq, minimum=1)
            if self.first_seq > self.seq:
                raise ValueError("first_seq must not be above seq")
        else:
            if self.count is not None or self.first_seq is not None:
                raise ValueError(f"a {self.state.value} status has no count and no first_seq")
            if not is_valid_message_id(self.id):
                raise _message_id_error("id")
            _mailbox("recipient", self.recipient)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "status", "seq": self.seq, "state": self.state.value, "at": self.at}
        if self.state is ReportState.OVERFLOW:
            out["count"] = self.count
            out["first_seq"] = self.first_seq
        else:
            out["id"] = self.id
            out["recipient"] = self.recipient
        return out

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> Self:
        kwargs = {attr: m[key] for key, attr in cls._WIRE if key in m}
        try:
            if None in kwargs.values():
                raise ValueError("fields may not be null")
            state = kwargs.get("state")
            if type(state) is str:
                known = _REPORT_STATES.get(state)
                if known is None:
                    raise ValueError(f"state must be one of {', '.join(ReportState)}")
                kwargs["state"] = known
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:  # TypeError: a required field is missing
            raise _invalid(cls.TYPE, exc) from None


@_frame("status_ack", "seqs")
class StatusAck(Frame):
    """Client -> broker: these statuses (by ``seq``) are saved; delete them. Unknown seqs are ignored."""

    seqs: tuple[int, ...]

    def __post_init__(self) -> None:
        seqs: object = self.seqs  # a list is taken too (and kept as a tuple)
        if not (type(seqs) is tuple or type(seqs) is list) or not seqs:
            raise _array_error("seqs")
        for seq in seqs:
            if type(seq) is not int or not 1 <= seq <= UINT_MAX:
                raise _uint_error("seqs[]", 1)
        if type(seqs) is not tuple:
            object.__setattr__(self, "seqs", tuple(seqs))


# ---------------------------------------------------------------- key directory

KEY_BYTES = 32
"""Length of a key record's ``ik`` (Ed25519 public key) and ``ek`` (X25519 public key), raw."""
SIG_BYTES = 64
"""Length of a key record's ``sig`` (an Ed25519 signature)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyRecord:
    """A mailbox's entry in the broker's public-key directory (protocol.md section 6, ``key_put``; docs/e2e.md).

    ``ik`` is the Ed25519 identity public key, ``kid`` the id of the X25519 encryption key
    ``ek`` (message-id syntax), ``sig`` the Ed25519 signature by ``ik`` over
    ``CBOR(["relay-e2e-key/1", mailbox, kid, ek])``. Only the shape is checked here
    (raises ValueError); whether ``sig`` verifies for a mailbox is
    ``wire.e2e.verify_key_record``'s question.
    """

    ik: bytes
    kid: str
    ek: bytes
    sig: bytes

    def __post_init__(self) -> None:
        if type(self.ik) is not bytes or len(self.ik) != KEY_BYTES:
            raise ValueError(f"ik must be a byte string of {KEY_BYTES} bytes")
        if not is_valid_message_id(self.kid):
            raise _message_id_error("kid")
        if type(self.ek) is not bytes or len(self.ek) != KEY_BYTES:
            raise ValueError(f"ek must be a byte string of {KEY_BYTES} bytes")
        if type(self.sig) is not bytes or len(self.sig) != SIG_BYTES:
            raise ValueError(f"sig must be a byte string of {SIG_BYTES} bytes")

    def to_map(self) -> dict[str, Any]:
        """The record as a CBOR-ready map, keys in the order ik, kid, ek, sig."""
        return {"ik": self.ik, "kid": self.kid, "ek": self.ek, "sig": self.sig}

    @classmethod
    def from_map(cls, m: object) -> KeyRecord:
        """The record from a decoded map; raises ValueError if it is not a map of the record's shape.

        Unknown keys are ignored, as in frames; a missing or null field is refused.
        """
        if not isinstance(m, Mapping):
            raise ValueError("a key record must be a map")
        try:
            return cls(ik=m["ik"], kid=m["kid"], ek=m["ek"], sig=m["sig"])
        except KeyError as exc:
            raise ValueError(f"a key record needs {exc.args[0]}") from None


@_frame("key_put", "key")
class KeyPut(Frame):
    """Client -> broker (mailbox sessions): publish ``key`` as the session's mailbox's directory record.

    Answered by KEY_PUT_RESULT, in the order sent (protocol.md section 9, rule 20).
    """

    key: KeyRecord

    def __post_init__(self) -> None:
        if type(self.key) is not KeyRecord:
            raise ValueError("key must be a key record")

    def to_wire(self) -> dict[str, Any]:
        return {"type": "key_put", "key": self.key.to_map()}

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> Self:
        try:
            if "key" not in m:
                raise ValueError("key is required")
            return cls(key=KeyRecord.from_map(m["key"]))
        except ValueError as exc:
            raise _invalid(cls.TYPE, exc) from None


@_frame("key_put_result", "kid", "code")
class KeyPutResult(Frame):
    """Broker -> client: answer to KEY_PUT, naming the record's ``kid``; ``code`` (3009 INVALID_KEY) only if refused."""

    kid: str
    code: int | None = None

    def __post_init__(self) -> None:
        if not is_valid_message_id(self.kid):
            raise _message_id_error("kid")
        if self.code is not None:
            _uint("code", self.code, minimum=1000)


@_frame("key_get", "mailboxes")
class KeyGet(Frame):
    """Client -> broker (mailbox sessions): look up these mailboxes' key records.

    Each element is text of at most ``MAX_RECIPIENT_CHARS`` characters (syntax is the
    broker's call: an invalid id simply has no record); repeats are allowed. The broker
    refuses more than its ``max_recipients`` elements (INVALID_FIELD, fatal).
    """

    mailboxes: tuple[str, ...]

    def __post_init__(self) -> None:
        mailboxes: object = self.mailboxes  # a list is taken too (and kept as a tuple)
        if not (type(mailboxes) is tuple or type(mailboxes) is list) or not mailboxes:
            raise _array_error("mailboxes")
        for mailbox in mailboxes:
            if type(mailbox) is not str or len(mailbox) > MAX_RECIPIENT_CHARS:
                raise ValueError(f"mailboxes must hold text strings of at most {MAX_RECIPIENT_CHARS} characters")
        if type(mailboxes) is not tuple:
            object.__setattr__(self, "mailboxes", tuple(mailboxes))


@_frame("key_get_result", "keys")
class KeyGetResult(Frame):
    """Broker -> client: answer to KEY_GET: mailbox id -> key record, only for the mailboxes that have one."""

    keys: Mapping[str, KeyRecord]

    def __post_init__(self) -> None:
        if not isinstance(self.keys, Mapping):
            raise ValueError("keys must be a map")
        for mailbox, record in self.keys.items():
            _mailbox("keys key", mailbox)
            if type(record) is not KeyRecord:
                raise ValueError("keys values must be key records")

    def to_wire(self) -> dict[str, Any]:
        return {"type": "key_get_result", "keys": {mailbox: r.to_map() for mailbox, r in self.keys.items()}}

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> Self:
        try:
            if "keys" not in m:
                raise ValueError("keys is required")
            keys = m["keys"]
            if not isinstance(keys, Mapping):
                raise ValueError("keys must be a map")
            return cls(keys={mailbox: KeyRecord.from_map(r) for mailbox, r in keys.items()})
        except ValueError as exc:
            raise _invalid(cls.TYPE, exc) from None


# ---------------------------------------------------------------- session


@_frame("ping")
class Ping(Frame):
    """Client -> broker keepalive; answered by PONG."""


@_frame("pong")
class Pong(Frame):
    """Broker -> client: answer to PING."""


@_frame("error", "code", "message", "close", "retry_after_ms")
class Error(Frame):
    """Broker -> client: something went wrong. ``close`` true means the broker closes now."""

    code: int
    message: str
    close: bool
    retry_after_ms: int | None = None
    """How long to wait before trying again (the broker sends it with CONNECTION_RATE_LIMITED)."""

    def __post_init__(self) -> None:
        _uint("code", self.code, minimum=1000)
        _text("message", self.message)
        if type(self.close) is not bool:
            raise ValueError("close must be a boolean")
        if self.retry_after_ms is not None:
            _uint("retry_after_ms", self.retry_after_ms)


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
            _text("stats key", key, min_len=1, max_len=MAX_STATS_KEY_CHARS)
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
