"""The Python client's token refresh (``refresh_token``, protocol.md rule 22) against real brokers on loopback.

The brokers run with ``token_leeway_s`` 0 and the tokens live a few seconds, so a session's expiry comes in real
time; each test waits on the client's state or callbacks, never on a duration, for what it checks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from broker.server import Broker
from client import AuthenticationError, ConnectionEvent, ConnectionState, open_client
from tests.broker.issuers import expiring_token as token
from tests.conftest import running_broker
from wire import ErrorCode

TIMEOUT_S = 20


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Broker]:
    async with running_broker(tmp_path, token_leeway_s=0) as b:
        yield b


@pytest.fixture(params=["tcp", "ws"])
def url(request: pytest.FixtureRequest, broker: Broker) -> str:
    if request.param == "tcp":
        return f"tcp://127.0.0.1:{broker.tcp_port}"
    return f"ws://127.0.0.1:{broker.ws_port}/relay"


class Issuer:
    """The application's ``refresh_token``: counts its calls; ``plan`` gives, per call, what to do."""

    def __init__(self, broker: Broker, name: str, seconds: float) -> None:
        self.broker, self.name, self.seconds = broker, name, seconds
        self.calls = 0
        self.plan: dict[int, Callable[[], Awaitable[str]]] = {}
        self.called = trio.Event()

    async def __call__(self) -> str:
        self.calls += 1
        self.called.set()
        self.called = trio.Event()
        step = self.plan.get(self.calls)
        if step is not None:
            return await step()
        return token(self.broker, self.name, self.seconds)

    async def wait_calls(self, n: int) -> None:
        while self.calls < n:
            await self.called.wait()


async def test_a_client_with_refresh_token_keeps_one_session_across_token_lifetimes(broker: Broker, url: str) -> None:
    issuer = Issuer(broker, "bob", 2)
    with trio.fail_after(TIMEOUT_S):
        async with open_client(url, token(broker, "bob", 2), refresh_token=issuer, e2e=False) as bob:
            first = bob.welcome
            assert first is not None and first.expires_in_s == 1
            await issuer.wait_calls(3)  # three refreshes: the session outlived three tokens
            await bob.send("bob", b"still here")
            got = await anext(bob.deliveries())
            assert got.body == b"still here"
            bob.ack(got.id)
            assert bob.connects == 1
    stats = await broker.statistics()
    assert stats["sessions_expired_total"] == 0 and stats["tokens_refreshed_total"] >= 3


async def test_without_refresh_token_the_client_stops_when_its_token_expires(broker: Broker, url: str) -> None:
    events: list[ConnectionEvent] = []
    with trio.fail_after(TIMEOUT_S):
        async with open_client(url, token(broker, "bob", 1.5), e2e=False, on_connection_change=events.append) as bob:
            while not any(e.state is ConnectionState.STOPPED for e in events):
                await trio.sleep(0.05)
            with pytest.raises(AuthenticationError) as info:
                await bob.send("bob", b"too late")
            assert info.value.code == ErrorCode.TOKEN_EXPIRED
    assert [e.state for e in events] == [ConnectionState.CONNECTED, ConnectionState.STOPPED]
    assert events[-1].code == ErrorCode.TOKEN_EXPIRED


async def test_a_refresh_token_that_fails_is_asked_again_before_the_session_ends(broker: Broker, url: str) -> None:
    issuer = Issuer(broker, "bob", 60)

    async def fails() -> str:
        raise RuntimeError("the issuer is down for a moment")

    issuer.plan[1] = fails
    with trio.fail_after(TIMEOUT_S):
        async with open_client(url, token(broker, "bob", 3), refresh_token=issuer, e2e=False) as bob:
            await issuer.wait_calls(2)
            while (await broker.statistics())["tokens_refreshed_total"] < 1:
                await trio.sleep(0.05)
            await bob.send("bob", b"after the retry")
            assert (await anext(bob.deliveries())).body == b"after the retry"
            assert bob.connects == 1
    assert (await broker.statistics())["sessions_expired_total"] == 0


async def test_a_session_that_expired_anyway_reconnects_with_a_new_token(broker: Broker, url: str) -> None:
    """The application's issuer answers too late: the broker ends the session (2002), the client asks again and
    reconnects; a message sent meanwhile by another client is delivered on the new session."""
    issuer = Issuer(broker, "bob", 60)
    events: list[ConnectionEvent] = []

    async def too_slow() -> str:
        await trio.sleep_forever()  # cancelled with the link when the session ends
        raise AssertionError

    issuer.plan[1] = too_slow
    with trio.fail_after(TIMEOUT_S):
        async with open_client(
            url,
            token(broker, "bob", 1.5),
            refresh_token=issuer,
            e2e=False,
            on_connection_change=events.append,
            backoff_initial_s=0.01,
            backoff_max_s=0.05,
        ) as bob:
            while bob.connects < 2:
                await trio.sleep(0.05)
            async with open_client(url, token(broker, "alice", 60), e2e=False) as alice:
                await alice.send("bob", b"for the new session")
            got = await anext(bob.deliveries())
            assert got.body == b"for the new session"
            bob.ack(got.id)
    assert [e.state for e in events] == [
        ConnectionState.CONNECTED,
        ConnectionState.DISCONNECTED,
        ConnectionState.RECONNECTED,
    ]
    assert events[1].code == ErrorCode.TOKEN_EXPIRED
    assert (await broker.statistics())["sessions_expired_total"] == 1


async def test_a_refreshed_token_for_another_mailbox_stops_the_client(broker: Broker, url: str) -> None:
    issuer = Issuer(broker, "carol", 60)
    events: list[ConnectionEvent] = []
    with trio.fail_after(TIMEOUT_S):
        async with open_client(
            url, token(broker, "bob", 2), refresh_token=issuer, e2e=False, on_connection_change=events.append
        ) as bob:
            while not any(e.state is ConnectionState.STOPPED for e in events):
                await trio.sleep(0.05)
            with pytest.raises(AuthenticationError) as info:
                await bob.send("bob", b"x")
            assert info.value.code == ErrorCode.TOKEN_MISMATCH
    assert events[-1].code == ErrorCode.TOKEN_MISMATCH


@pytest.mark.parametrize("bad", [None, "", 42])
async def test_refresh_token_must_return_a_token(broker: Broker, bad: Any) -> None:
    """A callback returning something that is not a token counts as a failed call: asked again, and meanwhile the
    session ends (2002) as it would without a callback; the client goes on trying to reconnect."""
    calls = 0

    async def broken() -> Any:
        nonlocal calls
        calls += 1
        return bad

    events: list[ConnectionEvent] = []
    with trio.fail_after(TIMEOUT_S):
        async with open_client(
            f"tcp://127.0.0.1:{broker.tcp_port}",
            token(broker, "bob", 1.5),
            refresh_token=broken,
            e2e=False,
            on_connection_change=events.append,
            backoff_initial_s=0.01,
            backoff_max_s=0.05,
        ) as bob:
            while not events[1:]:
                await trio.sleep(0.05)
            at_disconnect = calls
            while calls < at_disconnect + 2:  # asked again before each reconnect attempt, which waits for a token
                await trio.sleep(0.05)
            assert not bob.connected and bob.connects == 1
    assert [e.state for e in events][:2] == [ConnectionState.CONNECTED, ConnectionState.DISCONNECTED]
    assert events[1].code == ErrorCode.TOKEN_EXPIRED
