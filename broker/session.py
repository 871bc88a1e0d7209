"""One session per connection: handshake, a reader, a serialised writer, and the mailbox task.

Theory of operation. ``Session.run`` owns three tasks in one nursery:

- the **reader** (in the session's work scope) feeds received bytes to the sans-IO
  :class:`wire.Connection` and acts on whole batches of frames: consecutive SENDs go to
  the broker's router in one store call, consecutive ACKs in another;
- the **mailbox task** (one per active recipient, also in the work scope) pulls queued
  messages from the store while the in-flight window and the outbound buffer have room,
  and wakes whenever a connect, an ACK, a PULL or freed buffer space may have changed
  that. When the store never yields (``store.synchronous``, the in-memory store), the
  router runs the same step (:meth:`Session.deliver_now`) from the sender's task for a new
  message, since nothing can interleave with it: a task switch less per message;
- the **writer** takes everything queued for the connection and writes it in one call,
  so frames produced while a write is in progress are coalesced into the next one.

Every frame goes through :meth:`Session._push_all`. When nothing is queued and no write
is in progress, frames go straight to the socket (``transport.try_send``, never
blocking); whatever the socket does not take at once is queued for the writer, so order
is kept. The outbound buffer is bounded: the
reader stops reading and the mailbox task stops fetching at half of
``max_outbound_bytes`` (and fetches at most a quarter of it at once); if the buffer still
passes the full figure, or a single write stalls for ``keepalive_s``, the peer is a slow
consumer and is cut off. Idleness and stalls are judged by a watchdog task from
timestamps, so no read or write sets a timer of its own. Whatever ends
the session, its un-ACKed deliveries go back to the queue (``store.release``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import trio

from wire import (
    PROTOCOL_VERSION,
    Ack,
    Bye,
    Cleanup,
    CleanupResult,
    Connection,
    Drained,
    Error,
    ErrorCode,
    Frame,
    Hello,
    Ping,
    Pong,
    Pull,
    RemoteProtocolError,
    Role,
    Send,
    State,
    Stats,
    StatsResult,
    Welcome,
    encode_deliver,
    encode_frame,
    encode_receipt,
)

from .auth import AuthError, Identity
from .store.base import AckResult
from .transport import Transport, TransportClosed

if TYPE_CHECKING:
    from .server import Broker

__all__ = ["Session"]

log = logging.getLogger(__name__)

_PONG = encode_frame(Pong())
TAKEOVER_WAIT_S = 10.0
"""Longest a new session waits for the one it replaces to release the mailbox."""


class Session:
    """A client connection from accept to close. Created and run by :class:`~broker.server.Broker`."""

    def __init__(self, broker: Broker, transport: Transport, session_id: str) -> None:
        self.broker = broker
        self.transport = transport
        self.id = session_id
        config = broker.config
        self.conn = Connection(Role.BROKER, max_frame_bytes=config.max_frame_bytes)
        self.identity: Identity | None = None
        self.mailbox: str | None = None
        self.inflight = 0
        self.predecessor: Session | None = None
        self.finished = trio.Event()
        self._max_inflight = config.max_inflight
        self._max_outbound = config.max_outbound_bytes
        self._soft_outbound = config.max_outbound_bytes // 2
        # Deliveries fetched at once: with the reader's share this keeps unsent data under the cap.
        self._fetch_bytes = config.max_outbound_bytes // 4
        self._out: list[bytes] = []
        self._out_bytes = 0  # bytes in _out
        self._unsent = 0  # bytes in _out plus bytes of the write in progress
        self._write_signal = trio.Event()
        self._space_signal = trio.Event()
        self._deliver_signal = trio.Event()
        self._drain_wanted = False
        self._resync = False
        self._closing = False
        self._work_scope = trio.CancelScope()
        self._writer_scope = trio.CancelScope()
        self._last_rx = trio.current_time()
        self._reading_paused = False
        self._deliver_blocked = False  # delivery stopped on a full window or outbound buffer
        self._inline = broker.store.synchronous
        self._byte_stream = transport.byte_stream
        self._writing_since: float | None = None

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.mailbox or (self.identity and self.identity.name) or '-'}>"

    # ------------------------------------------------------------ control from other tasks

    def acked(self, result: AckResult) -> None:
        """Messages of this mailbox were ACKed (here or over another transport): the window has room."""
        self.inflight = result.inflight
        if self._deliver_blocked and self.inflight < self._max_inflight:
            self._deliver_signal.set()

    def resync(self) -> None:
        """The store removed messages behind our back (expiry): recount the in-flight window."""
        self._resync = True
        self._deliver_signal.set()

    def close(self, code: ErrorCode | None, message: str = "") -> None:
        """End the session: send ERROR(code, close) if a code is given, flush briefly, close."""
        if self._closing:
            return
        self._closing = True
        if code is not None:
            data = self.conn.send_error(code, message)
            if data:
                self._out.append(data)
                self._out_bytes += len(data)
                self._unsent += len(data)
            log.info("%s closing: %s %s", self.id, code.name, message)
        self._work_scope.cancel()
        self._writer_scope.deadline = trio.current_time() + self.broker.config.shutdown_grace_s
        self._write_signal.set()

    # ------------------------------------------------------------ output

    def _push(self, data: bytes) -> None:
        """Send one encoded frame (see :meth:`_push_all`)."""
        self._push_all([data])

    def _push_all(self, frames: list[bytes]) -> None:
        """Send encoded frames: straight to the socket if the writer is idle and the socket takes
        them without blocking, otherwise queued for the writer (dropped once the session is closing)."""
        if self._closing:
            return
        if self._byte_stream and not self._out and self._writing_since is None:
            # Nothing queued and no write in progress, so order is kept; frames the socket buffer
            # takes at once cost no task switch (what online latency is made of).
            data = frames[0] if len(frames) == 1 else b"".join(frames)
            sent = self.transport.try_send(data)
            if sent == len(data):
                return
            frames = [data[sent:]]  # a byte stream: any split of it will do
        self._out += frames
        n = sum(map(len, frames)) if len(frames) > 1 else len(frames[0])
        self._out_bytes += n
        self._unsent += n
        if self._unsent > self._max_outbound:
            self.close(ErrorCode.SLOW_CONSUMER, f"more than {self._max_outbound} bytes unsent: reading too slowly")
        self._write_signal.set()

    def _send(self, frame: Frame) -> None:
        if not self._closing:
            self._push(self.conn.send(frame))

    async def _write_loop(self) -> None:
        transport = self.transport
        with self._writer_scope:
            while True:
                if not self._out:
                    if self._closing:
                        return
                    await self._write_signal.wait()
                    self._write_signal = trio.Event()
                    continue
                frames, nbytes = self._out, self._out_bytes
                self._out, self._out_bytes = [], 0
                self._writing_since = trio.current_time()  # the watchdog cuts off a write that stalls
                try:
                    await transport.send_frames(frames)
                except TransportClosed:
                    self._closing = True
                    self._work_scope.cancel()
                    return
                self._writing_since = None
                self._unsent -= nbytes
                if self._unsent < self._soft_outbound:
                    # Wake only who stopped for space: a wakeup per write costs more than the write.
                    if self._reading_paused:
                        self._space_signal.set()
                    if self._deliver_blocked:
                        self._deliver_signal.set()

    async def _wait_for_space(self) -> None:
        while self._unsent >= self._soft_outbound:
            await self._space_signal.wait()
            self._space_signal = trio.Event()

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Serve the connection until it ends. Never raises for anything the peer does."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_loop)
                with self._work_scope:
                    try:
                        await self._serve()
                    except* TransportClosed:
                        pass
                    except* Exception:
                        # A broker bug must end this session only, never the broker.
                        log.exception("%s internal error", self.id)
                        self.close(ErrorCode.INTERNAL_ERROR, "internal broker error")
                if not self._closing:
                    self.close(None)
        finally:
            with trio.CancelScope(shield=True):
                await self._cleanup()

    async def _cleanup(self) -> None:
        broker = self.broker
        try:
            if self.predecessor is not None:
                with trio.move_on_after(TAKEOVER_WAIT_S):
                    await self.predecessor.finished.wait()
            if self.mailbox is not None:
                if broker.presence.get(self.mailbox) is self:
                    del broker.presence[self.mailbox]
                with trio.move_on_after(self.broker.config.shutdown_grace_s):
                    await broker.store.release(self.mailbox)
        except Exception:
            log.exception("%s cleanup failed", self.id)
        finally:
            await self.transport.aclose()
            broker.session_ended(self)
            self.finished.set()

    async def _serve(self) -> None:
        config = self.broker.config
        hello: Hello | None = None
        with trio.move_on_after(config.handshake_timeout_s):
            hello = await self._receive_hello()
        if hello is None:
            if not self._closing:
                self.close(ErrorCode.HANDSHAKE_TIMEOUT, f"no HELLO within {config.handshake_timeout_s:g} s")
            return
        if hello.version != PROTOCOL_VERSION:
            self.close(ErrorCode.UNSUPPORTED_VERSION, f"protocol version {hello.version} unsupported; use 1")
            return
        try:
            identity = self.broker.auth.verify(hello.token)
        except AuthError as exc:
            self.close(exc.code, exc.message)
            return
        self.identity = identity
        if not identity.operator:
            self.mailbox = identity.name
            await self.broker.attach(self)
            pending = await self.broker.store.pending(identity.name)
        else:
            pending = 0
        self._send(
            Welcome(
                version=PROTOCOL_VERSION,
                session=self.id,
                mailbox=self.mailbox,
                pending=pending,
                max_frame_bytes=config.max_frame_bytes,
                max_inflight=config.max_inflight,
                max_recipients=config.max_recipients,
                default_ttl_s=config.default_ttl_s,
                max_ttl_s=config.max_ttl_s,
                keepalive_s=max(1, int(config.keepalive_s)),
            )
        )
        self.transport.open_limit(config.max_frame_bytes)
        log.info("%s open: %s%s", self.id, identity.name, " (operator)" if identity.operator else "")
        async with trio.open_nursery() as nursery:
            if self.mailbox is not None:
                self._drain_wanted = True
                self._deliver_signal.set()
                nursery.start_soon(self._deliver_loop)
            nursery.start_soon(self._watchdog)
            await self._read_loop()
            nursery.cancel_scope.cancel()

    async def _watchdog(self) -> None:
        """Close an idle connection (KEEPALIVE_TIMEOUT) or one whose write stalls (SLOW_CONSUMER).

        Both are judged from timestamps the reader and writer keep, a few times per
        ``keepalive_s``, so reading and writing pay for no timer of their own.
        """
        limit = self.broker.config.keepalive_s
        while True:
            await trio.sleep(limit / 4)
            now = trio.current_time()
            since = self._writing_since
            if since is not None and now - since >= limit:
                log.info("%s write stalled for %.0f s: slow consumer", self.id, now - since)
                self.close(ErrorCode.SLOW_CONSUMER, "writes stalled: reading too slowly")
                self._writer_scope.cancel()  # the stalled write cannot carry the ERROR: give up on it
                return
            if not self._reading_paused and now - self._last_rx >= limit:
                self.close(ErrorCode.KEEPALIVE_TIMEOUT, f"nothing received for {limit:g} s")
                return

    async def _receive(self) -> list[Frame] | None:
        """The frames of the next chunk from the peer (maybe none yet).

        None at the end of the stream, or when the peer broke the protocol (in the
        transport's framing or in the frames): then the session is closing with its code.
        """
        try:
            data = await self.transport.receive_some()
            if not data:
                return None
            return self.conn.receive_data(data)
        except RemoteProtocolError as exc:
            log.info("%s protocol error from peer: %s %s", self.id, exc.code.name, exc.message)
            self.close(exc.code, exc.message)
            return None

    async def _receive_hello(self) -> Hello | None:
        while True:
            frames = await self._receive()
            if frames is None:
                return None
            if frames:
                # The state table admits only HELLO first, and nothing after it before WELCOME.
                hello = frames[0]
                assert isinstance(hello, Hello)
                return hello

    # ------------------------------------------------------------ input

    async def _read_loop(self) -> None:
        while True:
            if self._unsent >= self._soft_outbound:
                self._reading_paused = True
                await self._wait_for_space()
                self._reading_paused = False
                self._last_rx = trio.current_time()  # paused by us, not idle
            frames = await self._receive()
            self._last_rx = trio.current_time()
            if frames is None:
                return
            if frames:
                await self._handle(frames)
            if self.conn.state is State.CLOSED:
                return

    async def _handle(self, frames: list[Frame]) -> None:
        n = len(frames)
        i = 0
        while i < n:
            frame = frames[i]
            kind = type(frame)
            if kind is Send or kind is Ack:
                j = i + 1
                while j < n and type(frames[j]) is kind:
                    j += 1
                if self.mailbox is None:
                    self._forbidden(f"{frame.TYPE} needs a mailbox; operator sessions have none")
                elif kind is Send:
                    await self._on_sends(frames[i:j])  # type: ignore[arg-type]
                else:
                    await self._on_acks(frames[i:j])  # type: ignore[arg-type]
                i = j
                continue
            if kind is Ping:
                self._push(_PONG)
            elif kind is Pull:
                if self.mailbox is None:
                    self._forbidden("pull needs a mailbox; operator sessions have none")
                else:
                    await self._on_pull()
            elif kind is Bye:
                return
            elif kind is Stats or kind is Cleanup:
                if self.identity is None or not self.identity.operator:
                    self._forbidden(f"{frame.TYPE} needs an operator token")
                elif kind is Stats:
                    self._send(StatsResult(stats=await self.broker.statistics()))
                else:
                    self._send(CleanupResult(purged=await self.broker.cleanup()))
            i += 1

    def _forbidden(self, message: str) -> None:
        self._send(Error(code=int(ErrorCode.FORBIDDEN), message=message, close=False))  # cut to fit by conn

    async def _on_sends(self, sends: Sequence[Send]) -> None:
        assert self.mailbox is not None
        receipts = await self.broker.route(self.mailbox, sends)
        if self.conn.state is State.OPEN:  # the state table allows RECEIPT exactly in OPEN
            self._push_all([encode_receipt(r.id, r.results, r.code) for r in receipts])

    async def _on_acks(self, acks: Sequence[Ack]) -> None:
        assert self.mailbox is not None
        ids = acks[0].ids if len(acks) == 1 else [i for ack in acks for i in ack.ids]
        await self.broker.acknowledge(self.mailbox, ids)

    async def _on_pull(self) -> None:
        assert self.mailbox is not None
        await self.broker.store.release(self.mailbox)
        self.inflight = 0
        self._drain_wanted = True
        self._deliver_signal.set()

    # ------------------------------------------------------------ delivery

    async def deliver_now(self) -> None:
        """New messages were queued for this mailbox (called by the router, from the sender's task).

        With a store whose calls never yield (``store.synchronous``), nothing can interleave, so
        the caller's task delivers them at once: one task switch less per message, which is what
        online latency is made of. Otherwise the mailbox task is woken to do it.
        """
        if self._closing:
            return  # it stays queued for the next session: the mailbox task is cancelled, writes are dropped
        if self._inline and self.conn.state is State.OPEN:
            await self._pump()
        else:
            self._deliver_signal.set()

    async def _deliver_loop(self) -> None:
        """The mailbox task: deliver whenever woken (connect, PULL, ACKs or space after a stop, expiry)."""
        while True:
            await self._deliver_signal.wait()
            self._deliver_signal = trio.Event()
            await self._pump()

    async def _pump(self) -> None:
        """Hand queued messages to the writer while the in-flight window and the outbound buffer have room."""
        mailbox = self.mailbox
        assert mailbox is not None
        store = self.broker.store
        counters = self.broker.counters
        window = self._max_inflight
        self._deliver_blocked = False
        while True:
            room = window - self.inflight
            if self._unsent >= self._soft_outbound or (room <= 0 and not self._resync):
                self._deliver_blocked = True  # the writer (space) or an ACK (window) wakes the mailbox task
                return
            self._resync = False
            batch = await store.fetch_many(mailbox, max(room, 0), self._fetch_bytes)
            self.inflight = batch.inflight
            messages = batch.messages
            if messages:
                if self.conn.state is not State.OPEN:
                    return  # closing: what was fetched goes back to the queue at cleanup
                self._push_all(
                    [encode_deliver(m.id, m.sender, m.sent_at, m.expires_at, m.attempt, m.body) for m in messages]
                )
                counters.delivered += len(messages)
                redelivered = sum(m.attempt > 1 for m in messages)
                if redelivered:
                    counters.redelivered += redelivered
            if batch.queued == 0:
                if self._drain_wanted:
                    self._drain_wanted = False
                    self._send(Drained(pending=batch.inflight))
                return
            if not messages and room > 0:
                return  # (a resync fetch with no room only recounted the window: go round again)
