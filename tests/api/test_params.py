"""api/params, sans-IO: what logprobs and n become (400s with their `param`, TGI's `top_n_tokens`, the
choices' seeds)."""

from __future__ import annotations

import pytest

from tgi_gateway.api.models import ChatCompletionRequest
from tgi_gateway.api.params import (
    MAX_N,
    check_supported,
    check_top_logprobs,
    choice_parameters,
    tgi_parameters,
)
from tgi_gateway.errors import InvalidRequestError

ASK = [{"role": "user", "content": "hi"}]


def request(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=ASK, **fields)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": MAX_N + 1}, "n"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"top_logprobs": 0, "logprobs": False}, "top_logprobs"),
    ],
)
def test_refused(fields, param):
    with pytest.raises(InvalidRequestError) as e:
        check_supported(request(**fields))
    assert e.value.param == param


@pytest.mark.parametrize(
    "fields",
    [{"n": 1}, {"n": MAX_N}, {"logprobs": True}, {"logprobs": True, "top_logprobs": 20}, {"logprobs": False},
     {"top_logprobs": None}],
)  # fmt: skip
def test_accepted(fields):
    check_supported(request(**fields))


def test_top_logprobs_limit_names_the_limit():
    check_top_logprobs(request(logprobs=True, top_logprobs=5), 5)
    check_top_logprobs(request(logprobs=True), 0)
    with pytest.raises(InvalidRequestError) as e:
        check_top_logprobs(request(logprobs=True, top_logprobs=6), 5)
    assert (
        e.value.param == "top_logprobs" and "at most 5" in e.value.message and "Given: 6" in e.value.message
    )


def test_top_n_tokens_only_for_a_positive_top_logprobs():
    assert tgi_parameters(request(logprobs=True, top_logprobs=3), (), 4)["top_n_tokens"] == 3
    for fields in ({"logprobs": True}, {"logprobs": True, "top_logprobs": 0}, {}):
        assert "top_n_tokens" not in tgi_parameters(request(**fields), (), 4)


def test_choice_seeds():
    params = {"seed": 7, "details": True}
    assert [choice_parameters(params, k)["seed"] for k in range(3)] == [7, 8, 9]
    assert choice_parameters(params, 0) is params and params["seed"] == 7, "choice 0 sends the request's own"
    assert choice_parameters({"seed": 2**64 - 1}, 1)["seed"] == 0, "TGI's seed is a u64"
    assert "seed" not in choice_parameters({"details": True}, 2)
