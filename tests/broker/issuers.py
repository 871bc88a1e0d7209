"""An application's token issuer for tests: a fresh key pair, its public key as a PEM file or a JWK, tokens signed
with it; and one way to present a token to a broker over each transport (TCP, WebSocket, HTTP)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from broker.auth import load_or_create_secret
from broker.server import Broker
from wire import Error, ErrorCode, Hello, Welcome

from ..websocket.wsclient import open_ws
from .raw import RawClient

PrivateKey = ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
TRANSPORTS = ("tcp", "ws", "http")


def expiring_token(broker: Broker, name: str, seconds: float, *, operator: bool = False) -> str:
    """A token signed with ``broker``'s own secret that expires ``seconds`` from now, to the fraction of a second
    (``Authenticator.issue`` makes whole-second tokens): for tests of session expiry and refresh (rule 22)."""
    now = time.time()
    claims: dict[str, Any] = {"sub": name, "aud": "relay", "iat": int(now), "exp": now + seconds}
    if operator:
        claims["role"] = "operator"
    return jwt.encode(claims, load_or_create_secret(broker.config.data_dir), algorithm="HS256")


def private_key(algorithm: str) -> PrivateKey:
    if algorithm == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    raise ValueError(algorithm)


@dataclass
class Issuer:
    """One key of an application's issuer."""

    kid: str
    algorithm: str = "EdDSA"
    key: PrivateKey = field(init=False)

    def __post_init__(self) -> None:
        self.key = private_key(self.algorithm)

    def token(self, sub: str | None = "bob", *, headers: dict[str, Any] | None = None, **claims: Any) -> str:
        """A token for ``sub``, valid 10 minutes; a claim given as None is left out."""
        now = int(time.time())
        base: dict[str, Any] = {"sub": sub, "aud": "relay", "iat": now, "exp": now + 600, **claims}
        payload = {k: v for k, v in base.items() if v is not None}
        return jwt.encode(payload, self.key, algorithm=self.algorithm, headers={"kid": self.kid, **(headers or {})})

    def public_pem(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def jwk(self) -> dict[str, Any]:
        algorithm = jwt.get_algorithm_by_name(self.algorithm)
        jwk: dict[str, Any] = json.loads(algorithm.to_jwk(self.key.public_key()))
        return {**jwk, "kid": self.kid, "alg": self.algorithm, "use": "sig"}

    def write_pem(self, keys_dir: Path) -> Path:
        keys_dir.mkdir(parents=True, exist_ok=True)
        path = keys_dir / f"{self.kid}.pem"
        path.write_bytes(self.public_pem())
        return path


def write_jwks(path: Path, *issuers: Issuer) -> None:
    path.write_text(json.dumps({"keys": [i.jwk() for i in issuers]}))


async def attempt(broker: Broker, transport: str, token: str) -> ErrorCode | None:
    """Present ``token`` over ``transport``: None if the broker accepts it, else the code it refuses it with
    (over TCP and WebSocket a closing ERROR in answer to HELLO; over HTTP a 401 with the code in the body)."""
    if transport == "tcp":
        assert broker.tcp_port is not None
        client = await RawClient.open(broker.tcp_port)
        try:
            await client.send(Hello(version=1, token=token))
            return _outcome(await client.next())
        finally:
            await client.aclose()
    if transport == "ws":
        async with open_ws(broker.ws_port) as ws:
            await ws.send(Hello(version=1, token=token))
            return _outcome(await ws.next())
    assert transport == "http", transport
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{broker.http_port}", timeout=10) as http:
        r = await http.get("/relay/pending", headers={"Authorization": f"Bearer {token}"})
    if r.status_code == 200:
        return None
    assert r.status_code == 401, r.text
    return ErrorCode(r.json()["code"])


def _outcome(frame: object) -> ErrorCode | None:
    if isinstance(frame, Welcome):
        return None
    assert isinstance(frame, Error) and frame.close, frame
    return ErrorCode(frame.code)
