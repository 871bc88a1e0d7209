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
}

/** An outgoing message as the client records it before sending it. */
export interface OutgoingEntry {
  id: string
  to: string[]
  body: Uint8Array
  ttl_s?: number
  /** Whether the SEND asked for delivery statuses (absent on entries saved before they existed: no). */
  notify?: boolean
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
  saveIncoming (msg: Omit<DeliverFrame, 'type'> & { type?: 'deliver' }): Promise<{ record: InboxRecord, isNew: boolean }>
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
  /** Outbox entries the broker has not confirmed yet (no receipt of either kind); without `statuses`. */
  unconfirmed (): Promise<Omit<OutboxEntry, 'statuses'>[]>
}
