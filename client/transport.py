"""Client transports: how the client opens the byte stream to a broker, whatever carries it.

Theory of operation. :func:`open_transport` is an async context manager: it parses the
URL (or takes an :class:`Endpoint`), picks the opener registered for its scheme in
``OPENERS`` and yields a connected :class:`wire.transport.Transport`, closed when the
block ends. The transports themselves are shared with the broker:

- ``tcp``: :class:`wire.transport.StreamTransport` over ``trio.open_tcp_stream`` (with
  its one ``os.write`` fast path, ``send_some_nowait``);
- ``ws``: :class:`wire.websocket.WebSocketTransport` over
  ``trio_websocket.open_websocket_url`` (public API; its reader task lives in the
  context manager's nursery, which is why opening is a context manager). Frames are
  packed into binary messages (protocol.md 2.5): at most 1,028 bytes per message until
  the caller passes WELCOME's ``max_frame_bytes`` to ``transport.set_peer_limit``.

Every failure to connect (refused, no upgrade, HTTP error, timeout) raises
:class:`TransportClosed` on entry, with the URL in the message. Tests replace or wrap an
opener through ``OPENERS`` (or ``open_client(transport_factory=...)``, same shape).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import trio
from trio_websocket import (
    ConnectionRejected,
    ConnectionTimeout,
    HandshakeError,
    open_websocket_url,
)

from wire import DEFAULT_MAX_FRAME_BYTES
from wire.transport import StreamTransport, Transport, TransportClosed
from wire.websocket import WebSocketTransport

__all__ = [
    "DEFAULT_PORTS",
    "OPENERS",
    "RECEIVE_CHUNK_BYTES",
    "WS_MAX_MESSAGE_BYTES",
    "Endpoint",
    "Opener",
    "Transport",
    "TransportClosed",
    "open_tcp",
    "open_transport",
    "open_ws",
    "parse_url",
]

RECEIVE_CHUNK_BYTES = 256 * 1024
"""Bytes asked of the kernel per read: a whole burst of deliveries per syscall under load."""
DEFAULT_PORTS = {"tcp": 7700, "ws": 7781}
"""Port used when a URL names none, per scheme (protocol.md, Default ports)."""
DEFAULT_PATHS = {"ws": "/relay"}
WS_CONNECT_TIMEOUT_S = 10.0
"""Longest the TCP connect plus the WebSocket upgrade may take."""
WS_DISCONNECT_TIMEOUT_S = 2.0
"""Longest closing spends on the WebSocket closing handshake."""
WS_MAX_MESSAGE_BYTES = 64 * DEFAULT_MAX_FRAME_BYTES + 4096 + 4
"""The largest WebSocket message the client accepts: fixed before WELCOME says the broker's
``max_frame_bytes``, so it covers the largest a broker may announce (64 MiB, the figure
proposed as config's upper bound) plus the client's receive slack and the 4-byte prefix.
The client's decoder still applies WELCOME's own limit to every frame."""
WS_RECEIVE_BYTES = 256 * 1024
"""Bytes per socket read for trio-websocket (its default is 4 KiB)."""
_REJECT_BODY_CHARS = 1024
"""Characters of a refused handshake's HTTP body quoted in the error."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A parsed broker URL."""

    scheme: str
    host: str
    port: int
    path: str = ""

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"


def parse_url(url: str) -> Endpoint:
    """``tcp://host[:port]`` (default port 7700) or ``ws://host[:port][/path]`` (7781, /relay). Raises ValueError."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"invalid broker URL {url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"invalid broker URL {url!r}: the scheme must be one of {', '.join(sorted(DEFAULT_PORTS))}")
    if not parts.hostname:
        raise ValueError(f"invalid broker URL {url!r}: no host (expected e.g. tcp://127.0.0.1:7700)")
    if scheme == "tcp" and parts.path not in ("", "/"):
        raise ValueError(f"invalid broker URL {url!r}: a tcp URL has no path")
    path = parts.path or DEFAULT_PATHS.get(scheme, "")
    return Endpoint(scheme, parts.hostname, port if port is not None else DEFAULT_PORTS[scheme], path)


Opener = Callable[[Endpoint], AbstractAsyncContextManager[Transport]]
"""Opens a connected transport for an endpoint (an async context manager; TransportClosed on entry)."""


@asynccontextmanager
async def open_tcp(endpoint: Endpoint) -> AsyncIterator[Transport]:
    """Connect over TCP (trio turns Nagle off: frames are already batched per write). Raises TransportClosed."""
    try:
        stream = await trio.open_tcp_stream(endpoint.host, endpoint.port)
    except OSError as exc:
        raise TransportClosed(f"cannot connect to {endpoint}: {exc.strerror or exc}") from None
    transport = StreamTransport(stream, receive_bytes=RECEIVE_CHUNK_BYTES)
    try:
        yield transport
    finally:
        await transport.aclose()


@asynccontextmanager
async def open_ws(endpoint: Endpoint) -> AsyncIterator[Transport]:
    """Connect and upgrade to a WebSocket at ``endpoint.path`` (e.g. /relay). Raises TransportClosed on entry.

    The connect deadline is this function's own cancel scope around the whole context, lifted
    once the upgrade is done: trio-websocket's own timeout leaves its reader task waiting on a
    silent server, so it is set later than ours and never fires first.
    """
    entered = False
    with trio.CancelScope(deadline=trio.current_time() + WS_CONNECT_TIMEOUT_S) as deadline:
        try:
            async with open_websocket_url(
                str(endpoint),
                max_message_size=WS_MAX_MESSAGE_BYTES,
                receive_buffer_size=WS_RECEIVE_BYTES,
                connect_timeout=WS_CONNECT_TIMEOUT_S + 1,
                disconnect_timeout=WS_DISCONNECT_TIMEOUT_S,
            ) as ws:
                entered = True
                deadline.deadline = math.inf
                transport = WebSocketTransport(ws)
                try:
                    yield transport
                finally:
                    await transport.aclose()
        except Exception as exc:
            if entered:
                raise
            raise _connect_error(endpoint, exc) from None
    if deadline.cancelled_caught:
        raise TransportClosed(f"cannot connect to {endpoint}: no WebSocket upgrade within {WS_CONNECT_TIMEOUT_S:g} s")


def _connect_error(endpoint: Endpoint, exc: Exception) -> TransportClosed:
    """What went wrong before the WebSocket was open, said once."""
    failed = f"cannot connect to {endpoint}"
    if isinstance(exc, ConnectionRejected):
        body = (exc.body or b"").decode("utf-8", "replace").strip()[:_REJECT_BODY_CHARS]
        http = f"HTTP {exc.status_code}: {body}" if body else f"HTTP {exc.status_code}"
        return TransportClosed(f"{failed}: WebSocket upgrade refused ({http})")
    if isinstance(exc, ConnectionTimeout):
        return TransportClosed(f"{failed}: no WebSocket upgrade within {WS_CONNECT_TIMEOUT_S:g} s")
    if isinstance(exc, (HandshakeError, OSError)):
        cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
        return TransportClosed(f"{failed}: {reason or type(cause).__name__}")
    # The answer was not an HTTP upgrade at all (trio-websocket lets h11's error out).
    return TransportClosed(f"{failed}: not a WebSocket server ({type(exc).__name__}: {exc})")


OPENERS: dict[str, Opener] = {"tcp": open_tcp, "ws": open_ws}
"""Transport opener per URL scheme (tests may replace one)."""


@asynccontextmanager
async def open_transport(endpoint: Endpoint | str) -> AsyncIterator[Transport]:
    """A connected transport for ``endpoint`` (a URL or a parsed :class:`Endpoint`), closed when the block ends.

    Raises TransportClosed on entry if it cannot connect, ValueError for an invalid URL or
    a scheme without an opener.
    """
    if isinstance(endpoint, str):
        endpoint = parse_url(endpoint)
    opener = OPENERS.get(endpoint.scheme)
    if opener is None:
        raise ValueError(f"the {endpoint.scheme}:// transport is not available in this client build")
    async with opener(endpoint) as transport:
        yield transport
