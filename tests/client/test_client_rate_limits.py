"""The Python client and the broker's abuse limits (protocol.md rule 21): RateLimited and its retry hint."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio
from relay_testing import url_of

from client import ConnectionEvent, ConnectionState, RateLimited, SessionEnded, open_client
from client.errors import error_from_code, is_fatal
from wire import ErrorCode

TIMEOUT_S = 20
FAST = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05}


def test_error_4006_is_rate_limited_with_its_hint_in_seconds_and_not_fatal() -> None:
    error = error_from_code(4006, "too fast", 1500)
    assert isinstance(error, RateLimited) and isinstance(error, SessionEnded)
    assert (error.code, error.retry_after_s) == (ErrorCode.CONNECTION_RATE_LIMITED, 1.5)
    assert error_from_code(4006, "too fast").retry_after_s == 0.0
    assert not is_fatal(4006) and not is_fatal(4007)
    assert type(error_from_code(4007, "too many")) is SessionEnded


async def test_a_rate_limited_first_connect_raises_rate_limited(broker_factory: Callable[..., Any]) -> None:
    async with broker_factory(rate_exempt_networks=(), address_hellos_burst=1, address_hellos_per_s=0.001) as broker:
        with trio.fail_after(TIMEOUT_S):
            async with open_client(url_of(broker), broker.auth.issue("alice"), e2e=False):
                with pytest.raises(RateLimited) as caught:
                    async with open_client(url_of(broker), broker.auth.issue("bob"), e2e=False):
                        pass
    assert caught.value.retry_after_s > 900  # a token per 1,000 s


async def test_a_reconnect_refused_with_4006_waits_for_the_hint_instead_of_hammering(
    broker_factory: Callable[..., Any],
) -> None:
    """With a backoff of 10-50 ms and a HELLO token every 0.5 s, a client that ignored the hint would be refused
    about ten times before it got in; one that waits for it is refused once at most."""
    settings = {"rate_exempt_networks": (), "address_hellos_burst": 1, "address_hellos_per_s": 2.0}
    async with broker_factory(**settings) as broker:
        events: list[ConnectionEvent] = []
        with trio.fail_after(TIMEOUT_S):
            async with open_client(
                url_of(broker), broker.auth.issue("alice"), e2e=False, on_connection_change=events.append, **FAST
            ):
                (session,) = broker.sessions
                session.close(ErrorCode.KEEPALIVE_TIMEOUT, "kicked by the test")
                while not any(e.state is ConnectionState.RECONNECTED for e in events):
                    await trio.sleep(0.01)
            assert (await broker.statistics())["rate_limited_hellos_total"] <= 1
