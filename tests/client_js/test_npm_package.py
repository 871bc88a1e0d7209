"""The browser client as an npm package: ``npm pack`` in client/js, the tarball installed into a fresh project,
its types checked there (the package's typed examples and its README's ten lines), and the installed copy used
under Node against a real broker (a codec round trip, an e2e seal and open, then alice -> bob over WebSocket, ACKed,
nothing pending)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import trio

from broker.server import Broker

from ..conftest import require_service

JS_DIR = Path(__file__).resolve().parents[2] / "client" / "js"
TSC = JS_DIR / "node_modules" / "typescript" / "bin" / "tsc"
CHECK_SCRIPT = Path(__file__).with_name("package_check.mjs")
MODULES = ("index", "client", "codec", "e2e", "store")
PACKED_FILES = sorted(["package.json", "README.md", *(f"{m}.{ext}" for m in MODULES for ext in ("js", "d.ts"))])
"""Exactly what the tarball holds: package.json, README.md, the modules and their declarations."""
NPM_QUIET = ["--prefer-offline", "--no-audit", "--no-fund", "--loglevel=error"]
"""Cached packages first (setup.sh's `npm ci` filled the cache with cborg and @hpke/core); no audit or funding."""
README_PREAMBLE = "declare const token: string\ndeclare function show(from: string, text: string): void\n"
"""What the README's example takes from the page around it."""
TIMEOUT_S = 120
"""Pack, install (from the cache when it can), type-check and run: a few seconds here; generous for a cold cache."""


async def _run(*cmd: str | Path, cwd: Path) -> str:
    """Run ``cmd`` in ``cwd``; its stdout, or a failure showing both streams."""
    done = await trio.run_process([str(c) for c in cmd], cwd=cwd, capture_stdout=True, capture_stderr=True, check=False)
    out, err = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} (in {cwd}) exited {done.returncode}:\n{out}\n{err}"
    return out


def _readme_example() -> str:
    """The README's "Ten lines" code block, as a TypeScript module (its free names declared)."""
    readme = (JS_DIR / "README.md").read_text()
    found = re.search(r"^## Ten lines\n\n```js\n(.*?)^```", readme, re.S | re.M)
    assert found, "client/js/README.md has no '## Ten lines' js block"
    code = found.group(1)
    assert len(code.strip().splitlines()) <= 11, "the README's example is longer than ten lines (plus its blank line)"
    return README_PREAMBLE + code


async def _node_websocket_flags(node: str) -> list[str]:
    """Node 22 has a global WebSocket; Node 20 needs --experimental-websocket for it."""
    probe = await trio.run_process([node, "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"], check=False)
    return [] if probe.returncode == 0 else ["--experimental-websocket"]


async def test_packed_tarball_installs_in_a_fresh_project_and_talks_to_a_broker(broker: Broker, tmp_path: Path) -> None:
    node, npm = shutil.which("node"), shutil.which("npm")
    require_service(node is not None and npm is not None and TSC.exists(), "node, npm and client/js's npm ci")
    assert node is not None and npm is not None
    version = json.loads((JS_DIR / "package.json").read_text())["version"]
    with trio.fail_after(TIMEOUT_S):
        packing = await _run(npm, "pack", "--json", "--pack-destination", tmp_path, *NPM_QUIET, cwd=JS_DIR)
        (packed,) = json.loads(packing)
        assert (packed["name"], packed["version"]) == ("@relay/client", version)
        assert sorted(f["path"] for f in packed["files"]) == PACKED_FILES

        app = tmp_path / "app"
        app.mkdir()
        (app / "package.json").write_text(json.dumps({"name": "relay-app", "private": True, "type": "module"}))
        await _run(npm, "install", *NPM_QUIET, tmp_path / packed["filename"], cwd=app)
        installed = json.loads((app / "node_modules" / "@relay" / "client" / "package.json").read_text())
        assert list(installed["dependencies"]) == ["@hpke/core", "cborg"]
        for dependency in ("cborg", "@hpke/core", "@hpke/common"):
            assert (app / "node_modules" / dependency / "package.json").exists(), dependency

        # The types as an app sees them, through the installed package's exports: its typed examples, its README's.
        examples = sorted(p.name for p in (JS_DIR / "examples").glob("*.ts"))
        for name in examples:
            shutil.copy(JS_DIR / "examples" / name, app / name)
        (app / "readme.ts").write_text(_readme_example())
        tsconfig = json.loads((JS_DIR / "tsconfig.json").read_text())
        (app / "tsconfig.json").write_text(json.dumps({**tsconfig, "include": [*examples, "readme.ts"]}))
        await _run(node, TSC, "-p", app, cwd=app)

        shutil.copy(CHECK_SCRIPT, app / "main.mjs")
        url = f"ws://127.0.0.1:{broker.ws_port}/relay"
        flags = await _node_websocket_flags(node)
        alice, bob = broker.auth.issue("alice"), broker.auth.issue("bob")
        result = json.loads(await _run(node, *flags, "main.mjs", url, alice, bob, cwd=app))

    assert result["resolved"] == str(app / "node_modules" / "@relay" / "client" / "index.js")
    assert result["inboxKey"] == ["from", "id"]
    assert result["decoded"] == {"type": "send", "id": "m-pack", "to": ["bob"], "body": "packed", "ttl_s": 60}
    assert result["refused"] == {"local": True, "invalidField": True}
    assert result["e2e"] == "sealed in the tarball"
    assert result["welcome"] == "bob"
    assert result["receipt"]["results"] == {"bob": {"status": "delivered"}}
    assert result["message"] == {"from": "alice", "body": "hello from the tarball", "state": "acked"}
    assert result["pending"] == 0
