"""The store contract (broker/store/base.py's docstring): one set of test bodies for every Store.

Each test runs against every implementation in conftest.IMPLEMENTATIONS through the
Store protocol only. Time is a :class:`~.clock.ManualClock` whose ``now`` every call is
given, so nothing here sleeps or needs a trio clock, and the same bodies can run
against a store over real sockets.
"""

from __future__ import annotations

import dataclasses

import pytest

from broker.store.base import AckResult, Batch, Claim, Message, NewMessage, Outcome, Purged, Store, StoreLimits
from wire import ErrorCode

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
) -> NewMessage:
    recipients = (to,) if isinstance(to, str) else to
    return NewMessage(mid, sender, recipients, body, clock.now, clock.now + int(ttl_s * 1000))


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
    assert await store.ack_many("nobody", ["x"]) == AckResult(0, 0)


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
    await store.ack_many("bob", ["a"])
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
    await store.ack_many("bob", ["a"])
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
    await store.ack_many("bob", ["a", "b"])  # ACK before delivery tombstones too
    assert (await store.statistics(clock.now)).tombstones == 2
    clock.advance(60)
    assert (await store.purge_expired(clock.now)).count == 0  # tombstones are not messages
    assert (await store.statistics(clock.now)).tombstones == 1
    assert await store.enqueue_many([msg(clock, "b")], clock.now) == [[DUPLICATE]]


async def test_at_most_max_tombstones_oldest_forgotten_first(open_store: StoreOpener, clock: ManualClock) -> None:
    async with open_store(StoreLimits(max_tombstones=2)) as store:
        await store.enqueue_many([msg(clock, m) for m in "abc"], clock.now)
        for m in "abc":
            await store.ack_many("bob", [m])
        assert (await store.statistics(clock.now)).tombstones == 2
        assert await store.enqueue_many([msg(clock, m) for m in "abc"], clock.now) == [
            [STORED],
            [DUPLICATE],
            [DUPLICATE],
        ]


async def test_no_tombstones_when_the_limit_is_zero(open_store: StoreOpener, clock: ManualClock) -> None:
    async with open_store(StoreLimits(max_tombstones=0)) as store:
        await store.enqueue_many([msg(clock, "a")], clock.now)
        await store.ack_many("bob", ["a"])
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
        await store.ack_many("bob", ["a", "c"])
        stats = await store.statistics(clock.now)
        assert (stats.tombstones, stats.queued_bytes, stats.messages_total) == (1, 0, 0)
        # Room again: limits count what is held now.
        assert await store.enqueue_many([msg(clock, "g", body=b"1234567890")], clock.now) == [[STORED]]


# ---------------------------------------------------------------- ACK


async def test_ack_deletes_only_own_mailbox_messages(store: Store, clock: ManualClock) -> None:
    await store.enqueue_many([msg(clock, "a", ("bob", "carol"))], clock.now)
    await fetch(store, clock)
    assert (await store.ack_many("carol-not", ["a"])).deleted == 0
    assert await store.ack_many("bob", ["a", "unknown", "a"]) == AckResult(1, 0)
    assert await store.pending("bob", clock.now) == 0
    assert await store.pending("carol", clock.now) == 1
    assert (await store.ack_many("bob", ["a"])).deleted == 0


async def test_ack_of_queued_and_inflight_messages(store: Store, clock: ManualClock) -> None:
    await store.enqueue_many([msg(clock, m) for m in "abcd"], clock.now)
    await fetch(store, clock, limit=2)
    assert await store.ack_many("bob", ["b", "c"]) == AckResult(2, 1)  # one in flight, one never delivered
    assert ids(await fetch(store, clock)) == ["d"]
    assert [m.id for m in await store.peek("bob", 10, clock.now)] == ["a", "d"]


async def test_ack_needs_no_claim(store: Store, clock: ManualClock) -> None:
    """An ACK may come over HTTP, or from a session that was taken over: it deletes all the same."""
    await store.enqueue_many([msg(clock, m) for m in "abc"], clock.now)
    await fetch(store, clock, claim=A1, limit=2)
    await fetch(store, clock, claim=B2, limit=0)  # B takes over a and b
    assert await store.ack_many("bob", ["a"]) == AckResult(1, 0)
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
    await store.ack_many("bob", ["a", "b"])
    await store.purge_expired(clock.now)
    assert (first.body, first.attempt) == (b"payload", 1)
    assert (peeked.body, peeked.attempt) == (b"payload", 1)
    assert (again.body, again.attempt) == (b"payload", 2)


def test_result_records_are_immutable() -> None:
    for record in (Batch((), 0, 0), AckResult(0, 0), Purged(0, frozenset()), Claim("s", 1)):
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
    await store.ack_many("bob", [f"m{i}" for i in range(0, 200, 4)])  # a quarter, spread out
    await store.ack_many("bob", [f"m{i}" for i in range(1, 200, 4)])  # a second quarter
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
    await store.ack_many("carol", ["a"])
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
    }


async def test_empty_mailbox_holds_nothing(store: Store, clock: ManualClock) -> None:
    await store.enqueue_many([msg(clock, f"m{i}", f"u{i}") for i in range(100)], clock.now)
    for i in range(100):
        await fetch(store, clock, f"u{i}")
        await store.ack_many(f"u{i}", [f"m{i}"])
    stats = await store.statistics(clock.now)
    assert (stats.unique_recipients, stats.messages_total, stats.inflight, stats.queued_bytes) == (0, 0, 0, 0)


async def test_many_acks_before_delivery(store: Store, clock: ManualClock) -> None:
    await store.enqueue_many([msg(clock, f"m{i}") for i in range(1000)], clock.now)
    await store.ack_many("bob", [f"m{i}" for i in range(0, 999)])
    assert ids(await fetch(store, clock, limit=10)) == ["m999"]
    assert await store.pending("bob", clock.now) == 1


async def test_empty_bodies_are_messages_like_any_other(store: Store, clock: ManualClock) -> None:
    """A zero-byte body is held, delivered, ACKed, expired and swept like any other (and counts 0 bytes)."""
    batch = [msg(clock, "a", ("bob", "carol"), body=b""), msg(clock, "b", body=b"", ttl_s=1), msg(clock, "c", body=b"")]
    assert await store.enqueue_many(batch, clock.now) == [[STORED, STORED], [STORED], [STORED]]
    assert ids(await fetch(store, clock, limit=1)) == ["a"]
    assert (await store.ack_many("bob", ["a"])).deleted == 1
    clock.advance(2)
    assert ids(await fetch(store, clock)) == ["c"]  # "b" expired: removed at fetch
    assert (await store.ack_many("bob", ["c"])).deleted == 1
    await store.enqueue_many([msg(clock, "d", "dave", body=b"", ttl_s=1)], clock.now)
    clock.advance(2)
    purged = await store.purge_expired(clock.now)
    assert (purged.count, purged.mailboxes) == (1, frozenset({"dave"}))
    stats = await store.statistics(clock.now)
    assert (stats.messages_total, stats.queued_bytes, stats.acknowledged_total, stats.expired_total) == (1, 0, 2, 2)
    assert [m.body for m in await store.peek("carol", 10, clock.now)] == [b""]
