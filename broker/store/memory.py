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

Nothing in this class awaits: every async method runs to completion without a
checkpoint, which keeps a SEND's enqueue and the receipt that reports it atomic.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from collections.abc import Collection, Sequence

from .base import AckResult, Batch, Claim, Message, NewMessage, Outcome, Purged, StoreLimits, StoreStatistics

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

    def snapshot(self) -> Message:
        return Message(self.id, self.sender, self.recipient, self.body, self.sent_at, self.expires_at, self.attempt)


class _Bucket:
    """The entries expiring in one second; ``dead`` counts those removed since (lazy deletion)."""

    __slots__ = ("dead", "items")

    def __init__(self) -> None:
        self.items: list[_Entry] = []
        self.dead = 0


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
        self._buckets: dict[int, _Bucket] = {}
        self._bucket_heap: list[int] = []
        self._bucket_keys: set[int] = set()
        # (recipient, id) -> (sender, expires_at) for ACKed messages, oldest ACK first.
        self._tombstones: OrderedDict[tuple[str, str], tuple[str, int]] = OrderedDict()
        self._total_bytes = 0
        self._total_messages = 0
        self._inflight = 0
        self._acknowledged_total = 0
        self._expired_total = 0

    # ------------------------------------------------------------ internals

    def _bucket(self, key: int) -> _Bucket:
        """The expiry bucket of second ``key``, made (its key on the heap) if there is none."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket()
            if key not in self._bucket_keys:
                self._bucket_keys.add(key)
                heapq.heappush(self._bucket_heap, key)
        return bucket

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
        key = entry.expires_at // 1000
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.dead += 1
            if bucket.dead >= len(bucket.items):
                del self._buckets[key]
            elif bucket.dead >= _COMPACT_MIN_DEAD and 2 * bucket.dead > len(bucket.items):
                bucket.items = [e for e in bucket.items if e.alive]
                bucket.dead = 0
        return size

    def _settle(self, box: _Mailbox, deleted: int, nbytes: int, inflight: int) -> None:
        """Account for ``deleted`` entries of ``box`` dropped (``nbytes`` of bodies, ``inflight`` of them in flight)."""
        box.nbytes -= nbytes
        self._total_bytes -= nbytes
        self._total_messages -= deleted
        self._inflight -= inflight
        if not box.by_id:
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
        out: list[list[Outcome]] = []
        stored = 0
        # The expiry bucket the last entry went to: a batch's messages mostly share their expiry.
        bucket_key = -1
        bucket_items: list[_Entry] = []
        for new in messages:
            # Unpacked once: a NamedTuple's fields read by name are not specialised by CPython 3.11.
            mid, sender, recipients, body, sent_at, expires_at = new
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
                entry = _Entry(mid, sender, box.name, body, sent_at, expires_at)
                box.by_id[mid] = entry
                box.queue.append(entry)
                box.nbytes += size
                self._total_bytes += size  # (at once: the next refusal judges it)
                if key != bucket_key:
                    bucket_key, bucket_items = key, self._bucket(key).items
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
                    (entry.id, entry.sender, box.name, entry.body, entry.sent_at, entry.expires_at, entry.attempt),
                )
            )
        self._inflight += len(got)
        if expired:
            self._expired_total += expired
            self._settle(box, expired, expired_bytes, 0)
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

    async def ack_many(self, mailbox: str, ids: Sequence[str]) -> AckResult:
        box = self._mailboxes.get(mailbox)
        if box is None:
            return _NO_ACK
        by_id = box.by_id
        drop = self._drop
        stones = self._tombstones
        max_stones = self.limits.max_tombstones
        inflight_before = len(box.inflight)
        deleted = nbytes = 0
        for mid in ids:
            entry = by_id.get(mid)
            if entry is None:
                continue
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
        expired = 0
        for key in self._due_bucket_keys(now_ms):
            expired += sum(
                1 for e in self._buckets[key].items if e.alive and e.recipient == mailbox and e.expires_at <= now_ms
            )
        return len(box.by_id) - expired

    def _due_bucket_keys(self, now_ms: int) -> list[int]:
        """Keys of live buckets holding entries that may be expired: O(due keys), by walking the heap."""
        due_second = now_ms // 1000
        heap = self._bucket_heap
        keys: list[int] = []
        stack = [0]
        while stack:
            i = stack.pop()
            if i < len(heap) and heap[i] <= due_second:
                if heap[i] in self._buckets:
                    keys.append(heap[i])
                stack.append(2 * i + 1)
                stack.append(2 * i + 2)
        return keys

    def _purge_bucket(self, bucket: _Bucket, now_ms: int, touched: set[str]) -> list[_Entry]:
        """Drop the expired entries of a bucket already taken out of the index; returns the unexpired ones."""
        later: list[_Entry] = []
        for entry in bucket.items:
            if not entry.alive:
                continue
            if entry.expires_at <= now_ms:
                box = self._mailboxes[entry.recipient]
                was_inflight = int(entry.inflight)
                self._settle(box, 1, self._drop(box, entry), was_inflight)
                touched.add(box.name)
                self._expired_total += 1
            else:
                later.append(entry)
        return later

    async def purge_expired(self, now_ms: int) -> Purged:
        heap = self._bucket_heap
        buckets = self._buckets
        touched: set[str] = set()
        expired_before = self._expired_total
        while heap and heap[0] <= now_ms // 1000:
            key = heap[0]
            bucket = buckets.pop(key, None)
            if bucket is not None:
                later = self._purge_bucket(bucket, now_ms, touched)
                if later:  # the current second is only partly due: keep the rest for the next sweep
                    bucket.items = later
                    bucket.dead = 0
                    buckets[key] = bucket
                    break
            heapq.heappop(heap)
            self._bucket_keys.discard(key)
        # Tombstones are in ACK order, which is close to expiry order: drop the expired head.
        stones = self._tombstones
        while stones:
            stone, (_, expires_at) = next(iter(stones.items()))
            if expires_at > now_ms:
                break
            del stones[stone]
        return Purged(self._expired_total - expired_before, frozenset(touched))

    async def statistics(self, now_ms: int) -> StoreStatistics:
        unswept = sum(
            1
            for key in self._due_bucket_keys(now_ms)
            for e in self._buckets[key].items
            if e.alive and e.expires_at <= now_ms
        )
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
        )

    async def aclose(self) -> None:
        self._mailboxes.clear()
        self._buckets.clear()
        self._bucket_heap.clear()
        self._bucket_keys.clear()
        self._tombstones.clear()
