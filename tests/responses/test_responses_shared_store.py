"""A conversation continued with ``previous_response_id`` across gateway processes, with the official SDK:
created on one gateway process and continued on another that shares its PostgreSQL store (several gateway
replicas), and continued after a gateway process restarted on the same SQLite file (one gateway, no setup);
both with a function-tool round trip in between."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai

from tests.fakes.tgi import EOT, FakeTGI, special, tokens
from tests.gateway_process import start_gateway, stop_gateway

MODEL = "fn"
EOM = special("<|eom_id|>", skip=True)
TOOLS = [{"type": "function", "name": "get_weather", "description": "The weather in a city.",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]  # fmt: skip


def script(inputs: str, parameters: dict[str, Any]) -> Any:
    """A call while the prompt has no tool result, then a text that quotes it (v3-llama3.1)."""
    if "<|start_header_id|>ipython<|end_header_id|>" in inputs:
        return tokens("It is ", "21 degrees", ".", EOT)
    return tokens("<function=", "get_weather", ">", '{"city": "Hanoi"}', "</function>", EOM)


def gateway(tgi: FakeTGI, store: str) -> tuple[Any, str]:
    return start_gateway("--model", MODEL, "--template-version", "v3-llama3.1", "--endpoint", tgi.url,
                         "--no-launch", "--response-store", store, "--log-level", "warning")  # fmt: skip


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=20)


def round_trip(first_url: str, second_url: str, tgi: FakeTGI) -> None:
    """Ask on the first gateway (a call comes back), answer the call on the second with
    previous_response_id: the second gateway's prompt holds the whole conversation."""
    with sdk(first_url) as a:
        asked = a.responses.create(model=MODEL, input="Weather in Hanoi?", tools=TOOLS)
    (call,) = asked.output
    assert call.type == "function_call" and json.loads(call.arguments) == {"city": "Hanoi"}
    with sdk(second_url) as b:
        answered = b.responses.create(
            model=MODEL, tools=TOOLS, previous_response_id=asked.id,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "21"}],
        )  # fmt: skip
        prompt = tgi.last_generation.inputs
        assert prompt.index("Weather in Hanoi?") < prompt.index('<function=get_weather>{"city": "Hanoi"}')
        assert prompt.index("</function>") < prompt.index("<|start_header_id|>ipython<|end_header_id|>\n\n21")
        assert answered.output_text == "It is 21 degrees." and answered.previous_response_id == asked.id
        assert b.responses.retrieve(asked.id).output[0].type == "function_call"


def test_two_gateway_processes_share_conversations_through_postgresql(postgres: Any) -> None:
    store = postgres.new_database()
    with FakeTGI(script=script) as tgi:
        (proc_a, url_a), (proc_b, url_b) = gateway(tgi, store), gateway(tgi, store)
        try:
            round_trip(url_a, url_b, tgi)
        finally:
            out = stop_gateway(proc_a) + stop_gateway(proc_b)
    assert proc_a.returncode == 0 and proc_b.returncode == 0, out


def test_a_restarted_gateway_continues_a_conversation_from_its_sqlite_file(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'responses.db'}"
    with FakeTGI(script=script) as tgi:
        proc, url = gateway(tgi, store)
        try:
            with sdk(url) as a:
                asked = a.responses.create(model=MODEL, input="Weather in Hanoi?", tools=TOOLS)
        finally:
            out = stop_gateway(proc)
        assert proc.returncode == 0, out
        proc, url = gateway(tgi, store)  # the same file, a new process
        try:
            with sdk(url) as b:
                (call,) = asked.output
                answered = b.responses.create(
                    model=MODEL, tools=TOOLS, previous_response_id=asked.id,
                    input=[{"type": "function_call_output", "call_id": call.call_id, "output": "21"}],
                )  # fmt: skip
                assert answered.output_text == "It is 21 degrees."
                assert "Weather in Hanoi?" in tgi.last_generation.inputs
        finally:
            out = stop_gateway(proc)
        assert proc.returncode == 0, out
