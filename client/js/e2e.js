// End-to-end encryption for Relay message bodies (docs/e2e.md): key records, sealing and opening
// envelopes, fingerprints. No I/O; the same API as the Python module wire/e2e.py, in camelCase,
// producing byte-identical envelopes (tests/vectors/e2e.json binds the two).
//
// Theory of operation: a device has an Ed25519 identity key (the one contacts pin) and an X25519
// encryption key with a key id (kid), signed by the identity key into a key record that the broker's
// directory publishes. seal() draws a random content key (CEK), encrypts the padded body with
// AES-256-GCM, wraps the CEK to every recipient's encryption key with HPKE (RFC 9180 base mode,
// DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM; the info binds sender, message id and
// recipient), and signs the whole sealed map `s` with the identity key: a recipient cannot forge
// content to the others, and the envelope cannot be replayed as another message or to another
// mailbox. openEnvelope() checks in the order of docs/e2e.md and throws E2EError with the reason
// of the first failed step.
//
// Keys are WebCrypto CryptoKeys: generateIdentity() / generateEncryptionKey() make non-extractable
// private keys (storable in IndexedDB by structured clone) with the raw public bytes beside them;
// identityFromSeed() / encryptionKeyFromPrivate() import fixed raw private keys (test vectors).
// Crypto is WebCrypto (Ed25519, X25519, AES-GCM, SHA-256) and @hpke/core (HPKE); CBOR is the codec's
// deterministic encoding, map keys in insertion order.

import { Aes128Gcm, CipherSuite, DhkemX25519HkdfSha256, HkdfSha256 } from '@hpke/core'
import { decodeDeterministic, encodeDeterministic, isKeyRecord } from './codec.js'

const MAGIC = new Uint8Array([0x52, 0x45, 0x32, 0x45])
/** Every envelope body starts with these 4 bytes ("RE2E"); any other body is a plaintext message (a copy: changing it changes nothing). */
export const E2E_MAGIC = MAGIC.slice()
/** The padding block seal() uses unless told otherwise. */
export const DEFAULT_PAD_BLOCK = 256
/** Why an envelope did not open (docs/e2e.md, "Opening"), in the order the steps are checked. */
export const E2E_REASONS = Object.freeze([
  'plaintext', 'malformed', 'mismatch', 'not_for_me', 'no_sender_key', 'key_changed', 'bad_signature',
  'unknown_key', 'decrypt_failed'
])
const REASON_SET = new Set(E2E_REASONS)

/** An envelope that does not open, or a key record that cannot be used; `reason` is one of E2E_REASONS. */
export class E2EError extends Error {
  constructor (reason, message) {
    if (!REASON_SET.has(reason)) throw new TypeError(`unknown e2e reason ${String(reason)}`)
    super(message ?? reason)
    this.name = 'E2EError'
    this.reason = reason
  }
}

const LABEL_KEY = 'relay-e2e-key/1'
const LABEL_MSG = 'relay-e2e-msg/1'
const LABEL_WRAP = 'relay-e2e-wrap/1'
const LABEL_FP = 'relay-e2e-fp/1'
const BODY_AAD = new TextEncoder().encode('relay-e2e-body/1')
const EMPTY = new Uint8Array(0)

const ED25519 = { name: 'Ed25519' }
const X25519 = { name: 'X25519' }
const ENVELOPE_KEYS = ['v', 's', 'sig']
const SEALED_KEYS = ['from', 'id', 'to', 'ik', 'keys', 'n', 'ct']
const ENTRY_KEYS = ['to', 'kid', 'enc', 'ct']

const subtle = () => globalThis.crypto.subtle
const suite = new CipherSuite({ kem: new DhkemX25519HkdfSha256(), kdf: new HkdfSha256(), aead: new Aes128Gcm() })

// ------------------------------------------------------------------ keys

// PKCS#8 headers for a raw 32-byte private key (RFC 8410): how WebCrypto takes a seed it did not make.
const PKCS8_ED25519 = hex('302e020100300506032b657004220420')
const PKCS8_X25519 = hex('302e020100300506032b656e04220420')

/** A fixed raw private key as a non-extractable CryptoKey, and its raw public key (via a JWK). */
async function importPrivate (raw, header, algorithm, usages) {
  const bytes = bytesOf(raw, 32, 'a private key')
  const pkcs8 = new Uint8Array(header.length + 32)
  pkcs8.set(header)
  pkcs8.set(bytes, header.length)
  const jwk = await subtle().exportKey('jwk', await subtle().importKey('pkcs8', pkcs8, algorithm, true, usages))
  const privateKey = await subtle().importKey('jwk', jwk, algorithm, false, usages)
  return { privateKey, public: fromBase64Url(jwk.x) }
}

/** A new Ed25519 identity: { privateKey (non-extractable CryptoKey), public (32 raw bytes) }. */
export async function generateIdentity () {
  const pair = await subtle().generateKey(ED25519, false, ['sign', 'verify'])
  return { privateKey: pair.privateKey, public: new Uint8Array(await subtle().exportKey('raw', pair.publicKey)) }
}

/** The identity whose Ed25519 private key is the 32-byte `seed` (the test vectors' keys). */
export async function identityFromSeed (seed) {
  return importPrivate(seed, PKCS8_ED25519, ED25519, ['sign'])
}

/** A new X25519 encryption key: { privateKey (non-extractable CryptoKey), public (32 raw bytes), kid }. */
export async function generateEncryptionKey () {
  const pair = await subtle().generateKey(X25519, false, ['deriveBits'])
  const pub = new Uint8Array(await subtle().exportKey('raw', pair.publicKey))
  return { privateKey: pair.privateKey, public: pub, kid: await keyId(pub) }
}

/** The encryption key whose X25519 private key is the 32 raw bytes `raw`. */
export async function encryptionKeyFromPrivate (raw) {
  const key = await importPrivate(raw, PKCS8_X25519, X25519, ['deriveBits'])
  return { ...key, kid: await keyId(key.public) }
}

/** The key id of an X25519 public key: lowercase hex of the first 8 bytes of its SHA-256. */
export async function keyId (ekPublic) {
  const digest = new Uint8Array(await subtle().digest('SHA-256', bytesOf(ekPublic, 32, 'ek')))
  return toHex(digest.subarray(0, 8))
}

function keyStatement (mailbox, kid, ek) {
  return encodeDeterministic([LABEL_KEY, mailbox, kid, ek])
}

/** The key record { ik, kid, ek, sig } that `mailbox` publishes for its encryption key `ek`. */
export async function makeKeyRecord (mailbox, identity, ek) {
  const sig = await subtle().sign(ED25519, identity.privateKey, keyStatement(mailbox, ek.kid, ek.public))
  return { ik: identity.public, kid: ek.kid, ek: ek.public, sig: new Uint8Array(sig) }
}

/** Whether `record` has the key-record shape and its `sig` is `ik`'s signature of it for `mailbox`. */
export async function verifyKeyRecord (mailbox, record) {
  if (typeof mailbox !== 'string' || !isKeyRecord(record)) return false
  const { ik, kid, ek, sig } = record
  return verify(ik, sig, keyStatement(mailbox, kid, ek))
}

async function verify (ik, sig, data) {
  let key
  try {
    key = await subtle().importKey('raw', ik, ED25519, false, ['verify'])
  } catch {
    return false // not a point on the curve
  }
  return subtle().verify(ED25519, key, sig, data)
}

// ------------------------------------------------------------------ seal

/**
 * The SEND body (magic included) of `body` end-to-end encrypted from `sender` to every recipient.
 * `recipients` is a list of [mailbox, key record] pairs (records already verified by the caller);
 * a repeated mailbox is kept once, at its first place. `_rand` (tests and vectors only) fixes the
 * randomness: { cek (32 bytes), nonce (12 bytes), ephemeral: one 32-byte X25519 private key per
 * distinct recipient }.
 */
export async function seal ({ sender, msgId, recipients, identity, body, padBlock = DEFAULT_PAD_BLOCK, _rand }) {
  if (typeof sender !== 'string' || typeof msgId !== 'string') throw new TypeError('sender and msgId must be strings')
  if (!Number.isSafeInteger(padBlock) || padBlock < 1) throw new RangeError('padBlock must be a positive integer')
  const plain = bytesOf(body, undefined, 'body')
  const chosen = new Map()
  for (const [mailbox, record] of recipients) {
    if (typeof mailbox !== 'string') throw new TypeError('a recipient must be a string')
    if (!chosen.has(mailbox)) chosen.set(mailbox, record)
  }
  if (chosen.size === 0) throw new RangeError('seal needs at least one recipient')
  const to = [...chosen.keys()]
  let cek, nonce, ephemeral
  if (_rand === undefined) {
    cek = globalThis.crypto.getRandomValues(new Uint8Array(32))
    nonce = globalThis.crypto.getRandomValues(new Uint8Array(12))
  } else {
    cek = bytesOf(_rand.cek, 32, '_rand.cek')
    nonce = bytesOf(_rand.nonce, 12, '_rand.nonce')
    ephemeral = [..._rand.ephemeral]
    if (ephemeral.length !== to.length) throw new RangeError('_rand.ephemeral needs one key per recipient')
  }
  const keys = await Promise.all(to.map(async (mailbox, i) => {
    const record = chosen.get(mailbox)
    const params = {
      recipientPublicKey: await subtle().importKey('raw', bytesOf(record.ek, 32, 'ek'), X25519, true, []),
      info: encodeDeterministic([LABEL_WRAP, sender, msgId, mailbox])
    }
    if (ephemeral !== undefined) params.ekm = await ephemeralPair(ephemeral[i])
    const wrapped = await suite.seal(params, cek, EMPTY)
    return new Map([['to', mailbox], ['kid', record.kid], ['enc', new Uint8Array(wrapped.enc)], ['ct', new Uint8Array(wrapped.ct)]])
  }))
  const aes = await subtle().importKey('raw', cek, 'AES-GCM', false, ['encrypt'])
  const ct = await subtle().encrypt({ name: 'AES-GCM', iv: nonce, additionalData: BODY_AAD }, aes, pad(plain, padBlock))
  const s = encodeDeterministic(new Map([
    ['from', sender], ['id', msgId], ['to', to], ['ik', identity.public], ['keys', keys], ['n', nonce],
    ['ct', new Uint8Array(ct)]
  ]))
  const sig = new Uint8Array(await subtle().sign(ED25519, identity.privateKey, encodeDeterministic([LABEL_MSG, s])))
  return concat(MAGIC, encodeDeterministic(new Map([['v', 1], ['s', s], ['sig', sig]])))
}

async function ephemeralPair (raw) {
  const key = await importPrivate(raw, PKCS8_X25519, X25519, ['deriveBits'])
  return { privateKey: key.privateKey, publicKey: await subtle().importKey('raw', key.public, X25519, true, []) }
}

/** ISO/IEC 7816-4 padding: body, 0x80, then zeros up to the next multiple of padBlock. */
function pad (body, padBlock) {
  const out = new Uint8Array(Math.ceil((body.length + 1) / padBlock) * padBlock)
  out.set(body)
  out[body.length] = 0x80
  return out
}

function unpad (padded) {
  let end = padded.length
  while (end > 0 && padded[end - 1] === 0) end--
  if (end === 0 || padded[end - 1] !== 0x80) throw new E2EError('malformed', 'bad padding')
  return padded.slice(0, end - 1)
}

// ------------------------------------------------------------------ open

/** Whether a message body is an envelope (starts with E2E_MAGIC). */
export function isEnvelope (body) {
  return body instanceof Uint8Array && body.length >= 4 && MAGIC.every((b, i) => body[i] === b)
}

/** The envelope read and checked for shape (step 2); throws E2EError ('plaintext' or 'malformed'). */
function readEnvelope (body) {
  if (!isEnvelope(body)) throw new E2EError('plaintext', 'not an envelope')
  const envelope = exactMap(body.subarray(4), ENVELOPE_KEYS, 'the envelope')
  if (envelope.get('v') !== 1) throw malformed('v must be 1')
  const s = envelope.get('s')
  const sig = envelope.get('sig')
  if (!(s instanceof Uint8Array)) throw malformed('s must be bytes')
  if (!isBytes(sig, 64)) throw malformed('sig must be 64 bytes')
  const m = exactMap(s, SEALED_KEYS, 's')
  const sealed = { s, sig, from: m.get('from'), id: m.get('id'), to: m.get('to'), ik: m.get('ik'), n: m.get('n'), ct: m.get('ct') }
  if (typeof sealed.from !== 'string' || typeof sealed.id !== 'string') throw malformed('from and id must be text')
  if (!Array.isArray(sealed.to) || sealed.to.length === 0 || !sealed.to.every((r) => typeof r === 'string')) {
    throw malformed('to must be a non-empty array of text')
  }
  if (new Set(sealed.to).size !== sealed.to.length) throw malformed('to has a repeated recipient')
  if (!isBytes(sealed.ik, 32)) throw malformed('ik must be 32 bytes')
  if (!isBytes(sealed.n, 12)) throw malformed('n must be 12 bytes')
  if (!(sealed.ct instanceof Uint8Array)) throw malformed('ct must be bytes')
  const keys = m.get('keys')
  if (!Array.isArray(keys) || keys.length !== sealed.to.length) throw malformed('keys must match to one to one')
  sealed.keys = keys.map((entry, i) => {
    if (!(entry instanceof Map) || !sameKeys(entry, ENTRY_KEYS)) throw malformed('a keys entry must have exactly to, kid, enc, ct')
    const e = { to: entry.get('to'), kid: entry.get('kid'), enc: entry.get('enc'), ct: entry.get('ct') }
    if (e.to !== sealed.to[i]) throw malformed('keys must match to one to one')
    if (typeof e.kid !== 'string') throw malformed('kid must be text')
    if (!isBytes(e.enc, 32) || !isBytes(e.ct, 48)) throw malformed('enc must be 32 bytes and ct 48')
    return e
  })
  return sealed
}

function exactMap (bytes, names, what) {
  let value
  try {
    value = decodeDeterministic(bytes)
  } catch (err) {
    throw malformed(`${what}: ${err.message}`)
  }
  if (!(value instanceof Map) || !sameKeys(value, names)) throw malformed(`${what} must be a map of exactly ${names.join(', ')}`)
  return value
}

function sameKeys (map, names) {
  const keys = [...map.keys()]
  return keys.length === names.length && keys.every((k, i) => k === names[i])
}

function malformed (message) {
  return new E2EError('malformed', message)
}

/**
 * The envelope's header without checking any signature: { from, id, to, ik, kids } (kids: Map
 * recipient -> kid). Throws E2EError ('plaintext' or 'malformed').
 */
export function peek (body) {
  const sealed = readEnvelope(body)
  return { from: sealed.from, id: sealed.id, to: sealed.to, ik: sealed.ik, kids: new Map(sealed.keys.map((e) => [e.to, e.kid])) }
}

/**
 * The plaintext of an envelope delivered from `sender` with id `msgId` to `me`, whose pinned identity
 * key for the sender is `senderIk`; `myKeys` maps a kid to my current or retired encryption key.
 * Throws E2EError with the reason of the first failing check (docs/e2e.md, "Opening", steps 1-8;
 * finding the sender's key, step 5, is the caller's).
 */
export async function openEnvelope (body, { sender, msgId, me, senderIk, myKeys }) {
  const sealed = readEnvelope(body)
  if (sealed.from !== sender || sealed.id !== msgId) throw new E2EError('mismatch', 'sealed for another sender or message id')
  const mine = sealed.keys.find((e) => e.to === me)
  if (mine === undefined) throw new E2EError('not_for_me', `not sealed to ${me}`)
  if (!equalBytes(sealed.ik, bytesOf(senderIk, 32, 'senderIk'))) throw new E2EError('key_changed', `sealed with another identity key of ${sender}`)
  if (!(await verify(sealed.ik, sealed.sig, encodeDeterministic([LABEL_MSG, sealed.s])))) {
    throw new E2EError('bad_signature', 'the signature does not verify')
  }
  const key = myKeys.get(mine.kid)
  if (key === undefined) throw new E2EError('unknown_key', `no encryption key ${mine.kid}`)
  let padded
  try {
    const recipientKey = { privateKey: key.privateKey, publicKey: await subtle().importKey('raw', key.public, X25519, true, []) }
    const info = encodeDeterministic([LABEL_WRAP, sealed.from, sealed.id, me])
    const cek = await suite.open({ recipientKey, enc: mine.enc, info }, mine.ct, EMPTY)
    const aes = await subtle().importKey('raw', cek, 'AES-GCM', false, ['decrypt'])
    padded = new Uint8Array(await subtle().decrypt({ name: 'AES-GCM', iv: sealed.n, additionalData: BODY_AAD }, aes, sealed.ct))
  } catch (err) {
    throw new E2EError('decrypt_failed', `cannot decrypt: ${err.message}`)
  }
  return unpad(padded)
}

// ------------------------------------------------------------------ fingerprints

/** Six groups of five digits naming `mailbox`'s identity key `ik` (compare them out of band). */
export async function fingerprint (mailbox, ik) {
  const digest = new Uint8Array(await subtle().digest('SHA-256', encodeDeterministic([LABEL_FP, mailbox, bytesOf(ik, 32, 'ik')])))
  const groups = []
  for (let i = 0; i < 30; i += 5) {
    let n = 0
    for (let j = i; j < i + 5; j++) n = n * 256 + digest[j] // at most 2^40: exact in a double
    groups.push(String(n % 100000).padStart(5, '0'))
  }
  return groups.join(' ')
}

/** The safety number of a conversation between a and b: both fingerprints, ordered by mailbox id. */
export async function safetyNumber (a, ikA, b, ikB) {
  const fa = await fingerprint(a, ikA)
  const fb = await fingerprint(b, ikB)
  return codePointLess(b, a) ? `${fb} ${fa}` : `${fa} ${fb}`
}

function codePointLess (x, y) {
  const xs = [...x].map((c) => c.codePointAt(0))
  const ys = [...y].map((c) => c.codePointAt(0))
  for (let i = 0; i < Math.min(xs.length, ys.length); i++) if (xs[i] !== ys[i]) return xs[i] < ys[i]
  return xs.length < ys.length
}

// ------------------------------------------------------------------ helpers

function isBytes (v, length) {
  return v instanceof Uint8Array && v.length === length
}

function bytesOf (v, length, name) {
  if (!(v instanceof Uint8Array)) throw new TypeError(`${name} must be a Uint8Array`)
  if (length !== undefined && v.length !== length) throw new RangeError(`${name} must be ${length} bytes`)
  return v.constructor === Uint8Array ? v : new Uint8Array(v.buffer, v.byteOffset, v.byteLength)
}

function equalBytes (a, b) {
  return a.length === b.length && a.every((x, i) => x === b[i])
}

function concat (a, b) {
  const out = new Uint8Array(a.length + b.length)
  out.set(a)
  out.set(b, a.length)
  return out
}

function hex (s) {
  return new Uint8Array(s.match(/../g).map((h) => parseInt(h, 16)))
}

function toHex (bytes) {
  let s = ''
  for (const b of bytes) s += b.toString(16).padStart(2, '0')
  return s
}

function fromBase64Url (s) {
  const bin = atob(s.replace(/-/g, '+').replace(/_/g, '/'))
  return Uint8Array.from(bin, (c) => c.charCodeAt(0))
}
