"""Which browser origins may use the broker: one rule for the WebSocket handshake and for CORS on the HTTP API.

Theory of operation. :class:`OriginPolicy` is the rule: the HTTP and HTTPS listeners' own origins
(:meth:`OriginPolicy.of_broker`) plus the config's ``allowed_origins``, compared ignoring case and a
trailing slash; a request without ``Origin`` is not from a browser page and is not its concern. The
Broker builds one policy and gives the same object to the WebSocket listener (a handshake from another
origin gets 403, :mod:`broker.websocket`) and to the HTTP app, where :class:`Cors` applies it.

CORS (docs/http-api.md "Browsers on other origins"). A preflight (``OPTIONS`` with ``Origin`` and
``Access-Control-Request-Method``) from a permitted origin, asking for one of the API's methods and
only the headers in :data:`CORS_HEADERS`, is answered 204 with ``Access-Control-Allow-Origin`` (the
origin itself), ``-Allow-Methods``, ``-Allow-Headers`` and ``-Max-Age``; any other preflight gets 403
and the API's error body (2003 FORBIDDEN, saying what is not allowed), with no CORS headers, so the
browser blocks the request. Other requests are served as they would be anyway; the answer to one from
a permitted origin carries ``Access-Control-Allow-Origin`` and ``Access-Control-Expose-Headers``, to
one from any other origin no CORS header (the browser then keeps it from the page). Every answer
says ``Vary: Origin``. No credentials: tokens travel in ``Authorization``, never in cookies, so
``Access-Control-Allow-Credentials`` is never sent.

Why other origins' requests are served rather than refused (unlike the WebSocket, whose handshake the
browser does not guard): every API call with a token sends ``Authorization``, which makes the browser
preflight it, and the preflight is refused; a same-origin page on a host name the policy does not list
sends ``Origin`` too and needs no CORS header; and a non-browser client can send any ``Origin`` it
likes, so refusing would protect nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from starlette import types as asgi
from starlette.datastructures import Headers, MutableHeaders

from wire import ErrorCode

__all__ = ["CORS_EXPOSED_HEADERS", "CORS_HEADERS", "CORS_MAX_AGE_S", "Cors", "OriginPolicy"]

CORS_HEADERS = ("Accept", "Authorization", "Content-Type")
"""Request headers a page on another origin may send: the token, and the body formats (JSON or CBOR both
need ``Content-Type``, which only plain text would not)."""
CORS_EXPOSED_HEADERS = ("Retry-After",)
"""Answer headers a page on another origin may read besides the safelisted ones (503's ``Retry-After``)."""
CORS_MAX_AGE_S = 7200
"""How long a browser may reuse a preflight's answer: Chromium's cap (2 h). Long is harmless: an origin
taken off the list gets no ``Access-Control-Allow-Origin`` on its answers, whatever a preflight said."""


class OriginPolicy:
    """Which browser origins may use the broker (WebSocket and HTTP API). A missing Origin (non-browser) is allowed."""

    def __init__(self, allowed: Iterable[str]) -> None:
        self.allowed = frozenset(o.rstrip("/").lower() for o in allowed)

    @classmethod
    def of_broker(
        cls, host: str, http_port: int | None, https_port: int | None, allowed_origins: Iterable[str]
    ) -> OriginPolicy:
        """The broker's policy: its HTTP and HTTPS listeners' own origins (``host``, ``localhost`` and
        ``127.0.0.1`` with each port there is) and the config's ``allowed_origins``."""
        own = [
            f"{scheme}://{name}:{port}"
            for scheme, port in (("http", http_port), ("https", https_port))
            if port is not None
            for name in (host, "localhost", "127.0.0.1")
        ]
        return cls([*own, *allowed_origins])

    def permits(self, origin: str | None) -> bool:
        """True if a request with this ``Origin`` header (None: absent) may be accepted."""
        return origin is None or origin.rstrip("/").lower() in self.allowed


class Cors:
    """ASGI middleware: CORS for the HTTP app by ``policy`` (see the module's comment); ``methods`` are the app's."""

    def __init__(self, app: asgi.ASGIApp, policy: OriginPolicy, methods: Iterable[str]) -> None:
        self.app = app
        self.policy = policy
        self.methods = frozenset(m.upper() for m in methods)
        self._preflight = {
            "Access-Control-Allow-Methods": ", ".join(sorted(self.methods)),
            "Access-Control-Allow-Headers": ", ".join(CORS_HEADERS),
            "Access-Control-Max-Age": str(CORS_MAX_AGE_S),
        }
        self._headers = {h.lower() for h in CORS_HEADERS}

    async def __call__(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Headers(scope=scope)
        origin = request.get("origin")
        if origin is not None and scope["method"] == "OPTIONS" and "access-control-request-method" in request:
            await self._answer_preflight(origin, request, send)
            return
        allow = origin is not None and self.policy.permits(origin)

        async def send_with_cors(message: asgi.Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.add_vary_header("Origin")
                if allow:
                    assert origin is not None
                    headers["Access-Control-Allow-Origin"] = origin
                    headers["Access-Control-Expose-Headers"] = ", ".join(CORS_EXPOSED_HEADERS)
            await send(message)

        await self.app(scope, receive, send_with_cors)

    def _refusal(self, origin: str, request: Headers) -> str | None:
        """Why this preflight is refused, or None."""
        if not self.policy.permits(origin):
            return f"the origin {origin} may not use this API: it is not in the broker's allowed_origins"
        method = request["access-control-request-method"].strip()
        if method not in self.methods:
            return f"{method} is not an API method; use {', '.join(sorted(self.methods))}"
        asked = [h.strip().lower() for h in request.get("access-control-request-headers", "").split(",")]
        if others := [h for h in asked if h and h not in self._headers]:
            return f"the header(s) {', '.join(others)} may not be sent; allowed: {', '.join(CORS_HEADERS)}"
        return None

    async def _answer_preflight(self, origin: str, request: Headers, send: asgi.Send) -> None:
        vary = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
        refusal = self._refusal(origin, request)
        if refusal is None:
            status, body = 204, b""
            headers = {**self._preflight, "Access-Control-Allow-Origin": origin, "Vary": vary}
        else:
            status = 403
            body = json.dumps({"code": int(ErrorCode.FORBIDDEN), "message": refusal}).encode()
            headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), "Vary": vary}
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})
