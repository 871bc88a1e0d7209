"""Routing as pure logic: which recipients a SEND may reach, and what its receipt says.

No I/O and no clock of its own: :func:`plan_send` turns a SEND into the message to store
plus the recipients refused before the store is asked; :func:`receipt_result` turns a
store outcome into the per-recipient result the sender sees.
"""

from __future__ import annotations

from dataclasses import dataclass

from wire import ErrorCode, RecipientResult, Send, Status, is_valid_mailbox_id

from .store.base import DUPLICATE, STORED, NewMessage

__all__ = ["Plan", "plan_send", "receipt_result"]

_QUEUED = RecipientResult(Status.QUEUED)
_DELIVERED = RecipientResult(Status.DELIVERED)
_DUPLICATE = RecipientResult(Status.DUPLICATE)
_REFUSED = {code: RecipientResult(Status.REFUSED, int(code)) for code in ErrorCode}


@dataclass(slots=True)
class Plan:
    message: NewMessage | None
    """What to store, for the recipients that passed; None if none did."""
    refused: dict[str, int]
    """Recipients refused before storing, with their error codes."""
    code: int | None = None
    """The whole SEND is refused with this code (no recipient is looked at, nothing is stored)."""


def plan_send(
    send: Send,
    sender: str,
    *,
    now_ms: int,
    default_ttl_s: int,
    max_ttl_s: int,
    max_recipients: int,
    max_body_bytes: int,
    expiries: dict[int, int] | None = None,
) -> Plan:
    """Validate a SEND's recipients and body size and fix its times. The sender is the authenticated mailbox.

    Rules that concern the whole SEND come first, in this order, and refuse it as a whole with one code:
    more than ``max_recipients`` distinct recipients (TOO_MANY_RECIPIENTS), then a body longer than
    ``max_body_bytes`` (BODY_TOO_LARGE). Such a receipt echoes no recipient, so every receipt stays within
    ``receipt_bound_bytes(max_recipients)``. Then each recipient is judged on its own.

    ``expiries`` (TTL -> expires_at), shared across one batch, lets its messages share their expiry objects.
    """
    recipients = tuple(dict.fromkeys(send.to)) if len(send.to) > 1 else send.to
    if len(recipients) > max_recipients:
        return Plan(None, {}, ErrorCode.TOO_MANY_RECIPIENTS)
    if len(send.body) > max_body_bytes:
        return Plan(None, {}, ErrorCode.BODY_TOO_LARGE)
    refused: dict[str, int] = {}
    for rcpt in recipients:
        if not is_valid_mailbox_id(rcpt):
            refused[rcpt] = ErrorCode.INVALID_RECIPIENT
    if refused:
        recipients = tuple(r for r in recipients if r not in refused)
        if not recipients:
            return Plan(None, refused)
    ttl_s = default_ttl_s if send.ttl_s is None else min(send.ttl_s, max_ttl_s)
    if expiries is None:
        expires_at = now_ms + ttl_s * 1000
    elif (expires_at := expiries.get(ttl_s, -1)) < 0:
        # One int object per TTL per batch, shared by every message held: 32 bytes a message saved.
        expires_at = expiries[ttl_s] = now_ms + ttl_s * 1000
    message = NewMessage(send.id, sender, recipients, send.body, now_ms, expires_at)
    return Plan(message, refused)


def receipt_result(outcome: int, online: bool) -> RecipientResult:
    """The result a sender sees for one recipient, from the store's outcome."""
    if outcome == STORED:
        return _DELIVERED if online else _QUEUED
    if outcome == DUPLICATE:
        return _DUPLICATE
    return _REFUSED[ErrorCode(outcome)]
