"""Store health: whether this node can reach its store now, told once in the log, counted in the statistics.

Theory of operation. One :class:`StoreHealth` per broker node. Every part that calls the
store or presence and can carry on without it (the router refusing a batch with 3008,
a session keeping ACKs, a delivery pump waiting, the HTTP API's 503, the counter flush,
the sweep, the handshake's 5002) reports the store's OSError with :meth:`failed`: one
count in ``errors`` (STATS ``store_errors_total``) per failed call, and, on the first
failure while the store was thought available, one WARNING and the start of an outage.
Nothing is reported on success, so the hot paths pay nothing while the store works.

During an outage the node's one reconnect task (:meth:`run`, in the broker's nursery)
calls ``probe`` (a cheap store call) after 0.1 s, then after a delay that doubles up to
5 s, until it succeeds; then it logs one INFO, marks the store available and wakes
every waiter of :meth:`wait_available` (delivery pumps, sessions holding ACKs), which
retry at once (:meth:`wait_to_retry`). So an outage is one WARNING and one INFO however many calls failed, and
no waiter polls: each waits for the one event. (A call that succeeds during an outage is
not news here: the probe's next success ends the outage within its backoff.)
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

__all__ = ["FIRST_RETRY_S", "MAX_RETRY_S", "StoreHealth"]

log = logging.getLogger(__name__)

FIRST_RETRY_S = 0.1
"""The reconnect task's first delay after the store became unavailable."""
MAX_RETRY_S = 5.0
"""Its longest delay (it doubles from FIRST_RETRY_S): how late an outage's end may be noticed."""


class StoreHealth:
    """This node's view of its store's reachability; see the module docstring.

    ``probe`` is called (only during an outage) to see whether the store answers again;
    it raises OSError while it does not.
    """

    def __init__(self, probe: Callable[[], Awaitable[object]]) -> None:
        self._probe = probe
        self.available = True
        """False from the first failure of an outage until the probe succeeds (STATS ``store_available``)."""
        self.errors = 0
        """Store and presence calls of this node that failed because the store could not be reached."""
        self._back = trio.Event()  # set when the current outage ends (a fresh one per outage)
        self._down = trio.Event()  # set when an outage begins: the reconnect task starts probing
        self._back.set()

    def failed(self, exc: OSError) -> None:
        """A store or presence call failed with ``exc`` (the store is unreachable). Never raises."""
        self.errors += 1
        if self.available:
            self.available = False
            self._back = trio.Event()
            self._down.set()
            log.warning("the store is unavailable (%s); reconnecting with backoff", exc)

    async def wait_available(self) -> None:
        """Return once the store is thought available (at once if it is)."""
        await self._back.wait()

    async def wait_to_retry(self, failures: int) -> None:
        """Wait before retrying a call that failed ``failures`` times in a row: until the store is available, and
        from the second failure on also FIRST_RETRY_S doubling to MAX_RETRY_S (a store that answers the probe
        but fails the call is retried with backoff, not in a busy loop)."""
        await self._back.wait()
        if failures > 1:
            await trio.sleep(min(FIRST_RETRY_S * 2 ** (failures - 2), MAX_RETRY_S))

    async def run(self) -> None:
        """The reconnect task: during each outage, probe with backoff until the store answers. Never returns."""
        while True:
            await self._down.wait()
            self._down = trio.Event()
            began = trio.current_time()
            delay = FIRST_RETRY_S
            while True:
                await trio.sleep(delay)
                try:
                    await self._probe()
                    break
                except OSError:
                    self.errors += 1
                    delay = min(delay * 2, MAX_RETRY_S)
            self.available = True
            self._back.set()
            log.info(
                "the store is reachable again after %.1f s (%d failed calls so far)",
                trio.current_time() - began,
                self.errors,
            )
