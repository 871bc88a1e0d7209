"""Client transports: how the client moves bytes, whatever carries them.

A transport is a byte stream with three calls (:class:`Transport`). :func:`open_transport`
picks the implementation from the URL scheme; each scheme registers one opener in
``OPENERS``: ``tcp`` and ``ws`` (protocol.md 2.5: one frame per binary WebSocket message,
the 4-byte prefix kept). trio's Broken/Closed errors, ``OSError`` and wsproto's errors are
translated to :class:`TransportClosed` here and nowhere else.

The WebSocket transport drives wsproto (the sans-IO library under trio-websocket) on a
plain trio stream rather than using trio-websocket's connection object: that object needs a
nursery for its reader task for the whole life of the connection, which a Transport (opened
by one task, read and written by others, closed by a third) does not have. It also lets one
``send_all`` put all its frames on the socket in one write. Its ``receive_some`` returns the
frames' bytes exactly as TCP would carry them, so the client's decoder (which knows the
WELCOME's ``max_frame_bytes``) refuses an oversized frame from its prefix, before its body
is buffered; the transport itself checks that every message is exactly one frame.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import trio
import wsproto.utilities
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from wire import ErrorCode, RemoteProtocolError

__all__ = [
    "DEFAULT_PORTS",
    "OPENERS",
    "RECEIVE_CHUNK_BYTES",
    "Endpoint",
    "TcpTransport",
    "Transport",
    "TransportClosed",
    "WebSocketTransport",
    "open_tcp_transport",
    "open_transport",
    "open_ws_transport",
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
"""Longest :meth:`WebSocketTransport.aclose` spends writing the WebSocket close frame."""
_REJECT_BODY_BYTES = 1024
"""Bytes of a refused handshake's HTTP body quoted in the error."""
_CLEAN_CLOSE_CODES = frozenset({1000, 1001})
"""WebSocket close codes that end the stream cleanly (receive_some returns b"")."""
_TRANSPORT_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class TransportClosed(Exception):
    """The connection could not be opened, broke, or was closed; nothing more can pass."""


class Transport(Protocol):
    async def receive_some(self) -> bytes:
        """The next chunk of the broker's byte stream; b"" at a clean end. Raises TransportClosed."""
        ...

    async def send_all(self, data: bytes) -> None:
        """Write all of ``data``. Raises TransportClosed."""
        ...

    def try_send(self, data: bytes) -> int:
        """Write what the kernel takes at once, without blocking: how many bytes of ``data`` went out.

        0 when nothing can go out now or the transport cannot write synchronously; the rest
        must then follow through ``send_all`` before anything else. Never raises (a broken
        connection is left for ``send_all`` to report); not to be used while a ``send_all``
        is in progress.
        """
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
    """A Transport over a trio Stream (TCP, or a memory stream in tests).

    Over a socket, :meth:`try_send` writes straight to its non-blocking file descriptor.
    """

    __slots__ = ("_fd", "stream")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1

    def try_send(self, data: bytes) -> int:
        if self._fd < 0:
            return 0
        try:
            return os.write(self._fd, data)
        except OSError:  # would block (EAGAIN), or broken: send_all will say which
            return 0

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
        self._fd = -1  # before the socket closes: its number may be reused at once
        await trio.aclose_forcefully(self.stream)


async def open_tcp_transport(endpoint: Endpoint) -> Transport:
    """Connect over TCP (Nagle off: frames are already batched per write). Raises TransportClosed."""
    try:
        stream = await trio.open_tcp_stream(endpoint.host, endpoint.port)
    except OSError as exc:
        raise TransportClosed(f"cannot connect to {endpoint}: {exc.strerror or exc}") from None
    return TcpTransport(stream)


class WebSocketTransport:
    """A Transport over a WebSocket (wsproto on a trio stream): one binary message per frame.

    ``receive_some`` returns the payload bytes of the messages that one read of the socket
    completed or continued, joined: the frames exactly as TCP would carry them (a long
    message's bytes are passed on as they arrive, so the client's decoder applies its frame
    limit to the prefix). A message that is not exactly one frame (a text message, fewer
    than 4 bytes, a prefix that is not its length minus 4) raises
    :class:`wire.RemoteProtocolError` (MALFORMED_FRAME) as soon as that shows, after the
    bytes before it have been returned. ``send_all`` takes whole frames and sends each as
    one binary message, all of them in one write.
    """

    __slots__ = (
        "_closed",
        "_control",
        "_end",
        "_endpoint",
        "_error",
        "_head",
        "_received",
        "_remaining",
        "_send_lock",
        "_stream",
        "_ws",
    )

    def __init__(self, stream: trio.abc.Stream, endpoint: Endpoint) -> None:
        self._stream = stream
        self._endpoint = endpoint
        self._ws = WSConnection(ConnectionType.CLIENT)
        self._send_lock = trio.StrictFIFOLock()
        self._control = b""
        """Encoded control frames (pong, close reply) not yet written."""
        self._received: list[bytes] = []
        """Payload bytes decoded but not yet returned."""
        self._head = b""
        """The current message's first bytes while its 4-byte prefix is incomplete."""
        self._remaining: int | None = None
        """Bytes the current message still owes its prefix (None: no prefix read yet)."""
        self._error: RemoteProtocolError | None = None
        """A violation found after bytes that are returned first; raised by the next receive_some."""
        self._end: str | None = None
        """Set when the WebSocket has ended: why, or "" for a clean close."""
        self._closed = False

    # ------------------------------------------------------------ handshake

    async def _handshake(self) -> None:
        """Send the upgrade request and read the answer. Raises TransportClosed."""
        endpoint = self._endpoint
        host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
        request = self._ws.send(Request(host=f"{host}:{endpoint.port}", target=endpoint.path))
        refused = f"cannot connect to {endpoint}: WebSocket upgrade refused"
        try:
            await self._stream.send_all(request)
            status: int | None = None
            body = b""
            while True:
                data = await self._stream.receive_some(RECEIVE_CHUNK_BYTES)
                if not data:
                    raise TransportClosed(f"{refused} ({_http(status, body) if status else 'no answer'})")
                self._ws.receive_data(bytes(data))  # no copy: sockets give bytes already
                events = list(self._ws.events())
                for i, event in enumerate(events):
                    if isinstance(event, AcceptConnection):
                        self._take(events[i + 1 :])  # anything sent right after the 101 response
                        return
                    if isinstance(event, RejectConnection):
                        status = event.status_code
                        if not event.has_body:
                            raise TransportClosed(f"{refused} ({_http(status, body)})")
                    elif isinstance(event, RejectData):
                        body = (body + event.data)[:_REJECT_BODY_BYTES]
                        if event.body_finished:
                            raise TransportClosed(f"{refused} ({_http(status, body)})")
        except wsproto.utilities.ProtocolError as exc:
            raise TransportClosed(f"cannot connect to {endpoint}: not a WebSocket server ({exc})") from None
        except _TRANSPORT_ERRORS as exc:
            raise TransportClosed(f"cannot connect to {endpoint}: {_reason(exc)}") from None

    # ------------------------------------------------------------ receiving

    async def receive_some(self) -> bytes:
        while not self._received:
            if self._error is not None:
                raise self._error
            if self._end is not None:
                if self._end:
                    raise TransportClosed(self._end)
                return b""
            try:
                data = await self._stream.receive_some(RECEIVE_CHUNK_BYTES)
            except _TRANSPORT_ERRORS as exc:
                raise TransportClosed(_reason(exc)) from None
            self._ws.receive_data(bytes(data) if data else None)  # None: EOF without a close frame (1006)
            self._take(self._ws.events())
            if self._control and not self._send_lock.locked():
                # Else the writer is mid-write and its next send_all carries them.
                await self._write(b"")
        received, self._received = self._received, []
        return received[0] if len(received) == 1 else b"".join(received)

    def _take(self, events: Iterable[Event]) -> None:
        """Collect payload bytes, checking message boundaries against the prefixes; note pings and closes."""
        for event in events:
            if self._error is not None or self._end is not None:
                return
            if isinstance(event, BytesMessage):
                self._payload(bytes(event.data), event.message_finished)
            elif isinstance(event, TextMessage):
                self._error = RemoteProtocolError(ErrorCode.MALFORMED_FRAME, "a text WebSocket message")
            elif isinstance(event, Ping) and self._ws.state is ConnectionState.OPEN:
                self._control += self._ws.send(event.response())
            elif isinstance(event, CloseConnection):
                if self._ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
                    self._control += self._ws.send(event.response())
                if event.code in _CLEAN_CLOSE_CODES:
                    self._end = ""
                elif event.code == 1006:
                    self._end = "the connection ended without a WebSocket close"
                else:
                    reason = f" ({event.reason})" if event.reason else ""
                    self._end = f"WebSocket closed with code {event.code}{reason}"

    def _payload(self, data: bytes, finished: bool) -> None:
        remaining = self._remaining
        if remaining is None:
            head = self._head + data[:4]
            if len(head) < 4:
                self._head = head
                if finished:
                    self._malformed()
                elif data:
                    self._received.append(data)
                return
            remaining = int.from_bytes(head[:4], "big") + 4 - len(self._head)
            self._head = b""
        remaining -= len(data)
        if remaining < 0 or (finished and remaining):
            self._malformed()
            return
        self._received.append(data)
        self._remaining = None if finished else remaining

    def _malformed(self) -> None:
        self._error = RemoteProtocolError(
            ErrorCode.MALFORMED_FRAME, "WebSocket message is not exactly one frame (prefix != length - 4)"
        )

    # ------------------------------------------------------------ sending

    def try_send(self, data: bytes) -> int:
        return 0  # framing and the close handshake share the stream: every write goes through _write

    async def send_all(self, data: bytes) -> None:
        """Send ``data``, which must be whole frames, one binary message each. Raises TransportClosed."""
        ws = self._ws
        n = len(data)
        parts: list[bytes] = []
        try:
            if n and n == int.from_bytes(data[:4], "big") + 4:
                parts.append(ws.send(BytesMessage(data=data)))
            else:
                pos = 0
                while pos < n:
                    end = pos + 4 + int.from_bytes(data[pos : pos + 4], "big")
                    if n - pos < 4 or end > n:
                        raise ValueError(f"send_all takes whole frames; {n - pos} bytes at offset {pos} are not one")
                    parts.append(ws.send(BytesMessage(data=data[pos:end])))
                    pos = end
        except wsproto.utilities.LocalProtocolError:
            raise TransportClosed(self._end_reason()) from None
        await self._write(b"".join(parts))

    async def _write(self, data: bytes) -> None:
        async with self._send_lock:
            data, self._control = self._control + data, b""
            try:
                await self._stream.send_all(data)
            except _TRANSPORT_ERRORS as exc:
                raise TransportClosed(_reason(exc)) from None

    def _end_reason(self) -> str:
        return self._end or "the WebSocket is closed"

    async def aclose(self) -> None:
        """Write a close frame if that can be done now (bounded), then drop the connection."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self._send_lock.locked() and self._ws.state is ConnectionState.OPEN:
                self._control += self._ws.send(CloseConnection(code=1000))
                with trio.CancelScope(shield=True), trio.move_on_after(WS_DISCONNECT_TIMEOUT_S):
                    await self._write(b"")
        except (TransportClosed, wsproto.utilities.ProtocolError):
            pass
        finally:
            await trio.aclose_forcefully(self._stream)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _http(status: int | None, body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()
    return f"HTTP {status}: {text}" if text else f"HTTP {status}"


async def open_ws_transport(endpoint: Endpoint) -> Transport:
    """Connect and upgrade to a WebSocket (``endpoint.path``, e.g. /relay). Raises TransportClosed."""
    try:
        with trio.fail_after(WS_CONNECT_TIMEOUT_S):
            stream = await trio.open_tcp_stream(endpoint.host, endpoint.port)
            transport = WebSocketTransport(stream, endpoint)
            try:
                await transport._handshake()
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
    except OSError as exc:
        raise TransportClosed(f"cannot connect to {endpoint}: {exc.strerror or exc}") from None
    except trio.TooSlowError:
        raise TransportClosed(
            f"cannot connect to {endpoint}: no WebSocket upgrade within {WS_CONNECT_TIMEOUT_S:g} s"
        ) from None
    return transport


OPENERS: dict[str, Callable[[Endpoint], Awaitable[Transport]]] = {"tcp": open_tcp_transport, "ws": open_ws_transport}
"""Transport opener per URL scheme."""


async def open_transport(endpoint: Endpoint) -> Transport:
    """A connected transport for ``endpoint``. Raises TransportClosed (and ValueError for an unknown scheme)."""
    opener = OPENERS.get(endpoint.scheme)
    if opener is None:
        raise ValueError(f"the {endpoint.scheme}:// transport is not available in this client build")
    return await opener(endpoint)
