"""Configuration precedence, validation, and the relay-broker command line."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from broker.auth import Authenticator, load_or_create_secret
from broker.cli import main, parse_duration
from broker.config import BrokerConfig, ConfigError


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
    toml.write_text("[broker]\nmax_inflight = 10\nmax_recipients = 5\nkeepalive_s = 30\n")
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
        ({"store": "disk"}, "store must be 'memory'"),
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
    toml.write_text('max_inflight = "many"\n')
    with pytest.raises(ConfigError, match="max_inflight"):
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
    toml.write_text("allowed_origins = [1, 2]\n")
    with pytest.raises(ConfigError, match="allowed_origins must be a list of origins"):
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
    assert len(rows) == 15  # every limit in the table, parsed
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
