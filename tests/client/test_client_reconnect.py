"""Failures between client and broker: lost ACKs and receipts, cut connections, a killed client,
a restarted broker. Nothing may be lost, and the local store must hold exactly one copy."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio
from relay_testing import BrokerRunner, FaultyNetwork, url_of

from broker.server import Broker
from client import (
    ConnectionLost,
    Delivery,
    LocalStore,
    LocalStoreError,
    OutgoingMessage,
    Status,
    open_client,
)
from tests.conftest import STORES
from wire import Ack, Deliver, Send

pytestmark = pytest.mark.stores(*STORES)

TIMEOUT_S = 20
FAST = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05}


async def fill_mailbox(broker: Broker, to: str, n: int, prefix: str = "m") -> list[str]:
    ids = [f"{prefix}{i}" for i in range(n)]
    async with open_client(url_of(broker), broker.auth.issue("alice"), e2e=False) as alice:
        receipts = await alice.send_batch([OutgoingMessage(to, b"body %s" % i.encode(), id=i) for i in ids])
    assert all(r.results[to].status is Status.QUEUED for r in receipts)
    return ids


async def test_lost_ack_gives_redelivery_with_attempt_2_and_one_copy_in_the_store(
    broker: Broker, tmp_path: Path, network: FaultyNetwork
) -> None:
    await fill_mailbox(broker, "bob", 1)
    network.lose_acks = 1  # the first ACK dies with its connection
    with LocalStore(tmp_path / "bob.sqlite3") as store, trio.fail_after(TIMEOUT_S):
        async with open_client(
            url_of(broker), broker.auth.issue("bob"), local_store=store, transport_factory=network, **FAST
        ) as bob:
            yielded = [d async for d in bob.deliveries(until_drained=True)]
            while bob.connects < 2 or (await broker.statistics())["messages_total"]:
                await trio.sleep(0.01)
            await bob.wait_drained()
            yielded += [d async for d in bob.deliveries(until_drained=True)]
        assert [(d.id, d.attempt) for d in yielded] == [("m0", 1)]
        assert [(f.id, f.attempt) for f in network.received_of(Deliver)] == [("m0", 1), ("m0", 2)]
        assert [m.id for m in store.messages("bob")] == ["m0"]
    stats = await broker.statistics()
    assert stats["messages_total"] == 0 and stats["redelivered_total"] == 1


class KillAfterSave(LocalStore):
    """A store whose first save commits and then kills the client (cancels it) before any ACK."""

    def __init__(self, path: Path, scope: trio.CancelScope) -> None:
        super().__init__(path)
        self.scope = scope
        self.saves = 0

    def save_incoming(self, mailbox: str, messages: Any) -> list[bool]:
        result = super().save_incoming(mailbox, messages)
        self.saves += 1
        if self.saves == 1:
            trio.from_thread.run_sync(self.scope.cancel)
        return result


async def test_client_killed_between_save_and_ack_keeps_exactly_one_copy(
    broker: Broker, tmp_path: Path, network: FaultyNetwork
) -> None:
    ids = await fill_mailbox(broker, "bob", 3)
    path = tmp_path / "bob.sqlite3"
    token = broker.auth.issue("bob")
    with trio.fail_after(TIMEOUT_S):
        with trio.CancelScope() as killer:
            store = KillAfterSave(path, killer)
            async with open_client(url_of(broker), token, local_store=store, transport_factory=network) as bob:
                async for _ in bob.deliveries():
                    pytest.fail("killed before anything was yielded")  # pragma: no cover
        assert killer.cancelled_caught
        store.close()
        assert not any(type(f).__name__ == "Ack" for f in network.sent)
        with LocalStore(path) as first:
            assert [m.id for m in first.messages("bob")] == ids
        with LocalStore(path) as store2:
            async with open_client(url_of(broker), token, local_store=store2) as bob:
                again = [d async for d in bob.deliveries(until_drained=True)]
            assert again == []  # redelivered (attempt 2), recognised as saved, ACKed, not yielded twice
            assert [m.id for m in store2.messages("bob")] == ids
    stats = await broker.statistics()
    assert stats["messages_total"] == 0 and stats["redelivered_total"] == 3


async def test_send_is_retried_with_the_same_id_after_a_lost_receipt(broker: Broker, network: FaultyNetwork) -> None:
    network.lose_receipts = 1
    with trio.fail_after(TIMEOUT_S):
        async with open_client(
            url_of(broker), broker.auth.issue("alice"), e2e=False, transport_factory=network, **FAST
        ) as alice:
            receipt = await alice.send("bob", b"once", id="idem-1")
            assert receipt.results["bob"].status is Status.DUPLICATE  # the first SEND was stored
            assert alice.connects == 2
    assert [f.id for f in network.sent if type(f) is Send] == ["idem-1", "idem-1"]
    stats = await broker.statistics()
    assert stats["messages_total"] == 1 and stats["duplicates_total"] == 1


async def test_reconnect_recovers_2000_messages_with_one_copy_each(
    broker_factory: Any, tmp_path: Path, network: FaultyNetwork
) -> None:
    # A window smaller than the backlog, so the cuts below land while messages are still queued.
    async with broker_factory(max_inflight=256) as broker:
        ids = await fill_mailbox(broker, "bob", 2000)
        seen: list[Delivery] = []
        with LocalStore(tmp_path / "bob.sqlite3") as store, trio.fail_after(TIMEOUT_S):
            async with open_client(
                url_of(broker), broker.auth.issue("bob"), local_store=store, transport_factory=network, **FAST
            ) as bob:
                async for d in bob.deliveries():
                    seen.append(d)
                    if len(seen) in (300, 1200):
                        while len(network.transports) < bob.connects:
                            await trio.sleep(0.001)
                        await network.cut()
                    if len(seen) == 2000:
                        break
                assert bob.connects >= 2
            assert sorted(d.id for d in seen) == sorted(ids)
            assert sorted(m.id for m in store.messages("bob")) == sorted(ids)
        assert (await broker.statistics())["messages_total"] == 0


async def test_sends_in_flight_survive_a_cut_connection(broker: Broker, network: FaultyNetwork) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with open_client(
            url_of(broker), broker.auth.issue("alice"), e2e=False, transport_factory=network, **FAST
        ) as alice:
            items = [OutgoingMessage("bob", b"x", id=f"s{i}") for i in range(3000)]
            async with trio.open_nursery() as nursery:
                results: list[Any] = []

                async def go() -> None:
                    results.extend(await alice.send_batch(items))

                nursery.start_soon(go)
                while not network.received_of(Deliver) and len(network.sent) < 10:
                    await trio.sleep(0)
                await network.cut()
            assert [r.id for r in results] == [i.id for i in items]
            assert {r.results["bob"].status for r in results} <= {Status.QUEUED, Status.DUPLICATE}
    assert (await broker.statistics())["messages_total"] == 3000


async def test_client_reconnects_after_a_broker_restart(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            runner = BrokerRunner(nursery, tmp_path / "broker-data")
            first = await runner.start()
            port = first.tcp_port
            assert port is not None
            async with open_client(url_of(first), first.auth.issue("alice"), e2e=False, **FAST) as alice:
                assert (await alice.send("bob", b"before")).results["bob"].status is Status.QUEUED
                await runner.stop()  # SHUTTING_DOWN is not fatal: alice keeps trying
                second = await runner.start(port)
                receipt = await alice.send("bob", b"after")  # goes out once alice is back
                assert receipt.results["bob"].status is Status.QUEUED
                assert alice.connects == 2
                async with open_client(url_of(second), second.auth.issue("bob")) as bob:
                    got = [d.body async for d in bob.deliveries(until_drained=True)]
                assert got == [b"after"]  # the memory store does not survive a restart
            await runner.stop()


async def test_without_reconnect_a_cut_connection_is_reported(broker: Broker, network: FaultyNetwork) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with open_client(
            url_of(broker), broker.auth.issue("bob"), transport_factory=network, reconnect=False
        ) as bob:
            await network.cut()
            with pytest.raises(ConnectionLost):
                async for _ in bob.deliveries():
                    pass  # pragma: no cover
            with pytest.raises(ConnectionLost):
                await bob.send("alice", b"x")


class FailingStore(LocalStore):
    def save_incoming(self, mailbox: str, messages: Any) -> list[bool]:
        raise sqlite3.OperationalError("disk I/O error")


async def test_a_failed_save_is_never_acked(broker: Broker, tmp_path: Path, network: FaultyNetwork) -> None:
    await fill_mailbox(broker, "bob", 2)
    with FailingStore(tmp_path / "bob.sqlite3") as store, trio.fail_after(TIMEOUT_S):
        async with open_client(
            url_of(broker), broker.auth.issue("bob"), local_store=store, transport_factory=network
        ) as bob:
            with pytest.raises(LocalStoreError, match="disk I/O error"):
                async for _ in bob.deliveries():
                    pass  # pragma: no cover
    assert not [f for f in network.sent if type(f) is Ack]
    assert (await broker.statistics())["messages_total"] == 2
