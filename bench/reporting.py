"""Reports: figures with their targets, the summary table, ``--json``, ``--plot`` and ``compare``.

A report is a plain JSON-able dict built by :class:`Report`: ``scenario``, ``config`` (the full
configuration, command line and machine), ``figures`` (every number, flat, the unit in its name:
``_us``, ``_s``, ``_msg_s``, ``_bytes``, ``_pct``), ``targets`` (each figure the issue sets a target
for, with ``met`` true/false, or null when the figure could not be measured), ``counts``,
``curves`` (latency percentile curves), ``timelines`` (deliveries per second over time) and
``notes`` (what limited the run). ``compare`` divides every figure of one report by another's.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram
from rich.console import Console
from rich.table import Table

__all__ = ["Report", "compare", "hist_figures", "load_report", "percentile_curve", "plot_report", "print_report"]

PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99_9", 99.9))


def hist_figures(h: HdrHistogram, prefix: str) -> dict[str, float | int | None]:
    """min, p50, p90, p99, p99.9, max and mean of a histogram in microseconds (None when empty)."""
    if h.get_total_count() == 0:
        return {f"{prefix}_{k}_us": None for k in ("min", *(p for p, _ in PERCENTILES), "max", "mean")}
    out: dict[str, float | int | None] = {f"{prefix}_min_us": h.get_min_value()}
    for name, pct in PERCENTILES:
        out[f"{prefix}_{name}_us"] = h.get_value_at_percentile(pct)
    out[f"{prefix}_max_us"] = h.get_max_value()
    out[f"{prefix}_mean_us"] = round(h.get_mean_value(), 1)
    return out


def percentile_curve(h: HdrHistogram) -> list[list[float]]:
    """[[percentile, value_us], ...] from 0 to 99.999 in log steps, then 100 (max)."""
    if h.get_total_count() == 0:
        return []
    points = []
    for k in range(51):
        p = 100.0 * (1.0 - 10 ** (-k / 10))
        points.append([round(p, 5), h.get_value_at_percentile(p)])
    points.append([100.0, h.get_max_value()])
    return points


def share_below(h: HdrHistogram, limit_us: int) -> float | None:
    """Percentage of recorded values at or below ``limit_us``."""
    total: int = h.get_total_count()
    if total == 0:
        return None
    below: int = sum(
        item.count_added_in_this_iter_step for item in h.get_recorded_iterator() if item.value_iterated_to <= limit_us
    )
    return round(100.0 * below / total, 4)


class Report:
    """Builds one scenario's report dict."""

    def __init__(self, scenario: str, config: dict[str, Any]) -> None:
        self.data: dict[str, Any] = {
            "scenario": scenario,
            "config": config,
            "figures": {},
            "targets": [],
            "counts": {},
            "curves": {},
            "timelines": {},
            "notes": [],
        }

    @property
    def figures(self) -> dict[str, Any]:
        return self.data["figures"]  # type: ignore[no-any-return]

    def add(self, **figures: Any) -> None:
        self.figures.update(figures)

    def target(self, figure: str, op: str, threshold: float, text: str) -> None:
        """Record the issue's target for ``figure`` (op ``<``, ``<=`` or ``>=``) and whether it was met."""
        value = self.figures.get(figure)
        met: bool | None
        if value is None or (isinstance(value, float) and math.isnan(value)):
            met = None
        else:
            met = bool(_COMPARE[op](value, threshold))
        self.data["targets"].append({"figure": figure, "op": op, "threshold": threshold, "text": text, "met": met})

    def note(self, text: str) -> None:
        self.data["notes"].append(text)


_COMPARE = {"<": operator.lt, "<=": operator.le, ">=": operator.ge}


# ---------------------------------------------------------------- output


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0 or abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:,.2f}"
        return f"{value:.4g}"
    return str(value)


_STATUS = {True: "[green]met[/green]", False: "[red]NOT met[/red]", None: "[yellow]not measured[/yellow]"}


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    """The summary: configuration line, a figure table with targets, counts and notes."""
    console = console or Console()
    cfg = report["config"]
    console.print(
        f"[bold]relay-bench {report['scenario']}[/bold]  broker {cfg.get('broker_version')} ({cfg.get('broker_mode')}),"
        f" {cfg.get('transport')}, {cfg.get('body_bytes')}-byte bodies, {cfg.get('cpu_count')} cores"
    )
    targets = {t["figure"]: t for t in report["targets"]}
    table = Table(show_header=True, header_style="bold")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_column("", justify="left")
    for name, value in report["figures"].items():
        t = targets.get(name)
        if t is None:
            table.add_row(name, _fmt(value), "", "")
            continue
        status = _STATUS[t["met"]]
        table.add_row(
            f"[bold]{name}[/bold]", f"[bold]{_fmt(value)}[/bold]", f"{t['op']} {_fmt(t['threshold'])}", status
        )
    console.print(table)
    if report["counts"]:
        console.print("counts: " + ", ".join(f"{k} {_fmt(v)}" for k, v in report["counts"].items()))
    for t in report["targets"]:
        state = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        console.print(f"target: {t['text']}: {state}")
    for note in report["notes"]:
        console.print(f"note: {note}")


def write_json(report: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")


def load_report(path: Path) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "figures" not in data:
        raise ValueError(f"{path} is not a relay-bench --json report")
    return data


def plot_report(report: dict[str, Any], path: Path) -> None:
    """A PNG: the latency percentile curves (if any) and deliveries per second over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {k: v for k, v in report["curves"].items() if v}
    timelines = {k: v for k, v in report["timelines"].items() if v}
    panels = (1 if curves else 0) + (1 if timelines else 0) or 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.5), squeeze=False)
    ax_iter = iter(axes[0])
    if curves:
        ax = next(ax_iter)
        for name, points in curves.items():
            xs = [1.0 / max(1.0 - p / 100.0, 1e-6) for p, _ in points]
            ys = [v for _, v in points]
            ax.plot(xs, ys, label=name, drawstyle="steps-post")
        ax.set_xscale("log")
        ticks = [1, 2, 10, 100, 1000, 10000, 100000]
        ax.set_xticks(ticks)
        ax.set_xticklabels(["0%", "50%", "90%", "99%", "99.9%", "99.99%", "99.999%"])
        ax.set_yscale("log")
        ax.set_xlabel("percentile")
        ax.set_ylabel("latency (µs)")
        ax.set_title("latency by percentile")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    if timelines:
        ax = next(ax_iter)
        for name, points in timelines.items():
            ax.plot([t for t, _ in points], [r for _, r in points], label=name)
        ax.set_xlabel("time since start (s)")
        ax.set_ylabel("messages/s delivered")
        ax.set_title("throughput over time")
        ax.grid(True, alpha=0.3)
        ax.legend()
    cfg = report["config"]
    fig.suptitle(f"relay-bench {report['scenario']} — {cfg.get('transport')}, {cfg.get('body_bytes')} B bodies")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _numbers(figures: dict[str, Any]) -> Iterable[tuple[str, float | None]]:
    for k, v in figures.items():
        if isinstance(v, bool):
            yield k, float(v)
        elif isinstance(v, int | float):
            yield k, float(v)
        else:
            yield k, None


def compare(a: dict[str, Any], b: dict[str, Any], console: Console | None = None) -> list[dict[str, Any]]:
    """Print and return, for every figure in either report, A, B and B/A."""
    console = console or Console()
    fa, fb = dict(_numbers(a["figures"])), dict(_numbers(b["figures"]))
    rows = []
    table = Table(show_header=True, header_style="bold", title=f"{a['scenario']} (A) vs {b['scenario']} (B)")
    for col in ("figure", "A", "B", "B/A"):
        table.add_column(col, justify="left" if col == "figure" else "right")
    for name in [*fa, *(k for k in fb if k not in fa)]:
        va, vb = fa.get(name), fb.get(name)
        ratio = vb / va if va not in (None, 0.0) and vb is not None else None
        rows.append({"figure": name, "a": va, "b": vb, "ratio": ratio})
        table.add_row(name, _fmt(va), _fmt(vb), "n/a" if ratio is None else f"{ratio:.3f}")
    console.print(table)
    for label, r in (("A", a), ("B", b)):
        cfg = r["config"]
        console.print(f"{label}: {cfg.get('command_line')}  ({cfg.get('broker_version')}, {cfg.get('started_at')})")
    return rows
