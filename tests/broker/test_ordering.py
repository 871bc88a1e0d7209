"""Ordering promises protocol.md makes: PONG is a barrier for earlier frames; DRAINED for every mailbox session only."""

from __future__ import annotations

import pytest
import trio

from broker.server import Broker
from wire import Ack, Deliver, Drained, Ping, Pong, Receipt, Send, Stats, StatsResult

from ..conftest import STORES
from .raw import RawClient

pytestmark = pytest.mark.stores(*STORES)

TIMEOUT = 10


async def test_pong_comes_after_every_earlier_frame_has_been_applied(broker: Broker) -> None:
    """A client confirms its ACKs (which have no answer) with PING: at PONG they have taken effect."""
    with trio.fail_after(TIMEOUT):
        assert broker.tcp_port is not None
        alice, _ = await RawClient.login(broker.tcp_port, broker.auth.issue("alice"))
        await alice.expect(Drained)
        ids = tuple(f"m{i}" for i in range(50))
        await alice.send(*[Send(id=i, to=("bob",), body=b"x") for i in ids], Ping())
        for _ in ids:
            await alice.expect(Receipt)  # every RECEIPT before the PONG
        await alice.expect(Pong)
        bob, welcome = await RawClient.login(broker.tcp_port, broker.auth.issue("bob"))
        assert welcome.pending == len(ids)
        for _ in ids:
            await bob.expect(Deliver)
        await bob.expect(Drained)
        await bob.send(Ack(ids=ids[:30]), Ack(ids=ids[30:]), Ping())
        await bob.expect(Pong)
        assert await broker.store.pending("bob", broker.clock()) == 0  # no wait: the ACKs were applied before the PONG


async def test_drained_comes_for_an_empty_mailbox_and_never_to_an_operator(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT):
        assert broker.tcp_port is not None
        carol, welcome = await RawClient.login(broker.tcp_port, broker.auth.issue("carol"))
        assert welcome.pending == 0
        assert (await carol.expect(Drained)).pending == 0
        ops, _ = await RawClient.login(broker.tcp_port, broker.auth.issue("ops", operator=True))
        await ops.send(Stats(), Ping())
        assert [type(await ops.next()), type(await ops.next())] == [StatsResult, Pong]  # no DRAINED before them
