"""The OpenAPI document of `POST /v1/responses` says what the route answers: its error statuses with OpenAI's
envelope (no 422), its JSON answer and its event stream, each matching the documented schema."""

from __future__ import annotations

import json

import httpx

from tests.fakes.serve import serve
from tests.fakes.tgi import FakeTGI, tokens
from tgi_gateway.prompting import Template, Version
from tgi_gateway.responses.request import ResponseObject, ResponseStreamEvent
from tgi_gateway.server.app import create_app
from tgi_gateway.settings import Settings

MODEL = "functionary-test"
PATH = "/v1/responses"
ENVELOPE = {"$ref": "#/components/schemas/ErrorResponse"}


def test_the_route_is_documented_with_its_real_statuses() -> None:
    spec = create_app(Settings(model=MODEL, api_keys=["sk-a"]), Template(Version.V3_LLAMA31)).openapi()
    answers = spec["paths"][PATH]["post"]["responses"]
    assert set(answers) == {"200", "400", "401", "404", "413", "429", "500", "502", "503", "504"}
    for status, answer in answers.items():
        if status != "200":
            assert answer["content"]["application/json"]["schema"] == ENVELOPE, status
    assert "previous_response_not_found" in answers["400"]["description"]
    ok = answers["200"]["content"]
    assert ok["application/json"]["schema"] == {"$ref": "#/components/schemas/ResponseObject"}
    assert ok["text/event-stream"]["x-itemSchema"] == {"$ref": "#/components/schemas/ResponseStreamEvent"}
    assert spec["paths"][PATH]["post"]["security"] == [{"bearer": []}]
    body = spec["paths"][PATH]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    request = spec["components"]["schemas"][body.rsplit("/", 1)[1]]
    assert {"model", "input", "tools", "previous_response_id", "store", "text"} <= set(request["properties"])
    for ref in {part.split('"')[0] for part in json.dumps(spec).split('"$ref": "#/components/schemas/')[1:]}:
        assert ref in spec["components"]["schemas"], ref


def test_the_answers_match_their_documented_schemas() -> None:
    script = tokens("Let me see.", "<function=get_time>", '{"tz": "UTC"}', "</function>", "<|eom_id|>")
    ask = {"model": MODEL, "input": "Time?", "tools": [{"type": "function", "name": "get_time"}]}
    with (
        FakeTGI(script=script) as tgi,
        serve(create_app(Settings(model=MODEL, endpoint=tgi.url), Template(Version.V3_LLAMA31))) as url,
    ):
        answer = httpx.post(url + PATH, json=ask)
        stream = httpx.post(url + PATH, json={**ask, "stream": True})
        bad = httpx.post(url + PATH, json={**ask, "temperature": "hot"})
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    response = ResponseObject.model_validate(answer.json())
    assert [o.type for o in response.output] == ["message", "function_call"]
    events = [ResponseStreamEvent.model_validate_json(block.split("\ndata: ")[1])
              for block in stream.text.split("\n\n") if block]  # fmt: skip
    assert events[-1].type == "response.completed"
    ResponseObject.model_validate(events[-1].model_extra["response"])
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature"
