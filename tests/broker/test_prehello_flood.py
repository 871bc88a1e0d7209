"""Unauthenticated connections cannot make the broker hold memory: frames before WELCOME are small.

Mosquitto-style abuse: a few hundred connections, none with a token, each declaring a frame of about a
megabyte and sending most of it (TCP). Each is refused with FRAME_TOO_LARGE once it passes the pre-WELCOME
limit, and connections that stay within it while waiting for the handshake timeout hold at most that limit
each. The broker runs in its own process so that its resident memory can be read.

WebSocket (protocol.md 2.5): the message limit is fixed at max_frame_bytes + 4 when the WebSocket is
accepted, so trio-websocket alone would assemble a message of about a megabyte before WELCOME. The broker
reads a WebSocket connection through a budget (broker.websocket.PREWELCOME_READ_BYTES, 32 KiB: the upgrade
request and one HELLO message) until WELCOME, so a flood of connections each sending most of a ~1 MiB
message (within the limit: no 1009) holds at most that budget each, and the same bound as TCP applies.
"""

from __future__ import annotations

from pathlib import Path

import psutil
import trio

from broker.auth import Authenticator, load_or_create_secret
from wire import MAX_HELLO_FRAME_BYTES, Drained, Error, ErrorCode

from ..websocket.wsclient import login_ws, upgraded
from .process import start_broker_process
from .raw import RawClient

CONNECTIONS = 150
HUGE = 1024 * 1024 - 1


async def _huge_tcp_frame(port: int) -> int:
    """Declare a ~1 MiB frame and send most of it; the ERROR code the broker answers with."""
    client = await RawClient.open(port)
    try:
        await client.send_raw(HUGE.to_bytes(4, "big"))
        try:
            await client.send_raw(b"\x00" * (HUGE - 1))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the broker closed the connection first: what we want
        error = await client.expect(Error)
        return error.code
    finally:
        await client.aclose()


async def _most_of_a_huge_websocket_message(stream: trio.SocketStream, sent: list[int]) -> None:
    """Start one binary message of HUGE + 4 bytes (within max_frame_bytes + 4: no 1009) and send all but its
    last byte; blocks once the broker stops reading. Masked with the key 0, so the payload is sent as is."""
    size = HUGE + 4
    header = bytes([0x82, 0x80 | 127]) + size.to_bytes(8, "big") + b"\x00" * 4
    await stream.send_all(header + HUGE.to_bytes(4, "big"))
    sent.append(1)
    chunk = b"\x00" * 65536
    left = size - 4 - 1
    while left > 0:
        await stream.send_all(chunk[:left])
        left -= len(chunk)


async def test_a_flood_of_unauthenticated_large_frames_leaves_broker_memory_flat(tmp_path: Path) -> None:
    with trio.fail_after(60):
        process, tcp_port, ws_port = await start_broker_process(
            tmp_path / "data", tmp_path / "broker.log", "--handshake-timeout-s", "60"
        )
        try:
            broker = psutil.Process(process.pid)
            idle = await RawClient.open(tcp_port)  # warm the broker up: one connection served end to end
            await idle.aclose()
            before = broker.memory_info().rss

            codes: list[int] = []
            holders: list[RawClient] = []
            async with trio.open_nursery() as nursery:

                async def flood_tcp() -> None:
                    codes.append(await _huge_tcp_frame(tcp_port))

                async def hold() -> None:
                    # Within the pre-WELCOME limit: buffered until the handshake timeout, at most the limit.
                    client = await RawClient.open(tcp_port)
                    await client.send_raw(
                        MAX_HELLO_FRAME_BYTES.to_bytes(4, "big") + b"\x00" * (MAX_HELLO_FRAME_BYTES - 1)
                    )
                    holders.append(client)

                for _ in range(CONNECTIONS):
                    nursery.start_soon(flood_tcp)
                    nursery.start_soon(hold)
            await trio.sleep(0.5)  # let the broker read what the holders sent
            grown = broker.memory_info().rss - before
            assert codes == [ErrorCode.FRAME_TOO_LARGE] * CONNECTIONS
            # Without the pre-WELCOME limit the broker held ~1 MiB per flooding connection (450 MiB here).
            assert grown < 48 * 1024 * 1024, f"broker RSS grew by {grown / 2**20:.1f} MiB"
            before = broker.memory_info().rss
            streams = [(await upgraded(ws_port))[0] for _ in range(CONNECTIONS)]
            started: list[int] = []
            async with trio.open_nursery() as flood:
                for stream in streams:
                    flood.start_soon(_most_of_a_huge_websocket_message, stream, started)
                await trio.sleep(1.0)  # let the broker read what it will of the messages
                grown = broker.memory_info().rss - before
                assert len(started) == CONNECTIONS
                # Without the pre-WELCOME read budget the broker held ~1 MiB per connection (150 MiB here).
                assert grown < 48 * 1024 * 1024, f"broker RSS grew by {grown / 2**20:.1f} MiB (WebSocket)"

                # A real WebSocket client is still served while the flood waits.
                token = Authenticator(load_or_create_secret(tmp_path / "data")).issue("wes")
                async with login_ws(ws_port, token) as (wes, _):
                    await wes.expect(Drained)
                flood.cancel_scope.cancel()
            for stream in streams:
                await trio.aclose_forcefully(stream)

            # A real client is still served while the holders wait.
            token = Authenticator(load_or_create_secret(tmp_path / "data")).issue("bob")
            bob, _ = await RawClient.login(tcp_port, token)
            await bob.expect(Drained)
            await bob.aclose()
            for client in holders:
                await client.aclose()
        finally:
            process.kill()
            await process.wait()
