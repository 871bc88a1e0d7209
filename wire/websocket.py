"""The WebSocket transport: frames in binary messages, over trio-websocket's public API.

Theory of operation (protocol.md 2.5). A binary message carries one or more whole frames
back to back, each with its 4-byte length prefix; a frame never spans messages. So the
bytes of the messages, in order, are exactly the TCP byte stream, and both sides feed
them to the same stream decoder as on TCP. :class:`WebSocketTransport` adapts a
``trio_websocket.WebSocketConnection`` (either role: the broker's accepted connection or
the client's) to :class:`wire.transport.Transport` using only ``get_message``,
``send_message`` and ``aclose``.

Receiving: each message is checked to end exactly at a frame boundary by walking its
prefixes (a message with fewer than 4 bytes, or with a partial frame at its end, is
MALFORMED_FRAME 1001); a text message is MALFORMED_FRAME too. Both raise
``wire.RemoteProtocolError``, which the caller answers as for its own decoder. The
decoder, not this module, judges each frame's size against the limit in force (so a HELLO
above 8,192 bytes arriving whole in one message is still FRAME_TOO_LARGE 1002). A message
above the receiving side's ``max_message_size`` never gets here: trio-websocket closes
the WebSocket with code 1009 itself (no ERROR frame; protocol decision 1).
Before WELCOME the broker reads its side through a small read budget
(:class:`broker.websocket.ReadBudget`); :meth:`WebSocketTransport.welcome_sent`, the
session's call right after WELCOME, lifts it through the ``on_welcome`` it was given.

Sending: :meth:`WebSocketTransport.send_all` packs the frames it is given into as few
messages as the peer's limit (``max_frame_bytes + 4``) allows, cutting only between
frames: under load a batch of frames is one message and one socket write.

Closing: a peer's close with code 1000 or 1001 ends the stream cleanly (``b""``); any
other end (another code, or the connection dropped without a close) is
:class:`~wire.transport.TransportClosed`, as is every ``ConnectionClosed`` on sending.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable

import trio
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection

from .errors import ErrorCode, RemoteProtocolError
from .transport import TransportClosed

__all__ = ["CLEAN_CLOSE_CODES", "DISCONNECT_TIMEOUT_S", "MIN_PEER_FRAME_BYTES", "WebSocketTransport", "pack"]

log = logging.getLogger(__name__)

CLEAN_CLOSE_CODES = frozenset({1000, 1001})
"""WebSocket close codes that end the stream cleanly (receive_some returns b"")."""
DISCONNECT_TIMEOUT_S = 2.0
"""Longest :meth:`WebSocketTransport.aclose` spends on the WebSocket closing handshake."""
MIN_PEER_FRAME_BYTES = 1024
"""The smallest ``max_frame_bytes`` a broker may announce: the packing limit until the peer's is known."""
_PREFIX = struct.Struct(">I")
_unpack_prefix = _PREFIX.unpack_from


def pack(data: bytes, limit: int) -> list[bytes]:
    """Cut ``data`` (whole frames back to back) into messages of at most ``limit`` bytes, only between frames.

    A frame longer than ``limit`` is one message on its own (it is never split; the
    peer judges it). Raises ValueError if ``data`` is not whole frames.
    """
    n = len(data)
    if n <= limit:
        _check_whole(data, "send_all takes whole frames")
        return [data] if n else []
    messages: list[bytes] = []
    start = pos = 0
    while pos < n:
        if n - pos < 4:
            raise ValueError(f"send_all takes whole frames; {n - pos} bytes at offset {pos} are not one")
        end = pos + 4 + _unpack_prefix(data, pos)[0]
        if end > n:
            raise ValueError(f"send_all takes whole frames; the frame at offset {pos} ends past the data")
        if end - start > limit and pos > start:
            messages.append(data[start:pos])
            start = pos
        pos = end
    messages.append(data[start:])
    return messages


def _check_whole(data: bytes, what: str) -> None:
    """Raise ValueError unless ``data`` is empty or whole frames back to back."""
    n = len(data)
    pos = 0
    while pos + 4 <= n:
        pos += 4 + _unpack_prefix(data, pos)[0]
    if pos != n:
        raise ValueError(f"{what}; {len(data)} bytes are not whole frames")


def _ends_at_frame_boundary(message: bytes) -> bool:
    n = len(message)
    pos = 0
    while pos + 4 <= n:
        pos += 4 + _unpack_prefix(message, pos)[0]
    return pos == n and n >= 4


def _describe(reason: CloseReason | None) -> str:
    if reason is None:
        return "the WebSocket is closed"
    if reason.code == 1006:
        return "the connection ended without a WebSocket close"
    detail = f" ({reason.reason})" if reason.reason else ""
    return f"WebSocket closed with code {reason.code}{detail}"


class WebSocketTransport:
    """A :class:`~wire.transport.Transport` over one trio-websocket connection (either role).

    ``peer_max_frame_bytes``: the largest frame the peer accepts, so that ``send_all``
    packs at most that plus 4 bytes into one message (the broker passes its own
    ``max_frame_bytes``, which its clients accept; the client starts from
    :data:`MIN_PEER_FRAME_BYTES` and raises it with :meth:`set_peer_limit` after WELCOME).
    The receiving limit is the connection's own ``max_message_size``. ``on_welcome``: what
    :meth:`welcome_sent` calls (the broker passes the release of the connection's
    pre-WELCOME read budget, :class:`broker.websocket.ReadBudget`); None: nothing.
    """

    __slots__ = ("_on_welcome", "_send_limit", "ws")

    def __init__(
        self,
        ws: WebSocketConnection,
        *,
        peer_max_frame_bytes: int = MIN_PEER_FRAME_BYTES,
        on_welcome: Callable[[], None] | None = None,
    ) -> None:
        self.ws = ws
        self._send_limit = peer_max_frame_bytes + 4
        self._on_welcome = on_welcome

    async def receive_some(self) -> bytes:
        """The next message's bytes (whole frames); ``b""`` after a clean close (1000, 1001).

        Raises TransportClosed for any other end, and ``wire.RemoteProtocolError``
        (MALFORMED_FRAME) for a text message or one that does not end at a frame boundary.
        """
        try:
            message = await self.ws.get_message()
        except ConnectionClosed as exc:
            if exc.reason is not None and exc.reason.code in CLEAN_CLOSE_CODES:
                return b""
            raise TransportClosed(_describe(exc.reason)) from None
        if type(message) is not bytes:
            raise RemoteProtocolError(ErrorCode.MALFORMED_FRAME, "a text WebSocket message: frames are binary")
        if not _ends_at_frame_boundary(message):
            raise RemoteProtocolError(
                ErrorCode.MALFORMED_FRAME, "a WebSocket message must hold whole frames (it ends mid-frame)"
            )
        return message

    async def send_all(self, data: bytes) -> None:
        """Send whole frames, packed into as few binary messages as the peer's limit allows.

        Raises TransportClosed, and ValueError if ``data`` is not whole frames.
        """
        ws = self.ws
        try:
            for message in pack(data, self._send_limit):
                await ws.send_message(message)
        except ConnectionClosed as exc:
            raise TransportClosed(_describe(exc.reason)) from None

    def send_some_nowait(self, data: bytes) -> int:
        """Always 0: every message goes through trio-websocket's writer (``send_all``)."""
        return 0

    def set_peer_limit(self, max_frame_bytes: int) -> None:
        """Pack at most ``max_frame_bytes + 4`` bytes into one message from now on."""
        self._send_limit = max_frame_bytes + 4

    def welcome_sent(self) -> None:
        """Call ``on_welcome`` (the broker: lift the pre-WELCOME read budget), if given. Never raises."""
        if self._on_welcome is not None:
            self._on_welcome()

    async def aclose(self) -> None:
        """Close handshake (code 1000), bounded by :data:`DISCONNECT_TIMEOUT_S`; never raises."""
        with trio.move_on_after(DISCONNECT_TIMEOUT_S):
            try:
                await self.ws.aclose()
            except Exception:  # closing must never fail the caller's cleanup
                log.debug("websocket close failed", exc_info=True)
