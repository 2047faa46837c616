"""Invalid input, generated: the gateway answers every request with a 2xx or a 4xx in the OpenAI envelope.

Bodies are drawn from the gateway's own OpenAPI schema (``app.openapi()``: the scalar fields, their types
and ranges) joined with domain strategies for what the schema leaves open (``messages``, ``tools``,
``tool_choice``), then mutated: wrong types, values out of range, missing and unknown fields, broken tool
schemas, odd messages, NaN/Infinity literals, lone surrogates, deep nesting; and at the byte level: cut or
corrupted JSON, invalid UTF-8, wrong content types, bodies over the size limit, other methods and paths.
Each request goes over a real socket to the gateway, with the TGI double behind it. For every answer:

* no 5xx;
* a non-2xx answer is ``application/json`` and exactly ``{"error": {"message": str, "type": str,
  "param": str | None, "code": str | None}}``;
* a 4xx answer sent nothing to TGI (the double's records are unchanged);
* a scalar field of the wrong JSON type (a boolean or a string for a number, ...) is a 400;
* an unmutated (valid) body gets a 200 — a complete stream ending in ``data: [DONE]`` when streamed.

Hypothesis runs derandomized (a fixed seed per test, no example database) and bounded, so CI sees the
same examples every run.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, TypeVar

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fakes.serve import serve
from tests.fakes.tgi import EOT, FakeTGI, tokens
from tgi_gateway.prompting import Template, Version
from tgi_gateway.server.app import create_app
from tgi_gateway.settings import Settings

MODEL = "fuzz-model"
MAX_BODY = 64 * 1024  # small, so that "huge" bodies stay cheap to send
VERSIONS = list(Version)  # every template version is served; each example picks one


def fuzz(examples: int) -> settings:
    """Derandomized (the same examples every run, no example database) and bounded."""
    return settings(
        derandomize=True,
        database=None,
        deadline=None,
        max_examples=examples,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


JSONValue = Any
T = TypeVar("T")
Path = tuple[str | int, ...]


def _app_schema() -> tuple[dict[str, Any], dict[str, Any]]:
    schema = create_app(Settings(model=MODEL), Template(Version.V3_LLAMA31)).openapi()
    components = schema["components"]["schemas"]
    return components["ChatCompletionRequest"], components


REQUEST_SCHEMA, COMPONENTS = _app_schema()
PROPERTIES: dict[str, dict[str, Any]] = REQUEST_SCHEMA["properties"]

# ------------------------------------------------------------------------------------------------
# Strategies from the OpenAPI schema
# ------------------------------------------------------------------------------------------------

TEXT = st.text(max_size=12)  # hypothesis never draws surrogates here: they are a mutation of their own
FINITE = st.floats(allow_nan=False, allow_infinity=False)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), FINITE, TEXT)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
    max_leaves=8,
)


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = COMPONENTS[schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _alternatives(schema: dict[str, Any]) -> list[dict[str, Any]]:
    return [_resolve(s) for s in schema.get("anyOf", [schema])]


def from_schema(schema: dict[str, Any], *, int_cap: int | None = None) -> st.SearchStrategy[JSONValue]:
    """Values valid for one OpenAPI (JSON Schema) node of the request model."""
    options = []
    for alt in _alternatives(schema):
        kind = alt.get("type")
        low, high = alt.get("minimum"), alt.get("maximum")
        if kind == "null":
            options.append(st.none())
        elif kind == "boolean":
            options.append(st.booleans())
        elif kind == "string":
            options.append(TEXT)
        elif kind == "integer":
            lo = math.ceil(low) if low is not None else math.floor(alt.get("exclusiveMinimum", -(2**63))) + 1
            hi = math.floor(high) if high is not None else math.ceil(alt.get("exclusiveMaximum", 2**63)) - 1
            options.append(st.integers(lo, min(hi, int_cap) if int_cap is not None else hi))
        elif kind == "number":
            lo = low if low is not None else alt.get("exclusiveMinimum")
            exclusive = "exclusiveMinimum" in alt
            options.append(st.floats(lo, high, exclude_min=exclusive, allow_nan=False, allow_infinity=False))
        elif kind == "array":
            options.append(st.lists(from_schema(alt.get("items", {})), max_size=3))
        elif kind == "object":
            fields = {k: from_schema(v) for k, v in alt.get("properties", {}).items()}
            extra = alt.get("additionalProperties")
            values = from_schema(extra) if isinstance(extra, dict) else json_values
            options.append(
                st.builds(lambda a, b: {**b, **a}, st.fixed_dictionaries({}, optional=fields),
                          st.dictionaries(TEXT, values, max_size=2))
            )  # fmt: skip
        else:
            options.append(json_values)
    return st.one_of(options)


def _types(schema: dict[str, Any]) -> set[str]:
    kinds = {alt.get("type", "any") for alt in _alternatives(schema)}
    return kinds | ({"integer"} if "number" in kinds else set())


def _json_type(value: JSONValue) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {int: "integer", float: "number", str: "string", list: "array", dict: "object"}[type(value)]


def wrong_type(schema: dict[str, Any]) -> st.SearchStrategy[JSONValue]:
    """Values whose JSON type the schema does not allow."""
    allowed = _types(schema)
    return json_values.filter(lambda v: _json_type(v) not in allowed)


def out_of_range(schema: dict[str, Any]) -> st.SearchStrategy[JSONValue] | None:
    """Numbers just outside the schema's bounds, and numbers no 32- or 64-bit field holds."""
    values: list[JSONValue] = []
    for alt in _alternatives(schema):
        if alt.get("type") not in ("integer", "number"):
            continue
        step = 1 if alt["type"] == "integer" else 1e-9
        for key, sign in (("minimum", -1), ("exclusiveMinimum", 0), ("maximum", 1), ("exclusiveMaximum", 0)):
            if key in alt:
                bound = alt[key]
                values.append(int(bound) + sign * step if alt["type"] == "integer" else bound + sign * step)
        values += [2**31, 2**32, 2**64, -(2**63) - 1, 10**30, 1e300, -1e300, 5e-324]
    return st.sampled_from(values) if values else None


# Every kind of response_format (the JSON ones reach TGI with a grammar, which the double validates).
RESPONSE_FORMATS = [
    {"type": "text"},
    {"type": "json_object"},
    {"type": "json_schema", "json_schema": {"name": "r", "strict": True, "schema": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}},
]  # fmt: skip
# The fields the gateway reads from the schema but honours only in part (params.check_supported):
# valid bodies use the supported values.
SUPPORTED = {
    "n": st.integers(1, 2),
    "presence_penalty": st.just(0),
    "logprobs": st.booleans(),
    "top_logprobs": st.none(),  # a number needs logprobs: true (test_logprobs_e2e.py)
    "logit_bias": st.just({}),
    "response_format": st.sampled_from(RESPONSE_FORMATS),
    "stop": st.lists(st.text(min_size=1, max_size=4), max_size=4),
    "max_tokens": from_schema(PROPERTIES["max_tokens"], int_cap=64),
    "max_completion_tokens": from_schema(PROPERTIES["max_completion_tokens"], int_cap=64),
}
DOMAIN = {"model", "messages", "tools", "tool_choice", "functions", "function_call"}
SCALARS = {
    name: SUPPORTED.get(name, from_schema(spec)) for name, spec in PROPERTIES.items() if name not in DOMAIN
}

# ------------------------------------------------------------------------------------------------
# Domain strategies: what the schema leaves as plain objects
# ------------------------------------------------------------------------------------------------

NAMES = st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True)
leaf_schemas = st.fixed_dictionaries(
    {"type": st.sampled_from(["string", "integer", "number", "boolean"])},
    optional={"description": TEXT, "enum": st.lists(TEXT, min_size=1, max_size=3), "default": json_scalars},
)
param_schemas = st.recursive(
    leaf_schemas,
    lambda inner: st.one_of(
        st.dictionaries(NAMES, inner, max_size=3).map(lambda p: {"type": "object", "properties": p}),
        inner.map(lambda items: {"type": "array", "items": items}),
    ),
    max_leaves=5,
)
parameters = st.dictionaries(NAMES, param_schemas, max_size=3).flatmap(
    lambda props: st.fixed_dictionaries(
        {"type": st.just("object"), "properties": st.just(props)},
        optional={"required": st.lists(st.sampled_from(sorted(props)), unique=True)} if props else {},
    )
)


@st.composite
def tool_lists(draw: st.DrawFn) -> list[dict[str, Any]]:
    names = draw(st.lists(NAMES, min_size=1, max_size=3, unique=True))
    tools: list[dict[str, Any]] = []
    for name in names:
        optional = {"description": TEXT, "parameters": parameters}
        function = draw(st.fixed_dictionaries({"name": st.just(name)}, optional=optional))
        tools.append({"type": "function", "function": function})
    if draw(st.booleans()):
        tools.append({"type": "code_interpreter"})
    return tools


def content() -> st.SearchStrategy[JSONValue]:
    parts = st.lists(TEXT.map(lambda t: {"type": "text", "text": t}), min_size=1, max_size=2)
    return st.one_of(TEXT, parts)


@st.composite
def conversations(draw: st.DrawFn, names: list[str], max_calls: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if draw(st.booleans()):
        messages.append({"role": draw(st.sampled_from(["system", "developer"])), "content": draw(content())})
    messages.append({"role": "user", "content": draw(content())})
    if names and draw(st.booleans()):
        calls = [
            {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": "{}"}}
            for i, name in enumerate(draw(st.lists(st.sampled_from(names), min_size=1, max_size=max_calls)))
        ]
        messages.append({"role": "assistant", "content": None, "tool_calls": calls})
        messages += [{"role": "tool", "tool_call_id": c["id"], "content": draw(TEXT)} for c in calls]
        messages.append({"role": "user", "content": draw(content())})
    return messages


@st.composite
def valid_bodies(draw: st.DrawFn, version: Version) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL}
    tools = draw(st.none() | tool_lists())
    names = [t["function"]["name"] for t in tools or [] if t["type"] == "function"]
    body["messages"] = draw(conversations(names, max_calls=1 if version is Version.V1 else 2))
    if tools is not None:
        body["tools"] = tools
        named = [{"type": "function", "function": {"name": name}} for name in names]
        choices = ["auto", "none", "required", *named]
        if draw(st.booleans()):
            body["tool_choice"] = draw(st.sampled_from(choices))
    body.update(draw(st.fixed_dictionaries({}, optional=SCALARS)))
    if not body.get("stream"):
        body.pop("stream_options", None)
    return body


# ------------------------------------------------------------------------------------------------
# Mutations
# ------------------------------------------------------------------------------------------------


def paths(value: JSONValue, prefix: Path = ()) -> Iterator[Path]:
    """Every position in a JSON value, the root included."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from paths(item, (*prefix, i))


def replaced(value: JSONValue, path: Path, new: JSONValue) -> JSONValue:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: replaced(value[head], rest, new)}
    return [replaced(item, rest, new) if i == head else item for i, item in enumerate(value)]


def deep(depth: int, kind: str) -> JSONValue:
    value: JSONValue = "x"
    for _ in range(depth):
        value = [value] if kind == "array" else {"a": value}
    return value


BROKEN_PARAMETERS = [
    {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
    {"type": "object", "properties": {"a": {"$ref": "#/properties/a"}}},
    {
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/b"}},
        "$defs": {"b": {"$ref": "#/$defs/c"}, "c": {"$ref": "#/$defs/b"}},
    },
    {"type": "object", "properties": {"a": {"$ref": "https://example.invalid/schema.json"}}},
    {"type": "object", "properties": {"a": {"$ref": 7}}},
    {"type": "object", "properties": [{"a": {"type": "string"}}]},
    {"type": "object", "properties": {"a": {"type": "string", "enum": "abc"}}},
    {"type": "object", "properties": {"a": {"type": "array", "items": 3}}},
    {"type": "object", "properties": {"a": {"oneOf": [1, 2]}}},
    {"type": "object", "properties": {"a": {"description": ["not", "a", "string"]}}},
    {"type": "object", "properties": {"a": {"examples": "one"}}},
    {"type": "object", "properties": {"a": {"type": [["string"]]}}},
    {"type": "object", "properties": {"a": {"type": {"nested": "object"}}}},
    {"type": "object", "properties": {"a": {"oneOf": [{"type": ["x"]}, {"type": ["x"]}]}}},
    {"$defs": {"a": {"$defs": {}}}, "$ref": "#/$defs/a/$defs"},
    {"$ref": "#"},
    {"type": "object", "properties": {"a": {"default": deep(400, "array")}}},
    {"type": "object", "properties": {"a": {"examples": [deep(300, "object")]}}},
    [],
    "object",
    None,
]
ODD_MESSAGES = [
    {"role": "tool", "content": "orphan result"},
    {"role": "tool", "tool_call_id": "call_nope", "content": "x"},
    {"role": "tool", "tool_call_id": 5, "content": "x"},
    {"role": "user", "content": ""},
    {"role": "user", "content": []},
    {"role": "user", "content": [["nested"]]},
    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]},
    {"role": "user", "content": [{"type": "text", "text": 5}]},
    {"role": "user"},
    {"role": "user", "content": None},
    {"role": "assistant"},
    {"role": "assistant", "content": "", "tool_calls": []},
    {"role": "assistant", "tool_calls": {"id": "x"}},
    {"role": "assistant", "tool_calls": [{"id": 1, "function": {"name": "f"}}]},
    {"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "", "arguments": "{}"}}]},
    {"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": {"x": 1}}}]},
    {"role": "assistant", "tool_calls": [{"function": {"name": "f"}}], "function_call": {"name": "f"}},
    {"role": "function", "content": "x"},
    {"role": "function", "name": "f", "content": "x"},
    {"role": "robot", "content": "x"},
    {"role": None, "content": "x"},
    {"role": ["user"], "content": "x"},
    {"role": {"user": True}, "content": "x"},
    {"content": "no role"},
    [],
    "hello",
    None,
]


MUTATIONS = ["wrong_type", "out_of_range", "missing", "unknown", "message", "tool_schema", "deep", "nan",
             "surrogate", "anything"]  # fmt: skip


@st.composite
def mutated_bodies(draw: st.DrawFn, version: Version) -> tuple[str, bytes]:
    """(what was done, the JSON body) for one valid body with one mutation."""
    body = draw(valid_bodies(version))
    kind = draw(st.sampled_from(MUTATIONS))
    if kind == "wrong_type":
        name = draw(st.sampled_from(sorted(PROPERTIES)))
        body[name] = draw(wrong_type(PROPERTIES[name]))
        kind += f" {name}"
    elif kind == "out_of_range":
        name = draw(st.sampled_from(sorted(n for n in PROPERTIES if out_of_range(PROPERTIES[n]) is not None)))
        body[name] = draw(out_of_range(PROPERTIES[name]))  # type: ignore[arg-type]
        kind += f" {name}"
    elif kind == "missing":
        body.pop(draw(st.sampled_from(REQUEST_SCHEMA["required"])))
    elif kind == "unknown":
        body[draw(TEXT.filter(lambda k: k not in PROPERTIES))] = draw(json_values)
    elif kind == "message":
        i = draw(st.integers(0, len(body["messages"])))
        body["messages"].insert(i, draw(st.sampled_from(ODD_MESSAGES)))
    elif kind == "tool_schema":
        function = {"name": "broken", "parameters": draw(st.sampled_from(BROKEN_PARAMETERS))}
        body["tools"] = [*(body.get("tools") or []), {"type": "function", "function": function}]
        body.pop("tool_choice", None)
    elif kind == "deep":
        path = draw(st.sampled_from(list(paths(body))))
        body = replaced(body, path, deep(draw(st.sampled_from([64, 300, 900, 1000, 1100])),
                                         draw(st.sampled_from(["array", "object"]))))  # fmt: skip
    elif kind in ("nan", "surrogate"):
        path = draw(st.sampled_from(list(paths(body))[1:]))
        new = draw(st.sampled_from([math.nan, math.inf, -math.inf])) if kind == "nan" else "\ud800x\udfff"
        body = replaced(body, path, new)
    else:
        path = draw(st.sampled_from(list(paths(body))))
        body = replaced(body, path, draw(json_values))
    return kind, json.dumps(body, allow_nan=True).encode()


JSON = "application/json"
CONTENT_TYPES = [JSON, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "",
                 None, "application/json; charset=utf-16", "application/vnd.api+json", "application/jsonx"]  # fmt: skip
BAD_BYTES = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\xef\xbb\xbf"]
LITERALS = [b"", b"null", b"[]", b"1", b'"text"', b"{}", b"NaN", b"{" * 5000, b"[" * 100_000]
ROUTES = [("GET", "/v1/chat/completions"), ("PUT", "/v1/chat/completions"), ("DELETE", "/v1/models"),
          ("POST", "/v1/completions"), ("POST", "/v1/chat/completions/x"), ("POST", "/health")]  # fmt: skip


class Raw(NamedTuple):
    """A request as bytes: what was done to it, and how it is sent (`chunked`: without a Content-Length)."""

    kind: str
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    chunked: bool = False


@st.composite
def raw_requests(draw: st.DrawFn, version: Version) -> Raw:
    """Requests broken at the byte and HTTP level."""
    body = json.dumps(draw(valid_bodies(version))).encode()
    kind = draw(
        st.sampled_from(["truncated", "bytes", "content_type", "encoding", "huge", "literal", "route"])
    )
    method, path, content_type, chunked = "POST", "/v1/chat/completions", JSON, False
    if kind == "truncated":
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif kind == "bytes":
        i = draw(st.integers(0, len(body)))
        body = body[:i] + draw(st.sampled_from(BAD_BYTES)) + body[i:]
    elif kind == "content_type":
        content_type = draw(st.sampled_from(CONTENT_TYPES))
    elif kind == "encoding":
        text = body.decode()
        body = draw(st.sampled_from([b"\xef\xbb\xbf" + body, text.encode("utf-16"), text.encode("utf-32")]))
    elif kind == "huge":
        padding = draw(st.sampled_from([MAX_BODY, MAX_BODY * 4]))
        body = body[:-1] + b', "padding": "' + b"x" * padding + b'"}'
        chunked = draw(st.booleans())
    elif kind == "literal":
        body = draw(st.sampled_from(LITERALS))
    else:
        method, path = draw(st.sampled_from(ROUTES))
    headers = {} if content_type is None else {"content-type": content_type}
    return Raw(kind, method, path, headers, body, chunked)


# ------------------------------------------------------------------------------------------------
# The gateway under test
# ------------------------------------------------------------------------------------------------


class Gateways:
    """One gateway per template version on real sockets, the TGI double behind them all, keep-alive clients."""

    def __init__(self, tgi: FakeTGI, urls: dict[Version, str]) -> None:
        self.tgi = tgi
        self.clients = {version: httpx.Client(base_url=url, timeout=20) for version, url in urls.items()}

    def send(self, version: Version, raw: Raw) -> httpx.Response:
        """Send `raw`; check the invariants of the module docstring on the answer."""
        before = len(self.tgi.requests)
        body = raw.body
        content = (body[i : i + 8192] for i in range(0, len(body), 8192)) if raw.chunked else body
        response = self.clients[version].request(raw.method, raw.path, headers=raw.headers, content=content)
        status = response.status_code
        what = f"{raw.kind} ({version}): {status} {response.text[:300]}"
        assert status < 500, what
        if status >= 300:
            assert response.headers["content-type"] == JSON, what
            envelope = response.json()
            assert list(envelope) == ["error"], what
            error = envelope["error"]
            assert list(error) == ["message", "type", "param", "code"], what
            assert (
                isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
            ), what
            assert error["param"] is None or isinstance(error["param"], str), what
            assert error["code"] is None or isinstance(error["code"], str), what
        if 400 <= status < 500:
            assert len(self.tgi.requests) == before, f"TGI was asked, yet the answer is {what}"
        return response


@pytest.fixture(scope="module")
def gateways() -> Iterator[Gateways]:
    # One fixed answer for every body: grammars are validated by the double, the answer is not held to them.
    with FakeTGI(script=tokens("Hi", " there", EOT), enforce_grammar=False) as tgi, contextlib.ExitStack() as stack:
        settings_ = Settings(model=MODEL, endpoint=tgi.url, max_body_bytes=MAX_BODY)
        urls = {v: stack.enter_context(serve(create_app(settings_, Template(v)))) for v in VERSIONS}
        gateways = Gateways(tgi, urls)
        warm_up = {"model": MODEL, "messages": [{"role": "user", "content": "TGI's /info is read once"}]}
        for client in gateways.clients.values():
            assert client.post("/v1/chat/completions", json=warm_up).status_code == 200
            stack.callback(client.close)
        yield gateways


def post(kind: str, body: bytes) -> Raw:
    return Raw(kind, "POST", "/v1/chat/completions", {"content-type": JSON}, body)


def per_version(cases: Callable[[Version], st.SearchStrategy[T]]) -> st.SearchStrategy[tuple[Version, T]]:
    """A template version, and a case drawn for it (Functionary v1 takes one call per assistant message)."""
    return st.sampled_from(VERSIONS).flatmap(lambda version: st.tuples(st.just(version), cases(version)))


@fuzz(100)
@given(per_version(valid_bodies))
def test_valid_bodies_are_answered(gateways: Gateways, case: tuple[Version, dict[str, Any]]) -> None:
    version, body = case
    response = gateways.send(version, post("valid", json.dumps(body).encode()))
    assert response.status_code == 200, (response.text, body)
    if body.get("stream"):
        assert response.text.endswith("data: [DONE]\n\n"), response.text
    else:
        assert response.json()["object"] == "chat.completion"


@fuzz(250)
@given(per_version(mutated_bodies))
def test_mutated_bodies_are_refused_cleanly(
    gateways: Gateways, case: tuple[Version, tuple[str, bytes]]
) -> None:
    version, (kind, body) = case
    response = gateways.send(version, post(kind, body))
    if kind.startswith("wrong_type ") and kind.split()[1] in SCALARS:  # strict JSON types, as OpenAI
        assert response.status_code == 400, (kind, body, response.text)


@fuzz(120)
@given(per_version(raw_requests))
def test_malformed_requests_are_refused_cleanly(gateways: Gateways, case: tuple[Version, Raw]) -> None:
    gateways.send(*case)
