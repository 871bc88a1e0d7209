"""StreamTransport: over memory streams (the bytes, the errors) and over real sockets (the os.write
fast path, the linger that lets a last frame reach the peer)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from wire.transport import StreamTransport, TransportClosed

TIMEOUT_S = 10


async def test_bytes_pass_unchanged_both_ways_over_memory_streams() -> None:
    left, right = trio.testing.memory_stream_pair()
    a, b = StreamTransport(left), StreamTransport(right)
    with trio.fail_after(TIMEOUT_S):
        await a.send_all(b"\x00\x00\x00\x01x" + b"\x00\x00")  # any bytes: a stream ignores frame boundaries
        got = b""
        while len(got) < 7:
            got += await b.receive_some()
        assert got == b"\x00\x00\x00\x01x\x00\x00"
        await b.send_all(b"back")
        assert await a.receive_some() == b"back"
        assert a.send_some_nowait(b"no fast path on a memory stream") == 0
        await a.aclose()
        assert await b.receive_some() == b""  # the peer's close is a clean end


async def test_use_after_close_is_transport_closed() -> None:
    left, _right = trio.testing.memory_stream_pair()
    a = StreamTransport(left)
    await a.aclose()
    await a.aclose()  # idempotent
    with pytest.raises(TransportClosed):
        await a.send_all(b"x")
    with pytest.raises(TransportClosed):
        await a.receive_some()
    assert a.send_some_nowait(b"x") == 0


async def test_a_broken_stream_is_transport_closed() -> None:
    left, right = trio.testing.lockstep_stream_pair()
    a = StreamTransport(left)
    await right.aclose()
    with trio.fail_after(TIMEOUT_S), pytest.raises(TransportClosed):
        await a.send_all(b"x")


async def _tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    await listeners[0].aclose()
    assert isinstance(server, trio.SocketStream)
    return client, server


async def test_send_some_nowait_writes_to_the_socket_until_its_buffer_is_full() -> None:
    client, server = await _tcp_pair()
    a, b = StreamTransport(client), StreamTransport(server)
    with trio.fail_after(TIMEOUT_S):
        assert a.send_some_nowait(b"direct") == 6
        assert await b.receive_some() == b"direct"
        # Fill the kernel buffers: the fast path then takes part of a write, then nothing (never blocks).
        chunk = b"y" * 65536
        written = 0
        while (n := a.send_some_nowait(chunk)) == len(chunk):
            written += n
        written += n
        assert a.send_some_nowait(chunk) == 0
        got = 0
        while got < written:
            got += len(await b.receive_some())
        assert got == written
        await a.aclose()
        assert a.send_some_nowait(b"x") == 0  # the descriptor is forgotten before the socket closes
        await b.aclose()


@pytest.mark.parametrize("linger", [True, False])
async def test_linger_lets_the_last_bytes_reach_a_peer_that_is_still_sending(linger: bool) -> None:
    """The peer has sent bytes we never read; closing without linger resets the connection (RST),
    which destroys what we wrote last (the ERROR frame, for the broker). With linger it arrives."""
    client, server = await _tcp_pair()
    peer, ours = StreamTransport(client), StreamTransport(server, linger=linger)
    with trio.fail_after(TIMEOUT_S):
        await peer.send_all(b"unread" * 1000)
        await trio.sleep(0.05)  # in our receive buffer now
        await ours.send_all(b"last words")
        async with trio.open_nursery() as nursery:
            if linger:
                nursery.start_soon(ours.aclose)  # drains until the peer closes too
            else:
                await ours.aclose()
            got = b""
            try:
                while chunk := await peer.receive_some():
                    got += chunk
                ended_cleanly = True
            except TransportClosed:  # connection reset
                ended_cleanly = False
            await peer.aclose()
        if linger:
            assert (got, ended_cleanly) == (b"last words", True)
        else:
            assert not ended_cleanly
