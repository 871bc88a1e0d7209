"""Load worker processes: senders and receivers on the public client API, one trio loop each.

Theory of operation. The parent (:func:`bench.runner.run_load`) starts one process per
:class:`WorkerSpec` and talks to them only through a few shared counters (:class:`Shared`):
each worker connects its clients, sets ``ready``, waits for the parent's ``start_ns``, then
sends for ``duration_s`` and receives until the parent sets ``stop``. Every message body starts
with two little-endian int64 stamps, the *intended* send time and the time it was handed to the
client (``time.time_ns()``, CLOCK_REALTIME, the same clock in every process on the host), so a
receiver in any process computes latency from the intended send time: a fixed-rate sender that
falls behind its schedule is charged for it (no coordinated omission).

Two sending modes: ``rate`` (a fixed schedule per sender, catching up in one batch when late)
and ``max`` (closed loop: ``depth`` concurrent ``send_batch`` calls per sender, paused while more
than ``window`` messages are sent but not yet delivered, over all workers). Receivers take
deliveries in batches and ACK each batch at once. Senders connect to ``url`` and receivers to
``receive_url``: the same node, or with two nodes the first and the last, so every message crosses.
With ``notify`` every SEND asks for delivery statuses, and each sender takes its statuses in
batches and STATUS_ACKs each batch at once (one status per delivered-and-ACKed message);
without it every SEND says ``notify=False`` (the client's default is True).
With ``e2e`` every client is opened with end-to-end encryption (it publishes its key on connect;
senders seal each message to their recipients' keys, receivers open and verify each one: docs/e2e.md);
without it every client says ``e2e=False`` (the client's default is on), so the plaintext figures
measure the broker alone.
"""

from __future__ import annotations

import gc
import resource
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import trio
from hdrh.histogram import HdrHistogram

__all__ = ["HIST_MAX_US", "Shared", "WorkerSpec", "new_histogram", "worker_main"]

HIST_MAX_US = 3_600_000_000
"""Largest latency the histograms hold (1 hour); larger values are clamped to it."""
HIST_DIGITS = 3
"""Significant decimal digits kept by the HDR histograms (0.1 % value resolution)."""
SPIN_WINDOW_NS = 2_000_000
"""A fixed-rate sender sleeps until this close to a send time, then yields in a loop until it is due:
trio's timers (epoll) wake up to 1 ms late, which would otherwise be charged to every message."""
STAMP_BYTES = 16


def new_histogram() -> HdrHistogram:
    return HdrHistogram(1, HIST_MAX_US, HIST_DIGITS)


@dataclass
class WorkerSpec:
    """What one worker process does."""

    index: int
    url: str
    """Where senders and idle connections connect (the first node)."""
    receive_url: str
    """Where receivers connect (the last node: with two nodes, every message crosses from one to the other)."""
    secret: bytes
    senders: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    """(own mailbox, recipients of each message) per sending client."""
    receivers: list[str] = field(default_factory=list)
    """Mailboxes this worker receives (and ACKs) for."""
    idle: list[str] = field(default_factory=list)
    """Mailboxes to hold an idle connection for (the connections scenario)."""
    body_bytes: int = 256
    mode: str = "rate"  # "rate" or "max"
    rate_per_sender: float = 1000.0
    duration_s: float = 10.0
    batch: int = 256
    depth: int = 4
    window: int = 50_000
    spin: bool = True
    warmup_s: float = 0.0
    """Messages meant to be sent in the first ``warmup_s`` are delivered and counted but not put in the histograms."""
    bin_s: float = 0.1
    connect_concurrency: int = 64
    notify: bool = False
    """SENDs ask for delivery statuses; senders take and STATUS_ACK them."""
    e2e: bool = False
    """Clients encrypt end to end (``open_client(e2e=True)``); otherwise they send and take plaintext."""
    ca_file: str | None = None
    """For tls:// and wss:// URLs: the CA the clients trust (None: the system's trust store)."""


class Shared:
    """Counters shared by the parent and the workers (multiprocessing arrays, no locks: one writer each)."""

    def __init__(self, ctx: Any, workers: int) -> None:
        self.ready = ctx.Array("q", workers, lock=False)  # 1 = connected, -1 = failed
        self.submitted = ctx.Array("q", workers, lock=False)  # deliveries asked for (messages x recipients)
        self.accepted = ctx.Array("q", workers, lock=False)  # deliveries the broker accepted (receipts)
        self.delivered = ctx.Array("q", workers, lock=False)  # deliveries received and ACKed
        self.statuses = ctx.Array("q", workers, lock=False)  # delivery statuses received and STATUS_ACKed
        self.connected = ctx.Array("q", workers, lock=False)  # idle connections open
        self.sending_done = ctx.Array("q", workers, lock=False)
        self.start_ns = ctx.Value("q", 0, lock=False)
        self.stop = ctx.Value("q", 0, lock=False)


def _ns_to_trio(deadline_ns: int) -> float:
    return trio.current_time() + (deadline_ns - time.time_ns()) / 1e9


async def _wait_until(deadline_ns: int, spin: bool) -> None:
    remaining = deadline_ns - time.time_ns()
    if remaining <= 0:
        await trio.lowlevel.checkpoint()
        return
    if not spin:
        await trio.sleep_until(_ns_to_trio(deadline_ns))
        return
    if remaining > SPIN_WINDOW_NS:
        await trio.sleep_until(_ns_to_trio(deadline_ns - SPIN_WINDOW_NS))
    while time.time_ns() < deadline_ns:
        await trio.lowlevel.checkpoint()


class _Worker:
    def __init__(self, spec: WorkerSpec, shared: Shared) -> None:
        from broker.auth import Authenticator

        self.spec = spec
        self.shared = shared
        self.auth = Authenticator(spec.secret)
        self.latency = new_histogram()  # receive - intended send time
        self.service = new_histogram()  # receive - actual hand-over to the client
        self.send_lag = new_histogram()  # actual hand-over - intended send time
        self.connect = new_histogram()  # open_client duration (connect + HELLO/WELCOME)
        self.bins: Counter[int] = Counter()
        self.pad = bytes(max(0, spec.body_bytes - STAMP_BYTES))
        self.counts = Counter[str]()
        self.connect_first_ns = 0
        self.connect_last_ns = 0
        self.window_open = trio.Event()

    def token(self, mailbox: str) -> str:
        return self.auth.issue(mailbox, lifetime_s=24 * 3600)

    async def run(self) -> None:
        from contextlib import AsyncExitStack

        from client import open_client

        spec, shared, i = self.spec, self.shared, self.spec.index
        async with AsyncExitStack() as stack:
            if spec.idle:
                await self._hold_idle(stack)
                return
            receivers = [
                (m, await stack.enter_async_context(self._open(open_client, spec.receive_url, m)))
                for m in spec.receivers
            ]
            senders = [
                (await stack.enter_async_context(self._open(open_client, spec.url, m)), to) for m, to in spec.senders
            ]
            shared.ready[i] = 1
            while shared.start_ns.value == 0 and not shared.stop.value:
                await trio.sleep(0.002)
            start_ns = shared.start_ns.value
            end_ns = start_ns + int(spec.duration_s * 1e9)
            await _wait_until(start_ns, spin=False)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_stop, nursery.cancel_scope)
                for _mailbox, client in receivers:
                    nursery.start_soon(self._receive, client, start_ns)
                if spec.notify:
                    for client, _to in senders:
                        nursery.start_soon(self._take_statuses, client)
                if senders:
                    nursery.start_soon(self._send_all, senders, start_ns, end_ns)
                else:
                    shared.sending_done[i] = 1
            # Closing the clients says BYE after writing the queued ACKs.

    def _open(self, open_client: Any, url: str, mailbox: str) -> Any:
        # e2e off unless --e2e: the plaintext figures measure the relay itself.
        return open_client(
            url, self.token(mailbox), reconnect=False, agent="relay-bench", e2e=self.spec.e2e, ca_file=self.spec.ca_file
        )

    async def _watch_stop(self, scope: trio.CancelScope) -> None:
        while not self.shared.stop.value:
            await trio.sleep(0.01)
        scope.cancel()

    # ------------------------------------------------------------ sending

    async def _send_all(self, senders: list[tuple[Any, tuple[str, ...]]], start_ns: int, end_ns: int) -> None:
        async with trio.open_nursery() as nursery:
            if self.spec.mode == "max":
                nursery.start_soon(self._gate_window, end_ns)
            for client, to in senders:
                if self.spec.mode == "rate":
                    nursery.start_soon(self._send_at_rate, nursery, client, to, start_ns, end_ns)
                else:
                    for _ in range(self.spec.depth):
                        nursery.start_soon(self._send_max, client, to, end_ns)
        self.shared.sending_done[self.spec.index] = 1

    async def _gate_window(self, end_ns: int) -> None:
        """Open ``self.window_open`` while fewer than ``window`` messages (over all workers) are sent
        but not delivered. One task per worker polls the shared counters, not every sender."""
        shared, window = self.shared, self.spec.window
        workers = range(len(shared.submitted))
        while time.time_ns() < end_ns:
            outstanding = sum(shared.submitted[w] for w in workers) - sum(shared.delivered[w] for w in workers)
            if outstanding < window:
                self.window_open.set()
            elif self.window_open.is_set():
                self.window_open = trio.Event()
            await trio.sleep(0.0005)
        self.window_open.set()  # let every sender see the end

    async def _submit(self, client: Any, msgs: list[Any], fan: int) -> None:
        from client import Status

        i = self.spec.index
        self.shared.submitted[i] += len(msgs) * fan
        receipts = await client.send_batch(msgs)
        accepted = 0
        for r in receipts:
            if r.code is not None:  # refused as a whole: every recipient
                self.counts["refused"] += fan
                continue
            for res in r.results.values():
                if res.status is Status.DELIVERED or res.status is Status.QUEUED:
                    accepted += 1
                elif res.status is Status.DUPLICATE:
                    self.counts["duplicate"] += 1
                else:
                    self.counts["refused"] += 1
        self.counts["messages_sent"] += len(msgs)
        self.counts["accepted"] += accepted
        self.shared.accepted[i] += accepted

    async def _send_at_rate(
        self, nursery: trio.Nursery, client: Any, to: tuple[str, ...], start_ns: int, end_ns: int
    ) -> None:
        from client import OutgoingMessage

        interval = 1e9 / self.spec.rate_per_sender
        seq = 0
        pad = self.pad
        fan = len(to)
        recipients = to[0] if fan == 1 else to
        while True:
            due = start_ns + int(seq * interval)
            if due >= end_ns:
                return
            await _wait_until(due, self.spec.spin)
            now = time.time_ns()
            self.send_lag.record_value(min(max((now - due) // 1000, 1), HIST_MAX_US))
            msgs = []
            while due <= now and due < end_ns:
                msgs.append(
                    OutgoingMessage(
                        to=recipients,
                        body=due.to_bytes(8, "little") + now.to_bytes(8, "little") + pad,
                        notify=self.spec.notify,
                    )
                )
                seq += 1
                due = start_ns + int(seq * interval)
            nursery.start_soon(self._submit, client, msgs, fan)

    async def _send_max(self, client: Any, to: tuple[str, ...], end_ns: int) -> None:
        from client import OutgoingMessage

        spec = self.spec
        fan = len(to)
        recipients = to[0] if fan == 1 else to
        while time.time_ns() < end_ns:
            if not self.window_open.is_set():
                await self.window_open.wait()
                continue
            now = time.time_ns()
            stamp = now.to_bytes(8, "little")
            # One message object for the whole batch: send_batch gives each item its own id.
            message = OutgoingMessage(to=recipients, body=stamp + stamp + self.pad, notify=spec.notify)
            await self._submit(client, [message] * spec.batch, fan)

    # ------------------------------------------------------------ receiving

    async def _receive(self, client: Any, start_ns: int) -> None:
        shared, i = self.shared, self.spec.index
        bin_ns = int(self.spec.bin_s * 1e9)
        latency, service, bins = self.latency, self.service, self.bins
        record_from = start_ns + int(self.spec.warmup_s * 1e9)
        async for batch in client.delivery_batches():
            now = time.time_ns()
            client.ack([d.id for d in batch])
            # Deliveries of one batch often share stamps: record each distinct value once, with its count.
            stamps = Counter(d.body[:STAMP_BYTES] for d in batch)
            for stamp, n in stamps.items():
                intended = int.from_bytes(stamp[:8], "little")
                if intended < record_from:
                    continue
                handed = int.from_bytes(stamp[8:16], "little")
                latency.record_value(min(max((now - intended) // 1000, 1), HIST_MAX_US), n)
                service.record_value(min(max((now - handed) // 1000, 1), HIST_MAX_US), n)
            redelivered = sum(1 for d in batch if d.attempt > 1)
            if redelivered:
                self.counts["redelivered"] += redelivered
            self.counts["delivered"] += len(batch)
            if self.spec.e2e:  # opened and verified end to end (not "plaintext" nor "failed")
                self.counts["opened_e2e"] += sum(1 for d in batch if d.security == "e2e")
            bins[(now - start_ns) // bin_ns] += len(batch)
            shared.delivered[i] += len(batch)

    async def _take_statuses(self, client: Any) -> None:
        """A sender's delivery statuses: STATUS_ACK each batch at once, count them (by state)."""
        shared, i = self.shared, self.spec.index
        async for batch in client.status_batches():
            client.ack_statuses([s.seq for s in batch])
            for s in batch:
                self.counts[f"status_{s.state.value}"] += s.count or 1
            self.counts["statuses"] += len(batch)
            shared.statuses[i] += len(batch)

    # ------------------------------------------------------------ idle connections

    async def _hold_idle(self, stack: Any) -> None:
        from client import open_client

        spec, shared, i = self.spec, self.shared, self.spec.index
        tokens = [self.token(m) for m in spec.idle]
        shared.ready[i] = 1
        while shared.start_ns.value == 0 and not shared.stop.value:
            await trio.sleep(0.002)
        await _wait_until(shared.start_ns.value, spin=False)
        limit = trio.Semaphore(spec.connect_concurrency)

        async def hold(token: str) -> None:
            await limit.acquire()
            held = True
            t0 = time.time_ns()
            if not self.connect_first_ns:
                self.connect_first_ns = t0
            try:
                async with open_client(
                    spec.url, token, reconnect=False, agent="relay-bench", e2e=False, ca_file=spec.ca_file
                ):
                    t1 = time.time_ns()
                    limit.release()
                    held = False
                    self.connect_last_ns = t1
                    self.connect.record_value(min(max((t1 - t0) // 1000, 1), HIST_MAX_US))
                    shared.connected[i] += 1
                    self.counts["connected"] += 1
                    await trio.sleep_forever()
            except Exception as exc:
                self.counts["connect_failed"] += 1
                self.counts[f"error: {type(exc).__name__}: {exc}"[:200]] += 1
            finally:
                if held:
                    limit.release()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_stop, nursery.cancel_scope)
            for token in tokens:
                nursery.start_soon(hold, token)

    # ------------------------------------------------------------ result

    def result(self) -> dict[str, Any]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "index": self.spec.index,
            "counts": dict(self.counts),
            "latency": self.latency.encode(),
            "service": self.service.encode(),
            "send_lag": self.send_lag.encode(),
            "connect": self.connect.encode(),
            "bins": dict(self.bins),
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "max_rss_bytes": usage.ru_maxrss * 1024,
            "connect_first_ns": self.connect_first_ns,
            "connect_last_ns": self.connect_last_ns,
        }


def worker_main(spec: WorkerSpec, shared: Shared, results: Any) -> None:
    """Process entry point: run the worker, put ``("ok", index, result)`` or ``("error", index, text)``."""
    from .target import raise_nofile_limit

    raise_nofile_limit()
    worker = _Worker(spec, shared)
    gc.freeze()  # imports live as long as the worker: keep full collections short (see broker/cli.py)
    try:
        trio.run(worker.run)
    except BaseException:
        shared.ready[spec.index] = -1
        results.put(("error", spec.index, traceback.format_exc()))
        return
    results.put(("ok", spec.index, worker.result()))
