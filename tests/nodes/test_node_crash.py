"""A broker node SIGKILLed mid-conversation: nothing Redis acknowledged is lost (issue 10, protocol.md 9.17).

Each test runs two real broker processes (``python -m broker serve``, tests/broker/process.py), A
and B, over one Redis or Redis Cluster with one key prefix and one data dir (so one token
secret), with a short presence lease. It talks to them over real TCP, kills A with SIGKILL
(no shutdown of any kind: its sessions, leases and unflushed counters die with it) and carries
on through B. What must hold afterwards:

- every message whose RECEIPT said queued or delivered reaches its recipient, on B;
- a message A had delivered but not seen ACKed is delivered again with ``attempt`` > 1, and the
  recipient's local store holds exactly one copy of everything, however the crash fell between
  saving and ACKing;
- a sender whose SENDs were in flight on A resends them to B with the same ids: each is stored
  once (those A had stored are "duplicate"), none is lost;
- right after the crash a HELLO on B takes the mailbox over without waiting for A (nobody hears
  the kick), and A's mailboxes count as connected only until its lease runs out.

Relay-wide STATS figures are not used to judge what is held: a killed node's unflushed counter
changes are lost (broker/store/redis.py, "Statistics"); a fresh HELLO's ``pending`` is exact.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from broker.auth import Authenticator, load_or_create_secret
from broker.presence import TAKEOVER_WAIT_S
from client import ConnectionLost, LocalStore, OutgoingMessage, Receipt, Status, open_client
from client.localstore import IncomingMessage
from wire import Deliver, Drained, Send

from ..broker.process import start_broker_process
from ..broker.raw import RawClient
from ..client.relay_testing import FaultyNetwork

pytestmark = pytest.mark.stores("redis", "redis-cluster")

TIMEOUT_S = 10
LEASE_S = 1.0
"""Presence lease of every node here: after a crash, its mailboxes count as connected for at most this long."""
MAX_INFLIGHT = 100
"""A small delivery window, so a backlog stays partly queued while the rest is in flight."""


@dataclass
class Node:
    name: str
    process: trio.Process
    tcp_port: int

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.tcp_port}"

    async def kill(self) -> None:
        """SIGKILL, and wait until the process is gone (its sockets closed by the kernel)."""
        self.process.kill()
        await self.process.wait()


@asynccontextmanager
async def node_processes(
    tmp_path: Path, store_settings: dict[str, Any], names: Sequence[str] = ("a", "b")
) -> AsyncIterator[tuple[Authenticator, list[Node]]]:
    """Broker processes of one relay (same Redis, prefix and secret), killed and reaped at the end."""
    data_dir = tmp_path / "data"
    auth = Authenticator(load_or_create_secret(data_dir))  # before any node, so all read this one
    settings = ["--store", store_settings["store"], "--store-prefix", store_settings["store_prefix"]]
    settings += ["--presence-lease-s", str(LEASE_S), "--max-inflight", str(MAX_INFLIGHT)]
    async with AsyncExitStack() as stack:
        nodes = []
        for name in names:
            log = tmp_path / f"node-{name}.log"
            process, tcp_port, _ = await start_broker_process(data_dir, log, *settings, "--node-id", name)
            stack.push_async_callback(_reap, process)
            nodes.append(Node(name, process, tcp_port))
        yield auth, nodes


async def _reap(process: trio.Process) -> None:
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.kill()
        await process.wait()


async def pending_of(node: Node, token: str) -> int:
    """The mailbox's un-ACKed messages, from a fresh HELLO on ``node`` (exact, unlike relay-wide STATS)."""
    client, welcome = await RawClient.login(node.tcp_port, token)
    await client.aclose()
    return welcome.pending


def incoming_rows(path: Path, mailbox: str) -> list[tuple[str, str]]:
    """(sender, id) of every incoming row of ``mailbox`` in a local store file, read with plain sqlite3."""
    with sqlite3.connect(path) as db:
        query = "SELECT sender, id FROM messages WHERE mailbox = ? AND direction = 'in' ORDER BY seq"
        return [(str(s), str(i)) for s, i in db.execute(query, (mailbox,))]


class StallingStore(LocalStore):
    """A local store that, once ``limit`` messages are saved, saves (commits) the next batch and then hangs
    before returning, so that batch is saved but never ACKed and what follows is delivered but never saved:
    the state a client is in when the node under it dies. :meth:`unstall` lets the hung save return."""

    def __init__(self, path: Path, limit: int) -> None:
        super().__init__(path)
        self.limit = limit
        self.saved_ids: list[str] = []
        self.acked_at_most = 0
        """How many messages were saved before the hung batch (the only ones whose ACK can have gone out)."""
        self.stalled = trio.Event()
        self._release = threading.Event()

    def save_incoming(self, mailbox: str, messages: Sequence[IncomingMessage]) -> list[bool]:
        result = super().save_incoming(mailbox, messages)
        if len(self.saved_ids) >= self.limit and not self.stalled.is_set():
            self.acked_at_most = len(self.saved_ids)
            self.saved_ids += [m.id for m in messages]
            trio.from_thread.run_sync(self.stalled.set)
            self._release.wait(TIMEOUT_S)
        else:
            self.saved_ids += [m.id for m in messages]
        return result

    def unstall(self) -> None:
        self._release.set()


async def until_quiet(network: FaultyNetwork, most: int) -> None:
    """Wait until the client has received ``most`` DELIVERs, or none more for 0.3 s (the node sent what it will)."""
    while (seen := len(network.received_of(Deliver))) < most:
        await trio.sleep(0.3)
        if len(network.received_of(Deliver)) == seen:
            return


def body(mid: str) -> bytes:
    """4 KiB, so a window of deliveries takes several reads and the client saves it in several batches."""
    return mid.encode().ljust(4096, b".")


def statuses(receipts: Sequence[Receipt], to: str) -> set[Status]:
    return {r.results[to].status for r in receipts}


async def test_a_recipient_on_a_killed_node_gets_everything_on_another_once(
    tmp_path: Path, store_settings: dict[str, Any]
) -> None:
    """500 messages to bob, who is on node A with a local store: some saved and ACKed, one batch saved but
    not ACKed, usually some delivered but not saved, the rest queued, when A is SIGKILLed. On node B, with the same
    store file, bob gets the rest: each message saved exactly once, the redelivered ones with attempt > 1,
    and the relay holds nothing for him at the end."""
    n = 500
    ids = [f"m{i:03}" for i in range(n)]
    path = tmp_path / "bob.sqlite3"
    async with node_processes(tmp_path, store_settings) as (auth, (a, b)):
        with trio.fail_after(TIMEOUT_S):
            bob_token = auth.issue("bob")
            async with open_client(b.url, auth.issue("alice"), e2e=False) as alice:
                # Half while bob is offline (queued), half while he is on node A (delivered).
                early = await alice.send_batch([OutgoingMessage("bob", body(i), id=i) for i in ids[:250]])
                assert statuses(early, "bob") == {Status.QUEUED}
                first_network = FaultyNetwork()
                store = StallingStore(path, limit=150)
                try:
                    async with open_client(
                        a.url, bob_token, local_store=store, reconnect=False, transport_factory=first_network
                    ) as bob:
                        late = await alice.send_batch([OutgoingMessage("bob", body(i), id=i) for i in ids[250:]])
                        assert statuses(late, "bob") == {Status.DELIVERED}
                        await store.stalled.wait()
                        await until_quiet(first_network, store.acked_at_most + MAX_INFLIGHT)
                        await a.kill()
                        while bob.connected:
                            await trio.sleep(0.01)
                        store.unstall()
                finally:
                    store.unstall()
                    store.close()
            first_deliveries = {f.id for f in first_network.received_of(Deliver)}
            saved_on_a = store.saved_ids
            # A fetched oldest first and at most its window beyond the ACKs it had: the rest was only ever queued.
            never_fetched = ids[store.acked_at_most + MAX_INFLIGHT :]
            assert len(first_deliveries) < n and not first_deliveries & set(never_fetched)

            second_network = FaultyNetwork()
            with LocalStore(path) as store2:
                async with open_client(b.url, bob_token, local_store=store2, transport_factory=second_network) as bob:
                    yielded = [d async for d in bob.deliveries(until_drained=True)]
            assert sorted(saved_on_a + [d.id for d in yielded]) == ids  # each message saved once, by one client
            assert sorted(incoming_rows(path, "bob")) == [("alice", i) for i in ids]
            redelivered = [f for f in second_network.received_of(Deliver) if f.id in first_deliveries]
            assert redelivered  # at least the hung batch: saved on A, never ACKed
            assert all(f.attempt > 1 for f in redelivered)
            assert set(store.saved_ids[store.acked_at_most :]) <= {f.id for f in redelivered}
            attempts = {f.id: f.attempt for f in second_network.received_of(Deliver)}
            assert [attempts[i] for i in never_fetched] == [1] * len(never_fetched)
            assert await pending_of(b, bob_token) == 0


async def test_after_a_crash_a_hello_takes_over_at_once_and_the_lease_ends_delivered(
    tmp_path: Path, store_settings: dict[str, Any]
) -> None:
    """Right after A dies: carol's HELLO on B needs no takeover wait (nobody hears the kick); a SEND on B
    to bob, who was on A, says "delivered" while A's lease lasts and "queued" once it has run out (within a
    few leases); bob finds every one of those messages on B."""
    async with node_processes(tmp_path, store_settings) as (auth, (a, b)):
        with trio.fail_after(TIMEOUT_S):
            on_a = []
            for name in ("bob", "carol"):
                client, _ = await RawClient.login(a.tcp_port, auth.issue(name))
                await client.expect(Drained)
                on_a.append(client)
            alice, _ = await RawClient.login(b.tcp_port, auth.issue("alice"))
            await alice.expect(Drained)
            await alice.send(Send(id="before", to=("bob",), body=b"x"))
            assert (await alice.expect(Receipt)).results["bob"].status is Status.DELIVERED
            assert (await on_a[0].expect(Deliver)).id == "before"  # in flight on A, never ACKed

            await a.kill()
            killed_at = trio.current_time()
            with trio.fail_after(TAKEOVER_WAIT_S / 2):
                carol, welcome = await RawClient.login(b.tcp_port, auth.issue("carol"))
            assert welcome.mailbox == "carol"
            await carol.expect(Drained)

            sent: list[str] = []
            seen: list[Status] = []
            while not seen or seen[-1] is not Status.QUEUED:
                mid = f"after{len(sent)}"
                await alice.send(Send(id=mid, to=("bob",), body=b"x"))
                seen.append((await alice.expect(Receipt)).results["bob"].status)
                sent.append(mid)
                if seen[-1] is not Status.QUEUED:
                    await trio.sleep(LEASE_S / 20)
            queued_after_s = trio.current_time() - killed_at
            assert queued_after_s < 4 * LEASE_S, f"A's mailboxes still counted as connected {queued_after_s:.1f} s on"
            await alice.send(Send(id="later", to=("bob",), body=b"x"))
            assert (await alice.expect(Receipt)).results["bob"].status is Status.QUEUED

            bob, welcome = await RawClient.login(b.tcp_port, auth.issue("bob"))
            frames, drained = await bob.until(Drained)
            delivered = [(f.id, f.attempt) for f in frames if isinstance(f, Deliver)]
            assert delivered == [("before", 2), *((mid, 1) for mid in sent), ("later", 1)]
            assert welcome.pending == drained.pending == len(sent) + 2


async def test_a_sender_on_a_killed_node_resends_on_another_and_each_message_is_stored_once(
    tmp_path: Path, store_settings: dict[str, Any]
) -> None:
    """alice sends 1000 messages to bob on node A, several batches in flight, and A is SIGKILLed; she
    resends all of them with the same ids on node B: those A had stored (at least every one whose receipt
    she saw) are "duplicate", the others "queued"; bob gets each exactly once."""
    n, batch = 1000, 25
    ids = [f"s{i:03}" for i in range(n)]
    async with node_processes(tmp_path, store_settings) as (auth, (a, b)):
        with trio.fail_after(TIMEOUT_S):
            alice_token = auth.issue("alice")
            confirmed: list[str] = []
            lost = 0
            async with open_client(a.url, alice_token, reconnect=False, e2e=False) as alice:

                async def sender(chunks: list[list[str]]) -> None:
                    nonlocal lost
                    for chunk in chunks:
                        try:
                            receipts = await alice.send_batch([OutgoingMessage("bob", i.encode(), id=i) for i in chunk])
                        except ConnectionLost:
                            lost += 1
                            return
                        assert statuses(receipts, "bob") == {Status.QUEUED}
                        confirmed.extend(r.id for r in receipts)

                chunks = [ids[i : i + batch] for i in range(0, n, batch)]
                async with trio.open_nursery() as nursery:
                    for k in range(4):
                        nursery.start_soon(sender, chunks[k::4])
                    while len(confirmed) < n // 4:
                        await trio.sleep(0.001)
                    await a.kill()
            assert n // 4 <= len(confirmed) < n and lost >= 1  # SENDs were in flight when A died

            async with open_client(b.url, alice_token, e2e=False) as alice:
                again = await alice.send_batch([OutgoingMessage("bob", i.encode(), id=i) for i in ids])
            status_of = {r.id: r.results["bob"].status for r in again}
            assert set(status_of.values()) <= {Status.QUEUED, Status.DUPLICATE}
            duplicates = {i for i, s in status_of.items() if s is Status.DUPLICATE}
            assert set(confirmed) <= duplicates

            bob_token = auth.issue("bob")
            with LocalStore(tmp_path / "bob.sqlite3") as store:
                async with open_client(b.url, bob_token, local_store=store) as bob:
                    got = [d async for d in bob.deliveries(until_drained=True)]
            assert sorted(d.id for d in got) == ids
            assert {d.attempt for d in got} == {1}
            assert len(incoming_rows(tmp_path / "bob.sqlite3", "bob")) == n
            assert await pending_of(b, bob_token) == 0
