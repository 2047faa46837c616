"""The gateway end to end: the official openai SDK → the gateway on a real socket → the TGI double.

Every template version is served once (module-scoped), the double scripted with what that model
would generate; the SDK (sync and async, streaming and not) must see proper OpenAI answers, and the
double must have received the exact prompt and TGI-valid parameters.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import httpx
import openai
import pytest

from tests.fakes.serve import serve
from tests.fakes.tgi import EOS, EOT, Drop, Fail, FakeTGI, Gate, Token, special, tokens
from tests.gateway_process import served_gateway
from tgi_gateway.prompting import Template, Version, normalize
from tgi_gateway.server.app import create_app
from tgi_gateway.settings import Settings

MODEL = "functionary-test"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Hanoi, and the time?"}]
ARGS = '{"city": "Hanoi"}'

EOM = special("<|eom_id|>", skip=True)
SEP = "<|reserved_special_token_249|>"

# What each model generates for each scenario, token by token.
SCRIPTS: dict[Version, dict[str, list[Any]]] = {
    Version.V1: {
        "text": tokens("It", " is", " sunny", ".", "<|END_OF_ASSISTANT|>", EOS),
        "call": tokens("<|START_OF_FUNCTION_CALL|>", "get", "_weather", ":\n", '{"city":', ' "Hanoi"}',
                       "<|END_OF_FUNCTION_CALL|>", EOS),
    },
    Version.V2: {
        "text": tokens("all", "\n", "<|content|>", "It", " is", " sunny", ".", "<|stop|>", EOS),
        "call": tokens("get_weather", "\n", "<|content|>", '{"city":', ' "Hanoi"}', "<|stop|>", EOS),
        "parallel": tokens("get_weather", "\n", "<|content|>", ARGS, "\n", "<|from|>", "assistant", "\n",
                           "<|recipient|>", "get_time", "\n", "<|content|>", "{}", "<|stop|>", EOS),
    },
    Version.V2_LLAMA3: {
        "text": tokens("It", " is", " sunny", ".", EOT),
        "call": tokens(SEP, "get_weather", "\n", '{"city":', ' "Hanoi"}', EOT),
        "parallel": tokens(SEP, "get_weather\n", ARGS, SEP, "get_time\n", "{}", EOT),
    },
    Version.V3_LLAMA3: {
        "text": tokens("all", "\n", "It", " is", " sunny", ".", EOT),
        "call": tokens("get", "_weather", "\n", '{"city":', ' "Hanoi"}', EOT),
        "parallel": tokens("get_weather\n", ARGS, ">>>", "get_time", "\n{}", EOT),
    },
    Version.V3_LLAMA31: {
        "text": tokens("It", " is", " sunny", ".", EOT),
        "call": tokens("<function=", "get_weather", ">", '{"city":', ' "Hanoi"}', "</function>", EOM),
        "parallel": tokens("<function=get_weather>", ARGS, "</function>", "<function=get_time>{}</function>", EOM),
    },
}
VERSIONS = list(SCRIPTS)
CODE = "import math\nprint(math.pi)"
PYTHON: dict[Version, list[Any]] = {
    Version.V1: tokens("<|START_OF_FUNCTION_CALL|>", "python:\n", "import math\n", "print(math.pi)",
                       "<|END_OF_FUNCTION_CALL|>", EOS),
    Version.V2: tokens("python", "\n", "<|content|>", "import math\n", "print(math.pi)", "<|stop|>", EOS),
    Version.V2_LLAMA3: tokens(SEP, "python", "\n", "import math\n", "print(math.pi)", EOT),
    Version.V3_LLAMA3: tokens("python", "\n", "import math\n", "print(math.pi)", EOT),
    Version.V3_LLAMA31: tokens("<|python_tag|>", "import math\n", "print(math.pi)", EOM),
}
# The answer to a named choice: the prefix (in the prompt) already opened the call, except in v1.
NAMED: dict[Version, list[Any]] = {
    Version.V1: tokens("<|START_OF_FUNCTION_CALL|>", "get_time:\n", "{}", "<|END_OF_FUNCTION_CALL|>", EOS),
    Version.V2: tokens("{}", "<|stop|>", EOS),
    Version.V2_LLAMA3: tokens("{}", EOT),
    Version.V3_LLAMA3: tokens("{}", EOT),
    Version.V3_LLAMA31: tokens("{}", "</function>", EOM),
}


def gateway(tgi: FakeTGI, version: Version, **settings: Any) -> AbstractContextManager[str]:
    return served_gateway(tgi.url, version, MODEL, **settings)


@pytest.fixture(scope="module")
def tgi() -> Iterator[FakeTGI]:
    with FakeTGI() as double:
        yield double


@pytest.fixture(scope="module", params=VERSIONS, ids=str)
def served(request: pytest.FixtureRequest, tgi: FakeTGI) -> Iterator[tuple[Version, str]]:
    with gateway(tgi, request.param) as url:
        yield request.param, url


@pytest.fixture
def client(served: tuple[Version, str]) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=served[1] + "/v1", api_key="unused", max_retries=0, timeout=20) as c:
        yield c


def script(tgi: FakeTGI, version: Version, scenario: str) -> None:
    tgi.script = SCRIPTS[version][scenario]


def body(version: Version, scenario: str) -> dict[str, Any]:
    if version is Version.V1 or scenario == "legacy":
        return {"messages": ASK, "functions": [WEATHER["function"], TIME["function"]]}
    return {"messages": ASK, "tools": TOOLS}


# ------------------------------------------------------------------------------------------------
# Every version: text and calls, stream and non-stream, the prompt TGI received
# ------------------------------------------------------------------------------------------------


def test_plain_text(tgi, served, client):
    version, _ = served
    script(tgi, version, "text")
    r = client.chat.completions.create(model=MODEL, **body(version, "text"))
    assert r.choices[0].message.content == "It is sunny."
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason == "stop"
    gen = tgi.last_generation
    assert gen.route == "generate", "a non-stream request reads TGI's /generate"
    assert gen.inputs == Template(version).render(normalize(body(version, "text")))
    assert r.usage.prompt_tokens == gen.input_length and r.usage.completion_tokens == len(gen.tokens)
    params = gen.parameters
    assert params["details"] is True and params["stop"] == list(Template(version).stop_sequences)[:4]


def test_special_flags_decide_on_both_paths(tgi, c31, v31):
    """The same text is a marker or not by TGI's `special` flag alone: an end-of-sequence `</s>` flagged
    special ends the answer, the same characters as plain text stay text (a model writing HTML). The
    non-stream path must get the flags from /generate's details.tokens (its generated_text drops the
    special tokens altogether) and answer exactly as the stream does."""
    plain = Token("</s>", special=False, skip=False)
    tgi.script = tokens("It is <s>bold", plain, " text", "</s>", " never shown", EOT)  # "</s>": special
    eos_texts = tgi.config.eos_texts
    tgi.config.eos_texts = frozenset({"<|eot_id|>"})  # TGI goes on after the special "</s>" here
    try:
        r = c31.chat.completions.create(model=MODEL, messages=ASK)
        assert tgi.last_generation.route == "generate"
        assert tgi.last_generation.generated_text == "It is <s>bold</s> text never shown"
        with c31.chat.completions.stream(model=MODEL, messages=ASK) as s:
            final = s.get_final_completion()
    finally:
        tgi.config.eos_texts = eos_texts
    assert r.choices[0].message.content == final.choices[0].message.content == "It is <s>bold</s> text"
    assert r.choices[0].finish_reason == final.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 6


def test_plain_text_stream(tgi, served, client):
    version, _ = served
    script(tgi, version, "text")
    with client.chat.completions.stream(model=MODEL, **body(version, "text")) as s:
        deltas = [e.delta for e in s if e.type == "content.delta"]
        final = s.get_final_completion()
    assert "".join(deltas) == "It is sunny." and len(deltas) >= 2, "text is streamed token by token"
    assert final.choices[0].message.content == "It is sunny."
    assert final.choices[0].finish_reason == "stop"


def test_one_call(tgi, served, client):
    version, _ = served
    script(tgi, version, "call")
    r = client.chat.completions.create(model=MODEL, **body(version, "call"))
    choice = r.choices[0]
    if version is Version.V1:  # v1 serves legacy functions
        assert choice.message.function_call.name == "get_weather"
        assert json.loads(choice.message.function_call.arguments) == {"city": "Hanoi"}
        assert choice.finish_reason == "function_call"
        return
    [call] = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Hanoi"})
    assert call.id.startswith("call_") and len(call.id) == 29
    assert choice.message.content is None and choice.finish_reason == "tool_calls"


def test_one_call_stream_arguments_arrive_incrementally(tgi, served, client):
    version, _ = served
    script(tgi, version, "call")
    with client.chat.completions.stream(model=MODEL, **body(version, "call")) as s:
        events = list(s)
        final = s.get_final_completion()
    kinds = [e.type for e in events]
    if version is Version.V1:
        assert final.choices[0].message.function_call.arguments == ARGS
        return
    assert kinds.count("tool_calls.function.arguments.delta") >= 2
    [call] = final.choices[0].message.tool_calls
    assert call.function.arguments == ARGS and final.choices[0].finish_reason == "tool_calls"


def test_parallel_calls_stream_and_not(tgi, served, client):
    version, _ = served
    if version is Version.V1:  # v1 makes one call per turn (FORMATS.md §4): a second one is arguments
        tgi.script = tokens("<|START_OF_FUNCTION_CALL|>", "get_time:\n{}", "<|START_OF_FUNCTION_CALL|>", "x", EOS)
        r = client.chat.completions.create(model=MODEL, **body(version, "parallel"))
        fc = r.choices[0].message.function_call
        assert (fc.name, fc.arguments) == ("get_time", "{}<|START_OF_FUNCTION_CALL|>x")
        return
    script(tgi, version, "parallel")
    r = client.chat.completions.create(model=MODEL, **body(version, "parallel"))
    got = [(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls]
    assert got == [("get_weather", ARGS), ("get_time", "{}")]
    with client.chat.completions.stream(model=MODEL, **body(version, "parallel")) as s:
        final = s.get_final_completion()
    assert [(c.function.name, c.function.arguments) for c in final.choices[0].message.tool_calls] == got
    one = client.chat.completions.create(model=MODEL, parallel_tool_calls=False, **body(version, "parallel"))
    assert [c.function.name for c in one.choices[0].message.tool_calls] == ["get_weather"]


def test_legacy_functions(tgi, served, client):
    version, _ = served
    script(tgi, version, "call")
    with client.chat.completions.stream(model=MODEL, **body(version, "legacy")) as s:
        final = s.get_final_completion()
    fc = final.choices[0].message.function_call
    assert (fc.name, fc.arguments) == ("get_weather", ARGS)
    assert final.choices[0].message.tool_calls is None and final.choices[0].finish_reason == "function_call"


def test_code_interpreter(tgi, served, client):
    version, _ = served
    tgi.script = PYTHON[version]
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[{"type": "code_interpreter"}])  # type: ignore[list-item]
    [call] = r.choices[0].message.tool_calls
    assert (call.function.name, call.function.arguments) == ("python", CODE)
    assert r.choices[0].finish_reason == "tool_calls"
    inputs = tgi.last_generation.inputs
    assert ("Environment: ipython" if version is Version.V3_LLAMA31 else "stateful Jupyter notebook") in inputs


@pytest.mark.parametrize("choice", ["required", "none", {"type": "function", "function": {"name": "get_time"}}])
def test_tool_choice_forms(tgi, served, client, choice):
    version, _ = served
    legacy = version is Version.V1
    request = body(version, "call")
    if legacy:
        request["function_call"] = {"name": "get_time"} if isinstance(choice, dict) else choice
        if choice == "required":  # legacy function_call is 'none', 'auto' or a name, as in OpenAI
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model=MODEL, **request)
            assert e.value.param == "function_call"
            return
    else:
        request["tool_choice"] = choice
    if isinstance(choice, dict):
        tgi.script = NAMED[version]
    elif choice == "none":  # v2 and v3.llama3 prompts end with the text recipient: the answer is the text
        text = SCRIPTS[version]["text"]
        tgi.script = text[3:] if version is Version.V2 else text[2:] if version is Version.V3_LLAMA3 else text
    else:  # v2.llama3 and v3-llama3.1 prompts end with the call marker: the answer starts with the name
        call = SCRIPTS[version]["call"]
        tgi.script = call[1:] if version in (Version.V2_LLAMA3, Version.V3_LLAMA31) else call
    r = client.chat.completions.create(model=MODEL, **request)
    prompt = normalize(request)
    assert tgi.last_generation.inputs == Template(version).render(prompt)
    message, finish = r.choices[0].message, r.choices[0].finish_reason
    if choice == "none":
        assert message.content == "It is sunny." and finish == "stop"
        assert "get_weather" not in tgi.last_generation.inputs, "'none' shows no tools at all"
    elif isinstance(choice, dict):
        call = message.function_call if legacy else message.tool_calls[0]
        name, arguments = (call.name, call.arguments) if legacy else (call.function.name, call.function.arguments)
        assert (name, arguments) == ("get_time", "{}") and finish == "stop"
        assert "get_weather" not in tgi.last_generation.inputs, "a named choice shows only that function"
    else:
        assert message.tool_calls[0].function.name == "get_weather" and finish == "tool_calls"


def test_tgi_cut_mid_stream(tgi, served, client):
    version, _ = served
    tgi.script = [*SCRIPTS[version]["text"][:2], Drop()]
    with pytest.raises(openai.APIError) as e:
        list(client.chat.completions.create(model=MODEL, stream=True, **body(version, "text")))
    assert "TGI" in e.value.message


# ------------------------------------------------------------------------------------------------
# One version in depth (v3-llama3.1, the newest)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def v31(tgi) -> Iterator[str]:
    with gateway(tgi, Version.V3_LLAMA31) as url:
        yield url


@pytest.fixture
def c31(v31) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=v31 + "/v1", api_key="unused", max_retries=0, timeout=20) as c:
        yield c


@pytest.mark.parametrize(
    "choice,prefix",
    [
        ("auto", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
        ("required", "<function="),
        ({"type": "function", "function": {"name": "get_time"}}, "<function=get_time>"),
        ("none", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    ],
)
def test_tool_choice_prefix_reaches_tgi(tgi, c31, choice, prefix):
    tgi.script = tokens("{}", "</function>", EOM) if isinstance(choice, dict) else SCRIPTS[Version.V3_LLAMA31]["text"]
    if choice == "required":  # the grammar allows nothing but calls
        tgi.script = tokens("get_time>", "{}", "</function>", EOM)
    r = c31.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice)
    assert tgi.last_generation.inputs.endswith(prefix)
    if choice == "none":
        assert "get_weather" not in tgi.last_generation.inputs
    if isinstance(choice, dict):
        [call] = r.choices[0].message.tool_calls
        assert (call.function.name, call.function.arguments) == ("get_time", "{}")
        assert r.choices[0].finish_reason == "stop", "a named choice finishes with stop, as OpenAI does"


def test_include_usage_and_sampling_parameters(tgi, c31):
    tgi.script = SCRIPTS[Version.V3_LLAMA31]["text"]
    chunks = list(
        c31.chat.completions.create(
            model=MODEL, messages=ASK, stream=True, stream_options={"include_usage": True},
            temperature=0, max_completion_tokens=50, seed=7, top_p=0.5, stop=["STOP"],
        )
    )  # fmt: skip
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert chunks[-1].usage.prompt_tokens == tgi.last_generation.input_length > 0
    assert all(c.usage is None for c in chunks[:-1])
    p = tgi.last_generation.parameters
    assert p["do_sample"] is False and "temperature" not in p and "top_p" not in p, "temperature 0 is greedy"
    assert (p["max_new_tokens"], p["seed"]) == (50, 7)
    assert p["stop"] == ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "STOP"]


def test_stop_sequence_is_cut_out_even_inside_a_token(tgi, c31):
    tgi.script = tokens("Count", ": 1", ", 2, ST", "OP", "PED 3", EOT)
    r = c31.chat.completions.create(model=MODEL, messages=ASK, stop="STOP", temperature=0.7)
    assert r.choices[0].message.content == "Count: 1, 2,"  # the output is stripped, as functionary does
    assert r.choices[0].finish_reason == "stop"
    assert tgi.last_generation.parameters["temperature"] == 0.7


def test_async_client_stream(tgi, v31):
    tgi.script = SCRIPTS[Version.V3_LLAMA31]["parallel"]

    async def go() -> tuple[Any, Any]:
        async with openai.AsyncOpenAI(base_url=v31 + "/v1", api_key="x", max_retries=0) as ac:
            async with ac.chat.completions.stream(model=MODEL, messages=ASK, tools=TOOLS) as s:
                final = await s.get_final_completion()
            return final, await ac.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS)

    final, r = asyncio.run(go())
    assert [c.function.name for c in final.choices[0].message.tool_calls] == ["get_weather", "get_time"]
    assert r.choices[0].message.tool_calls[1].function.arguments == "{}"


# ------------------------------------------------------------------------------------------------
# Errors: every kind, always the OpenAI envelope
# ------------------------------------------------------------------------------------------------


def test_bad_requests_are_400_and_never_reach_tgi(tgi, c31, v31):
    before = len(tgi.generations)
    with pytest.raises(openai.BadRequestError) as e:
        c31.chat.completions.create(model=MODEL, messages=ASK, tool_choice="required")
    assert e.value.param == "tool_choice"
    with pytest.raises(openai.BadRequestError) as e:
        c31.chat.completions.create(model=MODEL, messages=[])
    assert e.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        c31.chat.completions.create(model=MODEL, messages=ASK, n=9)
    assert e.value.param == "n"
    with pytest.raises(openai.BadRequestError) as e:
        c31.chat.completions.create(model=MODEL, messages=ASK, temperature=3)
    assert e.value.param == "temperature"
    for raw in (b"{not json", b'{"model": "functionary-test"}', b'{"model": 1, "messages": "x"}', b"\xff\xfe"):
        r = httpx.post(v31 + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, raw
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError) as e:
        c31.chat.completions.create(model="gpt-4o", messages=ASK)
    assert e.value.code == "model_not_found"
    assert len(tgi.generations) == before


def test_tgi_validation_errors_are_400_with_tgis_message(tgi, c31):
    tgi.script = SCRIPTS[Version.V3_LLAMA31]["text"]
    with pytest.raises(openai.BadRequestError) as e:
        # Room for 6 tokens under TGI's max_total_tokens (8192): more than one message's floor of 5, so the
        # gateway cannot tell; TGI, which counts the prompt, refuses.
        c31.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8_186)
    assert e.value.code == "context_length_exceeded"
    assert "max_new_tokens" in e.value.message


def test_overload_is_429_with_retry_after(tgi, c31):
    tgi.script = SCRIPTS[Version.V3_LLAMA31]["text"]
    tgi.config.max_concurrent_requests = 0
    try:
        with pytest.raises(openai.RateLimitError) as e:
            c31.chat.completions.create(model=MODEL, messages=ASK, stream=True)
    finally:
        tgi.config.max_concurrent_requests = 128
    assert e.value.response.headers["retry-after"] == "1"


def test_generation_error_mid_stream_is_an_error_event(tgi, c31):
    tgi.script = ["It", " is", Fail("CUDA out of memory"), " sunny"]
    got: list[str] = []
    with pytest.raises(openai.APIError) as e:
        for chunk in c31.chat.completions.create(model=MODEL, messages=ASK, stream=True):
            got += [c.delta.content or "" for c in chunk.choices]
    assert "".join(got) == "It is"
    assert "CUDA out of memory" in e.value.message
    # Non-stream: the same failure is a 502.
    tgi.script = ["It", Fail("CUDA out of memory")]
    with pytest.raises(openai.InternalServerError) as e2:
        c31.chat.completions.create(model=MODEL, messages=ASK)
    assert e2.value.status_code == 502


def test_tgi_unreachable_is_a_quick_503(tgi):
    with FakeTGI() as gone:
        url = gone.url
    app = create_app(Settings(model=MODEL, endpoint=url), Template(Version.V3_LLAMA31))
    with serve(app) as gw:
        with openai.OpenAI(base_url=gw + "/v1", api_key="x", max_retries=0) as c:
            start = time.monotonic()
            with pytest.raises(openai.InternalServerError) as e:
                c.chat.completions.create(model=MODEL, messages=ASK)
            assert time.monotonic() - start < 2
        assert e.value.status_code == 503 and "not reachable" in e.value.message
        assert httpx.get(gw + "/health").status_code == 503


def test_client_disconnect_closes_the_upstream_request(tgi, v31):
    gate = Gate()
    tgi.script = ["It", " is", gate, " sunny", EOT]
    with httpx.Client(base_url=v31) as h:
        with h.stream("POST", "/v1/chat/completions", json={"model": MODEL, "messages": ASK, "stream": True}) as r:
            lines = r.iter_lines()
            assert any("It" in line for line in lines)
            assert tgi.wait_until(lambda: tgi.last_generation.tokens and len(tgi.last_generation.tokens) >= 2, 5)
            left = time.monotonic()
    assert tgi.wait_until(lambda: tgi.last_generation.disconnected, 5)
    assert tgi.last_generation.disconnected_at - left < 0.5
    gate.open()


def leave_mid_request(url: str, body: dict[str, Any], ready: Any) -> float:
    """Send `body`, wait until `ready()` (awaitable), then drop the request; when the client left."""

    async def go() -> float:
        async with httpx.AsyncClient(base_url=url) as h:
            task = asyncio.create_task(h.post("/v1/chat/completions", json=body))
            assert await ready(), "the request never reached the point where the client leaves"
            task.cancel()
            left = time.monotonic()
            with pytest.raises(asyncio.CancelledError):
                await task
            return left

    return asyncio.run(go())


def test_client_disconnect_before_the_first_token(tgi, v31):
    gate = Gate()
    tgi.script = [gate, "It", EOT]  # TGI has the request queued: no token, so no response headers yet
    body = {"model": MODEL, "messages": ASK, "stream": True}
    left = leave_mid_request(v31, body, lambda: tgi.wait_until_async(lambda: tgi.streams_open == 1, 5))
    assert tgi.wait_until(lambda: tgi.last_generation.disconnected, 5)
    assert tgi.last_generation.disconnected_at - left < 0.2
    gate.open()


def test_upstream_connections_are_reused(tgi, c31):
    tgi.script = SCRIPTS[Version.V3_LLAMA31]["text"]
    for stream in (False, False, True, True):
        if stream:
            list(c31.chat.completions.create(model=MODEL, messages=ASK, stream=True))
        else:
            c31.chat.completions.create(model=MODEL, messages=ASK)
    peers = [g.request.client for g in tgi.generations[-4:]]
    assert len(set(peers)) == 1, peers


@pytest.mark.parametrize("held", ["queued", "generating"])
def test_client_disconnect_non_stream(tgi, v31, held):
    """A non-stream request reads TGI's /generate, which answers only at the end: a client that leaves while
    TGI queues or generates it closes that request at once."""
    gate = Gate()
    tgi.script = [gate, "It", EOT] if held == "queued" else ["It", gate, " sunny", EOT]
    tokens = 0 if held == "queued" else 1

    def holding() -> bool:
        gens = tgi.generations
        return tgi.generate_open == 1 and bool(gens) and len(gens[-1].tokens) == tokens

    left = leave_mid_request(v31, {"model": MODEL, "messages": ASK}, lambda: tgi.wait_until_async(holding, 5))
    gen = tgi.last_generation
    assert tgi.wait_until(lambda: gen.disconnected, 5)
    assert gen.disconnected_at - left < 0.5
    assert (gen.route, gen.outcome, len(gen.tokens)) == ("generate", "disconnected", tokens)
    gate.open()


# ------------------------------------------------------------------------------------------------
# Models, health, docs
# ------------------------------------------------------------------------------------------------


def test_models_health_and_docs(tgi, c31, v31):
    assert [m.id for m in c31.models.list()] == [MODEL]
    assert c31.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        c31.models.retrieve("other")
    assert httpx.get(v31 + "/health").status_code == 200
    tgi.config.healthy = False
    try:
        assert httpx.get(v31 + "/health").status_code == 503
    finally:
        tgi.config.healthy = True
    spec = httpx.get(v31 + "/openapi.json").json()
    assert "/v1/chat/completions" in spec["paths"]
    assert httpx.get(v31 + "/docs").status_code == 200


def test_served_model_name(tgi):
    app = create_app(Settings(model="/models/x", served_model_name="fn", endpoint=tgi.url), Template(Version.V2))
    with serve(app) as gw, openai.OpenAI(base_url=gw + "/v1", api_key="x", max_retries=0) as c:
        assert [m.id for m in c.models.list()] == ["fn"]


# ------------------------------------------------------------------------------------------------
# Nothing of a request is left for the cycle collector
# ------------------------------------------------------------------------------------------------


def test_a_served_request_leaves_no_reference_cycle(tgi: FakeTGI) -> None:
    """A request's objects are freed by reference counting when it ends, stream or not: at 256 streams
    a per-request cycle (a cancelled watcher task's traceback holding the request's scope) made the
    collector pause the event loop for up to 130 ms."""
    import gc

    script(tgi, Version.V3_LLAMA31, "call")
    watched = {"RequestResponseCycle", "DisconnectWatch", "RequestRecord", "EventStreamResponse", "TokenStream"}
    with gateway(tgi, Version.V3_LLAMA31) as url, httpx.Client(base_url=url, timeout=20) as http:
        payload = {"model": MODEL, **body(Version.V3_LLAMA31, "call")}
        for stream in (True, False):  # warm-up: imports, caches, pools
            http.post("/v1/chat/completions", json={**payload, "stream": stream}).raise_for_status()
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for stream in (True, False, True, False):
                answer = http.post("/v1/chat/completions", json={**payload, "stream": stream})
                assert answer.status_code == 200 and "get_weather" in answer.text
            with http.stream("POST", "/v1/chat/completions", json={**payload, "stream": True}) as r:
                next(r.iter_bytes())  # a client that leaves mid-stream
            time.sleep(0.3)
            gc.collect()
            left = sorted(type(o).__name__ for o in gc.garbage if type(o).__name__ in watched)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert left == []
