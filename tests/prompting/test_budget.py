"""A budget per request (issue 11, finding 1): tool schemas expand within a bound set by the request's own
size, checked as the work is done; a prompt that cannot fit the model's context is refused before it is
sent; the work per request is linear in its size.

The referee for ``$ref`` resolution is the previous implementation (jsonref + deepcopy, checked against
jsonref 1.1.0 when it was written), kept here as ``copying_resolve``: the new resolver must give equal
results while doing work linear in the document, not in its expansion.
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import unquote, urldefrag

import orjson
import pytest

from tgi_gateway.errors import ContextLengthExceededError, InvalidRequestError
from tgi_gateway.prompting import Template, Version, normalize
from tgi_gateway.prompting.parse import STOP_TOKENS
from tgi_gateway.prompting.render import MAX_CHARS_PER_TOKEN
from tgi_gateway.prompting.schema import (
    EXPANSION_ALLOWANCE,
    EXPANSION_FACTOR,
    ExpansionBudget,
    ExpansionError,
    SchemaError,
    resolve,
    resolve_refs,
    ts_schema,
)
from tgi_gateway.prompting.types import Function

schema_module = importlib.import_module("tgi_gateway.prompting.schema")
request_module = importlib.import_module("tgi_gateway.prompting.request")
render_module = importlib.import_module(
    "tgi_gateway.prompting.render"
)  # (the package's `render` is the function)

HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(autouse=True)
def cold_caches() -> None:
    for cache in (schema_module._BLOCKS, request_module._FUNCTION_CACHE, render_module._TEXTS):
        cache.clear()


# ------------------------------------------------------------------------------------------------
# The referee: the previous resolver (a deep copy at every use), and schemas
# ------------------------------------------------------------------------------------------------


def copying_resolve(root: Any) -> Any:
    def lookup(ref: Mapping[str, Any], resolving: frozenset[int]) -> Any:
        uri, fragment = urldefrag(ref["$ref"])
        assert not uri
        resolving = resolving | {id(ref)}
        document = root
        for raw in unquote(fragment.lstrip("/")).split("/") if fragment else []:
            part: Any = raw.replace("~1", "/").replace("~0", "~")
            if document is not ref:
                while isinstance(document, Mapping) and isinstance(document.get("$ref"), str):
                    assert id(document) not in resolving
                    resolving = resolving | {id(document)}
                    document = lookup(document, resolving)
            if isinstance(document, list):
                part = int(part)
            document = document[part]
        return document

    def copy_(node: Any, expanding: tuple[int, ...]) -> Any:
        if isinstance(node, Mapping) and isinstance(node.get("$ref"), str):
            assert id(node) not in expanding, "cyclic"
            return copy_(lookup(node, frozenset()), (*expanding, id(node)))
        if isinstance(node, Mapping):
            return {k: copy_(v, expanding) for k, v in node.items()}
        if isinstance(node, list):
            return [copy_(v, expanding) for v in node]
        return node

    return copy_(root, ())


def doubling(levels: int, tag: str = "") -> dict[str, Any]:
    """`levels` definitions, each an object whose two properties refer to the next one: 2**levels leaves."""
    defs: dict[str, Any] = {}
    for i in range(levels):
        child = {"type": "string"} if i + 1 == levels else {"$ref": f"#/$defs/d{i + 1}"}
        defs[f"d{i}"] = {
            "type": "object",
            "description": f"level {i}",
            "properties": {"a": child, "b": child},
        }
    return {"type": "object", "properties": {f"root{tag}": {"$ref": "#/$defs/d0"}}, "$defs": defs}


def nested(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {"type": "string", "description": "the leaf"}
    for _ in range(depth):
        node = {"type": "object", "properties": {"a": node}}
    return {"type": "object", "properties": {"a": node}}


MONEY = {"type": "object", "properties": {"amount": {"type": "number"}, "currency": {"type": "string"}}}
ADDRESS = {
    "type": "object",
    "description": "A postal address.",
    "properties": {"street": {"type": "string"}, "city": {"type": "string"}, "country": {"type": "string"}},
    "required": ["city"],
}
# What pydantic makes of an invoice model: shared definitions used several times each.
INVOICE = {
    "type": "object",
    "properties": {
        "billing": {"$ref": "#/$defs/Address"},
        "shipping": {"$ref": "#/$defs/Address", "description": "dropped"},
        "lines": {"type": "array", "items": {"$ref": "#/$defs/Line"}},
        "total": {"$ref": "#/$defs/Money"},
        "tax": {"$ref": "#/$defs/Money"},
    },
    "required": ["billing", "lines"],
    "$defs": {
        "Address": ADDRESS,
        "Money": MONEY,
        "Line": {
            "type": "object",
            "properties": {
                "sku": {"type": "string", "examples": ["A-1"]},
                "price": {"$ref": "#/$defs/Money"},
                "discount": {"$ref": "#/$defs/Money"},
                "ship_from": {"$ref": "#/$defs/Address"},
            },
        },
    },
}


def random_schema(rng: random.Random, defs: int = 6) -> dict[str, Any]:
    """Definitions referring to later ones (no cycles), with pointers into their insides too."""

    def node(i: int, depth: int) -> Any:
        roll = rng.random()
        if i + 1 < defs and roll < 0.35:
            j = rng.randrange(i + 1, defs)
            return {"$ref": rng.choice([f"#/$defs/d{j}", f"#/$defs/d{j}/properties/p0"])}
        if depth < 3 and roll < 0.7:
            return {
                "type": "object",
                "properties": {f"p{k}": node(i, depth + 1) for k in range(rng.randint(1, 3))},
            }
        if roll < 0.85:
            return {"type": "array", "items": node(i, depth + 1) if depth < 3 else {"type": "integer"}}
        return {"type": rng.choice(["string", "integer", "boolean"]), "description": f"d{i}"}

    definitions = {
        f"d{i}": {"type": "object", "properties": {"p0": {"type": "string"}, "p1": node(i, 1)}}
        for i in range(defs)
    }
    return {
        "type": "object",
        "properties": {"x": node(0, 0), "y": {"$ref": "#/$defs/d0"}},
        "$defs": definitions,
    }


def body(*parameters: dict[str, Any] | None, messages: list[Any] = HI) -> dict[str, Any]:
    tools = []
    for i, p in enumerate(parameters):
        function: dict[str, Any] = {"name": f"f{i}", "description": f"tool {i}"}
        if p is not None:
            function["parameters"] = p
        tools.append({"type": "function", "function": function})
    return {"messages": messages, "tools": tools}


def definitions_size(b: dict[str, Any]) -> int:
    return sum(len(json.dumps(t["function"], separators=(",", ":"), ensure_ascii=False)) for t in b["tools"])


# ------------------------------------------------------------------------------------------------
# $ref resolution: equal results, linear work
# ------------------------------------------------------------------------------------------------

SCHEMAS = [
    pytest.param(INVOICE, id="invoice"),
    pytest.param(doubling(6), id="doubling6"),
    pytest.param(
        {
            "properties": {"a": {"$ref": "#/$defs/x/properties/y"}},
            "$defs": {"x": {"properties": {"y": MONEY}}},
        },
        id="pointer_inside",
    ),
    pytest.param(
        {"properties": {"a": {"$ref": "#/$defs/b"}}, "$defs": {"b": {"$ref": "#/$defs/c"}, "c": MONEY}},
        id="chain",
    ),
    *(pytest.param(random_schema(random.Random(seed)), id=f"random{seed}") for seed in range(25)),
]


@pytest.mark.parametrize("parameters", SCHEMAS)
def test_resolution_equals_the_copying_reference(parameters: dict[str, Any]) -> None:
    original = copy.deepcopy(parameters)
    resolved = resolve_refs(parameters)
    assert resolved == copying_resolve(parameters)
    assert parameters == original
    function = Function("f", "d", resolved)
    assert ts_schema([function]) == ts_schema([Function("f", "d", copying_resolve(parameters))])


@pytest.mark.parametrize("levels", [8, 11, 16, 40])
def test_resolution_work_is_linear_in_the_document(levels: int, monkeypatch: pytest.MonkeyPatch) -> None:
    steps = []
    step = schema_module._RefResolver._step
    monkeypatch.setattr(schema_module._RefResolver, "_step", lambda self: steps.append(1) or step(self))
    parameters = doubling(levels)
    budget = ExpansionBudget(10**18)  # no bound: the expansion is 2**levels leaves
    _, size = resolve(parameters, budget)
    # One visit per node of the document and two pointer steps per reference (the old resolver copied
    # every node of the expansion: 36,820 of them at 11 levels).
    assert len(steps) <= 4 * len(orjson.dumps(parameters)) // 10
    assert size > 2**levels * len('"leaf"')  # the expanded size counts every use of a shared target
    if levels <= 11:
        assert size >= len(orjson.dumps(copying_resolve(parameters)))


def test_an_expansion_is_refused_at_the_first_node_that_crosses_the_budget() -> None:
    parameters = doubling(40)
    with pytest.raises(ExpansionError, match="more than 1,000 characters"):
        resolve(parameters, ExpansionBudget(1000))
    budget = ExpansionBudget(10_000)
    with pytest.raises(ExpansionError):
        resolve(parameters, budget)
    assert budget.left == 10_000, "nothing is spent by a refused resolution"


def test_the_default_budget_is_relative_to_the_schema() -> None:
    assert ExpansionBudget.for_definitions(1000).limit == EXPANSION_FACTOR * 1000 + EXPANSION_ALLOWANCE
    resolve_refs(INVOICE)  # shared definitions: well within
    with pytest.raises(
        SchemaError, match=r"more than [\d,]+ characters \(8 × the [\d,]+ characters of this schema"
    ):
        resolve_refs(doubling(11))  # 1.2 KB that expands to ~280 KB


# ------------------------------------------------------------------------------------------------
# The request's budget: refused with a 400 naming the tool and the bound; the work stays within it
# ------------------------------------------------------------------------------------------------


def test_an_amplifying_tool_is_refused_naming_it_and_the_bound() -> None:
    b = body(INVOICE, None, doubling(11))
    limit = EXPANSION_FACTOR * definitions_size(b) + EXPANSION_ALLOWANCE
    with pytest.raises(InvalidRequestError) as refused:
        normalize(b)
    error = refused.value
    assert error.param == "tools[2].function.parameters" and error.status_code == 400
    assert error.message == (
        "Invalid schema in 'tools[2].function.parameters': the tool schemas are too large once expanded: more "
        f"than {limit:,} characters ({EXPANSION_FACTOR} × the {definitions_size(b):,} characters of the tool "
        f"definitions + {EXPANSION_ALLOWANCE:,})"
    )


def test_honest_shared_definitions_fit_even_in_128_tools() -> None:
    prompt = normalize(body(*[INVOICE] * 128))
    assert len(prompt.tools) == 128
    assert prompt.tools[0].function.parameters == copying_resolve(INVOICE)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param([doubling(11, str(i)) for i in range(100)], id="100_doubling_tools"),
        pytest.param([nested(300)], id="indentation_quadratic_in_depth"),
        pytest.param([INVOICE, doubling(20)], id="20_levels"),
    ],
)
def test_the_work_before_a_refusal_stays_within_the_budget(
    case: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    printed, steps = [], []
    spend = schema_module._Macros._spend
    monkeypatch.setattr(schema_module._Macros, "_spend", lambda self, n: printed.append(n) or spend(self, n))
    step = schema_module._RefResolver._step
    monkeypatch.setattr(schema_module._RefResolver, "_step", lambda self: steps.append(1) or step(self))
    b = body(*case)
    limit = EXPANSION_FACTOR * definitions_size(b) + EXPANSION_ALLOWANCE
    with pytest.raises(InvalidRequestError, match="too large once expanded"):
        normalize(b)
    assert sum(printed) <= limit + max(printed), "declarations are abandoned at the piece that crosses"
    assert len(steps) <= len(json.dumps(b)), "resolution is linear in the definitions"


def _cost(parameters: dict[str, Any]) -> int:
    """What one tool with `parameters` spends of a budget (as remembered with the function)."""
    b = body(parameters)
    normalize(b)
    return request_module._FUNCTION_CACHE.get(orjson.dumps(b["tools"][0]["function"]))[1]


def test_a_cached_function_spends_its_cost_again() -> None:
    # A schema that fits a request alone, but not twice: the second copy comes from the cache.
    parameters = next(
        p
        for p in map(doubling, range(5, 14))
        if 2 * _cost(p) > EXPANSION_FACTOR * definitions_size(body(p, p)) + EXPANSION_ALLOWANCE
    )
    (alone,) = normalize(body(parameters)).tools
    assert normalize(body(parameters)).tools[0].function is alone.function  # from the cache
    twice = body(parameters, parameters)
    twice["tools"][1]["function"]["name"] = "f0"  # the very same definition: one cache entry
    with pytest.raises(InvalidRequestError, match="too large once expanded") as refused:
        normalize(twice)
    assert refused.value.param == "tools[1].function.parameters"


def _outcome(b: dict[str, Any]) -> Any:
    try:
        return normalize(b)
    except InvalidRequestError as exc:
        return type(exc), exc.param, exc.message, exc.code


INVARIANCE = [
    body(INVOICE),
    body(doubling(9)),
    body(doubling(9), doubling(9, "x")),
    body(doubling(9), doubling(9, "x"), doubling(9, "y")),
    body(INVOICE, doubling(11)),
    body(doubling(11), INVOICE),
    body(nested(120)),
    body(*[doubling(7, str(i)) for i in range(40)]),
    body(*[INVOICE] * 30, doubling(10)),
]


def test_outcomes_do_not_depend_on_what_the_cache_holds() -> None:
    cold = []
    for b in INVARIANCE:
        request_module._FUNCTION_CACHE.clear()
        schema_module._BLOCKS.clear()
        cold.append(_outcome(b))
    for _ in range(2):  # warm: in order, then again with everything remembered
        assert [_outcome(b) for b in INVARIANCE] == cold
    assert [_outcome(b) for b in reversed(INVARIANCE)] == cold[::-1]
    assert any(isinstance(o, tuple) for o in cold) and any(not isinstance(o, tuple) for o in cold)


# ------------------------------------------------------------------------------------------------
# Quadratic spots made linear
# ------------------------------------------------------------------------------------------------


class CountingList(list):
    scans = 0

    def __contains__(self, item: object) -> bool:
        CountingList.scans += 1
        return super().__contains__(item)


def test_required_names_are_looked_up_without_scanning_the_list() -> None:
    names = [f"p{i}" for i in range(2000)]
    required = CountingList([*names[::2], 7, {"p1": True}, None])
    parameters = {
        "type": "object",
        "properties": {n: {"type": "string"} for n in names},
        "required": required,
    }
    text = ts_schema([Function("f", "", parameters)])
    assert CountingList.scans == 0
    assert "\np0: string," in text and "\np1?: string," in text and "\np1999?: string," in text
    assert ts_schema([Function("f", "", {**parameters, "required": list(required)})]) == text


# ------------------------------------------------------------------------------------------------
# At most 128 tools, as OpenAI
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["tools", "functions"])
def test_at_most_128_tools(field: str) -> None:
    functions = [{"name": f"f{i}"} for i in range(129)]
    items = [{"type": "function", "function": f} for f in functions] if field == "tools" else functions
    assert len(normalize({"messages": HI, field: items[:128]}).tools) == 128
    with pytest.raises(InvalidRequestError) as refused:
        normalize({"messages": HI, field: items})
    assert (refused.value.param, refused.value.code) == (field, "array_above_max_length")
    assert refused.value.message == (
        f"Invalid '{field}': array too long. Expected an array with maximum length 128, but got an array with "
        "length 129 instead."
    )


# ------------------------------------------------------------------------------------------------
# A prompt that cannot fit the model's context is refused before it is sent
# ------------------------------------------------------------------------------------------------

VERSIONS = list(Version)


def test_no_marker_is_longer_than_the_bound_of_characters_per_token() -> None:
    detect = importlib.import_module("tgi_gateway.prompting.detect")
    markers = {*detect._KNOWN_MARKERS, *(m for stops in STOP_TOKENS.values() for m in stops)}
    assert max(map(len, markers)) <= MAX_CHARS_PER_TOKEN


@pytest.mark.parametrize("version", VERSIONS)
def test_messages_longer_than_the_context_allows_are_refused_before_rendering(
    version: Version, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompt = normalize({"messages": [{"role": "user", "content": "x" * (100 * MAX_CHARS_PER_TOKEN + 1)}]})

    def renderer(_: Any) -> str:
        raise AssertionError("rendered")

    monkeypatch.setitem(render_module._RENDERERS, version, renderer)
    with pytest.raises(ContextLengthExceededError) as refused:
        Template(version).render(prompt, max_tokens=100)
    assert refused.value.param == "messages" and refused.value.code == "context_length_exceeded"
    assert "maximum context length is 100 tokens" in refused.value.message


@pytest.mark.parametrize("version", VERSIONS)
def test_the_whole_prompt_is_checked_once_rendered(version: Version) -> None:
    template = Template(version)
    prompt = normalize({"messages": [{"role": "user", "content": "x" * (100 * MAX_CHARS_PER_TOKEN)}]})
    with pytest.raises(ContextLengthExceededError):  # the content fits; with the template's text it does not
        template.render(prompt, max_tokens=100)
    text = template.render(prompt)
    assert template.render(prompt, max_tokens=-(-len(text) // MAX_CHARS_PER_TOKEN)) == text


@pytest.mark.parametrize("version", VERSIONS)
def test_a_prompt_that_may_fit_renders_as_without_a_limit(version: Version) -> None:
    calls = [{"id": "c1", "type": "function", "function": {"name": "f0", "arguments": '{"a": 1}'}}]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi " * 50},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
    ]
    prompt = normalize(body(INVOICE, messages=messages))
    assert Template(version).render(prompt, max_tokens=8192) == Template(version).render(prompt)


# ------------------------------------------------------------------------------------------------
# The token floor per message: many short messages
# ------------------------------------------------------------------------------------------------

# Each family's added tokens (FORMATS.md §1): one token each, and the tokenizer cuts the text at them.
ADDED_TOKENS: dict[Version, Sequence[str]] = {
    Version.V1: ["<|END_OF_USER|>", "<|END_OF_SYSTEM|>", "<|END_OF_ASSISTANT|>", "<|START_OF_FUNCTION_CALL|>",
                 "<|END_OF_FUNCTION_CALL|>", "<|END_OF_FUNCTION_RESULT|>"],
    Version.V2: ["<|from|>", "<|recipient|>", "<|content|>", "<|stop|>"],
    **dict.fromkeys(
        [Version.V2_LLAMA3, Version.V3_LLAMA3, Version.V3_LLAMA31],
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>",
         "<|reserved_special_token_249|>"),
    ),
}  # fmt: skip


def fewest_tokens(version: Version, text: str) -> int:
    """The fewest tokens any tokenizer with these added tokens can make of ``text``: one per added token, one
    per non-empty run of text between them."""
    pieces = re.split("(" + "|".join(map(re.escape, ADDED_TOKENS[version])) + ")", text)
    return len(pieces[1::2]) + sum(1 for piece in pieces[0::2] if piece)


def random_messages(rng: random.Random, n: int) -> list[dict[str, Any]]:
    """Messages of every shape the renderers print differently, short or empty texts; tool results answer
    the call before them."""
    out: list[dict[str, Any]] = []
    for i in range(n):
        kind = rng.choice(["user", "system", "assistant", "empty-assistant", "call", "tool"])
        text = rng.choice(["", "x", "Hi", " ", "\n"])
        if kind == "empty-assistant":
            out.append({"role": "assistant", "content": rng.choice(["", None])})
        elif kind == "call":
            call = {"id": f"c{i}", "type": "function", "function": {"name": "f", "arguments": rng.choice(["", "{}"])}}
            out += [{"role": "assistant", "content": text or None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": f"c{i}", "content": text}]  # fmt: skip
        elif kind == "tool":
            out.append({"role": "function", "name": "f", "content": text})
        else:
            out.append({"role": kind, "content": text})
    return out


@pytest.mark.parametrize("version", list(Version))
def test_each_printed_message_costs_at_least_its_tokens_per_message(version: Version) -> None:
    """TOKENS_PER_MESSAGE is a floor of what a message adds to the prompt, for every shape of message, in
    the fewest tokens a tokenizer can make of what the renderer prints (one more and it fails)."""
    from tgi_gateway.prompting.render import TOKENS_PER_MESSAGE

    template = Template(version)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    rng = random.Random(11)
    tightest = math.inf
    for _ in range(300):
        messages = random_messages(rng, rng.randrange(1, 6))
        prompt = normalize({"messages": messages, "tools": tools})
        base = normalize({"messages": [{"role": "assistant", "content": None}], "tools": tools})
        added = fewest_tokens(version, template.render(prompt)) - fewest_tokens(version, template.render(base))
        printed = sum(1 for m in prompt.messages if m.role != "assistant" or m.content or m.tool_calls)
        if printed:
            assert added >= printed * TOKENS_PER_MESSAGE[version], messages
            tightest = min(tightest, added / printed)
    assert tightest < TOKENS_PER_MESSAGE[version] + 1, "the floor is as high as the renderers allow"


@pytest.mark.parametrize("version", list(Version))
def test_many_short_messages_are_refused_before_rendering(version: Version) -> None:
    from tgi_gateway.prompting.render import TOKENS_PER_MESSAGE

    limit = 1000
    fits = limit // TOKENS_PER_MESSAGE[version]
    many = [{"role": "user", "content": "Hi"}] * (fits + 1)
    floor = (fits + 1) * TOKENS_PER_MESSAGE[version]
    with pytest.raises(ContextLengthExceededError, match=rf"at least {floor:,} tokens \({fits + 1:,} of them") as e:
        Template(version).render(normalize({"messages": many}), max_tokens=limit)
    assert e.value.param == "messages"
    # as many as may fit: rendered (TGI, which knows the tokenizer, has the last word)
    empty = [{"role": "assistant", "content": ""}] * 5  # print nothing, count nothing
    Template(version).render(normalize({"messages": many[:fits] + empty}), max_tokens=limit)
