"""The client's exceptions: one hierarchy, each carrying the wire ErrorCode where there is one.

``RelayError`` is the root. Which subclass is raised tells the caller what to do:

- :class:`AuthenticationError` (INVALID_TOKEN, TOKEN_EXPIRED, TOKEN_MISMATCH): get a new token. Fatal, except
  TOKEN_EXPIRED for a client with a ``refresh_token`` callback: it reconnects with the callback's token.
- :class:`ForbiddenError` (FORBIDDEN): this token may not do that. The connection stays up.
- :class:`ProtocolViolation` (1xxx, e.g. UNSUPPORTED_VERSION): a bug on one side. Fatal.
- :class:`SessionEnded` (4xxx, 5xxx): the broker ended the session. The client reconnects
  by itself, except after :class:`ConnectedElsewhere` (4001: another connection took over
  the mailbox), which is fatal; after :class:`RateLimited` (4006) it waits at least its ``retry_after_s``.
- :class:`ConnectionLost` (no code): the transport failed and the client will not (or may
  not) reconnect: the first connect failed, ``reconnect=False``, or the client was closed.
  :class:`TLSError` is one whose TLS connection could not be set up: its ``reason``
  (:class:`TLSReason`) names why (wrong host name, untrusted CA, expired certificate, ...).
- :class:`LocalStoreError`: saving deliveries to the local store failed (nothing was ACKed).
- :class:`KeyRefused` (INVALID_KEY 3009, STORE_UNREACHABLE 3008): the broker did not store a key
  record (``put_key``). The connection stays up.
- End-to-end encryption refused a send (nothing was sent to anyone; the connection stays up):
  :class:`KeyChangedError` (a recipient's identity key is not the one pinned: compare fingerprints, then
  ``accept_key``), :class:`NoRecipientKeyError` (a recipient has published no key: send with
  ``plaintext=True`` if the clear is acceptable), :class:`InvalidRecipientKeyError` (the directory gave a
  record whose signature does not verify for that mailbox).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from wire import ErrorCode

__all__ = [
    "AuthenticationError",
    "ConnectedElsewhere",
    "ConnectionLost",
    "E2ESendError",
    "ForbiddenError",
    "InvalidRecipientKeyError",
    "KeyChange",
    "KeyChangedError",
    "KeyRefused",
    "LocalStoreError",
    "NoRecipientKeyError",
    "ProtocolViolation",
    "RateLimited",
    "RelayError",
    "SessionEnded",
    "TLSError",
    "TLSReason",
    "error_from_code",
]


class RelayError(Exception):
    """Something failed. ``code`` is the :class:`wire.ErrorCode` (a plain int for codes newer than
    this client, None when no code applies, e.g. a broken socket); ``message`` says what happened."""

    def __init__(self, code: ErrorCode | int | None, message: str) -> None:
        super().__init__(f"{_code_text(code)}{message}")
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple[object, ...]:  # copy and pickle with the constructor's arguments
        return (type(self), (self.code, self.message))


class AuthenticationError(RelayError):
    """The broker refused the token (INVALID_TOKEN 2001, TOKEN_EXPIRED 2002, or TOKEN_MISMATCH 2004: a refreshed token
    for another mailbox or role). Never retried with the same token."""


class ForbiddenError(RelayError):
    """FORBIDDEN (2003): the token may not do this (e.g. STATS without an operator token)."""


class ProtocolViolation(RelayError):
    """A 1xxx error: one side broke the protocol (including UNSUPPORTED_VERSION). Never retried."""


class SessionEnded(RelayError):
    """The broker ended the session with a 4xxx or 5xxx code."""


class RateLimited(SessionEnded):
    """CONNECTION_RATE_LIMITED (4006): connections or HELLOs from this address (or for this mailbox) came faster
    than the broker allows. The client reconnects by itself, waiting at least ``retry_after_s``."""

    def __init__(self, code: ErrorCode | int, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(code, message)
        self.retry_after_s = retry_after_s
        """The broker's ``retry_after_ms``, in seconds (0.0 if it gave none)."""

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.code, self.message, self.retry_after_s))


class ConnectedElsewhere(SessionEnded):
    """CONNECTED_ELSEWHERE (4001): a newer connection for the same mailbox took over. Never retried."""


class ConnectionLost(RelayError):
    """The transport failed or the client was closed, and no (further) reconnect will happen."""

    def __init__(self, message: str) -> None:
        super().__init__(None, message)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.message,))


class KeyRefused(RelayError):
    """The broker did not store the key record with this ``kid`` (KEY_PUT_RESULT with a ``code``):
    INVALID_KEY (3009) when its signature does not verify for this client's mailbox (a bug: the record
    was made for another mailbox or is damaged), STORE_UNREACHABLE (3008) when the broker could not reach
    its store (put it again later). The connection stays up."""

    def __init__(self, code: ErrorCode | int, message: str, kid: str) -> None:
        super().__init__(code, message)
        self.kid = kid

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.code, self.message, self.kid))


class TLSReason(StrEnum):
    """Why a TLS connection to the broker (tls://, wss://) could not be set up."""

    HOSTNAME_MISMATCH = "hostname_mismatch"
    """The certificate does not name the host in the URL."""
    UNTRUSTED = "untrusted"
    """The certificate is not signed by a CA the client trusts (the system's, or the CA file given)."""
    EXPIRED = "expired"
    """The certificate has expired."""
    NOT_YET_VALID = "not_yet_valid"
    """The certificate is not valid yet (or the client's clock is wrong)."""
    CERTIFICATE = "certificate"
    """The certificate was refused for another reason (the message says which)."""
    NOT_TLS = "not_tls"
    """The server did not answer TLS: a plain port (tcp://, ws://)?"""
    HANDSHAKE = "handshake"
    """The handshake failed otherwise (no common protocol version or cipher, the connection closed)."""


class TLSError(ConnectionLost):
    """The TLS connection to the broker could not be set up; ``reason`` (:class:`TLSReason`) says why."""

    def __init__(self, reason: TLSReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.reason, self.message))


class LocalStoreError(RelayError):
    """Saving deliveries (or delivery statuses) to the local store failed; they were not ACKed and will be delivered
    again."""

    def __init__(self, message: str) -> None:
        super().__init__(None, message)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.message,))


class E2ESendError(RelayError):
    """End-to-end encryption refused a send before anything was written: nothing was sent to anyone."""


@dataclass(frozen=True, slots=True)
class KeyChange:
    """A recipient whose identity key in the directory is not the one pinned: both fingerprints
    (``wire.e2e.fingerprint``, six groups of five digits)."""

    mailbox: str
    pinned_fingerprint: str
    new_fingerprint: str


class KeyChangedError(E2ESendError):
    """A recipient's identity key changed since it was pinned (a reinstalled device, or someone else's key served by
    the directory). Nothing was sent. ``changes`` lists each such recipient with both fingerprints (``mailbox``,
    ``pinned_fingerprint``, ``new_fingerprint`` are the first's); the new key is recorded as pending. Compare the
    new fingerprint with the contact out of band, then ``client.accept_key(mailbox)`` (``relay keys accept``) and
    send again."""

    def __init__(self, changes: Sequence[KeyChange]) -> None:
        self.changes = tuple(changes)
        first = self.changes[0]
        self.mailbox = first.mailbox
        self.pinned_fingerprint = first.pinned_fingerprint
        self.new_fingerprint = first.new_fingerprint
        text = "; ".join(f"{c.mailbox}: pinned {c.pinned_fingerprint}, now {c.new_fingerprint}" for c in self.changes)
        super().__init__(None, f"identity key changed, nothing sent ({text})")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.changes,))


class NoRecipientKeyError(E2ESendError):
    """These recipients (``mailboxes``) have published no key, so the message cannot be encrypted to them. Nothing
    was sent. Send with ``plaintext=True`` (``relay send --plaintext``) to send it in the clear instead."""

    def __init__(self, mailboxes: Sequence[str]) -> None:
        self.mailboxes = tuple(mailboxes)
        super().__init__(
            None, f"no published key for {', '.join(self.mailboxes)}: nothing sent (plaintext=True sends in the clear)"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.mailboxes,))


class InvalidRecipientKeyError(E2ESendError):
    """The directory answered with a key record for these ``mailboxes`` whose signature does not verify for them (a
    broker fault or a forgery). Nothing was sent and nothing pinned."""

    def __init__(self, mailboxes: Sequence[str]) -> None:
        self.mailboxes = tuple(mailboxes)
        super().__init__(None, f"the directory's key record for {', '.join(self.mailboxes)} is invalid: nothing sent")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.mailboxes,))


FATAL_CODES = frozenset(
    {
        ErrorCode.INVALID_TOKEN,
        ErrorCode.TOKEN_EXPIRED,
        ErrorCode.TOKEN_MISMATCH,
        ErrorCode.UNSUPPORTED_VERSION,
        ErrorCode.CONNECTED_ELSEWHERE,
        ErrorCode.MALFORMED_FRAME,
        ErrorCode.FRAME_TOO_LARGE,
        ErrorCode.UNEXPECTED_FRAME,
        ErrorCode.INVALID_FIELD,
        ErrorCode.UNKNOWN_FRAME_TYPE,
    }
)
"""Closing errors after which reconnecting cannot help. HANDSHAKE_TIMEOUT (1007), the 4xxx codes
other than CONNECTED_ELSEWHERE and INTERNAL_ERROR are transient: the client reconnects."""


def _code_text(code: ErrorCode | int | None) -> str:
    if code is None:
        return ""
    if isinstance(code, ErrorCode):
        return f"{code.name} ({int(code)}): "
    return f"error {code}: "


def error_from_code(code: int, message: str, retry_after_ms: int | None = None) -> RelayError:
    """The exception for an ERROR frame's code (a plain int if this client does not know it) and its
    ``retry_after_ms``."""
    try:
        known: ErrorCode | int = ErrorCode(code)
    except ValueError:
        known = code
    if code in (ErrorCode.INVALID_TOKEN, ErrorCode.TOKEN_EXPIRED, ErrorCode.TOKEN_MISMATCH):
        return AuthenticationError(known, message)
    if code == ErrorCode.FORBIDDEN:
        return ForbiddenError(known, message)
    if code == ErrorCode.CONNECTED_ELSEWHERE:
        return ConnectedElsewhere(known, message)
    if code == ErrorCode.CONNECTION_RATE_LIMITED:
        return RateLimited(known, message, (retry_after_ms or 0) / 1000)
    if 1000 <= code < 2000:
        return ProtocolViolation(known, message)
    if 4000 <= code < 6000:
        return SessionEnded(known, message)
    return RelayError(known, message)


def is_fatal(code: int) -> bool:
    """Whether a closing ERROR with this code ends the client for good (no reconnect)."""
    return code in FATAL_CODES


def fresh_copy(exc: BaseException) -> BaseException:
    """A copy of ``exc`` without its traceback, to raise in one more task (tracebacks do not pile up on one object)."""
    dup = copy.copy(exc)
    dup.__traceback__ = None
    return dup
