"""GET /metrics, /healthz and /readyz on a real broker (127.0.0.1, port 0), after real conversations.

Figures are read as Prometheus would, with prometheus-client's parser, and compared before and after
each step. Nothing is timed: a step that happens in the background (Redis noticed gone, the broker
draining) is waited for, bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trustme
from prometheus_client.parser import text_string_to_metric_families

from broker.metrics import ACTIVITY_METRICS, NODE_METRICS, RELAY_METRICS, ScrapeRule
from broker.server import Broker
from broker.stats import NODE_NAMES, REFUSAL_NAMES, RELAY_NAMES, TRANSPORT_NAMES, NodeActivity
from client import open_client
from wire import Ack, Deliver, Drained, Receipt, RecipientResult, Send, Status

from ..broker.raw import RawClient
from ..conftest import require_service, running_broker
from ..redis_servers import REDIS_SERVER, running_redis
from ..tls.certs import tls_broker, trusting
from ..websocket.wsclient import login_ws

TIMEOUT = 30
Figures = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(broker: Broker, headers: dict[str, str] | None = None) -> Figures:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{broker.http_port}", timeout=TIMEOUT) as http:
        r = await http.get("/metrics", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(figures: Figures, name: str, **labels: str) -> float:
    return figures[(name, frozenset(labels.items()))]


def moved(before: Figures, after: Figures, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def login(broker: Broker, name: str) -> RawClient:
    assert broker.tcp_port is not None
    client, _ = await RawClient.login(broker.tcp_port, broker.auth.issue(name))
    return client


def test_every_figure_has_one_metric() -> None:
    """Every STATS figure and every activity counter is rendered, each under a name of its own."""
    limited = {name for name in NODE_NAMES if name.startswith("rate_limited_")}  # relay_rate_limited_total{reason}
    node = set(NODE_NAMES) - {"connections", "refused_total", *REFUSAL_NAMES.values(), *limited}  # labelled families
    assert set(NODE_METRICS) == node
    assert set(RELAY_METRICS) == set(RELAY_NAMES)
    counters = {f.name for f in dataclasses.fields(NodeActivity) if f.name.endswith("_total")}
    assert set(ACTIVITY_METRICS) == counters
    names = [f.metric for table in (NODE_METRICS, ACTIVITY_METRICS, RELAY_METRICS) for f in table.values()]
    assert len(set(names)) == len(names)


async def test_a_conversation_moves_the_figures(broker_factory: Callable[..., Any]) -> None:
    """A SEND delivered and ACKed, one refused (carol's mailbox full), and a WebSocket connection: each figure moves
    by what happened, the latency histograms count the delivery and the ACK, the loop-lag task reports."""
    async with broker_factory(max_mailbox_messages=1) as broker:
        with trio.fail_after(TIMEOUT):
            alice = await login(broker, "alice")
            bob = await login(broker, "bob")
            await alice.expect(Drained)
            await bob.expect(Drained)
            before = await scrape(broker)
            async with login_ws(broker.ws_port, broker.auth.issue("dave")) as (dave, _):
                await dave.expect(Drained)
                await alice.send(Send(id="m1", to=("bob",), body=b"hello"))
                assert (await alice.expect(Receipt)).results == {"bob": RecipientResult(Status.DELIVERED)}
                assert (await bob.expect(Deliver)).id == "m1"
                await alice.send(Send(id="c1", to=("carol",), body=b"one"), Send(id="c2", to=("carol",), body=b"two"))
                assert (await alice.expect(Receipt)).results == {"carol": RecipientResult(Status.QUEUED)}
                assert (await alice.expect(Receipt)).results["carol"].status is Status.REFUSED
                await bob.send(Ack(ids=("m1",)))
                while value(await scrape(broker), "relay_messages_acknowledged_total") < 1:
                    await trio.sleep(0.01)  # the ACK is applied after the broker reads it: wait for that
                after = await scrape(broker)
            assert value(after, "relay_connections", transport="tcp") == 2
            assert value(after, "relay_connections", transport="websocket") == 1
    assert moved(before, after, "relay_messages_sent_total") == 2  # m1 for bob, c1 for carol
    assert moved(before, after, "relay_messages_delivered_total") == 1
    assert moved(before, after, "relay_messages_redelivered_total") == 0
    assert moved(before, after, "relay_messages_acknowledged_total") == 1
    assert moved(before, after, "relay_messages_refused_total", reason="mailbox_full") == 1
    assert moved(before, after, "relay_messages_refused_total", reason="broker_full") == 0
    assert value(after, "relay_messages_held") == 1  # c1 waits for carol
    assert value(after, "relay_messages_held_bytes") == len(b"one")
    # carol's mailbox, holding c1, is the one mailbox in the depth histogram, in its first bucket (1 message).
    assert [value(after, "relay_mailbox_depth_bucket", le=le) for le in ("1.0", "2.0", "+Inf")] == [1, 1, 1]
    assert (value(after, "relay_mailbox_depth_count"), value(after, "relay_mailbox_depth_sum")) == (1, 1)
    assert moved(before, after, "relay_deliver_latency_seconds_count") == 1
    assert moved(before, after, "relay_ack_latency_seconds_count") == 1
    assert value(after, "relay_deliver_latency_seconds_bucket", le="+Inf") == value(
        after, "relay_deliver_latency_seconds_count"
    )
    # alice: 3 SENDs in, 3 RECEIPTs out; bob: a DELIVER out, an ACK in; dave's HELLO over WebSocket and more.
    assert moved(before, after, "relay_frames_received_total") >= 4
    assert moved(before, after, "relay_frames_sent_total") >= 4
    assert moved(before, after, "relay_bytes_received_total") > len(b"helloonetwo")
    assert moved(before, after, "relay_bytes_sent_total") > len(b"hello")
    assert value(after, "relay_store_available") == 1
    assert ("relay_event_loop_lag_seconds_count", frozenset()) in after
    assert ("relay_store_call_latency_seconds_count", frozenset()) not in after, "no networked store"


async def test_connections_are_counted_by_the_listener_they_came_in_on(tmp_path: Path) -> None:
    """One client on each of tcp://, tls://, ws:// and wss:// (a trustme certificate): each transport label counts
    one connection, and none once they have gone."""
    ca = trustme.CA()
    with trio.fail_after(TIMEOUT):
        async with tls_broker(tmp_path, ca.issue_cert("127.0.0.1")) as broker:
            urls = {
                "tcp": f"tcp://127.0.0.1:{broker.tcp_port}",
                "tls": f"tls://127.0.0.1:{broker.tls_port}",
                "websocket": f"ws://127.0.0.1:{broker.ws_port}/relay",
                "wss": f"wss://127.0.0.1:{broker.wss_port}/relay",
            }
            assert set(urls) == set(TRANSPORT_NAMES)
            async with contextlib.AsyncExitStack() as stack:
                for kind, url in urls.items():
                    token = broker.auth.issue(kind)
                    await stack.enter_async_context(open_client(url, token, ssl_context=trusting(ca), e2e=False))
                during = await scrape(broker)
            while (await broker.statistics())["connections"]:
                await trio.sleep(0.01)  # the broker ends a session after its client has gone: wait for that
            after = await scrape(broker)
    for kind in TRANSPORT_NAMES:
        assert (
            value(during, "relay_connections", transport=kind),
            value(after, "relay_connections", transport=kind),
        ) == (
            1,
            0,
        ), kind


async def test_an_expiry_is_counted(tmp_path: Path) -> None:
    """A message whose TTL passes (the broker's injected epoch clock, moved on) is counted as expired by the sweep."""
    now = [1_800_000_000_000]
    async with running_broker(tmp_path, clock=lambda: now[0]) as broker:
        with trio.fail_after(TIMEOUT):
            alice = await login(broker, "alice")
            await alice.expect(Drained)
            await alice.send(Send(id="e1", to=("bob",), body=b"soon gone", ttl_s=5))
            assert (await alice.expect(Receipt)).results == {"bob": RecipientResult(Status.QUEUED)}
            before = await scrape(broker)
            now[0] += 6_000
            assert await broker.cleanup() == 1
            after = await scrape(broker)
    assert moved(before, after, "relay_messages_expired_total") == 1
    assert (value(before, "relay_messages_held"), value(after, "relay_messages_held")) == (1, 0)


async def test_loopback_scrapes_without_a_token_by_default(broker: Broker) -> None:
    assert value(await scrape(broker), "relay_store_available") == 1


@pytest.mark.parametrize("networks", [(), ("10.0.0.0/8", "fd00::/8")])
async def test_a_client_outside_the_open_networks_needs_an_operator_token(
    broker_factory: Callable[..., Any], networks: tuple[str, ...]
) -> None:
    """With loopback not among metrics_open_networks, this (loopback) client is judged as any other address is."""
    async with broker_factory(metrics_open_networks=networks) as broker:
        url = f"http://127.0.0.1:{broker.http_port}/metrics"
        with trio.fail_after(TIMEOUT):
            async with httpx.AsyncClient(timeout=TIMEOUT) as http:
                none = await http.get(url)
                mailbox = await http.get(url, headers={"Authorization": f"Bearer {broker.auth.issue('alice')}"})
            operator = {"Authorization": f"Bearer {broker.auth.issue('ops', operator=True)}"}
            figures = await scrape(broker, operator)
    assert (none.status_code, none.json()["code"]) == (401, 2001)
    assert (mailbox.status_code, mailbox.json()["code"]) == (403, 2003)
    assert value(figures, "relay_store_available") == 1


def test_the_scrape_rule_judges_addresses() -> None:
    rule = ScrapeRule(("127.0.0.0/8", "::1/128"))
    assert rule.open_to("127.0.0.1") and rule.open_to("127.9.9.9") and rule.open_to("::1")
    assert rule.open_to("::ffff:127.0.0.1"), "an IPv4 client on a dual-stack socket"
    assert not rule.open_to("10.1.2.3") and not rule.open_to("2001:db8::1")
    assert not rule.open_to(None) and not rule.open_to("not-an-address")
    assert not ScrapeRule(()).open_to("127.0.0.1")
    with pytest.raises(ValueError):
        ScrapeRule(("127.0.0.1/40",))


async def test_healthz_and_readyz_answer_a_serving_broker(broker: Broker) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{broker.http_port}", timeout=TIMEOUT) as http:
        health = await http.get("/healthz")
        ready = await http.get("/readyz")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert (ready.status_code, ready.json()) == (200, {"ready": True})


async def readyz(port: int | None) -> httpx.Response:
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        return await http.get(f"http://127.0.0.1:{port}/readyz")


async def test_readyz_is_503_while_the_broker_drains(tmp_path: Path) -> None:
    """Once shutdown begins (SIGTERM cancels serve), /readyz says draining while sessions still flush. A recipient
    that does not read keeps its session flushing (its socket full), so the drain lasts until it hangs up."""
    config: dict[str, Any] = {"shutdown_grace_s": TIMEOUT}
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as outer:
            serving = trio.CancelScope()

            async def serve(task_status: trio.TaskStatus[Broker]) -> None:
                with serving:
                    async with running_broker(tmp_path, **config) as b:
                        task_status.started(b)
                        await trio.sleep_forever()

            broker: Broker = await outer.start(serve)
            assert (await readyz(broker.http_port)).status_code == 200
            bob = await login(broker, "bob")  # never reads from here on
            alice = await login(broker, "alice")
            await alice.expect(Drained)
            body = bytes(broker.config.max_frame_bytes - 1024)
            for i in range(24):  # ~24 MiB for bob: more than his socket's buffers and his outbox hold
                await alice.send(Send(id=f"m{i}", to=("bob",), body=body))
                await alice.expect(Receipt)
            serving.cancel()
            while (answer := await readyz(broker.http_port)).status_code == 200:
                await trio.sleep(0.01)
            assert (answer.status_code, answer.json()) == (503, {"ready": False, "reason": broker.ready})
            assert "draining" in answer.json()["reason"]
            await bob.aclose()
            await alice.aclose()


@pytest.fixture
def _needs_redis() -> None:
    require_service(REDIS_SERVER is not None, "redis-server")


@pytest.mark.usefixtures("_needs_redis")
async def test_redis_calls_are_timed_and_readyz_follows_the_store(tmp_path: Path) -> None:
    """Over a real redis-server: a SEND's round trips show in the call latency histogram; Redis stopped, /readyz
    becomes 503 (the store) and the errors are counted; Redis back, /readyz is 200 again."""
    with running_redis(tmp_path / "redis") as redis:
        async with running_broker(tmp_path, store=redis.url, store_prefix="metrics") as broker:
            with trio.fail_after(TIMEOUT):
                alice = await login(broker, "alice")
                await alice.expect(Drained)
                before = await scrape(broker)
                await alice.send(Send(id="r1", to=("bob",), body=b"over redis"))
                assert (await alice.expect(Receipt)).results == {"bob": RecipientResult(Status.QUEUED)}
                after = await scrape(broker)
                assert moved(before, after, "relay_store_call_latency_seconds_count") >= 1
                assert moved(before, after, "relay_store_call_latency_seconds_sum") > 0
                assert value(after, "relay_messages_held") == 1
                assert (await readyz(broker.http_port)).status_code == 200

                redis.stop()
                while (answer := await readyz(broker.http_port)).status_code == 200:
                    await trio.sleep(0.05)  # the node notices at its next store call (its flush runs every second)
                assert (answer.status_code, answer.json()) == (503, {"ready": False, "reason": broker.ready})
                assert "store" in answer.json()["reason"]
                down = await scrape(broker)
                assert value(down, "relay_store_available") == 0
                assert value(down, "relay_store_errors_total") > value(after, "relay_store_errors_total")
                assert ("relay_messages_held", frozenset()) not in down, "the relay's figures are unknown now"

                redis.restart()
                while (answer := await readyz(broker.http_port)).status_code != 200:
                    await trio.sleep(0.05)  # the health's reconnect probe finds it (backoff up to 5 s)
                assert answer.json() == {"ready": True}
                assert value(await scrape(broker), "relay_store_available") == 1
