"""Non-stream requests per second: the gateway vs TGI directly, at a fixed concurrency.

The same three processes as ``bench_gateway.py`` (the TGI double in a child process, the real gateway CLI,
this load generator with ``RawClient``). ``--concurrency`` workers each send requests back to back for
``--seconds``, alternately:

* **direct**: ``POST /generate`` (TGI's non-stream route) to the double with the exact ``inputs`` and
  ``parameters`` the gateway sends it (read back from the double's record of a gateway request, which is a
  ``/generate`` request with ``details: true`` too): what a client calling TGI directly gets;
* **gateway**: ``POST /v1/chat/completions`` with ``stream: false`` (the gateway calls TGI's ``/generate``
  with ``details: true``, parses ``details.tokens`` and answers one JSON body).

Every answer is checked (status 200; the gateway's ``usage.completion_tokens`` equals the answer's tokens).
Reported: requests/s per mode, the ratio, and latency p50/p99. Target (issue 5): ratio ≥ 0.8 at 64.

Run from the repository root::

    .venv/bin/python benchmarks/bench_nonstream.py --concurrency 64 --tokens 32 --delay-ms 0 --seconds 10

Results: docs/performance.md, "Non-stream requests per second".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

import orjson
from _common import GatewayProcess, RawClient, pct
from bench_gateway import MODEL, TOOL, Double


async def worker(
    client: RawClient, path: str, body: bytes, until: float, tokens: int, latencies: list[float]
) -> None:
    while time.perf_counter() < until:
        start = time.perf_counter()
        ex = await client.request(path, body)
        payload = b"".join([chunk async for chunk in client.chunks(ex)])
        client.release(ex)
        if ex.status != 200:
            raise RuntimeError(f"{path}: HTTP {ex.status}: {payload[:300]!r}")
        answer = orjson.loads(payload)
        if path == "/v1/chat/completions" and answer["usage"]["completion_tokens"] != tokens:
            raise RuntimeError(f"unexpected answer: {answer}")
        latencies.append(time.perf_counter() - start)


async def measure(url: str, path: str, body: bytes, args: argparse.Namespace) -> tuple[float, list[float]]:
    clients = [RawClient(url) for _ in range(args.concurrency)]
    latencies: list[float] = []
    start = time.perf_counter()
    until = start + args.seconds
    await asyncio.gather(*(worker(c, path, body, until, args.tokens, latencies) for c in clients))
    return len(latencies) / (time.perf_counter() - start), latencies


async def learn_direct_body(double: Double, gateway_url: str, gateway_body: bytes) -> bytes:
    double.call("reset")
    client = RawClient(gateway_url)
    ex = await client.request("/v1/chat/completions", gateway_body)
    _ = [c async for c in client.chunks(ex)]
    last = double.call("stats")["last"]
    if last is None or last["route"] != "generate":  # the baseline is a client of TGI's own /generate
        raise RuntimeError(f"the gateway's non-stream request did not reach TGI's /generate: {last}")
    return json.dumps(
        {"inputs": last["inputs"], "parameters": last["parameters"]}, separators=(",", ":")
    ).encode()


async def run(args: argparse.Namespace, double: Double, gateway: GatewayProcess) -> None:
    gateway_body = orjson.dumps(
        {
            "model": MODEL,
            "messages": [
                {"role": "user", "content": "What is the weather like in Paris today, and tomorrow?"}
            ],
            "tools": [TOOL],
        }
    )
    direct_body = await learn_direct_body(double, gateway.url, gateway_body)
    rows = {"direct": [], "gateway": []}
    for _ in range(args.repeats):
        for mode in ("direct", "gateway"):
            url, path, body = (
                (double.url, "/generate", direct_body)
                if mode == "direct"
                else (gateway.url, "/v1/chat/completions", gateway_body)
            )
            double.call("reset")
            rows[mode].append(await measure(url, path, body, args))
    print(f"# {args.concurrency} concurrent, {args.tokens} tokens/answer, {args.delay_ms:g} ms/token, "
          f"{args.seconds:g} s per run, median of {args.repeats}")  # fmt: skip
    print("| mode | requests/s | latency p50 / p99 (ms) |")
    print("|---|---:|---:|")
    medians = {}
    for mode, runs in rows.items():
        medians[mode] = statistics.median(r for r, _ in runs)
        lat = [x for _, ls in runs for x in ls]
        print(f"| {mode} | {medians[mode]:,.0f} | {pct(lat, 50) * 1e3:.1f} / {pct(lat, 99) * 1e3:.1f} |")
    print(f"\nratio gateway / direct: {medians['gateway'] / medians['direct']:.3f} (target >= 0.8)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--tokens", type=int, default=32, help="tokens per answer, stop token included")
    p.add_argument("--delay-ms", type=float, default=0.0, help="per token (0: as fast as the double goes)")
    p.add_argument("--seconds", type=float, default=10.0, help="per run")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    import uvloop

    with Double(args.tokens, "uvloop", ["text"]) as double:
        double.call("set", token_delay=args.delay_ms / 1000)
        with GatewayProcess(double.url) as gateway:
            gateway.wait_healthy()
            uvloop.run(run(args, double, gateway))
    return 0


if __name__ == "__main__":
    sys.exit(main())
