"""Bad input against a running broker: each gets its ERROR and a close; everyone else carries on."""

from __future__ import annotations

import cbor2
import jwt
import pytest
import trio

from broker.auth import Authenticator
from broker.server import Broker
from wire import Ack, Deliver, Drained, Error, ErrorCode, Hello, Receipt, Send, Stats, Status

from .raw import RawClient

TIMEOUT = 10


def frame(obj: object) -> bytes:
    body = cbor2.dumps(obj)
    return len(body).to_bytes(4, "big") + body


async def expect_error(client: RawClient, code: ErrorCode, *, close: bool = True) -> Error:
    error = await client.expect(Error)
    assert (error.code, error.close) == (code, close), error
    if close:
        await client.expect_closed()
    return error


async def still_serving(broker: Broker) -> None:
    """A fresh pair of clients can still exchange a message."""
    assert broker.tcp_port is not None
    bob, _ = await RawClient.login(broker.tcp_port, broker.auth.issue("bob-check"))
    await bob.expect(Drained)
    alice, _ = await RawClient.login(broker.tcp_port, broker.auth.issue("alice-check"))
    await alice.expect(Drained)
    await alice.send(Send(id="check", to=("bob-check",), body=b"ok"))
    assert (await alice.expect(Receipt)).results["bob-check"].status is Status.DELIVERED
    assert (await bob.expect(Deliver)).body == b"ok"
    await bob.send(Ack(ids=("check",)))


BAD_STREAMS = [
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ErrorCode.FRAME_TOO_LARGE, id="http-request"),
    pytest.param(b"\x00\x00\x00\x03\xff\xff\xff", ErrorCode.MALFORMED_FRAME, id="garbage-body"),
    pytest.param(b"\xff\xff\xff\xff", ErrorCode.FRAME_TOO_LARGE, id="huge-declared-length"),
    pytest.param(frame([1, 2, 3]), ErrorCode.MALFORMED_FRAME, id="array-not-map"),
    pytest.param(frame({"type": "warp"}), ErrorCode.UNKNOWN_FRAME_TYPE, id="unknown-type"),
    pytest.param(frame({"type": ["send"]}), ErrorCode.UNKNOWN_FRAME_TYPE, id="type-is-an-array"),
    pytest.param(frame({"type": "ping"}), ErrorCode.UNEXPECTED_FRAME, id="ping-before-hello"),
    pytest.param(
        frame({"type": "send", "id": "a", "to": ["bob"], "body": b""}), ErrorCode.UNEXPECTED_FRAME, id="send-first"
    ),
    pytest.param(frame({"type": "hello", "version": 1}), ErrorCode.INVALID_FIELD, id="hello-without-token"),
    pytest.param(frame({"type": "hello", "version": "1", "token": "t"}), ErrorCode.INVALID_FIELD, id="version-text"),
    pytest.param(frame({"type": "hello", "version": 9, "token": "t"}), ErrorCode.UNSUPPORTED_VERSION, id="version-9"),
    pytest.param(frame({"type": "hello", "version": 1, "token": "not.a.jwt"}), ErrorCode.INVALID_TOKEN, id="junk"),
    pytest.param(
        frame({"type": "hello", "version": 1, "token": "x"}) + frame({"type": "ping"}),
        ErrorCode.UNEXPECTED_FRAME,
        id="pipelined-before-welcome",
    ),
]


@pytest.mark.parametrize(("data", "code"), BAD_STREAMS)
async def test_bad_stream_gets_error_and_close(broker: Broker, data: bytes, code: ErrorCode) -> None:
    with trio.fail_after(TIMEOUT):
        assert broker.tcp_port is not None
        # A bystander holds a session the whole time and must not notice anything.
        bystander, _ = await RawClient.login(broker.tcp_port, broker.auth.issue("bystander"))
        await bystander.expect(Drained)
        client = await RawClient.open(broker.tcp_port)
        await client.send_raw(data)
        error = await client.expect(Error)
        assert (error.code, error.close) == (code, True), error
        await client.expect_closed()
        await bystander.send(Send(id="after", to=("bystander",), body=b"."))
        receipt, _ = await bystander.expect_each(Receipt, Deliver)
        assert isinstance(receipt, Receipt) and receipt.results["bystander"].status is Status.DELIVERED
        await still_serving(broker)


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        pytest.param({"body": "text, not bytes"}, ErrorCode.INVALID_FIELD, id="body-text"),
        pytest.param({"to": "bob"}, ErrorCode.INVALID_FIELD, id="to-not-array"),
        pytest.param({"to": []}, ErrorCode.INVALID_FIELD, id="to-empty"),
        pytest.param({"ttl_s": 0}, ErrorCode.INVALID_FIELD, id="ttl-zero"),
        pytest.param({"ttl_s": True}, ErrorCode.INVALID_FIELD, id="ttl-bool"),
        pytest.param({"id": "has space"}, ErrorCode.INVALID_FIELD, id="id-space"),
        pytest.param({"id": "x" * 65}, ErrorCode.INVALID_FIELD, id="id-too-long"),
    ],
)
async def test_send_with_wrong_field_types_is_refused(
    broker: Broker, fields: dict[str, object], code: ErrorCode
) -> None:
    with trio.fail_after(TIMEOUT):
        assert broker.tcp_port is not None
        client, _ = await RawClient.login(broker.tcp_port, broker.auth.issue("alice"))
        await client.expect(Drained)
        await client.send_raw(frame({"type": "send", "id": "m", "to": ["bob"], "body": b"", **fields}))
        await expect_error(client, code)
        await still_serving(broker)


async def test_frame_above_the_limit_is_refused_before_its_body_arrives(broker_factory) -> None:  # type: ignore[no-untyped-def]
    async with broker_factory(max_frame_bytes=4096, max_outbound_bytes=65536, max_recipients=10) as broker:
        with trio.fail_after(TIMEOUT):
            client, _ = await RawClient.login(broker.tcp_port, broker.auth.issue("alice"))
            await client.expect(Drained)
            await client.send_raw((4097).to_bytes(4, "big"))  # the prefix alone, no body
            await expect_error(client, ErrorCode.FRAME_TOO_LARGE)
            await still_serving(broker)


async def test_forged_expired_and_operator_tokens(broker: Broker, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(TIMEOUT):
        assert broker.tcp_port is not None
        forged = Authenticator(b"k" * 32).issue("bob")
        expired = broker.auth.issue("bob", lifetime_s=-60)
        no_exp = jwt.encode({"sub": "bob", "aud": "relay"}, b"irrelevant" * 4, algorithm="HS256")
        for token, code in (
            (forged, ErrorCode.INVALID_TOKEN),
            (expired, ErrorCode.TOKEN_EXPIRED),
            (no_exp, ErrorCode.INVALID_TOKEN),
        ):
            client = await RawClient.open(broker.tcp_port)
            await client.send(Hello(version=1, token=token))
            await expect_error(client, code)
        # A user may not ask for statistics; the connection stays open.
        user, _ = await RawClient.login(broker.tcp_port, broker.auth.issue("bob"))
        await user.expect(Drained)
        await user.send(Stats())
        await expect_error(user, ErrorCode.FORBIDDEN, close=False)
        # An operator may, but has no mailbox to send from.
        operator, welcome = await RawClient.login(broker.tcp_port, broker.auth.issue("ops", operator=True))
        assert welcome.mailbox is None
        await operator.send(Send(id="m", to=("bob",), body=b""))
        await expect_error(operator, ErrorCode.FORBIDDEN, close=False)
        await still_serving(broker)


async def test_handshake_timeout(broker_factory) -> None:  # type: ignore[no-untyped-def]
    async with broker_factory(handshake_timeout_s=0.2) as broker:
        with trio.fail_after(TIMEOUT):
            client = await RawClient.open(broker.tcp_port)
            await expect_error(client, ErrorCode.HANDSHAKE_TIMEOUT)


async def test_a_client_ending_its_stream_before_hello_gets_no_handshake_timeout(broker_factory) -> None:  # type: ignore[no-untyped-def]
    # The transport ended (protocol.md 5): the session closes at once, with no ERROR. It used to be
    # answered at once with 1007 "no HELLO within 60 s", a timeout that had not happened (found by test_fuzz).
    async with broker_factory(handshake_timeout_s=60) as broker:
        with trio.fail_after(TIMEOUT):
            client = await RawClient.open(broker.tcp_port)
            await client.send_raw(b"\x00\x00")  # half a length prefix, then nothing more
            await client.stream.send_eof()
            await client.expect_closed()
            assert not client.frames, f"the broker answered an ended stream with {list(client.frames)}"
            await still_serving(broker)


async def test_keepalive_timeout_closes_a_silent_connection(broker_factory) -> None:  # type: ignore[no-untyped-def]
    async with broker_factory(keepalive_s=0.3) as broker:
        with trio.fail_after(TIMEOUT):
            client, welcome = await RawClient.login(broker.tcp_port, broker.auth.issue("bob"))
            assert welcome.keepalive_s == 1  # announced in whole seconds, rounded up to at least 1
            await client.expect(Drained)
            await expect_error(client, ErrorCode.KEEPALIVE_TIMEOUT)


async def test_connections_beyond_the_limit_are_refused(broker_factory) -> None:  # type: ignore[no-untyped-def]
    async with broker_factory(max_connections=2) as broker:
        with trio.fail_after(TIMEOUT):
            _first, _ = await RawClient.login(broker.tcp_port, broker.auth.issue("a"))
            b, _ = await RawClient.login(broker.tcp_port, broker.auth.issue("b"))
            c = await RawClient.open(broker.tcp_port)
            await expect_error(c, ErrorCode.TOO_MANY_CONNECTIONS)
            await b.aclose()
            while len(broker.sessions) > 1:
                await trio.sleep(0.01)
            d, _ = await RawClient.login(broker.tcp_port, broker.auth.issue("d"))
            await d.expect(Drained)


async def test_stalled_reader_is_cut_off_and_its_messages_stay_queued(broker_factory) -> None:  # type: ignore[no-untyped-def]
    async with broker_factory(keepalive_s=0.5, max_frame_bytes=256 * 1024) as broker:
        with trio.fail_after(TIMEOUT):
            sender, _ = await RawClient.login(broker.tcp_port, broker.auth.issue("alice"))
            await sender.expect(Drained)
            body = b"z" * (200 * 1024)
            count = 100  # 20 MB: far more than the socket buffers hold
            for i in range(count):
                await sender.send(Send(id=f"big{i}", to=("bob",), body=body))
                await sender.expect(Receipt)
            stalled, _ = await RawClient.login(broker.tcp_port, broker.auth.issue("bob"))
            # Never read; keep sending pings so only the stalled write can end the session.
            with trio.move_on_after(TIMEOUT - 2):
                while await broker.presence.online(["bob"]):
                    try:
                        await stalled.send_raw(frame({"type": "ping"}))
                    except trio.BrokenResourceError:
                        break
                    await trio.sleep(0.1)
            assert not await broker.presence.online(["bob"])
            stats = await broker.statistics()
            assert (stats["messages_total"], stats["inflight"]) == (count, 0)
            await stalled.aclose()


async def test_mailbox_limits_refuse_with_their_codes(broker_factory) -> None:  # type: ignore[no-untyped-def]
    limits = dict(max_mailbox_messages=2, max_mailbox_bytes=10, max_total_bytes=15, max_recipients=2)
    async with broker_factory(**limits) as broker:
        with trio.fail_after(TIMEOUT):
            alice, _ = await RawClient.login(broker.tcp_port, broker.auth.issue("alice"))
            await alice.expect(Drained)

            async def outcome(mid: str, to: tuple[str, ...], size: int) -> dict[str, tuple[Status, int | None]] | int:
                await alice.send(Send(id=mid, to=to, body=b"b" * size))
                receipt = await alice.expect(Receipt)
                if receipt.code is not None:
                    assert not receipt.results
                    return receipt.code
                return {k: (v.status, v.code) for k, v in receipt.results.items()}

            assert await outcome("a", ("bob",), 4) == {"bob": (Status.QUEUED, None)}
            assert await outcome("b", ("bob",), 7) == {"bob": (Status.REFUSED, ErrorCode.MAILBOX_BYTES_FULL)}
            assert await outcome("c", ("bob",), 6) == {"bob": (Status.QUEUED, None)}
            assert await outcome("d", ("bob",), 0) == {"bob": (Status.REFUSED, ErrorCode.MAILBOX_FULL)}
            assert await outcome("e", ("carol",), 6) == {"carol": (Status.REFUSED, ErrorCode.BROKER_FULL)}
            # Too many recipients refuses the SEND as a whole, even with a body too large as well (3004 wins).
            assert await outcome("f", ("x", "y", "z"), 0) == ErrorCode.TOO_MANY_RECIPIENTS
            assert await outcome("g", ("x", "y", "z"), 2**20 - 100) == ErrorCode.TOO_MANY_RECIPIENTS
            assert await outcome("h", ("x", "y"), 2**20 - 100) == ErrorCode.BODY_TOO_LARGE
            stats = await broker.statistics()
            assert stats["refused_total"] == 6  # three refused results, three SENDs refused as a whole
            assert (stats["refused_mailbox_full"], stats["refused_mailbox_bytes_full"]) == (1, 1)
            assert (stats["refused_broker_full"], stats["refused_too_many_recipients"]) == (1, 2)
            assert stats["refused_body_too_large"] == 1
            assert (stats["messages_total"], stats["queued_bytes"]) == (2, 10)
