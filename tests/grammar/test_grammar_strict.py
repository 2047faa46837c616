"""Strict schemas, schemas the grammar cannot express, grammar support off, and the odd tool sets."""

from __future__ import annotations

import datetime
import json
import re
import time
from enum import Enum
from typing import Any, Literal

import jsonschema
import pytest
from openai.lib._pydantic import to_strict_json_schema
from pydantic import BaseModel, Field

from tgi_gateway.errors import InvalidRequestError
from tgi_gateway.grammar import Constraint, constrain
from tgi_gateway.grammar.schemas import MAX_REGEX_CHARS, Unexpressible, estimated_chars, prepare, schema_regex
from tgi_gateway.prompting import normalize
from tgi_gateway.prompting.types import Version

USER = [{"role": "user", "content": "hi"}]


def fmt(schema: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "Out", "schema": schema, "strict": strict}}


def text_constraint(response_format: Any, version: Version = Version.V3_LLAMA3, **kw: Any) -> Constraint:
    return constrain(normalize({"messages": USER}), version, response_format, **kw)


def tool_constraint(
    parameters: dict[str, Any], strict: bool, choice: Any = "required", **kw: Any
) -> Constraint:
    tools = [{"type": "function", "function": {"name": "f", "parameters": parameters, "strict": strict}}]
    return constrain(
        normalize({"messages": USER, "tools": tools, "tool_choice": choice}), Version.V3_LLAMA3, **kw
    )


# --------------------------------------------------------------------------------------------------------
# OpenAI's strict subset, as the official SDK sends it, works
# --------------------------------------------------------------------------------------------------------


class Unit(str, Enum):
    C = "C"
    F = "F"


class Step(BaseModel):
    explanation: str
    output: str


class Report(BaseModel):
    """Everything OpenAI's strict subset offers (STRUCTURED_OUTPUTS.md §4)."""

    city: str = Field(description="the city", pattern=r"^[A-Z][a-z]+$")
    unit: Unit | None
    kind: Literal["daily", "hourly"]
    temperature: float = Field(ge=-90, le=60)
    days: int
    steps: list[Step] = Field(min_length=1, max_length=3)
    when: datetime.datetime
    day: datetime.date
    ip: str = Field(json_schema_extra={"format": "ipv4"})
    host: str = Field(json_schema_extra={"format": "hostname"})
    duration: str = Field(json_schema_extra={"format": "duration"})
    note: str | None


GOOD = Report(
    city="Paris", unit=Unit.C, kind="daily", temperature=21.5, days=3,
    steps=[Step(explanation="look", output="sunny")], when=datetime.datetime(2026, 12, 5, 14, 0, 0),
    day=datetime.date(2026, 12, 5), ip="192.168.0.1", host="api.example.com", duration="P3DT4H", note=None,
)  # fmt: skip


def test_the_sdk_strict_schema_of_a_rich_model_is_enforced() -> None:
    schema = to_strict_json_schema(Report)
    constraint = text_constraint(fmt(schema))
    assert constraint.warning is None and constraint.grammar is not None
    # ipv4/hostname/duration are rewritten into patterns (outlines-core knows none of them): a regex
    assert constraint.grammar["type"] == "regex"
    pattern = re.compile(constraint.grammar["value"])
    good = GOOD.model_dump_json()
    assert pattern.fullmatch(good), good
    jsonschema.validate(json.loads(good), schema)  # the referee agrees
    for field, value in [("kind", "weekly"), ("days", 2.5), ("unit", "K"), ("steps", []), ("ip", "300.1.1.1"),
                         ("host", "-bad-.com"), ("duration", "3 days"), ("city", "paris"), ("when", "yesterday"),
                         ("note", 5)]:  # fmt: skip
        bad = json.loads(good) | {field: value}
        assert not pattern.fullmatch(json.dumps(bad, separators=(",", ":"))), field
        if field not in (
            "host",
            "duration",
            "when",
            "ip",
        ):  # jsonschema checks those formats only with extras
            with pytest.raises(jsonschema.ValidationError):
                jsonschema.validate(bad, schema)
    assert not pattern.fullmatch(json.dumps({k: v for k, v in json.loads(good).items() if k != "note"}))


def test_a_plain_strict_schema_goes_as_tgis_json_grammar_as_the_client_sent_it() -> None:
    class Weather(BaseModel):
        city: str
        temperature: float

    schema = to_strict_json_schema(Weather)
    assert text_constraint(fmt(schema)) == Constraint({"type": "json", "value": schema})


def test_a_schema_without_top_level_properties_is_a_regex() -> None:
    schema = {"type": "object", "additionalProperties": {"type": "integer"}}  # TGI's json needs properties
    grammar = text_constraint(fmt(schema, strict=False)).grammar
    assert grammar is not None and grammar["type"] == "regex"
    assert re.fullmatch(grammar["value"], '{"a": 1, "b": 2}')
    assert not re.fullmatch(grammar["value"], '{"a": "x"}')


# --------------------------------------------------------------------------------------------------------
# What the grammar cannot express: 400 naming the keyword when strict, no grammar and a warning otherwise
# --------------------------------------------------------------------------------------------------------

UNEXPRESSIBLE = [
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "'not'", "#/properties/a"),
    ({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}, "'uniqueItems'",
     "#/properties/a"),
    ({"type": "object", "properties": {"a": {"type": "string", "format": "phone"}}}, "format 'phone'",
     "#/properties/a"),
    ({"type": "object", "properties": {"a": {"type": "string"}},
      "allOf": [{"required": ["a"]}, {"properties": {"a": {"minLength": 1}}}]}, "'allOf'", "#"),
    ({"type": "object", "properties": {"a": {"if": {}, "then": {}}}}, "'if'", "#/properties/a"),
]  # fmt: skip


@pytest.mark.parametrize("schema,keyword,where", UNEXPRESSIBLE)
def test_strict_response_format_the_grammar_cannot_express_is_a_400_naming_the_keyword(
    schema: dict[str, Any], keyword: str, where: str
) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        text_constraint(fmt(schema))
    error = caught.value
    assert error.status_code == 400 and error.code == "invalid_json_schema"
    assert error.param == "response_format.json_schema.schema"
    assert (
        f"Invalid schema for response_format 'Out': {keyword} (at {where}) cannot be enforced"
        in error.message
    )


@pytest.mark.parametrize("schema,keyword,where", UNEXPRESSIBLE)
def test_not_strict_the_request_goes_without_grammar_and_says_why(
    schema: dict[str, Any], keyword: str, where: str
) -> None:
    constraint = text_constraint(fmt(schema, strict=False))
    assert constraint.grammar is None
    assert (
        constraint.warning is not None
        and keyword in constraint.warning
        and "without a grammar" in constraint.warning
    )


@pytest.mark.parametrize("schema,keyword,where", UNEXPRESSIBLE[:3])
def test_strict_tools_the_grammar_cannot_express_are_a_400_naming_function_and_keyword(
    schema: dict[str, Any], keyword: str, where: str
) -> None:
    for choice in ("required", {"type": "function", "function": {"name": "f"}}):
        with pytest.raises(InvalidRequestError) as caught:
            tool_constraint(schema, strict=True, choice=choice)
        assert caught.value.code == "invalid_function_parameters"
        assert f"Invalid schema for function 'f': {keyword} (at {where})" in caught.value.message
        constraint = tool_constraint(schema, strict=False, choice=choice)
        assert constraint.grammar is None and "function 'f' is not strict" in (constraint.warning or "")


def test_a_recursive_schema_is_refused_when_strict() -> None:
    schema = {"type": "object", "properties": {"next": {"$ref": "#"}}}
    with pytest.raises(InvalidRequestError, match=r"\$ref \(at #\) cannot be enforced.*cyclic"):
        text_constraint(fmt(schema))


def test_annotations_only_mean_any_value_and_minimum_is_accepted_not_enforced() -> None:
    schema = {"type": "object", "properties": {"a": {"description": "anything"}, "n": {"type": "integer",
              "minimum": 5}}, "required": ["a", "n"]}  # fmt: skip
    prepared = prepare(schema)
    assert prepared.schema["properties"]["a"] == {
        "type": ["string", "number", "boolean", "null", "object", "array"]
    }
    assert not prepared.portable
    regex = schema_regex(schema)
    assert re.fullmatch(regex, '{"a": [1, {"b": null}], "n": 2}')  # minimum not enforced (as in TGI)
    assert re.fullmatch(schema_regex({**schema, "properties": {"a": {}, "n": {}}}), '{"a": "x", "n": 2}')
    assert not re.fullmatch(regex, '{"a": 1, "n": "2"}')
    with pytest.raises(Unexpressible):
        prepare({"type": "object", "properties": {"a": False}})


# --------------------------------------------------------------------------------------------------------
# Grammar support off (--no-grammar), bad response_format values, odd tool sets
# --------------------------------------------------------------------------------------------------------


def test_without_grammar_support_tool_choices_rely_on_the_prompt_and_json_formats_are_refused() -> None:
    assert tool_constraint({"type": "object", "properties": {}}, strict=True, enabled=False) == Constraint()
    for response_format in (fmt({"type": "object", "properties": {}}), {"type": "json_object"}):
        with pytest.raises(InvalidRequestError, match="--no-grammar") as caught:
            text_constraint(response_format, enabled=False)
        assert (caught.value.code, caught.value.param) == ("grammar_disabled", "response_format")
    assert text_constraint({"type": "text"}, enabled=False) == Constraint()


@pytest.mark.parametrize(
    "response_format,param",
    [
        ({"type": "xml"}, "response_format.type"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}},
            "response_format.json_schema.schema",
        ),
    ],
)
def test_bad_response_formats_are_400s_naming_the_field(response_format: dict, param: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        text_constraint(response_format)
    assert caught.value.param == param


def test_text_format_and_auto_are_never_constrained() -> None:
    assert text_constraint({"type": "text"}) == Constraint()
    assert text_constraint(None) == Constraint()


def test_the_code_interpreter_is_a_call_of_raw_code_where_the_syntax_allows() -> None:
    tools = [{"type": "code_interpreter"}, {"type": "function", "function": {"name": "f"}}]
    prompt = normalize({"messages": USER, "tools": tools, "tool_choice": "required"})
    grammar = constrain(prompt, Version.V3_LLAMA3).grammar
    assert grammar is not None
    assert re.fullmatch(grammar["value"], "python\nprint('hi')\n>>>not even a call")
    assert re.fullmatch(grammar["value"], "f\n{}")
    assert not re.fullmatch(grammar["value"], 'f\n{"a": 1}')  # no parameters: {}
    grammar31 = constrain(prompt, Version.V3_LLAMA31).grammar  # required: the prompt ends with "<function="
    assert grammar31 is not None and not re.fullmatch(grammar31["value"], "<|python_tag|>print(1)")
    auto31 = constrain(
        normalize({"messages": USER, "tools": tools}), Version.V3_LLAMA31, {"type": "json_object"}
    ).grammar
    assert auto31 is not None and re.fullmatch(auto31["value"], "<|python_tag|>print(1)")


def test_legacy_functions_get_one_call() -> None:
    functions = [{"name": "f", "parameters": {"type": "object", "properties": {}}}]
    prompt = normalize({"messages": USER, "functions": functions, "function_call": {"name": "f"}})
    assert constrain(prompt, Version.V3_LLAMA3) == Constraint(
        {"type": "json", "value": functions[0]["parameters"]}
    )
    prompt = normalize({"messages": USER, "functions": functions})
    grammar = constrain(prompt, Version.V3_LLAMA3, {"type": "json_object"}).grammar
    assert grammar is not None
    assert re.fullmatch(grammar["value"], "f\n{}") and not re.fullmatch(grammar["value"], "f\n{}>>>f\n{}")


# --------------------------------------------------------------------------------------------------------
# Size: what outlines-core would blow up is refused before it is built; the joined grammar is bounded
# --------------------------------------------------------------------------------------------------------


def optional_objects(k: int, depth: int) -> dict[str, Any]:
    """Objects of `k` properties, none required, `depth` levels deep: outlines-core squares each level."""
    if depth == 0:
        return {"type": "string"}
    return {"type": "object", "properties": {f"p{i}": optional_objects(k, depth - 1) for i in range(k)}}


def test_a_schema_whose_regex_would_explode_is_refused_before_it_is_built() -> None:
    schema = optional_objects(8, 4)  # 131 KB; outlines-core would write 113 MB in 0.6 s
    start = time.perf_counter()
    with pytest.raises(
        InvalidRequestError, match=r"size \(at #\) cannot be enforced.*about 115,557,560 characters"
    ):
        text_constraint(fmt(schema))
    assert time.perf_counter() - start < 0.5
    assert "without a grammar" in (text_constraint(fmt(schema, strict=False)).warning or "")
    small = optional_objects(8, 2)  # 87 KB of regex: fine
    assert len(schema_regex(small)) <= MAX_REGEX_CHARS
    assert estimated_chars(prepare(small).schema) == pytest.approx(len(schema_regex(small)), rel=0.3)


def test_a_ref_bomb_in_response_format_is_refused_within_its_budget() -> None:
    defs = {f"d{i}": {"type": "object", "properties": {"a": {"$ref": f"#/$defs/d{i + 1}"},
                                                       "b": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(30)}  # fmt: skip
    defs["d30"] = {"type": "string"}
    schema = {"type": "object", "properties": {"x": {"$ref": "#/$defs/d0"}}, "$defs": defs}
    with pytest.raises(InvalidRequestError, match=r"too large once its \$refs are expanded"):
        text_constraint(fmt(schema))


def test_too_many_tools_for_one_grammar() -> None:
    big = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(20)}}  # ~7 KB each
    tools = [{"type": "function", "function": {"name": f"f{i}", "parameters": big}} for i in range(128)]
    prompt = normalize({"messages": USER, "tools": tools, "tool_choice": "required"})
    constraint = constrain(prompt, Version.V3_LLAMA3)
    assert constraint.grammar is None and "more than 524,288" in (constraint.warning or "")
    tools[0]["function"]["strict"] = True
    prompt = normalize({"messages": USER, "tools": tools, "tool_choice": "required"})
    with pytest.raises(InvalidRequestError, match="send fewer or smaller tools"):
        constrain(prompt, Version.V3_LLAMA3)


def test_a_schema_nested_deeper_than_outlines_core_parses_is_unexpressible_not_a_crash() -> None:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(100):  # 200 levels of JSON: outlines-core's parser stops at 128
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    with pytest.raises(InvalidRequestError, match=r"nesting \(at #\) cannot be enforced.*128 levels"):
        text_constraint(fmt(schema))
    assert "128 levels" in (text_constraint(fmt(schema, strict=False)).warning or "")
