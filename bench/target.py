"""The broker under test: one the bench starts as a subprocess, or one already running.

A started broker is ``python -m broker serve`` on free ports with a temporary data dir; its
URL is read from the lines it prints: ``relay-broker listening on tcp://HOST:PORT`` (TCP) and
``WebSocket ws://HOST:PORT/relay`` (``--transport ws``). Its process is watched with psutil so
CPU time and RSS are the broker's alone. For a running broker (``--url``) the bench needs the
signing secret to mint tokens (``--data-dir`` of that broker) and, for CPU/RSS figures, its
process (``--broker-pid``, or found by the listening port).
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import trio

from broker.auth import Authenticator, load_or_create_secret

__all__ = ["BenchError", "BrokerTarget", "raise_nofile_limit", "relay_version"]

BROKER_START_TIMEOUT_S = 20.0
"""Longest a started broker may take to print its listening line."""


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


class BrokerTarget:
    """The broker a scenario runs against: URL, token minting, operator stats, CPU and RSS."""

    def __init__(
        self,
        url: str,
        secret: bytes,
        *,
        process: psutil.Process | None,
        mode: str,
        popen: subprocess.Popen[str] | None = None,
        workdir: Path | None = None,
        command: list[str] | None = None,
    ) -> None:
        self.url = url
        self.mode = mode  # "subprocess" or "external"
        self.process = process
        self.command = command
        self._auth = Authenticator(secret)
        self.secret = secret
        self._popen = popen
        self._workdir = workdir
        self.stdout_lines: list[str] = []

    # ------------------------------------------------------------ construction

    @classmethod
    def start(cls, transport: str = "tcp", broker_args: list[str] | None = None) -> BrokerTarget:
        """Start ``python -m broker serve`` on free ports with a temporary data dir. Raises BenchError."""
        workdir = Path(tempfile.mkdtemp(prefix="relay-bench-"))
        data_dir = workdir / "data"
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
            *(broker_args or []),
        ]
        log = (workdir / "broker.log").open("w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        popen = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=Path(__file__).resolve().parent.parent
        )
        log.close()
        assert popen.stdout is not None
        url: str | None = None
        lines: list[str] = []
        deadline = time.monotonic() + BROKER_START_TIMEOUT_S
        got: list[str] = []
        reader_done = threading.Event()

        def read_first() -> None:
            assert popen.stdout is not None
            for line in popen.stdout:
                got.append(line)
                if line.startswith("WebSocket ws://"):  # printed right after "listening on tcp://..."
                    break
            reader_done.set()

        t = threading.Thread(target=read_first, daemon=True)
        t.start()
        while time.monotonic() < deadline and not reader_done.is_set() and popen.poll() is None:
            time.sleep(0.01)
        lines = list(got)
        for line in lines:
            if transport == "tcp" and "listening on tcp://" in line:
                url = line.split("listening on ", 1)[1].split()[0]
            elif transport == "ws" and line.startswith("WebSocket ws://"):
                url = line.split()[1].rstrip(",")
        if url is None or urlsplit(url).port is None:
            popen.kill()
            popen.wait()
            log_text = (workdir / "broker.log").read_text(errors="replace")[-2000:]
            shutil.rmtree(workdir, ignore_errors=True)
            raise BenchError(f"the broker did not start ({' '.join(command)}):\n{''.join(lines)}{log_text}")
        # Keep draining its stdout so it never blocks on a full pipe.
        threading.Thread(target=lambda: [None for _ in popen.stdout or ()], daemon=True).start()
        secret = load_or_create_secret(data_dir)
        target = cls(
            url,
            secret,
            process=psutil.Process(popen.pid),
            mode="subprocess",
            popen=popen,
            workdir=workdir,
            command=command,
        )
        target.stdout_lines = lines
        return target

    @classmethod
    def external(cls, url: str, data_dir: Path | None, broker_pid: int | None) -> BrokerTarget:
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
        return cls(url, secret, process=process, mode="external")

    # ------------------------------------------------------------ use

    def token(self, name: str, *, operator: bool = False) -> str:
        return self._auth.issue(name, operator=operator, lifetime_s=24 * 3600)

    async def stats(self) -> dict[str, int]:
        """The broker's statistics, over an operator connection."""
        from client import open_client

        async with open_client(self.url, self.token("bench-operator", operator=True), reconnect=False) as c:
            return await c.stats()

    def stats_sync(self) -> dict[str, int]:
        return trio.run(self.stats)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def cpu_s(self) -> float | None:
        """The broker process's CPU time so far (user + system), or None if it is not watched."""
        if self.process is None:
            return None
        try:
            t = self.process.cpu_times()
        except psutil.Error:
            return None
        return float(t.user + t.system)

    def rss(self) -> int | None:
        """The broker process's resident set size in bytes, or None if it is not watched."""
        if self.process is None:
            return None
        try:
            return int(self.process.memory_info().rss)
        except psutil.Error:
            return None

    def check_alive(self) -> None:
        if self._popen is not None and self._popen.poll() is not None:
            raise BenchError(f"the broker exited with status {self._popen.returncode}; see {self.log_tail()}")

    def log_tail(self) -> str:
        if self._workdir is None:
            return ""
        try:
            return (self._workdir / "broker.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def close(self) -> None:
        """Stop a started broker (SIGTERM, then SIGKILL) and remove its data dir; nothing for external ones."""
        if self._popen is not None:
            if self._popen.poll() is None:
                self._popen.terminate()
                try:
                    self._popen.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._popen.kill()
                    self._popen.wait()
            self._popen = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> BrokerTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
