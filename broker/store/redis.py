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
``T:m``         hash   id -> msgpack(sender, sent_at, expires_at, body): every    as ``T:meta``
                       held message (queued or in flight), the body raw bytes
``T:a``         hash   id -> attempt (absent: 0)                                  as ``T:meta``
``T:q``         zset   queued ids, score = accept number (oldest first)           as ``T:meta``
``T:f``         zset   in-flight ids, score = accept number                       as ``T:meta``
``T:x``         zset   held ids, score = expires_at (the mailbox's expiry order)  as ``T:meta``
``T:t``         hash   tombstones: id -> msgpack(sender, expires_at)              raised to ``T:meta``'s
``T:o``         zset   tombstone ids, score = ACK order (oldest ACK first)        on each ACK
``G:counters``  hash   relay-wide figures: bytes, messages, inflight,             none
                       tombstones, acknowledged, expired, mailboxes
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
  calls again while more are due) and its expired tombstones from the oldest ACK on.
- ``peek``, ``pending``, ``expired_count``: reads. ``sync`` and ``index``/``due``/``undue``
  work on ``G``'s keys.
A mailbox whose last message goes is deleted with its fence (the contract's "holds no
memory"); its tombstones stay until they lapse.

Key expiry is the backstop: the enqueue script sets every mailbox key's TTL to the
mailbox's latest ``expires_at`` - ``now_ms`` + ``expiry_margin_ms`` (relative to the
broker's clock, so keys neither vanish nor linger when that clock is not Redis's), and
scripts that create a key copy ``T:meta``'s TTL to it; an ACK extends the tombstone keys'
TTL to the mailbox's. So a mailbox nobody sweeps disappears by itself once everything
in it has expired, plus the margin (default 2 hours, above the 1-hour sweep interval, so
the sweep normally gets there first and keeps the counters right).

The expiry index ``G:due`` has one member per (10-second expiry bucket, mailbox) with a
message that may expire in that bucket. The enqueue pipeline adds them (``ZADD NX``,
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
if the batch's bodies do not fit the view. If they fit, the batch goes in one pipeline
with no byte check (nothing in it can be BROKER_FULL); if not, it goes as runs of
consecutive same-mailbox recipients, one round trip each, each run's script given the
remaining budget, so outcomes are exactly the memory store's for one node. So nothing
extra is paid until the relay is within one batch of full. Across nodes the view lags
by what the other nodes stored and have not flushed yet: the relay can overshoot by at
most what the other nodes stored in their last ``sync_interval_s`` (plus one batch
each). Freed bytes that are not flushed yet make the counter too high, never too low.

Statistics. Scripts return what they changed (bytes, messages, in flight, tombstones,
acknowledged, expired, mailboxes); the store adds these up locally and flushes them to
``G:counters`` with the ``sync`` script, which rides along in the next pipeline once
``sync_interval_s`` has passed, and always in :meth:`RedisStore.flush` (for a timer: an
idle node's last changes otherwise wait for its next call), :meth:`RedisStore.statistics`
(which reads them back) and :meth:`RedisStore.aclose`. With one node they are exact. They
may drift when (a) a pipeline fails after Redis ran some of its scripts (their changes
are unknown here), (b) a node dies with changes not flushed (at most one interval's
worth), (c) Redis key expiry removes a mailbox the sweep did not reach (its bytes and
messages are never taken off), (d) Redis loses writes (no persistence, a failover). Other
nodes' figures are as fresh as their last flush. ``messages_expired_unswept`` is counted
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
view, above; near full, 1 + one per run); fetch_many, release, ack_many, peek, pending 1;
purge_expired 1 + 2 per page of 500 due index members; statistics 2-3. Measured by
``tests/store/test_redis_store.py``: SENDs in batches of 50, fetches of 100, ACKs of 50 make
0.051 round trips per delivered-and-ACKed message.

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
from collections.abc import Collection, Iterable, Sequence
from typing import Any

import coredis
import trio
from coredis.commands.script import Script
from coredis.exceptions import NoScriptError

from ..redis_client import redis_errors
from .base import AckResult, Batch, Claim, Message, NewMessage, Outcome, Purged, StoreLimits, StoreStatistics

__all__ = ["DEFAULT_EXPIRY_MARGIN_MS", "SYNC_INTERVAL_S", "RedisStore"]

DEFAULT_EXPIRY_MARGIN_MS = 2 * 3600 * 1000
"""Mailbox keys outlive their latest message by this much (above the broker's 1-hour sweep interval)."""
SYNC_INTERVAL_S = 0.05
"""At most this long between flushes of this node's counter changes (and re-reads of the relay's)."""
DUE_BUCKET_MS = 10_000
"""Width of an expiry-index bucket: one index member per mailbox per 10 s of expiry times."""
DUE_PAGE = 500
"""Index members the sweep takes per round."""
PURGE_CAP = 5000
"""Messages one purge script call removes at most (bounds how long one script blocks Redis)."""
INDEX_CACHE_MAX = 100_000
"""Index members this store remembers having added (beyond this it forgets them and adds again)."""

log = logging.getLogger(__name__)

_COUNTERS = ("bytes", "messages", "inflight", "tombstones", "acknowledged", "expired", "mailboxes")
_BYTES, _MESSAGES, _INFLIGHT, _TOMBSTONES, _ACKED, _EXPIRED, _MAILBOXES = range(len(_COUNTERS))

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

_ENQUEUE = (
    _PRELUDE
    + """
local STORED, DUPLICATE, ID_CONFLICT, MAILBOX_FULL, MAILBOX_BYTES_FULL, BROKER_FULL = 0, 1, 2, 3, 4, 5
local ENQUEUE_PAGE = 300
local now, margin = tonumber(ARGV[1]), tonumber(ARGV[2])
local max_msgs, max_bytes, budget = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
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
for first = 6, #ARGV, 5 * ENQUEUE_PAGE do
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
        records[#records + 1] = id
        records[#records + 1] = cmsgpack.pack(sender, tonumber(ARGV[i + 2]), expires_at, body)
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
return {created, stored, stored_bytes, stones_dropped, out}
"""
)

_FETCH = (
    _PRELUDE
    + """
local now, owner, epoch = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local limit, max_bytes = tonumber(ARGV[4]), tonumber(ARGV[5])
if redis.call('HLEN', MSGS) == 0 then return {0, 0, 0, 0, 0, 0, 0, {}} end
local requeued = 0
local same, fence = is_fence(owner, epoch)
if not same then
  if fence[1] then
    if epoch <= tonumber(fence[2]) then return {1, 0, 0, 0, 0, 0, 0, {}} end
    requeued = requeue()
  end
  redis.call('HSET', META, 'fo', owner, 'fe', ARGV[3])
end
local got, ngot, nbytes, expired, expired_bytes = {}, 0, 0, 0, 0
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
      local sender, sent_at, expires_at, body = cmsgpack.unpack(rec)
      if expires_at <= now then
        drop(id, body)
        expired, expired_bytes = expired + 1, expired_bytes + #body
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
return {0, redis.call('HLEN', MSGS) - inflight, inflight, ngot - requeued, expired, expired_bytes, emptied, got}
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
if redis.call('HLEN', MSGS) == 0 then return {0, 0, 0, 0, 0, 0} end
local deleted, nbytes, was_inflight, stones = 0, 0, 0, 0
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
      local sender, _, expires_at, body = cmsgpack.unpack(rec)
      gone[#gone + 1] = id
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
return {deleted, redis.call('ZCARD', FLIGHT), nbytes, was_inflight, stones, emptied}
"""
)

_PURGE = (
    _PRELUDE
    + """
local now, cap = tonumber(ARGV[1]), tonumber(ARGV[2])
local ids = redis.call('ZRANGE', EXP, '-inf', now, 'BYSCORE', 'LIMIT', 0, cap)
local removed, nbytes, was_inflight = 0, 0, 0
for _, id in ipairs(ids) do
  local rec = redis.call('HGET', MSGS, id)
  if rec then
    local _, _, _, body = cmsgpack.unpack(rec)
    was_inflight = was_inflight + drop(id, body)
    removed, nbytes = removed + 1, nbytes + #body
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
local more = 0
if #ids == cap then more = 1 end
return {removed, nbytes, was_inflight, emptied, dropped, more}
"""
)

_PEEK = (
    _PRELUDE
    + """
local now, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local out, n = {}, 0
for _, key in ipairs({FLIGHT, QUEUE}) do
  local start = 0
  while n < limit do
    local ids = redis.call('ZRANGE', key, start, start + 99)
    if #ids == 0 then break end
    start = start + #ids
    for _, id in ipairs(ids) do
      local rec = redis.call('HGET', MSGS, id)
      if rec then
        local sender, sent_at, expires_at, body = cmsgpack.unpack(rec)
        if expires_at > now then
          local attempt = tonumber(redis.call('HGET', ATT, id)) or 0
          for _, v in ipairs({id, sender, sent_at, expires_at, attempt, body}) do out[#out + 1] = v end
          n = n + 1
          if n == limit then break end
        end
      end
    end
  end
end
return out
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
}

# ------------------------------------------------------------------ Python

Call = tuple[Script[bytes], Sequence[str], Sequence[Any]]
"""One script call: the script, its keys, its arguments."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _messages(mailbox: str, flat: Sequence[Any]) -> list[Message]:
    """Messages from a script's flat list of (id, sender, sent_at, expires_at, attempt, body) sextets."""
    return [
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

    # ------------------------------------------------------------ plumbing

    def _keys(self, mailbox: str) -> list[str]:
        tag = f"{{{self.prefix}:{mailbox}}}"
        return [f"{tag}:{suffix}" for suffix in _MAILBOX_KEYS]

    def _call(self, name: str, mailbox: str, args: Sequence[Any]) -> Call:
        return (self._scripts[name], self._keys(mailbox), args)

    def _sync_call(self, deltas: Sequence[int]) -> Call:
        args: list[Any] = []
        for field, delta in zip(_COUNTERS, deltas, strict=True):
            args += (field, delta)
        return (self._scripts["sync"], [self._counters_key], args)

    async def _pipeline(self, calls: Sequence[Call]) -> list[Any]:
        """Send ``calls`` in one non-transactional pipeline; each result or its error, in order."""
        async with self.client.pipeline(transaction=False, raise_on_error=False) as pipe:
            for script, keys, args in calls:
                pipe.evalsha(script.sha, keys=keys, args=args)
        self.round_trips += 1
        return list(pipe.results or ())

    async def _load_scripts(self) -> None:
        for script in self._scripts.values():
            await self.client.script_load(script.script)
            self.round_trips += 1

    async def _run(self, calls: Sequence[Call], *, sync: bool = False) -> list[Any]:
        """Run script calls in one round trip (again for any whose script Redis lost); their results.

        The counter sync rides along when it is due (or ``sync``). Raises RedisUnavailable (OSError).
        Shielded from cancellation (bounded by the client's command timeout): once the scripts are
        sent their changes happen, so their results are always read and counted, even when the
        caller's session is being cancelled (a client that cut its connection mid-SEND).
        """
        do_sync = sync or self._sync_due()
        deltas = self._deltas
        if do_sync:
            self._deltas = [0] * len(_COUNTERS)
            calls = [*calls, self._sync_call(deltas)]
        try:
            with trio.CancelScope(shield=True), redis_errors():
                results = await self._pipeline(calls)
                missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
                if missing:
                    await self._load_scripts()
                    for i, result in zip(missing, await self._pipeline([calls[i] for i in missing]), strict=True):
                        results[i] = result
                for result in results:
                    if isinstance(result, Exception):
                        raise result
        except BaseException:
            if do_sync:  # not flushed (as far as we know): keep them for the next sync
                self._deltas = [a + b for a, b in zip(self._deltas, deltas, strict=True)]
            raise
        if do_sync:
            self._known = [int(v) for v in results.pop()]
            self._last_sync = trio.current_time()
        return results

    def _sync_due(self) -> bool:
        return trio.current_time() - self._last_sync >= self.sync_interval_s

    def _add(self, index: int, amount: int) -> None:
        self._deltas[index] += amount

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

        Changes otherwise ride along with this store's next call once ``sync_interval_s`` has
        passed, so an idle node's last changes wait for its next call: a timer calling this
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

    def _unindexed(self, messages: Sequence[NewMessage]) -> list[tuple[int, str]]:
        """The (bucket, mailbox) expiry-index members this batch needs that this store has not added yet."""
        members: dict[tuple[int, str], None] = {}
        indexed = self._indexed
        for new in messages:
            bucket = new.expires_at // DUE_BUCKET_MS
            known = indexed.get(bucket, ())
            for rcpt in new.recipients:
                if rcpt not in known:
                    members[bucket, rcpt] = None
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
        args: list[Any] = [now_ms, self.expiry_margin_ms, limits.max_mailbox_messages, limits.max_mailbox_bytes, budget]
        for new in items:
            args += (new.id, new.sender, new.sent_at, new.expires_at, new.body)
        return self._call("enqueue", mailbox, args)

    def _settle_enqueue(self, result: Sequence[Any]) -> list[Outcome]:
        created, stored, stored_bytes, stones_dropped, codes = result
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
        members = self._unindexed(messages)
        index = self._index_calls(members)
        limit = self.limits.max_total_bytes
        if self._view(_BYTES) + candidate > limit or self._sync_due():
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
        status, queued, inflight, inflight_change, expired, expired_bytes, emptied, flat = result
        if status:
            return _FENCED
        if expired:
            self._add(_EXPIRED, int(expired))
            self._add(_MESSAGES, -int(expired))
            self._add(_BYTES, -int(expired_bytes))
            self._add(_MAILBOXES, -int(emptied))
        self._add(_INFLIGHT, int(inflight_change))
        if not flat and not queued and not inflight:
            return _NOTHING
        return Batch(_messages(mailbox, flat), int(queued), int(inflight))

    async def release(self, mailbox: str, claim: Claim, unwritten: Collection[str] = ()) -> int:
        [n] = await self._run([self._call("release", mailbox, (claim.owner, claim.epoch, *unwritten))])
        self._add(_INFLIGHT, -int(n))
        return int(n)

    async def ack_many(self, mailbox: str, ids: Sequence[str]) -> AckResult:
        [result] = await self._run([self._call("ack", mailbox, (self.limits.max_tombstones, *ids))])
        deleted, inflight, nbytes, was_inflight, stones, emptied = (int(v) for v in result)
        if deleted:
            self._add(_ACKED, deleted)
            self._add(_MESSAGES, -deleted)
            self._add(_BYTES, -nbytes)
            self._add(_INFLIGHT, -was_inflight)
            self._add(_TOMBSTONES, stones)
            self._add(_MAILBOXES, -emptied)
        return AckResult(deleted, inflight)

    async def peek(self, mailbox: str, limit: int, now_ms: int) -> list[Message]:
        if limit <= 0:
            return []
        [flat] = await self._run([self._call("peek", mailbox, (now_ms, limit))])
        return _messages(mailbox, flat)

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

    def _settle_purge(self, result: Sequence[Any]) -> tuple[int, bool]:
        removed, nbytes, was_inflight, emptied, dropped, more = (int(v) for v in result)
        self._add(_EXPIRED, removed)
        self._add(_MESSAGES, -removed)
        self._add(_BYTES, -nbytes)
        self._add(_INFLIGHT, -was_inflight)
        self._add(_MAILBOXES, -emptied)
        self._add(_TOMBSTONES, -dropped)
        return removed, bool(more)

    async def _purge_page(self, page: list[tuple[int, str]], now_ms: int, touched: set[str]) -> int:
        """Purge the page's mailboxes (one pipeline; again for those with more due); returns how many removed."""
        mailboxes = list(dict.fromkeys(mailbox for _, mailbox in page))
        results = await self._run([self._call("purge", m, (now_ms, PURGE_CAP)) for m in mailboxes])
        count = 0
        for mailbox, result in zip(mailboxes, results, strict=True):
            removed, more = self._settle_purge(result)
            while more:
                [again] = await self._run([self._call("purge", mailbox, (now_ms, PURGE_CAP))])
                more_removed, more = self._settle_purge(again)
                removed += more_removed
            if removed:
                touched.add(mailbox)
                count += removed
        return count

    async def purge_expired(self, now_ms: int) -> Purged:
        touched: set[str] = set()
        count = kept = 0
        while True:
            page = await self._due(now_ms, kept, DUE_PAGE)
            if not page:
                break
            count += await self._purge_page(page, now_ms, touched)
            # A member goes once its whole bucket is past (a partly due one stays, after the gone ones).
            gone = [f"{bucket}:{mailbox}" for bucket, mailbox in page if (bucket + 1) * DUE_BUCKET_MS <= now_ms]
            if gone:
                await self._run([(self._scripts["undue"], [self._due_key], gone)])
            kept += len(page) - len(gone)
            if len(page) < DUE_PAGE:
                break
        for bucket in [b for b in self._indexed if (b + 1) * DUE_BUCKET_MS <= now_ms]:
            self._indexed_count -= len(self._indexed.pop(bucket))
        return Purged(count, frozenset(touched))

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
        )
