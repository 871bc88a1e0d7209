"""Run worker processes against a broker and gather what they measured.

:func:`run_load` starts one process per :class:`~bench.worker.WorkerSpec` (``spawn``: each has
its own interpreter and trio loop), waits until all are connected, gives them a common start
time, samples the CPU time of the broker's processes (each node, and Redis) and of the workers
every ``SAMPLE_S`` while updating the progress bar, tells them to stop once every accepted
message has been delivered (and, for SENDs with ``notify``, its status has reached its sender:
one per accepted message) or the drain deadline passes, and merges their histograms,
counters and per-interval delivery counts.
"""

from __future__ import annotations

import multiprocessing
import queue
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
from hdrh.histogram import HdrHistogram

from .target import BenchError, BrokerTarget
from .worker import Shared, WorkerSpec, new_histogram, worker_main

__all__ = ["LoadResult", "Progress", "Sample", "cpu_delta", "host_busy_s", "run_load"]

SAMPLE_S = 0.1
"""How often the parent samples CPU times and updates the progress bar."""
READY_TIMEOUT_S = 120.0
"""Longest the workers may take to connect all their clients."""
RESULT_TIMEOUT_S = 60.0
START_DELAY_NS = 200_000_000
"""The common start time is this far after the last worker is ready (every worker must see it first)."""

Progress = Callable[..., None]
"""``update(completed, total=None, info="")`` for the live progress bar."""


@dataclass
class Sample:
    t_s: float  # seconds since the load started (negative before)
    cpu_s: dict[str, float | None]  # per watched process (BrokerTarget.cpu_times: node1..., redis)
    workers_cpu_s: float
    delivered: int
    host_busy_s: float  # CPU seconds spent by the whole host (all cores)


@dataclass
class LoadResult:
    start_ns: int
    sending_done_ns: int
    done_ns: int
    timed_out: bool
    counts: Counter[str]
    latency: HdrHistogram
    service: HdrHistogram
    send_lag: HdrHistogram
    connect: HdrHistogram
    bins: Counter[int]
    samples: list[Sample]
    workers: list[dict[str, Any]]
    held: dict[str, Any] = field(default_factory=dict)
    """What the ``while_held`` callback returned (the connections scenario's measurements)."""

    def cpu_between(self, t0_s: float, t1_s: float) -> tuple[dict[str, float | None], float, float]:
        """(per watched process, workers, host) CPU seconds spent between two sample times (nearest samples)."""
        a = min(self.samples, key=lambda s: abs(s.t_s - t0_s))
        b = min(self.samples, key=lambda s: abs(s.t_s - t1_s))
        return cpu_delta(a.cpu_s, b.cpu_s), b.workers_cpu_s - a.workers_cpu_s, b.host_busy_s - a.host_busy_s

    def sample_span(self, t0_s: float, t1_s: float) -> float:
        a = min(self.samples, key=lambda s: abs(s.t_s - t0_s))
        b = min(self.samples, key=lambda s: abs(s.t_s - t1_s))
        return b.t_s - a.t_s


def cpu_delta(a: dict[str, float | None], b: dict[str, float | None]) -> dict[str, float | None]:
    """CPU seconds each process spent from reading ``a`` to reading ``b`` (None when either is unknown)."""
    out: dict[str, float | None] = {}
    for name, v in b.items():
        v0 = a.get(name)
        out[name] = None if v is None or v0 is None else v - v0
    return out


def host_busy_s() -> float:
    """CPU seconds the whole host has spent so far (all cores)."""
    t = psutil.cpu_times()
    return float(t.user + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0) + getattr(t, "nice", 0.0))


def _cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def run_load(
    target: BrokerTarget,
    specs: list[WorkerSpec],
    *,
    duration_s: float,
    drain_timeout_s: float = 30.0,
    progress: Progress | None = None,
    expected_connections: int = 0,
    while_held: Callable[[], dict[str, Any]] | None = None,
) -> LoadResult:
    """Run ``specs`` in worker processes; see the module docstring. Raises BenchError if a worker fails.

    With ``expected_connections`` (idle-connection workers), the load is done when that many are
    open (or failed); ``while_held`` then runs while they are still held.
    """
    ctx = multiprocessing.get_context("spawn")
    n = len(specs)
    notify = any(spec.notify for spec in specs)
    shared = Shared(ctx, n)
    results: Any = ctx.Queue()
    procs = [ctx.Process(target=worker_main, args=(spec, shared, results), daemon=True) for spec in specs]
    for p in procs:
        p.start()
    watched = [psutil.Process(p.pid) for p in procs if p.pid is not None]
    outcomes: dict[int, dict[str, Any]] = {}
    errors: list[str] = []

    def collect(block_s: float) -> None:
        try:
            kind, index, payload = results.get(timeout=block_s)
        except queue.Empty:
            return
        if kind == "ok":
            outcomes[index] = payload
        else:
            errors.append(f"worker {index} failed:\n{payload}")

    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not all(shared.ready[i] == 1 for i in range(n)):
            collect(0.01)
            target.check_alive()
            if errors or any(shared.ready[i] == -1 for i in range(n)) or any(not p.is_alive() for p in procs):
                collect(1.0)
                raise BenchError("\n".join(errors) or "a worker process died while connecting")
            if time.monotonic() > deadline:
                raise BenchError(f"the workers did not connect within {READY_TIMEOUT_S:g} s")
            if progress:
                progress(0, info="connecting")
        start_ns = time.time_ns() + START_DELAY_NS
        samples: list[Sample] = []

        def sample() -> Sample:
            s = Sample(
                (time.time_ns() - start_ns) / 1e9,
                target.cpu_times(),
                _cpu(watched),
                sum(shared.delivered[i] for i in range(n)),
                host_busy_s(),
            )
            samples.append(s)
            return s

        sample()
        shared.start_ns.value = start_ns
        end_ns = start_ns + int(duration_s * 1e9)
        sending_done_ns = 0
        timed_out = False
        held: dict[str, Any] = {}
        while True:
            time.sleep(SAMPLE_S)
            s = sample()
            target.check_alive()
            if errors or not all(p.is_alive() for p in procs):
                collect(1.0)
                raise BenchError("\n".join(errors) or "a worker process died")
            now = time.time_ns()
            if expected_connections:
                opened = sum(shared.connected[i] for i in range(n))
                if progress:
                    progress(opened, total=expected_connections, info=f"{opened:,} connections")
                if opened >= expected_connections or now > end_ns + int(drain_timeout_s * 1e9):
                    timed_out = opened < expected_connections
                    sending_done_ns = now
                    if while_held is not None:
                        held = while_held()
                    sample()
                    break
                continue
            accepted = sum(shared.accepted[i] for i in range(n))
            sent_done = all(shared.sending_done[i] for i in range(n))
            if sent_done and not sending_done_ns:
                sending_done_ns = now
            if progress:
                elapsed = min(max(now - start_ns, 0), end_ns - start_ns) / 1e9
                info = f"{s.delivered:,} delivered"
                if sent_done:
                    info += f", draining {max(accepted - s.delivered, 0):,}"
                progress(elapsed, total=duration_s, info=info)
            statuses_due = accepted if notify else 0  # one status per delivered-and-ACKed message
            if sent_done and s.delivered >= accepted and sum(shared.statuses[i] for i in range(n)) >= statuses_due:
                break
            if now > end_ns + int(drain_timeout_s * 1e9):
                timed_out = True
                break
        done_ns = time.time_ns()
        shared.stop.value = 1
        deadline = time.monotonic() + RESULT_TIMEOUT_S
        while len(outcomes) + len(errors) < n and time.monotonic() < deadline:
            collect(0.1)
        if errors:
            raise BenchError("\n".join(errors))
        if len(outcomes) < n:
            raise BenchError("some workers did not report their results")
    finally:
        shared.stop.value = 1
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()

    counts: Counter[str] = Counter()
    bins: Counter[int] = Counter()
    hists = {name: new_histogram() for name in ("latency", "service", "send_lag", "connect")}
    for out in outcomes.values():
        counts.update(out["counts"])
        bins.update(out["bins"])
        for name, h in hists.items():
            h.decode_and_add(out[name])
    return LoadResult(
        start_ns=start_ns,
        sending_done_ns=sending_done_ns or done_ns,
        done_ns=done_ns,
        timed_out=timed_out,
        counts=counts,
        latency=hists["latency"],
        service=hists["service"],
        send_lag=hists["send_lag"],
        connect=hists["connect"],
        bins=bins,
        samples=samples,
        workers=[outcomes[i] for i in sorted(outcomes)],
        held=held,
    )
