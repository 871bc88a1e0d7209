"""Several broker nodes over one Redis (standalone and Cluster): protocol.md holds across nodes.

Each test runs two or three real brokers in this process, each on its own free ports, all
naming the same Redis URL and key prefix (and one data dir, so one token secret): one relay.
Clients connect over real TCP, WebSocket and HTTP to whichever node the test says.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from broker.server import Broker
from wire import Ack, Deliver, Drained, Error, ErrorCode, Hello, Ping, Pong, Receipt, RecipientResult, Send, Status

from ..broker.raw import RawClient
from ..conftest import require_service, running_broker
from ..redis_servers import REDIS_SERVER, running_redis
from ..websocket.wsclient import login_ws

pytestmark = pytest.mark.stores("redis", "redis-cluster")

TIMEOUT = 20


@asynccontextmanager
async def nodes(tmp_path: Path, settings: dict[str, Any], count: int = 2) -> AsyncIterator[list[Broker]]:
    """``count`` brokers of one relay: same Redis, same prefix, same token secret."""
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(running_broker(tmp_path, **settings)) for _ in range(count)]


async def login(node: Broker, name: str) -> tuple[RawClient, int]:
    assert node.tcp_port is not None
    client, welcome = await RawClient.login(node.tcp_port, node.auth.issue(name))
    return client, welcome.pending


def send(mid: str, *to: str, body: bytes = b"x", ttl_s: int | None = None) -> Send:
    return Send(id=mid, to=to, body=body, ttl_s=ttl_s)


async def test_a_sender_on_one_node_reaches_an_online_recipient_on_another_at_once(
    tmp_path: Path, store_settings: dict[str, Any]
) -> None:
    async with nodes(tmp_path, store_settings) as (a, b):
        with trio.fail_after(TIMEOUT):
            async with login_ws(b.ws_port, b.auth.issue("bob")) as (bob, _):
                await bob.expect(Drained)
                alice, _ = await login(a, "alice")
                await alice.expect(Drained)
                await alice.send(send("m1", "bob", body=b"hello across nodes"))
                receipt = await alice.expect(Receipt)
                assert receipt.results["bob"].status is Status.DELIVERED
                deliver = await bob.expect(Deliver)
                assert (deliver.id, deliver.sender, deliver.body, deliver.attempt) == (
                    "m1",
                    "alice",
                    b"hello across nodes",
                    1,
                )
                await bob.send(Ack(ids=("m1",)), Ping())
                await bob.expect(Pong)
                # The same SEND again, on the other node: a duplicate, not a second message.
                alice_b, _ = await login(b, "alice")  # takes alice's mailbox over; her first connection ends
                await alice_b.expect(Drained)
                await alice_b.send(send("m1", "bob", body=b"hello across nodes"))
                again = await alice_b.expect(Receipt)
                assert again.results["bob"].status is not Status.DELIVERED
                await bob.send(Ping())
                await bob.expect(Pong)
                stats = await a.statistics()
                assert stats["messages_total"] == 0
                assert stats["store_round_trips"] > 0


async def test_an_http_send_on_one_node_reaches_a_tcp_recipient_on_another(
    tmp_path: Path, store_settings: dict[str, Any]
) -> None:
    async with nodes(tmp_path, store_settings) as (a, b):
        with trio.fail_after(TIMEOUT):
            bob, _ = await login(b, "bob")
            await bob.expect(Drained)
            headers = {"Authorization": f"Bearer {a.auth.issue('alice')}"}
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{a.http_port}", timeout=TIMEOUT) as http:
                body = {"id": "h1", "to": ["bob", "carol"], "body": base64.b64encode(b"ping").decode()}
                r = await http.post("/relay/send", json=body, headers=headers)
                assert r.json()["results"] == {"bob": {"status": "delivered"}, "carol": {"status": "queued"}}
                deliver = await bob.expect(Deliver)
                assert (deliver.id, deliver.sender, deliver.body) == ("h1", "alice", b"ping")
                # An ACK over HTTP on node A frees bob's window on node B: his next message still arrives.
                bob_headers = {"Authorization": f"Bearer {a.auth.issue('bob')}"}
                r = await http.post("/relay/acknowledge", json={"ids": ["h1"]}, headers=bob_headers)
                assert r.json() == {"acknowledged": 1}
                r = await http.get("/relay/pending", headers={"Authorization": f"Bearer {b.auth.issue('carol')}"})
                assert [m["id"] for m in r.json()["messages"]] == ["h1"]


async def test_a_connection_on_another_node_takes_the_mailbox_over(
    tmp_path: Path, store_settings: dict[str, Any]
) -> None:
    async with nodes(tmp_path, store_settings) as (a, b):
        with trio.fail_after(TIMEOUT):
            alice, _ = await login(a, "alice")
            await alice.expect(Drained)
            await alice.send(send("m1", "bob"))
            assert (await alice.expect(Receipt)).results["bob"].status is Status.QUEUED
            first, pending = await login(a, "bob")
            assert pending == 1
            assert (await first.expect(Deliver)).attempt == 1  # in flight on node A, never ACKed
            await first.expect(Drained)
            second, _ = await login(b, "bob")
            error = await first.expect(Error)
            assert (error.code, error.close) == (ErrorCode.CONNECTED_ELSEWHERE, True)
            await first.expect_closed()
            redelivered = await second.expect(Deliver)
            assert (redelivered.id, redelivered.attempt) == ("m1", 2)
            await second.expect(Drained)
            # Node A now routes to bob on node B.
            await alice.send(send("m2", "bob"))
            assert (await alice.expect(Receipt)).results["bob"].status is Status.DELIVERED
            assert (await second.expect(Deliver)).id == "m2"


async def test_queued_messages_survive_a_restart_of_every_node(tmp_path: Path, store_settings: dict[str, Any]) -> None:
    with trio.fail_after(TIMEOUT):
        async with nodes(tmp_path, store_settings, count=1) as (a,):
            alice, _ = await login(a, "alice")
            await alice.expect(Drained)
            for i in range(3):
                await alice.send(send(f"m{i}", "bob", body=f"body {i}".encode()))
                assert (await alice.expect(Receipt)).results["bob"].status is Status.QUEUED
            first, pending = await login(a, "bob")
            assert pending == 3
            assert (await first.expect(Deliver)).id == "m0"  # delivered, not ACKed: redelivered after the restart
            await first.send(Ack(ids=("m1",)))
            await first.send(Ping())
            while not isinstance(await first.next(), Pong):
                pass
        async with nodes(tmp_path, store_settings, count=1) as (restarted,):
            bob, pending = await login(restarted, "bob")
            assert pending == 2
            frames, _ = await bob.until(Drained)
            delivered = [(f.id, f.body) for f in frames if isinstance(f, Deliver)]
            assert delivered == [("m0", b"body 0"), ("m2", b"body 2")]


async def test_an_expired_message_is_never_delivered(tmp_path: Path, store_settings: dict[str, Any]) -> None:
    async with nodes(tmp_path, store_settings) as (a, b):
        with trio.fail_after(TIMEOUT):
            alice, _ = await login(a, "alice")
            await alice.expect(Drained)
            await alice.send(send("short", "bob", ttl_s=1), send("long", "bob"))
            await alice.expect(Receipt)
            await alice.expect(Receipt)
            await trio.sleep(1.2)  # real time: Redis judges expiry against the broker's clock
            bob, _ = await login(b, "bob")
            frames, drained = await bob.until(Drained)
            assert [f.id for f in frames if isinstance(f, Deliver)] == ["long"]
            assert drained.pending == 1


async def test_an_unreachable_store_is_a_clear_answer_and_the_broker_keeps_serving(tmp_path: Path) -> None:
    """Redis goes away under a running node: an open session's SEND gets a RECEIPT refused with 3008 and the
    session stays up (PONG); a HELLO gets ERROR 5002 and is closed (its mailbox cannot be claimed); an HTTP request
    other than send gets 503 with 5002; nothing crashes, and once Redis is back the same session's SEND is queued
    and a HELLO is served. (A Redis of its own, to stop; tests/nodes/test_store_outage.py goes further.)"""
    require_service(REDIS_SERVER is not None, "redis-server")
    with running_redis(tmp_path / "redis") as redis:
        async with running_broker(tmp_path, store=redis.url, store_prefix="gone") as node:
            with trio.fail_after(TIMEOUT):
                alice, _ = await login(node, "alice")
                await alice.expect(Drained)
                redis.stop()
                await alice.send(send("m1", "bob"))
                receipt = await alice.expect(Receipt)
                assert (receipt.code, receipt.results) == (ErrorCode.STORE_UNREACHABLE, {})
                await alice.send(Ping())
                await alice.expect(Pong)
                assert node.tcp_port is not None
                late = await RawClient.open(node.tcp_port)
                await late.send(Hello(version=1, token=node.auth.issue("bob")))
                error = await late.expect(Error)
                assert (error.code, error.close) == (ErrorCode.STORE_UNAVAILABLE, True)
                headers = {"Authorization": f"Bearer {node.auth.issue('alice')}"}
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.http_port}", timeout=TIMEOUT) as http:
                    r = await http.get("/relay/pending", headers=headers)
                    assert (r.status_code, r.json()["code"], r.headers["retry-after"]) == (503, 5002, "1")
                redis.restart()
                while (receipt := await resend(alice, send("m1", "bob"))).code is not None:
                    assert receipt.code == ErrorCode.STORE_UNREACHABLE
                    await trio.sleep(0.05)  # until the store answers again
                assert receipt.results == {"bob": RecipientResult(Status.QUEUED)}
                bob, pending = await login(node, "bob")
                assert pending == 1
                assert (await bob.expect(Deliver)).id == "m1"


async def resend(client: RawClient, frame: Send) -> Receipt:
    await client.send(frame)
    return await client.expect(Receipt)
