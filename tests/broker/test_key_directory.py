"""The public-key directory through the whole broker (protocol.md section 9, rule 20), on every store.

A mailbox session publishes its own key record (KEY_PUT, verified for the session's mailbox) and
looks up anyone's (KEY_GET); operators may do neither. Real TCP and WebSocket on 127.0.0.1, over
the memory store, Redis and Redis Cluster; expiry by trio's MockClock over in-memory streams (memory
store) and by short real TTLs (Redis). Every wait is for an outcome under ``fail_after``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import cbor2
import pytest
import trio
import trio.testing

from broker.config import BrokerConfig
from broker.server import Broker
from broker.store.memory import MemoryStore
from wire import (
    Drained,
    Error,
    ErrorCode,
    KeyGet,
    KeyGetResult,
    KeyPut,
    KeyPutResult,
    KeyRecord,
    Ping,
    Pong,
    Welcome,
)
from wire.e2e import EncryptionKey, Identity, make_key_record, verify_key_record

from ..conftest import STORES
from ..store.clock import DAY_S, trio_clock_ms
from ..websocket.wsclient import login_ws
from .raw import FrameClient, RawClient
from .test_ttl import memory_client

pytestmark = pytest.mark.stores(*STORES)

TIMEOUT = 20
TRANSPORTS = ("tcp", "websocket")


def new_record(mailbox: str) -> KeyRecord:
    """A fresh identity and encryption key, and the record ``mailbox`` publishes for them."""
    return make_key_record(mailbox, Identity.generate(), EncryptionKey.generate())


@asynccontextmanager
async def session(broker: Broker, transport: str, name: str, *, operator: bool = False) -> AsyncIterator[FrameClient]:
    """A logged-in client for ``name`` over ``transport`` (WELCOME and, for a mailbox, its DRAINED read)."""
    token = broker.auth.issue(name, operator=operator)
    if transport == "tcp":
        assert broker.tcp_port is not None
        client, _ = await RawClient.login(broker.tcp_port, token)
        try:
            if not operator:
                await client.expect(Drained)
            yield client
        finally:
            await client.aclose()
    else:
        async with login_ws(broker.ws_port, token) as (ws, welcome):
            assert isinstance(welcome, Welcome)
            if not operator:
                await ws.expect(Drained)
            yield ws


async def put(client: FrameClient, record: KeyRecord) -> KeyPutResult:
    await client.send(KeyPut(key=record))
    return await client.expect(KeyPutResult)


async def get(client: FrameClient, *mailboxes: str) -> dict[str, KeyRecord]:
    await client.send(KeyGet(mailboxes=mailboxes))
    return dict((await client.expect(KeyGetResult)).keys)


async def settled(broker: Broker, **expected: int) -> dict[str, int]:
    while True:
        stats = await broker.statistics()
        if all(stats[name] == value for name, value in expected.items()):
            return stats
        await trio.sleep(0.05)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_put_own_record_then_anyone_gets_it_exactly(broker: Broker, transport: str) -> None:
    record = new_record("alice")
    with trio.fail_after(TIMEOUT):
        async with session(broker, transport, "alice") as alice, session(broker, transport, "bob") as bob:
            assert await put(alice, record) == KeyPutResult(kid=record.kid)
            got = await get(bob, "alice")
            assert got == {"alice": record}
            assert verify_key_record("alice", got["alice"])
            assert await get(alice, "alice") == {"alice": record}
        stats = await settled(broker, keys_put_total=1)
        assert (stats["keys_put_refused_total"], stats["key_lookups_total"]) == (0, 2)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_put_replaces_the_record_and_a_repeat_is_harmless(broker: Broker, transport: str) -> None:
    first, rotated, new_identity = new_record("alice"), new_record("alice"), new_record("alice")
    with trio.fail_after(TIMEOUT):
        async with session(broker, transport, "alice") as alice:
            assert (await put(alice, first)).code is None
            assert (await put(alice, first)).code is None  # the same record again
            assert await get(alice, "alice") == {"alice": first}
            assert (await put(alice, rotated)).code is None
            assert await get(alice, "alice") == {"alice": rotated}
            assert (await put(alice, new_identity)).code is None  # a new ik too: clients judge key changes
            assert await get(alice, "alice") == {"alice": new_identity}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_token_for_one_mailbox_can_never_put_for_another(broker: Broker, transport: str) -> None:
    bobs = new_record("bob")
    signed_for_bob = new_record("bob")
    with trio.fail_after(TIMEOUT):
        async with session(broker, transport, "bob") as bob, session(broker, transport, "alice") as alice:
            await put(bob, bobs)
            # alice's session sends a valid record signed for bob: it does not verify for alice.
            result = await put(alice, signed_for_bob)
            assert result == KeyPutResult(kid=signed_for_bob.kid, code=int(ErrorCode.INVALID_KEY))
            assert await get(alice, "alice", "bob") == {"bob": bobs}  # nothing stored, under either mailbox
            # a record whose signature was tampered with is refused the same way
            forged = KeyRecord(ik=bobs.ik, kid="other", ek=bobs.ek, sig=bobs.sig)
            assert (await put(bob, forged)).code == ErrorCode.INVALID_KEY
            assert await get(bob, "bob") == {"bob": bobs}
            await alice.send(Ping())
            await alice.expect(Pong)  # the connection stays open
        stats = await settled(broker, keys_put_total=1, keys_put_refused_total=2)
        assert stats["key_lookups_total"] == 3


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_lookup_of_unknown_and_invalid_ids_is_simply_absent(broker: Broker, transport: str) -> None:
    record = new_record("carol@example.org")
    with trio.fail_after(TIMEOUT):
        async with session(broker, transport, "carol@example.org") as carol:
            await put(carol, record)
            asked = (
                "nobody",
                "not a mailbox!",
                "",
                "-dash",
                "\U0001f680" * 64,
                "carol@example.org",
                "carol@example.org",
            )
            await carol.send(KeyGet(mailboxes=asked))
            result = await carol.expect(KeyGetResult)
            assert dict(result.keys) == {"carol@example.org": record}
            assert await get(carol, "nobody") == {}
        stats = await settled(broker, keys_put_total=1)
        assert stats["key_lookups_total"] == 3  # distinct mailbox ids looked up: nobody and carol, then nobody


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_answers_come_in_the_order_sent(broker: Broker, transport: str) -> None:
    records = [new_record("alice") for _ in range(3)]
    with trio.fail_after(TIMEOUT):
        async with session(broker, transport, "alice") as alice:
            frames = []
            for record in records:
                frames += [KeyPut(key=record), KeyGet(mailboxes=("alice",))]
            await alice.send(*frames)
            for record in records:
                assert await alice.expect(KeyPutResult) == KeyPutResult(kid=record.kid)
                assert dict((await alice.expect(KeyGetResult)).keys) == {"alice": record}


def key_put_body(**change: object) -> bytes:
    """A KEY_PUT frame on the wire whose record has ``change`` applied (None drops a field)."""
    record: dict[str, object] = {"ik": b"\x01" * 32, "kid": "k1", "ek": b"\x02" * 32, "sig": b"\x03" * 64}
    record.update(change)
    body = cbor2.dumps({"type": "key_put", "key": {k: v for k, v in record.items() if v is not None}})
    return len(body).to_bytes(4, "big") + body


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    "change", [{"ik": b"\x01" * 31}, {"ek": "text"}, {"sig": b"\x03" * 65}, {"kid": "k k"}, {"sig": None}]
)
async def test_a_record_of_the_wrong_shape_is_invalid_field_and_fatal(
    broker: Broker, transport: str, change: dict[str, object]
) -> None:
    with trio.fail_after(TIMEOUT):
        async with session(broker, transport, "alice") as alice:
            await alice.send_raw(key_put_body(**change))  # type: ignore[attr-defined]
            error = await alice.expect(Error)
            assert (error.code, error.close) == (ErrorCode.INVALID_FIELD, True)
            assert "key_put" in error.message
            await alice.expect_closed()  # type: ignore[attr-defined]
        async with session(broker, transport, "bob") as bob:
            assert await get(bob, "alice") == {}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_more_mailboxes_than_max_recipients_is_invalid_field_and_fatal(
    broker_factory: object, transport: str
) -> None:
    with trio.fail_after(TIMEOUT):
        async with broker_factory(max_recipients=3) as broker:  # type: ignore[operator]
            async with session(broker, transport, "alice") as alice:
                assert await get(alice, "a", "b", "a") == {}  # 3 elements (repeats count): fine
                await alice.send(KeyGet(mailboxes=("a", "b", "c", "d")))
                error = await alice.expect(Error)
                assert (error.code, error.close) == (ErrorCode.INVALID_FIELD, True)
                assert "max_recipients (3)" in error.message
                await alice.expect_closed()  # type: ignore[attr-defined]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_operators_may_neither_put_nor_get(broker: Broker, transport: str) -> None:
    record = new_record("admin")
    with trio.fail_after(TIMEOUT):
        async with session(broker, transport, "admin", operator=True) as admin:
            for frame in (KeyPut(key=record), KeyGet(mailboxes=("admin",))):
                await admin.send(frame)
                error = await admin.expect(Error)
                assert (error.code, error.close) == (ErrorCode.FORBIDDEN, False)
                assert error.message == f"{frame.TYPE} needs a mailbox; operator sessions have none"
            await admin.send(Ping())
            await admin.expect(Pong)
        async with session(broker, transport, "bob") as bob:
            assert await get(bob, "admin") == {}


async def test_a_record_expires_key_ttl_s_after_its_latest_put(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Memory store under MockClock (in-memory streams, no sockets): the broker's clock decides. On Redis the
    record's key expiry does: test_a_record_lapses_by_redis_key_expiry."""
    config = BrokerConfig(data_dir=tmp_path, keepalive_s=400 * DAY_S, key_ttl_s=90 * DAY_S)
    broker = Broker(config, clock=trio_clock_ms, store=MemoryStore(config.store_limits))
    first, second = new_record("alice"), new_record("alice")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(broker.sweep_forever)
        alice = await memory_client(broker, nursery, "alice")
        await alice.expect(Drained)
        await put(alice, first)
        await trio.sleep(60 * DAY_S)
        await put(alice, second)  # renews: 90 days from now
        await trio.sleep(89 * DAY_S)
        assert await get(alice, "alice") == {"alice": second}
        await trio.sleep(DAY_S)
        assert await get(alice, "alice") == {}
        await put(alice, first)
        await trio.sleep(91 * DAY_S)  # the hourly sweep has dropped it meanwhile
        assert await get(alice, "alice") == {}
        nursery.cancel_scope.cancel()


@pytest.mark.stores("redis", "redis-cluster")
async def test_a_record_lapses_by_redis_key_expiry(broker_factory: object) -> None:
    """Redis: the record's key expiry (the memory store: test_a_record_expires_key_ttl_s_after_its_latest_put)."""
    record = new_record("alice")
    with trio.fail_after(TIMEOUT):
        async with broker_factory(key_ttl_s=1) as broker:  # type: ignore[operator]
            async with session(broker, "tcp", "alice") as alice:
                await put(alice, record)
                assert await get(alice, "alice") == {"alice": record}
                while await get(alice, "alice"):
                    await trio.sleep(0.1)
