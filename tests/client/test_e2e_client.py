"""End-to-end encryption in the Python client, through a real broker (docs/e2e.md): sealed sends opened, saved and
ACKed; the broker holds only envelopes; pinning on first use, key changes refused and accepted; forged, replayed,
tampered and wrongly signed envelopes fail and are never shown as text; rotation with messages queued under the
old key; plaintext marked; no-key refusal."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio
from relay_testing import FaultyNetwork, url_of

from broker.server import Broker
from client import (
    Delivery,
    KeyChangedError,
    LocalStore,
    NoRecipientKeyError,
    OutgoingMessage,
    RelayClient,
    Status,
    open_client,
)
from client import _client as client_module
from client import _e2e as e2e_module
from client._e2e import CRYPTO_SLICE, EnvelopeOpener, Keyring
from client._inbox import ClientState, Inbox
from wire import Deliver, KeyPut, KeyRecord, Send
from wire.e2e import E2E_MAGIC, Identity, fingerprint, safety_number, seal, verify_key_record

TIMEOUT_S = 20


def ws_url(broker: Broker) -> str:
    assert broker.ws_port is not None
    return f"ws://127.0.0.1:{broker.ws_port}/relay"


URLS = {"tcp": url_of, "ws": ws_url}


async def collect(client: RelayClient, n: int) -> list[Delivery]:
    got: list[Delivery] = []
    async for d in client.deliveries():
        got.append(d)
        if len(got) == n:
            break
    return got


def sent_bodies(network: FaultyNetwork) -> dict[str, bytes]:
    """The body of each SEND a client wrote, by id: what the broker got."""
    return {f.id: f.body for f in network.sent if type(f) is Send}


@asynccontextmanager
async def client(broker: Broker, mailbox: str, *, store: Path | None = None, **options: Any) -> AsyncIterator[Any]:
    url = options.pop("url", url_of(broker))
    if store is None:
        async with open_client(url, broker.auth.issue(mailbox), **options) as c:
            yield c
        return
    with LocalStore(store) as local:
        async with open_client(url, broker.auth.issue(mailbox), local_store=local, **options) as c:
            yield c


@pytest.mark.parametrize("transport", ["tcp", "ws"])
async def test_an_encrypted_message_is_opened_saved_and_acked_and_the_broker_holds_only_the_envelope(
    broker: Broker, tmp_path: Path, transport: str
) -> None:
    url = URLS[transport](broker)
    with trio.fail_after(TIMEOUT_S):
        async with client(broker, "bob", store=tmp_path / "bob.sqlite3", url=url):
            pass  # bob's device publishes its key, then goes offline
        sender, receiver = FaultyNetwork(), FaultyNetwork()
        async with client(broker, "alice", store=tmp_path / "alice.sqlite3", url=url, transport_factory=sender) as a:
            receipt = await a.send("bob", b"meet at noon", id="m1")
            assert receipt.results["bob"].status is Status.QUEUED
        held = sent_bodies(sender)["m1"]
        assert held.startswith(E2E_MAGIC) and b"meet at noon" not in held
        async with client(broker, "bob", store=tmp_path / "bob.sqlite3", url=url, transport_factory=receiver) as bob:
            [d] = [d async for d in bob.deliveries(until_drained=True)]
            assert (d.id, d.sender, d.body, d.security, d.security_error) == (
                "m1",
                "alice",
                b"meet at noon",
                "e2e",
                None,
            )
        assert [f.body for f in receiver.received_of(Deliver)] == [held]
        assert (await broker.statistics())["messages_total"] == 0  # saved, then ACKed
    with LocalStore(tmp_path / "bob.sqlite3") as s:
        [m] = s.messages("bob")
        assert (m.body, m.security) == (b"meet at noon", "e2e")
        assert "> meet at noon" in s.export_markdown()
    with LocalStore(tmp_path / "alice.sqlite3") as s:
        [m] = s.messages("alice")
        assert (m.direction, m.body, m.security) == ("out", b"meet at noon", "e2e")
    for name in ("alice.sqlite3", "bob.sqlite3"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600


@pytest.mark.stores("redis")
async def test_an_encrypted_conversation_over_redis(broker: Broker, tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with client(broker, "bob") as bob, client(broker, "alice") as alice:
            await alice.send_batch([OutgoingMessage("bob", b"one", id="a1"), OutgoingMessage("bob", b"two", id="a2")])
            got = await collect(bob, 2)
            assert [(d.id, d.body, d.security) for d in got] == [("a1", b"one", "e2e"), ("a2", b"two", "e2e")]
            bob.ack([d.id for d in got])
            await bob.send("alice", b"three", id="b1")
            [back] = await collect(alice, 1)
            assert (back.body, back.security) == (b"three", "e2e")
            alice.ack(back.id)


async def test_every_connect_publishes_the_key_first_and_contacts_are_pinned_on_first_use(
    broker: Broker, tmp_path: Path
) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with client(broker, "bob", store=tmp_path / "bob.sqlite3") as bob:
            async with client(broker, "alice", store=tmp_path / "alice.sqlite3") as alice:
                assert alice.contacts() == []
                await alice.send("bob", b"hi", id="m1")
                [d] = await collect(bob, 1)
                assert d.security == "e2e"
                records = await alice.get_keys(["alice", "bob", "nobody"])
                assert set(records) == {"alice", "bob"}
                assert all(verify_key_record(m, r) for m, r in records.items())
                [pin] = alice.contacts()
                assert pin.mailbox == "bob" and not pin.changed
                assert pin.fingerprint == fingerprint("bob", records["bob"].ik) == bob.fingerprint()
                # bob pinned alice when her message arrived: both see the same safety number
                [bobs] = bob.contacts()
                assert bobs.mailbox == "alice" and bobs.fingerprint == alice.fingerprint()
                expected = safety_number("alice", records["alice"].ik, "bob", records["bob"].ik)
                assert pin.safety_number == bobs.safety_number == expected
                alice_fp = alice.fingerprint()
        # the pins and the keys are in the local store: a restart keeps both
        async with client(broker, "alice", store=tmp_path / "alice.sqlite3") as alice:
            assert alice.fingerprint() == alice_fp
            assert [c.mailbox for c in alice.contacts()] == ["bob"]


async def test_the_key_put_is_the_first_frame_after_welcome_on_every_connect(broker: Broker, network: Any) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with client(broker, "carol") as carol:
            async with client(broker, "alice", transport_factory=network, backoff_initial_s=0.01) as alice:
                await alice.send("carol", b"x", id="m1")
                await network.cut()
                await alice.send("carol", b"y", id="m2")  # after the reconnect
            await collect(carol, 2)
    sent = network.sent
    firsts = [sent[i + 1] for i, f in enumerate(sent) if type(f).__name__ == "Hello"]
    assert len(firsts) == 2 and all(type(f) is KeyPut for f in firsts)
    assert firsts[0].key == firsts[1].key


async def test_a_changed_key_is_refused_until_accepted(broker: Broker, tmp_path: Path) -> None:
    alice_store = tmp_path / "alice.sqlite3"
    with trio.fail_after(TIMEOUT_S):
        async with client(broker, "alice", store=alice_store) as alice:
            async with client(broker, "bob") as bob:  # keys in memory: a new device at every start
                await alice.send("bob", b"first", id="m1")
                [d] = await collect(bob, 1)
                old_fp = bob.fingerprint()
                bob.ack(d.id)
            async with client(broker, "bob", store=tmp_path / "bob2.sqlite3") as bob:  # bob's second device
                new_fp = bob.fingerprint()
                assert new_fp != old_fp
                # alice's connection remembers the record it looked up: sealed to bob's previous device
                await alice.send("bob", b"to the old key", id="m2")
                [d] = await collect(bob, 1)
                assert (d.id, d.security, d.security_error, d.body) == ("m2", "failed", "unknown_key", b"")
        async with client(broker, "alice", store=alice_store) as alice, client(broker, "carol") as carol:
            # a new connection looks bob up again and sees the change
            with pytest.raises(KeyChangedError) as refused:
                await alice.send(["bob", "bob"], b"secret", id="m3")
            err = refused.value
            assert (err.mailbox, err.pinned_fingerprint, err.new_fingerprint) == ("bob", old_fp, new_fp)
            assert old_fp in str(err) and new_fp in str(err)
            [contact] = alice.contacts()
            assert (contact.changed, contact.fingerprint, contact.new_fingerprint) == (True, old_fp, new_fp)
            # a refused send sends nothing to anyone, not even to a recipient whose key is fine
            with pytest.raises(KeyChangedError):
                await alice.send(["carol", "bob"], b"secret", id="m4")
            stats = await broker.statistics()
            assert stats["messages_total"] == 0
            accepted = await alice.accept_key("bob")
            assert (accepted.fingerprint, accepted.changed, accepted.new_fingerprint) == (new_fp, False, None)
            # with no change recorded, accepting pins what the directory has (here: the first use of carol's)
            accepted = await alice.accept_key("carol")
            assert [c.mailbox for c in alice.contacts()] == ["bob", "carol"] and not accepted.changed
            await alice.send(["carol", "bob"], b"after accepting", id="m5")
            async with client(broker, "bob", store=tmp_path / "bob2.sqlite3") as bob:  # the second device again
                [d] = [d async for d in bob.deliveries(until_drained=True)]
                assert (d.id, d.body, d.security) == ("m5", b"after accepting", "e2e")
            await alice.send("carol", b"carol's key is fine", id="m6")
            got = await collect(carol, 2)
            assert [(c.id, c.security) for c in got] == [("m5", "e2e"), ("m6", "e2e")]
    with LocalStore(alice_store) as s:
        assert [c.pending_ik for c in s.contacts("alice", ["bob"])] == [None]
        assert [m.id for m in s.messages("alice")] == ["m1", "m2", "m5", "m6"]


async def test_a_message_from_a_changed_key_fails_and_records_the_change(broker: Broker, tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with client(broker, "bob", store=tmp_path / "bob.sqlite3") as bob:
            async with client(broker, "alice") as alice:
                await alice.send("bob", b"hello", id="m1")
                old_fp = alice.fingerprint()
                [d] = await collect(bob, 1)  # bob pins alice's key on first use
                assert (d.id, d.security, d.security_error, d.body) == ("m1", "e2e", None, b"hello")
            async with client(broker, "alice") as alice:  # alice's new device
                await alice.send("bob", b"it is me, new phone", id="m2")
                new_fp = alice.fingerprint()
            [d] = await collect(bob, 1)
            assert (d.id, d.security, d.security_error, d.body) == ("m2", "failed", "key_changed", b"")
            [contact] = bob.contacts()
            assert (contact.fingerprint, contact.new_fingerprint) == (old_fp, new_fp)
            await bob.accept_key("alice")
            async with client(broker, "alice") as alice:  # a third device: refused again
                await alice.send("bob", b"third", id="m3")
            [d] = await collect(bob, 1)
            assert (d.security, d.security_error) == ("failed", "key_changed")
    with LocalStore(tmp_path / "bob.sqlite3") as s:
        assert [(m.id, m.security, m.security_error, m.body) for m in s.messages("bob")] == [
            ("m1", "e2e", None, b"hello"),
            ("m2", "failed", "key_changed", b""),
            ("m3", "failed", "key_changed", b""),
        ]
        assert "it is me" not in s.export_markdown()


def _decode(body: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    envelope = cbor2.loads(body[4:])
    return envelope, cbor2.loads(envelope["s"])


def _encode(envelope: dict[str, Any], s: dict[str, Any] | None = None) -> bytes:
    if s is not None:
        envelope = {**envelope, "s": cbor2.dumps(s)}
    return E2E_MAGIC + cbor2.dumps(envelope)


async def test_forged_replayed_and_wrongly_signed_envelopes_fail_and_are_never_shown_as_text(
    broker: Broker, tmp_path: Path
) -> None:
    """Alice writes to bob and carol. Bob, an insider who can open the message, tries to make carol (and dave) see
    something from alice that alice did not send; the raw sends play a broker that would deliver them as alice."""
    with trio.fail_after(TIMEOUT_S):
        network = FaultyNetwork()
        async with (
            client(broker, "carol") as carol,
            client(broker, "dave") as dave,
            client(broker, "bob", transport_factory=network) as bob,
        ):
            async with client(broker, "alice", store=tmp_path / "alice.sqlite3") as alice:
                await alice.send(["bob", "carol"], b"lunch at 1", id="m1")
                await alice.send("dave", b"hi dave", id="d1")
            [original] = await collect(bob, 1)
            assert original.body == b"lunch at 1"
            [c1] = await collect(carol, 1)
            [d1] = await collect(dave, 1)
            assert (c1.security, d1.security) == ("e2e", "e2e")
            [sealed] = [f.body for f in network.received_of(Deliver)]  # what bob got: he can open it
            with LocalStore(tmp_path / "alice.sqlite3") as s:
                keys = s.device_keys("alice")
            assert keys is not None
            alice_id = Identity.from_seed(keys.seed)
            envelope, signed = _decode(sealed)
            records = await bob.get_keys(["carol", "dave"])
            bob_id = Identity.generate()  # bob's signing key stands in: he has no other than his own
            forged_ct = {**signed, "ct": signed["ct"][:-1] + bytes([signed["ct"][-1] ^ 1])}
            fake_envelope, fake_signed = _decode(
                seal(
                    sender="alice",
                    msg_id="f4",
                    recipients=[("carol", records["carol"])],
                    identity=bob_id,
                    body=b"forged by bob",
                )
            )
            attempts = {
                # bob forwards alice's envelope to carol as his own message: the envelope says alice sent it
                ("bob", "f1", "carol"): sealed,
                # delivered as alice, with a new id: the id is bound in
                ("alice", "f2", "carol"): sealed,
                # delivered as alice, same id, to dave, who was not a recipient: replay into another conversation
                ("alice", "m1", "dave"): sealed,
                # bob changes the content under alice's signature
                ("alice", "f3", "carol"): _encode(envelope, {**forged_ct, "id": "f3"}),
                # bob seals new content "from alice", naming alice's ik, but can only sign it himself
                ("alice", "f4", "carol"): _encode(fake_envelope, {**fake_signed, "ik": alice_id.public}),
                # bob seals it all with his own key: not the key pinned for alice
                ("alice", "f5", "carol"): seal(
                    sender="alice",
                    msg_id="f5",
                    recipients=[("carol", records["carol"])],
                    identity=bob_id,
                    body=b"forged by bob",
                ),
            }
            async with client(broker, "bob", e2e=False) as raw_bob:  # raw: bodies go out as given
                await raw_bob.send("carol", sealed, id="f1")
            async with client(broker, "alice", e2e=False) as raw_alice:
                for (sender, mid, to), body in attempts.items():
                    if sender == "alice":
                        await raw_alice.send(to, body, id=mid)
            got = {(d.sender, d.id): d for d in await collect(carol, 5)}
            [replayed] = await collect(dave, 1)
            got[(replayed.sender, replayed.id)] = replayed
            assert {key: (d.security, d.security_error, d.body) for key, d in got.items()} == {
                ("bob", "f1"): ("failed", "mismatch", b""),
                ("alice", "f2"): ("failed", "mismatch", b""),
                ("alice", "m1"): ("failed", "not_for_me", b""),
                ("alice", "f3"): ("failed", "bad_signature", b""),
                ("alice", "f4"): ("failed", "bad_signature", b""),
                ("alice", "f5"): ("failed", "key_changed", b""),
            }


async def test_a_tampered_byte_anywhere_in_an_envelope_is_refused(broker: Broker, tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S * 3):
        async with client(broker, "bob", store=tmp_path / "bob.sqlite3") as bob:
            async with client(broker, "alice", store=tmp_path / "alice.sqlite3") as alice:
                await alice.send("bob", b"genuine", id="g0")
                records = await alice.get_keys(["bob"])
            [genuine] = await collect(bob, 1)
            assert genuine.security == "e2e"
            with LocalStore(tmp_path / "alice.sqlite3") as s:
                keys = s.device_keys("alice")
            assert keys is not None
            identity = Identity.from_seed(keys.seed)
            size = len(
                seal(
                    sender="alice",
                    msg_id="t0000",
                    recipients=[("bob", records["bob"])],
                    identity=identity,
                    body=b"tampered?",
                    pad_block=16,
                )
            )
            batch = []
            for pos in range(size):
                mid = f"t{pos:04d}"
                body = bytearray(
                    seal(
                        sender="alice",
                        msg_id=mid,
                        recipients=[("bob", records["bob"])],
                        identity=identity,
                        body=b"tampered?",
                        pad_block=16,
                    )
                )
                body[pos] ^= 0x01
                batch.append(OutgoingMessage("bob", bytes(body), id=mid))
            async with client(broker, "alice", e2e=False) as raw_alice:
                await raw_alice.send_batch(batch)
            got = await collect(bob, size)
        by_pos = {int(d.id[1:]): d for d in got}
        assert sorted(by_pos) == list(range(size))
        for pos, d in by_pos.items():
            if pos < len(E2E_MAGIC):  # no longer an envelope: shown as an unencrypted message, never as verified
                assert d.security == "plaintext", pos
            else:
                assert (d.security, d.body) == ("failed", b""), pos
                assert d.security_error in ("malformed", "mismatch", "bad_signature", "not_for_me", "key_changed"), pos


async def test_rotation_keeps_messages_queued_under_the_old_key_readable(broker: Broker, tmp_path: Path) -> None:
    bob_store = tmp_path / "bob.sqlite3"
    network = FaultyNetwork()
    with trio.fail_after(TIMEOUT_S):
        async with client(broker, "alice", transport_factory=network) as alice:
            async with client(broker, "bob", store=bob_store) as bob:
                old = (await alice.get_keys("bob"))["bob"]
                await alice.send("bob", b"before", id="m1")  # alice looks bob's record up: the first kid
                await collect(bob, 1)
                new_kid = await bob.rotate_key()
                assert new_kid != old.kid
                fp = bob.fingerprint()
                [published] = (await alice.get_keys("bob")).values()
                assert (published.kid, published.ik) == (new_kid, old.ik)  # same identity: not a key change
            # bob is offline; alice's connection still has the old record: queued under the retired key
            await alice.send("bob", b"sealed to the retired key", id="m2")
            async with client(broker, "carol") as carol:  # carol looks the new record up
                await carol.send("bob", b"sealed to the new key", id="m3")
            async with client(broker, "bob", store=bob_store) as bob:
                got = [d async for d in bob.deliveries(until_drained=True)]
                assert [(d.id, d.sender, d.security, d.body) for d in got] == [
                    ("m2", "alice", "e2e", b"sealed to the retired key"),
                    ("m3", "carol", "e2e", b"sealed to the new key"),
                ]
                assert bob.fingerprint() == fp
            # a retired key older than max_ttl_s is deleted at the next connect: what is still sealed to it fails
            await alice.send("bob", b"too late", id="m4")
            with LocalStore(bob_store) as s:
                s._db.execute("UPDATE encryption_keys SET retired_at = 1 WHERE retired_at IS NOT NULL")
            async with client(broker, "bob", store=bob_store) as bob:
                [d] = [d async for d in bob.deliveries(until_drained=True)]
                assert (d.id, d.security, d.security_error) == ("m4", "failed", "unknown_key")
    kids = {
        mid: cbor2.loads(cbor2.loads(body[4:])["s"])["keys"][0]["kid"] for mid, body in sent_bodies(network).items()
    }
    assert kids == {"m1": old.kid, "m2": old.kid, "m4": old.kid}
    with LocalStore(bob_store) as s:
        stored = s.device_keys("bob")
        assert stored is not None and stored.retired == () and stored.current.kid == new_kid


async def test_a_recipient_without_a_key_is_refused_unless_plaintext_is_chosen(broker: Broker, tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with client(broker, "bob") as bob, client(broker, "alice", store=tmp_path / "alice.sqlite3") as alice:
            with pytest.raises(NoRecipientKeyError) as refused:
                await alice.send(["bob", "nobody", "x!"], b"secret", id="m1")
            assert refused.value.mailboxes == ("nobody", "x!")
            assert (await broker.statistics())["messages_total"] == 0  # nothing was sent, not even to bob
            receipt = await alice.send(["bob", "nobody"], b"in the clear", id="m2", plaintext=True)
            assert receipt.results["nobody"].status is Status.QUEUED
            [d] = await collect(bob, 1)
            assert (d.body, d.security) == (b"in the clear", "plaintext")
            # a batch mixing both: the sealed one and the clear one
            await alice.send_batch(
                [OutgoingMessage("bob", b"sealed", id="m3"), OutgoingMessage("bob", b"clear", id="m4", plaintext=True)]
            )
            got = await collect(bob, 2)
            assert [(d.id, d.security) for d in got] == [("m3", "e2e"), ("m4", "plaintext")]
        async with client(broker, "alice", e2e=False) as plain:  # the client-wide choice: no lookup, no key
            await plain.send("nobody", b"client-wide clear", id="m5")
    with LocalStore(tmp_path / "alice.sqlite3") as s:
        assert [(m.id, m.security) for m in s.messages("alice")] == [
            ("m2", "plaintext"),
            ("m3", "e2e"),
            ("m4", "plaintext"),
        ]
        text = s.export_markdown()
    assert "· unencrypted" in text and "> in the clear" in text and "> sealed" in text


async def test_a_client_without_e2e_publishes_nothing_and_marks_envelopes_failed(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with client(broker, "bob") as bob:
            async with client(broker, "alice") as alice:
                await alice.send("bob", b"sealed", id="m1")
        async with client(broker, "carol", e2e=False) as carol:
            with pytest.raises(RuntimeError, match="e2e=False"):
                carol.fingerprint()
            records = await carol.get_keys(["alice", "bob", "carol"])
            assert set(records) == {"alice", "bob"} and all(type(r) is KeyRecord for r in records.values())
            async with client(broker, "bob", e2e=False) as bob:  # takes bob's mailbox over, without keys
                [d] = await collect(bob, 1)
                assert (d.id, d.security, d.security_error, d.body) == ("m1", "failed", "unknown_key", b"")


async def test_a_large_sealed_batch_lets_the_clients_other_tasks_run(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sealing takes about half a millisecond a message: send_batch checkpoints every CRYPTO_SLICE seals, so a
    receiving task on the same event loop is not starved for the whole batch."""
    sealed = 0
    real_seal = client_module.seal

    def counting_seal(**kwargs: Any) -> bytes:
        nonlocal sealed
        sealed += 1
        return real_seal(**kwargs)

    monkeypatch.setattr(client_module, "seal", counting_seal)
    seen: list[int] = []  # how many were sealed each time another task ran
    n = 4 * CRYPTO_SLICE
    with trio.fail_after(TIMEOUT_S):
        async with client(broker, "bob"), client(broker, "alice") as alice:
            await alice.send("bob", b"first", id="w0")  # bob's record looked up and pinned
            sealed = 0
            async with trio.open_nursery() as nursery:

                async def other_task() -> None:
                    while True:
                        seen.append(sealed)
                        await trio.sleep(0)

                nursery.start_soon(other_task)
                await alice.send_batch([OutgoingMessage("bob", b"m", id=f"w{i}") for i in range(1, n + 1)])
                nursery.cancel_scope.cancel()
    assert sealed == n
    assert any(0 < c < n for c in seen), seen  # without the checkpoints it only ever sees 0 and n


async def test_the_opener_lets_other_tasks_run_while_it_opens_a_large_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """The receiving side of the same rule: the opener checkpoints every CRYPTO_SLICE envelopes of one chunk (no
    sockets: the opener between a reader and an inbox without a local store)."""
    opened = 0
    real_open = e2e_module.open_envelope

    def counting_open(*args: Any, **kwargs: Any) -> bytes:
        nonlocal opened
        opened += 1
        return real_open(*args, **kwargs)

    monkeypatch.setattr(e2e_module, "open_envelope", counting_open)
    keyring = Keyring(None)
    await keyring.load("bob", max_ttl_s=3600)
    alice = Identity.generate()
    await keyring.pin({"alice": alice.public})
    state = ClientState()
    failures: list[object] = []
    inbox = Inbox(None, state, lambda ids: None, failures.append)

    async def no_lookup(mailboxes: Any) -> dict[str, KeyRecord]:
        raise AssertionError("alice is pinned: nothing to look up")

    opener = EnvelopeOpener(inbox, keyring, no_lookup, state, failures.append)
    n = 4 * CRYPTO_SLICE
    chunk = [
        Delivery(
            f"m{i}",
            "alice",
            0,
            2**40,
            1,
            seal(sender="alice", msg_id=f"m{i}", recipients=[("bob", keyring.record)], identity=alice, body=b"hi"),
        )
        for i in range(n)
    ]
    seen: list[int] = []
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(opener.run)
            opener.accept(chunk)
            while len(inbox.items) < n:
                seen.append(opened)
                await trio.sleep(0)
            opener.stop()
    assert failures == [] and [d.security for d in inbox.items] == ["e2e"] * n
    assert any(0 < c < n for c in seen), seen  # without the checkpoints it only ever sees 0 and n
