"""The WebSocket listener: browsers speak the same protocol as TCP clients.

Theory of operation. :func:`serve_websocket` accepts connections on listeners made by
:mod:`broker.listeners` (``trio.serve_listeners``) and runs trio-websocket's server side on
each with ``wrap_server_stream`` (public API only), bounding the upgrade with
:data:`CONNECT_TIMEOUT_S` as ``WebSocketServer`` would. Each upgrade request is
checked before it is accepted: the path must be ``/relay`` (else HTTP 404) and a
browser's ``Origin`` must be allowed by the broker's :class:`~broker.origins.OriginPolicy` (else HTTP 403;
the HTTP API's CORS uses the same policy). A request without an ``Origin``
header is not from a browser page (browsers always send one on WebSocket handshakes) and
is allowed: the token in HELLO is what authenticates. An accepted WebSocket is wrapped in
:class:`wire.websocket.WebSocketTransport` and handed to the broker's
``handle_transport``: sessions, mailboxes and ACKs are written once, in
:mod:`broker.session`.

On a ``wss://`` listener (a ``trio.SSLListener``) each connection's TLS handshake is done
first, in its own task (:func:`broker.tls.accept_tls`, bounded by ``handshake_timeout_s``; a
plain HTTP request gets a plain HTTP 400 saying to use wss://), then everything below applies
to the decrypted stream.

Framing (protocol.md 2.5): a binary message carries one or more whole frames; the
transport checks each message ends at a frame boundary and the session's decoder judges
each frame, exactly as on TCP. The message size limit, ``max_frame_bytes + 4``, is fixed
when the WebSocket is accepted (trio-websocket cannot change it later); a HELLO above
8,192 bytes in a message read before WELCOME is still refused by the decoder
(FRAME_TOO_LARGE). A message above the limit is closed by trio-websocket with WebSocket
code 1009 before Relay sees it: no ERROR frame (protocol decision 1). A text message that
is not valid UTF-8 is refused by the WebSocket layer too (1007, or no close frame at all).

Memory per connection before WELCOME (the same kind of bound as TCP's 8,192-byte limit).
Each accepted connection is served through :func:`trio_websocket.wrap_server_stream` (public
API) on a :class:`ReadBudget` stream that lets at most :data:`PREWELCOME_READ_BYTES` be read:
enough for any upgrade request, one message with a HELLO of up to 8,192 bytes and a close
frame. Beyond it
the stream simply stops reading (the bytes wait in the kernel) until the session has sent
WELCOME and calls ``transport.welcome_sent()``, which releases it; after that a read is one
attribute test and the delegate call. So an unauthenticated connection makes the broker buffer
at most that budget, whatever it sends: a pre-WELCOME message that does not fit is never
completed, and the session ends at ``handshake_timeout_s`` with HANDSHAKE_TIMEOUT, as when no
HELLO comes (its close handshake cannot complete, as the rest is never read: the TCP connection
is dropped within the transport's 2 s close bound). Nothing may follow HELLO before WELCOME
(protocol.md 5), so a conforming client never reaches the budget. Serving the stream ourselves, rather than through
``WebSocketServer``, keeps each connection's budget and WebSocket in one scope: nothing has
to find one from the other.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn

import trio
from trio_websocket import WebSocketRequest, wrap_server_stream

from wire.websocket import WebSocketTransport

from .origins import OriginPolicy
from .tls import accept_tls, address_of

__all__ = [
    "PREWELCOME_READ_BYTES",
    "WEBSOCKET_PATH",
    "ReadBudget",
    "WebSocketTransport",
    "serve_websocket",
]

log = logging.getLogger(__name__)

WEBSOCKET_PATH = "/relay"
"""The only path the listener upgrades."""
MESSAGE_QUEUE_SIZE = 1
"""Whole messages trio-websocket buffers ahead of the session (each at most max_frame_bytes + 4)."""
RECEIVE_BUFFER_BYTES = 65536
"""Bytes per socket read (trio-websocket's default is 4 KiB: a syscall every few frames)."""
CONNECT_TIMEOUT_S = 10.0
"""Time a client has to complete the HTTP upgrade."""
PREWELCOME_READ_BYTES = 32 * 1024
"""Bytes a WebSocket connection may have read before WELCOME: the largest upgrade request the
handshake parser accepts (h11, 16 KiB), one message with a HELLO of MAX_HELLO_FRAME_BYTES (+ 4 + a
14-byte WebSocket header) and a close frame fit, with room to spare."""


_PLAIN_ON_WSS_TEXT = b"this port serves TLS: connect with a wss:// URL (ws:// is the plain port)\n"
PLAIN_ON_WSS_PORT = (
    b"HTTP/1.1 400 \r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n"
    + f"Content-Length: {len(_PLAIN_ON_WSS_TEXT)}\r\n\r\n".encode()
    + _PLAIN_ON_WSS_TEXT
)
"""What a plain HTTP request on a wss:// port gets, in plain, before the connection closes (protocol.md 2.7)."""


class ReadBudget(trio.abc.Stream):
    """A Stream over ``stream`` that lets at most ``budget`` bytes be read until :meth:`release`.

    Reads ask the inner stream for no more than what is left of the budget; once it is
    spent, a read waits (reading nothing) until :meth:`release` or :meth:`aclose`. After
    release every read is the inner stream's. Writes and close go to the inner stream.
    ``receive_some`` raises what the inner stream raises, and ClosedResourceError if this
    stream is closed while it waits.
    """

    __slots__ = ("_closed", "_left", "_lifted", "_released", "stream")

    def __init__(self, stream: trio.abc.Stream, budget: int) -> None:
        self.stream = stream
        self._released = False
        self._left = budget
        self._lifted = trio.Event()
        self._closed = False

    def release(self) -> None:
        """Lift the budget: from now on reads are the inner stream's (a waiting read resumes). Never raises."""
        self._released = True
        self._lifted.set()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """At most ``max_bytes`` (and, before release, at most what is left of the budget)."""
        if self._released:
            return await self.stream.receive_some(max_bytes)
        return await self._receive_within_budget(max_bytes)

    async def _receive_within_budget(self, max_bytes: int | None) -> bytes | bytearray:
        if self._left == 0:
            await self._lifted.wait()
            if self._closed:
                raise trio.ClosedResourceError("the stream was closed")
            return await self.stream.receive_some(max_bytes)
        data = await self.stream.receive_some(self._left if max_bytes is None else min(max_bytes, self._left))
        self._left -= len(data)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """The inner stream's ``send_all``."""
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        """The inner stream's."""
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """Close the inner stream; a read waiting for release raises ClosedResourceError."""
        self._closed = True
        self._lifted.set()
        await self.stream.aclose()


def _header(request: WebSocketRequest, name: bytes) -> str | None:
    for key, value in request.headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def serve_websocket(
    handle_transport: Callable[[WebSocketTransport, str, str | None], Awaitable[None]],
    listeners: Sequence[trio.abc.Listener[Any]],
    *,
    max_frame_bytes: int,
    origins: OriginPolicy | Callable[[], OriginPolicy],
    handler_nursery: trio.Nursery | None = None,
    tls_handshake_timeout_s: float = CONNECT_TIMEOUT_S,
    task_status: trio.TaskStatus[list[trio.abc.Listener[Any]]] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve WebSocket upgrades on ``listeners`` until cancelled; reports readiness with the listeners.

    Each accepted WebSocket goes to ``handle_transport(transport, kind, address)``, ``kind`` saying which listener
    it came from: ``websocket`` (ws://) or ``wss`` (over TLS), as the statistics count connections; ``address`` the
    peer's IP address (None if not a socket), which the abuse limits key on.

    ``origins`` may be a callable, read per handshake. Connection tasks run in
    ``handler_nursery`` if given. A connection from a ``trio.SSLListener`` (``wss://``) has its
    TLS handshake first, within ``tls_handshake_timeout_s``, in its own task
    (:func:`broker.tls.accept_tls`); one that fails is closed and goes no further.
    Never returns; raises nothing of its own (a listener's errors propagate).
    """

    async def handle_request(request: WebSocketRequest, budget: ReadBudget, kind: str, address: str | None) -> None:
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
        # Our frames go in as few messages as the limit allows (protocol.md 2.5): the client takes max_frame_bytes + 4.
        transport = WebSocketTransport(ws, peer_max_frame_bytes=max_frame_bytes, on_welcome=budget.release)
        try:
            await handle_transport(transport, kind, address)
        finally:
            await transport.aclose()

    async def handle_stream(stream: trio.abc.Stream) -> None:
        kind = "websocket"
        address = address_of(stream)
        if isinstance(stream, trio.SSLStream):
            kind = "wss"
            secure = await accept_tls(
                stream, timeout_s=tls_handshake_timeout_s, scheme="wss", plain_answer=PLAIN_ON_WSS_PORT
            )
            if secure is None:
                return
            stream = secure
        budget = ReadBudget(stream, PREWELCOME_READ_BYTES)
        try:
            async with trio.open_nursery() as nursery:  # trio-websocket's reader task runs in it
                request = None
                with trio.move_on_after(CONNECT_TIMEOUT_S):
                    request = await wrap_server_stream(
                        nursery,
                        budget,
                        message_queue_size=MESSAGE_QUEUE_SIZE,
                        max_message_size=max_frame_bytes + 4,
                        receive_buffer_size=RECEIVE_BUFFER_BYTES,
                    )
                if request is not None:
                    await handle_request(request, budget, kind, address)
                nursery.cancel_scope.cancel()
        finally:
            await trio.aclose_forcefully(budget)

    await trio.serve_listeners(handle_stream, list(listeners), handler_nursery=handler_nursery, task_status=task_status)
