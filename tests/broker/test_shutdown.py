"""Stopping the broker: every session is told SHUTTING_DOWN; SIGTERM ends the process gracefully."""

from __future__ import annotations

import signal
from pathlib import Path

import trio

from broker.auth import Authenticator, load_or_create_secret
from wire import Drained, Error, ErrorCode

from ..conftest import running_broker
from .process import start_broker_process
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
    with trio.fail_after(TIMEOUT):
        process, tcp_port, _ = await start_broker_process(data_dir, tmp_path / "broker.log")
        try:
            token = Authenticator(load_or_create_secret(data_dir)).issue("bob")
            client, _ = await RawClient.login(tcp_port, token)
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
