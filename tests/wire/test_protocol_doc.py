"""protocol.md's limits, state and statistics tables against the design decisions and the code."""

from __future__ import annotations

import re

from wire import DEFAULT_MAX_FRAME_BYTES, PROTOCOL_VERSION

from .support import section

# Every limit the design decisions (relay-spec.md) name, with its default. The broker's
# config is checked against the same table of protocol.md elsewhere.
SPEC_LIMITS = {
    "max_frame_bytes": 1_048_576,
    "max_inflight": 4096,
    "max_recipients": 100,
    "default_ttl_s": 604_800,
    "max_ttl_s": 2_592_000,
    "max_mailbox_messages": 100_000,
    "max_mailbox_bytes": 67_108_864,
    "max_total_bytes": 1_073_741_824,
    "max_tombstones": 100_000,
    "max_mailbox_statuses": 10_000,
    "key_ttl_s": 7_776_000,
    "token_leeway_s": 60,
    "handshake_timeout_s": 10,
    "keepalive_s": 60,
    "max_outbound_bytes": 8_388_608,
    "max_connections": 65_536,
    "cleanup_interval_s": 3600,
    # the abuse limits (rule 21)
    "max_connections_per_address": 1024,
    "address_connections_per_s": 20,
    "address_connections_burst": 200,
    "address_hellos_per_s": 20,
    "address_hellos_burst": 200,
    "mailbox_hellos_per_s": 2,
    "mailbox_hellos_burst": 30,
    "address_sends_per_s": 2000,
    "address_sends_burst": 10_000,
    "mailbox_sends_per_s": 1000,
    "mailbox_sends_burst": 5000,
    "address_send_bytes_per_s": 33_554_432,
    "address_send_bytes_burst": 134_217_728,
    "mailbox_send_bytes_per_s": 16_777_216,
    "mailbox_send_bytes_burst": 67_108_864,
    "rate_limit_table_size": 100_000,
}

SPEC_STATS = (
    "messages_total messages_deliverable messages_expired_unswept acknowledged_total online_users "
    "unique_recipients queued_bytes sent_total delivered_total redelivered_total expired_total "
    "duplicates_total refused_total refused_mailbox_full refused_mailbox_bytes_full refused_broker_full "
    "refused_too_many_recipients refused_id_conflict refused_invalid_recipient refused_body_too_large "
    "refused_rate_limited "
    "connections inflight tombstones store_round_trips store_available store_errors_total "
    "statuses_held statuses_total statuses_overflowed_total statuses_expired_total statuses_delivered_total "
    "statuses_acked_total statuses_lost_total keys_put_total keys_put_refused_total key_lookups_total "
    "tokens_refreshed_total sessions_expired_total "
    "rate_limited_connections_total rate_limited_address_connections_total rate_limited_hellos_total "
    "rate_limited_sends_total rate_limited_send_bytes_total"
).split()

LIMIT_ROW = re.compile(r"^\|\s*`([a-z_]+)`\s*\|\s*([0-9][0-9_,]*)\s*\|", re.M)


def documented_limits(doc: str) -> dict[str, int]:
    rows = LIMIT_ROW.findall(section(doc, "8. Limits"))
    limits = {name: int(value.replace(",", "").replace("_", "")) for name, value in rows}
    assert len(limits) == len(rows), "a limit is listed twice"
    return limits


def test_every_spec_limit_is_in_the_limits_table_with_its_default(protocol_md: str) -> None:
    assert documented_limits(protocol_md) == SPEC_LIMITS


def test_frame_size_default_matches_the_codec(protocol_md: str) -> None:
    assert documented_limits(protocol_md)["max_frame_bytes"] == DEFAULT_MAX_FRAME_BYTES


def test_welcome_announces_the_documented_limits(protocol_md: str) -> None:
    welcome = section(section(protocol_md, "6. Frames"), "`welcome`")
    for name in ("max_frame_bytes", "max_inflight", "max_recipients", "default_ttl_s", "max_ttl_s", "keepalive_s"):
        assert f"| `{name}` |" in welcome
        assert name in SPEC_LIMITS


def test_stats_table_lists_exactly_the_spec_keys(protocol_md: str) -> None:
    rows = re.findall(r"^\|\s*`([a-z_]+)`\s*\|", section(protocol_md, "10. Statistics"), re.M)
    assert rows == SPEC_STATS


def test_document_states_the_protocol_version(protocol_md: str) -> None:
    assert protocol_md.startswith(f"# Relay protocol, version {PROTOCOL_VERSION}\n")
