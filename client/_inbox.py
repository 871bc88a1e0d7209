"""The receiving side of the client: the inbox, the local-store saver, DRAINED bookkeeping, the iterators.

Theory of operation. The reader hands each chunk's deliveries to :meth:`Inbox.accept` in one
call and each DRAINED to :meth:`Inbox.drained`. Without a local store they go straight to the
inbox (a deque) and the application ACKs. With one, they queue for the **saver** task, which
takes everything queued, saves it in one SQLite transaction in a worker thread and only then
queues the ACKs (``on_saved``); the inbox gets only the deliveries that were new in the store,
so a redelivery is ACKed again but not yielded twice. A DRAINED travels through the same queue
as a mark, so it counts only once the deliveries before it are saved.

Backpressure: when the application stops reading, the saver waits once
``MAX_BUFFERED_DELIVERIES`` are buffered; it then saves and ACKs nothing more, so the broker's
in-flight window fills and it stops delivering. Taking from the inbox makes room again.

"Drained" means: the DRAINED for every HELLO or PULL of the current link has been seen (each
link expects one if it has a mailbox; each PULL one more). DRAINED marks from an older link are
ignored. :class:`ClientState` is what every waiter watches (iterators, ``wait_drained``,
``close``): the failure, closed and connected flags and one broadcast event fired on any change.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sized
from typing import Generic, Protocol, TypeVar

import trio

from .errors import ConnectionLost, LocalStoreError, RelayError, fresh_copy
from .localstore import LocalStore

__all__ = ["MAX_BUFFERED_DELIVERIES", "Box", "ClientState", "Delivery", "Inbox", "InboxIterator"]

T = TypeVar("T")

MAX_BUFFERED_DELIVERIES = 65536
"""With a local store, deliveries saved but not yet taken from the iterators; past this the saver
waits (and so stops ACKing, which stops the broker) until the application catches up."""


class Delivery:
    """One delivered message. Times are Unix epoch milliseconds; ``attempt`` is 1 on first delivery.

    ``security`` says what ``body`` is (docs/e2e.md): ``"e2e"``, the decrypted body of an envelope whose
    signature verified against the identity key pinned for ``sender``; ``"plaintext"``, a body that came in the
    clear (the relay could read it, and anyone who can send as any mailbox could have written it);
    ``"failed"``, an envelope that did not open or verify: ``body`` is empty and ``security_error`` says why
    (``malformed``, ``mismatch``, ``not_for_me``, ``no_sender_key``, ``key_changed``, ``bad_signature``,
    ``unknown_key``, ``decrypt_failed``). A failed message is still saved and ACKed (it would only come back),
    but it is not a message from ``sender``: show it as failed, never as their text.
    """

    __slots__ = ("attempt", "body", "expires_at", "id", "security", "security_error", "sender", "sent_at")

    def __init__(
        self,
        id: str,
        sender: str,
        sent_at: int,
        expires_at: int,
        attempt: int,
        body: bytes,
        security: str = "plaintext",
        security_error: str | None = None,
    ) -> None:
        self.id = id
        self.sender = sender
        self.sent_at = sent_at
        self.expires_at = expires_at
        self.attempt = attempt
        self.body = body
        self.security = security
        self.security_error = security_error

    def __repr__(self) -> str:
        error = f"/{self.security_error}" if self.security_error else ""
        return (
            f"Delivery(id={self.id!r}, sender={self.sender!r}, attempt={self.attempt}, {self.security}{error},"
            f" body={self.body[:32]!r})"
        )


class ClientState:
    """The client's visible state, and one event that fires whenever it (or the inbox) changes."""

    __slots__ = ("_changed", "closed", "connected", "failure")

    def __init__(self) -> None:
        self.failure: RelayError | None = None
        """The fatal error every waiter raises, once the client failed."""
        self.closed = False
        """Set when :meth:`RelayClient.close` starts (or the client is abandoned)."""
        self.connected = False
        """Whether a link is established right now."""
        self._changed = trio.Event()

    def fire(self) -> None:
        """Wake everything waiting for a change."""
        self._changed.set()
        self._changed = trio.Event()

    async def changed(self) -> None:
        """Wait for the next :meth:`fire`."""
        await self._changed.wait()

    def raise_if_done(self) -> None:
        """Raises the fatal error if the client failed, ConnectionLost if it is closed."""
        if self.failure is not None:
            raise fresh_copy(self.failure)
        if self.closed:
            raise ConnectionLost("the client is closed")


class _DrainMark:
    """DRAINED, kept in order with the deliveries before it on their way through the saver."""

    __slots__ = ("gen", "pending")

    def __init__(self, gen: int, pending: int) -> None:
        self.gen = gen
        self.pending = pending


class Inbox:
    """Deliveries on their way to the application (see the module docstring)."""

    __slots__ = (
        "_busy",
        "_expected",
        "_gen",
        "_mailbox",
        "_on_failure",
        "_on_saved",
        "_queue",
        "_room",
        "_room_wanted",
        "_scope",
        "_seen",
        "_state",
        "_store",
        "_wake",
        "drained_pending",
        "items",
    )

    def __init__(
        self,
        store: LocalStore | None,
        state: ClientState,
        on_saved: Callable[[list[str]], None],
        on_failure: Callable[[RelayError], None],
    ) -> None:
        self.items: deque[Delivery] = deque()
        self.drained_pending = 0
        """DRAINED's ``pending`` from the latest DRAINED counted."""
        self._store = store
        self._state = state
        self._on_saved = on_saved
        self._on_failure = on_failure
        self._queue: list[Delivery | _DrainMark] = []
        self._wake = trio.Event()
        self._busy = False
        self._room = trio.Event()
        self._room_wanted = False
        self._gen = 0
        self._mailbox: str | None = None
        self._expected = 0
        self._seen = 0
        self._scope = trio.CancelScope()

    # ------------------------------------------------------------ from the reader

    def accept(self, deliveries: list[Delivery]) -> None:
        """One chunk's deliveries, in arrival order."""
        if self._store is None:
            self.items.extend(deliveries)
            self._state.fire()
        else:
            self._queue += deliveries
            self._wake.set()

    def drained(self, gen: int, pending: int) -> None:
        """DRAINED arrived on link ``gen``."""
        if self._store is None:
            self._count_drained(gen, pending)
        else:
            self._queue.append(_DrainMark(gen, pending))
            self._wake.set()

    def _count_drained(self, gen: int, pending: int) -> None:
        if gen == self._gen:
            self._seen += 1
            self.drained_pending = pending
            self._state.fire()

    # ------------------------------------------------------------ from the client

    def link_opened(self, gen: int, mailbox: str | None) -> None:
        """Link ``gen`` is up: it owes one DRAINED if it has a mailbox."""
        self._gen = gen
        self._mailbox = mailbox
        self._expected = 1 if mailbox is not None else 0
        self._seen = 0

    def pull_sent(self) -> None:
        """A PULL was queued on the current link: one more DRAINED to wait for."""
        self._expected += 1

    def is_drained(self) -> bool:
        """Whether every DRAINED the current link owes has been counted (False while disconnected)."""
        return self._state.connected and self._seen >= self._expected

    @property
    def settled(self) -> bool:
        """Whether the saver has nothing queued or in hand."""
        return not self._queue and not self._busy

    def stop(self) -> None:
        """Stop the saver (what it has not saved is not ACKed, so the broker delivers it again)."""
        self._scope.cancel()

    # ------------------------------------------------------------ the saver (local store only)

    async def run_saver(self) -> None:
        """Save queued deliveries, then ACK them; until :meth:`stop`. Reports a failed save to ``on_failure``."""
        with self._scope:
            while True:
                if not self._queue:
                    await self._wake.wait()
                    self._wake = trio.Event()
                    continue
                while len(self.items) >= MAX_BUFFERED_DELIVERIES:
                    self._room_wanted = True
                    await self._room.wait()
                    self._room = trio.Event()
                self._busy = True
                items, self._queue = self._queue, []
                if not await self._save(items):
                    return
                self._busy = False
                self._state.fire()

    async def _save(self, items: list[Delivery | _DrainMark]) -> bool:
        """Save one batch and pass it on; False if saving failed (the client has been told)."""
        store = self._store
        assert store is not None
        deliveries = [i for i in items if type(i) is Delivery]
        fresh: list[bool] = []
        if deliveries:
            assert self._mailbox is not None
            try:
                fresh = await trio.to_thread.run_sync(store.save_incoming, self._mailbox, deliveries)
            except Exception as exc:
                self._on_failure(LocalStoreError(f"saving {len(deliveries)} deliveries failed (not ACKed): {exc}"))
                return False
            # Saved and committed: only now may the broker forget them.
            self._on_saved([d.id for d in deliveries])
        inbox = self.items
        flags = iter(fresh)
        for item in items:
            if type(item) is Delivery:
                if next(flags):
                    inbox.append(item)
            else:
                self._count_drained(item.gen, item.pending)  # type: ignore[union-attr]
        return True

    # ------------------------------------------------------------ to the application

    def take_one(self) -> Delivery:
        d = self.items.popleft()
        if self._room_wanted and len(self.items) < MAX_BUFFERED_DELIVERIES // 2:
            self._room_wanted = False
            self._room.set()
        return d

    def take_all(self) -> list[Delivery]:
        items = list(self.items)
        self.items.clear()
        if self._room_wanted:
            self._room_wanted = False
            self._room.set()
        return items

    async def wait(self, until_drained: bool) -> bool:
        """Wait until deliveries are buffered (True) or the iteration should end (False): the client is
        closed, or ``until_drained`` and drained with nothing left in the saver. Raises the fatal error."""
        state = self._state
        while not self.items:
            if state.failure is not None:
                raise fresh_copy(state.failure)
            if state.closed:
                return False
            if until_drained and self.is_drained() and self.settled:
                return False
            await state.changed()
        return True


class Box(Protocol):
    """What :class:`InboxIterator` iterates: the inbox, or the status box (``client._statuses``)."""

    @property
    def items(self) -> Sized: ...
    async def wait(self, until_drained: bool) -> bool: ...


class InboxIterator(Generic[T]):
    """Yields what ``take`` returns from a box (one item, or all buffered) until it ends.

    A class rather than an async generator, so abandoning the loop needs no cleanup.
    """

    __slots__ = ("_inbox", "_take", "_until_drained")

    def __init__(self, inbox: Box, take: Callable[[], T], until_drained: bool) -> None:
        self._inbox = inbox
        self._take = take
        self._until_drained = until_drained

    def __aiter__(self) -> InboxIterator[T]:
        return self

    async def __anext__(self) -> T:
        inbox = self._inbox
        if inbox.items or await inbox.wait(self._until_drained):
            return self._take()
        raise StopAsyncIteration
