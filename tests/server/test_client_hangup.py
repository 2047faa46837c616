"""A client that hangs up in the middle of its request body is logged (and counted) as 499, like any client
that leaves before its answer (issue 11): FastAPI made every failure to read the body a 400. A real gateway
process and a raw socket that sends half the body, then closes."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.fakes.tgi import EOT, FakeTGI, tokens
from tests.gateway_process import read_until, start_gateway


def half_a_body(url: str, chunked: bool) -> None:
    host, port = urlsplit(url).hostname, urlsplit(url).port
    body = b'{"model": "fn", "messages": [{"role": "user", "content": "' + b"x" * 1000 + b'"}]}'
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
    if chunked:
        head += b"transfer-encoding: chunked\r\n\r\n"
        sent = b"%x\r\n%s\r\n" % (len(body) // 2, body[: len(body) // 2])
    else:
        head += b"content-length: %d\r\n\r\n" % len(body)
        sent = body[: len(body) // 2]
    with socket.create_connection((host, port)) as sock:
        sock.sendall(head + sent)
        time.sleep(0.2)  # the server has the head and starts reading the body


@pytest.fixture
def gateway(model_dir: Path):
    with FakeTGI(script=tokens("Hi", EOT)) as tgi:
        proc, url = start_gateway(
            "--model", str(model_dir), "--served-model-name", "fn", "--endpoint", tgi.url
        )
        try:
            yield proc, url
        finally:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_client_that_hangs_up_mid_body_is_a_499(gateway: tuple[subprocess.Popen[str], str], chunked: bool):
    proc, url = gateway
    half_a_body(url, chunked)
    line = read_until(proc, "route=/v1/chat/completions", timeout=10).splitlines()[-1]
    assert "status=499" in line and "disconnected=yes" in line, line
    metrics = httpx.get(url + "/metrics").text
    assert 'tgi_gateway_requests_total{model="",route="/v1/chat/completions",status="499"} 1.0' in metrics
    assert 'status="400"' not in metrics
