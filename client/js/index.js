// The package's entry point (`@relay/client`): the WebSocket client, everything the codec
// exports and the end-to-end encryption core, so a web app needs one import. The store's own
// module (`@relay/client/store`) adds its schema constants; `@relay/client/codec` is the codec
// alone (no WebSocket, no IndexedDB); `@relay/client/e2e` is the encryption alone (no I/O).
export * from './client.js'
export * from './codec.js'
export * from './e2e.js'
