// The Relay browser client: the protocol over a WebSocket, with an IndexedDB store.
//
// Theory of operation. A WebSocket binary message carries one or more whole frames back to
// back, each with its 4-byte length prefix (protocol.md 2.5): every frame of a message is
// handled in order, and a message that ends inside a frame is refused (1001, like any
// framing error: the socket is closed). Outgoing frames are encoded (so checked) at once
// and queued; at the end of the current turn (a microtask) the queue goes out packed into as
// few messages as WELCOME's `max_frame_bytes` + 4 allows, in order, no frame split, so a burst
// of SENDs and ACKs made in one turn is one message. HELLO, the resends after WELCOME and
// what precedes BYE are flushed at once. Before WELCOME every frame goes alone.
//
// The client says HELLO, waits for WELCOME, and the broker then pushes every pending
// message followed by DRAINED. Each DELIVER goes through processRelayMessage: saved in
// IndexedDB first, then ACKed. A received message is identified by (sender, id): the store
// de-duplicates a redelivery of the same sender's message, while another sender's message
// that reuses an id (possible once the first one has expired) is a new message. A failed save
// sends no ACK, so the broker delivers the message again later; a failed ACK breaks nothing,
// because ACKs are idempotent and a redelivery is recognised by its (sender, id). Without a
// store nothing is de-duplicated: every DELIVER, redeliveries included, is announced as a
// `message` event.
//
// Sends are kept in a table keyed by message id until their RECEIPT arrives (the ids are this
// mailbox's own, so the id alone identifies a send). A send is checked (encoded) before it is
// stored or tracked, so a frame the protocol forbids is refused at once. Sends made
// while disconnected wait there; on every (re)connect each unconfirmed send goes out
// again with the same id, which the broker de-duplicates. The outbox is also written to
// IndexedDB (when a store is given), so a reload resends what was never confirmed.
//
// Delivery status (protocol.md, "Delivery status"). Sends ask for it by default (`notify`): for
// each recipient the message was stored for, the broker later queues one STATUS in this
// mailbox's own lane, "delivered" when the recipient's device ACKed it, "expired" when it
// expired un-ACKed, or "overflow" (how many statuses the broker folded instead of keeping them).
// Statuses follow the messages' rule: saved in IndexedDB first (store.saveStatus), then
// STATUS_ACKed by seq; a failed save sends no STATUS_ACK, so the broker sends the status again
// (on reconnect, or after a PULL); a redelivered status (same seq) is recognised by the store,
// ACKed again and not announced again. A status may arrive before the receipt of its message,
// or for a message this browser never sent: it is saved (and ACKed) all the same.
//
// End-to-end encryption (docs/e2e.md), on by default (`e2e`). The device's keys (an Ed25519
// identity key, an X25519 encryption key with its kid, retired encryption keys) are made once,
// by e2e.js, as non-extractable CryptoKeys, and kept in IndexedDB (without a store: in memory,
// for the client's lifetime, so contacts see a key change after a reload). On every connect the
// first frame after WELCOME is KEY_PUT with this mailbox's signed key record: every other frame
// written meanwhile (resends, ACKs, a KEY_GET) waits until it is out. Retired encryption keys are
// deleted WELCOME's max_ttl_s after they were retired (nothing can still be queued under them).
//
// A send looks the recipients' records up (one KEY_GET for those not looked up on this
// connection yet), checks each record's signature for its mailbox, and compares its identity
// key with the contact's pinned one: none pinned -> pinned now (trust on first use); another ->
// the contact gets it as `pending_ik` and the send is refused (KeyChanged) until acceptKey();
// no record -> refused (NoRecipientKey) unless the send says `plaintext`. Refusals store and
// send nothing, to anyone. The envelope (seal) is stored with the outbox entry, so a resend
// after a reconnect or reload sends the same bytes.
//
// A DELIVER is opened before it is saved, in the order of docs/e2e.md "Opening": a body without
// the magic is "plaintext"; an envelope is checked for shape, sender and id, and for this
// mailbox among its recipients (from its header, before any lookup), then against the sender's
// pinned identity key (none -> the directory's record, verified and pinned; the sender's key
// changed -> the directory is asked whether it shows that key, which then becomes the contact's
// pending key), then opened. One that does not open is saved all the same, with an empty body,
// security "failed" and the reason, and ACKed: it is never shown as text from its sender. A
// lookup that could not be made (the connection went) saves nothing and ACKs nothing: the
// broker delivers the message again.
//
// The connection is re-opened with exponential backoff and full jitter, except after an
// error that a retry cannot fix (bad or expired token, another tab took the mailbox over).
//
// Token refresh (protocol.md rule 22): a session ends when its token expires (ERROR 2002) unless
// the client sends a newer one in a REFRESH. With a `refreshToken` callback the client asks it for
// one once three quarters of the session's time (WELCOME's, then REFRESHED's `expires_in_s`) have
// passed, again after a quarter of what is left if it fails, and before reconnecting after a 2002,
// which is then not fatal; the latest token is also the next HELLO's.
//
// Events (an EventTarget; each event's `detail`):
//   state     {state: "connecting" | "open" | "closed", error?}
//   welcome   the WELCOME frame
//   message   a newly saved inbox record ({id, from, body, ..., state})
//   acked     the inbox record after its ACK was sent
//   receipt   the receipt as sendMessage resolves it: {id, results} or {id, code} (a SEND
//             refused as a whole; with 3010 RATE_LIMITED also retry_after_ms); also saved on the outbox record
//   status    a newly saved status: {seq, state: "delivered" | "expired", at, id, recipient}
//             or {seq, state: "overflow", count, first_seq, at} (how many statuses the broker folded)
//   drained   {pending}
//   error     {code, message, close, retry_after_ms?} for ERROR frames and local failures (after 4006
//             CONNECTION_RATE_LIMITED the reconnect waits at least retry_after_ms)
//   contact   a contact record after it changed: pinned (first use), a changed key seen (pending_ik), accepted
//   keys      {kid} after this device's key record was published (key_put accepted)
//   refreshed {expires_in_s} after the broker took a token from refreshToken

import { PROTOCOL_VERSION, ERROR_CODES, LocalProtocolError, decodeMessage, encodeFrame, packFrames } from './codec.js'
import {
  E2EError, fingerprint, generateEncryptionKey, generateIdentity, isEnvelope, makeKeyRecord, openEnvelope, peek, safetyNumber,
  seal, verifyKeyRecord
} from './e2e.js'

export { MessageStore, deliveryStates, missedStatuses } from './store.js'

const FATAL = new Set([
  ERROR_CODES.INVALID_TOKEN,
  ERROR_CODES.TOKEN_EXPIRED,
  ERROR_CODES.TOKEN_MISMATCH,
  ERROR_CODES.UNSUPPORTED_VERSION,
  ERROR_CODES.CONNECTED_ELSEWHERE
])

const MIN_REFRESH_INTERVAL_MS = 250 // refreshToken is asked at most this often
const MAX_TIMER_MS = 2 ** 31 - 1 // setTimeout's longest delay (~24.8 days); longer waits are re-armed

/** A random 128-bit message id (32 hex digits). */
export function newMessageId () {
  const bytes = crypto.getRandomValues(new Uint8Array(16))
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('')
}

/** The broker's WebSocket URL as served next to the demo page: ws://<page host>:<wsPort>/relay. */
export function defaultUrl (wsPort = 7781, location = globalThis.location) {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:'
  return `${scheme}//${location.hostname}:${wsPort}/relay`
}

export class RelayError extends Error {
  constructor (code, message) {
    super(message)
    this.name = 'RelayError'
    this.code = code
  }
}

/** A send refused because a recipient's identity key is not the one pinned: nothing was sent to anyone. */
export class KeyChanged extends Error {
  /** `changes`: [{mailbox, pinned, current}] fingerprints of the pinned key and of the one the directory shows now. */
  constructor (changes) {
    const first = changes[0]
    super(`the key of ${first.mailbox} has changed (pinned ${first.pinned}, now ${first.current}): ` +
      'compare the new safety number, then acceptKey() to send to it')
    this.name = 'KeyChanged'
    this.mailbox = first.mailbox
    this.pinnedFingerprint = first.pinned
    this.newFingerprint = first.current
    this.changes = changes
  }
}

/** A send refused because recipients have published no key: nothing sent; `{plaintext: true}` sends in the clear. */
export class NoRecipientKey extends Error {
  constructor (mailboxes) {
    super(`no published key for ${mailboxes.join(', ')}: not sent (send it with {plaintext: true} to send it unencrypted)`)
    this.name = 'NoRecipientKey'
    this.mailboxes = mailboxes
  }
}

/** A send refused because the directory served a key record whose signature does not verify for its mailbox. */
export class InvalidKeyRecord extends Error {
  constructor (mailbox) {
    super(`the relay served a key record for ${mailbox} that does not verify: not sent`)
    this.name = 'InvalidKeyRecord'
    this.mailbox = mailbox
  }
}

const equalBytes = (a, b) => a.length === b.length && a.every((x, i) => x === b[i])
const EMPTY = new Uint8Array(0)

export class RelayClient extends EventTarget {
  /**
   * @param {object} options
   * @param {string} options.url      ws://host:port/relay, or wss://host:port/relay (TLS; a page served over https must use it)
   * @param {string} options.token    a Relay token (JWT)
   * @param {MessageStore} [options.store]  where messages are saved; without one nothing persists and nothing is de-duplicated
   * @param {number} [options.minBackoffMs=250]  first reconnect delay (before jitter)
   * @param {number} [options.maxBackoffMs=15000]
   * @param {boolean} [options.notify=true]  ask for delivery statuses on every send (sendMessage can override it)
   * @param {boolean} [options.e2e=true]  end-to-end encryption: publish this device's key, seal sends, open envelopes
   * @param {number} [options.padBlock=256]  pad sealed bodies to a multiple of this many bytes (1: no padding)
   * @param {(msg) => Promise<void>} [options.beforeAck]  awaited between save and ACK (tests use it)
   * @param {() => Promise<string>} [options.refreshToken]  a newer token for the same mailbox from the app's issuer:
   *   the session then outlives its token (REFRESH), and an expired token is renewed before reconnecting
   */
  constructor ({ url, token, store = null, agent = 'relay-js', notify = true, e2e = true, padBlock = 256, minBackoffMs = 250, maxBackoffMs = 15000, beforeAck = null, refreshToken = null, WebSocketImpl = globalThis.WebSocket }) {
    super()
    this.url = url
    this.token = token
    this.store = store
    this.agent = agent
    this.notify = notify
    this.e2e = e2e
    this.padBlock = padBlock
    this.minBackoffMs = minBackoffMs
    this.maxBackoffMs = maxBackoffMs
    this.beforeAck = beforeAck
    if (refreshToken !== null && typeof refreshToken !== 'function') throw new TypeError('refreshToken must be a function returning a token')
    this.refreshToken = refreshToken
    this.WebSocketImpl = WebSocketImpl
    this.state = 'closed'
    this.welcome = null
    this.mailbox = null
    this._ws = null
    this._stopped = true
    this._attempt = 0
    this._retryTimer = null
    this._retryAfterMs = 0 // from an ERROR 4006: how long the next reconnect must wait at least
    this._pingTimer = null
    this._refreshTimer = null
    this._refreshDue = 0 // Date.now() at which to ask refreshToken
    this._expiresAt = 0 // Date.now() at which the broker ends the session for its token's expiry
    this._tokenStale = false // the broker said the token expired: renew it before the next HELLO
    this._lastSent = 0
    this._outgoing = [] // encoded frames queued in this turn, sent by _flush
    this._flushQueued = false
    this._flushSoon = () => { this._flushQueued = false; this._flush() }
    this._sends = new Map() // id -> {frame, resolve, reject}
    this._statsWaiters = []
    this._cleanupWaiters = []
    this._keyPutWaiters = [] // resolved by KEY_PUT_RESULTs, in order
    this._keyGetWaiters = [] // resolved by KEY_GET_RESULTs, in order
    this._pullWaiters = [] // resolved by DRAINED frames after the PULL was sent
    this._connectDrainExpected = false
    // End-to-end encryption state (see the theory of operation).
    this._keysLoaded = null // a promise: the device's keys and the contacts, from the store or made anew
    this._identity = null // {privateKey, public}
    this._encKeys = new Map() // kid -> {kid, privateKey, public, created_at, retired_at}: what openEnvelope takes
    this._contacts = new Map() // mailbox -> {mailbox, ik, pinned_at, pending_ik, pending_at}
    this._records = new Map() // `${mailbox} ${kid}` -> this device's signed key record
    this._directory = new Map() // mailbox -> Promise<{record, valid} | null>: what this connection's KEY_GETs found
    this._held = null // frames written after WELCOME while the KEY_PUT is being made (null: none held)
    this._openWaiters = [] // sends waiting for a connection to look keys up on
  }

  // ---------------------------------------------------------------- lifecycle

  /** Start connecting (and keep reconnecting) ; resends sends left unconfirmed in the store. */
  async start () {
    if (!this._stopped) return
    this._stopped = false
    if (this.e2e) await this._loadKeys()
    if (this.store) {
      for (const entry of await this.store.unconfirmed()) {
        // Nobody awaits these promises; a refusal is reported as an `error` event instead.
        if (!this._sends.has(entry.id)) this._track(this._sendFrame(entry)).catch(() => {})
      }
    }
    this._connect()
  }

  /** Say BYE and stop reconnecting. Pending sends stay queued (and in the store). */
  close () {
    this._stopped = true
    clearTimeout(this._retryTimer)
    if (this._ws && this.state === 'open') this._write({ type: 'bye' })
    this._flush() // what is queued, then BYE, before the close
    if (this._ws) this._ws.close(1000)
    this._teardown()
    this._rejectOpenWaiters(new RelayError(0, 'client closed'))
    this._setState('closed')
  }

  _rejectOpenWaiters (err) {
    for (const w of this._openWaiters.splice(0)) w.reject(err)
  }

  _setState (state, extra = {}) {
    if (this.state === state && !extra.error) return
    this.state = state
    this.dispatchEvent(new CustomEvent('state', { detail: { state, ...extra } }))
  }

  _connect () {
    if (this._stopped) return
    this._setState('connecting')
    if (this._tokenStale) {
      this._newToken().then(() => {
        this._tokenStale = false
        if (!this._stopped && this._ws === null) this._openSocket()
      }, (err) => {
        this._emitError({ code: 0, message: `refreshToken failed: ${err?.message ?? err}`, close: false })
        this._scheduleReconnect(err)
      })
      return
    }
    this._openSocket()
  }

  _openSocket () {
    let ws
    try {
      ws = new this.WebSocketImpl(this.url)
    } catch (err) {
      this._scheduleReconnect(err)
      return
    }
    ws.binaryType = 'arraybuffer'
    this._ws = ws
    ws.onopen = () => {
      this._write({ type: 'hello', version: PROTOCOL_VERSION, token: this.token, agent: this.agent })
      this._flush()
    }
    ws.onmessage = (event) => this._onMessage(event.data)
    ws.onclose = () => {
      if (this._ws !== ws) return
      this._teardown()
      this._scheduleReconnect()
    }
    ws.onerror = () => {} // onclose follows
  }

  _teardown () {
    clearInterval(this._pingTimer)
    this._pingTimer = null
    clearTimeout(this._refreshTimer)
    this._refreshTimer = null
    if (this._ws) {
      this._ws.onopen = this._ws.onmessage = this._ws.onclose = null
    }
    this._ws = null
    this.welcome = null
    this._outgoing = [] // unsent frames of a connection that is gone (sends go out again on WELCOME)
    this._held = null
    const lost = new RelayError(0, 'connection lost')
    for (const w of this._statsWaiters.splice(0)) w.reject(lost)
    for (const w of this._cleanupWaiters.splice(0)) w.reject(lost)
    for (const w of this._keyPutWaiters.splice(0)) w.reject(lost)
    for (const w of this._keyGetWaiters.splice(0)) w.reject(lost)
    for (const w of this._pullWaiters.splice(0)) w.reject(lost)
    // this._sends stay: they go out again on the next WELCOME.
  }

  _scheduleReconnect (error) {
    if (this._stopped) {
      this._setState('closed')
      return
    }
    this._setState('closed', error ? { error } : {})
    const ceiling = Math.min(this.maxBackoffMs, this.minBackoffMs * 2 ** this._attempt)
    this._attempt += 1
    // Full jitter, but never sooner than a rate-limited broker asked for (ERROR 4006 retry_after_ms).
    const delay = Math.max(Math.random() * ceiling, this._retryAfterMs)
    this._retryAfterMs = 0
    this._retryTimer = setTimeout(() => this._connect(), delay)
  }

  /** Close the socket as if the network dropped (the client reconnects). For tests and demos. */
  dropConnection () {
    if (this._ws) this._ws.close(4000, 'dropped')
  }

  // ---------------------------------------------------------------- wire

  /**
   * Queue a frame for the end of this turn; false if there is no open socket. Throws LocalProtocolError.
   * While the KEY_PUT after WELCOME is being made, every other frame is held (in order) until it is out.
   */
  _write (frame) {
    const ws = this._ws
    if (!ws || ws.readyState !== 1) return false
    const encoded = encodeFrame(frame)
    if (this._held !== null && frame.type !== 'key_put') {
      this._held.push(encoded)
      this._lastSent = Date.now()
      return true
    }
    this._outgoing.push(encoded)
    if (!this._flushQueued) {
      this._flushQueued = true
      queueMicrotask(this._flushSoon)
    }
    this._lastSent = Date.now()
    return true
  }

  /** Send what is queued, packed into messages of at most max_frame_bytes + 4 (one frame each before WELCOME). */
  _flush () {
    if (this._outgoing.length === 0) return
    const frames = this._outgoing
    this._outgoing = []
    const ws = this._ws
    if (!ws || ws.readyState !== 1) return // the socket went in this turn: lost like any write to it
    const limit = this.welcome ? this.welcome.max_frame_bytes + 4 : 0
    for (const message of packFrames(frames, limit)) ws.send(message)
  }

  _onMessage (data) {
    const ws = this._ws
    let frames
    try {
      if (typeof data === 'string') throw new RelayError(ERROR_CODES.MALFORMED_FRAME, 'a text message carries no frame')
      // No frame-size limit here: the browser already holds the whole message.
      frames = decodeMessage(new Uint8Array(data), { maxFrameBytes: Infinity })
    } catch (err) {
      this._emitError({ code: err.code || ERROR_CODES.MALFORMED_FRAME, message: err.message, close: true })
      if (this._ws) this._ws.close(1002)
      return
    }
    for (const frame of frames) {
      if (this._ws !== ws) return // closed by a handler (close()): the rest is not for this client any more
      this._onFrame(frame)
    }
  }

  _onFrame (frame) {
    switch (frame.type) {
      case 'welcome': return this._onWelcome(frame)
      case 'deliver': return void this.processRelayMessage(frame)
      case 'receipt': return void this._onReceipt(frame)
      case 'status': return void this.processStatus(frame)
      case 'drained': return this._onDrained(frame)
      case 'stats_result': return this._statsWaiters.shift()?.resolve(frame.stats)
      case 'cleanup_result': return this._cleanupWaiters.shift()?.resolve(frame.purged)
      case 'key_put_result': return this._keyPutWaiters.shift()?.resolve(frame.code === undefined ? { kid: frame.kid } : { kid: frame.kid, code: frame.code })
      case 'key_get_result': return this._keyGetWaiters.shift()?.resolve(frame.keys)
      case 'refreshed': return this._onRefreshed(frame)
      case 'error': return this._onError(frame)
      default: // pong: nothing to do
    }
  }

  _onWelcome (frame) {
    this.welcome = frame
    this.mailbox = frame.mailbox ?? null
    this._attempt = 0
    this._connectDrainExpected = frame.mailbox !== undefined
    const idleMs = (frame.keepalive_s * 1000) / 3
    this._pingTimer = setInterval(() => {
      if (Date.now() - this._lastSent >= idleMs) this._write({ type: 'ping' })
    }, Math.max(250, idleMs / 2))
    this._expiresAt = Date.now() + frame.expires_in_s * 1000
    if (this.refreshToken) this._armRefresh(0.75 * frame.expires_in_s * 1000)
    this._directory.clear() // keys are looked up again on every connection
    if (this.e2e && this.mailbox !== null) {
      this._held = []
      this._publishKey(this._ws)
    }
    this._setState('open')
    this.dispatchEvent(new CustomEvent('welcome', { detail: frame }))
    for (const w of this._openWaiters.splice(0)) w.resolve()
    for (const [id, pending] of [...this._sends]) {
      try {
        this._write(pending.frame)
      } catch (err) {
        // Only a send stored by an older version can fail here (new ones are checked before
        // they are stored): refuse it, and let the others go out.
        if (!(err instanceof LocalProtocolError)) throw err
        this._sends.delete(id)
        this._emitError({ code: err.code, message: `not sent: message ${id}: ${err.message}`, close: false })
        pending.reject(err)
      }
    }
    this._flush() // the resends, packed, at once
  }

  async _onReceipt (frame) {
    const entry = this._sends.get(frame.id)
    this._sends.delete(frame.id)
    const receipt = frame.code === undefined
      ? { id: frame.id, results: frame.results }
      : frame.retry_after_ms === undefined
        ? { id: frame.id, code: frame.code }
        : { id: frame.id, code: frame.code, retry_after_ms: frame.retry_after_ms }
    if (this.store) {
      try {
        await this.store.saveReceipt(receipt)
      } catch (err) {
        this._emitError({ code: 0, message: `could not save the receipt: ${err}`, close: false })
      }
    }
    this.dispatchEvent(new CustomEvent('receipt', { detail: receipt }))
    entry?.resolve(receipt)
  }

  // ---------------------------------------------------------------- token refresh (rule 22)

  /** Ask refreshToken for a token in `ms` (at least MIN_REFRESH_INTERVAL_MS), on this connection. */
  _armRefresh (ms) {
    clearTimeout(this._refreshTimer)
    this._refreshDue = Date.now() + Math.max(MIN_REFRESH_INTERVAL_MS, ms)
    const ws = this._ws
    const tick = () => {
      if (this._ws !== ws) return
      const left = this._refreshDue - Date.now()
      if (left > 0) this._refreshTimer = setTimeout(tick, Math.min(left, MAX_TIMER_MS))
      else void this._refresh(ws)
    }
    tick()
  }

  /** A token from refreshToken, checked, kept for the next HELLO. Rejects with what the callback throws, or a TypeError. */
  async _newToken () {
    const token = await this.refreshToken()
    if (typeof token !== 'string' || token.length < 1 || token.length > 4096) {
      throw new TypeError(`refreshToken returned ${typeof token}, not a token (a string of 1 to 4096 characters)`)
    }
    this.token = token
    return token
  }

  async _refresh (ws) {
    let token
    try {
      token = await this._newToken()
    } catch (err) {
      if (this._ws !== ws) return
      this._emitError({ code: 0, message: `refreshToken failed: ${err?.message ?? err}`, close: false })
      this._armRefresh((this._expiresAt - Date.now()) / 4)
      return
    }
    if (this._ws === ws) this._write({ type: 'refresh', token }) // else the next HELLO carries it
  }

  _onRefreshed (frame) {
    this._expiresAt = Date.now() + frame.expires_in_s * 1000
    if (this.refreshToken) this._armRefresh(0.75 * frame.expires_in_s * 1000)
    this.dispatchEvent(new CustomEvent('refreshed', { detail: { expires_in_s: frame.expires_in_s } }))
  }

  _onDrained (frame) {
    if (this._connectDrainExpected) this._connectDrainExpected = false
    else this._pullWaiters.shift()?.resolve(frame.pending)
    this.dispatchEvent(new CustomEvent('drained', { detail: { pending: frame.pending } }))
  }

  _onError (frame) {
    if (frame.retry_after_ms !== undefined) this._retryAfterMs = frame.retry_after_ms // 4006: the next connect waits
    this._emitError(frame)
    if (!frame.close) {
      // FORBIDDEN for stats/cleanup from a mailbox session, or send/ack/pull from an operator.
      const waiter = this._statsWaiters.shift() || this._cleanupWaiters.shift()
      waiter?.reject(new RelayError(frame.code, frame.message))
      return
    }
    if (frame.code === ERROR_CODES.TOKEN_EXPIRED && this.refreshToken) {
      this._tokenStale = true // not fatal: the next connection asks refreshToken first
      return
    }
    if (FATAL.has(frame.code)) {
      this._stopped = true // retrying cannot help; start() again with a new token
      this._rejectOpenWaiters(new RelayError(frame.code, frame.message))
    }
  }

  _emitError (detail) {
    this.dispatchEvent(new CustomEvent('error', { detail }))
  }

  // ---------------------------------------------------------------- API

  /**
   * Send `body` (string or Uint8Array) to one mailbox or an array of them.
   *
   * Resolves with the broker's receipt, in one of two shapes:
   * - `{id, results: {recipient: {status, code?}}}`: one result per distinct recipient, keyed
   *   as written in `to`. `status` is "queued" (stored at the relay; the recipient had no open
   *   session), "delivered" (stored, and handed to the recipient's open session: not yet
   *   confirmed saved, let alone read), "duplicate" (the relay already had this message from
   *   this sender for that recipient; nothing new stored) or "refused" with a 3xxx `code`.
   * - `{id, code}` without `results`: the broker refused the SEND as a whole and stored
   *   nothing for anyone: 3004 TOO_MANY_RECIPIENTS (more distinct recipients than WELCOME's
   *   `max_recipients`) or 3007 BODY_TOO_LARGE (body longer than `max_frame_bytes` - 256); or
   *   3008 STORE_UNREACHABLE: the broker could not reach its store, and the message may or may
   *   not be stored: send it again later with the same id (a stored one is then "duplicate");
   *   or 3010 RATE_LIMITED (`{id, code, retry_after_ms}`): this mailbox or address sends faster
   *   than the broker allows; nothing was stored: send it again, same id, after `retry_after_ms`.
   *   Test `receipt.code !== undefined` first.
   * While disconnected the send waits and goes out (same id) on reconnect.
   * With `notify` (the client's `notify` option unless given, true by default) the broker also
   * tells this mailbox, later, what became of the message for each recipient it was stored
   * for: a `status` event per recipient, "delivered" (saved on their device) or "expired".
   * A resend of an id the broker already holds keeps the first send's `notify`.
   * Rejects with LocalProtocolError, storing and sending nothing, if the frame is not valid
   * (e.g. an id that is not a message id, no recipient, a recipient longer than 64 code points).
   */
  async sendMessage (to, body, { ttl, id = newMessageId(), notify = this.notify, plaintext = false } = {}) {
    const entry = {
      id,
      to: Array.isArray(to) ? [...to] : [to],
      body: typeof body === 'string' ? new TextEncoder().encode(body) : body,
      notify: notify === true,
      security: 'plaintext'
    }
    if (ttl !== undefined) entry.ttl_s = ttl
    if (this._sends.has(id)) return this._sends.get(id).promise
    encodeFrame(this._sendFrame(entry)) // throws LocalProtocolError before anything is looked up or stored
    if (this.e2e && !plaintext) {
      const recipients = [...new Set(entry.to)]
      const records = await this._recipientRecords(recipients) // throws KeyChanged, NoRecipientKey, InvalidKeyRecord
      entry.sealed = await seal({
        sender: this.mailbox, msgId: id, recipients: recipients.map((r, i) => [r, records[i]]), identity: this._identity, body: entry.body, padBlock: this.padBlock
      })
      entry.security = 'e2e'
      if (this._sends.has(id)) return this._sends.get(id).promise // the same id sent meanwhile
      encodeFrame(this._sendFrame(entry)) // the envelope may make it too large for a frame
    }
    if (this.store) await this.store.saveOutgoing(entry)
    const promise = this._track(this._sendFrame(entry))
    if (this.state === 'open') this._write(this._sends.get(id).frame)
    return promise
  }

  _sendFrame (entry) {
    const frame = { type: 'send', id: entry.id, to: entry.to, body: entry.sealed ?? entry.body }
    if (entry.ttl_s !== undefined) frame.ttl_s = entry.ttl_s
    if (entry.notify) frame.notify = true // absent means false: an entry saved by an older version asked for none
    return frame
  }

  _track (frame) {
    let resolve, reject
    const promise = new Promise((res, rej) => { resolve = res; reject = rej })
    this._sends.set(frame.id, { frame, resolve, reject, promise })
    return promise
  }

  /** ACK one id (or an array). Returns whether it went out; a lost ACK is harmless. */
  acknowledgeMessage (ids) {
    return this._write({ type: 'ack', ids: Array.isArray(ids) ? ids : [ids] })
  }

  /** STATUS_ACK one seq (or an array). Returns whether it went out; a lost STATUS_ACK is harmless. */
  acknowledgeStatuses (seqs) {
    return this._write({ type: 'status_ack', seqs: Array.isArray(seqs) ? seqs : [seqs] })
  }

  /**
   * Save a STATUS in IndexedDB, then STATUS_ACK it. Resolves with the saved record, or null
   * when the save failed (no STATUS_ACK then: the broker sends it again). A status already
   * saved (same seq) is not announced again, but it is ACKed again. Without a store every
   * status is announced.
   */
  async processStatus (frame) {
    const { type, ...status } = frame
    let saved
    try {
      saved = this.store ? await this.store.saveStatus(status) : { record: status, isNew: true }
    } catch (err) {
      this._emitError({ code: 0, message: `could not save the status of ${status.id ?? 'overflow'} (seq ${status.seq}): ${err}`, close: false })
      return null
    }
    if (saved.isNew) this.dispatchEvent(new CustomEvent('status', { detail: saved.record }))
    try {
      this.acknowledgeStatuses(status.seq)
    } catch (err) {
      this._emitError({ code: 0, message: `STATUS_ACK of seq ${status.seq} failed: ${err}`, close: false })
    }
    return saved.record
  }

  /**
   * PULL: the broker delivers the whole mailbox again, and every status not yet STATUS_ACKed;
   * resolves with DRAINED's pending count.
   */
  fetchPendingMessages () {
    return new Promise((resolve, reject) => {
      if (this.state !== 'open') return reject(new RelayError(0, 'not connected'))
      this._pullWaiters.push({ resolve, reject })
      this._write({ type: 'pull' })
    })
  }

  /**
   * Save a DELIVER in IndexedDB, then ACK it. Resolves with the stored record, or null
   * when the save failed (no ACK then: the broker will deliver it again). A message whose
   * (sender, id) is already stored is not announced again, but it is ACKed again.
   */
  async processRelayMessage (msg) {
    let opened
    try {
      opened = await this._openMessage(msg)
    } catch (err) {
      // A lookup that could not be made (the connection went): nothing saved, no ACK; it comes again.
      this._emitError({ code: 0, message: `could not open message ${msg.id}: ${err.message ?? err}`, close: false })
      return null
    }
    const incoming = { ...msg, ...opened }
    let saved
    try {
      saved = this.store ? await this.store.saveIncoming(incoming) : { record: { ...incoming, state: 'saved' }, isNew: true }
    } catch (err) {
      this._emitError({ code: 0, message: `could not save message ${msg.id}: ${err}`, close: false })
      return null
    }
    if (saved.isNew) this.dispatchEvent(new CustomEvent('message', { detail: saved.record }))
    try {
      if (this.beforeAck) await this.beforeAck(msg)
      if (this.acknowledgeMessage(msg.id)) {
        const record = this.store ? await this.store.markAcked(msg.from, msg.id) : { ...saved.record, state: 'acked' }
        this.dispatchEvent(new CustomEvent('acked', { detail: record }))
        return record
      }
    } catch (err) {
      // Nothing breaks: the message is saved; the broker redelivers and (sender, id) de-duplicates.
      this._emitError({ code: 0, message: `ACK of ${msg.id} failed: ${err}`, close: false })
    }
    return saved.record
  }

  // ---------------------------------------------------------------- end-to-end encryption

  /** The device's keys and contacts, from the store (made and kept there the first time), once. */
  _loadKeys () {
    this._keysLoaded ??= (async () => {
      let keys = this.store ? await this.store.deviceKeys() : { identity: null, encryptionKeys: [] }
      if (keys.identity === null) {
        const [identity, ek] = await Promise.all([generateIdentity(), generateEncryptionKey()])
        const now = Date.now()
        keys = this.store
          ? await this.store.initDeviceKeys(identity, ek, now)
          : { identity, encryptionKeys: [{ ...ek, created_at: now, retired_at: null }] }
      }
      this._identity = keys.identity
      this._encKeys = new Map(keys.encryptionKeys.map((k) => [k.kid, k]))
      for (const contact of this.store ? await this.store.contacts() : []) this._contacts.set(contact.mailbox, contact)
    })()
    this._keysLoaded.catch(() => { this._keysLoaded = null }) // a failed load is tried again by the next start()
    return this._keysLoaded
  }

  /** The current encryption key (the one not retired). */
  _currentKey () {
    for (const key of this._encKeys.values()) if (key.retired_at === null) return key
    throw new Error('no current encryption key') // cannot happen: one is made with the identity, rotation replaces it
  }

  /** This device's signed key record for `mailbox` and its current encryption key (made once per kid). */
  async _keyRecord (mailbox) {
    const ek = this._currentKey()
    const name = `${mailbox} ${ek.kid}`
    if (!this._records.has(name)) this._records.set(name, await makeKeyRecord(mailbox, this._identity, ek))
    return this._records.get(name)
  }

  /**
   * After WELCOME on `ws`: forget encryption keys retired more than max_ttl_s ago, then KEY_PUT
   * this device's record, then let out what was written meanwhile (held by _write).
   */
  async _publishKey (ws) {
    try {
      await this._deleteOldKeys()
      const record = await this._keyRecord(this.mailbox)
      if (this._ws !== ws) return // that connection is gone; the next WELCOME publishes again
      this.putKey(record).then((result) => this._keyPublished(result), () => {}) // lost with the connection: put again on the next
    } catch (err) {
      this._emitError({ code: 0, message: `could not publish this device's key: ${err}`, close: false })
    } finally {
      if (this._ws === ws && this._held !== null) {
        this._outgoing.push(...this._held)
        this._held = null
        this._flush()
      }
    }
  }

  _keyPublished (result) {
    if (result.code !== undefined) {
      this._emitError({ code: result.code, message: `the relay refused this device's key record ${result.kid} (${result.code})`, close: false })
    } else {
      this.dispatchEvent(new CustomEvent('keys', { detail: { kid: result.kid } }))
    }
  }

  /** Called from WELCOME's handler: the keys are gone from memory before any DELIVER after it is opened. */
  async _deleteOldKeys () {
    const before = Date.now() - this.welcome.max_ttl_s * 1000
    const old = [...this._encKeys.values()].filter((k) => k.retired_at !== null && k.retired_at < before)
    if (old.length === 0) return
    for (const key of old) this._encKeys.delete(key.kid)
    if (this.store) await this.store.deleteRetiredKeys(before)
  }

  /**
   * Resolves once connected (at once if connected); rejects if close() is called, or the broker
   * refuses the token, first. Before start() it waits for start().
   */
  _whenOpen () {
    if (this.state === 'open') return Promise.resolve()
    return new Promise((resolve, reject) => this._openWaiters.push({ resolve, reject }))
  }

  /**
   * The directory's records for `mailboxes` as this connection found them, each {record, valid}
   * or null (none published); one getKeys for those not looked up yet on this connection. Rejects (RelayError) if the connection goes first.
   */
  async _lookup (mailboxes) {
    const missing = [...new Set(mailboxes)].filter((m) => !this._directory.has(m))
    if (missing.length > 0) {
      const answer = this.getKeys(missing) // one KEY_GET per max_recipients mailboxes
      for (const mailbox of missing) {
        const found = answer.then(async (keys) => {
          if (!Object.hasOwn(keys, mailbox)) return null
          const record = keys[mailbox]
          return { record, valid: await verifyKeyRecord(mailbox, record) }
        })
        found.catch(() => { if (this._directory.get(mailbox) === found) this._directory.delete(mailbox) })
        this._directory.set(mailbox, found)
      }
    }
    return Promise.all(mailboxes.map((m) => this._directory.get(m)))
  }

  /**
   * The key record to seal to for each recipient, in order, checked as the theory of operation
   * says; throws KeyChanged, NoRecipientKey or InvalidKeyRecord (nothing is sent then).
   */
  async _recipientRecords (recipients) {
    let others
    let records
    for (;;) {
      if (this.mailbox === null || recipients.some((r) => r !== this.mailbox && !this._directory.has(r))) await this._whenOpen()
      others = recipients.filter((r) => r !== this.mailbox)
      try {
        records = await this._lookup(others)
        break
      } catch (err) {
        if (!(err instanceof RelayError) || err.code !== 0) throw err
        // The connection went during the lookup: look again on the next one (close() ends the wait).
      }
    }
    const found = new Map(records.map((f, i) => [others[i], f]))
    const missing = []
    const changes = []
    for (const r of others) {
      const f = found.get(r)
      if (f === null) {
        missing.push(r)
      } else if (!f.valid) {
        throw new InvalidKeyRecord(r)
      } else if (await this._observeKey(r, f.record.ik) === 'changed') {
        const contact = this._contacts.get(r)
        changes.push({ mailbox: r, pinned: await fingerprint(r, contact.ik), current: await fingerprint(r, f.record.ik) })
      }
    }
    if (changes.length > 0) throw new KeyChanged(changes)
    if (missing.length > 0) throw new NoRecipientKey(missing)
    const own = recipients.includes(this.mailbox) ? await this._keyRecord(this.mailbox) : null
    return recipients.map((r) => (r === this.mailbox ? own : found.get(r).record))
  }

  /**
   * What the directory's identity key `ik` for `mailbox` means for its contact: "pinned" (none
   * was: pinned now), "same" (the pinned one), or "changed" (kept as the contact's pending_ik).
   */
  async _observeKey (mailbox, ik) {
    const contact = this._contacts.get(mailbox)
    const now = Date.now()
    let updated
    let outcome
    if (contact === undefined) {
      updated = { mailbox, ik, pinned_at: now, pending_ik: null, pending_at: null }
      outcome = 'pinned'
    } else if (equalBytes(contact.ik, ik)) {
      // The directory shows the pinned key (again): a pending one is no longer what it shows.
      if (contact.pending_ik !== null) updated = { ...contact, pending_ik: null, pending_at: null }
      outcome = 'same'
    } else {
      if (contact.pending_ik === null || !equalBytes(contact.pending_ik, ik)) updated = { ...contact, pending_ik: ik, pending_at: now }
      outcome = 'changed'
    }
    if (updated !== undefined) await this._saveContact(updated)
    return outcome
  }

  async _saveContact (contact) {
    if (this.store) await this.store.saveContact(contact)
    this._contacts.set(contact.mailbox, contact)
    this.dispatchEvent(new CustomEvent('contact', { detail: contact }))
  }

  /**
   * A DELIVER's body to keep and its security: {body, security: "plaintext"}, {body, security:
   * "e2e"} or {body: empty, security: "failed", reason}. Rejects only when a lookup could not
   * be made (then nothing is saved or ACKed).
   */
  async _openMessage (msg) {
    if (!isEnvelope(msg.body)) return { body: msg.body, security: 'plaintext' }
    const failed = (reason) => ({ body: EMPTY, security: 'failed', reason })
    if (!this.e2e) return failed('unknown_key') // this client holds no keys
    await this._loadKeys()
    let header
    try {
      header = peek(msg.body)
    } catch (err) {
      if (err instanceof E2EError) return failed(err.reason)
      throw err
    }
    if (header.from !== msg.from || header.id !== msg.id) return failed('mismatch')
    if (!header.kids.has(this.mailbox)) return failed('not_for_me')
    let senderIk = msg.from === this.mailbox ? this._identity.public : this._contacts.get(msg.from)?.ik
    if (senderIk === undefined) {
      const [found] = await this._lookup([msg.from])
      if (found === null || !found.valid) return failed('no_sender_key')
      await this._observeKey(msg.from, found.record.ik) // trust on first use
      senderIk = found.record.ik
    }
    try {
      const body = await openEnvelope(msg.body, { sender: msg.from, msgId: msg.id, me: this.mailbox, senderIk, myKeys: this._encKeys })
      return { body, security: 'e2e' }
    } catch (err) {
      if (!(err instanceof E2EError)) throw err
      if (err.reason === 'key_changed') await this._noticeKeyChange(msg.from, header.ik)
      return failed(err.reason)
    }
  }

  /** A message came signed by another identity key of `mailbox`: if the directory shows that key, it becomes pending. */
  async _noticeKeyChange (mailbox, ik) {
    this._directory.delete(mailbox) // what this connection found before may be from before the change
    const [found] = await this._lookup([mailbox])
    if (found !== null && found.valid && equalBytes(found.record.ik, ik)) await this._observeKey(mailbox, ik)
  }

  /**
   * Trust `mailbox`'s changed identity key (its contact's pending_ik, the one the safety number
   * in contacts() shows): it becomes the pinned key, and sends to it go out again. Resolves the
   * contact; rejects if there is no changed key to accept.
   */
  async acceptKey (mailbox) {
    await this._loadKeys()
    const contact = this._contacts.get(mailbox)
    if (contact === undefined || contact.pending_ik === null) throw new Error(`no changed key of ${mailbox} to accept`)
    const accepted = { mailbox, ik: contact.pending_ik, pinned_at: Date.now(), pending_ik: null, pending_at: null }
    await this._saveContact(accepted)
    return accepted
  }

  /**
   * A new encryption key (new kid, signed by the same identity key: contacts see no key change);
   * the current one is retired, kept max_ttl_s to open what is still queued under it. Publishes
   * the new record at once when connected (else on the next connect). Resolves the new kid.
   */
  async rotateKey () {
    await this._loadKeys()
    const ek = await generateEncryptionKey()
    const now = Date.now()
    if (this.store) await this.store.rotateEncryptionKey(ek, now)
    for (const key of this._encKeys.values()) if (key.retired_at === null) key.retired_at = now
    this._encKeys.set(ek.kid, { ...ek, created_at: now, retired_at: null })
    if (this.state === 'open' && this.mailbox !== null) {
      const result = await this.putKey(await this._keyRecord(this.mailbox))
      this._keyPublished(result)
    }
    return ek.kid
  }

  /** This device's fingerprint (six groups of five digits), for this mailbox; null before the first WELCOME. */
  async fingerprint () {
    await this._loadKeys()
    return this.mailbox === null ? null : fingerprint(this.mailbox, this._identity.public)
  }

  /**
   * Every contact, by mailbox: {mailbox, ik, pinned_at, fingerprint, safety_number, pending_ik,
   * pending_at, pending_fingerprint, pending_safety_number} (the pending ones null unless the
   * directory showed another key: then sends to it are refused until acceptKey()).
   */
  async contacts () {
    await this._loadKeys()
    const me = this.mailbox
    const list = [...this._contacts.values()].sort((a, b) => (a.mailbox < b.mailbox ? -1 : a.mailbox > b.mailbox ? 1 : 0))
    return Promise.all(list.map(async (c) => ({
      ...c,
      fingerprint: await fingerprint(c.mailbox, c.ik),
      safety_number: me === null ? null : await safetyNumber(me, this._identity.public, c.mailbox, c.ik),
      pending_fingerprint: c.pending_ik === null ? null : await fingerprint(c.mailbox, c.pending_ik),
      pending_safety_number: c.pending_ik === null || me === null ? null : await safetyNumber(me, this._identity.public, c.mailbox, c.pending_ik)
    })))
  }

  /** Relay statistics (operator token only; rejects with FORBIDDEN otherwise). */
  getStats () {
    return this._operatorRequest({ type: 'stats' }, this._statsWaiters)
  }

  /** Purge expired messages now (operator token only); resolves with the count. */
  cleanup () {
    return this._operatorRequest({ type: 'cleanup' }, this._cleanupWaiters)
  }

  /**
   * Publish this mailbox's key record {ik, kid, ek, sig} (KEY_PUT; signed for this mailbox, e.g. by
   * e2e.js makeKeyRecord), replacing its previous one. Resolves with the KEY_PUT_RESULT's {kid} when
   * stored, or {kid, code} when refused (3009 INVALID_KEY: the signature does not verify for this
   * mailbox; 3008 STORE_UNREACHABLE: put it again later). Rejects with RelayError(0) when not connected
   * or when the connection is lost first, RelayError(2003) for an operator session, and
   * LocalProtocolError for a record of the wrong shape (before anything is sent).
   */
  putKey (record) {
    return this._mailboxRequest({ type: 'key_put', key: record }, this._keyPutWaiters)
  }

  /**
   * The broker's current key records of these mailbox ids (KEY_GET): resolves with {mailbox: {ik, kid, ek,
   * sig}} holding only those that have one, as the broker holds them (verify each with e2e.js
   * verifyKeyRecord before trusting it). More than WELCOME's max_recipients go in several KEY_GETs.
   * Rejects like putKey (LocalProtocolError for an element that is not text of at most 64 characters).
   */
  async getKeys (mailboxes) {
    const names = [...new Set(mailboxes)]
    if (names.length === 0 || this.state !== 'open') return this._mailboxRequest(null, this._keyGetWaiters)
    const step = this.welcome.max_recipients
    const frames = []
    for (let i = 0; i < names.length; i += step) frames.push({ type: 'key_get', mailboxes: names.slice(i, i + step) })
    for (const frame of frames) encodeFrame(frame) // every chunk checked before any is sent
    const found = {}
    for (const keys of await Promise.all(frames.map((frame) => this._mailboxRequest(frame, this._keyGetWaiters)))) {
      Object.assign(found, keys)
    }
    const out = {}
    for (const name of names) if (Object.hasOwn(found, name)) Object.defineProperty(out, name, { value: found[name], enumerable: true, writable: true, configurable: true })
    return out
  }

  /** Write `frame` (checked first) and wait for its answer in `waiters`; `null`: nothing to ask, resolve `{}`. */
  _mailboxRequest (frame, waiters) {
    return new Promise((resolve, reject) => {
      if (this.state !== 'open') return reject(new RelayError(0, 'not connected'))
      if (this.mailbox === null) return reject(new RelayError(ERROR_CODES.FORBIDDEN, 'operator sessions have no mailbox: the key directory needs one'))
      if (frame === null) return resolve({})
      encodeFrame(frame) // a LocalProtocolError here rejects before anything is written
      waiters.push({ resolve, reject })
      this._write(frame)
    })
  }

  _operatorRequest (frame, waiters) {
    return new Promise((resolve, reject) => {
      if (this.state !== 'open') return reject(new RelayError(0, 'not connected'))
      waiters.push({ resolve, reject })
      this._write(frame)
    })
  }
}
