"""Routing: the one funnel every transport's SENDs and ACKs go through.

Theory of operation. :func:`plan_send` is pure: it judges one SEND against the limits
(whole-SEND refusals first, then each recipient) and fixes its times from ``now_ms``.
:meth:`Router.route` plans a batch, stores what passed with one ``store.enqueue_many``
call, asks presence once which recipients are online, and builds each SEND's outcome
with :func:`recipient_result`. It returns the outcomes and the mailboxes to wake, and
wakes nobody (mqttproto's ``publish`` is the model): the caller does
``await presence.wake(routed.wake)``, before it writes the receipts, so an online
recipient's DELIVER goes out before the sender's RECEIPT. The session encodes outcomes
as RECEIPT frames, the HTTP API as JSON: one rule set, whatever the transport.
:meth:`Router.acknowledge` is the same for ACKs, and :meth:`Router.cleanup` is the one
expiry path (the sweeper, operator CLEANUP over TCP/WebSocket and HTTP): purge, then
tell presence which mailboxes must recount. The router's clock stamps and judges
(``now_ms``); counters go to :class:`~broker.stats.Counters`.

Delivery statuses (protocol.md section 9, rule 19). A SEND's ``notify`` goes into its
stored message. The store says when such a message ends: an ACK that deleted it
(``AckResult.notices``, "delivered"), or its expiry found by the sweep (``Purged.notices``)
or by a delivery fetch (``Batch.notices``, handed over by the delivery pump), "expired".
Every one of those goes through :meth:`Router.report`, the one place notices go: one
``store.add_statuses`` call queues them in their senders' mailboxes, then
``presence.wake_statuses`` wakes the senders' sessions wherever they are. Messages without
``notify`` give no notices, so they cost nothing here. If the store does not take the
statuses (OSError, after it took the ACK or the purge), they are lost: logged, counted
(``statuses_lost_total``) and reported to the health, and the ACK or purge still stands.

Key directory (protocol.md section 9, rule 20): :meth:`Router.put_key` and
:meth:`Router.get_keys` are the one path of KEY_PUT/KEY_GET and the HTTP API's
``/relay/keys``. A put is verified for the *authenticated* mailbox the caller passes
(``wire.e2e.verify_key_record``), then stored under it with ``key_ttl_s``; a lookup drops
the elements that are not mailbox ids and repeats, then asks the store once.

A store that cannot be reached (OSError from ``enqueue_many``) fails the batch, not the
caller: every SEND of it that had something to store gets a RECEIPT refused as a whole
with 3008 STORE_UNREACHABLE, which claims nothing either way (a pipeline that failed
mid-way may have stored some of it: the sender resends with the same id and gets
"duplicate" where it was); SENDs refused before storing keep their own outcome. If only
``presence.online`` fails, the messages are stored: their results are "queued" (true),
never "delivered" (not known), and every recipient is woken (a local session pumps at
once; remote ones fetch at their next pump). Either failure is reported to the node's
:class:`~broker.health.StoreHealth`. ACKs are not caught here: the session keeps them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from wire import DELIVER_OVERHEAD_BYTES, ErrorCode, KeyRecord, RecipientResult, Send, Status, is_valid_mailbox_id
from wire.e2e import verify_key_record

from .config import BrokerConfig
from .health import StoreHealth
from .limits import Limiter, retry_after_ms
from .presence import Presence
from .stats import Counters
from .store.base import AckResult, Clock, HeldStatus, Message, NewMessage, Notice, Outcome, Store

__all__ = ["Acked", "Plan", "Routed", "Router", "SendOutcome", "plan_send", "recipient_result"]

log = logging.getLogger(__name__)

_QUEUED = RecipientResult(Status.QUEUED)
_DELIVERED = RecipientResult(Status.DELIVERED)
_DUPLICATE = RecipientResult(Status.DUPLICATE)
_REFUSED = {code: RecipientResult(Status.REFUSED, int(code)) for code in ErrorCode}
_STORED = Outcome.STORED  # a module constant: an Enum member read off its class is a generic lookup in 3.11


@dataclass(slots=True)
class Plan:
    """What :func:`plan_send` decided for one SEND."""

    message: NewMessage | None
    """What to store, for the recipients that passed; None if none did."""
    refused: dict[str, int]
    """Recipients refused before storing, with their error codes."""
    code: int | None = None
    """The whole SEND is refused with this code (no recipient is looked at, nothing is stored)."""
    retry_after_ms: int | None = None
    """With RATE_LIMITED: when the sender may send again."""


Admit = Callable[[int], float | None]
"""A SEND's rate check: given its body's length, None (admitted, its tokens taken) or the seconds to wait."""


def plan_send(
    send: Send,
    sender: str,
    *,
    now_ms: int,
    default_ttl_s: int,
    max_ttl_s: int,
    max_recipients: int,
    max_body_bytes: int,
    expiries: dict[int, int] | None = None,
    admit: Admit | None = None,
) -> Plan:
    """Validate a SEND's recipients and body size and fix its times. The sender is the authenticated mailbox.

    Rules that concern the whole SEND come first, in this order, and refuse it as a whole with one code:
    more than ``max_recipients`` distinct recipients (TOO_MANY_RECIPIENTS), then a body longer than
    ``max_body_bytes`` (BODY_TOO_LARGE), then the sender's rate (``admit``, the abuse limits: RATE_LIMITED with
    ``retry_after_ms``; a SEND refused by the first two takes no tokens). Such a receipt echoes no recipient, so
    every receipt stays within ``receipt_bound_bytes(max_recipients)``. Then each recipient is judged on its own.

    ``expiries`` (TTL -> expires_at), shared across one batch, lets its messages share their expiry objects.
    Raises nothing.
    """
    recipients = tuple(dict.fromkeys(send.to)) if len(send.to) > 1 else send.to
    if len(recipients) > max_recipients:
        return Plan(None, {}, ErrorCode.TOO_MANY_RECIPIENTS)
    if len(send.body) > max_body_bytes:
        return Plan(None, {}, ErrorCode.BODY_TOO_LARGE)
    if admit is not None and (wait_s := admit(len(send.body))) is not None:
        return Plan(None, {}, ErrorCode.RATE_LIMITED, retry_after_ms(wait_s))
    refused: dict[str, int] = {}
    for rcpt in recipients:
        if not is_valid_mailbox_id(rcpt):
            refused[rcpt] = ErrorCode.INVALID_RECIPIENT
    if refused:
        recipients = tuple(r for r in recipients if r not in refused)
        if not recipients:
            return Plan(None, refused)
    ttl_s = default_ttl_s if send.ttl_s is None else min(send.ttl_s, max_ttl_s)
    if expiries is None:
        expires_at = now_ms + ttl_s * 1000
    elif (expires_at := expiries.get(ttl_s, -1)) < 0:
        # One int object per TTL per batch, shared by every message held: 32 bytes a message saved.
        expires_at = expiries[ttl_s] = now_ms + ttl_s * 1000
    message = NewMessage(send.id, sender, recipients, send.body, now_ms, expires_at, send.notify)
    return Plan(message, refused)


def recipient_result(outcome: Outcome, online: bool) -> RecipientResult:
    """The result a sender sees for one recipient, from the store's outcome. Raises nothing."""
    if outcome is _STORED:
        return _DELIVERED if online else _QUEUED
    if outcome is Outcome.DUPLICATE:
        return _DUPLICATE
    assert outcome.code is not None
    return _REFUSED[outcome.code]


@dataclass(slots=True)
class SendOutcome:
    """What became of one SEND: a RECEIPT's fields (``results`` per recipient, or ``code`` if refused whole).

    Not frozen, as :class:`Plan`: one is made per SEND, and a frozen dataclass pays a generic
    ``object.__setattr__`` per field to be built. Nothing changes one after it is returned.
    """

    id: str
    results: Mapping[str, RecipientResult]
    code: int | None = None
    retry_after_ms: int | None = None
    """Only with ``code`` RATE_LIMITED: when the sender may send again."""


@dataclass(frozen=True, slots=True)
class Routed:
    """What :meth:`Router.route` did: one outcome per SEND, in order, and the mailboxes to wake."""

    receipts: list[SendOutcome]
    wake: list[str]
    """Online recipients that now hold new messages (each once): pass to ``presence.wake``."""


@dataclass(frozen=True, slots=True)
class Acked:
    """What :meth:`Router.acknowledge` did."""

    result: AckResult
    resync: tuple[str, ...]
    """The mailbox, if anything was deleted: its live session recounts its window (``presence.resync``)
    unless the ACK came over that session, which applies ``result`` itself."""


class Router:
    """SEND and ACK from any transport, and the expiry sweep; see the module docstring."""

    def __init__(
        self,
        config: BrokerConfig,
        store: Store,
        presence: Presence,
        counters: Counters,
        *,
        clock: Clock,
        health: StoreHealth,
        limiter: Limiter | None = None,
    ) -> None:
        self.config = config
        self.limiter = limiter
        """The abuse limits every SEND is judged by (:func:`plan_send`); None: no limits."""
        self.health = health
        self.store = store
        self.presence = presence
        self.counters = counters
        self.clock = clock
        self._max_body_bytes = config.max_frame_bytes - DELIVER_OVERHEAD_BYTES
        self._status_ttl_ms = config.default_ttl_s * 1000
        self._key_ttl_ms = config.key_ttl_s * 1000

    def plan(self, sends: Sequence[Send], sender: str, now: int, address: str | None = None) -> list[Plan]:
        """Plan each SEND of a batch at ``now`` (the router's clock, epoch ms), in order; pure but for the abuse
        limits' tokens, which the SENDs admitted from ``address`` (the sender's IP, None if not known) spend."""
        config = self.config
        expiries: dict[int, int] = {}
        limiter = self.limiter
        admit: Admit | None = None
        if limiter is not None and not limiter.exempt(address):

            def admit(body_bytes: int) -> float | None:
                refused = limiter.send(address, sender, body_bytes)
                return None if refused is None else refused[1]

        return [
            plan_send(
                s,
                sender,
                now_ms=now,
                default_ttl_s=config.default_ttl_s,
                max_ttl_s=config.max_ttl_s,
                max_recipients=config.max_recipients,
                max_body_bytes=self._max_body_bytes,
                expiries=expiries,
                admit=admit,
            )
            for s in sends
        ]

    async def route(self, sender: str, sends: Sequence[Send], address: str | None = None) -> Routed:
        """Store a batch of SENDs from ``sender`` (connected from ``address``, for the abuse limits); their
        outcomes, in order, and whom to wake.

        A store or presence that cannot be reached (OSError) is answered in the outcomes (module
        docstring) and reported to the health; anything else they raise propagates.
        """
        now = self.clock()
        plans = self.plan(sends, sender, now, address)
        messages = [p.message for p in plans if p.message is not None]
        if not messages:
            return Routed([self._refused_only(s, p) for s, p in zip(sends, plans, strict=True)], [])
        try:
            stored = await self.store.enqueue_many(messages, now)
        except OSError as exc:
            self.health.failed(exc)
            return Routed([self._unconfirmed(s, p) for s, p in zip(sends, plans, strict=True)], [])
        recipients = {r for m in messages for r in m.recipients}
        try:
            online = await self.presence.online(recipients)
        except OSError as exc:  # stored, but who is online is not known: "queued", and wake them all
            self.health.failed(exc)
            online = frozenset()
            wake_all = True
        else:
            wake_all = False
        counters = self.counters
        outcomes = iter(stored)
        receipts = []
        wake: dict[str, None] = {}
        sent = 0  # counted once per batch
        for send, plan in zip(sends, plans, strict=True):
            message = plan.message
            if message is None:
                receipts.append(self._refused_only(send, plan))
                continue
            results = self._refusals(plan) if plan.refused else {}
            for rcpt, outcome in zip(message.recipients, next(outcomes), strict=True):
                is_online = rcpt in online
                results[rcpt] = recipient_result(outcome, is_online)
                if outcome is _STORED:
                    sent += 1
                    if is_online:
                        wake[rcpt] = None
                elif outcome is Outcome.DUPLICATE:
                    counters.duplicates += 1
                else:
                    assert outcome.code is not None
                    counters.refuse(outcome.code)
            receipts.append(SendOutcome(send.id, results))
        counters.sent += sent
        return Routed(receipts, list(recipients) if wake_all else list(wake))

    def _refusals(self, plan: Plan) -> dict[str, RecipientResult]:
        """The results of the recipients refused before storing (counted)."""
        results: dict[str, RecipientResult] = {}
        for rcpt, code in plan.refused.items():
            results[rcpt] = _REFUSED[ErrorCode(code)]
            self.counters.refuse(code)
        return results

    def _unconfirmed(self, send: Send, plan: Plan) -> SendOutcome:
        """The outcome of a SEND of a batch the store failed to take: 3008 if it had anything to store."""
        if plan.message is None:
            return self._refused_only(send, plan)
        return SendOutcome(send.id, {}, int(ErrorCode.STORE_UNREACHABLE))

    def _refused_only(self, send: Send, plan: Plan) -> SendOutcome:
        """The outcome of a SEND that stored nothing: refused whole, or every recipient refused."""
        if plan.code is not None:
            self.counters.refuse(plan.code)
            return SendOutcome(send.id, {}, int(plan.code), plan.retry_after_ms)
        return SendOutcome(send.id, self._refusals(plan))

    async def acknowledge(self, mailbox: str, ids: Sequence[str]) -> Acked:
        """Delete ACKed messages of ``mailbox`` (valid whoever sends them); "delivered" statuses for those
        sent with ``notify`` (:meth:`report`). Raises what the store's ACK raises (never for the statuses)."""
        result = await self.store.ack_many(mailbox, ids, self.clock())
        self.counters.acknowledged += result.deleted
        if result.notices:
            await self.report(result.notices)
        return Acked(result, (mailbox,) if result.deleted else ())

    async def report(self, notices: Sequence[Notice]) -> None:
        """Queue ``notices`` as statuses in their senders' mailboxes and wake those senders: the one place
        notices go (module docstring). Never raises for the store's OSError: the statuses are then lost
        (logged, counted as ``statuses_lost_total``, reported to the health)."""
        if not notices:
            return
        try:
            mailboxes = await self.store.add_statuses(notices, self.clock(), self._status_ttl_ms)
        except OSError as exc:
            self.health.failed(exc)
            self.counters.statuses_lost += len(notices)
            log.warning("%d delivery statuses lost: the store did not take them (%r)", len(notices), exc)
            return
        if mailboxes:
            await self.presence.wake_statuses(mailboxes)

    async def statuses(self, mailbox: str, after_seq: int, limit: int) -> list[HeldStatus]:
        """Up to ``limit`` unexpired statuses of ``mailbox`` with ``seq`` above ``after_seq``, in seq order;
        nothing changes state. Raises what the store raises."""
        return await self.store.fetch_statuses(mailbox, after_seq, limit, self.clock())

    async def acknowledge_statuses(self, mailbox: str, seqs: Sequence[int]) -> int:
        """Delete these statuses of ``mailbox`` (unknown seqs are ignored); how many were deleted.
        Raises what the store raises."""
        deleted = await self.store.ack_statuses(mailbox, seqs)
        self.counters.statuses_acked += deleted
        return deleted

    async def put_key(self, mailbox: str, record: KeyRecord) -> ErrorCode | None:
        """Publish ``record`` as ``mailbox``'s key record (``mailbox``: the caller's authenticated one).

        None if it is stored (replacing the previous one); INVALID_KEY if its signature does not
        verify for ``mailbox`` (nothing stored); STORE_UNREACHABLE if the store could not be
        reached (reported to the health; maybe not stored). Raises nothing else.
        """
        if not verify_key_record(mailbox, record):
            self.counters.keys_put_refused += 1
            return ErrorCode.INVALID_KEY
        try:
            await self.store.put_key(mailbox, record, self.clock(), self._key_ttl_ms)
        except OSError as exc:
            self.health.failed(exc)
            return ErrorCode.STORE_UNREACHABLE
        self.counters.keys_put += 1
        return None

    async def get_keys(self, mailboxes: Sequence[str]) -> dict[str, KeyRecord]:
        """The current key records of these mailboxes (any text: what is not a mailbox id has none),
        keyed in order of first appearance. Raises what the store raises (OSError)."""
        wanted = [m for m in dict.fromkeys(mailboxes) if is_valid_mailbox_id(m)]
        self.counters.key_lookups += len(wanted)
        if not wanted:
            return {}
        return await self.store.get_keys(wanted, self.clock())

    async def peek(self, mailbox: str, limit: int) -> list[Message]:
        """Up to ``limit`` held, unexpired messages of ``mailbox``, oldest first; nothing changes state."""
        return await self.store.peek(mailbox, limit, self.clock())

    async def pending(self, mailbox: str) -> int:
        """How many unexpired messages ``mailbox`` holds (queued and in flight)."""
        return await self.store.pending(mailbox, self.clock())

    async def cleanup(self) -> int:
        """Purge expired messages now and have their mailboxes' sessions recount; returns how many.

        The one expiry path: the sweeper, operator CLEANUP and the HTTP API all call it.
        Raises what the store or presence raises.
        """
        purged = await self.store.purge_expired(self.clock())
        if purged.mailboxes:
            await self.presence.resync(purged.mailboxes)
        if purged.notices:
            await self.report(purged.notices)
        log.info("sweep purged %d expired messages", purged.count)
        return purged.count
