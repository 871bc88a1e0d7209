"""The HTTP API on the raw connection: status lines, ``Allow``, and answers given before an upload is in.

These read the bytes hypercorn writes (through a plain trio TCP stream, no HTTP client),
because what is checked here is exactly what a client library would hide: the status
line, the ``Connection`` header, and whether the server reads an upload it has refused
before it closes. Status lines carry no reason phrase (protocol.md section 2.6): clients,
and these tests, read the status code only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio

import broker.http
from broker.server import Broker

TIMEOUT = 10
SMALL = {"max_frame_bytes": 1024, "max_recipients": 3, "max_outbound_bytes": 64 * 1024}
"""A broker whose request limit is small: 1024 * 4 // 3 + 64 KiB = 66,901 bytes."""
REQUEST_LIMIT = 1024 * 4 // 3 + broker.http.BODY_SLACK_BYTES


class Answer:
    """One HTTP/1.1 response as raw bytes: the status line, the headers (lower-cased names) and the body."""

    def __init__(self, raw: bytes) -> None:
        head, _, self.rest = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.status_line = lines[0]
        version, _, rest = self.status_line.partition(b" ")
        code = rest[:3]
        assert version == b"HTTP/1.1" and code.isdigit() and rest[3:4] in (b"", b" "), f"bad status line: {rest!r}"
        self.status = int(code)
        self.headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            self.headers[name.decode().strip().lower()] = value.decode().strip()
        self.body = self.rest[: int(self.headers.get("content-length", "0"))]

    def json(self) -> Any:
        return json.loads(self.body)


async def read_answer(stream: trio.SocketStream, buffer: bytearray | None = None) -> Answer:
    """Read until one whole response (headers and Content-Length body) is in; skips 100 Continue."""
    data = buffer if buffer is not None else bytearray()
    while True:
        head_end = data.find(b"\r\n\r\n")
        if head_end >= 0:
            answer = Answer(bytes(data))
            if answer.status == 100:
                del data[: head_end + 4]
                continue
            if len(answer.rest) >= int(answer.headers.get("content-length", "0")):
                return answer
        chunk = await stream.receive_some(65536)
        assert chunk, f"the server closed before a whole response: {bytes(data)!r}"
        data.extend(chunk)


def request_head(method: str, path: str, token: str | None = None, **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def read_to_end(stream: trio.SocketStream) -> bytes:
    """Everything until the server's end of stream (a reset fails the test)."""
    data = bytearray()
    while chunk := await stream.receive_some(65536):
        data.extend(chunk)
    return bytes(data)


# ------------------------------------------------------------------ status lines and Allow


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", "/openapi.json", None, 200),
        ("GET", "/relay/nothing", None, 404),
        ("GET", "/relay/send", None, 405),
        ("GET", "/relay/pending", None, 401),
        ("POST", "/relay/send", b"{", 400),
    ],
)
async def test_status_lines_carry_the_status_code(
    broker: Broker, method: str, path: str, body: bytes | None, status: int
) -> None:
    with trio.fail_after(TIMEOUT):
        assert broker.http_port is not None
        stream = await trio.open_tcp_stream("127.0.0.1", broker.http_port)
        token = broker.auth.issue("alice") if body is not None else None
        extra = {"Content_Type": "application/json", "Content_Length": str(len(body))} if body is not None else {}
        await stream.send_all(request_head(method, path, token, **extra) + (body or b""))
        answer = await read_answer(stream)
        assert answer.status == status
        await stream.aclose()


async def test_100_continue_then_413(broker_factory: Callable[..., Any]) -> None:
    async with broker_factory(**SMALL) as broker:
        with trio.fail_after(TIMEOUT):
            stream = await trio.open_tcp_stream("127.0.0.1", broker.http_port)
            head = request_head(
                "POST",
                "/relay/send",
                broker.auth.issue("alice"),
                Content_Type="application/json",
                Content_Length=str(REQUEST_LIMIT + 1),
                Expect="100-continue",
            )
            await stream.send_all(head)
            data = bytearray()
            while b"\r\n\r\n" not in data:
                data.extend(await stream.receive_some(65536))
            assert Answer(bytes(data)).status == 100
            await stream.send_all(b"x" * (REQUEST_LIMIT + 1))
            answer = await read_answer(stream, data)
            assert answer.status == 413
            await stream.aclose()


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/relay/send", "POST"),
        ("PUT", "/relay/acknowledge", "POST"),
        ("POST", "/relay/pending", "GET, HEAD"),
        ("DELETE", "/relay/stats", "GET, HEAD"),
        ("GET", "/relay/cleanup", "POST"),
        ("POST", "/openapi.json", "GET, HEAD"),
        ("POST", "/", "GET, HEAD"),
        ("POST", "/static/app.js", "GET, HEAD"),
    ],
)
async def test_405_names_the_allowed_methods(broker: Broker, method: str, path: str, allow: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{broker.http_port}") as http:
            r = await http.request(method, path)
        assert r.status_code == 405
        assert r.headers["allow"] == allow
        assert r.json() == {"code": 1003, "message": f"{method} is not allowed on {path}; use {allow}"}


# ------------------------------------------------------------------ answers before the upload is in


async def test_a_refused_upload_is_read_to_its_end_before_the_connection_closes(
    broker_factory: Callable[..., Any],
) -> None:
    """413 comes as soon as the headers say too much; the server then reads the rest and closes cleanly.

    Without that, hypercorn closed at once with the upload unread: no ``Connection: close``
    (a pooling client reused the dead connection) and a reset for the rest of the upload.
    """
    async with broker_factory(**SMALL) as broker:
        with trio.fail_after(TIMEOUT):
            stream = await trio.open_tcp_stream("127.0.0.1", broker.http_port)
            size = 8 * 1024 * 1024  # more than loopback buffers hold: a server that stops reading resets the upload
            head = request_head(
                "POST",
                "/relay/send",
                broker.auth.issue("alice"),
                Content_Type="application/json",
                Content_Length=str(size),
            )
            await stream.send_all(head + b"x" * 1000)
            answer = await read_answer(stream)  # the answer comes while the upload is unfinished
            assert answer.status == 413
            assert answer.headers["connection"] == "close"
            assert answer.json() == {
                "code": 1002,
                "message": f"the request body is {size} bytes; the limit is {REQUEST_LIMIT} bytes",
            }
            await stream.send_all(b"x" * (size - 1000))  # the server is still reading: no reset
            assert await read_to_end(stream) == answer.rest[len(answer.body) :]  # then a clean end of stream
            await stream.aclose()


async def test_a_client_that_writes_its_whole_body_first_reads_the_refusal(
    broker_factory: Callable[..., Any],
) -> None:
    """Chunked, 8 MiB (far above the limit, and more than loopback buffers hold), written in full before anything
    is read, as httpx and requests do: the write only completes because the server reads the rest."""
    async with broker_factory(**SMALL) as broker:
        with trio.fail_after(TIMEOUT):
            stream = await trio.open_tcp_stream("127.0.0.1", broker.http_port)
            head = request_head(
                "POST",
                "/relay/send",
                broker.auth.issue("alice"),
                Content_Type="application/json",
                Transfer_Encoding="chunked",
            )
            chunk = b"x" * 65536
            body = (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 128 + b"0\r\n\r\n"
            await stream.send_all(head + body)
            raw = await read_to_end(stream)
            answer = Answer(raw)
            assert answer.status == 413
            assert answer.headers["connection"] == "close"
            assert answer.json() == {
                "code": 1002,
                "message": f"the request body exceeds the limit of {REQUEST_LIMIT} bytes",
            }
            await stream.aclose()


async def test_an_upload_past_the_drain_bound_is_answered_and_closed(
    broker_factory: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past DRAIN_MAX_BYTES the server stops reading and closes: the answer is out, nothing hangs."""
    monkeypatch.setattr(broker.http, "DRAIN_MAX_BYTES", 256 * 1024)
    async with broker_factory(**SMALL) as b:
        with trio.fail_after(TIMEOUT):
            stream = await trio.open_tcp_stream("127.0.0.1", b.http_port)
            head = request_head(
                "POST", "/relay/send", b.auth.issue("alice"), Content_Type="application/json", Content_Length="10" * 9
            )
            received = bytearray()
            closed = trio.Event()

            async def upload_until_closed() -> None:
                try:
                    await stream.send_all(head)
                    while not closed.is_set():
                        await stream.send_all(b"x" * 65536)
                except trio.BrokenResourceError:
                    pass  # the server closed with the rest unread: a reset is expected here

            async def read_until_closed() -> None:
                try:
                    while chunk := await stream.receive_some(65536):
                        received.extend(chunk)
                except trio.BrokenResourceError:
                    pass
                closed.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(upload_until_closed)
                nursery.start_soon(read_until_closed)
            answer = Answer(bytes(received))
            assert answer.status == 413
            assert answer.headers["connection"] == "close"
            assert answer.json()["code"] == 1002
            await stream.aclose()


@pytest.mark.parametrize(
    ("path", "token", "content_type", "status"),
    [
        ("/relay/send", None, "application/json", 401),
        ("/relay/send", "alice", "text/plain", 415),
        ("/relay/stats", "alice", "application/json", 405),
        ("/relay/nothing", "alice", "application/json", 404),
        ("/relay/send", "alice", "application/json", 413),
    ],
)
async def test_an_early_answer_never_leaves_a_dead_connection_in_the_pool(
    broker_factory: Callable[..., Any], path: str, token: str | None, content_type: str, status: int
) -> None:
    """Each answer given before its 200 KB body was read says ``Connection: close``; the next request works."""
    async with broker_factory(**SMALL) as b:
        headers = {"Content-Type": content_type}
        if token is not None:
            headers["Authorization"] = f"Bearer {b.auth.issue(token)}"
        ok = {"Authorization": f"Bearer {b.auth.issue('alice')}"}
        with trio.fail_after(TIMEOUT):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{b.http_port}") as http:
                for i in range(20):
                    r = await http.post(path, content=b"x" * 200_000, headers=headers)
                    assert r.status_code == status
                    assert r.headers["connection"] == "close"
                    r = await http.post("/relay/send", json={"id": f"m{i}", "to": ["bob"], "body": ""}, headers=ok)
                    assert r.status_code == 200
                    assert "connection" not in r.headers  # a request read in full keeps its connection


async def test_a_body_that_was_read_in_full_keeps_the_connection(broker: Broker) -> None:
    """An error after the whole body was read (here a bad field) leaves the connection open for the next request."""
    ports = set()

    async def remember_port(name: str, info: dict[str, Any]) -> None:
        if name == "connection.connect_tcp.complete":
            ports.add(info["return_value"].get_extra_info("socket").getsockname()[1])

    headers = {"Authorization": f"Bearer {broker.auth.issue('alice')}"}
    with trio.fail_after(TIMEOUT):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{broker.http_port}") as http:
            for body in ({"id": "a b", "to": ["bob"], "body": ""}, {"id": "ok", "to": ["bob"], "body": ""}):
                r = await http.post("/relay/send", json=body, headers=headers, extensions={"trace": remember_port})
                assert "connection" not in r.headers
    assert len(ports) == 1
