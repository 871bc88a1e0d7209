"""The presence contract: one test body for every Presence implementation.

A test module subclasses :class:`PresenceContract` and provides a ``make_presence`` fixture
returning a factory ``make_presence(takeover_wait_s) -> Presence``. Subscribers are fakes
in this process (:class:`FakeSubscriber`); nothing relies on an implementation's internals,
and no test uses trio's MockClock, so the same bodies can run against a Redis presence over
real sockets. The one wait (a takeover whose previous holder never finishes) is a short real
one, and only its outcome is checked, never how long it took.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio

from broker.presence import Presence
from wire import ErrorCode

MakePresence = Callable[[float], Presence]
TIMEOUT = 10


class FakeSubscriber:
    """Records what presence asked of it; finishes when kicked unless ``stubborn``."""

    def __init__(self, name: str, *, stubborn: bool = False) -> None:
        self.id = name
        self.finished = trio.Event()
        self.wakes = 0
        self.resyncs = 0
        self.status_wakes = 0
        self.kicks: list[tuple[ErrorCode, str]] = []
        self.stubborn = stubborn

    async def wake(self) -> None:
        self.wakes += 1

    def resync(self) -> None:
        self.resyncs += 1

    def wake_statuses(self) -> None:
        self.status_wakes += 1

    def kick(self, code: ErrorCode, message: str) -> None:
        self.kicks.append((code, message))
        if not self.stubborn:
            self.finished.set()


class PresenceContract:
    @pytest.fixture
    def presence(self, make_presence: MakePresence) -> Presence:
        return make_presence(5.0)

    async def test_a_claim_names_its_owner_and_epochs_grow(self, presence: Presence) -> None:
        # Epochs must grow per mailbox (the store fences per mailbox); across mailboxes nothing is promised.
        a, b = FakeSubscriber("s1"), FakeSubscriber("s2")
        first = await presence.claim("alice", a)
        other = await presence.claim("bob", b)
        assert (first.owner, other.owner) == ("s1", "s2")
        await presence.release("alice", first)
        again = await presence.claim("alice", FakeSubscriber("s3"))
        assert again.epoch > first.epoch, "a mailbox claimed again must fence every earlier claim"
        taken = await presence.claim("alice", FakeSubscriber("s4"))
        assert taken.epoch > again.epoch, "a takeover must fence the claim it took the mailbox from"

    async def test_online_and_count_follow_claims_and_releases(self, presence: Presence) -> None:
        assert await presence.online(["alice", "bob"]) == set()
        assert presence.count() == 0
        claim = await presence.claim("alice", FakeSubscriber("s1"))
        assert await presence.online(["alice", "bob"]) == {"alice"}
        assert presence.count() == 1
        await presence.release("alice", claim)
        assert await presence.online(["alice"]) == set()
        assert presence.count() == 0

    async def test_takeover_kicks_the_holder_and_waits_for_it(self, presence: Presence) -> None:
        old, new = FakeSubscriber("old", stubborn=True), FakeSubscriber("new")
        old_claim = await presence.claim("bob", old)
        done = trio.Event()
        claims = []

        async def take_over() -> None:
            claims.append(await presence.claim("bob", new))
            done.set()

        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(take_over)
                while not old.kicks:
                    await trio.sleep(0.001)
                assert old.kicks[0][0] is ErrorCode.CONNECTED_ELSEWHERE
                await trio.sleep(0.01)
                assert not done.is_set(), "the claim returned before the previous holder finished"
                old.finished.set()
        assert claims[0].epoch > old_claim.epoch
        assert new.kicks == []
        await presence.release("bob", old_claim)  # the old session's cleanup, late: changes nothing
        assert await presence.online(["bob"]) == {"bob"}
        await presence.wake(["bob"])
        assert (new.wakes, old.wakes) == (1, 0)

    async def test_takeover_wait_is_bounded(self, make_presence: MakePresence) -> None:
        presence = make_presence(0.05)
        stuck = FakeSubscriber("stuck", stubborn=True)
        await presence.claim("bob", stuck)
        with trio.fail_after(TIMEOUT):
            claim = await presence.claim("bob", FakeSubscriber("new"))
        assert claim.owner == "new" and len(stuck.kicks) == 1
        assert await presence.online(["bob"]) == {"bob"}

    async def test_a_claim_cancelled_while_waiting_holds_nothing(self, presence: Presence) -> None:
        stuck = FakeSubscriber("stuck", stubborn=True)
        stuck_claim = await presence.claim("bob", stuck)
        with trio.move_on_after(0.05):
            await presence.claim("bob", FakeSubscriber("new"))
            pytest.fail("the claim returned while the previous holder was still running")
        await presence.wake(["bob"])
        assert stuck.wakes == 0, "the previous holder was kicked: it holds the mailbox no more"
        await presence.release("bob", stuck_claim)
        assert presence.count() == 0

    async def test_wake_and_resync_reach_only_held_mailboxes(self, presence: Presence) -> None:
        a, b = FakeSubscriber("s1"), FakeSubscriber("s2")
        await presence.claim("alice", a)
        await presence.claim("bob", b)
        await presence.wake(["alice", "nobody", "alice"])
        assert (a.wakes, b.wakes) == (2, 0)
        await presence.resync(["bob", "nobody"])
        assert (a.resyncs, b.resyncs) == (0, 1)
        await presence.resync(frozenset({"alice", "bob"}))
        assert (a.resyncs, b.resyncs) == (1, 2)
        assert (a.status_wakes, b.status_wakes) == (0, 0)

    async def test_a_status_wake_reaches_only_held_mailboxes_and_is_its_own_kind(self, presence: Presence) -> None:
        a, b = FakeSubscriber("s1"), FakeSubscriber("s2")
        await presence.claim("alice", a)
        await presence.claim("bob", b)
        await presence.wake_statuses(["alice", "nobody"])
        assert (a.status_wakes, b.status_wakes) == (1, 0)
        assert (a.wakes, a.resyncs) == (0, 0)

    async def test_a_stale_release_leaves_the_holder(self, presence: Presence) -> None:
        first = await presence.claim("bob", FakeSubscriber("s1"))
        second = await presence.claim("bob", FakeSubscriber("s2"))
        await presence.release("bob", first)
        assert await presence.online(["bob"]) == {"bob"}
        await presence.release("bob", second)
        assert await presence.online(["bob"]) == set()
