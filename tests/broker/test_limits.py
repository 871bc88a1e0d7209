"""The abuse limiter's bucket math and its table bound, on a fake clock (no I/O)."""

from __future__ import annotations

import pytest

from broker.config import BrokerConfig, ConfigError
from broker.limits import Buckets, Limiter, Rate, Reason, retry_after_ms

ADDRESS = "198.51.100.7"
OTHER = "203.0.113.9"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limited(clock: FakeClock, **changes: object) -> Limiter:
    return Limiter(BrokerConfig(rate_exempt_networks=(), **changes), clock=clock)  # type: ignore[arg-type]


def test_a_bucket_spends_its_burst_then_refills_at_its_rate() -> None:
    clock = FakeClock()
    buckets = Buckets(Rate(per_s=2.0, burst=3), 10, clock)
    for _ in range(3):
        assert buckets.wait("a") == 0.0
        buckets.take("a")
    assert buckets.wait("a") == pytest.approx(0.5)
    clock.now += 0.25
    assert buckets.wait("a") == pytest.approx(0.25)
    clock.now += 0.25
    assert buckets.wait("a") == 0.0
    clock.now += 100  # never above the burst
    for _ in range(3):
        buckets.take("a")
    assert buckets.wait("a") > 0


def test_a_cost_above_the_burst_waits_for_a_full_bucket() -> None:
    clock = FakeClock()
    buckets = Buckets(Rate(per_s=10.0, burst=100), 10, clock)
    assert buckets.wait("a", 500) == 0.0
    buckets.take("a", 500)
    assert buckets.wait("a", 1) == pytest.approx(0.1)
    assert buckets.wait("a", 500) == pytest.approx(10.0)


def test_rate_zero_is_no_limit() -> None:
    buckets = Buckets(Rate(per_s=0.0, burst=1), 10, FakeClock())
    for _ in range(1000):
        assert buckets.wait("a") == 0.0
        buckets.take("a")
    assert len(buckets) == 0


def test_the_table_keeps_at_most_its_size_dropping_the_least_recently_used() -> None:
    clock = FakeClock()
    buckets = Buckets(Rate(per_s=1.0, burst=1), 3, clock)
    for key in ("a", "b", "c"):
        buckets.take(key)
    buckets.wait("a")  # used: b is now the least recent
    buckets.take("d")
    assert len(buckets) == 3
    assert buckets.wait("a") > 0  # kept, still empty
    assert buckets.wait("b") == 0.0  # dropped, back full


def test_a_flood_of_distinct_addresses_does_not_grow_the_tables() -> None:
    clock = FakeClock()
    limiter = limited(clock, rate_limit_table_size=50)
    for i in range(5000):
        address = f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}"
        assert limiter.connect(address) is None
        limiter.hello_from(address)
        limiter.send(address, f"m{i}", 10)
        limiter.disconnect(address)
    for table in (limiter.connections, limiter.address_hellos, limiter.address_sends, limiter.mailbox_sends):
        assert len(table) == 50
    assert limiter.open == {}


def test_connections_are_refused_past_the_rate_with_the_wait() -> None:
    clock = FakeClock()
    limiter = limited(clock, address_connections_per_s=1.0, address_connections_burst=2)
    assert limiter.connect(ADDRESS) is None
    assert limiter.connect(ADDRESS) is None
    assert limiter.connect(ADDRESS) == (Reason.CONNECTIONS, pytest.approx(1.0))
    assert limiter.connect(OTHER) is None  # another address has its own bucket
    clock.now += 1
    assert limiter.connect(ADDRESS) is None


def test_open_connections_per_address_are_capped_until_one_closes() -> None:
    limiter = limited(FakeClock(), max_connections_per_address=2)
    assert limiter.connect(ADDRESS) is None
    assert limiter.connect(ADDRESS) is None
    assert limiter.connect(ADDRESS) == (Reason.ADDRESS_CONNECTIONS, 0.0)
    assert limiter.connect(ADDRESS, counted=False) is None  # an HTTP request holds no connection
    limiter.disconnect(ADDRESS)
    assert limiter.connect(ADDRESS) is None
    assert limiter.open == {ADDRESS: 2}


def test_hellos_are_limited_per_address_and_per_mailbox() -> None:
    clock = FakeClock()
    limiter = limited(
        clock, address_hellos_per_s=1.0, address_hellos_burst=3, mailbox_hellos_per_s=0.5, mailbox_hellos_burst=1
    )
    assert limiter.hello_from(ADDRESS) is None
    assert limiter.hello_as(ADDRESS, "alice") is None
    assert limiter.hello_from(ADDRESS) is None
    assert limiter.hello_as(ADDRESS, "alice") == pytest.approx(2.0)  # alice's bucket, whatever the address
    assert limiter.hello_as(OTHER, "alice") == pytest.approx(2.0)
    assert limiter.hello_as(ADDRESS, "bob") is None
    assert limiter.hello_from(ADDRESS) is None
    assert limiter.hello_from(ADDRESS) == pytest.approx(1.0)


def test_a_refused_send_takes_no_tokens_from_any_bucket() -> None:
    clock = FakeClock()
    limiter = limited(
        clock,
        max_frame_bytes=1024,
        max_recipients=3,
        address_sends_per_s=10.0,
        address_sends_burst=5,
        mailbox_sends_per_s=10.0,
        mailbox_sends_burst=100,
        mailbox_send_bytes_per_s=1000,
        mailbox_send_bytes_burst=2000,
    )
    for _ in range(5):
        assert limiter.send(ADDRESS, "alice", 100) is None
    assert limiter.send(ADDRESS, "alice", 100) == (Reason.SENDS, pytest.approx(0.1))
    # alice's mailbox buckets were not charged for the refusal: from another address she has 1500 bytes left
    assert limiter.send(OTHER, "alice", 1000) is None
    assert limiter.send(OTHER, "alice", 1000) == (Reason.SEND_BYTES, pytest.approx(0.5))
    assert limiter.send(OTHER, "alice", 500) is None


def test_the_longest_wait_decides_the_reason() -> None:
    clock = FakeClock()
    limiter = limited(
        clock, max_frame_bytes=1024, max_recipients=3, mailbox_sends_burst=1, mailbox_sends_per_s=100.0,
        mailbox_send_bytes_per_s=100, mailbox_send_bytes_burst=1024,
    )  # fmt: skip
    assert limiter.send(None, "alice", 1024) is None
    assert limiter.send(None, "alice", 1024) == (Reason.SEND_BYTES, pytest.approx(10.24))


def test_exempt_networks_are_not_limited_at_all() -> None:
    limiter = Limiter(
        BrokerConfig(max_connections_per_address=1, address_connections_burst=1, mailbox_sends_burst=1),
        clock=FakeClock(),
    )
    for address in ("127.0.0.1", "127.9.9.9", "::1"):
        for _ in range(3):
            assert limiter.connect(address) is None
            assert limiter.hello_from(address) is None
            assert limiter.hello_as(address, "alice") is None
            assert limiter.send(address, "alice", 10) is None
    assert limiter.open == {}
    assert limiter.connect(ADDRESS) is None
    assert limiter.connect(ADDRESS) == (Reason.ADDRESS_CONNECTIONS, 0.0)
    assert not limiter.exempt("not an address")
    assert not limiter.exempt(None)


def test_no_address_means_only_the_mailbox_limits() -> None:
    limiter = limited(FakeClock(), max_connections_per_address=1, mailbox_sends_burst=1, mailbox_sends_per_s=1.0)
    assert limiter.connect(None) is None
    assert limiter.connect(None) is None
    assert limiter.hello_from(None) is None
    assert limiter.send(None, "alice", 1) is None
    assert limiter.send(None, "alice", 1) == (Reason.SENDS, pytest.approx(1.0))


@pytest.mark.parametrize(("wait", "ms"), [(0.0, 1), (0.0001, 1), (0.001, 1), (0.0011, 2), (1.5, 1500)])
def test_retry_after_is_whole_milliseconds_rounded_up(wait: float, ms: int) -> None:
    assert retry_after_ms(wait) == ms


def test_the_defaults_exempt_loopback_and_are_sane() -> None:
    config = BrokerConfig()
    assert config.rate_exempt_networks == ("127.0.0.0/8", "::1/128")
    assert config.address_send_bytes_burst >= config.max_frame_bytes
    assert config.mailbox_send_bytes_burst >= config.max_frame_bytes
    assert config.max_connections_per_address <= config.max_connections


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"address_sends_per_s": -1.0}, "address_sends_per_s must not be negative"),
        ({"mailbox_hellos_burst": 0}, "mailbox_hellos_burst must be at least 1"),
        ({"max_connections_per_address": 0}, "max_connections_per_address must be positive"),
        ({"rate_limit_table_size": 0}, "rate_limit_table_size must be positive"),
        ({"rate_exempt_networks": ("localhost",)}, "is not a network like"),
        ({"mailbox_send_bytes_burst": 1000}, "mailbox_send_bytes_burst must be at least max_frame_bytes"),
        ({"address_send_bytes_burst": 1000}, "address_send_bytes_burst must be at least max_frame_bytes"),
    ],
)
def test_rate_limit_settings_are_checked(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BrokerConfig(**changes)  # type: ignore[arg-type]


def test_rate_limit_settings_live_in_their_table() -> None:
    config = BrokerConfig.from_toml(
        "[broker.rate_limits]\nrate_exempt_networks = []\naddress_sends_per_s = 5\nmailbox_sends_burst = 7\n",
        source="t",
    )
    assert (config.rate_exempt_networks, config.address_sends_per_s, config.mailbox_sends_burst) == ((), 5.0, 7)
    with pytest.raises(ConfigError, match=r"belongs in \[broker.rate_limits\]"):
        BrokerConfig.from_toml("[broker.limits]\nmailbox_sends_burst = 7\n", source="t")
    env = BrokerConfig.load(environ={"RELAY_RATE_EXEMPT_NETWORKS": "", "RELAY_ADDRESS_HELLOS_PER_S": "0.5"})
    assert (env.rate_exempt_networks, env.address_hellos_per_s) == ((), 0.5)
