"""The ``relay`` command: listen, send and export from the shell.

Exit status: 0 success; 1 a recipient refused a message (``send``); 2 usage, token,
connection or local-store errors (one line on stderr); 130 interrupted (Ctrl-C).
Global options (before or after the command): ``--url`` (env RELAY_URL, default
tcp://127.0.0.1:7700), ``--token`` (env RELAY_TOKEN), ``--store PATH`` (default
``$XDG_DATA_HOME/relay/client/<mailbox>.sqlite3``, the mailbox read from the token).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from pathlib import Path
from typing import IO, Any

import jwt
import trio

from wire import Status, is_valid_mailbox_id

from .connection import open_client
from .errors import AuthenticationError, ConnectionLost, RelayError
from .localstore import LocalStore, body_json

__all__ = ["DEFAULT_URL", "default_store_path", "main", "mailbox_of_token"]

DEFAULT_URL = "tcp://127.0.0.1:7700"
AGENT = "relay-cli/0.1"
EXIT_OK, EXIT_REFUSED, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


class CliError(Exception):
    """A failure reported as one line on stderr with exit status 2."""


def mailbox_of_token(token: str) -> str:
    """The ``sub`` claim of a token, read without verifying it (the broker verifies). Raises CliError."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise CliError(f"the token is not a valid JWT: {exc}") from None
    sub = claims.get("sub")
    if not is_valid_mailbox_id(sub):
        raise CliError("the token's sub claim is not a valid mailbox id")
    return str(sub)


def default_store_path(mailbox: str) -> Path:
    """$XDG_DATA_HOME/relay/client/<mailbox>.sqlite3, else ~/.local/share/relay/client/<mailbox>.sqlite3."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "relay" / "client" / f"{mailbox}.sqlite3"


def _build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS, help=f"broker URL (env RELAY_URL; default {DEFAULT_URL})")
    common.add_argument("--token", default=argparse.SUPPRESS, help="access token (env RELAY_TOKEN)")
    common.add_argument(
        "--store",
        default=argparse.SUPPRESS,
        metavar="PATH",
        help="local message store (default: $XDG_DATA_HOME/relay/client/<mailbox>.sqlite3)",
    )
    parser = argparse.ArgumentParser(
        prog="relay", description="Relay client: send, receive and export messages.", parents=[common]
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    listen = sub.add_parser(
        "listen",
        parents=[common],
        help="print delivered messages as JSON lines (saved to the local store, then ACKed)",
    )
    listen.add_argument("--drain", action="store_true", help="exit once every waiting message is saved and ACKed")

    send = sub.add_parser("send", parents=[common], help="send one message and print its receipt as JSON")
    send.add_argument("--to", action="append", required=True, metavar="MAILBOX", help="recipient (repeatable)")
    send.add_argument("--ttl", type=_positive_int, metavar="SECONDS", help="time to live (default: the broker's)")
    send.add_argument("--id", help="message id (default: 128 random bits in hex)")
    send.add_argument("body", nargs="?", default="-", metavar="BODY", help="message text, or - to read stdin")

    export = sub.add_parser("export", parents=[common], help="write the local store as Markdown or JSON")
    export.add_argument("--format", choices=("markdown", "json"), default="markdown")
    export.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


class _Context:
    def __init__(self, args: argparse.Namespace, stdin: IO[bytes], stdout: IO[str], stderr: IO[str]) -> None:
        self.args = args
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.url: str = getattr(args, "url", None) or os.environ.get("RELAY_URL") or DEFAULT_URL
        self._token: str | None = getattr(args, "token", None) or os.environ.get("RELAY_TOKEN")
        self._store: str | None = getattr(args, "store", None)

    @property
    def token(self) -> str:
        if not self._token:
            raise CliError("no token: pass --token or set RELAY_TOKEN")
        return self._token

    def store_path(self) -> Path:
        if self._store:
            return Path(self._store).expanduser()
        return default_store_path(mailbox_of_token(self.token))

    def open_store(self) -> LocalStore:
        path = self.store_path()
        try:
            return LocalStore(path)
        except (sqlite3.Error, OSError) as exc:
            raise CliError(f"cannot open the local store {path}: {exc}") from None

    def emit(self, obj: Any) -> None:
        self.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.stdout.flush()


async def _listen(ctx: _Context) -> int:
    token = ctx.token
    store = ctx.open_store()
    try:
        async with open_client(ctx.url, token, local_store=store, agent=AGENT) as client:
            async for d in client.deliveries(until_drained=ctx.args.drain):
                ctx.emit({"id": d.id, "from": d.sender, "sent_at": d.sent_at, **body_json(d.body)})
    finally:
        store.close()
    return EXIT_OK


async def _send(ctx: _Context) -> int:
    args = ctx.args
    token = ctx.token
    body = ctx.stdin.read() if args.body == "-" else args.body.encode("utf-8")
    async with open_client(ctx.url, token, agent=AGENT) as client:
        receipt = await client.send(args.to, body, ttl_s=args.ttl, id=args.id)
        mailbox = client.mailbox
    results = {rcpt: res.to_wire() for rcpt, res in receipt.results.items()}
    accepted = [r for r, res in receipt.results.items() if res.status is not Status.REFUSED]
    if accepted and mailbox is not None:
        try:
            store = ctx.open_store()
            with store:
                await trio.to_thread.run_sync(store.record_outgoing, mailbox, [(receipt.id, accepted, body)])
        except (CliError, sqlite3.Error, OSError) as exc:
            print(f"relay: warning: message sent but not recorded in the local store: {exc}", file=ctx.stderr)
    ctx.emit({"id": receipt.id, "results": results})
    return EXIT_REFUSED if len(accepted) < len(results) else EXIT_OK


def _export(ctx: _Context) -> int:
    path = ctx.store_path()
    if not path.exists():
        raise CliError(f"no local store at {path}")
    with ctx.open_store() as store:
        text = store.export_json() if ctx.args.format == "json" else store.export_markdown()
    if ctx.args.output:
        try:
            Path(ctx.args.output).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise CliError(f"cannot write {ctx.args.output}: {exc}") from None
    else:
        ctx.stdout.write(text)
        ctx.stdout.flush()
    return EXIT_OK


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _describe(exc: BaseException, url: str) -> str | None:
    """The one-line message for an expected failure, or None for a bug."""
    if isinstance(exc, CliError):
        return str(exc)
    if isinstance(exc, AuthenticationError):
        return f"the broker refused the token: {exc}"
    if isinstance(exc, ConnectionLost):
        return exc.message if url in exc.message else f"{url}: {exc.message}"
    if isinstance(exc, RelayError):
        return str(exc)
    if isinstance(exc, ValueError | sqlite3.Error | OSError):
        return str(exc)
    return None


def main(
    argv: list[str] | None = None,
    *,
    stdin: IO[bytes] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """Run the ``relay`` command; returns the exit status. Streams default to the process's."""
    stderr = stderr or sys.stderr
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else EXIT_ERROR
    ctx = _Context(args, stdin or sys.stdin.buffer, stdout or sys.stdout, stderr)
    try:
        if args.command == "export":
            return _export(ctx)
        command = _listen if args.command == "listen" else _send
        return trio.run(command, ctx)
    except BaseException as raw:
        leaf = _leaf(raw)
        if isinstance(leaf, KeyboardInterrupt):
            return EXIT_INTERRUPTED
        message = _describe(leaf, ctx.url)
        if message is None:
            raise
        print(f"relay: {message}", file=stderr)
        return EXIT_ERROR
