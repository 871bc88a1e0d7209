"""Shared fixtures: a real broker on 127.0.0.1, port 0, per test, and tokens for it."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from broker.config import BrokerConfig
from broker.server import Broker

from .redis_servers import REDIS_SERVER, RedisCluster, RedisServer, running_cluster, running_redis

IN_CI = os.environ.get("CI") == "true"
"""Under CI a missing service (Redis, Chromium) is a failure, never a skip."""


_PREFIXES = itertools.count(1)


def require_service(available: bool, what: str) -> None:
    """Skip when a service is missing locally; fail under CI, where .ci/run must have installed it."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"{what} is required under CI=true but is not installed")
    pytest.skip(f"{what} is not installed")


@asynccontextmanager
async def running_broker(tmp_path: Path, **overrides: Any) -> AsyncIterator[Broker]:
    """A broker serving TCP, WebSocket and HTTP on 127.0.0.1:<free ports> until the block ends."""
    clock = overrides.pop("clock", None)
    store = overrides.pop("inject_store", None)  # a Store object; ``store=`` is the setting (a URL)
    # Every listener (TCP, WebSocket, HTTP) on a free port unless the test names one.
    overrides = {"ws_port": 0, "http_port": 0, **overrides}
    config = BrokerConfig(tcp_port=0, data_dir=tmp_path / "broker-data", **overrides)
    extra: dict[str, Any] = {}
    if clock is not None:
        extra["clock"] = clock
    if store is not None:
        extra["store"] = store
    broker = Broker(config, **extra)
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.serve)
        try:
            yield broker
        finally:
            nursery.cancel_scope.cancel()


STORES = ("memory", "redis", "redis-cluster")
"""Every store a broker can run on. A module whose behaviour could differ by store runs each of its tests that
uses a broker on each: ``pytestmark = pytest.mark.stores(*STORES)`` (see :func:`pytest_generate_tests`)."""


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``@pytest.mark.stores(kind, ...)``: run the test once per store kind, if it uses a broker (``store_kind``)."""
    marker = metafunc.definition.get_closest_marker("stores")
    if marker is not None and "store_kind" in metafunc.fixturenames:
        metafunc.parametrize("store_kind", marker.args, indirect=True)


@pytest.fixture
def store_kind(request: pytest.FixtureRequest) -> str:
    """The store the ``broker`` and ``broker_factory`` brokers run on: memory unless the module parametrises it."""
    return str(getattr(request, "param", "memory"))


@pytest.fixture
def store_settings(store_kind: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """The configuration selecting ``store_kind``: a real Redis (started once per run), a key prefix of its own."""
    if store_kind == "memory":
        return {}
    if store_kind == "redis":
        url = request.getfixturevalue("redis_server").url
    elif store_kind == "redis-cluster":
        url = request.getfixturevalue("redis_cluster").url
    else:
        raise ValueError(f"unknown store kind {store_kind!r}")
    return {"store": url, "store_prefix": request.getfixturevalue("key_prefix")}


@pytest.fixture
async def broker(tmp_path: Path, store_settings: dict[str, Any]) -> AsyncIterator[Broker]:
    """A broker with the default configuration on a free port (on the store under test)."""
    async with running_broker(tmp_path, **store_settings) as b:
        yield b


@pytest.fixture
def broker_factory(tmp_path: Path, store_settings: dict[str, Any]) -> Callable[..., Any]:
    """``async with broker_factory(max_inflight=4) as b:`` — a broker with overrides (on the store under test)."""
    counter = iter(range(1000))

    def make(**overrides: Any) -> Any:
        return running_broker(tmp_path / f"b{next(counter)}", **{**store_settings, **overrides})

    return make


def url_of(broker: Broker) -> str:
    return f"tcp://127.0.0.1:{broker.tcp_port}"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One standalone redis-server on loopback for the whole run (tests keep apart by key prefix)."""
    require_service(REDIS_SERVER is not None, "redis-server")
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A three-master Redis Cluster on loopback for the whole run (tests keep apart by key prefix)."""
    require_service(REDIS_SERVER is not None, "redis-server")
    with running_cluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


@pytest.fixture
def key_prefix() -> str:
    """A Redis key prefix no other test uses."""
    return f"t{next(_PREFIXES)}"
