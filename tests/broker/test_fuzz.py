"""Fuzzing a running broker: mutated golden vectors and hypothesis-built frames over TCP and WebSocket.

The broker runs in its own process (so a crash is seen and its RSS can be read). Fuzz lanes, several per
transport at once, each send cases: every golden vector mutated byte by byte (tests/broker/fuzzing.py) and
frames hypothesis builds, before the handshake (a fresh connection each) and after it (on a logged-in
connection, where every case that keeps the connection usable is pipelined with the next ones). What the
broker must answer is decided by the protocol's own code (fuzzing.Oracle: the sans-IO Connection on the
broker's side, the broker's token check): the closing ERROR with exactly the code the first bad frame gets,
or the normal answer of each valid frame (a RECEIPT per SEND, a PONG per PING, ...; checked at a PING
barrier). Meanwhile a healthy pair of real clients (one over TCP, one over WebSocket) keeps exchanging
messages. At the end the broker is alive, answers every case as decided, the healthy pair still talks, and
the broker's memory, once the fuzz messages have expired, is back near its baseline.

``RELAY_FUZZ_FRAMES=1000000`` runs the long version: mutation rounds with random byte values and hypothesis
frames until that many cases were sent; the figures are printed (``-s`` shows them).
"""

from __future__ import annotations

import collections
import itertools
import os
import random
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import psutil
import trio
import trio_websocket
from hypothesis import HealthCheck, Phase, given, seed, settings

from broker.auth import Authenticator, load_or_create_secret
from client import open_client
from wire import (
    Bye,
    Cleanup,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    Hello,
    KeyGet,
    KeyGetResult,
    KeyPut,
    KeyPutResult,
    Ping,
    Pong,
    Receipt,
    Send,
    Stats,
    StatsResult,
    Welcome,
    encode_frame,
)

from .fuzzing import EOF, OPEN, WELCOME, Ending, Oracle, Verdict, frame_strategy, vector_mutations
from .process import start_broker_process

LONG_FRAMES = int(os.environ.get("RELAY_FUZZ_FRAMES", "0"))
"""Cases to send in the long run (0: the default short run)."""
LANES = 6
"""Fuzz connections at once per transport: a case that ends its connection leaves the others going."""
MAX_RECIPIENTS = 16
MAX_FRAME_BYTES = 1024 * 1024
TTL_S = 2
"""The broker keeps every fuzz message this long at most, so that what the fuzz stored goes away again."""
HYPOTHESIS_FRAMES = 600
"""Frames hypothesis builds per pass (it takes ~2 ms a frame: the golden vectors' mutations are the bulk)."""
LONG_BURST = 40
"""In the long run, valid frames pipelined before each case that ends a logged-in connection."""
SYNC_EVERY = 64
"""Cases pipelined on a connection before a PING barrier checks their answers."""
RSS_SLACK = 40 * 1024 * 1024
"""How far above its warmed-up baseline the broker's RSS may end (the allocator keeps some pages)."""

_PING = encode_frame(Ping())
_BYE = encode_frame(Bye())

Case = tuple[str, bytes, bool]
"""(name, bytes, after the handshake)."""


class Fuzzer:
    """Sends cases to the broker and checks its answers against the oracle."""

    def __init__(self, oracle: Oracle, auth: Authenticator, tcp_port: int, ws_port: int) -> None:
        self.oracle = oracle
        self.auth = auth
        self.tcp_port = tcp_port
        self.ws_port = ws_port
        self.sent = 0
        """Fuzz frames sent: the cases, and the valid frames of the bursts."""
        self.cases = 0
        self.connections = 0
        self.endings: collections.Counter[Ending] = collections.Counter()
        self.failures: list[str] = []
        self._lane_ids = itertools.count()
        self._rng = random.Random(5)
        self.pool: list[bytes] = []
        """Valid frames (each a case judged OPEN) that bursts are drawn from."""
        self.burst = 0
        """Valid frames from the pool sent before each case that ends a logged-in connection."""

    def fail(self, what: str) -> None:
        if len(self.failures) < 50:
            self.failures.append(what)

    async def run(self, cases: Iterable[Case]) -> None:
        """Every case, spread over LANES lanes per transport (a case goes to the next free lane)."""
        source = iter(cases)
        async with trio.open_nursery() as nursery:
            for websocket in (False, True):
                for _ in range(LANES):
                    nursery.start_soon(self._lane, source, websocket, next(self._lane_ids))

    async def _lane(self, source: Iterator[Case], websocket: bool, lane: int) -> None:
        token = self.auth.issue(f"fz{lane}")
        async with trio.open_nursery() as nursery:
            opened: Peer | None = None
            pending: list[Verdict] = []
            for name, data, after in source:
                verdict = self.oracle.judge(data, opened=after, websocket=websocket)
                self.sent += 1
                self.cases += 1
                if not after:
                    peer = await self._connect(nursery, websocket)
                    await peer.send(data)
                    await self._finish(peer, verdict, name, data)
                    continue
                if opened is None:
                    opened = await self._connect(nursery, websocket)
                    await opened.send(encode_frame(Hello(version=1, token=token)))
                    frame = await opened.next()
                    assert isinstance(frame, Welcome), f"lane {lane}: {frame!r}"
                if verdict.endings != {OPEN}:  # the case ends the connection: first check what came before it
                    if self.burst:
                        pending.append(await self._send_burst(opened))
                    await self._barrier(opened, pending, name)
                await opened.send(data)
                if verdict.endings == {OPEN}:
                    pending.append(verdict)
                    if len(pending) >= SYNC_EVERY:
                        await self._barrier(opened, pending, name)
                        pending = []
                    continue
                await self._finish(opened, verdict, name, data)
                opened, pending = None, []
            if opened is not None:
                await self._barrier(opened, pending, "the lane's last cases")
                await opened.send(_BYE)
                await opened.aclose()

    async def _send_burst(self, peer: Peer) -> Verdict:
        """Send ``burst`` valid frames from the pool at once (they pipeline: the throughput of the long run)."""
        data = b"".join(self._rng.choices(self.pool, k=self.burst))
        verdict = self.oracle.judge(data, opened=True, websocket=isinstance(peer, WsPeer))
        assert verdict.endings == {OPEN}
        self.sent += self.burst
        await peer.send(data)
        return verdict

    async def _connect(self, nursery: trio.Nursery, websocket: bool) -> Peer:
        self.connections += 1
        if websocket:
            ws = await trio_websocket.connect_websocket_url(
                nursery, f"ws://127.0.0.1:{self.ws_port}/relay", max_message_size=MAX_FRAME_BYTES + 4
            )
            return WsPeer(ws)
        return TcpPeer(await trio.open_tcp_stream("127.0.0.1", self.tcp_port))

    async def _finish(self, peer: Peer, verdict: Verdict, name: str, data: bytes) -> None:
        """The case ends its connection: read to the end, the ending must be one the oracle allows."""
        if verdict.partial:
            await peer.end_input()  # the broker waits for the rest of a frame: tell it there is none
        got: Ending = EOF
        last: Frame | None = None
        while (frame := await peer.next()) is not None:
            last = frame
            if isinstance(frame, Welcome):
                got = WELCOME
                break
            if isinstance(frame, Error) and frame.close:
                got = frame.code
                break
        await peer.aclose()
        self.endings[got] += 1
        if got not in verdict.endings:
            self.fail(
                f"[{'ws' if isinstance(peer, WsPeer) else 'tcp'}] "
                f"{name} {data.hex()}: expected one of {sorted(map(str, verdict.endings))}, got {last!r}"
            )

    async def _barrier(self, peer: Peer, pending: list[Verdict], name: str) -> None:
        """Every answer the pipelined cases call for arrives before the barrier's PONG, and nothing closes."""
        want: collections.Counter[object] = collections.Counter()
        for verdict in pending:
            for frame in verdict.frames:
                kind = type(frame)
                if kind is Send:
                    want[("receipt", frame.id)] += 1  # type: ignore[attr-defined]
                elif kind is Ping:
                    want["pong"] += 1
                elif kind is KeyPut:
                    want["key_put_result"] += 1
                elif kind is KeyGet:
                    want["key_get_result"] += 1
                elif kind in (Stats, Cleanup):
                    want[("forbidden", int(ErrorCode.FORBIDDEN))] += 1
        await peer.send(_PING)
        want["pong"] += 1  # the barrier's own
        pongs = want["pong"]
        got: collections.Counter[object] = collections.Counter()
        while got["pong"] < pongs:
            frame = await peer.next()
            if frame is None or (isinstance(frame, Error) and frame.close):
                self.fail(f"before {name}: the broker ended a connection of valid frames: {frame!r}")
                return
            if isinstance(frame, Receipt):
                got[("receipt", frame.id)] += 1
            elif isinstance(frame, Pong):
                got["pong"] += 1
            elif isinstance(frame, KeyPutResult):
                got["key_put_result"] += 1
            elif isinstance(frame, KeyGetResult):
                got["key_get_result"] += 1
            elif isinstance(frame, Error):
                got[("forbidden", frame.code)] += 1
        if got != want:
            self.fail(f"before {name}: answers {dict(got - want)} unasked, {dict(want - got)} missing")


class Peer:
    """One fuzz connection: raw bytes out, the broker's frames in (None at the end)."""

    def __init__(self) -> None:
        self.decoder = FrameDecoder(MAX_FRAME_BYTES)
        self.frames: collections.deque[Frame] = collections.deque()

    async def next(self) -> Frame | None:
        while not self.frames:
            data = await self.receive()
            if not data:
                return None
            self.frames.extend(self.decoder.feed(data))
        return self.frames.popleft()

    async def receive(self) -> bytes:
        raise NotImplementedError

    async def send(self, data: bytes) -> None:
        raise NotImplementedError

    async def end_input(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError


class TcpPeer(Peer):
    def __init__(self, stream: trio.SocketStream) -> None:
        super().__init__()
        self.stream = stream

    async def receive(self) -> bytes:
        try:
            return await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            return b""

    async def send(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except trio.BrokenResourceError:
            pass  # the broker closed first (after its ERROR, which is still read)

    async def end_input(self) -> None:
        try:
            await self.stream.send_eof()
        except trio.BrokenResourceError:
            pass

    async def aclose(self) -> None:
        await self.stream.aclose()


class WsPeer(Peer):
    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        super().__init__()
        self.ws = ws

    async def receive(self) -> bytes:
        try:
            message = await self.ws.get_message()
        except trio_websocket.ConnectionClosed:
            return b""
        assert isinstance(message, bytes), "the broker sent a text message"
        return message

    async def send(self, data: bytes) -> None:
        try:
            await self.ws.send_message(data)
        except trio_websocket.ConnectionClosed:
            pass

    async def end_input(self) -> None:
        raise AssertionError("a WebSocket message is whole: nothing is ever left unfinished")

    async def aclose(self) -> None:
        with trio.move_on_after(2):
            await self.ws.aclose()


def hypothesis_frames(count: int, at: int) -> list[bytes]:
    """``count`` frames from :func:`fuzzing.frame_strategy`, generated by hypothesis (seeded by ``at``)."""
    out: list[bytes] = []

    @seed(at)
    @settings(
        max_examples=count, database=None, deadline=None, phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(frame_strategy())
    def collect(data: bytes) -> None:
        out.append(data)

    collect()
    return out


def cases(mutations: Iterable[tuple[str, bytes]], frames: list[bytes]) -> Iterator[Case]:
    """The vector mutations and the hypothesis frames, interleaved; each case before or after the handshake
    (one in three before: the oracle judges it either way)."""
    toggle = itertools.cycle((True, False, True))
    named = ((f"hypothesis#{i}", data) for i, data in enumerate(frames))
    for pair in itertools.zip_longest(mutations, named):
        for case in pair:
            if case is not None:
                yield case[0], case[1], next(toggle)


async def _stats(port: int, token: str) -> dict[str, int]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    peer = TcpPeer(stream)
    await peer.send(encode_frame(Hello(version=1, token=token)))  # nothing may follow HELLO before WELCOME
    assert isinstance(await peer.next(), Welcome)
    await peer.send(encode_frame(Stats()))
    while not isinstance(frame := await peer.next(), StatsResult):
        assert frame is not None
    await peer.send(_BYE)
    await peer.aclose()
    return dict(frame.stats)


async def _settled(port: int, token: str) -> dict[str, int]:
    """Wait until the broker holds no fuzz message and only the healthy pair (and us) are connected."""
    while True:
        stats = await _stats(port, token)
        if stats["messages_total"] == 0 and stats["connections"] <= 3:
            return stats
        await trio.sleep(0.5)


async def _healthy_pair(url_a: str, url_b: str, auth: Authenticator, trips: list[float], stop: trio.Event) -> None:
    """Two real clients, one over TCP and one over WebSocket, exchange messages until ``stop``; each
    delivered round trip is timed into ``trips``."""
    async with (
        open_client(url_a, auth.issue("healthy-a"), e2e=False) as a,
        open_client(url_b, auth.issue("healthy-b"), e2e=False) as b,
    ):
        inbox = b.deliveries()
        for n in itertools.count():
            began = time.monotonic()
            receipt = await a.send("healthy-b", f"ping {n}".encode(), notify=False)
            assert receipt.results["healthy-b"].status.value in ("queued", "delivered")
            delivery = await anext(inbox)
            assert delivery.body == f"ping {n}".encode() and delivery.sender == "healthy-a"
            b.ack(delivery.id)
            trips.append(time.monotonic() - began)
            if stop.is_set():
                return
            await trio.sleep(0.02)


async def test_fuzzed_frames_get_their_documented_answers_and_leave_the_broker_serving(tmp_path: Path) -> None:
    long_run = LONG_FRAMES > 0
    data_dir = tmp_path / "data"
    auth = Authenticator(load_or_create_secret(data_dir))
    oracle = Oracle(auth, max_frame_bytes=MAX_FRAME_BYTES, max_recipients=MAX_RECIPIENTS)
    process, tcp_port, ws_port = await start_broker_process(
        data_dir, tmp_path / "broker.log",
        "--max-recipients", str(MAX_RECIPIENTS), "--default-ttl-s", str(TTL_S), "--max-ttl-s", str(TTL_S),
        "--cleanup-interval-s", "0.5", "--handshake-timeout-s", "2", "--log-level", "WARNING",
    )  # fmt: skip
    operator = auth.issue("fuzz-op", operator=True)
    fuzzer = Fuzzer(oracle, auth, tcp_port, ws_port)
    broker = psutil.Process(process.pid)
    trips: list[float] = []
    stop = trio.Event()
    healthy_done = trio.Event()
    peak = 0

    async def watch_rss() -> None:
        nonlocal peak
        while True:
            peak = max(peak, broker.memory_info().rss)
            await trio.sleep(0.2)

    began = time.monotonic()
    try:
        with trio.fail_after(3600 if long_run else 120):
            async with trio.open_nursery() as nursery:

                async def healthy() -> None:
                    await _healthy_pair(
                        f"tcp://127.0.0.1:{tcp_port}", f"ws://127.0.0.1:{ws_port}/relay", auth, trips, stop
                    )
                    healthy_done.set()

                nursery.start_soon(healthy)
                nursery.start_soon(watch_rss)
                # Warm up (every code path once), let the fuzz messages expire: the baseline.
                frames = hypothesis_frames(HYPOTHESIS_FRAMES, 1)
                fuzzer.pool = [f for f in frames if oracle.judge(f, opened=True, websocket=True).endings == {OPEN}]
                await fuzzer.run(cases(vector_mutations(stride=32, every_kind=False, seed=1), frames[:200]))
                warm = time.monotonic() - began
                await _settled(tcp_port, operator)
                baseline = broker.memory_info().rss
                trips_before = len(trips)
                if long_run:
                    fuzzer.burst = LONG_BURST
                    passes = 0
                    while fuzzer.sent < LONG_FRAMES:
                        passes += 1
                        mutations = vector_mutations(stride=1, every_kind=passes == 1, seed=passes)
                        await fuzzer.run(cases(mutations, hypothesis_frames(HYPOTHESIS_FRAMES, passes * 7919)))
                else:
                    await fuzzer.run(cases(vector_mutations(stride=12, every_kind=False, seed=7), frames[:400]))
                fuzzed = time.monotonic() - began
                assert process.poll() is None, "the broker died"
                trips_during = len(trips) - trips_before
                stats = await _settled(tcp_port, operator)
                after = broker.memory_info().rss
                stop.set()
                await healthy_done.wait()  # its last round trip, after the fuzz
                nursery.cancel_scope.cancel()
        assert process.poll() is None, "the broker died"
        print(
            f"\nfuzz: warm-up {warm:.1f} s; {fuzzer.sent} frames ({fuzzer.cases} cases) on {fuzzer.connections} "
            f"connections in {fuzzed:.1f} s; "
            f"endings {dict(fuzzer.endings)}; broker RSS baseline {baseline / 2**20:.1f} MiB, "
            f"after {after / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB; healthy round trips {len(trips)} "
            f"({trips_during} during the fuzz, slowest {max(trips):.3f} s)"
        )
        assert not fuzzer.failures, "\n".join(fuzzer.failures)
        assert trips_during > 0, "the healthy pair exchanged nothing while the fuzz ran"
        assert stats["messages_total"] == 0
        assert after - baseline < RSS_SLACK, f"broker RSS {baseline / 2**20:.1f} -> {after / 2**20:.1f} MiB"
        # Every documented kind of answer was exercised.
        assert {int(ErrorCode.MALFORMED_FRAME), int(ErrorCode.FRAME_TOO_LARGE), int(ErrorCode.UNEXPECTED_FRAME),
                int(ErrorCode.INVALID_FIELD), int(ErrorCode.UNKNOWN_FRAME_TYPE), int(ErrorCode.INVALID_TOKEN),
                EOF} <= set(fuzzer.endings)  # fmt: skip
        assert int(ErrorCode.INTERNAL_ERROR) not in fuzzer.endings
    finally:
        process.kill()
        await process.wait()
