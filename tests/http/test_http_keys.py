"""The HTTP API's key directory: ``PUT /relay/keys`` (KEY_PUT) and ``GET /relay/keys`` (KEY_GET), on every store.

Both body formats, the mailbox token's own mailbox only, operators refused, bad records named by
field, and the directory shared with TCP sessions (one funnel: the router).
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import cbor2
import httpx
import pytest
import trio

from broker.server import Broker
from wire import Drained, KeyGet, KeyGetResult, KeyPut, KeyPutResult, KeyRecord
from wire.e2e import EncryptionKey, Identity, make_key_record

from ..broker.raw import RawClient
from ..conftest import STORES

pytestmark = pytest.mark.stores(*STORES)

TIMEOUT = 10


@pytest.fixture
async def http(broker: Broker) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{broker.http_port}", timeout=TIMEOUT) as client:
        yield client


def bearer(broker: Broker, name: str, *, operator: bool = False) -> dict[str, str]:
    return {"Authorization": f"Bearer {broker.auth.issue(name, operator=operator)}"}


def new_record(mailbox: str) -> KeyRecord:
    return make_key_record(mailbox, Identity.generate(), EncryptionKey.generate())


def as_json(record: KeyRecord) -> dict[str, str]:
    return {k: base64.b64encode(v).decode() if isinstance(v, bytes) else v for k, v in record.to_map().items()}


def from_json(m: dict[str, str]) -> KeyRecord:
    return KeyRecord(
        ik=base64.b64decode(m["ik"]), kid=m["kid"], ek=base64.b64decode(m["ek"]), sig=base64.b64decode(m["sig"])
    )


def error_of(response: httpx.Response) -> dict[str, Any]:
    if response.headers["content-type"].startswith("application/cbor"):
        body: dict[str, Any] = cbor2.loads(response.content)
    else:
        body = response.json()
    assert isinstance(body["message"], str) and body["message"]
    return body


async def test_put_then_get_in_json(broker: Broker, http: httpx.AsyncClient) -> None:
    alice, bob = new_record("alice"), new_record("bob")
    with trio.fail_after(TIMEOUT):
        for name, record in (("alice", alice), ("bob", bob)):
            r = await http.put("/relay/keys", json={"key": as_json(record)}, headers=bearer(broker, name))
            assert (r.status_code, r.json()) == (200, {"kid": record.kid}), r.text
        r = await http.get(
            "/relay/keys",
            params=[("mailbox", "bob"), ("mailbox", "nobody"), ("mailbox", "not a mailbox"), ("mailbox", "alice")],
            headers=bearer(broker, "carol"),
        )
        assert r.status_code == 200, r.text
        keys = r.json()["keys"]
        assert list(keys) == ["bob", "alice"]
        assert {name: from_json(m) for name, m in keys.items()} == {"bob": bob, "alice": alice}
        assert list(keys["bob"]) == ["ik", "kid", "ek", "sig"]


async def test_put_and_get_in_cbor(broker: Broker, http: httpx.AsyncClient) -> None:
    record = new_record("alice")
    cbor = {"Content-Type": "application/cbor", "Accept": "application/cbor"}
    with trio.fail_after(TIMEOUT):
        r = await http.put(
            "/relay/keys", content=cbor2.dumps({"key": record.to_map()}), headers={**cbor, **bearer(broker, "alice")}
        )
        assert (r.status_code, cbor2.loads(r.content)) == (200, {"kid": record.kid})
        r = await http.get("/relay/keys?mailbox=alice", headers={"Accept": "application/cbor", **bearer(broker, "x")})
        assert cbor2.loads(r.content) == {"keys": {"alice": record.to_map()}}


async def test_a_record_signed_for_another_mailbox_is_422_and_stores_nothing(
    broker: Broker, http: httpx.AsyncClient
) -> None:
    with trio.fail_after(TIMEOUT):
        r = await http.put("/relay/keys", json={"key": as_json(new_record("bob"))}, headers=bearer(broker, "alice"))
        assert r.status_code == 422
        assert error_of(r)["code"] == 3009
        assert "alice" in error_of(r)["message"]
        r = await http.get("/relay/keys?mailbox=alice&mailbox=bob", headers=bearer(broker, "alice"))
        assert r.json() == {"keys": {}}
        stats = (await http.get("/relay/stats", headers=bearer(broker, "op", operator=True))).json()["stats"]
        assert (stats["keys_put_total"], stats["keys_put_refused_total"], stats["key_lookups_total"]) == (0, 1, 2)


@pytest.mark.parametrize(
    ("key", "names"),
    [
        (None, '"key"'),
        ("text", '"key"'),
        ({"kid": "k1", "ek": "AA==", "sig": "AA=="}, '"key.ik"'),
        ({"ik": "not base64!", "kid": "k1", "ek": "AA==", "sig": "AA=="}, '"key.ik"'),
        ({"ik": 7, "kid": "k1", "ek": "AA==", "sig": "AA=="}, '"key.ik"'),
        ({"ik": "AA==", "kid": "k1", "ek": "AA==", "sig": "AA=="}, "ik must be a byte string of 32 bytes"),
        ({"ik": "A" * 43 + "=", "kid": "k 1", "ek": "A" * 43 + "=", "sig": "A" * 86 + "=="}, "kid must be"),
    ],
)
async def test_a_record_of_the_wrong_shape_is_400_naming_the_field(
    broker: Broker, http: httpx.AsyncClient, key: Any, names: str
) -> None:
    with trio.fail_after(TIMEOUT):
        body = {} if key is None else {"key": key}
        r = await http.put("/relay/keys", json=body, headers=bearer(broker, "alice"))
        assert r.status_code == 400, r.text
        error = error_of(r)
        assert error["code"] == 1004
        assert names in error["message"], error["message"]


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("", '"mailbox" is missing'),
        ("?mailbox=" + "b" * 65, "at most 64 characters"),
        ("?" + "&".join(f"mailbox=u{i}" for i in range(101)), "at most max_recipients (100)"),
    ],
)
async def test_a_bad_lookup_is_400(broker: Broker, http: httpx.AsyncClient, query: str, words: str) -> None:
    with trio.fail_after(TIMEOUT):
        r = await http.get("/relay/keys" + query, headers=bearer(broker, "alice"))
        assert r.status_code == 400
        error = error_of(r)
        assert error["code"] == 1004 and words in error["message"], error


async def test_operators_and_tokenless_callers_are_refused(broker: Broker, http: httpx.AsyncClient) -> None:
    body = {"key": as_json(new_record("op"))}
    with trio.fail_after(TIMEOUT):
        for r in (
            await http.put("/relay/keys", json=body, headers=bearer(broker, "op", operator=True)),
            await http.get("/relay/keys?mailbox=op", headers=bearer(broker, "op", operator=True)),
        ):
            assert (r.status_code, error_of(r)["code"]) == (403, 2003)
        for r in (await http.put("/relay/keys", json=body), await http.get("/relay/keys?mailbox=op")):
            assert (r.status_code, error_of(r)["code"]) == (401, 2001)
        r = await http.post("/relay/keys", json=body, headers=bearer(broker, "op"))
        assert r.status_code == 405
        assert r.headers["allow"] == "GET, HEAD, PUT"


async def test_http_and_tcp_share_the_directory(broker: Broker, http: httpx.AsyncClient) -> None:
    over_http, over_tcp = new_record("alice"), new_record("bob")
    assert broker.tcp_port is not None
    with trio.fail_after(TIMEOUT):
        await http.put("/relay/keys", json={"key": as_json(over_http)}, headers=bearer(broker, "alice"))
        bob, _ = await RawClient.login(broker.tcp_port, broker.auth.issue("bob"))
        await bob.expect(Drained)
        await bob.send(KeyPut(key=over_tcp), KeyGet(mailboxes=("alice",)))
        assert await bob.expect(KeyPutResult) == KeyPutResult(kid=over_tcp.kid)
        assert dict((await bob.expect(KeyGetResult)).keys) == {"alice": over_http}
        r = await http.get("/relay/keys?mailbox=bob", headers=bearer(broker, "alice"))
        assert from_json(r.json()["keys"]["bob"]) == over_tcp
        await bob.aclose()
