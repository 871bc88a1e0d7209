"""A broker in its own process (``python -m broker serve`` on free ports), for tests that signal it, read its RSS or
its log."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import trio

# The announcement's first two lines, the second whole (the HTTP API's port is on it, unless it is off).
_LISTENING = re.compile(
    rb"tcp://127\.0\.0\.1:(\d+).*\nWebSocket ws://127\.0\.0\.1:(\d+)/relay"
    rb"(?:[^\n]*HTTP API http://127\.0\.0\.1:(\d+)/relay)?[^\n]*\n"
)


@dataclass(frozen=True)
class BrokerProcess:
    process: trio.Process
    tcp_port: int
    ws_port: int
    http_port: int | None
    """None if the HTTP listener is off."""


async def start_broker_process(data_dir: Path, log_path: Path, *settings: str) -> tuple[trio.Process, int, int]:
    """Start a broker with ``settings`` (extra ``serve`` flags); returns it with its TCP and WebSocket ports.

    Its log goes to ``log_path``: a pipe nobody reads would fill up and stall the broker. The caller stops it.
    """
    started = await start_broker(data_dir, log_path, *settings)
    return started.process, started.tcp_port, started.ws_port


async def start_broker(data_dir: Path, log_path: Path, *settings: str) -> BrokerProcess:
    """:func:`start_broker_process`, with the HTTP API's port too."""
    command = [
        sys.executable, "-m", "broker", "serve", "--tcp-port", "0", "--ws-port", "0", "--http-port", "0",
        "--data-dir", str(data_dir), *settings,
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = await trio.lowlevel.open_process(command, stdout=-1, stderr=log)
    assert process.stdout is not None
    seen = b""
    while (match := _LISTENING.search(seen)) is None:
        chunk = await process.stdout.receive_some(4096)
        assert chunk, f"the broker exited before listening: {seen!r} (log: {log_path.read_text()!r})"
        seen += chunk
    http = match.group(3)
    return BrokerProcess(process, int(match.group(1)), int(match.group(2)), None if http is None else int(http))
