"""What the client waits for the broker to answer: SENDs by message id, STATS/CLEANUP requests in order.

Theory of operation. This is mqttproto's pending-operation table (an operation per packet id,
released when its answer arrives) for Relay's two kinds of question:

- A **SEND** is keyed by its message id. Its entry keeps the fields it was sent with, so a new
  link can encode it again through its own state machine (SEND is idempotent: a message whose
  RECEIPT was lost comes back "duplicate", never stored twice). Each ``send``/``send_batch``
  call waits on one :class:`SendBatch` (one event per call, never a task or event per
  message); a RECEIPT fills its slot and the last one sets the event. An entry is a plain tuple:
  one is made per message on the hot path.
- A **request** (STATS, CLEANUP) has no id: the broker answers requests in the order they were
  written, so written requests wait in a FIFO and each answer (or FORBIDDEN) releases the oldest.
  Requests not yet written wait apart; a new link writes the unanswered ones again, oldest first.

:meth:`PendingTable.fail_all` releases every waiter with one error when the client stops.
Nothing here does I/O; the link writes, the reader calls :meth:`~PendingTable.release` and
:meth:`~PendingTable.answer`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence

import trio

from wire import Frame, Receipt

from .errors import RelayError, fresh_copy

__all__ = ["PendingTable", "Request", "SendBatch", "SendItem"]

SendItem = tuple[str, tuple[str, ...], bytes, int | None, bool]
"""One message to send: (id, recipients, body, ttl_s, notify)."""

_Entry = tuple[tuple[str, ...], bytes, int | None, bool, "SendBatch", int]
"""A SEND waiting for its receipt: (recipients, body, ttl_s, notify, its batch, its index in the batch)."""


class SendBatch:
    """The receipts awaited by one send/send_batch call."""

    __slots__ = ("done", "error", "remaining", "results")

    def __init__(self, n: int) -> None:
        self.results: list[Receipt | None] = [None] * n
        self.remaining = n
        self.done = trio.Event()
        self.error: BaseException | None = None

    def fail(self, error: BaseException) -> None:
        """Release the waiter with ``error`` (the first error wins)."""
        if self.error is None:
            self.error = error
            self.done.set()


class Request:
    """A STATS or CLEANUP waiting for its answer."""

    __slots__ = ("done", "error", "frame", "result")

    def __init__(self, frame: Frame) -> None:
        self.frame = frame
        self.done = trio.Event()
        self.result: Frame | None = None
        self.error: BaseException | None = None


class PendingTable:
    """The SENDs and requests waiting for the broker's answer, kept across links."""

    __slots__ = ("_sends", "_unsent", "_written")

    def __init__(self) -> None:
        self._sends: dict[str, _Entry] = {}
        self._unsent: list[Request] = []
        self._written: deque[Request] = deque()

    # ------------------------------------------------------------ SENDs

    def add_sends(self, items: Sequence[SendItem]) -> SendBatch:
        """Register ``items`` as one batch. Raises ValueError (and registers none of them) if an id is
        already waiting for its receipt, including twice in ``items``."""
        batch = SendBatch(len(items))
        sends = self._sends
        for index, (mid, to, body, ttl_s, notify) in enumerate(items):
            if mid in sends:
                for earlier in items[:index]:
                    del sends[earlier[0]]
                raise ValueError(f"a send with id {mid!r} is already waiting for its receipt")
            sends[mid] = (to, body, ttl_s, notify, batch, index)
        return batch

    def release(self, receipt: Receipt) -> None:
        """A RECEIPT arrived: fill its slot; the batch's last one wakes the waiter. Unknown ids are ignored
        (the receipt of a send whose caller gave up, or a duplicate answer after a reconnect)."""
        entry = self._sends.pop(receipt.id, None)
        if entry is not None:
            batch = entry[4]
            batch.results[entry[5]] = receipt
            batch.remaining -= 1
            if not batch.remaining:
                batch.done.set()

    async def wait(self, batch: SendBatch, items: Sequence[SendItem]) -> list[Receipt]:
        """Wait for ``batch``'s receipts (in ``items`` order). Raises the error the batch failed with;
        if the wait ends early (cancelled or failed), forgets what is still waiting."""
        try:
            await batch.done.wait()
        finally:
            if batch.remaining:
                sends = self._sends
                for item in items:
                    entry = sends.get(item[0])
                    if entry is not None and entry[4] is batch:
                        del sends[item[0]]
        if batch.error is not None:
            raise fresh_copy(batch.error)
        return batch.results  # type: ignore[return-value]  # all filled in

    def sends(self) -> Iterator[tuple[str, _Entry]]:
        """Every SEND still waiting, oldest first (to be written again on a new link)."""
        return iter(list(self._sends.items()))

    def drop_batch(self, batch: SendBatch, error: RelayError) -> None:
        """Fail ``batch`` with ``error`` and forget all its SENDs (e.g. a frame the new broker cannot take)."""
        batch.fail(error)
        for mid in [mid for mid, entry in self._sends.items() if entry[4] is batch]:
            del self._sends[mid]

    # ------------------------------------------------------------ requests

    def add_request(self, frame: Frame) -> Request:
        """Queue ``frame`` (STATS or CLEANUP) to be written; the caller awaits :meth:`wait_request`."""
        req = Request(frame)
        self._unsent.append(req)
        return req

    def take_requests(self) -> list[Request]:
        """The requests to write now; from here on they wait for their answer in order."""
        reqs, self._unsent = self._unsent, []
        self._written += reqs
        return reqs

    @property
    def answers_expected(self) -> bool:
        """Whether a written request is still unanswered."""
        return bool(self._written)

    def answer(self, result: Frame | None, error: RelayError | None) -> bool:
        """Release the oldest written request with its answer or error; False if none was outstanding."""
        if not self._written:
            return False
        req = self._written.popleft()
        req.result, req.error = result, error
        req.done.set()
        return True

    @staticmethod
    async def wait_request(req: Request) -> Frame:
        """The answer to ``req``. Raises its error (e.g. ForbiddenError, or the error the client stopped with)."""
        await req.done.wait()
        if req.error is not None:
            raise fresh_copy(req.error)
        assert req.result is not None
        return req.result

    # ------------------------------------------------------------ links and the end

    def relink(self) -> None:
        """A new link: written requests were never answered, so they go out again first, in order."""
        self._unsent[:0] = self._written
        self._written.clear()

    def fail_all(self, error: RelayError) -> None:
        """Release every waiter with ``error`` and forget everything (the client stops)."""
        for entry in self._sends.values():
            entry[4].fail(error)
        self._sends.clear()
        for req in (*self._written, *self._unsent):
            if not req.done.is_set():
                req.error = error
                req.done.set()
        self._written.clear()
        self._unsent.clear()
