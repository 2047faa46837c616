"""Graceful shutdown with draining (`--drain-seconds`), as a user runs it: a real process, SIGTERM, the TGI
double streaming slowly behind it.

The sequence under test (docs/operations.md, "Shutdown and draining"): SIGTERM → for --drain-seconds
`/health` answers 503 "draining" on new connections while requests are still served → the server stops
accepting → the in-flight stream ends normally with `data: [DONE]` (within --shutdown-grace) → exit 0.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes.tgi import EOT, FakeTGI, Pause, tokens
from tests.gateway_process import read_until, run_cli, start_gateway

DRAIN = 1.0
WORDS = [f" w{i}" for i in range(20)]
SLOW = [item for word in WORDS for item in (word, Pause(0.1))]  # 2 s of tokens: the stream outlasts the drain


def script(inputs: str, parameters: dict) -> list[Any]:
    """A slow answer to "slow", a quick one to anything else."""
    return [*SLOW, EOT] if "slow" in inputs else tokens("Hi", EOT)


class SlowStream(threading.Thread):
    """Reads one slow streamed completion to its end; `.raw` is the SSE text received."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.raw, self.error = url, "", None

    def run(self) -> None:
        body = {"model": "fn", "messages": [{"role": "user", "content": "slow"}], "stream": True}
        try:
            with httpx.stream("POST", self.url + "/v1/chat/completions", json=body, timeout=15) as r:
                for text in r.iter_text():
                    self.raw += text
        except httpx.HTTPError as exc:
            self.error = exc


def streamed_text(raw: str) -> str:
    chunks = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def poll(check: Callable[[], Any], timeout: float) -> Any:
    """`check()` every 20 ms until it returns something truthy; None after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.02)
    return None


def health(url: str) -> httpx.Response | None:
    """GET /health on a new connection; None when the connection is refused."""
    try:
        return httpx.get(url + "/health", timeout=2)
    except httpx.TransportError:
        return None


def draining(url: str) -> httpx.Response | None:
    r = health(url)
    return r if r is not None and r.status_code == 503 else None


def drain_and_stop(proc: subprocess.Popen[str], url: str, tgi: FakeTGI) -> str:
    """SIGTERM with a slow stream in flight; check every step of the shutdown; the process's output."""
    stream = SlowStream(url)
    stream.start()
    assert tgi.wait_until(lambda: tgi.streams_open == 1, 5)
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()

    r = poll(lambda: draining(url), 2)  # the workers of --workers N get the signal from their supervisor
    assert r is not None, "no 503 while draining"
    assert r.json() == {"status": "draining", "error": "the gateway is shutting down"}
    ok = httpx.post(
        url + "/v1/chat/completions", json={"model": "fn", "messages": [{"role": "user", "content": "x"}]}
    )
    assert ok.status_code == 200, "requests are still served while draining"

    assert poll(lambda: health(url) is None, DRAIN + 3), "the server stopped accepting after the drain"
    stream.join(10)
    assert stream.error is None and stream.raw.endswith("data: [DONE]\n\n"), (stream.error, stream.raw[-300:])
    assert streamed_text(stream.raw) == "".join(WORDS).strip(), "the whole answer"
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, out
    assert time.monotonic() - signalled < DRAIN + 6, "exited within bounds"
    return out


def test_sigterm_drains_then_stops(model_dir: Path) -> None:
    with FakeTGI(script=script) as tgi:
        proc, url = start_gateway("--model", str(model_dir), "--served-model-name", "fn", "--endpoint", tgi.url,
                                  "--drain-seconds", str(DRAIN), "--shutdown-grace", "10")  # fmt: skip
        try:
            out = drain_and_stop(proc, url, tgi)
        finally:
            proc.kill()
    assert "SIGTERM: draining for 1 s" in out


def test_workers_drain_too(model_dir: Path) -> None:
    with FakeTGI(script=script) as tgi:
        proc, url = start_gateway("--model", str(model_dir), "--served-model-name", "fn", "--endpoint", tgi.url,
                                  "--workers", "2", "--drain-seconds", str(DRAIN), "--shutdown-grace", "10")  # fmt: skip
        try:
            # /health answered by one worker: the other may not have installed its drain handler yet
            started = read_until(proc, "serving fn (Functionary template", count=2)
            out = started + drain_and_stop(proc, url, tgi)
        finally:
            proc.kill()
    assert out.count("SIGTERM: draining for 1 s") == 2, "each worker drains"


def test_a_second_sigint_ends_the_drain(model_dir: Path) -> None:
    with FakeTGI(script=script) as tgi:
        proc, url = start_gateway("--model", str(model_dir), "--served-model-name", "fn", "--endpoint", tgi.url,
                                  "--drain-seconds", "60")  # fmt: skip
        try:
            proc.send_signal(signal.SIGTERM)
            assert poll(lambda: draining(url), 2) is not None
            proc.send_signal(signal.SIGINT)
            started = time.monotonic()
            out, _ = proc.communicate(timeout=10)
        finally:
            proc.kill()
    assert proc.returncode == 0, out
    assert time.monotonic() - started < 5, "not the 60 s drain"


@pytest.mark.parametrize("value", ["-1", "soon"])
def test_bad_drain_seconds_exit_2(model_dir: Path, value: str) -> None:
    r = run_cli("--model", str(model_dir), "--drain-seconds", value)
    assert r.returncode == 2 and "--drain-seconds" in r.stderr
