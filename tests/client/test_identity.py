"""A message's identity for a client is (sender, id): once a message and its tombstone have expired at the
broker, another sender may reuse its id, and the client must treat that as a new message (issue 8 §1)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import trio
from relay_testing import Clock, until, url_of

from client import LocalStore, Status, open_client
from client.cli import main

TIMEOUT_S = 20


async def test_a_reused_id_from_another_sender_after_expiry_is_yielded_and_saved(
    broker_factory: Any, tmp_path: Path
) -> None:
    clock = Clock()
    async with broker_factory(clock=clock) as broker:
        url = url_of(broker)
        with LocalStore(tmp_path / "bob.sqlite3") as store, trio.fail_after(TIMEOUT_S):
            async with open_client(url, broker.auth.issue("bob"), local_store=store) as bob:
                got = bob.deliveries()
                async with open_client(url, broker.auth.issue("alice")) as alice:
                    receipt = await alice.send("bob", b"from alice", id="z-1", ttl_s=1)
                assert receipt.results["bob"].status is Status.DELIVERED
                first = await got.__anext__()
                assert (first.sender, first.id, first.body) == ("alice", "z-1", b"from alice")

                async def acked() -> bool:
                    stats = await broker.statistics()
                    return stats["messages_total"] == 0 and stats["tombstones"] == 1

                await until(acked)  # saved, then ACKed: the broker keeps a tombstone until z-1 expires
                clock.offset_ms += 2_000  # alice's z-1 has expired
                assert await broker.cleanup() == 0 and (await broker.statistics())["tombstones"] == 0

                async with open_client(url, broker.auth.issue("carol")) as carol:
                    receipt = await carol.send("bob", b"from carol", id="z-1")
                assert receipt.results["bob"].status is Status.DELIVERED  # the id is free again
                second = await got.__anext__()
                assert (second.sender, second.id, second.body) == ("carol", "z-1", b"from carol")
                await until(lambda: _messages_total_is_zero(broker))
            assert [(m.sender, m.id, m.body) for m in store.messages("bob")] == [
                ("alice", "z-1", b"from alice"),
                ("carol", "z-1", b"from carol"),
            ]


async def _messages_total_is_zero(broker: Any) -> bool:
    return bool((await broker.statistics())["messages_total"] == 0)


async def relay(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = await trio.to_thread.run_sync(lambda: main(list(argv), stdin=io.BytesIO(), stdout=out, stderr=err))
    return status, out.getvalue(), err.getvalue()


async def test_relay_listen_prints_and_saves_a_reused_id_from_another_sender(
    broker_factory: Any, tmp_path: Path
) -> None:
    """The issue's reproduction with the CLI: bob offline, the tombstone removed by the connect-time expiry."""
    clock = Clock()
    async with broker_factory(clock=clock) as broker:

        def opts(name: str) -> list[str]:
            return ["--url", url_of(broker), "--token", broker.auth.issue(name), "--store", str(tmp_path / name)]

        with trio.fail_after(TIMEOUT_S):
            status, out, _ = await relay(
                *opts("alice"), "send", "--plaintext", "--to", "bob", "--id", "z-1", "--ttl", "1", "hi"
            )
            assert (status, json.loads(out)["results"]) == (0, {"bob": {"status": "queued"}})
            status, out, _ = await relay(*opts("bob"), "listen", "--drain")
            assert status == 0 and [json.loads(line)["from"] for line in out.splitlines()] == ["alice"]
            clock.offset_ms += 2_000
            status, out, _ = await relay(*opts("carol"), "send", "--plaintext", "--to", "bob", "--id", "z-1", "hello")
            assert (status, json.loads(out)["results"]) == (0, {"bob": {"status": "queued"}})
            status, out, _ = await relay(*opts("bob"), "listen", "--drain")
            assert status == 0
            assert [(m["from"], m["id"], m["body"]) for m in map(json.loads, out.splitlines())] == [
                ("carol", "z-1", "hello")
            ]
            assert (await broker.statistics())["messages_total"] == 0
        with LocalStore(tmp_path / "bob") as store:
            assert [(m.sender, m.id) for m in store.messages("bob")] == [("alice", "z-1"), ("carol", "z-1")]
