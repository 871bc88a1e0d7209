"""A Redis outage under a running node (protocol.md section 9, rule 18), and a Redis restart that keeps its AOF.

Each test has a redis-server of its own (to stop, kill and restart on the same port) and one
real broker over it, with clients over real TCP, WebSocket and HTTP. Nothing is timed: each
step waits for its outcome (a frame, a receipt that is no longer 3008, a statistic), bounded
by ``trio.fail_after``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from broker.server import Broker
from wire import (
    Ack,
    Deliver,
    Drained,
    ErrorCode,
    Ping,
    Pong,
    Pull,
    Receipt,
    RecipientResult,
    Send,
    Stats,
    StatsResult,
    Status,
)

from ..broker.raw import FrameClient, RawClient
from ..conftest import require_service, running_broker
from ..redis_servers import REDIS_SERVER, running_redis
from ..websocket.wsclient import login_ws

TIMEOUT = 30
UNREACHABLE = int(ErrorCode.STORE_UNREACHABLE)
QUEUED = RecipientResult(Status.QUEUED)
DELIVERED = RecipientResult(Status.DELIVERED)


@pytest.fixture(autouse=True)
def _needs_redis() -> None:
    require_service(REDIS_SERVER is not None, "redis-server")


async def login(node: Broker, name: str, *, operator: bool = False) -> RawClient:
    assert node.tcp_port is not None
    client, _ = await RawClient.login(node.tcp_port, node.auth.issue(name, operator=operator))
    return client


async def pong(client: FrameClient) -> list[Any]:
    """PING, and the frames that came before its PONG."""
    await client.send(Ping())
    before, _ = await client.until(Pong)
    return before


async def receipt_once_stored(client: FrameClient, send: Send) -> Receipt:
    """Send ``send`` (the same id each time) until its receipt is not 3008: the store answers again."""
    while True:
        await client.send(send)
        receipt = await client.expect(Receipt)
        if receipt.code != UNREACHABLE:
            return receipt
        await trio.sleep(0.05)


async def node_stats(operator: FrameClient) -> dict[str, int]:
    await operator.send(Stats())
    return dict((await operator.expect(StatsResult)).stats)


def outage_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "broker.health"]


async def test_a_redis_outage_refuses_sends_with_3008_keeps_sessions_and_they_resume(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Stop Redis under a node: SENDs over TCP, WebSocket and HTTP get 3008, sessions stay up (PING, STATS), an ACK
    and a PULL made meanwhile take effect once Redis is back (restarted on its port, with its AOF), deliveries resume
    on the same connection, and the node logs one warning and one notice and counts the failures."""
    caplog.set_level(logging.INFO, logger="broker.health")
    with running_redis(tmp_path / "redis", aof=True) as redis:
        # A short lease: the node's renewals (every 0.5 s) fail during the outage too, and say nothing more.
        async with running_broker(tmp_path, store=redis.url, store_prefix="outage", presence_lease_s=1.5) as node:
            with trio.fail_after(TIMEOUT):
                async with (
                    login_ws(node.ws_port, node.auth.issue("bob")) as (bob, _),
                    httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.http_port}", timeout=TIMEOUT) as http,
                ):
                    await bob.expect(Drained)
                    alice = await login(node, "alice")
                    await alice.expect(Drained)
                    ops = await login(node, "ops", operator=True)
                    await alice.send(Send(id="m0", to=("bob",), body=b"zero"), Send(id="m1", to=("bob",), body=b"one"))
                    assert [(await alice.expect(Receipt)).results for _ in range(2)] == [{"bob": DELIVERED}] * 2
                    assert [(await bob.expect(Deliver)).id for _ in range(2)] == ["m0", "m1"]

                    redis.stop()
                    await alice.send(Send(id="m2", to=("bob", "carol"), body=b"two"))
                    assert (await alice.expect(Receipt)).code == UNREACHABLE
                    assert await pong(alice) == [], "the session stays up"
                    await bob.send(Ack(ids=("m0",)), Pull())  # kept, and completed once the store answers
                    await bob.send(Send(id="w1", to=("alice",), body=b"over ws"))
                    assert (await bob.expect(Receipt)).code == UNREACHABLE
                    assert await pong(bob) == []
                    headers = {"Authorization": f"Bearer {node.auth.issue('carol')}"}
                    body = {"id": "h1", "to": ["bob"], "body": "aGk="}
                    r = await http.post("/relay/send", json=body, headers=headers)
                    assert (r.status_code, r.json()) == (200, {"id": "h1", "code": UNREACHABLE})
                    stats = await node_stats(ops)
                    assert stats["store_available"] == 0 and stats["store_errors_total"] >= 3
                    assert "messages_total" not in stats, "the relay's figures are not known now"
                    op_headers = {"Authorization": f"Bearer {node.auth.issue('ops', operator=True)}"}
                    r = await http.get("/relay/stats", headers=op_headers)
                    assert r.status_code == 200 and r.json()["stats"]["store_available"] == 0
                    counted = node.health.errors
                    while node.health.errors < counted + 3:
                        await trio.sleep(0.05)  # background calls fail too: the flush, renewals, reconnect probes

                    redis.restart()
                    assert (await receipt_once_stored(alice, Send(id="m2", to=("bob",), body=b"two"))).results == {
                        "bob": DELIVERED
                    }
                    # Without reconnecting: the PULL (m1 again; m0 too if it came before the kept ACK), then m2.
                    frames, drained = await bob.until(Drained)
                    again = [(f.id, f.attempt) for f in frames if isinstance(f, Deliver)]
                    assert ("m1", 2) in again and set(again) <= {("m0", 2), ("m1", 2), ("m2", 1)}
                    if ("m2", 1) not in again:
                        assert (await bob.expect(Deliver)).id == "m2"
                    await bob.send(Ack(ids=("m1", "m2")))  # not m0: the kept ACK deletes it
                    await pong(bob)
                    r = await http.post("/relay/send", json=body, headers=headers)
                    assert r.json()["results"] == {"bob": {"status": "delivered"}}
                    assert (await bob.expect(Deliver)).id == "h1"
                    await bob.send(Ack(ids=("h1",)))
                    await pong(bob)
                    bob_headers = {"Authorization": f"Bearer {node.auth.issue('bob')}"}
                    r = await http.get("/relay/pending", headers=bob_headers)
                    assert r.json() == {"messages": [], "pending": 0}, "every ACK took effect, the kept one too"
                    while (stats := await node_stats(ops))["store_available"] == 0:
                        await trio.sleep(0.05)  # the reconnect probe backs off up to 5 s
                    assert stats["messages_total"] == 0
                    assert drained.pending >= 1
    lines = outage_lines(caplog)
    assert [level for level, _ in lines] == [logging.WARNING, logging.INFO], lines
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("broker") and r.levelno == logging.WARNING]
    assert warnings == [lines[0][1]], "one warning for the outage, not one per failed call"


async def test_redis_restarted_with_aof_keeps_everything_it_accepted_and_the_node_serves_again(
    tmp_path: Path,
) -> None:
    """SIGKILL Redis (AOF, fsync always) while a sender keeps sending: every SEND whose receipt said "queued" before,
    during or after the restart is delivered afterwards; a 3008 one may or may not be; the node serves again."""
    with running_redis(tmp_path / "redis", aof=True) as redis:
        async with running_broker(tmp_path, store=redis.url, store_prefix="aof") as node:
            accepted: list[str] = []
            unknown: list[str] = []
            enough = trio.Event()
            with trio.fail_after(TIMEOUT):
                alice = await login(node, "alice")
                await alice.expect(Drained)

                async def keep_sending(until: int) -> None:
                    for i in range(10_000):
                        await alice.send(Send(id=f"m{i}", to=("bob",), body=b"b%d" % i))
                        receipt = await alice.expect(Receipt)
                        if receipt.code == UNREACHABLE:
                            unknown.append(receipt.id)
                            await trio.sleep(0.02)
                        else:
                            assert receipt.results == {"bob": QUEUED}
                            accepted.append(receipt.id)
                        if len(accepted) >= until:
                            enough.set()
                            return

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(keep_sending, 200)
                    while len(accepted) < 50:
                        await trio.sleep(0.01)
                    redis.kill()
                    while not unknown:
                        await trio.sleep(0.01)
                    redis.restart()
                    await enough.wait()
                bob = await login(node, "bob")
                frames, drained = await bob.until(Drained)
                delivered = [f.id for f in frames if isinstance(f, Deliver)]
                assert set(accepted) <= set(delivered), "nothing Redis acknowledged is lost"
                assert set(delivered) <= set(accepted) | set(unknown)
                assert len(delivered) == len(set(delivered)) == drained.pending
