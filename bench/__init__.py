"""``relay-bench``: how users size Relay and how we prove its speed.

Scenarios (:mod:`bench.scenarios`): ``latency``, ``throughput``, ``offline``, ``fanout`` and
``connections``. Each runs against a broker the bench starts itself as a subprocess (so the
broker's CPU and memory are measured apart from the load generator) or against ``--url`` of a
running broker. Load comes from worker processes (:mod:`bench.worker`) that use only the public
client API; results are reported as a table, ``--json`` and ``--plot`` (:mod:`bench.reporting`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]

EXTRA_PACKAGES = ("rich", "hdrh", "psutil", "matplotlib")
"""What the ``bench`` extra installs (hdrhistogram imports as ``hdrh``); the broker and client need none of it."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``relay-bench`` (see :mod:`bench.cli`); without the bench extra, say in one line how to get it (exit 2)."""
    try:
        from .cli import main as run
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in EXTRA_PACKAGES:
            raise
        print(
            f"relay-bench: the benchmark needs the 'bench' extra ({exc.name} is missing): "
            "pip install 'relay[bench]', or from a checkout: pip install -e '.[bench]'",
            file=sys.stderr,
        )
        return 2
    return run(argv)
