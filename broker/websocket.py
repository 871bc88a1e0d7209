"""The WebSocket listener: browsers speak the same protocol as TCP clients.

Theory of operation. One binary WebSocket message carries exactly one frame, *including*
its 4-byte length prefix, so the codec and the test vectors are the same on both
transports. :class:`WebSocketTransport` adapts a trio-websocket connection to the
:class:`~broker.transport.Transport` protocol and hands it to
:meth:`Broker.handle_transport <broker.server.Broker.handle_transport>`: sessions,
mailboxes and ACKs are written once, in :mod:`broker.session`.

What the adapter checks itself, because only it can see message boundaries:

- a text message is MALFORMED_FRAME (1001);
- a message whose prefix does not equal its length minus 4 is MALFORMED_FRAME;
- a message longer than ``max_frame_bytes + 4`` is FRAME_TOO_LARGE (1002); before
  WELCOME the limit is ``MAX_HELLO_FRAME_BYTES + 4``, so an unauthenticated connection
  can make the broker hold a few KiB, not a megabyte. It is refused as soon as the part
  received passes the limit, so at most the limit is ever buffered (trio-websocket's own
  limit would close with WebSocket code 1009 and no Relay ERROR;
  :class:`_RelayWebSocketConnection` reports it to the adapter instead).

A text message that is not valid UTF-8 never reaches the adapter: trio-websocket (wsproto)
ends the connection itself (close code 1007, or no close frame at all), so there is no
Relay ERROR for it; protocol.md section 2.5 says so.

Each raises RemoteProtocolError with that code from ``receive_some``, so the session
answers exactly as for any other bad frame: ERROR(code, close) and a close.

Speed: the session's writer hands over a batch of frames, and they leave as one socket
write (upstream writes once per message); a read returns every message already
queued, so a burst of SENDs or ACKs is handled as one batch, as on TCP.

The handshake is checked before the upgrade: the path must be ``/relay`` (else HTTP
404) and a browser's ``Origin`` must be allowed (else HTTP 403). A request without an
``Origin`` header is not from a browser page (browsers always send one on WebSocket
handshakes) and is allowed: the token in HELLO is what authenticates.

trio-websocket's ``ConnectionClosed`` is translated to
:class:`~broker.transport.TransportClosed` here and nowhere else.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest
from wsproto import ConnectionType, WSConnection
from wsproto.events import BytesMessage

from wire import MAX_HELLO_FRAME_BYTES, ErrorCode, RemoteProtocolError

from .transport import TransportClosed

__all__ = [
    "WEBSOCKET_PATH",
    "OriginPolicy",
    "WebSocketTransport",
    "serve_websocket",
]

log = logging.getLogger(__name__)

WEBSOCKET_PATH = "/relay"
"""The only path the listener upgrades."""
MESSAGE_QUEUE_SIZE = 4
"""Whole messages trio-websocket buffers ahead of the session (each at most max_frame_bytes + 4)."""
RECEIVE_BUFFER_BYTES = 65536
"""Bytes per socket read (upstream's default is 4 KiB: a syscall every few frames)."""
CONNECT_TIMEOUT_S = 10.0
"""Time a client has to complete the HTTP upgrade."""
DISCONNECT_TIMEOUT_S = 2.0
"""Time given to the WebSocket closing handshake before the TCP connection is dropped."""
_PREFIX = struct.Struct(">I")


class _TooLarge:
    """Queued by :class:`_RelayWebSocketConnection` in place of a message above the limit."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


class _RelayWebSocketConnection(WebSocketConnection):
    """trio-websocket's connection, except that an oversized message is reported, not dropped.

    Upstream closes with WebSocket code 1009 and tells the application nothing; Relay
    must answer with ERROR 1002 first. This overrides one private hook
    (``_handle_message_event``); ``tests/websocket`` pins the behaviour.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._relay_discarding = False

    def set_max_message_size(self, size: int) -> None:
        """Accept messages up to ``size`` bytes from now on (the session raises it after WELCOME)."""
        self._max_message_size = size

    async def _handle_message_event(self, event: Any) -> None:
        if self._relay_discarding:
            if event.message_finished:
                self._relay_discarding = False
            return
        if self._message_size + len(event.data) > self._max_message_size:
            size = self._message_size + len(event.data)
            self._message_size = 0
            self._message_parts = []
            self._relay_discarding = not event.message_finished
            try:
                await self._send_channel.send(_TooLarge(size))  # type: ignore[arg-type]
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass
            return
        await super()._handle_message_event(event)

    async def send_messages(self, messages: list[bytes]) -> None:
        """Send binary messages with one socket write; upstream's send_message writes once each.

        Mirrors upstream ``send_message``/``_send`` (the close check, the stream lock,
        the abort on a broken stream), on the same private attributes.
        """
        if self._close_reason:
            raise ConnectionClosed(self._close_reason)
        wsproto_send = self._wsproto.send
        data = b"".join([wsproto_send(BytesMessage(data=m)) for m in messages])
        async with self._stream_lock:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self._abort_web_socket()
                raise ConnectionClosed(self._close_reason) from None

    def queued_messages(self) -> list[Any]:
        """Messages already received and queued, taken without waiting."""
        out = []
        while True:
            try:
                out.append(self._recv_channel.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return out


class OriginPolicy:
    """Which browser origins may open a WebSocket. A missing Origin (non-browser client) is allowed."""

    def __init__(self, allowed: Iterable[str]) -> None:
        self.allowed = frozenset(o.rstrip("/").lower() for o in allowed)

    def permits(self, origin: str | None) -> bool:
        return origin is None or origin.rstrip("/").lower() in self.allowed


class WebSocketTransport:
    """A :class:`~broker.transport.Transport` over one WebSocket: one binary message per frame."""

    __slots__ = ("max_message_bytes", "ws")
    byte_stream = False

    def __init__(self, ws: _RelayWebSocketConnection, max_frame_bytes: int) -> None:
        self.ws = ws
        self.max_message_bytes = min(max_frame_bytes, MAX_HELLO_FRAME_BYTES) + 4
        ws.set_max_message_size(self.max_message_bytes)

    def open_limit(self, max_frame_bytes: int) -> None:
        """The session is OPEN: accept frames up to ``max_frame_bytes`` (until then, MAX_HELLO_FRAME_BYTES)."""
        self.max_message_bytes = max_frame_bytes + 4
        self.ws.set_max_message_size(self.max_message_bytes)

    async def receive_some(self) -> bytes:
        """One message's bytes (a whole frame with its prefix). Raises TransportClosed.

        A violation only this adapter can see (text message, prefix not matching the
        message length, message above the limit) raises RemoteProtocolError with its
        code, which the session answers with ERROR and a close, as for its own decoder.
        """
        try:
            first: Any = await self.ws.get_message()
        except ConnectionClosed as exc:
            raise TransportClosed(str(exc.reason)) from None
        messages = [first, *self.ws.queued_messages()]
        for message in messages:
            if isinstance(message, _TooLarge):
                raise RemoteProtocolError(
                    ErrorCode.FRAME_TOO_LARGE,
                    f"WebSocket message of at least {message.size} bytes exceeds the limit of "
                    f"{self.max_message_bytes} (a frame and its 4-byte prefix)",
                )
            if isinstance(message, str):
                raise RemoteProtocolError(ErrorCode.MALFORMED_FRAME, "text WebSocket message: frames are binary")
            if len(message) < 4 or _PREFIX.unpack_from(message)[0] != len(message) - 4:
                raise RemoteProtocolError(
                    ErrorCode.MALFORMED_FRAME, "WebSocket message is not exactly one frame (prefix != length - 4)"
                )
        return first if len(messages) == 1 else b"".join(messages)

    def try_send(self, data: bytes) -> int:
        return 0  # every WebSocket message goes through trio-websocket's writer

    async def send_frames(self, frames: list[bytes]) -> None:
        """One binary message per encoded frame, all in one socket write. Raises TransportClosed."""
        try:
            await self.ws.send_messages(frames)
        except ConnectionClosed as exc:
            raise TransportClosed(str(exc.reason)) from None

    async def aclose(self) -> None:
        """Close handshake, bounded by DISCONNECT_TIMEOUT_S; never raises."""
        with trio.move_on_after(DISCONNECT_TIMEOUT_S):
            try:
                await self.ws.aclose()
            except Exception:  # closing must never fail the session's cleanup
                log.debug("websocket close failed", exc_info=True)


def _header(request: WebSocketRequest, name: bytes) -> str | None:
    for key, value in request.headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def serve_websocket(
    handle_transport: Callable[[WebSocketTransport], Awaitable[None]],
    host: str,
    port: int,
    *,
    max_frame_bytes: int,
    origins: OriginPolicy | Callable[[], OriginPolicy],
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve WebSocket upgrades on ``host:port`` until cancelled; report the bound port.

    ``origins`` may be a callable, read per handshake (the HTTP port it depends on may be
    bound after this listener). Never returns normally.
    Raises OSError, with ``filename`` set to the address (``ws://host:port``), if it cannot listen.
    """
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        address = f"ws://[{host}]:{port}" if ":" in host else f"ws://{host}:{port}"
        raise OSError(exc.errno, exc.strerror, address) from exc
    bound = listeners[0].socket.getsockname()[1]
    max_message = min(max_frame_bytes, MAX_HELLO_FRAME_BYTES) + 4  # until the session is OPEN

    async def handle_request(request: WebSocketRequest) -> None:
        path = request.path.split("?", 1)[0]
        if path != WEBSOCKET_PATH:
            await request.reject(404, body=b"not found: the WebSocket endpoint is /relay\n")
            return
        origin = _header(request, b"origin")
        policy = origins() if callable(origins) else origins
        if not policy.permits(origin):
            log.info("websocket handshake refused: origin %r not allowed", origin)
            await request.reject(403, body=b"origin not allowed\n")
            return
        ws = await request.accept()
        assert isinstance(ws, _RelayWebSocketConnection)  # handle_stream made it
        await handle_transport(WebSocketTransport(ws, max_frame_bytes))

    async def handle_stream(stream: trio.SocketStream) -> None:
        # trio_websocket.WebSocketServer._handle_connection, with our connection class.
        async with trio.open_nursery() as nursery:
            connection = _RelayWebSocketConnection(
                stream,
                WSConnection(ConnectionType.SERVER),
                message_queue_size=MESSAGE_QUEUE_SIZE,
                max_message_size=max_message,
                receive_buffer_size=RECEIVE_BUFFER_BYTES,
            )
            nursery.start_soon(connection._reader_task)
            with trio.move_on_after(CONNECT_TIMEOUT_S) as connect_scope:
                request = await connection._get_request()
            if connect_scope.cancelled_caught:
                nursery.cancel_scope.cancel()
                await trio.aclose_forcefully(stream)
                return
            try:
                await handle_request(request)
            finally:
                with trio.move_on_after(DISCONNECT_TIMEOUT_S):
                    await connection.aclose()
                nursery.cancel_scope.cancel()

    log.info("listening on ws://%s:%d%s", host, bound, WEBSOCKET_PATH)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle_stream, listeners)
        task_status.started(bound)
