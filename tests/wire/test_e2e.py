"""wire.e2e: the golden vectors (tests/vectors/e2e.json, the JS suite reads the same), RFC 9180 and
RFC 8032 vectors, and the properties docs/e2e.md promises (round trips, tampering, forgery, replay,
rotation, fingerprints)."""

from __future__ import annotations

import json
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyhpke import AEADId, CipherSuite, KDFId, KEMId, KEMKeyPair

from wire.e2e import (
    E2E_MAGIC,
    REASONS,
    E2EError,
    EncryptionKey,
    Identity,
    KeyRecord,
    SealRandomness,
    fingerprint,
    is_envelope,
    key_id,
    make_key_record,
    open_envelope,
    peek,
    safety_number,
    seal,
    verify_key_record,
)

from .support import VECTORS

E2E = json.loads((VECTORS / "e2e.json").read_text(encoding="utf-8"))
HPKE = json.loads((VECTORS / "hpke-rfc9180.json").read_text(encoding="utf-8"))


def _record(m: dict[str, str]) -> KeyRecord:
    return KeyRecord(ik=bytes.fromhex(m["ik"]), kid=m["kid"], ek=bytes.fromhex(m["ek"]), sig=bytes.fromhex(m["sig"]))


def _keys(keys: list[dict[str, str]]) -> dict[str, EncryptionKey]:
    out = {}
    for k in keys:
        key = EncryptionKey.from_private(bytes.fromhex(k["private"]))
        assert (key.public.hex(), key.kid) == (k["public"], k["kid"])
        out[key.kid] = key
    return out


def _reason(body: bytes, **opening: Any) -> str:
    with pytest.raises(E2EError) as info:
        open_envelope(body, **opening)
    assert info.value.reason in REASONS
    return info.value.reason


# ---------------------------------------------------------------- golden vectors


@pytest.mark.parametrize("v", E2E["envelopes"], ids=[v["name"] for v in E2E["envelopes"]])
def test_seal_from_the_vector_inputs_gives_the_vector_bytes(v: dict[str, Any]) -> None:
    records = {r["mailbox"]: _record(r["record"]) for r in v["recipients"]}
    identity = Identity.from_seed(bytes.fromhex(v["sender_seed"]))
    assert identity.public.hex() == v["sender_ik"]
    body = seal(
        sender=v["sender"],
        msg_id=v["msg_id"],
        recipients=[(r, records[r]) for r in v["to"]],
        identity=identity,
        body=bytes.fromhex(v["body"]),
        pad_block=v["pad_block"],
        _rand=SealRandomness(
            cek=bytes.fromhex(v["cek"]),
            nonce=bytes.fromhex(v["nonce"]),
            ephemeral=[bytes.fromhex(e) for e in v["ephemeral"]],
        ),
    )
    assert body.hex() == v["envelope"]


@pytest.mark.parametrize("v", E2E["envelopes"], ids=[v["name"] for v in E2E["envelopes"]])
def test_every_recipient_opens_the_vector_envelope(v: dict[str, Any]) -> None:
    body = bytes.fromhex(v["envelope"])
    assert is_envelope(body)
    peeked = peek(body)
    assert (peeked.sender, peeked.id, peeked.ik.hex()) == (v["sender"], v["msg_id"], v["sender_ik"])
    assert list(peeked.to) == [r["mailbox"] for r in v["recipients"]] == list(dict.fromkeys(v["to"]))
    for r in v["recipients"]:
        assert peeked.kids[r["mailbox"]] == r["record"]["kid"]
        opened = open_envelope(
            body,
            sender=v["sender"],
            msg_id=v["msg_id"],
            me=r["mailbox"],
            sender_ik=bytes.fromhex(v["sender_ik"]),
            my_keys=_keys(r["keys"]),
        )
        assert opened.hex() == v["body"]


def test_vector_envelope_sizes_follow_the_padding() -> None:
    by_name = {v["name"]: v for v in E2E["envelopes"]}
    ct_len = {
        name: len(cbor2.loads(cbor2.loads(bytes.fromhex(v["envelope"])[4:])["s"])["ct"]) for name, v in by_name.items()
    }
    assert ct_len["empty_body"] == ct_len["pad_block_minus_one"] == 256 + 16
    assert ct_len["pad_block_exact"] == 512 + 16
    assert ct_len["pad_block_1"] == len(b"no padding") + 1 + 16


@pytest.mark.parametrize("v", E2E["invalid"], ids=[v["name"] for v in E2E["invalid"]])
def test_invalid_vector_is_refused_with_its_reason(v: dict[str, Any]) -> None:
    reason = _reason(
        bytes.fromhex(v["body"]),
        sender=v["sender"],
        msg_id=v["msg_id"],
        me=v["me"],
        sender_ik=bytes.fromhex(v["sender_ik"]),
        my_keys=_keys(v["my_keys"]),
    )
    assert reason == v["reason"]


@pytest.mark.parametrize("v", E2E["invalid"], ids=[v["name"] for v in E2E["invalid"]])
def test_peek_refuses_exactly_the_undecodable_vectors(v: dict[str, Any]) -> None:
    body = bytes.fromhex(v["body"])
    if v["reason"] in ("plaintext", "malformed") and not v["name"].startswith("padding_"):
        with pytest.raises(E2EError) as info:
            peek(body)
        assert info.value.reason == v["reason"]
    else:
        peek(body)


def test_invalid_vectors_cover_every_reason_of_open_envelope() -> None:
    assert {v["reason"] for v in E2E["invalid"]} == set(REASONS) - {"no_sender_key"}


@pytest.mark.parametrize("v", E2E["key_records"], ids=[v["name"] for v in E2E["key_records"]])
def test_key_record_vector(v: dict[str, Any]) -> None:
    record = _record(v["record"])
    assert verify_key_record(v["mailbox"], record) is v["valid"]
    assert record.to_map() == {k: bytes.fromhex(x) if k != "kid" else x for k, x in v["record"].items()}
    if v["valid"]:
        identity = Identity.from_seed(bytes.fromhex(v["identity_seed"]))
        (key,) = _keys([v["ek"]]).values()
        assert key.kid == key_id(key.public)
        assert make_key_record(v["mailbox"], identity, key) == record


def test_identity_vectors() -> None:
    for i in E2E["identities"].values():
        assert Identity.from_seed(bytes.fromhex(i["seed"])).public.hex() == i["ik"]


@pytest.mark.parametrize("v", E2E["fingerprints"], ids=[v["mailbox"] for v in E2E["fingerprints"]])
def test_fingerprint_vector(v: dict[str, str]) -> None:
    fp = fingerprint(v["mailbox"], bytes.fromhex(v["ik"]))
    assert fp == v["fingerprint"]
    groups = fp.split(" ")
    assert len(groups) == 6 and all(len(g) == 5 and g.isdigit() for g in groups)


@pytest.mark.parametrize("v", E2E["safety_numbers"], ids=[f"{v['a']}-{v['b']}" for v in E2E["safety_numbers"]])
def test_safety_number_vector_is_the_same_from_both_sides(v: dict[str, str]) -> None:
    a, ik_a, b, ik_b = v["a"], bytes.fromhex(v["ik_a"]), v["b"], bytes.fromhex(v["ik_b"])
    assert safety_number(a, ik_a, b, ik_b) == safety_number(b, ik_b, a, ik_a) == v["safety_number"]
    first, second = sorted([(a, ik_a), (b, ik_b)])
    assert v["safety_number"] == f"{fingerprint(*first)} {fingerprint(*second)}"


@pytest.mark.parametrize("v", E2E["ed25519_rfc8032"], ids=[v["name"] for v in E2E["ed25519_rfc8032"]])
def test_rfc8032_ed25519_vector(v: dict[str, str]) -> None:
    identity = Identity.from_seed(bytes.fromhex(v["secret_key"]))
    assert identity.public.hex() == v["public_key"]
    assert identity.sign(bytes.fromhex(v["message"])).hex() == v["signature"]


def test_rfc9180_vectors_are_only_our_suite() -> None:
    assert HPKE and all((v["mode"], v["kem_id"], v["kdf_id"], v["aead_id"]) == (0, 0x20, 1, 1) for v in HPKE)


@pytest.mark.parametrize("v", HPKE, ids=[f"rfc9180-{i}" for i in range(len(HPKE))])
def test_rfc9180_vector_through_pyhpke(v: dict[str, Any]) -> None:
    suite = CipherSuite.new(KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.AES128_GCM)
    h = bytes.fromhex
    eks = KEMKeyPair(suite.kem.deserialize_private_key(h(v["skEm"])), suite.kem.deserialize_public_key(h(v["pkEm"])))
    pkr = suite.kem.deserialize_public_key(h(v["pkRm"]))
    skr = suite.kem.deserialize_private_key(h(v["skRm"]))
    enc, sender = suite.create_sender_context(pkr, info=h(v["info"]), eks=eks)
    assert enc.hex() == v["enc"]
    recipient = suite.create_recipient_context(enc, skr, info=h(v["info"]))
    for e in v["encryptions"]:
        ct = sender.seal(h(e["pt"]), aad=h(e["aad"]))
        assert ct.hex() == e["ct"]
        assert recipient.open(ct, aad=h(e["aad"])).hex() == e["pt"]
    for x in v["exports"]:
        assert sender.export(h(x["exporter_context"]), x["L"]).hex() == x["exported_value"]
        assert recipient.export(h(x["exporter_context"]), x["L"]).hex() == x["exported_value"]


# ---------------------------------------------------------------- properties

ALICE, BOB, CAROL, EVE = (Identity.from_seed(bytes([n]) * 32) for n in (1, 2, 3, 4))
KEYS = {name: EncryptionKey.from_private(bytes([n]) * 32) for name, n in (("bob", 12), ("carol", 13), ("eve", 14))}
KEYS.update({f"r{i}": EncryptionKey.from_private(bytes([20 + i]) * 32) for i in range(5)})
RECORDS = {
    name: make_key_record(name, Identity.from_seed(bytes([40 + i]) * 32), k) for i, (name, k) in enumerate(KEYS.items())
}


def _seal(to: list[str], body: bytes = b"hi", *, sender: str = "alice", identity: Identity = ALICE, **kw: Any) -> bytes:
    return seal(
        sender=sender, msg_id="m1", recipients=[(r, RECORDS[r]) for r in to], identity=identity, body=body, **kw
    )


def _open(body: bytes, me: str, *, sender: str = "alice", msg_id: str = "m1", sender_ik: bytes = ALICE.public) -> bytes:
    return open_envelope(
        body, sender=sender, msg_id=msg_id, me=me, sender_ik=sender_ik, my_keys={KEYS[me].kid: KEYS[me]}
    )


@settings(max_examples=40, deadline=None)
@given(
    body=st.binary(max_size=2000),
    to=st.lists(st.sampled_from([f"r{i}" for i in range(5)]), min_size=1, max_size=5, unique=True),
    pad_block=st.integers(min_value=1, max_value=1024),
)
def test_any_body_round_trips_to_every_recipient(body: bytes, to: list[str], pad_block: int) -> None:
    env = _seal(to, body, pad_block=pad_block)
    assert env.startswith(E2E_MAGIC)
    for r in to:
        assert _open(env, r) == body
    ct = cbor2.loads(cbor2.loads(env[4:])["s"])["ct"]
    assert (len(ct) - 16) % pad_block == 0 and len(ct) - 16 > len(body)


def test_sealing_twice_gives_different_envelopes() -> None:
    assert _seal(["bob"]) != _seal(["bob"])


def test_a_flipped_bit_anywhere_in_an_envelope_is_refused() -> None:
    env = _seal(["bob"], b"x", pad_block=1)
    assert len(env) < 400
    for i in range(len(env)):
        for bit in (0x01, 0x80):
            tampered = env[:i] + bytes([env[i] ^ bit]) + env[i + 1 :]
            with pytest.raises(E2EError):
                _open(tampered, "bob")


def test_truncated_or_extended_envelopes_are_refused() -> None:
    env = _seal(["bob"], b"x", pad_block=1)
    for n in range(len(env)):
        with pytest.raises(E2EError):
            _open(env[:n], "bob")
    assert (
        _reason(env + b"\x00", sender="alice", msg_id="m1", me="bob", sender_ik=ALICE.public, my_keys={}) == "malformed"
    )


def test_insider_cannot_forge_content_to_another_recipient_under_the_senders_name() -> None:
    env = _seal(["bob", "carol"], b"meet at 6")
    assert _open(env, "bob") == b"meet at 6"
    # bob re-seals the content to carol as if from alice, with alice's ik, but can only sign with his own key
    forged = bytearray(_seal(["carol"], b"meet at 7", identity=BOB))
    outer = cbor2.loads(bytes(forged[4:]))
    s = cbor2.loads(outer["s"])
    s["ik"] = ALICE.public
    s_bytes = cbor2.dumps(s)
    resigned = E2E_MAGIC + cbor2.dumps(
        {"v": 1, "s": s_bytes, "sig": BOB.sign(cbor2.dumps(["relay-e2e-msg/1", s_bytes]))}
    )
    assert (
        _reason(resigned, sender="alice", msg_id="m1", me="carol", sender_ik=ALICE.public, my_keys={})
        == "bad_signature"
    )
    # with his own ik, carol sees that it is not alice's key
    own = _seal(["carol"], b"meet at 7", identity=BOB)
    assert _reason(own, sender="alice", msg_id="m1", me="carol", sender_ik=ALICE.public, my_keys={}) == "key_changed"


def test_an_envelope_replayed_into_another_conversation_or_as_another_message_is_refused() -> None:
    env = _seal(["bob"])
    kw: dict[str, Any] = {"sender_ik": ALICE.public, "my_keys": {KEYS["carol"].kid: KEYS["carol"]}}
    assert _reason(env, sender="alice", msg_id="m1", me="carol", **kw) == "not_for_me"
    assert _reason(env, sender="alice", msg_id="m2", me="bob", **kw) == "mismatch"
    assert _reason(env, sender="eve", msg_id="m1", me="bob", **kw) == "mismatch"


def test_a_message_sealed_to_a_retired_key_opens_with_that_key() -> None:
    bob_id = Identity.from_seed(bytes([9]) * 32)
    old, new = KEYS["bob"], EncryptionKey.from_private(bytes([99]) * 32)
    old_record, new_record = make_key_record("bob", bob_id, old), make_key_record("bob", bob_id, new)
    assert old_record.ik == new_record.ik and old_record.kid != new_record.kid
    queued = seal(sender="alice", msg_id="m1", recipients=[("bob", old_record)], identity=ALICE, body=b"old")
    fresh = seal(sender="alice", msg_id="m2", recipients=[("bob", new_record)], identity=ALICE, body=b"new")
    both = {old.kid: old, new.kid: new}
    kw: dict[str, Any] = {"sender": "alice", "me": "bob", "sender_ik": ALICE.public}
    assert open_envelope(queued, msg_id="m1", my_keys=both, **kw) == b"old"
    assert open_envelope(fresh, msg_id="m2", my_keys=both, **kw) == b"new"
    assert _reason(queued, msg_id="m1", my_keys={new.kid: new}, **kw) == "unknown_key"


def test_fingerprint_and_safety_number_are_symmetric_and_key_bound() -> None:
    n = safety_number("alice", ALICE.public, "bob", BOB.public)
    assert n == safety_number("bob", BOB.public, "alice", ALICE.public)
    assert n.split(" ")[:6] == fingerprint("alice", ALICE.public).split(" ")
    assert fingerprint("alice", ALICE.public) != fingerprint("alice", EVE.public)
    assert fingerprint("alice", ALICE.public) != fingerprint("alicf", ALICE.public)
    assert safety_number("alice", ALICE.public, "bob", EVE.public) != n


def test_a_key_record_verifies_only_for_its_mailbox_and_signer() -> None:
    record = RECORDS["bob"]
    assert verify_key_record("bob", record)
    assert not verify_key_record("carol", record)
    assert not verify_key_record("bob", KeyRecord(ik=EVE.public, kid=record.kid, ek=record.ek, sig=record.sig))


def test_plaintext_body_is_not_an_envelope() -> None:
    assert not is_envelope(b"hello") and not is_envelope(b"")
    with pytest.raises(E2EError) as info:
        peek(b"hello")
    assert info.value.reason == "plaintext"


def test_repeated_recipients_are_sealed_once_in_first_order() -> None:
    env = _seal(["carol", "bob", "carol"])
    assert peek(env).to == ("carol", "bob")


def test_seal_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError):
        _seal([])
    with pytest.raises(ValueError):
        _seal(["bob"], pad_block=0)
    with pytest.raises(ValueError):
        _seal(["bob"], _rand=SealRandomness(cek=bytes(32), nonce=bytes(12), ephemeral=[]))


def test_keys_reject_wrong_lengths_and_hide_private_bytes_in_repr() -> None:
    with pytest.raises(ValueError):
        Identity(bytes(31))
    with pytest.raises(ValueError):
        EncryptionKey(bytes(33))
    i, k = Identity.generate(), EncryptionKey.generate()
    assert i.seed.hex() not in repr(i) and k.private.hex() not in repr(k)
    assert Identity.from_seed(i.seed) == i and EncryptionKey.from_private(k.private) == k
    assert len(k.kid) == 16 and k.kid == key_id(k.public)


def test_docs_name_every_reason_label_and_suite_id() -> None:
    from wire import e2e

    text = (VECTORS.parents[1] / "docs" / "e2e.md").read_text(encoding="utf-8")
    for reason in REASONS:
        assert f"`{reason}`" in text, reason
    for label in (e2e._KEY_LABEL, e2e._MSG_LABEL, e2e._WRAP_LABEL, e2e._FP_LABEL):
        assert f'"{label}"' in text, label
    assert f'b"{e2e._BODY_AAD.decode()}"' in text
    assert "`0x0020`" in text and "HKDF-SHA256 `0x0001`" in text and "AES-128-GCM `0x0001`" in text
