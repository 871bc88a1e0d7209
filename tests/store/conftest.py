"""Fixtures for the store contract: every Store implementation, opened and closed per test.

``open_store`` is parametrised over :data:`IMPLEMENTATIONS` (name -> a function of the
pytest request returning an opener: a factory taking StoreLimits and returning an async
context manager that yields an opened store). An opener asks for the fixtures it needs
through the request (``request.getfixturevalue``), so a run of the memory store alone
starts no Redis. Redis stores: "redis" (the session's standalone server) and
"redis-cluster" (the session's three-master cluster), each under a key prefix of its own
per test; a missing redis-server skips them (fails under CI). Tests see only the Store
protocol, never an implementation's internals.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest

from broker.redis_client import open_redis
from broker.store.base import Store, StoreLimits
from broker.store.memory import MemoryStore
from broker.store.redis import RedisStore

from .clock import ManualClock

StoreOpener = Callable[[StoreLimits], AbstractAsyncContextManager[Store]]
OpenerFactory = Callable[[pytest.FixtureRequest], StoreOpener]


@asynccontextmanager
async def open_memory_store(limits: StoreLimits) -> AsyncIterator[Store]:
    store = MemoryStore(limits)
    try:
        yield store
    finally:
        await store.aclose()


def redis_store_opener(url: str, prefix: str) -> StoreOpener:
    """Opens a RedisStore over its own client to ``url``, under ``prefix``."""

    @asynccontextmanager
    async def open_redis_store(limits: StoreLimits) -> AsyncIterator[Store]:
        async with open_redis(url) as client:
            store = RedisStore(client, limits, prefix=prefix)
            await store.open()
            try:
                yield store
            finally:
                await store.aclose()

    return open_redis_store


def _on(server_fixture: str) -> OpenerFactory:
    def factory(request: pytest.FixtureRequest) -> StoreOpener:
        server = request.getfixturevalue(server_fixture)
        return redis_store_opener(server.url, request.getfixturevalue("key_prefix"))

    return factory


IMPLEMENTATIONS: dict[str, OpenerFactory] = {
    "memory": lambda request: open_memory_store,
    "redis": _on("redis_server"),
    "redis-cluster": _on("redis_cluster"),
}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def open_store(request: pytest.FixtureRequest) -> StoreOpener:
    """Opens the implementation under test with the given limits (``async with open_store(limits) as s``)."""
    return IMPLEMENTATIONS[request.param](request)


@pytest.fixture
async def store(open_store: StoreOpener) -> AsyncIterator[Store]:
    """The implementation under test with the default limits."""
    async with open_store(StoreLimits()) as opened:
        yield opened


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()
