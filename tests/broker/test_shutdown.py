"""Stopping the broker: every session is told SHUTTING_DOWN; SIGTERM ends the process gracefully."""

from __future__ import annotations

import re
import signal
import sys
from pathlib import Path

import trio

from broker.auth import Authenticator, load_or_create_secret
from wire import Drained, Error, ErrorCode

from ..conftest import running_broker
from .raw import RawClient

TIMEOUT = 15


async def test_shutdown_tells_every_session(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_broker(tmp_path) as broker:
            assert broker.tcp_port is not None
            clients = []
            for name in ("alice", "bob"):
                client, _ = await RawClient.login(broker.tcp_port, broker.auth.issue(name))
                await client.expect(Drained)
                clients.append(client)
        # The broker's block has ended: it cancelled serve(), which closed every session.
        for client in clients:
            error = await client.expect(Error)
            assert (error.code, error.close) == (ErrorCode.SHUTTING_DOWN, True)
            await client.expect_closed()


async def test_sigterm_stops_the_broker_process_gracefully(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    command = [
        sys.executable,
        "-m",
        "broker",
        "serve",
        "--tcp-port",
        "0",
        "--ws-port",
        "0",
        "--http-port",
        "0",
        "--data-dir",
        str(data_dir),
    ]
    with trio.fail_after(TIMEOUT):
        process = await trio.lowlevel.open_process(command, stdout=-1, stderr=-1)
        try:
            assert process.stdout is not None
            seen = b""
            while (match := re.search(rb"listening on tcp://127\.0\.0\.1:(\d+)", seen)) is None:
                chunk = await process.stdout.receive_some(4096)
                assert chunk, f"the broker exited before listening: {seen!r}"
                seen += chunk
            token = Authenticator(load_or_create_secret(data_dir)).issue("bob")
            client, _ = await RawClient.login(int(match.group(1)), token)
            await client.expect(Drained)
            process.send_signal(signal.SIGTERM)
            error = await client.expect(Error)
            assert (error.code, error.close) == (ErrorCode.SHUTTING_DOWN, True)
            await client.expect_closed()
            assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
