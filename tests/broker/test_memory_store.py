from __future__ import annotations

import pytest

from broker.store.base import Clock, StoreLimits
from broker.store.memory import MemoryStore

from .store_contract import MakeStore, StoreContract


class TestMemoryStore(StoreContract):
    @pytest.fixture
    def make_store(self) -> MakeStore:
        def make(limits: StoreLimits, clock: Clock) -> MemoryStore:
            return MemoryStore(limits, clock=clock)

        return make


async def test_acked_messages_do_not_pile_up_in_expiry_buckets() -> None:
    """Expiry buckets delete lazily; dead entries never outnumber living ones (plus a small slack)."""
    from .store_contract import msg

    store = MemoryStore(StoreLimits(max_mailbox_messages=10_000))
    await store.enqueue_many([msg(f"m{i}") for i in range(5000)])  # one expiry second: one bucket
    [bucket] = store._buckets.values()
    for start in range(0, 4900, 100):
        await store.ack_many("bob", [f"m{i}" for i in range(start, start + 100)])
        live = 5000 - (start + 100)
        assert len(bucket.items) - bucket.dead == live
        assert bucket.dead <= max(64, live)
    await store.ack_many("bob", [f"m{i}" for i in range(4900, 5000)])
    assert store._buckets == {}
