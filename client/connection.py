"""The trio client: one object that sends, receives, ACKs and reconnects.

Theory of operation. :func:`open_client` connects and completes the handshake before it
yields, so a bad URL, an unreachable broker or a refused token raise at once. After that a
background task owns the connection ("link"): per link a **reader** feeds received bytes to
the sans-IO :class:`wire.Connection` and acts on each chunk's frames in one synchronous pass,
and a **writer** takes everything queued (ACK ids, control frames, encoded SENDs, BYE) and
writes it with one ``send_all``. A send made while the writer is idle goes straight to the
socket (``transport.try_send``, never blocking) and leaves only what the socket did not take
for the writer, ahead of anything newer. A **watchdog** queues a PING after ``keepalive_s / 3``
without writing and ends the link after ``keepalive_s`` without receiving, judged from
timestamps. When a link ends for a transient reason the task reconnects with exponential
backoff and jitter; INVALID_TOKEN, TOKEN_EXPIRED, UNSUPPORTED_VERSION, CONNECTED_ELSEWHERE (and
other protocol violations) are fatal: every waiter raises the error.

Nothing is lost across reconnects. Each SEND waits in ``_pending`` (a dict keyed by message id,
holding the encoded frame) until its RECEIPT arrives; a new link re-sends all of them with the
same ids, and SEND is idempotent, so a message whose receipt was lost is reported "duplicate",
never stored twice. ACK ids not written when a link fails are written on the next one. Waiting
for receipts costs one event per ``send``/``send_batch`` call, never a task per message.

Deliveries go to a deque that the iterators read in batches. With a local store, a **saver**
task takes each batch of deliveries, saves it in one SQLite transaction in a worker thread,
and only then queues the ACKs; the iterators see only messages that were new in the store,
so a redelivery is ACKed again but not yielded twice.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Generic, Protocol, TypeVar

import trio

from wire import (
    DEFAULT_MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    Ack,
    Bye,
    Cleanup,
    CleanupResult,
    Connection,
    Deliver,
    Drained,
    Error,
    ErrorCode,
    Frame,
    Hello,
    Ping,
    Pong,
    Pull,
    Receipt,
    RemoteProtocolError,
    Role,
    Send,
    Stats,
    StatsResult,
    Status,
    Welcome,
    encode_send,
    is_valid_message_id,
)

from .errors import ConnectionLost, ForbiddenError, LocalStoreError, ProtocolViolation, RelayError, error_from_code
from .errors import is_fatal as _is_fatal_code
from .localstore import LocalStore
from .transport import Endpoint, Transport, TransportClosed, open_transport, parse_url

T = TypeVar("T")
__all__ = [
    "ConnectionEvent",
    "ConnectionState",
    "Delivery",
    "OutgoingMessage",
    "RelayClient",
    "TransportFactory",
    "open_client",
]

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0
"""Longest a connect plus HELLO -> WELCOME may take before the attempt counts as failed."""
CLOSE_TIMEOUT_S = 5.0
"""Longest :meth:`RelayClient.close` waits to save, ACK and say BYE."""
MAX_ACK_IDS_PER_FRAME = 4096
"""ACK ids per frame: 4096 ids of at most 64 characters stay far below the 1 MiB frame limit."""
RECEIVE_SLACK_BYTES = 4096
"""Accepted beyond the broker's max_frame_bytes: a DELIVER carries a few more fields than the SEND it came from."""
MAX_BUFFERED_DELIVERIES = 65536
"""With a local store, deliveries saved but not yet taken from the iterators; past this the saver
waits (and so stops ACKing, which stops the broker) until the application catches up."""
_MAX_BACKOFF_DOUBLINGS = 40


class Delivery:
    """One delivered message. Times are Unix epoch milliseconds; ``attempt`` is 1 on first delivery."""

    __slots__ = ("attempt", "body", "expires_at", "id", "sender", "sent_at")

    def __init__(self, id: str, sender: str, sent_at: int, expires_at: int, attempt: int, body: bytes) -> None:
        self.id = id
        self.sender = sender
        self.sent_at = sent_at
        self.expires_at = expires_at
        self.attempt = attempt
        self.body = body

    def __repr__(self) -> str:
        return f"Delivery(id={self.id!r}, sender={self.sender!r}, attempt={self.attempt}, body={self.body[:32]!r})"


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """One message for :meth:`RelayClient.send_batch`. ``id`` defaults to 128 random bits in hex."""

    to: str | Sequence[str]
    body: bytes
    ttl_s: int | None = None
    id: str | None = None


class TransportFactory(Protocol):
    async def __call__(self, endpoint: Endpoint) -> Transport: ...


class ConnectionState(StrEnum):
    """What happened to the client's connection (see :class:`ConnectionEvent`)."""

    CONNECTED = "connected"
    """The first session is established (WELCOME received)."""
    DISCONNECTED = "disconnected"
    """A session ended for a transient reason (``reason``); the client is reconnecting."""
    RECONNECTED = "reconnected"
    """A session is established again after DISCONNECTED."""
    STOPPED = "stopped"
    """A session ended and the client will not reconnect: a fatal error (e.g. CONNECTED_ELSEWHERE,
    TOKEN_EXPIRED) or ``reconnect=False``. ``reason`` is the error every waiter now raises.
    Not reported for a :meth:`RelayClient.close` or an abandoned client."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionEvent:
    """One change of connection state, given to ``on_connection_change``.

    ``url`` is the broker's URL; ``mailbox`` and ``pending`` (messages the broker held for
    the mailbox, unexpired, at WELCOME) come from the WELCOME of a (re)connect and are None
    otherwise (``mailbox`` is also None for operator sessions); ``reason`` says why a session
    ended (DISCONNECTED, STOPPED: its ``code`` is the ERROR code, e.g. 4004 SHUTTING_DOWN or
    4001 CONNECTED_ELSEWHERE, or None for a transport failure); ``connects`` counts the sessions
    established so far.
    """

    state: ConnectionState
    url: str
    mailbox: str | None = None
    pending: int | None = None
    reason: RelayError | None = None
    connects: int = 0

    @property
    def code(self) -> int | None:
        """The error code that ended the session (``reason.code``), if any."""
        return self.reason.code if self.reason is not None else None


ConnectionCallback = Callable[[ConnectionEvent], None]


# ---------------------------------------------------------------- bookkeeping


class _Batch:
    """Receipts awaited by one send/send_batch call."""

    __slots__ = ("done", "error", "remaining", "results")

    def __init__(self, n: int) -> None:
        self.results: list[Receipt | None] = [None] * n
        self.remaining = n
        self.done = trio.Event()
        self.error: BaseException | None = None


_Pending = tuple[bytes, _Batch, int]
"""A SEND waiting for its receipt: (encoded frame, re-sent on reconnect; its batch; its index in the batch).
A plain tuple: one is made per message on the hot path."""


class _Request:
    """A STATS or CLEANUP waiting for its answer; answers come in the order requests were written."""

    __slots__ = ("done", "error", "frame", "result")

    def __init__(self, frame: Frame) -> None:
        self.frame = frame
        self.done = trio.Event()
        self.result: Frame | None = None
        self.error: BaseException | None = None


class _DrainMark:
    """DRAINED, kept in order with the deliveries before it on their way through the saver."""

    __slots__ = ("gen", "pending")

    def __init__(self, gen: int, pending: int) -> None:
        self.gen = gen
        self.pending = pending


class _Link:
    """One connection from WELCOME to its end."""

    __slots__ = (
        "bye_sent",
        "bye_written",
        "conn",
        "finished",
        "gen",
        "last_rx",
        "last_tx",
        "quiet",
        "reason",
        "scope",
        "transport",
        "welcome",
    )

    def __init__(self, transport: Transport, conn: Connection, welcome: Welcome) -> None:
        self.transport = transport
        self.conn = conn
        self.welcome = welcome
        self.gen = 0
        self.scope = trio.CancelScope()
        self.reason: RelayError | None = None
        self.bye_sent = False
        self.bye_written = False
        self.quiet = trio.Event()
        """Set once BYE is written or the link has ended: nothing more will go out on it."""
        self.finished = trio.Event()
        self.last_rx = self.last_tx = trio.current_time()

    def end(self, reason: RelayError) -> None:
        if self.reason is None:
            self.reason = reason
        self.scope.cancel()


def _new_ids(n: int) -> list[str]:
    """``n`` ids of 128 random bits (32 hex digits) from one getrandom call."""
    h = os.urandom(16 * n).hex()
    return [h[i : i + 32] for i in range(0, 32 * n, 32)]


def _clone(exc: BaseException) -> BaseException:
    """A fresh copy to raise in one more task (so tracebacks do not pile up on one object)."""
    dup = copy.copy(exc)
    dup.__traceback__ = None
    return dup


# ---------------------------------------------------------------- the client


class RelayClient:
    """A connection to a Relay broker, kept up across failures. Made by :func:`open_client`.

    Attributes: ``welcome`` (the latest WELCOME, with the broker's limits), ``mailbox`` (this
    session's mailbox id; None for operator tokens). ``on_connection_change`` (see
    :func:`open_client`) is called with a :class:`ConnectionEvent` once for each change of state.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        token: str,
        *,
        local_store: LocalStore | None = None,
        agent: str | None = None,
        reconnect: bool = True,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 10.0,
        transport_factory: TransportFactory | None = None,
        on_connection_change: ConnectionCallback | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.welcome: Welcome | None = None
        self._token = token
        self._agent = agent
        self._store = local_store
        self._reconnect = reconnect
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = max(backoff_max_s, backoff_initial_s)
        self._open_transport = transport_factory or open_transport
        self._on_connection_change = on_connection_change
        # sending
        self._pending: dict[str, _Pending] = {}
        self._outbox: list[bytes] = []
        self._ack_ids: list[str] = []
        self._ctrl: list[Frame] = []
        self._requests: deque[_Request] = deque()  # written on the current link, unanswered
        self._unsent_requests: list[_Request] = []
        self._bye_wanted = False
        self._wake_writer = trio.Event()
        self._writing = False  # the writer is in send_all
        self._unwritten = b""  # the rest of a direct write the socket did not take: next on the wire
        # receiving
        self._inbox: deque[Delivery] = deque()
        self._saver_queue: list[Delivery | _DrainMark] = []
        self._saver_wake = trio.Event()
        self._saver_busy = False
        self._room = trio.Event()
        self._room_wanted = False
        self._drained_expected = 0
        self._drained_seen = 0
        self._drained_pending = 0
        # lifecycle
        self._link: _Link | None = None
        self._gen = 0
        self._failure: RelayError | None = None
        self._closed = False
        self._stopped = False
        self._changed = trio.Event()
        self._bg_scope = trio.CancelScope()
        self.connects = 0
        """How many times a session was established (1 + reconnects)."""

    # ------------------------------------------------------------ public API

    @property
    def mailbox(self) -> str | None:
        """This session's mailbox id (None for an operator session)."""
        return self.welcome.mailbox if self.welcome is not None else None

    @property
    def connected(self) -> bool:
        """Whether a session is established right now."""
        return self._link is not None

    async def send(
        self, to: str | Sequence[str], body: bytes, *, ttl_s: int | None = None, id: str | None = None
    ) -> Receipt:
        """Send one message and wait for its RECEIPT (one result per distinct recipient).

        ``id`` defaults to ``uuid4().hex``. If the connection drops first, the message is re-sent
        with the same id after reconnecting (the broker answers "duplicate" if it had stored it); while
        the broker is unreachable it keeps waiting, so bound it with ``trio.fail_after`` if needed.
        Raises ValueError for an invalid message, RelayError(FRAME_TOO_LARGE) for a body the broker
        cannot take, ForbiddenError for operator sessions, and the fatal error (e.g.
        AuthenticationError, ConnectedElsewhere, or ConnectionLost with ``reconnect=False``) if the
        client stops before the receipt arrives.
        """
        receipts = await self._submit([(id if id is not None else uuid.uuid4().hex, to, body, ttl_s)])
        return receipts[0]

    async def send_batch(self, items: Sequence[OutgoingMessage]) -> list[Receipt]:
        """Send many messages in one write and wait for all their receipts (same order as ``items``).

        Same guarantees and errors as :meth:`send`. Nothing is queued if any item is invalid.
        """
        if not items:
            return []
        missing = sum(1 for m in items if m.id is None)
        fresh = iter(_new_ids(missing)) if missing else iter(())
        return await self._submit([(m.id if m.id is not None else next(fresh), m.to, m.body, m.ttl_s) for m in items])

    def deliveries(self, *, until_drained: bool = False) -> AsyncIterator[Delivery]:
        """Delivered messages in arrival order. With a local store, only messages new in the store
        (already saved and ACKed); without one, every delivery (ACK it with :meth:`ack`).

        Ends when the client is closed, or with ``until_drained`` once every message held at the
        last connect or :meth:`pull` has been yielded. Raises the fatal error if the client fails
        (after yielding what had arrived).
        """
        return _InboxIterator(self, self._take_one, until_drained)

    def delivery_batches(self, *, until_drained: bool = False) -> AsyncIterator[list[Delivery]]:
        """Like :meth:`deliveries`, but each step yields every delivery buffered so far (a non-empty list)."""
        return _InboxIterator(self, self._take_all, until_drained)

    def ack(self, ids: str | Iterable[str]) -> None:
        """Queue ACKs for delivered messages. ACKs queued before the writer next runs go out in one frame;
        ACKs not yet written when a connection fails are written after reconnecting. Does not block.

        With a local store the client ACKs by itself after saving; calling this too is harmless.
        Raises ValueError for an invalid id, ForbiddenError for operator sessions.
        """
        self._check_usable(needs_mailbox=True)
        new = [ids] if isinstance(ids, str) else list(ids)
        for i in new:
            if not is_valid_message_id(i):
                raise ValueError(f"invalid message id {i!r}")
        self._ack_ids += new
        self._wake_writer.set()

    async def pull(self) -> None:
        """Ask for every un-ACKed message again (oldest first, then DRAINED; see :meth:`wait_drained`)."""
        self._check_usable(needs_mailbox=True)
        if self._link is not None:
            self._ctrl.append(Pull())
            self._drained_expected += 1
            self._fire()
            self._wake_writer.set()
        # No link: the reconnect delivers the whole mailbox again anyway.
        await trio.lowlevel.checkpoint()

    async def wait_drained(self) -> int:
        """Wait until the broker has delivered everything it held at the last connect or :meth:`pull`
        (the matching DRAINED arrived; with a local store, those deliveries are also saved and their
        ACKs queued). Returns DRAINED's ``pending``: messages still un-ACKed at that moment.

        Returns at once if that has already happened. Raises the fatal error if the client fails,
        ConnectionLost if it is closed.
        """
        while True:
            self._raise_if_done()
            if self._is_drained():
                await trio.lowlevel.checkpoint()
                return self._drained_pending
            await self._changed.wait()

    async def stats(self) -> dict[str, int]:
        """The broker's statistics (operator tokens). Raises ForbiddenError otherwise."""
        result = await self._request(Stats())
        assert isinstance(result, StatsResult)
        return dict(result.stats)

    async def cleanup(self) -> int:
        """Make the broker purge expired messages now; returns how many (operator tokens)."""
        result = await self._request(Cleanup())
        assert isinstance(result, CleanupResult)
        return result.purged

    async def close(self) -> None:
        """Finish gracefully: let the saver finish, write queued ACKs and BYE (bounded by CLOSE_TIMEOUT_S),
        then stop. Pending sends and requests raise ConnectionLost; the iterators end. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._fire()
        with trio.move_on_after(CLOSE_TIMEOUT_S):
            while self._failure is None and (self._saver_busy or self._saver_queue):
                await self._changed.wait()
            while self._failure is None:
                link = self._link
                if link is None:
                    if not self._ack_ids or not self._reconnect:
                        break
                    await self._changed.wait()  # reconnecting: the ACKs go out first
                    continue
                self._bye_wanted = True
                self._wake_writer.set()
                await link.quiet.wait()
                if link.bye_written:
                    break
        self._stop(ConnectionLost("the client was closed"))

    # ------------------------------------------------------------ internals: API support

    def _fire(self) -> None:
        """Wake everything waiting on the client's visible state (iterators, wait_drained, close)."""
        self._changed.set()
        self._changed = trio.Event()

    def _is_drained(self) -> bool:
        return self._link is not None and self._drained_seen >= self._drained_expected

    def _raise_if_done(self) -> None:
        if self._failure is not None:
            raise _clone(self._failure)
        if self._closed:
            raise ConnectionLost("the client is closed")

    def _check_usable(self, *, needs_mailbox: bool = False) -> None:
        self._raise_if_done()
        if needs_mailbox and self.welcome is not None and self.welcome.mailbox is None:
            raise ForbiddenError(ErrorCode.FORBIDDEN, "operator sessions have no mailbox: send, ack and pull need one")

    async def _submit(self, items: list[tuple[str, str | Sequence[str], bytes, int | None]]) -> list[Receipt]:
        self._check_usable(needs_mailbox=True)
        assert self.welcome is not None
        limit = self.welcome.max_frame_bytes + 4
        encoded: list[bytes] = []
        for mid, to, body, ttl_s in items:
            recipients = (to,) if type(to) is str else tuple(to)
            if not Send.valid_fields(mid, recipients, body, ttl_s):
                try:
                    Send(id=mid, to=recipients, body=body, ttl_s=ttl_s)  # says what is wrong
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"invalid message {mid!r}: {exc}") from None
            data = encode_send(mid, recipients, body, ttl_s)
            if len(data) > limit:
                raise RelayError(
                    ErrorCode.FRAME_TOO_LARGE,
                    f"message {mid!r} needs a {len(data) - 4}-byte frame; the broker accepts at most {limit - 4}",
                )
            encoded.append(data)
        batch = _Batch(len(items))
        pending = self._pending
        for index, data in enumerate(encoded):
            mid = items[index][0]
            if mid in pending:
                for earlier in items[:index]:
                    del pending[earlier[0]]
                raise ValueError(f"a send with id {mid!r} is already waiting for its receipt")
            pending[mid] = (data, batch, index)
        self._outbox += encoded
        self._write_sends()
        try:
            await batch.done.wait()
        finally:
            if batch.remaining:  # cancelled or failed: forget what is still waiting
                for item in items:
                    entry = pending.get(item[0])
                    if entry is not None and entry[1] is batch:
                        del pending[item[0]]
        if batch.error is not None:
            raise _clone(batch.error)
        receipts: list[Receipt] = batch.results  # type: ignore[assignment]  # all filled in
        if self._store is not None and self.mailbox is not None:
            await self._record_outgoing(self.mailbox, items, receipts)
        return receipts

    async def _record_outgoing(
        self, mailbox: str, items: list[tuple[str, str | Sequence[str], bytes, int | None]], receipts: list[Receipt]
    ) -> None:
        rows = []
        for (mid, _to, body, _ttl), receipt in zip(items, receipts, strict=True):
            accepted = [r for r, res in receipt.results.items() if res.status is not Status.REFUSED]
            if accepted:
                rows.append((mid, accepted, body))
        if rows and self._store is not None:
            try:
                await trio.to_thread.run_sync(self._store.record_outgoing, mailbox, rows)
            except Exception:
                log.exception("recording %d sent messages in the local store failed", len(rows))

    def _write_sends(self) -> None:
        """Put queued SENDs straight on the socket if the writer is idle, else leave them to the writer.

        A direct write costs no task switch (what online latency is made of). What the socket
        does not take at once is handed to the writer as ``_unwritten``, the next bytes it writes.
        """
        link = self._link
        if link is None or self._writing or self._unwritten or link.bye_sent:
            self._wake_writer.set()
            return
        outbox, self._outbox = self._outbox, []
        data = outbox[0] if len(outbox) == 1 else b"".join(outbox)
        sent = link.transport.try_send(data)
        if sent < len(data):
            self._unwritten = data[sent:]
            self._wake_writer.set()
        else:
            link.last_tx = trio.current_time()

    async def _request(self, frame: Frame) -> Frame:
        self._check_usable()
        req = _Request(frame)
        self._unsent_requests.append(req)
        self._wake_writer.set()
        await req.done.wait()
        if req.error is not None:
            raise _clone(req.error)
        assert req.result is not None
        return req.result

    def _stop(self, error: RelayError) -> None:
        """Release every waiter with ``error`` and stop the background tasks."""
        for entry in self._pending.values():
            batch = entry[1]
            if batch.error is None:
                batch.error = error
                batch.done.set()
        self._pending.clear()
        for req in (*self._requests, *self._unsent_requests):
            if not req.done.is_set():
                req.error = error
                req.done.set()
        self._requests.clear()
        self._unsent_requests.clear()
        self._stopped = True
        self._bg_scope.cancel()
        self._fire()

    def _fail(self, error: RelayError) -> None:
        if self._failure is None and not self._closed:
            log.warning("relay client stopped: %s", error)
            self._failure = error
        self._stop(error)

    # ------------------------------------------------------------ connecting

    async def _connect(self) -> tuple[_Link, list[Frame]]:
        """Open a transport and complete the handshake. Raises RelayError (ConnectionLost if the
        transport failed, AuthenticationError etc. if the broker refused)."""
        transport: Transport | None = None
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                transport = await self._open_transport(self.endpoint)
                conn = Connection(Role.CLIENT)
                hello = Hello(version=PROTOCOL_VERSION, token=self._token, agent=self._agent)
                await transport.send_all(conn.send(hello))
                while True:
                    data = await transport.receive_some()
                    if not data:
                        raise ConnectionLost(f"{self.endpoint} closed the connection during the handshake")
                    frames = conn.receive_data(data)
                    if frames:
                        break
        except BaseException as exc:
            if transport is not None:
                await transport.aclose()
            if isinstance(exc, trio.TooSlowError):
                raise ConnectionLost(f"no WELCOME from {self.endpoint} within {HANDSHAKE_TIMEOUT_S:g} s") from None
            if isinstance(exc, TransportClosed):
                raise ConnectionLost(str(exc) if transport is None else f"{self.endpoint}: {exc}") from None
            if isinstance(exc, RemoteProtocolError):
                raise ProtocolViolation(exc.code, f"bad answer to HELLO from {self.endpoint}: {exc.message}") from None
            raise
        first = frames[0]
        if isinstance(first, Error):
            await transport.aclose()
            raise error_from_code(first.code, first.message)
        assert isinstance(first, Welcome)  # the state table admits nothing else
        conn.max_frame_bytes = max(first.max_frame_bytes, DEFAULT_MAX_FRAME_BYTES) + RECEIVE_SLACK_BYTES
        return _Link(transport, conn, first), frames[1:]

    async def _background(self, link: _Link, leftover: list[Frame]) -> None:
        with self._bg_scope:
            async with trio.open_nursery() as nursery:
                if self._store is not None:
                    nursery.start_soon(self._saver)
                await self._maintain(link, leftover)
                nursery.cancel_scope.cancel()

    async def _maintain(self, link: _Link, leftover: list[Frame]) -> None:
        """Serve links one after another until closed or a fatal error."""
        while True:
            reason = await self._serve_link(link, leftover)
            if self._stopped or self._failure is not None:
                return
            if (reason.code is not None and _is_fatal_code(reason.code)) or not self._reconnect:
                self._fail(reason)
                self._report(ConnectionState.STOPPED, reason=reason)
                return
            log.info("connection to %s lost (%s); reconnecting", self.endpoint, reason)
            if not self._closed:  # while closing, the end of the link is the client's own doing
                self._report(ConnectionState.DISCONNECTED, reason=reason)
            attempt = 0
            while True:
                delay = min(self._backoff_max_s, self._backoff_initial_s * 2 ** min(attempt, _MAX_BACKOFF_DOUBLINGS))
                attempt += 1
                await trio.sleep(random.uniform(delay / 2, delay))
                try:
                    link, leftover = await self._connect()
                    self._open_link(link)
                    break
                except RelayError as exc:
                    if exc.code is not None and _is_fatal_code(exc.code):
                        self._fail(exc)
                        self._report(ConnectionState.STOPPED, reason=exc)
                        return
                    log.info("reconnect attempt %d to %s failed: %s", attempt, self.endpoint, exc)

    def _open_link(self, link: _Link) -> None:
        self._gen += 1
        link.gen = self._gen
        self.connects += 1
        self.welcome = link.welcome
        self._drained_expected = 1 if link.welcome.mailbox is not None else 0
        self._drained_seen = 0
        # Everything unanswered goes out again: SEND and ACK are idempotent, requests are answered in order.
        self._outbox = [entry[0] for entry in self._pending.values()]
        self._unwritten = b""  # part of a SEND above (the frame goes out whole again)
        self._unsent_requests[:0] = self._requests
        self._requests.clear()
        self._ctrl.clear()
        self._link = link
        log.info("session %s open on %s (mailbox %s)", link.welcome.session, self.endpoint, link.welcome.mailbox)
        self._fire()
        self._report(
            ConnectionState.CONNECTED if self.connects == 1 else ConnectionState.RECONNECTED,
            mailbox=link.welcome.mailbox,
            pending=link.welcome.pending,
        )

    def _report(self, state: ConnectionState, **fields: Any) -> None:
        """Tell ``on_connection_change``; a callback that raises is logged, never allowed to stop the client."""
        callback = self._on_connection_change
        if callback is None:
            return
        try:
            callback(ConnectionEvent(state=state, url=str(self.endpoint), connects=self.connects, **fields))
        except Exception:
            log.exception("on_connection_change callback failed for %s", state)

    async def _serve_link(self, link: _Link, leftover: list[Frame]) -> RelayError:
        """Run one (opened) link's reader and writer until it ends; returns why it ended."""
        try:
            with link.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._guard, link, self._write_loop, ())
                    nursery.start_soon(self._guard, link, self._watchdog, ())
                    await self._guard(link, self._read_loop, (leftover,))
        finally:
            self._link = None
            link.quiet.set()
            await link.transport.aclose()
            link.finished.set()
            self._fire()
        return link.reason or ConnectionLost(f"the connection to {self.endpoint} ended")

    async def _guard(self, link: _Link, part: Any, args: tuple[Any, ...]) -> None:
        """Run the reader or writer; whatever ends it ends the link, with the reason translated once."""
        try:
            await part(link, *args)
        except TransportClosed as exc:
            link.end(ConnectionLost(f"connection to {self.endpoint} lost: {exc}"))
        except RemoteProtocolError as exc:
            link.end(ProtocolViolation(exc.code, f"the broker sent an invalid frame: {exc.message}"))
        except RelayError as exc:
            link.end(exc)

    # ------------------------------------------------------------ the writer

    async def _write_loop(self, link: _Link) -> None:
        transport = link.transport
        while True:
            self._wake_writer = trio.Event()
            acks = self._ack_ids
            data = self._collect(link)
            if data:
                self._writing = True
                try:
                    await transport.send_all(data)
                except BaseException:
                    # Unwritten (or half-written) ACKs go out again on the next link; they are idempotent.
                    if acks is not self._ack_ids:
                        self._ack_ids[:0] = acks
                    raise
                finally:
                    self._writing = False
                link.last_tx = trio.current_time()
                if link.bye_sent:
                    link.bye_written = True
                    link.quiet.set()
                    return
                continue
            await self._wake_writer.wait()

    async def _watchdog(self, link: _Link) -> None:
        """Send PING after ``keepalive_s / 3`` without writing; end the link after ``keepalive_s``
        without receiving. Judged from timestamps a few times per period, so no read or write
        pays for a timer of its own."""
        keepalive_s = float(link.welcome.keepalive_s)
        idle_s = max(keepalive_s / 3, 0.01)
        while True:
            await trio.sleep(idle_s / 4)
            now = trio.current_time()
            if now - link.last_rx >= keepalive_s:
                raise ConnectionLost(f"nothing received from {self.endpoint} for {keepalive_s:g} s")
            if now - link.last_tx >= idle_s and not link.bye_sent:
                link.last_tx = now
                self._ctrl.append(Ping())
                self._wake_writer.set()

    def _collect(self, link: _Link) -> bytes:
        """Everything queued for the broker, as one byte string: ACKs, control frames, requests, SENDs, BYE."""
        conn = link.conn
        parts: list[bytes] = []
        if self._unwritten:
            parts.append(self._unwritten)  # the rest of a direct write comes first
            self._unwritten = b""
        if self._ack_ids:
            ids, self._ack_ids = self._ack_ids, []
            for i in range(0, len(ids), MAX_ACK_IDS_PER_FRAME):
                parts.append(conn.send(Ack(ids=tuple(ids[i : i + MAX_ACK_IDS_PER_FRAME]))))
        if self._ctrl:
            ctrl, self._ctrl = self._ctrl, []
            parts += [conn.send(frame) for frame in ctrl]
        if self._unsent_requests:
            reqs, self._unsent_requests = self._unsent_requests, []
            for req in reqs:
                parts.append(conn.send(req.frame))
                self._requests.append(req)
        if self._outbox:
            # Pre-encoded SEND frames: legal because the link is OPEN (BYE, which closes it, goes last).
            parts += self._outbox
            self._outbox = []
        if self._bye_wanted and not link.bye_sent:
            parts.append(conn.send(Bye()))
            link.bye_sent = True
        if not parts:
            return b""
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # ------------------------------------------------------------ the reader

    async def _read_loop(self, link: _Link, frames: list[Frame]) -> None:
        transport = link.transport
        conn = link.conn
        while True:
            if frames:
                self._handle(link, frames)
            data = await transport.receive_some()
            link.last_rx = trio.current_time()
            if not data:
                raise ConnectionLost(f"{self.endpoint} closed the connection")
            if link.bye_sent:
                frames = []  # after BYE the state machine is CLOSED: ignore stragglers, wait for EOF
                continue
            frames = conn.receive_data(data)

    def _handle(self, link: _Link, frames: list[Frame]) -> None:
        """Act on one chunk's frames, in order, without awaiting."""
        deliveries: list[Delivery] = []
        pending = self._pending
        try:
            for f in frames:
                kind = type(f)
                if kind is Deliver:
                    d: Deliver = f  # type: ignore[assignment]
                    deliveries.append(Delivery(d.id, d.sender, d.sent_at, d.expires_at, d.attempt, d.body))
                elif kind is Receipt:
                    r: Receipt = f  # type: ignore[assignment]
                    entry = pending.pop(r.id, None)
                    if entry is not None:
                        batch = entry[1]
                        batch.results[entry[2]] = r
                        batch.remaining -= 1
                        if not batch.remaining:
                            batch.done.set()
                elif kind is Drained:
                    if deliveries:
                        self._accept(deliveries)
                        deliveries = []
                    self._on_drained(link.gen, f.pending)  # type: ignore[attr-defined]
                elif kind is Pong:
                    pass
                elif kind is StatsResult or kind is CleanupResult:
                    self._answer(f, None)
                elif kind is Error:
                    e: Error = f  # type: ignore[assignment]
                    error = error_from_code(e.code, e.message)
                    if e.close:
                        raise error
                    if e.code == ErrorCode.FORBIDDEN and self._requests:
                        self._answer(None, error)  # the only frames we let reach the broker that it may forbid
                    else:
                        log.warning("error from %s: %s", self.endpoint, error)
        finally:
            if deliveries:
                self._accept(deliveries)

    def _answer(self, result: Frame | None, error: RelayError | None) -> None:
        if not self._requests:
            log.warning("unexpected %s from %s: no request outstanding", result or error, self.endpoint)
            return
        req = self._requests.popleft()
        req.result, req.error = result, error
        req.done.set()

    def _accept(self, deliveries: list[Delivery]) -> None:
        if self._store is None:
            self._inbox.extend(deliveries)
            self._fire()
        else:
            self._saver_queue += deliveries
            self._saver_wake.set()

    def _on_drained(self, gen: int, pending: int) -> None:
        if self._store is None:
            self._mark_drained(gen, pending)
        else:
            self._saver_queue.append(_DrainMark(gen, pending))
            self._saver_wake.set()

    def _mark_drained(self, gen: int, pending: int) -> None:
        if gen == self._gen:
            self._drained_seen += 1
            self._drained_pending = pending
            self._fire()

    # ------------------------------------------------------------ the saver (local store only)

    async def _saver(self) -> None:
        store = self._store
        assert store is not None
        while True:
            if not self._saver_queue:
                await self._saver_wake.wait()
                self._saver_wake = trio.Event()
                continue
            while len(self._inbox) >= MAX_BUFFERED_DELIVERIES:
                self._room_wanted = True
                await self._room.wait()
                self._room = trio.Event()
            self._saver_busy = True
            items, self._saver_queue = self._saver_queue, []
            deliveries = [i for i in items if type(i) is Delivery]
            fresh: list[bool] = []
            if deliveries:
                mailbox = self.mailbox
                assert mailbox is not None
                try:
                    fresh = await trio.to_thread.run_sync(store.save_incoming, mailbox, deliveries)
                except Exception as exc:
                    self._fail(LocalStoreError(f"saving {len(deliveries)} deliveries failed (not ACKed): {exc}"))
                    return
                # Saved and committed: only now may the broker forget them.
                self._ack_ids += [d.id for d in deliveries]
                self._wake_writer.set()
            inbox = self._inbox
            flags = iter(fresh)
            for item in items:
                if type(item) is Delivery:
                    if next(flags):
                        inbox.append(item)
                else:
                    self._mark_drained(item.gen, item.pending)  # type: ignore[union-attr]
            self._saver_busy = False
            self._fire()

    def _take_one(self) -> Delivery:
        d = self._inbox.popleft()
        if self._room_wanted and len(self._inbox) < MAX_BUFFERED_DELIVERIES // 2:
            self._room_wanted = False
            self._room.set()
        return d

    def _take_all(self) -> list[Delivery]:
        items = list(self._inbox)
        self._inbox.clear()
        if self._room_wanted:
            self._room_wanted = False
            self._room.set()
        return items

    async def _wait_for_inbox(self, until_drained: bool) -> bool:
        """Wait until deliveries are buffered (True) or the iteration should end (False); raises on failure."""
        while not self._inbox:
            if self._failure is not None:
                raise _clone(self._failure)
            if self._closed:
                return False
            if until_drained and self._is_drained() and not self._saver_queue and not self._saver_busy:
                return False
            await self._changed.wait()
        return True


class _InboxIterator(Generic[T]):
    """Yields what ``take`` returns from the inbox (one delivery, or all buffered) until it ends.

    A class rather than an async generator, so abandoning the loop needs no cleanup.
    """

    __slots__ = ("_client", "_take", "_until_drained")

    def __init__(self, client: RelayClient, take: Callable[[], T], until_drained: bool) -> None:
        self._client = client
        self._take = take
        self._until_drained = until_drained

    def __aiter__(self) -> _InboxIterator[T]:
        return self

    async def __anext__(self) -> T:
        client = self._client
        if client._inbox or await client._wait_for_inbox(self._until_drained):
            return self._take()
        raise StopAsyncIteration


# ---------------------------------------------------------------- entry point


@asynccontextmanager
async def open_client(
    url: str,
    token: str,
    *,
    local_store: LocalStore | None = None,
    agent: str | None = None,
    reconnect: bool = True,
    backoff_initial_s: float = 0.1,
    backoff_max_s: float = 10.0,
    transport_factory: TransportFactory | None = None,
    on_connection_change: ConnectionCallback | None = None,
) -> AsyncIterator[RelayClient]:
    """Connect to the broker at ``url`` (``tcp://host[:port]``, default port 7700) with ``token``
    and yield a :class:`RelayClient`; on normal exit it closes gracefully (BYE), on an exception
    or cancellation it drops the connection at once (un-ACKed messages stay with the broker).

    The first connection is made before this yields: raises ValueError for a bad URL or token,
    ConnectionLost if the broker is unreachable, AuthenticationError / ProtocolViolation if it
    refuses. Later failures are retried (``reconnect=True``) with backoff from
    ``backoff_initial_s`` doubling to ``backoff_max_s``, except the fatal ones.

    ``local_store``: save deliveries there before ACKing them, and record sent messages.
    ``transport_factory``: how to open a transport for the parsed URL (tests, custom transports).
    ``on_connection_change``: called with a frozen :class:`ConnectionEvent` once for each change of
    connection state: CONNECTED (before this yields), then DISCONNECTED (with the reason, e.g.
    SHUTTING_DOWN 4004 or a broken transport) and RECONNECTED for each reconnect, and STOPPED
    (with the fatal error, e.g. CONNECTED_ELSEWHERE 4001) if the client gives up. It runs in the
    client's own task: it must not block (an exception from it is logged and ignored).
    """
    endpoint = parse_url(url)
    if not isinstance(token, str) or not token or len(token) > 4096:
        raise ValueError("the token must be a non-empty string (a JWT from `relay-broker token`)")
    client = RelayClient(
        endpoint,
        token,
        local_store=local_store,
        agent=agent,
        reconnect=reconnect,
        backoff_initial_s=backoff_initial_s,
        backoff_max_s=backoff_max_s,
        transport_factory=transport_factory,
        on_connection_change=on_connection_change,
    )
    link, leftover = await client._connect()
    client._open_link(link)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._background, link, leftover)
            try:
                yield client
            except BaseException:
                client._closed = True
                client._stop(ConnectionLost("the client was abandoned"))
                raise
            await client.close()
    except BaseExceptionGroup as group:
        # Background tasks never raise (failures are reported to the waiters), so a group here
        # wraps the one exception from the body: give the caller that exception, not the group.
        exc: BaseException = group
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        if exc is group:
            raise
        raise exc from None
    finally:
        if not link.finished.is_set():
            await link.transport.aclose()
