"""A received message is (sender, id) in the browser's IndexedDB store: an id reused by another
sender after the first message expired is a new message, and a version-1 store (keyed by id)
is upgraded in place, keeping every record. Real Chromium, real broker with an injected clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from broker.server import Broker
from wire import ErrorCode, Send, Status

from .helpers import (
    WAIT_MS,
    base_url,
    from_trio,
    inbox,
    open_browser,
    open_page,
    run_in_browser,
    wait_inbox,
    wait_true,
)

pytestmark = pytest.mark.browser


def wait_pending(broker: Broker, mailbox: str, count: int) -> None:
    """From the browser thread: wait until the broker holds ``count`` messages for ``mailbox``."""
    deadline = time.monotonic() + WAIT_MS / 1000
    while from_trio(broker.store.pending, mailbox, broker.clock()) != count:
        assert time.monotonic() < deadline, f"{mailbox} still has messages held"
        time.sleep(0.05)


async def test_an_id_reused_by_another_sender_after_expiry_is_shown_and_kept(
    broker_factory: Callable[..., Any],
) -> None:
    now = [int(time.time() * 1000)]
    async with broker_factory(clock=lambda: now[0]) as broker:
        base = base_url(broker)
        bob_token = broker.auth.issue("bob")

        async def send(sender: str, body: bytes, ttl_s: int | None = None) -> Any:
            (receipt,) = await broker.route(sender, [Send(id="z-1", to=("bob",), body=body, ttl_s=ttl_s)])
            return receipt.results["bob"]

        def scenario() -> None:
            with open_browser() as browser:
                context = browser.new_context()
                bob = open_page(context, base, bob_token)
                assert from_trio(send, "alice", b"from alice", 1).status is Status.DELIVERED
                wait_inbox(bob, 1)
                wait_pending(broker, "bob", 0)  # ACKed: the broker keeps a tombstone until it expires
                refused = from_trio(send, "carol", b"too early")
                assert (refused.status, refused.code) == (Status.REFUSED, ErrorCode.ID_CONFLICT)

                now[0] += 1000  # alice's message (ttl 1 s) and its tombstone expire
                assert from_trio(send, "carol", b"from carol").status is Status.DELIVERED
                messages = wait_inbox(bob, 2)
                assert [(m["from"], m["id"], m["body"]) for m in messages] == [
                    ("alice", "z-1", "from alice"),
                    ("carol", "z-1", "from carol"),
                ]
                wait_pending(broker, "bob", 0)
                bob.wait_for_function("document.querySelectorAll('.msg.in .chip.acked').length === 2", timeout=WAIT_MS)
                assert bob.eval_on_selector_all(".msg.in", "els => els.map(e => e.dataset.from)") == ["alice", "carol"]
                # Kept: still both after a reload, from IndexedDB.
                bob.reload()
                bob.wait_for_function("document.querySelectorAll('.msg.in .chip.acked').length === 2", timeout=WAIT_MS)
                assert [(m["from"], m["body"]) for m in inbox(bob)] == [
                    ("alice", "from alice"),
                    ("carol", "from carol"),
                ]

        await run_in_browser(scenario)


# The database as version 1 of client/js/store.js made it (inbox and outbox keyed by id),
# with three received messages and two sent ones, one of them never confirmed.
CREATE_V1_STORE = """
async (mailbox) => {
  const request = (r) => new Promise((resolve, reject) => {
    r.onsuccess = () => resolve(r.result)
    r.onerror = () => reject(r.error)
  })
  const open = indexedDB.open(`relay:${mailbox}`, 1)
  open.onupgradeneeded = () => {
    open.result.createObjectStore('inbox', { keyPath: 'id' }).createIndex('received_at', 'received_at')
    open.result.createObjectStore('outbox', { keyPath: 'id' }).createIndex('created_at', 'created_at')
  }
  const db = await request(open)
  const text = (s) => new TextEncoder().encode(s)
  const received = (id, from, words, attempt, at, state) =>
    ({ id, from, body: text(words), sent_at: at - 5, expires_at: at + 5, attempt, received_at: at, state })
  const tx = db.transaction(['inbox', 'outbox'], 'readwrite')
  const inbox = tx.objectStore('inbox')
  inbox.put(received('z-1', 'alice', 'old from alice', 1, 10, 'acked'))
  inbox.put(received('m-2', 'carol', 'old from carol', 2, 20, 'acked'))
  inbox.put(received('m-3', 'alice', 'saved, not acked', 1, 30, 'saved'))
  const outbox = tx.objectStore('outbox')
  const queued = { alice: { status: 'queued' } }
  outbox.put({ id: 'o-1', to: ['alice'], body: text('answered'), created_at: 15, results: queued })
  outbox.put({ id: 'o-2', to: ['alice'], body: text('never confirmed'), created_at: 25, results: null })
  await new Promise((resolve, reject) => { tx.oncomplete = resolve; tx.onerror = () => reject(tx.error) })
  db.close()
}
"""


async def test_a_version_1_store_is_upgraded_in_place_and_keyed_by_sender_and_id(broker: Broker) -> None:
    base = base_url(broker)
    hank_token = broker.auth.issue("hank")
    # Carol reuses an id that hank's old store holds from alice (this broker never saw alice's).
    await broker.route("carol", [Send(id="z-1", to=("hank",), body=b"new from carol")])

    def scenario() -> None:
        with open_browser() as browser:
            context = browser.new_context()
            setup = context.new_page()
            setup.goto(f"{base}/")  # the sign-in card: no mailbox opened
            setup.evaluate(CREATE_V1_STORE, "hank")
            setup.close()
            hank = open_page(context, base, hank_token)
            versions = hank.evaluate("async () => (await indexedDB.databases()).map(d => [d.name, d.version])")
            assert versions == [["relay:hank", 4]]  # through 2 (the inbox re-keyed) and 3 (statuses) to 4 (keys)
            stores = hank.evaluate("() => [...window.relay.store.db.objectStoreNames].sort()")
            assert stores == ["contacts", "device", "enc_keys", "inbox", "outbox", "overflows", "statuses"]
            wait_true(
                hank,
                "async () => (await window.relay.store.inbox()).filter(m => m.state === 'acked').length === 3",
                "three messages are acked",
            )
            assert [(m["from"], m["id"], m["body"], m["attempt"], m["state"]) for m in inbox(hank)] == [
                ("alice", "z-1", "old from alice", 1, "acked"),
                ("carol", "m-2", "old from carol", 2, "acked"),
                ("alice", "m-3", "saved, not acked", 1, "saved"),
                ("carol", "z-1", "new from carol", 1, "acked"),
            ]
            assert {m["security"] for m in inbox(hank)} == {"plaintext"}, "old rows, and carol's: in the clear"
            outbox = hank.evaluate("async () => (await window.relay.store.outbox()).map(e => [e.id, e.results])")
            assert outbox[0] == ["o-1", {"alice": {"status": "queued"}}]
            # The unconfirmed send went out again on connect, with its id.
            wait_true(
                hank,
                "async () => (await window.relay.store.outbox())[1].results !== null",
                "the unconfirmed send has its receipt",
            )
            assert from_trio(broker.store.pending, "alice", broker.clock()) == 1
            hank.wait_for_function("document.querySelectorAll('.msg.in').length === 4", timeout=WAIT_MS)

    await run_in_browser(scenario)
    assert await broker.store.pending("hank", broker.clock()) == 0
