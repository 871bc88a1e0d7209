"""Broker configuration: one typed object, from defaults, a TOML file, the environment and flags.

Theory of operation: ``BrokerConfig`` is a frozen dataclass and each field is one setting. Three things about a
field make it a setting, each written once, on the field:

- its **annotation** decides how a value is read: ``_KINDS`` maps the annotation object itself (``int``, ``float``,
  ``str``, ``Path``, ``tuple[str, ...]``; ``X | None`` of any of them) to how text from the environment or a flag
  becomes a value, which TOML values it accepts and how it is printed back;
- its **metadata** (``_in(section, check)``) names the TOML table it lives in (``[broker]``, ``[broker.limits]``,
  ``[broker.store]``) and the rule its value keeps; rules between settings are in ``_check_together``;
- the **docstring** under it is its help: the first paragraph is the one line ``serve --help`` and
  ``--print-config`` show.

Attribute access is flat (``config.max_frame_bytes``) whatever the section. Every value is checked when the object is
made, however it is made (``BrokerConfig(...)``, ``replace``, ``load``), and raises ConfigError.

Precedence, lowest first: the defaults below, ``--config FILE`` (TOML: each setting in its own section's table; a
setting in another table is refused, naming the right one), environment variables ``RELAY_<NAME>`` (upper case),
then command-line flags ``--name-with-dashes``. An empty string from the environment or a flag sets an optional
(``X | None``) setting to None; TOML has no None, so ``relay-broker serve --print-config`` (the effective settings as
TOML, by section) leaves such a setting out and says so in a comment.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import os
import re
import textwrap
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Self

from wire import DEFAULT_MAX_FRAME_BYTES, max_recipients_within, receipt_bound_bytes

from .logs import LOG_FORMATS, LOG_LEVELS
from .store.base import StoreLimits

__all__ = [
    "BROKER",
    "LARGEST_MAX_FRAME_BYTES",
    "LIMITS",
    "LISTENERS",
    "RATE_LIMITS",
    "STORE",
    "BrokerConfig",
    "ConfigError",
    "Setting",
    "default_data_dir",
]

BROKER = "broker"
"""The TOML table of listeners, timeouts and the data directory."""
LIMITS = "broker.limits"
"""The TOML table of what a client may send and what the broker holds (every ``max_*`` and ``default_ttl_s``)."""
STORE = "broker.store"
"""The TOML table of the message store."""
RATE_LIMITS = "broker.rate_limits"
"""The TOML table of the abuse limits: token buckets per source address and per mailbox (:mod:`broker.limits`)."""

LARGEST_MAX_FRAME_BYTES = 16 * 1024 * 1024
"""The largest ``max_frame_bytes`` the broker accepts (16 MiB), so the largest a client may be told in WELCOME."""

_STORE_DEFAULTS = StoreLimits()  # the store limits' defaults are written there, once


class ConfigError(ValueError):
    """A configuration value is unknown, in the wrong section, of the wrong type, or out of range."""


def default_data_dir() -> Path:
    """$RELAY_DATA_DIR, else $XDG_DATA_HOME/relay, else ~/.local/share/relay."""
    if env := os.environ.get("RELAY_DATA_DIR"):
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "relay"


# --- rules a single value keeps: each returns what is wrong with the value, or None -------------------------------

Check = Callable[[Any], str | None]


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be positive"


def _not_negative(value: float) -> str | None:
    return None if value >= 0 else "must not be negative"


def _at_least_one(value: float) -> str | None:
    return None if value >= 1 else "must be at least 1"


def _port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else "must be 0-65535"


def _not_empty(value: str) -> str | None:
    return None if value else "must not be empty"


def _frame_size(value: int) -> str | None:
    if 1024 <= value <= LARGEST_MAX_FRAME_BYTES:
        return None
    return f"must be at least 1024 and at most {LARGEST_MAX_FRAME_BYTES}"


def _store_name(value: str) -> str | None:
    if value == "memory":
        return None
    from .redis_client import parse_redis_url  # the one Redis URL rule; loads coredis only for a Redis store

    try:
        parse_redis_url(value)
    except ValueError as exc:
        return f"must be 'memory' or a Redis URL (redis://, rediss://, redis+cluster://): {exc}"
    return None


_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def _key_prefix(value: str) -> str | None:
    return None if _NAME.fullmatch(value) else "must be 1-64 letters, digits, '_', '.' or '-'"


def _node_name(value: str | None) -> str | None:
    return None if value is None or _NAME.fullmatch(value) else "must be 1-64 letters, digits, '_', '.' or '-'"


_ORIGIN = re.compile(r"https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


LISTENERS = ("tcp", "ws", "http", "tls", "wss", "https")
"""Every listener the broker can serve, by the URL scheme a client uses for it."""
TLS_LISTENERS = frozenset({"tls", "wss", "https"})


def _listener_names(value: tuple[str, ...]) -> str | None:
    if not value:
        return "must name at least one listener"
    for name in value:
        if name not in LISTENERS:
            return f"{name!r} is not a listener (one of {', '.join(LISTENERS)})"
    if len(set(value)) != len(value):
        return "names a listener twice"
    return None


def _origins(value: tuple[str, ...]) -> str | None:
    for origin in value:
        if not _ORIGIN.fullmatch(origin):
            return f"{origin!r} is not an origin like https://example.org[:port]"
    return None


def _networks(value: tuple[str, ...]) -> str | None:
    import ipaddress

    for network in value:
        try:
            ipaddress.ip_network(network)
        except ValueError as exc:
            return f"{network!r} is not a network like 127.0.0.0/8 or ::1/128 ({exc})"
    return None


def _one_of(choices: tuple[str, ...]) -> Check:
    def check(value: str) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}, not {value!r}"

    return check


def _without_trailing_slashes(value: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(origin.rstrip("/") for origin in value)


def _in(section: str, check: Check | None = None, *, tidy: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """A setting's field metadata: its TOML section (required), the rule its value keeps and how a given value is
    tidied before the rule is applied (both optional)."""
    return {"section": section, "check": check, "tidy": tidy}


@dataclass(frozen=True, kw_only=True)
class BrokerConfig:
    """Every broker setting, with its default. Names carry their unit."""

    # --- [broker] ---
    host: str = field(default="127.0.0.1", metadata=_in(BROKER, _not_empty))
    """Address the TCP, WebSocket and HTTP listeners bind."""
    tcp_port: int = field(default=7700, metadata=_in(BROKER, _port))
    """TCP port (0 picks a free one)."""
    ws_port: int = field(default=7781, metadata=_in(BROKER, _port))
    """WebSocket port, path ``/relay`` (0 picks a free one)."""
    http_port: int = field(default=7780, metadata=_in(BROKER, _port))
    """HTTP API, OpenAPI description and demo page port (0 picks a free one)."""
    listeners: tuple[str, ...] = field(default=("tcp", "ws", "http"), metadata=_in(BROKER, _listener_names))
    """Which listeners to serve (comma-separated): tcp, ws, http, and over TLS tls, wss, https.

    Each on its own port (``tcp_port``, ``ws_port``, ``http_port``, ``tls_port``, ``wss_port``,
    ``https_port``); leave a plain one out to turn it off. The TLS ones need ``tls_cert_file`` and
    ``tls_key_file``."""
    tls_port: int = field(default=8700, metadata=_in(BROKER, _port))
    """Frame byte stream over TLS port, ``tls://`` (0 picks a free one; served if listeners names tls)."""
    wss_port: int = field(default=8781, metadata=_in(BROKER, _port))
    """WebSocket over TLS port, ``wss://``, path ``/relay`` (0 picks a free one; served if listeners names wss)."""
    https_port: int = field(default=8780, metadata=_in(BROKER, _port))
    """HTTP API and demo page over TLS port (0 picks a free one; served if listeners names https)."""
    tls_cert_file: Path | None = field(default=None, metadata=_in(BROKER))
    """PEM file with the server certificate, then any intermediate certificates, for the TLS listeners.

    Read at start and again on SIGHUP (new connections get the new certificate, open ones stay)."""
    tls_key_file: Path | None = field(default=None, metadata=_in(BROKER))
    """PEM file with the private key of ``tls_cert_file`` (unencrypted)."""
    allowed_origins: tuple[str, ...] = field(default=(), metadata=_in(BROKER, _origins, tidy=_without_trailing_slashes))
    """Browser origins besides the broker's own that may open a WebSocket and call the HTTP API (comma-separated).

    E.g. ``https://chat.example.org``. One rule for both, CORS preflight included
    (:class:`broker.origins.OriginPolicy`). A request without an Origin header (not a browser) is not its concern."""
    metrics_open_networks: tuple[str, ...] = field(default=("127.0.0.0/8", "::1/128"), metadata=_in(BROKER, _networks))
    """Networks whose clients may read ``GET /metrics`` without a token (comma-separated; default loopback).

    A client elsewhere needs an operator token (``Authorization: Bearer``), as for ``/relay/stats``; empty: every
    client does."""
    data_dir: Path = field(default_factory=default_data_dir, metadata=_in(BROKER))
    """Where the token-signing secret lives (messages never touch the disk)."""
    token_leeway_s: float = field(default=60.0, metadata=_in(BROKER, _not_negative))
    """Clock skew allowed when judging a token's exp, iat and nbf (both ways)."""
    token_keys_dir: Path | None = field(default=None, metadata=_in(BROKER))
    """A directory of your token issuer's public keys, one PEM file per key named KID.pem (EdDSA, RS256, ES256).

    A token whose header has ``kid`` KID is checked with that key; tokens without ``kid`` with the broker's own
    secret. Files added, replaced or removed take effect at the next token check, without a restart."""
    token_jwks_file: Path | None = field(default=None, metadata=_in(BROKER))
    """A JWKS file (``{"keys": [...]}``) of your token issuer's public keys, each with its kid (EdDSA, RS256, ES256).

    Read again at the next token check whenever it changes, without a restart; kids must not repeat those of
    ``token_keys_dir``."""
    handshake_timeout_s: float = field(default=10.0, metadata=_in(BROKER, _positive))
    """Time a new connection has to complete HELLO."""
    keepalive_s: float = field(default=60.0, metadata=_in(BROKER, _positive))
    """A connection silent this long is closed; a write stalled this long too."""
    cleanup_interval_s: float = field(default=3600.0, metadata=_in(BROKER, _positive))
    """How often the sweeper purges expired messages."""
    shutdown_grace_s: float = field(default=5.0, metadata=_in(BROKER, _not_negative))
    """On shutdown, time given to sessions to flush their last frames."""
    log_level: str = field(default="INFO", metadata=_in(BROKER, _one_of(LOG_LEVELS), tidy=str.upper))
    """Least severe log events written (to standard error): DEBUG, INFO, WARNING, ERROR or CRITICAL.

    Whatever the level, the log never holds a message body or a token (:mod:`broker.logs`)."""
    log_format: str = field(default="text", metadata=_in(BROKER, _one_of(LOG_FORMATS)))
    """Log lines as ``text`` (the session id first) or ``json`` (one JSON object per line).

    Either way one line per event: ``SESSION TIME LEVEL LOGGER: MESSAGE key=value...``, or the keys ``session``,
    ``time``, ``level``, ``logger``, ``message``, ``fields`` (:mod:`broker.logs`)."""

    # --- [broker.limits] ---
    max_frame_bytes: int = field(default=DEFAULT_MAX_FRAME_BYTES, metadata=_in(LIMITS, _frame_size))
    """Largest frame body accepted; bounds a message body (1 MiB)."""
    max_recipients: int = field(default=100, metadata=_in(LIMITS, _positive))
    """Distinct recipients per SEND (every receipt must fit max_frame_bytes)."""
    max_inflight: int = field(default=4096, metadata=_in(LIMITS, _positive))
    """Un-ACKed deliveries outstanding per connection.

    A 100,000-message backlog drains in under 1 s on loopback with 4096 (1024 left both ends idle waiting for ACKs,
    1.36 s)."""
    max_outbound_bytes: int = field(default=8 * 1024 * 1024, metadata=_in(LIMITS, _positive))
    """Unsent bytes queued for one connection before it is cut off as a slow consumer."""
    max_connections: int = field(default=65536, metadata=_in(LIMITS, _positive))
    """Open connections; more are refused at once."""
    default_ttl_s: int = field(default=7 * 24 * 3600, metadata=_in(LIMITS, _positive))
    """TTL of a SEND that names none (7 days)."""
    max_ttl_s: int = field(default=30 * 24 * 3600, metadata=_in(LIMITS, _positive))
    """Longer TTLs are clamped to this (30 days)."""
    max_mailbox_messages: int = field(default=_STORE_DEFAULTS.max_mailbox_messages, metadata=_in(LIMITS, _positive))
    """Messages held per mailbox."""
    max_mailbox_bytes: int = field(default=_STORE_DEFAULTS.max_mailbox_bytes, metadata=_in(LIMITS, _positive))
    """Body bytes held per mailbox (64 MiB)."""
    max_total_bytes: int = field(default=_STORE_DEFAULTS.max_total_bytes, metadata=_in(LIMITS, _positive))
    """Body bytes held over all mailboxes (1 GiB)."""
    max_tombstones: int = field(default=_STORE_DEFAULTS.max_tombstones, metadata=_in(LIMITS, _not_negative))
    """ACKed ids remembered for idempotent SEND retries (about 200 bytes each)."""
    max_mailbox_statuses: int = field(default=_STORE_DEFAULTS.max_mailbox_statuses, metadata=_in(LIMITS, _not_negative))
    """Delivery statuses held per mailbox; beyond it they are folded into one overflow record (0: always)."""
    key_ttl_s: int = field(default=90 * 24 * 3600, metadata=_in(LIMITS, _positive))
    """A mailbox's key record (the public-key directory) lapses this long after its latest put (90 days)."""

    # --- [broker.rate_limits] ---
    rate_exempt_networks: tuple[str, ...] = field(
        default=("127.0.0.0/8", "::1/128"), metadata=_in(RATE_LIMITS, _networks)
    )
    """Networks whose clients no abuse limit applies to, per address or per mailbox (comma-separated; default loopback).

    Local development and the bench are not throttled; empty: every client is limited."""
    max_connections_per_address: int = field(default=1024, metadata=_in(RATE_LIMITS, _positive))
    """Open connections from one source address; more are refused at once (ERROR 4007)."""
    address_connections_per_s: float = field(default=20.0, metadata=_in(RATE_LIMITS, _not_negative))
    """New connections and HTTP API requests a second from one address, sustained (ERROR 4006, HTTP 429; 0: off)."""
    address_connections_burst: int = field(default=200, metadata=_in(RATE_LIMITS, _at_least_one))
    """New connections and HTTP API requests from one address at once, beyond the sustained rate."""
    address_hellos_per_s: float = field(default=20.0, metadata=_in(RATE_LIMITS, _not_negative))
    """HELLOs a second from one address, sustained, judged before the token (ERROR 4006; 0: no limit)."""
    address_hellos_burst: int = field(default=200, metadata=_in(RATE_LIMITS, _at_least_one))
    """HELLOs from one address at once, beyond the sustained rate."""
    mailbox_hellos_per_s: float = field(default=2.0, metadata=_in(RATE_LIMITS, _not_negative))
    """HELLOs a second for one mailbox, sustained, judged once the token names it (ERROR 4006; 0: no limit)."""
    mailbox_hellos_burst: int = field(default=30, metadata=_in(RATE_LIMITS, _at_least_one))
    """HELLOs for one mailbox at once, beyond the sustained rate."""
    address_sends_per_s: float = field(default=2000.0, metadata=_in(RATE_LIMITS, _not_negative))
    """SENDs a second from one address, sustained, every transport (RECEIPT 3010; 0: no limit)."""
    address_sends_burst: int = field(default=10000, metadata=_in(RATE_LIMITS, _at_least_one))
    """SENDs from one address at once, beyond the sustained rate."""
    mailbox_sends_per_s: float = field(default=1000.0, metadata=_in(RATE_LIMITS, _not_negative))
    """SENDs a second from one mailbox, sustained, every transport (RECEIPT 3010; 0: no limit)."""
    mailbox_sends_burst: int = field(default=5000, metadata=_in(RATE_LIMITS, _at_least_one))
    """SENDs from one mailbox at once, beyond the sustained rate."""
    address_send_bytes_per_s: int = field(default=32 * 1024 * 1024, metadata=_in(RATE_LIMITS, _not_negative))
    """SEND body bytes a second from one address, sustained (32 MiB; RECEIPT 3010; 0: no limit)."""
    address_send_bytes_burst: int = field(default=128 * 1024 * 1024, metadata=_in(RATE_LIMITS, _at_least_one))
    """SEND body bytes from one address at once (128 MiB); at least the largest body, max_frame_bytes."""
    mailbox_send_bytes_per_s: int = field(default=16 * 1024 * 1024, metadata=_in(RATE_LIMITS, _not_negative))
    """SEND body bytes a second from one mailbox, sustained (16 MiB; RECEIPT 3010; 0: no limit)."""
    mailbox_send_bytes_burst: int = field(default=64 * 1024 * 1024, metadata=_in(RATE_LIMITS, _at_least_one))
    """SEND body bytes from one mailbox at once (64 MiB); at least the largest body, max_frame_bytes."""
    rate_limit_table_size: int = field(default=100_000, metadata=_in(RATE_LIMITS, _positive))
    """Buckets kept per kind (by address or mailbox); beyond it the least recently used is dropped (~250 bytes each)."""

    # --- [broker.store] ---
    store: str = field(default="memory", metadata=_in(STORE, _store_name))
    """Message store: ``memory`` (this process only), or Redis shared by every node of one relay.

    Redis: ``redis://HOST:PORT/DB``, ``rediss://...`` (TLS), or Redis Cluster naming seed nodes,
    ``redis+cluster://HOST:PORT,HOST:PORT`` (``rediss+cluster://`` with TLS)."""
    store_prefix: str = field(default="relay", metadata=_in(STORE, _key_prefix))
    """Prefix of every Redis key and channel: the nodes of one relay share it, two relays on one Redis do not."""
    node_id: str | None = field(default=None, metadata=_in(STORE, _node_name))
    """This node's name among the nodes sharing a Redis store (default: host name, process id and a random part)."""
    presence_lease_s: float = field(default=15.0, metadata=_in(STORE, _positive))
    """With Redis: how long a node's claim on a mailbox outlives the node (renewed every third of it)."""

    def __post_init__(self) -> None:
        """Raises ConfigError for a value of the wrong type or out of range, or settings that contradict each other."""
        for setting in _settings(type(self)):
            given = getattr(self, setting.name)
            value = setting.checked(given)
            if value is not given:
                object.__setattr__(self, setting.name, value)  # tidied (a list made a tuple, an int a float)
        _check_together(self)

    @property
    def tls_listeners(self) -> tuple[str, ...]:
        """The listeners named in ``listeners`` that serve TLS (tls, wss, https), as listed."""
        return tuple(name for name in self.listeners if name in TLS_LISTENERS)

    def serves(self, listener: str) -> bool:
        """Whether ``listeners`` names ``listener`` (tcp, ws, http, tls, wss or https)."""
        return listener in self.listeners

    @property
    def store_limits(self) -> StoreLimits:
        """The bounds the store enforces: this config's settings of the same names."""
        return StoreLimits(**{f.name: getattr(self, f.name) for f in fields(StoreLimits)})

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` (field names). Raises ConfigError as the constructor does."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def settings(cls) -> tuple[Setting, ...]:
        """Every setting, in the order written (grouped by section)."""
        return _settings(cls)

    @classmethod
    def sections(cls) -> dict[str, list[Setting]]:
        """The settings by TOML section (``broker``, ``broker.limits``, ...), in the order written."""
        return _sections(cls)

    @classmethod
    def field_names(cls) -> list[str]:
        return [s.name for s in _settings(cls)]

    @classmethod
    def descriptions(cls) -> dict[str, str]:
        """Each setting's full description: the docstring written under its field."""
        return {s.name: s.description for s in _settings(cls)}

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, source: str, base: Self | None = None) -> Self:
        """``base`` (default: the defaults) with flat ``values`` applied, by field name; values may be text (from the
        environment or flags) and are converted. Raises ConfigError naming ``source``."""
        known = {s.name: s for s in _settings(cls)}
        changes: dict[str, Any] = {}
        for key, raw in values.items():
            if (setting := known.get(key)) is None:
                raise ConfigError(f"{source}: unknown setting {key!r}")
            changes[key] = setting.convert(raw, source)
        return dataclasses.replace(base or cls(), **changes)

    @classmethod
    def from_toml(cls, text: str, *, source: str, base: Self | None = None) -> Self:
        """``base`` with the settings of a TOML document applied, each read from its own section's table.
        Raises ConfigError for invalid TOML, an unknown table or setting, or a setting in the wrong table."""
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        return cls.from_mapping(_flatten(cls, document, "", source), source=source, base=base)

    @classmethod
    def load(
        cls,
        *,
        toml_path: Path | None = None,
        environ: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> Self:
        """Defaults, then the TOML file, then ``RELAY_*`` environment variables, then ``overrides`` (flags).
        Raises ConfigError."""
        config = cls()
        if toml_path is not None:
            try:
                text = toml_path.read_text()
            except OSError as exc:
                raise ConfigError(f"{toml_path}: {exc}") from None
            config = cls.from_toml(text, source=str(toml_path), base=config)
        environ = os.environ if environ is None else environ
        env_values = {s.name: environ[s.env] for s in _settings(cls) if s.env in environ}
        config = cls.from_mapping(env_values, source="environment", base=config)
        if overrides:
            config = cls.from_mapping(overrides, source="command line", base=config)
        return config

    def to_toml(self) -> str:
        """The configuration as TOML, by section, each setting after a comment with its help (what
        ``--print-config`` shows). A setting that is None is left out (TOML has no None), in a comment."""
        lines: list[str] = []
        for section, settings in self.sections().items():
            lines += ["", f"[{section}]"] if lines else [f"[{section}]"]
            for setting in settings:
                value = getattr(self, setting.name)
                lines.append(f"# {setting.help}")
                if value is None:
                    lines.append(f"# {setting.name} is not set")
                else:
                    lines.append(f"{setting.name} = {setting.kind.to_toml(value)}")
        return "\n".join(lines) + "\n"


# --- rules between settings -----------------------------------------------------------------------------------------


def _check_together(config: BrokerConfig) -> None:
    """Raises ConfigError if two settings contradict each other."""
    ports: dict[int, str] = {}
    for name in (f"{listener}_port" for listener in config.listeners):
        port = getattr(config, name)
        if port and port in ports:  # 0 picks a free port for each listener: never a clash
            raise ConfigError(f"{ports[port]} and {name} are both {port}: each listener needs its own port")
        ports[port] = name
    if (config.tls_cert_file is None) != (config.tls_key_file is None):
        raise ConfigError("tls_cert_file and tls_key_file go together: set both or neither")
    if config.tls_listeners and config.tls_cert_file is None:
        raise ConfigError(f"listeners {', '.join(config.tls_listeners)} serve TLS: set tls_cert_file and tls_key_file")
    if config.max_outbound_bytes < 4 * config.max_frame_bytes:
        raise ConfigError("max_outbound_bytes must be at least 4 * max_frame_bytes (a delivery batch must fit)")
    if config.default_ttl_s > config.max_ttl_s:
        raise ConfigError("default_ttl_s must not exceed max_ttl_s")
    for name in ("address_send_bytes_burst", "mailbox_send_bytes_burst"):
        if getattr(config, name) < config.max_frame_bytes:
            raise ConfigError(
                f"{name} must be at least max_frame_bytes ({config.max_frame_bytes}): the largest body must fit"
            )
    if config.max_recipients > (most := max_recipients_within(config.max_frame_bytes)):
        raise ConfigError(
            f"max_recipients {config.max_recipients} is too many for max_frame_bytes {config.max_frame_bytes}: "
            f"a receipt for {config.max_recipients} recipients may need {receipt_bound_bytes(config.max_recipients)} "
            f"bytes (at most {most} recipients fit)"
        )


# --- kinds: how a value of one annotation is read and written ---------------------------------------------------


def _int_value(value: Any) -> int:
    if type(value) is not int:
        raise TypeError
    return value


def _float_value(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError
    return float(value)


def _str_value(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError
    return value


def _path_value(value: Any) -> Path:
    if not isinstance(value, Path):
        raise TypeError
    return value


def _strings_value(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise TypeError
    return tuple(value)


def _strings_text(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _toml_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    return '"' + "".join(c if c not in '"\\' and c.isprintable() else _escape(c) for c in text) + '"'


def _escape(c: str) -> str:
    return f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}"


@dataclass(frozen=True, slots=True)
class _Kind:
    """How settings of one annotation are read and written."""

    expected: str
    """What a value must be, for error messages: ``max_inflight must be {expected}, not 'many'``."""
    metavar: str
    """Placeholder in ``serve --help``."""
    from_text: Callable[[str], Any]
    """Text (environment, flag, or a TOML string) -> value; raises ValueError."""
    from_value: Callable[[Any], Any]
    """A value (TOML, keyword argument) -> value, or TypeError if it is not of this kind."""
    to_toml: Callable[[Any], str]


_KINDS: dict[object, _Kind] = {
    int: _Kind("of type int", "N", lambda text: int(text.replace("_", "")), _int_value, str),
    float: _Kind("of type float", "NUMBER", lambda text: float(text.replace("_", "")), _float_value, repr),
    str: _Kind("of type str", "TEXT", str, _str_value, _toml_string),
    Path: _Kind(
        "of type Path", "PATH", lambda text: Path(text).expanduser(), _path_value, lambda p: _toml_string(str(p))
    ),
    tuple[str, ...]: _Kind(
        "a list of strings (or one comma-separated string)",
        "LIST",
        _strings_text,
        _strings_value,
        lambda v: "[" + ", ".join(map(_toml_string, v)) + "]",
    ),
}


def _kind_of(hint: object) -> tuple[_Kind, bool]:
    """The kind of an annotation, and whether it is optional (``X | None``). Raises TypeError for one with no kind."""
    optional = False
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        members = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(members) != 1:
            raise TypeError(f"a setting is X or X | None, not {hint}")
        hint, optional = members[0], True
    if hint not in _KINDS:
        raise TypeError(f"no setting kind for {hint!r}: add one to _KINDS")
    return _KINDS[hint], optional


# --- settings: one field's name, section, kind, rule and help ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setting:
    """One field of a config class, as the config files, the environment and the command line see it."""

    name: str
    section: str
    kind: _Kind
    optional: bool
    """``X | None``: None is a value (given as an empty string in the environment or on the command line)."""
    check: Check | None
    tidy: Callable[[Any], Any] | None
    description: str
    """The field's docstring, whitespace joined."""
    help: str
    """Its first paragraph: one line for ``serve --help`` and ``--print-config``."""
    default: str
    """The default as ``serve --help`` shows it."""

    @property
    def env(self) -> str:
        return f"RELAY_{self.name.upper()}"

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def metavar(self) -> str:
        for suffix, metavar in (("_per_s", "RATE"), ("_port", "PORT"), ("_bytes", "BYTES"), ("_s", "SECONDS")):
            if self.name.endswith(suffix):
                return metavar
        return self.kind.metavar

    def convert(self, raw: Any, source: str) -> Any:
        """A value from a TOML file, the environment or a flag (text is parsed).

        Raises ConfigError naming ``source``."""
        if self.optional and (raw is None or raw == ""):
            return None
        try:
            return self.checked(self.kind.from_text(raw) if isinstance(raw, str) else raw)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        except ValueError:
            raise ConfigError(f"{source}: {self.name} must be {self.kind.expected}, not {raw!r}") from None

    def checked(self, value: Any) -> Any:
        """``value`` as this setting holds it (tidied), after checking its type and rule. Raises ConfigError."""
        if value is None and self.optional:
            return None
        try:
            value = self.kind.from_value(value)
        except TypeError:
            raise ConfigError(f"{self.name} must be {self.kind.expected}, not {value!r}") from None
        if self.tidy is not None:
            value = self.tidy(value)
        if self.check is not None and (complaint := self.check(value)) is not None:
            raise ConfigError(f"{self.name} {complaint}")
        return value


_SETTINGS: dict[type, tuple[Setting, ...]] = {}


def _settings(cls: type[BrokerConfig]) -> tuple[Setting, ...]:
    """The settings of a config class (BrokerConfig or a subclass that adds fields), made once per class."""
    if (known := _SETTINGS.get(cls)) is None:
        known = _SETTINGS[cls] = _read_settings(cls)
    return known


def _read_settings(cls: type[BrokerConfig]) -> tuple[Setting, ...]:
    hints = typing.get_type_hints(cls)
    docs = _docstrings(cls)
    out = []
    for f in fields(cls):
        if "section" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} has no section: give it field(metadata={{'section': ...}})")
        kind, optional = _kind_of(hints[f.name])
        description = " ".join(docs.get(f.name, "").split())
        first = " ".join(docs.get(f.name, "").split("\n\n")[0].split()).replace("``", "")
        out.append(
            Setting(
                name=f.name,
                section=f.metadata["section"],
                kind=kind,
                optional=optional,
                check=f.metadata.get("check"),
                tidy=f.metadata.get("tidy"),
                description=description,
                help=first,
                default=_shown_default(f),
            )
        )
    return tuple(out)


def _shown_default(f: dataclasses.Field[Any]) -> str:
    if f.default_factory is not dataclasses.MISSING:
        return (f.default_factory.__doc__ or "computed").strip().rstrip(".")
    if f.default is None or f.default == ():
        return "none"
    if isinstance(f.default, tuple):
        return ",".join(f.default)
    return str(f.default)


def _docstrings(cls: type) -> dict[str, str]:
    """The docstring written under each annotated name of ``cls`` and its dataclass bases."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = typing.cast(ast.ClassDef, tree.body[0]).body
        for node, after in itertools.pairwise(body):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                    out[node.target.id] = inspect.cleandoc(str(after.value.value))
    return out


def _sections(cls: type[BrokerConfig]) -> dict[str, list[Setting]]:
    """The settings by section, sections in the order they first appear."""
    out: dict[str, list[Setting]] = {}
    for setting in _settings(cls):
        out.setdefault(setting.section, []).append(setting)
    return out


def _flatten(cls: type[BrokerConfig], table: Mapping[str, Any], section: str, source: str) -> dict[str, Any]:
    """The settings of a TOML table and its sub-tables, by name. Raises ConfigError for an unknown table or
    setting, or a setting in another section's table."""
    homes = {s.name: s.section for s in _settings(cls)}
    tables = {part for s in homes.values() for part in _parents(s)}
    here = f"[{section}]" if section else "the top level"
    out: dict[str, Any] = {}
    for key, value in table.items():
        inner = f"{section}.{key}" if section else key
        if isinstance(value, dict) and inner in tables:
            out.update(_flatten(cls, value, inner, source))
        elif (home := homes.get(key)) is None:
            what = "table" if isinstance(value, dict) else "setting"
            raise ConfigError(f"{source}: unknown {what} {key!r} in {here}")
        elif home != section:
            raise ConfigError(f"{source}: {key} belongs in [{home}], not in {here}")
        else:
            out[key] = value
    return out


def _parents(section: str) -> list[str]:
    """``broker.limits`` -> ``broker``, ``broker.limits``."""
    parts = section.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]
