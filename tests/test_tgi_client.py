"""tgi_gateway.tgi.client: SSE framing, token/end parsing, /generate answers, error mapping, retries,
health/info.

Stream and /generate unit tests script exact responses with httpx-style handlers served over a real
loopback socket (``tests/fakes/handler_server.py``: the generations do not go through httpx); ``/health`` and
``/info`` use a respx router behind ``httpx.MockTransport``. The SSE decoder is tested sans-IO over
every split. The tests at the end run against the TGI double (``tests/fakes/tgi.py``), where
streaming, disconnects and connection pooling are real.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import socket
import time
from collections.abc import AsyncIterator, Callable

import anyio
import httpx
import pytest
import respx

from tests.fakes.handler_server import HandlerServer
from tests.fakes.tgi import Drop, FakeTGI, Gate, Incomplete, Pause, count_tokens, tokens
from tgi_gateway.errors import (
    ContextLengthExceededError,
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
from tgi_gateway.tgi import client as tgi_client
from tgi_gateway.tgi import http1
from tgi_gateway.tgi.client import (
    Generation,
    SSEDecoder,
    StreamEnd,
    TGIClient,
    TGIInfo,
    Token,
    map_tgi_error,
)

pytestmark = pytest.mark.anyio

BASE = "http://tgi.test"
CLOSED_EARLY = "TGI closed the stream before the end of the generation"


@pytest.fixture
def anyio_backend():
    return "asyncio"


# ------------------------------------------------------------------------------------------ helpers


class Body(httpx.AsyncByteStream):
    """A response body sent in the given chunks; then optionally raises; records being closed."""

    def __init__(self, chunks: list[bytes], *, then: Exception | None = None) -> None:
        self.chunks = chunks
        self.then = then
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        if self.then is not None:
            raise self.then

    async def aclose(self) -> None:
        self.closed = True


def sse(
    chunks: bytes | list[bytes],
    *,
    status: int = 200,
    content_type: str = "text/event-stream",
    then: Exception | None = None,
) -> httpx.Response:
    body = Body([chunks] if isinstance(chunks, bytes) else chunks, then=then)
    return httpx.Response(status, headers={"content-type": content_type}, stream=body)


def data(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def tok(index: int, text: str, *, special: bool = False, id: int | None = None) -> dict:
    return {
        "index": index,
        "token": {
            "id": 1000 + index if id is None else id,
            "text": text,
            "logprob": -0.5,
            "special": special,
        },
        "generated_text": None,
        "details": None,
    }


def final(
    index: int,
    text: str,
    generated_text: str,
    *,
    finish_reason: str = "eos_token",
    details: bool = True,
    input_length: int = 7,
    special: bool = True,
) -> dict:
    event = tok(index, text, special=special, id=2)
    event["generated_text"] = generated_text
    if details:
        event["details"] = {
            "finish_reason": finish_reason,
            "generated_tokens": index,
            "seed": None,
            "input_length": input_length,
        }
    return event


HELLO = [tok(1, "Hél"), tok(2, "lo 🌍"), final(3, "</s>", "Héllo 🌍")]
HELLO_ITEMS = [
    Token("Hél", False, 1001),
    Token("lo 🌍", False, 1002),
    Token("</s>", True, 2),
    StreamEnd("eos_token", 3, 7, "Héllo 🌍"),
]


class mock:
    """``async with mock(handler, **client_kwargs) as client``: a TGIClient to the handler's server."""

    def __init__(self, handler: Callable[[httpx.Request], httpx.Response], **kwargs) -> None:
        self.server = HandlerServer(handler)
        self.kwargs = kwargs

    async def __aenter__(self) -> TGIClient:
        self.client = TGIClient(await self.server.__aenter__(), **self.kwargs)
        return self.client

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()
        await self.server.__aexit__(*exc)


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
    exc: BaseException, cls: type, status: int, type_: str, code: str | None = None, param: str | None = None
) -> None:
    assert type(exc) is cls, repr(exc)
    assert (exc.status_code, exc.type, exc.code, exc.param) == (status, type_, code, param)
    assert exc.to_dict() == {"error": {"message": exc.message, "type": type_, "param": param, "code": code}}


# ------------------------------------------------------------------------------------------ parsing


async def test_tokens_then_end_and_the_request_sent():
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return sse(b"".join(data(e) for e in HELLO))

    params = {
        "details": True,
        "max_new_tokens": 20,
        "stop": ["<|eot_id|>"],
        "temperature": 0.7,
        "x_unknown": 1,
    }
    async with mock(handler) as client:
        assert await collect(client, "Hello <|eot_id|>", params) == HELLO_ITEMS
    (request,) = seen
    assert request.method == "POST" and request.url.path == "/generate_stream"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["accept"] == "text/event-stream"
    assert "authorization" not in request.headers
    assert json.loads(request.content) == {"inputs": "Hello <|eot_id|>", "parameters": params}


async def test_api_key_is_sent_as_bearer_token():
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return sse(b"".join(data(e) for e in HELLO))

    async with mock(handler, api_key="s3cret") as client:
        await collect(client)
    assert seen[0].headers["authorization"] == "Bearer s3cret"


def framings() -> list[tuple[str, bytes]]:
    """The same stream with TGI's framing, keep-alives, CRLF / CR line ends, extra SSE fields, [DONE]."""
    lf = b":\n\n" + data(HELLO[0]) + b": keep-alive\n\n" + data(HELLO[1]) + b":\n\n" + data(HELLO[2])
    crlf = lf.replace(b"\n", b"\r\n")
    cr = lf.replace(b"\n", b"\r")
    fields = (
        b"retry: 100\nid: 7\n\n"
        + b"event: message\n"
        + data(HELLO[0])
        + b"data:"
        + data(HELLO[1])[5:]
        + data(HELLO[2])
    )
    done = lf + b"data: [DONE]\n\n"
    return [("lf", lf), ("crlf", crlf), ("cr", cr), ("fields", fields), ("done", done)]


@pytest.mark.parametrize("name,body", framings(), ids=[n for n, _ in framings()])
def test_sse_decoding_is_split_invariant(name, body):
    """Whole, one byte at a time, every 2-way split (inside UTF-8 sequences and CRLFs too) and random
    splits all give the same event data."""
    expected = [json.dumps(e, separators=(",", ":"), ensure_ascii=False).encode() for e in HELLO]
    if name == "done":
        expected.append(b"[DONE]")
    splits = [[body], [body[i : i + 1] for i in range(len(body))]]
    splits += [[body[:i], body[i:]] for i in range(1, len(body))]
    rng = random.Random(name)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(body)), 6))
        splits.append([body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)])])
    for chunks in splits:
        decoder = SSEDecoder()
        assert [d for chunk in chunks for d in decoder.feed(chunk)] == expected, chunks


def test_sse_multiline_data_and_events_without_data():
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\ndata:b\n\nevent: x\n\n: c\n\ndata\n\n") == [b"a\nb"]


@pytest.mark.parametrize("name,body", framings(), ids=[n for n, _ in framings()])
async def test_framing_over_a_socket(name, body):
    """Each framing, sent in pieces of 7 bytes, gives the same items."""
    pieces = [body[i : i + 7] for i in range(0, len(body), 7)]
    async with mock(lambda request: sse(pieces)) as client:
        assert await collect(client) == HELLO_ITEMS


async def test_details_null_gives_an_end_with_unknown_finish_reason():
    body = data(tok(1, "Hi")) + data(final(2, "<|eot_id|>", "Hi", details=False))
    async with mock(lambda request: sse(body)) as client:
        items = await collect(client, parameters={})
    assert items == [Token("Hi", False, 1001), Token("<|eot_id|>", True, 2), StreamEnd(None, 2, None, "Hi")]


async def test_end_on_details_alone_and_on_length():
    """A final event is one with generated_text *or* details; the last token may be a normal one."""
    last = final(2, " there", "Hi there", finish_reason="length", special=False)
    last["generated_text"] = None
    body = data(tok(1, "Hi")) + data(last)
    async with mock(lambda request: sse(body)) as client:
        items = await collect(client)
    assert items[-2:] == [Token(" there", False, 2), StreamEnd("length", 2, 7, None)]


async def test_nothing_is_read_after_the_end():
    """Events after the final one are ignored (TGI sends none)."""
    body = b"".join(data(e) for e in HELLO) + data(tok(9, "junk"))
    async with mock(lambda request: sse(body)) as client:
        assert await collect(client) == HELLO_ITEMS


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b":\n\n",
        data(HELLO[0]) + data(HELLO[1]),
        data(HELLO[0]) + data(HELLO[1]) + b"data: [DONE]\n\n",
        data(HELLO[0]) + data(HELLO[1]) + data(HELLO[2])[:-1],  # final event cut before its blank line
        data(HELLO[0]) + data(HELLO[1])[:30],
    ],
    ids=["empty", "keepalive-only", "no-final", "done-no-final", "final-unterminated", "cut-mid-event"],
)
async def test_stream_without_final_event_is_a_protocol_error(body):
    async with mock(lambda request: sse(body)) as client:
        items, error = await collect_until_error(client)
    assert all(isinstance(i, Token) for i in items)
    assert_error(error, TGIProtocolError, 502, "server_error")
    assert error.message == CLOSED_EARLY


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
    async with mock(lambda request: sse(data(HELLO[0]) + line)) as client:
        items, error = await collect_until_error(client)
    assert items == [HELLO_ITEMS[0]]
    assert_error(error, TGIProtocolError, 502, "server_error")


# ------------------------------------------------------------------------------------------ error events

V = "Input validation error: "
ERROR_EVENTS = [
    # error_type, TGI's text, class, status, OpenAI type, code, param
    (
        "validation",
        V + "`temperature` must be strictly positive",
        TGIValidationError,
        400,
        "invalid_request_error",
        None,
        "temperature",
    ),
    (
        "validation",
        V + "`top_p` must be > 0.0 and < 1.0",
        TGIValidationError,
        400,
        "invalid_request_error",
        None,
        "top_p",
    ),
    (
        "validation",
        V + "`top_k` must be strictly positive",
        TGIValidationError,
        400,
        "invalid_request_error",
        None,
        None,
    ),
    (
        "validation",
        V + "`max_new_tokens` must be strictly positive",
        TGIValidationError,
        400,
        "invalid_request_error",
        None,
        "max_tokens",
    ),
    (
        "validation",
        V + "`stop` supports up to 4 stop sequences. Given: 5",
        TGIValidationError,
        400,
        "invalid_request_error",
        None,
        "stop",
    ),
    (
        "validation",
        V + "`frequency_penalty` must be >= -2.0 and <= 2.0",
        TGIValidationError,
        400,
        "invalid_request_error",
        None,
        "frequency_penalty",
    ),
    (
        "validation",
        V + "`top_n_tokens` must be >= 0 and <= 5. Given: 9",
        TGIValidationError,
        400,
        "invalid_request_error",
        None,
        "top_logprobs",
    ),
    (
        "validation",
        V + "`inputs` cannot be empty",
        TGIValidationError,
        400,
        "invalid_request_error",
        None,
        "messages",
    ),
    (
        "validation",
        V + "`inputs` must have less than 4095 tokens. Given: 5000",
        TGIContextLengthError,
        400,
        "invalid_request_error",
        "context_length_exceeded",
        "messages",
    ),
    (
        "validation",
        V + "`inputs` tokens + `max_new_tokens` must be <= 4096. Given: 4000 `inputs` tokens and "
        "200 `max_new_tokens`",
        TGIContextLengthError,
        400,
        "invalid_request_error",
        "context_length_exceeded",
        "messages",
    ),
    (
        "validation",
        V + "`best_of` != 1 is not supported when streaming tokens",
        TGIValidationError,
        400,
        "invalid_request_error",
        None,
        None,
    ),
    (
        "validation",
        V + "grammar is not valid: Grammar must have a 'properties' field",
        TGIValidationError,
        400,
        "invalid_request_error",
        None,
        None,
    ),
    ("overloaded", "Model is overloaded", TGIOverloadedError, 429, "requests", "rate_limit_exceeded", None),
    (
        "generation",
        "Request failed during generation: CUDA out of memory",
        TGIGenerationError,
        502,
        "server_error",
        None,
        None,
    ),
    (
        "incomplete_generation_stream",
        "Incomplete generation stream",
        TGIGenerationError,
        502,
        "server_error",
        None,
        None,
    ),
    (
        "stream_serialization_error",
        "Stream event serialization error",
        UpstreamError,
        502,
        "server_error",
        None,
        None,
    ),
    ("something_new", "A new kind of failure", UpstreamError, 502, "server_error", None, None),
]


@pytest.mark.parametrize(
    "error_type,text,cls,status,type_,code,param",
    ERROR_EVENTS,
    ids=[f"{e[0]}-{i}" for i, e in enumerate(ERROR_EVENTS)],
)
async def test_error_event_after_tokens(error_type, text, cls, status, type_, code, param):
    body = data(HELLO[0]) + data(HELLO[1]) + data({"error": text, "error_type": error_type})
    async with mock(lambda request: sse(body)) as client:
        items, error = await collect_until_error(client)
    assert items == HELLO_ITEMS[:2]
    assert_error(error, cls, status, type_, code, param)
    assert map_tgi_error(error_type, text).to_dict() == error.to_dict()
    if cls in (TGIValidationError, TGIContextLengthError):
        assert error.message == text  # verbatim
        assert isinstance(error, InvalidRequestError)
        assert error.headers == {"x-should-retry": "false"}
    elif cls is UpstreamError:
        assert text in error.message


def test_messages_headers_and_the_tree():
    generation = map_tgi_error("generation", "Request failed during generation: CUDA out of memory")
    assert generation.message == "TGI failed during generation: CUDA out of memory"
    assert generation.headers == {}
    overloaded = map_tgi_error("overloaded", "Model is overloaded")
    assert overloaded.headers == {"Retry-After": "1"} and overloaded.retry_after == 1
    assert TGIOverloadedError("x", retry_after=3).headers == {"Retry-After": "3"}
    context = map_tgi_error("validation", V + "`inputs` must have less than 10 tokens. Given: 12")
    assert isinstance(context, ContextLengthExceededError) and isinstance(context, TGIValidationError)
    unhealthy = map_tgi_error("healthcheck", "unhealthy", 503)
    assert_error(unhealthy, TGIUnavailableError, 503, "server_error")
    assert UpstreamError("x", headers={"a": "b"}).headers == {"a": "b"}
    for cls in (
        TGIValidationError,
        TGIOverloadedError,
        TGIGenerationError,
        TGIUnavailableError,
        TGIProtocolError,
        TGIRejectedError,
    ):
        assert issubclass(cls, UpstreamError) and issubclass(cls, GatewayError)


async def test_openai_shaped_error_event_is_tolerated():
    body = data(
        {
            "error": {
                "message": "Input validation error: `top_p` must be > 0.0 and < 1.0",
                "http_status_code": 422,
            },
            "error_type": "validation",
        }
    )
    async with mock(lambda request: sse(body)) as client:
        _, error = await collect_until_error(client)
    assert_error(error, TGIValidationError, 400, "invalid_request_error", None, "top_p")


# ------------------------------------------------------------------------------------------ HTTP statuses

JSON, TEXT = "application/json", "text/plain; charset=utf-8"
STATUSES = [
    # status, content-type, body, class, status, type, code, param
    (
        422,
        TEXT,
        (
            "Failed to deserialize the JSON body into the target type: parameters.temperature: invalid type: "
            'string "hot", expected f32'
        ),
        TGIValidationError,
        400,
        "invalid_request_error",
        None,
        "temperature",
    ),
    (
        422,
        TEXT,
        (
            "Failed to deserialize the JSON body into the target type: parameters.seed: invalid value: "
            "integer `-1`, expected u64"
        ),
        TGIValidationError,
        400,
        "invalid_request_error",
        None,
        "seed",
    ),
    (
        422,
        TEXT,
        "Failed to deserialize the JSON body into the target type: missing field `inputs`",
        TGIRejectedError,
        502,
        "server_error",
        None,
        None,
    ),
    (
        422,
        JSON,
        json.dumps({"error": V + "`top_p` must be > 0.0 and < 1.0", "error_type": "validation"}),
        TGIValidationError,
        400,
        "invalid_request_error",
        None,
        "top_p",
    ),
    (
        422,
        JSON,
        json.dumps(
            {"error": V + "`inputs` must have less than 8 tokens. Given: 9", "error_type": "validation"}
        ),
        TGIContextLengthError,
        400,
        "invalid_request_error",
        "context_length_exceeded",
        "messages",
    ),
    (
        424,
        JSON,
        json.dumps(
            {
                "error": "Request failed during generation: Server error: CUDA out of memory",
                "error_type": "generation",
            }
        ),
        TGIGenerationError,
        502,
        "server_error",
        None,
        None,
    ),
    (
        429,
        JSON,
        json.dumps({"error": "Model is overloaded", "error_type": "overloaded"}),
        TGIOverloadedError,
        429,
        "requests",
        "rate_limit_exceeded",
        None,
    ),
    (
        500,
        JSON,
        json.dumps({"error": "Incomplete generation", "error_type": "incomplete_generation"}),
        TGIGenerationError,
        502,
        "server_error",
        None,
        None,
    ),
    (500, TEXT, "Internal Server Error", UpstreamError, 502, "server_error", None, None),
    (
        503,
        JSON,
        json.dumps({"error": "unhealthy", "error_type": "healthcheck"}),
        TGIUnavailableError,
        503,
        "server_error",
        None,
        None,
    ),
    (401, TEXT, "", TGIRejectedError, 502, "server_error", None, None),
    (403, TEXT, "", TGIRejectedError, 502, "server_error", None, None),
    (404, TEXT, "", TGIRejectedError, 502, "server_error", None, None),
    (405, TEXT, "", TGIRejectedError, 502, "server_error", None, None),
    (
        415,
        TEXT,
        "Expected request with `Content-Type: application/json`",
        TGIRejectedError,
        502,
        "server_error",
        None,
        None,
    ),
    (
        400,
        TEXT,
        "Failed to parse the request body as JSON: EOF while parsing a value at line 1 column 0",
        TGIRejectedError,
        502,
        "server_error",
        None,
        None,
    ),
    (
        413,
        TEXT,
        "Failed to buffer the request body: length limit exceeded",
        TGIContextLengthError,
        400,
        "invalid_request_error",
        "context_length_exceeded",
        "messages",
    ),
    (
        502,
        "text/html",
        "<html><body>502 Bad Gateway</body></html>",
        TGIUnavailableError,
        503,
        "server_error",
        None,
        None,
    ),
    (504, "text/html", "<html>Gateway Time-out</html>", TGIUnavailableError, 503, "server_error", None, None),
    (418, TEXT, "I'm a teapot", UpstreamError, 502, "server_error", None, None),
    (200, JSON, json.dumps({"generated_text": "Hi"}), TGIProtocolError, 502, "server_error", None, None),
    (200, "text/html", "<html>login</html>", TGIProtocolError, 502, "server_error", None, None),
]


async def open_generation(client: TGIClient, route: str) -> None:
    if route == "generate":
        await client.generate("Hi", {"details": True})
    else:
        async with client.generate_stream("Hi", {}):
            pytest.fail("the context must not be entered")


# The same mapping on both routes; the two 200s are not a /generate answer either (JSON without details; a
# page that is not JSON).
@pytest.mark.parametrize("route", ["generate_stream", "generate"])
@pytest.mark.parametrize(
    "status,content_type,body,cls,http,type_,code,param",
    STATUSES,
    ids=[f"{s[0]}-{i}" for i, s in enumerate(STATUSES)],
)
async def test_non_sse_responses_map_by_status(status, content_type, body, cls, http, type_, code, param, route):
    bodies: list[Body] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == f"/{route}"
        bodies.append(Body([body.encode()]))
        return httpx.Response(status, headers={"content-type": content_type}, stream=bodies[-1])

    async with mock(handler) as client:
        with pytest.raises(UpstreamError) as info:
            await open_generation(client, route)
    assert_error(info.value, cls, http, type_, code, param)
    assert len(bodies) == 1, "a response arrived: never retried"
    assert bodies[0].closed
    if cls is TGIRejectedError or status == 200:
        assert info.value.headers["x-should-retry"] == "false"
    if cls is TGIOverloadedError:
        assert info.value.headers == {"Retry-After": "1"}
    if status == 401:
        assert "API key" in info.value.message


# ------------------------------------------------------------------------------------------ retries


@pytest.mark.parametrize("route", ["generate_stream", "generate"])
async def test_connection_closed_before_any_response_is_retried_then_unavailable(route):
    attempts = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal attempts
        attempts += 1
        raise ConnectionResetError  # the server closes the connection without answering

    async with mock(handler) as client:
        start = time.monotonic()
        with pytest.raises(TGIUnavailableError) as info:
            await open_generation(client, route)
        elapsed = time.monotonic() - start
    assert attempts == 3
    assert elapsed < 0.5
    assert_error(info.value, TGIUnavailableError, 503, "server_error")
    assert info.value.message.startswith(f"TGI is not reachable at {client.base_url}: ")
    assert isinstance(info.value.__cause__, http1.ConnectFailed)


@pytest.mark.parametrize("connect_retries,expected", [(1, 1), (4, 4)])
async def test_a_first_failure_is_retried_after_the_backoff_as_any(connect_retries, expected):
    """The first attempt runs outside tenacity (it is the usual case); once it fails, tenacity takes over as
    if it had made it: the same number of attempts, and the same backoff (~50 ms) before the second."""
    times: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        times.append(time.monotonic())
        if len(times) < expected:
            raise ConnectionResetError  # closed without an answer: retried
        return sse([data(tok(1, "Hi")), data(final(2, "<|eot_id|>", "Hi"))])

    async with mock(handler, connect_retries=connect_retries) as client:
        async with client.generate_stream("Hi", {}) as tokens:
            assert [getattr(item, "text", None) for item in [item async for item in tokens]][0] == "Hi"
    assert len(times) == expected
    if expected > 1:
        assert times[1] - times[0] >= 0.045, "the first retry waits the backoff"


@pytest.mark.parametrize("route", ["generate_stream", "generate"])
async def test_connection_refused_is_retried_then_unavailable(route):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        async with TGIClient(url, connect_retries=2) as client:
            start = time.monotonic()
            with pytest.raises(TGIUnavailableError) as info:
                await open_generation(client, route)
            assert time.monotonic() - start < 0.5
    assert info.value.message.startswith(f"TGI is not reachable at {url}: ")


@pytest.mark.parametrize("connect_retries,expected", [(0, 1), (1, 1), (5, 5)])
async def test_connect_retries_is_the_number_of_attempts(connect_retries, expected):
    attempts = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal attempts
        attempts += 1
        raise httpx.ConnectError("refused")

    async with mock(handler, connect_retries=connect_retries) as client:
        start = time.monotonic()
        with pytest.raises(TGIUnavailableError):
            await client.info()
        assert time.monotonic() - start < 1.0
    assert attempts == expected


async def test_a_retry_that_connects_answers_normally():
    attempts = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal attempts
        attempts += 1
        if attempts in (1, 2, 4, 5):
            raise ConnectionResetError
        return sse(b"".join(data(e) for e in HELLO)) if request.url.path == "/generate_stream" else answer()

    async with mock(handler) as client:
        assert await collect(client) == HELLO_ITEMS
        assert await client.generate("Hi", {"details": True}) == GENERATION
    assert attempts == 6


async def test_no_answer_within_the_first_token_timeout_is_a_504_not_retried():
    attempts = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(2)
        return sse(b"".join(data(e) for e in HELLO))

    async with mock(handler, first_token_timeout=0.2) as client:
        start = time.monotonic()
        with pytest.raises(TGITimeoutError) as info:
            async with client.generate_stream("Hi", {}):
                pass
        assert time.monotonic() - start < 1.0
    assert attempts == 1
    assert_error(info.value, TGITimeoutError, 504, "server_error", "timeout")
    assert "first-token timeout" in info.value.message


class Slow(Body):
    """Sends its chunks, then waits (TGI hung) instead of ending."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        await asyncio.sleep(5)


async def test_no_first_token_within_the_first_token_timeout():
    """The head arrived (TGI answers at once) but no token did: keep-alive comments do not count."""
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=Slow([b":\n\n"]))

    async with mock(handler, first_token_timeout=0.2) as client:
        items, error = await collect_until_error(client)
    assert items == []
    assert_error(error, TGITimeoutError, 504, "server_error", "timeout")
    assert "first-token timeout" in error.message


async def test_silence_between_tokens_is_a_read_timeout():
    body = Slow([data(HELLO[0]), data(HELLO[1])])
    async with mock(
        lambda request: httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=body),
        read_timeout=0.2,
    ) as client:
        start = time.monotonic()
        items, error = await collect_until_error(client)
        assert time.monotonic() - start < 1.0
    assert items == HELLO_ITEMS[:2]
    assert_error(error, TGITimeoutError, 504, "server_error", "timeout")
    assert "in the middle of the generation (read timeout)" in error.message


async def test_no_retry_once_the_response_started():
    attempts = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal attempts
        attempts += 1
        return sse([data(HELLO[0]), data(HELLO[1])], then=RuntimeError("TGI died"))  # connection reset

    async with mock(handler) as client:
        items, error = await collect_until_error(client)
    assert attempts == 1
    assert items == HELLO_ITEMS[:2]
    assert_error(error, TGIProtocolError, 502, "server_error")
    assert error.message.startswith(CLOSED_EARLY)
    assert isinstance(error.__cause__, http1.ConnectionClosed)


# ------------------------------------------------------------------------------------------ lifecycle


async def test_leaving_the_context_closes_the_response_at_once():
    bodies: list[Body] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(Slow([data(tok(i, "x")) for i in range(1, 5)]))
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=bodies[-1])

    async def closed(body: Body) -> bool:
        for _ in range(200):
            if body.closed:
                return True
            await asyncio.sleep(0.005)
        return False

    async with mock(handler) as client:
        async with client.generate_stream("Hi", {}) as events:
            async for _ in events:
                break
            assert not bodies[0].closed
        assert await closed(bodies[0])

        with pytest.raises(KeyError):
            async with client.generate_stream("Hi", {}) as events:
                await events.__anext__()
                raise KeyError("the caller's own error passes through")
        assert await closed(bodies[1])

        with pytest.raises(RuntimeError, match="after its generate_stream"):
            await events.__anext__()


async def test_an_unencodable_parameter_sends_nothing():
    def handler(request: httpx.Request) -> httpx.Response:
        pytest.fail("nothing must be sent")

    async with mock(handler) as client:
        with pytest.raises(InvalidRequestError):
            async with client.generate_stream("Hi", {"temperature": float("nan")}):
                pass


# ------------------------------------------------------------------------------------------ /generate

GENERATE_TOKENS = [
    {"id": 1001, "text": "Hél", "logprob": -0.5, "special": False},
    {"id": 1002, "text": "lo 🌍", "logprob": -0.5, "special": False},
    {"id": 2, "text": "<|eot_id|>", "logprob": -0.1, "special": True},
]
GENERATION = Generation(
    [Token("Hél", False, 1001), Token("lo 🌍", False, 1002), Token("<|eot_id|>", True, 2)], "eos_token", 3, 7
)


def answer(
    *, tokens: object = GENERATE_TOKENS, prompt_tokens: str | bytes | None = "7", **details: object
) -> httpx.Response:
    """TGI's /generate answer with details (PROTOCOL.md §2.2-2.3): Content-Length framed JSON."""
    body = {
        # generated_text drops the special tokens: never what the gateway reads
        "generated_text": "Héllo 🌍",
        "details": {"finish_reason": "eos_token", "generated_tokens": 3, "seed": None, "prefill": [],
                    "tokens": tokens, **details},  # fmt: skip
    }
    headers: dict[str, str | bytes] = {"x-compute-type": "gpu+optimized", "x-generated-tokens": "3"}
    if prompt_tokens is not None:
        headers["x-prompt-tokens"] = prompt_tokens
    return httpx.Response(200, json=body, headers=headers)


async def test_generate_returns_the_tokens_with_their_special_flags_and_the_usage():
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answer()

    params = {"details": True, "max_new_tokens": 20, "stop": ["<|eot_id|>"], "temperature": 0.7}
    async with mock(handler, api_key="s3cret") as client:
        assert await client.generate("Hello <|eot_id|>", params) == GENERATION
    (request,) = seen
    assert request.method == "POST" and request.url.path == "/generate"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["accept"] == "application/json"
    assert request.headers["authorization"] == "Bearer s3cret"
    assert json.loads(request.content) == {"inputs": "Hello <|eot_id|>", "parameters": params}


async def test_generate_over_a_chunked_body_too():
    body = json.dumps({"generated_text": "", "details": {"finish_reason": "length", "generated_tokens": 3,
                                                          "tokens": GENERATE_TOKENS}}).encode()  # fmt: skip
    pieces = [body[i : i + 7] for i in range(0, len(body), 7)]  # split inside UTF-8 sequences too
    response = httpx.Response(200, headers={"content-type": "application/json", "x-prompt-tokens": "7"},
                              stream=Body(pieces))  # fmt: skip
    async with mock(lambda request: response) as client:
        assert await client.generate("Hi", {"details": True}) == Generation(GENERATION.tokens, "length", 3, 7)


@pytest.mark.parametrize("header", [None, "", "abc", "-1", "1.5", "7 7", "1_0", b"\xb2"])  # b"\xb2": "²"
async def test_generate_without_a_valid_x_prompt_tokens_has_no_input_length(header):
    async with mock(lambda request: answer(prompt_tokens=header)) as client:
        generation = await client.generate("Hi", {"details": True})
    assert generation.input_length is None
    assert generation.tokens == GENERATION.tokens and generation.generated_tokens == 3


async def test_generate_without_finish_reason_or_count_keeps_the_tokens():
    async with mock(lambda request: answer(finish_reason=None, generated_tokens="3")) as client:
        generation = await client.generate("Hi", {"details": True})
    assert generation == Generation(GENERATION.tokens, None, 3, 7)  # the count: the tokens received
    async with mock(lambda request: answer(tokens=[], generated_tokens=0)) as client:
        assert await client.generate("Hi", {"details": True}) == Generation([], "eos_token", 0, 7)


def tokens_with(item: object) -> list:
    return [GENERATE_TOKENS[0], item]


INVALID_ANSWERS = [
    # a 200 body, what the message says
    (b"{not json", "is not JSON"),
    (b"", "is not JSON"),
    (b"[1, 2]", "is not a JSON object"),
    (b'"hi"', "is not a JSON object"),
    (b'{"generated_text": "Hi"}', "has no `details` object"),  # details: false, or a TGI that ignored it
    (b'{"generated_text": "Hi", "details": null}', "has no `details` object"),
    (b'{"generated_text": "Hi", "details": [1]}', "has no `details` object"),
    (b'{"details": {"finish_reason": "length", "generated_tokens": 1}}', "has no list of `details.tokens`"),
    (b'{"details": {"tokens": {"id": 1, "text": "a"}}}', "has no list of `details.tokens`"),
    (json.dumps({"details": {"tokens": tokens_with({"id": 3})}}).encode(), "has an invalid token"),
    (json.dumps({"details": {"tokens": tokens_with({"id": 3, "text": 5})}}).encode(), "has an invalid token"),
    (json.dumps({"details": {"tokens": tokens_with({"text": "a"})}}).encode(), "has an invalid token"),
    (json.dumps({"details": {"tokens": tokens_with("a")}}).encode(), "has an invalid token"),
    (json.dumps({"details": {"tokens": tokens_with(None)}}).encode(), "has an invalid token"),
]


@pytest.mark.parametrize("body,why", INVALID_ANSWERS, ids=[str(i) for i in range(len(INVALID_ANSWERS))])
async def test_generate_answer_that_is_not_tgis_is_a_protocol_error(body, why):
    response = httpx.Response(200, content=body, headers={"content-type": "application/json"})
    async with mock(lambda request: response) as client:
        with pytest.raises(TGIProtocolError) as info:
            await client.generate("Hi", {"details": True})
    assert_error(info.value, TGIProtocolError, 502, "server_error")
    assert info.value.message.startswith(f"TGI's /generate answer {why}"), info.value.message
    assert info.value.headers == {"x-should-retry": "false"}


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_generate_answer_over_the_size_cap_is_a_protocol_error(monkeypatch, framing):
    monkeypatch.setattr(tgi_client, "MAX_GENERATE_BODY", 1000)
    big = answer(tokens=GENERATE_TOKENS * 20)
    size = len(big.content)
    assert size > 1000
    if framing == "chunked":
        big = httpx.Response(200, headers=big.headers, stream=Body([big.content[:600], big.content[600:]]))
    async with mock(lambda request: big) as client:
        with pytest.raises(TGIProtocolError, match="TGI's /generate answer is over") as info:
            await client.generate("Hi", {"details": True})
        assert info.value.headers == {"x-should-retry": "false"}
        monkeypatch.setattr(tgi_client, "MAX_GENERATE_BODY", size)  # exactly the cap: fine
        assert len((await client.generate("Hi", {"details": True})).tokens) == 60


async def test_generate_longer_than_the_request_timeout_is_a_504_not_retried():
    attempts = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(2)  # TGI still generating
        return answer()

    # The stream timeouts are shorter still: they do not apply to /generate.
    async with mock(handler, request_timeout=0.3, first_token_timeout=0.05, read_timeout=0.05) as client:
        start = time.monotonic()
        with pytest.raises(TGITimeoutError) as info:
            await client.generate("Hi", {"details": True})
        elapsed = time.monotonic() - start
    assert 0.3 <= elapsed < 1.0
    assert attempts == 1
    assert_error(info.value, TGITimeoutError, 504, "server_error", "timeout")
    assert info.value.message == "TGI did not finish the generation within 0.3 s (--request-timeout)"


async def test_generate_body_stalled_past_the_request_timeout_is_a_504():
    """The deadline covers the body too: the head arrived, the rest of the answer never does."""
    start_of_body = answer().content[:50]
    response = httpx.Response(200, headers={"content-type": "application/json"}, stream=Slow([start_of_body]))
    async with mock(lambda request: response, request_timeout=0.3) as client:
        start = time.monotonic()
        with pytest.raises(TGITimeoutError, match="--request-timeout"):
            await client.generate("Hi", {"details": True})
        assert 0.3 <= time.monotonic() - start < 1.0


async def test_generate_slower_than_the_stream_timeouts_is_fine():
    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.3)
        return answer()

    async with mock(handler, first_token_timeout=0.05, read_timeout=0.05) as client:
        assert await client.generate("Hi", {"details": True}) == GENERATION


async def test_generate_cut_answer_is_a_protocol_error_not_retried():
    attempts = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal attempts
        attempts += 1
        body = Body([answer().content[:40]], then=RuntimeError("TGI died"))  # reset mid-body
        return httpx.Response(200, headers={"content-type": "application/json"}, stream=body)

    async with mock(handler) as client:
        with pytest.raises(TGIProtocolError) as info:
            await client.generate("Hi", {"details": True})
    assert attempts == 1
    assert info.value.message.startswith("TGI closed the connection in the middle of its answer")


async def test_generate_reuses_its_connection_and_shares_the_pool_with_streams():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/generate_stream":
            return sse(b"".join(data(e) for e in HELLO))
        if request.content.startswith(b'{"inputs":"bad"'):
            return httpx.Response(422, json={"error": V + "`top_k` must be strictly positive",
                                              "error_type": "validation"})  # fmt: skip
        return answer()

    server = HandlerServer(handler)
    async with TGIClient(await server.__aenter__()) as client:
        try:
            assert await client.generate("Hi", {"details": True}) == GENERATION
            assert await client.generate("Hi", {"details": True}) == GENERATION
            with pytest.raises(TGIValidationError):  # an error answer read whole: reusable too
                await client.generate("bad", {"details": True})
            assert await collect(client) == HELLO_ITEMS
            assert await client.generate("Hi", {"details": True}) == GENERATION
        finally:
            await server.__aexit__(None, None, None)
    assert server.connections == 1


async def test_generate_with_an_unencodable_parameter_sends_nothing():
    def handler(request: httpx.Request) -> httpx.Response:
        pytest.fail("nothing must be sent")

    async with mock(handler) as client:
        with pytest.raises(InvalidRequestError):
            await client.generate("Hi", {"temperature": float("inf")})


# ------------------------------------------------------------------------------------------ health, info


@pytest.fixture
def router():
    return respx.Router(base_url=BASE, assert_all_called=False)


@pytest.fixture
async def routed(router):
    async with TGIClient(BASE, transport=httpx.MockTransport(router.async_handler)) as client:
        yield client


@pytest.mark.parametrize(
    "reply,healthy",
    [
        (httpx.Response(200), True),
        (httpx.Response(503, json={"error": "unhealthy", "error_type": "healthcheck"}), False),
        (httpx.Response(404), False),
        (httpx.ConnectError("refused"), False),
        (httpx.ReadTimeout("slow"), False),
    ],
    ids=["200", "503", "404", "unreachable", "timeout"],
)
async def test_health(router, routed, reply, healthy):
    route = router.get("/health")
    route.side_effect = reply if isinstance(reply, Exception) else None
    if not isinstance(reply, Exception):
        route.return_value = reply
    assert await routed.health() is healthy
    assert route.call_count == 1  # no retries: it is a probe


TGI_INFO = {
    "model_id": "meetkai/functionary-small-v3.2",
    "model_sha": "abc",
    "model_pipeline_tag": "text-generation",
    "max_concurrent_requests": 64,
    "max_best_of": 1,
    "max_stop_sequences": 6,
    "max_input_tokens": 8191,
    "max_total_tokens": 8192,
    "validation_workers": 2,
    "max_client_batch_size": 4,
    "router": "text-generation-router",
    "version": "3.3.6-dev0",
    "sha": None,
    "docker_label": None,
}


async def test_info(router, routed):
    router.get("/info").return_value = httpx.Response(200, json=TGI_INFO)
    info = await routed.info()
    assert info == TGIInfo("meetkai/functionary-small-v3.2", 8191, 8192, 6, 64, 1, "3.3.6-dev0", TGI_INFO)
    assert info.raw == TGI_INFO


async def test_info_defaults_for_missing_fields(router, routed):
    router.get("/info").return_value = httpx.Response(200, json={"model_id": "m", "max_input_length": 1024})
    info = await routed.info()
    assert (
        info.model_id,
        info.max_input_tokens,
        info.max_total_tokens,
        info.max_stop_sequences,
        info.max_concurrent_requests,
        info.max_best_of,
        info.version,
    ) == ("m", 1024, 4096, 4, 128, 2, None)
    router.get("/info").return_value = httpx.Response(200, json={})
    assert (await routed.info()).max_input_tokens == 4095


@pytest.mark.parametrize(
    "reply,cls",
    [
        (httpx.Response(200, text="<html>hi</html>"), TGIProtocolError),
        (httpx.Response(200, json=[1, 2]), TGIProtocolError),
        (httpx.Response(404), TGIRejectedError),
        (httpx.Response(500, text="boom"), UpstreamError),
        (httpx.ConnectError("refused"), TGIUnavailableError),
    ],
    ids=["html", "list", "404", "500", "unreachable"],
)
async def test_info_errors(router, routed, reply, cls):
    route = router.get("/info")
    if isinstance(reply, Exception):
        route.side_effect = reply
    else:
        route.return_value = reply
    with pytest.raises(UpstreamError) as info:
        await routed.info()
    assert type(info.value) is cls
    assert route.call_count == (3 if cls is TGIUnavailableError else 1)


# ------------------------------------------------------------------------------------------ the TGI double


@pytest.fixture
def tgi():
    with FakeTGI(script=tokens("Hel", "lo", " world", "<|eot_id|>")) as server:
        yield server


@pytest.fixture
async def client(tgi):
    async with TGIClient(tgi.url, first_token_timeout=5.0, read_timeout=5.0) as c:
        yield c


async def test_double_stream_end_to_end(tgi, client):
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


async def test_double_keepalives_are_ignored(tgi, client):
    tgi.config.keepalive_interval = 0.005
    tgi.script = ["Hi", Pause(0.03), " there"]
    items = await collect(client)
    assert any(e == b":\n\n" for e in tgi.last_generation.events)
    assert items[-1] == StreamEnd("eos_token", 3, count_tokens("Hi"), "Hi there")


async def test_double_validation_errors(tgi, client):
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


async def test_double_generation_error_after_tokens(tgi, client):
    tgi.fail_next(after_tokens=2, message="CUDA out of memory")
    items, error = await collect_until_error(client)
    assert [i.text for i in items] == ["Hel", "lo"]
    assert_error(error, TGIGenerationError, 502, "server_error")
    assert error.message == "TGI failed during generation: CUDA out of memory"


async def test_double_incomplete_drop_and_overload(tgi, client):
    tgi.script = ["a", "b", Incomplete()]
    items, error = await collect_until_error(client)
    assert len(items) == 2 and type(error) is TGIGenerationError

    tgi.script = ["a", "b", Drop()]  # TGI dies mid-response: connection reset, no error event
    items, error = await collect_until_error(client)
    assert len(items) == 2 and type(error) is TGIProtocolError
    assert error.message.startswith(CLOSED_EARLY)

    tgi.config.max_concurrent_requests = 0
    _, error = await collect_until_error(client)
    assert_error(error, TGIOverloadedError, 429, "requests", "rate_limit_exceeded")


async def consume(client: TGIClient, got: list) -> None:
    async with client.generate_stream("Hi", {}) as events:
        async for item in events:
            got.append(item)


async def test_double_sees_the_disconnect_when_the_consumer_breaks(tgi, client):
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


async def test_double_sees_the_disconnect_on_task_cancellation(tgi, client):
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


async def test_double_sees_the_disconnect_on_cancel_scope_cancellation(tgi, client):
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


async def test_double_100_concurrent_streams_over_one_pool(tgi, client):
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


async def test_double_reuses_the_connection_between_streams(tgi, client):
    await collect(client)
    await collect(client)
    assert await client.health()
    info = await client.info()
    streams, control = tgi.requests[:2], tgi.requests[2:]
    assert len({r.client for r in streams}) == 1  # the streams' pool
    assert len({r.client for r in control}) == 1  # httpx's, for /health and /info
    assert streams[0].client != control[0].client
    assert (
        info.model_id,
        info.max_input_tokens,
        info.max_total_tokens,
        info.max_stop_sequences,
        info.max_concurrent_requests,
        info.version,
    ) == ("meetkai/functionary-small-v3.2", 8191, 8192, 4, 128, "3.3.6-dev0")


async def test_double_health_and_api_key():
    with FakeTGI(api_key="s3cret") as tgi:
        async with TGIClient(tgi.url) as client:
            assert await client.health()  # /health is never protected
            tgi.config.healthy = False
            assert not await client.health()
            _, error = await collect_until_error(client)
            assert type(error) is TGIRejectedError and "API key" in error.message
        async with TGIClient(tgi.url, api_key="s3cret") as client:
            assert (await collect(client))[-1].finish_reason == "eos_token"


async def test_double_unreachable_then_starting():
    tgi = FakeTGI(load_delay=0.3)
    tgi.start(wait=False)  # bound, not listening: connections are refused
    try:
        async with TGIClient(tgi.url) as client:
            assert not await client.health()
            start = time.monotonic()
            with pytest.raises(TGIUnavailableError) as info:
                async with client.generate_stream("Hi", {}):
                    pass
            assert time.monotonic() - start < 0.5
            assert info.value.message.startswith(f"TGI is not reachable at {tgi.url}: ")
        # Enough attempts ride out the rest of the warm-up.
        async with TGIClient(tgi.url, connect_retries=12) as client:
            assert (await collect(client))[-1].finish_reason == "eos_token"
    finally:
        tgi.stop()


# ------------------------------------------------------------------------------ /generate on the TGI double


async def test_double_generate_end_to_end(tgi, client):
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


async def test_double_generate_errors(tgi, client):
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


async def test_double_generate_dropped_without_an_answer_is_retried(tgi, client):
    """TGI closing a /generate connection without any answer cannot be told from an idle connection it had
    closed: it is sent again (--connect-retries attempts in all), then TGI is reported unreachable."""
    tgi.script = ["a", "b", Drop()]
    with pytest.raises(TGIUnavailableError, match="connection closed before any response"):
        await client.generate("Hi", {"details": True})
    assert [g.outcome for g in tgi.generations] == ["dropped"] * 3


async def test_double_generate_honours_the_token_delay(tgi, client):
    tgi.config.token_delay = 0.05
    start = time.monotonic()
    generation = await client.generate("Hi", {"details": True})
    assert len(generation.tokens) == 4 and 0.15 <= time.monotonic() - start < 1.0  # 3 delays: after the first


def holding(tgi: FakeTGI) -> bool:
    """TGI is answering one /generate, held after its first token."""
    return tgi.generate_open == 1 and len(tgi.last_generation.tokens) == 1


async def test_double_sees_generate_cancelled_at_once(tgi, client):
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


async def test_double_sees_generate_cancelled_by_a_cancel_scope(tgi, client):
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


async def test_double_generate_request_timeout_closes_tgis_request(tgi):
    tgi.script = ["a", Pause(math.inf)]
    async with TGIClient(tgi.url, request_timeout=0.3) as client:
        with pytest.raises(TGITimeoutError, match="within 0.3 s \\(--request-timeout\\)"):
            await client.generate("Hi", {"details": True})
    gen = tgi.last_generation
    assert await tgi.wait_until_async(lambda: gen.disconnected, timeout=1.0)
    assert gen.outcome == "disconnected"
