"""Before WELCOME a WebSocket connection can make the broker read (and so buffer) only a small budget.

broker.websocket.ReadBudget over memory streams: it stops reading at the budget, a release lets
everything through (a big message too), closing wakes a read that waits. Over the real broker: the
largest legitimate handshake (a request head near h11's 16 KiB bound and a HELLO of 8,192 bytes) fits
the budget and is then released, and a pre-WELCOME message that does not fit is never read: the
handshake times out (protocol.md 2.5). The memory bound under a flood is in
tests/broker/test_prehello_flood.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cbor2
import pytest
import trio
import trio.testing
from trio_websocket import WebSocketConnection, open_websocket_url, wrap_client_stream, wrap_server_stream

from broker.server import Broker
from broker.websocket import PREWELCOME_READ_BYTES, ReadBudget
from wire import MAX_HELLO_FRAME_BYTES, Deliver, Drained, Error, ErrorCode, Hello, Receipt, Send, Status, Welcome

from .test_websocket import expect_error
from .wsclient import WsClient, open_ws, ws_url

TIMEOUT = 10


async def _read_until_blocked(budget: ReadBudget, got: bytearray, *, task_status: Any) -> None:
    task_status.started()
    while data := await budget.receive_some(1000):
        got += data


async def test_reads_stop_at_the_budget_until_released() -> None:
    client, server = trio.testing.memory_stream_pair()
    budget = ReadBudget(server, 2500)
    got = bytearray()
    async with trio.open_nursery() as nursery:
        await client.send_all(b"a" * 4000)
        await nursery.start(_read_until_blocked, budget, got)
        await trio.testing.wait_all_tasks_blocked()
        assert got == b"a" * 2500  # 1000 + 1000 + 500: never more than what is left
        await client.send_all(b"b" * 100)
        await trio.testing.wait_all_tasks_blocked()
        assert len(got) == 2500
        budget.release()
        await trio.testing.wait_all_tasks_blocked()
        assert got == b"a" * 4000 + b"b" * 100
        await client.aclose()  # end of stream: the reader's loop ends


async def test_a_read_waiting_for_release_raises_closed_when_the_stream_closes() -> None:
    client, server = trio.testing.memory_stream_pair()
    budget = ReadBudget(server, 10)
    await client.send_all(b"x" * 20)
    assert await budget.receive_some() == b"x" * 10
    async with trio.open_nursery() as nursery:

        async def read() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await budget.receive_some()

        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        await budget.aclose()


async def test_writes_pass_through_and_eof_within_the_budget_is_eof() -> None:
    client, server = trio.testing.memory_stream_pair()
    budget = ReadBudget(server, 100)
    await budget.send_all(b"out")
    assert await client.receive_some() == b"out"
    await client.send_all(b"in")
    await client.aclose()
    assert await budget.receive_some() == b"in"
    assert await budget.receive_some() == b""


async def test_releasing_lets_a_message_larger_than_the_budget_through() -> None:
    """A WebSocket over a ReadBudget: a 64 KiB message waits (1 KiB read) until release, then arrives whole."""
    client_stream: Any  # any trio Stream works (the annotation names the socket kinds)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    budget = ReadBudget(server_stream, 1024)
    message = bytes(range(256)) * 256
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            servers: list[WebSocketConnection] = []

            async def serve() -> None:
                request = await wrap_server_stream(nursery, budget, max_message_size=1 << 20)
                servers.append(await request.accept())

            nursery.start_soon(serve)
            client = await wrap_client_stream(nursery, client_stream, "localhost", "/relay")
            (server,) = servers
            got: list[bytes | str] = []

            async def receive() -> None:
                got.append(await server.get_message())

            nursery.start_soon(client.send_message, message)
            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            assert not got  # the message cannot complete within the budget
            budget.release()
            await trio.testing.wait_all_tasks_blocked()
            assert got == [message]
            await client.aclose()
            await server.aclose()


def test_the_budget_holds_the_largest_legitimate_handshake() -> None:
    request_head, ws_header, close_frame = 16 * 1024, 14, 2 + 4 + 125
    assert PREWELCOME_READ_BYTES >= request_head + MAX_HELLO_FRAME_BYTES + 4 + ws_header + close_frame


def _padded_hello(token: str, size: int) -> bytes:
    """A HELLO whose body is exactly ``size`` bytes (an unknown key carries the padding; it is ignored)."""
    hello: dict[str, object] = {"type": "hello", "version": 1, "token": token, "pad": ""}
    pad = size - len(cbor2.dumps(hello))
    hello["pad"] = "p" * (pad - 2)  # the text's length head grows from 1 to 3 bytes past 23
    body = cbor2.dumps(hello)
    assert len(body) == size
    return len(body).to_bytes(4, "big") + body


async def test_the_largest_handshake_fits_and_big_messages_pass_after_welcome(broker: Broker) -> None:
    headers = [(b"x-padding", b"c" * (14 * 1024))]  # a browser's cookies may be this long
    with trio.fail_after(TIMEOUT):
        async with open_websocket_url(ws_url(broker.ws_port), extra_headers=headers, max_message_size=1 << 22) as ws:
            client = WsClient(ws)
            token = broker.auth.issue("gus")
            client.conn.send(Hello(version=1, token=token))  # the client's state: HELLO sent (as the padded one)
            await client.send_raw(_padded_hello(token, MAX_HELLO_FRAME_BYTES))
            welcome = await client.expect(Welcome)
            assert welcome.mailbox == "gus" and welcome.max_frame_bytes > 4 * PREWELCOME_READ_BYTES
            await client.expect(Drained)
            body = b"B" * (3 * PREWELCOME_READ_BYTES)
            await client.send(Send(id="big", to=("gus",), body=body))
            receipt, deliver = await client.expect_each(Receipt, Deliver)
            assert isinstance(receipt, Receipt) and receipt.results["gus"].status is Status.DELIVERED
            assert isinstance(deliver, Deliver) and deliver.body == body


async def test_a_pre_welcome_message_beyond_the_budget_is_never_read_and_the_handshake_times_out(
    broker_factory: Callable[..., Any],
) -> None:
    """Within max_frame_bytes + 4 (no 1009), too long for the budget: no frame of it is judged (no 1002)."""
    async with broker_factory(handshake_timeout_s=0.5) as broker:
        size = 2 * PREWELCOME_READ_BYTES
        assert size + 4 <= broker.config.max_frame_bytes + 4
        with trio.fail_after(TIMEOUT):
            async with open_ws(broker.ws_port) as client, trio.open_nursery() as nursery:
                nursery.start_soon(client.send_raw, size.to_bytes(4, "big") + b"\x00" * size)
                error = await expect_error(client, ErrorCode.HANDSHAKE_TIMEOUT)
                assert isinstance(error, Error)
                nursery.cancel_scope.cancel()
