// Types of client.js: the Relay browser client (the protocol over a WebSocket, an optional
// IndexedDB store). Hand-written; test/types.test.mjs checks them against the module.
//
// Where things go:
// - a new event: one line in RelayClientEventMap (name -> the event's `detail`); addEventListener
//   and removeEventListener then type its listener;
// - a new option of the constructor or of sendMessage: a `?:` property on RelayClientOptions or
//   SendOptions;
// - a new method or public property: on RelayClient (the test fails until it is declared);
// - a new frame or frame field: codec.d.ts; a new stored record field: store.d.ts.
/// <reference lib="dom" />

import type { DeliverFrame, KeyRecord, RecipientResult, StatusFrame, WelcomeFrame } from './codec.js'
import type { ContactRecord, InboxRecord, MessageStore, OverflowRecord, StatusRecord } from './store.js'

export { MessageStore, deliveryStates, missedStatuses } from './store.js'

/** A random 128-bit message id (32 hex digits). */
export function newMessageId (): string

/** The broker's WebSocket URL next to the page that serves it: ws(s)://<page host>:<wsPort>/relay. */
export function defaultUrl (wsPort?: number, location?: { protocol: string, hostname: string }): string

/** A failure of a request to the broker: `code` from ERROR_CODES, or 0 (e.g. "not connected", "connection lost"). */
export class RelayError extends Error {
  constructor (code: number, message: string)
  readonly code: number
}

/** A send refused because a recipient's identity key is not the pinned one: nothing was sent to anyone. */
export class KeyChanged extends Error {
  constructor (changes: readonly KeyChange[])
  /** The first changed recipient, and the fingerprints of its pinned key and of the one the directory shows. */
  readonly mailbox: string
  readonly pinnedFingerprint: string
  readonly newFingerprint: string
  /** Every recipient whose key changed (each now has a pending key in contacts(); acceptKey() trusts it). */
  readonly changes: readonly KeyChange[]
}

/** One recipient of a KeyChanged: fingerprints (six groups of five digits) of the pinned and the current key. */
export interface KeyChange { mailbox: string, pinned: string, current: string }

/** A send refused because these recipients published no key: nothing sent; `{plaintext: true}` sends in the clear. */
export class NoRecipientKey extends Error {
  constructor (mailboxes: readonly string[])
  readonly mailboxes: readonly string[]
}

/** A send refused because the directory served a record that does not verify for its mailbox: nothing sent. */
export class InvalidKeyRecord extends Error {
  constructor (mailbox: string)
  readonly mailbox: string
}

/** A contact as contacts() gives it: the record kept, with its fingerprint and the safety number to compare. */
export interface Contact extends ContactRecord {
  fingerprint: string
  /** null before the first WELCOME (this mailbox is not known yet). */
  safety_number: string | null
  /** Of the changed key the directory shows, until acceptKey(); null when none. */
  pending_fingerprint: string | null
  pending_safety_number: string | null
}

/**
 * The broker's receipt for a SEND, as sendMessage resolves it. Test `receipt.code !== undefined`
 * first: then the SEND was refused as a whole (3004 TOO_MANY_RECIPIENTS, 3007 BODY_TOO_LARGE:
 * nothing stored; 3008 STORE_UNREACHABLE: maybe stored, send again with the same id; 3010 RATE_LIMITED: nothing
 * stored, send again with the same id after `retry_after_ms`).
 */
export type Receipt =
  | { id: string, results: Record<string, RecipientResult>, code?: undefined, retry_after_ms?: undefined }
  | { id: string, code: number, results?: undefined, retry_after_ms?: number }

/**
 * A delivery status as the `status` event and processStatus give it: as saved (with a store;
 * `received_at` only then), or the STATUS frame's fields (without one).
 */
export type DeliveryStatus =
  | (Omit<StatusRecord, 'received_at'> & { received_at?: number })
  | (Omit<OverflowRecord, 'received_at'> & { received_at?: number })

/** A received message as the `message` and `acked` events carry it (`received_at` only with a store). */
export type ReceivedMessage = Omit<InboxRecord, 'received_at'> & { received_at?: number }

export type ConnectionState = 'connecting' | 'open' | 'closed'

/** The part of a WebSocket the client uses, for a WebSocket class other than the browser's (e.g. in Node). */
export interface WebSocketLike {
  binaryType: string
  readonly readyState: number
  onopen: ((event: any) => void) | null
  onmessage: ((event: any) => void) | null
  onclose: ((event: any) => void) | null
  onerror: ((event: any) => void) | null
  send (data: Uint8Array): void
  close (code?: number, reason?: string): void
}

/** The browser's WebSocket, or a class whose instances have what the client uses. */
export type WebSocketConstructor = typeof WebSocket | (new (url: string) => WebSocketLike)

export interface RelayClientOptions {
  /** ws://host:port/relay */
  url: string
  /** A Relay token (JWT). */
  token: string
  /** Where messages are saved; without one nothing persists and nothing is de-duplicated. */
  store?: MessageStore | null
  /** HELLO's `agent` (default "relay-js"). */
  agent?: string
  /** Ask for delivery statuses on every send unless sendMessage says otherwise (default true). */
  notify?: boolean
  /** End-to-end encryption (default true): publish this device's key on connect, seal sends, open envelopes. */
  e2e?: boolean
  /** Pad sealed bodies to a multiple of this many bytes (default 256; 1: only the 0x80 byte). */
  padBlock?: number
  /** First reconnect delay, before jitter (default 250). */
  minBackoffMs?: number
  /** Longest reconnect delay, before jitter (default 15000). */
  maxBackoffMs?: number
  /** Awaited between saving a DELIVER and ACKing it. */
  beforeAck?: ((msg: DeliverFrame) => Promise<void> | void) | null
  /**
   * A newer token for the same mailbox, from the application's issuer (protocol.md rule 22): asked once three
   * quarters of the session's time have passed and sent in a REFRESH, so the session outlives its token; asked again
   * after a quarter of what is left if it fails; asked before reconnecting when the broker ended the session with
   * 2002 TOKEN_EXPIRED (then not fatal). Default null: the session ends with its token.
   */
  refreshToken?: (() => Promise<string>) | null
  /** The WebSocket class (default: globalThis.WebSocket). */
  WebSocketImpl?: WebSocketConstructor
}

export interface SendOptions {
  /** Seconds until the message expires at the relay (default: WELCOME's default_ttl_s). */
  ttl?: number
  /** The message id (default: newMessageId()); sending an id that is still unconfirmed returns its pending receipt. */
  id?: string
  /**
   * Ask the broker for a delivery status per recipient (`status` events: "delivered" when the
   * recipient's device saved it, "expired" if it expired first). Default: the client's `notify`.
   */
  notify?: boolean
  /**
   * Send this message unencrypted, to everyone (no key lookup): needed for a recipient without a
   * published key (else NoRecipientKey). The relay can read it; it is saved as "plaintext".
   */
  plaintext?: boolean
}

/** Each event's `detail`, by event name. */
export interface RelayClientEventMap {
  state: { state: ConnectionState, error?: unknown }
  welcome: WelcomeFrame
  /** A newly saved message (announced once per (sender, id) with a store). */
  message: ReceivedMessage
  /** The message after its ACK was sent. */
  acked: ReceivedMessage
  /** A receipt, as sendMessage resolves it (also saved on the outbox entry). */
  receipt: Receipt
  /**
   * A newly saved delivery status (announced once per seq with a store; before the receipt of its
   * message, possibly). The state per recipient to show: deliveryStates() over store.outbox().
   */
  status: DeliveryStatus
  drained: { pending: number }
  /** ERROR frames from the broker (`close`: the broker closes the connection) and local failures (code 0 or 1xxx, close false). */
  /** `retry_after_ms` with 4006 CONNECTION_RATE_LIMITED: the reconnect waits at least that long. */
  error: { code: number, message: string, close: boolean, retry_after_ms?: number }
  /** A contact's record after it changed: pinned on first use, a changed key seen (pending_ik), or accepted. */
  contact: ContactRecord
  /** This device's key record was published (KEY_PUT accepted), on every connect and after rotateKey(). */
  keys: { kid: string }
  /** The broker took a token from refreshToken: the session now ends in `expires_in_s` unless refreshed again. */
  refreshed: { expires_in_s: number }
}

export type RelayClientEvent<K extends keyof RelayClientEventMap> = CustomEvent<RelayClientEventMap[K]>

export class RelayClient extends EventTarget {
  constructor (options: RelayClientOptions)

  url: string
  token: string
  readonly store: MessageStore | null
  agent: string
  /** The default of sendMessage's `notify`. */
  notify: boolean
  /** Whether sends are sealed and envelopes opened (set before start()). */
  readonly e2e: boolean
  padBlock: number
  minBackoffMs: number
  maxBackoffMs: number
  beforeAck: ((msg: DeliverFrame) => Promise<void> | void) | null
  refreshToken: (() => Promise<string>) | null
  readonly WebSocketImpl: WebSocketConstructor
  readonly state: ConnectionState
  /** The current connection's WELCOME, null while not connected. */
  readonly welcome: WelcomeFrame | null
  /** The mailbox of the last WELCOME (null before the first, and for an operator token). */
  readonly mailbox: string | null

  addEventListener<K extends keyof RelayClientEventMap> (
    type: K,
    listener: (this: RelayClient, event: RelayClientEvent<K>) => void,
    options?: boolean | AddEventListenerOptions
  ): void
  addEventListener (type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | AddEventListenerOptions): void
  removeEventListener<K extends keyof RelayClientEventMap> (
    type: K,
    listener: (this: RelayClient, event: RelayClientEvent<K>) => void,
    options?: boolean | EventListenerOptions
  ): void
  removeEventListener (type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | EventListenerOptions): void

  /** Start connecting (and keep reconnecting); resends sends left unconfirmed in the store. */
  start (): Promise<void>
  /** Say BYE and stop reconnecting. Pending sends stay queued (and in the store). */
  close (): void
  /** Close the socket as if the network dropped (the client reconnects). For tests and demos. */
  dropConnection (): void
  /**
   * Send `body` to one mailbox or several, end-to-end encrypted unless `plaintext` (or the client's
   * `e2e` is off). Resolves with the broker's receipt; while disconnected the send waits and goes out
   * (same id) on reconnect. Rejects, storing and sending nothing, with LocalProtocolError if the frame
   * is not valid, KeyChanged (a recipient's key is not the pinned one), NoRecipientKey (a recipient
   * published none) or InvalidKeyRecord (the directory served a record that does not verify).
   */
  sendMessage (to: string | readonly string[], body: string | Uint8Array, options?: SendOptions): Promise<Receipt>
  /** ACK one id or several; whether it went out (a lost ACK is harmless). */
  acknowledgeMessage (ids: string | readonly string[]): boolean
  /** STATUS_ACK one seq or several; whether it went out (a lost STATUS_ACK is harmless). */
  acknowledgeStatuses (seqs: number | readonly number[]): boolean
  /**
   * Save a STATUS (with a store), then STATUS_ACK it. Resolves with the record, or null when the
   * save failed (no STATUS_ACK then: the broker sends it again).
   */
  processStatus (frame: StatusFrame): Promise<DeliveryStatus | null>
  /**
   * PULL: the broker delivers the whole mailbox again, and every status not yet STATUS_ACKed;
   * resolves with DRAINED's pending count. Rejects with RelayError.
   */
  fetchPendingMessages (): Promise<number>
  /**
   * Save a DELIVER (with a store), then ACK it. Resolves with the record, or null when the save
   * failed (no ACK then: the broker delivers it again).
   */
  processRelayMessage (msg: DeliverFrame): Promise<ReceivedMessage | null>
  /** Pin `mailbox`'s pending (changed) key, so sends to it go out again; rejects if it has none. */
  acceptKey (mailbox: string): Promise<ContactRecord>
  /** A new encryption key (same identity key: contacts see no change), published at once if connected; its kid. */
  rotateKey (): Promise<string>
  /** This device's fingerprint for this mailbox; null before the first WELCOME. */
  fingerprint (): Promise<string | null>
  /** Every contact, by mailbox, with fingerprints and safety numbers. */
  contacts (): Promise<Contact[]>
  /** Relay statistics (operator token only; rejects with RelayError FORBIDDEN otherwise). */
  /**
   * KEY_PUT: publish this mailbox's key record. Resolves with `{kid}` when stored, `{kid, code}` when refused
   * (3009 INVALID_KEY, 3008 STORE_UNREACHABLE); rejects with RelayError when not connected or for an operator.
   */
  putKey (record: KeyRecord): Promise<{ kid: string, code?: number }>
  /** KEY_GET: the current records of these mailboxes (only those that have one); verify each before trusting it. */
  getKeys (mailboxes: Iterable<string>): Promise<Record<string, KeyRecord>>
  getStats (): Promise<Record<string, number>>
  /** Purge expired messages now (operator token only); resolves with how many. */
  cleanup (): Promise<number>
}
