"""Delivery statuses across two broker nodes over one Redis (standalone and Cluster).

A sender on one node hears what became of its message from a recipient on the other: the
status is queued in Redis by the recipient's node and the sender's session is woken over
the sender's node's pub/sub channel (a status wake, its own kind), or gets it at its next
connect on either node. Real TCP and WebSocket; each step waits for its outcome.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from wire import Ack, Bye, Deliver, Drained, Ping, Pong, Receipt, ReportState, Send, StatusAck, StatusReport

from ..websocket.wsclient import login_ws
from .test_nodes import login, nodes

pytestmark = pytest.mark.stores("redis", "redis-cluster")

TIMEOUT = 20


def send(mid: str, *to: str, ttl_s: int | None = None) -> Send:
    return Send(id=mid, to=to, body=b"x", ttl_s=ttl_s, notify=True)


async def test_an_online_sender_hears_from_a_recipient_on_another_node(
    tmp_path: Path, store_settings: dict[str, Any]
) -> None:
    async with nodes(tmp_path, store_settings) as (a, b):
        with trio.fail_after(TIMEOUT):
            async with login_ws(b.ws_port, b.auth.issue("bob")) as (bob, _):
                await bob.expect(Drained)
                alice, _ = await login(a, "alice")
                await alice.expect(Drained)
                await alice.send(send("m1", "bob"))
                assert (await bob.expect(Deliver)).id == "m1"
                await bob.send(Ack(ids=("m1",)))
                # A status may overtake its receipt across nodes (rule 19): either order is right.
                receipt, status = await alice.expect_each(Receipt, StatusReport)
                assert isinstance(receipt, Receipt) and isinstance(status, StatusReport)
                assert (status.state, status.id, status.recipient) == (ReportState.DELIVERED, "m1", "bob")
                await alice.send(StatusAck(seqs=(status.seq,)), Ping())
                await alice.expect(Pong)
                while (await b.statistics())["statuses_held"] != 0:
                    await trio.sleep(0.05)  # the relay's figures reach Redis within about a second
                assert (await a.statistics())["statuses_delivered_total"] == 1


async def test_an_offline_sender_gets_its_statuses_on_whichever_node_it_connects_to(
    tmp_path: Path, store_settings: dict[str, Any]
) -> None:
    async with nodes(tmp_path, store_settings) as (a, b):
        with trio.fail_after(TIMEOUT):
            alice, _ = await login(a, "alice")
            await alice.expect(Drained)
            await alice.send(send("m1", "bob"), send("brief", "bob", ttl_s=1))
            await alice.expect(Receipt)
            await alice.expect(Receipt)
            await alice.send(Bye())
            await alice.expect_closed()
            while len(await b.pending_messages("bob", 10)) > 1:
                await trio.sleep(0.05)  # "brief" has expired
            assert await b.cleanup() == 1  # the sweep on node b: "expired" for alice
            bob, _ = await login(b, "bob")
            assert (await bob.expect(Deliver)).id == "m1"
            await bob.expect(Drained)
            await bob.send(Ack(ids=("m1",)), Ping())
            await bob.expect(Pong)
            alice, pending = await login(b, "alice")
            assert pending == 0  # statuses are not messages
            before, first = await alice.until(StatusReport)
            assert before == [Drained(pending=0)]
            second = await alice.expect(StatusReport)
            assert [(s.state, s.id) for s in (first, second)] == [
                (ReportState.EXPIRED, "brief"),
                (ReportState.DELIVERED, "m1"),
            ]
            await alice.send(StatusAck(seqs=(first.seq,)), Ping())  # one ACKed on node b ...
            await alice.expect(Pong)
            alice_a, _ = await login(a, "alice")  # ... the other comes again on node a
            before, again = await alice_a.until(StatusReport)
            assert before == [Drained(pending=0)] and again == second
