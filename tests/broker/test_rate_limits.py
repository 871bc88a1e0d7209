"""The abuse limits against a running broker (protocol.md rule 21): real sockets on loopback, the exemption off.

A second source address is 127.0.0.2 (Linux routes all of 127.0.0.0/8 to loopback): a client bound to it is
another address to the broker. Refills are made slow (a token every 1,000 s) so that nothing depends on timing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trustme

from broker.limits import Reason
from broker.server import Broker
from wire import Deliver, Drained, Error, ErrorCode, Hello, Receipt, Send, Status, Welcome

from ..tls.certs import tls_broker, trusting
from ..websocket.wsclient import login_ws, open_ws
from .raw import FrameClient, RawClient

pytestmark = pytest.mark.stores("memory", "redis")

TIMEOUT = 20
SLOW = 0.001
"""A refill rate (tokens a second) that gives nothing back during a test."""
OTHER = "127.0.0.2"


def limited(**changes: Any) -> dict[str, Any]:
    """Settings with the loopback exemption off and every limit wide open unless ``changes`` say otherwise."""
    return {"rate_exempt_networks": (), **changes}


async def connect(broker: Broker, *, source: str | None = None) -> RawClient:
    assert broker.tcp_port is not None
    return RawClient(await trio.open_tcp_stream("127.0.0.1", broker.tcp_port, local_address=source))


async def login(broker: Broker, name: str, *, source: str | None = None) -> RawClient:
    client = await connect(broker, source=source)
    await client.hello(broker.auth.issue(name))
    return client


@asynccontextmanager
async def login_over(transport: str, broker: Broker, name: str) -> AsyncIterator[FrameClient]:
    if transport == "tcp":
        client = await login(broker, name)
        try:
            yield client
        finally:
            await client.aclose()
    else:
        async with login_ws(broker.ws_port, broker.auth.issue(name)) as (ws, _):
            yield ws


async def refused(client: FrameClient, code: ErrorCode) -> Error:
    error = await client.expect(Error)
    assert (error.code, error.close) == (code, True), error
    return error


async def stats(broker: Broker) -> dict[str, int]:
    return await broker.statistics()


# ------------------------------------------------------------------ connections


async def test_connections_past_the_per_address_cap_get_4007_until_one_closes(
    broker_factory: Callable[..., Any],
) -> None:
    async with broker_factory(**limited(max_connections_per_address=2)) as broker:
        with trio.fail_after(TIMEOUT):
            first = await login(broker, "a1")
            second = await login(broker, "a2")
            third = await connect(broker)
            error = await refused(third, ErrorCode.TOO_MANY_CONNECTIONS_FROM_ADDRESS)
            assert error.retry_after_ms is None
            await third.expect_closed()
            elsewhere = await login(broker, "b1", source=OTHER)  # another address has its own count
            await first.aclose()
            while broker.limiter.open.get("127.0.0.1") != 1:
                await trio.sleep(0.01)
            again = await login(broker, "a3")
            assert (await stats(broker))["rate_limited_address_connections_total"] == 1
            for client in (second, elsewhere, again):
                await client.aclose()


async def test_the_per_address_cap_holds_on_websocket_too(broker_factory: Callable[..., Any]) -> None:
    async with broker_factory(**limited(max_connections_per_address=1)) as broker:
        with trio.fail_after(TIMEOUT):
            async with login_ws(broker.ws_port, broker.auth.issue("a1")):
                async with open_ws(broker.ws_port) as third:
                    await refused(third, ErrorCode.TOO_MANY_CONNECTIONS_FROM_ADDRESS)


@pytest.mark.parametrize("transport", ["tcp", "websocket"])
async def test_connections_past_the_rate_get_4006_with_a_retry_hint(
    broker_factory: Callable[..., Any], transport: str
) -> None:
    async with broker_factory(**limited(address_connections_burst=2, address_connections_per_s=SLOW)) as broker:
        with trio.fail_after(TIMEOUT):
            async with login_over(transport, broker, "a1"), login_over(transport, broker, "a2"):
                if transport == "tcp":
                    error = await refused(await connect(broker), ErrorCode.CONNECTION_RATE_LIMITED)
                else:
                    async with open_ws(broker.ws_port) as ws:
                        error = await refused(ws, ErrorCode.CONNECTION_RATE_LIMITED)
                assert error.retry_after_ms is not None and error.retry_after_ms > 900_000  # a token per 1,000 s
                await (await login(broker, "b1", source=OTHER)).aclose()
            assert (await stats(broker))["rate_limited_connections_total"] == 1
            while broker.limiter.open:  # every connection let in is let go again
                await trio.sleep(0.01)


# ------------------------------------------------------------------ handshakes


async def test_a_hello_past_its_address_rate_gets_4006_before_its_token_is_judged(
    broker_factory: Callable[..., Any],
) -> None:
    async with broker_factory(**limited(address_hellos_burst=1, address_hellos_per_s=SLOW)) as broker:
        with trio.fail_after(TIMEOUT):
            alice = await login(broker, "alice")
            junk = await connect(broker)
            await junk.send(Hello(version=1, token="not.a.jwt"))
            error = await refused(junk, ErrorCode.CONNECTION_RATE_LIMITED)  # not 2001: the rate comes first
            assert error.retry_after_ms is not None and error.retry_after_ms > 0
            await junk.expect_closed()
            await (await login(broker, "bob", source=OTHER)).aclose()
            assert (await stats(broker))["rate_limited_hellos_total"] == 1
            await alice.aclose()


async def test_a_hello_past_its_mailbox_rate_gets_4006_whatever_the_address(broker_factory: Callable[..., Any]) -> None:
    async with broker_factory(**limited(mailbox_hellos_burst=1, mailbox_hellos_per_s=SLOW)) as broker:
        with trio.fail_after(TIMEOUT):
            alice = await login(broker, "alice")
            again = await connect(broker, source=OTHER)
            await again.send(Hello(version=1, token=broker.auth.issue("alice")))
            await refused(again, ErrorCode.CONNECTION_RATE_LIMITED)
            await again.expect_closed()
            bob = await login(broker, "bob")  # another mailbox from the same address
            await bob.expect(Drained)
            await alice.send(Send(id="m1", to=("bob",), body=b"still here"))  # no takeover happened
            assert (await bob.expect(Deliver)).body == b"still here"
            await alice.aclose()
            await bob.aclose()


# ------------------------------------------------------------------ SENDs


@pytest.mark.parametrize("transport", ["tcp", "websocket"])
async def test_sends_past_the_mailbox_rate_get_3010_with_a_retry_hint_and_nothing_stored(
    broker_factory: Callable[..., Any], transport: str
) -> None:
    async with broker_factory(**limited(mailbox_sends_burst=3, mailbox_sends_per_s=SLOW)) as broker:
        with trio.fail_after(TIMEOUT):
            async with login_over(transport, broker, "alice") as alice:
                await alice.expect(Drained)
                await alice.send(*(Send(id=f"m{i}", to=("bob",), body=b"x") for i in range(5)))
                receipts = [await alice.expect(Receipt) for _ in range(5)]
            assert [r.id for r in receipts] == [f"m{i}" for i in range(5)]  # in order, one each
            assert all(r.results["bob"].status is Status.QUEUED for r in receipts[:3])
            for r in receipts[3:]:
                assert (r.code, r.results) == (ErrorCode.RATE_LIMITED, {})
                assert r.retry_after_ms is not None and r.retry_after_ms > 900_000
            assert [m.id for m in await broker.pending_messages("bob", 10)] == ["m0", "m1", "m2"]
            figures = await stats(broker)
            assert (figures["refused_rate_limited"], figures["rate_limited_sends_total"]) == (2, 2)
            assert figures["refused_total"] == 2


async def test_send_bytes_past_the_rate_get_3010(broker_factory: Callable[..., Any]) -> None:
    settings = limited(
        max_frame_bytes=1024, max_recipients=3, mailbox_send_bytes_burst=1024, mailbox_send_bytes_per_s=1
    )
    async with broker_factory(**settings) as broker:
        with trio.fail_after(TIMEOUT):
            alice = await login(broker, "alice")
            await alice.expect(Drained)
            await alice.send(
                Send(id="big", to=("bob",), body=b"x" * 700), Send(id="more", to=("bob",), body=b"y" * 700)
            )
            assert (await alice.expect(Receipt)).results["bob"].status is Status.QUEUED
            second = await alice.expect(Receipt)
            assert second.code == ErrorCode.RATE_LIMITED and second.retry_after_ms is not None
            assert 370_000 < second.retry_after_ms <= 377_000  # 376 bytes short at 1 byte a second
            await alice.send(Send(id="small", to=("bob",), body=b"z" * 300))  # what is left still passes
            assert (await alice.expect(Receipt)).results["bob"].status is Status.QUEUED
            assert (await stats(broker))["rate_limited_send_bytes_total"] == 1
            await alice.aclose()


async def test_a_client_on_another_address_and_mailbox_is_unaffected(broker_factory: Callable[..., Any]) -> None:
    async with broker_factory(**limited(address_sends_burst=2, address_sends_per_s=SLOW)) as broker:
        with trio.fail_after(TIMEOUT):
            alice = await login(broker, "alice")
            carol = await login(broker, "carol", source=OTHER)
            bob = await login(broker, "bob", source=OTHER)
            for client in (alice, carol, bob):
                await client.expect(Drained)
            await alice.send(*(Send(id=f"a{i}", to=("bob",), body=b"a") for i in range(4)))
            codes = [(await alice.expect(Receipt)).code for _ in range(4)]
            assert codes == [None, None, ErrorCode.RATE_LIMITED, ErrorCode.RATE_LIMITED]
            await carol.send(Send(id="c1", to=("bob",), body=b"c"), Send(id="c2", to=("bob",), body=b"c"))
            assert [(await carol.expect(Receipt)).code for _ in range(2)] == [None, None]
            got = {(await bob.expect(Deliver)).id for _ in range(4)}
            assert got == {"a0", "a1", "c1", "c2"}
            for client in (alice, carol, bob):
                await client.aclose()


async def test_the_loopback_exemption_lifts_every_limit(broker_factory: Callable[..., Any]) -> None:
    tiny = {
        "max_connections_per_address": 1,
        "address_connections_burst": 1,
        "address_hellos_burst": 1,
        "mailbox_hellos_burst": 1,
        "mailbox_sends_burst": 1,
        "address_sends_burst": 1,
    }
    tiny |= {name.replace("_burst", "_per_s"): SLOW for name in tiny if name.endswith("_burst")}
    async with broker_factory(**tiny) as broker:  # rate_exempt_networks: its default, loopback
        with trio.fail_after(TIMEOUT):
            alice = await login(broker, "alice")
            again = await login(broker, "alice-2")
            await alice.expect(Drained)
            await alice.send(*(Send(id=f"m{i}", to=("bob",), body=b"x") for i in range(5)))
            assert [(await alice.expect(Receipt)).code for _ in range(5)] == [None] * 5
            assert all(v == 0 for k, v in (await stats(broker)).items() if k.startswith("rate_limited_"))
            await alice.aclose()
            await again.aclose()


async def test_a_flood_gets_3010s_and_loses_nothing_it_was_told_was_accepted(
    broker_factory: Callable[..., Any],
) -> None:
    """A sender SENDs far past its rate: every SEND gets its receipt in order; every accepted one is delivered
    once and no refused one at all; resending the refused ones (same ids, after the hint) gets them all through;
    another client on another address keeps working throughout."""
    total = 400
    settings = limited(mailbox_sends_burst=50, mailbox_sends_per_s=2000.0, address_sends_burst=100_000)
    async with broker_factory(**settings) as broker:
        with trio.fail_after(TIMEOUT * 3):
            alice = await login(broker, "alice")
            bob = await login(broker, "bob", source=OTHER)
            carol = await login(broker, "carol", source=OTHER)
            for client in (alice, bob, carol):
                await client.expect(Drained)
            delivered: list[str] = []
            waiting = [f"m{i}" for i in range(total)]
            rounds = 0
            while waiting:
                rounds += 1
                await alice.send(*(Send(id=i, to=("bob",), body=i.encode()) for i in waiting))
                receipts = [await alice.expect(Receipt) for _ in waiting]
                assert [r.id for r in receipts] == waiting
                accepted = [r.id for r in receipts if r.code is None]
                refused_now = [r for r in receipts if r.code is not None]
                assert all(r.code == ErrorCode.RATE_LIMITED and r.retry_after_ms for r in refused_now)
                for _ in accepted:
                    message = await bob.expect(Deliver)
                    assert message.body == message.id.encode()
                    delivered.append(message.id)
                assert sorted(delivered[-len(accepted) :]) == sorted(accepted)
                # the other client, mid-flood: its own SEND goes through at once
                await carol.send(Send(id=f"c{rounds}", to=("alice",), body=b"hi"))
                assert (await carol.expect(Receipt)).results["alice"].status is Status.DELIVERED
                assert (await alice.expect(Deliver)).id == f"c{rounds}"
                waiting = [r.id for r in refused_now]
                if waiting:
                    await trio.sleep(max(r.retry_after_ms or 0 for r in refused_now) / 1000)
            assert rounds > 1  # the flood was refused in part
            assert sorted(delivered) == sorted(f"m{i}" for i in range(total))  # each exactly once
            assert (await stats(broker))["rate_limited_sends_total"] > 0
            for client in (alice, bob, carol):
                await client.aclose()


# ------------------------------------------------------------------ HTTP


async def test_http_requests_past_the_address_rate_get_429_with_retry_after(
    broker_factory: Callable[..., Any],
) -> None:
    async with broker_factory(**limited(address_connections_burst=2, address_connections_per_s=SLOW)) as broker:
        token = broker.auth.issue("alice")
        headers = {"Authorization": f"Bearer {token}"}
        with trio.fail_after(TIMEOUT):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{broker.http_port}", timeout=TIMEOUT) as http:
                for _ in range(2):
                    assert (await http.get("/relay/pending", headers=headers)).status_code == 200
                r = await http.get("/relay/pending", headers=headers)
                assert r.status_code == 429
                body = r.json()
                assert body["code"] == ErrorCode.CONNECTION_RATE_LIMITED and body["retry_after_ms"] > 900_000
                assert int(r.headers["retry-after"]) == -(-body["retry_after_ms"] // 1000)
                no_token = await http.get("/relay/pending")  # judged before the token: 429, not 401
                assert no_token.status_code == 429
                assert (await http.get("/metrics")).status_code == 200  # not an API request with a token
            assert (await stats(broker))["rate_limited_connections_total"] == 2


async def test_an_http_send_past_the_rate_gets_429_with_the_receipt_code(broker_factory: Callable[..., Any]) -> None:
    async with broker_factory(**limited(mailbox_sends_burst=1, mailbox_sends_per_s=SLOW)) as broker:
        headers = {"Authorization": f"Bearer {broker.auth.issue('alice')}"}
        with trio.fail_after(TIMEOUT):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{broker.http_port}", timeout=TIMEOUT) as http:
                first = await http.post("/relay/send", json={"id": "h1", "to": ["bob"], "body": ""}, headers=headers)
                assert (first.status_code, first.json()["results"]) == (200, {"bob": {"status": "queued"}})
                second = await http.post("/relay/send", json={"id": "h2", "to": ["bob"], "body": ""}, headers=headers)
                assert second.status_code == 429
                body = second.json()
                assert (body["id"], body["code"]) == ("h2", ErrorCode.RATE_LIMITED)
                assert body["retry_after_ms"] > 900_000 and "results" not in body
                assert int(second.headers["retry-after"]) == -(-body["retry_after_ms"] // 1000)
            # the same mailbox's bucket over TCP: HTTP and the frame transports share it
            alice = await login(broker, "alice")
            await alice.expect(Drained)
            await alice.send(Send(id="t1", to=("bob",), body=b""))
            assert (await alice.expect(Receipt)).code == ErrorCode.RATE_LIMITED
            await alice.aclose()
            assert [m.id for m in await broker.pending_messages("bob", 10)] == ["h1"]


async def test_the_metric_counts_refusals_by_reason(broker_factory: Callable[..., Any]) -> None:
    async with broker_factory(**limited(mailbox_sends_burst=1, mailbox_sends_per_s=SLOW)) as broker:
        with trio.fail_after(TIMEOUT):
            alice = await login(broker, "alice")
            await alice.expect(Drained)
            await alice.send(*(Send(id=f"m{i}", to=("bob",), body=b"") for i in range(3)))
            for _ in range(3):
                await alice.expect(Receipt)
            await alice.aclose()
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{broker.http_port}", timeout=TIMEOUT) as http:
                text = (await http.get("/metrics")).text
        assert 'relay_rate_limited_total{reason="sends"} 2.0' in text
        assert 'relay_messages_refused_total{reason="rate_limited"} 2.0' in text
        for reason in Reason:
            assert f'relay_rate_limited_total{{reason="{reason}"}}' in text


async def test_a_rate_limited_hello_is_not_welcomed(broker_factory: Callable[..., Any]) -> None:
    """The refused HELLO gets its ERROR in AUTHENTICATING, never a WELCOME, and the session is not counted."""
    async with broker_factory(**limited(address_hellos_burst=1, address_hellos_per_s=SLOW)) as broker:
        with trio.fail_after(TIMEOUT):
            first = await login(broker, "alice")
            second = await connect(broker)
            await second.send(Hello(version=1, token=broker.auth.issue("bob")))
            frame = await second.next()
            assert not isinstance(frame, Welcome) and isinstance(frame, Error)
            await second.expect_closed()
            assert (await stats(broker))["online_users"] == 1
            await first.aclose()


# ------------------------------------------------------------------ TLS


async def test_the_per_address_cap_counts_tls_connections_by_their_peer(tmp_path: Path) -> None:
    """Over tls:// the address is the TLS stream's socket peer, as on tcp://: the cap covers both."""
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    async with tls_broker(tmp_path, leaf, **limited(max_connections_per_address=1)) as broker:
        assert broker.tls_port is not None
        with trio.fail_after(TIMEOUT):
            plain = await login(broker, "alice")
            stream = await trio.open_ssl_over_tcp_stream(
                "127.0.0.1", broker.tls_port, ssl_context=trusting(ca), https_compatible=False
            )
            over_tls = RawClient(stream)
            await refused(over_tls, ErrorCode.TOO_MANY_CONNECTIONS_FROM_ADDRESS)
            await plain.aclose()
            while broker.limiter.open:
                await trio.sleep(0.01)
            stream = await trio.open_ssl_over_tcp_stream(
                "127.0.0.1", broker.tls_port, ssl_context=trusting(ca), https_compatible=False
            )
            secure = RawClient(stream)
            await secure.hello(broker.auth.issue("alice"))
            assert broker.limiter.open == {"127.0.0.1": 1}
            await secure.aclose()
