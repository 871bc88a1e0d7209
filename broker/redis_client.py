"""The one way Relay makes a Redis client from a URL, and the one place Redis failures become OSError.

Theory of operation. :func:`parse_redis_url` turns a store or presence URL into a
:class:`RedisTarget` (pure, so every rule is unit-tested without a server);
:func:`open_redis` makes the coredis client for it, standalone (``coredis.Redis``) or
cluster (``coredis.RedisCluster``), always with ``decode_responses=False`` (bodies are
bytes), opens it for the ``async with`` block and closes it after. URL forms:

- ``redis://[user:password@]host[:port][/db]`` (port 6379, db 0 by default);
- ``rediss://...``: the same over TLS, the server's certificate verified against the
  system trust store, or against the PEM file named by ``?ssl_ca_certs=/path``;
- ``redis+cluster://[user:password@]host1:port1,host2:port2`` (``rediss+cluster://`` for
  TLS): one or more seed nodes of a Redis Cluster; no db (a cluster has only db 0).

Every client gets :data:`CONNECT_TIMEOUT_S` and :data:`COMMAND_TIMEOUT_S`, so a Redis
that stops answering surfaces as an error instead of a hang. :func:`redis_errors` is
the translation of coredis's failures to reach Redis (its ``ConnectionError``, which is
not an ``OSError``, timeouts, a cluster that is down or re-sharding, a read-only replica
after a failover) into :class:`RedisUnavailable`, an ``OSError``: the Store and Presence
protocols promise their callers OSError for a networked backend that cannot be reached;
:func:`unreachable` is the same judgement for code that catches coredis's errors itself.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import coredis
from coredis.exceptions import ConnectionError as RedisConnectionError
from coredis.exceptions import ReadOnlyError, RedisClusterError
from coredis.typing import Node

__all__ = [
    "COMMAND_TIMEOUT_S",
    "CONNECT_TIMEOUT_S",
    "RedisTarget",
    "RedisUnavailable",
    "open_redis",
    "parse_redis_url",
    "redis_errors",
    "unreachable",
]

DEFAULT_PORT = 6379
CONNECT_TIMEOUT_S = 5.0
"""How long making one connection to a Redis node may take before it counts as unreachable."""
COMMAND_TIMEOUT_S = 30.0
"""How long one command or pipeline may wait for its reply (far above any script's run time)."""

_SCHEMES = {
    "redis": (False, False),
    "rediss": (True, False),
    "redis+cluster": (False, True),
    "rediss+cluster": (True, True),
}
"""scheme -> (TLS, cluster)."""


class RedisUnavailable(ConnectionError):
    """Redis could not be reached or could not serve the command (an OSError, as the store contract says)."""


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """What a Redis URL names: where, how, and as whom."""

    nodes: tuple[tuple[str, int], ...]
    """(host, port) of the server, or of each cluster seed node."""
    cluster: bool
    tls: bool
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl_ca_certs: str | None = None
    """A PEM file of CAs to verify the server against instead of the system trust store."""


def _host_port(item: str, url: str) -> tuple[str, int]:
    if item.startswith("["):  # [IPv6]:port
        host, sep, rest = item[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad IPv6 address {item!r} in Redis URL {url!r}")
        port_text = rest[1:]
    else:
        host, _, port_text = item.partition(":")
    if not host:
        raise ValueError(f"missing host in Redis URL {url!r}")
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port {port_text!r} in Redis URL {url!r} (1-65535)")
    return host, int(port_text)


def _db(path: str, cluster: bool, url: str) -> int:
    name = path.lstrip("/")
    if not name:
        return 0
    if cluster:
        raise ValueError(f"a cluster URL names no database (a Redis Cluster has only db 0): {url!r}")
    if not name.isdigit():
        raise ValueError(f"bad database {name!r} in Redis URL {url!r} (a number, e.g. /0)")
    return int(name)


def parse_redis_url(url: str) -> RedisTarget:
    """Parse a Redis URL (see the module docstring). Raises ValueError saying what is wrong."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. an unclosed [IPv6 bracket
        raise ValueError(f"bad Redis URL {url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ValueError(f"Redis URL {url!r} must start with one of {', '.join(s + '://' for s in _SCHEMES)}")
    tls, cluster = _SCHEMES[scheme]
    if parts.fragment:
        raise ValueError(f"Redis URL {url!r} must not have a #fragment")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, has_password, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    items = hosts.split(",")
    if not cluster and len(items) > 1:
        raise ValueError(f"Redis URL {url!r} names several hosts: use redis+cluster:// for a cluster")
    nodes = tuple(_host_port(item, url) for item in items)
    ca: str | None = None
    for key, values in parse_qs(parts.query, keep_blank_values=True, strict_parsing=False).items():
        if key != "ssl_ca_certs":
            raise ValueError(f"unknown option {key!r} in Redis URL {url!r} (known: ssl_ca_certs)")
        if not tls:
            raise ValueError(f"ssl_ca_certs needs a TLS URL (rediss:// or rediss+cluster://): {url!r}")
        if len(values) != 1 or not values[0]:
            raise ValueError(f"ssl_ca_certs in Redis URL {url!r} must name one file")
        ca = values[0]
    return RedisTarget(nodes, cluster, tls, _db(parts.path, cluster, url), username, password, ca)


def _ssl_context(target: RedisTarget) -> ssl.SSLContext | None:
    """Certificate and host name verified: against the given CA file, else the system trust store."""
    if not target.tls:
        return None
    return ssl.create_default_context(cafile=target.ssl_ca_certs)


def make_client(target: RedisTarget) -> coredis.Redis[bytes] | coredis.RedisCluster[bytes]:
    """The (not yet opened) coredis client for ``target``. Raises OSError if the CA file cannot be read."""
    context = _ssl_context(target)
    # The same credentials, timeouts, TLS and byte replies for either kind of client.
    common: dict[str, Any] = {
        "username": target.username,
        "password": target.password,
        "connect_timeout": CONNECT_TIMEOUT_S,
        "stream_timeout": COMMAND_TIMEOUT_S,
        "ssl": context is not None,
        "ssl_context": context,
        "decode_responses": False,
    }
    if target.cluster:
        return coredis.RedisCluster(startup_nodes=[Node(host=h, port=p) for h, p in target.nodes], **common)
    [(host, port)] = target.nodes
    return coredis.Redis(host, port, target.db, **common)


_FAILURES = (RedisConnectionError, RedisClusterError, ReadOnlyError, TimeoutError)
"""coredis's ways of saying Redis cannot be reached or cannot serve now."""


@contextmanager
def redis_errors() -> Iterator[None]:
    """Re-raise a failure to reach or use Redis as :class:`RedisUnavailable` (an OSError); others pass."""
    try:
        yield
    except _FAILURES as exc:
        raise RedisUnavailable(f"Redis unavailable: {exc}") from exc


def unreachable(exc: BaseException) -> OSError | None:
    """``exc`` as the OSError :func:`redis_errors` would make of it (or it is already), or None if it is not a
    failure to reach or use Redis (e.g. a script error): for code that catches coredis's errors itself."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, _FAILURES):
        return RedisUnavailable(f"Redis unavailable: {exc}")
    return None


def _lone_error(group: BaseExceptionGroup[BaseException]) -> Exception | None:
    """The one Exception a group (nested or not) holds, or None if it holds several or a BaseException."""
    inner: BaseException = group
    while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
        inner = inner.exceptions[0]
    return inner if isinstance(inner, Exception) and not isinstance(inner, BaseExceptionGroup) else None


@asynccontextmanager
async def open_redis(url: str) -> AsyncIterator[coredis.Redis[bytes] | coredis.RedisCluster[bytes]]:
    """A coredis client for ``url``, open for the block and closed after it.

    Raises ValueError for a bad URL. The client connects lazily: an unreachable Redis
    shows at the first command (as :class:`RedisUnavailable` through :func:`redis_errors`).
    coredis runs the block inside its own nursery, which wraps whatever the block raises
    in an ExceptionGroup; a group of one Exception is unwrapped here (a Redis failure
    becomes :class:`RedisUnavailable`), so the caller sees the exception its block raised.
    """
    client = make_client(parse_redis_url(url))
    try:
        async with client:
            yield client
    except BaseExceptionGroup as group:
        lone = _lone_error(group)
        if lone is None:
            raise
        if isinstance(lone, _FAILURES):
            raise RedisUnavailable(f"Redis unavailable at {url!r}: {lone}") from lone
        raise lone from None
