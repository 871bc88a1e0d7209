"""Error codes and protocol exceptions shared by broker and clients.

Every code here has a row in protocol.md's error table; ``tests/wire/test_errors.py``
keeps the two in step. Codes are stable: a number is never reused for another meaning.

Ranges: 1xxx the peer broke the protocol, 2xxx authentication and authorisation,
3xxx a SEND was refused (carried in a RECEIPT, the connection stays open),
4xxx the session was ended by the broker, 5xxx the broker failed.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

__all__ = [
    "ErrorCode",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
]


class ErrorCode(IntEnum):
    """The error codes of protocol.md's error table, by name; the value is what goes on the wire.

    An IntEnum, so a code compares equal to its number. Peers may send codes this version
    does not know: frames keep codes as plain integers (``Error.code``,
    ``RecipientResult.code``) and ``ErrorCode(n)`` raises ValueError for an unknown ``n``.
    """

    # 1xxx: protocol violations. The connection is always closed.
    MALFORMED_FRAME = 1001
    """The frame body is not exactly one valid CBOR map with text keys."""
    FRAME_TOO_LARGE = 1002
    """The declared frame length exceeds the receiver's ``max_frame_bytes``."""
    UNEXPECTED_FRAME = 1003
    """The frame type is not allowed in the connection's current state or direction."""
    INVALID_FIELD = 1004
    """A field is missing, has the wrong type, or is out of range."""
    UNKNOWN_FRAME_TYPE = 1005
    """The ``type`` field names no frame this protocol defines."""
    UNSUPPORTED_VERSION = 1006
    """The HELLO asked for a protocol version the broker does not speak."""
    HANDSHAKE_TIMEOUT = 1007
    """No HELLO arrived within ``handshake_timeout_s``."""

    # 2xxx: authentication and authorisation.
    INVALID_TOKEN = 2001
    """The token is missing, malformed, or its signature does not verify."""
    TOKEN_EXPIRED = 2002
    """The token's ``exp`` claim is in the past (beyond the leeway): at HELLO or REFRESH, or during the session."""
    FORBIDDEN = 2003
    """The authenticated identity may not do this (e.g. STATS without an operator token)."""
    TOKEN_MISMATCH = 2004
    """A REFRESH's token is valid but names another mailbox (or another role) than the session's."""

    # 3xxx: a request refused (in a RECEIPT or a KEY_PUT_RESULT `code`; never in an ERROR, never fatal).
    MAILBOX_FULL = 3001
    """The recipient's mailbox holds ``max_mailbox_messages`` messages already."""
    MAILBOX_BYTES_FULL = 3002
    """Queuing the body would exceed the recipient's ``max_mailbox_bytes``."""
    BROKER_FULL = 3003
    """Queuing the body would exceed the broker's ``max_total_bytes``."""
    TOO_MANY_RECIPIENTS = 3004
    """The SEND names more than ``max_recipients`` distinct recipients."""
    ID_CONFLICT = 3005
    """Another sender's message with the same id is held for this recipient."""
    INVALID_RECIPIENT = 3006
    """The recipient is not a syntactically valid mailbox id."""
    BODY_TOO_LARGE = 3007
    """The body is longer than ``max_frame_bytes - 256``: the DELIVER carrying it would not fit a frame."""
    STORE_UNREACHABLE = 3008
    """The broker could not reach its store for this SEND (a whole-SEND code): it may or may not be stored;
    resend it with the same id (a retry of a stored one is "duplicate")."""
    INVALID_KEY = 3009
    """A KEY_PUT's record signature does not verify for the session's mailbox: nothing was stored."""
    RATE_LIMITED = 3010
    """The SEND came faster than the sender's (address's or mailbox's) rate allows (a whole-SEND code): nothing was
    stored; resend it after the RECEIPT's ``retry_after_ms``."""

    # 4xxx: the broker ended the session.
    CONNECTED_ELSEWHERE = 4001
    """A newer connection authenticated for the same mailbox took over."""
    KEEPALIVE_TIMEOUT = 4002
    """Nothing was received for ``keepalive_s``."""
    SLOW_CONSUMER = 4003
    """The connection's unsent outbound data exceeded ``max_outbound_bytes``."""
    SHUTTING_DOWN = 4004
    """The broker is stopping."""
    TOO_MANY_CONNECTIONS = 4005
    """The broker holds ``max_connections`` connections already; sent instead of accepting the HELLO."""
    CONNECTION_RATE_LIMITED = 4006
    """Connections or HELLOs from this address (or HELLOs for this mailbox) came faster than the broker's rate;
    reconnect after the ERROR's ``retry_after_ms``."""
    TOO_MANY_CONNECTIONS_FROM_ADDRESS = 4007
    """The broker holds ``max_connections_per_address`` connections from this source address already."""

    # 5xxx: the broker failed.
    INTERNAL_ERROR = 5001
    """An unexpected broker fault; the request may be retried."""
    STORE_UNAVAILABLE = 5002
    """The broker cannot reach its store (Redis) now; reconnect later (SEND is idempotent by id)."""


class ProtocolError(Exception):
    """A protocol violation, carrying the error code that goes on the wire.

    Never raised directly: see :class:`RemoteProtocolError` (the peer did it) and
    :class:`LocalProtocolError` (we tried to do it).
    """

    def __init__(self, code: ErrorCode, message: str) -> None:
        if type(self) is ProtocolError:
            raise TypeError("raise RemoteProtocolError or LocalProtocolError")
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}, {self.message!r})"


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids.

    The right answer is an ERROR frame with :attr:`code` and ``close: true``,
    then closing the connection. ``frames_before`` holds the frames a decoder
    completed in the same chunk before the bad one (so that the connection can judge
    them first: the first bad frame decides the code).
    """

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(code, message)
        self.frames_before: list[Any] = []


class LocalProtocolError(ProtocolError):
    """This side tried to send something the protocol forbids (a bug in the caller)."""
