"""Structured output and enforced tool choice end to end: the official openai SDK's `parse()` helpers → the
gateway on a real socket → the TGI double, which validates the grammar as TGI does and holds the scripted
output to it (a script no grammar allows fails the request, and the test)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from tests.fakes.tgi import EOS, EOT, FakeTGI, special, tokens
from tests.gateway_process import served_gateway, start_gateway, stop_gateway
from tgi_gateway.prompting import Version

MODEL = "functionary-test"
ASK = [{"role": "user", "content": "Weather in Paris, as JSON?"}]


class Weather(BaseModel):
    city: str
    temperature: float
    sunny: bool


class GetWeather(BaseModel):
    """Current weather in a city."""

    city: str


class GetTime(BaseModel):
    """The time in a time zone."""

    zone: str


TOOLS = [openai.pydantic_function_tool(GetWeather), openai.pydantic_function_tool(GetTime)]
JSON = ['{"city":', ' "Paris",', ' "temperature":', " 21.5,", ' "sunny":', " true}"]
EOS_OF = {Version.V1: EOS, Version.V2: EOS}  # the Llama 3 models end with <|eot_id|>
# A call of GetWeather in each version's syntax, after the prefix tool_choice "required" ends the prompt with.
REQUIRED = {
    Version.V1: ["\n", "<|START_OF_FUNCTION_CALL|>", "GetWeather", ":\n", '{"city":', ' "Paris"}'],
    Version.V2: ["GetWeather", "\n", "<|content|>", '{"city":', ' "Paris"}'],
    Version.V2_LLAMA3: ["GetWeather", "\n", '{"city":', ' "Paris"}'],
    Version.V3_LLAMA3: ["GetWeather", "\n", '{"city":', ' "Paris"}'],
    Version.V3_LLAMA31: ["GetWeather", ">", '{"city":', ' "Paris"}', "</function>"],
}
# A second call after the first under "required" (v1 makes one call per turn: its grammar allows one).
SECOND = {
    Version.V1: ["\n", "<|START_OF_FUNCTION_CALL|>", "GetTime:\n", '{"zone": "CET"}'],
    Version.V2: ["\n<|from|>assistant\n<|recipient|>", "GetTime\n<|content|>", '{"zone": "CET"}'],
    Version.V2_LLAMA3: ["<|reserved_special_token_249|>", "GetTime\n", '{"zone": "CET"}'],
    Version.V3_LLAMA3: [">>>", "GetTime\n", '{"zone": "CET"}'],
    Version.V3_LLAMA31: ["<function=", "GetTime>", '{"zone": "CET"}', "</function>"],
}
# The named choice GetTime: the prefix opened the call, except in v1.
NAMED = {
    Version.V1: ["<|START_OF_FUNCTION_CALL|>GetTime:\n", '{"zone":', ' "CET"}'],
    Version.V3_LLAMA31: ['{"zone":', ' "CET"}', "</function>"],
}


def end(version: Version) -> Any:
    return EOS_OF.get(version, EOT)


def gateway(tgi: FakeTGI, version: Version, **settings: Any) -> AbstractContextManager[str]:
    return served_gateway(tgi.url, version, MODEL, **settings)


@pytest.fixture(scope="module")
def tgi() -> Iterator[FakeTGI]:
    with FakeTGI() as double:
        yield double


@pytest.fixture(scope="module", params=list(Version), ids=str)
def served(request: pytest.FixtureRequest, tgi: FakeTGI) -> Iterator[tuple[Version, str]]:
    with gateway(tgi, request.param) as url:
        yield request.param, url


@pytest.fixture
def client(served: tuple[Version, str], tgi: FakeTGI) -> Iterator[openai.OpenAI]:
    tgi.errors.clear()
    with openai.OpenAI(base_url=served[1] + "/v1", api_key="unused", max_retries=0, timeout=20) as c:
        yield c
    assert not tgi.errors, "every scripted output matched the grammar the gateway sent"


def test_parse_returns_the_object(tgi, served, client):
    version, _ = served
    tgi.script = tokens(*JSON, end(version))
    r = client.chat.completions.parse(model=MODEL, messages=ASK, response_format=Weather)
    assert r.choices[0].message.parsed == Weather(city="Paris", temperature=21.5, sunny=True)
    assert r.choices[0].finish_reason == "stop"
    grammar = tgi.last_generation.parameters["grammar"]
    if version is Version.V2:  # an optional space after the prompt's <|content|>: a regex (tests/grammar)
        assert grammar["type"] == "regex"
    else:  # the schema, as TGI's JSON grammar
        assert grammar == {"type": "json", "value": openai.lib._pydantic.to_strict_json_schema(Weather)}


def test_stream_gives_the_same_object_as_it_is_generated(tgi, served, client):
    version, _ = served
    tgi.script = tokens(*JSON, end(version))
    with client.chat.completions.stream(model=MODEL, messages=ASK, response_format=Weather) as s:
        partial = [e.parsed for e in s if e.type == "content.delta"]
        final = s.get_final_completion()
    assert final.choices[0].message.parsed == Weather(city="Paris", temperature=21.5, sunny=True)
    assert {"city": "Paris"} in partial, "the content streams (and parses) as it is generated"


def test_json_object_mode(tgi, served, client):
    version, _ = served
    tgi.script = tokens('{"any":', ' ["shape", 1]}', end(version))
    r = client.chat.completions.create(model=MODEL, messages=ASK, response_format={"type": "json_object"})
    assert r.choices[0].message.content == '{"any": ["shape", 1]}'
    assert tgi.last_generation.parameters["grammar"]["type"] == "regex"  # TGI's json needs "properties"


def test_required_pydantic_tools(tgi, served, client):
    version, _ = served
    tgi.script = tokens(*REQUIRED[version], end(version))
    r = client.chat.completions.parse(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required")
    [call] = r.choices[0].message.tool_calls
    assert call.function.parsed_arguments == GetWeather(city="Paris")
    assert r.choices[0].finish_reason == "tool_calls"
    assert tgi.last_generation.parameters["grammar"]["type"] == "regex"


def refused(tgi: FakeTGI, call: Any) -> None:
    """The double refused the script (what TGI's FSM would never have let the model write)."""
    with pytest.raises(openai.APIError):
        call()
    assert [type(e) for e in tgi.errors] == [AssertionError]
    tgi.errors.clear()


def test_required_parallel_calls_stream(tgi, served, client):
    version, _ = served
    tgi.script = tokens(*REQUIRED[version], *SECOND[version], end(version))
    if version is Version.V1:  # one call per turn: a second one is not in the grammar
        refused(tgi, lambda: client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                                             tool_choice="required"))  # fmt: skip
        return
    with client.chat.completions.stream(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required") as s:
        final = s.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert [c.function.parsed_arguments for c in calls] == [GetWeather(city="Paris"), GetTime(zone="CET")]


def test_parallel_tool_calls_false_allows_one_call_only(tgi, served, client):
    version, _ = served
    tgi.script = tokens(*REQUIRED[version], *SECOND[version], end(version))  # what the grammar forbids
    refused(tgi, lambda: client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                                         tool_choice="required", parallel_tool_calls=False))  # fmt: skip
    tgi.script = tokens(*REQUIRED[version], end(version))
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False
    )
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["GetWeather"]


def test_named_pydantic_tool(tgi, served, client):
    version, _ = served
    tgi.script = tokens(*NAMED.get(version, ['{"zone":', ' "CET"}']), end(version))
    choice = {"type": "function", "function": {"name": "GetTime"}}
    r = client.chat.completions.parse(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice)
    [call] = r.choices[0].message.tool_calls
    assert call.function.parsed_arguments == GetTime(zone="CET")
    assert r.choices[0].finish_reason == "stop"


def test_response_format_with_tools_under_auto(tgi, served, client):
    version, _ = served
    lead = {Version.V2: ["all", "\n", "<|content|>"], Version.V3_LLAMA3: ["all", "\n"]}.get(version, [])
    tgi.script = tokens(*lead, *JSON, end(version))
    r = client.chat.completions.parse(model=MODEL, messages=ASK, tools=TOOLS, response_format=Weather)
    assert r.choices[0].message.parsed == Weather(city="Paris", temperature=21.5, sunny=True)
    assert r.choices[0].message.tool_calls in (None, [])


# --------------------------------------------------------------------------------------------------------
# A TGI without grammar support, and --no-grammar
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def no_grammar_tgi() -> Iterator[FakeTGI]:
    with FakeTGI(disable_grammar_support=True) as double:
        yield double


def test_a_tgi_without_grammar_support_is_a_clear_400(no_grammar_tgi):
    with (
        gateway(no_grammar_tgi, Version.V3_LLAMA3) as url,
        openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as c,
    ):
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as caught:
                c.chat.completions.create(
                    model=MODEL, messages=ASK, response_format={"type": "json_object"}, stream=stream
                )
            assert caught.value.code == "grammar_disabled"
            assert (
                "--disable-grammar-support" in caught.value.message and "--no-grammar" in caught.value.message
            )
    assert no_grammar_tgi.last_generation.outcome == "validation"


def test_no_grammar_tool_choices_rely_on_the_prompt_json_formats_are_refused(no_grammar_tgi, model_dir: Path):
    proc, url = start_gateway("--model", str(model_dir), "--endpoint", no_grammar_tgi.url, "--no-launch",
                              "--served-model-name", MODEL, "--no-grammar")  # fmt: skip
    try:
        with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as c:
            no_grammar_tgi.script = tokens(
                "GetWeather>", '{"city": "Paris"}', "</function>", special("<|eom_id|>")
            )
            r = c.chat.completions.parse(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required")
            assert r.choices[0].message.tool_calls[0].function.parsed_arguments == GetWeather(city="Paris")
            assert "grammar" not in no_grammar_tgi.last_generation.parameters
            generations = len(no_grammar_tgi.generations)
            with pytest.raises(openai.BadRequestError) as caught:
                c.chat.completions.parse(model=MODEL, messages=ASK, response_format=Weather)
            assert caught.value.code == "grammar_disabled" and "--no-grammar" in caught.value.message
            assert len(no_grammar_tgi.generations) == generations, "refused before reaching TGI"
            health = httpx.get(url + "/health")
            assert health.status_code == 200
    finally:
        stop_gateway(proc)


def test_a_schema_the_grammar_cannot_express_is_sent_unconstrained_with_a_warning_unless_strict(
    tgi, served, client, caplog
):
    version, _ = served
    schema = {"type": "object", "properties": {"n": {"not": {"type": "string"}}}}
    tgi.script = tokens('{"n": 1}', end(version))
    loose = {"type": "json_schema", "json_schema": {"name": "Loose", "schema": schema}}
    with caplog.at_level("WARNING", logger="tgi_gateway"):
        r = client.chat.completions.create(model=MODEL, messages=ASK, response_format=loose)
    assert r.choices[0].message.content == '{"n": 1}'
    assert "grammar" not in tgi.last_generation.parameters
    assert (
        "response_format 'Loose' is sent without a grammar (not strict): 'not' (at #/properties/n)"
        in caplog.text
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="tgi_gateway"):
        client.chat.completions.create(model=MODEL, messages=ASK, response_format=loose)
    assert "without a grammar" not in caplog.text, "logged once per distinct reason, not per request"
    strict = {"type": "json_schema", "json_schema": {"name": "Strict", "schema": schema, "strict": True}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=ASK, response_format=strict)
    assert (
        caught.value.code == "invalid_json_schema"
        and caught.value.param == "response_format.json_schema.schema"
    )
    assert "'not' (at #/properties/n) cannot be enforced by TGI's grammar" in caught.value.message
