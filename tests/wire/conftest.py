"""Fixtures for the wire tests."""

from __future__ import annotations

import pytest

from .support import PROTOCOL_MD


@pytest.fixture(scope="session")
def protocol_md() -> str:
    return PROTOCOL_MD.read_text(encoding="utf-8")
