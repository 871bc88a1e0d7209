"""The store interface: where messages wait between SEND and ACK.

Theory of operation: the store owns every held message and each mailbox's delivery
state (which messages are queued, which are in flight on the mailbox's connection).
Calls are async and batch-oriented because a networked store (Redis) pays a round trip
per call; the in-memory store never yields inside them. Time comes from an injected
clock returning Unix epoch milliseconds, so TTL logic runs under trio's MockClock.

Contract (checked by ``tests/broker/store_contract.py`` against every implementation):
- ``enqueue_many`` stores each message for each recipient atomically per recipient and
  reports, per recipient, STORED, DUPLICATE or a 3xxx ErrorCode; nothing else happens
  to a message it reports as refused.
- ``fetch_many`` hands out queued messages of one mailbox, oldest accepted first (at
  most ``limit`` of them and about ``max_bytes`` of bodies), marks them in flight and
  increments their attempt; expired messages are never returned
  (they are removed and counted as expired).
- ``ack_many`` deletes messages of that mailbox only; unknown ids are ignored. An ACKed
  id is remembered (a tombstone) until the message would have expired, so a retried
  SEND of it is a DUPLICATE.
- ``release`` puts every in-flight message back at the front of the queue, in order.
- A mailbox with no messages holds no memory.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from wire import ErrorCode

__all__ = [
    "DUPLICATE",
    "STORED",
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
    "StoredMessage",
    "wall_clock_ms",
]

Clock = Callable[[], int]
"""Returns the current time as Unix epoch milliseconds."""


def wall_clock_ms() -> int:
    """The real clock: Unix epoch milliseconds."""
    return time.time_ns() // 1_000_000


STORED = 0
"""enqueue outcome: the message is now held for the recipient."""
DUPLICATE = 1
"""enqueue outcome: the same sender's message with this id is held (or was ACKed); nothing stored."""


class Outcome(enum.Enum):
    """What ``enqueue_many`` did with a message for one recipient.

    ``code`` is the ErrorCode a refusal reports (None for STORED and DUPLICATE).
    """

    STORED = "stored"
    """The message is now held for the recipient."""
    DUPLICATE = "duplicate"
    """The same sender's message with this id is held (or was ACKed and is tombstoned); nothing stored."""
    MAILBOX_FULL = ErrorCode.MAILBOX_FULL
    MAILBOX_BYTES_FULL = ErrorCode.MAILBOX_BYTES_FULL
    BROKER_FULL = ErrorCode.BROKER_FULL
    ID_CONFLICT = ErrorCode.ID_CONFLICT
    """Another sender's message with this id is held or tombstoned for the recipient."""

    code: ErrorCode | None

    def __init__(self, value: str | ErrorCode) -> None:
        # A plain attribute, not a property: read once per refused recipient on the SEND path.
        self.code = value if isinstance(value, ErrorCode) else None


@dataclass(frozen=True, slots=True)
class Claim:
    """Who may take a mailbox's deliveries: its owner (a session) and the epoch presence gave it.

    A store keeps, per mailbox, the newest epoch it has seen (the fence): a fetch with a newer
    claim takes over the in-flight messages; an older claim is stale and changes nothing.
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
    """Per-mailbox and global bounds the store enforces at enqueue time."""

    max_mailbox_messages: int = 100_000
    max_mailbox_bytes: int = 64 * 1024 * 1024
    max_total_bytes: int = 1024 * 1024 * 1024
    max_tombstones: int = 100_000


@dataclass(slots=True)
class NewMessage:
    """One accepted SEND: the same message for one or more recipients."""

    id: str
    sender: str
    recipients: tuple[str, ...]
    body: bytes
    sent_at: int
    expires_at: int


@dataclass(slots=True, eq=False)
class StoredMessage:
    """A message held for one recipient. ``attempt`` counts deliveries so far."""

    id: str
    sender: str
    recipient: str
    body: bytes
    sent_at: int
    expires_at: int
    attempt: int = 0
    inflight: bool = False
    alive: bool = True


@dataclass(frozen=True, slots=True)
class Batch:
    """What ``fetch_many`` handed out, and the mailbox's state after it."""

    messages: list[StoredMessage]
    queued: int
    """Messages still waiting to be delivered (not in flight)."""
    inflight: int
    """Messages delivered and not yet ACKed."""


@dataclass(frozen=True, slots=True)
class AckResult:
    deleted: int
    """How many of the ids were held for this mailbox and are now deleted."""
    inflight: int
    """Messages still in flight for the mailbox after the ACK."""


class Store(Protocol):
    """Where messages wait. See the module docstring for the contract."""

    synchronous: bool
    """True if no method ever yields to the scheduler (no checkpoint: the in-memory store).
    The broker then delivers a new message from the sender's task, since nothing can
    interleave with it; otherwise each mailbox's own task does all of its delivering."""

    async def enqueue_many(self, messages: Sequence[NewMessage]) -> list[list[int]]:
        """For each message, one outcome per recipient (same order): STORED, DUPLICATE or an ErrorCode."""
        ...

    async def fetch_many(self, mailbox: str, limit: int, max_bytes: int) -> Batch:
        """Up to ``limit`` queued, unexpired messages, oldest first, now in flight with attempt + 1.

        Stops before the bodies would pass ``max_bytes``, but always returns at least one
        message if any is queued and ``limit`` > 0.
        """
        ...

    async def peek(self, mailbox: str, limit: int) -> list[StoredMessage]:
        """Up to ``limit`` unexpired held messages (in flight or not), oldest first, changing nothing."""
        ...

    async def ack_many(self, mailbox: str, ids: Sequence[str]) -> AckResult:
        """Delete these messages of ``mailbox``; ids not held there are ignored."""
        ...

    async def release(self, mailbox: str) -> int:
        """Return every in-flight message to the front of the queue, in order; returns how many."""
        ...

    async def pending(self, mailbox: str) -> int:
        """How many unexpired messages the mailbox holds (queued and in flight)."""
        ...

    async def purge_expired(self) -> int:
        """Delete every expired message; returns how many. Cost O(expired * log n)."""
        ...

    async def statistics(self) -> Mapping[str, int]:
        """messages_total, messages_deliverable, messages_expired_unswept, acknowledged_total,
        unique_recipients, queued_bytes, expired_total, tombstones, inflight."""
        ...

    async def aclose(self) -> None:
        """Release resources (connections); the store is unusable afterwards."""
        ...
