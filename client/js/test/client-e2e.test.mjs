// The client's end-to-end encryption flow in Node: real IndexedDB stores (fake-indexeddb), real
// WebCrypto and @hpke/core (e2e.js), and a small in-memory relay that speaks the protocol to the
// clients' fake WebSockets (a directory that checks key records as the broker does, SEND
// delivered to the recipient's open socket or queued, RECEIPTs, ACKs). The same flow against a
// real broker in real Chromium, and with the Python client, is in tests/browser/test_e2e_browser.py.
import { test } from 'node:test'
import assert from 'node:assert/strict'

import { IDBFactory } from 'fake-indexeddb'

import { decodeMessage, encodeFrame } from '../codec.js'
import { InvalidKeyRecord, KeyChanged, MessageStore, NoRecipientKey, RelayClient } from '../client.js'
import { fingerprint, isEnvelope, peek, verifyKeyRecord } from '../e2e.js'

const LIMIT = { timeout: 20_000 }
const text = (bytes) => new TextDecoder().decode(bytes)
const bytes = (words) => new TextEncoder().encode(words)
const settle = () => new Promise((resolve) => setImmediate(resolve))

/** Poll `check` (which may be async) until it is truthy; IndexedDB and WebCrypto take a few turns. */
async function until (check, what) {
  for (let i = 0; i < 2000; i++) {
    const value = await check()
    if (value) return value
    await new Promise((resolve) => setTimeout(resolve, 2))
  }
  throw new Error(`timed out waiting until ${what}`)
}

/**
 * A relay in memory: each client's socket says HELLO with its mailbox as token; the relay
 * answers WELCOME, keeps one directory record per mailbox (refusing with 3009 one whose
 * signature does not verify for the session's mailbox, as the broker does), answers KEY_GET
 * with the records it has, and hands SENDs to the recipient's open socket or queues them.
 */
class FakeRelay {
  constructor ({ maxTtlS = 2592000, maxRecipients = 100 } = {}) {
    this.maxTtlS = maxTtlS
    this.maxRecipients = maxRecipients
    this.directory = new Map() // mailbox -> key record
    this.queues = new Map() // mailbox -> [deliver frame]
    this.open = new Map() // mailbox -> socket
    this.frames = [] // [mailbox, frame] in the order the relay got them
    this.hold = null // when set, a function (mailbox, frame) -> true to leave a frame unanswered
    this.tamper = null // when set, a function (body) -> the body the relay delivers instead
  }

  socketClass () {
    const relay = this
    return class FakeSocket {
      constructor (url) {
        this.url = url
        this.readyState = 0
        this.mailbox = null
        this.sent = []
        setImmediate(() => { this.readyState = 1; this.onopen?.() })
      }

      send (data) {
        if (this.readyState !== 1) throw new Error('not open')
        for (const frame of decodeMessage(data)) {
          this.sent.push(frame)
          relay.frames.push([this.mailbox ?? frame.token, frame])
          setImmediate(() => relay.handle(this, frame))
        }
      }

      receive (frame) {
        if (this.readyState === 1) this.onmessage?.({ data: encodeFrame(frame).slice().buffer })
      }

      close () {
        if (this.readyState === 3) return
        this.readyState = 3
        if (relay.open.get(this.mailbox) === this) relay.open.delete(this.mailbox)
        setImmediate(() => this.onclose?.({ code: 1000 }))
      }

      drop () {
        this.close()
      }
    }
  }

  async handle (socket, frame) {
    if (socket.readyState !== 1) return
    if (this.hold?.(socket.mailbox, frame)) return
    switch (frame.type) {
      case 'hello': {
        socket.mailbox = frame.token
        this.open.set(socket.mailbox, socket)
        socket.receive({
          type: 'welcome', version: 1, session: `s-${socket.mailbox}`, mailbox: socket.mailbox, pending: 0, max_frame_bytes: 1048576,
          max_inflight: 1024, max_recipients: this.maxRecipients, default_ttl_s: 604800, max_ttl_s: this.maxTtlS, keepalive_s: 60, expires_in_s: 3600
        })
        for (const msg of this.queues.get(socket.mailbox) ?? []) socket.receive(msg)
        socket.receive({ type: 'drained', pending: 0 })
        return
      }
      case 'key_put': {
        const valid = await verifyKeyRecord(socket.mailbox, frame.key)
        if (valid) this.directory.set(socket.mailbox, frame.key)
        socket.receive(valid ? { type: 'key_put_result', kid: frame.key.kid } : { type: 'key_put_result', kid: frame.key.kid, code: 3009 })
        return
      }
      case 'key_get': {
        const keys = {}
        for (const m of frame.mailboxes) if (this.directory.has(m)) keys[m] = this.directory.get(m)
        socket.receive({ type: 'key_get_result', keys })
        return
      }
      case 'send': {
        const results = {}
        for (const r of new Set(frame.to)) {
          const body = this.tamper ? this.tamper(frame.body) : frame.body
          const msg = { type: 'deliver', id: frame.id, from: socket.mailbox, sent_at: 1000, expires_at: 9e12, attempt: 1, body }
          this.deliver(r, msg)
          results[r] = { status: 'queued' }
        }
        socket.receive({ type: 'receipt', id: frame.id, results })
        return
      }
      case 'ack': {
        for (const [mailbox, queue] of this.queues) {
          if (mailbox === socket.mailbox) this.queues.set(mailbox, queue.filter((m) => !frame.ids.includes(m.id)))
        }
      }
    }
  }

  /** Queue `msg` for `mailbox` and hand it to its open socket, if any (as the broker does). */
  deliver (mailbox, msg) {
    if (!this.queues.has(mailbox)) this.queues.set(mailbox, [])
    this.queues.get(mailbox).push(msg)
    this.open.get(mailbox)?.receive(msg)
  }

  /** The frames `mailbox`'s clients sent, in order. */
  sentBy (mailbox, type) {
    return this.frames.filter(([m, f]) => m === mailbox && (type === undefined || f.type === type)).map(([, f]) => f)
  }
}

/** A client for `mailbox` on `relay`, with an IndexedDB store in `indexedDB` (a new one unless given). */
async function device (t, relay, mailbox, { indexedDB = new IDBFactory(), start = true, ...options } = {}) {
  const store = await MessageStore.open(mailbox, { indexedDB })
  const client = new RelayClient({ url: 'ws://relay.test/relay', token: mailbox, store, WebSocketImpl: relay.socketClass(), ...options })
  const events = []
  for (const name of ['message', 'acked', 'error', 'contact', 'keys']) client.addEventListener(name, (e) => events.push([name, e.detail]))
  t.after(() => { client.close(); store.close() })
  if (start) {
    await client.start()
    await until(() => events.some(([n]) => n === 'keys'), `${mailbox}'s key is published`)
  }
  return { client, store, indexedDB, events, named: (name) => events.filter(([n]) => n === name).map(([, d]) => d) }
}

async function inboxOf (store, count) {
  return until(async () => {
    const inbox = await store.inbox()
    return inbox.length >= count && inbox.every((m) => m.state === 'acked') && inbox
  }, `${count} messages saved and ACKed`)
}

test('on every connect the first frame after HELLO is KEY_PUT of a record that verifies for the mailbox', LIMIT, async (t) => {
  const relay = new FakeRelay()
  const alice = await device(t, relay, 'alice', { start: false })
  await alice.store.saveOutgoing({ id: 'old-1', to: ['bob'], body: bytes('left from before'), security: 'plaintext' })
  await alice.client.start()
  await until(() => alice.named('keys').length === 1, 'the key is published')
  await until(() => relay.sentBy('alice', 'send').length === 1, 'the unconfirmed send goes out again')
  assert.deepEqual(relay.sentBy('alice').map((f) => f.type).slice(0, 3), ['hello', 'key_put', 'send'])
  const record = relay.directory.get('alice')
  assert.equal(await verifyKeyRecord('alice', record), true)
  assert.equal(await verifyKeyRecord('bob', record), false, 'the record is bound to its mailbox')
  assert.equal(alice.named('keys')[0].kid, record.kid)

  alice.client.dropConnection()
  await until(() => alice.named('keys').length === 2, 'the key is published again after the reconnect')
  const hellos = relay.frames.map(([, f], i) => [f.type, i]).filter(([type]) => type === 'hello')
  assert.equal(relay.frames[hellos[1][1] + 1][1].type, 'key_put', 'KEY_PUT first on the second connection too')
  assert.deepEqual(relay.sentBy('alice', 'key_put')[1].key, record, 'the same record')
})

test('a message to a mailbox with a key goes sealed, and is saved decrypted as "e2e" before its ACK', LIMIT, async (t) => {
  const relay = new FakeRelay()
  const alice = await device(t, relay, 'alice')
  const bob = await device(t, relay, 'bob')
  const receipt = await alice.client.sendMessage('bob', 'hello bob, only you can read this')
  assert.deepEqual(receipt.results, { bob: { status: 'queued' } })

  const [frame] = relay.sentBy('alice', 'send')
  assert.equal(isEnvelope(frame.body), true)
  assert.equal(text(frame.body).includes('only you'), false, 'the relay sees no plaintext')
  assert.deepEqual(peek(frame.body).to, ['bob'])
  assert.equal(frame.body.length > 256, true, 'padded to a multiple of the pad block')

  const [saved] = await inboxOf(bob.store, 1)
  assert.equal(text(saved.body), 'hello bob, only you can read this')
  assert.equal(saved.security, 'e2e')
  assert.equal(saved.reason, undefined)
  assert.deepEqual(relay.sentBy('bob', 'ack').map((f) => f.ids), [[frame.id]])
  const [sent] = await alice.store.outbox()
  assert.equal(sent.security, 'e2e')
  assert.equal(text(sent.body), 'hello bob, only you can read this', 'the outbox keeps the text as written')
  assert.deepEqual(sent.sealed, frame.body, '...and the envelope that went out')

  // Both pinned each other on first use, and see the same safety number.
  const [aliceSeesBob] = await alice.client.contacts()
  const [bobSeesAlice] = await bob.client.contacts()
  assert.equal(aliceSeesBob.mailbox, 'bob')
  assert.equal(bobSeesAlice.mailbox, 'alice')
  assert.equal(aliceSeesBob.fingerprint, await bob.client.fingerprint())
  assert.equal(bobSeesAlice.fingerprint, await alice.client.fingerprint())
  assert.equal(aliceSeesBob.safety_number, bobSeesAlice.safety_number)
  assert.match(aliceSeesBob.safety_number, /^(\d{5} ){11}\d{5}$/)
  assert.equal(aliceSeesBob.pending_ik, null)
})

test('one SEND to several recipients is one envelope each of them opens; the sender can send to itself', LIMIT, async (t) => {
  const relay = new FakeRelay()
  const alice = await device(t, relay, 'alice')
  const bob = await device(t, relay, 'bob')
  const carol = await device(t, relay, 'carol')
  await alice.client.sendMessage(['bob', 'carol', 'bob', 'alice'], 'to all of us')
  const [frame] = relay.sentBy('alice', 'send')
  assert.deepEqual(frame.to, ['bob', 'carol', 'bob', 'alice'], 'the SEND keeps its to as given')
  assert.deepEqual(peek(frame.body).to, ['bob', 'carol', 'alice'], 'the envelope holds each recipient once')
  for (const { store } of [bob, carol, alice]) {
    const [saved] = await inboxOf(store, 1)
    assert.deepEqual([text(saved.body), saved.security], ['to all of us', 'e2e'])
  }
  assert.deepEqual(relay.sentBy('alice', 'key_get').map((f) => f.mailboxes), [['bob', 'carol']], 'one KEY_GET, not for itself')
})

test('no published key: refused with NoRecipientKey, nothing stored or sent; {plaintext: true} sends it in the clear', LIMIT, async (t) => {
  const relay = new FakeRelay()
  const alice = await device(t, relay, 'alice')
  const bob = await device(t, relay, 'bob')
  await assert.rejects(alice.client.sendMessage(['bob', 'nobody'], 'secret'), (err) => {
    assert.ok(err instanceof NoRecipientKey)
    assert.deepEqual(err.mailboxes, ['nobody'])
    return true
  })
  assert.deepEqual(relay.sentBy('alice', 'send'), [])
  assert.deepEqual(await alice.store.outbox(), [])

  await alice.client.sendMessage(['bob', 'nobody'], 'not secret', { plaintext: true })
  const [frame] = relay.sentBy('alice', 'send')
  assert.equal(text(frame.body), 'not secret')
  const [sent] = await alice.store.outbox()
  assert.equal(sent.security, 'plaintext')
  assert.equal(sent.sealed, undefined)
  const [saved] = await inboxOf(bob.store, 1)
  assert.deepEqual([text(saved.body), saved.security], ['not secret', 'plaintext'])
})

test('a changed key refuses the send (KeyChanged, both fingerprints) until acceptKey; then it goes to the new key', LIMIT, async (t) => {
  const relay = new FakeRelay()
  const alice = await device(t, relay, 'alice')
  const bob = await device(t, relay, 'bob')
  await alice.client.sendMessage('bob', 'first')
  await inboxOf(bob.store, 1)
  const oldFingerprint = await bob.client.fingerprint()
  bob.client.close()

  // bob's browser lost its store: a new device, a new identity key, published on connect.
  const bob2 = await device(t, relay, 'bob')
  const newFingerprint = await bob2.client.fingerprint()
  assert.notEqual(newFingerprint, oldFingerprint)
  alice.client.dropConnection() // keys are looked up once per connection
  await until(() => alice.named('keys').length === 2, 'alice reconnected')

  await assert.rejects(alice.client.sendMessage('bob', 'second'), (err) => {
    assert.ok(err instanceof KeyChanged)
    assert.equal(err.mailbox, 'bob')
    assert.equal(err.pinnedFingerprint, oldFingerprint)
    assert.equal(err.newFingerprint, newFingerprint)
    return true
  })
  assert.equal(relay.sentBy('alice', 'send').length, 1, 'nothing sent')
  assert.equal((await alice.store.outbox()).length, 1, 'nothing stored')
  const [contact] = await alice.client.contacts()
  assert.equal(contact.fingerprint, oldFingerprint, 'still pinned to the old key')
  assert.equal(contact.pending_fingerprint, newFingerprint)
  assert.match(contact.pending_safety_number, /^(\d{5} ){11}\d{5}$/)
  await assert.rejects(alice.client.sendMessage('bob', 'third'), KeyChanged, 'refused again: nothing changed')

  await alice.client.acceptKey('bob')
  const [accepted] = await alice.client.contacts()
  assert.deepEqual([accepted.fingerprint, accepted.pending_ik], [newFingerprint, null])
  assert.deepEqual((await alice.store.contacts()).map((c) => [c.mailbox, c.pending_ik]), [['bob', null]], 'kept in IndexedDB')
  await alice.client.sendMessage('bob', 'after accepting')
  const [saved] = await inboxOf(bob2.store, 1)
  assert.deepEqual([text(saved.body), saved.security], ['after accepting', 'e2e'])
  const [bobSees] = await bob2.client.contacts()
  assert.equal(bobSees.safety_number, accepted.safety_number)
  await assert.rejects(alice.client.acceptKey('bob'), /no changed key/)
})

test('a message signed by another identity key than the pinned one is saved as failed (key_changed), ACKed, and the new key is pending', LIMIT, async (t) => {
  const relay = new FakeRelay()
  const alice = await device(t, relay, 'alice')
  const bob = await device(t, relay, 'bob')
  await alice.client.sendMessage('bob', 'first')
  await inboxOf(bob.store, 1)
  alice.client.close()
  const alice2 = await device(t, relay, 'alice') // a new identity
  await alice2.client.sendMessage('bob', 'from a new key')
  const inbox = await inboxOf(bob.store, 2)
  assert.deepEqual(inbox.map((m) => [text(m.body), m.security, m.reason]), [['first', 'e2e', undefined], ['', 'failed', 'key_changed']])
  const [contact] = await bob.client.contacts()
  assert.equal(contact.pending_fingerprint, await alice2.client.fingerprint())
  assert.equal(contact.fingerprint, await alice.client.fingerprint())
})

test('replays and tampering are saved as failed with their reason, ACKed, never as text', LIMIT, async (t) => {
  const relay = new FakeRelay()
  const alice = await device(t, relay, 'alice')
  const bob = await device(t, relay, 'bob')
  const carol = await device(t, relay, 'carol')
  await alice.client.sendMessage('bob', 'for bob only')
  const [frame] = relay.sentBy('alice', 'send')
  await inboxOf(bob.store, 1)
  const msg = (over) => ({ type: 'deliver', id: frame.id, from: 'alice', sent_at: 1, expires_at: 9e12, attempt: 1, body: frame.body, ...over })

  relay.deliver('carol', msg({})) // replayed into another conversation
  relay.deliver('bob', msg({ id: 'another-id' })) // replayed as another message
  relay.deliver('carol', msg({ from: 'bob', id: 'x' })) // as from another sender
  relay.tamper = (body) => {
    const tampered = body.slice()
    tampered[tampered.length - 100] ^= 1 // inside the body ciphertext, under the signature
    return tampered
  }
  await alice.client.sendMessage('bob', 'changed on the way', { id: 'tampered' })
  relay.tamper = (body) => body.subarray(0, 40)
  await alice.client.sendMessage('bob', 'cut on the way', { id: 'cut' })
  const carolInbox = await inboxOf(carol.store, 2)
  const bobInbox = await inboxOf(bob.store, 4)
  bobInbox.sort((a, b) => a.received_at - b.received_at)
  const summary = (m) => [m.from, m.id, m.security, m.reason, m.body.length]
  assert.deepEqual(carolInbox.map(summary), [['alice', frame.id, 'failed', 'not_for_me', 0], ['bob', 'x', 'failed', 'mismatch', 0]])
  assert.deepEqual(bobInbox.slice(1).map(summary), [
    ['alice', 'another-id', 'failed', 'mismatch', 0],
    ['alice', 'tampered', 'failed', 'bad_signature', 0],
    ['alice', 'cut', 'failed', 'malformed', 0]
  ])
  assert.deepEqual(relay.sentBy('carol', 'key_get'), [], 'a replay never makes the recipient look a key up')
})

test('a sender without a published key: its envelope is saved as failed (no_sender_key); a plaintext body is "plaintext"', LIMIT, async (t) => {
  const relay = new FakeRelay()
  const alice = await device(t, relay, 'alice')
  const carol = await device(t, relay, 'carol')
  carol.client.close() // published, never heard of alice
  await alice.client.sendMessage('carol', 'sealed to carol')
  relay.directory.delete('alice') // alice's record expired, say
  relay.deliver('carol', { type: 'deliver', id: 'p-1', from: 'dave', sent_at: 1, expires_at: 9e12, attempt: 1, body: bytes('RE2 is not the magic') })
  const carol2 = await device(t, relay, 'carol', { indexedDB: carol.indexedDB })
  const inbox = await inboxOf(carol2.store, 2)
  inbox.sort((a, b) => (a.from < b.from ? -1 : 1))
  assert.deepEqual(inbox.map((m) => [m.from, m.security, m.reason, text(m.body)]), [
    ['alice', 'failed', 'no_sender_key', ''],
    ['dave', 'plaintext', undefined, 'RE2 is not the magic']
  ])
  assert.deepEqual(await carol2.client.contacts(), [], 'nothing pinned')
})

test('a lookup lost with the connection saves nothing and ACKs nothing: the message comes again and opens', LIMIT, async (t) => {
  const relay = new FakeRelay()
  const alice = await device(t, relay, 'alice')
  const bob = await device(t, relay, 'bob')
  let held = 0
  relay.hold = (mailbox, frame) => mailbox === 'bob' && frame.type === 'key_get' && held++ === 0
  await alice.client.sendMessage('bob', 'eventually')
  await until(() => relay.sentBy('bob', 'key_get').length === 1, 'bob asks for alice\'s key')
  relay.open.get('bob').drop()
  await until(() => bob.named('error').some((e) => /could not open/.test(e.message)), 'the failure is reported')
  const [saved] = await inboxOf(bob.store, 1)
  assert.deepEqual([text(saved.body), saved.security], ['eventually', 'e2e'])
  assert.equal(relay.sentBy('bob', 'ack').length, 1, 'ACKed once, after it was opened and saved')
})

test('after rotateKey a message sealed to the old key still opens; contacts see no key change; retired keys go after max_ttl_s', LIMIT, async (t) => {
  const relay = new FakeRelay()
  const alice = await device(t, relay, 'alice')
  const bob = await device(t, relay, 'bob')
  await alice.client.sendMessage('bob', 'before')
  await inboxOf(bob.store, 1)
  bob.client.close()
  await alice.client.sendMessage('bob', 'queued under the old key')
  const oldKid = [...peek(relay.sentBy('alice', 'send')[1].body).kids.values()][0]

  const bob2 = await device(t, relay, 'bob', { indexedDB: bob.indexedDB }) // the same browser, reloaded
  const inbox = await inboxOf(bob2.store, 2)
  assert.deepEqual(inbox.map((m) => [text(m.body), m.security]), [['before', 'e2e'], ['queued under the old key', 'e2e']])
  bob2.client.close()
  await alice.client.sendMessage('bob', 'also queued under the old key')
  const bob3 = await device(t, relay, 'bob', { indexedDB: bob.indexedDB, start: false })
  await bob3.client.start()
  await until(() => bob3.named('keys').length === 1, 'published')
  await inboxOf(bob3.store, 3)
  const newKid = await bob3.client.rotateKey()
  assert.notEqual(newKid, oldKid)
  assert.equal(relay.directory.get('bob').kid, newKid, 'the new record is published at once')
  const keys = await bob3.store.deviceKeys()
  assert.deepEqual(keys.encryptionKeys.map((k) => [k.kid, k.retired_at === null]).sort(), [[newKid, true], [oldKid, false]].sort())

  // alice looked bob up on this connection before the rotation: she seals to the retired key.
  const oldRecord = relay.sentBy('bob', 'key_put')[0].key
  await alice.client.sendMessage('bob', 'sealed to the retired key')
  const [, , , late] = await inboxOf(bob3.store, 4)
  assert.deepEqual([text(late.body), late.security], ['sealed to the retired key', 'e2e'])

  alice.client.dropConnection()
  await until(() => alice.named('keys').length === 2, 'alice reconnected')
  await alice.client.sendMessage('bob', 'to the new key') // no KeyChanged: the same identity key
  const sent = relay.sentBy('alice', 'send').at(-1)
  assert.deepEqual([...peek(sent.body).kids.values()], [newKid])
  assert.equal((await inboxOf(bob3.store, 5))[4].security, 'e2e')
  assert.deepEqual((await alice.client.contacts()).map((c) => c.pending_ik), [null])

  // Retired keys are deleted max_ttl_s after they were retired, on the next connect: a message
  // still sealed to one (a stale directory served the old record) no longer opens.
  bob3.client.close()
  relay.directory.set('bob', oldRecord)
  alice.client.dropConnection()
  await until(() => alice.named('keys').length === 3, 'alice reconnected')
  await alice.client.sendMessage('bob', 'sealed to a key long retired')
  relay.maxTtlS = 1
  await new Promise((resolve) => setTimeout(resolve, 1100))
  const bob4 = await device(t, relay, 'bob', { indexedDB: bob.indexedDB })
  const last = (await inboxOf(bob4.store, 6))[5]
  assert.deepEqual([last.security, last.reason, last.body.length], ['failed', 'unknown_key', 0])
  assert.deepEqual((await bob4.store.deviceKeys()).encryptionKeys.map((k) => k.kid), [newKid])
})

test('a reload keeps the device\'s keys and the pins (IndexedDB)', LIMIT, async (t) => {
  const relay = new FakeRelay()
  const alice = await device(t, relay, 'alice')
  const bob = await device(t, relay, 'bob')
  await alice.client.sendMessage('bob', 'hi')
  await inboxOf(bob.store, 1)
  const before = { fp: await alice.client.fingerprint(), contacts: await alice.client.contacts(), record: relay.directory.get('alice') }
  alice.client.close()
  alice.store.close()
  const again = await device(t, relay, 'alice', { indexedDB: alice.indexedDB })
  assert.equal(await again.client.fingerprint(), before.fp)
  assert.deepEqual(await again.client.contacts(), before.contacts)
  assert.deepEqual(relay.directory.get('alice'), before.record, 'the same record published again')
  const keys = await again.store.deviceKeys()
  assert.equal(keys.identity.privateKey.extractable, false)
  assert.equal(keys.encryptionKeys[0].privateKey.extractable, false)
  await again.client.sendMessage('bob', 'after the reload')
  assert.deepEqual((await inboxOf(bob.store, 2)).map((m) => m.security), ['e2e', 'e2e'])
})

test('a key record that does not verify for its mailbox refuses the send (InvalidKeyRecord)', LIMIT, async (t) => {
  const relay = new FakeRelay()
  const alice = await device(t, relay, 'alice')
  await device(t, relay, 'bob')
  relay.directory.set('mallory', relay.directory.get('bob')) // bob's record served for another mailbox
  await assert.rejects(alice.client.sendMessage('mallory', 'x'), (err) => err instanceof InvalidKeyRecord && err.mailbox === 'mallory')
  assert.deepEqual(relay.sentBy('alice', 'send'), [])
  assert.deepEqual(await alice.client.contacts(), [], 'nothing pinned')
})

test('a send made before the first connection waits for it to look the keys up', LIMIT, async (t) => {
  const relay = new FakeRelay()
  await device(t, relay, 'bob')
  const alice = await device(t, relay, 'alice', { start: false })
  const sent = alice.client.sendMessage('bob', 'early')
  await alice.client.start()
  const receipt = await sent
  assert.deepEqual(receipt.results, { bob: { status: 'queued' } })
  assert.equal(isEnvelope(relay.sentBy('alice', 'send')[0].body), true)
})

test('without a store the keys live in memory; with e2e off nothing is published and envelopes are not opened', LIMIT, async (t) => {
  const relay = new FakeRelay()
  const bob = await device(t, relay, 'bob')
  const memory = new RelayClient({ url: 'ws://relay.test/relay', token: 'alice', WebSocketImpl: relay.socketClass() })
  const published = new Promise((resolve) => memory.addEventListener('keys', resolve, { once: true }))
  t.after(() => memory.close())
  await memory.start()
  await published
  await memory.sendMessage('bob', 'from memory')
  assert.equal((await inboxOf(bob.store, 1))[0].security, 'e2e')
  assert.equal((await memory.contacts())[0].fingerprint, await fingerprint('bob', relay.directory.get('bob').ik))

  const plain = new RelayClient({ url: 'ws://relay.test/relay', token: 'carol', e2e: false, WebSocketImpl: relay.socketClass() })
  const messages = []
  plain.addEventListener('message', (e) => messages.push(e.detail))
  t.after(() => plain.close())
  await plain.start()
  await until(() => plain.state === 'open', 'carol connected')
  await plain.sendMessage('bob', 'in the clear')
  assert.equal((await inboxOf(bob.store, 2))[1].security, 'plaintext')
  await assert.rejects(memory.sendMessage(['bob', 'carol'], 'sealed'), NoRecipientKey, 'carol published no key')
  relay.deliver('carol', { type: 'deliver', id: 'e-1', from: 'bob', sent_at: 1, expires_at: 9e12, attempt: 1, body: relay.sentBy('alice', 'send')[0].body })
  await until(() => messages.length === 1, 'carol got it')
  assert.deepEqual([messages[0].security, messages[0].reason, messages[0].body.length], ['failed', 'unknown_key', 0])
  assert.equal(relay.sentBy('carol', 'key_put').length, 0)
  await settle()
})
