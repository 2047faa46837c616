"""`tgi_gateway.server.limits.BodySizeLimit`: the request body size limit (413), as ASGI and over a real socket.

Strict JSON bodies (the other half of limits.py) are tested with the errors they fix: test_invalid_input.py.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from tests.fakes.serve import serve
from tests.fakes.tgi import EOT, FakeTGI, tokens
from tgi_gateway.prompting import Template, Version
from tgi_gateway.server.app import create_app
from tgi_gateway.server.limits import BodySizeLimit
from tgi_gateway.settings import Settings

LIMIT = 1000
TOO_LARGE = {
    "error": {
        "message": f"The request body is too large: this server accepts at most {LIMIT} bytes.",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# ------------------------------------------------------------------------------------------------
# The middleware on its own
# ------------------------------------------------------------------------------------------------


class Recorder:
    """An ASGI app that reads the whole body, then answers 200 with its length."""

    def __init__(self) -> None:
        self.events: list[str] = []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.events.append("disconnect")
                await send({"type": "http.response.start", "status": 400, "headers": []})
                await send({"type": "http.response.body", "body": b"client gone"})
                return
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        self.events.append(f"read {size}")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(size).encode()})


async def call(app: Any, headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> list[dict]:
    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
    pending = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)
    ]
    sent: list[dict] = []

    async def receive() -> dict:
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def response_of(sent: list[dict]) -> tuple[int, dict[bytes, bytes], bytes]:
    start, *bodies = sent
    return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in bodies)


@pytest.mark.anyio
async def test_declared_length_over_the_limit_is_refused_without_reading_the_body() -> None:
    async def receive() -> dict:
        raise AssertionError("the body was read")

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-length", b"1001")]}
    inner = Recorder()
    await BodySizeLimit(inner, max_bytes=LIMIT)(scope, receive, send)
    status, headers, body = response_of(sent)
    assert (status, json.loads(body)) == (413, TOO_LARGE)
    assert headers[b"content-type"] == b"application/json" and headers[b"connection"] == b"close"
    assert inner.events == [], "the app never ran"


@pytest.mark.anyio
async def test_a_chunked_body_is_refused_as_soon_as_it_grows_past_the_limit() -> None:
    inner = Recorder()
    sent = await call(BodySizeLimit(inner, max_bytes=LIMIT), [], [b"x" * 600, b"x" * 600, b"x" * 600])
    status, headers, body = response_of(sent)
    assert (status, json.loads(body)) == (413, TOO_LARGE) and headers[b"connection"] == b"close"
    assert inner.events == ["disconnect"], "the app saw a client that went away; its answer was dropped"


@pytest.mark.anyio
@pytest.mark.parametrize("declared", [True, False])
async def test_a_body_at_the_limit_passes(declared: bool) -> None:
    headers = [(b"content-length", b"1000")] if declared else []
    inner = Recorder()
    sent = await call(BodySizeLimit(inner, max_bytes=LIMIT), headers, [b"x" * 500, b"x" * 500])
    assert response_of(sent) == (200, {}, b"1000") and inner.events == ["read 1000"]


@pytest.mark.anyio
async def test_a_declared_length_within_the_limit_passes_the_app_the_servers_own_channels() -> None:
    """The HTTP server reads exactly Content-Length bytes (uvicorn frames the body by it), so nothing is
    counted, and the response's messages (thousands for a stream) go out through no wrapper."""
    seen: list[tuple[Any, Any]] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        seen.append((receive, send))

    async def receive() -> dict:
        return {"type": "http.request", "body": b"{}"}

    async def send(message: dict) -> None:
        pass

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-length", b"2")]}
    await BodySizeLimit(app, max_bytes=LIMIT)(scope, receive, send)
    assert seen == [(receive, send)]


# ------------------------------------------------------------------------------------------------
# The gateway on a real socket
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway() -> Iterator[tuple[FakeTGI, tuple[str, int]]]:
    with FakeTGI(script=tokens("Hi", EOT)) as tgi:
        app = create_app(
            Settings(model="m", endpoint=tgi.url, max_body_bytes=LIMIT), Template(Version.V3_LLAMA31)
        )
        with serve(app) as url:
            host, port = url.removeprefix("http://").split(":")
            yield tgi, (host, int(port))


def exchange(address: tuple[str, int], head: bytes, body: bytes = b"") -> tuple[bytes, bytes]:
    """Send a request head (and body bytes), then read the answer until the server closes: (head, body)."""
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(head + body)
        data = b""
        while chunk := sock.recv(65536):  # ends when the server closes the connection
            data += chunk
    answer_head, _, answer_body = data.partition(b"\r\n\r\n")
    return answer_head, answer_body


def request_head(headers: str) -> bytes:
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n{headers}\r\n"
    ).encode()


def test_socket_declared_length_over_the_limit(gateway: tuple[FakeTGI, tuple[str, int]]) -> None:
    tgi, address = gateway
    before = len(tgi.requests)
    # No body is ever sent: the answer comes from the header alone, and the server closes the connection.
    head, body = exchange(address, request_head("Content-Length: 1000000000\r\n"))
    assert head.startswith(b"HTTP/1.1 413 ") and b"connection: close" in head.lower()
    assert json.loads(body) == TOO_LARGE
    assert len(tgi.requests) == before


def test_socket_chunked_body_over_the_limit(gateway: tuple[FakeTGI, tuple[str, int]]) -> None:
    tgi, address = gateway
    before = len(tgi.requests)
    chunk = b"x" * 400
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(3))  # 1200 bytes, no terminator
    head, body = exchange(address, request_head("Transfer-Encoding: chunked\r\n"), chunks)
    assert head.startswith(b"HTTP/1.1 413 ") and b"connection: close" in head.lower()
    assert json.loads(body) == TOO_LARGE
    assert len(tgi.requests) == before


def test_socket_chunked_body_under_the_limit_is_served(gateway: tuple[FakeTGI, tuple[str, int]]) -> None:
    payload = json.dumps({"model": "m", "messages": [{"role": "user", "content": "Hi"}]}).encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (payload[:20], payload[20:])) + b"0\r\n\r\n"
    head, body = exchange(
        gateway[1], request_head("Transfer-Encoding: chunked\r\nConnection: close\r\n"), chunks
    )
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert json.loads(body)["choices"][0]["message"]["content"] == "Hi"


def test_socket_keeps_serving_after_a_refusal(gateway: tuple[FakeTGI, tuple[str, int]]) -> None:
    for _ in range(3):
        head, _ = exchange(gateway[1], request_head("Content-Length: 5000\r\n"), b"x" * 5000)
        assert head.startswith(b"HTTP/1.1 413 ")
    payload = json.dumps({"model": "m", "messages": [{"role": "user", "content": "Hi"}]}).encode()
    head, _ = exchange(
        gateway[1], request_head(f"Content-Length: {len(payload)}\r\nConnection: close\r\n"), payload
    )
    assert head.startswith(b"HTTP/1.1 200 ")
