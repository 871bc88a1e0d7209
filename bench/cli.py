"""``relay-bench``: run a named scenario against a broker and report the figures.

    relay-bench latency     [--rate 1000] [--duration 10] [--warmup 1] [--timer spin|sleep]
    relay-bench throughput  [--pairs 1,100] [--duration 5] [--workers 2] [--batch 256] [--depth 4] [--window 50000]
                            [--notify] [--e2e] [--tls]
    relay-bench offline     [--messages 100000]
    relay-bench fanout      [--recipients 100] [--rate 100] [--duration 5]
    relay-bench connections [--connections 10000] [--concurrency 64]
    relay-bench compare A.json B.json

Common options: ``--body-bytes 256``, ``--transport tcp|ws|tls|wss``, ``--json FILE``, ``--plot FILE.png``,
``--no-progress``; ``--url URL --data-dir DIR [--broker-pid PID] [--ca-file PEM]`` to use a running broker
instead of starting one (a started one serves tls:// and wss:// with a certificate from a CA made for the run);
``--broker-arg=--max-inflight=512`` (repeatable) to pass settings to a started broker;
``--store redis://HOST:PORT/DB`` (or ``--store redis``: a private Redis the bench starts and stops) for
the started broker's store, and ``--nodes 2`` for two broker nodes over it (senders on the first,
recipients on the second).

``main(argv) -> int`` is what the installed command runs; tests call it directly.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from .reporting import compare, load_report, plot_report, print_report, write_json
from .scenarios import SCENARIOS
from .target import BenchError, BrokerTarget, raise_nofile_limit, relay_version

__all__ = ["main"]


def _positive_float(text: str) -> float:
    v = float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return v


def _positive_int(text: str) -> int:
    v = int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return v


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay-bench", description="Benchmark a Relay broker.")
    sub = parser.add_subparsers(dest="scenario", metavar="SCENARIO")

    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("broker and output")
    g.add_argument(
        "--transport",
        choices=("tcp", "ws", "tls", "wss"),
        default="tcp",
        help="how clients connect to a started broker (default tcp; tls and wss over a certificate from a CA made for "
        "the run; a --url's scheme decides for itself)",
    )
    g.add_argument("--url", help="use this running broker instead of starting one (needs --data-dir)")
    g.add_argument("--data-dir", type=Path, help="the running broker's data dir: its secret signs the bench's tokens")
    g.add_argument("--broker-pid", type=int, help="the running broker's PID, for CPU/RSS (default: found by port)")
    g.add_argument(
        "--ca-file",
        type=Path,
        metavar="PEM",
        help="for a --url over tls:// or wss://: the CA to trust (default: the system's)",
    )
    g.add_argument(
        "--broker-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for a started broker, repeatable",
    )
    g.add_argument(
        "--store",
        metavar="URL",
        help="the started broker's store (its --store), or 'redis': start a private redis-server and use it "
        "(default: the in-memory store)",
    )
    g.add_argument(
        "--nodes",
        type=_positive_int,
        default=1,
        help="broker nodes to start over --store (default 1); with 2, senders use node 1 and recipients node 2",
    )
    g.add_argument("--body-bytes", type=_positive_int, default=256, help="message body size (default 256, min 16)")
    g.add_argument("--json", type=Path, metavar="FILE", help="write every figure and the configuration as JSON")
    g.add_argument("--plot", type=Path, metavar="FILE.png", help="draw latency percentiles and throughput over time")
    g.add_argument("--no-progress", action="store_true", help="no live progress bar")

    p = sub.add_parser("latency", parents=[common], help="online delivery latency at a fixed rate")
    p.add_argument("--rate", type=_positive_float, default=1000.0, help="messages per second (default 1000)")
    p.add_argument("--duration", type=_positive_float, default=10.0, help="measured seconds (default 10)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds sent before measuring (default 1)")
    p.add_argument(
        "--timer",
        choices=("spin", "sleep"),
        default="spin",
        help="spin: yield in a loop for the last 2 ms before each send (precise, uses a core); sleep: trio timers",
    )

    p = sub.add_parser("throughput", parents=[common], help="maximum delivered-and-ACKed messages per second")
    p.add_argument("--pairs", default="1,100", help="comma-separated sender->recipient pair counts (default 1,100)")
    p.add_argument("--duration", type=_positive_float, default=5.0, help="sending seconds per pair count (default 5)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds not counted at the start (default 1)")
    p.add_argument("--workers", type=_positive_int, default=2, help="load generator processes (default 2)")
    p.add_argument("--batch", type=_positive_int, default=256, help="messages per send_batch call (default 256)")
    p.add_argument("--depth", type=_positive_int, default=4, help="concurrent send_batch calls per sender (default 4)")
    p.add_argument("--window", type=_positive_int, default=50_000, help="max sent-not-delivered (default 50000)")
    p.add_argument(
        "--notify",
        action="store_true",
        help="run each pair count twice, back to back: without, then with delivery statuses (SEND notify, "
        "statuses STATUS_ACKed by the senders), and report the ratio",
    )
    p.add_argument(
        "--e2e",
        action="store_true",
        help="also run each pair count with end-to-end encryption, right after the plaintext run (every message "
        "sealed by its sender and opened and verified by its recipient; batches of at most 16, a window of at most "
        "4,096), and report the ratio and the cost per message",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="also run each pair count over TLS (tls:// beside --transport tcp, wss:// beside ws), right after the "
        "plain run, on the same broker, and report the ratio and what TLS costs per message",
    )

    p = sub.add_parser("offline", parents=[common], help="queue K messages for an offline mailbox, then time the drain")
    p.add_argument("--messages", type=_positive_int, default=100_000, help="messages to queue (default 100000)")
    p.add_argument("--batch", type=_positive_int, default=1000, help="messages per send_batch call (default 1000)")

    p = sub.add_parser("fanout", parents=[common], help="one SEND to many online recipients, at a fixed rate")
    p.add_argument("--recipients", type=_positive_int, default=100, help="recipients per SEND (default 100)")
    p.add_argument("--rate", type=_positive_float, default=100.0, help="SENDs per second (default 100)")
    p.add_argument("--duration", type=_positive_float, default=5.0, help="measured seconds (default 5)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds sent before measuring (default 1)")
    p.add_argument("--workers", type=_positive_int, default=2, help="processes holding the recipients (default 2)")
    p.add_argument("--timer", choices=("spin", "sleep"), default="spin", help="as for latency")

    p = sub.add_parser("connections", parents=[common], help="hold C idle authenticated connections")
    p.add_argument("--connections", type=_positive_int, default=10_000, help="connections to open (default 10000)")
    p.add_argument("--workers", type=_positive_int, default=2, help="processes holding them (default 2)")
    p.add_argument("--concurrency", type=_positive_int, default=64, help="handshakes in flight per worker (default 64)")
    p.add_argument("--timeout", type=_positive_float, default=120.0, help="seconds to open them all (default 120)")

    p = sub.add_parser("compare", help="the ratio B/A of every figure of two --json reports")
    p.add_argument("a", type=Path, help="the 'before' report")
    p.add_argument("b", type=Path, help="the 'after' report")
    return parser


def _check_transport(transport: str) -> None:
    """Refuse ``--transport ws`` unless the Python client can open ws:// URLs (never fake it)."""
    if transport == "tcp":
        return
    import client  # noqa: F401  (a ws transport registers itself on import)
    from client.transport import OPENERS

    if transport not in OPENERS:
        raise BenchError(
            f"--transport {transport}: the Python client in this build cannot open {transport}:// URLs "
            f"(client.transport.OPENERS has only {', '.join(sorted(OPENERS))}); use --transport tcp"
        )


def _config(args: argparse.Namespace, argv: Sequence[str], target: BrokerTarget) -> dict[str, Any]:
    first = target.nodes[0]
    return {
        "command_line": shlex.join(["relay-bench", *argv]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "broker_version": relay_version(),
        "broker_mode": target.mode,
        "broker_command": shlex.join(first.command) if first.command else None,
        "broker_pid": first.process.pid if first.process is not None else None,
        "nodes": len(target.nodes),
        "node_urls": [n.url for n in target.nodes],
        "node_pids": [n.process.pid if n.process is not None else None for n in target.nodes],
        "store": target.store or ("memory" if target.mode == "subprocess" else None),
        "redis_command": shlex.join(target.redis.command) if target.redis is not None else None,
        "redis_pid": target.redis_process.pid if target.redis_process is not None else None,
        "url": target.url,
        "transport": target.url.split("://", 1)[0],  # with --url, its scheme decides
        "body_bytes": args.body_bytes,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "nofile_limit": raise_nofile_limit()[0],
    }


@contextlib.contextmanager
def _progress(console: Console, enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield lambda description, total: lambda completed, total=None, info="": None
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
    )

    def factory(description: str, total: float | None) -> Any:
        task = bar.add_task(description, total=total, info="")

        def update(completed: float, total: float | None = None, info: str = "") -> None:
            if total is not None:
                bar.update(task, completed=completed, total=total, info=info)
            else:
                bar.update(task, completed=completed, info=info)

        return update

    with bar:
        yield factory


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    args = parser.parse_args(argv)
    console = Console(soft_wrap=True)
    err = Console(stderr=True, soft_wrap=True)
    if args.scenario is None:
        parser.print_help()
        return 2
    if args.scenario == "compare":
        try:
            compare(load_report(args.a), load_report(args.b), console)
        except (OSError, ValueError) as exc:
            err.print(f"relay-bench compare: {exc}")
            return 2
        return 0
    if args.body_bytes < 16:
        parser.error("--body-bytes must be at least 16 (the bench puts two timestamps in each body)")
    raise_nofile_limit()  # inherited by a started broker and by the worker processes
    try:
        _check_transport(args.url.split("://", 1)[0] if args.url else args.transport)
        if args.url:
            if args.store is not None or args.nodes != 1:
                parser.error("--store and --nodes are for a started broker, not --url")
            if getattr(args, "tls", False):
                parser.error("--tls needs a started broker (it serves both transports), not --url")
            target = BrokerTarget.external(args.url, args.data_dir, args.broker_pid, args.ca_file)
        else:
            if args.data_dir is not None or args.ca_file is not None:
                parser.error(
                    "--data-dir and --ca-file go with --url (a started broker gets a temporary data dir and CA)"
                )
            target = BrokerTarget.start(
                args.transport,
                args.broker_arg,
                store=args.store,
                nodes=args.nodes,
                tls=getattr(args, "tls", False),
            )
        with target:
            with _progress(console, not args.no_progress) as progress:
                report = SCENARIOS[args.scenario](args, target, progress)
            report.data["config"] = {**_config(args, argv, target), **report.data["config"]}
            transport = report.data["config"]["transport"]
            if transport != "tcp" and report.data["targets"]:
                report.data["targets"] = []
                report.note(f"the targets are set for TCP; this run used {transport}, so none is judged")
            if target.mode == "external" and target.nodes[0].process is None:
                report.note(
                    "the broker's process is not watched (no --broker-pid, not found by port): no CPU/RSS figures"
                )
            data = report.data
    except BenchError as exc:
        err.print(f"relay-bench {args.scenario}: {exc}")
        return 1
    except KeyboardInterrupt:
        err.print("relay-bench: interrupted")
        return 130
    print_report(data, console)
    if args.json:
        write_json(data, args.json)
        console.print(f"wrote {args.json}")
    if args.plot:
        plot_report(data, args.plot)
        console.print(f"wrote {args.plot}")
    return 0
