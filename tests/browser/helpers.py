"""Playwright (sync API) against Debian's Chromium, driven from a worker thread while the broker runs in trio."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 15_000


def chromium_available() -> bool:
    if not os.access(CHROMIUM, os.X_OK):
        return False
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True


@contextmanager
def open_browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def open_page(context: Any, base: str, token: str, *, hold_acks: bool = False, hooks: str | None = None) -> Any:
    """The demo page for ``token``'s mailbox, once its client is connected.

    ``hooks`` is a script run before the page's own, which may set ``window.relayTestHooks``
    (see broker/static/app.js); ``hold_acks`` sets the hook that keeps the client from ACKing.
    """
    page = context.new_page()
    page.on("pageerror", lambda exc: print("page error:", exc))
    if hold_acks:
        page.add_init_script("window.relayTestHooks = { holdAcks: true }")
    if hooks is not None:
        page.add_init_script(hooks)
    page.goto(f"{base}/#token={token}")
    page.wait_for_function("window.relay && window.relay.client.state === 'open'", timeout=WAIT_MS)
    return page


def inbox(page: Any) -> list[dict[str, Any]]:
    """The page's IndexedDB inbox, bodies as text."""
    return page.evaluate(
        "async () => (await window.relay.store.inbox()).map(m => ({...m, body: new TextDecoder().decode(m.body)}))"
    )


def wait_inbox(page: Any, count: int, state: str = "acked") -> list[dict[str, Any]]:
    """Poll the page's IndexedDB until it holds ``count`` messages, all in ``state``."""
    deadline = time.monotonic() + WAIT_MS / 1000
    while True:
        messages = inbox(page)
        if len(messages) >= count and all(m["state"] == state for m in messages):
            return messages
        assert time.monotonic() < deadline, f"inbox has {len(messages)} messages, wanted {count} {state}"
        page.wait_for_timeout(100)
