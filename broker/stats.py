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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from wire import ErrorCode

from .health import StoreHealth
from .presence import Presence
from .store.base import Clock, Store, StoreStatistics

__all__ = [
    "NODE_NAMES",
    "REFUSAL_NAMES",
    "RELAY_NAMES",
    "STATS_NAMES",
    "Counters",
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
}
"""The per-code refusal counters: every code a SEND result (or a whole SEND) can be refused with."""

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
)
"""protocol.md section 10: every STATS_RESULT key, in wire order (the one list of these names)."""

RELAY_NAMES = tuple(f.name for f in dataclasses.fields(StoreStatistics))
"""The relay-wide names: :class:`~broker.store.base.StoreStatistics`' fields."""


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

    def get(self, name: str) -> int:
        """The figure called ``name`` on the wire (a refusal counter is one entry of ``refused_by_code``).

        Raises KeyError for a name that is not a node figure.
        """
        if name.startswith("refused_") and name != "refused_total":
            return self.refused_by_code[_CODE_OF[name]]
        if name == "refused_by_code" or name not in _NODE_FIELDS:
            raise KeyError(name)
        value: int = getattr(self, name)
        return value


_CODE_OF = {name: code for code, name in REFUSAL_NAMES.items()}
_NODE_FIELDS = frozenset(f.name for f in dataclasses.fields(NodeStatistics))
NODE_NAMES = tuple(name for name in STATS_NAMES if name not in RELAY_NAMES)
"""The node-local names, in wire order."""


@dataclass(frozen=True, slots=True)
class Statistics:
    """Everything STATS reports: ``node`` (this broker) and ``relay`` (the store, maybe shared by many nodes)."""

    node: NodeStatistics
    relay: StoreStatistics | None
    """None when the store could not be reached for them."""

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
        "delivered",
        "duplicates",
        "key_lookups",
        "keys_put",
        "keys_put_refused",
        "redelivered",
        "refused",
        "sent",
        "statuses_acked",
        "statuses_delivered",
        "statuses_lost",
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
    ) -> None:
        self.counters = Counters()
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
        )
        return Statistics(node, relay)
