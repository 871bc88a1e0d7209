// The JS end-to-end encryption core (e2e.js): round trips, every opening failure with its reason,
// key records, fingerprints, and the keys' WebCrypto properties. The golden vectors shared with
// wire/e2e.py are in e2e-vectors.test.mjs.
import { test } from 'node:test'
import assert from 'node:assert/strict'

import { Aes128Gcm, CipherSuite, DhkemX25519HkdfSha256, HkdfSha256 } from '@hpke/core'

import { ProtocolError, decodeDeterministic, encodeDeterministic } from '../codec.js'
import {
  DEFAULT_PAD_BLOCK,
  E2EError,
  E2E_MAGIC,
  E2E_REASONS,
  encryptionKeyFromPrivate,
  fingerprint,
  generateEncryptionKey,
  generateIdentity,
  identityFromSeed,
  isEnvelope,
  keyId,
  makeKeyRecord,
  openEnvelope,
  peek,
  safetyNumber,
  seal,
  verifyKeyRecord
} from '../e2e.js'

const utf8 = new TextEncoder()
const text = new TextDecoder()
const hex = (b) => Buffer.from(b).toString('hex')

/** A mailbox's device: identity, encryption key, published record. */
async function device (mailbox) {
  const identity = await generateIdentity()
  const ek = await generateEncryptionKey()
  return { mailbox, identity, ek, record: await makeKeyRecord(mailbox, identity, ek), keys: new Map([[ek.kid, ek]]) }
}

const [alice, bob, carol, dave] = await Promise.all(['alice', 'bob', 'carol', 'dave'].map(device))

function sealFrom (from, to, body, extra = {}) {
  return seal({ sender: from.mailbox, msgId: 'm1', recipients: to.map((d) => [d.mailbox, d.record]), identity: from.identity, body: utf8.encode(body), ...extra })
}

function openAs (me, envelope, extra = {}) {
  return openEnvelope(envelope, { sender: 'alice', msgId: 'm1', me: me.mailbox, senderIk: alice.identity.public, myKeys: me.keys, ...extra })
}

async function refused (promise, reason) {
  await assert.rejects(promise, (err) => {
    assert.ok(err instanceof E2EError, `expected E2EError(${reason}), got ${err}`)
    assert.equal(err.reason, reason, err.message)
    return true
  })
}

/** The envelope's parts, decoded (for building altered envelopes). */
function parts (envelope) {
  const outer = decodeDeterministic(envelope.subarray(4))
  return { outer, s: decodeDeterministic(outer.get('s')) }
}

/** An envelope from new `s` bytes, signed by `identity` (a sender that signs whatever it likes). */
async function signed (sBytes, identity) {
  const data = encodeDeterministic(['relay-e2e-msg/1', sBytes])
  const sig = new Uint8Array(await crypto.subtle.sign({ name: 'Ed25519' }, identity.privateKey, data))
  return envelopeOf(new Map([['v', 1], ['s', sBytes], ['sig', sig]]))
}

function envelopeOf (outer) {
  const cbor = encodeDeterministic(outer)
  const out = new Uint8Array(4 + cbor.length)
  out.set(E2E_MAGIC)
  out.set(cbor, 4)
  return out
}

test('a message to one recipient opens to its body, and peek shows the header', async () => {
  const envelope = await sealFrom(alice, [bob], 'hello bob')
  assert.ok(isEnvelope(envelope))
  assert.equal(hex(envelope.subarray(0, 4)), hex(utf8.encode('RE2E')))
  assert.equal(text.decode(await openAs(bob, envelope)), 'hello bob')
  const header = peek(envelope)
  assert.deepEqual({ ...header, ik: hex(header.ik) }, {
    from: 'alice', id: 'm1', to: ['bob'], ik: hex(alice.identity.public), kids: new Map([['bob', bob.ek.kid]])
  })
})

test('a message to three recipients is one envelope every one of them opens; a repeat is sealed once', async () => {
  const envelope = await seal({
    sender: 'alice', msgId: 'm1', identity: alice.identity, body: utf8.encode('to all'),
    recipients: [['bob', bob.record], ['carol', carol.record], ['bob', bob.record], ['dave', dave.record]]
  })
  assert.deepEqual(peek(envelope).to, ['bob', 'carol', 'dave'])
  for (const me of [bob, carol, dave]) assert.equal(text.decode(await openAs(me, envelope)), 'to all')
})

test('padding: the sealed size is a multiple of padBlock, and bodies of any length come back exactly', async () => {
  const ctLength = (envelope) => parts(envelope).s.get('ct').length - 16
  assert.equal(DEFAULT_PAD_BLOCK, 256)
  for (const [length, padBlock, padded] of [[0, 256, 256], [255, 256, 256], [256, 256, 512], [5, 1, 6], [7, 8, 8], [8, 8, 16]]) {
    const body = new Uint8Array(length).fill(0x80) // a body ending in 0x80 and zeros is not confused with padding
    if (length > 1) body[length - 2] = 0
    const envelope = await seal({ sender: 'alice', msgId: 'm1', recipients: [['bob', bob.record]], identity: alice.identity, body, padBlock })
    assert.equal(ctLength(envelope), padded, `${length} bytes in blocks of ${padBlock}`)
    assert.deepEqual(await openAs(bob, envelope), body)
  }
  for (const padBlock of [0, -1, 1.5, Number.NaN]) {
    await assert.rejects(sealFrom(alice, [bob], 'x', { padBlock }), RangeError)
  }
})

test('seal with fixed randomness gives the same bytes twice; without it never', async () => {
  const rand = () => ({
    cek: new Uint8Array(32).fill(1),
    nonce: new Uint8Array(12).fill(2),
    ephemeral: [new Uint8Array(32).fill(3), new Uint8Array(32).fill(4)]
  })
  const a = await sealFrom(alice, [bob, carol], 'fixed', { _rand: rand() })
  const b = await sealFrom(alice, [bob, carol], 'fixed', { _rand: rand() })
  assert.equal(hex(a), hex(b))
  assert.equal(text.decode(await openAs(carol, a)), 'fixed')
  assert.notEqual(hex(await sealFrom(alice, [bob], 'x')), hex(await sealFrom(alice, [bob], 'x')))
  await assert.rejects(sealFrom(alice, [bob, carol], 'x', { _rand: { ...rand(), ephemeral: [new Uint8Array(32)] } }), RangeError)
})

test('the envelope is the deterministic CBOR of the spec: keys in order, nothing else', async () => {
  const envelope = await sealFrom(alice, [bob, carol], 'shape')
  const { outer, s } = parts(envelope)
  assert.deepEqual([...outer.keys()], ['v', 's', 'sig'])
  assert.deepEqual([...s.keys()], ['from', 'id', 'to', 'ik', 'keys', 'n', 'ct'])
  for (const entry of s.get('keys')) {
    assert.deepEqual([...entry.keys()], ['to', 'kid', 'enc', 'ct'])
    assert.equal(entry.get('enc').length, 32)
    assert.equal(entry.get('ct').length, 48)
  }
  assert.equal(s.get('n').length, 12)
  assert.equal(outer.get('sig').length, 64)
  assert.equal(hex(envelopeOf(outer)), hex(envelope))
})

test('opening checks in order: plaintext, mismatch, not_for_me, key_changed, bad_signature, unknown_key', async () => {
  const envelope = await sealFrom(alice, [bob, carol], 'secret')
  await refused(openAs(bob, utf8.encode('RE2') /* too short */), 'plaintext')
  await refused(openAs(bob, utf8.encode('hello, in the clear')), 'plaintext')
  await refused(openAs(bob, envelope, { sender: 'mallory' }), 'mismatch')
  await refused(openAs(bob, envelope, { msgId: 'm2' }), 'mismatch')
  await refused(openAs(dave, envelope), 'not_for_me')
  await refused(openAs(bob, envelope, { senderIk: carol.identity.public }), 'key_changed')
  const rotated = await generateEncryptionKey()
  await refused(openAs(bob, envelope, { myKeys: new Map([[rotated.kid, rotated]]) }), 'unknown_key')
  // The kid is mine but the key behind it is not the one sealed to: the HPKE open fails.
  await refused(openAs(bob, envelope, { myKeys: new Map([[bob.ek.kid, rotated]]) }), 'decrypt_failed')
  const sig = parts(envelope).outer.get('sig')
  sig[10] ^= 1
  await refused(openAs(bob, envelopeOf(new Map([['v', 1], ['s', parts(envelope).outer.get('s')], ['sig', sig]]))), 'bad_signature')
  assert.throws(() => peek(utf8.encode('plain')), (err) => err instanceof E2EError && err.reason === 'plaintext')
})

test('a retired encryption key still opens what was sealed to it', async () => {
  const old = await sealFrom(alice, [bob], 'under the old key')
  const next = await generateEncryptionKey()
  const keys = new Map([[bob.ek.kid, bob.ek], [next.kid, next]])
  const record = await makeKeyRecord('bob', bob.identity, next)
  const fresh = await seal({ sender: 'alice', msgId: 'm1', recipients: [['bob', record]], identity: alice.identity, body: utf8.encode('new') })
  assert.equal(text.decode(await openAs(bob, old, { myKeys: keys })), 'under the old key')
  assert.equal(text.decode(await openAs(bob, fresh, { myKeys: keys })), 'new')
  assert.notEqual(record.kid, bob.record.kid)
  assert.equal(hex(record.ik), hex(bob.record.ik))
})

test('a recipient cannot forge to the others: re-signed with its own key it is key_changed, keeping the sender ik bad_signature', async () => {
  const envelope = await sealFrom(alice, [bob, carol], 'the original')
  const { s } = parts(envelope)
  // bob knows the CEK of this message; he seals other content under it and re-signs as himself.
  const forged = new Map(s)
  forged.set('ct', new Uint8Array(s.get('ct').length))
  await refused(openAs(carol, await signed(encodeDeterministic(forged), bob.identity)), 'bad_signature')
  forged.set('ik', bob.identity.public)
  await refused(openAs(carol, await signed(encodeDeterministic(forged), bob.identity)), 'key_changed')
})

test('replays into another conversation or as another message are refused', async () => {
  const envelope = await sealFrom(alice, [bob], 'for bob only')
  // Sent on by bob to carol (DELIVER from bob): the sealed sender is alice.
  await refused(openAs(carol, envelope, { sender: 'bob', senderIk: bob.identity.public }), 'mismatch')
  // Re-sent by alice's token under a new id.
  await refused(openAs(bob, envelope, { msgId: 'm9' }), 'mismatch')
  // Delivered to carol as it is: not sealed to her.
  await refused(openAs(carol, envelope), 'not_for_me')
})

test('a message sealed with its wrap info bound to another recipient does not decrypt', async () => {
  // alice wraps bob's CEK with the info of carol: a correctly signed envelope that bob cannot open.
  const envelope = await sealFrom(alice, [bob], 'bound')
  const { s } = parts(envelope)
  const suite = new CipherSuite({ kem: new DhkemX25519HkdfSha256(), kdf: new HkdfSha256(), aead: new Aes128Gcm() })
  const pk = await crypto.subtle.importKey('raw', bob.ek.public, { name: 'X25519' }, true, [])
  const wrapped = await suite.seal({ recipientPublicKey: pk, info: encodeDeterministic(['relay-e2e-wrap/1', 'alice', 'm1', 'carol']) }, new Uint8Array(32))
  const entry = new Map(s.get('keys')[0])
  entry.set('enc', new Uint8Array(wrapped.enc))
  entry.set('ct', new Uint8Array(wrapped.ct))
  const altered = new Map(s)
  altered.set('keys', [entry])
  await refused(openAs(bob, await signed(encodeDeterministic(altered), alice.identity)), 'decrypt_failed')
})

test('a signed envelope with bad padding is malformed', async () => {
  const envelope = await sealFrom(alice, [bob], 'x')
  const { s } = parts(envelope)
  // alice's own CEK is unknown to the test, so it seals a fresh one for bob with unpadded content.
  const suite = new CipherSuite({ kem: new DhkemX25519HkdfSha256(), kdf: new HkdfSha256(), aead: new Aes128Gcm() })
  const pk = await crypto.subtle.importKey('raw', bob.ek.public, { name: 'X25519' }, true, [])
  const cek = new Uint8Array(32).fill(9)
  const wrapped = await suite.seal({ recipientPublicKey: pk, info: encodeDeterministic(['relay-e2e-wrap/1', 'alice', 'm1', 'bob']) }, cek)
  const aes = await crypto.subtle.importKey('raw', cek, 'AES-GCM', false, ['encrypt'])
  for (const padded of [[], [1, 2, 3], [0x80, 0x80, 0], [0, 0, 0]]) {
    const ct = await crypto.subtle.encrypt({ name: 'AES-GCM', iv: s.get('n'), additionalData: utf8.encode('relay-e2e-body/1') }, aes, new Uint8Array(padded))
    const entry = new Map([['to', 'bob'], ['kid', bob.ek.kid], ['enc', new Uint8Array(wrapped.enc)], ['ct', new Uint8Array(wrapped.ct)]])
    const altered = new Map(s)
    altered.set('keys', [entry])
    altered.set('ct', new Uint8Array(ct))
    const opened = openAs(bob, await signed(encodeDeterministic(altered), alice.identity))
    if (padded[padded.length - 2] === 0x80) assert.deepEqual(await opened, new Uint8Array([0x80])) // one 0x80 is stripped
    else await refused(opened, 'malformed')
  }
})

test('every byte of an envelope, changed, makes it refuse to open', async () => {
  const envelope = await sealFrom(alice, [bob, carol], 'tamper with me', { padBlock: 16 })
  const seen = new Set()
  for (let i = 0; i < envelope.length; i++) {
    const bad = envelope.slice()
    bad[i] ^= 0x01
    await assert.rejects(openAs(bob, bad), (err) => {
      assert.ok(err instanceof E2EError, `byte ${i}: ${err}`)
      seen.add(err.reason)
      return true
    })
  }
  for (const reason of ['plaintext', 'malformed', 'mismatch', 'key_changed', 'bad_signature']) assert.ok(seen.has(reason), reason)
  // Cut short or with a byte after it: malformed.
  await refused(openAs(bob, envelope.subarray(0, envelope.length - 1)), 'malformed')
  await refused(openAs(bob, new Uint8Array([...envelope, 0])), 'malformed')
})

test('malformed envelopes: shapes, lengths, key sets, key order, types, non-deterministic bytes', async () => {
  const envelope = await sealFrom(alice, [bob, carol], 'shapes')
  const { outer, s } = parts(envelope)
  const withOuter = (edit) => { const m = new Map(outer); edit(m); return envelopeOf(m) }
  const withS = (edit) => { const m = new Map(s); edit(m); return withOuter((o) => o.set('s', encodeDeterministic(m))) }
  const entryEdit = (edit) => withS((m) => { const keys = m.get('keys').map((e) => new Map(e)); edit(keys); m.set('keys', keys) })
  const cases = {
    'v 2': withOuter((m) => m.set('v', 2)),
    'v text': withOuter((m) => m.set('v', '1')),
    'extra outer key': withOuter((m) => m.set('x', 1)),
    'no sig': withOuter((m) => m.delete('sig')),
    'sig 63 bytes': withOuter((m) => m.set('sig', m.get('sig').subarray(1))),
    'outer keys reordered': envelopeOf(new Map([['s', outer.get('s')], ['v', 1], ['sig', outer.get('sig')]])),
    's not bytes': withOuter((m) => m.set('s', 'text')),
    's not a map': withOuter((m) => m.set('s', encodeDeterministic([1]))),
    's keys reordered': withOuter((m) => m.set('s', encodeDeterministic(new Map([...s].reverse())))),
    'extra s key': withS((m) => m.set('pad', 0)),
    'no n': withS((m) => m.delete('n')),
    'n 11 bytes': withS((m) => m.set('n', new Uint8Array(11))),
    'ik 31 bytes': withS((m) => m.set('ik', new Uint8Array(31))),
    'from bytes': withS((m) => m.set('from', utf8.encode('alice'))),
    'to empty': withS((m) => { m.set('to', []); m.set('keys', []) }),
    'to repeated': withS((m) => { m.set('to', ['bob', 'bob']) }),
    'to not text': withS((m) => m.set('to', ['bob', 7])),
    'keys shorter than to': entryEdit((keys) => keys.pop()),
    'keys out of order': entryEdit((keys) => keys.reverse()),
    'entry to differs': entryEdit((keys) => keys[1].set('to', 'dave')),
    'entry kid bytes': entryEdit((keys) => keys[0].set('kid', new Uint8Array(8))),
    'entry enc 33 bytes': entryEdit((keys) => keys[0].set('enc', new Uint8Array(33))),
    'entry ct 47 bytes': entryEdit((keys) => keys[0].set('ct', new Uint8Array(47))),
    'entry extra key': entryEdit((keys) => keys[0].set('x', 1)),
    'ct text': withS((m) => m.set('ct', 'x')),
    // 0x19 0x00 0x01: the uint 1 in a 3-byte head.
    'v not shortest': (() => { const i = 7; assert.equal(hex(envelope.subarray(4, 8)), 'a3617601'); return new Uint8Array([...envelope.subarray(0, i), 0x19, 0x00, 0x01, ...envelope.subarray(i + 1)]) })(),
    'a tag': (() => { const c = envelope.subarray(4); return new Uint8Array([...E2E_MAGIC, 0xd8, 0x18, ...c]) })()
  }
  for (const [name, body] of Object.entries(cases)) {
    await assert.rejects(openAs(bob, body), (err) => {
      assert.ok(err instanceof E2EError, `${name}: ${err}`)
      assert.equal(err.reason, 'malformed', `${name}: ${err.message}`)
      return true
    })
    assert.throws(() => peek(body), (err) => err.reason === 'malformed', name)
  }
})

test('key records verify for their own mailbox only, and any change breaks them', async () => {
  const { record } = bob
  assert.equal(record.kid, await keyId(bob.ek.public))
  assert.match(record.kid, /^[0-9a-f]{16}$/)
  assert.equal(await verifyKeyRecord('bob', record), true)
  assert.equal(await verifyKeyRecord('carol', record), false)
  const flip = (b, i = 0) => { const c = b.slice(); c[i] ^= 1; return c }
  for (const bad of [
    { ...record, ik: flip(record.ik) }, { ...record, ek: flip(record.ek) }, { ...record, sig: flip(record.sig, 63) },
    { ...record, kid: 'ffffffffffffffff' }, { ...record, ik: carol.record.ik },
    { ...record, ik: record.ik.subarray(1) }, { ...record, sig: new Uint8Array(65) }, { ...record, kid: '' },
    { ...record, kid: 'a b' }, { ...record, kid: 'x'.repeat(65) }, { ...record, kid: 7 }, { ...record, ek: 'x' },
    { ik: record.ik, kid: record.kid, ek: record.ek }, null, 'record'
  ]) {
    assert.equal(await verifyKeyRecord('bob', bad), false, JSON.stringify(bad))
  }
})

test('generated private keys are non-extractable CryptoKeys that survive a structured clone', async () => {
  const identity = await generateIdentity()
  const ek = await generateEncryptionKey()
  for (const key of [identity.privateKey, ek.privateKey]) {
    assert.ok(key instanceof CryptoKey)
    assert.equal(key.extractable, false)
    await assert.rejects(crypto.subtle.exportKey('jwk', key))
  }
  assert.deepEqual(identity.privateKey.usages, ['sign'])
  assert.deepEqual(ek.privateKey.usages, ['deriveBits'])
  assert.equal(identity.public.length, 32)
  assert.equal(ek.public.length, 32)
  // What IndexedDB keeps is a structured clone: the clone signs and opens.
  const [id2, ek2] = structuredClone([identity, ek])
  const me = { mailbox: 'erin', keys: new Map([[ek2.kid, ek2]]) }
  const record = await makeKeyRecord('erin', id2, ek2)
  assert.equal(await verifyKeyRecord('erin', record), true)
  const envelope = await seal({ sender: 'alice', msgId: 'm1', recipients: [['erin', record]], identity: alice.identity, body: utf8.encode('cloned') })
  assert.equal(text.decode(await openAs(me, envelope)), 'cloned')
})

test('fixed raw keys import: the Ed25519 public key of a seed, the X25519 public key of a private key', async () => {
  // RFC 8032 7.1 test 1 and RFC 7748 6.1 (Alice's key pair).
  const identity = await identityFromSeed(Buffer.from('9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60', 'hex'))
  assert.equal(hex(identity.public), 'd75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a')
  assert.equal(identity.privateKey.extractable, false)
  const ek = await encryptionKeyFromPrivate(Buffer.from('77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a', 'hex'))
  assert.equal(hex(ek.public), '8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a')
  assert.equal(ek.privateKey.extractable, false)
  assert.equal(ek.kid, await keyId(ek.public))
  await assert.rejects(identityFromSeed(new Uint8Array(31)), RangeError)
  await assert.rejects(encryptionKeyFromPrivate('x'), TypeError)
})

test('fingerprints: six groups of five digits, per mailbox and key; the safety number is the same from both sides', async () => {
  const fa = await fingerprint('alice', alice.identity.public)
  assert.match(fa, /^\d{5}( \d{5}){5}$/)
  assert.equal(await fingerprint('alice', alice.identity.public), fa)
  assert.notEqual(await fingerprint('alice2', alice.identity.public), fa)
  assert.notEqual(await fingerprint('alice', bob.identity.public), fa)
  const fb = await fingerprint('bob', bob.identity.public)
  const ab = await safetyNumber('alice', alice.identity.public, 'bob', bob.identity.public)
  assert.equal(ab, `${fa} ${fb}`)
  assert.equal(await safetyNumber('bob', bob.identity.public, 'alice', alice.identity.public), ab)
  // Code point order, not UTF-16 order: U+FF5E sorts before U+1F600 (whose first UTF-16 unit is 0xD83D).
  const [x, y] = ['\u{ff5e}', '\u{1f600}']
  assert.equal(await safetyNumber(y, bob.identity.public, x, alice.identity.public), `${await fingerprint(x, alice.identity.public)} ${await fingerprint(y, bob.identity.public)}`)
})

test('E2EError carries one of the reasons', () => {
  assert.deepEqual(E2E_REASONS, ['plaintext', 'malformed', 'mismatch', 'not_for_me', 'no_sender_key', 'key_changed', 'bad_signature', 'unknown_key', 'decrypt_failed'])
  const err = new E2EError('no_sender_key')
  assert.ok(err instanceof Error)
  assert.equal(err.reason, 'no_sender_key')
  assert.equal(err.name, 'E2EError')
  assert.throws(() => new E2EError('oops'), TypeError)
})

test('decodeDeterministic takes only the deterministic encoding of text, bytes, uints, arrays and maps', () => {
  const value = new Map([['b', [1, 'x', new Uint8Array([7])]], ['a', 24]])
  const bytes = encodeDeterministic(value)
  assert.equal(hex(bytes), 'a2616283016178410761611818')
  assert.deepEqual(decodeDeterministic(bytes), value)
  for (const bad of ['1817', '5800', '7800', '9800', 'b800', '190001', 'f93c00', '20', 'f5', 'f6', 'c0 00', '9f ff', '0000', 'a2616100616100', '61ff']) {
    assert.throws(() => decodeDeterministic(Buffer.from(bad.replace(/ /g, ''), 'hex')), ProtocolError, bad)
  }
  assert.throws(() => encodeDeterministic(-1), TypeError)
  assert.throws(() => encodeDeterministic({ a: 1 }), TypeError)
})
