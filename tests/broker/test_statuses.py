"""Delivery statuses through the whole broker (protocol.md section 9, rule 19), on every store.

A sender that SENDs with ``notify`` hears, per recipient, "delivered" when that recipient's
ACK deleted the message, or "expired" when it expired un-ACKed: at once if it is connected,
else when it next connects, again after a reconnect or PULL until it STATUS_ACKs, and at most
``max_mailbox_statuses`` of them one by one. Real TCP, WebSocket and HTTP on 127.0.0.1; every
wait is for an outcome (``fail_after`` guards each test), never a timed assertion.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from broker.config import BrokerConfig
from broker.server import Broker
from broker.store.base import HeldStatus, Notice
from broker.store.memory import MemoryStore
from wire import (
    Ack,
    Bye,
    Deliver,
    Drained,
    Ping,
    Pong,
    Pull,
    Receipt,
    ReportState,
    Send,
    Status,
    StatusAck,
    StatusReport,
)

from ..conftest import STORES, running_broker
from ..store.clock import DAY_S, trio_clock_ms
from ..websocket.wsclient import login_ws
from .raw import FrameClient, RawClient
from .test_ttl import memory_client

pytestmark = pytest.mark.stores(*STORES)

TIMEOUT = 20


def send(mid: str, *to: str, ttl_s: int | None = None, notify: bool = True) -> Send:
    return Send(id=mid, to=to, body=b"x", ttl_s=ttl_s, notify=notify)


async def login(broker: Broker, name: str, *, operator: bool = False) -> RawClient:
    assert broker.tcp_port is not None
    client, _ = await RawClient.login(broker.tcp_port, broker.auth.issue(name, operator=operator))
    return client


async def online(broker: Broker, name: str) -> RawClient:
    """A session for ``name`` that has had its DRAINED (its mailbox empty)."""
    client = await login(broker, name)
    await client.expect(Drained)
    return client


async def barrier(client: FrameClient) -> None:
    """Every frame the client sent before has been applied (PONG is a barrier, rule 11)."""
    await client.send(Ping())
    await client.expect(Pong)


async def leave(client: RawClient) -> None:
    """BYE, then wait for the broker to close: the session has released its mailbox."""
    await client.send(Bye())
    await client.expect_closed()


async def receive(client: FrameClient, *ids: str) -> list[Deliver]:
    """The DELIVERs of ``ids``, in order (nothing else in between)."""
    delivers = [await client.expect(Deliver) for _ in ids]
    assert [d.id for d in delivers] == list(ids)
    return delivers


async def settled(broker: Broker, **expected: int) -> dict[str, int]:
    """Wait until these statistics have these values (relay-wide counters reach a Redis store within a second)."""
    while True:
        stats = await broker.statistics()
        if all(stats[name] == value for name, value in expected.items()):
            return stats
        await trio.sleep(0.05)


def about(status: StatusReport) -> tuple[ReportState, str | None, str | None]:
    return status.state, status.id, status.recipient


async def test_an_online_sender_hears_delivered_when_the_online_recipient_acks(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT):
        alice, bob = await online(broker, "alice"), await online(broker, "bob")
        await alice.send(send("m1", "bob"))
        assert (await alice.expect(Receipt)).results["bob"].status is Status.DELIVERED
        (deliver,) = await receive(bob, "m1")
        await bob.send(Ack(ids=("m1",)))
        status = await alice.expect(StatusReport)
        assert about(status) == (ReportState.DELIVERED, "m1", "bob")
        assert (status.count, status.first_seq) == (None, None)
        assert deliver.sent_at <= status.at < deliver.expires_at
        await alice.send(StatusAck(seqs=(status.seq,)))
        await barrier(alice)
        stats = await settled(broker, statuses_held=0, statuses_total=1)
        assert (stats["statuses_delivered_total"], stats["statuses_acked_total"]) == (1, 1)
        assert stats["messages_total"] == 0


async def test_an_offline_sender_gets_its_status_when_it_connects_not_counted_as_pending(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT):
        alice = await online(broker, "alice")
        await alice.send(send("m1", "bob", "carol"))
        receipt = await alice.expect(Receipt)
        assert {r.status for r in receipt.results.values()} == {Status.QUEUED}
        await leave(alice)
        for name in ("bob", "carol"):
            recipient = await login(broker, name)
            await receive(recipient, "m1")
            await recipient.expect(Drained)
            await recipient.send(Ack(ids=("m1",)))
            await barrier(recipient)  # the ACK has taken effect, and so has its status
        assert broker.tcp_port is not None
        alice, welcome = await RawClient.login(broker.tcp_port, broker.auth.issue("alice"))
        assert welcome.pending == 0  # statuses are not messages
        before, first = await alice.until(StatusReport)
        assert [type(f) for f in before] == [Drained] and before[0] == Drained(pending=0)
        second = await alice.expect(StatusReport)
        assert {about(first), about(second)} == {
            (ReportState.DELIVERED, "m1", "bob"),
            (ReportState.DELIVERED, "m1", "carol"),
        }
        assert first.seq < second.seq  # in seq order


async def test_an_online_sender_hears_when_an_offline_recipient_comes_online_and_acks(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT):
        alice = await online(broker, "alice")
        await alice.send(send("m1", "bob"))
        assert (await alice.expect(Receipt)).results["bob"].status is Status.QUEUED
        bob = await login(broker, "bob")
        await receive(bob, "m1")
        await bob.expect(Drained)
        await bob.send(Ack(ids=("m1",)))
        assert about(await alice.expect(StatusReport)) == (ReportState.DELIVERED, "m1", "bob")


async def test_a_send_without_notify_gives_no_status_and_a_duplicate_keeps_the_first_sends_notify(
    broker: Broker,
) -> None:
    with trio.fail_after(TIMEOUT):
        alice, bob = await online(broker, "alice"), await online(broker, "bob")
        await alice.send(send("quiet", "bob", notify=False), send("quiet", "bob"))  # the second: a duplicate
        assert (await alice.expect(Receipt)).results["bob"].status is Status.DELIVERED
        assert (await alice.expect(Receipt)).results["bob"].status is Status.DUPLICATE
        await alice.send(send("told", "bob"), send("told", "bob", notify=False))
        await alice.expect(Receipt)
        assert (await alice.expect(Receipt)).results["bob"].status is Status.DUPLICATE
        await receive(bob, "quiet", "told")
        await bob.send(Ack(ids=("quiet",)), Ack(ids=("told",)))
        assert about(await alice.expect(StatusReport)) == (ReportState.DELIVERED, "told", "bob")
        await settled(broker, statuses_total=1)


async def test_a_duplicate_ack_gives_no_second_status(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT):
        alice, bob = await online(broker, "alice"), await online(broker, "bob")
        await alice.send(send("m1", "bob"), send("m2", "bob"))
        await receive(bob, "m1", "m2")
        await bob.send(Ack(ids=("m1", "m1")))
        await barrier(bob)
        await bob.send(Ack(ids=("m1",)))  # again, in a call of its own
        await barrier(bob)
        await broker.acknowledge("bob", ["m1"])  # and again from outside the session (as HTTP does)
        await bob.send(Ack(ids=("m2",)))
        _, first = await alice.until(StatusReport)  # (after the two receipts)
        second = await alice.expect(StatusReport)
        assert about(first) == (ReportState.DELIVERED, "m1", "bob")
        assert about(second) == (ReportState.DELIVERED, "m2", "bob"), "m1's second ACK gave nothing"
        await settled(broker, statuses_total=2)


async def test_a_redelivered_message_gives_one_status(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT):
        alice = await online(broker, "alice")
        await alice.send(send("m1", "bob"), send("m2", "bob"))
        await alice.expect(Receipt)
        await alice.expect(Receipt)
        bob = await login(broker, "bob")
        assert [d.attempt for d in await receive(bob, "m1", "m2")] == [1, 1]
        await bob.expect(Drained)
        await bob.aclose()  # gone without ACKing: both go back to the queue (rule 5)
        bob = await login(broker, "bob")
        assert [d.attempt for d in await receive(bob, "m1", "m2")] == [2, 2]
        await bob.expect(Drained)
        await bob.send(Pull())  # and a third time
        assert [d.attempt for d in await receive(bob, "m1", "m2")] == [3, 3]
        await bob.expect(Drained)
        await bob.send(Ack(ids=("m1",)))
        await barrier(bob)
        await bob.send(Ack(ids=("m1", "m2")))
        first, second = await alice.expect(StatusReport), await alice.expect(StatusReport)
        assert [about(first), about(second)] == [
            (ReportState.DELIVERED, "m1", "bob"),
            (ReportState.DELIVERED, "m2", "bob"),
        ]
        await settled(broker, statuses_total=2)


async def test_unacked_statuses_come_again_after_pull_and_reconnect_until_status_acked(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT):
        alice = await online(broker, "alice")
        await alice.send(send("m1", "bob"), send("m2", "bob"))
        await alice.expect(Receipt)
        await alice.expect(Receipt)
        await broker.acknowledge("bob", ["m1", "m2"])
        first, second = await alice.expect(StatusReport), await alice.expect(StatusReport)
        await alice.send(StatusAck(seqs=(first.seq, second.seq + 10**9)))  # an unknown seq is ignored
        await alice.send(Pull())
        before, again = await alice.until(StatusReport)
        assert before == [Drained(pending=0)]
        assert again == second  # the same status, the same seq
        await leave(alice)
        alice = await login(broker, "alice")
        before, again = await alice.until(StatusReport)
        assert before == [Drained(pending=0)] and again == second
        await alice.send(StatusAck(seqs=(second.seq,)))
        await barrier(alice)
        await settled(broker, statuses_held=0)
        await leave(alice)
        alice = await login(broker, "alice")
        await alice.expect(Drained)
        await barrier(alice)  # nothing came between: no statuses left
        await settled(broker, statuses_acked_total=2, statuses_delivered_total=4)


async def test_a_message_that_expires_unread_reports_expired_through_the_sweep(
    broker_factory: Callable[..., Any],
) -> None:
    async with broker_factory(cleanup_interval_s=3600) as broker:  # the test runs the sweep itself
        with trio.fail_after(TIMEOUT):
            alice = await online(broker, "alice")
            await alice.send(send("brief", "bob", ttl_s=1))
            await alice.expect(Receipt)
            (held,) = await broker.pending_messages("bob", 10)
            while await broker.pending_messages("bob", 10):
                await trio.sleep(0.05)  # until it has expired (1 s)
            assert await broker.cleanup() == 1
            status = await alice.expect(StatusReport)
            assert about(status) == (ReportState.EXPIRED, "brief", "bob")
            assert status.at == held.expires_at
            bob = await login(broker, "bob")
            assert await bob.until(Drained) == ([], Drained(pending=0))
            await settled(broker, statuses_total=1, expired_total=1)


async def test_a_message_a_delivery_finds_expired_reports_expired(broker_factory: Callable[..., Any]) -> None:
    async with broker_factory(cleanup_interval_s=3600) as broker:
        with trio.fail_after(TIMEOUT):
            alice = await online(broker, "alice")
            await alice.send(send("brief", "bob", ttl_s=1), send("kept", "bob"))
            await alice.expect(Receipt)
            await alice.expect(Receipt)
            while len(await broker.pending_messages("bob", 10)) > 1:
                await trio.sleep(0.05)
            bob = await login(broker, "bob")  # its first fetch finds "brief" expired (no sweep has run)
            await receive(bob, "kept")
            await bob.expect(Drained)
            status = await alice.expect(StatusReport)
            assert about(status) == (ReportState.EXPIRED, "brief", "bob")
            await bob.send(Ack(ids=("kept",)))
            assert about(await alice.expect(StatusReport)) == (ReportState.DELIVERED, "kept", "bob")


async def test_the_bound_folds_further_statuses_into_one_overflow_status(broker_factory: Callable[..., Any]) -> None:
    async with broker_factory(max_mailbox_statuses=3) as broker:
        with trio.fail_after(TIMEOUT):
            ids = [f"m{i}" for i in range(1, 7)]
            await broker.route("alice", [send(i, "bob") for i in ids])
            await broker.acknowledge("bob", ids[:5])
            alice = await login(broker, "alice")
            before, first = await alice.until(StatusReport)
            assert before == [Drained(pending=0)]
            statuses = [first] + [await alice.expect(StatusReport) for _ in range(3)]
            assert [about(s) for s in statuses[:3]] == [(ReportState.DELIVERED, i, "bob") for i in ids[:3]]
            overflow = statuses[3]
            assert (overflow.state, overflow.id, overflow.recipient, overflow.count) == (
                ReportState.OVERFLOW,
                None,
                None,
                2,
            )
            assert overflow.first_seq is not None and statuses[2].seq < overflow.first_seq <= overflow.seq
            await settled(broker, statuses_held=4, statuses_overflowed_total=2)
            await broker.acknowledge("bob", ids[5:])  # one more, folded in: the overflow status grows
            grown = await alice.expect(StatusReport)
            assert (grown.state, grown.count, grown.first_seq) == (ReportState.OVERFLOW, 3, overflow.first_seq)
            assert grown.seq > overflow.seq and grown.at >= overflow.at
            await alice.send(StatusAck(seqs=tuple(s.seq for s in [*statuses[:3], grown])))
            await barrier(alice)
            await settled(broker, statuses_held=0, statuses_overflowed_total=3)


async def test_statuses_cross_transports_tcp_sender_websocket_recipient_http_fetch(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT):
        alice = await online(broker, "alice")
        async with login_ws(broker.ws_port, broker.auth.issue("bob")) as (bob, _):
            await bob.expect(Drained)
            await alice.send(send("m1", "bob"))
            assert (await alice.expect(Receipt)).results["bob"].status is Status.DELIVERED
            await receive(bob, "m1")
            await bob.send(Ack(ids=("m1",)))
            over_tcp = await alice.expect(StatusReport)
            assert about(over_tcp) == (ReportState.DELIVERED, "m1", "bob")
            await leave(alice)  # not STATUS_ACKed: HTTP sees it
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{broker.http_port}") as http:
                alice_token = {"Authorization": f"Bearer {broker.auth.issue('alice')}"}
                r = await http.get("/relay/statuses", headers=alice_token)
                assert r.status_code == 200, r.text
                assert r.json() == {
                    "statuses": [
                        {"seq": over_tcp.seq, "state": "delivered", "at": over_tcp.at, "id": "m1", "recipient": "bob"}
                    ]
                }
                assert (await http.get(f"/relay/statuses?after={over_tcp.seq}", headers=alice_token)).json() == {
                    "statuses": []
                }
                # An HTTP sender with notify: its status, fetched and ACKed over HTTP.
                carol_token = {"Authorization": f"Bearer {broker.auth.issue('carol')}"}
                r = await http.post(
                    "/relay/send", json={"id": "h1", "to": ["bob"], "body": "aGk=", "notify": True}, headers=carol_token
                )
                assert r.json() == {"id": "h1", "results": {"bob": {"status": "delivered"}}}
                await receive(bob, "h1")
                await bob.send(Ack(ids=("h1",)))
                await barrier(bob)
                (status,) = (await http.get("/relay/statuses?limit=5", headers=carol_token)).json()["statuses"]
                assert (status["state"], status["id"], status["recipient"]) == ("delivered", "h1", "bob")
                r = await http.post("/relay/statuses/acknowledge", json={"seqs": [status["seq"]]}, headers=carol_token)
                assert r.json() == {"acknowledged": 1}
                r = await http.post("/relay/statuses/acknowledge", json={"seqs": [status["seq"]]}, headers=carol_token)
                assert r.json() == {"acknowledged": 0}  # twice is harmless
                r = await http.post("/relay/statuses/acknowledge", json={"seqs": [over_tcp.seq]}, headers=alice_token)
                assert r.json() == {"acknowledged": 1}
                assert (await http.get("/relay/statuses", headers=alice_token)).json() == {"statuses": []}
        await settled(broker, statuses_held=0, statuses_acked_total=2)


# ---------------------------------------------------------------- logic: the injected clock, the store's calls


async def test_a_week_unread_message_reports_expired_at_its_expiry_under_the_mock_clock(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = BrokerConfig(data_dir=tmp_path, keepalive_s=30 * DAY_S, cleanup_interval_s=3600)
    broker = Broker(config, clock=trio_clock_ms, store=MemoryStore(config.store_limits))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(broker.sweep_forever)
        alice = await memory_client(broker, nursery, "alice")
        await alice.expect(Drained)
        await alice.send(send("m1", "bob"))
        await alice.expect(Receipt)
        (held,) = await broker.pending_messages("bob", 10)
        assert held.expires_at == held.sent_at + 7 * DAY_S * 1000  # default_ttl_s
        status = await alice.expect(StatusReport)  # a week later, at the first sweep after the expiry
        assert about(status) == (ReportState.EXPIRED, "m1", "bob")
        assert status.at == held.expires_at
        assert held.expires_at <= trio_clock_ms() <= held.expires_at + 3600 * 1000
        nursery.cancel_scope.cancel()


class CountingStore(MemoryStore):
    """The in-memory store, counting the status calls made to it."""

    def __init__(self) -> None:
        super().__init__()
        self.status_calls: dict[str, int] = {"fetch_statuses": 0, "add_statuses": 0}

    async def fetch_statuses(self, mailbox: str, after_seq: int, limit: int, now_ms: int) -> list[HeldStatus]:
        self.status_calls["fetch_statuses"] += 1
        return await super().fetch_statuses(mailbox, after_seq, limit, now_ms)

    async def add_statuses(self, notices: Sequence[Notice], now_ms: int, ttl_ms: int) -> frozenset[str]:
        self.status_calls["add_statuses"] += 1
        return await super().add_statuses(notices, now_ms, ttl_ms)


@asynccontextmanager
async def counted(tmp_path: Path) -> AsyncIterator[tuple[Broker, CountingStore]]:
    store = CountingStore()
    async with running_broker(tmp_path, inject_store=store) as broker:
        yield broker, store


async def test_traffic_without_notify_makes_no_status_call_beyond_one_fetch_per_connect(tmp_path: Path) -> None:
    async with counted(tmp_path) as (broker, store):
        with trio.fail_after(TIMEOUT):
            alice, bob = await online(broker, "alice"), await online(broker, "bob")
            ids = [f"m{i}" for i in range(200)]
            await alice.send(*[send(i, "bob", notify=False) for i in ids])
            for _ in ids:
                await alice.expect(Receipt)
            await receive(bob, *ids)
            await bob.send(Ack(ids=tuple(ids[:100])), Ack(ids=tuple(ids[100:])))
            await barrier(bob)
            await barrier(alice)
            assert store.status_calls == {"fetch_statuses": 2, "add_statuses": 0}  # alice's and bob's connects
            await alice.send(send("n1", "bob"))
            await receive(bob, "n1")
            await bob.send(Ack(ids=("n1",)))
            await alice.until(StatusReport)
            assert store.status_calls == {"fetch_statuses": 3, "add_statuses": 1}  # one of each for one status


class StatusesRefusingStore(MemoryStore):
    """The in-memory store whose ``add_statuses`` fails as an unreachable Redis's does while ``refusing``."""

    def __init__(self) -> None:
        super().__init__()
        self.refusing = True

    async def add_statuses(self, notices: Sequence[Notice], now_ms: int, ttl_ms: int) -> frozenset[str]:
        if self.refusing:
            raise ConnectionError("add_statuses: the store cannot be reached")
        return await super().add_statuses(notices, now_ms, ttl_ms)


async def test_a_status_the_store_did_not_take_is_counted_lost_and_the_ack_stands(tmp_path: Path) -> None:
    store = StatusesRefusingStore()
    async with running_broker(tmp_path, inject_store=store) as broker:
        with trio.fail_after(TIMEOUT):
            alice, bob = await online(broker, "alice"), await online(broker, "bob")
            await alice.send(send("lost", "bob"))
            await receive(bob, "lost")
            await bob.send(Ack(ids=("lost",)))
            await barrier(bob)
            assert await broker.pending_messages("bob", 10) == []  # the ACK took effect
            stats = await broker.statistics()
            assert (stats["statuses_lost_total"], stats["statuses_total"]) == (1, 0)
            assert stats["store_errors_total"] >= 1
            store.refusing = False
            await alice.send(send("next", "bob"))
            await receive(bob, "next")
            await bob.send(Ack(ids=("next",)))
            _, status = await alice.until(StatusReport)
            assert about(status) == (ReportState.DELIVERED, "next", "bob"), "nothing came for the lost one"
