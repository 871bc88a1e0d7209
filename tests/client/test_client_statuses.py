"""Delivery statuses in the trio client against a real broker (issue 12): with a local store each status is saved
(the sent message's state per recipient) before it is STATUS_ACKed, and yielded once; without one it is yielded
until the application STATUS_ACKs it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from relay_testing import Clock, FaultyNetwork, until, url_of

from broker.server import Broker
from client import LocalStore, ReportState, Status, StatusReport, open_client
from tests.conftest import STORES

pytestmark = pytest.mark.stores(*STORES)

TIMEOUT_S = 15


async def held(broker: Broker) -> int:
    """Statuses the broker holds un-ACKed, over all mailboxes."""
    return int((await broker.statistics())["statuses_held"])


def states(store: LocalStore, mailbox: str, mid: str) -> dict[str, tuple[str | None, str]]:
    """Per recipient of ``mid``: (the receipt's word, the state)."""
    return {s.recipient: (s.receipt, s.state) for s in store.recipient_states(mailbox, id=mid)}


async def test_an_online_sender_hears_delivered_once_the_recipients_device_saved_it(
    broker: Broker, tmp_path: Path
) -> None:
    url = url_of(broker)
    with (
        LocalStore(tmp_path / "alice.sqlite3") as store,
        LocalStore(tmp_path / "bob.sqlite3") as bob_store,
        trio.fail_after(TIMEOUT_S),
    ):
        async with (
            open_client(url, broker.auth.issue("alice"), e2e=False, local_store=store) as alice,
            open_client(url, broker.auth.issue("bob"), local_store=bob_store) as bob,
        ):
            statuses = alice.statuses()
            receipt = await alice.send(["bob", "carol"], b"hi", id="m1")
            assert {r: res.status for r, res in receipt.results.items()} == {
                "bob": Status.DELIVERED,
                "carol": Status.QUEUED,
            }
            status = await anext(statuses)  # bob's client saved it and ACKed it
            assert (status.state, status.id, status.recipient) == (ReportState.DELIVERED, "m1", "bob")
            [d] = [d async for d in bob.deliveries(until_drained=True)]
            assert status.at >= d.sent_at
            # saved before it was yielded, next to the receipt's words
            assert states(store, "alice", "m1") == {"bob": ("delivered", "delivered"), "carol": ("queued", "queued")}
            assert [s.seq for s in store.unemitted_statuses("alice")] == [status.seq]
        assert await held(broker) == 0  # closed: the STATUS_ACK has taken effect


async def test_an_offline_sender_gets_the_status_when_it_connects(broker: Broker, tmp_path: Path) -> None:
    url = url_of(broker)
    with LocalStore(tmp_path / "alice.sqlite3") as store, trio.fail_after(TIMEOUT_S):
        async with open_client(url, broker.auth.issue("alice"), e2e=False, local_store=store) as alice:
            receipt = await alice.send("bob", b"later", id="m2")
        assert receipt.results["bob"].status is Status.QUEUED
        async with open_client(url, broker.auth.issue("bob")) as bob:
            [d] = [d async for d in bob.deliveries(until_drained=True)]
            bob.ack(d.id)
        assert await held(broker) == 1  # bob's ACK took effect: the status waits in alice's mailbox
        assert states(store, "alice", "m2") == {"bob": ("queued", "queued")}
        async with open_client(url, broker.auth.issue("alice"), e2e=False, local_store=store) as alice:
            status = await anext(alice.statuses())
            assert (status.state, status.id, status.recipient) == (ReportState.DELIVERED, "m2", "bob")
            assert states(store, "alice", "m2") == {"bob": ("queued", "delivered")}
        assert await held(broker) == 0


async def test_without_a_local_store_a_status_comes_again_until_the_application_acks_it(broker: Broker) -> None:
    url = url_of(broker)
    with trio.fail_after(TIMEOUT_S):
        async with open_client(url, broker.auth.issue("alice"), e2e=False) as alice:
            await alice.send("bob", b"x", id="m3")
        async with open_client(url, broker.auth.issue("bob")) as bob:
            bob.ack([d.id async for d in bob.deliveries(until_drained=True)])
        async with open_client(url, broker.auth.issue("alice"), e2e=False) as alice:
            first = await anext(alice.statuses())
        async with open_client(url, broker.auth.issue("alice"), e2e=False) as alice:
            again = await anext(alice.statuses())
            assert again == first  # not ACKed: the same status (same seq) again
            alice.ack_statuses(again.seq)
        assert await held(broker) == 0


async def test_a_status_that_arrives_before_its_receipt_is_saved_and_yielded(broker: Broker, tmp_path: Path) -> None:
    url = url_of(broker)
    network = FaultyNetwork(reorder=True)
    with (
        LocalStore(tmp_path / "alice.sqlite3") as store,
        LocalStore(tmp_path / "bob.sqlite3") as bob_store,
        trio.fail_after(TIMEOUT_S),
    ):
        async with (
            open_client(url, broker.auth.issue("alice"), local_store=store, transport_factory=network) as alice,
            open_client(url, broker.auth.issue("bob"), local_store=bob_store),
            trio.open_nursery() as nursery,
        ):
            network.hold_receipts = True  # alice's RECEIPT reaches her client only after the status
            receipts: list[Any] = []

            async def send() -> None:
                receipts.append(await alice.send("bob", b"early", id="m4"))

            nursery.start_soon(send)
            status = await anext(alice.statuses())
            assert (status.state, status.id, status.recipient) == (ReportState.DELIVERED, "m4", "bob")
            assert receipts == [] and [r.id for r in network.held] == ["m4"]
            assert states(store, "alice", "m4") == {"bob": (None, "delivered")}  # saved without a receipt
            assert store.messages("alice") == []
            network.hold_receipts = False
            await alice.pull()  # its answer (DRAINED) brings the held RECEIPT along
        [receipt] = receipts
        assert receipt.results["bob"].status is Status.DELIVERED
        assert states(store, "alice", "m4") == {"bob": ("delivered", "delivered")}
        assert [m.id for m in store.messages("alice")] == ["m4"]


async def test_a_redelivered_status_is_saved_and_yielded_once(broker: Broker, tmp_path: Path) -> None:
    url = url_of(broker)
    network = FaultyNetwork()
    with LocalStore(tmp_path / "alice.sqlite3") as store, trio.fail_after(TIMEOUT_S):
        async with open_client(url, broker.auth.issue("alice"), e2e=False) as alice:
            await alice.send("bob", b"x", id="m5")
        async with open_client(url, broker.auth.issue("bob")) as bob:
            bob.ack([d.id async for d in bob.deliveries(until_drained=True)])
        network.drop_status_acks = 1  # the first STATUS_ACK never reaches the broker
        async with open_client(
            url, broker.auth.issue("alice"), e2e=False, local_store=store, transport_factory=network
        ) as alice:
            statuses = alice.statuses()
            first = await anext(statuses)  # saved; its STATUS_ACK is queued (and will be dropped)
            await alice.pull()  # written after that STATUS_ACK: the broker sends every un-ACKed status again
            await until(lambda: _none_held(broker))  # the second copy was saved and STATUS_ACKed
        assert [s async for s in statuses] == []  # ... and not yielded again
        copies = [f for f in network.received_of(StatusReport) if f.seq == first.seq]
        assert len(copies) == 2 and [f.seqs for f in network.dropped] == [(first.seq,)]
        [state] = store.recipient_states("alice")
        assert (state.id, state.status, state.status_seq) == ("m5", "delivered", first.seq)
        assert [s.seq for s in store.unemitted_statuses("alice")] == [first.seq]


async def _none_held(broker: Broker) -> bool:
    return await held(broker) == 0


async def test_a_message_that_expires_unread_gives_expired(broker_factory: Any, tmp_path: Path) -> None:
    clock = Clock()
    async with broker_factory(clock=clock) as broker:
        url = url_of(broker)
        with LocalStore(tmp_path / "alice.sqlite3") as store, trio.fail_after(TIMEOUT_S):
            async with open_client(url, broker.auth.issue("alice"), e2e=False, local_store=store) as alice:
                await alice.send("bob", b"too late", id="m6", ttl_s=1)
            clock.offset_ms += 2_000
            assert await broker.cleanup() == 1
            async with open_client(url, broker.auth.issue("alice"), e2e=False, local_store=store) as alice:
                status = await anext(alice.statuses())
            assert (status.state, status.id, status.recipient) == (ReportState.EXPIRED, "m6", "bob")
            [state] = store.recipient_states("alice")
            assert (state.receipt, state.state, state.status_at) == ("queued", "expired", status.at)
            [sent] = store.messages("alice")
            assert sent.sent_at < status.at  # when it expired


async def test_statuses_beyond_the_bound_are_saved_as_one_overflow_record(broker_factory: Any, tmp_path: Path) -> None:
    async with broker_factory(max_mailbox_statuses=2) as broker:
        url = url_of(broker)
        with LocalStore(tmp_path / "alice.sqlite3") as store, trio.fail_after(TIMEOUT_S):
            async with open_client(url, broker.auth.issue("alice"), e2e=False) as alice:
                for i in range(5):
                    await alice.send("bob", b"%d" % i, id=f"o{i}")
            async with open_client(url, broker.auth.issue("bob")) as bob:
                bob.ack([d.id async for d in bob.deliveries(until_drained=True)])
            async with open_client(url, broker.auth.issue("alice"), e2e=False, local_store=store) as alice:
                got = []
                async for status in alice.statuses():
                    got.append(status)
                    if status.state is ReportState.OVERFLOW:
                        break
            assert [(s.state, s.id) for s in got] == [
                (ReportState.DELIVERED, "o0"),
                (ReportState.DELIVERED, "o1"),
                (ReportState.OVERFLOW, None),
            ]
            assert got[2].count == 3
            [record] = store.status_overflows("alice")
            assert (record.count, record.first_seq) == (3, got[2].first_seq)
            assert [s.state for s in store.recipient_states("alice")] == ["delivered", "delivered"]
        assert await held(broker) == 0


async def test_a_send_without_notify_gets_no_status(broker: Broker) -> None:
    url = url_of(broker)
    with trio.fail_after(TIMEOUT_S):
        async with open_client(url, broker.auth.issue("alice"), e2e=False) as alice:
            await alice.send("bob", b"quiet", id="q1", notify=False)
        async with open_client(url, broker.auth.issue("bob")) as bob:
            bob.ack([d.id async for d in bob.deliveries(until_drained=True)])
        stats = await broker.statistics()
        assert (stats["acknowledged_total"], stats["statuses_total"]) == (1, 0)
