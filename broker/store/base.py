"""The store interface: where messages wait between SEND and ACK.

Theory of operation: the store owns every held message and each mailbox's delivery
state (which messages are queued, which are in flight to the mailbox's session).
Calls are async and batch-oriented because a networked store (Redis) pays a round trip
per call; the in-memory store never yields inside them. The store has no clock: every
call that judges time takes ``now_ms`` (Unix epoch milliseconds) from the broker, whose
one clock also stamps ``sent_at`` and ``expires_at``. Delivery state is fenced by a
:class:`Claim` (from presence): the newest claim that fetched from a mailbox is its
*fence*, and an older claim can neither fetch nor give messages back, so a session that
was taken over (on this node or another) cannot disturb its successor's deliveries.

Contract (checked by ``tests/store/test_contract.py`` against every implementation):
- ``enqueue_many`` stores each message for each recipient atomically per recipient and
  reports, per recipient, an :class:`Outcome`: STORED, DUPLICATE (held or tombstoned,
  same sender), ID_CONFLICT (the same, another sender), then the capacity refusals
  MAILBOX_FULL, MAILBOX_BYTES_FULL, BROKER_FULL in that order. Nothing else happens to
  a message it reports as refused.
- ``fetch_many`` hands out queued messages of one mailbox, oldest accepted first (at
  most ``limit`` of them and about ``max_bytes`` of bodies), marks them in flight and
  increments their attempt. A message is expired when ``now_ms`` >= ``expires_at``;
  expired messages are never returned (they are removed and counted as expired).
  A claim with a newer epoch than the fence first returns every in-flight message to
  the queue (the old owner's deliveries go to the new one) and becomes the fence; a
  claim that is not the fence and not newer gets ``Batch(fenced=True)`` and changes
  nothing.
- ``release`` (the fence only) puts every in-flight message back at the front of the
  queue, in order; those in ``unwritten`` were never written to the peer, so their
  attempt goes back down. A stale claim's release changes nothing.
- ``ack_many`` deletes messages of that mailbox only, whoever asks (an ACK may come
  over HTTP); unknown ids are ignored. An ACKed id is remembered (a tombstone) until the
  message would have expired, at most ``max_tombstones`` of them (oldest ACK forgotten
  first), so a retried SEND of it is a DUPLICATE (or ID_CONFLICT from another sender).
- Messages handed out (:class:`Message`) are immutable snapshots: nothing the store
  does later changes them.
- A mailbox with no messages holds no memory (its fence may be forgotten with it).
- ``statistics`` counts the mailboxes holding messages by how many they hold (expired unswept ones included), in
  the buckets of :data:`MAILBOX_DEPTH_BOUNDS` (``mailbox_depths``), kept as each call changes a mailbox: O(1) per
  mailbox a call touches, nothing computed at scrape time.

Delivery status (protocol.md section 9, "Delivery status"): a message stored with
``notify`` gives exactly one :class:`Notice` for its sender when it leaves the store:
DELIVERED (``at`` = the ACK's ``now_ms``) in the :class:`AckResult` of the ``ack_many``
that deleted it, or EXPIRED (``at`` = its ``expires_at``) in the :class:`Batch` of the
``fetch_many`` or the :class:`Purged` of the ``purge_expired`` that removed it as expired.
A duplicate ACK, an unknown id, or a message without ``notify`` gives none. The store does
not queue notices itself (the sender's mailbox may live elsewhere, e.g. another Redis
slot): the broker hands them to ``add_statuses``. Each mailbox then has a *status lane*:
- ``add_statuses`` keeps each notice as a :class:`HeldStatus` (``expires_at`` = ``now_ms`` +
  ``ttl_ms``) numbered by :func:`next_status_seq`, unless the lane already holds
  ``max_mailbox_statuses`` of them: then it is folded into the lane's one OVERFLOW record
  (made with count 1, else count + 1), which is renumbered (a new seq, last in the lane),
  gets ``at`` = ``now_ms`` and a new ``expires_at``; its ``first_seq`` is the seq it was
  made with. A lane holds at most ``max_mailbox_statuses`` records plus that one.
- ``fetch_statuses`` hands out unexpired records after a seq, ascending, changing nothing but
  removing the expired ones it meets; ``ack_statuses`` deletes records by seq (unknown
  ignored); ``purge_expired`` removes every expired record (``now_ms`` >= ``expires_at``).
- Seqs grow in each lane for good, also across a lane that was emptied and forgotten (an
  empty lane holds no memory beyond what :func:`next_status_seq` needs), so a reader's
  cursor ("everything after seq s") never skips a newer record.

Key directory (protocol.md section 9, "Key directory"): ``put_key`` holds one
:class:`~wire.KeyRecord` per mailbox, replacing the previous one, until ``now_ms + ttl_ms``
(a put renews it); ``get_keys`` returns the records of the given mailboxes that are held
and not expired (``now_ms`` < expiry), keyed by mailbox in the order of their first
appearance, each exactly as put; a mailbox without one (or given twice) adds nothing.
The store does not check signatures (the broker does, before it puts) nor mailbox syntax
(the broker passes only valid ids). ``purge_expired`` removes expired records too.
"""

from __future__ import annotations

import enum
import time
from bisect import bisect_left
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from wire import ErrorCode, KeyRecord, ReportState

__all__ = [
    "MAILBOX_DEPTH_BOUNDS",
    "AckResult",
    "Batch",
    "Claim",
    "Clock",
    "HeldStatus",
    "Message",
    "NewMessage",
    "Notice",
    "Outcome",
    "Purged",
    "Store",
    "StoreLimits",
    "StoreStatistics",
    "depth_bucket",
    "next_status_seq",
    "wall_clock_ms",
]

Clock = Callable[[], int]
"""Returns the current time as Unix epoch milliseconds (the broker's; the store takes ``now_ms``)."""


def wall_clock_ms() -> int:
    """The real clock: Unix epoch milliseconds. Never raises."""
    return time.time_ns() // 1_000_000


MAILBOX_DEPTH_BOUNDS: tuple[int, ...] = (1, 2, 5, 10, 50, 100, 500, 1000, 5000, 10_000, 50_000, 100_000)
"""Upper bounds of the mailbox depth buckets (messages held): a mailbox holding n messages is in the first bucket
whose bound is >= n, or in the last one (above every bound; only if ``max_mailbox_messages`` was raised past the
default 100,000). A store keeps one count per bucket (``StoreStatistics.mailbox_depths``)."""


def depth_bucket(held: int) -> int:
    """The index of the depth bucket of a mailbox holding ``held`` (>= 1) messages (:data:`MAILBOX_DEPTH_BOUNDS`)."""
    return bisect_left(MAILBOX_DEPTH_BOUNDS, held)


def next_status_seq(last_seq: int, now_ms: int) -> int:
    """The seq of the next status of a lane whose newest seq so far is ``last_seq`` (0: none).

    ``max(last_seq + 1, now_ms * 1000)``: increasing within a lane, and above any seq given
    before ``now_ms`` (up to 1,000 a millisecond), so a lane that was emptied and forgotten
    starts above its old seqs as long as the store remembers a ``last_seq`` for it until
    ``now_ms * 1000`` has passed that (the memory store keeps one for all lanes, the Redis
    store one per lane for a while: see each). Below 2**53 (a safe JavaScript integer) for
    any date before the year 2255. The Redis store's scripts compute the same in Lua.
    """
    return max(last_seq + 1, now_ms * 1000)


class Outcome(enum.Enum):
    """What ``enqueue_many`` did with a message for one recipient.

    ``code`` is the ErrorCode a refusal reports (None for STORED and DUPLICATE).
    """

    STORED = "stored"
    """The message is now held for the recipient."""
    DUPLICATE = "duplicate"
    """The same sender's message with this id is held (or was ACKed and is tombstoned); nothing stored."""
    MAILBOX_FULL = ErrorCode.MAILBOX_FULL
    """The recipient's mailbox holds ``max_mailbox_messages`` already."""
    MAILBOX_BYTES_FULL = ErrorCode.MAILBOX_BYTES_FULL
    """The body would take the recipient's mailbox past ``max_mailbox_bytes``."""
    BROKER_FULL = ErrorCode.BROKER_FULL
    """The body would take the store past ``max_total_bytes``."""
    ID_CONFLICT = ErrorCode.ID_CONFLICT
    """Another sender's message with this id is held or tombstoned for the recipient."""

    code: ErrorCode | None

    def __init__(self, value: str | ErrorCode) -> None:
        # A plain attribute, not a property: read once per refused recipient on the SEND path.
        self.code = value if isinstance(value, ErrorCode) else None


@dataclass(frozen=True, slots=True)
class Claim:
    """Who may take a mailbox's deliveries: its owner (a session) and the epoch presence gave it.

    A store keeps, per mailbox, the newest claim that fetched from it (the fence): a fetch with
    a newer epoch takes over the in-flight messages; any other claim that is not equal to the
    fence (an older epoch, or the same epoch for another owner) is stale and changes nothing.
    Epochs must grow for each mailbox (a broker-wide counter will do).
    """

    owner: str
    epoch: int


class Message(NamedTuple):
    """A message held for one recipient, as the store hands it out (immutable: a snapshot).

    ``attempt`` counts the deliveries handed out so far, this one included when it comes
    from ``fetch_many``.
    """

    id: str
    sender: str
    recipient: str
    body: bytes
    sent_at: int
    expires_at: int
    attempt: int
    notify: bool = False
    """The SEND asked for a status (the sender gets one when this message is ACKed or expires)."""


class Notice(NamedTuple):
    """A status to queue in ``mailbox``'s lane (the sender's): what became of message ``id`` for ``recipient``.

    Made by the store (``ack_many``, ``fetch_many``, ``purge_expired``) for messages stored
    with ``notify``; the broker passes it to ``add_statuses``. ``at`` is epoch ms: the ACK's
    ``now_ms`` (DELIVERED) or the message's ``expires_at`` (EXPIRED).
    """

    mailbox: str
    id: str
    recipient: str
    state: ReportState
    at: int


@dataclass(frozen=True, slots=True)
class HeldStatus:
    """A status held in a mailbox's lane, as ``fetch_statuses`` hands it out (immutable: a snapshot).

    A frozen dataclass, not a NamedTuple: a field called ``count`` would hide ``tuple.count``.

    DELIVERED and EXPIRED name ``id`` and ``recipient`` (``count`` and ``first_seq`` None);
    OVERFLOW has ``count`` (notices folded into it) and ``first_seq`` (its seq when it was
    made, kept as it is renumbered), ``id`` and ``recipient`` None. ``at`` is epoch ms.
    """

    seq: int
    state: ReportState
    at: int
    id: str | None
    recipient: str | None
    count: int | None
    expires_at: int
    first_seq: int | None = None


@dataclass(frozen=True, slots=True)
class Purged:
    """What ``purge_expired`` removed: how many messages, and from which mailboxes (statuses not counted)."""

    count: int
    mailboxes: frozenset[str]
    notices: Sequence[Notice] = ()
    """EXPIRED notices for the removed messages that were stored with ``notify``."""


@dataclass(frozen=True, slots=True)
class StoreStatistics:
    """The store's part of protocol.md section 10 (the names are the STATS keys), and its figures only the metrics
    show (fields with ``metadata={"stats": False}``)."""

    messages_total: int
    messages_deliverable: int
    messages_expired_unswept: int
    acknowledged_total: int
    unique_recipients: int
    queued_bytes: int
    expired_total: int
    tombstones: int
    inflight: int
    statuses_held: int
    """Status records held in every lane (overflow records and expired unswept ones included)."""
    statuses_total: int
    """Notices ``add_statuses`` took, ever (those folded into overflow records included)."""
    statuses_overflowed_total: int
    """Notices folded into an overflow record instead of kept one by one, ever."""
    statuses_expired_total: int
    """Status records removed because they expired, ever (an overflow record counts one)."""
    mailbox_depths: tuple[int, ...] = field(metadata={"stats": False})
    """Mailboxes holding messages by how many they hold: one count per bucket of :data:`MAILBOX_DEPTH_BOUNDS`, then
    those above every bound (not cumulative; their sum is ``unique_recipients``). Not a STATS key: ``GET /metrics``
    renders it (``relay_mailbox_depth``)."""


@dataclass(frozen=True, slots=True)
class StoreLimits:
    """Per-mailbox and global bounds the store enforces at enqueue time.

    The one place these defaults are written: the broker configuration derives its
    fields' defaults from this class (keep the field names in step).
    """

    max_mailbox_messages: int = 100_000
    max_mailbox_bytes: int = 64 * 1024 * 1024
    max_total_bytes: int = 1024 * 1024 * 1024
    max_tombstones: int = 100_000
    max_mailbox_statuses: int = 10_000


class NewMessage(NamedTuple):
    """One accepted SEND: the same message for one or more recipients (distinct, valid ids).

    Immutable; a NamedTuple because the router makes one per SEND (the cheapest immutable record).
    """

    id: str
    sender: str
    recipients: tuple[str, ...]
    body: bytes
    sent_at: int
    expires_at: int
    notify: bool = False
    """The SEND asked for a status per recipient (protocol.md section 9, "Delivery status")."""


@dataclass(frozen=True, slots=True)
class Batch:
    """What ``fetch_many`` handed out, and the mailbox's state after it."""

    messages: Sequence[Message]
    queued: int
    """Messages still waiting to be delivered (not in flight)."""
    inflight: int
    """Messages handed out to the fence and not yet ACKed or released."""
    fenced: bool = False
    """True if the claim was stale: nothing was handed out (``queued`` and ``inflight`` say 0)."""
    notices: Sequence[Notice] = ()
    """EXPIRED notices for the messages with ``notify`` this fetch removed as expired."""


@dataclass(frozen=True, slots=True)
class AckResult:
    deleted: int
    """How many of the ids were held for this mailbox and are now deleted."""
    inflight: int
    """Messages still in flight for the mailbox after the ACK."""
    notices: Sequence[Notice] = ()
    """One DELIVERED notice per deleted message that was stored with ``notify``."""


class Store(Protocol):
    """Where messages wait. See the module docstring for the contract. No method raises for an
    unknown mailbox or id; a networked store's methods raise its connection errors as OSError
    (the Redis store: :class:`broker.redis_client.RedisUnavailable`, a ConnectionError)."""

    synchronous: bool
    """True if no method ever yields to the scheduler (no checkpoint: the in-memory store).
    The broker then delivers a new message from the sender's task, since nothing can
    interleave with it; otherwise each mailbox's own task does all of its delivering."""

    async def enqueue_many(self, messages: Sequence[NewMessage], now_ms: int) -> list[list[Outcome]]:
        """For each message, one outcome per recipient (same order). ``now_ms`` judges tombstones."""
        ...

    async def fetch_many(self, mailbox: str, claim: Claim, limit: int, max_bytes: int, now_ms: int) -> Batch:
        """Up to ``limit`` queued, unexpired messages, oldest first, now in flight with attempt + 1.

        Stops before the bodies would pass ``max_bytes``, but always returns at least one
        message if any is queued and ``limit`` > 0. ``limit`` 0 only recounts (and fences).
        A newer claim than the fence takes over the in-flight messages first; a stale claim
        gets ``Batch((), 0, 0, fenced=True)``.
        """
        ...

    async def release(self, mailbox: str, claim: Claim, unwritten: Collection[str] = ()) -> int:
        """If ``claim`` is the fence: every in-flight message back to the front of the queue, in
        order, the attempt of those in ``unwritten`` lowered by one; returns how many. Else 0."""
        ...

    async def ack_many(self, mailbox: str, ids: Sequence[str], now_ms: int) -> AckResult:
        """Delete these messages of ``mailbox`` (in flight or queued); ids not held there are ignored.

        ``now_ms`` is the ``at`` of the DELIVERED notices for the deleted ones with ``notify``."""
        ...

    async def peek(self, mailbox: str, limit: int, now_ms: int) -> list[Message]:
        """Up to ``limit`` unexpired held messages (in flight first, then queued), oldest first, changing nothing."""
        ...

    async def pending(self, mailbox: str, now_ms: int) -> int:
        """How many unexpired messages the mailbox holds (queued and in flight)."""
        ...

    async def purge_expired(self, now_ms: int) -> Purged:
        """Delete every expired message, tombstone and status; returns how many messages and whose,
        and the EXPIRED notices of the removed messages with ``notify``."""
        ...

    async def add_statuses(self, notices: Sequence[Notice], now_ms: int, ttl_ms: int) -> frozenset[str]:
        """Queue each notice in its ``mailbox``'s lane (or fold it into the lane's overflow record at the
        bound), held until ``now_ms + ttl_ms``; returns the mailboxes that got something. Raises
        ValueError for ``ttl_ms`` < 1 (before changing anything)."""
        ...

    async def fetch_statuses(self, mailbox: str, after_seq: int, limit: int, now_ms: int) -> list[HeldStatus]:
        """Up to ``limit`` unexpired statuses of ``mailbox`` with seq > ``after_seq``, ascending seq.

        Hands nothing out twice or once by itself: a status stays until ``ack_statuses`` (or
        expiry) removes it. Expired ones met on the way are removed (counted expired)."""
        ...

    async def ack_statuses(self, mailbox: str, seqs: Sequence[int]) -> int:
        """Delete these statuses of ``mailbox``; returns how many were held. Unknown seqs are ignored."""
        ...

    async def put_key(self, mailbox: str, record: KeyRecord, now_ms: int, ttl_ms: int) -> None:
        """Hold ``record`` as ``mailbox``'s key record until ``now_ms + ttl_ms``, replacing any previous one.

        Raises ValueError for ``ttl_ms`` < 1 (before changing anything)."""
        ...

    async def get_keys(self, mailboxes: Sequence[str], now_ms: int) -> dict[str, KeyRecord]:
        """The unexpired key records of these mailboxes, by mailbox, in order of first appearance; one
        round trip per shard for a networked store. Mailboxes without one are absent."""
        ...

    async def statistics(self, now_ms: int) -> StoreStatistics:
        """The store's statistics now (protocol.md section 10)."""
        ...

    async def aclose(self) -> None:
        """Release resources (connections); the store is unusable afterwards. Never raises."""
        ...
