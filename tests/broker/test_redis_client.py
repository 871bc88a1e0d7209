"""Redis URLs and clients (broker/redis_client.py): every URL rule, real connections (standalone,
cluster, TLS against a test CA), and Redis failures arriving as OSError."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import trio

from broker.redis_client import RedisTarget, RedisUnavailable, open_redis, parse_redis_url, redis_errors

from ..conftest import require_service
from ..redis_servers import REDIS_SERVER, RedisCluster, RedisServer, running_tls_redis


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("redis://127.0.0.1:6380/2", RedisTarget((("127.0.0.1", 6380),), cluster=False, tls=False, db=2)),
        ("redis://localhost", RedisTarget((("localhost", 6379),), cluster=False, tls=False)),
        ("redis://h:1/", RedisTarget((("h", 1),), cluster=False, tls=False)),
        ("REDIS://h", RedisTarget((("h", 6379),), cluster=False, tls=False)),
        (
            "redis://relay:p%40ss@h:7/0",
            RedisTarget((("h", 7),), cluster=False, tls=False, username="relay", password="p@ss"),
        ),
        ("redis://:secret@h", RedisTarget((("h", 6379),), cluster=False, tls=False, password="secret")),
        ("redis://[::1]:6390", RedisTarget((("::1", 6390),), cluster=False, tls=False)),
        ("rediss://h:6380", RedisTarget((("h", 6380),), cluster=False, tls=True)),
        (
            "rediss://h?ssl_ca_certs=/etc/ca.pem",
            RedisTarget((("h", 6379),), cluster=False, tls=True, ssl_ca_certs="/etc/ca.pem"),
        ),
        (
            "redis+cluster://a:7000,b:7001,[::1]:7002",
            RedisTarget((("a", 7000), ("b", 7001), ("::1", 7002)), cluster=True, tls=False),
        ),
        ("redis+cluster://a", RedisTarget((("a", 6379),), cluster=True, tls=False)),
        ("rediss+cluster://u:p@a:1,b:2/", RedisTarget((("a", 1), ("b", 2)), True, True, username="u", password="p")),
    ],
)
def test_redis_urls(url: str, target: RedisTarget) -> None:
    assert parse_redis_url(url) == target


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("http://h", "must start with one of"),
        ("h:6379", "must start with one of"),
        ("redis://", "missing host"),
        ("redis://:6379", "missing host"),
        ("redis://h:0", "bad port"),
        ("redis://h:65536", "bad port"),
        ("redis://h:x", "bad port"),
        ("redis://h/x", "bad database"),
        ("redis://a:1,b:2", "use redis\\+cluster://"),
        ("redis+cluster://a:1,b:2/3", "names no database"),
        ("redis+cluster://a:1,,b:2", "missing host"),
        ("redis://[::1", "bad Redis URL"),
        ("redis://[::1]x", "bad IPv6"),
        ("redis://h?timeout=3", "unknown option 'timeout'"),
        ("redis://h?ssl_ca_certs=/ca.pem", "needs a TLS URL"),
        ("rediss://h?ssl_ca_certs=", "must name one file"),
        ("rediss://h?ssl_ca_certs=a&ssl_ca_certs=b", "must name one file"),
        ("redis://h#frag", "fragment"),
    ],
)
def test_bad_redis_urls_say_what_is_wrong(url: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        parse_redis_url(url)


async def test_a_standalone_url_connects(redis_server: RedisServer) -> None:
    async with open_redis(redis_server.url) as client:
        assert await client.ping() == b"PONG"
        await client.set("redis-client-test", b"\x00\xff")
        assert await client.get("redis-client-test") == b"\x00\xff"  # bytes, not decoded


async def test_a_cluster_url_connects_to_every_shard(redis_cluster: RedisCluster) -> None:
    async with open_redis(redis_cluster.url) as client:
        keys = [f"redis-client-test-{i}" for i in range(30)]  # spread over the three shards' slots
        for key in keys:
            await client.set(key, key.encode())
        assert [await client.get(key) for key in keys] == [key.encode() for key in keys]


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)


def _test_ca(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it (openssl CLI): (ca, cert, key)."""
    ca, ca_key, cert, key, csr = (directory / n for n in ("ca.pem", "ca.key", "cert.pem", "key.pem", "cert.csr"))
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=relay test CA")
    _openssl("req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
    san = directory / "san.ext"
    san.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        csr,
        "-CA",
        ca,
        "-CAkey",
        ca_key,
        "-CAcreateserial",
        "-out",
        cert,
        "-days",
        "2",
        "-extfile",
        san,
    )
    return ca, cert, key


async def test_tls_verifies_the_server_against_the_given_ca(tmp_path: Path) -> None:
    require_service(REDIS_SERVER is not None, "redis-server")
    ca, cert, key = _test_ca(tmp_path)
    with running_tls_redis(tmp_path / "redis", cert, key, ca) as (_, tls_port):
        async with open_redis(f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={ca}") as client:
            assert await client.ping() == b"PONG"
        # The system trust store does not know the test CA: the handshake fails, as an OSError.
        async with open_redis(f"rediss://127.0.0.1:{tls_port}/0") as client:
            with trio.fail_after(30), pytest.raises(RedisUnavailable), redis_errors():
                await client.ping()


async def test_a_dead_server_is_an_oserror() -> None:
    async with open_redis("redis://127.0.0.1:1/0") as client:
        with trio.fail_after(30), pytest.raises(OSError), redis_errors():
            await client.ping()


async def test_the_blocks_own_error_comes_out_unwrapped(redis_server: RedisServer) -> None:
    with pytest.raises(KeyError):
        async with open_redis(redis_server.url) as client:
            await client.ping()
            raise KeyError("mine")
