"""The in-memory store, Relay's default: nothing touches the disk.

Theory of operation. Per mailbox: ``by_id`` (every held message by id), ``queue`` (a
deque of messages not in flight, oldest first), ``inflight`` (an insertion-ordered
dict, delivery order) and ``fence`` (the newest :class:`~.base.Claim` that fetched).
Each held message is one private ``_Entry`` (its fields plus the bookkeeping flags
``alive`` and ``inflight``); what the store hands out is an immutable
:class:`~.base.Message` made from it, one per message delivered or peeked, so nothing a
caller holds changes afterwards. Deleting a queued message (ACK before delivery,
expiry) marks its entry dead and leaves it in the deque; dead entries are skipped when
popped and the deque is compacted when they outnumber the living, so every operation is
amortised O(1).

Expiry: entries are indexed in buckets by expiry second (``dict[second, _Bucket]``)
with a heap of bucket keys; the sweeper pops due keys and deletes their buckets, so a
sweep costs O(expired + due buckets * log buckets), never a scan of every message. A
bucket is a list (8 bytes a message, where a set costs 30-50) with lazy deletion: a
removal only counts its bucket's dead, a bucket whose entries are all dead is dropped,
and one whose dead outnumber the living is compacted, so removal stays amortised O(1)
and dead entries never outnumber living ones in a bucket.

Removal has one copy: :meth:`MemoryStore._drop` forgets one entry from every per-mailbox
index and its bucket and returns its size; :meth:`MemoryStore._settle` then updates the
running totals once per batch and deletes a mailbox left empty (ACK, expiry at fetch and
the sweep all go through the pair).

Notify: a message stored with ``notify`` is a ``_NotifyEntry``, a subclass with no slot of
its own whose class attribute says ``notify``, so a notify-free message costs nothing
more; the ACK, the fetch and the sweep that remove one make its :class:`~.base.Notice`.

Status lanes (:class:`_Lane`, per mailbox that has statuses): ``held`` (seq -> record),
``order`` (a list of records in ascending seq, lazily deleted and compacted like the
queue, so ``fetch_statuses`` finds its start by bisection: O(log n)) and ``overflow`` (the
lane's overflow record, if any). Records expire through a second expiry index of the
same kind as the messages' (:class:`_ExpiryIndex`). The seq rule's ``last_seq`` is one
number for the whole store (the newest seq it gave any lane), so a forgotten lane costs
nothing and still never gets a seq below its old ones. A lane with no records is deleted.

Mailbox depths (``statistics().mailbox_depths``): ``_depths`` holds one count per depth bucket
(:data:`~.base.MAILBOX_DEPTH_BOUNDS`). A message stored moves its mailbox up a bucket only when the count it reaches
is 1 or a bound + 1 (one dict lookup per stored message, :data:`_DEPTH_STEPS`); :meth:`MemoryStore._settle` moves a
mailbox once per batch removed (two bisections). Nothing is counted at scrape time.

Key records: ``_keys`` (mailbox -> (record, expires_at)), ordered by latest put. Every put
has the broker's one ``key_ttl_s``, so that is expiry order too and the sweep drops the
expired head (as for tombstones); ``get_keys`` judges each record's expiry itself.

Nothing in this class awaits: every async method runs to completion without a
checkpoint, which keeps a SEND's enqueue and the receipt that reports it atomic.
"""

from __future__ import annotations

import heapq
from bisect import bisect_right
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Iterator, Sequence
from operator import attrgetter
from typing import Generic, Protocol, TypeVar

from wire import KeyRecord, ReportState

from .base import (
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
    StoreLimits,
    StoreStatistics,
    depth_bucket,
    next_status_seq,
)

__all__ = ["MemoryStore"]

_COMPACT_MIN_DEAD = 64
"""Below this many dead entries compaction (of a deque or a bucket) is not worth a pass."""

_STORED = Outcome.STORED
_DUPLICATE = Outcome.DUPLICATE
_ID_CONFLICT = Outcome.ID_CONFLICT
_MAILBOX_FULL = Outcome.MAILBOX_FULL
_MAILBOX_BYTES_FULL = Outcome.MAILBOX_BYTES_FULL
_BROKER_FULL = Outcome.BROKER_FULL
_NOTHING = Batch((), 0, 0)
_FENCED = Batch((), 0, 0, fenced=True)
_NO_ACK = AckResult(0, 0)
_DELIVERED = ReportState.DELIVERED
_EXPIRED = ReportState.EXPIRED
_OVERFLOW = ReportState.OVERFLOW
_SEQ = attrgetter("seq")
_DEPTH_STEPS: dict[int, int] = {1: 0} | {bound + 1: i + 1 for i, bound in enumerate(MAILBOX_DEPTH_BOUNDS)}
"""Held counts a stored message takes a mailbox to that begin a depth bucket -> that bucket's index (a mailbox
reaching any other count stays in its bucket)."""


class _Entry:
    """One message held for one recipient, with the store's bookkeeping. Never leaves this module."""

    __slots__ = ("alive", "attempt", "body", "expires_at", "id", "inflight", "recipient", "sender", "sent_at")

    def __init__(self, mid: str, sender: str, recipient: str, body: bytes, sent_at: int, expires_at: int) -> None:
        self.id = mid
        self.sender = sender
        self.recipient = recipient
        self.body = body
        self.sent_at = sent_at
        self.expires_at = expires_at
        self.attempt = 0
        self.inflight = False
        self.alive = True

    notify = False
    """A class attribute (no slot): :class:`_NotifyEntry` says True."""

    def snapshot(self) -> Message:
        return Message(
            self.id, self.sender, self.recipient, self.body, self.sent_at, self.expires_at, self.attempt, self.notify
        )


class _NotifyEntry(_Entry):
    """A message stored with ``notify``: the same slots, so plain messages pay nothing for the flag."""

    __slots__ = ()
    notify = True


class _Status:
    """One status record in a lane. Never leaves this module (``snapshot`` is what does)."""

    __slots__ = ("alive", "at", "count", "expires_at", "first_seq", "id", "lane", "recipient", "seq", "state")

    def __init__(
        self,
        lane: str,
        seq: int,
        state: ReportState,
        at: int,
        mid: str | None,
        recipient: str | None,
        count: int | None,
        first_seq: int | None,
        expires_at: int,
    ) -> None:
        self.lane = lane
        self.seq = seq
        self.state = state
        self.at = at
        self.id = mid
        self.recipient = recipient
        self.count = count
        self.first_seq = first_seq
        self.expires_at = expires_at
        self.alive = True

    def snapshot(self) -> HeldStatus:
        return HeldStatus(
            self.seq, self.state, self.at, self.id, self.recipient, self.count, self.expires_at, self.first_seq
        )


class _Lane:
    """One mailbox's statuses: by seq, in seq order (lazily deleted), and its overflow record."""

    __slots__ = ("dead", "held", "name", "order", "overflow")

    def __init__(self, name: str) -> None:
        self.name = name
        self.held: dict[int, _Status] = {}
        self.order: list[_Status] = []
        self.dead = 0  # dead records in ``order``
        self.overflow: _Status | None = None


class _Expiring(Protocol):
    alive: bool
    expires_at: int


E = TypeVar("E", bound=_Expiring)


class _Bucket(Generic[E]):
    """The entries expiring in one second; ``dead`` counts those removed since (lazy deletion)."""

    __slots__ = ("dead", "items")

    def __init__(self) -> None:
        self.items: list[E] = []
        self.dead = 0


class _ExpiryIndex(Generic[E]):
    """Entries (messages or statuses) by expiry second: buckets with lazy deletion and a heap of their keys.

    The caller marks an entry dead (``alive = False``) and then calls :meth:`discard`.
    """

    __slots__ = ("buckets", "heap", "keys")

    def __init__(self) -> None:
        self.buckets: dict[int, _Bucket[E]] = {}
        self.heap: list[int] = []
        self.keys: set[int] = set()

    def bucket(self, key: int) -> _Bucket[E]:
        """The bucket of second ``key``, made (its key on the heap) if there is none."""
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = _Bucket()
            if key not in self.keys:
                self.keys.add(key)
                heapq.heappush(self.heap, key)
        return bucket

    def discard(self, entry: E) -> None:
        """Count a dead entry out of its bucket: drop the bucket when all are dead, compact it when most are."""
        key = entry.expires_at // 1000
        bucket = self.buckets.get(key)
        if bucket is not None:
            bucket.dead += 1
            if bucket.dead >= len(bucket.items):
                del self.buckets[key]
            elif bucket.dead >= _COMPACT_MIN_DEAD and 2 * bucket.dead > len(bucket.items):
                bucket.items = [e for e in bucket.items if e.alive]
                bucket.dead = 0

    def due(self, now_ms: int) -> Iterator[E]:
        """The living entries expired at ``now_ms``, changing nothing: O(due buckets), by walking the heap."""
        due_second = now_ms // 1000
        heap = self.heap
        stack = [0]
        while stack:
            i = stack.pop()
            if i < len(heap) and heap[i] <= due_second:
                bucket = self.buckets.get(heap[i])
                if bucket is not None:
                    yield from (e for e in bucket.items if e.alive and e.expires_at <= now_ms)
                stack.append(2 * i + 1)
                stack.append(2 * i + 2)

    def purge(self, now_ms: int, expire: Callable[[E], None]) -> None:
        """Call ``expire`` on every living entry expired at ``now_ms`` (it marks it dead); forget their buckets.

        ``expire`` runs while its entry's bucket is out of the index (its ``discard`` finds none).
        """
        heap = self.heap
        buckets = self.buckets
        while heap and heap[0] <= now_ms // 1000:
            key = heap[0]
            bucket = buckets.pop(key, None)
            if bucket is not None:
                later: list[E] = []
                for entry in bucket.items:
                    if not entry.alive:
                        continue
                    if entry.expires_at <= now_ms:
                        expire(entry)
                    else:
                        later.append(entry)
                if later:  # the current second is only partly due: keep the rest for the next sweep
                    bucket.items = later
                    bucket.dead = 0
                    buckets[key] = bucket
                    break
            heapq.heappop(heap)
            self.keys.discard(key)

    def clear(self) -> None:
        self.buckets.clear()
        self.heap.clear()
        self.keys.clear()


class _Mailbox:
    __slots__ = ("by_id", "dead", "fence", "inflight", "name", "nbytes", "queue")

    def __init__(self, name: str) -> None:
        self.name = name  # every entry of the mailbox shares this one string
        self.by_id: dict[str, _Entry] = {}
        self.queue: deque[_Entry] = deque()
        self.inflight: dict[str, _Entry] = {}
        self.fence: Claim | None = None
        self.nbytes = 0
        self.dead = 0  # dead entries in ``queue``


class MemoryStore:
    """Messages held in this process's memory. Fast, and gone when the process ends."""

    synchronous = True

    def __init__(self, limits: StoreLimits | None = None) -> None:
        self.limits = limits or StoreLimits()
        self._mailboxes: dict[str, _Mailbox] = {}
        self._expiry: _ExpiryIndex[_Entry] = _ExpiryIndex()
        # (recipient, id) -> (sender, expires_at) for ACKed messages, oldest ACK first.
        self._tombstones: OrderedDict[tuple[str, str], tuple[str, int]] = OrderedDict()
        self._total_bytes = 0
        self._total_messages = 0
        self._inflight = 0
        self._acknowledged_total = 0
        self._expired_total = 0
        self._lanes: dict[str, _Lane] = {}
        self._status_expiry: _ExpiryIndex[_Status] = _ExpiryIndex()
        self._status_seq = 0  # the newest seq given to any lane: the seq rule's last_seq for all of them
        self._statuses_held = 0
        self._statuses_total = 0
        self._statuses_overflowed_total = 0
        self._statuses_expired_total = 0
        self._keys: OrderedDict[str, tuple[KeyRecord, int]] = OrderedDict()
        self._depths = [0] * (len(MAILBOX_DEPTH_BOUNDS) + 1)  # mailboxes by depth bucket (module docstring)

    # ------------------------------------------------------------ internals

    def _drop(self, box: _Mailbox, entry: _Entry) -> int:
        """Forget a held entry in every index (by id, queue or in flight, expiry bucket); returns its body size.

        The caller settles the totals with :meth:`_settle` (once per batch). A queued entry stays in
        the deque, dead, until it is popped or the deque is compacted.
        """
        del box.by_id[entry.id]
        entry.alive = False
        size = len(entry.body)
        entry.body = b""  # a dead entry must not pin the body
        if entry.inflight:
            del box.inflight[entry.id]
        else:
            box.dead += 1
        self._expiry.discard(entry)
        return size

    def _settle(self, box: _Mailbox, deleted: int, nbytes: int, inflight: int) -> None:
        """Account for ``deleted`` entries of ``box`` dropped (``nbytes`` of bodies, ``inflight`` of them in flight)."""
        box.nbytes -= nbytes
        self._total_bytes -= nbytes
        self._total_messages -= deleted
        self._inflight -= inflight
        left = len(box.by_id)
        if deleted:
            depths = self._depths
            depths[depth_bucket(left + deleted)] -= 1
            if left:
                depths[depth_bucket(left)] += 1
        if not left:
            del self._mailboxes[box.name]
        elif box.dead >= _COMPACT_MIN_DEAD and box.dead > len(box.by_id):
            box.queue = deque(e for e in box.queue if e.alive)
            box.dead = 0

    def _requeue(self, box: _Mailbox) -> int:
        """Every in-flight entry of ``box`` back to the front of its queue, in order; returns how many."""
        back = list(box.inflight.values())
        for entry in back:
            entry.inflight = False
        box.inflight.clear()
        box.queue.extendleft(reversed(back))
        self._inflight -= len(back)
        return len(back)

    def _refusal(
        self, box: _Mailbox | None, rcpt: str, mid: str, sender: str, size: int, now_ms: int
    ) -> Outcome | None:
        """Why message ``mid`` of ``sender`` (``size`` bytes of body) cannot be stored for ``rcpt``
        (protocol.md section 9 rule 3's order), or None."""
        if box is not None:
            held = box.by_id.get(mid)
            if held is not None:
                return _DUPLICATE if held.sender == sender else _ID_CONFLICT
        stones = self._tombstones
        if stones:
            stone = stones.get((rcpt, mid))
            if stone is not None:
                if stone[1] > now_ms:
                    return _DUPLICATE if stone[0] == sender else _ID_CONFLICT
                del stones[(rcpt, mid)]  # expired: the id is free again
        limits = self.limits
        if box is None:
            held_bytes = 0
        elif len(box.by_id) >= limits.max_mailbox_messages:
            return _MAILBOX_FULL
        else:
            held_bytes = box.nbytes
        if held_bytes + size > limits.max_mailbox_bytes:
            return _MAILBOX_BYTES_FULL
        if self._total_bytes + size > limits.max_total_bytes:
            return _BROKER_FULL
        return None

    def _admit(self, box: _Mailbox, claim: Claim) -> bool:
        """Whether ``claim`` may fetch from ``box``: it is the fence, or newer (then it takes over)."""
        fence = box.fence
        if fence is claim or fence == claim:
            return True
        if fence is not None:
            if claim.epoch <= fence.epoch:
                return False
            self._requeue(box)  # the old owner's deliveries go to the new one
        box.fence = claim
        return True

    # ------------------------------------------------------------ Store interface

    async def enqueue_many(self, messages: Sequence[NewMessage], now_ms: int) -> list[list[Outcome]]:
        mailboxes = self._mailboxes
        refusal = self._refusal
        depths = self._depths
        steps = _DEPTH_STEPS
        out: list[list[Outcome]] = []
        stored = 0
        # The expiry bucket the last entry went to: a batch's messages mostly share their expiry.
        bucket_key = -1
        bucket_items: list[_Entry] = []
        for new in messages:
            # Unpacked once: a NamedTuple's fields read by name are not specialised by CPython 3.11.
            mid, sender, recipients, body, sent_at, expires_at, notify = new
            kind = _NotifyEntry if notify else _Entry
            size = len(body)
            key = expires_at // 1000
            outcomes: list[Outcome] = []
            for rcpt in recipients:
                box = mailboxes.get(rcpt)
                refused = refusal(box, rcpt, mid, sender, size, now_ms)
                if refused is not None:
                    outcomes.append(refused)
                    continue
                if box is None:
                    box = mailboxes[rcpt] = _Mailbox(rcpt)
                entry = kind(mid, sender, box.name, body, sent_at, expires_at)
                by_id = box.by_id
                by_id[mid] = entry
                step = steps.get(len(by_id))
                if step is not None:  # into the next depth bucket
                    depths[step] += 1
                    if step:
                        depths[step - 1] -= 1
                box.queue.append(entry)
                box.nbytes += size
                self._total_bytes += size  # (at once: the next refusal judges it)
                if key != bucket_key:
                    bucket_key, bucket_items = key, self._expiry.bucket(key).items
                bucket_items.append(entry)
                stored += 1
                outcomes.append(_STORED)
            out.append(outcomes)
        self._total_messages += stored
        return out

    async def fetch_many(self, mailbox: str, claim: Claim, limit: int, max_bytes: int, now_ms: int) -> Batch:
        box = self._mailboxes.get(mailbox)
        if box is None:
            return _NOTHING
        if box.fence is not claim and not self._admit(box, claim):
            return _FENCED
        queue = box.queue
        inflight = box.inflight
        new = tuple.__new__  # Message(...) without the NamedTuple's Python-level __new__: a third cheaper
        got: list[Message] = []
        notices: list[Notice] = []
        nbytes = expired = expired_bytes = 0
        while queue and len(got) < limit:
            entry = queue[0]
            if not entry.alive:
                queue.popleft()
                box.dead -= 1
                continue
            if entry.expires_at <= now_ms:
                expired_bytes += self._drop(box, entry)  # now dead: popped on the next round
                expired += 1
                if entry.notify:
                    notices.append(Notice(entry.sender, entry.id, box.name, _EXPIRED, entry.expires_at))
                continue
            size = len(entry.body)
            if got and nbytes + size > max_bytes:
                break
            queue.popleft()
            nbytes += size
            entry.inflight = True
            entry.attempt += 1
            inflight[entry.id] = entry
            got.append(
                new(
                    Message,
                    (
                        entry.id,
                        entry.sender,
                        box.name,
                        entry.body,
                        entry.sent_at,
                        entry.expires_at,
                        entry.attempt,
                        entry.notify,
                    ),
                )
            )
        self._inflight += len(got)
        if expired:
            self._expired_total += expired
            self._settle(box, expired, expired_bytes, 0)
            if notices:
                return Batch(got, len(box.by_id) - len(inflight), len(inflight), notices=tuple(notices))
        return Batch(got, len(box.by_id) - len(inflight), len(inflight))

    async def release(self, mailbox: str, claim: Claim, unwritten: Collection[str] = ()) -> int:
        box = self._mailboxes.get(mailbox)
        if box is None or not box.inflight or not (box.fence is claim or box.fence == claim):
            return 0
        inflight = box.inflight
        for mid in unwritten:
            entry = inflight.get(mid)
            if entry is not None:
                entry.attempt -= 1
        return self._requeue(box)

    async def ack_many(self, mailbox: str, ids: Sequence[str], now_ms: int) -> AckResult:
        box = self._mailboxes.get(mailbox)
        if box is None:
            return _NO_ACK
        by_id = box.by_id
        drop = self._drop
        stones = self._tombstones
        max_stones = self.limits.max_tombstones
        inflight_before = len(box.inflight)
        deleted = nbytes = 0
        notices: list[Notice] = []
        for mid in ids:
            entry = by_id.get(mid)
            if entry is None:
                continue
            if entry.notify:
                notices.append(Notice(entry.sender, mid, mailbox, _DELIVERED, now_ms))
            if max_stones:
                # A held id cannot be tombstoned already (enqueue refuses tombstoned ids), so this appends.
                stones[(mailbox, mid)] = (entry.sender, entry.expires_at)
                if len(stones) > max_stones:
                    stones.popitem(last=False)
            nbytes += drop(box, entry)
            deleted += 1
        if deleted:
            self._acknowledged_total += deleted
            self._settle(box, deleted, nbytes, inflight_before - len(box.inflight))
            if notices:
                return AckResult(deleted, len(box.inflight), tuple(notices))
        return AckResult(deleted, len(box.inflight))

    async def peek(self, mailbox: str, limit: int, now_ms: int) -> list[Message]:
        box = self._mailboxes.get(mailbox)
        if box is None or limit <= 0:
            return []
        out: list[Message] = []
        # In-flight entries were taken from the queue's head, so they are the oldest.
        for entry in box.inflight.values():
            if entry.expires_at > now_ms:
                out.append(entry.snapshot())
                if len(out) == limit:
                    return out
        for entry in box.queue:
            if entry.alive and entry.expires_at > now_ms:
                out.append(entry.snapshot())
                if len(out) == limit:
                    break
        return out

    async def pending(self, mailbox: str, now_ms: int) -> int:
        box = self._mailboxes.get(mailbox)
        if box is None:
            return 0
        # Expired entries are usually few (the sweeper removes them); count them out exactly.
        expired = sum(1 for e in self._expiry.due(now_ms) if e.recipient == mailbox)
        return len(box.by_id) - expired

    async def purge_expired(self, now_ms: int) -> Purged:
        touched: set[str] = set()
        notices: list[Notice] = []
        expired_before = self._expired_total

        def expire(entry: _Entry) -> None:
            box = self._mailboxes[entry.recipient]
            was_inflight = int(entry.inflight)
            self._settle(box, 1, self._drop(box, entry), was_inflight)
            touched.add(box.name)
            self._expired_total += 1
            if entry.notify:
                notices.append(Notice(entry.sender, entry.id, box.name, _EXPIRED, entry.expires_at))

        self._expiry.purge(now_ms, expire)
        self._status_expiry.purge(now_ms, self._expire_status)
        keys = self._keys
        while keys:
            mailbox, (_, expires_at) = next(iter(keys.items()))
            if expires_at > now_ms:
                break
            del keys[mailbox]
        # Tombstones are in ACK order, which is close to expiry order: drop the expired head.
        stones = self._tombstones
        while stones:
            stone, (_, expires_at) = next(iter(stones.items()))
            if expires_at > now_ms:
                break
            del stones[stone]
        return Purged(self._expired_total - expired_before, frozenset(touched), tuple(notices))

    async def statistics(self, now_ms: int) -> StoreStatistics:
        unswept = sum(1 for _ in self._expiry.due(now_ms))
        return StoreStatistics(
            messages_total=self._total_messages,
            messages_deliverable=self._total_messages - unswept,
            messages_expired_unswept=unswept,
            acknowledged_total=self._acknowledged_total,
            unique_recipients=len(self._mailboxes),
            queued_bytes=self._total_bytes,
            expired_total=self._expired_total,
            tombstones=len(self._tombstones),
            inflight=self._inflight,
            statuses_held=self._statuses_held,
            statuses_total=self._statuses_total,
            statuses_overflowed_total=self._statuses_overflowed_total,
            statuses_expired_total=self._statuses_expired_total,
            mailbox_depths=tuple(self._depths),
        )

    # ------------------------------------------------------------ status lanes

    def _keep_status(
        self,
        lane: _Lane,
        state: ReportState,
        at: int,
        mid: str | None,
        recipient: str | None,
        count: int | None,
        first_seq: int | None,
        expires_at: int,
        now_ms: int,
    ) -> _Status:
        """A new record last in ``lane``, numbered by the seq rule (a new overflow record's ``first_seq``: its seq)."""
        seq = self._status_seq = next_status_seq(self._status_seq, now_ms)
        if state is _OVERFLOW and first_seq is None:
            first_seq = seq
        status = _Status(lane.name, seq, state, at, mid, recipient, count, first_seq, expires_at)
        lane.held[seq] = status
        lane.order.append(status)
        self._status_expiry.bucket(expires_at // 1000).items.append(status)
        self._statuses_held += 1
        return status

    def _drop_status(self, lane: _Lane, status: _Status) -> None:
        """Forget a held record in every index; the caller settles the lane with :meth:`_settle_lane`."""
        del lane.held[status.seq]
        status.alive = False
        lane.dead += 1
        if lane.overflow is status:
            lane.overflow = None
        self._status_expiry.discard(status)
        self._statuses_held -= 1

    def _settle_lane(self, lane: _Lane) -> None:
        """Delete a lane left empty, or compact its order once dead records outnumber the living."""
        if not lane.held:
            del self._lanes[lane.name]
        elif lane.dead >= _COMPACT_MIN_DEAD and lane.dead > len(lane.held):
            lane.order = [s for s in lane.order if s.alive]
            lane.dead = 0

    def _expire_status(self, status: _Status) -> None:
        lane = self._lanes[status.lane]
        self._drop_status(lane, status)
        self._settle_lane(lane)
        self._statuses_expired_total += 1

    async def add_statuses(self, notices: Sequence[Notice], now_ms: int, ttl_ms: int) -> frozenset[str]:
        if ttl_ms < 1:
            raise ValueError(f"a status TTL must be at least 1 ms, not {ttl_ms}")
        expires_at = now_ms + ttl_ms
        bound = self.limits.max_mailbox_statuses
        lanes = self._lanes
        folded: dict[str, int] = {}  # lane -> notices folded into its overflow record by this call
        for mailbox, mid, recipient, state, at in notices:
            lane = lanes.get(mailbox)
            if lane is None:
                lane = lanes[mailbox] = _Lane(mailbox)
            if len(lane.held) - (lane.overflow is not None) < bound:
                self._keep_status(lane, state, at, mid, recipient, None, None, expires_at, now_ms)
            else:
                folded[mailbox] = folded.get(mailbox, 0) + 1
        for mailbox, count in folded.items():
            # Renumbered once per call, after the lane's records this call kept: it is the lane's newest.
            lane = lanes[mailbox]
            first_seq = None
            old = lane.overflow
            if old is not None:
                count += old.count or 0
                first_seq = old.first_seq
                self._drop_status(lane, old)
            lane.overflow = self._keep_status(lane, _OVERFLOW, now_ms, None, None, count, first_seq, expires_at, now_ms)
            self._settle_lane(lane)  # compacts at most: the lane holds the new record
        self._statuses_total += len(notices)
        self._statuses_overflowed_total += sum(folded.values())
        return frozenset(notice.mailbox for notice in notices)

    async def fetch_statuses(self, mailbox: str, after_seq: int, limit: int, now_ms: int) -> list[HeldStatus]:
        lane = self._lanes.get(mailbox)
        if lane is None or limit <= 0:
            return []
        order = lane.order
        i = bisect_right(order, after_seq, key=_SEQ)
        out: list[HeldStatus] = []
        expired = 0
        while i < len(order) and len(out) < limit:
            status = order[i]
            i += 1
            if not status.alive:
                continue
            if status.expires_at <= now_ms:
                self._drop_status(lane, status)
                expired += 1
                continue
            out.append(status.snapshot())
        if expired:
            self._statuses_expired_total += expired
            self._settle_lane(lane)
        return out

    async def ack_statuses(self, mailbox: str, seqs: Sequence[int]) -> int:
        lane = self._lanes.get(mailbox)
        if lane is None:
            return 0
        held = lane.held
        deleted = 0
        for seq in seqs:
            status = held.get(seq)
            if status is not None:
                self._drop_status(lane, status)
                deleted += 1
        if deleted:
            self._settle_lane(lane)
        return deleted

    # ------------------------------------------------------------ key directory

    async def put_key(self, mailbox: str, record: KeyRecord, now_ms: int, ttl_ms: int) -> None:
        if ttl_ms < 1:
            raise ValueError(f"a key record TTL must be at least 1 ms, not {ttl_ms}")
        keys = self._keys
        keys[mailbox] = (record, now_ms + ttl_ms)
        keys.move_to_end(mailbox)

    async def get_keys(self, mailboxes: Sequence[str], now_ms: int) -> dict[str, KeyRecord]:
        keys = self._keys
        out: dict[str, KeyRecord] = {}
        for mailbox in mailboxes:
            held = keys.get(mailbox)
            if held is None:
                continue
            record, expires_at = held
            if expires_at <= now_ms:
                del keys[mailbox]
            else:
                out[mailbox] = record
        return out

    async def aclose(self) -> None:
        self._depths = [0] * len(self._depths)
        self._keys.clear()
        self._mailboxes.clear()
        self._expiry.clear()
        self._tombstones.clear()
        self._lanes.clear()
        self._status_expiry.clear()
