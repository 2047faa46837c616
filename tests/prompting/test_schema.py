"""The TypeScript-like schema and $ref resolution (tgi_gateway.prompting.schema).

The table below is a golden table: every expected text was produced, at development time, by functionary's
own jinja macro ``generate_schema_from_functions`` (the hub medium-v3.2 template, plain
``jinja2.Environment()``) and is stored here as a literal. Together the cases cover every quirk the macro
has; ``flavor="python"`` cases were checked against the same macro with the two documented differences
(untyped -> ``any``, examples printed without replacing ``'``). Each case renders one function ``f`` whose
parameters are ``{"type": "object", "properties": <properties>, "required": <required>}``; the expected lines
are the ones between ``type f = (_: {`` and ``}) => any;``.
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

import pytest

from tgi_gateway.prompting.schema import SchemaError, resolve_refs, ts_schema
from tgi_gateway.prompting.types import Function

HEADER = "// Supported function definitions that should be called when necessary.\nnamespace functions {\n\n"
FOOTER = "} // namespace functions"
MISSING: Any = object()  # no "required" key at all


class Case(NamedTuple):
    id: str
    properties: dict[str, Any]
    required: Any
    expected: list[str]
    flavor: str = "jinja"


TABLE = [
    Case(
        "untyped_is_empty",
        {"a": {}, "b": {"anyOf": [{"type": "string"}]}, "c": {"description": "no type"}},
        ["a"],
        [
            "a: ,",
            "b?: ,",
            "// no type.",
            "c?: ,",
        ],
    ),
    Case(
        "untyped_is_any_in_python_flavor",
        {"a": {}, "b": {"anyOf": [{"type": "string"}]}, "c": {"oneOf": [{"format": "date"}]}},
        ["a"],
        [
            "a: any,",
            "b?: any,",
            "// Format=date",
            "c?: ,",
        ],
        flavor="python",
    ),
    Case(
        "scalar_types",
        {
            "s": {"type": "string"},
            "i": {"type": "integer"},
            "f": {"type": "float"},
            "n": {"type": "number"},
            "b": {"type": "boolean"},
            "z": {"type": "null"},
            "u": {"type": "Integer"},
        },
        ["s"],
        [
            "s: string,",
            "i?: number,",
            "f?: number,",
            "n?: number,",
            "b?: boolean,",
            "z?: null,",
            "u?: Integer,",
        ],
    ),
    Case(
        "type_list_joined_number_only_for_whole_string",
        {
            "a": {"type": ["string", "null"]},
            "b": {"type": ["integer"]},
            "c": {"type": ["integer", "null"]},
            "d": {"type": ["float"]},
            "e": {"type": []},
        },
        MISSING,
        [
            "a?: string | null,",
            "b?: number,",
            "c?: integer | null,",
            "d?: number,",
            "e?: ,",
        ],
    ),
    Case(
        "type_list_naming_object_or_array",
        {
            "o": {"type": ["object"], "properties": {"x": {"type": "string"}}},
            "a": {"type": ["array"], "items": {"type": "string"}},
        },
        ["o"],
        [
            "o: {",
            "    x?: string,",
            "},",
            "a?: string[],",
        ],
    ),
    Case(
        "non_string_type_printed_with_str",
        {"a": {"type": True}, "b": {"type": None}, "c": {"type": 1.0}, "d": {"type": ["string", None, 1]}},
        MISSING,
        [
            "a?: True,",
            "b?: None,",
            "c?: 1.0,",
            "d?: string | None | 1,",
        ],
    ),
    Case(
        "oneOf_types_unique_first_seen",
        {
            "a": {"oneOf": [{"type": "string"}, {"type": "integer"}, {"type": "string"}, {"format": "date"}]},
            "b": {"oneOf": [{"type": "integer"}]},
            "c": {"oneOf": [{"type": "integer"}, {"type": "null"}]},
        },
        MISSING,
        [
            "// Format=date",
            "a?: string | integer,",
            "// Format=",
            "b?: number,",
            "// Format=",
            "c?: integer | null,",
        ],
    ),
    Case(
        "oneOf_unique_ignores_case_and_uses_python_equality",
        {
            "a": {"oneOf": [{"type": "String"}, {"type": "string"}, {"type": "STRING"}]},
            "b": {"oneOf": [{"type": 1}, {"type": True}, {"type": 1.0}, {"type": "1"}]},
        },
        MISSING,
        [
            "// Format=",
            "a?: String,",
            "// Format=",
            "b?: 1 | 1,",
        ],
    ),
    Case(
        "oneOf_without_types_is_untyped",
        {"a": {"oneOf": []}, "b": {"oneOf": [{"description": "x"}]}},
        MISSING,
        [
            "// Format=",
            "a?: ,",
            "// Format=",
            "b?: ,",
        ],
    ),
    Case(
        "oneOf_object_is_an_object",
        {"a": {"oneOf": [{"type": "object"}], "properties": {"x": {"type": "string"}}}},
        MISSING,
        [
            "// Format=",
            "a?: {",
            "    x?: string,",
            "},",
        ],
    ),
    Case(
        "type_wins_over_oneOf",
        {"a": {"type": "string", "oneOf": [{"type": "integer"}]}},
        MISSING,
        [
            "// Format=",
            "a?: string,",
        ],
    ),
    Case(
        "description_gets_a_period_once",
        {
            "a": {"type": "string", "description": "The city"},
            "b": {"type": "string", "description": "The city."},
            "c": {"type": "string", "description": ""},
        },
        MISSING,
        [
            "// The city.",
            "a?: string,",
            "// The city.",
            "b?: string,",
            "// .",
            "c?: string,",
        ],
    ),
    Case(
        "multiline_description_not_flattened",
        {"a": {"type": "string", "description": "line one\nline two"}},
        MISSING,
        [
            "// line one",
            "line two.",
            "a?: string,",
        ],
    ),
    Case(
        "description_printed_raw",
        {"a": {"type": "string", "description": "a <b> & 'c' \"d\" ünï"}},
        MISSING,
        [
            "// a <b> & 'c' \"d\" ünï.",
            "a?: string,",
        ],
    ),
    Case(
        "limits_trigger_only_when_truthy",
        {
            "a": {"type": "number", "maximum": 0},
            "b": {"type": "number", "minimum": 0, "maxLength": 0, "minLength": 0.0},
            "c": {"type": "number", "maximum": None},
            "d": {"type": "string", "minLength": 1},
        },
        MISSING,
        [
            "a?: number,",
            "b?: number,",
            "c?: number,",
            "// Minimum length=1",
            "d?: string,",
        ],
    ),
    Case(
        "limits_then_print_every_present_field",
        {
            "a": {"type": "number", "maximum": 0, "minimum": 1},
            "b": {"type": "string", "maxLength": 10, "minLength": 0, "maximum": False, "minimum": None},
            "c": {"type": "number", "minimum": 1.5, "maximum": 3.0},
        },
        MISSING,
        [
            "// Maximum=0 Minimum=1",
            "a?: number,",
            "// Maximum=False Minimum=None Maximum length=10 Minimum length=0",
            "b?: string,",
            "// Maximum=3.0 Minimum=1.5",
            "c?: number,",
        ],
    ),
    Case(
        "limits_printed_after_description_and_default",
        {"a": {"type": "integer", "maximum": 0, "description": "zero max", "default": 0}},
        MISSING,
        [
            "// zero max. Default=0. Maximum=0",
            "a?: number,",
        ],
    ),
    Case(
        "default_values_use_python_str",
        {
            "a": {"type": "boolean", "default": True},
            "b": {"type": "integer", "default": None},
            "c": {"type": "array", "items": {"type": "string"}, "default": ["a"]},
            "d": {"type": "number", "default": 1.0},
            "e": {"type": "object", "default": {"k": "v"}},
            "f": {"default": 0},
        },
        MISSING,
        [
            "// Default=True.",
            "a?: boolean,",
            "// Default=None.",
            "b?: number,",
            "// Default=['a'].",
            "c?: string[],",
            "// Default=1.0.",
            "d?: number,",
            "// Default={'k': 'v'}.",
            "e?: {",
            "},",
            "// Default=0.",
            "f?: ,",
        ],
    ),
    Case(
        "string_default_quoted_only_when_type_is_string",
        {
            "a": {"type": "string", "default": "x"},
            "b": {"type": ["string", "null"], "default": "x"},
            "c": {"default": "x"},
            "d": {"type": "string", "default": None},
            "e": {"type": "string", "default": ""},
        },
        MISSING,
        [
            '// Default="x".',
            "a?: string,",
            "// Default=x.",
            "b?: string | null,",
            "// Default=x.",
            "c?: ,",
            '// Default="None".',
            "d?: string,",
            '// Default="".',
            "e?: string,",
        ],
    ),
    Case(
        "format",
        {
            "a": {"type": "string", "format": "date"},
            "b": {"type": "string", "format": "email", "description": "Mail"},
            "c": {"type": "string", "format": None},
            "d": {"type": "string", "format": ""},
        },
        MISSING,
        [
            "// Format=date",
            "a?: string,",
            "// Mail. Format=email",
            "b?: string,",
            "// Format=None",
            "c?: string,",
            "// Format=",
            "d?: string,",
        ],
    ),
    Case(
        "format_equal_to_sentinel_is_no_format",
        {"a": {"type": "string", "format": "<|NONE|>"}},
        MISSING,
        [
            "a?: string,",
        ],
    ),
    Case(
        "oneOf_formats",
        {
            "a": {"oneOf": [{"type": "string", "format": "date-time"}, {"type": "string", "format": "date"}]},
            "b": {
                "oneOf": [
                    {"type": "string", "format": "date"},
                    {"type": "string", "format": "time"},
                    {"type": "string", "format": "uri"},
                ]
            },
        },
        MISSING,
        [
            "// Format=date-time or date",
            "a?: string,",
            "// Format=date or time or uri",
            "b?: string,",
        ],
    ),
    Case(
        "oneOf_format_equal_to_last_gets_no_separator",
        {
            "a": {"oneOf": [{"format": "date"}, {"format": "time"}, {"format": "date"}]},
            "b": {"oneOf": [{"format": "date"}, {"format": "date"}]},
        },
        MISSING,
        [
            "// Format=datetime or date",
            "a?: ,",
            "// Format=datedate",
            "b?: ,",
        ],
    ),
    Case(
        "oneOf_last_without_format_gives_trailing_or",
        {
            "a": {"oneOf": [{"type": "string", "format": "date"}, {"type": "integer"}]},
            "b": {"oneOf": [{"format": "date"}, {"format": "time"}, {"type": "null"}]},
        },
        MISSING,
        [
            "// Format=date or ",
            "a?: string | integer,",
            "// Format=date or time or ",
            "b?: null,",
        ],
    ),
    Case(
        "oneOf_without_any_format_still_prints_format",
        {
            "a": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
            "b": {"oneOf": [], "description": "empty oneOf"},
        },
        MISSING,
        [
            "// Format=",
            "a?: string | integer,",
            "// empty oneOf. Format=",
            "b?: ,",
        ],
    ),
    Case(
        "top_level_format_wins_over_oneOf",
        {"a": {"format": "uri", "oneOf": [{"format": "date"}]}},
        MISSING,
        [
            "// Format=uri",
            "a?: ,",
        ],
    ),
    Case(
        "enum_options",
        {
            "a": {"type": "string", "enum": ["x", "y"]},
            "b": {"type": "integer", "enum": [1, 2, 3]},
            "c": {"enum": ["a", 1, None, True, 2.5]},
            "d": {"type": "string", "enum": []},
        },
        MISSING,
        [
            'a?: "x" | "y",',
            "b?: 1 | 2 | 3,",
            'c?: "a" | 1 | None | True | 2.5,',
            "d?: ,",
        ],
    ),
    Case(
        "enum_no_separator_after_option_equal_to_last",
        {
            "a": {"enum": ["a", "b", "a"]},
            "b": {"enum": [1, True]},
            "c": {"enum": [1, 2, 1.0]},
            "d": {"enum": [0, False, "x", 0]},
        },
        MISSING,
        [
            'a?: "a""b" | "a",',
            "b?: 1True,",
            "c?: 12 | 1.0,",
            'd?: 0False"x" | 0,',
        ],
    ),
    Case(
        "enum_and_nullable",
        {
            "a": {"type": "string", "enum": ["x", "y"], "nullable": True},
            "b": {"type": "string", "nullable": True},
            "c": {"type": "string", "nullable": False},
            "d": {"type": "string", "nullable": "false"},
            "e": {"type": "integer", "nullable": 0},
        },
        MISSING,
        [
            'a?: "x" | "y" | null,',
            "b?: string | null,",
            "c?: string,",
            "d?: string | null,",
            "e?: number,",
        ],
    ),
    Case(
        "examples_of_scalars_need_a_comment_line",
        {
            "a": {"type": "string", "examples": ["x", "it's"]},
            "b": {"type": "string", "description": "B", "examples": ["x", "it's"]},
            "c": {"type": "integer", "maximum": 0, "examples": [1]},
            "d": {"type": "integer", "maximum": 1, "examples": [1]},
        },
        MISSING,
        [
            "a?: string,",
            "// B.",
            "// Example b:",
            "// x",
            '// it"s',
            "b?: string,",
            "c?: number,",
            "// Maximum=1",
            "// Example d:",
            "// 1",
            "d?: number,",
        ],
    ),
    Case(
        "examples_quote_replacement_and_str",
        {"a": {"type": "object", "examples": [{"k": "v"}, ["a", "b"], True, None, 1.5, "say 'hi'", 'a "b"']}},
        MISSING,
        [
            "// Example a:",
            '// {"k": "v"}',
            '// ["a", "b"]',
            "// True",
            "// None",
            "// 1.5",
            '// say "hi"',
            '// a "b"',
            "a?: {",
            "},",
        ],
    ),
    Case(
        "examples_header_name_gets_quote_replacement_too",
        {"it's": {"type": "string", "description": "D", "examples": ["x"]}},
        MISSING,
        [
            "// D.",
            '// Example it"s:',
            "// x",
            "it's?: string,",
        ],
    ),
    Case(
        "examples_python_flavor_keeps_quotes",
        {
            "it's": {"type": "object", "examples": [{"k": "v"}, "say 'hi'"]},
            "b": {"description": "B", "examples": ["it's"]},
        },
        MISSING,
        [
            "// Example it's:",
            "// {'k': 'v'}",
            "// say 'hi'",
            "it's?: {",
            "},",
            "// B.",
            "// Example b:",
            "// it's",
            "b?: any,",
        ],
        flavor="python",
    ),
    Case(
        "examples_of_objects_and_typed_arrays_always_printed",
        {
            "o": {"type": "object", "examples": [{"x": 1}], "properties": {"x": {"type": "integer"}}},
            "a": {"type": "array", "items": {"type": "string"}, "examples": [["p", "q"]]},
            "e": {"type": "array", "items": {"type": "string"}, "examples": []},
        },
        MISSING,
        [
            "// Example o:",
            '// {"x": 1}',
            "o?: {",
            "    x?: number,",
            "},",
            "// Example a:",
            '// ["p", "q"]',
            "a?: string[],",
            "// Example e:",
            "e?: string[],",
        ],
    ),
    Case(
        "examples_of_untyped_arrays_need_a_comment_line",
        {
            "a": {"type": "array", "examples": [[1]]},
            "b": {"type": "array", "description": "B", "examples": [[1]]},
        },
        MISSING,
        [
            "a?: [],",
            "// B.",
            "// Example b:",
            "// [1]",
            "b?: [],",
        ],
    ),
    Case(
        "required_list",
        {"a": {"type": "string"}, "b": {"type": "string"}},
        ["b", "zzz"],
        [
            "a?: string,",
            "b: string,",
        ],
    ),
    Case(
        "required_missing_means_all_optional",
        {"a": {"type": "string"}},
        MISSING,
        [
            "a?: string,",
        ],
    ),
    Case(
        "required_string_is_a_substring_test",
        {"a": {"type": "string"}, "ab": {"type": "string"}, "x": {"type": "string"}, "": {"type": "string"}},
        "abc",
        [
            "a: string,",
            "ab: string,",
            "x?: string,",
            ": string,",
        ],
    ),
    Case(
        "required_object_tests_keys",
        {"a": {"type": "string"}, "b": {"type": "string"}},
        {"a": False},
        [
            "a: string,",
            "b?: string,",
        ],
    ),
    Case(
        "required_not_iterable_means_all_required",
        {"a": {"type": "string"}, "b": {"type": "string"}},
        None,
        [
            "a: string,",
            "b: string,",
        ],
    ),
    Case(
        "required_number_means_all_required",
        {"a": {"type": "string"}},
        5,
        [
            "a: string,",
        ],
    ),
    Case(
        "non_mapping_properties_are_skipped",
        {"a": {"type": "string"}, "required": ["a"], "b": "string", "c": None, "d": {"type": "integer"}},
        ["a"],
        [
            "a: string,",
            "d?: number,",
        ],
    ),
    Case(
        "nested_objects",
        {
            "o": {
                "type": "object",
                "description": "Outer",
                "properties": {
                    "i": {
                        "type": "object",
                        "properties": {"leaf": {"type": "string", "description": "Leaf"}},
                        "required": ["leaf"],
                    },
                    "n": {"type": "integer"},
                },
                "required": ["i"],
            }
        },
        ["o"],
        [
            "// Outer.",
            "o: {",
            "    i: {",
            "        // Leaf.",
            "        leaf: string,",
            "    },",
            "    n?: number,",
            "},",
        ],
    ),
    Case(
        "object_without_properties",
        {
            "o": {"type": "object"},
            "p": {"type": "object", "properties": {}},
            "q": {"type": "object", "description": "Q"},
        },
        MISSING,
        [
            "o?: {",
            "},",
            "p?: {",
            "},",
            "// Q.",
            "q?: {",
            "},",
        ],
    ),
    Case(
        "array_without_item_type",
        {
            "a": {"type": "array"},
            "b": {"type": "array", "items": {}},
            "c": {"type": "array", "items": {"description": "no type"}},
            "d": {"type": "array", "items": [{"type": "string"}]},
        },
        MISSING,
        [
            "a?: [],",
            "b?: [],",
            "c?: [],",
            "d?: [],",
        ],
    ),
    Case(
        "array_of_scalars",
        {
            "a": {"type": "array", "items": {"type": "string"}},
            "b": {"type": "array", "items": {"type": "integer"}, "description": "Ids"},
            "c": {"type": "array", "items": {"type": ["string", "null"]}},
        },
        ["a"],
        [
            "a: string[],",
            "// Ids.",
            "b?: number[],",
            "c?: string | null[],",
        ],
    ),
    Case(
        "array_of_objects_one_level_deeper",
        {
            "a": {
                "type": "array",
                "description": "Rows",
                "items": {
                    "type": "object",
                    "properties": {"k": {"type": "string", "description": "Key"}, "v": {"type": "integer"}},
                    "required": ["k"],
                },
            }
        },
        MISSING,
        [
            "// Rows.",
            "a?: {",
            "    // Key.",
            "    k: string,",
            "    v?: number,",
            "}[],",
        ],
    ),
    Case(
        "array_of_objects_nested_in_object",
        {
            "o": {
                "type": "object",
                "properties": {
                    "rows": {
                        "type": "array",
                        "items": {"type": "object", "properties": {"k": {"type": "string"}}},
                    }
                },
            }
        },
        MISSING,
        [
            "o?: {",
            "    rows?: {",
            "        k?: string,",
            "    }[],",
            "},",
        ],
    ),
    Case(
        "array_of_enum",
        {
            "a": {"type": "array", "items": {"type": "string", "enum": ["x", "y"]}},
            "b": {"type": "array", "items": {"enum": [1, 2]}},
            "c": {"type": "array", "items": {"type": "string", "enum": []}},
        },
        MISSING,
        [
            'a?: ("x" | "y")[],',
            "b?: [],",
            "c?: ()[],",
        ],
    ),
    Case(
        "nested_arrays",
        {
            "a": {"type": "array", "items": {"type": "array", "items": {"type": "string"}}},
            "b": {
                "type": "array",
                "items": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
            },
            "c": {"type": "array", "items": {"type": "array"}},
            "d": {"type": "array", "items": {"type": "array", "items": {"type": "string", "enum": ["x"]}}},
        },
        MISSING,
        [
            "a?: string[][],",
            "b?: number[][][],",
            "c?: [][],",
            'd?: ("x")[][],',
        ],
    ),
    Case(
        "nested_array_of_objects_indentation",
        {
            "a": {
                "type": "array",
                "items": {
                    "type": "array",
                    "items": {"type": "object", "properties": {"x": {"type": "string", "description": "X"}}},
                },
            }
        },
        ["a"],
        [
            "a: {",
            "        // X.",
            "        x?: string,",
            "    }[][],",
        ],
    ),
    Case(
        "nested_arrays_inside_object",
        {
            "o": {
                "type": "object",
                "properties": {
                    "m": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
                    "t": {
                        "type": "array",
                        "items": {"type": "array", "items": {"type": "array", "items": {"type": "string"}}},
                    },
                },
            }
        },
        MISSING,
        [
            "o?: {",
            "    m?: number[][],",
            "    t?: string[][][],",
            "},",
        ],
    ),
    Case(
        "triple_nested_array_of_untyped_items",
        {
            "a": {
                "type": "array",
                "items": {"type": "array", "items": {"type": "array", "items": {"description": "x"}}},
            }
        },
        MISSING,
        [
            "a?: [][][],",
        ],
    ),
    Case(
        "array_item_type_integer_is_number",
        {
            "a": {"type": "array", "items": {"type": "integer"}},
            "b": {"type": "array", "items": {"oneOf": [{"type": "integer"}, {"type": "string"}]}},
        },
        MISSING,
        [
            "a?: number[],",
            "b?: [],",
        ],
    ),
    Case(
        "array_nullable_and_enum_keys_ignored",
        {"a": {"type": "array", "items": {"type": "string"}, "nullable": True, "enum": [["x"]]}},
        MISSING,
        [
            "a?: string[],",
        ],
    ),
    Case(
        "empty_property_name_skips_the_trim",
        {"": {"type": "array", "items": {"type": "array", "items": {"type": "string"}}}},
        [""],
        [
            "",
            "string[][],",
        ],
    ),
    Case(
        "empty_property_name_array_of_objects",
        {"": {"type": "array", "items": {"type": "object", "properties": {"k": {"type": "string"}}}}},
        None,
        [
            "{",
            "    k?: string,",
            "}[],",
        ],
    ),
    Case(
        "property_names_printed_raw",
        {"x y": {"type": "string"}, "ünï": {"type": "string"}, "$ref": {"type": "string"}},
        MISSING,
        [
            "x y?: string,",
            "ünï?: string,",
            "$ref?: string,",
        ],
    ),
]


@pytest.mark.parametrize("case", TABLE, ids=lambda case: case.id)
def test_golden_table(case: Case) -> None:
    parameters: dict[str, Any] = {"type": "object", "properties": case.properties}
    if case.required is not MISSING:
        parameters["required"] = case.required
    body = "".join("\n" + line for line in case.expected)
    expected = HEADER + "// \ntype f = (_: {" + body + "\n}) => any;\n\n" + FOOTER
    function = Function("f", "", parameters)
    assert ts_schema([function], flavor=case.flavor) == expected  # type: ignore[arg-type]


def test_table_covers_both_flavors_and_every_quirk_family() -> None:
    ids = {case.id for case in TABLE}
    assert {case.flavor for case in TABLE} == {"jinja", "python"}
    for needle in (
        "untyped",
        "type_list",
        "oneOf",
        "limits",
        "default",
        "format",
        "enum",
        "examples",
        "required",
        "nested_arrays",
        "array_of_objects",
        "array_of_enum",
        "nullable",
    ):
        assert any(needle in case_id for case_id in ids), needle


# ------------------------------------------------------------------------------------------------
# functionary's own schema test (tests/test_schema.py at HEAD): input and expected output verbatim
# ------------------------------------------------------------------------------------------------

FUNCTIONARY_FUNCTION = {
    "name": "test_function",
    "description": "This is a test function",
    "parameters": {
        "type": "object",
        "properties": {
            "param1": {"type": "string"},
            "param2": {"type": "string", "description": "description of param 2"},
            "param3": {
                "type": "string",
                "default": "option1",
                "enum": ["option1", "option2"],
                "description": "description of param 3",
            },
            "param4": {"type": "array", "description": "list of ids", "items": {"type": "string"}},
            "param5": {"type": "string", "format": "date-time", "description": "from datetime"},
            "param6": {"type": "string", "format": "date-time"},
            "param7": {
                "oneOf": [{"format": "date-time", "type": "string"}, {"format": "date", "type": "string"}],
                "description": "Description of param 7",
            },
            "param8": {"type": "integer", "maximum": 36, "description": "description of param8"},
            "param9": {"type": "integer", "minimum": 1, "description": "description of param 9"},
            "person": {
                "type": "object",
                "description": "Number of page that should be returned.",
                "properties": {
                    "name": {"type": "string", "description": "name of person"},
                    "age": {"type": "integer", "description": "age of person"},
                    "extra_info": {
                        "properties": {
                            "school": {"type": "string", "description": "school of this person"},
                            "job": {
                                "type": "object",
                                "description": "job of this person",
                                "properties": {
                                    "salary": {"type": "number", "description": "salary per month"},
                                    "title": {"type": "string", "description": "position in company"},
                                    "positions": {"type": "array", "items": {"type": "string"}},
                                    "full_time": {
                                        "type": "boolean",
                                        "description": "is this person full-time or not",
                                        "default": True,
                                    },
                                    "ids": {
                                        "type": "array",
                                        "description": "ids of this job",
                                        "items": {"type": "number", "description": "ids for this job hehe"},
                                    },
                                    "params": {
                                        "type": "array",
                                        "items": {
                                            "type": "array",
                                            "items": {
                                                "type": "object",
                                                "properties": {
                                                    "a1": {"type": "string", "description": "a1"},
                                                    "a2": {"type": "string", "description": "a2"},
                                                    "a3": {"type": "string", "description": "a3"},
                                                },
                                            },
                                        },
                                    },
                                },
                                "required": ["salary", "title"],
                            },
                        },
                        "type": "object",
                        "description": "extra information of this person.",
                        "required": ["job"],
                    },
                },
            },
            "param10": {
                "type": "array",
                "description": "description of param 10",
                "items": {
                    "type": "object",
                    "properties": {
                        "search": {"type": "string", "description": "this is search param"},
                        "category": {"type": "string"},
                    },
                },
            },
            "param11": {
                "type": "array",
                "items": {"type": "string"},
                "description": "Description of param 11",
            },
            "param12": {
                "type": "array",
                "items": {
                    "type": "string",
                    "enum": [
                        "bungalow",
                        "detached",
                        "flat",
                        "land",
                        "park home",
                        "semi-detached",
                        "terraced",
                    ],
                },
            },
            "param13": {"type": "array", "items": {"type": "integer", "enum": [1, 2, 3, 4, 5]}},
            "param140": {"type": ["number", "null"]},
            "param14": {
                "type": "array",
                "items": {"type": "array", "items": {"type": "string", "description": "array of array"}},
            },
            "param15": {
                "type": "array",
                "items": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "description": "array of array",
                        "properties": {
                            "att1": {"type": "string", "description": "desc 1"},
                            "att2": {"type": "number", "description": "desc 2"},
                        },
                    },
                },
            },
        },
        "required": ["param1", "param2", "param15"],
    },
}

FUNCTIONARY_EXPECTED = """// Supported function definitions that should be called when necessary.
namespace functions {

// This is a test function
type test_function = (_: {
param1: string,
// description of param 2.
param2: string,
// description of param 3. Default="option1".
param3?: "option1" | "option2",
// list of ids.
param4?: string[],
// from datetime. Format=date-time
param5?: string,
// Format=date-time
param6?: string,
// Description of param 7. Format=date-time or date
param7?: string,
// description of param8. Maximum=36
param8?: number,
// description of param 9. Minimum=1
param9?: number,
// Number of page that should be returned.
person?: {
    // name of person.
    name?: string,
    // age of person.
    age?: number,
    // extra information of this person.
    extra_info?: {
        // school of this person.
        school?: string,
        // job of this person.
        job: {
            // salary per month.
            salary: number,
            // position in company.
            title: string,
            positions?: string[],
            // is this person full-time or not. Default=True.
            full_time?: boolean,
            // ids of this job.
            ids?: number[],
            params?: {
                    // a1.
                    a1?: string,
                    // a2.
                    a2?: string,
                    // a3.
                    a3?: string,
                }[][],
        },
    },
},
// description of param 10.
param10?: {
    // this is search param.
    search?: string,
    category?: string,
}[],
// Description of param 11.
param11?: string[],
param12?: ("bungalow" | "detached" | "flat" | "land" | "park home" | "semi-detached" | "terraced")[],
param13?: (1 | 2 | 3 | 4 | 5)[],
param140?: number | null,
param14?: string[][],
param15: {
        // desc 1.
        att1?: string,
        // desc 2.
        att2?: number,
    }[][],
}) => any;

} // namespace functions"""


@pytest.mark.parametrize("flavor", ["jinja", "python"])
def test_functionary_schema_test(flavor: str) -> None:
    function = Function(**FUNCTIONARY_FUNCTION)  # type: ignore[arg-type]
    assert ts_schema([function], flavor=flavor) == FUNCTIONARY_EXPECTED  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# the namespace around the functions
# ------------------------------------------------------------------------------------------------


def test_no_functions_is_the_empty_namespace() -> None:
    assert ts_schema([]) == HEADER + FOOTER
    assert HEADER + FOOTER == (
        "// Supported function definitions that should be called when necessary.\nnamespace functions {\n\n"
        "} // namespace functions"
    )


def test_functions_without_parameters() -> None:
    functions = [
        Function("ping", "Ping", None),
        Function("pong", "", {}),
        Function("empty", "Empty", {"type": "object", "properties": {}}),
        Function("noprops", "x", {"type": "object"}),
    ]
    assert ts_schema(functions) == (
        HEADER
        + "// Ping\ntype ping = () => any;\n\n"
        + "// \ntype pong = () => any;\n\n"
        + "// Empty\ntype empty = () => any;\n\n"
        + "// x\ntype noprops = () => any;\n\n"
        + FOOTER
    )


def test_nameless_function_is_skipped_and_descriptions_are_raw() -> None:
    functions = [
        Function("", "skipped", None),
        Function(
            "f",
            "Line one\nline two <b>&'",
            {"type": "object", "properties": {"a": {"type": "string"}}, "required": "abc"},
        ),
    ]
    assert (
        ts_schema(functions)
        == HEADER + "// Line one\nline two <b>&'\ntype f = (_: {\na: string,\n}) => any;\n\n" + FOOTER
    )


def test_functions_are_rendered_in_order() -> None:
    one = Function(
        "one", "1", {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    )
    two = Function("two", "2", None)
    assert ts_schema([one, two]) == (
        HEADER + "// 1\ntype one = (_: {\nx: number,\n}) => any;\n\n// 2\ntype two = () => any;\n\n" + FOOTER
    )


def test_input_is_not_modified() -> None:
    function = Function(**copy.deepcopy(FUNCTIONARY_FUNCTION))  # type: ignore[arg-type]
    ts_schema([function])
    assert function.as_dict() == FUNCTIONARY_FUNCTION


def test_unknown_flavor() -> None:
    with pytest.raises(ValueError):
        ts_schema([], flavor="typescript")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# schemas the macro cannot render: SchemaError, never anything else
# ------------------------------------------------------------------------------------------------

ERROR_CASES = [
    # the macro raises for these too
    pytest.param({"type": "object", "properties": ["a"]}, id="properties_not_a_mapping"),
    pytest.param(
        {"type": "object", "properties": {"o": {"type": "object", "properties": None}}},
        id="nested_properties_null",
    ),
    pytest.param(
        {"type": "object", "properties": {"o": {"type": "object", "properties": [{"type": "string"}]}}},
        id="nested_properties_list",
    ),
    pytest.param(
        {"type": "object", "properties": {"a": {"type": "string", "description": None}}},
        id="description_null",
    ),
    pytest.param(
        {"type": "object", "properties": {"a": {"type": "string", "description": 5}}}, id="description_number"
    ),
    pytest.param(
        {"type": "object", "properties": {"a": {"type": "string", "examples": "x"}}}, id="examples_string"
    ),
    pytest.param(
        {"type": "object", "properties": {"a": {"type": "string", "examples": {"x": 1}}}},
        id="examples_object",
    ),
    pytest.param(
        {"type": "object", "properties": {"a": {"oneOf": [{"type": ["string", "null"]}]}}},
        id="unhashable_oneOf_type",
    ),
    pytest.param(
        {"type": "object", "properties": {"a": {"oneOf": [{"format": 5}, {"format": "date"}]}}},
        id="oneOf_format_number",
    ),
    pytest.param({"type": "object", "properties": {"a": {"type": "array", "items": None}}}, id="items_null"),
    pytest.param(
        {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "array", "items": 3}}}},
        id="nested_items_number",
    ),
    pytest.param(["not", "a", "schema"], id="parameters_not_a_mapping"),
    # the macro prints something that depends on jinja internals, not on the schema
    pytest.param({"type": "object", "properties": {"a": {"oneOf": {"type": "string"}}}}, id="oneOf_object"),
    pytest.param({"type": "object", "properties": {"a": {"oneOf": ["string"]}}}, id="oneOf_item_string"),
    pytest.param(
        {"type": "object", "properties": {"a": {"type": "string", "enum": "abc"}}}, id="enum_string"
    ),
    pytest.param(
        {"type": "object", "properties": {"a": {"type": "array", "items": "type"}}}, id="items_string"
    ),
]


@pytest.mark.parametrize("parameters", ERROR_CASES)
@pytest.mark.parametrize("flavor", ["jinja", "python"])
def test_unrenderable_schema_raises_schema_error(parameters: Any, flavor: str) -> None:
    with pytest.raises(SchemaError, match="function 'f'"):
        ts_schema([Function("f", "d", parameters)], flavor=flavor)  # type: ignore[arg-type]


def test_non_string_function_description_raises() -> None:
    with pytest.raises(SchemaError):
        ts_schema([Function("f", None)])  # type: ignore[arg-type]


def test_deeply_nested_schema_raises_schema_error() -> None:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(2000):
        schema = {"type": "object", "properties": {"x": schema}}
    with pytest.raises(SchemaError):
        ts_schema([Function("f", "", schema)])


def test_schema_error_is_a_value_error() -> None:
    assert issubclass(SchemaError, ValueError)


# ------------------------------------------------------------------------------------------------
# resolve_refs: jsonref.replace_refs + deepcopy, as functionary does (checked against jsonref 1.1.0 at
# development time on random documents)
# ------------------------------------------------------------------------------------------------

PLACE = {
    "type": "object",
    "description": "A place",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}


def test_defs_ref_replaced_by_its_resolved_target_and_siblings_dropped() -> None:
    parameters = {
        "type": "object",
        "properties": {
            "from": {"$ref": "#/$defs/place", "description": "dropped"},
            "to": {"$ref": "#/$defs/place"},
        },
        "required": ["from", "to"],
        "$defs": {"place": copy.deepcopy(PLACE)},
    }
    original = copy.deepcopy(parameters)
    resolved = resolve_refs(parameters)
    assert resolved == {
        "type": "object",
        "properties": {"from": PLACE, "to": PLACE},
        "required": ["from", "to"],
        "$defs": {"place": PLACE},
    }
    assert list(resolved) == ["type", "properties", "required", "$defs"]
    assert parameters == original  # input untouched
    # Each target is resolved once and shared by its uses (the work stays linear in the document; nothing
    # mutates a resolved schema); no container of the input is reused.
    properties = resolved["properties"]
    assert properties["from"] is properties["to"] is resolved["$defs"]["place"]
    assert properties["from"] is not parameters["$defs"]["place"]
    assert properties["from"]["properties"] is not parameters["$defs"]["place"]["properties"]


def test_definitions_and_json_pointer_escapes() -> None:
    parameters = {
        "properties": {
            "a": {"$ref": "#/definitions/a~1b"},
            "b": {"$ref": "#/definitions/t~0"},
            "c": {"$ref": "#/definitions/sp%20ace"},
            "d": {"$ref": "#/definitions/list/1"},
            "e": {"$ref": "#/properties/a"},
            "f": {"$ref": "#/definitions/list/-1"},
        },
        "definitions": {
            "a/b": {"type": "string"},
            "t~": {"type": "integer"},
            "sp ace": {"type": "boolean"},
            "list": [{"type": "null"}, {"type": "number"}],
        },
    }
    properties = resolve_refs(parameters)["properties"]
    assert properties == {
        "a": {"type": "string"},
        "b": {"type": "integer"},
        "c": {"type": "boolean"},
        "d": {"type": "number"},
        "e": {"type": "string"},
        "f": {"type": "number"},
    }


def test_chained_and_nested_refs() -> None:
    parameters = {
        "properties": {"x": {"$ref": "#/$defs/a"}},
        "$defs": {
            "a": {"$ref": "#/$defs/b"},
            "b": {"type": "array", "items": {"$ref": "#/$defs/c"}},
            "c": {"type": "string", "enum": ["p", "q"]},
        },
    }
    resolved = resolve_refs(parameters)
    b = {"type": "array", "items": {"type": "string", "enum": ["p", "q"]}}
    assert resolved["properties"]["x"] == b
    assert resolved["$defs"] == {"a": b, "b": b, "c": {"type": "string", "enum": ["p", "q"]}}


def test_pointer_into_the_reference_object_reads_its_own_keys() -> None:
    # jsonref: a pointer that walks into the reference object being resolved sees that object's raw keys
    parameters = {"properties": {"a": {"$ref": "#/properties/a/x", "x": {"type": "boolean"}}}}
    assert resolve_refs(parameters)["properties"]["a"] == {"type": "boolean"}


def test_root_ref() -> None:
    parameters = {
        "$ref": "#/$defs/p",
        "$defs": {"p": {"type": "object", "properties": {"a": {"type": "string"}}}},
    }
    assert resolve_refs(parameters) == {"type": "object", "properties": {"a": {"type": "string"}}}


def test_non_string_ref_is_not_a_reference() -> None:
    parameters = {"properties": {"$ref": {"type": "string"}, "b": {"$ref": 5}}}
    assert resolve_refs(parameters) == parameters


def test_schema_without_refs_is_copied() -> None:
    parameters = copy.deepcopy(FUNCTIONARY_FUNCTION["parameters"])
    resolved = resolve_refs(parameters)  # type: ignore[arg-type]
    assert resolved == parameters and resolved is not parameters


@pytest.mark.parametrize(
    "parameters",
    [
        pytest.param({"properties": {"a": {"$ref": "#"}}}, id="whole_document_from_inside"),
        pytest.param({"properties": {"a": {"$ref": ""}}}, id="empty_ref_is_the_document"),
        pytest.param({"$ref": "#"}, id="refers_to_itself"),
        pytest.param(
            {"properties": {"a": {"$ref": "#/$defs/a"}}, "$defs": {"a": {"$ref": "#/$defs/a"}}},
            id="self_loop",
        ),
        pytest.param(
            {
                "properties": {"a": {"$ref": "#/$defs/a"}},
                "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}},
            },
            id="two_step_loop",
        ),
        pytest.param(
            {
                "properties": {"tree": {"$ref": "#/$defs/node"}},
                "$defs": {
                    "node": {
                        "type": "object",
                        "properties": {"children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                    }
                },
            },
            id="recursive_schema",
        ),
        pytest.param(
            {"$defs": {"a": {"$ref": "#/$defs/b/x"}, "b": {"$ref": "#/$defs/a/y"}}},
            id="loop_while_walking_a_pointer",
        ),
    ],
)
def test_cyclic_refs_raise(parameters: dict[str, Any]) -> None:
    with pytest.raises(SchemaError, match="cyclic"):
        resolve_refs(parameters)


@pytest.mark.parametrize(
    "ref",
    [
        "other.json#/a",
        "https://example.com/schema.json",
        "http://example.com/s.json#/$defs/a",
        "/abs/path#/a",
        "file:///etc/passwd",
    ],
)
def test_non_local_refs_raise_without_fetching(ref: str) -> None:
    with pytest.raises(SchemaError, match="only local"):
        resolve_refs({"properties": {"a": {"$ref": ref}}})


@pytest.mark.parametrize("ref", ["#/$defs/missing", "#/$defs/list/7", "#/$defs/list/x", "#/type/x"])
def test_unresolvable_pointer_raises(ref: str) -> None:
    with pytest.raises(SchemaError, match="unresolvable"):
        resolve_refs({"type": "object", "properties": {"a": {"$ref": ref}}, "$defs": {"list": [{}]}})


def test_exponential_expansion_is_bounded() -> None:
    defs: dict[str, Any] = {"a0": {"type": "string"}}
    for i in range(1, 40):
        defs[f"a{i}"] = {
            "type": "array",
            "items": [{"$ref": f"#/$defs/a{i - 1}"}, {"$ref": f"#/$defs/a{i - 1}"}],
        }
    with pytest.raises(SchemaError, match="too large"):
        resolve_refs({"properties": {"x": {"$ref": "#/$defs/a39"}}, "$defs": defs})


def test_parameters_must_be_an_object() -> None:
    with pytest.raises(SchemaError):
        resolve_refs(["a"])  # type: ignore[arg-type]
    with pytest.raises(SchemaError):
        resolve_refs({"$ref": "#/$defs/l", "$defs": {"l": [1]}})


def test_resolved_schema_renders() -> None:
    parameters = resolve_refs(
        {
            "type": "object",
            "properties": {"from": {"$ref": "#/$defs/place", "description": "dropped"}},
            "required": ["from"],
            "$defs": {"place": PLACE},
        }
    )
    assert ts_schema([Function("go", "Go", parameters)]) == (
        HEADER
        + "// Go\ntype go = (_: {\n// A place.\nfrom: {\n    city: string,\n},\n}) => any;\n\n"
        + FOOTER
    )
