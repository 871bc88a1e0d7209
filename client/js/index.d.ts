// Types of index.js, the package's entry point: client.d.ts, codec.d.ts and e2e.d.ts together.
export * from './client.js'
export * from './codec.js'
export * from './e2e.js'
export type {
  ContactRecord, DeliveryState, DeviceKeys, E2EReason, EncryptionKeyRecord, IdentityRecord, InboxRecord, OutboxEntry, OutgoingEntry,
  OpenOptions, OverflowRecord, Security, StatusRecord
} from './store.js'
