"""protocol.md and the code agree: error table, frame list, field tables; the core imports no trio."""

from __future__ import annotations

import re
import subprocess
import sys

from wire import FRAME_TYPES, ErrorCode, Receipt

from .support import ROOT, section

ERROR_ROW = re.compile(
    r"^\|\s*(\d{4})\s*\|\s*([A-Z][A-Z0-9_]*)\s*\|\s*(yes|no|— \((?:receipt|key_put_result)\))\s*\|(.+)\|\s*$", re.M
)


def test_error_table_matches_error_code(protocol_md: str) -> None:
    rows = ERROR_ROW.findall(section(protocol_md, "7. Error codes"))
    documented = {int(code): name for code, name, _, _ in rows}
    assert len(documented) == len(rows), "an error code is listed twice"
    assert documented == {int(c): c.name for c in ErrorCode}


def test_error_table_fatality_follows_the_ranges(protocol_md: str) -> None:
    for code, name, fatal, when in ERROR_ROW.findall(section(protocol_md, "7. Error codes")):
        assert when.strip(), f"{name} has no description"
        number = int(code)
        if 3000 <= number < 4000:
            assert fatal in ("— (receipt)", "— (key_put_result)"), name
        elif number == ErrorCode.FORBIDDEN:
            assert fatal == "no"
        else:
            assert fatal == "yes", name


def test_every_frame_type_has_a_section(protocol_md: str) -> None:
    frames = section(protocol_md, "6. Frames")
    headings = set(re.findall(r"^### `([a-z_]+)`\s*$", frames, re.M))
    assert headings == set(FRAME_TYPES)


def test_every_frame_field_is_documented_and_nothing_else(protocol_md: str) -> None:
    frames = section(protocol_md, "6. Frames")
    for name, cls in FRAME_TYPES.items():
        text = section(frames, f"`{name}`")
        keys = set(re.findall(r"^\|\s*`([a-z_]+)`\s*\|", text, re.M))
        assert keys == {key for key, _ in cls._WIRE}, name
    receipt = section(frames, "`receipt`")
    assert {"status", "code"} == set(re.findall(r"^\|\s*`results\.\*\.([a-z_]+)`", receipt, re.M))
    assert Receipt._WIRE == (
        ("id", "id"),
        ("results", "results"),
        ("code", "code"),
        ("retry_after_ms", "retry_after_ms"),
    )


def test_importing_wire_does_not_import_trio() -> None:
    code = (
        "import sys, wire; "
        "bad = [m for m in ('trio', 'trio_websocket', 'broker', 'client') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
