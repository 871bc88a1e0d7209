"""Helpers for the wire tests: reading the golden vectors and protocol.md, and sample frames."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from wire import Welcome

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "tests" / "vectors"
PROTOCOL_MD = ROOT / "protocol.md"


def load_vectors(name: str) -> list[dict[str, Any]]:
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))


def from_json(value: Any) -> Any:
    """The vector JSON form back to Python: {"$bytes": hex} -> bytes."""
    if isinstance(value, dict):
        if set(value) == {"$bytes"}:
            return bytes.fromhex(value["$bytes"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def plain(value: Any) -> Any:
    """A to_wire() map normalised for comparison (tuples -> lists, enums -> str)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, str):
        return str(value)
    return value


def section(doc: str, heading: str) -> str:
    """The text under a markdown heading, up to the next heading of the same or a higher level."""
    match = re.search(rf"^(#+) {re.escape(heading)}\s*$", doc, re.M)
    assert match, f"no heading {heading!r} in protocol.md"
    level = len(match.group(1))
    rest = doc[match.end() :]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return rest[: end.start()] if end else rest


def welcome(*, session: str = "s1", mailbox: str | None = "alice", max_frame_bytes: int = 1048576) -> Welcome:
    """A WELCOME with the broker's default limits; ``mailbox=None`` for an operator session."""
    return Welcome(
        version=1,
        session=session,
        mailbox=mailbox,
        pending=0,
        max_frame_bytes=max_frame_bytes,
        max_inflight=4096,
        max_recipients=100,
        default_ttl_s=604800,
        max_ttl_s=2592000,
        keepalive_s=60,
        expires_in_s=3600,
    )
