"""Prometheus metrics: the statistics record rendered in the text exposition format, and who may scrape it.

Theory of operation. ``GET /metrics`` (``broker.http``) takes one
:meth:`Stats.snapshot <broker.stats.Stats.snapshot>`, the same record STATS and
``/relay/stats`` answer from, and :func:`render` turns it into the exposition text with
prometheus-client: a private ``CollectorRegistry`` (never the global one) holding one
:class:`_SnapshotCollector` that yields metric families from the snapshot, rendered by
``generate_latest``. Nothing of prometheus-client runs on a hot path: the router, the
delivery pump, the outbox and the store bump plain ints and fixed-bucket
:class:`~broker.stats.Histogram` objects, and the figures are read once per scrape. Updating
prometheus-client's own Counter and Histogram objects per message instead would take a
lock and a method call or two per event (their values are thread-safe), several times
the cost of an int add, paid on every message rather than once per scrape.

:data:`NODE_METRICS`, :data:`ACTIVITY_METRICS` and :data:`RELAY_METRICS` name every
figure's metric (a test keeps them complete): node figures as they are, relay-wide ones (the store's: the whole
relay with a shared Redis store) as the store reports them; the store's figures are absent
while it cannot be reached (``relay_store_available`` 0). Refusals are one counter with a
``reason`` label, connections one gauge with a ``transport`` label. The store's mailbox depths
(:attr:`StoreStatistics.mailbox_depths <broker.store.base.StoreStatistics.mailbox_depths>`, counted by the
store as mailboxes change) are the histogram ``relay_mailbox_depth``: mailboxes observed by messages held.

Who may scrape: :class:`ScrapeRule`. A client whose address is in one of
``metrics_open_networks`` (loopback by default) scrapes without a token; any other needs an
operator token, as ``/relay/stats`` does.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .limits import Reason
from .stats import REFUSAL_NAMES, TRANSPORT_NAMES, HistogramSnapshot, Statistics
from .store.base import MAILBOX_DEPTH_BOUNDS

__all__ = ["ACTIVITY_METRICS", "CONTENT_TYPE", "NODE_METRICS", "RELAY_METRICS", "ScrapeRule", "render"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
"""The exposition format's media type, as prometheus-client writes it."""

COUNTER, GAUGE = "counter", "gauge"


@dataclass(frozen=True, slots=True)
class _Figure:
    metric: str
    """The metric's name (a counter's without ``_total``: prometheus-client appends it)."""
    kind: str
    help: str


NODE_METRICS: Mapping[str, _Figure] = {
    "online_users": _Figure("relay_online_users", GAUGE, "Mailboxes with a session on this node."),
    "sent_total": _Figure("relay_messages_sent", COUNTER, "(recipient, message) pairs stored by SEND on this node."),
    "delivered_total": _Figure("relay_messages_delivered", COUNTER, "DELIVER frames written, redeliveries included."),
    "redelivered_total": _Figure("relay_messages_redelivered", COUNTER, "DELIVER frames written with attempt > 1."),
    "duplicates_total": _Figure("relay_messages_duplicate", COUNTER, "SEND results DUPLICATE (a retried SEND)."),
    "store_round_trips": _Figure("relay_store_round_trips", COUNTER, "Round trips to a networked store and presence."),
    "store_available": _Figure("relay_store_available", GAUGE, "1 while this node can reach its store, else 0."),
    "store_errors_total": _Figure("relay_store_errors", COUNTER, "Store and presence calls that failed to reach it."),
    "statuses_delivered_total": _Figure("relay_statuses_delivered", COUNTER, "STATUS frames written."),
    "statuses_acked_total": _Figure("relay_statuses_acknowledged", COUNTER, "Statuses deleted by STATUS_ACK."),
    "statuses_lost_total": _Figure("relay_statuses_lost", COUNTER, "Notices the store did not take as statuses."),
    "keys_put_total": _Figure("relay_keys_put", COUNTER, "Key records stored."),
    "keys_put_refused_total": _Figure("relay_keys_put_refused", COUNTER, "Key records refused with INVALID_KEY."),
    "key_lookups_total": _Figure("relay_key_lookups", COUNTER, "Mailboxes looked up in the key directory."),
    "tokens_refreshed_total": _Figure("relay_tokens_refreshed", COUNTER, "REFRESHes that gave a session a new token."),
    "sessions_expired_total": _Figure("relay_sessions_expired", COUNTER, "Sessions ended by their token's expiry."),
}
"""This node's STATS figures (:class:`~broker.stats.NodeStatistics`) and their metrics; besides these,
``connections`` is ``relay_connections{transport}``, the refusals ``relay_messages_refused_total{reason}`` and the
``rate_limited_*_total`` figures ``relay_rate_limited_total{reason}``."""

ACTIVITY_METRICS: Mapping[str, _Figure] = {
    "acknowledged_total": _Figure("relay_messages_acknowledged", COUNTER, "Messages deleted by ACK on this node."),
    "frames_in_total": _Figure("relay_frames_received", COUNTER, "Frames decoded from clients (TCP and WebSocket)."),
    "bytes_in_total": _Figure("relay_bytes_received", COUNTER, "Frame bytes read from clients."),
    "frames_out_total": _Figure("relay_frames_sent", COUNTER, "Frames handed to the connections' writers."),
    "bytes_out_total": _Figure("relay_bytes_sent", COUNTER, "Frame bytes written to clients."),
}
"""This node's figures beyond STATS (:class:`~broker.stats.NodeActivity`'s counters) and their metrics."""

RELAY_METRICS: Mapping[str, _Figure] = {
    "messages_total": _Figure("relay_messages_held", GAUGE, "Messages held, in flight included (relay-wide)."),
    "messages_deliverable": _Figure("relay_messages_deliverable", GAUGE, "Held messages not expired (relay-wide)."),
    "messages_expired_unswept": _Figure(
        "relay_messages_expired_unswept", GAUGE, "Expired messages not yet purged (relay-wide)."
    ),
    "acknowledged_total": _Figure("relay_store_acknowledged", COUNTER, "Messages deleted by ACK (relay-wide)."),
    "unique_recipients": _Figure("relay_mailboxes_holding", GAUGE, "Mailboxes holding messages (relay-wide)."),
    "queued_bytes": _Figure("relay_messages_held_bytes", GAUGE, "Body bytes held (relay-wide)."),
    "expired_total": _Figure("relay_messages_expired", COUNTER, "Messages removed unACKed at expiry (relay-wide)."),
    "tombstones": _Figure("relay_tombstones", GAUGE, "ACKed ids remembered for idempotent retries (relay-wide)."),
    "inflight": _Figure("relay_messages_inflight", GAUGE, "Messages delivered and not yet ACKed (relay-wide)."),
    "statuses_held": _Figure("relay_statuses_held", GAUGE, "Delivery statuses held (relay-wide)."),
    "statuses_total": _Figure("relay_statuses_queued", COUNTER, "Notices taken as statuses (relay-wide)."),
    "statuses_overflowed_total": _Figure(
        "relay_statuses_overflowed", COUNTER, "Notices folded into overflow records (relay-wide)."
    ),
    "statuses_expired_total": _Figure("relay_statuses_expired", COUNTER, "Status records expired (relay-wide)."),
}
"""The store's figures (:class:`~broker.store.base.StoreStatistics` fields) and their metrics."""

_HISTOGRAMS = {
    "deliver_latency": ("relay_deliver_latency_seconds", "From a message's acceptance to its first DELIVER written."),
    "ack_latency": ("relay_ack_latency_seconds", "From a message's acceptance to its ACK."),
    "loop_lag": ("relay_event_loop_lag_seconds", "How late the event loop woke a timer."),
    "store_call_latency": ("relay_store_call_latency_seconds", "A networked store's round trip (Redis)."),
}


_DEPTH_BOUNDS = tuple(float(bound) for bound in MAILBOX_DEPTH_BOUNDS)
_DEPTH_HELP = "Mailboxes holding messages, by how many they hold (relay-wide); the sum is the messages held."


def _family(figure: _Figure, value: float) -> Metric:
    if figure.kind == COUNTER:
        return CounterMetricFamily(figure.metric, figure.help, value=value)
    return GaugeMetricFamily(figure.metric, figure.help, value=value)


def _histogram(name: str, help_text: str, snap: HistogramSnapshot) -> Metric:
    buckets = []
    running = 0
    for bound, count in zip((*snap.bounds, float("inf")), snap.counts, strict=True):
        running += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
    return HistogramMetricFamily(name, help_text, buckets=buckets, sum_value=snap.sum)


class _SnapshotCollector:
    """Yields the metric families of one snapshot (prometheus-client's custom-collector interface)."""

    def __init__(self, statistics: Statistics) -> None:
        self._statistics = statistics

    def collect(self) -> Iterator[Metric]:
        node, relay, activity = self._statistics.node, self._statistics.relay, self._statistics.activity
        for name, figure in NODE_METRICS.items():
            yield _family(figure, node.get(name))
        for name, figure in ACTIVITY_METRICS.items():
            yield _family(figure, getattr(activity, name))
        connections = GaugeMetricFamily(
            "relay_connections",
            "Connections open on this node, by transport (tcp, tls, websocket, wss).",
            labels=["transport"],
        )
        by_transport = activity.connections_by_transport
        for transport in sorted({*TRANSPORT_NAMES, *by_transport}):
            connections.add_metric([transport], by_transport.get(transport, 0))
        yield connections
        refused = CounterMetricFamily(
            "relay_messages_refused", "SEND results and whole SENDs refused, by reason.", labels=["reason"]
        )
        for code, wire_name in REFUSAL_NAMES.items():
            refused.add_metric([wire_name.removeprefix("refused_")], node.refused_by_code[code])
        yield refused
        limited = CounterMetricFamily(
            "relay_rate_limited",
            "Connections, HTTP requests, HELLOs and SENDs the abuse limits refused, by reason.",
            labels=["reason"],
        )
        for reason in Reason:
            limited.add_metric([reason.value], node.rate_limited.get(reason, 0))
        yield limited
        for attribute, (metric, help_text) in _HISTOGRAMS.items():
            snap: HistogramSnapshot | None = getattr(activity, attribute)
            if snap is not None:
                yield _histogram(metric, help_text, snap)
        if relay is not None:
            for name, figure in RELAY_METRICS.items():
                yield _family(figure, getattr(relay, name))
            depths = HistogramSnapshot(_DEPTH_BOUNDS, relay.mailbox_depths, float(relay.messages_total))
            yield _histogram("relay_mailbox_depth", _DEPTH_HELP, depths)


def render(statistics: Statistics) -> bytes:
    """The exposition text of ``statistics`` (UTF-8), in a private registry. Never raises for any snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(statistics))
    return generate_latest(registry)


class ScrapeRule:
    """Who may scrape without a token: clients in one of ``networks`` (CIDR text, e.g. ``127.0.0.0/8``).

    Raises ValueError for a network that does not parse (the configuration checks them first).
    """

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks = tuple(ipaddress.ip_network(n) for n in networks)

    def open_to(self, host: str | None) -> bool:
        """Whether a client at ``host`` (its IP address as text; None if unknown) may scrape without a token."""
        if host is None:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)
