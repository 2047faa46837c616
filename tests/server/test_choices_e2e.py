"""n > 1 end to end: the official openai SDK → the gateway on a real socket → the TGI double.

`n` choices are `n` TGI requests (seed, seed + 1, … when a seed is given); non-stream answers them in order
with usage counting the prompt once; a stream interleaves their chunks, each with its `index`, and the
SDK's stream accumulator rebuilds the same choices; a client that leaves closes every TGI request; an
upstream error before the first token of all is the HTTP error, after it the SSE error event.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.fakes.serve import serve
from tests.fakes.tgi import EOT, Fail, FakeTGI, Gate, Pause, tokens
from tgi_gateway.prompting import Template, Version
from tgi_gateway.server.app import create_app
from tgi_gateway.settings import Settings

MODEL = "functionary-test"
ASK = [{"role": "user", "content": "Say something."}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def answers(inputs: str, parameters: dict[str, Any]) -> list[Any]:
    """A different answer per seed: a text for even seeds, text then a call for odd ones."""
    seed = parameters.get("seed", 0)
    if seed % 2 == 0:
        return tokens(f"Answer {seed}", ":", " it", " is", " sunny", ".", EOT)
    return tokens(
        f"Answer {seed}", ".", "<function=", "get_weather", ">", '{"city": "Hanoi"}', "</function>", EOT
    )


@pytest.fixture(scope="module")
def tgi() -> Iterator[FakeTGI]:
    with FakeTGI(script=answers) as double:
        yield double


@pytest.fixture(scope="module")
def url(tgi: FakeTGI) -> Iterator[str]:
    app = create_app(Settings(model=MODEL, endpoint=tgi.url), Template(Version.V3_LLAMA31))
    with serve(app) as served:
        yield served


@pytest.fixture
def client(url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=20) as c:
        yield c


@pytest.fixture(autouse=True)
def default_script(tgi: FakeTGI) -> Iterator[None]:
    tgi.script, tgi.config.token_delay = answers, 0.0
    yield
    tgi.script, tgi.config.token_delay = answers, 0.0


def expected_message(seed: int) -> tuple[str, list[tuple[str, str]]]:
    if seed % 2 == 0:
        return f"Answer {seed}: it is sunny.", []
    return f"Answer {seed}.", [("get_weather", '{"city": "Hanoi"}')]


def summary(choice: Any) -> tuple[str, list[tuple[str, str]]]:
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
    return choice.message.content, calls


def test_non_stream_n_choices(tgi, client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], n=3, seed=10)
    gens = tgi.generations[-3:]
    assert sorted(g.parameters["seed"] for g in gens) == [10, 11, 12]
    assert all(g.route == "generate" and g.inputs == gens[0].inputs for g in gens)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [summary(c) for c in r.choices] == [expected_message(s) for s in (10, 11, 12)]
    assert [c.finish_reason for c in r.choices] == ["stop", "tool_calls", "stop"]
    assert r.usage.prompt_tokens == gens[0].input_length, "the prompt counted once"
    assert r.usage.completion_tokens == sum(len(g.tokens) for g in gens)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_n_choices_interleaved_and_rebuilt_by_the_sdk(tgi, client, url):
    tgi.config.token_delay = 0.01
    with client.chat.completions.stream(
        model=MODEL, messages=ASK, tools=[WEATHER], n=2, seed=4, stream_options={"include_usage": True}
    ) as s:
        final = s.get_final_completion()
    gens = tgi.generations[-2:]
    assert sorted(g.parameters["seed"] for g in gens) == [4, 5]
    assert [c.index for c in final.choices] == [0, 1]
    assert [summary(c) for c in final.choices] == [expected_message(4), expected_message(5)]
    assert [c.finish_reason for c in final.choices] == ["stop", "tool_calls"]
    assert final.usage.prompt_tokens == gens[0].input_length
    assert final.usage.completion_tokens == sum(len(g.tokens) for g in gens)
    # The wire: one role chunk and one finish chunk per choice, choices interleaved as tokens arrive.
    body = {"model": MODEL, "messages": ASK, "n": 2, "seed": 4, "stream": True}
    with httpx.Client(base_url=url) as h, h.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    order = [c["choices"][0]["index"] for c in chunks]
    roles = [c["choices"][0]["index"] for c in chunks if "role" in c["choices"][0]["delta"]]
    finishes = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(roles) == sorted(finishes) == [0, 1]
    first_finish = next(k for k, c in enumerate(chunks) if c["choices"][0]["finish_reason"])
    assert set(order[:first_finish]) == {0, 1}, "both choices stream before either is done"


def test_n_with_logprobs(tgi, client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, n=2, seed=2, logprobs=True, top_logprobs=1)
    assert [[t.token for t in c.logprobs.content] for c in r.choices] == [
        ["Answer 2", ":", " it", " is", " sunny", "."],
        ["Answer 3", "."],  # then a call: its tokens are not content
    ]
    with client.chat.completions.stream(model=MODEL, messages=ASK, n=2, seed=2, logprobs=True) as s:
        final = s.get_final_completion()
    assert [[t.token for t in c.logprobs.content] for c in final.choices] == [
        [t.token for t in c.logprobs.content] for c in r.choices
    ]


def test_without_seed_each_choice_is_its_own_request(tgi, client):
    tgi.script = tokens("Hi", EOT)
    r = client.chat.completions.create(model=MODEL, messages=ASK, n=2)
    assert [c.message.content for c in r.choices] == ["Hi", "Hi"]
    assert all("seed" not in g.parameters for g in tgi.generations[-2:])


@pytest.mark.parametrize(("stream", "held"), [(False, "queued"), (False, "generating"), (True, "queued"),
                                             (True, "generating")])  # fmt: skip
def test_client_disconnect_closes_every_upstream_request(tgi, url, stream, held):
    """Queued (no token yet: the client has no answer) or generating (a stream has its first chunks): a client
    that leaves closes all n TGI requests at once."""
    gate = Gate()
    tgi.script = [gate, "It", EOT] if held == "queued" else ["It", gate, " is", EOT]
    body = {"model": MODEL, "messages": ASK, "n": 3, "stream": stream}
    before = len(tgi.generations)
    with httpx.Client(base_url=url, timeout=10) as h:
        if stream and held == "generating":
            with h.stream("POST", "/v1/chat/completions", json=body) as r:
                assert any('"It"' in line for line in r.iter_lines())
                assert tgi.wait_until(lambda: len(tgi.generations) - before == 3, 5)
                left = time.monotonic()
        else:
            with pytest.raises(httpx.ReadTimeout):  # no answer yet: the client gives up
                h.post("/v1/chat/completions", json=body, timeout=0.5)
            left = time.monotonic()
    gens = tgi.generations[before:]
    assert len(gens) == 3
    assert tgi.wait_until(lambda: all(g.disconnected for g in gens), 5), [g.outcome for g in gens]
    assert max(g.disconnected_at for g in gens) - left < 0.5
    gate.open()


def test_upstream_error_before_the_first_token_is_an_http_error(tgi, client):
    gate = Gate()

    def script(inputs: str, parameters: dict[str, Any]) -> list[Any]:  # choice 0 fails once 1 has begun
        return [Pause(0.2), Fail("CUDA out of memory")] if parameters["seed"] == 0 else ["It", gate, EOT]

    tgi.script = script
    for stream in (True, False):
        before = len(tgi.generations)
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(model=MODEL, messages=ASK, n=2, seed=0, stream=stream)
            assert not stream, "no stream: the error is the HTTP answer"
        assert e.value.status_code == 502 and "CUDA out of memory" in e.value.message
        gens = tgi.generations[before:]
        assert tgi.wait_until(lambda g=gens: all(x.done for x in g), 5)
        assert sorted(g.outcome for g in gens) == ["disconnected", "generation"], "the other one closed"
    gate.open()


def test_upstream_error_mid_stream_is_an_error_event(tgi, client):
    gate = Gate()

    def script(inputs: str, parameters: dict[str, Any]) -> list[Any]:  # choice 0 fails after two tokens
        return ["It", " is", Fail("CUDA out of memory")] if parameters["seed"] == 0 else ["It", gate, EOT]

    tgi.script = script
    before = len(tgi.generations)
    got: list[tuple[int, str]] = []
    with pytest.raises(openai.APIError) as e:
        for chunk in client.chat.completions.create(model=MODEL, messages=ASK, n=2, seed=0, stream=True):
            got += [(c.index, c.delta.content) for c in chunk.choices if c.delta.content]
    assert "CUDA out of memory" in e.value.message
    assert (0, "It") in got and (1, "It") in got, "the error came after the first tokens"
    gens = tgi.generations[before:]
    assert tgi.wait_until(lambda: all(g.done for g in gens), 5)
    assert sorted(g.outcome for g in gens) == ["disconnected", "generation"], "the other one closed"
    gate.open()


def test_n_and_logprobs_requests_leave_no_reference_cycle(tgi, url):
    """As one choice (test_gateway_e2e.py): n > 1 and logprobs requests are freed by reference counting, a
    client that leaves included (the pending reads cancelled, their tasks gone)."""
    import gc

    watched = {"RequestResponseCycle", "DisconnectWatch", "RequestRecord", "EventStreamResponse", "TokenStream",
               "ScoredAnswer", "Answer", "Task", "Future"}  # fmt: skip
    payload = {
        "model": MODEL,
        "messages": ASK,
        "tools": [WEATHER],
        "seed": 1,
        "logprobs": True,
        "top_logprobs": 1,
    }
    with httpx.Client(base_url=url, timeout=20) as http:
        for stream in (True, False):  # warm-up
            http.post("/v1/chat/completions", json={**payload, "n": 2, "stream": stream}).raise_for_status()
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for n, stream in ((2, True), (2, False), (1, True), (1, False)):
                answer = http.post("/v1/chat/completions", json={**payload, "n": n, "stream": stream})
                assert answer.status_code == 200 and "get_weather" in answer.text
            tgi.config.token_delay = 0.05
            with http.stream("POST", "/v1/chat/completions", json={**payload, "n": 2, "stream": True}) as r:
                next(r.iter_bytes())  # a client that leaves mid-stream
            time.sleep(0.5)
            gc.collect()
            left = sorted(type(o).__name__ for o in gc.garbage if type(o).__name__ in watched)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert left == []
