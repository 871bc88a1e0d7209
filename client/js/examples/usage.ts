// A small web app's use of @relay/client, type-checked by `npm run typecheck` (tsc --noEmit;
// scripts/test.sh runs it) and again from a fresh project that installed the packed tarball
// (tests/client_js/test_npm_package.py). It imports the package by its name, as an app does.
import { ERROR_CODES, MessageStore, RelayClient, RelayError, decodeMessage, deliveryStates, encodeFrame, missedStatuses, newMessageId } from '@relay/client'
import type { DeliveryState, DeliveryStatus, Frame, Receipt, ReceivedMessage } from '@relay/client'
import { INBOX_KEY, STATUS_KEY, VERSION } from '@relay/client/store'

export async function chat (url: string, token: string, mailbox: string): Promise<RelayClient> {
  const store = await MessageStore.open(mailbox, { onBlocked: () => console.warn('close the other tab') })
  const client = new RelayClient({ url, token, store })
  client.addEventListener('message', (event) => {
    const message: ReceivedMessage = event.detail
    console.log(message.from, new TextDecoder().decode(message.body), message.state)
  })
  client.addEventListener('state', (event) => console.log('connection', event.detail.state))
  client.addEventListener('status', (event) => {
    const status: DeliveryStatus = event.detail
    if (status.state === 'overflow') console.warn(`${status.count} statuses not kept (since seq ${status.first_seq})`)
    else console.log(status.id, status.recipient, status.state, new Date(status.at))
  })
  client.addEventListener('error', (event) => {
    if (event.detail.code === ERROR_CODES.CONNECTED_ELSEWHERE) console.warn('opened in another tab')
  })
  await client.start()

  const receipt: Receipt = await client.sendMessage(['bob', 'carol'], 'hello', { ttl: 3600, id: newMessageId() })
  if (receipt.code !== undefined) {
    console.warn(`not sent: ${receipt.code}`)
  } else {
    for (const [recipient, result] of Object.entries(receipt.results)) {
      console.log(recipient, result.status, result.status === 'refused' ? result.code : '')
    }
  }
  for (const entry of await store.unconfirmed()) console.log('waiting for a receipt:', entry.id, entry.to)
  for (const entry of await store.outbox()) {
    const states: Record<string, DeliveryState> = deliveryStates(entry)
    const delivered = Object.values(states).filter((state) => state === 'delivered').length
    console.log(entry.id, `${delivered} of ${Object.keys(states).length} delivered`, entry.statuses['bob']?.at ?? 'no status from bob')
  }
  console.log('statuses the relay could not keep:', missedStatuses(await store.overflows()))
  await client.sendMessage('bob', 'off the record', { notify: false })
  try {
    console.log('pending at the relay:', await client.fetchPendingMessages())
  } catch (err) {
    if (err instanceof RelayError) console.warn(err.code, err.message)
  }
  return client
}

/** The codec alone: a frame to bytes and back. */
export function roundTrip (): Frame[] {
  const bytes: Uint8Array = encodeFrame({ type: 'send', id: 'm-1', to: ['bob'], body: new Uint8Array([1, 2, 3]) })
  const frames = decodeMessage(bytes)
  for (const frame of frames) {
    if (frame.type === 'send') console.log(frame.to, frame.body.length, frame.ttl_s ?? 'default ttl')
  }
  console.log(INBOX_KEY.join(','), STATUS_KEY.join(','), VERSION)
  return frames
}

/** A frame as an app reads it: a STATUS is narrowed by its state. */
export function describe (frame: Frame): string {
  if (frame.type !== 'status') return frame.type
  return frame.state === 'overflow' ? `${frame.count} statuses folded since ${frame.first_seq}` : `${frame.id}: ${frame.state} for ${frame.recipient}`
}
