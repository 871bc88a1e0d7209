"""serve_http on listeners bound elsewhere (broker/listeners.py): hypercorn's public ``fd://`` bind."""

from __future__ import annotations

import gc
import warnings

import httpx
import pytest
import trio

from broker.config import BrokerConfig
from broker.http import serve_http
from broker.listeners import MemoryListener, open_listeners
from broker.server import Broker

from .parts import parts_of

TIMEOUT = 10


async def test_the_api_is_served_on_the_listener_it_is_given_and_lets_go_of_it(broker: Broker) -> None:
    """Served on the given socket's port; once stopped and the listener closed, nothing listens there any more."""
    opened = await open_listeners(BrokerConfig(tcp_port=0, ws_port=0, http_port=0, data_dir=broker.config.data_dir))
    port = opened.http_port
    assert port is not None and port != broker.http_port
    parts = parts_of(broker)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            assert await nursery.start(serve_http, parts, opened.http) == port
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                r = await http.get("/openapi.json")
            assert r.status_code == 200 and r.json()["openapi"].startswith("3.")
            nursery.cancel_scope.cancel()
        await opened.aclose()
        with trio.socket.socket() as probe, pytest.raises(ConnectionRefusedError):
            await probe.connect(("127.0.0.1", port))  # hypercorn's copy of the socket is closed too


async def test_a_memory_listener_cannot_carry_the_http_api(broker: Broker) -> None:
    parts = parts_of(broker)
    with pytest.raises(TypeError, match="socket listeners only"):
        await serve_http(parts, [MemoryListener()])
    with pytest.raises(TypeError, match="socket listeners only"):
        await serve_http(parts, [])


async def test_a_stopped_broker_listens_nowhere(tmp_path: object) -> None:
    """After serve is cancelled, none of its three ports accepts a connection (the HTTP listener it bound included)."""
    config = BrokerConfig(tcp_port=0, ws_port=0, http_port=0, data_dir=tmp_path)  # type: ignore[arg-type]
    stopped = Broker(config)
    gc.collect()  # what earlier tests left (a Redis client's streams) is not this broker's to answer for
    with trio.fail_after(TIMEOUT), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        async with trio.open_nursery() as nursery:
            await nursery.start(stopped.serve)
            ports = [stopped.tcp_port, stopped.ws_port, stopped.http_port]
            nursery.cancel_scope.cancel()
        gc.collect()
    # closed by the broker, not left for the garbage collector to find
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]
    for port in ports:
        assert port is not None
        with trio.socket.socket() as probe, pytest.raises(ConnectionRefusedError):
            await probe.connect(("127.0.0.1", port))
