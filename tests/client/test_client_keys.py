"""The trio client's raw key-directory calls, ``put_key`` and ``get_keys``, against a real broker (TCP, WebSocket).

Pinning and encryption build on these elsewhere (test_e2e_client.py); here only the plumbing: answers in order,
typed refusals, operators, bad arguments, and many mailboxes split by max_recipients. The clients are opened with
e2e=False, so they publish no key of their own on connect.
"""

from __future__ import annotations

import pickle
from typing import Any

import pytest
import trio
from relay_testing import FaultyNetwork, url_of

from broker.server import Broker
from client import ErrorCode, ForbiddenError, KeyRecord, KeyRefused, open_client
from tests.conftest import STORES
from wire import KeyGet, KeyPut
from wire.e2e import EncryptionKey, Identity, make_key_record, verify_key_record

pytestmark = pytest.mark.stores(*STORES)

TIMEOUT_S = 15


def new_record(mailbox: str) -> KeyRecord:
    return make_key_record(mailbox, Identity.generate(), EncryptionKey.generate())


def ws_url(broker: Broker) -> str:
    return f"ws://127.0.0.1:{broker.ws_port}/relay"


@pytest.mark.parametrize("transport", ["tcp", "websocket"])
async def test_put_key_then_get_keys(broker: Broker, transport: str) -> None:
    url = url_of(broker) if transport == "tcp" else ws_url(broker)
    alice_record, bob_record = new_record("alice"), new_record("bob")
    with trio.fail_after(TIMEOUT_S):
        async with (
            open_client(url, broker.auth.issue("alice"), e2e=False) as alice,
            open_client(url, broker.auth.issue("bob"), e2e=False) as bob,
        ):
            assert await alice.put_key(alice_record) is None
            await bob.put_key(bob_record)
            got = await alice.get_keys(["bob", "nobody", "alice", "not a mailbox!", "bob"])
            assert got == {"bob": bob_record, "alice": alice_record}
            assert list(got) == ["bob", "alice"]
            assert verify_key_record("bob", got["bob"])
            assert await bob.get_keys("alice") == {"alice": alice_record}  # one mailbox as a str
            assert await bob.get_keys([]) == {}


async def test_a_record_for_another_mailbox_raises_key_refused_and_the_client_goes_on(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with open_client(url_of(broker), broker.auth.issue("alice"), e2e=False) as alice:
            record = new_record("bob")
            with pytest.raises(KeyRefused) as info:
                await alice.put_key(record)
            assert info.value.code == ErrorCode.INVALID_KEY
            assert info.value.kid == record.kid
            again = pickle.loads(pickle.dumps(info.value))
            assert (again.code, again.kid, str(again)) == (info.value.code, record.kid, str(info.value))
            assert await alice.get_keys(["alice", "bob"]) == {}
            assert alice.connects == 1


async def test_operators_are_refused_locally(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with open_client(url_of(broker), broker.auth.issue("ops", operator=True), e2e=False) as op:
            with pytest.raises(ForbiddenError):
                await op.put_key(new_record("ops"))
            with pytest.raises(ForbiddenError):
                await op.get_keys(["alice"])
            assert (await op.stats())["keys_put_total"] == 0


async def test_bad_arguments_raise_before_anything_is_sent(broker: Broker, network: FaultyNetwork) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with open_client(
            url_of(broker), broker.auth.issue("alice"), transport_factory=network, e2e=False
        ) as alice:
            with pytest.raises(TypeError, match="KeyRecord"):
                await alice.put_key(new_record("alice").to_map())  # type: ignore[arg-type]
            for bad in (["ok", "b" * 65], ["ok", 7]):
                with pytest.raises(ValueError):
                    await alice.get_keys(bad)  # type: ignore[arg-type]
            await alice.put_key(new_record("alice"))
        assert [type(f) for f in network.sent if type(f) in (KeyPut, KeyGet)] == [KeyPut]


async def test_more_mailboxes_than_max_recipients_go_in_several_key_gets(
    broker_factory: Any, network: FaultyNetwork
) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with broker_factory(max_recipients=3) as broker:
            url = url_of(broker)
            records = {name: new_record(name) for name in ("u1", "u4", "u7")}
            for name, record in records.items():
                async with open_client(url, broker.auth.issue(name), e2e=False) as owner:
                    await owner.put_key(record)
            async with open_client(url, broker.auth.issue("alice"), transport_factory=network, e2e=False) as alice:
                names = [f"u{i}" for i in range(8)]
                assert await alice.get_keys(names) == records
            gets = [f for f in network.sent if type(f) is KeyGet]
            assert [g.mailboxes for g in gets] == [("u0", "u1", "u2"), ("u3", "u4", "u5"), ("u6", "u7")]
