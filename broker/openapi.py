"""The OpenAPI 3.1 description of the HTTP API, served at ``/openapi.json``.

Hand-written, so it says what the API promises; ``test_openapi_matches_the_routes`` (tests/http/test_http.py) keeps it
in step with the app's routes (every route here and there, with request and response
schemas, error bodies and the bearer scheme). The HTTP API's own limits (``limit`` of
``/relay/pending`` and ``/relay/statuses``) are defined here, once, and broker/http.py
checks requests against these same names. Object schemas are built by :func:`_object`
(every property required unless named optional), so their shape is written once.
"""

from __future__ import annotations

import copy
from typing import Any

from wire import MAX_RECIPIENT_CHARS, UINT_MAX

__all__ = ["DEFAULT_PENDING_LIMIT", "DEFAULT_STATUS_LIMIT", "MAX_PENDING_LIMIT", "MAX_STATUS_LIMIT", "openapi_spec"]

DEFAULT_PENDING_LIMIT = 100
"""Messages one ``GET /relay/pending`` returns unless ``limit`` says otherwise."""
MAX_PENDING_LIMIT = 1000
"""Largest ``limit``: keeps one response (up to 1000 bodies, each up to max_frame_bytes) bounded."""
DEFAULT_STATUS_LIMIT = 100
"""Statuses one ``GET /relay/statuses`` returns unless ``limit`` says otherwise."""
MAX_STATUS_LIMIT = 1000
"""Largest ``limit`` there: about 150 bytes each, so an answer stays under 200 KB."""

_MESSAGE_ID = {"type": "string", "pattern": "^[\\x21-\\x7e]{1,64}$", "description": "1-64 printable ASCII characters"}
_MAILBOX = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$"}
_BYTES = {
    "type": "string",
    "contentEncoding": "base64",
    "description": "Standard base64 in JSON; a CBOR byte string in application/cbor.",
}
_UINT = {"type": "integer", "minimum": 0, "maximum": UINT_MAX}


def _object(
    properties: dict[str, Any],
    *,
    optional: tuple[str, ...] = (),
    description: str | None = None,
    one_of: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """An object schema whose properties are all required except ``optional``."""
    schema: dict[str, Any] = {"type": "object"}
    if description is not None:
        schema["description"] = description
    schema["required"] = [name for name in properties if name not in optional]
    if one_of is not None:
        schema["oneOf"] = one_of
    schema["properties"] = properties
    return schema


def _ref(schema: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{schema}"}


_SCHEMAS: dict[str, Any] = {
    "Error": _object(
        {
            "code": {"type": "integer", "description": "The protocol error code (see protocol.md, Errors)."},
            "message": {"type": "string"},
            "retry_after_ms": {
                "type": "integer",
                "minimum": 0,
                "description": "429 only: milliseconds until the request would pass (Retry-After in whole seconds).",
            },
            "id": {**_MESSAGE_ID, "description": "429 from send only: the SEND's id (its receipt code is 3010)."},
        },
        optional=("retry_after_ms", "id"),
    ),
    "SendRequest": _object(
        {
            "id": {**_MESSAGE_ID, "description": "Sender-chosen id; retries with the same id are idempotent."},
            "to": {
                "type": "array",
                "minItems": 1,
                "items": {"type": "string", "maxLength": MAX_RECIPIENT_CHARS},
                "description": "Recipient mailbox ids; a longer element is a 400 (1004), an invalid one refused 3006.",
            },
            "body": _BYTES,
            "ttl_s": {**_UINT, "minimum": 1, "description": "Default default_ttl_s; clamped to max_ttl_s."},
            "notify": {
                "type": "boolean",
                "default": False,
                "description": (
                    "true: the sender's mailbox gets one delivery status per recipient the message is stored for, "
                    "'delivered' when that recipient ACKs it, or 'expired' (GET /relay/statuses, or STATUS frames)."
                ),
            },
        },
        optional=("ttl_s", "notify"),
    ),
    "RecipientResult": _object(
        {
            "status": {"enum": ["queued", "delivered", "duplicate", "refused"]},
            "code": {"type": "integer", "description": "The 3xxx refusal code when status is refused."},
        },
        optional=("code",),
    ),
    "Receipt": _object(
        {
            "id": _MESSAGE_ID,
            "results": {"type": "object", "additionalProperties": _ref("RecipientResult")},
            "code": {"type": "integer", "minimum": 1000, "description": "Why the whole SEND was refused."},
            "retry_after_ms": {
                "type": "integer",
                "minimum": 0,
                "description": "Only with code: when to send again (3010 RATE_LIMITED, answered as a 429).",
            },
        },
        optional=("results", "code", "retry_after_ms"),
        description=(
            "The RECEIPT frame: results per distinct recipient, or, for a SEND refused as a whole before any "
            "recipient was considered (nothing stored), code instead: 3004 (more than max_recipients distinct "
            "recipients) or 3007 (body longer than max_frame_bytes - 256); 3004 wins if both apply. Or 3008 "
            "(STORE_UNREACHABLE): the broker could not reach its store, and the message may or may not be stored: "
            "send it again later with the same id (where it was stored, the retry is duplicate)."
        ),
        one_of=[{"required": ["results"]}, {"required": ["code"]}],
    ),
    "AckRequest": _object({"ids": {"type": "array", "minItems": 1, "items": _MESSAGE_ID}}),
    "AckResult": _object(
        {
            "acknowledged": {
                **_UINT,
                "description": "How many ids were held for the caller and are now deleted (others are ignored).",
            }
        }
    ),
    "Message": _object(
        {
            "id": _MESSAGE_ID,
            "from": _MAILBOX,
            "sent_at": {**_UINT, "description": "Unix epoch milliseconds."},
            "expires_at": {**_UINT, "description": "Unix epoch milliseconds."},
            "attempt": {**_UINT, "description": "Deliveries over WebSocket/TCP so far (0: never delivered)."},
            "body": _BYTES,
        }
    ),
    "PendingResult": _object(
        {
            "messages": {"type": "array", "items": _ref("Message")},
            "pending": {**_UINT, "description": "Unexpired messages held for the mailbox in all."},
        }
    ),
    "DeliveryStatus": _object(
        {
            "seq": {
                **_UINT,
                "minimum": 1,
                "description": "Its number in the mailbox's status lane (increasing, not contiguous): ACK it by this.",
            },
            "state": {
                "enum": ["delivered", "expired", "overflow"],
                "description": (
                    "delivered: the recipient's device ACKed (saved) the message; expired: it expired un-ACKed; "
                    "overflow: the mailbox held max_mailbox_statuses statuses, and count more were folded into this "
                    "one."
                ),
            },
            "at": {**_UINT, "description": "Unix epoch milliseconds: the ACK, the expiry, or the latest fold."},
            "id": {**_MESSAGE_ID, "description": "The message (delivered and expired only)."},
            "recipient": {**_MAILBOX, "description": "The recipient it is about (delivered and expired only)."},
            "count": {**_UINT, "minimum": 1, "description": "Statuses folded into this one (overflow only)."},
            "first_seq": {
                **_UINT,
                "minimum": 1,
                "description": "The seq the overflow status had when it was made; kept as it grows (overflow only).",
            },
        },
        optional=("id", "recipient", "count", "first_seq"),
        description="The STATUS frame's fields: what became of a message the caller sent with notify, per recipient.",
        one_of=[{"required": ["id", "recipient"]}, {"required": ["count", "first_seq"]}],
    ),
    "StatusesResult": _object(
        {"statuses": {"type": "array", "items": _ref("DeliveryStatus"), "description": "In seq order."}}
    ),
    "StatusAckRequest": _object({"seqs": {"type": "array", "minItems": 1, "items": {**_UINT, "minimum": 1}}}),
    "StatusAckResult": _object(
        {
            "acknowledged": {
                **_UINT,
                "description": "How many seqs were held for the caller and are now deleted (others are ignored).",
            }
        }
    ),
    "KeyRecord": _object(
        {
            "ik": {**_BYTES, "description": "Ed25519 identity public key, 32 bytes raw."},
            "kid": {**_MESSAGE_ID, "description": "The encryption key's id."},
            "ek": {**_BYTES, "description": "X25519 encryption public key, 32 bytes raw."},
            "sig": {
                **_BYTES,
                "description": 'Ed25519 signature by ik over CBOR(["relay-e2e-key/1", mailbox, kid, ek]), 64 bytes.',
            },
        },
        description="A mailbox's key record in the public-key directory (protocol.md section 6, docs/e2e.md).",
    ),
    "KeyPutRequest": _object(
        {"key": {**_ref("KeyRecord"), "description": "The record, signed for the caller's own mailbox."}}
    ),
    "KeyPutResult": _object({"kid": {**_MESSAGE_ID, "description": "The stored record's kid."}}),
    "KeyGetResult": _object(
        {
            "keys": {
                "type": "object",
                "additionalProperties": _ref("KeyRecord"),
                "description": "Mailbox id -> its current record, only for the asked-for mailboxes that have one.",
            }
        }
    ),
    "StatsResult": _object({"stats": {"type": "object", "additionalProperties": _UINT}}),
    "CleanupResult": _object({"purged": _UINT}),
    "OpenApi": {"type": "object", "description": "This document."},
    "Metrics": {
        "type": "string",
        "description": "Prometheus text exposition format (docs/http-api.md, Metrics, lists every metric).",
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"const": "ok"}},
        "description": "The process answers.",
    },
    "Readiness": {
        "type": "object",
        "required": ["ready"],
        "properties": {
            "ready": {"type": "boolean"},
            "reason": {"type": "string", "description": "Why not (503 only): draining, store unreachable, starting."},
        },
    },
}


METRICS_MEDIA = "text/plain"
"""The media type /metrics is described with (its answer's Content-Type adds the format's version)."""


def _content(schema: str, media: tuple[str, ...] = ("application/json", "application/cbor")) -> dict[str, Any]:
    return {m: {"schema": _ref(schema)} for m in media}


_BODY_ERRORS = ("400", "401", "403", "413", "415")
"""What an endpoint that reads a request body can answer besides 200."""
_ERROR_TEXT = {
    "400": "Malformed body (1001) or an invalid field (1004).",
    "401": "Missing or invalid bearer token (2001) or an expired one (2002).",
    "403": "Forbidden for this token (2003).",
    "413": "Body above the size limit, or the message above max_frame_bytes as a SEND frame (1002).",
    "415": "Content-Type is neither application/json nor application/cbor (1001).",
    "422": "The key record's signature does not verify for the caller's mailbox (3009 INVALID_KEY): nothing stored.",
    "429": (
        "Too many requests (protocol.md rule 21): from this address, 4006 CONNECTION_RATE_LIMITED, judged before the "
        "token; on send also a SEND past its address's or mailbox's rate, {id, code: 3010, retry_after_ms, "
        "message}: nothing stored, send it again with the same id. Retry after the Retry-After seconds "
        "(retry_after_ms in the body)."
    ),
    "503": (
        "The broker cannot reach its store (5002): retry after the Retry-After seconds. (send answers a 3008 "
        "receipt instead, and stats the node's own figures.)"
    ),
}


def _errors(*statuses: str) -> dict[str, Any]:
    return {s: {"description": _ERROR_TEXT[s], "content": _content("Error")} for s in statuses}


def _operation(
    summary: str,
    *,
    response: str,
    request: str | None = None,
    errors: tuple[str, ...],
    secured: bool = True,
    parameters: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        # Every operation works on the store, so each may meet an unreachable one (503).
        "responses": {"200": {"description": "OK", "content": _content(response)}, **_errors(*errors, "503")},
    }
    if secured:  # every request with a token counts against its address's rate (429)
        op["responses"].update(_errors("429"))
    if request is not None:
        op["requestBody"] = {"required": True, "content": _content(request)}
    if parameters:
        op["parameters"] = parameters
    op["security"] = [{"bearer": []}] if secured else []
    return op


def openapi_spec() -> dict[str, Any]:
    """The whole document (a fresh dict each call)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Relay HTTP API",
            "version": "1",
            "description": (
                "A fallback for clients without WebSockets, with the same semantics as the protocol's frames. "
                "Bodies are JSON (byte strings base64) or CBOR (application/cbor), chosen by Content-Type and "
                "Accept. Every error body is {code, message} with the protocol's error code. Pages on other "
                "origins get CORS (preflight included, no credentials) if the broker allows the origin, by the "
                "WebSocket's rule: its own origins and allowed_origins (docs/http-api.md)."
            ),
        },
        "paths": {
            "/relay/send": {
                "post": _operation(
                    "Queue a message: the SEND frame's semantics and receipt",
                    request="SendRequest",
                    response="Receipt",
                    errors=_BODY_ERRORS,
                )
            },
            "/relay/acknowledge": {
                "post": _operation(
                    "ACK (delete) messages of the caller's own mailbox",
                    request="AckRequest",
                    response="AckResult",
                    errors=_BODY_ERRORS,
                )
            },
            "/relay/pending": {
                "get": _operation(
                    "The caller's held messages, oldest first; they stay held until ACKed",
                    response="PendingResult",
                    errors=("400", "401", "403"),
                    parameters=[
                        {
                            "name": "limit",
                            "in": "query",
                            "required": False,
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": MAX_PENDING_LIMIT,
                                "default": DEFAULT_PENDING_LIMIT,
                            },
                        }
                    ],
                )
            },
            "/relay/statuses": {
                "get": _operation(
                    "The caller's delivery statuses after a seq, in seq order; they stay held until acknowledged",
                    response="StatusesResult",
                    errors=("400", "401", "403"),
                    parameters=[
                        {
                            "name": "after",
                            "in": "query",
                            "required": False,
                            "description": "Only statuses with a greater seq (0: from the first).",
                            "schema": {**_UINT, "default": 0},
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "required": False,
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": MAX_STATUS_LIMIT,
                                "default": DEFAULT_STATUS_LIMIT,
                            },
                        },
                    ],
                )
            },
            "/relay/statuses/acknowledge": {
                "post": _operation(
                    "STATUS_ACK: delete delivery statuses of the caller's own mailbox by seq",
                    request="StatusAckRequest",
                    response="StatusAckResult",
                    errors=_BODY_ERRORS,
                )
            },
            "/relay/keys": {
                "put": _operation(
                    "KEY_PUT: publish the caller's own mailbox's key record (replacing its previous one)",
                    request="KeyPutRequest",
                    response="KeyPutResult",
                    errors=(*_BODY_ERRORS, "422"),
                ),
                "get": _operation(
                    "KEY_GET: the current key records of some mailboxes (any mailbox token may look up any mailbox)",
                    response="KeyGetResult",
                    errors=("400", "401", "403"),
                    parameters=[
                        {
                            "name": "mailbox",
                            "in": "query",
                            "required": True,
                            "description": (
                                "A mailbox id to look up; repeat the parameter for more (1 to max_recipients of them, "
                                "each at most 64 characters; one that is not a mailbox id has no record)."
                            ),
                            "schema": {"type": "string", "maxLength": MAX_RECIPIENT_CHARS},
                            "style": "form",
                            "explode": True,
                        }
                    ],
                ),
            },
            "/relay/stats": {
                "get": _operation("Relay statistics (operator token)", response="StatsResult", errors=("401", "403"))
            },
            "/relay/cleanup": {
                "post": _operation(
                    "Purge expired messages now (operator token)", response="CleanupResult", errors=("401", "403")
                )
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics: open to metrics_open_networks (loopback), else an operator token",
                    # No token needed from the open networks, an operator token from anywhere else.
                    "security": [{}, {"bearer": []}],
                    "responses": {
                        "200": {"description": "OK", "content": _content("Metrics", (METRICS_MEDIA,))},
                        **_errors("401", "403"),
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Liveness: the process answers (no token, no store call)",
                    "security": [],
                    "responses": {"200": {"description": "OK", "content": _content("Health", ("application/json",))}},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness: listening, not draining, the store reachable (no token)",
                    "security": [],
                    "responses": {
                        "200": {"description": "Ready", "content": _content("Readiness", ("application/json",))},
                        "503": {"description": "Not ready", "content": _content("Readiness", ("application/json",))},
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This description",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "OK",
                            "content": _content("OpenApi", ("application/json",)),
                        }
                    },
                }
            },
        },
        "components": {
            "schemas": copy.deepcopy(_SCHEMAS),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "A Relay token (relay-broker token <mailbox> [--operator]).",
                }
            },
        },
        "security": [{"bearer": []}],
    }
