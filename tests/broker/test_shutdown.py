"""Stopping the broker: every session is told SHUTTING_DOWN; SIGTERM ends the process gracefully, losing everything
queued with the in-memory store and nothing with Redis (README, "Two terminals")."""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path

import pytest
import trio

from broker.auth import Authenticator, load_or_create_secret
from wire import Deliver, Drained, Error, ErrorCode, Receipt, Send, Status

from ..conftest import running_broker
from ..redis_servers import running_redis
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


@pytest.mark.parametrize(("kind", "kept"), [("memory", 0), ("redis", 2)])
async def test_after_sigterm_the_memory_store_has_lost_the_queue_and_redis_has_lost_nothing(
    tmp_path: Path, kind: str, kept: int
) -> None:
    """Two messages queued for bob, the first delivered and not ACKed when SIGTERM comes: a broker started again
    on the same store holds neither (memory) or both, the in-flight one back in the queue (Redis)."""
    data_dir = tmp_path / "data"
    auth = Authenticator(load_or_create_secret(data_dir))
    with (
        trio.fail_after(TIMEOUT),
        running_redis(tmp_path / "redis") if kind == "redis" else contextlib.nullcontext() as redis,
    ):
        settings = () if redis is None else ("--store", redis.url)
        process, tcp_port, _ = await start_broker_process(data_dir, tmp_path / "broker.log", *settings)
        try:
            alice, _ = await RawClient.login(tcp_port, auth.issue("alice"))
            await alice.expect(Drained)
            await alice.send(Send(id="m0", to=("bob",), body=b"zero"), Send(id="m1", to=("bob",), body=b"one"))
            for _ in range(2):
                assert (await alice.expect(Receipt)).results["bob"].status is Status.QUEUED
            bob, welcome = await RawClient.login(tcp_port, auth.issue("bob"))
            assert welcome.pending == 2
            assert (await bob.expect(Deliver)).id == "m0"  # in flight, not ACKed
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        process, tcp_port, _ = await start_broker_process(data_dir, tmp_path / "broker2.log", *settings)
        try:
            bob, welcome = await RawClient.login(tcp_port, auth.issue("bob"))
            assert welcome.pending == kept
            frames, _ = await bob.until(Drained)
            assert [(f.id, f.body) for f in frames if isinstance(f, Deliver)] == [("m0", b"zero"), ("m1", b"one")][
                :kept
            ]
        finally:
            process.kill()
            await process.wait()
