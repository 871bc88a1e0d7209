"""SENDs across links, against a scripted broker on 127.0.0.1 that serves each connection its own script.

A SEND waits in the pending table with its fields, and each link encodes it through its own state
machine: a send made while reconnecting is judged at once and written on the next link, and a
pending SEND that the next broker's frame limit cannot take fails (its whole batch) instead of
being written there.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

from client import ErrorCode, OutgoingMessage, RelayError, Status, open_client
from wire import Connection, Frame, Hello, Receipt, RecipientResult, Role, Send, Welcome

TIMEOUT = 20
FAST = {"backoff_initial_s": 0.01, "backoff_max_s": 0.02, "e2e": False}  # scripted brokers: no key directory
Script = Callable[[trio.SocketStream, Connection], Awaitable[None]]


def welcome(max_frame_bytes: int) -> Welcome:
    return Welcome(
        version=1,
        session="scripted",
        mailbox="alice",
        pending=0,
        max_frame_bytes=max_frame_bytes,
        max_inflight=1024,
        max_recipients=16,
        default_ttl_s=3600,
        max_ttl_s=3600,
        keepalive_s=30,
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


async def read_sends(stream: trio.SocketStream, conn: Connection, n: int) -> list[Send]:
    sends: list[Send] = []
    while len(sends) < n:
        sends += [f for f in await read_frames(stream, conn) if isinstance(f, Send)]
    return sends


async def answer(stream: trio.SocketStream, conn: Connection, sends: list[Send]) -> None:
    receipts = [Receipt(id=s.id, results={"bob": RecipientResult(Status.QUEUED)}) for s in sends]
    await stream.send_all(b"".join(conn.send(r) for r in receipts))


@asynccontextmanager
async def scripted_links(links: list[tuple[Welcome, trio.Event | None, Script]]) -> AsyncIterator[str]:
    """A broker whose n-th connection waits for its event (if any), answers HELLO with its WELCOME and runs its
    script; the connection closes when the script returns."""
    accepted = 0

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal accepted
        welcome_frame, gate, script = links[accepted]
        accepted += 1
        conn = Connection(Role.BROKER)
        frames: list[Frame] = []
        while not frames:
            frames = await read_frames(stream, conn)
        assert isinstance(frames[0], Hello)
        if gate is not None:
            await gate.wait()
        await stream.send_all(conn.send(welcome_frame))
        await script(stream, conn)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        yield f"tcp://127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


async def test_an_unknown_option_raises_type_error_before_connecting() -> None:
    with pytest.raises(TypeError, match="reconect"):
        async with open_client("tcp://127.0.0.1:9", "token", reconect=False):  # type: ignore[call-arg]
            pass


async def test_a_send_made_while_reconnecting_is_judged_at_once_and_written_on_the_next_link() -> None:
    second_welcome = trio.Event()
    seen: list[str] = []

    async def hang_up(stream: trio.SocketStream, conn: Connection) -> None:
        return

    async def serve(stream: trio.SocketStream, conn: Connection) -> None:
        sends = await read_sends(stream, conn, 1)
        seen.extend(s.id for s in sends)
        await answer(stream, conn, sends)
        await trio.sleep_forever()

    links = [(welcome(1024), None, hang_up), (welcome(1024), second_welcome, serve)]
    with trio.fail_after(TIMEOUT):
        async with scripted_links(links) as url, open_client(url, "token", **FAST) as client:
            while client.connected:
                await trio.sleep(0.01)
            # No link: judged without one, against the last WELCOME's limit, before the next link exists.
            with pytest.raises(RelayError) as too_large:
                await client.send("bob", b"x" * 2000, id="big")
            assert too_large.value.code == ErrorCode.FRAME_TOO_LARGE
            with pytest.raises(ValueError, match="invalid message"):
                await client.send("bob", b"x", id="not an id!")
            assert client.connects == 1 and not client.connected
            async with trio.open_nursery() as nursery:
                receipts: list[Receipt] = []

                async def send_late() -> None:
                    receipts.append(await client.send("bob", b"hello", id="late"))

                nursery.start_soon(send_late)
                await trio.sleep(0.05)
                assert not receipts and seen == []  # waiting for the next link
                second_welcome.set()
            assert receipts[0].results["bob"].status is Status.QUEUED
            assert seen == ["late"] and client.connects == 2


async def test_a_pending_send_the_next_broker_cannot_take_fails_with_its_batch_and_is_not_written_again() -> None:
    seen_first: list[str] = []
    seen_second: list[str] = []

    async def read_and_hang_up(stream: trio.SocketStream, conn: Connection) -> None:
        seen_first.extend(s.id for s in await read_sends(stream, conn, 4))  # no receipts: all stay pending

    async def serve(stream: trio.SocketStream, conn: Connection) -> None:
        while True:
            sends = [f for f in await read_frames(stream, conn) if isinstance(f, Send)]
            seen_second.extend(s.id for s in sends)
            await answer(stream, conn, sends)

    links = [(welcome(64 * 1024), None, read_and_hang_up), (welcome(1024), None, serve)]
    outcomes: dict[str, object] = {}

    async def run(key: str, call: Callable[[], Awaitable[object]]) -> None:
        try:
            outcomes[key] = await call()
        except RelayError as exc:
            outcomes[key] = exc

    with trio.fail_after(TIMEOUT):
        async with scripted_links(links) as url, open_client(url, "token", **FAST) as client:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run, "big", partial(client.send, "bob", b"x" * 20_000, id="big"))
                nursery.start_soon(run, "small", partial(client.send, "bob", b"small", id="small"))
                pair = [
                    OutgoingMessage("bob", b"fits", id="pair-small"),
                    OutgoingMessage("bob", b"y" * 20_000, id="pair-big"),
                ]
                nursery.start_soon(run, "pair", partial(client.send_batch, pair))
    assert sorted(seen_first) == ["big", "pair-big", "pair-small", "small"]
    assert seen_second == ["small"]  # neither the big one nor anything of the batch it failed
    big, pair_error = outcomes["big"], outcomes["pair"]
    assert isinstance(big, RelayError) and big.code == ErrorCode.FRAME_TOO_LARGE
    assert isinstance(pair_error, RelayError) and pair_error.code == ErrorCode.FRAME_TOO_LARGE
    small = outcomes["small"]
    assert isinstance(small, Receipt) and small.results["bob"].status is Status.QUEUED
