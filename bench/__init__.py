"""``relay-bench``: how users size Relay and how we prove its speed.

Scenarios (:mod:`bench.scenarios`): ``latency``, ``throughput``, ``offline``, ``fanout`` and
``connections``. Each runs against a broker the bench starts itself as a subprocess (so the
broker's CPU and memory are measured apart from the load generator) or against ``--url`` of a
running broker. Load comes from worker processes (:mod:`bench.worker`) that use only the public
client API; results are reported as a table, ``--json`` and ``--plot`` (:mod:`bench.reporting`).
"""

from .cli import main

__all__ = ["main"]
