"""relay-bench is installed by the plain install: without the bench extra it says in one line how to get it."""

from __future__ import annotations

import subprocess
import sys


def test_relay_bench_without_its_extra_says_how_to_install_it() -> None:
    code = "import sys; sys.modules['rich'] = None; import bench; sys.exit(bench.main(['--help']))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr  # one line, no traceback
    assert "pip install 'relay[bench]'" in result.stderr
