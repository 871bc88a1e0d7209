"""The demo page: each tab keeps its own mailbox across reloads, and a sent message's labels say
what the relay said (the receipt: queued at the relay, or handed to an open session; later a
delivery status), never more. The statuses themselves: test_delivery_status.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import trio

from broker.server import Broker

from .helpers import (
    WAIT_MS,
    base_url,
    chips,
    open_browser,
    open_page,
    run_in_browser,
    send_with_form,
    tabs,
    wait_inbox,
    wait_open,
)

pytestmark = pytest.mark.browser

UNTIL_DELIVERED = 'when it has, this label says "delivered to {}"'


def mailbox_shown(page: Any) -> str:
    name: str = page.inner_text("#mailbox-name")
    return name


async def test_each_tab_keeps_its_own_mailbox_across_reloads(broker: Broker) -> None:
    base = base_url(broker)

    def scenario() -> None:
        with tabs(broker, "alice", "bob") as (alice, bob):  # bob opened last: the most recent token
            for page in (alice, bob):
                assert "token" not in page.url  # the token does not stay in the address bar
            for _ in range(2):
                for page, name in ((alice, "alice"), (bob, "bob")):
                    page.reload()
                    wait_open(page)
                    assert mailbox_shown(page) == name
            for page in (alice, bob):
                page.wait_for_timeout(300)  # a takeover (4001) would have arrived by now
                assert page.inner_text("#conn-state") == "online"
                assert page.is_hidden("#notice")
            assert trio.from_thread.run_sync(lambda: "alice" in broker.presence and "bob" in broker.presence)
            # Both still chat after the reloads.
            send_with_form(alice, "bob", "still you?")
            assert [m["body"] for m in wait_inbox(bob, 1)] == ["still you?"]
            # A new tab opens no mailbox by itself: it offers the recent ones.
            third = alice.context.new_page()
            third.goto(f"{base}/")
            third.wait_for_selector("#saved-tokens-block:not([hidden])", timeout=WAIT_MS)
            assert third.is_hidden("#chat")
            assert third.eval_on_selector_all("#saved-tokens button", "els => els.map(e => e.textContent)") == [
                "bob",
                "alice",
            ]
            third.click("#saved-tokens button >> text=alice")  # taking alice over, on purpose
            wait_open(third)
            assert mailbox_shown(third) == "alice"
            third.reload()
            wait_open(third)
            assert mailbox_shown(third) == "alice"
            bob.wait_for_timeout(300)
            assert (mailbox_shown(bob), bob.inner_text("#conn-state")) == ("bob", "online")

    await run_in_browser(scenario)


async def test_sent_labels_say_what_the_relay_knows_and_no_more(broker: Broker) -> None:
    base = base_url(broker)
    alice_token, bob_token = broker.auth.issue("alice"), broker.auth.issue("bob")

    def scenario() -> None:
        with open_browser() as browser:
            context = browser.new_context()
            alice = open_page(context, base, alice_token)
            bob = open_page(context, base, bob_token, hold_acks=True)  # saves, never ACKs: no "delivered" yet
            send_with_form(alice, "bob", "to an open session")
            alice.wait_for_selector(".msg.out .chip.sent", timeout=WAIT_MS)
            send_with_form(alice, "nobody-home", "to an offline mailbox", plaintext=True)
            alice.wait_for_selector(".msg.out .chip.queued", timeout=WAIT_MS)
            send_with_form(alice, "bob, not a name!", "one good, one bad", plaintext=True)
            alice.wait_for_selector(".msg.out .chip.refused", timeout=WAIT_MS)
            alice.evaluate(
                "() => window.relay.client.sendMessage('nobody-home', 'again', {id: 'twice', plaintext: true})"
            )
            alice.evaluate(
                "() => window.relay.client.sendMessage('nobody-home', 'again', {id: 'twice', plaintext: true})"
            )
            alice.wait_for_selector(".msg.out .chip.duplicate", timeout=WAIT_MS)
            alice.evaluate(
                "() => window.relay.client.sendMessage('nobody-home', 'quiet', {notify: false, plaintext: true})"
            )
            alice.wait_for_function(
                "document.querySelectorAll('.msg.out:last-child .chip.queued').length === 1", timeout=WAIT_MS
            )
            wait_inbox(bob, 2, state="saved")  # on bob's device, not ACKed: the relay cannot know

            shown = chips(alice)
            assert [sorted(c["text"] for c in message) for message in shown] == [
                ["sent to bob's open session"],
                ["queued at relay for nobody-home"],
                ["not sent to not a name!: not a mailbox name (3006)", "sent to bob's open session"],
                ["nobody-home: relay already had it"],
                ["queued at relay for nobody-home"],
            ]
            for c in (c for message in shown for c in message):
                assert not re.search(r"\b(read|saved|received)\b", c["text"]), c["text"]
            [[sent], [queued], _, [duplicate], [quiet]] = [[c["title"] for c in m] for m in shown]
            (refused,) = (c["title"] for c in shown[2] if c["text"].startswith("not sent"))
            assert "handed to a session bob had open" in sent and UNTIL_DELIVERED.format("bob") in sent
            assert "nobody-home had no open session" in queued and UNTIL_DELIVERED.format("nobody-home") in queued
            assert "INVALID_RECIPIENT 3006" in refused
            assert "nothing new was stored" in duplicate
            assert "this message asked for no delivery status" in quiet
            legend = alice.inner_text("#legend")  # collapsed: its text is in the DOM
            assert "not whether it was read" in legend
            alice.click("#legend summary")
            assert "None of these says the recipient has read the message" in alice.inner_text("#legend-note")
            # Bob's side: what his browser did, in its own words.
            for (received,) in chips(bob, ".msg.in"):
                assert received["text"] == "saved" and "the relay still holds it" in received["title"]

    await run_in_browser(scenario)


async def test_a_send_refused_as_a_whole_is_shown_as_not_sent_to_anyone(broker_factory: Callable[..., Any]) -> None:
    async with broker_factory(max_recipients=2, max_frame_bytes=1024) as broker:
        base = base_url(broker)
        alice_token = broker.auth.issue("alice")

        def scenario() -> None:
            with open_browser() as browser:
                alice = open_page(browser.new_context(), base, alice_token)
                send_with_form(alice, "bob, carol, dave", "to too many", plaintext=True)
                alice.wait_for_selector("#notice:not([hidden])", timeout=WAIT_MS)
                assert alice.inner_text("#notice") == (
                    "Not sent to anyone: the relay refused it, more than 2 recipients (3004)."
                )
                receipt = alice.evaluate(
                    "async () => await window.relay.client.sendMessage(['bob'], 'x'.repeat(800), {plaintext: true})"
                )
                assert set(receipt) == {"id", "code"} and receipt["code"] == 3007
                alice.wait_for_function(
                    "document.querySelectorAll('.msg.out .chip.refused').length === 2", timeout=WAIT_MS
                )
                shown = chips(alice)
                assert [[c["text"] for c in message] for message in shown] == [
                    ["not sent: more than 2 recipients (3004)"],
                    ["not sent: message too large (3007)"],
                ]
                assert "nothing was stored for anyone (TOO_MANY_RECIPIENTS 3004)" in shown[0][0]["title"]
                # Answered: not sent again after a reload.
                alice.reload()
                wait_open(alice)
                alice.wait_for_function(
                    "document.querySelectorAll('.msg.out .chip.refused').length === 2", timeout=WAIT_MS
                )
                unconfirmed = alice.evaluate("async () => (await window.relay.store.unconfirmed()).length")
                assert unconfirmed == 0

        await run_in_browser(scenario)
        assert (await broker.statistics())["messages_total"] == 0


async def test_a_recipient_name_too_long_for_the_protocol_is_refused_on_the_page(broker: Broker) -> None:
    base = base_url(broker)
    alice_token = broker.auth.issue("alice")

    def scenario() -> None:
        with open_browser() as browser:
            alice = open_page(browser.new_context(), base, alice_token)
            send_with_form(alice, "b" * 65, "kept")
            alice.wait_for_selector("#notice:not([hidden])", timeout=WAIT_MS)
            assert "at most 64 characters" in alice.inner_text("#notice")
            assert alice.input_value("#text") == "kept"  # the text is not lost
            assert alice.evaluate("async () => (await window.relay.store.outbox()).length") == 0
            assert alice.inner_text("#conn-state") == "online"

    await run_in_browser(scenario)
