"""Authentication: signed tokens (JWT) naming a mailbox, the secret that signs the broker's own, and the public keys
of an application's issuer.

The broker creates a random 32-byte secret in its data directory on first start (file
mode 0600); ``relay-broker token`` signs with the same file (HS256), so the default set-up is
secure with no configuration. A deployment's own backend signs instead with a private key whose public half the
broker reads (``token_keys_dir``, ``token_jwks_file``; :mod:`broker.issuer_keys`): EdDSA, RS256 or ES256.

Which key checks a token is decided by its header alone, in :meth:`Authenticator.verify`: a token without ``kid``
is the broker's own (HS256 with the secret), a token with one is the issuer's (the key of that kid, with the one
algorithm that key signs with). The header's ``alg`` must be that algorithm, so neither ``alg: none`` nor HS256
"signed" with a public key can pass. Verification is PyJWT's: signature, ``aud`` ``"relay"`` (or an
array holding it), ``exp`` required and in the future, ``iat``/``nbf`` not in the future, each
time with a leeway for clock skew (``token_leeway_s``); on top of PyJWT, the time claims must be
JSON numbers (PyJWT would take the string ``"1999999999"``) and ``sub`` a valid mailbox id. An issuer's tokens are
mailbox tokens: operator tokens come from the broker's secret only.
"""

from __future__ import annotations

import math
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import jwt

from wire import ErrorCode, is_valid_mailbox_id

from .config import BrokerConfig
from .issuer_keys import IssuerKeys, PublicKey

__all__ = ["AuthError", "Authenticator", "Identity", "load_or_create_secret"]

AUDIENCE = "relay"
ALGORITHM = "HS256"
SECRET_FILE = "secret"
DEFAULT_TOKEN_LIFETIME_S = 30 * 24 * 3600
DEFAULT_LEEWAY_S = 60.0
"""Clock skew allowed between the token issuer and the broker, both ways, when judging ``exp``,
``iat`` and ``nbf``: an issuer whose clock runs a few seconds ahead must not be refused."""
TIME_CLAIMS = ("exp", "iat", "nbf")


class AuthError(Exception):
    """A token was refused; ``code`` is INVALID_TOKEN or TOKEN_EXPIRED."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is on a connection: a mailbox id, or an operator (who has no mailbox); and until when its token proves it.

    ``ends_at`` (Unix seconds) is the token's ``exp`` plus the leeway: the moment a session it opened ends with
    TOKEN_EXPIRED unless a REFRESH has brought a newer token.
    """

    name: str
    operator: bool = False
    ends_at: float = math.inf

    def same_as(self, other: Identity) -> bool:
        """Whether ``other`` names the same mailbox (or operator) in the same role, whatever its expiry."""
        return self.name == other.name and self.operator == other.operator

    def seconds_left(self, now: float) -> int:
        """Whole seconds (rounded down, at least 0) from ``now`` until the token's session ends."""
        return max(0, math.floor(self.ends_at - now))


def load_or_create_secret(data_dir: Path) -> bytes:
    """The signing secret in ``data_dir``, created (32 random bytes, mode 0600) if absent."""
    path = data_dir / SECRET_FILE
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret = secrets.token_bytes(32)
    # O_EXCL: if two processes race, the loser reads the winner's secret.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return bytes.fromhex(path.read_text().strip())
    with os.fdopen(fd, "w") as f:
        f.write(secret.hex() + "\n")
    return secret


class Authenticator:
    """Issues tokens with the broker's secret; verifies those and an application issuer's (``issuer_keys``)."""

    def __init__(
        self, secret: bytes, *, issuer_keys: IssuerKeys | None = None, leeway_s: float = DEFAULT_LEEWAY_S
    ) -> None:
        if len(secret) < 32:
            raise ValueError("the signing secret must be at least 32 bytes")
        if leeway_s < 0:
            raise ValueError("the token leeway must not be negative")
        self._secret = secret
        self.issuer_keys = issuer_keys if issuer_keys is not None else IssuerKeys()
        self.leeway_s = leeway_s

    @classmethod
    def from_config(cls, config: BrokerConfig) -> Authenticator:
        """The broker's: the secret in ``data_dir`` (created if absent) and the configured issuer keys.

        Raises KeyFileError (a ConfigError) if an issuer key source cannot be used."""
        return cls(
            load_or_create_secret(config.data_dir),
            issuer_keys=IssuerKeys(keys_dir=config.token_keys_dir, jwks_file=config.token_jwks_file),
            leeway_s=config.token_leeway_s,
        )

    def issue(self, name: str, *, operator: bool = False, lifetime_s: float = DEFAULT_TOKEN_LIFETIME_S) -> str:
        """A token for mailbox ``name`` (or operator ``name``), valid for ``lifetime_s`` seconds."""
        if not is_valid_mailbox_id(name):
            raise ValueError(f"{name!r} is not a valid mailbox id (1-64 of A-Z a-z 0-9 . _ @ + -)")
        now = int(time.time())
        claims: dict[str, object] = {"sub": name, "aud": AUDIENCE, "iat": now, "exp": now + int(lifetime_s)}
        if operator:
            claims["role"] = "operator"
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    def verify(self, token: str) -> Identity:
        """The identity a token proves. Raises AuthError (INVALID_TOKEN or TOKEN_EXPIRED).

        A token whose claims are ill-typed, or whose kid or alg is wrong, is INVALID_TOKEN even if it has also expired.
        """
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise AuthError(ErrorCode.INVALID_TOKEN, f"invalid token: {exc}") from None
        key, algorithm = self._key_for(header)
        for claim in TIME_CLAIMS:
            value = unverified.get(claim)
            if claim in unverified and (type(value) not in (int, float) or value != value):
                raise AuthError(ErrorCode.INVALID_TOKEN, f"invalid token: the {claim} claim must be a number")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=AUDIENCE,
                leeway=self.leeway_s,
                options={"require": ["exp", "sub", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(ErrorCode.TOKEN_EXPIRED, "token expired") from None
        except jwt.PyJWTError as exc:
            raise AuthError(ErrorCode.INVALID_TOKEN, f"invalid token: {exc}") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not is_valid_mailbox_id(sub):
            raise AuthError(ErrorCode.INVALID_TOKEN, "token subject is not a valid mailbox id")
        operator = claims.get("role") == "operator"
        if operator and header.get("kid") is not None:
            raise AuthError(
                ErrorCode.INVALID_TOKEN,
                "invalid token: an issuer's token cannot be an operator's (use relay-broker token NAME --operator)",
            )
        return Identity(sub, operator=operator, ends_at=float(claims["exp"]) + self.leeway_s)

    def _key_for(self, header: dict[str, object]) -> tuple[bytes | PublicKey, str]:
        """The key and the one algorithm that may check a token with this header. Raises AuthError (INVALID_TOKEN)."""
        alg, kid = header.get("alg"), header.get("kid")
        if kid is None:
            if alg != ALGORITHM:
                raise AuthError(
                    ErrorCode.INVALID_TOKEN,
                    f"invalid token: a token without kid is the broker's own and must be {ALGORITHM}, not {alg!r:.40}",
                )
            return self._secret, ALGORITHM
        if not isinstance(kid, str):
            raise AuthError(ErrorCode.INVALID_TOKEN, "invalid token: kid must be a string")
        issuer_key = self.issuer_keys.get(kid)
        if issuer_key is None:
            raise AuthError(ErrorCode.INVALID_TOKEN, f"invalid token: unknown kid {kid!r:.80}")
        if alg != issuer_key.algorithm:
            raise AuthError(
                ErrorCode.INVALID_TOKEN,
                f"invalid token: kid {kid!r:.80} signs {issuer_key.algorithm}, not {alg!r:.40}",
            )
        return issuer_key.key, issuer_key.algorithm
