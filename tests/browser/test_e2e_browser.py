"""End-to-end encryption in the demo page, in real Chromium, through a real broker (issue 13).

Two tabs chat encrypted and show the same safety number, and so do the ``relay`` CLI and a page;
a Python client (wire/e2e.py over a raw protocol connection: KEY_PUT, KEY_GET, SEND, DELIVER,
ACK) and the page seal and open each other's messages, both ways; a changed key is refused by
the page until accepted, and a message signed by the old key is shown as not verified; a reload
keeps the device's keys and the pins (IndexedDB); sending to a mailbox without a key needs the
"Send unencrypted" box.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import trio

from broker.server import Broker
from client.cli import main as relay_cli
from wire import Ack, Deliver, KeyGet, KeyGetResult, KeyPut, KeyPutResult, KeyRecord, Receipt, Send
from wire.e2e import (
    EncryptionKey,
    Identity,
    fingerprint,
    is_envelope,
    make_key_record,
    open_envelope,
    safety_number,
    seal,
    verify_key_record,
)

from ..broker.raw import RawClient
from .helpers import (
    base_url,
    from_trio,
    inbox,
    open_browser,
    open_page,
    run_in_browser,
    send_with_form,
    tabs,
    wait_inbox,
    wait_open,
    wait_true,
)

pytestmark = pytest.mark.browser


class PythonDevice:
    """A mailbox's device in Python: its keys (wire/e2e.py) and a raw connection to the broker."""

    def __init__(self, mailbox: str, client: RawClient) -> None:
        self.mailbox = mailbox
        self.client = client
        self.identity = Identity.generate()
        self.ek = EncryptionKey.generate()

    @classmethod
    async def connect(cls, broker: Broker, mailbox: str) -> PythonDevice:
        client, _ = await RawClient.login(broker.tcp_port, broker.auth.issue(mailbox))
        device = cls(mailbox, client)
        await device.publish()
        return device

    async def publish(self) -> None:
        record = make_key_record(self.mailbox, self.identity, self.ek)
        await self.client.send(KeyPut(key=record))
        _, result = await self.client.until(KeyPutResult)
        assert (result.kid, result.code) == (record.kid, None)

    async def lookup(self, mailbox: str) -> KeyRecord:
        await self.client.send(KeyGet(mailboxes=(mailbox,)))
        _, result = await self.client.until(KeyGetResult)
        record = result.keys[mailbox]
        assert verify_key_record(mailbox, record)
        return record

    async def send_sealed(self, to: str, msg_id: str, text: str, identity: Identity | None = None) -> bytes:
        record = await self.lookup(to)
        body = seal(
            sender=self.mailbox,
            msg_id=msg_id,
            recipients=[(to, record)],
            identity=identity or self.identity,
            body=text.encode(),
        )
        await self.client.send(Send(id=msg_id, to=(to,), body=body))
        _, receipt = await self.client.until(Receipt)
        assert receipt.results is not None and receipt.results[to].code is None
        return body

    async def receive(self, sender_ik: bytes) -> tuple[Deliver, str]:
        """The next DELIVER, opened with the sender's identity key, then ACKed."""
        _, deliver = await self.client.until(Deliver)
        assert is_envelope(deliver.body), "the page sent it encrypted"
        text = open_envelope(
            deliver.body,
            sender=deliver.sender,
            msg_id=deliver.id,
            me=self.mailbox,
            sender_ik=sender_ik,
            my_keys={self.ek.kid: self.ek},
        ).decode()
        await self.client.send(Ack(ids=(deliver.id,)))
        return deliver, text


def own_fingerprint(page: Any) -> str:
    wait_true(page, "document.querySelector('#own-fingerprint').textContent !== '…'", "the fingerprint is shown")
    shown: str = page.inner_text("#own-fingerprint")
    return shown


def shown_contacts(page: Any) -> dict[str, dict[str, Any]]:
    """The Keys panel as shown: per contact, its safety number, and whether a changed key is flagged (its number)."""
    found: list[dict[str, Any]] = page.eval_on_selector_all(
        "#contacts li",
        """els => els.map(li => ({
             mailbox: li.dataset.mailbox,
             number: li.querySelector('.number.pinned').textContent,
             changed: li.classList.contains('changed'),
             pending: li.querySelector('.number.pending')?.textContent ?? null,
             accept: li.querySelector('button.accept') !== null
           }))""",
    )
    return {c["mailbox"]: c for c in found}


def wait_contact(page: Any, mailbox: str, *, changed: bool = False) -> dict[str, Any]:
    script = f"""() => [...document.querySelectorAll('#contacts li')].some(li =>
                   li.dataset.mailbox === {mailbox!r} && li.classList.contains('changed') === {str(changed).lower()})"""
    wait_true(page, script, f"{mailbox} is shown under Keys (changed: {changed})")
    return shown_contacts(page)[mailbox]


def badges(page: Any, selector: str) -> list[tuple[str, str]]:
    """Per message matching ``selector``, in page order: its security badge and its text as shown."""
    found: list[list[str]] = page.eval_on_selector_all(
        selector,
        """els => els.map(li => [li.querySelector('.chip.security').textContent,
                                 li.querySelector('.text').textContent])""",
    )
    return [(b, t) for b, t in found]


def wait_badges(page: Any, selector: str, count: int) -> list[tuple[str, str]]:
    wait_true(page, f"document.querySelectorAll({selector!r}).length >= {count}", f"{count} messages shown")
    return badges(page, selector)


def notice(page: Any) -> str:
    wait_true(page, "!document.querySelector('#notice').hidden", "a notice is shown")
    text: str = page.inner_text("#notice")
    return text


def outbox_count(page: Any) -> int:
    count: int = page.evaluate("async () => (await window.relay.store.outbox()).length")
    return count


async def test_two_tabs_chat_encrypted_and_show_the_same_safety_number(broker: Broker) -> None:
    def scenario() -> None:
        with tabs(broker, "alice", "bob") as (alice, bob):
            send_with_form(alice, "bob", "meet at noon")
            (received,) = wait_inbox(bob, 1)
            assert (received["body"], received["security"]) == ("meet at noon", "e2e")
            send_with_form(bob, "alice", "see you then")
            (reply,) = wait_inbox(alice, 1)
            assert (reply["body"], reply["security"]) == ("see you then", "e2e")

            assert wait_badges(bob, ".msg.in", 1) == [("encrypted", "meet at noon")]
            assert wait_badges(alice, ".msg.out", 1) == [("encrypted", "meet at noon")]
            sealed = alice.evaluate("async () => (await window.relay.store.outbox())[0].sealed.length")
            assert sealed > 256, "what went out was the envelope, padded"

            alice_fp, bob_fp = own_fingerprint(alice), own_fingerprint(bob)
            assert alice_fp != bob_fp
            assert len(alice_fp.split(" ")) == 6
            bob_seen_by_alice = wait_contact(alice, "bob")
            alice_seen_by_bob = wait_contact(bob, "alice")
            assert bob_seen_by_alice["number"] == alice_seen_by_bob["number"], "both see the same safety number"
            assert bob_seen_by_alice["number"] == f"{alice_fp} {bob_fp}", "the fingerprints in mailbox order"
            assert not bob_seen_by_alice["changed"] and not bob_seen_by_alice["accept"]

    await run_in_browser(scenario)


async def test_python_and_browser_exchange_encrypted_messages_both_ways(broker: Broker) -> None:
    base = base_url(broker)
    py = await PythonDevice.connect(broker, "pyuser")
    web_token = broker.auth.issue("webby")

    def scenario() -> None:
        with open_browser() as browser:
            page = open_page(browser.new_context(), base, web_token)
            web_ik = from_trio(py.lookup, "webby").ik
            # Python -> browser: sealed in Python, opened, saved and ACKed by the page.
            body = from_trio(py.send_sealed, "webby", "py-1", "hello from python")
            assert b"hello from python" not in body
            (saved,) = wait_inbox(page, 1)
            assert (saved["from"], saved["id"], saved["body"], saved["security"]) == (
                "pyuser",
                "py-1",
                "hello from python",
                "e2e",
            )
            assert wait_badges(page, ".msg.in", 1) == [("encrypted", "hello from python")]
            # The page pinned pyuser's key on first use: its fingerprint and safety number are Python's.
            contact = page.evaluate("async () => (await window.relay.client.contacts())[0]")
            assert contact["fingerprint"] == fingerprint("pyuser", py.identity.public)
            assert wait_contact(page, "pyuser")["number"] == safety_number(
                "webby", web_ik, "pyuser", py.identity.public
            )
            assert own_fingerprint(page) == fingerprint("webby", web_ik)

            # Browser -> Python: the page seals to pyuser's record, Python opens and ACKs it.
            send_with_form(page, "pyuser", "hello from the browser")
            deliver, text = from_trio(py.receive, web_ik)
            assert (deliver.sender, text) == ("webby", "hello from the browser")
            wait_true(
                page,
                "async () => (await window.relay.store.outbox())[0].results !== null",
                "the receipt is saved",
            )
            assert wait_badges(page, ".msg.out", 1) == [("encrypted", "hello from the browser")]

    await run_in_browser(scenario)
    assert await broker.store.get_keys(["webby"], broker.clock()) != {}, "the page published its record"
    await py.client.aclose()


async def test_a_changed_key_is_refused_until_accepted_and_a_message_signed_by_the_old_key_is_not_verified(
    broker: Broker,
) -> None:
    base = base_url(broker)
    bob = await PythonDevice.connect(broker, "bob")
    old_identity = bob.identity
    alice_token = broker.auth.issue("alice")

    async def bob_gets_a_new_identity() -> None:
        bob.identity, bob.ek = Identity.generate(), EncryptionKey.generate()
        await bob.publish()

    def scenario() -> None:
        with open_browser() as browser:
            alice = open_page(browser.new_context(), base, alice_token)
            alice_ik = from_trio(bob.lookup, "alice").ik
            send_with_form(alice, "bob", "first, to the key I pin")
            _, text = from_trio(bob.receive, alice_ik)
            assert text == "first, to the key I pin"
            pinned = wait_contact(alice, "bob")["number"]

            from_trio(bob_gets_a_new_identity)
            # Keys are looked up once per connection: reconnect, and wait until the new one published alice's key.
            alice.evaluate(
                """() => new Promise((resolve) => {
                     window.relay.client.addEventListener('keys', resolve, { once: true })
                     window.relay.client.dropConnection()
                   })"""
            )
            send_with_form(alice, "bob", "to whoever has bob's mailbox now")
            assert "the key of bob has changed" in notice(alice)
            assert outbox_count(alice) == 1, "nothing stored, nothing sent"
            assert alice.input_value("#text") == "to whoever has bob's mailbox now", "the text is kept"
            flagged = wait_contact(alice, "bob", changed=True)
            assert flagged["number"] == pinned, "still pinned to the old key"
            assert flagged["pending"] == safety_number("alice", alice_ik, "bob", bob.identity.public)
            assert flagged["accept"]
            assert alice.is_visible("#keys-changed")

            # A message with bob's new key: not verified until it is accepted, its text never shown.
            from_trio(bob.send_sealed, "alice", "new-key-1", "from my new key")
            (refused,) = wait_inbox(alice, 1)
            assert (refused["security"], refused["reason"], refused["body"]) == ("failed", "key_changed", "")
            assert wait_badges(alice, ".msg.in", 1) == [
                (
                    "could not be verified: key_changed",
                    "This message could not be opened or verified "
                    "(signed by a key that is not the sender's pinned one); its text is not shown.",
                )
            ]

            alice.click("#contacts li[data-mailbox='bob'] button.accept")
            accepted = wait_contact(alice, "bob", changed=False)
            assert accepted["number"] == flagged["pending"]
            assert alice.is_hidden("#keys-changed")
            alice.click("#send")  # the kept text, again
            _, text = from_trio(bob.receive, alice_ik)
            assert text == "to whoever has bob's mailbox now"
            assert outbox_count(alice) == 2

            # Now a message signed with bob's old identity key is the one not verified.
            from_trio(bob.send_sealed, "alice", "old-key-1", "signed by a key you no longer trust", old_identity)
            messages = wait_inbox(alice, 2)
            assert [(m["id"], m["security"], m["reason"], m["body"]) for m in messages][1] == (
                "old-key-1",
                "failed",
                "key_changed",
                "",
            )
            from_trio(bob.send_sealed, "alice", "new-key-2", "and this one is fine")
            messages = wait_inbox(alice, 3)
            assert (messages[2]["security"], messages[2]["body"]) == ("e2e", "and this one is fine")

    await run_in_browser(scenario)
    await bob.client.aclose()


async def test_a_reload_keeps_the_keys_and_the_pins(broker: Broker) -> None:
    def scenario() -> None:
        with tabs(broker, "alice", "bob") as (alice, bob):
            send_with_form(alice, "bob", "before the reload")
            wait_inbox(bob, 1)
            before = {
                name: (own_fingerprint(page), page.evaluate("async () => await window.relay.client.contacts()"))
                for name, page in (("alice", alice), ("bob", bob))
            }
            records = from_trio(broker.store.get_keys, ["alice", "bob"], broker.clock())
            for page in (alice, bob):
                page.reload()
                wait_open(page)
            for name, page in (("alice", alice), ("bob", bob)):
                assert own_fingerprint(page) == before[name][0]
                assert page.evaluate("async () => await window.relay.client.contacts()") == before[name][1]
            assert from_trio(broker.store.get_keys, ["alice", "bob"], broker.clock()) == records, "same records"
            send_with_form(alice, "bob", "after the reload")
            messages = wait_inbox(bob, 2)
            assert [(m["body"], m["security"]) for m in messages] == [
                ("before the reload", "e2e"),
                ("after the reload", "e2e"),
            ]
            assert wait_badges(bob, ".msg.in", 2) == [
                ("encrypted", "before the reload"),
                ("encrypted", "after the reload"),
            ]

    await run_in_browser(scenario)


async def test_a_mailbox_without_a_key_needs_the_send_unencrypted_box(broker: Broker) -> None:
    base = base_url(broker)
    plain, _ = await RawClient.login(broker.tcp_port, broker.auth.issue("keyless"))
    token = broker.auth.issue("webby")

    async def keyless_receives() -> bytes:
        _, deliver = await plain.until(Deliver)
        await plain.send(Ack(ids=(deliver.id,)))
        return deliver.body

    async def keyless_sends() -> None:
        await plain.send(Send(id="clear-1", to=("webby",), body=b"no key here"))
        await plain.until(Receipt)

    def scenario() -> None:
        with open_browser() as browser:
            page = open_page(browser.new_context(), base, token)
            send_with_form(page, "keyless", "can you read this?")
            assert "keyless has published no key" in notice(page)
            assert outbox_count(page) == 0
            send_with_form(page, "keyless", "in the clear", plaintext=True)
            assert from_trio(keyless_receives) == b"in the clear"
            assert wait_badges(page, ".msg.out", 1) == [("unencrypted", "in the clear")]
            from_trio(keyless_sends)
            (received,) = wait_inbox(page, 1)
            assert (received["body"], received["security"]) == ("no key here", "plaintext")
            assert wait_badges(page, ".msg.in", 1) == [("unencrypted", "no key here")]
            assert inbox(page)[0].get("reason") is None

    await run_in_browser(scenario)
    await plain.aclose()


async def test_the_relay_cli_and_a_page_chat_encrypted_and_show_the_same_safety_number(
    broker: Broker, tmp_path: Path
) -> None:
    """The issue's "done when": the ``relay`` CLI (its local store, its keys) and a demo page, end to end encrypted
    both ways through a real broker, each showing the other's key with the same safety number."""
    base = base_url(broker)
    cli = ["--url", f"tcp://127.0.0.1:{broker.tcp_port}", "--token", broker.auth.issue("cli"), "--store"]
    cli.append(str(tmp_path / "cli.sqlite3"))
    web_token = broker.auth.issue("webby")

    def relay(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        status = relay_cli([*cli, *argv], stdin=io.BytesIO(b""), stdout=out, stderr=err)
        return status, out.getvalue(), err.getvalue()

    published = await trio.to_thread.run_sync(relay, "listen", "--drain")  # the CLI's device publishes its key
    assert published[0] == 0, published

    def scenario() -> None:
        with open_browser() as browser:
            page = open_page(browser.new_context(), base, web_token)
            status, out, err = relay("send", "--to", "webby", "--id", "c1", "hello from the cli")
            assert (status, err, json.loads(out)["id"]) == (0, "", "c1")
            (saved,) = wait_inbox(page, 1)
            assert (saved["from"], saved["body"], saved["security"]) == ("cli", "hello from the cli", "e2e")
            assert wait_badges(page, ".msg.in", 1) == [("encrypted", "hello from the cli")]

            send_with_form(page, "cli", "hello from the page")
            wait_true(page, "async () => (await window.relay.store.outbox())[0].results !== null", "a receipt")
            status, out, err = relay("listen", "--drain")
            assert status == 0, err
            lines = [json.loads(x) for x in out.splitlines()]  # the page's message, and c1's status (either first)
            [line] = [x for x in lines if "status" not in x]
            [status_line] = [x["status"] for x in lines if "status" in x]
            assert (line["from"], line["body"], line["security"]) == ("webby", "hello from the page", "e2e")
            assert (status_line["id"], status_line["state"]) == ("c1", "delivered")
            chips = "[...document.querySelectorAll('.msg.out .chip')]"
            delivered = f"{chips}.some(c => c.textContent === 'delivered to cli')"
            wait_true(page, delivered, "the page hears the CLI saved and ACKed it")

            status, out, _ = relay("keys", "--json")
            keys = json.loads(out)
            [contact] = keys["contacts"]
            assert (status, contact["mailbox"], contact["changed"]) == (0, "webby", False)
            assert contact["fingerprint"] == own_fingerprint(page)
            shown = wait_contact(page, "cli")
            assert shown["number"] == contact["safety_number"], "the page and the CLI show the same safety number"
            assert not shown["changed"]
            status, markdown, _ = relay("export")
            assert status == 0 and "> hello from the page" in markdown.splitlines()

    await run_in_browser(scenario)
