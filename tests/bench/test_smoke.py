"""Smoke tests: every scenario runs at a tiny size against a broker subprocess and writes a complete,
self-consistent JSON report; ``compare`` reads two of them. Nothing here asserts on timing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.cli import main

CONFIG_KEYS = ("command_line", "broker_version", "broker_mode", "transport", "body_bytes", "cpu_count", "url")


def run(tmp_path: Path, name: str, *args: str, transport: str = "tcp") -> dict[str, Any]:
    out = tmp_path / f"{name}.json"
    assert main([name, "--no-progress", "--json", str(out), "--transport", transport, *args]) == 0
    report = json.loads(out.read_text())
    assert report["scenario"] == name
    for key in CONFIG_KEYS:
        assert report["config"][key] is not None, key
    assert report["config"]["transport"] == transport
    assert report["config"]["url"].startswith(f"{transport}://")
    for t in report["targets"]:
        assert t["figure"] in report["figures"]
        assert t["met"] in (True, False, None)
    return report


def assert_ordered(figures: dict[str, Any], prefix: str) -> None:
    keys = ("min", "p50", "p90", "p99", "p99_9", "max")
    values = [figures[f"{prefix}_{k}_us"] for k in keys]
    assert all(v is not None for v in values), values
    assert values == sorted(values), values


def assert_curve_ordered(points: list[list[float]]) -> None:
    assert points
    assert [p for p, _ in points] == sorted(p for p, _ in points)
    assert [v for _, v in points] == sorted(v for _, v in points)


@pytest.fixture(scope="module")
def latency_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("latency")
    report = run(tmp, "latency", "--rate", "200", "--duration", "0.5", "--warmup", "0.2", "--plot", str(tmp / "l.png"))
    assert (tmp / "l.png").stat().st_size > 0
    return report


def test_latency_report_is_complete_and_consistent(latency_report: dict[str, Any]) -> None:
    f, c = latency_report["figures"], latency_report["counts"]
    assert c["messages_sent"] == c["accepted"] == c["delivered"] == round(200 * 0.7)
    assert c["refused"] == 0
    assert 0 < f["measured_messages"] <= c["delivered"]
    for prefix in ("latency", "service", "send_lag"):
        assert_ordered(f, prefix)
    assert 0 <= f["share_under_10ms_pct"] <= f["share_under_50ms_pct"] <= 100
    assert [t["figure"] for t in latency_report["targets"]] == ["latency_p99_us"]
    assert latency_report["config"]["rate_msg_s"] == 200
    for points in latency_report["curves"].values():
        assert_curve_ordered(points)
    assert sum(r for _, r in latency_report["timelines"]["delivered"]) * 0.1 == pytest.approx(c["delivered"])


def test_throughput_counts_add_up(tmp_path: Path) -> None:
    report = run(tmp_path, "throughput", "--pairs", "1,3", "--duration", "1", "--warmup", "0.2", "--batch", "32")
    f, c = report["figures"], report["counts"]
    for pairs in (1, 3):
        k = f"pairs_{pairs}"
        assert c[f"{k}_accepted"] == c[f"{k}_delivered"] > 0
        assert c[f"{k}_messages_sent"] == c[f"{k}_accepted"] + c[f"{k}_refused"] + c[f"{k}_duplicate"]
        assert f[f"{k}_acked_confirmed"] == c[f"{k}_delivered"]
        assert f[f"{k}_delivered_msg_s"] > 0
        assert f[f"{k}_broker_cpu_pct"] is not None
    assert {t["figure"] for t in report["targets"]} == {"pairs_1_delivered_msg_s"}


def test_throughput_with_notify_runs_without_then_with_statuses_and_every_status_comes_back(tmp_path: Path) -> None:
    report = run(
        tmp_path, "throughput", "--pairs", "2", "--duration", "1", "--warmup", "0.2", "--batch", "32", "--notify"
    )
    f, c = report["figures"], report["counts"]
    assert "pairs_2_statuses" not in c, "the first run asks for no statuses"
    delivered = c["pairs_2_notify_delivered"]
    assert c["pairs_2_notify_accepted"] == delivered > 0
    assert c["pairs_2_notify_statuses"] == c["pairs_2_notify_status_delivered"] == delivered
    assert f["pairs_2_notify_statuses_per_msg"] == 1.0
    assert f["pairs_2_notify_status_acks_confirmed"] == delivered
    assert f["pairs_2_notify_acked_confirmed"] == delivered
    # the ratio of the (rounded) windowed rates; not > 0: in a 1 s run the first delivery may come late
    assert f["pairs_2_notify_rate_ratio"] == pytest.approx(
        f["pairs_2_notify_delivered_msg_s"] / f["pairs_2_delivered_msg_s"], abs=0.002
    )
    assert f["pairs_2_notify_extra_broker_us_per_msg"] is not None
    assert report["config"]["notify"] is True
    assert {t["figure"] for t in report["targets"]} == set(), "the targets are for 1 and 100 pairs without statuses"


def test_throughput_with_e2e_runs_plaintext_then_end_to_end_and_every_message_is_opened_and_verified(
    tmp_path: Path,
) -> None:
    # No warm-up: on a loaded machine the first sealed batch may take longer than a warm-up, and the ratio needs a
    # delivery inside the measured window.
    report = run(tmp_path, "throughput", "--pairs", "2", "--duration", "1", "--warmup", "0", "--batch", "32", "--e2e")
    f, c = report["figures"], report["counts"]
    assert "pairs_2_opened_e2e" not in c, "the first run is plaintext"
    delivered = c["pairs_2_e2e_delivered"]
    assert c["pairs_2_e2e_accepted"] == delivered > 0
    assert c["pairs_2_e2e_opened_e2e"] == delivered, "every message sealed, opened and verified"
    assert f["pairs_2_e2e_acked_confirmed"] == delivered
    # the ratio of the (rounded) windowed rates; not > 0: in a 1 s run the first delivery may come late
    assert f["pairs_2_e2e_rate_ratio"] == pytest.approx(
        f["pairs_2_e2e_delivered_msg_s"] / f["pairs_2_delivered_msg_s"], abs=0.002
    )
    assert f["pairs_2_e2e_extra_bench_us_per_msg"] is not None
    assert f["pairs_2_e2e_extra_broker_us_per_msg"] is not None
    assert report["config"]["e2e"] is True
    assert {t["figure"] for t in report["targets"]} == set(), "the targets are for 1 and 100 pairs in plaintext"


def test_a_small_window_pauses_and_resumes_the_senders(tmp_path: Path) -> None:
    """With --window far below what the senders keep in flight, the gate must close and open again and again."""
    report = run(
        tmp_path, "throughput", "--pairs", "1", "--duration", "1", "--warmup", "0.2", "--batch", "16", "--window", "40"
    )
    c = report["counts"]
    assert c["pairs_1_accepted"] == c["pairs_1_delivered"] == c["pairs_1_messages_sent"]
    # A gate that never reopened would stop near 40 + 4 x 16 messages; a liveness bound, not a speed figure.
    assert c["pairs_1_delivered"] > 1000


def test_offline_drain_delivers_every_queued_message(tmp_path: Path) -> None:
    report = run(tmp_path, "offline", "--messages", "500", "--batch", "100")
    f, c = report["figures"], report["counts"]
    assert c["accepted"] == c["delivered"] == f["queued_messages"] == 500
    assert c["held_after_drain"] == 0
    assert f["drain_connect_s"] <= f["drain_last_delivery_s"] <= f["drain_s"]
    assert f["broker_bytes_per_queued_msg"] is not None


def test_fanout_delivers_to_every_recipient(tmp_path: Path) -> None:
    report = run(tmp_path, "fanout", "--recipients", "5", "--rate", "50", "--duration", "0.4", "--warmup", "0.2")
    c = report["counts"]
    assert c["messages_sent"] == round(50 * 0.6)
    assert c["accepted"] == c["delivered"] == 5 * c["messages_sent"]
    assert_ordered(report["figures"], "latency")


def test_connections_are_all_held(tmp_path: Path) -> None:
    report = run(tmp_path, "connections", "--connections", "40", "--concurrency", "8")
    f = report["figures"]
    assert f["connections_opened"] == 40
    assert f["connections_failed"] == 0
    assert f["broker_connections"] == 41  # plus the bench's operator connection asking for stats
    assert f["broker_rss_per_connection_bytes"] is not None
    assert_ordered(f, "handshake")


def test_compare_prints_the_ratio_of_every_figure(
    latency_report: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(latency_report))
    doubled = {
        **latency_report,
        "figures": {k: (v * 2 if isinstance(v, int | float) else v) for k, v in latency_report["figures"].items()},
    }
    b.write_text(json.dumps(doubled))
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "latency_p99_us" in out
    assert "2.000" in out


def test_ws_transport_runs_latency_and_throughput(tmp_path: Path) -> None:
    report = run(tmp_path, "latency", "--rate", "100", "--duration", "0.4", "--warmup", "0.2", transport="ws")
    c = report["counts"]
    assert c["messages_sent"] == c["accepted"] == c["delivered"] == round(100 * 0.6)
    assert_ordered(report["figures"], "latency")
    assert report["config"]["url"].endswith("/relay")
    assert report["targets"] == [] and any("set for TCP" in n for n in report["notes"])  # TCP targets are not judged
    report = run(tmp_path, "throughput", "--pairs", "2", "--duration", "0.5", "--warmup", "0.2", transport="ws")
    c = report["counts"]
    assert c["pairs_2_accepted"] == c["pairs_2_delivered"] > 0
    assert report["figures"]["pairs_2_acked_confirmed"] == c["pairs_2_delivered"]


def test_a_transport_the_client_cannot_open_is_refused_clearly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from client.transport import OPENERS

    monkeypatch.delitem(OPENERS, "ws")
    assert main(["latency", "--transport", "ws", "--no-progress"]) == 1
    assert "cannot open ws://" in capsys.readouterr().err


def test_tls_and_wss_transports_run_latency_and_throughput(tmp_path: Path) -> None:
    report = run(tmp_path, "latency", "--rate", "100", "--duration", "0.4", "--warmup", "0.2", transport="tls")
    c = report["counts"]
    assert c["messages_sent"] == c["accepted"] == c["delivered"] == round(100 * 0.6)
    assert report["targets"] == [] and any("set for TCP" in n for n in report["notes"])
    report = run(tmp_path, "throughput", "--pairs", "2", "--duration", "0.5", "--warmup", "0.2", transport="wss")
    c = report["counts"]
    assert c["pairs_2_accepted"] == c["pairs_2_delivered"] > 0
    assert report["figures"]["pairs_2_acked_confirmed"] == c["pairs_2_delivered"]
    assert report["config"]["url"].endswith("/relay")


@pytest.mark.parametrize(("transport", "secure"), [("tcp", "tls"), ("ws", "wss")])
def test_throughput_with_tls_runs_plain_then_over_tls_and_says_what_tls_costs(
    tmp_path: Path, transport: str, secure: str
) -> None:
    args = ("--pairs", "2", "--duration", "1", "--warmup", "0.2", "--batch", "32", "--tls")
    report = run(tmp_path, "throughput", *args, transport=transport)
    f, c = report["figures"], report["counts"]
    assert c["pairs_2_accepted"] == c["pairs_2_delivered"] > 0
    delivered = c["pairs_2_tls_delivered"]
    assert c["pairs_2_tls_accepted"] == delivered > 0
    assert f["pairs_2_tls_acked_confirmed"] == delivered
    # the ratio of the (rounded) windowed rates; not > 0: in a 1 s run the first delivery may come late
    assert f["pairs_2_tls_rate_ratio"] == pytest.approx(
        f["pairs_2_tls_delivered_msg_s"] / f["pairs_2_delivered_msg_s"], abs=0.002
    )
    assert f["pairs_2_tls_extra_broker_us_per_msg"] is not None
    assert f["pairs_2_tls_extra_bench_us_per_msg"] is not None
    assert report["config"]["tls"] is True
    assert any(f"over {secure}://" in n for n in report["notes"])


def test_tls_beside_a_tls_transport_is_refused_clearly(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["throughput", "--transport", "tls", "--tls", "--no-progress", "--pairs", "1"]) == 1
    assert "use --transport tcp or ws" in capsys.readouterr().err
