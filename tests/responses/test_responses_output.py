"""Parser events → Responses output items and stream events, without I/O (tgi_gateway/responses/output.py).

Golden tables pin the exact event orders of RESPONSES.md §4.3 (text; one call; text then two calls), an
answer cut by the token limit and a stream TGI broke. Then, for every template version, the answer is cut
into pieces every way and streamed through the server's pipeline (`streaming.Answer` with the Responses
builder): the official SDK's stream accumulator must rebuild exactly the output of the non-stream path.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import pytest
from sdk_judge import check_response, responses_rebuild
from splits import Item, special, splits

from tgi_gateway.prompting import Template, Version, normalize
from tgi_gateway.prompting.types import TextDelta, ToolCallArgs, ToolCallEnd, ToolCallStart
from tgi_gateway.responses.output import OutputBuilder, ResponseShape
from tgi_gateway.responses.request import ResponsesRequest, to_chat
from tgi_gateway.streaming import Answer, ResponseContext

SKELETON = {"id": "resp_1", "object": "response", "created_at": 1, "status": "in_progress", "model": "m",
            "output": [], "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "usage": None,
            "error": None, "incomplete_details": None}  # fmt: skip


def shape(**options: Any) -> ResponseShape:
    n, c = itertools.count(1), itertools.count(1)
    return ResponseShape(
        SKELETON, ids=lambda p: f"{p}{next(n)}", call_ids=lambda: f"call_{next(c)}", clock=lambda: 2, **options
    )


def run(events: list[list[Any]], reason: str = "eos_token", **options: Any) -> list[dict[str, Any]]:
    builder = OutputBuilder(shape(**options), emit=True)
    out = builder.start()
    for batch in events:
        out += builder.feed(batch)
    out += builder.finish(reason)
    out.append(builder.terminal(builder.response(reason, 10, 5)))
    return out


def table(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """(seq, type, output_index, content_index, item_id, the payload that matters)."""
    rows = []
    for e in events:
        payload = e.get("delta", e.get("text", e.get("arguments")))
        if "item" in e:
            item = e["item"]
            payload = (item["type"], item["status"], item.get("call_id"), item.get("arguments"),
                       [p["text"] for p in item.get("content", [])])  # fmt: skip
        elif "response" in e:
            payload = (e["response"]["status"], [o["id"] for o in e["response"]["output"]])
        elif "part" in e:
            payload = e["part"]["text"]
        rows.append((e["sequence_number"], e["type"], e.get("output_index"), e.get("content_index"),
                     e.get("item_id"), payload))  # fmt: skip
    return rows


# fmt: off
def test_a_text_answer() -> None:
    events = run([[TextDelta("Hel")], [TextDelta("lo")]])
    assert table(events) == [
        (0, "response.created", None, None, None, ("in_progress", [])),
        (1, "response.in_progress", None, None, None, ("in_progress", [])),
        (2, "response.output_item.added", 0, None, None, ("message", "in_progress", None, None, [])),
        (3, "response.content_part.added", 0, 0, "msg_1", ""),
        (4, "response.output_text.delta", 0, 0, "msg_1", "Hel"),
        (5, "response.output_text.delta", 0, 0, "msg_1", "lo"),
        (6, "response.output_text.done", 0, 0, "msg_1", "Hello"),
        (7, "response.content_part.done", 0, 0, "msg_1", "Hello"),
        (8, "response.output_item.done", 0, None, None, ("message", "completed", None, None, ["Hello"])),
        (9, "response.completed", None, None, None, ("completed", ["msg_1"])),
    ]
    assert events[2]["item"]["id"] == events[8]["item"]["id"] == "msg_1"
    assert events[-1]["response"]["usage"] == {
        "input_tokens": 10, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 15}
    assert responses_rebuild(events).output_text == "Hello"


def test_one_call() -> None:
    events = run([[ToolCallStart(0, "get_weather"), ToolCallArgs(0, '{"city":')], [ToolCallArgs(0, ' "Paris"}')],
                  [ToolCallEnd(0)]])
    assert table(events) == [
        (0, "response.created", None, None, None, ("in_progress", [])),
        (1, "response.in_progress", None, None, None, ("in_progress", [])),
        (2, "response.output_item.added", 0, None, None, ("function_call", "in_progress", "call_1", "", [])),
        (3, "response.function_call_arguments.delta", 0, None, "fc_1", '{"city":'),
        (4, "response.function_call_arguments.delta", 0, None, "fc_1", ' "Paris"}'),
        (5, "response.function_call_arguments.done", 0, None, "fc_1", '{"city": "Paris"}'),
        (6, "response.output_item.done", 0, None, None,
         ("function_call", "completed", "call_1", '{"city": "Paris"}', [])),
        (7, "response.completed", None, None, None, ("completed", ["fc_1"])),
    ]
    assert events[5]["name"] == "get_weather", "name is required in openai 2.x"
    [call] = responses_rebuild(events).output
    assert (call.name, call.call_id, call.arguments) == ("get_weather", "call_1", '{"city": "Paris"}')


def test_text_then_two_calls_in_one_feed_each() -> None:
    events = run([
        [TextDelta("Let me "), TextDelta("check.")],
        [ToolCallStart(0, "get_weather"), ToolCallArgs(0, "{"), ToolCallArgs(0, "}")],
        [ToolCallArgs(0, " "), ToolCallEnd(0), ToolCallStart(1, "get_time"), ToolCallArgs(1, "{}"), ToolCallEnd(1)],
    ])
    assert table(events) == [
        (0, "response.created", None, None, None, ("in_progress", [])),
        (1, "response.in_progress", None, None, None, ("in_progress", [])),
        (2, "response.output_item.added", 0, None, None, ("message", "in_progress", None, None, [])),
        (3, "response.content_part.added", 0, 0, "msg_1", ""),
        (4, "response.output_text.delta", 0, 0, "msg_1", "Let me check."),
        (5, "response.output_text.done", 0, 0, "msg_1", "Let me check."),
        (6, "response.content_part.done", 0, 0, "msg_1", "Let me check."),
        (7, "response.output_item.done", 0, None, None, ("message", "completed", None, None, ["Let me check."])),
        (8, "response.output_item.added", 1, None, None, ("function_call", "in_progress", "call_1", "", [])),
        (9, "response.function_call_arguments.delta", 1, None, "fc_2", "{}"),
        (10, "response.function_call_arguments.delta", 1, None, "fc_2", " "),
        (11, "response.function_call_arguments.done", 1, None, "fc_2", "{} "),
        (12, "response.output_item.done", 1, None, None, ("function_call", "completed", "call_1", "{} ", [])),
        (13, "response.output_item.added", 2, None, None, ("function_call", "in_progress", "call_2", "", [])),
        (14, "response.function_call_arguments.delta", 2, None, "fc_3", "{}"),
        (15, "response.function_call_arguments.done", 2, None, "fc_3", "{}"),
        (16, "response.output_item.done", 2, None, None, ("function_call", "completed", "call_2", "{}", [])),
        (17, "response.completed", None, None, None, ("completed", ["msg_1", "fc_2", "fc_3"])),
    ]
    final = responses_rebuild(events)
    assert [o.type for o in final.output] == ["message", "function_call", "function_call"]


def test_parallel_tool_calls_false_keeps_the_first_call_only() -> None:
    events = run([[ToolCallStart(0, "a"), ToolCallArgs(0, "{}"), ToolCallEnd(0),
                   ToolCallStart(1, "b"), ToolCallArgs(1, "{}"), ToolCallEnd(1)]], keep_first_call_only=True)
    assert [o.name for o in responses_rebuild(events).output] == ["a"]
    assert [e["type"] for e in events].count("response.output_item.added") == 1


def test_max_output_tokens_reached_is_incomplete() -> None:
    events = run([[TextDelta("It is")]], reason="length")
    assert table(events)[-2:] == [
        (7, "response.output_item.done", 0, None, None, ("message", "incomplete", None, None, ["It is"])),
        (8, "response.incomplete", None, None, None, ("incomplete", ["msg_1"])),
    ]
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert responses_rebuild(events) is None, "the SDK's get_final_response() raises without response.completed"


def test_an_empty_answer_is_one_empty_message() -> None:
    events = run([[TextDelta("")]])
    final = responses_rebuild(events)
    assert [(o.type, o.content[0].text) for o in final.output] == [("message", "")] and final.output_text == ""


def test_a_stream_tgi_broke_ends_with_response_failed() -> None:
    builder = OutputBuilder(shape(), emit=True)
    events = builder.start() + builder.feed([ToolCallStart(0, "f"), ToolCallArgs(0, '{"a"')])
    events += builder.failed("server_error", "TGI failed while generating: CUDA out of memory")
    assert table(events)[-3:] == [
        (4, "response.function_call_arguments.done", 0, None, "fc_1", '{"a"'),
        (5, "response.output_item.done", 0, None, None, ("function_call", "incomplete", "call_1", '{"a"', [])),
        (6, "response.failed", None, None, None, ("failed", ["fc_1"])),
    ]
    assert events[-1]["response"]["error"] == {
        "code": "server_error", "message": "TGI failed while generating: CUDA out of memory"}
    assert not any("error" in e for e in events[:-1]) and "error" not in events[-1], "no top-level error key"
    assert responses_rebuild(events) is None
# fmt: on


# ------------------------------------------------------------------------------------------------
# Every version: the server's pipeline, stream and non-stream, every split
# ------------------------------------------------------------------------------------------------

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TIME = {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}}
ARGS = '{"city": "Hanoi"}'
EOT, EOM = special("<|eot_id|>"), special("<|eom_id|>")
V1, V2, V2L, V3, V31 = Version.V1, Version.V2, Version.V2_LLAMA3, Version.V3_LLAMA3, Version.V3_LLAMA31


@dataclass
class Case:
    name: str
    version: Version
    output: list[Item]
    expected: list[tuple[str, str, str]]  # (type, text or name, arguments)
    request: dict[str, Any]
    reason: str = "eos_token"


TOOLS = {"tools": [WEATHER, TIME]}
# fmt: off
CASES = [
    Case("v1 text then call", V1,
         ["Let me check.\n", special("<|START_OF_FUNCTION_CALL|>"), "get_weather:\n" + ARGS,
          special("<|END_OF_FUNCTION_CALL|>")],
         [("message", "Let me check.", ""), ("function_call", "get_weather", ARGS)], TOOLS),
    Case("v2 text then parallel calls", V2,
         ["all\n", special("<|content|>"), " Checking.\n", special("<|from|>"), " assistant\n",
          special("<|recipient|>"), " get_weather\n", special("<|content|>"), " " + ARGS + "\n",
          special("<|from|>"), "assistant\n", special("<|recipient|>"), "get_time\n", special("<|content|>"),
          "{}", special("<|stop|>")],
         [("message", "Checking.", ""), ("function_call", "get_weather", ARGS), ("function_call", "get_time", "{}")],
         TOOLS),
    Case("v2.llama3 text then calls", V2L,
         ["Checking both.", special("<|reserved_special_token_249|>"), "get_weather\n" + ARGS,
          special("<|reserved_special_token_249|>"), "get_time\n{}", EOT],
         [("message", "Checking both.", ""), ("function_call", "get_weather", ARGS),
          ("function_call", "get_time", "{}")], TOOLS),
    Case("v3.llama3 text", V3, ["all\nIt is 30°C in Hanoi.", EOT], [("message", "It is 30°C in Hanoi.", "")], TOOLS),
    Case("v3.llama3 parallel false", V3, ["get_weather\n" + ARGS + ">>>get_time\n{}", EOT],
         [("function_call", "get_weather", ARGS)], {**TOOLS, "parallel_tool_calls": False}),
    Case("v3.llama3 cut mid-call", V3, ['get_weather\n{"city": "Ha'],
         [("function_call", "get_weather", '{"city": "Ha')], TOOLS, reason="length"),
    Case("v3-llama3.1 text then call", V31, ["Let me check. <function=get_weather>" + ARGS + "</function>", EOM],
         [("message", "Let me check. ", ""), ("function_call", "get_weather", ARGS)], TOOLS),
    Case("v3-llama3.1 named", V31, ["{}</function>", EOM], [("function_call", "get_time", "{}")],
         {**TOOLS, "tool_choice": {"type": "function", "name": "get_time"}}),
]
# fmt: on


def summary(output: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [
        ("message", "".join(p["text"] for p in o["content"]), "")
        if o["type"] == "message"
        else ("function_call", o["name"], o["arguments"])
        for o in output
    ]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_stream_and_non_stream_agree_for_every_split(case: Case) -> None:
    body = ResponsesRequest(model="m", input="Weather and time in Hanoi?", **case.request)
    chat = to_chat(body).chat
    prompt = normalize({"messages": chat.messages, "tools": chat.tools, "tool_choice": chat.tool_choice})
    template, ctx = Template(case.version), ResponseContext(id="resp_1", created=1, model="m")
    keep_first = chat.parallel_tool_calls is False

    whole = OutputBuilder(shape(keep_first_call_only=keep_first), emit=False)
    answer = Answer(template.parser(prompt), ctx, stream=False, builder=whole)
    assert answer.feed("".join(i if isinstance(i, str) else i[0] for i in case.output)) == []
    assert answer.finish(case.reason) == []
    expected = whole.response(case.reason, 10, 5)
    check_response(expected)
    assert summary(expected["output"]) == case.expected
    assert expected["status"] == ("incomplete" if case.reason == "length" else "completed")

    for label, pieces in splits(case.output, random_splits=30, seed=len(case.name)):
        builder = OutputBuilder(shape(keep_first_call_only=keep_first), emit=True)
        answer = Answer(template.parser(prompt), ctx, stream=True, builder=builder)
        events = builder.start() + [e for text, sp in pieces for e in answer.feed(text, sp)]
        events += answer.finish(case.reason)
        response = builder.response(case.reason, 10, 5)
        events.append(builder.terminal(response))
        assert response == expected, label
        final = responses_rebuild(events)
        if case.reason == "length":
            assert final is None and events[-1]["response"]["output"] == expected["output"], label
        else:
            assert [o.model_dump(exclude_none=True) for o in final.output] == [
                check_response({**expected, "output": [o]}).output[0].model_dump(exclude_none=True)
                for o in expected["output"]
            ], label
