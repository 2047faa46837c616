"""Events → OpenAI: golden chunk sequences, the non-stream fold, and the official SDK as the judge.

Every case is checked four ways: the exact chunk deltas (golden), the stream invariants, the message the
SDK's `ChatCompletionStreamState` rebuilds from the chunks (must equal `collect()`), and the same through the
real client parsing our SSE bytes over an in-memory transport.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion
from sdk_judge import as_expected, final_completion
from sdk_judge import sdk_rebuild as _sdk_rebuild

from tgi_gateway.prompting.types import (
    ChatPrompt,
    Event,
    Message,
    NamedChoice,
    TextDelta,
    ToolCallArgs,
    ToolCallEnd,
    ToolCallStart,
)
from tgi_gateway.streaming import (
    SSE_DONE,
    ChunkBuilder,
    ResponseContext,
    chat_completion,
    collect,
    encode_sse,
    finish_reason,
    new_call_id,
    new_completion_id,
)

T, S, A, E = TextDelta, ToolCallStart, ToolCallArgs, ToolCallEnd

ID = "chatcmpl-test0000000000000000000000"
CREATED = 1_732_000_000
MODEL = "meetkai/functionary-small-v3.2"


def counter_ids():
    n = itertools.count()
    return lambda: f"call_{next(n):024d}"


def make_ctx(**kw: Any) -> ResponseContext:
    """A context whose call ids are call_000…0, call_000…1, … (fresh counter each time)."""
    return ResponseContext(id=ID, created=CREATED, model=MODEL, call_ids=counter_ids(), **kw)


def cid(n: int) -> str:
    return f"call_{n:024d}"


ROLE_TEXT = {"role": "assistant", "content": ""}


def header(k: int, name: str, call: int | None = None, role: bool = False) -> dict[str, Any]:
    d: dict[str, Any] = {"role": "assistant", "content": None} if role else {}
    d["tool_calls"] = [
        {
            "index": k,
            "id": cid(k if call is None else call),
            "type": "function",
            "function": {"name": name, "arguments": ""},
        }
    ]
    return d


def args(k: int, text: str) -> dict[str, Any]:
    return {"tool_calls": [{"index": k, "function": {"arguments": text}}]}


def text(s: str) -> dict[str, Any]:
    return {"content": s}


@dataclass
class Case:
    name: str
    feeds: list[list[Event]]  # one list per `feed()` call (≈ one token each)
    tgi_reason: str
    deltas: list[dict[str, Any]]  # expected delta of every chunk but the last
    finish: str  # expected finish reason on the last chunk
    message: dict[str, Any]  # expected `collect()` message
    ctx: dict[str, Any] = field(default_factory=dict)

    @property
    def events(self) -> list[Event]:
        return [ev for feed in self.feeds for ev in feed]


WEATHER = '{"city": "Paris"}'

CASES = [
    Case(
        "text_only",
        [[T("Hello")], [T(",")], [T(" wörld ✓")]],
        "eos_token",
        [ROLE_TEXT, text("Hello"), text(","), text(" wörld ✓")],
        "stop",
        {"role": "assistant", "content": "Hello, wörld ✓"},
    ),
    Case(
        "one_call",
        [[S(0, "get_weather")], [A(0, '{"city"')], [A(0, ': "Paris"}')], [E(0)]],
        "eos_token",
        [header(0, "get_weather", role=True), args(0, '{"city"'), args(0, ': "Paris"}')],
        "tool_calls",
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": cid(0), "type": "function", "function": {"name": "get_weather", "arguments": WEATHER}}
            ],
        },
    ),
    Case(
        "parallel_calls",
        # header + first fragment in one feed; end of call 0 and start of call 1 in one feed
        [
            [S(0, "get_weather"), A(0, '{"city": ')],
            [A(0, '"Paris"}')],
            [E(0), S(1, "get_time")],
            [A(1, "{"), A(1, "}")],
            [E(1)],
        ],
        "stop_sequence",
        [
            header(0, "get_weather", role=True),
            args(0, '{"city": '),
            args(0, '"Paris"}'),
            header(1, "get_time"),
            args(1, "{}"),
        ],
        "tool_calls",
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": cid(0), "type": "function", "function": {"name": "get_weather", "arguments": WEATHER}},
                {"id": cid(1), "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
            ],
        },
    ),
    Case(
        "text_then_calls",
        [
            [T("Let me check.")],
            [T(""), S(0, "get_weather"), A(0, WEATHER), E(0)],
            [S(1, "python"), A(1, "print(1)"), E(1)],
        ],
        "eos_token",
        [
            ROLE_TEXT,
            text("Let me check."),
            header(0, "get_weather"),
            args(0, WEATHER),
            header(1, "python"),
            args(1, "print(1)"),
        ],
        "tool_calls",
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {"id": cid(0), "type": "function", "function": {"name": "get_weather", "arguments": WEATHER}},
                {"id": cid(1), "type": "function", "function": {"name": "python", "arguments": "print(1)"}},
            ],
        },
    ),
    Case(
        "calls_then_text",
        [[S(0, "get_weather"), A(0, WEATHER), E(0)], [T("Done")], [T(".")]],
        "eos_token",
        [header(0, "get_weather", role=True), args(0, WEATHER), text("Done"), text(".")],
        "tool_calls",
        {
            "role": "assistant",
            "content": "Done.",
            "tool_calls": [
                {"id": cid(0), "type": "function", "function": {"name": "get_weather", "arguments": WEATHER}}
            ],
        },
    ),
    Case(
        "legacy_functions",
        [
            [S(0, "get_weather")],
            [A(0, '{"city"'), A(0, ': "Paris"}')],
            [E(0)],
            [S(1, "get_time")],
            [A(1, "{}")],
            [E(1)],
        ],
        "eos_token",
        [
            {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": ""}},
            {"function_call": {"arguments": WEATHER}},
        ],
        "function_call",
        {
            "role": "assistant",
            "content": None,
            "function_call": {"name": "get_weather", "arguments": WEATHER},
        },
        {"legacy_functions": True},
    ),
    Case(
        "legacy_text_then_call",
        [[T("Sure")], [S(0, "get_weather")], [A(0, "{}")], [E(0)]],
        "eos_token",
        [
            ROLE_TEXT,
            text("Sure"),
            {"function_call": {"name": "get_weather", "arguments": ""}},
            {"function_call": {"arguments": "{}"}},
        ],
        "function_call",
        {"role": "assistant", "content": "Sure", "function_call": {"name": "get_weather", "arguments": "{}"}},
        {"legacy_functions": True},
    ),
    Case(
        "parallel_tool_calls_false",
        [
            [S(0, "get_weather")],
            [A(0, WEATHER)],
            [E(0), S(1, "get_time"), A(1, "{}")],
            [E(1)],
            [S(2, "get_date")],
            [A(2, "{}"), E(2)],
        ],
        "eos_token",
        [header(0, "get_weather", role=True), args(0, WEATHER)],
        "tool_calls",
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": cid(0), "type": "function", "function": {"name": "get_weather", "arguments": WEATHER}}
            ],
        },
        {"parallel_tool_calls": False},
    ),
    Case(
        "named_choice",
        [[S(0, "get_weather")], [A(0, WEATHER)], [E(0)]],
        "eos_token",
        [header(0, "get_weather", role=True), args(0, WEATHER)],
        "stop",
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": cid(0), "type": "function", "function": {"name": "get_weather", "arguments": WEATHER}}
            ],
        },
        {"named_choice": True},
    ),
    Case(
        "named_legacy_function_call",  # OpenAI answers a forced `function_call: {"name"}` with "stop"
        [[S(0, "get_weather"), A(0, "{}"), E(0)]],
        "eos_token",
        [
            {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": ""}},
            {"function_call": {"arguments": "{}"}},
        ],
        "stop",
        {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": "{}"}},
        {"legacy_functions": True, "named_choice": True},
    ),
    Case(
        "length_in_call",
        [[T("Checking")], [S(0, "get_weather")], [A(0, '{"ci')], [A(0, 'ty": "Pa')], [E(0)]],
        "length",
        [ROLE_TEXT, text("Checking"), header(0, "get_weather"), args(0, '{"ci'), args(0, 'ty": "Pa')],
        "length",
        {
            "role": "assistant",
            "content": "Checking",
            "tool_calls": [
                {
                    "id": cid(0),
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Pa'},
                }
            ],
        },
    ),
    Case(
        "length_text",
        [[T("Once upon")], [T(" a")]],
        "length",
        [ROLE_TEXT, text("Once upon"), text(" a")],
        "length",
        {"role": "assistant", "content": "Once upon a"},
    ),
    Case(
        "empty_output",
        [],
        "eos_token",
        [ROLE_TEXT],
        "stop",
        {"role": "assistant", "content": ""},
    ),
    Case(
        "only_empty_events",  # empty text events are not sent: the same as no output at all
        [[T("")], [], [T("")]],
        "stop_sequence",
        [ROLE_TEXT],
        "stop",
        {"role": "assistant", "content": ""},
    ),
    Case(
        "call_without_arguments",
        [[S(0, "ping")], [A(0, "")], [E(0)]],
        "eos_token",
        [header(0, "ping", role=True)],
        "tool_calls",
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": cid(0), "type": "function", "function": {"name": "ping", "arguments": ""}}],
        },
    ),
    Case(
        "merged_feed",  # a whole answer in one feed (the non-stream shape)
        [[T("a"), T("b"), S(0, "f"), A(0, "{"), A(0, "}"), E(0), S(1, "g"), E(1), T("c")]],
        "eos_token",
        [ROLE_TEXT, text("ab"), header(0, "f"), args(0, "{}"), header(1, "g"), text("c")],
        "tool_calls",
        {
            "role": "assistant",
            "content": "abc",
            "tool_calls": [
                {"id": cid(0), "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"id": cid(1), "type": "function", "function": {"name": "g", "arguments": ""}},
            ],
        },
    ),
]


def stream(case: Case, ctx: ResponseContext | None = None) -> tuple[list[dict[str, Any]], ChunkBuilder]:
    b = ChunkBuilder(ctx or make_ctx(**case.ctx))
    chunks = [c for feed in case.feeds for c in b.feed(feed)]
    chunks += b.finish(case.tgi_reason)
    return chunks, b


def choice_chunks(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in chunks if c["choices"]]


def check_invariants(chunks: list[dict[str, Any]], *, include_usage: bool = False) -> None:
    """Invariants of every stream (functionary's check_streaming_response, plus the SDK's needs)."""
    assert chunks
    headers = 0
    for i, c in enumerate(choice_chunks(chunks)):
        assert c["id"] == ID and c["object"] == "chat.completion.chunk"
        assert c["created"] == CREATED and c["model"] == MODEL
        assert ("usage" in c) is include_usage and c.get("usage") is None
        [choice] = c["choices"]
        assert choice["index"] == 0 and choice["logprobs"] is None
        delta = choice["delta"]
        last = i == len(choice_chunks(chunks)) - 1
        assert ("role" in delta) is (i == 0), "role only in chunk 0"
        assert (choice["finish_reason"] is not None) is last, "finish_reason only on the last chunk"
        if last:
            assert delta == {}
            continue
        payload = {k for k in delta if k != "role"} - ({"content"} if delta.get("content") is None else set())
        assert len(payload) <= 1, "one of content / tool_calls / function_call per chunk"
        assert delta.get("content") != "" or delta == ROLE_TEXT, "no empty text fragments"
        if "tool_calls" in delta:
            [entry] = delta["tool_calls"]  # never two entries (so never two with one index)
            assert isinstance(entry["index"], int)
            if "id" in entry:
                assert set(entry) == {"index", "id", "type", "function"}
                assert re.fullmatch(r"call_[A-Za-z0-9]{24}", entry["id"])
                assert entry["type"] == "function" and entry["function"]["name"]
                assert entry["function"]["arguments"] == ""
                assert entry["index"] == headers, "dense indices from 0"
                headers += 1
            else:
                assert entry == {
                    "index": entry["index"],
                    "function": {"arguments": entry["function"]["arguments"]},
                }
                assert entry["function"]["arguments"] != ""
                assert entry["index"] < headers, "arguments of a started call"
        if "function_call" in delta:
            fc = delta["function_call"]
            if "name" in fc:
                assert fc == {"name": fc["name"], "arguments": ""} and fc["name"]
                assert headers == 0, "one function_call only"
                headers += 1
            else:
                assert set(fc) == {"arguments"} and fc["arguments"]


# ------------------------------------------------------------------------------------------------
# Golden sequences and the non-stream fold
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_golden_chunks(case: Case) -> None:
    chunks, _ = stream(case)
    assert [c["choices"][0]["delta"] for c in chunks[:-1]] == case.deltas
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": case.finish,
    }
    check_invariants(chunks)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_collect(case: Case) -> None:
    choice = collect(case.events, case.tgi_reason, make_ctx(**case.ctx))
    assert choice == {"index": 0, "message": case.message, "logprobs": None, "finish_reason": case.finish}


def test_golden_text_chunk_envelope() -> None:
    b = ChunkBuilder(make_ctx())
    assert b.feed([T("Hi")]) == [
        {
            "id": ID,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        },
        {
            "id": ID,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": MODEL,
            "choices": [{"index": 0, "delta": {"content": "Hi"}, "logprobs": None, "finish_reason": None}],
        },
    ]
    assert b.feed([]) == []
    assert b.feed([T(""), A(0, "x"), E(0)]) == []  # empty text, arguments of an unknown call, an end


def test_dropped_calls_are_counted() -> None:
    for kw in ({"legacy_functions": True}, {"parallel_tool_calls": False}):
        b = ChunkBuilder(make_ctx(**kw))
        b.feed([S(0, "f"), A(0, "{}"), E(0)])
        assert b.dropped_calls == 0 and b.has_call
        assert b.feed([S(1, "g"), A(1, "{}"), E(1), S(2, "h")]) == []
        assert b.dropped_calls == 2
    b = ChunkBuilder(make_ctx())
    b.feed([S(0, "f"), E(0), S(1, "g")])
    assert b.dropped_calls == 0


@pytest.mark.parametrize(
    ("tgi", "calls", "ctx", "expected"),
    [
        ("length", True, {}, "length"),
        ("length", True, {"legacy_functions": True}, "length"),
        ("length", True, {"named_choice": True}, "length"),
        ("length", False, {}, "length"),
        ("eos_token", False, {}, "stop"),
        ("stop_sequence", False, {"legacy_functions": True}, "stop"),
        ("eos_token", True, {}, "tool_calls"),
        ("stop_sequence", True, {}, "tool_calls"),
        ("eos_token", True, {"legacy_functions": True}, "function_call"),
        ("eos_token", True, {"named_choice": True}, "stop"),
        ("eos_token", True, {"named_choice": True, "legacy_functions": True}, "stop"),
        (None, True, {}, "tool_calls"),
        (None, False, {}, "stop"),
    ],
)
def test_finish_reason(tgi: str | None, calls: bool, ctx: dict[str, Any], expected: str) -> None:
    assert finish_reason(tgi, calls, make_ctx(**ctx)) == expected


def test_builder_refuses_input_after_finish() -> None:
    b = ChunkBuilder(make_ctx())
    b.finish("eos_token")
    with pytest.raises(RuntimeError):
        b.feed([T("x")])
    with pytest.raises(RuntimeError):
        b.finish("eos_token")


def test_chunks_are_fresh_dicts() -> None:
    b = ChunkBuilder(make_ctx())
    first = b.feed([T("a")])
    first[1]["choices"][0]["delta"]["content"] = "mutated"
    first[1]["id"] = "mutated"
    assert b.feed([T("b")])[0] == {
        "id": ID,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "choices": [{"index": 0, "delta": {"content": "b"}, "logprobs": None, "finish_reason": None}],
    }


# ------------------------------------------------------------------------------------------------
# The official SDK as the judge
# ------------------------------------------------------------------------------------------------


def sdk_rebuild(chunks: list[dict[str, Any]]) -> Any:
    completion, choice = _sdk_rebuild(chunks)
    assert completion.id == ID and completion.model == MODEL and completion.created == CREATED
    return completion, choice


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_sdk_rebuilds_collect(case: Case) -> None:
    chunks, _ = stream(case)
    _, choice = sdk_rebuild(chunks)
    assert as_expected(choice) == collect(case.events, case.tgi_reason, make_ctx(**case.ctx))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_sdk_validates_non_stream_response(case: Case) -> None:
    ctx = make_ctx(**case.ctx)
    body = chat_completion(
        ctx, collect(case.events, case.tgi_reason, ctx), prompt_tokens=12, completion_tokens=34
    )
    completion = ChatCompletion.model_validate(json.loads(json.dumps(body)))
    assert completion.object == "chat.completion" and completion.id == ID
    assert completion.usage is not None and completion.usage.total_tokens == 46
    assert as_expected(completion.choices[0]) == body["choices"][0]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("seed", range(8))
def test_any_grouping_of_events_rebuilds_the_same_message(case: Case, seed: int) -> None:
    """However the parser groups events into feeds, the SDK sees the same message."""
    rng = random.Random(seed)
    events = case.events
    cuts = (
        sorted(rng.sample(range(1, len(events)), rng.randint(0, len(events) - 1))) if len(events) > 1 else []
    )
    groups = [events[i:j] for i, j in zip([0, *cuts], [*cuts, len(events)], strict=True)] if events else []
    regrouped = Case(case.name, groups, case.tgi_reason, [], case.finish, case.message, case.ctx)
    chunks, _ = stream(regrouped)
    check_invariants(chunks)
    assert as_expected(sdk_rebuild(chunks)[1]) == collect(events, case.tgi_reason, make_ctx(**case.ctx))


def sse_body(case: Case, *, include_usage: bool = False) -> bytes:
    b = ChunkBuilder(make_ctx(include_usage=include_usage, **case.ctx))
    out = [encode_sse(c) for feed in case.feeds for c in b.feed(feed)]
    out += [encode_sse(c) for c in b.finish(case.tgi_reason)]
    if include_usage:
        out.append(encode_sse(b.usage_chunk(7, 5)))
    out.append(SSE_DONE)
    return b"".join(out)


def sdk_client(body: bytes) -> openai.OpenAI:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    return openai.OpenAI(
        api_key="test",
        base_url="http://gateway.test/v1",
        max_retries=0,
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_sdk_client_stream_over_sse(case: Case) -> None:
    """The real client parses our SSE bytes (`.stream()` helper) and rebuilds collect()'s message."""
    with (
        sdk_client(sse_body(case, include_usage=True)) as client,
        client.chat.completions.stream(model=MODEL, messages=[{"role": "user", "content": "hi"}]) as s,
    ):
        events = list(s)
        completion = final_completion(s)
    assert events and completion.usage is not None
    assert (
        completion.usage.prompt_tokens,
        completion.usage.completion_tokens,
        completion.usage.total_tokens,
    ) == (7, 5, 12)
    assert as_expected(completion.choices[0]) == collect(case.events, case.tgi_reason, make_ctx(**case.ctx))


def test_sdk_client_raw_stream_chunks() -> None:
    case = CASES[2]  # parallel calls
    with sdk_client(sse_body(case)) as client:
        chunks = list(
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
            )
        )
    assert [c.model_dump(exclude_unset=True) for c in chunks] == stream(case)[0]


# ------------------------------------------------------------------------------------------------
# Usage, SSE, ids, context
# ------------------------------------------------------------------------------------------------


def test_include_usage_marks_every_chunk_and_ends_with_usage() -> None:
    b = ChunkBuilder(make_ctx(include_usage=True))
    chunks = b.feed([T("Hi")]) + b.feed([S(0, "f"), A(0, "{}")]) + b.finish("eos_token")
    check_invariants(chunks, include_usage=True)
    assert all(c["usage"] is None for c in chunks)
    assert b.usage_chunk(10, 3) == {
        "id": ID,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "choices": [],
        "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
    }
    completion, _ = sdk_rebuild([*chunks, b.usage_chunk(10, 3)])
    assert completion.usage.total_tokens == 13


def test_no_usage_key_without_include_usage() -> None:
    chunks, _ = stream(CASES[0])
    assert all("usage" not in c for c in chunks)


def test_encode_sse() -> None:
    chunk = {"id": ID, "choices": [{"delta": {"content": 'é "q"\n✓ 🙂'}}], "n": None}
    data = encode_sse(chunk)
    assert data.startswith(b"data: {") and data.endswith(b"}\n\n") and data.count(b"\n") == 2
    assert b"\xc3\xa9" in data  # UTF-8, not \u escapes
    assert json.loads(data[len(b"data: ") :]) == chunk
    content = 'é \\"q\\"\\n✓ 🙂'.encode()  # compact JSON, UTF-8, only what JSON must escape
    expected = b'data: {"id":"%s","choices":[{"delta":{"content":"%s"}}],"n":null}\n\n'
    assert data == expected % (ID.encode(), content)
    assert SSE_DONE == b"data: [DONE]\n\n"


def test_encode_sse_survives_lone_surrogates() -> None:
    chunk = {"choices": [{"delta": {"content": "a\ud800b"}}]}
    data = encode_sse(chunk)
    assert data.startswith(b"data: ") and data.endswith(b"\n\n")
    assert json.loads(data[6:]) == chunk


def test_encode_sse_error_envelope() -> None:
    err = {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}}
    assert (
        encode_sse(err)
        == b'data: {"error":{"message":"boom","type":"server_error","param":null,"code":null}}\n\n'
    )


def test_ids() -> None:
    ids = {new_call_id() for _ in range(5000)}
    assert len(ids) == 5000
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", i) for i in ids)
    # every character class shows up (the alphabet is not truncated)
    chars = set("".join(i[5:] for i in ids))
    assert len(chars) == 62
    assert re.fullmatch(r"chatcmpl-[A-Za-z0-9]{29}", new_completion_id())


def test_default_call_ids_are_random() -> None:
    ctx = ResponseContext(id=ID, created=CREATED, model=MODEL)
    b = ChunkBuilder(ctx)
    [h] = b.feed([S(0, "f")])
    assert re.fullmatch(r"call_[A-Za-z0-9]{24}", h["choices"][0]["delta"]["tool_calls"][0]["id"])
    assert (
        collect([S(0, "f")], "eos_token", ctx)["message"]["tool_calls"][0]["id"]
        != h["choices"][0]["delta"]["tool_calls"][0]["id"]
    )


def test_context_for_prompt() -> None:
    user = (Message(role="user", content="hi"),)
    ctx = ResponseContext.for_prompt(ChatPrompt(messages=user, choice="auto"), MODEL)
    assert re.fullmatch(r"chatcmpl-[A-Za-z0-9]{29}", ctx.id) and ctx.created > 1_700_000_000
    assert (
        ctx.model,
        ctx.legacy_functions,
        ctx.named_choice,
        ctx.parallel_tool_calls,
        ctx.include_usage,
    ) == (MODEL, False, False, True, False)
    ctx = ResponseContext.for_prompt(
        ChatPrompt(messages=user, choice=NamedChoice("f"), legacy_functions=True),
        MODEL,
        parallel_tool_calls=False,
        include_usage=True,
    )
    assert (ctx.legacy_functions, ctx.named_choice, ctx.parallel_tool_calls, ctx.include_usage) == (
        True,
        True,
        False,
        True,
    )
    assert ctx.keep_first_call_only
