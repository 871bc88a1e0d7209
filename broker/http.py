"""The HTTP API (a fallback for clients without WebSockets), the OpenAPI description and the demo page.

Theory of operation. A small Starlette app served by hypercorn's trio worker in the
broker's nursery. It is given the broker's parts (:class:`BrokerParts`: router, presence,
statistics, auth, config), the same ones a session gets, never the Broker itself. Every
endpoint is a thin translation onto the funnel every transport uses, so semantics cannot
drift: ``POST /relay/send`` is :meth:`Router.route <broker.router.Router.route>` then
``presence.wake`` (idempotency, limits, TTL, receipts; an online recipient gets its
DELIVER before the answer), ``POST /relay/acknowledge`` is ``router.acknowledge`` then
``presence.resync`` (the mailbox's live session recounts its window), ``GET /relay/pending``
is ``router.peek`` and ``router.pending`` (changes nothing: messages stay held until
ACKed), ``GET /relay/statuses`` is ``router.statuses`` (the mailbox's delivery statuses
after a seq; changes nothing either), ``POST /relay/statuses/acknowledge`` is
``router.acknowledge_statuses`` (STATUS_ACK), ``PUT /relay/keys`` is ``router.put_key``
(KEY_PUT, for the token's own mailbox) and ``GET /relay/keys`` ``router.get_keys``
(KEY_GET), ``/relay/stats`` is
``stats.snapshot().to_wire()`` (the STATS_RESULT map) and ``/relay/cleanup`` is
``router.cleanup`` (the one expiry path). Tokens are the same JWTs, sent as
``Authorization: Bearer``. Pages on other origins get CORS (:class:`broker.origins.Cors`) by the
WebSocket listener's own origin policy (``BrokerParts.origins``).

Bodies are JSON (``application/json``, byte strings as standard base64) or CBOR
(``application/cbor``, byte strings native), chosen by ``Content-Type`` for requests
and ``Accept`` for responses (a POST without ``Accept`` is answered in its own type).
The field names are the protocol's frame fields. Every error, whatever its cause, is
``{"code": <protocol error code>, "message": "..."}`` with a fitting HTTP status; the
message names the field as docs/http-api.md does, what was expected and the limit:

====== ===================================================== ===================
status cause                                                 code
====== ===================================================== ===================
400    body not valid JSON/CBOR, or not a map                1001 MALFORMED_FRAME
400    a field missing, ill-typed or out of range             1004 INVALID_FIELD
401    no/invalid bearer token; expired token                 2001 / 2002
403    operator-only endpoint, or mailbox endpoint + operator 2003 FORBIDDEN
404    no such route                                          1005 UNKNOWN_FRAME_TYPE
405    method not allowed on the route                        1003 UNEXPECTED_FRAME
413    body above the limit (the SEND frame > max_frame_bytes) 1002 FRAME_TOO_LARGE
415    Content-Type neither JSON nor CBOR                     1001 MALFORMED_FRAME
422    a key record whose signature does not verify           3009 INVALID_KEY
429    requests from the client's address come too fast      4006 CONNECTION_RATE_LIMITED
       (Retry-After; and send: a SEND past its rate, 429 with the receipt's {id, code 3010, retry_after_ms})
500    broker fault                                           5001 INTERNAL_ERROR
503    the store (Redis) cannot be reached (Retry-After: 1)   5002 STORE_UNAVAILABLE
       (not send: a 3008 receipt, as the RECEIPT frame; nor stats: the node's figures)
====== ===================================================== ===================

A SEND refused as a whole (more than ``max_recipients`` distinct recipients: 3004, a body
longer than ``max_frame_bytes`` - 256: 3007) is a 200 whose receipt has ``code`` instead
of ``results``, exactly like the RECEIPT frame; so is one the store could not take (3008
STORE_UNREACHABLE: the router answers it, whatever the transport).

Answering before the request body is in. Many answers come before the body is read
(401, 403, 404, 405, 415, and 413 as soon as a body passes the limit). Hypercorn then
closes the connection at once, with the rest of the upload unread: the kernel answers the
client's further data with a reset, and since the answer carried no ``Connection: close``,
a client that pools connections (httpx) sends its next request into the closed one
("Server disconnected without sending a response"). :class:`_FinishUpload` prevents both:
such an answer says ``Connection: close``, is sent in full, and then the rest of the
upload is read and discarded (up to :data:`DRAIN_MAX_BYTES` and :data:`DRAIN_TIMEOUT_S`)
before the exchange ends, so a client that writes its whole body before reading still
reads the answer, and the connection closes cleanly.

Status lines carry no reason phrase (hypercorn writes ``HTTP/1.1 413 ``, which HTTP/1.1
allows): clients read the status code only (protocol.md section 2.6).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import ssl
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import cbor2
import trio
from starlette import types as asgi
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from wire import (
    MAX_RECIPIENT_CHARS,
    UINT_MAX,
    Ack,
    ErrorCode,
    KeyRecord,
    Receipt,
    RemoteProtocolError,
    Send,
    StatusAck,
    StatusReport,
    decode_item,
    encode_frame,
    is_valid_message_id,
)

from .auth import Authenticator, AuthError, Identity
from .config import BrokerConfig
from .health import StoreHealth
from .limits import Limiter, retry_after_ms
from .listeners import port_of
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import ScrapeRule
from .metrics import render as render_metrics
from .openapi import (
    DEFAULT_PENDING_LIMIT,
    DEFAULT_STATUS_LIMIT,
    MAX_PENDING_LIMIT,
    MAX_STATUS_LIMIT,
    openapi_spec,
)
from .origins import Cors, OriginPolicy
from .presence import Presence
from .router import Router, SendOutcome
from .stats import Stats
from .store.base import HeldStatus
from .tls import ServerTLS

__all__ = ["ApiError", "BrokerParts", "JS_DIR", "create_app", "serve_http"]

log = logging.getLogger(__name__)

JSON = "application/json"
CBOR = "application/cbor"
BODY_SLACK_BYTES = 64 * 1024
"""Room above the encoded body size for ids, recipients and JSON punctuation."""
DRAIN_MAX_BYTES = 16 * 1024 * 1024
"""After answering before a request body is in, read and discard at most this much more of it.

Enough for a client that writes a body of a few times the limit before it reads (httpx,
requests, curl without ``Expect``) to finish writing and read the answer; beyond it the
connection is closed with the upload unread. Reading and discarding holds no memory."""
DRAIN_TIMEOUT_S = 5.0
"""...and for at most this long, so a slow uploader cannot keep a refused request open."""
_F = TypeVar("_F", Send, Ack, StatusAck)


JS_DIR = Path(__file__).resolve().parent.parent / "client" / "js"
"""The browser client's ES modules and their dependencies' (``npm ci`` there), served under ``/js/``.

``client/js`` is not package data: it exists in a checkout (or an editable install of one), where it
sits beside this ``broker`` package. Found from this file, not by looking a ``client`` package up on
``sys.path``, so another installed ``client`` cannot change what the demo page serves."""
_JS_FILE = re.compile(
    r"[A-Za-z0-9_-]+\.js|node_modules/(?:cborg|@hpke/core|@hpke/common)/(?:[A-Za-z0-9_-]+/)*[A-Za-z0-9_.-]+\.js"
)
"""What ``/js/`` serves: the client's modules, and the ES modules of the packages the demo page imports (cborg,
@hpke/core and the @hpke/common it imports), nothing else of node_modules."""


@dataclass(frozen=True, slots=True)
class BrokerParts:
    """What the HTTP API works with: the broker's parts (the ones a session gets), not the Broker."""

    config: BrokerConfig
    auth: Authenticator
    router: Router
    presence: Presence
    stats: Stats
    ws_port: int
    """The WebSocket listener's port, for the demo page served over HTTP."""
    ready: Callable[[], str | None]
    """Why the broker is not ready for new clients (``GET /readyz``), or None: :attr:`Broker.ready`."""
    wss_port: int | None = None
    """The ``wss://`` listener's port, for the demo page served over HTTPS (its WebSocket must be TLS too)."""
    origins: OriginPolicy = field(default_factory=lambda: OriginPolicy(()))
    """Which browser origins get CORS (:class:`~broker.origins.Cors`): the Broker gives the WebSocket
    listener's own policy; by default no other origin."""
    limiter: Limiter | None = None
    """The node's abuse limits (the Broker's): every request with a token counts as a connection of its client's
    address, every SEND as a SEND (the router's). None: no limits."""


class ApiError(Exception):
    """An error answer: HTTP ``status`` and the protocol ``code`` that goes in the body."""

    def __init__(
        self,
        status: int,
        code: ErrorCode,
        message: str,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})
        """Fields the error body carries besides ``code`` and ``message`` (a 429's ``retry_after_ms``)."""


# ------------------------------------------------------------------ content negotiation


def _media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


def _answer_in_cbor(request: Request) -> bool:
    """CBOR if ``Accept`` prefers it; with no ``Accept`` or a wildcard, a CBOR request gets a CBOR answer."""
    accept = request.headers.get("accept")
    sent_cbor = _media_type(request.headers.get("content-type")) == CBOR
    if not accept:
        return sent_cbor
    best_q = {JSON: -1.0, CBOR: -1.0}
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            if param.startswith("q="):
                try:
                    q = float(param[2:])
                except ValueError:
                    q = 0.0
        media = media.lower()
        if media in best_q:
            best_q[media] = max(best_q[media], q)
        elif media in ("*/*", "application/*"):
            # A wildcard prefers the request's own type, else JSON.
            preferred = CBOR if sent_cbor else JSON
            best_q[preferred] = max(best_q[preferred], q - 0.001)
    return best_q[CBOR] > 0 and best_q[CBOR] > best_q[JSON]


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _respond(request: Request, payload: Mapping[str, Any], status: int = 200, **headers: str) -> Response:
    if _answer_in_cbor(request):
        return Response(cbor2.dumps(dict(payload)), status_code=status, media_type=CBOR, headers=headers or None)
    body = json.dumps(_jsonable(payload), separators=(",", ":")).encode()
    return Response(body, status_code=status, media_type=JSON, headers=headers or None)


def _error_response(
    request: Request,
    status: int,
    code: ErrorCode,
    message: str,
    headers: Mapping[str, str] | None = None,
    fields: Mapping[str, Any] | None = None,
) -> Response:
    extra = dict(headers or {})
    if status == 401:
        extra["WWW-Authenticate"] = 'Bearer realm="relay"'
    return _respond(request, {"code": int(code), "message": message, **(fields or {})}, status, **extra)


# ------------------------------------------------------------------ request bodies


def _invalid(message: str) -> ApiError:
    return ApiError(400, ErrorCode.INVALID_FIELD, message)


def _malformed(message: str) -> ApiError:
    return ApiError(400, ErrorCode.MALFORMED_FRAME, message)


class _DuplicateKey(ValueError):
    pass


class _NotJsonConstant(ValueError):
    pass


def _reject_constant(name: str) -> NoReturn:
    raise _NotJsonConstant(name)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _parse_json(data: bytes) -> Any:
    """The JSON body, or ApiError(400, 1001) saying in user terms what is wrong with it."""
    if not data.strip():
        raise _malformed("the request body is empty: send a JSON object")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _malformed(
            f"the request body is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "JSON must be UTF-8"
        ) from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except _DuplicateKey as exc:
        raise _malformed(f'the request body is not valid JSON for Relay: the key "{exc}" appears twice') from None
    except _NotJsonConstant as exc:
        raise _malformed(f"the request body is not valid JSON: {exc} is not a JSON number") from None
    except json.JSONDecodeError as exc:
        raise _malformed(
            f"the request body is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None
    except RecursionError:
        raise _malformed("the request body is not valid JSON for Relay: it is nested too deeply") from None


def _parse_cbor(data: bytes) -> Any:
    """The CBOR body, decoded as strictly as a frame, or ApiError(400, 1001)."""
    if not data:
        raise _malformed("the request body is empty: send a CBOR map")
    try:
        return decode_item(data)
    except RemoteProtocolError as exc:
        detail = exc.message.removeprefix("invalid CBOR: ")
        if detail.startswith("premature end of stream"):
            detail = "the data ends inside an item"
        elif tag := re.fullmatch(r"error decoding semantic tag (\d+)", detail):
            detail = f"tags are not allowed (tag {tag[1]})"
        raise _malformed(f"the request body is not strict CBOR (protocol.md section 2.2): {detail}") from None


async def _read_map(request: Request, limit: int) -> tuple[dict[str, Any], bool]:
    """The request body as a map with text keys, and whether it came as JSON (bytes in base64)."""
    media = _media_type(request.headers.get("content-type"))
    if media not in (JSON, CBOR):
        given = f"not {media}" if media else "none was given"
        raise ApiError(415, ErrorCode.MALFORMED_FRAME, f"Content-Type must be {JSON} or {CBOR} ({given})")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(
            413, ErrorCode.FRAME_TOO_LARGE, f"the request body is {int(declared)} bytes; the limit is {limit} bytes"
        )
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, ErrorCode.FRAME_TOO_LARGE, f"the request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    data = b"".join(chunks)
    item = _parse_json(data) if media == JSON else _parse_cbor(data)
    if type(item) is not dict or not all(type(k) is str for k in item):
        shape = "a JSON object" if media == JSON else "a CBOR map with text keys"
        raise _malformed(f"the request body must be {shape}")
    return item, media == JSON


_JSON_TYPE_NAMES = {
    str: "text",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    list: "an array",
    dict: "an object",
}
_CBOR_TYPE_NAMES = {
    str: "text",
    bytes: "a byte string",
    int: "an integer",
    float: "a float",
    bool: "a boolean",
    list: "an array",
    dict: "a map",
}


def _kind(value: Any, is_json: bool) -> str:
    names = _JSON_TYPE_NAMES if is_json else _CBOR_TYPE_NAMES
    return names.get(type(value), "something else")


def _field(item: Mapping[str, Any], name: str, what: str, *, required: bool = True) -> Any:
    """``item[name]``; refuses a missing required field and a null (never a stand-in for absent)."""
    if name not in item:
        if required:
            raise _invalid(f'the field "{name}" is missing: it must be {what}')
        return None
    value = item[name]
    if value is None:
        hint = "" if required else " (leave it out for the default)"
        raise _invalid(f'"{name}" must be {what}, not null{hint}')
    return value


def _message_id(value: Any, where: str, is_json: bool) -> str:
    if not is_valid_message_id(value):
        detail = f"{len(value)} characters" if isinstance(value, str) and len(value) > 64 else _kind(value, is_json)
        if isinstance(value, str) and detail == "text":
            detail = "text with a space, a control or a non-ASCII character" if value else "empty text"
        raise _invalid(f"{where} must be a message id: 1-64 printable ASCII characters (0x21-0x7E), got {detail}")
    return str(value)


def _send_from(item: Mapping[str, Any], is_json: bool, max_ttl_s: int) -> Send:
    """The SEND frame a ``/relay/send`` body describes, or ApiError(400, 1004) naming the field."""
    mid = _message_id(_field(item, "id", "a message id: 1-64 printable ASCII characters"), '"id"', is_json)
    to = _recipients(item, is_json)
    body = _body(item, is_json)
    ttl_s = _ttl(item, is_json, max_ttl_s)
    notify = _notify(item, is_json)
    return _frame_from(
        Send,
        {
            "id": mid,
            "to": to,
            "body": body,
            **({} if ttl_s is None else {"ttl_s": ttl_s}),
            **({"notify": True} if notify else {}),
        },
    )


def _recipients(item: Mapping[str, Any], is_json: bool) -> list[str]:
    """``to``: a non-empty array of text, each at most MAX_RECIPIENT_CHARS (the rest is the router's 3006)."""
    what = "a non-empty array of recipient mailbox ids"
    to = _field(item, "to", what)
    if type(to) is not list or not to:
        got = "an empty array" if type(to) is list else _kind(to, is_json)
        raise _invalid(f'"to" must be {what}, got {got}')
    for i, name in enumerate(to):
        if type(name) is not str:
            raise _invalid(f'"to[{i}]" must be a mailbox id (text), got {_kind(name, is_json)}')
        if len(name) > MAX_RECIPIENT_CHARS:
            raise _invalid(
                f'"to[{i}]" is {len(name)} characters long; a recipient is at most {MAX_RECIPIENT_CHARS} characters'
            )
    return to


def _body(item: Mapping[str, Any], is_json: bool) -> bytes:
    """``body``: standard base64 text in JSON, a byte string in CBOR."""
    what = "the message as standard base64 text" if is_json else "the message as a CBOR byte string"
    raw = _field(item, "body", what)
    if not is_json:
        if type(raw) is not bytes:
            raise _invalid(f'"body" must be {what}, got {_kind(raw, is_json)}')
        return raw
    if type(raw) is not str:
        raise _invalid(f'"body" must be {what}, got {_kind(raw, is_json)}')
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid(
            '"body" must be standard base64 (A-Z, a-z, 0-9, +, / and = padding to a multiple of 4 characters)'
        ) from None


def _ttl(item: Mapping[str, Any], is_json: bool, max_ttl_s: int) -> int | None:
    """``ttl_s``, optional: a whole number of seconds from 1 to 2^63-1 (the router clamps it to max_ttl_s)."""
    what = f"a whole number of seconds, at least 1 (larger than max_ttl_s, {max_ttl_s}, is clamped to it)"
    ttl_s = _field(item, "ttl_s", what, required=False)
    if type(ttl_s) is int and ttl_s > UINT_MAX:
        raise _invalid(
            f'"ttl_s" is above the largest integer of the protocol (2^63-1); give at most {max_ttl_s} '
            "(max_ttl_s): a message is kept no longer"
        )
    if ttl_s is not None and (type(ttl_s) is not int or ttl_s < 1):
        got = str(ttl_s) if type(ttl_s) is int else _kind(ttl_s, is_json)
        raise _invalid(f'"ttl_s" must be {what}, got {got}')
    return ttl_s


def _notify(item: Mapping[str, Any], is_json: bool) -> bool:
    """``notify``, optional: true asks for a delivery status per recipient (absent: false)."""
    what = "true or false (true: a delivery status per recipient, in /relay/statuses)"
    notify = _field(item, "notify", what, required=False)
    if notify is not None and type(notify) is not bool:
        raise _invalid(f'"notify" must be {what}, got {_kind(notify, is_json)}')
    return notify is True


def _status_ack_from(item: Mapping[str, Any], is_json: bool) -> StatusAck:
    """The STATUS_ACK frame a ``/relay/statuses/acknowledge`` body describes, or ApiError(400, 1004)."""
    what = "a non-empty array of status seqs (whole numbers from 1)"
    seqs = _field(item, "seqs", what)
    if type(seqs) is not list or not seqs:
        got = "an empty array" if type(seqs) is list else _kind(seqs, is_json)
        raise _invalid(f'"seqs" must be {what}, got {got}')
    for i, seq in enumerate(seqs):
        if type(seq) is not int or not 1 <= seq <= UINT_MAX:
            got = str(seq) if type(seq) is int else _kind(seq, is_json)
            raise _invalid(f'"seqs[{i}]" must be a status seq: a whole number from 1 to 2^63-1, got {got}')
    return _frame_from(StatusAck, {"seqs": seqs})


_KEY_FIELDS = {
    "ik": "the Ed25519 identity public key (32 bytes)",
    "kid": "the key id",
    "ek": "the X25519 encryption public key (32 bytes)",
    "sig": "the signature (64 bytes)",
}


def _key_record_from(item: Mapping[str, Any], is_json: bool) -> KeyRecord:
    """The key record a ``PUT /relay/keys`` body carries in ``key``, or ApiError(400, 1004) naming the field."""
    what = "a key record object {ik, kid, ek, sig}" if is_json else "a key record map {ik, kid, ek, sig}"
    key = _field(item, "key", what)
    if type(key) is not dict:
        raise _invalid(f'"key" must be {what}, got {_kind(key, is_json)}')
    fields: dict[str, Any] = {}
    for name, meaning in _KEY_FIELDS.items():
        if name not in key:
            raise _invalid(f'the field "key.{name}" is missing: it must be {meaning}')
        value = key[name]
        if value is None:
            raise _invalid(f'"key.{name}" must be {meaning}, not null')
        if is_json and name != "kid":
            if type(value) is not str:
                raise _invalid(f'"key.{name}" must be {meaning} as standard base64 text, got {_kind(value, is_json)}')
            try:
                value = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise _invalid(f'"key.{name}" must be standard base64 (A-Z, a-z, 0-9, +, / and = padding)') from None
        fields[name] = value
    try:
        return KeyRecord.from_map(fields)
    except ValueError as exc:
        raise _invalid(f'"key": {exc}') from None


def _lookup_mailboxes(request: Request, max_recipients: int) -> list[str]:
    """The ``mailbox`` query parameters of ``GET /relay/keys``: 1 to max_recipients, each at most 64 characters."""
    names = request.query_params.getlist("mailbox")
    if not names:
        raise _invalid('the query parameter "mailbox" is missing: give one or more mailbox ids (?mailbox=a&mailbox=b)')
    if len(names) > max_recipients:
        raise _invalid(f'at most max_recipients ({max_recipients}) "mailbox" parameters, got {len(names)}')
    for i, name in enumerate(names):
        if len(name) > MAX_RECIPIENT_CHARS:
            raise _invalid(
                f'"mailbox" parameter {i + 1} is {len(name)} characters long; a mailbox id is at most '
                f"{MAX_RECIPIENT_CHARS} characters"
            )
    return names


def _query_int(request: Request, name: str, default: int, lowest: int, highest: int) -> int:
    """A whole-number query parameter within [lowest, highest], or ApiError(400, 1004) naming it."""
    raw = request.query_params.get(name, str(default))
    if not raw.isdigit() or not lowest <= int(raw) <= highest:
        raise _invalid(f'the query parameter "{name}" must be a whole number from {lowest} to {highest}, got {raw!r}')
    return int(raw)


def _ack_from(item: Mapping[str, Any], is_json: bool) -> Ack:
    """The ACK frame a ``/relay/acknowledge`` body describes, or ApiError(400, 1004) naming the field."""
    what = "a non-empty array of message ids"
    ids = _field(item, "ids", what)
    if type(ids) is not list or not ids:
        got = "an empty array" if type(ids) is list else _kind(ids, is_json)
        raise _invalid(f'"ids" must be {what}, got {got}')
    checked = [_message_id(value, f'"ids[{i}]"', is_json) for i, value in enumerate(ids)]
    return _frame_from(Ack, {"ids": checked})


def _frame_from(cls: type[_F], item: Mapping[str, Any]) -> _F:
    """The frame, built through the protocol's own checks (the fields were checked above)."""
    try:
        return cls.from_wire(item)
    except RemoteProtocolError as exc:  # a rule the checks above do not know yet: still the protocol's words
        raise ApiError(400, exc.code, exc.message.removeprefix(f"{cls.TYPE}: ")) from None


# ------------------------------------------------------------------ the app


class _Api:
    def __init__(self, parts: BrokerParts) -> None:
        self.parts = parts
        limit = parts.config.max_frame_bytes
        self.max_frame_bytes = limit
        # base64 in JSON grows a body by 4/3.
        self.max_request_bytes = limit * 4 // 3 + BODY_SLACK_BYTES
        self.scrape_rule = ScrapeRule(parts.config.metrics_open_networks)

    def identity(self, request: Request) -> Identity:
        limiter = self.parts.limiter
        if limiter is not None and (refused := limiter.connect(_client_address(request), counted=False)):
            ms = retry_after_ms(refused[1])
            raise ApiError(
                429,
                ErrorCode.CONNECTION_RATE_LIMITED,
                "requests from this address come too fast; retry after Retry-After seconds",
                _retry_after(ms),
                {"retry_after_ms": ms},
            )
        header = request.headers.get("authorization")
        if header is None:
            raise ApiError(401, ErrorCode.INVALID_TOKEN, "no token: send the header 'Authorization: Bearer <token>'")
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            raise ApiError(
                401, ErrorCode.INVALID_TOKEN, f"the Authorization header must be 'Bearer <token>', not '{scheme} ...'"
            )
        if not token.strip():
            raise ApiError(401, ErrorCode.INVALID_TOKEN, "the Authorization header has no token after 'Bearer'")
        try:
            identity = self.parts.auth.verify(token.strip())
        except AuthError as exc:
            raise ApiError(401, exc.code, f"the bearer token is refused ({exc.message})") from None
        return identity

    def mailbox(self, request: Request) -> str:
        identity = self.identity(request)
        if identity.operator:
            raise ApiError(403, ErrorCode.FORBIDDEN, "an operator token has no mailbox: use a mailbox token here")
        return identity.name

    def operator(self, request: Request) -> Identity:
        identity = self.identity(request)
        if not identity.operator:
            raise ApiError(
                403, ErrorCode.FORBIDDEN, "this endpoint needs an operator token (relay-broker token NAME --operator)"
            )
        return identity

    async def send(self, request: Request) -> Response:
        mailbox = self.mailbox(request)
        item, is_json = await _read_map(request, self.max_request_bytes)
        send = _send_from(item, is_json, self.parts.config.max_ttl_s)
        frame_bytes = len(encode_frame(send)) - 4
        if frame_bytes > self.max_frame_bytes:
            raise ApiError(
                413,
                ErrorCode.FRAME_TOO_LARGE,
                f"the message is {frame_bytes} bytes as a SEND frame; the limit is max_frame_bytes, "
                f"{self.max_frame_bytes} bytes",
            )
        routed = await self.parts.router.route(mailbox, [send], _client_address(request))
        await self.parts.presence.wake(routed.wake)  # an online recipient's DELIVER goes out before this answer
        (outcome,) = routed.receipts
        if outcome.code == ErrorCode.RATE_LIMITED and outcome.retry_after_ms is not None:
            fields = {**_receipt_fields(outcome), "message": "SENDs come too fast; retry after Retry-After seconds"}
            return _respond(request, fields, 429, **_retry_after(outcome.retry_after_ms))
        return _respond(request, _receipt_fields(outcome))

    async def acknowledge(self, request: Request) -> Response:
        mailbox = self.mailbox(request)
        item, is_json = await _read_map(request, self.max_request_bytes)
        ack = _ack_from(item, is_json)
        acked = await self.parts.router.acknowledge(mailbox, ack.ids)
        await self.parts.presence.resync(acked.resync)  # the mailbox's live session recounts its window
        return _respond(request, {"acknowledged": acked.result.deleted})

    async def pending(self, request: Request) -> Response:
        mailbox = self.mailbox(request)
        limit = _query_int(request, "limit", DEFAULT_PENDING_LIMIT, 1, MAX_PENDING_LIMIT)
        messages = await self.parts.router.peek(mailbox, limit)
        held = await self.parts.router.pending(mailbox)
        return _respond(
            request,
            {
                "messages": [
                    {
                        "id": m.id,
                        "from": m.sender,
                        "sent_at": m.sent_at,
                        "expires_at": m.expires_at,
                        "attempt": m.attempt,
                        "body": m.body,
                    }
                    for m in messages
                ],
                "pending": held,
            },
        )

    async def statuses(self, request: Request) -> Response:
        mailbox = self.mailbox(request)
        after = _query_int(request, "after", 0, 0, UINT_MAX)
        limit = _query_int(request, "limit", DEFAULT_STATUS_LIMIT, 1, MAX_STATUS_LIMIT)
        held = await self.parts.router.statuses(mailbox, after, limit)
        return _respond(request, {"statuses": [_status_fields(s) for s in held]})

    async def acknowledge_statuses(self, request: Request) -> Response:
        mailbox = self.mailbox(request)
        item, is_json = await _read_map(request, self.max_request_bytes)
        ack = _status_ack_from(item, is_json)
        return _respond(request, {"acknowledged": await self.parts.router.acknowledge_statuses(mailbox, ack.seqs)})

    async def keys(self, request: Request) -> Response:
        """``PUT /relay/keys`` (KEY_PUT) and ``GET /relay/keys`` (KEY_GET): one route, so a 405 lists both."""
        if request.method == "PUT":
            return await self.put_key(request)
        return await self.get_keys(request)

    async def put_key(self, request: Request) -> Response:
        mailbox = self.mailbox(request)
        item, is_json = await _read_map(request, self.max_request_bytes)
        record = _key_record_from(item, is_json)
        code = await self.parts.router.put_key(mailbox, record)
        if code is ErrorCode.INVALID_KEY:
            raise ApiError(
                422, code, f'the key record\'s signature does not verify for the mailbox "{mailbox}": nothing stored'
            )
        if code is ErrorCode.STORE_UNREACHABLE:
            message = "the broker cannot reach its store; retry later"
            raise ApiError(503, ErrorCode.STORE_UNAVAILABLE, message, {"Retry-After": "1"})
        return _respond(request, {"kid": record.kid})

    async def get_keys(self, request: Request) -> Response:
        self.mailbox(request)
        names = _lookup_mailboxes(request, self.parts.config.max_recipients)
        keys = await self.parts.router.get_keys(names)
        return _respond(request, {"keys": {m: r.to_map() for m, r in keys.items()}})

    async def stats(self, request: Request) -> Response:
        self.operator(request)
        return _respond(request, {"stats": (await self.parts.stats.snapshot()).to_wire()})

    async def metrics(self, request: Request) -> Response:
        """Prometheus metrics (``broker.metrics``): open to ``metrics_open_networks``, else an operator's."""
        if not self.scrape_rule.open_to(request.client.host if request.client else None):
            self.operator(request)
        return Response(render_metrics(await self.parts.stats.snapshot()), media_type=METRICS_CONTENT_TYPE)

    async def healthz(self, request: Request) -> Response:
        """The process answers (liveness): no store call, no token."""
        return Response(b'{"status":"ok"}', media_type=JSON)

    async def readyz(self, request: Request) -> Response:
        """Ready for new clients (readiness): listening, not draining, the store reachable; else 503 and why."""
        reason = self.parts.ready()
        if reason is None:
            return Response(b'{"ready":true}', media_type=JSON)
        return Response(json.dumps({"ready": False, "reason": reason}).encode(), 503, media_type=JSON)

    async def cleanup(self, request: Request) -> Response:
        self.operator(request)
        return _respond(request, {"purged": await self.parts.router.cleanup()})

    async def openapi(self, request: Request) -> Response:
        return Response(json.dumps(openapi_spec(), indent=1), media_type=JSON)


STATIC_DIR = Path(__file__).parent / "static"
"""The demo page (package data)."""


def _client_address(request: Request) -> str | None:
    """The client's IP address (hypercorn's ``client``), which the abuse limits key on; None if not known."""
    return request.client.host if request.client is not None else None


def _retry_after(ms: int) -> dict[str, str]:
    """The ``Retry-After`` header of a 429: whole seconds, rounded up."""
    return {"Retry-After": str(-(-ms // 1000))}


def _receipt_fields(outcome: SendOutcome) -> dict[str, Any]:
    """The RECEIPT frame's fields as they are: {id, results} or, for a SEND refused whole, {id, code} (and
    ``retry_after_ms`` with 3010)."""
    receipt = Receipt(
        id=outcome.id, results=outcome.results, code=outcome.code, retry_after_ms=outcome.retry_after_ms
    ).to_wire()
    del receipt["type"]
    return receipt


def _status_fields(status: HeldStatus) -> dict[str, Any]:
    """A held status as the STATUS frame carries it (without ``type``): the same fields, present or absent alike."""
    fields = StatusReport(
        seq=status.seq,
        state=status.state,
        at=status.at,
        id=status.id,
        recipient=status.recipient,
        count=status.count,
        first_seq=status.first_seq,
    ).to_wire()
    del fields["type"]
    return fields


def _index(ws_port: int, wss_port: int | None) -> Callable[[Request], Coroutine[Any, Any, Response]]:
    async def index(request: Request) -> Response:
        """The demo page, told where the WebSocket listener is (it runs on its own port): over HTTPS the wss one,
        since a page on https may only open wss:// (the page picks the scheme from its own)."""
        port = wss_port if request.url.scheme == "https" and wss_port is not None else ws_port
        html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
        html = html.replace("__RELAY_WS_PORT__", str(port))
        return Response(html, media_type="text/html", headers={"Cache-Control": "no-cache"})

    return index


async def _js(request: Request) -> Response:
    path = request.path_params["path"]
    target = JS_DIR / path
    if not _JS_FILE.fullmatch(path) or ".." in path or not target.is_file():
        hint = " (run `npm ci` in client/js)" if path.startswith("node_modules/") else ""
        raise ApiError(404, ErrorCode.UNKNOWN_FRAME_TYPE, f"no such file: /js/{path}{hint}")
    return FileResponse(target, media_type="text/javascript", headers={"Cache-Control": "no-cache"})


def _guard(
    handler: Callable[[Request], Coroutine[Any, Any, Response]], health: StoreHealth
) -> Callable[[Request], Coroutine[Any, Any, Response]]:
    """Turn ApiError (and any other failure) into the error body; a store failure is reported to ``health``."""

    async def guarded(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return _error_response(request, exc.status, exc.code, exc.message, exc.headers, exc.extra)
        except OSError as exc:  # the store or presence (Redis) cannot be reached: the health logs it once
            health.failed(exc)
            message = "the broker cannot reach its store; retry later"
            return _error_response(request, 503, ErrorCode.STORE_UNAVAILABLE, message, {"Retry-After": "1"})
        except Exception:
            log.exception("HTTP %s %s failed", request.method, request.url.path)
            return _error_response(request, 500, ErrorCode.INTERNAL_ERROR, "internal error; the request may be retried")

    guarded.__name__ = handler.__name__
    guarded.__doc__ = handler.__doc__
    return guarded


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no route, wrong method, a static file missing) as error bodies."""
    assert isinstance(exc, HTTPException)
    method, path = request.method, request.url.path
    if exc.status_code == 405:
        # Starlette's Allow comes from a set (no stable order); StaticFiles gives none (it serves GET and HEAD).
        allowed = sorted(m.strip() for m in (exc.headers or {}).get("Allow", "GET, HEAD").split(","))
        allow = ", ".join(allowed)
        return _error_response(
            request,
            405,
            ErrorCode.UNEXPECTED_FRAME,
            f"{method} is not allowed on {path}; use {allow}",
            {"Allow": allow},
        )
    if exc.status_code == 404:
        return _error_response(
            request, 404, ErrorCode.UNKNOWN_FRAME_TYPE, f"no such endpoint or file: {path} (the API: /openapi.json)"
        )
    return _error_response(request, exc.status_code, ErrorCode.MALFORMED_FRAME, str(exc.detail))


def _has_body(scope: asgi.Scope) -> bool:
    """Whether the request announces a body (HTTP/1.1: a Content-Length above 0, or Transfer-Encoding)."""
    for name, value in scope.get("headers", ()):
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"", b"0")):
            return True
    return False


class _FinishUpload:
    """ASGI middleware: an answer given before the request body is in ends the exchange cleanly.

    The answer gets ``Connection: close`` and is sent in full; then the rest of the body
    is read and discarded (at most DRAIN_MAX_BYTES, for at most DRAIN_TIMEOUT_S) before
    the response is ended, which is when hypercorn closes the connection. So the client
    finishes its upload, reads the answer, and is not tempted to reuse the connection.
    Only the ASGI messages pass through here (no server internals).
    """

    def __init__(self, app: asgi.ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        if scope["type"] != "http" or not _has_body(scope):
            await self.app(scope, receive, send)
            return
        exchange = _Upload(receive, send)
        await self.app(scope, exchange.receive, exchange.send)


class _Upload:
    """One request with a body: knows whether the body is in, and finishes an answer given before it is."""

    def __init__(self, receive: asgi.Receive, send: asgi.Send) -> None:
        self._receive = receive
        self._send = send
        self.body_done = False
        self.disconnected = False

    async def receive(self) -> asgi.Message:
        message = await self._receive()
        if message["type"] == "http.request" and not message.get("more_body", False):
            self.body_done = True
        elif message["type"] == "http.disconnect":
            self.disconnected = True
        return message

    async def send(self, message: asgi.Message) -> None:
        if self.body_done:
            await self._send(message)
        elif message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"connection"]
            await self._send({**message, "headers": [*headers, (b"connection", b"close")]})
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            # The answer goes out in full, but the response stays open until the upload is read.
            await self._send({**message, "more_body": True})
            await self._drain()
            if not self.disconnected:
                await self._send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            await self._send(message)

    async def _drain(self) -> None:
        """Read and discard the rest of the body, within DRAIN_MAX_BYTES and DRAIN_TIMEOUT_S."""
        discarded = 0
        with trio.move_on_after(DRAIN_TIMEOUT_S):
            while not self.body_done and not self.disconnected and discarded <= DRAIN_MAX_BYTES:
                message = await self.receive()
                discarded += len(message.get("body", b""))


def create_app(parts: BrokerParts) -> Starlette:
    """The ASGI app: API routes (in the OpenAPI description), then the demo page and JS modules; CORS for the
    browser origins ``parts.origins`` permits, with the routes' methods."""
    api = _Api(parts)

    def guard(
        handler: Callable[[Request], Coroutine[Any, Any, Response]],
    ) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return _guard(handler, parts.stats.health)

    routes = [
        Route("/relay/send", guard(api.send), methods=["POST"]),
        Route("/relay/acknowledge", guard(api.acknowledge), methods=["POST"]),
        Route("/relay/pending", guard(api.pending), methods=["GET"]),
        Route("/relay/statuses", guard(api.statuses), methods=["GET"]),
        Route("/relay/statuses/acknowledge", guard(api.acknowledge_statuses), methods=["POST"]),
        Route("/relay/keys", guard(api.keys), methods=["GET", "PUT"]),
        Route("/relay/stats", guard(api.stats), methods=["GET"]),
        Route("/relay/cleanup", guard(api.cleanup), methods=["POST"]),
        Route("/metrics", guard(api.metrics), methods=["GET"]),
        Route("/healthz", guard(api.healthz), methods=["GET"]),
        Route("/readyz", guard(api.readyz), methods=["GET"]),
        Route("/openapi.json", guard(api.openapi), methods=["GET"]),
        # Not API: the demo page and its modules (kept out of the OpenAPI description).
        Route("/", _index(parts.ws_port, parts.wss_port), methods=["GET"], include_in_schema=False),
        Route("/js/{path:path}", guard(_js), methods=["GET"], include_in_schema=False),
        Mount("/static", StaticFiles(packages=[("broker", "static")]), name="static"),
    ]
    methods = {m for r in routes if isinstance(r, Route) for m in r.methods or ()}
    return Starlette(
        routes=routes,
        middleware=[Middleware(Cors, policy=parts.origins, methods=methods), Middleware(_FinishUpload)],
        exception_handlers={HTTPException: _http_exception},
    )


async def serve_http(
    parts: BrokerParts,
    listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
    *,
    tls: ServerTLS | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the app with hypercorn on ``listeners`` until cancelled; report their port. Never returns normally.

    With ``tls``, the listeners serve HTTPS: hypercorn does the TLS, over ``tls.https`` (the broker's certificate,
    reloaded in place on SIGHUP), each handshake in its connection's task within ``handshake_timeout_s``.

    The listeners are bound by :func:`broker.listeners.open_listeners` (every listener is made
    there). Hypercorn serves an already-bound socket through its public ``fd://N`` bind: it
    gets a duplicate of each listener's file descriptor and owns that copy (closing it when it
    is done); the listener keeps its own, which ``Listeners.aclose`` closes.

    Raises TypeError if ``listeners`` is empty or holds a listener that is not a
    ``trio.SocketListener`` (hypercorn serves sockets, not memory streams).
    """
    from hypercorn.config import Config
    from hypercorn.trio import serve

    sockets = [listener.socket for listener in listeners if isinstance(listener, trio.SocketListener)]
    if not sockets or len(sockets) != len(listeners):
        raise TypeError("the HTTP API is served on socket listeners only (trio.SocketListener)")
    port = port_of(listeners)
    assert port is not None
    config = Config() if tls is None else _tls_config(tls)
    config.accesslog = None
    config.errorlog = logging.getLogger("broker.http.hypercorn")
    config.graceful_timeout = parts.config.shutdown_grace_s
    config.ssl_handshake_timeout = parts.config.handshake_timeout_s
    config.bind = [f"fd://{os.dup(sock.fileno())}" for sock in sockets]
    app: Any = create_app(parts)  # Starlette is an ASGI app; its signature is typed looser than hypercorn's
    async with trio.open_nursery() as nursery:
        # Stopping is cancellation of the broker's nursery; the trigger only keeps hypercorn's hands off signals.
        binds = await nursery.start(partial(serve, app, config, shutdown_trigger=trio.sleep_forever))
        log.info("listening on %s/", binds[0])
        task_status.started(port)


def _tls_config(tls: ServerTLS) -> Any:
    """A hypercorn Config whose TLS context is ``tls.https`` itself (hypercorn would otherwise build its own from the
    files once, and a reload could not reach it)."""
    from hypercorn.config import Config

    class TLSConfig(Config):
        def create_ssl_context(self) -> ssl.SSLContext:
            return tls.https

    config = TLSConfig()
    config.certfile, config.keyfile = str(tls.cert_file), str(tls.key_file)  # what turns TLS on in hypercorn
    return config
