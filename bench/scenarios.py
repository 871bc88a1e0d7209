"""The named scenarios. Each takes the parsed options, the broker under test and a progress
factory, and returns a :class:`~bench.reporting.Report` with its figures and the issue's targets.

Targets (issue 4; 2 cores, broker and bench on one host, 256-byte bodies, TCP, in-memory store):
latency p99 < 0.5 ms at 1,000 msg/s; throughput >= 60,000 msg/s 1 to 1 and >= 50,000 msg/s over
100 pairs, delivered and ACKed; offline drain of 100,000 messages < 1 s with < 600 bytes of broker
memory per queued message; 10,000 idle connections at < 30 KiB of broker RSS each.
"""

from __future__ import annotations

import argparse
import os
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

import trio

from .reporting import Report, hist_figures, percentile_curve, share_below
from .runner import LoadResult, Progress, cpu_delta, host_busy_s, run_load
from .target import TLS_TRANSPORTS, BenchError, BrokerTarget
from .worker import WorkerSpec

__all__ = ["SCENARIOS"]

ProgressFactory = Callable[[str, float | None], Progress]
CPU_BOUND_PCT = 90.0
"""A process at or above this share of one core is taken to be the bottleneck."""


def _prefix() -> str:
    return "bench" + secrets.token_hex(3)


def _pct(cpu_s: float | None, wall_s: float) -> float | None:
    return None if cpu_s is None or wall_s <= 0 else round(100.0 * cpu_s / wall_s, 1)


def _timeline(result: LoadResult, bin_s: float) -> list[list[float]]:
    if not result.bins:
        return []
    last = max(result.bins)
    return [[round((b + 1) * bin_s, 3), round(result.bins.get(b, 0) / bin_s, 1)] for b in range(0, last + 1)]


def _delivered_between(result: LoadResult, bin_s: float, t0_s: float, t1_s: float) -> int:
    lo, hi = round(t0_s / bin_s), round(t1_s / bin_s)
    return sum(n for b, n in result.bins.items() if lo <= b < hi)


def _other_cpu(watched_pct: float | None, bench_pct: float | None, host_pct: float | None) -> float | None:
    """CPU used by other processes on the host, in % of one core (host_pct is % of all cores; watched_pct is the
    broker's processes: every node and Redis)."""
    if host_pct is None or watched_pct is None or bench_pct is None:
        return None
    return round(max(0.0, host_pct * (os.cpu_count() or 1) - watched_pct - bench_pct), 1)


OTHER_CPU_NOTE_PCT = 15.0


def _cpu_figures(
    prefix: str,
    cpu: dict[str, float | None],
    bench_cpu_s: float | None,
    host_cpu_s: float | None,
    span_s: float,
    messages: int,
) -> dict[str, Any]:
    """The CPU figures of one measured window, from :meth:`BrokerTarget.cpu_times` deltas: ``broker_cpu_pct`` and
    ``broker_us_per_msg`` (all nodes together), the same per node (``node1_...``) when there are several, and for
    Redis (``redis_...``) when there is one; then the load generator's, the host's and other processes' share."""
    nodes = {k: v for k, v in cpu.items() if k.startswith("node")}
    broker = None if any(v is None for v in nodes.values()) else sum(v for v in nodes.values() if v is not None)
    processes: dict[str, float | None] = {"broker": broker}
    if len(nodes) > 1:
        processes.update(nodes)
    if "redis" in cpu:
        processes["redis"] = cpu["redis"]
    out: dict[str, Any] = {}
    for name, cpu_s in processes.items():
        out[f"{prefix}{name}_cpu_pct"] = _pct(cpu_s, span_s)
        out[f"{prefix}{name}_us_per_msg"] = None if cpu_s is None or not messages else round(cpu_s / messages * 1e6, 2)
    redis = cpu["redis"] if "redis" in cpu else 0.0
    watched = None if broker is None or redis is None else broker + redis
    cores = os.cpu_count() or 1
    bench_pct = _pct(bench_cpu_s, span_s)
    host_pct = None if host_cpu_s is None else _pct(host_cpu_s / cores, span_s)
    out[f"{prefix}bench_cpu_pct"] = bench_pct
    out[f"{prefix}bench_us_per_msg"] = (
        None if bench_cpu_s is None or not messages else round(bench_cpu_s / messages * 1e6, 2)
    )
    out[f"{prefix}host_cpu_pct"] = host_pct
    out[f"{prefix}other_cpu_pct"] = _other_cpu(_pct(watched, span_s), bench_pct, host_pct)
    return out


def _limit_note(label: str, figures: dict[str, Any], prefix: str, workers: int) -> str:
    """Which process was the limit of a window whose :func:`_cpu_figures` are in ``figures`` under ``prefix``."""
    cores = os.cpu_count() or 1
    nodes = sorted(
        k[len(prefix) : -len("_cpu_pct")] for k in figures if k.startswith(f"{prefix}node") and k.endswith("_cpu_pct")
    )
    names = {n: f"node {n[4:]}" for n in nodes} if nodes else {"broker": "the broker"}
    if f"{prefix}redis_cpu_pct" in figures:
        names["redis"] = "Redis"
    shares = {label_: figures[f"{prefix}{key}_cpu_pct"] for key, label_ in names.items()}
    bench_pct, host_pct = figures[f"{prefix}bench_cpu_pct"], figures[f"{prefix}host_cpu_pct"]
    parts = ", ".join(f"{name} {pct}%" for name, pct in shares.items()) + " of one core"
    parts += f", load generator {bench_pct}% ({workers} process(es))"
    if host_pct is not None:
        parts += f", host {host_pct}% of {cores} cores"
    other = figures[f"{prefix}other_cpu_pct"]
    if other is not None and other >= OTHER_CPU_NOTE_PCT:
        parts += f"; OTHER processes on the host used {other}% of one core, so these figures are disturbed"
    bound = [name for name, pct in shares.items() if pct is not None and pct >= CPU_BOUND_PCT]
    if bound:
        return f"{label}: {' and '.join(bound)} {'was' if len(bound) == 1 else 'were'} the limit (CPU-bound): {parts}"
    if host_pct is not None and host_pct >= CPU_BOUND_PCT:
        return (
            f"{label}: the machine's {cores} cores were saturated with no broker process CPU-bound, so the cores "
            f"(shared with the load generator) were the limit: {parts}"
        )
    if bench_pct is not None and workers and bench_pct / workers >= CPU_BOUND_PCT:
        return f"{label}: the load generator was the limit (its processes were CPU-bound): {parts}"
    return f"{label}: no process was CPU-bound ({parts}); round trips and flow-control windows set the pace"


def _round_trips_per_message(before: int | None, after: int | None, delivered: int) -> float | None:
    """Round trips the broker's nodes made to their store (STATS ``store_round_trips``, summed over the nodes) per
    delivered message over a run: 0 for the in-memory store, None for a broker that does not report them."""
    if before is None or after is None or not delivered:
        return None
    return round((after - before) / delivered, 4)


async def _settle_acks(
    target: BrokerTarget, key: str, expect: int, timeout_s: float = 5.0, url: str | None = None
) -> tuple[int, float]:
    """Poll a node's stats (default the receiving node's: it applies the ACKs, so its view is current) until
    ``key`` reaches ``expect``; returns (value, seconds waited)."""
    t0 = time.perf_counter()
    value = 0
    with trio.move_on_after(timeout_s):
        while True:
            value = (await target.stats(url or target.receive_url)).get(key, 0)
            if value >= expect:
                break
            await trio.sleep(0.002)
    return value, time.perf_counter() - t0


# ---------------------------------------------------------------- worker specs


def _spec(target: BrokerTarget, index: int, *, scheme: str | None = None, **kw: Any) -> WorkerSpec:
    """Worker ``index``'s spec against ``target`` (where it connects, over ``scheme`` if given, else the bench's
    transport; how it mints tokens; the CA it trusts); the rest from ``kw``."""
    url, receive_url = target.urls_for(scheme) if scheme is not None else (target.url, target.receive_url)
    return WorkerSpec(index=index, url=url, receive_url=receive_url, secret=target.secret, ca_file=target.ca_file, **kw)


def _at_rate(opts: argparse.Namespace) -> dict[str, Any]:
    """The fixed-rate load of ``latency`` and ``fanout``: ``--rate`` per sender for warm-up plus ``--duration``."""
    return {
        "mode": "rate",
        "rate_per_sender": opts.rate,
        "duration_s": opts.warmup + opts.duration,
        "spin": opts.timer == "spin",
        "warmup_s": opts.warmup,
    }


# ---------------------------------------------------------------- latency


def latency(opts: argparse.Namespace, target: BrokerTarget, progress: ProgressFactory) -> Report:
    p = _prefix()
    rx, tx = f"{p}-rx", f"{p}-tx"
    total_s = opts.warmup + opts.duration
    spec = _spec(target, 0, senders=[(tx, (rx,))], receivers=[rx], body_bytes=opts.body_bytes, **_at_rate(opts))
    config = {"rate_msg_s": opts.rate, "duration_s": opts.duration, "warmup_s": opts.warmup, "timer": opts.timer}
    report = Report("latency", config)
    trips0 = trio.run(target.round_trips)
    result = run_load(target, [spec], duration_s=total_s, progress=progress("latency", total_s))
    trips = _round_trips_per_message(trips0, trio.run(target.round_trips), int(result.counts.get("delivered", 0)))
    cpu, bench_cpu, host_cpu = result.cpu_between(opts.warmup, total_s)
    span = result.sample_span(opts.warmup, total_s)
    delivered_window = _delivered_between(result, spec.bin_s, opts.warmup, total_s)
    report.add(
        offered_msg_s=opts.rate,
        delivered_msg_s=round(delivered_window / opts.duration, 1),
        measured_messages=result.latency.get_total_count(),
        **hist_figures(result.latency, "latency"),
        share_under_10ms_pct=share_below(result.latency, 10_000),
        share_under_50ms_pct=share_below(result.latency, 50_000),
        **hist_figures(result.service, "service"),
        **hist_figures(result.send_lag, "send_lag"),
        **_cpu_figures("", cpu, bench_cpu, host_cpu, span, round(delivered_window * span / opts.duration)),
        store_round_trips_per_msg=trips,
    )
    limit = _limit_note("latency", report.figures, "", 1)
    if opts.timer == "spin":
        limit += " (bench_cpu_pct is mostly the spin timer busy-waiting, not work)"
    report.note(limit)
    if not trips:
        report.target("latency_p99_us", "<", 500, f"online delivery latency p99 under 0.5 ms at {opts.rate:g} msg/s")
    elif len(target.nodes) == 1:
        report.target("latency_p99_us", "<", 2000, f"over a networked store, p99 under 2 ms at {opts.rate:g} msg/s")
    else:
        report.target(
            "latency_p99_us", "<", 3000, f"across nodes over a networked store, p99 under 3 ms at {opts.rate:g} msg/s"
        )
    report.data["counts"] = _counts(result)
    report.data["curves"] = {"latency (from intended send)": percentile_curve(result.latency)}
    report.data["curves"]["service (from hand-over)"] = percentile_curve(result.service)
    report.data["timelines"] = {"delivered": _timeline(result, spec.bin_s)}
    report.note(
        "latency_* is measured from each message's intended send time (fixed schedule, coordinated-omission aware); "
        "service_* from when the bench handed it to the client; send_lag_* is how late the load generator's "
        "schedule ran (it is charged to latency_*)."
    )
    if result.send_lag.get_total_count() and result.send_lag.get_value_at_percentile(99) > 200:
        report.note(
            f"the load generator's own lateness is large"
            f" (send_lag p99 {result.send_lag.get_value_at_percentile(99)} us): "
            "part of latency_* is the bench, not the broker"
        )
    _check_complete(report, result)
    return report


def _counts(result: LoadResult) -> dict[str, int]:
    keys = ("messages_sent", "accepted", "delivered", "redelivered", "duplicate", "refused")
    out = {k: int(result.counts.get(k, 0)) for k in keys}
    out.update({k: v for k, v in result.counts.items() if k not in out})
    return out


def _check_complete(report: Report, result: LoadResult) -> None:
    c = result.counts
    if result.timed_out:
        report.note(
            f"TIMED OUT draining: {c.get('accepted', 0) - c.get('delivered', 0):,} accepted messages undelivered"
        )
    if c.get("refused"):
        report.note(f"{c['refused']:,} deliveries were refused by the broker (see counts)")


# ---------------------------------------------------------------- throughput


def _pair_specs(opts: argparse.Namespace, target: BrokerTarget, pairs: int, p: str, **kw: Any) -> list[WorkerSpec]:
    workers = max(1, min(opts.workers, 2 * pairs))
    specs = [_spec(target, w, body_bytes=opts.body_bytes, **kw) for w in range(workers)]
    for i in range(pairs):
        tx, rx = f"{p}-tx{i}", f"{p}-rx{i}"
        specs[i % workers].senders.append((tx, (rx,)))
        specs[(i + 1) % workers].receivers.append(rx)
    return specs


E2E_BATCH = 16
"""The end-to-end runs' largest send_batch: sealing costs about a millisecond a message in the client, so a batch of
256 from each of 100 senders (depth 4) would seal for a minute before the first one went out."""
E2E_WINDOW = 4096
"""The end-to-end runs' largest sent-not-delivered window: a few seconds of what the clients can seal and open, so
the backlog drains within the run's timeout."""


def throughput(opts: argparse.Namespace, target: BrokerTarget, progress: ProgressFactory) -> Report:
    pair_counts = [int(x) for x in str(opts.pairs).split(",") if x.strip()]
    if not pair_counts or min(pair_counts) < 1:
        raise BenchError("--pairs takes a comma-separated list of pair counts, e.g. 1,100")
    config = {
        "pairs": pair_counts,
        "duration_s": opts.duration,
        "warmup_s": opts.warmup,
        "workers": opts.workers,
        "batch": opts.batch,
        "depth": opts.depth,
        "window": opts.window,
        "notify": opts.notify,
        "e2e": opts.e2e,
        "tls": opts.tls,
    }
    secure = _tls_scheme(target) if opts.tls else None
    report = Report("throughput", config)
    counts: dict[str, int] = {}
    networked = False
    # Each pair count runs plaintext first, then, back to back, with statuses (--notify), end to end (--e2e) and
    # over TLS (--tls).
    variants = [(False, False, False)]
    variants += (
        [(True, False, False)] * opts.notify + [(False, True, False)] * opts.e2e + [(False, False, True)] * opts.tls
    )
    runs = [(pairs, notify, e2e, tls) for pairs in pair_counts for notify, e2e, tls in variants]
    for pairs, notify, e2e, tls in runs:
        p = _prefix()
        specs = _pair_specs(
            opts,
            target,
            pairs,
            p,
            mode="max",
            duration_s=opts.duration,
            batch=min(opts.batch, E2E_BATCH) if e2e else opts.batch,
            depth=opts.depth,
            window=min(opts.window, E2E_WINDOW) if e2e else opts.window,
            warmup_s=opts.warmup,
            notify=notify,
            e2e=e2e,
            scheme=secure if tls else None,
        )
        label = f"{pairs} pair(s){' with notify' if notify else ''}{' end to end' if e2e else ''}"
        label += f" over {secure}://" if tls else ""
        before = trio.run(target.stats)
        trips0 = trio.run(target.round_trips)
        result = run_load(
            target, specs, duration_s=opts.duration, progress=progress(f"throughput {label}", opts.duration)
        )
        delivered = int(result.counts.get("delivered", 0))
        acked, _ = trio.run(_settle_acks, target, "acknowledged_total", before.get("acknowledged_total", 0) + delivered)
        round_trips = _round_trips_per_message(trips0, trio.run(target.round_trips), delivered)
        window_s = opts.duration - opts.warmup
        rate = _delivered_between(result, specs[0].bin_s, opts.warmup, opts.duration) / window_s
        cpu, bench_cpu, host_cpu = result.cpu_between(opts.warmup, opts.duration)
        span = result.sample_span(opts.warmup, opts.duration)
        k = f"pairs_{pairs}" + ("_notify" if notify else "") + ("_e2e" if e2e else "") + ("_tls" if tls else "")
        report.add(
            **{
                f"{k}_delivered_msg_s": round(rate, 1),
                **_cpu_figures(f"{k}_", cpu, bench_cpu, host_cpu, span, round(rate * span)),
                f"{k}_acked_confirmed": acked - before.get("acknowledged_total", 0),
                f"{k}_latency_p50_us": hist_figures(result.latency, "x")["x_p50_us"],
                f"{k}_latency_p99_us": hist_figures(result.latency, "x")["x_p99_us"],
                f"{k}_store_round_trips_per_msg": round_trips,
            }
        )
        if notify:
            _notify_figures(report, target, pairs, result, before, delivered, rate)
        if e2e or tls:
            _compare_with_plaintext(report, pairs, k, rate)
        if round_trips and not (
            notify or e2e or tls
        ):  # a networked store (Redis): its round trips per delivered-and-ACKed message
            networked = True
            report.target(f"{k}_store_round_trips_per_msg", "<=", 0.2, f"{pairs} pair(s): at most 0.2 round trips/msg")
        for key, v in _counts(result).items():
            counts[f"{k}_{key}"] = v
        report.data["timelines"][label] = _timeline(result, specs[0].bin_s)
        report.data["curves"][f"{label}, under max load"] = percentile_curve(result.latency)
        report.note(_limit_note(label, report.figures, f"{k}_", len(specs)))
        _check_complete(report, result)
        if acked - before.get("acknowledged_total", 0) < delivered:
            report.note(f"{label}: the broker confirmed fewer ACKs than deliveries received")
        if notify and result.counts.get("statuses", 0) < delivered:
            report.note(f"{label}: the senders got fewer delivery statuses than messages were delivered")
    report.data["counts"] = counts
    if networked:  # issue 10: one node over Redis, and several nodes at least as fast as one
        for pairs in (1, 100):
            if pairs in pair_counts:
                report.target(
                    f"pairs_{pairs}_delivered_msg_s",
                    ">=",
                    20_000,
                    f"over a networked store, {pairs} pair(s) at least 20,000 msg/s delivered and ACKed",
                )
    else:
        if 1 in pair_counts:
            report.target(
                "pairs_1_delivered_msg_s", ">=", 60_000, "throughput 1 to 1, delivered and ACKed, at least 60,000 msg/s"
            )
        if 100 in pair_counts:
            report.target("pairs_100_delivered_msg_s", ">=", 50_000, "throughput over 100 pairs at least 50,000 msg/s")
    report.note(
        "throughput is delivered-and-ACKed messages per second between warm-up and the end of sending; "
        "the ACK count is confirmed from the broker's acknowledged_total"
    )
    if opts.notify:
        report.note(
            "--notify: each pair count ran twice, back to back, without and then with delivery statuses (every "
            "SEND with notify, each status taken and STATUS_ACKed by its sender); pairs_N_notify_rate_ratio is "
            "the second's throughput over the first's, pairs_N_notify_extra_* what statuses add per delivered message"
        )
    if opts.e2e:
        report.note(
            "--e2e: each pair count also ran end to end encrypted, right after its plaintext run (every client "
            "publishing its key, every message sealed by its sender and opened and verified by its recipient: "
            "docs/e2e.md); pairs_N_e2e_rate_ratio is its throughput over the plaintext run's, "
            "pairs_N_e2e_extra_bench_us_per_msg the clients' extra CPU per delivered message (sealing and opening "
            "happen in the clients), pairs_N_e2e_extra_broker_us_per_msg the broker's (larger bodies); the end-to-end "
            f"runs send batches of at most {E2E_BATCH} with a window of at most {E2E_WINDOW:,} messages, so what is "
            "sealed goes out at once"
        )
    if opts.tls:
        report.note(
            f"--tls: each pair count also ran over {secure}:// right after its run over {_transport_of(target)}:// "
            "(the same broker, a certificate from a CA made for the run); pairs_N_tls_rate_ratio is its "
            "throughput over the plain run's, pairs_N_tls_extra_broker_us_per_msg what TLS costs the broker in CPU "
            "per delivered message (decrypting the SEND, encrypting the DELIVER, and the same for RECEIPT and ACK), "
            "pairs_N_tls_extra_bench_us_per_msg what it costs the clients"
        )
    return report


def _transport_of(target: BrokerTarget) -> str:
    """The scheme of the bench's transport (of the senders' URL)."""
    return target.url.split("://", 1)[0]


def _tls_scheme(target: BrokerTarget) -> str:
    """``--tls``'s scheme: tls:// beside tcp://, wss:// beside ws://. Raises BenchError for a transport that is
    TLS already."""
    plain = _transport_of(target)
    secure = {plain: scheme for scheme, plain in TLS_TRANSPORTS.items()}.get(plain)
    if secure is None:
        raise BenchError("--tls runs each pair count over TLS beside the plain transport: use --transport tcp or ws")
    target.urls_for(secure)  # raises if the broker does not serve it
    return secure


def _notify_figures(
    report: Report,
    target: BrokerTarget,
    pairs: int,
    result: LoadResult,
    before: dict[str, int],
    delivered: int,
    rate: float,
) -> None:
    """The figures of a run with ``notify``: statuses per delivered message, STATUS_ACKs the sending node
    confirmed, and the comparison with the same pair count's run without (which ran just before)."""
    k = f"pairs_{pairs}_notify"
    statuses = int(result.counts.get("statuses", 0))
    expect = before.get("statuses_acked_total", 0) + statuses
    status_acks, _ = trio.run(_settle_acks, target, "statuses_acked_total", expect, 5.0, target.url)
    report.add(
        **{
            f"{k}_statuses_per_msg": round(statuses / delivered, 4) if delivered else None,
            f"{k}_status_acks_confirmed": status_acks - before.get("statuses_acked_total", 0),
        }
    )
    plain = report.figures.get(f"pairs_{pairs}_delivered_msg_s")
    if plain:
        report.add(**{f"{k}_rate_ratio": round(rate / plain, 3)})
    _extra_costs(report, pairs, k, ("broker_us_per_msg", "store_round_trips_per_msg"))


def _compare_with_plaintext(report: Report, pairs: int, k: str, rate: float) -> None:
    """The figures of an end-to-end or TLS run against the same pair count's plain run (which ran just before)."""
    plain = report.figures.get(f"pairs_{pairs}_delivered_msg_s")
    if plain:
        report.add(**{f"{k}_rate_ratio": round(rate / plain, 3)})
    _extra_costs(report, pairs, k, ("broker_us_per_msg", "bench_us_per_msg"))


def _extra_costs(report: Report, pairs: int, k: str, whats: Sequence[str]) -> None:
    """``{k}_extra_{what}``: what run ``k`` costs per delivered message beyond the plaintext run of ``pairs``."""
    for what in whats:
        a, b = report.figures.get(f"pairs_{pairs}_{what}"), report.figures.get(f"{k}_{what}")
        if a is not None and b is not None:
            report.add(**{f"{k}_extra_{what}": round(b - a, 4)})


# ---------------------------------------------------------------- offline


def offline(opts: argparse.Namespace, target: BrokerTarget, progress: ProgressFactory) -> Report:
    import psutil

    from client import OutgoingMessage, Status, open_client

    p = _prefix()
    rx, tx = f"{p}-rx", f"{p}-tx"
    k = opts.messages
    config = {"messages": k, "batch": opts.batch}
    report = Report("offline", config)
    me = psutil.Process()
    out: dict[str, Any] = {}
    bar_q = progress(f"queue {k:,}", k)
    body_pad = bytes(max(0, opts.body_bytes - 16))

    async def run() -> None:
        before = await target.stats()
        base_messages = before.get("messages_total", 0)
        trips0 = await target.round_trips()
        async with open_client(
            target.url, target.token(tx), reconnect=False, agent="relay-bench", e2e=False, ca_file=target.ca_file
        ) as sender:
            await trio.sleep(0.2)
            rss0, redis_rss0 = target.rss(), target.redis_rss()
            accepted = refused = 0
            t0 = time.perf_counter()
            sem = trio.Semaphore(8)

            async def one(n: int) -> None:
                nonlocal accepted, refused
                async with sem:
                    stamp = time.time_ns().to_bytes(8, "little") * 2
                    receipts = await sender.send_batch(
                        [OutgoingMessage(to=rx, body=stamp + body_pad) for _ in range(n)]
                    )
                for r in receipts:
                    if r.code is None and r.results[rx].status is Status.QUEUED:
                        accepted += 1
                    else:
                        refused += 1
                bar_q(accepted + refused, info=f"{accepted:,} queued")

            async with trio.open_nursery() as nursery:
                left = k
                while left > 0:
                    n = min(opts.batch, left)
                    left -= n
                    nursery.start_soon(one, n)
                    await trio.sleep(0)
            queue_s = time.perf_counter() - t0
        await trio.sleep(0.5)
        rss1, redis_rss1 = target.rss(), target.redis_rss()
        bar_d = progress(f"drain {accepted:,}", accepted)
        cpu0, cpu_me0, host0 = target.cpu_times(), sum(me.cpu_times()[:2]), host_busy_s()
        got = 0
        redelivered = 0
        t0 = time.perf_counter()
        async with open_client(
            target.receive_url,
            target.token(rx),
            reconnect=False,
            agent="relay-bench",
            e2e=False,
            ca_file=target.ca_file,
        ) as receiver:
            t_welcome = time.perf_counter()
            async for batch in receiver.delivery_batches():
                receiver.ack([d.id for d in batch])
                got += len(batch)
                redelivered += sum(1 for d in batch if d.attempt > 1)
                if got & 0x3FFF < len(batch):
                    bar_d(got)
                if got >= accepted:
                    break
            t_last = time.perf_counter()
            after = await _settle_acks_messages(target, base_messages)
            t_acked = time.perf_counter()
        cpu1, cpu_me1, host1 = target.cpu_times(), sum(me.cpu_times()[:2]), host_busy_s()
        bar_d(got, info="all ACKed" if after <= base_messages else f"{after - base_messages:,} still held")
        await trio.sleep(0.3)
        out.update(
            accepted=accepted,
            refused=refused,
            queue_s=queue_s,
            rss0=rss0,
            rss1=rss1,
            redis_rss0=redis_rss0,
            redis_rss1=redis_rss1,
            rss2=target.rss(),
            got=got,
            redelivered=redelivered,
            connect_s=t_welcome - t0,
            last_s=t_last - t0,
            acked_s=t_acked - t0,
            held_after=after - base_messages,
            cpu=cpu_delta(cpu0, cpu1),
            me_cpu=cpu_me1 - cpu_me0,
            host_cpu=host1 - host0,
            round_trips=_round_trips_per_message(trips0, await target.round_trips(), got),
        )

    trio.run(run)
    per_msg = None
    if out["rss0"] is not None and out["rss1"] is not None and out["accepted"]:
        per_msg = round((out["rss1"] - out["rss0"]) / out["accepted"], 1)
    redis_per_msg = None
    if out["redis_rss0"] is not None and out["redis_rss1"] is not None and out["accepted"]:
        redis_per_msg = round((out["redis_rss1"] - out["redis_rss0"]) / out["accepted"], 1)
    drain = out["acked_s"]
    report.add(
        queued_messages=out["accepted"],
        queue_s=round(out["queue_s"], 4),
        queue_msg_s=round(out["accepted"] / out["queue_s"], 1) if out["queue_s"] else None,
        broker_rss_before_bytes=out["rss0"],
        broker_rss_queued_bytes=out["rss1"],
        broker_rss_after_drain_bytes=out["rss2"],
        broker_bytes_per_queued_msg=per_msg,
        redis_bytes_per_queued_msg=redis_per_msg,
        drain_connect_s=round(out["connect_s"], 4),
        drain_last_delivery_s=round(out["last_s"], 4),
        drain_s=round(drain, 4),
        drain_msg_s=round(out["got"] / drain, 1) if drain else None,
        **_cpu_figures("drain_", out["cpu"], out["me_cpu"], out["host_cpu"], drain, out["got"]),
        store_round_trips_per_msg=out["round_trips"],
    )
    report.data["counts"] = {
        "messages_sent": k,
        "accepted": out["accepted"],
        "refused": out["refused"],
        "delivered": out["got"],
        "redelivered": out["redelivered"],
        "held_after_drain": out["held_after"],
    }
    if out["round_trips"]:
        report.note("the 1 s drain target is for the in-memory store; over a networked store it is not judged")
    elif k == 100_000:
        report.target("drain_s", "<", 1.0, "offline drain of 100,000 queued messages under 1 s")
    else:
        report.note(f"the drain target is for 100,000 messages; this run queued {k:,}")
    report.target("broker_bytes_per_queued_msg", "<", 600, "broker memory per queued message under 600 bytes")
    report.note(
        "drain_s runs from opening the receiver's connection until the broker's stats show every message ACKed "
        "(messages_total back to its level before the run); broker_bytes_per_queued_msg is the broker's RSS growth "
        "while the messages were queued, divided by their number"
    )
    report.note(_limit_note("drain", report.figures, "drain_", 1))
    if out["refused"]:
        report.note(f"{out['refused']:,} messages were refused (mailbox limits? see --broker-arg)")
    return report


async def _settle_acks_messages(target: BrokerTarget, base: int, timeout_s: float = 10.0) -> int:
    value = base
    with trio.move_on_after(timeout_s):
        while True:
            value = (await target.stats(target.receive_url)).get("messages_total", 0)
            if value <= base:
                break
            await trio.sleep(0.001)
    return value


# ---------------------------------------------------------------- fanout


def fanout(opts: argparse.Namespace, target: BrokerTarget, progress: ProgressFactory) -> Report:
    p = _prefix()
    recipients = tuple(f"{p}-rx{i}" for i in range(opts.recipients))
    workers = max(1, opts.workers)
    total_s = opts.warmup + opts.duration
    specs = [_spec(target, w, body_bytes=opts.body_bytes, **_at_rate(opts)) for w in range(workers)]
    specs[0].senders.append((f"{p}-tx", recipients))
    for i, r in enumerate(recipients):
        specs[(i + 1) % workers].receivers.append(r)
    config = {
        "recipients": opts.recipients,
        "rate_sends_s": opts.rate,
        "duration_s": opts.duration,
        "warmup_s": opts.warmup,
        "workers": workers,
        "timer": opts.timer,
    }
    report = Report("fanout", config)
    trips0 = trio.run(target.round_trips)
    result = run_load(target, specs, duration_s=total_s, progress=progress(f"fanout to {opts.recipients}", total_s))
    trips = _round_trips_per_message(trips0, trio.run(target.round_trips), int(result.counts.get("delivered", 0)))
    cpu, bench_cpu, host_cpu = result.cpu_between(opts.warmup, total_s)
    span = result.sample_span(opts.warmup, total_s)
    delivered_window = _delivered_between(result, specs[0].bin_s, opts.warmup, total_s)
    report.add(
        sends_s=opts.rate,
        offered_deliveries_s=opts.rate * opts.recipients,
        delivered_msg_s=round(delivered_window / opts.duration, 1),
        **hist_figures(result.latency, "latency"),
        **hist_figures(result.send_lag, "send_lag"),
        **_cpu_figures("", cpu, bench_cpu, host_cpu, span, round(delivered_window * span / opts.duration)),
        store_round_trips_per_msg=trips,
    )
    report.data["counts"] = _counts(result)
    report.data["curves"] = {"per-recipient latency": percentile_curve(result.latency)}
    report.data["timelines"] = {"deliveries": _timeline(result, specs[0].bin_s)}
    report.note(
        "latency_* is per recipient delivery, from the SEND's intended time; latency_max_us bounds the "
        "time for a SEND to reach all recipients"
    )
    report.note(_limit_note("fanout", report.figures, "", workers))
    _check_complete(report, result)
    return report


# ---------------------------------------------------------------- connections


def connections(opts: argparse.Namespace, target: BrokerTarget, progress: ProgressFactory) -> Report:
    from .target import raise_nofile_limit

    soft, _hard = raise_nofile_limit()
    p = _prefix()
    c = opts.connections
    workers = max(1, opts.workers)
    specs = [_spec(target, w, connect_concurrency=opts.concurrency, duration_s=0.0) for w in range(workers)]
    for i in range(c):
        specs[i % workers].idle.append(f"{p}-c{i}")
    config = {
        "connections": c,
        "workers": workers,
        "concurrency_per_worker": opts.concurrency,
        "nofile_soft_limit": soft,
    }
    report = Report("connections", config)
    if c // workers + 64 > soft:
        report.note(f"RLIMIT_NOFILE is {soft}: a worker may run out of file descriptors")
    time.sleep(0.3)
    rss0 = target.rss()

    def measure() -> dict[str, Any]:
        time.sleep(1.0)  # let the broker finish the last handshakes' allocations
        stats = trio.run(target.stats)
        return {
            "rss": target.rss(),
            "broker_connections": stats.get("connections"),
            "online": stats.get("online_users"),
        }

    result = run_load(
        target,
        specs,
        duration_s=0.0,
        drain_timeout_s=opts.timeout,
        progress=progress(f"connect {c:,}", c),
        expected_connections=c,
        while_held=measure,
    )
    opened = int(result.counts.get("connected", 0))
    firsts = [w["connect_first_ns"] for w in result.workers if w["connect_first_ns"]]
    lasts = [w["connect_last_ns"] for w in result.workers if w["connect_last_ns"]]
    span_s = (max(lasts) - min(firsts)) / 1e9 if firsts and lasts else None
    rss1 = result.held.get("rss")
    per_conn = round((rss1 - rss0) / opened, 1) if rss0 is not None and rss1 is not None and opened else None
    cpu, bench_cpu, host_cpu = result.cpu_between(0.0, result.samples[-1].t_s)
    nodes_cpu = [v for name, v in cpu.items() if name.startswith("node")]
    broker_cpu = None if None in nodes_cpu else sum(v for v in nodes_cpu if v is not None)
    report.add(
        connections_opened=opened,
        connections_failed=int(result.counts.get("connect_failed", 0)),
        broker_connections=result.held.get("broker_connections"),
        connect_s=round(span_s, 4) if span_s else None,
        handshakes_s=round(opened / span_s, 1) if span_s else None,
        **hist_figures(result.connect, "handshake"),
        broker_rss_before_bytes=rss0,
        broker_rss_held_bytes=rss1,
        broker_rss_per_connection_bytes=per_conn,
        broker_cpu_s=None if broker_cpu is None else round(broker_cpu, 3),
        bench_cpu_s=round(bench_cpu, 3),
    )
    report.data["counts"] = {k: v for k, v in result.counts.items()}
    if c >= 10_000:
        report.target(
            "broker_rss_per_connection_bytes", "<", 30 * 1024, "idle connections under 30 KiB of broker RSS each"
        )
    else:
        report.target(
            "broker_rss_per_connection_bytes",
            "<",
            30 * 1024,
            "(target is for 10,000) under 30 KiB of broker RSS per connection",
        )
    report.data["curves"] = {"handshake (connect + HELLO/WELCOME)": percentile_curve(result.connect)}
    report.note(
        "handshakes_s is connections opened per second from the first attempt to the last WELCOME, "
        f"with {opts.concurrency} concurrent attempts per worker process"
    )
    if broker_cpu is not None and span_s:
        window = _cpu_figures("", cpu, bench_cpu, host_cpu, span_s, opened)
        report.note(_limit_note("handshakes", window, "", workers))
    for key in result.counts:
        if key.startswith("error:"):
            report.note(f"{result.counts[key]}x {key}")
    return report


SCENARIOS: dict[str, Callable[[argparse.Namespace, BrokerTarget, ProgressFactory], Report]] = {
    "latency": latency,
    "throughput": throughput,
    "offline": offline,
    "fanout": fanout,
    "connections": connections,
}
