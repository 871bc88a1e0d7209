// Types of codec.js: the Relay wire codec (protocol.md sections 2 and 6). Hand-written, like
// client.d.ts and store.d.ts; test/types.test.mjs checks them against the modules at run time.
//
// Frames are plain objects, one interface per frame type, named as in protocol.md, joined in the
// `Frame` union (discriminated by `type`). A new frame type: an interface here, a member of
// `Frame`, and that is all (`FrameType` and `FrameOf` follow). A new optional field: a `?:`
// property on its interface. Integers are JS numbers (at most 2^53-1); byte strings are Uint8Array.

/** The protocol version this codec speaks (HELLO and WELCOME `version`). */
export const PROTOCOL_VERSION: 1
/** The frame-size limit a decoder applies unless told otherwise (WELCOME's `max_frame_bytes` default). */
export const DEFAULT_MAX_FRAME_BYTES: number
/** Any data item may sit inside at most this many arrays/maps (the top-level map counts). */
export const MAX_DEPTH: number
/** Longest free-text field (tokens, error messages), in code points. */
export const MAX_TEXT: number
/** Longest element of SEND `to`, and so of a RECEIPT `results` key, in code points. */
export const MAX_RECIPIENT_CHARS: number

/** Every error code of protocol.md section 7, by name. */
export const ERROR_CODES: Readonly<{
  MALFORMED_FRAME: 1001
  FRAME_TOO_LARGE: 1002
  UNEXPECTED_FRAME: 1003
  INVALID_FIELD: 1004
  UNKNOWN_FRAME_TYPE: 1005
  UNSUPPORTED_VERSION: 1006
  HANDSHAKE_TIMEOUT: 1007
  INVALID_TOKEN: 2001
  TOKEN_EXPIRED: 2002
  FORBIDDEN: 2003
  TOKEN_MISMATCH: 2004
  MAILBOX_FULL: 3001
  MAILBOX_BYTES_FULL: 3002
  BROKER_FULL: 3003
  TOO_MANY_RECIPIENTS: 3004
  ID_CONFLICT: 3005
  INVALID_RECIPIENT: 3006
  BODY_TOO_LARGE: 3007
  STORE_UNREACHABLE: 3008
  INVALID_KEY: 3009
  RATE_LIMITED: 3010
  CONNECTED_ELSEWHERE: 4001
  KEEPALIVE_TIMEOUT: 4002
  SLOW_CONSUMER: 4003
  SHUTTING_DOWN: 4004
  TOO_MANY_CONNECTIONS: 4005
  CONNECTION_RATE_LIMITED: 4006
  TOO_MANY_CONNECTIONS_FROM_ADDRESS: 4007
  INTERNAL_ERROR: 5001
  STORE_UNAVAILABLE: 5002
}>
export type ErrorCodeName = keyof typeof ERROR_CODES
export type ErrorCode = (typeof ERROR_CODES)[ErrorCodeName]

/** A protocol violation by the peer; `code` is the number from ERROR_CODES to report. */
export class ProtocolError extends Error {
  constructor (code: number, message: string)
  readonly code: number
  /** The code's name in ERROR_CODES, or the number as text for a code this codec does not know. */
  readonly codeName: string
}

/** This side tried to encode something the protocol forbids (a bug in the caller). */
export class LocalProtocolError extends ProtocolError {}

/** A mailbox id: 1-64 of A-Z a-z 0-9 . _ @ + -, not starting with punctuation. */
export function isValidMailboxId (value: unknown): value is string
/** A message id: 1-64 printable ASCII characters (0x21-0x7E). */
export function isValidMessageId (value: unknown): value is string
/** A key record's shape (protocol.md 6): ik and ek 32 bytes, kid a message id, sig 64 bytes. */
export function isKeyRecord (value: unknown): value is KeyRecord

// ------------------------------------------------------------------ frames

/** What the broker did for one recipient of a SEND (a RECEIPT's `results` value). */
export type RecipientResult =
  | { status: 'queued' | 'delivered' | 'duplicate', code?: undefined }
  /** `code` is a 3xxx code from ERROR_CODES. */
  | { status: 'refused', code: number }

export interface HelloFrame { type: 'hello', version: number, token: string, agent?: string }

export interface WelcomeFrame {
  type: 'welcome'
  version: number
  session: string
  /** Absent for an operator session. */
  mailbox?: string
  pending: number
  max_frame_bytes: number
  max_inflight: number
  max_recipients: number
  default_ttl_s: number
  max_ttl_s: number
  keepalive_s: number
  /** Whole seconds until the broker ends the session for its token's expiry, unless refreshed (rule 22). */
  expires_in_s: number
}

/** A newer token for the session's identity (rule 22). */
export interface RefreshFrame { type: 'refresh', token: string }
/** The REFRESH's token governs the session now; `expires_in_s` as in WELCOME. */
export interface RefreshedFrame { type: 'refreshed', expires_in_s: number }

export interface SendFrame {
  type: 'send'
  id: string
  to: string[]
  body: Uint8Array
  ttl_s?: number
  /** Ask for one STATUS per recipient (protocol.md 9, rule 19); decoded only when true (false is the same SEND). */
  notify?: boolean
}

/**
 * A RECEIPT carries exactly one of `results` (per recipient) and `code` (the whole SEND refused); `retry_after_ms`
 * only with `code` (the broker sends it with 3010 RATE_LIMITED: wait that long before resending).
 */
export type ReceiptFrame =
  | { type: 'receipt', id: string, results: Record<string, RecipientResult>, code?: undefined, retry_after_ms?: undefined }
  | { type: 'receipt', id: string, code: number, results?: undefined, retry_after_ms?: number }

export interface DeliverFrame {
  type: 'deliver'
  id: string
  from: string
  /** Unix epoch milliseconds. */
  sent_at: number
  /** Unix epoch milliseconds. */
  expires_at: number
  attempt: number
  body: Uint8Array
}

export interface AckFrame { type: 'ack', ids: string[] }

/** A STATUS frame's state: what became of a message for one recipient (not a RECEIPT result). */
export type ReportState = 'delivered' | 'expired' | 'overflow'
/** Every STATUS state. */
export const REPORT_STATES: readonly ReportState[]

/**
 * What became of a sent message for one recipient ("delivered": the recipient's device ACKed it;
 * "expired": it expired un-ACKed), or, as "overflow", how many statuses the broker folded into one
 * record (`count`, since the record was created with seq `first_seq`). `at` is Unix epoch ms.
 * ACKed by seq with STATUS_ACK.
 */
export type StatusFrame =
  | {
      type: 'status'
      seq: number
      state: 'delivered' | 'expired'
      at: number
      id: string
      recipient: string
      count?: undefined
      first_seq?: undefined
    }
  | {
      type: 'status'
      seq: number
      state: 'overflow'
      at: number
      count: number
      first_seq: number
      id?: undefined
      recipient?: undefined
    }

export interface StatusAckFrame { type: 'status_ack', seqs: number[] }
export interface PullFrame { type: 'pull' }
export interface DrainedFrame { type: 'drained', pending: number }
export interface PingFrame { type: 'ping' }
export interface PongFrame { type: 'pong' }
/** `retry_after_ms`: how long to wait before trying again (the broker sends it with 4006 CONNECTION_RATE_LIMITED). */
export interface ErrorFrame { type: 'error', code: number, message: string, close: boolean, retry_after_ms?: number }
export interface ByeFrame { type: 'bye' }
export interface StatsFrame { type: 'stats' }
export interface StatsResultFrame { type: 'stats_result', stats: Record<string, number> }
export interface CleanupFrame { type: 'cleanup' }
export interface CleanupResultFrame { type: 'cleanup_result', purged: number }

/**
 * A key-directory record (protocol.md 6, "Key record"): `ik` the Ed25519 identity public key (32 bytes), `kid` the
 * encryption key's id (message-id syntax), `ek` the X25519 public key (32 bytes), `sig` the Ed25519 signature by
 * `ik` over CBOR(["relay-e2e-key/1", mailbox, kid, ek]) (64 bytes). The codec checks the shape, not the signature.
 */
export interface KeyRecord { ik: Uint8Array, kid: string, ek: Uint8Array, sig: Uint8Array }
export interface KeyPutFrame { type: 'key_put', key: KeyRecord }
/** `code` (3009 INVALID_KEY, or 3008 STORE_UNREACHABLE) only when the record was not stored. */
export interface KeyPutResultFrame { type: 'key_put_result', kid: string, code?: number }
export interface KeyGetFrame { type: 'key_get', mailboxes: string[] }
/** Only the looked-up mailboxes that have a record. */
export interface KeyGetResultFrame { type: 'key_get_result', keys: Record<string, KeyRecord> }

/** Every frame of the protocol. */
export type Frame =
  | HelloFrame
  | WelcomeFrame
  | SendFrame
  | ReceiptFrame
  | DeliverFrame
  | AckFrame
  | StatusFrame
  | StatusAckFrame
  | PullFrame
  | DrainedFrame
  | PingFrame
  | PongFrame
  | ErrorFrame
  | ByeFrame
  | StatsFrame
  | StatsResultFrame
  | CleanupFrame
  | CleanupResultFrame
  | KeyPutFrame
  | KeyPutResultFrame
  | KeyGetFrame
  | KeyGetResultFrame
  | RefreshFrame
  | RefreshedFrame

/** A frame type name, as on the wire. */
export type FrameType = Frame['type']
/** The frame of one type: `FrameOf<'deliver'>` is DeliverFrame. */
export type FrameOf<T extends FrameType> = Extract<Frame, { type: T }>

/** Every frame type name, as on the wire. */
export const FRAME_TYPES: readonly FrameType[]

export interface DecodeOptions {
  /** Refuse (FRAME_TOO_LARGE) a frame body longer than this. */
  maxFrameBytes?: number
}

// ------------------------------------------------------------------ decoding

/** A value of the deterministic CBOR subset the e2e envelope uses (docs/e2e.md): maps keep their key order. */
export type DeterministicValue = string | Uint8Array | number | bigint | DeterministicValue[] | Map<DeterministicValue, DeterministicValue>
/**
 * One CBOR data item in the deterministic encoding, holding only text, bytes, unsigned integers,
 * arrays and maps (read as strictly as a frame, nothing after it, shortest heads); maps as Map in
 * wire order. Throws ProtocolError (MALFORMED_FRAME) otherwise.
 */
export function decodeDeterministic (data: Uint8Array): DeterministicValue
/** The deterministic CBOR encoding of such a value (Map keys in insertion order). Throws TypeError for anything else. */
export function encodeDeterministic (value: DeterministicValue): Uint8Array
/**
 * Decode one frame body (no length prefix).
 * Throws ProtocolError: FRAME_TOO_LARGE if the body exceeds maxFrameBytes (when given),
 * MALFORMED_FRAME, UNKNOWN_FRAME_TYPE or INVALID_FIELD. Throws TypeError for anything but a Uint8Array.
 */
export function decodeBody (body: Uint8Array, options?: DecodeOptions): Frame

/**
 * Decode one WebSocket binary message: one or more whole frames back to back, each with its
 * 4-byte prefix (protocol.md 2.5). Throws ProtocolError (MALFORMED_FRAME for an empty message or
 * one that ends inside a frame, FRAME_TOO_LARGE, or what a frame's body throws); nothing is
 * returned from a message that throws. maxFrameBytes defaults to DEFAULT_MAX_FRAME_BYTES.
 */
export function decodeMessage (message: Uint8Array, options?: DecodeOptions): Frame[]

/**
 * Turns a byte stream, in chunks of any size, into frames. After it throws, every later
 * feed throws the same error: close the connection.
 */
export class FrameDecoder {
  constructor (options?: DecodeOptions)
  maxFrameBytes: number
  /** Bytes received but not yet part of a whole frame. */
  readonly bufferedBytes: number
  /** Add bytes; return every frame now complete, in order. Throws ProtocolError. */
  feed (chunk: Uint8Array): Frame[]
}

// ------------------------------------------------------------------ encoding

/** The CBOR body of one frame, without the length prefix. Throws LocalProtocolError if the frame is not valid. */
export function encodeBody (frame: Frame): Uint8Array
/** One frame as on a byte stream: 4-byte big-endian length, then the CBOR body. Throws LocalProtocolError. */
export function encodeFrame (frame: Frame): Uint8Array
/**
 * Group encoded frames (each with its prefix, as encodeFrame gives them) into WebSocket binary
 * messages of at most maxMessageBytes each, in order, none split; a longer frame goes alone, and
 * so does every frame when maxMessageBytes is 0.
 */
export function packFrames (frames: readonly Uint8Array[], maxMessageBytes: number): Uint8Array[]
