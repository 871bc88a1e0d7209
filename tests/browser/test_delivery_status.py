"""Delivery status in the demo page (issue 12): a sent message's chip moves from "queued" to
"delivered" (the recipient's device saved and ACKed it) or "expired", also when the status
arrives while the sender's page is closed, and it stays so across reloads (IndexedDB keeps it).
Across transports: a TCP or HTTP sender hears about a browser recipient, and the page about a
TCP recipient.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
import trio

from broker.server import Broker
from wire import Ack, Deliver, Drained, Receipt, ReportState, Send, Status, StatusAck, StatusReport

from ..broker.raw import RawClient
from .helpers import (
    WAIT_MS,
    base_url,
    chips,
    from_trio,
    open_browser,
    open_page,
    run_in_browser,
    send_with_form,
    wait_inbox,
    wait_open,
)

pytestmark = pytest.mark.browser


def chip_texts(page: Any) -> list[list[str]]:
    """Per sent message, in page order: its chips' texts."""
    return [[c["text"] for c in message] for message in chips(page)]


def wait_chips(page: Any, wanted: list[list[str]]) -> None:
    """Poll until the sent messages' chips read ``wanted`` (each message's chips in any order)."""
    deadline = time.monotonic() + WAIT_MS / 1000
    while (shown := [sorted(m) for m in chip_texts(page)]) != [sorted(m) for m in wanted]:
        assert time.monotonic() < deadline, f"chips are {shown}, wanted {wanted}"
        page.wait_for_timeout(100)


def wait_gone(broker: Broker, mailbox: str) -> None:
    """Wait until the broker has seen ``mailbox``'s session end (its page was closed)."""
    deadline = time.monotonic() + 10
    while trio.from_thread.run_sync(lambda: mailbox in broker.presence):
        assert time.monotonic() < deadline, f"{mailbox} still connected"
        time.sleep(0.05)


def held_statuses(broker: Broker, mailbox: str) -> int:
    """How many statuses the broker still holds (un-ACKed) in ``mailbox``'s lane."""

    async def fetch() -> int:
        return len(await broker.store.fetch_statuses(mailbox, 0, 100, broker.clock()))

    count: int = from_trio(fetch)
    return count


def saved_statuses(page: Any) -> list[dict[str, Any]]:
    """The statuses the page's IndexedDB holds, per outbox entry: [{id, recipient, state}]."""
    found: list[dict[str, Any]] = page.evaluate(
        """async () => (await window.relay.store.outbox()).flatMap(e => Object.values(e.statuses))
             .map(s => ({id: s.id, recipient: s.recipient, state: s.state}))"""
    )
    return found


async def test_the_chip_goes_from_queued_to_delivered_when_the_other_tab_opens_and_stays_after_a_reload(
    broker: Broker,
) -> None:
    base = base_url(broker)
    alice_token, bob_token = broker.auth.issue("alice"), broker.auth.issue("bob")

    def scenario() -> None:
        with open_browser() as browser:
            context = browser.new_context()
            alice = open_page(context, base, alice_token)
            send_with_form(alice, "bob", "are you there?", plaintext=True)  # bob has no key yet
            wait_chips(alice, [["queued at relay for bob"]])
            bob = open_page(context, base, bob_token)
            wait_inbox(bob, 1)
            wait_chips(alice, [["delivered to bob"]])
            ((delivered,),) = chips(alice)
            assert "bob's device saved it and acknowledged it at" in delivered["title"]
            assert "does not say that bob has read it" in delivered["title"]
            for _ in range(2):
                alice.reload()
                wait_open(alice)
                wait_chips(alice, [["delivered to bob"]])
            assert held_statuses(broker, "alice") == 0  # saved, then STATUS_ACKed: the broker holds none
            sent_id = alice.evaluate("async () => (await window.relay.store.outbox())[0].id")
            assert saved_statuses(alice) == [{"id": sent_id, "recipient": "bob", "state": "delivered"}]

    await run_in_browser(scenario)


async def test_alice_sends_to_offline_bob_closes_her_tab_bob_opens_his_alice_reopens_and_sees_delivered(
    broker: Broker,
) -> None:
    """The issue's "Done when" scenario, through the page as a user would do it."""
    base = base_url(broker)
    alice_token, bob_token = broker.auth.issue("alice"), broker.auth.issue("bob")

    def scenario() -> None:
        with open_browser() as browser:
            context = browser.new_context()  # one profile: IndexedDB and the recent tokens outlive a tab
            alice = open_page(context, base, alice_token)
            send_with_form(alice, "bob", "see you tomorrow", plaintext=True)  # bob has no key yet
            wait_chips(alice, [["queued at relay for bob"]])
            alice.close()
            wait_gone(broker, "alice")

            bob = open_page(context, base, bob_token)
            assert [m["body"] for m in wait_inbox(bob, 1)] == ["see you tomorrow"]
            deadline = time.monotonic() + WAIT_MS / 1000
            while held_statuses(broker, "alice") == 0:  # bob's ACK queued a status for the absent alice
                assert time.monotonic() < deadline, "no status queued for alice"
                time.sleep(0.05)
            assert held_statuses(broker, "alice") == 1

            again = context.new_page()  # a new tab: alice picks her mailbox from the recent ones
            again.goto(f"{base}/")
            again.click("#saved-tokens button >> text=alice", timeout=WAIT_MS)
            wait_open(again)
            wait_chips(again, [["delivered to bob"]])
            assert held_statuses(broker, "alice") == 0
            again.reload()
            wait_open(again)
            wait_chips(again, [["delivered to bob"]])

    await run_in_browser(scenario)


async def test_a_group_message_says_how_many_of_its_recipients_have_it(broker: Broker) -> None:
    base = base_url(broker)
    tokens = {name: broker.auth.issue(name) for name in ("alice", "bob", "carol", "dave")}

    def scenario() -> None:
        with open_browser() as browser:
            context = browser.new_context()
            alice = open_page(context, base, tokens["alice"])
            send_with_form(alice, "bob, carol, dave", "team meeting at ten", plaintext=True)
            queued = ["queued at relay for bob", "queued at relay for carol", "queued at relay for dave"]
            wait_chips(alice, [["0 of 3 delivered", *queued]])
            for name in ("bob", "carol"):
                wait_inbox(open_page(context, base, tokens[name]), 1)
            wait_chips(alice, [["2 of 3 delivered", "delivered to bob", "delivered to carol", queued[2]]])
            alice.reload()
            wait_open(alice)
            wait_chips(alice, [["2 of 3 delivered", "delivered to bob", "delivered to carol", queued[2]]])
            wait_inbox(open_page(context, base, tokens["dave"]), 1)
            wait_chips(alice, [["3 of 3 delivered", "delivered to bob", "delivered to carol", "delivered to dave"]])
            assert alice.eval_on_selector(".msg.out .chip.summary", "c => c.classList.contains('all')")

    await run_in_browser(scenario)


async def test_a_message_that_expires_unread_says_expired(broker: Broker) -> None:
    base = base_url(broker)
    alice_token = broker.auth.issue("alice")

    def scenario() -> None:
        with open_browser() as browser:
            alice = open_page(browser.new_context(), base, alice_token)
            alice.evaluate(
                "() => window.relay.client.sendMessage(['erin', 'fay'], 'soon gone', {ttl: 1, plaintext: true})"
            )
            wait_chips(alice, [["0 of 2 delivered", "queued at relay for erin", "queued at relay for fay"]])
            time.sleep(1.1)  # real time: the TTL passes
            assert from_trio(broker.cleanup) == 2  # what the sweeper does every hour
            wait_chips(
                alice, [["0 of 2 delivered · 2 expired", "expired before erin got it", "expired before fay got it"]]
            )
            (message,) = chips(alice)
            expired = next(c for c in message if c["text"].startswith("expired before erin"))
            assert "before erin's device had saved it" in expired["title"]
            alice.reload()
            wait_open(alice)
            wait_chips(
                alice, [["0 of 2 delivered · 2 expired", "expired before erin got it", "expired before fay got it"]]
            )

    await run_in_browser(scenario)


async def test_a_tcp_sender_hears_that_the_browser_saved_its_message_and_the_page_hears_about_tcp(
    broker: Broker,
) -> None:
    base = base_url(broker)
    assert broker.tcp_port is not None
    tcp, _ = await RawClient.login(broker.tcp_port, broker.auth.issue("native"))
    await tcp.expect(Drained)

    async def tcp_send() -> None:
        await tcp.send(Send(id="from-tcp", to=("webby",), body=b"hello browser", notify=True))
        assert (await tcp.expect(Receipt)).results["webby"].status is Status.DELIVERED

    async def tcp_status() -> StatusReport:
        report = await tcp.expect(StatusReport)
        await tcp.send(StatusAck(seqs=(report.seq,)))
        return report

    async def tcp_receive_and_ack() -> None:
        deliver = await tcp.expect(Deliver)
        assert deliver.id == "from-web"
        await tcp.send(Ack(ids=(deliver.id,)))

    def scenario() -> None:
        with open_browser() as browser:
            page = open_page(browser.new_context(), base, broker.auth.issue("webby"))
            from_trio(tcp_send)
            wait_inbox(page, 1)
            report = from_trio(tcp_status)
            assert (report.state, report.id, report.recipient) == (ReportState.DELIVERED, "from-tcp", "webby")
            # And the other way: the page sends, the TCP client saves (here: just ACKs) it.
            page.evaluate(
                "() => window.relay.client.sendMessage('native', 'hello tcp', {id: 'from-web', plaintext: true})"
            )
            from_trio(tcp_receive_and_ack)
            wait_chips(page, [["delivered to native"]])

    await run_in_browser(scenario)
    assert await broker.store.fetch_statuses("native", 0, 100, broker.clock()) == []  # STATUS_ACKed
    await tcp.aclose()


async def test_an_http_sender_fetches_the_status_of_a_message_a_browser_saved(broker: Broker) -> None:
    base = base_url(broker)
    headers = {"Authorization": f"Bearer {broker.auth.issue('poster')}"}
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        send = {"id": "by-http", "to": ["webby"], "body": "", "notify": True}
        r = await http.post("/relay/send", json=send, headers=headers)
        assert r.json() == {"id": "by-http", "results": {"webby": {"status": "queued"}}}
        assert (await http.get("/relay/statuses", headers=headers)).json() == {"statuses": []}

        async def statuses_heard() -> list[dict[str, Any]]:
            while not (found := (await http.get("/relay/statuses", headers=headers)).json()["statuses"]):
                await trio.sleep(0.05)  # the page's ACK is on its way
            return found  # type: ignore[no-any-return]

        def scenario() -> list[dict[str, Any]]:
            with open_browser() as browser:  # open until the status is heard: the ACK is not lost with it
                wait_inbox(open_page(browser.new_context(), base, broker.auth.issue("webby")), 1)
                heard: list[dict[str, Any]] = from_trio(statuses_heard)
                return heard

        with trio.fail_after(60):
            (status,) = await trio.to_thread.run_sync(scenario)
        assert (status["state"], status["id"], status["recipient"]) == ("delivered", "by-http", "webby")
        r = await http.post("/relay/statuses/acknowledge", json={"seqs": [status["seq"]]}, headers=headers)
        assert r.json() == {"acknowledged": 1}
        assert (await http.get("/relay/statuses", headers=headers)).json() == {"statuses": []}
