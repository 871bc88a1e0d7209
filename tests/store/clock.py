"""Clocks for tests that judge time: plain epoch milliseconds, moved by hand or by trio's clock.

The store takes ``now_ms`` on every call that judges time, so its tests need no trio
clock at all: :class:`ManualClock` is an int the test moves. :func:`trio_clock_ms` is for
broker tests run under trio's MockClock (the broker's injected clock).
"""

from __future__ import annotations

import trio

__all__ = ["DAY_S", "EPOCH_MS", "ManualClock", "trio_clock_ms"]

EPOCH_MS = 1_800_000_000_000
"""An arbitrary epoch-ms start (2027), well away from 0 so no test relies on small numbers."""
DAY_S = 86400


class ManualClock:
    """Unix epoch milliseconds that move only when the test says so."""

    def __init__(self, now: int = EPOCH_MS) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> int:
        """Move on by ``seconds``; returns the new now."""
        self.now += int(seconds * 1000)
        return self.now


def trio_clock_ms() -> int:
    """trio's clock as epoch milliseconds (under MockClock, a week passes at once)."""
    return EPOCH_MS + int(trio.current_time() * 1000)
