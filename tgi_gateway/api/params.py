"""OpenAI sampling fields → TGI `/generate_stream` and `/generate` parameters (PROTOCOL.md §2.1), and what we refuse.

TGI's rules differ from OpenAI's in ways that matter:

* `temperature: 0` means greedy in OpenAI; TGI rejects temperature ≤ 0, so greedy is *no* temperature and
  `do_sample: false` (and `top_p`/`top_k`, which would turn sampling back on, are not sent). Like OpenAI, a
  request without `temperature` samples at temperature 1 (`do_sample: true`).
* TGI requires `top_p` strictly inside (0, 1); `top_p: 1` means "no nucleus filtering", so it is not sent.
* `max_completion_tokens` (or the deprecated `max_tokens`) is TGI's `max_new_tokens`; without it TGI
  allows everything up to its `max_total_tokens`.
* `frequency_penalty` is passed as is: TGI defines it like OpenAI (a penalty proportional to the count of
  a token so far, range [-2, 2]). TGI has no presence penalty, so a non-zero `presence_penalty` is refused
  rather than silently ignored; `repetition_penalty` (TGI's multiplicative penalty) is accepted as an
  extension, as is `top_k`.
* Stop strings: the template's stop tokens first (they end every answer), then the client's, cut to TGI's
  `max_stop_sequences`. The client's sequences are applied by the gateway too (:mod:`.stop_sequences`),
  so one that does not fit is still honoured.
* `model` naming one of the LoRA adapters TGI was started with is TGI's `adapter_id` (the base model's
  name sends none). TGI answers an unknown `adapter_id` with the base model, so the gateway only sends the
  names it was configured with (`--lora-adapters`); any other is a 404 before this point.
* `logprobs`: TGI sends every token's `logprob` anyway (`details`); `top_logprobs` is TGI's `top_n_tokens`,
  refused above TGI's `--max-top-n-tokens` (:func:`check_top_logprobs`), sent only when positive.
* `n`: one TGI request per choice (TGI has no `n`; `best_of` is refused when streaming), at most
  :data:`MAX_N`; with a `seed`, choice `k` gets `seed + k` (:func:`choice_parameters`) so that the answers
  differ and each is reproducible.
* `grammar`: TGI's constraint for what the client asked to be exact (`response_format` JSON, a named or
  `required` tool choice), decided by :func:`tgi_gateway.grammar.constrain` and passed through here.
* `details: true` always: the stream's final event then carries `input_length` and `generated_tokens`
  (usage), and `/generate`'s answer its `details.tokens` (the per-token texts, special tokens included).
  No BOS is ever in the text: TGI adds it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import ContextLengthExceededError, InvalidRequestError
from .models import ChatCompletionRequest

__all__ = [
    "MAX_CLIENT_STOPS",
    "MAX_N",
    "check_supported",
    "check_token_budget",
    "check_top_logprobs",
    "choice_parameters",
    "prompt_token_limit",
    "tgi_parameters",
]

MAX_CLIENT_STOPS = 4  # OpenAI's documented limit
# Each choice is a TGI generation holding a batch slot (TGI's default max_concurrent_requests is 128, shared
# by every client), while the per-key limit counts the request once: 8 choices keep one request's share of
# TGI bounded. OpenAI's own limit is 128.
MAX_N = 8


def check_supported(req: ChatCompletionRequest) -> None:
    """Refuse, with a 400 naming the field, what this gateway cannot honour."""
    if req.n is not None and req.n > MAX_N:
        raise InvalidRequestError(
            f"'n' must be at most {MAX_N} (each choice is one generation in TGI). Given: {req.n}.", param="n"
        )
    if req.presence_penalty:
        raise InvalidRequestError(
            "presence_penalty is not supported by TGI; use frequency_penalty (or the repetition_penalty "
            "extension) instead.",
            param="presence_penalty",
        )
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidRequestError(
            "Invalid value for 'top_logprobs': it is only allowed when 'logprobs' is true.",
            param="top_logprobs",
        )
    if req.logit_bias:
        raise InvalidRequestError("logit_bias is not supported by TGI.", param="logit_bias")
    stops = req.stop_list
    if len(stops) > MAX_CLIENT_STOPS:
        raise InvalidRequestError(
            f"'stop' supports up to {MAX_CLIENT_STOPS} sequences. Given: {len(stops)}.", param="stop"
        )
    if any(not s for s in stops):
        raise InvalidRequestError("'stop' sequences must not be empty.", param="stop")


def check_top_logprobs(req: ChatCompletionRequest, limit: int) -> None:
    """Refuse a `top_logprobs` above TGI's `--max-top-n-tokens` (`limit`): TGI would refuse its
    `top_n_tokens` with a 422 after the round trip; this is the 400, naming the limit, without it."""
    wanted = req.top_logprobs if req.logprobs else None
    if wanted is not None and wanted > limit:
        raise InvalidRequestError(
            f"'top_logprobs' must be at most {limit} with this server (TGI's --max-top-n-tokens). Given: {wanted}.",
            param="top_logprobs",
        )


def choice_parameters(parameters: dict[str, Any], index: int) -> dict[str, Any]:
    """The parameters of choice `index` of an `n` > 1 request: with a `seed`, `seed + index` (modulo TGI's
    u64), so that choices differ and each is reproducible; otherwise TGI draws a seed per request."""
    seed = parameters.get("seed")
    if index == 0 or seed is None:
        return parameters
    return {**parameters, "seed": (seed + index) % 2**64}


def check_token_budget(req: ChatCompletionRequest, max_total_tokens: int) -> None:
    """Refuse a `max_tokens` that no prompt leaves room for: TGI needs prompt + `max_new_tokens` <= its
    `max_total_tokens`, and a prompt is at least one token. TGI would refuse it as well, but only once the
    request was sent to it; this is the same 400 (`context_length_exceeded`), without the round trip."""
    wanted = req.max_new_tokens
    if wanted is not None and wanted >= max_total_tokens:
        field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        raise ContextLengthExceededError(
            f"'{field}' is too large: {wanted}. This model's maximum context length is {max_total_tokens} "
            "tokens, prompt and completion together.",
            param=field,
        )


def prompt_token_limit(req: ChatCompletionRequest, max_input_tokens: int, max_total_tokens: int) -> int:
    """The most tokens `req`'s prompt may have for TGI to take it: at most `max_input_tokens`, and with
    `max_tokens` at most ``max_total_tokens - max_tokens`` (TGI counts its BOS in the prompt)."""
    wanted = req.max_new_tokens
    return max_input_tokens if wanted is None else min(max_input_tokens, max_total_tokens - wanted)


def tgi_parameters(
    req: ChatCompletionRequest,
    template_stops: Sequence[str],
    max_stop_sequences: int,
    *,
    adapter_id: str | None = None,
    grammar: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The `parameters` object of a TGI generate request for `req` (already checked); `adapter_id`: the
    LoRA adapter the request names (None: the base model); `grammar`: TGI's constraint when one
    constrains the answer (:func:`tgi_gateway.grammar.constrain`)."""
    greedy = req.temperature == 0
    params: dict[str, Any] = {"details": True, "do_sample": not greedy}
    if not greedy:
        if req.temperature is not None and req.temperature != 1:
            params["temperature"] = req.temperature
        if req.top_p is not None and req.top_p < 1:
            params["top_p"] = req.top_p
        if req.top_k is not None:
            params["top_k"] = req.top_k
    if req.max_new_tokens is not None:
        params["max_new_tokens"] = req.max_new_tokens
    if req.seed is not None:
        params["seed"] = req.seed
    if req.frequency_penalty:
        params["frequency_penalty"] = req.frequency_penalty
    if req.repetition_penalty is not None:
        params["repetition_penalty"] = req.repetition_penalty
    if req.logprobs and req.top_logprobs:
        params["top_n_tokens"] = req.top_logprobs
    stops = list(dict.fromkeys([*template_stops, *req.stop_list]))
    params["stop"] = stops[: max(0, max_stop_sequences)]
    if adapter_id is not None:
        params["adapter_id"] = adapter_id
    if grammar is not None:
        params["grammar"] = grammar
    return params
