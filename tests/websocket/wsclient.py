"""A bare WebSocket protocol client for tests: one binary message per frame, the sans-IO Connection.

Like tests/broker/raw.py, it checks nothing on its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from wire import Connection, Frame, Role, Welcome

from ..broker.raw import FrameClient


class WsClient(FrameClient):
    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.conn = Connection(Role.CLIENT)

    async def send(self, *frames: Frame) -> None:
        for frame in frames:
            await self.ws.send_message(self.conn.send(frame))

    async def send_raw(self, message: bytes | str) -> None:
        await self.ws.send_message(message)

    async def next(self) -> Frame:
        """The next frame; each message must hold exactly one."""
        try:
            message = await self.ws.get_message()
        except ConnectionClosed:
            raise EOFError("the broker closed the WebSocket") from None
        assert isinstance(message, bytes), "the broker sent a text message"
        assert int.from_bytes(message[:4], "big") == len(message) - 4, "message is not exactly one frame"
        frames = self.conn.receive_data(message)
        assert len(frames) == 1
        return frames[0]

    async def expect_closed(self) -> None:
        """The broker closes the WebSocket (after any frames still queued)."""
        while True:
            try:
                await self.ws.get_message()
            except ConnectionClosed:
                return


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
