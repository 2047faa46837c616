"""The OpenAI Agents SDK in its default setup (the Responses API) against the gateway, run as a user runs it
(``server_tgi.py`` in its own process, no store): an agent with a function tool completes a tool round trip
with ``Runner.run`` and ``Runner.run_streamed``. The TGI double answers as the model would: a call first,
then, once the tool's result is in the prompt, the text. Tracing is off (no network)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from agents import Agent, RunConfig, Runner, function_tool, set_tracing_disabled
from agents.models.openai_provider import OpenAIProvider

from tests.fakes.response_store import InMemoryResponseStore
from tests.fakes.serve import serve
from tests.fakes.tgi import FakeTGI, special, tokens
from tests.gateway_process import start_gateway, stop_gateway
from tgi_gateway.prompting import Template, Version
from tgi_gateway.server.app import create_app
from tgi_gateway.settings import Settings

set_tracing_disabled(True)

MODEL = "functionary-test"
RESULT = "30°C and sunny"
EOT, EOM = special("<|eot_id|>"), special("<|eom_id|>", skip=True)
CALL = tokens("<function=", "get_weather", ">", '{"city":', ' "Hanoi"}', "</function>", EOM)
TEXT = tokens("It", " is", " 30°C", " and", " sunny", " in", " Hanoi", ".", EOT)


def model(inputs: str, parameters: dict) -> list[Any]:
    """A call until the tool's result is in the prompt, then the answer."""
    return TEXT if RESULT in inputs else CALL


@pytest.fixture(scope="module")
def gateway() -> Iterator[tuple[FakeTGI, str]]:
    with FakeTGI(model) as tgi:
        proc, url = start_gateway("--model", MODEL, "--template-version", "v3-llama3.1", "--endpoint", tgi.url,
                                  "--no-launch", "--log-level", "warning")  # fmt: skip
        try:
            yield tgi, url
        finally:
            stop_gateway(proc)


def agent_and_config(url: str, paths: list[str]) -> tuple[Any, RunConfig, list[str]]:
    """An agent with one function tool, and a run config whose provider is the default one (Responses API)
    with the gateway's URL; `paths` collects the routes the SDK called."""
    called: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        called.append(city)
        return RESULT

    async def note(request: httpx.Request) -> None:
        paths.append(f"{request.method} {request.url.path}")

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                                http_client=httpx.AsyncClient(event_hooks={"request": [note]}))  # fmt: skip
    agent = Agent(name="weather", instructions="Answer briefly.", tools=[get_weather], model=MODEL)
    return agent, RunConfig(model_provider=OpenAIProvider(openai_client=client), tracing_disabled=True), called


def test_runner_run_completes_a_tool_round_trip(gateway):
    tgi, url = gateway
    paths: list[str] = []
    agent, config, called = agent_and_config(url, paths)
    result = asyncio.run(Runner.run(agent, "What is the weather in Hanoi?", run_config=config))
    assert result.final_output == "It is 30°C and sunny in Hanoi."
    assert called == ["Hanoi"]
    assert paths == ["POST /v1/responses", "POST /v1/responses"], "the default setup speaks the Responses API"
    assert RESULT in tgi.last_generation.inputs and "Answer briefly." in tgi.last_generation.inputs
    assert [r.usage.output_tokens for r in result.raw_responses] == [len(CALL), len(TEXT)]


def test_runner_run_streamed_completes_a_tool_round_trip(gateway):
    tgi, url = gateway
    paths: list[str] = []
    agent, config, called = agent_and_config(url, paths)

    async def go() -> tuple[Any, list[str]]:
        result = Runner.run_streamed(agent, "What is the weather in Hanoi?", run_config=config)
        deltas = [
            e.data.delta
            async for e in result.stream_events()
            if e.type == "raw_response_event" and e.data.type == "response.output_text.delta"
        ]
        return result, deltas

    result, deltas = asyncio.run(go())
    assert result.final_output == "It is 30°C and sunny in Hanoi." == "".join(deltas)
    assert len(deltas) > 1, "the text arrives as the model makes it"
    assert called == ["Hanoi"] and paths == ["POST /v1/responses", "POST /v1/responses"]
    assert tgi.last_generation.route == "generate_stream"


def test_auto_previous_response_id_with_a_store(gateway):
    """With `auto_previous_response_id`, the Agents SDK sends only the tool's output and the previous id:
    the gateway replays the stored conversation (an in-process gateway with the in-memory store double)."""
    tgi, _ = gateway
    store = InMemoryResponseStore()
    app = create_app(Settings(model=MODEL, endpoint=tgi.url), Template(Version.V3_LLAMA31))
    app.state.store = store
    with serve(app) as url:
        paths: list[str] = []
        agent, config, called = agent_and_config(url, paths)
        result = asyncio.run(
            Runner.run(agent, "What is the weather in Hanoi?", run_config=config, auto_previous_response_id=True)
        )
    assert result.final_output == "It is 30°C and sunny in Hanoi." and called == ["Hanoi"]
    first, second = result.raw_responses
    assert store.saved[second.response_id].previous_response_id == first.response_id
    assert [i["type"] for i in store.saved[second.response_id].input_items] == ["function_call_output"]
    assert "What is the weather in Hanoi?" in tgi.last_generation.inputs, "the stored context was replayed"
