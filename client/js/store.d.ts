// Types of store.js: the client's IndexedDB message store, one database per mailbox.
// A new record field: a property on InboxRecord or OutboxEntry. A new method: on MessageStore
// (test/types.test.mjs fails until every public method of the class is declared here).
/// <reference lib="dom" />

import type { DeliverFrame, RecipientResult, StatusFrame } from './codec.js'
import type { Receipt } from './client.js'

/** The database schema version (`relay:<mailbox>`, upgraded in place from older versions). */
export const VERSION: number
/** The inbox's key path: a message's identity for this client is (sender, id). */
export const INBOX_KEY: readonly ['from', 'id']
/** The statuses store's key path: one outgoing message, one recipient. */
export const STATUS_KEY: readonly ['id', 'recipient']

/** A received message as the inbox keeps it. */
export interface InboxRecord {
  id: string
  from: string
  body: Uint8Array
  /** Unix epoch milliseconds, from the DELIVER. */
  sent_at: number
  /** Unix epoch milliseconds, from the DELIVER. */
  expires_at: number
  attempt: number
  /** Unix epoch milliseconds: when this browser saved it. */
  received_at: number
  /** "saved" once in IndexedDB; "acked" once its ACK went out (the broker then deletes its copy). */
  state: 'saved' | 'acked'
  /**
   * "e2e": opened and verified, `body` is the decrypted text; "plaintext": not encrypted (nothing
   * vouches for sender or content); "failed": an envelope that did not open, `body` empty.
   */
  security: Security
  /** Why a "failed" one did not open (docs/e2e.md, "Opening"). */
  reason?: E2EReason
}

/** How a message travelled: end-to-end encrypted, in the clear, or (received) an envelope that did not open. */
export type Security = 'e2e' | 'plaintext' | 'failed'
/** The reasons of docs/e2e.md "Opening" steps 2-8. */
export type E2EReason = 'malformed' | 'mismatch' | 'not_for_me' | 'no_sender_key' | 'key_changed' | 'bad_signature' | 'unknown_key' | 'decrypt_failed'

/** This device's identity key as kept: the private key a non-extractable Ed25519 CryptoKey. */
export interface IdentityRecord {
  privateKey: CryptoKey
  public: Uint8Array
  /** Unix epoch milliseconds. */
  created_at: number
}

/** One of this device's encryption keys: the current one (retired_at null) or a retired one. */
export interface EncryptionKeyRecord {
  kid: string
  /** Non-extractable X25519 CryptoKey. */
  privateKey: CryptoKey
  public: Uint8Array
  created_at: number
  /** Unix epoch milliseconds when it was retired (rotateEncryptionKey); null for the current key. */
  retired_at: number | null
}

/** A contact's pinned identity key, and the changed one the directory shows (pending_ik) until accepted. */
export interface ContactRecord {
  mailbox: string
  ik: Uint8Array
  pinned_at: number
  pending_ik: Uint8Array | null
  pending_at: number | null
}

export interface DeviceKeys {
  identity: IdentityRecord | null
  encryptionKeys: EncryptionKeyRecord[]
}

/** An outgoing message as the client records it before sending it. */
export interface OutgoingEntry {
  id: string
  to: string[]
  body: Uint8Array
  ttl_s?: number
  /** Whether the SEND asked for delivery statuses (absent on entries saved before they existed: no). */
  notify?: boolean
  /** "e2e" (then `sealed` is the envelope sent) or "plaintext" (the default). */
  security?: 'e2e' | 'plaintext'
  /** The envelope that goes on the wire, for an "e2e" entry (`body` is the text as written). */
  sealed?: Uint8Array
}

/** What the relay said became of an outgoing message for one recipient (a "delivered" or "expired" STATUS). */
export interface StatusRecord {
  id: string
  recipient: string
  /** "delivered": the recipient's device saved and ACKed it; "expired": it expired at the relay first. */
  state: 'delivered' | 'expired'
  /** Unix epoch milliseconds: when the ACK reached the relay, or when the message expired. */
  at: number
  seq: number
  /** Unix epoch milliseconds: when this browser saved it. */
  received_at: number
  count?: undefined
  first_seq?: undefined
}

/** Statuses the relay folded instead of keeping them (an "overflow" STATUS), at its latest count. */
export interface OverflowRecord {
  first_seq: number
  seq: number
  state: 'overflow'
  /** How many statuses were folded into it. */
  count: number
  /** Unix epoch milliseconds: when the latest one was folded in. */
  at: number
  received_at: number
  /** An overflow names no message. */
  id?: undefined
  recipient?: undefined
}

/** Per recipient, the one state to show (deliveryStates). */
export type DeliveryState = 'sending' | 'refused' | 'queued' | 'delivered' | 'expired'

/** An outbox entry: the message, and what the broker answered. */
export interface OutboxEntry extends OutgoingEntry {
  /** Unix epoch milliseconds: when it was recorded. */
  created_at: number
  /** The receipt's per-recipient results; null until a receipt with results arrives. */
  results: Record<string, RecipientResult> | null
  /** Set when the SEND was refused as a whole (3004 TOO_MANY_RECIPIENTS, 3007 BODY_TOO_LARGE). */
  code?: number
  /** The statuses saved about it, by recipient (outbox() joins them; a status may come before the receipt). */
  statuses: Record<string, StatusRecord>
}

/**
 * Per recipient of an outbox entry, the one state to show, from its receipt and statuses: a status
 * wins ("delivered", "expired"), else "refused", "sending" (no receipt yet) or "queued" (stored
 * at the relay, not yet saved on the recipient's device). Recipients as the receipt keys them.
 */
export function deliveryStates (entry: Pick<OutboxEntry, 'to' | 'results' | 'code'> & { statuses?: Record<string, StatusRecord> }): Record<string, DeliveryState>

/** How many statuses the relay could not keep, from overflows() (protocol.md 9, rule 19: exact). */
export function missedStatuses (overflows: readonly Pick<OverflowRecord, 'count'>[]): number

export interface OpenOptions {
  /** The IndexedDB to use (default: globalThis.indexedDB). */
  indexedDB?: IDBFactory
  /** Called while an older version of the database is still open in another tab (the upgrade waits). */
  onBlocked?: (() => void) | null
}

export class MessageStore {
  /** Use `await MessageStore.open(mailbox)`. */
  constructor (db: IDBDatabase)
  readonly db: IDBDatabase
  /**
   * Open (creating or upgrading) the database `relay:<mailbox>`. Rejects if IndexedDB fails (the
   * database is then unchanged). When a newer version is opened elsewhere this connection closes
   * itself, and later calls reject.
   */
  static open (mailbox: string, options?: OpenOptions): Promise<MessageStore>
  close (): void
  /** Save a delivered message unless this sender's message with this id is stored; rejects if IndexedDB fails. */
  saveIncoming (msg: Omit<DeliverFrame, 'type'> & { type?: 'deliver', security?: Security, reason?: E2EReason }): Promise<{ record: InboxRecord, isNew: boolean }>
  /** Mark (from, id) acknowledged; the updated record, or undefined if it is not stored. */
  markAcked (from: string, id: string): Promise<InboxRecord | undefined>
  /** Record an outgoing message before it is sent (so a reload can resend it). */
  saveOutgoing (entry: OutgoingEntry): Promise<void>
  /**
   * Record the broker's receipt; the updated entry, or undefined if the id is not in the outbox.
   * A 3008 STORE_UNREACHABLE receipt changes nothing (the entry stays unconfirmed).
   */
  saveReceipt (receipt: Receipt): Promise<Omit<OutboxEntry, 'statuses'> | undefined>
  /**
   * Save a STATUS before it is ACKed: per (id, recipient), or per first_seq for an overflow. A
   * redelivery (same seq) or an older one changes nothing (isNew false). Rejects if IndexedDB fails.
   */
  saveStatus (status: Omit<StatusFrame, 'type'> & { type?: 'status' }): Promise<{ record: StatusRecord | OverflowRecord, isNew: boolean }>
  /** Every overflow record, by first_seq. */
  overflows (): Promise<OverflowRecord[]>
  /** Every inbox message, oldest first. */
  inbox (): Promise<InboxRecord[]>
  /** Every outbox entry, oldest first, each with the statuses saved about it. */
  outbox (): Promise<OutboxEntry[]>
  /** This device's keys (identity null until initDeviceKeys). */
  deviceKeys (): Promise<DeviceKeys>
  /** Keep these keys unless an identity is already kept (then nothing changes); the keys now kept. */
  initDeviceKeys (identity: { privateKey: CryptoKey, public: Uint8Array }, ek: { privateKey: CryptoKey, public: Uint8Array, kid: string }, now?: number): Promise<DeviceKeys>
  /** Make `ek` the current encryption key, retiring the current one at `now`. */
  rotateEncryptionKey (ek: { privateKey: CryptoKey, public: Uint8Array, kid: string }, now?: number): Promise<void>
  /** Delete the encryption keys retired before `before` (Unix ms); their kids. */
  deleteRetiredKeys (before: number): Promise<string[]>
  /** Every contact, by mailbox. */
  contacts (): Promise<ContactRecord[]>
  /** Save (replace) a contact record. */
  saveContact (contact: ContactRecord): Promise<void>
  /** Outbox entries the broker has not confirmed yet (no receipt of either kind); without `statuses`. */
  unconfirmed (): Promise<Omit<OutboxEntry, 'statuses'>[]>
}
