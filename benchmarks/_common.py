"""What the benchmarks and operational checks share: the TGI double in a child process, the gateway started
with the real CLI, and a minimal HTTP/1.1 + SSE client on asyncio streams.

* **The double runs in its own process** (:class:`DoubleProcess`, a script's ``--serve-double`` mode, or
  ``python benchmarks/_common.py --serve-tagged-double``), driven over its stdin/stdout: one JSON command a
  line, one JSON answer a line. A separate process keeps the double's CPU (and GIL) out of the load
  generator's, and the double exits when its stdin closes, so nothing outlives a benchmark that died.
* **The gateway is the real CLI** (:class:`GatewayProcess`: ``server_tgi.py ... --no-launch``), ready once its
  ``/health`` answers 200: what is measured is what an operator runs, start-up included.
* **The client is :class:`RawClient`**: ``httpx`` costs the load generator 4-9x the CPU per token (see
  docs/performance.md, "Choice of load generator"), which on a 2-core machine distorts the gateway's numbers.
  Its lower-level calls (:meth:`RawClient.send`, :meth:`RawClient.read_head`, :meth:`RawClient.events`,
  :meth:`Exchange.abort`) let a check stop at any point of an exchange, e.g. close the socket before the
  response headers.
* **The tagged double** (:class:`TaggedScripts`): scripts are sent by the parent as JSON and chosen per request
  by a tag written in the prompt (``[[name#id]]``); a ``{"hold": true}`` item holds that generation at that
  point (a :class:`~tests.fakes.tgi.Gate` of its own) and records when it got there, so a check knows the
  exact state of a request before it acts, without sleeps.

Times exchanged between processes are ``time.monotonic()`` values: on Linux that is ``CLOCK_MONOTONIC``,
one clock for the whole machine, so a time taken in the double's process compares with one taken here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from typing import Self

ROOT = Path(__file__).resolve().parents[1]
MODEL = "bench-model"
TEMPLATE = "v3-llama3.1"
GATEWAY_ARGS = ("--model", MODEL, "--template-version", TEMPLATE)

# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def die_with_parent() -> None:
    """In the child: get SIGTERM when the benchmark dies, however it dies (Linux)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def end_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 5 s: bounded whatever the child does."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def pct(values: Sequence[float], q: float) -> float:
    """Percentile q (0-100), linear between closest ranks (numpy's default)."""
    v = sorted(values)
    if not v:
        return float("nan")
    k = (len(v) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


class DoubleProcess:
    """The parent's end of a TGI double in a child process (``argv`` after the interpreter).

    The child answers ``{"url", "pid"}`` first, then one line per command (:func:`serve_commands`)."""

    def __init__(self, argv: Sequence[str], start_timeout: float = 20.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            preexec_fn=die_with_parent,  # noqa: PLW1509 - started before any thread exists
        )
        try:
            hello = self._read(start_timeout)
        except BaseException:
            end_process(self.proc)
            raise
        self.url: str = hello["url"]
        self.pid: int = hello["pid"]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self, timeout: float) -> Any:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"the TGI double did not answer (exit status {self.proc.poll()})")
        return json.loads(line)

    def call(self, cmd: str, **kw: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        return self._read(30.0)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("quit")
        end_process(self.proc)


def serve_commands(tgi: Any, handlers: dict[str, Callable[[dict], Any]]) -> int:
    """The child's end: start ``tgi`` (a FakeTGI), say hello, answer ``handlers[cmd](command)`` per stdin line
    until ``quit`` or the end of stdin; ``reset`` is built in. Always stops the double."""
    tgi.start()

    def reply(obj: Any) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"url": tgi.url, "pid": os.getpid()})
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["cmd"] == "quit":
                reply({"ok": True})
                break
            if cmd["cmd"] == "reset":
                tgi.reset()
                reply({"ok": True})
                continue
            reply(handlers[cmd["cmd"]](cmd))
    finally:
        tgi.stop()
    return 0


class GatewayProcess:
    """The gateway as an operator runs it: ``server_tgi.py <args> --endpoint <double> --port <free> --no-launch``
    (the double is the TGI: no container is ever started), its output in a temporary log file. As a context
    manager it is stopped when the block ends (``with double, GatewayProcess(double.url) as gateway:`` stops
    the gateway first, then the double)."""

    def __init__(
        self,
        endpoint: str,
        args: Sequence[str] = GATEWAY_ARGS,
        log_level: str = "warning",
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="bench-gateway-", suffix=".log", delete=False)  # noqa: SIM115
        cmd = [sys.executable, "server_tgi.py", *args, "--endpoint", endpoint, "--host", "127.0.0.1",
               "--port", str(self.port), "--log-level", log_level, "--no-launch"]  # fmt: skip
        # HF_HUB_OFFLINE: a local model directory must never reach for the hub
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        self.spawned = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
            preexec_fn=die_with_parent,  # noqa: PLW1509 - started before any thread exists
        )  # fmt: skip
        self.pid = self.proc.pid

    def wait_healthy(self, timeout: float = 30.0, interval: float = 0.1) -> float:
        """Poll ``/health`` until it answers 200; returns the ``time.monotonic()`` of that answer."""
        import httpx

        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=1.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"the gateway exited with status {self.proc.returncode}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    # A new connection each time: a refused connect is how "not listening yet" shows.
                    if client.get(self.url + "/health", headers={"connection": "close"}).status_code == 200:
                        return time.monotonic()
                time.sleep(interval)
        raise RuntimeError(f"the gateway's /health did not answer 200 within {timeout} s:\n{self.log_tail()}")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-n:])

    def close(self) -> None:
        end_process(self.proc)
        self.log.close()
        with contextlib.suppress(OSError):  # its tail is in any error message already
            Path(self.log.name).unlink()


# --------------------------------------------------------------------------------------------
# The tagged double
# --------------------------------------------------------------------------------------------

TAG = re.compile(r"\[\[([\w.-]+)#(\d+)\]\]")


def tag(name: str, n: int) -> str:
    """The marker that selects script ``name`` for request ``n`` (put it in the prompt)."""
    return f"[[{name}#{n}]]"


class TaggedScripts:
    """A FakeTGI script: the script named by the prompt's tag, its JSON items turned into the double's items.

    Items: a string is one token (special-token texts get their flags); ``{"hold": true}`` holds the
    generation until :meth:`release` (and records when it got there); ``{"fail": message}``, ``{"drop": true}``
    and ``{"pause": seconds}`` are the double's ``Fail``, ``Drop`` and ``Pause``."""

    def __init__(self) -> None:
        from tests.fakes import tgi as fake

        self._fake = fake
        self.scripts: dict[str, list[Any]] = {}
        self.held_at: dict[int, float] = {}
        self.gates: dict[int, Any] = {}

    def __call__(self, inputs: str, parameters: dict) -> Iterator[Any]:
        m = TAG.search(inputs)
        if m is None or m[1] not in self.scripts:
            raise ValueError(f"no known script tag in the prompt: {inputs[-200:]!r}")
        return self._items(self.scripts[m[1]], int(m[2]))

    def _items(self, script: list[Any], n: int) -> Iterator[Any]:
        fake = self._fake
        for item in script:
            if isinstance(item, str):
                yield item
            elif item.get("hold"):
                gate = self.gates[n] = fake.Gate()
                self.held_at[n] = time.monotonic()  # everything before it has been sent
                yield gate
            elif "fail" in item:
                yield fake.Fail(item["fail"])
            elif item.get("drop"):
                yield fake.Drop()
            elif "pause" in item:
                yield fake.Pause(float(item["pause"]))
            else:
                raise ValueError(f"unknown script item {item!r}")

    def release(self, n: int | None = None) -> None:
        for key, gate in list(self.gates.items()):
            if n is None or key == n:
                gate.open()
                del self.gates[key]


def serve_tagged_double() -> int:
    """``--serve-tagged-double``: a FakeTGI with :class:`TaggedScripts`. Commands: ``scripts`` (set them),
    ``set`` (``token_delay``), ``gen`` (one request's record, by tag number), ``release`` (open holds),
    ``forget`` (drop the records of finished generations: outcome counts), ``reset``, ``quit``."""
    sys.path.insert(0, str(ROOT))
    from tests.fakes.tgi import FakeTGI

    scripts = TaggedScripts()
    tgi = FakeTGI(script=scripts, max_concurrent_requests=100_000, model_id="meetkai/functionary-small-v3.1")

    def record(n: int) -> dict[str, Any]:
        mark = f"#{n}]]"  # whatever the script's name
        gen = next((g for g in reversed(tgi.generations) if mark in g.inputs), None)
        if gen is None:
            return {"found": False, "held_at": scripts.held_at.get(n)}
        return {"found": True, "held_at": scripts.held_at.get(n), "route": gen.route, "outcome": gen.outcome,
                "disconnected_at": gen.disconnected_at, "ended_at": gen.ended_at, "tokens": len(gen.tokens)}  # fmt: skip

    def set_scripts(cmd: dict) -> Any:
        scripts.scripts.update(cmd["scripts"])
        return {"ok": True}

    def set_config(cmd: dict) -> Any:
        tgi.config.token_delay = float(cmd.get("token_delay", tgi.config.token_delay))
        return {"ok": True}

    def release(cmd: dict) -> Any:
        scripts.release(cmd.get("n"))
        return {"ok": True}

    def forget(cmd: dict) -> Any:
        done = tgi.forget_finished()
        for g in done:
            n = TAG.search(g.inputs)
            if n is not None:
                scripts.held_at.pop(int(n[2]), None)
        return {
            "outcomes": dict(Counter(g.outcome for g in done)),
            "errors": [repr(e) for e in tgi.errors][:5],
        }

    handlers = {"scripts": set_scripts, "set": set_config, "gen": lambda c: record(int(c["n"])),
                "release": release, "forget": forget}  # fmt: skip
    return serve_commands(tgi, handlers)


def tagged_double() -> DoubleProcess:
    return DoubleProcess([str(Path(__file__).resolve()), "--serve-tagged-double"])


# --------------------------------------------------------------------------------------------
# The load generator's client
# --------------------------------------------------------------------------------------------


class EventSink(Protocol):
    """What :meth:`RawClient.exchange` feeds: each SSE event (the bytes between blank lines)."""

    t0: float

    def event(self, ev: bytes, now: float) -> None: ...


@dataclass
class Exchange:
    """One request on one connection: written at ``t0`` (``time.perf_counter()``); ``status``/``headers`` once
    :meth:`RawClient.read_head` has read them."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    t0: float
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""  # a body that is not chunked (an error answer), as read by stream()

    @property
    def keep_alive(self) -> bool:
        return self.headers.get("connection", "").lower() != "close"

    @property
    def chunked(self) -> bool:
        return "chunked" in self.headers.get("transfer-encoding", "").lower()

    def abort(self) -> float:
        """Close the socket the way a client that goes away does (FIN in both directions), now rather than at
        the event loop's next turn; returns the ``time.monotonic()`` right before (taken after, it could
        follow the gateway's and the double's reaction, when this process is scheduled out in between)."""
        sock = self.writer.get_extra_info("socket")
        left = time.monotonic()
        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(sock.fileno())) as dup:
            dup.shutdown(socket.SHUT_RDWR)  # acts on the socket itself, whichever descriptor names it
        self.writer.close()
        return left


class RawClient:
    """A minimal HTTP/1.1 client on asyncio streams: keep-alive connections reused one request at a time,
    chunked bodies, SSE events split on blank lines. Costs the load generator far less CPU than httpx
    (see --compare-clients in bench_gateway.py), which matters on a 2-core machine shared with the double
    and the gateway."""

    def __init__(self, url: str) -> None:
        m = re.fullmatch(r"http://([^:/]+):(\d+)", url)
        assert m, url
        self.host, self.port = m[1], int(m[2])
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reader, writer

    async def _conn(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while self.idle:
            reader, writer = self.idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer
            writer.close()
        return await self._connect()

    def _head(self, path: str, body: bytes, method: str) -> bytes:
        return (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()

    async def send(self, path: str, body: bytes, *, fresh: bool = False, method: str = "POST") -> Exchange:
        """Write the request (on an idle connection, or a new one when ``fresh``); nothing is read yet."""
        reader, writer = await (self._connect() if fresh else self._conn())
        t0 = time.perf_counter()
        writer.write(self._head(path, body, method) + body)
        return Exchange(reader, writer, t0)

    @staticmethod
    async def read_head(ex: Exchange) -> Exchange:
        lines = (await ex.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        ex.status = int(lines[0].split()[1])
        ex.headers = {
            k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)
        }
        return ex

    async def request(self, path: str, body: bytes, method: str = "POST") -> Exchange:
        """Send and read the status and headers; a stale keep-alive connection is replaced once."""
        ex = await self.send(path, body, method=method)
        try:
            return await self.read_head(ex)
        except (asyncio.IncompleteReadError, ConnectionError):  # the server closed it while it was idle
            ex.writer.close()
            return await self.read_head(await self.send(path, body, fresh=True, method=method))

    @staticmethod
    async def chunks(ex: Exchange) -> AsyncIterator[bytes]:
        """The body's pieces as they arrive (de-chunked), or the whole ``Content-Length`` body at once."""
        if not ex.chunked:
            yield await ex.reader.readexactly(int(ex.headers.get("content-length", "0")))
            return
        while True:
            size = int((await ex.reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            if size == 0:
                await ex.reader.readuntil(b"\r\n")  # no trailers: the final CRLF
                return
            yield (await ex.reader.readexactly(size + 2))[:-2]

    @classmethod
    async def events(cls, ex: Exchange) -> AsyncIterator[tuple[bytes, float]]:
        """SSE events (the bytes between blank lines) and the ``perf_counter()`` at which each arrived."""
        buf = b""
        async for data in cls.chunks(ex):
            now = time.perf_counter()
            buf += data
            while (i := buf.find(b"\n\n")) >= 0:
                yield buf[:i], now
                buf = buf[i + 2 :]

    def release(self, ex: Exchange) -> None:
        """The exchange is complete: its connection goes back to the idle list, or is closed."""
        if ex.keep_alive and not ex.writer.is_closing():
            self.idle.append((ex.reader, ex.writer))
        else:
            ex.writer.close()

    async def exchange(self, path: str, body: bytes, sink: EventSink) -> Exchange:
        """One whole exchange, every SSE event of a chunked body fed to ``sink`` (``sink.t0`` = when the
        request was written); a body that is not chunked is left in ``Exchange.body``."""
        ex = await self.request(path, body)
        try:
            sink.t0 = ex.t0
            if ex.chunked:
                async for ev, now in self.events(ex):
                    sink.event(ev, now)
            else:
                ex.body = await ex.reader.readexactly(int(ex.headers.get("content-length", "0")))
            self.release(ex)
            return ex
        except BaseException:
            ex.writer.close()
            raise

    async def aclose(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve-tagged-double"]:
        sys.exit(serve_tagged_double())
    sys.exit(f"usage: {sys.argv[0]} --serve-tagged-double (the TGI double for benchmarks/*.py)")
