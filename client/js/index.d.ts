// Types of index.js, the package's entry point: client.d.ts and codec.d.ts together.
export * from './client.js'
export * from './codec.js'
export type { DeliveryState, InboxRecord, OutboxEntry, OutgoingEntry, OpenOptions, OverflowRecord, StatusRecord } from './store.js'
