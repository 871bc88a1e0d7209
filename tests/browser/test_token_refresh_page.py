"""The JS client's token refresh (``refreshToken``, protocol.md rule 22) in a real Chromium against a real broker:
the session outlives its first token over WebSocket, with the tokens the page's callback hands out."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.broker.issuers import expiring_token
from tests.conftest import running_broker

from .helpers import base_url, open_browser, run_in_browser

pytestmark = pytest.mark.browser

SCRIPT = """async ({ url, first, next }) => {
  const { RelayClient } = await import('/js/client.js')
  const tokens = [...next]
  const client = new RelayClient({ url, token: first, e2e: false, refreshToken: async () => tokens.shift() })
  const refreshed = []
  const errors = []
  client.addEventListener('refreshed', (e) => refreshed.push(e.detail.expires_in_s))
  client.addEventListener('error', (e) => errors.push(e.detail))
  const opened = new Promise((resolve) => client.addEventListener('welcome', (e) => resolve(e.detail), { once: true }))
  await client.start()
  const welcome = await opened
  while (refreshed.length < 2 && errors.length === 0) await new Promise((resolve) => setTimeout(resolve, 50))
  const receipt = await client.sendMessage('bob', 'after two refreshes')
  const result = { expires_in_s: welcome.expires_in_s, refreshed, errors, receipt, state: client.state }
  client.close()
  return result
}"""


async def test_the_js_client_refreshes_its_token_in_a_browser(tmp_path: Path) -> None:
    async with running_broker(tmp_path, token_leeway_s=0) as broker:

        def token(seconds: float) -> str:
            return expiring_token(broker, "bob", seconds)

        def scenario() -> dict[str, object]:
            with open_browser() as browser:
                page = browser.new_page()
                page.goto(base_url(broker) + "/")
                # 2 s, then one that has 6 s from now (about 5 s left when it is asked for), then an hour.
                args = {
                    "url": f"ws://127.0.0.1:{broker.ws_port}/relay",
                    "first": token(2),
                    "next": [token(6), token(3600)],
                }
                return page.evaluate(SCRIPT, args)  # type: ignore[no-any-return]

        got: dict[str, object] = {}

        def run() -> None:
            got.update(scenario())

        await run_in_browser(run)
        assert got["errors"] == [] and got["state"] == "open"
        assert got["expires_in_s"] in (0, 1)
        first, second = got["refreshed"]  # type: ignore[misc]
        assert 1 <= first <= 6 and 3500 < second <= 3600  # (whole seconds left when the broker took each)
        assert got["receipt"] == {"id": got["receipt"]["id"], "results": {"bob": {"status": "delivered"}}}  # type: ignore[index]
        stats = await broker.statistics()
        assert (stats["tokens_refreshed_total"], stats["sessions_expired_total"]) == (2, 0)
