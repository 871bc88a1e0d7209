"""Statistics: one typed record, node-local counters and relay-wide store figures named apart.

Theory of operation. Things that happen on this broker node (a message stored by SEND,
a DELIVER or STATUS written, a refusal) are counted as they happen in :class:`Counters`, a few
slotted integers the router and the delivery pump bump on their hot paths. Figures about
what the relay holds (messages, bytes, tombstones, in flight) belong to the store: with
one in-memory store they are this process's, with a shared store (Redis) they are the
whole relay's, so they are kept apart. :meth:`Stats.snapshot` reads both into one frozen
:class:`Statistics` (``node`` and ``relay``), which is what STATS_RESULT, the HTTP API
and a metrics exporter render. While the store cannot be reached, a snapshot still answers
with what the node knows: ``relay`` is None and the map carries the node-local keys only
(``store_available`` 0). :data:`STATS_NAMES` is protocol.md section 10's list of
keys, in the order the STATS_RESULT map has always carried them (so its bytes do not
change); :meth:`Statistics.to_wire` is the one place that builds that map.

Besides the STATS figures the node keeps what only the metrics exporter (``broker.metrics``,
``GET /metrics``) renders, in :class:`NodeActivity`: frames and bytes in and out, connections open by transport, and
:class:`Histogram` objects (delivery latency, event-loop lag, store call latency). A histogram is
a fixed list of ints, one per bucket of its fixed bounds: observing a value is a bisection
and one integer add, with nothing allocated per observation and nothing of prometheus-client
on a hot path; the exporter reads the counts at scrape time (:meth:`Histogram.snapshot`).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import trio

from wire import ErrorCode

from .health import StoreHealth
from .limits import Reason
from .presence import Presence
from .store.base import Clock, Store, StoreStatistics

__all__ = [
    "NODE_NAMES",
    "REFUSAL_NAMES",
    "RELAY_NAMES",
    "STATS_NAMES",
    "DELIVER_LATENCY_BOUNDS_S",
    "LOOP_LAG_BOUNDS_S",
    "STORE_CALL_BOUNDS_S",
    "TRANSPORT_NAMES",
    "Counters",
    "Histogram",
    "HistogramSnapshot",
    "NodeActivity",
    "NodeStatistics",
    "Stats",
    "Statistics",
]

REFUSAL_NAMES: Mapping[ErrorCode, str] = {
    ErrorCode.MAILBOX_FULL: "refused_mailbox_full",
    ErrorCode.MAILBOX_BYTES_FULL: "refused_mailbox_bytes_full",
    ErrorCode.BROKER_FULL: "refused_broker_full",
    ErrorCode.TOO_MANY_RECIPIENTS: "refused_too_many_recipients",
    ErrorCode.ID_CONFLICT: "refused_id_conflict",
    ErrorCode.INVALID_RECIPIENT: "refused_invalid_recipient",
    ErrorCode.BODY_TOO_LARGE: "refused_body_too_large",
    ErrorCode.RATE_LIMITED: "refused_rate_limited",
}
"""The per-code refusal counters: every code a SEND result (or a whole SEND) can be refused with."""

TRANSPORT_NAMES: tuple[str, ...] = ("tcp", "tls", "websocket", "wss")
"""What connections are counted as, by the listener they came in on (tcp://, tls://, ws://, wss://): said where each
transport is made (``Broker._handle_stream``, ``broker.websocket.serve_websocket``). The HTTP API holds no sessions:
its requests are not connections here."""

LOOP_LAG_INTERVAL_S = 0.25
"""How often the loop-lag task wakes to measure how late its timer fired (four cheap wake-ups a second)."""

STATS_NAMES: tuple[str, ...] = (
    # relay-wide: the store's figures
    "messages_total",
    "messages_deliverable",
    "messages_expired_unswept",
    "acknowledged_total",
    "unique_recipients",
    "queued_bytes",
    "expired_total",
    "tombstones",
    "inflight",
    "statuses_held",
    "statuses_total",
    "statuses_overflowed_total",
    "statuses_expired_total",
    # node-local: this broker's presence, connections and counters
    "online_users",
    "connections",
    "sent_total",
    "delivered_total",
    "redelivered_total",
    "duplicates_total",
    "refused_total",
    *REFUSAL_NAMES.values(),
    "store_round_trips",
    "store_available",
    "store_errors_total",
    "statuses_delivered_total",
    "statuses_acked_total",
    "statuses_lost_total",
    "keys_put_total",
    "keys_put_refused_total",
    "key_lookups_total",
    "tokens_refreshed_total",
    "sessions_expired_total",
    *(f"rate_limited_{reason}_total" for reason in Reason),
)
"""protocol.md section 10: every STATS_RESULT key, in wire order (the one list of these names)."""

DELIVER_LATENCY_BOUNDS_S: tuple[float, ...] = (
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0,
    86400.0,
)  # fmt: skip
"""Bucket bounds (s) of the latencies from a message's acceptance to its DELIVER and to its ACK (to the ms: ``sent_at``
 is epoch ms): online delivery
online delivery up to a recipient offline for a day (anything later is counted in +Inf)."""
LOOP_LAG_BOUNDS_S: tuple[float, ...] = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
"""Bucket bounds (s) of the event loop's lag: how late a timer of the loop-lag task woke."""
STORE_CALL_BOUNDS_S: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
)  # fmt: skip
"""Bucket bounds (s) of a networked store's round trips (up to the Redis client's command timeout)."""


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """A :class:`Histogram`'s figures at one moment."""

    bounds: tuple[float, ...]
    """Upper bounds of the buckets (each bucket holds the values <= its bound and > the one before)."""
    counts: tuple[int, ...]
    """Observations per bucket, not cumulative; one more than ``bounds`` (the last: above every bound)."""
    sum: float
    """Sum of the values observed."""

    @property
    def count(self) -> int:
        """Observations in all."""
        return sum(self.counts)


class Histogram:
    """Observations counted in fixed buckets: a list of ints, so observing allocates nothing (module docstring).

    Raises ValueError if ``bounds`` is empty or not strictly increasing.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        if not bounds or any(a >= b for a, b in itertools.pairwise(bounds)):
            raise ValueError(f"histogram bounds must be strictly increasing and not empty, not {bounds!r}")
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation of ``value`` (a value equal to a bound is in that bound's bucket)."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> HistogramSnapshot:
        """The figures now."""
        return HistogramSnapshot(self.bounds, tuple(self.counts), self.sum)


RELAY_NAMES = tuple(f.name for f in dataclasses.fields(StoreStatistics) if f.metadata.get("stats", True))
"""The relay-wide STATS names: :class:`~broker.store.base.StoreStatistics`' fields (but the metrics-only ones)."""


@dataclass(frozen=True, slots=True)
class NodeStatistics:
    """What this broker node saw: presence and connections now, counters since it started."""

    online_users: int
    connections: int
    sent_total: int
    delivered_total: int
    redelivered_total: int
    duplicates_total: int
    refused_total: int
    refused_by_code: Mapping[ErrorCode, int]
    """Refusals per code (every key of :data:`REFUSAL_NAMES`); their sum is ``refused_total``."""
    store_round_trips: int = 0
    """Round trips this node has made to a networked store and presence (0 in memory)."""
    store_available: int = 1
    """1 while this node can reach its store, 0 from a failed call until its reconnect probe succeeds."""
    store_errors_total: int = 0
    """Store and presence calls of this node that failed because the store could not be reached."""
    statuses_delivered_total: int = 0
    """STATUS frames written (first sends and sends again after a reconnect or PULL)."""
    statuses_acked_total: int = 0
    """Statuses deleted by STATUS_ACK (or the HTTP API's acknowledge) through this node."""
    statuses_lost_total: int = 0
    """Notices the store did not take as statuses (it failed after the ACK or purge that made them)."""
    keys_put_total: int = 0
    """Key records stored (KEY_PUT and HTTP)."""
    keys_put_refused_total: int = 0
    """Key records refused with INVALID_KEY."""
    key_lookups_total: int = 0
    """Mailboxes looked up in the key directory (the distinct ones of each lookup)."""
    tokens_refreshed_total: int = 0
    """REFRESHes that gave a session a newer token."""
    sessions_expired_total: int = 0
    """Sessions ended with TOKEN_EXPIRED because their token expired while they were open."""
    rate_limited: Mapping[Reason, int] = dataclasses.field(default_factory=dict)
    """Requests the abuse limits refused, by reason (:class:`broker.limits.Reason`): ``rate_limited_<reason>_total``."""

    def get(self, name: str) -> int:
        """The figure called ``name`` on the wire (a refusal counter is one entry of ``refused_by_code``, a
        ``rate_limited_*_total`` one of ``rate_limited``).

        Raises KeyError for a name that is not a node figure.
        """
        if name.startswith("refused_") and name != "refused_total":
            return self.refused_by_code[_CODE_OF[name]]
        if (reason := _REASON_OF.get(name)) is not None:
            return self.rate_limited.get(reason, 0)
        if name == "refused_by_code" or name not in _NODE_FIELDS:
            raise KeyError(name)
        value: int = getattr(self, name)
        return value


@dataclass(frozen=True, slots=True)
class NodeActivity:
    """What this node saw that STATS does not carry (protocol.md section 10 stays as it is): the metrics'."""

    acknowledged_total: int = 0
    """Messages deleted by ACK (or the HTTP API's acknowledge) through this node."""
    frames_in_total: int = 0
    """Frames decoded from clients (TCP and WebSocket; not the HTTP API)."""
    bytes_in_total: int = 0
    """Frame bytes read from clients."""
    frames_out_total: int = 0
    """Frames handed to the connections' writers."""
    bytes_out_total: int = 0
    """Frame bytes written to clients."""
    connections_by_transport: Mapping[str, int] = dataclasses.field(default_factory=dict)
    """Connections open now per transport (:data:`TRANSPORT_NAMES`); their sum is ``connections``."""
    deliver_latency: HistogramSnapshot | None = None
    """Seconds from a message's acceptance (its ``sent_at``) to its first DELIVER being written."""
    ack_latency: HistogramSnapshot | None = None
    """Seconds from a message's acceptance to its ACK (ACKs over the session its DELIVER went on)."""
    loop_lag: HistogramSnapshot | None = None
    """Seconds the loop-lag task's timer woke late (None before the broker serves)."""
    store_call_latency: HistogramSnapshot | None = None
    """Seconds per round trip to a networked store (None for the in-memory store)."""


_CODE_OF = {name: code for code, name in REFUSAL_NAMES.items()}
_REASON_OF = {f"rate_limited_{reason}_total": reason for reason in Reason}
_NODE_FIELDS = frozenset(f.name for f in dataclasses.fields(NodeStatistics))
NODE_NAMES = tuple(name for name in STATS_NAMES if name not in RELAY_NAMES)
"""The node-local names, in wire order."""


@dataclass(frozen=True, slots=True)
class Statistics:
    """Everything STATS reports: ``node`` (this broker) and ``relay`` (the store, maybe shared by many nodes)."""

    node: NodeStatistics
    relay: StoreStatistics | None
    """None when the store could not be reached for them."""
    activity: NodeActivity = NodeActivity()
    """This node's figures beyond STATS (metrics only)."""

    def to_wire(self) -> dict[str, int]:
        """The STATS_RESULT map: every name of :data:`STATS_NAMES`, in order (without ``relay``: the node's only)."""
        relay, node = self.relay, self.node
        wire = {} if relay is None else {name: getattr(relay, name) for name in RELAY_NAMES}
        for name in NODE_NAMES:
            wire[name] = node.get(name)
        return wire


class Counters:
    """Node-local cumulative counters, bumped where things happen (router, delivery pump)."""

    __slots__ = (
        "ack_latency",
        "acknowledged",
        "bytes_in",
        "bytes_out",
        "connections",
        "deliver_latency",
        "delivered",
        "duplicates",
        "frames_in",
        "frames_out",
        "key_lookups",
        "keys_put",
        "keys_put_refused",
        "redelivered",
        "refused",
        "sent",
        "sessions_expired",
        "statuses_acked",
        "statuses_delivered",
        "statuses_lost",
        "tokens_refreshed",
    )

    def __init__(self) -> None:
        self.sent = 0
        """(recipient, message) pairs stored by SEND."""
        self.delivered = 0
        """DELIVER frames written, first attempts and redeliveries."""
        self.redelivered = 0
        """DELIVER frames written with attempt > 1."""
        self.duplicates = 0
        """Results DUPLICATE."""
        self.refused: dict[int, int] = dict.fromkeys(REFUSAL_NAMES, 0)
        """Refusals by ErrorCode (recipient results, and SENDs refused as a whole)."""
        self.statuses_delivered = 0
        """STATUS frames written."""
        self.statuses_acked = 0
        """Statuses deleted by STATUS_ACK (and over HTTP)."""
        self.statuses_lost = 0
        """Notices the store did not take as statuses."""
        self.keys_put = 0
        """Key records stored."""
        self.keys_put_refused = 0
        """Key records refused with INVALID_KEY."""
        self.key_lookups = 0
        """Mailboxes looked up in the key directory."""
        self.tokens_refreshed = 0
        """REFRESHes that gave a session a newer token."""
        self.sessions_expired = 0
        """Sessions ended by their token's expiry."""
        self.acknowledged = 0
        """Messages deleted by ACK through this node."""
        self.frames_in = 0
        """Frames decoded from clients."""
        self.bytes_in = 0
        """Frame bytes read from clients."""
        self.frames_out = 0
        """Frames handed to the writers."""
        self.bytes_out = 0
        """Frame bytes written to clients."""
        self.connections: dict[str, int] = {}
        """Connections open now, per transport name."""
        self.deliver_latency = Histogram(DELIVER_LATENCY_BOUNDS_S)
        """Seconds from acceptance to the first DELIVER written."""
        self.ack_latency = Histogram(DELIVER_LATENCY_BOUNDS_S)
        """Seconds from acceptance to the ACK."""

    def refuse(self, code: int) -> None:
        """Count one refusal with ``code`` (an ErrorCode of :data:`REFUSAL_NAMES`; KeyError otherwise)."""
        self.refused[code] += 1


class Stats:
    """The node's statistics: its :class:`Counters` and a :meth:`snapshot` of everything.

    ``connections`` tells how many connections the node holds now (the server's count);
    ``round_trips`` how many round trips it has made to a networked backend (the backend's count);
    ``health`` whether the store answers (and how many calls failed).
    """

    def __init__(
        self,
        store: Store,
        presence: Presence,
        connections: Callable[[], int],
        *,
        clock: Clock,
        health: StoreHealth,
        round_trips: Callable[[], int] = lambda: 0,
        store_call_latency: Histogram | None = None,
        rate_limited: Mapping[Reason, int] | None = None,
    ) -> None:
        self.counters = Counters()
        self.rate_limited: Mapping[Reason, int] = rate_limited if rate_limited is not None else {}
        """The abuse limits' refusals by reason, as the limiter counts them (:attr:`broker.limits.Limiter.refused`)."""
        self.loop_lag: Histogram | None = None
        """The loop-lag task's histogram, once :func:`watch_loop_lag` runs."""
        self.store_call_latency = store_call_latency
        """A networked store's round-trip latency (None in memory)."""
        self.health = health
        self._store = store
        self._presence = presence
        self._connections = connections
        self._clock = clock
        self._round_trips = round_trips

    async def snapshot(self) -> Statistics:
        """Every figure now; without the relay's (``relay`` None) if the store cannot be reached. Raises nothing
        for the store's OSError (it is reported to the health)."""
        health = self.health
        relay: StoreStatistics | None = None
        try:
            relay = await self._store.statistics(self._clock())
        except OSError as exc:
            health.failed(exc)
        c = self.counters
        refused = {ErrorCode(code): n for code, n in c.refused.items()}
        node = NodeStatistics(
            online_users=self._presence.count(),
            connections=self._connections(),
            sent_total=c.sent,
            delivered_total=c.delivered,
            redelivered_total=c.redelivered,
            duplicates_total=c.duplicates,
            refused_total=sum(refused.values()),
            refused_by_code=refused,
            store_round_trips=self._round_trips(),
            store_available=int(health.available),
            store_errors_total=health.errors,
            statuses_delivered_total=c.statuses_delivered,
            statuses_acked_total=c.statuses_acked,
            statuses_lost_total=c.statuses_lost,
            keys_put_total=c.keys_put,
            keys_put_refused_total=c.keys_put_refused,
            key_lookups_total=c.key_lookups,
            tokens_refreshed_total=c.tokens_refreshed,
            sessions_expired_total=c.sessions_expired,
            rate_limited=dict(self.rate_limited),
        )
        activity = NodeActivity(
            acknowledged_total=c.acknowledged,
            frames_in_total=c.frames_in,
            bytes_in_total=c.bytes_in,
            frames_out_total=c.frames_out,
            bytes_out_total=c.bytes_out,
            connections_by_transport=dict(c.connections),
            deliver_latency=c.deliver_latency.snapshot(),
            ack_latency=c.ack_latency.snapshot(),
            loop_lag=None if self.loop_lag is None else self.loop_lag.snapshot(),
            store_call_latency=None if self.store_call_latency is None else self.store_call_latency.snapshot(),
        )
        return Statistics(node, relay, activity)

    async def watch_loop_lag(self, interval_s: float = LOOP_LAG_INTERVAL_S) -> None:
        """Measure the event loop's lag until cancelled: sleep ``interval_s``, observe how late the wake-up came.

        A loop busy with other tasks wakes the timer late by about as long as its longest run without a
        checkpoint. Never returns.
        """
        lag = self.loop_lag = Histogram(LOOP_LAG_BOUNDS_S)
        while True:
            due = trio.current_time() + interval_s
            await trio.sleep_until(due)
            lag.observe(max(trio.current_time() - due, 0.0))
