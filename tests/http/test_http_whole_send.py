"""A SEND refused as a whole over HTTP: 200 with the RECEIPT's ``code`` instead of ``results``, nothing stored."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import cbor2
import httpx
import pytest
import trio

TIMEOUT = 10
LIMITS = {"max_frame_bytes": 2048, "max_recipients": 3, "max_outbound_bytes": 64 * 1024}
BODY_LIMIT = 2048 - 256


def bodies(size: int) -> tuple[str, bytes]:
    data = b"x" * size
    return base64.b64encode(data).decode(), data


@pytest.mark.parametrize("cbor", [False, True], ids=["json", "cbor"])
@pytest.mark.parametrize(
    ("to", "body_size", "expected"),
    [
        (["a", "b", "c", "d"], 10, {"code": 3004}),  # one more distinct recipient than max_recipients
        (["a", "b", "c", "d", "d", "d"], BODY_LIMIT + 1, {"code": 3004}),  # both rules broken: 3004 wins
        (["a"], BODY_LIMIT + 1, {"code": 3007}),
        (["a", "b", "c", "c", "c"], BODY_LIMIT, {"results": {n: {"status": "queued"} for n in "abc"}}),
    ],
    ids=["too-many", "both", "body-too-large", "at-both-limits"],
)
async def test_a_send_refused_whole_is_answered_like_the_receipt_frame(
    broker_factory: Callable[..., Any], cbor: bool, to: list[str], body_size: int, expected: dict[str, Any]
) -> None:
    async with broker_factory(**LIMITS) as broker:
        text, raw = bodies(body_size)
        headers = {"Authorization": f"Bearer {broker.auth.issue('alice')}"}
        with trio.fail_after(TIMEOUT):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{broker.http_port}") as http:
                if cbor:
                    headers["Content-Type"] = "application/cbor"
                    r = await http.post(
                        "/relay/send", content=cbor2.dumps({"id": "w1", "to": to, "body": raw}), headers=headers
                    )
                    answer = cbor2.loads(r.content)
                else:
                    r = await http.post("/relay/send", json={"id": "w1", "to": to, "body": text}, headers=headers)
                    answer = r.json()
        assert r.status_code == 200
        assert answer == {"id": "w1", **expected}
        stored = sum([await broker.router.pending(name) for name in set(to)])
        assert stored == (0 if "code" in expected else len(set(to)))


async def test_a_recipient_longer_than_64_characters_is_a_bad_request(broker_factory: Callable[..., Any]) -> None:
    """Over 64 code points (not bytes: 64 'é' are 128 bytes and allowed to reach the per-recipient check)."""
    async with broker_factory(**LIMITS) as broker:
        headers = {"Authorization": f"Bearer {broker.auth.issue('alice')}"}
        with trio.fail_after(TIMEOUT):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{broker.http_port}") as http:
                long = await http.post(
                    "/relay/send", json={"id": "w2", "to": ["a", "é" * 65], "body": ""}, headers=headers
                )
                just = await http.post(
                    "/relay/send", json={"id": "w3", "to": ["a", "é" * 64], "body": ""}, headers=headers
                )
        assert (long.status_code, long.json()) == (
            400,
            {"code": 1004, "message": '"to[1]" is 65 characters long; a recipient is at most 64 characters'},
        )
        assert just.status_code == 200
        assert just.json()["results"] == {"a": {"status": "queued"}, "é" * 64: {"status": "refused", "code": 3006}}
        assert await broker.router.pending("a") == 1  # w3 only
