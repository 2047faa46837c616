"""Requests still running when ``--shutdown-grace`` ends (issue 11): uvicorn cancels them. A stream then gets
one error event (the OpenAI envelope) and the end of its chunked body, a request not answered yet a 503; their
TGI requests are closed, nothing is logged as a traceback, and the access log says ``shutdown=yes``. A real
gateway process, SIGTERM, the TGI double generating slowly behind it."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Any

import httpx

from tests.fakes.tgi import EOT, FakeTGI, Pause
from tests.gateway_process import start_gateway

STREAMS = 5
SLOW = [item for i in range(100) for item in (f" w{i}", Pause(0.1))]  # 10 s: outlasts the grace
MESSAGE = "The gateway is shutting down: this answer was cut when its shutdown grace period ended; retry the request."


class Client(threading.Thread):
    def __init__(self, url: str, stream: bool) -> None:
        super().__init__(daemon=True)
        self.url, self.stream = url, stream
        self.raw, self.status, self.error = "", 0, None

    def run(self) -> None:
        body = {"model": "fn", "messages": [{"role": "user", "content": "slow"}], "stream": self.stream}
        try:  # httpx raises on a chunked body without its terminator: a clean read is an ended body
            with httpx.stream("POST", self.url + "/v1/chat/completions", json=body, timeout=20) as r:
                self.status = r.status_code
                for text in r.iter_text():
                    self.raw += text
        except httpx.HTTPError as exc:
            self.error = exc


def events(raw: str) -> list[Any]:
    return [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]


def test_requests_running_when_the_grace_ends_are_answered_and_logged_not_cut(model_dir: Path) -> None:
    with FakeTGI(script=lambda inputs, parameters: [*SLOW, EOT]) as tgi:
        proc, url = start_gateway("--model", str(model_dir), "--served-model-name", "fn", "--endpoint", tgi.url,
                                  "--shutdown-grace", "1")  # fmt: skip
        try:
            clients = [Client(url, stream=True) for _ in range(STREAMS)] + [Client(url, stream=False)]
            for client in clients:
                client.start()
            assert tgi.wait_until(lambda: tgi.streams_open == STREAMS and tgi.generate_open == 1, 10)
            assert tgi.wait_until(lambda: all(len(g.tokens) >= 2 for g in tgi.generations), 5)
            proc.send_signal(signal.SIGTERM)
            for client in clients:
                client.join(10)
            out, _ = proc.communicate(timeout=10)
        finally:
            proc.kill()
        generations = tgi.generations

    for client in clients[:STREAMS]:
        assert client.error is None and client.status == 200, (client.error, client.raw[-300:])
        received = events(client.raw)
        assert received[-1] == {
            "error": {"message": MESSAGE, "type": "server_error", "param": None, "code": None}
        }
        assert len(received) > 2 and "[DONE]" not in client.raw  # tokens, then the error, then the end
    nonstream = clients[-1]
    assert (nonstream.error, nonstream.status) == (None, 503)
    assert json.loads(nonstream.raw)["error"]["message"] == MESSAGE
    assert all(g.disconnected for g in generations), "every TGI request was closed"
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "CancelledError" not in out, out
    lines = [line for line in out.splitlines() if "tgi_gateway.access" in line and "/v1/chat" in line]
    assert len(lines) == STREAMS + 1, out
    assert sum("status=200" in line and "stream=yes" in line for line in lines) == STREAMS, lines
    assert sum("status=503" in line for line in lines) == 1, lines
    assert all("shutdown=yes" in line and "disconnected=no" in line for line in lines), lines
