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
// The connection is re-opened with exponential backoff and full jitter, except after an
// error that a retry cannot fix (bad or expired token, another tab took the mailbox over).
//
// Events (an EventTarget; each event's `detail`):
//   state     {state: "connecting" | "open" | "closed", error?}
//   welcome   the WELCOME frame
//   message   a newly saved inbox record ({id, from, body, ..., state})
//   acked     the inbox record after its ACK was sent
//   receipt   the receipt as sendMessage resolves it: {id, results} or {id, code} (a SEND
//             refused as a whole); also saved on the outbox record
//   status    a newly saved status: {seq, state: "delivered" | "expired", at, id, recipient}
//             or {seq, state: "overflow", count, first_seq, at} (how many statuses the broker folded)
//   drained   {pending}
//   error     {code, message, close} for ERROR frames and local failures

import { PROTOCOL_VERSION, ERROR_CODES, LocalProtocolError, decodeMessage, encodeFrame, packFrames } from './codec.js'

export { MessageStore, deliveryStates, missedStatuses } from './store.js'

const FATAL = new Set([
  ERROR_CODES.INVALID_TOKEN,
  ERROR_CODES.TOKEN_EXPIRED,
  ERROR_CODES.UNSUPPORTED_VERSION,
  ERROR_CODES.CONNECTED_ELSEWHERE
])

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

export class RelayClient extends EventTarget {
  /**
   * @param {object} options
   * @param {string} options.url      ws://host:port/relay
   * @param {string} options.token    a Relay token (JWT)
   * @param {MessageStore} [options.store]  where messages are saved; without one nothing persists and nothing is de-duplicated
   * @param {number} [options.minBackoffMs=250]  first reconnect delay (before jitter)
   * @param {number} [options.maxBackoffMs=15000]
   * @param {boolean} [options.notify=true]  ask for delivery statuses on every send (sendMessage can override it)
   * @param {(msg) => Promise<void>} [options.beforeAck]  awaited between save and ACK (tests use it)
   */
  constructor ({ url, token, store = null, agent = 'relay-js', notify = true, minBackoffMs = 250, maxBackoffMs = 15000, beforeAck = null, WebSocketImpl = globalThis.WebSocket }) {
    super()
    this.url = url
    this.token = token
    this.store = store
    this.agent = agent
    this.notify = notify
    this.minBackoffMs = minBackoffMs
    this.maxBackoffMs = maxBackoffMs
    this.beforeAck = beforeAck
    this.WebSocketImpl = WebSocketImpl
    this.state = 'closed'
    this.welcome = null
    this.mailbox = null
    this._ws = null
    this._stopped = true
    this._attempt = 0
    this._retryTimer = null
    this._pingTimer = null
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
  }

  // ---------------------------------------------------------------- lifecycle

  /** Start connecting (and keep reconnecting) ; resends sends left unconfirmed in the store. */
  async start () {
    if (!this._stopped) return
    this._stopped = false
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
    this._setState('closed')
  }

  _setState (state, extra = {}) {
    if (this.state === state && !extra.error) return
    this.state = state
    this.dispatchEvent(new CustomEvent('state', { detail: { state, ...extra } }))
  }

  _connect () {
    if (this._stopped) return
    this._setState('connecting')
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
    if (this._ws) {
      this._ws.onopen = this._ws.onmessage = this._ws.onclose = null
    }
    this._ws = null
    this.welcome = null
    this._outgoing = [] // unsent frames of a connection that is gone (sends go out again on WELCOME)
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
    const delay = Math.random() * ceiling // full jitter
    this._retryTimer = setTimeout(() => this._connect(), delay)
  }

  /** Close the socket as if the network dropped (the client reconnects). For tests and demos. */
  dropConnection () {
    if (this._ws) this._ws.close(4000, 'dropped')
  }

  // ---------------------------------------------------------------- wire

  /** Queue a frame for the end of this turn; false if there is no open socket. Throws LocalProtocolError. */
  _write (frame) {
    const ws = this._ws
    if (!ws || ws.readyState !== 1) return false
    this._outgoing.push(encodeFrame(frame))
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
    this._setState('open')
    this.dispatchEvent(new CustomEvent('welcome', { detail: frame }))
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
    const receipt = frame.code !== undefined ? { id: frame.id, code: frame.code } : { id: frame.id, results: frame.results }
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

  _onDrained (frame) {
    if (this._connectDrainExpected) this._connectDrainExpected = false
    else this._pullWaiters.shift()?.resolve(frame.pending)
    this.dispatchEvent(new CustomEvent('drained', { detail: { pending: frame.pending } }))
  }

  _onError (frame) {
    this._emitError(frame)
    if (!frame.close) {
      // FORBIDDEN for stats/cleanup from a mailbox session, or send/ack/pull from an operator.
      const waiter = this._statsWaiters.shift() || this._cleanupWaiters.shift()
      waiter?.reject(new RelayError(frame.code, frame.message))
      return
    }
    if (FATAL.has(frame.code)) {
      this._stopped = true // retrying cannot help; start() again with a new token
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
   *   not be stored: send it again later with the same id (a stored one is then "duplicate").
   *   Test `receipt.code !== undefined` first.
   * While disconnected the send waits and goes out (same id) on reconnect.
   * With `notify` (the client's `notify` option unless given, true by default) the broker also
   * tells this mailbox, later, what became of the message for each recipient it was stored
   * for: a `status` event per recipient, "delivered" (saved on their device) or "expired".
   * A resend of an id the broker already holds keeps the first send's `notify`.
   * Rejects with LocalProtocolError, storing and sending nothing, if the frame is not valid
   * (e.g. an id that is not a message id, no recipient, a recipient longer than 64 code points).
   */
  async sendMessage (to, body, { ttl, id = newMessageId(), notify = this.notify } = {}) {
    const entry = {
      id,
      to: Array.isArray(to) ? [...to] : [to],
      body: typeof body === 'string' ? new TextEncoder().encode(body) : body,
      notify: notify === true
    }
    if (ttl !== undefined) entry.ttl_s = ttl
    if (this._sends.has(id)) return this._sends.get(id).promise
    encodeFrame(this._sendFrame(entry)) // throws LocalProtocolError before anything is stored
    if (this.store) await this.store.saveOutgoing(entry)
    const promise = this._track(this._sendFrame(entry))
    if (this.state === 'open') this._write(this._sends.get(id).frame)
    return promise
  }

  _sendFrame (entry) {
    const frame = { type: 'send', id: entry.id, to: entry.to, body: entry.body }
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
    let saved
    try {
      saved = this.store ? await this.store.saveIncoming(msg) : { record: { ...msg, state: 'saved' }, isNew: true }
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
