"""The key directory across nodes: two brokers over one Redis (standalone and Cluster) are one directory.

A record put on one node (over TCP, WebSocket or HTTP) is what every node answers a lookup with,
a replacement on another node replaces it everywhere, and a refused put changes nothing anywhere.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from wire import Drained, ErrorCode, KeyGet, KeyGetResult, KeyPut, KeyPutResult, KeyRecord
from wire.e2e import EncryptionKey, Identity, make_key_record

from ..broker.raw import RawClient
from ..websocket.wsclient import login_ws
from .test_nodes import login, nodes

pytestmark = pytest.mark.stores("redis", "redis-cluster")

TIMEOUT = 20


def new_record(mailbox: str, identity: Identity | None = None) -> KeyRecord:
    return make_key_record(mailbox, identity or Identity.generate(), EncryptionKey.generate())


async def lookup(client: RawClient, *mailboxes: str) -> dict[str, KeyRecord]:
    await client.send(KeyGet(mailboxes=mailboxes))
    return dict((await client.expect(KeyGetResult)).keys)


async def test_two_nodes_see_one_directory(tmp_path: Path, store_settings: dict[str, Any]) -> None:
    identity = Identity.generate()
    first, rotated = new_record("alice", identity), new_record("alice", identity)
    async with nodes(tmp_path, store_settings) as (a, b):
        with trio.fail_after(TIMEOUT):
            alice, _ = await login(a, "alice")
            await alice.expect(Drained)
            await alice.send(KeyPut(key=first))
            assert await alice.expect(KeyPutResult) == KeyPutResult(kid=first.kid)
            bob, _ = await login(b, "bob")
            await bob.expect(Drained)
            assert await lookup(bob, "alice", "bob") == {"alice": first}
            # alice rotates her encryption key over WebSocket on the other node: both nodes answer the new one
            async with login_ws(b.ws_port, b.auth.issue("alice")) as (alice_ws, _):
                await alice_ws.expect(Drained)
                await alice_ws.send(KeyPut(key=rotated))
                assert await alice_ws.expect(KeyPutResult) == KeyPutResult(kid=rotated.kid)
            carol, _ = await login(a, "carol")
            await carol.expect(Drained)
            assert await lookup(carol, "alice") == {"alice": rotated}
            assert await lookup(bob, "alice") == {"alice": rotated}
            # a record signed for alice, put by bob's session on node b, is refused and stores nothing
            await bob.send(KeyPut(key=new_record("alice")))
            assert (await bob.expect(KeyPutResult)).code == ErrorCode.INVALID_KEY
            assert await lookup(carol, "alice", "bob") == {"alice": rotated}
            # and over HTTP on node b, bob's own record is seen by node a
            bobs = new_record("bob")
            body = {
                "key": {
                    k: base64.b64encode(v).decode() if isinstance(v, bytes) else v for k, v in bobs.to_map().items()
                }
            }
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{b.http_port}", timeout=TIMEOUT) as http:
                r = await http.put("/relay/keys", json=body, headers={"Authorization": f"Bearer {b.auth.issue('bob')}"})
                assert r.status_code == 200, r.text
            assert await lookup(carol, "bob") == {"bob": bobs}
            for client in (alice, bob, carol):
                await client.aclose()
        stats_a, stats_b = await a.statistics(), await b.statistics()
        assert (stats_a["keys_put_total"], stats_b["keys_put_total"]) == (1, 2)  # node figures, not the relay's
        assert stats_b["keys_put_refused_total"] == 1
