"""The connection state machine, for either end of a Relay connection.

Theory of operation: :class:`Connection` owns no socket. ``receive_data(bytes)`` returns
the frames the peer sent, and ``send(frame)`` returns the bytes to write. Each frame is
checked against :data:`TRANSITIONS`, a table keyed by (who sends, state, frame type);
any frame not in the table is a protocol error and moves the connection to CLOSED.
ERROR frames are handled apart: ``close: true`` always moves to CLOSED, ``close: false``
is only allowed in OPEN and keeps it.

States (identical on both ends, since each end sees the same frames):

    HANDSHAKE --HELLO--> AUTHENTICATING --WELCOME--> OPEN --BYE--> CLOSED
                 (any state) --ERROR close=true--> CLOSED

In CLOSED the connection is over: every send returns ``b""`` (nothing more goes on the
wire) and ``receive_data`` ignores what still arrives (protocol.md section 5). Sending a
frame the table does not allow in any other state raises LocalProtocolError.

The frames sent once per message (SEND, RECEIPT, DELIVER, and STATUS for SENDs with
``notify``) have their own methods, ``send_send``, ``send_receipts``, ``send_delivers`` and
``send_statuses``: the same table check, then an encoder that takes the field values
without building a frame object (h11's ``send_with_data_passthrough`` is the model: the
fast path stays inside the state machine). The broker's three take a batch (whatever has
the frame's fields: its stored messages, its routing outcomes, its held statuses) and
consult the table once for it, since those frames never change the state.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from enum import Enum

from .codec import (
    DeliverFields,
    FrameDecoder,
    ReceiptFields,
    StatusFields,
    _encode_delivers,
    _encode_receipts,
    _encode_send,
    _encode_statuses,
    encode_frame,
)
from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from .frames import (
    Ack,
    Bye,
    Cleanup,
    CleanupResult,
    Deliver,
    Drained,
    Error,
    Frame,
    Hello,
    KeyGet,
    KeyGetResult,
    KeyPut,
    KeyPutResult,
    Ping,
    Pong,
    Pull,
    Receipt,
    Refresh,
    Refreshed,
    Send,
    Stats,
    StatsResult,
    StatusAck,
    StatusReport,
    Welcome,
    _check_send,
)
from .limits import DEFAULT_MAX_FRAME_BYTES, MAX_ERROR_MESSAGE_CHARS, MAX_HELLO_FRAME_BYTES

__all__ = ["TRANSITIONS", "Connection", "Role", "State"]


class Role(Enum):
    """Which end of the connection a frame comes from, or a Connection object plays."""

    CLIENT = "client"
    BROKER = "broker"

    # Members hash by identity (what equality is for them anyway): Enum's own __hash__ is Python code that
    # hashes the name. Role and State key the state table, looked up once per frame sent or received.
    # Measured (timeit, thread time, this repo's 2-core box under load): a dict lookup keyed by a member
    # 153 ns with Enum's hash, 49 ns with this; Connection.send_deliver (then per frame) 2.65 us without, 2.50 us with.
    __hash__ = object.__hash__


class State(Enum):
    """Where a connection is in its life; both ends pass through the same states (see the module docstring).

    The state decides which frames each side may send (:data:`TRANSITIONS`).
    """

    HANDSHAKE = "handshake"
    """Connected; the client has not sent HELLO yet."""
    AUTHENTICATING = "authenticating"
    """HELLO sent; the broker has not answered with WELCOME yet."""
    OPEN = "open"
    """WELCOME sent: messages flow."""
    CLOSED = "closed"
    """Over: sends give ``b""`` and received bytes are ignored."""

    __hash__ = object.__hash__  # see Role


_C, _B = Role.CLIENT, Role.BROKER
_S = State

TRANSITIONS: dict[tuple[Role, State, type[Frame]], State] = {
    (_C, _S.HANDSHAKE, Hello): _S.AUTHENTICATING,
    (_B, _S.AUTHENTICATING, Welcome): _S.OPEN,
    **{(_C, _S.OPEN, t): _S.OPEN for t in (Send, Ack, StatusAck, Pull, Ping, Stats, Cleanup, KeyPut, KeyGet, Refresh)},
    **{
        (_B, _S.OPEN, t): _S.OPEN
        for t in (
            Receipt,
            Deliver,
            StatusReport,
            Drained,
            Pong,
            StatsResult,
            CleanupResult,
            KeyPutResult,
            KeyGetResult,
            Refreshed,
        )
    },
    (_C, _S.OPEN, Bye): _S.CLOSED,
}
"""(sender role, state, frame class) -> next state. Anything else is a protocol error."""

assert all(kind is not Error for _, _, kind in TRANSITIONS), "ERROR has its own rules (Connection._next_state)"
_ROWS: dict[Role, dict[State, dict[type[Frame], State]]] = {r: {st: {} for st in State} for r in Role}
for (_sender, _state, _kind), _next in TRANSITIONS.items():
    _ROWS[_sender][_state][_kind] = _next


class Connection:
    """One end of a Relay connection: frames in and out, with state checked.

    ``role`` is the end this object plays. ``max_frame_bytes`` bounds what it accepts;
    a client updates it from WELCOME if it wants the broker's figure. A broker accepts at
    most ``MAX_HELLO_FRAME_BYTES`` until it has sent WELCOME (the frame limit is checked
    before anything else, so a larger frame then is FRAME_TOO_LARGE whatever it holds).
    """

    __slots__ = (
        "_decoder",
        "_error_sent",
        "_max_frame_bytes",
        "_receivable",
        "_sendable",
        "peer_role",
        "role",
        "state",
    )

    def __init__(self, role: Role, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self.role = role
        self.peer_role = Role.BROKER if role is Role.CLIENT else Role.CLIENT
        self.state = State.HANDSHAKE
        self._max_frame_bytes = max_frame_bytes
        if role is Role.BROKER:
            max_frame_bytes = min(max_frame_bytes, MAX_HELLO_FRAME_BYTES)
        self._decoder = FrameDecoder(max_frame_bytes)
        self._error_sent = False
        # TRANSITIONS by state for each direction: two dict lookups per frame, no tuple key.
        self._sendable = _ROWS[role]
        self._receivable = _ROWS[self.peer_role]

    @property
    def max_frame_bytes(self) -> int:
        """The frame limit once the connection is OPEN (before WELCOME a broker accepts less)."""
        return self._max_frame_bytes

    @max_frame_bytes.setter
    def max_frame_bytes(self, value: int) -> None:
        self._max_frame_bytes = value
        if self.role is Role.CLIENT or self.state is State.OPEN:
            self._decoder.max_frame_bytes = value

    def _next_state(self, sender: Role, frame: Frame) -> State | None:
        if type(frame) is Error:
            if sender is not Role.BROKER or self.state is State.CLOSED:
                return None
            if frame.close:
                return State.CLOSED
            return self.state if self.state is State.OPEN else None
        table = self._sendable if sender is self.role else self._receivable
        return table[self.state].get(type(frame))

    def receive_data(self, data: bytes) -> list[Frame]:
        """Frames the peer completed with ``data``, each checked against the state table.

        In CLOSED the bytes are ignored and the answer is ``[]``. Raises RemoteProtocolError
        and moves to CLOSED on any violation.
        """
        if self.state is State.CLOSED:
            return []
        try:
            frames = self._decoder.feed(data)
        except RemoteProtocolError as exc:
            # Frames are judged one by one in order, decoding before state: an earlier frame
            # in the wrong state is the first violation, whatever comes after it.
            self._apply(exc.frames_before)
            self.state = State.CLOSED
            raise
        self._apply(frames)
        return frames

    def _apply(self, frames: list[Frame]) -> None:
        """Move through the state table for each received frame; raises UNEXPECTED_FRAME on the first misfit."""
        peer = self.peer_role
        rows = self._receivable
        row = rows[self.state]  # the state's row, looked up again only when the state changes
        for frame in frames:
            nxt = row.get(type(frame))
            if nxt is None:  # ERROR (in no row: _next_state judges it), or a frame the table refuses
                nxt = self._next_state(peer, frame)
                if nxt is None:
                    was = self.state
                    self.state = State.CLOSED
                    raise RemoteProtocolError(
                        ErrorCode.UNEXPECTED_FRAME,
                        f"{frame.TYPE} frame not allowed from the {peer.value} in state {was.value}",
                    )
            if nxt is not self.state:
                self.state = nxt
                row = rows[nxt]

    def send(self, frame: Frame) -> bytes:
        """The bytes that carry ``frame``; ``b""`` in CLOSED.

        Raises LocalProtocolError if the frame is not allowed in the current state (other than CLOSED).
        """
        if type(frame) is Error:
            if frame.close:
                return self.send_error(ErrorCode(frame.code), frame.message)
            if len(frame.message) > MAX_ERROR_MESSAGE_CHARS:
                frame = Error(code=frame.code, message=_cut(frame.message), close=False)
        nxt = self._next_state(self.role, frame)
        if nxt is None:
            return self._refuse(frame.TYPE)
        self._enter(nxt)
        return encode_frame(frame)

    def send_send(
        self, id: str, to: Sequence[str], body: bytes, ttl_s: int | None = None, *, notify: bool = False
    ) -> bytes:
        """``send(Send(id=id, to=to, body=body, ttl_s=ttl_s, notify=notify))`` without building the frame.

        Raises ValueError (SEND's own validator) if a field is invalid, then, like
        :meth:`send`, LocalProtocolError if SEND is not allowed now; ``b""`` in CLOSED.
        """
        _check_send(id, to, body, ttl_s, notify)
        if not self._may_send(Send):
            return b""
        return _encode_send(id, to, body, ttl_s, notify)

    def send_receipts(self, receipts: Iterable[ReceiptFields]) -> list[bytes]:
        """``[send(Receipt(id=r.id, results=r.results, code=r.code, retry_after_ms=r.retry_after_ms)) for r in
        receipts]`` without building the frames: the state table is consulted once for the batch (RECEIPT keeps
        the state it is sent in).

        The values must be valid already (the id of a validated SEND; results built from
        RecipientResult): only the state is checked. Raises LocalProtocolError if RECEIPT
        is not allowed now; ``[]`` in CLOSED.
        """
        if not self._may_send(Receipt):
            return []
        return _encode_receipts(receipts)

    def send_delivers(self, messages: Iterable[DeliverFields]) -> list[bytes]:
        """``[send(Deliver(...)) for m in messages]`` without building the frames: the broker's delivery
        hot path, with the state table consulted once for the batch (DELIVER keeps the state it is sent in).

        The values must be valid already (stored messages: their ids and bodies came from
        validated SENDs, their senders are authenticated mailbox ids): only the state is
        checked. Raises LocalProtocolError if DELIVER is not allowed now; ``[]`` in CLOSED.
        """
        if not self._may_send(Deliver):
            return []
        return _encode_delivers(messages)

    def send_statuses(self, statuses: Iterable[StatusFields]) -> list[bytes]:
        """``[send(StatusReport(...)) for s in statuses]`` without building the frames, the state table
        consulted once for the batch (STATUS keeps the state it is sent in).

        The values must be valid already (the store's held statuses): only the state is
        checked. Raises LocalProtocolError if STATUS is not allowed now; ``[]`` in CLOSED.
        """
        if not self._may_send(StatusReport):
            return []
        return _encode_statuses(statuses)

    def _may_send(self, kind: type[Frame]) -> bool:
        """Whether a frame of ``kind`` may be sent now, moving through the table: False in CLOSED,
        LocalProtocolError if the table does not allow it."""
        nxt = self._sendable[self.state].get(kind)
        return nxt is self.state or self._move(nxt, kind.TYPE)

    def _move(self, nxt: State | None, frame_type: str) -> bool:
        """After the table gave ``nxt`` for sending ``frame_type``: enter it (True), or refuse (see :meth:`_refuse`)."""
        if nxt is None:
            self._refuse(frame_type)  # raises unless CLOSED
            return False
        self._enter(nxt)
        return True

    def _refuse(self, frame_type: str) -> bytes:
        """What sending a frame the table does not allow gives: ``b""`` in CLOSED, else LocalProtocolError."""
        if self.state is State.CLOSED:
            return b""
        raise LocalProtocolError(
            ErrorCode.UNEXPECTED_FRAME,
            f"cannot send {frame_type} as the {self.role.value} in state {self.state.value}",
        )

    def _enter(self, nxt: State) -> None:
        """Move to ``nxt`` after sending a frame (WELCOME also lifts a broker's pre-handshake frame limit)."""
        if nxt is State.OPEN and self.state is State.AUTHENTICATING:
            self._decoder.max_frame_bytes = self._max_frame_bytes  # WELCOME: the full limit from now on
        self.state = nxt

    def send_error(self, code: ErrorCode, message: str, *, retry_after_ms: int | None = None) -> bytes:
        """Close after a protocol violation: the bytes of a closing ERROR, then CLOSED.

        Only the broker sends ERROR frames, and at most one closing ERROR per connection;
        it is allowed in every state, including CLOSED after the peer's own protocol error
        (telling the peer what it did wrong is what it is for). For a client, or once an
        ERROR was sent, this just moves to CLOSED and returns b"".
        """
        if self.role is not Role.BROKER or self._error_sent:
            self.state = State.CLOSED
            return b""
        self._error_sent = True
        self.state = State.CLOSED
        return encode_frame(Error(code=int(code), message=_cut(message), close=True, retry_after_ms=retry_after_ms))


def _cut(message: str) -> str:
    """``message`` cut to MAX_ERROR_MESSAGE_CHARS characters (marked with an ellipsis if cut)."""
    if len(message) <= MAX_ERROR_MESSAGE_CHARS:
        return message
    return message[: MAX_ERROR_MESSAGE_CHARS - 1] + "\u2026"
