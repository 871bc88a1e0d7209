"""The in-memory store's own promises, beyond the contract: bounded memory and lazy deletion that stays O(1).

These look at MemoryStore internals on purpose (the contract suite never does).
"""

from __future__ import annotations

import gc
import sys
import tracemalloc
from collections.abc import Awaitable, Callable

import trio

from broker.backend import open_backend
from broker.config import BrokerConfig
from broker.presence import LocalPresence
from broker.store.base import Claim, NewMessage, Notice, StoreLimits
from broker.store.memory import MemoryStore
from wire import ReportState

from .clock import DAY_S, ManualClock
from .test_contract import A1, B2, BIG, msg

CLAIM = Claim("session", 1)

BYTES_PER_MESSAGE_BOUND = 200
"""Measured 158 bytes (CPython 3.11, 64-bit) per queued message besides its body and id; a margin for other builds."""


async def test_acked_messages_do_not_pile_up_in_expiry_buckets() -> None:
    """Expiry buckets delete lazily; dead entries never outnumber living ones (plus a small slack)."""
    clock = ManualClock()
    store = MemoryStore(StoreLimits(max_mailbox_messages=10_000))
    await store.enqueue_many([msg(clock, f"m{i}") for i in range(5000)], clock.now)  # one expiry second: one bucket
    [bucket] = store._expiry.buckets.values()
    for start in range(0, 4900, 100):
        await store.ack_many("bob", [f"m{i}" for i in range(start, start + 100)], clock.now)
        live = 5000 - (start + 100)
        assert len(bucket.items) - bucket.dead == live
        assert bucket.dead <= max(64, live)
    await store.ack_many("bob", [f"m{i}" for i in range(4900, 5000)], clock.now)
    assert store._expiry.buckets == {}


async def test_dead_queue_entries_stay_bounded_and_hold_no_body() -> None:
    clock = ManualClock()
    store = MemoryStore(StoreLimits(max_mailbox_messages=10_000))
    await store.enqueue_many([msg(clock, f"m{i}", body=b"b" * 1000) for i in range(4000)], clock.now)
    box = store._mailboxes["bob"]
    head = box.queue[0]
    for start in range(0, 3900, 50):  # ACK before delivery, out of queue order
        await store.ack_many("bob", [f"m{i}" for i in range(start + 49, start - 1, -1)], clock.now)
        live = 4000 - (start + 50)
        assert len(box.queue) <= 2 * live + 64
    assert head.body == b"" and not head.alive  # a dead entry does not pin its body
    assert store._total_bytes == 100 * 1000


async def test_an_emptied_mailbox_is_forgotten_with_its_fence() -> None:
    clock = ManualClock()
    store = MemoryStore()
    await store.enqueue_many([msg(clock, "a")], clock.now)
    await store.fetch_many("bob", CLAIM, 10, 1 << 20, clock.now)
    assert store._mailboxes["bob"].fence == CLAIM
    await store.ack_many("bob", ["a"], clock.now)
    assert store._mailboxes == {}
    assert store._inflight == 0


async def test_bytes_per_queued_message() -> None:
    """The memory a queued message costs besides its body and id (which the caller made anyway)."""
    n, boxes = 20_000, 100
    now = ManualClock().now
    expires = now + 86_400_000
    messages = [NewMessage(f"m{i:08d}", "alice", (f"user{i % boxes}",), b"x" * 16, now, expires) for i in range(n)]
    store = MemoryStore(StoreLimits(max_mailbox_messages=n))
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(0, n, 100):
            await store.enqueue_many(messages[i : i + 100], now)
        gc.collect()
        per_message = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    assert per_message < BYTES_PER_MESSAGE_BOUND


async def test_open_backend_makes_the_configured_store_and_closes_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = BrokerConfig(data_dir=tmp_path, max_mailbox_messages=3)
    clock = ManualClock()
    async with open_backend(config) as backend:
        store = backend.store
        assert isinstance(store, MemoryStore) and store.limits.max_mailbox_messages == 3
        assert isinstance(backend.presence, LocalPresence)
        await store.enqueue_many([msg(clock, "a")], clock.now)
    assert await store.pending("bob", clock.now) == 0  # closed: nothing held any more


async def test_the_memory_store_is_synchronous_and_never_yields() -> None:
    """``synchronous`` lets the broker deliver from the sender's task: no call may checkpoint. (The Redis store
    says it is not, so the broker uses only the mailbox tasks with it.)"""
    store, clock = MemoryStore(), ManualClock()
    assert store.synchronous
    now = clock.now
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.enqueue_many([msg(clock, "a"), msg(clock, "b"), msg(clock, "c", ("bob", "carol"))], now),
        lambda: store.fetch_many("bob", A1, 2, BIG, now),
        lambda: store.fetch_many("bob", B2, 2, BIG, now),
        lambda: store.fetch_many("bob", A1, 2, BIG, now),
        lambda: store.peek("bob", 10, now),
        lambda: store.ack_many("bob", ["a"], now),
        lambda: store.release("bob", B2, ["b"]),
        lambda: store.pending("bob", now),
        lambda: store.add_statuses([Notice("alice", "a", "bob", ReportState.DELIVERED, now)] * 3, now, 1000),
        lambda: store.fetch_statuses("alice", 0, 10, now),
        lambda: store.ack_statuses("alice", [now * 1000]),
        lambda: store.purge_expired(now + 8 * DAY_S * 1000),
        lambda: store.statistics(now),
    ]
    for call in calls:
        with trio.CancelScope() as scope:
            scope.cancel()  # any checkpoint inside would raise Cancelled here
            await call()
        assert not scope.cancelled_caught


def notice(mid: str, lane: str = "alice") -> Notice:
    return Notice(lane, mid, "bob", ReportState.DELIVERED, 1)


async def test_an_emptied_lane_holds_no_memory() -> None:
    """ACKed or expired, a lane's last record takes the lane and its expiry buckets with it."""
    clock = ManualClock()
    store = MemoryStore(StoreLimits(max_mailbox_statuses=2))
    await store.add_statuses([notice(f"m{i}", f"u{i % 3}") for i in range(9)], clock.now, 60_000)
    for lane in ("u0", "u1"):
        held = await store.fetch_statuses(lane, 0, 10, clock.now)
        assert await store.ack_statuses(lane, [h.seq for h in held]) == 3  # two and an overflow record
    assert set(store._lanes) == {"u2"}
    clock.advance(60)
    await store.purge_expired(clock.now)
    assert store._lanes == {} and store._status_expiry.buckets == {} and store._statuses_held == 0


async def test_acked_statuses_do_not_pile_up_in_a_lane() -> None:
    """A lane's seq order deletes lazily; dead records never outnumber living ones (plus a small slack)."""
    clock = ManualClock()
    store = MemoryStore()
    await store.add_statuses([notice(f"m{i}") for i in range(5000)], clock.now, 60_000)
    lane = store._lanes["alice"]
    seqs = [h.seq for h in await store.fetch_statuses("alice", 0, 5000, clock.now)]
    for start in range(0, 4900, 100):  # out of order within each round
        await store.ack_statuses("alice", seqs[start : start + 100][::-1])
        live = 5000 - (start + 100)
        assert len(lane.held) == live
        assert lane.dead <= max(64, live) and len(lane.order) <= 2 * live + 64
    # The cursor still finds its place: after the 4,950th seq, the last 50.
    assert [h.seq for h in await store.fetch_statuses("alice", seqs[4949], 100, clock.now)] == seqs[4950:]


async def test_a_notify_message_costs_no_more_memory_than_a_plain_one() -> None:
    """notify is the entry's class, not a slot: both kinds of entry are the same size."""
    clock = ManualClock()
    store = MemoryStore()
    await store.enqueue_many([msg(clock, "plain"), msg(clock, "asked", notify=True)], clock.now)
    by_id = store._mailboxes["bob"].by_id
    assert sys.getsizeof(by_id["plain"]) == sys.getsizeof(by_id["asked"])
    assert (by_id["plain"].notify, by_id["asked"].notify) == (False, True)
