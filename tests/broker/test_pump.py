"""The delivery pump on its own: a Delivery over the in-memory store and an outbox on a fake
transport, no broker, no sockets. What it fetched it writes, or names as unwritten; how a new
message reaches it depends on ``store.synchronous`` alone; a taken-over pump stops. Statuses
go by their own cursor, only when asked for (connect, PULL, a status wake), and the expired
notices a fetch finds go to ``report``.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio
import trio.testing

from broker.backend import probed_health
from broker.delivery import Delivery
from broker.outbox import Outbox
from broker.stats import Counters
from broker.store.base import Claim, NewMessage, Notice
from broker.store.memory import MemoryStore
from wire import (
    Connection,
    Deliver,
    Drained,
    ErrorCode,
    Frame,
    FrameDecoder,
    Hello,
    ReportState,
    Role,
    StatusReport,
    Welcome,
)

from ..store.clock import ManualClock


class TakeAll:
    """A transport whose kernel buffer takes everything at once (every push is a direct write)."""

    def __init__(self) -> None:
        self.data = b""

    async def receive_some(self) -> bytes:
        await trio.sleep_forever()
        raise AssertionError

    async def send_all(self, data: bytes) -> None:
        self.data += data

    def send_some_nowait(self, data: bytes) -> int:
        self.data += data
        return len(data)

    def set_peer_limit(self, max_frame_bytes: int) -> None:
        pass

    def welcome_sent(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    def frames(self) -> list[Frame]:
        return FrameDecoder(1 << 20).feed(self.data)


class YieldingStore(MemoryStore):
    synchronous = False


def open_connection() -> Connection:
    """A broker-side Connection in OPEN (HELLO received, WELCOME sent)."""
    conn = Connection(Role.BROKER)
    conn.receive_data(Connection(Role.CLIENT).send(Hello(version=1, token="t")))
    conn.send(
        Welcome(
            version=1, session="s", mailbox="bob", pending=0, max_frame_bytes=65536, max_inflight=8,
            max_recipients=8, default_ttl_s=60, max_ttl_s=60, keepalive_s=60, expires_in_s=3600,
        )
    )  # fmt: skip
    return conn


class Pump:
    def __init__(self, store: MemoryStore, claim: Claim, clock: ManualClock) -> None:
        self.transport = TakeAll()
        self.conn = open_connection()
        self.closed: list[ErrorCode | None] = []
        self.outbox = Outbox(self.transport, max_bytes=1 << 20, on_close=lambda code, _: self.closed.append(code))
        self.counters = Counters()
        self.reported: list[Notice] = []
        self.delivery = Delivery(
            "bob", claim, store=store, conn=self.conn, outbox=self.outbox, counters=self.counters,
            max_inflight=8, clock=clock, health=probed_health(store), report=self.report,
        )  # fmt: skip

    async def report(self, notices: Sequence[Notice]) -> None:
        self.reported.extend(notices)

    def statuses(self) -> list[tuple[ReportState, str | None]]:
        return [(f.state, f.id) for f in self.transport.frames() if isinstance(f, StatusReport)]


async def put(store: MemoryStore, clock: ManualClock, *ids: str) -> None:
    now = clock()
    await store.enqueue_many([NewMessage(i, "alice", ("bob",), b"x", now, now + 60_000) for i in ids], now)


async def test_what_a_closing_pump_fetched_is_not_counted_and_keeps_its_attempt() -> None:
    clock, store = ManualClock(), MemoryStore()
    await put(store, clock, "m1", "m2")
    old = Pump(store, Claim("old", 1), clock)
    old.outbox.close(b"", grace_s=1)  # the session is closing
    await old.delivery.pump()
    assert old.transport.frames() == []
    assert (old.counters.delivered, old.delivery.inflight) == (0, 2), "fetched (in flight) but never written"
    await old.delivery.release()
    new = Pump(store, Claim("new", 2), clock)
    await new.delivery.pump()
    frames = new.transport.frames()
    assert [(f.id, f.attempt) for f in frames if isinstance(f, Deliver)] == [("m1", 1), ("m2", 1)]
    assert isinstance(frames[-1], Drained)
    assert new.counters.delivered == 2


async def test_a_synchronous_store_is_pumped_from_the_waking_task() -> None:
    clock, store = ManualClock(), MemoryStore()
    pump = Pump(store, Claim("s", 1), clock)
    await pump.delivery.pump()  # connect: nothing queued, DRAINED
    await put(store, clock, "m1")
    await pump.delivery.wake()
    assert [f.id for f in pump.transport.frames() if isinstance(f, Deliver)] == ["m1"]


async def test_any_other_store_leaves_delivery_to_the_mailbox_task() -> None:
    clock, store = ManualClock(), YieldingStore()
    pump = Pump(store, Claim("s", 1), clock)
    await put(store, clock, "m1")
    await pump.delivery.wake()
    assert pump.transport.frames() == [], "a yielding store is never pumped from the sender's task"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump.delivery.run)
        while not any(isinstance(f, Drained) for f in pump.transport.frames()):
            await trio.sleep(0)
        nursery.cancel_scope.cancel()
    assert [type(f) for f in pump.transport.frames()] == [Deliver, Drained]


async def test_a_pump_whose_mailbox_was_taken_over_stops() -> None:
    clock, store = ManualClock(), MemoryStore()
    old = Pump(store, Claim("old", 1), clock)
    await put(store, clock, "m1")
    await old.delivery.pump()
    new = Pump(store, Claim("new", 2), clock)
    await new.delivery.pump()
    await put(store, clock, "m2")
    await old.delivery.pump()
    old_ids = [f.id for f in old.transport.frames() if isinstance(f, Deliver)]
    assert old_ids == ["m1"], "the fenced pump wrote nothing more"
    await old.delivery.release()  # stale: changes nothing
    await new.delivery.pump()
    got = [(f.id, f.attempt) for f in new.transport.frames() if isinstance(f, Deliver)]
    assert got == [("m1", 2), ("m2", 1)]


class GatedStore(MemoryStore):
    """A yielding store whose fetch is applied at once (as Redis runs the script) but whose reply can be held back."""

    synchronous = False

    def __init__(self) -> None:
        super().__init__()
        self.gate: trio.Event | None = None

    async def fetch_many(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        batch = await super().fetch_many(*args, **kwargs)
        if self.gate is not None:
            await self.gate.wait()  # the reply is on its way back; an ACK can be applied meanwhile
        return batch


async def test_an_ack_applied_while_a_fetch_reply_is_on_its_way_does_not_shrink_the_window() -> None:
    """The fetch's count of in-flight messages predates an ACK that the store applied after it but that the session
    heard of first: the pump must recount, not stop on a window it believes full (found by the node-crash tests)."""
    clock, store = ManualClock(), GatedStore()
    await put(store, clock, *(f"m{i}" for i in range(20)))
    pump = Pump(store, Claim("s", 1), clock)

    def delivered() -> list[str]:
        return [f.id for f in pump.transport.frames() if isinstance(f, Deliver)]

    async def ack(*ids: str) -> None:
        fetches = pump.delivery.fetches
        pump.delivery.acked(await store.ack_many("bob", list(ids), clock()), fetches)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump.delivery.run)
            await trio.testing.wait_all_tasks_blocked()
            assert len(delivered()) == 8  # a full window
            store.gate = gate = trio.Event()
            await ack("m0", "m1", "m2", "m3")  # room for 4: the pump fetches m8-m11, its reply held back
            await trio.testing.wait_all_tasks_blocked()
            await ack("m4", "m5", "m6", "m7")  # applied after that fetch, heard of before its reply
            store.gate = None
            gate.set()
            await trio.testing.wait_all_tasks_blocked()
            assert delivered() == [f"m{i}" for i in range(16)], "the window had room for m12-m15"
            nursery.cancel_scope.cancel()


class AckGatedStore(MemoryStore):
    """A yielding store whose ACK replies can be held back after the ACK was applied."""

    synchronous = False

    def __init__(self) -> None:
        super().__init__()
        self.gate: trio.Event | None = None

    async def ack_many(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        result = await super().ack_many(*args, **kwargs)
        if self.gate is not None:
            await self.gate.wait()  # applied; the reply is on its way back while a fetch overtakes it
        return result


async def test_an_ack_applied_before_a_fetch_that_answers_first_does_not_overrun_the_window() -> None:
    """The other order (Redis runs calls on several connections): the store applies an ACK, then a fetch that
    answers first; the ACK's count of in-flight messages then misses what the fetch took, and trusting it
    would deliver past the window (found by tests/nodes/test_node_crash.py)."""
    clock, store = ManualClock(), AckGatedStore()
    await put(store, clock, *(f"m{i}" for i in range(20)))
    pump = Pump(store, Claim("s", 1), clock)

    def delivered() -> list[str]:
        return [f.id for f in pump.transport.frames() if isinstance(f, Deliver)]

    async def ack(*ids: str) -> None:
        fetches = pump.delivery.fetches
        pump.delivery.acked(await store.ack_many("bob", list(ids), clock()), fetches)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump.delivery.run)
            await trio.testing.wait_all_tasks_blocked()
            assert len(delivered()) == 8  # a full window
            store.gate = gate = trio.Event()
            nursery.start_soon(ack, "m0", "m1", "m2", "m3")  # applied at once (4 in flight), reply held back
            await trio.testing.wait_all_tasks_blocked()
            pump.delivery.resync()  # an expiry, say: the pump recounts 4 in flight and fetches m8-m11
            await trio.testing.wait_all_tasks_blocked()
            assert delivered() == [f"m{i}" for i in range(12)]
            gate.set()  # the ACK's reply says 4 in flight: older than that fetch, so not believed
            await trio.testing.wait_all_tasks_blocked()
            assert delivered() == [f"m{i}" for i in range(12)], "8 in flight: the window is full"
            nursery.cancel_scope.cancel()


def delivered_notice(mid: str, at: int) -> Notice:
    return Notice("bob", mid, "carol", ReportState.DELIVERED, at)


async def test_statuses_go_out_after_the_cursor_only_when_asked_for_and_all_again_after_pull() -> None:
    clock, store = ManualClock(), MemoryStore()
    pump = Pump(store, Claim("s", 1), clock)
    await store.add_statuses([delivered_notice("a1", clock())], clock(), 60_000)
    await pump.delivery.pump()  # connect: DRAINED, then the held status
    assert [type(f) for f in pump.transport.frames()] == [Drained, StatusReport]
    await store.add_statuses([delivered_notice("a2", clock())], clock(), 60_000)
    await put(store, clock, "m1")
    await pump.delivery.wake()  # a message wake does not look for statuses
    assert pump.statuses() == [(ReportState.DELIVERED, "a1")]
    pump.delivery.wake_statuses()
    await pump.delivery.pump()
    assert pump.statuses() == [(ReportState.DELIVERED, "a1"), (ReportState.DELIVERED, "a2")], "after the cursor"
    await pump.delivery.pull()
    await pump.delivery.pump()
    assert pump.statuses()[2:] == [(ReportState.DELIVERED, "a1"), (ReportState.DELIVERED, "a2")], "not ACKed: again"
    assert pump.counters.statuses_delivered == 4


async def test_a_fetch_that_finds_notify_messages_expired_hands_their_notices_to_report() -> None:
    clock, store = ManualClock(), MemoryStore()
    now = clock()
    await store.enqueue_many(
        [
            NewMessage("told", "alice", ("bob",), b"x", now, now + 1000, True),
            NewMessage("quiet", "alice", ("bob",), b"x", now, now + 1000),
            NewMessage("kept", "alice", ("bob",), b"x", now, now + 60_000, True),
        ],
        now,
    )
    clock.advance(1)
    pump = Pump(store, Claim("s", 1), clock)
    await pump.delivery.pump()
    assert [f.id for f in pump.transport.frames() if isinstance(f, Deliver)] == ["kept"]
    assert pump.reported == [Notice("alice", "told", "bob", ReportState.EXPIRED, now + 1000)]


class GatedStatusStore(MemoryStore):
    """A yielding store whose status fetch reply can be held back."""

    synchronous = False

    def __init__(self) -> None:
        super().__init__()
        self.gate: trio.Event | None = None

    async def fetch_statuses(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        held = await super().fetch_statuses(*args, **kwargs)
        if self.gate is not None:
            await self.gate.wait()
        return held


async def test_a_pull_while_a_status_fetch_is_awaited_still_sends_every_status_again() -> None:
    clock, store = ManualClock(), GatedStatusStore()
    pump = Pump(store, Claim("s", 1), clock)
    await store.add_statuses([delivered_notice("a1", clock())], clock(), 60_000)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump.delivery.run)
            await trio.testing.wait_all_tasks_blocked()
            assert pump.statuses() == [(ReportState.DELIVERED, "a1")]
            await store.add_statuses([delivered_notice("a2", clock())], clock(), 60_000)
            store.gate = gate = trio.Event()
            pump.delivery.wake_statuses()
            await trio.testing.wait_all_tasks_blocked()  # the fetch after a1 is on its way back
            await pump.delivery.pull()
            store.gate = None
            gate.set()
            await trio.testing.wait_all_tasks_blocked()
            assert pump.statuses()[1:] == [(ReportState.DELIVERED, "a1"), (ReportState.DELIVERED, "a2")]
            nursery.cancel_scope.cancel()
