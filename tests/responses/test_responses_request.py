"""A Responses request → the chat request (tgi_gateway/responses/request.py), without I/O: the prompt each
template version renders for a converted conversation is exactly the prompt of the equivalent chat request
(and, for v3-llama3.1, the literal text); every refusal names the Responses API's field."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from tgi_gateway.errors import InvalidRequestError
from tgi_gateway.prompting import Template, Version, normalize
from tgi_gateway.responses.request import ResponsesRequest, responses_error, to_chat

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
           "strict": True}  # fmt: skip
TIME = {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}}
ARGS = '{"city": "Hanoi"}'

# The second turn of a tool round trip, as the Agents SDK replays it (RESPONSES.md §2.2 and §8).
INPUT = [
    {"role": "user", "content": "Weather in Hanoi?"},
    {"type": "message", "role": "assistant", "id": "msg_a", "status": "completed",
     "content": [{"type": "output_text", "text": "Let me check.", "annotations": [], "logprobs": []}]},
    {"type": "function_call", "id": "fc_a", "call_id": "call_a", "name": "get_weather", "arguments": ARGS,
     "status": "completed"},
    {"type": "function_call_output", "call_id": "call_a", "output": "sunny, 30°C"},
    {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Answer in French."}]},
    {"role": "user", "content": [{"type": "input_text", "text": "And "}, {"type": "input_text", "text": "tomorrow?"}]},
]  # fmt: skip
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Hanoi?"},
        {"role": "assistant", "content": "Let me check.",
         "tool_calls": [{"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": ARGS}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": "sunny, 30°C"},
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": "And tomorrow?"},
    ],
    "tools": [{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}},
              {"type": "function", "function": {k: v for k, v in TIME.items() if k != "type"}}],
}  # fmt: skip


def ids() -> Any:
    n = itertools.count(1)
    return lambda prefix: f"{prefix}{next(n)}"


def convert(**body: Any) -> Any:
    return to_chat(ResponsesRequest(model="m", **body), ids=ids())


def render(version: Version, chat: Any) -> str:
    body = {"messages": chat.messages, "tools": chat.tools, "tool_choice": chat.tool_choice}
    return Template(version).render(normalize(body))


@pytest.mark.parametrize("version", list(Version), ids=str)
def test_a_replayed_tool_round_trip_renders_the_chat_prompt(version: Version) -> None:
    chat = convert(input=INPUT, instructions="Be brief.", tools=[WEATHER, TIME]).chat
    assert chat.messages == CHAT["messages"] and chat.tools == CHAT["tools"]
    assert render(version, chat) == Template(version).render(normalize(CHAT))


@pytest.mark.parametrize("version", list(Version), ids=str)
@pytest.mark.parametrize(
    "choice,chat_choice",
    [("required", "required"), ("none", "none"), ({"type": "function", "name": "get_time"},
     {"type": "function", "function": {"name": "get_time"}})],
)  # fmt: skip
def test_tool_choice_renders_the_chat_prompt(version: Version, choice: Any, chat_choice: Any) -> None:
    chat = convert(input="Time?", tools=[WEATHER, TIME], tool_choice=choice).chat
    assert chat.tool_choice == chat_choice
    expected = {"messages": [{"role": "user", "content": "Time?"}], "tools": CHAT["tools"], "tool_choice": chat_choice}
    assert render(version, chat) == Template(version).render(normalize(expected))


def test_the_v31_prompt_literally() -> None:
    chat = convert(input="Hi", instructions="Be brief.").chat
    assert render(Version.V3_LLAMA31, chat) == (
        "<|start_header_id|>system<|end_header_id|>\n\n\nCutting Knowledge Date: December 2023\n\n<|eot_id|>"
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_input_items_are_stored_in_the_item_shape_with_ids() -> None:
    conversion = convert(input=INPUT[:4])
    assert conversion.items == [
        {"id": "msg_1", "type": "message", "role": "user", "status": "completed",
         "content": [{"type": "input_text", "text": "Weather in Hanoi?"}]},
        {"id": "msg_a", "type": "message", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": "Let me check.", "annotations": []}]},
        {"id": "fc_a", "type": "function_call", "status": "completed", "call_id": "call_a", "name": "get_weather",
         "arguments": ARGS},
        {"id": "fco_2", "type": "function_call_output", "status": "completed", "call_id": "call_a",
         "output": "sunny, 30°C"},
    ]  # fmt: skip
    assert convert(input="Hi").items == [
        {"id": "msg_1", "type": "message", "role": "user", "status": "completed",
         "content": [{"type": "input_text", "text": "Hi"}]}
    ]  # fmt: skip


def test_the_stored_context_comes_first_and_instructions_are_not_inherited() -> None:
    first = convert(input="Weather in Hanoi?", instructions="Be brief.")
    output = [{"id": "fc_9", "type": "function_call", "status": "completed", "call_id": "call_9",
               "name": "get_weather", "arguments": ARGS}]  # fmt: skip
    context = first.items + output
    then = to_chat(
        ResponsesRequest(model="m", input=[{"type": "function_call_output", "call_id": "call_9", "output": "rain"}]),
        context,
        ids=ids(),
    )
    assert then.chat.messages == [
        {"role": "user", "content": "Weather in Hanoi?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": ARGS}}]},
        {"role": "tool", "tool_call_id": "call_9", "content": "rain"},
    ]  # fmt: skip
    assert [i["type"] for i in then.items] == ["function_call_output"], "only this request's input is its own"


def test_fields_mapped_to_the_chat_request() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    chat = convert(
        input="x", max_output_tokens=50, temperature=0.2, top_p=0.9, seed=7, parallel_tool_calls=False,
        text={"format": {"type": "json_schema", "name": "A", "schema": schema, "strict": True}},
    ).chat  # fmt: skip
    assert (chat.max_new_tokens, chat.temperature, chat.top_p, chat.seed) == (50, 0.2, 0.9, 7)
    assert chat.parallel_tool_calls is False
    assert chat.response_format.model_dump() == {
        "type": "json_schema", "json_schema": {"name": "A", "schema": schema, "strict": True}}
    assert convert(input="x", text={"format": {"type": "json_object"}}).chat.response_format.type == "json_object"
    assert convert(input="x", text={"format": {"type": "text"}}).chat.response_format is None
    assert convert(input="x", tool_choice="auto").chat.tool_choice is None, "no tools: auto means none"
    allowed = {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "get_time"}]}
    chat = convert(input="x", tools=[WEATHER, TIME], tool_choice=allowed).chat
    assert chat.tool_choice == "required" and [t["function"]["name"] for t in chat.tools] == ["get_time"]


# fmt: off
REFUSED = [
    ({"tools": [{"type": "web_search"}]}, "tools[0].type", "'web_search'"),
    ({"tools": [WEATHER, {"type": "file_search", "vector_store_ids": ["vs"]}]}, "tools[1].type", "'file_search'"),
    ({"tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}, "tools[0].type", "code_interpreter"),
    ({"tools": [{"type": "mcp", "server_label": "x"}]}, "tools[0].type", "'mcp'"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools[0].name",
     "Missing required parameter: 'tools[0].name'."),
    # found by the fuzz test: a null name with an allowed_tools choice was a 500
    ({"tools": [{"type": "function", "name": None}],
      "tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []}}, "tools[0].name",
     "Missing required parameter: 'tools[0].name'."),
    ({"tools": [{"type": "function", "name": 5}]}, "tools[0].name", "expected a string, but got int"),
    ({"tools": [WEATHER], "tool_choice": {"type": "web_search_preview"}}, "tool_choice", "web_search_preview"),
    ({"background": True}, "background", "background"),
    ({"conversation": "conv_1"}, "conversation", "previous_response_id"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]},
     "input[0].content[0].type", "text only"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role", "'tool'"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type", "'item_reference'"),
    ({"input": [{"type": "function_call_output", "call_id": "call_x", "output": "1"}]}, "input[0].call_id",
     "No tool call found for function call output with call_id call_x."),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id", "call_id"),
    ({"input": 5}, "input", "'input'"),
]
# fmt: on


@pytest.mark.parametrize("body,param,message", REFUSED, ids=[r[1] + " " + r[2][:20] for r in REFUSED])
def test_refused_with_the_field_named(body: dict[str, Any], param: str, message: str) -> None:
    with pytest.raises(InvalidRequestError) as e:
        convert(**{"input": "x", **body})
    assert e.value.param == param and message in e.value.message
    assert e.value.status_code == 400 and e.value.type == "invalid_request_error"


def test_the_chat_codes_errors_name_the_responses_fields() -> None:
    chat = convert(input="x", tools=[{"type": "function", "name": "bad name"}]).chat
    with pytest.raises(InvalidRequestError) as e:
        normalize({"messages": chat.messages, "tools": chat.tools})
    assert e.value.param == "tools[0].function.name"
    renamed = responses_error(e.value)
    assert renamed.param == "tools[0].name" and "'tools[0].name'" in renamed.message
    error = InvalidRequestError("'response_format.json_schema.schema' must be a JSON Schema object.",
                                param="response_format.json_schema.schema")  # fmt: skip
    assert (responses_error(error).param, responses_error(error).message) == (
        "text.format.schema", "'text.format.schema' must be a JSON Schema object.")
    assert responses_error(InvalidRequestError("m", param="max_completion_tokens")).param == "max_output_tokens"


def test_a_stored_conversation_ending_with_a_call_needs_its_output() -> None:
    context = [
        {"id": "msg_1", "type": "message", "role": "user", "status": "completed",
         "content": [{"type": "input_text", "text": "Weather?"}]},
        {"id": "fc_1", "type": "function_call", "status": "completed", "call_id": "call_1", "name": "get_weather",
         "arguments": ARGS},
    ]  # fmt: skip
    with pytest.raises(InvalidRequestError) as e:
        to_chat(ResponsesRequest(model="m", input="never mind"), context, ids=ids())
    assert (e.value.param, e.value.message) == ("input", "No tool output found for function call call_1.")
    answer = [{"type": "function_call_output", "call_id": "call_1", "output": "sunny"}]
    assert to_chat(ResponsesRequest(model="m", input=answer), context, ids=ids()).chat.messages[-1]["role"] == "tool"
