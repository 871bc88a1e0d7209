"""Playwright (sync API) against Debian's Chromium, driven from a worker thread while the broker runs in trio."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from broker.server import Broker

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
TIMEOUT = 60
"""Seconds a whole browser scenario may take."""


def base_url(broker: Broker) -> str:
    """The demo page's origin on ``broker``'s HTTP listener."""
    return f"http://127.0.0.1:{broker.http_port}"


async def run_in_browser(scenario: Callable[[], None]) -> None:
    """Run a blocking Playwright scenario in a worker thread while the broker keeps serving."""
    with trio.fail_after(TIMEOUT):
        await trio.to_thread.run_sync(scenario)


def from_trio(fn: Callable[..., Any], *args: Any) -> Any:
    """From the scenario's thread: run async ``fn(*args)`` in the test's trio loop."""
    return trio.from_thread.run(fn, *args)


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


@contextmanager
def tabs(broker: Broker, *mailboxes: str) -> Iterator[list[Any]]:
    """One browser profile (its tabs share IndexedDB and localStorage, as real tabs do) with a demo-page tab per
    mailbox, opened in that order, each connected. Another tab of the same profile: ``pages[0].context.new_page()``."""
    base = base_url(broker)
    tokens = [broker.auth.issue(mailbox) for mailbox in mailboxes]
    with open_browser() as browser:
        context = browser.new_context()
        yield [open_page(context, base, token) for token in tokens]


def send_with_form(page: Any, to: str, text: str, *, plaintext: bool = False) -> None:
    """Send ``text`` to ``to`` with the compose form; ``plaintext`` ticks "Send unencrypted" (else unticks it)."""
    page.fill("#to", to)
    page.fill("#text", text)
    page.set_checked("#plaintext", plaintext)
    page.click("#send")


def inbox(page: Any) -> list[dict[str, Any]]:
    """The page's IndexedDB inbox, bodies as text."""
    messages: list[dict[str, Any]] = page.evaluate(
        "async () => (await window.relay.store.inbox()).map(m => ({...m, body: new TextDecoder().decode(m.body)}))"
    )
    return messages


def wait_inbox(page: Any, count: int, state: str = "acked") -> list[dict[str, Any]]:
    """Poll the page's IndexedDB until it holds ``count`` messages, all in ``state``."""
    deadline = time.monotonic() + WAIT_MS / 1000
    while True:
        messages = inbox(page)
        if len(messages) >= count and all(m["state"] == state for m in messages):
            return messages
        assert time.monotonic() < deadline, f"inbox has {len(messages)} messages, wanted {count} {state}"
        page.wait_for_timeout(100)


def wait_open(page: Any) -> None:
    """Wait until the page's client has its WELCOME (after a load or a reload)."""
    page.wait_for_function("window.relay && window.relay.client.state === 'open'", timeout=WAIT_MS)


def chips(page: Any, selector: str = ".msg.out") -> list[list[dict[str, str]]]:
    """For each message matching ``selector``, in page order: the text and tooltip of each of its chips.

    Delivery and storage chips only: not the badge saying whether it was encrypted (``.chip.security``).
    """
    found: list[list[dict[str, str]]] = page.eval_on_selector_all(
        selector,
        "els => els.map(li => [...li.querySelectorAll('.chip:not(.security)')]"
        ".map(c => ({text: c.textContent, title: c.title})))",
    )
    return found


def wait_true(page: Any, script: str, what: str) -> None:
    """Poll ``page.evaluate(script)`` (which may be async) until it is true.

    ``page.wait_for_function`` is no use for async checks: the promise it gets back is itself truthy.
    """
    deadline = time.monotonic() + WAIT_MS / 1000
    while not page.evaluate(script):
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        page.wait_for_timeout(100)
