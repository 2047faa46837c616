"""File descriptors (tgi_gateway/server/descriptors.py): the soft RLIMIT_NOFILE raised to the hard limit at
start, and a gateway out of descriptors saying so itself -- its own 503 ``descriptors_exhausted``, not "TGI is
not reachable" -- with ``/health`` answering 503 so that a load balancer stops sending traffic.

The exhaustion is real: the gateway runs with a small hard limit and a flood of silent connections takes its
descriptors, while TGI's one pooled connection is held by a stream, so a chat request must open another.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import aiohttp
import httpx
import pytest

from tests.fakes.tgi import EOT, FakeTGI, Gate
from tests.gateway_process import ROOT, free_port, stop_gateway
from tgi_gateway.errors import DescriptorsExhaustedError, TGIUnavailableError
from tgi_gateway.server.descriptors import DescriptorWatch, default_max_connections
from tgi_gateway.tgi import client

LIMIT = 128  # the gateway's hard RLIMIT_NOFILE in the exhaustion test
KEY = SimpleNamespace(host="tgi", port=80, ssl=True)  # what aiohttp's connection error prints
# The gateway started with a hard limit of LIMIT descriptors (set before it execs, in the child).
LIMITED = (
    "import os, resource, sys;"
    f"resource.setrlimit(resource.RLIMIT_NOFILE, ({LIMIT}, {LIMIT}));"
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


def test_the_soft_limit_is_raised_to_the_hard_limit_and_both_logged() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, hard)
    code = (
        "import logging, resource, sys\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stdout, format='%(message)s')\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({low}, {hard}))\n"
        "from tgi_gateway.server.descriptors import raise_descriptor_limit\n"
        "print('returned', raise_descriptor_limit())\n"
        "print('now', *resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    target = hard if hard != resource.RLIM_INFINITY else max(low, 1 << 20)
    assert f"now {target} {hard}" in out, out
    assert f"returned {target}" in out
    if low < target:
        assert f"soft limit raised from {low} to the hard limit" in out, out


def test_the_default_cap_leaves_descriptors_for_tgi_connections() -> None:
    assert default_max_connections(1024) == 480
    assert default_max_connections(10) == 1


@pytest.mark.parametrize("err", [errno.EMFILE, errno.ENFILE])
def test_emfile_is_the_gateways_own_error_not_tgi_unreachable(err: int) -> None:
    exc = aiohttp.ClientConnectorError(KEY, OSError(err, "Too many open files"))  # type: ignore[arg-type]
    error = client._translate(exc, client._OPENING, url="http://tgi", connect_timeout=1, late="")
    assert isinstance(error, DescriptorsExhaustedError) and not client._retriable(exc)
    assert (
        error.status_code == 503
        and error.code == "descriptors_exhausted"
        and "TGI is not" not in error.message
    )
    refused = aiohttp.ClientConnectorError(KEY, ConnectionRefusedError(errno.ECONNREFUSED, "refused"))  # type: ignore[arg-type]
    assert isinstance(
        client._translate(refused, client._OPENING, url="u", connect_timeout=1, late=""), TGIUnavailableError
    )


def test_health_problem_is_reported_for_a_while_after_exhaustion() -> None:
    watch = DescriptorWatch()
    assert watch.problem() is None
    watch.exhausted()
    assert "file descriptors" in (watch.problem() or "")


def _request(sock: socket.socket, head: bytes, body: bytes = b"") -> tuple[int, dict]:
    sock.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    raw = b""
    while b"\r\n\r\n" not in raw:
        raw += sock.recv(65536)
    head_raw, _, rest = raw.partition(b"\r\n\r\n")
    length = int(
        next(
            line.split(b":")[1]
            for line in head_raw.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
    )
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(head_raw.split(b" ")[1]), json.loads(rest)


def test_out_of_descriptors_the_gateway_says_so_and_health_is_503() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 4 * LIMIT:
        pytest.skip("the test process needs more descriptors than the gateway")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4 * LIMIT), hard))
    port = free_port()
    gate = Gate()
    with FakeTGI(script=["It", gate, " is", EOT], port=port), ThreadPoolExecutor(1) as pool:
        proc, url = _start_limited(port)
        flood: list[socket.socket] = []
        try:
            kept = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10)
            chat = {"model": "fn", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
            held = pool.submit(
                httpx.post, url + "/v1/chat/completions", json=chat, timeout=20
            )  # TGI's pooled one
            time.sleep(0.5)
            for _ in range(2 * LIMIT):  # more than the gateway can accept
                flood.append(socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=5))
            time.sleep(0.5)
            body = json.dumps({**chat, "stream": False}).encode()
            status, answer = _request(kept, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                      b"Content-Type: application/json\r\n", body)  # fmt: skip
            assert status == 503, answer
            assert (
                answer["error"]["code"] == "descriptors_exhausted"
                and "TGI is not" not in answer["error"]["message"]
            )
            status, health = _request(kept, b"GET /health HTTP/1.1\r\nHost: x\r\n")
            assert status == 503 and "file descriptors" in health["error"], health
            kept.close()
        finally:
            for s in flood:
                s.close()
            gate.open()
            held.result(timeout=20)
            stop_gateway(proc)


def _start_limited(tgi_port: int) -> tuple[subprocess.Popen[str], str]:
    """The gateway with a hard limit of LIMIT descriptors; returns once its /health is 200 (≤ 30 s)."""
    port = free_port()
    cmd = [sys.executable, "-c", LIMITED, str(ROOT / "server_tgi.py"), "--model", "fn", "--template-version", "v3-llama3.1",
           "--no-launch", "--endpoint", f"http://127.0.0.1:{tgi_port}", "--log-level", "warning",
           "--max-connections", "1000", "--head-timeout", "30", "--port", str(port)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"the gateway did not become ready:\n{proc.communicate()[0]}")


def test_health_is_ok_again_once_the_window_after_the_last_exhaustion_has_passed(monkeypatch) -> None:
    from tgi_gateway.server import descriptors

    clock = [1000.0]
    monkeypatch.setattr(descriptors.time, "monotonic", lambda: clock[0])
    watch = descriptors.DescriptorWatch()
    assert watch.problem() is None
    watch.exhausted()
    clock[0] += descriptors.EXHAUSTED_FOR - 0.1
    assert "ran out of file descriptors" in (watch.problem() or "")
    clock[0] += 0.2
    assert watch.problem() is None, "a window after the last EMFILE, /health is ok again"
    watch.exhausted()
    assert watch.problem() is not None, "a new EMFILE opens a new window"
