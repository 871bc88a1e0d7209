"""End-to-end encryption in the client (docs/e2e.md): the device's keys and contacts, sealing SENDs, opening DELIVERs.

Theory of operation. :class:`Keyring` holds one mailbox's keys and contacts: the Ed25519 identity, the current
X25519 encryption key and the retired ones (kept ``max_ttl_s`` after retirement, then deleted), and per contact
the identity key pinned on first use plus a *pending* one when the directory has shown another. With a local
store it is a write-through copy of the store's tables (loaded at the first WELCOME, when the mailbox is known);
without one everything lives in memory for the client's lifetime, so contacts see a key change when such a
client restarts. It also caches, per connection, the key records looked up in the directory (``key_get``), so a
conversation costs one lookup per recipient per connection.

:func:`check_recipients` is the sending rule of docs/e2e.md section 7 (verify every record, pin on first use,
refuse a changed key or a missing record before anything is written); the client then seals each message with
``wire.e2e.seal``.

:class:`EnvelopeOpener` sits between the link's reader and the :class:`~client._inbox.Inbox`. A chunk of deliveries
with no envelope in it, arriving while the opener holds nothing, goes straight to the inbox: a plaintext body costs
one 4-byte prefix check. Otherwise the chunk (and any DRAINED after it, to keep the order) queues for the opener's
task, which for everything queued peeks each envelope (steps 2-4 from the header: a replay never costs a lookup),
looks up in one ``key_get`` the senders with no pinned key (and those whose envelope names another key, to record
the change as pending), pins what it learned, opens each envelope (steps 5-8) and hands the deliveries on in
arrival order: the decrypted body with security ``e2e``, or an empty body with ``failed`` and the reason. A failed
message is saved and ACKed like any other (it would only come back), never shown as text from its sender.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import trio

from wire import KeyRecord
from wire.e2e import (
    E2E_MAGIC,
    E2EError,
    EncryptionKey,
    Identity,
    Peeked,
    fingerprint,
    make_key_record,
    open_envelope,
    peek,
    safety_number,
    verify_key_record,
)

from ._inbox import ClientState, Delivery, Inbox
from .errors import (
    InvalidRecipientKeyError,
    KeyChange,
    KeyChangedError,
    LocalStoreError,
    NoRecipientKeyError,
    RelayError,
)
from .localstore import E2E, FAILED, Contact, LocalStore, StoredKeys

__all__ = [
    "CRYPTO_SLICE",
    "MAX_CACHED_RECORDS",
    "ContactKey",
    "Keyring",
    "EnvelopeOpener",
    "contact_keys",
    "device_keys",
]

log = logging.getLogger(__name__)

MAX_CACHED_RECORDS = 4096
"""Directory records remembered per connection; past this the cache starts afresh (a lookup costs one round trip)."""

Lookup = Callable[[list[str]], Awaitable[dict[str, KeyRecord]]]
"""``RelayClient.get_keys``: one ``key_get`` for these mailboxes; their records (only those that have one)."""


CRYPTO_SLICE = 16
"""Messages sealed (a send) or opened (the opener) between two checkpoints: each takes about half a millisecond of
CPU, so a batch of thousands would otherwise hold the event loop for seconds, starving the client's other tasks
(its reader, keepalives, the application's receiving)."""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class ContactKey:
    """A contact as :meth:`RelayClient.contacts` and ``relay keys`` show it.

    ``fingerprint`` names the identity key pinned for ``mailbox``; ``safety_number`` is the pair of it and this
    mailbox's own fingerprint (the same twelve groups on both devices: compare them out of band). ``changed`` means
    the directory has shown another key since (``new_fingerprint``): nothing is sent to the contact, and its
    messages signed by the new key fail, until the change is accepted (``accept_key``)."""

    mailbox: str
    fingerprint: str
    safety_number: str
    pinned_at: int
    """When the key was pinned (Unix ms)."""
    new_fingerprint: str | None = None
    new_safety_number: str | None = None

    @property
    def changed(self) -> bool:
        """Whether a key change is waiting to be accepted."""
        return self.new_fingerprint is not None


def contact_keys(me: str, my_ik: bytes, contacts: Iterable[Contact]) -> list[ContactKey]:
    """``me``'s contacts with fingerprints and safety numbers, sorted by mailbox."""
    out = []
    for c in sorted(contacts, key=lambda c: c.contact):
        pending = c.pending_ik
        out.append(
            ContactKey(
                mailbox=c.contact,
                fingerprint=fingerprint(c.contact, c.ik),
                safety_number=safety_number(me, my_ik, c.contact, c.ik),
                pinned_at=c.pinned_at,
                new_fingerprint=None if pending is None else fingerprint(c.contact, pending),
                new_safety_number=None if pending is None else safety_number(me, my_ik, c.contact, pending),
            )
        )
    return out


def device_keys(store: LocalStore, mailbox: str) -> StoredKeys:
    """``mailbox``'s keys in ``store``, made (and stored) first if it has none. Blocking; raises sqlite3.Error."""
    keys = store.device_keys(mailbox)
    if keys is None:
        ek = EncryptionKey.generate()
        keys = store.create_device_keys(mailbox, Identity.generate().seed, ek.kid, ek.private)
    return keys


class Keyring:
    """One mailbox's keys, contacts and looked-up records (see the module docstring). Made empty; :meth:`load` fills
    it once the mailbox is known."""

    __slots__ = ("_retired", "_store", "contacts", "current", "identity", "keys", "mailbox", "records")

    def __init__(self, store: LocalStore | None) -> None:
        self._store = store
        self.mailbox: str | None = None
        self.identity: Identity | None = None
        self.current: EncryptionKey | None = None
        self.keys: dict[str, EncryptionKey] = {}
        """kid -> key, the current one and the retired ones still kept: what opening may use."""
        self._retired: dict[str, int] = {}
        """kid -> when it was retired (Unix ms)."""
        self.contacts: dict[str, Contact] = {}
        self.records: dict[str, KeyRecord] = {}
        """Records looked up (and verified) on the current connection."""

    @property
    def loaded(self) -> bool:
        return self.identity is not None

    @property
    def record(self) -> KeyRecord:
        """This device's key record: the current encryption key, signed for the mailbox."""
        assert self.mailbox is not None and self.identity is not None and self.current is not None
        return make_key_record(self.mailbox, self.identity, self.current)

    async def load(self, mailbox: str, max_ttl_s: int) -> None:
        """On a connect: load (or make) the mailbox's keys and contacts the first time, and delete encryption keys
        retired more than ``max_ttl_s`` ago (no message sealed to them can still be queued). Forgets the records
        looked up on the previous connection. Raises LocalStoreError."""
        self.records.clear()
        retired_before = _now_ms() - max_ttl_s * 1000
        store = self._store
        if store is None:
            if self.identity is None:
                self.mailbox = mailbox
                self.identity = Identity.generate()
                self._use_current(EncryptionKey.generate())
            for kid in [k for k, at in self._retired.items() if at < retired_before]:
                self._forget(kid)
            return

        def read() -> tuple[StoredKeys, list[Contact]]:
            store.purge_retired_keys(mailbox, retired_before)
            return device_keys(store, mailbox), store.contacts(mailbox)

        try:
            keys, contacts = await trio.to_thread.run_sync(read)
        except Exception as exc:
            raise LocalStoreError(f"reading this device's keys from the local store failed: {exc}") from exc
        self.mailbox = mailbox
        self.identity = Identity.from_seed(keys.seed)
        self.keys, self._retired = {}, {}
        for old in keys.retired:
            assert old.retired_at is not None
            key = EncryptionKey.from_private(old.private)
            self.keys[key.kid] = key
            self._retired[key.kid] = old.retired_at
        self._use_current(EncryptionKey.from_private(keys.current.private))
        self.contacts = {c.contact: c for c in contacts}

    def _use_current(self, key: EncryptionKey) -> None:
        self.current = key
        self.keys[key.kid] = key

    def _forget(self, kid: str) -> None:
        del self.keys[kid]
        del self._retired[kid]

    async def rotate(self) -> KeyRecord:
        """Make a new current encryption key (same identity) and retire the old one; returns the new record.
        Raises LocalStoreError (then nothing changed)."""
        assert self.mailbox is not None and self.current is not None
        new = EncryptionKey.generate()
        if self._store is not None:
            try:
                await trio.to_thread.run_sync(self._store.rotate_encryption_key, self.mailbox, new.kid, new.private)
            except Exception as exc:
                raise LocalStoreError(f"storing the new encryption key failed: {exc}") from exc
        self._retired[self.current.kid] = _now_ms()
        self._use_current(new)
        return self.record

    def cache(self, mailbox: str, record: KeyRecord) -> None:
        if len(self.records) >= MAX_CACHED_RECORDS:
            self.records.clear()
        self.records[mailbox] = record

    # ------------------------------------------------------------ contacts

    async def pin(self, pins: Mapping[str, bytes]) -> None:
        """Pin these identity keys (first use, or an accepted change); a pending key of each is cleared.
        Raises LocalStoreError."""
        assert self.mailbox is not None
        fresh = {
            c: ik for c, ik in pins.items() if (old := self.contacts.get(c)) is None or old.ik != ik or old.pending_ik
        }
        if not fresh:
            return
        if self._store is not None:
            try:
                await trio.to_thread.run_sync(self._store.pin_keys, self.mailbox, fresh)
            except Exception as exc:
                raise LocalStoreError(f"pinning contacts' keys in the local store failed: {exc}") from exc
        now = _now_ms()
        for c, ik in fresh.items():
            self.contacts[c] = Contact(self.mailbox, c, ik, now)

    async def set_pending(self, pending: Mapping[str, bytes]) -> None:
        """Record keys the directory shows that differ from the pinned ones. Raises LocalStoreError."""
        assert self.mailbox is not None
        fresh = {
            c: ik
            for c, ik in pending.items()
            if (old := self.contacts.get(c)) is not None and old.ik != ik and old.pending_ik != ik
        }
        if not fresh:
            return
        if self._store is not None:
            try:
                await trio.to_thread.run_sync(self._store.set_pending_keys, self.mailbox, fresh)
            except Exception as exc:
                raise LocalStoreError(f"recording changed keys in the local store failed: {exc}") from exc
        now = _now_ms()
        for c, ik in fresh.items():
            self.contacts[c] = replace(self.contacts[c], pending_ik=ik, pending_at=now)

    def contact_keys(self) -> list[ContactKey]:
        assert self.mailbox is not None and self.identity is not None
        return contact_keys(self.mailbox, self.identity.public, self.contacts.values())


async def check_recipients(keyring: Keyring, recipients: Sequence[str], lookup: Lookup) -> dict[str, KeyRecord]:
    """Each recipient's verified key record, by the sending rule of docs/e2e.md section 7: one lookup for those not
    looked up on this connection; an invalid record -> InvalidRecipientKeyError, a pinned key other than the
    record's -> KeyChangedError (the new key recorded as pending), no record -> NoRecipientKeyError; only when all
    pass are the new ones pinned (trust on first use). Raises before anything is sent, and the fatal error if the
    client stops during the lookup."""
    records = keyring.records
    missing = [r for r in dict.fromkeys(recipients) if r not in records]
    if missing:
        found = await lookup(missing)
        bad = [r for r in missing if r in found and not verify_key_record(r, found[r])]
        if bad:
            raise InvalidRecipientKeyError(bad)
        for r in missing:
            if r in found:
                keyring.cache(r, found[r])
    absent = [r for r in dict.fromkeys(recipients) if r not in records]
    chosen = {r: records[r] for r in recipients if r in records}
    changed: list[KeyChange] = []
    for r, record in chosen.items():
        pinned = keyring.contacts.get(r)
        if pinned is not None and pinned.ik != record.ik:
            changed.append(KeyChange(r, fingerprint(r, pinned.ik), fingerprint(r, record.ik)))
    if changed:
        await keyring.set_pending({c.mailbox: chosen[c.mailbox].ik for c in changed})
        raise KeyChangedError(changed)
    if absent:
        raise NoRecipientKeyError(absent)
    await keyring.pin({r: rec.ik for r, rec in chosen.items() if r not in keyring.contacts})
    return chosen


# ---------------------------------------------------------------- receiving


class _DrainMark:
    __slots__ = ("gen", "pending")

    def __init__(self, gen: int, pending: int) -> None:
        self.gen = gen
        self.pending = pending


def _failed(d: Delivery, reason: str) -> Delivery:
    return Delivery(d.id, d.sender, d.sent_at, d.expires_at, d.attempt, b"", FAILED, reason)


def _is_envelope(d: Delivery) -> bool:
    return d.body[:4] == E2E_MAGIC


class EnvelopeOpener:
    """Opens envelopes between the reader and the inbox, keeping arrival order (see the module docstring).

    With ``keyring`` None (a client opened with ``e2e=False``) nothing is looked up or opened: an envelope is
    handed on at once as failed (``unknown_key``: this client holds no key), a plaintext body as it is."""

    __slots__ = ("_busy", "_inbox", "_keyring", "_lookup", "_on_failure", "_queue", "_scope", "_state", "_wake")

    def __init__(
        self,
        inbox: Inbox,
        keyring: Keyring | None,
        lookup: Lookup,
        state: ClientState,
        on_failure: Callable[[RelayError], None],
    ) -> None:
        self._inbox = inbox
        self._keyring = keyring
        self._lookup = lookup
        self._state = state
        self._on_failure = on_failure
        self._queue: list[list[Delivery] | _DrainMark] = []
        self._busy = False
        self._wake = trio.Event()
        self._scope = trio.CancelScope()

    # ------------------------------------------------------------ from the reader

    def accept(self, deliveries: list[Delivery]) -> None:
        """One chunk's deliveries, in arrival order."""
        if not self._queue and not self._busy:
            if not any(d.body[:4] == E2E_MAGIC for d in deliveries):
                self._inbox.accept(deliveries)
                return
            if self._keyring is None:
                self._inbox.accept([_failed(d, "unknown_key") if _is_envelope(d) else d for d in deliveries])
                return
        self._queue.append(deliveries)
        self._wake.set()

    def drained(self, gen: int, pending: int) -> None:
        """DRAINED arrived on link ``gen``: counted once the deliveries before it are handed on."""
        if not self._queue and not self._busy:
            self._inbox.drained(gen, pending)
        else:
            self._queue.append(_DrainMark(gen, pending))
            self._wake.set()

    @property
    def settled(self) -> bool:
        """Whether nothing waits to be opened."""
        return not self._queue and not self._busy

    def stop(self) -> None:
        self._scope.cancel()

    # ------------------------------------------------------------ the task

    async def run(self) -> None:
        """Open what is queued, in order, until :meth:`stop`. Deliveries not handed on when the client stops were
        not ACKed, so the broker delivers them again."""
        with self._scope:
            while True:
                if not self._queue:
                    await self._wake.wait()
                    self._wake = trio.Event()
                    continue
                self._busy = True
                items, self._queue = self._queue, []
                try:
                    opened = await self._open_all([d for item in items if type(item) is list for d in item])
                except RelayError as exc:
                    # The client is stopping (or just failed): nothing handed on, so nothing ACKed.
                    self._busy = False
                    self._state.fire()
                    if isinstance(exc, LocalStoreError):
                        self._on_failure(exc)
                    return
                flags = iter(opened)
                for item in items:
                    if type(item) is list:
                        self._inbox.accept([next(flags) for _ in item])
                    else:
                        self._inbox.drained(item.gen, item.pending)  # type: ignore[union-attr]
                self._busy = False
                self._state.fire()

    async def _open_all(self, deliveries: list[Delivery]) -> list[Delivery]:
        """Every delivery as the application sees it, in order (docs/e2e.md "Opening")."""
        keyring = self._keyring
        assert keyring is not None
        me = keyring.mailbox
        assert me is not None
        headers: list[Peeked | str | None] = []  # the header, a failure reason, or None for plaintext
        wanted: dict[str, None] = {}
        for d in deliveries:
            if not _is_envelope(d):
                headers.append(None)
                continue
            try:
                p = peek(d.body)
            except E2EError as exc:
                headers.append(exc.reason)
                continue
            if p.sender != d.sender or p.id != d.id:
                headers.append("mismatch")
            elif me not in p.kids:
                headers.append("not_for_me")
            else:
                headers.append(p)
                pinned = keyring.contacts.get(d.sender)
                if pinned is None:
                    wanted[d.sender] = None
                elif pinned.ik != p.ik:  # key_changed: is it the directory's key now? (record the change)
                    cached = keyring.records.get(d.sender)
                    if cached is None or cached.ik != p.ik:
                        wanted[d.sender] = None
        if wanted:
            await self._learn(keyring, list(wanted))
        out = []
        opened = 0
        for d, h in zip(deliveries, headers, strict=True):
            if h is None:
                out.append(d)
            elif type(h) is str:
                out.append(_failed(d, h))
            else:
                opened += 1
                if opened % CRYPTO_SLICE == 0:
                    await trio.lowlevel.checkpoint()  # before reading the pin: accept_key may run meanwhile
                pinned = keyring.contacts.get(d.sender)
                if pinned is None:
                    out.append(_failed(d, "no_sender_key"))
                    continue
                try:
                    body = open_envelope(
                        d.body, sender=d.sender, msg_id=d.id, me=me, sender_ik=pinned.ik, my_keys=keyring.keys
                    )
                except E2EError as exc:
                    out.append(_failed(d, exc.reason))
                    continue
                out.append(Delivery(d.id, d.sender, d.sent_at, d.expires_at, d.attempt, body, E2E))
        return out

    async def _learn(self, keyring: Keyring, senders: list[str]) -> None:
        """Look up ``senders``' records (one ``key_get``): pin the new ones' keys, record changed ones as pending.
        A record that does not verify for its mailbox is ignored (the sender then has no key: ``no_sender_key``)."""
        found = await self._lookup(senders)
        fresh: dict[str, bytes] = {}
        changed: dict[str, bytes] = {}
        for sender in senders:
            record = found.get(sender)
            if record is None:
                continue
            if not verify_key_record(sender, record):
                log.warning("the directory's key record for %s does not verify: ignored", sender)
                continue
            keyring.cache(sender, record)
            pinned = keyring.contacts.get(sender)
            if pinned is None:
                fresh[sender] = record.ik
            elif pinned.ik != record.ik:
                changed[sender] = record.ik
        await keyring.pin(fresh)
        await keyring.set_pending(changed)
