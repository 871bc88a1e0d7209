"""A session over a store that cannot be reached for some calls (protocol.md section 9, rule 18).

The store is the in-memory one with chosen calls failing as a Redis store's do (OSError),
so each rule is checked exactly: ACKs kept and applied once the store answers (bounded),
a PULL completed later, deliveries resumed on the same connection, STATS answered with
the node's figures. Real TCP connections; each step waits for its outcome (fail_after).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

import trio

from broker.server import Broker
from broker.store.base import AckResult, Batch, Claim, NewMessage, Outcome
from broker.store.memory import MemoryStore
from wire import (
    Ack,
    Deliver,
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
    Pull,
    Send,
    Stats,
    StatsResult,
)
from wire.e2e import EncryptionKey, Identity, make_key_record

from ..conftest import running_broker
from .raw import RawClient

TIMEOUT = 20


class PartlyUnreachableStore(MemoryStore):
    """The in-memory store, except that the calls named in ``failing`` raise OSError. Not ``synchronous``
    (calls that can fail are a networked store's): pumps run in their mailbox tasks, as over Redis."""

    synchronous = False

    def __init__(self) -> None:
        super().__init__()
        self.failing: set[str] = set()

    def _check(self, call: str) -> None:
        if call in self.failing:
            raise ConnectionError(f"{call}: the store cannot be reached")

    async def enqueue_many(self, messages: Sequence[NewMessage], now_ms: int) -> list[list[Outcome]]:
        self._check("enqueue")
        return await super().enqueue_many(messages, now_ms)

    async def ack_many(self, mailbox: str, ids: Sequence[str], now_ms: int) -> AckResult:
        self._check("ack")
        return await super().ack_many(mailbox, ids, now_ms)

    async def fetch_many(self, mailbox: str, claim: Claim, limit: int, max_bytes: int, now_ms: int) -> Batch:
        self._check("fetch")
        return await super().fetch_many(mailbox, claim, limit, max_bytes, now_ms)

    async def release(self, mailbox: str, claim: Claim, unwritten: Collection[str] = ()) -> int:
        self._check("release")
        return await super().release(mailbox, claim, unwritten)

    async def put_key(self, mailbox: str, record: KeyRecord, now_ms: int, ttl_ms: int) -> None:
        self._check("put_key")
        await super().put_key(mailbox, record, now_ms, ttl_ms)

    async def get_keys(self, mailboxes: Sequence[str], now_ms: int) -> dict[str, KeyRecord]:
        self._check("get_keys")
        return await super().get_keys(mailboxes, now_ms)


async def login(broker: Broker, name: str, *, operator: bool = False) -> RawClient:
    assert broker.tcp_port is not None
    client, _ = await RawClient.login(broker.tcp_port, broker.auth.issue(name, operator=operator))
    return client


async def held(broker: Broker, mailbox: str) -> list[str]:
    return [m.id for m in await broker.pending_messages(mailbox, 100)]


async def test_acks_the_store_did_not_take_are_kept_bounded_and_applied_once_it_answers(tmp_path: Path) -> None:
    store = PartlyUnreachableStore()
    async with running_broker(tmp_path, inject_store=store, max_inflight=2) as broker:
        with trio.fail_after(TIMEOUT):
            await broker.route("alice", [Send(id=i, to=("bob",), body=b"x") for i in ("m1", "m2")])
            bob = await login(broker, "bob")
            frames, _ = await bob.until(Drained)
            assert [f.id for f in frames if isinstance(f, Deliver)] == ["m1", "m2"]
            store.failing.add("ack")
            await bob.send(Ack(ids=("m1",)), Ack(ids=("m2",)))  # one batch: kept
            await bob.send(Ping())
            await bob.expect(Pong)  # answered at once (rule 18)
            await bob.send(Ack(ids=("x3",)))  # three ids kept, two allowed: m1 (the oldest) is let go
            await bob.send(Ping())
            await bob.expect(Pong)
            assert await held(broker, "bob") == ["m1", "m2"]
            assert broker.health.errors >= 2 and not broker.health.available
            store.failing.clear()
            while await held(broker, "bob") != ["m1"]:
                await trio.sleep(0.02)  # the session's retry once the store answers
            await bob.send(Ping())
            await bob.expect(Pong)
            assert await held(broker, "bob") == ["m1"], "let go: delivered again later, ACKed again then"


async def test_a_pull_and_deliveries_wait_for_the_store_and_resume_on_the_same_connection(tmp_path: Path) -> None:
    store = PartlyUnreachableStore()
    async with running_broker(tmp_path, inject_store=store) as broker:
        with trio.fail_after(TIMEOUT):
            await broker.route("alice", [Send(id="m1", to=("bob",), body=b"x")])
            bob = await login(broker, "bob")
            assert (await bob.expect(Deliver)).id == "m1"
            await bob.expect(Drained)
            ops = await login(broker, "ops", operator=True)
            store.failing |= {"release", "fetch"}
            await bob.send(Pull())
            await broker.route("alice", [Send(id="m2", to=("bob",), body=b"y")])  # wakes bob: its fetch fails
            await bob.send(Ping())
            await bob.expect(Pong)
            await ops.send(Stats())
            stats = (await ops.expect(StatsResult)).stats
            assert stats["store_errors_total"] >= 2
            store.failing.clear()
            frames, drained = await bob.until(Drained)  # the PULL, completed: m1 again, and m2
            assert [(f.id, f.attempt) for f in frames if isinstance(f, Deliver)] == [("m1", 2), ("m2", 1)]
            assert drained.pending == 2
            await bob.send(Ack(ids=("m1", "m2")), Ping())
            await bob.expect(Pong)
            assert await held(broker, "bob") == []


async def test_a_key_put_the_store_did_not_take_is_3008_and_a_key_get_ends_the_session_with_5002(
    tmp_path: Path,
) -> None:
    store = PartlyUnreachableStore()
    record = make_key_record("alice", Identity.generate(), EncryptionKey.generate())
    async with running_broker(tmp_path, inject_store=store) as broker:
        with trio.fail_after(TIMEOUT):
            alice = await login(broker, "alice")
            await alice.expect(Drained)
            store.failing.add("put_key")
            await alice.send(KeyPut(key=record))
            assert await alice.expect(KeyPutResult) == KeyPutResult(
                kid=record.kid, code=int(ErrorCode.STORE_UNREACHABLE)
            )
            await alice.send(KeyGet(mailboxes=("alice",)))
            assert dict((await alice.expect(KeyGetResult)).keys) == {}  # nothing was stored
            store.failing = {"get_keys"}
            await alice.send(KeyPut(key=record))
            assert (await alice.expect(KeyPutResult)).code is None  # the store answers again: stored
            await alice.send(KeyGet(mailboxes=("alice",)))
            error = await alice.expect(Error)
            assert (error.code, error.close) == (ErrorCode.STORE_UNAVAILABLE, True)
            await alice.expect_closed()
            store.failing.clear()
            assert (await broker.statistics())["keys_put_total"] == 1
