"""TGI's answers as the tests of the client and of the protocol share them."""

from __future__ import annotations

import json

from tgi_gateway.tgi.protocol import Generation, Token

#: ``details.tokens`` of a ``/generate`` answer: text split inside a word, a non-ASCII character, the stop token.
GENERATE_TOKENS = [
    {"id": 1001, "text": "Hél", "logprob": -0.5, "special": False},
    {"id": 1002, "text": "lo 🌍", "logprob": -0.5, "special": False},
    {"id": 2, "text": "<|eot_id|>", "logprob": -0.1, "special": True},
]
#: What the client makes of :func:`generate_answer` with ``x-prompt-tokens: 7``.
GENERATION = Generation(
    [Token("Hél", False, 1001), Token("lo 🌍", False, 1002), Token("<|eot_id|>", True, 2)], "eos_token", 3, 7
)


def generate_answer(tokens: object = GENERATE_TOKENS, **details: object) -> bytes:
    """A ``/generate`` answer with ``details: true``; ``details`` overrides its fields."""
    body = {"generated_text": "Héllo 🌍", "details": {"finish_reason": "eos_token", "generated_tokens": 3,
                                                      "seed": None, "prefill": [], "tokens": tokens, **details}}  # fmt: skip
    return json.dumps(body).encode()
