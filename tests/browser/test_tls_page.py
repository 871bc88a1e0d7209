"""The demo page served over HTTPS (a certificate made by trustme): it opens the wss:// listener (a page on https
may not open ws://), and two tabs on it talk end to end through the broker, with a Python client on tls:// too."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from client import open_client

from ..tls.certs import tls_broker
from .helpers import from_trio, open_browser, open_page, run_in_browser, send_with_form, wait_inbox

pytestmark = pytest.mark.browser


async def test_the_demo_page_over_https_talks_over_wss(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    async with tls_broker(tmp_path, ca.issue_cert("127.0.0.1")) as broker:
        base = f"https://127.0.0.1:{broker.https_port}"
        alice_token, bob_token = broker.auth.issue("alice"), broker.auth.issue("bob")

        async def carol_writes_to_bob() -> None:
            url = f"tls://127.0.0.1:{broker.tls_port}"
            async with open_client(url, broker.auth.issue("carol"), ca_file=tmp_path / "ca.pem") as carol:
                await carol.send("bob", b"from tls://")

        def scenario() -> None:
            with open_browser() as browser:
                # The browser does not know the test's CA: it is told to accept the broker's certificate anyway.
                context = browser.new_context(ignore_https_errors=True)
                alice = open_page(context, base, alice_token)
                bob = open_page(context, base, bob_token)
                for page in (alice, bob):
                    assert page.evaluate("window.relay.client.url") == f"wss://127.0.0.1:{broker.wss_port}/relay"
                send_with_form(alice, "bob", "over wss")
                from_trio(carol_writes_to_bob)
                got = wait_inbox(bob, 2)
                assert sorted((m["from"], m["body"], m["security"]) for m in got) == [
                    ("alice", "over wss", "e2e"),
                    ("carol", "from tls://", "e2e"),
                ]

        await run_in_browser(scenario)
