"""The attacks of issue 11, replayed against the real gateway with ``/health`` probed from another process.

Each attack runs against a gateway process (``server_tgi.py --no-launch``, the real CLI) while a prober in
its own process asks ``GET /health`` every 100 ms on a fresh connection and records each latency and failure.
Per attack: the gateway's RSS before, the attack, a settling wait (until RSS is back within 10 % of the
baseline, at most ``--settle`` seconds), RSS after; the answer (status / closed / reset), its time, the
prober's slowest answer and its failures during the attack and the settling, and for the connection floods
whether chat requests (one every 200 ms, each on a new connection) kept succeeding meanwhile.

Three gateways, default flags unless said:

* ``main``: in front of the TGI double (``tests/fakes/tgi.py``) in its own process, with Llama 3.1's context
  (``max_input_tokens`` 131071, ``--payload-limit`` 64 MB) so that no honest large body is refused for its
  length before the gateway has done its work on it.
* ``capped``: the same, started under ``ulimit -n 1024`` (soft and hard, set on the process right after it
  is spawned, before Python has started), as in the issue: the default connection cap is then
  (1024 - 64) / 2 = 480 and the flood is larger than it.
* ``longline``: in front of a raw-socket fake TGI in its own process (``--serve-raw-tgi``) whose
  ``/generate_stream`` answers one SSE line of ``--line-mib`` MiB (80) without a newline, then ends.

The attacks (sizes of the issue; ``--quick``: small ones, and ``--head-timeout 1 --body-timeout 1`` on every
gateway so that the slow-client attacks end in a second):

=================  ===========================================================================================
``ref11``          one 1.2 KB tool, 11 ``$defs`` each referring to the next twice (expanded: a 281 KB prompt)
``ref11x100``      100 such tools in one body
``ref16x20``       20 requests at once, each one tool of 16 such levels
``tools-max``      as many tiny tools as fit in 4 MiB (57,607 of this shape; the issue had ~82k)
``messages-max``   as many short messages as fit in 4 MiB (111,846 of this shape; the issue had ~123k)
``messages-fit``   26,000 messages of 119 characters (3.8 MiB): as many as the gateway's floor of tokens per
                   message lets into Llama 3.1's context, so normalised, rendered and sent to TGI
``header-128M``    one 128 MiB header (sent while the answer is read)
``headers-100k``   100,000 headers
``silent-1000``    1,000 connections that never send a byte; chat requests meanwhile
``silent-capped``  1,100 silent connections to the ``capped`` gateway (cap 480); chat requests meanwhile
``slowloris``      100 connections sending their head at 1 byte/s; chat requests meanwhile
``body-trickle``   100 requests whose body arrives at 1 byte/s; chat requests meanwhile
``sse-line``       a streamed chat request whose TGI answer is one 80 MiB line without a newline
``bool-ints``      ``"top_k": true`` and ``"max_tokens": true``
=================  ===========================================================================================

Targets (issue 11, "Done when"): the prober's slowest answer during each attack within ``--bound-ms`` (100)
and no probe failed; RSS after within 10 % of RSS before; every chat request during a flood succeeded; and the
answer each defence promises (400, 431, closed, 408, 502: in each attack's code). Exit status 1 when any
target is missed, each miss printed. Runs from any directory (~1.5 minutes: the slow-client attacks wait out
the default timeouts; results: docs/operations.md, "Attacks replayed (issue 11)")::

    .venv/bin/python benchmarks/attack.py --json attack.json
    .venv/bin/python benchmarks/attack.py --quick --attack ref11 --attack slowloris   # (the test's kind)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bench_admission as ba
from _common import GATEWAY_ARGS, MODEL, ROOT, DoubleProcess, GatewayProcess, die_with_parent, serve_commands

if TYPE_CHECKING:
    from typing import Self

SELF = str(Path(__file__).resolve())
PROBE_INTERVAL = 0.1
PROBE_TIMEOUT = 10.0
CHAT_INTERVAL = 0.2
RSS_MARGIN = 0.10
LONG_CONTEXT = 131_071
MIB = 1 << 20
CHAT = json.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16}
).encode()

# --------------------------------------------------------------------------------------------
# Child processes: the double, the raw fake TGI, the prober
# --------------------------------------------------------------------------------------------


def serve_double() -> int:
    """``--serve-double``: the TGI double with Llama 3.1's context and a 64 MB payload limit."""
    sys.path.insert(0, str(ROOT))
    from tests.fakes.tgi import FakeTGI

    tgi = FakeTGI(max_input_tokens=LONG_CONTEXT, max_total_tokens=LONG_CONTEXT + 1, payload_limit=64 * MIB,
                  max_concurrent_requests=100_000, model_id="meetkai/functionary-small-v3.1")  # fmt: skip
    return serve_commands(tgi, {})


def serve_raw_tgi(line_mib: int) -> int:
    """``--serve-raw-tgi``: a fake TGI on plain sockets whose ``/generate_stream`` is one SSE line of
    ``line_mib`` MiB without a newline (chunked, then the terminator); ``/health`` and ``/info`` as TGI's.
    Command ``sent``: how many bytes of the line each stream got written before the gateway closed it."""
    sys.path.insert(0, str(ROOT))
    from tests.fakes.tgi import _INFO_FIELDS, TGIConfig

    config = TGIConfig(model_id="meetkai/functionary-small-v3.1")
    info = {name: getattr(config, name, None) for name in _INFO_FIELDS} | {"router": "text-generation-router"}
    info_body = json.dumps(info).encode()
    streams: list[dict[str, Any]] = []
    piece = b"a" * MIB

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock: socket.socket = self.request
            buf = b""
            while True:
                while b"\r\n\r\n" not in buf:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                _method, path = lines[0].split()[:2]
                length = next((int(v) for k, _, v in (ln.partition(":") for ln in lines[1:])
                               if k.strip().lower() == "content-length"), 0)  # fmt: skip
                while len(buf) < length:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                buf = buf[length:]
                if path == "/generate_stream":
                    self.long_line(sock)
                    return
                body = info_body if path == "/info" else b""
                status = "200 OK" if path in ("/info", "/health") else "404 Not Found"
                sock.sendall(f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
                             f"content-length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip

        def long_line(self, sock: socket.socket) -> None:
            record = {"sent": 0, "total": line_mib * MIB, "closed_by_gateway": False, "t0": time.monotonic()}
            streams.append(record)
            try:
                sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n")  # fmt: skip
                start = b'data: {"index":1,"token":{"id":1,"text":"'
                sock.sendall(b"%x\r\n%s\r\n" % (len(start), start))
                for _ in range(line_mib):
                    sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                    record["sent"] += len(piece)
                sock.sendall(b"0\r\n\r\n")
            except OSError:
                record["closed_by_gateway"] = True
            record["t1"] = time.monotonic()

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    class Tgi:
        url = f"http://127.0.0.1:{server.server_address[1]}"

        def start(self) -> None:
            pass

        def stop(self) -> None:
            server.shutdown()

        def reset(self) -> None:
            streams.clear()

    return serve_commands(Tgi(), {"sent": lambda cmd: list(streams)})


def probe(url: str, interval: float) -> int:
    """``--probe URL``: ``GET /health`` every ``interval`` s on a new connection until stdin closes; one JSON
    line per probe: ``[sent (monotonic), latency (s), status (0: failed), error]``."""
    host, port = url.removeprefix("http://").split(":")
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    request = f"GET /health HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
    print("ready", flush=True)
    while not stop.is_set():
        sent = time.monotonic()
        status, error = 0, ""
        try:
            with socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT) as sock:
                sock.settimeout(max(0.001, PROBE_TIMEOUT - (time.monotonic() - sent)))
                sock.sendall(request)
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
            status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
            error = "" if status else "no answer"
        except OSError as exc:
            error = type(exc).__name__
        latency = time.monotonic() - sent
        print(json.dumps([sent, latency, status, error]), flush=True)
        stop.wait(max(0.0, interval - latency))
    return 0


class Prober:
    """The parent's end of :func:`probe`: its samples, collected by a thread as they arrive."""

    def __init__(self, url: str) -> None:
        self.samples: list[list[Any]] = []
        self.proc = subprocess.Popen(
            [sys.executable, SELF, "--probe", url], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            preexec_fn=die_with_parent,  # noqa: PLW1509
        )  # fmt: skip
        assert self.proc.stdout is not None
        self.proc.stdout.readline()  # "ready"
        self.thread = threading.Thread(target=self._collect, daemon=True)
        self.thread.start()

    def _collect(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.samples.append(json.loads(line))

    def window(self, start: float, end: float) -> list[list[Any]]:
        """The probes that overlapped [start, end] (the last one waited for, bounded)."""
        deadline = time.monotonic() + PROBE_TIMEOUT + 1
        while time.monotonic() < deadline and not any(s[0] > end for s in self.samples):
            time.sleep(0.02)
        return [s for s in list(self.samples) if s[0] <= end and s[0] + s[1] >= start]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(PROBE_TIMEOUT + 2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# --------------------------------------------------------------------------------------------
# The client side
# --------------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int  # 0: no HTTP answer
    outcome: str  # "431", "closed" (EOF without an answer), "reset", "timeout"
    seconds: float
    message: str = ""  # the OpenAI error message, if any


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _parse(data: bytes) -> tuple[int, str]:
    if not data.startswith(b"HTTP/1.1 "):
        return 0, ""
    status = int(data.split(b" ", 2)[1])
    body = data.partition(b"\r\n\r\n")[2]
    message = ""
    with contextlib.suppress(ValueError, AttributeError, TypeError, KeyError):
        message = json.loads(body)["error"]["message"]
    return status, message


def post_head(url: str, path: str, length: int, extra: str = "") -> bytes:
    host, port = _host_port(url)
    return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\nConnection: close\r\n{extra}\r\n").encode()  # fmt: skip


async def request(url: str, raw: bytes, timeout: float = 60.0) -> Reply:
    """Send ``raw`` on a new connection, read until the server closes it."""
    t0 = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*_host_port(url), limit=MIB), timeout)
    except (TimeoutError, OSError) as exc:
        return Reply(0, f"connect {type(exc).__name__}", time.monotonic() - t0)
    try:
        writer.write(raw)
        data = await asyncio.wait_for(reader.read(), max(0.001, timeout - (time.monotonic() - t0)))
    except TimeoutError:
        return Reply(0, "timeout", time.monotonic() - t0)
    except OSError:
        return Reply(0, "reset", time.monotonic() - t0)
    finally:
        writer.close()
    status, message = _parse(data)
    return Reply(status, str(status) if status else "closed", time.monotonic() - t0, message)


async def chat(url: str, body: bytes = CHAT, timeout: float = 60.0) -> Reply:
    return await request(url, post_head(url, "/v1/chat/completions", len(body)) + body, timeout)


class ChatLoop:
    """Chat requests one after the other (every ``CHAT_INTERVAL`` s at most), each on a new connection."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.replies: list[Reply] = []
        self.task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            t0 = time.monotonic()
            self.replies.append(await chat(self.url, timeout=10.0))
            await asyncio.sleep(max(0.0, CHAT_INTERVAL - (time.monotonic() - t0)))

    def __enter__(self) -> Self:
        self.task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()

    @property
    def summary(self) -> tuple[int, int]:
        return sum(r.status == 200 for r in self.replies), len(self.replies)


async def streamed_head(url: str, head: bytes, filler: int, tail: bytes, timeout: float) -> tuple[Reply, int]:
    """Send ``head``, then ``filler`` bytes of ``a`` (1 MiB a write), then ``tail``, while reading the answer:
    the reply (its time: to the status line) and how many filler bytes were written before the server closed."""
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection(*_host_port(url), limit=MIB)
    sent = 0

    async def send() -> None:
        nonlocal sent
        writer.write(head)
        piece = b"a" * MIB
        while sent < filler:
            n = min(MIB, filler - sent)
            writer.write(piece[:n])
            await writer.drain()
            sent += n
        writer.write(tail)
        await writer.drain()

    sender = asyncio.ensure_future(send())
    try:
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        seconds = time.monotonic() - t0
        rest = await asyncio.wait_for(reader.read(), 5.0)
        status, message = _parse(first + rest)
        reply = Reply(status, str(status), seconds, message)
    except asyncio.IncompleteReadError:
        reply = Reply(0, "closed", time.monotonic() - t0)
    except TimeoutError:
        reply = Reply(0, "timeout", time.monotonic() - t0)
    except OSError:
        reply = Reply(0, "reset", time.monotonic() - t0)
    with contextlib.suppress(OSError, asyncio.TimeoutError, asyncio.CancelledError):
        await asyncio.wait_for(sender, 5.0)
    sender.cancel()
    writer.close()
    return reply, sent


# --------------------------------------------------------------------------------------------
# The attacks
# --------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    answer: str  # e.g. "400 x20: Invalid schema in ..." or "closed x1000 by 10.0 s"
    seconds: float  # the time to the (last) answer
    expected_ok: bool
    chat: tuple[int, int] | None = None  # ok, total: floods only
    detail: dict[str, Any] = field(default_factory=dict)


def shorten(text: str, width: int = 80) -> str:
    return text if len(text) <= width else text[:width].rsplit(" ", 1)[0] + " …"


def summarize(replies: list[Reply], expected: set[str]) -> Outcome:
    counts = Counter(r.outcome for r in replies)
    answer = ", ".join(f"{k} x{v}" if len(replies) > 1 else k for k, v in counts.most_common())
    message = next((r.message for r in replies if r.message), "")
    if message:
        answer += f": {shorten(message)}"
    return Outcome(answer, max(r.seconds for r in replies), set(counts) <= expected,
                   detail={"outcomes": dict(counts), "message": message})  # fmt: skip


@dataclass
class Ctx:
    url: str
    quick: bool
    head_timeout: float
    body_timeout: float
    double: DoubleProcess | None = None


async def bodies(ctx: Ctx, body: bytes, n: int, expected: set[str]) -> Outcome:
    head = post_head(ctx.url, "/v1/chat/completions", len(body))
    replies = await asyncio.gather(*(request(ctx.url, head + body) for _ in range(n)))
    out = summarize(list(replies), expected)
    out.detail["body_bytes"] = len(body)
    return out


def body_of(case: dict[str, Any]) -> bytes:
    return json.dumps(case).encode()


async def ref11(ctx: Ctx) -> Outcome:
    return await bodies(ctx, body_of(ba.CASES["ref11"]()), 1, {"400"})


async def ref11x100(ctx: Ctx) -> Outcome:
    n = 10 if ctx.quick else 100
    return await bodies(ctx, body_of(ba._body([ba._tool(f"f{i}", ba.doubling(11, str(i))) for i in range(n)])), 1,
                        {"400"})  # fmt: skip


async def ref16x20(ctx: Ctx) -> Outcome:
    return await bodies(ctx, body_of(ba.CASES["ref16"]()), 4 if ctx.quick else 20, {"400"})


async def tools_max(ctx: Ctx) -> Outcome:
    case = ba._body([ba._tool(f"f{i}") for i in range(2000)]) if ctx.quick else ba.CASES["tools-max"]()
    out = await bodies(ctx, body_of(case), 1, {"400"})
    out.detail["tools"] = len(case["tools"])
    return out


async def messages_max(ctx: Ctx) -> Outcome:
    if ctx.quick:
        case = ba._body(
            None, [{"role": "user" if i % 2 == 0 else "assistant", "content": "Hi"} for i in range(2001)]
        )
    else:
        case = ba.CASES["messages-max"]()
    # 200, or TGI's 400 when the prompt is longer than its context in tokens (the double counts ~6 tokens a
    # message: ~123k messages do not fit 128k tokens, as with a real tokenizer); either way after the gateway
    # normalised, rendered and sent the whole prompt
    out = await bodies(ctx, body_of(case), 1, {"200", "400"})
    out.detail["messages"] = len(case["messages"])
    return out


async def messages_fit(ctx: Ctx) -> Outcome:
    case = ba.CASES["messages-fit"]()
    if ctx.quick:
        case["messages"] = case["messages"][:2001]
    # past the gateway's floor of tokens per message: normalised, rendered (a 4.4 M-character prompt) and sent;
    # TGI, which counts the tokens, refuses it (~36 tokens a message in the double, as with a real tokenizer)
    out = await bodies(ctx, body_of(case), 1, {"200", "400"})
    out.detail["messages"] = len(case["messages"])
    return out


async def header_big(ctx: Ctx) -> Outcome:
    size = (2 if ctx.quick else 128) * MIB
    host, port = _host_port(ctx.url)
    head = f"GET /v1/models HTTP/1.1\r\nHost: {host}:{port}\r\nX-Big: ".encode()
    reply, sent = await streamed_head(ctx.url, head, size, b"\r\n\r\n", 60.0)
    out = summarize([reply], {"431"})
    out.detail["header_bytes_written_before_close"] = sent
    return out


async def headers_many(ctx: Ctx) -> Outcome:
    n = 1000 if ctx.quick else 100_000
    host, port = _host_port(ctx.url)
    raw = (f"GET /v1/models HTTP/1.1\r\nHost: {host}:{port}\r\n".encode()
           + b"".join(b"X-H%d: v\r\n" % i for i in range(n)) + b"\r\n")  # fmt: skip
    reply, _ = await streamed_head(ctx.url, raw, 0, b"", 60.0)
    return summarize([reply], {"431"})


async def _open(url: str, n: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None]:
    """``n`` connections (at most 200 connecting at once); None for one that could not connect."""
    gate = asyncio.Semaphore(200)

    async def one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        async with gate:
            try:
                return await asyncio.wait_for(asyncio.open_connection(*_host_port(url)), 10.0)
            except (TimeoutError, OSError):
                return None

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def _until_closed(reader: asyncio.StreamReader, t0: float, timeout: float) -> Reply:
    try:
        data = await asyncio.wait_for(reader.read(), timeout)
    except TimeoutError:
        return Reply(0, "still open", time.monotonic() - t0)
    except OSError:
        return Reply(0, "reset", time.monotonic() - t0)
    status, message = _parse(data)
    return Reply(status, str(status) if status else "closed", time.monotonic() - t0, message)


async def silent(ctx: Ctx, n: int) -> Outcome:
    """``n`` connections that send nothing: how the gateway ends them; chat requests meanwhile."""
    with ChatLoop(ctx.url) as loop:
        await asyncio.sleep(0.5)  # a few chat requests before the flood
        t0 = time.monotonic()
        conns = await _open(ctx.url, n)
        opened = time.monotonic() - t0
        replies = await asyncio.gather(*(_until_closed(c[0], t0, ctx.head_timeout + 10) for c in conns if c))
        await asyncio.sleep(0.5)
    for c in conns:
        if c:
            c[1].close()
    refused = sum(c is None for c in conns)
    out = summarize(list(replies) + [Reply(0, "connect failed", 0.0)] * refused, {"closed"})
    early = sum(r.seconds < 0.9 * ctx.head_timeout for r in replies)
    out.answer += f" ({early} before the head timeout: the cap)" if early else ""
    out.chat = loop.summary
    out.detail |= {"opened_in_s": round(opened, 3), "connections": n}
    return out


async def silent_1000(ctx: Ctx) -> Outcome:
    return await silent(ctx, 100 if ctx.quick else 1000)


async def silent_capped(ctx: Ctx) -> Outcome:
    return await silent(ctx, 600 if ctx.quick else 1100)


async def _trickle(url: str, head: bytes, trickle: bytes, t0: float, timeout: float) -> Reply:
    """Send ``head`` at once, then ``trickle`` one byte a second, until the server answers or closes."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*_host_port(url)), 10.0)
    except (TimeoutError, OSError):
        return Reply(0, "connect failed", time.monotonic() - t0)

    async def send() -> None:
        writer.write(head)
        for i in range(len(trickle)):
            await writer.drain()
            writer.write(trickle[i : i + 1])
            await asyncio.sleep(1.0)

    sender = asyncio.ensure_future(send())
    try:
        return await _until_closed(reader, t0, timeout)
    finally:
        sender.cancel()
        with contextlib.suppress(BaseException):
            await sender
        writer.close()


async def slowloris(ctx: Ctx) -> Outcome:
    host, port = _host_port(ctx.url)
    head = f"GET /v1/models HTTP/1.1\r\nHost: {host}:{port}\r\n".encode()
    return await _trickle_flood(ctx, head, b"X-Slow: " + b"a" * 1000, ctx.head_timeout)


async def body_trickle(ctx: Ctx) -> Outcome:
    body = CHAT + b" " * 1000  # a valid body, padded: it never arrives whole
    return await _trickle_flood(
        ctx, post_head(ctx.url, "/v1/chat/completions", len(body)), body, ctx.body_timeout
    )


async def _trickle_flood(ctx: Ctx, head: bytes, trickled: bytes, deadline: float) -> Outcome:
    """Connections that send ``head`` then ``trickled`` one byte at a time, chat requests meanwhile; each
    must end with a 408 by the gateway's ``deadline``."""
    n = 20 if ctx.quick else 100
    with ChatLoop(ctx.url) as loop:
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        replies = await asyncio.gather(
            *(_trickle(ctx.url, head, trickled, t0, deadline + 10) for _ in range(n))
        )
        await asyncio.sleep(0.5)
    out = summarize(list(replies), {"408"})
    out.chat = loop.summary
    return out


async def sse_line(ctx: Ctx) -> Outcome:
    assert ctx.double is not None
    ctx.double.call("reset")
    body = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    ).encode()
    reply = await request(ctx.url, post_head(ctx.url, "/v1/chat/completions", len(body)) + body, 120.0)
    await asyncio.sleep(0.5)
    out = summarize([reply], {"502"})
    streams = await asyncio.to_thread(ctx.double.call, "sent")
    out.detail["tgi_streams"] = streams
    if streams:
        s = streams[0]
        out.answer += f" (TGI wrote {s['sent'] / MIB:.0f} of {s['total'] / MIB:.0f} MiB)"
    return out


async def bool_ints(ctx: Ctx) -> Outcome:
    replies = []
    for name in ("top_k", "max_tokens"):
        body = json.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], name: True}
        ).encode()
        replies.append(await chat(ctx.url, body))
    return summarize(replies, {"400"})


@dataclass(frozen=True)
class Attack:
    key: str
    title: str
    gateway: str  # main | capped | longline
    run: Callable[[Ctx], Awaitable[Outcome]]
    flood: bool = False


ATTACKS = [
    Attack("ref11", "`$ref` x2 per level, 11 levels, one 1.2 KB tool", "main", ref11),
    Attack("ref11x100", "100 such tools in one body", "main", ref11x100),
    Attack("ref16x20", "20 requests at once, 16 levels each", "main", ref16x20),
    Attack("tools-max", "as many tiny tools as fit in 4 MiB", "main", tools_max),
    Attack("messages-max", "as many short messages as fit in 4 MiB", "main", messages_max),
    Attack("messages-fit", "26,000 messages of 119 characters (4 MiB): as many as the token floor lets in", "main", messages_fit),
    Attack("header-128M", "one 128 MiB header", "main", header_big),
    Attack("headers-100k", "100,000 headers", "main", headers_many),
    Attack("silent-1000", "1,000 connections that send nothing", "main", silent_1000, flood=True),
    Attack("silent-capped", "1,100 silent connections, `ulimit -n 1024` (cap 480)", "capped", silent_capped, flood=True),
    Attack("slowloris", "100 heads sent at 1 byte/s", "main", slowloris, flood=True),
    Attack("body-trickle", "100 bodies sent at 1 byte/s", "main", body_trickle, flood=True),
    Attack("sse-line", "TGI streams an 80 MiB line without a newline", "longline", sse_line),
    Attack("bool-ints", '`"top_k": true`, `"max_tokens": true`', "main", bool_ints),
]  # fmt: skip

# --------------------------------------------------------------------------------------------
# Running them
# --------------------------------------------------------------------------------------------


GATEWAYS: dict[str, dict[str, Any]] = {}


@contextlib.contextmanager
def gateway(kind: str, args: argparse.Namespace) -> Iterator[tuple[GatewayProcess, DoubleProcess, Prober]]:
    if kind == "longline":
        double = DoubleProcess([SELF, "--serve-raw-tgi", "--line-mib", str(args.line_mib)])
    else:
        double = DoubleProcess([SELF, "--serve-double"])
    extra = ["--head-timeout", "1", "--body-timeout", "1"] if args.quick else []
    with double, GatewayProcess(double.url, args=[*GATEWAY_ARGS, *extra]) as gw:
        if kind == "capped":  # before the interpreter has started: the gateway sees 1024 from its start
            resource.prlimit(gw.pid, resource.RLIMIT_NOFILE, (1024, 1024))
        gw.wait_healthy()
        limits = Path(f"/proc/{gw.pid}/limits").read_text().splitlines()
        nofile = next((ln.split()[3:5] for ln in limits if ln.startswith("Max open files")), None)
        GATEWAYS[kind] = {"pid": gw.pid, "args": [*GATEWAY_ARGS, *extra], "nofile_soft_hard": nofile}
        print(
            f"# gateway {kind}: pid {gw.pid}, open files (soft, hard) {nofile}, double {double.url}",
            flush=True,
        )
        if kind != "longline":
            warm = asyncio.run(chat(gw.url))  # TGI's /info read, first request's imports
            if warm.status != 200:
                raise RuntimeError(f"warm-up chat request: {warm}\n{gw.log_tail()}")
        prober = Prober(gw.url)
        try:
            time.sleep(0.5)
            yield gw, double, prober
        finally:
            prober.close()


async def settle(pid: int, before: float, seconds: float) -> float:
    """Wait until RSS is within the margin of ``before`` (at most ``seconds``, at least 0.5 s); RSS then."""
    deadline = time.monotonic() + seconds
    await asyncio.sleep(0.5)
    while (rss := rss_mib(pid)) > before * (1 + RSS_MARGIN) and time.monotonic() < deadline:
        await asyncio.sleep(0.25)
    return rss


def run_one(attack: Attack, gw: GatewayProcess, double: DoubleProcess, prober: Prober, args: argparse.Namespace
            ) -> dict[str, Any]:  # fmt: skip
    ctx = Ctx(gw.url, args.quick, 1.0 if args.quick else 10.0, 1.0 if args.quick else 30.0, double)
    before = rss_mib(gw.pid)

    peak = [before]
    stop = threading.Event()

    def sample() -> None:  # a thread: the attack's own coroutines may hold this process's loop
        while not stop.wait(0.02):
            with contextlib.suppress(OSError, RuntimeError):
                peak[0] = max(peak[0], rss_mib(gw.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    async def go() -> tuple[Outcome, float, float, float]:
        start = time.monotonic()
        out = await asyncio.wait_for(attack.run(ctx), args.max_seconds)
        end = time.monotonic()
        after = await settle(gw.pid, before, args.settle)
        return out, start, end, after

    try:
        out, start, end, after = asyncio.run(go())
    finally:
        stop.set()
        sampler.join()
    probes = prober.window(start, time.monotonic())
    worst = max((s[1] for s in probes), default=float("nan")) * 1000
    failed = [s for s in probes if s[2] != 200]
    misses = []
    if not out.expected_ok:
        misses.append(f"answer: {out.answer}")
    if not probes or worst > args.bound_ms or failed:
        misses.append(f"/health max {worst:.0f} ms, {len(failed)} of {len(probes)} probes failed")
    if after > before * (1 + RSS_MARGIN):
        misses.append(f"RSS {before:.0f} -> {after:.0f} MiB (+{100 * (after / before - 1):.0f} %)")
    if out.chat is not None and out.chat[0] != out.chat[1]:
        misses.append(f"chat {out.chat[0]}/{out.chat[1]} succeeded")
    if gw.proc.poll() is not None:
        misses.append(f"the gateway exited ({gw.proc.returncode})")
    row = {
        "attack": attack.key, "title": attack.title, "gateway": attack.gateway, "answer": out.answer,
        "seconds": round(out.seconds, 3), "span_s": round(end - start, 3), "health_max_ms": round(worst, 1),
        "probes": len(probes), "probes_failed": len(failed), "probe_errors": sorted({s[3] for s in failed}),
        "rss_before_mib": round(before, 1), "rss_after_mib": round(after, 1), "rss_peak_mib": round(peak[0], 1), "chat": out.chat,
        "misses": misses, "pass": not misses, "detail": out.detail,
    }  # fmt: skip
    print(f"{attack.key:14} {out.answer[:110]:110} {out.seconds:8.3f} s  /health max {worst:7.1f} ms  "
          f"RSS {before:6.1f} -> {after:6.1f} MiB (peak {peak[0]:.0f})  chat {out.chat}  {'PASS' if not misses else 'MISS'}",
          flush=True)  # fmt: skip
    return row


def table(rows: list[dict[str, Any]], bound_ms: float) -> str:
    out = [
        "| attack | answer | time | `/health` max | RSS before → after (peak) | chat during | target |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        answer = r["answer"].replace("|", "\\|")
        fails = f", {r['probes_failed']} probes failed" if r["probes_failed"] else ""
        chat_ok = f"{r['chat'][0]}/{r['chat'][1]}" if r["chat"] else "—"
        out.append(f"| `{r['attack']}`: {r['title']} | {answer} | {r['seconds']:.3f} s | {r['health_max_ms']:.0f} ms{fails} "
                   f"| {r['rss_before_mib']:.0f} → {r['rss_after_mib']:.0f} ({r.get('rss_peak_mib', 0):.0f}) MiB | {chat_ok} "
                   f"| {'PASS' if r['pass'] else 'MISS'} |")  # fmt: skip
    missed = [r for r in rows if not r["pass"]]
    out.append("")
    for r in missed:
        out.append(f"MISS {r['attack']}: " + "; ".join(r["misses"]))
    out.append(f"{'PASS' if not missed else 'FAIL'}: /health within {bound_ms:g} ms, RSS within "
               f"{RSS_MARGIN:.0%}, chat during floods, expected answers ({len(rows) - len(missed)}/{len(rows)})")  # fmt: skip
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--attack", action="append", choices=[a.key for a in ATTACKS], help="(repeatable) default: all"
    )
    p.add_argument("--quick", action="store_true", help="small sizes, --head-timeout 1 --body-timeout 1")
    p.add_argument("--bound-ms", type=float, default=100.0, help="the /health target (100 ms)")
    p.add_argument("--settle", type=float, default=5.0, help="at most this long for RSS to come back (5 s)")
    p.add_argument("--line-mib", type=int, default=80, help="the SSE line TGI sends, MiB (80)")
    p.add_argument("--max-seconds", type=float, default=120.0, help="give up on one attack after this long")
    p.add_argument("--repeat", type=int, default=1, help="run each attack this many times in a row (1)")
    p.add_argument("--json", type=Path, help="also write the rows to this file")
    p.add_argument("--serve-double", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--serve-raw-tgi", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--probe", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_double:
        return serve_double()
    if args.serve_raw_tgi:
        return serve_raw_tgi(args.line_mib)
    if args.probe:
        return probe(args.probe, PROBE_INTERVAL)
    if args.quick and args.line_mib == 80:
        args.line_mib = 8
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this process opens the floods
    chosen = [a for a in ATTACKS if not args.attack or a.key in args.attack]
    rows: dict[str, list[dict[str, Any]]] = {}
    for kind in ("main", "capped", "longline"):
        group = [a for a in chosen if a.gateway == kind]
        if not group:
            continue
        with gateway(kind, args) as (gw, double, prober):
            for attack in group:
                for _ in range(args.repeat):
                    try:
                        row = run_one(attack, gw, double, prober, args)
                    except TimeoutError:
                        row = {"attack": attack.key, "title": attack.title, "gateway": kind,
                               "answer": f"gave up after {args.max_seconds:g} s", "seconds": args.max_seconds,
                               "health_max_ms": float("nan"), "probes": 0, "probes_failed": 0, "rss_before_mib": 0,
                               "rss_after_mib": 0, "chat": None, "misses": ["gave up"], "pass": False}  # fmt: skip
                    rows.setdefault(attack.key, []).append(row)
    ordered = [row for a in chosen for row in rows[a.key]]
    print()
    print(table(ordered, args.bound_ms))
    if args.json:
        args.json.write_text(json.dumps({"bound_ms": args.bound_ms, "quick": args.quick, "gateways": GATEWAYS, "rows": ordered,
                                         "pass": all(r["pass"] for r in ordered)}, indent=1))  # fmt: skip
    return 0 if all(r["pass"] for r in ordered) else 1


if __name__ == "__main__":
    sys.exit(main())
