"""Regression tests for the invalid inputs the fuzzing (tests/server/test_fuzz.py) found answered wrongly: each is a
400 in the OpenAI envelope naming the field, and nothing reaches TGI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fakes.serve import serve
from tests.fakes.tgi import EOT, FakeTGI, tokens
from tgi_gateway.prompting import Template, Version
from tgi_gateway.server.app import create_app
from tgi_gateway.settings import Settings

MODEL = "m"
HI = [{"role": "user", "content": "Hi"}]
UNPARSABLE = "We could not parse the JSON body of your request"
NOT_JSON = "The request body must be JSON, sent with 'Content-Type: application/json'."


class Gateway:
    def __init__(self, client: httpx.Client, tgi: FakeTGI) -> None:
        self.client, self.tgi = client, tgi

    def refused(self, body: bytes | dict[str, Any], *, content_type: str = "application/json") -> dict:
        """POST `body`; assert a 400 envelope and that TGI got nothing; return the error object."""
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        before = len(self.tgi.requests)
        headers = {"content-type": content_type}
        r = self.client.post("/v1/chat/completions", content=content, headers=headers)
        assert r.status_code == 400, r.text
        assert r.headers["content-type"] == "application/json"
        assert list(r.json()) == ["error"] and list(r.json()["error"]) == ["message", "type", "param", "code"]
        assert len(self.tgi.requests) == before, "nothing reaches TGI"
        return r.json()["error"]


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    with FakeTGI(script=tokens("Hi", EOT)) as tgi:
        app = create_app(Settings(model=MODEL, endpoint=tgi.url), Template(Version.V3_LLAMA31))
        with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
            # TGI's /info is read once, here: from now on a refused request sends TGI nothing at all.
            assert (
                client.post("/v1/chat/completions", json={"model": MODEL, "messages": HI}).status_code == 200
            )
            yield Gateway(client, tgi)


# Bug: a lone surrogate escape was accepted by the JSON parser; quoting it in the 404 for an unknown model
# made the error handler itself fail (orjson cannot encode it): a 500.
@pytest.mark.parametrize(
    "raw",
    [
        rb'{"model": "\ud800", "messages": []}',
        rb'{"model": "m", "messages": [{"role": "user", "content": "\udfff"}]}',
    ],
)
def test_lone_surrogate_escapes_are_unparsable_json(gateway: Gateway, raw: bytes) -> None:
    error = gateway.refused(raw)
    assert error["message"].startswith(UNPARSABLE) and "surrogate" in error["message"]


# Bug: `Infinity` and `NaN` literals were accepted; `"repetition_penalty": Infinity` passed validation and
# was only refused while the TGI request was encoded (after TGI's /info), with no `param`.
@pytest.mark.parametrize("literal", [b"Infinity", b"-Infinity", b"NaN", b"1e400"])
def test_non_finite_numbers_are_unparsable_json(gateway: Gateway, literal: bytes) -> None:
    raw = (
        b'{"model": "m", "messages": [{"role": "user", "content": "Hi"}], "repetition_penalty": %s}' % literal
    )
    assert gateway.refused(raw)["message"].startswith(UNPARSABLE)


def test_json_nested_deeper_than_1024_levels_is_unparsable(gateway: Gateway) -> None:
    raw = b'{"model": "m", "messages": ' + b"[" * 2000 + b"]" * 2000 + b"}"
    assert gateway.refused(raw)["message"].startswith(UNPARSABLE)


def test_a_utf8_byte_order_mark_is_still_accepted(gateway: Gateway) -> None:
    body = b"\xef\xbb\xbf" + json.dumps({"model": MODEL, "messages": HI}).encode()
    r = gateway.client.post(
        "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == 200, r.text


# Bug: a role that is an array or an object made `role not in {...}` raise TypeError (unhashable): a 500.
@pytest.mark.parametrize("role", [["user"], {"user": True}])
def test_a_role_that_is_not_a_string(gateway: Gateway, role: Any) -> None:
    error = gateway.refused({"model": MODEL, "messages": [{"role": role, "content": "Hi"}]})
    assert error["param"] == "messages[0].role"
    assert ("an array" if isinstance(role, list) else "an object") in error["message"]


# Bug: values quoted in error messages were `repr`'d whole: a 1000-level nested array (valid JSON) raised
# RecursionError (a 500), and a megabyte string came back as a megabyte message.
@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": HI, "tools": [{"function": {"name": "[deep]"}}]}, "tools[0].function.name"),
        ({"messages": [{"role": "tool", "content": "", "tool_call_id": "[deep]"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "user", "content": [{"type": "[deep]"}]}]}, "messages[0].content[0]"),
        ({"messages": HI, "tools": [{"type": "[deep]"}]}, "tools[0].type"),
        ({"messages": HI, "tools": [{"function": {"name": "f"}}], "tool_choice": "x" * 10**6}, "tool_choice"),
    ],
)  # fmt: skip
def test_quoted_values_are_short_whatever_their_size_or_depth(
    gateway: Gateway, body: dict, param: str
) -> None:
    raw = json.dumps({"model": MODEL, **body}).replace('"[deep]"', "[" * 1000 + "]" * 1000).encode()
    error = gateway.refused(raw)
    assert error["param"] == param and len(error["message"]) < 300, error


# Bug: integers wider than TGI's own fields (`max_new_tokens: u32`, `top_k: i32`) passed validation, and TGI's
# JSON extractor refused them: the request had reached TGI.
@pytest.mark.parametrize(
    ("field", "value"), [("max_tokens", 2**32), ("max_completion_tokens", 10**12), ("top_k", 2**31)]
)
def test_integers_wider_than_tgi_fields(gateway: Gateway, field: str, value: int) -> None:
    error = gateway.refused({"model": MODEL, "messages": HI, field: value})
    assert error["param"] == field and "less than or equal to" in error["message"]


# Bug: a `max_tokens` no prompt can fit (>= TGI's max_total_tokens) was sent to TGI to be refused there.
@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_that_cannot_fit_the_context(gateway: Gateway, field: str) -> None:
    error = gateway.refused({"model": MODEL, "messages": HI, field: 8192})
    assert (error["param"], error["code"]) == (field, "context_length_exceeded")
    assert "8192 tokens" in error["message"]


def test_max_tokens_that_may_fit_still_reach_tgi(gateway: Gateway) -> None:
    # Room for 6 tokens: the prompt (~170 characters, one message: at least 5 tokens) may be 6 tokens long;
    # only TGI can count them.
    before = len(gateway.tgi.requests)
    r = gateway.client.post("/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": 8186})
    assert r.json()["error"]["code"] == "context_length_exceeded", "TGI, which counts the prompt, decides"
    assert gateway.tgi.requests[before].path == "/generate"


def test_max_tokens_that_leave_no_room_for_the_messages_never_reach_tgi(gateway: Gateway) -> None:
    # Room for 4 tokens: one message of a llama3 template is at least 5.
    before = len(gateway.tgi.requests)
    r = gateway.client.post("/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": 8188})
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and "messages are at least 5 tokens (1 of them" in error["message"]
    assert [q.path for q in gateway.tgi.requests[before:]] == [], "refused by the gateway, TGI not asked"


# Bug: pydantic's union member tags leaked into `param` ("stop.str", "function_call.dict[str,any]").
@pytest.mark.parametrize(
    ("extra", "param"),
    [({"stop": [1]}, "stop[0]"), ({"stop": 5}, "stop"), ({"tool_choice": 5}, "tool_choice"),
     ({"function_call": [[1]]}, "function_call"), ({"logit_bias": {"a": "b"}}, "logit_bias.a")],
)  # fmt: skip
def test_param_names_the_field_not_the_union_member(gateway: Gateway, extra: dict, param: str) -> None:
    error = gateway.refused({"model": MODEL, "messages": HI, **extra})
    assert error["param"] == param and f"'{param}'" in error["message"]


# Bug: errors about the whole body said "Invalid value for 'None'", or "Missing required parameter: 'None'".
@pytest.mark.parametrize(
    ("raw", "content_type", "message"),
    [
        (b"", "application/json", "The request body is empty: send a JSON object."),
        (b"null", "application/json", "The request body must be a JSON object."),
        (b"[]", "application/json", "The request body must be a JSON object."),
        (b'{"model": "m", "messages": []}', "text/plain", NOT_JSON),
        (b'{"model": "m", "messages": []}', "application/x-www-form-urlencoded", NOT_JSON),
    ],
)  # fmt: skip
def test_errors_about_the_whole_body(gateway: Gateway, raw: bytes, content_type: str, message: str) -> None:
    error = gateway.refused(raw, content_type=content_type)
    assert (error["message"], error["param"]) == (message, None)


def test_missing_fields_are_still_named(gateway: Gateway) -> None:
    assert gateway.refused({"messages": HI})["param"] == "model"


# ------------------------------------------------------------------------------------------------
# A budget per request (issue 11, finding 1)
# ------------------------------------------------------------------------------------------------


def _doubling(levels: int) -> dict[str, Any]:
    defs = {
        f"d{i}": {
            "type": "object",
            "properties": {"a": {"$ref": f"#/$defs/d{i + 1}"}, "b": {"$ref": f"#/$defs/d{i + 1}"}},
        }
        for i in range(levels)
    }
    defs[f"d{levels}"] = {"type": "string"}
    return {"type": "object", "properties": {"root": {"$ref": "#/$defs/d0"}}, "$defs": defs}


# Bug: a 1.2 KB schema whose 11 definitions each refer to the next twice was accepted and sent to TGI as a
# 281 KB prompt; at 12+ levels it was refused ("more than 100000 nodes") only after ~0.1-0.5 s of work.
@pytest.mark.parametrize("levels", [11, 12, 16, 40])
def test_a_schema_that_expands_beyond_the_request_budget(gateway: Gateway, levels: int) -> None:
    tools = [
        {"type": "function", "function": {"name": "ok"}},
        {"type": "function", "function": {"name": "boom", "parameters": _doubling(levels)}},
    ]
    error = gateway.refused({"model": MODEL, "messages": HI, "tools": tools})
    assert error["param"] == "tools[1].function.parameters"
    assert "too large once expanded: more than" in error["message"] and "8 × the" in error["message"]


# Bug: any number of tools was accepted (82k tools in 4 MiB held the event loop 776 ms); OpenAI takes 128.
def test_more_than_128_tools(gateway: Gateway) -> None:
    tools = [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]
    error = gateway.refused({"model": MODEL, "messages": HI, "tools": tools})
    assert (error["param"], error["code"]) == ("tools", "array_above_max_length")


# Bug: a prompt longer than TGI's max_input_tokens could ever allow was rendered and sent, to be refused there.
def test_a_prompt_that_cannot_fit_is_refused_before_tgi(gateway: Gateway) -> None:
    limit = 8191 * 128  # the double's max_input_tokens × the longest token of any Functionary tokenizer
    messages = [
        {"role": "user", "content": "x" * (limit // 2)},
        {"role": "user", "content": "y" * (limit // 2 + 1)},
    ]
    error = gateway.refused({"model": MODEL, "messages": messages})
    assert (error["param"], error["code"]) == ("messages", "context_length_exceeded")
    assert "8191 tokens" in error["message"]


# Bug: booleans and numeric strings were accepted for numbers: `"top_k": true` reached TGI as top_k 1,
# `"max_tokens": true` as max_new_tokens 1, `"temperature": "0.5"` as 0.5; OpenAI refuses them.
@pytest.mark.parametrize(
    ("field", "value", "expected", "got"),
    [("max_tokens", True, "an integer", "a boolean"), ("max_completion_tokens", "5", "an integer", "a string"),
     ("top_k", True, "an integer", "a boolean"), ("seed", False, "an integer", "a boolean"),
     ("n", "1", "an integer", "a string"), ("top_logprobs", True, "an integer", "a boolean"),
     ("max_tokens", 5.5, "an integer", "a decimal"), ("seed", [1], "an integer", "an array"),
     ("temperature", "0.5", "a decimal", "a string"), ("top_p", True, "a decimal", "a boolean"),
     ("frequency_penalty", "0", "a decimal", "a string"), ("presence_penalty", False, "a decimal", "a boolean"),
     ("repetition_penalty", {"x": 1}, "a decimal", "an object"), ("stream", "true", "a boolean", "a string"),
     ("stream", 1, "a boolean", "an integer"), ("logprobs", 0, "a boolean", "an integer"),
     ("parallel_tool_calls", "false", "a boolean", "a string")],
)  # fmt: skip
def test_numbers_and_booleans_have_strict_json_types(
    gateway: Gateway, field: str, value: Any, expected: str, got: str
) -> None:
    error = gateway.refused({"model": MODEL, "messages": HI, field: value})
    assert error == {
        "message": f"Invalid type for '{field}': expected {expected}, but got {got} instead.",
        "type": "invalid_request_error",
        "param": field,
        "code": "invalid_type",
    }


def test_strict_types_inside_stream_options(gateway: Gateway) -> None:
    error = gateway.refused(
        {"model": MODEL, "messages": HI, "stream": True, "stream_options": {"include_usage": 1}}
    )
    assert (error["param"], error["code"]) == ("stream_options.include_usage", "invalid_type")


def test_integer_valued_numbers_are_still_integers(gateway: Gateway) -> None:
    before = len(gateway.tgi.requests)
    body = {"model": MODEL, "messages": HI, "max_tokens": 5.0, "seed": 7.0, "temperature": 1, "top_p": 1}
    assert gateway.client.post("/v1/chat/completions", json=body).status_code == 200
    parameters = gateway.tgi.requests[before].json["parameters"]
    assert (parameters["max_new_tokens"], parameters["seed"]) == (5, 7)


# ------------------------------------------------------------------------------------------------
# Admission off the event loop: a large body is normalised and rendered in the admission thread
# ------------------------------------------------------------------------------------------------


def test_a_large_body_is_admitted_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from tgi_gateway.server import chat

    threads: list[str] = []
    release = threading.Event()
    normalize = chat.normalize

    admission: list[threading.Thread] = []

    def watched(body: dict[str, Any]) -> Any:
        threads.append(threading.current_thread().name)
        admission.append(threading.current_thread())
        if body["messages"][0]["content"].startswith("hold"):
            assert release.wait(10)
        return normalize(body)

    monkeypatch.setattr(chat, "normalize", watched)
    monkeypatch.setattr(chat, "INLINE_BODY_BYTES", 1000)  # (the double's 8192 tokens are 32K characters)
    large = {"model": MODEL, "messages": [{"role": "user", "content": "hold" + "x" * 1000}]}
    with FakeTGI(script=tokens("Hi", EOT)) as tgi:
        app = create_app(Settings(model=MODEL, endpoint=tgi.url), Template(Version.V3_LLAMA31))
        with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
            assert (
                client.post("/v1/chat/completions", json={"model": MODEL, "messages": HI}).status_code == 200
            )
            result: list[httpx.Response] = []
            sender = threading.Thread(
                target=lambda: result.append(client.post("/v1/chat/completions", json=large))
            )
            sender.start()
            with httpx.Client(base_url=url, timeout=5) as other:
                while len(threads) < 2:  # the large request has reached normalize, which holds it
                    assert sender.is_alive()
                    threading.Event().wait(0.01)
                assert other.get("/v1/models").status_code == 200, "the event loop is free meanwhile"
            release.set()
            sender.join(10)
    assert result[0].status_code == 200, result[0].text
    assert not threads[0].startswith("tgi-gateway-admission"), "a small body: on the event loop"
    assert threads[1].startswith("tgi-gateway-admission")
    admission[1].join(5)
    assert not admission[1].is_alive(), "the app's shutdown ends its admission thread"
