"""The broker's lifecycle: listeners, the store, the parts a session is made of, shutdown, the sweeper.

Theory of operation. A :class:`Broker` assembles the parts and runs them; it holds no
routing, presence or statistics logic of its own. It opens the store and presence
(``broker.backend.open_backend``: in memory, or Redis shared with other nodes), or takes
a store given (then with a :class:`~broker.presence.LocalPresence`), and builds one
:class:`~broker.stats.Stats` and one :class:`~broker.router.Router` over them.
:meth:`Broker.serve` opens the listeners (``broker.listeners.open_listeners``, or serves
injected ones), starts TCP, HTTP and WebSocket serving and the sweeper
(:meth:`Router.cleanup` every ``cleanup_interval_s``), the store health's reconnect task
(:class:`~broker.health.StoreHealth`: probes with backoff while the store is unreachable) and the
event-loop lag watch (:meth:`Stats.watch_loop_lag`); :attr:`Broker.ready` says whether it should get
new clients (``GET /readyz``: listening, not draining, the store reachable);
every accepted connection becomes
a :class:`~broker.session.Session`, given the router, presence, statistics, store,
configuration and authenticator (not the broker), in a handler nursery. Shutdown is a
deadline: each session is told SHUTTING_DOWN and given ``shutdown_grace_s`` to flush. The
HTTP API gets the same parts; ``route``, ``acknowledge``, ``statistics`` and friends here
are thin conveniences over them for tests and callers outside a session.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from functools import partial

import trio

from wire import Error as ErrorFrame
from wire import ErrorCode, Receipt, Send, encode_frame
from wire.transport import StreamTransport, Transport, TransportClosed

from .auth import Authenticator
from .backend import Backend, open_backend, probed_health
from .config import BrokerConfig
from .health import StoreHealth
from .limits import Limiter, Reason, retry_after_ms
from .listeners import Listeners, open_listeners
from .presence import LocalPresence, Presence
from .router import Router
from .session import Session
from .stats import Counters, Stats
from .store.base import AckResult, Clock, Message, Store, wall_clock_ms
from .tls import ServerTLS, accept_tls, address_of

__all__ = ["Broker", "Counters"]

log = logging.getLogger(__name__)

_PLAIN_ON_TLS_PORT = encode_frame(
    ErrorFrame(
        code=int(ErrorCode.MALFORMED_FRAME),
        message="this port serves TLS: connect with a tls:// URL (tcp:// is the plain port)",
        close=True,
    )
)
"""What a plain client on a tls:// port gets, in plain, before the connection closes (protocol.md 2.7)."""


class Broker:
    """A Relay broker. Create it, then run :meth:`serve` in a nursery (``await nursery.start(broker.serve)``).

    ``clock`` (Unix epoch ms) is injectable so TTL logic can run under trio's MockClock; it
    stamps messages and is passed to every store call that judges time. ``auth`` defaults to
    the configuration's. Without ``store``, :meth:`serve` opens the configured store and
    presence (:func:`broker.backend.open_backend`) and closes them when it stops, and the parts
    that use them (``store``, ``presence``, ``router``, ``stats``, ``counters``) exist from then
    on; an injected store comes with a :class:`LocalPresence` and makes them at once, and stays
    the caller's to close. ``listeners`` default to the
    configuration's; given ones (memory listeners in tests) are served and closed like the
    broker's own.
    """

    def __init__(
        self,
        config: BrokerConfig | None = None,
        *,
        store: Store | None = None,
        auth: Authenticator | None = None,
        clock: Clock = wall_clock_ms,
        listeners: Listeners | None = None,
    ) -> None:
        self.config = config or BrokerConfig()
        self.clock = clock
        self.auth = auth if auth is not None else Authenticator.from_config(self.config)
        self.sessions: set[Session] = set()
        self.limiter = Limiter(self.config)
        """The node's abuse limits (:mod:`broker.limits`): consulted by :meth:`_refusal`, the sessions' HELLOs,
        the router's SENDs and the HTTP API."""
        self.presence: Presence
        self.store: Store
        self.health: StoreHealth
        self.stats: Stats
        self.counters: Counters
        self.router: Router
        self._store_injected = store is not None
        if store is not None:
            self._use(Backend(store, LocalPresence(), probed_health(store)))
        self._listeners = listeners
        self.tcp_port: int | None = None
        self._stopping = False
        self._listening = False  # every listener is being served
        self._handlers_done = trio.Event()
        self._backend_done = trio.Event()
        self.ws_port: int | None = None
        self.http_port: int | None = None
        self.tls_port: int | None = None
        self.wss_port: int | None = None
        self.https_port: int | None = None
        self.tls = ServerTLS.from_config(self.config)
        """The TLS contexts of the tls, wss and https listeners (None if the config names none)."""

    def _use(self, backend: Backend) -> None:
        """Make the parts that work on the store and presence."""
        self.store, self.presence = store, presence = backend.store, backend.presence
        self.health = health = backend.health
        self.stats = Stats(
            store,
            presence,
            self.sessions.__len__,
            clock=self.clock,
            round_trips=backend.round_trips,
            health=health,
            store_call_latency=backend.call_latency,
            rate_limited=self.limiter.refused,
        )
        self.counters = self.stats.counters
        self.router = Router(
            self.config, store, presence, self.counters, clock=self.clock, health=health, limiter=self.limiter
        )

    def _open_backend(self) -> AbstractAsyncContextManager[Backend]:
        if self._store_injected:
            return contextlib.nullcontext(Backend(self.store, self.presence, self.health))
        return open_backend(self.config)

    # ------------------------------------------------------------ serving

    async def serve(self, *, task_status: trio.TaskStatus[Broker] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen (TCP, WebSocket, HTTP) and sweep expired messages until cancelled.

        Reports readiness with ``self``. Never returns normally. Shutdown is a deadline,
        not a cancel storm: sessions and the browser listeners run in a handler nursery
        that the cancellation does not reach; once the TCP listener has stopped, every
        session is told SHUTTING_DOWN and given ``shutdown_grace_s`` to flush, and only
        then is what remains cancelled. The store and presence are opened first and closed last.
        """
        async with trio.open_nursery() as nursery:
            backend: Backend = await nursery.start(self._hold_backend)
            if not self._store_injected:
                self._use(backend)
            try:
                await self._serve(task_status)
            finally:
                self._backend_done.set()

    async def _hold_backend(self, *, task_status: trio.TaskStatus[Backend]) -> None:
        """Hold the store and presence open, out of reach of :meth:`serve`'s cancellation, until the sessions are done.

        A networked backend's connections are tasks too: cancelled with :meth:`serve`, they
        would be gone while the shutdown still needs them (sessions giving their deliveries back).
        """
        with trio.CancelScope(shield=True):
            async with self._open_backend() as backend:
                task_status.started(backend)
                await self._backend_done.wait()

    def reload_tls(self) -> None:
        """Load the TLS certificate and key from their files again (SIGHUP): new handshakes present the new
        certificate, open connections keep theirs. Raises ConfigError (the old certificate stays) if they cannot
        be loaded; does nothing without TLS listeners."""
        if self.tls is not None:
            self.tls.reload()
            log.info("TLS certificate reloaded from %s", self.tls.cert_file)

    async def _serve(self, task_status: trio.TaskStatus[Broker]) -> None:
        opened = self._listeners or await open_listeners(self.config, self.tls)
        self.tcp_port, self.ws_port = opened.tcp_port, opened.ws_port
        self.tls_port, self.wss_port = opened.tls_port, opened.wss_port
        if opened.tcp:
            log.info("listening on tcp://%s:%s", self.config.host, self.tcp_port or "(memory)")
        if opened.tls:
            log.info("listening on tls://%s:%s", self.config.host, self.tls_port or "(memory)")
        try:
            async with trio.open_nursery() as outer:
                handlers: trio.Nursery = await outer.start(self._run_handlers)
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self.sweep_forever)
                        nursery.start_soon(self.health.run)
                        nursery.start_soon(self.stats.watch_loop_lag)
                        if streams := [*opened.tcp, *opened.tls]:
                            await nursery.start(
                                partial(trio.serve_listeners, self._handle_stream, streams, handler_nursery=handlers)
                            )
                        await self._serve_browsers(handlers, opened)
                        self._listening = True
                        task_status.started(self)
                        await trio.sleep_forever()
                finally:
                    self._stopping = True
                    with trio.CancelScope(shield=True):
                        await self.shutdown()
                    self._handlers_done.set()
        finally:
            # serve_listeners closes the TCP and WebSocket listeners, hypercorn its copies of the HTTP ones; this
            # closes what is left (the HTTP listeners themselves, or listeners never served after a failed start).
            # Shielded: we are usually cancelled here, and each close checkpoints.
            with trio.CancelScope(shield=True):
                await opened.aclose()

    async def _run_handlers(self, *, task_status: trio.TaskStatus[trio.Nursery]) -> None:
        """Hold the nursery that sessions and the browser listeners run in, out of reach of
        :meth:`serve`'s cancellation, until :meth:`shutdown` has had its chance; then cancel it."""
        async with trio.open_nursery() as handlers:
            handlers.cancel_scope.shield = True
            task_status.started(handlers)
            await self._handlers_done.wait()
            handlers.cancel_scope.cancel()

    async def _serve_browsers(self, nursery: trio.Nursery, opened: Listeners) -> None:
        """Start the HTTP and HTTPS listeners (API, demo page) if there are any, then the WebSocket listeners (plain and
        TLS) trusting their origins."""
        from .http import BrokerParts, serve_http
        from .origins import OriginPolicy
        from .websocket import serve_websocket

        # One policy for the WebSocket check and the HTTP API's CORS (broker/origins.py).
        origins = OriginPolicy.of_broker(
            self.config.host, opened.http_port, opened.https_port, self.config.allowed_origins
        )
        parts = BrokerParts(
            config=self.config,
            auth=self.auth,
            router=self.router,
            presence=self.presence,
            stats=self.stats,
            ws_port=opened.ws_port or self.config.ws_port,
            wss_port=opened.wss_port,
            ready=lambda: self.ready,
            origins=origins,
            limiter=self.limiter,
        )
        if opened.http:  # injected listeners may have none
            self.http_port = await nursery.start(serve_http, parts, opened.http)
        if opened.https:
            self.https_port = await nursery.start(partial(serve_http, parts, opened.https, tls=self.tls))
        if websockets := [*opened.ws, *opened.wss]:
            await nursery.start(
                partial(
                    serve_websocket,
                    self.handle_transport,
                    websockets,
                    max_frame_bytes=self.config.max_frame_bytes,
                    origins=origins,
                    tls_handshake_timeout_s=self.config.handshake_timeout_s,
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
        """A connection on a tcp:// or tls:// port; over TLS, the handshake first, in this task (a plain client on
        the tls:// port is told to use tls://)."""
        address = address_of(stream)
        if not isinstance(stream, trio.SSLStream):
            await self.handle_transport(StreamTransport(stream, linger=True), "tcp", address)
            return
        secure = await accept_tls(
            stream, timeout_s=self.config.handshake_timeout_s, scheme="tls", plain_answer=_PLAIN_ON_TLS_PORT
        )
        if secure is not None:
            await self.handle_transport(StreamTransport(secure, linger=True), "tls", address)

    async def handle_transport(self, transport: Transport, kind: str, address: str | None = None) -> None:
        """Serve one connection on any transport until it ends (refused at once when stopping, full, or past the
        abuse limits of its address).

        ``kind`` is what the connection is counted as in the statistics (``relay_connections{transport}``), said by
        whoever built the transport: ``tcp`` or ``tls`` (a frame byte stream, plain or over TLS), ``websocket`` or
        ``wss`` (:data:`broker.stats.TRANSPORT_NAMES`). ``address`` is the peer's IP address (None: not a socket,
        no per-address limits)."""
        refusal = self._refusal(address)
        if refusal is not None:
            with trio.move_on_after(1):
                try:
                    await transport.send_all(encode_frame(refusal))
                except TransportClosed:
                    pass
            await transport.aclose()
            return
        session = Session(
            transport,
            secrets.token_hex(8),
            config=self.config,
            auth=self.auth,
            router=self.router,
            presence=self.presence,
            stats=self.stats,
            store=self.store,
            limiter=self.limiter,
            address=address,
        )
        open_now = self.counters.connections
        self.sessions.add(session)
        open_now[kind] = open_now.get(kind, 0) + 1
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            open_now[kind] -= 1
            self.limiter.disconnect(address)

    def _refusal(self, address: str | None = None) -> ErrorFrame | None:
        """The closing ERROR for a connection the broker will not serve now, or None (then the connection is
        counted as open from ``address`` until :meth:`Limiter.disconnect`). The one place connections are judged:
        shutting down (4004), ``max_connections`` (4005), then the address's limits (4007, 4006)."""
        if self._stopping:
            return ErrorFrame(code=int(ErrorCode.SHUTTING_DOWN), message="the broker is shutting down", close=True)
        if len(self.sessions) >= self.config.max_connections:
            return ErrorFrame(
                code=int(ErrorCode.TOO_MANY_CONNECTIONS),
                message=f"the broker holds {self.config.max_connections} connections already",
                close=True,
            )
        refused = self.limiter.connect(address)
        if refused is None:
            return None
        reason, wait_s = refused
        if reason is Reason.ADDRESS_CONNECTIONS:
            return ErrorFrame(
                code=int(ErrorCode.TOO_MANY_CONNECTIONS_FROM_ADDRESS),
                message=f"the broker holds {self.config.max_connections_per_address} connections from {address} "
                "already",
                close=True,
            )
        return ErrorFrame(
            code=int(ErrorCode.CONNECTION_RATE_LIMITED),
            message=f"connections from {address} come too fast; retry later",
            close=True,
            retry_after_ms=retry_after_ms(wait_s),
        )

    @property
    def ready(self) -> str | None:
        """Why this broker should not be sent new clients now (``GET /readyz``), or None if it is ready:
        not yet listening, draining for shutdown, or its store unreachable (the health's judgement)."""
        if self._stopping:
            return "draining: the broker is shutting down"
        if not self._listening:
            return "not listening yet"
        if not self.health.available:
            return "the store cannot be reached"
        return None

    async def sweep_forever(self) -> None:
        """Purge expired messages every ``cleanup_interval_s`` (started by :meth:`serve`)."""
        while True:
            await trio.sleep(self.config.cleanup_interval_s)
            try:
                await self.router.cleanup()
            except OSError as exc:  # the store is unreachable: the health says so, the next sweep tries again
                self.health.failed(exc)
            except Exception:
                log.exception("sweep failed; will try again")

    # ------------------------------------------------------------ conveniences over the parts (tests, HTTP)

    async def route(self, sender: str, sends: Sequence[Send]) -> list[Receipt]:
        """Route a batch of SENDs from ``sender`` as a session does (wake, then receipts); their receipts."""
        routed = await self.router.route(sender, sends)
        await self.presence.wake(routed.wake)
        return [
            Receipt(id=r.id, results=dict(r.results), code=r.code, retry_after_ms=r.retry_after_ms)
            for r in routed.receipts
        ]

    async def acknowledge(self, mailbox: str, ids: Sequence[str]) -> AckResult:
        """Delete ACKed messages of ``mailbox`` from outside its session; its live session recounts."""
        acked = await self.router.acknowledge(mailbox, ids)
        await self.presence.resync(acked.resync)
        return acked.result

    async def pending_messages(self, mailbox: str, limit: int) -> list[Message]:
        """Up to ``limit`` held, unexpired messages of ``mailbox``, oldest first; nothing changes state."""
        return await self.router.peek(mailbox, limit)

    async def cleanup(self) -> int:
        """Purge expired messages now; returns how many (:meth:`Router.cleanup`)."""
        return await self.router.cleanup()

    async def statistics(self) -> dict[str, int]:
        """Every relay statistic, as STATS_RESULT carries them (protocol.md, Statistics)."""
        return (await self.stats.snapshot()).to_wire()
