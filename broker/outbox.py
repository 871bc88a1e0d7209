"""The outbox: a session's one way out, a bounded coalescing writer with a direct-write fast path.

Theory of operation. Every encoded frame a session sends goes through :meth:`Outbox.push`
(or :meth:`push_all`). When nothing is queued and no write is in progress, the bytes go
straight to the transport without blocking (the one direct write,
``transport.send_some_nowait``; a WebSocket takes nothing that way); what it does not
take at once is queued, and the writer task (:meth:`run`) writes everything queued in
one call, so frames produced while a write is in progress are coalesced into the next
one. Order is kept because the direct write is
only tried when nothing is ahead of it.

The buffer is bounded: ``unsent`` counts queued bytes plus those of the write in
progress. Producers stop at the soft limit (half of ``max_outbound_bytes``): the reader
waits in :meth:`wait_for_space`, the mailbox pump leaves a callback with
:meth:`call_when_space`; the writer wakes only those who stopped, once ``unsent`` is
below the soft limit again. Past the full figure the peer is a slow consumer and the
session is told to close (``on_close``). ``writing_since`` is when the write in progress
started, for the session's watchdog to judge a stall without a timer per write.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from wire import ErrorCode
from wire.transport import Transport, TransportClosed

from .stats import Counters

__all__ = ["Outbox"]

log = logging.getLogger(__name__)


class Outbox:
    """The bounded, coalescing writer of one connection (see the module docstring).

    ``on_close(code, message)`` ends the session: called with SLOW_CONSUMER when the
    buffer overflows, and with None when the transport broke under a write.
    """

    __slots__ = (
        "_counters",
        "_max_bytes",
        "_on_close",
        "_on_space",
        "_out",
        "_out_bytes",
        "_scope",
        "_space_signal",
        "_space_wanted",
        "_write_signal",
        "closing",
        "soft_limit",
        "transport",
        "unsent",
        "writing_since",
    )

    def __init__(
        self,
        transport: Transport,
        *,
        max_bytes: int,
        on_close: Callable[[ErrorCode | None, str], None],
        counters: Counters | None = None,
    ) -> None:
        self.transport = transport
        self._counters = counters if counters is not None else Counters()  # frames and bytes out
        self._max_bytes = max_bytes
        self.soft_limit = max_bytes // 2
        """Producers stop at this many unsent bytes."""
        self._on_close = on_close
        self._out: list[bytes] = []
        self._out_bytes = 0  # bytes in _out
        self.unsent = 0
        """Bytes queued plus bytes of the write in progress."""
        self.writing_since: float | None = None
        """trio time the write in progress began (None: no write in progress)."""
        self.closing = False
        """No more frames are taken (what is queued is still written, until the deadline)."""
        self._write_signal = trio.Event()
        self._space_signal = trio.Event()
        self._space_wanted = False
        self._on_space: Callable[[], None] | None = None
        self._scope = trio.CancelScope()

    def has_room(self) -> bool:
        """True while producers may go on (``unsent`` below the soft limit)."""
        return self.unsent < self.soft_limit

    def push(self, data: bytes) -> None:
        """Send one encoded frame (see :meth:`push_all`)."""
        self.push_all([data])

    def push_all(self, frames: list[bytes]) -> None:
        """Send encoded frames: straight to the transport if the writer is idle and it takes them
        without blocking, otherwise queued for the writer. Dropped once the outbox is closing."""
        if self.closing:
            return
        counters = self._counters
        counters.frames_out += len(frames)
        if not self._out and self.writing_since is None:
            # Nothing queued and no write in progress, so order is kept; frames the socket buffer
            # takes at once cost no task switch (what online latency is made of).
            data = frames[0] if len(frames) == 1 else b"".join(frames)
            sent = self.transport.send_some_nowait(data)
            counters.bytes_out += sent
            if sent == len(data):
                return
            frames = [data[sent:] if sent else data]  # only a byte stream takes part: any split of it will do
        self._out += frames
        n = sum(map(len, frames)) if len(frames) > 1 else len(frames[0])
        self._out_bytes += n
        self.unsent += n
        if self.unsent > self._max_bytes:
            self._on_close(ErrorCode.SLOW_CONSUMER, f"more than {self._max_bytes} bytes unsent: reading too slowly")
        self._write_signal.set()

    def close(self, final: bytes, *, grace_s: float) -> None:
        """Take no more frames; write what is queued, then ``final`` (may be b""), for at most ``grace_s``."""
        if self.closing:
            return
        self.closing = True
        if final:
            self._out.append(final)
            self._out_bytes += len(final)
            self.unsent += len(final)
        self._scope.deadline = trio.current_time() + grace_s
        self._write_signal.set()

    def abort(self) -> None:
        """Give up on the write in progress and everything queued (a stalled peer)."""
        self.closing = True
        self._scope.cancel()

    async def wait_for_space(self) -> None:
        """Return once ``unsent`` is below the soft limit."""
        while self.unsent >= self.soft_limit:
            self._space_wanted = True
            await self._space_signal.wait()
            self._space_signal = trio.Event()

    def call_when_space(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, from the writer, when ``unsent`` drops below the soft limit."""
        self._on_space = callback

    async def run(self) -> None:
        """The writer task: write whatever is queued until closed and flushed (or the deadline passes)."""
        transport = self.transport
        with self._scope:
            while True:
                if not self._out:
                    if self.closing:
                        return
                    await self._write_signal.wait()
                    self._write_signal = trio.Event()
                    continue
                frames, nbytes = self._out, self._out_bytes
                self._out, self._out_bytes = [], 0
                self.writing_since = trio.current_time()  # the watchdog cuts off a write that stalls
                try:
                    await transport.send_all(frames[0] if len(frames) == 1 else b"".join(frames))
                except TransportClosed:
                    self.closing = True
                    self._on_close(None, "")
                    return
                self.writing_since = None
                self.unsent -= nbytes
                self._counters.bytes_out += nbytes
                if self.unsent < self.soft_limit:
                    self._space_freed()

    def _space_freed(self) -> None:
        # Wake only who stopped for space: a wakeup per write costs more than the write.
        if self._space_wanted:
            self._space_wanted = False
            self._space_signal.set()
        callback = self._on_space
        if callback is not None:
            self._on_space = None
            callback()
