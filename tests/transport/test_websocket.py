"""WebSocketTransport in both roles, over memory streams: a trio-websocket server on a
MemoryListener and a client made by trio_websocket.wrap_client_stream (public API only).

Covers protocol.md 2.5: packing frames into messages, the frame-boundary check, text
messages, clean and unclean closes, and an oversized message (1009 close, no ERROR)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, WebSocketServer, wrap_client_stream

from broker.listeners import MemoryListener
from wire import ErrorCode, RemoteProtocolError
from wire.transport import TransportClosed
from wire.websocket import MIN_PEER_FRAME_BYTES, WebSocketTransport, pack

TIMEOUT_S = 10


def frame(payload: bytes) -> bytes:
    """Bytes with a correct length prefix (the transport never decodes the body)."""
    return len(payload).to_bytes(4, "big") + payload


@dataclass
class Pair:
    client: WebSocketTransport
    server: WebSocketTransport
    client_ws: WebSocketConnection
    server_ws: WebSocketConnection


@asynccontextmanager
async def ws_pair(
    *, server_max_message: int = 1024 * 1024, client_max_message: int = 1024 * 1024, peer_limit: int = 1024
) -> AsyncIterator[Pair]:
    """A connected client and server WebSocket over a memory stream, each wrapped in a transport."""
    listener = MemoryListener()
    accepted_send, accepted = trio.open_memory_channel[WebSocketConnection](1)
    done = trio.Event()

    async def handler(request: WebSocketRequest) -> None:
        await accepted_send.send(await request.accept())
        await done.wait()

    listeners: Any = [listener]  # any trio Listener works (the annotation names the socket kinds)
    server = WebSocketServer(
        handler, listeners, max_message_size=server_max_message, connect_timeout=5, disconnect_timeout=2
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        stream: Any = await listener.connect()
        client_ws = await wrap_client_stream(
            nursery, stream, "relay.test", "/relay", max_message_size=client_max_message
        )
        server_ws = await accepted.receive()
        yield Pair(
            WebSocketTransport(client_ws, peer_max_frame_bytes=peer_limit),
            WebSocketTransport(server_ws, peer_max_frame_bytes=peer_limit),
            client_ws,
            server_ws,
        )
        done.set()
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- packing


def test_pack_cuts_only_between_frames_within_the_limit() -> None:
    frames = [frame(b"a" * 296) for _ in range(10)]  # 300 bytes each
    data = b"".join(frames)
    messages = pack(data, 1028)
    assert [len(m) for m in messages] == [900, 900, 900, 300]
    assert b"".join(messages) == data
    assert pack(data, 10_000) == [data]
    assert pack(b"", 1028) == []
    big = frame(b"b" * 2000)  # above the limit: alone in its message, never split
    assert pack(frames[0] + big + frames[1], 1028) == [frames[0], big, frames[1]]


@pytest.mark.parametrize("data", [b"\x00\x00", frame(b"abc")[:-1], frame(b"ok") + frame(b"abc")[:5]])
@pytest.mark.parametrize("limit", [4, 1028], ids=["cut", "whole"])
def test_pack_refuses_data_that_is_not_whole_frames(data: bytes, limit: int) -> None:
    with pytest.raises(ValueError, match="whole frames"):
        pack(data, limit)


@pytest.mark.parametrize("role", ["server", "client"])
async def test_send_all_packs_frames_into_messages_of_at_most_the_peer_limit(role: str) -> None:
    frames = [frame(bytes([i]) * (100 + 10 * i)) for i in range(40)]
    data = b"".join(frames)
    with trio.fail_after(TIMEOUT_S):
        async with ws_pair(peer_limit=1024) as pair:
            sender, receiver_ws = (pair.server, pair.client_ws) if role == "server" else (pair.client, pair.server_ws)
            await sender.send_all(data)
            got: list[bytes] = []
            while sum(map(len, got)) < len(data):
                message = await receiver_ws.get_message()
                assert isinstance(message, bytes)
                got.append(message)
            assert b"".join(got) == data
            assert all(len(m) <= 1028 for m in got) and len(got) == len(pack(data, 1028)) < len(frames)
            # Every message is whole frames (the receiving transport's check passes).
            receiver = pair.client if role == "server" else pair.server
            await sender.send_all(data)
            received = b""
            while len(received) < len(data):
                received += await receiver.receive_some()
            assert received == data


async def test_set_peer_limit_raises_the_packing_limit() -> None:
    frames = b"".join(frame(b"x" * 996) for _ in range(8))  # 1000 bytes each
    with trio.fail_after(TIMEOUT_S):
        async with ws_pair(peer_limit=MIN_PEER_FRAME_BYTES) as pair:
            await pair.client.send_all(frames)
            assert [len(await pair.server_ws.get_message()) for _ in range(8)] == [1000] * 8
            pair.client.set_peer_limit(1024 * 1024)
            await pair.client.send_all(frames)
            assert await pair.server_ws.get_message() == frames


# ---------------------------------------------------------------- receiving


async def test_one_message_with_several_frames_is_returned_whole() -> None:
    data = frame(b"one") + frame(b"") + frame(b"three")
    with trio.fail_after(TIMEOUT_S):
        async with ws_pair() as pair:
            await pair.client_ws.send_message(data)
            assert await pair.server.receive_some() == data
            await pair.server_ws.send_message(data)
            assert await pair.client.receive_some() == data


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(frame(b"abc")[:-1], id="shorter-than-its-prefix"),
        pytest.param(frame(b"ok") + frame(b"abc")[:5], id="ends-mid-frame"),
        pytest.param(frame(b"ok") + b"\x00\x00", id="ends-mid-prefix"),
        pytest.param(b"\x00\x00", id="fewer-than-4-bytes"),
        pytest.param(b"", id="empty"),
    ],
)
@pytest.mark.parametrize("role", ["server", "client"])
async def test_a_message_not_ending_at_a_frame_boundary_is_malformed(message: bytes, role: str) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with ws_pair() as pair:
            peer_ws, transport = (pair.client_ws, pair.server) if role == "server" else (pair.server_ws, pair.client)
            await peer_ws.send_message(message)
            with pytest.raises(RemoteProtocolError) as info:
                await transport.receive_some()
            assert info.value.code == ErrorCode.MALFORMED_FRAME


@pytest.mark.parametrize("role", ["server", "client"])
async def test_a_text_message_is_malformed(role: str) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with ws_pair() as pair:
            peer_ws, transport = (pair.client_ws, pair.server) if role == "server" else (pair.server_ws, pair.client)
            await peer_ws.send_message(frame(b"ok").decode())
            with pytest.raises(RemoteProtocolError) as info:
                await transport.receive_some()
            assert info.value.code == ErrorCode.MALFORMED_FRAME


async def test_an_oversized_message_is_closed_with_1009_and_nothing_else() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with ws_pair(server_max_message=1028) as pair:
            await pair.client_ws.send_message(frame(b"f" * 1024))  # exactly the limit: passes
            assert len(await pair.server.receive_some()) == 1028
            await pair.client.send_all(frame(b"f" * 1025))  # one byte over
            with pytest.raises(TransportClosed, match="code 1009"):
                await pair.server.receive_some()
            # The client sees the close, and no message before it (no ERROR frame).
            with pytest.raises(TransportClosed, match="code 1009"):
                await pair.client.receive_some()


# ---------------------------------------------------------------- closing


@pytest.mark.parametrize("code", [1000, 1001])
async def test_a_clean_close_ends_the_stream(code: int) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with ws_pair() as pair:
            await pair.client_ws.send_message(frame(b"before"))
            await pair.client_ws.aclose(code=code)
            assert await pair.server.receive_some() == frame(b"before")  # what was sent first still arrives
            assert await pair.server.receive_some() == b""
            assert await pair.server.receive_some() == b""
            with pytest.raises(TransportClosed):
                await pair.server.send_all(frame(b"after"))


async def test_our_own_close_ends_our_stream_and_the_peers() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with ws_pair() as pair:
            await pair.server.aclose()
            await pair.server.aclose()  # idempotent
            assert await pair.server.receive_some() == b""
            assert await pair.client.receive_some() == b""
            assert pair.client_ws.closed is not None and pair.client_ws.closed.code == 1000


async def test_another_close_code_is_transport_closed() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with ws_pair() as pair:
            await pair.server_ws.aclose(code=1011, reason="internal error")
            with pytest.raises(TransportClosed, match=r"code 1011 \(internal error\)"):
                await pair.client.receive_some()


async def test_a_dropped_connection_is_transport_closed() -> None:
    listener = MemoryListener()
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:

            async def handler(request: WebSocketRequest) -> None:
                ws = await request.accept()
                await WebSocketTransport(ws).receive_some()  # pragma: no cover (the test ends first)

            server = WebSocketServer(handler, [listener])  # type: ignore[list-item]
            await nursery.start(server.run)
            stream: Any = await listener.connect()
            client_ws = await wrap_client_stream(nursery, stream, "relay.test", "/relay")
            transport = WebSocketTransport(client_ws)
            await stream.aclose()  # no close frame: the connection just ends
            with pytest.raises(TransportClosed, match="without a WebSocket close"):
                await transport.receive_some()
            with pytest.raises(TransportClosed):
                await transport.send_all(frame(b"x"))
            assert transport.send_some_nowait(frame(b"x")) == 0
            await transport.aclose()
            nursery.cancel_scope.cancel()


async def test_connection_closed_is_never_raised_to_the_caller() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with ws_pair() as pair:
            await pair.client.aclose()
            try:
                await pair.client.send_all(frame(b"x"))
            except ConnectionClosed:  # pragma: no cover
                pytest.fail("trio-websocket's ConnectionClosed leaked")
            except TransportClosed:
                pass


async def test_welcome_sent_calls_on_welcome_if_given() -> None:
    """The broker's session lifts the pre-WELCOME read budget through this hook (broker.websocket)."""
    async with ws_pair() as pair:
        calls: list[str] = []
        WebSocketTransport(pair.server_ws, on_welcome=lambda: calls.append("lifted")).welcome_sent()
        assert calls == ["lifted"]
        pair.client.welcome_sent()  # none given: nothing happens
