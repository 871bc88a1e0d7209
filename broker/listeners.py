"""The broker's listeners, created in one place: TCP, WebSocket and HTTP, or memory listeners in tests.

Theory of operation. :func:`open_listeners` binds the TCP and WebSocket ports named by the
configuration and returns them as :class:`Listeners`, which the broker serves (TCP with
``trio.serve_listeners``, WebSocket through :func:`broker.websocket.serve_websocket`, HTTP
with hypercorn through its ``fd://`` bind). Every
listener the broker accepts on is made here, so TLS later is one ``trio.SSLListener``
wrap in :func:`open_listeners` and nothing else changes. Tests inject :class:`Listeners`
of :class:`MemoryListener`\\ s instead, to run the real broker over
``trio.testing.memory_stream_pair()`` for both TCP-style and WebSocket connections.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio
import trio.testing

from .config import BrokerConfig

__all__ = ["Listeners", "MemoryListener", "first_os_error", "open_listeners", "port_of"]

log = logging.getLogger(__name__)

AnyListener = trio.abc.Listener[trio.abc.Stream]


@dataclass(frozen=True, slots=True)
class Listeners:
    """What the broker accepts connections on: frame byte streams (``tcp``), WebSockets (``ws``) and the HTTP API
    (``http``: socket listeners only, since hypercorn serves sockets; none for a broker without HTTP)."""

    tcp: list[AnyListener]
    ws: list[AnyListener]
    http: list[AnyListener] = field(default_factory=list)

    @property
    def tcp_port(self) -> int | None:
        """The bound TCP port (None for memory listeners)."""
        return port_of(self.tcp)

    @property
    def ws_port(self) -> int | None:
        """The bound WebSocket port (None for memory listeners)."""
        return port_of(self.ws)

    @property
    def http_port(self) -> int | None:
        """The bound HTTP port (None if there is no HTTP listener)."""
        return port_of(self.http)

    async def aclose(self) -> None:
        """Close every listener; never raises."""
        for listener in (*self.tcp, *self.ws, *self.http):
            await trio.aclose_forcefully(listener)


async def open_listeners(config: BrokerConfig) -> Listeners:
    """Bind ``config.tcp_port``, ``config.ws_port`` and ``config.http_port`` on ``config.host`` (0: a free port each).

    Raises OSError, with ``filename`` set to the address (``tcp://host:port``,
    ``ws://host:port`` or ``http://host:port``), if a port cannot be bound; nothing stays bound then.
    """
    bound: list[AnyListener] = []
    try:
        tcp = await _bind("tcp", config.host, config.tcp_port)
        bound += tcp
        ws = await _bind("ws", config.host, config.ws_port)
        bound += ws
        http = await _bind("http", config.host, config.http_port)
    except BaseException:
        for listener in bound:
            await trio.aclose_forcefully(listener)
        raise
    return Listeners(tcp=tcp, ws=ws, http=http)


async def _bind(scheme: str, host: str, port: int) -> list[AnyListener]:
    try:
        return list(await trio.open_tcp_listeners(port, host=host))
    except OSError as exc:
        address = f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"
        raise OSError(exc.errno, exc.strerror, address) from exc


def port_of(listeners: Sequence[AnyListener]) -> int | None:
    """The port the first socket listener is bound to, or None if there is none (memory listeners)."""
    for listener in listeners:
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
