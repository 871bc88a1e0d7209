"""The README's "On the internet: TLS" works when copied: its three shell blocks, run as written in one directory
(the venv is linked in as ``.venv``), but with free ports in place of the default ones (8700, 8781, 8780). The first
makes the CA and certificate with trustme and serves TLS only; bob listens over ``tls://``; alice sends over
``wss://``, bob gets it, and curl reads the HTTP API's description over ``https://``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import trio

from ..conftest import require_service

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 60
DEFAULT_PORTS = {"tls": 8700, "wss": 8781, "https": 8780}
SERVE = re.compile(r"^relay-broker serve .*$", re.M)
# The announcement's first two lines (broker/cli.py _announce) with every listener's port.
_LISTENING = re.compile(
    rb"listening on tls://127\.0\.0\.1:(\d+) .*\nWebSocket wss://127\.0\.0\.1:(\d+)/relay, "
    rb"HTTP API https://127\.0\.0\.1:(\d+)/relay\n"
)


def _blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"^## On the internet: TLS\n(.*?)^## ", readme, re.S | re.M)
    assert found, "README.md has no '## On the internet: TLS' section"
    blocks = re.findall(r"^```sh\n(.*?)^```\n", found.group(1), re.S | re.M)
    assert len(blocks) == 3, "the section should have three sh blocks: the broker, bob, alice"
    return [str(block) for block in blocks]


def _with_ports(block: str, ports: dict[str, int]) -> str:
    for scheme, default in DEFAULT_PORTS.items():
        block = block.replace(f":{default}", f":{ports[scheme]}")
    return block


async def test_the_readme_s_tls_walkthrough_works_when_copied(tmp_path: Path) -> None:
    require_service(shutil.which("curl") is not None, "curl")
    broker_block, bob_block, alice_block = _blocks()
    serve = SERVE.search(broker_block)
    assert serve, "the first block should start the broker"
    for scheme, port in DEFAULT_PORTS.items():
        assert f":{port}" in bob_block + alice_block, f"the clients should use the default {scheme} port {port}"
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parents[1])
    # Everything the blocks run shares one data dir (the broker's secret for `relay-broker token`); the broker
    # takes free ports (RELAY_* settings; the serve line itself stays as written).
    env = {**os.environ, "RELAY_DATA_DIR": str(tmp_path / "data")}
    env.update({f"RELAY_{scheme.upper()}_PORT": "0" for scheme in DEFAULT_PORTS})
    set_up = broker_block[: serve.start()]
    subprocess.run(["bash", "-euc", set_up], cwd=tmp_path, env=env, check=True, timeout=TIMEOUT_S)
    log = (tmp_path / "broker.log").open("wb")
    broker = await trio.lowlevel.open_process(
        ["bash", "-euc", f". .venv/bin/activate\nexec {serve.group(0)}"], cwd=tmp_path, env=env, stdout=-1, stderr=log
    )
    listener: trio.Process | None = None
    try:
        with trio.fail_after(TIMEOUT_S):
            assert broker.stdout is not None
            seen = b""
            while (match := _LISTENING.search(seen)) is None:
                chunk = await broker.stdout.receive_some(4096)
                assert chunk, f"the broker exited: {seen!r} {(tmp_path / 'broker.log').read_text()!r}"
                seen += chunk
            ports = dict(zip(DEFAULT_PORTS, map(int, match.groups()), strict=True))
            listener = await trio.lowlevel.open_process(
                ["bash", "-euc", _with_ports(bob_block, ports)], cwd=tmp_path, env=env, stdout=-1, stderr=-1
            )
            assert listener.stdout is not None and listener.stderr is not None
            heard = b""
            while b"connected to" not in heard:  # relay listen says so on stderr once WELCOME is in
                chunk = await listener.stderr.receive_some(4096)
                assert chunk, f"relay listen exited: {heard!r}"
                heard += chunk
            sent = await trio.run_process(
                ["bash", "-euc", _with_ports(alice_block, ports)], cwd=tmp_path, env=env, capture_stdout=True
            )
            out = sent.stdout.decode()
            assert '"status": "delivered"' in out, out
            assert '"openapi"' in out, f"curl over https should print the start of openapi.json: {out!r}"
            got = b""
            while b"hello over TLS" not in got:
                chunk = await listener.stdout.receive_some(4096)
                assert chunk, f"relay listen exited before the message: {got!r}"
                got += chunk
    finally:
        for process in (listener, broker):
            if process is not None:
                process.kill()
                await process.wait()
        log.close()
