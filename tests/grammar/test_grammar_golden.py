"""The grammar sent to TGI, per template version and case (golden), judged on sample outputs.

For every version: the exact end of the prompt and the exact ``grammar`` parameter; each regex accepts the
outputs a model may write under it and refuses a wrong tool name, an ill-typed argument or prose (Python's
``re.fullmatch``, as TGI's FSM must match the whole output), the JSON in them is checked against the
client's schema by ``jsonschema`` (an independent referee), and the accepted outputs parse into the message
the client expects (the parsers get exactly what the grammar forces).
"""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple

import interegular
import jsonschema
import pytest
from outlines_core.json_schema import build_regex_from_schema

from tgi_gateway.grammar import Constraint, clear_caches, constrain
from tgi_gateway.prompting import Template, normalize
from tgi_gateway.prompting.types import TextDelta, ToolCallArgs, ToolCallStart, Version

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Hanoi"]}},
           "required": ["city"]}  # fmt: skip
COUNT = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
ANSWER = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}  # fmt: skip
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "count", "parameters": COUNT, "strict": True}},
]
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "Answer", "schema": ANSWER, "strict": True}}
JSON_OBJECT = {"type": "json_object"}
USER = [{"role": "user", "content": "Weather in Paris?"}]

# outlines-core's regexes of the three schemas (pinned: a new outlines-core that writes them otherwise
# fails here first).
W = r'\{[ ]?"city"[ ]?:[ ]?("Paris"|"Hanoi")[ ]?\}'
N = r'\{[ ]?"n"[ ]?:[ ]?(-)?(0|[1-9][0-9]*)[ ]?\}'
K = r'\{[ ]?"ok"[ ]?:[ ]?(true|false)[ ]?\}'
ANY = build_regex_from_schema('{"type": "object"}')


def test_outlines_core_writes_the_pinned_regexes() -> None:
    assert [build_regex_from_schema(json.dumps(s)) for s in (WEATHER, COUNT, ANSWER)] == [W, N, K]


def regex(value: str) -> dict[str, str]:
    return {"type": "regex", "value": value}


SEP_V2 = r"\n<\|from\|>[ ]?assistant\n<\|recipient\|>[ ]?"
SEP_L3 = r"<\|reserved_special_token_249\|>"
# The golden table: version → case → (the prompt's last characters, the grammar).
CALLS_V2 = rf"(?:get_weather\n<\|content\|>[ ]?(?:{W})|count\n<\|content\|>[ ]?(?:{N}))"
CALLS_NL = rf"(?:get_weather\n(?:{W})|count\n(?:{N}))"  # v2.llama3 and v3.llama3: "name\nargs"
CALLS_V31 = rf"(?:get_weather>(?:{W})</function>|count>(?:{N})</function>)"
GOLDEN: dict[Version, dict[str, tuple[str, dict[str, Any] | None]]] = {
    Version.V1: {
        "json_schema": ("assistant:", {"type": "json", "value": ANSWER}),
        "json_object": ("assistant:", regex(f"(?:{ANY})")),
        "named": ("assistant:", regex(rf"\n?<\|START_OF_FUNCTION_CALL\|>[ ]?get_weather:\n(?:{W})")),
        "required": ("assistant:", regex(
            rf"(?:\n?<\|START_OF_FUNCTION_CALL\|>[ ]?(?:get_weather:\n(?:{W})|count:\n(?:{N})))")),
        "required_one": ("assistant:", regex(
            rf"(?:\n?<\|START_OF_FUNCTION_CALL\|>[ ]?(?:get_weather:\n(?:{W})|count:\n(?:{N})))")),
        "auto_json_schema": ("assistant:", regex(
            rf"(?:{K})|(?:\n?<\|START_OF_FUNCTION_CALL\|>[ ]?(?:get_weather:\n(?:{W})|count:\n(?:{N})))")),
    },
    # v2 (SentencePiece): an optional space after each marker, the prompt's last <|recipient|> or <|content|>
    # included, so even its bare JSON is a regex
    Version.V2: {
        "json_schema": ("<|recipient|>all\n<|content|>", regex(f"[ ]?(?:{K})")),
        "json_object": ("<|recipient|>all\n<|content|>", regex(f"[ ]?(?:{ANY})")),
        "named": ("<|recipient|>get_weather\n<|content|>", regex(f"[ ]?(?:{W})")),
        "required": ("<|recipient|>", regex(rf"[ ]?(?:(?:{CALLS_V2}{SEP_V2})*{CALLS_V2})")),
        "required_one": ("<|recipient|>", regex(rf"[ ]?(?:{CALLS_V2})")),
        "auto_json_schema": ("<|recipient|>", regex(
            rf"[ ]?(?:all\n<\|content\|>[ ]?(?:{K})|(?:(?:{CALLS_V2}{SEP_V2})*{CALLS_V2}))")),
    },
    Version.V2_LLAMA3: {
        "json_schema": ("<|end_header_id|>\n\n", {"type": "json", "value": ANSWER}),
        "json_object": ("<|end_header_id|>\n\n", regex(f"(?:{ANY})")),
        "named": ("<|reserved_special_token_249|>get_weather\n", {"type": "json", "value": WEATHER}),
        "required": ("<|reserved_special_token_249|>", regex(rf"(?:(?:{CALLS_NL}{SEP_L3})*{CALLS_NL})")),
        "required_one": ("<|reserved_special_token_249|>", regex(rf"(?:{CALLS_NL})")),
        "auto_json_schema": ("<|end_header_id|>\n\n", regex(
            rf"(?:{K})|(?:{SEP_L3}(?:{CALLS_NL}{SEP_L3})*{CALLS_NL})")),
    },
    Version.V3_LLAMA3: {
        "json_schema": (">>>all\n", {"type": "json", "value": ANSWER}),
        "json_object": (">>>all\n", regex(f"(?:{ANY})")),
        "named": (">>>get_weather\n", {"type": "json", "value": WEATHER}),
        "required": (">>>", regex(rf"(?:(?:{CALLS_NL}>>>)*{CALLS_NL})")),
        "required_one": (">>>", regex(rf"(?:{CALLS_NL})")),
        "auto_json_schema": (">>>", regex(rf"all\n(?:{K})|(?:(?:{CALLS_NL}>>>)*{CALLS_NL})")),
    },
    Version.V3_LLAMA31: {
        "json_schema": ("<|end_header_id|>\n\n", {"type": "json", "value": ANSWER}),
        "json_object": ("<|end_header_id|>\n\n", regex(f"(?:{ANY})")),
        "named": ("<function=get_weather>", regex(rf"(?:{W})</function>")),
        "required": ("<function=", regex(rf"(?:(?:{CALLS_V31}<function=)*{CALLS_V31})")),
        "required_one": ("<function=", regex(rf"(?:{CALLS_V31})")),
        "auto_json_schema": ("<|end_header_id|>\n\n", regex(
            rf"(?:{K})|(?:<function=(?:{CALLS_V31}<function=)*{CALLS_V31})")),
    },
}  # fmt: skip

# The request of each case.
CASES: dict[str, dict[str, Any]] = {
    "json_schema": {"response_format": JSON_SCHEMA},
    "json_object": {"response_format": JSON_OBJECT},
    "named": {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
    "required": {"tools": TOOLS, "tool_choice": "required"},
    "required_one": {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False},
    "auto_json_schema": {"tools": TOOLS, "response_format": JSON_SCHEMA},
    "auto": {"tools": TOOLS},
    "none_with_tools": {"tools": TOOLS, "tool_choice": "none"},
}


def decide(version: Version, case: str, **options: Any) -> tuple[str, Constraint]:
    body = {"messages": USER, **CASES[case]}
    prompt = normalize(body)
    constraint = constrain(
        prompt,
        version,
        body.get("response_format"),
        parallel_tool_calls=body.get("parallel_tool_calls", True),
        **options,
    )
    return Template(version).render(prompt), constraint


@pytest.mark.parametrize("version", list(Version))
@pytest.mark.parametrize("case", list(CASES))
def test_prompt_suffix_and_grammar_are_the_golden_ones(version: Version, case: str) -> None:
    text, constraint = decide(version, case)
    if case in ("auto", "none_with_tools"):  # never constrained without a reason
        assert constraint == Constraint(None, None)
        return
    suffix, grammar = GOLDEN[version][case]
    assert text.endswith(suffix), text[-80:]
    assert constraint == Constraint(grammar, None)


@pytest.mark.parametrize("version", list(Version))
def test_the_same_request_gets_the_same_grammar_built_or_remembered(version: Version) -> None:
    first = decide(version, "required")[1]
    clear_caches()
    assert decide(version, "required")[1] == first  # built again: the same text (TGI's cache key)
    assert decide(version, "required")[1] is decide(version, "required")[1]  # remembered


# --------------------------------------------------------------------------------------------------------
# Sample outputs: what each grammar accepts and refuses, and what the parser makes of it
# --------------------------------------------------------------------------------------------------------

PARIS, THREE, OK = '{"city": "Paris"}', '{"n": 3}', '{"ok": true}'


class Syntax(NamedTuple):
    """A version's call syntax after the generation prefix, as FORMATS.md writes it."""

    call: str  # one call, "{name}" and "{args}" to fill
    then: str | None  # between two calls (None: one call per turn)
    auto_call: str  # what the call branch starts with under auto
    text: str  # what the text branch starts with under auto
    eos: str  # the tokenizer's end of sequence, which TGI allows once the grammar is complete


SYNTAX = {
    Version.V1: Syntax("\n<|START_OF_FUNCTION_CALL|>{name}:\n{args}", None, "", "", "</s>"),
    Version.V2: Syntax("{name}\n<|content|>{args}", "\n<|from|>assistant\n<|recipient|>", "", "all\n<|content|>",
                       "</s>"),
    Version.V2_LLAMA3: Syntax("{name}\n{args}", "<|reserved_special_token_249|>", "<|reserved_special_token_249|>",
                              "", "<|eot_id|>"),
    Version.V3_LLAMA3: Syntax("{name}\n{args}", ">>>", "", "all\n", "<|eot_id|>"),
    Version.V3_LLAMA31: Syntax("{name}>{args}</function>", "<function=", "<function=", "", "<|eot_id|>"),
}  # fmt: skip


def call(version: Version, name: str, args: str) -> str:
    return SYNTAX[version].call.format(name=name, args=args)


def calls(version: Version, *pairs: tuple[str, str]) -> str:
    return SYNTAX[version].then.join(call(version, n, a) for n, a in pairs)


def judge(version: Version, case: str, output: str) -> bool:
    grammar = decide(version, case)[1].grammar
    assert grammar is not None
    if grammar["type"] == "json":
        pattern = build_regex_from_schema(json.dumps(grammar["value"]))  # as TGI's router does
    else:
        pattern = grammar["value"]
    return re.fullmatch(pattern, output) is not None


def message(version: Version, case: str, output: str) -> tuple[str, list[tuple[str, str]]]:
    """(content, [(name, arguments)]) the parser makes of the prompt's prefix + `output` + EOS."""
    prompt = normalize({"messages": USER, **CASES[case]})
    events = Template(version).parse(prompt, [(output, False), (SYNTAX[version].eos, True)])
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    found: dict[int, list[str]] = {}
    for e in events:
        if isinstance(e, ToolCallStart):
            found[e.index] = [e.name, ""]
        elif isinstance(e, ToolCallArgs):
            found[e.index][1] += e.text
    return text, [(n, a) for n, a in found.values()]


def schema_of(name: str) -> dict[str, Any]:
    return {"get_weather": WEATHER, "count": COUNT, "Answer": ANSWER}[name]


def referee(name: str, text: str) -> bool:
    """jsonschema's verdict on `text` for the schema called `name`."""
    try:
        jsonschema.validate(json.loads(text), schema_of(name))
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


@pytest.mark.parametrize("version", list(Version))
def test_response_format_accepts_the_schema_and_nothing_else(version: Version) -> None:
    for case in ("json_schema", "auto_json_schema"):
        lead = SYNTAX[version].text if case == "auto_json_schema" else ""
        for output, ok in [(OK, True), ('{"ok":false}', True), ('{"ok": "yes"}', False), ('{"no": true}', False),
                           ("Sure! " + OK, False), ("", False)]:  # fmt: skip
            assert judge(version, case, lead + output) is ok, (case, output)
            assert referee("Answer", output) is ok or not output.startswith("{")
            if ok:
                assert message(version, case, lead + output) == (output, [])
    assert judge(version, "json_object", '{"any": {"thing": [1, "x"]}}')
    assert not judge(version, "json_object", "[1, 2]")
    assert not judge(version, "json_object", "hello")


@pytest.mark.parametrize("version", list(Version))
def test_named_choice_accepts_that_call_only(version: Version) -> None:
    after_prefix = call(version, "get_weather", PARIS) if version is Version.V1 else (
        PARIS + ("</function>" if version is Version.V3_LLAMA31 else ""))  # fmt: skip
    assert judge(version, "named", after_prefix)
    assert message(version, "named", after_prefix) == ("", [("get_weather", PARIS)])
    for bad in ('{"city": "Rome"}', '{"city": 3}', "{}", "It is sunny."):
        wrong = after_prefix.replace(PARIS, bad)
        assert not judge(version, "named", wrong), wrong
        assert not referee("get_weather", bad)


@pytest.mark.parametrize("version", list(Version))
def test_required_accepts_calls_of_the_list_with_their_arguments(version: Version) -> None:
    one = call(version, "get_weather", PARIS)  # after the prefix (v2.llama3's separator, v3.1's "<function=")
    assert judge(version, "required", one) and judge(version, "required_one", one)
    assert message(version, "required", one) == ("", [("get_weather", PARIS)])
    for wrong in (one.replace("get_weather", "get_time"),  # a name not in the list
                  one.replace(PARIS, '{"city": 7}'),  # an ill-typed argument
                  one.replace("get_weather", "count"),  # count's arguments are {"n": integer}
                  "I cannot call tools."):  # fmt: skip
        assert not judge(version, "required", wrong), wrong
    assert not referee("get_weather", '{"city": 7}') and not referee("count", PARIS)
    if SYNTAX[version].then is None:
        return  # v1: one call per turn
    two = one + SYNTAX[version].then + call(version, "count", THREE)
    assert judge(version, "required", two)
    assert not judge(version, "required_one", two)  # parallel_tool_calls: false
    assert message(version, "required", two) == ("", [("get_weather", PARIS), ("count", THREE)])
    assert not judge(version, "required", one + SYNTAX[version].then + call(version, "count", '{"n": 1.5}'))


@pytest.mark.parametrize("version", list(Version))
def test_auto_with_response_format_is_the_schema_or_calls(version: Version) -> None:
    calls_branch = SYNTAX[version].auto_call + call(version, "count", THREE)
    assert judge(version, "auto_json_schema", calls_branch)
    assert message(version, "auto_json_schema", calls_branch) == ("", [("count", THREE)])
    assert not judge(version, "auto_json_schema", calls_branch.replace("count", "counter"))
    assert not judge(version, "auto_json_schema", "It is sunny in Paris.")


def test_sentencepiece_models_may_write_a_space_after_each_marker() -> None:
    """v1 (Llama 2) and v2 (Mistral) were trained on text after an added token encoded with a leading "▁",
    which TGI's grammar sees as a space: the regex allows one, and the parsers strip it."""
    v2_two = ' get_weather\n<|content|> {"city": "Paris"}\n<|from|> assistant\n<|recipient|> count\n<|content|> {"n": 3}'
    assert judge(Version.V2, "required", v2_two)
    assert message(Version.V2, "required", v2_two) == ("", [("get_weather", PARIS), ("count", THREE)])
    assert judge(Version.V2, "named", " " + PARIS) and judge(Version.V2, "json_schema", " " + OK)
    assert not judge(Version.V2, "named", "  " + PARIS)  # one space, not any whitespace
    v1_call = '\n<|START_OF_FUNCTION_CALL|> get_weather:\n{"city": "Paris"}'
    assert judge(Version.V1, "required", v1_call)
    assert message(Version.V1, "required", v1_call) == ("", [("get_weather", PARIS)])
    assert not judge(Version.V3_LLAMA3, "required", " " + call(Version.V3_LLAMA3, "count", THREE))  # BPE: no


@pytest.mark.parametrize("version", list(Version))
def test_tgis_regex_parser_reads_every_grammar(version: Version) -> None:
    """TGI's shard turns a regex grammar into an automaton with interegular (outlines 0.1.x), which calls
    anchors, backreferences and some classes "Unsupported": it must read ours, and accept what they accept.
    (json_object's any-object regex is left out: interegular takes about 5 s on it; docs/performance.md.)"""
    for case in ("named", "required", "required_one", "auto_json_schema"):
        grammar = GOLDEN[version][case][1]
        assert grammar is not None
        pattern = (
            grammar["value"]
            if grammar["type"] == "regex"
            else build_regex_from_schema(json.dumps(grammar["value"]))
        )
        fsm = interegular.parse_pattern(pattern).to_fsm()
        sample = call(version, "get_weather", PARIS)
        if case == "named":
            sample = (
                sample
                if version is Version.V1
                else PARIS + ("</function>" if version is Version.V3_LLAMA31 else "")
            )
        elif case == "auto_json_schema":
            sample = SYNTAX[version].auto_call + sample
        assert fsm.accepts(sample), (case, sample)
        assert not fsm.accepts(sample.replace("Paris", "Rome"))
