"""Client transports: how the client moves bytes, whatever carries them.

A transport is a byte stream with three calls (:class:`Transport`). :func:`open_transport`
picks the implementation from the URL scheme; each scheme registers one opener in
``OPENERS`` (``tcp`` here; a WebSocket transport, one frame per binary message with the
4-byte prefix kept, can register ``ws``). trio's Broken/Closed errors and ``OSError`` are
translated to :class:`TransportClosed` here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import trio

__all__ = [
    "DEFAULT_PORTS",
    "OPENERS",
    "RECEIVE_CHUNK_BYTES",
    "Endpoint",
    "TcpTransport",
    "Transport",
    "TransportClosed",
    "open_tcp_transport",
    "open_transport",
    "parse_url",
]

RECEIVE_CHUNK_BYTES = 256 * 1024
"""Bytes asked of the kernel per read: a whole burst of deliveries per syscall under load."""
DEFAULT_PORTS = {"tcp": 7700, "ws": 7780}
"""Port used when a URL names none, per scheme (protocol.md, Default ports)."""
DEFAULT_PATHS = {"ws": "/relay"}


class TransportClosed(Exception):
    """The connection could not be opened, broke, or was closed; nothing more can pass."""


class Transport(Protocol):
    async def receive_some(self) -> bytes:
        """The next chunk of the broker's byte stream; b"" at a clean end. Raises TransportClosed."""
        ...

    async def send_all(self, data: bytes) -> None:
        """Write all of ``data``. Raises TransportClosed."""
        ...

    async def aclose(self) -> None:
        """Close at once; never raises."""
        ...


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
    """``tcp://host[:port]`` (default port 7700) or ``ws://host[:port][/path]``. Raises ValueError."""
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


class TcpTransport:
    """A Transport over a trio Stream (TCP, or a memory stream in tests)."""

    __slots__ = ("stream",)

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream

    async def receive_some(self) -> bytes:
        try:
            return bytes(await self.stream.receive_some(RECEIVE_CHUNK_BYTES))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise TransportClosed(str(exc) or type(exc).__name__) from None

    async def send_all(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise TransportClosed(str(exc) or type(exc).__name__) from None

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


async def open_tcp_transport(endpoint: Endpoint) -> Transport:
    """Connect over TCP (Nagle off: frames are already batched per write). Raises TransportClosed."""
    try:
        stream = await trio.open_tcp_stream(endpoint.host, endpoint.port)
    except OSError as exc:
        raise TransportClosed(f"cannot connect to {endpoint}: {exc.strerror or exc}") from None
    return TcpTransport(stream)


OPENERS: dict[str, Callable[[Endpoint], Awaitable[Transport]]] = {"tcp": open_tcp_transport}
"""Transport opener per URL scheme."""


async def open_transport(endpoint: Endpoint) -> Transport:
    """A connected transport for ``endpoint``. Raises TransportClosed (and ValueError for an unknown scheme)."""
    opener = OPENERS.get(endpoint.scheme)
    if opener is None:
        raise ValueError(f"the {endpoint.scheme}:// transport is not available in this client build")
    return await opener(endpoint)
