// The JS e2e core against the golden vectors shared with wire/e2e.py (tests/vectors/e2e.json, made by
// tests/vectors/generate_e2e.py): the same keys, records, fingerprints and byte-identical envelopes, and
// the same reason for every invalid envelope. Also the published vectors of what it builds on: RFC 9180's
// for our HPKE suite through @hpke/core (tests/vectors/hpke-rfc9180.json) and RFC 8032's Ed25519 TEST 1-3
// through WebCrypto.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { readFileSync } from 'node:fs'
import { fileURLToPath } from 'node:url'

import { Aes128Gcm, CipherSuite, DhkemX25519HkdfSha256, HkdfSha256 } from '@hpke/core'

import {
  E2EError,
  encryptionKeyFromPrivate,
  fingerprint,
  identityFromSeed,
  keyId,
  makeKeyRecord,
  openEnvelope,
  peek,
  safetyNumber,
  seal,
  verifyKeyRecord
} from '../e2e.js'

const vectorsDir = new URL('../../../tests/vectors/', import.meta.url)
const load = (name) => JSON.parse(readFileSync(fileURLToPath(new URL(name, vectorsDir)), 'utf8'))
const E2E = load('e2e.json')
const HPKE = load('hpke-rfc9180.json')

const bytes = (hex) => new Uint8Array(Buffer.from(hex, 'hex'))
const hex = (b) => Buffer.from(b).toString('hex')
const recordOf = (r) => ({ ik: bytes(r.ik), kid: r.kid, ek: bytes(r.ek), sig: bytes(r.sig) })
const recordHex = (r) => ({ ik: hex(r.ik), kid: r.kid, ek: hex(r.ek), sig: hex(r.sig) })

async function keysOf (list) {
  const keys = new Map()
  for (const k of list) {
    const key = await encryptionKeyFromPrivate(bytes(k.private))
    assert.equal(hex(key.public), k.public)
    assert.equal(key.kid, k.kid)
    keys.set(key.kid, key)
  }
  return keys
}

test('vectors: identities from their seeds', async () => {
  for (const [name, { seed, ik }] of Object.entries(E2E.identities)) {
    assert.equal(hex((await identityFromSeed(bytes(seed))).public), ik, name)
  }
})

test('vectors: key records are made byte for byte, and verify exactly when valid', async () => {
  assert.ok(E2E.key_records.some((v) => !v.valid))
  for (const v of E2E.key_records) {
    const record = recordOf(v.record)
    assert.equal(await verifyKeyRecord(v.mailbox, record), v.valid, v.name)
    if (v.valid) {
      const ek = await encryptionKeyFromPrivate(bytes(v.ek.private))
      assert.deepEqual([hex(ek.public), ek.kid, await keyId(ek.public)], [v.ek.public, v.ek.kid, v.ek.kid], v.name)
      const made = await makeKeyRecord(v.mailbox, await identityFromSeed(bytes(v.identity_seed)), ek)
      assert.deepEqual(recordHex(made), v.record, v.name)
    }
  }
})

test('vectors: fingerprints and safety numbers', async () => {
  for (const v of E2E.fingerprints) assert.equal(await fingerprint(v.mailbox, bytes(v.ik)), v.fingerprint, v.mailbox)
  for (const v of E2E.safety_numbers) {
    assert.equal(await safetyNumber(v.a, bytes(v.ik_a), v.b, bytes(v.ik_b)), v.safety_number, `${v.a}/${v.b}`)
    assert.equal(await safetyNumber(v.b, bytes(v.ik_b), v.a, bytes(v.ik_a)), v.safety_number, `${v.b}/${v.a}`)
  }
})

test('vectors: seal from the inputs gives the identical envelope, and every recipient opens it to the body', async () => {
  assert.ok(E2E.envelopes.length >= 5)
  for (const v of E2E.envelopes) {
    const identity = await identityFromSeed(bytes(v.sender_seed))
    assert.equal(hex(identity.public), v.sender_ik, v.name)
    const records = new Map(v.recipients.map((r) => [r.mailbox, recordOf(r.record)]))
    const envelope = await seal({
      sender: v.sender,
      msgId: v.msg_id,
      recipients: v.to.map((mailbox) => [mailbox, records.get(mailbox)]), // as the SEND gives them: repeats too
      identity,
      body: bytes(v.body),
      padBlock: v.pad_block,
      _rand: { cek: bytes(v.cek), nonce: bytes(v.nonce), ephemeral: v.ephemeral.map(bytes) }
    })
    assert.equal(hex(envelope), v.envelope, v.name)
    const header = peek(bytes(v.envelope))
    assert.deepEqual(header.to, v.recipients.map((r) => r.mailbox), v.name)
    for (const r of v.recipients) {
      assert.equal(header.kids.get(r.mailbox), r.record.kid, v.name)
      const opened = await openEnvelope(bytes(v.envelope), { sender: v.sender, msgId: v.msg_id, me: r.mailbox, senderIk: identity.public, myKeys: await keysOf(r.keys) })
      assert.equal(hex(opened), v.body, `${v.name}: ${r.mailbox}`)
    }
  }
})

test('vectors: every invalid envelope gives its reason', async () => {
  const reasons = new Set()
  for (const v of E2E.invalid) {
    const myKeys = await keysOf(v.my_keys)
    const opening = openEnvelope(bytes(v.body), { sender: v.sender, msgId: v.msg_id, me: v.me, senderIk: bytes(v.sender_ik), myKeys })
    await assert.rejects(opening, (err) => {
      assert.ok(err instanceof E2EError, `${v.name}: ${err}`)
      assert.equal(err.reason, v.reason, `${v.name} (${v.description}): ${err.message}`)
      return true
    })
    if (v.reason === 'plaintext' || v.reason === 'malformed') {
      // peek is step 1 and 2 alone: the same verdict, unless the envelope is only malformed inside (bad padding).
      let peeked = null
      try {
        peek(bytes(v.body))
      } catch (err) {
        peeked = err.reason
      }
      if (!v.name.startsWith('padding_')) assert.equal(peeked, v.reason, v.name)
    }
    reasons.add(v.reason)
  }
  assert.deepEqual([...reasons].sort(), ['bad_signature', 'decrypt_failed', 'key_changed', 'malformed', 'mismatch', 'not_for_me', 'plaintext', 'unknown_key'])
})

test('RFC 8032 Ed25519 TEST 1-3 through WebCrypto: the public key of the seed, the signature, verification', async () => {
  assert.deepEqual(E2E.ed25519_rfc8032.map((v) => v.name), ['TEST 1', 'TEST 2', 'TEST 3'])
  for (const v of E2E.ed25519_rfc8032) {
    const identity = await identityFromSeed(bytes(v.secret_key))
    assert.equal(hex(identity.public), v.public_key, v.name)
    const signature = await crypto.subtle.sign({ name: 'Ed25519' }, identity.privateKey, bytes(v.message))
    assert.equal(hex(signature), v.signature, v.name)
    const pub = await crypto.subtle.importKey('raw', bytes(v.public_key), { name: 'Ed25519' }, false, ['verify'])
    assert.equal(await crypto.subtle.verify({ name: 'Ed25519' }, pub, bytes(v.signature), bytes(v.message)), true, v.name)
    const other = bytes(v.message + '00')
    assert.equal(await crypto.subtle.verify({ name: 'Ed25519' }, pub, bytes(v.signature), other), false, v.name)
  }
})

test('RFC 9180 test vectors for DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM, base mode, through @hpke/core', async () => {
  assert.ok(HPKE.length >= 1)
  const suite = new CipherSuite({ kem: new DhkemX25519HkdfSha256(), kdf: new HkdfSha256(), aead: new Aes128Gcm() })
  for (const v of HPKE) {
    assert.deepEqual([v.mode, v.kem_id, v.kdf_id, v.aead_id], [0, 0x20, 1, 1])
    // DeriveKeyPair from the ikms gives the vector's keys; the raw private keys import to the same public keys.
    const recipient = await suite.kem.deriveKeyPair(bytes(v.ikmR))
    assert.equal(hex(await suite.kem.serializePublicKey(recipient.publicKey)), v.pkRm)
    assert.equal(hex((await encryptionKeyFromPrivate(bytes(v.skRm))).public), v.pkRm)
    assert.equal(hex((await encryptionKeyFromPrivate(bytes(v.skEm))).public), v.pkEm)
    const sender = await suite.createSenderContext({ recipientPublicKey: recipient.publicKey, info: bytes(v.info), ekm: bytes(v.ikmE) })
    assert.equal(hex(sender.enc), v.enc)
    // The recipient side with the non-extractable key the e2e core uses.
    const key = await encryptionKeyFromPrivate(bytes(v.skRm))
    const recipientKey = { privateKey: key.privateKey, publicKey: await crypto.subtle.importKey('raw', key.public, { name: 'X25519' }, true, []) }
    const receiver = await suite.createRecipientContext({ recipientKey, enc: bytes(v.enc), info: bytes(v.info) })
    for (const [i, e] of v.encryptions.entries()) {
      // One context, sequence numbers 0, 1, 2, ... in order (the nonce each vector lists).
      assert.equal(hex(await sender.seal(bytes(e.pt), bytes(e.aad))), e.ct, `encryption ${i}`)
      assert.equal(hex(await receiver.open(bytes(e.ct), bytes(e.aad))), e.pt, `decryption ${i}`)
    }
    for (const e of v.exports) {
      assert.equal(hex(await sender.export(bytes(e.exporter_context), e.L)), e.exported_value)
      assert.equal(hex(await receiver.export(bytes(e.exporter_context), e.L)), e.exported_value)
    }
  }
})
