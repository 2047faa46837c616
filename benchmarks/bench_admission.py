"""Admission cost: how long one request's validation, normalisation and rendering hold the event loop.

One event loop serves every stream, so the CPU a request spends before it reaches TGI delays every other
client's tokens by as much (issue 11, finding 1). The cases are the attacks of the issue and the largest
honest bodies a default gateway accepts (``--max-body-bytes`` 4 MiB):

======================  =====================================================================================
``ref11``               one 1.2 KB tool: 11 ``$defs``, each referring to the next twice (a 281 KB prompt)
``ref11x100``           100 such tools (distinct names) in one ~120 KB body
``ref12``, ``ref16``    12 and 16 levels: refused (more than 100,000 nodes) only after the work, today
``deep380``             a property nested 380 objects deep: indentation makes its declaration quadratic
``required20k``         20,000 properties, all ``required``: ``name in required`` scans a list (quadratic)
``tools-max``           as many tiny tools as fit in 4 MiB (~82k)
``tools128x32k``        128 honest tools (OpenAI's maximum) of ~32 KB each: properties, descriptions, enums
``messages-max``        as many short messages as fit in 4 MiB (~123k)
``message-4MiB``        one 4 MiB user message
``calls-max``           assistant tool calls and their results, as many as fit in 4 MiB
======================  =====================================================================================

Two modes:

* **in-process** (default): each stage timed alone, cold caches, the server's collector settings
  (``tune_gc``): ``model`` = ``ChatCompletionRequest.model_validate``, ``normalize``, ``render`` (both on a
  v3.llama3 template, which prints the TypeScript-like schema, and v3-llama3.1, which prints JSON). Only the
  APIs every version has are used, so the same script measures the code before a change (``--root``).
* **end to end** (``--e2e``): the real gateway process (``server_tgi.py``) in front of the TGI double
  (``max_input_tokens`` 131071, Llama 3.1's window, so that no honest case is refused for its length), and a
  prober in its own process that asks ``GET /v1/models`` (no upstream call) every 5 ms on a keep-alive
  connection. Per case: the answer's status and time, and the prober's slowest answer while the case ran —
  how long the gateway's loop was held. ``--concurrent N`` sends N copies of each case at once.

Run from the repository root; ``--root DIR`` measures another checkout (e.g. ``git archive`` of a commit)::

    .venv/bin/python benchmarks/bench_admission.py                       # in-process, every case
    .venv/bin/python benchmarks/bench_admission.py --e2e                 # end to end
    .venv/bin/python benchmarks/bench_admission.py --e2e --case ref16 --concurrent 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MAX_BODY = 4 * 1024 * 1024  # the default --max-body-bytes
MODEL = "bench-model"
LONG_CONTEXT = 131_071  # Llama 3.1: the double's max_input_tokens in --e2e

# ------------------------------------------------------------------------------------------------
# The cases (plain JSON bodies, built deterministically)
# ------------------------------------------------------------------------------------------------


def _body(tools: list[Any] | None = None, messages: list[Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "messages": messages or [{"role": "user", "content": "Hi"}]}
    if tools is not None:
        body["tools"] = tools
    body["max_tokens"] = 16
    return body


def _tool(name: str, parameters: dict[str, Any] | None = None, description: str = "") -> dict[str, Any]:
    function: dict[str, Any] = {"name": name, "description": description}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


def doubling(levels: int, tag: str = "") -> dict[str, Any]:
    """`levels` definitions, each an object whose two properties both refer to the next one."""
    defs: dict[str, Any] = {}
    for i in range(levels):
        last = i + 1 == levels
        child = {"type": "string", "description": "leaf"} if last else {"$ref": f"#/$defs/d{i + 1}"}
        defs[f"d{i}"] = {
            "type": "object",
            "description": f"level {i}",
            "properties": {"a": child, "b": child},
        }
    return {"type": "object", "properties": {f"root{tag}": {"$ref": "#/$defs/d0"}}, "$defs": defs}


def _nested(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        node = {"type": "object", "properties": {"a": node}}
    return {"type": "object", "properties": {"a": node}}


def _required(n: int) -> dict[str, Any]:
    names = [f"p{i}" for i in range(n)]
    return {"type": "object", "properties": {name: {"type": "string"} for name in names}, "required": names}


def _honest_parameters(i: int, size: int) -> dict[str, Any]:
    """A plausible large schema: typed properties with descriptions, enums, nested objects and arrays."""
    properties: dict[str, Any] = {}
    k = 0
    while len(json.dumps(properties)) < size - 400:
        properties[f"field_{k}"] = {
            "type": "object",
            "description": f"Settings group {k} of tool {i}: what the caller wants, in detail.",
            "properties": {
                "mode": {"type": "string", "enum": ["fast", "balanced", "thorough"], "description": "How."},
                "limit": {"type": "integer", "minimum": 1, "maximum": 1000, "description": "At most."},
                "tags": {"type": "array", "items": {"type": "string"}, "description": "Labels to attach."},
            },
            "required": ["mode"],
        }
        k += 1
    return {"type": "object", "properties": properties, "required": ["field_0"]}


def _fill(make: Callable[[int], Any], wrap: Callable[[list[Any]], dict[str, Any]], step: int = 1000) -> dict:
    """`wrap(items)` with as many `make(i)` items as fit in MAX_BODY bytes."""
    items: list[Any] = []
    while True:
        more = [make(len(items) + j) for j in range(step)]
        if len(json.dumps(wrap(items + more))) > MAX_BODY:
            break
        items += more
    while step > 1:  # then finer steps
        step //= 10
        while len(json.dumps(wrap(items + [make(len(items) + j) for j in range(step)]))) <= MAX_BODY:
            items += [make(len(items) + j) for j in range(step)]
    return wrap(items)


def _calls(i: int) -> list[dict[str, Any]]:
    call = {"id": f"call_{i}", "type": "function", "function": {"name": "f", "arguments": '{"x":1}'}}
    return [{"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"call_{i}", "content": "ok"}]  # fmt: skip


CASES: dict[str, Callable[[], dict[str, Any]]] = {
    "ref11": lambda: _body([_tool("f", doubling(11))]),
    "ref11x100": lambda: _body([_tool(f"f{i}", doubling(11, str(i))) for i in range(100)]),
    "ref12": lambda: _body([_tool("f", doubling(12))]),
    "ref16": lambda: _body([_tool("f", doubling(16))]),
    "deep380": lambda: _body([_tool("f", _nested(380))]),
    "required20k": lambda: _body([_tool("f", _required(20_000))]),
    "tools-max": lambda: _fill(lambda i: _tool(f"f{i}"), lambda items: _body(items)),
    "tools128x32k": lambda: _body([_tool(f"tool_{i}", _honest_parameters(i, 32_000), "A tool.") for i in range(128)]),
    "messages-max": lambda: _fill(
        lambda i: {"role": "user" if i % 2 == 0 else "assistant", "content": "Hi"}, lambda items: _body(None, items)
    ),
    # as many messages as a 131,071-token context lets in at 5 tokens each (the gateway's floor per message of
    # a llama3 template: render.TOKENS_PER_MESSAGE), each as long as 4 MiB allows
    "messages-fit": lambda: _body(None, [{"role": "user" if i % 2 == 0 else "assistant",
                                          "content": ("Hello there, " * 10)[:119]} for i in range(26_000)]),
    "message-4MiB": lambda: _body(None, [{"role": "user", "content": "x" * (MAX_BODY - 200)}]),
    "calls-max": lambda: _fill(
        _calls,
        lambda items: _body([_tool("f")], [{"role": "user", "content": "Hi"}] + [m for pair in items for m in pair]),
        step=100,
    ),
}  # fmt: skip


# ------------------------------------------------------------------------------------------------
# In-process: each stage alone
# ------------------------------------------------------------------------------------------------


def _clear_caches() -> None:
    for module in (
        "tgi_gateway.prompting.request",
        "tgi_gateway.prompting.render",
        "tgi_gateway.prompting.schema",
    ):
        mod = importlib.import_module(module)
        for value in vars(mod).values():
            if hasattr(value, "clear") and type(value).__name__ == "LRUCache":
                value.clear()


def in_process(names: list[str], runs: int) -> list[dict[str, Any]]:
    import orjson

    from tgi_gateway.api.models import ChatCompletionRequest
    from tgi_gateway.errors import GatewayError
    from tgi_gateway.prompting import Template, Version, normalize
    from tgi_gateway.server.process import tune_gc

    tune_gc()
    rows = []
    for name in names:
        raw = json.dumps(CASES[name]()).encode()
        for version in (Version.V3_LLAMA3, Version.V3_LLAMA31):
            template = Template(version)
            times: dict[str, list[float]] = {"model": [], "normalize": [], "render": []}
            outcome = ""
            for _ in range(runs):
                _clear_caches()
                data = orjson.loads(raw)
                gc.collect()
                t0 = time.perf_counter()
                req = ChatCompletionRequest.model_validate(data)
                t1 = time.perf_counter()
                t2 = t3 = t1
                try:
                    prompt = normalize(
                        {"messages": req.messages, "tools": req.tools, "tool_choice": req.tool_choice}
                    )
                    t2 = time.perf_counter()
                    text = template.render(prompt)
                    t3 = time.perf_counter()
                    outcome = f"{len(text):,} chars"
                except GatewayError as exc:  # a refusal is an outcome: its time counts where it was raised
                    now = time.perf_counter()
                    t2, t3 = (now, now) if t2 == t1 else (t2, now)
                    outcome = f"{type(exc).__name__}: {str(exc)[:70]}"
                times["model"].append(t1 - t0)
                times["normalize"].append(t2 - t1)
                times["render"].append(t3 - t2)
            row = {"case": name, "version": version.value, "body_bytes": len(raw), "outcome": outcome}
            row |= {stage: round(1e3 * statistics.median(v), 2) for stage, v in times.items()}
            row["total_ms"] = round(row["model"] + row["normalize"] + row["render"], 2)
            rows.append(row)
            print(
                f"{name:14} {version.value:12} {len(raw):>9,} B  model {row['model']:8.2f}  normalize "
                f"{row['normalize']:8.2f}  render {row['render']:8.2f}  total {row['total_ms']:8.2f} ms  {outcome}",
                flush=True,
            )
    return rows


# ------------------------------------------------------------------------------------------------
# End to end: the gateway process, the double, a prober
# ------------------------------------------------------------------------------------------------


def serve_double() -> int:
    """Child mode: the TGI double with a long context, until stdin closes."""
    from tests.fakes.tgi import FakeTGI, tokens

    tgi = FakeTGI(
        script=tokens("Hi", "<|eot_id|>"), max_input_tokens=LONG_CONTEXT, max_total_tokens=LONG_CONTEXT + 1
    )
    tgi.start()
    print(json.dumps({"url": tgi.url, "pid": os.getpid()}), flush=True)
    for _ in sys.stdin:
        pass
    tgi.stop()
    return 0


def probe(url: str, interval: float) -> int:
    """Child mode: GET /v1/models every `interval` s on one keep-alive connection until stdin closes; then
    print the samples [[sent_monotonic, latency_s], ...] as JSON."""
    host, port = url.removeprefix("http://").split(":")
    samples: list[list[float]] = []
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    request = f"GET /v1/models HTTP/1.1\r\nhost: {host}\r\n\r\n".encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = sock.makefile("rb")
        print("ready", flush=True)
        while not stop.is_set():
            sent = time.monotonic()
            sock.sendall(request)
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            reader.read(length)
            samples.append([sent, time.monotonic() - sent])
            time.sleep(max(0.0, interval - (time.monotonic() - sent)))
    print(json.dumps(samples), flush=True)
    return 0


@contextlib.contextmanager
def prober(url: str, interval: float) -> Iterator[list[list[float]]]:
    samples: list[list[float]] = []
    proc = subprocess.Popen(
        [sys.executable, __file__, "--probe", url, "--interval", str(interval)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdout.readline()  # "ready"
    try:
        yield samples
    finally:
        proc.stdin.close()
        samples += json.loads(proc.stdout.read() or "[]")
        proc.wait(10)


async def _post(url: str, body: bytes) -> tuple[int, float, bytes]:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()  # fmt: skip
    start = time.monotonic()
    writer.write(head + body)
    await writer.drain()
    answer = await reader.read()
    elapsed = time.monotonic() - start
    writer.close()
    status = int(answer.split(b" ", 2)[1]) if answer else 0
    return status, elapsed, answer.split(b"\r\n\r\n", 1)[-1][:160]


def end_to_end(names: list[str], concurrent: int, interval: float) -> list[dict[str, Any]]:
    sys.path.insert(0, str(HERE))
    from _common import DoubleProcess, GatewayProcess

    rows = []
    with DoubleProcess([__file__, "--serve-double"]) as double, GatewayProcess(double.url) as gateway:
        gateway.wait_healthy()
        asyncio.run(_post(gateway.url, json.dumps(_body()).encode()))  # TGI's /info read once
        for name in names:
            body = json.dumps(CASES[name]()).encode()
            with prober(gateway.url, interval) as samples:
                time.sleep(0.3)
                start = time.monotonic()

                async def all_of(body: bytes) -> list[tuple[int, float, bytes]]:
                    return await asyncio.gather(*(_post(gateway.url, body) for _ in range(concurrent)))

                answers = asyncio.run(all_of(body))
                end = time.monotonic()
                time.sleep(0.3)
            during = [lat for sent, lat in samples if sent + lat >= start and sent <= end]
            before = [lat for sent, lat in samples if sent + lat < start]
            statuses = sorted({a[0] for a in answers})
            row = {
                "case": name, "concurrent": concurrent, "body_bytes": len(body), "status": statuses,
                "answer_s": round(max(a[1] for a in answers), 3),
                "probe_max_ms": round(1e3 * max(during, default=0.0), 1),
                "probe_idle_ms": round(1e3 * statistics.median(before), 2) if before else None,
                "answer": answers[0][2].decode(errors="replace"),
            }  # fmt: skip
            rows.append(row)
            print(
                f"{name:14} x{concurrent:<3} {len(body):>9,} B  status {statuses}  answer {row['answer_s']:7.3f} s  "
                f"probe max {row['probe_max_ms']:8.1f} ms (idle {row['probe_idle_ms']} ms)  {row['answer'][:90]}",
                flush=True,
            )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="(repeatable) default: all")
    parser.add_argument("--runs", type=int, default=3, help="in-process: runs per case (median)")
    parser.add_argument("--e2e", action="store_true", help="the gateway process, the double and a prober")
    parser.add_argument("--concurrent", type=int, default=1, help="--e2e: copies of each case sent at once")
    parser.add_argument("--interval", type=float, default=0.005, help="--e2e: the prober's period (s)")
    parser.add_argument("--root", type=Path, default=HERE.parent, help="the checkout to measure")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--serve-double", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.setrecursionlimit(10_000)  # building and encoding deep380
    root = args.root.resolve()
    sys.path[:0] = [str(root), str(HERE)]
    os.chdir(root)  # GatewayProcess runs server_tgi.py from benchmarks/.. : the checkout measured
    if args.serve_double:
        return serve_double()
    if args.probe:
        return probe(args.probe, args.interval)
    names = args.case or list(CASES)
    if args.e2e:
        import _common

        _common.ROOT = root
        rows = end_to_end(names, args.concurrent, args.interval)
    else:
        rows = in_process(names, args.runs)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
