// Relay wire codec for browsers and Node: frames <-> bytes, no I/O.
//
// Theory of operation: a frame on a byte stream is a 4-byte big-endian length N and N
// bytes holding one CBOR map whose "type" key names the frame (protocol.md, sections 2
// and 6). FrameDecoder takes stream bytes in chunks of any size and returns whole frames,
// refusing a declared length above its limit as soon as the prefix is in. A WebSocket binary
// message carries one or more whole frames back to back, each with its prefix (protocol.md
// 2.5): decodeMessage runs the same frame loop over one message and refuses a message that
// does not end exactly at a frame boundary; packFrames groups encoded frames, in order and
// never split, into messages up to a size. decodeBody / encodeBody handle one body without
// the prefix.
//
// CBOR is read with cborg's tokenizer, but the data items are assembled here so that the
// checks match the Python decoder (wire/codec.py) exactly: no tags, no indefinite
// lengths, no duplicate keys (compared as decoded values), at most MAX_DEPTH enclosing
// containers, strict UTF-8, and floats kept apart from integers. The golden vectors in
// tests/vectors/ bind both implementations.
//
// Frames are plain objects: { type: "send", id: "m1", to: ["bob"], body: Uint8Array }.
// A RECEIPT carries exactly one of `results` (one result per recipient) and `code` (the whole
// SEND refused): { type: "receipt", id: "m1", code: 3004 } has no `results` key at all.
// A SEND's `notify` is there only when true (false and absent are the same SEND and the same
// bytes). A STATUS (protocol.md 9, rule 19) is { type: "status", seq, state, at, id, recipient }
// for "delivered" and "expired", and { type: "status", seq, state: "overflow", at, count,
// first_seq } for "overflow"; its "delivered" (the recipient's device ACKed the message) is not
// the RECEIPT result "delivered" (stored, the recipient online).
// Integers are JS numbers; a known field holding an integer above 2^53-1 is refused with
// INVALID_FIELD (the protocol allows up to 2^63-1; see protocol.md 2.3).

import { Token, Tokenizer, Type, encode } from 'cborg'

export const PROTOCOL_VERSION = 1
export const DEFAULT_MAX_FRAME_BYTES = 1048576
/** Any data item may sit inside at most this many arrays/maps (the top-level map counts). */
export const MAX_DEPTH = 4
/** Longest free-text field (tokens, error messages), in code points. */
export const MAX_TEXT = 4096
/**
 * Longest element of SEND `to`, and so of a RECEIPT `results` key, in code points (as long as
 * the longest mailbox id). It bounds what a RECEIPT echoes per recipient.
 */
export const MAX_RECIPIENT_CHARS = 64

export const ERROR_CODES = Object.freeze({
  MALFORMED_FRAME: 1001,
  FRAME_TOO_LARGE: 1002,
  UNEXPECTED_FRAME: 1003,
  INVALID_FIELD: 1004,
  UNKNOWN_FRAME_TYPE: 1005,
  UNSUPPORTED_VERSION: 1006,
  HANDSHAKE_TIMEOUT: 1007,
  INVALID_TOKEN: 2001,
  TOKEN_EXPIRED: 2002,
  FORBIDDEN: 2003,
  TOKEN_MISMATCH: 2004,
  MAILBOX_FULL: 3001,
  MAILBOX_BYTES_FULL: 3002,
  BROKER_FULL: 3003,
  TOO_MANY_RECIPIENTS: 3004,
  ID_CONFLICT: 3005,
  INVALID_RECIPIENT: 3006,
  BODY_TOO_LARGE: 3007,
  STORE_UNREACHABLE: 3008,
  INVALID_KEY: 3009,
  RATE_LIMITED: 3010,
  CONNECTED_ELSEWHERE: 4001,
  KEEPALIVE_TIMEOUT: 4002,
  SLOW_CONSUMER: 4003,
  SHUTTING_DOWN: 4004,
  TOO_MANY_CONNECTIONS: 4005,
  CONNECTION_RATE_LIMITED: 4006,
  TOO_MANY_CONNECTIONS_FROM_ADDRESS: 4007,
  INTERNAL_ERROR: 5001,
  STORE_UNAVAILABLE: 5002
})

const CODE_NAMES = new Map(Object.entries(ERROR_CODES).map(([name, code]) => [code, name]))

/** A protocol violation by the peer; `code` is the number from ERROR_CODES to report. */
export class ProtocolError extends Error {
  constructor (code, message) {
    super(message)
    this.name = 'ProtocolError'
    this.code = code
    this.codeName = CODE_NAMES.get(code) ?? String(code)
  }
}

/** This side tried to encode something the protocol forbids (a bug in the caller). */
export class LocalProtocolError extends ProtocolError {
  constructor (code, message) {
    super(code, message)
    this.name = 'LocalProtocolError'
  }
}

const { MALFORMED_FRAME, FRAME_TOO_LARGE, INVALID_FIELD, UNKNOWN_FRAME_TYPE } = ERROR_CODES

// ------------------------------------------------------------------ ids

const MAILBOX_RE = /^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$/
const MESSAGE_ID_RE = /^[\x21-\x7e]{1,64}$/

/** A mailbox id: 1-64 of A-Z a-z 0-9 . _ @ + -, not starting with punctuation. */
export function isValidMailboxId (value) {
  return typeof value === 'string' && MAILBOX_RE.test(value)
}

/** A message id: 1-64 printable ASCII characters (0x21-0x7E). */
export function isValidMessageId (value) {
  return typeof value === 'string' && MESSAGE_ID_RE.test(value)
}

// ------------------------------------------------------------------ strict CBOR reading

/** A CBOR float, kept apart from integers (1.0 is not a valid uint). */
class CborFloat {
  constructor (value) { this.value = value }
}

/** A CBOR simple value other than false/true/null/undefined. */
class CborSimple {
  constructor (value) { this.value = value }
}

/** A decoded CBOR map: entries in wire order (keys may be any type). */
class CborMap {
  constructor () { this.entries = [] }
  get (key) {
    for (const [k, v] of this.entries) if (k === key) return v
    return undefined
  }

  has (key) {
    return this.entries.some(([k]) => k === key)
  }
}

const SIMPLE = new Type(7, 'simple', true)
const utf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true })
const EMPTY = new Uint8Array(0)
const TOKEN_OPTIONS = {
  strict: false, // non-shortest heads are legal
  allowIndefinite: false,
  allowUndefined: true,
  allowBigInt: true,
  retainStringBytes: true
}

/** cborg's tokenizer, plus the simple values it does not support (0-19 and 32-255). */
class StrictTokenizer extends Tokenizer {
  next () {
    const byte = this.data[this._pos]
    if (byte >= 0xe0 && byte <= 0xf3) {
      this._pos += 1
      return new Token(SIMPLE, byte & 0x1f, 1)
    }
    if (byte === 0xf8) {
      const value = this.data[this._pos + 1]
      if (value === undefined) throw new Error('truncated simple value')
      if (value < 32) throw new Error('two-byte simple value below 32')
      this._pos += 2
      return new Token(SIMPLE, value, 2)
    }
    return super.next()
  }
}

let nanCounter = 0

/** A string that is equal for two keys exactly when Python's == says they are equal. */
function keyId (v) {
  if (typeof v === 'string') return 's' + v
  if (typeof v === 'boolean') return v ? 'n1' : 'n0'
  if (typeof v === 'number' || typeof v === 'bigint') return 'n' + v.toString()
  if (v === null) return 'z'
  if (v === undefined) return 'u'
  if (v instanceof Uint8Array) return 'b' + toHex(v)
  if (v instanceof CborSimple) return 'n' + v.value
  if (v instanceof CborFloat) {
    const f = v.value
    if (Number.isNaN(f)) return 'nan' + (nanCounter++) // NaN != NaN: never a duplicate
    if (Number.isInteger(f)) return 'n' + BigInt(f).toString()
    return 'n' + String(f)
  }
  if (Array.isArray(v)) return 'a' + JSON.stringify(v.map(keyId))
  if (v instanceof CborMap) return 'm' + JSON.stringify(v.entries.map(([k, x]) => [keyId(k), keyId(x)]).sort())
  throw new Error('unexpected key')
}

function readItem (tokens, depth) {
  if (depth > MAX_DEPTH) throw new Error(`nesting deeper than ${MAX_DEPTH}`)
  if (tokens.done()) throw new Error('truncated CBOR item')
  const token = tokens.next()
  const type = token.type
  switch (type.name) {
    case 'uint':
    case 'negint':
    case 'false':
    case 'true':
    case 'null':
    case 'undefined':
      return token.value
    case 'float':
      return new CborFloat(token.value)
    case 'simple':
      return new CborSimple(token.value)
    case 'bytes':
      return token.value
    case 'string':
      return utf8.decode(token.byteValue ?? EMPTY)
    case 'array': {
      const out = []
      for (let i = 0; i < token.value; i++) out.push(readItem(tokens, depth + 1))
      return out
    }
    case 'map': {
      const out = new CborMap()
      const seen = new Set()
      for (let i = 0; i < token.value; i++) {
        const key = readItem(tokens, depth + 1)
        const id = keyId(key)
        if (seen.has(id)) throw new Error('duplicate map key')
        seen.add(id)
        out.entries.push([key, readItem(tokens, depth + 1)])
      }
      return out
    }
    case 'tag':
      throw new Error('CBOR tags are not allowed')
    default:
      throw new Error(`unexpected CBOR ${type.name}`)
  }
}

function asUint8Array (data) {
  if (!(data instanceof Uint8Array)) throw new TypeError('expected a Uint8Array')
  return data.constructor === Uint8Array ? data : new Uint8Array(data.buffer, data.byteOffset, data.byteLength)
}

function readBody (body) {
  const tokens = new StrictTokenizer(body, TOKEN_OPTIONS)
  let item
  try {
    item = readItem(tokens, 0)
  } catch (err) {
    throw new ProtocolError(MALFORMED_FRAME, `invalid CBOR: ${err.message}`)
  }
  if (!tokens.done()) throw new ProtocolError(MALFORMED_FRAME, 'bytes after the CBOR item')
  return item
}

/**
 * One CBOR data item in the deterministic encoding (RFC 8949 section 4.2.1 as docs/e2e.md uses it)
 * holding only text, byte strings, unsigned integers, arrays and maps: the structures the e2e
 * envelope signs and seals. Read as strictly as a frame (no tags, no indefinite lengths, no duplicate
 * keys, at most MAX_DEPTH containers, strict UTF-8, nothing after the item), and further: no negative
 * integers, floats or simple values, and the bytes must be exactly what encodeDeterministic writes
 * for the value read (shortest heads). Maps come back as Map, keys in wire order.
 * Throws ProtocolError (MALFORMED_FRAME) otherwise.
 */
export function decodeDeterministic (data) {
  const bytes = asUint8Array(data)
  const value = plainItem(readBody(bytes))
  const again = encodeDeterministic(value)
  if (again.length !== bytes.length || again.some((b, i) => b !== bytes[i])) {
    throw new ProtocolError(MALFORMED_FRAME, 'not the deterministic CBOR encoding')
  }
  return value
}

/**
 * The deterministic CBOR encoding of text, byte strings, unsigned integers (numbers up to 2^53-1,
 * bigints up to 2^64-1), arrays and Maps (keys in insertion order): definite lengths, shortest heads.
 */
export function encodeDeterministic (value) {
  return encode(checkDeterministic(value), { mapSorter: null })
}

function checkDeterministic (v) {
  if (typeof v === 'string' || v instanceof Uint8Array) return v
  if (typeof v === 'number' && Number.isSafeInteger(v) && v >= 0) return v
  if (typeof v === 'bigint' && v >= 0n && v < 2n ** 64n) return v
  if (Array.isArray(v)) {
    for (const x of v) checkDeterministic(x)
    return v
  }
  if (v instanceof Map) {
    for (const [k, x] of v) {
      checkDeterministic(k)
      checkDeterministic(x)
    }
    return v
  }
  throw new TypeError('encodeDeterministic takes text, bytes, unsigned integers, arrays and Maps')
}

function plainItem (v) {
  if (typeof v === 'string' || v instanceof Uint8Array) return v
  if (typeof v === 'number' && v >= 0) return v
  if (typeof v === 'bigint' && v >= 0n) return v
  if (Array.isArray(v)) return v.map(plainItem)
  if (v instanceof CborMap) return new Map(v.entries.map(([k, x]) => [plainItem(k), plainItem(x)]))
  throw new ProtocolError(MALFORMED_FRAME, 'only text, bytes, unsigned integers, arrays and maps are allowed')
}

// ------------------------------------------------------------------ field validation

class FieldError extends Error {}

function codePoints (s) {
  let n = 0
  for (const _ of s) n++ // eslint-disable-line no-unused-vars
  return n
}

function uint (min = 0) {
  return (v, name) => {
    if (typeof v === 'bigint') {
      if (v >= 0n) throw new FieldError(`${name}: integers above 2^53-1 are not supported by the JS client`)
    } else if (typeof v === 'number' && Number.isSafeInteger(v) && v >= min) {
      return v === 0 ? 0 : v // never -0
    }
    throw new FieldError(`${name} must be an integer of at least ${min}`)
  }
}

function text (min = 0, max = MAX_TEXT) {
  return (v, name) => {
    if (typeof v === 'string') {
      const n = codePoints(v)
      if (n >= min && n <= max) return v
    }
    throw new FieldError(`${name} must be a text string of ${min} to ${max} characters`)
  }
}

function bytes (v, name) {
  if (v instanceof Uint8Array) return asUint8Array(v) // a plain Uint8Array, also for a Node Buffer
  throw new FieldError(`${name} must be a byte string`)
}

function bool (v, name) {
  if (typeof v === 'boolean') return v
  throw new FieldError(`${name} must be a boolean`)
}

function messageId (v, name) {
  if (isValidMessageId(v)) return v
  throw new FieldError(`${name} must be 1-64 printable ASCII characters without spaces`)
}

function mailbox (v, name) {
  if (isValidMailboxId(v)) return v
  throw new FieldError(`${name} must be a mailbox id`)
}

function arrayOf (item) {
  return (v, name) => {
    if (!Array.isArray(v) || v.length < 1) throw new FieldError(`${name} must be a non-empty array`)
    return v.map((x) => item(x, `${name}[]`))
  }
}

/** A SEND recipient as written: any text of at most MAX_RECIPIENT_CHARS code points (syntax is the broker's call). */
function recipientText (v, name) {
  if (typeof v !== 'string') throw new FieldError(`${name} must contain text strings`)
  if (codePoints(v) > MAX_RECIPIENT_CHARS) throw new FieldError(`${name} elements must be at most ${MAX_RECIPIENT_CHARS} characters`)
  return v
}

/** Set a key on a plain object safely (also "__proto__"), keeping insertion order for the encoder's sake. */
function define (obj, key, value) {
  Object.defineProperty(obj, key, { value, enumerable: true, writable: true, configurable: true })
}

const STATUSES = new Set(['queued', 'delivered', 'duplicate', 'refused'])
const resultCode = uint(1000)

function results (v, name) {
  if (!(v instanceof CborMap) || v.entries.length === 0) throw new FieldError(`${name} must be a non-empty map`)
  const out = {}
  for (const [recipient, result] of v.entries) {
    if (typeof recipient !== 'string') throw new FieldError(`${name} keys must be text strings`)
    if (codePoints(recipient) > MAX_RECIPIENT_CHARS) throw new FieldError(`${name} keys must be at most ${MAX_RECIPIENT_CHARS} characters`)
    if (!(result instanceof CborMap)) throw new FieldError('each result must be a map')
    const status = result.get('status')
    if (typeof status !== 'string' || !STATUSES.has(status)) throw new FieldError('unknown result status')
    const r = { status }
    if (result.has('code')) {
      if (status !== 'refused') throw new FieldError('only a refused result has a code')
      r.code = resultCode(result.get('code'), 'code')
    } else if (status === 'refused') {
      throw new FieldError('a refused result needs a code')
    }
    define(out, recipient, r)
  }
  return out
}

/** The states of a STATUS frame (not RECEIPT results: see protocol.md 6, `status`). */
export const REPORT_STATES = Object.freeze(['delivered', 'expired', 'overflow'])
const REPORT_STATE_SET = new Set(REPORT_STATES)

function reportState (v, name) {
  if (typeof v === 'string' && REPORT_STATE_SET.has(v)) return v
  throw new FieldError(`${name} must be one of ${REPORT_STATES.join(', ')}`)
}

/** A STATUS carries id and recipient except for "overflow", which carries count and first_seq instead. */
function statusFields (frame) {
  if (frame.state === 'overflow') {
    if (frame.id !== undefined || frame.recipient !== undefined) return 'an overflow status has no id and no recipient'
    if (frame.count === undefined || frame.first_seq === undefined) return 'an overflow status has a count and a first_seq'
    if (frame.first_seq > frame.seq) return 'first_seq must not be above seq'
  } else {
    if (frame.count !== undefined || frame.first_seq !== undefined) return `a ${frame.state} status has no count and no first_seq`
    if (frame.id === undefined || frame.recipient === undefined) return `a ${frame.state} status has an id and a recipient`
  }
  return null
}

const statsKey = text(1, 64)
const statsValue = uint(0)

function stats (v, name) {
  if (!(v instanceof CborMap)) throw new FieldError(`${name} must be a map`)
  const out = {}
  for (const [key, value] of v.entries) {
    statsKey(key, 'stats key')
    define(out, key, statsValue(value, `stats[${key}]`))
  }
  return out
}

/** A byte string of exactly n bytes. */
function fixedBytes (n) {
  return (v, name) => {
    if (v instanceof Uint8Array && v.length === n) return asUint8Array(v)
    throw new FieldError(`${name} must be a byte string of ${n} bytes`)
  }
}

const KEY_RECORD_FIELDS = [['ik', fixedBytes(32)], ['kid', messageId], ['ek', fixedBytes(32)], ['sig', fixedBytes(64)]]

/**
 * A key record (protocol.md 6, "Key record"): a map with ik (32 bytes), kid (message id), ek (32 bytes) and sig
 * (64 bytes), unknown keys ignored; returned as a plain object {ik, kid, ek, sig} in that order.
 */
function keyRecord (v, name) {
  if (!(v instanceof CborMap)) throw new FieldError(`${name} must be a key record map`)
  const out = {}
  for (const [key, check] of KEY_RECORD_FIELDS) {
    if (!v.has(key)) throw new FieldError(`${name} needs ${key}`)
    const value = v.get(key)
    if (value === null) throw new FieldError(`${name}.${key} may not be null`)
    out[key] = check(value, `${name}.${key}`)
  }
  return out
}

/**
 * Whether `record` is a key record as the codec returns one: an object whose ik, kid, ek and sig pass the same
 * field rules as a decoded KEY_PUT's or KEY_GET_RESULT's (e2e.js's verifyKeyRecord checks with this, not a copy).
 */
export function isKeyRecord (record) {
  if (record === null || typeof record !== 'object') return false
  try {
    for (const [key, check] of KEY_RECORD_FIELDS) check(record[key], key)
  } catch (err) {
    if (err instanceof FieldError) return false
    throw err
  }
  return true
}

/** KEY_GET_RESULT keys: mailbox id -> key record (may be empty). */
function keyRecords (v, name) {
  if (!(v instanceof CborMap)) throw new FieldError(`${name} must be a map`)
  const out = {}
  for (const [mailboxId, record] of v.entries) {
    mailbox(mailboxId, `${name} key`)
    define(out, mailboxId, keyRecord(record, `${name}[${mailboxId}]`))
  }
  return out
}

const R = true // required
const O = false // optional

/**
 * Every frame type: [wire key, validator, required, default] in canonical (encoding) order. A field
 * with a default is left out of the frame (and so of its encoding) when it holds that value.
 */
const SCHEMAS = {
  hello: [['version', uint(1), R], ['token', text(1), R], ['agent', text(0, 256), O]],
  welcome: [
    ['version', uint(1), R],
    ['session', text(1, 64), R],
    ['mailbox', mailbox, O],
    ['pending', uint(0), R],
    ['max_frame_bytes', uint(64), R],
    ['max_inflight', uint(1), R],
    ['max_recipients', uint(1), R],
    ['default_ttl_s', uint(1), R],
    ['max_ttl_s', uint(1), R],
    ['keepalive_s', uint(1), R],
    ['expires_in_s', uint(0), R]
  ],
  refresh: [['token', text(1), R]],
  refreshed: [['expires_in_s', uint(0), R]],
  send: [
    ['id', messageId, R],
    ['to', arrayOf(recipientText), R],
    ['body', bytes, R],
    ['ttl_s', uint(1), O],
    ['notify', bool, O, false]
  ],
  // Exactly one of results and code (RECEIPT_EXCLUSIVE): code is a refusal of the whole SEND; retry_after_ms only
  // with code (3010 RATE_LIMITED's hint).
  receipt: [['id', messageId, R], ['results', results, O], ['code', uint(1000), O], ['retry_after_ms', uint(0), O]],
  deliver: [
    ['id', messageId, R],
    ['from', mailbox, R],
    ['sent_at', uint(0), R],
    ['expires_at', uint(0), R],
    ['attempt', uint(1), R],
    ['body', bytes, R]
  ],
  ack: [['ids', arrayOf(messageId), R]],
  // delivered/expired: id and recipient; overflow: count and first_seq (statusFields).
  status: [
    ['seq', uint(1), R],
    ['state', reportState, R],
    ['at', uint(0), R],
    ['id', messageId, O],
    ['recipient', mailbox, O],
    ['count', uint(1), O],
    ['first_seq', uint(1), O]
  ],
  status_ack: [['seqs', arrayOf(uint(1)), R]],
  pull: [],
  drained: [['pending', uint(0), R]],
  ping: [],
  pong: [],
  error: [['code', uint(1000), R], ['message', text(0), R], ['close', bool, R], ['retry_after_ms', uint(0), O]],
  bye: [],
  stats: [],
  stats_result: [['stats', stats, R]],
  cleanup: [],
  cleanup_result: [['purged', uint(0), R]],
  key_put: [['key', keyRecord, R]],
  key_put_result: [['kid', messageId, R], ['code', uint(1000), O]],
  key_get: [['mailboxes', arrayOf(recipientText), R]],
  key_get_result: [['keys', keyRecords, R]]
}

/** Checks across fields, after each field has passed its own: the frame as built so far -> error text or null. */
const CROSS_CHECKS = {
  receipt: (frame) => {
    if ((frame.results === undefined) === (frame.code === undefined)) return 'exactly one of results and code must be present'
    if (frame.retry_after_ms !== undefined && frame.code === undefined) return 'retry_after_ms goes only with code'
    return null
  },
  status: statusFields
}

/** Every frame type name, as on the wire. */
export const FRAME_TYPES = Object.freeze(Object.keys(SCHEMAS))

/** Build a frame object from a decoded top-level map; throws ProtocolError. */
function frameFromMap (item) {
  if (!(item instanceof CborMap)) throw new ProtocolError(MALFORMED_FRAME, 'frame body must be a CBOR map')
  const fields = new Map()
  for (const [key, value] of item.entries) {
    if (typeof key !== 'string') throw new ProtocolError(MALFORMED_FRAME, 'frame map keys must be text strings')
    fields.set(key, value)
  }
  const type = fields.get('type')
  const schema = typeof type === 'string' && Object.hasOwn(SCHEMAS, type) ? SCHEMAS[type] : undefined
  if (schema === undefined) throw new ProtocolError(UNKNOWN_FRAME_TYPE, `unknown frame type ${String(type)}`)
  const frame = { type }
  try {
    for (const [key, check, required, fallback] of schema) {
      if (!fields.has(key)) {
        if (required) throw new FieldError(`${key} is required`)
        continue
      }
      const value = fields.get(key)
      if (value === null) throw new FieldError(`${key} may not be null`)
      const checked = check(value, key)
      if (checked !== fallback) frame[key] = checked
    }
    const problem = CROSS_CHECKS[type]?.(frame)
    if (problem) throw new FieldError(problem)
  } catch (err) {
    if (err instanceof FieldError) throw new ProtocolError(INVALID_FIELD, `${type}: ${err.message}`)
    throw err
  }
  return frame
}

// ------------------------------------------------------------------ public decoding

/**
 * Decode one frame body (no length prefix).
 * Throws ProtocolError: FRAME_TOO_LARGE if the body exceeds maxFrameBytes (when given),
 * MALFORMED_FRAME, UNKNOWN_FRAME_TYPE or INVALID_FIELD.
 */
export function decodeBody (body, { maxFrameBytes } = {}) {
  body = asUint8Array(body)
  if (maxFrameBytes !== undefined && body.length > maxFrameBytes) {
    throw new ProtocolError(FRAME_TOO_LARGE, `frame of ${body.length} bytes exceeds the limit of ${maxFrameBytes}`)
  }
  return frameFromMap(readBody(body))
}

/**
 * The frame loop of both the stream decoder and decodeMessage: decode every whole frame in
 * buf[start, end) into `frames`, in order; return where the first incomplete frame (or the
 * end) is. Throws ProtocolError: FRAME_TOO_LARGE as soon as a prefix above maxFrameBytes is
 * in (before any of that body), else what the body's decoding throws.
 */
function takeFrames (buf, start, end, maxFrameBytes, frames) {
  while (end - start >= 4) {
    const n = ((buf[start] << 24) >>> 0) + (buf[start + 1] << 16) + (buf[start + 2] << 8) + buf[start + 3]
    if (n > maxFrameBytes) {
      throw new ProtocolError(FRAME_TOO_LARGE, `declared frame length ${n} exceeds the limit of ${maxFrameBytes} bytes`)
    }
    if (end - start - 4 < n) break
    frames.push(frameFromMap(readBody(buf.subarray(start + 4, start + 4 + n))))
    start += 4 + n
  }
  return start
}

/**
 * Decode one WebSocket binary message: one or more whole frames back to back, each with its
 * 4-byte prefix (protocol.md 2.5). Returns the frames in order. Throws ProtocolError:
 * MALFORMED_FRAME if the message is empty or ends inside a frame (fewer than 4 bytes, or a
 * body shorter than its prefix says), FRAME_TOO_LARGE for a prefix above maxFrameBytes
 * (judged first, from the prefix alone, as on a stream), or what any frame's body throws.
 * Nothing is returned from a message that throws.
 */
export function decodeMessage (message, { maxFrameBytes = DEFAULT_MAX_FRAME_BYTES } = {}) {
  message = asUint8Array(message)
  const frames = []
  const end = takeFrames(message, 0, message.length, maxFrameBytes, frames)
  if (message.length === 0) throw new ProtocolError(MALFORMED_FRAME, 'an empty message carries no frame')
  if (end !== message.length) {
    throw new ProtocolError(MALFORMED_FRAME, `message of ${message.length} bytes ends inside a frame (its last ${message.length - end} bytes)`)
  }
  return frames
}

/**
 * Turns a byte stream, in chunks of any size, into frames.
 * After it throws, the stream is unusable (framing is lost) and every later feed throws
 * the same error: close the connection.
 */
export class FrameDecoder {
  constructor ({ maxFrameBytes = DEFAULT_MAX_FRAME_BYTES } = {}) {
    this.maxFrameBytes = maxFrameBytes
    this._buf = new Uint8Array(0)
    this._start = 0
    this._end = 0
    this._error = null
  }

  /** Bytes received but not yet part of a whole frame. */
  get bufferedBytes () {
    return this._end - this._start
  }

  /** Add bytes; return every frame now complete, in order. Throws ProtocolError. */
  feed (chunk) {
    if (this._error) throw this._error
    try {
      return this._feed(asUint8Array(chunk))
    } catch (err) {
      this._error = err
      throw err
    }
  }

  _feed (chunk) {
    this._append(chunk)
    const frames = []
    this._start = takeFrames(this._buf, this._start, this._end, this.maxFrameBytes, frames)
    if (this._start === this._end) this._start = this._end = 0
    return frames
  }

  _append (chunk) {
    const used = this._end - this._start
    if (this._end + chunk.length > this._buf.length) {
      if (used + chunk.length <= this._buf.length) {
        this._buf.copyWithin(0, this._start, this._end) // room enough once compacted
      } else {
        const grown = new Uint8Array(Math.max(used + chunk.length, 2 * this._buf.length))
        grown.set(this._buf.subarray(this._start, this._end), 0)
        this._buf = grown
      }
      this._start = 0
      this._end = used
    }
    this._buf.set(chunk, this._end)
    this._end += chunk.length
  }
}

// ------------------------------------------------------------------ encoding

/** A user-built key record object as the map the validator reads (which ignores unknown keys, as the decoder does). */
function recordMap (value) {
  if (value === null || typeof value !== 'object' || value instanceof Uint8Array || Array.isArray(value) || value instanceof CborMap) return value
  const m = new CborMap()
  for (const [k, v] of Object.entries(value)) if (v !== undefined) m.entries.push([k, v])
  return m
}

/** A user-built frame object in the shape the validators read (maps as CborMap). */
function toCheckable (key, value) {
  if (key === 'key') return recordMap(value)
  if (key === 'keys' && value !== null && typeof value === 'object' && !(value instanceof Uint8Array) && !Array.isArray(value)) {
    const m = new CborMap()
    const entries = value instanceof Map ? [...value.entries()] : Object.entries(value)
    for (const [k, v] of entries) m.entries.push([k, recordMap(v)])
    return m
  }
  if ((key === 'results' || key === 'stats') && value !== null && typeof value === 'object' && !(value instanceof Uint8Array) && !Array.isArray(value)) {
    const m = new CborMap()
    const entries = value instanceof Map ? [...value.entries()] : Object.entries(value)
    for (const [k, v] of entries) {
      if (key === 'results' && v !== null && typeof v === 'object' && !(v instanceof CborMap)) {
        const r = new CborMap()
        for (const [rk, rv] of Object.entries(v)) if (rv !== undefined) r.entries.push([rk, rv])
        m.entries.push([k, r])
      } else {
        m.entries.push([k, v])
      }
    }
    return m
  }
  return value
}

/** The frame checked and in canonical form; throws LocalProtocolError. */
function canonicalFrame (frame) {
  if (frame === null || typeof frame !== 'object') throw new LocalProtocolError(INVALID_FIELD, 'a frame must be an object')
  const schema = typeof frame.type === 'string' && Object.hasOwn(SCHEMAS, frame.type) ? SCHEMAS[frame.type] : undefined
  if (schema === undefined) throw new LocalProtocolError(UNKNOWN_FRAME_TYPE, `unknown frame type ${String(frame.type)}`)
  const known = new Set(['type', ...schema.map(([key]) => key)])
  for (const key of Object.keys(frame)) {
    if (!known.has(key)) throw new LocalProtocolError(INVALID_FIELD, `${frame.type}: unknown field ${key}`)
  }
  const map = new CborMap()
  map.entries.push(['type', frame.type])
  for (const [key] of schema) {
    if (frame[key] !== undefined) map.entries.push([key, toCheckable(key, frame[key])])
  }
  try {
    return frameFromMap(map)
  } catch (err) {
    if (err instanceof ProtocolError) throw new LocalProtocolError(err.code, err.message)
    throw err
  }
}

/** Ordered cborg input: Maps keep insertion order (encoded with mapSorter: null). */
function toEncodable (frame) {
  const out = new Map()
  for (const [key, value] of Object.entries(frame)) {
    if (key === 'results') {
      const results = new Map()
      for (const [recipient, r] of Object.entries(value)) {
        const m = new Map([['status', r.status]])
        if (r.code !== undefined) m.set('code', r.code)
        results.set(recipient, m)
      }
      out.set(key, results)
    } else if (key === 'stats') {
      out.set(key, new Map(Object.entries(value)))
    } else if (key === 'key') {
      out.set(key, new Map(Object.entries(value)))
    } else if (key === 'keys') {
      out.set(key, new Map(Object.entries(value).map(([mailboxId, r]) => [mailboxId, new Map(Object.entries(r))])))
    } else {
      out.set(key, value)
    }
  }
  return out
}

/**
 * The CBOR body of one frame, without the length prefix.
 * Throws LocalProtocolError if the frame is not valid.
 */
export function encodeBody (frame) {
  return encode(toEncodable(canonicalFrame(frame)), { mapSorter: null })
}

/** The wire bytes of one frame on a byte stream: 4-byte big-endian length, then the CBOR body. */
export function encodeFrame (frame) {
  const body = encodeBody(frame)
  const out = new Uint8Array(4 + body.length)
  new DataView(out.buffer).setUint32(0, body.length)
  out.set(body, 4)
  return out
}

/**
 * Group encoded frames (each with its 4-byte prefix, as encodeFrame gives them) into
 * WebSocket binary messages of at most maxMessageBytes bytes each: the frames in their order,
 * back to back, none ever split across two messages (protocol.md 2.5). A frame longer than
 * maxMessageBytes goes alone (the receiver judges it); so does every frame when
 * maxMessageBytes is 0. A message holding one frame is that frame's array, not a copy.
 */
export function packFrames (frames, maxMessageBytes) {
  const messages = []
  let first = 0 // frames[first, i) make the message being built, `size` bytes
  let size = 0
  for (let i = 0; i < frames.length; i++) {
    const n = frames[i].length
    if (i > first && size + n > maxMessageBytes) {
      messages.push(joinFrames(frames, first, i, size))
      first = i
      size = 0
    }
    size += n
  }
  if (first < frames.length) messages.push(joinFrames(frames, first, frames.length, size))
  return messages
}

function joinFrames (frames, start, stop, size) {
  if (stop - start === 1) return frames[start]
  const out = new Uint8Array(size)
  let at = 0
  for (let i = start; i < stop; i++) {
    out.set(frames[i], at)
    at += frames[i].length
  }
  return out
}

// ------------------------------------------------------------------ helpers

function toHex (bytes) {
  let s = ''
  for (const b of bytes) s += b.toString(16).padStart(2, '0')
  return s
}
