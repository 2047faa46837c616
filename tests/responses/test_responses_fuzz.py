"""`POST /v1/responses` with generated bodies: every answer is a 2xx or a 4xx in the OpenAI envelope.

Bodies mix well-formed and broken parts (input items of every kind and of none, content parts, tools of every
type, tool choices, `text.format`, scalars of any JSON type); each goes over a real socket to the gateway, the
TGI double behind it. For every answer: no 5xx; a non-2xx answer is exactly the envelope; a 4xx sent nothing to
TGI; a 200 is a Response, or a stream ending with its terminal event. Derandomized and bounded.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fakes.response_store import InMemoryResponseStore
from tests.fakes.serve import serve
from tests.fakes.tgi import EOT, FakeTGI, tokens
from tgi_gateway.prompting import Template, Version
from tgi_gateway.server.app import create_app
from tgi_gateway.settings import Settings

MODEL = "fuzz-model"
VERSIONS = [Version.V2, Version.V3_LLAMA31]

TEXT = st.text(max_size=10)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**66), 2**66), st.floats(allow_nan=False, allow_infinity=False), TEXT)
json_values = st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
    max_leaves=6,
)  # fmt: skip
NAMES = st.sampled_from(["get_weather", "get_time", "bad name", ""])
CALL_IDS = st.sampled_from(["call_1", "call_2"])


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly `strategy`, sometimes any JSON value."""
    return st.one_of(*[strategy] * 7, json_values)


parts = st.lists(
    maybe(st.fixed_dictionaries({
        "type": maybe(st.sampled_from(["input_text", "output_text", "refusal", "input_image"])),
        "text": maybe(TEXT),
    })),
    max_size=3,
)  # fmt: skip
items = st.one_of(
    st.fixed_dictionaries(
        {"role": maybe(st.sampled_from(["user", "assistant", "system", "developer", "tool"])),
         "content": st.one_of(TEXT, parts)},
        optional={"type": maybe(st.just("message")), "id": maybe(TEXT)},
    ),
    st.fixed_dictionaries(
        {"type": st.just("function_call"), "call_id": maybe(CALL_IDS), "name": maybe(NAMES),
         "arguments": maybe(st.just("{}"))},
        optional={"id": maybe(TEXT), "status": TEXT},
    ),
    st.fixed_dictionaries(
        {"type": st.just("function_call_output"), "call_id": maybe(CALL_IDS), "output": st.one_of(TEXT, parts)}
    ),
    st.fixed_dictionaries({"type": maybe(st.sampled_from(["item_reference", "reasoning"])), "id": TEXT}),
)  # fmt: skip
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
tools = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {"type": st.just("function"), "name": maybe(NAMES)},
            optional={"parameters": maybe(st.just(SCHEMA)), "strict": maybe(st.booleans()),
                      "description": maybe(TEXT)},
        ),
        st.fixed_dictionaries({"type": maybe(st.sampled_from(["web_search", "file_search", "mcp", "custom"]))}),
        st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries({"name": NAMES})}),
    ),
    max_size=3,
)  # fmt: skip
tool_choices = st.one_of(
    st.sampled_from(["auto", "none", "required", "any"]),
    st.fixed_dictionaries({"type": st.just("function"), "name": maybe(NAMES)}),
    st.fixed_dictionaries({"type": st.just("allowed_tools"), "mode": maybe(st.sampled_from(["auto", "required"])),
                           "tools": maybe(st.lists(st.fixed_dictionaries({"type": st.just("function"),
                                                                          "name": maybe(NAMES)}), max_size=2))}),
    st.fixed_dictionaries({"type": st.sampled_from(["web_search_preview", "file_search"])}),
)  # fmt: skip
formats = st.one_of(
    st.just({"type": "text"}),
    st.just({"type": "json_object"}),
    st.fixed_dictionaries({"type": st.just("json_schema"), "name": maybe(st.just("A")),
                           "schema": maybe(st.just(SCHEMA))}, optional={"strict": maybe(st.booleans())}),
    st.fixed_dictionaries({"type": json_values}),
)  # fmt: skip
valid_bodies = st.fixed_dictionaries(
    {"model": st.just(MODEL), "input": st.one_of(TEXT, st.lists(maybe(items), min_size=1, max_size=4))},
    optional={
        "instructions": TEXT, "tools": tools, "tool_choice": tool_choices,
        "text": st.fixed_dictionaries({"format": maybe(formats)}), "stream": st.booleans(),
        "max_output_tokens": st.integers(1, 10_000), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
        "seed": st.integers(0, 2**64 - 1), "parallel_tool_calls": st.booleans(), "store": st.booleans(),
        "metadata": st.dictionaries(TEXT, TEXT, max_size=2),
        "include": st.lists(TEXT, max_size=2), "truncation": st.sampled_from(["auto", "disabled"]),
    },
)  # fmt: skip
FIELDS = ["input", "instructions", "tools", "tool_choice", "text", "stream", "max_output_tokens",
          "temperature", "top_p", "seed", "parallel_tool_calls", "store", "previous_response_id", "metadata",
          "background", "conversation", "include", "truncation", "stream_options", "model"]  # fmt: skip


@st.composite
def bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A body whose parts are mostly well-formed (junk inside items, tools and formats now and then), and one
    top-level field in three replaced by any JSON value."""
    body = draw(valid_bodies)
    if draw(st.integers(0, 2)) == 2:
        body[draw(st.sampled_from(FIELDS))] = draw(json_values)
    return body


@pytest.fixture(scope="module")
def gateways() -> Iterator[tuple[FakeTGI, dict[Version, httpx.Client]]]:
    with FakeTGI(script=tokens("Hi", " there", EOT), enforce_grammar=False) as tgi, contextlib.ExitStack() as stack:
        clients = {}
        for version in VERSIONS:
            app = create_app(Settings(model=MODEL, endpoint=tgi.url), Template(version))
            app.state.store = InMemoryResponseStore()
            clients[version] = stack.enter_context(httpx.Client(base_url=stack.enter_context(serve(app)), timeout=20))
            assert clients[version].post("/v1/responses", json={"model": MODEL, "input": "warm"}).status_code == 200
        yield tgi, clients


@settings(derandomize=True, database=None, deadline=None, max_examples=500,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(st.sampled_from(VERSIONS), bodies())
def test_every_body_is_answered_or_refused_cleanly(gateways: Any, version: Version, body: dict[str, Any]) -> None:
    tgi, clients = gateways
    before = len(tgi.requests)
    r = clients[version].post("/v1/responses", content=json.dumps(body), headers={"content-type": "application/json"})
    what = f"{r.status_code} {r.text[:400]} for {body}"
    assert r.status_code < 500, what
    if r.status_code >= 300:
        assert r.headers["content-type"] == "application/json", what
        error = r.json()["error"]
        assert list(r.json()) == ["error"] and list(error) == ["message", "type", "param", "code"], what
        assert isinstance(error["message"], str) and error["message"], what
        assert error["param"] is None or isinstance(error["param"], str), what
        assert len(tgi.requests) == before, f"TGI was asked, yet: {what}"
    elif r.headers["content-type"].startswith("text/event-stream"):
        last = json.loads(r.text.rstrip("\n").rsplit("\ndata: ", 1)[1])
        assert last["type"] in ("response.completed", "response.incomplete"), what
    else:
        assert r.json()["object"] == "response" and r.json()["status"] in ("completed", "incomplete"), what
