"""Metrics, request ids and access logs: real requests (the official openai SDK, a real socket, the TGI
double), then what ``GET /metrics`` and the ``tgi_gateway.access`` log say about them."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.serve import serve
from tests.fakes.tgi import EOT, Fail, FakeTGI, Gate, Pause, tokens
from tgi_gateway.errors import (
    AuthenticationError,
    TGIContextLengthError,
    TGIGenerationError,
    TGIOverloadedError,
    TGIProtocolError,
    TGIRejectedError,
    TGIUnavailableError,
    TGIValidationError,
    UpstreamError,
)
from tgi_gateway.prompting import Template, Version
from tgi_gateway.server.app import create_app
from tgi_gateway.server.asgi import send_error
from tgi_gateway.server.telemetry import (
    TEXT_FORMAT,
    AccessLine,
    JsonFormatter,
    error_kind,
    forget_dead_workers,
)
from tgi_gateway.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
MODEL = "functionary-test"
CHAT = "/v1/chat/completions"
PROMPT = "Is it raining in Zanzibar today?"  # must never appear in a log line
ASK = [{"role": "user", "content": PROMPT}]
TEXT = tokens("It", " is", " sunny", ".", EOT)  # 5 tokens generated, EOT included
T = TypeVar("T")


@pytest.fixture(scope="module")
def tgi() -> Iterator[FakeTGI]:
    with FakeTGI(script=TEXT) as double:
        yield double


@pytest.fixture(autouse=True)
def _script(tgi: FakeTGI) -> None:
    tgi.script = TEXT


@pytest.fixture
def access(caplog: pytest.LogCaptureFixture) -> Callable[[], list[AccessLine]]:
    """The access lines logged so far (records from the server thread included)."""
    caplog.set_level(logging.DEBUG, logger="tgi_gateway")
    return lambda: [r.msg for r in caplog.records if r.name == "tgi_gateway.access"]


@contextmanager
def gateway(tgi: FakeTGI, **settings: Any) -> Iterator[str]:
    app = create_app(Settings(model=MODEL, endpoint=tgi.url, **settings), Template(Version.V3_LLAMA31))
    with serve(app) as url:
        yield url


def sdk(url: str, api_key: str = "sk-unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=20)


def eventually(probe: Callable[[], T], timeout: float = 5.0) -> T:
    """`probe()` once it is truthy (the access line and metrics are written just after the response
    went out), polled for at most `timeout` seconds; its last value otherwise."""
    deadline = time.monotonic() + timeout
    while not (value := probe()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return value


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """A sample's value; 0 for a labelled series not created yet (a counter that never counted)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def requests_total(url: str, **labels: str) -> float:
    return value(scrape(url), "tgi_gateway_requests_total", **labels)


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------


def test_metrics_count_each_kind_of_request(tgi: FakeTGI) -> None:
    with gateway(tgi) as url, sdk(url) as client:
        prompt_tokens = client.chat.completions.create(model=MODEL, messages=ASK).usage.prompt_tokens
        list(client.chat.completions.create(model=MODEL, messages=ASK, stream=True))
        with pytest.raises(openai.BadRequestError):  # the gateway's own 400
            client.chat.completions.create(model=MODEL, messages=ASK, n=9)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-4o", messages=ASK)
        tgi.config.max_input_tokens = 5
        try:
            with pytest.raises(openai.BadRequestError):  # TGI's: context_length (the prompt is too long)
                client.chat.completions.create(model=MODEL, messages=ASK)
        finally:
            tgi.config.max_input_tokens = 8191
        tgi.config.max_concurrent_requests = 0
        try:
            with pytest.raises(openai.RateLimitError):  # TGI's: overloaded
                client.chat.completions.create(model=MODEL, messages=ASK, stream=True)
        finally:
            tgi.config.max_concurrent_requests = 128
        tgi.script = ["It", " is", Fail("CUDA out of memory")]
        with pytest.raises(openai.APIError):  # TGI's, mid-stream: generation
            list(client.chat.completions.create(model=MODEL, messages=ASK, stream=True))
        assert httpx.get(url + "/v1/nothing/here").status_code == 404

        chat = {"route": CHAT, "model": MODEL}
        assert eventually(lambda: requests_total(url, status="200", **chat) == 3)
        m = scrape(url)
    assert value(m, "tgi_gateway_requests_total", status="400", **chat) == 2
    assert value(m, "tgi_gateway_requests_total", status="429", **chat) == 1
    assert value(m, "tgi_gateway_requests_total", route=CHAT, status="404", model="other") == 1, "bounded"
    assert value(m, "tgi_gateway_requests_total", route="unmatched", status="404", model="") == 1
    errors = {
        dict(labels)["kind"]: v
        for (name, labels), v in m.items()
        if name == "tgi_gateway_upstream_errors_total"
    }
    assert errors == {"context_length": 1, "overloaded": 1, "generation": 1}
    assert value(m, "tgi_gateway_completion_tokens_total", model=MODEL) == 10, "two complete answers of 5"
    assert value(m, "tgi_gateway_prompt_tokens_total", model=MODEL) == 2 * prompt_tokens > 0
    assert value(m, "tgi_gateway_time_to_first_token_seconds_count", stream="false") == 1
    assert value(m, "tgi_gateway_time_to_first_token_seconds_count", stream="true") == 2
    assert value(m, "tgi_gateway_time_to_first_token_seconds_bucket", stream="false", le="30.0") == 1
    assert value(m, "tgi_gateway_streams_in_flight") == 0
    assert value(m, "tgi_gateway_request_duration_seconds_count", route=CHAT) == 7
    assert value(m, "tgi_gateway_overhead_seconds_count", route=CHAT) == 7
    assert value(m, "tgi_gateway_overhead_seconds_sum", route=CHAT) <= value(
        m, "tgi_gateway_request_duration_seconds_sum", route=CHAT
    )
    assert not any(labels and dict(labels).get("route", "").startswith("/v1/nothing") for _, labels in m)


def test_metrics_are_not_in_the_openapi_schema(tgi: FakeTGI) -> None:
    with gateway(tgi) as url:
        assert "/metrics" not in httpx.get(url + "/openapi.json").json()["paths"]
        assert "# TYPE tgi_gateway_requests_total counter" in httpx.get(url + "/metrics").text


def test_upstream_timeout_is_its_own_kind_and_not_overhead(tgi: FakeTGI, access) -> None:
    tgi.script = ["It", " is", Pause(0.6), " sunny", EOT]
    with gateway(tgi, read_timeout=0.2, request_timeout=0.3) as url, sdk(url) as client:
        with pytest.raises(openai.APIError, match="in the middle of the generation \\(read timeout\\)"):
            list(client.chat.completions.create(model=MODEL, messages=ASK, stream=True))
        with pytest.raises(openai.InternalServerError, match="within 0.3 s \\(--request-timeout\\)") as e:
            client.chat.completions.create(model=MODEL, messages=ASK)  # TGI's /generate: one answer at the end
        assert (e.value.status_code, e.value.code) == (504, "timeout")
        assert eventually(
            lambda: value(scrape(url), "tgi_gateway_upstream_errors_total", kind="timeout") == 2
        )
    lines = [line for line in access() if line["route"] == CHAT]
    assert [(line["stream"], line["status"], line["upstream_error"]) for line in lines] == [
        (True, 200, "timeout"),
        (False, 504, "timeout"),
    ]
    # the time spent waiting for TGI (its next event, its answer) is TGI's time, not the gateway's
    # (less 10 ms: the event loop may fire a timer up to its clock resolution early)
    for line, waited in zip(lines, (0.2, 0.3)):
        assert line["duration_s"] - line["overhead_s"] >= waited - 0.01


def test_slow_tgi_is_duration_not_overhead(tgi: FakeTGI, access) -> None:
    tgi.script = ["It", Pause(0.15), " is", Pause(0.15), " sunny", ".", EOT]
    with gateway(tgi) as url, sdk(url) as client:
        client.chat.completions.create(model=MODEL, messages=ASK)
        list(client.chat.completions.create(model=MODEL, messages=ASK, stream=True))
        assert eventually(lambda: len([line for line in access() if line["route"] == CHAT]) == 2)
    non_stream, stream = [line for line in access() if line["route"] == CHAT]
    assert (non_stream["stream"], stream["stream"]) == (False, True)
    for line in (non_stream, stream):
        assert line["duration_s"] >= 0.3
        # TGI's 0.3 s of pauses are not overhead (a little of them overlaps the gateway's own work on the
        # token before each pause, hence 0.25)
        assert 0 <= line["overhead_s"] <= line["duration_s"] - 0.25, line
        assert 0 < line["ttft_s"] <= line["duration_s"]
    assert stream["ttft_s"] < 0.15, "the stream's first chunk went out before TGI's pauses"


def test_in_flight_streams_back_to_zero_after_a_client_disconnect(tgi: FakeTGI, access) -> None:
    gate = Gate()
    tgi.script = ["It", " is", gate, " sunny", EOT]
    with gateway(tgi) as url:

        def gauge() -> float:
            return value(scrape(url), "tgi_gateway_streams_in_flight")

        with httpx.Client(base_url=url) as h:
            body = {"model": MODEL, "messages": ASK, "stream": True}
            with h.stream("POST", CHAT, json=body) as r:
                lines = r.iter_lines()  # kept: dropping a half-read iterator closes the connection
                assert any("It" in line for line in lines)
                assert gauge() == 1
        assert eventually(lambda: gauge() == 0), "the stream ended with its client"
        gate.open()
        [line] = eventually(lambda: [line for line in access() if line["route"] == CHAT])
    assert (line["status"], line["stream"], line["disconnected"]) == (200, True, True)
    assert line["completion_tokens"] is None and line["upstream_error"] is None


def test_a_client_gone_before_the_answer_is_a_499(tgi: FakeTGI, access) -> None:
    gate = Gate()
    tgi.script = ["It", gate, " sunny", EOT]

    async def leave(url: str) -> None:
        async with httpx.AsyncClient(base_url=url) as h:
            task = asyncio.create_task(h.post(CHAT, json={"model": MODEL, "messages": ASK}))
            assert await tgi.wait_until_async(lambda: tgi.generate_open == 1, 5)  # TGI generating
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    with gateway(tgi) as url:
        asyncio.run(leave(url))
        [line] = eventually(lambda: [line for line in access() if line["route"] == CHAT])
        assert requests_total(url, route=CHAT, status="499", model=MODEL) == 1
    gate.open()
    assert (line["status"], line["stream"], line["disconnected"]) == (499, False, True)
    assert (tgi.last_generation.route, tgi.last_generation.outcome) == ("generate", "disconnected")


# ------------------------------------------------------------------------------------------------
# Request ids
# ------------------------------------------------------------------------------------------------


def test_request_id_is_echoed_generated_or_replaced(tgi: FakeTGI, access) -> None:
    with gateway(tgi) as url, httpx.Client(base_url=url) as h:
        chat = {"model": MODEL, "messages": ASK}
        given = {"x-request-id": "client 42/a:b"}
        assert h.get("/v1/models", headers=given).headers["x-request-id"] == "client 42/a:b"
        with h.stream("POST", CHAT, json={**chat, "stream": True}, headers=given) as r:  # SSE
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["x-request-id"] == "client 42/a:b"
            assert r.read().endswith(b"data: [DONE]\n\n")
        assert (
            h.post(CHAT, json={**chat, "model": "x"}, headers=given).headers["x-request-id"]
            == "client 42/a:b"
        )
        assert h.post(CHAT, json={}, headers=given).headers["x-request-id"] == "client 42/a:b"  # 400

        generated = [h.get("/health").headers["x-request-id"] for _ in range(2)]
        for bad in ("x" * 129, "caf\u00e9".encode(), ""):
            generated.append(h.get("/health", headers={"x-request-id": bad}).headers["x-request-id"])
        assert h.get("/health", headers={"x-request-id": "x" * 128}).headers["x-request-id"] == "x" * 128
        logged = eventually(lambda: len(access()) == 10 and {line["request_id"] for line in access()})
    assert all(len(rid) == 32 and int(rid, 16) >= 0 for rid in generated) and len(set(generated)) == 5
    assert logged == {"client 42/a:b", "x" * 128, *generated}, "the log lines name the ids sent back"


def test_outermost_other_middlewares_401_and_unexpected_500_are_counted_and_tagged(
    tgi: FakeTGI, access
) -> None:
    class KeyAuth:  # what the authentication middleware does: 401 itself, or names the key
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and scope["path"].startswith("/v1/"):
                if dict(scope["headers"]).get(b"authorization") != b"Bearer sk-good":
                    await send_error(send, AuthenticationError("Incorrect API key provided."))
                    return
                scope["tgi_gateway.key_id"] = "key-1"
            await self.app(scope, receive, send)

    app = create_app(Settings(model=MODEL, endpoint=tgi.url), Template(Version.V3_LLAMA31))
    app.add_middleware(KeyAuth)  # added after create_app's telemetry: it stays outside all the same

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    with serve(app) as url:
        with pytest.raises(openai.AuthenticationError) as e, sdk(url, "sk-bad") as bad:
            bad.chat.completions.create(model=MODEL, messages=ASK)
        assert len(e.value.response.headers["x-request-id"]) == 32
        with sdk(url, "sk-good") as good:
            good.chat.completions.create(model=MODEL, messages=ASK)
        r = httpx.get(url + "/boom")
        assert r.status_code == 500 and len(r.headers["x-request-id"]) == 32
        assert eventually(lambda: requests_total(url, route="/boom", status="500", model="") == 1)
        assert requests_total(url, route=CHAT, status="401", model="") == 1
    lines = {(line["route"], line["status"]): line for line in access()}
    assert lines[(CHAT, 401)]["key_id"] is None and lines[(CHAT, 200)]["key_id"] == "key-1"


# ------------------------------------------------------------------------------------------------
# Logs
# ------------------------------------------------------------------------------------------------


def test_json_access_line_and_no_secret_or_prompt_in_any_log(tgi: FakeTGI, caplog, access) -> None:
    caplog.set_level(logging.DEBUG, logger="uvicorn")
    tgi.config.api_key = "tgi-key-not-to-be-logged"
    try:
        with (
            gateway(tgi, tgi_api_key="tgi-key-not-to-be-logged") as url,
            sdk(url, "sk-key-not-to-be-logged") as c,
        ):
            with c.chat.completions.with_streaming_response.create(
                model=MODEL, messages=ASK, stream=True, stream_options={"include_usage": True}
            ) as r:
                request_id = r.headers["x-request-id"]
                usage = next(chunk.usage for chunk in r.parse() if chunk.usage)
            line = eventually(lambda: [line for line in access() if line["route"] == CHAT])[0]
    finally:
        tgi.config.api_key = None
    formatter = JsonFormatter()
    access_record = next(r for r in caplog.records if r.name == "tgi_gateway.access")
    obj = json.loads(formatter.format(access_record))
    assert (
        obj["logger"] == "tgi_gateway.access"
        and obj["level"] == "INFO"
        and obj["message"] == f"POST {CHAT} 200"
    )
    fields = {k: v for k, v in obj.items() if k not in ("ts", "level", "logger", "pid", "message")}
    assert fields == dict(line)
    assert fields["request_id"] == request_id
    assert (fields["method"], fields["route"], fields["path"], fields["status"]) == ("POST", CHAT, CHAT, 200)
    assert (fields["model"], fields["stream"], fields["disconnected"]) == (MODEL, True, False)
    assert (fields["prompt_tokens"], fields["completion_tokens"]) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    assert 0 < fields["ttft_s"] <= fields["duration_s"] and 0 <= fields["overhead_s"] <= fields["duration_s"]
    assert fields["upstream_error"] is None and fields["key_id"] is None

    text = logging.Formatter(TEXT_FORMAT)
    ours = [r for r in caplog.records if r.name.startswith(("tgi_gateway", "uvicorn"))]
    assert any("serving functionary-test" in r.getMessage() for r in ours), "the other lines are captured too"
    for record in ours:
        for rendered in (formatter.format(record), text.format(record)):
            assert "\n" not in rendered or record.exc_info
            for secret in (PROMPT, "Zanzibar", "not-to-be-logged", "Bearer"):
                assert secret not in rendered


def test_text_access_line_is_one_line_that_cannot_be_forged() -> None:
    line = AccessLine(
        request_id="ab c", path='/v1/x\nstatus=200 "', status=404, model=None, stream=False, s=0.5
    )
    assert str(line) == r'request_id="ab c" path="/v1/x\nstatus=200 \"" status=404 model=- stream=no s=0.5'


@pytest.mark.parametrize(
    "exc,kind",
    [
        (TGIOverloadedError("x"), "overloaded"),
        (TGIUnavailableError("x"), "unavailable"),
        (TGIValidationError("x"), "validation"),
        (TGIContextLengthError("x"), "context_length"),
        (TGIGenerationError("x"), "generation"),
        (TGIProtocolError("x"), "protocol"),
        (TGIRejectedError("x"), "rejected"),
        (UpstreamError("x"), "upstream"),
        (AuthenticationError("x"), None),
        (ValueError("x"), None),
    ],
)
def test_error_kind(exc: BaseException, kind: str | None) -> None:
    assert error_kind(exc) == kind


def test_error_kind_of_timeouts() -> None:
    def caused(exc: BaseException, cause: BaseException) -> BaseException:
        exc.__cause__ = cause
        return exc

    assert error_kind(caused(TGIProtocolError("x"), TimeoutError("r"))) == "timeout"
    assert error_kind(caused(TGIUnavailableError("x"), aiohttp.ConnectionTimeoutError("c"))) == "timeout"
    assert error_kind(caused(TGIOverloadedError("x"), TimeoutError("p"))) == "overloaded"
    assert error_kind(caused(TGIUnavailableError("x"), aiohttp.ServerDisconnectedError())) == "unavailable"


def test_forget_dead_workers_drops_only_their_live_gauges(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    dead_pid, alive_pid = int(dead.stdout), os.getpid()
    for name in (f"gauge_livesum_{dead_pid}.db", f"gauge_livesum_{alive_pid}.db", f"counter_{dead_pid}.db"):
        (tmp_path / name).write_bytes(b"")
    forget_dead_workers(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"counter_{dead_pid}.db",
        f"gauge_livesum_{alive_pid}.db",
    ]


# ------------------------------------------------------------------------------------------------
# Several workers: one scrape answers for all of them
# ------------------------------------------------------------------------------------------------


def test_two_workers_json_logs_and_metrics_summed_over_workers(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{# version=v3-llama3.1 #}"})
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "gateway.log"
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"} | {"HF_HUB_OFFLINE": "1"}

    def logged() -> list[dict[str, Any]]:
        return [
            json.loads(line) for line in log_path.read_text().splitlines(keepends=True) if line.endswith("\n")
        ]

    def chat_pids() -> set[int]:
        return {line["pid"] for line in logged() if line.get("route") == CHAT}

    gate = Gate()
    with FakeTGI(script=TEXT) as tgi, log_path.open("w") as log:
        flags = ["--model", str(model_dir), "--served-model-name", MODEL, "--endpoint", tgi.url]
        flags += ["--port", str(port), "--workers", "2", "--log-format", "json", "--shutdown-grace", "2"]
        cmd = [sys.executable, str(ROOT / "server_tgi.py"), *flags]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            assert eventually(lambda: _answers(url + "/health"), 30), log_path.read_text()
            sent = 0
            while sent < 60 and (sent < 6 or len(chat_pids()) < 2):  # until both workers have served some
                with sdk(url) as client:  # a new connection each time: the kernel picks the worker
                    client.chat.completions.create(model=MODEL, messages=ASK)
                sent += 1
                eventually(lambda n=sent: len([1 for line in logged() if line.get("route") == CHAT]) == n)
            assert len(chat_pids()) == 2, "the requests were not spread over the two workers"
            for _ in range(6):  # whichever worker answers, it counts every worker's requests
                assert requests_total(url, route=CHAT, status="200", model=MODEL) == sent

            def stream() -> None:
                with sdk(url) as client:
                    list(client.chat.completions.create(model=MODEL, messages=ASK, stream=True))

            tgi.script = ["It", gate, " is", EOT]
            streaming = threading.Thread(target=stream)
            streaming.start()
            assert tgi.wait_until(lambda: tgi.streams_open == 1, 5)
            assert eventually(lambda: value(scrape(url), "tgi_gateway_streams_in_flight") == 1)
            assert all(value(scrape(url), "tgi_gateway_streams_in_flight") == 1 for _ in range(4))
            gate.open()
            streaming.join(10)
            assert eventually(lambda: value(scrape(url), "tgi_gateway_streams_in_flight") == 0)
        finally:
            gate.open()
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
    assert proc.returncode == 0, log_path.read_text()
    lines = logged()
    assert len(lines) == len(log_path.read_text().splitlines()), "every line is one JSON object"
    assert any(line["logger"].startswith("uvicorn") for line in lines), "uvicorn's lines too"
    [metrics_dir] = [
        line["message"].rsplit(" ", 1)[1] for line in lines if "metrics are aggregated" in line["message"]
    ]
    assert not Path(metrics_dir).exists(), "the CLI removed its metrics directory"


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False
