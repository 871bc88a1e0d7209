"""The broker under test: one or more nodes the bench starts as subprocesses, or one already running.

A started broker is ``python -m broker serve`` on free ports with a temporary data dir; its
URLs are read from the lines it prints: ``relay-broker listening on tcp://HOST:PORT`` (TCP) and
``WebSocket ws://HOST:PORT/relay`` (``--transport ws``). With ``tls`` it also serves ``tls://``
and ``wss://`` (printed on the same lines) with a certificate for 127.0.0.1 from a CA made
for the run (trustme, in the temp dir; :attr:`BrokerTarget.ca_file` is what clients trust).
Its process is watched with psutil so CPU time and RSS are the broker's alone. For a running
broker (``--url``) the bench needs the signing secret to mint tokens (``--data-dir`` of that
broker), for CPU/RSS figures its process (``--broker-pid``, or found by the listening port),
and over TLS the CA to trust unless the system's does (``--ca-file``).

Over Redis (``store``), the bench can start Redis itself (:class:`RedisServer`: a private
``redis-server`` on a free loopback port, no persistence, in the temp dir) and several nodes
over it: each node gets the same data dir, so they share one token secret. Senders connect
to the first node (:attr:`BrokerTarget.url`), recipients to the last
(:attr:`BrokerTarget.receive_url`): with one node they are the same. Redis's process is
watched like the nodes' (found by port for a Redis the bench did not start), so
:meth:`BrokerTarget.cpu_times` gives CPU time per node and for Redis.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import psutil

from broker.auth import Authenticator, load_or_create_secret

__all__ = ["BenchError", "BrokerTarget", "Node", "RedisServer", "raise_nofile_limit", "relay_version"]

BROKER_START_TIMEOUT_S = 20.0
"""Longest a started broker (or Redis) may take to print its listening line."""
START_REDIS = "redis"
"""``--store redis``: the bench starts a private Redis and uses it."""


class BenchError(Exception):
    """The bench cannot run as asked (bad options, broker failed to start); the message says why."""


def relay_version() -> str:
    """The installed relay package version plus the git commit of the source tree, if known."""
    try:
        from importlib.metadata import version

        v = version("relay")
    except Exception:
        v = "unknown"
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{v}+{commit}" if commit else v


def raise_nofile_limit() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit (children inherit it); returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _pid_listening_on(port: int) -> int | None:
    try:
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                return int(c.pid)
    except (psutil.Error, OSError):
        return None
    return None


TLS_TRANSPORTS = {"tls": "tcp", "wss": "ws"}
"""Each TLS transport and the plain one it wraps."""


def _certificates(directory: Path) -> dict[str, Path]:
    """A CA made for this run and a certificate for 127.0.0.1 and localhost from it (trustme): the files ``ca``,
    ``cert`` and ``key``. Raises BenchError if trustme is not installed."""
    try:
        import trustme
    except ImportError:
        raise BenchError("TLS runs make their certificate with trustme: pip install 'relay[bench]'") from None
    directory.mkdir(parents=True)
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    files = {"ca": directory / "ca.pem", "cert": directory / "cert.pem", "key": directory / "key.pem"}
    ca.cert_pem.write_to_path(files["ca"])
    leaf.cert_chain_pems[0].write_to_path(files["cert"])
    leaf.private_key_pem.write_to_path(files["key"])
    return files


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _watch(pid: int | None) -> psutil.Process | None:
    if pid is None:
        return None
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _stop(popen: subprocess.Popen[str]) -> None:
    if popen.poll() is None:
        popen.terminate()
        try:
            popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()


class RedisServer:
    """A private ``redis-server`` the bench starts: loopback, a free port, no persistence, its own dir."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise BenchError("--store redis starts a private Redis, but redis-server is not on PATH")
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "redis.log"
        for _attempt in range(3):  # a free port can be taken between the probe and Redis's bind
            self.port = _free_port()
            self.command = [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
                "--logfile",
                str(self.log),
            ]
            self.popen: subprocess.Popen[str] = subprocess.Popen(
                self.command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, text=True
            )
            if self._wait_ready():
                self.process = psutil.Process(self.popen.pid)
                return
            _stop(self.popen)
        raise BenchError(f"redis-server did not start ({shlex.join(self.command)}):\n{self.log_tail()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + BROKER_START_TIMEOUT_S
        while time.monotonic() < deadline and self.popen.poll() is None:
            if "Ready to accept connections" in self.log_tail():
                return True
            time.sleep(0.01)
        return False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def close(self) -> None:
        _stop(self.popen)


@dataclass
class Node:
    """One broker process: its URL and, when watched, its process (and its Popen when the bench started it)."""

    url: str
    process: psutil.Process | None
    popen: subprocess.Popen[str] | None = None
    command: list[str] | None = None
    log: Path | None = None
    urls: dict[str, str] = field(default_factory=dict)
    """Every URL the node serves, by scheme (tcp, ws, and with TLS tls, wss); ``url`` is the transport's."""

    @classmethod
    def start(
        cls, transport: str, data_dir: Path, log: Path, broker_args: list[str], tls: dict[str, Path] | None = None
    ) -> Node:
        """Start ``python -m broker serve`` on free ports with ``data_dir``; with ``tls`` (``cert`` and ``key``
        files) it also serves tls:// and wss://. Raises BenchError."""
        tls_args: list[str] = []
        if tls is not None:
            tls_args = ["--listeners", "tcp,ws,http,tls,wss", "--tls-port", "0", "--wss-port", "0"]
            tls_args += ["--tls-cert-file", str(tls["cert"]), "--tls-key-file", str(tls["key"])]
        command = [
            sys.executable,
            "-m",
            "broker",
            "--log-level",
            "WARNING",
            "serve",
            "--host",
            "127.0.0.1",
            "--tcp-port",
            "0",
            "--http-port",
            "0",
            "--ws-port",
            "0",
            "--data-dir",
            str(data_dir),
            *tls_args,
            *broker_args,
        ]
        log_file = log.open("w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        popen = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
            env=env,
            cwd=Path(__file__).resolve().parent.parent,
        )
        log_file.close()
        assert popen.stdout is not None
        url: str | None = None
        deadline = time.monotonic() + BROKER_START_TIMEOUT_S
        got: list[str] = []
        reader_done = threading.Event()

        def read_first() -> None:
            assert popen.stdout is not None
            for line in popen.stdout:
                got.append(line)
                if line.startswith("WebSocket "):  # printed right after "listening on tcp://..."
                    break
            reader_done.set()

        t = threading.Thread(target=read_first, daemon=True)
        t.start()
        while time.monotonic() < deadline and not reader_done.is_set() and popen.poll() is None:
            time.sleep(0.01)
        lines = list(got)
        urls: dict[str, str] = {}
        # "relay-broker listening on tcp://... tls://... (store: ...)", then "WebSocket ws://... wss://..., HTTP API"
        for line in lines:
            if "listening on " in line:
                found = line.split("listening on ", 1)[1].split(" (", 1)[0].split()
            elif line.startswith("WebSocket "):
                found = line.removeprefix("WebSocket ").split(",", 1)[0].split()
            else:
                continue
            urls.update((u.split("://", 1)[0], u) for u in found if "://" in u)
        url = urls.get(transport)
        if url is None or urlsplit(url).port is None:
            _stop(popen)
            log_text = log.read_text(errors="replace")[-2000:]
            raise BenchError(f"the broker did not start ({' '.join(command)}):\n{''.join(lines)}{log_text}")
        # Keep draining its stdout so it never blocks on a full pipe.
        threading.Thread(target=lambda: [None for _ in popen.stdout or ()], daemon=True).start()
        return cls(url, psutil.Process(popen.pid), popen=popen, command=command, log=log, urls=urls)

    def log_tail(self) -> str:
        if self.log is None:
            return ""
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""


class BrokerTarget:
    """The broker a scenario runs against: its node(s), token minting, operator stats, CPU and RSS."""

    def __init__(
        self,
        nodes: list[Node],
        secret: bytes,
        *,
        mode: str,
        store: str | None = None,
        redis: RedisServer | None = None,
        workdir: Path | None = None,
        ca_file: Path | None = None,
    ) -> None:
        self.nodes = nodes
        self.mode = mode  # "subprocess" or "external"
        self.store = store
        """The started nodes' store URL (None: the in-memory store, or an external broker's own)."""
        self.redis = redis
        """The Redis the bench started (``--store redis``), stopped with the nodes."""
        self.redis_process = redis.process if redis is not None else None
        if self.redis_process is None and store is not None:  # a Redis on this host: found by its port
            seed = urlsplit(store.split(",")[0])
            if seed.hostname in ("127.0.0.1", "localhost", "::1"):
                self.redis_process = _watch(_pid_listening_on(seed.port or 6379))
        self._auth = Authenticator(secret)
        self.secret = secret
        self._workdir = workdir
        self.ca_file = str(ca_file) if ca_file is not None else None
        """The CA clients trust for tls:// and wss:// (None: the system's trust store)."""

    # ------------------------------------------------------------ construction

    @classmethod
    def start(
        cls,
        transport: str = "tcp",
        broker_args: list[str] | None = None,
        *,
        store: str | None = None,
        nodes: int = 1,
        tls: bool = False,
    ) -> BrokerTarget:
        """Start ``nodes`` brokers (one data dir, so one secret) over ``store`` (``"redis"``: a private Redis the
        bench starts first; None: the in-memory store, one node only); with ``tls`` (or a TLS ``transport``) they
        also serve tls:// and wss:// with a certificate from a CA made for the run. Raises BenchError."""
        if nodes > 1 and store is None:
            raise BenchError("several nodes need a shared store: add --store redis (or --store redis://HOST:PORT/DB)")
        workdir = Path(tempfile.mkdtemp(prefix="relay-bench-"))
        data_dir = workdir / "data"
        redis: RedisServer | None = None
        started: list[Node] = []
        try:
            if store == START_REDIS:
                redis = RedisServer(workdir / "redis")
                store = redis.url
            args = [*(broker_args or []), *(["--store", store] if store else [])]
            certs = _certificates(workdir / "certs") if tls or transport in TLS_TRANSPORTS else None
            for i in range(nodes):  # one after the other: the first creates the secret the others read
                started.append(Node.start(transport, data_dir, workdir / f"broker-{i + 1}.log", args, certs))
            secret = load_or_create_secret(data_dir)
        except BaseException:
            for node in reversed(started):
                if node.popen is not None:
                    _stop(node.popen)
            if redis is not None:
                redis.close()
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        ca_file = certs["ca"] if certs is not None else None
        return cls(started, secret, mode="subprocess", store=store, redis=redis, workdir=workdir, ca_file=ca_file)

    @classmethod
    def external(
        cls, url: str, data_dir: Path | None, broker_pid: int | None, ca_file: Path | None = None
    ) -> BrokerTarget:
        """A running broker at ``url``; tokens are signed with the secret in ``data_dir``. Raises BenchError."""
        if data_dir is None:
            raise BenchError(
                "--url needs --data-dir: the running broker's data directory, whose secret signs the bench's tokens"
            )
        if not (data_dir / "secret").is_file():
            raise BenchError(f"no secret file in {data_dir}: is it the running broker's --data-dir?")
        secret = load_or_create_secret(data_dir)
        pid = broker_pid
        if pid is None:
            port = urlsplit(url).port
            pid = _pid_listening_on(port) if port else None
        process = None
        if pid is not None:
            try:
                process = psutil.Process(pid)
            except psutil.Error as exc:
                raise BenchError(f"cannot watch broker process {pid}: {exc}") from None
        return cls([Node(url, process)], secret, mode="external", ca_file=ca_file)

    # ------------------------------------------------------------ use

    @property
    def url(self) -> str:
        """Where senders (and operator stats, idle connections) connect: the first node."""
        return self.nodes[0].url

    @property
    def receive_url(self) -> str:
        """Where recipients connect: the last node (the first when there is one)."""
        return self.nodes[-1].url

    def urls_for(self, scheme: str) -> tuple[str, str]:
        """(senders' URL, recipients' URL) over ``scheme`` (e.g. tls when the transport is tcp). Raises BenchError
        if the nodes do not serve it."""
        try:
            return self.nodes[0].urls[scheme], self.nodes[-1].urls[scheme]
        except KeyError:
            raise BenchError(f"the broker under test serves no {scheme}:// listener") from None

    def token(self, name: str, *, operator: bool = False) -> str:
        return self._auth.issue(name, operator=operator, lifetime_s=24 * 3600)

    async def stats(self, url: str | None = None) -> dict[str, int]:
        """A node's statistics (default the first; the store's figures are the relay's), over an operator
        connection."""
        from client import open_client

        token = self.token("bench-operator", operator=True)
        async with open_client(url or self.url, token, reconnect=False, ca_file=self.ca_file) as c:
            return await c.stats()

    async def round_trips(self) -> int | None:
        """Round trips to the store so far, summed over the nodes (STATS ``store_round_trips``; 0 in memory),
        or None when a node does not report them."""
        total = 0
        for node in self.nodes:
            value = (await self.stats(node.url)).get("store_round_trips")
            if value is None:
                return None
            total += value
        return total

    def cpu_times(self) -> dict[str, float | None]:
        """CPU seconds so far (user + system) of each watched process: ``node1``... and ``redis`` when there is
        one; None for a process that is not watched."""
        procs: dict[str, psutil.Process | None] = {f"node{i + 1}": n.process for i, n in enumerate(self.nodes)}
        if self.store is not None or self.redis_process is not None:
            procs["redis"] = self.redis_process
        out: dict[str, float | None] = {}
        for name, p in procs.items():
            try:
                t = p.cpu_times() if p is not None else None
            except psutil.Error:
                t = None
            out[name] = None if t is None else float(t.user + t.system)
        return out

    def rss(self) -> int | None:
        """The broker nodes' resident set size in bytes, summed, or None if one is not watched."""
        return _rss([n.process for n in self.nodes])

    def redis_rss(self) -> int | None:
        """Redis's resident set size in bytes, or None if it is not watched."""
        return _rss([self.redis_process]) if self.redis_process is not None else None

    def check_alive(self) -> None:
        for i, node in enumerate(self.nodes):
            if node.popen is not None and node.popen.poll() is not None:
                raise BenchError(
                    f"broker node {i + 1} exited with status {node.popen.returncode}; see {node.log_tail()}"
                )
        if self.redis is not None and self.redis.popen.poll() is not None:
            raise BenchError(f"redis-server exited with status {self.redis.popen.returncode}; {self.redis.log_tail()}")

    def close(self) -> None:
        """Stop started nodes (SIGTERM, then SIGKILL), then a started Redis, and remove the temp dir."""
        for node in reversed(self.nodes):
            if node.popen is not None:
                _stop(node.popen)
                node.popen = None
        if self.redis is not None:
            self.redis.close()
            self.redis = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> BrokerTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rss(procs: list[psutil.Process | None]) -> int | None:
    total = 0
    for p in procs:
        if p is None:
            return None
        try:
            total += int(p.memory_info().rss)
        except psutil.Error:
            return None
    return total
