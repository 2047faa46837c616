"""benchmarks/lean_tgi.py, the benchmarks' cheap TGI double, sends what FakeTGI (the faithful one) sends."""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.fakes.tgi import FakeTGI, tokens

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from lean_tgi import LeanTGI  # noqa: E402

SCRIPT = tokens("Hel", "lo", " wor", "ld", "<|eot_id|>", "never sent")
INPUTS = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"


@pytest.fixture(scope="module")
def doubles() -> Iterator[tuple[str, str]]:
    lean = LeanTGI(SCRIPT, token_delay=0.002)
    lean.start()
    try:
        with FakeTGI(script=SCRIPT, token_delay=0.002) as fake:
            yield fake.url, lean.url
    finally:
        lean.stop()


def without_seed(body: bytes) -> object:
    obj = orjson.loads(body)
    details = obj.get("details") if isinstance(obj, dict) else None
    if isinstance(details, dict):
        details.pop("seed", None)
    return obj


@pytest.mark.parametrize(
    "parameters",
    [
        {"details": True},
        {"details": False},
        {"details": True, "do_sample": True, "max_new_tokens": 3},
        {},
    ],
)
def test_same_events_and_bodies(doubles: tuple[str, str], parameters: dict) -> None:
    body = {"inputs": INPUTS, "parameters": parameters}
    answers = []
    for url in doubles:
        with httpx.Client(base_url=url) as client:
            stream = client.post("/generate_stream", json=body)
            whole = client.post("/generate", json=body)
        events = [without_seed(line[6:]) for line in stream.text.split("\n\n") if line.startswith("data: ")]
        answers.append(
            (
                stream.status_code,
                stream.headers["content-type"],
                events,
                whole.status_code,
                without_seed(whole.content),
                whole.headers["x-prompt-tokens"],
                whole.headers["x-generated-tokens"],
            )
        )
    fake, lean = answers
    assert lean == fake
    assert len(fake[2]) == (3 if parameters.get("max_new_tokens") else 5)


def test_info_and_health(doubles: tuple[str, str]) -> None:
    fake_url, lean_url = doubles
    assert httpx.get(f"{lean_url}/info").json() == httpx.get(f"{fake_url}/info").json()
    assert httpx.get(f"{lean_url}/health").status_code == 200


def test_paced_and_a_client_that_leaves_stops_the_generation() -> None:
    lean = LeanTGI(SCRIPT, token_delay=0.05)
    lean.start()
    try:
        host, port = lean.url.removeprefix("http://").split(":")
        body = orjson.dumps({"inputs": INPUTS, "parameters": {}})
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(
                b"POST /generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
            )
            sock.settimeout(5)
            first = b""
            while b'"index":1' not in first and len(first) < 65536:
                first += sock.recv(65536) or b"?" * 65536
            assert b"200 OK" in first and b'"index":2' not in first
        deadline = time.monotonic() + 5
        while lean.generations[-1].outcome == "running" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lean.generations[-1].outcome == "cancelled"
        assert len(lean.generations[-1].tokens) < 5
        assert lean.in_flight == 0
    finally:
        lean.stop()
