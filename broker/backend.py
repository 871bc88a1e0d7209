"""The backend: the store and the presence a broker node runs on, made from the configuration in one place.

Theory of operation. :func:`open_backend` is the one place the broker turns ``config.store``
into a :class:`Backend`, an async context manager because a networked backend opens its
connections before the broker serves and closes them after it stops:

- ``memory`` (the default): a :class:`~broker.store.memory.MemoryStore` and a
  :class:`~broker.presence.LocalPresence`: one process, nothing shared, nothing survives it.
- a Redis URL: one coredis client (``broker.redis_client``) shared by a
  :class:`~broker.store.redis.RedisStore` and a :class:`~broker.presence_redis.RedisPresence`,
  so every node naming the same Redis (and the same ``store_prefix``) serves one relay:
  queued messages survive a restart of any node, a SEND on one node wakes its recipient's
  session on another, and a mailbox is held by one session across all of them.

Either way the backend makes the node's :class:`~broker.health.StoreHealth`, whose probe
is a cheap store call (Redis: :meth:`RedisStore.flush`, one round trip). With Redis, the
backend also runs a timer that flushes the node's share of the relay-wide counters every
second (:meth:`RedisStore.flush`); while the store is unavailable the timer leaves the
retrying to the health's reconnect task, and a failed flush is reported to it (the log
says so once per outage, not once a second). The Redis modules are imported only when
a Redis URL is configured, so the embedded default never loads coredis.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import trio

from .health import StoreHealth
from .presence import TAKEOVER_WAIT_S, LocalPresence, Presence
from .stats import Histogram
from .store.base import Store, wall_clock_ms
from .store.memory import MemoryStore

if TYPE_CHECKING:
    from .config import BrokerConfig
    from .store.redis import RedisStore

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 1.0
"""How often a node with a Redis store sends its share of the relay-wide statistics (one round trip)."""

__all__ = ["Backend", "StoreUnreachable", "default_node_id", "open_backend", "probed_health", "redacted"]


class StoreUnreachable(ConnectionError):
    """The configured store cannot be reached as the broker starts (the message names it, without a password)."""


@dataclass(frozen=True, slots=True)
class Backend:
    """What a broker node's sessions, router and HTTP API work on."""

    store: Store
    presence: Presence
    health: StoreHealth
    """Whether the store answers (the router, sessions, pumps and HTTP API report failures to it)."""
    round_trips: Callable[[], int] = lambda: 0
    """Round trips made to a networked store and presence so far (STATS ``store_round_trips``)."""
    call_latency: Histogram | None = None
    """A networked store's round-trip latency (None in memory)."""


def default_node_id() -> str:
    """A name for this broker process among the nodes sharing a Redis store: host, pid and a random part."""
    host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())[:40] or "node"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


def redacted(url: str) -> str:
    """``url`` as it may be shown or logged: a password in it is replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return parts._replace(netloc=f"{user}:***@{hosts}").geturl()


@asynccontextmanager
async def open_backend(config: BrokerConfig) -> AsyncIterator[Backend]:
    """The store and presence ``config.store`` names, open for the block and closed after it.

    Raises ValueError for a store this release does not have (config validation refuses those
    first) and :class:`StoreUnreachable` when Redis does not answer as the broker starts (later
    failures reach the callers of the store and presence as OSError).
    """
    if config.store == "memory":
        store = MemoryStore(config.store_limits)
        try:
            yield Backend(store, LocalPresence(takeover_wait_s=TAKEOVER_WAIT_S), probed_health(store))
        finally:
            await store.aclose()
        return
    async with _open_redis_backend(config) as backend:
        yield backend


@asynccontextmanager
async def _open_redis_backend(config: BrokerConfig) -> AsyncIterator[Backend]:
    from .presence_redis import open_redis_presence
    from .redis_client import open_redis
    from .store.redis import RedisStore

    async with open_redis(config.store) as client:
        store = RedisStore(client, config.store_limits, prefix=config.store_prefix)
        try:
            await store.open()  # fail at start, naming the URL, rather than at the first client's HELLO
        except OSError as exc:
            raise StoreUnreachable(f"cannot reach the Redis store at {redacted(config.store)}: {exc}") from exc
        health = StoreHealth(store.flush)
        try:
            async with (
                open_redis_presence(
                    client,
                    node_id=config.node_id or default_node_id(),
                    prefix=config.store_prefix,
                    lease_s=config.presence_lease_s,
                    takeover_wait_s=TAKEOVER_WAIT_S,
                    health=health,
                ) as presence,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(_flush_forever, store, health)

                def round_trips() -> int:
                    return store.round_trips + presence.round_trips + presence.background_round_trips

                yield Backend(store, presence, health, round_trips, store.call_latency)
                nursery.cancel_scope.cancel()
        finally:
            await store.aclose()


def probed_health(store: Store) -> StoreHealth:
    """A :class:`StoreHealth` for any store, probing with ``store.statistics`` (for a store given to the broker)."""

    async def probe() -> None:
        await store.statistics(wall_clock_ms())

    return StoreHealth(probe)


async def _flush_forever(store: RedisStore, health: StoreHealth) -> None:
    """Send this node's relay-wide counter changes every FLUSH_INTERVAL_S (an idle node's would wait otherwise).

    While the store is unavailable the health's reconnect task probes (with flush) instead. A failed
    flush keeps its changes for the next one (and starts an outage if it is the first failure).
    """
    while True:
        await trio.sleep(FLUSH_INTERVAL_S)
        await health.wait_available()
        try:
            await store.flush()
        except OSError as exc:
            health.failed(exc)
