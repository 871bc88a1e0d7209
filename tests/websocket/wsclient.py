"""A bare WebSocket protocol client for tests: whole frames in binary messages, the sans-IO Connection.

Like tests/broker/raw.py, it checks nothing on its own beyond protocol.md 2.5's framing: each
message from the broker must hold whole frames (one or more). ``send`` writes one frame per
message; ``send_packed`` puts several frames in one message.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request

from wire import Connection, Frame, Role, Welcome

from ..broker.raw import FrameClient


class WsClient(FrameClient):
    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.conn = Connection(Role.CLIENT)
        self.frames: deque[Frame] = deque()
        self.messages = 0
        """Binary messages received so far."""

    async def send(self, *frames: Frame) -> None:
        for frame in frames:
            await self.ws.send_message(self.conn.send(frame))

    async def send_packed(self, *frames: Frame) -> None:
        """All ``frames`` in one binary message."""
        await self.ws.send_message(b"".join(self.conn.send(frame) for frame in frames))

    async def send_raw(self, message: bytes | str) -> None:
        await self.ws.send_message(message)

    async def next(self) -> Frame:
        """The next frame; each message must end at a frame boundary."""
        while not self.frames:
            try:
                message = await self.ws.get_message()
            except ConnectionClosed:
                raise EOFError("the broker closed the WebSocket") from None
            assert isinstance(message, bytes), "the broker sent a text message"
            assert _whole(message), "the broker sent a message that ends mid-frame"
            self.messages += 1
            self.frames.extend(self.conn.receive_data(message))
        return self.frames.popleft()

    async def expect_closed(self) -> int | None:
        """The broker closes the WebSocket (after any frames still queued): its close code."""
        while True:
            try:
                await self.ws.get_message()
            except ConnectionClosed as exc:
                return exc.reason.code if exc.reason is not None else None


def _whole(message: bytes) -> bool:
    pos = 0
    while pos + 4 <= len(message):
        pos += 4 + int.from_bytes(message[pos : pos + 4], "big")
    return pos == len(message)


def ws_url(port: int | None) -> str:
    assert port is not None
    return f"ws://127.0.0.1:{port}/relay"


@asynccontextmanager
async def open_ws(port: int | None, *, origin: str | None = None, path: str = "/relay") -> AsyncIterator[WsClient]:
    headers = [(b"origin", origin.encode())] if origin is not None else None
    url = ws_url(port).replace("/relay", path)
    async with open_websocket_url(
        url, extra_headers=headers, max_message_size=16 * 1024 * 1024, connect_timeout=10, disconnect_timeout=2
    ) as ws:
        yield WsClient(ws)


@asynccontextmanager
async def login_ws(port: int | None, token: str, **kwargs: str) -> AsyncIterator[tuple[WsClient, Welcome]]:
    async with open_ws(port, **kwargs) as client:
        welcome = await client.hello(token)
        yield client, welcome


async def upgraded(port: int | None) -> tuple[trio.SocketStream, WSConnection]:
    """A TCP connection upgraded to WebSocket by a sans-IO wsproto client, for tests that write raw WebSocket
    frames (half messages, floods): the stream, and the wsproto connection to decode what the broker sends."""
    assert port is not None
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host="127.0.0.1", target="/relay")))
    while not any(isinstance(e, AcceptConnection) for e in ws.events()):
        data = await stream.receive_some(65536)
        assert data, "the broker closed the connection during the upgrade"
        ws.receive_data(data)
    return stream, ws
