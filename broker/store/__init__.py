"""Where messages wait between SEND and ACK: the :class:`~.base.Store` interface and its implementations.

Theory of operation: :func:`open_store` is the one place the broker makes its store from
the configuration; it is an async context manager because a networked store opens
connections before the broker serves and closes them after it stops. The interface and
its contract are in :mod:`broker.store.base`; :mod:`broker.store.memory` is the default.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from .base import Store
from .memory import MemoryStore

if TYPE_CHECKING:
    from ..config import BrokerConfig

__all__ = ["open_store"]


@asynccontextmanager
async def open_store(config: BrokerConfig) -> AsyncIterator[Store]:
    """The store ``config.store`` names, open for the block and closed (``aclose``) after it.

    Raises ValueError for a store this release does not have (config validation refuses
    those first) and whatever a networked store raises when it cannot connect.
    """
    if config.store != "memory":
        raise ValueError(f"unknown store {config.store!r}")
    store = MemoryStore(config.store_limits)
    try:
        yield store
    finally:
        await store.aclose()
