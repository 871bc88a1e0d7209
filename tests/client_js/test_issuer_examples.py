"""The README's "Tokens from your own backend" works when copied: its shell block makes the key pair and the
broker's key directory, its PyJWT and jose examples mint tokens the broker accepts over TCP and WebSocket. And
tokens jose makes for each algorithm (EdDSA, ES256, RS256) verify against the JWKS jose exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import trio

from ..broker.raw import RawClient
from ..conftest import require_service, running_broker
from ..websocket.wsclient import login_ws

ROOT = Path(__file__).resolve().parents[2]
JS_DIR = ROOT / "client" / "js"
SCRIPT = Path(__file__).with_name("issuer_jose.mjs")
SERVE = "relay-broker serve --token-keys-dir issuer-keys"
TIMEOUT_S = 60


def _section() -> str:
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"^## Tokens from your own backend\n(.*?)^## ", readme, re.S | re.M)
    assert found, "README.md has no '## Tokens from your own backend' section"
    return found.group(1)


def _block(language: str) -> str:
    blocks = re.findall(rf"^```{language}\n(.*?)^```\n", _section(), re.S | re.M)
    assert len(blocks) == 1, f"the section should have one {language} block"
    return str(blocks[0])


def _node() -> str:
    node = shutil.which("node")
    require_service(node is not None and (JS_DIR / "node_modules" / "jose").exists(), "node and client/js's npm ci")
    assert node is not None
    return node


async def _accepted(tmp_path: Path, keys_dir: Path, tokens: dict[str, str]) -> None:
    """Each token (for the mailbox it names) opens a session over TCP and over WebSocket."""
    async with running_broker(tmp_path / "broker", token_keys_dir=keys_dir) as broker:
        assert broker.tcp_port is not None
        for mailbox, token in tokens.items():
            client, welcome = await RawClient.login(broker.tcp_port, token)
            assert welcome.mailbox == mailbox
            await client.aclose()
            async with login_ws(broker.ws_port, token) as (_, welcome):
                assert welcome.mailbox == mailbox


def _with_jose(tmp_path: Path) -> None:
    """Make ``import "jose"`` in a script in ``tmp_path`` find client/js's (where ``npm install jose`` puts it)."""
    (tmp_path / "node_modules").symlink_to(JS_DIR / "node_modules")


def _make_keys(tmp_path: Path) -> Path:
    """The README's shell block, run as written but for the serve line (the test runs the broker in-process with
    the same setting)."""
    lines = _block("sh").splitlines()
    assert lines[-1] == SERVE, f"the shell block should end with {SERVE!r}"
    subprocess.run(["bash", "-euc", "\n".join(lines[:-1])], cwd=tmp_path, check=True, timeout=TIMEOUT_S)
    return tmp_path / "issuer-keys"


async def test_the_readme_s_pyjwt_example_mints_tokens_the_broker_accepts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_service(shutil.which("openssl") is not None, "openssl")
    keys_dir = _make_keys(tmp_path)
    monkeypatch.chdir(tmp_path)  # the example opens issuer-2026-01.key where it runs
    example: dict[str, object] = {}
    exec(compile(_block("python"), "README.md", "exec"), example)
    relay_token = example["relay_token"]
    assert callable(relay_token)
    with trio.fail_after(TIMEOUT_S):
        await _accepted(tmp_path, keys_dir, {"alice": relay_token("alice")})


async def test_the_readme_s_jose_example_mints_tokens_the_broker_accepts(tmp_path: Path) -> None:
    require_service(shutil.which("openssl") is not None, "openssl")
    node = _node()
    keys_dir = _make_keys(tmp_path)
    (tmp_path / "relay-token.mjs").write_text(_block("js"))
    _with_jose(tmp_path)
    with trio.fail_after(TIMEOUT_S):
        done = await trio.run_process([node, "relay-token.mjs", "bob"], cwd=tmp_path, capture_stdout=True, check=True)
        await _accepted(tmp_path, keys_dir, {"bob": done.stdout.decode().strip()})


async def test_jose_tokens_of_each_algorithm_verify_against_the_jwks_jose_exports(tmp_path: Path) -> None:
    node = _node()
    (tmp_path / SCRIPT.name).write_text(SCRIPT.read_text())
    _with_jose(tmp_path)
    with trio.fail_after(TIMEOUT_S):
        done = await trio.run_process([node, SCRIPT.name], cwd=tmp_path, capture_stdout=True, check=True)
        made = json.loads(done.stdout)
        (tmp_path / "jwks.json").write_text(json.dumps(made["jwks"]))
        tokens = {f"jose-{alg.lower()}": token for alg, token in made["tokens"].items()}
        assert sorted(tokens) == ["jose-eddsa", "jose-es256", "jose-rs256"]
        async with running_broker(tmp_path / "broker", token_jwks_file=tmp_path / "jwks.json") as broker:
            assert broker.tcp_port is not None
            for mailbox, token in tokens.items():
                client, welcome = await RawClient.login(broker.tcp_port, token)
                assert welcome.mailbox == mailbox
                await client.aclose()
                async with login_ws(broker.ws_port, token) as (_, welcome):
                    assert welcome.mailbox == mailbox
