"""request.normalize(): the OpenAI request → ChatPrompt step and every 400 it raises."""

from __future__ import annotations

import pytest

from tgi_gateway.errors import InvalidRequestError
from tgi_gateway.prompting.request import normalize
from tgi_gateway.prompting.types import ChatPrompt, Function, Message, NamedChoice, Tool, ToolCall

USER = {"role": "user", "content": "Weather in Hanoi?"}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        "strict": True,
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
CODE = {"type": "code_interpreter"}

WEATHER_FN = Function(
    "get_weather",
    "Get the weather",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    strict=True,  # kept for the grammar, never printed (as_dict)
)


def test_plain_chat_has_no_tools_and_choice_none():
    assert normalize({"messages": [USER]}) == ChatPrompt(messages=(Message("user", "Weather in Hanoi?"),))


def test_tools_are_normalised_unknown_keys_dropped_and_choice_defaults_to_auto():
    prompt = normalize({"messages": [USER], "tools": [WEATHER, TIME, CODE]})
    assert prompt.tools == (
        Tool("function", WEATHER_FN),
        Tool("function", Function("get_time", "", None)),
        Tool("code_interpreter"),
    )
    assert prompt.choice == "auto"
    assert prompt.has_code_interpreter
    assert prompt.functions == (WEATHER_FN, Function("get_time"))
    assert WEATHER_FN.as_dict() == {
        "name": "get_weather",
        "description": "Get the weather",
        "parameters": WEATHER["function"]["parameters"],
    }


def test_empty_tool_list_behaves_like_no_tools():
    assert normalize({"messages": [USER], "tools": []}).choice == "none"


@pytest.mark.parametrize("choice", ["auto", "required"])
def test_auto_and_required_keep_every_tool(choice):
    prompt = normalize({"messages": [USER], "tools": [WEATHER, CODE], "tool_choice": choice})
    assert prompt.choice == choice
    assert len(prompt.tools) == 2


def test_choice_none_removes_every_tool_including_the_code_interpreter():
    prompt = normalize({"messages": [USER], "tools": [WEATHER, CODE], "tool_choice": "none"})
    assert prompt.tools == ()
    assert prompt.choice == "none"
    assert not prompt.has_code_interpreter


def test_named_choice_keeps_only_that_function():
    prompt = normalize(
        {
            "messages": [USER],
            "tools": [WEATHER, TIME, CODE],
            "tool_choice": {"type": "function", "function": {"name": "get_time"}},
        }
    )
    assert prompt.choice == NamedChoice("get_time")
    assert prompt.tools == (Tool("function", Function("get_time")),)


def test_legacy_functions_and_function_call():
    fn = WEATHER["function"]
    prompt = normalize({"messages": [USER], "functions": [fn]})
    assert prompt.legacy_functions and prompt.choice == "auto"
    assert prompt.tools == (Tool("function", WEATHER_FN),)
    named = normalize({"messages": [USER], "functions": [fn], "function_call": {"name": "get_weather"}})
    assert named.choice == NamedChoice("get_weather")
    assert normalize({"messages": [USER], "functions": [fn], "function_call": "none"}).tools == ()


def test_refs_are_resolved_inside_parameters():
    params = {
        "type": "object",
        "properties": {"where": {"$ref": "#/$defs/place"}},
        "$defs": {"place": {"type": "string", "description": "a city"}},
    }
    prompt = normalize(
        {"messages": [USER], "tools": [{"type": "function", "function": {"name": "f", "parameters": params}}]}
    )
    resolved = prompt.tools[0].function.parameters
    assert resolved["properties"]["where"] == {"type": "string", "description": "a city"}
    assert params["properties"]["where"] == {"$ref": "#/$defs/place"}, "the request must not be mutated"


def test_content_parts_are_joined_and_developer_is_system():
    prompt = normalize(
        {
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}],
                },
            ]
        }
    )
    assert prompt.messages == (Message("system", "Be brief."), Message("user", "Hello there"))


def test_tool_results_get_their_call_name_and_are_reordered_by_call_id():
    calls = [
        {
            "id": "call_a",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Hanoi"}'},
        },
        {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]
    prompt = normalize(
        {
            "messages": [
                USER,
                {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "tool", "tool_call_id": "call_b", "content": "10:00"},
                {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
                {"role": "assistant", "content": "Sunny, 10:00."},
            ],
            "tools": [WEATHER, TIME],
        }
    )
    assert prompt.messages[1] == Message(
        "assistant",
        None,
        tool_calls=(
            ToolCall("get_weather", '{"city": "Hanoi"}', "call_a"),
            ToolCall("get_time", "{}", "call_b"),
        ),
    )
    assert prompt.messages[2:4] == (
        Message("tool", "sunny", name="get_weather", tool_call_id="call_a"),
        Message("tool", "10:00", name="get_time", tool_call_id="call_b"),
    )
    assert prompt.messages[4] == Message("assistant", "Sunny, 10:00.")


def test_tool_results_without_ids_keep_their_order_and_name():
    prompt = normalize(
        {
            "messages": [
                USER,
                {
                    "role": "assistant",
                    "tool_calls": [{"function": {"name": "python", "arguments": "print(1)"}}],
                },
                {"role": "tool", "name": "python", "content": "1"},
            ]
        }
    )
    assert prompt.messages[1].tool_calls == (ToolCall("python", "print(1)"),)
    assert prompt.messages[2] == Message("tool", "1", name="python")


def test_legacy_function_call_and_function_role():
    prompt = normalize(
        {
            "messages": [
                USER,
                {
                    "role": "assistant",
                    "content": None,
                    "function_call": {"name": "get_weather", "arguments": "{}"},
                },
                {"role": "function", "name": "get_weather", "content": "sunny"},
            ],
            "functions": [WEATHER["function"]],
        }
    )
    assert prompt.messages[1].tool_calls == (ToolCall("get_weather", "{}"),)
    assert prompt.messages[2] == Message("function", "sunny", name="get_weather")


BAD_REQUESTS = [
    # (body, param, fragment of the message)
    ({"messages": []}, "messages", "non-empty"),
    ({}, "messages", "non-empty"),
    ({"messages": "hi"}, "messages", "non-empty"),
    (
        {"messages": [USER], "tools": [WEATHER], "functions": [WEATHER["function"]]},
        "functions",
        "cannot both",
    ),
    ({"messages": [USER], "tool_choice": "auto"}, "tool_choice", "only allowed when 'tools'"),
    (
        {"messages": [USER], "tools": [], "tool_choice": "required"},
        "tool_choice",
        "only allowed when 'tools'",
    ),
    ({"messages": [USER], "function_call": "auto"}, "function_call", "only allowed when 'functions'"),
    (
        {"messages": [USER], "tools": [WEATHER], "tool_choice": "always"},
        "tool_choice",
        "'none', 'auto', and 'required'",
    ),
    (
        {
            "messages": [USER],
            "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "nope"}},
        },
        "tool_choice",
        "no function named 'nope'",
    ),
    (
        {"messages": [USER], "functions": [WEATHER["function"]], "function_call": "required"},
        "function_call",
        "'none' and 'auto'",
    ),
    (
        {"messages": [USER], "functions": [WEATHER["function"]], "function_call": {"name": "nope"}},
        "function_call",
        "no function named 'nope'",
    ),
    (
        {"messages": [USER], "tools": [{"type": "retrieval"}]},
        "tools[0].type",
        "'function' and 'code_interpreter'",
    ),
    (
        {"messages": [USER], "tools": [{"type": "function", "function": {"name": "a b"}}]},
        "tools[0].function.name",
        "1 to 64",
    ),
    ({"messages": [USER], "tools": [{"type": "function"}]}, "tools[0].function", "must be an object"),
    (
        {"messages": [USER], "tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
        "tools[0].function.parameters",
        "JSON Schema object",
    ),
    (
        {
            "messages": [USER],
            "tools": [
                {"type": "function", "function": {"name": "f", "parameters": {"$ref": "https://x/y.json"}}}
            ],
        },
        "tools[0].function.parameters",
        "Invalid schema",
    ),
    (
        {
            "messages": [USER],
            "tools": [
                WEATHER,
                {"type": "function", "function": {"name": "f", "parameters": {"properties": [1]}}},
            ],
        },
        "tools[1].function.parameters",
        "Invalid schema",
    ),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "Supported values"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "is required"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:"}}]}]},
        "messages[0].content[0]",
        "text only",
    ),
    ({"messages": [{"role": "user", "content": 42}]}, "messages[0].content", "string or an array"),
    (
        {"messages": [USER, {"role": "tool", "tool_call_id": "call_x", "content": "1"}]},
        "messages[1].tool_call_id",
        "does not answer any tool call",
    ),
    ({"messages": [USER, {"role": "tool", "content": "1"}]}, "messages[1].tool_call_id", "is required"),
    (
        {
            "messages": [
                USER,
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": {}}}],
                },
            ]
        },
        "messages[1].tool_calls[0].function.arguments",
        "must be a string",
    ),
    ({"messages": [USER, {"role": "function", "content": "1"}]}, "messages[1].name", "role 'function'"),
]


@pytest.mark.parametrize("body,param,fragment", BAD_REQUESTS)
def test_bad_requests_raise_400_naming_the_param(body, param, fragment):
    with pytest.raises(InvalidRequestError) as info:
        normalize(body)
    err = info.value
    assert err.status_code == 400
    assert err.param == param
    assert fragment in err.message
    assert err.to_dict() == {
        "error": {"message": err.message, "type": "invalid_request_error", "param": param, "code": None}
    }


# ------------------------------------------------------------------------------------------------
# The same tool definitions, request after request: checked and printed once
# ------------------------------------------------------------------------------------------------


def test_identical_tool_definitions_share_one_function_and_one_rendering() -> None:
    import copy

    from tgi_gateway.prompting import Template
    from tgi_gateway.prompting import request as request_module

    def prompt(tools: list) -> ChatPrompt:
        return normalize({"messages": [USER], "tools": tools})

    first, again = prompt([WEATHER, TIME]), prompt(copy.deepcopy([WEATHER, TIME]))
    assert first == again and first.tools[0].function is again.tools[0].function  # from the cache

    reordered = copy.deepcopy(WEATHER)
    reordered["function"]["parameters"] = {"required": ["city"], **reordered["function"]["parameters"]}
    other = prompt([reordered, TIME])
    assert other.tools[0].function is not first.tools[0].function  # key order is part of the schema
    assert other.tools[0].function.parameters is not None
    assert next(iter(other.tools[0].function.parameters)) == "required"

    for version in ("v2", "v3.llama3", "v3-llama3.1"):
        template = Template(version)
        assert template.render(first) == template.render(again)
        assert template.render(first) != template.render(prompt([TIME]))
        if version == "v3-llama3.1":  # the JSON shows the key order
            assert template.render(other) != template.render(first)

    size = request_module._FUNCTION_CACHE_SIZE
    for i in range(size + 10):
        prompt([{"type": "function", "function": {"name": f"f{i}"}}])
    assert len(request_module._FUNCTION_CACHE) == size  # bounded


def test_a_broken_definition_is_refused_every_time_not_cached() -> None:
    broken = {"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/nowhere"}}}
    for _ in range(2):
        with pytest.raises(InvalidRequestError, match=r"tools\[0\]\.function\.parameters"):
            normalize({"messages": [USER], "tools": [broken]})
