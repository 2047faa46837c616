"""A test double of Hugging Face Text-Generation-Inference's HTTP router (TGI 3.3.x).

Theory of operation
===================

:class:`FakeTGI` is a real HTTP/1.1 server (Starlette app on uvicorn's h11 protocol) bound to
``127.0.0.1`` on an ephemeral port. ``with FakeTGI(...) as tgi:`` runs it on its own event loop in a
daemon thread (the usual way: it is independent of whatever loop the test or the gateway uses);
``async with FakeTGI(...) as tgi:`` runs it as a task on the *current* loop instead. Start and stop
are bounded (``start_timeout``/``stop_timeout``, a few seconds at most) and stop cancels whatever is
still streaming.

What the "model" says is decided by the test: a *script* (see :data:`Script`) gives the tokens, the
double does everything TGI's router and stopping criteria do around them:

* token events, ``index`` from 1, the final event with ``generated_text`` and, only when
  ``parameters.details`` is true, ``details`` ``{finish_reason, generated_tokens, seed,
  input_length}``; no ``[DONE]``; ``:\\n\\n`` keep-alive comments after ``keepalive_interval`` s
  without an event (TGI/axum: 15 s);
* stopping exactly like ``StoppingCriteria`` (text-generation-server ``utils/tokens.py``): after
  each token, first the length limit (``length``), then EOS (``eos_token``), then the stop
  sequences, each matched as the regex ``re.escape(stop) + "$"`` against the decoded text so far
  (special tokens' text included, a window of the last 200-300 characters). The stop text stays in
  ``generated_text``; a stop that ends *inside* a token does not match; Python's ``$`` also
  matches before one trailing ``"\\n"``. When the script runs out without EOS the double appends
  ``config.eos_token`` (``auto_eos``) -- a real model always ends somehow;
* ``generated_text`` drops the tokens whose :attr:`Token.skipped` is true (TGI decodes it with
  ``skip_special_tokens=True``) while every token event carries its literal text and ``special``
  flag; ``return_full_text`` prepends ``inputs``;
* ``seed`` is echoed in details only when sampling is in effect (``do_sample``, ``temperature``
  != 1, ``top_k``, ``top_p`` < 1 or ``typical_p`` < 1; ``do_sample`` defaults to *true* when
  ``parameters`` is absent altogether); a missing seed is then a random u64, else ``null``;
* validation: the axum ``Json`` extractor rejections as plain text (415 missing/foreign
  content-type, 400 bad JSON, 422 wrong shape, 413 over ``payload_limit``), then, in TGI's own
  order (``validation.rs::validate``/``validate_input``; stream-only checks first; the
  ``max_concurrent_requests`` permit is taken *before* validation) every rule with TGI's exact
  message prefixed ``Input validation error: ``. On ``/generate_stream`` the HTTP status is always
  200 and an error is one ``data: {"error","error_type"}`` event; on ``/generate`` it is JSON with
  422/424/429/500;
* ``max_new_tokens``: an explicit value is checked in full against ``max_total_tokens``; when it
  is absent the check uses ``min(max_total_tokens - input_length, 1024)`` (TGI then re-queues
  rounds of 1024 until ``max_total_tokens``; the double simply allows ``max_total_tokens -
  input_length`` tokens in one go);
* ``/generate`` returns ``{"generated_text", "details"?}`` with ``details.tokens``, ``prefill``
  (``[]`` unless ``decoder_input_details`` and ``config.enable_prefill_logprobs``),
  ``top_tokens``/``best_of_sequences`` only when non-empty, and the ``x-*`` headers of TGI
  (errors carry none); ``/generate_stream`` sends ``x-compute-type``, ``x-compute-characters`` and
  ``x-accel-buffering: no`` before anything is validated;
* ``GET /health`` (also ``/ping``, ``GET /``) 200 empty, or 503 ``{"error":"unhealthy",
  "error_type":"healthcheck"}`` when ``config.healthy`` is false; ``GET /info`` in TGI's field
  order; ``POST /tokenize``; ``POST /`` (compat route); ``GET /v1/models``; ``GET /metrics``
  (a handful of counters); ``--api-key`` semantics (bare 401 on generation routes only);
* with ``load_delay`` the port is bound but not listening until "warm-up" ends: connections are
  refused, exactly like TGI before ``Connected``;
* a client that goes away is noticed at once, on ``/generate_stream`` and ``/generate`` alike (the ASGI
  ``http.disconnect`` arrives as soon as the socket closes, whether the generation is sleeping between
  tokens, paused or waiting on a :class:`Gate`; TGI's hyper drops the handler of a closed connection
  the same way, non-stream included); generation stops, the permit is released and the time is
  recorded (outcome ``disconnected``).

Simplified / not modelled
-------------------------

* Tokenizer. Input tokens are counted by a fixed rule (:func:`tokenize_input`): one BOS token
  (``config.bos_token``, ``None`` for none; TGI always adds the tokenizer's special tokens, so a
  prompt that already starts with the BOS text counts it twice, as with a real doubled BOS), one
  token per known special-token text (:func:`special_info`), and ``ceil(n / 4)`` tokens for each
  run of ``n`` other characters. Generated tokens are whatever the script says; their ``id`` and
  ``logprob`` default to stable values derived from the text (ids of the Llama-3 specials are the
  real ones).
* The ``special`` flag: TGI sets it from ``tokenizer.all_special_ids`` (BOS/EOS/UNK/PAD and the
  checkpoint's ``additional_special_tokens``) but drops from ``generated_text`` every added token
  the *tokenizer* marks special, a larger set. The defaults model a plain Llama-3 tokenizer:
  ``<|begin_of_text|>``, ``<|eot_id|>``, ``<s>``, ``</s>``, ``<unk>``, ``<|endoftext|>`` are
  ``special: true``; the other ``<|...|>`` Llama-3 tokens (headers, ``<|eom_id|>``,
  ``<|python_tag|>``, ``<|reserved_special_token_N|>``) are ``special: false`` yet skipped from
  ``generated_text``. A checkpoint may differ: build the token yourself
  (``Token(text, special=..., skip=...)``) to test the other case.
* No real sampling, grammar or LoRA: ``grammar`` is validated (type, JSON, ``properties``) but
  does not constrain the script; ``adapter_id`` is accepted and ignored; ``seed``/``do_sample``
  only affect what is echoed (scripts see ``parameters`` and may use them).
* ``best_of`` on ``/generate`` runs the script ``best_of`` times (one permit each) and returns the
  sequence with the best mean logprob, the others in ``details.best_of_sequences``.
* ``top_n_tokens``: the chosen token followed by ``n - 1`` invented alternatives.
* serde's error texts in 400/422 plain-text rejections are approximations (same prefix, a
  serde-like message, no ``at line L column C`` position for shape errors).
* Unknown routes are an empty 404, wrong methods an empty 405; the chat/completions routes,
  ``/invocations``, ``/vertex``, ``/chat_tokenize`` and the docs are not served.

Usage
-----

::

    with FakeTGI(script=tokens("Hel", "lo", "<|eot_id|>"), token_delay=0.02, max_total_tokens=4096) as tgi:
        gateway = start_gateway(tgi_url=tgi.url)          # whatever the gateway needs
        ...
        tgi.script = lambda inputs, parameters: tokenize_text("It is sunny.<|eot_id|>")
        tgi.config.max_concurrent_requests = 1            # any TGIConfig field, at any time
        tgi.fail_next(after_tokens=3, message="CUDA out of memory")
        tgi.script = ["a", Gate(), "b"]                   # hold the stream until gate.open()
        assert tgi.last_generation.parameters["stop"] == ["<|eot_id|>"]

Faults: ``fail_next``/``incomplete_next`` (next generations), or the script markers ``Fail``,
``Incomplete``, ``Drop`` (connection reset, like a dying TGI), ``Pause(seconds)`` and ``Gate``;
``config.healthy = False`` for a 503 ``/health``; ``config.max_concurrent_requests`` for
overload; ``load_delay`` for a server still warming up.

Observations (for tests)
------------------------

Every request lands in :attr:`FakeTGI.requests` (:class:`RecordedRequest`, with the peer
address: the same port means a reused connection); every request that reached generation logic
(i.e. passed the extractor) also in :attr:`FakeTGI.generations` (:class:`GenerationRecord`:
outcome, tokens sent, raw SSE bytes, ``disconnected_at`` ...). Times are ``time.monotonic()``
values, comparable with the test's own. :attr:`FakeTGI.in_flight` counts held permits (TGI's
semaphore; :attr:`FakeTGI.peak_in_flight` its maximum), :attr:`FakeTGI.streams_open` open SSE
responses, :attr:`FakeTGI.generate_open` non-stream requests being answered,
:attr:`FakeTGI.connections_open` TCP connections. :meth:`FakeTGI.wait_until` polls a
predicate. Exceptions raised by scripts (answered as generation errors) or by the double itself
collect in :attr:`FakeTGI.errors`. Records are appended by the server thread; read them from the
test freely (lists are copied on access).

Scripts run on the server's event loop: they must not block. Defaults are TGI's launcher
defaults (``max_concurrent_requests=128``!) except ``max_input_tokens``/``max_total_tokens``
(8191/8192).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import random
import re
import socket
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from tests.fakes.serve import QuickServer

__all__ = [
    "BOS",
    "EOS",
    "EOT",
    "Drop",
    "Fail",
    "FakeTGI",
    "Gate",
    "GenerationRecord",
    "Incomplete",
    "InputToken",
    "Pause",
    "RecordedRequest",
    "Script",
    "TGIConfig",
    "Token",
    "count_tokens",
    "echo_script",
    "special",
    "special_info",
    "tokenize_input",
    "tokenize_text",
    "tokens",
]

# --------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    """One generated token.

    ``special`` is the flag sent on the wire; ``skip`` says whether ``generated_text`` drops the
    token (``None``: same as ``special``). ``id``/``logprob`` default to stable values derived
    from the text.
    """

    text: str
    special: bool = False
    id: int | None = None
    logprob: float | None = None
    skip: bool | None = None

    @property
    def skipped(self) -> bool:
        return self.special if self.skip is None else self.skip

    @property
    def token_id(self) -> int:
        if self.id is not None:
            return self.id
        info = special_info(self.text)
        return info[0] if info else _text_id(self.text)

    @property
    def token_logprob(self) -> float:
        if self.logprob is not None:
            return self.logprob
        return -(1 + zlib.crc32(b"lp:" + self.text.encode()) % 1999) / 1000

    def as_dict(self) -> dict[str, Any]:
        lp = self.token_logprob
        return {
            "id": self.token_id,
            "text": self.text,
            "logprob": None if math.isnan(lp) else lp,
            "special": self.special,
        }


def _text_id(text: str) -> int:
    return 1000 + zlib.crc32(text.encode()) % 100_000


# text -> (id, special flag on the wire, skipped by skip_special_tokens=True)
_NAMED_SPECIALS: dict[str, tuple[int, bool, bool]] = {
    # Llama 3 / 3.1 (Functionary v2.llama3, v3.llama3, v3-llama3.1)
    "<|begin_of_text|>": (128000, True, True),
    "<|end_of_text|>": (128001, False, True),
    "<|finetune_right_pad_id|>": (128004, False, True),
    "<|start_header_id|>": (128006, False, True),
    "<|end_header_id|>": (128007, False, True),
    "<|eom_id|>": (128008, False, True),
    "<|eot_id|>": (128009, True, True),
    "<|python_tag|>": (128010, False, True),
    # Llama 2 / Mistral (Functionary v1, v2)
    "<unk>": (0, True, True),
    "<s>": (1, True, True),
    "</s>": (2, True, True),
    # Qwen / GPT-style
    "<|endoftext|>": (151643, True, True),
}
_RESERVED = re.compile(r"<\|reserved_special_token_(\d+)\|>")
_SPECIAL_SCAN = re.compile(
    "|".join([re.escape(t) for t in sorted(_NAMED_SPECIALS, key=len, reverse=True)] + [_RESERVED.pattern])
)


def special_info(text: str) -> tuple[int, bool, bool] | None:
    """``(id, special, skipped)`` for a known special-token text, else ``None``."""
    if text in _NAMED_SPECIALS:
        return _NAMED_SPECIALS[text]
    m = _RESERVED.fullmatch(text)
    if m:
        n = int(m.group(1))
        if n > 250:
            return None
        tid = 128002 + n if n < 4 else (128008 if n == 4 else 128005 + n)
        return (tid, False, True)
    return None


def _as_token(item: Any) -> Token:
    if isinstance(item, Token):
        return item
    if isinstance(item, str):
        info = special_info(item)
        if info:
            return Token(item, special=info[1], id=info[0], skip=info[2])
        return Token(item)
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
        return Token(item[0], special=bool(item[1]))
    raise TypeError(f"not a token: {item!r}")


def special(text: str, *, id: int | None = None, skip: bool | None = True) -> Token:
    """A token sent with ``special: true`` (and skipped from ``generated_text``)."""
    info = special_info(text)
    return Token(text, special=True, id=id if id is not None else (info[0] if info else None), skip=skip)


def tokens(*pieces: str | Token | tuple[str, bool]) -> list[Token]:
    """One token per piece. Known special-token texts get their table flags (:func:`special_info`)."""
    return [_as_token(p) for p in pieces]


EOT = special("<|eot_id|>")
EOS = special("</s>")
BOS = special("<|begin_of_text|>")

_WORDS = re.compile(r"\s*\S+|\s+")


def tokenize_text(
    text: str,
    split: str | int | Callable[[str], list[str]] = "words",
) -> list[Token]:
    """Cut ``text`` into tokens the way a BPE model would emit it.

    Every known special-token text (:func:`special_info`) becomes one token with its flags; the
    text between them is cut by ``split``: ``"words"`` (leading whitespace stays with the next
    word: ``"Hi there"`` -> ``"Hi"``, ``" there"``), ``"chars"``, an ``int`` n (n characters per
    token) or a callable returning the pieces.
    """
    out: list[Token] = []
    pos = 0
    for m in _SPECIAL_SCAN.finditer(text):
        if special_info(m.group(0)) is None:
            continue
        out.extend(_split_plain(text[pos : m.start()], split))
        out.append(_as_token(m.group(0)))
        pos = m.end()
    out.extend(_split_plain(text[pos:], split))
    return out


def _split_plain(text: str, split: str | int | Callable[[str], list[str]]) -> list[Token]:
    if not text:
        return []
    if callable(split):
        pieces = list(split(text))
        if "".join(pieces) != text:
            raise ValueError("split callable must return pieces that join back to the text")
    elif split == "words":
        pieces = _WORDS.findall(text)
    elif split == "chars":
        pieces = list(text)
    elif isinstance(split, int) and split > 0:
        pieces = [text[i : i + split] for i in range(0, len(text), split)]
    else:
        raise ValueError(f"bad split: {split!r}")
    return [Token(p) for p in pieces if p]


# --------------------------------------------------------------------------------------------
# Input tokenization (deterministic counting rule)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputToken:
    id: int
    text: str
    start: int  # byte offsets into inputs, like /tokenize
    stop: int


def tokenize_input(inputs: str, bos: str | None = "<|begin_of_text|>") -> list[InputToken]:
    """The double's tokenizer for prompts: BOS, then one token per special-token text and
    ``ceil(n/4)`` tokens (4 characters each) per run of ``n`` other characters."""
    out: list[InputToken] = []
    if bos:
        info = special_info(bos)
        out.append(InputToken(info[0] if info else _text_id(bos), bos, 0, 0))
    byte_pos = 0

    def plain(segment: str) -> None:
        nonlocal byte_pos
        for i in range(0, len(segment), 4):
            piece = segment[i : i + 4]
            n = len(piece.encode())
            out.append(InputToken(_text_id(piece), piece, byte_pos, byte_pos + n))
            byte_pos += n

    pos = 0
    for m in _SPECIAL_SCAN.finditer(inputs):
        info = special_info(m.group(0))
        if info is None:
            continue
        plain(inputs[pos : m.start()])
        n = len(m.group(0).encode())
        out.append(InputToken(info[0], m.group(0), byte_pos, byte_pos + n))
        byte_pos += n
        pos = m.end()
    plain(inputs[pos:])
    return out


def count_tokens(inputs: str, bos: str | None = "<|begin_of_text|>") -> int:
    """Input length in tokens as the double counts it (see :func:`tokenize_input`)."""
    return len(tokenize_input(inputs, bos))


# --------------------------------------------------------------------------------------------
# Script items
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pause:
    """Extra wait (seconds, ``math.inf`` for ever) before the next token; keep-alives still flow."""

    seconds: float


@dataclass(frozen=True)
class Fail:
    """Fail the generation here: ``Request failed during generation: <message>`` (424 on /generate)."""

    message: str = "CUDA out of memory. Tried to allocate 2.00 GiB"


@dataclass(frozen=True)
class Incomplete:
    """End the backend stream here without an end message (``Incomplete generation [stream]``)."""


@dataclass(frozen=True)
class Drop:
    """Reset the TCP connection here, as when TGI dies mid-response: no error event, no end of
    the chunked body (on ``/generate``: no response at all)."""


class Gate:
    """Holds the stream at this point until :meth:`open` is called (from any thread)."""

    def __init__(self, opened: bool = False) -> None:
        self._event = threading.Event()
        if opened:
            self._event.set()

    def open(self) -> None:
        self._event.set()

    def close(self) -> None:
        self._event.clear()

    @property
    def is_open(self) -> bool:
        return self._event.is_set()


ScriptItem = Token | str | tuple[str, bool] | Pause | Fail | Incomplete | Drop | Gate
#: What the model generates: a string (cut by :func:`tokenize_text`), a list of items, or a
#: callable ``(inputs, parameters) -> str | Iterable[ScriptItem]`` called once per generation
#: (``parameters`` is the request's raw ``parameters`` object, ``{}`` when absent). Items are
#: tokens (``Token``, ``str`` = one token, ``(text, special)``) or the markers ``Pause``, ``Gate``,
#: ``Fail``, ``Incomplete``, ``Drop``. Generators are consumed lazily, one item per token.
Script = str | Iterable[ScriptItem] | Callable[[str, dict], str | Iterable[ScriptItem]]


def echo_script(inputs: str, parameters: dict) -> list[Token]:
    """Default script: ``"echo:"`` and the last eight words of the prompt (specials removed)."""
    plain = _SPECIAL_SCAN.sub(" ", inputs)
    words = plain.split()[-8:]
    return tokenize_text("echo: " + " ".join(words) if words else "Hello!")


# --------------------------------------------------------------------------------------------
# Configuration and records
# --------------------------------------------------------------------------------------------


@dataclass
class TGIConfig:
    """Everything the launcher would decide, plus the double's knobs. Mutable at run time."""

    # /info and router limits (launcher defaults unless noted)
    model_id: str = "meetkai/functionary-small-v3.2"
    model_sha: str | None = "0123456789abcdef0123456789abcdef01234567"
    model_pipeline_tag: str | None = "text-generation"
    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_input_tokens: int = 8191
    max_total_tokens: int = 8192
    validation_workers: int = 2
    max_client_batch_size: int = 4
    version: str = "3.3.6-dev0"
    sha: str | None = None
    docker_label: str | None = None
    compute_type: str = "gpu+optimized"
    payload_limit: int = 2_000_000
    api_key: str | None = None
    disable_grammar_support: bool = False
    enable_prefill_logprobs: bool = False
    # health
    healthy: bool = True
    # tokenizer model
    bos_token: str | None = "<|begin_of_text|>"
    eos_token: Token = EOT
    eos_texts: frozenset[str] = frozenset(
        {"<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "</s>", "<|endoftext|>"}
    )
    auto_eos: bool = True
    # timing
    first_token_delay: float = 0.0  # after validation, before the first token
    token_delay: float = 0.0  # before each following token
    keepalive_interval: float | None = 15.0  # ":\n\n" after this long without an event; None: never
    load_delay: float = 0.0  # port refuses connections this long after start()
    # uvicorn's HTTP implementation: h11 (tests) or httptools (benchmarks: about half the CPU per token,
    # closer to a real TGI whose router spends almost none). Read at start().
    http_impl: str = "h11"


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    json: Any  # parsed body, or None when it is not JSON
    at: float  # time.monotonic() when the body was read
    client: tuple[str, int] | None = None  # peer address: same port = same (reused) connection


@dataclass
class GenerationRecord:
    """One generation request that got past the JSON extractor."""

    request: RecordedRequest
    route: str  # "generate" | "generate_stream" | "compat"
    stream: bool
    inputs: str
    parameters: dict
    started_at: float
    outcome: str = "running"  # running | completed | validation | overloaded | generation |
    # incomplete | dropped (Drop marker) | disconnected | aborted (double stopped)
    error: str | None = None
    input_length: int | None = None
    finish_reason: str | None = None
    generated_text: str | None = None
    tokens: list[Token] = field(default_factory=list)  # tokens generated (sent, for a stream;
    # every sequence's, interleaved, for best_of > 1)
    events: list[bytes] = field(default_factory=list)  # raw SSE bytes written, keep-alives included
    ended_at: float | None = None
    disconnected_at: float | None = None  # when the double noticed the client had gone

    @property
    def disconnected(self) -> bool:
        return self.disconnected_at is not None

    @property
    def done(self) -> bool:
        return self.ended_at is not None


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

_STATUS = {
    "validation": 422,
    "generation": 424,
    "overloaded": 429,
    "incomplete_generation": 500,
    "incomplete_generation_stream": 500,
}


class _InferError(Exception):
    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message

    @property
    def outcome(self) -> str:
        return "incomplete" if self.error_type.startswith("incomplete") else self.error_type

    def body(self) -> dict[str, str]:
        return {"error": self.message, "error_type": self.error_type}


def _validation(msg: str) -> _InferError:
    return _InferError("validation", f"Input validation error: {msg}")


class _IncompleteSignal(Exception):
    pass


class _DropSignal(Exception):
    pass


def _abort_connection(server: uvicorn.Server | None, scope: dict) -> bool:
    """Reset the TCP connection that carries ``scope`` (uvicorn internals, h11 and httptools alike)."""
    if server is None:
        return False
    for connection in list(server.server_state.connections):
        cycle = getattr(connection, "cycle", None)
        if cycle is not None and cycle.scope is scope:
            connection.transport.abort()
            return True
    return False


_KEEPALIVE = object()


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


# --------------------------------------------------------------------------------------------
# Request extraction (axum Json<GenerateRequest> semantics)
# --------------------------------------------------------------------------------------------

_U32 = 2**32 - 1
_U64 = 2**64 - 1
_PARAM_KINDS = {
    "adapter_id": "?string",
    "best_of": "?usize",
    "decoder_input_details": "bool",
    "details": "bool",
    "do_sample": "bool",
    "frequency_penalty": "?f32",
    "grammar": "?grammar",
    "max_new_tokens": "?u32",
    "repetition_penalty": "?f32",
    "return_full_text": "?bool",
    "seed": "?u64",
    "stop": "vec_string",
    "temperature": "?f32",
    "top_k": "?i32",
    "top_n_tokens": "?u32",
    "top_p": "?f32",
    "truncate": "?usize",
    "typical_p": "?f32",
    "watermark": "bool",
}
_EXPECTED = {
    "string": "a string",
    "bool": "a boolean",
    "f32": "f32",
    "u32": "u32",
    "u64": "u64",
    "usize": "usize",
    "i32": "i32",
    "vec_string": "a sequence",
    "grammar": "internally tagged enum GrammarType",
}
_INT_RANGES = {"u32": (0, _U32), "u64": (0, _U64), "usize": (0, _U64), "i32": (-(2**31), 2**31 - 1)}


def _unexpected(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"boolean `{'true' if v else 'false'}`"
    if isinstance(v, int):
        return f"integer `{v}`"
    if isinstance(v, float):
        return f"floating point `{v!r}`"
    if isinstance(v, str):
        return "string " + json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "sequence"
    return "map"


def _type_error(kind: str, v: Any) -> str | None:
    if kind.startswith("?"):
        if v is None:
            return None
        kind = kind[1:]
    bad = f"invalid type: {_unexpected(v)}, expected {_EXPECTED[kind]}"
    if kind == "string":
        return None if isinstance(v, str) else bad
    if kind == "bool":
        return None if isinstance(v, bool) else bad
    if kind == "f32":
        return None if isinstance(v, (int, float)) and not isinstance(v, bool) else bad
    if kind in _INT_RANGES:
        if isinstance(v, bool) or not isinstance(v, int):
            return bad
        lo, hi = _INT_RANGES[kind]
        if not lo <= v <= hi:
            return f"invalid value: integer `{v}`, expected {kind}"
        return None
    if kind == "vec_string":
        if not isinstance(v, list):
            return bad
        for i, item in enumerate(v):
            if not isinstance(item, str):
                return f"[{i}]: invalid type: {_unexpected(item)}, expected a string"
        return None
    if kind == "grammar":
        if not isinstance(v, dict):
            return bad
        if "type" not in v:
            return "missing field `type`"
        if v["type"] not in ("json", "json_object", "regex", "json_schema"):
            return (
                f"unknown variant `{v['type']}`, expected one of `json`, `json_object`, `regex`, "
                "`json_schema`"
            )
        if "value" not in v:
            return "missing field `value`"
        if v["type"] == "regex" and not isinstance(v["value"], str):
            return f"value: invalid type: {_unexpected(v['value'])}, expected a string"
        if v["type"] == "json_schema":
            if not isinstance(v["value"], dict):
                return f"value: invalid type: {_unexpected(v['value'])}, expected struct JsonSchemaConfig"
            if "schema" not in v["value"]:
                return "value: missing field `schema`"
        return None
    raise AssertionError(kind)


def _json_content_type(ct: str | None) -> bool:
    if not ct:
        return False
    mime = ct.split(";", 1)[0].strip().lower()
    if "/" not in mime:
        return False
    typ, sub = mime.split("/", 1)
    return typ == "application" and (sub == "json" or sub.endswith("+json"))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid number `{name}`")


def _extract(request_headers: dict[str, str], body: bytes, *, compat: bool = False) -> dict | Response:
    """Mimic ``axum::Json<GenerateRequest>``: returns the parsed object or the rejection."""
    if not _json_content_type(request_headers.get("content-type")):
        return PlainTextResponse("Expected request with `Content-Type: application/json`", status_code=415)
    try:
        obj = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as e:
        return PlainTextResponse(f"Failed to parse the request body as JSON: {e}", status_code=400)
    except json.JSONDecodeError as e:
        what = "EOF while parsing a value" if e.pos >= len(e.doc.rstrip()) else e.msg.lower()
        return PlainTextResponse(
            f"Failed to parse the request body as JSON: {what} at line {e.lineno} column {e.colno}",
            status_code=400,
        )
    except ValueError as e:
        return PlainTextResponse(f"Failed to parse the request body as JSON: {e}", status_code=400)

    def shape(msg: str) -> Response:
        return PlainTextResponse(
            f"Failed to deserialize the JSON body into the target type: {msg}", status_code=422
        )

    target = "CompatGenerateRequest" if compat else "GenerateRequest"
    if not isinstance(obj, dict):
        return shape(f"invalid type: {_unexpected(obj)}, expected struct {target}")
    if "inputs" not in obj:
        return shape("missing field `inputs`")
    if not isinstance(obj["inputs"], str):
        return shape(f"inputs: invalid type: {_unexpected(obj['inputs'])}, expected a string")
    if compat and "stream" in obj and not isinstance(obj["stream"], bool):
        return shape(f"stream: invalid type: {_unexpected(obj['stream'])}, expected a boolean")
    if "parameters" in obj:
        params = obj["parameters"]
        if not isinstance(params, dict):
            return shape(
                f"parameters: invalid type: {_unexpected(params)}, expected struct GenerateParameters"
            )
        for name, kind in _PARAM_KINDS.items():
            if name in params:
                err = _type_error(kind, params[name])
                if err is not None:
                    sep = "" if err.startswith("[") else ": "
                    return shape(f"parameters.{name}{sep}{err}")
    return obj


# --------------------------------------------------------------------------------------------
# Validation (router/src/validation.rs)
# --------------------------------------------------------------------------------------------


@dataclass
class _Valid:
    inputs: str
    parameters: dict
    input_length: int
    max_new_tokens: int
    stop: list[str]
    details: bool
    decoder_input_details: bool
    return_full_text: bool
    sampling: bool
    seed: int
    top_n_tokens: int


class _Permit:
    def __init__(self, fake: FakeTGI) -> None:
        self.fake = fake

    def __enter__(self) -> _Permit:
        fake = self.fake
        if fake._in_flight >= fake.config.max_concurrent_requests:
            raise _InferError("overloaded", "Model is overloaded")
        fake._in_flight += 1
        fake._peak_in_flight = max(fake._peak_in_flight, fake._in_flight)
        return self

    def __exit__(self, *exc: object) -> None:
        self.fake._in_flight -= 1


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


class FakeTGI:
    """The TGI double. See the module docstring.

    ``FakeTGI(script=None, *, host="127.0.0.1", port=0, start_timeout=5, stop_timeout=5,
    **config)`` -- ``config`` keywords are :class:`TGIConfig` fields. ``script`` (and
    ``config``) can be changed at any time; each generation reads them when it starts.
    """

    def __init__(
        self,
        script: Script | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        start_timeout: float = 5.0,
        stop_timeout: float = 5.0,
        **config: Any,
    ) -> None:
        self.config = TGIConfig(**config)
        self.script: Script = script if script is not None else echo_script
        self.host = host
        self.port = port
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.errors: list[BaseException] = []  # raised by scripts, or by the double itself
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._generations: list[GenerationRecord] = []
        self._faults: collections.deque[tuple[int, str, str]] = collections.deque()
        self._counters: collections.Counter[tuple[str, str]] = collections.Counter()
        self._in_flight = 0
        self._peak_in_flight = 0
        self._streams_open = 0
        self._generate_open = 0
        self._active: set[asyncio.Task] = set()
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: QuickServer | None = None
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task | None = None
        self._ready = threading.Event()
        self._listening = False
        self._stop_requested: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._app = self._build_app()

    # ---------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ready(self) -> bool:
        """True while the port accepts connections."""
        return self._listening

    def _bind(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted sockets inherit this on Linux: uvicorn writes the status line/headers and the
        # body separately, and with Nagle on each small response would wait for a delayed ACK
        # (~40 ms), a latency TGI does not have and the gateway's tests must not see.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((self.host, self.port))  # bound, not listening: connections are refused
        self.port = sock.getsockname()[1]
        self._sock = sock

    def start(self, wait: bool | None = None) -> FakeTGI:
        """Start in a background thread. Waits until the port listens (unless ``load_delay`` is
        set and ``wait`` is not true: then returns at once and the port refuses connections until
        "warm-up" ends; use :meth:`wait_ready`)."""
        if self._thread is not None or self._task is not None:
            raise RuntimeError("already started")
        self._bind()
        self._thread = threading.Thread(target=self._thread_main, name=f"fake-tgi-{self.port}", daemon=True)
        self._thread.start()
        if wait or (wait is None and self.config.load_delay <= 0):
            self.wait_ready(self.start_timeout + max(0.0, self.config.load_delay))
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        timeout = self.start_timeout + max(0.0, self.config.load_delay) if timeout is None else timeout
        if not self._ready.wait(timeout):
            self.stop()
            raise TimeoutError(f"fake TGI did not start within {timeout} s")
        if self._error is not None:
            raise RuntimeError("fake TGI failed to start") from self._error

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:  # noqa: BLE001 - reported through wait_ready
            self._error = e
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        try:
            if self.config.load_delay > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop_requested.wait(), self.config.load_delay)
                if self._stop_requested.is_set():
                    return
            config = uvicorn.Config(
                self._app,
                lifespan="off",
                http=self.config.http_impl,
                ws="none",
                log_config=None,  # leave the process's logging (and any other uvicorn) alone
                log_level=None,
                server_header=False,
                timeout_graceful_shutdown=1,
                timeout_keep_alive=3600,  # hyper keeps idle keep-alive connections open
                backlog=4096,
            )
            self._server = QuickServer(config, on_started=self._on_started, drain_timeout=1.0)
            if self._stop_requested.is_set():
                return
            assert self._sock is not None
            await self._server.serve(sockets=[self._sock])
        except BaseException as e:
            if not self._ready.is_set():
                self._error = e
            raise
        finally:
            self._listening = False
            if not self._ready.is_set() and self._error is None:
                self._error = RuntimeError("stopped before it was ready")
            self._ready.set()
            if self._sock is not None:
                self._sock.close()

    def _on_started(self) -> None:
        self._listening = True
        self._ready.set()

    def _request_stop(self) -> None:
        """On the server loop: cancel generations, then let uvicorn exit."""
        if self._stop_requested is not None:
            self._stop_requested.set()
        for task in list(self._active):
            task.cancel()
        if self._server is not None:
            self._server.request_exit()

    def stop(self) -> None:
        """Stop the thread-mode server (idempotent, bounded by ``stop_timeout``)."""
        thread = self._thread
        if thread is None:
            return
        loop = self._loop
        deadline = time.monotonic() + self.stop_timeout
        while loop is None and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.001)
            loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(self._request_stop)
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive() and self._server is not None:
            self._server.force_exit = True
            thread.join(1.0)
        self._thread = None
        if thread.is_alive():
            raise RuntimeError("fake TGI did not stop in time")

    def __enter__(self) -> FakeTGI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def astart(self) -> FakeTGI:
        """Start as a task on the running loop (``async with FakeTGI() as tgi``)."""
        if self._thread is not None or self._task is not None:
            raise RuntimeError("already started")
        self._bind()
        self._task = asyncio.ensure_future(self._serve())
        if self.config.load_delay <= 0:
            await self.await_ready()
        return self

    async def await_ready(self, timeout: float | None = None) -> None:
        timeout = self.start_timeout + max(0.0, self.config.load_delay) if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while not self._ready.is_set():
            if time.monotonic() > deadline:
                await self.astop()
                raise TimeoutError(f"fake TGI did not start within {timeout} s")
            await asyncio.sleep(0.002)
        if self._error is not None:
            raise RuntimeError("fake TGI failed to start") from self._error

    async def astop(self) -> None:
        task = self._task
        if task is None:
            return
        if self._loop is not None:
            self._request_stop()
        try:
            await asyncio.wait_for(asyncio.shield(task), self.stop_timeout)
        except asyncio.TimeoutError:
            if self._server is not None:
                self._server.force_exit = True
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        except BaseException:  # noqa: BLE001, S110 - startup errors were reported already
            pass
        self._task = None

    async def __aenter__(self) -> FakeTGI:
        return await self.astart()

    async def __aexit__(self, *exc: object) -> None:
        await self.astop()

    # ---------------------------------------------------------------- test controls

    def fail_next(
        self, after_tokens: int = 0, message: str = "CUDA out of memory", *, times: int = 1
    ) -> None:
        """The next ``times`` generations fail after ``after_tokens`` tokens with
        ``Request failed during generation: <message>``."""
        for _ in range(times):
            self._faults.append((after_tokens, "generation", message))

    def incomplete_next(self, after_tokens: int = 0, *, times: int = 1) -> None:
        """The next ``times`` generations end after ``after_tokens`` tokens without an end
        message (stream: ``Incomplete generation stream``; /generate: 500 ``Incomplete generation``)."""
        for _ in range(times):
            self._faults.append((after_tokens, "incomplete", ""))

    def reset(self) -> None:
        """Forget recorded requests/generations, pending faults and counters."""
        with self._lock:
            self._requests.clear()
            self._generations.clear()
            self._faults.clear()
            self._counters.clear()
            self.errors.clear()
            self._peak_in_flight = self._in_flight

    def forget_finished(self) -> list[GenerationRecord]:
        """Forget the recorded requests and the generations that have ended; returns those generations.

        For long runs (benchmarks/soak.py): every record keeps its request body and SSE bytes, so a double
        serving for minutes would otherwise grow by megabytes a minute. Running generations stay recorded."""
        with self._lock:
            done = [g for g in self._generations if g.done]
            self._generations = [g for g in self._generations if not g.done]
            self._requests.clear()
            return done

    # ---------------------------------------------------------------- observations

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def generations(self) -> list[GenerationRecord]:
        with self._lock:
            return list(self._generations)

    @property
    def streams(self) -> list[GenerationRecord]:
        return [g for g in self.generations if g.stream]

    @property
    def last_generation(self) -> GenerationRecord:
        gens = self.generations
        if not gens:
            raise LookupError("no generation request received")
        return gens[-1]

    @property
    def in_flight(self) -> int:
        """Generation permits held (TGI's ``max_concurrent_requests`` semaphore)."""
        return self._in_flight

    @property
    def peak_in_flight(self) -> int:
        return self._peak_in_flight

    @property
    def connections_open(self) -> int:
        """TCP connections currently open to the double."""
        server = self._server
        return len(server.server_state.connections) if server is not None else 0

    @property
    def streams_open(self) -> int:
        """SSE responses currently open."""
        return self._streams_open

    @property
    def generate_open(self) -> int:
        """Non-stream requests (``/generate``, ``POST /`` without ``stream``) being answered: queued for a
        permit or generating. The non-stream counterpart of :attr:`streams_open`."""
        return self._generate_open

    def wait_until(self, predicate: Callable[[], Any], timeout: float = 2.0, interval: float = 0.002) -> bool:
        """Poll ``predicate`` until true (returns True) or ``timeout`` (returns False)."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)

    async def wait_until_async(
        self, predicate: Callable[[], Any], timeout: float = 2.0, interval: float = 0.002
    ) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if predicate():
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(interval)

    # ---------------------------------------------------------------- app

    def _build_app(self) -> Starlette:
        async def empty(request: Request, exc: HTTPException) -> Response:
            return Response(status_code=exc.status_code, headers=exc.headers)

        routes = [
            Route("/generate", self._ep_generate, methods=["POST"]),
            Route("/generate_stream", self._ep_generate_stream, methods=["POST"]),
            Route("/", self._ep_compat, methods=["POST"]),
            Route("/tokenize", self._ep_tokenize, methods=["POST"]),
            Route("/", self._ep_health, methods=["GET"]),
            Route("/health", self._ep_health, methods=["GET"]),
            Route("/ping", self._ep_health, methods=["GET"]),
            Route("/info", self._ep_info, methods=["GET"]),
            Route("/v1/models", self._ep_models, methods=["GET"]),
            Route("/metrics", self._ep_metrics, methods=["GET"]),
        ]
        return Starlette(routes=routes, exception_handlers={404: empty, 405: empty})

    def _count(self, what: str, err: str = "") -> None:
        self._counters[(what, err)] += 1

    async def _record(self, request: Request) -> RecordedRequest:
        body = await request.body()
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        headers: dict[str, str] = {}
        for k, v in request.headers.items():
            headers[k] = f"{headers[k]}, {v}" if k in headers else v
        peer = (request.client.host, request.client.port) if request.client else None
        rec = RecordedRequest(request.method, request.url.path, headers, body, parsed, time.monotonic(), peer)
        with self._lock:
            self._requests.append(rec)
        return rec

    def _unauthorized(self, rec: RecordedRequest) -> Response | None:
        key = self.config.api_key
        if key is None:
            return None
        if rec.headers.get("authorization", "").lower() == f"bearer {key}".lower():
            return None
        return Response(status_code=401)

    async def _prepare(
        self, request: Request, compat: bool = False
    ) -> tuple[RecordedRequest, dict | Response]:
        rec = await self._record(request)
        denied = self._unauthorized(rec)
        if denied is not None:
            return rec, denied
        if len(rec.body) > self.config.payload_limit:
            if not _json_content_type(rec.headers.get("content-type")):
                return rec, _extract(rec.headers, rec.body)
            return rec, PlainTextResponse(
                "Failed to buffer the request body: length limit exceeded", status_code=413
            )
        return rec, _extract(rec.headers, rec.body, compat=compat)

    def _new_generation(self, rec: RecordedRequest, obj: dict, route: str, stream: bool) -> GenerationRecord:
        params = obj.get("parameters")
        gen = GenerationRecord(
            request=rec,
            route=route,
            stream=stream,
            inputs=obj["inputs"],
            parameters=dict(params) if isinstance(params, dict) else {},
            started_at=time.monotonic(),
        )
        with self._lock:
            self._generations.append(gen)
        self._count("request")
        return gen

    # ---------------------------------------------------------------- endpoints

    async def _ep_generate_stream(self, request: Request) -> Any:
        rec, obj = await self._prepare(request)
        if isinstance(obj, Response):
            return obj
        return _SSEResponse(self, self._new_generation(rec, obj, "generate_stream", True), obj)

    async def _ep_generate(self, request: Request) -> Response:
        rec, obj = await self._prepare(request)
        if isinstance(obj, Response):
            return obj
        return await self._generate_json(request, self._new_generation(rec, obj, "generate", False), obj)

    async def _ep_compat(self, request: Request) -> Any:
        rec, obj = await self._prepare(request, compat=True)
        if isinstance(obj, Response):
            return obj
        if obj.get("stream", False):
            return _SSEResponse(self, self._new_generation(rec, obj, "compat", True), obj)
        gen = self._new_generation(rec, obj, "compat", False)
        return await self._generate_json(request, gen, obj, as_list=True)

    async def _ep_tokenize(self, request: Request) -> Response:
        _, obj = await self._prepare(request)
        if isinstance(obj, Response):
            return obj
        toks = tokenize_input(obj["inputs"], self.config.bos_token)
        truncate = (obj.get("parameters") or {}).get("truncate")
        if truncate is not None:
            toks = toks[max(0, len(toks) - truncate) :]
        return JSONResponse([{"id": t.id, "text": t.text, "start": t.start, "stop": t.stop} for t in toks])

    async def _ep_health(self, request: Request) -> Response:
        await self._record(request)
        if not self.config.healthy:
            return JSONResponse({"error": "unhealthy", "error_type": "healthcheck"}, status_code=503)
        return Response(status_code=200)

    async def _ep_info(self, request: Request) -> Response:
        await self._record(request)
        c = self.config
        return JSONResponse(
            {
                "model_id": c.model_id,
                "model_sha": c.model_sha,
                "model_pipeline_tag": c.model_pipeline_tag,
                "max_concurrent_requests": c.max_concurrent_requests,
                "max_best_of": c.max_best_of,
                "max_stop_sequences": c.max_stop_sequences,
                "max_input_tokens": c.max_input_tokens,
                "max_total_tokens": c.max_total_tokens,
                "validation_workers": c.validation_workers,
                "max_client_batch_size": c.max_client_batch_size,
                "router": "text-generation-router",
                "version": c.version,
                "sha": c.sha,
                "docker_label": c.docker_label,
            }
        )

    async def _ep_models(self, request: Request) -> Response:
        await self._record(request)
        mid = self.config.model_id
        return JSONResponse(
            {"object": "list", "data": [{"id": mid, "object": "model", "created": 0, "owned_by": mid}]}
        )

    async def _ep_metrics(self, request: Request) -> Response:
        await self._record(request)
        lines = [f"tgi_request_count {self._counters[('request', '')]}"]
        lines.append(f"tgi_request_success {self._counters[('success', '')]}")
        for (what, err), n in sorted(self._counters.items()):
            if what == "failure":
                lines.append(f'tgi_request_failure{{err="{err}"}} {n}')
        lines.append(f"tgi_queue_size {0}")
        return PlainTextResponse("\n".join(lines) + "\n")

    # ---------------------------------------------------------------- validation

    def _validate(self, inputs: str, params: dict | None) -> _Valid:
        c = self.config
        p = params if params is not None else {}
        do_sample = bool(p.get("do_sample", False)) if params is not None else True
        best_of = p.get("best_of")
        best_of = 1 if best_of is None else best_of
        temperature, top_k, top_p, typical_p = (
            p.get(k) for k in ("temperature", "top_k", "top_p", "typical_p")
        )
        flagged = do_sample or any(v is not None for v in (temperature, top_k, top_p, typical_p))
        if best_of > 1 and not flagged:
            raise _validation("you must use sampling when `best_of` is > 1")
        t = 1.0 if temperature is None else temperature
        if t <= 0.0:
            raise _validation("`temperature` must be strictly positive")
        rp = p.get("repetition_penalty")
        if rp is not None and rp <= 0.0:
            raise _validation("`repetition_penalty` must be strictly positive")
        fp = p.get("frequency_penalty")
        if fp is not None and not -2.0 <= fp <= 2.0:
            raise _validation("`frequency_penalty` must be >= -2.0 and <= 2.0")
        if top_p is not None and (top_p <= 0.0 or top_p >= 1.0):
            raise _validation("`top_p` must be > 0.0 and < 1.0")
        if typical_p is not None and (typical_p <= 0.0 or typical_p >= 1.0):
            raise _validation("`typical_p` must be > 0.0 and < 1.0")
        if top_k is not None and top_k <= 0:
            raise _validation("`top_k` must be strictly positive")
        max_new = p.get("max_new_tokens")
        if max_new == 0:
            raise _validation("`max_new_tokens` must be strictly positive")
        stop = list(p.get("stop") or [])
        if len(stop) > c.max_stop_sequences:
            raise _validation(
                f"`stop` supports up to {c.max_stop_sequences} stop sequences. Given: {len(stop)}"
            )
        seed = p.get("seed")
        if seed is None:
            seed = random.getrandbits(64)
        elif best_of > 1:
            raise _validation("`seed` must not be set when `best_of` > 1")
        top_n = p.get("top_n_tokens")
        if top_n is not None and top_n > c.max_top_n_tokens:
            raise _validation(f"`top_n_tokens` must be >= 0 and <= {c.max_top_n_tokens}. Given: {top_n}")
        if inputs == "":
            raise _validation("`inputs` cannot be empty")
        truncate = p.get("truncate")
        if truncate is not None and (truncate == 0 or truncate > c.max_input_tokens):
            raise _validation(
                f"`truncate` must be strictly positive and less than {c.max_input_tokens}. Given: {truncate}"
            )
        # validate_input
        n = count_tokens(inputs, c.bos_token)
        input_length = min(n, truncate) if truncate is not None else n
        if max_new is not None:
            checked = cap = max_new
        else:
            cap = max(0, c.max_total_tokens - input_length)
            checked = min(cap, 1024)
        if input_length + checked > c.max_total_tokens:
            raise _validation(
                f"`inputs` tokens + `max_new_tokens` must be <= {c.max_total_tokens}. "
                f"Given: {input_length} `inputs` tokens and {checked} `max_new_tokens`"
            )
        if input_length > c.max_input_tokens:
            raise _validation(
                f"`inputs` must have less than {c.max_input_tokens} tokens. Given: {input_length}"
            )
        grammar = p.get("grammar")
        if grammar is not None:
            self._validate_grammar(grammar)
        sampling = (
            do_sample
            or t != 1.0
            or (top_k is not None and top_k != 0)
            or (top_p is not None and top_p < 1.0)
            or (typical_p is not None and typical_p < 1.0)
        )
        return _Valid(
            inputs=inputs,
            parameters=p,
            input_length=input_length,
            max_new_tokens=cap,
            stop=stop,
            details=bool(p.get("details", False)),
            decoder_input_details=bool(p.get("decoder_input_details", False)),
            return_full_text=bool(p.get("return_full_text") or False),
            sampling=sampling,
            seed=seed,
            top_n_tokens=top_n or 0,
        )

    def _validate_grammar(self, grammar: dict) -> None:
        if self.config.disable_grammar_support:
            raise _validation("grammar is not supported")
        kind, value = grammar["type"], grammar["value"]
        if kind == "regex":
            return
        if kind == "json_schema":
            value = value["schema"]
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise _validation(f"grammar is not valid: {e}") from None
        elif not isinstance(value, dict):
            raise _validation("grammar is not supported")
        if not isinstance(value, dict) or "properties" not in value:
            raise _validation("grammar is not valid: Grammar must have a 'properties' field")

    # ---------------------------------------------------------------- generation engine

    def _script_items(self, valid: _Valid) -> Iterator[Any]:
        script = self.script
        try:
            produced = script(valid.inputs, dict(valid.parameters)) if callable(script) else script
            if isinstance(produced, str):
                produced = tokenize_text(produced)
            items = iter(produced)
        except Exception as e:
            self.errors.append(e)
            raise _InferError("generation", f"Request failed during generation: script raised {e!r}") from e
        while True:
            try:
                item = next(items)
            except StopIteration:
                break
            except Exception as e:
                self.errors.append(e)
                raise _InferError(
                    "generation", f"Request failed during generation: script raised {e!r}"
                ) from e
            yield item
        if self.config.auto_eos:
            yield self.config.eos_token
        raise _IncompleteSignal

    async def _wait(
        self, seconds: float, state: list[float], keepalive: float | None, gate: Gate | None = None
    ) -> AsyncIterator[Any]:
        """Sleep ``seconds`` (or until ``gate`` opens), yielding keep-alive markers on time."""
        start = time.monotonic()
        deadline = start + seconds if seconds < math.inf else math.inf
        if gate is None and deadline <= start:
            await asyncio.sleep(0)
            return
        while True:
            now = time.monotonic()
            if gate is not None and gate.is_open:
                return
            if gate is None and now >= deadline:
                return
            wake = deadline
            if keepalive is not None:
                wake = min(wake, state[0] + keepalive)
            if gate is not None:
                wake = min(wake, now + 0.005)
            await asyncio.sleep(min(max(0.0, wake - now), 3600.0))
            now = time.monotonic()
            if keepalive is not None and now >= state[0] + keepalive:
                state[0] = now
                yield _KEEPALIVE

    async def _run(
        self, valid: _Valid, gen: GenerationRecord, keepalive: float | None, state: list[float]
    ) -> AsyncIterator[Any]:
        """Yields ``_KEEPALIVE``, ``("token", Token)`` and finally ``("end", Token, finish, text)``;
        raises ``_InferError`` for generation errors and incomplete streams."""
        c = self.config
        fault = self._faults.popleft() if self._faults else None
        stops = [re.compile(re.escape(s) + "$") for s in valid.stop]
        window = ""
        generated: list[Token] = []
        items = self._script_items(valid)
        try:
            while True:
                item = next(items)
                if isinstance(item, Pause):
                    async for ka in self._wait(item.seconds, state, keepalive):
                        yield ka
                    continue
                if isinstance(item, Gate):
                    async for ka in self._wait(math.inf, state, keepalive, gate=item):
                        yield ka
                    continue
                if isinstance(item, Fail):
                    raise _InferError("generation", f"Request failed during generation: {item.message}")
                if isinstance(item, Incomplete):
                    raise _IncompleteSignal
                if isinstance(item, Drop):
                    raise _DropSignal
                tok = _as_token(item)
                delay = c.first_token_delay if not generated else c.token_delay
                async for ka in self._wait(delay, state, keepalive):
                    yield ka
                if fault is not None and len(generated) >= fault[0]:
                    if fault[1] == "incomplete":
                        raise _IncompleteSignal
                    raise _InferError("generation", f"Request failed during generation: {fault[2]}")
                generated.append(tok)
                gen.tokens.append(tok)
                n = len(generated)
                finish = None
                if n >= valid.max_new_tokens:
                    finish = "length"
                elif tok.text in c.eos_texts:
                    finish = "eos_token"
                elif stops:
                    window += tok.text
                    if len(window) > 300:
                        window = window[-200:]
                    if any(rx.search(window) for rx in stops):
                        finish = "stop_sequence"
                if finish is not None:
                    text = "".join(t.text for t in generated if not t.skipped)
                    yield ("end", tok, finish, text)
                    return
                yield ("token", tok)
        except _IncompleteSignal:
            raise _InferError("incomplete_generation", "Incomplete generation") from None

    def _top_tokens(self, tok: Token, n: int) -> list[dict]:
        if n <= 0:
            return []
        first = tok.as_dict()
        alts = [
            {
                "id": _text_id(f"alt{i}:{tok.text}"),
                "text": f"alt{i}",
                "logprob": first["logprob"] - i,
                "special": False,
            }
            for i in range(1, n)
        ]
        return [first, *alts]

    async def _collect(self, obj: dict, gen: GenerationRecord) -> dict:
        """One non-streamed sequence (permit, validation, generation)."""
        t0 = time.monotonic()
        with _Permit(self):
            valid = self._validate(obj["inputs"], obj.get("parameters"))
            gen.input_length = valid.input_length
            t_valid = time.monotonic()
            toks: list[Token] = []
            async with contextlib.aclosing(self._run(valid, gen, None, [t_valid])) as events:
                async for ev in events:
                    if ev is _KEEPALIVE:
                        continue
                    toks.append(ev[1])
                    if ev[0] == "end":
                        return {
                            "valid": valid,
                            "tokens": toks,
                            "finish_reason": ev[2],
                            "text": ev[3],
                            "t0": t0,
                            "t_valid": t_valid,
                            "t_end": time.monotonic(),
                        }
        raise AssertionError("unreachable")

    async def _generate_json(
        self, request: Request, gen: GenerationRecord, obj: dict, as_list: bool = False
    ) -> Response:
        self._generate_open += 1
        try:
            return await self._answer_json(request, gen, obj, as_list)
        finally:
            self._generate_open -= 1

    async def _answer_json(
        self, request: Request, gen: GenerationRecord, obj: dict, as_list: bool
    ) -> Response:
        """Generate while watching for the client's disconnect (as TGI does: hyper drops the handler when
        the connection closes, which cancels the generation)."""
        work = asyncio.ensure_future(self._generate_result(gen, obj))
        self._active.add(work)
        watcher = asyncio.ensure_future(_watch_disconnect(request.receive, gen))
        try:
            await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._active.discard(work)
        if work.done() and not work.cancelled() and isinstance(work.exception(), _DropSignal):
            watcher.cancel()
            self._finish(gen, "dropped")
            if not _abort_connection(self._server, request.scope):
                raise RuntimeError("fake TGI could not find the connection to drop")
            return Response(status_code=500)
        if not work.done():
            work.cancel()
            with contextlib.suppress(BaseException):
                await work
            self._finish(gen, "disconnected")
            return Response(status_code=499)
        watcher.cancel()
        if work.cancelled():
            self._finish(gen, "aborted")
            return Response(status_code=503)
        try:
            body, headers = work.result()
        except _InferError as e:
            self._finish(gen, e.outcome, e.message)
            self._count("failure", e.outcome)
            return JSONResponse(e.body(), status_code=_STATUS[e.error_type])
        except Exception as e:  # noqa: BLE001 - a bug in the double: make it visible
            self.errors.append(e)
            self._finish(gen, "aborted", repr(e))
            return PlainTextResponse(f"fake TGI internal error: {e!r}", status_code=500)
        self._finish(gen, "completed")
        self._count("success")
        return JSONResponse([body] if as_list else body, headers=headers)

    async def _generate_result(self, gen: GenerationRecord, obj: dict) -> tuple[dict, dict[str, str]]:
        params = obj.get("parameters")
        best_of = (params or {}).get("best_of")
        if best_of is not None and best_of > 1:
            c = self.config
            if c.max_best_of == 1:
                raise _validation("`best_of` != 1 is not allowed for this endpoint")
            if best_of > c.max_best_of:
                raise _validation(f"`best_of` must be > 0 and <= {c.max_best_of}. Given: {best_of}")
            tasks = [asyncio.ensure_future(self._collect(obj, gen)) for _ in range(best_of)]
            try:
                results = [await t for t in tasks]
            finally:
                for t in tasks:
                    t.cancel()
            means = [sum(t.token_logprob for t in r["tokens"]) / len(r["tokens"]) for r in results]
            best = max(range(len(results)), key=lambda i: (means[i], -i))
            main, others = results[best], [r for i, r in enumerate(results) if i != best]
        else:
            main, others = await self._collect(obj, gen), []
        valid: _Valid = main["valid"]
        text = valid.inputs + main["text"] if valid.return_full_text else main["text"]
        gen.finish_reason, gen.generated_text = main["finish_reason"], text
        body: dict[str, Any] = {"generated_text": text}
        if valid.details or valid.decoder_input_details:
            details = self._details(main)
            if others:
                details_bos = []
                for r in others:
                    d = self._details(r)
                    seq = {"generated_text": r["text"], **d}
                    seq.pop("best_of_sequences", None)
                    details_bos.append(seq)
                details = _insert_before(details, "top_tokens", "best_of_sequences", details_bos)
            body["details"] = details
        t_end = time.monotonic()
        total = t_end - main["t0"]
        inference = main["t_end"] - main["t_valid"]
        n = len(main["tokens"])
        headers = {
            "x-compute-type": self.config.compute_type,
            "x-compute-time": repr(total),
            "x-compute-characters": str(len(valid.inputs)),
            "x-total-time": str(int(total * 1000)),
            "x-validation-time": str(int((main["t_valid"] - main["t0"]) * 1000)),
            "x-queue-time": "0",
            "x-inference-time": str(int(inference * 1000)),
            "x-time-per-token": str(int(inference * 1000 / max(n, 1))),
            "x-prompt-tokens": str(valid.input_length),
            "x-generated-tokens": str(n),
        }
        return body, headers

    def _details(self, r: dict) -> dict[str, Any]:
        valid: _Valid = r["valid"]
        prefill: list[dict] = []
        if valid.decoder_input_details and self.config.enable_prefill_logprobs:
            toks = tokenize_input(valid.inputs, self.config.bos_token)[-valid.input_length :]
            prefill = [
                {"id": t.id, "text": t.text, "logprob": None if i == 0 else -(1 + t.id % 997) / 100}
                for i, t in enumerate(toks)
            ]
        d: dict[str, Any] = {
            "finish_reason": r["finish_reason"],
            "generated_tokens": len(r["tokens"]),
            "seed": valid.seed if valid.sampling else None,
            "prefill": prefill,
            "tokens": [t.as_dict() for t in r["tokens"]],
        }
        if valid.top_n_tokens > 0:
            d["top_tokens"] = [self._top_tokens(t, valid.top_n_tokens) for t in r["tokens"]]
        return d

    def _finish(self, gen: GenerationRecord, outcome: str, error: str | None = None) -> None:
        if gen.ended_at is None:
            gen.outcome = outcome
            gen.error = error
            gen.ended_at = time.monotonic()


def _insert_before(d: dict, key: str, new_key: str, value: Any) -> dict:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if k == key:
            out[new_key] = value
        out[k] = v
    if new_key not in out:
        out[new_key] = value
    return out


async def _watch_disconnect(receive: Callable[[], Any], gen: GenerationRecord) -> None:
    """Return when the client goes away; record when it was noticed."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if gen.ended_at is None and gen.disconnected_at is None:
                gen.disconnected_at = time.monotonic()
            return


class _SSEResponse:
    """``/generate_stream``: an ASGI response that generates while it streams, and stops as
    soon as the client disconnects."""

    def __init__(self, fake: FakeTGI, gen: GenerationRecord, obj: dict) -> None:
        self.fake = fake
        self.gen = gen
        self.obj = obj

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        fake, gen = self.fake, self.gen
        headers = [
            (b"content-type", b"text/event-stream"),
            (b"cache-control", b"no-cache"),
            (b"x-compute-type", fake.config.compute_type.encode()),
            (b"x-compute-characters", str(len(self.obj["inputs"])).encode()),
            (b"x-accel-buffering", b"no"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        fake._streams_open += 1
        producer = asyncio.ensure_future(self._produce(send))
        fake._active.add(producer)
        watcher = asyncio.ensure_future(_watch_disconnect(receive, gen))
        try:
            await asyncio.wait({producer, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if producer.done():
                watcher.cancel()
                if not producer.cancelled() and isinstance(producer.exception(), _DropSignal):
                    fake._finish(gen, "dropped")
                    if _abort_connection(fake._server, scope):
                        # The transport reports the connection lost at the loop's next turn: let that happen
                        # first, so that uvicorn sees a disconnected client and stays quiet (returning at once
                        # sometimes logged "ASGI callable returned without completing response").
                        await asyncio.sleep(0)
                        return
                    raise RuntimeError("fake TGI could not find the connection to drop")
                if not producer.cancelled() and producer.exception() is not None:
                    fake.errors.append(producer.exception())
                    fake._finish(gen, "aborted", repr(producer.exception()))
                elif producer.cancelled():
                    fake._finish(gen, "aborted")
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                producer.cancel()
                with contextlib.suppress(BaseException):
                    await producer
                fake._finish(gen, "disconnected")
        except BaseException:
            producer.cancel()
            watcher.cancel()
            fake._finish(gen, "aborted")
            raise
        finally:
            fake._active.discard(producer)
            fake._streams_open -= 1

    async def _produce(self, send: Callable) -> None:
        fake, gen, obj = self.fake, self.gen, self.obj
        c = fake.config
        state = [time.monotonic()]  # time of the last event, for keep-alives

        async def emit(data: bytes) -> None:
            gen.events.append(data)
            state[0] = time.monotonic()
            await send({"type": "http.response.body", "body": data, "more_body": True})

        params = obj.get("parameters")
        p = params if isinstance(params, dict) else {}
        try:
            best_of = p.get("best_of")
            if (1 if best_of is None else best_of) != 1:
                raise _validation("`best_of` != 1 is not supported when streaming tokens")
            if p.get("decoder_input_details", False):
                raise _validation("`decoder_input_details` == true is not supported when streaming tokens")
            with _Permit(fake):
                valid = fake._validate(obj["inputs"], params)
                gen.input_length = valid.input_length
                index = 0
                events = fake._run(valid, gen, c.keepalive_interval, state)
                async with contextlib.aclosing(events):
                    async for ev in events:
                        if ev is _KEEPALIVE:
                            await emit(b":\n\n")
                            continue
                        index += 1
                        tok: Token = ev[1]
                        event: dict[str, Any] = {"index": index, "token": tok.as_dict()}
                        if valid.top_n_tokens > 0:
                            event["top_tokens"] = fake._top_tokens(tok, valid.top_n_tokens)
                        if ev[0] == "end":
                            text = valid.inputs + ev[3] if valid.return_full_text else ev[3]
                            event["generated_text"] = text
                            event["details"] = (
                                {
                                    "finish_reason": ev[2],
                                    "generated_tokens": index,
                                    "seed": valid.seed if valid.sampling else None,
                                    "input_length": valid.input_length,
                                }
                                if valid.details
                                else None
                            )
                            gen.finish_reason, gen.generated_text = ev[2], text
                            await emit(b"data: " + _dumps(event) + b"\n\n")
                            fake._finish(gen, "completed")
                            fake._count("success")
                            return
                        event["generated_text"] = None
                        event["details"] = None
                        await emit(b"data: " + _dumps(event) + b"\n\n")
        except _InferError as e:
            if e.error_type == "incomplete_generation":
                e = _InferError("incomplete_generation_stream", "Incomplete generation stream")
            fake._finish(gen, e.outcome, e.message)
            fake._count("failure", e.outcome)
            await emit(b"data: " + _dumps(e.body()) + b"\n\n")
