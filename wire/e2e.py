"""End-to-end encryption of message bodies: keys, key records, envelopes (docs/e2e.md).

Theory of operation: this module is sans-IO and holds no state beyond two bounded caches
of parsed public keys. A device has an Ed25519 *identity* key (:class:`Identity`, what
contacts pin) and an X25519 *encryption* key (:class:`EncryptionKey`, rotatable, named by
its ``kid``). Its directory entry (:class:`~wire.frames.KeyRecord`) carries both public
keys, the ``ek`` signed by the ``ik`` for one mailbox (:func:`make_key_record`,
:func:`verify_key_record`).

:func:`seal` turns a body into an envelope for one SEND to any number of recipients: the
padded body is encrypted once with AES-256-GCM under a fresh content key (CEK), the CEK is
wrapped per recipient with HPKE (RFC 9180, base mode, X25519 / HKDF-SHA256 / AES-128-GCM)
to that recipient's ``ek``, and the signed part ``s`` (sender, id, recipients, the
sender's ``ik``, the wrapped keys, the nonce and the ciphertext) is signed with the
sender's identity key, so no recipient can alter or forge content towards the others.
:func:`open_envelope` checks the steps of docs/e2e.md "Opening" in order and raises
:class:`E2EError` with the step's reason; :func:`peek` is its step 2 alone, for a caller
that looks at the header (and does the sender-key step) before opening.

Every byte string on the wire is the deterministic CBOR encoding of what it decodes to
(map keys in the documented order); decoding is strict (wire.codec's rules) and also
checks that, so there is exactly one encoding of each envelope.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Final

import cbor2
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pyhpke import AEADId, CipherSuite, KDFId, KEMId, KEMKeyInterface, KEMKeyPair
from pyhpke.exceptions import PyHPKEError

from .codec import decode_item
from .errors import RemoteProtocolError
from .frames import KEY_BYTES, SIG_BYTES, KeyRecord

__all__ = [
    "DEFAULT_PAD_BLOCK",
    "E2E_MAGIC",
    "REASONS",
    "E2EError",
    "EncryptionKey",
    "Identity",
    "KeyRecord",
    "Peeked",
    "SealRandomness",
    "fingerprint",
    "is_envelope",
    "key_id",
    "make_key_record",
    "open_envelope",
    "peek",
    "safety_number",
    "seal",
    "verify_key_record",
]

E2E_MAGIC: Final = b"RE2E"
"""The first 4 bytes of every encrypted body; a body without them is a plaintext message."""
DEFAULT_PAD_BLOCK: Final = 256
"""Padded bodies are a multiple of this many bytes (sizes are visible only to this granularity)."""

REASONS: Final = (
    "plaintext",
    "malformed",
    "mismatch",
    "not_for_me",
    "no_sender_key",
    "key_changed",
    "bad_signature",
    "unknown_key",
    "decrypt_failed",
)
"""Every :attr:`E2EError.reason`, in the order of docs/e2e.md "Opening" (``no_sender_key`` is the caller's)."""

ENVELOPE_VERSION: Final = 1
CEK_BYTES: Final = 32
"""AES-256-GCM content key."""
NONCE_BYTES: Final = 12
"""AES-GCM nonce."""
ENC_BYTES: Final = 32
"""HPKE ``enc`` for DHKEM(X25519): the ephemeral public key."""
WRAPPED_BYTES: Final = CEK_BYTES + 16
"""HPKE ciphertext of the CEK: the CEK and the AES-128-GCM tag."""
KID_HEX_BYTES: Final = 8
"""A reference kid is the lowercase hex of this many leading bytes of SHA-256(ek)."""

_KEY_LABEL: Final = "relay-e2e-key/1"
_MSG_LABEL: Final = "relay-e2e-msg/1"
_WRAP_LABEL: Final = "relay-e2e-wrap/1"
_FP_LABEL: Final = "relay-e2e-fp/1"
_BODY_AAD: Final = b"relay-e2e-body/1"

_SUITE: Final = CipherSuite.new(KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.AES128_GCM)
"""HPKE suite 0x0020 / 0x0001 / 0x0001."""

_ENVELOPE_KEYS: Final = ("v", "s", "sig")
_S_KEYS: Final = ("from", "id", "to", "ik", "keys", "n", "ct")
_ENTRY_KEYS: Final = ("to", "kid", "enc", "ct")

_PUBLIC_KEY_CACHE: Final = 4096
"""Parsed public keys kept per kind: a client talks to far fewer keys, and each entry is ~100 bytes."""

_dumps = cbor2.dumps


class E2EError(Exception):
    """An envelope could not be opened (or is not one); ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ---------------------------------------------------------------- keys


@dataclass(frozen=True, slots=True)
class Identity:
    """An Ed25519 identity key: ``seed`` (32 bytes, private) and its ``public`` key (32 bytes, raw).

    ``Identity(seed)`` or :meth:`from_seed` derives the public key; raises ValueError on a seed
    that is not 32 bytes.
    """

    seed: bytes = field(repr=False)
    public: bytes = field(init=False)
    _key: Ed25519PrivateKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if type(self.seed) is not bytes or len(self.seed) != KEY_BYTES:
            raise ValueError(f"an identity seed is {KEY_BYTES} bytes")
        key = Ed25519PrivateKey.from_private_bytes(self.seed)
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "public", key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))

    @classmethod
    def generate(cls) -> Identity:
        """A new random identity."""
        return cls(os.urandom(KEY_BYTES))

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """The identity of a stored seed."""
        return cls(seed)

    def sign(self, data: bytes) -> bytes:
        """The Ed25519 signature (64 bytes) of ``data``."""
        return self._key.sign(data)


@dataclass(frozen=True, slots=True)
class EncryptionKey:
    """An X25519 encryption key: ``private`` (32 bytes), its ``public`` key (32 bytes, raw) and ``kid``.

    ``EncryptionKey(private)`` or :meth:`from_private` derives the rest; raises ValueError on
    a private key that is not 32 bytes.
    """

    private: bytes = field(repr=False)
    public: bytes = field(init=False)
    kid: str = field(init=False)
    _kem: KEMKeyInterface = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if type(self.private) is not bytes or len(self.private) != KEY_BYTES:
            raise ValueError(f"an encryption private key is {KEY_BYTES} bytes")
        public = (
            X25519PrivateKey.from_private_bytes(self.private).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        )
        object.__setattr__(self, "public", public)
        object.__setattr__(self, "kid", key_id(public))
        object.__setattr__(self, "_kem", _SUITE.kem.deserialize_private_key(self.private))

    @classmethod
    def generate(cls) -> EncryptionKey:
        """A new random encryption key."""
        return cls(X25519PrivateKey.generate().private_bytes_raw())

    @classmethod
    def from_private(cls, private: bytes) -> EncryptionKey:
        """The encryption key of a stored private key."""
        return cls(private)


def key_id(ek_public: bytes) -> str:
    """The reference ``kid`` of an X25519 public key: hex of the first 8 bytes of its SHA-256 (16 characters)."""
    return hashlib.sha256(ek_public).digest()[:KID_HEX_BYTES].hex()


@lru_cache(maxsize=_PUBLIC_KEY_CACHE)
def _ed25519_public(ik: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(ik)


@lru_cache(maxsize=_PUBLIC_KEY_CACHE)
def _x25519_public(ek: bytes) -> KEMKeyInterface:
    return _SUITE.kem.deserialize_public_key(ek)


def _verify(ik: bytes, sig: bytes, data: bytes) -> bool:
    try:
        _ed25519_public(ik).verify(sig, data)
    except (InvalidSignature, ValueError):  # ValueError: ik is not a public key at all
        return False
    return True


def make_key_record(mailbox: str, identity: Identity, ek: EncryptionKey) -> KeyRecord:
    """``mailbox``'s directory record for ``ek``, signed by ``identity``."""
    sig = identity.sign(_dumps([_KEY_LABEL, mailbox, ek.kid, ek.public]))
    return KeyRecord(ik=identity.public, kid=ek.kid, ek=ek.public, sig=sig)


def verify_key_record(mailbox: str, record: KeyRecord) -> bool:
    """Whether ``record.sig`` is ``record.ik``'s signature of ``record``'s ``kid`` and ``ek`` for ``mailbox``."""
    return _verify(record.ik, record.sig, _dumps([_KEY_LABEL, mailbox, record.kid, record.ek]))


# ---------------------------------------------------------------- fingerprints


def fingerprint(mailbox: str, ik: bytes) -> str:
    """Six groups of five digits naming ``ik`` as ``mailbox``'s identity key ("01234 56789 ...")."""
    digest = hashlib.sha256(_dumps([_FP_LABEL, mailbox, ik])).digest()
    return " ".join(f"{int.from_bytes(digest[i : i + 5], 'big') % 100000:05d}" for i in range(0, 30, 5))


def safety_number(a: str, ik_a: bytes, b: str, ik_b: bytes) -> str:
    """The two fingerprints ordered by mailbox id (code point order): the same twelve groups for both people."""
    first, second = sorted(((a, ik_a), (b, ik_b)), key=lambda pair: pair[0])
    return f"{fingerprint(*first)} {fingerprint(*second)}"


# ---------------------------------------------------------------- sealing


@dataclass(frozen=True, slots=True, kw_only=True)
class SealRandomness:
    """Fixed randomness for :func:`seal` (tests and vectors only): the CEK (32 bytes), the AES-GCM
    nonce (12 bytes) and one X25519 ephemeral private key (32 bytes) per distinct recipient, in order."""

    cek: bytes
    nonce: bytes
    ephemeral: Sequence[bytes]


def _pad(body: bytes, block: int) -> bytes:
    """ISO/IEC 7816-4 padding: ``body``, 0x80, then zeros to the next multiple of ``block``."""
    zeros = -(len(body) + 1) % block
    return b"".join((body, b"\x80", bytes(zeros)))


def _unpad(padded: bytes) -> bytes:
    stripped = padded.rstrip(b"\x00")
    if not stripped.endswith(b"\x80"):
        raise E2EError("malformed", "bad padding")
    return stripped[:-1]


def _ephemeral_pair(private: bytes) -> KEMKeyPair:
    sk = _SUITE.kem.deserialize_private_key(private)
    public = X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()
    return KEMKeyPair(sk, _SUITE.kem.deserialize_public_key(public))


def seal(
    *,
    sender: str,
    msg_id: str,
    recipients: Sequence[tuple[str, KeyRecord]],
    identity: Identity,
    body: bytes,
    pad_block: int = DEFAULT_PAD_BLOCK,
    _rand: SealRandomness | None = None,
) -> bytes:
    """The encrypted body (magic included) of message ``msg_id`` from ``sender`` to ``recipients``.

    ``recipients`` pairs each recipient with its key record, which the caller has verified
    (:func:`verify_key_record`) and checked against its pin; a repeated recipient is kept
    once, at its first place. Raises ValueError if there is no recipient, ``pad_block`` is
    below 1, or ``_rand`` does not fit.
    """
    distinct: dict[str, KeyRecord] = {}
    for rcpt, record in recipients:
        distinct.setdefault(rcpt, record)
    if not distinct:
        raise ValueError("an envelope needs at least one recipient")
    if type(pad_block) is not int or pad_block < 1:
        raise ValueError("pad_block must be an integer of at least 1")
    if type(body) is not bytes:
        body = bytes(body)  # cbor2 would encode a memoryview as an array
    if _rand is None:
        cek, nonce = os.urandom(CEK_BYTES), os.urandom(NONCE_BYTES)
        ephemeral: list[KEMKeyPair | None] = [None] * len(distinct)
    else:
        if len(_rand.cek) != CEK_BYTES or len(_rand.nonce) != NONCE_BYTES or len(_rand.ephemeral) != len(distinct):
            raise ValueError("_rand needs a 32-byte cek, a 12-byte nonce and one ephemeral key per recipient")
        cek, nonce = _rand.cek, _rand.nonce
        ephemeral = [_ephemeral_pair(e) for e in _rand.ephemeral]
    ct = AESGCM(cek).encrypt(nonce, _pad(body, pad_block), _BODY_AAD)
    entries = []
    for (rcpt, record), eks in zip(distinct.items(), ephemeral, strict=True):
        info = _dumps([_WRAP_LABEL, sender, msg_id, rcpt])
        enc, ctx = _SUITE.create_sender_context(_x25519_public(record.ek), info=info, eks=eks)
        entries.append({"to": rcpt, "kid": record.kid, "enc": enc, "ct": ctx.seal(cek)})
    s = _dumps(
        {
            "from": sender,
            "id": msg_id,
            "to": list(distinct),
            "ik": identity.public,
            "keys": entries,
            "n": nonce,
            "ct": ct,
        }
    )
    sig = identity.sign(_dumps([_MSG_LABEL, s]))
    return E2E_MAGIC + _dumps({"v": ENVELOPE_VERSION, "s": s, "sig": sig})


# ---------------------------------------------------------------- opening


def is_envelope(body: bytes) -> bool:
    """Whether ``body`` claims to be an envelope (starts with :data:`E2E_MAGIC`); it may still be malformed."""
    return body[:4] == E2E_MAGIC


@dataclass(frozen=True, slots=True, kw_only=True)
class Peeked:
    """An envelope's header, as its signed part states it (nothing is verified yet).

    ``sender`` is the envelope's ``from``; ``kids`` maps each recipient to the kid its CEK is wrapped to.
    """

    sender: str
    id: str
    to: tuple[str, ...]
    ik: bytes
    kids: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class _Parsed:
    s: bytes
    sig: bytes
    sender: str
    id: str
    to: list[str]
    ik: bytes
    entries: dict[str, tuple[str, bytes, bytes]]  # recipient -> (kid, enc, ct)
    nonce: bytes
    ct: bytes


def _malformed(detail: str) -> E2EError:
    return E2EError("malformed", detail)


def _strict_map(data: bytes, keys: tuple[str, ...], what: str) -> dict[str, Any]:
    """``data`` as one strict, deterministically encoded CBOR map with exactly ``keys``, in that order."""
    try:
        item = decode_item(data)
    except RemoteProtocolError as exc:
        raise _malformed(f"{what}: {exc}") from None
    if type(item) is not dict or tuple(item) != keys:
        raise _malformed(f"{what} must be a map of exactly {', '.join(keys)}, in that order")
    if _dumps(item) != data:  # heads not shortest (and so a second encoding of the same envelope)
        raise _malformed(f"{what} is not deterministically encoded")
    return item


def _check_bytes(value: object, n: int, what: str) -> bytes:
    if type(value) is not bytes or len(value) != n:
        raise _malformed(f"{what} must be a byte string of {n} bytes")
    return value


def _check_text(value: object, what: str) -> str:
    if type(value) is not str:
        raise _malformed(f"{what} must be a text string")
    return value


def _parse(body: bytes) -> _Parsed:
    """Step 1 and 2 of opening: ``plaintext`` without the magic, ``malformed`` unless it decodes as documented."""
    if body[:4] != E2E_MAGIC:
        raise E2EError("plaintext", "no envelope magic")
    env = _strict_map(body[4:], _ENVELOPE_KEYS, "the envelope")
    v, s, sig = env["v"], env["s"], env["sig"]
    if type(v) is not int or v != ENVELOPE_VERSION:
        raise _malformed(f"v must be {ENVELOPE_VERSION}")
    if type(s) is not bytes:
        raise _malformed("s must be a byte string")
    _check_bytes(sig, SIG_BYTES, "sig")
    m = _strict_map(s, _S_KEYS, "s")
    sender = _check_text(m["from"], "from")
    msg_id = _check_text(m["id"], "id")
    to, keys = m["to"], m["keys"]
    if type(to) is not list or not to or type(keys) is not list or len(keys) != len(to):
        raise _malformed("to must be a non-empty array and keys an array of the same length")
    entries: dict[str, tuple[str, bytes, bytes]] = {}
    for rcpt, entry in zip(to, keys, strict=True):
        _check_text(rcpt, "to[]")
        if type(entry) is not dict or tuple(entry) != _ENTRY_KEYS:
            raise _malformed(f"keys[] must be maps of exactly {', '.join(_ENTRY_KEYS)}, in that order")
        if entry["to"] != rcpt or type(entry["to"]) is not str:
            raise _malformed("keys[].to must be the recipient at the same place in to")
        if rcpt in entries:
            raise _malformed("to repeats a recipient")
        entries[rcpt] = (
            _check_text(entry["kid"], "keys[].kid"),
            _check_bytes(entry["enc"], ENC_BYTES, "keys[].enc"),
            _check_bytes(entry["ct"], WRAPPED_BYTES, "keys[].ct"),
        )
    ik = _check_bytes(m["ik"], KEY_BYTES, "ik")
    nonce = _check_bytes(m["n"], NONCE_BYTES, "n")
    ct = m["ct"]
    if type(ct) is not bytes:
        raise _malformed("ct must be a byte string")
    return _Parsed(s, sig, sender, msg_id, to, ik, entries, nonce, ct)


def peek(body: bytes) -> Peeked:
    """The header of envelope ``body`` (opening's steps 1 and 2).

    Raises E2EError ``plaintext`` (no magic) or ``malformed``.
    """
    p = _parse(body)
    return Peeked(sender=p.sender, id=p.id, to=tuple(p.to), ik=p.ik, kids={rcpt: e[0] for rcpt, e in p.entries.items()})


def open_envelope(
    body: bytes,
    *,
    sender: str,
    msg_id: str,
    me: str,
    sender_ik: bytes,
    my_keys: Mapping[str, EncryptionKey],
) -> bytes:
    """The body inside envelope ``body``, delivered as ``msg_id`` from ``sender`` to ``me``.

    ``sender_ik`` is the identity key pinned (or just looked up and pinned) for ``sender``;
    ``my_keys`` maps kid -> key for ``me``'s current and retired encryption keys. Raises
    E2EError with the first failing step's reason: ``plaintext``, ``malformed``, ``mismatch``,
    ``not_for_me``, ``key_changed``, ``bad_signature``, ``unknown_key``, ``decrypt_failed``
    (bad padding inside an authentic envelope: ``malformed``).
    """
    p = _parse(body)
    if p.sender != sender or p.id != msg_id:
        raise E2EError("mismatch", "the envelope names another sender or message id")
    entry = p.entries.get(me)
    if entry is None:
        raise E2EError("not_for_me", f"{me} is not a recipient of this envelope")
    if p.ik != sender_ik:
        raise E2EError("key_changed", "the envelope is signed by another identity key than the sender's")
    if not _verify(sender_ik, p.sig, _dumps([_MSG_LABEL, p.s])):
        raise E2EError("bad_signature", "the envelope's signature does not verify")
    kid, enc, wrapped = entry
    key = my_keys.get(kid)
    if key is None:
        raise E2EError("unknown_key", f"no encryption key {kid!r}")
    try:
        ctx = _SUITE.create_recipient_context(enc, key._kem, info=_dumps([_WRAP_LABEL, sender, msg_id, me]))
        cek = ctx.open(wrapped)
        padded = AESGCM(cek).decrypt(p.nonce, p.ct, _BODY_AAD)
    except (PyHPKEError, InvalidTag, ValueError) as exc:  # ValueError: e.g. a low-order enc point
        raise E2EError("decrypt_failed", type(exc).__name__) from None
    return _unpad(padded)
