// The client's logic in Node: a fake WebSocket (frames in, frames out) and an in-memory store.
// What needs a real browser (IndexedDB, the demo page, a real broker) is in tests/browser/.
import { test } from 'node:test'
import assert from 'node:assert/strict'

import { IDBFactory } from 'fake-indexeddb'

import { ERROR_CODES, LocalProtocolError, decodeMessage, encodeFrame } from '../codec.js'
import { MessageStore, RelayClient, deliveryStates } from '../client.js'

const TOKEN = 'header.payload.signature'

const WELCOME = {
  type: 'welcome',
  version: 1,
  session: 's1',
  mailbox: 'bob',
  pending: 0,
  max_frame_bytes: 1048576,
  max_inflight: 1024,
  max_recipients: 100,
  default_ttl_s: 604800,
  max_ttl_s: 2592000,
  keepalive_s: 60,
  expires_in_s: 3600
}

function deliver (id, text = `body of ${id}`, attempt = 1, from = 'alice') {
  return { type: 'deliver', id, from, sent_at: 1000, expires_at: 2000, attempt, body: new TextEncoder().encode(text) }
}

/** Frames back to back with their prefixes, as one WebSocket message carries them. */
const packed = (frames) => new Uint8Array(Buffer.concat(frames.map(encodeFrame)))

/** Let every pending promise callback and I/O callback run. */
const settle = () => new Promise((resolve) => setImmediate(resolve))

/** A WebSocket class whose instances the test drives: open(), receive(frame), drop(). */
function fakeWebSocket () {
  const sockets = []
  class FakeWebSocket {
    constructor (url) {
      this.url = url
      this.readyState = 0
      this.sent = [] // decoded frames, in order
      this.messages = [] // per binary message sent: {bytes, types}
      this.closeCode = null
      sockets.push(this)
    }

    send (data) {
      if (this.readyState !== 1) throw new Error('InvalidStateError: not open')
      const frames = decodeMessage(data) // whole frames with their prefixes, or it throws
      this.messages.push({ bytes: data.length, types: frames.map((f) => f.type) })
      this.sent.push(...frames)
    }

    close (code) {
      if (this.readyState === 3) return
      this.closeCode = code
      this.readyState = 3
      setImmediate(() => this.onclose?.({ code })) // a real socket reports its close later
    }

    open () {
      this.readyState = 1
      this.onopen?.()
    }

    receive (frame) {
      this.onmessage?.({ data: encodeFrame(frame).buffer })
    }

    receiveBytes (bytes) {
      this.onmessage?.({ data: bytes.slice().buffer }) // an ArrayBuffer of exactly these bytes
    }

    drop () {
      this.readyState = 3
      this.onclose?.({ code: 1006 })
    }

    sentOfType (type) {
      return this.sent.filter((f) => f.type === type)
    }
  }
  return { FakeWebSocket, sockets, last: () => sockets[sockets.length - 1] }
}

/**
 * MessageStore's contract, in memory; saveIncoming fails while `failSaves` says so.
 * (test/store.test.mjs runs the real IndexedDB store; the scenarios that depend on its
 * keys run here against it too.)
 */
class MemoryStore {
  constructor () {
    this.inbox = new Map() // "from id" -> record (a space is in neither a mailbox id nor a message id)
    this.outboxById = new Map()
    this.statuses = new Map() // seq -> saved status (the real store keys them by (id, recipient); test/store.test.mjs)
    this.failSaves = new Set() // message ids, or status seqs, whose next save throws
    this.saveCalls = []
  }

  /** The stored message from `from` with this id (alice unless said). */
  get (id, from = 'alice') {
    return this.inbox.get(`${from} ${id}`)
  }

  async saveIncoming (msg) {
    this.saveCalls.push(msg.id)
    if (this.failSaves.delete(msg.id)) throw new Error('QuotaExceededError')
    const existing = this.get(msg.id, msg.from)
    if (existing) return { record: existing, isNew: false }
    const record = { id: msg.id, from: msg.from, body: msg.body, attempt: msg.attempt, state: 'saved' }
    this.inbox.set(`${msg.from} ${msg.id}`, record)
    return { record, isNew: true }
  }

  async markAcked (from, id) {
    const record = this.get(id, from)
    if (record) record.state = 'acked'
    return record && { ...record }
  }

  async saveStatus (status) {
    this.saveCalls.push(status.seq)
    if (this.failSaves.delete(status.seq)) throw new Error('QuotaExceededError')
    const existing = this.statuses.get(status.seq)
    if (existing) return { record: existing, isNew: false }
    const record = { ...status }
    this.statuses.set(status.seq, record)
    return { record, isNew: true }
  }

  async saveOutgoing (entry) {
    this.outboxById.set(entry.id, { results: null, ...entry })
  }

  async saveReceipt (receipt) {
    const entry = this.outboxById.get(receipt.id)
    if (entry && receipt.code !== undefined) entry.code = receipt.code
    else if (entry) entry.results = receipt.results
    return entry
  }

  async unconfirmed () {
    return [...this.outboxById.values()].filter((e) => e.results === null && e.code === undefined)
  }
}

/**
 * A client over fake sockets; `events` records every event's type and detail. End-to-end
 * encryption is off here (these tests are about the protocol: framing, ACKs, resends, statuses);
 * test/client-e2e.test.mjs tests the client with it on, as it is by default.
 */
function makeClient (t, options = {}) {
  const ws = fakeWebSocket()
  const client = new RelayClient({ url: 'ws://relay.test/relay', token: TOKEN, WebSocketImpl: ws.FakeWebSocket, e2e: false, ...options })
  const events = []
  for (const name of ['state', 'welcome', 'message', 'acked', 'receipt', 'status', 'drained', 'error']) {
    client.addEventListener(name, (e) => events.push([name, e.detail]))
  }
  t.after(() => client.close())
  return { client, ws, events, named: (name) => events.filter(([n]) => n === name).map(([, d]) => d) }
}

/** Start the client and complete the handshake on its socket. */
async function connect (client, ws, welcome = WELCOME) {
  await client.start()
  const socket = ws.last()
  socket.open()
  socket.receive(welcome)
  await settle()
  return socket
}

test('on open it says HELLO with the token, and WELCOME makes it open', async (t) => {
  const { client, ws, named } = makeClient(t, { agent: 'relay-test' })
  await client.start()
  assert.equal(client.state, 'connecting')
  const socket = ws.last()
  assert.equal(socket.url, 'ws://relay.test/relay')
  socket.open()
  assert.deepEqual(socket.sent, [{ type: 'hello', version: 1, token: TOKEN, agent: 'relay-test' }])
  socket.receive(WELCOME)
  assert.equal(client.state, 'open')
  assert.equal(client.mailbox, 'bob')
  assert.deepEqual(named('state').map((d) => d.state), ['connecting', 'open'])
})

test('a delivered message is saved first and ACKed only once the save is done', async (t) => {
  const store = new MemoryStore()
  let finishSave
  const slowSave = store.saveIncoming.bind(store)
  store.saveIncoming = (msg) => new Promise((resolve) => { finishSave = () => resolve(slowSave(msg)) })
  const { client, ws, named } = makeClient(t, { store })
  const socket = await connect(client, ws)
  socket.receive(deliver('m1'))
  await settle()
  assert.deepEqual(socket.sentOfType('ack'), [], 'no ACK before the save finished')
  finishSave()
  await settle()
  assert.deepEqual(socket.sentOfType('ack'), [{ type: 'ack', ids: ['m1'] }])
  assert.equal(store.get('m1').state, 'acked')
  assert.deepEqual(named('message').map((r) => r.id), ['m1'])
  assert.deepEqual(named('acked').map((r) => [r.id, r.state]), [['m1', 'acked']])
})

test('a failed save sends no ACK, and the redelivery is saved and ACKed', async (t) => {
  const store = new MemoryStore()
  store.failSaves.add('m1')
  const { client, ws, named } = makeClient(t, { store })
  const socket = await connect(client, ws)
  socket.receive(deliver('m1'))
  await settle()
  assert.deepEqual(socket.sentOfType('ack'), [])
  assert.equal(store.inbox.size, 0)
  assert.deepEqual(named('message'), [])
  assert.match(named('error')[0].message, /could not save message m1/)
  assert.equal(named('error')[0].close, false)
  assert.equal(client.state, 'open', 'a failed save does not drop the connection')

  socket.receive(deliver('m1', 'body of m1', 2)) // the broker delivers it again
  await settle()
  assert.deepEqual(socket.sentOfType('ack'), [{ type: 'ack', ids: ['m1'] }])
  assert.deepEqual(store.saveCalls, ['m1', 'm1'])
  assert.equal(store.get('m1').state, 'acked')
  assert.deepEqual(named('message').map((r) => r.id), ['m1'])
})

test('processRelayMessage resolves null when the save fails', async (t) => {
  const store = new MemoryStore()
  store.failSaves.add('m1')
  const { client, ws } = makeClient(t, { store })
  const socket = await connect(client, ws)
  assert.equal(await client.processRelayMessage(deliver('m1')), null)
  assert.deepEqual(socket.sentOfType('ack'), [])
})

test('a redelivered message is ACKed again but announced once', async (t) => {
  const store = new MemoryStore()
  const { client, ws, named } = makeClient(t, { store })
  const socket = await connect(client, ws)
  socket.receive(deliver('m1'))
  await settle()
  socket.receive(deliver('m1', 'body of m1', 2))
  await settle()
  assert.deepEqual(socket.sentOfType('ack'), [{ type: 'ack', ids: ['m1'] }, { type: 'ack', ids: ['m1'] }])
  assert.equal(named('message').length, 1)
  assert.equal(store.get('m1').attempt, 1, 'the first copy is kept')
})

test('an ACK lost to a dropped connection breaks nothing; the redelivery is recognised', async (t) => {
  const store = new MemoryStore()
  let dropBeforeAck = true
  const { client, ws, named } = makeClient(t, {
    store,
    minBackoffMs: 1,
    beforeAck: async () => {
      if (dropBeforeAck) ws.last().drop() // saved, then the network goes before the ACK
    }
  })
  const first = await connect(client, ws)
  const record = await client.processRelayMessage(deliver('m1'))
  assert.equal(record.state, 'saved', 'saved, not ACKed')
  assert.deepEqual(first.sentOfType('ack'), [])
  assert.equal(store.get('m1').state, 'saved')

  dropBeforeAck = false
  while (ws.sockets.length < 2) await new Promise((resolve) => setTimeout(resolve, 2)) // reconnect
  const second = ws.last()
  second.open()
  second.receive(WELCOME)
  second.receive(deliver('m1', 'body of m1', 2))
  await settle()
  assert.deepEqual(second.sentOfType('ack'), [{ type: 'ack', ids: ['m1'] }])
  assert.equal(store.get('m1').state, 'acked')
  assert.equal(named('message').length, 1)
})

test('acknowledgeMessage says whether the ACK went out', async (t) => {
  const { client, ws } = makeClient(t)
  assert.equal(client.acknowledgeMessage('m1'), false) // not connected
  const socket = await connect(client, ws)
  assert.equal(client.acknowledgeMessage(['m1', 'm2']), true)
  await settle() // it goes out at the end of the turn
  assert.deepEqual(socket.sentOfType('ack'), [{ type: 'ack', ids: ['m1', 'm2'] }])
})

test('sendMessage resolves with the receipt and records it in the store', async (t) => {
  const store = new MemoryStore()
  const { client, ws, named } = makeClient(t, { store })
  const socket = await connect(client, ws)
  const sent = client.sendMessage('alice', 'hi', { ttl: 60, id: 'out-1' })
  await settle()
  assert.deepEqual(socket.sentOfType('send'), [{ type: 'send', id: 'out-1', to: ['alice'], body: new TextEncoder().encode('hi'), ttl_s: 60, notify: true }])
  assert.equal(store.outboxById.get('out-1').results, null)
  socket.receive({ type: 'receipt', id: 'out-1', results: { alice: { status: 'queued' } } })
  assert.deepEqual(await sent, { id: 'out-1', results: { alice: { status: 'queued' } } })
  assert.deepEqual(store.outboxById.get('out-1').results, { alice: { status: 'queued' } })
  assert.deepEqual(named('receipt'), [{ id: 'out-1', results: { alice: { status: 'queued' } } }])
})

test('sends made while disconnected go out on connect, and again with the same ids after a reconnect', async (t) => {
  const { client, ws } = makeClient(t, { minBackoffMs: 1 })
  const sent = [client.sendMessage('alice', 'one', { id: 'q1' }), client.sendMessage(['alice', 'carol'], 'two', { id: 'q2' })]
  const first = await connect(client, ws)
  assert.deepEqual(first.sentOfType('send').map((f) => [f.id, f.to]), [['q1', ['alice']], ['q2', ['alice', 'carol']]])
  first.receive({ type: 'receipt', id: 'q1', results: { alice: { status: 'delivered' } } })
  first.drop() // q2's receipt is lost
  while (ws.sockets.length < 2) await new Promise((resolve) => setTimeout(resolve, 2))
  const second = ws.last()
  second.open()
  second.receive(WELCOME)
  assert.deepEqual(second.sentOfType('send').map((f) => f.id), ['q2'], 'only the unconfirmed send, same id')
  second.receive({ type: 'receipt', id: 'q2', results: { alice: { status: 'duplicate' }, carol: { status: 'queued' } } })
  const receipts = await Promise.all(sent)
  assert.deepEqual(receipts.map((r) => r.id), ['q1', 'q2'])
})

test('the same id sent twice is one send with one receipt', async (t) => {
  const { client, ws } = makeClient(t)
  const socket = await connect(client, ws)
  const a = client.sendMessage('alice', 'x', { id: 'same' })
  const b = client.sendMessage('alice', 'x', { id: 'same' })
  await settle()
  assert.equal(socket.sentOfType('send').length, 1)
  socket.receive({ type: 'receipt', id: 'same', results: { alice: { status: 'queued' } } })
  assert.deepEqual(await a, await b)
})

test('start() resends what the store holds unconfirmed (a reload), with the same ids', async (t) => {
  const store = new MemoryStore()
  await store.saveOutgoing({ id: 'old-1', to: ['alice'], body: new Uint8Array([1, 2]) })
  await store.saveOutgoing({ id: 'old-2', to: ['alice'], body: new Uint8Array([3]), ttl_s: 30 })
  await store.saveReceipt({ id: 'old-2', results: { alice: { status: 'queued' } } }) // confirmed: not resent
  const { client, ws } = makeClient(t, { store })
  const socket = await connect(client, ws)
  assert.deepEqual(socket.sentOfType('send'), [{ type: 'send', id: 'old-1', to: ['alice'], body: new Uint8Array([1, 2]) }])
})

test('fetchPendingMessages resolves with the DRAINED that answers its PULL', async (t) => {
  const { client, ws } = makeClient(t)
  await assert.rejects(client.fetchPendingMessages(), /not connected/)
  const socket = await connect(client, ws)
  const pulled = client.fetchPendingMessages()
  await settle() // it goes out at the end of the turn
  assert.deepEqual(socket.sentOfType('pull'), [{ type: 'pull' }])
  socket.receive({ type: 'drained', pending: 7 }) // the connect-time DRAINED, before the PULL's
  socket.receive({ type: 'drained', pending: 3 })
  assert.equal(await pulled, 3)
})

test('a dropped connection rejects what waits for an answer', async (t) => {
  const { client, ws } = makeClient(t, { minBackoffMs: 1000 })
  const socket = await connect(client, ws)
  const pulled = client.fetchPendingMessages()
  const stats = client.getStats()
  socket.drop()
  await assert.rejects(pulled, /connection lost/)
  await assert.rejects(stats, /connection lost/)
  assert.equal(client.state, 'closed')
})

test('getStats resolves with the stats, or rejects with FORBIDDEN for a mailbox', async (t) => {
  const { client, ws } = makeClient(t)
  const socket = await connect(client, ws, { ...WELCOME, mailbox: undefined })
  const ok = client.getStats()
  socket.receive({ type: 'stats_result', stats: { messages_total: 4 } })
  assert.deepEqual(await ok, { messages_total: 4 })
  const refused = client.getStats()
  socket.receive({ type: 'error', code: ERROR_CODES.FORBIDDEN, message: 'operators only', close: false })
  await assert.rejects(refused, (err) => err.code === ERROR_CODES.FORBIDDEN)
  assert.equal(client.state, 'open')
})

test('a message that is not exactly one frame is an error and closes the socket', async (t) => {
  const { client, ws, named } = makeClient(t, { minBackoffMs: 1000 })
  const socket = await connect(client, ws)
  const frame = encodeFrame({ type: 'pong' })
  socket.receiveBytes(frame.subarray(0, frame.length - 1))
  assert.equal(socket.closeCode, 1002)
  assert.equal(named('error')[0].code, ERROR_CODES.MALFORMED_FRAME)
})

test('a message holding several frames is handled frame by frame, in order', async (t) => {
  const store = new MemoryStore()
  const { client, ws, named } = makeClient(t, { store })
  await client.start()
  const socket = ws.last()
  socket.open()
  const frames = [WELCOME, deliver('m1'), deliver('m2', 'second', 1, 'carol'), { type: 'drained', pending: 0 }]
  socket.receiveBytes(packed(frames)) // what a broker that packs its output sends
  assert.equal(client.state, 'open')
  for (let i = 0; i < 20 && named('acked').length < 2; i++) await settle()
  assert.deepEqual(named('message').map((r) => [r.from, r.id]), [['alice', 'm1'], ['carol', 'm2']])
  assert.deepEqual(socket.sentOfType('ack').map((f) => f.ids), [['m1'], ['m2']])
  assert.deepEqual(named('drained'), [{ pending: 0 }])
  assert.deepEqual(named('error'), [])
  assert.equal(socket.closeCode, null)
})

test('a message ending inside a frame is MALFORMED_FRAME and none of its whole frames is handled', async (t) => {
  const { client, ws, named } = makeClient(t, { minBackoffMs: 1000 })
  const socket = await connect(client, ws)
  const last = encodeFrame({ type: 'drained', pending: 1 })
  socket.receiveBytes(new Uint8Array(Buffer.concat([encodeFrame(deliver('m1')), last.subarray(0, last.length - 1)])))
  assert.equal(socket.closeCode, 1002)
  assert.deepEqual(named('error').map((e) => [e.code, e.close]), [[ERROR_CODES.MALFORMED_FRAME, true]])
  assert.deepEqual(named('message'), [])
  assert.deepEqual(named('drained'), [])
})

test('an empty message, one shorter than a prefix, and a text message are MALFORMED_FRAME', async (t) => {
  for (const data of [new Uint8Array(0), new Uint8Array([0, 0, 0]), 'not binary']) {
    const { client, ws, named } = makeClient(t, { minBackoffMs: 1000 })
    const socket = await connect(client, ws)
    socket.onmessage({ data: typeof data === 'string' ? data : data.buffer })
    assert.equal(socket.closeCode, 1002, String(data))
    assert.deepEqual(named('error').map((e) => e.code), [ERROR_CODES.MALFORMED_FRAME])
  }
})

test('frames after one whose handler closed the client are not handled', async (t) => {
  const { client, ws, named } = makeClient(t)
  const socket = await connect(client, ws)
  client.addEventListener('drained', () => client.close(), { once: true })
  socket.receiveBytes(packed([{ type: 'drained', pending: 0 }, deliver('late')]))
  await settle()
  assert.deepEqual(named('drained'), [{ pending: 0 }])
  assert.deepEqual(named('message'), [], 'the DELIVER after it belongs to a closed connection')
})

test('frames made in one turn go out in one message, in order, at the end of the turn', async (t) => {
  const { client, ws } = makeClient(t)
  const socket = await connect(client, ws)
  assert.deepEqual(socket.messages.map((m) => m.types), [['hello']], 'HELLO alone, at once')
  client.sendMessage('alice', 'one', { id: 'b1' })
  client.sendMessage(['alice', 'carol'], 'two', { id: 'b2' })
  assert.equal(client.acknowledgeMessage(['d1', 'd2']), true)
  client.sendMessage('carol', 'three', { id: 'b3' })
  client.fetchPendingMessages().catch(() => {}) // rejected by the close at the end of the test
  assert.equal(socket.messages.length, 1, 'nothing before the turn ends')
  await settle()
  assert.deepEqual(socket.messages.slice(1).map((m) => m.types), [['send', 'send', 'ack', 'send', 'pull']])
  assert.deepEqual(socket.sent.slice(1).map((f) => f.id ?? f.ids), ['b1', 'b2', ['d1', 'd2'], 'b3', undefined])
})

test('packed messages stay within WELCOME\'s max_frame_bytes + 4 and no frame is split', async (t) => {
  const { client, ws } = makeClient(t, { notify: false }) // the frames as encodeFrame makes them below
  const socket = await connect(client, ws, { ...WELCOME, max_frame_bytes: 1024 })
  const sizes = [300, 300, 300, 10, 700, 1100, 5, 5, 1000, 990, 0]
  sizes.forEach((n, i) => client.sendMessage('alice', new Uint8Array(n), { id: `p${i}` }))
  await settle()
  const messages = socket.messages.slice(1)
  assert.deepEqual(socket.sent.slice(1).map((f) => f.id), sizes.map((_, i) => `p${i}`), 'every frame once, in order')
  const frameBytes = sizes.map((n, i) => encodeFrame({ type: 'send', id: `p${i}`, to: ['alice'], body: new Uint8Array(n) }).length)
  let next = 0
  for (const [i, m] of messages.entries()) {
    const count = m.types.length
    if (count > 1) assert.ok(m.bytes <= 1028, `a message of ${count} frames is ${m.bytes} bytes`)
    else assert.equal(m.bytes, frameBytes[next], 'a frame above the limit goes alone, whole')
    next += count
    if (i + 1 < messages.length) assert.ok(m.bytes + frameBytes[next] > 1028, 'the next frame would not have fitted')
  }
  assert.ok(messages.length > 1 && messages.length < sizes.length, `${messages.length} messages`)

  // Two frames of exactly 1,028 bytes together share a message; one byte more and they do not.
  const frameOf = (id, n) => encodeFrame({ type: 'send', id, to: ['alice'], body: new Uint8Array(n) }).length
  for (const extra of [0, 1]) {
    const [a, b] = [`e1-${extra}`, `e2-${extra}`]
    let n = 0
    while (frameOf(a, 300) + frameOf(b, n) < 1028 + extra) n++
    assert.equal(frameOf(a, 300) + frameOf(b, n), 1028 + extra)
    const before = socket.messages.length
    client.sendMessage('alice', new Uint8Array(300), { id: a })
    client.sendMessage('alice', new Uint8Array(n), { id: b })
    await settle()
    assert.deepEqual(socket.messages.slice(before).map((m) => m.types.length), extra ? [1, 1] : [2])
  }
})

test('frames queued for a socket that goes in the same turn are dropped, and the sends go out again after WELCOME', async (t) => {
  const { client, ws } = makeClient(t, { minBackoffMs: 1 })
  const first = await connect(client, ws)
  client.sendMessage('alice', 'x', { id: 'lost-1' })
  client.acknowledgeMessage('d1')
  first.drop()
  await settle()
  assert.deepEqual(first.sent.map((f) => f.type), ['hello'], 'nothing written to a closed socket')
  while (ws.sockets.length < 2) await new Promise((resolve) => setTimeout(resolve, 2))
  const second = ws.last()
  second.open()
  assert.deepEqual(second.messages.map((m) => m.types), [['hello']], 'not the old connection\'s ACK')
  second.receive(WELCOME)
  assert.deepEqual(second.sent.map((f) => f.id ?? f.type), ['hello', 'lost-1'])
})

test('close() sends what is queued, then BYE, in one message before it closes', async (t) => {
  const { client, ws } = makeClient(t)
  const socket = await connect(client, ws)
  client.sendMessage('alice', 'last words', { id: 'l1' })
  client.close()
  assert.deepEqual(socket.messages.slice(1).map((m) => m.types), [['send', 'bye']])
  assert.equal(socket.closeCode, 1000)
})

test('a refused token stops the reconnecting', async (t) => {
  const { client, ws } = makeClient(t, { minBackoffMs: 1 })
  await client.start()
  const socket = ws.last()
  socket.open()
  socket.receive({ type: 'error', code: ERROR_CODES.INVALID_TOKEN, message: 'bad token', close: true })
  socket.drop()
  await new Promise((resolve) => setTimeout(resolve, 30))
  assert.equal(ws.sockets.length, 1, 'no retry: a retry cannot fix the token')
  assert.equal(client.state, 'closed')
})

test('reconnects back off exponentially with full jitter, capped, and reset by WELCOME', async (t) => {
  t.mock.method(Math, 'random', () => 1) // the top of each jitter range
  t.mock.timers.enable({ apis: ['setTimeout'] })
  const { client, ws } = makeClient(t, { minBackoffMs: 100, maxBackoffMs: 1000 })
  await client.start()
  const delays = []
  for (let i = 0; i < 6; i++) {
    const before = ws.sockets.length
    ws.last().drop()
    let waited = 0
    while (ws.sockets.length === before) {
      t.mock.timers.tick(10)
      waited += 10
    }
    delays.push(waited)
  }
  assert.deepEqual(delays, [100, 200, 400, 800, 1000, 1000])
  const socket = ws.last()
  socket.open()
  socket.receive(WELCOME)
  socket.drop()
  let waited = 0
  while (ws.sockets.length === 7) {
    t.mock.timers.tick(10)
    waited += 10
  }
  assert.equal(waited, 100, 'a successful connection resets the backoff')
})

test('after ERROR 4006 the reconnect waits at least its retry_after_ms, and the error event carries it', async (t) => {
  t.mock.method(Math, 'random', () => 1) // the top of each jitter range: 100 ms here
  t.mock.timers.enable({ apis: ['setTimeout'] })
  const { client, ws, named } = makeClient(t, { minBackoffMs: 100, maxBackoffMs: 1000 })
  await client.start()
  const socket = ws.last()
  socket.open()
  socket.receive({ type: 'error', code: ERROR_CODES.CONNECTION_RATE_LIMITED, message: 'too fast', close: true, retry_after_ms: 2500 })
  socket.drop()
  assert.deepEqual(named('error'), [{ type: 'error', code: 4006, message: 'too fast', close: true, retry_after_ms: 2500 }])
  let waited = 0
  while (ws.sockets.length === 1) {
    t.mock.timers.tick(10)
    waited += 10
  }
  assert.equal(waited, 2500, 'not the 100 ms of backoff: the broker asked for 2.5 s')
  ws.last().drop() // a plain loss afterwards: the hint is spent, the backoff applies again
  waited = 0
  while (ws.sockets.length === 2) {
    t.mock.timers.tick(10)
    waited += 10
  }
  assert.equal(waited, 200)
})

test('a SEND refused with 3010 RATE_LIMITED resolves with {id, code, retry_after_ms}', async (t) => {
  const { client, ws, named } = makeClient(t)
  const socket = await connect(client, ws)
  const sent = client.sendMessage('alice', 'too fast', { id: 'fast-1' })
  await settle()
  socket.receive({ type: 'receipt', id: 'fast-1', code: ERROR_CODES.RATE_LIMITED, retry_after_ms: 750 })
  assert.deepEqual(await sent, { id: 'fast-1', code: 3010, retry_after_ms: 750 })
  assert.deepEqual(named('receipt'), [{ id: 'fast-1', code: 3010, retry_after_ms: 750 }])
})

test('close() says BYE and stops reconnecting', async (t) => {
  const { client, ws } = makeClient(t, { minBackoffMs: 1 })
  const socket = await connect(client, ws)
  client.close()
  assert.deepEqual(socket.sent.at(-1), { type: 'bye' })
  assert.equal(socket.closeCode, 1000)
  await new Promise((resolve) => setTimeout(resolve, 20))
  assert.equal(ws.sockets.length, 1)
  assert.equal(client.state, 'closed')
})

test('another sender\'s message reusing an expired message\'s id is saved, announced and ACKed (real IndexedDB store)', { timeout: 10_000 }, async (t) => {
  const store = await MessageStore.open('bob', { indexedDB: new IDBFactory() })
  t.after(() => store.close())
  const { client, ws, named } = makeClient(t, { store })
  const socket = await connect(client, ws)
  const acks = async (n) => {
    while (named('acked').length < n) await new Promise((resolve) => setTimeout(resolve, 1)) // IndexedDB takes a few turns
  }
  socket.receive(deliver('z-1', 'from alice', 1, 'alice'))
  await acks(1)
  socket.receive(deliver('z-1', 'from alice', 2, 'alice')) // a redelivery: same sender, same id
  await acks(2)
  socket.receive(deliver('z-1', 'from carol', 1, 'carol')) // alice's expired; carol may use z-1 now
  await acks(3)
  const text = (bytes) => new TextDecoder().decode(bytes)
  assert.deepEqual(named('message').map((r) => [r.from, r.id, text(r.body)]), [['alice', 'z-1', 'from alice'], ['carol', 'z-1', 'from carol']])
  assert.deepEqual(named('acked').map((r) => [r.from, r.state]), [['alice', 'acked'], ['alice', 'acked'], ['carol', 'acked']])
  assert.deepEqual(socket.sentOfType('ack').map((f) => f.ids), [['z-1'], ['z-1'], ['z-1']])
  assert.deepEqual((await store.inbox()).map((m) => [m.from, m.id, text(m.body), m.state]), [
    ['alice', 'z-1', 'from alice', 'acked'],
    ['carol', 'z-1', 'from carol', 'acked']
  ])
})

test('a SEND refused as a whole resolves with {id, code}, is recorded as answered and not sent again', async (t) => {
  const store = new MemoryStore()
  const { client, ws, named } = makeClient(t, { store, minBackoffMs: 1 })
  const first = await connect(client, ws)
  const sent = client.sendMessage(['alice', 'carol'], 'to too many', { id: 'big-1' })
  await settle()
  first.receive({ type: 'receipt', id: 'big-1', code: ERROR_CODES.TOO_MANY_RECIPIENTS })
  const receipt = await sent
  assert.deepEqual(receipt, { id: 'big-1', code: 3004 })
  assert.equal('results' in receipt, false, 'no per-recipient results: nothing was stored for anyone')
  assert.deepEqual(named('receipt'), [{ id: 'big-1', code: 3004 }])
  assert.deepEqual([store.outboxById.get('big-1').results, store.outboxById.get('big-1').code], [null, 3004])
  assert.deepEqual(await store.unconfirmed(), [])
  first.drop()
  while (ws.sockets.length < 2) await new Promise((resolve) => setTimeout(resolve, 2))
  const second = ws.last()
  second.open()
  second.receive(WELCOME)
  assert.deepEqual(second.sentOfType('send'), [], 'a refused SEND is answered: not resent')
})

test('a send the protocol forbids is refused before it is stored or sent', async (t) => {
  const store = new MemoryStore()
  const { client, ws } = makeClient(t, { store })
  const socket = await connect(client, ws)
  const tooLong = 'b'.repeat(65)
  await assert.rejects(client.sendMessage(['alice', tooLong], 'x', { id: 'long-1' }), (err) => err instanceof LocalProtocolError && err.code === ERROR_CODES.INVALID_FIELD)
  await assert.rejects(client.sendMessage([], 'x', { id: 'none-1' }), LocalProtocolError)
  await assert.rejects(client.sendMessage('alice', 'x', { id: 'has space' }), LocalProtocolError)
  assert.deepEqual(socket.sentOfType('send'), [])
  assert.equal(store.outboxById.size, 0)
  // The limit is 64 code points: 64 astral characters are 128 UTF-16 units and still fine.
  client.sendMessage('\u{1F680}'.repeat(64), 'x', { id: 'astral-1' })
  await settle()
  assert.deepEqual(socket.sentOfType('send').map((f) => f.to), [['\u{1F680}'.repeat(64)]])
})

test('an unsendable send left by an older version is refused on connect; the others still go out', async (t) => {
  const store = new MemoryStore()
  await store.saveOutgoing({ id: 'legacy-1', to: ['c'.repeat(70)], body: new Uint8Array([1]) }) // allowed before the 64 limit
  await store.saveOutgoing({ id: 'ok-1', to: ['alice'], body: new Uint8Array([2]) })
  const { client, ws, named } = makeClient(t, { store })
  const socket = await connect(client, ws)
  assert.deepEqual(socket.sentOfType('send').map((f) => f.id), ['ok-1'])
  assert.match(named('error')[0].message, /not sent: message legacy-1/)
  assert.equal(client.state, 'open')
})

// ---------------------------------------------------------------- delivery status

function status (seq, id, state = 'delivered', recipient = 'alice', at = 5000) {
  return { type: 'status', seq, state, at, id, recipient }
}

test('sends ask for delivery statuses by default; the client option and each send can say no', async (t) => {
  const store = new MemoryStore()
  const { client, ws } = makeClient(t, { store })
  const socket = await connect(client, ws)
  client.sendMessage('alice', 'a', { id: 'n1' })
  client.sendMessage('alice', 'b', { id: 'n2', notify: false })
  await settle()
  const quiet = makeClient(t, { notify: false })
  const quietSocket = await connect(quiet.client, quiet.ws)
  quiet.client.sendMessage('alice', 'c', { id: 'n3' })
  quiet.client.sendMessage('alice', 'd', { id: 'n4', notify: true })
  await settle()
  assert.deepEqual([...socket.sentOfType('send'), ...quietSocket.sentOfType('send')].map((f) => [f.id, f.notify]), [
    ['n1', true], ['n2', undefined], ['n3', undefined], ['n4', true]
  ], 'notify: false is the key left out, as the protocol writes it')
  assert.deepEqual([store.outboxById.get('n1').notify, store.outboxById.get('n2').notify], [true, false])
})

test('a send resent after a reconnect keeps its notify', async (t) => {
  const store = new MemoryStore()
  const { client, ws } = makeClient(t, { store, minBackoffMs: 1 })
  client.sendMessage('alice', 'a', { id: 'r1' })
  client.sendMessage('alice', 'b', { id: 'r2', notify: false })
  const first = await connect(client, ws)
  first.drop()
  while (ws.sockets.length < 2) await new Promise((resolve) => setTimeout(resolve, 2))
  const second = ws.last()
  second.open()
  second.receive(WELCOME)
  assert.deepEqual(second.sentOfType('send').map((f) => [f.id, f.notify]), [['r1', true], ['r2', undefined]])
})

test('a status is saved first and STATUS_ACKed only once the save is done, then announced', async (t) => {
  const store = new MemoryStore()
  let finishSave
  const save = store.saveStatus.bind(store)
  store.saveStatus = (s) => new Promise((resolve) => { finishSave = () => resolve(save(s)) })
  const { client, ws, named } = makeClient(t, { store })
  const socket = await connect(client, ws)
  socket.receive(status(17, 'out-1'))
  await settle()
  assert.deepEqual(socket.sentOfType('status_ack'), [], 'no STATUS_ACK before the save finished')
  assert.deepEqual(named('status'), [])
  finishSave()
  await settle()
  assert.deepEqual(socket.sentOfType('status_ack'), [{ type: 'status_ack', seqs: [17] }])
  assert.deepEqual(store.statuses.get(17), { seq: 17, state: 'delivered', at: 5000, id: 'out-1', recipient: 'alice' })
  assert.deepEqual(named('status'), [{ seq: 17, state: 'delivered', at: 5000, id: 'out-1', recipient: 'alice' }])
})

test('a failed status save sends no STATUS_ACK, and the status sent again is saved and ACKed', async (t) => {
  const store = new MemoryStore()
  store.failSaves.add(21)
  const { client, ws, named } = makeClient(t, { store })
  const socket = await connect(client, ws)
  socket.receive(status(21, 'out-1', 'expired'))
  await settle()
  assert.deepEqual(socket.sentOfType('status_ack'), [])
  assert.match(named('error')[0].message, /could not save the status of out-1 \(seq 21\)/)
  assert.equal(named('error')[0].close, false)
  assert.equal(client.state, 'open')
  socket.receive(status(21, 'out-1', 'expired')) // after a PULL or a reconnect
  await settle()
  assert.deepEqual(socket.sentOfType('status_ack'), [{ type: 'status_ack', seqs: [21] }])
  assert.deepEqual(named('status').map((s) => [s.seq, s.state]), [[21, 'expired']])
})

test('a redelivered status is STATUS_ACKed again but announced once', async (t) => {
  const store = new MemoryStore()
  const { client, ws, named } = makeClient(t, { store })
  const socket = await connect(client, ws)
  socket.receive(status(30, 'out-1'))
  await settle()
  socket.receive(status(30, 'out-1'))
  await settle()
  assert.deepEqual(socket.sentOfType('status_ack').map((f) => f.seqs), [[30], [30]])
  assert.equal(named('status').length, 1)
})

test('without a store every status is announced and STATUS_ACKed, overflow records too', async (t) => {
  const { client, ws, named } = makeClient(t)
  const socket = await connect(client, ws)
  socket.receiveBytes(packed([status(40, 'out-1'), status(40, 'out-1'), { type: 'status', seq: 41, state: 'overflow', at: 6000, count: 12, first_seq: 41 }]))
  await settle()
  assert.deepEqual(named('status').map((s) => [s.seq, s.state, s.count]), [[40, 'delivered', undefined], [40, 'delivered', undefined], [41, 'overflow', 12]])
  assert.deepEqual(socket.sentOfType('status_ack').map((f) => f.seqs), [[40], [40], [41]])
  assert.equal(client.acknowledgeStatuses([1, 2]), true)
  await settle()
  assert.deepEqual(socket.sentOfType('status_ack').at(-1), { type: 'status_ack', seqs: [1, 2] })
})

test('a status arriving before its receipt is kept, and the receipt does not undo it (real IndexedDB store)', { timeout: 10_000 }, async (t) => {
  const store = await MessageStore.open('alice', { indexedDB: new IDBFactory() })
  t.after(() => store.close())
  const { client, ws, named } = makeClient(t, { store })
  const socket = await connect(client, ws, { ...WELCOME, mailbox: 'alice' })
  const sent = client.sendMessage(['bob', 'carol'], 'hi both', { id: 'early-1' })
  while (socket.sentOfType('send').length === 0) await new Promise((resolve) => setTimeout(resolve, 1))
  assert.deepEqual(deliveryStates((await store.outbox())[0]), { bob: 'sending', carol: 'sending' })
  // bob's device ACKed before this mailbox's receipt was written (e.g. bob is on another node).
  socket.receive(status(50, 'early-1', 'delivered', 'bob'))
  while (named('status').length < 1) await new Promise((resolve) => setTimeout(resolve, 1))
  assert.deepEqual(deliveryStates((await store.outbox())[0]), { bob: 'delivered', carol: 'sending' })
  socket.receive({ type: 'receipt', id: 'early-1', results: { bob: { status: 'delivered' }, carol: { status: 'queued' } } })
  await sent
  const [entry] = await store.outbox()
  assert.deepEqual(entry.results, { bob: { status: 'delivered' }, carol: { status: 'queued' } })
  assert.deepEqual(deliveryStates(entry), { bob: 'delivered', carol: 'queued' })
  socket.receive(status(51, 'early-1', 'expired', 'carol', 9000))
  socket.receive(status(50, 'early-1', 'delivered', 'bob')) // redelivered
  while (socket.sentOfType('status_ack').length < 3) await new Promise((resolve) => setTimeout(resolve, 1))
  assert.deepEqual(deliveryStates((await store.outbox())[0]), { bob: 'delivered', carol: 'expired' })
  assert.deepEqual(socket.sentOfType('status_ack').map((f) => f.seqs), [[50], [51], [50]])
  assert.deepEqual(named('status').map((s) => [s.seq, s.recipient, s.state]), [[50, 'bob', 'delivered'], [51, 'carol', 'expired']])
})

// ---------------------------------------------------------------- key directory (raw calls)

const keyRecord = (kid = 'k1') => ({ ik: new Uint8Array(32).fill(1), kid, ek: new Uint8Array(32).fill(2), sig: new Uint8Array(64).fill(3) })

test('putKey writes KEY_PUT and resolves with the result, a refusal with its code', async (t) => {
  const { client, ws } = makeClient(t)
  const socket = await connect(client, ws)
  const stored = client.putKey(keyRecord('k1'))
  const refused = client.putKey(keyRecord('k2'))
  await settle()
  assert.deepEqual(socket.sentOfType('key_put').map((f) => f.key.kid), ['k1', 'k2'])
  assert.deepEqual(socket.sentOfType('key_put')[0].key, keyRecord('k1'))
  socket.receive({ type: 'key_put_result', kid: 'k1' })
  socket.receive({ type: 'key_put_result', kid: 'k2', code: ERROR_CODES.INVALID_KEY })
  assert.deepEqual(await stored, { kid: 'k1' })
  assert.deepEqual(await refused, { kid: 'k2', code: 3009 })
  assert.equal(client.state, 'open')
})

test('getKeys writes KEY_GET, split by max_recipients, and resolves with the records found in order', async (t) => {
  const { client, ws } = makeClient(t)
  const socket = await connect(client, ws, { ...WELCOME, max_recipients: 2 })
  const got = client.getKeys(['carol', 'bob', 'carol', 'dave'])
  await settle()
  assert.deepEqual(socket.sentOfType('key_get').map((f) => f.mailboxes), [['carol', 'bob'], ['dave']])
  socket.receive({ type: 'key_get_result', keys: { bob: keyRecord('b') } })
  socket.receive({ type: 'key_get_result', keys: { dave: keyRecord('d') } })
  const keys = await got
  assert.deepEqual(keys, { bob: keyRecord('b'), dave: keyRecord('d') })
  assert.deepEqual(Object.keys(keys), ['bob', 'dave'])
  assert.deepEqual(await client.getKeys([]), {})
})

test('putKey and getKeys reject when not connected, for an operator, for bad input and on a lost connection', async (t) => {
  const { client, ws } = makeClient(t, { minBackoffMs: 1000 })
  await assert.rejects(client.putKey(keyRecord()), /not connected/)
  await assert.rejects(client.getKeys(['bob']), /not connected/)
  const socket = await connect(client, ws)
  await assert.rejects(client.putKey({ ...keyRecord(), ik: new Uint8Array(31) }), (err) => err instanceof LocalProtocolError && err.code === ERROR_CODES.INVALID_FIELD)
  await assert.rejects(client.getKeys(['ok', 'b'.repeat(65)]), (err) => err instanceof LocalProtocolError)
  await settle()
  assert.deepEqual(socket.sentOfType('key_put'), [])
  assert.deepEqual(socket.sentOfType('key_get'), [])
  const put = client.putKey(keyRecord())
  const get = client.getKeys(['bob'])
  socket.drop()
  await assert.rejects(put, /connection lost/)
  await assert.rejects(get, /connection lost/)
})

test('an operator session may not use the key directory', async (t) => {
  const { client, ws } = makeClient(t)
  await connect(client, ws, { ...WELCOME, mailbox: undefined })
  await assert.rejects(client.putKey(keyRecord()), (err) => err.code === ERROR_CODES.FORBIDDEN)
  await assert.rejects(client.getKeys(['bob']), (err) => err.code === ERROR_CODES.FORBIDDEN)
})

// ---------------------------------------------------------------- token refresh (protocol.md rule 22)

/** A refreshToken callback: each call takes the next of `plan` (a token, or an Error to throw); records the calls. */
function issuer (...plan) {
  const calls = []
  const fn = async () => {
    calls.push(Date.now())
    const next = plan.shift() ?? `token-${calls.length}`
    if (next instanceof Error) throw next
    return next
  }
  return { fn, calls }
}

test('refreshToken is asked three quarters into the session and its token goes out in a REFRESH', async (t) => {
  t.mock.timers.enable({ apis: ['setTimeout', 'setInterval', 'Date'] })
  const { fn, calls } = issuer('T2', 'T3')
  const { client, ws } = makeClient(t, { refreshToken: fn })
  const refreshed = []
  client.addEventListener('refreshed', (e) => refreshed.push(e.detail))
  const socket = await connect(client, ws, { ...WELCOME, expires_in_s: 100 })
  t.mock.timers.tick(74_999)
  await settle()
  assert.equal(calls.length, 0)
  t.mock.timers.tick(1)
  await settle()
  assert.deepEqual(calls, [75_000])
  assert.deepEqual(socket.sentOfType('refresh'), [{ type: 'refresh', token: 'T2' }])
  assert.equal(client.token, 'T2') // the next HELLO's too
  socket.receive({ type: 'refreshed', expires_in_s: 40 })
  assert.deepEqual(refreshed, [{ expires_in_s: 40 }])
  t.mock.timers.tick(30_000)
  await settle()
  assert.deepEqual(calls, [75_000, 105_000])
  assert.deepEqual(socket.sentOfType('refresh').map((f) => f.token), ['T2', 'T3'])
  assert.equal(client.state, 'open')
})

test('a refreshToken that fails is reported and asked again after a quarter of what is left', async (t) => {
  t.mock.timers.enable({ apis: ['setTimeout', 'setInterval', 'Date'] })
  const { fn, calls } = issuer(new Error('issuer down'), 'T2')
  const { client, ws, named } = makeClient(t, { refreshToken: fn })
  const socket = await connect(client, ws, { ...WELCOME, expires_in_s: 100 })
  t.mock.timers.tick(75_000)
  await settle()
  assert.deepEqual(named('error'), [{ code: 0, message: 'refreshToken failed: issuer down', close: false }])
  t.mock.timers.tick(6_250) // 25 s were left
  await settle()
  assert.deepEqual(calls, [75_000, 81_250])
  assert.deepEqual(socket.sentOfType('refresh'), [{ type: 'refresh', token: 'T2' }])
})

test('a refreshToken answer that is not a token is a failed call, and nothing goes out', async (t) => {
  t.mock.timers.enable({ apis: ['setTimeout', 'setInterval', 'Date'] })
  const { client, ws, named } = makeClient(t, { refreshToken: async () => '' })
  const socket = await connect(client, ws, { ...WELCOME, expires_in_s: 8 })
  t.mock.timers.tick(6_000)
  await settle()
  assert.match(named('error')[0].message, /not a token/)
  assert.deepEqual(socket.sentOfType('refresh'), [])
  assert.equal(client.token, TOKEN)
  assert.throws(() => makeClient(t, { refreshToken: 'not a function' }), TypeError)
})

test('a token that lives longer than setTimeout can wait is refreshed on time, not at once', async (t) => {
  t.mock.timers.enable({ apis: ['setTimeout', 'setInterval', 'Date'] })
  const { fn, calls } = issuer()
  const { client, ws } = makeClient(t, { refreshToken: fn })
  const days = 90 * 86400
  await connect(client, ws, { ...WELCOME, expires_in_s: days, keepalive_s: 86400 })
  t.mock.timers.tick(1000)
  await settle()
  assert.equal(calls.length, 0)
  for (let waited = 1000; waited < 0.75 * days * 1000; waited += 86_400_000) t.mock.timers.tick(86_400_000)
  await settle()
  assert.equal(calls.length, 1)
})

test('after 2002 TOKEN_EXPIRED a client with refreshToken reconnects with a new token', async (t) => {
  const { fn, calls } = issuer('T2')
  const { client, ws } = makeClient(t, { refreshToken: fn, minBackoffMs: 1, maxBackoffMs: 1 })
  const first = await connect(client, ws)
  first.receive({ type: 'error', code: ERROR_CODES.TOKEN_EXPIRED, message: 'expired', close: true })
  first.drop()
  while (ws.sockets.length < 2) await new Promise((resolve) => setTimeout(resolve, 2))
  assert.equal(calls.length, 1)
  const second = ws.last()
  second.open()
  assert.deepEqual(second.sent[0], { type: 'hello', version: 1, token: 'T2', agent: 'relay-js' })
  second.receive(WELCOME)
  assert.equal(client.state, 'open')
})

test('without refreshToken 2002 stops the client; 2004 TOKEN_MISMATCH stops it either way', async (t) => {
  for (const [options, code] of [[{}, ERROR_CODES.TOKEN_EXPIRED], [{ refreshToken: issuer().fn }, ERROR_CODES.TOKEN_MISMATCH]]) {
    const { client, ws } = makeClient(t, { ...options, minBackoffMs: 1, maxBackoffMs: 1 })
    const socket = await connect(client, ws)
    socket.receive({ type: 'error', code, message: 'no', close: true })
    socket.drop()
    await new Promise((resolve) => setTimeout(resolve, 20))
    assert.equal(ws.sockets.length, 1)
    assert.equal(client.state, 'closed')
  }
})
