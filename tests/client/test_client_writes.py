"""How the client writes and watches its connection, against a scripted broker on 127.0.0.1.

The scripted broker is the sans-IO ``wire.Connection`` on a real TCP socket, so a test
decides exactly when it reads and what it answers: a broker that stops reading makes the
client's direct writes fall short of the socket, and one that never answers makes its
keepalive watchdog give up.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

from client import ConnectionLost, OutgoingMessage, open_client
from wire import Connection, Frame, Hello, Ping, Pong, Receipt, RecipientResult, Role, Send, Status, Welcome

TIMEOUT = 20
Script = Callable[[trio.SocketStream, Connection], Awaitable[None]]


def welcome(keepalive_s: int = 30) -> Welcome:
    return Welcome(
        version=1,
        session="scripted",
        mailbox="alice",
        pending=0,
        max_frame_bytes=1024 * 1024,
        max_inflight=1024,
        max_recipients=16,
        default_ttl_s=3600,
        max_ttl_s=3600,
        keepalive_s=keepalive_s,
        expires_in_s=3600,
    )


async def read_frames(stream: trio.SocketStream, conn: Connection) -> list[Frame]:
    """The frames of the next chunk; at the end of the stream, wait to be cancelled."""
    try:
        data = await stream.receive_some(1 << 20)
    except trio.BrokenResourceError:
        data = b""
    if not data:
        await trio.sleep_forever()
    return conn.receive_data(data)


@asynccontextmanager
async def scripted_broker(script: Script, keepalive_s: int = 30) -> AsyncIterator[str]:
    """A one-connection broker on a free port: HELLO -> WELCOME, then ``script`` runs the connection."""

    async def handle(stream: trio.SocketStream) -> None:
        conn = Connection(Role.BROKER)
        frames: list[Frame] = []
        while not frames:
            frames = await read_frames(stream, conn)
        assert isinstance(frames[0], Hello)
        await stream.send_all(conn.send(welcome(keepalive_s)))
        await script(stream, conn)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        yield f"tcp://127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


async def test_a_burst_larger_than_the_socket_buffers_arrives_whole_and_in_order() -> None:
    """The direct write takes what the socket holds; the writer sends the rest first, then anything newer."""
    n, body = 3000, bytes(range(256)) * 64  # 48 MiB of SENDs: many times what loopback buffers hold
    seen: list[str] = []
    writer_blocked = trio.Event()

    async def script(stream: trio.SocketStream, conn: Connection) -> None:
        await writer_blocked.wait()  # read nothing until the client's writer is stuck on a full socket
        while len(seen) < n + 1:
            sends = [f for f in await read_frames(stream, conn) if isinstance(f, Send)]
            for f in sends:
                assert f.body == (body if f.id != "after" else b"late")
                seen.append(f.id)
            answers = [Receipt(id=f.id, results={"bob": RecipientResult(Status.QUEUED)}) for f in sends]
            await stream.send_all(b"".join(conn.send(r) for r in answers))
        await trio.sleep_forever()

    with trio.fail_after(TIMEOUT):
        async with scripted_broker(script) as url, open_client(url, "token", reconnect=False, e2e=False) as client:
            async with trio.open_nursery() as nursery:
                batch = [OutgoingMessage(to="bob", body=body, id=f"m{i}") for i in range(n)]
                nursery.start_soon(client.send_batch, batch)
                # The socket cannot take 48 MiB while nobody reads: the writer task must end up holding the rest
                # (if the direct write took everything, this waits until TIMEOUT and the test fails).
                while not client._writing:
                    await trio.sleep(0.01)
                late = trio.Event()

                async def send_late() -> None:
                    nonlocal receipt
                    receipt = await client.send("bob", b"late", id="after")
                    late.set()

                receipt = None
                nursery.start_soon(send_late)
                await trio.sleep(0.05)  # the late SEND is queued behind the burst, not written yet
                writer_blocked.set()
                await late.wait()
            assert receipt is not None
            assert receipt.results["bob"].status is Status.QUEUED
    assert seen == [f"m{i}" for i in range(n)] + ["after"]


@pytest.mark.parametrize("answer_pings", [False, True], ids=["silent", "answers-pings"])
async def test_keepalive_pings_an_idle_broker_and_gives_up_on_a_silent_one(answer_pings: bool) -> None:
    pings = 0

    async def script(stream: trio.SocketStream, conn: Connection) -> None:
        nonlocal pings
        while True:
            for f in await read_frames(stream, conn):
                if isinstance(f, Ping):
                    pings += 1
                    if answer_pings:
                        await stream.send_all(conn.send(Pong()))

    with trio.fail_after(TIMEOUT):
        async with scripted_broker(script, keepalive_s=1) as url:
            async with open_client(url, "token", reconnect=False, e2e=False) as client:
                if answer_pings:
                    await trio.sleep(2.5)  # past keepalive_s: PONGs to our PINGs keep it open
                    assert client.connected and pings >= 3
                else:
                    with pytest.raises(ConnectionLost, match="nothing received"):
                        async for _ in client.deliveries():
                            pass
                    assert pings >= 2  # about every keepalive_s / 3 while waiting
