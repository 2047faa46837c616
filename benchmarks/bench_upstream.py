"""What reading TGI's token stream costs the gateway in CPU, per token, by HTTP client.

A minimal SSE server (a child process: raw asyncio streams, uvloop, so that it costs little and the same
for every client) answers each ``POST /generate_stream`` with ``--tokens`` TGI token events, one chunk
each, paced ``--delay-ms`` apart (a GPU's pace: every token is its own socket read), then TGI's final
event. ``--streams`` concurrent clients each make ``--requests`` requests back to back. Each run of a
client is a child process of its own; its CPU time (``time.process_time``) is divided by the events read.
Clients:

* ``gateway``: the gateway's own path, ``TGIClient.generate_stream`` → ``TokenStream`` (the HTTP client,
  the SSE decoder, token parsing) of this checkout;
* ``baseline``: the same path in another checkout of the repository (``--baseline DIR``, e.g. a
  ``git worktree`` of an older commit), so that two versions of the client are compared on one server;
* ``httpx``: one ``httpx.AsyncClient`` + ``httpx_sse.aconnect_sse`` + ``orjson.loads`` (needs the test
  extra for httpx-sse);
* ``aiohttp``: a bare ``ClientSession`` + ``StreamReader.readany`` + split on blank lines +
  ``orjson.loads``: the floor for any client on aiohttp.

``--rounds N`` runs every client N times, in alternation (A, B, C, A, B, C, ...), so that a machine whose
speed drifts affects them alike; the table gives each run, then each client's minimum and median.

Run from the repository root::

    .venv/bin/python benchmarks/bench_upstream.py --streams 128 --requests 3 --tokens 64 --delay-ms 20
    git worktree add ../before <commit>     # the baseline checkout
    .venv/bin/python benchmarks/bench_upstream.py --clients gateway baseline aiohttp --baseline ../before \\
        --rounds 5

Results: docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
EVENT = (
    b'data:{"index":1,"token":{"id":1234,"text":" hello","logprob":-0.12,"special":false},'
    b'"generated_text":null,"details":null,"top_tokens":null}\n\n'
)
FINAL = (
    b'data:{"index":2,"token":{"id":2,"text":"<|eot_id|>","logprob":-0.1,"special":true},"generated_text":"x",'
    b'"details":{"finish_reason":"eos_token","generated_tokens":2,"seed":null,"input_length":10},"top_tokens":null}\n\n'
)
# The gateway's settings for the client (the defaults of tgi_gateway/settings.py).
TIMEOUTS = {
    "connect_timeout": 2.0,
    "first_token_timeout": 120.0,
    "read_timeout": 60.0,
    "request_timeout": 600.0,
    "connect_retries": 3,
}


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def serve(tokens: int, delay: float) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    ),
                    0,
                )
                await reader.readexactly(length)
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                )
                for _ in range(tokens):
                    await asyncio.sleep(delay)
                    writer.write(chunk(EVENT))
                writer.write(chunk(FINAL) + b"0\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


async def read_gateway(url: str, streams: int, requests: int) -> int:
    from tgi_gateway.tgi.client import TGIClient

    count = 0
    async with TGIClient(url, **TIMEOUTS) as client:

        async def one() -> None:
            nonlocal count
            for _ in range(requests):
                async with client.generate_stream("x" * 1500, {"details": True}) as tokens:
                    async for _item in tokens:
                        count += 1

        await asyncio.gather(*(one() for _ in range(streams)))
    return count


async def read_httpx(url: str, streams: int, requests: int) -> int:
    import httpx
    import httpx_sse

    count = 0
    body = orjson.dumps({"inputs": "x" * 1500, "parameters": {"details": True}})
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=streams)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def one() -> None:
            nonlocal count
            for _ in range(requests):
                async with httpx_sse.aconnect_sse(client, "POST", "/generate_stream", content=body) as source:
                    async for sse in source.aiter_sse():
                        orjson.loads(sse.data)
                        count += 1

        await asyncio.gather(*(one() for _ in range(streams)))
    return count


async def read_aiohttp(url: str, streams: int, requests: int) -> int:
    import aiohttp

    count = 0
    body = orjson.dumps({"inputs": "x" * 1500, "parameters": {"details": True}})
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(sock_read=60)
    ) as session:

        async def one() -> None:
            nonlocal count
            for _ in range(requests):
                async with session.post(url + "/generate_stream", data=body) as response:
                    buf = b""
                    while data := await response.content.readany():
                        buf += data
                        while (end := buf.find(b"\n\n")) >= 0:
                            orjson.loads(buf[5:end])
                            buf = buf[end + 2 :]
                            count += 1

        await asyncio.gather(*(one() for _ in range(streams)))
    return count


CLIENTS = {"gateway": read_gateway, "baseline": read_gateway, "httpx": read_httpx, "aiohttp": read_aiohttp}
IMPORTS = {
    "gateway": ["tgi_gateway.tgi.client"],
    "baseline": ["tgi_gateway.tgi.client"],
    "httpx": ["httpx", "httpx_sse"],
    "aiohttp": ["aiohttp"],
}


def run_client(args: argparse.Namespace) -> int:
    """One run of one client, in this (child) process: prints ``{"events", "wall", "cpu"}``."""
    import uvloop

    sys.path.insert(0, str(Path(args.root).resolve()))
    for module in IMPORTS[args.run]:  # not counted
        importlib.import_module(module)
    wall, cpu = time.perf_counter(), time.process_time()
    count = uvloop.run(CLIENTS[args.run](args.url, args.streams, args.requests))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(json.dumps({"events": count, "wall": wall, "cpu": cpu}), flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=128)
    p.add_argument("--requests", type=int, default=3, help="requests per stream, back to back")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--delay-ms", type=float, default=20.0)
    p.add_argument("--clients", nargs="+", choices=sorted(CLIENTS), default=["gateway", "httpx", "aiohttp"])
    p.add_argument(
        "--baseline", metavar="DIR", help="the checkout whose gateway client is the `baseline` client"
    )
    p.add_argument("--rounds", type=int, default=1, help="runs of each client, in alternation")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run", choices=sorted(CLIENTS), help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--root", default=str(ROOT), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        import uvloop

        uvloop.run(serve(args.tokens, args.delay_ms / 1000))
        return 0
    if args.run:
        return run_client(args)
    if "baseline" in args.clients and not args.baseline:
        p.error("the baseline client needs --baseline DIR")
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--tokens", str(args.tokens), "--delay-ms", str(args.delay_ms)],
        stdout=subprocess.PIPE,
        text=True,
    )
    results: dict[str, list[float]] = {name: [] for name in args.clients}
    try:
        url = f"http://127.0.0.1:{server.stdout.readline().strip()}"  # type: ignore[union-attr]
        print(f"# {args.streams} streams x {args.requests} requests x {args.tokens + 1} events, "
              f"{args.delay_ms:g} ms apart; {os.cpu_count()} cores; CPU of the client's process only")  # fmt: skip
        print("| round | client | events | wall (s) | CPU (s) | CPU per event |")
        print("|---:|---|---:|---:|---:|---:|")
        for round_ in range(1, args.rounds + 1):
            for name in args.clients:
                if name == "aiohttp" and importlib.util.find_spec("aiohttp") is None:
                    print(f"| {round_} | aiohttp | (not installed) | | | |")
                    continue
                root = args.baseline if name == "baseline" else str(ROOT)
                out = subprocess.run(
                    [sys.executable, __file__, "--run", name, "--url", url, "--root", root,
                     "--streams", str(args.streams), "--requests", str(args.requests)],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
                run = json.loads(out.stdout.strip().splitlines()[-1])
                per_event = run["cpu"] / run["events"] * 1e6
                results[name].append(per_event)
                print(f"| {round_} | {name} | {run['events']:,} | {run['wall']:.2f} | {run['cpu']:.2f} "
                      f"| {per_event:.1f} µs |", flush=True)  # fmt: skip
    finally:
        server.terminate()
        server.wait(5)
    print("\n| client | runs | CPU per event, min | median |\n|---|---:|---:|---:|")
    for name, values in results.items():
        if values:
            print(f"| {name} | {len(values)} | {min(values):.1f} µs | {statistics.median(values):.1f} µs |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
