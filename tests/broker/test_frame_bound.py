"""Every frame the broker emits fits the ``max_frame_bytes`` it announced in WELCOME, whatever a client sends.

The property runs the real broker (its sessions, routing and store) over in-memory streams: for any
configuration the broker accepts and any sequence of frames a client may legally send (each within the
announced limit), a decoder whose receive limit is exactly the announced figure reads every frame the broker
writes, up to the PONG that follows the client's last frame.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cbor2
import trio
import trio.testing
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from broker.auth import Authenticator
from broker.config import BrokerConfig, ConfigError
from broker.server import Broker
from broker.store.memory import MemoryStore
from wire import (
    PROTOCOL_VERSION,
    Ack,
    Connection,
    Drained,
    Error,
    Frame,
    FrameDecoder,
    Hello,
    Ping,
    Pong,
    Pull,
    Receipt,
    Role,
    Send,
    Stats,
    Welcome,
    encode_frame,
    receipt_bound_bytes,
)
from wire.transport import StreamTransport

SECRET = b"s" * 32
# Recipients that stress the receipt: mailbox ids (some online), and invalid names from one character to 64
# four-byte code points, each echoed in the receipt with a refusal.
NAME_KINDS = {
    "valid": lambda i: f"r{i}",
    "short-invalid": lambda i: chr(0xE9 + i % 20),
    "long-invalid": lambda i: "\U0001f600" * 63 + chr(0x1F600 + i % 64),
    "online": lambda i: "bob",
}
SENDS = st.builds(
    lambda i, kinds, n, size, ttl: (f"m{i}", kinds, n, size, ttl),
    st.integers(0, 50),
    st.lists(st.sampled_from(sorted(NAME_KINDS)), min_size=1, max_size=3),
    st.integers(1, 400),
    st.integers(0, 2**17),
    st.one_of(st.none(), st.integers(1, 2**40)),
)
STEPS = st.lists(st.one_of(SENDS, st.sampled_from(["pull", "ack", "bad-type"])), max_size=8)


def _client_frame(step: Any, limit: int) -> bytes:
    """The bytes of one step, made to fit the announced limit (a client must not send more)."""
    if step == "pull":
        return encode_frame(Pull())
    if step == "stats":
        return encode_frame(Stats())
    if step == "ack":
        return encode_frame(Ack(ids=tuple(f"m{i}" for i in range(51))))
    if step == "bad-type":  # a protocol violation whose ERROR quotes what the client wrote
        body = cbor2.dumps({"type": "\U0001f600" * ((limit - 16) // 4)})
        return len(body).to_bytes(4, "big") + body
    mid, kinds, n, size, ttl = step
    to = [NAME_KINDS[kinds[i % len(kinds)]](i) for i in range(n)]
    send = Send(id=mid, to=tuple(to), body=b"", ttl_s=ttl)
    while len(encode_frame(send)) - 4 > limit:  # as many recipients as fit
        to = to[: len(to) * 3 // 4]
        send = Send(id=mid, to=tuple(to), body=b"", ttl_s=ttl)
    room = limit - (len(encode_frame(send)) - 4) - 8
    return encode_frame(Send(id=mid, to=tuple(to), body=b"b" * max(0, min(size, room)), ttl_s=ttl))


async def _session(broker: Broker, token: str, steps: list[Any]) -> list[Frame]:
    """Run one connection: HELLO, the steps, PING; every frame the broker sent until PONG (or its ERROR)."""
    client_side, broker_side = trio.testing.memory_stream_pair()
    received: list[Frame] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(broker.handle_transport, StreamTransport(broker_side), "tcp")
        conn = Connection(Role.CLIENT)
        await client_side.send_all(conn.send(Hello(version=PROTOCOL_VERSION, token=token)))
        decoder: FrameDecoder | None = None
        limit = 0
        pending = b""
        done = False
        while not done:
            data = await client_side.receive_some(65536)
            if not data:
                break
            if decoder is None:
                # Until WELCOME, the protocol's default limit; WELCOME's figure from then on, exactly.
                pending += data
                frames = conn.receive_data(data)
                welcome = next((f for f in frames if type(f) is Welcome), None)
                if welcome is None:
                    continue
                limit = welcome.max_frame_bytes
                decoder = FrameDecoder(limit)
                received += decoder.feed(pending)  # raises FRAME_TOO_LARGE if any frame breaks the limit
                out = [_client_frame(s, limit) for s in steps]
                await client_side.send_all(b"".join([*out, encode_frame(Ping())]))
                continue
            for frame in decoder.feed(data):
                received.append(frame)
                if type(frame) is Pong or (type(frame) is Error and frame.close):
                    done = True
        await client_side.aclose()
        nursery.cancel_scope.cancel()
    return received


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    max_frame_bytes=st.integers(1024, 128 * 1024),
    max_recipients=st.integers(1, 400),
    online_bob=st.booleans(),
    steps=STEPS,
)
async def test_every_frame_the_broker_emits_fits_its_announced_limit(
    tmp_path: Path, max_frame_bytes: int, max_recipients: int, online_bob: bool, steps: list[Any]
) -> None:
    try:
        config = BrokerConfig(
            data_dir=tmp_path,
            max_frame_bytes=max_frame_bytes,
            max_recipients=max_recipients,
            max_outbound_bytes=max(4 * max_frame_bytes, 1024 * 1024),
        )
    except ConfigError:
        assume(False)  # the broker refuses this configuration at start-up
        return
    assert receipt_bound_bytes(config.max_recipients) <= config.max_frame_bytes
    broker = Broker(config, auth=Authenticator(SECRET), store=MemoryStore(config.store_limits))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            if online_bob:  # so that receipts say "delivered" and DELIVERs go out while alice sends
                bob_side, broker_side = trio.testing.memory_stream_pair()
                nursery.start_soon(broker.handle_transport, StreamTransport(broker_side), "tcp")
                await bob_side.send_all(
                    Connection(Role.CLIENT).send(Hello(version=PROTOCOL_VERSION, token=broker.auth.issue("bob")))
                )
            alice = await _session(broker, broker.auth.issue("alice"), steps)
            if online_bob:
                await bob_side.aclose()  # bob goes offline before his next connection
            bob = await _session(broker, broker.auth.issue("bob"), ["pull"])
            operator = await _session(broker, broker.auth.issue("ops", operator=True), ["stats"])
            nursery.cancel_scope.cancel()
    assert any(type(f) is Pong or type(f) is Error for f in alice)
    assert sum(type(f) is Receipt for f in alice) <= sum(isinstance(s, tuple) for s in steps)
    assert any(type(f) is Drained for f in bob)
    assert [f.TYPE for f in operator][-2:] == ["stats_result", "pong"]
