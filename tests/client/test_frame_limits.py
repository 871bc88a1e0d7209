"""Frame-size edge: every accepted message can be delivered within WELCOME's max_frame_bytes."""

from __future__ import annotations

from typing import Any

import trio
from relay_testing import url_of

from client import Status, open_client
from wire import (
    DELIVER_OVERHEAD_BYTES,
    PROTOCOL_VERSION,
    Connection,
    Deliver,
    ErrorCode,
    Hello,
    Role,
    Send,
    Welcome,
    encode_frame,
)

LIMIT = 1024
TIMEOUT_S = 10
LONGEST_SENDER = "a-long-sender-name-" + "s" * 45  # 64 characters, the longest mailbox id
LONGEST_ID = "i" * 64


def body_filling_a_send_frame(limit: int, msg_id: str, to: str) -> bytes:
    """A body that makes the SEND frame body exactly ``limit`` bytes (the largest frame the broker reads), as the
    client sends it by default (with ``notify``)."""
    n = limit
    while len(encode_frame(Send(id=msg_id, to=(to,), body=b"x" * n, notify=True))) - 4 > limit:
        n -= 1
    assert len(encode_frame(Send(id=msg_id, to=(to,), body=b"x" * n, notify=True))) - 4 == limit
    return b"x" * n


async def test_a_body_too_large_to_deliver_is_refused_in_the_receipt(broker_factory: Any) -> None:
    async with broker_factory(max_frame_bytes=LIMIT, max_recipients=3) as broker:
        with trio.fail_after(TIMEOUT_S):
            async with open_client(url_of(broker), broker.auth.issue(LONGEST_SENDER), e2e=False) as alice:
                for body in (
                    body_filling_a_send_frame(LIMIT, "max", "bob"),
                    b"x" * (LIMIT - DELIVER_OVERHEAD_BYTES + 1),
                ):
                    receipt = await alice.send("bob", body, id="max")
                    assert (receipt.code, receipt.results) == (ErrorCode.BODY_TOO_LARGE, {})
                stats = await broker.statistics()
                assert (stats["refused_body_too_large"], stats["messages_total"]) == (2, 0)


async def test_the_largest_accepted_body_is_delivered_within_max_frame_bytes(broker_factory: Any) -> None:
    async with broker_factory(max_frame_bytes=LIMIT, max_recipients=3) as broker:
        body = b"x" * (LIMIT - DELIVER_OVERHEAD_BYTES)
        with trio.fail_after(TIMEOUT_S):
            async with open_client(url_of(broker), broker.auth.issue(LONGEST_SENDER), e2e=False) as alice:
                receipt = await alice.send("bob", body, id=LONGEST_ID, ttl_s=2**40)
                assert receipt.results["bob"].status is Status.QUEUED
            stream = await trio.open_tcp_stream("127.0.0.1", broker.tcp_port)
            async with stream:
                # A client that takes WELCOME's figure as its receive limit, exactly.
                conn = Connection(Role.CLIENT, max_frame_bytes=LIMIT)
                await stream.send_all(conn.send(Hello(version=PROTOCOL_VERSION, token=broker.auth.issue("bob"))))
                frames: list[Any] = []
                while not any(type(f) is Deliver for f in frames):
                    frames += conn.receive_data(await stream.receive_some(65536))
        welcome = next(f for f in frames if type(f) is Welcome)
        deliver = next(f for f in frames if type(f) is Deliver)
        assert deliver.body == body
        assert len(encode_frame(deliver)) - 4 <= welcome.max_frame_bytes == LIMIT


async def test_client_receives_the_largest_accepted_body(broker_factory: Any) -> None:
    async with broker_factory(max_frame_bytes=LIMIT, max_recipients=3) as broker:
        body = b"y" * (LIMIT - DELIVER_OVERHEAD_BYTES)
        with trio.fail_after(TIMEOUT_S):
            async with open_client(url_of(broker), broker.auth.issue(LONGEST_SENDER), e2e=False) as alice:
                assert (await alice.send("bob", body, id="max")).results["bob"].status is Status.QUEUED
            async with open_client(url_of(broker), broker.auth.issue("bob")) as bob:
                [d] = [d async for d in bob.deliveries(until_drained=True)]
                assert d.body == body
