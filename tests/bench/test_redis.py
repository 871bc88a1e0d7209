"""relay-bench over Redis: ``--store redis`` starts a private redis-server and stops it at the end, and
``--nodes 2`` runs two broker nodes over it with senders on the first and recipients on the second. Tiny
runs; nothing here asserts on timing, only that every message arrives and every figure is there."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psutil
import pytest

from bench.cli import main

from ..conftest import require_service
from ..redis_servers import REDIS_SERVER


@pytest.fixture(autouse=True)
def _needs_redis() -> None:
    require_service(REDIS_SERVER is not None, "redis-server")


def run(tmp_path: Path, name: str, *args: str) -> dict[str, Any]:
    out = tmp_path / f"{name}.json"
    assert main([name, "--no-progress", "--json", str(out), "--store", "redis", *args]) == 0
    report: dict[str, Any] = json.loads(out.read_text())
    cfg = report["config"]
    assert cfg["store"].startswith("redis://127.0.0.1:")
    assert cfg["redis_command"] and cfg["redis_pid"]
    assert not psutil.pid_exists(cfg["redis_pid"]), "the bench must stop the Redis it started"
    return report


def test_throughput_over_a_bench_started_redis(tmp_path: Path) -> None:
    report = run(tmp_path, "throughput", "--pairs", "2", "--duration", "1", "--warmup", "0.2", "--batch", "32")
    f, c = report["figures"], report["counts"]
    assert report["config"]["nodes"] == 1
    assert c["pairs_2_accepted"] == c["pairs_2_delivered"] == f["pairs_2_acked_confirmed"] > 0
    assert f["pairs_2_store_round_trips_per_msg"] > 0  # the broker really used Redis
    for name in ("broker", "redis"):
        assert f[f"pairs_2_{name}_cpu_pct"] is not None
        assert f[f"pairs_2_{name}_us_per_msg"] is not None
    assert "pairs_2_node1_cpu_pct" not in f  # one node: its figures are the broker's


def test_two_nodes_deliver_online_across_and_report_each_node(tmp_path: Path) -> None:
    report = run(tmp_path, "latency", "--nodes", "2", "--rate", "200", "--duration", "0.5", "--warmup", "0.2")
    f, c, cfg = report["figures"], report["counts"], report["config"]
    assert cfg["nodes"] == 2 and len(set(cfg["node_urls"])) == 2 and all(cfg["node_pids"])
    assert c["messages_sent"] == c["accepted"] == c["delivered"] == round(200 * 0.7)
    assert f["store_round_trips_per_msg"] > 0
    for name in ("node1", "node2", "redis"):
        assert f[f"{name}_cpu_pct"] is not None
    assert [t["threshold"] for t in report["targets"]] == [3000]  # the across-nodes latency target


def test_two_nodes_drain_an_offline_mailbox_across(tmp_path: Path) -> None:
    report = run(tmp_path, "offline", "--nodes", "2", "--messages", "300", "--batch", "100")
    f, c = report["figures"], report["counts"]
    assert c["accepted"] == c["delivered"] == 300  # queued on node 1, drained from node 2
    assert c["held_after_drain"] == 0
    assert f["drain_node2_us_per_msg"] is not None
    assert f["redis_bytes_per_queued_msg"] is not None


def test_several_nodes_without_a_shared_store_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["latency", "--no-progress", "--nodes", "2"]) == 1
    assert "need a shared store" in capsys.readouterr().err
