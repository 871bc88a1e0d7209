"""``relay keys``, ``relay keys accept``, ``relay keys rotate`` and the CLI's end-to-end encryption: sealed sends,
exit 5 for a changed key and 6 for no key, ``listen`` showing each message's security, ``export`` readable."""

from __future__ import annotations

import io
import json
from pathlib import Path

import trio
from relay_testing import url_of

from broker.server import Broker
from client import LocalStore, open_client
from client.cli import main
from wire.e2e import fingerprint

TIMEOUT_S = 20


class Run:
    def __init__(self, status: int, out: str, err: str) -> None:
        self.status, self.out, self.err = status, out, err

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()


async def relay(*argv: str) -> Run:
    out, err = io.StringIO(), io.StringIO()
    with trio.fail_after(TIMEOUT_S):
        status = await trio.to_thread.run_sync(lambda: main(list(argv), stdin=io.BytesIO(b""), stdout=out, stderr=err))
    return Run(status, out.getvalue(), err.getvalue())


def opts(broker: Broker, name: str, store: Path) -> list[str]:
    return ["--url", url_of(broker), "--token", broker.auth.issue(name), "--store", str(store)]


async def keys_json(broker: Broker, name: str, store: Path) -> dict[str, object]:
    run = await relay(*opts(broker, name, store), "keys", "--json")
    assert run.status == 0, run.err
    doc: dict[str, object] = json.loads(run.out)
    return doc


async def test_a_cli_conversation_is_encrypted_pinned_and_shown_with_fingerprints(
    broker: Broker, tmp_path: Path
) -> None:
    alice, bob = opts(broker, "alice", tmp_path / "alice.sqlite3"), opts(broker, "bob", tmp_path / "bob.sqlite3")
    assert (await relay(*bob, "listen", "--drain")).status == 0  # bob's device publishes its key
    run = await relay(*alice, "send", "--to", "bob", "--id", "m1", "hello bob")
    assert (run.status, run.err) == (0, "")
    listen = await relay(*bob, "listen", "--drain")
    [line] = [json.loads(x) for x in listen.lines]
    assert (line["id"], line["from"], line["body"], line["security"]) == ("m1", "alice", "hello bob", "e2e")
    a, b = (
        await keys_json(broker, "alice", tmp_path / "alice.sqlite3"),
        await keys_json(broker, "bob", tmp_path / "bob.sqlite3"),
    )
    [a_bob] = a["contacts"]  # type: ignore[misc]
    [b_alice] = b["contacts"]  # type: ignore[misc]
    assert (a_bob["mailbox"], a_bob["fingerprint"], a_bob["changed"]) == ("bob", b["fingerprint"], False)
    assert b_alice["fingerprint"] == a["fingerprint"]
    assert a_bob["safety_number"] == b_alice["safety_number"]
    assert len(str(a_bob["safety_number"]).split()) == 12
    text = await relay(*alice, "keys")
    assert text.status == 0
    assert text.lines[0] == f"alice (this device)  {a['fingerprint']}"
    assert text.lines[1].startswith(f"bob                  {a_bob['fingerprint']}  pinned ")
    assert text.lines[2].strip() == f"safety number {a_bob['safety_number']}"
    md = await relay(*bob, "export")
    assert "> hello bob" in md.lines and not any("unencrypted" in x for x in md.lines)
    for name in ("alice.sqlite3", "bob.sqlite3"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600


async def test_send_exits_6_without_a_key_and_plaintext_is_marked(broker: Broker, tmp_path: Path) -> None:
    alice, bob = opts(broker, "alice", tmp_path / "alice.sqlite3"), opts(broker, "bob", tmp_path / "bob.sqlite3")
    run = await relay(*alice, "send", "--to", "bob", "--id", "m1", "secret")
    assert (run.status, run.out) == (6, "")
    assert run.err == (
        "relay: no published key for bob (no encrypting client has connected as them, or their key expired):"
        " nothing was sent; --plaintext sends it unencrypted\n"
    )
    assert (await broker.statistics())["messages_total"] == 0
    assert (await relay(*alice, "send", "--plaintext", "--to", "bob", "--id", "m2", "in the clear")).status == 0
    [line] = [json.loads(x) for x in (await relay(*bob, "listen", "--drain")).lines]
    assert (line["id"], line["body"], line["security"]) == ("m2", "in the clear", "plaintext")
    md = (await relay(*bob, "export")).lines
    assert any(x.startswith("**alice** → bob · ") and x.endswith(" · unencrypted") for x in md)


async def test_a_changed_key_exits_5_until_relay_keys_accept(broker: Broker, tmp_path: Path) -> None:
    alice = opts(broker, "alice", tmp_path / "alice.sqlite3")
    async with open_client(url_of(broker), broker.auth.issue("bob")) as bob:  # keys in memory: a device for now
        old_fp = bob.fingerprint()
        assert (await relay(*alice, "send", "--to", "bob", "--id", "m1", "one")).status == 0
    async with open_client(url_of(broker), broker.auth.issue("bob"), local_store=LocalStore(tmp_path / "b2")) as bob:
        new_fp = bob.fingerprint()
    run = await relay(*alice, "send", "--to", "bob", "--id", "m2", "two")
    assert (run.status, run.out) == (5, "")
    assert run.err == (
        f"relay: bob's identity key changed: pinned {old_fp}, now {new_fp}. Nothing was sent. Compare the new"
        " fingerprint with them (not over this relay), then run `relay keys accept bob` and send again\n"
    )
    text = (await relay(*alice, "keys")).out
    assert f"KEY CHANGED: the relay now has {new_fp} for bob" in text and "relay keys accept bob" in text
    accepted = await relay(*alice, "keys", "accept", "bob")
    assert accepted.status == 0 and accepted.err == f"relay: bob: the new key is pinned ({new_fp})\n"
    again = await relay(*alice, "keys", "accept", "bob")
    assert again.status == 2 and f"no changed key is waiting for bob; its pinned key is {new_fp}" in again.err
    assert (await relay(*alice, "keys", "accept", "carol")).status == 2
    assert (await relay(*alice, "send", "--to", "bob", "--id", "m3", "three")).status == 0
    with LocalStore(tmp_path / "alice.sqlite3") as s:
        [contact] = s.contacts("alice")
        assert fingerprint("bob", contact.ik) == new_fp and contact.pending_ik is None


async def test_listen_shows_a_failed_message_without_its_body(broker: Broker, tmp_path: Path) -> None:
    bob = opts(broker, "bob", tmp_path / "bob.sqlite3")
    assert (await relay(*bob, "listen", "--drain")).status == 0
    async with open_client(url_of(broker), broker.auth.issue("alice")) as alice:
        await alice.send("bob", b"first", id="m1")
        first = await relay(*bob, "listen", "--drain")  # bob pins alice's key
    [line] = [json.loads(x) for x in first.lines]
    assert line == {**line, "id": "m1", "body": "first", "security": "e2e"}
    async with open_client(url_of(broker), broker.auth.issue("alice")) as alice:  # another device of alice's
        await alice.send("bob", b"second", id="m2")
    run = await relay(*bob, "listen", "--drain")
    lines = [json.loads(x) for x in run.lines]
    assert lines == [
        {
            "id": "m2",
            "from": "alice",
            "sent_at": lines[0]["sent_at"],
            "security": "failed",
            "security_error": "key_changed",
        }
    ]
    assert run.err.endswith(
        "relay: message m2 from alice failed end-to-end checks (key_changed): not shown (relay keys shows the change)\n"
    )
    assert "second" not in (await relay(*bob, "export")).out
    assert json.loads((await relay(*bob, "keys", "--json")).out)["contacts"][0]["changed"] is True


async def test_keys_rotate_publishes_a_new_kid_under_the_same_fingerprint(broker: Broker, tmp_path: Path) -> None:
    bob = opts(broker, "bob", tmp_path / "bob.sqlite3")
    before = await keys_json(broker, "bob", tmp_path / "bob.sqlite3")
    async with open_client(url_of(broker), broker.auth.issue("alice"), e2e=False) as alice:
        assert await alice.get_keys("bob") == {}  # made by `relay keys`, published at the next connect
        run = await relay(*bob, "keys", "rotate", "--json")
        assert run.status == 0, run.err
        doc = json.loads(run.out)
        assert doc["fingerprint"] == before["fingerprint"]
        [record] = (await alice.get_keys("bob")).values()
        assert record.kid == doc["kid"]
        assert (
            run.err
            == f"relay: new encryption key {doc['kid']} published; your fingerprint stays {doc['fingerprint']}\n"
        )
    with LocalStore(tmp_path / "bob.sqlite3") as s:
        keys = s.device_keys("bob")
        assert keys is not None and keys.current.kid == doc["kid"] and len(keys.retired) == 1
