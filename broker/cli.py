"""``relay-broker``: run the broker, issue tokens, and operate a running broker.

    relay-broker serve [--config FILE] [--host H] [--tcp-port P] [--print-config] [...]
    relay-broker token NAME [--operator] [--expires-in 30d]
    relay-broker stats [--url URL] [--json]
    relay-broker cleanup [--url URL]

``main(argv) -> int`` is what the installed command runs; tests call it directly.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from .auth import Authenticator, load_or_create_secret
from .backend import StoreUnreachable, redacted
from .config import BrokerConfig, ConfigError, default_data_dir
from .listeners import first_os_error
from .logs import LOG_LEVELS, broker_logging
from .server import Broker

__all__ = ["main"]

_DURATION = re.compile(r"(\d+)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """``90``, ``90s``, ``15m``, ``12h``, ``30d`` -> seconds."""
    m = _DURATION.fullmatch(text.strip())
    if not m or int(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 3600, 15m, 12h, 30d)")
    return int(m.group(1)) * _UNITS[m.group(2)]


def _build_parser() -> argparse.ArgumentParser:
    # serve's --log-level is its log_level setting (with --log-format); the operator tools log at WARNING by default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level", default=argparse.SUPPRESS, help="DEBUG, INFO, WARNING or ERROR (default WARNING)"
    )
    parser = argparse.ArgumentParser(
        prog="relay-broker", description="Relay message broker and operator tools.", parents=[common]
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the broker (the default command)",
        description="Run the broker. Each setting below overrides the config file and its RELAY_<NAME> environment "
        "variable; --print-config shows the result. An empty value unsets an optional setting.",
    )
    serve.add_argument("--config", type=Path, help="TOML file with broker settings, by section")
    serve.add_argument("--print-config", action="store_true", help="print the effective configuration and exit")
    _add_setting_flags(serve)

    token = sub.add_parser("token", help="print a signed token for a mailbox", parents=[common])
    token.add_argument("name", help="mailbox id (or operator name with --operator)")
    token.add_argument("--operator", action="store_true", help="an operator token: stats and cleanup, no mailbox")
    token.add_argument("--expires-in", type=parse_duration, default=30 * 86400, help="lifetime, e.g. 12h, 30d")
    token.add_argument("--data-dir", type=Path, default=None, help="where the secret lives (default as serve)")

    for name, text in (("stats", "print a running broker's statistics"), ("cleanup", "purge expired messages now")):
        p = sub.add_parser(name, help=text, parents=[common])
        p.add_argument("--url", default=None, help="broker URL (default tcp://127.0.0.1:7700 or $RELAY_URL)")
        p.add_argument("--data-dir", type=Path, default=None, help="where the secret lives (default as serve)")
        if name == "stats":
            p.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    return parser


def _add_setting_flags(serve: argparse.ArgumentParser) -> None:
    """One flag per setting, ``--name-with-dashes``, in one argument group per config section."""
    for section, settings in BrokerConfig.sections().items():
        group = serve.add_argument_group(f"[{section}] settings")
        for setting in settings:
            text = f"{setting.help} (default: {setting.default})".replace("%", "%%")
            # SUPPRESS: a flag not given sets nothing, so ``relay-broker --log-level DEBUG`` (no command) still counts
            group.add_argument(
                setting.flag, dest=setting.name, default=argparse.SUPPRESS, metavar=setting.metavar, help=text
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    command = args.command or "serve"
    if args.command is None:
        args = parser.parse_args([*(argv or sys.argv[1:]), "serve"])
    try:
        if command == "serve":
            return _serve(args)
        # The operator tools print results, not the client's log: WARNING unless --log-level says otherwise.
        level = str(getattr(args, "log_level", "WARNING")).upper()
        with broker_logging(level if level in LOG_LEVELS else "WARNING", "text"):
            if command == "token":
                return _token(args)
            return _operate(args, command)
    except ConfigError as exc:
        print(f"relay-broker: configuration error: {exc}", file=sys.stderr)
        return 2


def _serve(args: argparse.Namespace) -> int:
    given = ((s.name, getattr(args, s.name, None)) for s in BrokerConfig.settings())
    overrides = {name: value for name, value in given if value is not None}
    config = BrokerConfig.load(toml_path=args.config, overrides=overrides)
    if args.print_config:
        print(config.to_toml(), end="")
        return 0

    async def run() -> None:
        broker = Broker(config)
        # SIGTERM (service managers, kill) and SIGINT (Ctrl-C) end the broker gracefully: cancelling
        # serve() tells every session SHUTTING_DOWN and gives it shutdown_grace_s to flush. SIGHUP reloads
        # the TLS certificate and key (new handshakes get them; no connection is dropped).
        log = logging.getLogger(__name__)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(broker.serve)
                _announce(config, broker)
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        try:
                            broker.reload_tls()
                        except ConfigError as exc:
                            log.error("SIGHUP: %s; the certificate in use stays", exc)
                        continue
                    log.info("%s: shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break

    # Everything imported so far lives as long as the process: move it out of the
    # collector's view, so a full collection walks only what the broker allocates
    # (it took ~10 ms over the ~43,000 startup objects, the p99.9 tail of delivery).
    gc.freeze()
    try:
        with broker_logging(config.log_level, config.log_format):
            trio.run(run)
    except KeyboardInterrupt:
        return 0
    except (OSError, BaseExceptionGroup) as exc:  # a listener's OSError arrives inside the nurseries' groups
        if (failed := first_os_error(exc)) is None:
            raise
        if isinstance(failed, StoreUnreachable):
            print(f"relay-broker: {failed}", file=sys.stderr)
            return 1
        # The WebSocket and HTTP listeners put their address in ``filename``; the TCP one does not.
        address = failed.filename or f"tcp://{_hostport(config.host, config.tcp_port)}"
        print(f"relay-broker: cannot listen on {address}: {failed.strerror or failed}", file=sys.stderr)
        return 1
    return 0


def _announce(config: BrokerConfig, broker: Broker) -> None:
    """Tell the person who started the broker where it listens and what to do next."""
    at = config.host

    def urls(*pairs: tuple[str, int | None], path: str = "") -> str:
        found = [f"{scheme}://{_hostport(at, port)}{path}" for scheme, port in pairs if port is not None]
        return " ".join(found) or "off"

    streams = urls(("tcp", broker.tcp_port), ("tls", broker.tls_port))
    websockets = urls(("ws", broker.ws_port), ("wss", broker.wss_port), path="/relay")
    api = urls(("http", broker.http_port), ("https", broker.https_port), path="/relay")
    pages = urls(("http", broker.http_port), ("https", broker.https_port), path="/")
    print(
        f"relay-broker listening on {streams} (store: {redacted(config.store)}, data dir: {config.data_dir})\n"
        f"WebSocket {websockets}, HTTP API {api}\n"
        f"demo page: {pages}\n"
        f"make a token with: relay-broker token <mailbox>",
        flush=True,
    )


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _authenticator(data_dir: Path | None) -> Authenticator:
    return Authenticator(load_or_create_secret(data_dir or default_data_dir()))


def _token(args: argparse.Namespace) -> int:
    try:
        token = _authenticator(args.data_dir).issue(args.name, operator=args.operator, lifetime_s=args.expires_in)
    except ValueError as exc:
        print(f"relay-broker: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def _operate(args: argparse.Namespace, command: str) -> int:
    import os

    from client import RelayError, open_client  # the operator tools are clients of the broker

    url = args.url or os.environ.get("RELAY_URL") or "tcp://127.0.0.1:7700"
    token = _authenticator(args.data_dir).issue("operator", operator=True, lifetime_s=300)

    async def run() -> int:
        async with open_client(url, token, reconnect=False) as client:
            if command == "cleanup":
                purged = await client.cleanup()
                print(f"purged {purged} expired messages")
                return 0
            stats = await client.stats()
            if args.json:
                print(json.dumps(stats, sort_keys=True))
            else:
                width = max(map(len, stats))
                for key in sorted(stats):
                    print(f"{key:<{width}}  {stats[key]}")
            return 0

    try:
        return trio.run(run)
    except (RelayError, OSError) as exc:
        print(f"relay-broker {command}: {exc}", file=sys.stderr)
        return 1
