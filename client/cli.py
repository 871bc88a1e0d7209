"""The ``relay`` command: listen, send, export and keys from the shell.

Exit status: 0 success; 1 the relay refused the message, for a recipient or as a whole
(``send``); 2 usage, token, connection or local-store errors, including being taken over by
another connection for the same mailbox (CONNECTED_ELSEWHERE 4001); one line on stderr;
3 ``send --wait``: the message expired before a recipient's device saved it; 4 ``send --wait``:
the timeout passed first; 5 ``send``: a recipient's identity key changed (nothing sent: compare
fingerprints, then ``relay keys accept``); 6 ``send``: a recipient has no (valid) published key
(nothing sent: ``--plaintext`` sends in the clear); 130 interrupted (Ctrl-C).

End-to-end encryption is on: the device's keys and pinned contacts live in the local store,
which ``send`` and ``listen`` both use; ``relay keys`` shows them (see docs/e2e.md).
Global options (before or after the command): ``--url`` (env RELAY_URL, default
tcp://127.0.0.1:7700), ``--token`` (env RELAY_TOKEN), ``--store PATH`` (default
``$XDG_DATA_HOME/relay/client/<mailbox>.sqlite3``, the mailbox read from the token),
``-v``/``--verbose`` (the client library's log on stderr).

``listen`` prints each message at least once, even across a crash: the local store
remembers which saved messages were printed, and a new ``listen`` first prints those
saved but not printed. Delivery statuses of the mailbox's sent messages are printed the same
way, as ``{"status": {...}}`` lines. It reports its connection on stderr, one line per change
(connected, disconnected/reconnecting, reconnected, taken over).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import sqlite3
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import IO, Any, Protocol

import jwt
import trio

from wire import ErrorCode, Receipt, ReportState, Status, StatusReport, is_valid_mailbox_id
from wire.e2e import Identity, fingerprint

from ._client import ConnectionEvent, ConnectionState, RelayClient, open_client
from ._e2e import ContactKey, contact_keys, device_keys
from .errors import (
    AuthenticationError,
    ConnectionLost,
    InvalidRecipientKeyError,
    KeyChangedError,
    NoRecipientKeyError,
    RelayError,
)
from .localstore import (
    FAILED,
    LocalStore,
    RecipientState,
    StatusNotice,
    body_json,
    security_json,
    status_json,
)

__all__ = ["DEFAULT_URL", "default_store_path", "main", "mailbox_of_token"]

DEFAULT_URL = "tcp://127.0.0.1:7700"
AGENT = "relay-cli/0.1"
EXIT_OK, EXIT_REFUSED, EXIT_ERROR, EXIT_EXPIRED, EXIT_TIMEOUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
EXIT_KEY_CHANGED, EXIT_NO_KEY = 5, 6
UNEMITTED_BATCH = 1000
"""Saved-but-unprinted messages (or statuses) printed (and then marked, in one transaction) per step at ``listen``
start."""


class CliError(Exception):
    """A failure reported as one line on stderr with exit status 2."""


def _claims(token: str) -> dict[str, Any]:
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise CliError(f"the token is not a valid JWT: {exc}") from None
    if not isinstance(claims, dict):
        raise CliError("the token's claims are not a JSON object")
    return claims


def mailbox_of_token(token: str) -> str:
    """The ``sub`` claim of a token, read without verifying it (the broker verifies). Raises CliError."""
    sub = _claims(token).get("sub")
    if not is_valid_mailbox_id(sub):
        raise CliError("the token's sub claim is not a valid mailbox id")
    return str(sub)


def refuse_operator_token(token: str, command: str) -> None:
    """Raise CliError if ``token`` is an operator token (claim ``role`` = ``operator``, read without
    verifying it, the claim the broker goes by): an operator session has no mailbox to send from or
    listen on. Raises CliError for a token that is not a JWT too."""
    if _claims(token).get("role") == "operator":
        raise CliError(
            f"`relay {command}` needs a mailbox token, and this is an operator token, which has no mailbox"
            " (make one with `relay-broker token NAME`)"
        )


def default_store_path(mailbox: str) -> Path:
    """$XDG_DATA_HOME/relay/client/<mailbox>.sqlite3, else ~/.local/share/relay/client/<mailbox>.sqlite3."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "relay" / "client" / f"{mailbox}.sqlite3"


EXIT_STATUS_HELP = """\
exit status: 0 done; 1 the relay refused the message (send: for a recipient, or the whole
SEND); 2 usage, token, connection or local-store error, or taken over by another connection
for the same mailbox (4001), with one line on stderr; 3 (send --wait) it expired before a
recipient's device saved it; 4 (send --wait) the timeout passed first; 5 (send) a recipient's
key changed: nothing sent (relay keys accept MAILBOX after comparing fingerprints); 6 (send) a
recipient has no published key: nothing sent (--plaintext sends it unencrypted); 130
interrupted (Ctrl-C).

Messages are end-to-end encrypted: your device's keys and your contacts' pinned keys live in
the local store (relay keys shows them)."""

SEND_DESCRIPTION = """\
Send one message and print the relay's receipt as one JSON line on stdout.

The message is end-to-end encrypted to each recipient's published key (looked up at the relay,
checked against the key pinned for them, pinned on first use), so the relay cannot read it. If
a recipient's key changed since it was pinned, nothing is sent (exit 5): compare the new
fingerprint with them (relay keys), then relay keys accept MAILBOX and send again. If a
recipient has published no key (they never connected with an encrypting client, or their key
expired), nothing is sent (exit 6) unless you pass --plaintext, which sends this message
unencrypted to every recipient (they see it marked so).

The message is BODY; with BODY - it is read from stdin (until end of file), and with no
BODY from stdin if stdin is a pipe or a file (with stdin a terminal and no BODY, relay
stops at once: say what to send). An empty message is refused (an empty BODY or an
empty stdin is usually a mistake) unless you pass --empty.

The receipt has one status per recipient, saying what the relay did, not what the
recipient did:
  {"id": "9f0c...", "results": {"bob": {"status": "queued"}, "x!": {"status": "refused", "code": 3006}}}
  queued     stored at the relay; the recipient is offline (it gets it when it connects,
             until the message's TTL runs out)
  delivered  handed to the recipient's open connection; not yet confirmed saved (if the
             recipient does not save and ACK it, the relay delivers it again)
  duplicate  the relay already holds (or held) this id from you for this recipient
  refused    not stored for this recipient; "code" says why (e.g. 3006 invalid mailbox id)
A SEND refused as a whole (nothing stored for anyone) prints
  {"id": "9f0c...", "refused": {"code": 3004, "name": "TOO_MANY_RECIPIENTS"}}
(3004 more recipients than the broker's max_recipients, 3007 BODY_TOO_LARGE; 3008
STORE_UNREACHABLE: the broker could not reach its store, so the message may or may not be
stored: send it again with the same --id, and a stored one comes back "duplicate").
Exit status 1 if any recipient, or the whole message, was refused. The local store
records the message with the recipients the relay accepted it for and each one's receipt.

Delivery status: the message asks the relay (unless --no-notify) to tell your mailbox, later,
what became of it for each recipient it was stored for: "delivered" when the recipient's
device saved and ACKed it (not that they read it), or "expired" when it expired first. This
tells the relay nothing new, but tells you when their device was online. `relay listen`
prints these statuses and `relay export` shows them; or wait for them here:

--wait keeps the connection open after the receipt and prints each recipient's status as it
arrives, one JSON line each, as `relay listen` does:
  {"status": {"seq": 1714572190000000, "state": "delivered", "at": 1714572190000, "id": "9f0c...", "recipient": "bob"}}
until every recipient it was stored for has one (a status already in the local store, e.g.
for a resent --id, counts), or --timeout SECONDS passes (then one line on stderr names those
still waiting). Meanwhile, like `relay listen`, it saves what else arrives for your mailbox
(messages, other statuses) in the local store, for the next `relay listen` to print; and like
any connection for your mailbox it takes over a running `relay listen` of the same mailbox.
Exit status with --wait: 0 every recipient's device saved it; 1 refused for a recipient or as
a whole (the others are still waited for); 3 it expired for a recipient; 4 the timeout passed
first (in that order of precedence)."""

LISTEN_DESCRIPTION = """\
Print each message delivered to your mailbox as one JSON line on stdout
  {"id": "...", "from": "alice", "sent_at": 1714572187000, "body": "hello", "security": "e2e"}
("body_base64" instead of "body" if it is not UTF-8). "security" is "e2e" (decrypted, and
signed by the key pinned for the sender), "plaintext" (sent unencrypted: the relay could read
it, and it is not verified) or "failed": an encrypted message that did not open or verify,
printed without a body and with "security_error" (e.g. "key_changed", "bad_signature"), and a
line on stderr; it is not a message from the sender named. Each message is saved in the
local store before it is ACKed, and printed at least once: the store remembers what was
printed, and a listen started after a crash first prints what was saved but not printed.

Delivery statuses of messages your mailbox sent (relay send asks for them unless
--no-notify) are printed the same way (saved, then ACKed, printed at least once), each as
one JSON line with a single "status" key:
  {"status": {"seq": 1714572190000000, "state": "delivered", "at": 1714572190000, "id": "m1", "recipient": "bob"}}
state "delivered": bob's device saved and ACKed m1 at "at" (Unix ms; not that bob read it);
"expired": m1 expired at "at" before bob's device saved it; "overflow":
  {"status": {"seq": ..., "state": "overflow", "at": ..., "count": 12, "first_seq": ...}}
the relay could not keep "count" statuses (too many were waiting for your mailbox); a later
overflow line with the same "first_seq" replaces the earlier one (its count includes it).

Connection changes go to stderr, one line each: connected (with the number of messages
waiting), disconnected and reconnecting (with the reason, e.g. the broker shutting down,
4004), reconnected, and taken over by another connection for the same mailbox (4001),
after which listen exits with status 2. An operator token is refused (exit 2)."""


KEYS_DESCRIPTION = """\
Show this device's fingerprint and each contact's pinned identity key, from the local store:

  alice (this device) 12345 67890 13579 24680 11223 34455
  bob                 54321 09876 ... pinned 2024-05-01 14:03
    safety number 12345 67890 ... (12 groups)

Compare a safety number with the contact (in person, or on a call): if both of you see the
same 12 groups, nobody (the relay included) has put another key between you. A contact whose
key changed is flagged KEY CHANGED with the new fingerprint: nothing is sent to it, and its
messages signed by the new key fail, until you run relay keys accept MAILBOX. Keys are made
on first use and published each time send or listen connects."""


def _build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS, help=f"broker URL (env RELAY_URL; default {DEFAULT_URL})")
    common.add_argument("--token", default=argparse.SUPPRESS, help="access token (env RELAY_TOKEN)")
    common.add_argument(
        "--ca-file",
        default=argparse.SUPPRESS,
        metavar="PEM",
        help="for tls:// and wss:// URLs, trust only the CAs in this file (env RELAY_CA_FILE; default: the system's)",
    )
    common.add_argument(
        "--store",
        default=argparse.SUPPRESS,
        metavar="PATH",
        help="local message store (default: $XDG_DATA_HOME/relay/client/<mailbox>.sqlite3)",
    )
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log the client's activity on stderr"
    )
    parser = argparse.ArgumentParser(
        prog="relay",
        description="Relay client: send, receive and export messages.",
        epilog=EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    listen = sub.add_parser(
        "listen",
        parents=[common],
        help="print delivered messages as JSON lines (saved to the local store, then ACKed)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=LISTEN_DESCRIPTION,
    )
    listen.add_argument(
        "--drain",
        action="store_true",
        help="exit once every waiting message is saved and ACKed (and the statuses that came by then are printed)",
    )

    send = sub.add_parser(
        "send",
        parents=[common],
        help="send one message and print the relay's receipt as JSON",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=SEND_DESCRIPTION,
    )
    send.add_argument("--to", action="append", required=True, metavar="MAILBOX", help="recipient (repeatable)")
    send.add_argument("--ttl", type=_positive_int, metavar="SECONDS", help="time to live (default: the broker's)")
    send.add_argument("--id", help="message id (default: 128 random bits in hex)")
    send.add_argument("--empty", action="store_true", help="send an empty message (no BODY; stdin is not read)")
    send.add_argument(
        "--no-notify",
        dest="notify",
        action="store_false",
        help="do not ask the relay for delivery statuses (it then never says delivered or expired)",
    )
    send.add_argument(
        "--plaintext",
        action="store_true",
        help="send unencrypted (needed for a recipient without a published key); recipients see it marked so",
    )
    send.add_argument(
        "--wait",
        action="store_true",
        help="after the receipt, wait for every recipient's delivery status and print it (exit 0, 3 or 4)",
    )
    send.add_argument(
        "--timeout",
        type=_positive_seconds,
        metavar="SECONDS",
        help="with --wait: stop waiting after this long (exit 4; default: wait until each is delivered or expired)",
    )
    send.add_argument(
        "body",
        nargs="?",
        default=None,
        metavar="BODY",
        help="message text; - (or no BODY with stdin a pipe or file) reads the message from stdin",
    )

    export = sub.add_parser(
        "export",
        parents=[common],
        help="write the local store as Markdown or JSON",
        description="Write the local store (received and sent messages) as Markdown or JSON. A sent message"
        " lists the recipients the relay accepted it for and, for each, what the relay last told this device:"
        ' "delivered" (a delivery status: their device saved it), "expired" (it expired before their device'
        ' saved it), or "queued" (no status yet, or none was asked for; the JSON also gives the receipt\'s'
        " word). Statuses the relay could not keep are counted.",
    )
    export.add_argument("--format", choices=("markdown", "json"), default="markdown")
    export.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")

    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON document instead of text"
    )
    keys = sub.add_parser(
        "keys",
        parents=[common, as_json],
        help="show your fingerprint and your contacts' pinned keys; accept a changed key; rotate yours",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=KEYS_DESCRIPTION,
    )
    actions = keys.add_subparsers(dest="action", metavar="ACTION")
    accept = actions.add_parser(
        "accept",
        parents=[common, as_json],
        help="trust a contact's changed key (after comparing fingerprints)",
        description="Pin the changed identity key recorded for MAILBOX (shown as KEY CHANGED by relay keys), so"
        " messages to and from it are encrypted and verified again. Compare its fingerprint with the contact"
        " out of band first. Works on the local store only.",
    )
    accept.add_argument("mailbox", metavar="MAILBOX")
    actions.add_parser(
        "rotate",
        parents=[common, as_json],
        help="make and publish a new encryption key (your fingerprint stays)",
        description="Make a new encryption key, keep the previous one to open messages still queued under it (for"
        " the relay's max_ttl_s), and publish the new one. Your identity key, and so your fingerprint, stays."
        " Connects to the relay (taking over a running relay listen of the same mailbox).",
    )
    return parser


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("must be a number of seconds above 0")
    return value


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
        self.ca_file: str | None = getattr(args, "ca_file", None) or os.environ.get("RELAY_CA_FILE")
        self.stop_reported = False
        """Set once the STOPPED connection event was printed, so the error it ends with is not printed again."""

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

    def emit_messages(self, messages: Sequence[_Message]) -> None:
        """One JSON line per message, then one flush; and a line on stderr for each failed one."""
        self.stdout.write("".join(_message_line(m) for m in messages))
        self.stdout.flush()
        for m in messages:
            if m.security == FAILED:
                hint = " (relay keys shows the change)" if m.security_error == "key_changed" else ""
                self.note(
                    f"message {m.id} from {m.sender} failed end-to-end checks ({m.security_error}): not shown{hint}"
                )

    def emit_statuses(self, statuses: Sequence[StatusNotice]) -> None:
        """One ``{"status": {...}}`` line per delivery status, then one flush."""
        self.stdout.write("".join(status_line(s) for s in statuses))
        self.stdout.flush()

    def note(self, text: str) -> None:
        """One line on stderr."""
        print(f"relay: {text}", file=self.stderr, flush=True)

    def on_connection_change(self, event: ConnectionEvent) -> None:
        """Print one line on stderr per connection event."""
        self.note(describe_connection_event(event))
        if event.state is ConnectionState.STOPPED:
            self.stop_reported = True


class _Message(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def sender(self) -> str: ...
    @property
    def sent_at(self) -> int: ...
    @property
    def body(self) -> bytes: ...
    @property
    def security(self) -> str: ...
    @property
    def security_error(self) -> str | None: ...


def _message_line(m: _Message) -> str:
    """A message's JSON line: a failed one has no body (it is not a message from its sender)."""
    item: dict[str, Any] = {"id": m.id, "from": m.sender, "sent_at": m.sent_at}
    if m.security != FAILED:
        item.update(body_json(m.body))
    item.update(security_json(m.security, m.security_error))
    return json.dumps(item, ensure_ascii=False) + "\n"


def status_line(s: StatusNotice) -> str:
    """The line ``relay listen`` and ``relay send --wait`` print for a delivery status: ``{"status": {...}}``."""
    return json.dumps({"status": status_json(s)}, ensure_ascii=False) + "\n"


def _waiting(pending: int | None) -> str:
    if pending is None:
        return ""
    return f", {pending} message{'' if pending == 1 else 's'} waiting"


def describe_connection_event(event: ConnectionEvent) -> str:
    """The line ``relay listen`` prints on stderr for a connection event (without the ``relay:`` prefix)."""
    reason = event.reason
    if event.state is ConnectionState.CONNECTED:
        return f"connected to {event.url} as {event.mailbox}{_waiting(event.pending)}"
    if event.state is ConnectionState.RECONNECTED:
        return f"reconnected to {event.url} as {event.mailbox}{_waiting(event.pending)}"
    if event.state is ConnectionState.DISCONNECTED:
        if event.code == ErrorCode.SHUTTING_DOWN:
            return f"the broker at {event.url} is shutting down (SHUTTING_DOWN 4004); reconnecting"
        what = reason.message if reason is not None and reason.code is None else str(reason)
        return f"disconnected from {event.url}: {what}; reconnecting"
    if event.code == ErrorCode.CONNECTED_ELSEWHERE:
        return "another connection for this mailbox took over (CONNECTED_ELSEWHERE 4001); stopping"
    return f"stopped: {reason}"


async def _listen(ctx: _Context) -> int:
    token = ctx.token
    refuse_operator_token(token, "listen")
    mailbox = mailbox_of_token(token)
    store = ctx.open_store()
    drain = ctx.args.drain
    try:
        # First what an earlier listen saved (and so ACKed) but did not print: it crashed in between.
        while rows := await trio.to_thread.run_sync(partial(store.unemitted, mailbox, limit=UNEMITTED_BATCH)):
            ctx.emit_messages(rows)
            await trio.to_thread.run_sync(store.mark_emitted, mailbox, [m.key for m in rows])
        while saved := await trio.to_thread.run_sync(partial(store.unemitted_statuses, mailbox, limit=UNEMITTED_BATCH)):
            ctx.emit_statuses(saved)
            await trio.to_thread.run_sync(store.mark_statuses_emitted, mailbox, [s.seq for s in saved])
        async with open_client(
            ctx.url,
            token,
            local_store=store,
            agent=AGENT,
            on_connection_change=ctx.on_connection_change,
            ca_file=ctx.ca_file,
        ) as client:
            if client.mailbox != mailbox:
                raise CliError(f"the broker says this token is for {client.mailbox!r}, not {mailbox!r}")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_print_statuses, ctx, client, store, mailbox, drain)
                async for batch in client.delivery_batches(until_drained=drain):
                    ctx.emit_messages(batch)  # written and flushed: only now marked printed
                    await trio.to_thread.run_sync(store.mark_emitted, mailbox, [(d.sender, d.id) for d in batch])
    finally:
        store.close()
    return EXIT_OK


async def _print_statuses(ctx: _Context, client: RelayClient, store: LocalStore, mailbox: str, drain: bool) -> None:
    """``listen``'s second loop: print each new (saved, ACKed) status, then mark it printed. A failure of the
    client ends it quietly: the deliveries loop raises the same error."""
    try:
        async for batch in client.status_batches(until_drained=drain):
            ctx.emit_statuses(batch)
            await trio.to_thread.run_sync(store.mark_statuses_emitted, mailbox, [s.seq for s in batch])
    except RelayError:
        return


def _read_body(ctx: _Context) -> bytes:
    """The message to send, from BODY, stdin or --empty. Raises CliError (exit 2) before anything is sent."""
    args = ctx.args
    if args.empty:
        if args.body is not None:
            raise CliError("send: --empty sends an empty message: give no BODY with it")
        return b""
    if args.body is None and ctx.stdin.isatty():
        raise CliError(
            "send: no message: give it as BODY (relay send --to NAME 'text'), pipe it in, or pass - to type it"
            " (end with Ctrl-D)"
        )
    if args.body is None or args.body == "-":
        if ctx.stdin.isatty():
            ctx.note("reading the message from the terminal; end it with Ctrl-D")
        body = ctx.stdin.read()
        if not body:
            raise CliError("send: stdin was empty: nothing to send (pass --empty to send an empty message)")
        return body
    if not args.body:
        raise CliError("send: BODY is empty: nothing to send (pass --empty to send an empty message)")
    return str(args.body).encode("utf-8")


def _receipt_json(receipt: Receipt) -> dict[str, Any]:
    """What ``relay send`` prints: the results per recipient, or the whole SEND's refusal."""
    if receipt.code is not None:
        try:
            name: str | None = ErrorCode(receipt.code).name
        except ValueError:
            name = None
        return {"id": receipt.id, "refused": {"code": receipt.code, "name": name}}
    return {"id": receipt.id, "results": {rcpt: res.to_wire() for rcpt, res in receipt.results.items()}}


def _show_receipt(ctx: _Context, receipt: Receipt) -> bool:
    """Print the receipt (and what to do after a 3008); whether anything was refused."""
    ctx.emit(_receipt_json(receipt))
    if receipt.code == ErrorCode.STORE_UNREACHABLE:
        ctx.note(
            "the broker could not reach its store (3008): the message may or may not be stored; "
            f"send it again later with --id {receipt.id} (if it was stored, the retry says duplicate)"
        )
    return receipt.code is not None or any(res.status is Status.REFUSED for res in receipt.results.values())


async def _send(ctx: _Context) -> int:
    args = ctx.args
    token = ctx.token
    refuse_operator_token(token, "send")
    if args.timeout is not None and not args.wait:
        raise CliError("send: --timeout goes with --wait")
    if args.wait and not args.notify:
        raise CliError("send: --wait waits for delivery statuses, which --no-notify does not ask for")
    body = _read_body(ctx)
    if args.wait:
        return await _send_and_wait(ctx, token, body)
    # The client has the local store: the device's keys and pins, and it records the message with each
    # recipient's receipt (and saves what else arrives for the mailbox meanwhile, for the next `relay listen`).
    mailbox = mailbox_of_token(token)
    store = ctx.open_store()
    try:
        async with open_client(ctx.url, token, agent=AGENT, local_store=store, ca_file=ctx.ca_file) as client:
            if client.mailbox != mailbox:
                raise CliError(f"the broker says this token is for {client.mailbox!r}, not {mailbox!r}")
            receipt = await client.send(
                args.to, body, ttl_s=args.ttl, id=args.id, notify=args.notify, plaintext=args.plaintext
            )
    finally:
        store.close()
    return EXIT_REFUSED if _show_receipt(ctx, receipt) else EXIT_OK


async def _send_and_wait(ctx: _Context, token: str, body: bytes) -> int:
    """``send --wait``: the client has the local store (it records the message, saves statuses, then ACKs them);
    print the receipt, then each recipient's status once (marked printed), until all have one or the timeout."""
    args = ctx.args
    mailbox = mailbox_of_token(token)
    store = ctx.open_store()
    try:
        async with open_client(ctx.url, token, agent=AGENT, local_store=store, ca_file=ctx.ca_file) as client:
            if client.mailbox != mailbox:
                raise CliError(f"the broker says this token is for {client.mailbox!r}, not {mailbox!r}")
            receipt = await client.send(
                args.to, body, ttl_s=args.ttl, id=args.id, notify=True, plaintext=args.plaintext
            )
            refused = _show_receipt(ctx, receipt)
            if receipt.code is not None:
                return EXIT_REFUSED
            waiting = {r for r, res in receipt.results.items() if res.status is not Status.REFUSED}
            final: dict[str, StatusNotice] = {}

            async def show(statuses: list[StatusNotice]) -> None:
                for st in statuses:
                    assert st.recipient is not None
                    final[st.recipient] = st
                ctx.emit_statuses(statuses)
                await trio.to_thread.run_sync(store.mark_statuses_emitted, mailbox, [st.seq for st in statuses])

            # Statuses saved before (a resend of an id whose status came earlier) count; newer ones come below.
            known = await trio.to_thread.run_sync(partial(store.recipient_states, mailbox, id=receipt.id))
            await show([_as_status(st) for st in known if st.recipient in waiting and st.status is not None])
            with trio.move_on_after(args.timeout if args.timeout is not None else math.inf):
                statuses = client.statuses()
                while waiting - final.keys():
                    status = await anext(statuses)
                    rcpt = status.recipient
                    if status.id != receipt.id or rcpt not in waiting:
                        continue  # saved for the next `relay listen` to print
                    if rcpt not in final or final[rcpt].seq < status.seq:
                        await show([status])
    finally:
        store.close()
    missing = sorted(waiting - final.keys())
    if missing:
        ctx.note(f"timed out after {args.timeout:g} s: no delivery status yet for {', '.join(missing)}")
    if refused:
        return EXIT_REFUSED
    if any(st.state == ReportState.EXPIRED for st in final.values()):
        return EXIT_EXPIRED
    return EXIT_TIMEOUT if missing else EXIT_OK


def _as_status(state: RecipientState) -> StatusReport:
    """A saved recipient state with a status, as the STATUS it was saved from."""
    assert state.status_seq is not None and state.status_at is not None and state.status is not None
    return StatusReport(
        seq=state.status_seq,
        state=ReportState(state.status),
        at=state.status_at,
        id=state.id,
        recipient=state.recipient,
    )


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


def _keys(ctx: _Context) -> int:
    """``relay keys`` (and ``accept``): the local store only, so a running ``relay listen`` is left alone."""
    args = ctx.args
    token = ctx.token
    refuse_operator_token(token, "keys")
    mailbox = mailbox_of_token(token)
    with ctx.open_store() as store:
        keys = device_keys(store, mailbox)  # made now if this device has none yet (published at the next connect)
        identity = Identity.from_seed(keys.seed)
        if args.action == "accept":
            contact = args.mailbox
            if store.accept_pending_key(mailbox, contact) is None:
                known = store.contacts(mailbox, [contact])
                if not known:
                    raise CliError(f"keys accept: {contact} is not a contact yet (its key is pinned on first use)")
                raise CliError(
                    f"keys accept: no changed key is waiting for {contact}; its pinned key is"
                    f" {fingerprint(contact, known[0].ik)}"
                )
        contacts = contact_keys(mailbox, identity.public, store.contacts(mailbox))
    own = fingerprint(mailbox, identity.public)
    if args.action == "accept":
        [accepted] = [c for c in contacts if c.mailbox == args.mailbox]
        ctx.note(f"{accepted.mailbox}: the new key is pinned ({accepted.fingerprint})")
    if getattr(args, "json", False):
        ctx.emit({"mailbox": mailbox, "fingerprint": own, "contacts": [_contact_json(c) for c in contacts]})
    else:
        ctx.stdout.write(_keys_text(mailbox, own, contacts))
        ctx.stdout.flush()
    return EXIT_OK


def _contact_json(c: ContactKey) -> dict[str, Any]:
    return {
        "mailbox": c.mailbox,
        "fingerprint": c.fingerprint,
        "safety_number": c.safety_number,
        "pinned_at": c.pinned_at,
        "changed": c.changed,
        "new_fingerprint": c.new_fingerprint,
        "new_safety_number": c.new_safety_number,
    }


def _keys_text(mailbox: str, own: str, contacts: Sequence[ContactKey]) -> str:
    """What ``relay keys`` prints: this device's fingerprint, then per contact its pinned key and safety number."""
    width = max([len(mailbox) + len(" (this device)")] + [len(c.mailbox) for c in contacts])
    lines = [f"{(mailbox + ' (this device)').ljust(width)}  {own}"]
    if not contacts:
        lines.append("no contacts yet (a contact's key is pinned the first time you write to or hear from it)")
    for c in contacts:
        pinned = dt.datetime.fromtimestamp(c.pinned_at / 1000).astimezone()
        lines.append(f"{c.mailbox.ljust(width)}  {c.fingerprint}  pinned {pinned:%Y-%m-%d %H:%M}")
        lines.append(f"{'':{width}}    safety number {c.safety_number}")
        if c.changed:
            lines.append(
                f"{'':{width}}    KEY CHANGED: the relay now has {c.new_fingerprint} for {c.mailbox}; nothing is"
                f" sent to it until you compare that with {c.mailbox} and run: relay keys accept {c.mailbox}"
            )
    return "\n".join(lines) + "\n"


async def _rotate(ctx: _Context) -> int:
    """``relay keys rotate``: a new encryption key, published now (a connection)."""
    token = ctx.token
    refuse_operator_token(token, "keys rotate")
    mailbox = mailbox_of_token(token)
    store = ctx.open_store()
    try:
        async with open_client(ctx.url, token, agent=AGENT, local_store=store, ca_file=ctx.ca_file) as client:
            if client.mailbox != mailbox:
                raise CliError(f"the broker says this token is for {client.mailbox!r}, not {mailbox!r}")
            kid = await client.rotate_key()
            own = client.fingerprint()
    finally:
        store.close()
    ctx.note(f"new encryption key {kid} published; your fingerprint stays {own}")
    if getattr(ctx.args, "json", False):
        ctx.emit({"mailbox": mailbox, "fingerprint": own, "kid": kid})
    return EXIT_OK


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _describe(exc: BaseException, url: str) -> str | None:
    """The one-line message for an expected failure, or None for a bug."""
    if isinstance(exc, CliError):
        return str(exc)
    if isinstance(exc, KeyChangedError):
        return "; ".join(
            f"{c.mailbox}'s identity key changed: pinned {c.pinned_fingerprint}, now {c.new_fingerprint}"
            for c in exc.changes
        ) + (
            ". Nothing was sent. Compare the new fingerprint with them (not over this relay), then run"
            f" `relay keys accept {exc.mailbox}` and send again"
        )
    if isinstance(exc, NoRecipientKeyError):
        return (
            f"no published key for {', '.join(exc.mailboxes)} (no encrypting client has connected as them, or their"
            " key expired): nothing was sent; --plaintext sends it unencrypted"
        )
    if isinstance(exc, InvalidRecipientKeyError):
        return (
            f"the relay's key record for {', '.join(exc.mailboxes)} does not verify (a broken or dishonest relay):"
            " nothing was sent"
        )
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
    client_log = logging.getLogger("client")
    level = client_log.level
    handler: logging.Handler
    if getattr(args, "verbose", False):
        handler = logging.StreamHandler(stderr)
        handler.setFormatter(logging.Formatter("relay: %(levelname)s %(name)s: %(message)s"))
        client_log.setLevel(logging.INFO)
    else:
        # What matters is printed by the CLI itself, once; without a handler, logging's last resort
        # would print the client's warnings (e.g. a takeover) a second time.
        handler = logging.NullHandler()
    client_log.addHandler(handler)
    try:
        if args.command == "export":
            return _export(ctx)
        if args.command == "keys" and args.action != "rotate":
            return _keys(ctx)
        command = {"listen": _listen, "send": _send, "keys": _rotate}[args.command]
        return trio.run(command, ctx)
    except BaseException as raw:
        leaf = _leaf(raw)
        if isinstance(leaf, KeyboardInterrupt):
            return EXIT_INTERRUPTED
        message = _describe(leaf, ctx.url)
        if message is None:
            raise
        if not (ctx.stop_reported and isinstance(leaf, RelayError)):
            print(f"relay: {message}", file=stderr)
        if isinstance(leaf, KeyChangedError):
            return EXIT_KEY_CHANGED
        if isinstance(leaf, NoRecipientKeyError | InvalidRecipientKeyError):
            return EXIT_NO_KEY
        return EXIT_ERROR
    finally:
        client_log.removeHandler(handler)
        client_log.setLevel(level)
