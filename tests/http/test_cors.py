"""CORS on the HTTP API: the broker's one origin policy (allowed_origins and its own), preflight included."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionRejected

from broker.origins import CORS_MAX_AGE_S
from broker.server import Broker
from wire import Drained

from ..websocket.wsclient import login_ws

TIMEOUT = 10
APP = "https://chat.example.org"
EVIL = "https://evil.example"
CORS_HEADERS = (
    "access-control-allow-origin",
    "access-control-allow-methods",
    "access-control-allow-headers",
    "access-control-allow-credentials",
    "access-control-expose-headers",
    "access-control-max-age",
)


@pytest.fixture
async def broker(broker_factory: Callable[..., Any]) -> AsyncIterator[Broker]:
    async with broker_factory(allowed_origins=(APP,)) as b:
        yield b


@pytest.fixture
async def http(broker: Broker) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{broker.http_port}", timeout=TIMEOUT) as client:
        yield client


def preflight_headers(origin: str, method: str, headers: str = "authorization, content-type") -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": method, "Access-Control-Request-Headers": headers}


def cors_headers(response: httpx.Response) -> dict[str, str]:
    return {name: response.headers[name] for name in CORS_HEADERS if name in response.headers}


@pytest.mark.parametrize(
    ("path", "method"), [("/relay/send", "POST"), ("/relay/pending", "GET"), ("/relay/keys", "PUT")]
)
async def test_preflight_from_an_allowed_origin_allows_the_api_methods_and_headers(
    http: httpx.AsyncClient, path: str, method: str
) -> None:
    with trio.fail_after(TIMEOUT):
        r = await http.options(path, headers=preflight_headers(APP, method))
    assert r.status_code == 204, r.text
    assert cors_headers(r) == {
        "access-control-allow-origin": APP,
        "access-control-allow-methods": "GET, HEAD, POST, PUT",  # the routes' (HEAD with GET)
        "access-control-allow-headers": "Accept, Authorization, Content-Type",
        "access-control-max-age": str(CORS_MAX_AGE_S),
    }
    assert "Origin" in r.headers["vary"]


async def test_preflight_from_a_listed_origin_is_allowed_whatever_its_case(http: httpx.AsyncClient) -> None:
    with trio.fail_after(TIMEOUT):
        r = await http.options("/relay/send", headers=preflight_headers("HTTPS://Chat.Example.org/", "POST"))
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == "HTTPS://Chat.Example.org/"  # the origin as sent


@pytest.mark.parametrize(
    ("origin", "method", "headers", "says"),
    [
        (EVIL, "POST", "authorization, content-type", "https://evil.example may not use this API"),
        ("null", "GET", "authorization", "null may not use this API"),
        (APP, "DELETE", "authorization", "DELETE is not an API method"),
        (APP, "POST", "authorization, x-api-key", "x-api-key may not be sent"),
    ],
)
async def test_a_refused_preflight_gets_403_saying_why_and_no_cors_headers(
    http: httpx.AsyncClient, origin: str, method: str, headers: str, says: str
) -> None:
    with trio.fail_after(TIMEOUT):
        r = await http.options("/relay/send", headers=preflight_headers(origin, method, headers))
    assert r.status_code == 403
    assert r.json()["code"] == 2003
    assert says in r.json()["message"]
    assert cors_headers(r) == {}


async def test_cross_origin_send_and_pending_from_an_allowed_origin_carry_allow_origin(
    broker: Broker, http: httpx.AsyncClient
) -> None:
    alice = {"Authorization": f"Bearer {broker.auth.issue('alice')}", "Origin": APP}
    bob = {"Authorization": f"Bearer {broker.auth.issue('bob')}", "Origin": APP}
    body = {"id": "c1", "to": ["bob"], "body": base64.b64encode(b"hi").decode()}
    with trio.fail_after(TIMEOUT):
        sent = await http.post("/relay/send", json=body, headers=alice)
        pending = await http.get("/relay/pending", headers=bob)
        refused = await http.get("/relay/pending")  # an error answer is readable by the page too
    for r in (sent, pending):
        assert r.status_code == 200, r.text
        assert cors_headers(r) == {"access-control-allow-origin": APP, "access-control-expose-headers": "Retry-After"}
        assert r.headers["vary"] == "Origin"
    assert pending.json()["messages"][0]["id"] == "c1"
    assert refused.status_code == 401 and "access-control-allow-origin" not in refused.headers  # no Origin: no CORS


async def test_requests_from_another_origin_are_served_without_cors_headers(
    broker: Broker, http: httpx.AsyncClient
) -> None:
    alice = {"Authorization": f"Bearer {broker.auth.issue('alice')}", "Origin": EVIL}
    body = {"id": "e1", "to": ["bob"], "body": ""}
    with trio.fail_after(TIMEOUT):
        sent = await http.post("/relay/send", json=body, headers=alice)
        pending = await http.get("/relay/pending", headers={**alice, "Origin": EVIL})
    for r in (sent, pending):
        assert r.status_code == 200, r.text  # served (a non-browser can send any Origin); the browser hides it
        assert cors_headers(r) == {}
        assert r.headers["vary"] == "Origin"


async def test_the_websocket_check_and_cors_agree_on_every_origin(broker: Broker, http: httpx.AsyncClient) -> None:
    origins = {
        APP: True,
        "https://chat.example.org:443": False,  # another origin, as far as the list goes
        f"http://127.0.0.1:{broker.http_port}": True,  # the broker's own
        f"http://localhost:{broker.http_port}": True,
        f"https://127.0.0.1:{broker.http_port}": False,
        "http://127.0.0.1:1": False,
        EVIL: False,
        "null": False,
    }
    token = broker.auth.issue("gina")
    with trio.fail_after(TIMEOUT):
        for origin, allowed in origins.items():
            preflight = await http.options("/relay/pending", headers=preflight_headers(origin, "GET"))
            assert (preflight.status_code == 204) is allowed, origin
            try:
                async with login_ws(broker.ws_port, token, origin=origin) as (client, _):
                    await client.expect(Drained)
                opened = True
            except ConnectionRejected as exc:
                assert exc.status_code == 403
                opened = False
            assert opened is allowed, origin
