"""Gateway vs direct streaming: what the gateway costs a client in throughput and time-to-first-token.

Three processes share the machine:

* the TGI double (``tests/fakes/tgi.py``, TGI's real ``/generate_stream`` protocol on a real socket), in
  its own process (this script with ``--serve-double``; it is driven over its stdin/stdout: set the
  answer and the per-token delay, reset and read its records between runs; it exits when stdin closes);
* the gateway, started with the real CLI: ``server_tgi.py --model bench-model --template-version
  v3-llama3.1 --endpoint <double> --port <free port>`` (ready once its ``/health`` answers 200);
* the load generator, this process (uvloop; a minimal HTTP/1.1 + SSE client on asyncio streams by
  default, ``RawClient``, shared with the other scripts in ``benchmarks/_common.py`` like the two
  processes above; ``--client httpx`` for httpx; ``--compare-clients`` measures what each costs).

For every configuration (streams x per-token delay x answer) it runs N concurrent streaming requests
at once, alternately

* **direct**: ``POST /generate_stream`` to the double with exactly the ``inputs``/``parameters`` the
  gateway sent it (read back from the double's record of a gateway request); tokens = SSE token events;
* **gateway**: ``POST /v1/chat/completions`` with ``stream: true`` and ``stream_options.include_usage``;
  tokens = the usage chunk's ``completion_tokens`` (checked against the double's record), with the
  content / tool-call ``arguments`` chunks counted as well;
* **responses** (``--apis chat responses``): ``POST /v1/responses`` with ``stream: true``, the same
  conversation (``instructions`` + the user's message, the same tool in the Responses shape: TGI gets the
  same prompt); tokens = ``response.completed``'s ``usage.output_tokens``, with the ``output_text.delta`` /
  ``function_call_arguments.delta`` events counted as well.

Per request: TTFT (request written -> first event a client can show: the first token event for
direct, the first chunk with ``content`` or ``tool_calls`` for the gateway; for the tool-call answer
the direct TTFT is timed to the token that completes ``<function=get_weather>``, the first token the
gateway *can* show, so that "added" is the gateway's overhead and not the parser's necessary wait),
total time, tokens. Per run: tokens/s = all tokens / wall time of the run; TTFT p50/p99. One warm-up
run of each mode per configuration, then ``--repeats`` runs of each (alternating), medians reported.
Every process's CPU time per run is read from /proc.

By default the N requests of a run start at once (a burst: TTFT then includes admitting N requests
together). ``--ramp-ms T --rounds K`` gives a steady state instead: N streams whose starts are spread
evenly over T ms, each sending K requests back to back (with T = one answer's duration, e.g. 2560 ms
for 128 tokens at 20 ms, N requests are in flight at any time, each arriving alone); TTFT then counts
the requests started while all N streams were active, tokens/s still the whole run.

The machine is shared: ``--wait-idle S`` waits (up to S s) before each run until other processes leave
the CPUs idle, and every run reports how busy other processes kept the cores.

Run from the repository root (the first command, the one behind docs/performance.md, takes about 8
minutes; every run is bounded by ``--max-seconds``)::

    .venv/bin/python benchmarks/bench_gateway.py --repeats 5 --wait-idle 20 --compare-clients --profile 12
    .venv/bin/python benchmarks/bench_gateway.py --streams 1 64 256 --delays-ms 20 0 --tokens 128 --repeats 3
    .venv/bin/python benchmarks/bench_gateway.py --streams 64 128 256 --delays-ms 20 --ramp-ms 2560 --rounds 3
    .venv/bin/python benchmarks/bench_gateway.py --direct-only --streams 64 --repeats 1      # no gateway needed
    .venv/bin/python benchmarks/bench_gateway.py --apis chat responses --streams 64 256 --delays-ms 20 --repeats 3

``--profile S`` (py-spy, ``.venv/bin/pip install py-spy``) samples the gateway for S seconds while it
serves the largest stream count at the first delay, and prints the top frames.

Results: docs/performance.md, "Gateway vs direct streaming".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from _common import (
    GATEWAY_ARGS,
    MODEL,
    ROOT,
    DoubleProcess,
    GatewayProcess,
    RawClient,
    pct,
    serve_commands,
)

TEMPLATE = GATEWAY_ARGS[-1]


# --------------------------------------------------------------------------------------------
# The answers the double streams (both exactly --tokens tokens long, stop token included)
# --------------------------------------------------------------------------------------------

# Llama-3's pre-tokenizer, approximately; pieces are capped at 8 characters so that a token averages
# ~4 characters, as with a real BPE vocabulary.
PRETOKEN = re.compile(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|(?:[^\r\n\w]|_)?[^\W\d_]+|\d{1,3}| ?(?:[^\s\w]|_)+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
PROSE = (
    "The weather in Paris today is mild, with a light westerly wind and scattered clouds in the "
    "morning. Temperatures should reach 18 degrees Celsius in the early afternoon before falling to "
    "about 11 degrees at night. There is a 30 percent chance of light rain after 6 pm, so an umbrella "
    "might be useful if you plan to be outside in the evening. Humidity stays near 70 percent and "
    "visibility is good. Tomorrow looks similar, slightly warmer, with sunshine expected for most of "
    "the day and a gentle breeze from the south-west. The weekend should stay dry."
)
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather and forecast for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "City and country"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "notes": {"type": "string", "description": "What the user wants to know"},
            },
            "required": ["location"],
        },
    },
}
HEADER = "<function=get_weather>"


def pieces(text: str) -> list[str]:
    out: list[str] = []
    for m in PRETOKEN.finditer(text):
        s = m.group(0)
        out.extend(s[i : i + 8] for i in range(0, len(s), 8))
    return out


def answer_pieces(kind: str, n_tokens: int) -> tuple[list[str], int]:
    """(token texts, 1-based index of the first token a client can be shown)."""
    prose = pieces(PROSE)
    while len(prose) < n_tokens:
        prose += pieces(" " + PROSE)
    if kind == "text":
        out = prose[: n_tokens - 1] + ["<|eot_id|>"]
        return out, 1
    head = ["<", "function", "=get", "_weather", ">"] + pieces(
        '{"location": "Paris, France", "unit": "celsius", "notes": "'
    )
    tail = pieces('"}') + ["</", "function", ">", "<|eom_id|>"]
    fill = n_tokens - len(head) - len(tail)
    if fill < 1:
        raise SystemExit(f"--tokens must be at least {len(head) + len(tail) + 1} for the tool-call answer")
    out = head + [p.replace('"', "'") for p in prose[:fill]] + tail
    text = ""
    for i, p in enumerate(out, 1):
        text += p
        if HEADER in text:
            return out, i
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------
# The double's process (--serve-double)
# --------------------------------------------------------------------------------------------


def serve_double(args: argparse.Namespace) -> int:
    """Run the TGI double; one JSON command per stdin line, one JSON answer per stdout line."""
    sys.path.insert(0, str(ROOT))
    if args.double_loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    from tests.fakes.tgi import FakeTGI, tokens

    scripts = {kind: tokens(*answer_pieces(kind, args.tokens)[0]) for kind in args.answers}
    tgi = FakeTGI(
        script=scripts[args.answers[0]],
        max_concurrent_requests=100_000,  # TGI's overload (429) never triggers
        model_id="meetkai/functionary-small-v3.1",
    )

    def set_answer(cmd: dict) -> Any:
        if "answer" in cmd:
            tgi.script = scripts[cmd["answer"]]
        if "token_delay" in cmd:
            tgi.config.token_delay = float(cmd["token_delay"])
        return {"ok": True}

    def stats(cmd: dict) -> Any:
        every = tgi.generations
        gens = [g for g in every if g.stream]
        last = every[-1] if every else None  # a stream's, or a non-stream request's (bench_nonstream.py)
        return {
            "generations": len(gens),
            "tokens": sum(len(g.tokens) for g in gens),
            "outcomes": dict(Counter(g.outcome for g in gens)),
            "errors": [str(e) for e in tgi.errors][:5],
            "peak_in_flight": tgi.peak_in_flight,
            "last": last and {"route": last.route, "inputs": last.inputs, "parameters": last.parameters},
        }

    return serve_commands(tgi, {"set": set_answer, "stats": stats})


class Double(DoubleProcess):
    """This script's double in its child process (``--serve-double``): the answers of ``tokens`` tokens."""

    def __init__(self, tokens: int, loop: str, answers: list[str]) -> None:
        super().__init__([str(Path(__file__).resolve()), "--serve-double", "--tokens", str(tokens),
                          "--double-loop", loop, "--answers", *answers])  # fmt: skip


# --------------------------------------------------------------------------------------------
# CPU accounting
# --------------------------------------------------------------------------------------------


def cpu_seconds(pid: int, kernel_only: bool = False) -> float:
    """utime + stime (or stime alone) of a process, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[12]) + (0 if kernel_only else int(fields[11]))
        return ticks / os.sysconf("SC_CLK_TCK")
    except OSError:
        return float("nan")


def pin(pid: int, cpus: set[int]) -> None:
    """Run every thread of process `pid` (and the threads they start later) on `cpus` only."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)


def system_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------
# The load generator's clients
# --------------------------------------------------------------------------------------------


@dataclass
class Result:
    ttft: float = math.nan  # seconds, request written -> first showable event
    total: float = math.nan
    tokens: int = 0  # generated tokens (direct: token events; gateway: usage.completion_tokens)
    events: int = 0  # direct: token events; gateway: content + arguments chunks
    error: str | None = None
    start: float = math.nan  # when the request was written, from the start of the run
    steady: bool = True  # counted in the run's TTFT percentiles


class Counting:
    """Consumes one response's SSE events (bytes between blank lines) and fills a Result."""

    def __init__(self, mode: str, first_visible: int, t0: float) -> None:
        self.mode = mode
        self.first_visible = first_visible
        self.t0 = t0
        self.r = Result()
        self.done = False

    def event(self, ev: bytes, now: float) -> None:
        if self.mode == "responses":
            self.responses_event(ev, now)
            return
        if not ev.startswith(b"data:"):
            return  # keep-alive comment
        data = ev[5:].strip()
        if self.mode == "direct":
            obj = orjson.loads(data)
            if "token" not in obj:
                self.r.error = str(obj.get("error"))
                self.done = True
                return
            self.r.events += 1
            self.r.tokens += 1
            if self.r.events == self.first_visible:
                self.r.ttft = now - self.t0
            if obj.get("generated_text") is not None:
                self.done = True
            return
        if data == b"[DONE]":
            self.done = True
            return
        obj = orjson.loads(data)
        if "error" in obj:
            self.r.error = str(obj["error"])
            return
        if obj.get("usage"):
            self.r.tokens = obj["usage"]["completion_tokens"]
        for choice in obj.get("choices") or ():
            delta = choice.get("delta") or {}
            shown = False
            if delta.get("content"):
                self.r.events += 1
                shown = True
            for call in delta.get("tool_calls") or ():
                shown = True
                if (call.get("function") or {}).get("arguments"):
                    self.r.events += 1
            if shown and math.isnan(self.r.ttft):  # the first showable chunk
                self.r.ttft = now - self.t0


    def responses_event(self, ev: bytes, now: float) -> None:
        """One Responses API event: ``event: <type>`` then ``data: <json>``."""
        i = ev.find(b"data:")
        if i < 0:
            return
        obj = orjson.loads(ev[i + 5 :])
        kind = obj.get("type")
        if kind in ("response.output_text.delta", "response.function_call_arguments.delta"):
            self.r.events += 1
            if math.isnan(self.r.ttft):
                self.r.ttft = now - self.t0
        elif kind == "response.completed":
            self.r.tokens = obj["response"]["usage"]["output_tokens"]
            self.done = True
        elif kind in ("response.failed", "response.incomplete", "error"):
            self.r.error = str(obj)
            self.done = True


class RawCounting(RawClient):
    """The raw client (benchmarks/_common.py) with the interface of the runs: one streamed request → Result."""

    async def stream(self, path: str, body: bytes, counting: Counting) -> Result:
        ex = await self.exchange(path, body, counting)
        if not ex.chunked:
            counting.r.error = f"HTTP {ex.status}: {ex.body[:200]!r}"
            return counting.r
        counting.r.total = time.perf_counter() - counting.t0
        if ex.status != 200:
            counting.r.error = f"HTTP {ex.status}"
        return counting.r


class HttpxClient:
    """The same, on httpx (one pooled AsyncClient, limits above the stream count)."""

    def __init__(self, url: str, max_streams: int) -> None:
        import httpx

        self.url = url
        self.client = httpx.AsyncClient(
            base_url=url,
            timeout=httpx.Timeout(60.0),
            limits=httpx.Limits(max_connections=max_streams + 16, max_keepalive_connections=max_streams + 16),
            trust_env=False,
        )

    async def stream(self, path: str, body: bytes, counting: Counting) -> Result:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        counting.t0 = time.perf_counter()
        async with self.client.stream("POST", path, content=body, headers=headers) as response:
            buf = b""
            async for data in response.aiter_raw():
                now = time.perf_counter()
                buf += data
                while True:
                    i = buf.find(b"\n\n")
                    if i < 0:
                        break
                    counting.event(buf[:i], now)
                    buf = buf[i + 2 :]
            if response.status_code != 200:
                counting.r.error = f"HTTP {response.status_code}: {buf[:200]!r}"
        counting.r.total = time.perf_counter() - counting.t0
        return counting.r

    async def aclose(self) -> None:
        await self.client.aclose()


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    mode: str
    streams: int
    wall: float
    results: list[Result]
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds during the run
    double_tokens: int = 0
    kernel: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds in the kernel

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.results)

    @property
    def tps(self) -> float:
        return self.tokens / self.wall

    def ttft(self, q: float) -> float:
        return pct([r.ttft for r in self.results if r.steady], q) * 1000


async def wait_idle(limit: float, pids: dict[str, int], threshold: float = 0.15) -> float:
    """Wait (at most `limit` s) until processes other than ours keep under `threshold` cores busy for
    0.5 s: the machine is shared, and another session's test run would take CPU from the benchmark."""
    deadline = time.monotonic() + limit
    while True:
        busy0, ours0, t0 = system_busy_seconds(), sum(cpu_seconds(p) for p in pids.values()), time.monotonic()
        await asyncio.sleep(0.5)
        dt = time.monotonic() - t0
        other = (system_busy_seconds() - busy0 - (sum(cpu_seconds(p) for p in pids.values()) - ours0)) / dt
        if other < threshold or time.monotonic() > deadline:
            return other


class Bench:
    def __init__(self, args: argparse.Namespace, double: Double, gateway: GatewayProcess | None) -> None:
        self.args = args
        self.double = double
        self.gateway = gateway
        self.request_timeout = 30.0
        self.direct_body = b""
        self.gateway_body = orjson.dumps(
            {
                "model": MODEL,
                "messages": [
                    {"role": "system", "content": "You are a helpful assistant. Answer with care."},
                    {"role": "user", "content": "What is the weather like in Paris today, and tomorrow?"},
                ],
                "tools": [TOOL],
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
        self.responses_body = orjson.dumps(
            {
                "model": MODEL,
                "instructions": "You are a helpful assistant. Answer with care.",
                "input": "What is the weather like in Paris today, and tomorrow?",
                "tools": [{"type": "function", **TOOL["function"]}],
                "stream": True,
            }
        )
        self.clients: dict[str, Any] = {}
        self.pids = {"double": double.pid, "load generator": os.getpid()}
        if gateway is not None:
            self.pids["gateway"] = gateway.pid

    def client(self, mode: str, kind: str | None = None) -> Any:
        kind = kind or self.args.client
        key = f"{mode}/{kind}"
        if key not in self.clients:
            url = self.double.url if mode == "direct" else self.gateway.url  # type: ignore[union-attr]
            key = f"{'direct' if mode == 'direct' else 'gateway'}/{kind}"  # one pool for both APIs
            if key in self.clients:
                self.clients[f"{mode}/{kind}"] = self.clients[key]
                return self.clients[key]
            self.clients[key] = (
                RawCounting(url) if kind == "raw" else HttpxClient(url, max(self.args.streams))
            )
        return self.clients[key]

    async def learn_direct_request(self) -> None:
        """The exact inputs/parameters the gateway sends TGI, read back from the double's record."""
        if self.gateway is not None:
            self.double.call("reset")
            r = await self.client("gateway").stream(
                "/v1/chat/completions", self.gateway_body, Counting("gateway", 1, 0)
            )
            if r.error:
                raise RuntimeError(f"gateway request failed: {r.error}")
            last = self.double.call("stats")["last"]
            inputs, parameters = last["inputs"], last["parameters"]
        else:  # --direct-only: a hand-made prompt of the same shape (v3-llama3.1, one tool)
            inputs = (
                "<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n\nYou have access to the "
                "following functions:\n\nUse the function 'get_weather' to 'Current weather and forecast for a "
                "city'\n"
                + json.dumps(TOOL["function"])
                + "\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>"
                "\n\nWhat is the weather like in Paris today, and tomorrow?<|eot_id|><|start_header_id|>assistant"
                "<|end_header_id|>\n\n"
            )
            parameters = {"details": True, "do_sample": True, "stop": ["<|eot_id|>", "<|eom_id|>"]}
        self.direct_body = json.dumps(
            {"inputs": inputs, "parameters": parameters}, ensure_ascii=False, separators=(",", ":")
        ).encode()
        self.direct_params = parameters

    async def run(self, mode: str, streams: int, first_visible: int, client: str | None = None) -> Run:
        c = self.client(mode, client)
        path, body = {
            "direct": ("/generate_stream", self.direct_body),
            "gateway": ("/v1/chat/completions", self.gateway_body),
            "responses": ("/v1/responses", self.responses_body),
        }[mode]
        self.double.call("reset")
        if self.args.wait_idle > 0:
            await wait_idle(self.args.wait_idle, self.pids)
        cpu0 = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        busy0 = system_busy_seconds()
        kernel0 = {name: cpu_seconds(pid, kernel_only=True) for name, pid in self.pids.items()}

        ramp, rounds = self.args.ramp_ms / 1000, self.args.rounds

        async def one() -> Result:
            counting = Counting(mode, first_visible if mode == "direct" else 0, 0.0)
            try:
                await asyncio.wait_for(c.stream(path, body, counting), self.request_timeout)
            except Exception as exc:  # noqa: BLE001 - counted as a failed request
                counting.r.error = f"{type(exc).__name__}: {exc}"
            counting.r.start = counting.t0 - t0
            return counting.r

        async def worker(i: int) -> list[Result]:
            if ramp:
                await asyncio.sleep(i * ramp / streams)
            return [await one() for _ in range(rounds)]

        t0 = time.perf_counter()
        per_worker = await asyncio.gather(*(worker(i) for i in range(streams)))
        wall = time.perf_counter() - t0
        results = [r for rs in per_worker for r in rs]
        if rounds > 1:  # TTFT only of the requests started while every worker was active
            all_started = max(rs[0].start for rs in per_worker)
            first_done = min(rs[-1].start + rs[-1].total for rs in per_worker)
            for r in results:
                r.steady = all_started <= r.start <= first_done
        cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in self.pids.items()}
        cpu["other"] = max(0.0, system_busy_seconds() - busy0 - sum(cpu.values()))  # not ours
        kernel = {name: cpu_seconds(pid, kernel_only=True) - kernel0[name] for name, pid in self.pids.items()}
        stats = self.double.call("stats")
        errors = [r.error for r in results if r.error]
        if errors or stats["outcomes"] != {"completed": streams * rounds}:
            raise RuntimeError(
                f"{mode} run with {streams} streams failed: {len(errors)} errors {errors[:3]}, "
                f"double outcomes {stats['outcomes']} {stats['errors']}"
            )
        run = Run(mode, streams, wall, list(results), cpu, stats["tokens"], kernel)
        if run.tokens != stats["tokens"]:
            raise RuntimeError(
                f"{mode}: the client counted {run.tokens} tokens, the double sent {stats['tokens']}"
            )
        return run


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    answer: str
    streams: int
    delay_ms: float
    runs: dict[str, list[Run]]

    def med(self, mode: str, f: Any) -> float:
        runs = self.runs.get(mode) or []
        return statistics.median(f(r) for r in runs) if runs else float("nan")


def f1(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:,.1f}"


def f0(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:,.0f}"


def table(rows: list[Row], mode: str = "gateway") -> str:
    """`mode` (the chat route, "gateway", or "responses") against direct."""
    out = [
        (
            f"| streams | delay | answer | direct tok/s | {mode} tok/s | ratio | direct TTFT p50 / p99 (ms) "
            f"| {mode} TTFT p50 / p99 (ms) | added TTFT p50 / p99 (ms) |"
        ),
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        d_tps, g_tps = row.med("direct", lambda r: r.tps), row.med(mode, lambda r: r.tps)
        d50, d99 = row.med("direct", lambda r: r.ttft(50)), row.med("direct", lambda r: r.ttft(99))
        g50, g99 = row.med(mode, lambda r: r.ttft(50)), row.med(mode, lambda r: r.ttft(99))
        ratio = "–" if math.isnan(g_tps) else f"{g_tps / d_tps:.3f}"
        out.append(
            f"| {row.streams} | {row.delay_ms:g} ms | {row.answer} | {f0(d_tps)} | {f0(g_tps)} | {ratio} "
            f"| {f1(d50)} / {f1(d99)} | {f1(g50)} / {f1(g99)} | {f1(g50 - d50)} / {f1(g99 - d99)} |"
        )
    return "\n".join(out)


def cpu_table(rows: list[Row]) -> str:
    """CPU microseconds per generated token (and the kernel's share of it), per process and mode, and
    cores busy (median over repeats)."""
    out = [
        (
            "| streams | delay | answer | mode | wall (s) | double | gateway | load generator "
            "| cores busy: ours | cores busy: other processes |"
        ),
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        for mode in ("direct", "gateway", "responses"):
            if not row.runs.get(mode):
                continue

            def per_k(name: str, mode: str = mode, row: Row = row) -> str:
                v = row.med(mode, lambda r: r.cpu.get(name, math.nan) / r.tokens)
                k = row.med(mode, lambda r: r.kernel.get(name, math.nan) / max(r.cpu.get(name, 0), 1e-9))
                return "–" if math.isnan(v) else f"{v * 1e6:.0f} µs ({k:.0%} kernel)"

            wall = row.med(mode, lambda r: r.wall)
            if wall < 0.25:  # /proc's CPU times tick every 10 ms: too coarse for such a short run
                out.append(
                    f"| {row.streams} | {row.delay_ms:g} ms | {row.answer} | {mode} | {wall:.2f} | – | – | – | – | – |"
                )
                continue
            ours = row.med(
                mode,
                lambda r: sum(v for k, v in r.cpu.items() if k != "other" and not math.isnan(v)) / r.wall,
            )
            other = row.med(mode, lambda r: r.cpu["other"] / r.wall)
            out.append(
                f"| {row.streams} | {row.delay_ms:g} ms | {row.answer} | {mode} | {wall:.2f} | {per_k('double')} | "
                f"{per_k('gateway') if mode != 'direct' else '(idle)'} | {per_k('load generator')} | {ours:.2f} "
                f"| {other:.2f} |"
            )
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Profiling (py-spy on the gateway process)
# --------------------------------------------------------------------------------------------


def summarize_profile(raw: Path, top: int = 25) -> str:
    """Self and inclusive sample counts per function from py-spy's collapsed stacks."""
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = [re.sub(r" \((.*?):\d+\)$", r" (\1)", f) for f in stack.split(";")]
        frames = [
            re.sub(r"\S*/site-packages/|\S*/lib/python3\.\d+/|" + re.escape(str(ROOT)) + "/", "", f)
            for f in frames
        ]
        if frames:
            self_c[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    lines = [f"{total} samples (active only)", "", "top self:"]
    lines += [f"  {c / total:6.1%}  {f}" for f, c in self_c.most_common(top)]
    lines += ["", "top inclusive:"]
    lines += [f"  {c / total:6.1%}  {f}" for f, c in incl.most_common(top)]
    return "\n".join(lines)


async def profile_gateway(bench: Bench, streams: int, first_visible: int, seconds: float) -> str:
    pyspy = Path(sys.executable).with_name("py-spy")
    if not pyspy.exists():
        return "py-spy is not installed in the venv (.venv/bin/pip install py-spy)"
    out = Path(tempfile.mkdtemp(prefix="bench-pyspy-")) / "gateway.txt"
    cmd = [str(pyspy), "record", "-p", str(bench.gateway.pid), "-d", str(int(seconds)), "-r", "200",  # type: ignore[union-attr]
           "-f", "raw", "-o", str(out), "--nonblocking"]  # fmt: skip
    spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # noqa: ASYNC220
    await asyncio.sleep(1.0)
    deadline = time.monotonic() + seconds - 1.0
    runs = []
    while time.monotonic() < deadline - 3.0 and spy.poll() is None:
        runs.append(await bench.run("gateway", streams, first_visible))
    try:
        _, err = spy.communicate(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        spy.kill()
        _, err = spy.communicate()
    if not out.exists():
        return f"py-spy failed: {err.strip()[-500:]}"
    tps = statistics.median(r.tps for r in runs) if runs else float("nan")
    summary = summarize_profile(out)
    if int(summary.split(" ", 1)[0]) < 100:  # py-spy could not read the stacks: say why
        summary += "\n\npy-spy's messages:\n" + err.strip()[-1500:]
    return f"{len(runs)} gateway runs while profiling ({tps:,.0f} tok/s)\n" + summary


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


async def bench_main(args: argparse.Namespace, double: Double, gateway: GatewayProcess | None) -> int:
    bench = Bench(args, double, gateway)
    started = time.monotonic()
    await bench.learn_direct_request()
    apis = {"chat": "gateway", "responses": "responses"}
    modes = ["direct"] if gateway is None else ["direct", *(apis[a] for a in args.apis)]
    print(
        f"# direct request: {len(bench.direct_body)} bytes, parameters {json.dumps(bench.direct_params)}",
        flush=True,
    )

    if args.compare_clients:
        print("\n## load generator clients (direct mode, one run each after a warm-up)\n", flush=True)
        print(
            "| client | streams | delay | tok/s | TTFT p50 / p99 (ms) | load generator CPU / token "
            "| double CPU / token | other processes (cores) |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for delay in args.delays_ms:
            double.call("set", answer=args.answers[0], token_delay=delay / 1000)
            for kind in ("raw", "httpx"):
                await bench.run(
                    "direct", max(args.streams), answer_pieces(args.answers[0], args.tokens)[1], client=kind
                )
                r = await bench.run(
                    "direct", max(args.streams), answer_pieces(args.answers[0], args.tokens)[1], client=kind
                )
                cpu = r.cpu["load generator"] / r.tokens * 1e6
                dbl = r.cpu["double"] / r.tokens * 1e6
                print(f"| {kind} | {r.streams} | {delay:g} ms | {r.tps:,.0f} | {r.ttft(50):.1f} / {r.ttft(99):.1f} "
                      f"| {cpu:.0f} µs | {dbl:.0f} µs | {r.cpu['other'] / r.wall:.2f} |", flush=True)  # fmt: skip

    rows: list[Row] = []
    for delay in args.delays_ms:
        for streams in args.streams:
            for answer in args.answers:
                if time.monotonic() - started > args.max_seconds:
                    print(f"# --max-seconds {args.max_seconds} reached: stopping early", flush=True)
                    break
                first_visible = answer_pieces(answer, args.tokens)[1]
                double.call("set", answer=answer, token_delay=delay / 1000)
                row = Row(answer, streams, delay, {m: [] for m in modes})
                for mode in modes:  # warm-up
                    await bench.run(mode, streams, first_visible)
                for _ in range(args.repeats):
                    for mode in modes:
                        row.runs[mode].append(await bench.run(mode, streams, first_visible))
                rows.append(row)
                d = row.runs["direct"]
                g = row.runs.get("gateway") or row.runs.get("responses") or []
                print(
                    f"# {streams:>3} streams {delay:>4g} ms {answer:<4}: direct "
                    + " ".join(f"{r.tps:,.0f}" for r in d) + " tok/s"
                    + "".join(f"; {m} " + " ".join(f"{r.tps:,.0f}" for r in row.runs[m]) + " tok/s"
                              for m in modes[1:])
                    + f"; other processes {statistics.median(r.cpu['other'] / r.wall for r in d + g):.2f} cores"
                    + (f"; gateway chunks/answer {statistics.median(r.events for r in g[-1].results):.0f}" if g else ""),
                    flush=True,
                )  # fmt: skip

    for mode in modes[1:]:
        print(f"\n## {mode} vs direct (median of {args.repeats} runs each)\n")
        print(table(rows, mode))
    print("\n## CPU time per generated token, and cores busy during the run (median of runs)\n")
    print(cpu_table(rows))

    if args.profile and gateway is not None:
        streams, delay = max(args.streams), args.delays_ms[0]
        answer = args.answers[0]
        double.call("set", answer=answer, token_delay=delay / 1000)
        print(
            f"\n## py-spy on the gateway: {streams} streams, {delay:g} ms/token, {answer} answer, {args.profile:g} s\n"
        )
        print("```")
        print(await profile_gateway(bench, streams, answer_pieces(answer, args.tokens)[1], args.profile))
        print("```")
    for c in bench.clients.values():
        await c.aclose()
    return 0


async def guarded(args: argparse.Namespace, double: Double, gateway: GatewayProcess | None) -> int:
    """bench_main, bounded in time; Ctrl-C / SIGTERM cancel it cleanly (the caller then stops the children)."""
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    return await asyncio.wait_for(bench_main(args, double, gateway), args.max_seconds + 600)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--streams", type=int, nargs="+", default=[1, 64, 256], help="concurrent streams (default 1 64 256)"
    )
    p.add_argument(
        "--delays-ms", type=float, nargs="+", default=[20.0, 0.0], help="per-token delays (default 20 0)"
    )
    p.add_argument(
        "--tokens", type=int, default=128, help="tokens per answer, stop token included (default 128)"
    )
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration and mode (default 3)")
    p.add_argument("--answers", nargs="+", choices=["text", "tool"], default=["text", "tool"])
    p.add_argument(
        "--apis",
        nargs="+",
        choices=["chat", "responses"],
        default=["chat"],
        help="the gateway routes to measure: chat (/v1/chat/completions, mode 'gateway'), responses "
        "(/v1/responses); default chat",
    )
    p.add_argument(
        "--ramp-ms", type=float, default=0, help="spread the N starts over this long (default 0: all at once)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="requests per stream, back to back (default 1); with more, TTFT counts only the requests "
        "started while all N streams were active",
    )
    p.add_argument("--client", choices=["raw", "httpx"], default="raw", help="load generator's HTTP client")
    p.add_argument("--compare-clients", action="store_true", help="first measure raw vs httpx in direct mode")
    p.add_argument("--direct-only", action="store_true", help="no gateway: only the direct runs (dry run)")
    p.add_argument(
        "--profile", type=float, default=0, metavar="SECONDS", help="py-spy the gateway at the end"
    )
    p.add_argument(
        "--pin",
        action="store_true",
        help="give the gateway CPU 1 to itself; the double and the load generator share CPU 0",
    )
    p.add_argument(
        "--double-loop", choices=["uvloop", "asyncio"], default="uvloop", help="the double's event loop"
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        metavar="SECONDS",
        help="before each run, wait up to this long for other processes to leave the CPUs idle",
    )
    p.add_argument("--max-seconds", type=float, default=1200, help="stop starting configurations after this")
    p.add_argument("--serve-double", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_double:
        return serve_double(args)

    import uvloop

    def on_term(signum: int, frame: Any) -> None:  # while starting the children (no loop yet)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    double = gateway = None
    try:
        for answer in args.answers:
            answer_pieces(answer, args.tokens)  # refuse a --tokens too small before starting anything
        double = Double(args.tokens, args.double_loop, args.answers)
        if not args.direct_only:
            gateway = GatewayProcess(double.url)
            gateway.wait_healthy()
        if args.pin:
            for pid, cpus in ((os.getpid(), {0}), (double.pid, {0}), (gateway.pid if gateway else None, {1})):
                if pid is not None:
                    pin(pid, cpus)
        busy0, t0 = system_busy_seconds(), time.monotonic()
        time.sleep(1.0)
        other = (system_busy_seconds() - busy0) / (time.monotonic() - t0)
        print(
            f"# before the start, other processes kept {other:.2f} of {os.cpu_count()} cores busy"
            + ("  <-- WARNING: the machine is not idle, the numbers will be lower" if other > 0.2 else "")
        )
        print(f"# machine: {os.cpu_count()} cores; double {double.url} (pid {double.pid}, {args.double_loop}); " + ("pinned: gateway on CPU 1, double and load generator on CPU 0; " if args.pin else "") +
              f"gateway {gateway.url if gateway else '-'} (pid {gateway.pid if gateway else '-'}); "
              f"client {args.client}", flush=True)  # fmt: skip
        return uvloop.run(guarded(args, double, gateway))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted", file=sys.stderr)
        return 130
    except TimeoutError:
        print(f"gave up: the benchmark ran past --max-seconds {args.max_seconds:g} + 600 s", file=sys.stderr)
        return 1
    finally:
        if gateway is not None:
            gateway.close()
        if double is not None:
            double.close()


if __name__ == "__main__":
    sys.exit(main())
