"""`POST /v1/responses` end to end: the official openai SDK → the gateway on a real socket → the TGI double.

Every template version is served once (module-scoped) with the in-memory store double on
`app.state.store`; `responses.create` and the SDK's `responses.stream` accumulator must give the same
response, a function-tool round trip continues with `previous_response_id`, and TGI must have received the
prompt of the equivalent chat request.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from tests.fakes.response_store import InMemoryResponseStore
from tests.fakes.serve import serve
from tests.fakes.tgi import EOS, EOT, Fail, FakeTGI, Gate, special, tokens
from tgi_gateway.prompting import Template, Version, normalize
from tgi_gateway.server.app import create_app
from tgi_gateway.settings import Settings

MODEL = "functionary-test"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CHAT_TOOLS = [{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}]
ASK = "What is the weather in Hanoi?"
ARGS = '{"city": "Hanoi"}'
EOM = special("<|eom_id|>", skip=True)
SEP = "<|reserved_special_token_249|>"

# What each model generates: a text answer, and one call (token by token).
# fmt: off
SCRIPTS: dict[Version, dict[str, list[Any]]] = {
    Version.V1: {
        "text": tokens("It", " is", " sunny", ".", "<|END_OF_ASSISTANT|>", EOS),
        "call": tokens("<|START_OF_FUNCTION_CALL|>", "get", "_weather", ":\n", '{"city":', ' "Hanoi"}',
                       "<|END_OF_FUNCTION_CALL|>", EOS),
    },
    Version.V2: {
        "text": tokens("all", "\n", "<|content|>", "It", " is", " sunny", ".", "<|stop|>", EOS),
        "call": tokens("get_weather", "\n", "<|content|>", '{"city":', ' "Hanoi"}', "<|stop|>", EOS),
    },
    Version.V2_LLAMA3: {
        "text": tokens("It", " is", " sunny", ".", EOT),
        "call": tokens(SEP, "get_weather", "\n", '{"city":', ' "Hanoi"}', EOT),
    },
    Version.V3_LLAMA3: {
        "text": tokens("all", "\n", "It", " is", " sunny", ".", EOT),
        "call": tokens("get", "_weather", "\n", '{"city":', ' "Hanoi"}', EOT),
    },
    Version.V3_LLAMA31: {
        "text": tokens("It", " is", " sunny", ".", EOT),
        "call": tokens("<function=", "get_weather", ">", '{"city":', ' "Hanoi"}', "</function>", EOM),
    },
}
# fmt: on
VERSIONS = list(SCRIPTS)


@pytest.fixture(scope="module")
def tgi() -> Iterator[FakeTGI]:
    with FakeTGI() as double:
        yield double


def gateway_app(tgi: FakeTGI, version: Version, store: Any = None, **settings: Any) -> Any:
    app = create_app(Settings(model=MODEL, endpoint=tgi.url, **settings), Template(version))
    if store is not None:
        app.state.store = store
    return app


@pytest.fixture(scope="module", params=VERSIONS, ids=str)
def served(request: pytest.FixtureRequest, tgi: FakeTGI) -> Iterator[tuple[Version, str, InMemoryResponseStore]]:
    store = InMemoryResponseStore()
    with serve(gateway_app(tgi, request.param, store)) as url:
        yield request.param, url, store


@pytest.fixture
def client(served: tuple[Version, str, Any]) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=served[1] + "/v1", api_key="unused", max_retries=0, timeout=20) as c:
        yield c


def without_ids(output: list[Any]) -> list[dict[str, Any]]:
    """Output items as the SDK parsed them, less what differs between two responses (ids)."""
    return [o.model_dump(exclude={"id", "call_id"}, exclude_none=True) for o in output]


def chat_prompt(version: Version, **body: Any) -> str:
    return Template(version).render(normalize(body))


# ------------------------------------------------------------------------------------------------
# Every version: create and stream agree; the prompt TGI received; a tool round trip
# ------------------------------------------------------------------------------------------------


def test_text_create_and_stream(tgi, served, client):
    version, _, store = served
    tgi.script = SCRIPTS[version]["text"]
    r = client.responses.create(model=MODEL, input=ASK, instructions="Be brief.", tools=[WEATHER])
    assert (r.output_text, r.status, r.object) == ("It is sunny.", "completed", "response")
    gen = tgi.last_generation
    assert gen.route == "generate"
    assert gen.inputs == chat_prompt(version, tools=CHAT_TOOLS, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": ASK}])  # fmt: skip
    assert r.usage.input_tokens == gen.input_length and r.usage.output_tokens == len(gen.tokens)
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.input_tokens_details.cached_tokens == 0 and r.usage.output_tokens_details.reasoning_tokens == 0
    assert r.id.startswith("resp_") and r.output[0].id.startswith("msg_") and r.id in store.saved

    with client.responses.stream(model=MODEL, input=ASK, instructions="Be brief.", tools=[WEATHER]) as s:
        events = list(s)
        final = s.get_final_response()
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == "It is sunny." and len(deltas) >= 2, "text is streamed token by token"
    assert tgi.last_generation.route == "generate_stream"
    assert without_ids(final.output) == without_ids(r.output)
    assert final.status == "completed" and final.usage == r.usage
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.id in store.saved and store.saved[final.id].response["output"][0]["content"][0]["text"] == final.output_text


def test_function_call_create_and_stream(tgi, served, client):
    version, _, _ = served
    tgi.script = SCRIPTS[version]["call"]
    r = client.responses.create(model=MODEL, input=ASK, tools=[WEATHER])
    [call] = r.output
    assert (call.type, call.name, json.loads(call.arguments), call.status) == (
        "function_call", "get_weather", {"city": "Hanoi"}, "completed")  # fmt: skip
    assert call.call_id.startswith("call_") and call.id.startswith("fc_") and r.output_text == ""
    assert tgi.last_generation.inputs == chat_prompt(
        version, messages=[{"role": "user", "content": ASK}], tools=CHAT_TOOLS
    )
    with client.responses.stream(model=MODEL, input=ASK, tools=[WEATHER]) as s:
        kinds = [e.type for e in s]
        final = s.get_final_response()
    assert kinds.count("response.function_call_arguments.delta") >= 2, "arguments are streamed"
    assert without_ids(final.output) == without_ids(r.output)


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
def test_tool_round_trip_with_previous_response_id(tgi, served, client, stream):
    """The model calls the tool, the client runs it and sends only the output with previous_response_id; the
    prompt TGI gets is the whole conversation (the stored input and output first), without the first
    request's instructions."""
    version, _, store = served

    def model(inputs: str, parameters: dict) -> list[Any]:
        return SCRIPTS[version]["text" if "30°C and sunny" in inputs else "call"]

    tgi.script = model

    def create(**body: Any) -> Any:
        if not stream:
            return client.responses.create(model=MODEL, tools=[WEATHER], **body)
        with client.responses.stream(model=MODEL, tools=[WEATHER], **body) as s:
            return s.get_final_response()

    first = create(input=ASK, instructions="Be brief.")
    [call] = first.output
    second = create(
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "30°C and sunny"}],
        previous_response_id=first.id,
    )
    assert second.output_text == "It is sunny." and second.previous_response_id == first.id
    expected = chat_prompt(version, tools=CHAT_TOOLS, messages=[
        {"role": "user", "content": ASK},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.call_id, "type": "function", "function": {"name": "get_weather", "arguments": ARGS}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "30°C and sunny"},
    ])  # fmt: skip
    assert tgi.last_generation.inputs == expected, "stored input and output replayed; instructions not inherited"
    kept = store.saved[second.id]
    assert kept.previous_response_id == first.id and [i["type"] for i in kept.input_items] == ["function_call_output"]
    assert [i["type"] for i in kept.context] == ["message", "function_call", "function_call_output", "message"]
    # The stateless replay (what the Agents SDK does by default) renders the same prompt.
    replay = create(input=[{"role": "user", "content": ASK}, call.model_dump(exclude_none=True),
                           {"type": "function_call_output", "call_id": call.call_id, "output": "30°C and sunny"}])
    assert replay.output_text == "It is sunny." and tgi.last_generation.inputs == expected


class Weather(BaseModel):
    city: str
    celsius: int


def test_parse_with_text_format(tgi, served, client):
    """`text.format` json_schema (what `responses.parse(text_format=Model)` sends) is enforced by TGI's grammar
    (the double holds the scripted answer to it), stream and not, in every version."""
    version, _, _ = served
    tgi.errors.clear()
    tgi.script = tokens('{"city": ', '"Hanoi", ', '"celsius": 30}', EOS if version in (Version.V1, Version.V2) else EOT)
    r = client.responses.parse(model=MODEL, input=ASK, text_format=Weather)
    assert r.output_parsed == Weather(city="Hanoi", celsius=30)
    assert tgi.last_generation.parameters["grammar"]["type"] in ("json", "regex")
    assert r.text.format.type == "json_schema" and r.text.format.name == "Weather"
    with client.responses.stream(model=MODEL, input=ASK, text_format=Weather) as s:
        final = s.get_final_response()
    assert final.output_parsed == Weather(city="Hanoi", celsius=30)
    assert not tgi.errors, "the scripted answer matched the grammar the gateway sent"


# ------------------------------------------------------------------------------------------------
# One version in depth (v3-llama3.1)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def v31(tgi) -> Iterator[tuple[str, InMemoryResponseStore]]:
    store = InMemoryResponseStore()
    with serve(gateway_app(tgi, Version.V3_LLAMA31, store)) as url:
        yield url, store


@pytest.fixture
def c31(v31) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=v31[0] + "/v1", api_key="unused", max_retries=0, timeout=20) as c:
        yield c


def test_echoed_fields_and_sampling_parameters(tgi, c31):
    tgi.script = SCRIPTS[Version.V3_LLAMA31]["text"]
    r = c31.responses.create(model=MODEL, input=ASK, temperature=0.5, top_p=0.9, max_output_tokens=50,
                             metadata={"k": "v"}, extra_body={"seed": 7}, store=False, include=[])  # fmt: skip
    p = tgi.last_generation.parameters
    assert (p["temperature"], p["top_p"], p["max_new_tokens"], p["seed"]) == (0.5, 0.9, 50, 7)
    assert (r.temperature, r.top_p, r.max_output_tokens, r.metadata, r.store) == (0.5, 0.9, 50, {"k": "v"}, False)
    assert (r.tool_choice, r.tools, r.parallel_tool_calls, r.text.format.type) == ("auto", [], True, "text")
    assert r.completed_at is not None and r.error is None and r.incomplete_details is None


def test_store_false_keeps_nothing(tgi, c31, v31):
    tgi.script = SCRIPTS[Version.V3_LLAMA31]["text"]
    r = c31.responses.create(model=MODEL, input=ASK, store=False)
    assert r.id not in v31[1].saved
    with pytest.raises(openai.BadRequestError) as e:
        c31.responses.create(model=MODEL, input="more", previous_response_id=r.id)
    assert (e.value.code, e.value.param) == ("previous_response_not_found", "previous_response_id")
    assert e.value.body["message"] == f"Previous response with id '{r.id}' not found."


def test_max_output_tokens_reached_is_incomplete(tgi, c31):
    tgi.script = SCRIPTS[Version.V3_LLAMA31]["text"]
    r = c31.responses.create(model=MODEL, input=ASK, max_output_tokens=2)
    assert (r.status, r.incomplete_details.reason, r.output_text) == ("incomplete", "max_output_tokens", "It is")
    assert r.output[0].status == "incomplete"
    events = list(c31.responses.create(model=MODEL, input=ASK, max_output_tokens=2, stream=True))
    assert events[-1].type == "response.incomplete"
    assert without_ids(events[-1].response.output) == without_ids(r.output)


def test_tgi_failure_mid_stream_is_response_failed(tgi, c31):
    tgi.script = ["It", " is", Fail("CUDA out of memory"), " sunny"]
    events = list(c31.responses.create(model=MODEL, input=ASK, stream=True))
    assert [e.type for e in events][-3:] == ["response.content_part.done", "response.output_item.done",
                                             "response.failed"]  # fmt: skip
    failed = events[-1].response
    assert failed.status == "failed" and "CUDA out of memory" in failed.error.message
    assert failed.output[0].content[0].text == "It is"
    tgi.script = ["It", Fail("CUDA out of memory")]
    with c31.responses.stream(model=MODEL, input=ASK) as s:
        list(s)
        with pytest.raises(RuntimeError, match="response.completed"):
            s.get_final_response()
    with pytest.raises(openai.InternalServerError) as e:  # non-stream: the HTTP error
        c31.responses.create(model=MODEL, input=ASK)
    assert e.value.status_code == 502


def test_client_disconnect_closes_the_upstream_request(tgi, v31):
    gate = Gate()
    tgi.script = ["It", " is", gate, " sunny", EOT]
    body = {"model": MODEL, "input": ASK, "stream": True}
    with httpx.Client(base_url=v31[0]) as h, h.stream("POST", "/v1/responses", json=body) as r:
        assert any("output_text.delta" in line for line in r.iter_lines())
        assert tgi.wait_until(lambda: len(tgi.last_generation.tokens) >= 2, 5)
        left = time.monotonic()
    assert tgi.wait_until(lambda: tgi.last_generation.disconnected, 5)
    assert tgi.last_generation.disconnected_at - left < 0.5
    gate.open()


def test_the_stream_is_framed_as_openai_frames_it(tgi, v31):
    tgi.script = SCRIPTS[Version.V3_LLAMA31]["text"]
    r = httpx.post(v31[0] + "/v1/responses", json={"model": MODEL, "input": ASK, "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in r.text.split("\n\n") if b]
    for block in blocks:
        event, data = block.split("\n")
        assert event.startswith("event: ") and data.startswith("data: ")
        assert json.loads(data[6:])["type"] == event[7:]
    assert "[DONE]" not in r.text and json.loads(blocks[-1].split("\n")[1][6:])["type"] == "response.completed"


def test_a_store_that_fails_is_logged_and_the_answer_still_sent(tgi, c31, v31, caplog):
    tgi.script = SCRIPTS[Version.V3_LLAMA31]["text"]
    v31[1].fail_saves = True
    try:
        with caplog.at_level(logging.ERROR, logger="tgi_gateway"):
            r = c31.responses.create(model=MODEL, input=ASK)
    finally:
        v31[1].fail_saves = False
    assert r.output_text == "It is sunny." and r.id not in v31[1].saved
    assert f"could not store response {r.id}" in caplog.text


# fmt: off
ERRORS = [
    ({"tools": [{"type": "web_search"}]}, 400, "tools[0].type", None, "'web_search'"),
    ({"tools": [{"type": "file_search", "vector_store_ids": ["v"]}]}, 400, "tools[0].type", None, "function tools"),
    ({"background": True}, 400, "background", None, "background"),
    ({"previous_response_id": "resp_unknown"}, 400, "previous_response_id", "previous_response_not_found",
     "Previous response with id 'resp_unknown' not found."),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools[0].name", None, "tools[0].name"),
    ({"tools": [{"type": "function", "name": "bad name"}]}, 400, "tools[0].name", None, "'tools[0].name'"),
    ({"text": {"format": {"type": "json_schema", "name": "A", "schema": 5}}}, 400, "text.format.schema", None,
     "text.format.schema"),
    ({"text": {"format": {"type": "xml"}}}, 400, "text.format.type", None, "text.format.type"),
    ({"max_output_tokens": 9000}, 400, "max_output_tokens", "context_length_exceeded", "max_output_tokens"),
    ({"temperature": 3}, 400, "temperature", None, "temperature"),
    ({"model": "gpt-4o"}, 404, "model", "model_not_found", "gpt-4o"),
]
# fmt: on


@pytest.mark.parametrize("body,status,param,code,message", ERRORS, ids=[e[2] for e in ERRORS])
def test_errors_in_the_envelope_and_never_sent_to_tgi(tgi, c31, body, status, param, code, message):
    before = len(tgi.generations)
    with pytest.raises(openai.APIStatusError) as e:
        c31.responses.create(**{"model": MODEL, "input": ASK, **body})
    assert (e.value.status_code, e.value.param, e.value.code) == (status, param, code)
    assert message in e.value.message
    assert set(e.value.body) == {"message", "type", "param", "code"}
    assert len(tgi.generations) == before


def test_unknown_v1_routes_are_a_404_naming_them(c31, v31):
    with pytest.raises(openai.NotFoundError) as e:
        c31.embeddings.create(model=MODEL, input="x")
    assert e.value.body["message"].startswith("Unknown route: POST /v1/embeddings. This gateway serves: ")
    for served in ("POST /v1/chat/completions", "POST /v1/responses", "GET /v1/models", "GET /v1/models/{model}",
                   "GET /v1/responses/{response_id}", "DELETE /v1/responses/{response_id}",
                   "GET /v1/responses/{response_id}/input_items"):  # fmt: skip
        assert served in e.value.message
    r = httpx.delete(v31[0] + "/v1/files/file-1")
    assert r.status_code == 404 and r.json()["error"]["message"].startswith("Unknown route: DELETE /v1/files/file-1.")
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(v31[0] + "/nope").json()["error"]["message"] == "Not Found", "outside /v1: unchanged"
    assert httpx.get(v31[0] + "/v1/responses").status_code == 405, "a served route with another method: 405"


# ------------------------------------------------------------------------------------------------
# Per API key, and without a store
# ------------------------------------------------------------------------------------------------


def test_a_stored_response_is_visible_only_to_the_key_that_created_it(tgi):
    store = InMemoryResponseStore()
    tgi.script = SCRIPTS[Version.V3_LLAMA31]["text"]
    with (
        serve(gateway_app(tgi, Version.V3_LLAMA31, store, api_keys=["sk-a", "sk-b"])) as url,
        openai.OpenAI(base_url=url + "/v1", api_key="sk-a", max_retries=0) as a,
        openai.OpenAI(base_url=url + "/v1", api_key="sk-b", max_retries=0) as b,
    ):
        r = a.responses.create(model=MODEL, input=ASK)
        assert store.saved[r.id].owner is not None
        assert a.responses.create(model=MODEL, input="more", previous_response_id=r.id).status == "completed"
        with pytest.raises(openai.BadRequestError) as e:
            b.responses.create(model=MODEL, input="more", previous_response_id=r.id)
        assert e.value.code == "previous_response_not_found"


def test_the_default_store_keeps_a_conversation_across_a_restart(tgi, tmp_path):
    """The durable store (SQLite under --data-dir, no setup): a response stored by one gateway is continued
    with previous_response_id, and retrieved, by the next one started on the same data directory."""
    tgi.script = SCRIPTS[Version.V3_LLAMA31]["text"]
    with (
        serve(gateway_app(tgi, Version.V3_LLAMA31, data_dir=tmp_path)) as url,
        openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as c,
    ):
        first = c.responses.create(model=MODEL, input=ASK)
        assert first.store is True and first.output_text == "It is sunny."
    assert (tmp_path / "responses.db").is_file()
    with (
        serve(gateway_app(tgi, Version.V3_LLAMA31, data_dir=tmp_path)) as url,
        openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as c,
    ):
        second = c.responses.create(model=MODEL, input="And tomorrow?", previous_response_id=first.id)
        prompt = tgi.last_generation.inputs
        assert prompt.index(ASK) < prompt.index("It is sunny.") < prompt.index("And tomorrow?"), prompt
        assert second.previous_response_id == first.id
        assert c.responses.retrieve(first.id).output_text == "It is sunny."
        assert [i.type for i in c.responses.input_items.list(second.id)] == ["message"]


def test_a_conversation_longer_than_a_request_may_be_is_not_continued(tgi):
    """A stored conversation grows with every turn; one longer than the request size limit (which a client
    could not send in one request either) is kept as its size only, and continuing it is a 400 that says so."""
    tgi.script = SCRIPTS[Version.V3_LLAMA31]["text"]
    store = InMemoryResponseStore()
    with (
        serve(gateway_app(tgi, Version.V3_LLAMA31, store, max_body_bytes=3000)) as url,
        openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as c,
    ):
        short = c.responses.create(model=MODEL, input=ASK)
        longer = c.responses.create(model=MODEL, input="x" * 2700, previous_response_id=short.id)
        assert longer.output_text == "It is sunny."  # answered: the request itself was within the limit
        assert len(store.saved[longer.id].context) == 1, "kept as its size, not its items"
        with pytest.raises(openai.BadRequestError) as e:
            c.responses.create(model=MODEL, input="and then?", previous_response_id=longer.id)
        assert e.value.code == "context_length_exceeded" and e.value.param == "previous_response_id"
        assert "more than this gateway continues (3,000 bytes" in e.value.message
        assert c.responses.create(model=MODEL, input="and then?", previous_response_id=short.id).output_text


def test_a_served_response_leaves_no_reference_cycle(tgi):
    """As on the chat route (tests/server/test_gateway_e2e.py): a response's objects are freed by reference
    counting when it ends, stored or not, streamed or not, the client leaving mid-stream included."""
    import gc

    tgi.script = SCRIPTS[Version.V3_LLAMA31]["call"]
    watched = {"RequestResponseCycle", "DisconnectWatch", "RequestRecord", "EventStreamResponse", "TokenStream",
               "OutputBuilder", "Answer", "StoredResponse"}  # fmt: skip
    app = gateway_app(tgi, Version.V3_LLAMA31, InMemoryResponseStore())
    with serve(app) as url, httpx.Client(base_url=url, timeout=20) as http:
        payload = {"model": MODEL, "input": ASK, "tools": [WEATHER]}
        for stream in (True, False):  # warm-up: imports, caches, pools
            http.post("/v1/responses", json={**payload, "stream": stream}).raise_for_status()
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for stream in (True, False, True, False):
                answer = http.post("/v1/responses", json={**payload, "stream": stream})
                assert answer.status_code == 200 and "get_weather" in answer.text
            with http.stream("POST", "/v1/responses", json={**payload, "stream": True}) as r:
                next(r.iter_bytes())  # a client that leaves mid-stream
            time.sleep(0.3)
            gc.collect()
            left = sorted(type(o).__name__ for o in gc.garbage if type(o).__name__ in watched)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert left == []


def test_a_large_body_or_a_long_stored_conversation_is_admitted_off_the_event_loop(tgi, monkeypatch):
    import threading

    from tgi_gateway.server import chat
    from tgi_gateway.server import responses as flow

    threads: list[str] = []
    normalize = chat.normalize

    def watched(body: dict[str, Any]) -> Any:
        threads.append(threading.current_thread().name)
        return normalize(body)

    monkeypatch.setattr(chat, "normalize", watched)
    monkeypatch.setattr(chat, "INLINE_BODY_BYTES", 1000)
    monkeypatch.setattr(flow, "INLINE_CONTEXT_ITEMS", 1)
    tgi.script = SCRIPTS[Version.V3_LLAMA31]["text"]
    with (
        serve(gateway_app(tgi, Version.V3_LLAMA31, InMemoryResponseStore())) as url,
        openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as c,
    ):
        first = c.responses.create(model=MODEL, input=ASK)  # small: on the event loop
        c.responses.create(model=MODEL, input="x" * 1000)  # a large body
        c.responses.create(model=MODEL, input="And tomorrow?", previous_response_id=first.id)  # 2 stored items
    assert not threads[0].startswith("tgi-gateway-admission")
    assert threads[1].startswith("tgi-gateway-admission") and threads[2].startswith("tgi-gateway-admission")


def test_a_client_leaving_a_non_stream_response_closes_tgis_request(tgi, v31):
    import asyncio

    gate = Gate()
    tgi.script = ["It", gate, " sunny", EOT]

    async def leave() -> float:
        async with httpx.AsyncClient(base_url=v31[0]) as h:
            task = asyncio.create_task(h.post("/v1/responses", json={"model": MODEL, "input": ASK}))
            def generating() -> bool:
                gens = tgi.generations
                return tgi.generate_open == 1 and bool(gens) and len(gens[-1].tokens) == 1

            assert await tgi.wait_until_async(generating, 5)
            task.cancel()
            left = time.monotonic()
            with pytest.raises(asyncio.CancelledError):
                await task
            return left

    left = asyncio.run(leave())
    assert tgi.wait_until(lambda: tgi.last_generation.disconnected, 5)
    assert tgi.last_generation.route == "generate" and tgi.last_generation.disconnected_at - left < 0.5
    gate.open()


def test_tgi_overloaded_is_a_429_with_retry_after(tgi, c31):
    tgi.script = SCRIPTS[Version.V3_LLAMA31]["text"]
    tgi.config.max_concurrent_requests = 0
    try:
        with pytest.raises(openai.RateLimitError) as e:
            c31.responses.create(model=MODEL, input=ASK, stream=True)
    finally:
        tgi.config.max_concurrent_requests = 128
    assert e.value.response.headers["retry-after"] == "1"
