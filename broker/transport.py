"""Transports: how a session moves bytes, whatever carries them.

A session reads chunks of the byte stream and writes batches of whole encoded frames.
:class:`StreamTransport` adapts any trio Stream (TCP, TLS, or a memory stream in tests):
it coalesces a batch into one ``send_all``, so a busy connection costs one syscall per
batch, not per frame. trio's Broken/Closed errors are translated to
:class:`TransportClosed` here and nowhere else.
"""

from __future__ import annotations

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
    async def receive_some(self) -> bytes:
        """The next chunk of the peer's byte stream; b"" at a clean end.

        Raises TransportClosed, or RemoteProtocolError for a framing violation only the
        transport can see (e.g. a text WebSocket message).
        """
        ...

    async def send_frames(self, frames: list[bytes]) -> None:
        """Write encoded frames, in order. Raises TransportClosed."""
        ...

    async def aclose(self) -> None:
        """Close, letting bytes already written reach the peer; bounded in time; never raises."""
        ...


class StreamTransport:
    """A Transport over a trio Stream: frames are concatenated into one write."""

    __slots__ = ("stream",)

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream

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

    async def aclose(self) -> None:
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
