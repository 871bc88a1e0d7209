"""Configuration precedence, validation, and the relay-broker command line."""

from __future__ import annotations

import re
import socket
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

import pytest

from broker.auth import Authenticator, load_or_create_secret
from broker.backend import redacted
from broker.cli import main, parse_duration
from broker.config import BROKER, LIMITS, RATE_LIMITS, STORE, BrokerConfig, ConfigError
from broker.store.base import StoreLimits


def test_defaults_match_the_documented_limits() -> None:
    c = BrokerConfig()
    assert (c.host, c.tcp_port, c.max_frame_bytes, c.max_inflight, c.max_recipients) == (
        "127.0.0.1",
        7700,
        1048576,
        4096,
        100,
    )
    assert (c.default_ttl_s, c.max_ttl_s, c.cleanup_interval_s, c.keepalive_s) == (604800, 2592000, 3600, 60)


def test_precedence_defaults_toml_environment_flags(tmp_path: Path) -> None:
    toml = tmp_path / "relay.toml"
    toml.write_text("[broker]\nkeepalive_s = 30\n[broker.limits]\nmax_inflight = 10\nmax_recipients = 5\n")
    config = BrokerConfig.load(
        toml_path=toml,
        environ={"RELAY_MAX_RECIPIENTS": "6", "RELAY_KEEPALIVE_S": "20", "UNRELATED": "x"},
        overrides={"keepalive_s": "15"},
    )
    assert (config.max_inflight, config.max_recipients, config.keepalive_s) == (10, 6, 15.0)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_inflight": "0"}, "max_inflight must be positive"),
        ({"max_inflight": "ten"}, "max_inflight must be of type int"),
        ({"no_such_setting": "1"}, "unknown setting"),
        ({"store": "disk"}, "store must be 'memory' or a Redis URL"),
        ({"store": "redis://h:99999/0"}, "store must be 'memory' or a Redis URL .*bad port"),
        ({"store": "redis://a:1,b:2"}, "store must be .*use redis\\+cluster://"),
        ({"store_prefix": "a b"}, "store_prefix must be 1-64 letters"),
        ({"node_id": "node/1"}, "node_id must be 1-64 letters"),
        ({"presence_lease_s": "0"}, "presence_lease_s must be positive"),
        ({"tcp_port": "70000"}, "tcp_port must be 0-65535"),
        ({"default_ttl_s": "100", "max_ttl_s": "50"}, "default_ttl_s must not exceed max_ttl_s"),
        ({"max_outbound_bytes": "1048576"}, "max_outbound_bytes must be at least 4 \\* max_frame_bytes"),
    ],
)
def test_bad_values_are_refused_with_a_clear_message(values: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BrokerConfig.load(environ={}, overrides=values)


def test_toml_with_a_wrong_type_is_refused(tmp_path: Path) -> None:
    toml = tmp_path / "relay.toml"
    toml.write_text('[broker.limits]\nmax_inflight = "many"\n')
    with pytest.raises(ConfigError, match="max_inflight must be of type int, not 'many'"):
        BrokerConfig.load(toml_path=toml, environ={})


def test_print_config_shows_the_effective_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--print-config", "--max-inflight", "77", "--log-level", "WARNING"]) == 0
    out = capsys.readouterr().out
    assert "max_inflight = 77\n" in out and out.startswith("[broker]\n")


def test_bad_flag_value_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--max-inflight", "-3", "--print-config"]) == 2
    assert "max_inflight must be positive" in capsys.readouterr().err


def test_token_command_signs_with_the_data_dir_secret(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "alice", "--data-dir", str(tmp_path), "--expires-in", "2h"]) == 0
    token = capsys.readouterr().out.strip()
    identity = Authenticator(load_or_create_secret(tmp_path)).verify(token)
    assert (identity.name, identity.operator) == ("alice", False)
    assert (tmp_path / "secret").stat().st_mode & 0o777 == 0o600
    assert main(["token", "ops", "--operator", "--data-dir", str(tmp_path)]) == 0
    assert Authenticator(load_or_create_secret(tmp_path)).verify(capsys.readouterr().out.strip()).operator
    assert main(["token", "not a mailbox", "--data-dir", str(tmp_path)]) == 2


def test_durations() -> None:
    assert [parse_duration(t) for t in ("90", "90s", "15m", "12h", "30d")] == [90, 90, 900, 43200, 2592000]
    with pytest.raises(Exception, match="not a duration"):
        parse_duration("soon")


@pytest.mark.parametrize(
    ("ports", "message"),
    [
        ({"tcp_port": 7000, "ws_port": 7000, "http_port": 7001}, "tcp_port and ws_port are both 7000"),
        ({"tcp_port": 7000, "ws_port": 7001, "http_port": 7000}, "tcp_port and http_port are both 7000"),
        ({"tcp_port": 7002, "ws_port": 7000, "http_port": 7000}, "ws_port and http_port are both 7000"),
    ],
)
def test_two_listeners_on_one_port_are_refused(ports: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigError, match=f"{message}: each listener needs its own port"):
        BrokerConfig(**ports)


def test_port_zero_may_be_shared_because_each_listener_picks_a_free_port() -> None:
    config = BrokerConfig(tcp_port=0, ws_port=0, http_port=0)
    assert (config.tcp_port, config.ws_port, config.http_port) == (0, 0, 0)


def test_the_default_ports_are_distinct() -> None:
    c = BrokerConfig()
    assert len({c.tcp_port, c.ws_port, c.http_port}) == 3


def test_a_port_clash_from_a_flag_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--ws-port", "7780", "--print-config"]) == 2  # 7780 is the default HTTP port
    assert "ws_port and http_port are both 7780" in capsys.readouterr().err


def test_allowed_origins_from_a_toml_array(tmp_path: Path) -> None:
    toml = tmp_path / "relay.toml"
    toml.write_text('[broker]\nallowed_origins = ["https://chat.example.org", "http://localhost:8080/"]\n')
    config = BrokerConfig.load(toml_path=toml, environ={})
    assert config.allowed_origins == ("https://chat.example.org", "http://localhost:8080")  # trailing "/" dropped
    assert 'allowed_origins = ["https://chat.example.org", "http://localhost:8080"]' in config.to_toml()


def test_allowed_origins_from_comma_separated_environment_and_flags() -> None:
    env = {"RELAY_ALLOWED_ORIGINS": " https://a.example , https://b.example:8443,"}
    assert BrokerConfig.load(environ=env).allowed_origins == ("https://a.example", "https://b.example:8443")
    flags = {"allowed_origins": "http://[::1]:8080,https://c.example"}
    assert BrokerConfig.load(environ=env, overrides=flags).allowed_origins == ("http://[::1]:8080", "https://c.example")


def test_allowed_origins_flag_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--allowed-origins", "https://x.example,https://y.example", "--print-config"]) == 0
    assert 'allowed_origins = ["https://x.example", "https://y.example"]\n' in capsys.readouterr().out


@pytest.mark.parametrize(
    "origin",
    [
        "chat.example.org",  # no scheme
        "ftp://chat.example.org",
        "https://chat.example.org/path",
        "https://user@chat.example.org",
        "https://chat.example.org:port",
        "*",
        "null",
    ],
)
def test_bad_origins_are_refused(origin: str) -> None:
    with pytest.raises(ConfigError, match=r"is not an origin like https://example\.org"):
        BrokerConfig.load(environ={"RELAY_ALLOWED_ORIGINS": f"https://ok.example,{origin}"})


def test_allowed_origins_of_the_wrong_type_are_refused(tmp_path: Path) -> None:
    toml = tmp_path / "relay.toml"
    toml.write_text("[broker]\nallowed_origins = [1, 2]\n")
    with pytest.raises(
        ConfigError, match=r"allowed_origins must be a list of strings \(or one comma-separated string\), not \[1, 2\]"
    ):
        BrokerConfig.load(toml_path=toml, environ={})


@pytest.mark.parametrize("listener", ["tcp", "ws", "http"])
def test_serve_names_the_address_it_cannot_listen_on(
    listener: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        ports = {"tcp": "0", "ws": "0", "http": "0", listener: str(port)}
        argv = ["serve", "--data-dir", str(tmp_path), "--log-level", "ERROR"]
        for name, value in ports.items():
            argv += [f"--{name}-port", value]
        assert main(argv) == 1
    assert f"cannot listen on {listener}://127.0.0.1:{port}: " in capsys.readouterr().err


def test_protocol_md_limits_table_matches_the_broker_defaults() -> None:
    """Every row of protocol.md's limits table (section 8) states the broker's real default."""
    text = (Path(__file__).parents[2] / "protocol.md").read_text()
    section = text[text.index("## 8. Limits") : text.index("## 9. Semantics")]
    rows = re.findall(r"^\| `(\w+)` \| (\d+) \|", section, flags=re.MULTILINE)
    defaults = BrokerConfig()
    assert len(rows) == 33  # every limit in the table, parsed
    for name, value in rows:
        assert getattr(defaults, name) == int(value), name


def test_serve_help_lists_every_setting_with_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in BrokerConfig.field_names():
        flag = "--" + name.replace("_", "-")
        match = re.search(re.escape(flag) + r" [A-Z]+ (\S.*?)\(default: ", text)
        assert match, f"{flag} is not listed with its help"
        assert len(match.group(1).split()) >= 3, f"{flag} has no real help text"


@pytest.mark.parametrize(
    ("frame", "recipients", "fits"), [(1024, 3, True), (1024, 4, False), (1_048_576, 100, True), (4096, 14, True)]
)
def test_max_recipients_must_leave_room_for_the_largest_receipt(frame: int, recipients: int, fits: bool) -> None:
    """A RECEIPT echoes each recipient (up to 64 code points, 282 bytes with its result): it must fit a frame."""
    if fits:
        BrokerConfig(max_frame_bytes=frame, max_recipients=recipients)
    else:
        with pytest.raises(ConfigError, match="at most 3 recipients fit"):
            BrokerConfig(max_frame_bytes=frame, max_recipients=recipients)


def test_metrics_open_networks_are_networks() -> None:
    assert BrokerConfig().metrics_open_networks == ("127.0.0.0/8", "::1/128")
    assert BrokerConfig.load(environ={"RELAY_METRICS_OPEN_NETWORKS": "10.0.0.0/8,fd00::/8"}).metrics_open_networks == (
        "10.0.0.0/8",
        "fd00::/8",
    )
    assert BrokerConfig.load(environ={"RELAY_METRICS_OPEN_NETWORKS": ""}).metrics_open_networks == ()
    with pytest.raises(ConfigError, match="is not a network like"):
        BrokerConfig(metrics_open_networks=("10.0.0.1/8",))


def test_toml_is_read_by_section(tmp_path: Path) -> None:
    toml = tmp_path / "relay.toml"
    toml.write_text(
        '[broker]\nhost = "::1"\nkeepalive_s = 5\n'
        "[broker.limits]\nmax_inflight = 7\nmax_tombstones = 0\n"
        '[broker.store]\nstore = "memory"\n'
    )
    config = BrokerConfig.load(toml_path=toml, environ={})
    assert (config.host, config.keepalive_s, config.max_inflight, config.max_tombstones) == ("::1", 5.0, 7, 0)
    assert config.store == "memory"


def test_each_setting_has_its_section() -> None:
    """Config files depend on where each setting lives (README, "Configuration")."""
    sections = {name: [s.name for s in settings] for name, settings in BrokerConfig.sections().items()}
    assert sections == {
        BROKER: [
            "host", "tcp_port", "ws_port", "http_port", "listeners", "tls_port", "wss_port", "https_port",
            "tls_cert_file", "tls_key_file", "allowed_origins", "metrics_open_networks", "data_dir", "token_leeway_s",
            "token_keys_dir", "token_jwks_file", "handshake_timeout_s", "keepalive_s", "cleanup_interval_s",
            "shutdown_grace_s", "log_level", "log_format",
        ],
        LIMITS: [
            "max_frame_bytes", "max_recipients", "max_inflight", "max_outbound_bytes", "max_connections",
            "default_ttl_s", "max_ttl_s", "max_mailbox_messages", "max_mailbox_bytes", "max_total_bytes",
            "max_tombstones", "max_mailbox_statuses", "key_ttl_s",
        ],
        STORE: ["store", "store_prefix", "node_id", "presence_lease_s"],
        RATE_LIMITS: [
            "rate_exempt_networks", "max_connections_per_address", "address_connections_per_s",
            "address_connections_burst", "address_hellos_per_s", "address_hellos_burst", "mailbox_hellos_per_s",
            "mailbox_hellos_burst", "address_sends_per_s", "address_sends_burst", "mailbox_sends_per_s",
            "mailbox_sends_burst", "address_send_bytes_per_s", "address_send_bytes_burst", "mailbox_send_bytes_per_s",
            "mailbox_send_bytes_burst", "rate_limit_table_size",
        ],
    }  # fmt: skip


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[broker]\nmax_inflight = 10\n", r"max_inflight belongs in \[broker.limits\], not in \[broker\]"),
        ("max_inflight = 10\n", r"max_inflight belongs in \[broker.limits\], not in the top level"),
        ('[broker.limits]\nhost = "::1"\n', r"host belongs in \[broker\], not in \[broker.limits\]"),
        ('[broker]\nstore = "memory"\n', r"store belongs in \[broker.store\], not in \[broker\]"),
        (
            "[broker.store]\nmax_tombstones = 3\n",
            r"max_tombstones belongs in \[broker.limits\], not in \[broker.store\]",
        ),
        ("[broker.limits]\nmax_inflights = 10\n", r"unknown setting 'max_inflights' in \[broker.limits\]"),
        ('[broker.tls]\ncertfile = "c.pem"\n', r"unknown table 'tls' in \[broker\]"),
        ("[client]\nx = 1\n", r"unknown table 'client' in the top level"),
        ("[broker\n", r"relay.toml: "),  # not TOML
    ],
)
def test_a_setting_in_the_wrong_table_is_refused_naming_the_right_one(tmp_path: Path, text: str, message: str) -> None:
    toml = tmp_path / "relay.toml"
    toml.write_text(text)
    with pytest.raises(ConfigError, match=message):
        BrokerConfig.load(toml_path=toml, environ={})


def test_print_config_reads_back_to_the_same_configuration(tmp_path: Path) -> None:
    config = BrokerConfig(
        data_dir=tmp_path / 'a "quoted" \\ dir\twith tab é 🙂',
        allowed_origins=("https://a.example", "http://[::1]:8080"),
        max_inflight=3,
        keepalive_s=1.5,
        max_tombstones=0,
        node_id="node-1",  # every setting printed: an optional one only when set
        tls_cert_file=tmp_path / "cert.pem",
        tls_key_file=tmp_path / "key.pem",
        token_keys_dir=tmp_path / "issuer keys",
        token_jwks_file=tmp_path / "issuer.jwks.json",
    )
    printed = config.to_toml()
    assert BrokerConfig.from_toml(printed, source="printed") == config
    document = tomllib.loads(printed)
    for setting in BrokerConfig.settings():
        table = document
        for part in setting.section.split("."):
            table = table[part]
        assert setting.name in table, f"{setting.name} is not printed in [{setting.section}]"


def test_print_config_prints_by_section(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--print-config", "--max-inflight", "9"]) == 0
    out = capsys.readouterr().out
    headers = [line for line in out.splitlines() if line.startswith("[")]
    assert headers == ["[broker]", "[broker.limits]", "[broker.rate_limits]", "[broker.store]"]
    limits = out[out.index("[broker.limits]") : out.index("[broker.rate_limits]")]
    assert "\nmax_inflight = 9\n" in limits and "\n# Un-ACKed deliveries outstanding per connection.\n" in limits


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"host": ""}, "host must not be empty"),
        ({"max_frame_bytes": "1023"}, "max_frame_bytes must be at least 1024 and at most 16777216"),
        ({"max_frame_bytes": str(16 * 1024 * 1024 + 1)}, "max_frame_bytes must be at least 1024 and at most"),
        ({"shutdown_grace_s": "-1"}, "shutdown_grace_s must not be negative"),
        ({"token_leeway_s": "-0.5"}, "token_leeway_s must not be negative"),
        ({"max_tombstones": "-1"}, "max_tombstones must not be negative"),
        ({"keepalive_s": "nan"}, "keepalive_s must be positive"),
        ({"keepalive_s": "soon"}, "keepalive_s must be of type float, not 'soon'"),
        ({"max_connections": "1.5"}, "max_connections must be of type int"),
        ({"http_port": "-1"}, "http_port must be 0-65535"),
        ({"max_recipients": "0"}, "max_recipients must be positive"),
    ],
)
def test_every_value_is_checked(values: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BrokerConfig.load(environ={}, overrides=values)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tcp_port": "7700"}, "tcp_port must be of type int, not '7700'"),
        ({"max_inflight": True}, "max_inflight must be of type int, not True"),
        ({"keepalive_s": False}, "keepalive_s must be of type float"),
        ({"data_dir": "/tmp/relay"}, "data_dir must be of type Path"),
        ({"allowed_origins": "https://a.example"}, "allowed_origins must be a list of strings"),
        ({"host": None}, "host must be of type str, not None"),
    ],
)
def test_keyword_arguments_are_checked_by_their_annotation(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BrokerConfig(**changes)  # type: ignore[arg-type]


def test_keyword_arguments_are_tidied_to_their_annotation() -> None:
    config = BrokerConfig(keepalive_s=2, allowed_origins=["https://a.example/"])  # type: ignore[arg-type]
    assert type(config.keepalive_s) is float and config.allowed_origins == ("https://a.example",)


def test_store_limit_defaults_are_the_store_s_own() -> None:
    """StoreLimits (broker/store/base.py) writes these defaults; the config takes them from there."""
    assert BrokerConfig().store_limits == StoreLimits()
    limits = {s.name for s in BrokerConfig.sections()[LIMITS]}
    assert {f.name for f in fields(StoreLimits)} <= limits


def test_store_limits_follow_the_settings() -> None:
    config = BrokerConfig(
        max_mailbox_messages=5, max_mailbox_bytes=6, max_total_bytes=7, max_tombstones=8, max_mailbox_statuses=9
    )
    assert config.store_limits == StoreLimits(
        max_mailbox_messages=5, max_mailbox_bytes=6, max_total_bytes=7, max_tombstones=8, max_mailbox_statuses=9
    )


# A config class with the kinds of settings the next issues add, to show optional values work end to end.
@dataclass(frozen=True, kw_only=True)
class FutureConfig(BrokerConfig):
    tls_certfile: Path | None = field(default=None, metadata={"section": "broker.tls"})
    """PEM certificate chain; TLS is off when it is not set."""
    metrics_port: int | None = field(default=None, metadata={"section": "broker.metrics"})
    """Prometheus port; no metrics listener when it is not set."""
    metrics_labels: tuple[str, ...] | None = field(default=None, metadata={"section": "broker.metrics"})
    """Labels added to every metric."""


def test_optional_settings_from_toml(tmp_path: Path) -> None:
    toml = tmp_path / "relay.toml"
    toml.write_text(
        '[broker.tls]\ntls_certfile = "~/relay/cert.pem"\n'
        '[broker.metrics]\nmetrics_port = 9100\nmetrics_labels = ["node=a", "dc=x"]\n'
    )
    config = FutureConfig.load(toml_path=toml, environ={})
    assert config.tls_certfile == Path.home() / "relay" / "cert.pem"
    assert (config.metrics_port, config.metrics_labels) == (9100, ("node=a", "dc=x"))
    assert FutureConfig.load(environ={}).tls_certfile is None


def test_optional_settings_from_the_environment_and_flags() -> None:
    env = {"RELAY_METRICS_PORT": "9_101", "RELAY_TLS_CERTFILE": "/etc/relay/cert.pem", "RELAY_METRICS_LABELS": "a,b"}
    config = FutureConfig.load(environ=env)
    assert (config.metrics_port, config.tls_certfile, config.metrics_labels) == (
        9101,
        Path("/etc/relay/cert.pem"),
        ("a", "b"),
    )
    unset = FutureConfig.load(environ=env, overrides={"metrics_port": "", "tls_certfile": "", "metrics_labels": ""})
    assert (unset.metrics_port, unset.tls_certfile, unset.metrics_labels) == (None, None, None)
    with pytest.raises(ConfigError, match="command line: metrics_port must be of type int, not 'x'"):
        FutureConfig.load(environ={}, overrides={"metrics_port": "x"})
    with pytest.raises(ConfigError, match="metrics_port must be of type int, not '9100'"):
        FutureConfig(metrics_port="9100")  # type: ignore[arg-type]


def test_toml_output_leaves_out_settings_that_are_none() -> None:
    printed = FutureConfig(metrics_port=9100).to_toml()
    assert "None" not in printed
    assert "# tls_certfile is not set\n" in printed and "# metrics_labels is not set\n" in printed
    document = tomllib.loads(printed)
    assert document["broker"]["metrics"] == {"metrics_port": 9100}
    assert "tls" in document["broker"] and document["broker"]["tls"] == {}
    assert FutureConfig.from_toml(printed, source="printed") == FutureConfig(metrics_port=9100)


def test_a_setting_of_an_unsupported_type_is_a_programming_error() -> None:
    @dataclass(frozen=True, kw_only=True)
    class Odd(BrokerConfig):
        either: int | str = field(default=1, metadata={"section": BROKER})

    with pytest.raises(TypeError, match=re.escape("a setting is X or X | None, not int | str")):
        Odd()


# Every flag the broker had before settings had sections (issue 9), the Redis store's (issue 10), the key
# directory's (issue 13) and the token issuer's keys (issue 11): each must keep working.
TODAYS_FLAGS = {
    "--host": "::1",
    "--tcp-port": "7001",
    "--ws-port": "7002",
    "--http-port": "7003",
    "--listeners": "tcp,tls,wss",
    "--tls-port": "7004",
    "--wss-port": "7005",
    "--https-port": "7006",
    "--tls-cert-file": "/tmp/relay-flags/cert.pem",
    "--tls-key-file": "/tmp/relay-flags/key.pem",
    "--allowed-origins": "https://a.example",
    "--metrics-open-networks": "10.0.0.0/8",
    "--data-dir": "/tmp/relay-flags",
    "--store": "memory",
    "--store-prefix": "relay-a",
    "--node-id": "node-1",
    "--presence-lease-s": "9.5",
    "--max-frame-bytes": "2048",
    "--rate-exempt-networks": "10.0.0.0/8,::1/128",
    "--max-connections-per-address": "11",
    "--address-connections-per-s": "1.5",
    "--address-connections-burst": "12",
    "--address-hellos-per-s": "2.5",
    "--address-hellos-burst": "13",
    "--mailbox-hellos-per-s": "0.5",
    "--mailbox-hellos-burst": "14",
    "--address-sends-per-s": "15.5",
    "--address-sends-burst": "16",
    "--mailbox-sends-per-s": "17.5",
    "--mailbox-sends-burst": "18",
    "--address-send-bytes-per-s": "4096",
    "--address-send-bytes-burst": "8192",
    "--mailbox-send-bytes-per-s": "2048",
    "--mailbox-send-bytes-burst": "4096",
    "--rate-limit-table-size": "19",
    "--max-inflight": "8",
    "--max-recipients": "3",
    "--default-ttl-s": "60",
    "--max-ttl-s": "120",
    "--max-mailbox-messages": "9",
    "--max-mailbox-bytes": "10000",
    "--max-total-bytes": "20000",
    "--max-tombstones": "11",
    "--max-mailbox-statuses": "13",
    "--key-ttl-s": "14",
    "--token-leeway-s": "1.5",
    "--token-keys-dir": "/etc/relay/issuer-keys",
    "--token-jwks-file": "/etc/relay/issuer.jwks.json",
    "--handshake-timeout-s": "2.5",
    "--keepalive-s": "3.5",
    "--max-outbound-bytes": "65536",
    "--max-connections": "12",
    "--cleanup-interval-s": "4.5",
    "--shutdown-grace-s": "0.5",
    "--log-level": "WARNING",
    "--log-format": "json",
}


def test_every_setting_has_todays_flag_and_environment_variable(capsys: pytest.CaptureFixture[str]) -> None:
    assert sorted(s.flag for s in BrokerConfig.settings()) == sorted(TODAYS_FLAGS)  # and issue 10's store settings
    argv = [item for pair in TODAYS_FLAGS.items() for item in pair]
    assert main(["serve", *argv, "--print-config"]) == 0
    from_flags = BrokerConfig.from_toml(capsys.readouterr().out, source="printed")
    env = {"RELAY_" + flag[2:].replace("-", "_").upper(): value for flag, value in TODAYS_FLAGS.items()}
    assert BrokerConfig.load(environ=env) == from_flags
    assert (from_flags.host, from_flags.max_inflight, from_flags.shutdown_grace_s) == ("::1", 8, 0.5)


def test_serve_help_groups_the_settings_by_section(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    for section, settings in BrokerConfig.sections().items():
        group = text.split(f"\n[{section}] settings:\n")[1].split("\n\n")[0]
        listed = re.findall(r"^  (--[a-z-]+)", group, flags=re.MULTILINE)
        assert listed == [s.flag for s in settings], section


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "rediss://cache.example.org:6380/2",
        "redis+cluster://10.0.0.1:7000,10.0.0.2:7000",
        "rediss+cluster://10.0.0.1:7000",
    ],
)
def test_a_redis_store_url_is_accepted_from_a_flag(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--store", url, "--store-prefix", "chat", "--print-config"]) == 0
    printed = BrokerConfig.from_toml(capsys.readouterr().out, source="printed")
    assert (printed.store, printed.store_prefix, printed.node_id) == (url, "chat", None)


def test_serve_says_when_the_redis_store_cannot_be_reached(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: connections are refused
        url = f"redis://relay:s3cret@127.0.0.1:{port}/0"
        argv = ["serve", "--data-dir", str(tmp_path), "--log-level", "ERROR", "--store", url]
        argv += ["--tcp-port", "0", "--ws-port", "0", "--http-port", "0"]
        assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"relay-broker: cannot reach the Redis store at redis://relay:***@127.0.0.1:{port}/0: " in err
    assert "s3cret" not in err


def test_a_store_url_is_shown_without_its_password() -> None:
    assert redacted("rediss://app:pw@r.example:6380/1") == "rediss://app:***@r.example:6380/1"
    assert redacted("redis+cluster://a:1,b:2") == "redis+cluster://a:1,b:2"
    assert redacted("memory") == "memory"
