"""The WebSocket listener: browsers speak the same protocol as TCP clients.

Theory of operation. :func:`serve_websocket` runs trio-websocket's ``WebSocketServer``
(public API only) on listeners made by :mod:`broker.listeners`. Each upgrade request is
checked before it is accepted: the path must be ``/relay`` (else HTTP 404) and a
browser's ``Origin`` must be allowed (else HTTP 403). A request without an ``Origin``
header is not from a browser page (browsers always send one on WebSocket handshakes) and
is allowed: the token in HELLO is what authenticates. An accepted WebSocket is wrapped in
:class:`wire.websocket.WebSocketTransport` and handed to the broker's
``handle_transport``: sessions, mailboxes and ACKs are written once, in
:mod:`broker.session`.

Framing (protocol.md 2.5): a binary message carries one or more whole frames; the
transport checks each message ends at a frame boundary and the session's decoder judges
each frame, exactly as on TCP. The message size limit, ``max_frame_bytes + 4``, is fixed
when the WebSocket is accepted (trio-websocket cannot change it later), so it holds
before WELCOME too; a HELLO above 8,192 bytes is still refused by the decoder
(FRAME_TOO_LARGE). A message above the limit is closed by trio-websocket with WebSocket
code 1009 before Relay sees it: no ERROR frame (protocol decision 1). A text message that
is not valid UTF-8 is refused by the WebSocket layer too (1007, or no close frame at all).

Memory per connection before WELCOME: trio-websocket assembles a message whole, and
holds at most ``MESSAGE_QUEUE_SIZE`` more, so an unauthenticated connection can make the
broker hold about two messages of ``max_frame_bytes + 4`` until the session refuses it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, NoReturn

import trio
from trio_websocket import WebSocketRequest, WebSocketServer

from wire.websocket import WebSocketTransport

__all__ = ["WEBSOCKET_PATH", "OriginPolicy", "WebSocketTransport", "serve_websocket"]

log = logging.getLogger(__name__)

WEBSOCKET_PATH = "/relay"
"""The only path the listener upgrades."""
MESSAGE_QUEUE_SIZE = 1
"""Whole messages trio-websocket buffers ahead of the session (each at most max_frame_bytes + 4)."""
RECEIVE_BUFFER_BYTES = 65536
"""Bytes per socket read (trio-websocket's default is 4 KiB: a syscall every few frames)."""
CONNECT_TIMEOUT_S = 10.0
"""Time a client has to complete the HTTP upgrade."""
DISCONNECT_TIMEOUT_S = 2.0
"""Time given to the WebSocket closing handshake before the TCP connection is dropped."""
PACK_FRAMES = True
"""True: the frames of one write go in as few messages as the limit allows (protocol.md 2.5). False
sends one frame per message (what clients before issue 9 needed); receiving accepts packed messages
either way."""


class OriginPolicy:
    """Which browser origins may open a WebSocket. A missing Origin (non-browser client) is allowed."""

    def __init__(self, allowed: Iterable[str]) -> None:
        self.allowed = frozenset(o.rstrip("/").lower() for o in allowed)

    def permits(self, origin: str | None) -> bool:
        """True if a handshake with this ``Origin`` header (None: absent) may be accepted."""
        return origin is None or origin.rstrip("/").lower() in self.allowed


def _header(request: WebSocketRequest, name: bytes) -> str | None:
    for key, value in request.headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def serve_websocket(
    handle_transport: Callable[[WebSocketTransport], Awaitable[None]],
    listeners: Sequence[trio.abc.Listener[Any]],
    *,
    max_frame_bytes: int,
    origins: OriginPolicy | Callable[[], OriginPolicy],
    handler_nursery: trio.Nursery | None = None,
    task_status: trio.TaskStatus[WebSocketServer] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve WebSocket upgrades on ``listeners`` until cancelled; reports readiness with the server.

    ``origins`` may be a callable, read per handshake. Connection tasks run in
    ``handler_nursery`` if given. Never returns; raises nothing of its own (a listener's
    errors propagate).
    """

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
        # A limit of 0 + 4 bytes puts each (non-empty) frame in a message of its own.
        peer_limit = max_frame_bytes if PACK_FRAMES else 0
        await handle_transport(WebSocketTransport(ws, peer_max_frame_bytes=peer_limit))

    server = WebSocketServer(
        handle_request,
        listeners,  # type: ignore[arg-type]  # any trio Listener works (the annotation names the socket kinds)
        handler_nursery=handler_nursery,
        message_queue_size=MESSAGE_QUEUE_SIZE,
        max_message_size=max_frame_bytes + 4,
        receive_buffer_size=RECEIVE_BUFFER_BYTES,
        connect_timeout=CONNECT_TIMEOUT_S,
        disconnect_timeout=DISCONNECT_TIMEOUT_S,
    )
    await server.run(task_status=task_status)
