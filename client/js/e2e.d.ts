// Types of e2e.js: end-to-end encryption of message bodies (docs/e2e.md), the JS twin of
// wire/e2e.py. Hand-written, like codec.d.ts; test/types.test.mjs checks them against the module.
// Byte strings are Uint8Array; every crypto operation is asynchronous (WebCrypto).

/** The first 4 bytes of every envelope body ("RE2E"). */
export const E2E_MAGIC: Uint8Array
/** The padding block seal() uses unless told otherwise. */
export const DEFAULT_PAD_BLOCK: number
/** Why an envelope did not open, in the order the steps are checked (docs/e2e.md, "Opening"). */
export type E2EReason = 'plaintext' | 'malformed' | 'mismatch' | 'not_for_me' | 'no_sender_key' | 'key_changed' |
  'bad_signature' | 'unknown_key' | 'decrypt_failed'
export const E2E_REASONS: readonly E2EReason[]

/** An envelope that does not open (or a key problem the caller reports with a reason). */
export class E2EError extends Error {
  constructor (reason: E2EReason, message?: string)
  readonly reason: E2EReason
}

/** An Ed25519 identity key: the private key (non-extractable when generated) and the raw public key. */
export interface Identity {
  privateKey: CryptoKey
  public: Uint8Array
}

/** An X25519 encryption key with its key id (16 lowercase hex). */
export interface EncryptionKey {
  privateKey: CryptoKey
  public: Uint8Array
  kid: string
}

/** A directory entry: `ik` (32 bytes), `kid`, `ek` (32 bytes), `sig` (64 bytes, by ik); the codec's type. */
import type { KeyRecord } from './codec.js'
export type { KeyRecord }

export function generateIdentity (): Promise<Identity>
/** The identity whose Ed25519 private key is this 32-byte seed. */
export function identityFromSeed (seed: Uint8Array): Promise<Identity>
export function generateEncryptionKey (): Promise<EncryptionKey>
/** The encryption key whose X25519 private key is these 32 bytes. */
export function encryptionKeyFromPrivate (raw: Uint8Array): Promise<EncryptionKey>
/** Lowercase hex of the first 8 bytes of SHA-256(ekPublic). */
export function keyId (ekPublic: Uint8Array): Promise<string>

export function makeKeyRecord (mailbox: string, identity: Identity, ek: EncryptionKey): Promise<KeyRecord>
/** Whether the record has the right shape and its signature verifies for `mailbox`. */
export function verifyKeyRecord (mailbox: string, record: KeyRecord): Promise<boolean>

/** Fixed randomness for seal (tests and vectors only). */
export interface SealRandomness {
  cek: Uint8Array
  nonce: Uint8Array
  /** One X25519 private key (32 bytes) per distinct recipient, in order. */
  ephemeral: readonly Uint8Array[]
}

export interface SealOptions {
  sender: string
  msgId: string
  /** [mailbox, its verified key record]; a repeated mailbox is kept once, at its first place. */
  recipients: Iterable<readonly [string, KeyRecord]>
  identity: Identity
  body: Uint8Array
  /** Pad the body to a multiple of this many bytes (default 256; 1: only the 0x80 byte). */
  padBlock?: number
  _rand?: SealRandomness
}

/** The SEND body, magic included. */
export function seal (options: SealOptions): Promise<Uint8Array>

/** An envelope's header, not verified. */
export interface Peeked {
  from: string
  id: string
  to: string[]
  ik: Uint8Array
  /** recipient -> kid of its wrapped key */
  kids: Map<string, string>
}

/** Throws E2EError ('plaintext' or 'malformed'). */
export function peek (body: Uint8Array): Peeked

export interface OpenEnvelopeOptions {
  sender: string
  msgId: string
  me: string
  /** The sender's pinned identity key. */
  senderIk: Uint8Array
  /** kid -> my current or a retired encryption key. */
  myKeys: ReadonlyMap<string, EncryptionKey>
}

/** The body; throws E2EError with the reason of the first failed check. */
export function openEnvelope (body: Uint8Array, options: OpenEnvelopeOptions): Promise<Uint8Array>
export function isEnvelope (body: Uint8Array): boolean
/** Six groups of five digits for `mailbox`'s identity key. */
export function fingerprint (mailbox: string, ik: Uint8Array): Promise<string>
/** Both fingerprints ordered by mailbox id (12 groups): the same for both people. */
export function safetyNumber (a: string, ikA: Uint8Array, b: string, ikB: Uint8Array): Promise<string>
