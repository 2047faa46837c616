"""tgi_gateway.tgi.protocol, sans-IO: SSE decoding (split-invariant), the stream's items, the /generate and
/info bodies, and TGI's errors → the gateway's tree as golden tables."""

from __future__ import annotations

import json
import random

import pytest

from tests.tgi.tgi_answers import GENERATE_TOKENS, GENERATION, generate_answer
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
from tgi_gateway.tgi.protocol import (
    STREAM_CUT,
    Generation,
    SSEDecoder,
    StreamDecoder,
    StreamEnd,
    TGIInfo,
    Token,
    error_from_body,
    expect_content_type,
    map_tgi_error,
    parse_generation,
    parse_info,
    request_body,
    token_count,
)

# ------------------------------------------------------------------------------------------ TGI's stream


def data(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def tok(index: int, text: str, *, special: bool = False, id: int | None = None) -> dict:
    token = {"id": 1000 + index if id is None else id, "text": text, "logprob": -0.5, "special": special}
    return {"index": index, "token": token, "generated_text": None, "details": None}


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


FRAMINGS = framings()


def splits(name: str, body: bytes) -> list[list[bytes]]:
    """Whole, one byte at a time, every 2-way split (inside UTF-8 sequences and CRLFs too), 30 seeded random
    6-cut splits."""
    out = [[body], [body[i : i + 1] for i in range(len(body))]]
    out += [[body[:i], body[i:]] for i in range(1, len(body))]
    rng = random.Random(name)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(body)), 6))
        out.append([body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)])
    return out


@pytest.mark.parametrize("name,body", FRAMINGS, ids=[n for n, _ in FRAMINGS])
def test_sse_decoding_is_split_invariant(name, body):
    expected = [json.dumps(e, separators=(",", ":"), ensure_ascii=False).encode() for e in HELLO]
    if name == "done":
        expected.append(b"[DONE]")
    for chunks in splits(name, body):
        decoder = SSEDecoder()
        assert [d for chunk in chunks for d in decoder.feed(chunk)] == expected, chunks


def test_sse_multiline_data_and_events_without_data():
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\ndata:b\n\nevent: x\n\n: c\n\ndata\n\n") == [b"a\nb"]


@pytest.mark.parametrize("name,body", FRAMINGS, ids=[n for n, _ in FRAMINGS])
def test_stream_items_are_split_invariant_and_junk_after_the_end_is_ignored(name, body):
    """Every split gives the same items; whatever follows the final event (a [DONE], more events, junk)
    is not decoded."""
    for chunks in splits(name, body + data(tok(9, "junk")) + b"data: {not json\n\n"):
        decoder = StreamDecoder()
        assert [item for chunk in chunks for item in decoder.feed(chunk)] == HELLO_ITEMS, chunks
        assert decoder.ended and decoder.error is None and decoder.end_of_body() is None
        assert decoder.tokens == 3


def items_and_error(body: bytes) -> tuple[list, UpstreamError | None]:
    decoder = StreamDecoder()
    items = decoder.feed(body)
    return items, decoder.error or decoder.end_of_body()


def test_details_null_gives_an_end_with_unknown_finish_reason():
    body = data(tok(1, "Hi")) + data(final(2, "<|eot_id|>", "Hi", details=False))
    assert items_and_error(body) == (
        [Token("Hi", False, 1001), Token("<|eot_id|>", True, 2), StreamEnd(None, 2, None, "Hi")],
        None,
    )


def test_end_on_details_alone_and_on_length():
    """A final event is one with generated_text *or* details; the last token may be a normal one."""
    last = final(2, " there", "Hi there", finish_reason="length", special=False)
    last["generated_text"] = None
    items, error = items_and_error(data(tok(1, "Hi")) + data(last))
    assert items[-2:] == [Token(" there", False, 2), StreamEnd("length", 2, 7, None)] and error is None


def test_details_without_a_count_count_the_token_events():
    last = final(2, "<|eot_id|>", "Hi")
    last["details"]["generated_tokens"] = None
    items, _ = items_and_error(data(tok(1, "Hi")) + data(last))
    assert items[-1] == StreamEnd("eos_token", 2, 7, "Hi")


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
def test_a_body_that_ends_before_the_final_event_is_a_protocol_error(body):
    items, error = items_and_error(body)
    assert all(isinstance(i, Token) for i in items)
    assert type(error) is TGIProtocolError and error.message == STREAM_CUT


@pytest.mark.parametrize(
    "line,why",
    [
        (b"data: {not json\n\n", "that is not JSON"),
        (b"data: [1,2]\n\n", "that is not an object"),
        (b'data: {"index":1}\n\n', "without a valid token"),
        (b'data: {"token":{"text":1,"id":3}}\n\n', "without a valid token"),
    ],
    ids=["not-json", "not-object", "no-token", "bad-token"],
)
def test_malformed_events_are_protocol_errors_after_the_items_before_them(line, why):
    decoder = StreamDecoder()
    assert decoder.feed(data(HELLO[0]) + line + data(HELLO[1])) == [HELLO_ITEMS[0]]
    assert type(decoder.error) is TGIProtocolError
    assert decoder.error.message.startswith(f"TGI sent a stream event {why}: ")
    assert decoder.feed(data(HELLO[2])) == [] and not decoder.ended  # nothing more is decoded


# ------------------------------------------------------------------------------------------ errors: golden tables

V = "Input validation error: "
ERROR_EVENTS = [
    # error_type, TGI's text, class, status, OpenAI type, code, param
    ("validation", V + "`temperature` must be strictly positive", TGIValidationError, 400,
     "invalid_request_error", None, "temperature"),
    ("validation", V + "`top_p` must be > 0.0 and < 1.0", TGIValidationError, 400, "invalid_request_error", None,
     "top_p"),
    ("validation", V + "`top_k` must be strictly positive", TGIValidationError, 400, "invalid_request_error", None,
     None),
    ("validation", V + "`max_new_tokens` must be strictly positive", TGIValidationError, 400,
     "invalid_request_error", None, "max_tokens"),
    ("validation", V + "`stop` supports up to 4 stop sequences. Given: 5", TGIValidationError, 400,
     "invalid_request_error", None, "stop"),
    ("validation", V + "`frequency_penalty` must be >= -2.0 and <= 2.0", TGIValidationError, 400,
     "invalid_request_error", None, "frequency_penalty"),
    ("validation", V + "`top_n_tokens` must be >= 0 and <= 5. Given: 9", TGIValidationError, 400,
     "invalid_request_error", None, "top_logprobs"),
    ("validation", V + "`inputs` cannot be empty", TGIValidationError, 400, "invalid_request_error", None,
     "messages"),
    ("validation", V + "`inputs` must have less than 4095 tokens. Given: 5000", TGIContextLengthError, 400,
     "invalid_request_error", "context_length_exceeded", "messages"),
    ("validation", V + "`inputs` tokens + `max_new_tokens` must be <= 4096. Given: 4000 `inputs` tokens and "
     "200 `max_new_tokens`", TGIContextLengthError, 400, "invalid_request_error", "context_length_exceeded",
     "messages"),
    ("validation", V + "`best_of` != 1 is not supported when streaming tokens", TGIValidationError, 400,
     "invalid_request_error", None, None),
    ("validation", V + "grammar is not valid: Grammar must have a 'properties' field", TGIValidationError, 400,
     "invalid_request_error", None, None),
    ("overloaded", "Model is overloaded", TGIOverloadedError, 429, "requests", "rate_limit_exceeded", None),
    ("generation", "Request failed during generation: CUDA out of memory", TGIGenerationError, 502,
     "server_error", None, None),
    ("incomplete_generation_stream", "Incomplete generation stream", TGIGenerationError, 502, "server_error",
     None, None),
    ("stream_serialization_error", "Stream event serialization error", UpstreamError, 502, "server_error", None,
     None),
    ("something_new", "A new kind of failure", UpstreamError, 502, "server_error", None, None),
]  # fmt: skip


def assert_error(
    exc: BaseException, cls: type, status: int, type_: str, code: str | None = None, param: str | None = None
) -> None:
    assert type(exc) is cls, repr(exc)
    assert (exc.status_code, exc.type, exc.code, exc.param) == (status, type_, code, param)
    assert exc.to_dict() == {"error": {"message": exc.message, "type": type_, "param": param, "code": code}}


@pytest.mark.parametrize(
    "error_type,text,cls,status,type_,code,param",
    ERROR_EVENTS,
    ids=[f"{e[0]}-{i}" for i, e in enumerate(ERROR_EVENTS)],
)
def test_error_event_after_tokens(error_type, text, cls, status, type_, code, param):
    body = data(HELLO[0]) + data(HELLO[1]) + data({"error": text, "error_type": error_type}) + data(HELLO[2])
    items, error = items_and_error(body)
    assert items == HELLO_ITEMS[:2]
    assert_error(error, cls, status, type_, code, param)
    assert map_tgi_error(error_type, text).to_dict() == error.to_dict()
    if cls in (TGIValidationError, TGIContextLengthError):
        assert error.message == text  # verbatim
        assert isinstance(error, InvalidRequestError)
        assert error.headers == {"x-should-retry": "false"}
    elif cls is UpstreamError:
        assert text in error.message


def test_openai_shaped_error_event_is_tolerated():
    event = {
        "error": {
            "message": "Input validation error: `top_p` must be > 0.0 and < 1.0",
            "http_status_code": 422,
        },
        "error_type": "validation",
    }
    _, error = items_and_error(data(event))
    assert_error(error, TGIValidationError, 400, "invalid_request_error", None, "top_p")
    _, error = items_and_error(
        data({"error": {"message": {"code": 7}}, "error_type": "x"})
    )  # not text: its JSON
    assert error.message == 'TGI error (x): {"code":7}'
    _, error = items_and_error(data({"error": 5, "error_type": "x"}))
    assert error.message == "TGI error (x): 5"


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
        TGITimeoutError,
        TGIProtocolError,
        TGIRejectedError,
    ):
        assert issubclass(cls, UpstreamError) and issubclass(cls, GatewayError)


JSON, TEXT = "application/json", "text/plain; charset=utf-8"
# The non-200 answers of both generation routes (and /info): status, content-type, body → class, HTTP status,
# OpenAI type, code, param.
STATUSES = [
    (422, TEXT, ("Failed to deserialize the JSON body into the target type: parameters.temperature: invalid type: "
     'string "hot", expected f32'), TGIValidationError, 400, "invalid_request_error", None, "temperature"),
    (422, TEXT, ("Failed to deserialize the JSON body into the target type: parameters.seed: invalid value: "
     "integer `-1`, expected u64"), TGIValidationError, 400, "invalid_request_error", None, "seed"),
    (422, TEXT, "Failed to deserialize the JSON body into the target type: missing field `inputs`",
     TGIRejectedError, 502, "server_error", None, None),
    (422, JSON, json.dumps({"error": V + "`top_p` must be > 0.0 and < 1.0", "error_type": "validation"}),
     TGIValidationError, 400, "invalid_request_error", None, "top_p"),
    (422, JSON, json.dumps({"error": V + "`inputs` must have less than 8 tokens. Given: 9", "error_type": "validation"}),
     TGIContextLengthError, 400, "invalid_request_error", "context_length_exceeded", "messages"),
    (424, JSON, json.dumps({"error": "Request failed during generation: Server error: CUDA out of memory",
                            "error_type": "generation"}), TGIGenerationError, 502, "server_error", None, None),
    (429, JSON, json.dumps({"error": "Model is overloaded", "error_type": "overloaded"}), TGIOverloadedError, 429,
     "requests", "rate_limit_exceeded", None),
    (500, JSON, json.dumps({"error": "Incomplete generation", "error_type": "incomplete_generation"}),
     TGIGenerationError, 502, "server_error", None, None),
    (500, TEXT, "Internal Server Error", UpstreamError, 502, "server_error", None, None),
    (503, JSON, json.dumps({"error": "unhealthy", "error_type": "healthcheck"}), TGIUnavailableError, 503,
     "server_error", None, None),
    (401, TEXT, "", TGIRejectedError, 502, "server_error", None, None),
    (403, TEXT, "", TGIRejectedError, 502, "server_error", None, None),
    (404, TEXT, "", TGIRejectedError, 502, "server_error", None, None),
    (405, TEXT, "", TGIRejectedError, 502, "server_error", None, None),
    (415, TEXT, "Expected request with `Content-Type: application/json`", TGIRejectedError, 502, "server_error",
     None, None),
    (400, TEXT, "Failed to parse the request body as JSON: EOF while parsing a value at line 1 column 0",
     TGIRejectedError, 502, "server_error", None, None),
    (413, TEXT, "Failed to buffer the request body: length limit exceeded", TGIContextLengthError, 400,
     "invalid_request_error", "context_length_exceeded", "messages"),
    (502, "text/html", "<html><body>502 Bad Gateway</body></html>", TGIUnavailableError, 503, "server_error", None,
     None),
    (504, "text/html", "<html>Gateway Time-out</html>", TGIUnavailableError, 503, "server_error", None, None),
    (418, TEXT, "I'm a teapot", UpstreamError, 502, "server_error", None, None),
]  # fmt: skip


@pytest.mark.parametrize(
    "status,content_type,body,cls,http,type_,code,param",
    STATUSES,
    ids=[f"{s[0]}-{i}" for i, s in enumerate(STATUSES)],
)
def test_error_bodies_map_by_error_type_then_status(
    status, content_type, body, cls, http, type_, code, param
):
    error = error_from_body(status, content_type, body.encode())
    assert_error(error, cls, http, type_, code, param)
    if cls is TGIRejectedError:
        assert error.headers["x-should-retry"] == "false"
    if cls is TGIOverloadedError:
        assert error.headers == {"Retry-After": "1"}
    if status == 401:
        assert "API key" in error.message


# Every row of the two tables (TGI's error_type; a status without one) and the fallbacks, with its exact message:
# error_type, status, TGI's text → class, message.
MESSAGES = [
    ("validation", None, V + "`top_k` must be strictly positive", TGIValidationError,
     V + "`top_k` must be strictly positive"),
    ("overloaded", None, "", TGIOverloadedError, "TGI is overloaded: Model is overloaded"),
    ("overloaded", None, "Queue is full", TGIOverloadedError, "TGI is overloaded: Queue is full"),
    ("generation", None, "Request failed during generation: OOM", TGIGenerationError,
     "TGI failed during generation: OOM"),
    ("incomplete_generation", None, "Incomplete generation", TGIGenerationError,
     "TGI failed during generation: Incomplete generation"),
    ("incomplete_generation_stream", None, "Incomplete generation stream", TGIGenerationError,
     "TGI failed during generation: Incomplete generation stream"),
    ("healthcheck", 503, "unhealthy", TGIUnavailableError, "TGI is unhealthy: unhealthy"),
    (None, 400, "bad json", TGIRejectedError, "TGI could not read the gateway's request (HTTP 400): bad json"),
    (None, 401, "", TGIRejectedError,
     "TGI refused the gateway's credentials (HTTP 401): check the API key configured for TGI"),
    (None, 403, "no", TGIRejectedError,
     "TGI refused the gateway's credentials (HTTP 403): check the API key configured for TGI: no"),
    (None, 404, "", TGIRejectedError, "TGI has no such route (HTTP 404): is the TGI URL right?"),
    (None, 405, "", TGIRejectedError, "TGI has no such route (HTTP 405): is the TGI URL right?"),
    (None, 408, "", TGIUnavailableError, "TGI is not available (HTTP 408)"),
    (None, 413, "too big", TGIContextLengthError, "The request is too large for TGI (HTTP 413): too big"),
    (None, 415, "", TGIRejectedError, "TGI could not read the gateway's request (HTTP 415)"),
    (None, 422, "Input validation error: `top_p` must be > 0.0", TGIValidationError,
     "Input validation error: `top_p` must be > 0.0"),
    (None, 422, "missing field `inputs`", TGIRejectedError,
     "TGI could not read the gateway's request (HTTP 422): missing field `inputs`"),
    (None, 424, "Request failed during generation: OOM", TGIGenerationError, "TGI failed during generation: OOM"),
    (None, 429, "", TGIOverloadedError, "TGI is overloaded: Model is overloaded"),
    (None, 502, "  Bad Gateway \n", TGIUnavailableError, "TGI is not available (HTTP 502): Bad Gateway"),
    (None, 503, "", TGIUnavailableError, "TGI is not available (HTTP 503)"),
    (None, 504, "x", TGIUnavailableError, "TGI is not available (HTTP 504): x"),
    ("something_new", 429, "busy", TGIOverloadedError, "TGI is overloaded: busy"),  # unknown type: the status
    ("something_new", 500, "boom", UpstreamError, "TGI error (something_new): boom"),
    ("something_new", None, "boom", UpstreamError, "TGI error (something_new): boom"),
    (None, 500, "boom", UpstreamError, "TGI answered HTTP 500: boom"),
    (None, None, "boom", UpstreamError, "TGI error: boom"),
    ("validation", 422, "Input validation error: grammar is not supported", TGIValidationError,
     ("TGI refuses grammars (it was started with --disable-grammar-support), so response_format and named or "
     "required tool choices cannot be enforced: start TGI without that flag, or the gateway with --no-grammar. "
     "TGI said: Input validation error: grammar is not supported")),
]  # fmt: skip


def test_a_tgi_without_grammar_support_is_the_clients_400_naming_the_way_out():
    for status in (422, None):  # /generate's answer, a stream's first event
        error = map_tgi_error("validation", "Input validation error: grammar is not supported", status)
        assert_error(
            error, TGIValidationError, 400, "invalid_request_error", "grammar_disabled", "response_format"
        )
        assert error.headers == {"x-should-retry": "false"}


@pytest.mark.parametrize(
    "error_type,status,text,cls,message", MESSAGES, ids=[str(i) for i in range(len(MESSAGES))]
)
def test_every_mapping_with_its_message(error_type, status, text, cls, message):
    error = map_tgi_error(error_type, text, status)
    assert (type(error), error.message) == (cls, message)


def test_an_error_body_that_is_not_tgis_json_maps_by_status_and_text():
    assert error_from_body(429, JSON, b"[1]").message == "TGI is overloaded: [1]"
    assert error_from_body(500, JSON, b"{not json").message == "TGI answered HTTP 500: {not json"
    assert (
        error_from_body(500, JSON, b'{"message": "x"}').message == 'TGI answered HTTP 500: {"message": "x"}'
    )
    assert error_from_body(500, TEXT, b"caf\xe9").message == "TGI answered HTTP 500: caf\ufffd"


@pytest.mark.parametrize(
    "content_type,ok",
    [
        ("text/event-stream", True),
        ("Text/Event-Stream; charset=utf-8", True),
        ("text/html", False),
        ("", False),
    ],
)
def test_expect_content_type(content_type, ok):
    if ok:
        expect_content_type("/generate_stream", content_type, "text/event-stream")
        return
    with pytest.raises(TGIProtocolError) as info:
        expect_content_type("/generate_stream", content_type, "text/event-stream")
    assert info.value.message == (
        f"TGI answered /generate_stream with Content-Type {content_type!r}, not text/event-stream"
    )
    assert info.value.headers == {"x-should-retry": "false"}


# ------------------------------------------------------------------------------------------ bodies


def test_request_body_is_inputs_and_parameters_as_given():
    params = {
        "details": True,
        "max_new_tokens": 20,
        "stop": ["<|eot_id|>"],
        "temperature": 0.7,
        "x_unknown": 1,
    }
    assert json.loads(request_body("Hello <|eot_id|>", params)) == {
        "inputs": "Hello <|eot_id|>",
        "parameters": params,
    }


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_an_unencodable_parameter_is_the_clients_400(value):
    with pytest.raises(InvalidRequestError, match="Invalid parameter value: temperature"):
        request_body("Hi", {"temperature": value})




def test_a_generation_keeps_the_tokens_special_flags_and_usage():
    assert parse_generation(generate_answer(), "7") == GENERATION


@pytest.mark.parametrize("header", [None, "", "abc", "-1", "1.5", "7 7", "1_0", "²"])
def test_without_a_valid_x_prompt_tokens_there_is_no_input_length(header):
    assert token_count(header) is None
    generation = parse_generation(generate_answer(), header)
    assert generation.input_length is None
    assert generation.tokens == GENERATION.tokens and generation.generated_tokens == 3


def test_without_finish_reason_or_count_the_tokens_are_kept():
    assert parse_generation(generate_answer(finish_reason=None, generated_tokens="3"), "7") == Generation(
        GENERATION.tokens, None, 3, 7
    )  # the count: the tokens received
    assert parse_generation(generate_answer(tokens=[], generated_tokens=0), "7") == Generation([], "eos_token", 0, 7)


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
def test_an_answer_that_is_not_tgis_is_a_protocol_error(body, why):
    with pytest.raises(TGIProtocolError) as info:
        parse_generation(body, "7")
    assert_error(info.value, TGIProtocolError, 502, "server_error")
    assert info.value.message.startswith(f"TGI's /generate answer {why}"), info.value.message
    assert info.value.headers == {"x-should-retry": "false"}


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


def test_info():
    info = parse_info(json.dumps(TGI_INFO).encode())
    assert info == TGIInfo("meetkai/functionary-small-v3.2", 8191, 8192, 6, 64, 1, "3.3.6-dev0", TGI_INFO)
    assert info.raw == TGI_INFO


def test_info_defaults_for_missing_fields():
    info = parse_info(b'{"model_id": "m", "max_input_length": 1024}')
    assert (
        info.model_id,
        info.max_input_tokens,
        info.max_total_tokens,
        info.max_stop_sequences,
        info.max_concurrent_requests,
        info.max_best_of,
        info.version,
    ) == ("m", 1024, 4096, 4, 128, 2, None)
    assert parse_info(b"{}").max_input_tokens == 4095
    assert parse_info(b'{"max_total_tokens": true, "model_id": 3}') == TGIInfo(
        "", raw={"max_total_tokens": True, "model_id": 3}
    )


@pytest.mark.parametrize("body", [b"<html>hi</html>", b"[1, 2]", b""], ids=["html", "list", "empty"])
def test_info_that_is_not_an_object_is_a_protocol_error(body):
    with pytest.raises(TGIProtocolError, match="TGI answered /info with something that is not a JSON object"):
        parse_info(body)
