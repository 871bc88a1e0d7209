"""Presence over Redis: the contract, and several nodes (RedisPresence instances) over one Redis.

Every test runs twice, against the standalone ``redis_server`` and against the three-master
``redis_cluster``, each under its own key prefix. Nodes are RedisPresence instances in this
process sharing one coredis client, as broker processes share one Redis; subscribers are
the contract's fakes. Nothing is timed: outcomes are awaited under ``trio.fail_after``
bounds, and leases are short real ones where a test needs one to run out.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import coredis
import pytest
import trio

from broker.presence_redis import RedisPresence, open_redis_presence
from broker.redis_client import RedisUnavailable
from broker.store.base import Claim
from wire import ErrorCode

from ..redis_servers import RedisCluster, RedisServer
from .presence_contract import TIMEOUT, FakeSubscriber, MakePresence, PresenceContract

Client = coredis.Redis[Any] | coredis.RedisCluster[Any]

_NODES = itertools.count(1)


@pytest.fixture(params=["standalone", "cluster"])
def redis_target(request: pytest.FixtureRequest) -> RedisServer | RedisCluster:
    """The running Redis a test uses: the standalone server, then the cluster."""
    if request.param == "standalone":
        server: RedisServer = request.getfixturevalue("redis_server")
        return server
    cluster: RedisCluster = request.getfixturevalue("redis_cluster")
    return cluster


@pytest.fixture
async def client(redis_target: RedisServer | RedisCluster) -> AsyncIterator[Client]:
    if isinstance(redis_target, RedisCluster):
        async with coredis.RedisCluster("127.0.0.1", redis_target.servers[0].port) as cluster:
            yield cluster
    else:
        async with coredis.Redis("127.0.0.1", redis_target.port) as redis:
            yield redis


def _node_id() -> str:
    return f"node{next(_NODES)}"


class TestRedisPresence(PresenceContract):
    @pytest.fixture
    async def make_presence(self, client: Client, key_prefix: str) -> AsyncIterator[MakePresence]:
        async with trio.open_nursery() as nursery:

            def make(takeover_wait_s: float) -> RedisPresence:
                presence = RedisPresence(client, node_id=_node_id(), prefix=key_prefix, takeover_wait_s=takeover_wait_s)
                nursery.start_soon(presence.run)
                return presence

            yield make
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- several nodes


@asynccontextmanager
async def nodes(client: Client, prefix: str, n: int, **options: Any) -> AsyncIterator[list[RedisPresence]]:
    """``n`` running nodes over ``client`` under ``prefix``."""
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(open_redis_presence(client, node_id=_node_id(), prefix=prefix, **options))
            for _ in range(n)
        ]


@asynccontextmanager
async def crashable(
    client: Client, prefix: str, **options: Any
) -> AsyncIterator[tuple[RedisPresence, trio.CancelScope]]:
    """A running node and the scope whose cancellation "crashes" it: no more renewals, no listener."""
    presence = RedisPresence(client, node_id=_node_id(), prefix=prefix, **options)
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[None]) -> None:
        with scope:
            await presence.run(task_status=task_status)

    async with trio.open_nursery() as nursery:
        await nursery.start(run)
        yield presence, scope
        scope.cancel()


async def receivers(client: Client, channel: str) -> int:
    """How many subscribers ``channel`` has (a harmless ping goes to them)."""
    if isinstance(client, coredis.RedisCluster):
        return await client.spublish(channel, '{"op":"ping","n":0}')
    return await client.publish(channel, '{"op":"ping","n":0}')


async def until(condition: Callable[[], bool], poke: Callable[[], Awaitable[object]] | None = None) -> None:
    """Wait until ``condition()`` holds, calling ``poke()`` between looks (bounded by the test's fail_after)."""
    while not condition():
        if poke is not None:
            await poke()
        await trio.sleep(0.005)


async def test_a_claim_on_one_node_is_online_on_every_node(client: Client, key_prefix: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with nodes(client, key_prefix, 2) as (a, b):
            claim = await a.claim("alice", FakeSubscriber("s1"))
            assert await b.online(["alice", "bob"]) == {"alice"}
            assert (a.count(), b.count()) == (1, 0)
            await a.release("alice", claim)
            assert await b.online(["alice"]) == set()
            assert await a.online(["alice"]) == set()


async def test_a_takeover_from_another_node_kicks_the_holder_there_and_waits_for_it(
    client: Client, key_prefix: str
) -> None:
    with trio.fail_after(TIMEOUT):
        async with nodes(client, key_prefix, 2, takeover_wait_s=60) as (a, b):
            old, new = FakeSubscriber("old", stubborn=True), FakeSubscriber("new")
            old_claim = await a.claim("bob", old)
            claims: list[Claim] = []
            done = trio.Event()

            async def take_over() -> None:
                claims.append(await b.claim("bob", new))
                done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(take_over)
                await until(lambda: bool(old.kicks))
                assert old.kicks[0][0] is ErrorCode.CONNECTED_ELSEWHERE
                assert a.count() == 0, "the kicked session no longer holds the mailbox on its node"
                await trio.sleep(0.01)
                assert not done.is_set(), "the claim returned before the previous holder finished"
                old.finished.set()
            assert claims[0].epoch > old_claim.epoch
            assert new.kicks == [] and len(old.kicks) == 1
            assert (await a.online(["bob"]), await b.online(["bob"])) == ({"bob"}, {"bob"})


async def test_a_stale_release_on_the_old_node_leaves_the_new_holder(client: Client, key_prefix: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with nodes(client, key_prefix, 2) as (a, b):
            old_claim = await a.claim("bob", FakeSubscriber("old"))
            new_claim = await b.claim("bob", FakeSubscriber("new"))
            await a.release("bob", old_claim)  # the old session's cleanup, late
            assert await a.online(["bob"]) == {"bob"}
            assert b.count() == 1
            await b.release("bob", new_claim)
            assert await a.online(["bob"]) == set()


async def test_wake_and_resync_from_another_node_reach_the_holder_only(client: Client, key_prefix: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with nodes(client, key_prefix, 2) as (a, b):
            alice, bob = FakeSubscriber("alice-a"), FakeSubscriber("bob-b")
            await a.claim("alice", alice)
            await b.claim("bob", bob)
            assert await b.online(["alice", "bob"]) == {"alice", "bob"}  # the router's order: online, then wake
            await b.wake(["alice", "bob"])
            await until(lambda: alice.wakes == 1)
            assert bob.wakes == 1  # local: at once
            await b.wake(["alice"])  # without a fresh online: the holder is looked up
            await until(lambda: alice.wakes == 2)
            await b.resync(["alice", "nobody"])
            await until(lambda: alice.resyncs == 1)
            assert (bob.wakes, bob.resyncs) == (1, 0)
            await b.wake_statuses(["alice", "bob", "nobody"])
            await until(lambda: alice.status_wakes == 1)
            assert bob.status_wakes == 1  # local: at once
            assert (alice.wakes, alice.resyncs) == (2, 1)


async def test_a_wake_after_a_takeover_reaches_the_new_holder_not_the_kicked_one(
    client: Client, key_prefix: str
) -> None:
    with trio.fail_after(TIMEOUT):
        async with nodes(client, key_prefix, 3) as (a, b, c):
            first, second = FakeSubscriber("first"), FakeSubscriber("second")
            await a.claim("carol", first)
            assert await c.online(["carol"]) == {"carol"}  # c now remembers a as the holder
            await b.claim("carol", second)
            for sender in (a, c):
                assert await sender.online(["carol"]) == {"carol"}
                await sender.wake(["carol"])
            await until(lambda: second.wakes == 2)
            await a.resync(["carol"])
            await until(lambda: second.resyncs == 1)
            await c.wake_statuses(["carol"])  # (read from the holder key, never from a hint)
            await until(lambda: second.status_wakes == 1)
            assert (first.wakes, first.resyncs, first.status_wakes) == (0, 0, 0)


async def test_a_crashed_nodes_mailboxes_go_offline_after_its_lease(client: Client, key_prefix: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with nodes(client, key_prefix, 1, takeover_wait_s=60) as (b,):
            async with crashable(client, key_prefix, lease_s=1.5) as (a, crash):
                gone = FakeSubscriber("gone", stubborn=True)
                await a.claim("dave", gone)
                holder = f"{{{key_prefix}:dave}}:holder"
                last = await client.pttl(holder)
                while (left := await client.pttl(holder)) <= last:  # until a renewal extends the lease
                    last = left
                    await trio.sleep(0.01)
                assert await b.online(["dave"]) == {"dave"}
                crash.cancel()
                while await b.online(["dave"]):
                    await trio.sleep(0.05)
                claim = await b.claim("dave", FakeSubscriber("next"))  # nobody to kick: no wait
                assert claim.owner == "next" and gone.kicks == []
                assert await b.online(["dave"]) == {"dave"}


async def test_a_takeover_from_a_crashed_node_does_not_wait_for_it(client: Client, key_prefix: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with nodes(client, key_prefix, 1, takeover_wait_s=60) as (b,):
            async with crashable(client, key_prefix, lease_s=60) as (a, crash):
                gone = FakeSubscriber("gone", stubborn=True)
                await a.claim("erin", gone)
                crash.cancel()
                while await receivers(client, a.channel_of(a.node_id)):
                    await trio.sleep(0.01)
                claim = await b.claim("erin", FakeSubscriber("next"))  # its lease runs, but nobody listens there
                assert claim.owner == "next"
                assert b.count() == 1


async def test_renewal_that_finds_the_claim_taken_kicks_the_local_session(client: Client, key_prefix: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with nodes(client, key_prefix, 1, lease_s=0.6) as (a,):
            sub = FakeSubscriber("s1")
            claim = await a.claim("frank", sub)
            # Another node's claim that this node never heard of (a kick lost in a partition).
            holder = f"{{{key_prefix}:frank}}:holder"
            await client.set(holder, f"{claim.epoch + 1}|elsewhere|s9", px=60_000)
            await until(lambda: bool(sub.kicks))
            assert sub.kicks[0][0] is ErrorCode.CONNECTED_ELSEWHERE
            assert a.count() == 0
            assert await a.online(["frank"]) == {"frank"}


async def test_renewal_restores_an_expired_holding_nobody_took(client: Client, key_prefix: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with nodes(client, key_prefix, 2, lease_s=0.6) as (a, b):
            sub = FakeSubscriber("s1")
            claim = await a.claim("gina", sub)
            lost = [
                [f"{{{key_prefix}:gina}}:holder"],
                [f"{{{key_prefix}:gina}}:holder", f"{{{key_prefix}:gina}}:epoch"],
            ]
            for keys in lost:  # Redis was away longer than the lease; then, Redis restarted empty
                assert await client.delete(keys) == len(keys)
                while not await b.online(["gina"]):
                    await trio.sleep(0.05)
                assert sub.kicks == [] and a.count() == 1
            again = await b.claim("gina", FakeSubscriber("s2"))
            assert again.epoch > claim.epoch
            await until(lambda: bool(sub.kicks))


async def test_a_cancelled_cross_node_takeover_holds_nothing(client: Client, key_prefix: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with nodes(client, key_prefix, 2, takeover_wait_s=60) as (a, b):
            stuck = FakeSubscriber("stuck", stubborn=True)
            stuck_claim = await a.claim("hank", stuck)
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:

                    async def cancel_once_kicked() -> None:
                        await until(lambda: bool(stuck.kicks))
                        scope.cancel()

                    nursery.start_soon(cancel_once_kicked)
                    await b.claim("hank", FakeSubscriber("new"))
                    pytest.fail("the claim returned while the previous holder was still running")
            assert (a.count(), b.count()) == (0, 0)
            assert (await a.online(["hank"]), await b.online(["hank"])) == (set(), set())
            await b.wake(["hank"])
            await a.release("hank", stuck_claim)
            assert stuck.wakes == 0


async def test_a_takeover_that_stopped_waiting_is_nudged_when_the_old_session_ends(
    client: Client, key_prefix: str
) -> None:
    with trio.fail_after(TIMEOUT):
        async with nodes(client, key_prefix, 1) as (a,), nodes(client, key_prefix, 1, takeover_wait_s=0.05) as (b,):
            slow, new = FakeSubscriber("slow", stubborn=True), FakeSubscriber("new")
            await a.claim("ivan", slow)
            await b.claim("ivan", new)  # gave up waiting for slow
            assert new.resyncs == 0
            slow.finished.set()
            # Whatever slow absorbed until it ended is the new session's: it recounts and pumps.
            await until(lambda: new.resyncs == 1 and new.wakes == 1)


async def test_the_listener_comes_back_after_its_connection_is_killed(
    client: Client, key_prefix: str, redis_target: RedisServer | RedisCluster
) -> None:
    with trio.fail_after(TIMEOUT):
        async with nodes(client, key_prefix, 2, lease_s=1.5) as (a, b):
            alice = FakeSubscriber("alice")
            await a.claim("alice", alice)
            servers = redis_target.servers if isinstance(redis_target, RedisCluster) else [redis_target]
            for server in servers:
                async with coredis.Redis("127.0.0.1", server.port) as admin:
                    await admin.client_kill(type_=coredis.PureToken.PUBSUB)
            await until(lambda: alice.resyncs >= 1)  # resubscribed: every session was told to recount

            async def wake_from_b() -> None:
                await b.online(["alice"])
                await b.wake(["alice"])
                await trio.sleep(0.05)

            # Wakes from the other node arrive again (a nudge counts one wake and one resync).
            await until(lambda: alice.wakes > alice.resyncs, poke=wake_from_b)


async def test_a_routed_batch_costs_one_round_trip_for_online_and_one_for_wakes_to_two_nodes(
    client: Client, key_prefix: str
) -> None:
    with trio.fail_after(TIMEOUT):
        async with nodes(client, key_prefix, 3, lease_s=60) as (a, b, c):
            remote = [f"r{i}" for i in range(50)]
            local = [f"l{i}" for i in range(5)]
            subs = {m: FakeSubscriber(m) for m in remote + local}
            for i, m in enumerate(remote):
                await (a, c)[i % 2].claim(m, subs[m])
            for m in local:
                await b.claim(m, subs[m])
            before = b.round_trips
            assert await b.online(local) == set(local)
            assert b.round_trips == before, "mailboxes held on this node cost no round trip"
            assert await b.online(remote + local + ["nobody"]) == set(remote + local)
            await b.wake(remote + local)
            assert b.round_trips == before + 2
            await until(lambda: all(s.wakes == 1 for s in subs.values()))


async def test_redis_unreachable_claim_and_online_raise_oserror_the_rest_does_not() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    with trio.fail_after(TIMEOUT):
        async with coredis.Redis("127.0.0.1", port) as dead:
            presence = RedisPresence(dead, node_id=_node_id())
            with pytest.raises(RedisUnavailable):
                await presence.claim("alice", FakeSubscriber("s1"))
            assert presence.count() == 0
            with pytest.raises(RedisUnavailable):
                await presence.online(["alice"])
            await presence.wake(["alice"])
            await presence.resync(["alice"])
            await presence.release("alice", Claim("s1", 1))


def test_node_ids_and_prefixes_are_checked() -> None:
    client = coredis.Redis("127.0.0.1", 1)
    for bad in ({"node_id": "a|b"}, {"node_id": ""}, {"node_id": "x", "prefix": "{p}"}, {"node_id": "x y"}):
        with pytest.raises(ValueError):
            RedisPresence(client, **bad)
