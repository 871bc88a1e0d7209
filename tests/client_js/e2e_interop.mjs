// Run by test_e2e_interop.py: the JS half of a two-way e2e exchange with wire/e2e.py, over stdin and
// stdout, one JSON line each way per step (bytes as hex).
//  1. reads { records: {mailbox: record}, bodies: [{ body, padBlock }] } (the Python side's devices);
//     makes a fresh device "alice" (non-extractable WebCrypto keys), checks each record for its own
//     mailbox and for another one, seals every body from alice to all the given mailboxes, and prints
//     { record, verified, envelopes, fingerprint, safetyNumbers }.
//  2. reads { messages: [{ sender, senderIk, msgId, body }] } (sealed by Python, some to alice) and
//     prints { opened: [{ body } | { reason }] }, opening each as alice with her one key.
import { createInterface } from 'node:readline'

import {
  E2EError,
  fingerprint,
  generateEncryptionKey,
  generateIdentity,
  makeKeyRecord,
  openEnvelope,
  safetyNumber,
  seal,
  verifyKeyRecord
} from '../../client/js/e2e.js'

const hex = (bytes) => Buffer.from(bytes).toString('hex')
const bytes = (text) => new Uint8Array(Buffer.from(text, 'hex'))
const recordOf = (r) => ({ ik: bytes(r.ik), kid: r.kid, ek: bytes(r.ek), sig: bytes(r.sig) })
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]()
const readJson = async () => JSON.parse((await lines.next()).value)

const first = await readJson()
const identity = await generateIdentity()
const ek = await generateEncryptionKey()
const record = await makeKeyRecord('alice', identity, ek)
const records = Object.entries(first.records).map(([mailbox, r]) => [mailbox, recordOf(r)])
const verified = {}
for (const [mailbox, r] of records) {
  verified[mailbox] = await verifyKeyRecord(mailbox, r)
  verified[`${mailbox}@elsewhere`] = await verifyKeyRecord(`${mailbox}@elsewhere`, r)
}
const envelopes = []
for (const [i, { body, padBlock }] of first.bodies.entries()) {
  envelopes.push(hex(await seal({ sender: 'alice', msgId: `js-${i}`, recipients: records, identity, body: bytes(body), padBlock })))
}
const safetyNumbers = {}
for (const [mailbox, r] of records) safetyNumbers[mailbox] = await safetyNumber('alice', identity.public, mailbox, r.ik)
console.log(JSON.stringify({
  record: { ik: hex(record.ik), kid: record.kid, ek: hex(record.ek), sig: hex(record.sig) },
  verified,
  envelopes,
  fingerprint: await fingerprint('alice', identity.public),
  safetyNumbers
}))

const second = await readJson()
const opened = []
for (const m of second.messages) {
  try {
    const body = await openEnvelope(bytes(m.body), { sender: m.sender, msgId: m.msgId, me: 'alice', senderIk: bytes(m.senderIk), myKeys: new Map([[ek.kid, ek]]) })
    opened.push({ body: hex(body) })
  } catch (err) {
    if (!(err instanceof E2EError)) throw err
    opened.push({ reason: err.reason })
  }
}
console.log(JSON.stringify({ opened }))
