"""Fixtures for the store contract: every Store implementation, opened and closed per test.

``open_store`` is parametrised over :data:`IMPLEMENTATIONS` (name -> a factory taking
StoreLimits and returning an async context manager that yields an opened store); a
networked store adds itself here (skipping, or failing under CI, when its server is
missing). Tests see only the Store protocol, never an implementation's internals.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest

from broker.store.base import Store, StoreLimits
from broker.store.memory import MemoryStore

from .clock import ManualClock

StoreOpener = Callable[[StoreLimits], AbstractAsyncContextManager[Store]]


@asynccontextmanager
async def open_memory_store(limits: StoreLimits) -> AsyncIterator[Store]:
    store = MemoryStore(limits)
    try:
        yield store
    finally:
        await store.aclose()


IMPLEMENTATIONS: dict[str, StoreOpener] = {"memory": open_memory_store}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def open_store(request: pytest.FixtureRequest) -> StoreOpener:
    """Opens the implementation under test with the given limits (``async with open_store(limits) as s``)."""
    return IMPLEMENTATIONS[request.param]


@pytest.fixture
async def store(open_store: StoreOpener) -> AsyncIterator[Store]:
    """The implementation under test with the default limits."""
    async with open_store(StoreLimits()) as opened:
        yield opened


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()
