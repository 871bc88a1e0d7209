"""The broker's listeners, made in one place: TCP, WebSocket and HTTP, plain or over TLS, or memory ones in tests.

Theory of operation. :func:`open_listeners` binds the ports of the listeners the configuration
names (``listeners``: tcp, ws, http, tls, wss, https) and returns them as :class:`Listeners`,
which the broker serves (frame byte streams, plain and TLS, with ``trio.serve_listeners``,
WebSockets through :func:`broker.websocket.serve_websocket`, HTTP and HTTPS with hypercorn
through its ``fd://`` bind). Every listener the broker accepts on is made here. The ``tls`` and
``wss`` ones are ``trio.SSLListener``\\ s over the broker's :class:`broker.tls.ServerTLS` context:
each connection's handshake is then done in its own task (:func:`broker.tls.accept_tls`), after
which the rest of the broker sees the same streams as on the plain ports. The ``https`` ones stay
socket listeners: hypercorn does their TLS itself, over the same certificate from the same
``ServerTLS``. Tests inject :class:`Listeners` of :class:`MemoryListener`\\ s instead, to run
the real broker over ``trio.testing.memory_stream_pair()`` for both TCP-style and WebSocket
connections.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio
import trio.testing

from .config import LISTENERS, BrokerConfig
from .tls import ServerTLS

__all__ = ["Listeners", "MemoryListener", "first_os_error", "open_listeners", "port_of"]

log = logging.getLogger(__name__)

AnyListener = trio.abc.Listener[trio.abc.Stream]


@dataclass(frozen=True, slots=True)
class Listeners:
    """What the broker accepts connections on: frame byte streams (``tcp``, and ``tls``: ``trio.SSLListener``\\ s),
    WebSockets (``ws``, and ``wss``: ``trio.SSLListener``\\ s) and the HTTP API (``http``, ``https``: socket
    listeners only, since hypercorn serves sockets and does the TLS of ``https`` itself). A listener turned off has
    an empty list."""

    tcp: list[AnyListener]
    ws: list[AnyListener]
    http: list[AnyListener] = field(default_factory=list)
    tls: list[AnyListener] = field(default_factory=list)
    wss: list[AnyListener] = field(default_factory=list)
    https: list[AnyListener] = field(default_factory=list)

    @property
    def tcp_port(self) -> int | None:
        """The bound TCP port (None for memory listeners, or none)."""
        return port_of(self.tcp)

    @property
    def ws_port(self) -> int | None:
        """The bound WebSocket port (None for memory listeners, or none)."""
        return port_of(self.ws)

    @property
    def http_port(self) -> int | None:
        """The bound HTTP port (None if there is no HTTP listener)."""
        return port_of(self.http)

    @property
    def tls_port(self) -> int | None:
        """The bound ``tls://`` port (None if there is none)."""
        return port_of(self.tls)

    @property
    def wss_port(self) -> int | None:
        """The bound ``wss://`` port (None if there is none)."""
        return port_of(self.wss)

    @property
    def https_port(self) -> int | None:
        """The bound HTTPS port (None if there is none)."""
        return port_of(self.https)

    async def aclose(self) -> None:
        """Close every listener; never raises."""
        for listener in (*self.tcp, *self.ws, *self.http, *self.tls, *self.wss, *self.https):
            await trio.aclose_forcefully(listener)


async def open_listeners(config: BrokerConfig, tls: ServerTLS | None = None) -> Listeners:
    """Bind the port of each listener ``config.listeners`` names (``config.tcp_port`` for tcp, ...) on
    ``config.host`` (0: a free port each); the tls and wss ones serve TLS over ``tls.stream``.

    Raises ValueError if the config names a TLS listener and ``tls`` is None. Raises OSError, with ``filename``
    set to the address (``tcp://host:port``, ``wss://host:port``, ...), if a port cannot be bound; nothing stays
    bound then.
    """
    if tls is None and config.tls_listeners:
        raise ValueError(f"listeners {', '.join(config.tls_listeners)} serve TLS: they need the broker's ServerTLS")
    bound: dict[str, list[AnyListener]] = {}
    try:
        for name in LISTENERS:
            if config.serves(name):
                sockets = await _bind(name, config.host, getattr(config, f"{name}_port"))
                bound[name] = sockets
                if name in ("tls", "wss") and tls is not None:
                    bound[name] = [trio.SSLListener(s, tls.stream, https_compatible=False) for s in sockets]
    except BaseException:
        for listeners in bound.values():
            for listener in listeners:
                await trio.aclose_forcefully(listener)
        raise
    return Listeners(**{name: bound.get(name, []) for name in LISTENERS})


async def _bind(scheme: str, host: str, port: int) -> list[AnyListener]:
    try:
        return list(await trio.open_tcp_listeners(port, host=host))
    except OSError as exc:
        address = f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"
        raise OSError(exc.errno, exc.strerror, address) from exc


def port_of(listeners: Sequence[AnyListener]) -> int | None:
    """The port the first socket listener (or TLS over one) is bound to, or None if there is none (memory
    listeners)."""
    for listener in listeners:
        if isinstance(listener, trio.SSLListener):
            listener = listener.transport_listener
        if isinstance(listener, trio.SocketListener):
            port: int = listener.socket.getsockname()[1]
            return port
    return None


class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    """A listener whose connections are ``trio.testing.memory_stream_pair()``\\ s (tests).

    :meth:`connect` makes a pair, queues the server end for :meth:`accept` and returns the
    client end. Raises ClosedResourceError from both once closed.
    """

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[trio.abc.Stream](math.inf)

    async def connect(self) -> trio.abc.Stream:
        """A new connection: the client's end. Raises trio.ClosedResourceError if the listener is closed."""
        client, server = trio.testing.memory_stream_pair()
        try:
            self._send.send_nowait(server)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise trio.ClosedResourceError("the memory listener is closed") from None
        return client

    async def accept(self) -> trio.abc.Stream:
        """The server end of the next connection. Raises trio.ClosedResourceError once closed."""
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise trio.ClosedResourceError("the memory listener is closed") from None

    async def aclose(self) -> None:
        """Stop accepting (connections not yet accepted are dropped)."""
        self._send.close()
        self._receive.close()
        await trio.lowlevel.checkpoint()


def first_os_error(exc: BaseException) -> OSError | None:
    """The first OSError in ``exc``, however deep in exception groups (e.g. a listener that cannot bind)."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := first_os_error(inner)) is not None:
                return found
    return None
