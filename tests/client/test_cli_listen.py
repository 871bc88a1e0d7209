"""``relay listen`` across crashes and connection changes: every message reaches its output at least once,
and each change of connection state is one line on stderr (issue 8 §5)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import trio
from relay_testing import BrokerRunner, url_of

from broker.server import Broker
from client import LocalStore, OutgoingMessage, Status, open_client
from client.cli import main

TIMEOUT_S = 30
N_MESSAGES = 20_000
KILL_AFTER_LINES = 3_000


async def queue_messages(broker: Broker, n: int) -> set[str]:
    ids = [f"m{i:05d}" for i in range(n)]
    async with open_client(url_of(broker), broker.auth.issue("alice"), e2e=False) as alice:
        for start in range(0, n, 5000):
            chunk = ids[start : start + 5000]
            receipts = await alice.send_batch([OutgoingMessage("bob", b"body " + i.encode(), id=i) for i in chunk])
            assert all(r.results["bob"].status is Status.QUEUED for r in receipts)
    return set(ids)


def ids_of(output: bytes | str) -> list[str]:
    text = output.decode() if isinstance(output, bytes) else output
    return [json.loads(line)["id"] for line in text.splitlines()]


async def test_a_listener_killed_partway_loses_no_message_from_its_output(broker: Broker, tmp_path: Path) -> None:
    expected = await queue_messages(broker, N_MESSAGES)
    store = tmp_path / "bob.sqlite3"
    argv = ["--url", url_of(broker), "--token", broker.auth.issue("bob"), "--store", str(store)]
    with trio.fail_after(TIMEOUT_S):
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "client", *argv, "listen"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        assert proc.stdout is not None
        first = bytearray()
        try:
            # Read until the listener has printed some thousands, then SIGKILL it mid-stream: it has
            # saved (and ACKed) more than has reached its stdout, and some lines sit in its buffers.
            while first.count(b"\n") < KILL_AFTER_LINES:
                chunk = await proc.stdout.receive_some(65536)
                assert chunk, "the listener ended early"
                first += chunk
            proc.send_signal(signal.SIGKILL)
            while chunk := await proc.stdout.receive_some(65536):  # what it wrote before it died
                first += chunk
        finally:
            proc.kill()
            await proc.wait()
        assert proc.returncode == -signal.SIGKILL
        complete = first[: first.rfind(b"\n") + 1]  # a line cut by the kill does not count
        printed_first = ids_of(bytes(complete))
        assert KILL_AFTER_LINES <= len(printed_first) < N_MESSAGES

        out, err = io.StringIO(), io.StringIO()
        status = await trio.to_thread.run_sync(
            lambda: main([*argv, "listen", "--drain"], stdin=io.BytesIO(), stdout=out, stderr=err)
        )
        assert status == 0, err.getvalue()
    printed_second = ids_of(out.getvalue())
    assert set(printed_first) | set(printed_second) == expected  # every message printed at least once
    assert len(printed_second) == len(set(printed_second))
    with LocalStore(store) as s:
        saved = [m.id for m in s.messages("bob")]
        assert len(saved) == N_MESSAGES and set(saved) == expected  # and saved exactly once
        assert s.unemitted("bob") == []
    assert (await broker.statistics())["messages_total"] == 0


class Listener:
    """``relay listen`` as a subprocess, its stderr read line by line."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._partial = b""

    async def line_containing(self, text: str) -> str:
        """Wait for the next stderr line containing ``text`` (lines before it are kept in ``lines``)."""
        assert self.proc.stderr is not None
        while True:
            while b"\n" in self._partial:
                raw, self._partial = self._partial.split(b"\n", 1)
                line = raw.decode()
                self.lines.append(line)
                if text in line:
                    return line
            chunk = await self.proc.stderr.receive_some(65536)
            assert chunk, f"stderr ended before a line with {text!r}; got {self.lines}"
            self._partial += chunk

    async def finish(self) -> tuple[int, list[str]]:
        """Wait for the exit; its status and every stderr line."""
        assert self.proc.stderr is not None
        while chunk := await self.proc.stderr.receive_some(65536):
            self._partial += chunk
        await self.proc.wait()
        self.lines += self._partial.decode().splitlines()
        return self.proc.returncode, self.lines


async def start_listener(broker: Broker, tmp_path: Path) -> Listener:
    argv = ["--url", url_of(broker), "--token", broker.auth.issue("bob"), "--store", str(tmp_path / "bob.sqlite3")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "client", *argv, "listen"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )
    return Listener(proc)


async def take_over(broker: Broker) -> None:
    async with open_client(url_of(broker), broker.auth.issue("bob")) as bob:
        await bob.wait_drained()


async def test_a_takeover_prints_the_4001_line_once_and_exits_2(broker: Broker, tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        listener = await start_listener(broker, tmp_path)
        try:
            await listener.line_containing("connected to")
            await take_over(broker)
            status, lines = await listener.finish()
        finally:
            listener.proc.kill()
    assert status == 2
    assert lines == [
        f"relay: connected to {url_of(broker)} as bob, 0 messages waiting",
        "relay: another connection for this mailbox took over (CONNECTED_ELSEWHERE 4001); stopping",
    ]


async def test_a_broker_shutdown_and_restart_print_one_line_each(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            runner = BrokerRunner(nursery, tmp_path / "broker-data")
            first = await runner.start()
            url = url_of(first)
            async with open_client(url, first.auth.issue("alice"), e2e=False) as alice:
                await alice.send("bob", b"waiting", id="w1")
            listener = await start_listener(first, tmp_path)
            try:
                await listener.line_containing("connected to")
                await runner.stop()  # every session is told SHUTTING_DOWN (4004)
                await listener.line_containing("shutting down")
                second = await runner.start(first.tcp_port or 0)
                await listener.line_containing("reconnected")
                await take_over(second)
                status, lines = await listener.finish()
            finally:
                listener.proc.kill()
            await runner.stop()
    assert status == 2
    assert lines == [
        f"relay: connected to {url} as bob, 1 message waiting",
        f"relay: the broker at {url} is shutting down (SHUTTING_DOWN 4004); reconnecting",
        f"relay: reconnected to {url} as bob, 0 messages waiting",
        "relay: another connection for this mailbox took over (CONNECTED_ELSEWHERE 4001); stopping",
    ]
