"""Tokens from an application's own issuer: EdDSA, RS256 and ES256 public keys from PEM files and a JWKS file, chosen
by kid; each refusal and its code, the same over TCP, WebSocket and HTTP; key rotation without a refused client; key
sources that cannot be used, at start and on a change."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from broker.auth import Authenticator, AuthError
from broker.cli import main
from broker.issuer_keys import IssuerKeys, KeyFileError
from broker.server import Broker
from wire import ErrorCode, Ping, Pong

from ..conftest import running_broker
from .issuers import TRANSPORTS, Issuer, attempt, write_jwks
from .raw import RawClient

SECRET = b"s" * 32
ALGORITHMS = ("EdDSA", "RS256", "ES256")
INVALID, EXPIRED = ErrorCode.INVALID_TOKEN, ErrorCode.TOKEN_EXPIRED


def code_of(auth: Authenticator, token: str) -> ErrorCode | None:
    try:
        auth.verify(token)
    except AuthError as exc:
        return exc.code
    return None


def message_of(auth: Authenticator, token: str) -> str:
    with pytest.raises(AuthError) as info:
        auth.verify(token)
    return info.value.message


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_forged(secret: bytes, header: dict[str, Any], claims: dict[str, Any]) -> str:
    """An attacker's HS256 token with any header and any bytes as the HMAC key (PyJWT will not sign with a PEM)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}."


@pytest.fixture(scope="module")
def issuers() -> dict[str, Issuer]:
    """One key of each kind (an RSA key takes ~0.1 s to make)."""
    return {alg: Issuer(f"key-{alg.lower()}", alg) for alg in ALGORITHMS}


@pytest.fixture
def keys_dir(tmp_path: Path, issuers: dict[str, Issuer]) -> Path:
    """A token_keys_dir with the EdDSA and RS256 keys; the ES256 key is in jwks_file."""
    issuers["EdDSA"].write_pem(tmp_path / "keys")
    issuers["RS256"].write_pem(tmp_path / "keys")
    return tmp_path / "keys"


@pytest.fixture
def jwks_file(tmp_path: Path, issuers: dict[str, Issuer]) -> Path:
    write_jwks(tmp_path / "jwks.json", issuers["ES256"])
    return tmp_path / "jwks.json"


@pytest.fixture
def auth(keys_dir: Path, jwks_file: Path) -> Authenticator:
    return Authenticator(SECRET, issuer_keys=IssuerKeys(keys_dir=keys_dir, jwks_file=jwks_file))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_each_algorithm_is_accepted_from_its_key(
    auth: Authenticator, issuers: dict[str, Issuer], algorithm: str
) -> None:
    identity = auth.verify(issuers[algorithm].token("alice"))
    assert (identity.name, identity.operator) == ("alice", False)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_each_algorithm_is_accepted_from_a_pem_file_and_from_a_jwks_file(
    tmp_path: Path, issuers: dict[str, Issuer], algorithm: str
) -> None:
    issuer = issuers[algorithm]
    issuer.write_pem(tmp_path / "dir")
    write_jwks(tmp_path / "jwks.json", issuer)
    for keys in (IssuerKeys(keys_dir=tmp_path / "dir"), IssuerKeys(jwks_file=tmp_path / "jwks.json")):
        assert Authenticator(SECRET, issuer_keys=keys).verify(issuer.token("carol")).name == "carol"
        assert [(k.kid, k.algorithm) for k in keys] == [(issuer.kid, algorithm)]


def test_the_broker_s_own_tokens_still_work_beside_an_issuer_s(auth: Authenticator) -> None:
    assert auth.verify(auth.issue("dave")).name == "dave"
    assert auth.verify(auth.issue("ops", operator=True)).operator


def refusals(issuers: dict[str, Issuer]) -> list[tuple[str, str, ErrorCode, str]]:
    """(case, token, code, what the message says) for every way an issuer-style token is refused."""
    ed, rs = issuers["EdDSA"], issuers["RS256"]
    now = int(time.time())
    claims = {"sub": "bob", "aud": "relay", "exp": now + 600}
    pem = rs.public_pem()
    stranger = Issuer(ed.kid)  # another key under the same kid: a forger's
    return [
        ("unknown-kid", Issuer("key-nobody-has").token(), INVALID, "unknown kid 'key-nobody-has'"),
        ("alg-none-with-kid", unsigned({"alg": "none", "kid": ed.kid}, claims), INVALID, "signs EdDSA, not 'none'"),
        ("alg-none-without-kid", unsigned({"alg": "none"}, claims), INVALID, "must be HS256, not 'none'"),
        (
            "hs256-signed-with-the-public-key-under-its-kid",
            hs256_forged(pem, {"alg": "HS256", "typ": "JWT", "kid": rs.kid}, claims),
            INVALID,
            "kid 'key-rs256' signs RS256, not 'HS256'",
        ),
        (
            "hs256-signed-with-the-public-key-without-kid",
            hs256_forged(pem, {"alg": "HS256", "typ": "JWT"}, claims),
            INVALID,
            "Signature verification failed",
        ),
        (
            "rs256-under-an-eddsa-kid",
            jwt.encode(claims, rs.key, algorithm="RS256", headers={"kid": ed.kid}),
            INVALID,
            "kid 'key-eddsa' signs EdDSA, not 'RS256'",
        ),
        ("eddsa-without-kid", jwt.encode(claims, ed.key, algorithm="EdDSA"), INVALID, "must be HS256, not 'EdDSA'"),
        ("signed-by-another-key", stranger.token(), INVALID, "Signature verification failed"),
        (
            "kid-not-a-string",
            unsigned({"alg": "EdDSA", "kid": 7}, claims) + "AAAA",
            INVALID,
            "Key ID header parameter must be a string",
        ),
        ("expired", ed.token(exp=now - 600), EXPIRED, "token expired"),
        ("expired-under-an-unknown-kid", Issuer("gone").token(exp=now - 600), INVALID, "unknown kid 'gone'"),
        ("sub-missing", ed.token(None), INVALID, 'Token is missing the "sub" claim'),
        ("aud-missing", ed.token(aud=None), INVALID, 'Token is missing the "aud" claim'),
        ("exp-missing", ed.token(exp=None), INVALID, 'Token is missing the "exp" claim'),
        ("aud-wrong", ed.token(aud="another-app"), INVALID, "Audience doesn't match"),
        ("sub-not-a-mailbox", ed.token("-bob"), INVALID, "token subject is not a valid mailbox id"),
        ("exp-as-text", ed.token(exp=str(now + 600)), INVALID, "the exp claim must be a number"),
        ("operator-role", ed.token(role="operator"), INVALID, "an issuer's token cannot be an operator's"),
    ]


def test_every_refusal_has_its_code_and_says_why(auth: Authenticator, issuers: dict[str, Issuer]) -> None:
    for case, token, code, says in refusals(issuers):
        assert code_of(auth, token) == code, case
        assert says in message_of(auth, token), case


def test_without_issuer_keys_a_token_with_a_kid_is_refused(issuers: dict[str, Issuer]) -> None:
    auth = Authenticator(SECRET)
    assert message_of(auth, issuers["EdDSA"].token()) == "invalid token: unknown kid 'key-eddsa'"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_each_refusal_has_the_same_code_over_every_transport(
    tmp_path: Path, keys_dir: Path, jwks_file: Path, issuers: dict[str, Issuer], transport: str
) -> None:
    with trio.fail_after(30):
        async with running_broker(tmp_path / "b", token_keys_dir=keys_dir, token_jwks_file=jwks_file) as broker:
            for case, token, code, _ in refusals(issuers):
                assert await attempt(broker, transport, token) == code, case
            for algorithm, issuer in issuers.items():
                assert await attempt(broker, transport, issuer.token("alice")) is None, algorithm
            assert await attempt(broker, transport, broker.auth.issue("alice")) is None


async def _still_open(client: RawClient) -> None:
    await client.send(Ping())
    await client.until(Pong)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("source", ["jwks", "pem-dir"])
async def test_rotation_add_move_retire_refuses_no_client(tmp_path: Path, transport: str, source: str) -> None:
    """The operator adds the new key, the issuer moves to it, the operator retires the old one: at every step
    every token the issuer has handed out and not yet seen expire is accepted, and open sessions stay open."""
    old, new = Issuer("2026-01"), Issuer("2026-02", "ES256")
    jwks, keys = tmp_path / "jwks.json", tmp_path / "keys"

    def publish(*issuers: Issuer) -> None:
        """What the operator does: the JWKS file rewritten in place, or PEM files added and removed."""
        if source == "jwks":
            write_jwks(jwks, *issuers)
            return
        for path in keys.glob("*.pem"):
            if path.stem not in {i.kid for i in issuers}:
                path.unlink()
        for issuer in issuers:
            if not (keys / f"{issuer.kid}.pem").exists():
                issuer.write_pem(keys)

    publish(old)
    setting = {"token_jwks_file": jwks} if source == "jwks" else {"token_keys_dir": keys}
    with trio.fail_after(30):
        async with running_broker(tmp_path / "b", **setting) as broker:
            assert broker.tcp_port is not None
            held, _ = await RawClient.login(broker.tcp_port, old.token("held"))  # a session across the rotation
            handed_out = [old.token("alice")]
            assert await attempt(broker, transport, handed_out[0]) is None

            publish(old, new)  # 1. the operator adds the new key
            assert await attempt(broker, transport, new.token("bob")) is None
            for token in handed_out:
                assert await attempt(broker, transport, token) is None

            handed_out.append(new.token("carol"))  # 2. the issuer moves to it; old tokens are still out there
            for token in handed_out:
                assert await attempt(broker, transport, token) is None

            handed_out.pop(0)  # 3. once the old key's last tokens have expired, the operator retires it
            publish(new)
            for token in handed_out:
                assert await attempt(broker, transport, token) is None
            assert await attempt(broker, transport, old.token("late")) == INVALID  # the retired key signs no more
            await _still_open(held)  # a session is judged when it opens, not again on a change of keys


def test_a_change_that_cannot_be_used_keeps_the_keys_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old, new = Issuer("a"), Issuer("b")
    write_jwks(tmp_path / "jwks.json", old)
    auth = Authenticator(SECRET, issuer_keys=IssuerKeys(jwks_file=tmp_path / "jwks.json"))
    (tmp_path / "jwks.json").write_text('{"keys": [')  # half written
    with caplog.at_level(logging.ERROR, logger="broker.issuer_keys"):
        assert auth.verify(old.token()).name == "bob"
        assert auth.verify(old.token()).name == "bob"
    assert [r.getMessage() for r in caplog.records] == [  # once per change, not once per token
        f"issuer keys not reloaded, keeping kids ['a']: {tmp_path / 'jwks.json'} is not valid JSON: "
        "Expecting value: line 1 column 11 (char 10)"
    ]
    (tmp_path / "jwks.json").unlink()  # gone: still the keys it had
    assert auth.verify(old.token()).name == "bob"
    write_jwks(tmp_path / "jwks.json", old, new)  # fixed
    assert auth.verify(new.token()).name == "bob"


def _pem(key: Any, private: bool = False) -> bytes:
    if private:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _bad_pems() -> list[tuple[str, bytes, str]]:
    ed = ed25519.Ed25519PrivateKey.generate()
    return [
        ("private", _pem(ed, private=True), "holds a private key: give the broker the public key only"),
        ("rsa-1024", _pem(rsa.generate_private_key(65537, 1024)), "is a 1024-bit RSA key: at least 2048 bits"),
        ("p-384", _pem(ec.generate_private_key(ec.SECP384R1())), "is an EC key on secp384r1: only P-256 (ES256)"),
        ("two-keys", _pem(ed) + _pem(ed25519.Ed25519PrivateKey.generate()), "must hold exactly one PEM public key"),
        ("not-pem", b"hello\n", "must hold exactly one PEM public key"),
        ("bad-base64", b"-----BEGIN PUBLIC KEY-----\nzz\n-----END PUBLIC KEY-----\n", "is not a PEM public key"),
    ]


@pytest.mark.parametrize(("name", "data", "says"), _bad_pems(), ids=[c[0] for c in _bad_pems()])
def test_a_pem_file_that_cannot_be_used_is_refused_at_start(tmp_path: Path, name: str, data: bytes, says: str) -> None:
    (tmp_path / f"{name}.pem").write_bytes(data)
    with pytest.raises(KeyFileError) as info:
        IssuerKeys(keys_dir=tmp_path)
    assert str(info.value).startswith(str(tmp_path / f"{name}.pem"))
    assert says in str(info.value)


def _ed_jwk(**changes: Any) -> dict[str, Any]:
    jwk = Issuer("k").jwk()
    jwk.update(changes)
    return {k: v for k, v in jwk.items() if v is not None}


BAD_JWKS = [
    ("not-json", "{", "is not valid JSON"),
    ("not-a-jwks", "[]", 'must be a JWKS document: a JSON object with a "keys" array'),
    ("keys-not-a-list", '{"keys": {}}', 'must be a JWKS document: a JSON object with a "keys" array'),
    ("key-not-an-object", '{"keys": [1]}', "key 0 must be a JSON object (a JWK)"),
    ("no-kid", {"keys": [_ed_jwk(kid=None)]}, 'key 0 has no "kid"'),
    ("private", {"keys": [_ed_jwk(d="AAAA")]}, "key 0 (kid 'k') holds private key material"),
    ("secret", {"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "k"}]}, "holds private key material"),
    ("enc-key", {"keys": [_ed_jwk(use="enc")]}, "has \"use\" 'enc': an issuer key must be a signing key"),
    ("other-alg", {"keys": [_ed_jwk(alg="Ed25519")]}, "has \"alg\" 'Ed25519': a OKP key signs EdDSA here"),
    ("other-curve", {"keys": [_ed_jwk(crv="Ed448")]}, "is kty 'OKP' crv 'Ed448': accepted are OKP Ed25519"),
    ("bad-x", {"keys": [_ed_jwk(x="!!")]}, "(kid 'k') is not a valid OKP key"),
    ("two-kids-alike", {"keys": [_ed_jwk(), _ed_jwk()]}, "kid 'k' is in both"),
]


@pytest.mark.parametrize(("name", "document", "says"), BAD_JWKS, ids=[c[0] for c in BAD_JWKS])
def test_a_jwks_file_that_cannot_be_used_is_refused_at_start(
    tmp_path: Path, name: str, document: str | dict[str, Any], says: str
) -> None:
    path = tmp_path / f"{name}.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    with pytest.raises(KeyFileError, match=str(path)) as info:
        IssuerKeys(jwks_file=path)
    assert says in str(info.value)


def test_a_kid_in_both_sources_and_missing_sources_are_refused_at_start(tmp_path: Path) -> None:
    issuer = Issuer("same")
    issuer.write_pem(tmp_path / "keys")
    write_jwks(tmp_path / "jwks.json", issuer)
    with pytest.raises(
        KeyFileError, match=r"kid 'same' is in both .*same\.pem and .*jwks\.json: each kid names one key"
    ):
        IssuerKeys(keys_dir=tmp_path / "keys", jwks_file=tmp_path / "jwks.json")
    with pytest.raises(KeyFileError, match=r"token_keys_dir .*nowhere: No such file or directory"):
        IssuerKeys(keys_dir=tmp_path / "nowhere")
    with pytest.raises(KeyFileError, match=r"nothing\.json: No such file or directory"):
        IssuerKeys(jwks_file=tmp_path / "nothing.json")


def test_only_visible_pem_files_are_keys(tmp_path: Path) -> None:
    Issuer("visible").write_pem(tmp_path)
    (tmp_path / ".visible.pem.swp").write_bytes(b"editor junk")
    (tmp_path / ".hidden.pem").write_bytes(b"editor junk")
    (tmp_path / "README").write_text("keys for relay\n")
    assert [k.kid for k in IssuerKeys(keys_dir=tmp_path)] == ["visible"]


def test_serve_with_an_unusable_key_file_exits_2_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "jwks.json").write_text("{}")
    argv = ["serve", "--data-dir", str(tmp_path / "data"), "--tcp-port", "0", "--ws-port", "0", "--http-port", "0"]
    assert main([*argv, "--token-jwks-file", str(tmp_path / "jwks.json")]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"relay-broker: configuration error: {tmp_path / 'jwks.json'} must be a JWKS document: "
        'a JSON object with a "keys" array\n'
    )


async def test_broker_reads_its_issuer_keys_from_the_config(tmp_path: Path, issuers: dict[str, Issuer]) -> None:
    write_jwks(tmp_path / "jwks.json", *issuers.values())
    with trio.fail_after(10):
        async with running_broker(tmp_path / "b", token_jwks_file=tmp_path / "jwks.json") as broker:
            assert isinstance(broker, Broker)
            assert sorted(k.kid for k in broker.auth.issuer_keys) == sorted(i.kid for i in issuers.values())
            assert broker.tcp_port is not None
            client, welcome = await RawClient.login(broker.tcp_port, issuers["ES256"].token("erin"))
            assert welcome.mailbox == "erin"
            await _still_open(client)


def test_an_unchanged_source_is_not_read_again(tmp_path: Path) -> None:
    """A token check costs a stat per source while nothing changes: the file is parsed once."""
    issuer = Issuer("k")
    write_jwks(tmp_path / "jwks.json", issuer)
    keys = IssuerKeys(jwks_file=tmp_path / "jwks.json")
    first = keys.get("k")
    os.utime(tmp_path / "jwks.json", ns=(1, os.stat(tmp_path / "jwks.json").st_mtime_ns))  # atime only
    assert keys.get("k") is first
    write_jwks(tmp_path / "jwks.json", issuer)  # same key, new file content timestamp: read again
    os.utime(tmp_path / "jwks.json", ns=(1, 12345))
    again = keys.get("k")
    assert again is not first and again is not None and again.kid == "k"
