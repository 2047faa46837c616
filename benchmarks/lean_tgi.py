"""A lean TGI double for load benchmarks: TGI's wire format for a scripted answer, at a few µs per token.

Why a second double
-------------------
``tests/fakes/tgi.py`` (FakeTGI) is the protocol-faithful double: every validation rule, fault and
observation the tests need, on Starlette and uvicorn. That costs it 55-70 µs of CPU per streamed token,
about what the gateway itself costs, and on a 2-core machine that CPU is taken from the gateway being
measured. TGI's router is Rust on the GPU host; it takes none of the gateway's CPU. This double gives a
paced benchmark the same condition: it serves only what a load test sends, with the same bytes.

What it serves (HTTP/1.1 keep-alive, asyncio protocol + httptools, one event loop in a daemon thread)
-----------------------------------------------------------------------------------------------------
* ``GET /health`` (200, empty) and ``GET /info`` (FakeTGI's default ``TGIConfig`` values);
* ``POST /generate_stream``: the script's tokens as TGI's SSE events, chunked, ``token_delay`` seconds
  apart (the first one at once, like FakeTGI), the final event with
  ``generated_text`` and, if ``parameters.details``, ``details`` ``{finish_reason, generated_tokens,
  seed, input_length}``. Event bytes are built by FakeTGI's own encoder (``Token.as_dict``, compact JSON)
  so the two doubles send the same events (``tests/test_lean_double.py`` checks it);
* ``POST /generate``: the same answer after ``(n - 1) × token_delay``, as one JSON body with
  ``details.tokens`` when ``parameters.details``, and the ``x-prompt-tokens`` / ``x-generated-tokens``
  headers;
* each token is one ``loop.call_at`` callback and one write: no task, no coroutine per token.

Not modelled: validation (a body it cannot use is a 422), stop sequences (the script ends with its
EOS token), ``max_new_tokens`` below the script's length (``length``), overload, faults, keep-alive
comments. A client that closes its connection stops its generation at once (outcome ``cancelled``).
The command interface (``reset``, ``generations``, ``errors``, ``peak_in_flight``) is what
``benchmarks/_common.serve_commands`` and the benchmark scripts read.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fakes.tgi import TGIConfig, Token, _dumps, tokenize_input  # noqa: E402

_EOS_TEXTS = TGIConfig().eos_texts
_SAMPLING_KEYS = ("temperature", "top_k", "top_p", "typical_p")


@dataclass
class Generation:
    """What the benchmark scripts read of one generation (the names of FakeTGI's record)."""

    route: str  # "generate_stream" or "generate", as FakeTGI names them
    inputs: str
    parameters: dict[str, Any]
    tokens: list[Token] = field(default_factory=list)
    outcome: str = "running"

    @property
    def stream(self) -> bool:
        return self.route == "generate_stream"


@dataclass(frozen=True)
class _Answer:
    """One request's answer, everything but the final event pre-encoded."""

    tokens: list[Token]
    finish_reason: str
    text: str  # generated_text: the tokens that skip_special_tokens keeps


def _answer(script: list[Token], max_new_tokens: int | None) -> _Answer:
    toks, finish = list(script), "length"
    for i, tok in enumerate(toks, 1):
        if max_new_tokens is not None and i >= max_new_tokens:
            toks, finish = toks[:i], "length"
            break
        if tok.text in _EOS_TEXTS:
            toks, finish = toks[:i], "eos_token"
            break
    return _Answer(toks, finish, "".join(t.text for t in toks if not t.skipped))


def _sampling(p: dict[str, Any]) -> bool:
    t, k, top_p, typ = (p.get(key) for key in _SAMPLING_KEYS)
    return bool(
        p.get("do_sample") or (t is not None and t != 1) or k or (top_p is not None and top_p < 1)
        or (typ is not None and typ < 1)
    )  # fmt: skip


def _seed(p: dict[str, Any]) -> int | None:
    """The seed TGI echoes in details: only when sampling, the request's or a random u64."""
    if not _sampling(p):
        return None
    return p["seed"] if p.get("seed") is not None else random.getrandbits(64)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"x-compute-type: gpu+optimized\r\nx-compute-characters: %d\r\nx-accel-buffering: no\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


class LeanTGI:
    """``start()`` it, read ``url``; ``script`` (FakeTGI tokens) and ``config.token_delay`` (FakeTGI's
    ``TGIConfig``, of which only that and the ``/info`` fields are used) may change at any time."""

    def __init__(
        self, script: list[Token], *, token_delay: float = 0.0, model_id: str = TGIConfig.model_id
    ) -> None:
        self.script = script
        self.config = TGIConfig(model_id=model_id, token_delay=token_delay)
        self.url = ""
        self.generations: list[Generation] = []
        self.errors: list[str] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._encoded: dict[int, tuple[list[Token], list[bytes]]] = {}  # a script's token events, as chunks
        self._info = orjson.dumps(self._info_body())

    # ---------------------------------------------------------------- life cycle

    def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        ready = threading.Event()

        def run() -> None:
            import uvloop

            loop = self._loop = uvloop.new_event_loop()
            self._server = loop.run_until_complete(loop.create_server(lambda: _Connection(self), host, port))
            self.url = f"http://{host}:{self._server.sockets[0].getsockname()[1]}"
            ready.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="lean-tgi", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the lean TGI double did not start")

    def stop(self) -> None:
        loop, server = self._loop, self._server
        if loop is None or server is None:
            return
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5)

    def reset(self) -> None:
        self.generations = []
        self.errors = []
        self.peak_in_flight = self.in_flight

    # ---------------------------------------------------------------- answers

    def _info_body(self) -> dict[str, Any]:
        c = self.config
        return {
            "model_id": c.model_id, "model_sha": c.model_sha, "model_pipeline_tag": c.model_pipeline_tag,
            "max_concurrent_requests": c.max_concurrent_requests, "max_best_of": c.max_best_of,
            "max_stop_sequences": c.max_stop_sequences, "max_input_tokens": c.max_input_tokens,
            "max_total_tokens": c.max_total_tokens, "validation_workers": c.validation_workers,
            "max_client_batch_size": c.max_client_batch_size, "router": "text-generation-router",
            "version": c.version, "sha": c.sha, "docker_label": c.docker_label,
        }  # fmt: skip

    def _token_chunks(self, tokens: list[Token]) -> list[bytes]:
        """The non-final token events of `tokens` (index from 1), each framed as one HTTP chunk."""
        script, cached = self._encoded.get(id(tokens), (None, []))
        if script is not tokens:
            cached = [
                _chunk(
                    b"data: "
                    + _dumps({"index": i, "token": t.as_dict(), "generated_text": None, "details": None})
                    + b"\n\n"
                )  # fmt: skip
                for i, t in enumerate(tokens, 1)
            ]
            self._encoded[id(tokens)] = (tokens, cached)
        return cached

    def _final_event(self, answer: _Answer, p: dict[str, Any], input_length: int) -> bytes:
        n = len(answer.tokens)
        details = None
        if p.get("details"):
            details = {"finish_reason": answer.finish_reason, "generated_tokens": n, "seed": _seed(p),
                       "input_length": input_length}  # fmt: skip
        event = {
            "index": n,
            "token": answer.tokens[-1].as_dict(),
            "generated_text": answer.text,
            "details": details,
        }
        return _chunk(b"data: " + _dumps(event) + b"\n\n")

    def _generate_body(self, answer: _Answer, p: dict[str, Any]) -> bytes:
        body: dict[str, Any] = {"generated_text": answer.text}
        if p.get("details"):
            body["details"] = {
                "finish_reason": answer.finish_reason, "generated_tokens": len(answer.tokens), "seed": _seed(p),
                "prefill": [], "tokens": [t.as_dict() for t in answer.tokens],
            }  # fmt: skip
        return _dumps(body)


class _Connection(asyncio.Protocol):
    """One client connection: requests one at a time (no pipelining)."""

    def __init__(self, tgi: LeanTGI) -> None:
        self.tgi = tgi
        self.loop = tgi._loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []
        self.timer: asyncio.TimerHandle | None = None
        self.gen: Generation | None = None
        self.paused = False
        self.resume: Callable[[], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._reply(400, b"text/plain", b"bad request", close=True)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self._end("cancelled")

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.resume is not None:
            resume, self.resume = self.resume, None
            resume()

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        method, url, body = self.parser.get_method(), self.url, b"".join(self.body)
        self.url, self.body = b"", []
        try:
            self._dispatch(method, url.partition(b"?")[0], body)
        except Exception as exc:  # noqa: BLE001 - a bug in the double: visible in its stats
            self.tgi.errors.append(repr(exc))
            self._reply(500, b"text/plain", repr(exc).encode(), close=True)

    # ---------------------------------------------------------------- routes

    def _dispatch(self, method: bytes, path: bytes, body: bytes) -> None:
        tgi = self.tgi
        if method == b"GET" and path in (b"/health", b"/ping", b"/"):
            self._reply(200, b"application/json", b"")
        elif method == b"GET" and path == b"/info":
            self._reply(200, b"application/json", tgi._info)
        elif method == b"POST" and path in (b"/generate_stream", b"/generate"):
            try:
                obj = orjson.loads(body)
                inputs, p = obj["inputs"], obj.get("parameters") or {}
                if not isinstance(inputs, str) or not isinstance(p, dict):
                    raise TypeError
            except (orjson.JSONDecodeError, KeyError, TypeError):
                self._reply(422, b"text/plain", b"Failed to deserialize the JSON body")
                return
            script = tgi.script
            answer = _answer(script, p.get("max_new_tokens"))
            gen = self.gen = Generation(path.decode().lstrip("/"), inputs, p)
            tgi.generations.append(gen)
            tgi.in_flight += 1
            tgi.peak_in_flight = max(tgi.peak_in_flight, tgi.in_flight)
            input_length = len(tokenize_input(inputs, tgi.config.bos_token))
            if path == b"/generate":
                self.timer = self.loop.call_later(
                    tgi.config.token_delay * (len(answer.tokens) - 1), self._generated, answer, p, input_length
                )
            else:
                self.transport.write(_STREAM_HEAD % len(inputs))  # type: ignore[union-attr]
                chunks = tgi._token_chunks(script)[: len(answer.tokens) - 1]
                chunks.append(tgi._final_event(answer, p, input_length))
                self._stream(answer, chunks, 0, self.loop.time())
        else:
            self._reply(404, b"text/plain", b"")

    def _stream(self, answer: _Answer, chunks: list[bytes], i: int, start: float) -> None:
        """Write token `i` (0-based; due at `start + i × delay`, as FakeTGI paces them) and schedule the next."""
        self.timer = None
        if self.paused:  # the client does not read: wait for it (TGI's stream would back up too)
            self.resume = lambda: self._stream(answer, chunks, i, start)
            return
        self.transport.write(chunks[i])  # type: ignore[union-attr]
        self.gen.tokens.append(answer.tokens[i])  # type: ignore[union-attr]
        if i + 1 == len(chunks):
            self.transport.write(b"0\r\n\r\n")  # type: ignore[union-attr]
            self._end("completed")
            return
        delay = self.tgi.config.token_delay
        if delay > 0:
            self.timer = self.loop.call_at(
                start + (i + 1) * delay, self._stream, answer, chunks, i + 1, start
            )
        else:
            self.timer = self.loop.call_soon(self._stream, answer, chunks, i + 1, start)  # type: ignore[assignment]

    def _generated(self, answer: _Answer, p: dict[str, Any], input_length: int) -> None:
        self.timer = None
        self.gen.tokens.extend(answer.tokens)  # type: ignore[union-attr]
        n = len(answer.tokens)
        self._reply(200, b"application/json", self.tgi._generate_body(answer, p),
                    extra=b"x-prompt-tokens: %d\r\nx-generated-tokens: %d\r\n" % (input_length, n))  # fmt: skip
        self._end("completed")

    # ---------------------------------------------------------------- plumbing

    def _end(self, outcome: str) -> None:
        gen, self.gen = self.gen, None
        if gen is not None and gen.outcome == "running":
            gen.outcome = outcome
            self.tgi.in_flight -= 1

    def _reply(
        self, status: int, content_type: bytes, body: bytes, *, extra: bytes = b"", close: bool = False
    ) -> None:
        reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 422: b"Unprocessable Entity"}.get(
            status, b""
        )
        head = b"HTTP/1.1 %d %b\r\ncontent-type: %b\r\ncontent-length: %d\r\n%b" % (
            status, reason, content_type, len(body), extra,
        )  # fmt: skip
        if close or not self.parser.should_keep_alive():
            self.transport.write(head + b"connection: close\r\n\r\n" + body)  # type: ignore[union-attr]
            self.transport.close()  # type: ignore[union-attr]
        else:
            self.transport.write(head + b"\r\n" + body)  # type: ignore[union-attr]


if __name__ == "__main__":  # a quick look: python benchmarks/lean_tgi.py, then curl it
    from tests.fakes.tgi import tokens

    tgi = LeanTGI(tokens("Hel", "lo", "<|eot_id|>"), token_delay=0.02)
    tgi.start()
    print(json.dumps({"url": tgi.url}), flush=True)
    threading.Event().wait()
