"""Every browser test needs Chromium and Playwright: skipped without them locally, a failure under CI."""

from __future__ import annotations

import pytest

from ..conftest import require_service
from .helpers import chromium_available


@pytest.fixture(autouse=True)
def _need_chromium() -> None:
    require_service(chromium_available(), "Chromium (/usr/bin/chromium) with Python playwright")
