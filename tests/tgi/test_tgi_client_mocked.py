"""tgi_gateway.tgi.client against a TGI played in-process: exact answers, no socket.

The seam is the client's ``connector``: :class:`InProcessTGI` is an aiohttp connector whose connections
are in-memory pipes. Each request's bytes are parsed and handed to the test's handler, whose :class:`Reply`
(status, headers, body pieces with pauses, then an end, a reset or a hang) is written back as HTTP/1.1 bytes
into aiohttp's own protocol, parser and stream reader -- everything the client runs except the socket.
Everything else (the pool, keep-alive, closing a connection, flow control) is aiohttp's own.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import aiohttp
import anyio
import pytest

from tests.tgi.tgi_answers import GENERATE_TOKENS, GENERATION, generate_answer
from tgi_gateway.errors import (
    GatewayError,
    InvalidRequestError,
    TGIContextLengthError,
    TGIGenerationError,
    TGIOverloadedError,
    TGIProtocolError,
    TGIRejectedError,
    TGITimeoutError,
    TGIUnavailableError,
    TGIValidationError,
    UpstreamError,
)
from tgi_gateway.tgi import protocol
from tgi_gateway.tgi.client import Generation, StreamEnd, TGIClient, TGIInfo, Token

pytestmark = pytest.mark.anyio

BASE = "http://tgi.test"
SETTINGS = {
    "connect_timeout": 2.0,
    "first_token_timeout": 120.0,
    "read_timeout": 60.0,
    "request_timeout": 600.0,
    "connect_retries": 3,
}


@pytest.fixture
def anyio_backend():
    return "asyncio"


# ------------------------------------------------------------------------------------------ the seam


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    pipe: Pipe

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Reply:
    """An answer: ``body`` bytes are sent whole with a Content-Length (as TGI sends JSON); a list is sent
    chunked, a piece per chunk, a number in it being a pause of that many seconds. Then ``then``: ``end``
    (the connection stays open unless ``headers`` say ``connection: close``), ``reset`` (the connection
    is reset without the end of the body), ``hang`` (nothing more, ever)."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "text/event-stream"})
    body: bytes | list[bytes | float] = b""
    then: str = "end"


Handler = Callable[[Request], "Reply | None | Awaitable[Reply | None]"]  # None: closed without any answer


class Pipe(asyncio.Transport):
    """One in-memory connection: the client's side is aiohttp's protocol; the server's side answers the
    requests written to it, one at a time, honouring the client's flow control."""

    def __init__(self, tgi: InProcessTGI, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self.tgi = tgi
        self.protocol = protocol
        self.inbox = b""
        self.closing = False
        self.closed_at: float | None = None  # by the client
        self.received = 0  # bytes handed to the client
        self.resumed = asyncio.Event()
        self.resumed.set()
        self.task: asyncio.Task[None] | None = None

    # ---- the client's side (asyncio.Transport)
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.closing:
            self.inbox += bytes(data)
            self._next_request()

    def writelines(self, lines: Any) -> None:
        self.write(b"".join(lines))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closed_at = time.monotonic()
            self._lost(None)

    abort = close

    def pause_reading(self) -> None:
        self.resumed.clear()

    def resume_reading(self) -> None:
        self.resumed.set()

    def is_reading(self) -> bool:
        return self.resumed.is_set()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False

    # ---- the server's side
    def _lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
        asyncio.get_running_loop().call_soon(self.protocol.connection_lost, exc)

    def _next_request(self) -> None:
        head, sep, rest = self.inbox.partition(b"\r\n\r\n")
        if self.task is not None or not sep:
            return
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        if len(rest) < length:
            return
        self.inbox = rest[length:]
        method, path, _ = lines[0].split(" ")
        request = Request(method, path, headers, rest[:length], self)
        self.tgi.requests.append(request)
        self.task = asyncio.ensure_future(self._answer(request))

    async def _send(self, data: bytes) -> None:
        await self.resumed.wait()
        if self.closing:
            raise asyncio.CancelledError
        self.received += len(data)
        self.protocol.data_received(data)
        await asyncio.sleep(0)  # each piece its own read

    async def _answer(self, request: Request) -> None:
        try:
            reply = self.tgi.handler(request)
            if inspect.isawaitable(reply):
                reply = await reply
            if reply is None:
                self._lost(None)
                return
            phrase = HTTPStatus(reply.status).phrase if reply.status in HTTPStatus._value2member_map_ else "?"
            head = f"HTTP/1.1 {reply.status} {phrase}\r\n" + "".join(
                f"{k}: {v}\r\n" for k, v in reply.headers.items()
            )
            if isinstance(reply.body, bytes):
                await self._send(
                    f"{head}content-length: {len(reply.body)}\r\n\r\n".encode("latin-1") + reply.body
                )
            else:
                await self._send(f"{head}transfer-encoding: chunked\r\n\r\n".encode("latin-1"))
                for piece in reply.body:
                    if isinstance(piece, bytes):
                        await self._send(b"%x\r\n%s\r\n" % (len(piece), piece))
                    else:
                        await asyncio.sleep(piece)
                if reply.then == "end":
                    await self._send(b"0\r\n\r\n")
            if reply.then == "reset":
                self._lost(ConnectionResetError(104, "Connection reset by peer"))
            elif reply.then == "hang":
                await asyncio.sleep(math.inf)
            elif reply.headers.get("connection") == "close":
                self._lost(None)
        except asyncio.CancelledError:
            return
        self.task = None
        self._next_request()


class InProcessTGI(aiohttp.BaseConnector):
    """An aiohttp connector whose connections are :class:`Pipe` s to ``handler``. The first ``refuse``
    connection attempts are refused (ECONNREFUSED)."""

    def __init__(self, handler: Handler, *, refuse: int = 0) -> None:
        super().__init__(limit=0, keepalive_timeout=30.0)
        self.handler = handler
        self.refuse = refuse
        self.attempts = 0
        self.pipes: list[Pipe] = []
        self.requests: list[Request] = []

    async def _create_connection(self, req: Any, traces: Any, timeout: Any) -> Any:
        self.attempts += 1
        if self.attempts <= self.refuse:
            raise aiohttp.ClientConnectorError(
                req.connection_key, ConnectionRefusedError(111, "Connection refused")
            )
        protocol = self._factory()
        pipe = Pipe(self, protocol)
        self.pipes.append(pipe)
        protocol.connection_made(pipe)
        return protocol


class mock:
    """``async with mock(handler, **settings) as (client, tgi)``: a TGIClient to an in-process TGI."""

    def __init__(self, handler: Handler, *, refuse: int = 0, base: str = BASE, **settings: Any) -> None:
        self.handler, self.refuse, self.base, self.settings = handler, refuse, base, {**SETTINGS, **settings}

    async def __aenter__(self) -> tuple[TGIClient, InProcessTGI]:
        self.tgi = InProcessTGI(self.handler, refuse=self.refuse)
        self.client = TGIClient(self.base, connector=self.tgi, **self.settings)
        return self.client, self.tgi

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()


# ------------------------------------------------------------------------------------------ helpers


def data(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def tok(index: int, text: str, *, special: bool = False, id: int | None = None) -> dict:
    token = {"id": 1000 + index if id is None else id, "text": text, "logprob": -0.5, "special": special}
    return {"index": index, "token": token, "generated_text": None, "details": None}


def final(index: int, text: str, generated_text: str) -> dict:
    event = tok(index, text, special=True, id=2)
    event["generated_text"] = generated_text
    event["details"] = {
        "finish_reason": "eos_token",
        "generated_tokens": index,
        "seed": None,
        "input_length": 7,
    }
    return event


HELLO = [tok(1, "Hél"), tok(2, "lo 🌍"), final(3, "</s>", "Héllo 🌍")]
HELLO_BODY = b"".join(data(e) for e in HELLO)
HELLO_ITEMS = [
    Token("Hél", False, 1001),
    Token("lo 🌍", False, 1002),
    Token("</s>", True, 2),
    StreamEnd("eos_token", 3, 7, "Héllo 🌍"),
]


def sse(pieces: bytes | list[bytes | float], *, then: str = "end") -> Reply:
    return Reply(body=[pieces] if isinstance(pieces, bytes) else pieces, then=then)


async def collect(client: TGIClient, inputs: str = "Hi", parameters: dict | None = None) -> list:
    async with client.generate_stream(
        inputs, {"details": True} if parameters is None else parameters
    ) as events:
        return [item async for item in events]


async def collect_until_error(client: TGIClient) -> tuple[list, GatewayError]:
    items: list = []
    with pytest.raises(GatewayError) as info:
        async with client.generate_stream("Hi", {"details": True}) as events:
            async for item in events:
                items.append(item)
    return items, info.value


async def open_generation(client: TGIClient, route: str) -> None:
    if route == "generate":
        await client.generate("Hi", {"details": True})
    else:
        async with client.generate_stream("Hi", {}):
            pytest.fail("the context must not be entered")


async def settled() -> None:
    """Let the pipes' callbacks (a close, a connection_lost) run."""
    for _ in range(3):
        await asyncio.sleep(0)




def answer(*, prompt_tokens: str | None = "7", **kw: Any) -> Reply:
    """TGI's /generate answer with details (PROTOCOL.md §2.2-2.3): Content-Length framed JSON."""
    headers = {
        "content-type": "application/json",
        "x-compute-type": "gpu+optimized",
        "x-generated-tokens": "3",
    }
    if prompt_tokens is not None:
        headers["x-prompt-tokens"] = prompt_tokens
    return Reply(headers=headers, body=generate_answer(**kw))


def generation_of(request: Request) -> Reply:
    return sse(HELLO_BODY) if request.path.endswith("/generate_stream") else answer()


# ------------------------------------------------------------------------------------------ the requests sent


async def test_the_stream_request_sent_and_its_items():
    params = {
        "details": True,
        "max_new_tokens": 20,
        "stop": ["<|eot_id|>"],
        "temperature": 0.7,
        "x_unknown": 1,
    }
    async with mock(lambda r: sse(HELLO_BODY)) as (client, tgi):
        assert await collect(client, "Hello <|eot_id|>", params) == HELLO_ITEMS
    (request,) = tgi.requests
    assert request.method == "POST" and request.path == "/generate_stream"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["accept"] == "text/event-stream"
    assert request.headers["user-agent"].startswith("tgi-gateway/")
    assert "authorization" not in request.headers
    assert request.headers["accept-encoding"] == "identity"  # no compression asked for: none to decode
    assert "cookie" not in request.headers
    assert request.json() == {"inputs": "Hello <|eot_id|>", "parameters": params}


async def test_the_generate_request_sent_and_its_generation():
    params = {"details": True, "max_new_tokens": 20, "stop": ["<|eot_id|>"], "temperature": 0.7}
    async with mock(lambda r: answer()) as (client, tgi):
        assert await client.generate("Hello <|eot_id|>", params) == GENERATION
    (request,) = tgi.requests
    assert request.method == "POST" and request.path == "/generate"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["accept"] == "application/json"
    assert request.json() == {"inputs": "Hello <|eot_id|>", "parameters": params}


async def test_the_api_key_is_sent_as_a_bearer_token_on_every_route():
    def handler(request: Request) -> Reply:
        if request.path == "/info":
            return Reply(headers={"content-type": "application/json"}, body=b'{"model_id": "m"}')
        if request.path == "/health":
            return Reply(headers={}, body=b"")
        return generation_of(request)

    async with mock(handler, api_key="s3cret") as (client, tgi):
        await collect(client)
        await client.generate("Hi", {"details": True})
        assert await client.health()
        await client.info()
    assert [r.path for r in tgi.requests] == ["/generate_stream", "/generate", "/health", "/info"]
    assert {r.headers["authorization"] for r in tgi.requests} == {"Bearer s3cret"}


async def test_a_base_path_in_the_url_is_kept():
    async with mock(generation_of, base="http://tgi.test/base/") as (client, tgi):
        assert await collect(client) == HELLO_ITEMS
        assert await client.generate("Hi", {"details": True}) == GENERATION
    assert [r.path for r in tgi.requests] == ["/base/generate_stream", "/base/generate"]
    assert tgi.requests[0].headers["host"] == "tgi.test"


@pytest.mark.parametrize(
    "base,host",
    [("http://[::1]:8080", "[::1]:8080"), ("https://tgi.example", "tgi.example"), ("http://h:80/", "h")],
)
async def test_the_host_header(base, host):
    async with mock(generation_of, base=base) as (client, tgi):
        await client.generate("Hi", {"details": True})
    assert tgi.requests[0].headers["host"] == host


@pytest.mark.parametrize("base", ["ftp://tgi.test", "tgi.test:8080", "http://"])
async def test_a_url_that_is_not_http_is_refused_at_once(base):
    with pytest.raises(ValueError, match="not an http"):
        TGIClient(base, **SETTINGS)


@pytest.mark.parametrize("route", ["generate_stream", "generate"])
async def test_an_unencodable_parameter_sends_nothing(route):
    async with mock(lambda r: pytest.fail("nothing must be sent")) as (client, tgi):
        with pytest.raises(InvalidRequestError):
            if route == "generate":
                await client.generate("Hi", {"temperature": float("inf")})
            else:
                async with client.generate_stream("Hi", {"temperature": float("nan")}):
                    pass
    assert tgi.attempts == 0


# ------------------------------------------------------------------------------------------ the stream


def framings() -> list[tuple[str, bytes]]:
    lf = b":\n\n" + data(HELLO[0]) + b": keep-alive\n\n" + data(HELLO[1]) + b":\n\n" + data(HELLO[2])
    fields = (
        b"retry: 100\nid: 7\n\nevent: message\n"
        + data(HELLO[0])
        + b"data:"
        + data(HELLO[1])[5:]
        + data(HELLO[2])
    )
    return [("lf", lf), ("crlf", lf.replace(b"\n", b"\r\n")), ("cr", lf.replace(b"\n", b"\r")), ("fields", fields),
            ("done", lf + b"data: [DONE]\n\n")]  # fmt: skip


@pytest.mark.parametrize("name,body", framings(), ids=[n for n, _ in framings()])
async def test_each_framing_in_pieces_gives_the_same_items(name, body):
    pieces: list[bytes | float] = [
        body[i : i + 7] for i in range(0, len(body), 7)
    ]  # inside UTF-8 sequences too
    async with mock(lambda r: sse(pieces)) as (client, _):
        assert await collect(client) == HELLO_ITEMS


async def test_batches_hold_what_has_arrived():
    body = [data(HELLO[0]) + data(HELLO[1]), 0.05, data(HELLO[2])]
    async with mock(lambda r: sse(body)) as (client, _), client.generate_stream("Hi", {}) as tokens:
        assert await tokens.batch() == HELLO_ITEMS[:2]
        assert not tokens.ended
        assert await tokens.batch() == HELLO_ITEMS[2:]
        assert tokens.ended
        with pytest.raises(StopAsyncIteration):
            await tokens.batch()


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b":\n\n",
        data(HELLO[0]) + data(HELLO[1]),
        data(HELLO[0]) + data(HELLO[1]) + b"data: [DONE]\n\n",
        data(HELLO[0]) + data(HELLO[1]) + data(HELLO[2])[:-1],
        data(HELLO[0]) + data(HELLO[1])[:30],
    ],
    ids=["empty", "keepalive-only", "no-final", "done-no-final", "final-unterminated", "cut-mid-event"],
)
async def test_a_stream_without_its_final_event_is_a_protocol_error(body):
    async with mock(lambda r: sse([body] if body else [])) as (client, _):
        items, error = await collect_until_error(client)
    assert all(isinstance(i, Token) for i in items)
    assert type(error) is TGIProtocolError and error.message == protocol.STREAM_CUT


@pytest.mark.parametrize(
    "line",
    [
        b"data: {not json\n\n",
        b"data: [1,2]\n\n",
        b'data: {"index":1}\n\n',
        b'data: {"token":{"text":1,"id":3}}\n\n',
    ],
    ids=["not-json", "not-object", "no-token", "bad-token"],
)
async def test_malformed_events_are_protocol_errors(line):
    async with mock(lambda r: sse(data(HELLO[0]) + line)) as (client, _):
        items, error = await collect_until_error(client)
    assert items == [HELLO_ITEMS[0]]
    assert type(error) is TGIProtocolError


ERROR_EVENTS = [
    ("validation", "Input validation error: `temperature` must be strictly positive", TGIValidationError),
    (
        "validation",
        "Input validation error: `inputs` must have less than 8 tokens. Given: 9",
        TGIContextLengthError,
    ),
    ("overloaded", "Model is overloaded", TGIOverloadedError),
    ("generation", "Request failed during generation: CUDA out of memory", TGIGenerationError),
    ("incomplete_generation_stream", "Incomplete generation stream", TGIGenerationError),
    ("something_new", "A new kind of failure", UpstreamError),
]


@pytest.mark.parametrize(
    "error_type,text,cls", ERROR_EVENTS, ids=[f"{e[0]}-{i}" for i, e in enumerate(ERROR_EVENTS)]
)
async def test_an_error_event_is_raised_after_the_tokens_before_it(error_type, text, cls):
    body = data(HELLO[0]) + data(HELLO[1]) + data({"error": text, "error_type": error_type})
    async with mock(lambda r: sse(body)) as (client, _):
        items, error = await collect_until_error(client)
    assert items == HELLO_ITEMS[:2]
    assert type(error) is cls and error.to_dict() == protocol.map_tgi_error(error_type, text).to_dict()


# ------------------------------------------------------------------------------------------ HTTP statuses

JSON, TEXT = "application/json", "text/plain; charset=utf-8"
STATUSES = [
    (422, JSON, json.dumps({"error": "Input validation error: `top_p` must be > 0.0 and < 1.0",
                            "error_type": "validation"}), TGIValidationError),
    (422, TEXT, "Failed to deserialize the JSON body into the target type: missing field `inputs`", TGIRejectedError),
    (424, JSON, json.dumps({"error": "Request failed during generation: OOM", "error_type": "generation"}),
     TGIGenerationError),
    (429, JSON, json.dumps({"error": "Model is overloaded", "error_type": "overloaded"}), TGIOverloadedError),
    (500, TEXT, "Internal Server Error", UpstreamError),
    (503, JSON, json.dumps({"error": "unhealthy", "error_type": "healthcheck"}), TGIUnavailableError),
    (401, TEXT, "", TGIRejectedError),
    (404, TEXT, "", TGIRejectedError),
    (413, TEXT, "Failed to buffer the request body: length limit exceeded", TGIContextLengthError),
    (502, "text/html", "<html><body>502 Bad Gateway</body></html>", TGIUnavailableError),
    (418, TEXT, "I'm a teapot", UpstreamError),
    (301, TEXT, "moved", UpstreamError),  # redirects are not followed
    (200, JSON, json.dumps({"generated_text": "Hi"}), TGIProtocolError),  # not an event stream; no details
    (200, "text/html", "<html>login</html>", TGIProtocolError),  # a proxy's page
]  # fmt: skip


@pytest.mark.parametrize("route", ["generate_stream", "generate"])
@pytest.mark.parametrize(
    "status,content_type,body,cls", STATUSES, ids=[f"{s[0]}-{i}" for i, s in enumerate(STATUSES)]
)
async def test_a_non_200_or_foreign_answer_maps_by_status_and_is_never_retried(
    status, content_type, body, cls, route
):
    headers = {"content-type": content_type} | ({"location": "/elsewhere"} if status == 301 else {})
    async with mock(lambda r: Reply(status, headers, body.encode())) as (client, tgi):
        with pytest.raises(UpstreamError) as info:
            await open_generation(client, route)
        if status != 200:
            assert (
                info.value.to_dict()
                == protocol.error_from_body(status, content_type, body.encode()).to_dict()
            )
        # the error body was read whole: the connection serves the next request
        tgi.handler = generation_of
        await open_generation(client, "generate")
    assert type(info.value) is cls
    assert [r.path for r in tgi.requests] == [f"/{route}", "/generate"], "a response arrived: never retried"
    if cls is TGIRejectedError or status == 200:
        assert info.value.headers["x-should-retry"] == "false"
    if cls is TGIOverloadedError:
        assert info.value.headers == {"Retry-After": "1"}


async def test_a_long_error_body_is_cut_and_its_connection_closed():
    body = b"x" * 100_000
    async with mock(lambda r: Reply(500, {"content-type": TEXT}, body)) as (client, tgi):
        with pytest.raises(UpstreamError) as info:
            await client.generate("Hi", {"details": True})
        await settled()
    assert len(info.value.message) < 8300
    assert tgi.pipes[0].closed_at is not None


async def test_an_invalid_response_head_is_a_protocol_error_not_retried():
    async def garbage(request: Request) -> None:
        request.pipe.protocol.data_received(b"NOT HTTP AT ALL\r\n\r\n")
        await asyncio.sleep(math.inf)

    async with mock(garbage) as (client, tgi):
        with pytest.raises(TGIProtocolError, match="^TGI sent no valid response head"):
            await client.generate("Hi", {})
    assert len(tgi.requests) == 1


# ------------------------------------------------------------------------------------------ retries


@pytest.mark.parametrize("route", ["generate_stream", "generate"])
async def test_a_connection_closed_before_any_response_is_retried_then_unavailable(route):
    async with mock(lambda r: None) as (client, tgi):
        start = time.monotonic()
        with pytest.raises(TGIUnavailableError) as info:
            await open_generation(client, route)
        elapsed = time.monotonic() - start
    assert len(tgi.requests) == 3
    assert elapsed < 0.5
    assert info.value.status_code == 503
    assert info.value.message.startswith(
        f"TGI is not reachable at {BASE}: connection closed before any response"
    )
    assert isinstance(info.value.__cause__, aiohttp.ServerDisconnectedError)


@pytest.mark.parametrize("route", ["generate_stream", "generate"])
async def test_a_refused_connection_is_retried_then_unavailable(route):
    async with mock(generation_of, refuse=5) as (client, tgi):
        with pytest.raises(TGIUnavailableError) as info:
            await open_generation(client, route)
    assert tgi.attempts == 3 and not tgi.requests
    assert info.value.message.startswith(f"TGI is not reachable at {BASE}: Cannot connect to host")
    assert isinstance(info.value.__cause__, aiohttp.ClientConnectorError)


async def test_a_connection_not_opened_in_time_is_unavailable():
    class Unresponsive(InProcessTGI):
        async def _create_connection(self, req: Any, traces: Any, timeout: Any) -> Any:
            self.attempts += 1
            await asyncio.sleep(math.inf)

    tgi = Unresponsive(generation_of)
    async with TGIClient(
        BASE, connector=tgi, **{**SETTINGS, "connect_timeout": 0.05, "connect_retries": 2}
    ) as client:
        start = time.monotonic()
        with pytest.raises(TGIUnavailableError) as info:
            await client.generate("Hi", {})
        assert 0.1 <= time.monotonic() - start < 0.5
    assert tgi.attempts == 2
    assert info.value.message == f"TGI is not reachable at {BASE}: connection timed out after 0.05 s"
    assert isinstance(info.value.__cause__, TimeoutError)  # the access log's "timeout" kind


@pytest.mark.parametrize("connect_retries,expected", [(1, 1), (4, 4)])
async def test_a_first_failure_is_retried_after_the_backoff_as_any(connect_retries, expected):
    """One replica: every attempt goes to it again, `connect_retries` attempts in all, and the backoff (~50 ms)
    comes before the second."""
    times: list[float] = []

    def handler(request: Request) -> Reply | None:
        times.append(time.monotonic())
        return (
            None if len(times) < expected else sse([data(tok(1, "Hi")), data(final(2, "<|eot_id|>", "Hi"))])
        )

    async with mock(handler, connect_retries=connect_retries) as (client, _):
        assert (await collect(client))[0].text == "Hi"
    assert len(times) == expected
    if expected > 1:
        assert times[1] - times[0] >= 0.045, "the first retry waits the backoff"


@pytest.mark.parametrize("connect_retries,expected", [(0, 1), (1, 1), (5, 5)])
async def test_connect_retries_is_the_number_of_attempts(connect_retries, expected):
    async with mock(generation_of, refuse=10, connect_retries=connect_retries) as (client, tgi):
        start = time.monotonic()
        with pytest.raises(TGIUnavailableError):
            await client.info()
        assert time.monotonic() - start < 1.0
    assert tgi.attempts == expected


async def test_a_retry_that_connects_answers_normally():
    async with mock(generation_of, refuse=2) as (client, tgi):
        assert await collect(client) == HELLO_ITEMS
        tgi.refuse, tgi.attempts = 2, 0
        for pipe in tgi.pipes:  # no pooled connection: the next request connects again
            pipe.close()
        await settled()
        assert await client.generate("Hi", {"details": True}) == GENERATION
    assert tgi.attempts == 3


async def test_no_retry_once_the_response_started():
    async with mock(lambda r: sse([data(HELLO[0]), data(HELLO[1])], then="reset")) as (client, tgi):
        items, error = await collect_until_error(client)
    assert len(tgi.requests) == 1
    assert items == HELLO_ITEMS[:2]
    assert type(error) is TGIProtocolError and error.message.startswith(protocol.STREAM_CUT + " (")
    assert isinstance(error.__cause__, aiohttp.ClientPayloadError)


# ------------------------------------------------------------------------------------------ timeouts


async def test_no_answer_within_the_first_token_timeout_is_a_504_not_retried():
    async def handler(request: Request) -> Reply:
        await asyncio.sleep(2)
        return sse(HELLO_BODY)

    async with mock(handler, first_token_timeout=0.2) as (client, tgi):
        start = time.monotonic()
        with pytest.raises(TGITimeoutError) as info:
            async with client.generate_stream("Hi", {}):
                pass
        assert time.monotonic() - start < 1.0
        await settled()
    assert len(tgi.requests) == 1
    assert (info.value.status_code, info.value.code) == (504, "timeout")
    assert info.value.message == "TGI did not answer within 0.2 s (first-token timeout)"
    assert tgi.pipes[0].closed_at is not None, "TGI's request is closed"


async def test_the_first_token_deadline_spans_the_connection_retries():
    async with mock(lambda r: None, first_token_timeout=0.12, connect_retries=10) as (client, tgi):
        start = time.monotonic()
        with pytest.raises(TGITimeoutError, match="first-token timeout"):
            async with client.generate_stream("Hi", {}):
                pass
        assert 0.12 <= time.monotonic() - start < 0.4
    assert 1 < len(tgi.requests) < 10


async def test_keepalives_are_not_a_first_token():
    """The head arrived (TGI answers at once) but no token did: keep-alive comments do not count."""
    async with mock(lambda r: sse([b":\n\n", 0.1, b":\n\n"], then="hang"), first_token_timeout=0.25) as (
        client,
        _,
    ):
        start = time.monotonic()
        items, error = await collect_until_error(client)
        assert 0.25 <= time.monotonic() - start < 0.6
    assert items == []
    assert (type(error), error.status_code, error.code) == (TGITimeoutError, 504, "timeout")
    assert error.message == "TGI sent no token within 0.25 s (first-token timeout): it may be overloaded"


async def test_silence_between_tokens_is_a_read_timeout_and_closes_tgis_request():
    async with mock(lambda r: sse([data(HELLO[0]), data(HELLO[1])], then="hang"), read_timeout=0.2) as (
        client,
        tgi,
    ):
        start = time.monotonic()
        items, error = await collect_until_error(client)
        assert time.monotonic() - start < 1.0
        await settled()
    assert items == HELLO_ITEMS[:2]
    assert type(error) is TGITimeoutError
    assert error.message == "TGI sent nothing for 0.2 s in the middle of the generation (read timeout)"
    assert tgi.pipes[0].closed_at is not None


async def test_read_timeouts_count_from_each_wait_not_from_the_first():
    """One deadline timer serves a stream's reads: a read that starts after a long (first) timeout was armed
    still gets its own, shorter deadline, a live stream never expires however long it lasts, and a silence
    expires `timeout` after the last read began -- not earlier, not much later."""
    gap, timeout = 0.03, 0.25
    pieces: list[bytes | float] = [data(tok(1, "x"))]
    for i in range(2, 22):  # 0.6 s of tokens 30 ms apart: longer than the timeout, never silent that long
        pieces += [gap, data(tok(i, "x"))]
    settings = {"first_token_timeout": 10.0, "read_timeout": timeout}
    async with (
        mock(lambda r: sse(pieces, then="hang"), **settings) as (client, _),
        client.generate_stream("Hi", {}) as tokens,
    ):
        received = len(await tokens.batch())  # the first read armed the timer 10 s ahead
        while received < 21:
            received += len(await tokens.batch())
        started = time.monotonic()
        with pytest.raises(TGITimeoutError, match="read timeout"):
            await tokens.batch()
        waited = time.monotonic() - started
    assert timeout - 0.01 <= waited < timeout + 0.2, waited


async def test_a_deadline_does_not_swallow_a_cancellation_from_elsewhere():
    reply = sse([data(HELLO[0])], then="hang")
    async with (
        mock(lambda r: reply, read_timeout=0.1) as (client, _),
        client.generate_stream("Hi", {}) as tokens,
    ):
        await tokens.batch()
        task = asyncio.ensure_future(tokens.batch())
        await asyncio.sleep(0.1)  # the deadline and the cancellation together
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# ------------------------------------------------------------------------------------------ lifecycle


async def test_leaving_the_context_closes_the_connection_at_once():
    slow = [data(tok(i, "x")) for i in range(1, 5)]
    async with mock(lambda r: sse(slow, then="hang")) as (client, tgi):
        async with client.generate_stream("Hi", {}) as events:
            async for _ in events:
                break
            assert tgi.pipes[0].closed_at is None
        assert tgi.pipes[0].closed_at is not None  # at once: synchronously on leaving

        with pytest.raises(KeyError):
            async with client.generate_stream("Hi", {}) as events:
                await events.__anext__()
                raise KeyError("the caller's own error passes through")
        assert tgi.pipes[1].closed_at is not None

        with pytest.raises(RuntimeError, match="after its generate_stream"):
            await events.__anext__()


async def test_a_stream_read_to_its_end_gives_its_connection_back():
    async with mock(generation_of) as (client, tgi):
        for _ in range(3):
            async with client.generate_stream("Hi", {}) as tokens:
                assert await tokens.batch() == HELLO_ITEMS
                with pytest.raises(StopAsyncIteration):  # reads the end of the body
                    await tokens.batch()
    assert len(tgi.pipes) == 1 and len(tgi.requests) == 3


async def test_a_stream_left_after_its_final_event_but_before_its_end_is_closed():
    async with mock(lambda r: sse([HELLO_BODY], then="hang")) as (client, tgi):
        async with client.generate_stream("Hi", {}) as tokens:
            assert await tokens.batch() == HELLO_ITEMS and tokens.ended  # the end of the body is not read
        await settled()
    assert tgi.pipes[0].closed_at is not None


async def test_an_unfinished_body_closes_the_connection_then_a_new_one_serves():
    async with mock(generation_of) as (client, tgi):
        async with client.generate_stream("Hi", {}) as tokens:
            await tokens.batch()  # every item, but the end of the body is not read
        async with client.generate_stream("Hi", {}):
            pass  # nothing read
        assert await client.generate("Hi", {"details": True}) == GENERATION
    assert len(tgi.pipes) == 3
    assert [p.closed_at is not None for p in tgi.pipes] == [True, True, True]  # the last one by aclose


async def test_connection_close_is_honoured():
    def handler(request: Request) -> Reply:
        reply = answer()
        reply.headers["connection"] = "close"
        return reply

    async with mock(handler) as (client, tgi):
        for _ in range(2):
            assert await client.generate("Hi", {"details": True}) == GENERATION
    assert len(tgi.pipes) == 2


# ------------------------------------------------------------------------------------------ /generate


async def test_generate_over_a_chunked_body_too():
    body = generate_answer(finish_reason="length")
    pieces: list[bytes | float] = [body[i : i + 7] for i in range(0, len(body), 7)]  # inside UTF-8 sequences
    reply = Reply(headers={"content-type": JSON, "x-prompt-tokens": "7"}, body=pieces)
    async with mock(lambda r: reply) as (client, _):
        assert await client.generate("Hi", {"details": True}) == Generation(GENERATION.tokens, "length", 3, 7)


@pytest.mark.parametrize("header", [None, "", "abc", "-1", "1.5", "7 7", "1_0"])
async def test_generate_without_a_valid_x_prompt_tokens_has_no_input_length(header):
    async with mock(lambda r: answer(prompt_tokens=header)) as (client, _):
        generation = await client.generate("Hi", {"details": True})
    assert generation.input_length is None and generation.tokens == GENERATION.tokens


@pytest.mark.parametrize("body", [b"{not json", b"[1]", b'{"generated_text": "Hi"}'])
async def test_generate_answer_that_is_not_tgis_is_a_protocol_error(body):
    async with mock(lambda r: Reply(headers={"content-type": JSON}, body=body)) as (client, _):
        with pytest.raises(TGIProtocolError, match="^TGI's /generate answer ") as info:
            await client.generate("Hi", {"details": True})
    assert info.value.headers == {"x-should-retry": "false"}


async def test_generate_answer_announced_over_the_size_cap_is_not_read(monkeypatch):
    monkeypatch.setattr(protocol, "MAX_GENERATE_BODY", 1000)

    async def head_only(request: Request) -> None:  # the body would never come: reading it would time out
        request.pipe.protocol.data_received(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1001\r\n\r\n"
        )
        await asyncio.sleep(math.inf)

    async with mock(head_only, request_timeout=5.0) as (client, tgi):
        start = time.monotonic()
        with pytest.raises(TGIProtocolError, match="^TGI's /generate answer is over 1000 bytes$") as info:
            await client.generate("Hi", {"details": True})
        assert time.monotonic() - start < 0.5
        await settled()
    assert info.value.headers == {"x-should-retry": "false"}
    assert tgi.pipes[0].closed_at is not None


async def test_generate_answer_over_the_size_cap_is_read_no_further(monkeypatch):
    monkeypatch.setattr(protocol, "MAX_GENERATE_BODY", 1000)
    big = answer(tokens=GENERATE_TOKENS * 20)
    content = big.body
    assert isinstance(content, bytes) and len(content) > 1200
    big.body = [content[:600], 0.02, content[600:1200], 0.02, content[1200:]]  # chunked: no size announced
    async with mock(lambda r: big) as (client, tgi):
        with pytest.raises(TGIProtocolError, match="TGI's /generate answer is over") as info:
            await client.generate("Hi", {"details": True})
        assert info.value.headers == {"x-should-retry": "false"}
        await settled()
        assert tgi.pipes[0].received < len(content)  # read up to the cap and a piece more, not to its end
        assert tgi.pipes[0].closed_at is not None
        monkeypatch.setattr(protocol, "MAX_GENERATE_BODY", len(content))  # exactly the cap: fine
        assert len((await client.generate("Hi", {"details": True})).tokens) == 60


async def test_generate_longer_than_the_request_timeout_is_a_504_not_retried():
    async def handler(request: Request) -> Reply:
        await asyncio.sleep(2)  # TGI still generating
        return answer()

    # The stream timeouts are shorter still: they do not apply to /generate.
    async with mock(handler, request_timeout=0.3, first_token_timeout=0.05, read_timeout=0.05) as (
        client,
        tgi,
    ):
        start = time.monotonic()
        with pytest.raises(TGITimeoutError) as info:
            await client.generate("Hi", {"details": True})
        elapsed = time.monotonic() - start
        await settled()
    assert 0.3 <= elapsed < 1.0
    assert len(tgi.requests) == 1
    assert (info.value.status_code, info.value.code) == (504, "timeout")
    assert info.value.message == "TGI did not finish the generation within 0.3 s (--request-timeout)"
    assert tgi.pipes[0].closed_at is not None, "TGI's request is closed"


async def test_generate_body_stalled_past_the_request_timeout_is_a_504():
    """The deadline covers the body too: the head arrived, the rest of the answer never does."""
    reply = Reply(headers={"content-type": JSON}, body=[generate_answer()[:50]], then="hang")
    async with mock(lambda r: reply, request_timeout=0.3) as (client, _):
        start = time.monotonic()
        with pytest.raises(TGITimeoutError, match="--request-timeout"):
            await client.generate("Hi", {"details": True})
        assert 0.3 <= time.monotonic() - start < 1.0


async def test_generate_slower_than_the_stream_timeouts_is_fine():
    async def handler(request: Request) -> Reply:
        await asyncio.sleep(0.3)
        return answer()

    async with mock(handler, first_token_timeout=0.05, read_timeout=0.05) as (client, _):
        assert await client.generate("Hi", {"details": True}) == GENERATION


async def test_generate_cut_answer_is_a_protocol_error_not_retried():
    reply = Reply(headers={"content-type": JSON}, body=[generate_answer()[:40]], then="reset")
    async with mock(lambda r: reply) as (client, tgi):
        with pytest.raises(TGIProtocolError) as info:
            await client.generate("Hi", {"details": True})
    assert len(tgi.requests) == 1
    assert info.value.message.startswith("TGI closed the connection in the middle of its answer (")


async def test_generate_cancelled_closes_its_connection_at_once():
    async def handler(request: Request) -> Reply:
        await asyncio.sleep(math.inf)

    async with mock(handler) as (client, tgi):
        task = asyncio.ensure_future(client.generate("Hi", {"details": True}))
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await settled()
    assert tgi.pipes[0].closed_at is not None


async def test_generations_share_one_pool_and_reuse_their_connection():
    def handler(request: Request) -> Reply:
        if request.path == "/generate_stream":
            return sse(HELLO_BODY)
        if request.body.startswith(b'{"inputs":"bad"'):
            error = {
                "error": "Input validation error: `top_k` must be strictly positive",
                "error_type": "validation",
            }
            return Reply(422, {"content-type": JSON}, json.dumps(error).encode())
        return answer()

    async with mock(handler) as (client, tgi):
        assert await client.generate("Hi", {"details": True}) == GENERATION
        assert await client.generate("Hi", {"details": True}) == GENERATION
        with pytest.raises(TGIValidationError):  # an error answer read whole: reusable too
            await client.generate("bad", {"details": True})
        assert await collect(client) == HELLO_ITEMS
        assert await client.generate("Hi", {"details": True}) == GENERATION
    assert len(tgi.pipes) == 1 and len(tgi.requests) == 5


# ------------------------------------------------------------------------------------------ health, info


@pytest.mark.parametrize(
    "reply,healthy",
    [
        (Reply(200, {}, b""), True),
        (Reply(503, {"content-type": JSON}, b'{"error":"unhealthy","error_type":"healthcheck"}'), False),
        (Reply(404, {}, b""), False),
        ("refused", False),
        ("slow", False),
    ],
    ids=["200", "503", "404", "unreachable", "timeout"],
)
async def test_health(reply, healthy):
    async def handler(request: Request) -> Reply:
        if reply == "slow":
            await asyncio.sleep(math.inf)
        return reply

    async with mock(handler, refuse=1 if reply == "refused" else 0) as (client, tgi):
        start = time.monotonic()
        assert await client.health(timeout=0.2) is healthy
        assert time.monotonic() - start < 0.5
    assert tgi.attempts == 1  # no retries: it is a probe
    assert [r.path for r in tgi.requests] == ([] if reply == "refused" else ["/health"])


TGI_INFO = {"model_id": "meetkai/functionary-small-v3.2", "max_concurrent_requests": 64, "max_best_of": 1,
            "max_stop_sequences": 6, "max_input_tokens": 8191, "max_total_tokens": 8192, "version": "3.3.6-dev0"}  # fmt: skip


async def test_info():
    async with mock(lambda r: Reply(200, {"content-type": JSON}, json.dumps(TGI_INFO).encode())) as (
        client,
        tgi,
    ):
        info = await client.info()
        assert await client.info() == info
    assert info == TGIInfo("meetkai/functionary-small-v3.2", 8191, 8192, 6, 64, 1, "3.3.6-dev0", TGI_INFO)
    assert [(r.method, r.path) for r in tgi.requests] == [("GET", "/info")] * 2 and len(tgi.pipes) == 1


@pytest.mark.parametrize(
    "reply,cls,attempts",
    [
        (Reply(200, {"content-type": "text/html"}, b"<html>hi</html>"), TGIProtocolError, 1),
        (Reply(200, {"content-type": JSON}, b"[1, 2]"), TGIProtocolError, 1),
        (Reply(404, {}, b""), TGIRejectedError, 1),
        (Reply(500, {"content-type": TEXT}, b"boom"), UpstreamError, 1),
        ("refused", TGIUnavailableError, 3),
        ("slow", TGITimeoutError, 1),
    ],
    ids=["html", "list", "404", "500", "unreachable", "timeout"],
)
async def test_info_errors(reply, cls, attempts):
    async def handler(request: Request) -> Reply:
        if reply == "slow":
            await asyncio.sleep(math.inf)
        return reply

    async with mock(handler, refuse=10 if reply == "refused" else 0, read_timeout=0.2) as (client, tgi):
        with pytest.raises(UpstreamError) as info:
            await client.info()
    assert type(info.value) is cls
    assert tgi.attempts == attempts
    if reply == "slow":
        assert info.value.message == "TGI did not answer /info within 0.2 s"


@pytest.mark.parametrize(("first_token", "read", "bound"), [(0.2, 30.0, 0.2), (30.0, 0.2, 0.2)])
async def test_info_waits_no_longer_than_a_first_token_or_a_silence(first_token, read, bound):
    async def handler(request: Request) -> Reply:
        await asyncio.sleep(math.inf)

    async with mock(handler, first_token_timeout=first_token, read_timeout=read) as (client, _):
        started = time.perf_counter()
        with pytest.raises(TGITimeoutError) as info:
            await client.info()
    assert bound <= time.perf_counter() - started < bound + 2
    assert info.value.message == f"TGI did not answer /info within {bound:g} s"
    assert info.value.status_code == 504


async def test_concurrent_streams_each_have_a_connection_then_reuse_them():
    gate = asyncio.Event()

    async def handler(request: Request) -> Reply:
        await gate.wait()
        return sse(HELLO_BODY)

    async with mock(handler) as (client, tgi):
        async with anyio.create_task_group() as group:
            for _ in range(20):
                group.start_soon(collect, client)
            await asyncio.sleep(0.05)
            assert len(tgi.pipes) == 20
            gate.set()
        results = [await collect(client) for _ in range(5)]
    assert results == [HELLO_ITEMS] * 5 and len(tgi.pipes) == 20
