"""Every error path of the HTTP API: exact status, protocol code and the message a user reads.

The messages name the field as docs/http-api.md does, say what was expected and give the
limit; none may show Python internals (exception class names, codec names, ``__init__``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import cbor2
import httpx
import pytest
import trio

from broker.http import BODY_SLACK_BYTES
from broker.server import Broker

TIMEOUT = 10
J = "application/json"
C = "application/cbor"
ID = "a message id: 1-64 printable ASCII characters"
ID_RANGE = "a message id: 1-64 printable ASCII characters (0x21-0x7E)"
TO = "a non-empty array of recipient mailbox ids"
TTL = "a whole number of seconds, at least 1 (larger than max_ttl_s, 2592000, is clamped to it)"
B64 = '"body" must be standard base64 (A-Z, a-z, 0-9, +, / and = padding to a multiple of 4 characters)'
NOT_ASCII = "text with a space, a control or a non-ASCII character"
NOTIFY = "true or false (true: a delivery status per recipient, in /relay/statuses)"
SEQS = "a non-empty array of status seqs (whole numbers from 1)"


def send_json(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


SEND_ERRORS = [
    # malformed bodies: 1001
    (J, b"", 400, 1001, "the request body is empty: send a JSON object"),
    (
        J,
        b"{",
        400,
        1001,
        "the request body is not valid JSON: Expecting property name enclosed in double quotes at line 1, column 2",
    ),
    (J, b"[1,2]", 400, 1001, "the request body must be a JSON object"),
    (J, b'"x"', 400, 1001, "the request body must be a JSON object"),
    (
        J,
        b'{"id":"a","id":"b","to":["b"],"body":""}',
        400,
        1001,
        'the request body is not valid JSON for Relay: the key "id" appears twice',
    ),
    (
        J,
        b'{"id":"a","to":["b"],"body":"","ttl_s":NaN}',
        400,
        1001,
        "the request body is not valid JSON: NaN is not a JSON number",
    ),
    (J, b"\xff\xfe", 400, 1001, "the request body is not valid UTF-8 (byte 0xff at offset 0); JSON must be UTF-8"),
    (J, b'{"id":"\xc3"}', 400, 1001, "the request body is not valid UTF-8 (byte 0xc3 at offset 7); JSON must be UTF-8"),
    (C, b"", 400, 1001, "the request body is empty: send a CBOR map"),
    (
        C,
        b"\xff",
        400,
        1001,
        "the request body is not strict CBOR (protocol.md section 2.2): break code encountered where a data item was "
        "expected",
    ),
    (
        C,
        cbor2.dumps({"id": "a"}) + b"\x00",
        400,
        1001,
        "the request body is not strict CBOR (protocol.md section 2.2): bytes after the CBOR item",
    ),
    (
        C,
        cbor2.dumps(cbor2.CBORTag(1, 0)),
        400,
        1001,
        "the request body is not strict CBOR (protocol.md section 2.2): tags are not allowed (tag 1)",
    ),
    (
        C,
        b"\xa1\x61",
        400,
        1001,
        "the request body is not strict CBOR (protocol.md section 2.2): the data ends inside an item",
    ),
    (C, cbor2.dumps({1: 2}), 400, 1001, "the request body must be a CBOR map with text keys"),
    (C, cbor2.dumps([1]), 400, 1001, "the request body must be a CBOR map with text keys"),
    # fields: 1004
    (J, send_json(to=["b"], body=""), 400, 1004, f'the field "id" is missing: it must be {ID}'),
    (J, send_json(id="a", body=""), 400, 1004, f'the field "to" is missing: it must be {TO}'),
    (
        J,
        send_json(id="a", to=["b"]),
        400,
        1004,
        'the field "body" is missing: it must be the message as standard base64 text',
    ),
    (
        C,
        cbor2.dumps({"id": "a", "to": ["b"]}),
        400,
        1004,
        'the field "body" is missing: it must be the message as a CBOR byte string',
    ),
    (J, send_json(id=None, to=["b"], body=""), 400, 1004, f'"id" must be {ID}, not null'),
    (J, send_json(id="a b", to=["b"], body=""), 400, 1004, f'"id" must be {ID_RANGE}, got {NOT_ASCII}'),
    (J, send_json(id="", to=["b"], body=""), 400, 1004, f'"id" must be {ID_RANGE}, got empty text'),
    (J, send_json(id="x" * 65, to=["b"], body=""), 400, 1004, f'"id" must be {ID_RANGE}, got 65 characters'),
    (J, send_json(id=7, to=["b"], body=""), 400, 1004, f'"id" must be {ID_RANGE}, got a number'),
    (J, send_json(id="a", to=[], body=""), 400, 1004, f'"to" must be {TO}, got an empty array'),
    (J, send_json(id="a", to="bob", body=""), 400, 1004, f'"to" must be {TO}, got text'),
    (J, send_json(id="a", to=["b", 1], body=""), 400, 1004, '"to[1]" must be a mailbox id (text), got a number'),
    (
        J,
        send_json(id="a", to=["b" * 65], body=""),
        400,
        1004,
        '"to[0]" is 65 characters long; a recipient is at most 64 characters',
    ),
    (J, send_json(id="a", to=["b"], body="!!"), 400, 1004, B64),
    (J, send_json(id="a", to=["b"], body="YQ"), 400, 1004, B64),
    (
        J,
        send_json(id="a", to=["b"], body=5),
        400,
        1004,
        '"body" must be the message as standard base64 text, got a number',
    ),
    (
        C,
        cbor2.dumps({"id": "a", "to": ["b"], "body": "text"}),
        400,
        1004,
        '"body" must be the message as a CBOR byte string, got text',
    ),
    (J, send_json(id="a", to=["b"], body="", ttl_s=True), 400, 1004, f'"ttl_s" must be {TTL}, got a boolean'),
    (J, send_json(id="a", to=["b"], body="", ttl_s=0), 400, 1004, f'"ttl_s" must be {TTL}, got 0'),
    (J, send_json(id="a", to=["b"], body="", ttl_s=1.5), 400, 1004, f'"ttl_s" must be {TTL}, got a number'),
    (J, send_json(id="a", to=["b"], body="", ttl_s="60"), 400, 1004, f'"ttl_s" must be {TTL}, got text'),
    (
        J,
        send_json(id="a", to=["b"], body="", ttl_s=None),
        400,
        1004,
        f'"ttl_s" must be {TTL}, not null (leave it out for the default)',
    ),
    (
        J,
        send_json(id="a", to=["b"], body="", ttl_s=2**63),
        400,
        1004,
        '"ttl_s" is above the largest integer of the protocol (2^63-1); give at most 2592000 (max_ttl_s): a message is '
        "kept no longer",
    ),
    (
        J,
        send_json(id="a", to=["b"], body="", notify=None),
        400,
        1004,
        f'"notify" must be {NOTIFY}, not null (leave it out for the default)',
    ),
    (J, send_json(id="a", to=["b"], body="", notify=1), 400, 1004, f'"notify" must be {NOTIFY}, got a number'),
    (J, send_json(id="a", to=["b"], body="", notify="yes"), 400, 1004, f'"notify" must be {NOTIFY}, got text'),
    (
        C,
        cbor2.dumps({"id": "a", "to": ["b"], "body": b"", "notify": 1}),
        400,
        1004,
        f'"notify" must be {NOTIFY}, got an integer',
    ),
    # content types: 415
    ("text/plain", b"hello", 415, 1001, "Content-Type must be application/json or application/cbor (not text/plain)"),
    (None, b"{}", 415, 1001, "Content-Type must be application/json or application/cbor (none was given)"),
]


def answer(r: httpx.Response) -> Any:
    return cbor2.loads(r.content) if r.headers["content-type"] == C else r.json()


@pytest.mark.parametrize(("content_type", "data", "status", "code", "message"), SEND_ERRORS)
async def test_send_errors_are_worded_for_users(
    broker: Broker, content_type: str | None, data: bytes, status: int, code: int, message: str
) -> None:
    headers = {"Authorization": f"Bearer {broker.auth.issue('alice')}"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    with trio.fail_after(TIMEOUT):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{broker.http_port}") as http:
            r = await http.post("/relay/send", content=data, headers=headers)
    assert (r.status_code, answer(r)) == (status, {"code": code, "message": message})
    assert await broker.router.pending("b") == 0


ACK_ERRORS = [
    ({}, 'the field "ids" is missing: it must be a non-empty array of message ids'),
    ({"ids": None}, '"ids" must be a non-empty array of message ids, not null'),
    ({"ids": []}, '"ids" must be a non-empty array of message ids, got an empty array'),
    ({"ids": "m1"}, '"ids" must be a non-empty array of message ids, got text'),
    ({"ids": ["ok", 3]}, f'"ids[1]" must be {ID_RANGE}, got a number'),
    ({"ids": ["a b"]}, f'"ids[0]" must be {ID_RANGE}, got {NOT_ASCII}'),
    ({"ids": ["x" * 65]}, f'"ids[0]" must be {ID_RANGE}, got 65 characters'),
]


@pytest.mark.parametrize(("body", "message"), ACK_ERRORS)
async def test_acknowledge_errors_are_worded_for_users(broker: Broker, body: dict[str, Any], message: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{broker.http_port}") as http:
            r = await http.post(
                "/relay/acknowledge", json=body, headers={"Authorization": f"Bearer {broker.auth.issue('bob')}"}
            )
    assert (r.status_code, r.json()) == (400, {"code": 1004, "message": message})


@pytest.mark.parametrize("limit", ["0", "x", "1001", "-1", "1.5"])
async def test_a_bad_pending_limit_is_worded_for_users(broker: Broker, limit: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{broker.http_port}") as http:
            r = await http.get(
                "/relay/pending",
                params={"limit": limit},
                headers={"Authorization": f"Bearer {broker.auth.issue('bob')}"},
            )
    message = f"the query parameter \"limit\" must be a whole number from 1 to 1000, got '{limit}'"
    assert (r.status_code, r.json()) == (400, {"code": 1004, "message": message})


STATUS_ACK_ERRORS = [
    ({}, f'the field "seqs" is missing: it must be {SEQS}'),
    ({"seqs": None}, f'"seqs" must be {SEQS}, not null'),
    ({"seqs": []}, f'"seqs" must be {SEQS}, got an empty array'),
    ({"seqs": 5}, f'"seqs" must be {SEQS}, got a number'),
    ({"seqs": [1, 0]}, '"seqs[1]" must be a status seq: a whole number from 1 to 2^63-1, got 0'),
    ({"seqs": [2**63]}, f'"seqs[0]" must be a status seq: a whole number from 1 to 2^63-1, got {2**63}'),
    ({"seqs": ["1"]}, '"seqs[0]" must be a status seq: a whole number from 1 to 2^63-1, got text'),
    ({"seqs": [1.5]}, '"seqs[0]" must be a status seq: a whole number from 1 to 2^63-1, got a number'),
    ({"seqs": [True]}, '"seqs[0]" must be a status seq: a whole number from 1 to 2^63-1, got a boolean'),
]


@pytest.mark.parametrize(("body", "message"), STATUS_ACK_ERRORS)
async def test_status_acknowledge_errors_are_worded_for_users(
    broker: Broker, body: dict[str, Any], message: str
) -> None:
    with trio.fail_after(TIMEOUT):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{broker.http_port}") as http:
            r = await http.post(
                "/relay/statuses/acknowledge", json=body, headers={"Authorization": f"Bearer {broker.auth.issue('a')}"}
            )
    assert (r.status_code, r.json()) == (400, {"code": 1004, "message": message})


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"limit": "0"}, "the query parameter \"limit\" must be a whole number from 1 to 1000, got '0'"),
        ({"limit": "1001"}, "the query parameter \"limit\" must be a whole number from 1 to 1000, got '1001'"),
        (
            {"after": "-1"},
            "the query parameter \"after\" must be a whole number from 0 to 9223372036854775807, got '-1'",
        ),
        ({"after": "x"}, "the query parameter \"after\" must be a whole number from 0 to 9223372036854775807, got 'x'"),
        (
            {"after": str(2**63)},
            f"the query parameter \"after\" must be a whole number from 0 to 9223372036854775807, got '{2**63}'",
        ),
    ],
)
async def test_bad_statuses_parameters_are_worded_for_users(
    broker: Broker, query: dict[str, str], message: str
) -> None:
    with trio.fail_after(TIMEOUT):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{broker.http_port}") as http:
            r = await http.get(
                "/relay/statuses", params=query, headers={"Authorization": f"Bearer {broker.auth.issue('a')}"}
            )
    assert (r.status_code, r.json()) == (400, {"code": 1004, "message": message})


async def test_statuses_need_a_mailbox_token(broker: Broker) -> None:
    operator = {"Authorization": f"Bearer {broker.auth.issue('ops', operator=True)}"}
    message = "an operator token has no mailbox: use a mailbox token here"
    with trio.fail_after(TIMEOUT):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{broker.http_port}") as http:
            got = await http.get("/relay/statuses", headers=operator)
            assert (got.status_code, got.json()) == (403, {"code": 2003, "message": message})
            acked = await http.post("/relay/statuses/acknowledge", json={"seqs": [1]}, headers=operator)
            assert (acked.status_code, acked.json()) == (403, {"code": 2003, "message": message})


AUTH_ERRORS = [
    (None, "no token: send the header 'Authorization: Bearer <token>'"),
    ("Bearer", "the Authorization header has no token after 'Bearer'"),
    ("Basic dXNlcjpwdw==", "the Authorization header must be 'Bearer <token>', not 'Basic ...'"),
]


@pytest.mark.parametrize(("authorization", "message"), AUTH_ERRORS)
async def test_a_missing_or_misshapen_authorization_is_worded_for_users(
    broker: Broker, authorization: str | None, message: str
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    with trio.fail_after(TIMEOUT):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{broker.http_port}") as http:
            r = await http.get("/relay/pending", headers=headers)
    assert (r.status_code, r.json()) == (401, {"code": 2001, "message": message})
    assert r.headers["www-authenticate"] == 'Bearer realm="relay"'


async def test_a_refused_token_says_why_in_the_brokers_words(broker: Broker) -> None:
    with trio.fail_after(TIMEOUT):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{broker.http_port}") as http:
            r = await http.get("/relay/pending", headers={"Authorization": "Bearer not.a.jwt"})
    assert r.status_code == 401
    body = r.json()
    assert body["code"] == 2001
    assert body["message"].startswith("the bearer token is refused (") and body["message"].endswith(")")


async def test_forbidden_and_unknown_paths_are_worded_for_users(broker: Broker) -> None:
    mailbox = {"Authorization": f"Bearer {broker.auth.issue('alice')}"}
    operator = {"Authorization": f"Bearer {broker.auth.issue('ops', operator=True)}"}
    with trio.fail_after(TIMEOUT):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{broker.http_port}") as http:
            cases = [
                (
                    await http.get("/relay/stats", headers=mailbox),
                    403,
                    2003,
                    "this endpoint needs an operator token (relay-broker token NAME --operator)",
                ),
                (
                    await http.get("/relay/pending", headers=operator),
                    403,
                    2003,
                    "an operator token has no mailbox: use a mailbox token here",
                ),
                (
                    await http.get("/relay/nothing"),
                    404,
                    1005,
                    "no such endpoint or file: /relay/nothing (the API: /openapi.json)",
                ),
                (
                    await http.get("/static/nothing.js"),
                    404,
                    1005,
                    "no such endpoint or file: /static/nothing.js (the API: /openapi.json)",
                ),
                (await http.get("/js/nothing.js"), 404, 1005, "no such file: /js/nothing.js"),
                (
                    await http.get("/relay/send", headers=mailbox),
                    405,
                    1003,
                    "GET is not allowed on /relay/send; use POST",
                ),
            ]
    for r, status, code, message in cases:
        assert (r.status_code, r.json()) == (status, {"code": code, "message": message})


async def test_size_errors_name_the_limit(broker_factory: Callable[..., Any]) -> None:
    limit = 1024 * 4 // 3 + BODY_SLACK_BYTES
    async with broker_factory(max_frame_bytes=1024, max_recipients=3, max_outbound_bytes=64 * 1024) as broker:
        headers = {"Authorization": f"Bearer {broker.auth.issue('alice')}", "Content-Type": J}
        with trio.fail_after(TIMEOUT):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{broker.http_port}") as http:
                declared = await http.post("/relay/send", content=b"x" * (limit + 1), headers=headers)

                async def stream() -> Any:
                    for _ in range(limit // 1000 + 1):
                        yield b"x" * 1000

                streamed = await http.post("/relay/send", content=stream(), headers=headers)
                frame = await http.post(
                    "/relay/send", content=send_json(id="big", to=["bob"], body="eHh4" * 342), headers=headers
                )
    assert (declared.status_code, declared.json()) == (
        413,
        {"code": 1002, "message": f"the request body is {limit + 1} bytes; the limit is {limit} bytes"},
    )
    assert (streamed.status_code, streamed.json()) == (
        413,
        {"code": 1002, "message": f"the request body exceeds the limit of {limit} bytes"},
    )
    assert frame.status_code == 413
    assert frame.json()["code"] == 1002
    assert frame.json()["message"].endswith("bytes as a SEND frame; the limit is max_frame_bytes, 1024 bytes")
