"""What the per-key limit costs a request: in the process (``InFlight``) and shared through Redis
(``SharedInFlight``, ``--redis-url``), one slot taken and given back per request.

A ``redis-server`` of its own is started on a free loopback port (no persistence). ``--concurrency`` tasks
take and give back slots of ``--keys`` keys, ``--requests`` in all, under uvloop; printed: wall time per
request (µs), the process's CPU per request (µs), and the slowest take. The in-process limit is measured the
same way for comparison. Run from the repository root (Debian's ``redis-server`` on PATH)::

    .venv/bin/python benchmarks/bench_shared_limit.py --requests 20000 --concurrency 1
    .venv/bin/python benchmarks/bench_shared_limit.py --requests 20000 --concurrency 64

Results: docs/performance.md, "The per-key limit through Redis".
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis
import uvloop

from tgi_gateway.server.auth import InFlight
from tgi_gateway.server.shared_in_flight import SharedInFlight


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def run(limit: object, requests: int, concurrency: int, keys: int) -> tuple[float, float, float]:
    todo = iter(range(requests))
    slowest = 0.0

    async def worker() -> None:
        nonlocal slowest
        for i in todo:
            started = time.perf_counter()
            release = await limit.acquire(f"key-{i % keys}")  # type: ignore[attr-defined]
            slowest = max(slowest, time.perf_counter() - started)
            assert release is not None, "the limit is set above the concurrency"
            await release()

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.perf_counter() - wall) / requests, (time.process_time() - cpu) / requests, slowest


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--keys", type=int, default=4)
    args = p.parse_args()
    server = shutil.which("redis-server")
    if server is None:
        print("redis-server is not installed", file=sys.stderr)
        return 2
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", workdir], stdout=subprocess.DEVNULL)  # fmt: skip
        try:
            with redis.Redis(port=port) as r:
                for _ in range(100):
                    try:
                        r.ping()
                        break
                    except redis.ConnectionError:
                        time.sleep(0.05)
            url, cap = f"redis://127.0.0.1:{port}/0", args.concurrency + 1

            async def both() -> None:
                for name, limit in (("in-process", InFlight(cap)), ("redis", SharedInFlight(url, cap, InFlight(cap)))):
                    await run(limit, min(1000, args.requests), args.concurrency, args.keys)  # warm up
                    wall, cpu, slowest = await run(limit, args.requests, args.concurrency, args.keys)
                    print(f"{name:10}  concurrency {args.concurrency:3}  {wall * 1e6:8.1f} µs/request wall"
                          f"  {cpu * 1e6:8.1f} µs/request CPU  slowest take {slowest * 1e3:6.2f} ms")
                    if isinstance(limit, SharedInFlight):
                        await limit.aclose()

            uvloop.run(both())
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
