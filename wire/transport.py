"""Transports: how the broker and the Python client move frame bytes, whatever carries them.

Theory of operation. A :class:`Transport` carries the frame byte stream of protocol.md
section 2 in both directions. Reading gives chunks of the peer's byte stream, split
anywhere; the caller feeds them to its ``wire.Connection`` (one stream decoder for every
transport). Writing takes whole encoded frames back to back. There are two kinds:

- :class:`StreamTransport` (here) over any trio Stream: TCP, TLS, or a memory stream in
  tests. Bytes pass unchanged. Over a ``trio.SocketStream`` it also has the one
  synchronous fast path, :meth:`StreamTransport.send_some_nowait`: an ``os.write`` on
  the socket's non-blocking descriptor (``stream.socket.fileno()``, public trio API), so
  a frame that fits in the kernel buffer costs no task switch. Any other stream (TLS, a
  wrapper) returns 0 there and the caller's writer task sends the bytes.
- :class:`wire.websocket.WebSocketTransport` over a trio-websocket connection: binary
  messages, each one or more whole frames (protocol.md 2.5).

trio's Broken/Closed errors and ``OSError`` become :class:`TransportClosed` at this
boundary and nowhere else. This module imports trio, so ``wire/__init__.py`` does not
import it: ``import wire`` stays sans-IO.

One writer: a caller never overlaps :meth:`Transport.send_some_nowait` with a
:meth:`Transport.send_all` in progress (the broker's outbox and the client's link each
have a single writer), so the fast path needs no lock of its own.
"""

from __future__ import annotations

import os
from typing import Protocol

import trio

__all__ = [
    "LINGER_MAX_BYTES",
    "LINGER_S",
    "RECEIVE_CHUNK_BYTES",
    "StreamTransport",
    "Transport",
    "TransportClosed",
]

RECEIVE_CHUNK_BYTES = 65536
"""Bytes asked of the kernel per read by default: many frames at once under load, little waste when idle."""
LINGER_S = 1.0
"""With ``linger``, how long unread input is drained on close so the kernel sends FIN, not RST
(an RST would destroy a last ERROR frame still in flight to the peer)."""
LINGER_MAX_BYTES = 1024 * 1024
"""With ``linger``, the most unread input drained on close before giving up and resetting."""
_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class TransportClosed(Exception):
    """The connection could not be opened, broke, or was closed; nothing more can pass."""


class Transport(Protocol):
    """The frame byte stream to one peer, whatever carries it (see the module docstring)."""

    async def receive_some(self) -> bytes:
        """The next chunk of the peer's frame byte stream; ``b""`` at a clean end.

        Raises TransportClosed, or ``wire.RemoteProtocolError`` for a violation only the
        transport can see (a WebSocket text message, or a message ending mid-frame).
        """
        ...

    async def send_all(self, data: bytes) -> None:
        """Write ``data``: whole encoded frames back to back, in order.

        A stream transport takes any bytes (the unwritten tail of a partial
        :meth:`send_some_nowait` may lead). A WebSocket packs the frames into as few
        messages as its limit allows, never splitting a frame. Raises TransportClosed.
        """
        ...

    def send_some_nowait(self, data: bytes) -> int:
        """Write what goes out at once, without blocking or yielding: how many bytes of ``data`` went.

        0 if none, or if this transport cannot write synchronously (WebSocket); the rest
        must then follow through :meth:`send_all` before anything else. Never raises (a
        broken connection is left for ``send_all`` to report). Never called while a
        ``send_all`` is in progress (one writer).
        """
        ...

    def set_peer_limit(self, max_frame_bytes: int) -> None:
        """The peer accepts frames up to ``max_frame_bytes`` (the broker's WELCOME says so).

        A message-based transport packs at most ``max_frame_bytes + 4`` bytes of frames into
        one message from now on; a stream transport ignores it. Never raises.
        """
        ...

    def welcome_sent(self) -> None:
        """The broker has sent WELCOME: lift whatever bound this transport keeps on reading before it.

        A WebSocket accepted by the broker lets only a small budget of bytes be read until
        then (:mod:`broker.websocket`); a stream transport has nothing to lift (the decoder
        bounds what it buffers). The broker's session calls it once, right after WELCOME;
        clients never do. Never raises.
        """
        ...

    async def aclose(self) -> None:
        """Close: bounded in time, never raises (idempotent)."""
        ...


class StreamTransport:
    """A :class:`Transport` over a trio Stream: bytes pass as they are.

    ``receive_bytes``: bytes asked of the stream per read. ``linger`` (the broker): on
    close, send EOF and drain unread input for up to :data:`LINGER_S` (at most
    :data:`LINGER_MAX_BYTES`), so a last ERROR frame reaches the peer instead of being
    destroyed by a reset; over TLS (a ``trio.SSLStream``, which cannot half-close) send TLS's
    close_notify instead of the EOF and read until the peer closes; without ``linger``, close at once.
    """

    __slots__ = ("_fd", "_linger", "_receive_bytes", "stream")

    def __init__(
        self, stream: trio.abc.Stream, *, receive_bytes: int = RECEIVE_CHUNK_BYTES, linger: bool = False
    ) -> None:
        self.stream = stream
        self._receive_bytes = receive_bytes
        self._linger = linger
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1

    async def receive_some(self) -> bytes:
        """The next chunk of the stream; ``b""`` at its end. Raises TransportClosed."""
        try:
            return bytes(await self.stream.receive_some(self._receive_bytes))
        except _ERRORS as exc:
            raise TransportClosed(_reason(exc)) from None

    async def send_all(self, data: bytes) -> None:
        """Write all of ``data`` (any bytes: a stream does not care about frame boundaries). Raises TransportClosed."""
        try:
            await self.stream.send_all(data)
        except _ERRORS as exc:
            raise TransportClosed(_reason(exc)) from None

    def send_some_nowait(self, data: bytes) -> int:
        """``os.write`` on the socket's non-blocking descriptor; 0 on a non-socket stream,
        if the kernel buffer is full, or if the socket broke (``send_all`` will say so)."""
        if self._fd < 0:
            return 0
        try:
            return os.write(self._fd, data)
        except OSError:  # would block (EAGAIN), or broken
            return 0

    def set_peer_limit(self, max_frame_bytes: int) -> None:
        """Nothing to do: a byte stream has no message size."""

    def welcome_sent(self) -> None:
        """Nothing to do: the decoder bounds what a byte stream buffers before WELCOME (8,192 bytes)."""

    async def aclose(self) -> None:
        """Close (after the linger, if asked for); bounded by :data:`LINGER_S`; never raises."""
        self._fd = -1  # before the socket closes: its number may be reused at once
        stream = self.stream
        try:
            if self._linger and isinstance(stream, trio.abc.HalfCloseableStream):
                await stream.send_eof()
                await _drain(stream)
            elif self._linger and isinstance(stream, trio.SSLStream):
                # TLS's EOF is its close_notify: unwrap() sends it (the peer's reader ends at once, as on a TCP EOF)
                # and reads what the peer still sends until it closes, so nothing unread makes the close a reset.
                with trio.move_on_after(LINGER_S):
                    await stream.unwrap()
        except (*_ERRORS, trio.BusyResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


async def _drain(stream: trio.abc.ReceiveStream) -> None:
    """Read and drop the peer's input until it ends, for at most LINGER_S and LINGER_MAX_BYTES."""
    drained = 0
    with trio.move_on_after(LINGER_S):
        while drained < LINGER_MAX_BYTES:
            data = await stream.receive_some(RECEIVE_CHUNK_BYTES)
            if not data:
                break
            drained += len(data)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
