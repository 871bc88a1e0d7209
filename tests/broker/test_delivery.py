"""End-to-end delivery semantics over real TCP on 127.0.0.1."""

from __future__ import annotations

import cbor2
import pytest
import trio

from broker.server import Broker
from wire import (
    Ack,
    Deliver,
    Drained,
    Error,
    ErrorCode,
    Ping,
    Pong,
    Pull,
    Receipt,
    Send,
    Status,
    Welcome,
)

from ..conftest import STORES
from .raw import RawClient

pytestmark = pytest.mark.stores(*STORES)

TIMEOUT = 10


def send(mid: str, to: str | tuple[str, ...], body: bytes = b"x", ttl_s: int | None = None) -> Send:
    return Send(id=mid, to=(to,) if isinstance(to, str) else to, body=body, ttl_s=ttl_s)


async def login(broker: Broker, name: str) -> RawClient:
    assert broker.tcp_port is not None
    client, welcome = await RawClient.login(broker.tcp_port, broker.auth.issue(name))
    assert welcome.mailbox == name
    return client


async def test_online_recipient_gets_message_at_once_and_ack_deletes(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT):
        bob = await login(broker, "bob")
        assert (await bob.expect(Drained)).pending == 0
        alice = await login(broker, "alice")
        await alice.expect(Drained)
        await alice.send(send("m1", "bob", b"hello"))
        receipt = await alice.expect(Receipt)
        assert receipt.results["bob"].status is Status.DELIVERED
        msg = await bob.expect(Deliver)
        assert (msg.id, msg.sender, msg.body, msg.attempt) == ("m1", "alice", b"hello", 1)
        assert msg.expires_at - msg.sent_at == 7 * 24 * 3600 * 1000
        await bob.send(Ack(ids=("m1",)))
        await bob.send(Ping())
        await bob.expect(Pong)
        stats = await broker.statistics()
        assert stats["messages_total"] == 0
        assert stats["acknowledged_total"] == 1
        assert stats["unique_recipients"] == 0


async def test_offline_messages_are_queued_then_delivered_oldest_first_then_drained(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT):
        alice = await login(broker, "alice")
        await alice.expect(Drained)
        for i in range(5):
            await alice.send(send(f"m{i}", "bob", f"body {i}".encode()))
            assert (await alice.expect(Receipt)).results["bob"].status is Status.QUEUED
        assert broker.tcp_port is not None
        bob, welcome = await RawClient.login(broker.tcp_port, broker.auth.issue("bob"))
        assert welcome.pending == 5
        before, drained = await bob.until(Drained)
        assert [f.id for f in before if isinstance(f, Deliver)] == [f"m{i}" for i in range(5)]
        assert drained.pending == 5


async def test_sender_is_stamped_by_the_broker_not_taken_from_the_frame(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT):
        bob = await login(broker, "bob")
        await bob.expect(Drained)
        alice = await login(broker, "alice")
        await alice.expect(Drained)
        # A SEND carrying a forged "from" key: unknown keys are ignored, the identity is the token's.
        body = cbor2.dumps({"type": "send", "id": "f1", "to": ["bob"], "body": b"hi", "from": "mallory"})
        await alice.send_raw(len(body).to_bytes(4, "big") + body)
        await alice.expect(Receipt)
        assert (await bob.expect(Deliver)).sender == "alice"


async def test_unacked_delivery_is_redelivered_with_next_attempt_on_reconnect(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT):
        alice = await login(broker, "alice")
        await alice.expect(Drained)
        await alice.send(send("m1", "bob"))
        await alice.expect(Receipt)
        bob = await login(broker, "bob")
        assert (await bob.expect(Deliver)).attempt == 1
        await bob.aclose()  # dropped before ACK
        bob = await login(broker, "bob")
        again = await bob.expect(Deliver)
        assert (again.id, again.attempt) == ("m1", 2)
        await bob.send(Ack(ids=("m1",)))
        await bob.expect(Drained)
        await bob.send(Ping())
        await bob.expect(Pong)
        assert (await broker.statistics())["redelivered_total"] == 1
        assert (await broker.statistics())["messages_total"] == 0


async def test_ack_of_unknown_or_foreign_ids_is_harmless(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT):
        alice = await login(broker, "alice")
        await alice.expect(Drained)
        await alice.send(send("for-bob", "bob"))
        await alice.expect(Receipt)
        carol = await login(broker, "carol")
        await carol.expect(Drained)
        await carol.send(Ack(ids=("for-bob", "never-sent")), Ack(ids=("for-bob",)))
        await carol.send(Ping())
        await carol.expect(Pong)
        bob = await login(broker, "bob")
        assert (await bob.expect(Deliver)).id == "for-bob"
        await bob.send(Ack(ids=("for-bob",)), Ack(ids=("for-bob",)))  # a duplicate ACK too
        await bob.expect(Drained)
        await bob.send(Ping())
        await bob.expect(Pong)
        assert (await broker.statistics())["acknowledged_total"] == 1


async def test_new_connection_takes_over_the_mailbox(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT):
        alice = await login(broker, "alice")
        await alice.expect(Drained)
        await alice.send(send("m1", "bob"))
        await alice.expect(Receipt)
        first = await login(broker, "bob")
        assert (await first.expect(Deliver)).attempt == 1
        await first.expect(Drained)
        second = await login(broker, "bob")
        error = await first.expect(Error)
        assert (error.code, error.close) == (ErrorCode.CONNECTED_ELSEWHERE, True)
        await first.expect_closed()
        redelivered = await second.expect(Deliver)
        assert (redelivered.id, redelivered.attempt) == ("m1", 2)
        await second.expect(Drained)
        await alice.send(send("m2", "bob"))
        assert (await alice.expect(Receipt)).results["bob"].status is Status.DELIVERED
        assert (await second.expect(Deliver)).id == "m2"


async def test_inflight_window_is_respected(broker_factory) -> None:  # type: ignore[no-untyped-def]
    async with broker_factory(max_inflight=3) as broker:
        with trio.fail_after(TIMEOUT):
            alice = await login(broker, "alice")
            await alice.expect(Drained)
            for i in range(10):
                await alice.send(send(f"m{i}", "bob"))
                await alice.expect(Receipt)
            assert broker.tcp_port is not None
            bob, welcome = await RawClient.login(broker.tcp_port, broker.auth.issue("bob"))
            assert welcome.max_inflight == 3
            got = [await bob.expect(Deliver) for _ in range(3)]
            # A round trip: anything the broker would push beyond the window is in by then.
            await bob.send(Ping())
            await bob.expect(Pong)
            assert not bob.frames
            assert (await broker.statistics())["inflight"] == 3
            await bob.send(Ack(ids=(got[0].id,)))
            assert (await bob.expect(Deliver)).id == "m3"
            await bob.send(Ping())
            await bob.expect(Pong)
            assert (await broker.statistics())["inflight"] == 3
            await bob.send(Ack(ids=("m1", "m2", "m3")))
            received = [await bob.expect(Deliver) for _ in range(3)]
            assert [d.id for d in received] == ["m4", "m5", "m6"]


async def test_pull_redelivers_unacked_messages_then_drained(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT):
        alice = await login(broker, "alice")
        await alice.expect(Drained)
        await alice.send(send("m1", "bob"), send("m2", "bob"))
        await alice.expect(Receipt)
        await alice.expect(Receipt)
        bob = await login(broker, "bob")
        before, _ = await bob.until(Drained)
        assert [f.attempt for f in before if isinstance(f, Deliver)] == [1, 1]
        await bob.send(Ack(ids=("m1",)), Pull())
        before, drained = await bob.until(Drained)
        assert [(f.id, f.attempt) for f in before if isinstance(f, Deliver)] == [("m2", 2)]
        assert drained.pending == 1


async def test_send_is_idempotent_by_id(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT):
        alice = await login(broker, "alice")
        await alice.expect(Drained)
        mallory = await login(broker, "mallory")
        await mallory.expect(Drained)
        await alice.send(send("dup", "bob", b"one"))
        assert (await alice.expect(Receipt)).results["bob"].status is Status.QUEUED
        await alice.send(send("dup", "bob", b"retry"))
        assert (await alice.expect(Receipt)).results["bob"].status is Status.DUPLICATE
        await mallory.send(send("dup", "bob", b"squat"))
        result = (await mallory.expect(Receipt)).results["bob"]
        assert (result.status, result.code) == (Status.REFUSED, ErrorCode.ID_CONFLICT)
        bob = await login(broker, "bob")
        before, _ = await bob.until(Drained)
        assert [(f.body, f.sender) for f in before if isinstance(f, Deliver)] == [(b"one", "alice")]
        await bob.send(Ack(ids=("dup",)))
        await bob.send(Ping())
        await bob.expect(Pong)
        # The receipt of the first SEND may have been lost: a retry after the ACK is still a duplicate.
        await alice.send(send("dup", "bob", b"retry after ack"))
        assert (await alice.expect(Receipt)).results["bob"].status is Status.DUPLICATE
        await bob.send(Ping())
        await bob.expect(Pong)
        assert not bob.frames
        stats = await broker.statistics()
        assert (stats["duplicates_total"], stats["refused_id_conflict"], stats["messages_total"]) == (2, 1, 0)


async def test_multi_recipient_send_reports_each_recipient(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT):
        bob = await login(broker, "bob")
        await bob.expect(Drained)
        alice = await login(broker, "alice")
        await alice.expect(Drained)
        await alice.send(send("m", ("bob", "carol", "bob", "not valid!", "alice")))
        receipt, own = await alice.expect_each(Receipt, Deliver)
        assert isinstance(receipt, Receipt) and isinstance(own, Deliver)
        assert {k: (v.status, v.code) for k, v in receipt.results.items()} == {
            "bob": (Status.DELIVERED, None),
            "carol": (Status.QUEUED, None),
            "alice": (Status.DELIVERED, None),
            "not valid!": (Status.REFUSED, ErrorCode.INVALID_RECIPIENT),
        }
        assert (await bob.expect(Deliver)).id == "m"
        assert own.sender == "alice"


async def test_welcome_announces_the_limits(broker_factory) -> None:  # type: ignore[no-untyped-def]
    async with broker_factory(max_frame_bytes=4096, max_outbound_bytes=65536, max_recipients=7) as broker:
        with trio.fail_after(TIMEOUT):
            assert broker.tcp_port is not None
            client = await RawClient.open(broker.tcp_port)
            welcome = await client.hello(broker.auth.issue("bob"))
            assert isinstance(welcome, Welcome)
            assert (welcome.max_frame_bytes, welcome.max_recipients, welcome.version) == (4096, 7, 1)
            assert (welcome.default_ttl_s, welcome.max_ttl_s, welcome.keepalive_s) == (604800, 2592000, 60)
