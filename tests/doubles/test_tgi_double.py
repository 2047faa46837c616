"""The TGI test double (tests/fakes/tgi.py), driven over a real socket with httpx / httpx-sse."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import socket
import time

import httpx
import pytest
from httpx_sse import aconnect_sse, connect_sse

from tests.fakes.tgi import (
    Drop,
    Fail,
    FakeTGI,
    Gate,
    Incomplete,
    Pause,
    Token,
    count_tokens,
    special,
    tokenize_text,
    tokens,
)

HELLO = tokens("Hello", " world", "<|eot_id|>")


@pytest.fixture
def tgi():
    with FakeTGI(script=HELLO) as server:
        yield server


@pytest.fixture
def client(tgi):
    with httpx.Client(base_url=tgi.url, timeout=5) as c:
        yield c


def events_of(raw: bytes) -> list[dict]:
    """Split a raw SSE body into JSON payloads; asserts TGI's exact framing on the way."""
    assert raw.endswith(b"\n\n")
    out = []
    for block in raw[:-2].split(b"\n\n"):
        if block == b":":
            continue
        assert block.startswith(b"data: ") and b"\n" not in block, block
        out.append(json.loads(block[6:]))
    return out


def stream(client: httpx.Client, inputs: str = "Hi there", **parameters) -> tuple[httpx.Response, bytes]:
    with client.stream("POST", "/generate_stream", json={"inputs": inputs, "parameters": parameters}) as r:
        raw = b"".join(r.iter_raw())
    return r, raw


def compact(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


# ------------------------------------------------------------------------------------------ stream


def test_stream_bytes_are_exactly_tgi_framing(client):
    r, raw = stream(client, "Hi there", details=True)
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream"
    assert r.headers["cache-control"] == "no-cache"
    assert r.headers["x-accel-buffering"] == "no"
    assert r.headers["x-compute-characters"] == "8"
    assert r.headers["x-compute-type"] == "gpu+optimized"
    assert r.headers["transfer-encoding"] == "chunked"
    assert "x-prompt-tokens" not in r.headers and "x-generated-tokens" not in r.headers
    toks = [t.as_dict() for t in HELLO]
    expected = [
        {"index": 1, "token": toks[0], "generated_text": None, "details": None},
        {"index": 2, "token": toks[1], "generated_text": None, "details": None},
        {
            "index": 3,
            "token": toks[2],
            "generated_text": "Hello world",
            "details": {
                "finish_reason": "eos_token",
                "generated_tokens": 3,
                "seed": None,
                "input_length": count_tokens("Hi there"),
            },
        },
    ]
    assert raw == b"".join(b"data: " + compact(e) + b"\n\n" for e in expected)
    assert toks[2] == {"id": 128009, "text": "<|eot_id|>", "logprob": toks[2]["logprob"], "special": True}
    assert b"[DONE]" not in raw


def test_details_stay_null_unless_requested_and_httpx_sse_parses(tgi):
    with (
        httpx.Client(base_url=tgi.url) as c,
        connect_sse(c, "POST", "/generate_stream", json={"inputs": "Hi"}) as source,
    ):
        events = [json.loads(e.data) for e in source.iter_sse()]
    assert [e["index"] for e in events] == [1, 2, 3]
    assert events[-1]["generated_text"] == "Hello world"
    assert all(e["details"] is None for e in events)
    assert all(e["generated_text"] is None for e in events[:-1])


def test_special_tokens_are_sent_but_skipped_from_generated_text(tgi, client):
    tgi.script = tokenize_text('<|reserved_special_token_249|>get_weather\n{"city": "Hanoi"}<|eot_id|>')
    _, raw = stream(client, details=True)
    events = events_of(raw)
    first, last = events[0]["token"], events[-1]["token"]
    # Llama-3 default: reserved tokens are not in all_special_ids, yet skip_special_tokens drops them.
    assert first == {
        "id": 128254,
        "text": "<|reserved_special_token_249|>",
        "logprob": first["logprob"],
        "special": False,
    }
    assert last["text"] == "<|eot_id|>" and last["special"] is True
    assert events[-1]["generated_text"] == 'get_weather\n{"city": "Hanoi"}'
    assert "".join(e["token"]["text"] for e in events) == (
        '<|reserved_special_token_249|>get_weather\n{"city": "Hanoi"}<|eot_id|>'
    )
    # the other flavour, built by hand
    tgi.script = [special("<|reserved_special_token_249|>"), "f", Token("</s>", special=True)]
    events = events_of(stream(client, details=True)[1])
    assert [e["token"]["special"] for e in events] == [True, False, True]
    assert events[-1]["generated_text"] == "f"
    assert events[-1]["details"]["finish_reason"] == "eos_token"


def test_max_new_tokens_finishes_with_length_checked_before_eos(tgi, client):
    tgi.script = tokens("a", "b", "c", "d")
    events = events_of(stream(client, max_new_tokens=2, details=True)[1])
    assert [e["token"]["text"] for e in events] == ["a", "b"]
    assert events[-1]["generated_text"] == "ab"
    assert events[-1]["details"]["finish_reason"] == "length"
    tgi.script = HELLO  # EOS is the 3rd token and max_new_tokens == 3: TGI reports length
    events = events_of(stream(client, max_new_tokens=3, details=True)[1])
    assert events[-1]["details"]["finish_reason"] == "length"
    assert events[-1]["generated_text"] == "Hello world"


def test_script_without_eos_gets_one_appended(tgi, client):
    tgi.script = "one two"
    events = events_of(stream(client, details=True)[1])
    assert [e["token"]["text"] for e in events] == ["one", " two", "<|eot_id|>"]
    assert events[-1]["details"]["finish_reason"] == "eos_token"


def test_stop_sequences_match_decoded_text_and_stay_in_generated_text(tgi, client):
    tgi.script = tokens("The", " answer", " is", ":", " 42", " more")
    events = events_of(stream(client, stop=["is:"], details=True)[1])  # spans two tokens
    assert events[-1]["generated_text"] == "The answer is:"
    assert events[-1]["details"]["finish_reason"] == "stop_sequence"
    assert events[-1]["details"]["generated_tokens"] == 4
    # a stop that ends inside a token does not match (regex anchored at the end of the text)
    events = events_of(stream(client, stop=["ans"], details=True)[1])
    assert events[-1]["details"]["finish_reason"] == "eos_token"
    # Python's `$` also matches before one trailing newline
    tgi.script = tokens("x", "<|stop|>\n", "y")
    events = events_of(stream(client, stop=["<|stop|>"], details=True)[1])
    assert events[-1]["generated_text"] == "x<|stop|>\n"
    assert events[-1]["details"]["finish_reason"] == "stop_sequence"


def test_seed_is_echoed_only_when_sampling(client):
    def seed(**parameters):
        return events_of(stream(client, details=True, **parameters)[1])[-1]["details"]["seed"]

    assert seed(seed=42) is None
    assert seed(seed=42, do_sample=True) == 42
    assert seed(seed=7, temperature=0.5) == 7
    assert seed(top_k=10, seed=3) == 3
    random_seed = seed(do_sample=True)
    assert isinstance(random_seed, int) and 0 <= random_seed < 2**64


def test_script_sees_inputs_and_parameters_and_requests_are_recorded(tgi, client):
    seen = []

    def script(inputs, parameters):
        seen.append((inputs, parameters))
        return ["ok"]

    tgi.script = script
    events = events_of(stream(client, "Q: ", stop=["x"], max_new_tokens=5)[1])
    assert events[-1]["generated_text"] == "ok"
    assert seen == [("Q: ", {"stop": ["x"], "max_new_tokens": 5})]
    req = tgi.requests[-1]
    assert (req.method, req.path) == ("POST", "/generate_stream")
    assert req.json == {"inputs": "Q: ", "parameters": {"stop": ["x"], "max_new_tokens": 5}}
    assert req.headers["content-type"] == "application/json"
    gen = tgi.last_generation
    assert (gen.outcome, gen.finish_reason, gen.input_length) == (
        "completed",
        "eos_token",
        count_tokens("Q: "),
    )
    assert [t.text for t in gen.tokens] == ["ok", "<|eot_id|>"]


def test_default_script_echoes_the_prompt_tail():
    with FakeTGI() as tgi, httpx.Client(base_url=tgi.url) as c:
        body = c.post("/generate", json={"inputs": "<|begin_of_text|>say hi<|eot_id|>"}).json()
    assert body == {"generated_text": "echo: say hi"}


def test_parameters_the_double_does_not_model_are_refused_loudly(tgi, client):
    for path in ("/generate", "/generate_stream"):
        r = client.post(path, json={"inputs": "x", "parameters": {"truncate": 2}})
        assert (r.status_code, r.text) == (501, "the TGI double does not model parameters.truncate")
    assert [str(e) for e in tgi.errors] == ["the TGI double does not model parameters.truncate"] * 2
    assert not tgi.generations
    # their defaults are the absence of the parameter
    r = client.post("/generate", json={"inputs": "x", "parameters": {"best_of": None, "watermark": False}})
    assert r.status_code == 200


def test_adapter_id_selects_a_lora_adapter_it_was_started_with_and_falls_back_to_the_base_silently():
    entries = ("org/sql@v2", "local=/adapters/local", "plain")
    seen = []

    def script(inputs, parameters):
        seen.append(parameters.get("adapter_id"))
        return ["ok", "<|eot_id|>"]

    with FakeTGI(script=script, lora_adapters=entries) as tgi, httpx.Client(base_url=tgi.url) as c:
        asked = ["org/sql", "local", "plain", "org/sql@v2", "unknown", None]
        for adapter_id in asked:
            for path in ("/generate", "/generate_stream"):
                r = c.post(path, json={"inputs": "x", "parameters": {"adapter_id": adapter_id}})
                assert r.status_code == 200, r.text
        used = [g.adapter for g in tgi.generations]
        r = c.post("/generate", json={"inputs": "x", "parameters": {"adapter_id": 1}})
    assert used == [a for a in ["org/sql", "local", "plain", None, None, None] for _ in range(2)]
    assert seen == [a for a in asked for _ in range(2)], "the script sees the id as sent"
    assert r.status_code == 422
    assert r.text.endswith("parameters.adapter_id: invalid type: integer `1`, expected a string")
    assert not tgi.errors


# ------------------------------------------------------------------------------------------ validation

LIMITS = {"max_input_tokens": 10, "max_total_tokens": 16, "max_stop_sequences": 2, "max_top_n_tokens": 3}
VALIDATION_CASES = [
    ({"temperature": 0}, "`temperature` must be strictly positive"),
    ({"temperature": -1.0}, "`temperature` must be strictly positive"),
    ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
    ({"top_p": 0}, "`top_p` must be > 0.0 and < 1.0"),
    ({"top_k": 0}, "`top_k` must be strictly positive"),
    ({"repetition_penalty": 0}, "`repetition_penalty` must be strictly positive"),
    ({"frequency_penalty": 2.5}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
    ({"stop": ["a", "b", "c"]}, "`stop` supports up to 2 stop sequences. Given: 3"),
    ({"top_n_tokens": 4}, "`top_n_tokens` must be >= 0 and <= 3. Given: 4"),
    (
        {"max_new_tokens": 14},
        "`inputs` tokens + `max_new_tokens` must be <= 16. Given: 3 `inputs` tokens and 14 `max_new_tokens`",
    ),
]


@pytest.fixture(scope="module")
def limited():
    with FakeTGI(script=HELLO, **LIMITS) as server, httpx.Client(base_url=server.url) as c:
        yield server, c


@pytest.mark.parametrize(("parameters", "message"), VALIDATION_CASES)
def test_validation_errors_on_both_routes(limited, parameters, message):
    _, c = limited
    full = f"Input validation error: {message}"
    r, raw = stream(c, "Hi there", **parameters)  # 3 input tokens
    assert r.status_code == 200
    assert raw == b"data: " + compact({"error": full, "error_type": "validation"}) + b"\n\n"
    r = c.post("/generate", json={"inputs": "Hi there", "parameters": parameters})
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"error": full, "error_type": "validation"}
    assert not any(h.startswith("x-") for h in r.headers)


def test_top_n_tokens_in_stream_events_and_generate_details(tgi, client):
    """As TGI: `top_tokens` after the token in every event (the final one too) and one list per token in
    /generate's details, absent without top_n_tokens; a script's own top tokens are sent as given."""
    alt = Token(" earth", logprob=-2.5)
    tgi.script = [Token("Hello", logprob=-0.25), Token(" world", logprob=-0.5, top=(Token(" world", logprob=-0.5), alt)),
                  special("<|eot_id|>")]  # fmt: skip
    r, raw = stream(client, details=True, top_n_tokens=2)
    assert r.status_code == 200
    assert raw.startswith(b'data: {"index":1,"token":{"id":')
    events = events_of(raw)
    assert [list(e) for e in events] == [["index", "token", "top_tokens", "generated_text", "details"]] * 3
    assert [e["token"]["logprob"] for e in events[:2]] == [-0.25, -0.5]
    assert [[(t["text"], t["logprob"]) for t in e["top_tokens"]] for e in events[:2]] == [
        [("Hello", -0.25), ("Hello~1", -1.25)],
        [(" world", -0.5), (" earth", -2.5)],
    ]
    assert len(events[2]["top_tokens"]) == 2
    body = client.post(
        "/generate", json={"inputs": "Hi", "parameters": {"details": True, "top_n_tokens": 2}}
    ).json()
    assert [[t["text"] for t in step] for step in body["details"]["top_tokens"]] == [
        ["Hello", "Hello~1"], [" world", " earth"], ["<|eot_id|>", "<|eot_id|>~1"]]  # fmt: skip
    assert list(body["details"]) == [
        "finish_reason",
        "generated_tokens",
        "seed",
        "prefill",
        "tokens",
        "top_tokens",
    ]
    for zero in ({}, {"top_n_tokens": 0}, {"top_n_tokens": None}):
        assert (
            "top_tokens"
            not in client.post(
                "/generate", json={"inputs": "Hi", "parameters": {"details": True, **zero}}
            ).json()["details"]
        )
        assert all("top_tokens" not in e for e in events_of(stream(client, details=True, **zero)[1]))


def test_input_length_rules(limited):
    tgi, c = limited
    long_input = "x" * 40  # BOS + 10 tokens = 11 > max_input_tokens
    assert count_tokens(long_input) == 11
    r = c.post("/generate", json={"inputs": long_input, "parameters": {"max_new_tokens": 1}})
    assert r.json()["error"] == "Input validation error: `inputs` must have less than 10 tokens. Given: 11"
    r = c.post("/generate", json={"inputs": long_input, "parameters": {"max_new_tokens": 6}})
    assert r.json()["error"] == (
        "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 16. "
        "Given: 11 `inputs` tokens and 6 `max_new_tokens`"
    )
    # no max_new_tokens: defaults to what is left (16 - 3) and passes
    r = c.post("/generate", json={"inputs": "Hi there", "parameters": {}})
    assert r.status_code == 200
    r, raw = stream(c, "")
    assert events_of(raw) == [
        {"error": "Input validation error: `inputs` cannot be empty", "error_type": "validation"}
    ]
    assert tgi.generations[-1].outcome == "validation"


def test_extractor_rejections_are_plain_text(client, tgi):
    r = client.post("/generate_stream", content=b'{"inputs": "x"}')
    assert (r.status_code, r.text) == (415, "Expected request with `Content-Type: application/json`")
    r = client.post("/generate", content=b'{"inputs": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.headers["content-type"].startswith("text/plain")
    assert r.text.startswith("Failed to parse the request body as JSON: ")
    for body, detail in [
        ({"parameters": {}}, "missing field `inputs`"),
        ({"inputs": 5}, "inputs: invalid type: integer `5`, expected a string"),
        (
            {"inputs": "x", "parameters": {"stop": None}},
            "parameters.stop: invalid type: null, expected a sequence",
        ),
        (
            {"inputs": "x", "parameters": {"max_new_tokens": 5.0}},
            "parameters.max_new_tokens: invalid type: floating point `5.0`, expected u32",
        ),
        (
            {"inputs": "x", "parameters": {"max_new_tokens": -1}},
            "parameters.max_new_tokens: invalid value: integer `-1`, expected u32",
        ),
        (
            {"inputs": "x", "parameters": {"details": None}},
            "parameters.details: invalid type: null, expected a boolean",
        ),
    ]:
        for path in ("/generate", "/generate_stream"):
            r = client.post(path, json=body)
            assert r.status_code == 422, (path, body)
            assert r.headers["content-type"].startswith("text/plain")
            assert r.text == f"Failed to deserialize the JSON body into the target type: {detail}"
    # unknown fields are ignored
    assert (
        client.post("/generate", json={"inputs": "x", "parameters": {"bogus": 1}, "extra": 2}).status_code
        == 200
    )
    assert all(g.route == "generate" for g in tgi.generations)  # rejections never reached generation


# ------------------------------------------------------------------------------------------ errors


def test_overload_counts_streams_and_generate_alike():
    gate = Gate()
    with (
        FakeTGI(script=["a", gate, "b"], max_concurrent_requests=2) as tgi,
        httpx.Client(base_url=tgi.url, timeout=5) as c,
    ):
        held = [c.stream("POST", "/generate_stream", json={"inputs": "x"}) for _ in range(2)]
        responses = [h.__enter__() for h in held]
        assert tgi.wait_until(lambda: tgi.in_flight == 2)
        assert tgi.streams_open == 2
        _, raw = stream(c)
        assert raw == b'data: {"error":"Model is overloaded","error_type":"overloaded"}\n\n'
        r = c.post("/generate", json={"inputs": "x"})
        assert (r.status_code, r.json()) == (
            429,
            {"error": "Model is overloaded", "error_type": "overloaded"},
        )
        gate.open()
        for h, resp in zip(held, responses):
            assert events_of(resp.read())[-1]["generated_text"] == "ab"
            h.__exit__(None, None, None)
        assert tgi.wait_until(lambda: tgi.in_flight == 0)
        assert [g.outcome for g in tgi.generations] == ["completed", "completed", "overloaded", "overloaded"]
        assert tgi.peak_in_flight == 2


def test_injected_generation_error_mid_stream(tgi, client):
    tgi.fail_next(after_tokens=2, message="CUDA out of memory")
    _, raw = stream(client)
    events = events_of(raw)
    assert [e.get("index") for e in events] == [1, 2, None]
    assert events[-1] == {
        "error": "Request failed during generation: CUDA out of memory",
        "error_type": "generation",
    }
    assert tgi.last_generation.outcome == "generation"
    # only the next generation fails
    assert events_of(stream(client)[1])[-1]["generated_text"] == "Hello world"
    tgi.fail_next(after_tokens=1, message="boom")
    r = client.post("/generate", json={"inputs": "x"})
    assert (r.status_code, r.json()) == (
        424,
        {"error": "Request failed during generation: boom", "error_type": "generation"},
    )
    # the same from inside a script
    tgi.script = ["a", Fail("shard died")]
    events = events_of(stream(client)[1])
    assert events[-1]["error"] == "Request failed during generation: shard died" and len(events) == 2


def test_incomplete_generation(tgi, client):
    tgi.script = ["a", Incomplete()]
    events = events_of(stream(client)[1])
    assert events[-1] == {
        "error": "Incomplete generation stream",
        "error_type": "incomplete_generation_stream",
    }
    r = client.post("/generate", json={"inputs": "x"})
    assert (r.status_code, r.json()) == (
        500,
        {"error": "Incomplete generation", "error_type": "incomplete_generation"},
    )


def test_drop_resets_the_connection_like_a_dying_tgi(tgi, client):
    tgi.script = ["a", Drop()]
    with client.stream("POST", "/generate_stream", json={"inputs": "x"}) as r:
        assert r.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):  # chunked body never terminated
            r.read()
    assert len(tgi.last_generation.events) == 1
    with pytest.raises(httpx.RemoteProtocolError):
        client.post("/generate", json={"inputs": "x"})
    assert [g.outcome for g in tgi.generations] == ["dropped", "dropped"]
    tgi.script = HELLO
    assert client.post("/generate", json={"inputs": "x"}).status_code == 200  # the double itself is fine
    assert not tgi.errors


def test_script_exceptions_become_generation_errors_and_are_kept(tgi, client):
    def broken(inputs, parameters):
        raise ValueError("oops")

    tgi.script = broken
    events = events_of(stream(client)[1])
    assert events[0]["error_type"] == "generation" and "oops" in events[0]["error"]
    assert isinstance(tgi.errors[0], ValueError)


# ------------------------------------------------------------------------------------------ /generate etc.


def test_generate_json_details_and_headers(tgi, client):
    r = client.post("/generate", json={"inputs": "Hi there", "parameters": {"details": True}})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert list(body) == ["generated_text", "details"]
    assert body["generated_text"] == "Hello world"
    assert list(body["details"]) == ["finish_reason", "generated_tokens", "seed", "prefill", "tokens"]
    assert body["details"]["tokens"] == [t.as_dict() for t in HELLO]
    assert (body["details"]["finish_reason"], body["details"]["prefill"]) == ("eos_token", [])
    h = r.headers
    assert h["x-prompt-tokens"] == str(count_tokens("Hi there"))
    assert h["x-generated-tokens"] == "3"
    assert h["x-compute-characters"] == "8"
    for name in (
        "x-compute-type",
        "x-compute-time",
        "x-total-time",
        "x-validation-time",
        "x-queue-time",
        "x-inference-time",
        "x-time-per-token",
    ):
        assert name in h
    float(h["x-compute-time"])
    r = client.post("/generate", json={"inputs": "Hi there"})
    assert r.json() == {"generated_text": "Hello world"}  # details omitted, not null
    first, second = tgi.requests
    assert first.client == second.client  # one kept-alive connection


def test_health_info_and_api_key():
    with (
        FakeTGI(
            max_input_tokens=4095,
            max_total_tokens=4096,
            max_concurrent_requests=9,
            model_id="meetkai/functionary-small-v2.5",
            api_key="sekret",
        ) as tgi,
        httpx.Client(base_url=tgi.url) as c,
    ):
        r = c.get("/health")
        assert (r.status_code, r.content) == (200, b"")
        tgi.config.healthy = False
        r = c.get("/health")
        assert (r.status_code, r.json()) == (503, {"error": "unhealthy", "error_type": "healthcheck"})
        info = c.get("/info").json()
        assert list(info) == [
            "model_id",
            "model_sha",
            "model_pipeline_tag",
            "max_concurrent_requests",
            "max_best_of",
            "max_stop_sequences",
            "max_input_tokens",
            "max_total_tokens",
            "validation_workers",
            "max_client_batch_size",
            "router",
            "version",
            "sha",
            "docker_label",
        ]
        assert (
            info["model_id"],
            info["max_input_tokens"],
            info["max_total_tokens"],
            info["max_concurrent_requests"],
            info["router"],
        ) == ("meetkai/functionary-small-v2.5", 4095, 4096, 9, "text-generation-router")
        r = c.post("/generate", json={"inputs": "x"})
        assert (r.status_code, r.content) == (401, b"")
        auth = {"authorization": "BEARER SEKRET"}  # compared case-insensitively
        r = c.post("/generate", json={"inputs": "a<|eot_id|>b"}, headers=auth)
        assert r.headers["x-prompt-tokens"] == "4"  # BOS, "a", <|eot_id|>, "b"
        assert count_tokens("Hello world!") == 4  # BOS, "Hell", "o wo", "rld!"
        assert c.get("/nope").status_code == 404 and c.get("/generate").status_code == 405


def test_load_delay_refuses_connections_until_ready():
    tgi = FakeTGI(load_delay=0.3)
    t0 = time.monotonic()
    tgi.start()
    try:
        assert not tgi.ready
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{tgi.url}/health")
        tgi.wait_ready()
        assert tgi.ready
        assert time.monotonic() - t0 >= 0.3
        assert httpx.get(f"{tgi.url}/health").status_code == 200
    finally:
        tgi.stop()


# ------------------------------------------------------------------------------------------ timing


def test_token_delay_is_honoured_after_the_first_token():
    with (
        FakeTGI(script=tokens("a", "b", "c", "d"), token_delay=0.05) as tgi,
        httpx.Client(base_url=tgi.url) as c,
    ):
        arrivals = []
        t0 = time.monotonic()
        with connect_sse(c, "POST", "/generate_stream", json={"inputs": "x"}) as source:
            for _ in source.iter_sse():
                arrivals.append(time.monotonic() - t0)
    assert len(arrivals) == 5
    assert arrivals[0] < 0.04
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert all(0.035 <= g < 0.2 for g in gaps), gaps
    assert 0.19 <= arrivals[-1] < 0.6


def test_keepalive_comments_during_long_waits(tgi, client):
    tgi.config.keepalive_interval = 0.05
    tgi.script = ["a", Pause(0.18), "b"]
    _, raw = stream(client)
    assert raw.count(b":\n\n") >= 2
    assert raw.startswith(b"data: ") and b'"text":"a"' in raw.split(b":\n\n")[0]
    events = events_of(raw)
    assert events[-1]["generated_text"] == "ab"
    with connect_sse(client, "POST", "/generate_stream", json={"inputs": "x"}) as source:
        assert [json.loads(e.data)["index"] for e in source.iter_sse()] == [1, 2, 3]


# ------------------------------------------------------------------------------------------ disconnects


def test_client_disconnect_is_noticed_promptly_and_generation_stops():
    with FakeTGI(script=["t"] * 500, token_delay=0.02) as tgi, httpx.Client(base_url=tgi.url) as c:
        with c.stream("POST", "/generate_stream", json={"inputs": "x"}) as r:
            lines = r.iter_lines()
            seen = [line for line, _ in zip(lines, range(5)) if line.startswith("data:")]
            assert len(seen) == 3
            closed_at = time.monotonic()
        gen = tgi.last_generation
        assert tgi.wait_until(lambda: gen.disconnected, timeout=1.0)
        assert gen.disconnected_at - closed_at < 0.1
        assert gen.outcome == "disconnected"
        assert tgi.wait_until(lambda: tgi.in_flight == 0 and tgi.streams_open == 0, timeout=0.5)
        sent = len(gen.tokens)
        time.sleep(0.1)
        assert len(gen.tokens) == sent < 10  # no more tokens after the disconnect


def test_disconnect_while_paused_or_gated_and_on_generate():
    gate = Gate()
    with FakeTGI(script=["a", gate, "b"]) as tgi, httpx.Client(base_url=tgi.url) as c:
        with c.stream("POST", "/generate_stream", json={"inputs": "x"}) as r:
            next(r.iter_raw())
            closed_at = time.monotonic()
        gen = tgi.last_generation
        assert tgi.wait_until(lambda: gen.disconnected, timeout=1.0)
        assert gen.disconnected_at - closed_at < 0.1
        tgi.script = ["a", Pause(math.inf)]
        with pytest.raises(httpx.ReadTimeout):
            c.post("/generate", json={"inputs": "x"}, timeout=0.2)
        gen = tgi.last_generation
        assert tgi.wait_until(lambda: gen.disconnected, timeout=1.0)
        assert gen.outcome == "disconnected" and tgi.in_flight == 0


def test_generate_disconnect_is_observed_like_a_streams():
    """/generate answers only at the end; a client that closes its connection before is noticed at once,
    whether the generation waits on a gate or sleeps between tokens, and generation stops."""
    with FakeTGI() as tgi:
        for script, delay in ((["a", Gate(), "b"], 0.0), (["t"] * 500, 0.02)):
            tgi.script, tgi.config.token_delay = script, delay
            with socket.create_connection(("127.0.0.1", tgi.port)) as sock:
                body = b'{"inputs": "x", "parameters": {"details": true}}'
                sock.sendall(b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
                assert tgi.wait_until(
                    lambda: tgi.generate_open == 1 and len(tgi.last_generation.tokens) >= 1, 2
                )
                assert tgi.in_flight == 1
                sock.shutdown(socket.SHUT_RDWR)
                closed_at = time.monotonic()
            gen = tgi.last_generation
            assert tgi.wait_until(lambda g=gen: g.disconnected, timeout=1.0)
            assert gen.disconnected_at - closed_at < 0.1
            assert tgi.wait_until(lambda: tgi.generate_open == 0 and tgi.in_flight == 0, timeout=0.5)
            assert (gen.route, gen.outcome) == ("generate", "disconnected")
            sent = len(gen.tokens)
            time.sleep(0.1)
            assert len(gen.tokens) == sent < 10  # no more tokens after the disconnect


def test_generate_honours_the_token_delay():
    with (
        FakeTGI(script=tokens("a", "b", "c", "d"), token_delay=0.05) as tgi,
        httpx.Client(base_url=tgi.url) as c,
    ):
        t0 = time.monotonic()
        r = c.post("/generate", json={"inputs": "x", "parameters": {"details": True}})
        elapsed = time.monotonic() - t0
    assert [t["text"] for t in r.json()["details"]["tokens"]] == ["a", "b", "c", "d", "<|eot_id|>"]
    assert r.json()["details"]["tokens"][-1]["special"] is True
    assert 0.19 <= elapsed < 0.6  # 4 × 0.05


def test_forget_finished_keeps_running_generations_only():
    gate = Gate()
    with FakeTGI(script=HELLO) as tgi, httpx.Client(base_url=tgi.url) as c:
        c.post("/generate", json={"inputs": "x"})
        tgi.script = ["a", gate, "b"]
        with c.stream("POST", "/generate_stream", json={"inputs": "y"}) as r:
            raw = r.iter_raw()
            next(raw)
            done = tgi.forget_finished()
            assert [g.inputs for g in done] == ["x"] and done[0].outcome == "completed"
            assert [g.inputs for g in tgi.generations] == ["y"] and tgi.requests == []
            gate.open()
            assert b"generated_text" in b"".join(raw)
        assert tgi.wait_until(lambda: tgi.last_generation.done)
        assert [g.inputs for g in tgi.forget_finished()] == ["y"] and tgi.generations == []


def test_stop_is_bounded_even_with_streams_hanging():
    tgi = FakeTGI(script=["a", Gate()]).start()
    c = httpx.Client(base_url=tgi.url)
    r = c.send(c.build_request("POST", "/generate_stream", json={"inputs": "x"}), stream=True)
    chunks = r.iter_raw()  # keep a reference: a discarded iterator closes the response
    next(chunks)
    t0 = time.monotonic()
    tgi.stop()
    assert time.monotonic() - t0 < 1.5
    assert not tgi.ready
    assert tgi.last_generation.outcome == "aborted"
    r.close()
    c.close()
    with socket.socket() as s:  # the port is closed again
        assert s.connect_ex(("127.0.0.1", tgi.port)) != 0


# ------------------------------------------------------------------------------------------ load


def test_200_concurrent_streams_complete():
    n = 200
    script = tokenize_text("one two three four five six seven eight")

    async def run(url: str) -> list[str]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10) as c:

            async def one(i: int) -> str:
                async with aconnect_sse(
                    c,
                    "POST",
                    "/generate_stream",
                    json={"inputs": f"prompt {i}", "parameters": {"details": True}},
                ) as source:
                    events = [json.loads(e.data) async for e in source.aiter_sse()]
                assert [e["index"] for e in events] == list(range(1, 10))
                return events[-1]["generated_text"]

            return await asyncio.gather(*(one(i) for i in range(n)))

    with FakeTGI(script=script, token_delay=0.01, max_concurrent_requests=256) as tgi:
        t0 = time.monotonic()
        texts = asyncio.run(run(tgi.url))
        elapsed = time.monotonic() - t0
        assert texts == ["one two three four five six seven eight"] * n
        assert all(g.outcome == "completed" for g in tgi.generations) and len(tgi.generations) == n
        assert tgi.peak_in_flight >= n // 2
        assert tgi.in_flight == 0
    assert elapsed < 8


def test_a_client_that_does_not_read_holds_its_generation_back():
    """The stream waits for a reader that falls behind (as TGI's backs up) instead of buffering the answer."""
    script = ["x" * 2500] * 8000  # 20 MB: more than the socket buffers hold
    with FakeTGI(script=script) as tgi, socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", tgi.port))
        body = b'{"inputs": "x"}'
        sock.sendall(b"POST /generate_stream HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        assert tgi.wait_until(lambda: tgi.generations and len(tgi.last_generation.tokens) > 10)
        time.sleep(0.2)
        assert len(tgi.last_generation.tokens) < 4000 and tgi.last_generation.outcome == "running"
        sock.settimeout(5)
        tail = b""
        while not tail.endswith(b"\r\n0\r\n\r\n"):
            data = sock.recv(1 << 20)
            assert data
            tail = (tail + data)[-16:]
        assert tgi.last_generation.outcome == "completed" and len(tgi.last_generation.tokens) == 8001
