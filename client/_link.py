"""One connection to the broker, from WELCOME to its end: the reader, the writer and the watchdog.

Theory of operation. :func:`handshake` writes HELLO on a fresh transport and reads until the
broker answers; a WELCOME makes a :class:`Link`, which :meth:`Link.run` serves with three tasks:

- The **reader** feeds received bytes to the sans-IO :class:`wire.Connection` and acts on each
  chunk's frames in one synchronous pass: RECEIPTs and request answers release the
  :class:`~client._pending.PendingTable`, DELIVERs (one list per chunk) and DRAINED go to the
  :class:`~client._e2e.EnvelopeOpener` (which passes a chunk without envelopes straight on to the
  :class:`~client._inbox.Inbox`), STATUS frames (one list per chunk) to the
  :class:`~client._statuses.StatusBox`.
- With end-to-end encryption on, a link of a mailbox session writes this device's KEY_PUT before
  anything else (it is the first of its ``_unwritten`` bytes) and consumes the first KEY_PUT_RESULT
  itself.
- The **writer** takes everything queued (the unwritten rest of a direct write, ACK ids, STATUS_ACK
  seqs, control frames, requests, SENDs, BYE; in that order) and writes it with one ``send_all``. Every frame is
  encoded by the link's state machine, SENDs too (``send_send``), so the state rules are the
  wire's alone: once the connection is CLOSED (BYE sent, closing ERROR received) encoding gives
  ``b""`` and nothing more goes out.
- The **watchdog** queues a PING after ``keepalive_s / 3`` without writing and ends the link
  after ``keepalive_s`` without receiving, judged from timestamps a few times per period.
- The **refresher** (only with a ``refresh_token`` callback) gets a newer token from the application once
  three quarters of the session's time (WELCOME's, then REFRESHED's ``expires_in_s``) have passed and sends
  it in a REFRESH (protocol.md rule 22); a callback that fails is asked again after a quarter of what is left.

The ONE direct write: :meth:`Link.write_sends`, called by ``send`` while the writer is idle, puts
the encoded SENDs on the transport with ``send_some_nowait`` (never blocking, no task switch: what
online latency is made of) and leaves only what the transport did not take for the writer, as
the first bytes it writes, ahead of anything newer. The writer and the direct write never
overlap (``writing``).

Whatever ends a task ends the link, with the reason translated once (:meth:`Link._guard`).
What outlives a link lives in :class:`Outbound` (ACK ids and STATUS_ACK seqs: idempotent, so
what a failed write took is given back) and in the pending table (SENDs and requests are written again on the
next link).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager

import trio

from wire import (
    DEFAULT_MAX_FRAME_BYTES,
    Ack,
    Bye,
    CleanupResult,
    Connection,
    Deliver,
    Drained,
    Error,
    ErrorCode,
    Frame,
    Hello,
    KeyGetResult,
    KeyPut,
    KeyPutResult,
    Ping,
    Pong,
    Receipt,
    Refresh,
    Refreshed,
    RemoteProtocolError,
    Role,
    Send,
    StatsResult,
    StatusAck,
    StatusReport,
    Welcome,
    encode_frame,
)

from ._e2e import EnvelopeOpener
from ._inbox import Delivery
from ._pending import PendingTable, SendItem
from ._statuses import StatusBox
from .errors import ConnectionLost, ProtocolViolation, RelayError, error_from_code
from .transport import Endpoint, Transport, TransportClosed

__all__ = [
    "MAX_ACK_IDS_PER_FRAME",
    "RECEIVE_SLACK_BYTES",
    "Link",
    "Outbound",
    "TokenSource",
    "TransportFactory",
    "check_sends",
    "handshake",
]

log = logging.getLogger(__name__)

MAX_ACK_IDS_PER_FRAME = 4096
"""ACK ids (and STATUS_ACK seqs) per frame: 4096 ids of at most 64 characters, or 4096 seqs of at most 9 bytes,
stay far below the 1 MiB frame limit."""
RECEIVE_SLACK_BYTES = 4096
"""Accepted beyond the broker's max_frame_bytes: a DELIVER carries a few more fields than the SEND it came from."""


MIN_REFRESH_INTERVAL_S = 0.25
"""The refresher asks for a token at most this often, however little time a token leaves."""

TokenSource = Callable[[], Awaitable[str]]
"""Where a newer token comes from: the client's ``refresh_token`` callback, checked (``RelayClient._new_token``)."""

TransportFactory = Callable[[Endpoint], AbstractAsyncContextManager[Transport]]
"""How the client opens a transport for a parsed URL (``open_client(transport_factory=...)``): an async
context manager yielding a connected transport, closed on exit (``client.transport.open_transport``'s shape,
with the client's SSL context already applied)."""


def _too_large(mid: str, size: int, limit: int) -> RelayError:
    return RelayError(
        ErrorCode.FRAME_TOO_LARGE,
        f"message {mid!r} needs a {size - 4}-byte frame; the broker accepts at most {limit - 4}",
    )


def check_sends(items: Sequence[SendItem], limit: int) -> None:
    """Judge SENDs while no link can encode them: raises ValueError for an invalid message and
    RelayError(FRAME_TOO_LARGE) for one whose frame would exceed ``limit`` bytes (prefix included)."""
    for mid, to, body, ttl_s, notify in items:
        try:
            frame = Send(id=mid, to=to, body=body, ttl_s=ttl_s, notify=notify)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid message {mid!r}: {exc}") from None
        size = len(encode_frame(frame))
        if size > limit:
            raise _too_large(mid, size, limit)


async def handshake(transport: Transport, endpoint: Endpoint, hello: Hello) -> tuple[Connection, Welcome, list[Frame]]:
    """Write HELLO and read the answer: the connection, the WELCOME and any frames that came with it.

    Raises ConnectionLost if the transport fails or ends, ProtocolViolation for an invalid answer, and
    the error an ERROR frame names (e.g. AuthenticationError) if the broker refuses."""
    conn = Connection(Role.CLIENT)
    try:
        await transport.send_all(conn.send(hello))
        frames: list[Frame] = []
        while not frames:
            data = await transport.receive_some()
            if not data:
                raise ConnectionLost(f"{endpoint} closed the connection during the handshake")
            frames = conn.receive_data(data)
    except TransportClosed as exc:
        raise ConnectionLost(f"{endpoint}: {exc}") from None
    except RemoteProtocolError as exc:
        raise ProtocolViolation(exc.code, f"bad answer to HELLO from {endpoint}: {exc.message}") from None
    first = frames[0]
    if isinstance(first, Error):
        raise error_from_code(first.code, first.message, first.retry_after_ms)
    assert isinstance(first, Welcome)  # the state table admits nothing else
    transport.set_peer_limit(first.max_frame_bytes)  # a WebSocket packs messages up to the broker's limit
    conn.max_frame_bytes = max(first.max_frame_bytes, DEFAULT_MAX_FRAME_BYTES) + RECEIVE_SLACK_BYTES
    return conn, first, frames[1:]


class Outbound:
    """What the client wants written that outlives a link: ACK ids, STATUS_ACK seqs, and the writer's wake-up call."""

    __slots__ = ("_wake", "ack_ids", "status_seqs")

    def __init__(self) -> None:
        self.ack_ids: list[str] = []
        self.status_seqs: list[int] = []
        self._wake = trio.Event()

    def wake(self) -> None:
        """Something was queued: the writer runs."""
        self._wake.set()

    def add_acks(self, ids: list[str]) -> None:
        self.ack_ids += ids
        self._wake.set()

    def add_status_acks(self, seqs: list[int]) -> None:
        self.status_seqs += seqs
        self._wake.set()

    @property
    def has_acks(self) -> bool:
        """Whether ACK ids or STATUS_ACK seqs wait to be written."""
        return bool(self.ack_ids or self.status_seqs)

    def _rearm(self) -> trio.Event:
        self._wake = trio.Event()
        return self._wake

    def _take_acks(self) -> tuple[list[str], list[int]]:
        ids, self.ack_ids = self.ack_ids, []
        seqs, self.status_seqs = self.status_seqs, []
        return ids, seqs

    def _give_back(self, ids: list[str], seqs: list[int]) -> None:
        """ACK ids and STATUS_ACK seqs a failed write took: first on the next link."""
        if ids:
            self.ack_ids[:0] = ids
        if seqs:
            self.status_seqs[:0] = seqs


class Link:
    """One connection from WELCOME to its end (see the module docstring)."""

    __slots__ = (
        "_bye_sent",
        "_bye_wanted",
        "_ctrl",
        "_inbox",
        "_outbound",
        "_outbox",
        "_own_answers",
        "_pending",
        "_refreshed",
        "_statuses",
        "_token_source",
        "_unwritten",
        "_writing",
        "bye_written",
        "conn",
        "ended",
        "endpoint",
        "expires_at",
        "gen",
        "last_rx",
        "last_tx",
        "limit",
        "published",
        "quiet",
        "reason",
        "scope",
        "transport",
        "welcome",
    )

    def __init__(
        self,
        transport: Transport,
        conn: Connection,
        welcome: Welcome,
        *,
        gen: int,
        endpoint: Endpoint,
        outbound: Outbound,
        pending: PendingTable,
        inbox: EnvelopeOpener,
        statuses: StatusBox,
        key_put: KeyPut | None = None,
        token_source: TokenSource | None = None,
    ) -> None:
        self.transport = transport
        self.conn = conn
        self.welcome = welcome
        self.gen = gen
        self.endpoint = endpoint
        self.limit = welcome.max_frame_bytes + 4
        """The largest frame (prefix included) the broker takes."""
        self.scope = trio.CancelScope()
        self.reason: RelayError | None = None
        self.bye_written = False
        self.quiet = trio.Event()
        """Set once BYE is written or the link has ended: nothing more will go out on it."""
        self.ended = trio.Event()
        """Set once the link has ended (after BYE: once the broker has closed the connection, having applied
        every frame before BYE)."""
        self.last_rx = self.last_tx = trio.current_time()
        self.expires_at = self.last_rx + welcome.expires_in_s
        """When (trio's clock) the broker ends the session for its token's expiry, unless refreshed."""
        self._token_source = token_source
        self._refreshed: trio.Event | None = None
        """Set by the reader when the REFRESH in flight is answered."""
        self._outbound = outbound
        self._pending = pending
        self._inbox = inbox
        self._statuses = statuses
        self._ctrl: list[Frame] = []
        self._outbox: list[bytes] = []
        self._unwritten = conn.send(key_put) if key_put is not None else b""
        """The next bytes on the wire: this device's KEY_PUT at first (before any ACK, request or SEND of the link,
        the direct write included), later the rest of a direct write the transport did not take."""
        self._own_answers = 1 if key_put is not None else 0
        """KEY_PUT_RESULTs owed to the link's own KEY_PUT: the broker answers in order, so the first answer."""
        self.published = trio.Event()
        """Set once the broker answered the link's KEY_PUT (the record is in the directory), or the link ended;
        at once without a KEY_PUT."""
        if key_put is None:
            self.published.set()
        self._writing = False
        self._bye_wanted = False
        self._bye_sent = False

    # ------------------------------------------------------------ sending (from the client's tasks)

    @property
    def writing(self) -> bool:
        """Whether the writer is in ``send_all`` right now."""
        return self._writing

    def encode_sends(self, items: Sequence[SendItem]) -> list[bytes]:
        """The SEND frames for ``items``, encoded by this link's state machine; [] if the link is over.
        Raises ValueError for an invalid message, RelayError(FRAME_TOO_LARGE) for one the broker cannot take."""
        conn, limit = self.conn, self.limit
        out: list[bytes] = []
        for mid, to, body, ttl_s, notify in items:
            try:
                data = conn.send_send(mid, to, body, ttl_s, notify=notify)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"invalid message {mid!r}: {exc}") from None
            if not data:
                return []
            if len(data) > limit:
                raise _too_large(mid, len(data), limit)
            out.append(data)
        return out

    def write_sends(self, encoded: list[bytes]) -> None:
        """Write encoded SENDs now if the writer is idle (the one direct write), else leave them to it."""
        self._outbox += encoded
        if self._writing or self._unwritten:
            self._outbound.wake()
            return
        outbox, self._outbox = self._outbox, []
        data = outbox[0] if len(outbox) == 1 else b"".join(outbox)
        sent = self.transport.send_some_nowait(data)
        if sent < len(data):
            self._unwritten = data[sent:]
            self._outbound.wake()
        else:
            self.last_tx = trio.current_time()

    def resend_pending(self) -> None:
        """Queue every SEND still waiting for its receipt (a new link: SEND is idempotent). A batch with a
        message this broker cannot take fails with FRAME_TOO_LARGE and none of it goes out again."""
        pending = self._pending
        encoded = []
        for mid, (to, body, ttl_s, notify, batch, _index) in pending.sends():
            try:
                encoded.append((batch, self.encode_sends([(mid, to, body, ttl_s, notify)])))
            except RelayError as exc:
                pending.drop_batch(batch, exc)
        self._outbox += [data for batch, frames in encoded if batch.error is None for data in frames]
        self._outbound.wake()

    def queue(self, frame: Frame) -> None:
        """Queue a control frame (PULL, PING) for the writer."""
        self._ctrl.append(frame)
        self._outbound.wake()

    def say_bye(self) -> None:
        """Queue BYE, the last frame this link writes."""
        self._bye_wanted = True
        self._outbound.wake()

    def end(self, reason: RelayError) -> None:
        """End the link (the first reason given is the one reported)."""
        if self.reason is None:
            self.reason = reason
        self.scope.cancel()

    # ------------------------------------------------------------ running

    async def run(self, leftover: list[Frame]) -> RelayError:
        """Serve the link until it ends (the reader acts on ``leftover`` first); returns why it ended."""
        try:
            with self.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._guard, self._write_loop)
                    nursery.start_soon(self._guard, self._watchdog)
                    if self._token_source is not None:
                        nursery.start_soon(self._guard, self._refresher)
                    await self._guard(self._read_loop, leftover)
        finally:
            self.quiet.set()
            self.published.set()
            self.ended.set()
        return self.reason or ConnectionLost(f"the connection to {self.endpoint} ended")

    async def _guard(self, part: Callable[..., Awaitable[None]], *args: object) -> None:
        """Run one task; whatever ends it ends the link, with the reason translated once."""
        try:
            await part(*args)
        except TransportClosed as exc:
            self.end(ConnectionLost(f"connection to {self.endpoint} lost: {exc}"))
        except RemoteProtocolError as exc:
            self.end(ProtocolViolation(exc.code, f"the broker sent an invalid frame: {exc.message}"))
        except RelayError as exc:
            self.end(exc)

    # ------------------------------------------------------------ the writer

    async def _write_loop(self) -> None:
        outbound = self._outbound
        transport = self.transport
        while True:
            wake = outbound._rearm()
            acks, status_acks = outbound._take_acks()
            data = self._collect(acks, status_acks)
            if not data:
                await wake.wait()
                continue
            self._writing = True
            try:
                await transport.send_all(data)
            except BaseException:
                outbound._give_back(acks, status_acks)  # unwritten (or half-written) ACKs go out on the next link
                raise
            finally:
                self._writing = False
            self.last_tx = trio.current_time()
            if self._bye_sent:
                self.bye_written = True
                self.quiet.set()
                return

    def _collect(self, acks: list[str], status_acks: list[int]) -> bytes:
        """Everything queued, as one byte string: the unwritten rest, ACKs, STATUS_ACKs, control frames,
        requests, SENDs, BYE.

        ``acks`` and ``status_acks`` are what was taken for this write; both are emptied if they could not
        be encoded."""
        conn = self.conn
        parts: list[bytes] = []
        if self._unwritten:
            parts.append(self._unwritten)
            self._unwritten = b""
        frames = [
            conn.send(Ack(ids=tuple(acks[i : i + MAX_ACK_IDS_PER_FRAME])))
            for i in range(0, len(acks), MAX_ACK_IDS_PER_FRAME)
        ] + [
            conn.send(StatusAck(seqs=tuple(status_acks[i : i + MAX_ACK_IDS_PER_FRAME])))
            for i in range(0, len(status_acks), MAX_ACK_IDS_PER_FRAME)
        ]
        if frames and frames[0]:
            parts += frames
        elif frames:  # the connection is over (b"" once CLOSED): they go out on the next link
            self._outbound._give_back(acks[:], status_acks[:])
            acks.clear()
            status_acks.clear()
        if self._ctrl:
            ctrl, self._ctrl = self._ctrl, []
            parts += [conn.send(frame) for frame in ctrl]
        parts += [conn.send(req.frame) for req in self._pending.take_requests()]
        if self._outbox:
            parts += self._outbox
            self._outbox = []
        if self._bye_wanted and not self._bye_sent:
            parts.append(conn.send(Bye()))
            self._bye_sent = True
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _watchdog(self) -> None:
        """PING after ``keepalive_s / 3`` without writing; end the link after ``keepalive_s`` without receiving.
        Judged from timestamps a few times per period, so no read or write pays for a timer of its own."""
        keepalive_s = float(self.welcome.keepalive_s)
        idle_s = max(keepalive_s / 3, 0.01)
        while True:
            await trio.sleep(idle_s / 4)
            now = trio.current_time()
            if now - self.last_rx >= keepalive_s:
                raise ConnectionLost(f"nothing received from {self.endpoint} for {keepalive_s:g} s")
            if now - self.last_tx >= idle_s:
                self.last_tx = now
                self.queue(Ping())

    async def _refresher(self) -> None:
        """Send a newer token once three quarters of the session's time have passed (see the module docstring)."""
        source = self._token_source
        assert source is not None
        started = trio.current_time()
        due = started + 0.75 * (self.expires_at - started)
        while True:
            await trio.sleep_until(due)
            try:
                token = await source()
            except Exception:
                now = trio.current_time()
                log.exception(
                    "refresh_token failed; %.0f s left before the session's token expires", self.expires_at - now
                )
                due = now + max(MIN_REFRESH_INTERVAL_S, (self.expires_at - now) / 4)
                continue
            self._refreshed = answered = trio.Event()
            self.queue(Refresh(token=token))
            await answered.wait()
            now = trio.current_time()
            due = now + max(MIN_REFRESH_INTERVAL_S, 0.75 * (self.expires_at - now))

    # ------------------------------------------------------------ the reader

    async def _read_loop(self, frames: list[Frame]) -> None:
        transport = self.transport
        conn = self.conn
        while True:
            if frames:
                self._handle(frames)
            data = await transport.receive_some()
            self.last_rx = trio.current_time()
            if not data:
                raise ConnectionLost(f"{self.endpoint} closed the connection")
            frames = conn.receive_data(data)  # [] once CLOSED (after BYE): stragglers are ignored

    def _handle(self, frames: list[Frame]) -> None:
        """Act on one chunk's frames, in order, without awaiting; deliveries go to the inbox together."""
        deliveries: list[Delivery] = []
        statuses: list[StatusReport] = []
        release = self._pending.release
        try:
            for f in frames:
                kind = type(f)
                if kind is Deliver:
                    d: Deliver = f  # type: ignore[assignment]
                    deliveries.append(Delivery(d.id, d.sender, d.sent_at, d.expires_at, d.attempt, d.body))
                elif kind is Receipt:
                    release(f)  # type: ignore[arg-type]
                elif kind is StatusReport:
                    statuses.append(f)  # type: ignore[arg-type]
                else:
                    if deliveries:
                        self._inbox.accept(deliveries)
                        deliveries = []
                    if statuses:  # before a DRAINED: ``statuses(until_drained=True)`` includes them
                        self._statuses.accept(statuses)
                        statuses = []
                    self._on_other(f)
        finally:
            if deliveries:
                self._inbox.accept(deliveries)
            if statuses:
                self._statuses.accept(statuses)

    def _on_other(self, f: Frame) -> None:
        """A frame other than DELIVER and RECEIPT. Raises the error a closing ERROR names."""
        if isinstance(f, Drained):
            self._inbox.drained(self.gen, f.pending)
        elif isinstance(f, Refreshed):
            self.expires_at = trio.current_time() + f.expires_in_s
            log.info("token refreshed on %s: %d s left", self.endpoint, f.expires_in_s)
            if self._refreshed is not None:
                self._refreshed.set()
                self._refreshed = None
        elif isinstance(f, StatsResult | CleanupResult | KeyPutResult | KeyGetResult):
            if self._own_answers:
                self._own_answers -= 1
                self.published.set()
                if isinstance(f, KeyPutResult) and f.code is not None:
                    log.error("the broker refused this device's key record %s (code %s)", f.kid, f.code)
            elif not self._pending.answer(f, None):
                log.warning("unexpected %s from %s: no request outstanding", f.TYPE, self.endpoint)
        elif isinstance(f, Error):
            error = error_from_code(f.code, f.message, f.retry_after_ms)
            if f.close:
                raise error
            if f.code == ErrorCode.FORBIDDEN and self._pending.answers_expected:
                self._pending.answer(None, error)  # the only frames we let reach the broker that it may forbid
            else:
                log.warning("error from %s: %s", self.endpoint, error)
        elif not isinstance(f, Pong):
            log.warning("unexpected %s from %s", f.TYPE, self.endpoint)
