"""The ``relay`` CLI: main([...]) run in a worker thread (its own trio.run) against a real broker."""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
from relay_testing import url_of

from broker.auth import Authenticator
from broker.server import Broker
from broker.store.base import NewMessage, Outcome
from broker.store.memory import MemoryStore
from client import LocalStore, open_client
from client.cli import main
from client.localstore import SECURITY_NOTE, SENT_NOTE
from tests.conftest import running_broker
from wire import ErrorCode

TIMEOUT_S = 20


class Run:
    def __init__(self, status: int, out: str, err: str) -> None:
        self.status, self.out, self.err = status, out, err

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()


async def relay(*argv: str, stdin: bytes = b"") -> Run:
    out, err = io.StringIO(), io.StringIO()
    with trio.fail_after(TIMEOUT_S):
        status = await trio.to_thread.run_sync(
            lambda: main(list(argv), stdin=io.BytesIO(stdin), stdout=out, stderr=err)
        )
    return Run(status, out.getvalue(), err.getvalue())


def opts(broker: Broker, name: str, store: Path) -> list[str]:
    return ["--url", url_of(broker), "--token", broker.auth.issue(name), "--store", str(store)]


async def test_send_prints_the_receipt_and_records_the_message(broker: Broker, tmp_path: Path) -> None:
    store = tmp_path / "alice.sqlite3"
    # bob has never connected, so has no key: the message goes in the clear, by choice (test_cli_keys.py: sealed)
    run = await relay(*opts(broker, "alice", store), "send", "--to", "bob", "--id", "m1", "--plaintext", "hello bob")
    assert (run.status, run.err) == (0, "")
    assert run.lines == ['{"id": "m1", "results": {"bob": {"status": "queued"}}}']
    with LocalStore(store) as s:
        [m] = s.messages("alice")
        assert (m.direction, m.id, m.recipients, m.body, m.security) == (
            "out",
            "m1",
            ("bob",),
            b"hello bob",
            "plaintext",
        )


async def test_send_exits_1_when_a_recipient_is_refused(broker: Broker, tmp_path: Path) -> None:
    run = await relay(
        "send",
        *opts(broker, "alice", tmp_path / "a.sqlite3"),
        "--to",
        "bob",
        "--to=-bad",
        "--id",
        "m2",
        "--plaintext",
        "x",
    )
    assert run.status == 1
    assert json.loads(run.out) == {
        "id": "m2",
        "results": {"bob": {"status": "queued"}, "-bad": {"status": "refused", "code": 3006}},
    }


async def test_send_reads_the_body_from_stdin_and_takes_a_ttl(broker: Broker, tmp_path: Path) -> None:
    alice = opts(broker, "alice", tmp_path / "a.sqlite3")
    run = await relay(*alice, "send", "--to", "bob", "--ttl", "60", "--plaintext", "-", stdin=b"\x00\x01 from stdin")
    assert run.status == 0
    receipt = json.loads(run.out)
    assert len(receipt["id"]) == 32 and receipt["results"] == {"bob": {"status": "queued"}}
    async with open_client(url_of(broker), broker.auth.issue("bob")) as bob:
        [d] = [d async for d in bob.deliveries(until_drained=True)]
    assert (d.id, d.body, d.expires_at - d.sent_at) == (receipt["id"], b"\x00\x01 from stdin", 60_000)


async def test_listen_drain_saves_acks_and_prints_json_lines(broker: Broker, tmp_path: Path) -> None:
    async with open_client(url_of(broker), broker.auth.issue("alice"), e2e=False) as alice:  # bob has no key yet
        await alice.send("bob", b"hello", id="t1")
        await alice.send("bob", b"\xff\xfe", id="b1")
    store = tmp_path / "bob.sqlite3"
    run = await relay(*opts(broker, "bob", store), "listen", "--drain")
    assert (run.status, run.err) == (0, f"relay: connected to {url_of(broker)} as bob, 2 messages waiting\n")
    lines = [json.loads(line) for line in run.lines]
    assert [list(line) for line in lines] == [
        ["id", "from", "sent_at", "body", "security"],
        ["id", "from", "sent_at", "body_base64", "security"],
    ]
    assert {line["security"] for line in lines} == {"plaintext"}
    assert [(x["id"], x["from"]) for x in lines] == [("t1", "alice"), ("b1", "alice")]
    assert lines[0]["body"] == "hello" and lines[1]["body_base64"] == "//4="
    assert isinstance(lines[0]["sent_at"], int)
    assert (await broker.statistics())["messages_total"] == 0  # saved, then ACKed
    with LocalStore(store) as s:
        assert [m.id for m in s.messages("bob")] == ["t1", "b1"]
    again = await relay(*opts(broker, "bob", store), "listen", "--drain")
    assert (again.status, again.out) == (0, "")


async def test_export_markdown_and_json(broker: Broker, tmp_path: Path) -> None:
    store = tmp_path / "bob.sqlite3"
    bob = opts(broker, "bob", store)
    assert (await relay(*bob, "listen", "--drain")).status == 0  # bob's device publishes its key
    async with open_client(url_of(broker), broker.auth.issue("alice")) as alice:
        await alice.send("bob", b"hi bob", id="e1")
    assert (await relay(*bob, "listen", "--drain")).status == 0
    assert (await relay(*bob, "send", "--to", "alice", "--id", "e2", "hi alice")).status == 0
    md = await relay(*bob, "export", "--format", "markdown")
    assert md.status == 0
    text = md.out.splitlines()
    assert text[0] == "# Relay conversation log — bob"
    assert text[2] == SENT_NOTE and SECURITY_NOTE not in text  # both messages end-to-end encrypted
    assert text[4].startswith("## ")
    assert [line.split(" · ")[0] for line in text if line.startswith("**")] == ["**alice** → bob", "**bob** → alice"]
    assert "> hi bob" in text and "> hi alice" in text
    out = tmp_path / "export.json"
    js = await relay(*bob, "export", "--format", "json", "-o", str(out))
    assert (js.status, js.out) == (0, "")
    doc = json.loads(out.read_text())
    assert [(m["direction"], m["id"], m["body"], m["security"]) for m in doc["messages"]] == [
        ("in", "e1", "hi bob", "e2e"),
        ("out", "e2", "hi alice", "e2e"),
    ]


async def test_default_store_path_comes_from_the_token(
    broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("RELAY_URL", url_of(broker))
    monkeypatch.setenv("RELAY_TOKEN", broker.auth.issue("bob"))
    run = await relay("listen", "--drain")
    assert run.status == 0
    assert (tmp_path / "xdg" / "relay" / "client" / "bob.sqlite3").exists()
    assert (await relay("export")).out.startswith("# Relay conversation log")


async def test_refused_token_is_one_line_on_stderr_with_exit_2(broker: Broker, tmp_path: Path) -> None:
    forged = Authenticator(b"x" * 32).issue("bob")  # signed with another secret
    run = await relay("--url", url_of(broker), "--token", forged, "--store", str(tmp_path / "s"),
                      "send", "--to", "alice", "x")  # fmt: skip
    assert (run.status, run.out) == (2, "")
    assert run.err.count("\n") == 1
    assert "refused the token" in run.err and "INVALID_TOKEN (2001)" in run.err


async def test_unreachable_broker_and_usage_errors_exit_2(broker: Broker, tmp_path: Path) -> None:
    token = broker.auth.issue("bob")
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    dead = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    run = await relay("--url", dead, "--token", token, "--store", str(tmp_path / "s"), "listen")
    assert run.status == 2 and run.err.startswith(f"relay: cannot connect to {dead}: ")
    run = await relay("--url", "http://x", "--token", token, "--store", str(tmp_path / "s"), "listen")
    assert run.status == 2 and "invalid broker URL" in run.err
    env_token = os.environ.pop("RELAY_TOKEN", None)
    try:
        run = await relay("--url", url_of(broker), "send", "--to", "bob", "x")
    finally:
        if env_token is not None:
            os.environ["RELAY_TOKEN"] = env_token
    assert run.status == 2 and "no token" in run.err
    run = await relay("--token", "garbage", "export")
    assert run.status == 2 and "not a valid JWT" in run.err
    run = await relay("--store", str(tmp_path / "missing.sqlite3"), "export")
    assert run.status == 2 and "no local store" in run.err
    assert (await relay("send")).status == 2  # argparse: --to is required


async def test_relay_command_runs_as_a_subprocess(broker: Broker, tmp_path: Path) -> None:
    relay_bin = Path(sys.executable).parent / "relay"
    env: dict[str, Any] = {
        **os.environ,
        "RELAY_URL": url_of(broker),
        "RELAY_TOKEN": broker.auth.issue("alice"),
        "XDG_DATA_HOME": str(tmp_path),
    }
    with trio.fail_after(TIMEOUT_S):
        proc = await trio.run_process(
            [str(relay_bin), "send", "--to", "bob", "--id", "p1", "--plaintext", "via subprocess"],
            capture_stdout=True,
            env=env,
        )
    assert proc.stdout.decode() == '{"id": "p1", "results": {"bob": {"status": "queued"}}}\n'
    async with open_client(url_of(broker), broker.auth.issue("bob")) as bob:
        [d] = [d async for d in bob.deliveries(until_drained=True)]
    assert (d.id, d.body) == ("p1", b"via subprocess")


async def test_send_without_a_body_on_a_terminal_fails_at_once_with_usage(broker: Broker, tmp_path: Path) -> None:
    primary, secondary = os.openpty()  # a real terminal as stdin: the old CLI waited on it silently
    try:
        with trio.fail_after(TIMEOUT_S):
            proc = await trio.run_process(
                [sys.executable, "-m", "client", *opts(broker, "alice", tmp_path / "a.sqlite3"), "send", "--to", "bob"],
                stdin=secondary,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    finally:
        os.close(primary)
        os.close(secondary)
    assert (proc.returncode, proc.stdout) == (2, b"")
    assert proc.stderr.decode() == (
        "relay: send: no message: give it as BODY (relay send --to NAME 'text'), pipe it in, or pass - to type it"
        " (end with Ctrl-D)\n"
    )
    assert (await broker.statistics())["messages_total"] == 0


async def test_send_reads_piped_stdin_without_a_body_and_refuses_an_empty_one(broker: Broker, tmp_path: Path) -> None:
    # bob has no key: --plaintext (test_cli_keys.py covers sealed sends)
    alice = opts(broker, "alice", tmp_path / "a.sqlite3")
    run = await relay(*alice, "send", "--plaintext", "--to", "bob", "--id", "p1", stdin=b"piped text")
    assert run.status == 0 and json.loads(run.out)["results"] == {"bob": {"status": "queued"}}
    for argv, stdin, what in [
        (["send", "--plaintext", "--to", "bob"], b"", "stdin was empty"),
        (["send", "--plaintext", "--to", "bob", "-"], b"", "stdin was empty"),
        (["send", "--plaintext", "--to", "bob", ""], b"ignored", "BODY is empty"),
    ]:
        run = await relay(*alice, *argv, stdin=stdin)
        assert (run.status, run.out) == (2, ""), argv
        assert run.err == f"relay: send: {what}: nothing to send (pass --empty to send an empty message)\n"
    run = await relay(*alice, "send", "--plaintext", "--to", "bob", "--empty", "text")
    assert run.status == 2 and "--empty sends an empty message: give no BODY with it" in run.err
    run = await relay(*alice, "send", "--plaintext", "--to", "bob", "--id", "e1", "--empty", stdin=b"not read")
    assert run.status == 0 and json.loads(run.out)["results"] == {"bob": {"status": "queued"}}
    async with open_client(url_of(broker), broker.auth.issue("bob")) as bob:
        got = [(d.id, d.body) async for d in bob.deliveries(until_drained=True)]
    assert got == [("p1", b"piped text"), ("e1", b"")]


async def test_an_operator_token_is_refused_at_once_and_creates_no_store(broker: Broker, tmp_path: Path) -> None:
    operator = broker.auth.issue("ops", operator=True)
    store = tmp_path / "client" / "ops.sqlite3"
    for argv in (["listen"], ["listen", "--drain"], ["send", "--to", "bob", "hi"]):
        run = await relay("--url", url_of(broker), "--token", operator, "--store", str(store), *argv)
        assert (run.status, run.out) == (2, ""), argv
        assert run.err == (
            f"relay: `relay {argv[0]}` needs a mailbox token, and this is an operator token, which has no mailbox"
            " (make one with `relay-broker token NAME`)\n"
        )
    assert not store.parent.exists()
    assert (await broker.statistics())["connections"] == 0


async def test_a_send_refused_as_a_whole_prints_its_code_and_exits_1(broker_factory: Any, tmp_path: Path) -> None:
    async with broker_factory(max_recipients=2, max_frame_bytes=1024) as broker:
        store = tmp_path / "alice.sqlite3"
        alice = opts(broker, "alice", store)
        run = await relay(
            *alice, "send", "--plaintext", "--to", "bob", "--to", "carol", "--to", "dave", "--id", "r1", "x"
        )
        assert (run.status, run.err) == (1, "")
        assert run.lines == ['{"id": "r1", "refused": {"code": 3004, "name": "TOO_MANY_RECIPIENTS"}}']
        run = await relay(*alice, "send", "--plaintext", "--to", "bob", "--id", "r2", "y" * 900)  # > 1024 - 256
        assert (run.status, run.err) == (1, "")
        assert run.lines == ['{"id": "r2", "refused": {"code": 3007, "name": "BODY_TOO_LARGE"}}']
        assert (await broker.statistics())["messages_total"] == 0
    with LocalStore(store) as s:
        assert s.messages() == []  # nothing was accepted, so nothing is recorded as sent


class UnreachableStore(MemoryStore):
    """The in-memory store, except that enqueue fails (as a Redis store that cannot be reached does) while ``down``."""

    down = True

    async def enqueue_many(self, messages: Sequence[NewMessage], now_ms: int) -> list[list[Outcome]]:
        if self.down:
            raise ConnectionError("the store cannot be reached")
        return await super().enqueue_many(messages, now_ms)


async def test_a_send_the_store_could_not_take_returns_3008_and_relay_send_says_so(tmp_path: Path) -> None:
    store = UnreachableStore()
    async with running_broker(tmp_path, inject_store=store) as broker:
        async with open_client(url_of(broker), broker.auth.issue("alice"), e2e=False) as client:
            receipt = await client.send("bob", b"x", id="u1")
            assert (receipt.code, receipt.results) == (ErrorCode.STORE_UNREACHABLE, {})
            assert client.connected, "the session stays up"
        run = await relay(
            *opts(broker, "alice", tmp_path / "alice.sqlite3"), "send", "--to", "bob", "--id", "u2", "--plaintext", "y"
        )
        assert run.status == 1
        assert run.lines == ['{"id": "u2", "refused": {"code": 3008, "name": "STORE_UNREACHABLE"}}']
        assert run.err == (
            "relay: the broker could not reach its store (3008): the message may or may not be stored; "
            "send it again later with --id u2 (if it was stored, the retry says duplicate)\n"
        )
        store.down = False
        run = await relay(
            *opts(broker, "alice", tmp_path / "alice.sqlite3"), "send", "--to", "bob", "--id", "u2", "--plaintext", "y"
        )
        assert (run.status, run.lines) == (0, ['{"id": "u2", "results": {"bob": {"status": "queued"}}}'])


def test_send_help_says_what_queued_and_delivered_mean(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["send", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "queued stored at the relay; the recipient is offline" in text
    assert "delivered handed to the recipient's open connection; not yet confirmed saved" in text
    assert '{"id": "9f0c...", "refused": {"code": 3004, "name": "TOO_MANY_RECIPIENTS"}}' in text
    assert "An empty message is refused" in text and "--empty" in text
    assert "Exit status with --wait: 0 every recipient's device saved it; 1 refused" in text
    assert "--no-notify" in text and '"delivered" when the recipient\'s device saved and ACKed it' in text


async def test_send_records_each_recipients_receipt_and_whether_it_asked_for_statuses(
    broker: Broker, tmp_path: Path
) -> None:
    alice = opts(broker, "alice", tmp_path / "alice.sqlite3")
    with trio.fail_after(TIMEOUT_S):
        assert (await relay(*alice, "send", "--plaintext", "--to", "bob", "--id", "n1", "asks")).status == 0
        assert (
            await relay(*alice, "send", "--plaintext", "--no-notify", "--to", "bob", "--id", "n2", "quiet")
        ).status == 0
        usage = await relay(*alice, "send", "--plaintext", "--wait", "--no-notify", "--to", "bob", "x")
        assert (usage.status, usage.out) == (2, "")
        assert "--wait waits for delivery statuses, which --no-notify does not ask for" in usage.err
        usage = await relay(*alice, "send", "--plaintext", "--timeout", "3", "--to", "bob", "x")
        assert (usage.status, usage.err) == (2, "relay: send: --timeout goes with --wait\n")
        assert (await relay(*alice, "send", "--plaintext", "--wait", "--timeout", "0", "--to", "bob", "x")).status == 2
    with LocalStore(tmp_path / "alice.sqlite3") as store:
        assert [(s.id, s.receipt, s.notify, s.state) for s in store.recipient_states("alice")] == [
            ("n1", "queued", True, "queued"),
            ("n2", "queued", False, "queued"),
        ]
    async with open_client(url_of(broker), broker.auth.issue("bob")) as bob:
        got = [d async for d in bob.deliveries(until_drained=True)]
        assert [d.id for d in got] == ["n1", "n2"]  # the usage errors sent nothing
