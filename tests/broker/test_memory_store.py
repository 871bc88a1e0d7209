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
