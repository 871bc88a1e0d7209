"""The router as pure logic: plans, outcomes, whom to wake, counters. No sockets, no sessions.

The store is the in-memory one on a manual clock (a plain int), presence the in-process one
with fake subscribers, so each test sees exactly what the router returned and did.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence, Set

import pytest

from broker.backend import probed_health
from broker.config import BrokerConfig
from broker.presence import LocalPresence
from broker.router import Plan, Router, SendOutcome, plan_send
from broker.stats import Counters
from broker.store.base import NewMessage, Outcome, StoreLimits
from broker.store.memory import MemoryStore
from wire import ErrorCode, RecipientResult, Send, Status

from .presence_contract import FakeSubscriber

NOW = 1_800_000_000_000
QUEUED = RecipientResult(Status.QUEUED)
DELIVERED = RecipientResult(Status.DELIVERED)
DUPLICATE = RecipientResult(Status.DUPLICATE)


def refused(code: ErrorCode) -> RecipientResult:
    return RecipientResult(Status.REFUSED, int(code))


class ManualClock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> int:
        return self.now


class Parts:
    def __init__(self) -> None:
        self.config = BrokerConfig()
        self.clock = ManualClock()
        limits = StoreLimits(max_mailbox_messages=2)
        self.store = MemoryStore(limits)
        self.presence = LocalPresence()
        self.counters = Counters()
        self.router = Router(
            self.config, self.store, self.presence, self.counters, clock=self.clock, health=probed_health(self.store)
        )


@pytest.fixture
def parts() -> Parts:
    return Parts()


def plan(send: Send) -> Plan:
    return plan_send(send, "alice", now_ms=NOW, default_ttl_s=60, max_ttl_s=3600, max_recipients=3, max_body_bytes=10)


def test_plan_refuses_a_whole_send_first_by_recipient_count_then_by_body() -> None:
    both = Send(id="m", to=("a", "b", "c", "d"), body=b"x" * 11)
    assert plan(both).code == ErrorCode.TOO_MANY_RECIPIENTS
    assert plan(Send(id="m", to=("a",), body=b"x" * 11)).code == ErrorCode.BODY_TOO_LARGE
    assert plan(Send(id="m", to=("a", "a", "a", "a"), body=b"x")).code is None, "duplicates count once"


def test_plan_refuses_invalid_recipients_one_by_one_and_fixes_times() -> None:
    p = plan(Send(id="m", to=("bob", "bad name", "bob"), body=b"x", ttl_s=999_999))
    assert p.refused == {"bad name": ErrorCode.INVALID_RECIPIENT}
    assert p.message is not None
    assert p.message.recipients == ("bob",)
    assert (p.message.sent_at, p.message.expires_at) == (NOW, NOW + 3600 * 1000)
    assert plan(Send(id="m", to=("bad name",), body=b"")).message is None
    default = plan(Send(id="m", to=("bob",), body=b""))
    assert default.message is not None and default.message.expires_at == NOW + 60 * 1000


async def test_offline_recipient_is_queued_and_nobody_is_woken(parts: Parts) -> None:
    routed = await parts.router.route("alice", [Send(id="m1", to=("bob",), body=b"x")])
    assert routed.receipts == [SendOutcome("m1", {"bob": QUEUED})]
    assert routed.wake == []
    assert parts.counters.sent == 1
    assert await parts.store.pending("bob", parts.clock()) == 1


async def test_online_recipient_is_delivered_and_named_once_to_wake_but_not_woken(parts: Parts) -> None:
    bob = FakeSubscriber("s-bob")
    await parts.presence.claim("bob", bob)
    sends = [Send(id="m1", to=("bob", "carol"), body=b"x"), Send(id="m2", to=("bob",), body=b"y")]
    routed = await parts.router.route("alice", sends)
    assert [r.results for r in routed.receipts] == [{"bob": DELIVERED, "carol": QUEUED}, {"bob": DELIVERED}]
    assert routed.wake == ["bob"]
    assert bob.wakes == 0, "the router wakes nobody: its caller does"


async def test_duplicates_refusals_and_whole_send_refusals_are_reported_and_counted(parts: Parts) -> None:
    router, counters = parts.router, parts.counters
    await router.route("alice", [Send(id="m1", to=("bob",), body=b"x"), Send(id="m2", to=("bob",), body=b"x")])
    routed = await router.route(
        "alice",
        [
            Send(id="m1", to=("bob",), body=b"x"),  # held already: duplicate
            Send(id="m3", to=("bob", "bad name"), body=b"x"),  # bob's mailbox holds 2: full
            Send(id="m4", to=tuple(f"r{i}" for i in range(parts.config.max_recipients + 1)), body=b"x"),
        ],
    )
    assert routed.receipts == [
        SendOutcome("m1", {"bob": DUPLICATE}),
        SendOutcome("m3", {"bad name": refused(ErrorCode.INVALID_RECIPIENT), "bob": refused(ErrorCode.MAILBOX_FULL)}),
        SendOutcome("m4", {}, ErrorCode.TOO_MANY_RECIPIENTS),
    ]
    assert (counters.sent, counters.duplicates) == (2, 1)
    assert {code: n for code, n in counters.refused.items() if n} == {
        ErrorCode.INVALID_RECIPIENT: 1,
        ErrorCode.MAILBOX_FULL: 1,
        ErrorCode.TOO_MANY_RECIPIENTS: 1,
    }


async def test_a_batch_that_stores_nothing_asks_nobody(parts: Parts) -> None:
    routed = await parts.router.route("alice", [Send(id="m1", to=("bad name",), body=b"x")])
    assert routed.receipts == [SendOutcome("m1", {"bad name": refused(ErrorCode.INVALID_RECIPIENT)})]
    assert (await parts.store.statistics(parts.clock())).messages_total == 0


async def test_acknowledge_names_the_mailbox_to_resync_only_when_something_was_deleted(parts: Parts) -> None:
    await parts.router.route("alice", [Send(id="m1", to=("bob",), body=b"x")])
    acked = await parts.router.acknowledge("bob", ["nope"])
    assert (acked.result.deleted, acked.resync) == (0, ())
    acked = await parts.router.acknowledge("bob", ["m1"])
    assert (acked.result.deleted, acked.resync) == (1, ("bob",))


async def test_cleanup_purges_expired_messages_and_has_sessions_recount(parts: Parts) -> None:
    bob = FakeSubscriber("s-bob")
    await parts.presence.claim("bob", bob)
    await parts.router.route("alice", [Send(id="m1", to=("bob",), body=b"x", ttl_s=1)])
    assert await parts.router.cleanup() == 0
    assert bob.resyncs == 0
    parts.clock.now += 1000
    assert await parts.router.cleanup() == 1
    assert bob.resyncs == 1
    assert await parts.router.pending("bob") == 0


class UnreachableStore(MemoryStore):
    """A store whose enqueue fails as a Redis pipeline can, while ``down``: after storing the first message."""

    down = True

    async def enqueue_many(self, messages: Sequence[NewMessage], now_ms: int) -> list[list[Outcome]]:
        if not self.down:
            return await super().enqueue_many(messages, now_ms)
        await super().enqueue_many(messages[:1], now_ms)
        raise ConnectionError("the store went away mid-batch")


class DeafPresence(LocalPresence):
    """Presence that cannot say who is online (its Redis is unreachable)."""

    async def online(self, mailboxes: Collection[str]) -> Set[str]:
        raise ConnectionError("presence unreachable")


async def test_a_batch_the_store_failed_to_take_is_3008_per_send_never_a_false_outcome() -> None:
    parts = Parts()
    store = UnreachableStore()
    health = probed_health(store)
    router = Router(parts.config, store, parts.presence, parts.counters, clock=parts.clock, health=health)
    sends = [
        Send(id="m1", to=("bob",), body=b"x"),
        Send(id="m2", to=tuple(f"r{i}" for i in range(200)), body=b"x"),  # refused whole before storing
        Send(id="m3", to=("carol", "not a mailbox!"), body=b"y"),
        Send(id="m4", to=("not a mailbox!",), body=b"z"),  # nothing to store: its own outcome
    ]
    routed = await router.route("alice", sends)
    assert routed.receipts == [
        SendOutcome("m1", {}, ErrorCode.STORE_UNREACHABLE),  # (it was stored: a retry is "duplicate")
        SendOutcome("m2", {}, ErrorCode.TOO_MANY_RECIPIENTS),
        SendOutcome("m3", {}, ErrorCode.STORE_UNREACHABLE),
        SendOutcome("m4", {"not a mailbox!": refused(ErrorCode.INVALID_RECIPIENT)}),
    ]
    assert routed.wake == []
    assert (health.available, health.errors, parts.counters.sent) == (False, 1, 0)
    assert await store.pending("bob", parts.clock()) == 1, "stored before the failure: 3008 claimed nothing"
    store.down = False
    retried = await router.route("alice", sends[:1])
    assert retried.receipts[0].results == {"bob": DUPLICATE}


async def test_stored_but_presence_unreachable_is_queued_not_delivered_and_everyone_is_woken() -> None:
    parts = Parts()
    presence = DeafPresence()
    bob = FakeSubscriber("s-bob")
    await presence.claim("bob", bob)
    health = probed_health(parts.store)
    router = Router(parts.config, parts.store, presence, parts.counters, clock=parts.clock, health=health)
    routed = await router.route("alice", [Send(id="m1", to=("bob", "carol", "no!"), body=b"x")])
    assert routed.receipts == [
        SendOutcome("m1", {"no!": refused(ErrorCode.INVALID_RECIPIENT), "bob": QUEUED, "carol": QUEUED})
    ]
    assert sorted(routed.wake) == ["bob", "carol"], "a local holder still pumps at once"
    assert (health.available, health.errors, parts.counters.sent) == (False, 1, 2)
