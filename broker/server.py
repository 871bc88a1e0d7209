"""The broker: listeners, presence, routing, statistics and the TTL sweeper in one trio nursery.

Theory of operation. :meth:`Broker.serve` opens the TCP listener and runs the sweeper;
every accepted connection becomes a :class:`~broker.session.Session` in the handler
nursery. ``presence`` maps each mailbox to the one session that owns it (a newer HELLO
takes over). :meth:`Broker.route` is the whole path of a batch of SENDs: plan
(pure), one ``store.enqueue_many`` call, build receipts, then deliver to online recipients
(:meth:`Session.deliver_now`) before the caller writes the receipts.
Shutdown is a deadline: each session is told SHUTTING_DOWN and given
``shutdown_grace_s`` to flush.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import trio

from wire import DELIVER_OVERHEAD_BYTES, ErrorCode, Receipt, Send, encode_frame
from wire import Error as ErrorFrame

from .auth import Authenticator, load_or_create_secret
from .config import BrokerConfig
from .routing import plan_send, receipt_result
from .session import Session
from .store.base import DUPLICATE, STORED, AckResult, Clock, Store, StoredMessage, wall_clock_ms
from .store.memory import MemoryStore
from .transport import StreamTransport, Transport

__all__ = ["Broker", "Counters", "open_store"]

log = logging.getLogger(__name__)

_REFUSAL_NAMES = {
    ErrorCode.MAILBOX_FULL: "refused_mailbox_full",
    ErrorCode.MAILBOX_BYTES_FULL: "refused_mailbox_bytes_full",
    ErrorCode.BROKER_FULL: "refused_broker_full",
    ErrorCode.TOO_MANY_RECIPIENTS: "refused_too_many_recipients",
    ErrorCode.ID_CONFLICT: "refused_id_conflict",
    ErrorCode.INVALID_RECIPIENT: "refused_invalid_recipient",
    ErrorCode.BODY_TOO_LARGE: "refused_body_too_large",
}


class Counters:
    """Cumulative broker counters (the store keeps its own)."""

    __slots__ = ("delivered", "duplicates", "redelivered", "refused", "sent")

    def __init__(self) -> None:
        self.sent = 0
        self.delivered = 0
        self.redelivered = 0
        self.duplicates = 0
        self.refused: dict[int, int] = dict.fromkeys(_REFUSAL_NAMES, 0)


def open_store(config: BrokerConfig, clock: Clock) -> Store:
    """The store the configuration names (``memory``; config validation refuses anything else)."""
    return MemoryStore(config.store_limits, clock=clock)


class Broker:
    """A Relay broker. Create it, then run :meth:`serve` in a nursery (``await nursery.start(broker.serve)``).

    ``clock`` (Unix epoch ms) is injectable so TTL logic can run under trio's MockClock;
    ``store`` and ``auth`` default to the configuration's.
    """

    def __init__(
        self,
        config: BrokerConfig | None = None,
        *,
        store: Store | None = None,
        auth: Authenticator | None = None,
        clock: Clock = wall_clock_ms,
    ) -> None:
        self.config = config or BrokerConfig()
        self.clock = clock
        self.store: Store = store if store is not None else open_store(self.config, clock)
        self.auth = (
            auth
            if auth is not None
            else Authenticator(load_or_create_secret(self.config.data_dir), leeway_s=self.config.token_leeway_s)
        )
        self.presence: dict[str, Session] = {}
        self.sessions: set[Session] = set()
        self.counters = Counters()
        self.tcp_port: int | None = None
        self._stopping = False
        self._handlers_done = trio.Event()
        self.ws_port: int | None = None
        self.http_port: int | None = None

    # ------------------------------------------------------------ serving

    async def serve(self, *, task_status: trio.TaskStatus[Broker] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen (TCP, WebSocket, HTTP) and sweep expired messages until cancelled.

        Reports readiness with ``self``. Never returns normally. Shutdown is a deadline,
        not a cancel storm: sessions and the browser listeners run in a handler nursery
        that the cancellation does not reach; once the TCP listener has stopped, every
        session is told SHUTTING_DOWN and given ``shutdown_grace_s`` to flush, and only
        then is what remains cancelled.
        """
        listeners = await trio.open_tcp_listeners(self.config.tcp_port, host=self.config.host)
        self.tcp_port = listeners[0].socket.getsockname()[1]
        log.info("listening on tcp://%s:%d", self.config.host, self.tcp_port)
        async with trio.open_nursery() as outer:
            handlers: trio.Nursery = await outer.start(self._run_handlers)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.sweep_forever)
                    await nursery.start(
                        partial(trio.serve_listeners, self._handle_stream, listeners, handler_nursery=handlers)
                    )
                    await self._serve_browsers(handlers)
                    task_status.started(self)
                    await trio.sleep_forever()
            finally:
                self._stopping = True
                with trio.CancelScope(shield=True):
                    await self.shutdown()
                self._handlers_done.set()

    async def _run_handlers(self, *, task_status: trio.TaskStatus[trio.Nursery]) -> None:
        """Hold the nursery that sessions and the browser listeners run in, out of reach of
        :meth:`serve`'s cancellation, until :meth:`shutdown` has had its chance; then cancel it."""
        async with trio.open_nursery() as handlers:
            handlers.cancel_scope.shield = True
            task_status.started(handlers)
            await self._handlers_done.wait()
            handlers.cancel_scope.cancel()

    async def _serve_browsers(self, nursery: trio.Nursery) -> None:
        """Start the HTTP listener (API, demo page), then the WebSocket listener that trusts its origin."""
        from .http import serve_http
        from .websocket import OriginPolicy, serve_websocket

        host = self.config.host
        self.http_port = await nursery.start(serve_http, self, host, self.config.http_port)
        own = [f"http://{h}:{self.http_port}" for h in {host, "localhost", "127.0.0.1"}]
        self.ws_port = await nursery.start(
            partial(
                serve_websocket,
                self.handle_transport,
                host,
                self.config.ws_port,
                max_frame_bytes=self.config.max_frame_bytes,
                origins=OriginPolicy([*own, *self.config.allowed_origins]),
            )
        )

    async def shutdown(self) -> None:
        """Tell every session SHUTTING_DOWN and wait (bounded) for them to finish."""
        for session in list(self.sessions):
            session.close(ErrorCode.SHUTTING_DOWN, "the broker is shutting down")
        with trio.move_on_after(self.config.shutdown_grace_s + 1):
            for session in list(self.sessions):
                await session.finished.wait()

    async def _handle_stream(self, stream: trio.abc.Stream) -> None:
        await self.handle_transport(StreamTransport(stream))

    async def handle_transport(self, transport: Transport) -> None:
        """Serve one connection on any transport until it ends."""
        if self._stopping or len(self.sessions) >= self.config.max_connections:
            if self._stopping:
                refusal = ErrorFrame(
                    code=int(ErrorCode.SHUTTING_DOWN), message="the broker is shutting down", close=True
                )
            else:
                refusal = ErrorFrame(
                    code=int(ErrorCode.TOO_MANY_CONNECTIONS),
                    message=f"the broker holds {self.config.max_connections} connections already",
                    close=True,
                )
            with trio.move_on_after(1):
                try:
                    await transport.send_frames([encode_frame(refusal)])
                except Exception:
                    pass
            await transport.aclose()
            return
        session = Session(self, transport, secrets.token_hex(8))
        self.sessions.add(session)
        await session.run()

    def session_ended(self, session: Session) -> None:
        self.sessions.discard(session)

    async def attach(self, session: Session) -> None:
        """Make ``session`` the owner of its mailbox, taking over from any older session."""
        mailbox = session.mailbox
        assert mailbox is not None
        old = self.presence.get(mailbox)
        self.presence[mailbox] = session
        if old is not None:
            session.predecessor = old
            old.close(ErrorCode.CONNECTED_ELSEWHERE, "connected elsewhere: a newer connection took over this mailbox")
            await old.finished.wait()

    # ------------------------------------------------------------ routing

    async def route(self, sender: str, sends: Sequence[Send]) -> list[Receipt]:
        """Store a batch of SENDs from ``sender`` and return their receipts, in order."""
        config = self.config
        now = self.clock()
        expiries: dict[int, int] = {}
        plans = [
            plan_send(
                s,
                sender,
                now_ms=now,
                default_ttl_s=config.default_ttl_s,
                max_ttl_s=config.max_ttl_s,
                max_recipients=config.max_recipients,
                max_body_bytes=config.max_frame_bytes - DELIVER_OVERHEAD_BYTES,
                expiries=expiries,
            )
            for s in sends
        ]
        messages = [p.message for p in plans if p.message is not None]
        outcomes = iter(await self.store.enqueue_many(messages) if messages else ())
        presence = self.presence
        counters = self.counters
        receipts = []
        woken: dict[Session, None] = {}
        for send, plan in zip(sends, plans, strict=True):
            if plan.code is not None:
                counters.refused[plan.code] += 1
                receipts.append(Receipt._unchecked(send.id, {}, plan.code))
                continue
            results = {}
            for rcpt, code in plan.refused.items():
                results[rcpt] = receipt_result(code, False)
                counters.refused[code] += 1
            if plan.message is not None:
                for rcpt, outcome in zip(plan.message.recipients, next(outcomes), strict=True):
                    session = presence.get(rcpt)
                    results[rcpt] = receipt_result(outcome, session is not None)
                    if outcome == STORED:
                        counters.sent += 1
                        if session is not None:
                            woken[session] = None
                    elif outcome == DUPLICATE:
                        counters.duplicates += 1
                    else:
                        counters.refused[outcome] += 1
            receipts.append(Receipt._unchecked(send.id, results, None))  # valid by construction
        for session in woken:  # deliveries go out before the receipts the caller sends next
            await session.deliver_now()
        return receipts

    async def acknowledge(self, mailbox: str, ids: Sequence[str]) -> AckResult:
        """Delete ACKed messages of ``mailbox`` (from any transport); its live session recounts its window."""
        result = await self.store.ack_many(mailbox, ids)
        session = self.presence.get(mailbox)
        if session is not None and result.deleted:
            session.acked(result)
        return result

    async def pending_messages(self, mailbox: str, limit: int) -> list[StoredMessage]:
        """Up to ``limit`` held, unexpired messages of ``mailbox``, oldest first; nothing changes state."""
        return await self.store.peek(mailbox, limit)

    # ------------------------------------------------------------ operations

    async def cleanup(self) -> int:
        """Purge expired messages now; returns how many. Sessions recount their windows."""
        purged = await self.store.purge_expired()
        if purged:
            for session in self.presence.values():
                session.resync()
        log.info("sweep purged %d expired messages", purged)
        return purged

    async def sweep_forever(self) -> None:
        """Purge expired messages every ``cleanup_interval_s`` (started by :meth:`serve`)."""
        while True:
            await trio.sleep(self.config.cleanup_interval_s)
            try:
                await self.cleanup()
            except Exception:
                log.exception("sweep failed; will try again")

    async def statistics(self) -> dict[str, int]:
        """Every relay statistic (see protocol.md, Statistics)."""
        store_stats: Mapping[str, Any] = await self.store.statistics()
        c = self.counters
        stats = dict(store_stats)
        stats.update(
            online_users=len(self.presence),
            connections=len(self.sessions),
            sent_total=c.sent,
            delivered_total=c.delivered,
            redelivered_total=c.redelivered,
            duplicates_total=c.duplicates,
            refused_total=sum(c.refused.values()),
        )
        for code, name in _REFUSAL_NAMES.items():
            stats[name] = c.refused[code]
        return stats
