"""Floods against a broker in its own process (issue 11): each flood gets its documented answer, broker memory stays
within a bound derived from the limits, and a healthy pair of clients keeps working throughout.

Every scenario starts a broker (``python -m broker serve``, tests/broker/process.py) with the settings it needs, and
two healthy clients, one over TCP and one over WebSocket, that keep sending to each other (and ACKing) for the whole
flood; each scenario holds its flood open until the pair has made progress during it, and at the end every message
the pair sent has arrived exactly once (attempt 1, the body it was sent with). The broker's RSS is sampled while it
floods (its peak must stay under the scenario's bound: the baseline plus what the limits let the broker hold, plus a
margin), and read again once the flood's connections are gone (near the baseline).

Scenarios (protocol.md section in brackets):

- slowloris: idle and half-frame connections before HELLO get 1007 HANDSHAKE_TIMEOUT, after WELCOME 4002
  KEEPALIVE_TIMEOUT (5, 2.5, rule 11); TCP and WebSocket at once.
- handshake flood: HELLOs with valid and forged tokens, past ``max_connections``: 4005 or 2001, or WELCOME for
  valid ones while there is room (rule 13, 4).
- slow consumer: a consumer that never reads while messages pour in for it gets cut off with 4003 SLOW_CONSUMER
  (rule 12; seen in the broker's log: the stalled write cannot carry the ERROR), and every message is delivered
  when it reconnects and reads.
- SENDs past every limit (:data:`LIMIT_FLOODS`): 3001, 3002, 3003, 3004, 3007 in RECEIPTs, then 1002 (and a
  WebSocket message above the limit: close 1009). A SEND-rate flood (3010) belongs in that table.
- bodies at the frame limit (``max_frame_bytes`` - 256, rule 3) in bulk both ways: delivered intact.

``RELAY_FLOOD_SCALE=5`` multiplies every flood's size; ``RELAY_FLOOD_FIGURES=<path>`` writes a JSON object of
figures per scenario (what was offered, peak, baseline and after RSS, the bound).
"""

from __future__ import annotations

import collections
import itertools
import json
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio
from trio_websocket import ConnectionClosed
from wsproto import WSConnection
from wsproto.events import BytesMessage, CloseConnection, Message

from broker.auth import Authenticator, load_or_create_secret
from wire import (
    DEFAULT_MAX_FRAME_BYTES,
    MAX_HELLO_FRAME_BYTES,
    Ack,
    Deliver,
    Drained,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    Hello,
    Ping,
    Pong,
    Receipt,
    Send,
    Stats,
    StatsResult,
    Status,
    Welcome,
    encode_frame,
)

from ..websocket.wsclient import login_ws, open_ws, upgraded
from .process import BrokerProcess, start_broker
from .raw import FrameClient, RawClient

SCALE = float(os.environ.get("RELAY_FLOOD_SCALE", "1"))
"""Multiplies the size of every flood (connections, messages)."""
FIGURES = os.environ.get("RELAY_FLOOD_FIGURES")
"""A path: each scenario adds its figures to the JSON object there."""
TIMEOUT = 60 + 60 * SCALE
MiB = 1024 * 1024
MARGIN = 48 * MiB
"""What the broker's RSS may grow by beyond what a scenario's limits let it hold (interpreter, allocator pages,
socket objects)."""
AFTER_SLACK = 48 * MiB
"""How far above its baseline the broker's RSS may end, once a flood's connections are gone (the allocator keeps
some pages)."""
PER_CONNECTION = 48 * 1024
"""A generous allowance for what one open connection costs the broker besides what it buffers (a session, its
tasks, a trio-websocket connection)."""
SLOWLORIS_PART = 4000
"""Bytes of the body a half frame sends after its length prefix."""


def scaled(n: int) -> int:
    return max(1, round(n * SCALE))


# ------------------------------------------------------------ the broker, its memory, the figures


@dataclass
class Flood:
    broker: BrokerProcess
    auth: Authenticator
    log: Path
    process: psutil.Process
    baseline: int = 0
    peak: int = 0
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def tcp(self) -> int:
        return self.broker.tcp_port

    @property
    def ws(self) -> int:
        return self.broker.ws_port

    def rss(self) -> int:
        return int(self.process.memory_info().rss)

    async def sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.rss())
            await trio.sleep(0.05)

    async def stats(self) -> dict[str, int]:
        """The broker's statistics; while a flood's closed connections are still counted against
        max_connections, the operator's own connection may be refused (4005): it tries again."""
        while True:
            operator = await RawClient.open(self.tcp)
            await operator.send(Hello(version=1, token=self.auth.issue("flood-op", operator=True)))
            welcome = await operator.next()
            if isinstance(welcome, Welcome):
                break
            await operator.aclose()
            assert isinstance(welcome, Error) and welcome.code == ErrorCode.TOO_MANY_CONNECTIONS, welcome
            await trio.sleep(0.1)
        await operator.send(Stats())
        result = await operator.expect(StatsResult)
        await operator.aclose()
        return dict(result.stats)

    async def settled(self) -> int:
        """Wait until only the healthy pair is connected (the stats connection aside): the RSS then."""
        while (await self.stats())["connections"] > 3:
            await trio.sleep(0.1)
        return self.rss()

    def logged(self, session: str, what: str) -> bool:
        return any(line.startswith(session) and what in line for line in self.log.read_text().splitlines())


@asynccontextmanager
async def flood_broker(tmp_path: Path, name: str, *settings: str) -> AsyncIterator[tuple[Flood, Healthy]]:
    """A broker process with ``settings``, a healthy pair running on it and the RSS sampled; on exit the pair's
    messages are checked, the figures written and the broker killed."""
    data = tmp_path / "data"
    log = tmp_path / "broker.log"
    started = await start_broker(data, log, "--log-level", "INFO", *settings)
    flood = Flood(started, Authenticator(load_or_create_secret(data)), log, psutil.Process(started.process.pid))
    try:
        a, _ = await RawClient.login(flood.tcp, flood.auth.issue("healthy-a"))
        try:
            async with login_ws(flood.ws, flood.auth.issue("healthy-b")) as (b, _):
                healthy = Healthy(Peer(a, "healthy-a", "healthy-b"), Peer(b, "healthy-b", "healthy-a"))
                async with trio.open_nursery() as nursery:  # the pair's tasks end before its connections close
                    nursery.start_soon(healthy.run)
                    await healthy.progress(3)  # served end to end: the baseline is a warmed-up broker
                    flood.baseline = flood.peak = flood.rss()
                    nursery.start_soon(flood.sample)
                    yield flood, healthy
                    after = await flood.settled()
                    await healthy.finish()
                    nursery.cancel_scope.cancel()
        finally:
            await a.aclose()
        assert started.process.poll() is None, "the broker died"
        flood.figures.update(
            baseline_rss=flood.baseline, peak_rss=flood.peak, after_rss=after, healthy_messages=healthy.count()
        )
        _write_figures(name, flood.figures)
        bound = flood.figures["rss_bound"]
        assert flood.peak <= bound, f"{name}: peak RSS {flood.peak / MiB:.1f} MiB above {bound / MiB:.1f} MiB"
        assert after <= flood.baseline + AFTER_SLACK, (
            f"{name}: RSS {flood.baseline / MiB:.1f} MiB before, {after / MiB:.1f} MiB after"
        )
    finally:
        started.process.kill()
        await started.process.wait()


def _write_figures(name: str, figures: dict[str, Any]) -> None:
    if not FIGURES:
        return
    path = Path(FIGURES)
    every = json.loads(path.read_text()) if path.exists() else {}
    every[name] = {"scale": SCALE, **figures}
    path.write_text(json.dumps(every, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------ the healthy pair


class Peer:
    """One healthy client: sends its partner a message every tick (a PING while 20 wait for RECEIPTs), ACKs what
    it gets; any ERROR or end of its connection is a failure."""

    def __init__(self, client: FrameClient, name: str, partner: str) -> None:
        self.client = client
        self.name = name
        self.partner = partner
        self.sent: list[str] = []
        self.received: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []
        self.waiting = 0
        self.sending = True
        self.lock = trio.Lock()
        self.moved = trio.Event()

    async def send(self, frame: Frame) -> None:
        async with self.lock:
            await self.client.send(frame)

    async def write(self) -> None:
        for n in itertools.count():
            if self.sending and self.waiting < 20:
                mid = f"{self.name}-{n}"
                self.waiting += 1
                self.sent.append(mid)
                await self.send(Send(id=mid, to=(self.partner,), body=mid.encode()))
            else:
                await self.send(Ping())
            await trio.sleep(0.05)

    async def read(self) -> None:
        try:
            while True:
                frame = await self.client.next()
                if isinstance(frame, Deliver):
                    if (frame.sender, frame.body, frame.attempt) != (self.partner, frame.id.encode(), 1):
                        self.failures.append(f"{self.name} got {frame!r}")
                    self.received[frame.id] += 1
                    self.moved.set()
                    await self.send(Ack(ids=(frame.id,)))
                elif isinstance(frame, Receipt):
                    self.waiting -= 1
                    if frame.results[self.partner].status not in (Status.QUEUED, Status.DELIVERED):
                        self.failures.append(f"{self.name} got {frame!r}")
                elif not isinstance(frame, Pong | Drained):
                    self.failures.append(f"{self.name} got {frame!r}")
        except EOFError:
            self.failures.append(f"{self.name}: the broker closed its connection")


class Healthy:
    def __init__(self, a: Peer, b: Peer) -> None:
        self.peers = (a, b)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for peer in self.peers:
                nursery.start_soon(peer.write)
                nursery.start_soon(peer.read)

    async def progress(self, messages: int) -> None:
        """Return once each of the two has received ``messages`` more messages (the flood holds until then)."""
        for peer in self.peers:
            goal = sum(peer.received.values()) + messages
            while sum(peer.received.values()) < goal:
                assert not peer.failures, peer.failures
                peer.moved = trio.Event()
                await peer.moved.wait()

    def count(self) -> int:
        return sum(len(peer.sent) for peer in self.peers)

    async def finish(self) -> None:
        """Stop sending; every message either sent has arrived at the other exactly once."""
        for peer in self.peers:
            peer.sending = False
        a, b = self.peers
        for sender, receiver in ((a, b), (b, a)):
            while any(mid not in receiver.received for mid in sender.sent):
                assert not receiver.failures, receiver.failures
                receiver.moved = trio.Event()
                await receiver.moved.wait()
        for sender, receiver in ((a, b), (b, a)):
            assert not receiver.failures, receiver.failures
            assert set(receiver.received) == set(sender.sent)
            assert set(receiver.received.values()) == {1}, "a healthy message arrived twice"


# ------------------------------------------------------------ raw connections


async def ws_frames(stream: trio.SocketStream, ws: WSConnection, decoder: FrameDecoder) -> AsyncIterator[Frame]:
    """The frames the broker sends on a raw upgraded WebSocket, until it closes (or the connection breaks)."""
    while True:
        try:
            data = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            return
        if not data:
            return
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, BytesMessage):
                for frame in decoder.feed(event.data):
                    yield frame
            elif isinstance(event, CloseConnection):
                return


async def first_error(frames: AsyncIterator[Frame]) -> int | None:
    """The code of the first ERROR among ``frames`` (None if they end without one)."""
    async for frame in frames:
        if isinstance(frame, Error):
            return frame.code
    return None


async def tcp_frames(client: RawClient) -> AsyncIterator[Frame]:
    while True:
        try:
            yield await client.next()
        except EOFError:
            return


def half_ws_message(size: int, part: bytes) -> bytes:
    """The start of one binary WebSocket message of ``size`` bytes (masked with the key 0: the payload as is)."""
    return bytes([0x82, 0x80 | 127]) + size.to_bytes(8, "big") + b"\x00" * 4 + part


def half_frame(declared: int) -> bytes:
    """A length prefix and part of the body it declares."""
    return declared.to_bytes(4, "big") + b"\xa0" * SLOWLORIS_PART


# ------------------------------------------------------------ slowloris


async def test_slowloris_connections_each_get_their_timeout(tmp_path: Path) -> None:
    count = scaled(40)
    async with flood_broker(tmp_path, "slowloris", "--handshake-timeout-s", "1", "--keepalive-s", "1.5") as (
        flood,
        healthy,
    ):
        with trio.fail_after(TIMEOUT):
            got: collections.Counter[tuple[str, int | None]] = collections.Counter()
            names = itertools.count()

            async def tcp(kind: str) -> None:
                client = await RawClient.open(flood.tcp)
                if kind.startswith("welcomed"):
                    await client.hello(flood.auth.issue(f"loris-{next(names)}"))
                if kind.endswith("half"):
                    await client.send_raw(half_frame(8000 if kind == "half" else 100_000))
                got[(f"tcp {kind}", await first_error(tcp_frames(client)))] += 1
                await client.aclose()

            async def ws(kind: str) -> None:
                stream, conn = await upgraded(flood.ws)
                decoder = FrameDecoder()
                frames = ws_frames(stream, conn, decoder)
                if kind.startswith("welcomed"):
                    hello = Hello(version=1, token=flood.auth.issue(f"loris-{next(names)}"))
                    await stream.send_all(conn.send(Message(data=encode_frame(hello))))
                    assert isinstance(await anext(frames), Welcome)
                if kind.endswith("half"):
                    await stream.send_all(half_ws_message(200_000, half_frame(8000 if kind == "half" else 100_000)))
                got[(f"ws {kind}", await first_error(frames))] += 1
                await trio.aclose_forcefully(stream)

            kinds = ("idle", "half", "welcomed idle", "welcomed half")
            async with trio.open_nursery() as nursery:
                for _ in range(count):
                    for kind in kinds:
                        nursery.start_soon(tcp, kind)
                        nursery.start_soon(ws, kind)
                await healthy.progress(5)
        want = {}
        for kind in kinds:
            code = int(ErrorCode.KEEPALIVE_TIMEOUT if kind.startswith("welcomed") else ErrorCode.HANDSHAKE_TIMEOUT)
            want[(f"tcp {kind}", code)] = want[(f"ws {kind}", code)] = count
        assert got == want
        connections = 8 * count
        # Each holds what it sent at most (a WebSocket message is never completed, but trio-websocket keeps its start).
        held = 2 * count * (2 * (4 + SLOWLORIS_PART) + 2 * 32 * 1024)
        flood.figures.update(connections=connections, bytes=2 * 2 * count * (4 + SLOWLORIS_PART))
        flood.figures["rss_bound"] = flood.baseline + connections * PER_CONNECTION + held + MARGIN


# ------------------------------------------------------------ handshake flood


async def test_a_handshake_flood_past_max_connections_gets_4005_and_2001(tmp_path: Path) -> None:
    limit = 100
    each = scaled(150)  # valid and forged HELLOs each, half over TCP, half over WebSocket
    forged = Authenticator(b"f" * 32)
    async with flood_broker(tmp_path, "handshake", "--max-connections", str(limit)) as (flood, healthy):
        with trio.fail_after(TIMEOUT):
            outcomes: collections.Counter[tuple[bool, str]] = collections.Counter()
            release = trio.Event()
            gate = trio.Semaphore(32)

            async def hello(i: int, valid: bool, websocket: bool) -> None:
                token = (flood.auth if valid else forged).issue(f"hs-{i}")
                async with AsyncExitStack() as stack:
                    async with gate:
                        if websocket:
                            client: FrameClient = await stack.enter_async_context(open_ws(flood.ws))
                        else:
                            client = await RawClient.open(flood.tcp)
                            stack.push_async_callback(client.aclose)
                        try:
                            await client.send(Hello(version=1, token=token))
                        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionClosed):
                            pass  # refused before the HELLO went out: the ERROR is still read
                        try:
                            frame = await client.next()
                        except EOFError:
                            frame = None
                    outcome = "welcome" if isinstance(frame, Welcome) else repr(frame)
                    if isinstance(frame, Error) and frame.close:
                        outcome = str(frame.code)
                    outcomes[(valid, outcome)] += 1
                    if isinstance(frame, Welcome):
                        await release.wait()  # a valid session holds its place until the flood ends

            async with trio.open_nursery() as nursery:
                for i in range(2 * each):
                    nursery.start_soon(hello, i, i % 2 == 0, i % 4 >= 2)
                while sum(outcomes.values()) < 2 * each:
                    await trio.sleep(0.05)
                await healthy.progress(5)
                release.set()
        assert set(outcomes) <= {(True, "welcome"), (True, "4005"), (False, "2001"), (False, "4005")}, outcomes
        # At most limit - 2 (the healthy pair) valid sessions are held at once: the rest were refused.
        assert outcomes[(True, "4005")] >= each - (limit - 2)
        assert outcomes[(False, "2001")] > 0
        flood.figures.update(connections=2 * each, frames=2 * each, outcomes={f"{k}": v for k, v in outcomes.items()})
        flood.figures["rss_bound"] = flood.baseline + limit * (PER_CONNECTION + 32 * 1024) + MARGIN


# ------------------------------------------------------------ slow consumer


async def test_a_consumer_that_never_reads_is_cut_off_and_gets_everything_later(tmp_path: Path) -> None:
    frame_limit, outbound = 256 * 1024, 1024 * 1024
    body_size, count = 64 * 1024, scaled(300)  # ~19 MiB per consumer: far more than the socket buffers hold
    async with flood_broker(
        tmp_path, "slow-consumer",
        "--keepalive-s", "1", "--max-frame-bytes", str(frame_limit), "--max-outbound-bytes", str(outbound),
    ) as (flood, healthy):  # fmt: skip
        with trio.fail_after(TIMEOUT):
            sessions: dict[str, str] = {}

            async def stalled(name: str, websocket: bool, *, task_status: Any) -> None:
                """Logs in, reads the WELCOME and then nothing; PINGs so that only its reading is at fault."""
                token = flood.auth.issue(name)
                if websocket:
                    stream, conn = await upgraded(flood.ws)
                    await stream.send_all(conn.send(Message(data=encode_frame(Hello(version=1, token=token)))))
                    welcome = await anext(ws_frames(stream, conn, FrameDecoder(frame_limit)))
                    ping = conn.send(Message(data=encode_frame(Ping())))
                else:
                    client, welcome = await RawClient.login(flood.tcp, token)
                    stream, ping = client.stream, encode_frame(Ping())  # type: ignore[assignment]
                assert isinstance(welcome, Welcome)
                sessions[name] = welcome.session
                task_status.started()
                try:
                    while not flood.logged(welcome.session, "closing: SLOW_CONSUMER"):
                        with trio.move_on_after(1):
                            await stream.send_all(ping)
                        await trio.sleep(0.2)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    while not flood.logged(welcome.session, "closing: SLOW_CONSUMER"):
                        await trio.sleep(0.1)
                await trio.aclose_forcefully(stream)

            async def pour(name: str) -> list[str]:
                sender, _ = await RawClient.login(flood.tcp, flood.auth.issue(f"pour-{name}"))
                await sender.expect(Drained)
                ids = [f"{name}-{i}" for i in range(count)]
                async with trio.open_nursery() as nursery:

                    async def receipts() -> None:
                        for mid in ids:
                            receipt = await sender.expect(Receipt)
                            assert receipt.id == mid and receipt.results[name].status in (
                                Status.QUEUED,
                                Status.DELIVERED,
                            ), receipt

                    nursery.start_soon(receipts)
                    for mid in ids:
                        await sender.send(Send(id=mid, to=(name,), body=_body(mid, body_size)))
                await sender.aclose()
                return ids

            sent: dict[str, list[str]] = {}
            async with trio.open_nursery() as nursery:
                for name, websocket in (("sink-tcp", False), ("sink-ws", True)):
                    await nursery.start(stalled, name, websocket)

                    async def poured(name: str = name) -> None:
                        sent[name] = await pour(name)

                    nursery.start_soon(poured)
                await healthy.progress(5)
            # Both were cut off as slow consumers: now each reads, and gets every message.
            for name, websocket in (("sink-tcp", False), ("sink-ws", True)):
                async with AsyncExitStack() as stack:
                    if websocket:
                        client, _ = await stack.enter_async_context(login_ws(flood.ws, flood.auth.issue(name)))
                    else:
                        client, _ = await RawClient.login(flood.tcp, flood.auth.issue(name))
                        stack.push_async_callback(client.aclose)
                    got: collections.Counter[str] = collections.Counter()
                    while not isinstance(frame := await client.next(), Drained):
                        assert isinstance(frame, Deliver) and frame.body == _body(frame.id, body_size), frame
                        got[frame.id] += 1
                        await client.send(Ack(ids=(frame.id,)))
                    assert set(got) == set(sent[name]) and set(got.values()) == {1}
        stored = 2 * count * body_size
        flood.figures.update(connections=2, frames=2 * count, bytes=stored, sessions=sessions)
        # The store holds every message; each connection buffers at most max_outbound_bytes (+ one frame read).
        flood.figures["rss_bound"] = flood.baseline + stored + 2 * (outbound + frame_limit) + MARGIN


def _body(mid: str, size: int) -> bytes:
    head = mid.encode()
    return (head * (size // len(head) + 1))[:size]


# ------------------------------------------------------------ SENDs past every limit

FRAME_LIMIT = 65536
MAILBOX_MESSAGES = 50
MAILBOX_BYTES = MiB
TOTAL_BYTES = 4 * MiB
RECIPIENTS = 8
LIMIT_SETTINGS = (
    "--max-frame-bytes", str(FRAME_LIMIT), "--max-outbound-bytes", str(4 * FRAME_LIMIT),
    "--max-recipients", str(RECIPIENTS), "--max-mailbox-messages", str(MAILBOX_MESSAGES),
    "--max-mailbox-bytes", str(MAILBOX_BYTES), "--max-total-bytes", str(TOTAL_BYTES),
)  # fmt: skip
BIG = 60_000
"""A body that fits a frame (at most FRAME_LIMIT - 256)."""

Expected = int | dict[str, int | Status]
"""A RECEIPT's whole-SEND code, or each recipient's status (or refusal code)."""


@dataclass
class Held:
    """What the flood has stored so far (the model the limit cases judge by)."""

    messages: collections.Counter[str] = field(default_factory=collections.Counter)
    bytes: collections.Counter[str] = field(default_factory=collections.Counter)

    def store(self, to: str, size: int) -> int | Status:
        if self.messages[to] >= MAILBOX_MESSAGES:
            return int(ErrorCode.MAILBOX_FULL)
        if self.bytes[to] + size > MAILBOX_BYTES:
            return int(ErrorCode.MAILBOX_BYTES_FULL)
        if sum(self.bytes.values()) + size > TOTAL_BYTES:
            return int(ErrorCode.BROKER_FULL)
        self.messages[to] += 1
        self.bytes[to] += size
        return Status.QUEUED


def _to_one(to: str, size: int, n: int) -> Callable[[Held], list[tuple[Send, Expected]]]:
    def build(held: Held) -> list[tuple[Send, Expected]]:
        return [(Send(id=f"{to}-{i}", to=(to,), body=b"m" * size), {to: held.store(to, size)}) for i in range(n)]

    return build


def _to_many(size: int, n: int) -> Callable[[Held], list[tuple[Send, Expected]]]:
    def build(held: Held) -> list[tuple[Send, Expected]]:
        return [(Send(id=f"t-{i}", to=(f"t{i}",), body=b"t" * size), {f"t{i}": held.store(f"t{i}", size)})
                for i in range(n)]  # fmt: skip

    return build


def _whole(code: ErrorCode, recipients: int, size: int, n: int) -> Callable[[Held], list[tuple[Send, Expected]]]:
    def build(held: Held) -> list[tuple[Send, Expected]]:
        to = tuple(f"w{r}" for r in range(recipients))
        return [(Send(id=f"w{int(code)}-{i}", to=to, body=b"w" * size), int(code)) for i in range(n)]

    return build


LIMIT_FLOODS: list[tuple[str, Callable[[Held], list[tuple[Send, Expected]]]]] = [
    ("3001 MAILBOX_FULL", _to_one("full-count", 1, scaled(200))),
    ("3002 MAILBOX_BYTES_FULL", _to_one("full-bytes", BIG, scaled(60))),
    ("3003 BROKER_FULL", _to_many(BIG, scaled(100))),  # what 3001/3002 left plus these reaches TOTAL_BYTES
    ("3004 TOO_MANY_RECIPIENTS", _whole(ErrorCode.TOO_MANY_RECIPIENTS, RECIPIENTS + 1, 1, scaled(100))),
    ("3007 BODY_TOO_LARGE", _whole(ErrorCode.BODY_TOO_LARGE, 1, FRAME_LIMIT - 255, scaled(20))),
    # A SEND-rate flood (3010) goes here, as a case of its own, once the broker has rate limits.
]
"""Floods of SENDs, in order, on one connection: each case builds its SENDs and what each RECEIPT must say, from
what the cases before it stored (:class:`Held`; the healthy pair's few bytes in flight stay far below any margin
here)."""


def _outcome(receipt: Receipt) -> Expected:
    if receipt.code is not None:
        return receipt.code
    return {k: (v.status if v.code is None else v.code) for k, v in receipt.results.items()}


@pytest.mark.parametrize("transport", ["tcp", "ws"])
async def test_sends_past_every_limit_get_their_codes(tmp_path: Path, transport: str) -> None:
    async with flood_broker(tmp_path, f"limits-{transport}", *LIMIT_SETTINGS) as (flood, healthy):
        with trio.fail_after(TIMEOUT):
            held = Held()
            cases = [(name, send, want) for name, build in LIMIT_FLOODS for send, want in build(held)]
            assert {c for _, _, w in cases if isinstance(w, int) for c in [w]} == {3004, 3007}
            assert {c for _, _, w in cases if isinstance(w, dict) for c in w.values()} >= {3001, 3002, 3003}
            async with AsyncExitStack() as stack:
                token = flood.auth.issue(f"flooder-{transport}")
                if transport == "ws":
                    client, _ = await stack.enter_async_context(login_ws(flood.ws, token))
                else:
                    client, _ = await RawClient.login(flood.tcp, token)
                    stack.push_async_callback(client.aclose)
                await client.expect(Drained)
                wrong: list[str] = []
                async with trio.open_nursery() as nursery:

                    async def receipts() -> None:
                        for name, send, want in cases:
                            receipt = await client.expect(Receipt)
                            assert receipt.id == send.id
                            if _outcome(receipt) != want:
                                wrong.append(f"{name} {send.id}: {_outcome(receipt)} != {want}")

                    nursery.start_soon(receipts)
                    for _, send, _ in cases:
                        await client.send(send)
                assert not wrong, wrong[:10]
            stats = await flood.stats()
            assert stats["queued_bytes"] <= TOTAL_BYTES
            # Past the frame limit: 1002 for each connection (on a WebSocket also a message above the limit: 1009).
            frames = scaled(20)
            for i in range(frames):
                if transport == "ws":
                    # After WELCOME a frame above the limit cannot be whole in a message within it (1009 below);
                    # before WELCOME a whole one above 8,192 bytes is 1002 (protocol.md 2.5).
                    async with open_ws(flood.ws) as ws:
                        await ws.send_raw((MAX_HELLO_FRAME_BYTES + 1).to_bytes(4, "big") + bytes(8193))
                        error = await ws.expect(Error)
                    async with login_ws(flood.ws, flood.auth.issue(f"huge-{i}")) as (ws, _):
                        await ws.expect(Drained)
                        await ws.send_raw(b"\x00" * (FRAME_LIMIT + 5))
                        assert await ws.expect_closed() == 1009
                else:
                    big, _ = await RawClient.login(flood.tcp, flood.auth.issue(f"big-{i}"))
                    await big.expect(Drained)
                    await big.send_raw((FRAME_LIMIT + 1).to_bytes(4, "big") + b"\x00" * FRAME_LIMIT)
                    error = await big.expect(Error)
                    await big.aclose()
                assert (error.code, error.close) == (ErrorCode.FRAME_TOO_LARGE, True)
            await healthy.progress(5)
            # What was accepted is all there, intact.
            for mailbox in ("full-count", "full-bytes"):
                reader, _ = await RawClient.login(flood.tcp, flood.auth.issue(mailbox))
                got = []
                while not isinstance(frame := await reader.next(), Drained):
                    assert isinstance(frame, Deliver) and frame.body == b"m" * len(frame.body)
                    got.append(frame.id)
                    await reader.send(Ack(ids=(frame.id,)))
                assert len(got) == held.messages[mailbox] and len(set(got)) == len(got)
                await reader.aclose()
        flood.figures.update(
            frames=len(cases) + frames, bytes=sum(len(send.body) * len(send.to) for _, send, _ in cases)
        )
        flood.figures["rss_bound"] = flood.baseline + TOTAL_BYTES + 4 * (4 * FRAME_LIMIT) + MARGIN


# ------------------------------------------------------------ bodies at the frame limit


async def test_bodies_at_the_frame_limit_in_bulk_arrive_intact(tmp_path: Path) -> None:
    size = DEFAULT_MAX_FRAME_BYTES - 256  # the largest body a SEND may carry (protocol.md 9, rule 3)
    count = scaled(12)  # per direction
    async with flood_broker(tmp_path, "frame-limit-bodies") as (flood, healthy):
        with trio.fail_after(TIMEOUT):

            async def send_all(client: FrameClient, name: str, to: str) -> None:
                async with trio.open_nursery() as nursery:

                    async def receipts() -> None:
                        for _ in range(count):
                            _, receipt = await client.until(Receipt)  # (DRAINED comes first)
                            assert receipt.results[to].status in (Status.QUEUED, Status.DELIVERED), receipt

                    nursery.start_soon(receipts)
                    for i in range(count):
                        await client.send(Send(id=f"{name}-{i}", to=(to,), body=_body(f"{name}-{i}", size)))

            async def receive_all(client: FrameClient) -> collections.Counter[str]:
                got: collections.Counter[str] = collections.Counter()
                while sum(got.values()) < count:
                    frame = await client.next()
                    if isinstance(frame, Deliver):
                        assert frame.body == _body(frame.id, size) and frame.attempt == 1
                        got[frame.id] += 1
                        await client.send(Ack(ids=(frame.id,)))
                return got

            async with AsyncExitStack() as stack:
                tcp_a, _ = await RawClient.login(flood.tcp, flood.auth.issue("big-a"))
                tcp_b, _ = await RawClient.login(flood.tcp, flood.auth.issue("big-b"))
                for client in (tcp_a, tcp_b):
                    stack.push_async_callback(client.aclose)
                ws_a, _ = await stack.enter_async_context(login_ws(flood.ws, flood.auth.issue("big-c")))
                ws_b, _ = await stack.enter_async_context(login_ws(flood.ws, flood.auth.issue("big-d")))
                got: dict[str, collections.Counter[str]] = {}
                async with trio.open_nursery() as nursery:

                    async def receive(name: str, client: FrameClient) -> None:
                        got[name] = await receive_all(client)

                    nursery.start_soon(receive, "big-d", ws_b)  # TCP to WebSocket
                    nursery.start_soon(receive, "big-b", tcp_b)  # WebSocket to TCP
                    nursery.start_soon(send_all, tcp_a, "big-a", "big-d")
                    nursery.start_soon(send_all, ws_a, "big-c", "big-b")
                    await healthy.progress(5)
                assert got["big-d"] == {f"big-a-{i}": 1 for i in range(count)}
                assert got["big-b"] == {f"big-c-{i}": 1 for i in range(count)}
        stored = 2 * count * size
        flood.figures.update(connections=4, frames=2 * count, bytes=stored)
        # At worst every body is held at once (the store), and each of the four connections buffers at most
        # max_outbound_bytes out and a frame in.
        outbound = 8 * MiB
        flood.figures["rss_bound"] = flood.baseline + stored + 4 * (outbound + DEFAULT_MAX_FRAME_BYTES) + MARGIN
