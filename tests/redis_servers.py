"""Real Redis servers for the tests: one standalone server and one three-master cluster on loopback.

Theory of operation. The test run starts each server it needs itself (nothing on the machine
runs one), as a child ``redis-server`` with no persistence (``running_redis(..., aof=True)``:
an append-only file fsynced on every write, so a restart, even after SIGKILL, keeps every
write Redis acknowledged), bound to 127.0.0.1 on ports picked
free at start, in a temporary directory, and stops it when the session ends. They are
session-wide (starting a cluster takes seconds); tests stay apart by key prefix, never by
flushing, so no test can see another's keys. Under CI=true a missing ``redis-server`` is a
failure (``require_service``), locally a skip.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["REDIS_SERVER", "RedisCluster", "RedisServer", "running_cluster", "running_redis", "running_tls_redis"]

REDIS_SERVER = shutil.which("redis-server")
"""The redis-server binary, or None when it is not installed."""

START_TIMEOUT_S = 20.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisServer:
    """One running redis-server child process."""

    port: int
    process: subprocess.Popen[bytes]
    log: Path
    args: list[str]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def restart(self) -> None:
        """Start it again on the same port (after :meth:`stop` or :meth:`kill`), empty unless it keeps an
        append-only file (then with everything it acknowledged); wait for PONG."""
        self.process = _launch(self.args)
        if not _wait_for_pong(self.port, self.process):
            raise RuntimeError(f"redis-server did not start again on port {self.port}")

    def kill(self) -> None:
        """SIGKILL: no chance to write anything more (what it acknowledged is in its AOF, if it has one)."""
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _launch(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for_pong(port: int, process: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        if _ping(port):
            return True
        time.sleep(0.02)
    return False


def _start(directory: Path, *extra: str) -> RedisServer:
    """Start redis-server on a free port (retrying if another process took it first); wait for PONG."""
    assert REDIS_SERVER is not None
    directory.mkdir(parents=True, exist_ok=True)
    last_error = ""
    for _ in range(5):
        port = _free_port()
        log = directory / f"redis-{port}.log"
        args = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", str(directory), "--logfile", str(log), *(a.replace("{port}", str(port)) for a in extra)]
        process = _launch(args)
        if _wait_for_pong(port, process):
            return RedisServer(port, process, log, args)
        if process.poll() is None:
            process.kill()
        process.wait()
        last_error = (process.stderr.read().decode(errors="replace") if process.stderr else "") + (
            log.read_text(errors="replace") if log.exists() else ""
        )
    raise RuntimeError(f"redis-server did not start:\n{last_error}")


AOF_ALWAYS = ("--appendonly", "yes", "--appendfsync", "always")
"""Persistence for restart tests: every write is in the append-only file before Redis answers it."""


@contextlib.contextmanager
def running_redis(directory: Path, *, aof: bool = False) -> Iterator[RedisServer]:
    """A standalone redis-server for the block (with ``aof``: persisted in an fsynced append-only file)."""
    server = _start(directory, *(AOF_ALWAYS if aof else ()))
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def running_tls_redis(directory: Path, cert: Path, key: Path, ca: Path) -> Iterator[tuple[RedisServer, int]]:
    """A standalone redis-server that also serves TLS (``cert``/``key``; clients need no certificate):
    yields the server (its plain port answers the start-up PING) and its TLS port."""
    tls_port = _free_port()
    tls = ["--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key)]
    server = _start(directory, *tls, "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no")
    try:
        yield server, tls_port
    finally:
        server.stop()


@dataclass
class RedisCluster:
    """A running Redis Cluster of three masters, no replicas."""

    servers: list[RedisServer]

    @property
    def seeds(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", s.port) for s in self.servers]

    @property
    def url(self) -> str:
        """The cluster form of the store URL, naming every node as a seed."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in self.servers)


@contextlib.contextmanager
def running_cluster(directory: Path, masters: int = 3) -> Iterator[RedisCluster]:
    """A Redis Cluster (``masters`` masters on loopback, all slots assigned, state ok) for the block."""
    servers: list[RedisServer] = []
    try:
        for i in range(masters):
            bus = _free_port()
            servers.append(
                _start(
                    directory / f"node{i}",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    str(bus),
                    "--cluster-config-file",
                    "nodes-{port}.conf",
                    "--cluster-node-timeout",
                    "5000",
                )
            )
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is missing (it comes with redis-server)")
        nodes = [f"127.0.0.1:{s.port}" for s in servers]
        subprocess.run(
            [cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 60
        while True:
            states = [
                subprocess.run(
                    [cli, "-p", str(s.port), "cluster", "info"], capture_output=True, text=True, timeout=10
                ).stdout
                for s in servers
            ]
            if all("cluster_state:ok" in info for info in states):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster never reached state ok: {states}")
            time.sleep(0.1)
        yield RedisCluster(servers)
    finally:
        for server in servers:
            server.stop()
