// The IndexedDB message store (store.js) on fake-indexeddb: keys, de-duplication, and the
// in-place upgrade of a version-1 database. The same store runs in Chromium in tests/browser/.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { IDBFactory } from 'fake-indexeddb'

import { INBOX_KEY, MessageStore, STATUS_KEY, VERSION, deliveryStates, missedStatuses } from '../store.js'

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

/** Records from before version 4, as it keeps them: each was sent or received in the clear. */
const plaintext = (records) => records.map((r) => ({ ...r, security: 'plaintext' }))
const V4_INBOX = plaintext(V1_INBOX)
const V4_OUTBOX = plaintext(V1_OUTBOX)
const ALL_STORES = ['contacts', 'device', 'enc_keys', 'inbox', 'outbox', 'overflows', 'statuses']

/** The outbox entries as outbox() returns them: with the statuses saved about each (none here). */
const withStatuses = (entries, statuses = {}) => entries.map((e) => ({ ...e, statuses: statuses[e.id] ?? {} }))

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
  assert.deepEqual([...store.db.objectStoreNames].sort(), ALL_STORES)
  const tx = store.db.transaction(['inbox', 'outbox'])
  assert.deepEqual(tx.objectStore('inbox').keyPath, [...INBOX_KEY])
  assert.deepEqual([...tx.objectStore('inbox').indexNames], ['received_at'])
  assert.equal(tx.objectStore('outbox').keyPath, 'id')
  assert.deepEqual(await store.inbox(), V4_INBOX, 'every inbox record, oldest first, marked plaintext')
  assert.deepEqual(await store.outbox(), withStatuses(V4_OUTBOX), 'every outbox record, marked plaintext')
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
  assert.deepEqual(await store.inbox(), V4_INBOX)
  assert.deepEqual(await store.outbox(), withStatuses(V4_OUTBOX))
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
  assert.deepEqual(await store.inbox(), V4_INBOX)
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

// ---------------------------------------------------------------- delivery status

const status = (seq, id, recipient, state = 'delivered', at = 5000) => ({ seq, state, at, id, recipient })

/** A database `relay:<mailbox>` as version 2 of store.js made it, with one record in each store. */
async function createV2Database (indexedDB, mailbox) {
  const req = indexedDB.open(`relay:${mailbox}`, 2)
  req.onupgradeneeded = () => {
    const db = req.result
    db.createObjectStore('inbox', { keyPath: ['from', 'id'] }).createIndex('received_at', 'received_at')
    db.createObjectStore('outbox', { keyPath: 'id' }).createIndex('created_at', 'created_at')
  }
  const db = await request(req)
  const tx = db.transaction(['inbox', 'outbox'], 'readwrite')
  tx.objectStore('inbox').put(V1_INBOX[0])
  for (const r of V1_OUTBOX) tx.objectStore('outbox').put(r)
  await new Promise((resolve, reject) => { tx.oncomplete = resolve; tx.onerror = () => reject(tx.error) })
  return db
}

test('a version-2 database is upgraded in place: every record kept, the status stores added empty', LIMIT, async (t) => {
  const indexedDB = new IDBFactory()
  ;(await createV2Database(indexedDB, 'bob')).close()
  const store = await openStore(t, 'bob', { indexedDB })
  assert.equal(store.db.version, VERSION)
  assert.deepEqual([...store.db.objectStoreNames].sort(), ALL_STORES)
  const tx = store.db.transaction(['statuses', 'overflows'])
  assert.deepEqual(tx.objectStore('statuses').keyPath, [...STATUS_KEY])
  assert.equal(tx.objectStore('overflows').keyPath, 'first_seq')
  assert.deepEqual(await store.inbox(), [V4_INBOX[0]])
  assert.deepEqual(await store.outbox(), withStatuses(V4_OUTBOX))
  assert.deepEqual(await store.overflows(), [])
  // An entry from before statuses existed gets them like any other.
  assert.equal((await store.saveStatus(status(7, 'o-1', 'alice'))).isNew, true)
  assert.deepEqual(deliveryStates((await store.outbox())[0]), { alice: 'delivered' })
})

test('statuses are kept per (id, recipient) and joined to their outbox entry', LIMIT, async (t) => {
  const store = await openStore(t, 'alice')
  await store.saveOutgoing({ id: 'o-1', to: ['bob', 'carol'], body: body('to both'), notify: true })
  await store.saveReceipt({ id: 'o-1', results: { bob: { status: 'delivered' }, carol: { status: 'queued' } } })
  const saved = await store.saveStatus(status(10, 'o-1', 'bob'))
  assert.equal(saved.isNew, true)
  assert.deepEqual({ ...saved.record, received_at: 0 }, { ...status(10, 'o-1', 'bob'), received_at: 0 })
  await store.saveStatus(status(11, 'o-1', 'carol', 'expired', 9000))
  const [entry] = await store.outbox()
  assert.deepEqual(Object.keys(entry.statuses), ['bob', 'carol'])
  assert.deepEqual([entry.statuses.bob.state, entry.statuses.carol.state, entry.statuses.carol.at], ['delivered', 'expired', 9000])
  assert.deepEqual(deliveryStates(entry), { bob: 'delivered', carol: 'expired' })
})

test('a redelivered status (same seq) or an older one changes nothing; a newer one replaces it', LIMIT, async (t) => {
  const store = await openStore(t, 'alice')
  await store.saveStatus(status(20, 'o-1', 'bob', 'delivered', 5000))
  const again = await store.saveStatus(status(20, 'o-1', 'bob', 'delivered', 5000))
  assert.equal(again.isNew, false)
  assert.equal(again.record.seq, 20)
  const older = await store.saveStatus(status(19, 'o-1', 'bob', 'expired', 4000))
  assert.deepEqual([older.isNew, older.record.state, older.record.seq], [false, 'delivered', 20])
  // The id reused after the first message was gone: the later message's status is the one kept.
  const newer = await store.saveStatus(status(25, 'o-1', 'bob', 'expired', 8000))
  assert.deepEqual([newer.isNew, newer.record.state, newer.record.seq], [true, 'expired', 25])
})

test('a status about a message this browser never sent is saved, and shows in no outbox entry', LIMIT, async (t) => {
  const store = await openStore(t, 'alice')
  assert.equal((await store.saveStatus(status(30, 'sent-by-the-cli', 'bob'))).isNew, true)
  assert.deepEqual(await store.outbox(), [])
  await store.saveOutgoing({ id: 'sent-by-the-cli', to: ['bob'], body: body('x') }) // if it shows up later
  assert.deepEqual(deliveryStates((await store.outbox())[0]), { bob: 'delivered' })
})

test('an overflow status is kept once per first_seq at its latest count, and missedStatuses sums them', LIMIT, async (t) => {
  const store = await openStore(t, 'alice')
  const overflow = (seq, firstSeq, count, at) => ({ seq, state: 'overflow', at, count, first_seq: firstSeq })
  assert.equal((await store.saveStatus(overflow(40, 40, 3, 6000))).isNew, true)
  assert.equal((await store.saveStatus(overflow(40, 40, 3, 6000))).isNew, false, 'a redelivery')
  // It grew (and was renumbered) before this client's STATUS_ACK of seq 40 reached the relay.
  const grown = await store.saveStatus(overflow(44, 40, 5, 6500))
  assert.deepEqual([grown.isNew, grown.record.seq, grown.record.count], [true, 44, 5])
  assert.equal((await store.saveStatus(overflow(40, 40, 3, 6000))).isNew, false, 'an older seq of it changes nothing')
  // ACKed at seq 44; later statuses beyond the bound make a new one.
  await store.saveStatus(overflow(90, 90, 2, 7000))
  const kept = await store.overflows()
  assert.deepEqual(kept.map((o) => [o.first_seq, o.seq, o.state, o.count, o.at]), [[40, 44, 'overflow', 5, 6500], [90, 90, 'overflow', 2, 7000]])
  assert.equal(missedStatuses(kept), 7, '5 + 2, not 3 + 5 + 2')
  assert.equal(missedStatuses([]), 0)
  assert.deepEqual(await store.outbox(), [], 'overflow statuses are about no message')
})

test('deliveryStates: one state per recipient from the receipt and the statuses', () => {
  const entry = (fields) => ({ id: 'o', to: ['bob', 'carol'], body: body(''), created_at: 1, results: null, statuses: {}, ...fields })
  const delivered = { seq: 1, state: 'delivered', at: 2, id: 'o', recipient: 'bob' }
  assert.deepEqual(deliveryStates(entry({})), { bob: 'sending', carol: 'sending' })
  assert.deepEqual(deliveryStates(entry({ statuses: { bob: delivered } })), { bob: 'delivered', carol: 'sending' }, 'a status may come first')
  assert.deepEqual(deliveryStates(entry({ results: { bob: { status: 'delivered' }, carol: { status: 'duplicate' } } })), { bob: 'queued', carol: 'queued' },
    'a receipt says stored, not saved on the device')
  assert.deepEqual(deliveryStates(entry({ results: { bob: { status: 'queued' }, 'not ok!': { status: 'refused', code: 3006 } }, statuses: { bob: delivered } })),
    { bob: 'delivered', 'not ok!': 'refused' }, 'the receipt\'s recipients, as written')
  assert.deepEqual(deliveryStates(entry({ code: 3004 })), { bob: 'refused', carol: 'refused' })
  assert.deepEqual(deliveryStates({ ...entry({ results: { bob: { status: 'queued' } } }), statuses: undefined }), { bob: 'queued' }, 'an entry read without statuses')
  assert.deepEqual(Object.keys(deliveryStates(entry({ to: ['__proto__'] }))), ['__proto__'])
})

// ---------------------------------------------------------------- end-to-end encryption (version 4)

/** A database `relay:<mailbox>` as version 3 of store.js made it, with one record in each store. */
async function createV3Database (indexedDB, mailbox) {
  const req = indexedDB.open(`relay:${mailbox}`, 3)
  req.onupgradeneeded = () => {
    const db = req.result
    db.createObjectStore('inbox', { keyPath: ['from', 'id'] }).createIndex('received_at', 'received_at')
    db.createObjectStore('outbox', { keyPath: 'id' }).createIndex('created_at', 'created_at')
    db.createObjectStore('statuses', { keyPath: ['id', 'recipient'] })
    db.createObjectStore('overflows', { keyPath: 'first_seq' })
  }
  const db = await request(req)
  const tx = db.transaction(['inbox', 'outbox', 'statuses'], 'readwrite')
  for (const r of V1_INBOX) tx.objectStore('inbox').put(r)
  for (const r of V1_OUTBOX) tx.objectStore('outbox').put(r)
  tx.objectStore('statuses').put({ id: 'o-1', recipient: 'alice', state: 'delivered', at: 5000, seq: 7, received_at: 6000 })
  await new Promise((resolve, reject) => { tx.oncomplete = resolve; tx.onerror = () => reject(tx.error) })
  return db
}

/** Keys as e2e.js makes them: non-extractable private CryptoKeys beside their raw public bytes. */
async function newKeys () {
  const subtle = globalThis.crypto.subtle
  const ed = await subtle.generateKey({ name: 'Ed25519' }, false, ['sign', 'verify'])
  const x = await subtle.generateKey({ name: 'X25519' }, false, ['deriveBits'])
  const raw = async (key) => new Uint8Array(await subtle.exportKey('raw', key))
  return {
    identity: { privateKey: ed.privateKey, public: await raw(ed.publicKey) },
    ek: { privateKey: x.privateKey, public: await raw(x.publicKey), kid: `kid-${Math.random().toString(16).slice(2, 10)}` }
  }
}

test('a version-3 database is upgraded in place: every record kept and marked plaintext, the key stores added empty', LIMIT, async (t) => {
  const indexedDB = new IDBFactory()
  ;(await createV3Database(indexedDB, 'bob')).close()
  const store = await openStore(t, 'bob', { indexedDB })
  assert.equal(store.db.version, VERSION)
  assert.equal(VERSION, 4)
  assert.deepEqual([...store.db.objectStoreNames].sort(), ALL_STORES)
  const tx = store.db.transaction(['device', 'enc_keys', 'contacts'])
  assert.equal(tx.objectStore('device').keyPath, 'name')
  assert.equal(tx.objectStore('enc_keys').keyPath, 'kid')
  assert.equal(tx.objectStore('contacts').keyPath, 'mailbox')
  assert.deepEqual(await store.inbox(), V4_INBOX)
  const outbox = await store.outbox()
  assert.deepEqual(outbox.map((e) => [e.id, e.security]), [['o-1', 'plaintext'], ['o-2', 'plaintext']])
  assert.deepEqual(deliveryStates(outbox[0]), { alice: 'delivered' }, 'the statuses are kept')
  assert.deepEqual(await store.deviceKeys(), { identity: null, encryptionKeys: [] })
  assert.deepEqual(await store.contacts(), [])
})

test('each message keeps its security: e2e, plaintext, or failed with its reason and an empty body', LIMIT, async (t) => {
  const store = await openStore(t)
  await store.saveIncoming({ ...deliver('m-1', 'alice', 'opened'), security: 'e2e' })
  await store.saveIncoming({ ...deliver('m-2', 'alice'), body: new Uint8Array(0), security: 'failed', reason: 'bad_signature' })
  await store.saveIncoming(deliver('m-3', 'carol', 'in the clear'))
  assert.deepEqual((await store.inbox()).map((m) => [m.id, text(m.body), m.security, m.reason]), [
    ['m-1', 'opened', 'e2e', undefined], ['m-2', '', 'failed', 'bad_signature'], ['m-3', 'in the clear', 'plaintext', undefined]
  ])
  await store.saveOutgoing({ id: 'o-1', to: ['bob'], body: body('hi'), security: 'e2e', sealed: body('RE2E...') })
  await store.saveOutgoing({ id: 'o-2', to: ['bob'], body: body('hi') })
  assert.deepEqual((await store.outbox()).map((e) => [e.id, e.security, e.sealed && text(e.sealed)]), [['o-1', 'e2e', 'RE2E...'], ['o-2', 'plaintext', undefined]])
})

test('device keys: kept once (a second init finds the first), non-extractable CryptoKeys that still work after a reopen', LIMIT, async (t) => {
  const indexedDB = new IDBFactory()
  const store = await MessageStore.open('bob', { indexedDB })
  const first = await newKeys()
  const kept = await store.initDeviceKeys(first.identity, first.ek, 1000)
  assert.deepEqual(kept.identity.public, first.identity.public)
  assert.deepEqual(kept.encryptionKeys.map((k) => [k.kid, k.created_at, k.retired_at]), [[first.ek.kid, 1000, null]])
  const second = await newKeys()
  const again = await store.initDeviceKeys(second.identity, second.ek, 2000) // another tab, at the same time
  assert.deepEqual(again.identity.public, first.identity.public, 'the first identity stays')
  assert.deepEqual(again.encryptionKeys.map((k) => k.kid), [first.ek.kid])
  store.close()

  const reopened = await openStore(t, 'bob', { indexedDB })
  const { identity, encryptionKeys: [ek] } = await reopened.deviceKeys()
  assert.equal(identity.privateKey.extractable, false)
  assert.equal(ek.privateKey.extractable, false)
  const subtle = globalThis.crypto.subtle
  const sig = await subtle.sign('Ed25519', identity.privateKey, body('signed'))
  const pub = await subtle.importKey('raw', identity.public, 'Ed25519', false, ['verify'])
  assert.equal(await subtle.verify('Ed25519', pub, sig, body('signed')), true, 'the stored private key signs')
  await assert.rejects(subtle.exportKey('pkcs8', identity.privateKey), 'and cannot be read out')
})

test('rotation retires the current encryption key; retired keys are deleted once retired before a given time', LIMIT, async (t) => {
  const store = await openStore(t)
  const { identity, ek } = await newKeys()
  await store.initDeviceKeys(identity, ek, 1000)
  const second = (await newKeys()).ek
  await store.rotateEncryptionKey(second, 5000)
  const third = (await newKeys()).ek
  await store.rotateEncryptionKey(third, 9000)
  const state = async () => (await store.deviceKeys()).encryptionKeys.map((k) => [k.kid, k.retired_at]).sort()
  assert.deepEqual(await state(), [[ek.kid, 5000], [second.kid, 9000], [third.kid, null]].sort())
  assert.deepEqual(await store.deleteRetiredKeys(5000), [], 'retired at 5000 is not before 5000')
  assert.deepEqual(await store.deleteRetiredKeys(9001), [ek.kid, second.kid].sort())
  assert.deepEqual(await state(), [[third.kid, null]])
})

test('contacts are kept by mailbox, a save replacing the record', LIMIT, async (t) => {
  const store = await openStore(t)
  const ik = new Uint8Array(32).fill(1)
  const other = new Uint8Array(32).fill(2)
  await store.saveContact({ mailbox: 'carol', ik, pinned_at: 10, pending_ik: null, pending_at: null })
  await store.saveContact({ mailbox: 'alice', ik, pinned_at: 20, pending_ik: null, pending_at: null })
  await store.saveContact({ mailbox: 'carol', ik, pinned_at: 10, pending_ik: other, pending_at: 30 })
  assert.deepEqual((await store.contacts()).map((c) => [c.mailbox, c.pinned_at, c.pending_ik?.[0] ?? null]), [['alice', 20, null], ['carol', 10, 2]])
})
