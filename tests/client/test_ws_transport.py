"""The client over WebSocket (protocol.md 2.5): against a real broker on 127.0.0.1, mixed with TCP
clients, across reconnects; and the transport alone against a bare trio-websocket server, for
the message-boundary checks, control frames and closes the broker never exercises."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from relay_testing import BrokerRunner, FaultyNetwork, url_of
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket, wrap_server_stream

import client.transport as transport_module
from broker.config import BrokerConfig
from broker.server import Broker
from client import ConnectionLost, Delivery, LocalStore, OutgoingMessage, ProtocolViolation, Status, open_client
from client.transport import (
    OPENERS,
    Endpoint,
    Transport,
    TransportClosed,
    open_transport,
    parse_url,
)
from wire import Deliver, ErrorCode, RemoteProtocolError, Send

TIMEOUT_S = 20
FAST = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05}


def ws_of(broker: Broker) -> str:
    assert broker.ws_port is not None
    return f"ws://127.0.0.1:{broker.ws_port}/relay"


def frame(payload: bytes) -> bytes:
    """Bytes with a correct length prefix (the transport never decodes the body)."""
    return len(payload).to_bytes(4, "big") + payload


async def collect(client: Any, n: int) -> list[Delivery]:
    got: list[Delivery] = []
    async for batch in client.delivery_batches():
        got += batch
        client.ack(d.id for d in batch)
        if len(got) >= n:
            break
    return got


# ---------------------------------------------------------------- URLs


def test_ws_urls_default_to_the_relay_path_and_port_7781() -> None:
    assert "ws" in OPENERS
    assert parse_url("ws://127.0.0.1") == Endpoint("ws", "127.0.0.1", 7781, "/relay")
    assert parse_url("ws://example.org:9000/other") == Endpoint("ws", "example.org", 9000, "/other")
    assert str(parse_url("ws://[::1]:7781/relay")) == "ws://[::1]:7781/relay"


# ---------------------------------------------------------------- against the broker


async def test_ws_and_tcp_clients_exchange_messages_both_ways(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with (
            open_client(ws_of(broker), broker.auth.issue("alice")) as alice,
            open_client(url_of(broker), broker.auth.issue("bob")) as bob,
        ):
            assert alice.mailbox == "alice" and alice.endpoint.scheme == "ws"
            receipt = await alice.send("bob", b"over ws", id="w1")
            assert receipt.results["bob"].status is Status.DELIVERED
            [d] = await collect(bob, 1)
            assert (d.id, d.sender, d.body) == ("w1", "alice", b"over ws")

            receipt = await bob.send("alice", b"over tcp", id="t1")
            assert receipt.results["alice"].status is Status.DELIVERED
            [d] = await collect(alice, 1)
            assert (d.id, d.sender, d.body) == ("t1", "bob", b"over tcp")
    stats = await broker.statistics()
    assert stats["messages_total"] == 0 and stats["acknowledged_total"] == 2


async def test_a_batch_of_2000_over_ws_is_received_and_acked_over_ws(broker: Broker) -> None:
    items = [OutgoingMessage("bob", b"body %d" % i, id=f"b{i}") for i in range(2000)]
    with trio.fail_after(TIMEOUT_S):
        async with (
            open_client(ws_of(broker), broker.auth.issue("alice")) as alice,
            open_client(ws_of(broker), broker.auth.issue("bob")) as bob,
        ):
            receipts = await alice.send_batch(items)
            assert [r.id for r in receipts] == [m.id for m in items]
            assert {r.results["bob"].status for r in receipts} <= {Status.DELIVERED, Status.QUEUED}
            got = await collect(bob, 2000)
            assert [(d.id, d.body) for d in got] == [(m.id, m.body) for m in items]
        # bob's close wrote the last ACKs before BYE: nothing is left for him.
        async with open_client(ws_of(broker), broker.auth.issue("bob")) as bob:
            assert await bob.wait_drained() == 0
    stats = await broker.statistics()
    assert stats["messages_total"] == 0 and stats["acknowledged_total"] == 2000


async def test_a_frame_near_the_limit_passes_both_ways_over_ws(broker: Broker) -> None:
    assert broker.config.max_frame_bytes == 1024 * 1024
    body = bytes(range(256)) * (1000 * 1024 // 256)  # a DELIVER frame of ~1000 KiB: several socket reads
    with trio.fail_after(TIMEOUT_S):
        async with (
            open_client(ws_of(broker), broker.auth.issue("alice")) as alice,
            open_client(ws_of(broker), broker.auth.issue("bob")) as bob,
        ):
            await alice.send("bob", body, id="big")
            [d] = await collect(bob, 1)
            assert d.body == body


class WsBrokerRunner(BrokerRunner):
    """BrokerRunner, with the WebSocket port chosen (the restarted broker must keep it)."""

    async def start_ws(self, ws_port: int = 0) -> Broker:
        broker = Broker(BrokerConfig(tcp_port=0, ws_port=ws_port, http_port=0, data_dir=self.data_dir))
        self._scope, self._stopped = trio.CancelScope(), trio.Event()
        await self.nursery.start(self._serve, broker, self._scope, self._stopped)
        return broker


async def test_ws_client_reconnects_after_a_broker_restart_on_the_same_port(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            runner = WsBrokerRunner(nursery, tmp_path / "broker-data")
            first = await runner.start_ws()
            assert first.ws_port is not None
            async with open_client(ws_of(first), first.auth.issue("alice"), e2e=False, **FAST) as alice:
                assert (await alice.send("bob", b"before")).results["bob"].status is Status.QUEUED
                await runner.stop()  # the broker sends SHUTTING_DOWN and closes the WebSocket
                second = await runner.start_ws(first.ws_port)
                receipt = await alice.send("bob", b"after")  # goes out once alice is back
                assert receipt.results["bob"].status is Status.QUEUED
                assert alice.connects == 2
                async with open_client(ws_of(second), second.auth.issue("bob")) as bob:
                    got = [d.body async for d in bob.deliveries(until_drained=True)]
                assert got == [b"after"]  # the memory store does not survive a restart
            await runner.stop()


class FaultyWsNetwork(FaultyNetwork):
    """FaultyNetwork over WebSocket: its frame taps see the same bytes as on TCP."""

    @asynccontextmanager
    async def __call__(self, endpoint: Endpoint) -> AsyncIterator[Transport]:
        assert endpoint.scheme == "ws"
        async with super().__call__(endpoint) as transport:
            yield transport


async def test_ws_reconnects_recover_2000_messages_with_one_copy_each(broker_factory: Any, tmp_path: Path) -> None:
    # A window smaller than the backlog, so the cuts below land while messages are still queued.
    async with broker_factory(max_inflight=256) as broker:
        network = FaultyWsNetwork()
        ids = [f"m{i}" for i in range(2000)]
        seen: list[Delivery] = []
        with LocalStore(tmp_path / "bob.sqlite3") as store, trio.fail_after(TIMEOUT_S):
            async with open_client(ws_of(broker), broker.auth.issue("alice"), e2e=False) as alice:
                await alice.send_batch([OutgoingMessage("bob", b"x", id=i) for i in ids])
            async with open_client(
                ws_of(broker), broker.auth.issue("bob"), local_store=store, transport_factory=network, **FAST
            ) as bob:
                async for d in bob.deliveries():
                    seen.append(d)
                    if len(seen) in (300, 1200):
                        while len(network.transports) < bob.connects:
                            await trio.sleep(0.001)
                        await network.cut()
                    if len(seen) == 2000:
                        break
                assert bob.connects >= 2
            assert sorted(d.id for d in seen) == sorted(ids)
            assert sorted(m.id for m in store.messages("bob")) == sorted(ids)
        assert network.received_of(Deliver) and not [f for f in network.sent if type(f) is Send]
        assert (await broker.statistics())["messages_total"] == 0


async def test_a_wrong_path_is_a_clear_error(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT_S), pytest.raises(ConnectionLost) as info:
        async with open_client(f"ws://127.0.0.1:{broker.ws_port}/wrong", broker.auth.issue("alice")):
            pass  # pragma: no cover
    message = str(info.value)
    assert f"ws://127.0.0.1:{broker.ws_port}/wrong" in message
    assert "HTTP 404" in message and "/relay" in message


async def test_a_ws_url_on_the_tcp_port_is_a_clear_error(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT_S), pytest.raises(ConnectionLost, match="not a WebSocket server"):
        async with open_client(f"ws://127.0.0.1:{broker.tcp_port}/relay", broker.auth.issue("alice")):
            pass  # pragma: no cover


async def test_nothing_listening_is_a_clear_error() -> None:
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        with (
            trio.fail_after(TIMEOUT_S),
            pytest.raises(ConnectionLost, match=f"cannot connect to ws://127.0.0.1:{port}"),
        ):
            async with open_client(f"ws://127.0.0.1:{port}/relay", "token"):
                pass  # pragma: no cover


# ---------------------------------------------------------------- the transport alone

Handler = Callable[[WebSocketConnection], Awaitable[None]]


@asynccontextmanager
async def ws_server(handler: Handler) -> AsyncIterator[Endpoint]:
    """A bare trio-websocket server on a free port running ``handler`` per connection."""

    async def handle(request: WebSocketRequest) -> None:
        ws = await request.accept()
        await handler(ws)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handle, "127.0.0.1", 0, None)
        yield Endpoint("ws", "127.0.0.1", server.port, "/relay")
        nursery.cancel_scope.cancel()


async def read_until_end(transport: Transport) -> bytes:
    data = b""
    while chunk := await transport.receive_some():
        data += chunk
    return data


async def test_messages_arrive_as_the_tcp_byte_stream_and_a_normal_close_ends_it() -> None:
    frames = [frame(b"one"), frame(b""), frame(b"x" * 200_000), frame(b"a") + frame(b"b")]

    async def handler(ws: WebSocketConnection) -> None:
        for f in frames:
            await ws.send_message(f)
        await ws.aclose()

    with trio.fail_after(TIMEOUT_S):
        async with ws_server(handler) as endpoint, open_transport(endpoint) as transport:
            assert await read_until_end(transport) == b"".join(frames)
            assert await transport.receive_some() == b""


async def test_send_all_packs_whole_frames_into_messages_up_to_the_peer_limit() -> None:
    got: list[bytes | str] = []
    done = trio.Event()

    async def handler(ws: WebSocketConnection) -> None:
        try:
            while True:
                got.append(await ws.get_message())
        except ConnectionClosed as exc:
            assert exc.reason is not None
            got.append(f"closed {exc.reason.code}")
            done.set()

    small = [frame(b"s" * 500) for _ in range(4)]  # 504 bytes each
    big = frame(b"bb" * 100_000)
    with trio.fail_after(TIMEOUT_S):
        async with ws_server(handler) as endpoint:
            async with open_transport(endpoint) as transport:
                await transport.send_all(b"".join(small))  # before WELCOME: at most 1,028 bytes a message
                transport.set_peer_limit(1024 * 1024)
                await transport.send_all(b"".join([*small, big]))
                with pytest.raises(ValueError, match="whole frames"):
                    await transport.send_all(small[0] + small[1][:10])
                with pytest.raises(ValueError, match="whole frames"):
                    await transport.send_all(b"\x00\x00")
            await done.wait()  # leaving the block closed it with code 1000
            with pytest.raises(TransportClosed):
                await transport.send_all(small[0])
    assert got == [small[0] + small[1], small[2] + small[3], b"".join([*small, big]), "closed 1000"]


@pytest.mark.parametrize(
    ("messages", "good"),
    [
        ([frame(b"ok"), "text"], frame(b"ok")),
        ([frame(b"ok"), frame(b"a") + frame(b"b")[:-1]], frame(b"ok")),  # ends mid-frame
        ([frame(b"abc")[:-1]], b""),  # shorter than its prefix
        ([b"\x00\x00"], b""),  # fewer than 4 bytes
        ([b""], b""),
    ],
)
async def test_a_message_that_is_not_whole_frames_is_malformed(messages: list[bytes | str], good: bytes) -> None:
    async def handler(ws: WebSocketConnection) -> None:
        for m in messages:
            await ws.send_message(m)
        await trio.sleep_forever()

    with trio.fail_after(TIMEOUT_S):
        async with ws_server(handler) as endpoint, open_transport(endpoint) as transport:
            data = b""
            with pytest.raises(RemoteProtocolError) as info:
                while True:
                    data += await transport.receive_some()
            assert info.value.code == ErrorCode.MALFORMED_FRAME
            assert data == good  # the messages before the bad one are passed on first


async def test_a_malformed_message_from_the_broker_stops_the_client() -> None:
    async def handler(ws: WebSocketConnection) -> None:
        await ws.get_message()  # HELLO
        await ws.send_message("a text message")
        await trio.sleep_forever()

    with trio.fail_after(TIMEOUT_S):
        async with ws_server(handler) as endpoint:
            with pytest.raises(ProtocolViolation) as info:
                async with open_client(str(endpoint), "token"):
                    pass  # pragma: no cover
            assert info.value.code == ErrorCode.MALFORMED_FRAME


async def test_pings_are_answered_and_an_abnormal_close_is_reported() -> None:
    async def handler(ws: WebSocketConnection) -> None:
        await ws.send_message(frame(b"hi"))
        with trio.fail_after(5):
            await ws.ping(b"are you there")  # returns when the pong arrives
        await ws.aclose(code=1011, reason="internal error")

    with trio.fail_after(TIMEOUT_S):
        async with ws_server(handler) as endpoint, open_transport(endpoint) as transport:
            assert await transport.receive_some() == frame(b"hi")
            with pytest.raises(TransportClosed, match="code 1011 \\(internal error\\)"):
                await transport.receive_some()


async def test_a_dropped_connection_is_transport_closed() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def handle(stream: trio.SocketStream) -> None:
        async with trio.open_nursery() as nursery:
            request = await wrap_server_stream(nursery, stream)
            ws = await request.accept()
            await ws.send_message(frame(b"hi"))
            await stream.aclose()  # no close frame: the TCP connection just ends
            nursery.cancel_scope.cancel()

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, handle, listeners)
            async with open_transport(Endpoint("ws", "127.0.0.1", port, "/relay")) as transport:
                with pytest.raises(TransportClosed, match="without a WebSocket close"):
                    await read_until_end(transport)
            nursery.cancel_scope.cancel()


async def test_a_server_that_never_answers_the_upgrade_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport_module, "WS_CONNECT_TIMEOUT_S", 0.2)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, lambda stream: trio.sleep_forever(), listeners)
            with pytest.raises(TransportClosed, match=r"no WebSocket upgrade within 0\.2 s"):
                async with open_transport(Endpoint("ws", "127.0.0.1", port, "/relay")):
                    pass  # pragma: no cover
            nursery.cancel_scope.cancel()


async def test_no_wsproto_in_the_client() -> None:
    import client
    import client._client
    import client._link

    for module in (client, client._client, client._link, transport_module):
        assert "wsproto" not in (module.__file__ and open(module.__file__).read())
