"""The public keys of an application's token issuer, by ``kid``: PEM files in a directory and a JWKS file.

Theory of operation. A deployment's own backend mints tokens with a private key and gives the broker only the
public half. :class:`IssuerKeys` holds those public keys by key id (``kid``, the token header's), each with the one
algorithm its type signs with: an Ed25519 key ``EdDSA``, an RSA key (at least 2048 bits) ``RS256``, a P-256 key
``ES256``. The key decides the algorithm, never the token, so a token cannot pick a weaker or a confused one
(``alg: none``, or HS256 with a public key as the HMAC secret). Two sources, either or both:

- ``token_keys_dir``: a directory of PEM public keys (``-----BEGIN PUBLIC KEY-----``), one key per file named
  ``KID.pem``; other files are ignored;
- ``token_jwks_file``: a JWKS document (RFC 7517, ``{"keys": [...]}``), each key with its own ``kid``.

Several keys are valid at once, which is how an operator rotates: add the new key, move the issuer to it, retire
the old one. The broker never needs a restart for that: each :meth:`IssuerKeys.get` looks at the sources (a stat per
file and a directory listing, a few microseconds) and reads them again when any of them changed (name, size,
modification time or inode). A source that cannot be read or holds an unusable key makes the whole change refused:
the broker logs why and keeps the keys it had, so a half-written or mistaken file never locks every client out. At
start, the same problem is a :class:`KeyFileError` and the broker does not start.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .config import ConfigError

__all__ = ["ALGORITHMS", "IssuerKey", "IssuerKeys", "KeyFileError", "PublicKey", "load_jwks", "load_pem"]

log = logging.getLogger(__name__)

PublicKey = ed25519.Ed25519PublicKey | rsa.RSAPublicKey | ec.EllipticCurvePublicKey

ALGORITHMS = ("EdDSA", "RS256", "ES256")
"""The algorithms an issuer's key may sign with, one per key type."""
MIN_RSA_BITS = 2048
"""Smaller RSA keys are refused (NIST SP 800-131A: 1024-bit RSA is no longer acceptable for signatures)."""
PEM_SUFFIX = ".pem"

_JWK_ALGORITHM: dict[tuple[object, object], str] = {
    ("OKP", "Ed25519"): "EdDSA",
    ("RSA", None): "RS256",
    ("EC", "P-256"): "ES256",
}
"""A JWK's (kty, crv) -> the one algorithm its key signs with."""
_JWK_PRIVATE = ("d", "p", "q", "dp", "dq", "qi", "k")
"""JWK members that hold private (or secret) key material."""


class KeyFileError(ConfigError):
    """An issuer key source cannot be used: unreadable, malformed, a private key, or a key of a type or size the
    broker does not accept. The message names the file (and the kid) and what is wrong."""


@dataclass(frozen=True, slots=True)
class IssuerKey:
    """One public key of an application's issuer."""

    kid: str
    algorithm: str
    """``EdDSA``, ``RS256`` or ``ES256``: the only algorithm a token with this ``kid`` may use."""
    key: PublicKey
    source: str
    """Where it was read from, for messages: the PEM file, or the JWKS file."""


def _algorithm(key: object, where: str) -> str:
    """The algorithm a public key signs with. Raises KeyFileError for a private key or an unaccepted type or size."""
    if isinstance(key, ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"{where} is a private key: give the broker the public key only")
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "EdDSA"
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise KeyFileError(f"{where} is a {key.key_size}-bit RSA key: at least {MIN_RSA_BITS} bits are required")
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise KeyFileError(f"{where} is an EC key on {key.curve.name}: only P-256 (ES256) is accepted")
        return "ES256"
    raise KeyFileError(f"{where} is not an Ed25519, RSA or P-256 public key (EdDSA, RS256, ES256)")


def load_pem(path: Path, kid: str) -> IssuerKey:
    """The public key in a PEM file. Raises KeyFileError."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: {exc.strerror or exc}") from None
    if b"PRIVATE KEY-----" in data:
        raise KeyFileError(f"{path} holds a private key: give the broker the public key only")
    if data.count(b"-----BEGIN ") != 1:
        raise KeyFileError(f"{path} must hold exactly one PEM public key (-----BEGIN PUBLIC KEY-----)")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not a PEM public key (-----BEGIN PUBLIC KEY-----): {exc}") from None
    return IssuerKey(kid, _algorithm(key, str(path)), key, str(path))  # type: ignore[arg-type]


def load_jwks(path: Path) -> list[IssuerKey]:
    """The keys of a JWKS file, in order. Raises KeyFileError for the first thing wrong."""
    try:
        document = json.loads(path.read_bytes())
    except OSError as exc:
        raise KeyFileError(f"{path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # JSONDecodeError and bad UTF-8
        raise KeyFileError(f"{path} is not valid JSON: {exc}") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise KeyFileError(f'{path} must be a JWKS document: a JSON object with a "keys" array')
    return [_jwk(entry, f"{path} key {i}", str(path)) for i, entry in enumerate(entries)]


def _jwk(entry: object, where: str, source: str) -> IssuerKey:
    if not isinstance(entry, dict):
        raise KeyFileError(f"{where} must be a JSON object (a JWK)")
    kid = entry.get("kid")
    if not isinstance(kid, str) or not kid:
        raise KeyFileError(f'{where} has no "kid": every key needs one (tokens name their key by it)')
    where = f"{where} (kid {kid!r})"
    if any(member in entry for member in _JWK_PRIVATE):
        raise KeyFileError(f"{where} holds private key material: give the broker the public key only")
    if entry.get("use", "sig") != "sig":
        raise KeyFileError(f'{where} has "use" {entry["use"]!r}: an issuer key must be a signing key ("sig")')
    kty, crv = entry.get("kty"), entry.get("crv")
    algorithm = _JWK_ALGORITHM.get((kty, None if kty == "RSA" else crv))
    if algorithm is None:
        raise KeyFileError(
            f"{where} is kty {kty!r} crv {crv!r}: accepted are OKP Ed25519 (EdDSA), RSA (RS256) and EC P-256 (ES256)"
        )
    if entry.get("alg", algorithm) != algorithm:
        raise KeyFileError(f'{where} has "alg" {entry["alg"]!r}: a {kty} key signs {algorithm} here')
    try:
        key = jwt.PyJWK(entry, algorithm=algorithm).key
    except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
        raise KeyFileError(f"{where} is not a valid {kty} key: {exc}") from None
    _algorithm(key, where)  # the size rule, the same as for a PEM key
    return IssuerKey(kid, algorithm, key, source)


_State = tuple[tuple[str, int, int, int] | tuple[str, str], ...]
"""What the sources look like on disk: (path, size, mtime_ns, inode) per file, or (path, error) if unreadable."""


class IssuerKeys:
    """The issuer's public keys by kid, from ``keys_dir`` (``KID.pem`` files) and ``jwks_file``.

    Made with neither, it holds no key. Raises KeyFileError if a source cannot be used now; later changes that
    cannot be used are logged and leave the keys as they were (module docstring).
    """

    def __init__(self, *, keys_dir: Path | None = None, jwks_file: Path | None = None) -> None:
        self.keys_dir = keys_dir
        self.jwks_file = jwks_file
        self._state = self._look()
        self._keys = self._load()
        if keys_dir is not None or jwks_file is not None:  # the zero-configuration default says nothing
            log.info("issuer keys: %s", self.describe())

    def get(self, kid: str) -> IssuerKey | None:
        """The key named ``kid`` (after reading the sources again if they changed), or None."""
        self.refresh()
        return self._keys.get(kid)

    def refresh(self) -> None:
        """Read the sources again if they changed since they were last read; on failure keep the keys, log why."""
        if self.keys_dir is None and self.jwks_file is None:
            return
        state = self._look()
        if state == self._state:
            return
        self._state = state
        try:
            self._keys = self._load()
        except KeyFileError as exc:
            log.error("issuer keys not reloaded, keeping kids %s: %s", sorted(self._keys), exc)
            return
        log.info("issuer keys reloaded: %s", self.describe())

    def __iter__(self) -> Iterator[IssuerKey]:
        return iter(self._keys.values())

    def describe(self) -> str:
        """``kid (algorithm), ...`` or ``none``."""
        return ", ".join(f"{k.kid} ({k.algorithm})" for k in self._keys.values()) or "none"

    def _pem_files(self) -> list[Path]:
        """The ``*.pem`` files of the directory, sorted (hidden files, e.g. an editor's, left out)."""
        assert self.keys_dir is not None
        names = sorted(os.listdir(self.keys_dir))
        return [self.keys_dir / n for n in names if n.endswith(PEM_SUFFIX) and not n.startswith(".")]

    def _look(self) -> _State:
        state: list[tuple[str, int, int, int] | tuple[str, str]] = []
        paths: list[Path] = []
        if self.keys_dir is not None:
            try:
                paths += self._pem_files()
            except OSError as exc:
                state.append((str(self.keys_dir), str(exc)))
        if self.jwks_file is not None:
            paths.append(self.jwks_file)
        for path in paths:
            try:
                st = path.stat()
            except OSError as exc:
                state.append((str(path), str(exc)))
            else:
                state.append((str(path), st.st_size, st.st_mtime_ns, st.st_ino))
        return tuple(state)

    def _load(self) -> Mapping[str, IssuerKey]:
        keys: list[IssuerKey] = []
        if self.keys_dir is not None:
            try:
                files = self._pem_files()
            except OSError as exc:
                raise KeyFileError(f"token_keys_dir {self.keys_dir}: {exc.strerror or exc}") from None
            keys += [load_pem(path, path.name.removesuffix(PEM_SUFFIX)) for path in files]
        if self.jwks_file is not None:
            keys += load_jwks(self.jwks_file)
        out: dict[str, IssuerKey] = {}
        for key in keys:
            if (other := out.get(key.kid)) is not None:
                raise KeyFileError(
                    f"kid {key.kid!r} is in both {other.source} and {key.source}: each kid names one key"
                )
            out[key.kid] = key
        return out
