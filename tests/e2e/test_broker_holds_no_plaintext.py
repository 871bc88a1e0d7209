"""The relay could not read a message if it tried (issue 13, docs/e2e.md "Threat model").

A conversation between two Python clients with end-to-end encryption on (the default) runs through a real
broker process, over the in-memory store and over a Redis of its own. Then everything the relay holds is scanned
for the plaintext: the broker process's whole memory (/proc/PID/mem, every readable mapping), Redis's memory and a
dump of its keyspace (SAVE with compression off), the broker's log at DEBUG and the statistics. Nothing is found,
while the messages are queued and after they were delivered, saved and ACKed. The same scan does find a message
sent in the clear (``plaintext=True``, to a mailbox without a key): the scan can fail.
"""

from __future__ import annotations

import re
import secrets
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from broker.auth import Authenticator, load_or_create_secret
from client import LocalStore, open_client

from ..broker.process import start_broker
from ..redis_servers import running_redis

TIMEOUT_S = 30
MESSAGES = 20
_MAPS = re.compile(rb"^([0-9a-f]+)-([0-9a-f]+) (r)\S* ", re.M)


def process_memory(pid: int) -> bytes:
    """Every readable mapping of process ``pid``, concatenated (what a memory dump of it would show)."""
    maps = Path(f"/proc/{pid}/maps").read_bytes()
    chunks = []
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for m in _MAPS.finditer(maps):
            start, end = int(m.group(1), 16), int(m.group(2), 16)
            try:
                mem.seek(start)
                chunks.append(mem.read(end - start))
            except (OSError, OverflowError, ValueError):
                continue  # [vvar] and the like cannot be read; they hold no heap
    return b"".join(chunks)


@dataclass
class Relay:
    """What the relay holds, to be scanned: the broker's process, its log, and a Redis of its own if any."""

    broker_pid: int
    log: Path
    redis: tuple[int, int, Path] | None  # (pid, port, directory)
    urls: dict[str, str] = field(default_factory=dict)
    """The broker's URLs by scheme: tcp, ws, http (the HTTP API's base)."""

    def holdings(self) -> dict[str, bytes]:
        held = {"broker memory": process_memory(self.broker_pid), "broker log": self.log.read_bytes()}
        if self.redis is not None:
            pid, port, directory = self.redis
            cli = ["redis-cli", "-p", str(port)]
            subprocess.run([*cli, "CONFIG", "SET", "rdbcompression", "no"], check=True, capture_output=True)
            subprocess.run([*cli, "SAVE"], check=True, capture_output=True)
            held["redis memory"] = process_memory(pid)
            held["redis keyspace dump"] = (directory / "dump.rdb").read_bytes()
        return held


def found(relay: Relay, *needles: bytes) -> dict[str, list[bytes]]:
    """Which of ``needles`` occur in what the relay holds, by place; empty if none does."""
    out: dict[str, list[bytes]] = {}
    for place, data in relay.holdings().items():
        hits = [n for n in needles if n in data]
        if hits:
            out[place] = hits
    return out


@asynccontextmanager
async def relay(tmp_path: Path, kind: str, *settings: str) -> AsyncIterator[tuple[Authenticator, str, Relay]]:
    """A broker process logging at DEBUG (and with ``settings``) over the store ``kind`` (memory or redis): its
    secret, its TCP URL and what it holds."""
    data_dir, log = tmp_path / "data", tmp_path / "broker.log"
    auth = Authenticator(load_or_create_secret(data_dir))
    flags = ["--log-level", "DEBUG", *settings]
    with running_redis(tmp_path / "redis") if kind == "redis" else _nothing() as redis:
        if redis is not None:
            flags += ["--store", redis.url]
        started = await start_broker(data_dir, log, *flags)
        process = started.process
        try:
            held = None if redis is None else (redis.process.pid, redis.port, tmp_path / "redis")
            urls = {
                "tcp": f"tcp://127.0.0.1:{started.tcp_port}",
                "ws": f"ws://127.0.0.1:{started.ws_port}/relay",
                "http": f"http://127.0.0.1:{started.http_port}",
            }
            yield auth, urls["tcp"], Relay(process.pid, log, held, urls)
        finally:
            with trio.CancelScope(shield=True):
                process.kill()
                await process.wait()


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_the_relay_holds_no_plaintext_of_an_encrypted_conversation(tmp_path: Path, kind: str) -> None:
    secret_texts = [f"the secret {i}: {secrets.token_hex(16)}".encode() for i in range(MESSAGES)]
    cleartext = f"in the clear: {secrets.token_hex(16)}".encode()
    needles = [t[-32:] for t in secret_texts]  # the random part of each message, as ASCII hex
    async with relay(tmp_path, kind) as (auth, url, held):
        with (
            trio.fail_after(TIMEOUT_S),
            LocalStore(tmp_path / "alice.sqlite3") as a,
            LocalStore(tmp_path / "bob.sqlite3") as b,
        ):
            async with open_client(url, auth.issue("bob"), local_store=b):
                pass  # bob's device publishes its key, then goes offline
            async with open_client(url, auth.issue("alice"), local_store=a) as alice:
                for i, text in enumerate(secret_texts):
                    await alice.send(["bob"], text, id=f"s{i}")
                await alice.send(["carol"], cleartext, id="clear", plaintext=True)  # carol has no key

            # Queued: the broker and Redis hold bob's messages, sealed, and carol's, in the clear.
            assert found(held, *needles) == {}
            # The scan finds what the relay does hold in the clear, where it holds it: the broker's memory with the
            # in-memory store; Redis with Redis (the broker keeps no copy: one left in freed memory is luck, and a
            # change of allocation, such as the store's larger counter sync, overwrites it).
            where = found(held, cleartext[-32:])
            if kind == "memory":
                assert "broker memory" in where, "the scan finds what the broker holds in the clear"
            else:
                assert {"redis memory", "redis keyspace dump"} <= where.keys(), "the scan finds what Redis holds"

            async with open_client(url, auth.issue("bob"), local_store=b) as bob:
                got = [d async for d in bob.deliveries(until_drained=True)]
            assert sorted(d.body for d in got) == sorted(secret_texts)
            assert {d.security for d in got} == {"e2e"}
            async with open_client(url, auth.issue("ops", operator=True), e2e=False) as ops:
                stats = await ops.stats()

            # Delivered, saved on bob's device and ACKed: still nothing, anywhere, nor in the statistics.
            assert found(held, *needles) == {}
            assert not any(n in repr(stats).encode() for n in needles)
