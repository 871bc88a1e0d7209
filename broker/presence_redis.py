"""Presence across broker nodes that share one Redis (standalone or Cluster).

Theory of operation. Every broker process is a *node* with a unique ``node_id``; it keeps
the mailboxes its own sessions hold in a dict (as :class:`~broker.presence.LocalPresence`
does) and publishes each holding to Redis with a lease, so every node can tell who holds
a mailbox, and reach that session through the holder's node.

Keys (every key of a mailbox under the hash tag ``{<prefix>:<mailbox>}``, the store's tag,
so each script touches one slot and runs on a cluster):

- ``{<prefix>:<mailbox>}:epoch``, a string: the newest epoch given out for the mailbox.
  TTL ``EPOCH_KEEP_S`` (a day), renewed by every claim and every lease renewal.
- ``{<prefix>:<mailbox>}:holder``, a string ``"<epoch>|<node_id>|<session_id>"``: the
  claim that holds the mailbox. TTL the lease (``lease_s``, 15 s by default), renewed by
  the holding node every ``lease_s / 3``; it expires by itself when its node dies.

Channels: one per node, ``<prefix>:node:<node_id>``, that only that node subscribes to
(SUBSCRIBE/PUBLISH on a standalone Redis; SSUBSCRIBE/SPUBLISH, sharded pub/sub, on a
cluster, so a message goes to the one shard that owns the channel and PUBLISH's count of
receivers is exact in both cases). Messages are JSON objects:

- ``{"op": "kick", "mailbox": m, "epoch": e, "node": n}``: node ``n`` claimed ``m`` with
  epoch ``e``; whatever older claim of ``m`` the receiver holds is superseded.
- ``{"op": "done", "mailbox": m, "epoch": e}``: the session that claim ``e`` took ``m``
  from has finished (or the receiver gave up waiting for it).
- ``{"op": "wake" | "resync" | "statuses", "to": [[m, e], ...]}``: wake (or make recount, or
  wake for delivery statuses) the session holding ``m`` under claim ``e``, if the receiver
  still holds it under that claim.
- ``{"op": "ping", "n": k}``: the node's own health check of its listener.

Claim (:meth:`RedisPresence.claim`), step by step:

1. One script on the mailbox's slot: epoch = max(stored epoch + 1, Redis's clock in ms)
   (so epochs grow per mailbox on every node, and keep growing after the epoch key has
   expired); store the epoch; read the previous holder; set the holder to this claim with
   the lease. It returns the epoch and the previous holder. (Epochs are therefore large,
   about 1.7e12, well within Lua's and JSON's exact integers.)
2. Install the claim locally. A local previous holder (another session of this node) is
   kicked (CONNECTED_ELSEWHERE) at once. If the previous holder names another node, a
   ``kick`` goes to that node's channel; if that node has a listener (PUBLISH counted one),
   the claim waits for its ``done``.
3. Wait, at most ``takeover_wait_s`` in all, for the local previous holder to finish and
   the remote ``done``. Cancelled (or failing) anywhere, the claim releases itself (the
   holder key is deleted if it still names this claim) and the error propagates.

The kicked node drops its local holder at once (no wake reaches it any more), kicks it,
and answers ``done`` once it has finished (at most its own ``takeover_wait_s`` later). A
``done`` that comes after the claimer stopped waiting makes the claimer wake and resync
its new session: anything the old holder absorbed in the meantime is picked up.

Release: a script deletes the holder key only if it still names this claim (a stale
release changes nothing), and the local entry goes. A release never raises for a Redis
failure (it is logged; the lease ends the holding).

Leases: every ``lease_s / 3`` the node renews every holder key it owns, one script per
mailbox, pipelined. The script extends the lease (and the epoch key's TTL) if the key
still names the claim, and sets both again if the holder key is gone but no newer epoch
was given out (the epoch key is this claim's or gone too: Redis was away for longer than
the lease, or restarted empty; nobody took over). Otherwise the claim was taken over (a
``kick`` that never arrived, or a partition that healed): the local session is dropped,
kicked, and the new holder's node gets a ``done`` when it has finished.

Online, wake, resync. A mailbox held on this node is answered from the local dict (no
Redis). For the others ``online`` reads their holder keys, pipelined, and remembers each
remote holder (node, epoch) as a *hint*, stamped with when the read was sent; a newer
read's hint is never replaced by an older one's. ``wake`` wakes local holders directly and
sends one ``wake`` message per holding node, using hints younger than ``HINT_VALID_S`` and
reading holder keys (one pipeline) only for the mailboxes without one. A receiving node
wakes the session only if it still holds the mailbox under the named epoch, else drops
the message, which is safe: the router calls ``online`` after it stored the messages, so
the hint names the holder at some moment after they were stored; a session that took the
mailbox after that moment pumps after its claim returns, and so fetches them itself.
A local holder is answered for directly even if another node has just taken the mailbox
over and its ``kick`` is still on the way: that claim is then still waiting for this
node's ``done`` (its session has not pumped yet, and will fetch what was stored), or it
stopped waiting, and the late ``done`` nudges it. ``resync`` follows an event (a purge, an
ACK over HTTP) that a hint may predate, so it always reads holder keys first, and so does
``wake_statuses`` (statuses are queued for a sender, whom no ``online`` has just read: a
hint could predate the statuses and name a holder that has gone since, while the session
that took over had already fetched at connect).

Listener health: coredis's pub/sub reconnects and resubscribes by itself, but not
reliably (checked here with coredis 6.9: after CLIENT KILL, the subscription sometimes
comes back acknowledged yet gone, PUBLISH counting no receiver; a fresh subscription made
right after can be gone too). So the node trusts only its own probe: it publishes a
``ping`` to its own channel shortly after every subscription and every renewal period, and
reopens the subscription (logged as an error) when nobody received it or the previous
ping was not heard; a second acknowledgement on one subscription (coredis reconnected
under it) also reopens it. After every reopening the node wakes and resyncs all of its
sessions (also for statuses), which makes good any wake lost meanwhile, within about ``lease_s / 3``.

Why deliveries stay correct when a lease or a wait is wrong. For a moment two sessions
(on two nodes) may both believe they hold a mailbox: a takeover that stopped waiting, a
node that did not hear its ``kick``, a lease that ran out during a pause. The store
fences deliveries by epoch (:class:`~broker.store.base.Claim`): the newer claim's first
fetch takes every in-flight message over, and the older claim's fetches and releases
change nothing, so neither can lose or double-hand a message; the older session ends at
its next kick or renewal. Presence decides only who is woken and what a receipt says.

Round trips (``round_trips`` counts each command or pipeline sent for a caller's call,
``background_round_trips`` those of the node's upkeep, the last item below; on a cluster
a pipeline is one exchange per shard it touches, counted once):

- claim: 1 script, plus 1 PUBLISH when another node held the mailbox; release: 1 script.
- online(batch): 0 if every mailbox is held here, else 1 pipeline of GETs.
- wake(batch): 0 for local holders; remote holders: 1 pipeline of PUBLISHes (one per
  holding node), plus 1 pipeline of GETs for mailboxes without a fresh hint (none after
  the router's ``online``). So a routed batch costs at most 2 (online + publish).
- resync(batch), wake_statuses(batch): 1 pipeline of GETs (if any mailbox is not local) + 1 of PUBLISHes.
- per ``lease_s / 3``: 1 pipeline of renewal scripts (one per mailbox held) + 1 ping (and
  1 ping after each subscription).

Errors: ``claim`` and ``online`` raise :class:`~broker.redis_client.RedisUnavailable` (an
OSError, as the store does) when Redis cannot be reached or serve; ``release``, ``wake``,
``resync`` and ``wake_statuses`` log Redis failures and return (what is queued is delivered by the session's
next pump: reconnect, resync, a renewal that finds the claim gone). The background tasks
log and carry on (given the node's :class:`~broker.health.StoreHealth`, Redis being
unreachable is told to it instead, which logs each outage once, not each failed call);
the client's own timeouts (``broker.redis_client`` sets them) bound every call.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Sequence, Set
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import coredis
import trio
from coredis.exceptions import RedisError

from wire import ErrorCode

from .health import StoreHealth
from .presence import TAKEOVER_WAIT_S, Subscriber
from .redis_client import redis_errors, unreachable
from .store.base import Claim

__all__ = ["EPOCH_KEEP_S", "HINT_VALID_S", "LEASE_S", "RedisPresence", "open_redis_presence"]

log = logging.getLogger(__name__)

LEASE_S = 15.0
"""How long a holding outlives its node's last renewal (renewed every third of it)."""

EPOCH_KEEP_S = 86_400
"""How long a mailbox's epoch key outlives its last claim. Epochs keep growing without it (they
are at least Redis's clock in ms); it only guards against that clock stepping back."""

HINT_VALID_S = 1.0
"""How long a holder read by ``online`` may direct a ``wake`` without reading it again."""

RELEASE_TIMEOUT_S = 2.0
"""Longest a release (or a cancelled claim's undo) waits for Redis: it runs shielded, at session end."""

LISTENER_RETRY_S = 0.5
"""Pause before the listener opens its subscription again after it ended or failed."""

PROBE_AFTER_S = 0.1
"""When the listener checks, after each (re)subscription, that its channel has a subscriber."""

PING_GRACE_S = 1.0
"""How long the node's own ping may take to come back before the listener counts as deaf."""

_KICK_MESSAGE = "connected elsewhere: a newer connection took over this mailbox"
_REDIS_ERRORS = (RedisError, OSError, TimeoutError)
_NAME_RE = re.compile(r"[A-Za-z0-9._@+:-]{1,128}")
"""Node ids and prefixes: no ``|`` (the holder value's separator), no braces (hash tags), no spaces."""

# KEYS: epoch, holder. ARGV: node, session, lease ms, epoch keep ms. Returns {epoch, previous holder or false}.
_CLAIM_LUA = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local epoch = tonumber(redis.call('GET', KEYS[1]) or '0') + 1
if epoch < now_ms then epoch = now_ms end
local e = string.format('%d', epoch)
redis.call('SET', KEYS[1], e, 'PX', ARGV[4])
local previous = redis.call('GET', KEYS[2])
redis.call('SET', KEYS[2], e .. '|' .. ARGV[1] .. '|' .. ARGV[2], 'PX', ARGV[3])
return {epoch, previous}
"""

# KEYS: holder. ARGV: "|node|session", epoch or "". Deletes the holder if it is that claim (any epoch if "").
_RELEASE_LUA = """
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local suffix = ARGV[1]
if string.sub(cur, -string.len(suffix)) ~= suffix then return 0 end
if ARGV[2] ~= '' and cur ~= ARGV[2] .. suffix then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS: holder, epoch. ARGV: holder value, epoch, lease ms, epoch keep ms.
# 1 if still held, 2 if set again (it had gone, and no newer epoch was given out), else the holder now (or false).
_RENEW_LUA = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
  return 1
end
if cur then return cur end
local epoch = redis.call('GET', KEYS[2])
if epoch and epoch ~= ARGV[2] then return false end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[4])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 2
"""


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _parse_holder(value: object) -> tuple[int, str, str]:
    """A holder value's (epoch, node, session). Raises ValueError if it is not one."""
    epoch, node, session = _text(value).split("|", 2)
    return int(epoch), node, session


@dataclass(frozen=True, slots=True, eq=False)
class _Held:
    """A mailbox held on this node: its session, its claim, and the claim's holder value in Redis."""

    subscriber: Subscriber
    claim: Claim
    value: str


class RedisPresence:
    """The :class:`~broker.presence.Presence` of one node over a shared Redis; see the module docstring.

    Made from an open coredis client (``coredis.Redis`` or ``coredis.RedisCluster``, either
    ``decode_responses``); its background tasks run in :meth:`run`. Use it through
    :func:`open_redis_presence`. ``round_trips`` counts the commands and pipelines its callers'
    calls sent, ``background_round_trips`` those of its upkeep.
    """

    def __init__(
        self,
        client: coredis.Redis[Any] | coredis.RedisCluster[Any],
        *,
        node_id: str,
        prefix: str = "relay",
        lease_s: float = LEASE_S,
        takeover_wait_s: float = TAKEOVER_WAIT_S,
        health: StoreHealth | None = None,
    ) -> None:
        for what, name in (("node_id", node_id), ("prefix", prefix)):
            if not _NAME_RE.fullmatch(name):
                raise ValueError(f"{what} must be 1-128 characters of A-Z a-z 0-9 . _ @ + : - (got {name!r})")
        if lease_s <= 0 or takeover_wait_s < 0:
            raise ValueError("lease_s must be positive and takeover_wait_s not negative")
        self.client = client
        self.node_id = node_id
        self.prefix = prefix
        self.lease_s = lease_s
        self.takeover_wait_s = takeover_wait_s
        self._health = health
        self.round_trips = 0
        """Commands and pipelines sent to Redis for the callers' calls so far (a cluster pipeline counts once)."""
        self.background_round_trips = 0
        """The same for the node's upkeep: lease renewals, listener probes, ``done`` answers."""
        self._cluster = isinstance(client, coredis.RedisCluster)
        self._channel = self.channel_of(node_id)
        self._lease_ms = max(1, int(lease_s * 1000))
        self._held: dict[str, _Held] = {}
        self._hints: dict[str, tuple[float, str, int]] = {}  # mailbox -> (read sent at, node, epoch)
        self._done: dict[tuple[str, int], trio.Event] = {}  # takeovers waiting for a remote "done"
        self._claim_script = client.register_script(_CLAIM_LUA)
        self._release_script = client.register_script(_RELEASE_LUA)
        self._renew_script = client.register_script(_RENEW_LUA)
        self._nursery: trio.Nursery | None = None
        self._listen_scope = trio.CancelScope()
        self._pings_sent = 0
        self._pings_heard = 0
        self._ping_expected = 0
        self._ping_expected_at = 0.0

    def _failed(self, what: str, exc: BaseException) -> None:
        """A Redis call that never raises to its caller failed: Redis being unreachable goes to the node's health
        (which logs each outage once), anything else is logged here."""
        down = unreachable(exc)
        if down is not None and self._health is not None:
            self._health.failed(down)
            log.debug("%s failed: %r", what, exc)
        else:
            log.warning("%s failed: %r", what, exc)

    # ------------------------------------------------------------ names

    def _key(self, mailbox: str, what: str) -> str:
        return f"{{{self.prefix}:{mailbox}}}:{what}"

    def channel_of(self, node_id: str) -> str:
        """The pub/sub channel of node ``node_id``."""
        return f"{self.prefix}:node:{node_id}"

    # ------------------------------------------------------------ running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on this node's channel and renew its leases until cancelled.

        Reports readiness once the channel is subscribed (waiting for Redis while it is
        unreachable). Never returns normally; the node's holdings end with their leases.
        """
        if self._nursery is not None:
            raise RuntimeError("RedisPresence.run is already running")
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                await nursery.start(self._listen_forever)
                nursery.start_soon(self._renew_forever)
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._nursery = None

    # ------------------------------------------------------------ Presence

    async def claim(self, mailbox: str, subscriber: Subscriber) -> Claim:
        """Make ``subscriber`` the holder of ``mailbox`` on every node; see the module docstring.

        Raises :class:`~broker.redis_client.RedisUnavailable` (an OSError) when Redis cannot
        be reached or serve (nothing is then held).
        """
        suffix = f"|{self.node_id}|{subscriber.id}"
        try:
            self.round_trips += 1
            with redis_errors():
                reply: Any = await self._claim_script(
                    keys=[self._key(mailbox, "epoch"), self._key(mailbox, "holder")],
                    args=[self.node_id, subscriber.id, self._lease_ms, EPOCH_KEEP_S * 1000],
                )
        except BaseException:
            await self._release_value(mailbox, suffix, "")  # the script may have run: undo it
            raise
        epoch, previous = reply
        claim = Claim(subscriber.id, int(epoch))
        held = _Held(subscriber, claim, f"{epoch}{suffix}")
        try:
            await self._take_over(mailbox, held, previous)
        except BaseException:
            self._drop(mailbox, held)  # cancelled: the caller never got the claim to release it
            await self._release_value(mailbox, suffix, str(claim.epoch))
            raise
        return claim

    async def _take_over(self, mailbox: str, held: _Held, previous: object) -> None:
        """Install ``held``, kick whoever held the mailbox before, and wait (bounded) for them."""
        epoch = held.claim.epoch
        local = self._held.get(mailbox)
        if local is not None and local.claim.epoch > epoch:
            # A newer claim on this node got its answer first: this one is superseded already.
            held.subscriber.kick(ErrorCode.CONNECTED_ELSEWHERE, _KICK_MESSAGE)
            return
        self._held[mailbox] = held
        waits = []
        if local is not None:
            log.info("%s takes over %s from %s", held.claim.owner, mailbox, local.claim.owner)
            local.subscriber.kick(ErrorCode.CONNECTED_ELSEWHERE, _KICK_MESSAGE)
            waits.append(local.subscriber.finished)
        key = (mailbox, epoch)
        try:
            if previous is not None:
                _, node, session = _parse_holder(previous)
                if node != self.node_id:
                    log.info("%s takes over %s from %s on node %s", held.claim.owner, mailbox, session, node)
                    done = self._done[key] = trio.Event()
                    message = {"op": "kick", "mailbox": mailbox, "epoch": epoch, "node": self.node_id}
                    with redis_errors():
                        listening = await self._publish(node, message)
                    if listening:  # (0: nobody listens there, e.g. a crashed node)
                        waits.append(done)
            with trio.move_on_after(self.takeover_wait_s):
                for event in waits:
                    await event.wait()
        finally:
            self._done.pop(key, None)

    def _drop(self, mailbox: str, held: _Held) -> None:
        if self._held.get(mailbox) is held:
            del self._held[mailbox]

    async def release(self, mailbox: str, claim: Claim) -> None:
        """Forget ``claim``'s holding of ``mailbox`` here and in Redis (if it still holds it).

        Never raises for a Redis failure: it is logged, and the holding ends with its lease.
        """
        held = self._held.get(mailbox)
        if held is not None and held.claim == claim:
            del self._held[mailbox]
        await self._release_value(mailbox, f"|{self.node_id}|{claim.owner}", str(claim.epoch))

    async def _release_value(self, mailbox: str, suffix: str, epoch: str, *, background: bool = False) -> None:
        """Delete the holder key if it names this node's session (and ``epoch``, unless ""). Shielded, bounded."""
        with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_TIMEOUT_S) as scope:
            try:
                self._count(background)
                await self._release_script(keys=[self._key(mailbox, "holder")], args=[suffix, epoch])
            except _REDIS_ERRORS as exc:
                self._failed(f"release of {mailbox} (its lease will end it)", exc)
        if scope.cancelled_caught:
            log.warning("release of %s timed out (its lease will end it)", mailbox)

    async def online(self, mailboxes: Collection[str]) -> Set[str]:
        """Those of ``mailboxes`` held by a live session on some node. Raises RedisUnavailable (OSError)."""
        held = self._held
        found = {m for m in mailboxes if m in held}
        rest = [m for m in mailboxes if m not in held]
        if rest:
            sent_at = trio.current_time()
            with redis_errors():
                values = await self._holders(rest)
            for mailbox, value in zip(rest, values, strict=True):
                if value is not None:
                    found.add(mailbox)
                    self._hint(mailbox, value, sent_at)
        return found

    def _hint(self, mailbox: str, value: object, sent_at: float) -> None:
        """Remember a remote holder read at ``sent_at``, unless a newer read is remembered."""
        epoch, node, _ = _parse_holder(value)
        if node != self.node_id:
            old = self._hints.get(mailbox)
            if old is None or old[0] <= sent_at:
                self._hints[mailbox] = (sent_at, node, epoch)

    async def _holders(self, mailboxes: Sequence[str]) -> list[object]:
        """The holder values of ``mailboxes`` (None where nobody holds one): one pipeline."""
        self.round_trips += 1
        async with self.client.pipeline(transaction=False) as pipe:
            requests = [pipe.get(self._key(m, "holder")) for m in mailboxes]
        return [await r for r in requests]

    async def wake(self, mailboxes: Iterable[str]) -> None:
        """Wake the session holding each mailbox, on whichever node. Never raises for a Redis failure."""
        await self._reach("wake", mailboxes, use_hints=True)

    async def resync(self, mailboxes: Iterable[str]) -> None:
        """Make the session holding each mailbox recount, on whichever node. Never raises for a Redis failure."""
        await self._reach("resync", mailboxes, use_hints=False)

    async def wake_statuses(self, mailboxes: Iterable[str]) -> None:
        """Wake the session holding each mailbox for its statuses, on whichever node. Never raises for a Redis
        failure."""
        await self._reach("statuses", mailboxes, use_hints=False)

    async def _reach(self, op: str, mailboxes: Iterable[str], *, use_hints: bool) -> None:
        held = self._held
        remote: dict[str, list[tuple[str, int]]] = {}
        unknown: list[str] = []
        now = trio.current_time()
        for mailbox in mailboxes:
            local = held.get(mailbox)
            if local is not None:
                await _poke(local.subscriber, op)
                continue
            hint = self._hints.get(mailbox) if use_hints else None
            if hint is not None and now - hint[0] <= HINT_VALID_S:
                remote.setdefault(hint[1], []).append((mailbox, hint[2]))
            else:
                unknown.append(mailbox)
        try:
            if unknown:
                for mailbox, value in zip(unknown, await self._holders(unknown), strict=True):
                    if value is not None:
                        epoch, node, _ = _parse_holder(value)
                        if node != self.node_id:  # (this node: a claim still being installed pumps itself)
                            remote.setdefault(node, []).append((mailbox, epoch))
            if remote:
                await self._publish_many([(node, {"op": op, "to": to}) for node, to in remote.items()])
        except _REDIS_ERRORS as exc:
            self._failed(f"{op} of {len(unknown) + len(remote)} remote mailboxes", exc)

    def count(self) -> int:
        """How many mailboxes are held on this node."""
        return len(self._held)

    # ------------------------------------------------------------ publishing

    def _count(self, background: bool) -> None:
        if background:
            self.background_round_trips += 1
        else:
            self.round_trips += 1

    async def _publish(self, node: str, message: dict[str, Any], *, background: bool = False) -> int:
        """Send ``message`` to ``node``'s channel; how many listeners got it (0: nobody listens)."""
        self._count(background)
        data = json.dumps(message, separators=(",", ":"))
        if isinstance(self.client, coredis.RedisCluster):
            return int(await self.client.spublish(self.channel_of(node), data))
        return int(await self.client.publish(self.channel_of(node), data))

    async def _publish_many(self, messages: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Send each (node, message): one pipeline."""
        if len(messages) == 1:
            await self._publish(*messages[0])
            return
        self.round_trips += 1
        async with self.client.pipeline(transaction=False) as pipe:
            for node, message in messages:
                data = json.dumps(message, separators=(",", ":"))
                if self._cluster:
                    pipe.spublish(self.channel_of(node), data)
                else:
                    pipe.publish(self.channel_of(node), data)

    def _send_soon(self, node: str, message: dict[str, Any]) -> None:
        """Publish ``message`` to ``node`` from a background task (errors logged)."""

        async def send() -> None:
            try:
                await self._publish(node, message, background=True)
            except _REDIS_ERRORS as exc:
                self._failed(f"sending {message.get('op')} to node {node}", exc)

        self._spawn(send)

    def _spawn(self, task: Callable[[], Awaitable[None]]) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(task)

    # ------------------------------------------------------------ the listener

    async def _listen_forever(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep this node's channel subscribed and handle what arrives; reopen it whenever in doubt."""
        ready = False

        def subscribed() -> None:
            nonlocal ready
            if not ready:
                ready = True
                task_status.started()
            else:
                self._nudge_all()  # whatever came while it was away may be lost: every session recounts
            self._spawn(self._probe_soon)  # an acknowledged subscription can still be gone (see above)

        while True:
            self._listen_scope = trio.CancelScope()
            with self._listen_scope:
                try:
                    await self._listen(subscribed)
                except Exception:  # (coredis's task groups may raise groups): never stop listening
                    log.exception("presence listener of node %s failed, reopening", self.node_id)
            self._pings_heard = self._ping_expected = self._pings_sent  # a fresh subscription is not behind
            await trio.sleep(LISTENER_RETRY_S)

    async def _listen(self, subscribed: Callable[[], None]) -> None:
        """Subscribe to this node's channel and handle its messages; ``subscribed()`` once it is.

        Returns (for the caller to subscribe again) when the subscription is acknowledged a
        second time: coredis reconnected by itself, which is not to be trusted.
        """
        client = self.client
        pubsub = (
            client.sharded_pubsub(channels=[self._channel])
            if isinstance(client, coredis.RedisCluster)
            else client.pubsub(channels=[self._channel])
        )
        async with pubsub as ps:
            acks = 0
            async for message in ps:
                kind = _text(message["type"])
                if kind in ("subscribe", "ssubscribe"):
                    acks += 1
                    if acks > 1:
                        log.error("presence listener of node %s reconnected under us: reopening", self.node_id)
                        return
                    subscribed()
                elif kind in ("message", "smessage"):
                    await self._on_message(message["data"])

    def _nudge_all(self) -> None:
        async def nudge() -> None:
            for held in list(self._held.values()):
                held.subscriber.resync()
                held.subscriber.wake_statuses()
                await held.subscriber.wake()

        if self._held:
            self._spawn(nudge)

    async def _on_message(self, data: object) -> None:
        """Act on one message from the node's channel; a malformed one is logged and ignored."""
        try:
            message = json.loads(_text(data))
            op = message["op"]
            if op == "wake" or op == "resync" or op == "statuses":
                await self._on_reach(op, [(str(m), int(e)) for m, e in message["to"]])
            elif op == "kick":
                self._on_kick(str(message["mailbox"]), int(message["epoch"]), str(message["node"]))
            elif op == "done":
                self._on_done(str(message["mailbox"]), int(message["epoch"]))
            elif op == "ping":
                self._pings_heard = max(self._pings_heard, int(message["n"]))
            else:
                raise ValueError(f"unknown op {op!r}")
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring a malformed presence message %r: %r", data, exc)

    async def _on_reach(self, op: str, targets: list[tuple[str, int]]) -> None:
        held = self._held
        for mailbox, epoch in targets:
            local = held.get(mailbox)
            if local is not None and local.claim.epoch == epoch:  # else superseded: see the module docstring
                await _poke(local.subscriber, op)

    def _on_kick(self, mailbox: str, epoch: int, node: str) -> None:
        """Node ``node`` claimed ``mailbox`` with ``epoch``: drop and kick an older local holder; answer done."""
        local = self._held.get(mailbox)
        if local is not None and local.claim.epoch < epoch:
            log.info("%s: %s taken over by node %s", local.claim.owner, mailbox, node)
            self._superseded(mailbox, local, node, epoch)
        else:
            self._send_soon(node, {"op": "done", "mailbox": mailbox, "epoch": epoch})

    def _superseded(self, mailbox: str, local: _Held, node: str, epoch: int) -> None:
        """``local`` lost ``mailbox`` to claim ``epoch`` on ``node``: drop it, kick it, tell ``node`` once it ends."""
        self._drop(mailbox, local)
        local.subscriber.kick(ErrorCode.CONNECTED_ELSEWHERE, _KICK_MESSAGE)

        async def finish() -> None:
            with trio.move_on_after(self.takeover_wait_s):
                await local.subscriber.finished.wait()
            try:
                await self._publish(node, {"op": "done", "mailbox": mailbox, "epoch": epoch}, background=True)
            except _REDIS_ERRORS as exc:
                self._failed(f"telling node {node} that {mailbox} is free", exc)

        self._spawn(finish)

    def _on_done(self, mailbox: str, epoch: int) -> None:
        waiting = self._done.get((mailbox, epoch))
        if waiting is not None:
            waiting.set()
            return
        local = self._held.get(mailbox)
        if local is not None and local.claim.epoch == epoch:
            # The claim stopped waiting before the old holder ended: pick up what it absorbed since.
            async def nudge() -> None:
                local.subscriber.resync()
                local.subscriber.wake_statuses()
                await local.subscriber.wake()

            self._spawn(nudge)

    # ------------------------------------------------------------ leases and health

    async def _renew_forever(self) -> None:
        while True:
            await trio.sleep(self.lease_s / 3)
            try:
                await self._renew()
                await self._probe()
            except _REDIS_ERRORS as exc:
                self._failed(f"presence renewal of node {self.node_id}", exc)
            self._prune_hints()

    async def _renew(self) -> None:
        """Extend the lease of every mailbox held here (one pipeline); kick sessions whose claim was taken."""
        held = list(self._held.items())
        if not held:
            return
        self.background_round_trips += 1
        lease_ms = self._lease_ms
        async with self.client.pipeline(transaction=False) as pipe:
            requests: list[Awaitable[Any]] = [
                self._renew_script(
                    keys=[self._key(m, "holder"), self._key(m, "epoch")],
                    args=[h.value, str(h.claim.epoch), lease_ms, EPOCH_KEEP_S * 1000],
                    client=pipe,
                )
                for m, h in held
            ]
        for (mailbox, local), request in zip(held, requests, strict=True):
            result = await request
            if self._held.get(mailbox) is not local:
                if result == 2:  # released meanwhile, maybe before the renewal set it again: release it again
                    suffix = local.value[local.value.index("|") :]
                    await self._release_value(mailbox, suffix, str(local.claim.epoch), background=True)
                continue
            if result == 1 or result == 2:
                continue
            log.info("%s: renewal found %s taken over (now %r)", local.claim.owner, mailbox, result)
            try:
                epoch, node, _ = _parse_holder(result) if result is not None else (0, "", "")
            except ValueError:
                epoch, node = 0, ""
            if node and node != self.node_id:
                self._superseded(mailbox, local, node, epoch)
            else:
                self._drop(mailbox, local)
                local.subscriber.kick(ErrorCode.CONNECTED_ELSEWHERE, _KICK_MESSAGE)

    async def _probe_soon(self) -> None:
        await trio.sleep(PROBE_AFTER_S)
        try:
            await self._probe()
        except _REDIS_ERRORS as exc:
            self._failed(f"presence probe of node {self.node_id}", exc)

    async def _probe(self) -> None:
        """Ping this node's own channel; reopen the subscription if nobody listens or the last ping was not heard."""
        now = trio.current_time()
        behind = self._pings_heard < self._ping_expected and now - self._ping_expected_at >= PING_GRACE_S
        self._pings_sent += 1
        receivers = await self._publish(self.node_id, {"op": "ping", "n": self._pings_sent}, background=True)
        if receivers and not self._pings_heard < self._ping_expected:
            self._ping_expected, self._ping_expected_at = self._pings_sent, now
        if not receivers or behind:
            log.error(
                "presence listener of node %s is deaf (%s): reopening",
                self.node_id,
                "no subscriber" if not receivers else "a ping was not heard",
            )
            self._listen_scope.cancel()

    def _prune_hints(self) -> None:
        oldest = trio.current_time() - HINT_VALID_S
        self._hints = {m: h for m, h in self._hints.items() if h[0] >= oldest}


async def _poke(subscriber: Subscriber, op: str) -> None:
    """Tell a local session what a ``wake``, ``resync`` or ``statuses`` message (or call) says."""
    if op == "wake":
        await subscriber.wake()
    elif op == "resync":
        subscriber.resync()
    else:
        subscriber.wake_statuses()


@asynccontextmanager
async def open_redis_presence(
    client: coredis.Redis[Any] | coredis.RedisCluster[Any],
    *,
    node_id: str,
    prefix: str = "relay",
    lease_s: float = LEASE_S,
    takeover_wait_s: float = TAKEOVER_WAIT_S,
    health: StoreHealth | None = None,
) -> AsyncIterator[RedisPresence]:
    """A running :class:`RedisPresence` for the block: subscribed to its node's channel, renewing leases.

    ``async with open_redis_presence(client, node_id=..., prefix=...) as presence:``. The
    client must be open (``async with coredis.Redis(...)``) for the whole block. Entering
    waits until the node's channel is subscribed. Leaving stops the background tasks
    without releasing anything: sessions release their own claims, and whatever is left
    ends with its lease. Raises ValueError for a bad ``node_id`` or ``prefix``.
    """
    presence = RedisPresence(
        client, node_id=node_id, prefix=prefix, lease_s=lease_s, takeover_wait_s=takeover_wait_s, health=health
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(presence.run)
        try:
            yield presence
        finally:
            nursery.cancel_scope.cancel()
