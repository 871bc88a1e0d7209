"""TLS listeners (tls://, wss://, https://) with certificates made at test time (trustme): clients send and
receive over each; a wrong host name, an untrusted CA, an expired certificate, a plain client on a TLS port and a
stalled handshake each fail clearly and leave the broker serving; the certificate reloads in place."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trustme

from broker.config import BrokerConfig, ConfigError
from broker.server import Broker
from client import ConnectionLost, ProtocolViolation, TLSError, TLSReason, open_client

from .certs import tls_broker, trusting, write_leaf

TIMEOUT_S = 20


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    return tmp_path / "ca.pem"


async def exchange(broker: Broker, sender_url: str, receiver_url: str, **options: Any) -> None:
    """alice sends bob a message over ``sender_url``; bob, on ``receiver_url``, gets it and ACKs it."""
    async with (
        open_client(receiver_url, broker.auth.issue("bob"), **options) as bob,
        open_client(sender_url, broker.auth.issue("alice"), **options) as alice,
    ):
        receipt = await alice.send("bob", b"over tls")
        assert receipt.results["bob"].status.value in ("delivered", "queued")
        async for delivery in bob.deliveries():
            assert (delivery.sender, delivery.body) == ("alice", b"over tls")
            bob.ack(delivery.id)
            break


async def test_clients_send_and_receive_over_tls_and_wss_and_with_plain_ones(
    tmp_path: Path, ca: trustme.CA, ca_file: Path
) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with tls_broker(tmp_path, ca.issue_cert("127.0.0.1", "localhost")) as broker:
            tls, wss = f"tls://127.0.0.1:{broker.tls_port}", f"wss://localhost:{broker.wss_port}/relay"
            await exchange(broker, tls, wss, ca_file=ca_file)
            await exchange(broker, wss, tls, ssl_context=trusting(ca))
            await exchange(broker, f"tcp://127.0.0.1:{broker.tcp_port}", tls, ca_file=ca_file)


async def test_https_serves_the_api_and_a_demo_page_pointing_at_wss(
    tmp_path: Path, ca: trustme.CA, ca_file: Path
) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with tls_broker(tmp_path, ca.issue_cert("127.0.0.1", "localhost")) as broker:
            base = f"https://localhost:{broker.https_port}"
            async with httpx.AsyncClient(base_url=base, verify=trusting(ca)) as http:
                alice = {"Authorization": f"Bearer {broker.auth.issue('alice')}"}
                bob = {"Authorization": f"Bearer {broker.auth.issue('bob')}"}
                sent = await http.post("/relay/send", headers=alice, json={"id": "m1", "to": ["bob"], "body": "aGk="})
                assert sent.status_code == 200 and sent.json()["results"]["bob"]["status"] == "queued"
                pending = await http.get("/relay/pending", headers=bob)
                assert [(m["id"], m["from"], m["body"]) for m in pending.json()["messages"]] == [
                    ("m1", "alice", "aGk=")
                ]
                acked = await http.post("/relay/acknowledge", headers=bob, json={"ids": ["m1"]})
                assert acked.json() == {"acknowledged": 1}
                assert (await http.get("/relay/pending", headers=bob)).json()["messages"] == []
                page = await http.get("/")
                assert f'content="{broker.wss_port}"' in page.text
            plain = f"http://127.0.0.1:{broker.https_port}/openapi.json"
            async with httpx.AsyncClient() as http:  # plain HTTP on the HTTPS port: refused, the broker serves on
                with pytest.raises(httpx.HTTPError):
                    await http.get(plain)
            await exchange(
                broker, f"tls://127.0.0.1:{broker.tls_port}", f"tcp://127.0.0.1:{broker.tcp_port}", ca_file=ca_file
            )


async def test_a_wrong_host_name_an_untrusted_ca_and_a_plain_port_fail_clearly_and_the_broker_serves_on(
    tmp_path: Path, ca: trustme.CA, ca_file: Path
) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with tls_broker(tmp_path, ca.issue_cert("relay.example")) as broker:
            token = broker.auth.issue("eve")
            cases = [
                (f"tls://127.0.0.1:{broker.tls_port}", {"ca_file": ca_file}, TLSReason.HOSTNAME_MISMATCH),
                (f"wss://127.0.0.1:{broker.wss_port}/relay", {"ca_file": ca_file}, TLSReason.HOSTNAME_MISMATCH),
                (f"tls://127.0.0.1:{broker.tls_port}", {"ssl_context": trusting(trustme.CA())}, TLSReason.UNTRUSTED),
                (f"wss://127.0.0.1:{broker.wss_port}/relay", {}, TLSReason.UNTRUSTED),  # the system's store
                (f"tls://127.0.0.1:{broker.tcp_port}", {"ca_file": ca_file}, TLSReason.NOT_TLS),
                (f"wss://127.0.0.1:{broker.ws_port}/relay", {"ca_file": ca_file}, TLSReason.NOT_TLS),
            ]
            for url, options, reason in cases:
                with pytest.raises(TLSError) as caught:
                    async with open_client(url, token, reconnect=False, **options):
                        pass
                assert caught.value.reason is reason, (url, caught.value)
                assert url.split("/relay")[0] in str(caught.value)
            # a healthy client alongside (the certificate names relay.example: trust it for that name)
            await exchange(broker, f"tcp://127.0.0.1:{broker.tcp_port}", f"ws://127.0.0.1:{broker.ws_port}/relay")


async def test_an_expired_certificate_fails_clearly(tmp_path: Path, ca: trustme.CA, ca_file: Path) -> None:
    expired = ca.issue_cert("127.0.0.1", not_after=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1))
    with trio.fail_after(TIMEOUT_S):
        async with tls_broker(tmp_path, expired) as broker:
            for url in (f"tls://127.0.0.1:{broker.tls_port}", f"wss://127.0.0.1:{broker.wss_port}/relay"):
                with pytest.raises(TLSError, match="expired") as caught:
                    async with open_client(url, broker.auth.issue("a"), reconnect=False, ca_file=ca_file):
                        pass
                assert caught.value.reason is TLSReason.EXPIRED
            await exchange(broker, f"tcp://127.0.0.1:{broker.tcp_port}", f"tcp://127.0.0.1:{broker.tcp_port}")


async def test_a_plain_client_on_a_tls_port_is_told_to_use_tls(tmp_path: Path, ca: trustme.CA, ca_file: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with tls_broker(tmp_path, ca.issue_cert("127.0.0.1")) as broker:
            token = broker.auth.issue("eve")
            with pytest.raises(ProtocolViolation, match="tls://"):
                async with open_client(f"tcp://127.0.0.1:{broker.tls_port}", token, reconnect=False):
                    pass
            with pytest.raises(ConnectionLost, match=r"HTTP 400.*wss://"):
                async with open_client(f"ws://127.0.0.1:{broker.wss_port}/relay", token, reconnect=False):
                    pass
            tls = f"tls://127.0.0.1:{broker.tls_port}"
            await exchange(broker, tls, tls, ca_file=ca_file)


async def test_a_stalled_or_broken_handshake_ends_that_connection_only(
    tmp_path: Path, ca: trustme.CA, ca_file: Path
) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with tls_broker(tmp_path, ca.issue_cert("127.0.0.1"), handshake_timeout_s=0.5) as broker:
            assert broker.tls_port is not None and broker.wss_port is not None
            stalled = [await trio.open_tcp_stream("127.0.0.1", p) for p in (broker.tls_port, broker.wss_port)]
            for stream in stalled:
                await stream.send_all(b"\x16\x03\x01")  # a ClientHello's first bytes, then nothing
            garbage = await trio.open_tcp_stream("127.0.0.1", broker.tls_port)
            await garbage.send_all(b"\x16\x03\x01\x00\x05hello")  # a broken handshake record
            tls = f"tls://127.0.0.1:{broker.tls_port}"
            await exchange(broker, tls, f"wss://127.0.0.1:{broker.wss_port}/relay", ca_file=ca_file)
            for stream in (*stalled, garbage):
                while await stream.receive_some(4096):  # the broker closes each (the timeout, or the bad record)
                    pass
                await stream.aclose()
            await exchange(broker, tls, tls, ca_file=ca_file)


async def test_the_certificate_reloads_for_new_connections_and_open_ones_stay(
    tmp_path: Path, ca: trustme.CA, ca_file: Path
) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with tls_broker(tmp_path, ca.issue_cert("127.0.0.1")) as broker:
            tls = f"tls://127.0.0.1:{broker.tls_port}"
            async with open_client(tls, broker.auth.issue("bob"), ca_file=ca_file) as bob:
                other = trustme.CA()
                write_leaf(other.issue_cert("127.0.0.1"), tmp_path / "certs")
                broker.reload_tls()
                with pytest.raises(TLSError):  # new handshakes present the new certificate
                    async with open_client(tls, broker.auth.issue("x"), reconnect=False, ca_file=ca_file):
                        pass
                async with open_client(tls, broker.auth.issue("alice"), ssl_context=trusting(other)) as alice:
                    await alice.send("bob", b"after the reload")
                async for delivery in bob.deliveries():  # bob's session, opened before, is still up
                    assert delivery.body == b"after the reload"
                    bob.ack(delivery.id)
                    break
                (tmp_path / "certs" / "key.pem").write_text("not a key")
                with pytest.raises(ConfigError, match="cannot load the TLS certificate"):
                    broker.reload_tls()  # the certificate in use stays
                async with open_client(tls, broker.auth.issue("carol"), ssl_context=trusting(other)):
                    pass
                assert bob.connects == 1


def test_tls_listeners_need_a_certificate_and_key_and_plain_ones_can_be_turned_off(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="set tls_cert_file and tls_key_file"):
        BrokerConfig(listeners=("tcp", "tls"))
    with pytest.raises(ConfigError, match="set both or neither"):
        BrokerConfig(tls_cert_file=tmp_path / "cert.pem")
    with pytest.raises(ConfigError, match="not a listener"):
        BrokerConfig(listeners=("tcp", "quic"))
    with pytest.raises(ConfigError, match="cannot load the TLS certificate"):
        Broker(BrokerConfig(listeners=("tls",), tls_cert_file=tmp_path / "no.pem", tls_key_file=tmp_path / "no.pem"))


async def test_only_the_listed_listeners_are_served(tmp_path: Path, ca: trustme.CA, ca_file: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with tls_broker(tmp_path, ca.issue_cert("127.0.0.1"), listeners=("tls", "https")) as broker:
            assert (broker.tcp_port, broker.ws_port, broker.http_port, broker.wss_port) == (None, None, None, None)
            assert broker.https_port is not None
            tls = f"tls://127.0.0.1:{broker.tls_port}"
            await exchange(broker, tls, tls, ca_file=ca_file)


async def test_the_relay_cli_sends_over_tls_with_a_ca_file(tmp_path: Path, ca: trustme.CA, ca_file: Path) -> None:
    from client.cli import main as relay

    with trio.fail_after(TIMEOUT_S):
        async with tls_broker(tmp_path, ca.issue_cert("127.0.0.1")) as broker:
            wss = f"wss://127.0.0.1:{broker.wss_port}/relay"
            async with open_client(wss, broker.auth.issue("bob"), ca_file=ca_file) as bob:  # bob's key is published
                argv = ["--url", f"tls://127.0.0.1:{broker.tls_port}", "--ca-file", str(ca_file)]
                argv += ["--token", broker.auth.issue("alice"), "--store", str(tmp_path / "alice.sqlite3")]
                assert await trio.to_thread.run_sync(relay, [*argv, "send", "--to", "bob", "hello over tls"]) == 0
                async for delivery in bob.deliveries():
                    assert (delivery.sender, delivery.body, delivery.security) == ("alice", b"hello over tls", "e2e")
                    bob.ack(delivery.id)
                    break


async def test_a_goodbye_over_tls_ends_at_once_the_close_notify_is_the_eof(
    tmp_path: Path, ca: trustme.CA, ca_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After BYE the client waits for the broker to close; over TCP the broker's EOF tells it, over TLS its
    close_notify must (a broker waiting for the client to close first would wait out its whole linger)."""
    monkeypatch.setattr("wire.transport.LINGER_S", 3600.0)  # a linger that ran out would fail this test
    with trio.fail_after(TIMEOUT_S):
        async with tls_broker(tmp_path, ca.issue_cert("127.0.0.1")) as broker:
            for url in (f"tls://127.0.0.1:{broker.tls_port}", f"wss://127.0.0.1:{broker.wss_port}/relay"):
                for _ in range(3):  # each exchange ends with both clients' BYE and close
                    await exchange(broker, url, url, ca_file=ca_file)
