"""A bare protocol client for broker tests: the sans-IO Connection over a trio Stream.

It checks nothing on its own; tests say exactly which frames they expect.
"""

from __future__ import annotations

from collections import deque
from typing import TypeVar

import trio

from wire import Connection, Frame, Hello, Role, Welcome

F = TypeVar("F", bound=Frame)


class FrameClient:
    """What every test client does the same way over any transport: handshake, expect, until."""

    conn: Connection

    async def send(self, *frames: Frame) -> None:
        raise NotImplementedError

    async def next(self) -> Frame:
        raise NotImplementedError

    async def hello(self, token: str) -> Welcome:
        await self.send(Hello(version=1, token=token))
        return await self.expect(Welcome)

    async def expect(self, kind: type[F]) -> F:
        frame = await self.next()
        assert isinstance(frame, kind), f"expected {kind.__name__}, got {frame!r}"
        return frame

    async def expect_each(self, *kinds: type[Frame]) -> list[Frame]:
        """The next ``len(kinds)`` frames, one of each kind in any order, returned in the order of ``kinds``.

        For frames whose relative order the protocol leaves open: a message to oneself is
        answered by a RECEIPT and a DELIVER, either first.
        """
        found: dict[type[Frame], Frame] = {}
        for _ in kinds:
            frame = await self.next()
            kind = type(frame)
            assert kind in kinds and kind not in found, f"expected one each of {kinds}, got {frame!r}"
            found[kind] = frame
        return [found[kind] for kind in kinds]

    async def until(self, kind: type[F]) -> tuple[list[Frame], F]:
        """Frames before the first ``kind`` frame, and that frame."""
        before: list[Frame] = []
        while True:
            frame = await self.next()
            if isinstance(frame, kind):
                return before, frame
            before.append(frame)


class RawClient(FrameClient):
    """Over a trio Stream (TCP, or a memory stream)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = Connection(Role.CLIENT)
        self.frames: deque[Frame] = deque()
        self.eof = False

    @classmethod
    async def open(cls, port: int) -> RawClient:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    @classmethod
    async def login(cls, port: int, token: str) -> tuple[RawClient, Welcome]:
        client = await cls.open(port)
        welcome = await client.hello(token)
        return client, welcome

    async def send(self, *frames: Frame) -> None:
        await self.stream.send_all(b"".join(self.conn.send(f) for f in frames))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self) -> None:
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            data = b""
        if not data:
            self.eof = True
            raise EOFError("the broker closed the connection")
        self.frames.extend(self.conn.receive_data(data))

    async def next(self) -> Frame:
        while not self.frames:
            await self._fill()
        return self.frames.popleft()

    async def expect_closed(self) -> None:
        """Every remaining frame is read; then the broker must close the connection."""
        while True:
            try:
                await self._fill()
            except EOFError:
                return

    async def aclose(self) -> None:
        await self.stream.aclose()
