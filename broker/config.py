"""Broker configuration: one typed object, from defaults, a TOML file, the environment and flags.

Precedence, lowest first: the defaults below, ``--config FILE`` (TOML, keys as the field
names, optionally under a ``[broker]`` table), environment variables ``RELAY_<FIELD>``
(upper case), then command-line flags. ``relay-broker serve --print-config`` shows the result.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import re
import textwrap
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from wire import DEFAULT_MAX_FRAME_BYTES, max_recipients_within, receipt_bound_bytes

from .store.base import StoreLimits

__all__ = ["BrokerConfig", "ConfigError", "default_data_dir"]


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, or out of range."""


def default_data_dir() -> Path:
    """$RELAY_DATA_DIR, else $XDG_DATA_HOME/relay, else ~/.local/share/relay."""
    if env := os.environ.get("RELAY_DATA_DIR"):
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "relay"


@dataclass(frozen=True, kw_only=True)
class BrokerConfig:
    """Every broker setting, with its default. Names carry their unit."""

    host: str = "127.0.0.1"
    """Address the TCP listener binds."""
    tcp_port: int = 7700
    """TCP port (0 picks a free one)."""
    # --- browsers (issue 3): WebSocket and HTTP listeners on ``host`` ---
    ws_port: int = 7781
    """WebSocket port, path ``/relay`` (0 picks a free one)."""
    http_port: int = 7780
    """HTTP API, OpenAPI description and demo page port (0 picks a free one)."""
    allowed_origins: tuple[str, ...] = ()
    """Browser origins, beyond the HTTP listener's own, allowed to open a WebSocket,
    e.g. ``https://chat.example.org``. In the environment or on the command line:
    comma-separated. A handshake without an Origin header (not a browser) is allowed."""
    data_dir: Path = field(default_factory=default_data_dir)
    """Holds the token-signing secret, and nothing else: messages never touch the disk."""
    store: str = "memory"
    """Message store. ``memory`` is the only one in this release."""

    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    """Largest frame body accepted; bounds a message body (1 MiB)."""
    max_inflight: int = 4096
    """Un-ACKed deliveries outstanding per connection: a 100,000-message backlog drains in under
    1 s on loopback with 4096 (1024 left both ends idle waiting for ACKs, 1.36 s)."""
    max_recipients: int = 100
    """Distinct recipients per SEND."""
    default_ttl_s: int = 7 * 24 * 3600
    """TTL of a SEND that names none (7 days)."""
    max_ttl_s: int = 30 * 24 * 3600
    """Longer TTLs are clamped to this (30 days)."""
    max_mailbox_messages: int = 100_000
    """Messages held per mailbox."""
    max_mailbox_bytes: int = 64 * 1024 * 1024
    """Body bytes held per mailbox (64 MiB)."""
    max_total_bytes: int = 1024 * 1024 * 1024
    """Body bytes held over all mailboxes (1 GiB)."""
    max_tombstones: int = 100_000
    """ACKed ids remembered for idempotent SEND retries (about 200 bytes each)."""
    token_leeway_s: float = 60.0
    """Clock skew allowed when judging a token's exp, iat and nbf (seconds, both ways)."""
    handshake_timeout_s: float = 10.0
    """Time a new connection has to complete HELLO."""
    keepalive_s: float = 60.0
    """A connection that sends nothing for this long is closed; a write stalled this long too."""
    max_outbound_bytes: int = 8 * 1024 * 1024
    """Unsent bytes queued for one connection before it is cut off as a slow consumer."""
    max_connections: int = 65536
    """Open connections; more are refused at once."""
    cleanup_interval_s: float = 3600.0
    """How often the sweeper purges expired messages."""
    shutdown_grace_s: float = 5.0
    """On shutdown, time given to sessions to flush their last frames."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", "float") and (type(value) not in (int, float) or isinstance(value, bool)):
                raise ConfigError(f"{f.name} must be a number, not {value!r}")
            if f.type == "int" and type(value) is not int:
                raise ConfigError(f"{f.name} must be an integer, not {value!r}")
        if self.store != "memory":
            raise ConfigError(f"store must be 'memory' (the only store in this release), not {self.store!r}")
        listeners: dict[int, str] = {}
        for name in ("tcp_port", "ws_port", "http_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ConfigError(f"{name} must be 0-65535")
            if port and port in listeners:  # 0 picks a free port for each listener: never a clash
                raise ConfigError(f"{listeners[port]} and {name} are both {port}: each listener needs its own port")
            listeners[port] = name
        if type(self.allowed_origins) is not tuple:
            object.__setattr__(self, "allowed_origins", _origins(self.allowed_origins, "allowed_origins"))
        for origin in self.allowed_origins:
            if not _ORIGIN.fullmatch(origin):
                raise ConfigError(f"allowed_origins: {origin!r} is not an origin like https://example.org[:port]")
        if self.max_frame_bytes < 1024:
            raise ConfigError("max_frame_bytes must be at least 1024")
        positive = ("max_inflight", "max_recipients", "default_ttl_s", "max_ttl_s", "max_mailbox_messages",
                    "max_mailbox_bytes", "max_total_bytes", "handshake_timeout_s", "keepalive_s",
                    "max_outbound_bytes", "max_connections", "cleanup_interval_s")  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.max_outbound_bytes < 4 * self.max_frame_bytes:
            raise ConfigError("max_outbound_bytes must be at least 4 * max_frame_bytes (a delivery batch must fit)")
        if self.token_leeway_s < 0:
            raise ConfigError("token_leeway_s must not be negative")
        if self.max_tombstones < 0:
            raise ConfigError("max_tombstones must not be negative")
        if self.default_ttl_s > self.max_ttl_s:
            raise ConfigError("default_ttl_s must not exceed max_ttl_s")
        if self.max_recipients > (most := max_recipients_within(self.max_frame_bytes)):
            raise ConfigError(
                f"max_recipients {self.max_recipients} is too many for max_frame_bytes {self.max_frame_bytes}: "
                f"a receipt for {self.max_recipients} recipients may need {receipt_bound_bytes(self.max_recipients)} "
                f"bytes (at most {most} recipients fit)"
            )

    @property
    def store_limits(self) -> StoreLimits:
        return StoreLimits(
            max_mailbox_messages=self.max_mailbox_messages,
            max_mailbox_bytes=self.max_mailbox_bytes,
            max_total_bytes=self.max_total_bytes,
            max_tombstones=self.max_tombstones,
        )

    def replace(self, **changes: Any) -> BrokerConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def descriptions(cls) -> dict[str, str]:
        """Each setting's description: the docstring written under its field in this class (one source for the
        code, ``serve --help`` and ``--print-config``)."""
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        out: dict[str, str] = {}
        for node, after in zip(body, [*body[1:], None], strict=True):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                out[node.target.id] = " ".join(after.value.value.split())
        return out

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, source: str, base: BrokerConfig | None = None) -> BrokerConfig:
        """``base`` with ``values`` applied; values may be strings (from env or flags) and are converted."""
        base = base or cls()
        types = {f.name: f.type for f in fields(cls)}
        changes: dict[str, Any] = {}
        for key, raw in values.items():
            if key not in types:
                raise ConfigError(f"{source}: unknown setting {key!r}")
            changes[key] = _convert(key, types[key], raw, source)
        return dataclasses.replace(base, **changes)

    @classmethod
    def load(
        cls,
        *,
        toml_path: Path | None = None,
        environ: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> BrokerConfig:
        """Defaults, then the TOML file, then ``RELAY_*`` environment variables, then ``overrides``."""
        config = cls()
        if toml_path is not None:
            try:
                data = tomllib.loads(toml_path.read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"{toml_path}: {exc}") from None
            data = data.get("broker", data)
            config = cls.from_mapping(data, source=str(toml_path), base=config)
        environ = os.environ if environ is None else environ
        env_values = {}
        for name in cls.field_names():
            if (value := environ.get(f"RELAY_{name.upper()}")) is not None:
                env_values[name] = value
        config = cls.from_mapping(env_values, source="environment", base=config)
        if overrides:
            config = cls.from_mapping(overrides, source="command line", base=config)
        return config

    def to_toml(self) -> str:
        """The effective configuration as TOML (what ``--print-config`` shows)."""
        lines = ["[broker]"]
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str | Path):
                lines.append(f'{f.name} = "{value}"')
            elif isinstance(value, tuple):
                items = ", ".join(f'"{v}"' for v in value)
                lines.append(f"{f.name} = [{items}]")
            else:
                lines.append(f"{f.name} = {value!r}")
        return "\n".join(lines) + "\n"


_ORIGIN = re.compile(r"https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


def _origins(raw: Any, name: str) -> tuple[str, ...]:
    """A list of origins from a TOML array or a comma-separated string; trailing slashes dropped."""
    if isinstance(raw, str):
        raw = raw.split(",")
    if not isinstance(raw, list | tuple) or not all(isinstance(v, str) for v in raw):
        raise ConfigError(f"{name} must be a list of origins (or a comma-separated string), not {raw!r}")
    return tuple(v.strip().rstrip("/") for v in raw if v.strip())


def _convert(name: str, type_name: Any, raw: Any, source: str) -> Any:
    try:
        if type_name == "int":
            if isinstance(raw, str):
                return int(raw.replace("_", ""))
            if type(raw) is not int:
                raise ValueError
            return raw
        if type_name == "float":
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if type_name == "Path":
            return Path(raw).expanduser()
        if type_name == "tuple[str, ...]":
            return _origins(raw, name)
        if not isinstance(raw, str):
            raise ValueError
        return raw
    except ConfigError as exc:  # a ValueError too, but already says what is wrong
        raise ConfigError(f"{source}: {exc}") from None
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {name} must be of type {type_name}, not {raw!r}") from None
