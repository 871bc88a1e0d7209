// The browser client's local message store: IndexedDB, one database per mailbox.
//
// Seven object stores:
//   inbox     keyed by [from, id]:
//             {id, from, body: Uint8Array, sent_at, expires_at, attempt, received_at, state: "saved" | "acked",
//              security: "e2e" | "plaintext" | "failed", reason?}
//             `body` is what the user reads: the decrypted text of an end-to-end encrypted message
//             ("e2e"), the body as delivered ("plaintext": not encrypted, so nothing vouches for its
//             sender or content), or empty ("failed": an envelope that did not open, `reason` from
//             docs/e2e.md "Opening": never to be shown as text from its sender).
//   outbox    keyed by id (this mailbox is the sender of every entry):
//             {id, to: [mailbox], body, ttl_s?, notify?, created_at, results: {mailbox: {status, code?}} | null, code?,
//              security: "e2e" | "plaintext", sealed?: Uint8Array}
//             `body` is the text as written; `sealed` (for "e2e") the envelope that goes on the wire,
//             so a resend after a reload sends the same envelope without sealing again.
//   device    keyed by name: this device's identity key, one record named "identity":
//             {name: "identity", privateKey: CryptoKey (Ed25519, non-extractable), public: Uint8Array(32), created_at}
//   enc_keys  keyed by kid: this device's encryption keys, the current one (retired_at null) and
//             retired ones kept to open messages still queued under them:
//             {kid, privateKey: CryptoKey (X25519, non-extractable), public: Uint8Array(32), created_at, retired_at: number | null}
//   contacts  keyed by mailbox: the identity key pinned for each contact (trust on first use), and
//             the one the directory shows now if it differs (not trusted until the user accepts it):
//             {mailbox, ik: Uint8Array(32), pinned_at, pending_ik: Uint8Array(32) | null, pending_at: number | null}
//   statuses  keyed by [id, recipient]: what the relay said became of an outgoing message for
//             one recipient (protocol.md, "Delivery status"):
//             {id, recipient, state: "delivered" | "expired", at, seq, received_at}
//   overflows keyed by first_seq: statuses the relay did not keep one by one (its per-mailbox
//             bound), one record per overflow status, kept at its latest (largest) count:
//             {first_seq, seq, state: "overflow", count, at, received_at}
//
// Message identity. A received message is identified by (sender, id), not by id alone: the
// broker holds at most one message per (recipient, id) at a time, but once a message has
// expired (and its tombstone with it) another sender may use the same id. So the inbox key
// de-duplicates redeliveries of the *same* sender's message (a message delivered twice is
// stored once), while another sender's message with a reused id is a new message.
//
// An outbox entry whose `results` is null and that has no `code` is a send the broker has not
// confirmed; the client sends it again, with the same id, after a reconnect or a page reload
// (the broker answers "duplicate" if it already holds it). `code` marks a SEND the broker
// refused as a whole (3004 TOO_MANY_RECIPIENTS, 3007 BODY_TOO_LARGE): nothing was stored. A receipt
// with 3008 STORE_UNREACHABLE (the broker could not reach its store: maybe stored, maybe not) confirms
// nothing, so it leaves the entry unconfirmed: it is sent again, with the same id, like any other.
//
// Statuses are kept apart from the outbox entries they are about, for three reasons: a status
// can arrive before the receipt of its message (the recipient may ACK before the receipt is
// written), so it must not depend on (or be overwritten by) the receipt; a status may be about
// a message this browser has no outbox entry for (sent by another client of this mailbox), and
// it is still saved before it is ACKed; and a redelivered status (same seq) is recognised by
// its key. outbox() joins them: each entry comes with `statuses: {recipient: record}`, and
// deliveryStates(entry) says, per recipient, the one state to show.
//
// Private keys are CryptoKeys made non-extractable by WebCrypto: IndexedDB keeps them by
// structured clone, and neither this page nor anything else can read their bytes out.
//
// Versions. 1 keyed the inbox by id alone; 2 keys it by [from, id]; 3 adds statuses and
// overflows; 4 adds device, enc_keys and contacts, and every inbox and outbox record gets its
// `security` (records from before 4 were all sent and received in the clear: "plaintext").
// Opening an older database upgrades it in place (onupgradeneeded, one versionchange
// transaction: all or nothing; if anything fails the database stays as it was).

import { ERROR_CODES } from './codec.js'

export const VERSION = 4
/** The inbox's key path: a message's identity for this client. */
export const INBOX_KEY = Object.freeze(['from', 'id'])
/** The statuses store's key path: one outgoing message, one recipient. */
export const STATUS_KEY = Object.freeze(['id', 'recipient'])

function promised (request) {
  return new Promise((resolve, reject) => {
    request.onsuccess = () => resolve(request.result)
    request.onerror = () => reject(request.error)
  })
}

function done (tx) {
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve()
    tx.onerror = () => reject(tx.error)
    tx.onabort = () => reject(tx.error || new Error('transaction aborted'))
  })
}

/** obj[key] = value, also for a key such as "__proto__" (a recipient as written may be anything). */
function setKey (obj, key, value) {
  Object.defineProperty(obj, key, { value, enumerable: true, writable: true, configurable: true })
}

function createInbox (db) {
  db.createObjectStore('inbox', { keyPath: [...INBOX_KEY] }).createIndex('received_at', 'received_at')
}

function createOutbox (db) {
  db.createObjectStore('outbox', { keyPath: 'id' }).createIndex('created_at', 'created_at')
}

/** Version 2 -> 3 (and part of creating a database): the delivery-status stores, empty. */
function createStatusStores (db) {
  db.createObjectStore('statuses', { keyPath: [...STATUS_KEY] })
  db.createObjectStore('overflows', { keyPath: 'first_seq' })
}

/** Version 3 -> 4 (and part of creating a database): the key stores, empty. */
function createKeyStores (db) {
  db.createObjectStore('device', { keyPath: 'name' })
  db.createObjectStore('enc_keys', { keyPath: 'kid' })
  db.createObjectStore('contacts', { keyPath: 'mailbox' })
}

/** Version 3 -> 4: every record of `name` (inbox or outbox) was sent or received in the clear. */
function markPlaintext (tx, name) {
  const cursor = tx.objectStore(name).openCursor()
  cursor.onsuccess = () => {
    const c = cursor.result
    if (c === null) return
    if (c.value.security === undefined) c.update({ ...c.value, security: 'plaintext' })
    c.continue()
  }
}

/**
 * Per recipient of an outbox entry (as outbox() returns it, with `statuses`), the one state to
 * show, from the receipt and the statuses together:
 *   "sending"    no receipt yet (and no status): the send goes out again after a reconnect or reload
 *   "refused"    refused for this recipient (its result has a `code`), or the whole SEND refused
 *                (the entry's `code`): nothing was stored for them
 *   "queued"     stored at the relay (the receipt said queued, delivered or duplicate) and not yet
 *                saved on the recipient's device, as far as this browser has heard
 *   "delivered"  the recipient's device saved and ACKed it (a "delivered" status)
 *   "expired"    it expired at the relay before the recipient's device ACKed it (an "expired" status)
 * A status wins over the receipt, and over a missing one: a status may arrive first. Recipients
 * are the receipt's (keyed as written in `to`), else `to`'s, then any other a status names.
 * Returns a plain object {recipient: state} in that order.
 */
export function deliveryStates (entry) {
  const statuses = entry.statuses ?? {}
  const recipients = new Set(entry.results ? Object.keys(entry.results) : entry.to)
  for (const recipient of Object.keys(statuses)) recipients.add(recipient)
  const states = {}
  for (const recipient of recipients) {
    const result = entry.results?.[recipient]
    let state
    if (result?.status === 'refused' || entry.code !== undefined) state = 'refused'
    else if (Object.hasOwn(statuses, recipient)) state = statuses[recipient].state
    else if (entry.results === null || entry.results === undefined) state = 'sending'
    else state = 'queued'
    setKey(states, recipient, state)
  }
  return states
}

/**
 * How many statuses the relay folded into overflow statuses instead of keeping them one by one,
 * from the overflow records saved (overflows()): protocol.md 9, rule 19, "for each distinct
 * `first_seq` it received, the largest `count` it received with that `first_seq`, summed".
 * saveStatus keeps one record per first_seq at its largest count, so this is their sum.
 */
export function missedStatuses (overflows) {
  return overflows.reduce((sum, o) => sum + o.count, 0)
}

/**
 * Version 1 -> 2: the inbox was keyed by id; re-key every record by [from, id]. Runs inside the
 * versionchange transaction, so it is all or nothing. Version 1 had at most one record per id,
 * so no two old records can collide under the new key.
 */
function migrateInboxFromV1 (db, tx) {
  const legacy = tx.objectStore('inbox')
  legacy.name = 'inbox-v1'
  createInbox(db)
  const inbox = tx.objectStore('inbox')
  const cursor = legacy.openCursor()
  cursor.onsuccess = () => {
    const c = cursor.result
    if (c === null) {
      db.deleteObjectStore('inbox-v1')
      return
    }
    const record = c.value
    // Every version-1 record came from a checked DELIVER, so `from` is a mailbox id; keep a
    // record from anywhere else rather than abort the upgrade over it.
    const migrated = typeof record.from === 'string' ? { ...record } : { ...record, from: '' }
    migrated.security = 'plaintext' // version 1 had no end-to-end encryption
    inbox.put(migrated)
    c.continue()
  }
}

export class MessageStore {
  /** Use `await MessageStore.open(mailbox)`. */
  constructor (db) {
    this.db = db
  }

  /**
   * Open (creating or upgrading) the database `relay:<mailbox>`.
   *
   * An older database is upgraded in place, keeping every record. The upgrade waits while
   * another tab still has the database open at an older version; `onBlocked` is called then
   * (e.g. to ask the user to close that tab). When a newer version is opened elsewhere this
   * connection closes itself, so that upgrade can go ahead; later calls on this store then
   * reject, and the client sends no ACK for what it could not save.
   * Rejects if IndexedDB fails (the database is then unchanged).
   */
  static async open (mailbox, { indexedDB = globalThis.indexedDB, onBlocked = null } = {}) {
    const request = indexedDB.open(`relay:${mailbox}`, VERSION)
    request.onupgradeneeded = (event) => {
      const db = request.result
      const tx = request.transaction
      if (event.oldVersion < 1) {
        createInbox(db)
        createOutbox(db)
      } else if (event.oldVersion < 2) {
        migrateInboxFromV1(db, tx) // marks what it moves as plaintext
      } else if (event.oldVersion < 4) {
        markPlaintext(tx, 'inbox')
      }
      if (event.oldVersion >= 1 && event.oldVersion < 4) markPlaintext(tx, 'outbox')
      if (event.oldVersion < 3) createStatusStores(db)
      if (event.oldVersion < 4) createKeyStores(db)
    }
    request.onblocked = () => onBlocked?.()
    const db = await promised(request)
    db.onversionchange = () => db.close()
    return new MessageStore(db)
  }

  close () {
    this.db.close()
  }

  /**
   * Save a delivered message unless this sender's message with this id is already stored,
   * in one transaction. `msg` is the DELIVER with the body to keep and its `security` (and
   * `reason` when "failed"); without `security` the body is kept as delivered, "plaintext".
   * Resolves {record, isNew}; rejects if IndexedDB fails (then the caller must not ACK).
   */
  async saveIncoming (msg) {
    const tx = this.db.transaction('inbox', 'readwrite')
    const inbox = tx.objectStore('inbox')
    const existing = await promised(inbox.get([msg.from, msg.id]))
    let record = existing
    if (existing === undefined) {
      record = {
        id: msg.id,
        from: msg.from,
        body: msg.body,
        sent_at: msg.sent_at,
        expires_at: msg.expires_at,
        attempt: msg.attempt,
        received_at: Date.now(),
        state: 'saved',
        security: msg.security ?? 'plaintext'
      }
      if (msg.reason !== undefined) record.reason = msg.reason
      inbox.put(record)
    }
    await done(tx)
    return { record, isNew: existing === undefined }
  }

  /** Mark the message (from, id) acknowledged; resolves the updated record, or undefined if it is not stored. */
  async markAcked (from, id) {
    const tx = this.db.transaction('inbox', 'readwrite')
    const inbox = tx.objectStore('inbox')
    const record = await promised(inbox.get([from, id]))
    if (record !== undefined && record.state !== 'acked') inbox.put({ ...record, state: 'acked' })
    await done(tx)
    return record === undefined ? undefined : { ...record, state: 'acked' }
  }

  /**
   * Record an outgoing message before it is sent (so a reload can resend it): `security` "e2e"
   * with its `sealed` envelope, or "plaintext" (the default).
   */
  async saveOutgoing (entry) {
    const tx = this.db.transaction('outbox', 'readwrite')
    tx.objectStore('outbox').put({ results: null, created_at: Date.now(), security: 'plaintext', ...entry })
    await done(tx)
  }

  /**
   * Record the broker's receipt for an outgoing message: `{id, results}`, or `{id, code}` for a
   * SEND refused as a whole. Resolves the updated entry, or undefined if the id is not in the outbox.
   * A STORE_UNREACHABLE (3008) receipt changes nothing: the entry stays unconfirmed (to be sent again).
   */
  async saveReceipt (receipt) {
    const tx = this.db.transaction('outbox', 'readwrite')
    const outbox = tx.objectStore('outbox')
    const entry = await promised(outbox.get(receipt.id))
    let updated
    if (entry !== undefined && receipt.code === ERROR_CODES.STORE_UNREACHABLE) {
      updated = entry
    } else if (entry !== undefined) {
      updated = receipt.code !== undefined ? { ...entry, results: null, code: receipt.code } : { ...entry, results: receipt.results }
      outbox.put(updated)
    }
    await done(tx)
    return updated
  }

  /**
   * Save a STATUS frame ({seq, state, at, id?, recipient?, count?}) in one transaction, before
   * it is ACKed. A "delivered" or "expired" status is kept per (id, recipient); an "overflow"
   * one per first_seq (it grows, and is renumbered, at the relay: the latest seq is kept). A
   * status already saved under that seq (a redelivery), or older than the one kept for that
   * key, changes nothing. Resolves {record, isNew} with the record
   * now kept; rejects if IndexedDB fails (then the caller must not ACK).
   */
  async saveStatus (status) {
    const tx = this.db.transaction(['statuses', 'overflows'], 'readwrite')
    const overflow = status.state === 'overflow'
    const objects = tx.objectStore(overflow ? 'overflows' : 'statuses')
    const existing = await promised(objects.get(overflow ? status.first_seq : [status.id, status.recipient]))
    const isNew = existing === undefined || existing.seq < status.seq
    let record = existing
    if (isNew) {
      record = overflow
        ? { first_seq: status.first_seq, seq: status.seq, state: 'overflow', count: status.count, at: status.at, received_at: Date.now() }
        : { id: status.id, recipient: status.recipient, state: status.state, at: status.at, seq: status.seq, received_at: Date.now() }
      objects.put(record)
    }
    await done(tx)
    return { record, isNew }
  }

  /** Every overflow record (statuses the relay folded instead of keeping them), oldest first (by first_seq). */
  async overflows () {
    const tx = this.db.transaction('overflows')
    return promised(tx.objectStore('overflows').getAll())
  }

  /** Every inbox message, oldest first. */
  async inbox () {
    const tx = this.db.transaction('inbox')
    return promised(tx.objectStore('inbox').index('received_at').getAll())
  }

  /**
   * Every outbox entry, oldest first, each with `statuses`: {recipient: status record} for the
   * statuses saved about it (read in one transaction with the entries). deliveryStates(entry)
   * turns an entry into one state per recipient.
   */
  async outbox () {
    const tx = this.db.transaction(['outbox', 'statuses'])
    const [entries, statuses] = await Promise.all([
      promised(tx.objectStore('outbox').index('created_at').getAll()),
      promised(tx.objectStore('statuses').getAll())
    ])
    const byId = new Map()
    for (const status of statuses) {
      if (!byId.has(status.id)) byId.set(status.id, {})
      setKey(byId.get(status.id), status.recipient, status)
    }
    return entries.map((entry) => ({ ...entry, statuses: byId.get(entry.id) ?? {} }))
  }

  // ---------------------------------------------------------------- keys

  /**
   * This device's keys: {identity: {privateKey, public, created_at} | null, encryptionKeys:
   * [{kid, privateKey, public, created_at, retired_at}]} (the current one has retired_at null).
   */
  async deviceKeys () {
    const tx = this.db.transaction(['device', 'enc_keys'])
    const [identity, encryptionKeys] = await Promise.all([
      promised(tx.objectStore('device').get('identity')),
      promised(tx.objectStore('enc_keys').getAll())
    ])
    return { identity: identity ?? null, encryptionKeys }
  }

  /**
   * Keep `identity` and `ek` (made by e2e.js, private keys non-extractable) as this device's
   * keys unless it already has an identity (made meanwhile by another tab, say), in one
   * transaction. Resolves deviceKeys() as they are now: the given keys, or the ones found.
   */
  async initDeviceKeys (identity, ek, now = Date.now()) {
    const tx = this.db.transaction(['device', 'enc_keys'], 'readwrite')
    const device = tx.objectStore('device')
    const encKeys = tx.objectStore('enc_keys')
    const existing = await promised(device.get('identity'))
    if (existing === undefined) {
      device.put({ name: 'identity', privateKey: identity.privateKey, public: identity.public, created_at: now })
      encKeys.put({ kid: ek.kid, privateKey: ek.privateKey, public: ek.public, created_at: now, retired_at: null })
    }
    await done(tx)
    return this.deviceKeys()
  }

  /** Make `ek` the current encryption key and retire the current one (at `now`), in one transaction. */
  async rotateEncryptionKey (ek, now = Date.now()) {
    const tx = this.db.transaction('enc_keys', 'readwrite')
    const encKeys = tx.objectStore('enc_keys')
    for (const key of await promised(encKeys.getAll())) {
      if (key.retired_at === null) encKeys.put({ ...key, retired_at: now })
    }
    encKeys.put({ kid: ek.kid, privateKey: ek.privateKey, public: ek.public, created_at: now, retired_at: null })
    await done(tx)
  }

  /** Delete the encryption keys retired before `before` (Unix ms); resolves their kids. */
  async deleteRetiredKeys (before) {
    const tx = this.db.transaction('enc_keys', 'readwrite')
    const encKeys = tx.objectStore('enc_keys')
    const gone = (await promised(encKeys.getAll())).filter((k) => k.retired_at !== null && k.retired_at < before)
    for (const key of gone) encKeys.delete(key.kid)
    await done(tx)
    return gone.map((k) => k.kid)
  }

  /** Every contact (pinned identity keys, and pending changed ones), by mailbox. */
  async contacts () {
    const tx = this.db.transaction('contacts')
    return promised(tx.objectStore('contacts').getAll())
  }

  /** Save a contact record ({mailbox, ik, pinned_at, pending_ik, pending_at}), replacing the one kept. */
  async saveContact (contact) {
    const tx = this.db.transaction('contacts', 'readwrite')
    tx.objectStore('contacts').put(contact)
    await done(tx)
  }

  /** Outbox entries the broker has not confirmed yet (no receipt of either kind). */
  async unconfirmed () {
    const tx = this.db.transaction('outbox')
    const entries = await promised(tx.objectStore('outbox').index('created_at').getAll())
    return entries.filter((entry) => entry.results === null && entry.code === undefined)
  }
}
