"""A page on one origin uses the HTTP API of a broker on another (CORS): allowed if the broker lists the origin,
blocked by Chromium itself if not (the preflight is refused, so the request is never made)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from .helpers import from_trio, open_browser, run_in_browser

pytestmark = pytest.mark.browser

FETCH = """async ([api, token, id]) => {
    try {
        const sent = await fetch(api + "/relay/send", {
            method: "POST",
            headers: {"Authorization": "Bearer " + token, "Content-Type": "application/json"},
            body: JSON.stringify({id, to: ["bob"], body: btoa("from another origin")}),
        });
        return {ok: true, status: sent.status, receipt: await sent.json()};
    } catch (error) {
        return {ok: false, error: String(error)};
    }
}"""


async def test_a_page_on_an_allowed_origin_can_use_the_api_and_another_is_blocked(
    broker_factory: Callable[..., Any],
) -> None:
    async with broker_factory() as site:  # serves the pages: http://127.0.0.1:P is listed, http://localhost:P not
        allowed, other = f"http://127.0.0.1:{site.http_port}", f"http://localhost:{site.http_port}"
        async with broker_factory(allowed_origins=(allowed,)) as api:
            base = f"http://127.0.0.1:{api.http_port}"
            token = api.auth.issue("alice")

            async def held_for_bob() -> list[str]:
                return [m.id for m in await api.router.peek("bob", 10)]

            def scenario() -> None:
                with open_browser() as browser:
                    page = browser.new_page()
                    page.goto(f"{allowed}/openapi.json")  # any same-origin document of the site
                    ok = page.evaluate(FETCH, [base, token, "cors-ok"])
                    assert ok == {
                        "ok": True,
                        "status": 200,
                        "receipt": {"id": "cors-ok", "results": {"bob": {"status": "queued"}}},
                    }
                    page.goto(f"{other}/openapi.json")
                    blocked = page.evaluate(FETCH, [base, token, "cors-blocked"])
                    assert blocked["ok"] is False and "Failed to fetch" in blocked["error"], blocked
                    assert from_trio(held_for_bob) == ["cors-ok"]  # the refused preflight kept the POST from going

            await run_in_browser(scenario)
