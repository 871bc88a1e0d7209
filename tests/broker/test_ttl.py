"""TTL expiry through the whole broker: under trio's MockClock over memory streams, and over real TCP."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from broker.config import BrokerConfig
from broker.server import Broker
from broker.store.memory import MemoryStore
from wire import Ack, Deliver, Drained, Receipt, Send
from wire.transport import StreamTransport

from ..store.clock import trio_clock_ms
from .raw import RawClient

DAY_S = 86400


async def memory_client(broker: Broker, nursery: trio.Nursery, name: str) -> RawClient:
    """A client wired to the broker through an in-memory stream pair (no sockets: MockClock is safe)."""
    client_side, broker_side = trio.testing.memory_stream_pair()
    nursery.start_soon(broker.handle_transport, StreamTransport(broker_side), "tcp")
    client = RawClient(client_side)
    # The mock clock runs months ahead, and a session ends with its token (rule 22): this one outlives the test.
    await client.hello(broker.auth.issue(name, lifetime_s=10 * 365 * DAY_S))
    return client


async def test_week_old_message_is_never_delivered_and_the_hourly_sweep_purges_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = BrokerConfig(data_dir=tmp_path, keepalive_s=30 * DAY_S, cleanup_interval_s=3600)
    broker = Broker(config, clock=trio_clock_ms, store=MemoryStore(config.store_limits))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(broker.sweep_forever)
        await trio.sleep(1800)  # half-way between sweeps, so expiry and sweep do not coincide
        alice = await memory_client(broker, nursery, "alice")
        await alice.expect(Drained)
        await alice.send(
            Send(id="old", to=("bob",), body=b"stale"), Send(id="fresh", to=("bob",), body=b"x", ttl_s=30 * DAY_S)
        )
        await alice.expect(Receipt)
        await alice.expect(Receipt)
        await trio.sleep(7 * DAY_S - 1)
        assert (await broker.statistics())["messages_expired_unswept"] == 0
        await trio.sleep(1)  # the first instant of expiry, before any sweep has seen it
        stats = await broker.statistics()
        assert (stats["messages_expired_unswept"], stats["expired_total"]) == (1, 0)
        bob = await memory_client(broker, nursery, "bob")
        before, drained = await bob.until(Drained)
        assert [f.id for f in before if isinstance(f, Deliver)] == ["fresh"]
        assert drained.pending == 1
        await bob.send(Ack(ids=("fresh",)))
        await trio.sleep(3600)  # the sweeper's next round
        stats = await broker.statistics()
        assert (stats["messages_total"], stats["expired_total"], stats["unique_recipients"]) == (0, 1, 0)
        nursery.cancel_scope.cancel()


async def test_inflight_message_that_expires_frees_the_window(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = BrokerConfig(data_dir=tmp_path, keepalive_s=30 * DAY_S, max_inflight=1, cleanup_interval_s=60)
    broker = Broker(config, clock=trio_clock_ms, store=MemoryStore(config.store_limits))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(broker.sweep_forever)
        alice = await memory_client(broker, nursery, "alice")
        await alice.expect(Drained)
        bob = await memory_client(broker, nursery, "bob")
        await bob.expect(Drained)
        await alice.send(Send(id="short", to=("bob",), body=b"", ttl_s=10), Send(id="next", to=("bob",), body=b""))
        assert (await bob.expect(Deliver)).id == "short"
        # bob never ACKs "short"; once it expires and is swept, the window opens for "next".
        assert (await bob.expect(Deliver)).id == "next"
        assert (await broker.statistics())["expired_total"] == 1
        nursery.cancel_scope.cancel()


async def test_short_ttl_expires_over_real_tcp(broker_factory) -> None:  # type: ignore[no-untyped-def]
    async with broker_factory(cleanup_interval_s=0.2) as broker:
        with trio.fail_after(10):
            alice, _ = await RawClient.login(broker.tcp_port, broker.auth.issue("alice"))
            await alice.expect(Drained)
            await alice.send(Send(id="brief", to=("bob",), body=b"gone soon", ttl_s=1))
            await alice.expect(Receipt)
            while (await broker.statistics())["expired_total"] == 0:
                await trio.sleep(0.1)
            bob, welcome = await RawClient.login(broker.tcp_port, broker.auth.issue("bob"))
            assert welcome.pending == 0
            before, drained = await bob.until(Drained)
            assert before == [] and drained.pending == 0
            stats = await broker.statistics()
            assert (stats["messages_total"], stats["expired_total"], stats["delivered_total"]) == (0, 1, 0)
