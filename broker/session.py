"""One session per connection: the handshake, then a reader that dispatches frames.

Theory of operation. :meth:`Session.run` owns three tasks in one nursery:

- the **reader** (in the session's work scope) does the handshake (HELLO, token, claim
  of the mailbox, WELCOME), then feeds received bytes to the sans-IO
  :class:`wire.Connection` and acts on the frames: each run of consecutive frames of one
  kind goes to its handler from one dispatch table, after :func:`broker.authz.refusal`
  has said the session's identity may send it (consecutive SENDs go to the router in one
  store call, consecutive ACKs in another, consecutive STATUS_ACKs in a third);
- the **mailbox task** (a mailbox session only; :class:`~broker.delivery.Delivery`)
  delivers queued messages within the in-flight window, and the mailbox's delivery statuses;
- the **writer** (:class:`~broker.outbox.Outbox`) writes what the others push, coalesced.

Beside them, from WELCOME on, a **token timer** ends the session with TOKEN_EXPIRED when the
token that opened it expires (its ``exp`` plus the leeway): a REFRESH with a newer token for
the same identity moves that deadline (one cancel scope's deadline, so a refresh costs no task).

A session knows the router, presence, the statistics, the store (for its delivery pump),
the configuration and the authenticator; never the server. It is its mailbox's
:class:`~broker.presence.Subscriber`: presence reaches it by mailbox to wake it (for
messages, or for statuses), make it recount, or kick it on takeover. The reader stops
reading while the outbox is past its soft limit. A watchdog task closes an idle connection
(KEEPALIVE_TIMEOUT) or one whose write stalls (SLOW_CONSUMER), judged from timestamps, so
no read or write sets a timer. Whatever ends the session, its claim is released and its
un-ACKed deliveries go back to the queue.

A store that cannot be reached (the store's or presence's OSError) ends the session only
at the handshake (ERROR 5002: the claim cannot be made), at CLEANUP and at KEY_GET; otherwise the
session stays up: SENDs get RECEIPTs with 3008 (the router), STATS answers the node's
figures (the statistics), KEY_PUTs get KEY_PUT_RESULTs with 3008 (the router), the delivery
pump waits for the store, and an ACK the store did
not take is kept (at most ``max_inflight`` ids: beyond that the oldest are let go and
their messages redelivered later, which a client's (sender, id) de-duplication absorbs)
and applied again with the session's next ACK and by a retry task (one per session, only
while ids are kept) once the store answers, and a last time as the session ends. A
STATUS_ACK the store did not take is not kept: its statuses are sent again at the next
connect or PULL (a client records a status idempotently, by its message and recipient).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import cast

import trio

from wire import (
    PROTOCOL_VERSION,
    Ack,
    Bye,
    Cleanup,
    CleanupResult,
    Connection,
    Error,
    ErrorCode,
    Frame,
    Hello,
    KeyGet,
    KeyGetResult,
    KeyPut,
    KeyPutResult,
    Ping,
    Pong,
    Pull,
    Refresh,
    Refreshed,
    RemoteProtocolError,
    Role,
    Send,
    State,
    Stats,
    StatsResult,
    StatusAck,
    Welcome,
    encode_frame,
)
from wire.transport import Transport, TransportClosed

from . import authz
from .auth import Authenticator, AuthError, Identity
from .config import BrokerConfig
from .delivery import Delivery
from .health import StoreHealth
from .limits import Limiter, retry_after_ms
from .logs import current_session, session_log
from .outbox import Outbox
from .presence import Presence
from .router import Router
from .stats import Stats as BrokerStats  # (wire.Stats is the STATS frame)
from .store.base import Claim, Store

__all__ = ["Session"]

log = logging.getLogger(__name__)

_PONG = encode_frame(Pong())

Handler = Callable[["Session", Sequence[Frame]], Awaitable[bool]]
"""A frame handler: gets a run of frames of its kind; False stops reading (BYE)."""


class Session:
    """A client connection from accept to close. Created and run by :class:`~broker.server.Broker`."""

    def __init__(
        self,
        transport: Transport,
        session_id: str,
        *,
        config: BrokerConfig,
        auth: Authenticator,
        router: Router,
        presence: Presence,
        stats: BrokerStats,
        store: Store,
        limiter: Limiter | None = None,
        address: str | None = None,
    ) -> None:
        self.transport = transport
        self.address = address
        """The peer's IP address (None: not a socket), which the abuse limits key on."""
        self._limiter = limiter
        self.id = session_id
        self._log = session_log(log, session_id)  # its own events name it, whichever task logs them
        self.config = config
        self._auth = auth
        self._router = router
        self._presence = presence
        self._stats = stats
        self._health: StoreHealth = stats.health
        self._counters = stats.counters
        self._store = store
        self.conn = Connection(Role.BROKER, max_frame_bytes=config.max_frame_bytes)
        self.outbox = Outbox(
            transport, max_bytes=config.max_outbound_bytes, on_close=self.close, counters=stats.counters
        )
        self.identity: Identity | None = None
        self.mailbox: str | None = None
        self.claim: Claim | None = None
        self.delivery: Delivery | None = None
        self.finished = trio.Event()
        self.closing = False
        self._work_scope = trio.CancelScope()
        self._token_scope = trio.CancelScope()  # its deadline: when the session's token ends it (_expire)
        self._last_rx = trio.current_time()
        self._reading_paused = False
        self._kept_acks: dict[str, None] = {}  # ACKed ids the store has not taken yet, oldest first
        self._nursery: trio.Nursery | None = None  # the reader's, for the ACK retry task
        self._retrying_acks = False

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.mailbox or (self.identity and self.identity.name) or '-'}>"

    # ------------------------------------------------------------ as presence's subscriber

    async def wake(self) -> None:
        """New messages were queued for this mailbox (from the sender's task)."""
        if self.delivery is not None:
            await self.delivery.wake()

    def resync(self) -> None:
        """The store removed messages behind our back: recount the in-flight window."""
        if self.delivery is not None:
            self.delivery.resync()

    def wake_statuses(self) -> None:
        """Delivery statuses were queued for this mailbox."""
        if self.delivery is not None:
            self.delivery.wake_statuses()

    def kick(self, code: ErrorCode, message: str) -> None:
        """Close with ERROR(code, close): another session took the mailbox over."""
        self.close(code, message)

    def close(self, code: ErrorCode | None, message: str = "", *, retry_after_ms: int | None = None) -> None:
        """End the session: send ERROR(code, close) if a code is given (with ``retry_after_ms`` if given), flush
        briefly, close. Never raises."""
        if self.closing:
            return
        self.closing = True
        final = b""
        if code is not None:
            final = self.conn.send_error(code, message, retry_after_ms=retry_after_ms)
            self._log.info(
                "closing: %s %s", code.name, message, extra={"fields": {"code": int(code), "reason": message}}
            )
        self.outbox.close(final, grace_s=self.config.shutdown_grace_s)
        self._work_scope.cancel()

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Serve the connection until it ends. Never raises for anything the peer does.

        Everything logged from this task and the tasks it starts (the outbox, the delivery pump) names this session
        (:data:`broker.logs.current_session`)."""
        logging_as = current_session.set(self.id)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.outbox.run)
                with self._work_scope:
                    try:
                        await self._serve()
                    except* TransportClosed:
                        pass
                    except* OSError as group:
                        # Transports raise TransportClosed: an OSError here is the store's or presence's (Redis),
                        # at the handshake or CLEANUP (the health logs the outage once; close() logs the code).
                        failure = group.exceptions[0]
                        self._health.failed(failure if isinstance(failure, OSError) else OSError(str(failure)))
                        self.close(ErrorCode.STORE_UNAVAILABLE, "the broker cannot reach its store; retry later")
                    except* Exception:
                        # A broker bug must end this session only, never the broker.
                        self._log.exception("internal error")
                        self.close(ErrorCode.INTERNAL_ERROR, "internal broker error")
                self.close(None)
        finally:
            with trio.CancelScope(shield=True):
                await self._cleanup()
            current_session.reset(logging_as)

    async def _cleanup(self) -> None:
        try:
            if self.mailbox is not None and self.claim is not None:
                await self._presence.release(self.mailbox, self.claim)
                with trio.move_on_after(self.config.shutdown_grace_s):
                    await self._finish_with_store()
        except Exception:
            self._log.exception("cleanup failed")
        finally:
            await self.transport.aclose()
            self.finished.set()

    async def _finish_with_store(self) -> None:
        """The session ends: apply the ACKs still kept, then give un-ACKed deliveries back to the queue.

        If the store cannot be reached, the kept ACKs' messages are redelivered later (at least once) and
        the deliveries go back to the queue at the mailbox's next claim (its fence).
        """
        try:
            if self._kept_acks:
                await self._apply_kept_acks()
            if self.delivery is not None:
                await self.delivery.release()
        except OSError as exc:
            self._health.failed(exc)

    async def _serve(self) -> None:
        config = self.config
        hello: Hello | None = None
        with trio.move_on_after(config.handshake_timeout_s) as waiting:
            hello = await self._receive_hello()
        if hello is None:
            # No HELLO: the time ran out (1007), or the peer ended the stream or broke the protocol (closing).
            if waiting.cancelled_caught and not self.closing:
                self.close(ErrorCode.HANDSHAKE_TIMEOUT, f"no HELLO within {config.handshake_timeout_s:g} s")
            return
        if not await self._open(hello):
            return
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.delivery is not None:
                nursery.start_soon(self.delivery.run)
            nursery.start_soon(self._watchdog)
            nursery.start_soon(self._expire)
            await self._read_loop()
            nursery.cancel_scope.cancel()

    async def _open(self, hello: Hello) -> bool:
        """Check HELLO, claim the mailbox and send WELCOME; False if the session is closing instead."""
        config = self.config
        if hello.version != PROTOCOL_VERSION:
            self.close(ErrorCode.UNSUPPORTED_VERSION, f"protocol version {hello.version} unsupported; use 1")
            return False
        limiter = self._limiter
        if limiter is not None and (wait_s := limiter.hello_from(self.address)) is not None:
            self._rate_limited(f"HELLOs from {self.address} come too fast; retry later", wait_s)
            return False
        try:
            identity = self._auth.verify(hello.token)
        except AuthError as exc:
            self.close(exc.code, exc.message)
            return False
        if limiter is not None and (wait_s := limiter.hello_as(self.address, identity.name)) is not None:
            self._rate_limited(f"HELLOs for {identity.name} come too fast; retry later", wait_s)
            return False
        self.identity = identity
        self._token_scope.deadline = _deadline(identity)
        pending = 0 if identity.operator else await self._claim(identity.name)
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
                expires_in_s=identity.seconds_left(time.time()),
            )
        )
        self.transport.welcome_sent()
        self._log.info(
            "open: %s%s",
            identity.name,
            " (operator)" if identity.operator else "",
            extra={"fields": {"mailbox": self.mailbox, "operator": identity.operator}},
        )
        return True

    def _rate_limited(self, message: str, wait_s: float) -> None:
        self.close(ErrorCode.CONNECTION_RATE_LIMITED, message, retry_after_ms=retry_after_ms(wait_s))

    async def _claim(self, mailbox: str) -> int:
        """Take the mailbox over (presence), make its delivery pump; how many messages it holds."""
        self.mailbox = mailbox
        self.claim = claim = await self._presence.claim(mailbox, self)
        self.delivery = Delivery(
            mailbox,
            claim,
            store=self._store,
            conn=self.conn,
            outbox=self.outbox,
            counters=self._stats.counters,
            max_inflight=self.config.max_inflight,
            clock=self._router.clock,
            health=self._health,
            report=self._router.report,
        )
        return await self._router.pending(mailbox)

    async def _expire(self) -> None:
        """End the session with TOKEN_EXPIRED once its token has (``_token_scope``'s deadline; REFRESH moves it)."""
        with self._token_scope:
            await trio.sleep_forever()
        self._counters.sessions_expired += 1
        self.close(ErrorCode.TOKEN_EXPIRED, "the session's token expired; send REFRESH with a new one before it does")

    async def _watchdog(self) -> None:
        """Close an idle connection (KEEPALIVE_TIMEOUT) or one whose write stalls (SLOW_CONSUMER).

        Both are judged from timestamps the reader and the outbox keep, a few times per
        ``keepalive_s``, so reading and writing pay for no timer of their own.
        """
        limit = self.config.keepalive_s
        while True:
            await trio.sleep(limit / 4)
            now = trio.current_time()
            since = self.outbox.writing_since
            if since is not None and now - since >= limit:
                self._log.info("write stalled for %.0f s: slow consumer", now - since)
                self.close(ErrorCode.SLOW_CONSUMER, "writes stalled: reading too slowly")
                self.outbox.abort()  # the stalled write cannot carry the ERROR: give up on it
                return
            if not self._reading_paused and now - self._last_rx >= limit:
                self.close(ErrorCode.KEEPALIVE_TIMEOUT, f"nothing received for {limit:g} s")
                return

    # ------------------------------------------------------------ input

    async def _receive(self) -> list[Frame] | None:
        """The frames of the next chunk from the peer (maybe none yet).

        None at the end of the stream, or when the peer broke the protocol (in the
        transport's framing or in the frames): then the session is closing with its code.
        """
        try:
            data = await self.transport.receive_some()
            if not data:
                return None
            frames = self.conn.receive_data(data)
            counters = self._counters
            counters.bytes_in += len(data)
            counters.frames_in += len(frames)
            return frames
        except RemoteProtocolError as exc:
            self._log.info("protocol error from peer: %s %s", exc.code.name, exc.message)
            self.close(exc.code, exc.message)
            return None

    async def _receive_hello(self) -> Hello | None:
        while True:
            frames = await self._receive()
            if frames is None:
                return None
            if frames:
                # The state table admits only HELLO first, and nothing after it before WELCOME.
                return cast(Hello, frames[0])

    async def _read_loop(self) -> None:
        outbox = self.outbox
        while True:
            if not outbox.has_room():
                self._reading_paused = True
                await outbox.wait_for_space()
                self._reading_paused = False
                self._last_rx = trio.current_time()  # paused by us, not idle
            frames = await self._receive()
            self._last_rx = trio.current_time()
            if frames is None:
                return
            if frames and not await self._dispatch(frames):
                return
            if self.conn.state is State.CLOSED:
                return

    async def _dispatch(self, frames: list[Frame]) -> bool:
        """Hand each unit of ``frames`` to its handler: a run of SENDs or ACKs, else one frame.

        False once a handler says stop (BYE).
        """
        identity = self.identity
        assert identity is not None
        n = len(frames)
        i = 0
        while i < n:
            kind = type(frames[i])
            j = i + 1
            if kind in _BATCHED:
                while j < n and type(frames[j]) is kind:
                    j += 1
            refused = authz.refusal(identity, kind)
            if refused is not None:
                self._send(Error(code=int(ErrorCode.FORBIDDEN), message=refused, close=False))
            elif not await _HANDLERS[kind](self, frames[i:j]):
                return False
            i = j
        return True

    # ------------------------------------------------------------ handlers (see _HANDLERS)

    async def _on_sends(self, sends: Sequence[Frame]) -> bool:
        assert self.mailbox is not None
        routed = await self._router.route(self.mailbox, cast(Sequence[Send], sends), self.address)
        await self._presence.wake(routed.wake)  # deliveries go out before the receipts
        frames = self.conn.send_receipts(routed.receipts)
        if frames:  # []: the connection is CLOSED
            self.outbox.push_all(frames)
        return True

    async def _on_acks(self, frames: Sequence[Frame]) -> bool:
        assert self.mailbox is not None and self.delivery is not None
        acks = cast(Sequence[Ack], frames)
        ids = acks[0].ids if len(acks) == 1 else [i for ack in acks for i in ack.ids]
        kept = self._kept_acks
        if kept:  # the store did not take earlier ones: they go along
            ids = [*kept, *ids]
        fetches = self.delivery.fetches
        try:
            acked = await self._router.acknowledge(self.mailbox, ids)
        except OSError as exc:
            self._keep_acks(exc, ids)
            return True
        if kept:
            self._forget_acks(ids)
        self.delivery.acked(acked.result, fetches, ids)
        return True

    def _keep_acks(self, exc: OSError, ids: Sequence[str]) -> None:
        """The store did not take these ACKed ids: keep them (bounded, oldest let go) and retry once it answers."""
        self._health.failed(exc)
        kept = self._kept_acks
        kept.update(dict.fromkeys(ids))
        excess = len(kept) - self.config.max_inflight
        if excess > 0:
            for old in list(kept)[:excess]:  # redelivered later (at least once): the client ACKs it again
                del kept[old]
        if not self._retrying_acks and self._nursery is not None:
            self._retrying_acks = True
            self._nursery.start_soon(self._retry_acks)

    def _forget_acks(self, ids: Sequence[str]) -> None:
        for i in ids:
            self._kept_acks.pop(i, None)

    async def _retry_acks(self) -> None:
        """Apply the kept ACKs once the store answers (backing off if it keeps failing); then end."""
        failures = 0
        try:
            while self._kept_acks:
                await self._health.wait_to_retry(failures)
                try:
                    await self._apply_kept_acks()
                    failures = 0
                except OSError as exc:
                    self._health.failed(exc)
                    failures += 1
        finally:
            self._retrying_acks = False

    async def _apply_kept_acks(self) -> None:
        """ACK the kept ids now. Raises the store's OSError (they stay kept)."""
        assert self.mailbox is not None
        ids = list(self._kept_acks)
        delivery = self.delivery
        fetches = delivery.fetches if delivery is not None else -1
        acked = await self._router.acknowledge(self.mailbox, ids)
        self._forget_acks(ids)
        if self.delivery is not None:  # a delivery made meanwhile recounts (-1 matches no count)
            self.delivery.acked(acked.result, fetches if self.delivery is delivery else -1)

    async def _on_status_acks(self, frames: Sequence[Frame]) -> bool:
        assert self.mailbox is not None
        acks = cast(Sequence[StatusAck], frames)
        seqs = acks[0].seqs if len(acks) == 1 else [seq for ack in acks for seq in ack.seqs]
        try:
            await self._router.acknowledge_statuses(self.mailbox, seqs)
        except OSError as exc:  # not kept: the statuses are sent again at the next connect or PULL
            self._health.failed(exc)
        return True

    async def _on_key_put(self, frames: Sequence[Frame]) -> bool:
        assert self.mailbox is not None
        for put in cast(Sequence[KeyPut], frames):
            code = await self._router.put_key(self.mailbox, put.key)
            self._send(KeyPutResult(kid=put.key.kid, code=None if code is None else int(code)))
        return True

    async def _on_key_get(self, frames: Sequence[Frame]) -> bool:
        limit = self.config.max_recipients
        for get in cast(Sequence[KeyGet], frames):
            if len(get.mailboxes) > limit:
                self.close(ErrorCode.INVALID_FIELD, f"key_get: more than max_recipients ({limit}) mailboxes")
                return False
            # The store's OSError ends the session with 5002 (run()): an empty answer would say "no records".
            self._send(KeyGetResult(keys=await self._router.get_keys(get.mailboxes)))
        return True

    async def _on_ping(self, frames: Sequence[Frame]) -> bool:
        self.outbox.push(_PONG)
        return True

    async def _on_pull(self, frames: Sequence[Frame]) -> bool:
        assert self.delivery is not None
        await self.delivery.pull()
        return True

    async def _on_bye(self, frames: Sequence[Frame]) -> bool:
        return False

    async def _on_refresh(self, frames: Sequence[Frame]) -> bool:
        """A newer token for this session's identity: it governs the session from now on (its expiry included).
        A token that is refused, or that names another mailbox or role, ends the session."""
        identity = self.identity
        assert identity is not None
        for refresh in cast(Sequence[Refresh], frames):
            try:
                fresh = self._auth.verify(refresh.token)
            except AuthError as exc:
                self.close(exc.code, f"refresh: {exc.message}")
                return False
            if not fresh.same_as(identity):
                what = "an operator's" if fresh.operator else f"mailbox {fresh.name!r}'s"
                self.close(ErrorCode.TOKEN_MISMATCH, f"refresh: the token is {what}, not this session's")
                return False
            self.identity = identity = fresh
            self._token_scope.deadline = _deadline(fresh)
            left = fresh.seconds_left(time.time())
            self._counters.tokens_refreshed += 1
            self._log.info("token refreshed: %d s left", left, extra={"fields": {"expires_in_s": left}})
            self._send(Refreshed(expires_in_s=left))
        return True

    async def _on_stats(self, frames: Sequence[Frame]) -> bool:
        self._send(StatsResult(stats=(await self._stats.snapshot()).to_wire()))
        return True

    async def _on_cleanup(self, frames: Sequence[Frame]) -> bool:
        self._send(CleanupResult(purged=await self._router.cleanup()))
        return True

    def _send(self, frame: Frame) -> None:
        if not self.closing:
            self.outbox.push(self.conn.send(frame))


def _deadline(identity: Identity) -> float:
    """When (on trio's clock) a session whose token is ``identity``'s ends."""
    left = identity.ends_at - time.time()
    return trio.current_time() + left if math.isfinite(left) else math.inf


_BATCHED = frozenset({Send, Ack, StatusAck})
"""Kinds whose consecutive frames are handled together (one store call)."""

_HANDLERS: dict[type[Frame], Handler] = {
    Send: Session._on_sends,
    Ack: Session._on_acks,
    StatusAck: Session._on_status_acks,
    Ping: Session._on_ping,
    Pull: Session._on_pull,
    Bye: Session._on_bye,
    Stats: Session._on_stats,
    Cleanup: Session._on_cleanup,
    KeyPut: Session._on_key_put,
    KeyGet: Session._on_key_get,
    Refresh: Session._on_refresh,
}
"""The dispatch table: every frame a client may send in OPEN (the same keys as ``authz.RULES``)."""
