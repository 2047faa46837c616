"""Client disconnects: how soon after a client goes away does TGI see its request's connection closed?

Every second a disconnected request stays in TGI's batch is GPU time spent on an answer nobody reads, so the
gateway must close the upstream request as soon as the client's socket closes (issue target: 100 ms). This
check makes ``--count`` disconnects (default 200) against the real gateway process (``server_tgi.py
--no-launch``) and the TGI double in its own process, spread evenly over four points of a request:

* ``queued``: a streamed request that TGI holds before its first token (queued in the batch). The gateway has
  sent no response headers yet: it waits for TGI's first event before it answers.
* ``text``: a streamed answer, after its first ``content`` chunk reached the client, TGI holding mid-text.
* ``tool``: a streamed tool call, after an ``arguments`` chunk reached the client, TGI holding inside the
  arguments.
* ``nonstream``: a non-streamed request (the gateway calls TGI's ``/generate``, which answers only once the
  generation is complete), TGI holding after its first token.

Each request is held by the double at that point (a gate of its own, see ``TaggedScripts`` in ``_common.py``),
so the client acts only once the double confirms the state, never after a guessed sleep. The client then closes
its socket (``shutdown(SHUT_RDWR)``: a FIN, as a client that goes away sends) and notes the time; the double
notes when it sees the upstream connection close (``GenerationRecord.disconnected_at``). Both are
``time.monotonic()`` on the same machine (``CLOCK_MONOTONIC``), so their difference is the latency. The
requests run one at a time, so each latency is the gateway's reaction alone, not queueing behind others.

Every wait is bounded: the double's hold (5 s), the first chunk (5 s), the double's observation (``--wait``,
2 s: a disconnect not seen by then is *missed*, and its request is released so that it ends).

Result: per point, count, p50 / p99 / max latency; PASS when no disconnect was missed and the slowest one is
within ``--bound-ms`` (default 100); the exit status is 1 on FAIL. Run from the repository root (~15 s)::

    .venv/bin/python benchmarks/check_disconnect.py                 # 200 disconnects, 50 per point
    .venv/bin/python benchmarks/check_disconnect.py --count 8 --bound-ms 500 --json out.json  # (the test's)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from _common import MODEL, DoubleProcess, Exchange, GatewayProcess, RawClient, pct, tag, tagged_double

HOLD = {"hold": True}
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "required": ["location"],
        },
    },
}
TEXT = ["It", " is", " sunny", ".", "<|eot_id|>"]
#: What the double generates for each point; HOLD is where it holds the request.
SCRIPTS: dict[str, list[Any]] = {
    "queued": [HOLD, *TEXT],
    "text": [*TEXT[:2], HOLD, *TEXT[2:]],
    "tool": ["<function=get_weather>", '{"location": "Par', HOLD, 'is"}', "</function>", "<|eom_id|>"],
    "nonstream": [*TEXT[:2], HOLD, *TEXT[2:]],
}
POINTS = list(SCRIPTS)
HOLD_TIMEOUT = 5.0
CHUNK_TIMEOUT = 5.0


def body(point: str, n: int) -> bytes:
    return orjson.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"What is the weather in Paris? {tag(point, n)}"}],
            "tools": [TOOL],
            "stream": point != "nonstream",
        }
    )


def poll(double: DoubleProcess, n: int, done: Callable[[dict], bool], timeout: float) -> dict | None:
    """The double's record of request ``n`` once ``done(record)``, or None after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        rec = double.call("gen", n=n)
        if done(rec):
            return rec
        if time.monotonic() > deadline:
            return None
        time.sleep(0.001)


def showable(ev: bytes, point: str) -> bool:
    """Whether an SSE event is the chunk the client waits for: text content, or tool-call arguments."""
    if not ev.startswith(b"data: {"):
        return False
    for choice in orjson.loads(ev[6:]).get("choices") or ():
        delta = choice.get("delta") or {}
        if point == "text" and delta.get("content"):
            return True
        if point == "tool" and any(
            (c.get("function") or {}).get("arguments") for c in delta.get("tool_calls") or ()
        ):
            return True
    return False


async def wait_for_chunk(ex: Exchange, point: str) -> None:
    await RawClient.read_head(ex)
    if ex.status != 200:
        raise RuntimeError(f"{point}: the gateway answered HTTP {ex.status}")
    async for ev, _ in RawClient.events(ex):
        if showable(ev, point):
            return
    raise RuntimeError(f"{point}: the stream ended before the chunk to leave after")


async def one(client: RawClient, double: DoubleProcess, point: str, n: int, wait: float) -> float | None:
    """One disconnect: its latency in seconds, or None when the double did not see it within ``wait``."""
    ex = await client.send("/v1/chat/completions", body(point, n), fresh=True)
    try:
        held = poll(double, n, lambda r: r["held_at"] is not None and r["found"], HOLD_TIMEOUT)
        if held is None:
            raise RuntimeError(f"{point} #{n}: the double never held the request: {double.call('gen', n=n)}")
        route = "generate" if point == "nonstream" else "generate_stream"
        if held["route"] != route:
            raise RuntimeError(f"{point} #{n}: the gateway called TGI's /{held['route']}, not /{route}")
        if point in ("text", "tool"):
            await asyncio.wait_for(wait_for_chunk(ex, point), CHUNK_TIMEOUT)
    except BaseException:
        ex.writer.close()
        raise
    left = ex.abort()
    rec = poll(double, n, lambda r: r["disconnected_at"] is not None or r["ended_at"] is not None, wait)
    if rec is None or rec["disconnected_at"] is None:
        double.call("release", n=n)  # let it end: the gateway kept it open
        return None
    return rec["disconnected_at"] - left


async def run(args: argparse.Namespace, double: DoubleProcess, gateway: GatewayProcess) -> dict[str, Any]:
    client = RawClient(gateway.url)
    double.call("scripts", scripts=SCRIPTS)
    for i, point in enumerate(POINTS):  # warm-up: the first request also reads TGI's /info
        await one(client, double, point, 1_000_000 + i, args.wait)
    got: dict[str, list[float]] = {p: [] for p in POINTS}
    missed = dict.fromkeys(POINTS, 0)
    for n in range(args.count):
        point = POINTS[n % len(POINTS)]
        latency = await one(client, double, point, n, args.wait)
        if latency is None:
            missed[point] += 1
        else:
            got[point].append(latency * 1000)
    bound = args.bound_ms
    points = {
        p: {
            "count": len(got[p]) + missed[p],
            "missed": missed[p],
            "p50_ms": pct(got[p], 50),
            "p99_ms": pct(got[p], 99),
            "max_ms": max(got[p], default=float("nan")),
            "pass": missed[p] == 0 and bool(got[p]) and max(got[p]) <= bound,
            "latencies_ms": got[p],
        }
        for p in POINTS
        if got[p] or missed[p]
    }
    return {"bound_ms": bound, "points": points, "pass": all(r["pass"] for r in points.values())}


def report(result: dict[str, Any]) -> str:
    bound = result["bound_ms"]
    out = [
        f"| point | disconnects | p50 (ms) | p99 (ms) | max (ms) | missed | within {bound:g} ms |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for point, r in result["points"].items():
        out.append(
            f"| {point} | {r['count']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} | {r['missed']} "
            f"| {'PASS' if r['pass'] else 'FAIL'} |"
        )
    out.append(f"\n{'PASS' if result['pass'] else 'FAIL'}: every disconnect seen by TGI within {bound:g} ms")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--count", type=int, default=200, help="disconnects, spread evenly over the 4 points (200)"
    )
    p.add_argument("--bound-ms", type=float, default=100.0, help="the target for every disconnect (100 ms)")
    p.add_argument("--wait", type=float, default=2.0, help="seconds to wait for TGI to see one (2)")
    p.add_argument("--json", type=Path, help="also write the results (latencies included) to this file")
    p.add_argument("--max-seconds", type=float, default=170.0, help="give up after this long (170)")
    args = p.parse_args()
    try:
        with tagged_double() as double, GatewayProcess(double.url) as gateway:
            gateway.wait_healthy()
            result = asyncio.run(asyncio.wait_for(run(args, double, gateway), args.max_seconds))
    except TimeoutError:
        print(f"FAIL: gave up after --max-seconds {args.max_seconds:g}", file=sys.stderr)
        return 1
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
