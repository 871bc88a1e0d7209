"""Both ways a message reaches its recipient's socket, over real TCP on 127.0.0.1.

With a synchronous store (the in-memory default) the sender's task delivers a new message
to an online recipient itself and writes straight to the socket while it takes the bytes;
with a store that yields, only the recipient's mailbox task delivers. Either way each
message arrives once, in the order the broker accepted it, and what the socket does not
take at once is queued for the session's writer behind what is already queued.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import pytest
import trio

from broker.store.base import AckResult, Batch, Claim, NewMessage, Outcome
from broker.store.memory import MemoryStore
from wire import Ack, Deliver, Drained, Receipt, Send, Status

from .raw import RawClient

TIMEOUT = 20


class YieldingStore(MemoryStore):
    """The in-memory store, but every call checkpoints first, as a networked store would."""

    synchronous = False

    async def enqueue_many(self, messages: Sequence[NewMessage], now_ms: int) -> list[list[Outcome]]:
        await trio.lowlevel.checkpoint()
        return await super().enqueue_many(messages, now_ms)

    async def fetch_many(self, mailbox: str, claim: Claim, limit: int, max_bytes: int, now_ms: int) -> Batch:
        await trio.lowlevel.checkpoint()
        return await super().fetch_many(mailbox, claim, limit, max_bytes, now_ms)

    async def ack_many(self, mailbox: str, ids: Sequence[str], now_ms: int) -> AckResult:
        await trio.lowlevel.checkpoint()
        return await super().ack_many(mailbox, ids, now_ms)

    async def release(self, mailbox: str, claim: Claim, unwritten: Collection[str] = ()) -> int:
        await trio.lowlevel.checkpoint()
        return await super().release(mailbox, claim, unwritten)


async def login(broker: Any, name: str) -> RawClient:
    client, _ = await RawClient.login(broker.tcp_port, broker.auth.issue(name))
    await client.expect(Drained)
    return client


@pytest.mark.parametrize("yielding", [False, True], ids=["sender-task", "mailbox-task"])
async def test_two_senders_interleaved_reach_the_recipient_once_each_in_order(
    broker_factory: Any, yielding: bool
) -> None:
    extra = {"inject_store": YieldingStore()} if yielding else {}
    async with broker_factory(max_inflight=64, **extra) as broker:
        assert broker.store.synchronous is not yielding
        with trio.fail_after(TIMEOUT):
            bob = await login(broker, "bob")
            senders = [await login(broker, name) for name in ("alice", "carol")]
            n = 400

            async def send_all(client: RawClient, name: str) -> None:
                for start in range(0, n, 50):
                    batch = [Send(id=f"{name}-{i}", to=("bob",), body=b"x") for i in range(start, start + 50)]
                    await client.send(*batch)
                    for _ in range(50):
                        assert (await client.expect(Receipt)).results["bob"].status is Status.DELIVERED

            got: list[Deliver] = []
            async with trio.open_nursery() as nursery:
                for client, name in zip(senders, ("alice", "carol"), strict=True):
                    nursery.start_soon(send_all, client, name)
                while len(got) < 2 * n:  # ACK as we go: the window (64) is far smaller than what is sent
                    d = await bob.expect(Deliver)
                    got.append(d)
                    await bob.send(Ack(ids=(d.id,)))
            for name in ("alice", "carol"):
                ids = [d.id for d in got if d.sender == name]
                assert ids == [f"{name}-{i}" for i in range(n)]
            assert all(d.attempt == 1 for d in got)
            stats = await broker.statistics()
            assert (stats["delivered_total"], stats["redelivered_total"]) == (2 * n, 0)


async def test_what_the_socket_does_not_take_at_once_follows_in_order(broker_factory: Any) -> None:
    """A recipient that stops reading: direct writes fill the socket, the rest waits for the writer, in order."""
    async with broker_factory(max_outbound_bytes=4 * 1024 * 1024, max_inflight=1000) as broker:
        with trio.fail_after(TIMEOUT):
            bob = await login(broker, "bob")
            alice = await login(broker, "alice")
            body = bytes(range(256)) * 64  # 16 KiB: 300 of them are far more than the socket buffers hold
            for start in range(0, 300, 30):
                await alice.send(*[Send(id=f"m{i}", to=("bob",), body=body) for i in range(start, start + 30)])
                for _ in range(30):
                    await alice.expect(Receipt)
            session = broker.presence["bob"]
            assert session.outbox.unsent > 0, "nothing had to wait for the writer: the test proves nothing"
            ids = []
            for _ in range(300):
                d = await bob.expect(Deliver)
                assert d.body == body
                ids.append(d.id)
            assert ids == [f"m{i}" for i in range(300)]


async def test_a_closing_session_takes_no_new_message(broker_factory: Any) -> None:
    """While an ending session flushes (its peer not reading), a new message for it stays queued, undelivered.

    It must reach the next session as a first delivery (attempt 1), not be counted as delivered into a
    connection that was already going away.
    """
    big = 64 * 1024 * 1024  # room to queue what bob does not read without pausing delivery (half of it)
    async with broker_factory(shutdown_grace_s=2.0, max_inflight=1000, max_outbound_bytes=big) as broker:
        with trio.fail_after(TIMEOUT):
            bob = await login(broker, "bob")
            alice = await login(broker, "alice")
            body = bytes(64 * 1024)
            for start in range(0, 240, 20):  # 15 MiB bob never reads: the writer is stuck behind it
                await alice.send(*[Send(id=f"fill{i}", to=("bob",), body=body) for i in range(start, start + 20)])
                for _ in range(20):
                    await alice.expect(Receipt)
            session = broker.presence["bob"]
            await bob.stream.send_eof()  # bob is done sending (and still reads nothing): the session ends
            while not session.closing:
                await trio.sleep(0.01)
            assert broker.presence.get("bob") is session, "the session ended at once: the test proves nothing"
            assert 0 < session.outbox.unsent < big // 2, "delivery would be paused anyway: the test proves nothing"
            delivered = (await broker.statistics())["delivered_total"]
            await alice.send(Send(id="late", to=("bob",), body=b"late"))
            await alice.expect(Receipt)
            assert (await broker.statistics())["delivered_total"] == delivered
            await session.finished.wait()
            bob, _ = await RawClient.login(broker.tcp_port, broker.auth.issue("bob"))
            attempts = {}
            while "late" not in attempts:
                frame = await bob.next()
                if isinstance(frame, Deliver):
                    attempts[frame.id] = frame.attempt
            assert attempts["late"] == 1
