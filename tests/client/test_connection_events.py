"""``on_connection_change``: one frozen ConnectionEvent per change of connection state, against real brokers."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import trio
from relay_testing import BrokerRunner, url_of

from broker.server import Broker
from client import ConnectedElsewhere, ConnectionEvent, ConnectionState, ErrorCode, open_client

TIMEOUT_S = 20
FAST = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05}


async def until_state(events: list[ConnectionEvent], state: ConnectionState) -> ConnectionEvent:
    while not events or events[-1].state is not state:
        await trio.sleep(0.005)
    return events[-1]


async def test_connect_shutdown_restart_and_takeover_are_reported_once_each(tmp_path: Path) -> None:
    events: list[ConnectionEvent] = []
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            runner = BrokerRunner(nursery, tmp_path / "broker-data")
            first = await runner.start()
            url = url_of(first)
            async with open_client(url, first.auth.issue("alice"), e2e=False) as alice:
                await alice.send("bob", b"waiting", id="w1")
            token = first.auth.issue("bob")
            async with open_client(url, token, on_connection_change=events.append, **FAST) as bob:
                assert events == [ConnectionEvent(state=ConnectionState.CONNECTED, url=url, mailbox="bob", pending=1,
                                                  connects=1)]  # fmt: skip
                await runner.stop()
                down = await until_state(events, ConnectionState.DISCONNECTED)
                assert down.code == ErrorCode.SHUTTING_DOWN and (down.mailbox, down.pending) == (None, None)
                second = await runner.start(first.tcp_port or 0)
                up = await until_state(events, ConnectionState.RECONNECTED)
                assert (up.url, up.mailbox, up.pending, up.connects) == (url, "bob", 0, 2)
                async with open_client(url, token):  # takes the mailbox over
                    with pytest.raises(ConnectedElsewhere):
                        async for _ in bob.deliveries():
                            pass  # pragma: no cover
            await runner.stop()
    assert [e.state for e in events] == [
        ConnectionState.CONNECTED,
        ConnectionState.DISCONNECTED,
        ConnectionState.RECONNECTED,
        ConnectionState.STOPPED,
    ]
    stopped = events[-1]
    assert stopped.code == ErrorCode.CONNECTED_ELSEWHERE and isinstance(stopped.reason, ConnectedElsewhere)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stopped.state = ConnectionState.CONNECTED  # type: ignore[misc]
    del second


async def test_a_callback_that_raises_is_logged_and_the_client_keeps_working(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: ConnectionEvent) -> None:
        raise RuntimeError("bug in the callback")

    with trio.fail_after(TIMEOUT_S), caplog.at_level(logging.ERROR, logger="client"):
        async with open_client(
            url_of(broker), broker.auth.issue("alice"), e2e=False, on_connection_change=broken
        ) as alice:
            receipt = await alice.send("bob", b"still works")
    assert receipt.results["bob"].status.value == "queued"
    assert "on_connection_change callback failed" in caplog.text and "bug in the callback" in caplog.text


async def test_a_normal_close_reports_nothing_more(broker: Broker) -> None:
    events: list[ConnectionEvent] = []
    with trio.fail_after(TIMEOUT_S):
        async with open_client(url_of(broker), broker.auth.issue("alice"), on_connection_change=events.append):
            pass
        await trio.sleep(0.05)
    assert [e.state for e in events] == [ConnectionState.CONNECTED]
