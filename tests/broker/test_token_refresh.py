"""A session lasts as long as its token, unless REFRESH brings a newer one (protocol.md section 4, rule 22).

Real brokers on loopback over TCP and WebSocket, with ``token_leeway_s`` 0 and tokens that live a few seconds
(``exp`` a fraction of a second apart where it matters): the expiry is the broker's wall clock, so these tests take
real seconds, and each waits on frames (never on a duration) for what it checks.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio

from broker.server import Broker
from tests.conftest import STORES, running_broker
from wire import (
    Ack,
    Deliver,
    Drained,
    Error,
    ErrorCode,
    Frame,
    Ping,
    Pong,
    Receipt,
    Refresh,
    Refreshed,
    Send,
    Stats,
    StatsResult,
    Welcome,
)

from ..websocket.wsclient import open_ws
from .issuers import expiring_token as token
from .raw import FrameClient, RawClient

pytestmark = pytest.mark.stores(*STORES)

TIMEOUT_S = 20
TRANSPORTS = ("tcp", "ws")


@pytest.fixture
async def broker(tmp_path: Path, store_settings: dict[str, Any]) -> AsyncIterator[Broker]:
    """No leeway: a token ends its session at its ``exp``."""
    async with running_broker(tmp_path, token_leeway_s=0, **store_settings) as b:
        yield b


@asynccontextmanager
async def connected(broker: Broker, transport: str) -> AsyncIterator[FrameClient]:
    if transport == "tcp":
        assert broker.tcp_port is not None
        client = await RawClient.open(broker.tcp_port)
        try:
            yield client
        finally:
            await client.aclose()
    else:
        async with open_ws(broker.ws_port) as ws:
            yield ws


async def login(client: FrameClient, tok: str) -> tuple[Welcome, list[Frame]]:
    """HELLO, WELCOME, and for a mailbox session what it delivers up to DRAINED (those frames returned)."""
    welcome = await client.hello(tok)
    if welcome.mailbox is None:
        return welcome, []
    before, _ = await client.until(Drained)
    return welcome, before


async def closing_error(client: FrameClient) -> Error:
    """Frames up to the broker's closing ERROR (PONGs and the like are skipped); then the broker closes."""
    while True:
        frame = await client.next()
        if isinstance(frame, Error) and frame.close:
            return frame


async def alive(client: FrameClient) -> list[Frame]:
    """PING and wait for the PONG: the session is still open. The frames that came before the PONG."""
    await client.send(Ping())
    before, _ = await client.until(Pong)
    return before


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_session_ends_with_2002_when_its_token_expires(broker: Broker, transport: str) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with connected(broker, transport) as bob:
            welcome, _ = await login(bob, token(broker, "bob", 1.5))
            assert welcome.expires_in_s == 1  # 1.5 s, rounded down
            await alive(bob)
            error = await closing_error(bob)
            assert error.code == ErrorCode.TOKEN_EXPIRED
            with pytest.raises(EOFError):
                await bob.next()
            stats = await broker.statistics()
            assert stats["sessions_expired_total"] == 1 and stats["tokens_refreshed_total"] == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_refresh_keeps_the_session_past_the_first_tokens_expiry(broker: Broker, transport: str) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with connected(broker, transport) as bob:
            first = token(broker, "bob", 1.5)
            await login(bob, first)
            await bob.send(Refresh(token=token(broker, "bob", 3600.5)))
            refreshed = await bob.expect(Refreshed)
            assert refreshed.expires_in_s == 3600
            # Past the first token's exp, the session still answers, and still works as a mailbox session.
            while time.time() < jwt.decode(first, options={"verify_signature": False})["exp"] + 0.5:
                await alive(bob)
                await trio.sleep(0.2)
            await bob.send(Send(id="m1", to=("bob",), body=b"to myself"))
            _, deliver = await bob.expect_each(Receipt, Deliver)
            assert isinstance(deliver, Deliver) and deliver.id == "m1"
            await bob.send(Ack(ids=("m1",)))
            await alive(bob)
        stats = await broker.statistics()
        assert (stats["tokens_refreshed_total"], stats["sessions_expired_total"]) == (1, 0)
        assert stats["messages_total"] == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_the_refreshed_token_governs_even_when_it_expires_sooner(broker: Broker, transport: str) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with connected(broker, transport) as bob:
            welcome, _ = await login(bob, token(broker, "bob", 3600.5))
            assert welcome.expires_in_s == 3600
            await bob.send(Refresh(token=token(broker, "bob", 1.5)))
            assert (await bob.expect(Refreshed)).expires_in_s == 1
            assert (await closing_error(bob)).code == ErrorCode.TOKEN_EXPIRED


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_refresh_answers_in_order_and_refreshes_again(broker: Broker, transport: str) -> None:
    """REFRESHED comes after the answers to the frames before the REFRESH, before those of the frames after it."""
    with trio.fail_after(TIMEOUT_S):
        async with connected(broker, transport) as alice:
            await login(alice, token(broker, "alice", 60))
            await alice.send(
                Send(id="a1", to=("bob",), body=b"1"),
                Refresh(token=token(broker, "alice", 120.5)),
                Send(id="a2", to=("bob",), body=b"2"),
                Refresh(token=token(broker, "alice", 240.5)),
                Ping(),
            )
            frames = [await alice.next() for _ in range(5)]
            assert [(type(f).__name__, getattr(f, "id", getattr(f, "expires_in_s", None))) for f in frames] == [
                ("Receipt", "a1"),
                ("Refreshed", 120),
                ("Receipt", "a2"),
                ("Refreshed", 240),
                ("Pong", None),
            ]
        assert (await broker.statistics())["tokens_refreshed_total"] == 2


@pytest.mark.stores("memory")  # the token is judged before any store is asked
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    ("kind", "code"),
    [
        ("garbage", ErrorCode.INVALID_TOKEN),
        ("forged", ErrorCode.INVALID_TOKEN),
        ("expired", ErrorCode.TOKEN_EXPIRED),
        ("other mailbox", ErrorCode.TOKEN_MISMATCH),
        ("operator", ErrorCode.TOKEN_MISMATCH),
    ],
)
async def test_a_refused_refresh_ends_the_session_with_its_code(
    broker: Broker, transport: str, kind: str, code: ErrorCode
) -> None:
    new = {
        "garbage": lambda: "not-a-jwt",
        "forged": lambda: jwt.encode({"sub": "bob", "aud": "relay", "exp": time.time() + 60}, b"f" * 32),
        "expired": lambda: token(broker, "bob", -1),
        "other mailbox": lambda: token(broker, "carol", 60),
        "operator": lambda: token(broker, "bob", 60, operator=True),
    }[kind]()
    with trio.fail_after(TIMEOUT_S):
        async with connected(broker, transport) as bob:
            await login(bob, token(broker, "bob", 60))
            await bob.send(Refresh(token=new))
            error = await bob.expect(Error)
            assert (error.code, error.close) == (code, True)
            assert error.message.startswith("refresh: ")
            with pytest.raises(EOFError):
                await bob.next()
        assert (await broker.statistics())["tokens_refreshed_total"] == 0


@pytest.mark.stores("memory")
async def test_an_operator_session_refreshes_with_an_operator_token_only(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with connected(broker, "tcp") as op:
            welcome = await op.hello(token(broker, "ops", 2.5, operator=True))
            assert welcome.mailbox is None and welcome.expires_in_s == 2
            await op.send(Refresh(token=token(broker, "ops", 600.5, operator=True)), Stats())
            assert (await op.expect(Refreshed)).expires_in_s == 600
            await op.expect(StatsResult)
            await op.send(Refresh(token=token(broker, "ops", 600)))  # a mailbox token named like the operator
            error = await op.expect(Error)
            assert (error.code, error.close) == (ErrorCode.TOKEN_MISMATCH, True)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_deliveries_unacked_at_expiry_are_delivered_again_on_the_next_session(
    broker: Broker, transport: str
) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with connected(broker, "tcp") as alice:
            await login(alice, token(broker, "alice", 60))
            await alice.send(*(Send(id=f"m{i}", to=("bob",), body=b"x") for i in range(3)))
            for _ in range(3):
                await alice.expect(Receipt)
        async with connected(broker, transport) as bob:
            _, got = await login(bob, token(broker, "bob", 1.5))
            assert [(type(d), getattr(d, "attempt", None)) for d in got] == [(Deliver, 1)] * 3
            assert (await closing_error(bob)).code == ErrorCode.TOKEN_EXPIRED  # no ACK was sent
        async with connected(broker, transport) as bob:
            welcome, again = await login(bob, token(broker, "bob", 60))
            assert welcome.pending == 3
            assert sorted((f.id, f.attempt) for f in again if isinstance(f, Deliver)) == [
                ("m0", 2),
                ("m1", 2),
                ("m2", 2),
            ]
            assert len(again) == 3
