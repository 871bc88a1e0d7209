"""Session logic over in-memory streams: the real broker's sessions, with no sockets.

Each client is a trio memory stream pair whose broker end goes to ``Broker.handle_transport``,
the same entry point the listeners use. What is checked here is the session's own logic
(authorisation by role, dispatch, takeover through presence, the window and its recount,
the order of deliveries and receipts), where a socket would add nothing but time. The last
test serves the whole broker on injected memory listeners, TCP-style and WebSocket.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
import trio.testing
from trio_websocket import wrap_client_stream

from broker.config import BrokerConfig
from broker.listeners import Listeners, MemoryListener
from broker.server import Broker
from broker.stats import STATS_NAMES
from broker.store.memory import MemoryStore
from wire import (
    Ack,
    Bye,
    Cleanup,
    CleanupResult,
    Connection,
    Deliver,
    Drained,
    Error,
    ErrorCode,
    Frame,
    Ping,
    Pong,
    Pull,
    Receipt,
    Role,
    Send,
    Stats,
    StatsResult,
    Status,
    StatusAck,
)
from wire.transport import StreamTransport
from wire.websocket import WebSocketTransport

from .raw import FrameClient, RawClient

TIMEOUT = 10


class Relay:
    """A broker without listeners, and a way to connect clients to it over memory streams."""

    def __init__(self, broker: Broker, nursery: trio.Nursery) -> None:
        self.broker = broker
        self.nursery = nursery

    async def connect(self, name: str, *, operator: bool = False, drained: bool = True) -> RawClient:
        client_side, broker_side = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.broker.handle_transport, StreamTransport(broker_side), "tcp")
        client = RawClient(client_side)
        await client.hello(self.broker.auth.issue(name, operator=operator))
        if drained and not operator:
            await client.expect(Drained)
        return client


@asynccontextmanager
async def relay(tmp_path: Path, **overrides: Any) -> AsyncIterator[Relay]:
    config = BrokerConfig(data_dir=tmp_path, **overrides)
    broker = Broker(config, store=MemoryStore(config.store_limits))
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            yield Relay(broker, nursery)
            nursery.cancel_scope.cancel()


async def test_frames_are_refused_by_role_and_the_session_goes_on(tmp_path: Path) -> None:
    async with relay(tmp_path) as r:
        op = await r.connect("ops", operator=True)
        # Consecutive SENDs are one unit (one store call), so one refusal answers them.
        sends = (Send(id="a", to=("bob",), body=b""), Send(id="b", to=("bob",), body=b""))
        await op.send(*sends, Pull(), StatusAck(seqs=(1,)), Ping())
        errors = [await op.expect(Error), await op.expect(Error), await op.expect(Error)]
        assert [(e.code, e.close) for e in errors] == [(ErrorCode.FORBIDDEN, False)] * 3
        assert errors[0].message == "send needs a mailbox; operator sessions have none"
        assert errors[1].message == "pull needs a mailbox; operator sessions have none"
        assert errors[2].message == "status_ack needs a mailbox; operator sessions have none"
        await op.expect(Pong)
        bob = await r.connect("bob")
        await bob.send(StatusAck(seqs=(7,)), Stats(), Cleanup(), Ping())  # an unknown seq: ignored, no answer
        refusals = [await bob.expect(Error), await bob.expect(Error)]
        assert [e.message for e in refusals] == ["stats needs an operator token", "cleanup needs an operator token"]
        await bob.expect(Pong)
        assert await r.broker.store.pending("bob", r.broker.clock()) == 0


async def test_operator_stats_carry_every_name_in_wire_order_and_cleanup_answers(tmp_path: Path) -> None:
    async with relay(tmp_path) as r:
        bob = await r.connect("bob")
        alice = await r.connect("alice")
        await alice.send(Send(id="m1", to=("bob",), body=b"x"))
        await alice.expect(Receipt)
        await bob.expect(Deliver)
        op = await r.connect("ops", operator=True)
        await op.send(Stats(), Cleanup())
        stats = (await op.expect(StatsResult)).stats
        assert list(stats) == list(STATS_NAMES)
        assert (stats["connections"], stats["online_users"], stats["delivered_total"], stats["inflight"]) == (
            3,
            2,
            1,
            1,
        )
        assert (await op.expect(CleanupResult)).purged == 0


async def test_a_message_to_oneself_is_delivered_before_its_receipt(tmp_path: Path) -> None:
    """Routing names whom to wake and the session wakes them before it writes the receipts."""
    async with relay(tmp_path) as r:
        alice = await r.connect("alice")
        await alice.send(Send(id="m1", to=("alice",), body=b"me"))
        deliver = await alice.expect(Deliver)
        receipt = await alice.expect(Receipt)
        assert (deliver.id, receipt.results["alice"].status) == ("m1", Status.DELIVERED)


async def test_takeover_kicks_the_old_session_and_redelivers_its_inflight(tmp_path: Path) -> None:
    async with relay(tmp_path) as r:
        alice = await r.connect("alice")
        old = await r.connect("bob")
        await alice.send(Send(id="m1", to=("bob",), body=b"x"))
        await alice.expect(Receipt)
        assert (await old.expect(Deliver)).attempt == 1
        new = await r.connect("bob", drained=False)
        error = await old.expect(Error)
        assert (error.code, error.close) == (ErrorCode.CONNECTED_ELSEWHERE, True)
        await old.expect_closed()
        before, drained = await new.until(Drained)
        assert [(f.id, f.attempt) for f in before if isinstance(f, Deliver)] == [("m1", 2)]
        assert drained.pending == 1
        await alice.send(Send(id="m2", to=("bob",), body=b"y"))
        assert (await alice.expect(Receipt)).results["bob"].status is Status.DELIVERED
        assert (await new.expect(Deliver)).id == "m2"


async def test_an_ack_from_outside_the_session_reopens_its_window(tmp_path: Path) -> None:
    """An ACK that does not come over the session (HTTP) makes it recount through presence."""
    async with relay(tmp_path, max_inflight=1) as r:
        bob = await r.connect("bob")
        await r.broker.route("alice", [Send(id="m1", to=("bob",), body=b""), Send(id="m2", to=("bob",), body=b"")])
        assert (await bob.expect(Deliver)).id == "m1"
        await bob.send(Ping())
        await bob.expect(Pong)  # m2 waits: the window is full
        assert (await r.broker.acknowledge("bob", ["m1"])).deleted == 1
        assert (await bob.expect(Deliver)).id == "m2"


async def test_the_window_holds_until_acks_arrive_over_the_session(tmp_path: Path) -> None:
    async with relay(tmp_path, max_inflight=2) as r:
        bob = await r.connect("bob")
        await r.broker.route("alice", [Send(id=f"m{i}", to=("bob",), body=b"") for i in range(5)])
        got = [(await bob.expect(Deliver)).id for _ in range(2)]
        await bob.send(Ping())
        await bob.expect(Pong)
        await bob.send(Ack(ids=tuple(got)))
        got += [(await bob.expect(Deliver)).id for _ in range(2)]
        await bob.send(Ack(ids=(got[2],)), Ack(ids=(got[3],)))  # two ACKs, one store call
        got.append((await bob.expect(Deliver)).id)
        assert got == [f"m{i}" for i in range(5)]


async def test_pull_redelivers_inflight_with_the_next_attempt_then_drained(tmp_path: Path) -> None:
    async with relay(tmp_path) as r:
        bob = await r.connect("bob")
        await r.broker.route("alice", [Send(id="m1", to=("bob",), body=b"")])
        assert (await bob.expect(Deliver)).attempt == 1
        await bob.send(Pull())
        assert (await bob.expect(Deliver)).attempt == 2
        assert (await bob.expect(Drained)).pending == 1


async def test_bye_ends_the_session_ignores_what_follows_and_frees_the_mailbox(tmp_path: Path) -> None:
    async with relay(tmp_path) as r:
        bob = await r.connect("bob")
        assert "bob" in r.broker.presence
        await bob.send(Bye(), Ping())
        await bob.expect_closed()
        while r.broker.sessions:
            await trio.sleep(0.01)
        assert "bob" not in r.broker.presence
        receipts = await r.broker.route("alice", [Send(id="m1", to=("bob",), body=b"")])
        assert receipts[0].results["bob"].status is Status.QUEUED


class WsClient(FrameClient):
    """A test client over a WebSocket (wire.websocket's transport), frames in and out via a Connection."""

    def __init__(self, transport: WebSocketTransport) -> None:
        self.transport = transport
        self.conn = Connection(Role.CLIENT)
        self.frames: list[Frame] = []

    async def send(self, *frames: Frame) -> None:
        await self.transport.send_all(b"".join(self.conn.send(f) for f in frames))

    async def next(self) -> Frame:
        while not self.frames:
            self.frames.extend(self.conn.receive_data(await self.transport.receive_some()))
        return self.frames.pop(0)


async def test_the_served_broker_takes_injected_memory_listeners_for_tcp_and_websocket(tmp_path: Path) -> None:
    tcp, ws = MemoryListener(), MemoryListener()
    config = BrokerConfig(data_dir=tmp_path, http_port=0)
    broker = Broker(config, listeners=Listeners(tcp=[tcp], ws=[ws]))
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(broker.serve)
            assert (broker.tcp_port, broker.ws_port) == (None, None)
            bob = RawClient(await tcp.connect())
            await bob.hello(broker.auth.issue("bob"))
            await bob.expect(Drained)
            stream: Any = await ws.connect()
            ws_conn = await wrap_client_stream(nursery, stream, "relay.test", "/relay")
            alice = WsClient(WebSocketTransport(ws_conn))
            await alice.hello(broker.auth.issue("alice"))
            await alice.expect(Drained)
            await alice.send(Send(id="m1", to=("bob",), body=b"over memory"))
            assert (await alice.expect(Receipt)).results["bob"].status is Status.DELIVERED
            assert (await bob.expect(Deliver)).body == b"over memory"
            nursery.cancel_scope.cancel()
