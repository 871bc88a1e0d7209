"""Fakes for the client tests: a tapping, breakable transport and a broker that can be restarted."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from broker.config import BrokerConfig
from broker.server import Broker
from client.transport import Endpoint, Transport, TransportClosed, open_transport
from wire import Ack, Frame, FrameDecoder, Receipt, StatusAck, encode_frame

_TAP_LIMIT = 64 * 1024 * 1024


class FaultyTransport:
    """A real transport (whatever the URL names) that records the frames passing each way and can be broken."""

    def __init__(self, inner: Transport, network: FaultyNetwork) -> None:
        self.inner = inner
        self.network = network
        self._in = FrameDecoder(_TAP_LIMIT)
        self._out = FrameDecoder(_TAP_LIMIT)
        self.broken = False

    async def receive_some(self) -> bytes:
        network = self.network
        while True:
            data = await self.inner.receive_some()
            frames = self._in.feed(data)
            network.received += frames
            if network.lose_receipts and any(type(f) is Receipt for f in frames):
                network.lose_receipts -= 1
                await self.break_()
                raise TransportClosed("test: connection broke before the receipt arrived")
            if not network.reorder or not data:
                return data
            # Frames are passed on re-encoded, so RECEIPTs can be held back while ``hold_receipts``.
            if network.hold_receipts:
                network.held += [f for f in frames if type(f) is Receipt]
                frames = [f for f in frames if type(f) is not Receipt]
            else:
                frames, network.held = network.held + frames, []
            if frames:
                return b"".join(encode_frame(f) for f in frames)

    async def send_all(self, data: bytes) -> None:
        network = self.network
        frames = self._out.feed(data)
        if network.lose_acks and any(type(f) is Ack for f in frames):
            network.lose_acks -= 1
            await self.break_()
            raise TransportClosed("test: connection broke while the ACK was written")
        if network.drop_status_acks and any(type(f) is StatusAck for f in frames):
            kept = []
            for f in frames:
                if type(f) is StatusAck and network.drop_status_acks:
                    network.drop_status_acks -= 1
                    network.dropped.append(f)
                else:
                    kept.append(f)
            frames = kept
            data = b"".join(encode_frame(f) for f in frames)
        network.sent += frames
        await self.inner.send_all(data)

    def send_some_nowait(self, data: bytes) -> int:
        return 0  # every write goes through send_all, so the tap sees it

    def set_peer_limit(self, max_frame_bytes: int) -> None:
        self.inner.set_peer_limit(max_frame_bytes)

    def welcome_sent(self) -> None:
        self.inner.welcome_sent()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def break_(self) -> None:
        self.broken = True
        await self.inner.aclose()


class FaultyNetwork:
    """A transport factory for ``open_client(transport_factory=...)``.

    ``received`` / ``sent`` hold every frame seen; ``lose_acks`` / ``lose_receipts`` count how
    many more connections break at the next write with an ACK / read with a RECEIPT in it;
    :meth:`cut` breaks the current connection from outside. ``drop_status_acks`` counts how many
    more STATUS_ACK frames are silently not written (kept in ``dropped``). Made with
    ``reorder=True``, received frames are passed on re-encoded, and while ``hold_receipts`` is
    set RECEIPTs are held back (in ``held``) until a read after it is cleared.
    """

    def __init__(self, *, reorder: bool = False) -> None:
        self.transports: list[FaultyTransport] = []
        self.received: list[Frame] = []
        self.sent: list[Frame] = []
        self.lose_acks = 0
        self.lose_receipts = 0
        self.drop_status_acks = 0
        self.dropped: list[Frame] = []
        self.reorder = reorder
        self.hold_receipts = False
        self.held: list[Frame] = []

    @asynccontextmanager
    async def __call__(self, endpoint: Endpoint) -> AsyncIterator[Transport]:
        async with open_transport(endpoint) as inner:
            transport = FaultyTransport(inner, self)
            self.transports.append(transport)
            yield transport

    async def cut(self) -> None:
        await self.transports[-1].break_()

    def received_of(self, kind: type[Frame]) -> list[Any]:
        return [f for f in self.received if type(f) is kind]


class BrokerRunner:
    """Starts and stops brokers in a nursery; the same data_dir means the same secret, so tokens stay valid."""

    def __init__(self, nursery: trio.Nursery, data_dir: Path) -> None:
        self.nursery = nursery
        self.data_dir = data_dir
        self._scope: trio.CancelScope | None = None
        self._stopped: trio.Event | None = None

    async def start(self, port: int = 0, **overrides: Any) -> Broker:
        # ws_port/http_port 0: the WebSocket and HTTP listeners (issue 3) on free ports too.
        broker = Broker(BrokerConfig(tcp_port=port, ws_port=0, http_port=0, data_dir=self.data_dir, **overrides))
        self._scope, self._stopped = trio.CancelScope(), trio.Event()
        await self.nursery.start(self._serve, broker, self._scope, self._stopped)
        return broker

    async def stop(self) -> None:
        """Stop the running broker the way cancellation does (every session gets SHUTTING_DOWN)."""
        assert self._scope is not None and self._stopped is not None
        self._scope.cancel()
        await self._stopped.wait()

    @staticmethod
    async def _serve(
        broker: Broker, scope: trio.CancelScope, stopped: trio.Event, *, task_status: trio.TaskStatus[Broker]
    ) -> None:
        try:
            with scope:
                await broker.serve(task_status=task_status)
        finally:
            stopped.set()


def url_of(broker: Broker) -> str:
    return f"tcp://127.0.0.1:{broker.tcp_port}"


class Clock:
    """The broker's clock (epoch ms): the wall clock plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset_ms = 0

    def __call__(self) -> int:
        return time.time_ns() // 1_000_000 + self.offset_ms


async def until(predicate: Callable[[], Awaitable[bool]]) -> None:
    """Wait until ``predicate()`` is true, asking again every 10 ms (bound it with ``trio.fail_after``)."""
    while not await predicate():
        await trio.sleep(0.01)
