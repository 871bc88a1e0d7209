"""The protocol's fixed limits, in one place, each with the reason for its figure.

Theory of operation: these are constants of protocol version 1, not settings: a broker's
configurable limits (``max_frame_bytes``, ``max_recipients``, ...) live in its config and
are announced in WELCOME; what is here holds for every broker and client. The frame and
codec modules import them from here; ``wire`` re-exports the public ones.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "DELIVER_OVERHEAD_BYTES",
    "MAX_AGENT_CHARS",
    "MAX_DEPTH",
    "MAX_ERROR_MESSAGE_CHARS",
    "MAX_HELLO_FRAME_BYTES",
    "MAX_ID_CHARS",
    "MAX_RECIPIENT_CHARS",
    "MAX_STATS_KEY_CHARS",
    "MAX_TEXT",
    "MIN_MAX_FRAME_BYTES",
    "PROTOCOL_VERSION",
    "RECEIPT_BASE_MAX_BYTES",
    "RECEIPT_ENTRY_MAX_BYTES",
    "UINT_MAX",
    "max_recipients_within",
    "receipt_bound_bytes",
]

PROTOCOL_VERSION = 1
"""The version this code speaks (HELLO ``version``; protocol.md's title names it)."""

DEFAULT_MAX_FRAME_BYTES = 1024 * 1024
"""Default largest frame body (not counting the 4-byte prefix): room for a 1 MiB-less-overhead message body."""
MIN_MAX_FRAME_BYTES = 64
"""Smallest ``max_frame_bytes`` a WELCOME may announce: below it not even a PING-sized frame fits."""
MAX_DEPTH = 4
"""Deepest nesting any frame needs is 3 (receipt -> results -> result); one spare."""
UINT_MAX = 2**63 - 1
"""Largest integer any field may carry (fits a signed 64-bit integer in every language)."""

MAX_ID_CHARS = 64
"""Longest message id, mailbox id and session id, in characters: room for a UUID or ULID with a prefix."""
MAX_TEXT = 4096
"""Longest free-text field (tokens, error messages), in characters."""
MAX_AGENT_CHARS = 256
"""Longest HELLO ``agent`` (a client's name and version, for logs): short enough to log as is."""
MAX_STATS_KEY_CHARS = 64
"""Longest STATS_RESULT key: counter names are short identifiers (protocol.md section 10)."""

DELIVER_OVERHEAD_BYTES = 256
"""Room a DELIVER needs besides its body: at most 222 bytes (keys, a 64-character id and
sender, three 64-bit integers, the body's header), rounded up. A body longer than
``max_frame_bytes - DELIVER_OVERHEAD_BYTES`` is refused (BODY_TOO_LARGE) so that every
accepted message can be delivered within ``max_frame_bytes``."""

MAX_HELLO_FRAME_BYTES = 8192
"""Largest frame a broker accepts before it has sent WELCOME. A HELLO needs at most about 4.5 KB (a
4096-character JWT is ASCII, plus a 256-character agent and the keys), so this bounds what an
unauthenticated connection can make the broker buffer: 8 KiB, not ``max_frame_bytes``."""
MAX_ERROR_MESSAGE_CHARS = 200
"""ERROR messages a broker sends are cut to this many characters (at most 800 bytes of UTF-8), so an
ERROR frame, whatever it quotes, fits the smallest frame limit a broker can be configured with."""

MAX_RECIPIENT_CHARS = MAX_ID_CHARS
"""Longest element of SEND ``to`` (and so of a RECEIPT ``results`` key), in code points: as long as the
longest mailbox id. It bounds what a RECEIPT echoes per recipient, which is what keeps every RECEIPT within
the frame limit (see :func:`receipt_bound_bytes`)."""
RECEIPT_ENTRY_MAX_BYTES = 2 + 4 * MAX_RECIPIENT_CHARS + 24
"""Most bytes one ``results`` entry can take: the key (a head and up to 4 UTF-8 bytes a code point) and
``{"status": "refused", "code": <uint16>}`` (24 bytes)."""
RECEIPT_BASE_MAX_BYTES = 96
"""Most bytes a RECEIPT takes besides its entries: the map head, ``type``, ``id`` (a 64-character id),
the ``results`` key and the results map's head (85 bytes), rounded up."""


def receipt_bound_bytes(max_recipients: int) -> int:
    """The largest RECEIPT body a broker allowing ``max_recipients`` recipients per SEND can emit."""
    return RECEIPT_BASE_MAX_BYTES + max_recipients * RECEIPT_ENTRY_MAX_BYTES


def max_recipients_within(max_frame_bytes: int) -> int:
    """The most recipients per SEND whose largest RECEIPT still fits ``max_frame_bytes`` (the inverse of
    :func:`receipt_bound_bytes`)."""
    return max(0, (max_frame_bytes - RECEIPT_BASE_MAX_BYTES) // RECEIPT_ENTRY_MAX_BYTES)
