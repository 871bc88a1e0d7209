// Run by test_npm_package.py from a fresh project that installed the packed @relay/client:
// the codec round-trips a frame and refuses a bad one, the e2e core seals and opens a body (its
// @hpke/core dependency installed with it), and two clients (bob, then alice) talk through the
// real broker at argv[2]. Prints one JSON line with what happened.
import { ERROR_CODES, LocalProtocolError, RelayClient, encodeFrame } from '@relay/client'
import { decodeMessage } from '@relay/client/codec'
import { generateEncryptionKey, generateIdentity, makeKeyRecord, openEnvelope, seal } from '@relay/client/e2e'
import { INBOX_KEY } from '@relay/client/store'
import { fileURLToPath } from 'node:url'

const [url, aliceToken, bobToken] = process.argv.slice(2)
const text = (bytes) => new TextDecoder().decode(bytes)

/** The detail of the next `type` event of `target`. */
function next (target, type) {
  return new Promise((resolve) => target.addEventListener(type, (event) => resolve(event.detail), { once: true }))
}

const sent = { type: 'send', id: 'm-pack', to: ['bob'], body: new TextEncoder().encode('packed'), ttl_s: 60 }
const [decoded] = decodeMessage(encodeFrame(sent))
let refused = null
try {
  encodeFrame({ type: 'send', id: 'm-pack', to: [], body: new Uint8Array() })
} catch (err) {
  refused = { local: err instanceof LocalProtocolError, invalidField: err.code === ERROR_CODES.INVALID_FIELD }
}

const identity = await generateIdentity()
const ek = await generateEncryptionKey()
const record = await makeKeyRecord('bob', identity, ek)
const envelope = await seal({ sender: 'alice', msgId: 'm-e2e', recipients: [['bob', record]], identity, body: new TextEncoder().encode('sealed in the tarball') })
const opened = await openEnvelope(envelope, { sender: 'alice', msgId: 'm-e2e', me: 'bob', senderIk: identity.public, myKeys: new Map([[ek.kid, ek]]) })

const bob = new RelayClient({ url, token: bobToken, agent: 'package-check' })
const welcomed = next(bob, 'welcome')
await bob.start()
const welcome = await welcomed
const acked = next(bob, 'acked')

const alice = new RelayClient({ url, token: aliceToken, agent: 'package-check' })
await alice.start()
const receipt = await alice.sendMessage('bob', 'hello from the tarball') // goes out once alice is connected
const message = await acked
const pending = await bob.fetchPendingMessages() // after bob's ACK on the same connection
alice.close()
bob.close()

console.log(JSON.stringify({
  resolved: fileURLToPath(import.meta.resolve('@relay/client')),
  inboxKey: INBOX_KEY,
  decoded: { ...decoded, body: text(decoded.body) },
  refused,
  e2e: text(opened),
  welcome: welcome.mailbox,
  receipt,
  message: { from: message.from, body: text(message.body), state: message.state },
  pending
}))
