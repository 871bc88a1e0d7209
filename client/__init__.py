"""Relay's Python client: a trio API (:func:`open_client`), a local SQLite message store and the ``relay`` CLI.

Quick start::

    async with open_client("tcp://127.0.0.1:7700", token) as client:
        receipt = await client.send("bob", b"hello")
        async for delivery in client.deliveries():
            client.ack(delivery.id)

    # what became of what this mailbox sent (with a local store: saved, then ACKed by the client)
    async with open_client(url, token, local_store=LocalStore("alice.sqlite3")) as client:
        async for status in client.statuses():
            print(status.id, status.recipient, status.state)  # e.g. m1 bob delivered

The implementation lives in private modules, re-exported here: ``_client`` (the API, the
reconnect supervisor, :func:`open_client`), ``_link`` (one connection: reader, writer,
watchdog), ``_pending`` (SENDs and requests awaiting answers), ``_inbox`` (deliveries, the
local-store saver, DRAINED), ``_statuses`` (delivery statuses and their saver).
"""

from __future__ import annotations

from wire import ErrorCode, KeyRecord, Receipt, RecipientResult, ReportState, Status, StatusReport, Welcome

from ._client import ConnectionEvent, ConnectionState, OutgoingMessage, RelayClient, open_client
from ._inbox import Delivery
from .errors import (
    AuthenticationError,
    ConnectedElsewhere,
    ConnectionLost,
    ForbiddenError,
    KeyRefused,
    LocalStoreError,
    ProtocolViolation,
    RelayError,
    SessionEnded,
)
from .localstore import LocalStore, RecipientState, SentMessage, StoredMessage, StoredStatus

__all__ = [
    "AuthenticationError",
    "ConnectedElsewhere",
    "ConnectionEvent",
    "ConnectionLost",
    "ConnectionState",
    "Delivery",
    "ErrorCode",
    "ForbiddenError",
    "KeyRecord",
    "KeyRefused",
    "LocalStore",
    "LocalStoreError",
    "OutgoingMessage",
    "ProtocolViolation",
    "Receipt",
    "RecipientResult",
    "RecipientState",
    "RelayClient",
    "RelayError",
    "ReportState",
    "SentMessage",
    "SessionEnded",
    "Status",
    "StatusReport",
    "StoredMessage",
    "StoredStatus",
    "Welcome",
    "open_client",
]
