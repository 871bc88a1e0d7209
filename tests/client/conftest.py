"""Fixtures for the client tests (helpers live in relay_testing.py, importable by name)."""

from __future__ import annotations

import pytest
from relay_testing import FaultyNetwork


@pytest.fixture
def network() -> FaultyNetwork:
    """A transport factory whose connections record frames and can be broken."""
    return FaultyNetwork()
