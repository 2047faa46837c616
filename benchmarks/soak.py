"""Soak: minutes of mixed traffic through the real gateway process; do its memory and descriptors stay flat?

A leak per request (a task, a buffer, an upstream response never closed, a socket left in CLOSE_WAIT) does not
show in a benchmark of seconds, and takes a gateway down after days. So this drives ``--minutes`` (10) of mixed
traffic at ``--concurrency`` (8) through ``server_tgi.py --no-launch`` and the TGI double (its own process):

* streamed and non-streamed answers, text and tool calls (the answers of ``bench_gateway.py``, ``--tokens``
  each, ``--token-delay-ms`` apart), every one checked (content, tool call, ``[DONE]``);
* clients that go away after the first chunk, or at a random moment (before the answer starts, while TGI
  queues or generates, mid-stream, after the end; streams and non-streams), or half-way through sending their
  request body; TGI failing mid-answer (a generation error, and a reset connection) on streams and
  non-streams; requests the gateway refuses with a 400 before they reach TGI.

Every ``--sample-seconds`` (2) it reads the gateway's RSS (``VmRSS`` in ``/proc/<pid>/status``) and its open
descriptors (``/proc/<pid>/fd``). The first ``min(60 s, 10 %)`` of the run is warm-up (imports finishing,
allocator arenas, the connection pool filling); the *baseline* is the next ``min(60 s, 20 %)``, the *end* the
last ``min(60 s, 20 %)`` (for 10 minutes: warm-up 0-60 s, baseline 60-120 s, end 540-600 s). In traffic the
descriptor count moves with the requests in flight, so descriptors are also counted at two quiet moments,
after the warm-up and at the end (traffic paused, in-flight requests done, our connections closed): client
sockets, sockets to TGI, and everything else.

PASS when: RSS grew less than 5 % from the baseline to the end (medians); at the end's quiet moment no client
socket is left, the sockets to TGI are within the pool's keep-alive limit, and there are no more other
descriptors than at the baseline's; and every request got the answer expected of it. Exit status 1 on FAIL.
Run from the repository root::

    .venv/bin/python benchmarks/soak.py                     # 10 minutes
    .venv/bin/python benchmarks/soak.py --minutes 1         # a short run
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from _common import MODEL, DoubleProcess, Exchange, GatewayProcess, RawClient, tag, tagged_double
from bench_gateway import TOOL, answer_pieces

RSS_GROWTH_LIMIT = 0.05
REQUEST_TIMEOUT = 15.0


@dataclass(frozen=True)
class Kind:
    """One kind of request of the mix: the double's script, stream or not, how often, what must come back."""

    script: str
    stream: bool
    weight: int
    # "text", "tool", "leave" (the client goes away after the first chunk), "leave-any" (at a random moment:
    # while TGI queues, mid-answer, after the end), "leave-body" (half-way through its request body), "error"
    # (event, 502; 503 for a drop), "400"
    expect: str


KINDS = {
    "stream-text": Kind("text", True, 24, "text"),
    "stream-tool": Kind("tool", True, 18, "tool"),
    "text": Kind("text", False, 14, "text"),
    "tool": Kind("tool", False, 10, "tool"),
    "leave": Kind("text", True, 12, "leave"),
    "stream-leave-any": Kind("text", True, 10, "leave-any"),
    "leave-any": Kind("text", False, 6, "leave-any"),
    "leave-body": Kind("text", True, 4, "leave-body"),
    "stream-fail": Kind("fail", True, 5, "error"),
    "fail": Kind("fail", False, 3, "error"),
    "stream-drop": Kind("drop", True, 5, "error"),
    "drop": Kind("drop", False, 3, "error"),
    "bad": Kind("text", True, 6, "400"),
}


def scripts(tokens: int) -> dict[str, list[Any]]:
    text, _ = answer_pieces("text", tokens)
    tool, _ = answer_pieces("tool", tokens)
    half = len(text) // 2
    return {
        "text": text,
        "tool": tool,
        "fail": [*text[:half], {"fail": "CUDA out of memory. Tried to allocate 2.00 GiB"}],
        "drop": [*text[:half], {"drop": True}],
    }


def request_body(kind: Kind, n: int) -> bytes:
    if kind.expect == "400":
        return orjson.dumps({"model": MODEL, "messages": [], "stream": kind.stream})  # refused: no messages
    messages = [{"role": "user", "content": f"What is the weather like in Paris? {tag(kind.script, n)}"}]
    return orjson.dumps({"model": MODEL, "messages": messages, "tools": [TOOL], "stream": kind.stream})


# --------------------------------------------------------------------------------------------
# One request, checked
# --------------------------------------------------------------------------------------------


def answer_of(events: list[dict]) -> tuple[str, list[dict]]:
    """Content and tool calls (name, arguments) of a streamed answer's chunks."""
    content, calls = "", []
    for event in events:
        for choice in event.get("choices") or ():
            delta = choice.get("delta") or {}
            content += delta.get("content") or ""
            for call in delta.get("tool_calls") or ():
                if call.get("id"):
                    calls.append({"name": call["function"]["name"], "arguments": ""})
                calls[-1]["arguments"] += call["function"].get("arguments") or ""
    return content, calls


def check(
    kind: Kind, status: int, message: dict | None, error: dict | None, done: bool, expected: str
) -> str | None:
    """None when the answer is the one expected of ``kind``, else what is wrong with it."""
    if kind.expect == "400":
        return None if status == 400 and error else f"expected a 400, got {status} {error}"
    if kind.expect == "error":
        if kind.stream:
            return (
                None
                if status == 200 and error and not done
                else f"expected an error event, got {status} {error}"
            )
        # 502: TGI's answer was cut. 503: TGI closed the connection without any answer, which the gateway
        # cannot tell from a connection that never carried the request: it was sent again (--connect-retries)
        # and TGI, which drops every attempt here, was then reported unreachable (docs/architecture.md).
        ok = status in (502, 503) if kind.script == "drop" else status == 502
        return None if ok and error else f"expected a 502, got {status} {error}"
    if status != 200 or error or message is None or (kind.stream and not done):
        return f"expected an answer, got {status} {error} (done={done})"
    if kind.expect == "text":
        return None if message.get("content") == expected else f"content {message.get('content')!r}"
    calls = message.get("tool_calls") or []
    try:
        ok = len(calls) == 1 and orjson.loads(calls[0]["arguments"])["location"] == "Paris, France"
    except (orjson.JSONDecodeError, KeyError, TypeError):
        ok = False
    return None if ok else f"tool calls {calls!r}"


async def leave_after_first_chunk(ex: Exchange) -> str | None:
    if ex.status != 200:
        return f"expected a stream, got {ex.status}"
    async for ev, _ in RawClient.events(ex):
        if ev.startswith(b"data: {") and b'"content":"' in ev and b'"content":""' not in ev:
            ex.abort()
            return None
    return "the stream ended before any content"


async def leave_at_random(
    client: RawClient, kind: Kind, body: bytes, within: float, rng: random.Random
) -> None:
    """Send the request (``leave-body``: its head and half its body) on a new connection, then go away after
    a random time up to ``within`` seconds, whatever has arrived by then."""
    if kind.expect == "leave-body":
        reader, writer = await client._connect()
        writer.write(client._head("/v1/chat/completions", body, "POST") + body[: len(body) // 2])
        ex = Exchange(reader, writer, time.perf_counter())
    else:
        ex = await client.send("/v1/chat/completions", body, fresh=True)
    await asyncio.sleep(rng.uniform(0, within))
    ex.abort()
    ex.writer.close()


async def one(
    client: RawClient, name: str, n: int, expected_text: str, rng: random.Random, answer_seconds: float
) -> str | None:
    """Send one request of kind ``name``; None when it was answered as expected, else what went wrong."""
    kind = KINDS[name]
    if kind.expect in ("leave-any", "leave-body"):
        await leave_at_random(client, kind, request_body(kind, n), answer_seconds * 1.2, rng)
        return None
    ex = await client.request("/v1/chat/completions", request_body(kind, n))
    try:
        if kind.expect == "leave":
            return await leave_after_first_chunk(ex)
        events, done, error, message = [], False, None, None
        if ex.chunked and ex.status == 200:
            async for ev, _ in RawClient.events(ex):
                if ev == b"data: [DONE]":
                    done = True
                elif ev.startswith(b"data: "):
                    events.append(orjson.loads(ev[6:]))
            error = next((e["error"] for e in events if "error" in e), None)
            content, calls = answer_of(events)
            message = {
                "content": content,
                "tool_calls": calls and [{"arguments": c["arguments"]} for c in calls],
            }
        else:
            body = orjson.loads(b"".join([chunk async for chunk in RawClient.chunks(ex)]) or b"{}")
            error = body.get("error")
            message = (body.get("choices") or [{}])[0].get("message")
            if message and message.get("tool_calls"):
                message["tool_calls"] = [c["function"] for c in message["tool_calls"]]
        client.release(ex)
        return check(kind, ex.status, message, error, done, expected_text)
    except BaseException:
        ex.writer.close()
        raise


# --------------------------------------------------------------------------------------------
# The gateway's memory and descriptors
# --------------------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_census(pid: int, gateway_port: int, tgi_port: int) -> Counter[str]:
    """The gateway's descriptors by kind: ``clients`` (accepted connections), ``upstream`` (to TGI; those TGI
    closed and the gateway did not are also ``upstream-close-wait``), ``other`` (listening socket, event loop,
    pipes, files ...)."""
    sockets: dict[str, tuple[int, int, str]] = {}  # inode -> (local port, remote port, state)
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in f.read().splitlines()[1:]:
                cols = line.split()
                local, remote, state, inode = cols[1], cols[2], cols[3], cols[9]
                sockets[inode] = (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16), state)
    census: Counter[str] = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        local, remote, state = sockets.get(target.removeprefix("socket:[").rstrip("]"), (0, 0, ""))
        if local == gateway_port and remote != 0:
            census["clients"] += 1
        elif remote == tgi_port:
            census["upstream"] += 1
            census["upstream-close-wait"] += state == "08"  # TCP_CLOSE_WAIT
        else:
            census["other"] += 1
    return census


@dataclass
class Sample:
    t: float  # seconds since the start of the traffic
    rss_kib: int
    fds: int


@dataclass
class Soak:
    """The run's state: the traffic's switch, its tallies, the samples."""

    args: argparse.Namespace
    double: DoubleProcess
    gateway: GatewayProcess
    go: asyncio.Event = field(default_factory=asyncio.Event)
    in_flight: int = 0
    counter: int = 0
    done: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    double_outcomes: Counter[str] = field(default_factory=Counter)
    samples: list[Sample] = field(default_factory=list)
    clients: list[RawClient] = field(default_factory=list)

    async def worker(self, seed: int, until: float, expected_text: str) -> None:
        rng = random.Random(seed)
        names, weights = list(KINDS), [k.weight for k in KINDS.values()]
        client = RawClient(self.gateway.url)
        self.clients.append(client)
        while time.monotonic() < until:
            await self.go.wait()
            name = rng.choices(names, weights)[0]
            self.counter += 1
            self.in_flight += 1
            try:
                answer_seconds = self.args.tokens * self.args.token_delay_ms / 1000
                wrong = await asyncio.wait_for(
                    one(client, name, self.counter, expected_text, rng, answer_seconds), REQUEST_TIMEOUT
                )
            except Exception as exc:  # noqa: BLE001 - counted: a soak reports, it does not stop at the first
                wrong = f"{type(exc).__name__}: {exc}"
            finally:
                self.in_flight -= 1
            self.done[name] += 1
            if wrong is not None:
                self.unexpected[name] += 1
                if len(self.examples) < 5:
                    self.examples.append(f"{name}: {wrong[:300]}")

    async def sampler(self, start: float, until: float) -> None:
        last_print = start
        while time.monotonic() < until:
            now = time.monotonic()
            self.samples.append(Sample(now - start, rss_kib(self.gateway.pid), fd_count(self.gateway.pid)))
            self.double_outcomes.update(
                self.double.call("forget")["outcomes"]
            )  # keeps the double's memory flat
            if now - last_print >= 30:
                last_print = now
                s = self.samples[-1]
                print(f"# {s.t:5.0f} s: RSS {s.rss_kib / 1024:.1f} MiB, {s.fds} fds, "
                      f"{sum(self.done.values())} requests", flush=True)  # fmt: skip
            await asyncio.sleep(self.args.sample_seconds)

    async def quiet_census(self) -> Counter[str]:
        """Pause the traffic, let in-flight requests end, close our connections: then count descriptors."""
        self.go.clear()
        deadline = time.monotonic() + REQUEST_TIMEOUT + 5
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for client in self.clients:
            await client.aclose()
        await asyncio.sleep(0.5)  # the gateway sees our FINs and closes its ends
        census = fd_census(self.gateway.pid, self.gateway.port, int(self.double.url.rsplit(":", 1)[1]))
        self.go.set()
        return census


def windows(seconds: float) -> tuple[float, float]:
    """(warm-up, window) lengths: 60 s each for long runs, 10 % and 20 % of a short one."""
    return min(60.0, 0.1 * seconds), min(60.0, 0.2 * seconds)


def median_of(samples: list[Sample], lo: float, hi: float, value: Callable[[Sample], float]) -> float:
    picked = [value(s) for s in samples if lo <= s.t < hi]
    return statistics.median(picked) if picked else float("nan")


async def run(args: argparse.Namespace, double: DoubleProcess, gateway: GatewayProcess) -> bool:
    double.call("scripts", scripts=scripts(args.tokens))
    double.call("set", token_delay=args.token_delay_ms / 1000)
    expected_text = "".join(scripts(args.tokens)["text"][:-1]).strip()
    soak = Soak(args, double, gateway)
    seconds = args.minutes * 60
    warm, window = windows(seconds)
    start = time.monotonic()
    until = start + seconds
    soak.go.set()
    workers = [
        asyncio.create_task(soak.worker(args.seed + i, until, expected_text)) for i in range(args.concurrency)
    ]
    sampler = asyncio.create_task(soak.sampler(start, until))
    await asyncio.sleep(warm)
    quiet0 = await soak.quiet_census()
    base_lo = time.monotonic() - start
    await asyncio.gather(*workers)
    await sampler
    quiet1 = await soak.quiet_census()
    soak.double_outcomes.update(double.call("forget")["outcomes"])

    s = soak.samples
    rss0 = median_of(s, base_lo, base_lo + window, lambda x: x.rss_kib) / 1024
    rss1 = median_of(s, seconds - window, seconds, lambda x: x.rss_kib) / 1024
    fds0 = median_of(s, base_lo, base_lo + window, lambda x: x.fds)
    fds1 = median_of(s, seconds - window, seconds, lambda x: x.fds)
    growth = (rss1 - rss0) / rss0
    # idle sockets the gateway may keep in its one pool: one per request in flight at most, plus one each for
    # /health and /info, which may overlap with them
    keep = args.concurrency + 2
    total = sum(soak.done.values())
    print(f"\n{total:,} requests in {seconds:g} s ({total / seconds:.1f}/s) at concurrency {args.concurrency}, "
          f"{args.tokens} tokens {args.token_delay_ms:g} ms apart; {len(s)} samples")  # fmt: skip
    print("\n| kind | requests | unexpected |\n|---|---:|---:|")
    for name in KINDS:
        print(f"| {name} | {soak.done[name]:,} | {soak.unexpected[name]} |")
    print(f"\nthe double saw: {dict(soak.double_outcomes)}")
    for example in soak.examples:
        print(f"  unexpected: {example}")
    print(f"\n| gateway | baseline ({base_lo:.0f}-{base_lo + window:.0f} s) | end ({seconds - window:.0f}-{seconds:.0f} s) "
          f"| change |\n|---|---:|---:|---:|")  # fmt: skip
    print(f"| RSS, median (MiB) | {rss0:.1f} | {rss1:.1f} | {growth:+.1%} |")
    print(f"| descriptors in traffic, median | {fds0:g} | {fds1:g} | {fds1 - fds0:+g} |")
    labels = {"clients": "client connections", "upstream": "connections to TGI",
              "upstream-close-wait": "... of them closed by TGI (CLOSE_WAIT)", "other": "other descriptors"}  # fmt: skip
    for key, label in labels.items():
        print(f"| quiet moment: {label} | {quiet0[key]} | {quiet1[key]} | {quiet1[key] - quiet0[key]:+d} |")
    checks = {
        f"RSS growth {growth:+.1%} < {RSS_GROWTH_LIMIT:.0%}": growth < RSS_GROWTH_LIMIT,
        "no client socket left once the clients closed theirs": quiet1["clients"] == 0,
        f"sockets to TGI within the pool's keep-alive limit ({keep}), none in CLOSE_WAIT": quiet1["upstream"]
        <= keep
        and quiet1["upstream-close-wait"] == 0,
        "no more other descriptors than at the baseline": quiet1["other"] <= quiet0["other"],
        "every request answered as expected": not soak.unexpected and total > 0,
    }
    print()
    for what, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}: {what}")
    return all(checks.values())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="length of the traffic (10)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (8)")
    p.add_argument("--tokens", type=int, default=32, help="tokens per answer (32)")
    p.add_argument("--token-delay-ms", type=float, default=10.0, help="between two tokens (10)")
    p.add_argument("--sample-seconds", type=float, default=2.0, help="between two samples of RSS and fds (2)")
    p.add_argument("--seed", type=int, default=1, help="of the traffic mix (1)")
    args = p.parse_args()
    with tagged_double() as double, GatewayProcess(double.url) as gateway:
        gateway.wait_healthy()
        ok = asyncio.run(asyncio.wait_for(run(args, double, gateway), args.minutes * 60 + 120))
        if gateway.proc.poll() is not None:
            print(f"FAIL: the gateway exited:\n{gateway.log_tail()}")
            ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
