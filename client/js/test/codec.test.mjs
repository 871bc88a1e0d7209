// The JS codec against the golden vectors in tests/vectors/ (shared with the Python suite).
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { readFileSync } from 'node:fs'
import { fileURLToPath } from 'node:url'

import { encode as cborEncode } from 'cborg'

import {
  DEFAULT_MAX_FRAME_BYTES,
  ERROR_CODES,
  FRAME_TYPES,
  FrameDecoder,
  LocalProtocolError,
  MAX_RECIPIENT_CHARS,
  ProtocolError,
  REPORT_STATES,
  decodeBody,
  decodeMessage,
  encodeBody,
  encodeFrame,
  isValidMailboxId,
  isKeyRecord,
  isValidMessageId,
  packFrames
} from '../codec.js'

const vectorsDir = new URL('../../../tests/vectors/', import.meta.url)
const load = (name) => JSON.parse(readFileSync(fileURLToPath(new URL(name, vectorsDir)), 'utf8'))
const VALID = load('valid.json')
const INVALID = load('invalid.json')

const fromHex = (hex) => new Uint8Array(Buffer.from(hex, 'hex'))
const toHex = (bytes) => Buffer.from(bytes).toString('hex')

/** The vector JSON form as the codec's frame objects: {"$bytes": hex} -> Uint8Array. */
function fromJson (value) {
  if (Array.isArray(value)) return value.map(fromJson)
  if (value !== null && typeof value === 'object') {
    const keys = Object.keys(value)
    if (keys.length === 1 && keys[0] === '$bytes') return fromHex(value.$bytes)
    return Object.fromEntries(keys.map((k) => [k, fromJson(value[k])]))
  }
  return value
}

function expectCode (fn, code) {
  assert.throws(fn, (err) => {
    assert.ok(err instanceof ProtocolError, `not a ProtocolError: ${err}`)
    assert.equal(err.code, code, `${err.codeName}: ${err.message}`)
    return true
  })
}

test('vectors are present', () => {
  assert.ok(VALID.length >= FRAME_TYPES.length)
  assert.ok(INVALID.length > 20)
  assert.deepEqual(new Set(VALID.map((v) => v.frame.type)), new Set(FRAME_TYPES))
})

for (const v of VALID) {
  test(`valid ${v.name} decodes to its frame`, () => {
    const data = fromHex(v.hex)
    const frames = new FrameDecoder().feed(data)
    assert.equal(frames.length, 1)
    assert.deepStrictEqual(frames[0], fromJson(v.frame))
    assert.deepStrictEqual(decodeBody(data.subarray(4)), frames[0])
    assert.deepStrictEqual(decodeMessage(data), frames, 'one frame alone is a WebSocket message too')
  })
  test(`valid ${v.name} ${v.canonical ? 're-encodes to the same bytes' : 're-encodes canonically'}`, () => {
    const frame = decodeBody(fromHex(v.hex).subarray(4))
    const again = encodeFrame(frame)
    assert.equal(toHex(again) === v.hex, v.canonical)
    assert.deepStrictEqual(decodeBody(again.subarray(4)), frame)
    assert.equal(toHex(encodeBody(frame)), toHex(again.subarray(4)))
  })
}

for (const v of INVALID) {
  test(`invalid ${v.name} is refused with ${v.error}`, () => {
    expectCode(() => new FrameDecoder().feed(fromHex(v.hex)), v.error)
  })
  test(`invalid ${v.name} is refused when fed byte by byte`, () => {
    const data = fromHex(v.hex)
    const decoder = new FrameDecoder()
    expectCode(() => {
      for (let i = 0; i < data.length; i++) assert.deepEqual(decoder.feed(data.subarray(i, i + 1)), [])
    }, v.error)
  })
}

// A tiny deterministic PRNG so failures reproduce.
function rng (seed) {
  let s = seed >>> 0
  return () => {
    s = (s * 1664525 + 1013904223) >>> 0
    return s / 2 ** 32
  }
}

test('a concatenated stream re-chunked arbitrarily gives the same frames', () => {
  const stream = Buffer.concat(VALID.map((v) => Buffer.from(v.hex, 'hex')))
  const expected = VALID.map((v) => fromJson(v.frame))
  const random = rng(7)
  for (let round = 0; round < 40; round++) {
    const decoder = new FrameDecoder()
    const got = []
    let pos = 0
    const maxChunk = [1, 3, 17, 500, 100000][round % 5]
    while (pos < stream.length) {
      const n = 1 + Math.floor(random() * maxChunk)
      got.push(...decoder.feed(new Uint8Array(stream.subarray(pos, pos + n))))
      pos += n
    }
    assert.equal(decoder.bufferedBytes, 0)
    assert.deepStrictEqual(got, expected)
  }
})

test('a partial frame stays buffered until it is complete', () => {
  const data = encodeFrame({ type: 'drained', pending: 1 })
  const decoder = new FrameDecoder()
  assert.deepEqual(decoder.feed(data.subarray(0, data.length - 1)), [])
  assert.equal(decoder.bufferedBytes, data.length - 1)
  assert.deepStrictEqual(decoder.feed(data.subarray(data.length - 1)), [{ type: 'drained', pending: 1 }])
  assert.equal(decoder.bufferedBytes, 0)
})

test('a huge declared length is refused from the 4 prefix bytes alone', () => {
  const decoder = new FrameDecoder()
  assert.deepEqual(decoder.feed(fromHex('001000')), [])
  expectCode(() => decoder.feed(fromHex('01')), ERROR_CODES.FRAME_TOO_LARGE)
  assert.ok(decoder.bufferedBytes <= 4)
  expectCode(() => decoder.feed(encodeFrame({ type: 'ping' })), ERROR_CODES.FRAME_TOO_LARGE)
})

test('the frame limit is inclusive and configurable', () => {
  const data = encodeFrame({ type: 'send', id: 'm1', to: ['bob'], body: new Uint8Array(100) })
  assert.equal(new FrameDecoder({ maxFrameBytes: data.length - 4 }).feed(data).length, 1)
  expectCode(() => new FrameDecoder({ maxFrameBytes: data.length - 5 }).feed(data), ERROR_CODES.FRAME_TOO_LARGE)
  expectCode(() => decodeBody(data.subarray(4), { maxFrameBytes: data.length - 5 }), ERROR_CODES.FRAME_TOO_LARGE)
  assert.equal(DEFAULT_MAX_FRAME_BYTES, 1048576)
})

test('random bytes only ever raise ProtocolError', () => {
  const random = rng(42)
  const seeds = VALID.filter((v) => v.hex.length < 2000).map((v) => fromHex(v.hex).subarray(4))
  for (let i = 0; i < 3000; i++) {
    let body
    if (i % 2) {
      body = new Uint8Array(Math.floor(random() * 40)).map(() => Math.floor(random() * 256))
    } else {
      body = new Uint8Array(seeds[i % seeds.length])
      body[Math.floor(random() * body.length)] = Math.floor(random() * 256)
    }
    const data = new Uint8Array(4 + body.length)
    new DataView(data.buffer).setUint32(0, body.length)
    data.set(body, 4)
    try {
      for (const frame of new FrameDecoder().feed(data)) assert.ok(FRAME_TYPES.includes(frame.type))
    } catch (err) {
      assert.ok(err instanceof ProtocolError, `${toHex(data)}: ${err.stack}`)
    }
  }
})

test('integers above 2^53-1 in known fields are refused, in unknown fields ignored', () => {
  // {"type": "drained", "pending": 2^53}
  expectCode(() => decodeBody(fromHex('a2647479706567647261696e65646770656e64696e671b0020000000000000')), ERROR_CODES.INVALID_FIELD)
  // {"type": "ping", "x": 2^64-1}
  assert.deepStrictEqual(decodeBody(fromHex('a2647479706564706' + '96e67617' + '81bffffffffffffffff')), { type: 'ping' })
})

test('encodeFrame refuses invalid frames with LocalProtocolError', () => {
  const bad = [
    [{ type: 'nope' }, ERROR_CODES.UNKNOWN_FRAME_TYPE],
    [{ type: 'send', id: 'm 1', to: ['bob'], body: new Uint8Array() }, ERROR_CODES.INVALID_FIELD],
    [{ type: 'send', id: 'm1', to: [], body: new Uint8Array() }, ERROR_CODES.INVALID_FIELD],
    [{ type: 'send', id: 'm1', to: ['bob'], body: 'text' }, ERROR_CODES.INVALID_FIELD],
    [{ type: 'send', id: 'm1', to: ['bob'], body: new Uint8Array(), ttl: 5 }, ERROR_CODES.INVALID_FIELD],
    [{ type: 'drained', pending: 1.5 }, ERROR_CODES.INVALID_FIELD],
    [{ type: 'drained', pending: -1 }, ERROR_CODES.INVALID_FIELD],
    [{ type: 'drained', pending: 2 ** 53 }, ERROR_CODES.INVALID_FIELD],
    [{ type: 'drained' }, ERROR_CODES.INVALID_FIELD],
    [{ type: 'error', code: 1001, message: 'x', close: 1 }, ERROR_CODES.INVALID_FIELD],
    [{ type: 'receipt', id: 'm1', results: { bob: { status: 'refused' } } }, ERROR_CODES.INVALID_FIELD],
    [{ type: 'receipt', id: 'm1', results: {} }, ERROR_CODES.INVALID_FIELD],
    [{ type: 'hello', version: 1, token: 'x', agent: '\u{1F680}'.repeat(257) }, ERROR_CODES.INVALID_FIELD]
  ]
  for (const [frame, code] of bad) {
    assert.throws(() => encodeFrame(frame), (err) => err instanceof LocalProtocolError && err.code === code, JSON.stringify(frame))
  }
})

test('encodeFrame writes the canonical form whatever the key order', () => {
  const frame = { ttl_s: 60, body: new Uint8Array([1, 2]), to: ['bob', 'carol'], id: 'm1', type: 'send' }
  const data = encodeFrame(frame)
  assert.deepStrictEqual(decodeBody(data.subarray(4)), { type: 'send', id: 'm1', to: ['bob', 'carol'], body: new Uint8Array([1, 2]), ttl_s: 60 })
  assert.equal(toHex(data.subarray(4, 11)), 'a5647479706564') // map(5), "type" first
  const results = encodeFrame({ type: 'receipt', id: 'm1', results: { bob: { status: 'refused', code: 3001 }, ['__proto__']: { status: 'queued' } } })
  assert.deepStrictEqual(Object.keys(decodeBody(results.subarray(4)).results), ['bob', '__proto__'])
})

test('a Node Buffer body and Buffer input work like Uint8Array', () => {
  const data = encodeFrame({ type: 'deliver', id: 'm1', from: 'alice', sent_at: 1, expires_at: 2, attempt: 1, body: Buffer.from('hi') })
  const frame = new FrameDecoder().feed(Buffer.from(data))[0]
  assert.equal(frame.body.constructor, Uint8Array)
  assert.equal(Buffer.from(frame.body).toString(), 'hi')
})

test('after an error the decoder stays failed', () => {
  const decoder = new FrameDecoder()
  expectCode(() => decoder.feed(fromHex('00000001ff')), ERROR_CODES.MALFORMED_FRAME)
  expectCode(() => decoder.feed(encodeFrame({ type: 'ping' })), ERROR_CODES.MALFORMED_FRAME)
})

test('id syntax', () => {
  assert.ok(isValidMailboxId('alice@example.org'))
  assert.ok(!isValidMailboxId('.alice'))
  assert.ok(!isValidMailboxId('a'.repeat(65)))
  assert.ok(!isValidMailboxId('alice\n'))
  assert.ok(isValidMessageId('~'.repeat(64)))
  assert.ok(!isValidMessageId('m 1'))
  assert.ok(!isValidMessageId('m1\n'))
})

test('isKeyRecord applies the decoder\'s key-record rules to an object', () => {
  const record = { ik: new Uint8Array(32), kid: 'k1', ek: new Uint8Array(32), sig: new Uint8Array(64) }
  const decoded = decodeBody(encodeBody({ type: 'key_put', key: record }))
  assert.ok(isKeyRecord(record) && isKeyRecord(decoded.key))
  for (const bad of [
    { ...record, ik: new Uint8Array(31) }, { ...record, ek: new Uint8Array(33) }, { ...record, sig: new Uint8Array(63) },
    { ...record, kid: '' }, { ...record, kid: 'a b' }, { ...record, kid: 7 }, { ...record, ik: [...record.ik] },
    { ik: record.ik, kid: 'k1', ek: record.ek }, null, 'record', 7
  ]) {
    assert.ok(!isKeyRecord(bad), JSON.stringify(bad))
  }
})

test('ERROR_CODES names and numbers are those of protocol.md', () => {
  const doc = readFileSync(fileURLToPath(new URL('../../../protocol.md', import.meta.url)), 'utf8')
  const rows = [...doc.matchAll(/^\|\s*(\d{4})\s*\|\s*([A-Z][A-Z0-9_]*)\s*\|/gm)].map((m) => [m[2], Number(m[1])])
  assert.deepStrictEqual(Object.fromEntries(rows), { ...ERROR_CODES })
})

/** A frame body straight from a JS Map (keys in insertion order), bypassing the codec's checks. */
const rawBody = (entries) => cborEncode(new Map(entries), { mapSorter: null })
const receiptMap = (...rest) => rawBody([['type', 'receipt'], ['id', 'm1'], ...rest])
const results = (...entries) => new Map(entries.map(([k, v]) => [k, new Map(Object.entries(v))]))

test('a RECEIPT with only code (a whole-SEND refusal) decodes without results and encodes type, id, code', () => {
  const body = receiptMap(['code', 3004])
  assert.deepStrictEqual(decodeBody(body), { type: 'receipt', id: 'm1', code: 3004 })
  assert.equal(toHex(encodeBody({ type: 'receipt', id: 'm1', code: 3004 })), toHex(body))
  assert.equal(toHex(encodeBody({ code: 3007, id: 'm1', type: 'receipt' })), toHex(receiptMap(['code', 3007])), 'canonical order')
  assert.equal(toHex(body).slice(0, 2), 'a3', 'three keys: no results')
})

test('a RECEIPT with both results and code, or with neither, is INVALID_FIELD both ways', () => {
  const ok = results(['bob', { status: 'queued' }])
  expectCode(() => decodeBody(receiptMap(['results', ok], ['code', 3004])), ERROR_CODES.INVALID_FIELD)
  expectCode(() => decodeBody(receiptMap(['code', 3004], ['results', ok])), ERROR_CODES.INVALID_FIELD)
  expectCode(() => decodeBody(receiptMap()), ERROR_CODES.INVALID_FIELD)
  expectCode(() => decodeBody(receiptMap(['results', new Map()], ['code', 3004])), ERROR_CODES.INVALID_FIELD)
  expectCode(() => decodeBody(receiptMap(['results', ok], ['code', null])), ERROR_CODES.INVALID_FIELD)
  const local = (frame) => assert.throws(() => encodeFrame(frame), (err) => err instanceof LocalProtocolError && err.code === ERROR_CODES.INVALID_FIELD, JSON.stringify(frame))
  local({ type: 'receipt', id: 'm1', results: { bob: { status: 'queued' } }, code: 3004 })
  local({ type: 'receipt', id: 'm1', results: {}, code: 3004 })
  local({ type: 'receipt', id: 'm1' })
})

test('a RECEIPT code is a uint of at least 1000', () => {
  expectCode(() => decodeBody(receiptMap(['code', 999])), ERROR_CODES.INVALID_FIELD)
  expectCode(() => decodeBody(receiptMap(['code', -3004])), ERROR_CODES.INVALID_FIELD)
  expectCode(() => decodeBody(receiptMap(['code', '3004'])), ERROR_CODES.INVALID_FIELD)
  assert.deepStrictEqual(decodeBody(receiptMap(['code', 1000])), { type: 'receipt', id: 'm1', code: 1000 })
  assert.deepStrictEqual(decodeBody(receiptMap(['code', 9999])), { type: 'receipt', id: 'm1', code: 9999 }, 'unknown codes are accepted')
})

test('SEND to elements and RECEIPT result keys are at most 64 code points, counted as code points', () => {
  assert.equal(MAX_RECIPIENT_CHARS, 64)
  const rocket = '\u{1F680}' // one code point, two UTF-16 units, four UTF-8 bytes
  const fits = [
    'b'.repeat(64),
    rocket.repeat(64), // 128 UTF-16 units
    rocket.repeat(33), // 66 UTF-16 units: refused by anything counting units
    'é'.repeat(64)
  ]
  const tooLong = ['b'.repeat(65), rocket.repeat(65), rocket.repeat(64) + 'b']
  const send = (to) => rawBody([['type', 'send'], ['id', 'm1'], ['to', to], ['body', new Uint8Array(0)]])
  for (const name of fits) {
    assert.deepStrictEqual(decodeBody(send([name])).to, [name])
    assert.deepStrictEqual(decodeBody(encodeBody({ type: 'send', id: 'm1', to: ['bob', name], body: new Uint8Array(0) })).to, ['bob', name])
    assert.deepStrictEqual(Object.keys(decodeBody(receiptMap(['results', results([name, { status: 'refused', code: 3006 }])])).results), [name])
    assert.deepStrictEqual(Object.keys(decodeBody(encodeBody({ type: 'receipt', id: 'm1', results: { [name]: { status: 'queued' } } })).results), [name])
  }
  for (const name of tooLong) {
    expectCode(() => decodeBody(send(['bob', name])), ERROR_CODES.INVALID_FIELD)
    expectCode(() => decodeBody(receiptMap(['results', results(['bob', { status: 'queued' }], [name, { status: 'refused', code: 3006 }])])), ERROR_CODES.INVALID_FIELD)
    assert.throws(() => encodeFrame({ type: 'send', id: 'm1', to: [name], body: new Uint8Array(0) }), LocalProtocolError)
    assert.throws(() => encodeFrame({ type: 'receipt', id: 'm1', results: { [name]: { status: 'queued' } } }), LocalProtocolError)
  }
  // A short name that is no mailbox id is still any text on the wire (the broker refuses it per recipient).
  assert.deepStrictEqual(decodeBody(send(['not a mailbox!'])).to, ['not a mailbox!'])
})

// ------------------------------------------------------------------ SEND notify, STATUS, STATUS_ACK (protocol.md 6, 9 rule 19)

const sendMap = (...rest) => rawBody([['type', 'send'], ['id', 'm1'], ['to', ['bob']], ['body', new Uint8Array([104, 105])], ...rest])
const statusMap = (...rest) => rawBody([['type', 'status'], ...rest])
const delivered = { type: 'status', seq: 7, state: 'delivered', at: 3, id: 'm1', recipient: 'bob' }
const overflow = { type: 'status', seq: 9, state: 'overflow', at: 4, count: 12, first_seq: 8 }
const localInvalid = (frame) => assert.throws(
  () => encodeFrame(frame),
  (err) => err instanceof LocalProtocolError && err.code === ERROR_CODES.INVALID_FIELD,
  JSON.stringify(frame)
)

test('a SEND without notify, or with notify false, has the bytes of a SEND from before notify', () => {
  const plain = { type: 'send', id: 'm1', to: ['bob'], body: new Uint8Array([104, 105]) }
  assert.equal(toHex(encodeBody(plain)), toHex(sendMap()))
  assert.equal(toHex(encodeBody({ ...plain, notify: false })), toHex(sendMap()))
  assert.deepStrictEqual(decodeBody(sendMap(['notify', false])), plain, 'false is left out of the frame')
  assert.deepStrictEqual(decodeBody(sendMap()), plain)
  assert.equal(toHex(encodeBody({ ...plain, notify: true })), toHex(sendMap(['notify', true])))
  assert.deepStrictEqual(decodeBody(sendMap(['notify', true])), { ...plain, notify: true })
})

test('SEND notify is a boolean: null, 1, "true" are INVALID_FIELD both ways', () => {
  for (const value of [null, 0, 1, 'true', [true]]) {
    expectCode(() => decodeBody(sendMap(['notify', value])), ERROR_CODES.INVALID_FIELD)
    localInvalid({ type: 'send', id: 'm1', to: ['bob'], body: new Uint8Array(), notify: value })
  }
})

test('STATUS delivered and expired carry id and recipient, overflow carries count and first_seq', () => {
  assert.deepStrictEqual(REPORT_STATES, ['delivered', 'expired', 'overflow'])
  for (const frame of [delivered, { ...delivered, state: 'expired' }, overflow]) {
    const body = encodeBody(frame)
    assert.deepStrictEqual(decodeBody(body), frame)
    assert.deepStrictEqual(Object.keys(decodeBody(body)), Object.keys(frame), 'canonical key order')
  }
  assert.equal(
    toHex(encodeBody(overflow)),
    toHex(statusMap(['seq', 9], ['state', 'overflow'], ['at', 4], ['count', 12], ['first_seq', 8]))
  )
})

test('a STATUS whose fields do not fit its state is INVALID_FIELD both ways', () => {
  const bad = [
    { ...delivered, state: 'read' },
    { ...delivered, state: 'queued' }, // a RECEIPT result, not a STATUS state
    { ...delivered, state: 'DELIVERED' },
    { ...delivered, seq: 0 },
    { ...delivered, at: -1 },
    { ...delivered, seq: 2 ** 53 },
    { ...delivered, id: undefined },
    { ...delivered, recipient: undefined },
    { ...delivered, recipient: '.bob' },
    { ...delivered, id: 'm 1' },
    { ...delivered, count: 1 },
    { ...delivered, state: 'expired', first_seq: 1 },
    { ...overflow, count: undefined },
    { ...overflow, first_seq: undefined },
    { ...overflow, count: 0 },
    { ...overflow, first_seq: 10 },
    { ...overflow, id: 'm1' },
    { ...overflow, recipient: 'bob' }
  ]
  for (const frame of bad) {
    const entries = Object.entries(frame).filter(([k, v]) => k !== 'type' && v !== undefined)
    expectCode(() => decodeBody(statusMap(...entries)), ERROR_CODES.INVALID_FIELD)
    localInvalid(frame)
  }
  expectCode(() => decodeBody(statusMap(['seq', 7], ['state', 'delivered'], ['at', 3], ['id', 'm1'], ['recipient', null])), ERROR_CODES.INVALID_FIELD)
})

test('STATUS_ACK names at least one seq, each an integer of at least 1', () => {
  assert.deepStrictEqual(decodeBody(encodeBody({ type: 'status_ack', seqs: [3, 1, 3] })), { type: 'status_ack', seqs: [3, 1, 3] })
  assert.deepStrictEqual(decodeBody(encodeBody({ type: 'status_ack', seqs: [2 ** 53 - 1] })).seqs, [2 ** 53 - 1])
  for (const seqs of [[], [0], [1, 0], ['1'], [true], [1.5], [2 ** 53], 5]) {
    expectCode(() => decodeBody(rawBody([['type', 'status_ack'], ['seqs', seqs]])), ERROR_CODES.INVALID_FIELD)
    localInvalid({ type: 'status_ack', seqs })
  }
  localInvalid({ type: 'status_ack' })
})

// ------------------------------------------------------------------ WebSocket messages (protocol.md 2.5)

const VALID_BYTES = VALID.map((v) => fromHex(v.hex))
const VALID_FRAMES = VALID.map((v) => fromJson(v.frame))
const concat = (...parts) => new Uint8Array(Buffer.concat(parts))

test('a WebSocket message of several whole frames decodes to all of them, in order', () => {
  assert.deepStrictEqual(decodeMessage(concat(...VALID_BYTES)), VALID_FRAMES)
  const random = rng(3)
  for (let round = 0; round < 200; round++) {
    const picks = Array.from({ length: 1 + Math.floor(random() * 6) }, () => Math.floor(random() * VALID.length))
    assert.deepStrictEqual(decodeMessage(concat(...picks.map((i) => VALID_BYTES[i]))), picks.map((i) => VALID_FRAMES[i]))
  }
})

test('a message that ends inside a frame (or holds fewer than 4 bytes) is MALFORMED_FRAME, whole frames before it or not', () => {
  expectCode(() => decodeMessage(new Uint8Array(0)), ERROR_CODES.MALFORMED_FRAME)
  const whole = concat(VALID_BYTES[0], VALID_BYTES[1])
  const last = encodeFrame({ type: 'send', id: 'm1', to: ['bob'], body: new Uint8Array(40) })
  for (const head of [new Uint8Array(0), whole]) {
    for (let cut = 1; cut < last.length; cut++) {
      expectCode(() => decodeMessage(concat(head, last.subarray(0, cut))), ERROR_CODES.MALFORMED_FRAME)
    }
    assert.equal(decodeMessage(concat(head, last)).length, head === whole ? 3 : 1)
  }
})

test('every invalid vector is refused with its code inside a message too, after a valid frame', () => {
  for (const v of INVALID) {
    expectCode(() => decodeMessage(fromHex(v.hex)), v.error)
    expectCode(() => decodeMessage(concat(VALID_BYTES[0], fromHex(v.hex))), v.error)
  }
})

test('a message applies the frame limit from each prefix, like the stream decoder', () => {
  const data = encodeFrame({ type: 'send', id: 'm1', to: ['bob'], body: new Uint8Array(100) })
  const limit = data.length - 4
  assert.equal(decodeMessage(concat(data, data), { maxFrameBytes: limit }).length, 2)
  expectCode(() => decodeMessage(concat(data, data), { maxFrameBytes: limit - 1 }), ERROR_CODES.FRAME_TOO_LARGE)
  // A prefix above the limit is FRAME_TOO_LARGE from the prefix alone, even where the message ends.
  expectCode(() => decodeMessage(concat(VALID_BYTES[0], data.subarray(0, 4)), { maxFrameBytes: limit - 1 }), ERROR_CODES.FRAME_TOO_LARGE)
  expectCode(() => decodeMessage(fromHex('00100001')), ERROR_CODES.FRAME_TOO_LARGE) // default 1 MiB
  assert.equal(decodeMessage(data, { maxFrameBytes: Infinity }).length, 1)
})

test('packFrames keeps the order, never splits a frame, and fills each message up to the limit', () => {
  const random = rng(11)
  for (let round = 0; round < 300; round++) {
    const frames = Array.from({ length: Math.floor(random() * 12) }, () => VALID_BYTES[Math.floor(random() * VALID.length)])
    const limit = [0, 10, 64, 200, 1000, 100000][round % 6]
    const messages = packFrames(frames, limit)
    assert.deepStrictEqual(Buffer.concat(messages), Buffer.concat(frames), 'the same bytes in the same order')
    const perMessage = messages.map((m) => decodeMessage(m).length) // each message ends at a frame boundary
    assert.equal(perMessage.reduce((a, b) => a + b, 0), frames.length)
    let next = 0
    for (const [i, message] of messages.entries()) {
      if (perMessage[i] > 1) assert.ok(message.length <= limit, `message of ${message.length} bytes over ${limit}`)
      else assert.equal(message, frames[next], 'a lone frame is sent as it is, not copied')
      next += perMessage[i]
      if (i + 1 < messages.length) {
        assert.ok(message.length + frames[next].length > limit, 'the next frame would not have fitted')
      }
    }
  }
  assert.deepStrictEqual(packFrames([], 100), [])
  const big = encodeFrame({ type: 'deliver', id: 'm1', from: 'alice', sent_at: 1, expires_at: 2, attempt: 1, body: new Uint8Array(500) })
  const small = encodeFrame({ type: 'ping' })
  assert.deepStrictEqual(packFrames([small, big, small, small], 100).map((m) => m.length), [small.length, big.length, 2 * small.length])
  assert.deepStrictEqual(packFrames([small, small], 2 * small.length).map((m) => m.length), [2 * small.length], 'the limit is inclusive')
})

// ------------------------------------------------------------------ key directory frames

const record = () => ({ ik: new Uint8Array(32).fill(1), kid: '0123456789abcdef', ek: new Uint8Array(32).fill(2), sig: new Uint8Array(64).fill(3) })

test('KEY_PUT and KEY_GET_RESULT carry key records as {ik, kid, ek, sig}, in that order', () => {
  const put = { type: 'key_put', key: record() }
  assert.deepStrictEqual(decodeBody(encodeBody(put)), put)
  assert.deepStrictEqual(Object.keys(decodeBody(encodeBody(put)).key), ['ik', 'kid', 'ek', 'sig'])
  const reordered = { type: 'key_put', key: { sig: record().sig, kid: record().kid, ek: record().ek, ik: record().ik } }
  assert.equal(toHex(encodeBody(reordered)), toHex(encodeBody(put)), 'the encoder writes the canonical order')
  const result = { type: 'key_get_result', keys: { carol: record(), bob: { ...record(), kid: 'k2' } } }
  const decoded = decodeBody(encodeBody(result))
  assert.deepStrictEqual(decoded, result)
  assert.deepStrictEqual(Object.keys(decoded.keys), ['carol', 'bob'], 'entries keep their order')
  assert.deepStrictEqual(decodeBody(encodeBody({ type: 'key_get_result', keys: {} })), { type: 'key_get_result', keys: {} })
})

test('a key record of the wrong shape cannot be encoded', () => {
  const bad = [
    { ik: new Uint8Array(31) },
    { ik: new Uint8Array(33) },
    { ek: new Uint8Array(0) },
    { sig: new Uint8Array(63) },
    { sig: Array.from(new Uint8Array(64)) },
    { kid: '' },
    { kid: 'k k' },
    { kid: 'k'.repeat(65) },
    { kid: 7 },
    { ik: undefined },
    { sig: null }
  ]
  for (const change of bad) {
    localInvalid({ type: 'key_put', key: { ...record(), ...change } })
    localInvalid({ type: 'key_get_result', keys: { bob: { ...record(), ...change } } })
  }
  localInvalid({ type: 'key_put', key: 'not a record' })
  localInvalid({ type: 'key_get_result', keys: { '-bob': record() } })
})

test('KEY_GET takes 1 or more texts of at most 64 code points, repeats included', () => {
  const get = { type: 'key_get', mailboxes: ['bob', 'bob', '', 'not a mailbox', '\u{1F680}'.repeat(64)] }
  assert.deepStrictEqual(decodeBody(encodeBody(get)), get)
  for (const mailboxes of [[], ['b'.repeat(65)], ['bob', 7], 'bob']) localInvalid({ type: 'key_get', mailboxes })
})

test('KEY_PUT_RESULT names the kid and, when refused, a code', () => {
  for (const frame of [{ type: 'key_put_result', kid: 'k1' }, { type: 'key_put_result', kid: 'k1', code: ERROR_CODES.INVALID_KEY }]) {
    assert.deepStrictEqual(decodeBody(encodeBody(frame)), frame)
  }
  assert.equal(ERROR_CODES.INVALID_KEY, 3009)
  localInvalid({ type: 'key_put_result', kid: 'k1', code: 999 })
  localInvalid({ type: 'key_put_result', kid: 'k 1' })
})
