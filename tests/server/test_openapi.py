"""The OpenAPI schema (tgi_gateway/openapi.py) says what the gateway really answers: no FastAPI 422, the error
statuses of each route with OpenAI's envelope, 401 and the bearer scheme only with API keys."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.fakes.serve import serve
from tests.fakes.tgi import FakeTGI, tokens
from tgi_gateway.api.models import ChatCompletion, ChatCompletionChunk, ErrorResponse, HealthStatus
from tgi_gateway.prompting import Template, Version
from tgi_gateway.server.app import create_app
from tgi_gateway.settings import Settings

MODEL = "functionary-test"
CHAT = "/v1/chat/completions"
ENVELOPE = {"$ref": "#/components/schemas/ErrorResponse"}


TEMPLATE = Template(Version.V3_LLAMA31)


def schema(**settings: Any) -> dict[str, Any]:
    return create_app(Settings(model=MODEL, **settings), TEMPLATE).openapi()


def responses(spec: dict[str, Any], path: str, method: str = "get") -> dict[str, Any]:
    return spec["paths"][path][method]["responses"]


def body_schema(response: dict[str, Any]) -> dict[str, Any]:
    return response["content"]["application/json"]["schema"]


@pytest.mark.parametrize("settings", [{}, {"api_keys": ["sk-a"], "max_concurrent_per_key": 2}])
def test_no_422_and_no_fastapi_validation_error_anywhere(settings: dict[str, Any]) -> None:
    spec = schema(**settings)
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert "422" not in operation["responses"], (method, path)
    text = json.dumps(spec)
    assert "HTTPValidationError" not in text and '"#/components/schemas/ValidationError"' not in text
    assert not {"HTTPValidationError", "ValidationError"} & set(spec["components"]["schemas"])


def test_every_error_status_refers_to_the_openai_envelope() -> None:
    spec = schema()
    chat = responses(spec, CHAT, "post")
    assert set(chat) == {"200", "400", "404", "413", "429", "500", "502", "503", "504"}
    for status, response in chat.items():
        if status != "200":
            assert body_schema(response) == ENVELOPE, status
    assert "context_length_exceeded" in chat["400"]["description"]
    assert set(responses(spec, "/v1/models")) == {"200"}, "no 401 nor 429 without keys or a limit"
    assert body_schema(responses(spec, "/v1/models/{model}")["404"]) == ENVELOPE
    envelope = spec["components"]["schemas"]["ErrorResponse"]
    detail = spec["components"]["schemas"][envelope["properties"]["error"]["$ref"].rsplit("/", 1)[1]]
    assert envelope["required"] == ["error"]
    assert set(detail["properties"]) == set(detail["required"]) == {"message", "type", "param", "code"}
    assert "security" not in json.dumps(spec["paths"]) and "securitySchemes" not in spec["components"]


def test_keys_add_401_and_the_bearer_scheme_except_on_the_open_health() -> None:
    spec = schema(api_keys=["sk-a"])
    for path, method in ((CHAT, "post"), ("/v1/models", "get"), ("/v1/models/{model}", "get")):
        assert body_schema(responses(spec, path, method)["401"]) == ENVELOPE, path
        assert spec["paths"][path][method]["security"] == [{"bearer": []}], path
    assert "429" not in responses(spec, "/v1/models"), "no per-key limit"
    assert "401" not in responses(spec, "/health") and "security" not in spec["paths"]["/health"]["get"]
    assert spec["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    limited = schema(api_key_file=None, max_concurrent_per_key=1, protect_health=True)
    assert set(responses(limited, "/health")) == {"200", "503", "429"}
    assert "401" not in responses(limited, CHAT, "post"), "a limit without keys: 429, never 401"


def test_the_answers_are_what_the_schema_says() -> None:
    with FakeTGI() as tgi, serve(create_app(Settings(model=MODEL, endpoint=tgi.url), TEMPLATE)) as url:
        spec = httpx.get(url + "/openapi.json").json()
        assert "422" not in json.dumps(spec["paths"])
        bad = httpx.post(url + CHAT, json={"model": MODEL, "messages": [], "temperature": "hot"})
        missing = httpx.get(url + "/v1/models/other")
        health = httpx.get(url + "/health")
    assert str(bad.status_code) in responses(spec, CHAT, "post") and bad.status_code == 400
    assert ErrorResponse.model_validate(bad.json()).error.param == "temperature"
    assert missing.status_code == 404
    assert ErrorResponse.model_validate(missing.json()).error.code == "model_not_found"
    assert health.status_code == 200 and HealthStatus.model_validate(health.json()).status == "ok"


def test_the_chat_answer_is_json_or_an_event_stream() -> None:
    spec = schema()
    ok = responses(spec, CHAT, "post")["200"]
    assert list(ok["content"]) == ["application/json", "text/event-stream"]
    assert body_schema(ok) == {"$ref": "#/components/schemas/ChatCompletion"}
    events = ok["content"]["text/event-stream"]
    assert events["schema"]["type"] == "string" and "data: [DONE]" in events["schema"]["description"]
    assert events["x-itemSchema"] == {"$ref": "#/components/schemas/ChatCompletionChunk"}
    components = spec["components"]["schemas"]
    for name in ("ChatCompletion", "ChatCompletionChunk", "Usage", "ToolCall", "ToolCallDelta"):
        assert name in components
    for ref in {part.split('"')[0] for part in json.dumps(spec).split('"$ref": "#/components/schemas/')[1:]}:
        assert ref in components, ref  # every reference resolves


def test_the_answers_match_their_documented_schemas() -> None:
    script = tokens("<function=get_time>", '{"tz": "UTC"}', "</function>", "<|eom_id|>")
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "Time?"}], "tools": [tool]}
    with (
        FakeTGI(script=script) as tgi,
        serve(create_app(Settings(model=MODEL, endpoint=tgi.url), TEMPLATE)) as url,
    ):
        answer = httpx.post(url + CHAT, json=ask)
        stream = httpx.post(
            url + CHAT, json={**ask, "stream": True, "stream_options": {"include_usage": True}}
        )
    assert answer.headers["content-type"] == "application/json"
    completion = ChatCompletion.model_validate(answer.json())
    assert completion.choices[0].message.tool_calls and completion.choices[0].finish_reason == "tool_calls"
    assert stream.headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in stream.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(event) for event in events[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage is not None
    assert any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
