"""The HTTP API: each endpoint, both body formats, auth, bad input, and the OpenAPI description."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from typing import Any

import cbor2
import httpx
import pytest
import trio
from starlette.routing import Mount, Route

from broker.http import create_app
from broker.openapi import openapi_spec
from broker.server import Broker
from wire import Ack, Deliver, Drained, Receipt, Send, Status

from ..broker.raw import RawClient
from ..conftest import STORES
from .parts import parts_of, queue

pytestmark = pytest.mark.stores(*STORES)

TIMEOUT = 10


@pytest.fixture
async def http(broker: Broker) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{broker.http_port}", timeout=TIMEOUT) as client:
        yield client


def bearer(broker: Broker, name: str, *, operator: bool = False) -> dict[str, str]:
    return {"Authorization": f"Bearer {broker.auth.issue(name, operator=operator)}"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def assert_error(response: httpx.Response, status: int, code: int) -> None:
    assert response.status_code == status, response.text
    if response.headers["content-type"].startswith("application/cbor"):
        body = cbor2.loads(response.content)
    else:
        body = response.json()
    assert body["code"] == code, body
    assert isinstance(body["message"], str) and body["message"]


async def test_send_queues_and_pending_returns_without_removing(broker: Broker, http: httpx.AsyncClient) -> None:
    with trio.fail_after(TIMEOUT):
        r = await http.post(
            "/relay/send",
            json={"id": "m1", "to": ["bob"], "body": b64(b"hi bob"), "ttl_s": 60},
            headers=bearer(broker, "alice"),
        )
        assert r.status_code == 200
        assert r.json() == {"id": "m1", "results": {"bob": {"status": "queued"}}}
        for _ in range(2):  # fetching changes nothing
            r = await http.get("/relay/pending", headers=bearer(broker, "bob"))
            assert r.status_code == 200
            body = r.json()
            assert body["pending"] == 1
            (message,) = body["messages"]
            assert (message["id"], message["from"], base64.b64decode(message["body"])) == ("m1", "alice", b"hi bob")
            assert message["expires_at"] - message["sent_at"] == 60_000
        assert (await http.get("/relay/pending", headers=bearer(broker, "alice"))).json()["messages"] == []


async def test_send_is_idempotent_by_id(broker: Broker, http: httpx.AsyncClient) -> None:
    payload = {"id": "same", "to": ["bob", "bob", "not a mailbox"], "body": ""}
    r1 = await http.post("/relay/send", json=payload, headers=bearer(broker, "alice"))
    r2 = await http.post("/relay/send", json=payload, headers=bearer(broker, "alice"))
    r3 = await http.post("/relay/send", json=payload, headers=bearer(broker, "mallory"))
    assert r1.json()["results"] == {"bob": {"status": "queued"}, "not a mailbox": {"status": "refused", "code": 3006}}
    assert r2.json()["results"]["bob"] == {"status": "duplicate"}
    assert r3.json()["results"]["bob"] == {"status": "refused", "code": 3005}
    assert (await http.get("/relay/pending", headers=bearer(broker, "bob"))).json()["pending"] == 1


async def test_acknowledge_deletes_only_own_messages(broker: Broker, http: httpx.AsyncClient) -> None:
    await queue(broker, "alice", [Send(id="for-bob", to=("bob",), body=b"x")])
    # Mallory knows the id but cannot ACK bob's message, nor see it.
    r = await http.post("/relay/acknowledge", json={"ids": ["for-bob"]}, headers=bearer(broker, "mallory"))
    assert r.json() == {"acknowledged": 0}
    assert (await http.get("/relay/pending", headers=bearer(broker, "mallory"))).json() == {
        "messages": [],
        "pending": 0,
    }
    assert await broker.router.pending("bob") == 1
    r = await http.post("/relay/acknowledge", json={"ids": ["for-bob", "unknown"]}, headers=bearer(broker, "bob"))
    assert r.json() == {"acknowledged": 1}
    r = await http.post("/relay/acknowledge", json={"ids": ["for-bob"]}, headers=bearer(broker, "bob"))
    assert r.json() == {"acknowledged": 0}  # idempotent
    assert await broker.router.pending("bob") == 0


async def test_cbor_bodies_both_ways(broker: Broker, http: httpx.AsyncClient) -> None:
    headers = {**bearer(broker, "alice"), "Content-Type": "application/cbor"}
    r = await http.post(
        "/relay/send", content=cbor2.dumps({"id": "c1", "to": ["bob"], "body": b"\x00\xff"}), headers=headers
    )
    assert r.headers["content-type"] == "application/cbor"
    assert cbor2.loads(r.content) == {"id": "c1", "results": {"bob": {"status": "queued"}}}
    r = await http.get("/relay/pending", headers={**bearer(broker, "bob"), "Accept": "application/cbor"})
    (message,) = cbor2.loads(r.content)["messages"]
    assert message["body"] == b"\x00\xff"
    r = await http.post(
        "/relay/acknowledge",
        content=cbor2.dumps({"ids": ["c1"]}),
        headers={**bearer(broker, "bob"), "Content-Type": "application/cbor"},
    )
    assert cbor2.loads(r.content) == {"acknowledged": 1}


async def test_pending_limit(broker: Broker, http: httpx.AsyncClient) -> None:
    await queue(broker, "alice", [Send(id=f"m{i}", to=("bob",), body=b"x") for i in range(5)])
    r = await http.get("/relay/pending", params={"limit": 2}, headers=bearer(broker, "bob"))
    assert [m["id"] for m in r.json()["messages"]] == ["m0", "m1"]
    assert r.json()["pending"] == 5
    for bad in ("0", "1001", "x", "-1"):
        r = await http.get("/relay/pending", params={"limit": bad}, headers=bearer(broker, "bob"))
        assert_error(r, 400, 1004)


async def test_send_over_http_reaches_an_online_tcp_recipient_at_once(broker: Broker, http: httpx.AsyncClient) -> None:
    with trio.fail_after(TIMEOUT):
        assert broker.tcp_port is not None
        bob, _ = await RawClient.login(broker.tcp_port, broker.auth.issue("bob"))
        await bob.expect(Drained)
        r = await http.post(
            "/relay/send", json={"id": "now", "to": ["bob"], "body": b64(b"ping")}, headers=bearer(broker, "alice")
        )
        assert r.json()["results"]["bob"] == {"status": "delivered"}
        deliver = await bob.expect(Deliver)
        assert (deliver.id, deliver.sender, deliver.body) == ("now", "alice", b"ping")
        # An HTTP ACK of a message in flight on TCP frees the TCP session's window too.
        r = await http.post("/relay/acknowledge", json={"ids": ["now"]}, headers=bearer(broker, "bob"))
        assert r.json() == {"acknowledged": 1}
        await bob.send(Send(id="self", to=("bob",), body=b"."))
        receipt, _ = await bob.expect_each(Receipt, Deliver)
        assert isinstance(receipt, Receipt) and receipt.results["bob"].status is Status.DELIVERED
        await bob.send(Ack(ids=("self",)))
        await bob.aclose()


async def test_stats_and_cleanup_need_an_operator(broker: Broker, http: httpx.AsyncClient) -> None:
    assert_error(await http.get("/relay/stats", headers=bearer(broker, "alice")), 403, 2003)
    assert_error(await http.post("/relay/cleanup", headers=bearer(broker, "alice")), 403, 2003)
    op = bearer(broker, "ops", operator=True)
    stats = (await http.get("/relay/stats", headers=op)).json()["stats"]
    assert {"messages_total", "online_users", "sent_total"} <= stats.keys()
    assert (await http.post("/relay/cleanup", headers=op)).json() == {"purged": 0}
    # An operator has no mailbox.
    assert_error(await http.get("/relay/pending", headers=op), 403, 2003)
    assert_error(await http.post("/relay/send", json={"id": "x", "to": ["a"], "body": ""}, headers=op), 403, 2003)
    assert_error(await http.post("/relay/acknowledge", json={"ids": ["x"]}, headers=op), 403, 2003)


async def test_cleanup_purges_expired(broker_factory: Callable[..., Any]) -> None:
    now = [1_000_000]
    async with broker_factory(clock=lambda: now[0]) as broker:
        await queue(broker, "alice", [Send(id="old", to=("bob",), body=b"x", ttl_s=1)])
        now[0] += 1000
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{broker.http_port}") as http:
            assert (await http.get("/relay/pending", headers=bearer(broker, "bob"))).json()["messages"] == []
            r = await http.post("/relay/cleanup", headers=bearer(broker, "ops", operator=True))
            assert r.json() == {"purged": 1}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/relay/send"),
        ("POST", "/relay/acknowledge"),
        ("GET", "/relay/pending"),
        ("GET", "/relay/stats"),
        ("POST", "/relay/cleanup"),
    ],
)
@pytest.mark.parametrize(
    ("authorization", "code"),
    [(None, 2001), ("Bearer", 2001), ("Basic dXNlcjpwdw==", 2001), ("Bearer not.a.jwt", 2001), ("expired", 2002)],
)
async def test_auth_failures_are_401(
    broker: Broker, http: httpx.AsyncClient, method: str, path: str, authorization: str | None, code: int
) -> None:
    headers = {}
    if authorization == "expired":
        import jwt

        from broker.auth import load_or_create_secret

        token = jwt.encode(
            {"sub": "a", "aud": "relay", "exp": 1}, load_or_create_secret(broker.config.data_dir), "HS256"
        )
        headers["Authorization"] = f"Bearer {token}"
    elif authorization is not None:
        headers["Authorization"] = authorization
    r = await http.request(method, path, headers=headers, json={"ids": ["x"]} if method == "POST" else None)
    assert_error(r, 401, code)
    assert r.headers["www-authenticate"].startswith("Bearer")


BAD_BODIES = [
    pytest.param("application/json", b"{", 400, 1001, id="json-truncated"),
    pytest.param("application/json", b"[1,2]", 400, 1001, id="json-array"),
    pytest.param("application/json", b'{"id":"a","id":"b","to":["b"],"body":""}', 400, 1001, id="json-duplicate-key"),
    pytest.param("application/json", b'{"id":"a","to":["b"],"body":"", "ttl_s": NaN}', 400, 1001, id="json-nan"),
    pytest.param("application/json", b"\xff\xfe", 400, 1001, id="json-not-utf8"),
    pytest.param("application/json", b'{"id":"a","to":["b"],"body":"!!"}', 400, 1004, id="json-bad-base64"),
    pytest.param("application/json", b'{"id":"a b","to":["b"],"body":""}', 400, 1004, id="json-bad-id"),
    pytest.param("application/json", b'{"id":"a","to":[],"body":""}', 400, 1004, id="json-no-recipients"),
    pytest.param("application/json", b'{"id":"a","to":["b"],"body":"","ttl_s":true}', 400, 1004, id="json-ttl-bool"),
    pytest.param("application/json", b'{"to":["b"],"body":""}', 400, 1004, id="json-missing-id"),
    pytest.param("application/cbor", b"\xff", 400, 1001, id="cbor-garbage"),
    pytest.param("application/cbor", cbor2.dumps({"id": "a"}) + b"\x00", 400, 1001, id="cbor-trailing"),
    pytest.param("application/cbor", cbor2.dumps(cbor2.CBORTag(1, 0)), 400, 1001, id="cbor-tag"),
    pytest.param("application/cbor", cbor2.dumps({1: 2}), 400, 1001, id="cbor-int-key"),
    pytest.param(
        "application/cbor", cbor2.dumps({"id": "a", "to": ["b"], "body": "text"}), 400, 1004, id="cbor-body-text"
    ),
    pytest.param("text/plain", b"hello", 415, 1001, id="text-plain"),
    pytest.param("application/x-www-form-urlencoded", b"id=a", 415, 1001, id="form"),
    pytest.param(None, b"{}", 415, 1001, id="no-content-type"),
]


@pytest.mark.parametrize(("content_type", "data", "status", "code"), BAD_BODIES)
async def test_bad_send_bodies(
    broker: Broker, http: httpx.AsyncClient, content_type: str | None, data: bytes, status: int, code: int
) -> None:
    headers = bearer(broker, "alice")
    if content_type:
        headers["Content-Type"] = content_type
    r = await http.post("/relay/send", content=data, headers=headers)
    assert_error(r, status, code)
    assert await broker.router.pending("b") == 0


async def test_bad_acknowledge_bodies(broker: Broker, http: httpx.AsyncClient) -> None:
    headers = bearer(broker, "bob")
    assert_error(await http.post("/relay/acknowledge", json={"ids": []}, headers=headers), 400, 1004)
    assert_error(await http.post("/relay/acknowledge", json={"ids": "m1"}, headers=headers), 400, 1004)
    assert_error(await http.post("/relay/acknowledge", json={}, headers=headers), 400, 1004)
    assert_error(await http.post("/relay/acknowledge", content=b"ids", headers=headers), 415, 1001)


async def test_too_large_bodies_are_413(broker_factory: Callable[..., Any]) -> None:
    async with broker_factory(max_frame_bytes=1024, max_recipients=3, max_outbound_bytes=64 * 1024) as broker:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{broker.http_port}") as http:
            headers = bearer(broker, "alice")
            r = await http.post(
                "/relay/send", json={"id": "big", "to": ["bob"], "body": b64(b"x" * 1024)}, headers=headers
            )
            assert_error(r, 413, 1002)
            r = await http.post(
                "/relay/send", content=b"x" * 200_000, headers={**headers, "Content-Type": "application/json"}
            )
            assert_error(r, 413, 1002)
            r = await http.post(
                "/relay/send", json={"id": "ok", "to": ["bob"], "body": b64(b"x" * 900)}, headers=headers
            )
            assert r.status_code == 200


async def test_unknown_route_and_wrong_method(broker: Broker, http: httpx.AsyncClient) -> None:
    assert_error(await http.get("/relay/nothing"), 404, 1005)
    assert_error(await http.get("/relay/send", headers=bearer(broker, "alice")), 405, 1003)
    r = await http.get("/relay/nothing", headers={"Accept": "application/cbor"})
    assert_error(r, 404, 1005)
    assert r.headers["content-type"] == "application/cbor"


async def test_demo_page_and_js_modules_are_served(http: httpx.AsyncClient) -> None:
    r = await http.get("/")
    assert r.status_code == 200 and "<html" in r.text.lower()
    r = await http.get("/static/app.js")
    assert r.status_code == 200
    r = await http.get("/js/codec.js")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")
    for module in ("cborg/cborg.js", "@hpke/core/esm/mod.js", "@hpke/common/esm/mod.js"):
        r = await http.get(f"/js/node_modules/{module}")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript"), module
    refused = ("/js/package.json", "/js/../../broker/auth.py", "/js/%2e%2e/secret", "/js/test/codec.test.mjs")
    outside = ("/js/node_modules/typescript/lib/typescript.js", "/js/node_modules/@hpke/core/package.json")
    for path in refused + outside:
        assert (await http.get(path)).status_code == 404


# ------------------------------------------------------------------ OpenAPI


def app_routes(broker: Broker) -> set[tuple[str, str]]:
    """(path, method) of every API route in the app (the demo page and modules are not API)."""
    routes = set()
    for route in create_app(parts_of(broker)).routes:
        if isinstance(route, Mount):
            assert route.path == "/static", f"unexpected mount {route.path}"
            continue
        assert isinstance(route, Route)
        if route.include_in_schema:
            routes |= {(route.path, m.lower()) for m in route.methods or () if m != "HEAD"}
    return routes


async def test_openapi_matches_the_routes(broker: Broker, http: httpx.AsyncClient) -> None:
    spec = (await http.get("/openapi.json")).json()
    assert spec == openapi_spec()
    assert spec["openapi"].startswith("3.")
    described = {(path, method) for path, ops in spec["paths"].items() for method in ops}
    assert described == app_routes(broker)
    schemas = spec["components"]["schemas"]
    assert spec["components"]["securitySchemes"]["bearer"] == {
        **spec["components"]["securitySchemes"]["bearer"],
        "type": "http",
        "scheme": "bearer",
    }

    def resolve(ref: str) -> dict[str, Any]:
        assert ref.startswith("#/components/schemas/")
        return schemas[ref.rsplit("/", 1)[1]]

    for path, method in described:
        op = spec["paths"][path][method]
        ok = op["responses"]["200"]["content"]
        for media in ok.values():
            resolve(media["schema"]["$ref"])
        if path in ("/openapi.json", "/healthz", "/readyz"):
            assert op["security"] == []
            continue
        if path == "/metrics":  # open to metrics_open_networks, an operator token from elsewhere
            assert op["security"] == [{}, {"bearer": []}]
            assert {"401", "403"} <= op["responses"].keys()
            continue
        assert op["security"] == [{"bearer": []}]
        assert {"401", "403"} <= op["responses"].keys(), path
        for status, response in op["responses"].items():
            if status != "200":
                for media in ("application/json", "application/cbor"):
                    assert response["content"][media]["schema"]["$ref"] == "#/components/schemas/Error"
        if method == "post" and path not in ("/relay/cleanup",):
            content = op["requestBody"]["content"]
            assert set(content) == {"application/json", "application/cbor"}
            resolve(content["application/json"]["schema"]["$ref"])
            assert {"400", "413", "415"} <= op["responses"].keys()
    assert set(schemas["Error"]["required"]) == {"code", "message"}


async def test_http_ack_of_a_message_in_flight_on_tcp_frees_that_session_window(
    broker_factory: Callable[..., Any],
) -> None:
    """An ACK from another transport reaches the live session: its full in-flight window opens."""
    async with broker_factory(max_inflight=1) as broker:
        with trio.fail_after(TIMEOUT):
            await queue(broker, "alice", [Send(id=f"m{i}", to=("bob",), body=b"x") for i in range(3)])
            bob, _ = await RawClient.login(broker.tcp_port, broker.auth.issue("bob"))
            assert (await bob.expect(Deliver)).id == "m0"  # the window (1) is full: m1 and m2 wait
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{broker.http_port}") as http:
                r = await http.post("/relay/acknowledge", json={"ids": ["m0"]}, headers=bearer(broker, "bob"))
                assert r.json() == {"acknowledged": 1}
                assert (await bob.expect(Deliver)).id == "m1"
                r = await http.post("/relay/acknowledge", json={"ids": ["m1"]}, headers=bearer(broker, "bob"))
                assert (await bob.expect(Deliver)).id == "m2"
