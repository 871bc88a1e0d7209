"""The trio client's public face: :class:`RelayClient`, its reconnect supervisor, and :func:`open_client`.

Theory of operation. :func:`open_client` starts the **supervisor** task and waits until its first
link is established, so a bad URL, an unreachable broker or a refused token raise at once. The
supervisor serves links one after another, each inside ``async with`` the transport it runs on
(:mod:`client._link`: reader, writer, watchdog). When a link ends for a transient reason it
reconnects with exponential backoff and jitter; INVALID_TOKEN, TOKEN_EXPIRED, TOKEN_MISMATCH,
UNSUPPORTED_VERSION, CONNECTED_ELSEWHERE (and other protocol violations) are fatal: every waiter
raises the error, and ``on_connection_change`` hears STOPPED. With a ``refresh_token`` callback a
session outlives its token (each link's refresher sends the callback's tokens in REFRESH frames),
and a TOKEN_EXPIRED is not fatal: the client reconnects with a token from the callback.

Nothing is lost across reconnects. Each SEND waits in the pending table (:mod:`client._pending`)
until its RECEIPT arrives; a new link writes all of them again with the same ids, and SEND is
idempotent, so a message whose receipt was lost is reported "duplicate", never stored twice. ACK
ids not written when a link fails are written on the next one. Waiting for receipts costs one
event per ``send``/``send_batch`` call, never a task per message. Deliveries, the local-store
saver and DRAINED live in :mod:`client._inbox`; delivery statuses (SENDs ask for them by
default: ``notify``) and their saver in :mod:`client._statuses`; end-to-end encryption (on by
default: keys, contacts, sealing, the opener between the reader and the inbox) in :mod:`client._e2e`.

This class only wires those parts together: it checks the caller's arguments, encodes SENDs
through the current link (or judges them without one, while reconnecting), and decides when the
client stops.
"""

from __future__ import annotations

import logging
import math
import os
import random
import ssl
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from typing import Any, TypedDict, Unpack

import trio

from wire import (
    PROTOCOL_VERSION,
    UINT_MAX,
    Cleanup,
    CleanupResult,
    ErrorCode,
    Frame,
    Hello,
    KeyGet,
    KeyGetResult,
    KeyPut,
    KeyPutResult,
    KeyRecord,
    Pull,
    Receipt,
    Send,
    Stats,
    StatsResult,
    Status,
    StatusReport,
    Welcome,
    is_valid_message_id,
)
from wire.e2e import DEFAULT_PAD_BLOCK, fingerprint, seal, verify_key_record

from ._e2e import CRYPTO_SLICE, ContactKey, EnvelopeOpener, Keyring, check_recipients
from ._inbox import ClientState, Delivery, Inbox, InboxIterator
from ._link import Link, Outbound, TokenSource, TransportFactory, check_sends, handshake
from ._pending import PendingTable, SendItem
from ._statuses import StatusBox
from .errors import (
    ConnectionLost,
    ForbiddenError,
    InvalidRecipientKeyError,
    KeyRefused,
    NoRecipientKeyError,
    RateLimited,
    RelayError,
    TLSError,
    is_fatal,
)
from .localstore import E2E, PLAINTEXT, LocalStore, SentMessage
from .transport import Endpoint, TLSFailed, TransportClosed, client_ssl_context, open_transport, parse_url

__all__ = [
    "ClientOptions",
    "ConnectionEvent",
    "ConnectionState",
    "OutgoingMessage",
    "RelayClient",
    "open_client",
]

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0
"""Longest a connect plus HELLO -> WELCOME may take before the attempt counts as failed."""
CLOSE_TIMEOUT_S = 5.0
"""Longest :meth:`RelayClient.close` waits to save, ACK and say BYE."""
_MAX_BACKOFF_DOUBLINGS = 40


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """One message for :meth:`RelayClient.send_batch`. ``id`` defaults to 128 random bits in hex; ``notify``
    (default True) asks for a delivery status per recipient; ``plaintext`` sends it in the clear (see
    :meth:`RelayClient.send`)."""

    to: str | Sequence[str]
    body: bytes
    ttl_s: int | None = None
    id: str | None = None
    notify: bool = True
    plaintext: bool = False


class ConnectionState(StrEnum):
    """What happened to the client's connection (see :class:`ConnectionEvent`)."""

    CONNECTED = "connected"
    """The first session is established (WELCOME received)."""
    DISCONNECTED = "disconnected"
    """A session ended for a transient reason (``reason``); the client is reconnecting."""
    RECONNECTED = "reconnected"
    """A session is established again after DISCONNECTED."""
    STOPPED = "stopped"
    """A session ended and the client will not reconnect: a fatal error (e.g. CONNECTED_ELSEWHERE,
    TOKEN_EXPIRED) or ``reconnect=False``. ``reason`` is the error every waiter now raises.
    Not reported for a :meth:`RelayClient.close` or an abandoned client."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionEvent:
    """One change of connection state, given to ``on_connection_change``.

    ``url`` is the broker's URL; ``mailbox`` and ``pending`` (messages the broker held for
    the mailbox, unexpired, at WELCOME) come from the WELCOME of a (re)connect and are None
    otherwise (``mailbox`` is also None for operator sessions); ``reason`` says why a session
    ended (DISCONNECTED, STOPPED: its ``code`` is the ERROR code, e.g. 4004 SHUTTING_DOWN or
    4001 CONNECTED_ELSEWHERE, or None for a transport failure); ``connects`` counts the sessions
    established so far.
    """

    state: ConnectionState
    url: str
    mailbox: str | None = None
    pending: int | None = None
    reason: RelayError | None = None
    connects: int = 0

    @property
    def code(self) -> int | None:
        """The error code that ended the session (``reason.code``), if any."""
        return self.reason.code if self.reason is not None else None


ConnectionCallback = Callable[[ConnectionEvent], None]


class ClientOptions(TypedDict, total=False):
    """The keyword options of :func:`open_client` and :class:`RelayClient` (defaults in ``RelayClient.__init__``)."""

    local_store: LocalStore | None
    """Save deliveries and delivery statuses there before ACKing them, and record sent messages with each
    recipient's state (default: none)."""
    agent: str | None
    """Sent in HELLO to name this client in the broker's logs."""
    reconnect: bool
    """Reconnect after a transient failure (default True); with False the first failure stops the client."""
    backoff_initial_s: float
    """First reconnect delay (default 0.1 s); it doubles per failed attempt, with jitter."""
    backoff_max_s: float
    """Longest reconnect delay (default 10 s)."""
    transport_factory: TransportFactory | None
    """How to open a transport for the parsed URL (tests, custom transports); default ``open_transport``."""
    ssl_context: ssl.SSLContext | None
    """For tls:// and wss:// URLs: the client SSL context that verifies the broker (default: the system's trust
    store, and the URL's host name)."""
    ca_file: str | os.PathLike[str] | None
    """For tls:// and wss:// URLs: trust only the CA certificates in this PEM file (instead of ``ssl_context``)."""
    on_connection_change: ConnectionCallback | None
    """Called with a :class:`ConnectionEvent` once for each change of connection state."""
    e2e: bool
    """End-to-end encryption (default True): publish this device's key on every connect, seal every message to its
    recipients' keys, open envelopes. False sends everything in the clear and publishes no key (an envelope
    received is then ``failed``/``unknown_key``)."""
    pad_block: int
    """Sealed bodies are padded to a multiple of this many bytes (default 256; 1 pads by one byte only)."""
    refresh_token: TokenSource | None
    """An async function returning a newer token for the same mailbox (or operator), from the application's issuer:
    called once three quarters of the session's time have passed (the client sends the token in a REFRESH, so the
    session outlives its first token; protocol.md rule 22), again after a quarter of what is left if it raises, and
    before reconnecting when the broker ended a session with TOKEN_EXPIRED. Default None: the session ends when its
    token expires (TOKEN_EXPIRED, fatal)."""


_OPTION_NAMES = frozenset(ClientOptions.__optional_keys__)


def _ssl_context(options: ClientOptions) -> ssl.SSLContext | None:
    """The SSL context for tls:// and wss:// from ``ssl_context`` or ``ca_file`` (None: the system's trust store).
    Raises TypeError if both are given, ValueError if the CA file cannot be loaded."""
    context, ca_file = options.get("ssl_context"), options.get("ca_file")
    if context is not None and ca_file is not None:
        raise TypeError("give ssl_context or ca_file, not both")
    return client_ssl_context(ca_file) if ca_file is not None else context


def _new_ids(n: int) -> list[str]:
    """``n`` ids of 128 random bits (32 hex digits) from one getrandom call."""
    h = os.urandom(16 * n).hex()
    return [h[i : i + 32] for i in range(0, 32 * n, 32)]


def _item(mid: str, to: str | Sequence[str], body: bytes, ttl_s: int | None, notify: bool) -> SendItem:
    return (mid, (to,) if type(to) is str else tuple(to), body, ttl_s, notify)


def _validate(items: Sequence[SendItem]) -> None:
    """Raises ValueError for an invalid message (what encoding the SEND would say), before anything is sealed."""
    for mid, to, body, ttl_s, notify in items:
        try:
            Send(id=mid, to=to, body=body, ttl_s=ttl_s, notify=notify)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid message {mid!r}: {exc}") from None


class RelayClient:
    """A connection to a Relay broker, kept up across failures. Made by :func:`open_client`.

    Attributes: ``welcome`` (the latest WELCOME, with the broker's limits), ``mailbox`` (this
    session's mailbox id; None for operator tokens), ``connects`` (sessions established so far).
    ``on_connection_change`` (see :func:`open_client`) is called with a :class:`ConnectionEvent`
    once for each change of state.
    """

    def __init__(self, endpoint: Endpoint, token: str, **options: Unpack[ClientOptions]) -> None:
        """Raises TypeError for an unknown option. Use :func:`open_client`, which also connects."""
        unknown = options.keys() - _OPTION_NAMES
        if unknown:
            raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
        self.endpoint = endpoint
        self.welcome: Welcome | None = None
        self.connects = 0
        """How many times a session was established (1 + reconnects)."""
        self._token = token
        self._agent = options.get("agent")
        self._store = options.get("local_store")
        self._reconnect = options.get("reconnect", True)
        self._backoff_initial_s = options.get("backoff_initial_s", 0.1)
        self._backoff_max_s = max(options.get("backoff_max_s", 10.0), self._backoff_initial_s)
        self._open_transport: TransportFactory = options.get("transport_factory") or partial(
            open_transport, ssl_context=_ssl_context(options)
        )
        self._on_connection_change = options.get("on_connection_change")
        pad_block = options.get("pad_block", DEFAULT_PAD_BLOCK)
        if type(pad_block) is not int or pad_block < 1:
            raise ValueError("pad_block must be an integer of at least 1")
        self._pad_block = pad_block
        self._refresh_token = options.get("refresh_token")
        if self._refresh_token is not None and not callable(self._refresh_token):
            raise TypeError("refresh_token must be an async function returning a token")
        self._token_stale = False
        """The broker said the token expired: get a new one (``refresh_token``) before the next HELLO."""
        self._keyring = Keyring(self._store) if options.get("e2e", True) else None
        self._state = ClientState()
        self._pending = PendingTable()
        self._outbound = Outbound()
        self._inbox = Inbox(self._store, self._state, self._outbound.add_acks, self._fail)
        self._opener = EnvelopeOpener(self._inbox, self._keyring, self._lookup_keys, self._state, self._fail)
        self._statuses = StatusBox(
            self._store,
            self._state,
            on_saved=self._outbound.add_status_acks,
            on_failure=self._fail,
            is_drained=self._inbox.is_drained,
        )
        self._link: Link | None = None
        self._gen = 0
        self._stopped = False
        self._bg_scope = trio.CancelScope()

    # ------------------------------------------------------------ public API

    @property
    def mailbox(self) -> str | None:
        """This session's mailbox id (None for an operator session)."""
        return self.welcome.mailbox if self.welcome is not None else None

    @property
    def connected(self) -> bool:
        """Whether a session is established right now."""
        return self._state.connected

    async def send(
        self,
        to: str | Sequence[str],
        body: bytes,
        *,
        ttl_s: int | None = None,
        id: str | None = None,
        notify: bool = True,
        plaintext: bool = False,
    ) -> Receipt:
        """Send one message and wait for its RECEIPT (one result per distinct recipient, or a ``code`` for
        a SEND refused as a whole: 3004, 3007, or 3008 STORE_UNREACHABLE, after which the message may or may
        not be stored: send it again with the same ``id``).

        With ``notify`` (the default) the broker later tells this mailbox what became of the message for
        each recipient it was stored for: one :class:`wire.StatusReport` each from :meth:`statuses`,
        "delivered" (the recipient's device saved and ACKed it) or "expired" (it expired un-ACKed). That
        tells the sender when the recipient's device was online; pass ``notify=False`` not to ask. A
        resend of an id the broker holds keeps the first SEND's ``notify``.

        End-to-end encryption (unless the client was opened with ``e2e=False``): the body is sealed to every
        recipient's key (docs/e2e.md), looked up in the broker's directory once per recipient per connection
        (one KEY_GET for all not yet looked up) and checked against the identity key pinned for it, which a
        first lookup pins. Nothing is sent to anyone if a recipient's key changed (KeyChangedError, naming it
        and both fingerprints: compare, then :meth:`accept_key`), has no published key (NoRecipientKeyError)
        or an invalid one (InvalidRecipientKeyError). ``plaintext=True`` sends this message in the clear to
        every recipient instead (no lookup), and the recipients see it marked unencrypted. The local store
        keeps the plaintext body and the message's security either way.

        ``id`` defaults to ``uuid4().hex``. If the connection drops first, the message is re-sent
        with the same id after reconnecting (the broker answers "duplicate" if it had stored it); while
        the broker is unreachable it keeps waiting, so bound it with ``trio.fail_after`` if needed.
        Raises ValueError for an invalid message, RelayError(FRAME_TOO_LARGE) for a body the broker
        cannot take, ForbiddenError for operator sessions, and the fatal error (e.g.
        AuthenticationError, ConnectedElsewhere, or ConnectionLost with ``reconnect=False``) if the
        client stops before the receipt arrives.
        """
        item = _item(id if id is not None else uuid.uuid4().hex, to, body, ttl_s, notify)
        receipts = await self._submit([item], [plaintext])
        return receipts[0]

    async def send_batch(self, items: Sequence[OutgoingMessage]) -> list[Receipt]:
        """Send many messages in one write and wait for all their receipts (same order as ``items``).

        Same guarantees and errors as :meth:`send`. Nothing is queued if any item is invalid, or if
        encryption refuses any item (one KEY_GET for the recipients of all of them).
        """
        if not items:
            return []
        missing = sum(1 for m in items if m.id is None)
        fresh = iter(_new_ids(missing)) if missing else iter(())
        return await self._submit(
            [_item(m.id if m.id is not None else next(fresh), m.to, m.body, m.ttl_s, m.notify) for m in items],
            [m.plaintext for m in items],
        )

    def deliveries(self, *, until_drained: bool = False) -> AsyncIterator[Delivery]:
        """Delivered messages in arrival order. With a local store, only messages new in the store
        (already saved and ACKed); without one, every delivery (ACK it with :meth:`ack`).

        Ends when the client is closed, or with ``until_drained`` once every message held at the
        last connect or :meth:`pull` has been yielded. Raises the fatal error if the client fails
        (after yielding what had arrived).
        """
        return InboxIterator(self._inbox, self._inbox.take_one, until_drained)

    def delivery_batches(self, *, until_drained: bool = False) -> AsyncIterator[list[Delivery]]:
        """Like :meth:`deliveries`, but each step yields every delivery buffered so far (a non-empty list)."""
        return InboxIterator(self._inbox, self._inbox.take_all, until_drained)

    def statuses(self, *, until_drained: bool = False) -> AsyncIterator[StatusReport]:
        """Delivery statuses for messages this mailbox sent with ``notify``, in arrival order: per recipient
        "delivered" or "expired" (``id``, ``recipient``, ``at``), or "overflow" (``count`` statuses the broker
        could not keep, its per-mailbox bound; ``first_seq`` names the record as it grows: a later one with
        the same ``first_seq`` includes the earlier one's count).

        With a local store, only statuses new in the store (already saved, each recipient's state
        updated, and STATUS_ACKed); without one, every status received (STATUS_ACK each with
        :meth:`ack_statuses` once kept, or it comes again on the next connection). A status may come
        before the receipt of its message. Iterate this (or send with ``notify=False``): with a local
        store, statuses not taken pile up to a bound, after which they are no longer saved and ACKed.

        Ends when the client is closed, or with ``until_drained`` once the client is drained (see
        :meth:`wait_drained`) and every status received by then has been yielded. Raises the fatal error
        if the client fails (after yielding what had arrived).
        """
        return InboxIterator(self._statuses, self._statuses.take_one, until_drained)

    def status_batches(self, *, until_drained: bool = False) -> AsyncIterator[list[StatusReport]]:
        """Like :meth:`statuses`, but each step yields every status buffered so far (a non-empty list)."""
        return InboxIterator(self._statuses, self._statuses.take_all, until_drained)

    def ack_statuses(self, seqs: int | Iterable[int]) -> None:
        """Queue STATUS_ACKs for delivery statuses (by ``seq``), so the broker forgets them. Like :meth:`ack`:
        one frame per writer run, written again after a reconnect if not yet written; does not block.

        With a local store the client STATUS_ACKs by itself after saving; calling this too is harmless.
        Raises ValueError for a seq that is not an integer >= 1, ForbiddenError for operator sessions.
        """
        self._check_usable(needs_mailbox=True)
        new = [seqs] if isinstance(seqs, int) else list(seqs)
        for seq in new:
            if type(seq) is not int or not 1 <= seq <= UINT_MAX:
                raise ValueError(f"invalid status seq {seq!r}")
        self._outbound.add_status_acks(new)

    def ack(self, ids: str | Iterable[str]) -> None:
        """Queue ACKs for delivered messages. ACKs queued before the writer next runs go out in one frame;
        ACKs not yet written when a connection fails are written after reconnecting. Does not block.

        With a local store the client ACKs by itself after saving; calling this too is harmless.
        Raises ValueError for an invalid id, ForbiddenError for operator sessions.
        """
        self._check_usable(needs_mailbox=True)
        new = [ids] if isinstance(ids, str) else list(ids)
        for i in new:
            if not is_valid_message_id(i):
                raise ValueError(f"invalid message id {i!r}")
        self._outbound.add_acks(new)

    async def pull(self) -> None:
        """Ask for every un-ACKed message again (oldest first, then DRAINED; see :meth:`wait_drained`).

        Raises ForbiddenError for operator sessions, the fatal error if the client failed,
        ConnectionLost if it is closed."""
        self._check_usable(needs_mailbox=True)
        if self._link is not None:
            self._link.queue(Pull())
            self._inbox.pull_sent()
            self._state.fire()
        # No link: the reconnect delivers the whole mailbox again anyway.
        await trio.lowlevel.checkpoint()

    async def wait_drained(self) -> int:
        """Wait until the broker has delivered everything it held at the last connect or :meth:`pull`
        (the matching DRAINED arrived; with a local store, those deliveries are also saved and their
        ACKs queued). Returns DRAINED's ``pending``: messages still un-ACKed at that moment.

        Returns at once if that has already happened. Raises the fatal error if the client fails,
        ConnectionLost if it is closed.
        """
        while True:
            self._state.raise_if_done()
            if self._inbox.is_drained():
                await trio.lowlevel.checkpoint()
                return self._inbox.drained_pending
            await self._state.changed()

    async def stats(self) -> dict[str, int]:
        """The broker's statistics (operator tokens). Raises ForbiddenError otherwise."""
        result = await self._request(Stats())
        assert isinstance(result, StatsResult)
        return dict(result.stats)

    async def cleanup(self) -> int:
        """Make the broker purge expired messages now; returns how many (operator tokens).
        Raises ForbiddenError otherwise."""
        result = await self._request(Cleanup())
        assert isinstance(result, CleanupResult)
        return result.purged

    async def put_key(self, record: KeyRecord) -> None:
        """Publish ``record`` as this mailbox's key record in the broker's directory (KEY_PUT), replacing
        its previous one. The record must be signed for this mailbox (``wire.e2e.make_key_record``).

        Raises KeyRefused (INVALID_KEY: the signature does not verify for this mailbox; STORE_UNREACHABLE:
        the broker could not reach its store, put it again later), ForbiddenError for an operator
        session, TypeError for something that is not a KeyRecord, and ConnectionLost like ``stats``.
        A KEY_PUT written on a link that failed before its answer is written again on the next one.
        """
        if type(record) is not KeyRecord:
            raise TypeError(f"put_key takes a wire.KeyRecord, not {type(record).__name__}")
        self._check_usable(needs_mailbox=True)
        result = await self._request(KeyPut(key=record))
        assert isinstance(result, KeyPutResult)
        if result.code is not None:
            code = ErrorCode(result.code) if result.code in ErrorCode._value2member_map_ else result.code
            name = code.name if isinstance(code, ErrorCode) else str(code)
            raise KeyRefused(code, f"the broker refused key record {result.kid!r} ({name})", result.kid)

    async def get_keys(self, mailboxes: str | Iterable[str]) -> dict[str, KeyRecord]:
        """The broker's current key records of these mailboxes (KEY_GET), keyed by mailbox in the order
        given; mailboxes without a record (or that are no mailbox ids) are absent. Repeats count once.

        The records are as the broker holds them: verify each for its mailbox
        (``wire.e2e.verify_key_record``) before trusting it. More mailboxes than WELCOME's
        ``max_recipients`` go in several KEY_GETs (one round trip each, written back to back). Raises
        ValueError for an element that is not text of at most 64 characters (before anything is sent),
        ForbiddenError for an operator session, ConnectionLost like ``stats``.
        """
        names = [mailboxes] if isinstance(mailboxes, str) else list(dict.fromkeys(mailboxes))
        self._check_usable(needs_mailbox=True)
        found = await self._lookup_keys(names)
        return {name: found[name] for name in names if name in found}

    async def rotate_key(self) -> str:
        """Make a new encryption key (same identity, so contacts see no key change), keep the previous one for
        ``max_ttl_s`` to open messages still queued under it, and publish the new record; returns its kid.
        Raises RuntimeError with ``e2e=False``, LocalStoreError, KeyRefused, the fatal error if the client stops."""
        keyring = self._e2e_keyring()
        record = await keyring.rotate()
        await self.put_key(record)
        return record.kid

    async def accept_key(self, mailbox: str) -> ContactKey:
        """Trust ``mailbox``'s new identity key: the changed key recorded when a send was refused with
        KeyChangedError (or a message failed with ``key_changed``); with none recorded, the key the directory
        has now (looked up). Compare its fingerprint with the contact first. Returns the contact as now pinned.
        Raises NoRecipientKeyError / InvalidRecipientKeyError if the directory has no valid record to accept,
        LocalStoreError, RuntimeError with ``e2e=False``."""
        keyring = self._e2e_keyring()
        contact = keyring.contacts.get(mailbox)
        new = contact.pending_ik if contact is not None else None
        if new is None:
            record = (await self.get_keys([mailbox])).get(mailbox)
            if record is None:
                raise NoRecipientKeyError([mailbox])
            if not verify_key_record(mailbox, record):
                raise InvalidRecipientKeyError([mailbox])
            new = record.ik
        await keyring.pin({mailbox: new})
        cached = keyring.records.get(mailbox)
        if cached is not None and cached.ik != new:
            del keyring.records[mailbox]  # looked up again on the next send
        return next(c for c in keyring.contact_keys() if c.mailbox == mailbox)

    def fingerprint(self) -> str:
        """This mailbox's own fingerprint (six groups of five digits): what contacts see for it. Raises
        RuntimeError with ``e2e=False`` or for an operator session."""
        keyring = self._e2e_keyring()
        assert keyring.mailbox is not None and keyring.identity is not None
        return fingerprint(keyring.mailbox, keyring.identity.public)

    def contacts(self) -> list[ContactKey]:
        """Every contact with a pinned key, by mailbox: its fingerprint, the safety number with this mailbox, and a
        changed key waiting to be accepted. Raises RuntimeError with ``e2e=False`` or for an operator session."""
        return self._e2e_keyring().contact_keys()

    async def close(self) -> None:
        """Finish gracefully: let the saver finish, write queued ACKs and BYE, and wait for the broker to close
        the connection, so every ACK written has taken effect (all bounded by CLOSE_TIMEOUT_S); then stop.
        Pending sends and requests raise ConnectionLost; the iterators end. Idempotent."""
        state = self._state
        if state.closed:
            return
        state.closed = True
        state.fire()
        with trio.move_on_after(CLOSE_TIMEOUT_S):
            while state.failure is None and not (
                self._opener.settled and self._inbox.settled and self._statuses.settled
            ):
                await state.changed()
            await self._say_bye()
        self._stop(ConnectionLost("the client was closed"))

    # ------------------------------------------------------------ internals: API support

    @property
    def _writing(self) -> bool:
        """Whether the current link's writer is in ``send_all`` (for tests of the direct write)."""
        return self._link is not None and self._link.writing

    def _check_usable(self, *, needs_mailbox: bool = False) -> None:
        self._state.raise_if_done()
        if needs_mailbox and self.welcome is not None and self.welcome.mailbox is None:
            raise ForbiddenError(ErrorCode.FORBIDDEN, "operator sessions have no mailbox: send, ack and pull need one")

    def _e2e_keyring(self) -> Keyring:
        self._state.raise_if_done()
        keyring = self._keyring
        if keyring is None:
            raise RuntimeError("end-to-end encryption is off for this client (e2e=False)")
        if not keyring.loaded:
            raise RuntimeError("this session has no mailbox, so no keys")
        return keyring

    async def _lookup_keys(self, mailboxes: list[str]) -> dict[str, KeyRecord]:
        """KEY_GET ``mailboxes`` (distinct, in chunks of ``max_recipients``); the records found. Unlike the public
        calls it also works while the client closes (the opener looks senders up until the last delivery)."""
        if self._state.failure is not None:
            self._state.raise_if_done()
        distinct = list(dict.fromkeys(mailboxes))
        if not distinct:
            return {}
        assert self.welcome is not None
        step = max(1, self.welcome.max_recipients)
        frames = [KeyGet(mailboxes=tuple(distinct[i : i + step])) for i in range(0, len(distinct), step)]
        requests = [self._pending.add_request(frame) for frame in frames]  # all valid, else none is sent
        self._outbound.wake()
        found: dict[str, KeyRecord] = {}
        for req in requests:
            result = await self._pending.wait_request(req)
            assert isinstance(result, KeyGetResult)
            found.update(result.keys)
        return found

    async def _seal(self, items: list[SendItem], plaintext: list[bool]) -> list[SendItem]:
        """``items`` with each body sealed to its recipients (docs/e2e.md), except the ``plaintext`` ones.
        Raises before anything is sent (see :meth:`send`)."""
        keyring = self._keyring
        assert keyring is not None and keyring.identity is not None and keyring.mailbox is not None
        recipients = [r for item, clear in zip(items, plaintext, strict=True) if not clear for r in item[1]]
        records = await check_recipients(keyring, recipients, self._lookup_keys)
        sender, identity, pad = keyring.mailbox, keyring.identity, self._pad_block
        sealed: list[SendItem] = []
        for n, (item, clear) in enumerate(zip(items, plaintext, strict=True), 1):
            if clear:
                sealed.append(item)
                continue
            body = seal(
                sender=sender,
                msg_id=item[0],
                recipients=[(r, records[r]) for r in item[1]],
                identity=identity,
                body=item[2],
                pad_block=pad,
            )
            sealed.append((item[0], item[1], body, item[3], item[4]))
            if n % CRYPTO_SLICE == 0:
                await trio.lowlevel.checkpoint()  # a large batch lets the client's other tasks run (receiving)
        return sealed

    async def _submit(self, items: list[SendItem], plaintext: list[bool]) -> list[Receipt]:
        """Seal ``items`` (unless ``plaintext``, or e2e is off), encode them through the current link (else judge
        them), register them, write them, await the receipts; record them with their plaintext bodies."""
        self._check_usable(needs_mailbox=True)
        clear = items
        if self._keyring is not None and not all(plaintext):
            _validate(items)
            items = await self._seal(items, plaintext)
            self._check_usable(needs_mailbox=True)
            security = [PLAINTEXT if p else E2E for p in plaintext]
        else:
            security = [PLAINTEXT] * len(items)
        link = self._link
        encoded = link.encode_sends(items) if link is not None else []
        if not encoded:  # no link to encode them now: the next one will
            assert self.welcome is not None
            check_sends(items, self.welcome.max_frame_bytes + 4)
        batch = self._pending.add_sends(items)
        if encoded:
            assert link is not None
            link.write_sends(encoded)
        receipts = await self._pending.wait(batch, items)
        if self._store is not None and self.mailbox is not None:
            await self._record_outgoing(self.mailbox, clear, receipts, security)
        return receipts

    async def _record_outgoing(
        self, mailbox: str, items: list[SendItem], receipts: list[Receipt], security: list[str]
    ) -> None:
        rows = []
        for (mid, _to, body, _ttl, notify), receipt, sec in zip(items, receipts, security, strict=True):
            accepted = {r: res.status.value for r, res in receipt.results.items() if res.status is not Status.REFUSED}
            if accepted:
                rows.append(SentMessage(mid, accepted, body, notify, sec))
        if rows and self._store is not None:
            try:
                await trio.to_thread.run_sync(self._store.record_outgoing, mailbox, rows)
            except Exception:
                log.exception("recording %d sent messages in the local store failed", len(rows))

    async def _request(self, frame: Frame) -> Frame:
        self._check_usable()
        req = self._pending.add_request(frame)
        self._outbound.wake()
        return await self._pending.wait_request(req)

    async def _say_bye(self) -> None:
        """Write BYE on the current link once queued ACKs can go out (waiting through a reconnect for them), then
        wait for the broker to close the connection: it applies every frame before BYE first (protocol.md 9.15),
        so when this returns every ACK written has taken effect."""
        state = self._state
        while state.failure is None:
            link = self._link
            if link is None:
                if not self._outbound.has_acks or not self._reconnect:
                    return
                await state.changed()  # reconnecting: the ACKs go out first
                continue
            link.say_bye()
            await link.quiet.wait()
            if link.bye_written:
                await link.ended.wait()
                return

    def _stop(self, error: RelayError) -> None:
        """Release every waiter with ``error`` and stop the background tasks."""
        self._pending.fail_all(error)
        self._stopped = True
        self._bg_scope.cancel()
        self._opener.stop()
        self._inbox.stop()
        self._statuses.stop()
        self._state.fire()

    def _fail(self, error: RelayError) -> None:
        if self._state.failure is None and not self._state.closed:
            log.warning("relay client stopped: %s", error)
            self._state.failure = error
        self._stop(error)

    def _abandon(self) -> None:
        """The body of ``open_client`` raised or was cancelled: drop everything at once."""
        self._state.closed = True
        self._stop(ConnectionLost("the client was abandoned"))

    # ------------------------------------------------------------ the supervisor

    async def _supervise(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve links one after another until closed or a fatal error. The first connect's errors are
        raised (before ``task_status.started()``); later ones are retried or end the client."""
        with self._bg_scope:
            reason: RelayError | None = await self._serve_link(task_status)
            while reason is not None and self._carry_on(reason):
                reason = await self._reconnect_once(reason)

    async def _serve_link(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> RelayError:
        """Connect, complete the handshake and serve the link until it ends; returns why it ended.

        Raises ConnectionLost if the transport failed or no WELCOME came in time, ProtocolViolation for a
        bad answer, AuthenticationError etc. if the broker refused (ValueError for an unknown scheme)."""
        hello = Hello(version=PROTOCOL_VERSION, token=self._token, agent=self._agent)
        with trio.CancelScope(deadline=trio.current_time() + HANDSHAKE_TIMEOUT_S) as connecting:
            try:
                async with self._open_transport(self.endpoint) as transport:
                    conn, welcome, leftover = await handshake(transport, self.endpoint, hello)
                    keyring = self._keyring
                    key_put = None
                    if keyring is not None and welcome.mailbox is not None:
                        await keyring.load(welcome.mailbox, welcome.max_ttl_s)
                        key_put = KeyPut(key=keyring.record)
                    connecting.deadline = math.inf
                    link = Link(
                        transport,
                        conn,
                        welcome,
                        gen=self._gen + 1,
                        endpoint=self.endpoint,
                        outbound=self._outbound,
                        pending=self._pending,
                        inbox=self._opener,
                        statuses=self._statuses,
                        key_put=key_put,
                        token_source=self._new_token if self._refresh_token is not None else None,
                    )
                    self._open_link(link)
                    task_status.started()
                    try:
                        return await link.run(leftover)
                    finally:
                        self._link = None
                        self._state.connected = False
                        self._state.fire()
            except TLSFailed as exc:
                raise TLSError(exc.reason, str(exc)) from None
            except TransportClosed as exc:
                raise ConnectionLost(str(exc)) from None
        raise ConnectionLost(f"no WELCOME from {self.endpoint} within {HANDSHAKE_TIMEOUT_S:g} s")

    def _open_link(self, link: Link) -> None:
        welcome = link.welcome
        self._gen = link.gen
        self.connects += 1
        self.welcome = welcome
        self._inbox.link_opened(link.gen, welcome.mailbox)
        self._statuses.link_opened(welcome.mailbox)
        # Everything unanswered goes out again: SEND and ACK are idempotent, requests are answered in order.
        self._pending.relink()
        link.resend_pending()
        self._link = link
        self._state.connected = True
        log.info("session %s open on %s (mailbox %s)", welcome.session, self.endpoint, welcome.mailbox)
        self._state.fire()
        self._report(
            ConnectionState.CONNECTED if self.connects == 1 else ConnectionState.RECONNECTED,
            mailbox=welcome.mailbox,
            pending=welcome.pending,
        )

    async def _new_token(self) -> str:
        """A newer token from ``refresh_token``, which the next HELLO also carries. Raises what the callback raises,
        and TypeError/ValueError for something that is not a token."""
        assert self._refresh_token is not None
        token = await self._refresh_token()
        if not isinstance(token, str) or not token or len(token) > 4096:
            raise ValueError(f"refresh_token returned {type(token).__name__}, not a token (a non-empty string)")
        self._token = token
        return token

    def _expired_but_refreshable(self, error: RelayError) -> bool:
        """Whether ``error`` is a TOKEN_EXPIRED that a token from ``refresh_token`` may cure (then it is not fatal)."""
        if error.code == ErrorCode.TOKEN_EXPIRED and self._refresh_token is not None:
            self._token_stale = True
            return True
        return False

    def _carry_on(self, reason: RelayError) -> bool:
        """A link ended with ``reason``: whether to reconnect (else the client stops here)."""
        if self._stopped or self._state.failure is not None:
            return False
        refreshable = self._expired_but_refreshable(reason)
        if (reason.code is not None and is_fatal(reason.code) and not refreshable) or not self._reconnect:
            self._give_up(reason)
            return False
        log.info("connection to %s lost (%s); reconnecting", self.endpoint, reason)
        if not self._state.closed:  # while closing, the end of the link is the client's own doing
            self._report(ConnectionState.DISCONNECTED, reason=reason)
        return True

    async def _reconnect_once(self, reason: RelayError) -> RelayError | None:
        """Retry with backoff until a link is served (returns why it ended) or a fatal error (None). A broker that
        refused with RATE_LIMITED (4006, ``reason`` or a failed attempt) is not tried again before its hint."""
        attempt = 0
        while True:
            delay = min(self._backoff_max_s, self._backoff_initial_s * 2 ** min(attempt, _MAX_BACKOFF_DOUBLINGS))
            attempt += 1
            hint = reason.retry_after_s if isinstance(reason, RateLimited) else 0.0
            await trio.sleep(max(random.uniform(delay / 2, delay), hint))
            if self._token_stale:
                try:
                    await self._new_token()
                except Exception:
                    log.exception("refresh_token failed; reconnect attempt %d waits for a token", attempt)
                    continue
                self._token_stale = False
            try:
                return await self._serve_link()
            except RelayError as exc:
                reason = exc
                if self._expired_but_refreshable(exc):
                    log.info(
                        "reconnect attempt %d to %s: the token expired; asking refresh_token", attempt, self.endpoint
                    )
                    continue
                if exc.code is not None and is_fatal(exc.code):
                    self._give_up(exc)
                    return None
                log.info("reconnect attempt %d to %s failed: %s", attempt, self.endpoint, exc)

    def _give_up(self, error: RelayError) -> None:
        self._fail(error)
        self._report(ConnectionState.STOPPED, reason=error)

    def _report(self, state: ConnectionState, **fields: Any) -> None:
        """Tell ``on_connection_change``; a callback that raises is logged, never allowed to stop the client."""
        callback = self._on_connection_change
        if callback is None:
            return
        try:
            callback(ConnectionEvent(state=state, url=str(self.endpoint), connects=self.connects, **fields))
        except Exception:
            log.exception("on_connection_change callback failed for %s", state)


# ---------------------------------------------------------------- entry point


@asynccontextmanager
async def open_client(url: str, token: str, **options: Unpack[ClientOptions]) -> AsyncIterator[RelayClient]:
    """Connect to the broker at ``url`` (``tcp://host[:port]``, default port 7700, or
    ``ws://host[:port][/path]``) with ``token`` and yield a :class:`RelayClient`; on normal exit it
    closes gracefully (BYE), on an exception or cancellation it drops the connection at once
    (un-ACKed messages stay with the broker).

    The first connection is made before this yields: raises ValueError for a bad URL or token,
    ConnectionLost if the broker is unreachable, AuthenticationError / ProtocolViolation if it
    refuses. Later failures are retried (``reconnect=True``) with backoff from
    ``backoff_initial_s`` doubling to ``backoff_max_s``, except the fatal ones.

    Options (:class:`ClientOptions`): ``local_store``: save deliveries and delivery statuses there
    before ACKing them, and record sent messages with each recipient's state. ``agent``: a name for
    this client in HELLO. ``transport_factory``: how to open a transport for the parsed URL (tests,
    custom transports).
    ``e2e`` (default True): end-to-end encryption (docs/e2e.md): this device's keys live in the
    local store (made at the first connect; without a local store they are made in memory for this
    client's lifetime, so contacts see a key change each time it restarts), its key record is
    published on every connect before anything else is written (this returns once the broker has
    stored it, so a contact may look it up at once), sends are sealed (see
    :meth:`RelayClient.send`) and envelopes opened (:class:`Delivery` ``security``). ``e2e=False``
    is the explicit choice to send everything in the clear and publish nothing. ``pad_block``: sealed
    bodies are padded to a multiple of it (default 256). ``refresh_token``: an async function returning a
    newer token for the same mailbox; with it the session outlives its token (the client sends the new one in a
    REFRESH once three quarters of the session's time have passed) and a TOKEN_EXPIRED makes the client
    reconnect with a new token instead of stopping.
    ``on_connection_change``: called with a frozen :class:`ConnectionEvent` once for each change of
    connection state: CONNECTED (before this yields), then DISCONNECTED (with the reason, e.g.
    SHUTTING_DOWN 4004 or a broken transport) and RECONNECTED for each reconnect, and STOPPED
    (with the fatal error, e.g. CONNECTED_ELSEWHERE 4001) if the client gives up. It runs in the
    client's own task: it must not block (an exception from it is logged and ignored). An unknown
    option raises TypeError.
    """
    endpoint = parse_url(url)
    if not isinstance(token, str) or not token or len(token) > 4096:
        raise ValueError("the token must be a non-empty string (a JWT from `relay-broker token`)")
    client = RelayClient(endpoint, token, **options)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(client._supervise)
            if client._keyring is not None:
                nursery.start_soon(client._opener.run)
                link = client._link
                if link is not None:  # yield once this device's key is in the directory: others can write to it
                    await link.published.wait()
            if client._store is not None:
                nursery.start_soon(client._inbox.run_saver)
                nursery.start_soon(client._statuses.run_saver)
            try:
                yield client
            except BaseException:
                client._abandon()
                raise
            await client.close()
    except BaseExceptionGroup as group:
        # Background tasks never raise (failures are reported to the waiters), so a group here
        # wraps the one exception from the body or the first connect: raise that, not the group.
        exc: BaseException = group
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        if exc is group:
            raise
        raise exc from None
