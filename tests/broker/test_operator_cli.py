"""relay-broker stats and cleanup against a running broker (they are clients with an operator token)."""

from __future__ import annotations

import json
import re

import pytest
import trio

from broker.cli import main
from broker.server import Broker
from wire import Drained, Receipt, Send

from .raw import RawClient

TIMEOUT = 20


def without_connections(stats: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in stats.items() if k != "connections"}


async def run_cli(*argv: str) -> int:
    # main() runs its own trio loop, so it runs in a thread beside the broker's.
    return await trio.to_thread.run_sync(main, list(argv))


async def test_stats_and_cleanup_commands(broker: Broker, capsys: pytest.CaptureFixture[str]) -> None:
    with trio.fail_after(TIMEOUT):
        assert broker.tcp_port is not None
        url, data_dir = f"tcp://127.0.0.1:{broker.tcp_port}", str(broker.config.data_dir)
        alice, _ = await RawClient.login(broker.tcp_port, broker.auth.issue("alice"))
        await alice.expect(Drained)
        await alice.send(Send(id="m1", to=("bob",), body=b"four"), Send(id="m2", to=("bob",), body=b"", ttl_s=1))
        await alice.expect(Receipt)
        await alice.expect(Receipt)

        assert await run_cli("stats", "--url", url, "--data-dir", data_dir, "--json") == 0
        stats = json.loads(capsys.readouterr().out)
        # Every figure but "connections", which counts the CLI's own (still closing) sessions.
        assert without_connections(stats) == without_connections(await broker.statistics())
        assert (stats["messages_total"], stats["queued_bytes"], stats["online_users"]) == (2, 4, 1)

        assert await run_cli("stats", "--url", url, "--data-dir", data_dir) == 0
        rows = [line.split() for line in capsys.readouterr().out.splitlines()]
        assert [name for name, _ in rows] == sorted(stats)  # one aligned "name  value" row each, sorted
        assert without_connections({name: int(value) for name, value in rows}) == without_connections(stats)

        while (await broker.statistics())["messages_deliverable"] != 1:
            await trio.sleep(0.1)  # m2's one-second TTL runs out
        assert await run_cli("cleanup", "--url", url, "--data-dir", data_dir) == 0
        assert capsys.readouterr().out == "purged 1 expired messages\n"
        assert (await broker.statistics())["expired_total"] == 1


async def test_operator_commands_report_an_unreachable_broker(
    tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(TIMEOUT):
        listener = trio.socket.socket()
        await listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        listener.close()  # a port nothing listens on
        assert await run_cli("stats", "--url", f"tcp://127.0.0.1:{port}", "--data-dir", str(tmp_path)) == 1
        err = capsys.readouterr().err
        assert err.startswith("relay-broker stats: ") and str(port) in err


async def test_stats_reads_the_broker_url_from_relay_url(
    broker: Broker, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(TIMEOUT):
        monkeypatch.setenv("RELAY_URL", f"tcp://127.0.0.1:{broker.tcp_port}")
        assert await run_cli("stats", "--data-dir", str(broker.config.data_dir), "--json") == 0
        assert json.loads(capsys.readouterr().out)["online_users"] == 0


# The operator commands' flags (the command line is a gate of issue 9: every flag keeps working).
OPERATOR_FLAGS = {
    "token": ["--operator", "--expires-in", "--data-dir", "--log-level"],
    "stats": ["--url", "--data-dir", "--json", "--log-level"],
    "cleanup": ["--url", "--data-dir", "--log-level"],
}


@pytest.mark.parametrize("command", sorted(OPERATOR_FLAGS))
def test_operator_commands_keep_their_flags(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    listed = set(re.findall(r"^  (--[a-z-]+)", capsys.readouterr().out, flags=re.MULTILINE))
    assert set(OPERATOR_FLAGS[command]) <= listed
