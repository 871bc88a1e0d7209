"""Regenerate e2e.json and hpke-rfc9180.json (the JSON files are the source of truth).

Run from the repository root: ``.venv/bin/python tests/vectors/generate_e2e.py [test-vectors.json]``.
Every key and every random value comes from ``_seed(label)`` (SHA-256 of a label), so a run
writes the same bytes each time. Envelopes are made by ``wire.e2e.seal`` with fixed randomness;
invalid ones are assembled here from the same pieces, and the script refuses to write a case
that ``wire.e2e.open_envelope`` does not treat as its entry says.

With a path, hpke-rfc9180.json is rewritten from that copy of RFC 9180's official
test-vectors.json (in pyhpke's sdist: ``pip download pyhpke==0.6.5 --no-binary pyhpke
--no-deps``, ``tests/vectors/test-vectors.json``): only our suite's entries (mode 0 base,
KEM 0x0020, KDF 0x0001, AEAD 0x0001), unchanged.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from wire.e2e import (
    E2E_MAGIC,
    E2EError,
    EncryptionKey,
    Identity,
    KeyRecord,
    SealRandomness,
    fingerprint,
    make_key_record,
    open_envelope,
    safety_number,
    seal,
    verify_key_record,
)

HERE = Path(__file__).resolve().parent
MSG_ID = "01J9ZKQ8V6X3M4N5P6Q7R8S9T0"

# RFC 8032 section 7.1, TEST 1-3: secret key, public key, message, signature.
RFC8032 = [
    (
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    (
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
    (
        "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
    ),
]


def _seed(label: str, n: int = 32) -> bytes:
    return hashlib.sha256(f"relay-e2e-vectors/{label}".encode()).digest()[:n]


IDS = {name: Identity.from_seed(_seed(f"{name}/ik")) for name in ("alice", "bob", "carol", "dave", "eve")}
EKS = {name: EncryptionKey.from_private(_seed(f"{name}/ek")) for name in ("alice", "bob", "carol", "dave", "eve")}
EKS["bob_old"] = EncryptionKey.from_private(_seed("bob/ek-old"))
RECORDS = {name: make_key_record(name, IDS[name], EKS[name]) for name in IDS}
RECORDS["bob_old"] = make_key_record("bob", IDS["bob"], EKS["bob_old"])
HOLDS = {name: [EKS[name]] for name in IDS}
HOLDS["bob"] = [EKS["bob"], EKS["bob_old"]]  # bob rotated: the old key is retired, still held


def _rand(label: str, n_recipients: int) -> SealRandomness:
    return SealRandomness(
        cek=_seed(f"{label}/cek"),
        nonce=_seed(f"{label}/nonce", 12),
        ephemeral=[_seed(f"{label}/ephemeral/{i}") for i in range(n_recipients)],
    )


def _key_json(key: EncryptionKey) -> dict[str, str]:
    return {"private": key.private.hex(), "public": key.public.hex(), "kid": key.kid}


def _record_json(record: KeyRecord) -> dict[str, str]:
    return {"ik": record.ik.hex(), "kid": record.kid, "ek": record.ek.hex(), "sig": record.sig.hex()}


def _my_keys(keys: list[EncryptionKey]) -> dict[str, EncryptionKey]:
    return {k.kid: k for k in keys}


# ---------------------------------------------------------------- valid envelopes

# name, description, sender, recipients as the SEND gives them (record names), body, pad_block
MESSAGES: list[tuple[str, str, str, list[tuple[str, str]], bytes, int]] = [
    ("one_recipient", "alice to bob", "alice", [("bob", "bob")], b"Hello, Bob!", 256),
    (
        "three_recipients",
        "alice to bob, carol and dave: one content key wrapped three times",
        "alice",
        [("bob", "bob"), ("carol", "carol"), ("dave", "dave")],
        "Lunch at noon? \u2615 \u00e0 bient\u00f4t".encode(),
        256,
    ),
    ("empty_body", "an empty body: one block of padding", "alice", [("bob", "bob")], b"", 256),
    ("pad_block_minus_one", "a body of pad_block - 1 bytes: one block", "alice", [("bob", "bob")], b"a" * 255, 256),
    ("pad_block_exact", "a body of exactly pad_block bytes: two blocks", "alice", [("bob", "bob")], b"b" * 256, 256),
    ("pad_block_1", "pad_block 1: only the 0x80 byte is added", "bob", [("alice", "alice")], b"no padding", 1),
    ("pad_block_16", "pad_block 16", "carol", [("alice", "alice"), ("bob", "bob")], b"sixteen", 16),
    (
        "repeated_recipient",
        "the SEND names carol twice: the envelope has carol once, at her first place",
        "alice",
        [("carol", "carol"), ("bob", "bob"), ("carol", "carol")],
        b"dedup",
        256,
    ),
    (
        "rotation",
        "sealed to bob's retired key (old kid): bob, holding both keys, opens it",
        "alice",
        [("bob", "bob_old")],
        b"queued before the rotation",
        256,
    ),
]


def _envelopes() -> list[dict[str, Any]]:
    out = []
    for name, description, sender, to, body, pad_block in MESSAGES:
        distinct = list(dict.fromkeys(r for r, _ in to))
        rand = _rand(name, len(distinct))
        env = seal(
            sender=sender,
            msg_id=MSG_ID,
            recipients=[(r, RECORDS[rec]) for r, rec in to],
            identity=IDS[sender],
            body=body,
            pad_block=pad_block,
            _rand=rand,
        )
        records = {r: RECORDS[rec] for r, rec in reversed(to)}  # the first occurrence wins
        for r in distinct:
            opened = open_envelope(
                env, sender=sender, msg_id=MSG_ID, me=r, sender_ik=IDS[sender].public, my_keys=_my_keys(HOLDS[r])
            )
            assert opened == body, name
        out.append(
            {
                "name": name,
                "description": description,
                "sender": sender,
                "sender_seed": IDS[sender].seed.hex(),
                "sender_ik": IDS[sender].public.hex(),
                "msg_id": MSG_ID,
                "to": [r for r, _ in to],
                "recipients": [
                    {"mailbox": r, "record": _record_json(records[r]), "keys": [_key_json(k) for k in HOLDS[r]]}
                    for r in distinct
                ],
                "body": body.hex(),
                "pad_block": pad_block,
                "cek": rand.cek.hex(),
                "nonce": rand.nonce.hex(),
                "ephemeral": [e.hex() for e in rand.ephemeral],
                "envelope": env.hex(),
            }
        )
    return out


# ---------------------------------------------------------------- invalid envelopes

BASE_BODY = b"Hello, Bob!"


def _base(label: str = "one_recipient", to: tuple[str, ...] = ("bob",), sender: str = "alice") -> bytes:
    return seal(
        sender=sender,
        msg_id=MSG_ID,
        recipients=[(r, RECORDS[r]) for r in to],
        identity=IDS[sender],
        body=BASE_BODY,
        _rand=_rand(label, len(to)),
    )


def _split(env: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """An envelope's outer map and its decoded ``s``."""
    outer = cbor2.loads(env[4:])
    return outer, cbor2.loads(outer["s"])


def _wrap(outer: dict[str, Any]) -> bytes:
    return E2E_MAGIC + cbor2.dumps(outer)


def _signed(s: Any, signer: Identity, label: str = "relay-e2e-msg/1") -> bytes:
    """An envelope of ``s`` (encoded here unless it is bytes already), signed by ``signer``."""
    s_bytes = s if type(s) is bytes else cbor2.dumps(s)
    sig = signer.sign(cbor2.dumps([label, s_bytes]) if label else s_bytes)
    return _wrap({"v": 1, "s": s_bytes, "sig": sig})


def _edit_s(edit: Callable[[dict[str, Any]], None], *, resign: Identity | None = None) -> bytes:
    """The base envelope with ``s`` edited, keeping alice's original signature unless ``resign``."""
    outer, s = _split(_base())
    edit(s)
    if resign is not None:
        return _signed(s, resign)
    outer["s"] = cbor2.dumps(s)
    return _wrap(outer)


def _flip(data: bytes) -> bytes:
    """``data`` with its last byte's lowest bit flipped (stays ASCII for ASCII text)."""
    return data[:-1] + bytes([data[-1] ^ 1])


def _hpke_wrap(cek: bytes, ek: bytes, info_parts: list[str], label: str) -> tuple[bytes, bytes]:
    from wire.e2e import _SUITE, _ephemeral_pair, _x25519_public

    enc, ctx = _SUITE.create_sender_context(
        _x25519_public(ek), info=cbor2.dumps(["relay-e2e-wrap/1", *info_parts]), eks=_ephemeral_pair(_seed(label))
    )
    return enc, ctx.seal(cek)


def _custom(
    label: str,
    *,
    padded: bytes | None = None,
    aad: bytes = b"relay-e2e-body/1",
    wrap_to: str = "bob",
    wrap_info_for: str = "bob",
    corrupt_tag: bool = False,
) -> bytes:
    """An alice -> bob envelope, validly signed by alice, built from pieces some of which are wrong."""
    cek, nonce = _seed(f"{label}/cek"), _seed(f"{label}/nonce", 12)
    ct = AESGCM(cek).encrypt(nonce, BASE_BODY + b"\x80" + bytes(244) if padded is None else padded, aad)
    if corrupt_tag:
        ct = _flip(ct)
    enc, wrapped = _hpke_wrap(cek, RECORDS[wrap_to].ek, ["alice", MSG_ID, wrap_info_for], f"{label}/ephemeral")
    s = {
        "from": "alice",
        "id": MSG_ID,
        "to": ["bob"],
        "ik": IDS["alice"].public,
        "keys": [{"to": "bob", "kid": RECORDS["bob"].kid, "enc": enc, "ct": wrapped}],
        "n": nonce,
        "ct": ct,
    }
    return _signed(s, IDS["alice"])


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(s: dict[str, Any]) -> None:
        target: Any = s
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value

    return edit


def _flip_at(path: tuple[Any, ...]) -> Callable[[dict[str, Any]], None]:
    def edit(s: dict[str, Any]) -> None:
        target: Any = s
        for step in path[:-1]:
            target = target[step]
        old = target[path[-1]]
        target[path[-1]] = _flip(old.encode()).decode() if type(old) is str else _flip(old)

    return edit


def _reorder(s: dict[str, Any]) -> dict[str, Any]:
    return {k: s[k] for k in ("id", "from", *[k for k in s if k not in ("id", "from")])}


def _invalid() -> list[dict[str, Any]]:
    base = _base()
    outer, s = _split(base)
    s_bytes = outer["s"]
    three = _base("three_recipients", ("bob", "carol", "dave"))
    to_carol = _base("to_carol", ("carol",))
    alice_sig = outer["sig"]

    cases: list[tuple[str, str, bytes, dict[str, Any], str]] = []

    def case(name: str, description: str, body: bytes, reason: str, **opening: Any) -> None:
        cases.append((name, description, body, opening, reason))

    # 1: not an envelope
    case("plaintext", "no magic: a plaintext message", b"Hello, Bob!", "plaintext")
    case("short_magic", "only 3 bytes of the magic", b"RE2", "plaintext")
    case("magic_lowercase", "re2e is not the magic", b"re2e" + base[4:], "plaintext")

    # 2: not decodable as documented
    case("magic_only", "the magic and nothing else", E2E_MAGIC, "malformed")
    case("not_cbor", "the magic and a CBOR break byte", E2E_MAGIC + b"\xff", "malformed")
    case(
        "envelope_not_a_map", "the envelope is an array", E2E_MAGIC + cbor2.dumps([1, s_bytes, alice_sig]), "malformed"
    )
    case("envelope_trailing_byte", "a byte after the envelope map", base + b"\x00", "malformed")
    case("envelope_truncated", "the last byte cut off", base[:-1], "malformed")
    case("envelope_extra_key", "a fourth key", _wrap({**outer, "x": 0}), "malformed")
    case("envelope_missing_sig", "no sig", _wrap({"v": 1, "s": s_bytes}), "malformed")
    case("envelope_keys_out_of_order", "s, v, sig", _wrap({"s": s_bytes, "v": 1, "sig": alice_sig}), "malformed")
    case("v_2", "version 2", _wrap({"v": 2, "s": s_bytes, "sig": alice_sig}), "malformed")
    case("v_float", "v is the float 1.0", _wrap({"v": 1.0, "s": s_bytes, "sig": alice_sig}), "malformed")
    case("v_true", "v is true", _wrap({"v": True, "s": s_bytes, "sig": alice_sig}), "malformed")
    case("s_text", "s is a text string", _wrap({"v": 1, "s": s_bytes.hex(), "sig": alice_sig}), "malformed")
    case("sig_63_bytes", "a 63-byte sig", _wrap({"v": 1, "s": s_bytes, "sig": alice_sig[:63]}), "malformed")
    case(
        "v_long_head",
        "v written with a one-byte argument (0x18 0x01): not the shortest head",
        E2E_MAGIC + b"\xa3" + cbor2.dumps("v") + b"\x18\x01" + base[4 + 1 + 2 + 1 :],
        "malformed",
    )
    indefinite = b"\xbf" + base[4 + 1 :] + b"\xff"
    case("envelope_indefinite_map", "an indefinite-length map", E2E_MAGIC + indefinite, "malformed")
    case(
        "envelope_duplicate_key",
        "v twice",
        E2E_MAGIC + b"\xa4" + cbor2.dumps("v") + b"\x01" + base[4 + 1 :],
        "malformed",
    )
    case(
        "s_tagged",
        "s inside tag 24 (encoded CBOR)",
        _wrap({"v": 1, "s": cbor2.CBORTag(24, s_bytes), "sig": alice_sig}),
        "malformed",
    )
    signer = IDS["alice"]
    case("s_not_a_map", "s (signed by alice) is an array", _signed(list(s.values()), signer), "malformed")
    case("s_extra_key", "s has an eighth key (signed by alice)", _signed({**s, "x": 1}, signer), "malformed")
    case("s_keys_out_of_order", "s has id before from (signed by alice)", _signed(_reorder(s), signer), "malformed")
    case(
        "s_missing_ct",
        "s has no ct (signed by alice)",
        _signed({k: v for k, v in s.items() if k != "ct"}, signer),
        "malformed",
    )
    case(
        "s_trailing_byte",
        "a byte after the s map (signed by alice)",
        _signed(cbor2.dumps(s) + b"\x00", signer),
        "malformed",
    )
    case(
        "s_long_head",
        "s's from written with a one-byte length (0x78 0x05): not the shortest head (signed by alice)",
        _signed(b"\xa7" + cbor2.dumps("from") + b"\x78\x05alice" + cbor2.dumps(s)[1 + 5 + 6 :], signer),
        "malformed",
    )

    def s_case(name: str, description: str, path: tuple[Any, ...], value: Any) -> None:
        case(name, description + " (signed by alice)", _edit_s(_set(path, value), resign=signer), "malformed")

    s_case("from_not_text", "from is an integer", ("from",), 7)
    s_case("id_not_text", "id is a byte string", ("id",), MSG_ID.encode())
    s_case("to_empty", "to is empty and keys too", ("to",), [])
    s_case("to_not_array", "to is a text string", ("to",), "bob")
    s_case("to_element_not_text", "to holds a byte string", ("to",), [b"bob"])
    s_case("ik_31_bytes", "ik is 31 bytes", ("ik",), IDS["alice"].public[:31])
    s_case("n_11_bytes", "n is 11 bytes", ("n",), s["n"][:11])
    s_case("n_13_bytes", "n is 13 bytes", ("n",), s["n"] + b"\x00")
    s_case("ct_text", "ct is a text string", ("ct",), s["ct"].hex())
    s_case("keys_not_array", "keys is a map", ("keys",), s["keys"][0])
    s_case("keys_one_more", "keys has two entries, to has one", ("keys",), [s["keys"][0], s["keys"][0]])
    s_case("keys_entry_to_differs", "keys[0].to is carol, to[0] is bob", ("keys", 0, "to"), "carol")
    s_case("keys_entry_extra_key", "keys[0] has a fifth key", ("keys", 0), {**s["keys"][0], "x": 0})
    s_case(
        "keys_entry_out_of_order",
        "keys[0] has kid before to",
        ("keys", 0),
        {k: s["keys"][0][k] for k in ("kid", "to", "enc", "ct")},
    )
    s_case("keys_entry_kid_bytes", "keys[0].kid is a byte string", ("keys", 0, "kid"), b"kid")
    s_case("keys_entry_enc_31_bytes", "keys[0].enc is 31 bytes", ("keys", 0, "enc"), s["keys"][0]["enc"][:31])
    s_case("keys_entry_ct_47_bytes", "keys[0].ct is 47 bytes", ("keys", 0, "ct"), s["keys"][0]["ct"][:47])
    s_case("keys_entry_ct_49_bytes", "keys[0].ct is 49 bytes", ("keys", 0, "ct"), s["keys"][0]["ct"] + b"\x00")
    case(
        "to_repeated",
        "to is bob, bob (keys matching) (signed by alice)",
        _signed({**s, "to": ["bob", "bob"], "keys": [s["keys"][0], s["keys"][0]]}, signer),
        "malformed",
    )

    # 3: another message or another sender
    case("wrong_sender", "delivered as from mallory", base, "mismatch", sender="mallory")
    case("wrong_id", "delivered under another message id", base, "mismatch", msg_id="01J9ZKQ8V6X3M4N5P6Q7R8S9T1")
    case("tampered_from", "a flipped byte in from", _edit_s(_flip_at(("from",))), "mismatch")
    case("tampered_id", "a flipped byte in id", _edit_s(_flip_at(("id",))), "mismatch")

    # 4: another conversation
    case("not_for_me", "alice to bob, opened by eve", base, "not_for_me", me="eve")
    case("replay_to_other_recipient", "alice's envelope to carol delivered to bob", to_carol, "not_for_me")
    case(
        "tampered_to",
        "bob renamed in to and keys[0].to (one flipped byte in each)",
        _edit_s(lambda s: (_flip_at(("to", 0))(s), _flip_at(("keys", 0, "to"))(s))),
        "not_for_me",
    )

    # 5: the pinned key is not the envelope's
    case("tampered_ik", "a flipped byte in ik", _edit_s(_flip_at(("ik",))), "key_changed")
    case(
        "signed_by_other_ik",
        "eve's identity key in ik, signed by eve, delivered as from alice",
        _edit_s(_set(("ik",), IDS["eve"].public), resign=IDS["eve"]),
        "key_changed",
    )
    case("pinned_other_ik", "the recipient pinned eve's key for alice", base, "key_changed", sender_ik="eve")

    # 6: the signature
    case("tampered_sig", "a flipped byte in sig", _wrap({**outer, "sig": _flip(alice_sig)}), "bad_signature")
    case("tampered_kid", "a flipped byte in keys[0].kid", _edit_s(_flip_at(("keys", 0, "kid"))), "bad_signature")
    case("tampered_enc", "a flipped byte in keys[0].enc", _edit_s(_flip_at(("keys", 0, "enc"))), "bad_signature")
    case("tampered_wrapped_key", "a flipped byte in keys[0].ct", _edit_s(_flip_at(("keys", 0, "ct"))), "bad_signature")
    case("tampered_nonce", "a flipped byte in n", _edit_s(_flip_at(("n",))), "bad_signature")
    case("tampered_ct", "a flipped byte in ct", _edit_s(_flip_at(("ct",))), "bad_signature")
    case(
        "signature_by_other_key",
        "alice's ik, signed by eve",
        _edit_s(lambda s: None, resign=IDS["eve"]),
        "bad_signature",
    )
    case(
        "signature_without_label",
        'alice signed s itself, not CBOR(["relay-e2e-msg/1", s])',
        _signed(s_bytes, signer, label=""),
        "bad_signature",
    )
    case(
        "signature_other_label",
        "alice's signature under the key-record label",
        _signed(s_bytes, signer, label="relay-e2e-key/1"),
        "bad_signature",
    )
    forged = seal(
        sender="alice",
        msg_id=MSG_ID,
        recipients=[("carol", RECORDS["carol"]), ("dave", RECORDS["dave"])],
        identity=IDS["bob"],
        body=MESSAGES[1][4],  # the content bob opened from alice's three_recipients message
        _rand=_rand("insider", 2),
    )
    _, s_f = _split(forged)
    s_f["ik"] = IDS["alice"].public
    case(
        "insider_forgery",
        "bob (a recipient of alice's three_recipients message) re-seals its content to carol and dave under "
        "alice's name and ik, signing with his own key: carol refuses it",
        _signed(s_f, IDS["bob"]),
        "bad_signature",
        me="carol",
    )
    _, s_three = _split(three)
    case(
        "three_recipients_tampered_other_entry",
        "a flipped byte in carol's wrapped key, opened by bob",
        _wrap(
            {
                "v": 1,
                "s": cbor2.dumps(
                    {
                        **s_three,
                        "keys": [
                            s_three["keys"][0],
                            {**s_three["keys"][1], "ct": _flip(s_three["keys"][1]["ct"])},
                            s_three["keys"][2],
                        ],
                    }
                ),
                "sig": cbor2.loads(three[4:])["sig"],
            }
        ),
        "bad_signature",
    )

    # 7: the key
    rotated = seal(
        sender="alice",
        msg_id=MSG_ID,
        recipients=[("bob", RECORDS["bob_old"])],
        identity=signer,
        body=BASE_BODY,
        _rand=_rand("retired", 1),
    )
    case(
        "unknown_kid",
        "sealed to bob's retired key, opened by bob holding only his current key (the retired one deleted)",
        rotated,
        "unknown_key",
        my_keys=["bob"],
    )
    case(
        "kid_of_another_mailbox",
        "keys[0].kid is carol's kid",
        _signed({**s, "keys": [{**s["keys"][0], "kid": RECORDS["carol"].kid}]}, signer),
        "unknown_key",
    )

    # 8: decryption (validly signed by alice)
    case(
        "wrapped_to_other_key",
        "bob's CEK wrapped to carol's ek",
        _custom("to_other", wrap_to="carol"),
        "decrypt_failed",
    )
    case(
        "wrap_info_other_recipient",
        "bob's CEK wrapped with info naming carol",
        _custom("info_other", wrap_info_for="carol"),
        "decrypt_failed",
    )
    case("ct_bad_tag", "the body's GCM tag is wrong", _custom("bad_tag", corrupt_tag=True), "decrypt_failed")
    case("ct_other_aad", "the body encrypted with an empty aad", _custom("other_aad", aad=b""), "decrypt_failed")
    case("ct_too_short", "ct is 15 bytes", _signed({**s, "ct": s["ct"][:15]}, signer), "decrypt_failed")
    case(
        "padding_missing", "the padded body has no 0x80", _custom("no_marker", padded=b"Hello" + bytes(11)), "malformed"
    )
    case("padding_empty", "the padded body is empty", _custom("pad_empty", padded=b""), "malformed")
    case(
        "padding_other_marker",
        "the body ends 0x01 0x00 ...",
        _custom("pad_01", padded=b"Hello\x01" + bytes(10)),
        "malformed",
    )

    out = []
    for name, description, body, opening, reason in cases:
        sender = opening.get("sender", "alice")
        msg_id = opening.get("msg_id", MSG_ID)
        me = opening.get("me", "bob")
        sender_ik = IDS[opening.get("sender_ik", "alice")].public
        my_keys = [EKS[k] for k in opening["my_keys"]] if "my_keys" in opening else HOLDS[me]
        try:
            open_envelope(body, sender=sender, msg_id=msg_id, me=me, sender_ik=sender_ik, my_keys=_my_keys(my_keys))
        except E2EError as exc:
            assert exc.reason == reason, (name, exc)
        else:
            raise AssertionError(f"{name} opened")
        out.append(
            {
                "name": name,
                "description": description,
                "body": body.hex(),
                "sender": sender,
                "msg_id": msg_id,
                "me": me,
                "sender_ik": sender_ik.hex(),
                "my_keys": [_key_json(k) for k in my_keys],
                "reason": reason,
            }
        )
    assert len({c["name"] for c in out}) == len(out)
    return out


# ---------------------------------------------------------------- keys, records, fingerprints


def _identities() -> dict[str, Any]:
    return {name: {"seed": i.seed.hex(), "ik": i.public.hex()} for name, i in IDS.items()}


def _records() -> list[dict[str, Any]]:
    out = []
    for name, record in RECORDS.items():
        mailbox = name.removesuffix("_old")
        key = EKS[name]
        assert verify_key_record(mailbox, record)
        out.append(
            {
                "name": name,
                "mailbox": mailbox,
                "identity_seed": IDS[mailbox].seed.hex(),
                "ek": _key_json(key),
                "record": _record_json(record),
                "valid": True,
            }
        )
    bob = RECORDS["bob"]
    wrong = [
        ("moved_to_other_mailbox", "bob's record published as carol's", "carol", bob),
        (
            "tampered_kid",
            "a flipped byte in kid",
            "bob",
            KeyRecord(ik=bob.ik, kid=_flip(bob.kid.encode()).decode(), ek=bob.ek, sig=bob.sig),
        ),
        (
            "tampered_ek",
            "a flipped byte in ek",
            "bob",
            KeyRecord(ik=bob.ik, kid=bob.kid, ek=_flip(bob.ek), sig=bob.sig),
        ),
        (
            "tampered_sig",
            "a flipped byte in sig",
            "bob",
            KeyRecord(ik=bob.ik, kid=bob.kid, ek=bob.ek, sig=_flip(bob.sig)),
        ),
        (
            "other_ik",
            "eve's ik on bob's signed record",
            "bob",
            KeyRecord(ik=IDS["eve"].public, kid=bob.kid, ek=bob.ek, sig=bob.sig),
        ),
        (
            "ik_not_a_point",
            "ik is 32 bytes that are not a curve point",
            "bob",
            KeyRecord(ik=b"\x02" + bytes(30) + b"\x80", kid=bob.kid, ek=bob.ek, sig=bob.sig),
        ),
    ]
    for name, description, mailbox, record in wrong:
        assert not verify_key_record(mailbox, record), name
        out.append(
            {
                "name": name,
                "description": description,
                "mailbox": mailbox,
                "record": _record_json(record),
                "valid": False,
            }
        )
    return out


def _fingerprints() -> list[dict[str, str]]:
    return [
        {"mailbox": name, "ik": i.public.hex(), "fingerprint": fingerprint(name, i.public)} for name, i in IDS.items()
    ]


def _safety_numbers() -> list[dict[str, str]]:
    out = []
    for a, b in (("alice", "bob"), ("bob", "alice"), ("carol", "alice"), ("dave", "eve")):
        n = safety_number(a, IDS[a].public, b, IDS[b].public)
        assert n == safety_number(b, IDS[b].public, a, IDS[a].public)
        out.append({"a": a, "ik_a": IDS[a].public.hex(), "b": b, "ik_b": IDS[b].public.hex(), "safety_number": n})
    return out


def _rfc8032() -> list[dict[str, str]]:
    out = []
    for n, (secret, public, message, signature) in enumerate(RFC8032, 1):
        identity = Identity.from_seed(bytes.fromhex(secret))
        assert identity.public.hex() == public and identity.sign(bytes.fromhex(message)).hex() == signature
        out.append(
            {
                "name": f"TEST {n}",
                "secret_key": secret,
                "public_key": public,
                "message": message,
                "signature": signature,
            }
        )
    return out


def build() -> dict[str, Any]:
    return {
        "description": (
            "Golden vectors for docs/e2e.md: keys from fixed seeds, key records, fingerprints, safety numbers, "
            "envelopes sealed with fixed randomness (cek, nonce, one HPKE ephemeral X25519 private key per distinct "
            "recipient, in order), invalid envelopes with the reason opening gives, and RFC 8032 Ed25519 TEST 1-3. "
            "All byte strings are lowercase hex. Made by tests/vectors/generate_e2e.py."
        ),
        "identities": _identities(),
        "key_records": _records(),
        "fingerprints": _fingerprints(),
        "safety_numbers": _safety_numbers(),
        "envelopes": _envelopes(),
        "invalid": _invalid(),
        "ed25519_rfc8032": _rfc8032(),
    }


def _write(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str]) -> None:
    _write(HERE / "e2e.json", build())
    if argv:
        official = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
        ours = [v for v in official if (v["mode"], v["kem_id"], v["kdf_id"], v["aead_id"]) == (0, 0x20, 1, 1)]
        assert ours, "no entry for our suite"
        _write(HERE / "hpke-rfc9180.json", ours)


if __name__ == "__main__":
    main(sys.argv[1:])
