"""The presence contract against the in-process presence."""

from __future__ import annotations

import pytest

from broker.presence import LocalPresence

from .presence_contract import MakePresence, PresenceContract


class TestLocalPresence(PresenceContract):
    @pytest.fixture
    def make_presence(self) -> MakePresence:
        return lambda takeover_wait_s: LocalPresence(takeover_wait_s=takeover_wait_s)
