"""The broker's log (broker/logs.py): one line per event, the session id first, as text or JSON lines, at the
configured level; never a message body, never a token (a broker process at DEBUG, over TCP, WebSocket and HTTP,
on the in-memory store and on Redis)."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import secrets
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import pytest
import trio

from broker.auth import Authenticator
from broker.cli import main
from broker.config import BrokerConfig, ConfigError
from broker.logs import broker_logging, current_session
from broker.server import Broker
from client import AuthenticationError, open_client
from wire import Drained, Error, ErrorCode

from ..e2e.test_broker_holds_no_plaintext import relay
from .raw import RawClient

TIMEOUT_S = 30
KEYS = ["session", "time", "level", "logger", "message", "fields"]
TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
log = logging.getLogger("broker.test_logs")


def logged(form: str, level: str = "DEBUG") -> tuple[io.StringIO, AbstractContextManager[logging.Handler]]:
    """Where the log goes, and the block that logs there."""
    out = io.StringIO()
    return out, broker_logging(level, form, out)


def test_a_text_line_begins_with_the_session_id_and_ends_with_the_fields() -> None:
    out, logging_to = logged("text")
    with logging_to:
        log.info("outside any session")
        held = current_session.set("3f9a1c0e5b7d2a64")
        try:
            log.info("open: %s", "alice", extra={"fields": {"mailbox": "alice", "operator": False, "n": 3}})
            log.warning("closing", extra={"session": "0000aaaa0000bbbb", "fields": {"reason": "two words"}})
        finally:
            current_session.reset(held)
    lines = out.getvalue().splitlines()
    assert re.fullmatch(rf"- {TIME} INFO broker.test_logs: outside any session", lines[0]), lines[0]
    assert re.fullmatch(
        rf"3f9a1c0e5b7d2a64 {TIME} INFO broker.test_logs: open: alice mailbox=alice operator=false n=3", lines[1]
    ), lines[1]
    assert re.fullmatch(rf'0000aaaa0000bbbb {TIME} WARNING broker.test_logs: closing reason="two words"', lines[2])


def test_a_json_line_has_the_fixed_keys() -> None:
    out, logging_to = logged("json")
    with logging_to:
        log.info("outside any session")
        held = current_session.set("3f9a1c0e5b7d2a64")
        try:
            log.info("open: %s", "alice", extra={"fields": {"mailbox": "alice", "operator": False}})
        finally:
            current_session.reset(held)
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert list(first) == list(second) == KEYS
    assert (first["session"], first["level"], first["logger"], first["message"], first["fields"]) == (
        None,
        "INFO",
        "broker.test_logs",
        "outside any session",
        {},
    )
    assert re.fullmatch(TIME, first["time"])
    assert (second["session"], second["message"], second["fields"]) == (
        "3f9a1c0e5b7d2a64",
        "open: alice",
        {"mailbox": "alice", "operator": False},
    )


@pytest.mark.parametrize("form", ["text", "json"])
def test_an_event_is_one_line_whatever_it_holds(form: str) -> None:
    """Line breaks in a message, a field or a traceback are escaped: one event, one line, none forged."""
    out, logging_to = logged(form)
    with logging_to:
        try:
            raise ValueError("first line\nsecond line")
        except ValueError:
            log.exception(
                "failed:\n%s", "- 2026-12-03T00:00:00.000Z INFO forged: line", extra={"fields": {"k": "a\rb"}}
            )
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    if form == "json":
        event = json.loads(text)
        assert event["message"].startswith("failed:\n- 2026")
        assert "ValueError: first line\nsecond line" in event["fields"]["exception"]
    else:
        assert "failed:\\n- 2026" in text and "ValueError: first line\\nsecond line" in text and 'k="a\\rb"' in text


def test_the_level_holds_back_less_severe_events_and_the_root_logger_is_restored() -> None:
    root = logging.getLogger()
    before = (root.level, list(root.handlers))
    out, logging_to = logged("text", "WARNING")
    with logging_to:
        log.info("not written")
        log.debug("nor this")
        log.warning("written")
    assert [line.split(" ", 3)[2] for line in out.getvalue().splitlines()] == ["WARNING"]
    assert (root.level, list(root.handlers)) == before


def test_log_level_and_log_format_are_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    toml = tmp_path / "relay.toml"
    toml.write_text('[broker]\nlog_level = "warning"\nlog_format = "json"\n')
    config = BrokerConfig.load(toml_path=toml, environ={})
    assert (config.log_level, config.log_format) == ("WARNING", "json")
    assert BrokerConfig.load(environ={"RELAY_LOG_LEVEL": "debug"}).log_level == "DEBUG"
    assert main(["serve", "--print-config", "--log-level", "error", "--log-format", "json"]) == 0
    out = capsys.readouterr().out
    assert 'log_level = "ERROR"\n' in out and 'log_format = "json"\n' in out
    with pytest.raises(ConfigError, match="log_level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, not 'LOUD'"):
        BrokerConfig(log_level="loud")
    with pytest.raises(ConfigError, match="log_format must be one of text, json, not 'xml'"):
        BrokerConfig(log_format="xml")


async def test_a_sessions_own_events_name_it_even_when_another_session_ends_it(broker: Broker) -> None:
    """bob's second connection takes his mailbox over: the first session's closing line names the first session
    (the takeover runs in the second's task), the second's open line the second, with their fields."""
    out, logging_to = logged("json")
    with logging_to, trio.fail_after(TIMEOUT_S):
        assert broker.tcp_port is not None
        first, welcome1 = await RawClient.login(broker.tcp_port, broker.auth.issue("bob"))
        await first.expect(Drained)
        second, welcome2 = await RawClient.login(broker.tcp_port, broker.auth.issue("bob"))
        assert (await first.expect(Error)).code == ErrorCode.CONNECTED_ELSEWHERE
        await second.expect(Drained)
        await first.aclose()
        await second.aclose()
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    opened = [(e["session"], e["fields"]) for e in events if e["message"] == "open: bob"]
    assert opened == [(s, {"mailbox": "bob", "operator": False}) for s in (welcome1.session, welcome2.session)]
    closed = [(e["session"], e["fields"]["code"]) for e in events if e["message"].startswith("closing: ")]
    assert (welcome1.session, int(ErrorCode.CONNECTED_ELSEWHERE)) in closed


@pytest.mark.parametrize("form", ["json", "text"])
@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_the_log_at_debug_holds_no_body_and_no_token_on_any_transport(
    tmp_path: Path, kind: str, form: str
) -> None:
    """A broker process at DEBUG: alice sends bob a body over TCP, bob answers over WebSocket, alice sends another
    over HTTP, and a forged token is refused on each. Every line is one event of the form, sessions are named, and
    neither a body (raw or base64) nor any token (or its signature) is anywhere in the log."""
    bodies = [f"recognisable body {i} {secrets.token_hex(16)}".encode() for i in range(3)]
    async with relay(tmp_path, kind, "--log-format", form) as (auth, _, held):
        alice_token, bob_token = auth.issue("alice"), auth.issue("bob")
        forged = Authenticator(secrets.token_bytes(32)).issue("mallory")
        urls = held.urls
        with trio.fail_after(TIMEOUT_S):
            async with (
                open_client(urls["tcp"], alice_token, e2e=False) as alice,
                open_client(urls["ws"], bob_token, e2e=False) as bob,
            ):
                await alice.send("bob", bodies[0])
                async for delivery in bob.deliveries():
                    assert delivery.body == bodies[0]
                    bob.ack(delivery.id)
                    break
                await bob.send("alice", bodies[1])
                sessions = {alice.welcome.session, bob.welcome.session}  # type: ignore[union-attr]
            async with httpx.AsyncClient(base_url=urls["http"], timeout=TIMEOUT_S) as http:
                body = base64.b64encode(bodies[2]).decode()
                sent = await http.post(
                    "/relay/send",
                    headers={"Authorization": f"Bearer {alice_token}"},
                    json={"id": "h1", "to": ["bob"], "body": body},
                )
                assert sent.status_code == 200, sent.text
                pending = await http.get("/relay/pending", headers={"Authorization": f"Bearer {bob_token}"})
                assert [m["body"] for m in pending.json()["messages"]] == [body]
                refused = await http.get("/relay/pending", headers={"Authorization": f"Bearer {forged}"})
                assert refused.status_code == 401
            for url in (urls["tcp"], urls["ws"]):
                with pytest.raises(AuthenticationError):
                    async with open_client(url, forged, e2e=False, reconnect=False):
                        pass
    text = held.log.read_text()
    lines = text.splitlines()
    if form == "json":
        events = [json.loads(line) for line in lines]
        assert all(list(e) == KEYS for e in events)
        named = {e["session"] for e in events if e["message"] in ("open: alice", "open: bob")}
        refusals = [e for e in events if e["message"].startswith("closing: INVALID_TOKEN")]
    else:
        assert all(re.match(rf"(\S+) {TIME} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ", line) for line in lines)
        named = {line.split(" ", 1)[0] for line in lines if re.search(r" broker\.session: open: (alice|bob) ", line)}
        refusals = [line for line in lines if "closing: INVALID_TOKEN" in line]
    assert sessions <= named, "each session's open event names it"
    assert len(refusals) == 2, "the forged token refused over TCP and over WebSocket, each logged once"
    secrets_in_log = [
        *bodies,
        *(base64.b64encode(b) for b in bodies),
        *(t.encode() for t in (alice_token, bob_token, forged)),
        *(t.rsplit(".", 1)[1].encode() for t in (alice_token, bob_token, forged)),  # a signature alone
    ]
    data = held.log.read_bytes()
    assert [s for s in secrets_in_log if s in data] == []


async def test_the_log_level_from_the_config_holds_back_info(tmp_path: Path) -> None:
    """At WARNING (a flag after the DEBUG one), a broker that served a session writes no INFO or DEBUG line."""
    async with relay(tmp_path, "memory", "--log-level", "WARNING") as (auth, url, held):
        with trio.fail_after(TIMEOUT_S):
            async with open_client(url, auth.issue("alice"), e2e=False) as alice:
                await alice.send("bob", b"hello")
    levels = {line.split(" ", 3)[2] for line in held.log.read_text().splitlines()}
    assert levels <= {"WARNING", "ERROR", "CRITICAL"}, levels
