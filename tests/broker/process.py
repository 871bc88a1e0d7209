"""A broker in its own process (``python -m broker serve`` on free ports), for tests that signal it or read its RSS."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import trio

_LISTENING = re.compile(rb"tcp://127\.0\.0\.1:(\d+).*\nWebSocket ws://127\.0\.0\.1:(\d+)")


async def start_broker_process(data_dir: Path, log_path: Path, *settings: str) -> tuple[trio.Process, int, int]:
    """Start a broker with ``settings`` (extra ``serve`` flags); returns it with its TCP and WebSocket ports.

    Its log goes to ``log_path``: a pipe nobody reads would fill up and stall the broker. The caller stops it.
    """
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
    return process, int(match.group(1)), int(match.group(2))
