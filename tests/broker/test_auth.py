"""Token verification: which claims are checked, their types, the clock leeway, and the codes on the wire."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
import trio

from broker.auth import Authenticator, AuthError, load_or_create_secret
from broker.server import Broker
from wire import Drained, Error, ErrorCode, Hello

from .raw import RawClient

SECRET = b"k" * 32


class FromNow(int):
    """A time claim in seconds from when the token is made, for claims near the leeway's edge: a value computed at
    collection (NOW) can be a minute old by the time its test runs when the whole suite is collected on a busy
    machine."""


def token(**claims: Any) -> str:
    now = int(time.time())
    base: dict[str, Any] = {"sub": "bob", "aud": "relay", "iat": now, "exp": now + 600}
    base.update({k: now + v if isinstance(v, FromNow) else v for k, v in claims.items()})
    return jwt.encode({k: v for k, v in base.items() if v is not None}, SECRET, algorithm="HS256")


def code_of(tok: str, leeway_s: float = 60.0) -> ErrorCode | None:
    try:
        Authenticator(SECRET, leeway_s=leeway_s).verify(tok)
    except AuthError as exc:
        return exc.code
    return None


NOW = int(time.time())


@pytest.mark.parametrize(
    ("claims", "code"),
    [
        pytest.param({}, None, id="valid"),
        pytest.param({"aud": ["other", "relay"]}, None, id="aud-array-holding-relay"),
        pytest.param({"aud": ["other"]}, ErrorCode.INVALID_TOKEN, id="aud-array-without-relay"),
        pytest.param({"aud": None}, ErrorCode.INVALID_TOKEN, id="aud-missing"),
        pytest.param({"exp": None}, ErrorCode.INVALID_TOKEN, id="exp-missing"),
        pytest.param({"sub": None}, ErrorCode.INVALID_TOKEN, id="sub-missing"),
        pytest.param({"sub": "-bad"}, ErrorCode.INVALID_TOKEN, id="sub-not-a-mailbox"),
        pytest.param({"exp": str(NOW + 600)}, ErrorCode.INVALID_TOKEN, id="exp-as-text"),
        pytest.param({"exp": str(NOW - 600)}, ErrorCode.INVALID_TOKEN, id="expired-exp-as-text-is-invalid"),
        pytest.param({"exp": True}, ErrorCode.INVALID_TOKEN, id="exp-bool"),
        pytest.param({"iat": str(NOW)}, ErrorCode.INVALID_TOKEN, id="iat-as-text"),
        pytest.param({"nbf": str(NOW)}, ErrorCode.INVALID_TOKEN, id="nbf-as-text"),
        pytest.param({"exp": NOW + 600.5}, None, id="exp-float"),
        pytest.param({"iat": NOW + 5}, None, id="iat-a-few-seconds-ahead"),
        pytest.param({"nbf": NOW + 5}, None, id="nbf-a-few-seconds-ahead"),
        pytest.param({"iat": NOW + 600}, ErrorCode.INVALID_TOKEN, id="iat-beyond-the-leeway"),
        pytest.param({"nbf": NOW + 600}, ErrorCode.INVALID_TOKEN, id="nbf-beyond-the-leeway"),
        pytest.param({"exp": FromNow(-5)}, None, id="exp-just-past-within-the-leeway"),
        pytest.param({"exp": NOW - 600}, ErrorCode.TOKEN_EXPIRED, id="expired"),
    ],
)
def test_token_claims(claims: dict[str, Any], code: ErrorCode | None) -> None:
    assert code_of(token(**claims)) == code


def test_the_leeway_is_configurable() -> None:
    ahead = token(iat=int(time.time()) + 5)
    assert code_of(ahead, leeway_s=60) is None
    assert code_of(ahead, leeway_s=0) == ErrorCode.INVALID_TOKEN
    past = token(exp=int(time.time()) - 5)
    assert code_of(past, leeway_s=0) == ErrorCode.TOKEN_EXPIRED


def test_other_algorithms_and_keys_are_refused() -> None:
    claims = {"sub": "bob", "aud": "relay", "exp": int(time.time()) + 60}
    assert code_of(jwt.encode(claims, b"x" * 32, algorithm="HS256")) == ErrorCode.INVALID_TOKEN
    assert code_of(jwt.encode(claims, SECRET * 2, algorithm="HS512")) == ErrorCode.INVALID_TOKEN
    assert code_of("not.a.jwt") == ErrorCode.INVALID_TOKEN


async def test_a_text_exp_is_refused_on_the_wire_and_a_slightly_early_iat_is_not(broker: Broker) -> None:
    with trio.fail_after(10):
        assert broker.tcp_port is not None
        now = int(time.time())
        secret = load_or_create_secret(broker.config.data_dir)  # the broker's key, as an issuer would hold it
        text_exp = jwt.encode({"sub": "bob", "aud": "relay", "exp": str(now + 600)}, secret, algorithm="HS256")
        client = await RawClient.open(broker.tcp_port)
        await client.send(Hello(version=1, token=text_exp))
        error = await client.expect(Error)
        assert (error.code, error.close) == (ErrorCode.INVALID_TOKEN, True)
        early = jwt.encode({"sub": "bob", "aud": "relay", "iat": now + 5, "exp": now + 600}, secret, algorithm="HS256")
        bob, _ = await RawClient.login(broker.tcp_port, early)
        await bob.expect(Drained)
