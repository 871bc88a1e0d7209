"""Unauthenticated connections cannot make the broker hold memory: frames before WELCOME are small.

Mosquitto-style abuse: a few hundred connections, none with a token, each declaring a frame of about a
megabyte and sending most of it (TCP). Each is refused with FRAME_TOO_LARGE once it passes the pre-WELCOME
limit, and connections that stay within it while waiting for the handshake timeout hold at most that limit
each. The broker runs in its own process so that its resident memory can be read.

WebSocket (protocol.md 2.5): the message limit is fixed at max_frame_bytes + 4 when the WebSocket is
accepted, so before WELCOME a connection can make the broker assemble one message of up to that size; a
HELLO above 8,192 bytes in it is refused by the decoder (FRAME_TOO_LARGE) and a larger message is closed
with 1009 by trio-websocket. That flood runs after the memory is measured: its transient buffers are
bounded by max_frame_bytes + 4 per connection, not by the pre-WELCOME limit.
"""

from __future__ import annotations

from pathlib import Path

import psutil
import trio

from broker.auth import Authenticator, load_or_create_secret
from wire import MAX_HELLO_FRAME_BYTES, Drained, Error, ErrorCode

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


async def _huge_websocket_message(port: int, size: int) -> None:
    from trio_websocket import ConnectionClosed, open_websocket_url

    async with open_websocket_url(f"ws://127.0.0.1:{port}/relay", max_message_size=2**21) as ws:
        try:
            await ws.send_message(size.to_bytes(4, "big") + b"\x00" * size)
            message = await ws.get_message()
        except ConnectionClosed as exc:
            assert size > HUGE and exc.reason is not None and exc.reason.code == 1009  # over the message limit
            return
        assert isinstance(message, bytes) and b"\x19\x03\xea" in message  # ERROR code 1002 (0x3ea)


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
            async with trio.open_nursery() as nursery:
                for i in range(CONNECTIONS):  # within the message limit (1002), and over it (1009)
                    nursery.start_soon(_huge_websocket_message, ws_port, HUGE if i % 2 else 2 * HUGE)

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
