"""A JSON Schema → the regex of the JSON texts it accepts, or the keyword that prevents it (no I/O).

Theory of operation
-------------------
TGI constrains decoding with a regex: a JSON grammar is turned into one by its router (outlines-core at rev
``ba10c619``), a regex grammar is taken as is. This module builds the regexes the gateway sends itself, with
outlines-core's ``build_regex_from_schema`` (the same family of code; default whitespace ``[ ]?``, keys in
the schema's order), after three steps of its own (STRUCTURED_OUTPUTS.md §6):

1. **Check** (:func:`prepare`): a keyword the regex cannot express is found, with where it is — ``not``,
   ``if``/``then``/``else``, ``dependent*``, ``patternProperties``, ``propertyNames``, ``uniqueItems``,
   ``contains``, ``unevaluated*``, an ``allOf`` of more than one schema (outlines-core would concatenate
   the branches: ``{…}{…}``), a ``format`` outlines-core does not know, a ``$ref`` cycle. Values under
   ``properties``, ``$defs``, ``enum`` and ``const`` are names and data, not keywords.
2. **Rewrite** what outlines-core would refuse or get wrong although the schema is fine: ``format``
   ``duration``/``hostname``/``ipv4``/``ipv6`` (in OpenAI's strict subset; outlines-core raises) become the
   equivalent ``pattern``; a node with annotations only (``{"description": …}``) or none (``{}``), any
   value, becomes the list of every JSON type (outlines-core refuses the first and writes an ungrouped
   alternation for the second, which breaks the regex around it); an object with ``additionalProperties: false`` and no ``properties`` becomes
   ``"properties": {}`` (only ``{}``); local ``$ref``\\ s are inlined.
3. **Build** the regex; outlines-core's own ``ValueError`` is a keyword the regex cannot express too.

Accepted but not enforced, as in TGI itself: ``minimum``/``maximum``/``exclusive*``/``multipleOf`` (the
number's type is), ``additionalProperties`` next to ``properties`` (only the listed keys are produced),
``oneOf``'s exclusivity. Worked example::

    schema_regex({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    == r'\\{[ ]?"n"[ ]?:[ ]?(-)?(0|[1-9][0-9]*)[ ]?\\}'

Regexes are remembered per distinct schema text (a bounded LRU), so a tool set sent again costs a lookup.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from outlines_core.json_schema import build_regex_from_schema

from ..prompting.lru import LRUCache
from ..prompting.schema import ExpansionBudget, ExpansionError, SchemaError, resolve

__all__ = [
    "ANY_OBJECT", "MAX_REGEX_CHARS", "NO_ARGUMENTS", "Unexpressible", "any_object_regex", "estimated_chars",
    "prepare", "schema_regex",
]  # fmt: skip

#: The arguments of a function declared without parameters (functionary prints ``() => any``).
NO_ARGUMENTS = r"\{[ ]?\}"
#: Any JSON object (``response_format: {"type": "json_object"}``), as outlines-core builds it.
ANY_OBJECT: dict[str, Any] = {"type": "object"}

# Keywords no regex of ours enforces; each makes a strict schema a 400 (OpenAI refuses them in strict mode
# too, except uniqueItems/patternProperties/propertyNames, which outlines-core would silently ignore).
_UNSUPPORTED = (
    "not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies",
    "patternProperties", "propertyNames", "uniqueItems", "contains", "minContains", "maxContains",
    "unevaluatedProperties", "unevaluatedItems",
)  # fmt: skip
# Keywords whose value is a schema, a list of schemas, or a mapping of names to schemas.
_SUBSCHEMA = ("items", "additionalProperties", "not", "if", "then", "else", "contains")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")
# The keys outlines-core dispatches on (parsing.rs::to_regex): a node with none of them is annotations only.
_DISPATCH = ("properties", "allOf", "anyOf", "oneOf", "prefixItems", "enum", "const", "$ref", "type")
# Formats outlines-core 0.2.x builds itself; the ones after are rewritten into a pattern here.
_FORMATS = frozenset({"date-time", "date", "time", "uuid", "uri", "email"})
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = rf"{_OCTET}(\.{_OCTET}){{3}}"
_H16 = "[0-9A-Fa-f]{1,4}"
_FORMAT_PATTERNS = {
    "ipv4": _IPV4,
    # RFC 4291 text forms: full, with one "::" anywhere, IPv4-mapped tail.
    "ipv6": (
        rf"(({_H16}:){{7}}{_H16}|(({_H16}:){{0,6}}{_H16})?::(({_H16}:){{0,6}}{_H16})?"
        rf"|(({_H16}:){{0,5}}{_H16})?::({_H16}:){{0,5}}{_IPV4}|({_H16}:){{6}}{_IPV4})"
    ),
    "hostname": r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*",
    # ISO 8601 durations (JSON Schema's "duration", RFC 3339 appendix A).
    "duration": r"P(([0-9]+D)?(T([0-9]+H)?([0-9]+M)?([0-9]+S)?)?|[0-9]+W|([0-9]+Y)?([0-9]+M)?([0-9]+D)?"
    r"(T([0-9]+H)?([0-9]+M)?([0-9]+S)?)?)",
}
# TGI's router (outlines-core rev ba10c619) knows fewer formats: a schema using another is sent as our regex.
_TGI_FORMATS = frozenset({"date-time", "date", "time", "uuid"})

# Any JSON value. outlines-core's own "{}" regex is an unparenthesised alternation, which breaks the regex
# of the object around it (``{"a": {}}`` matches almost nothing): this spelling is grouped.
_ANY_VALUE: dict[str, Any] = {"type": ["string", "number", "boolean", "null", "object", "array"]}

_CACHE_SIZE = 1024

MAX_REGEX_CHARS = 512 * 1024
"""The longest grammar the gateway sends. TGI's router takes request bodies up to 2,000,000 bytes by default
(``--payload-limit``) and its shard compiles a regex into a token automaton in time that grows with it; an honest
tool's regex is about a thousand characters (docs/performance.md, "Grammar build"). outlines-core's regex
grows with the *square* of an object's property count when none is required (each property is written
once per possible first property), and that factor multiplies through nesting: a 131 KB schema (four levels of
eight optional properties) makes a 113 MB regex. :func:`estimated_chars` bounds it before it is built."""


class Unexpressible(ValueError):
    """A schema the grammar cannot express; ``keyword`` names what (``'not'``, ``format 'x'``), ``where``
    the JSON pointer of the node that holds it."""

    def __init__(self, keyword: str, where: str, detail: str = "") -> None:
        self.keyword, self.where = keyword, where or "#"
        text = f"{keyword} (at {self.where}) cannot be enforced by TGI's grammar"
        super().__init__(f"{text}: {detail}" if detail else text)


@dataclass(frozen=True, slots=True)
class Prepared:
    """A schema ready for outlines-core. ``portable``: unchanged by :func:`prepare` and within what TGI's
    own JSON grammar takes (a top-level ``properties``, TGI's formats), so it may be sent as it is."""

    schema: dict[str, Any]
    portable: bool


def prepare(schema: Mapping[str, Any]) -> Prepared:
    """`schema` checked and rewritten for outlines-core (see the module docstring).

    Raises:
        Unexpressible: the first keyword the regex cannot express.
    """
    try:
        size = len(orjson.dumps(schema))
    except (orjson.JSONEncodeError, TypeError):
        raise Unexpressible("schema", "#", "not plain JSON, or nested too deeply") from None
    budget = ExpansionBudget.for_definitions(size, "the schema")
    try:
        resolved = resolve(dict(schema), budget)[0]
    except ExpansionError:
        raise Unexpressible(
            "$ref",
            "#",
            f"the schema is too large once its $refs are expanded (more than {budget.limit:,} "
            f"characters: {budget.basis})",
        ) from None
    except SchemaError as exc:
        raise Unexpressible("$ref", "#", str(exc)) from None
    except RecursionError:
        raise Unexpressible("nesting", "#", "the schema is nested too deeply") from None
    state = {"changed": resolved != schema, "tgi_formats": True}
    out = _walk(resolved, "#", state)
    if (chars := estimated_chars(out)) > MAX_REGEX_CHARS:
        raise Unexpressible(
            "size",
            "#",
            f"its regex would be about {chars:,} characters, more than {MAX_REGEX_CHARS:,} (objects "
            "whose properties are all optional square the size)",
        )
    portable = not state["changed"] and state["tgi_formats"] and isinstance(out.get("properties"), Mapping)
    return Prepared(out if not portable else dict(schema), portable)


def _walk(node: Any, where: str, state: dict[str, bool]) -> Any:
    if isinstance(node, bool):  # true/false schemas: outlines-core has no dispatch for them
        if node:
            state["changed"] = True
            return dict(_ANY_VALUE)
        raise Unexpressible("false", where, "a schema that accepts nothing")
    if not isinstance(node, Mapping):
        raise Unexpressible("schema", where, f"expected a schema object, got {type(node).__name__}")
    for keyword in _UNSUPPORTED:
        if keyword in node:
            raise Unexpressible(repr(keyword), where)
    if len(node.get("allOf") or ()) > 1:
        raise Unexpressible("'allOf'", where, "more than one schema")
    out = dict(node)
    fmt, kind = node.get("format"), node.get("type")
    if isinstance(fmt, str) and (kind == "string" or (isinstance(kind, list) and "string" in kind)):
        if fmt in _FORMAT_PATTERNS:
            del out["format"]
            out.setdefault("pattern", _FORMAT_PATTERNS[fmt])
            state["changed"] = True
        elif fmt not in _FORMATS:
            raise Unexpressible(f"format {fmt!r}", where)
        elif fmt not in _TGI_FORMATS:
            state["tgi_formats"] = False
    for key in _SUBSCHEMA:
        if key in node and not (key == "additionalProperties" and isinstance(node[key], bool)):
            out[key] = _walk(node[key], f"{where}/{key}", state)
    for key in _SUBSCHEMA_LISTS:
        if isinstance(node.get(key), list):
            out[key] = [_walk(sub, f"{where}/{key}/{i}", state) for i, sub in enumerate(node[key])]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(node.get(key), Mapping):
            out[key] = {
                name: _walk(sub, f"{where}/{key}/{_escape(name)}", state) for name, sub in node[key].items()
            }
    if not any(key in out for key in _DISPATCH):
        # {} or annotations only: any value (outlines-core raises "Unsupported JSON Schema structure" for
        # annotations, and writes a regex for {} that breaks its parent's)
        state["changed"] = True
        return dict(_ANY_VALUE)
    if out.get("type") == "object" and "properties" not in out and out.get("additionalProperties") is False:
        out["properties"] = {}  # outlines-core raises on additionalProperties false without properties
        state["changed"] = True
    return out


def estimated_chars(node: Any) -> int:
    """About the length of outlines-core's regex for `node` (prepared): an object whose properties are all
    optional writes each property (k + 1) / 2 times on average (once per possible first property it follows);
    array items and untyped values twice; alternatives once each. Calibrated on outlines-core 0.2.14 (within
    ±30 % on nested objects); the built regex is measured as well (:func:`schema_regex`)."""
    if not isinstance(node, Mapping):
        return 64
    props = node.get("properties")
    if isinstance(props, Mapping):
        each = sum(len(name) + 18 + estimated_chars(value) for name, value in props.items())
        return 8 + (each * (len(props) + 1) // 2 if props and not node.get("required") else each)
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if isinstance(node.get(key), list):
            return 8 + sum(4 + estimated_chars(sub) for sub in node[key])
    if "enum" in node or "const" in node:
        return 8 + 2 * len(orjson.dumps(node.get("enum", node.get("const"))))
    kinds = node.get("type")
    total = 0
    for kind in kinds if isinstance(kinds, list) else [kinds]:
        if kind in ("array", "object"):
            sub = node.get("items" if kind == "array" else "additionalProperties")
            total += 16 + (2 * estimated_chars(sub) if isinstance(sub, Mapping) else _UNTYPED_CONTAINER)
        else:
            total += _SCALAR_CHARS.get(kind, 64) + 2 * len(str(node.get("pattern", "")))
    return total


# outlines-core's regexes: a scalar's, and an array or object whose values are not typed (any JSON value).
_SCALAR_CHARS = {"string": 48, "integer": 28, "number": 64, "boolean": 14, "null": 6}
_UNTYPED_CONTAINER = 8 * 1024


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


_REGEXES: LRUCache[str, str] = LRUCache(_CACHE_SIZE)


def schema_regex(schema: Mapping[str, Any]) -> str:
    """The regex of the JSON texts `schema` accepts (prepared first; remembered per distinct schema).

    Raises:
        Unexpressible: see :func:`prepare`; or outlines-core refused the schema.
    """
    key = json.dumps(schema, ensure_ascii=False, separators=(",", ":"))
    return _REGEXES.get_or_make(key, lambda: _build(prepare(schema).schema))


def _build(schema: dict[str, Any]) -> str:
    try:
        regex = build_regex_from_schema(json.dumps(schema, ensure_ascii=False))
    except ValueError as exc:  # outlines-core's message names what it could not do
        raise Unexpressible("schema", "#", str(exc)) from None
    except TypeError:  # its JSON parser stops at 128 levels of nesting ("Expected a valid JSON string.")
        raise Unexpressible("nesting", "#", "the schema is nested more than 128 levels deep") from None
    if len(regex) > MAX_REGEX_CHARS:  # the estimate is an approximation: the bound holds anyway
        raise Unexpressible(
            "size", "#", f"its regex is {len(regex):,} characters, more than {MAX_REGEX_CHARS:,}"
        )
    return regex


def any_object_regex() -> str:
    """Any JSON object (nested up to outlines-core's depth for untyped values)."""
    return schema_regex(ANY_OBJECT)


def clear_caches() -> None:
    """Forget every remembered regex (benchmarks time a cold build with it)."""
    _REGEXES.clear()
