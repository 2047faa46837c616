"""When TGI fails: the real gateway process (``server_tgi.py --no-launch``) over real sockets, TGI played by the
double on one fixed port, so that it can die, stay down, hang, and come back where the gateway expects it.

What an operator relies on (docs/operations.md, "When TGI fails"):

* TGI dying mid-stream (its connection reset, or its server stopped) ends each affected stream with one
  ``data: {"error": ...}`` event and a clean end of the body, without ``[DONE]``; other streams on the same
  gateway carry on and complete; the gateway itself stays up.
* TGI down: every request fails fast with a 503 in the OpenAI envelope, within a bound that follows from the
  gateway's ``--connect-timeout`` and ``--connect-retries``.
* TGI back on the same port: served again at once, without restarting the gateway.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest

from tests.fakes.tgi import EOT, Drop, FakeTGI, Gate, Pause
from tests.gateway_process import free_port, start_gateway

MODEL = "fn"
ASK = [{"role": "user", "content": "What is the weather in Hanoi?"}]
CONNECT_TIMEOUT = 0.25  # --connect-timeout: small, so that an unresponsive TGI is reported quickly
ATTEMPTS = 3  # --connect-retries (attempts in all)
READ_TIMEOUT = 2.0  # --read-timeout: a TGI silent this long is hung (a real one sends keep-alives every 15 s)
REQUEST_TIMEOUT = 1.5  # --request-timeout: a non-stream answer (TGI's /generate) taking longer is given up
# The gateway's longest wait between two connection attempts: 50, 100, then at most 200 ms, plus up to
# 20 ms of jitter (tgi_gateway/tgi/client.py, _BACKOFF).
MAX_BACKOFF = 0.22
SLACK = 0.5  # scheduling on a loaded CI machine
# A refused connection fails at once: only the backoff between attempts remains.
REFUSED_BOUND = (ATTEMPTS - 1) * MAX_BACKOFF + SLACK
# An unresponsive TGI (SYNs unanswered): each attempt waits the whole connect timeout.
UNRESPONSIVE_BOUND = ATTEMPTS * CONNECT_TIMEOUT + (ATTEMPTS - 1) * MAX_BACKOFF + SLACK


@dataclass
class Gateway:
    proc: subprocess.Popen[str]
    url: str
    tgi_port: int

    def sdk(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0, timeout=10)

    def assert_up(self) -> None:
        """The process is alive and answers (``/v1/models`` needs no TGI)."""
        assert self.proc.poll() is None, "the gateway process must survive TGI's failures"
        assert httpx.get(self.url + "/v1/models", timeout=5).status_code == 200


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    port = free_port()
    with FakeTGI(port=port):  # up for the gateway's start-up only; each test brings its own
        proc, url = start_gateway("--model", MODEL, "--template-version", "v3-llama3.1",
                                  "--endpoint", f"http://127.0.0.1:{port}", "--no-launch", "--log-level", "warning",
                                  "--connect-timeout", str(CONNECT_TIMEOUT), "--connect-retries", str(ATTEMPTS),
                                  "--read-timeout", str(READ_TIMEOUT), "--request-timeout", str(REQUEST_TIMEOUT))  # fmt: skip
    try:
        yield Gateway(proc, url, port)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out


@dataclass
class Streamed:
    """One streamed answer as the client saw it: the ``data:`` payloads, and how the body ended."""

    data: list[str] = field(default_factory=list)
    broken: BaseException | None = None  # the body did not end cleanly (reset, truncated chunking)

    @property
    def content(self) -> str:
        events = [json.loads(d) for d in self.data if d != "[DONE]"]
        return "".join(c["delta"].get("content") or "" for e in events for c in e.get("choices", ()))

    @property
    def error(self) -> dict[str, Any] | None:
        errors = [json.loads(d)["error"] for d in self.data if d.startswith('{"error"')]
        return errors[-1] if errors else None


def stream(url: str, tag: str) -> Streamed:
    """POST a streamed chat completion; read it to its end, however it ends."""
    out = Streamed()
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"Weather? {tag}"}], "stream": True}
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=10) as r:
            assert r.status_code == 200, r.read()
            out.data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    except httpx.HTTPError as exc:
        out.broken = exc
    return out


def assert_ended_by_an_error_event(s: Streamed, content: str) -> None:
    assert s.broken is None, f"the body must end cleanly, got {s.broken!r}"
    assert s.content == content, "what was generated before the failure was delivered"
    assert s.error is not None and s.data[-1].startswith('{"error"'), s.data
    assert set(s.error) == {"message", "type", "param", "code"} and "TGI" in s.error["message"], s.error
    assert "[DONE]" not in s.data


def held(tgi: FakeTGI, n: int, tokens_sent: int) -> bool:
    gens = tgi.generations
    return tgi.streams_open == n and len(gens) == n and all(len(g.tokens) == tokens_sent for g in gens)


# ------------------------------------------------------------------------------------------------
# TGI dies mid-stream
# ------------------------------------------------------------------------------------------------


def test_tgi_drops_one_connection_mid_stream_the_others_complete(gateway: Gateway) -> None:
    go, drop = Gate(), Gate()

    def script(inputs: str, parameters: dict) -> list[Any]:
        return ["It", " is", drop, Drop()] if "[drop]" in inputs else ["It", " is", go, " sunny", ".", EOT]

    with FakeTGI(script=script, port=gateway.tgi_port) as tgi, ThreadPoolExecutor(4) as pool:
        dropped = pool.submit(stream, gateway.url, "[drop]")
        others = [pool.submit(stream, gateway.url, f"[keep {i}]") for i in range(3)]
        assert tgi.wait_until(lambda: held(tgi, 4, 2), 10), [
            (g.outcome, len(g.tokens)) for g in tgi.generations
        ]
        drop.open()  # TGI resets that one connection, as when it dies mid-response
        assert_ended_by_an_error_event(dropped.result(timeout=10), "It is")
        # The double's thread counts the dropped response closed a moment after the client saw the error.
        assert tgi.wait_until(lambda: tgi.streams_open == 3, 5), tgi.streams_open
        assert not any(f.done() for f in others), "the other streams go on"
        go.open()
        for f in others:
            s = f.result(timeout=10)
            assert (s.broken, s.error, s.content, s.data[-1]) == (None, None, "It is sunny.", "[DONE]")
        assert sorted(g.outcome for g in tgi.generations) == ["completed"] * 3 + ["dropped"]
    gateway.assert_up()


def test_tgi_server_stopped_mid_stream(gateway: Gateway) -> None:
    gate = Gate()
    with (
        FakeTGI(script=["It", " is", gate, " sunny", EOT], port=gateway.tgi_port) as tgi,
        ThreadPoolExecutor(3) as pool,
    ):
        streams = [pool.submit(stream, gateway.url, f"[{i}]") for i in range(3)]
        assert tgi.wait_until(lambda: held(tgi, 3, 2), 10)
        tgi.stop()  # its server goes away with three answers half sent
        for f in streams:
            assert_ended_by_an_error_event(f.result(timeout=10), "It is")
    gateway.assert_up()
    assert httpx.get(gateway.url + "/health", timeout=5).status_code == 503


def test_tgi_stopped_mid_stream_is_an_api_error_for_the_sdk(gateway: Gateway) -> None:
    gate = Gate()
    with FakeTGI(script=["It", gate, EOT], port=gateway.tgi_port) as tgi, gateway.sdk() as client:
        got: list[str] = []
        with pytest.raises(openai.APIError) as e:
            for chunk in client.chat.completions.create(model=MODEL, messages=ASK, stream=True):
                got += [c.delta.content for c in chunk.choices if c.delta.content]
                if got == ["It"]:
                    assert tgi.wait_until(lambda: held(tgi, 1, 1), 5)
                    tgi.stop()
    assert got == ["It"] and "TGI" in e.value.message
    gateway.assert_up()


def test_tgi_hung_mid_stream_ends_the_stream_after_the_read_timeout(gateway: Gateway) -> None:
    script = ["It", " is", Pause(math.inf)]
    with FakeTGI(script=script, port=gateway.tgi_port, keepalive_interval=None) as tgi:
        start = time.monotonic()
        s = stream(gateway.url, "[hung]")
        elapsed = time.monotonic() - start
        assert_ended_by_an_error_event(s, "It is")
        assert READ_TIMEOUT <= elapsed < READ_TIMEOUT + SLACK
        assert tgi.wait_until(lambda: tgi.last_generation.disconnected, 5), "and TGI's request is closed"
    gateway.assert_up()


def test_tgi_hung_non_stream_is_a_504_after_the_request_timeout(gateway: Gateway) -> None:
    """TGI's /generate answers once the generation is complete: only --request-timeout bounds it."""
    with FakeTGI(script=["It", " is", Pause(math.inf)], port=gateway.tgi_port) as tgi, gateway.sdk() as client:
        start = time.monotonic()
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model=MODEL, messages=ASK)
        elapsed = time.monotonic() - start
        assert REQUEST_TIMEOUT <= elapsed < REQUEST_TIMEOUT + SLACK
        assert (e.value.status_code, e.value.code) == (504, "timeout")
        late = f"TGI did not finish the generation within {REQUEST_TIMEOUT:g} s (--request-timeout)"
        assert e.value.response.json()["error"] == {"message": late, "type": "server_error", "param": None,
                                                    "code": "timeout"}  # fmt: skip
        gen = tgi.last_generation
        assert gen.route == "generate" and len(gen.tokens) == 2
        assert tgi.wait_until(lambda: gen.disconnected, 5), "and TGI's request is closed"
    gateway.assert_up()


@pytest.mark.parametrize("how", ["reset", "stopped"])
def test_tgi_gone_during_a_non_stream_answer_is_a_503(gateway: Gateway, how: str) -> None:
    """TGI's /generate sends nothing before the end: TGI resetting the connection (dying) is indistinguishable
    from a connection closed before the request started, so it is sent again (--connect-retries attempts), then
    a 503; a TGI shutting down answers 503 itself. Either way a quick 503 in the OpenAI envelope, never a hang."""
    gate = Gate()
    with (
        FakeTGI(script=["It", gate, Drop()] if how == "reset" else ["It", gate, EOT], port=gateway.tgi_port) as tgi,
        ThreadPoolExecutor(1) as pool,
        gateway.sdk() as client,
    ):
        pending = pool.submit(client.chat.completions.create, model=MODEL, messages=ASK)
        assert tgi.wait_until(lambda: tgi.generate_open == 1 and len(tgi.last_generation.tokens) == 1, 5)
        if how == "reset":
            gate.open()  # TGI resets the connection, no answer sent
        else:
            tgi.stop()
        start = time.monotonic()
        with pytest.raises(openai.InternalServerError) as e:
            pending.result(timeout=10)
        assert time.monotonic() - start < REFUSED_BOUND
        if how == "reset":
            assert [g.outcome for g in tgi.generations] == ["dropped"] * ATTEMPTS
    assert e.value.status_code == 503
    assert set(e.value.response.json()["error"]) == {"message", "type", "param", "code"}
    gateway.assert_up()


# ------------------------------------------------------------------------------------------------
# TGI down, unresponsive, and back
# ------------------------------------------------------------------------------------------------


def assert_quick_503(gateway: Gateway, bound: float, at_least: float = 0.0) -> None:
    """A non-stream and a stream request both fail with a 503 in the OpenAI envelope, each within ``bound``."""
    with gateway.sdk() as client:
        for stream_ in (False, True):
            start = time.monotonic()
            with pytest.raises(openai.InternalServerError) as e:
                client.chat.completions.create(model=MODEL, messages=ASK, stream=stream_)
            elapsed = time.monotonic() - start
            assert at_least <= elapsed < bound, (
                f"stream={stream_}: {elapsed:.3f} s, expected [{at_least}, {bound})"
            )
            assert e.value.status_code == 503
            assert set(e.value.response.json()["error"]) == {"message", "type", "param", "code"}
            assert "TGI is not reachable" in e.value.message


def test_tgi_down_fails_fast_with_503(gateway: Gateway) -> None:
    assert_quick_503(gateway, REFUSED_BOUND)  # nothing listens on TGI's port: connections are refused
    assert httpx.get(gateway.url + "/health", timeout=5).status_code == 503
    gateway.assert_up()


def test_tgi_unresponsive_fails_within_connect_timeout_and_retries(gateway: Gateway) -> None:
    with socket.socket() as listener, socket.socket() as filler:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", gateway.tgi_port))
        listener.listen(0)  # a backlog of one, never accepted ...
        filler.connect(("127.0.0.1", gateway.tgi_port))  # ... and taken: every further SYN goes unanswered
        assert_quick_503(gateway, UNRESPONSIVE_BOUND, at_least=ATTEMPTS * CONNECT_TIMEOUT)
    gateway.assert_up()


def test_tgi_that_accepts_and_never_answers_is_a_504_within_the_read_timeout(gateway: Gateway) -> None:
    """A hung TGI (its port accepts, nothing answers, not even ``/info``): a 504 ``timeout`` once the read
    timeout passed (the /info read is bounded by the first-token and read timeouts), never a hang."""
    assert_quick_503(gateway, REFUSED_BOUND)  # TGI down first: the gateway forgets the /info it read
    accepted: list[socket.socket] = []
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", gateway.tgi_port))
        listener.listen(16)
        listener.settimeout(0.1)

        def accept_all(until: float) -> None:
            while time.monotonic() < until:
                with contextlib.suppress(TimeoutError):
                    accepted.append(listener.accept()[0])

        with ThreadPoolExecutor(1) as pool, gateway.sdk() as client:
            acceptor = pool.submit(accept_all, time.monotonic() + 2 * READ_TIMEOUT + 4 * SLACK)
            for stream_ in (False, True):
                start = time.monotonic()
                with pytest.raises(openai.APIStatusError) as e:
                    client.chat.completions.create(model=MODEL, messages=ASK, stream=stream_)
                elapsed = time.monotonic() - start
                assert READ_TIMEOUT <= elapsed < READ_TIMEOUT + SLACK, f"stream={stream_}: {elapsed:.3f} s"
                assert e.value.status_code == 504
                assert e.value.code == "timeout"
                error = e.value.response.json()["error"]
                assert error["message"] == f"TGI did not answer /info within {READ_TIMEOUT:g} s"
            acceptor.result()
    for conn in accepted:
        conn.close()
    assert accepted, "the gateway did reach the hung TGI"
    gateway.assert_up()


def test_tgi_back_on_the_same_port_is_served_without_restarting_the_gateway(gateway: Gateway) -> None:
    pid = gateway.proc.pid
    with FakeTGI(script=["It", " is", " sunny", ".", EOT], port=gateway.tgi_port), gateway.sdk() as client:
        for _ in range(2):  # leaves kept-alive connections in the gateway's pool to this TGI
            assert (
                client.chat.completions.create(model=MODEL, messages=ASK).choices[0].message.content
                == "It is sunny."
            )
    assert_quick_503(gateway, REFUSED_BOUND)
    with FakeTGI(script=["Back", ".", EOT], port=gateway.tgi_port) as tgi, gateway.sdk() as client:
        # The very first requests succeed: the pooled connections to the old TGI are not reused.
        assert client.chat.completions.create(model=MODEL, messages=ASK).choices[0].message.content == "Back."
        with client.chat.completions.stream(model=MODEL, messages=ASK) as s:
            assert s.get_final_completion().choices[0].message.content == "Back."
        assert httpx.get(gateway.url + "/health", timeout=5).status_code == 200
        assert [g.outcome for g in tgi.generations] == ["completed", "completed"]
        # TGI was found unreachable, so its limits were forgotten: the new TGI's /info is read first.
        assert [r.path for r in tgi.requests if r.path != "/health"] == ["/info", "/generate", "/generate_stream"]
    assert gateway.proc.pid == pid
    gateway.assert_up()


def answered(client: openai.OpenAI, stream: bool) -> str | None:
    if stream:
        with client.chat.completions.stream(model=MODEL, messages=ASK) as s:
            return s.get_final_completion().choices[0].message.content
    return client.chat.completions.create(model=MODEL, messages=ASK).choices[0].message.content


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_tgi_back_with_other_limits_is_served(gateway: Gateway, stream: bool) -> None:
    """TGI restarted with other launcher limits (here --max-stop-sequences 2): its 400 makes the gateway
    read /info again and send the request once more with the new limits."""
    route = "/generate_stream" if stream else "/generate"
    with gateway.sdk() as client, pytest.raises(openai.InternalServerError):
        answered(client, stream)  # TGI down: the gateway forgets its limits, whatever the tests before left
    with FakeTGI(script=["Hi", EOT], port=gateway.tgi_port), gateway.sdk() as client:
        assert answered(client, stream) == "Hi"  # the default limits read from /info
    with FakeTGI(script=["Hi", EOT], port=gateway.tgi_port, max_stop_sequences=2) as tgi, gateway.sdk() as client:
        assert answered(client, stream) == "Hi"
        # the refused request's connection was given back (or closed), not left open
        assert tgi.wait_until(lambda: tgi.streams_open == tgi.generate_open == 0, 5)
    sent = [(r.path, len(r.json["parameters"]["stop"]) if r.path == route else None)
            for r in tgi.requests]  # fmt: skip
    assert sent == [(route, 3), ("/info", None), (route, 2)]
    assert [g.outcome for g in tgi.generations] == ["validation", "completed"]


def test_a_validation_error_with_unchanged_limits_is_not_sent_again(gateway: Gateway) -> None:
    with FakeTGI(script=["Hi", EOT], port=gateway.tgi_port) as tgi, gateway.sdk() as client:
        # (a first refusal also brings the gateway's copy of /info up to date with this TGI, whatever the
        # tests before left in it)
        for _ in range(2):
            tgi.reset()
            # room for 6 tokens: more than one message's floor (5), fewer than TGI counts in the prompt
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8186)
    assert e.value.code == "context_length_exceeded"
    # /info is read again, found unchanged: TGI's 400 is reported, the request is not sent twice
    assert [r.path for r in tgi.requests] == ["/generate", "/info"]
