// The browser client's local message store: IndexedDB, one database per mailbox.
//
// Two object stores, both keyed by message id:
//   inbox  {id, from, body: Uint8Array, sent_at, expires_at, attempt, received_at, state: "saved" | "acked"}
//   outbox {id, to: [mailbox], body, ttl_s?, created_at, results: {mailbox: {status, code?}} | null}
// Ids are unique per recipient (the broker refuses another sender's id as ID_CONFLICT), so
// the inbox key de-duplicates redeliveries: a message delivered twice is stored once.
// An outbox entry without results is a send the broker has not confirmed; the client sends
// it again, with the same id, after a reconnect or a page reload (the broker answers
// "duplicate" if it already holds it).

const VERSION = 1

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

export class MessageStore {
  /** Use `await MessageStore.open(mailbox)`. */
  constructor (db) {
    this.db = db
  }

  static async open (mailbox, { indexedDB = globalThis.indexedDB } = {}) {
    const request = indexedDB.open(`relay:${mailbox}`, VERSION)
    request.onupgradeneeded = () => {
      const db = request.result
      if (!db.objectStoreNames.contains('inbox')) {
        db.createObjectStore('inbox', { keyPath: 'id' }).createIndex('received_at', 'received_at')
      }
      if (!db.objectStoreNames.contains('outbox')) {
        db.createObjectStore('outbox', { keyPath: 'id' }).createIndex('created_at', 'created_at')
      }
    }
    return new MessageStore(await promised(request))
  }

  close () {
    this.db.close()
  }

  /**
   * Save a delivered message unless its id is already stored, in one transaction.
   * Resolves {record, isNew}; rejects if IndexedDB fails (then the caller must not ACK).
   */
  async saveIncoming (msg) {
    const tx = this.db.transaction('inbox', 'readwrite')
    const inbox = tx.objectStore('inbox')
    const existing = await promised(inbox.get(msg.id))
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

  async markAcked (id) {
    const tx = this.db.transaction('inbox', 'readwrite')
    const inbox = tx.objectStore('inbox')
    const record = await promised(inbox.get(id))
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

  async saveReceipt (id, results) {
    const tx = this.db.transaction('outbox', 'readwrite')
    const outbox = tx.objectStore('outbox')
    const entry = await promised(outbox.get(id))
    if (entry !== undefined) outbox.put({ ...entry, results })
    await done(tx)
    return entry === undefined ? undefined : { ...entry, results }
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

  /** Outbox entries the broker has not confirmed yet. */
  async unconfirmed () {
    return (await this.outbox()).filter((entry) => entry.results === null)
  }
}
