"""The Redis store's own promises, beyond the contract: its key layout, key expiry, round trips, the
relay-wide byte limit over several nodes, failures as OSError, and messages that outlive the broker.

These look at Redis keys on purpose (the contract suite never does). Each test runs against the
session's standalone server and its three-master cluster, under a key prefix of its own; time
that the store judges is the broker's (``now_ms``), and the key-expiry test uses short real TTLs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from broker.redis_client import RedisUnavailable, open_redis
from broker.store.base import Claim, NewMessage, Notice, Outcome, StoreLimits, wall_clock_ms
from broker.store.redis import SEQ_MEMORY_MS, RedisStore
from wire import KeyRecord, ReportState

from ..redis_servers import running_redis
from .clock import DAY_S, ManualClock
from .test_contract import msg

A1 = Claim("session-a", 1)
B2 = Claim("session-b", 2)
BIG = 1 << 30


@pytest.fixture(params=["redis_server", "redis_cluster"])
def redis_url(request: pytest.FixtureRequest) -> str:
    """The URL of the session's standalone server, then of its cluster."""
    return str(request.getfixturevalue(request.param).url)


@asynccontextmanager
async def redis_store(url: str, prefix: str, limits: StoreLimits | None = None, **options: Any) -> AsyncIterator[Any]:
    """A RedisStore over a client of its own (a broker node): yields (store, client)."""
    async with open_redis(url) as client:
        store = RedisStore(client, limits, prefix=prefix, **options)
        await store.open()
        try:
            yield store, client
        finally:
            await store.aclose()


async def keys_of(client: Any, prefix: str) -> set[str]:
    return {k.decode() for k in await client.keys(f"*{prefix}*")}


async def test_every_key_of_a_mailbox_shares_its_hash_tag(redis_url: str, key_prefix: str) -> None:
    clock = ManualClock()
    async with redis_store(redis_url, key_prefix) as (store, client):
        await store.enqueue_many([msg(clock, f"m{i}", ("bob", "carol")) for i in range(4)], clock.now)
        await store.fetch_many("bob", A1, 2, BIG, clock.now)
        await store.ack_many("bob", ["m0"], clock.now)  # tombstone keys too
        await store.statistics(clock.now)
        keys = await keys_of(client, key_prefix)
        by_tag: dict[str, set[str]] = {}
        for key in keys:
            assert key.startswith("{"), key
            tag = key[1 : key.index("}")]
            by_tag.setdefault(tag, set()).add(key)
        assert set(by_tag) == {key_prefix, f"{key_prefix}:bob", f"{key_prefix}:carol"}
        assert len(by_tag[f"{key_prefix}:bob"]) == 8  # every key of the layout, tombstones included
        for group in by_tag.values():
            slots = {await client.cluster_keyslot(k) for k in group} if "cluster" in redis_url else {0}
            assert len(slots) == 1


async def test_key_expiry_follows_the_brokers_clock_not_redis(redis_url: str, key_prefix: str) -> None:
    """With now_ms far from Redis's clock, mailbox keys live for the message's TTL plus the margin."""
    clock = ManualClock(wall_clock_ms() + 400 * DAY_S * 1000)  # a year ahead of Redis
    margin = 60_000
    async with redis_store(redis_url, key_prefix, expiry_margin_ms=margin) as (store, client):
        await store.enqueue_many([msg(clock, "a", ttl_s=3600)], clock.now)
        await store.fetch_many("bob", A1, 10, BIG, clock.now)
        ttls = [await client.pttl(k) for k in await keys_of(client, f"{key_prefix}:bob")]
        assert len(ttls) == 5  # meta, messages, attempts, in flight, expiry order (the queue is empty)
        assert all(3600_000 < ttl <= 3600_000 + margin for ttl in ttls), ttls


async def test_an_abandoned_mailbox_disappears_by_key_expiry(redis_url: str, key_prefix: str) -> None:
    """Nobody sweeps: once its messages expire (plus the margin), Redis deletes every key of the mailbox."""
    async with redis_store(redis_url, key_prefix, expiry_margin_ms=100) as (store, client):
        now = wall_clock_ms()
        new = [NewMessage(f"m{i}", "alice", ("bob",), b"body", now, now + 300) for i in range(3)]
        assert await store.enqueue_many(new, now) == [[Outcome.STORED]] * 3
        await store.fetch_many("bob", A1, 2, BIG, now)
        await store.ack_many("bob", ["m0"], now)  # m1 in flight (an attempt), m2 queued, m0 tombstoned
        assert len(await keys_of(client, f"{key_prefix}:bob")) == 8
        with trio.fail_after(10):
            while await keys_of(client, f"{key_prefix}:bob"):
                await trio.sleep(0.1)


async def test_a_batch_is_one_round_trip(redis_url: str, key_prefix: str) -> None:
    """200 SENDs to 50 mailboxes: one pipeline (one round trip per shard); a fetch of 100 and an ACK: one each."""
    clock = ManualClock()
    async with redis_store(redis_url, key_prefix, sync_interval_s=3600) as (store, _):  # no re-read of the counters
        before = store.round_trips
        outcomes = await store.enqueue_many(
            [msg(clock, f"m{i}", (f"user{i % 50}", "bob")) for i in range(200)], clock.now
        )
        assert outcomes == [[Outcome.STORED, Outcome.STORED]] * 200
        assert store.round_trips == before + 1
        batch = await store.fetch_many("bob", A1, 100, BIG, clock.now)
        assert len(batch.messages) == 100
        assert (await store.ack_many("bob", [m.id for m in batch.messages], clock.now)).deleted == 100
        assert store.round_trips == before + 3


async def test_round_trips_per_delivered_and_acked_message(redis_url: str, key_prefix: str) -> None:
    """SENDs in batches of 50, fetches of a 100-message window, ACKs of 50: 0.05 round trips a message.

    (With the default sync interval the store also re-reads the relay-wide counters once per 50 ms at most.)
    """
    clock = ManualClock()
    async with redis_store(redis_url, key_prefix, sync_interval_s=3600) as (store, _):
        before = store.round_trips
        for start in range(0, 1000, 50):
            await store.enqueue_many([msg(clock, f"m{i}") for i in range(start, start + 50)], clock.now)
        delivered = 0
        while True:
            batch = await store.fetch_many("bob", A1, 100, BIG, clock.now)
            if not batch.messages:
                break
            ids = [m.id for m in batch.messages]
            for half in (ids[:50], ids[50:]):
                await store.ack_many("bob", half, clock.now)
            delivered += len(ids)
        assert delivered == 1000
        assert (store.round_trips - before) / delivered == (20 + 11 + 20) / 1000  # the last fetch finds nothing


async def test_calls_made_while_a_round_trip_is_in_flight_share_the_next_one(redis_url: str, key_prefix: str) -> None:
    """Twenty mailboxes' fetches at once: the first goes alone, the other nineteen together, each with its own
    result."""
    clock = ManualClock()
    async with redis_store(redis_url, key_prefix, sync_interval_s=3600) as (store, _):
        await store.enqueue_many([msg(clock, f"m{i}", f"user{i}") for i in range(20)], clock.now)
        before = store.round_trips
        fetched: dict[int, list[str]] = {}

        async def fetch(i: int) -> None:
            batch = await store.fetch_many(f"user{i}", A1, 10, BIG, clock.now)
            fetched[i] = [m.id for m in batch.messages]

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(fetch, i)
        assert store.round_trips == before + 2
        assert fetched == {i: [f"m{i}"] for i in range(20)}


async def test_broker_full_counts_every_nodes_bytes(redis_url: str, key_prefix: str) -> None:
    """Two nodes share max_total_bytes through the relay-wide counter; ACKs on one make room on the other."""
    clock = ManualClock()
    limits = StoreLimits(max_total_bytes=100)
    async with (
        redis_store(redis_url, key_prefix, limits, sync_interval_s=0) as (node_a, _),
        redis_store(redis_url, key_prefix, limits, sync_interval_s=0) as (node_b, _),
    ):
        assert await node_a.enqueue_many([msg(clock, "a", "bob", body=b"x" * 60)], clock.now) == [[Outcome.STORED]]
        await node_a.flush()  # (else on its next call: sync_interval_s is 0)
        assert await node_b.enqueue_many([msg(clock, "b", "carol", body=b"x" * 60)], clock.now) == [
            [Outcome.BROKER_FULL]
        ]
        assert await node_b.enqueue_many([msg(clock, "c", "carol", body=b"x" * 40)], clock.now) == [[Outcome.STORED]]
        assert (await node_b.statistics(clock.now)).queued_bytes == 100
        await node_a.ack_many("bob", ["a"], clock.now)
        assert (await node_a.statistics(clock.now)).queued_bytes == 40
        assert await node_b.enqueue_many([msg(clock, "b", "carol", body=b"x" * 60)], clock.now) == [[Outcome.STORED]]
        await node_b.flush()
        assert (await node_a.statistics(clock.now)).queued_bytes == 100


async def test_a_stale_view_overshoots_by_at_most_what_others_stored_meanwhile(redis_url: str, key_prefix: str) -> None:
    """The documented bound: a node admits against its view, which lags by up to one sync interval."""
    clock = ManualClock()
    limits = StoreLimits(max_total_bytes=100)
    async with (
        redis_store(redis_url, key_prefix, limits, sync_interval_s=3600) as (node_a, _),
        redis_store(redis_url, key_prefix, limits, sync_interval_s=3600) as (node_b, _),
    ):
        assert await node_a.enqueue_many([msg(clock, "a", "bob", body=b"x" * 60)], clock.now) == [[Outcome.STORED]]
        await node_a.flush()
        # B last read the counter at open: its view is 0 + 60 <= 100, so it stores without a byte check.
        assert await node_b.enqueue_many([msg(clock, "b", "carol", body=b"x" * 60)], clock.now) == [[Outcome.STORED]]
        # Any batch that does not fit B's view makes it re-read the counter first: now it sees A's bytes.
        assert await node_b.enqueue_many([msg(clock, "c", "dave", body=b"x" * 41)], clock.now) == [
            [Outcome.BROKER_FULL]
        ]
        assert (await node_b.statistics(clock.now)).queued_bytes == 120


async def test_statistics_are_relay_wide(redis_url: str, key_prefix: str) -> None:
    clock = ManualClock()
    async with (
        redis_store(redis_url, key_prefix) as (node_a, _),
        redis_store(redis_url, key_prefix) as (node_b, _),
    ):
        await node_a.enqueue_many([msg(clock, "a", ("bob", "carol"), body=b"12345")], clock.now)
        await node_b.enqueue_many([msg(clock, "b", "dave", body=b"12")], clock.now)
        await node_b.fetch_many("bob", A1, 10, BIG, clock.now)
        await node_b.ack_many("bob", ["a"], clock.now)
        for node in (node_a, node_b):
            await node.flush()  # (each node's changes otherwise wait for its next call)
        for node in (node_a, node_b):
            stats = await node.statistics(clock.now)
            assert (stats.messages_total, stats.queued_bytes, stats.unique_recipients) == (2, 7, 2)
            assert (stats.acknowledged_total, stats.tombstones, stats.inflight) == (1, 1, 0)


async def test_messages_outlive_the_broker(redis_url: str, key_prefix: str) -> None:
    """Close the store and its client with messages queued and in flight; a new one finds them, attempts kept."""
    clock = ManualClock()
    async with redis_store(redis_url, key_prefix) as (store, _):
        await store.enqueue_many([msg(clock, m, body=m.encode()) for m in "abc"], clock.now)
        await store.fetch_many("bob", A1, 2, BIG, clock.now)  # a and b in flight, never ACKed
    async with redis_store(redis_url, key_prefix) as (store, _):
        stats = await store.statistics(clock.now)
        assert (stats.messages_total, stats.inflight, stats.queued_bytes) == (3, 2, 3)
        batch = await store.fetch_many("bob", B2, 10, BIG, clock.now)  # the next session takes over
        assert [(m.id, m.body, m.attempt) for m in batch.messages] == [("a", b"a", 2), ("b", b"b", 2), ("c", b"c", 1)]
        assert (await store.statistics(clock.now)).inflight == 3


async def test_scripts_lost_by_redis_are_loaded_again(redis_url: str, key_prefix: str) -> None:
    clock = ManualClock()
    async with redis_store(redis_url, key_prefix) as (store, client):
        await store.enqueue_many([msg(clock, "a")], clock.now)
        await client.script_flush()
        assert await store.enqueue_many([msg(clock, "b"), msg(clock, "a")], clock.now) == [
            [Outcome.STORED],
            [Outcome.DUPLICATE],
        ]
        assert await store.pending("bob", clock.now) == 2


async def test_an_unreachable_redis_raises_oserror(tmp_path: Path, key_prefix: str) -> None:
    """Redis stops under a running store: every method raises RedisUnavailable, an OSError."""
    clock = ManualClock()
    with running_redis(tmp_path) as server:
        async with open_redis(server.url) as client:
            store = RedisStore(client, prefix=key_prefix)
            await store.open()
            await store.enqueue_many([msg(clock, "a")], clock.now)
            server.stop()
            calls = [
                lambda: store.enqueue_many([msg(clock, "b")], clock.now),
                lambda: store.fetch_many("bob", A1, 10, BIG, clock.now),
                lambda: store.release("bob", A1),
                lambda: store.ack_many("bob", ["a"], clock.now),
                lambda: store.peek("bob", 10, clock.now),
                lambda: store.pending("bob", clock.now),
                lambda: store.purge_expired(clock.now),
                lambda: store.statistics(clock.now),
                lambda: store.add_statuses([delivered("x")], clock.now, 60_000),
                lambda: store.fetch_statuses("alice", 0, 10, clock.now),
                lambda: store.ack_statuses("alice", [1]),
                lambda: store.put_key("bob", key_record(), clock.now, 60_000),
                lambda: store.get_keys(["bob", "carol"], clock.now),
            ]
            for call in calls:
                with trio.fail_after(30), pytest.raises(RedisUnavailable) as caught:
                    await call()
                assert isinstance(caught.value, OSError)
            await store.aclose()  # never raises


async def test_a_redis_that_was_never_there_raises_oserror(key_prefix: str) -> None:
    async with open_redis("redis://127.0.0.1:1/0") as client:
        with trio.fail_after(30), pytest.raises(OSError):
            await RedisStore(client, prefix=key_prefix).open()


def test_a_prefix_must_not_break_the_hash_tags() -> None:
    for prefix in ("", "a{b", "a}b"):
        with pytest.raises(ValueError, match="prefix"):
            RedisStore(None, prefix=prefix)  # type: ignore[arg-type]


async def test_a_call_cancelled_in_flight_still_counts_what_it_changed(redis_url: str, key_prefix: str) -> None:
    """A session cancelled mid-SEND (its client cut the connection) must not make the relay-wide figures drift:
    once the scripts are sent their changes happen, so the store reads and counts their results regardless."""
    clock = ManualClock()
    async with redis_store(redis_url, key_prefix) as (store, _client):
        for round_ in range(30):
            batch = [msg(clock, f"r{round_}-{i}", ("bob", f"u{i % 7}")) for i in range(50)]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store.enqueue_many, batch, clock.now)
                for _ in range(round_ % 6):
                    await trio.sleep(0)
                nursery.cancel_scope.cancel()
            held = sum([await store.pending(m, clock.now) for m in ("bob", *(f"u{i}" for i in range(7)))])
            stats = await store.statistics(clock.now)
            assert stats.messages_total == held, f"round {round_}: counters drifted from what Redis holds"


# ---------------------------------------------------------------- status lanes


def delivered(mid: str, lane: str = "alice", at: int = 1) -> Notice:
    return Notice(lane, mid, "bob", ReportState.DELIVERED, at)


async def test_a_status_lane_is_four_keys_under_the_mailbox_tag_expiring_with_its_statuses(
    redis_url: str, key_prefix: str
) -> None:
    clock = ManualClock(wall_clock_ms() + 400 * DAY_S * 1000)  # far from Redis's clock: TTLs follow the broker's
    margin = 60_000
    async with redis_store(redis_url, key_prefix, expiry_margin_ms=margin) as (store, client):
        await store.enqueue_many([msg(clock, "m", "alice", sender="bob")], clock.now)
        await store.add_statuses([delivered("a")], clock.now, 3600_000)
        lane = {k for k in await keys_of(client, f"{key_prefix}:alice") if k.split(":")[-1] in ("s", "sq", "sx", "sm")}
        assert lane == {f"{{{key_prefix}:alice}}:{suffix}" for suffix in ("s", "sq", "sx", "sm")}
        if "cluster" in redis_url:
            slots = {await client.cluster_keyslot(k) for k in await keys_of(client, f"{key_prefix}:alice")}
            assert len(slots) == 1  # the lane shares the mailbox's slot
        ttls = [await client.pttl(k) for k in lane]
        assert all(3600_000 < ttl <= 3600_000 + margin for ttl in ttls), ttls


async def test_an_emptied_lane_keeps_only_its_newest_seq_for_a_while(redis_url: str, key_prefix: str) -> None:
    clock = ManualClock()
    async with redis_store(redis_url, key_prefix) as (store, client):
        await store.add_statuses([delivered("a"), delivered("b")], clock.now, 3600_000)
        held = await store.fetch_statuses("alice", 0, 10, clock.now)
        assert await store.ack_statuses("alice", [h.seq for h in held]) == 2
        [left] = await keys_of(client, f"{key_prefix}:alice")
        assert left.endswith(":sm")
        assert 0 < await client.pttl(left) <= SEQ_MEMORY_MS


async def test_an_abandoned_lane_disappears_by_key_expiry(redis_url: str, key_prefix: str) -> None:
    async with redis_store(redis_url, key_prefix, expiry_margin_ms=100) as (store, client):
        await store.add_statuses([delivered("a"), delivered("b", "erin")], wall_clock_ms(), 300)
        assert len(await keys_of(client, f"{key_prefix}:alice")) == 4
        with trio.fail_after(10):
            while await keys_of(client, f"{key_prefix}:alice") or await keys_of(client, f"{key_prefix}:erin"):
                await trio.sleep(0.1)


async def test_statuses_for_many_lanes_are_one_round_trip(redis_url: str, key_prefix: str) -> None:
    """add_statuses for 50 lanes: one pipeline (one round trip per shard); a fetch and an ACK: one each."""
    clock = ManualClock()
    async with redis_store(redis_url, key_prefix, sync_interval_s=3600) as (store, _):
        before = store.round_trips
        notices = [delivered(f"m{i}", f"user{i % 50}") for i in range(200)]
        assert await store.add_statuses(notices, clock.now, 60_000) == frozenset(f"user{i}" for i in range(50))
        assert store.round_trips == before + 1
        held = await store.fetch_statuses("user0", 0, 100, clock.now)
        assert [h.id for h in held] == [f"m{i}" for i in range(0, 200, 50)]
        assert await store.ack_statuses("user0", [h.seq for h in held]) == 4
        assert store.round_trips == before + 3


async def test_a_big_batch_of_statuses_for_one_lane(redis_url: str, key_prefix: str) -> None:
    """More notices for one lane than one page of the script, and past the bound: all accounted for."""
    clock = ManualClock()
    async with redis_store(redis_url, key_prefix, StoreLimits(max_mailbox_statuses=3000)) as (store, _):
        await store.add_statuses([delivered(f"m{i}") for i in range(5000)], clock.now, 60_000)
        held = await store.fetch_statuses("alice", 0, 10_000, clock.now)
        assert [h.id for h in held[:-1]] == [f"m{i}" for i in range(3000)]
        assert (held[-1].state, held[-1].count) == (ReportState.OVERFLOW, 2000)
        assert await store.ack_statuses("alice", [h.seq for h in held]) == 3001
        stats = await store.statistics(clock.now)
        assert (stats.statuses_held, stats.statuses_total, stats.statuses_overflowed_total) == (0, 5000, 2000)


async def test_seqs_grow_across_nodes_whose_clocks_differ(redis_url: str, key_prefix: str) -> None:
    """Node B's clock is 5 s behind node A's: a lane's seqs still grow, also after A's statuses were all ACKed."""
    clock_a = ManualClock()
    clock_b = ManualClock(clock_a.now - 5000)
    async with (
        redis_store(redis_url, key_prefix) as (node_a, _),
        redis_store(redis_url, key_prefix) as (node_b, _),
    ):
        await node_a.add_statuses([delivered("a")], clock_a.now, 60_000)
        [a] = await node_a.fetch_statuses("alice", 0, 10, clock_a.now)
        await node_b.add_statuses([delivered("b")], clock_b.now, 60_000)
        [b] = await node_b.fetch_statuses("alice", a.seq, 10, clock_b.now)
        assert b.seq > a.seq
        assert await node_a.ack_statuses("alice", [a.seq, b.seq]) == 2  # the lane is empty and forgotten
        await node_b.add_statuses([delivered("c")], clock_b.now, 60_000)
        [c] = await node_b.fetch_statuses("alice", b.seq, 10, clock_b.now)
        assert c.id == "c"
        for node in (node_a, node_b):
            await node.flush()
        stats = await node_a.statistics(clock_a.now)
        assert (stats.statuses_held, stats.statuses_total) == (1, 3)


# ---------------------------------------------------------------- key directory


def key_record(kid: str = "0123456789abcdef") -> KeyRecord:
    return KeyRecord(ik=b"\x01" * 32, kid=kid, ek=b"\x02" * 32, sig=b"\x03" * 64)


async def test_a_key_record_is_one_key_under_the_mailbox_tag_expiring_with_it(redis_url: str, key_prefix: str) -> None:
    clock = ManualClock(wall_clock_ms() + 400 * DAY_S * 1000)  # the broker's clock decides, not Redis's
    margin = 60_000
    async with redis_store(redis_url, key_prefix, expiry_margin_ms=margin) as (store, client):
        await store.put_key("bob", key_record(), clock.now, 3600_000)
        [key] = await keys_of(client, f"{key_prefix}:bob")
        assert key == f"{{{key_prefix}:bob}}:k"
        assert 3600_000 < await client.pttl(key) <= 3600_000 + margin
        clock.advance(3600)  # Redis still holds it (the margin); the store judges by now_ms
        assert await store.get_keys(["bob"], clock.now) == {}


async def test_an_abandoned_key_record_disappears_by_key_expiry(redis_url: str, key_prefix: str) -> None:
    async with redis_store(redis_url, key_prefix, expiry_margin_ms=100) as (store, client):
        await store.put_key("bob", key_record(), wall_clock_ms(), 300)
        assert len(await keys_of(client, f"{key_prefix}:bob")) == 1
        with trio.fail_after(10):
            while await keys_of(client, f"{key_prefix}:bob"):
                await trio.sleep(0.1)


async def test_a_key_lookup_is_one_round_trip(redis_url: str, key_prefix: str) -> None:
    """get_keys for 100 mailboxes over every shard: one pipeline (one round trip per shard); a put: one."""
    clock = ManualClock()
    async with redis_store(redis_url, key_prefix, sync_interval_s=3600) as (store, _):
        before = store.round_trips
        await store.put_key("user7", key_record("k7"), clock.now, 60_000)
        assert store.round_trips == before + 1
        got = await store.get_keys([f"user{i}" for i in range(100)], clock.now)
        assert got == {"user7": key_record("k7")}
        assert store.round_trips == before + 2
