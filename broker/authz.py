"""Authorisation: who may send which frame, decided in one place.

Theory of operation. The connection's state table (wire.Connection) already decides
*when* a frame may come (HELLO first, nothing before WELCOME, nothing after BYE); this
module decides *who*: a frame the state table admitted in OPEN is looked up in
:data:`RULES` by its type, and :func:`refusal` says whether the session's identity may
send it. A refused frame is answered with a non-closing ERROR FORBIDDEN and otherwise
ignored. A rate limit belongs here too, next to the rule it limits.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from wire import Ack, Bye, Cleanup, Frame, KeyGet, KeyPut, Ping, Pull, Refresh, Send, Stats, StatusAck

from .auth import Identity

__all__ = ["RULES", "Need", "refusal"]


class Need(enum.Enum):
    """What a session's identity must be to send a frame."""

    ANYONE = "anyone"
    MAILBOX = "a mailbox"
    """A mailbox token: operator sessions have no mailbox."""
    OPERATOR = "an operator token"


RULES: Mapping[type[Frame], Need] = {
    Send: Need.MAILBOX,
    Ack: Need.MAILBOX,
    StatusAck: Need.MAILBOX,
    Pull: Need.MAILBOX,
    KeyPut: Need.MAILBOX,
    KeyGet: Need.MAILBOX,
    Ping: Need.ANYONE,
    Bye: Need.ANYONE,
    Refresh: Need.ANYONE,
    Stats: Need.OPERATOR,
    Cleanup: Need.OPERATOR,
}
"""Every frame a client may send once the connection is OPEN, and who may send it."""


def refusal(identity: Identity, kind: type[Frame]) -> str | None:
    """Why ``identity`` may not send a ``kind`` frame (the FORBIDDEN message), or None if it may.

    Raises KeyError for a frame type a client never sends in OPEN (the state table refuses those first).
    """
    need = RULES[kind]
    if need is Need.MAILBOX and identity.operator:
        return f"{kind.TYPE} needs a mailbox; operator sessions have none"
    if need is Need.OPERATOR and not identity.operator:
        return f"{kind.TYPE} needs an operator token"
    return None
