"""`--redis-url`: the per-key limit of requests in flight shared by every process (server/shared_in_flight.py),
against a real ``redis-server`` the tests start themselves (Debian's ``redis-server``; ``.ci/run`` installs it).

Two :class:`SharedInFlight` objects stand for two gateway processes; the end-to-end test runs two gateway
processes with the official SDK."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis

from tests.fakes.tgi import EOT, FakeTGI, Gate
from tests.gateway_process import free_port, start_gateway, stop_gateway
from tgi_gateway.server.auth import InFlight, key_id
from tgi_gateway.server.shared_in_flight import KEY_PREFIX, SharedInFlight

REDIS_SERVER = shutil.which("redis-server")
pytestmark = [
    pytest.mark.skipif(
        REDIS_SERVER is None, reason="redis-server is not installed (Debian: apt-get install redis-server)"
    ),
    pytest.mark.anyio,
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server of its own: loopback, a free port, no persistence; stopped after the module."""
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [str(REDIS_SERVER), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    client = redis.Redis(port=port, socket_timeout=1)
    try:
        for _ in range(100):
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                time.sleep(0.05)
        else:
            raise AssertionError(f"redis-server did not start:\n{proc.communicate(timeout=5)[0]}")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def flush(redis_url: str) -> Iterator[None]:
    with redis.Redis.from_url(redis_url) as r:
        r.flushdb()
    yield


def two(redis_url: str, limit: int, **options: float) -> tuple[SharedInFlight, SharedInFlight]:
    return (SharedInFlight(redis_url, limit, InFlight(limit), **options),
            SharedInFlight(redis_url, limit, InFlight(limit), **options))  # fmt: skip


@pytest.mark.usefixtures("flush")
async def test_the_limit_holds_across_processes(redis_url: str) -> None:
    a, b = two(redis_url, 2)
    try:
        first, second = await a.acquire("key-1"), await b.acquire("key-1")
        assert first is not None and second is not None
        assert await a.acquire("key-1") is None and await b.acquire("key-1") is None, "2 in flight, in all"
        other = await b.acquire("key-2")
        assert other is not None, "each key counts on its own"
        await first()
        await first()  # a second call gives nothing back twice
        third = await b.acquire("key-1")
        assert third is not None and await a.acquire("key-1") is None
        for release in (second, third, other):
            await release()
        with redis.Redis.from_url(redis_url) as r:
            assert r.zcard(KEY_PREFIX + "key-1") == 0 and r.zcard(KEY_PREFIX + "key-2") == 0
    finally:
        await a.aclose()
        await b.aclose()


@pytest.mark.usefixtures("flush")
async def test_a_killed_process_slots_are_free_once_their_lease_ends(redis_url: str) -> None:
    a, b = two(redis_url, 1, lease=0.6)
    try:
        assert await a.acquire("k") is not None
        assert a._renewer is not None
        a._renewer.cancel()  # the process dies: nothing renews, nothing gives back
        assert await b.acquire("k") is None
        started = time.monotonic()
        while (release := await b.acquire("k")) is None:
            assert time.monotonic() - started < 2, "freed within its lease"
            await asyncio.sleep(0.05)
        assert time.monotonic() - started >= 0.3
        await release()
    finally:
        a._held.clear()
        await a.aclose()
        await b.aclose()


@pytest.mark.usefixtures("flush")
async def test_a_long_request_keeps_its_slot_past_one_lease(redis_url: str) -> None:
    a, b = two(redis_url, 1, lease=0.6)
    try:
        release = await a.acquire("k")
        assert release is not None
        await asyncio.sleep(1.5)  # 2.5 leases: renewed every 0.2 s
        assert await b.acquire("k") is None
        await release()
        later = await b.acquire("k")
        assert later is not None
        await later()
    finally:
        await a.aclose()
        await b.aclose()


@pytest.mark.usefixtures("flush")
async def test_slots_still_held_are_given_back_at_shutdown(redis_url: str) -> None:
    a, b = two(redis_url, 1)
    try:
        assert await a.acquire("k") is not None
        await a.aclose()
        later = await b.acquire("k")
        assert later is not None
        await later()
    finally:
        await b.aclose()


async def test_without_redis_each_process_counts_its_own(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:  # a port nobody listens on: refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gone = SharedInFlight(f"redis://127.0.0.1:{port}/0", 1, InFlight(1), timeout=0.2)
    try:
        with caplog.at_level(logging.WARNING, logger="tgi_gateway"):
            started = time.monotonic()
            first = await gone.acquire("k")
            assert first is not None and await gone.acquire("k") is None, "the process's own limit holds"
            assert time.monotonic() - started < 2
        assert caplog.text.count("Redis (--redis-url) failed") == 1, "one warning, not one per request"
        await first()
        assert await gone.acquire("k") is not None
    finally:
        await gone.aclose()


@pytest.mark.usefixtures("flush")
def test_two_gateway_processes_share_a_keys_limit(redis_url: str, tmp_path: Path) -> None:
    """With `--max-concurrent-per-key 1`, a stream held on one gateway process makes the same key's request to
    another process a 429; once the stream ended, it is served."""
    key = "sk-shared-limit-test-key-0001"
    gate = Gate()
    with FakeTGI(script=["It", " is", gate, " sunny", EOT]) as tgi:
        args = ("--model", "fn", "--template-version", "v3-llama3.1", "--endpoint", tgi.url, "--no-launch",
                "--api-key", key, "--max-concurrent-per-key", "1", "--redis-url", redis_url,
                "--log-level", "warning")  # fmt: skip
        (proc_a, url_a), (proc_b, url_b) = start_gateway(*args), start_gateway(*args)
        try:
            client_a = openai.OpenAI(base_url=url_a + "/v1", api_key=key, max_retries=0, timeout=10)
            client_b = openai.OpenAI(base_url=url_b + "/v1", api_key=key, max_retries=0, timeout=10)
            ask = [{"role": "user", "content": "Weather?"}]
            held = client_a.chat.completions.create(model="fn", messages=ask, stream=True)
            first = next(iter(held))  # the stream is under way: its slot is taken (in Redis)
            assert first.choices[0].delta.role == "assistant"
            with redis.Redis.from_url(redis_url) as r:
                assert r.zcard(KEY_PREFIX + key_id(key)) == 1
            with pytest.raises(openai.RateLimitError) as refused:
                client_b.chat.completions.create(model="fn", messages=ask)
            assert refused.value.response.headers["retry-after"] == "1"
            threading.Timer(0.1, gate.open).start()
            rest = "".join(c.choices[0].delta.content or "" for c in held if c.choices)
            assert (first.choices[0].delta.content or "") + rest == "It is sunny"
            answer = client_b.chat.completions.create(model="fn", messages=ask)
            assert answer.choices[0].message.content == "It is sunny"
            assert httpx.get(url_b + "/health", timeout=5).status_code == 200
        finally:
            out_a, out_b = stop_gateway(proc_a), stop_gateway(proc_b)
        assert proc_a.returncode == 0 and proc_b.returncode == 0, out_a + out_b
        with redis.Redis.from_url(redis_url) as r:
            assert r.zcard(KEY_PREFIX + key_id(key)) == 0, "every slot given back"
