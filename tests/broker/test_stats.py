"""The statistics record: protocol.md section 10's names in one list, the STATS map in wire order."""

from __future__ import annotations

import dataclasses

import pytest

from broker.backend import probed_health
from broker.limits import Reason
from broker.presence import LocalPresence
from broker.stats import (
    NODE_NAMES,
    REFUSAL_NAMES,
    RELAY_NAMES,
    STATS_NAMES,
    Histogram,
    NodeStatistics,
    Statistics,
    Stats,
)
from broker.store.base import MAILBOX_DEPTH_BOUNDS, StoreStatistics
from broker.store.memory import MemoryStore
from tests.wire.test_protocol_doc import SPEC_STATS
from wire import ErrorCode


def record() -> Statistics:
    depths = (3,) + (0,) * len(MAILBOX_DEPTH_BOUNDS)  # metrics only: never on the wire
    relay = StoreStatistics(**{name: i + 1 for i, name in enumerate(RELAY_NAMES)}, mailbox_depths=depths)
    by_code = {code: 100 + i for i, code in enumerate(REFUSAL_NAMES)}
    node = NodeStatistics(
        online_users=20,
        connections=21,
        sent_total=22,
        delivered_total=23,
        redelivered_total=24,
        duplicates_total=25,
        refused_total=sum(by_code.values()),
        refused_by_code=by_code,
        rate_limited={reason: 200 + i for i, reason in enumerate(Reason)},
    )
    return Statistics(node, relay)


def test_every_name_is_a_relay_or_a_node_figure_once() -> None:
    assert len(set(STATS_NAMES)) == len(STATS_NAMES)
    assert set(RELAY_NAMES).isdisjoint(NODE_NAMES)
    assert set(RELAY_NAMES) | set(NODE_NAMES) == set(STATS_NAMES)
    node_fields = {f.name for f in dataclasses.fields(NodeStatistics)} - {"refused_by_code", "rate_limited"}
    limited = {f"rate_limited_{reason}_total" for reason in Reason}
    assert set(NODE_NAMES) == node_fields | set(REFUSAL_NAMES.values()) | limited


def test_to_wire_holds_every_name_in_wire_order_with_its_figure() -> None:
    stats = record()
    wire = stats.to_wire()
    assert list(wire) == list(STATS_NAMES)
    assert [wire[name] for name in RELAY_NAMES] == list(range(1, len(RELAY_NAMES) + 1))
    refusals = len(REFUSAL_NAMES)
    assert (wire["online_users"], wire["connections"]) == (20, 21)
    assert wire["refused_total"] == sum(range(100, 100 + refusals))
    assert [wire[name] for name in REFUSAL_NAMES.values()] == list(range(100, 100 + refusals))
    assert [wire[f"rate_limited_{reason}_total"] for reason in Reason] == list(range(200, 200 + len(Reason)))


def test_the_names_are_protocol_md_section_10s() -> None:
    assert sorted(STATS_NAMES) == sorted(SPEC_STATS)


async def test_a_snapshot_reads_the_store_presence_connections_and_counters() -> None:
    store = MemoryStore()
    presence = LocalPresence()
    stats = Stats(store, presence, lambda: 3, clock=lambda: 0, health=probed_health(store))
    stats.counters.delivered = 5
    stats.counters.refuse(ErrorCode.BROKER_FULL)
    snapshot = await stats.snapshot()
    assert (snapshot.node.connections, snapshot.node.delivered_total, snapshot.node.refused_total) == (3, 5, 1)
    assert snapshot.to_wire()["refused_broker_full"] == 1
    assert snapshot.relay.messages_total == 0
    assert snapshot.to_wire()["store_round_trips"] == 0  # nothing networked
    counted = Stats(store, presence, lambda: 0, clock=lambda: 0, health=probed_health(store), round_trips=lambda: 17)
    assert (await counted.snapshot()).to_wire()["store_round_trips"] == 17


def test_a_histogram_counts_each_value_in_the_bucket_of_the_first_bound_not_below_it() -> None:
    histogram = Histogram((0.001, 0.01, 1.0))
    for v in (0.0, 0.001, 0.0011, 0.5, 1.0, 2.0, 2.0):
        histogram.observe(v)
    snap = histogram.snapshot()
    assert snap.counts == (2, 1, 2, 2) and snap.count == 7
    assert snap.sum == pytest.approx(5.5021)
    histogram.observe(0.0)
    assert snap.counts == (2, 1, 2, 2), "a snapshot does not change afterwards"
    for bad in ((), (1.0, 1.0), (2.0, 1.0)):
        with pytest.raises(ValueError, match="strictly increasing"):
            Histogram(bad)
