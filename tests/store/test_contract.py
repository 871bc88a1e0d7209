"""The store contract (broker/store/base.py's docstring): one set of test bodies for every Store.

Each test runs against every implementation in conftest.IMPLEMENTATIONS through the
Store protocol only. Time is a :class:`~.clock.ManualClock` whose ``now`` every call is
given, so nothing here sleeps or needs a trio clock, and the same bodies can run
against a store over real sockets.
"""

from __future__ import annotations

import dataclasses

import pytest

from broker.store.base import (
    MAILBOX_DEPTH_BOUNDS,
    AckResult,
    Batch,
    Claim,
    HeldStatus,
    Message,
    NewMessage,
    Notice,
    Outcome,
    Purged,
    Store,
    StoreLimits,
    next_status_seq,
)
from wire import ErrorCode, KeyRecord, ReportState

from .clock import DAY_S, ManualClock
from .conftest import StoreOpener

BIG = 1 << 30
A1 = Claim("session-a", 1)
B2 = Claim("session-b", 2)
C3 = Claim("session-c", 3)

STORED = Outcome.STORED
DUPLICATE = Outcome.DUPLICATE


def msg(
    clock: ManualClock,
    mid: str,
    to: str | tuple[str, ...] = "bob",
    *,
    sender: str = "alice",
    body: bytes = b"x",
    ttl_s: float = 7 * DAY_S,
    notify: bool = False,
) -> NewMessage:
    recipients = (to,) if isinstance(to, str) else to
    return NewMessage(mid, sender, recipients, body, clock.now, clock.now + int(ttl_s * 1000), notify)


async def fetch(store: Store, clock: ManualClock, mailbox: str = "bob", claim: Claim = A1, limit: int = 100) -> Batch:
    return await store.fetch_many(mailbox, claim, limit, BIG, clock.now)


def ids(batch: Batch) -> list[str]:
    return [m.id for m in batch.messages]


# ---------------------------------------------------------------- enqueue and fetch


async def test_enqueue_then_fetch_in_order_marks_inflight(store: Store, clock: ManualClock) -> None:
    outcomes = await store.enqueue_many(
        [msg(clock, "a"), msg(clock, "b"), msg(clock, "c", ("bob", "carol"))], clock.now
    )
    assert outcomes == [[STORED], [STORED], [STORED, STORED]]
    batch = await fetch(store, clock, limit=2)
    assert ids(batch) == ["a", "b"]
    assert [m.attempt for m in batch.messages] == [1, 1]
    assert (batch.queued, batch.inflight, batch.fenced) == (1, 2, False)
    batch = await fetch(store, clock)
    assert ids(batch) == ["c"]
    assert (batch.queued, batch.inflight) == (0, 3)
    assert list((await fetch(store, clock)).messages) == []


async def test_fetched_message_carries_what_was_sent(store: Store, clock: ManualClock) -> None:
    new = msg(clock, "m1", ("bob", "carol"), body=b"hello", ttl_s=60)
    await store.enqueue_many([new], clock.now)
    clock.advance(5)
    [got] = (await fetch(store, clock, "carol")).messages
    assert got == Message("m1", "alice", "carol", b"hello", new.sent_at, new.expires_at, 1)


async def test_fetch_respects_byte_budget_but_returns_at_least_one(store: Store, clock: ManualClock) -> None:
    await store.enqueue_many([msg(clock, f"m{i}", body=b"b" * 100) for i in range(5)], clock.now)
    assert len((await store.fetch_many("bob", A1, 10, 250, clock.now)).messages) == 2
    assert len((await store.fetch_many("bob", A1, 10, 10, clock.now)).messages) == 1


async def test_fetch_with_no_room_only_counts(store: Store, clock: ManualClock) -> None:
    await store.enqueue_many([msg(clock, "a"), msg(clock, "b")], clock.now)
    await fetch(store, clock, limit=1)
    batch = await fetch(store, clock, limit=0)
    assert (ids(batch), batch.queued, batch.inflight) == ([], 1, 1)


async def test_unknown_mailbox_is_empty(store: Store, clock: ManualClock) -> None:
    batch = await fetch(store, clock, "nobody")
    assert (list(batch.messages), batch.queued, batch.inflight, batch.fenced) == ([], 0, 0, False)
    assert await store.pending("nobody", clock.now) == 0
    assert await store.peek("nobody", 10, clock.now) == []
    assert await store.release("nobody", A1) == 0
    assert await store.ack_many("nobody", ["x"], clock.now) == AckResult(0, 0)


async def test_one_recipient_refused_leaves_the_others_stored(open_store: StoreOpener, clock: ManualClock) -> None:
    async with open_store(StoreLimits(max_mailbox_messages=1)) as store:
        await store.enqueue_many([msg(clock, "first", "bob")], clock.now)
        assert await store.enqueue_many([msg(clock, "second", ("bob", "carol", "dave"))], clock.now) == [
            [Outcome.MAILBOX_FULL, STORED, STORED]
        ]
        assert [await store.pending(m, clock.now) for m in ("bob", "carol", "dave")] == [1, 1, 1]


# ---------------------------------------------------------------- outcomes


def test_outcome_codes() -> None:
    assert Outcome.STORED.code is None and Outcome.DUPLICATE.code is None
    assert Outcome.MAILBOX_FULL.code is ErrorCode.MAILBOX_FULL
    assert Outcome.MAILBOX_BYTES_FULL.code is ErrorCode.MAILBOX_BYTES_FULL
    assert Outcome.BROKER_FULL.code is ErrorCode.BROKER_FULL
    assert Outcome.ID_CONFLICT.code is ErrorCode.ID_CONFLICT
    assert len(Outcome) == 6


async def test_duplicate_and_conflicting_ids(store: Store, clock: ManualClock) -> None:
    await store.enqueue_many([msg(clock, "a")], clock.now)
    assert await store.enqueue_many([msg(clock, "a"), msg(clock, "a", sender="mallory")], clock.now) == [
        [DUPLICATE],
        [Outcome.ID_CONFLICT],
    ]
    # Held in flight is held too.
    await fetch(store, clock)
    assert await store.enqueue_many([msg(clock, "a", body=b"other body")], clock.now) == [[DUPLICATE]]
    assert await store.pending("bob", clock.now) == 1


async def test_the_same_id_for_another_recipient_is_a_new_message(store: Store, clock: ManualClock) -> None:
    await store.enqueue_many([msg(clock, "a", "bob")], clock.now)
    await fetch(store, clock)
    await store.ack_many("bob", ["a"], clock.now)
    assert await store.enqueue_many([msg(clock, "a", "carol", sender="mallory")], clock.now) == [[STORED]]


async def test_expired_but_unswept_message_still_holds_its_id(store: Store, clock: ManualClock) -> None:
    await store.enqueue_many([msg(clock, "a", ttl_s=10)], clock.now)
    clock.advance(10)
    assert await store.enqueue_many([msg(clock, "a"), msg(clock, "a", sender="mallory")], clock.now) == [
        [DUPLICATE],
        [Outcome.ID_CONFLICT],
    ]


# ---------------------------------------------------------------- tombstones


async def test_acked_id_is_remembered_until_it_would_have_expired(store: Store, clock: ManualClock) -> None:
    await store.enqueue_many([msg(clock, "a", ttl_s=DAY_S)], clock.now)
    await fetch(store, clock)
    await store.ack_many("bob", ["a"], clock.now)
    assert await store.enqueue_many([msg(clock, "a"), msg(clock, "a", sender="mallory")], clock.now) == [
        [DUPLICATE],
        [Outcome.ID_CONFLICT],
    ]
    assert (await store.statistics(clock.now)).tombstones == 1
    clock.advance(DAY_S - 1)
    assert await store.enqueue_many([msg(clock, "a")], clock.now) == [[DUPLICATE]]
    clock.advance(1)
    # The tombstone lapses at the message's expires_at, swept or not.
    assert await store.enqueue_many([msg(clock, "a", sender="mallory")], clock.now) == [[STORED]]
    assert [m.sender for m in await store.peek("bob", 10, clock.now)] == ["mallory"]


async def test_the_sweep_forgets_expired_tombstones(store: Store, clock: ManualClock) -> None:
    await store.enqueue_many([msg(clock, "a", ttl_s=60), msg(clock, "b", ttl_s=3600)], clock.now)
    await store.ack_many("bob", ["a", "b"], clock.now)  # ACK before delivery tombstones too
    assert (await store.statistics(clock.now)).tombstones == 2
    clock.advance(60)
    assert (await store.purge_expired(clock.now)).count == 0  # tombstones are not messages
    assert (await store.statistics(clock.now)).tombstones == 1
    assert await store.enqueue_many([msg(clock, "b")], clock.now) == [[DUPLICATE]]


async def test_at_most_max_tombstones_oldest_forgotten_first(open_store: StoreOpener, clock: ManualClock) -> None:
    async with open_store(StoreLimits(max_tombstones=2)) as store:
        await store.enqueue_many([msg(clock, m) for m in "abc"], clock.now)
        for m in "abc":
            await store.ack_many("bob", [m], clock.now)
        assert (await store.statistics(clock.now)).tombstones == 2
        assert await store.enqueue_many([msg(clock, m) for m in "abc"], clock.now) == [
            [STORED],
            [DUPLICATE],
            [DUPLICATE],
        ]


async def test_no_tombstones_when_the_limit_is_zero(open_store: StoreOpener, clock: ManualClock) -> None:
    async with open_store(StoreLimits(max_tombstones=0)) as store:
        await store.enqueue_many([msg(clock, "a")], clock.now)
        await store.ack_many("bob", ["a"], clock.now)
        assert (await store.statistics(clock.now)).tombstones == 0
        assert await store.enqueue_many([msg(clock, "a")], clock.now) == [[STORED]]


# ---------------------------------------------------------------- limits


async def test_limits_in_order(open_store: StoreOpener, clock: ManualClock) -> None:
    limits = StoreLimits(max_mailbox_messages=2, max_mailbox_bytes=10, max_total_bytes=14, max_tombstones=1)
    async with open_store(limits) as store:
        outcomes = await store.enqueue_many(
            [
                msg(clock, "a", body=b"1234"),
                msg(clock, "b", body=b"1234567"),  # 4 + 7 > 10
                msg(clock, "c", body=b"123456"),
                msg(clock, "d", body=b""),  # a third message for bob
                msg(clock, "e", "carol", body=b"12345"),  # 10 + 5 > 14
                msg(clock, "f", "dave", body=b"12345678901"),  # alone above max_mailbox_bytes
                msg(clock, "a", body=b"1234567890123"),  # the id is judged before any limit
            ],
            clock.now,
        )
        assert outcomes == [
            [STORED],
            [Outcome.MAILBOX_BYTES_FULL],
            [STORED],
            [Outcome.MAILBOX_FULL],
            [Outcome.BROKER_FULL],
            [Outcome.MAILBOX_BYTES_FULL],
            [DUPLICATE],
        ]
        await fetch(store, clock)
        await store.ack_many("bob", ["a", "c"], clock.now)
        stats = await store.statistics(clock.now)
        assert (stats.tombstones, stats.queued_bytes, stats.messages_total) == (1, 0, 0)
        # Room again: limits count what is held now.
        assert await store.enqueue_many([msg(clock, "g", body=b"1234567890")], clock.now) == [[STORED]]


# ---------------------------------------------------------------- ACK


async def test_ack_deletes_only_own_mailbox_messages(store: Store, clock: ManualClock) -> None:
    await store.enqueue_many([msg(clock, "a", ("bob", "carol"))], clock.now)
    await fetch(store, clock)
    assert (await store.ack_many("carol-not", ["a"], clock.now)).deleted == 0
    assert await store.ack_many("bob", ["a", "unknown", "a"], clock.now) == AckResult(1, 0)
    assert await store.pending("bob", clock.now) == 0
    assert await store.pending("carol", clock.now) == 1
    assert (await store.ack_many("bob", ["a"], clock.now)).deleted == 0


async def test_ack_of_queued_and_inflight_messages(store: Store, clock: ManualClock) -> None:
    await store.enqueue_many([msg(clock, m) for m in "abcd"], clock.now)
    await fetch(store, clock, limit=2)
    assert await store.ack_many("bob", ["b", "c"], clock.now) == AckResult(2, 1)  # one in flight, one never delivered
    assert ids(await fetch(store, clock)) == ["d"]
    assert [m.id for m in await store.peek("bob", 10, clock.now)] == ["a", "d"]


async def test_ack_needs_no_claim(store: Store, clock: ManualClock) -> None:
    """An ACK may come over HTTP, or from a session that was taken over: it deletes all the same."""
    await store.enqueue_many([msg(clock, m) for m in "abc"], clock.now)
    await fetch(store, clock, claim=A1, limit=2)
    await fetch(store, clock, claim=B2, limit=0)  # B takes over a and b
    assert await store.ack_many("bob", ["a"], clock.now) == AckResult(1, 0)
    assert ids(await fetch(store, clock, claim=B2)) == ["b", "c"]


# ---------------------------------------------------------------- release


async def test_release_returns_inflight_to_the_front_with_next_attempt(store: Store, clock: ManualClock) -> None:
    await store.enqueue_many([msg(clock, "a"), msg(clock, "b"), msg(clock, "c")], clock.now)
    await fetch(store, clock, limit=2)
    assert await store.release("bob", A1) == 2
    assert await store.release("bob", A1) == 0
    batch = await fetch(store, clock)
    assert [(m.id, m.attempt) for m in batch.messages] == [("a", 2), ("b", 2), ("c", 1)]


async def test_release_of_unwritten_ids_keeps_their_attempt(store: Store, clock: ManualClock) -> None:
    await store.enqueue_many([msg(clock, m) for m in "abcd"], clock.now)
    await fetch(store, clock, limit=3)
    # a went out; b and c were fetched but never written (the session was closing). Unknown ids are ignored.
    assert await store.release("bob", A1, unwritten={"b", "c", "zz", "d"}) == 3
    batch = await fetch(store, clock)
    assert [(m.id, m.attempt) for m in batch.messages] == [("a", 2), ("b", 1), ("c", 1), ("d", 1)]


# ---------------------------------------------------------------- fencing


async def test_a_newer_claim_takes_over_the_inflight_messages(store: Store, clock: ManualClock) -> None:
    await store.enqueue_many([msg(clock, m) for m in "abc"], clock.now)
    assert ids(await fetch(store, clock, claim=A1, limit=2)) == ["a", "b"]
    batch = await fetch(store, clock, claim=B2)
    assert [(m.id, m.attempt) for m in batch.messages] == [("a", 2), ("b", 2), ("c", 1)]
    assert (batch.queued, batch.inflight, batch.fenced) == (0, 3, False)


async def test_a_stale_claim_can_neither_fetch_nor_release(store: Store, clock: ManualClock) -> None:
    await store.enqueue_many([msg(clock, m) for m in "abcd"], clock.now)
    await fetch(store, clock, claim=B2, limit=2)
    stale = await fetch(store, clock, claim=A1)
    assert (list(stale.messages), stale.fenced) == ([], True)
    assert await store.release("bob", A1) == 0
    assert await store.release("bob", A1, unwritten={"a", "b"}) == 0
    # B's deliveries are untouched: still in flight (not redelivered), attempt unchanged.
    batch = await fetch(store, clock, claim=B2)
    assert (ids(batch), batch.inflight) == (["c", "d"], 4)
    assert await store.release("bob", B2) == 4
    assert [(m.id, m.attempt) for m in (await fetch(store, clock, claim=B2)).messages] == [
        ("a", 2),
        ("b", 2),
        ("c", 2),
        ("d", 2),
    ]


async def test_the_fence_outlives_a_release(store: Store, clock: ManualClock) -> None:
    """A session that released (it ended) does not let an older claim back in."""
    await store.enqueue_many([msg(clock, m) for m in "ab"], clock.now)
    await fetch(store, clock, claim=B2, limit=1)
    await store.release("bob", B2)
    assert (await fetch(store, clock, claim=A1)).fenced
    assert ids(await fetch(store, clock, claim=C3)) == ["a", "b"]


async def test_same_epoch_another_owner_is_stale(store: Store, clock: ManualClock) -> None:
    await store.enqueue_many([msg(clock, "a")], clock.now)
    await fetch(store, clock, claim=B2)
    impostor = Claim("session-x", B2.epoch)
    assert (await fetch(store, clock, claim=impostor)).fenced
    assert await store.release("bob", impostor) == 0
    assert await store.release("bob", Claim(B2.owner, B2.epoch)) == 1  # equal claims are the same claim


async def test_fences_are_per_mailbox(store: Store, clock: ManualClock) -> None:
    await store.enqueue_many([msg(clock, "a", ("bob", "carol"))], clock.now)
    await fetch(store, clock, "bob", claim=B2)
    assert ids(await fetch(store, clock, "carol", claim=A1)) == ["a"]


# ---------------------------------------------------------------- handed-out messages


async def test_handed_out_messages_are_immutable_snapshots(store: Store, clock: ManualClock) -> None:
    await store.enqueue_many([msg(clock, "a", body=b"payload"), msg(clock, "b")], clock.now)
    [first, _] = (await fetch(store, clock)).messages
    with pytest.raises(AttributeError):
        first.attempt = 5  # type: ignore[misc]
    with pytest.raises(AttributeError):
        first.body = b""  # type: ignore[misc]
    [peeked, _] = await store.peek("bob", 10, clock.now)
    await store.release("bob", A1)
    [again, _] = (await fetch(store, clock)).messages
    await store.ack_many("bob", ["a", "b"], clock.now)
    await store.purge_expired(clock.now)
    assert (first.body, first.attempt) == (b"payload", 1)
    assert (peeked.body, peeked.attempt) == (b"payload", 1)
    assert (again.body, again.attempt) == (b"payload", 2)


def test_result_records_are_immutable() -> None:
    held = HeldStatus(1, ReportState.DELIVERED, 0, "m", "bob", None, 1)
    for record in (Batch((), 0, 0), AckResult(0, 0), Purged(0, frozenset()), Claim("s", 1), held):
        field = dataclasses.fields(record)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(record, field, 1)


# ---------------------------------------------------------------- expiry


async def test_expired_message_is_never_delivered_even_before_the_sweep(store: Store, clock: ManualClock) -> None:
    await store.enqueue_many([msg(clock, "short", ttl_s=60), msg(clock, "long")], clock.now)
    clock.advance(60 - 0.001)
    assert [m.id for m in await store.peek("bob", 10, clock.now)] == ["short", "long"]
    clock.advance(0.001)  # exactly at expires_at: expired
    assert [m.id for m in await store.peek("bob", 10, clock.now)] == ["long"]
    assert await store.pending("bob", clock.now) == 1
    batch = await fetch(store, clock)
    assert ids(batch) == ["long"]
    assert (batch.queued, batch.inflight) == (0, 1)
    stats = await store.statistics(clock.now)
    assert (stats.expired_total, stats.messages_total) == (1, 1)  # removed by the fetch that found it expired


async def test_expired_inflight_message_is_not_redelivered(store: Store, clock: ManualClock) -> None:
    await store.enqueue_many([msg(clock, "a", ttl_s=10), msg(clock, "b")], clock.now)
    await fetch(store, clock)
    clock.advance(10)
    assert await store.release("bob", A1) == 2
    assert [(m.id, m.attempt) for m in (await fetch(store, clock)).messages] == [("b", 2)]


async def test_sweep_purges_expired_messages_and_names_their_mailboxes(store: Store, clock: ManualClock) -> None:
    await store.enqueue_many([msg(clock, f"m{i}", f"user{i % 7}") for i in range(50)], clock.now)
    await store.enqueue_many([msg(clock, "keep", "user0", ttl_s=30 * DAY_S)], clock.now)
    clock.advance(7 * DAY_S - 1)
    assert await store.purge_expired(clock.now) == Purged(0, frozenset())
    clock.advance(1)
    stats = await store.statistics(clock.now)
    assert (stats.messages_expired_unswept, stats.messages_deliverable, stats.messages_total) == (50, 1, 51)
    assert await store.purge_expired(clock.now) == Purged(50, frozenset(f"user{i}" for i in range(7)))
    assert await store.purge_expired(clock.now) == Purged(0, frozenset())
    stats = await store.statistics(clock.now)
    assert (stats.messages_total, stats.expired_total, stats.unique_recipients) == (1, 50, 1)
    assert (stats.messages_expired_unswept, stats.messages_deliverable) == (0, 1)
    assert await store.pending("user1", clock.now) == 0
    assert await store.pending("user0", clock.now) == 1


async def test_sweep_within_a_second_takes_only_what_is_due(store: Store, clock: ManualClock) -> None:
    clock.now = clock.now // 1000 * 1000  # the start of a second
    await store.enqueue_many([msg(clock, "a", ttl_s=10.2), msg(clock, "b", ttl_s=10.7)], clock.now)
    clock.advance(10.5)
    assert await store.purge_expired(clock.now) == Purged(1, frozenset({"bob"}))
    clock.advance(0.2)
    assert await store.purge_expired(clock.now) == Purged(1, frozenset({"bob"}))


async def test_inflight_message_expires_too(store: Store, clock: ManualClock) -> None:
    await store.enqueue_many([msg(clock, "a", ttl_s=10)], clock.now)
    await fetch(store, clock)
    clock.advance(10)
    assert (await store.statistics(clock.now)).inflight == 1
    assert await store.purge_expired(clock.now) == Purged(1, frozenset({"bob"}))
    assert await store.release("bob", A1) == 0
    assert (await fetch(store, clock)).inflight == 0
    assert (await store.statistics(clock.now)).inflight == 0


async def test_sweep_after_most_were_acked_purges_exactly_the_rest(store: Store, clock: ManualClock) -> None:
    await store.enqueue_many([msg(clock, f"m{i}", ttl_s=60) for i in range(200)], clock.now)
    await store.fetch_many("bob", A1, 1000, BIG, clock.now)
    await store.ack_many("bob", [f"m{i}" for i in range(0, 200, 4)], clock.now)  # a quarter, spread out
    await store.ack_many("bob", [f"m{i}" for i in range(1, 200, 4)], clock.now)  # a second quarter
    clock.advance(60)
    assert (await store.purge_expired(clock.now)).count == 100
    stats = await store.statistics(clock.now)
    assert (stats.messages_total, stats.expired_total, stats.acknowledged_total, stats.inflight) == (0, 100, 100, 0)


# ---------------------------------------------------------------- peek, pending, statistics


async def test_peek_changes_nothing(store: Store, clock: ManualClock) -> None:
    await store.enqueue_many([msg(clock, "a"), msg(clock, "b"), msg(clock, "c", ttl_s=1)], clock.now)
    await fetch(store, clock, limit=1)
    clock.advance(2)
    peeked = await store.peek("bob", 10, clock.now)
    assert [(m.id, m.attempt) for m in peeked] == [("a", 1), ("b", 0)]
    assert [m.id for m in await store.peek("bob", 1, clock.now)] == ["a"]
    assert await store.peek("bob", 0, clock.now) == []
    assert (await fetch(store, clock)).inflight == 2


async def test_statistics_count_everything(store: Store, clock: ManualClock) -> None:
    await store.enqueue_many([msg(clock, "a", ("bob", "carol"), body=b"12345"), msg(clock, "b", body=b"12")], clock.now)
    await fetch(store, clock, limit=1)
    await store.ack_many("carol", ["a"], clock.now)
    stats = await store.statistics(clock.now)
    assert dataclasses.asdict(stats) == {
        "messages_total": 2,
        "messages_deliverable": 2,
        "messages_expired_unswept": 0,
        "acknowledged_total": 1,
        "unique_recipients": 1,
        "queued_bytes": 7,
        "expired_total": 0,
        "tombstones": 1,
        "inflight": 1,
        "statuses_held": 0,
        "statuses_total": 0,
        "statuses_overflowed_total": 0,
        "statuses_expired_total": 0,
        "mailbox_depths": depths({"bob": 2}),
    }


def depths(held: dict[str, int]) -> tuple[int, ...]:
    """What ``mailbox_depths`` says for mailboxes holding these many messages, worked out bucket by bucket."""
    counts = [0] * (len(MAILBOX_DEPTH_BOUNDS) + 1)
    for n in held.values():
        if n:
            counts[
                next((i for i, bound in enumerate(MAILBOX_DEPTH_BOUNDS) if n <= bound), len(MAILBOX_DEPTH_BOUNDS))
            ] += 1
    return tuple(counts)


async def test_mailboxes_are_counted_by_how_many_messages_they_hold(store: Store, clock: ManualClock) -> None:
    """Every call that changes a mailbox's count moves it between depth buckets: enqueue (one message and many,
    across bounds), ACK (some, all), expiry at fetch and at the sweep; a duplicate, fetch or release moves nothing."""

    async def check(held: dict[str, int]) -> None:
        stats = await store.statistics(clock.now)
        assert stats.mailbox_depths == depths(held)
        assert (sum(stats.mailbox_depths), stats.messages_total) == (stats.unique_recipients, sum(held.values()))

    await check({})
    batch = [
        msg(clock, "a", ("bob", "carol")),
        msg(clock, "b", "carol"),
        *(msg(clock, f"d{i}", "dave") for i in range(11)),
    ]
    await store.enqueue_many(batch, clock.now)
    await check({"bob": 1, "carol": 2, "dave": 11})
    await store.enqueue_many([msg(clock, f"e{i}", "dave") for i in range(11, 60)], clock.now)  # past 50, one call
    await check({"bob": 1, "carol": 2, "dave": 60})
    await store.ack_many("dave", [f"d{i}" for i in range(6)] + [f"e{i}" for i in range(11, 60)], clock.now)
    await store.ack_many("carol", ["a", "b"], clock.now)
    await check({"bob": 1, "dave": 5})
    assert await store.enqueue_many([msg(clock, "a", "bob")], clock.now) == [[DUPLICATE]]
    assert ids(await fetch(store, clock)) == ["a"]
    assert await store.release("bob", A1) == 1
    await check({"bob": 1, "dave": 5})
    soon = [msg(clock, f"s{i}", to, ttl_s=1) for i, to in enumerate(["erin"] * 3 + ["frank"] * 2)]
    await store.enqueue_many([*soon, msg(clock, "late", "erin")], clock.now)
    await check({"bob": 1, "dave": 5, "erin": 4, "frank": 2})
    clock.advance(2)
    assert ids(await fetch(store, clock, "erin")) == ["late"]  # the three expired ones removed at the fetch
    await check({"bob": 1, "dave": 5, "erin": 1, "frank": 2})
    assert (await store.purge_expired(clock.now)).mailboxes == frozenset({"frank"})
    await check({"bob": 1, "dave": 5, "erin": 1})


async def test_empty_mailbox_holds_nothing(store: Store, clock: ManualClock) -> None:
    await store.enqueue_many([msg(clock, f"m{i}", f"u{i}") for i in range(100)], clock.now)
    for i in range(100):
        await fetch(store, clock, f"u{i}")
        await store.ack_many(f"u{i}", [f"m{i}"], clock.now)
    stats = await store.statistics(clock.now)
    assert (stats.unique_recipients, stats.messages_total, stats.inflight, stats.queued_bytes) == (0, 0, 0, 0)


async def test_many_acks_before_delivery(store: Store, clock: ManualClock) -> None:
    await store.enqueue_many([msg(clock, f"m{i}") for i in range(1000)], clock.now)
    await store.ack_many("bob", [f"m{i}" for i in range(0, 999)], clock.now)
    assert ids(await fetch(store, clock, limit=10)) == ["m999"]
    assert await store.pending("bob", clock.now) == 1


async def test_empty_bodies_are_messages_like_any_other(store: Store, clock: ManualClock) -> None:
    """A zero-byte body is held, delivered, ACKed, expired and swept like any other (and counts 0 bytes)."""
    batch = [msg(clock, "a", ("bob", "carol"), body=b""), msg(clock, "b", body=b"", ttl_s=1), msg(clock, "c", body=b"")]
    assert await store.enqueue_many(batch, clock.now) == [[STORED, STORED], [STORED], [STORED]]
    assert ids(await fetch(store, clock, limit=1)) == ["a"]
    assert (await store.ack_many("bob", ["a"], clock.now)).deleted == 1
    clock.advance(2)
    assert ids(await fetch(store, clock)) == ["c"]  # "b" expired: removed at fetch
    assert (await store.ack_many("bob", ["c"], clock.now)).deleted == 1
    await store.enqueue_many([msg(clock, "d", "dave", body=b"", ttl_s=1)], clock.now)
    clock.advance(2)
    purged = await store.purge_expired(clock.now)
    assert (purged.count, purged.mailboxes) == (1, frozenset({"dave"}))
    stats = await store.statistics(clock.now)
    assert (stats.messages_total, stats.queued_bytes, stats.acknowledged_total, stats.expired_total) == (1, 0, 2, 2)
    assert [m.body for m in await store.peek("carol", 10, clock.now)] == [b""]


# ---------------------------------------------------------------- notices (messages sent with notify)

DELIVERED = ReportState.DELIVERED
EXPIRED = ReportState.EXPIRED
OVERFLOW = ReportState.OVERFLOW


async def test_ack_of_a_notify_message_gives_one_delivered_notice_per_recipient(
    store: Store, clock: ManualClock
) -> None:
    await store.enqueue_many([msg(clock, "a", ("bob", "carol"), notify=True)], clock.now)
    await fetch(store, clock)
    clock.advance(5)
    result = await store.ack_many("bob", ["a", "a", "unknown"], clock.now)
    assert result == AckResult(1, 0, (Notice("alice", "a", "bob", DELIVERED, clock.now),))
    assert await store.ack_many("bob", ["a"], clock.now) == AckResult(0, 0)  # a duplicate ACK: nothing more
    clock.advance(5)
    assert (await store.ack_many("carol", ["a"], clock.now)).notices == (
        Notice("alice", "a", "carol", DELIVERED, clock.now),
    )


async def test_a_redelivered_message_gives_one_notice(store: Store, clock: ManualClock) -> None:
    await store.enqueue_many([msg(clock, "a", notify=True)], clock.now)
    await fetch(store, clock)
    await store.release("bob", A1)
    [again] = (await fetch(store, clock, claim=B2)).messages
    assert again.attempt == 2
    assert len((await store.ack_many("bob", ["a"], clock.now)).notices) == 1
    assert (await store.ack_many("bob", ["a"], clock.now)).notices == ()


async def test_an_ack_of_many_names_exactly_the_notify_messages(store: Store, clock: ManualClock) -> None:
    await store.enqueue_many([msg(clock, f"m{i}", sender=f"s{i % 3}", notify=i % 2 == 0) for i in range(10)], clock.now)
    await fetch(store, clock, limit=4)  # some in flight, some queued: both give notices
    result = await store.ack_many("bob", [f"m{i}" for i in range(10)], clock.now)
    assert result.deleted == 10
    assert sorted(result.notices) == sorted(
        Notice(f"s{i % 3}", f"m{i}", "bob", DELIVERED, clock.now) for i in range(0, 10, 2)
    )


async def test_messages_without_notify_give_no_notices(store: Store, clock: ManualClock) -> None:
    await store.enqueue_many(
        [msg(clock, "a"), msg(clock, "b", ttl_s=10), msg(clock, "c", "carol", ttl_s=10)], clock.now
    )
    assert (await store.ack_many("bob", ["a"], clock.now)).notices == ()
    clock.advance(10)
    batch = await fetch(store, clock)
    assert (ids(batch), batch.notices) == ([], ())
    purged = await store.purge_expired(clock.now)
    assert (purged.count, purged.notices) == (1, ())


async def test_expiry_at_fetch_gives_an_expired_notice_at_expires_at(store: Store, clock: ManualClock) -> None:
    new = msg(clock, "a", ("bob", "carol"), ttl_s=10, notify=True)
    await store.enqueue_many([new, msg(clock, "b", notify=True)], clock.now)
    clock.advance(30)
    batch = await fetch(store, clock)
    assert ids(batch) == ["b"]
    assert batch.notices == (Notice("alice", "a", "bob", EXPIRED, new.expires_at),)
    assert (await store.purge_expired(clock.now)).notices == (Notice("alice", "a", "carol", EXPIRED, new.expires_at),)
    assert (await store.purge_expired(clock.now)).notices == ()
    assert (await fetch(store, clock)).notices == ()


async def test_expiry_at_the_sweep_gives_expired_notices(store: Store, clock: ManualClock) -> None:
    news = [msg(clock, f"m{i}", f"user{i % 4}", sender=f"s{i % 2}", ttl_s=60, notify=i != 3) for i in range(8)]
    await store.enqueue_many(news, clock.now)
    await fetch(store, clock, "user1", limit=1)  # an in-flight one expires too
    await store.ack_many("user2", ["m2"], clock.now)  # an ACKed one does not
    clock.advance(60)
    purged = await store.purge_expired(clock.now)
    assert purged.count == 7
    assert sorted(purged.notices) == sorted(
        Notice(n.sender, n.id, n.recipients[0], EXPIRED, n.expires_at) for n in news if n.id not in ("m2", "m3")
    )


async def test_fetched_and_peeked_messages_carry_notify(store: Store, clock: ManualClock) -> None:
    await store.enqueue_many([msg(clock, "a", notify=True), msg(clock, "b"), msg(clock, "c", notify=True)], clock.now)
    assert [m.notify for m in await store.peek("bob", 10, clock.now)] == [True, False, True]
    await fetch(store, clock, limit=1)
    assert [(m.id, m.notify) for m in await store.peek("bob", 10, clock.now)] == [
        ("a", True),
        ("b", False),
        ("c", True),
    ]
    assert [(m.id, m.notify) for m in (await fetch(store, clock)).messages] == [("b", False), ("c", True)]


async def test_a_duplicate_send_keeps_the_first_sends_notify(store: Store, clock: ManualClock) -> None:
    await store.enqueue_many([msg(clock, "plain"), msg(clock, "asked", notify=True)], clock.now)
    outcomes = await store.enqueue_many([msg(clock, "plain", notify=True), msg(clock, "asked")], clock.now)
    assert outcomes == [[DUPLICATE], [DUPLICATE]]
    result = await store.ack_many("bob", ["plain", "asked"], clock.now)
    assert [n.id for n in result.notices] == ["asked"]


# ---------------------------------------------------------------- status lanes


def delivered(mid: str, recipient: str = "bob", *, at: int = 1, lane: str = "alice") -> Notice:
    return Notice(lane, mid, recipient, DELIVERED, at)


async def statuses(store: Store, clock: ManualClock, lane: str = "alice", after: int = 0) -> list[HeldStatus]:
    return await store.fetch_statuses(lane, after, 100_000, clock.now)


TTL_MS = 3600_000


def test_the_seq_rule() -> None:
    assert next_status_seq(0, 1_800_000_000_000) == 1_800_000_000_000_000
    assert next_status_seq(1_800_000_000_000_005, 1_800_000_000_000) == 1_800_000_000_000_006
    assert next_status_seq(5, 0) == 6
    assert next_status_seq(1_800_000_000_000_000, 1_800_000_000_001) == 1_800_000_000_001_000
    assert next_status_seq(0, 9_007_199_254_740) < 2**53  # June 2255 in epoch ms: still a safe JavaScript integer


async def test_added_statuses_are_held_in_order_and_fetched_after_a_seq(store: Store, clock: ManualClock) -> None:
    notices = [
        delivered("a", at=clock.now - 5),
        Notice("alice", "b", "carol", EXPIRED, clock.now - 7),
        delivered("c", "dave", at=clock.now),
    ]
    assert await store.add_statuses(notices, clock.now, TTL_MS) == frozenset({"alice"})
    held = await statuses(store, clock)
    assert [(h.state, h.at, h.id, h.recipient, h.count, h.first_seq) for h in held] == [
        (DELIVERED, clock.now - 5, "a", "bob", None, None),
        (EXPIRED, clock.now - 7, "b", "carol", None, None),
        (DELIVERED, clock.now, "c", "dave", None, None),
    ]
    assert all(h.expires_at == clock.now + TTL_MS for h in held)
    seqs = [h.seq for h in held]
    assert seqs == sorted(set(seqs)) and seqs[0] >= clock.now * 1000
    # Fetching changes nothing: the same again, and from a cursor only what is after it.
    assert await statuses(store, clock) == held
    assert await statuses(store, clock, after=seqs[0]) == held[1:]
    assert await store.fetch_statuses("alice", seqs[0] - 1, 1, clock.now) == held[:1]
    assert await statuses(store, clock, after=seqs[-1]) == []
    assert await store.fetch_statuses("alice", 0, 0, clock.now) == []


async def test_each_notice_goes_to_its_own_mailbox_lane(store: Store, clock: ManualClock) -> None:
    got = await store.add_statuses(
        [delivered("a", lane="alice"), delivered("b", lane="erin"), delivered("c", lane="alice")], clock.now, TTL_MS
    )
    assert got == frozenset({"alice", "erin"})
    assert [h.id for h in await statuses(store, clock, "alice")] == ["a", "c"]
    [erins] = await statuses(store, clock, "erin")
    assert erins.id == "b"
    alices = await statuses(store, clock, "alice")
    assert await store.ack_statuses("erin", [h.seq for h in alices] + [erins.seq]) == 1  # seqs are per lane
    assert await statuses(store, clock, "alice") == alices
    assert await statuses(store, clock, "nobody") == []
    assert await store.add_statuses([], clock.now, TTL_MS) == frozenset()


async def test_seqs_grow_across_calls_and_clocks(store: Store, clock: ManualClock) -> None:
    await store.add_statuses([delivered("a"), delivered("b")], clock.now, TTL_MS)
    clock.advance(0.001)
    await store.add_statuses([delivered("c")], clock.now, TTL_MS)
    clock.now -= 10_000  # a clock that went back: seqs still grow
    await store.add_statuses([delivered("d")], clock.now, TTL_MS)
    seqs = [h.seq for h in await statuses(store, clock)]
    assert len(seqs) == 4 and seqs == sorted(set(seqs))


async def test_seqs_grow_across_an_emptied_and_forgotten_lane(store: Store, clock: ManualClock) -> None:
    await store.add_statuses([delivered(f"m{i}") for i in range(5)], clock.now, TTL_MS)
    first = [h.seq for h in await statuses(store, clock)]
    assert await store.ack_statuses("alice", first) == 5
    assert (await store.statistics(clock.now)).statuses_held == 0
    await store.add_statuses([delivered("again")], clock.now, TTL_MS)  # the same millisecond
    [again] = await statuses(store, clock)
    assert again.seq > max(first)
    assert await statuses(store, clock, after=max(first)) == [again]  # a reader's cursor does not skip it


async def test_ack_statuses_deletes_by_seq_and_ignores_unknown_ones(store: Store, clock: ManualClock) -> None:
    await store.add_statuses([delivered(m) for m in "abc"], clock.now, TTL_MS)
    a, b, c = await statuses(store, clock)
    assert await store.ack_statuses("alice", [b.seq, b.seq, 12345, c.seq + 1]) == 1
    assert await statuses(store, clock) == [a, c]
    assert await store.ack_statuses("alice", [b.seq]) == 0
    assert await store.ack_statuses("alice", []) == 0
    assert await store.ack_statuses("nobody", [a.seq]) == 0
    assert await store.ack_statuses("alice", [a.seq, c.seq]) == 2
    assert await statuses(store, clock) == []


async def test_statuses_at_the_bound_fold_into_one_overflow_record(open_store: StoreOpener, clock: ManualClock) -> None:
    async with open_store(StoreLimits(max_mailbox_statuses=3)) as store:
        await store.add_statuses([delivered(f"m{i}") for i in range(5)], clock.now, TTL_MS)
        held = await statuses(store, clock)
        assert [h.id for h in held[:3]] == ["m0", "m1", "m2"]
        overflow = held[3]
        assert (overflow.state, overflow.count, overflow.at, overflow.id, overflow.recipient) == (
            OVERFLOW,
            2,
            clock.now,
            None,
            None,
        )
        assert overflow.first_seq == overflow.seq > held[2].seq
        assert overflow.expires_at == clock.now + TTL_MS
        # It grows: renumbered (newest in the lane, after a reader's cursor), `at` and expiry updated.
        clock.advance(7)
        await store.add_statuses([delivered("m5"), delivered("m6", lane="erin")], clock.now, TTL_MS)
        await store.add_statuses([delivered("m7")], clock.now, TTL_MS)
        later = await statuses(store, clock)
        assert later[:3] == held[:3]
        grown = later[3]
        assert (grown.state, grown.count, grown.at, grown.first_seq) == (OVERFLOW, 4, clock.now, overflow.first_seq)
        assert grown.seq > overflow.seq and grown.expires_at == clock.now + TTL_MS
        assert await statuses(store, clock, after=overflow.seq) == [grown]
        assert await store.ack_statuses("alice", [overflow.seq]) == 0  # its old seq is gone
        stats = await store.statistics(clock.now)
        assert (stats.statuses_held, stats.statuses_total, stats.statuses_overflowed_total) == (5, 8, 4)


async def test_below_the_bound_again_statuses_are_kept_one_by_one(open_store: StoreOpener, clock: ManualClock) -> None:
    async with open_store(StoreLimits(max_mailbox_statuses=2)) as store:
        await store.add_statuses([delivered(m) for m in "abc"], clock.now, TTL_MS)
        a, b, overflow = await statuses(store, clock)
        assert await store.ack_statuses("alice", [a.seq]) == 1
        await store.add_statuses([delivered("d"), delivered("e")], clock.now, TTL_MS)
        b2, d, overflow2 = await statuses(store, clock)  # d is kept; e grew the overflow record, newest again
        assert (b2, d.id) == (b, "d")
        assert (overflow2.count, overflow2.first_seq) == (2, overflow.first_seq) and overflow2.seq > d.seq
        # Once ACKed, the next fold starts a new overflow record.
        assert await store.ack_statuses("alice", [overflow2.seq]) == 1
        await store.add_statuses([delivered("f")], clock.now, TTL_MS)
        *_, fresh = await statuses(store, clock)
        assert (fresh.state, fresh.count, fresh.first_seq) == (OVERFLOW, 1, fresh.seq)
        assert fresh.seq > overflow2.seq


async def test_a_zero_bound_folds_every_status(open_store: StoreOpener, clock: ManualClock) -> None:
    async with open_store(StoreLimits(max_mailbox_statuses=0)) as store:
        await store.add_statuses([delivered(m) for m in "abc"], clock.now, TTL_MS)
        [overflow] = await statuses(store, clock)
        assert (overflow.state, overflow.count) == (OVERFLOW, 3)


async def test_statuses_expire_after_their_ttl(store: Store, clock: ManualClock) -> None:
    await store.add_statuses([delivered("a"), delivered("b", lane="erin")], clock.now, 60_000)
    clock.advance(30)
    await store.add_statuses([delivered("c")], clock.now, 60_000)
    clock.advance(30 - 0.001)
    assert [h.id for h in await statuses(store, clock)] == ["a", "c"]
    clock.advance(0.001)  # exactly at expires_at: expired, swept or not
    assert [h.id for h in await statuses(store, clock)] == ["c"]
    stats = await store.statistics(clock.now)
    assert (stats.statuses_held, stats.statuses_expired_total) == (2, 1)  # the fetch removed a; erin's b is unswept
    purged = await store.purge_expired(clock.now)
    assert (purged.count, purged.mailboxes, purged.notices) == (0, frozenset(), ())  # statuses are not messages
    assert await statuses(store, clock, "erin") == []
    stats = await store.statistics(clock.now)
    assert (stats.statuses_held, stats.statuses_expired_total) == (1, 2)
    clock.advance(30)
    await store.purge_expired(clock.now)
    stats = await store.statistics(clock.now)
    assert (stats.statuses_held, stats.statuses_expired_total, stats.statuses_total) == (0, 3, 3)


async def test_a_growing_overflow_record_lives_on(open_store: StoreOpener, clock: ManualClock) -> None:
    async with open_store(StoreLimits(max_mailbox_statuses=1)) as store:
        await store.add_statuses([delivered("a"), delivered("b")], clock.now, 60_000)
        clock.advance(50)
        await store.add_statuses([delivered("c")], clock.now, 60_000)
        clock.advance(10)
        [overflow] = await statuses(store, clock)  # "a" expired; the overflow record was renewed 10 s ago
        assert (overflow.state, overflow.count) == (OVERFLOW, 2)
        await store.purge_expired(clock.now)
        assert await statuses(store, clock) == [overflow]
        clock.advance(50)
        await store.purge_expired(clock.now)
        assert await statuses(store, clock) == []
        assert (await store.statistics(clock.now)).statuses_expired_total == 2


async def test_a_status_ttl_must_be_positive(store: Store, clock: ManualClock) -> None:
    with pytest.raises(ValueError, match="at least 1 ms"):
        await store.add_statuses([delivered("a")], clock.now, 0)
    assert await statuses(store, clock) == []


async def test_statuses_and_messages_of_a_mailbox_are_apart(store: Store, clock: ManualClock) -> None:
    """Statuses do not count as messages (pending, limits, statistics), and a mailbox emptied of messages
    keeps its statuses."""
    await store.enqueue_many([msg(clock, "a", "alice", sender="bob")], clock.now)
    await store.add_statuses([delivered("x")], clock.now, TTL_MS)
    assert await store.pending("alice", clock.now) == 1
    await store.fetch_many("alice", A1, 10, BIG, clock.now)
    await store.ack_many("alice", ["a"], clock.now)
    assert await store.pending("alice", clock.now) == 0
    assert [h.id for h in await statuses(store, clock)] == ["x"]
    stats = await store.statistics(clock.now)
    assert (stats.messages_total, stats.unique_recipients, stats.statuses_held) == (0, 0, 1)


# ---------------------------------------------------------------- key directory

KEY_TTL_MS = 90 * DAY_S * 1000


def record(kid: str = "0123456789abcdef", fill: int = 1) -> KeyRecord:
    return KeyRecord(ik=bytes([fill]) * 32, kid=kid, ek=bytes([fill + 1]) * 32, sig=bytes([fill + 2]) * 64)


async def test_a_key_record_is_held_by_mailbox_as_put(store: Store, clock: ManualClock) -> None:
    assert await store.get_keys(["bob"], clock.now) == {}
    await store.put_key("bob", record(), clock.now, KEY_TTL_MS)
    await store.put_key("carol@example.org", record("~" * 64, fill=7), clock.now, KEY_TTL_MS)
    got = await store.get_keys(["carol@example.org", "nobody", "bob", "carol@example.org"], clock.now)
    assert got == {"carol@example.org": record("~" * 64, fill=7), "bob": record()}
    assert list(got) == ["carol@example.org", "bob"], "order of first appearance"
    assert await store.get_keys([], clock.now) == {}


async def test_a_put_replaces_the_mailbox_record_and_renews_it(store: Store, clock: ManualClock) -> None:
    await store.put_key("bob", record("k1"), clock.now, 60_000)
    clock.advance(50)
    await store.put_key("bob", record("k2", fill=9), clock.now, 60_000)
    assert await store.get_keys(["bob"], clock.now) == {"bob": record("k2", fill=9)}
    clock.advance(59.999)
    assert await store.get_keys(["bob"], clock.now) == {"bob": record("k2", fill=9)}
    clock.advance(0.001)  # exactly at its expiry: gone
    assert await store.get_keys(["bob"], clock.now) == {}


async def test_key_records_expire_after_their_ttl_swept_or_not(store: Store, clock: ManualClock) -> None:
    await store.put_key("bob", record("k1"), clock.now, 60_000)
    await store.put_key("carol", record("k2"), clock.now, 60_000)
    clock.advance(30)
    await store.put_key("dave", record("k3"), clock.now, 60_000)
    clock.advance(30)
    assert await store.get_keys(["bob", "carol", "dave"], clock.now) == {"dave": record("k3")}
    await store.purge_expired(clock.now)
    assert await store.get_keys(["bob", "carol", "dave"], clock.now) == {"dave": record("k3")}
    clock.advance(30)
    purged = await store.purge_expired(clock.now)
    assert (purged.count, purged.mailboxes) == (0, frozenset())  # key records are not messages
    assert await store.get_keys(["dave"], clock.now) == {}


async def test_key_records_are_apart_from_messages_and_statuses(store: Store, clock: ManualClock) -> None:
    await store.put_key("bob", record(), clock.now, KEY_TTL_MS)
    assert await store.pending("bob", clock.now) == 0
    await store.enqueue_many([msg(clock, "a")], clock.now)
    await fetch(store, clock)
    await store.ack_many("bob", ["a"], clock.now)
    stats = await store.statistics(clock.now)
    assert (stats.messages_total, stats.unique_recipients, stats.statuses_held) == (0, 0, 0)
    assert await store.get_keys(["bob"], clock.now) == {"bob": record()}


async def test_a_key_ttl_must_be_positive(store: Store, clock: ManualClock) -> None:
    with pytest.raises(ValueError, match="at least 1 ms"):
        await store.put_key("bob", record(), clock.now, 0)
    assert await store.get_keys(["bob"], clock.now) == {}


async def test_many_key_lookups_at_once(store: Store, clock: ManualClock) -> None:
    names = [f"user{i}" for i in range(300)]
    for i, name in enumerate(names[::2]):
        await store.put_key(name, record(f"k{i}"), clock.now, KEY_TTL_MS)
    got = await store.get_keys(names, clock.now)
    assert list(got) == names[::2]
    assert got["user10"] == record("k5")
