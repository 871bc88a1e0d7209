"""Delivery statuses in the ``relay`` CLI against a real broker (issue 12): ``send --wait`` and its exit codes,
``listen``'s ``{"status": ...}`` lines, and ``export``'s per-recipient state of each sent message."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio
from relay_testing import Clock, until, url_of

from broker.server import Broker
from client import LocalStore, open_client
from client.cli import main

TIMEOUT_S = 20


class Run:
    def __init__(self, status: int, out: str, err: str) -> None:
        self.status, self.out, self.err = status, out, err

    @property
    def lines(self) -> list[Any]:
        return [json.loads(line) for line in self.out.splitlines()]


async def relay(*argv: str) -> Run:
    out, err = io.StringIO(), io.StringIO()
    status = await trio.to_thread.run_sync(lambda: main(list(argv), stdin=io.BytesIO(), stdout=out, stderr=err))
    return Run(status, out.getvalue(), err.getvalue())


def opts(broker: Broker, name: str, tmp_path: Path) -> list[str]:
    return ["--url", url_of(broker), "--token", broker.auth.issue(name), "--store", str(tmp_path / f"{name}.sqlite3")]


def is_status_line(line: Any, state: str, mid: str, recipient: str) -> bool:
    status = line["status"]
    return (
        list(line) == ["status"]
        and list(status) == ["seq", "state", "at", "id", "recipient"]
        and (status["state"], status["id"], status["recipient"]) == (state, mid, recipient)
        and isinstance(status["seq"], int)
        and isinstance(status["at"], int)
    )


async def test_send_wait_prints_the_receipt_then_each_status_and_exits_0(broker: Broker, tmp_path: Path) -> None:
    with LocalStore(tmp_path / "bob.sqlite3") as bob_store, trio.fail_after(TIMEOUT_S):
        async with open_client(url_of(broker), broker.auth.issue("bob"), local_store=bob_store):  # saves, ACKs
            run = await relay(*opts(broker, "alice", tmp_path), "send", "--wait", "--to", "bob", "--id", "w1", "hi")
    assert (run.status, run.err) == (0, "")
    receipt, status = run.lines
    assert receipt == {"id": "w1", "results": {"bob": {"status": "delivered"}}}
    assert is_status_line(status, "delivered", "w1", "bob")
    with LocalStore(tmp_path / "alice.sqlite3") as store:
        [state] = store.recipient_states("alice", id="w1")
        assert (state.receipt, state.notify, state.state, state.status_seq) == (
            "delivered",
            True,
            "delivered",
            status["status"]["seq"],
        )
        assert store.unemitted_statuses("alice") == []  # printed: a listen will not print it again
    assert (await broker.statistics())["statuses_held"] == 0


async def test_send_wait_times_out_with_exit_4_and_listen_prints_the_status_when_it_comes(
    broker: Broker, tmp_path: Path
) -> None:
    alice = opts(broker, "alice", tmp_path)
    with trio.fail_after(TIMEOUT_S):
        run = await relay(
            *alice, "send", "--plaintext", "--wait", "--timeout", "0.2", "--to", "bob", "--id", "w2", "hi"
        )
        assert run.status == 4
        assert run.lines == [{"id": "w2", "results": {"bob": {"status": "queued"}}}]
        assert run.err == "relay: timed out after 0.2 s: no delivery status yet for bob\n"

        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "client", *alice, "listen"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        assert proc.stdout is not None
        try:
            assert (await relay(*opts(broker, "bob", tmp_path), "listen", "--drain")).status == 0  # saved, ACKed
            out = bytearray()
            while b"\n" not in out:
                chunk = await proc.stdout.receive_some(65536)
                assert chunk, "the listener ended early"
                out += chunk
        finally:
            proc.kill()
            await proc.wait()
    [line] = [json.loads(text) for text in out.decode().splitlines()]
    assert is_status_line(line, "delivered", "w2", "bob")
    with LocalStore(tmp_path / "alice.sqlite3") as store:
        [state] = store.recipient_states("alice", id="w2")
        assert (state.receipt, state.state) == ("queued", "delivered")


async def test_listen_prints_saved_statuses_once(broker: Broker, tmp_path: Path) -> None:
    alice = opts(broker, "alice", tmp_path)
    url = url_of(broker)
    with trio.fail_after(TIMEOUT_S):
        async with open_client(url, broker.auth.issue("alice"), e2e=False) as client:
            await client.send(["bob", "carol"], b"to both", id="l1")
        async with open_client(url, broker.auth.issue("bob")) as bob:
            bob.ack([d.id async for d in bob.deliveries(until_drained=True)])
        with LocalStore(tmp_path / "alice.sqlite3") as store:  # the CLI's store, filled by the API client
            async with open_client(url, broker.auth.issue("alice"), e2e=False, local_store=store) as client:
                status = await anext(client.statuses())  # saved and STATUS_ACKed, not printed
        first = await relay(*alice, "listen", "--drain")
        assert first.status == 0
        assert len(first.lines) == 1 and is_status_line(first.lines[0], "delivered", "l1", "bob")
        assert first.lines[0]["status"] == {
            "seq": status.seq,
            "state": "delivered",
            "at": status.at,
            "id": "l1",
            "recipient": "bob",
        }
        assert (await relay(*alice, "listen", "--drain")).out == ""  # printed once


async def test_send_wait_exits_3_when_the_message_expires_first(broker_factory: Any, tmp_path: Path) -> None:
    clock = Clock()
    async with broker_factory(clock=clock) as broker:
        alice = opts(broker, "alice", tmp_path)
        runs: list[Run] = []

        async def send() -> None:
            runs.append(
                await relay(*alice, "send", "--plaintext", "--wait", "--ttl", "1", "--to", "bob", "--id", "w3", "x")
            )

        async def stored() -> bool:
            return bool((await broker.statistics())["messages_total"] == 1)

        with trio.fail_after(TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                await until(stored)
                clock.offset_ms += 2_000
                assert await broker.cleanup() == 1  # expired unread: alice's waiting send hears "expired"
        [run] = runs
        assert (run.status, run.err) == (3, "")
        receipt, status = run.lines
        assert receipt["results"] == {"bob": {"status": "queued"}}
        assert is_status_line(status, "expired", "w3", "bob")


async def test_send_wait_with_a_refused_recipient_waits_for_the_others_and_exits_1(
    broker: Broker, tmp_path: Path
) -> None:
    with LocalStore(tmp_path / "bob.sqlite3") as bob_store, trio.fail_after(TIMEOUT_S):
        async with open_client(url_of(broker), broker.auth.issue("bob"), local_store=bob_store):
            run = await relay(
                *opts(broker, "alice", tmp_path),
                "send",
                "--plaintext",
                "--wait",
                "--to",
                "bob",
                "--to=-bad",
                "--id",
                "w4",
                "x",
            )
    assert run.status == 1
    receipt, status = run.lines
    assert receipt["results"] == {"bob": {"status": "delivered"}, "-bad": {"status": "refused", "code": 3006}}
    assert is_status_line(status, "delivered", "w4", "bob")


async def test_send_wait_counts_a_status_saved_before_for_a_resent_id(broker: Broker, tmp_path: Path) -> None:
    alice = opts(broker, "alice", tmp_path)
    with LocalStore(tmp_path / "bob.sqlite3") as bob_store, trio.fail_after(TIMEOUT_S):
        async with open_client(url_of(broker), broker.auth.issue("bob"), local_store=bob_store):
            first = await relay(*alice, "send", "--wait", "--to", "bob", "--id", "w5", "x")
            assert first.status == 0
        # The resend is a duplicate (the broker keeps a tombstone of the ACKed id); its status came already.
        again = await relay(*alice, "send", "--wait", "--timeout", "5", "--to", "bob", "--id", "w5", "x")
    assert (again.status, again.err) == (0, "")
    receipt, status = again.lines
    assert receipt["results"] == {"bob": {"status": "duplicate"}}
    assert status == first.lines[1]


async def test_export_shows_each_sent_messages_state_per_recipient(broker: Broker, tmp_path: Path) -> None:
    alice = opts(broker, "alice", tmp_path)
    with LocalStore(tmp_path / "bob.sqlite3") as bob_store, trio.fail_after(TIMEOUT_S):
        async with open_client(url_of(broker), broker.auth.issue("bob"), local_store=bob_store):
            run = await relay(*alice, "send", "--plaintext", "--wait", "--timeout", "0.2", "--to", "bob", "--to",
                              "carol", "--id", "x1", "hello both")  # fmt: skip
    assert run.status == 4 and run.err == "relay: timed out after 0.2 s: no delivery status yet for carol\n"
    doc = json.loads((await relay(*alice, "export", "--format", "json")).out)
    [sent] = doc["messages"]
    assert (sent["id"], sent["to"], sent["notify"]) == ("x1", ["bob", "carol"], True)
    assert sent["delivery"] == {
        "bob": {"state": "delivered", "at": run.lines[1]["status"]["at"], "receipt": "delivered"},
        "carol": {"state": "queued", "receipt": "queued"},
    }
    md = (await relay(*alice, "export", "--format", "markdown")).out.splitlines()
    [line] = [text for text in md if text.startswith("*delivered to bob ")]
    assert line.endswith(" · queued for carol*")
