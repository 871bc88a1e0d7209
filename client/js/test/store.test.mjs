// The IndexedDB message store (store.js) on fake-indexeddb: keys, de-duplication, and the
// in-place upgrade of a version-1 database. The same store runs in Chromium in tests/browser/.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { IDBFactory } from 'fake-indexeddb'

import { INBOX_KEY, MessageStore, VERSION } from '../store.js'

/** A blocked IndexedDB open would otherwise wait forever. */
const LIMIT = { timeout: 10_000 }

const body = (text) => new TextEncoder().encode(text)
const text = (bytes) => new TextDecoder().decode(bytes)

function deliver (id, from, words = `${from}'s ${id}`, attempt = 1) {
  return { type: 'deliver', id, from, sent_at: 1000, expires_at: 2000, attempt, body: body(words) }
}

function request (req) {
  return new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result)
    req.onerror = () => reject(req.error)
  })
}

// Version 1 as it shipped: both object stores keyed by message id.
const V1_INBOX = [
  { id: 'z-1', from: 'alice', body: body('alice z-1, acked'), sent_at: 10, expires_at: 1010, attempt: 1, received_at: 100, state: 'acked' },
  { id: 'm-2', from: 'carol', body: body('carol m-2, saved'), sent_at: 20, expires_at: 9020, attempt: 2, received_at: 200, state: 'saved' },
  { id: 'm-3', from: 'alice', body: new Uint8Array(0), sent_at: 30, expires_at: 9030, attempt: 1, received_at: 300, state: 'acked' }
]
const V1_OUTBOX = [
  { id: 'o-1', to: ['alice'], body: body('to alice'), created_at: 150, results: { alice: { status: 'queued' } } },
  { id: 'o-2', to: ['carol', 'x y'], body: body('unconfirmed'), ttl_s: 60, created_at: 250, results: null }
]

/** A database `relay:<mailbox>` exactly as version 1 of store.js made it, holding the records above. */
async function createV1Database (indexedDB, mailbox) {
  const req = indexedDB.open(`relay:${mailbox}`, 1)
  req.onupgradeneeded = () => {
    const db = req.result
    db.createObjectStore('inbox', { keyPath: 'id' }).createIndex('received_at', 'received_at')
    db.createObjectStore('outbox', { keyPath: 'id' }).createIndex('created_at', 'created_at')
  }
  const db = await request(req)
  const tx = db.transaction(['inbox', 'outbox'], 'readwrite')
  for (const r of V1_INBOX) tx.objectStore('inbox').put(r)
  for (const r of V1_OUTBOX) tx.objectStore('outbox').put(r)
  await new Promise((resolve, reject) => { tx.oncomplete = resolve; tx.onerror = () => reject(tx.error) })
  return db
}

async function openStore (t, mailbox = 'bob', options = {}) {
  const store = await MessageStore.open(mailbox, { indexedDB: options.indexedDB ?? new IDBFactory(), ...options })
  t.after(() => store.close())
  return store
}

test('a redelivery of the same sender\'s message is stored once; another sender\'s message with that id is new', LIMIT, async (t) => {
  const store = await openStore(t)
  const first = await store.saveIncoming(deliver('z-1', 'alice'))
  assert.equal(first.isNew, true)
  const again = await store.saveIncoming(deliver('z-1', 'alice', 'a changed body', 2))
  assert.equal(again.isNew, false)
  assert.equal(text(again.record.body), "alice's z-1", 'the first copy is kept')
  const carol = await store.saveIncoming(deliver('z-1', 'carol'))
  assert.equal(carol.isNew, true, 'carol reused the id after alice\'s message expired: a new message')
  assert.deepEqual((await store.inbox()).map((m) => [m.from, m.id, text(m.body), m.state]), [
    ['alice', 'z-1', "alice's z-1", 'saved'],
    ['carol', 'z-1', "carol's z-1", 'saved']
  ])
})

test('markAcked marks only the message of that sender', LIMIT, async (t) => {
  const store = await openStore(t)
  await store.saveIncoming(deliver('z-1', 'alice'))
  await store.saveIncoming(deliver('z-1', 'carol'))
  const acked = await store.markAcked('carol', 'z-1')
  assert.deepEqual([acked.from, acked.state], ['carol', 'acked'])
  assert.deepEqual((await store.inbox()).map((m) => [m.from, m.state]), [['alice', 'saved'], ['carol', 'acked']])
  assert.equal(await store.markAcked('dave', 'z-1'), undefined)
})

test('a version-1 database is upgraded in place: every record kept, the inbox keyed by (from, id)', LIMIT, async (t) => {
  const indexedDB = new IDBFactory()
  ;(await createV1Database(indexedDB, 'bob')).close()
  const store = await openStore(t, 'bob', { indexedDB })
  assert.equal(store.db.version, VERSION)
  assert.deepEqual([...store.db.objectStoreNames].sort(), ['inbox', 'outbox'])
  const tx = store.db.transaction(['inbox', 'outbox'])
  assert.deepEqual(tx.objectStore('inbox').keyPath, [...INBOX_KEY])
  assert.deepEqual([...tx.objectStore('inbox').indexNames], ['received_at'])
  assert.equal(tx.objectStore('outbox').keyPath, 'id')
  assert.deepEqual(await store.inbox(), V1_INBOX, 'every inbox record, unchanged, oldest first')
  assert.deepEqual(await store.outbox(), V1_OUTBOX, 'every outbox record, unchanged')
  assert.deepEqual((await store.unconfirmed()).map((e) => e.id), ['o-2'])

  // The migrated records behave like new ones.
  assert.equal((await store.saveIncoming(deliver('z-1', 'alice', 'redelivered', 2))).isNew, false)
  assert.equal((await store.saveIncoming(deliver('z-1', 'carol'))).isNew, true)
  assert.equal((await store.markAcked('carol', 'm-2')).state, 'acked')
  assert.deepEqual((await store.inbox()).map((m) => [m.from, m.id, m.state]), [
    ['alice', 'z-1', 'acked'], ['carol', 'm-2', 'acked'], ['alice', 'm-3', 'acked'], ['carol', 'z-1', 'saved']
  ])
})

test('an upgraded database opens again unchanged', LIMIT, async (t) => {
  const indexedDB = new IDBFactory()
  ;(await createV1Database(indexedDB, 'bob')).close()
  ;(await MessageStore.open('bob', { indexedDB })).close()
  const store = await openStore(t, 'bob', { indexedDB })
  assert.deepEqual(await store.inbox(), V1_INBOX)
  assert.deepEqual(await store.outbox(), V1_OUTBOX)
})

test('the upgrade waits for a tab holding version 1 open, and says so through onBlocked', LIMIT, async (t) => {
  const indexedDB = new IDBFactory()
  const oldTab = await createV1Database(indexedDB, 'bob') // old code: no onversionchange, stays open
  let blocked = 0
  let opened = false
  const opening = MessageStore.open('bob', { indexedDB, onBlocked: () => { blocked += 1 } }).then((s) => { opened = true; return s })
  await new Promise((resolve) => setTimeout(resolve, 20))
  assert.equal(blocked, 1)
  assert.equal(opened, false)
  oldTab.close()
  const store = await opening
  t.after(() => store.close())
  assert.deepEqual(await store.inbox(), V1_INBOX)
})

test('an open store closes itself when a newer version is opened elsewhere', LIMIT, async (t) => {
  const indexedDB = new IDBFactory()
  const store = await openStore(t, 'bob', { indexedDB })
  await store.saveIncoming(deliver('z-1', 'alice'))
  const req = indexedDB.open('relay:bob', VERSION + 1)
  let blocked = false
  req.onblocked = () => { blocked = true }
  const newer = await request(req)
  newer.close()
  assert.equal(blocked, false)
  await assert.rejects(store.saveIncoming(deliver('m-9', 'alice')), 'calls on the closed store reject (so no ACK is sent)')
})

test('receipts: results, a whole-SEND refusal (code), and what stays unconfirmed', LIMIT, async (t) => {
  const store = await openStore(t)
  await store.saveOutgoing({ id: 'o-1', to: ['alice'], body: body('a') })
  await store.saveOutgoing({ id: 'o-2', to: ['alice', 'carol'], body: body('b') })
  await store.saveOutgoing({ id: 'o-3', to: ['alice'], body: body('c') })
  const withResults = await store.saveReceipt({ id: 'o-1', results: { alice: { status: 'delivered' } } })
  assert.deepEqual(withResults.results, { alice: { status: 'delivered' } })
  assert.equal(withResults.code, undefined)
  const refused = await store.saveReceipt({ id: 'o-2', code: 3004 })
  assert.deepEqual([refused.results, refused.code], [null, 3004])
  assert.equal(await store.saveReceipt({ id: 'unknown', code: 3007 }), undefined)
  const unreachable = await store.saveReceipt({ id: 'o-3', code: 3008 })  // maybe stored, maybe not: resend
  assert.deepEqual([unreachable.results, unreachable.code], [null, undefined])
  assert.deepEqual((await store.unconfirmed()).map((e) => e.id), ['o-3'])
  assert.deepEqual((await store.outbox()).map((e) => [e.id, e.code]), [['o-1', undefined], ['o-2', 3004], ['o-3', undefined]])
})

test('one database per mailbox', LIMIT, async (t) => {
  const indexedDB = new IDBFactory()
  const bob = await openStore(t, 'bob', { indexedDB })
  const carol = await openStore(t, 'carol', { indexedDB })
  await bob.saveIncoming(deliver('m-1', 'alice'))
  assert.deepEqual(await carol.inbox(), [])
  assert.deepEqual((await indexedDB.databases()).map((d) => [d.name, d.version]).sort(), [['relay:bob', VERSION], ['relay:carol', VERSION]])
})
