"""The WebSocket listener: the same protocol as TCP, whole frames in binary messages (protocol.md 2.5),
and its abuse cases."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cbor2
import pytest
import trio
from trio_websocket import ConnectionRejected

from broker.server import Broker
from wire import (
    DELIVER_OVERHEAD_BYTES,
    MAX_HELLO_FRAME_BYTES,
    Ack,
    Deliver,
    Drained,
    Error,
    ErrorCode,
    FrameDecoder,
    Hello,
    Ping,
    Pong,
    Receipt,
    Send,
    Status,
    Welcome,
    encode_frame,
)

from ..broker.raw import RawClient
from ..conftest import STORES
from .wsclient import WsClient, login_ws, open_ws

pytestmark = pytest.mark.stores(*STORES)

TIMEOUT = 10


def frame(obj: object) -> bytes:
    body = cbor2.dumps(obj)
    return len(body).to_bytes(4, "big") + body


async def expect_error(client: WsClient, code: ErrorCode) -> Error:
    error = await client.expect(Error)
    assert (error.code, error.close) == (code, True), error
    await client.expect_closed()
    return error


async def test_two_websocket_clients_exchange_a_message(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT):
        async with login_ws(broker.ws_port, broker.auth.issue("bob")) as (bob, welcome):
            assert welcome.mailbox == "bob"
            await bob.expect(Drained)
            async with login_ws(broker.ws_port, broker.auth.issue("alice")) as (alice, _):
                await alice.expect(Drained)
                await alice.send(Send(id="m1", to=("bob",), body=b"hello over ws"))
                receipt = await alice.expect(Receipt)
                assert receipt.results["bob"].status is Status.DELIVERED
                deliver = await bob.expect(Deliver)
                assert (deliver.id, deliver.sender, deliver.body, deliver.attempt) == (
                    "m1",
                    "alice",
                    b"hello over ws",
                    1,
                )
                await bob.send(Ack(ids=("m1",)), Ping())
                await bob.expect(Pong)
                assert await broker.store.pending("bob", broker.clock()) == 0


async def test_pending_messages_are_pushed_on_open(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT):
        await broker.route("alice", [Send(id="m0", to=("carol",), body=b"x")])
        await broker.route("alice", [Send(id="m2", to=("carol",), body=b"y")])
        async with login_ws(broker.ws_port, broker.auth.issue("carol")) as (carol, welcome):
            assert welcome.pending == 2
            before, drained = await carol.until(Drained)
            assert [f.id for f in before if isinstance(f, Deliver)] == ["m0", "m2"]
            assert drained.pending == 2


async def test_websocket_and_tcp_clients_exchange_messages_both_ways(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT):
        assert broker.tcp_port is not None
        tcp, _ = await RawClient.login(broker.tcp_port, broker.auth.issue("tcp-user"))
        await tcp.expect(Drained)
        async with login_ws(broker.ws_port, broker.auth.issue("ws-user")) as (ws, _):
            await ws.expect(Drained)
            await ws.send(Send(id="to-tcp", to=("tcp-user",), body=b"from ws"))
            assert (await ws.expect(Receipt)).results["tcp-user"].status is Status.DELIVERED
            got = await tcp.expect(Deliver)
            assert (got.sender, got.body) == ("ws-user", b"from ws")
            await tcp.send(Ack(ids=(got.id,)), Send(id="to-ws", to=("ws-user",), body=b"from tcp"))
            assert (await tcp.expect(Receipt)).results["ws-user"].status is Status.DELIVERED
            got = await ws.expect(Deliver)
            assert (got.sender, got.body) == ("tcp-user", b"from tcp")
            await ws.send(Ack(ids=(got.id,)), Ping())
            await ws.expect(Pong)
        await tcp.aclose()
        assert await broker.store.pending("tcp-user", broker.clock()) == 0
        assert await broker.store.pending("ws-user", broker.clock()) == 0


async def test_text_message_gets_malformed_frame_and_close(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_ws(broker.ws_port) as client:
            await client.send_raw("hello")
            await expect_error(client, ErrorCode.MALFORMED_FRAME)


async def test_text_message_after_welcome_gets_malformed_frame_and_close(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT):
        async with login_ws(broker.ws_port, broker.auth.issue("dave")) as (client, _):
            await client.expect(Drained)
            await client.send_raw("{}")
            await expect_error(client, ErrorCode.MALFORMED_FRAME)


BAD_MESSAGES = [
    pytest.param(frame({"type": "ping"})[:-1], ErrorCode.MALFORMED_FRAME, id="prefix-longer-than-message"),
    pytest.param(frame({"type": "ping"}) + b"\x00", ErrorCode.MALFORMED_FRAME, id="prefix-shorter-than-message"),
    pytest.param(frame({"type": "ping"}) + frame({"type": "ping"})[:5], ErrorCode.MALFORMED_FRAME, id="ends-mid-frame"),
    pytest.param(b"\x00\x00", ErrorCode.MALFORMED_FRAME, id="shorter-than-a-prefix"),
    pytest.param(b"", ErrorCode.MALFORMED_FRAME, id="empty"),
    pytest.param(frame({"type": "warp"}), ErrorCode.UNKNOWN_FRAME_TYPE, id="unknown-type"),
    pytest.param(frame({"type": "ping"}), ErrorCode.UNEXPECTED_FRAME, id="ping-before-hello"),
    pytest.param(frame({"type": "hello", "version": 1}), ErrorCode.INVALID_FIELD, id="hello-without-token"),
    pytest.param(frame({"type": "hello", "version": 1, "token": "not.a.jwt"}), ErrorCode.INVALID_TOKEN, id="bad-token"),
]


@pytest.mark.parametrize(("message", "code"), BAD_MESSAGES)
async def test_bad_message_gets_error_and_close(broker: Broker, message: bytes, code: ErrorCode) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_ws(broker.ws_port) as client:
            await client.send_raw(message)
            await expect_error(client, code)


async def test_token_for_another_secret_is_refused(broker: Broker) -> None:
    import jwt

    forged = jwt.encode({"sub": "eve", "aud": "relay", "exp": 2**40}, b"x" * 32, algorithm="HS256")
    with trio.fail_after(TIMEOUT):
        async with open_ws(broker.ws_port) as client:
            await client.send(Hello(version=1, token=forged))
            await expect_error(client, ErrorCode.INVALID_TOKEN)


async def test_no_hello_times_out(broker_factory: Callable[..., Any]) -> None:
    async with broker_factory(handshake_timeout_s=0.2) as broker:
        with trio.fail_after(TIMEOUT):
            async with open_ws(broker.ws_port) as client:
                await expect_error(client, ErrorCode.HANDSHAKE_TIMEOUT)


@pytest.mark.parametrize("excess", [1, 1024, 64 * 1024], ids=["one-byte-over", "twice", "far-over"])
async def test_oversized_message_is_closed_with_1009_and_no_error_frame(
    broker_factory: Callable[..., Any], excess: int
) -> None:
    """protocol.md 2.5: a message above max_frame_bytes + 4 is refused by the WebSocket layer itself."""
    async with broker_factory(max_frame_bytes=1024, max_outbound_bytes=64 * 1024, max_recipients=3) as broker:
        with trio.fail_after(TIMEOUT):
            async with login_ws(broker.ws_port, broker.auth.issue("erin")) as (client, welcome):
                assert welcome.max_frame_bytes == 1024
                await client.expect(Drained)
                message = (1024 + excess).to_bytes(4, "big") + b"\x00" * (1024 + excess)
                await client.send_raw(message)
                assert await client.expect_closed() == 1009
                assert not client.frames  # nothing after DRAINED: no ERROR frame
            # The broker still serves everyone else.
            async with login_ws(broker.ws_port, broker.auth.issue("erin")) as (client, _):
                await client.expect(Drained)


async def test_oversized_message_before_welcome_is_closed_with_1009(broker_factory: Callable[..., Any]) -> None:
    async with broker_factory(max_frame_bytes=1024, max_outbound_bytes=64 * 1024, max_recipients=3) as broker:
        with trio.fail_after(TIMEOUT):
            async with open_ws(broker.ws_port) as client:
                await client.send_raw(b"\x00\x00\x04\x01" + b"\x00" * 1025)
                assert await client.expect_closed() == 1009
                assert client.messages == 0


async def test_a_hello_above_the_pre_welcome_limit_in_one_message_is_frame_too_large(broker: Broker) -> None:
    """The message fits the WebSocket limit (max_frame_bytes + 4); the decoder refuses the frame by its prefix."""
    assert broker.config.max_frame_bytes > MAX_HELLO_FRAME_BYTES
    with trio.fail_after(TIMEOUT):
        async with open_ws(broker.ws_port) as client:
            size = MAX_HELLO_FRAME_BYTES + 1
            await client.send_raw(size.to_bytes(4, "big") + b"\x00" * size)
            await expect_error(client, ErrorCode.FRAME_TOO_LARGE)


async def test_one_message_carrying_several_frames_works(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT):
        async with login_ws(broker.ws_port, broker.auth.issue("ivy")) as (client, welcome):
            assert welcome.mailbox == "ivy"
            await client.expect(Drained)
            sends = [Send(id=f"p{i}", to=("ivy",), body=b"packed %d" % i) for i in range(20)]
            await client.send_packed(*sends, Ping())
            got = [await client.next() for _ in range(41)]
            assert [f.id for f in got if isinstance(f, Receipt)] == [s.id for s in sends]
            assert [f.body for f in got if isinstance(f, Deliver)] == [s.body for s in sends]
            assert sum(isinstance(f, Pong) for f in got) == 1
            await client.send_packed(Ack(ids=tuple(s.id for s in sends)), Ping())
            await client.expect(Pong)
            assert await broker.store.pending("ivy", broker.clock()) == 0


async def test_the_broker_packs_several_frames_into_one_message(broker: Broker) -> None:
    for i in range(200):
        await broker.route("alice", [Send(id=f"q{i}", to=("jo",), body=b"queued")])
    with trio.fail_after(TIMEOUT):
        async with login_ws(broker.ws_port, broker.auth.issue("jo")) as (client, welcome):
            assert welcome.pending == 200
            before, _ = await client.until(Drained)
            assert [f.id for f in before if isinstance(f, Deliver)] == [f"q{i}" for i in range(200)]
            assert client.messages < 100  # 201 frames (plus WELCOME) in fewer messages: packed


@pytest.mark.parametrize("after_welcome", [False, True], ids=["before-hello", "after-welcome"])
async def test_a_message_ending_mid_frame_is_malformed_frame(broker: Broker, after_welcome: bool) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_ws(broker.ws_port) as client:
            if after_welcome:
                await client.hello(broker.auth.issue("kim"))
                await client.expect(Drained)
            ping = encode_frame(Ping())
            await client.send_raw(ping + ping[:-1])
            await expect_error(client, ErrorCode.MALFORMED_FRAME)


async def test_frame_at_the_limit_is_accepted(broker_factory: Callable[..., Any]) -> None:
    async with broker_factory(max_frame_bytes=1024, max_outbound_bytes=64 * 1024, max_recipients=3) as broker:
        with trio.fail_after(TIMEOUT):
            async with login_ws(broker.ws_port, broker.auth.issue("frank")) as (client, _):
                await client.expect(Drained)
                send = Send(id="big", to=("frank",), body=b"")
                overhead = len(encode_frame(send)) - 4
                body = b"b" * (1024 - overhead - 2)  # the body's length header grows by 2 bytes past 255
                send = Send(id="big", to=("frank",), body=body)
                assert len(encode_frame(send)) == 1024 + 4
                await client.send(send)
                # Read and answered, but refused: its DELIVER would not fit in max_frame_bytes.
                receipt = await client.expect(Receipt)
                assert (receipt.code, receipt.results) == (ErrorCode.BODY_TOO_LARGE, {})
                body = b"b" * (1024 - DELIVER_OVERHEAD_BYTES)
                await client.send(Send(id="fits", to=("frank",), body=body))
                receipt, deliver = await client.expect_each(Receipt, Deliver)
                assert isinstance(receipt, Receipt) and isinstance(deliver, Deliver)
                assert receipt.results["frank"].status is Status.DELIVERED
                assert deliver.body == body and len(encode_frame(deliver)) <= 1024 + 4


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://127.0.0.1:1"])
async def test_unlisted_origin_is_refused_before_the_upgrade(broker: Broker, origin: str) -> None:
    with trio.fail_after(TIMEOUT):
        with pytest.raises(ConnectionRejected) as info:
            async with open_ws(broker.ws_port, origin=origin):
                pass
        assert info.value.status_code == 403


async def test_own_and_configured_origins_are_allowed(broker_factory: Callable[..., Any]) -> None:
    async with broker_factory(allowed_origins=("https://chat.example.org",)) as broker:
        origins = [
            f"http://127.0.0.1:{broker.http_port}",
            f"http://localhost:{broker.http_port}",
            "https://chat.example.org",
            "HTTPS://CHAT.EXAMPLE.ORG/",
        ]
        with trio.fail_after(TIMEOUT):
            for origin in origins:
                async with login_ws(broker.ws_port, broker.auth.issue("gina"), origin=origin) as (client, _):
                    await client.expect(Drained)


async def test_other_paths_are_not_upgraded(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT):
        with pytest.raises(ConnectionRejected) as info:
            async with open_ws(broker.ws_port, path="/elsewhere"):
                pass
        assert info.value.status_code == 404


async def test_websocket_takes_over_a_tcp_session_for_the_same_mailbox(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT):
        assert broker.tcp_port is not None
        token = broker.auth.issue("hana")
        tcp, _ = await RawClient.login(broker.tcp_port, token)
        await tcp.expect(Drained)
        async with login_ws(broker.ws_port, token) as (ws, _):
            error = await tcp.expect(Error)
            assert error.code == ErrorCode.CONNECTED_ELSEWHERE
            await ws.expect(Drained)


async def _raw_websocket(port: int | None) -> tuple[trio.SocketStream, Any]:
    """A TCP connection upgraded to WebSocket by a sans-IO wsproto client, for frames no library would send."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, Request

    assert port is not None
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host="127.0.0.1", target="/relay")))
    while True:
        ws.receive_data(await stream.receive_some(65536))
        if any(isinstance(e, AcceptConnection) for e in ws.events()):
            return stream, ws


@pytest.mark.parametrize("after_welcome", [False, True], ids=["before-hello", "after-welcome"])
async def test_a_text_message_that_is_not_utf8_closes_without_an_error_frame(
    broker: Broker, after_welcome: bool
) -> None:
    """The WebSocket layer refuses it before Relay sees a message: no ERROR, a close (1007, or none at all)."""
    from wsproto.events import BytesMessage, CloseConnection

    with trio.fail_after(TIMEOUT):
        async with login_ws(broker.ws_port, broker.auth.issue("bystander")) as (bystander, _):
            await bystander.expect(Drained)
            stream, ws = await _raw_websocket(broker.ws_port)
            if after_welcome:
                hello = encode_frame(Hello(version=1, token=broker.auth.issue("eve")))
                await stream.send_all(ws.send(BytesMessage(data=hello)))
                opened: list[Any] = []
                decoder = FrameDecoder()
                while len(opened) < 2:  # WELCOME, then DRAINED (perhaps in one message)
                    ws.receive_data(await stream.receive_some(65536))
                    for e in ws.events():
                        if isinstance(e, BytesMessage):
                            opened += decoder.feed(bytes(e.data))
                assert [type(f) for f in opened] == [Welcome, Drained]
            payload, mask = b"\xff\xfeA\xc3", b"\x01\x02\x03\x04"  # invalid UTF-8 in a single text frame
            masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            await stream.send_all(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
            events: list[Any] = []
            while True:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:  # reset: closed without a close frame
                    break
                if not data:
                    break
                ws.receive_data(data)
                events += list(ws.events())
            frames = [f for e in events if isinstance(e, BytesMessage) for f in FrameDecoder().feed(bytes(e.data))]
            closes = [e.code for e in events if isinstance(e, CloseConnection)]
            assert frames == [], "no Relay ERROR (nor anything else) for a message Relay never saw"
            assert closes in ([], [1007]), closes
            await stream.aclose()
            # Everyone else carries on.
            await bystander.send(Send(id="still", to=("bystander",), body=b"."))
            await bystander.expect_each(Receipt, Deliver)
