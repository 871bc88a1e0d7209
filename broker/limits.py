"""Abuse limits: token buckets per source address and per mailbox, and the cap on connections per address.

Theory of operation. A :class:`Limiter` is made once per broker node from its configuration and consulted from one
place per event: :meth:`Limiter.connect` by ``Broker._refusal`` for every connection (and for every HTTP API
request), :meth:`Limiter.hello_from` / :meth:`Limiter.hello_as` on the HELLO path (before the token is checked, and
once it names a mailbox), :meth:`Limiter.send` by the router for every SEND (TCP, WebSocket and HTTP alike).
Each answers None (go ahead; the tokens are taken) or the seconds after which the same request would pass
(refused; nothing is taken). Limits are per node: with several nodes a client may get each node's allowance.

A bucket holds up to ``burst`` tokens and gains ``per_s`` a second; a request costs one token (a SEND's body costs
its length in the bytes buckets). A rate of 0 turns that limit off. Each kind keeps its buckets in a
:class:`Buckets` table keyed by address or mailbox, an ordered dict used as an LRU: a check is O(1) (one lookup,
one move to the end), and when the table holds ``table_size`` buckets the least recently used one is dropped. A
dropped bucket comes back full, so what a flood of distinct addresses can do is push idle buckets out (which
forgets only how much those idle clients had spent), never make the table grow. Written by hand: a token bucket is
a few lines, and the libraries for it are asyncio- or Redis-bound.

Addresses in ``exempt_networks`` (default loopback: local development, the bench) are not limited at all, neither
per address nor per mailbox. A connection with no address (in-memory transports in tests) has no per-address
limits; its mailbox's apply.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import trio

from .config import BrokerConfig

__all__ = ["Buckets", "Limiter", "Rate", "Reason", "retry_after_ms"]

Seconds = Callable[[], float]
"""A monotonic clock in seconds (``trio.current_time``, or a fake in tests)."""


class Reason(StrEnum):
    """Why a request was refused: the ``reason`` label of ``relay_rate_limited_total`` and the stats key suffix."""

    CONNECTIONS = "connections"
    """Connections (and HTTP requests) from one address came faster than its rate."""
    ADDRESS_CONNECTIONS = "address_connections"
    """An address held ``max_connections_per_address`` open connections already."""
    HELLOS = "hellos"
    """HELLOs from one address, or for one mailbox, came faster than their rate."""
    SENDS = "sends"
    """SENDs from one address or mailbox came faster than their rate."""
    SEND_BYTES = "send_bytes"
    """SEND body bytes from one address or mailbox came faster than their rate."""


@dataclass(frozen=True, slots=True)
class Rate:
    """A bucket's refill rate (tokens a second; 0: no limit) and its size."""

    per_s: float
    burst: float


class Buckets:
    """Token buckets of one :class:`Rate`, by key, at most ``table_size`` of them (least recently used dropped)."""

    __slots__ = ("_burst", "_clock", "_per_s", "_size", "_table")

    def __init__(self, rate: Rate, table_size: int, clock: Seconds) -> None:
        self._per_s = rate.per_s
        self._burst = rate.burst
        self._size = table_size
        self._clock = clock
        self._table: OrderedDict[str, list[float]] = OrderedDict()  # key -> [tokens, as of (clock seconds)]

    @property
    def enabled(self) -> bool:
        return self._per_s > 0

    def __len__(self) -> int:
        return len(self._table)

    def wait(self, key: str, cost: float = 1.0) -> float:
        """Seconds until ``key`` could spend ``cost`` tokens (0.0: now). Takes nothing. A cost above the burst
        is judged as the burst (it waits for a full bucket, then empties it)."""
        if self._per_s <= 0:
            return 0.0
        bucket = self._refilled(key, self._clock())
        short = min(cost, self._burst) - bucket[0]
        return 0.0 if short <= 0 else short / self._per_s

    def take(self, key: str, cost: float = 1.0) -> None:
        """Spend ``cost`` tokens of ``key`` (after :meth:`wait` said 0.0); never below zero."""
        if self._per_s > 0:
            _spend(self._refilled(key, self._clock()), cost)

    def held(self, key: str, now: float) -> list[float] | None:
        """``key``'s bucket, refilled to ``now`` (this table's clock), as ``[tokens, as of]`` (spend by lowering
        ``tokens``, never below zero); None if this kind has no limit (rate 0). For checks across several buckets
        (:meth:`Limiter.send`)."""
        return self._refilled(key, now) if self._per_s > 0 else None

    def short(self, bucket: list[float] | None, cost: float) -> float:
        """Seconds until ``bucket`` (from :meth:`held`) could spend ``cost`` (0.0: now), as :meth:`wait` says."""
        if bucket is None:
            return 0.0
        short = min(cost, self._burst) - bucket[0]
        return 0.0 if short <= 0 else short / self._per_s

    def _refilled(self, key: str, now: float) -> list[float]:
        table = self._table
        bucket = table.get(key)
        if bucket is None:
            bucket = table[key] = [self._burst, now]
            if len(table) > self._size:
                table.popitem(last=False)
            return bucket
        table.move_to_end(key)
        tokens, then = bucket
        if tokens < self._burst:
            bucket[0] = min(self._burst, tokens + (now - then) * self._per_s)
        bucket[1] = now
        return bucket


class Limiter:
    """The node's abuse limits (module docstring). Every check is O(1); none raises."""

    def __init__(self, config: BrokerConfig, *, clock: Seconds = trio.current_time) -> None:
        size = config.rate_limit_table_size
        self._clock = clock

        def buckets(per_s: float, burst: float) -> Buckets:
            return Buckets(Rate(per_s, burst), size, clock)

        c = config
        self.max_per_address = c.max_connections_per_address
        self._exempt = tuple(ipaddress.ip_network(n) for n in c.rate_exempt_networks)
        self._exempt_cache: OrderedDict[str, bool] = OrderedDict()
        self._table_size = size
        self.open: dict[str, int] = {}
        """Open connections by (non-exempt) address; an address with none has no entry."""
        self.refused: dict[Reason, int] = dict.fromkeys(Reason, 0)
        """Requests refused since the node started, by reason (statistics and ``relay_rate_limited_total``)."""
        self.connections = buckets(c.address_connections_per_s, c.address_connections_burst)
        self.address_hellos = buckets(c.address_hellos_per_s, c.address_hellos_burst)
        self.mailbox_hellos = buckets(c.mailbox_hellos_per_s, c.mailbox_hellos_burst)
        self.address_sends = buckets(c.address_sends_per_s, c.address_sends_burst)
        self.mailbox_sends = buckets(c.mailbox_sends_per_s, c.mailbox_sends_burst)
        self.address_bytes = buckets(c.address_send_bytes_per_s, c.address_send_bytes_burst)
        self.mailbox_bytes = buckets(c.mailbox_send_bytes_per_s, c.mailbox_send_bytes_burst)

    def exempt(self, address: str | None) -> bool:
        """Whether ``address`` is in ``rate_exempt_networks`` (None, no address: not exempt). Cached, LRU-bounded."""
        if address is None:
            return False
        cache = self._exempt_cache
        known = cache.get(address)
        if known is None:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                known = False
            else:
                if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                    ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
                known = any(ip in network for network in self._exempt)
            cache[address] = known
            if len(cache) > self._table_size:
                cache.popitem(last=False)
        else:
            cache.move_to_end(address)
        return known

    # ------------------------------------------------------------ connections

    def connect(self, address: str | None, *, counted: bool = True) -> tuple[Reason, float] | None:
        """A connection (or an HTTP request, ``counted=False``: it holds no connection) from ``address``: None if
        it may go ahead (one token taken; a counted one is open until :meth:`disconnect`), else why not and the
        seconds to wait (0.0 for the per-address cap: until one of its connections closes)."""
        if address is None or self.exempt(address):
            return None
        if counted and self.open.get(address, 0) >= self.max_per_address:
            self.refused[Reason.ADDRESS_CONNECTIONS] += 1
            return Reason.ADDRESS_CONNECTIONS, 0.0
        if (wait := self.connections.wait(address)) > 0:
            self.refused[Reason.CONNECTIONS] += 1
            return Reason.CONNECTIONS, wait
        self.connections.take(address)
        if counted:
            self.open[address] = self.open.get(address, 0) + 1
        return None

    def disconnect(self, address: str | None) -> None:
        """A connection :meth:`connect` let in has ended."""
        if address is None or (held := self.open.get(address)) is None:
            return
        if held <= 1:
            del self.open[address]
        else:
            self.open[address] = held - 1

    # ------------------------------------------------------------ handshakes

    def hello_from(self, address: str | None) -> float | None:
        """A HELLO arrived from ``address``, before its token is checked: None, or the seconds to wait."""
        if address is None or self.exempt(address):
            return None
        if (wait := self.address_hellos.wait(address)) > 0:
            self.refused[Reason.HELLOS] += 1
            return wait
        self.address_hellos.take(address)
        return None

    def hello_as(self, address: str | None, mailbox: str) -> float | None:
        """A HELLO's token named ``mailbox``: None, or the seconds to wait."""
        if self.exempt(address):
            return None
        if (wait := self.mailbox_hellos.wait(mailbox)) > 0:
            self.refused[Reason.HELLOS] += 1
            return wait
        self.mailbox_hellos.take(mailbox)
        return None

    # ------------------------------------------------------------ SENDs

    def send(self, address: str | None, mailbox: str, body_bytes: int) -> tuple[Reason, float] | None:
        """A SEND from ``mailbox`` at ``address`` with a body of ``body_bytes``: None (its tokens taken from the
        four buckets), or why not and the seconds to wait, the longest of the four (nothing taken).

        The per-SEND path: the clock is read once, each bucket looked up and refilled once, nothing allocated."""
        if address is not None and self.exempt(address):
            return None
        now = self._clock()
        sends, data = self.mailbox_sends, self.mailbox_bytes
        mailbox_sends, mailbox_data = sends.held(mailbox, now), data.held(mailbox, now)
        wait, reason = sends.short(mailbox_sends, 1.0), Reason.SENDS
        if (short := data.short(mailbox_data, body_bytes)) > wait:
            wait, reason = short, Reason.SEND_BYTES
        address_sends = address_data = None
        if address is not None:
            by_sends, by_data = self.address_sends, self.address_bytes
            address_sends, address_data = by_sends.held(address, now), by_data.held(address, now)
            if (short := by_sends.short(address_sends, 1.0)) > wait:
                wait, reason = short, Reason.SENDS
            if (short := by_data.short(address_data, body_bytes)) > wait:
                wait, reason = short, Reason.SEND_BYTES
        if wait > 0:
            self.refused[reason] += 1
            return reason, wait
        _spend(mailbox_sends, 1.0)
        _spend(mailbox_data, body_bytes)
        _spend(address_sends, 1.0)
        _spend(address_data, body_bytes)
        return None


def _spend(bucket: list[float] | None, cost: float) -> None:
    """Take ``cost`` tokens from a bucket :meth:`Buckets.held` gave (None: no limit), never below zero."""
    if bucket is not None:
        left = bucket[0] - cost
        bucket[0] = left if left > 0 else 0.0


def retry_after_ms(wait_s: float) -> int:
    """A wait in seconds as the wire's ``retry_after_ms``: rounded up, at least 1."""
    return max(1, math.ceil(wait_s * 1000))
