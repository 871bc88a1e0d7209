"""The trio client API against a real broker over TCP on 127.0.0.1."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from relay_testing import FaultyNetwork, url_of

from broker.server import Broker
from client import (
    AuthenticationError,
    ConnectedElsewhere,
    ConnectionLost,
    Delivery,
    ErrorCode,
    ForbiddenError,
    OutgoingMessage,
    RelayError,
    Status,
    open_client,
)
from tests.conftest import STORES
from wire import Ack, Send

pytestmark = pytest.mark.stores(*STORES)

TIMEOUT_S = 15


async def collect(client: Any, n: int) -> list[Delivery]:
    got: list[Delivery] = []
    async for d in client.deliveries():
        got.append(d)
        if len(got) == n:
            break
    return got


async def test_online_recipient_gets_the_message_at_once(broker: Broker) -> None:
    url = url_of(broker)
    with trio.fail_after(TIMEOUT_S):
        async with (
            open_client(url, broker.auth.issue("alice")) as alice,
            open_client(url, broker.auth.issue("bob")) as bob,
        ):
            assert alice.mailbox == "alice" and bob.welcome is not None and bob.welcome.mailbox == "bob"
            receipt = await alice.send("bob", b"hello bob", id="m1")
            assert receipt.id == "m1"
            assert receipt.results["bob"].status is Status.DELIVERED
            [d] = await collect(bob, 1)
            assert (d.id, d.sender, d.attempt, d.body) == ("m1", "alice", 1, b"hello bob")
            assert d.expires_at > d.sent_at
            bob.ack(d.id)
        stats = await broker.statistics()
        assert stats["messages_total"] == 0 and stats["acknowledged_total"] == 1


async def test_offline_message_is_delivered_on_connect(broker: Broker) -> None:
    url = url_of(broker)
    with trio.fail_after(TIMEOUT_S):
        async with open_client(url, broker.auth.issue("alice"), e2e=False) as alice:
            receipt = await alice.send(["bob", "carol"], b"later", ttl_s=60)
            assert {r: res.status for r, res in receipt.results.items()} == {
                "bob": Status.QUEUED,
                "carol": Status.QUEUED,
            }
        async with open_client(url, broker.auth.issue("bob")) as bob:
            got = [d async for d in bob.deliveries(until_drained=True)]
            assert [(d.id, d.sender, d.body) for d in got] == [(receipt.id, "alice", b"later")]
            assert got[0].expires_at - got[0].sent_at == 60_000
            assert await bob.wait_drained() == 1  # delivered, not yet ACKed
            bob.ack(d.id for d in got)
            await bob.pull()
            assert await bob.wait_drained() == 0


async def test_unacked_messages_come_back_after_close(broker: Broker) -> None:
    url = url_of(broker)
    with trio.fail_after(TIMEOUT_S):
        async with open_client(url, broker.auth.issue("alice"), e2e=False) as alice:
            await alice.send("bob", b"one", id="x1")
        async with open_client(url, broker.auth.issue("bob")) as bob:
            [d] = await collect(bob, 1)
            assert d.attempt == 1
        async with open_client(url, broker.auth.issue("bob")) as bob:
            [d] = await collect(bob, 1)
            assert (d.id, d.attempt) == ("x1", 2)
            bob.ack([d.id])


async def test_pull_delivers_unacked_messages_again(broker: Broker) -> None:
    url = url_of(broker)
    with trio.fail_after(TIMEOUT_S):
        async with open_client(url, broker.auth.issue("alice"), e2e=False) as alice:
            await alice.send_batch([OutgoingMessage("bob", b"%d" % i, id=f"p{i}") for i in range(3)])
        async with open_client(url, broker.auth.issue("bob")) as bob:
            first = [d async for d in bob.deliveries(until_drained=True)]
            bob.ack(first[0].id)
            await bob.pull()
            again = [d async for d in bob.deliveries(until_drained=True)]
            assert [(d.id, d.attempt) for d in again] == [("p1", 2), ("p2", 2)]


async def test_send_batch_of_5000_gets_5000_receipts_in_order(broker: Broker) -> None:
    url = url_of(broker)
    items = [OutgoingMessage("bob", b"x" * 50) for _ in range(5000)]
    with trio.fail_after(TIMEOUT_S):
        async with open_client(url, broker.auth.issue("alice"), e2e=False) as alice:
            receipts = await alice.send_batch(items)
            assert len(receipts) == 5000
            assert len({r.id for r in receipts}) == 5000
            assert all(r.results["bob"].status is Status.QUEUED for r in receipts)
        async with open_client(url, broker.auth.issue("bob")) as bob:
            seen = []
            async for batch in bob.delivery_batches():
                seen += [d.id for d in batch]
                bob.ack(d.id for d in batch)
                if len(seen) == 5000:
                    break
            assert seen == [r.id for r in receipts]
    assert (await broker.statistics())["messages_total"] == 0


async def test_refused_recipient_is_reported_and_the_connection_stays_up(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with open_client(url_of(broker), broker.auth.issue("alice"), e2e=False) as alice:
            receipt = await alice.send(["bob", "-bad"], b"hi")
            assert receipt.results["bob"].status is Status.QUEUED
            assert receipt.results["-bad"].status is Status.REFUSED
            assert receipt.results["-bad"].code == ErrorCode.INVALID_RECIPIENT
            assert (await alice.send("bob", b"again")).results["bob"].status is Status.QUEUED
            assert alice.connects == 1


async def test_invalid_message_is_refused_locally(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with open_client(url_of(broker), broker.auth.issue("alice"), e2e=False) as alice:
            with pytest.raises(ValueError, match="invalid message"):
                await alice.send("bob", b"x", id="has space")
            with pytest.raises(ValueError):
                await alice.send([], b"x")
            with pytest.raises(RelayError) as info:
                await alice.send("bob", b"x" * (alice.welcome.max_frame_bytes + 1))  # type: ignore[union-attr]
            assert info.value.code == ErrorCode.FRAME_TOO_LARGE
            assert (await alice.send("bob", b"fine")).results["bob"].status is Status.QUEUED


async def test_sending_to_yourself_works(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with open_client(url_of(broker), broker.auth.issue("alice")) as alice:
            await alice.send("alice", b"note to self", id="self1")
            [d] = await collect(alice, 1)
            assert (d.id, d.sender) == ("self1", "alice")


async def test_invalid_token_raises_authentication_error(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT_S):
        with pytest.raises(AuthenticationError) as info:
            async with open_client(url_of(broker), "not-a-jwt"):
                pass  # pragma: no cover
        assert info.value.code == ErrorCode.INVALID_TOKEN


async def test_expired_token_raises_authentication_error(broker: Broker) -> None:
    token = broker.auth.issue("alice", lifetime_s=-60)
    with trio.fail_after(TIMEOUT_S):
        with pytest.raises(AuthenticationError) as info:
            async with open_client(url_of(broker), token):
                pass  # pragma: no cover
        assert info.value.code == ErrorCode.TOKEN_EXPIRED


async def test_unreachable_broker_raises_connection_lost(broker: Broker) -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # a port nobody listens on
    with trio.fail_after(TIMEOUT_S):
        with pytest.raises(ConnectionLost, match="cannot connect"):
            async with open_client(f"tcp://127.0.0.1:{port}", broker.auth.issue("alice")):
                pass  # pragma: no cover


@pytest.mark.parametrize(
    "url", ["http://x:1", "tcp://", "tcp://h:notaport", "tcp://h:1/path", "ws://", "ws://h:notaport/relay"]
)
async def test_bad_url_raises_value_error(url: str) -> None:
    with pytest.raises(ValueError):
        async with open_client(url, "token"):
            pass  # pragma: no cover


async def test_takeover_is_fatal_for_the_older_client(broker: Broker) -> None:
    url, token = url_of(broker), broker.auth.issue("bob")
    with trio.fail_after(TIMEOUT_S):
        async with open_client(url, token, e2e=False) as old:
            async with open_client(url, token, e2e=False) as new:
                with pytest.raises(ConnectedElsewhere) as info:
                    async for _ in old.deliveries():
                        pass  # pragma: no cover
                assert info.value.code == ErrorCode.CONNECTED_ELSEWHERE
                with pytest.raises(ConnectedElsewhere):
                    await old.send("alice", b"x")
                assert old.connects == 1
                assert (await new.send("alice", b"still fine")).results["alice"].status is Status.QUEUED


async def test_operator_gets_stats_and_cleanup(broker: Broker) -> None:
    url = url_of(broker)
    with trio.fail_after(TIMEOUT_S):
        async with open_client(url, broker.auth.issue("alice"), e2e=False) as alice:
            await alice.send("bob", b"x")
        async with open_client(url, broker.auth.issue("ops", operator=True)) as op:
            assert op.mailbox is None
            stats = await op.stats()
            assert stats["messages_total"] == 1 and stats["sent_total"] == 1
            assert await op.cleanup() == 0
            with pytest.raises(ForbiddenError):
                await op.send("bob", b"operators have no mailbox")


async def test_stats_without_operator_token_is_forbidden_but_not_fatal(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with open_client(url_of(broker), broker.auth.issue("alice"), e2e=False) as alice:
            with pytest.raises(ForbiddenError) as info:
                await alice.stats()
            assert info.value.code == ErrorCode.FORBIDDEN
            with pytest.raises(ForbiddenError):
                await alice.cleanup()
            assert (await alice.send("bob", b"x")).results["bob"].status is Status.QUEUED


async def test_keepalive_pings_keep_an_idle_connection_open(broker_factory: Any) -> None:
    async with broker_factory(keepalive_s=1.0) as broker:
        with trio.fail_after(TIMEOUT_S):
            async with open_client(url_of(broker), broker.auth.issue("alice"), e2e=False) as alice:
                await trio.sleep(2.5)  # longer than keepalive_s: only our PINGs keep the session alive
                assert alice.connects == 1
                assert (await alice.send("bob", b"x")).results["bob"].status is Status.QUEUED


async def test_exception_in_body_propagates_unwrapped(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT_S):
        with pytest.raises(KeyError):
            async with open_client(url_of(broker), broker.auth.issue("alice")):
                raise KeyError("mine")


async def test_closed_client_refuses_new_work(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with open_client(url_of(broker), broker.auth.issue("alice")) as alice:
            await alice.close()
            with pytest.raises(ConnectionLost):
                await alice.send("bob", b"x")
            assert [d async for d in alice.deliveries()] == []


async def test_acks_queued_in_one_round_go_out_in_one_frame(broker: Broker, network: Any) -> None:
    url = url_of(broker)
    with trio.fail_after(TIMEOUT_S):
        async with open_client(url, broker.auth.issue("alice"), e2e=False) as alice:
            await alice.send_batch([OutgoingMessage("bob", b"x", id=f"c{i}") for i in range(3)])
        async with open_client(url, broker.auth.issue("bob"), transport_factory=network) as bob:
            got = [d async for d in bob.deliveries(until_drained=True)]
            for d in got:
                bob.ack(d.id)  # three calls, no checkpoint in between
            await bob.pull()
            assert await bob.wait_drained() == 0
    assert [f.ids for f in network.sent if type(f) is Ack] == [("c0", "c1", "c2")]


async def test_send_asks_for_delivery_statuses_unless_notify_is_false(broker: Broker, network: FaultyNetwork) -> None:
    url = url_of(broker)
    with trio.fail_after(TIMEOUT_S):
        async with open_client(url, broker.auth.issue("alice"), e2e=False, transport_factory=network) as alice:
            await alice.send("bob", b"asks", id="n1")
            await alice.send("bob", b"quiet", id="n2", notify=False)
            await alice.send_batch(
                [OutgoingMessage("bob", b"b", id="n3"), OutgoingMessage("bob", b"c", id="n4", notify=False)]
            )
    assert [(f.id, f.notify) for f in network.sent if type(f) is Send] == [
        ("n1", True),
        ("n2", False),
        ("n3", True),
        ("n4", False),
    ]


async def test_ack_statuses_refuses_operators_and_invalid_seqs(broker: Broker) -> None:
    url = url_of(broker)
    with trio.fail_after(TIMEOUT_S):
        async with open_client(url, broker.auth.issue("ops", operator=True)) as ops:
            with pytest.raises(ForbiddenError):
                ops.ack_statuses(1)
        async with open_client(url, broker.auth.issue("alice")) as alice:
            for bad in (0, -1, True, 2**63):
                with pytest.raises(ValueError, match="invalid status seq"):
                    alice.ack_statuses([1, bad])
            alice.ack_statuses([])  # nothing to do
            alice.ack_statuses(2**53)  # unknown seqs are ignored by the broker
