"""The replica balancer under load: four TGI doubles on 127.0.0.2–5 (one port), the gateway's own TGI client.

The doubles run in a child process (their CPU and GIL kept out of the load generator's), driven over its
stdin (``--serve-doubles``). Each double models a GPU that slows down as its batch grows: the first token
comes after ``--ttft-ms × speed × (1 + requests in flight / 8)``, then ``--tokens`` tokens ``--token-ms ×
speed`` apart. Its first token's text is its own address, so the client knows which replica served each
request. The load generator is :class:`tgi_gateway.tgi.client.TGIClient` (the gateway routes with exactly
this object, ``server/chat.py`` only adds the affinity key), ``--concurrency`` streams at a time, each
request sent when the previous one of its slot ended. Scenarios:

* ``even``: four equal replicas: each replica's share of the requests against the fair 25 % (±10 %).
* ``slow``: replica 127.0.0.3 five times slower (first token and tokens): the default policy (least
  outstanding requests, two random choices) against round-robin: each replica's share, time to first token
  p50/p99.
* ``kill``: replica 127.0.0.4 stopped a third of the way through the run, started again at two thirds:
  requests that failed before their first token (must be 0), streams cut mid-way (they had started:
  allowed), how long after the stop the replica was ejected, and after its return re-admitted (default
  settings: ``--health-interval 2``, ``--eject-seconds 1``).
* ``affinity``: requests carry one of ``--prefixes`` system prompts + tool lists (Zipf-like popularity): the
  share of the requests whose prefix had been served before that land on the replica that served it last,
  with affinity (consistent hashing with bounded loads) against without (load only).

Run from the repository root::

    .venv/bin/python benchmarks/bench_replicas.py                  # all four scenarios (~1 min)
    .venv/bin/python benchmarks/bench_replicas.py --scenario slow --requests 3000

Results: docs/performance.md, "Several replicas".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import DoubleProcess, pct

HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
SLOW, KILLED = "127.0.0.3", "127.0.0.4"


# --------------------------------------------------------------------------------------------
# The child: four doubles
# --------------------------------------------------------------------------------------------


def serve_doubles(args: argparse.Namespace) -> int:
    from tests.fakes.tgi import FakeTGI, Pause, tokens

    speed = dict.fromkeys(HOSTS, 1.0)
    doubles: dict[str, FakeTGI] = {}

    def script_for(host: str) -> Callable[[str, dict], list]:
        def script(inputs: str, parameters: dict) -> list:
            tgi = doubles[host]
            pause = args.ttft_ms / 1000 * speed[host] * (1 + tgi.in_flight / 8)
            return [Pause(pause), *tokens(host, *[" x"] * (args.tokens - 2), "<|eot_id|>")]

        return script

    def start(host: str, port: int) -> FakeTGI:
        tgi = FakeTGI(script_for(host), host=host, port=port, token_delay=args.token_ms / 1000 * speed[host])
        doubles[host] = tgi.start()
        return tgi

    port = 0
    for host in HOSTS:
        port = start(host, port).port

    def reply(obj: Any) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"url": doubles[HOSTS[0]].url, "pid": 0, "port": port})
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            name = cmd["cmd"]
            if name == "quit":
                reply({"ok": True})
                break
            if name == "speed":
                speed[cmd["host"]] = cmd["factor"]
                doubles[cmd["host"]].config.token_delay = args.token_ms / 1000 * cmd["factor"]
                reply({"ok": True})
            elif name == "stop":
                doubles[cmd["host"]].stop()
                reply({"at": time.monotonic()})
            elif name == "start":
                start(cmd["host"], port)
                reply({"at": time.monotonic()})
            elif name == "counts":
                reply({host: len(tgi.generations) for host, tgi in doubles.items()})
            elif name == "reset":
                for tgi in doubles.values():
                    tgi.reset()
                reply({"ok": True})
    finally:
        for tgi in doubles.values():
            tgi.stop()
    return 0


# --------------------------------------------------------------------------------------------
# The load generator
# --------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    replica: str | None = None  # who served the first token
    ttft: float | None = None
    failed_before_first_token: str | None = None
    cut_after_first_token: bool = False
    prefix: int | None = None  # which of the prefixes (affinity scenario)
    started: float = 0.0


@dataclass
class Recorder:
    """The client's ReplicaEvents, with the time of each ejection change."""

    changes: list[tuple[float, str, bool]] = field(default_factory=list)
    failovers: Counter[str] = field(default_factory=Counter)

    def request(self, url: str) -> None:
        pass

    def done(self, url: str) -> None:
        pass

    def failover(self, url: str) -> None:
        self.failovers[url] += 1

    def ejected(self, url: str, ejected: bool) -> None:
        self.changes.append((time.monotonic(), url, ejected))


def round_robin(balancer: Any) -> Callable[..., Any]:
    """A round-robin pick over the replicas not ejected and not tried (for comparison only)."""
    turn = 0

    def pick(now: float, key: int | None = None, tried: Any = ()) -> Any:
        nonlocal turn
        tried = set(tried)
        live = [r for r in balancer.live if not r.ejected(now) and r not in tried] or balancer.live
        turn += 1
        return live[turn % len(live)]

    return pick


async def run_load(
    client: Any,
    requests: int,
    concurrency: int,
    *,
    prefix_of: Callable[[int], tuple[int | None, int | None]] = lambda n: (None, None),
    during: Callable[[int], Any] | None = None,
) -> list[Outcome]:
    """Every request's outcome, in the order they were sent. ``prefix_of(n)``: request n's prefix (an index)
    and its affinity key (None: no key)."""
    from tgi_gateway.errors import GatewayError

    outcomes: list[Outcome] = []
    counter = iter(range(requests))

    async def one(n: int) -> Outcome:
        prefix, key = prefix_of(n)
        t0 = time.perf_counter()
        out = Outcome(prefix=prefix, started=t0)
        try:
            async with client.generate_stream("Hi", {"details": True}, affinity=key) as stream:
                async for item in stream:
                    if out.replica is None:
                        out.replica, out.ttft = item.text, time.perf_counter() - t0
        except GatewayError as exc:
            if out.replica is None:
                out.failed_before_first_token = exc.message
            else:
                out.cut_after_first_token = True
        return out

    async def slot() -> None:
        for n in counter:
            if during is not None:
                await during(n)
            outcomes.append(await one(n))

    await asyncio.gather(*(slot() for _ in range(concurrency)))
    return sorted(outcomes, key=lambda o: o.started)


def make_client(port: int, *, rng_seed: int, events: Any = None, **options: Any) -> Any:
    from tgi_gateway.tgi.client import TGIClient

    return TGIClient(
        [f"http://{host}:{port}" for host in HOSTS],
        connect_timeout=2.0, first_token_timeout=120.0, read_timeout=60.0, request_timeout=600.0,
        connect_retries=3, rng=random.Random(rng_seed), events=events, **options,
    )  # fmt: skip


def shares(outcomes: list[Outcome]) -> dict[str, float]:
    served = Counter(o.replica for o in outcomes if o.replica)
    total = sum(served.values())
    return {host: served[host] / total for host in HOSTS}


def ms(x: float) -> str:
    return f"{x * 1000:.0f} ms"


async def scenario_even(args: argparse.Namespace, doubles: DoubleProcess, port: int) -> None:
    async with make_client(port, rng_seed=1) as client:
        outcomes = await run_load(client, args.requests, args.concurrency)
    got = shares(outcomes)
    worst = max(abs(share / 0.25 - 1) for share in got.values())
    print("\n## even: four equal replicas")
    print(f"{args.requests} requests, {args.concurrency} at a time; least outstanding, two random choices\n")
    print("| replica | share | vs fair (25 %) |\n|---|---:|---:|")
    for host, share in got.items():
        print(f"| {host} | {share:.1%} | {share / 0.25 - 1:+.1%} |")
    print(f"\nlargest deviation {worst:.1%} ({'within' if worst <= 0.10 else 'OUTSIDE'} ±10 %)")


async def scenario_slow(args: argparse.Namespace, doubles: DoubleProcess, port: int) -> None:
    doubles.call("speed", host=SLOW, factor=5.0)
    rows = []
    try:
        for policy in ("least outstanding (p2c)", "round-robin"):
            async with make_client(port, rng_seed=2) as client:
                if policy == "round-robin":
                    client.balancer.pick = round_robin(client.balancer)
                t0 = time.perf_counter()
                outcomes = await run_load(client, args.requests, args.concurrency)
                wall = time.perf_counter() - t0
            ttfts = [o.ttft for o in outcomes if o.ttft is not None]
            rows.append((policy, shares(outcomes), pct(ttfts, 50), pct(ttfts, 99), args.requests / wall))
    finally:
        doubles.call("speed", host=SLOW, factor=1.0)
    print(f"\n## slow: {SLOW} five times slower")
    print(f"{args.requests} requests, {args.concurrency} at a time\n")
    print("| policy | " + " | ".join(HOSTS) + " | TTFT p50 | TTFT p99 | requests/s |")
    print("|---|" + "---:|" * (len(HOSTS) + 3))
    for policy, got, p50, p99, rate in rows:
        cells = " | ".join(f"{got[h]:.1%}" for h in HOSTS)
        print(f"| {policy} | {cells} | {ms(p50)} | {ms(p99)} | {rate:.0f} |")


async def scenario_kill(args: argparse.Namespace, doubles: DoubleProcess, port: int) -> None:
    events = Recorder()
    killed_url = f"http://{KILLED}:{port}"
    marks: dict[str, float] = {}
    requests = args.requests * 2

    async def during(n: int) -> None:  # each n comes once
        if n == requests // 3:
            marks["stop"] = (await asyncio.to_thread(doubles.call, "stop", host=KILLED))["at"]
        elif n == 2 * requests // 3:
            marks["start"] = (await asyncio.to_thread(doubles.call, "start", host=KILLED))["at"]

    async with make_client(port, rng_seed=3, events=events) as client:
        t0 = time.monotonic()
        outcomes = await run_load(client, requests, args.concurrency, during=during)
        wall = time.monotonic() - t0
    failed = [o for o in outcomes if o.failed_before_first_token]
    cut = [o for o in outcomes if o.cut_after_first_token]
    changes = [(at, ejected) for at, url, ejected in events.changes if url == killed_url]
    ejected_at = next((at for at, e in changes if e and at >= marks["stop"]), None)
    readmitted_at = next((at for at, e in changes if not e and at >= marks["start"]), None)
    served_after = sum(1 for o in outcomes[2 * requests // 3 + args.concurrency :] if o.replica == KILLED)
    print(f"\n## kill: {KILLED} stopped mid-run, then started again")
    print(f"{requests} requests, {args.concurrency} at a time, {wall:.1f} s; default --health-interval 2, "
          "--eject-seconds 1\n")  # fmt: skip
    print("| | |\n|---|---:|")
    print(f"| requests failed before their first token | {len(failed)} |")
    print(f"| streams cut after their first token (in flight on it when it stopped) | {len(cut)} |")
    print(f"| failovers away from it | {events.failovers[killed_url]} |")
    late = "never" if ejected_at is None else ms(ejected_at - marks["stop"])
    back = "never" if readmitted_at is None else f"{readmitted_at - marks['start']:.2f} s"
    print(f"| ejected after the stop | {late} |")
    print(f"| re-admitted after the start | {back} |")
    print(f"| requests it served after its return | {served_after} |")
    if failed:
        print("\nfailures:", Counter(o.failed_before_first_token for o in failed).most_common(3))


async def scenario_affinity(args: argparse.Namespace, doubles: DoubleProcess, port: int) -> None:
    from tgi_gateway.tgi.replicas import affinity_key

    prefixes = [
        affinity_key(
            [{"role": "system", "content": f"You are assistant number {i}."}],
            [{"type": "function", "function": {"name": f"tool_{i}", "parameters": {"type": "object"}}}],
        )
        for i in range(args.prefixes)
    ]
    weights = [1 / (i + 1) for i in range(args.prefixes)]  # Zipf-like: a few hot prefixes, a long tail
    rows = []
    for label, use_key in (("affinity (bounded loads, c = 1.25)", True), ("load only (no key)", False)):
        draw = random.Random(5)
        chosen = [draw.choices(range(args.prefixes), weights)[0] for _ in range(args.requests)]

        def prefix_of(n: int, chosen: list[int] = chosen, use_key: bool = use_key) -> tuple[int, int | None]:
            return chosen[n], prefixes[chosen[n]] if use_key else None

        async with make_client(port, rng_seed=4) as client:
            outcomes = await run_load(client, args.requests, args.concurrency, prefix_of=prefix_of)
        last: dict[int, str] = {}  # prefix → the replica that served it last (in the order sent)
        again = same = 0
        for outcome in outcomes:
            if outcome.replica is None or outcome.prefix is None:
                continue
            if outcome.prefix in last:
                again += 1
                same += last[outcome.prefix] == outcome.replica
            last[outcome.prefix] = outcome.replica
        rows.append((label, same / again, shares(outcomes)))
    print(f"\n## affinity: {args.prefixes} prefixes (tools + system prompt), Zipf-like popularity")
    print(f"{args.requests} requests, {args.concurrency} at a time\n")
    print("| routing | same replica as the prefix's previous request | " + " | ".join(HOSTS) + " |")
    print("|---|---:|" + "---:|" * len(HOSTS))
    for label, hit, got in rows:
        print(f"| {label} | {hit:.1%} | " + " | ".join(f"{got[h]:.1%}" for h in HOSTS) + " |")


SCENARIOS = {
    "even": scenario_even,
    "slow": scenario_slow,
    "kill": scenario_kill,
    "affinity": scenario_affinity,
}


async def bench(args: argparse.Namespace) -> int:
    argv = [__file__, "--serve-doubles", "--ttft-ms", str(args.ttft_ms), "--token-ms", str(args.token_ms),
            "--tokens", str(args.tokens)]  # fmt: skip
    with DoubleProcess(argv) as doubles:
        port = int(doubles.url.rsplit(":", 1)[1])
        print(f"# four TGI doubles on {', '.join(HOSTS)}:{port}; first token {args.ttft_ms} ms × (1 + in flight "
              f"/ 8), {args.tokens} tokens {args.token_ms} ms apart")  # fmt: skip
        for name in args.scenario or list(SCENARIOS):
            doubles.call("reset")
            await SCENARIOS[name](args, doubles, port)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", action="append", choices=list(SCENARIOS), help="repeatable (default: all)")
    p.add_argument("--requests", type=int, default=1500)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--prefixes", type=int, default=16)
    p.add_argument("--ttft-ms", type=float, default=20.0)
    p.add_argument("--token-ms", type=float, default=10.0)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--serve-doubles", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_doubles:
        return serve_doubles(args)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(bench(args))


if __name__ == "__main__":
    sys.exit(main())
