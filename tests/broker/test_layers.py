"""The broker's modules import each other in layers, never in a circle.

Read from the source (ast), so imports inside functions and under TYPE_CHECKING count too:
a session gets its parts (router, presence, statistics, store) and never reaches the server
or the HTTP API; nothing below the server imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

BROKER = Path(__file__).resolve().parents[2] / "broker"

PARTS = ("authz", "delivery", "outbox", "presence", "router", "session", "stats")
"""The modules a session is made of: none may import server or http."""


def module_name(path: Path) -> str:
    rel = path.relative_to(BROKER.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """The broker modules ``path`` imports, anywhere in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("broker"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if not target.startswith("broker"):
                continue
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)  # `from . import authz`
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in BROKER.rglob("*.py")}
    return {name: imports_of(path) & modules.keys() - {name} for name, path in modules.items()}


def test_the_import_graph_parser_sees_relative_and_lazy_imports() -> None:
    g = graph()
    assert "broker.authz" in g["broker.session"], "`from . import authz` is an import of broker.authz"
    assert "broker.router" in g["broker.session"]


def test_a_sessions_parts_never_import_the_server_or_the_http_api() -> None:
    g = graph()
    for part in PARTS:
        assert not g[f"broker.{part}"] & {"broker.server", "broker.http"}, part
    assert "broker.server" not in g["broker.http"], "the HTTP API gets the broker's parts, not the Broker"


def test_no_broker_modules_import_each_other_in_a_circle() -> None:
    g = graph()
    cycles = []
    for start in g:
        stack = [(start, [start])]
        seen: set[str] = set()
        while stack:
            node, path = stack.pop()
            for nxt in g[node]:
                if nxt == start:
                    cycles.append(path)
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert cycles == []
