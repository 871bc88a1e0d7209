"""Chaos: clients with local stores killed at random points, thousands of times; nothing lost, nothing twice.

Receivers (each with its own SQLite local store, kept across its sessions as a device keeps its file) are
killed abruptly (their client's cancel scope cancelled: the transport torn down, no BYE) at three kinds of
point: a batch of DELIVERs arrived but is not saved yet, a batch saved but not ACKed yet (both from inside
the store's save, which the client runs before it ACKs), and at a random moment (mid-ACK, mid-delivery,
mid-handshake). Senders are killed mid-SEND, before the RECEIPT, and resend the same id in their next
session, as the client library documents. Each session picks TCP or WebSocket at random. A message is
*accepted* when its sender got a RECEIPT saying queued, delivered or duplicate.

At the end, with kills stopped, every receiver's store holds exactly the messages accepted for it, each once,
with its body, and nothing else (nothing un-sent appears, nothing accepted is lost). Over the memory and the
Redis store. ``RELAY_CHAOS_KILLS=20000`` makes a longer run (kills per store); the figures are printed.
"""

from __future__ import annotations

import collections
import itertools
import math
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from broker.server import Broker
from client import LocalStore, LocalStoreError, RelayError, open_client
from client.localstore import INCOMING

pytestmark = pytest.mark.stores("memory", "redis")

KILLS = int(os.environ.get("RELAY_CHAOS_KILLS", "0")) or 500
"""Receiver kills per run before the senders stop (the default keeps the run short)."""
RECEIVERS = 4
SENDERS = 3
ACCEPTED = frozenset({"queued", "delivered", "duplicate"})


class Killed(Exception):
    """Raised inside the store's save to stand for the process dying there."""


class KillingStore(LocalStore):
    """A receiver's real local store that, while ``chaos`` is on, kills its client around some saves:
    before the save (DELIVERs in, nothing saved) or after it (saved, not ACKed)."""

    def __init__(self, path: Path, rng: random.Random, kills: collections.Counter[str]) -> None:
        super().__init__(path)
        self.rng = rng
        self.kills = kills
        self.chaos = True
        self.scope: trio.CancelScope | None = None
        self.killed = False

    def save_incoming(self, mailbox: str, messages: Sequence[Any]) -> list[bool]:
        roll = self.rng.random() if self.chaos and not self.killed else 1.0
        if roll < 0.3:
            self._kill("before save")
            raise Killed("killed before saving")
        fresh = super().save_incoming(mailbox, messages)
        if roll < 0.6:
            self._kill("after save, before ACK")
        return fresh

    def _kill(self, where: str) -> None:
        scope = self.scope
        assert scope is not None
        self.killed = True
        self.kills[where] += 1
        trio.from_thread.run_sync(scope.cancel)


class Chaos:
    def __init__(self, broker: Broker, tmp_path: Path, seed: int) -> None:
        self.broker = broker
        self.tmp_path = tmp_path
        self.rng = random.Random(seed)
        self.kills: collections.Counter[str] = collections.Counter()
        self.accepted: dict[str, dict[tuple[str, str], bytes]] = {f"r{i}": {} for i in range(RECEIVERS)}
        self.sending = True
        self.sessions = 0

    def url(self) -> str:
        if self.rng.random() < 0.5:
            return f"tcp://127.0.0.1:{self.broker.tcp_port}"
        return f"ws://127.0.0.1:{self.broker.ws_port}/relay"

    def receiver_kills(self) -> int:
        return self.kills["before save"] + self.kills["after save, before ACK"] + self.kills["receiver at random"]

    async def receiver(self, name: str, store: KillingStore) -> None:
        """Sessions one after another, each killed at some point, while the senders send."""
        token = self.broker.auth.issue(name)
        while self.sending:
            store.killed = False
            with trio.CancelScope() as scope:
                store.scope = scope
                scope.deadline = trio.current_time() + self.rng.uniform(0.005, 0.15)  # the random kill
                self.sessions += 1
                try:
                    async with open_client(self.url(), token, e2e=False, local_store=store, reconnect=False) as c:
                        async for _ in c.deliveries():
                            pass
                except* (RelayError, LocalStoreError):  # the kill inside a save: its client fails, maybe as it is
                    # cancelled too (then open_client raises both in a group, whose Cancelled the scope takes)
                    assert store.killed, "a receiver failed without being killed"
            if scope.cancelled_caught and not store.killed:
                self.kills["receiver at random"] += 1

    async def sender(self, name: str) -> None:
        """Messages to random receivers until the receivers were killed KILLS times; killed mid-SEND at times,
        when the next session sends the same message (same id) again first."""
        token = self.broker.auth.issue(name)
        numbers = itertools.count()
        head: tuple[str, str, bytes] | None = None  # the message in flight when the last session was killed
        while head is not None or self.receiver_kills() < KILLS:
            with trio.CancelScope() as scope:
                self.sessions += 1
                async with open_client(self.url(), token, e2e=False, reconnect=False) as client:
                    while head is not None or self.receiver_kills() < KILLS:
                        if head is None:
                            n = next(numbers)
                            head = (f"{name}-{n}", f"r{self.rng.randrange(RECEIVERS)}", f"{name} {n}".encode())
                        mid, to, body = head
                        if self.rng.random() < 0.25:
                            scope.deadline = trio.current_time() + self.rng.uniform(0, 0.004)  # killed mid-SEND
                        receipt = await client.send(to, body, id=mid, notify=False)
                        status = receipt.results[to].status.value
                        assert status in ACCEPTED, f"{mid} to {to}: {receipt!r}"
                        self.accepted[to][(name, mid)] = body
                        head = None
                        scope.deadline = math.inf
                        await trio.sleep(0.001)
            if scope.cancelled_caught:
                self.kills["sender mid-SEND"] += 1

    async def drain(self, name: str, store: KillingStore) -> None:
        """One last session without kills, until the store holds every message accepted for ``name``."""
        store.chaos = False
        want = self.accepted[name]
        async with open_client(self.url(), self.broker.auth.issue(name), e2e=False, local_store=store) as client:
            inbox = client.deliveries()
            while store.count(name, direction=INCOMING) < len(want):
                await anext(inbox)


async def test_killed_clients_lose_nothing_and_store_nothing_twice(
    broker_factory: Any, tmp_path: Path, store_kind: str
) -> None:
    began = time.monotonic()
    with trio.fail_after(600 if os.environ.get("RELAY_CHAOS_KILLS") else 120):
        async with broker_factory(max_inflight=8) as broker:
            chaos = Chaos(broker, tmp_path, seed=11)
            stores = {
                f"r{i}": KillingStore(tmp_path / f"r{i}.sqlite3", chaos.rng, chaos.kills) for i in range(RECEIVERS)
            }
            async with trio.open_nursery() as receivers:
                for name, store in stores.items():
                    receivers.start_soon(chaos.receiver, name, store)
                async with trio.open_nursery() as senders:
                    for i in range(SENDERS):
                        senders.start_soon(chaos.sender, f"s{i}")
                chaos.sending = False
            async with trio.open_nursery() as nursery:
                for name, store in stores.items():
                    nursery.start_soon(chaos.drain, name, store)
    lost = duplicated = unsent = 0
    for name, store in stores.items():
        rows = store.messages(name, direction=INCOMING)
        got = collections.Counter((m.sender, m.id) for m in rows)
        want = chaos.accepted[name]
        lost += sum(1 for key in want if key not in got)
        duplicated += sum(n - 1 for n in got.values() if n > 1)
        unsent += sum(1 for key in got if key not in want)
        for m in rows:
            assert want.get((m.sender, m.id)) == m.body, f"{name}: {m.sender}/{m.id} has body {m.body!r}"
        store.close()
    total = sum(len(w) for w in chaos.accepted.values())
    print(
        f"\nchaos ({store_kind}): {sum(chaos.kills.values())} kills {dict(chaos.kills)} in {chaos.sessions} sessions, "
        f"{total} messages accepted; lost {lost}, duplicated {duplicated}, never sent {unsent}; "
        f"{time.monotonic() - began:.1f} s"
    )
    assert (lost, duplicated, unsent) == (0, 0, 0)
    assert chaos.receiver_kills() >= KILLS
    assert chaos.kills["before save"] and chaos.kills["after save, before ACK"] and chaos.kills["sender mid-SEND"]
