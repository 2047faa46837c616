"""The connection limits (tgi_gateway/server/http_protocol.py): the real gateway process over real sockets,
with short deadlines and a small connection cap, TGI played by the double.

* a head too large (one huge header, or too many headers) → 431 with the OpenAI envelope, at once, closed;
* a connection that sends nothing is closed after ``--head-timeout``; one that sends its head slowly, or
  its body slowly, gets 408 and is closed;
* at ``--max-connections`` the longest-waiting idle connection makes room, so chat requests keep succeeding
  during a flood of silent connections; with no idle connection to close, a new one gets 503.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.fakes.tgi import FakeTGI
from tests.gateway_process import free_port, start_gateway, stop_gateway

MODEL = "fn"
HEAD_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
MAX_CONNECTIONS = 20
KEEP_ALIVE = 1.0
SLACK = 1.5  # scheduling on a loaded machine
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}


@dataclass
class Gateway:
    proc: subprocess.Popen[str]
    url: str
    port: int


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    port = free_port()
    with FakeTGI(port=port):
        proc, url = start_gateway("--model", MODEL, "--template-version", "v3-llama3.1",
                                  "--endpoint", f"http://127.0.0.1:{port}", "--no-launch", "--log-level", "warning",
                                  "--head-timeout", str(HEAD_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT),
                                  "--max-connections", str(MAX_CONNECTIONS), "--max-headers", "100",
                                  "--keep-alive-timeout", str(KEEP_ALIVE),
                                  "--max-head-bytes", "65536")  # fmt: skip
        try:
            yield Gateway(proc, url, int(url.rsplit(":", 1)[1]))
        finally:
            stop_gateway(proc)


def connect(gw: Gateway) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    return s


def read_all(s: socket.socket, deadline: float = 10.0) -> bytes:
    """Everything the gateway sends until it closes the connection (bounded by `deadline`)."""
    s.settimeout(deadline)
    out = b""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        out += chunk
    return out


def status_and_error(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"connection: close" in head.lower(), head
    return status, json.loads(body)["error"]


def assert_closed(s: socket.socket) -> None:
    s.settimeout(5)
    try:
        assert s.recv(1) == b""
    except ConnectionResetError:
        pass


def test_a_one_megabyte_header_is_431_at_once(gateway: Gateway) -> None:
    with connect(gateway) as s:
        start = time.monotonic()
        try:
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        raw = read_all(s)
        took = time.monotonic() - start
    status, error = status_and_error(raw)
    assert status == 431 and error["code"] == "request_header_fields_too_large", raw[:300]
    assert set(error) == {"message", "type", "param", "code"} and "65536" in error["message"]
    assert took < SLACK


def test_101_headers_are_431(gateway: Gateway) -> None:
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(100))  # plus Host: 101
    with connect(gateway) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        status, error = status_and_error(read_all(s))
    assert status == 431 and "100 headers" in error["message"]


def test_100_headers_are_served(gateway: Gateway) -> None:
    headers = {f"x-h{i}": "v" for i in range(95)}  # httpx adds host, accept, accept-encoding, connection, UA
    assert httpx.get(gateway.url + "/v1/models", headers=headers, timeout=5).status_code == 200


def test_a_silent_connection_is_closed_after_the_head_deadline(gateway: Gateway) -> None:
    with connect(gateway) as s:
        start = time.monotonic()
        assert read_all(s) == b"", "nothing to answer: closed without a response"
        took = time.monotonic() - start
    assert HEAD_TIMEOUT - 0.1 <= took < HEAD_TIMEOUT + SLACK


def trickle(s: socket.socket, data: bytes) -> bytes:
    """Send ``data`` one byte per 0.2 s until the server answers or closes; the whole answer."""
    s.settimeout(0.2)
    answer = b""
    for byte in data:
        try:
            s.send(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            break
        try:
            answer = s.recv(65536)
            break
        except TimeoutError:
            pass
    return answer + read_all(s)


def test_slowloris_gets_408_and_is_closed(gateway: Gateway) -> None:
    head = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
    with connect(gateway) as s:
        start = time.monotonic()
        answer = trickle(s, head)  # 1 byte per 0.2 s: 20 s in all, were it not cut
        took = time.monotonic() - start
    status, error = status_and_error(answer)
    assert status == 408 and error["code"] == "request_timeout"
    assert took < HEAD_TIMEOUT + SLACK


def test_a_trickled_body_gets_408_and_is_closed(gateway: Gateway) -> None:
    body = json.dumps(CHAT).encode()
    with connect(gateway) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        start = time.monotonic()
        answer = trickle(s, body)
        took = time.monotonic() - start
    status, error = status_and_error(answer)
    assert status == 408 and "body" in error["message"]
    assert took < BODY_TIMEOUT + SLACK


def test_chat_succeeds_during_a_flood_of_silent_connections(gateway: Gateway) -> None:
    flood = [connect(gateway) for _ in range(3 * MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)
        for _ in range(5):
            r = httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, timeout=5)
            assert r.status_code == 200, r.text
        assert httpx.get(gateway.url + "/health", timeout=5).status_code == 200
    finally:
        for s in flood:
            s.close()


def test_at_the_cap_with_no_idle_connection_a_new_one_gets_503(gateway: Gateway) -> None:
    # partial heads are not idle: they are not closed to make room (their deadline bounds them)
    busy = [connect(gateway) for _ in range(MAX_CONNECTIONS)]
    try:
        for s in busy:
            s.sendall(b"GET /v1/models HTTP/1.1\r\n")
        time.sleep(0.2)
        with connect(gateway) as s:
            status, error = status_and_error(read_all(s, 5))
        assert status == 503 and error["code"] == "overloaded"
    finally:
        for s in busy:
            s.close()
    time.sleep(0.2)
    assert httpx.get(gateway.url + "/v1/models", timeout=5).status_code == 200


def test_an_idle_keep_alive_connection_is_closed_and_a_reused_one_gets_its_own_head_deadline(
    gateway: Gateway,
) -> None:
    with connect(gateway) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(5)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        time.sleep(HEAD_TIMEOUT / 2)  # idle, within the keep-alive timeout
        s.sendall(b"GET /v1/models HTTP/1.1\r\n")  # a partial head on the reused connection
        start = time.monotonic()
        status, _ = status_and_error(read_all(s))
        took = time.monotonic() - start
    assert status == 408 and HEAD_TIMEOUT - 0.1 <= took < HEAD_TIMEOUT + SLACK, took
    with connect(gateway) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        start = time.monotonic()
        assert read_all(s).startswith(b"HTTP/1.1 200"), "answered, then closed when idle"
        took = time.monotonic() - start
    assert KEEP_ALIVE - 0.1 <= took < KEEP_ALIVE + SLACK


def test_the_limits_hold_in_every_worker_process() -> None:
    port = free_port()
    with FakeTGI(port=port):
        proc, url = start_gateway("--model", MODEL, "--template-version", "v3-llama3.1", "--workers", "2",
                                  "--endpoint", f"http://127.0.0.1:{port}", "--no-launch", "--log-level", "warning",
                                  "--head-timeout", str(HEAD_TIMEOUT), "--max-headers", "10")  # fmt: skip
        gw = Gateway(proc, url, int(url.rsplit(":", 1)[1]))
        try:
            for _ in range(4):  # the kernel spreads connections over both workers
                with connect(gw) as s:
                    s.sendall(
                        b"GET /v1/models HTTP/1.1\r\n"
                        + b"".join(b"X-%d: v\r\n" % i for i in range(11))
                        + b"\r\n"
                    )
                    assert status_and_error(read_all(s))[0] == 431
            silent = [connect(gw) for _ in range(4)]
            start = time.monotonic()
            assert all(read_all(s) == b"" for s in silent)
            assert time.monotonic() - start < HEAD_TIMEOUT + SLACK
            for s in silent:
                s.close()
        finally:
            stop_gateway(proc)
