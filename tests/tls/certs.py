"""Certificates made at test time (trustme) and a broker serving every listener, plain and TLS, with one."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trustme

from broker.server import Broker

from ..conftest import running_broker

ALL = ("tcp", "ws", "http", "tls", "wss", "https")
"""Every listener the broker can serve."""


def write_leaf(leaf: trustme.LeafCert, directory: Path) -> dict[str, Path]:
    """Write ``leaf``'s certificate and key into ``directory``: the broker settings that name them."""
    directory.mkdir(parents=True, exist_ok=True)
    leaf.cert_chain_pems[0].write_to_path(directory / "cert.pem")
    leaf.private_key_pem.write_to_path(directory / "key.pem")
    return {"tls_cert_file": directory / "cert.pem", "tls_key_file": directory / "key.pem"}


@asynccontextmanager
async def tls_broker(tmp_path: Path, leaf: trustme.LeafCert, **overrides: Any) -> AsyncIterator[Broker]:
    """A broker serving every listener (free ports) with ``leaf``'s certificate, until the block ends."""
    settings = {"listeners": ALL, "tls_port": 0, "wss_port": 0, "https_port": 0, **overrides}
    async with running_broker(tmp_path, **write_leaf(leaf, tmp_path / "certs"), **settings) as broker:
        yield broker


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    """A client SSL context that trusts ``ca`` only."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context
