"""The Redis store: messages held in Redis or Redis Cluster, shared by every broker node, kept across restarts.

Theory of operation. Every mailbox is a handful of Redis keys sharing one hash tag,
``{<prefix>:<mailbox>}``, so they live in one cluster slot and every operation on one
mailbox is one Lua script, atomic on a standalone server and on a cluster alike. The
semantics are the in-memory store's (:mod:`broker.store.memory`), checked by the same
contract suite; the scripts are written to make the same decisions in the same order.

Keys (``T`` = ``{prefix:mailbox}``, ``G`` = ``{prefix}``; TTL = Redis key expiry):

==============  =====  =========================================================  ======================
key             type   holds                                                      TTL
==============  =====  =========================================================  ======================
``T:meta``      hash   ``nb`` body bytes, ``sq`` last accept number,              latest message expiry
                       ``fo``/``fe`` the fence (owner, epoch)                     + margin
``T:m``         hash   id -> msgpack(sender, sent_at, expires_at, body[, 1]):     as ``T:meta``
                       every held message (queued or in flight), the body raw
                       bytes; a fifth field 1 if it was sent with notify
``T:a``         hash   id -> attempt (absent: 0)                                  as ``T:meta``
``T:q``         zset   queued ids, score = accept number (oldest first)           as ``T:meta``
``T:f``         zset   in-flight ids, score = accept number                       as ``T:meta``
``T:x``         zset   held ids, score = expires_at (the mailbox's expiry order)  as ``T:meta``
``T:t``         hash   tombstones: id -> msgpack(sender, expires_at)              raised to ``T:meta``'s
``T:o``         zset   tombstone ids, score = ACK order (oldest ACK first)        on each ACK
``T:s``         hash   the status lane: seq -> msgpack(state, at, id, recipient,  latest status expiry
                       count, first_seq, expires_at) (state 0-2 = delivered,      + margin
                       expired, overflow; id/recipient '' and count/first_seq 0
                       when unused)
``T:sq``        zset   the lane's seqs, score = seq (the lane's order)            as ``T:s``
``T:sx``        zset   the lane's seqs, score = expires_at                        as ``T:s``
``T:sm``        hash   ``sq`` the lane's newest seq, ``ov`` its overflow          as ``T:s``; once the
                       record's seq                                               lane is empty 60 s
``T:k``         string the mailbox's key record: expires_at (8 bytes, big-    the record's expiry
                       endian ms), ik, ek, sig (32 + 32 + 64 bytes), kid (ASCII)  + margin
``G:counters``  hash   relay-wide figures: bytes, messages, inflight,             none
                       tombstones, acknowledged, expired, mailboxes, statuses,
                       statuses_total, statuses_overflowed, statuses_expired,
                       and mailboxes by depth: ``depth_le_<bound>`` per bound of
                       MAILBOX_DEPTH_BOUNDS, ``depth_above``
``G:due``       zset   the expiry index: member ``<bucket>:<mailbox>``, score =   none
                       the bucket's start (ms); bucket = expires_at // 10 s
==============  =====  =========================================================  ======================

Scripts (each takes the mailbox's keys and ``now_ms`` where time is judged; no script
reads Redis's clock, so the broker's one clock decides, as with the memory store):

- ``enqueue``: one mailbox's part of a batch. Per message, in the memory store's order:
  held (``T:m``) -> DUPLICATE if the sender is the same, else ID_CONFLICT; tombstoned and
  not lapsed -> the same (a lapsed tombstone is dropped); MAILBOX_FULL; MAILBOX_BYTES_FULL;
  BROKER_FULL against the budget it was given (below); else stored at the tail. By pages of
  300 messages: one ``HMGET`` of the records and of the tombstones, one variadic write per
  key (a message stored earlier in the same call counts as held).
- ``fetch``: the fence, then the queue's head: expired messages are removed (counted
  expired), the rest move to ``T:f`` with attempt + 1 until ``limit`` or ``max_bytes``.
  The fence: a claim equal to ``fo``/``fe`` passes; a newer epoch first moves every
  in-flight id back to ``T:q`` (its accept number puts it back in order) and becomes the
  fence; anything else gets ``fenced`` and changes nothing.
  It works a page of the queue at a time (at most 256 ids): one ``HMGET`` of the records
  and of the attempts, then one variadic ``ZREM``/``ZADD``/``HSET`` per key for the page,
  not one command per message (Redis's CPU per message is mostly per-command overhead).
- ``release`` (the fence only): attempt - 1 for the unwritten ids, then in flight -> queue.
- ``ack``: deletes held ids (unknown ones ignored, one given twice counts once), tombstones
  each (at most ``max_tombstones`` per mailbox: the oldest ACK goes first); like ``fetch``,
  by pages of 500 ids with one read and one variadic write per key.
- ``purge``: one mailbox's expired messages by ``T:x`` (at most 5,000 a call; the sweep
  calls again while more are due), its expired tombstones from the oldest ACK on, and its
  lane's expired statuses by ``T:sx`` (at most 5,000 a call too).
- ``peek``, ``pending``, ``expired_count``: reads. ``sync`` and ``index``/``due``/``undue``
  work on ``G``'s keys.
- Notify: ``enqueue`` takes one flag string per call ('' when no message of it has notify,
  so plain messages pay one empty argument per call, nothing per message) and stores a
  fifth record field; ``fetch`` and ``peek`` return the positions of the notify messages
  they hand out; ``fetch``, ``ack`` and ``purge`` return (sender, id[, expires_at]) of the
  notify messages they remove, which the store makes into notices.
- ``status_add`` (one lane's notices of an ``add_statuses`` call; the calls for all lanes
  go in one pipeline with their index members, one round trip per shard), ``status_fetch``
  and ``status_ack``: the lane scripts, on the ``T:s*`` keys only (``purge`` gets both sets).
  ``status_add`` numbers records by the seq rule (:func:`~.base.next_status_seq`, the same
  formula in Lua) from ``T:sm``'s ``sq``, folds notices past ``max_mailbox_statuses`` into
  the overflow record (renumbered once per call, after the records the call kept), and
  sets every lane key's TTL to the lane's latest status expiry - ``now_ms`` + margin.
  Seqs are written with every digit (``%.0f``: below 2**53, exact as scores too).
A mailbox whose last message goes is deleted with its fence (the contract's "holds no
memory"); its tombstones stay until they lapse. A lane whose last status goes is deleted
but for ``T:sm``, which keeps the lane's newest seq for :data:`SEQ_MEMORY_MS` (60 s), so the
lane's next status is numbered above its old ones even by a node whose clock is behind
(by up to that much): the seq rule's ``last_seq``. (The memory store keeps one for all.)

Key records (``put_key``/``get_keys``) need no script: ``put_key`` is one ``SET`` with a key
expiry (PX) of ``ttl_ms`` + margin, and ``get_keys`` one pipeline of ``GET``s (one round trip
per shard), which judges each record's stored ``expires_at`` against ``now_ms``, so the
broker's clock decides as everywhere here; Redis key expiry then deletes the key (nothing
else holds memory for it; the sweep does not visit key records).

Key expiry is the backstop (for status lanes, see ``status_add`` above): the enqueue
script sets every mailbox key's TTL to the mailbox's latest ``expires_at`` - ``now_ms`` +
``expiry_margin_ms`` (relative to the broker's clock, so keys neither vanish nor linger
when that clock is not Redis's), and
scripts that create a key copy ``T:meta``'s TTL to it; an ACK extends the tombstone keys'
TTL to the mailbox's. So a mailbox nobody sweeps disappears by itself once everything
in it has expired, plus the margin (default 2 hours, above the 1-hour sweep interval, so
the sweep normally gets there first and keeps the counters right).

The expiry index ``G:due`` has one member per (10-second expiry bucket, mailbox) with a
message or a status that may expire in that bucket (``add_statuses`` adds members as
``enqueue_many`` does, in the same pipeline). The enqueue pipeline adds them (``ZADD NX``,
skipped for members this store added already: a bucket cannot be re-created once past),
before knowing whether the message is refused: an extra member only costs the sweep one
visit. :meth:`RedisStore.purge_expired` reads the due members in expiry order, purges
their mailboxes (one pipeline per page: one round trip per shard), and removes the
members whose whole bucket is past. On a cluster ``G:due`` lives on one shard: every
node's sweep and enqueues talk to that shard (a hot key, but one command per new
bucket and mailbox). If an index update is lost (a failed pipeline, a failover that lost
the last writes), the mailbox's expired messages are still never delivered (the fetch
script checks) and are removed by its next fetch; the sweep misses them, the statistics
do not count them as unswept, and the key TTL deletes the mailbox at last.

BROKER_FULL (``max_total_bytes``). No script can see every shard, so the relay-wide
byte count is a counter (``G:counters`` ``bytes``) that each store updates with its own
changes (below). Admission uses this node's view: the counter as last read plus this
node's changes since. An enqueue first re-reads the counter if the view is older than
``sync_interval_s`` (one extra round trip, at most 20 a second at the default 50 ms) or
if the batch's bodies do not fit the view. The sync rides along with any call once the
view is half that old, so under steady traffic the view never gets that old and SENDs pay
no extra round trip; only a node idle for ``sync_interval_s`` re-reads first. If they
fit, the batch goes in one pipeline with no byte check (nothing in it can be BROKER_FULL);
if not, it goes as runs of consecutive same-mailbox recipients, one round trip each, each
run's script given the remaining budget, so outcomes are exactly the memory store's for one node. So nothing
extra is paid until the relay is within one batch of full. Across nodes the view lags
by what the other nodes stored and have not flushed yet: the relay can overshoot by at
most what the other nodes stored in their last ``sync_interval_s`` (plus one batch
each). Freed bytes that are not flushed yet make the counter too high, never too low.

Statistics. Scripts return what they changed (bytes, messages, in flight, tombstones,
acknowledged, expired, mailboxes); the store adds these up locally and flushes them to
``G:counters`` with the ``sync`` script, which rides along in the next pipeline once
half of ``sync_interval_s`` has passed, and always in :meth:`RedisStore.flush` (for a timer: an
idle node's last changes otherwise wait for its next call), :meth:`RedisStore.statistics`
(which reads them back) and :meth:`RedisStore.aclose`. With one node they are exact. They
may drift when (a) a pipeline fails after Redis ran some of its scripts (their changes
are unknown here), (b) a node dies with changes not flushed (at most one interval's
worth), (c) Redis key expiry removes a mailbox the sweep did not reach (its bytes and
messages are never taken off), (d) Redis loses writes (no persistence, a failover). Other
nodes' figures are as fresh as their last flush. Mailbox depths (``mailbox_depths``) are counters of the same kind,
one per bucket of :data:`~.base.MAILBOX_DEPTH_BOUNDS`: every script that changes how many messages a mailbox holds
(enqueue, fetch removing expired ones, ack, purge) returns how many it holds afterwards, and the store moves the
mailbox from the bucket of its count before (after + what the script added or removed) to the bucket of its count
after in its local changes (nothing when both are in one bucket), flushed with the rest: O(1) per script call, no
extra command or round trip, and on a cluster the same as the byte counter (``G:counters`` on its one shard, each
node adding its own changes). They drift as the others do, and also for mailboxes that held messages when a broker
that did not count depths yet was replaced (such a mailbox is taken out of a bucket it was never counted in: a
bucket read below 0 shows 0). ``messages_expired_unswept`` is counted
at each call from the due mailboxes' ``T:x`` (exact when the index is complete), and
``messages_deliverable`` is the total minus that; the ``_total`` figures are relay-wide
since the counters were created (they survive broker restarts). ``max_tombstones`` is
enforced per mailbox here (a relay-wide oldest-first order would need an index across
slots), so the relay may hold up to that many per mailbox; each still lapses with its
message.

Round trips (:attr:`RedisStore.round_trips` counts pipelines and single calls; on a
cluster coredis 6.9 sends one pipeline to its shards one after another, so a pipeline
costs one network round trip per shard it touches): enqueue_many 1 (a pipeline of one
script per mailbox, plus new index members and the counter sync when due; +1 for a stale
view, above; near full, 1 + one per run); add_statuses 1 (one script per lane, the same
way); fetch_many, release, ack_many, peek, pending, fetch_statuses, ack_statuses 1;
purge_expired 1 + 2 per page of 500 due index members; statistics 2-3. Measured by
``tests/store/test_redis_store.py``: SENDs in batches of 50, fetches of 100, ACKs of 50 make
0.051 round trips per delivered-and-ACKed message. Calls that overlap share round trips: a
call made while one of this store's round trips is in flight waits for it and goes in the
next one, together with every other call made meanwhile, in the order they were made (the
first caller sends at once, so an idle store adds no wait). Each round trip costs the broker
a fixed ~0.2-0.4 ms of CPU here (coredis and trio: tasks, cancel scopes, the socket calls;
a bare socket round trip ~0.06 ms), far more than Redis spends on a script, so under load
the SEND, fetch and ACK calls of many sessions go in a few round trips, not one each
(RedisStore._run; every counted figure above is per call sequence without overlap).

Failures: every method raises :class:`~broker.redis_client.RedisUnavailable` (an
OSError) when Redis cannot be reached or cannot serve (:func:`~broker.redis_client.redis_errors`);
nothing is half-applied within one mailbox (each script is atomic), but a batch over
several mailboxes may be partly applied when the connection fails mid-pipeline. A
missing script (Redis restarted, SCRIPT FLUSH) is loaded again and its calls re-run.

The store does not own the client: the caller opens it (``open_redis``) and closes it
after :meth:`RedisStore.aclose`.
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Collection, Iterable, Sequence
from typing import Any

import coredis
import trio
from coredis.commands.script import Script
from coredis.exceptions import NoScriptError

from wire import KeyRecord, ReportState

from ..redis_client import redis_errors
from ..stats import STORE_CALL_BOUNDS_S, Histogram
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
)

__all__ = ["DEFAULT_EXPIRY_MARGIN_MS", "SYNC_INTERVAL_S", "RedisStore"]

DEFAULT_EXPIRY_MARGIN_MS = 2 * 3600 * 1000
"""Mailbox keys outlive their latest message by this much (above the broker's 1-hour sweep interval)."""
SYNC_INTERVAL_S = 0.05
"""The oldest view of the relay-wide counters an enqueue admits on; this node's changes are flushed (and the
relay's re-read) with its next call once half of this has passed."""
DUE_BUCKET_MS = 10_000
"""Width of an expiry-index bucket: one index member per mailbox per 10 s of expiry times."""
DUE_PAGE = 500
"""Index members the sweep takes per round."""
PURGE_CAP = 5000
"""Messages one purge script call removes at most (bounds how long one script blocks Redis)."""
INDEX_CACHE_MAX = 100_000
"""Index members this store remembers having added (beyond this it forgets them and adds again)."""
SEQ_MEMORY_MS = 60_000
"""How long an emptied status lane's newest seq outlives it (the seq rule's ``last_seq``): covers broker
clocks up to a minute apart, and a lane whose seqs ran that far ahead of the clock (60 million statuses)."""

log = logging.getLogger(__name__)

_COUNTERS = (
    "bytes",
    "messages",
    "inflight",
    "tombstones",
    "acknowledged",
    "expired",
    "mailboxes",
    "statuses",
    "statuses_total",
    "statuses_overflowed",
    "statuses_expired",
    *(f"depth_le_{bound}" for bound in MAILBOX_DEPTH_BOUNDS),
    "depth_above",
)
(
    _BYTES,
    _MESSAGES,
    _INFLIGHT,
    _TOMBSTONES,
    _ACKED,
    _EXPIRED,
    _MAILBOXES,
    _STATUSES,
    _STATUSES_TOTAL,
    _STATUSES_OVERFLOWED,
    _STATUSES_EXPIRED,
) = range(len(_COUNTERS) - len(MAILBOX_DEPTH_BOUNDS) - 1)
_DEPTHS = len(_COUNTERS) - len(MAILBOX_DEPTH_BOUNDS) - 1
"""The index of the first depth bucket's counter (``depth_le_1``); the buckets' counters follow it, in order."""

_STATES = (ReportState.DELIVERED, ReportState.EXPIRED, ReportState.OVERFLOW)
"""The status scripts' state codes 0-2 (their DELIVERED, EXPIRED, OVERFLOW locals)."""
_STATE_CODES = {state: code for code, state in enumerate(_STATES)}

_OUTCOMES = (
    Outcome.STORED,
    Outcome.DUPLICATE,
    Outcome.ID_CONFLICT,
    Outcome.MAILBOX_FULL,
    Outcome.MAILBOX_BYTES_FULL,
    Outcome.BROKER_FULL,
)
"""The enqueue script's result codes 0-5 (its STORED .. BROKER_FULL locals)."""

_NOTHING = Batch((), 0, 0)
_FENCED = Batch((), 0, 0, fenced=True)

# ------------------------------------------------------------------ Lua

_MAILBOX_KEYS = ("meta", "m", "a", "q", "f", "x", "t", "o")

_PRELUDE = """
local META, MSGS, ATT, QUEUE, FLIGHT, EXP, STONES, ORDER =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]

local function forget_if_empty()
  if redis.call('HLEN', MSGS) == 0 then
    redis.call('DEL', META, MSGS, ATT, QUEUE, FLIGHT, EXP)
    return 1
  end
  return 0
end

-- After removing `removed` messages of `nbytes` body bytes: forget the mailbox if it is empty, else take the
-- bytes off its count (never HINCRBY by -0: Lua writes "-0", which Redis refuses). Returns 1 if forgotten.
local function settle_removed(removed, nbytes)
  if removed == 0 then return 0 end
  local emptied = forget_if_empty()
  if emptied == 0 and nbytes > 0 then redis.call('HINCRBY', META, 'nb', -nbytes) end
  return emptied
end

local function requeue()
  local items = redis.call('ZRANGE', FLIGHT, 0, -1, 'WITHSCORES')
  for i = 1, #items, 1000 do
    local args = {}
    for j = i, math.min(i + 999, #items - 1), 2 do
      args[#args + 1] = items[j + 1]
      args[#args + 1] = items[j]
    end
    redis.call('ZADD', QUEUE, unpack(args))
  end
  redis.call('DEL', FLIGHT)
  return #items / 2
end

local function copy_ttl(keys)
  local ttl = redis.call('PTTL', META)
  if ttl > 0 then
    for _, k in ipairs(keys) do redis.call('PEXPIRE', k, ttl) end
  end
end

local function is_fence(owner, epoch)
  local fence = redis.call('HMGET', META, 'fo', 'fe')
  return fence[1] == owner and tonumber(fence[2]) == epoch, fence
end

local function drop(id, body)
  redis.call('HDEL', MSGS, id)
  redis.call('HDEL', ATT, id)
  redis.call('ZREM', EXP, id)
  if redis.call('ZREM', FLIGHT, id) == 1 then return 1 end
  redis.call('ZREM', QUEUE, id)
  return 0
end
"""

_LANE_KEYS = ("s", "sq", "sx", "sm")
_KEY_KEYS = ("k",)
_KEY_EXPIRY = struct.Struct(">Q")
"""The expires_at (epoch ms) at the head of a ``T:k`` value."""


def _lane_prelude(offset: int) -> str:
    """The status lane's keys (``KEYS[offset + 1 ..]``) and the helpers its scripts share."""
    return (
        f"""
local SREC, SSEQ, SEXP, SMETA = KEYS[{offset + 1}], KEYS[{offset + 2}], KEYS[{offset + 3}], KEYS[{offset + 4}]
local SEQ_MEMORY_MS = {SEQ_MEMORY_MS}
"""
        + """
-- A seq as a field name and score: every digit (Lua's own tostring would write 1.8e+15).
local function seqstr(n) return string.format('%.0f', n) end

-- After records were removed: forget a lane left empty, keeping only its newest seq (SMETA's 'sq') for
-- SEQ_MEMORY_MS, so that the next status still gets a seq above every seq the lane had (the seq rule).
local function settle_lane()
  if redis.call('HLEN', SREC) > 0 then return end
  redis.call('DEL', SREC, SSEQ, SEXP)
  redis.call('HDEL', SMETA, 'ov')
  redis.call('PEXPIRE', SMETA, SEQ_MEMORY_MS)
end

-- Remove the records of these seqs (strings, each once); returns how many were held. Settles the lane.
local function drop_statuses(seqs)
  local ov = redis.call('HGET', SMETA, 'ov')
  local held = 0
  for i = 1, #seqs, 1000 do
    local page = {unpack(seqs, i, math.min(i + 999, #seqs))}
    held = held + redis.call('HDEL', SREC, unpack(page))
    redis.call('ZREM', SSEQ, unpack(page))
    redis.call('ZREM', SEXP, unpack(page))
    if ov then
      for _, seq in ipairs(page) do
        if seq == ov then redis.call('HDEL', SMETA, 'ov') ov = nil break end
      end
    end
  end
  settle_lane()
  return held
end
"""
    )


_ENQUEUE = (
    _PRELUDE
    + """
local STORED, DUPLICATE, ID_CONFLICT, MAILBOX_FULL, MAILBOX_BYTES_FULL, BROKER_FULL = 0, 1, 2, 3, 4, 5
local ENQUEUE_PAGE = 300
local now, margin = tonumber(ARGV[1]), tonumber(ARGV[2])
local max_msgs, max_bytes, budget = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local flags = ARGV[6]  -- '' (no message of the call has notify) or one '0'/'1' per message
local count = redis.call('HLEN', MSGS)
local nb, sq = 0, 0
if count > 0 then
  local v = redis.call('HMGET', META, 'nb', 'sq')
  nb, sq = tonumber(v[1]) or 0, tonumber(v[2]) or 0
else
  redis.call('DEL', META, ATT, QUEUE, FLIGHT, EXP)
end
local was_empty = count == 0
local out = {}
local stored, stored_bytes, stones_dropped = 0, 0, 0
local added, unstoned = {}, {}  -- id -> sender of what this call stored; ids whose lapsed tombstone it dropped
-- Pages of messages: one read of the records and tombstones and one write per key for each page.
for first = 7, #ARGV, 5 * ENQUEUE_PAGE do
  local last_arg = math.min(first + 5 * ENQUEUE_PAGE - 1, #ARGV)
  local names = {}
  for i = first, last_arg, 5 do names[#names + 1] = ARGV[i] end
  local held = redis.call('HMGET', MSGS, unpack(names))
  local stones = redis.call('HMGET', STONES, unpack(names))
  local records, queued, expiring = {}, {}, {}
  for k = 1, #names do
    local i = first + 5 * (k - 1)
    local id, sender, body = ARGV[i], ARGV[i + 1], ARGV[i + 4]
    local code = nil
    local by = added[id]
    if not by and held[k] then by = cmsgpack.unpack(held[k]) end
    if by then
      if by == sender then code = DUPLICATE else code = ID_CONFLICT end
    elseif stones[k] and not unstoned[id] then
      local stoned_by, lapses = cmsgpack.unpack(stones[k])
      if lapses > now then
        if stoned_by == sender then code = DUPLICATE else code = ID_CONFLICT end
      else
        redis.call('HDEL', STONES, id)
        redis.call('ZREM', ORDER, id)
        unstoned[id] = true
        stones_dropped = stones_dropped + 1
      end
    end
    if not code then
      local size = #body
      if count > 0 and count >= max_msgs then code = MAILBOX_FULL
      elseif nb + size > max_bytes then code = MAILBOX_BYTES_FULL
      elseif budget >= 0 and stored_bytes + size > budget then code = BROKER_FULL
      else
        local expires_at = tonumber(ARGV[i + 3])
        local n = (i - 7) / 5 + 1
        records[#records + 1] = id
        if flags ~= '' and string.byte(flags, n) == 49 then  -- '1': a fifth field, notify
          records[#records + 1] = cmsgpack.pack(sender, tonumber(ARGV[i + 2]), expires_at, body, 1)
        else
          records[#records + 1] = cmsgpack.pack(sender, tonumber(ARGV[i + 2]), expires_at, body)
        end
        sq = sq + 1
        queued[#queued + 1] = sq
        queued[#queued + 1] = id
        expiring[#expiring + 1] = expires_at
        expiring[#expiring + 1] = id
        added[id] = sender
        count, nb = count + 1, nb + size
        stored, stored_bytes = stored + 1, stored_bytes + size
        code = STORED
      end
    end
    out[#out + 1] = code
  end
  if #records > 0 then
    redis.call('HSET', MSGS, unpack(records))
    redis.call('ZADD', QUEUE, unpack(queued))
    redis.call('ZADD', EXP, unpack(expiring))
  end
end
if stored > 0 then
  redis.call('HSET', META, 'nb', nb, 'sq', sq)
  local last = tonumber(redis.call('ZRANGE', EXP, -1, -1, 'WITHSCORES')[2])
  local ttl = math.max(last - now, 0) + margin
  for _, k in ipairs({META, MSGS, ATT, QUEUE, FLIGHT, EXP}) do redis.call('PEXPIRE', k, ttl) end
end
local created = 0
if was_empty and stored > 0 then created = 1 end
return {created, stored, stored_bytes, stones_dropped, out, count}
"""
)

_FETCH = (
    _PRELUDE
    + """
local now, owner, epoch = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local limit, max_bytes = tonumber(ARGV[4]), tonumber(ARGV[5])
if redis.call('HLEN', MSGS) == 0 then return {0, 0, 0, 0, 0, 0, 0, {}, {}, {}} end
local requeued = 0
local same, fence = is_fence(owner, epoch)
if not same then
  if fence[1] then
    if epoch <= tonumber(fence[2]) then return {1, 0, 0, 0, 0, 0, 0, {}, {}, {}} end
    requeued = requeue()
  end
  redis.call('HSET', META, 'fo', owner, 'fe', ARGV[3])
end
local got, ngot, nbytes, expired, expired_bytes = {}, 0, 0, 0, 0
local notified, notices = {}, {}  -- positions in got of messages with notify; (sender, id, expires_at) expired
local full = false
while ngot < limit and not full do
  local ids = redis.call('ZRANGE', QUEUE, 0, math.min(limit - ngot, 256) - 1, 'WITHSCORES')
  if #ids == 0 then break end
  local names = {}
  for i = 1, #ids, 2 do names[#names + 1] = ids[i] end
  -- One read of the records and attempts, and one write per key, for the whole page.
  local recs = redis.call('HMGET', MSGS, unpack(names))
  local attempts = redis.call('HMGET', ATT, unpack(names))
  local dequeued, flight, counted = {}, {}, {}
  for k = 1, #names do
    local id, rec = names[k], recs[k]
    if not rec then
      dequeued[#dequeued + 1] = id
    else
      local sender, sent_at, expires_at, body, notify = cmsgpack.unpack(rec)
      if expires_at <= now then
        drop(id, body)
        expired, expired_bytes = expired + 1, expired_bytes + #body
        if notify then
          notices[#notices + 1] = sender
          notices[#notices + 1] = id
          notices[#notices + 1] = expires_at
        end
      elseif ngot > 0 and nbytes + #body > max_bytes then
        full = true
        break
      else
        local attempt = (tonumber(attempts[k]) or 0) + 1
        dequeued[#dequeued + 1] = id
        flight[#flight + 1] = ids[2 * k]
        flight[#flight + 1] = id
        counted[#counted + 1] = id
        counted[#counted + 1] = attempt
        ngot, nbytes = ngot + 1, nbytes + #body
        for _, v in ipairs({id, sender, sent_at, expires_at, attempt, body}) do got[#got + 1] = v end
        if notify then notified[#notified + 1] = ngot end
      end
    end
  end
  if #dequeued > 0 then redis.call('ZREM', QUEUE, unpack(dequeued)) end
  if #flight > 0 then
    redis.call('ZADD', FLIGHT, unpack(flight))
    redis.call('HSET', ATT, unpack(counted))
  end
end
local emptied = settle_removed(expired, expired_bytes)
if ngot > 0 or requeued > 0 then copy_ttl({FLIGHT, ATT, QUEUE}) end
local inflight = redis.call('ZCARD', FLIGHT)
return {0, redis.call('HLEN', MSGS) - inflight, inflight, ngot - requeued, expired, expired_bytes, emptied, got,
  notified, notices}
"""
)

_RELEASE = (
    _PRELUDE
    + """
if redis.call('ZCARD', FLIGHT) == 0 then return 0 end
if not is_fence(ARGV[1], tonumber(ARGV[2])) then return 0 end
for i = 3, #ARGV do
  if redis.call('ZSCORE', FLIGHT, ARGV[i]) then
    if redis.call('HINCRBY', ATT, ARGV[i], -1) <= 0 then redis.call('HDEL', ATT, ARGV[i]) end
  end
end
local n = requeue()
copy_ttl({QUEUE})
return n
"""
)

_ACK = (
    _PRELUDE
    + """
local ACK_PAGE = 500
local max_stones = tonumber(ARGV[1])
if redis.call('HLEN', MSGS) == 0 then return {0, 0, 0, 0, 0, 0, 0, {}} end
local deleted, nbytes, was_inflight, stones = 0, 0, 0, 0
local notified = {}  -- (sender, id) of the deleted messages with notify
local seq = 0
if max_stones > 0 then seq = tonumber(redis.call('ZRANGE', ORDER, -1, -1, 'WITHSCORES')[2]) or 0 end
local seen = {}
-- Pages of ids: one read of the records and one write per key for each (an id given twice counts once).
for first = 2, #ARGV, ACK_PAGE do
  local names = {}
  for i = first, math.min(first + ACK_PAGE - 1, #ARGV) do names[#names + 1] = ARGV[i] end
  local recs = redis.call('HMGET', MSGS, unpack(names))
  local gone, stone_args, order_args = {}, {}, {}
  for k = 1, #names do
    local id, rec = names[k], recs[k]
    if rec and not seen[id] then
      seen[id] = true
      local sender, _, expires_at, body, notify = cmsgpack.unpack(rec)
      gone[#gone + 1] = id
      if notify then
        notified[#notified + 1] = sender
        notified[#notified + 1] = id
      end
      deleted, nbytes = deleted + 1, nbytes + #body
      if max_stones > 0 then
        stone_args[#stone_args + 1] = id
        stone_args[#stone_args + 1] = cmsgpack.pack(sender, expires_at)
        seq = seq + 1
        order_args[#order_args + 1] = seq
        order_args[#order_args + 1] = id
      end
    end
  end
  if #gone > 0 then
    redis.call('HDEL', MSGS, unpack(gone))
    redis.call('HDEL', ATT, unpack(gone))
    redis.call('ZREM', EXP, unpack(gone))
    local in_flight = redis.call('ZREM', FLIGHT, unpack(gone))
    was_inflight = was_inflight + in_flight
    if in_flight < #gone then redis.call('ZREM', QUEUE, unpack(gone)) end
    if max_stones > 0 then
      stones = stones + redis.call('HSET', STONES, unpack(stone_args))
      redis.call('ZADD', ORDER, unpack(order_args))
    end
  end
end
if deleted > 0 and max_stones > 0 then
  local over = redis.call('ZCARD', ORDER) - max_stones
  if over > 0 then
    local old = redis.call('ZPOPMIN', ORDER, over)
    for j = 1, #old, 2 do stones = stones - redis.call('HDEL', STONES, old[j]) end
  end
  local ttl = redis.call('PTTL', META)
  for _, k in ipairs({STONES, ORDER}) do
    if ttl > 0 and redis.call('PTTL', k) < ttl then redis.call('PEXPIRE', k, ttl) end
  end
end
local emptied = settle_removed(deleted, nbytes)
return {deleted, redis.call('ZCARD', FLIGHT), nbytes, was_inflight, stones, emptied, redis.call('HLEN', MSGS), notified}
"""
)

_PURGE = (
    _PRELUDE
    + _lane_prelude(len(_MAILBOX_KEYS))
    + """
local now, cap = tonumber(ARGV[1]), tonumber(ARGV[2])
local ids = redis.call('ZRANGE', EXP, '-inf', now, 'BYSCORE', 'LIMIT', 0, cap)
local removed, nbytes, was_inflight = 0, 0, 0
local notices = {}  -- (sender, id, expires_at) of the removed messages with notify
for _, id in ipairs(ids) do
  local rec = redis.call('HGET', MSGS, id)
  if rec then
    local sender, _, expires_at, body, notify = cmsgpack.unpack(rec)
    was_inflight = was_inflight + drop(id, body)
    removed, nbytes = removed + 1, nbytes + #body
    if notify then
      notices[#notices + 1] = sender
      notices[#notices + 1] = id
      notices[#notices + 1] = expires_at
    end
  else
    redis.call('ZREM', EXP, id)
  end
end
local emptied = settle_removed(removed, nbytes)
local dropped = 0
local stop = false
while not stop do
  local head = redis.call('ZRANGE', ORDER, 0, 99)
  if #head == 0 then break end
  for _, id in ipairs(head) do
    local stone = redis.call('HGET', STONES, id)
    if stone then
      local _, lapses = cmsgpack.unpack(stone)
      if lapses > now then stop = true break end
      redis.call('HDEL', STONES, id)
      dropped = dropped + 1
    end
    redis.call('ZREM', ORDER, id)
  end
end
local statuses = redis.call('ZRANGE', SEXP, '-inf', now, 'BYSCORE', 'LIMIT', 0, cap)
local statuses_expired = 0
if #statuses > 0 then statuses_expired = drop_statuses(statuses) end
local more = 0
if #ids == cap or #statuses == cap then more = 1 end
return {removed, nbytes, was_inflight, emptied, dropped, more, statuses_expired, redis.call('HLEN', MSGS), notices}
"""
)

_PEEK = (
    _PRELUDE
    + """
local now, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local out, n, notified = {}, 0, {}
for _, key in ipairs({FLIGHT, QUEUE}) do
  local start = 0
  while n < limit do
    local ids = redis.call('ZRANGE', key, start, start + 99)
    if #ids == 0 then break end
    start = start + #ids
    for _, id in ipairs(ids) do
      local rec = redis.call('HGET', MSGS, id)
      if rec then
        local sender, sent_at, expires_at, body, notify = cmsgpack.unpack(rec)
        if expires_at > now then
          local attempt = tonumber(redis.call('HGET', ATT, id)) or 0
          for _, v in ipairs({id, sender, sent_at, expires_at, attempt, body}) do out[#out + 1] = v end
          n = n + 1
          if notify then notified[#notified + 1] = n end
          if n == limit then break end
        end
      end
    end
  end
end
return {out, notified}
"""
)

_PENDING = (
    _PRELUDE
    + """
return redis.call('HLEN', MSGS) - redis.call('ZCOUNT', EXP, '-inf', ARGV[1])
"""
)

_EXPIRED_COUNT = (
    _PRELUDE
    + """
return redis.call('ZCOUNT', EXP, '-inf', ARGV[1])
"""
)

_STATUS_ADD = (
    _lane_prelude(0)
    + """
local STATUS_PAGE = 500
local DELIVERED, EXPIRED, OVERFLOW = 0, 1, 2
local now, ttl, margin, bound = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local meta = redis.call('HMGET', SMETA, 'sq', 'ov')
local last, ov = tonumber(meta[1]) or 0, meta[2]
local held = redis.call('HLEN', SREC)
if held == 0 then
  redis.call('DEL', SREC, SSEQ, SEXP)  -- a forgotten lane: nothing left but maybe its newest seq
  redis.call('HDEL', SMETA, 'ov')
  ov = false
end
local ordinary = held
if ov then ordinary = held - 1 end
local expires = now + ttl
-- The seq rule (broker.store.base.next_status_seq): max(last + 1, now * 1000).
local function next_seq()
  last = math.max(last + 1, now * 1000)
  return last
end
local kept, folded = 0, 0
for first = 5, #ARGV, 4 * STATUS_PAGE do
  local recs, seqs, exps = {}, {}, {}
  for i = first, math.min(first + 4 * STATUS_PAGE - 1, #ARGV), 4 do
    if ordinary < bound then
      local s = seqstr(next_seq())
      recs[#recs + 1] = s
      recs[#recs + 1] = cmsgpack.pack(tonumber(ARGV[i]), tonumber(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 3], 0, 0, expires)
      seqs[#seqs + 1] = s
      seqs[#seqs + 1] = s
      exps[#exps + 1] = expires
      exps[#exps + 1] = s
      ordinary, kept = ordinary + 1, kept + 1
    else
      folded = folded + 1
    end
  end
  if #recs > 0 then
    redis.call('HSET', SREC, unpack(recs))
    redis.call('ZADD', SSEQ, unpack(seqs))
    redis.call('ZADD', SEXP, unpack(exps))
  end
end
local change = kept
if folded > 0 then
  -- The lane's one overflow record: made with count 1, else grown; renumbered (newest in the lane) either way.
  local count, first_seq = folded, nil
  if ov then
    local rec = redis.call('HGET', SREC, ov)
    if rec then
      local _, _, _, _, c, f = cmsgpack.unpack(rec)
      count, first_seq = count + c, f
      redis.call('HDEL', SREC, ov)
      redis.call('ZREM', SSEQ, ov)
      redis.call('ZREM', SEXP, ov)
      change = change - 1
    end
  end
  local seq = next_seq()
  local s = seqstr(seq)
  if not first_seq then first_seq = seq end
  redis.call('HSET', SREC, s, cmsgpack.pack(OVERFLOW, now, '', '', count, first_seq, expires))
  redis.call('ZADD', SSEQ, s, s)
  redis.call('ZADD', SEXP, expires, s)
  redis.call('HSET', SMETA, 'ov', s)
  change = change + 1
end
redis.call('HSET', SMETA, 'sq', seqstr(last))
local latest = tonumber(redis.call('ZRANGE', SEXP, -1, -1, 'WITHSCORES')[2])
local keep = math.max(latest - now, 0) + margin
for _, k in ipairs({SREC, SSEQ, SEXP, SMETA}) do redis.call('PEXPIRE', k, keep) end
return {change, folded}
"""
)

_STATUS_FETCH = (
    _lane_prelude(0)
    + """
local now, limit = tonumber(ARGV[1]), tonumber(ARGV[3])
local low = '(' .. ARGV[2]
local out, n, expired = {}, 0, {}
while n < limit do
  local seqs = redis.call('ZRANGE', SSEQ, low, '+inf', 'BYSCORE', 'LIMIT', 0, math.min(limit - n, 256))
  if #seqs == 0 then break end
  local recs = redis.call('HMGET', SREC, unpack(seqs))
  for k = 1, #seqs do
    local rec = recs[k]
    if rec then
      local state, at, id, recipient, count, first_seq, expires_at = cmsgpack.unpack(rec)
      if expires_at <= now then
        expired[#expired + 1] = seqs[k]
      else
        for _, v in ipairs({seqs[k], state, at, id, recipient, count, first_seq, expires_at}) do out[#out + 1] = v end
        n = n + 1
      end
    end
  end
  low = '(' .. seqs[#seqs]
end
local removed = 0
if #expired > 0 then removed = drop_statuses(expired) end
return {removed, out}
"""
)

_STATUS_ACK = (
    _lane_prelude(0)
    + """
if redis.call('HLEN', SREC) == 0 then return 0 end
local seen, seqs = {}, {}
for i = 1, #ARGV do
  if not seen[ARGV[i]] then
    seen[ARGV[i]] = true
    seqs[#seqs + 1] = ARGV[i]
  end
end
return drop_statuses(seqs)
"""
)

_SYNC = """
for i = 1, #ARGV, 2 do
  local d = tonumber(ARGV[i + 1])
  if d ~= 0 then redis.call('HINCRBY', KEYS[1], ARGV[i], d) end
end
local fields = {}
for i = 1, #ARGV, 2 do fields[#fields + 1] = ARGV[i] end
local v = redis.call('HMGET', KEYS[1], unpack(fields))
for i = 1, #v do v[i] = tonumber(v[i]) or 0 end
return v
"""

_INDEX = """
for i = 1, #ARGV, 2 do redis.call('ZADD', KEYS[1], 'NX', ARGV[i], ARGV[i + 1]) end
return 0
"""

_DUE = """
return redis.call('ZRANGE', KEYS[1], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', ARGV[2], ARGV[3])
"""

_UNDUE = """
for i = 1, #ARGV, 500 do redis.call('ZREM', KEYS[1], unpack(ARGV, i, math.min(i + 499, #ARGV))) end
return 0
"""

_SCRIPTS = {
    "enqueue": _ENQUEUE,
    "fetch": _FETCH,
    "release": _RELEASE,
    "ack": _ACK,
    "purge": _PURGE,
    "peek": _PEEK,
    "pending": _PENDING,
    "expired_count": _EXPIRED_COUNT,
    "sync": _SYNC,
    "index": _INDEX,
    "due": _DUE,
    "undue": _UNDUE,
    "status_add": _STATUS_ADD,
    "status_fetch": _STATUS_FETCH,
    "status_ack": _STATUS_ACK,
}

# ------------------------------------------------------------------ Python

Call = tuple[Script[bytes], Sequence[str], Sequence[Any]]
"""One script call: the script, its keys, its arguments."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _messages(mailbox: str, flat: Sequence[Any], notified: Sequence[Any]) -> list[Message]:
    """Messages from a script's flat list of (id, sender, sent_at, expires_at, attempt, body) sextets;
    ``notified`` the (1-based) positions of those stored with notify."""
    out = [
        Message(
            _text(flat[i]),
            _text(flat[i + 1]),
            mailbox,
            bytes(flat[i + 5]),
            int(flat[i + 2]),
            int(flat[i + 3]),
            int(flat[i + 4]),
        )
        for i in range(0, len(flat), 6)
    ]
    for k in notified:
        out[int(k) - 1] = out[int(k) - 1]._replace(notify=True)
    return out


def _expired_notices(recipient: str, flat: Sequence[Any]) -> list[Notice]:
    """EXPIRED notices from a script's flat list of (sender, id, expires_at) triples."""
    return [
        Notice(_text(flat[i]), _text(flat[i + 1]), recipient, ReportState.EXPIRED, int(flat[i + 2]))
        for i in range(0, len(flat), 3)
    ]


def _statuses(flat: Sequence[Any]) -> list[HeldStatus]:
    """Records from the status_fetch script's flat list of octets
    (seq, state, at, id, recipient, count, first_seq, expires_at; id and recipient '' and count 0 when unused)."""
    out = []
    for i in range(0, len(flat), 8):
        state = _STATES[int(flat[i + 1])]
        seq, at, expires_at = int(flat[i]), int(flat[i + 2]), int(flat[i + 7])
        if state is ReportState.OVERFLOW:
            out.append(HeldStatus(seq, state, at, None, None, int(flat[i + 5]), expires_at, int(flat[i + 6])))
        else:
            out.append(HeldStatus(seq, state, at, _text(flat[i + 3]), _text(flat[i + 4]), None, expires_at))
    return out


class _Queued:
    """One caller's script calls waiting for a round trip, and what became of them."""

    __slots__ = ("calls", "done", "error", "results", "sync", "turn")

    def __init__(self, calls: Sequence[Call], sync: bool) -> None:
        self.calls = calls
        self.sync = sync
        self.turn = trio.Event()
        """Set when the calls are done, or when this caller is to send the next round trip."""
        self.done = False
        self.results: list[Any] = []
        self.error: BaseException | None = None


class RedisStore:
    """Messages held in Redis (standalone or cluster) through an open coredis client. See the module docstring."""

    synchronous = False

    def __init__(
        self,
        client: coredis.Redis[bytes] | coredis.RedisCluster[bytes],
        limits: StoreLimits | None = None,
        *,
        prefix: str = "relay",
        expiry_margin_ms: int = DEFAULT_EXPIRY_MARGIN_MS,
        sync_interval_s: float = SYNC_INTERVAL_S,
    ) -> None:
        """Raises ValueError for a prefix that is empty or holds a brace (it would break the hash tags)."""
        if not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"a Redis key prefix must be non-empty and without braces, not {prefix!r}")
        if expiry_margin_ms <= 0:
            raise ValueError("expiry_margin_ms must be positive")
        self.client = client
        self.limits = limits or StoreLimits()
        self.prefix = prefix
        self.expiry_margin_ms = expiry_margin_ms
        self.sync_interval_s = sync_interval_s
        self.round_trips = 0
        """Redis round trips so far: pipelines and single calls (a cluster pipeline: one per shard it touches)."""
        self.call_latency = Histogram(STORE_CALL_BOUNDS_S)
        """Seconds per round trip of this store's calls (pipelines and single calls, failed ones too)."""
        self._scripts = {name: client.register_script(text) for name, text in _SCRIPTS.items()}
        self._counters_key = f"{{{prefix}}}:counters"
        self._due_key = f"{{{prefix}}}:due"
        self._deltas = [0] * len(_COUNTERS)
        """This node's changes to the relay-wide counters not flushed yet."""
        self._known = [0] * len(_COUNTERS)
        """The relay-wide counters as last read (the changes above not included)."""
        self._last_sync = -math.inf
        self._indexed: dict[int, set[str]] = {}
        """bucket -> mailboxes whose index member this store has added."""
        self._indexed_count = 0
        self._queue: list[_Queued] = []
        """Calls waiting for the next round trip (see :meth:`_run`)."""
        self._sending = False
        """A round trip is in flight (or its successor is about to be sent)."""

    # ------------------------------------------------------------ plumbing

    def _keys(self, mailbox: str, suffixes: Sequence[str] = _MAILBOX_KEYS) -> list[str]:
        tag = f"{{{self.prefix}:{mailbox}}}"
        return [f"{tag}:{suffix}" for suffix in suffixes]

    def _call(self, name: str, mailbox: str, args: Sequence[Any]) -> Call:
        return (self._scripts[name], self._keys(mailbox), args)

    def _lane_call(self, name: str, mailbox: str, args: Sequence[Any]) -> Call:
        return (self._scripts[name], self._keys(mailbox, _LANE_KEYS), args)

    def _sync_call(self, deltas: Sequence[int]) -> Call:
        args: list[Any] = []
        for field, delta in zip(_COUNTERS, deltas, strict=True):
            args += (field, delta)
        return (self._scripts["sync"], [self._counters_key], args)

    async def _pipeline(self, calls: Sequence[Call]) -> list[Any]:
        """Send ``calls`` in one non-transactional pipeline; each result or its error, in order."""
        began = trio.current_time()
        try:
            async with self.client.pipeline(transaction=False, raise_on_error=False) as pipe:
                for script, keys, args in calls:
                    pipe.evalsha(script.sha, keys=keys, args=args)
        finally:
            self.call_latency.observe(trio.current_time() - began)
        self.round_trips += 1
        return list(pipe.results or ())

    async def _load_scripts(self) -> None:
        for script in self._scripts.values():
            await self.client.script_load(script.script)
            self.round_trips += 1

    async def _run(self, calls: Sequence[Call], *, sync: bool = False) -> list[Any]:
        """Run script calls in one round trip (again for any whose script Redis lost); their results.

        Calls made while another round trip is in flight wait for it and then go together, in the order
        they were made, in the next one (module docstring, "Round trips"): the first caller sends at once.
        The counter sync rides along when it is due (or ``sync``). Raises RedisUnavailable (OSError), or
        the error of the first of ``calls`` that failed. Shielded from cancellation (bounded by the
        client's command timeout): once the scripts are sent their changes happen, so their results are
        always read and counted, even when the caller's session is being cancelled (a client that cut its
        connection mid-SEND).
        """
        queued = _Queued(calls, sync)
        self._queue.append(queued)
        with trio.CancelScope(shield=True):
            if self._sending:
                await queued.turn.wait()  # done by the round trip in flight, or told to send the next one
            if not queued.done:
                await self._send_queued()
        if queued.error is not None:
            raise queued.error
        return queued.results

    async def _send_queued(self) -> None:
        """Send every queued call in one pipeline and hand each caller its results (or error); then wake the
        first caller queued meanwhile, which sends the next round trip."""
        batch, self._queue = self._queue, []
        self._sending = True
        try:
            calls = [call for queued in batch for call in queued.calls]
            do_sync = self._sync_due() or any(queued.sync for queued in batch)
            deltas = self._deltas
            if do_sync:
                self._deltas = [0] * len(_COUNTERS)
                calls.append(self._sync_call(deltas))
            try:
                with redis_errors():
                    results = await self._pipeline(calls)
                    missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
                    if missing:
                        await self._load_scripts()
                        for i, result in zip(missing, await self._pipeline([calls[i] for i in missing]), strict=True):
                            results[i] = result
            except BaseException as exc:
                if do_sync:  # not flushed (as far as we know): keep them for the next sync
                    self._deltas = [a + b for a, b in zip(self._deltas, deltas, strict=True)]
                for queued in batch:
                    queued.error = exc
                return
            if do_sync:
                synced = results.pop()
                if isinstance(synced, Exception):
                    self._deltas = [a + b for a, b in zip(self._deltas, deltas, strict=True)]
                else:
                    self._known = [int(v) for v in synced]
                    self._last_sync = trio.current_time()
            start = 0
            for queued in batch:
                end = start + len(queued.calls)
                queued.results = results[start:end]
                queued.error = next((r for r in queued.results if isinstance(r, Exception)), None)
                start = end
        finally:
            for queued in batch:
                queued.done = True
                queued.turn.set()
            if self._queue:
                self._queue[0].turn.set()  # it sends the next round trip (_sending stays True)
            else:
                self._sending = False

    def _sync_due(self) -> bool:
        """The sync rides along with the next round trip: the view is half ``sync_interval_s`` old."""
        return trio.current_time() - self._last_sync >= self.sync_interval_s / 2

    def _view_stale(self) -> bool:
        """Too old to admit on (``sync_interval_s``): an enqueue re-reads first."""
        return trio.current_time() - self._last_sync >= self.sync_interval_s

    def _add(self, index: int, amount: int) -> None:
        self._deltas[index] += amount

    def _moved(self, before: int, after: int) -> None:
        """A mailbox went from holding ``before`` to ``after`` messages: move it between depth buckets."""
        if before == after:
            return
        deltas = self._deltas
        if before:
            deltas[_DEPTHS + depth_bucket(before)] -= 1
        if after:
            deltas[_DEPTHS + depth_bucket(after)] += 1

    def _view(self, index: int) -> int:
        """A relay-wide counter as this node sees it: as last read, plus this node's changes since."""
        return self._known[index] + self._deltas[index]

    # ------------------------------------------------------------ set-up

    async def open(self) -> None:
        """Load the scripts (on every node of a cluster) and read the relay-wide counters. Raises RedisUnavailable."""
        with redis_errors():
            await self._load_scripts()
        await self._run((), sync=True)

    async def flush(self) -> None:
        """Send this node's counter changes now and re-read the relay-wide ones (one round trip).

        Changes otherwise ride along with this store's next call once half of ``sync_interval_s``
        has passed, so an idle node's last changes wait for its next call: a timer calling this
        (every second, say) bounds how long. Raises RedisUnavailable.
        """
        await self._run((), sync=True)

    async def aclose(self) -> None:
        """Flush this node's counter changes (best effort). The client stays open: its owner closes it."""
        if any(self._deltas):
            try:
                with trio.move_on_after(5) as scope:
                    scope.shield = True  # closing at shutdown is closing in a cancelled scope
                    await self.flush()
            except Exception as exc:  # never raises: the relay-wide counters then drift (module docstring)
                log.warning("redis store %s: counter changes not flushed at close: %s", self.prefix, exc)

    # ------------------------------------------------------------ enqueue

    def _unindexed(self, expiring: Iterable[tuple[int, Iterable[str]]]) -> list[tuple[int, str]]:
        """The (bucket, mailbox) expiry-index members that (expires_at, mailboxes) pairs need and this store
        has not added yet."""
        members: dict[tuple[int, str], None] = {}
        indexed = self._indexed
        for expires_at, mailboxes in expiring:
            bucket = expires_at // DUE_BUCKET_MS
            known = indexed.get(bucket, ())
            for mailbox in mailboxes:
                if mailbox not in known:
                    members[bucket, mailbox] = None
        return list(members)

    def _index_calls(self, members: Sequence[tuple[int, str]]) -> list[Call]:
        args: list[Any] = []
        for bucket, mailbox in members:
            args += (bucket * DUE_BUCKET_MS, f"{bucket}:{mailbox}")
        return [(self._scripts["index"], [self._due_key], args)] if args else []

    def _indexed_now(self, members: Sequence[tuple[int, str]]) -> None:
        """Remember members Redis has (only once their pipeline succeeded, so a failed one is sent again)."""
        if self._indexed_count + len(members) > INDEX_CACHE_MAX:
            self._indexed.clear()
            self._indexed_count = 0
        for bucket, mailbox in members:
            self._indexed.setdefault(bucket, set()).add(mailbox)
        self._indexed_count += len(members)

    def _enqueue_call(self, mailbox: str, items: Iterable[NewMessage], now_ms: int, budget: int) -> Call:
        limits = self.limits
        news = list(items)
        # One '0'/'1' per message, or '' when none has notify (the common case pays one empty argument).
        flags = "".join("1" if new.notify else "0" for new in news) if any(new.notify for new in news) else ""
        args: list[Any] = [
            now_ms,
            self.expiry_margin_ms,
            limits.max_mailbox_messages,
            limits.max_mailbox_bytes,
            budget,
            flags,
        ]
        for new in news:
            args += (new.id, new.sender, new.sent_at, new.expires_at, new.body)
        return self._call("enqueue", mailbox, args)

    def _settle_enqueue(self, result: Sequence[Any]) -> list[Outcome]:
        created, stored, stored_bytes, stones_dropped, codes, held = result
        self._moved(int(held) - int(stored), int(held))
        self._add(_MAILBOXES, int(created))
        self._add(_MESSAGES, int(stored))
        self._add(_BYTES, int(stored_bytes))
        self._add(_TOMBSTONES, -int(stones_dropped))
        return [_OUTCOMES[int(code)] for code in codes]

    async def enqueue_many(self, messages: Sequence[NewMessage], now_ms: int) -> list[list[Outcome]]:
        out: list[list[Outcome]] = [[Outcome.STORED] * len(new.recipients) for new in messages]
        pairs = [(i, j, rcpt) for i, new in enumerate(messages) for j, rcpt in enumerate(new.recipients)]
        if not pairs:
            return out
        candidate = sum(len(new.body) * len(new.recipients) for new in messages)
        members = self._unindexed((new.expires_at, new.recipients) for new in messages)
        index = self._index_calls(members)
        limit = self.limits.max_total_bytes
        if self._view(_BYTES) + candidate > limit or self._view_stale():
            await self._run(index, sync=True)  # near full, or the view is stale: judge on a fresh view
            self._indexed_now(members)
            index, members = [], []
        if self._view(_BYTES) + candidate <= limit:
            groups: dict[str, list[tuple[int, int]]] = {}
            for i, j, rcpt in pairs:
                groups.setdefault(rcpt, []).append((i, j))
            calls = [
                self._enqueue_call(rcpt, (messages[i] for i, _ in where), now_ms, -1) for rcpt, where in groups.items()
            ]
            results = await self._run([*calls, *index])
            self._indexed_now(members)
            for where, result in zip(groups.values(), results, strict=False):
                for (i, j), outcome in zip(where, self._settle_enqueue(result), strict=True):
                    out[i][j] = outcome
            return out
        await self._enqueue_in_runs(messages, pairs, now_ms, out)
        return out

    async def _enqueue_in_runs(
        self, messages: Sequence[NewMessage], pairs: list[tuple[int, int, str]], now_ms: int, out: list[list[Outcome]]
    ) -> None:
        """Near full: runs of consecutive same-mailbox recipients, one round trip each, against the remaining budget."""
        start = 0
        while start < len(pairs):
            rcpt = pairs[start][2]
            end = start
            while end < len(pairs) and pairs[end][2] == rcpt:
                end += 1
            run = pairs[start:end]
            budget = max(self.limits.max_total_bytes - self._view(_BYTES), 0)
            [result] = await self._run([self._enqueue_call(rcpt, (messages[i] for i, _, _ in run), now_ms, budget)])
            for (i, j, _), outcome in zip(run, self._settle_enqueue(result), strict=True):
                out[i][j] = outcome
            start = end

    # ------------------------------------------------------------ one mailbox

    async def fetch_many(self, mailbox: str, claim: Claim, limit: int, max_bytes: int, now_ms: int) -> Batch:
        [result] = await self._run(
            [self._call("fetch", mailbox, (now_ms, claim.owner, claim.epoch, max(limit, 0), max_bytes))]
        )
        status, queued, inflight, inflight_change, expired, expired_bytes, emptied, flat, notified, notices = result
        if status:
            return _FENCED
        if expired:
            left = int(queued) + int(inflight)
            self._moved(left + int(expired), left)
            self._add(_EXPIRED, int(expired))
            self._add(_MESSAGES, -int(expired))
            self._add(_BYTES, -int(expired_bytes))
            self._add(_MAILBOXES, -int(emptied))
        self._add(_INFLIGHT, int(inflight_change))
        if notices:
            expired_notices = tuple(_expired_notices(mailbox, notices))
            return Batch(_messages(mailbox, flat, notified), int(queued), int(inflight), notices=expired_notices)
        if not flat and not queued and not inflight:
            return _NOTHING
        return Batch(_messages(mailbox, flat, notified), int(queued), int(inflight))

    async def release(self, mailbox: str, claim: Claim, unwritten: Collection[str] = ()) -> int:
        [n] = await self._run([self._call("release", mailbox, (claim.owner, claim.epoch, *unwritten))])
        self._add(_INFLIGHT, -int(n))
        return int(n)

    async def ack_many(self, mailbox: str, ids: Sequence[str], now_ms: int) -> AckResult:
        [result] = await self._run([self._call("ack", mailbox, (self.limits.max_tombstones, *ids))])
        *figures, notified = result
        deleted, inflight, nbytes, was_inflight, stones, emptied, left = (int(v) for v in figures)
        if deleted:
            self._moved(left + deleted, left)
            self._add(_ACKED, deleted)
            self._add(_MESSAGES, -deleted)
            self._add(_BYTES, -nbytes)
            self._add(_INFLIGHT, -was_inflight)
            self._add(_TOMBSTONES, stones)
            self._add(_MAILBOXES, -emptied)
        if notified:
            delivered = ReportState.DELIVERED
            notices = [
                Notice(_text(notified[i]), _text(notified[i + 1]), mailbox, delivered, now_ms)
                for i in range(0, len(notified), 2)
            ]
            return AckResult(deleted, inflight, tuple(notices))
        return AckResult(deleted, inflight)

    async def peek(self, mailbox: str, limit: int, now_ms: int) -> list[Message]:
        if limit <= 0:
            return []
        [(flat, notified)] = await self._run([self._call("peek", mailbox, (now_ms, limit))])
        return _messages(mailbox, flat, notified)

    async def pending(self, mailbox: str, now_ms: int) -> int:
        [n] = await self._run([self._call("pending", mailbox, (now_ms,))])
        return int(n)

    # ------------------------------------------------------------ expiry and statistics

    async def _due(self, now_ms: int, offset: int, count: int) -> list[tuple[int, str]]:
        """Index members due at ``now_ms`` (expiry order) from ``offset``: (bucket, mailbox) pairs."""
        [members] = await self._run([(self._scripts["due"], [self._due_key], (now_ms, offset, count))])
        out = []
        for member in members:
            bucket, _, mailbox = _text(member).partition(":")
            out.append((int(bucket), mailbox))
        return out

    def _settle_purge(self, mailbox: str, result: Sequence[Any], notices: list[Notice]) -> tuple[int, bool]:
        *figures, expired_notices = result
        removed, nbytes, was_inflight, emptied, dropped, more, statuses_expired, left = (int(v) for v in figures)
        self._moved(left + removed, left)
        notices += _expired_notices(mailbox, expired_notices)
        self._add(_STATUSES, -statuses_expired)
        self._add(_STATUSES_EXPIRED, statuses_expired)
        self._add(_EXPIRED, removed)
        self._add(_MESSAGES, -removed)
        self._add(_BYTES, -nbytes)
        self._add(_INFLIGHT, -was_inflight)
        self._add(_MAILBOXES, -emptied)
        self._add(_TOMBSTONES, -dropped)
        return removed, bool(more)

    def _purge_call(self, mailbox: str, now_ms: int) -> Call:
        keys = self._keys(mailbox) + self._keys(mailbox, _LANE_KEYS)
        return (self._scripts["purge"], keys, (now_ms, PURGE_CAP))

    async def _purge_page(
        self, page: list[tuple[int, str]], now_ms: int, touched: set[str], notices: list[Notice]
    ) -> int:
        """Purge the page's mailboxes (one pipeline; again for those with more due); returns how many messages
        it removed, and adds the EXPIRED notices of those with notify to ``notices``."""
        mailboxes = list(dict.fromkeys(mailbox for _, mailbox in page))
        results = await self._run([self._purge_call(m, now_ms) for m in mailboxes])
        count = 0
        for mailbox, result in zip(mailboxes, results, strict=True):
            removed, more = self._settle_purge(mailbox, result, notices)
            while more:
                [again] = await self._run([self._purge_call(mailbox, now_ms)])
                more_removed, more = self._settle_purge(mailbox, again, notices)
                removed += more_removed
            if removed:
                touched.add(mailbox)
                count += removed
        return count

    async def purge_expired(self, now_ms: int) -> Purged:
        touched: set[str] = set()
        notices: list[Notice] = []
        count = kept = 0
        while True:
            page = await self._due(now_ms, kept, DUE_PAGE)
            if not page:
                break
            count += await self._purge_page(page, now_ms, touched, notices)
            # A member goes once its whole bucket is past (a partly due one stays, after the gone ones).
            gone = [f"{bucket}:{mailbox}" for bucket, mailbox in page if (bucket + 1) * DUE_BUCKET_MS <= now_ms]
            if gone:
                await self._run([(self._scripts["undue"], [self._due_key], gone)])
            kept += len(page) - len(gone)
            if len(page) < DUE_PAGE:
                break
        for bucket in [b for b in self._indexed if (b + 1) * DUE_BUCKET_MS <= now_ms]:
            self._indexed_count -= len(self._indexed.pop(bucket))
        return Purged(count, frozenset(touched), tuple(notices))

    async def statistics(self, now_ms: int) -> StoreStatistics:
        await self._run((), sync=True)
        due: dict[str, None] = {}  # each due mailbox once, however many of its buckets are due
        offset = 0
        while True:
            page = await self._due(now_ms, offset, DUE_PAGE)
            due.update(dict.fromkeys(mailbox for _, mailbox in page))
            if len(page) < DUE_PAGE:
                break
            offset += len(page)
        unswept = 0
        if due:
            counts = await self._run([self._call("expired_count", m, (now_ms,)) for m in due])
            unswept = sum(int(c) for c in counts)
        known = [max(v, 0) for v in self._known]
        return StoreStatistics(
            messages_total=known[_MESSAGES],
            messages_deliverable=max(known[_MESSAGES] - unswept, 0),
            messages_expired_unswept=unswept,
            acknowledged_total=known[_ACKED],
            unique_recipients=known[_MAILBOXES],
            queued_bytes=known[_BYTES],
            expired_total=known[_EXPIRED],
            tombstones=known[_TOMBSTONES],
            inflight=known[_INFLIGHT],
            statuses_held=known[_STATUSES],
            statuses_total=known[_STATUSES_TOTAL],
            statuses_overflowed_total=known[_STATUSES_OVERFLOWED],
            statuses_expired_total=known[_STATUSES_EXPIRED],
            mailbox_depths=tuple(known[_DEPTHS:]),
        )

    # ------------------------------------------------------------ status lanes

    async def add_statuses(self, notices: Sequence[Notice], now_ms: int, ttl_ms: int) -> frozenset[str]:
        if ttl_ms < 1:
            raise ValueError(f"a status TTL must be at least 1 ms, not {ttl_ms}")
        lanes: dict[str, list[Any]] = {}
        for notice in notices:
            args = lanes.get(notice.mailbox)
            if args is None:
                args = lanes[notice.mailbox] = [now_ms, ttl_ms, self.expiry_margin_ms, self.limits.max_mailbox_statuses]
            args += (_STATE_CODES[notice.state], notice.at, notice.id, notice.recipient)
        if not lanes:
            return frozenset()
        members = self._unindexed([(now_ms + ttl_ms, lanes)])
        calls = [self._lane_call("status_add", lane, args) for lane, args in lanes.items()]
        results = await self._run([*calls, *self._index_calls(members)])
        self._indexed_now(members)
        folded_total = 0
        for change, folded in results[: len(calls)]:
            self._add(_STATUSES, int(change))
            folded_total += int(folded)
        self._add(_STATUSES_TOTAL, len(notices))
        self._add(_STATUSES_OVERFLOWED, folded_total)
        return frozenset(lanes)

    async def fetch_statuses(self, mailbox: str, after_seq: int, limit: int, now_ms: int) -> list[HeldStatus]:
        if limit <= 0:
            return []
        [(expired, flat)] = await self._run([self._lane_call("status_fetch", mailbox, (now_ms, after_seq, limit))])
        if expired:
            self._add(_STATUSES, -int(expired))
            self._add(_STATUSES_EXPIRED, int(expired))
        return _statuses(flat)

    async def ack_statuses(self, mailbox: str, seqs: Sequence[int]) -> int:
        if not seqs:
            return 0
        [deleted] = await self._run([self._lane_call("status_ack", mailbox, seqs)])
        self._add(_STATUSES, -int(deleted))
        return int(deleted)

    # ------------------------------------------------------------ key directory

    async def put_key(self, mailbox: str, record: KeyRecord, now_ms: int, ttl_ms: int) -> None:
        if ttl_ms < 1:
            raise ValueError(f"a key record TTL must be at least 1 ms, not {ttl_ms}")
        [key] = self._keys(mailbox, _KEY_KEYS)
        value = _KEY_EXPIRY.pack(now_ms + ttl_ms) + record.ik + record.ek + record.sig + record.kid.encode("ascii")
        began = trio.current_time()
        try:
            with trio.CancelScope(shield=True), redis_errors():  # (shielded as in _run)
                await self.client.set(key, value, px=ttl_ms + self.expiry_margin_ms)
        finally:
            self.call_latency.observe(trio.current_time() - began)
        self.round_trips += 1

    async def get_keys(self, mailboxes: Sequence[str], now_ms: int) -> dict[str, KeyRecord]:
        wanted = list(dict.fromkeys(mailboxes))
        if not wanted:
            return {}
        began = trio.current_time()
        try:
            with trio.CancelScope(shield=True), redis_errors():
                async with self.client.pipeline(transaction=False) as pipe:
                    for mailbox in wanted:
                        pipe.get(self._keys(mailbox, _KEY_KEYS)[0])
        finally:
            self.call_latency.observe(trio.current_time() - began)
        self.round_trips += 1
        out: dict[str, KeyRecord] = {}
        for mailbox, value in zip(wanted, pipe.results or (), strict=True):
            if value is None:
                continue
            data = bytes(value)
            (expires_at,) = _KEY_EXPIRY.unpack_from(data)
            if expires_at > now_ms:
                out[mailbox] = KeyRecord(
                    ik=data[8:40], ek=data[40:72], sig=data[72:136], kid=data[136:].decode("ascii")
                )
        return out
