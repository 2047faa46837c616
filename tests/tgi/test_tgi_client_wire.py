"""tgi_gateway.tgi.client over real loopback sockets: the TGI double (``tests/fakes/tgi.py``: TGI's protocol
on uvicorn) for streaming, errors, disconnects, connection reuse and timeouts; a raw asyncio server where the
exact bytes or the socket's own behaviour matter (an idle connection the server closes, back-pressure)."""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from tests.fakes.tgi import Drop, FakeTGI, Gate, Incomplete, Pause, count_tokens, tokens
from tgi_gateway.errors import (
    GatewayError,
    TGIContextLengthError,
    TGIGenerationError,
    TGIOverloadedError,
    TGIProtocolError,
    TGIRejectedError,
    TGITimeoutError,
    TGIUnavailableError,
    TGIValidationError,
)
from tgi_gateway.tgi import client as tgi_client
from tgi_gateway.tgi.client import Generation, StreamEnd, TGIClient, Token
from tgi_gateway.tgi.protocol import STREAM_CUT

pytestmark = pytest.mark.anyio

SETTINGS = {
    "connect_timeout": 2.0,
    "first_token_timeout": 5.0,
    "read_timeout": 5.0,
    "request_timeout": 600.0,
    "connect_retries": 3,
}


@pytest.fixture
def anyio_backend():
    return "asyncio"


def client_to(url: str, **settings: Any) -> TGIClient:
    return TGIClient(url, **{**SETTINGS, **settings})


@pytest.fixture
def tgi():
    with FakeTGI(script=tokens("Hel", "lo", " world", "<|eot_id|>")) as server:
        yield server


@pytest.fixture
async def client(tgi):
    async with client_to(tgi.url) as c:
        yield c


async def collect(client: TGIClient, inputs: str = "Hi", parameters: dict | None = None) -> list:
    async with client.generate_stream(
        inputs, {"details": True} if parameters is None else parameters
    ) as events:
        return [item async for item in events]


async def collect_until_error(client: TGIClient, inputs: str = "Hi", parameters: dict | None = None):
    items: list = []
    with pytest.raises(GatewayError) as info:
        async with client.generate_stream(
            inputs, {"details": True} if parameters is None else parameters
        ) as events:
            async for item in events:
                items.append(item)
    return items, info.value


def assert_error(
    exc: GatewayError, cls: type, status: int, type_: str, code: str | None = None, param=None
) -> None:
    assert type(exc) is cls, repr(exc)
    assert (exc.status_code, exc.type, exc.code, exc.param) == (status, type_, code, param)


# ------------------------------------------------------------------------------------------ streams


async def test_stream_end_to_end(tgi, client):
    inputs = "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    params = {"details": True, "max_new_tokens": 50, "stop": ["<|eot_id|>"]}
    items = await collect(client, inputs, params)
    assert [i.text for i in items[:-1]] == ["Hel", "lo", " world", "<|eot_id|>"]
    assert items[-2].special and not items[0].special
    assert items[-1] == StreamEnd("eos_token", 4, count_tokens(inputs), "Hello world")
    assert tgi.last_generation.parameters == params
    assert tgi.last_generation.outcome == "completed"

    items = await collect(client, inputs, {"max_new_tokens": 2})  # no details
    assert items[-1] == StreamEnd(None, 2, None, "Hello")


async def test_keepalives_are_ignored(tgi, client):
    tgi.config.keepalive_interval = 0.005
    tgi.script = ["Hi", Pause(0.03), " there"]
    items = await collect(client)
    assert any(e == b":\n\n" for e in tgi.last_generation.events)
    assert items[-1] == StreamEnd("eos_token", 3, count_tokens("Hi"), "Hi there")


async def test_validation_errors(tgi, client):
    _, error = await collect_until_error(client, "Hi", {"temperature": 0})
    assert_error(error, TGIValidationError, 400, "invalid_request_error", None, "temperature")
    assert error.message == "Input validation error: `temperature` must be strictly positive"

    tgi.config.max_total_tokens = 20
    _, error = await collect_until_error(client, "Hi", {"max_new_tokens": 50})
    assert_error(
        error, TGIContextLengthError, 400, "invalid_request_error", "context_length_exceeded", "messages"
    )

    _, error = await collect_until_error(client, "Hi", {"temperature": "hot"})  # axum's 422 text
    assert_error(error, TGIValidationError, 400, "invalid_request_error", None, "temperature")


async def test_generation_error_after_tokens(tgi, client):
    tgi.fail_next(after_tokens=2, message="CUDA out of memory")
    items, error = await collect_until_error(client)
    assert [i.text for i in items] == ["Hel", "lo"]
    assert_error(error, TGIGenerationError, 502, "server_error")
    assert error.message == "TGI failed during generation: CUDA out of memory"


async def test_incomplete_drop_and_overload(tgi, client):
    tgi.script = ["a", "b", Incomplete()]
    items, error = await collect_until_error(client)
    assert len(items) == 2 and type(error) is TGIGenerationError

    tgi.script = ["a", "b", Drop()]  # TGI dies mid-response: connection reset, no error event
    items, error = await collect_until_error(client)
    assert len(items) == 2 and type(error) is TGIProtocolError
    assert error.message.startswith(STREAM_CUT)

    tgi.config.max_concurrent_requests = 0
    _, error = await collect_until_error(client)
    assert_error(error, TGIOverloadedError, 429, "requests", "rate_limit_exceeded")


async def test_tgi_hung_mid_stream_is_a_read_timeout_and_its_request_closed(tgi):
    tgi.config.keepalive_interval = None
    tgi.script = ["a", "b", Pause(math.inf)]
    async with client_to(tgi.url, read_timeout=0.3) as client:
        start = time.monotonic()
        items, error = await collect_until_error(client)
        assert 0.3 <= time.monotonic() - start < 1.0
    assert len(items) == 2 and type(error) is TGITimeoutError and "read timeout" in error.message
    assert await tgi.wait_until_async(lambda: tgi.last_generation.disconnected, timeout=1.0)


async def consume(client: TGIClient, got: list) -> None:
    async with client.generate_stream("Hi", {}) as events:
        async for item in events:
            got.append(item)


async def test_the_disconnect_is_seen_at_once_when_the_consumer_breaks(tgi, client):
    gate = Gate()
    tgi.script = ["a", "b", gate, "c"]
    async with client.generate_stream("Hi", {}) as events:
        async for item in events:
            if item.text == "b":
                break
        left_at = time.monotonic()
    assert await tgi.wait_until_async(lambda: tgi.last_generation.disconnected, timeout=1.0)
    assert tgi.last_generation.disconnected_at - left_at < 0.1
    assert tgi.last_generation.outcome == "disconnected"
    gate.open()


async def test_the_disconnect_is_seen_at_once_on_task_cancellation(tgi, client):
    tgi.script = ["a", "b", Gate(), "c"]
    got: list = []
    task = asyncio.ensure_future(consume(client, got))
    assert await tgi.wait_until_async(lambda: len(got) == 2, timeout=2.0)
    await asyncio.sleep(0.02)  # the consumer is now waiting for the next event
    cancelled_at = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await tgi.wait_until_async(lambda: tgi.last_generation.disconnected, timeout=1.0)
    assert tgi.last_generation.disconnected_at - cancelled_at < 0.1


async def test_the_disconnect_is_seen_at_once_on_cancel_scope_cancellation(tgi, client):
    """Level-triggered cancellation, as Starlette cancels a streaming response on client disconnect."""
    tgi.script = ["a", "b", Gate(), "c"]
    got: list = []
    async with anyio.create_task_group() as group:
        group.start_soon(consume, client, got)
        assert await tgi.wait_until_async(lambda: len(got) == 2, timeout=2.0)
        await anyio.sleep(0.02)
        cancelled_at = time.monotonic()
        group.cancel_scope.cancel()
    assert await tgi.wait_until_async(lambda: tgi.last_generation.disconnected, timeout=1.0)
    assert tgi.last_generation.disconnected_at - cancelled_at < 0.1


async def test_100_concurrent_streams_over_one_pool_then_their_connections_reused(tgi, client):
    gate = Gate()
    tgi.script = lambda inputs, parameters: [inputs, gate, "!"]
    results: dict[int, list] = {}

    async def one(i: int) -> None:
        results[i] = await collect(client, f"n{i}", {"details": True})

    async def batch() -> None:
        async with anyio.create_task_group() as group:
            for i in range(100):
                group.start_soon(one, i)
            assert await tgi.wait_until_async(lambda: tgi.in_flight == 100, timeout=5.0)
            gate.open()

    await batch()
    assert tgi.peak_in_flight == 100
    for i in range(100):
        assert [t.text for t in results[i][:-1]] == [f"n{i}", "!", "<|eot_id|>"]
        assert results[i][-1].finish_reason == "eos_token"
    first_ports = {r.client for r in tgi.requests}
    assert len(first_ports) == 100

    # The streams were read to their end, so their connections went back to the pool and all serve
    # the next burst.
    tgi.reset()
    gate.close()
    results.clear()
    start = time.monotonic()
    await batch()
    assert time.monotonic() - start < 1.5
    assert len(results) == 100
    assert {r.client for r in tgi.requests} == first_ports


async def test_one_connection_serves_every_route_in_turn(tgi, client):
    await collect(client)
    await collect(client)
    assert await client.health()
    info = await client.info()
    assert (await client.generate("Hi", {"details": True})).finish_reason == "eos_token"
    assert [r.path for r in tgi.requests] == [
        "/generate_stream",
        "/generate_stream",
        "/health",
        "/info",
        "/generate",
    ]
    assert len({r.client for r in tgi.requests}) == 1  # one pool for the four routes
    assert (
        info.model_id,
        info.max_input_tokens,
        info.max_total_tokens,
        info.max_stop_sequences,
        info.max_concurrent_requests,
        info.version,
    ) == ("meetkai/functionary-small-v3.2", 8191, 8192, 4, 128, "3.3.6-dev0")


async def test_health_and_api_key():
    with FakeTGI(api_key="s3cret") as tgi:
        async with client_to(tgi.url) as client:
            assert await client.health()  # /health is never protected
            tgi.config.healthy = False
            assert not await client.health()
            _, error = await collect_until_error(client)
            assert type(error) is TGIRejectedError and "API key" in error.message
        async with client_to(tgi.url, api_key="s3cret") as client:
            assert (await collect(client))[-1].finish_reason == "eos_token"
            assert (await client.generate("Hi", {"details": True})).finish_reason == "eos_token"
    assert {r.headers.get("authorization") for r in tgi.requests[-2:]} == {"Bearer s3cret"}


async def test_unreachable_then_starting():
    tgi = FakeTGI(load_delay=0.3)
    tgi.start(wait=False)  # bound, not listening: connections are refused
    try:
        async with client_to(tgi.url) as client:
            assert not await client.health()
            start = time.monotonic()
            with pytest.raises(TGIUnavailableError) as info:
                async with client.generate_stream("Hi", {}):
                    pass
            assert time.monotonic() - start < 0.5
            assert info.value.message.startswith(f"TGI is not reachable at {tgi.url}: ")
        # Enough attempts ride out the rest of the warm-up.
        async with client_to(tgi.url, connect_retries=12) as client:
            assert (await collect(client))[-1].finish_reason == "eos_token"
    finally:
        tgi.stop()


@pytest.mark.parametrize("route", ["generate_stream", "generate"])
async def test_a_refused_connection_is_retried_then_unavailable(route):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        async with client_to(url, connect_retries=2) as client:
            start = time.monotonic()
            with pytest.raises(TGIUnavailableError) as info:
                if route == "generate":
                    await client.generate("Hi", {"details": True})
                else:
                    async with client.generate_stream("Hi", {}):
                        pass
            assert time.monotonic() - start < 0.5
    assert info.value.message.startswith(f"TGI is not reachable at {url}: ")


# ------------------------------------------------------------------------------------------ /generate


async def test_generate_end_to_end(tgi, client):
    inputs = "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    params = {"details": True, "max_new_tokens": 50, "stop": ["<|eot_id|>"]}
    generation = await client.generate(inputs, params)
    assert generation == Generation(
        [Token(t.text, t.special, t.token_id) for t in tokens("Hel", "lo", " world", "<|eot_id|>")],
        "eos_token",
        4,
        count_tokens(inputs),
    )
    assert generation.tokens[-1].special and not generation.tokens[0].special
    gen = tgi.last_generation
    assert (gen.route, gen.parameters, gen.outcome) == ("generate", params, "completed")
    assert gen.generated_text == "Hello world"  # what TGI's generated_text holds: no special token

    generation = await client.generate(inputs, {"details": True, "max_new_tokens": 2})
    assert ([t.text for t in generation.tokens], generation.finish_reason) == (["Hel", "lo"], "length")


async def test_generate_errors(tgi, client):
    with pytest.raises(TGIValidationError) as info:
        await client.generate("Hi", {"details": True, "temperature": 0})
    assert_error(info.value, TGIValidationError, 400, "invalid_request_error", None, "temperature")
    assert info.value.message == "Input validation error: `temperature` must be strictly positive"

    tgi.fail_next(after_tokens=2, message="CUDA out of memory")  # HTTP 424
    with pytest.raises(TGIGenerationError, match="^TGI failed during generation: CUDA out of memory$"):
        await client.generate("Hi", {"details": True})

    tgi.script = ["a", "b", Incomplete()]  # HTTP 500 incomplete_generation
    with pytest.raises(TGIGenerationError):
        await client.generate("Hi", {"details": True})

    tgi.config.max_concurrent_requests = 0  # HTTP 429
    with pytest.raises(TGIOverloadedError):
        await client.generate("Hi", {"details": True})
    assert [g.outcome for g in tgi.generations] == ["validation", "generation", "incomplete", "overloaded"]
    assert len({r.client for r in tgi.requests}) == 1, "error answers read whole: the connection is reused"


async def test_generate_dropped_without_an_answer_is_retried(tgi, client):
    """TGI closing a /generate connection without any answer cannot be told from an idle connection it had
    closed: it is sent again (--connect-retries attempts in all), then TGI is reported unreachable."""
    tgi.script = ["a", "b", Drop()]
    with pytest.raises(TGIUnavailableError, match="connection closed before any response"):
        await client.generate("Hi", {"details": True})
    assert [g.outcome for g in tgi.generations] == ["dropped"] * 3


async def test_generate_honours_the_token_delay(tgi, client):
    tgi.config.token_delay = 0.05
    start = time.monotonic()
    generation = await client.generate("Hi", {"details": True})
    assert len(generation.tokens) == 4 and 0.15 <= time.monotonic() - start < 1.0  # 3 delays: after the first


def holding(tgi: FakeTGI) -> bool:
    """TGI is answering one /generate, held after its first token."""
    return tgi.generate_open == 1 and len(tgi.last_generation.tokens) == 1


async def test_generate_cancelled_is_seen_at_once_and_its_connection_not_reused(tgi, client):
    await client.generate("warm", {"details": True})  # leaves one pooled connection
    (pooled,) = {r.client for r in tgi.requests}
    tgi.script = ["a", Gate(), "b"]
    task = asyncio.ensure_future(client.generate("Hi", {"details": True}))
    assert await tgi.wait_until_async(lambda: holding(tgi), 2.0)
    await asyncio.sleep(0.02)  # the client is waiting for the answer
    cancelled_at = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gen = tgi.last_generation
    assert await tgi.wait_until_async(lambda: gen.disconnected, timeout=1.0)
    assert gen.disconnected_at - cancelled_at < 0.1
    assert (gen.route, gen.outcome, tgi.in_flight, tgi.generate_open) == ("generate", "disconnected", 0, 0)
    assert gen.request.client == pooled, "the cancelled request had reused the pooled connection"
    # That connection was closed, not given back: the next request opens another one.
    tgi.script = tokens("ok")
    assert [t.text for t in (await client.generate("Hi", {"details": True})).tokens] == ["ok", "<|eot_id|>"]
    assert tgi.last_generation.request.client != pooled


async def test_generate_cancelled_by_a_cancel_scope_is_seen_at_once(tgi, client):
    """Level-triggered cancellation, as the gateway's until_disconnect cancels on a client disconnect."""
    tgi.script = ["a", Gate(), "b"]
    async with anyio.create_task_group() as group:
        group.start_soon(client.generate, "Hi", {"details": True})
        assert await tgi.wait_until_async(lambda: holding(tgi), 2.0)
        await anyio.sleep(0.02)
        cancelled_at = time.monotonic()
        group.cancel_scope.cancel()
    gen = tgi.last_generation
    assert await tgi.wait_until_async(lambda: gen.disconnected, timeout=1.0)
    assert gen.disconnected_at - cancelled_at < 0.1 and gen.outcome == "disconnected"


async def test_generate_request_timeout_closes_tgis_request(tgi):
    tgi.script = ["a", Pause(math.inf)]
    async with client_to(tgi.url, request_timeout=0.3) as client:
        with pytest.raises(TGITimeoutError, match="within 0.3 s \\(--request-timeout\\)"):
            await client.generate("Hi", {"details": True})
    gen = tgi.last_generation
    assert await tgi.wait_until_async(lambda: gen.disconnected, timeout=1.0)
    assert gen.outcome == "disconnected"


# ------------------------------------------------------------------------------------------ raw sockets

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
FINAL = (
    b'data: {"index":1,"token":{"id":2,"text":"</s>","logprob":-0.1,"special":true},"generated_text":"",'
    b'"details":{"finish_reason":"eos_token","generated_tokens":1,"seed":null,"input_length":1}}\n\n'
)


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


class RawServer:
    """Calls ``script(reader, writer)`` for each request (after reading its head and body)."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                await reader.readexactly(length)
                await self.script(reader, writer)
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def test_an_idle_connection_closed_by_the_server_is_not_reused():
    """A keep-alive connection the server closed while idle (its keep-alive timeout) is dropped from the pool:
    the next request goes out on a new connection, at its first attempt."""

    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + chunked(FINAL))
        await writer.drain()
        writer.close()  # keep-alive announced, then closed while idle

    server = RawServer(once)
    async with server as url, client_to(url, connect_retries=1) as client:
        for _ in range(2):
            assert (await collect(client))[-1].finish_reason == "eos_token"
            await asyncio.sleep(0.05)
    assert server.connections == 2


async def test_a_slow_reader_stops_the_socket_and_loses_nothing():
    """Bounded buffering: while the stream is not read, the client stops reading its socket once about
    twice ``_READ_BUFSIZE`` bytes wait (aiohttp's StreamReader flow control), so the server cannot send
    everything. Read afterwards, every byte arrives."""
    comment = b":" + b"x" * 65533 + b"\n\n"  # 64 KiB keep-alive comments
    count = 256  # 16 MiB: more than the socket buffers hold
    written = [0]

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD)
        for _ in range(count):
            writer.write(b"%x\r\n%s\r\n" % (len(comment), comment))
            await writer.drain()
            written[0] += len(comment)
        writer.write(chunked(FINAL))
        await writer.drain()

    async with RawServer(big) as url, client_to(url) as client, client.generate_stream("Hi", {}) as events:
        assert isinstance(events._content._protocol, tgi_client._ResponseHandler)  # resumes only when paused
        await asyncio.sleep(0.5)
        assert written[0] < count * len(comment) // 2, "the server is held back"
        buffered = events._content.total_bytes  # what the client took from its socket
        assert buffered <= 4 * tgi_client._READ_BUFSIZE, buffered
        assert [i async for i in events][-1].finish_reason == "eos_token"
        assert events._content.total_bytes == count * len(comment) + len(FINAL)
