// The package's entry point (`@relay/client`): the WebSocket client and everything the codec
// exports, so a web app needs one import. The store's own module (`@relay/client/store`) adds
// its schema constants; `@relay/client/codec` is the codec alone (no WebSocket, no IndexedDB).
export * from './client.js'
export * from './codec.js'
