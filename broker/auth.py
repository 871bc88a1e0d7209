"""Authentication: signed tokens (JWT, HS256) naming a mailbox, and the secret that signs them.

The broker creates a random 32-byte secret in its data directory on first start (file
mode 0600); ``relay-broker token`` signs with the same file, so the default set-up is
secure with no configuration. Verification is PyJWT's: signature, ``aud`` ``"relay"`` (or an
array holding it), ``exp`` required and in the future, ``iat``/``nbf`` not in the future, each
time with a leeway for clock skew (``token_leeway_s``); on top of PyJWT, the time claims must be
JSON numbers (PyJWT would take the string ``"1999999999"``) and ``sub`` a valid mailbox id.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import jwt

from wire import ErrorCode, is_valid_mailbox_id

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
    """Who is on a connection: a mailbox id, or an operator (who has no mailbox)."""

    name: str
    operator: bool = False


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
    """Issues and verifies tokens with one secret."""

    def __init__(self, secret: bytes, *, leeway_s: float = DEFAULT_LEEWAY_S) -> None:
        if len(secret) < 32:
            raise ValueError("the signing secret must be at least 32 bytes")
        if leeway_s < 0:
            raise ValueError("the token leeway must not be negative")
        self._secret = secret
        self.leeway_s = leeway_s

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

        A token whose claims are ill-typed is INVALID_TOKEN even if it has also expired.
        """
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise AuthError(ErrorCode.INVALID_TOKEN, f"invalid token: {exc}") from None
        for claim in TIME_CLAIMS:
            value = unverified.get(claim)
            if claim in unverified and (type(value) not in (int, float) or value != value):
                raise AuthError(ErrorCode.INVALID_TOKEN, f"invalid token: the {claim} claim must be a number")
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
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
        return Identity(sub, operator=claims.get("role") == "operator")
