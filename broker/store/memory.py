"""The in-memory store, Relay's default: nothing touches the disk.

Theory of operation. Per mailbox: ``by_id`` (every held message by id), ``queue`` (a
deque of messages not in flight, oldest first) and ``inflight`` (an insertion-ordered
dict, delivery order). Deleting a queued message (ACK before delivery, expiry) marks it
dead and leaves it in the deque; dead entries are skipped when popped and the deque is
compacted when they outnumber the living, so every operation is amortised O(1).

Expiry: messages are indexed in buckets by expiry second (``dict[second, _Bucket]``)
with a heap of bucket keys; the sweeper pops due keys and deletes their buckets, so a
sweep costs O(expired + due buckets * log buckets), never a scan of every message. A
bucket is a list (8 bytes a message, where a set costs 30-50) with lazy deletion: an ACK
only counts its bucket's dead, a bucket whose messages are all dead is dropped, and one
whose dead outnumber the living is compacted, so removal stays amortised O(1) and dead
messages never outnumber living ones in a bucket.

Nothing in this class awaits: every async method runs to completion without a
checkpoint, which keeps a SEND's enqueue and the receipt that reports it atomic.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence

from wire import ErrorCode

from .base import DUPLICATE, STORED, AckResult, Batch, Clock, NewMessage, StoredMessage, StoreLimits, wall_clock_ms

__all__ = ["MemoryStore"]

_COMPACT_MIN_DEAD = 64
"""Below this many dead deque entries compaction is not worth a pass."""


class _Bucket:
    """The messages expiring in one second; ``dead`` counts those removed since (lazy deletion)."""

    __slots__ = ("dead", "items")

    def __init__(self) -> None:
        self.items: list[StoredMessage] = []
        self.dead = 0


class _Mailbox:
    __slots__ = ("by_id", "dead", "inflight", "name", "nbytes", "queue")

    def __init__(self, name: str) -> None:
        self.name = name  # every message of the mailbox shares this one string
        self.by_id: dict[str, StoredMessage] = {}
        self.queue: deque[StoredMessage] = deque()
        self.inflight: dict[str, StoredMessage] = {}
        self.nbytes = 0
        self.dead = 0


class MemoryStore:
    """Messages held in this process's memory. Fast, and gone when the process ends."""

    synchronous = True

    def __init__(self, limits: StoreLimits | None = None, *, clock: Clock = wall_clock_ms) -> None:
        self.limits = limits or StoreLimits()
        self._clock = clock
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

    def _index_expiry(self, msg: StoredMessage) -> None:
        key = msg.expires_at // 1000
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket()
            if key not in self._bucket_keys:
                self._bucket_keys.add(key)
                heapq.heappush(self._bucket_heap, key)
        bucket.items.append(msg)

    def _unindex_expiry(self, msg: StoredMessage) -> None:
        """Count ``msg`` dead in its bucket (it must already be, or be about to be, marked not alive)."""
        key = msg.expires_at // 1000
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.dead += 1
            if bucket.dead >= len(bucket.items):
                del self._buckets[key]
            elif bucket.dead >= _COMPACT_MIN_DEAD and 2 * bucket.dead > len(bucket.items):
                bucket.items = [m for m in bucket.items if m.alive and m is not msg]
                bucket.dead = 0

    def _remove(self, box: _Mailbox, msg: StoredMessage, *, in_queue: bool = True) -> None:
        """Forget a held message (ACK or expiry); keeps every index but the expiry buckets consistent.

        ``in_queue`` False means the caller has already popped it from the queue.
        """
        del box.by_id[msg.id]
        msg.alive = False
        size = len(msg.body)
        box.nbytes -= size
        self._total_bytes -= size
        self._total_messages -= 1
        if msg.inflight:
            del box.inflight[msg.id]
            self._inflight -= 1
        elif in_queue:
            box.dead += 1
        msg.body = b""  # a dead queue entry must not pin the body
        if not box.by_id:
            del self._mailboxes[msg.recipient]
        elif box.dead >= _COMPACT_MIN_DEAD and box.dead > len(box.by_id):
            box.queue = deque(m for m in box.queue if m.alive)
            box.dead = 0

    # ------------------------------------------------------------ Store interface

    async def enqueue_many(self, messages: Sequence[NewMessage]) -> list[list[int]]:
        now = self._clock()
        max_messages = self.limits.max_mailbox_messages
        max_box_bytes = self.limits.max_mailbox_bytes
        max_total_bytes = self.limits.max_total_bytes
        mailboxes = self._mailboxes
        stones = self._tombstones
        out: list[list[int]] = []
        for new in messages:
            mid = new.id
            size = len(new.body)
            outcomes: list[int] = []
            for rcpt in new.recipients:
                box = mailboxes.get(rcpt)
                held = box.by_id.get(mid) if box is not None else None
                if held is not None:
                    outcomes.append(DUPLICATE if held.sender == new.sender else ErrorCode.ID_CONFLICT)
                    continue
                if stones:
                    stone = stones.get((rcpt, mid))
                    if stone is not None:
                        if stone[1] > now:
                            outcomes.append(DUPLICATE if stone[0] == new.sender else ErrorCode.ID_CONFLICT)
                            continue
                        del stones[(rcpt, mid)]
                if box is None:
                    if size > max_box_bytes:
                        outcomes.append(ErrorCode.MAILBOX_BYTES_FULL)
                        continue
                elif len(box.by_id) >= max_messages:
                    outcomes.append(ErrorCode.MAILBOX_FULL)
                    continue
                elif box.nbytes + size > max_box_bytes:
                    outcomes.append(ErrorCode.MAILBOX_BYTES_FULL)
                    continue
                if self._total_bytes + size > max_total_bytes:
                    outcomes.append(ErrorCode.BROKER_FULL)
                    continue
                if box is None:
                    box = mailboxes[rcpt] = _Mailbox(rcpt)
                msg = StoredMessage(mid, new.sender, box.name, new.body, new.sent_at, new.expires_at)
                box.by_id[mid] = msg
                box.queue.append(msg)
                box.nbytes += size
                self._total_bytes += size
                self._total_messages += 1
                self._index_expiry(msg)
                outcomes.append(STORED)
            out.append(outcomes)
        return out

    async def fetch_many(self, mailbox: str, limit: int, max_bytes: int) -> Batch:
        box = self._mailboxes.get(mailbox)
        if box is None:
            return Batch([], 0, 0)
        now = self._clock()
        got: list[StoredMessage] = []
        nbytes = 0
        while box.queue and len(got) < limit:
            msg = box.queue[0]
            if got and nbytes + len(msg.body) > max_bytes:
                break
            box.queue.popleft()
            if not msg.alive:
                box.dead -= 1
                continue
            if msg.expires_at <= now:
                self._unindex_expiry(msg)
                self._remove(box, msg, in_queue=False)
                self._expired_total += 1
                if mailbox not in self._mailboxes:
                    break
                continue
            nbytes += len(msg.body)
            msg.inflight = True
            msg.attempt += 1
            box.inflight[msg.id] = msg
            got.append(msg)
        self._inflight += len(got)
        return Batch(got, len(box.by_id) - len(box.inflight), len(box.inflight))

    async def peek(self, mailbox: str, limit: int) -> list[StoredMessage]:
        box = self._mailboxes.get(mailbox)
        if box is None or limit <= 0:
            return []
        now = self._clock()
        out: list[StoredMessage] = []
        # In-flight messages were taken from the queue's head, so they are the oldest.
        for msg in box.inflight.values():
            if msg.expires_at > now:
                out.append(msg)
                if len(out) == limit:
                    return out
        for msg in box.queue:
            if msg.alive and msg.expires_at > now:
                out.append(msg)
                if len(out) == limit:
                    break
        return out

    async def ack_many(self, mailbox: str, ids: Sequence[str]) -> AckResult:
        box = self._mailboxes.get(mailbox)
        if box is None:
            return AckResult(0, 0)
        # The hot path of every delivered message: _unindex_expiry, _tombstone and _remove
        # inlined, with the running totals settled once per batch.
        by_id = box.by_id
        inflight = box.inflight
        buckets = self._buckets
        stones = self._tombstones
        max_stones = self.limits.max_tombstones
        deleted = nbytes = was_inflight = was_queued = 0
        for mid in ids:
            msg = by_id.pop(mid, None)
            if msg is None:
                continue
            msg.alive = False
            bucket = buckets.get(msg.expires_at // 1000)
            if bucket is not None:  # _unindex_expiry, inlined
                bucket.dead += 1
                if bucket.dead >= len(bucket.items):
                    del buckets[msg.expires_at // 1000]
                elif bucket.dead >= _COMPACT_MIN_DEAD and 2 * bucket.dead > len(bucket.items):
                    bucket.items = [m for m in bucket.items if m.alive]
                    bucket.dead = 0
            if max_stones:
                # A held id cannot be tombstoned already (enqueue refuses tombstoned ids), so this appends.
                stones[(mailbox, mid)] = (msg.sender, msg.expires_at)
                if len(stones) > max_stones:
                    stones.popitem(last=False)
            nbytes += len(msg.body)
            msg.body = b""  # a dead queue entry must not pin the body
            if msg.inflight:
                del inflight[mid]
                was_inflight += 1
            else:
                was_queued += 1
            deleted += 1
        if not deleted:
            return AckResult(0, len(inflight))
        box.nbytes -= nbytes
        box.dead += was_queued
        self._total_bytes -= nbytes
        self._total_messages -= deleted
        self._inflight -= was_inflight
        self._acknowledged_total += deleted
        if not by_id:
            del self._mailboxes[mailbox]
        elif box.dead >= _COMPACT_MIN_DEAD and box.dead > len(by_id):
            box.queue = deque(m for m in box.queue if m.alive)
            box.dead = 0
        return AckResult(deleted, len(inflight))

    async def release(self, mailbox: str) -> int:
        box = self._mailboxes.get(mailbox)
        if box is None or not box.inflight:
            return 0
        back = list(box.inflight.values())
        for msg in back:
            msg.inflight = False
        box.inflight.clear()
        box.queue.extendleft(reversed(back))
        self._inflight -= len(back)
        return len(back)

    async def pending(self, mailbox: str) -> int:
        box = self._mailboxes.get(mailbox)
        if box is None:
            return 0
        now = self._clock()
        # Expired messages are usually few (the sweeper removes them); count them out exactly.
        expired = 0
        for key in self._due_bucket_keys(now):
            expired += sum(
                1 for m in self._buckets[key].items if m.alive and m.recipient == mailbox and m.expires_at <= now
            )
        return len(box.by_id) - expired

    def _due_bucket_keys(self, now: int) -> list[int]:
        """Keys of live buckets holding messages that may be expired: O(due keys), by walking the heap."""
        due_second = now // 1000
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

    async def purge_expired(self) -> int:
        now = self._clock()
        heap = self._bucket_heap
        purged = 0
        while heap and heap[0] <= now // 1000:
            key = heap[0]
            bucket = self._buckets.get(key)
            if bucket is not None:
                later: list[StoredMessage] = []
                for msg in bucket.items:
                    if not msg.alive:
                        continue
                    if msg.expires_at <= now:
                        self._remove(self._mailboxes[msg.recipient], msg)
                        purged += 1
                    else:
                        later.append(msg)
                if later:  # the current second is only partly due: keep the rest for the next sweep
                    bucket.items = later
                    bucket.dead = 0
                    break
                del self._buckets[key]
            heapq.heappop(heap)
            self._bucket_keys.discard(key)
        # Tombstones are in ACK order, which is close to expiry order: drop the expired head.
        stones = self._tombstones
        while stones:
            stone, (_, expires_at) = next(iter(stones.items()))
            if expires_at > now:
                break
            del stones[stone]
        self._expired_total += purged
        return purged

    async def statistics(self) -> Mapping[str, int]:
        now = self._clock()
        unswept = sum(
            1 for key in self._due_bucket_keys(now) for m in self._buckets[key].items if m.alive and m.expires_at <= now
        )
        return {
            "messages_total": self._total_messages,
            "messages_deliverable": self._total_messages - unswept,
            "messages_expired_unswept": unswept,
            "acknowledged_total": self._acknowledged_total,
            "unique_recipients": len(self._mailboxes),
            "queued_bytes": self._total_bytes,
            "expired_total": self._expired_total,
            "tombstones": len(self._tombstones),
            "inflight": self._inflight,
        }

    async def aclose(self) -> None:
        self._mailboxes.clear()
        self._buckets.clear()
        self._bucket_heap.clear()
        self._bucket_keys.clear()
        self._tombstones.clear()
