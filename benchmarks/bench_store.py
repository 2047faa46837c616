"""The response store's cost per request: one ``save`` (what a create with ``store: true`` adds) and one ``get``
(what a ``previous_response_id`` follow-up or a retrieval adds), on SQLite and on PostgreSQL.

    python benchmarks/bench_store.py                       # SQLite in a temporary directory + a PostgreSQL
                                                           # server started here (initdb/pg_ctl, as the tests)
    python benchmarks/bench_store.py --postgres postgresql://user@host/db   # an existing PostgreSQL instead
    python benchmarks/bench_store.py --requests 3000 --concurrency 32 --runs 3

Each run opens a new store (an empty database), then:

* **sequential**: `--requests` times ``save`` then ``get`` of a new response, one at a time: the latency each
  adds to a request (median and p99 per operation) and this process's CPU per save+get (``process_time``:
  SQLAlchemy, the driver, JSON, and for SQLite the database itself, which runs in aiosqlite's thread);
* **concurrent**: the same pairs from `--concurrency` tasks at once: pairs per second through one process's
  pool (5 connections + 10 overflow).

A response is what a small tool round trip stores: the Response object (~1.5 KB of JSON), 4 input items and a
context of 8 items (~3.5 KB in all). The event loop is uvloop, as in the gateway. The figures and the command
are in docs/performance.md, "The response store".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tgi_gateway.store import StoredResponse, open_store

RESPONSE: dict[str, Any] = {
    "object": "response", "created_at": 1767225600, "completed_at": 1767225601, "status": "completed",
    "error": None, "incomplete_details": None, "model": "meetkai/functionary-small-v3.2", "instructions": None,
    "metadata": {}, "output": [
        {"type": "function_call", "id": "fc_8f2a9c", "call_id": "call_Xb12kqPzR7m3", "name": "get_weather",
         "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\"}", "status": "completed"},
        {"type": "message", "id": "msg_51c0aa", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": "It is 21 °C and sunny in Paris right now, with a light "
                      "breeze from the west. Tomorrow looks similar.", "annotations": [], "logprobs": []}]}],
    "parallel_tool_calls": True, "tool_choice": "auto",
    "tools": [{"type": "function", "name": "get_weather", "description": "Current weather for a city",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                              "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                              "required": ["city"]}, "strict": False}],
    "temperature": 1.0, "top_p": 1.0, "max_output_tokens": None, "previous_response_id": None,
    "text": {"format": {"type": "text"}}, "truncation": "disabled", "store": True,
    "reasoning": {"effort": None, "summary": None}, "user": None,
    "usage": {"input_tokens": 212, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
              "output_tokens": 41, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 253},
}  # fmt: skip
INPUT_ITEMS = [
    {"id": "msg_in1", "type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Be brief."}]},
    {"id": "msg_in2", "type": "message", "role": "user",
     "content": [{"type": "input_text", "text": "What's the weather in Paris, and should I take an umbrella?"}]},
    {"id": "fc_in1", "type": "function_call", "call_id": "call_Ab", "name": "get_weather",
     "arguments": "{\"city\": \"Paris\"}", "status": "completed"},
    {"id": "fco_in1", "type": "function_call_output", "call_id": "call_Ab", "output": "{\"temp\": 21, \"sky\": \"clear\"}"},
]  # fmt: skip


def response(n: int) -> StoredResponse:
    rid = f"resp_{n:08d}{os.urandom(8).hex()}"
    return StoredResponse(
        id=rid, owner="key-1a2b3c4d", created_at=int(time.time()), response={"id": rid, **RESPONSE},
        input_items=INPUT_ITEMS, context=INPUT_ITEMS + RESPONSE["output"] + INPUT_ITEMS[:2],
        previous_response_id=None,
    )  # fmt: skip


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(url: str, requests: int, concurrency: int) -> dict[str, float]:
    store = await open_store(url, ttl_seconds=3600)
    try:
        for n in range(50):  # warm the pool and the caches
            await store.save(warm := response(-n - 1))
            await store.get(warm.id, warm.owner)
        saves, gets = [], []
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for n in range(requests):
            item = response(n)
            t0 = time.perf_counter()
            await store.save(item)
            t1 = time.perf_counter()
            got = await store.get(item.id, item.owner)
            saves.append(t1 - t0)
            gets.append(time.perf_counter() - t1)
            assert got is not None
        cpu = (time.process_time() - cpu0) / requests
        sequential = (time.perf_counter() - wall0) / requests

        queue = iter(range(requests, 2 * requests))

        async def worker() -> None:
            for n in queue:
                item = response(n)
                await store.save(item)
                assert await store.get(item.id, item.owner) is not None

        wall0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        rate = requests / (time.perf_counter() - wall0)
    finally:
        await store.close()
    return {
        "save_p50": statistics.median(saves) * 1e3, "save_p99": pct(saves, 0.99) * 1e3,
        "get_p50": statistics.median(gets) * 1e3, "get_p99": pct(gets, 0.99) * 1e3,
        "pair_ms": sequential * 1e3, "cpu_ms": cpu * 1e3, "rate": rate,
    }  # fmt: skip


@contextlib.contextmanager
def postgres_database(url: str | None) -> Iterator[str | None]:
    if url:
        yield url
        return
    from tests.postgres_server import PostgresServer, find_binaries

    bindir = find_binaries()
    if bindir is None:
        print("PostgreSQL skipped: no initdb/pg_ctl (apt-get install postgresql) and no --postgres URL")
        yield None
        return
    with PostgresServer.start(bindir) as server:
        yield server.url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--postgres", help="an existing database's URL (default: start a server here)")
    parser.add_argument("--only", choices=["sqlite", "postgresql"])
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(f"{args.requests} save+get pairs sequential, then {args.requests} from {args.concurrency} tasks; "
          f"median of {args.runs} runs")  # fmt: skip
    header = (
        "store        save p50/p99 ms   get p50/p99 ms   save+get ms   CPU/pair ms   pairs/s (concurrent)"
    )
    print(header)
    with tempfile.TemporaryDirectory() as tmp, postgres_database(args.postgres) as pg_base:
        targets = []
        if args.only != "postgresql":
            targets.append(("sqlite", lambda n: f"sqlite:///{tmp}/run{n}/responses.db"))
        if args.only != "sqlite" and pg_base:
            targets.append(("postgresql", lambda n: pg_fresh(pg_base, n)))
        for name, make in targets:
            results = [asyncio.run(run(make(n), args.requests, args.concurrency)) for n in range(args.runs)]
            m = {key: statistics.median(r[key] for r in results) for key in results[0]}
            print(f"{name:<12} {m['save_p50']:6.2f} / {m['save_p99']:5.2f}    {m['get_p50']:6.2f} / "
                  f"{m['get_p99']:5.2f}   {m['pair_ms']:8.2f}      {m['cpu_ms']:8.2f}      {m['rate']:8.0f}")  # fmt: skip


def pg_fresh(base: str, n: int) -> str:
    """A new database on the server of `base` (each run starts empty)."""
    import asyncpg

    name = f"bench_store_{os.getpid()}_{n}"

    async def create() -> None:
        conn = await asyncpg.connect(base)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    return base.rsplit("/", 1)[0] + "/" + name


if __name__ == "__main__":
    main()
