"""Delivery statuses on their way to the application: the status box and its local-store saver.

Theory of operation. A SEND with ``notify`` makes the broker queue, for each recipient the
message was stored for, one STATUS in the sender's own mailbox (protocol.md section 9,
"Delivery status"): "delivered" when the recipient's device ACKed it, "expired" when it expired
un-ACKed, or an "overflow" record counting statuses the broker folded instead of keeping them.
The reader hands each chunk's STATUS frames to :meth:`StatusBox.accept` in one call. The rule is
the messages' rule (:mod:`client._inbox`), with a seq instead of a message id:

- With a local store they queue for the **saver** task, which saves everything queued in one
  SQLite transaction (``LocalStore.save_statuses``) in a worker thread and only then queues the
  STATUS_ACKs (``on_saved``), for every status saved, new or not (a redelivered status is ACKed
  again: its ACK may have been lost). The box gets only the statuses that were new in the store,
  so a redelivery is never yielded twice. A failed save is reported to ``on_failure`` and nothing
  is ACKed (the broker keeps the statuses and sends them again on the next connection).
- Without one, every status goes to the box and the application STATUS_ACKs it
  (``RelayClient.ack_statuses``) once it has kept what it needs; a status it never ACKs comes
  again on the next connection or after a PULL. A status redelivered while its first copy is
  still in the box is dropped (same seq).

Either way a grown overflow record (same ``first_seq``, larger seq) replaces an older copy still
in the box, whose count it includes. A status may arrive before the RECEIPT of its message (the
recipient may ACK before the receipt is written): it is saved and yielded all the same.

Backpressure, as for deliveries: with a local store the saver waits once
``MAX_BUFFERED_STATUSES`` are buffered, so it saves and ACKs nothing more until the application
takes some (the broker keeps what is not ACKed, up to its bound, then counts the rest in an
overflow record). Without one the box holds at most what the broker holds un-ACKed.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from wire import ReportState, StatusReport

from ._inbox import ClientState
from .errors import LocalStoreError, RelayError, fresh_copy
from .localstore import LocalStore

__all__ = ["MAX_BUFFERED_STATUSES", "StatusBox"]

MAX_BUFFERED_STATUSES = 65536
"""With a local store, statuses saved but not yet taken from the iterators; past this the saver waits
(and so stops STATUS_ACKing) until the application catches up."""


class StatusBox:
    """Delivery statuses on their way to the application (see the module docstring)."""

    __slots__ = (
        "_busy",
        "_is_drained",
        "_mailbox",
        "_on_failure",
        "_on_saved",
        "_queue",
        "_room",
        "_room_wanted",
        "_scope",
        "_state",
        "_store",
        "_wake",
        "items",
    )

    def __init__(
        self,
        store: LocalStore | None,
        state: ClientState,
        *,
        on_saved: Callable[[list[int]], None],
        on_failure: Callable[[RelayError], None],
        is_drained: Callable[[], bool],
    ) -> None:
        self.items: dict[int, StatusReport] = {}
        """Statuses for the application by seq, in arrival order."""
        self._store = store
        self._state = state
        self._on_saved = on_saved
        self._on_failure = on_failure
        self._is_drained = is_drained
        self._queue: list[StatusReport] = []
        self._wake = trio.Event()
        self._busy = False
        self._room = trio.Event()
        self._room_wanted = False
        self._mailbox: str | None = None
        self._scope = trio.CancelScope()

    # ------------------------------------------------------------ from the reader and the client

    def accept(self, statuses: list[StatusReport]) -> None:
        """One chunk's statuses, in arrival order."""
        if self._store is None:
            self._buffer(statuses)
            self._state.fire()
        else:
            self._queue += statuses
            self._wake.set()

    def link_opened(self, mailbox: str | None) -> None:
        """A link is up for ``mailbox`` (statuses come only to mailbox sessions)."""
        self._mailbox = mailbox

    @property
    def settled(self) -> bool:
        """Whether the saver has nothing queued or in hand."""
        return not self._queue and not self._busy

    def stop(self) -> None:
        """Stop the saver (what it has not saved is not ACKed, so the broker sends it again)."""
        self._scope.cancel()

    def _buffer(self, statuses: list[StatusReport]) -> None:
        items = self.items
        for s in statuses:
            if s.seq in items:
                continue  # a redelivery of one still buffered
            if s.state is ReportState.OVERFLOW:
                for seq in [q for q, old in items.items() if old.first_seq == s.first_seq and q < s.seq]:
                    del items[seq]  # the grown record includes the old one's count
            items[s.seq] = s

    # ------------------------------------------------------------ the saver (local store only)

    async def run_saver(self) -> None:
        """Save queued statuses, then STATUS_ACK them; until :meth:`stop`. Reports a failed save to ``on_failure``."""
        store = self._store
        assert store is not None
        with self._scope:
            while True:
                if not self._queue:
                    await self._wake.wait()
                    self._wake = trio.Event()
                    continue
                while len(self.items) >= MAX_BUFFERED_STATUSES:
                    self._room_wanted = True
                    await self._room.wait()
                    self._room = trio.Event()
                self._busy = True
                batch, self._queue = self._queue, []
                assert self._mailbox is not None
                try:
                    fresh = await trio.to_thread.run_sync(store.save_statuses, self._mailbox, batch)
                except Exception as exc:
                    self._on_failure(
                        LocalStoreError(f"saving {len(batch)} delivery statuses failed (not ACKed): {exc}")
                    )
                    return
                # Saved and committed: only now may the broker forget them.
                self._on_saved([s.seq for s in batch])
                self._buffer([s for s, new in zip(batch, fresh, strict=True) if new])
                self._busy = False
                self._state.fire()

    # ------------------------------------------------------------ to the application

    def _made_room(self) -> None:
        if self._room_wanted and len(self.items) < MAX_BUFFERED_STATUSES // 2:
            self._room_wanted = False
            self._room.set()

    def take_one(self) -> StatusReport:
        status = self.items.pop(next(iter(self.items)))
        self._made_room()
        return status

    def take_all(self) -> list[StatusReport]:
        statuses = list(self.items.values())
        self.items.clear()
        self._made_room()
        return statuses

    async def wait(self, until_drained: bool) -> bool:
        """Wait until statuses are buffered (True) or the iteration should end (False): the client is
        closed, or ``until_drained`` and drained (every DRAINED the link owes counted) with nothing left in
        the saver. Raises the fatal error."""
        state = self._state
        while not self.items:
            if state.failure is not None:
                raise fresh_copy(state.failure)
            if state.closed:
                return False
            if until_drained and self._is_drained() and self.settled:
                return False
            await state.changed()
        return True
