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
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from wire import ErrorCode

__all__ = [
    "AckResult",
    "Batch",
    "Claim",
    "Clock",
    "Message",
    "NewMessage",
    "Outcome",
    "Purged",
    "Store",
    "StoreLimits",
    "StoreStatistics",
    "wall_clock_ms",
]

Clock = Callable[[], int]
"""Returns the current time as Unix epoch milliseconds (the broker's; the store takes ``now_ms``)."""


def wall_clock_ms() -> int:
    """The real clock: Unix epoch milliseconds. Never raises."""
    return time.time_ns() // 1_000_000


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


@dataclass(frozen=True, slots=True)
class Purged:
    """What ``purge_expired`` removed: how many messages, and from which mailboxes."""

    count: int
    mailboxes: frozenset[str]


@dataclass(frozen=True, slots=True)
class StoreStatistics:
    """The store's part of protocol.md section 10 (the names are the STATS keys)."""

    messages_total: int
    messages_deliverable: int
    messages_expired_unswept: int
    acknowledged_total: int
    unique_recipients: int
    queued_bytes: int
    expired_total: int
    tombstones: int
    inflight: int


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


@dataclass(frozen=True, slots=True)
class AckResult:
    deleted: int
    """How many of the ids were held for this mailbox and are now deleted."""
    inflight: int
    """Messages still in flight for the mailbox after the ACK."""


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

    async def ack_many(self, mailbox: str, ids: Sequence[str]) -> AckResult:
        """Delete these messages of ``mailbox`` (in flight or queued); ids not held there are ignored."""
        ...

    async def peek(self, mailbox: str, limit: int, now_ms: int) -> list[Message]:
        """Up to ``limit`` unexpired held messages (in flight first, then queued), oldest first, changing nothing."""
        ...

    async def pending(self, mailbox: str, now_ms: int) -> int:
        """How many unexpired messages the mailbox holds (queued and in flight)."""
        ...

    async def purge_expired(self, now_ms: int) -> Purged:
        """Delete every expired message and tombstone; returns how many messages and whose."""
        ...

    async def statistics(self, now_ms: int) -> StoreStatistics:
        """The store's statistics now (protocol.md section 10)."""
        ...

    async def aclose(self) -> None:
        """Release resources (connections); the store is unusable afterwards. Never raises."""
        ...
