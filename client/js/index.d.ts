// Types of index.js, the package's entry point: client.d.ts and codec.d.ts together.
export * from './client.js'
export * from './codec.js'
export type { InboxRecord, OutboxEntry, OutgoingEntry, OpenOptions } from './store.js'
