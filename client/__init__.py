"""Relay's Python client: a trio API (:func:`open_client`), a local SQLite message store and the ``relay`` CLI.

Quick start::

    async with open_client("tcp://127.0.0.1:7700", token) as client:
        receipt = await client.send("bob", b"hello")  # sealed to bob's key (end-to-end encryption, the default)
        async for delivery in client.deliveries():
            print(delivery.sender, delivery.security, delivery.body)  # e.g. alice e2e b'hi'
            client.ack(delivery.id)

    # keys and pinned contacts live in the local store (in memory without one)
    async with open_client(url, token, local_store=LocalStore("alice.sqlite3")) as client:
        print(client.fingerprint(), [(c.mailbox, c.safety_number, c.changed) for c in client.contacts()])

    # what became of what this mailbox sent (with a local store: saved, then ACKed by the client)
    async with open_client(url, token, local_store=LocalStore("alice.sqlite3")) as client:
        async for status in client.statuses():
            print(status.id, status.recipient, status.state)  # e.g. m1 bob delivered

The implementation lives in private modules, re-exported here: ``_client`` (the API, the
reconnect supervisor, :func:`open_client`), ``_link`` (one connection: reader, writer,
watchdog), ``_pending`` (SENDs and requests awaiting answers), ``_inbox`` (deliveries, the
local-store saver, DRAINED), ``_statuses`` (delivery statuses and their saver), ``_e2e`` (end-to-end
encryption: the device's keys and contacts, sealing, opening).
"""

from __future__ import annotations

from wire import ErrorCode, KeyRecord, Receipt, RecipientResult, ReportState, Status, StatusReport, Welcome

from ._client import ConnectionEvent, ConnectionState, OutgoingMessage, RelayClient, open_client
from ._e2e import ContactKey
from ._inbox import Delivery
from .errors import (
    AuthenticationError,
    ConnectedElsewhere,
    ConnectionLost,
    E2ESendError,
    ForbiddenError,
    InvalidRecipientKeyError,
    KeyChange,
    KeyChangedError,
    KeyRefused,
    LocalStoreError,
    NoRecipientKeyError,
    ProtocolViolation,
    RateLimited,
    RelayError,
    SessionEnded,
    TLSError,
    TLSReason,
)
from .localstore import Contact, LocalStore, RecipientState, SentMessage, StoredMessage, StoredStatus

__all__ = [
    "AuthenticationError",
    "ConnectedElsewhere",
    "ConnectionEvent",
    "ConnectionLost",
    "ConnectionState",
    "Contact",
    "ContactKey",
    "Delivery",
    "E2ESendError",
    "ErrorCode",
    "ForbiddenError",
    "KeyRecord",
    "InvalidRecipientKeyError",
    "KeyChange",
    "KeyChangedError",
    "KeyRefused",
    "LocalStore",
    "LocalStoreError",
    "NoRecipientKeyError",
    "OutgoingMessage",
    "ProtocolViolation",
    "Receipt",
    "RecipientResult",
    "RecipientState",
    "RelayClient",
    "RateLimited",
    "RelayError",
    "ReportState",
    "SentMessage",
    "SessionEnded",
    "Status",
    "StatusReport",
    "StoredMessage",
    "StoredStatus",
    "TLSError",
    "TLSReason",
    "Welcome",
    "open_client",
]
