"""tgi_gateway.tgi.protocol, sans-IO: TGI's `logprob` and `top_tokens` read when asked (stream events, split
anywhere; /generate's details), ignored otherwise; /info's `max_top_n_tokens` when a TGI reports it."""

from __future__ import annotations

import dataclasses
import json

from tgi_gateway.tgi.protocol import StreamDecoder, StreamEnd, Token, parse_generation, parse_info


def tok(text: str, logprob: float | None, id: int = 5, special: bool = False) -> dict:
    return {"id": id, "text": text, "logprob": logprob, "special": special}


TOP_1 = [tok("Hi", -0.1), tok("Hello", -2.5, 6)]
TOP_2 = [tok("<|eot_id|>", -0.2, 128009, True), tok(" there", -1.75, 7)]
STREAM = (
    b"data: "
    + json.dumps(
        {"index": 1, "token": tok("Hi", -0.1), "top_tokens": TOP_1, "generated_text": None, "details": None}
    ).encode()
    + b"\n\n:\n\ndata: "
    + json.dumps(
        {
            "index": 2,
            "token": tok("<|eot_id|>", None, 128009, True),
            "top_tokens": TOP_2,
            "generated_text": "Hi",
            "details": {"finish_reason": "eos_token", "generated_tokens": 2, "seed": None, "input_length": 5},
        }
    ).encode()
    + b"\n\n"
)
SCORED = [
    Token("Hi", False, 5, -0.1, (("Hi", -0.1), ("Hello", -2.5))),
    Token("<|eot_id|>", True, 128009, None, (("<|eot_id|>", -0.2), (" there", -1.75))),
    StreamEnd("eos_token", 2, 5, "Hi"),
]


def test_stream_tokens_carry_logprob_and_top_tokens_for_every_split():
    for cut in range(len(STREAM) + 1):
        decoder = StreamDecoder(logprobs=True)
        assert decoder.feed(STREAM[:cut]) + decoder.feed(STREAM[cut:]) == SCORED, cut


def test_without_logprobs_they_are_not_read():
    items = StreamDecoder().feed(STREAM)
    assert items == [Token("Hi", False, 5), Token("<|eot_id|>", True, 128009), SCORED[2]]
    assert all(t.logprob is None and t.top == () for t in items[:2])


def test_stream_event_without_top_tokens():
    event = {"index": 1, "token": tok("Hi", -0.5), "generated_text": None, "details": None}
    assert StreamDecoder(logprobs=True).feed(b"data: " + json.dumps(event).encode() + b"\n\n") == [
        Token("Hi", False, 5, -0.5, ())
    ]


def generate_body(top_tokens: object = None) -> bytes:
    details = {
        "finish_reason": "eos_token",
        "generated_tokens": 2,
        "seed": None,
        "prefill": [],
        "tokens": [tok("Hi", -0.1), tok("<|eot_id|>", -0.2, 128009, True)],
    }
    if top_tokens is not None:
        details["top_tokens"] = top_tokens
    return json.dumps({"generated_text": "Hi", "details": details}).encode()


def test_generate_tokens_carry_logprob_and_their_step_of_top_tokens():
    g = parse_generation(generate_body([TOP_1, TOP_2]), "5", logprobs=True)
    assert [(t.text, t.logprob, t.top) for t in g.tokens] == [
        ("Hi", -0.1, (("Hi", -0.1), ("Hello", -2.5))),
        ("<|eot_id|>", -0.2, (("<|eot_id|>", -0.2), (" there", -1.75))),
    ]
    # no top_tokens (top_n_tokens 0), or not one list per token: logprobs only
    for top in (None, [TOP_1], "junk"):
        g = parse_generation(generate_body(top), "5", logprobs=True)
        assert [(t.logprob, t.top) for t in g.tokens] == [(-0.1, ()), (-0.2, ())]
    assert [(t.logprob, t.top) for t in parse_generation(generate_body([TOP_1, TOP_2]), "5").tokens] == [
        (None, ()),
        (None, ()),
    ]


def test_info_max_top_n_tokens_only_when_reported():
    assert parse_info(b'{"model_id": "m"}').max_top_n_tokens is None
    assert parse_info(b'{"model_id": "m", "max_top_n_tokens": 10}').max_top_n_tokens == 10
    for junk in (b"true", b'"10"', b"-1", b"1.5"):
        assert parse_info(b'{"model_id": "m", "max_top_n_tokens": ' + junk + b"}").max_top_n_tokens is None
    reported = parse_info(b'{"model_id": "m", "max_top_n_tokens": 3}')
    assert reported != dataclasses.replace(reported, max_top_n_tokens=None), "a change of limit is a change"
