"""Delivery: one mailbox's pump, from the store to its session's outbox, within the in-flight window.

Theory of operation. A :class:`Delivery` belongs to one session that holds one mailbox
under one claim. :meth:`Delivery.pump` fetches queued messages while the in-flight window
(``max_inflight`` un-ACKed DELIVERs) and the outbox have room, encodes each as a DELIVER
through the connection's state machine and pushes them; when the mailbox has nothing
left queued after a connect or PULL, it sends DRAINED. It stops when the window is full
(an ACK reopens it: :meth:`acked`) or the outbox passes its soft limit (the outbox calls
back once there is space). The mailbox task (:meth:`run`) pumps whenever signalled.

How a new message reaches the pump is decided here and only here, from
``store.synchronous``: a store whose calls never yield (the in-memory store) lets the
sender's task pump the recipient at once in :meth:`wake`, since nothing can interleave
(a task switch less per message, which is what online latency is made of); any other
store leaves it to the mailbox task. Expiry or an ACK that did not come over this
session changes the window behind the pump's back: :meth:`resync` makes the next pump
recount it with a fetch even when the window looks full. So does an ACK heard while a
fetch is awaited: the store may have applied the ACK after the fetch, so the fetch's count
of in-flight messages can be older than the ACK's. The other way round holds too: a store
that runs calls on several connections (Redis) may apply an ACK *before* a fetch that
finishes first, and that ACK's count then misses what the fetch took. So an ACK's count is
taken only if no fetch finished while the ACK was at the store (:attr:`fetches` numbers them);
otherwise the pump recounts, and the window is never overrun.

``attempt`` counts DELIVERs actually written: messages fetched while the connection was
already closing are not written and not counted (they go back to the queue when the
session ends, named in ``store.release(..., unwritten=)`` so their attempt goes back
down). Every fetch carries the session's claim: once a newer session has fetched from
the mailbox, the store answers ``fenced`` and this pump stops.

Delivery statuses (protocol.md section 9, rule 19) go the same way, in their own lane: the
pump keeps a status cursor (the highest ``seq`` it wrote; 0 at connect and after PULL) and
a flag saying statuses may be waiting (set at connect, by PULL and by a status wake,
:meth:`wake_statuses`). While the flag is set and the outbox has room it fetches the
statuses after the cursor (``store.fetch_statuses``), writes them as STATUS frames and
moves the cursor on; the in-flight window does not apply (statuses are not DELIVERs) and
nothing is fetched for statuses unless a status wake, a connect or a PULL asked for it, so
traffic without ``notify`` never pays for them. The cursor is sound because the store
numbers a mailbox's statuses increasingly, also across its lane being emptied and forgotten
(``broker.store.base``), and a status wake is sent only after the store confirmed the
statuses. Un-ACKed statuses are not handed out to a session (no claim, no fence): a new
session, or a PULL, starts again from 0 and so gets every one not yet STATUS_ACKed. A fetch
that finds messages expired (``Batch.notices``, for SENDs with ``notify``) hands their
"expired" notices to the router's one reporting place (``report``).

A store that cannot be reached (OSError from a fetch or release) does not end the
mailbox task: it reports the failure to the node's :class:`~broker.health.StoreHealth`,
waits until the health's reconnect task finds the store answering, and pumps again
(recounting the window). A failure right after a recovery waits longer each time (0.1 s
doubling to 5 s), so a store that answers the probe but not the fetch is no busy loop. A
PULL whose release failed is completed by the mailbox task before its next pump.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import trio

from wire import Connection, Drained

from .health import StoreHealth
from .outbox import Outbox
from .stats import Counters
from .store.base import AckResult, Claim, Clock, Message, Notice, Store

__all__ = ["STATUS_FETCH", "Delivery"]

log = logging.getLogger(__name__)

STATUS_FETCH = 256
"""Statuses fetched at once: their STATUS frames (under 150 bytes each) stay far below the outbox's soft limit."""

SENT_AT_SLACK = 2
"""The ACK latency's notes of written DELIVERs are dropped past this many in-flight windows (stale ids: messages
that expired in flight or were ACKed over HTTP); their ACKs then go uncounted, nothing else changes."""

Report = Callable[[Sequence[Notice]], Awaitable[None]]
"""Where notices go (:meth:`broker.router.Router.report`): queued as statuses for their senders, who are woken."""


class Delivery:
    """The delivery side of one session's mailbox (see the module docstring)."""

    __slots__ = (
        "_blocked",
        "_clock",
        "_counters",
        "_drain_wanted",
        "_fetch_bytes",
        "_health",
        "_inline",
        "_pull_wanted",
        "_report",
        "_resync",
        "_sent_at",
        "_signal",
        "_status_after",
        "_status_pulls",
        "_statuses_wanted",
        "_unwritten",
        "_window",
        "claim",
        "conn",
        "fetches",
        "inflight",
        "mailbox",
        "outbox",
        "store",
    )

    def __init__(
        self,
        mailbox: str,
        claim: Claim,
        *,
        store: Store,
        conn: Connection,
        outbox: Outbox,
        counters: Counters,
        max_inflight: int,
        clock: Clock,
        health: StoreHealth,
        report: Report,
    ) -> None:
        self.mailbox = mailbox
        self.claim = claim
        self.store = store
        self.conn = conn
        self.outbox = outbox
        self._counters = counters
        self._health = health
        self._clock = clock  # epoch ms, for the store's expiry judgement
        self._window = max_inflight
        # Deliveries fetched at once: with the reader's share this keeps unsent data under the cap.
        self._fetch_bytes = outbox.soft_limit // 2
        self._inline = store.synchronous
        self.inflight = 0
        """DELIVERs of this mailbox not yet ACKed, as the store last said."""
        self.fetches = 0
        """Fetches finished so far: what :meth:`acked` is told as it was when the ACK went to the store."""
        self._signal = trio.Event()
        self._drain_wanted = True  # the first pump (at connect) ends with DRAINED
        self._resync = False
        self._blocked = False  # stopped on a full window
        self._pull_wanted = False  # a PULL's release failed: the mailbox task does it before pumping
        self._unwritten: list[str] = []  # fetched while closing, never written: attempt goes back down
        self._report = report
        self._status_after = 0  # the highest status seq written on this connection (0: none yet, or PULL)
        self._status_pulls = 0  # PULLs so far: a status fetch that a PULL overtook does not move the cursor
        self._statuses_wanted = True  # statuses may be waiting: at connect, after PULL, on a status wake
        self._sent_at: dict[str, int] = {}  # id -> sent_at of the DELIVERs written and not yet ACKed here

    # ------------------------------------------------------------ from other tasks

    async def wake(self) -> None:
        """New messages were queued for this mailbox (called from the sender's task)."""
        if self.outbox.closing:
            return  # it stays queued for the next session: the mailbox task is cancelled, writes are dropped
        if self._inline:
            await self.pump()
        else:
            self._signal.set()

    def resync(self) -> None:
        """The store removed messages behind our back (expiry, ACK elsewhere): recount the window."""
        self._resync = True
        self._signal.set()

    def wake_statuses(self) -> None:
        """Statuses were queued for this mailbox: the mailbox task fetches them (any store)."""
        self._statuses_wanted = True
        self._signal.set()

    def acked(self, result: AckResult, fetches: int, ids: Sequence[str] = ()) -> None:
        """Messages of this mailbox were ACKed over this session: the window may have room.

        ``fetches`` is :attr:`fetches` as it was when the ACK went to the store: if a fetch has finished
        since, the store may have applied the two in either order, so the ACK's count is not trusted and the
        pump recounts (module docstring). ``ids`` (the ACKed ids) written by this pump are counted in the
        ACK latency histogram.
        """
        if ids and result.deleted:
            sent_at = self._sent_at
            latency = self._counters.ack_latency
            now = self._clock()
            for i in ids:
                at = sent_at.pop(i, None)
                if at is not None:
                    latency.observe((now - at) / 1000)
        if fetches == self.fetches:
            self.inflight = result.inflight
        else:
            self._resync = True
        if self._blocked:
            if self.inflight < self._window or self._resync:
                self._signal.set()
        else:
            # The pump may be awaiting a fetch (a store that yields): its count of in-flight messages may
            # predate this ACK while its reply comes after it, so the pump recounts before it trusts a full window.
            self._resync = True

    async def pull(self) -> None:
        """PULL: every in-flight message goes back to the queue and is delivered again, then DRAINED.

        If the store cannot be reached, the mailbox task releases once it answers (module docstring).
        """
        try:
            await self._release()
        except OSError as exc:
            self._health.failed(exc)
            self._pull_wanted = True
        self.inflight = 0
        self._drain_wanted = True
        self._status_after = 0  # every un-ACKed status is sent again too
        self._status_pulls += 1
        self._statuses_wanted = True
        self._signal.set()

    async def release(self) -> None:
        """The session ends: its un-ACKed deliveries go back to the queue for the next one."""
        await self._release()

    async def _release(self) -> None:
        """In-flight messages back to the queue (a stale claim changes nothing), naming those never written."""
        unwritten, self._unwritten = self._unwritten, []
        self._sent_at.clear()  # given back: their next DELIVER (on any session) starts the ACK latency again
        try:
            await self.store.release(self.mailbox, self.claim, unwritten)
        except OSError:
            self._unwritten = unwritten + self._unwritten  # still to be named at the next release
            raise

    # ------------------------------------------------------------ the mailbox task

    async def run(self) -> None:
        """The mailbox task: pump at once (connect), then whenever signalled. Never returns.

        Survives a store that cannot be reached: waits for it and pumps again (module docstring).
        """
        self._signal.set()
        failures = 0
        while True:
            await self._signal.wait()
            self._signal = trio.Event()
            try:
                if self._pull_wanted:
                    await self._release()
                    self._pull_wanted = False
                await self.pump()
                failures = 0
            except OSError as exc:
                self._health.failed(exc)
                self._resync = True  # the window as the store counts it, once it answers
                failures += 1
                await self._health.wait_to_retry(failures)
                self._signal.set()

    def _wake_for_space(self) -> None:
        self._signal.set()

    async def pump(self) -> None:
        """Hand queued messages to the outbox while the window and the outbox have room, then statuses if wanted."""
        await self._pump_messages()
        if self._statuses_wanted:
            await self._pump_statuses()

    async def _pump_messages(self) -> None:
        outbox = self.outbox
        self._blocked = False
        while True:
            room = self._window - self.inflight
            if not outbox.has_room():
                outbox.call_when_space(self._wake_for_space)
                return
            if room <= 0 and not self._resync:
                self._blocked = True  # an ACK wakes the mailbox task
                return
            self._resync = False
            batch = await self.store.fetch_many(
                self.mailbox, self.claim, max(room, 0), self._fetch_bytes, self._clock()
            )
            self.fetches += 1
            if batch.fenced:
                return  # taken over: the newer session has the mailbox's deliveries
            if batch.notices:  # notify messages found expired: their senders get "expired"
                await self._report(batch.notices)
            self.inflight = batch.inflight
            if batch.messages and not self._write(batch.messages):
                return  # closing: what was fetched goes back to the queue at release
            if batch.queued == 0:
                if self._drain_wanted:
                    self._drain_wanted = False
                    outbox.push(self.conn.send(Drained(pending=batch.inflight)))  # b"" once CLOSED
                return
            if not batch.messages and room > 0:
                return  # (a resync fetch with no room only recounted the window: go round again)

    async def _pump_statuses(self) -> None:
        """Write the statuses after the cursor as STATUS frames while the outbox has room (module docstring)."""
        outbox = self.outbox
        while self._statuses_wanted and not outbox.closing:
            if not outbox.has_room():
                outbox.call_when_space(self._wake_for_space)
                return
            self._statuses_wanted = False  # a status wake while the fetch is awaited asks for another round
            pulls = self._status_pulls
            try:
                held = await self.store.fetch_statuses(self.mailbox, self._status_after, STATUS_FETCH, self._clock())
            except BaseException:
                self._statuses_wanted = True  # still to do once the store answers
                raise
            if not held or outbox.closing or pulls != self._status_pulls:
                continue  # (a PULL meanwhile: its round starts from 0, already asked for)
            frames = self.conn.send_statuses(held)
            if not frames:
                return  # the connection is CLOSED
            outbox.push_all(frames)
            self._status_after = held[-1].seq
            self._counters.statuses_delivered += len(held)
            if len(held) >= STATUS_FETCH:
                self._statuses_wanted = True  # there may be more

    def _write(self, messages: Sequence[Message]) -> bool:
        """Push DELIVERs for ``messages``; False (nothing written) if the connection is closing or closed."""
        if not self.outbox.closing:
            frames = self.conn.send_delivers(messages)
            if frames:  # []: the connection is CLOSED
                self.outbox.push_all(frames)
                counters = self._counters
                counters.delivered += len(messages)
                counters.redelivered += self._track(messages)
                return True
        self._unwritten.extend(m.id for m in messages)
        return False

    def _track(self, messages: Sequence[Message]) -> int:
        """Note the DELIVERs of ``messages`` just written: the first ones' latency since acceptance, each one's
        ``sent_at`` for its ACK's latency; how many were redeliveries. One plain loop (half the cost of ``sum()``
        over a generator); what it keeps is bounded by the in-flight window (:data:`SENT_AT_SLACK`)."""
        sent_at = self._sent_at
        if len(sent_at) > self._window * SENT_AT_SLACK:
            sent_at.clear()  # ids that left the window behind our back (expired, ACKed elsewhere)
        latency = self._counters.deliver_latency
        now = self._clock()
        n = 0
        for m in messages:
            sent_at[m.id] = m.sent_at
            if m.attempt > 1:
                n += 1
            else:
                latency.observe((now - m.sent_at) / 1000)
        return n
