"""The HTTP API (a fallback for clients without WebSockets), the OpenAPI description and the demo page.

Theory of operation. A small Starlette app served by hypercorn's trio worker in the
broker's nursery. Every endpoint is a thin translation onto the same broker calls the
sessions use, so semantics cannot drift: ``POST /relay/send`` is :meth:`Broker.route`
(idempotency, limits, TTL, receipts, an online recipient is woken at once),
``POST /relay/acknowledge`` is :meth:`Broker.acknowledge`, ``GET /relay/pending`` is
:meth:`Broker.pending_messages` (changes nothing: messages stay held until ACKed),
``/relay/stats`` and ``/relay/cleanup`` are :meth:`Broker.statistics` and
:meth:`Broker.cleanup`. Tokens are the same JWTs, sent as ``Authorization: Bearer``.

Bodies are JSON (``application/json``, byte strings as standard base64) or CBOR
(``application/cbor``, byte strings native), chosen by ``Content-Type`` for requests
and ``Accept`` for responses (a POST without ``Accept`` is answered in its own type).
The field names are the protocol's frame fields. Every error, whatever its cause, is
``{"code": <protocol error code>, "message": "..."}`` with a fitting HTTP status:

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
500    broker fault                                           5001 INTERNAL_ERROR
====== ===================================================== ===================
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import json
import logging
import re
from collections.abc import Callable, Coroutine, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import cbor2
import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from wire import Ack, ErrorCode, RemoteProtocolError, Send, decode_item, encode_frame

from .auth import AuthError, Identity
from .openapi import openapi_spec
from .transport import first_os_error

if TYPE_CHECKING:
    from .server import Broker

__all__ = ["ApiError", "JS_DIR", "create_app", "serve_http"]

log = logging.getLogger(__name__)

JSON = "application/json"
CBOR = "application/cbor"
DEFAULT_PENDING_LIMIT = 100
"""Messages one ``GET /relay/pending`` returns unless ``limit`` says otherwise."""
MAX_PENDING_LIMIT = 1000
"""Largest ``limit``: keeps one response (up to 1000 bodies, each up to max_frame_bytes) bounded."""
BODY_SLACK_BYTES = 64 * 1024
"""Room above the encoded body size for ids, recipients and JSON punctuation."""


def _find_js_dir() -> Path:
    """``client/js`` of the installed (editable) checkout, found without importing the client."""
    spec = importlib.util.find_spec("client")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))) / "js"
    return Path(__file__).resolve().parent.parent / "client" / "js"


JS_DIR = _find_js_dir()
"""The browser client's ES modules and their node_modules (``npm ci`` there), served under ``/js/``."""
_JS_FILE = re.compile(r"[A-Za-z0-9_-]+\.js|node_modules/cborg/(?:[A-Za-z0-9_-]+/)*[A-Za-z0-9_.-]+\.js")


class ApiError(Exception):
    """An error answer: HTTP ``status`` and the protocol ``code`` that goes in the body."""

    def __init__(self, status: int, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


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


def _error_response(request: Request, status: int, code: ErrorCode, message: str) -> Response:
    headers = {"WWW-Authenticate": 'Bearer realm="relay"'} if status == 401 else {}
    return _respond(request, {"code": int(code), "message": message}, status, **headers)


# ------------------------------------------------------------------ request bodies


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


async def _read_map(request: Request, limit: int) -> tuple[dict[str, Any], bool]:
    """The request body as a map with text keys, and whether it came as JSON (bytes in base64)."""
    media = _media_type(request.headers.get("content-type"))
    if media not in (JSON, CBOR):
        raise ApiError(415, ErrorCode.MALFORMED_FRAME, f"Content-Type must be {JSON} or {CBOR}, not {media or 'none'}")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, ErrorCode.FRAME_TOO_LARGE, f"body of {declared} bytes exceeds the limit of {limit}")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, ErrorCode.FRAME_TOO_LARGE, f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    data = b"".join(chunks)
    try:
        if media == JSON:
            item = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
        else:
            item = decode_item(data)
    except Exception as exc:  # json and cbor2 raise several types
        raise ApiError(400, ErrorCode.MALFORMED_FRAME, f"body is not valid {media}: {exc}") from None
    if type(item) is not dict or not all(type(k) is str for k in item):
        raise ApiError(400, ErrorCode.MALFORMED_FRAME, "body must be a map with text keys")
    return item, media == JSON


def _b64_field(item: dict[str, Any], name: str) -> None:
    value = item.get(name)
    if isinstance(value, str):
        try:
            item[name] = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, ErrorCode.INVALID_FIELD, f"{name} must be standard base64") from None


def _frame_from(cls: Any, item: Mapping[str, Any]) -> Any:
    try:
        return cls.from_wire(item)
    except RemoteProtocolError as exc:
        raise ApiError(400, exc.code, exc.message) from None


# ------------------------------------------------------------------ the app


class _Api:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        limit = broker.config.max_frame_bytes
        self.max_frame_bytes = limit
        # base64 in JSON grows a body by 4/3.
        self.max_request_bytes = limit * 4 // 3 + BODY_SLACK_BYTES

    def identity(self, request: Request) -> Identity:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, ErrorCode.INVALID_TOKEN, "send the token as 'Authorization: Bearer <token>'")
        try:
            identity = self.broker.auth.verify(token.strip())
        except AuthError as exc:
            raise ApiError(401, exc.code, exc.message) from None
        return identity

    def mailbox(self, request: Request) -> str:
        identity = self.identity(request)
        if identity.operator:
            raise ApiError(403, ErrorCode.FORBIDDEN, "operator tokens have no mailbox: use a mailbox token")
        return identity.name

    def operator(self, request: Request) -> Identity:
        identity = self.identity(request)
        if not identity.operator:
            raise ApiError(403, ErrorCode.FORBIDDEN, "this endpoint needs an operator token")
        return identity

    async def send(self, request: Request) -> Response:
        mailbox = self.mailbox(request)
        item, is_json = await _read_map(request, self.max_request_bytes)
        if is_json:
            _b64_field(item, "body")
        send: Send = _frame_from(Send, item)
        frame_bytes = len(encode_frame(send)) - 4
        if frame_bytes > self.max_frame_bytes:
            raise ApiError(
                413, ErrorCode.FRAME_TOO_LARGE, f"the message is {frame_bytes} bytes as a frame; the limit is "
                f"{self.max_frame_bytes}"
            )  # fmt: skip
        (receipt,) = await self.broker.route(mailbox, [send])
        wire = receipt.to_wire()
        return _respond(request, {"id": wire["id"], "results": wire["results"]})

    async def acknowledge(self, request: Request) -> Response:
        mailbox = self.mailbox(request)
        item, _ = await _read_map(request, self.max_request_bytes)
        ack: Ack = _frame_from(Ack, item)
        result = await self.broker.acknowledge(mailbox, ack.ids)
        return _respond(request, {"acknowledged": result.deleted})

    async def pending(self, request: Request) -> Response:
        mailbox = self.mailbox(request)
        raw = request.query_params.get("limit", str(DEFAULT_PENDING_LIMIT))
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_PENDING_LIMIT:
            raise ApiError(400, ErrorCode.INVALID_FIELD, f"limit must be an integer from 1 to {MAX_PENDING_LIMIT}")
        messages = await self.broker.pending_messages(mailbox, int(raw))
        held = await self.broker.store.pending(mailbox)
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

    async def stats(self, request: Request) -> Response:
        self.operator(request)
        return _respond(request, {"stats": await self.broker.statistics()})

    async def cleanup(self, request: Request) -> Response:
        self.operator(request)
        return _respond(request, {"purged": await self.broker.cleanup()})

    async def openapi(self, request: Request) -> Response:
        return Response(json.dumps(openapi_spec(), indent=1), media_type=JSON)


STATIC_DIR = Path(__file__).parent / "static"
"""The demo page (package data)."""


def _index(broker: Broker) -> Callable[[Request], Coroutine[Any, Any, Response]]:
    async def index(request: Request) -> Response:
        """The demo page, told where the WebSocket listener is (it runs on its own port)."""
        html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
        html = html.replace("__RELAY_WS_PORT__", str(broker.ws_port or broker.config.ws_port))
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
    handler: Callable[[Request], Coroutine[Any, Any, Response]],
) -> Callable[[Request], Coroutine[Any, Any, Response]]:
    """Turn ApiError (and any other failure) into the error body."""

    async def guarded(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return _error_response(request, exc.status, exc.code, exc.message)
        except Exception:
            log.exception("HTTP %s %s failed", request.method, request.url.path)
            return _error_response(request, 500, ErrorCode.INTERNAL_ERROR, "internal error; the request may be retried")

    guarded.__name__ = handler.__name__
    guarded.__doc__ = handler.__doc__
    return guarded


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        return _error_response(request, 405, ErrorCode.UNEXPECTED_FRAME, f"{request.method} is not allowed here")
    if exc.status_code == 404:
        return _error_response(request, 404, ErrorCode.UNKNOWN_FRAME_TYPE, f"no such route: {request.url.path}")
    return _error_response(request, exc.status_code, ErrorCode.MALFORMED_FRAME, str(exc.detail))


def create_app(broker: Broker) -> Starlette:
    """The ASGI app: API routes (in the OpenAPI description), then the demo page and JS modules."""
    api = _Api(broker)
    routes = [
        Route("/relay/send", _guard(api.send), methods=["POST"]),
        Route("/relay/acknowledge", _guard(api.acknowledge), methods=["POST"]),
        Route("/relay/pending", _guard(api.pending), methods=["GET"]),
        Route("/relay/stats", _guard(api.stats), methods=["GET"]),
        Route("/relay/cleanup", _guard(api.cleanup), methods=["POST"]),
        Route("/openapi.json", _guard(api.openapi), methods=["GET"]),
        # Not API: the demo page and its modules (kept out of the OpenAPI description).
        Route("/", _index(broker), methods=["GET"], include_in_schema=False),
        Route("/js/{path:path}", _guard(_js), methods=["GET"], include_in_schema=False),
        Mount("/static", StaticFiles(packages=[("broker", "static")]), name="static"),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_exception})


async def serve_http(
    broker: Broker,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the app with hypercorn until cancelled; report the bound port. Never returns normally.

    Raises OSError, with ``filename`` set to the address (``http://host:port``), if it cannot listen.
    """
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("broker.http.hypercorn")
    config.graceful_timeout = broker.config.shutdown_grace_s
    async with trio.open_nursery() as nursery:
        # Stopping is cancellation of the broker's nursery; the trigger only keeps hypercorn's hands off signals.
        try:
            app: Any = create_app(broker)  # Starlette is an ASGI app; its signature is typed looser than hypercorn's
            binds = await nursery.start(partial(serve, app, config, shutdown_trigger=trio.sleep_forever))
        except (OSError, BaseExceptionGroup) as exc:
            # hypercorn binds inside its own nurseries: name the address that failed, once, here.
            if (failed := first_os_error(exc)) is None:
                raise
            raise OSError(failed.errno, failed.strerror, f"http://{config.bind[0]}") from exc
        bound = int(binds[0].rsplit(":", 1)[1])
        log.info("listening on http://%s:%d/", host, bound)
        task_status.started(bound)
