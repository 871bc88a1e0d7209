// The end-to-end encryption core on its own (@relay/client/e2e), type-checked by `npm run typecheck`
// and from a fresh project that installed the packed tarball (tests/client_js/test_npm_package.py).
import { E2EError, fingerprint, generateEncryptionKey, generateIdentity, makeKeyRecord, openEnvelope, peek, safetyNumber, seal, verifyKeyRecord } from '@relay/client/e2e'
import type { E2EReason, EncryptionKey, Identity, KeyRecord } from '@relay/client/e2e'
import { isEnvelope } from '@relay/client'

/** alice seals to bob; bob checks the record he was given, opens, and compares the safety number. */
export async function sealAndOpen (): Promise<string | E2EReason> {
  const alice: Identity = await generateIdentity()
  const bob: Identity = await generateIdentity()
  const bobKey: EncryptionKey = await generateEncryptionKey()
  const record: KeyRecord = await makeKeyRecord('bob', bob, bobKey)
  if (!(await verifyKeyRecord('bob', record))) throw new Error('a record that does not verify')
  const body = await seal({ sender: 'alice', msgId: 'm-1', recipients: [['bob', record]], identity: alice, body: new TextEncoder().encode('hi'), padBlock: 64 })
  console.log(isEnvelope(body), peek(body).kids.get('bob'), await fingerprint('alice', alice.public))
  console.log('compare:', await safetyNumber('alice', alice.public, 'bob', bob.public))
  try {
    const plain = await openEnvelope(body, { sender: 'alice', msgId: 'm-1', me: 'bob', senderIk: alice.public, myKeys: new Map([[bobKey.kid, bobKey]]) })
    return new TextDecoder().decode(plain)
  } catch (err) {
    if (err instanceof E2EError) return err.reason
    throw err
  }
}
