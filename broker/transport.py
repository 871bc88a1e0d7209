"""Transports: how a session moves bytes, whatever carries them.

A session reads chunks of the byte stream and writes batches of whole encoded frames.
:class:`StreamTransport` adapts any trio Stream (TCP, TLS, or a memory stream in tests):
it coalesces a batch into one ``send_all``, so a busy connection costs one syscall per
batch, not per frame. trio's Broken/Closed errors are translated to
:class:`TransportClosed` here and nowhere else.
"""

from __future__ import annotations

import os
from typing import Protocol

import trio

__all__ = ["RECEIVE_CHUNK_BYTES", "StreamTransport", "Transport", "TransportClosed", "first_os_error"]

RECEIVE_CHUNK_BYTES = 65536
"""Bytes asked of the kernel per read: many frames at once under load, little waste when idle."""
LINGER_S = 1.0
"""On close, how long unread input is drained so the kernel sends FIN, not RST (which would
destroy a last ERROR frame still in flight to the peer)."""
LINGER_MAX_BYTES = 1024 * 1024
"""On close, the most unread input drained before giving up and resetting."""


class TransportClosed(Exception):
    """The peer went away or the transport broke; nothing more can be sent or received."""


class Transport(Protocol):
    byte_stream: bool
    """True if written bytes form one stream that frames may be split or joined in (TCP);
    False if each frame must be written whole, on its own (one WebSocket message per frame)."""

    async def receive_some(self) -> bytes:
        """The next chunk of the peer's byte stream; b"" at a clean end.

        Raises TransportClosed, or RemoteProtocolError for a framing violation only the
        transport can see (e.g. a text WebSocket message).
        """
        ...

    async def send_frames(self, frames: list[bytes]) -> None:
        """Write encoded frames, in order. Raises TransportClosed."""
        ...

    def try_send(self, data: bytes) -> int:
        """Write what the kernel takes at once, without blocking: how many bytes of ``data`` went out.

        0 when nothing can go out now or the transport cannot write synchronously (then the
        caller's writer task sends it). Never raises: a broken connection is left for
        ``send_frames`` to report. Callers must not use it while a ``send_frames`` is in progress.
        """
        ...

    def open_limit(self, max_frame_bytes: int) -> None:
        """The session is OPEN (WELCOME sent): accept frames up to ``max_frame_bytes`` from now on.

        Before that the broker accepts at most ``MAX_HELLO_FRAME_BYTES``; a transport that
        buffers whole messages itself (WebSocket) must hold no more than that meanwhile.
        """
        ...

    async def aclose(self) -> None:
        """Close, letting bytes already written reach the peer; bounded in time; never raises."""
        ...


class StreamTransport:
    """A Transport over a trio Stream: frames are concatenated into one write.

    Over a socket (``trio.SocketStream``), :meth:`try_send` writes straight to the
    non-blocking file descriptor; other streams (TLS, memory streams) always leave
    writing to ``send_frames``.
    """

    __slots__ = ("_fd", "stream")
    byte_stream = True

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1

    async def receive_some(self) -> bytes:
        try:
            return bytes(await self.stream.receive_some(RECEIVE_CHUNK_BYTES))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise TransportClosed(str(exc)) from None

    async def send_frames(self, frames: list[bytes]) -> None:
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise TransportClosed(str(exc)) from None

    def open_limit(self, max_frame_bytes: int) -> None:
        pass  # the session's decoder holds the byte stream's limit: nothing is buffered here

    def try_send(self, data: bytes) -> int:
        if self._fd < 0:
            return 0
        try:
            return os.write(self._fd, data)
        except OSError:  # would block (EAGAIN), or broken: send_frames will say which
            return 0

    async def aclose(self) -> None:
        self._fd = -1  # before the socket closes: its number may be reused at once
        stream = self.stream
        try:
            if isinstance(stream, trio.abc.HalfCloseableStream):
                await stream.send_eof()
                drained = 0
                with trio.move_on_after(LINGER_S):
                    while drained < LINGER_MAX_BYTES:
                        data = await stream.receive_some(RECEIVE_CHUNK_BYTES)
                        if not data:
                            break
                        drained += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


def first_os_error(exc: BaseException) -> OSError | None:
    """The first OSError in ``exc``, however deep in exception groups (e.g. a listener that cannot bind)."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := first_os_error(inner)) is not None:
                return found
    return None
