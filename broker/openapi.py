"""The OpenAPI 3.1 description of the HTTP API, served at ``/openapi.json``.

Hand-written, so it says what the API promises; ``test_openapi_matches_the_routes`` (tests/http/test_http.py) keeps it
in step with the app's routes (every route here and there, with request and response
schemas, error bodies and the bearer scheme).
"""

from __future__ import annotations

from typing import Any

__all__ = ["openapi_spec"]

_MESSAGE_ID = {"type": "string", "pattern": "^[\\x21-\\x7e]{1,64}$", "description": "1-64 printable ASCII characters"}
_MAILBOX = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$"}
_BYTES = {
    "type": "string",
    "contentEncoding": "base64",
    "description": "Standard base64 in JSON; a CBOR byte string in application/cbor.",
}
_UINT = {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["code", "message"],
        "properties": {
            "code": {"type": "integer", "description": "The protocol error code (see protocol.md, Errors)."},
            "message": {"type": "string"},
        },
    },
    "SendRequest": {
        "type": "object",
        "required": ["id", "to", "body"],
        "properties": {
            "id": {**_MESSAGE_ID, "description": "Sender-chosen id; retries with the same id are idempotent."},
            "to": {
                "type": "array",
                "minItems": 1,
                "items": {"type": "string", "maxLength": 64},
                "description": "Recipient mailbox ids; a longer element is a 400 (1004), an invalid one refused 3006.",
            },
            "body": _BYTES,
            "ttl_s": {
                "type": "integer",
                "minimum": 1,
                "maximum": 2**63 - 1,
                "description": "Default default_ttl_s; clamped to max_ttl_s.",
            },
        },
    },
    "RecipientResult": {
        "type": "object",
        "required": ["status"],
        "properties": {
            "status": {"enum": ["queued", "delivered", "duplicate", "refused"]},
            "code": {"type": "integer", "description": "The 3xxx refusal code when status is refused."},
        },
    },
    "Receipt": {
        "type": "object",
        "description": (
            "The RECEIPT frame: results per distinct recipient, or, for a SEND refused as a whole before any "
            "recipient was considered (nothing stored), code instead: 3004 (more than max_recipients distinct "
            "recipients) or 3007 (body longer than max_frame_bytes - 256); 3004 wins if both apply."
        ),
        "required": ["id"],
        "oneOf": [{"required": ["results"]}, {"required": ["code"]}],
        "properties": {
            "id": _MESSAGE_ID,
            "results": {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/RecipientResult"}},
            "code": {"type": "integer", "minimum": 1000, "description": "Why the whole SEND was refused."},
        },
    },
    "AckRequest": {
        "type": "object",
        "required": ["ids"],
        "properties": {"ids": {"type": "array", "minItems": 1, "items": _MESSAGE_ID}},
    },
    "AckResult": {
        "type": "object",
        "required": ["acknowledged"],
        "properties": {
            "acknowledged": {
                **_UINT,
                "description": "How many ids were held for the caller and are now deleted (others are ignored).",
            }
        },
    },
    "Message": {
        "type": "object",
        "required": ["id", "from", "sent_at", "expires_at", "attempt", "body"],
        "properties": {
            "id": _MESSAGE_ID,
            "from": _MAILBOX,
            "sent_at": {**_UINT, "description": "Unix epoch milliseconds."},
            "expires_at": {**_UINT, "description": "Unix epoch milliseconds."},
            "attempt": {**_UINT, "description": "Deliveries over WebSocket/TCP so far (0: never delivered)."},
            "body": _BYTES,
        },
    },
    "PendingResult": {
        "type": "object",
        "required": ["messages", "pending"],
        "properties": {
            "messages": {"type": "array", "items": {"$ref": "#/components/schemas/Message"}},
            "pending": {**_UINT, "description": "Unexpired messages held for the mailbox in all."},
        },
    },
    "StatsResult": {
        "type": "object",
        "required": ["stats"],
        "properties": {"stats": {"type": "object", "additionalProperties": _UINT}},
    },
    "CleanupResult": {"type": "object", "required": ["purged"], "properties": {"purged": _UINT}},
    "OpenApi": {"type": "object", "description": "This document."},
}


def _content(schema: str) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{schema}"}
    return {"application/json": {"schema": ref}, "application/cbor": {"schema": ref}}


_ERROR_TEXT = {
    "400": "Malformed body (1001) or an invalid field (1004).",
    "401": "Missing or invalid bearer token (2001) or an expired one (2002).",
    "403": "Forbidden for this token (2003).",
    "413": "Body above the size limit, or the message above max_frame_bytes as a SEND frame (1002).",
    "415": "Content-Type is neither application/json nor application/cbor (1001).",
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
        "responses": {"200": {"description": "OK", "content": _content(response)}, **_errors(*errors)},
    }
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
                "Accept. Every error body is {code, message} with the protocol's error code."
            ),
        },
        "paths": {
            "/relay/send": {
                "post": _operation(
                    "Queue a message: the SEND frame's semantics and receipt",
                    request="SendRequest",
                    response="Receipt",
                    errors=("400", "401", "403", "413", "415"),
                )
            },
            "/relay/acknowledge": {
                "post": _operation(
                    "ACK (delete) messages of the caller's own mailbox",
                    request="AckRequest",
                    response="AckResult",
                    errors=("400", "401", "403", "413", "415"),
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
                            "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                        }
                    ],
                )
            },
            "/relay/stats": {
                "get": _operation("Relay statistics (operator token)", response="StatsResult", errors=("401", "403"))
            },
            "/relay/cleanup": {
                "post": _operation(
                    "Purge expired messages now (operator token)", response="CleanupResult", errors=("401", "403")
                )
            },
            "/openapi.json": {
                "get": {
                    "summary": "This description",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "OK",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/OpenApi"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "schemas": _SCHEMAS,
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
