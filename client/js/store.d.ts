// Types of store.js: the client's IndexedDB message store, one database per mailbox.
// A new record field: a property on InboxRecord or OutboxEntry. A new method: on MessageStore
// (test/types.test.mjs fails until every public method of the class is declared here).
/// <reference lib="dom" />

import type { DeliverFrame, RecipientResult } from './codec.js'
import type { Receipt } from './client.js'

/** The database schema version (`relay:<mailbox>`, upgraded in place from older versions). */
export const VERSION: number
/** The inbox's key path: a message's identity for this client is (sender, id). */
export const INBOX_KEY: readonly ['from', 'id']

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
}

/** An outbox entry: the message, and what the broker answered. */
export interface OutboxEntry extends OutgoingEntry {
  /** Unix epoch milliseconds: when it was recorded. */
  created_at: number
  /** The receipt's per-recipient results; null until a receipt with results arrives. */
  results: Record<string, RecipientResult> | null
  /** Set when the SEND was refused as a whole (3004 TOO_MANY_RECIPIENTS, 3007 BODY_TOO_LARGE). */
  code?: number
}

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
  saveReceipt (receipt: Receipt): Promise<OutboxEntry | undefined>
  /** Every inbox message, oldest first. */
  inbox (): Promise<InboxRecord[]>
  /** Every outbox entry, oldest first. */
  outbox (): Promise<OutboxEntry[]>
  /** Outbox entries the broker has not confirmed yet (no receipt of either kind). */
  unconfirmed (): Promise<OutboxEntry[]>
}
