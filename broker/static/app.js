// The demo chat page: pick a token, see your mailbox, send, watch what the relay says.
// Everything protocol-related lives in the JS client (/js/client.js); this file is UI only.
//
// Tabs. Each tab keeps its own mailbox: the tab's token is in sessionStorage (one per tab,
// kept across reloads, not shared), so two tabs can be alice and bob and stay so when
// reloaded. localStorage (shared by every tab) holds only the list of recent tokens, for the
// sign-in buttons. A new tab opens no mailbox by itself (that would take over another tab's
// session): it shows the sign-in card, unless its URL has #token=.
//
// Words. A sent message's labels say, per recipient, exactly what the relay said and no more.
// From the receipt: "queued at relay" (stored, recipient not connected) and "sent to X's open
// session" (stored and handed to a connection the recipient had open): neither means saved.
// From a delivery status (the page asks for them on every send): "delivered to X" (X's device
// saved and ACKed it; not that X has read it) or "expired before X got it". A group message also
// says how many of its recipients have it ("2 of 3 delivered"). Everything shown comes from
// IndexedDB (store.js, deliveryStates), so a status that arrived while the page was closed, or
// before a reload, shows the same.
//
// Encryption. The client encrypts end to end by default (client.js, e2e.js): every message is
// badged "encrypted", "unencrypted" (sent in the clear: the relay could read it, nothing vouches
// for its sender) or, for a received envelope that did not open or verify, "could not be
// verified" with the reason, and then its text is not shown (it is empty: never shown as words of
// its sender). The Keys panel shows this device's fingerprint and, per contact, the safety number
// to compare out of band; a contact whose key changed is flagged, with the new number and an
// Accept button (until then the client sends nothing to them). Sending to a mailbox that has
// published no key needs the "Send unencrypted" box.
import { RelayClient, MessageStore, KeyChanged, NoRecipientKey, defaultUrl, deliveryStates, missedStatuses } from '/js/client.js'
import { ERROR_CODES } from '/js/codec.js'

const $ = (id) => document.getElementById(id)
const TOKENS_KEY = 'relay.tokens' // localStorage: [{mailbox, token}], most recent first, for every tab
const TAB_TOKEN_KEY = 'relay.tab-token' // sessionStorage: this tab's token
const decoder = new TextDecoder()
const CODE_NAMES = new Map(Object.entries(ERROR_CODES).map(([name, code]) => [code, name]))

// Before each tab had its own mailbox, the last token used in any tab was kept here and
// opened by every tab on load; nothing reads it any more.
localStorage.removeItem('relay.current')

let session = null // {client, store, mailbox}

function claimsOf (token) {
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/')
    return JSON.parse(atob(part + '='.repeat((4 - (part.length % 4)) % 4)))
  } catch {
    return null
  }
}

function savedTokens () {
  try { return JSON.parse(localStorage.getItem(TOKENS_KEY)) || [] } catch { return [] }
}

function remember (mailbox, token) {
  const list = savedTokens().filter((t) => t.mailbox !== mailbox)
  list.unshift({ mailbox, token })
  localStorage.setItem(TOKENS_KEY, JSON.stringify(list.slice(0, 12)))
  sessionStorage.setItem(TAB_TOKEN_KEY, token)
}

function forget (token) {
  localStorage.setItem(TOKENS_KEY, JSON.stringify(savedTokens().filter((t) => t.token !== token)))
  if (sessionStorage.getItem(TAB_TOKEN_KEY) === token) sessionStorage.removeItem(TAB_TOKEN_KEY)
}

/** The sign-in card; with an error, the token that failed stays in the box to be fixed. */
function showSignIn (error, token = '') {
  $('token-input').value = token
  $('who').hidden = true
  $('chat').hidden = true
  $('sign-in').hidden = false
  $('token-error').hidden = !error
  $('token-error').textContent = error || ''
  const list = savedTokens()
  $('saved-tokens-block').hidden = list.length === 0
  $('saved-tokens').replaceChildren(...list.map(({ mailbox, token }) => {
    const li = document.createElement('li')
    const button = document.createElement('button')
    button.type = 'button'
    button.textContent = mailbox
    button.title = `Open ${mailbox}'s mailbox`
    button.addEventListener('click', () => openMailbox(token))
    li.append(button)
    return li
  }))
}

async function openMailbox (token) {
  token = token.trim()
  const claims = claimsOf(token)
  if (!claims || typeof claims.sub !== 'string') return showSignIn('That does not look like a Relay token.', token)
  if (claims.role === 'operator') return showSignIn('This is an operator token: it has no mailbox. Use a mailbox token.', token)
  if (claims.exp && claims.exp * 1000 < Date.now()) return showSignIn('This token has expired: make a new one.', token)
  if (session) closeSession()
  const mailbox = claims.sub
  // Test hooks, set before the page loads: holdAcks (never ACK), wrapStore(store) -> a store to use instead.
  const hooks = window.relayTestHooks || {}
  let opened
  try {
    opened = await MessageStore.open(mailbox, {
      onBlocked: () => showSignIn(`Upgrading this browser's store for ${mailbox}: close the other tabs of this page that have it open.`, token)
    })
  } catch (err) {
    return showSignIn(`Could not open this browser's message store for ${mailbox}: ${err}`, token)
  }
  const store = hooks.wrapStore ? hooks.wrapStore(opened) : opened
  const client = new RelayClient({
    url: defaultUrl(Number(document.querySelector('meta[name="relay-ws-port"]').content)),
    token,
    store,
    agent: 'relay-demo',
    beforeAck: hooks.holdAcks ? () => new Promise(() => {}) : null
  })
  session = { client, store, mailbox }
  window.relay = session // for the browser tests and the curious
  remember(mailbox, token)
  $('sign-in').hidden = true
  $('token-error').hidden = true
  $('who').hidden = false
  $('chat').hidden = false
  $('mailbox-name').textContent = mailbox
  client.addEventListener('state', ({ detail }) => {
    $('conn-state').dataset.state = detail.state
    $('conn-state').textContent = { open: 'online', connecting: 'connecting…', closed: 'offline' }[detail.state]
  })
  client.addEventListener('error', ({ detail }) => {
    console.warn('relay:', detail.code, detail.message)
    if ([2001, 2002].includes(detail.code)) {
      closeSession()
      forget(token)
      showSignIn(`The broker refused the token (${detail.code}): ${detail.message}`, token)
    } else if (detail.code === 4001) {
      $('conn-state').textContent = 'opened elsewhere'
      notify('This mailbox was opened in another tab or client: this page has stopped. Reload to take it back.')
    } else {
      notify(detail.code ? `${detail.message} (error ${detail.code})` : detail.message)
    }
  })
  for (const name of ['message', 'acked', 'receipt', 'status', 'welcome']) client.addEventListener(name, render)
  for (const name of ['contact', 'welcome']) client.addEventListener(name, renderKeys)
  $('own-fingerprint').textContent = '…'
  $('contacts').replaceChildren()
  $('keys-changed').hidden = true
  await render()
  await client.start()
  await renderKeys()
}

let noticeTimer = null
/** Show a problem under the compose form for a while (the console has the details). */
function notify (text) {
  clearTimeout(noticeTimer)
  $('notice').textContent = text
  $('notice').hidden = false
  noticeTimer = setTimeout(() => { $('notice').hidden = true }, 10000)
}

function closeSession () {
  clearTimeout(noticeTimer)
  $('notice').hidden = true
  if (!session) return
  session.client.close()
  session.store.close()
  session = null
  window.relay = null
}

function chip (text, cls = text, title = '') {
  const span = document.createElement('span')
  span.className = `chip ${cls}`
  span.textContent = text
  if (title) span.title = title
  return span
}

/** A status's `at` (Unix ms) as the page shows times. */
const timeOf = (ms) => new Date(ms).toLocaleTimeString()

/** What a label still waiting for a status goes on to say, for this entry. */
function untilStatus (entry, rcpt) {
  return entry.notify
    ? `It does not say that ${rcpt}'s device has saved it: when it has, this label says "delivered to ${rcpt}".`
    : `It does not say that ${rcpt}'s device has saved it, and it will not change: this message asked for no delivery status.`
}

/** A refusal code as words, with its number. */
function refusal (code) {
  const words = {
    3001: 'mailbox full',
    3002: 'mailbox full (bytes)',
    3003: 'relay full',
    3004: session?.client.welcome ? `more than ${session.client.welcome.max_recipients} recipients` : 'too many recipients',
    3005: 'id used by another sender',
    3006: 'not a mailbox name',
    3007: 'message too large',
    3008: 'relay store unreachable, maybe not stored: send again later'
  }[code]
  return `${words ?? CODE_NAMES.get(code) ?? 'refused'} (${code})`
}

/**
 * The chip for one recipient, in the state deliveryStates gives: a status's word when there is
 * one, else the receipt's, said plainly.
 */
function recipientChip (entry, rcpt, state) {
  const status = entry.statuses[rcpt]
  const result = entry.results?.[rcpt]
  switch (state) {
    case 'delivered':
      return chip(`delivered to ${rcpt}`, 'delivered',
        `${rcpt}'s device saved it and acknowledged it at ${timeOf(status.at)}; the relay has deleted its copy. It does not say that ${rcpt} has read it.`)
    case 'expired':
      return chip(`expired before ${rcpt} got it`, 'expired',
        `It expired at the relay at ${timeOf(status.at)} before ${rcpt}'s device had saved it: ${rcpt} never got it. Send it again if it still matters.`)
    case 'sending':
      return chip(`sending to ${rcpt}…`, 'sending', 'Not yet answered by the relay. It goes out again, with the same id, after a reconnect or a reload; the relay never stores it twice.')
    case 'refused':
      return chip(`not sent to ${rcpt}: ${refusal(result.code)}`, 'refused',
        `The relay refused it for ${rcpt} and stored nothing for ${rcpt} (${CODE_NAMES.get(result.code) ?? 'code'} ${result.code}).`)
  }
  switch (result.status) { // "queued": stored at the relay, not yet saved on the device
    case 'queued':
      return chip(`queued at relay for ${rcpt}`, 'queued',
        `Stored at the relay; ${rcpt} had no open session. The relay delivers it when ${rcpt} connects (until it expires). ${untilStatus(entry, rcpt)}`)
    case 'delivered':
      return chip(`sent to ${rcpt}'s open session`, 'sent',
        `Stored at the relay and handed to a session ${rcpt} had open. If that session ends before ${rcpt}'s device has saved it, the relay delivers it again. ${untilStatus(entry, rcpt)}`)
    default:
      return chip(`${rcpt}: relay already had it`, 'duplicate',
        `A resend: the relay already had this message from you for ${rcpt}, so nothing new was stored. ${untilStatus(entry, rcpt)}`)
  }
}

/**
 * For a message to several recipients: how many of those it was not refused for have it on
 * their device; null for a message to fewer than two of them (its one chip says it all).
 */
function summaryChip (states) {
  const all = Object.values(states).filter((s) => s !== 'refused')
  if (all.length < 2) return null
  const delivered = all.filter((s) => s === 'delivered').length
  const expired = all.filter((s) => s === 'expired').length
  const words = `${delivered} of ${all.length} delivered` + (expired ? ` · ${expired} expired` : '')
  return chip(words, delivered === all.length ? 'summary all' : 'summary',
    `The devices of ${delivered} of the ${all.length} recipients it was sent to have saved it` +
    `${expired ? `; for ${expired} it expired before they did` : ''}.`)
}

/** Why a received envelope did not open, in words (docs/e2e.md, "Opening"). */
const FAILURES = {
  malformed: 'not a well-formed envelope',
  mismatch: 'sealed as another message or by another sender: a replay',
  not_for_me: 'not sealed to this mailbox: a replay from another conversation',
  no_sender_key: 'the sender has published no key',
  key_changed: "signed by a key that is not the sender's pinned one",
  bad_signature: 'the signature does not verify',
  unknown_key: 'sealed to a key this browser does not have (any more)',
  decrypt_failed: 'it does not decrypt'
}

/** The badge saying whether a message was end-to-end encrypted (and, received, verified). */
function securityChip (entry, out) {
  switch (entry.security) {
    case 'e2e':
      return chip('encrypted', 'security e2e', out
        ? 'End-to-end encrypted to the recipients\' pinned keys: the relay cannot read it.'
        : `End-to-end encrypted, and signed by ${entry.from}'s pinned key (see Keys): the relay could not read it or change it.`)
    case 'failed':
      return chip(`could not be verified: ${entry.reason}`, 'security failed', FAILURES[entry.reason] ?? entry.reason)
    default:
      return chip('unencrypted', 'security plaintext', out
        ? 'Sent in the clear: the relay could read it.'
        : `Sent in the clear: the relay could read it, and nothing vouches that ${entry.from} wrote it.`)
  }
}

function item (entry, out) {
  const li = document.createElement('li')
  li.className = out ? 'msg out' : 'msg in'
  li.dataset.id = entry.id
  const meta = document.createElement('div')
  meta.className = 'meta'
  const when = new Date(out ? entry.created_at : entry.sent_at).toLocaleTimeString()
  if (out) {
    meta.append(`to ${entry.to.join(', ')} · ${when}`)
    if (entry.code !== undefined) {
      meta.append(chip(`not sent: ${refusal(entry.code)}`, 'refused',
        `The relay refused the whole message before looking at any recipient: nothing was stored for anyone (${CODE_NAMES.get(entry.code) ?? 'code'} ${entry.code}).`))
    } else {
      const states = deliveryStates(entry)
      const recipients = Object.keys(states)
      const summary = summaryChip(states)
      if (summary) meta.append(summary)
      if (recipients.every((r) => states[r] === 'sending')) {
        meta.append(chip('sending…', 'sending', 'Not yet answered by the relay. It goes out again, with the same id, after a reconnect or a reload; the relay never stores it twice.'))
      } else {
        for (const rcpt of recipients) meta.append(recipientChip(entry, rcpt, states[rcpt]))
      }
    }
  } else {
    li.dataset.from = entry.from
    meta.append(`from ${entry.from} · ${when}`)
    meta.append(chip(entry.state, entry.state, entry.state === 'acked' ? 'Saved in this browser and acknowledged: the relay has deleted its copy.' : 'Saved in this browser, not yet acknowledged: the relay still holds it.'))
  }
  li.dataset.security = entry.security
  meta.append(securityChip(entry, out))
  const text = document.createElement('div')
  text.className = 'text'
  if (entry.security === 'failed') {
    text.classList.add('failed')
    text.textContent = `This message could not be opened or verified (${FAILURES[entry.reason] ?? entry.reason}); its text is not shown.`
  } else {
    text.textContent = decoder.decode(entry.body)
  }
  li.append(meta, text)
  return li
}

// One render at a time, from IndexedDB. Calls made while one is waiting to start join it, so a
// burst of events (e.g. thousands of statuses on connect) costs a few renders, not one each.
let rendering = Promise.resolve()
let queuedRender = null
function render () {
  if (queuedRender) return queuedRender
  queuedRender = rendering.then(async () => {
    queuedRender = null
    if (!session) return
    const { store } = session
    const [inbox, outbox, overflows] = await Promise.all([store.inbox(), store.outbox(), store.overflows()])
    const entries = [
      ...inbox.map((m) => ({ at: m.received_at, node: () => item(m, false) })),
      ...outbox.map((m) => ({ at: m.created_at, node: () => item(m, true) }))
    ].sort((a, b) => a.at - b.at)
    const list = $('messages')
    const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40
    list.replaceChildren(...entries.map((e) => e.node()))
    if (atBottom) list.scrollTop = list.scrollHeight
    $('empty').hidden = entries.length > 0
    $('counts').textContent = `${inbox.length} received · ${outbox.length} sent`
    showOverflow(overflows)
    const known = new Set([...inbox.map((m) => m.from), ...outbox.flatMap((m) => m.to), ...savedTokens().map((t) => t.mailbox)])
    known.delete(session.mailbox)
    $('known-mailboxes').replaceChildren(...[...known].sort().map((m) => Object.assign(document.createElement('option'), { value: m })))
  }).catch((err) => console.error(err))
  rendering = queuedRender
  return rendering
}

/** The Keys panel: this device's fingerprint, and each contact's safety number (a changed key flagged, with Accept). */
let renderingKeys = Promise.resolve()
function renderKeys () {
  renderingKeys = renderingKeys.then(async () => {
    if (!session) return
    const { client } = session
    const [own, contacts] = await Promise.all([client.fingerprint(), client.contacts()])
    if (session?.client !== client) return
    $('own-fingerprint').textContent = own ?? '…'
    const changed = contacts.filter((c) => c.pending_ik !== null && c.mailbox !== session.mailbox)
    $('keys-changed').hidden = changed.length === 0
    $('keys-changed').textContent = `key changed: ${changed.map((c) => c.mailbox).join(', ')}`
    $('contacts').replaceChildren(...contacts.filter((c) => c.mailbox !== session.mailbox).map((c) => {
      const li = document.createElement('li')
      li.dataset.mailbox = c.mailbox
      const name = document.createElement('strong')
      name.textContent = c.mailbox
      const number = Object.assign(document.createElement('span'), { className: 'number pinned', textContent: c.safety_number })
      number.title = `${c.mailbox}'s fingerprint: ${c.fingerprint} (pinned ${new Date(c.pinned_at).toLocaleString()})`
      li.append(name, ' · safety number', number)
      if (c.pending_ik !== null) {
        li.classList.add('changed')
        const warning = chip('key changed', 'changed', `The relay now shows another key for ${c.mailbox}: nothing is sent to ${c.mailbox} until you accept it. ` +
          'Accept it only once the new safety number matches the one on their device.')
        const next = Object.assign(document.createElement('span'), { className: 'number pending', textContent: c.pending_safety_number })
        const accept = Object.assign(document.createElement('button'), { type: 'button', className: 'accept', textContent: 'Accept new key' })
        accept.addEventListener('click', async () => {
          try {
            await client.acceptKey(c.mailbox)
          } catch (err) {
            notify(`Could not accept the key: ${err.message}`)
          }
          renderKeys()
        })
        li.append(' ', warning, ' new safety number', next, accept)
      }
      return li
    }))
  }).catch((err) => console.error(err))
  return renderingKeys
}

/** Statuses the relay did not keep for this mailbox (its bound), said once above the timeline. */
function showOverflow (overflows) {
  const missed = missedStatuses(overflows)
  $('overflow').hidden = missed === 0
  $('overflow').textContent = missed === 0
    ? ''
    : `The relay could not keep ${missed} delivery ${missed === 1 ? 'status' : 'statuses'} for you (too many were waiting while this mailbox was away): ` +
      `some sent messages may say "queued" here although they were delivered or expired. Latest at ${timeOf(Math.max(...overflows.map((o) => o.at)))}.`
}

$('token-form').addEventListener('submit', (event) => {
  event.preventDefault()
  openMailbox($('token-input').value)
})

$('sign-out').addEventListener('click', () => {
  closeSession()
  sessionStorage.removeItem(TAB_TOKEN_KEY)
  showSignIn()
})

$('compose').addEventListener('submit', async (event) => {
  event.preventDefault()
  if (!session) return
  const to = $('to').value.split(',').map((s) => s.trim()).filter(Boolean)
  const text = $('text').value
  if (to.length === 0 || !text) return
  const ttl = $('ttl').value ? Number($('ttl').value) : undefined
  const plaintext = $('plaintext').checked
  $('text').value = ''
  const sent = session.client.sendMessage(to, text, { ttl, plaintext })
  setTimeout(render, 0) // show it as "sending" at once
  try {
    const receipt = await sent
    if (receipt.code !== undefined) notify(`Not sent to anyone: the relay refused it, ${refusal(receipt.code)}.`)
  } catch (err) {
    // Refused before it was stored or sent (e.g. a recipient name longer than 64 characters): keep the text.
    if (!$('text').value) $('text').value = text
    if (err instanceof KeyChanged) {
      notify(`Not sent: the key of ${err.changes.map((c) => c.mailbox).join(', ')} has changed. Compare the new safety number under Keys, and Accept it to send.`)
      renderKeys()
    } else if (err instanceof NoRecipientKey) {
      notify(`Not sent: ${err.mailboxes.join(', ')} ${err.mailboxes.length === 1 ? 'has' : 'have'} published no key, so it cannot be encrypted. Tick "Send unencrypted" to send it in the clear.`)
    } else {
      notify(`Not sent: ${err.message}`)
    }
    render()
  }
})

$('text').addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && (event.ctrlKey || event.metaKey)) $('compose').requestSubmit()
})

/** A token in the URL fragment (#token=...), taken out of the URL (and so out of history and screenshots). */
function takeTokenFromHash () {
  const token = new URLSearchParams(location.hash.slice(1)).get('token')
  if (token) history.replaceState(null, '', location.pathname + location.search)
  return token
}

// #token= opens that mailbox in this tab; otherwise this tab's own mailbox (after a reload);
// otherwise the sign-in card with the recent mailboxes.
const initial = takeTokenFromHash() || sessionStorage.getItem(TAB_TOKEN_KEY)
if (initial) openMailbox(initial)
else showSignIn()

window.addEventListener('hashchange', () => {
  const token = takeTokenFromHash()
  if (token) openMailbox(token)
})
