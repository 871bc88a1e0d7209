"""Presence: which mailbox is held by which live session, and how to reach it.

Theory of operation. A session that opens a mailbox *claims* it and gets a
:class:`~broker.store.base.Claim` (its owner, the session id, and an epoch). Epochs only
grow, so a newer claim always fences an older one in the store: whatever the older
session does afterwards (release, fetch) cannot touch the new owner's deliveries. A claim
on a mailbox someone else holds is a takeover: the previous holder is kicked
(CONNECTED_ELSEWHERE) and the claim waits, bounded, for it to finish.

Everything else that concerns a mailbox's live session goes through presence too, by
mailbox name, so the callers never hold a session: whether a recipient is online (the
receipt's DELIVERED versus QUEUED), waking it after a SEND stored messages for it, telling
it to recount after the store removed messages behind its back (expiry, an ACK over HTTP),
and waking it for delivery statuses queued for it (a wake of its own kind, so traffic
without statuses never pays for a status fetch). :class:`LocalPresence` is the in-process
implementation (a dict); a Redis implementation does the same across nodes (claims with
INCR epochs, wakes and kicks over pub/sub) behind the same :class:`Presence` protocol, and
runs the same contract suite (tests/broker/presence_contract.py).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Collection, Iterable, Set
from typing import Protocol

import trio

from wire import ErrorCode

from .store.base import Claim

__all__ = ["TAKEOVER_WAIT_S", "LocalPresence", "Presence", "Subscriber"]

log = logging.getLogger(__name__)

TAKEOVER_WAIT_S = 10.0
"""Longest a claim waits for the session it took the mailbox from to finish."""


class Subscriber(Protocol):
    """What a session registers for its mailbox: the mailbox's local delivery side."""

    @property
    def id(self) -> str:
        """The session id: a claim's owner."""
        ...

    @property
    def finished(self) -> trio.Event:
        """Set once the session has ended and given its deliveries back."""
        ...

    async def wake(self) -> None:
        """New messages were queued for the mailbox (may deliver inline when the store is synchronous)."""
        ...

    def resync(self) -> None:
        """The store removed messages behind the session's back (expiry, ACK over HTTP): recount."""
        ...

    def wake_statuses(self) -> None:
        """Delivery statuses were queued for the mailbox: its pump fetches them (from its own task)."""
        ...

    def kick(self, code: ErrorCode, message: str) -> None:
        """Close the session with ERROR(code, close) (CONNECTED_ELSEWHERE on takeover). Never raises."""
        ...


class Presence(Protocol):
    """Who holds which mailbox; see the module docstring. No method raises for an unknown mailbox."""

    async def claim(self, mailbox: str, subscriber: Subscriber) -> Claim:
        """Make ``subscriber`` the holder of ``mailbox``: a claim newer than every earlier one.

        A previous holder is kicked (CONNECTED_ELSEWHERE) and waited for (at most
        ``TAKEOVER_WAIT_S``). If cancelled during that wait, the claim is released (the caller
        never got it) and the cancellation propagates.
        """
        ...

    async def release(self, mailbox: str, claim: Claim) -> None:
        """Forget the holder of ``mailbox`` if it is still ``claim``'s (a taken-over claim changes nothing)."""
        ...

    async def online(self, mailboxes: Collection[str]) -> Set[str]:
        """Those of ``mailboxes`` held by a live session now."""
        ...

    async def wake(self, mailboxes: Iterable[str]) -> None:
        """Tell each held mailbox's session that messages were queued for it (offline ones are skipped)."""
        ...

    async def resync(self, mailboxes: Iterable[str]) -> None:
        """Tell each held mailbox's session to recount its in-flight window (offline ones are skipped)."""
        ...

    async def wake_statuses(self, mailboxes: Iterable[str]) -> None:
        """Tell each held mailbox's session that statuses were queued for it (offline ones are skipped).

        Called after the store confirmed them, so a session that claims the mailbox later fetches them at connect.
        """
        ...

    def count(self) -> int:
        """How many mailboxes are held on this node."""
        ...


class LocalPresence:
    """Presence within one process: a dict from mailbox to its holder and claim.

    Epochs come from one process-wide counter, so they grow across mailboxes and across
    a mailbox being released and claimed again (a store that outlives a claim still
    fences correctly). ``get``, ``in`` and ``[]`` are for tests and local inspection.
    """

    def __init__(self, *, takeover_wait_s: float = TAKEOVER_WAIT_S) -> None:
        self._holders: dict[str, tuple[Subscriber, Claim]] = {}
        self._epochs = itertools.count(1)
        self._takeover_wait_s = takeover_wait_s

    async def claim(self, mailbox: str, subscriber: Subscriber) -> Claim:
        claim = Claim(subscriber.id, next(self._epochs))
        old = self._holders.get(mailbox)
        self._holders[mailbox] = (subscriber, claim)
        if old is not None:
            previous = old[0]
            log.info("%s takes over %s from %s", subscriber.id, mailbox, previous.id)
            previous.kick(
                ErrorCode.CONNECTED_ELSEWHERE, "connected elsewhere: a newer connection took over this mailbox"
            )
            try:
                with trio.move_on_after(self._takeover_wait_s):
                    await previous.finished.wait()
            except BaseException:
                self._drop(mailbox, claim)  # cancelled: the caller never got the claim to release it
                raise
        return claim

    def _drop(self, mailbox: str, claim: Claim) -> None:
        held = self._holders.get(mailbox)
        if held is not None and held[1] == claim:
            del self._holders[mailbox]

    async def release(self, mailbox: str, claim: Claim) -> None:
        self._drop(mailbox, claim)

    async def online(self, mailboxes: Collection[str]) -> Set[str]:
        holders = self._holders
        return {m for m in mailboxes if m in holders}

    async def wake(self, mailboxes: Iterable[str]) -> None:
        holders = self._holders
        for mailbox in mailboxes:
            held = holders.get(mailbox)
            if held is not None:
                await held[0].wake()

    async def resync(self, mailboxes: Iterable[str]) -> None:
        holders = self._holders
        for mailbox in mailboxes:
            held = holders.get(mailbox)
            if held is not None:
                held[0].resync()

    async def wake_statuses(self, mailboxes: Iterable[str]) -> None:
        holders = self._holders
        for mailbox in mailboxes:
            held = holders.get(mailbox)
            if held is not None:
                held[0].wake_statuses()

    def count(self) -> int:
        return len(self._holders)

    def get(self, mailbox: str) -> Subscriber | None:
        """The local holder of ``mailbox``, or None."""
        held = self._holders.get(mailbox)
        return None if held is None else held[0]

    def __getitem__(self, mailbox: str) -> Subscriber:
        """The local holder of ``mailbox``. Raises KeyError if none."""
        return self._holders[mailbox][0]

    def __contains__(self, mailbox: object) -> bool:
        return mailbox in self._holders
