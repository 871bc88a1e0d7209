// The demo chat page: pick a token, see your mailbox, send, watch delivery state.
// Everything protocol-related lives in the JS client (/js/client.js); this file is UI only.
import { RelayClient, MessageStore, defaultUrl } from '/js/client.js'

const $ = (id) => document.getElementById(id)
const TOKENS_KEY = 'relay.tokens' // [{mailbox, token}], most recent first
const CURRENT_KEY = 'relay.current'
const decoder = new TextDecoder()

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
  localStorage.setItem(CURRENT_KEY, token)
}

function forget (token) {
  localStorage.setItem(TOKENS_KEY, JSON.stringify(savedTokens().filter((t) => t.token !== token)))
  if (localStorage.getItem(CURRENT_KEY) === token) localStorage.removeItem(CURRENT_KEY)
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
  const opened = await MessageStore.open(mailbox)
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
  for (const name of ['message', 'acked', 'receipt', 'welcome']) client.addEventListener(name, render)
  await render()
  await client.start()
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

function item (entry, out) {
  const li = document.createElement('li')
  li.className = out ? 'msg out' : 'msg in'
  li.dataset.id = entry.id
  const meta = document.createElement('div')
  meta.className = 'meta'
  const when = new Date(out ? entry.created_at : entry.sent_at).toLocaleTimeString()
  if (out) {
    meta.append(`to ${entry.to.join(', ')} · ${when}`)
    if (entry.results === null) meta.append(chip('sending'))
    else {
      for (const [rcpt, r] of Object.entries(entry.results)) {
        const label = entry.to.length > 1 ? `${rcpt}: ${r.status}` : r.status
        meta.append(chip(r.code ? `${label} (${r.code})` : label, r.status))
      }
    }
  } else {
    meta.append(`from ${entry.from} · ${when}`)
    meta.append(chip(entry.state, entry.state, entry.state === 'acked' ? 'saved here and acknowledged: the broker has deleted it' : 'saved here, not yet acknowledged'))
  }
  const text = document.createElement('div')
  text.className = 'text'
  text.textContent = decoder.decode(entry.body)
  li.append(meta, text)
  return li
}

let rendering = Promise.resolve()
function render () {
  rendering = rendering.then(async () => {
    if (!session) return
    const { store } = session
    const [inbox, outbox] = await Promise.all([store.inbox(), store.outbox()])
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
    const known = new Set([...inbox.map((m) => m.from), ...outbox.flatMap((m) => m.to), ...savedTokens().map((t) => t.mailbox)])
    known.delete(session.mailbox)
    $('known-mailboxes').replaceChildren(...[...known].sort().map((m) => Object.assign(document.createElement('option'), { value: m })))
  }).catch((err) => console.error(err))
  return rendering
}

$('token-form').addEventListener('submit', (event) => {
  event.preventDefault()
  openMailbox($('token-input').value)
})

$('sign-out').addEventListener('click', () => {
  closeSession()
  localStorage.removeItem(CURRENT_KEY)
  showSignIn()
})

$('compose').addEventListener('submit', async (event) => {
  event.preventDefault()
  if (!session) return
  const to = $('to').value.split(',').map((s) => s.trim()).filter(Boolean)
  const text = $('text').value
  if (to.length === 0 || !text) return
  const ttl = $('ttl').value ? Number($('ttl').value) : undefined
  $('text').value = ''
  const sent = session.client.sendMessage(to, text, { ttl })
  setTimeout(render, 0) // show it as "sending" at once
  try {
    await sent
  } catch (err) {
    notify(`Not sent: ${err.message}`)
    render()
  }
})

$('text').addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && (event.ctrlKey || event.metaKey)) $('compose').requestSubmit()
})

// A token in the URL fragment (#token=...) opens that mailbox; otherwise the last one used.
const fromHash = new URLSearchParams(location.hash.slice(1)).get('token')
if (fromHash) history.replaceState(null, '', location.pathname)
const initial = fromHash || localStorage.getItem(CURRENT_KEY)
if (initial) openMailbox(initial)
else showSignIn()
