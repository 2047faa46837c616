"""logprobs end to end: the official openai SDK → the gateway on a real socket → the TGI double (which sends
`logprob` per token and `top_tokens` when asked `top_n_tokens`, as TGI does).

For every template version, text and text + calls: the non-stream list equals what the SDK's stream
accumulator rebuilds, and lists the content tokens only; TGI is asked `top_n_tokens` only for
`top_logprobs`; the limits are 400s naming the field.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import openai
import pytest

from tests.fakes.tgi import EOS, EOT, FakeTGI, special, tokens
from tests.gateway_process import served_gateway
from tgi_gateway.prompting import Version

MODEL = "functionary-test"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Hanoi?"}]
EOM = special("<|eom_id|>", skip=True)
SEP = "<|reserved_special_token_249|>"

# (script, the listed tokens) per version: text, then text followed by a call.
# fmt: off
SCRIPTS: dict[Version, dict[str, tuple[list[Any], list[str]]]] = {
    Version.V1: {
        "text": (tokens(" It", " is", " sunny", ".", "<|END_OF_ASSISTANT|>", EOS), [" It", " is", " sunny", "."]),
        "call": (tokens(" Let", " me", " see", ".\n", "<|START_OF_FUNCTION_CALL|>", "get_weather", ":\n", "{}",
                        "<|END_OF_FUNCTION_CALL|>", EOS), [" Let", " me", " see"]),
    },
    Version.V2: {
        "text": (tokens("all", "\n", "<|content|>", " It", " is", " sunny", ".", "<|stop|>", EOS),
                 [" It", " is", " sunny", "."]),
        "call": (tokens("all", "\n", "<|content|>", " Let", " me", " see", ".", "\n", "<|from|>", "assistant", "\n",
                        "<|recipient|>", "get_weather", "\n", "<|content|>", "{}", "<|stop|>", EOS),
                 [" Let", " me", " see", "."]),
    },
    Version.V2_LLAMA3: {
        "text": (tokens("It", " is", " sunny", ".", EOT), ["It", " is", " sunny", "."]),
        "call": (tokens("Let", " me", " see", ".", SEP, "get_weather", "\n", "{}", EOT), ["Let", " me", " see", "."]),
    },
    Version.V3_LLAMA3: {
        "text": (tokens("all", "\n", "It", " is", " sunny", ".", EOT), ["It", " is", " sunny", "."]),
        "call": (tokens("all", "\n", "Let", " me", " see", ".>>>", "get_weather", "\n", "{}", EOT),
                 ["Let", " me", " see"]),
    },
    Version.V3_LLAMA31: {
        "text": (tokens("It", " is", " sunny", ".", EOT), ["It", " is", " sunny", "."]),
        "call": (tokens("Let", " me", " see", ".", "<function=", "get_weather", ">", "{}", "</function>", EOM),
                 ["Let", " me", " see", "."]),
    },
}
# fmt: on


def gateway(tgi: FakeTGI, version: Version, **settings: Any) -> AbstractContextManager[str]:
    return served_gateway(tgi.url, version, MODEL, **settings)


@pytest.fixture(scope="module")
def tgi() -> Iterator[FakeTGI]:
    with FakeTGI() as double:
        yield double


@pytest.fixture(scope="module", params=list(SCRIPTS), ids=str)
def served(request: pytest.FixtureRequest, tgi: FakeTGI) -> Iterator[tuple[Version, str]]:
    with gateway(tgi, request.param) as url:
        yield request.param, url


@pytest.fixture
def client(served: tuple[Version, str]) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=served[1] + "/v1", api_key="unused", max_retries=0, timeout=20) as c:
        yield c


def body(version: Version) -> dict[str, Any]:
    if version is Version.V1:
        return {"messages": ASK, "functions": [WEATHER["function"]]}
    return {"messages": ASK, "tools": [WEATHER]}


def dump(logprobs: Any) -> list[dict[str, Any]]:
    return [t.model_dump() for t in logprobs.content]


@pytest.mark.parametrize("scenario", ["text", "call"])
def test_stream_equals_non_stream_and_lists_content_tokens(tgi, served, client, scenario):
    version, _ = served
    tgi.script, listed = SCRIPTS[version][scenario]
    r = client.chat.completions.create(model=MODEL, logprobs=True, top_logprobs=2, **body(version))
    assert tgi.last_generation.parameters["top_n_tokens"] == 2
    [choice] = r.choices
    entries = dump(choice.logprobs)
    assert [e["token"] for e in entries] == listed
    by_text = {t.text: t for t in tgi.last_generation.tokens}
    for e in entries:  # TGI's own figures, TGI's top tokens (the double: the token, then "<text>~1")
        sent = by_text[e["token"]]
        assert e["logprob"] == pytest.approx(sent.token_logprob)
        assert e["bytes"] == list(e["token"].encode())
        assert [t["token"] for t in e["top_logprobs"]] == [e["token"], e["token"] + "~1"]
    with client.chat.completions.stream(model=MODEL, logprobs=True, top_logprobs=2, **body(version)) as s:
        events = list(s)
        final = s.get_final_completion()
    assert tgi.last_generation.route == "generate_stream"
    assert dump(final.choices[0].logprobs) == entries
    assert final.choices[0].message.content == choice.message.content
    streamed = [e for e in events if e.type == "logprobs.content.delta"]
    assert len(streamed) == len(listed) >= 3, "streamed with the chunks, token by token"


def test_logprobs_without_top_logprobs(tgi, served, client):
    version, _ = served
    tgi.script, listed = SCRIPTS[version]["text"]
    r = client.chat.completions.create(model=MODEL, logprobs=True, **body(version))
    assert "top_n_tokens" not in tgi.last_generation.parameters
    assert [(t.token, t.top_logprobs) for t in r.choices[0].logprobs.content] == [(t, []) for t in listed]
    r = client.chat.completions.create(model=MODEL, **body(version))
    assert r.choices[0].logprobs is None


def test_top_logprobs_limits_are_400s(tgi):
    tgi.script, _ = SCRIPTS[Version.V3_LLAMA31]["text"]
    with (
        gateway(tgi, Version.V3_LLAMA31) as url,
        openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0) as c,
    ):
        before = len(tgi.generations)
        with pytest.raises(openai.BadRequestError) as e:  # over TGI's default --max-top-n-tokens (5)
            c.chat.completions.create(model=MODEL, messages=ASK, logprobs=True, top_logprobs=6)
        assert (e.value.param, e.value.code) == ("top_logprobs", None)
        assert "at most 5" in e.value.message and "Given: 6" in e.value.message
        with pytest.raises(openai.BadRequestError) as e:  # OpenAI's rule
            c.chat.completions.create(model=MODEL, messages=ASK, logprobs=False, top_logprobs=1)
        assert e.value.param == "top_logprobs" and "logprobs" in e.value.message
        with pytest.raises(openai.BadRequestError) as e:  # OpenAI's own range
            c.chat.completions.create(model=MODEL, messages=ASK, logprobs=True, top_logprobs=21)
        assert e.value.param == "top_logprobs"
        assert len(tgi.generations) == before, "refused before TGI"
        # A TGI launched with a lower limit than the gateway was told: TGI's 422 is the 400, naming its limit.
        tgi.config.max_top_n_tokens = 2
        try:
            for stream in (False, True):
                with pytest.raises(openai.BadRequestError) as e:
                    c.chat.completions.create(
                        model=MODEL, messages=ASK, logprobs=True, top_logprobs=3, stream=stream
                    )
                assert e.value.param == "top_logprobs"
                assert "`top_n_tokens` must be >= 0 and <= 2. Given: 3" in e.value.message
        finally:
            tgi.config.max_top_n_tokens = 5
    with (
        gateway(tgi, Version.V3_LLAMA31, max_top_n_tokens=1) as url,
        openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0) as c,
    ):
        with pytest.raises(openai.BadRequestError) as e:  # the operator's --max-top-n-tokens
            c.chat.completions.create(model=MODEL, messages=ASK, logprobs=True, top_logprobs=2)
        assert "at most 1" in e.value.message
        r = c.chat.completions.create(model=MODEL, messages=ASK, logprobs=True, top_logprobs=1)
        assert all(len(t.top_logprobs) == 1 for t in r.choices[0].logprobs.content)
