// The browser client's local message store: IndexedDB, one database per mailbox.
//
// Two object stores:
//   inbox  keyed by [from, id]:
//          {id, from, body: Uint8Array, sent_at, expires_at, attempt, received_at, state: "saved" | "acked"}
//   outbox keyed by id (this mailbox is the sender of every entry):
//          {id, to: [mailbox], body, ttl_s?, created_at, results: {mailbox: {status, code?}} | null, code?}
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
// Versions. 1 keyed the inbox by id alone; opening a version-1 database upgrades it in place
// (onupgradeneeded, one versionchange transaction: every record is copied under its new key,
// or, if anything fails, nothing changes and the database stays at version 1).

import { ERROR_CODES } from './codec.js'

export const VERSION = 2
/** The inbox's key path: a message's identity for this client. */
export const INBOX_KEY = Object.freeze(['from', 'id'])

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

function createInbox (db) {
  db.createObjectStore('inbox', { keyPath: [...INBOX_KEY] }).createIndex('received_at', 'received_at')
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
    inbox.put(typeof record.from === 'string' ? record : { ...record, from: '' })
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
        db.createObjectStore('outbox', { keyPath: 'id' }).createIndex('created_at', 'created_at')
        return
      }
      if (event.oldVersion < 2) migrateInboxFromV1(db, tx)
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
   * in one transaction. Resolves {record, isNew}; rejects if IndexedDB fails (then the
   * caller must not ACK).
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
        state: 'saved'
      }
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

  /** Record an outgoing message before it is sent (so a reload can resend it). */
  async saveOutgoing (entry) {
    const tx = this.db.transaction('outbox', 'readwrite')
    tx.objectStore('outbox').put({ results: null, created_at: Date.now(), ...entry })
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

  /** Every inbox message, oldest first. */
  async inbox () {
    const tx = this.db.transaction('inbox')
    return promised(tx.objectStore('inbox').index('received_at').getAll())
  }

  /** Every outbox entry, oldest first. */
  async outbox () {
    const tx = this.db.transaction('outbox')
    return promised(tx.objectStore('outbox').index('created_at').getAll())
  }

  /** Outbox entries the broker has not confirmed yet (no receipt of either kind). */
  async unconfirmed () {
    return (await this.outbox()).filter((entry) => entry.results === null && entry.code === undefined)
  }
}
