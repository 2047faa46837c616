"""End to end without I/O: request → prompt → model tokens → events → OpenAI message and chunks.

For every template version, a request is normalised and rendered, the model's answer is cut into
token pieces every way (whole, one character at a time, every 2-way split, seeded random splits),
streamed through the version's parser and the chunk builder, and the official SDK's stream
accumulator must rebuild exactly the message of the non-stream path (the same answer parsed whole).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest
from sdk_judge import as_expected, sdk_rebuild
from splits import Item, special, splits

from tgi_gateway.prompting import Template, Version, normalize
from tgi_gateway.streaming import Answer, ChunkBuilder, ResponseContext, collect

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
USER = [{"role": "user", "content": "Weather and time in Hanoi?"}]
TOOLS = {"messages": USER, "tools": [WEATHER, TIME]}
CODE = {"messages": USER, "tools": [{"type": "code_interpreter"}]}
FUNCTIONS = {"messages": USER, "functions": [WEATHER["function"], TIME["function"]]}
ARGS = '{"city": "Hanoi"}'


def named(body: dict[str, Any], name: str) -> dict[str, Any]:
    return {**body, "tool_choice": {"type": "function", "function": {"name": name}}}


def calls(*pairs: tuple[str, str]) -> list[dict[str, Any]]:
    return [
        {"id": f"call_{k:024d}", "type": "function", "function": {"name": n, "arguments": a}}
        for k, (n, a) in enumerate(pairs)
    ]


@dataclass
class Case:
    name: str
    version: Version
    body: dict[str, Any]
    output: list[Item]  # the model's answer: plain text (cut anywhere) and special tokens
    message: dict[str, Any]  # the expected OpenAI message
    finish: str  # the expected OpenAI finish reason
    tgi_reason: str = "eos_token"
    options: dict[str, Any] = field(default_factory=dict)  # parallel_tool_calls


EOT, EOM = special("<|eot_id|>"), special("<|eom_id|>")
SEP = special("<|reserved_special_token_249|>")
V1, V2, V2L, V3, V31 = Version.V1, Version.V2, Version.V2_LLAMA3, Version.V3_LLAMA3, Version.V3_LLAMA31

# fmt: off
CASES = [
    # v1 (functions only, one call)
    Case("v1 text", V1, FUNCTIONS, ["It is sunny.", special("<|END_OF_ASSISTANT|>")],
         {"content": "It is sunny."}, "stop"),
    Case("v1 call", V1, FUNCTIONS,
         ["Let me check.\n", special("<|START_OF_FUNCTION_CALL|>"), "get_weather:\n" + ARGS,
          special("<|END_OF_FUNCTION_CALL|>")],
         {"content": "Let me check.", "function_call": {"name": "get_weather", "arguments": ARGS}}, "function_call"),
    # v2
    Case("v2 text", V2, TOOLS, ["all\n", special("<|content|>"), "Hello there!", special("<|stop|>")],
         {"content": "Hello there!"}, "stop"),
    Case("v2 text then parallel calls (SPM spaces)", V2, TOOLS,
         ["all\n", special("<|content|>"), " Checking.\n", special("<|from|>"), " assistant\n",
          special("<|recipient|>"), " get_weather\n", special("<|content|>"), " " + ARGS + "\n",
          special("<|from|>"), "assistant\n", special("<|recipient|>"), "get_time\n", special("<|content|>"),
          "{}", special("<|stop|>")],
         {"content": "Checking.", "tool_calls": calls(("get_weather", ARGS), ("get_time", "{}"))}, "tool_calls"),
    Case("v2 code interpreter", V2, CODE,
         ["python\n", special("<|content|>"), "import math\nprint(math.pi)", special("<|stop|>")],
         {"content": None, "tool_calls": calls(("python", "import math\nprint(math.pi)"))}, "tool_calls"),
    Case("v2 named choice", V2, named(TOOLS, "get_time"), ["{}", special("<|stop|>")],
         {"content": None, "tool_calls": calls(("get_time", "{}"))}, "stop"),
    Case("v2 choice none", V2, {**TOOLS, "tool_choice": "none"}, ["Sure.", special("<|stop|>")],
         {"content": "Sure."}, "stop"),
    # v2.llama3
    Case("v2.llama3 text then calls", V2L, TOOLS,
         ["Checking both.", SEP, "get_weather\n" + ARGS, SEP, "get_time\n{}", EOT],
         {"content": "Checking both.", "tool_calls": calls(("get_weather", ARGS), ("get_time", "{}"))},
         "tool_calls"),
    Case("v2.llama3 required", V2L, {**TOOLS, "tool_choice": "required"}, ["get_time\n{}", EOT],
         {"content": None, "tool_calls": calls(("get_time", "{}"))}, "tool_calls"),
    Case("v2.llama3 legacy functions", V2L, FUNCTIONS,
         [SEP, "get_weather\n" + ARGS, SEP, "get_time\n{}", EOT],
         {"content": None, "function_call": {"name": "get_weather", "arguments": ARGS}}, "function_call"),
    # v3.llama3
    Case("v3.llama3 text", V3, TOOLS, ["all\nIt is 30°C in Hanoi.", EOT], {"content": "It is 30°C in Hanoi."}, "stop"),
    Case("v3.llama3 text then parallel calls", V3, TOOLS,
         ["all\nLet me look.>>>get_weather\n" + ARGS + ">>>get_time\n{}", EOT],
         {"content": "Let me look.", "tool_calls": calls(("get_weather", ARGS), ("get_time", "{}"))}, "tool_calls"),
    Case("v3.llama3 parallel_tool_calls false", V3, TOOLS,
         ["get_weather\n" + ARGS + ">>>get_time\n{}", EOT],
         {"content": None, "tool_calls": calls(("get_weather", ARGS))}, "tool_calls",
         options={"parallel_tool_calls": False}),
    Case("v3.llama3 named", V3, named(TOOLS, "get_weather"), [ARGS, EOT],
         {"content": None, "tool_calls": calls(("get_weather", ARGS))}, "stop"),
    Case("v3.llama3 cut by max_tokens mid-call", V3, TOOLS, ['get_weather\n{"city": "Ha'],
         {"content": None, "tool_calls": calls(("get_weather", '{"city": "Ha'))}, "length", tgi_reason="length"),
    # v3-llama3.1
    Case("v3-llama3.1 text", V31, TOOLS, ["  It is sunny.\n", EOT], {"content": "It is sunny."}, "stop"),
    Case("v3-llama3.1 parallel calls", V31, TOOLS,
         ["<function=get_weather>" + ARGS + "</function><function=get_time>{}</function>", EOM],
         {"content": None, "tool_calls": calls(("get_weather", ARGS), ("get_time", "{}"))}, "tool_calls"),
    Case("v3-llama3.1 text then call", V31, TOOLS,
         ["Let me check. <function=get_weather>" + ARGS + "</function>", EOM],
         {"content": "Let me check. ", "tool_calls": calls(("get_weather", ARGS))}, "tool_calls"),
    Case("v3-llama3.1 python", V31, CODE, [special("<|python_tag|>"), "x = 2\nprint(x * 21)", EOM],
         {"content": None, "tool_calls": calls(("python", "x = 2\nprint(x * 21)"))}, "tool_calls"),
    Case("v3-llama3.1 required", V31, {**TOOLS, "tool_choice": "required"}, ["get_time>{}</function>", EOM],
         {"content": None, "tool_calls": calls(("get_time", "{}"))}, "tool_calls"),
]
# fmt: on


def context(case: Case, prompt) -> ResponseContext:
    n = itertools.count()
    ctx = ResponseContext.for_prompt(prompt, "functionary", **case.options)
    return dataclasses.replace(ctx, call_ids=lambda: f"call_{next(n):024d}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_stream_and_non_stream_agree_for_every_split(case: Case) -> None:
    prompt = normalize(case.body)
    template = Template(case.version)
    text = template.render(prompt)  # its exact bytes are pinned in test_render.py
    assert text and not text.startswith(("<|begin_of_text|>", "<s>")), "TGI adds BOS itself"

    whole = "".join(i if isinstance(i, str) else i[0] for i in case.output)
    non_stream = collect(template.parse(prompt, whole), case.tgi_reason, context(case, prompt))
    expected_message = {"role": "assistant", **case.message}
    if "content" not in case.message:
        expected_message["content"] = None
    assert non_stream["message"] == expected_message
    assert non_stream["finish_reason"] == case.finish

    for label, pieces in splits(case.output, random_splits=50, seed=len(case.name)):
        parser, builder = template.parser(prompt), ChunkBuilder(context(case, prompt))
        chunks = [c for text, sp in pieces for c in builder.feed(parser.feed(text, sp))]
        chunks += builder.feed(parser.finish()) + builder.finish(case.tgi_reason)
        _, choice = sdk_rebuild(chunks)
        assert as_expected(choice) == non_stream, label


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_answer_stream_and_non_stream_agree(case: Case) -> None:
    """`streaming.Answer`, the pipeline the server runs (stop filter → parser → chunks or message)."""
    prompt, template = normalize(case.body), Template(case.version)
    whole = Answer(template.parser(prompt), context(case, prompt), stream=False)
    assert whole.feed("".join(i if isinstance(i, str) else i[0] for i in case.output)) == []
    assert whole.finish(case.tgi_reason) == []
    expected = whole.message(case.tgi_reason)
    for label, pieces in itertools.islice(splits(case.output, random_splits=5), 12):
        answer = Answer(template.parser(prompt), context(case, prompt), stream=True)
        chunks = [c for text, sp in pieces for c in answer.feed(text, sp)] + answer.finish(case.tgi_reason)
        assert as_expected(sdk_rebuild(chunks)[1]) == expected, label


def test_answer_client_stop_sequence_ends_the_answer() -> None:
    prompt, template = normalize({"messages": USER}), Template(Version.V3_LLAMA31)
    ctx = ResponseContext.for_prompt(prompt, "m")
    for stream in (False, True):
        answer = Answer(template.parser(prompt), ctx, ["STOP"], stream=stream)
        chunks = [c for t in ("One, two, ST", "OP", " three") for c in answer.feed(t)]
        chunks += answer.finish("length")
        if stream:
            _, choice = sdk_rebuild(chunks)
            assert (choice.message.content, choice.finish_reason) == ("One, two,", "stop")
        else:
            message = answer.message("length")
            assert (message["message"]["content"], message["finish_reason"]) == ("One, two,", "stop")
