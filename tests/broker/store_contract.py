"""The store contract: one test body for every Store implementation.

A test module subclasses :class:`StoreContract` and provides a ``make_store(limits, clock)``
fixture. Time is trio's (``autojump_clock``), mapped to epoch milliseconds, so a week
of TTL passes instantly. Every test names ``autojump_clock`` itself: pytest-trio only
installs a clock that the test function requests directly.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio

from broker.store.base import DUPLICATE, STORED, NewMessage, Store, StoreLimits
from wire import ErrorCode

EPOCH_MS = 1_800_000_000_000
DAY_S = 86400

MakeStore = Callable[..., Store]


def trio_clock_ms() -> int:
    return EPOCH_MS + int(trio.current_time() * 1000)


def msg(
    mid: str, to: str | tuple[str, ...] = "bob", *, sender: str = "alice", body: bytes = b"x", ttl_s: float = 7 * DAY_S
) -> NewMessage:
    now = trio_clock_ms()
    recipients = (to,) if isinstance(to, str) else to
    return NewMessage(mid, sender, recipients, body, now, now + int(ttl_s * 1000))


class StoreContract:
    @pytest.fixture
    def store(self, make_store: MakeStore) -> Store:
        return make_store(StoreLimits(), trio_clock_ms)

    async def test_enqueue_then_fetch_in_order_marks_inflight(
        self, store: Store, autojump_clock: trio.testing.MockClock
    ) -> None:
        assert await store.enqueue_many([msg("a"), msg("b"), msg("c", ("bob", "carol"))]) == [
            [STORED],
            [STORED],
            [STORED, STORED],
        ]
        batch = await store.fetch_many("bob", 2, 1 << 20)
        assert [m.id for m in batch.messages] == ["a", "b"]
        assert [m.attempt for m in batch.messages] == [1, 1]
        assert (batch.queued, batch.inflight) == (1, 2)
        batch = await store.fetch_many("bob", 10, 1 << 20)
        assert [m.id for m in batch.messages] == ["c"]
        assert (batch.queued, batch.inflight) == (0, 3)
        assert (await store.fetch_many("bob", 10, 1 << 20)).messages == []

    async def test_fetch_respects_byte_budget_but_returns_at_least_one(
        self, store: Store, autojump_clock: trio.testing.MockClock
    ) -> None:
        await store.enqueue_many([msg(f"m{i}", body=b"b" * 100) for i in range(5)])
        assert len((await store.fetch_many("bob", 10, 250)).messages) == 2
        assert len((await store.fetch_many("bob", 10, 10)).messages) == 1

    async def test_ack_deletes_only_own_mailbox_messages(
        self, store: Store, autojump_clock: trio.testing.MockClock
    ) -> None:
        await store.enqueue_many([msg("a", ("bob", "carol"))])
        await store.fetch_many("bob", 10, 1 << 20)
        assert (await store.ack_many("carol-not", ["a"])).deleted == 0
        result = await store.ack_many("bob", ["a", "unknown", "a"])
        assert (result.deleted, result.inflight) == (1, 0)
        assert await store.pending("bob") == 0
        assert await store.pending("carol") == 1
        assert (await store.ack_many("bob", ["a"])).deleted == 0

    async def test_release_returns_inflight_to_the_front_with_next_attempt(
        self, store: Store, autojump_clock: trio.testing.MockClock
    ) -> None:
        await store.enqueue_many([msg("a"), msg("b"), msg("c")])
        await store.fetch_many("bob", 2, 1 << 20)
        assert await store.release("bob") == 2
        batch = await store.fetch_many("bob", 10, 1 << 20)
        assert [(m.id, m.attempt) for m in batch.messages] == [("a", 2), ("b", 2), ("c", 1)]

    async def test_duplicate_and_conflicting_ids(self, store: Store, autojump_clock: trio.testing.MockClock) -> None:
        await store.enqueue_many([msg("a")])
        assert await store.enqueue_many([msg("a"), msg("a", sender="mallory")]) == [
            [DUPLICATE],
            [ErrorCode.ID_CONFLICT],
        ]
        await store.fetch_many("bob", 1, 1 << 20)
        await store.ack_many("bob", ["a"])
        # Remembered after the ACK, until the message would have expired.
        assert await store.enqueue_many([msg("a")]) == [[DUPLICATE]]
        await trio.sleep(8 * DAY_S)
        await store.purge_expired()
        assert await store.enqueue_many([msg("a")]) == [[STORED]]

    async def test_limits(self, make_store: MakeStore, autojump_clock: trio.testing.MockClock) -> None:
        limits = StoreLimits(max_mailbox_messages=2, max_mailbox_bytes=10, max_total_bytes=14, max_tombstones=1)
        store = make_store(limits, trio_clock_ms)
        outcomes = await store.enqueue_many(
            [
                msg("a", body=b"1234"),
                msg("b", body=b"1234567"),
                msg("c", body=b"123456"),
                msg("d", body=b""),
                msg("e", "carol", body=b"12345"),
            ]
        )
        assert outcomes == [
            [STORED],
            [ErrorCode.MAILBOX_BYTES_FULL],
            [STORED],
            [ErrorCode.MAILBOX_FULL],
            [ErrorCode.BROKER_FULL],
        ]
        await store.fetch_many("bob", 10, 1 << 20)
        await store.ack_many("bob", ["a", "c"])
        stats = await store.statistics()
        assert (stats["tombstones"], stats["queued_bytes"], stats["messages_total"]) == (1, 0, 0)

    async def test_expired_message_is_never_delivered_even_before_the_sweep(
        self, store: Store, autojump_clock: trio.testing.MockClock
    ) -> None:
        await store.enqueue_many([msg("short", ttl_s=60), msg("long")])
        await trio.sleep(60)  # exactly at expires_at: expired
        batch = await store.fetch_many("bob", 10, 1 << 20)
        assert [m.id for m in batch.messages] == ["long"]
        assert await store.pending("bob") == 1

    async def test_sweeper_purges_expired_messages_after_seven_days(
        self, store: Store, autojump_clock: trio.testing.MockClock
    ) -> None:
        await store.enqueue_many([msg(f"m{i}", f"user{i % 7}") for i in range(50)])
        await store.enqueue_many([msg("keep", ttl_s=30 * DAY_S)])
        await trio.sleep(7 * DAY_S - 1)
        assert await store.purge_expired() == 0
        await trio.sleep(1)
        stats = await store.statistics()
        assert (stats["messages_expired_unswept"], stats["messages_deliverable"]) == (50, 1)
        assert await store.purge_expired() == 50
        stats = await store.statistics()
        assert (stats["messages_total"], stats["expired_total"], stats["unique_recipients"]) == (1, 50, 1)
        assert await store.pending("user0") == 0

    async def test_inflight_message_expires_too(self, store: Store, autojump_clock: trio.testing.MockClock) -> None:
        await store.enqueue_many([msg("a", ttl_s=10)])
        await store.fetch_many("bob", 10, 1 << 20)
        await trio.sleep(10)
        assert await store.purge_expired() == 1
        assert await store.release("bob") == 0
        assert (await store.fetch_many("bob", 10, 1 << 20)).inflight == 0

    async def test_peek_changes_nothing(self, store: Store, autojump_clock: trio.testing.MockClock) -> None:
        await store.enqueue_many([msg("a"), msg("b"), msg("c", ttl_s=1)])
        await store.fetch_many("bob", 1, 1 << 20)
        await trio.sleep(2)
        assert [m.id for m in await store.peek("bob", 10)] == ["a", "b"]
        assert [m.id for m in await store.peek("bob", 1)] == ["a"]
        assert (await store.fetch_many("bob", 10, 1 << 20)).inflight == 2

    async def test_empty_mailbox_holds_no_memory(self, store: Store, autojump_clock: trio.testing.MockClock) -> None:
        await store.enqueue_many([msg(f"m{i}", f"u{i}") for i in range(100)])
        for i in range(100):
            await store.fetch_many(f"u{i}", 10, 1 << 20)
            await store.ack_many(f"u{i}", [f"m{i}"])
        stats = await store.statistics()
        assert (stats["unique_recipients"], stats["messages_total"], stats["inflight"]) == (0, 0, 0)

    async def test_many_acks_before_delivery_keep_queue_compact(
        self, store: Store, autojump_clock: trio.testing.MockClock
    ) -> None:
        await store.enqueue_many([msg(f"m{i}") for i in range(1000)])
        await store.ack_many("bob", [f"m{i}" for i in range(0, 999)])
        batch = await store.fetch_many("bob", 10, 1 << 20)
        assert [m.id for m in batch.messages] == ["m999"]

    async def test_sweep_after_most_were_acked_purges_exactly_the_rest(
        self, store: Store, autojump_clock: trio.testing.MockClock
    ) -> None:
        await store.enqueue_many([msg(f"m{i}", ttl_s=60) for i in range(200)])
        await store.fetch_many("bob", 1000, 1 << 30)
        await store.ack_many("bob", [f"m{i}" for i in range(0, 200, 4)])  # a quarter, spread out
        await store.ack_many("bob", [f"m{i}" for i in range(1, 200, 4)])  # a second quarter
        await trio.sleep(60)
        assert await store.purge_expired() == 100
        stats = await store.statistics()
        assert (stats["messages_total"], stats["expired_total"], stats["acknowledged_total"]) == (0, 100, 100)

    async def test_a_synchronous_store_never_yields(self, store: Store, autojump_clock: trio.testing.MockClock) -> None:
        """``synchronous`` lets the broker deliver from the sender's task: no call may checkpoint."""
        if not store.synchronous:
            pytest.skip("this store yields; the broker uses only the mailbox tasks with it")
        calls = [
            lambda: store.enqueue_many([msg("a"), msg("b"), msg("c", ("bob", "carol"))]),
            lambda: store.fetch_many("bob", 2, 1 << 20),
            lambda: store.peek("bob", 10),
            lambda: store.ack_many("bob", ["a"]),
            lambda: store.release("bob"),
            lambda: store.pending("bob"),
            lambda: store.purge_expired(),
            lambda: store.statistics(),
        ]
        for call in calls:
            with trio.CancelScope() as scope:
                scope.cancel()  # any checkpoint inside would raise Cancelled here
                await call()
            assert not scope.cancelled_caught
