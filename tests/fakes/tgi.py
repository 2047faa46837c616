"""A test double of Hugging Face Text-Generation-Inference's HTTP router (TGI 3.3.x), for the gateway's tests
and benchmarks.

Contract
========

:class:`FakeTGI` is a real HTTP/1.1 server bound to ``127.0.0.1`` (an ephemeral port unless ``port`` is
given): an asyncio protocol parsing requests with httptools, on its own event loop in a daemon thread
(``with FakeTGI(...) as tgi:``; the loop follows the process's asyncio policy, so a benchmark that installs
uvloop's gets uvloop). Start and stop are bounded (a few seconds); stop ends whatever is still running.

It serves what the gateway calls, with the bytes, status codes and error bodies of TGI's router:

* ``POST /generate_stream``: ``200`` with ``content-type: text/event-stream``, ``cache-control: no-cache``,
  ``x-compute-type``, ``x-compute-characters``, ``x-accel-buffering: no``, chunked, sent before anything
  is validated; then one ``data: {json}\\n\\n`` event per token (``index`` from 1, ``generated_text`` and
  ``details`` null), the last one with ``generated_text`` and, only when ``parameters.details``,
  ``details`` ``{finish_reason, generated_tokens, seed, input_length}``; no ``[DONE]``; ``:\\n\\n``
  keep-alive comments after ``config.keepalive_interval`` s without an event (TGI: 15 s). An error is
  one ``data: {"error","error_type"}`` event that ends the stream (status still 200).
* ``POST /generate``: ``{"generated_text", "details"?}`` (``details`` only when asked: ``finish_reason``,
  ``generated_tokens``, ``seed``, ``prefill: []``, ``tokens``) with TGI's ``x-*`` timing and count headers;
  errors as JSON ``{"error","error_type"}`` with 422 (validation), 424 (generation), 429 (overloaded) or
  500 (incomplete), without ``x-*`` headers.
* ``GET /health``: 200 with an empty body, or 503 ``{"error":"unhealthy","error_type":"healthcheck"}``
  when ``config.healthy`` is false. ``GET /info``: TGI's fields in TGI's order, from :class:`TGIConfig`.
* Before a generation route runs: ``config.api_key`` (a bare 401 unless ``Authorization: Bearer <key>``,
  compared case-insensitively; never on ``/health`` and ``/info``); then axum's ``Json`` extractor, in
  plain text: 415 without a JSON content type, 413 for a body over ``config.payload_limit``, 400 for bad
  JSON, 422 ``Failed to deserialize the JSON body into the target type: <serde-like message>`` for a
  wrong shape (no ``inputs``, a modelled parameter of the wrong type). Unknown fields are ignored.
* Then, in TGI's order: the ``max_concurrent_requests`` permit (``Model is overloaded``), validation
  (``validation.rs``) of the parameters the gateway sends (``temperature``, ``repetition_penalty``,
  ``frequency_penalty``, ``top_p``, ``top_k``, ``max_new_tokens``, ``stop`` count, ``top_n_tokens`` above
  ``config.max_top_n_tokens``, empty ``inputs``, input and total lengths) with TGI's messages prefixed
  ``Input validation error: ``; an absent
  ``max_new_tokens`` is checked as ``min(max_total_tokens - input_length, 1024)`` and allows
  ``max_total_tokens - input_length`` tokens.
* Generation from a *script* (:data:`Script`) chosen by the test, stopped as TGI's ``StoppingCriteria``
  does after each token: first the length limit (``length``), then an EOS text (``config.eos_texts``:
  ``eos_token``), then the stop sequences, each matched as ``re.escape(stop) + "$"`` against the text so
  far (special tokens' text included: the stop text stays in ``generated_text``, a stop ending *inside* a
  token does not match, ``$`` also matches before one trailing ``"\\n"``). A script that runs out is
  followed by ``<|eot_id|>``; ``generated_text`` leaves out the tokens whose :attr:`Token.skipped` is
  true (``skip_special_tokens=True``) while each token event carries its literal text and ``special``.
  ``seed`` is echoed only when sampling (``do_sample``, which defaults to true when ``parameters`` is
  absent, ``temperature`` != 1, ``top_k``, ``top_p`` < 1), a random u64 when the request has none.
* LoRA: ``config.lora_adapters`` are the ``LORA_ADAPTERS`` entries TGI was started with
  (``id[=path][@revision]``; the id is what comes before ``=`` and ``@``). ``parameters.adapter_id`` is a
  string or null (serde's 422 otherwise) and is never refused: an id TGI was not started with falls back to
  the base model, silently (flash_causal_lm.py, ``ADAPTER_TO_INDEX.get(adapter_id, 0)``).
  :attr:`GenerationRecord.adapter` is the adapter the generation used (None: the base model); the script
  sees ``parameters["adapter_id"]`` as sent.
* ``grammar`` as TGI validates it: serde's shape (``{"type": json|json_object|json_schema|regex, "value"}``),
  then ``grammar is not supported`` when ``config.disable_grammar_support``; a JSON schema must pass draft
  2020-12 meta-validation and have a top-level ``properties`` (``grammar is not valid: Grammar must have a
  'properties' field``) and is turned into a regex by outlines-core. The scripted output is then held to
  the grammar, as TGI's FSM would hold a model: when the generation ends (not on ``length``), the text
  before the EOS token (or the stop sequence) must ``re.fullmatch`` it, else the generation fails and an
  ``AssertionError`` lands in :attr:`FakeTGI.errors`: a test cannot script what no grammar allows
  (``config.enforce_grammar = False`` for a fixed script that answers every kind of request).
* Pacing: the first token at once, each next one ``config.token_delay`` s after the previous one was due.
* Faults: the script markers ``Pause(seconds)``, ``Gate`` (held until ``gate.open()``, from any thread),
  ``Fail(message)`` (``Request failed during generation: ...``), ``Incomplete`` (``Incomplete generation
  [stream]``), ``Drop`` (the connection is reset: no error event, no end of the chunked body, or no
  answer at all on ``/generate``); :meth:`FakeTGI.fail_next`; a script that raises is a generation error
  (the exception lands in :attr:`FakeTGI.errors`); ``config.max_concurrent_requests`` for overload;
  ``config.healthy``; ``load_delay``: the port is bound but not listening for that long (connections are
  refused, as before TGI logs ``Connected``).
* A client that goes away (FIN or RST) is noticed at once, whether the generation is waiting for its next
  token, paused or held by a gate, on both routes (hyper drops a closed connection's handler): the
  generation stops, its permit is released, the time is recorded (outcome ``disconnected``).
* Keep-alive connections, requests answered in order; a client that stops reading pauses its generation.

Not modelled (the gateway does not use it)
------------------------------------------

* The other routes (``/``, ``/ping``, ``/tokenize``, ``/metrics``, ``/v1/*``, ...): an empty 404 (405 for
  a known path with another method). TGI's ``date``/CORS headers, ``Expect: 100-continue``.
* ``top_n_tokens`` (validated as above): each token event then has ``top_tokens``, and ``/generate``'s details
  ``top_tokens`` (one list per token), as TGI sends them; a step's top tokens are :attr:`Token.top` when the
  script gives them, else the token itself then ``n - 1`` made-up alternatives, each less likely by 1.
* The parameters ``best_of``, ``decoder_input_details``, ``return_full_text``,
  ``truncate``, ``typical_p``, ``watermark``: a request that sets one
  (to anything but null/false) is refused with a 501 naming it, and a ``NotImplementedError`` in
  :attr:`FakeTGI.errors`, so that a gateway starting to send one fails loudly instead of passing.
* The tokenizer. Prompts are counted by a fixed rule (:func:`count_tokens`): one BOS token, one token per
  known special-token text (:func:`special_info`), ``ceil(n / 4)`` per run of ``n`` other characters.
  Generated tokens are the script's; their ``id``/``logprob`` default to stable values derived from the
  text (the Llama-3 specials' ids are the real ones). The ``special`` flags model a plain Llama-3
  tokenizer: ``<|begin_of_text|>``, ``<|eot_id|>``, ``<s>``, ``</s>``, ``<unk>``, ``<|endoftext|>`` are
  ``special: true``; the other ``<|...|>`` Llama-3 tokens (headers, ``<|eom_id|>``, ``<|python_tag|>``,
  ``<|reserved_special_token_N|>``) are ``special: false`` yet skipped from ``generated_text``; build a
  :class:`Token` yourself for another checkpoint.
* Sampling: ``seed``/``do_sample``/``temperature``... only decide what is echoed (scripts see the
  ``parameters`` and may use them). TGI's rounds of 1024 tokens; serde's ``at line L column C`` on shape
  errors.

Usage
-----

::

    with FakeTGI(script=tokens("Hel", "lo", "<|eot_id|>"), token_delay=0.02, max_total_tokens=4096) as tgi:
        gateway = start_gateway(tgi_url=tgi.url)
        tgi.script = lambda inputs, parameters: "It is sunny.<|eot_id|>"
        tgi.config.max_concurrent_requests = 1            # any TGIConfig field, at any time
        tgi.fail_next(after_tokens=3, message="CUDA out of memory")
        tgi.script = ["a", gate := Gate(), "b"]           # held until gate.open()
        assert tgi.last_generation.parameters["stop"] == ["<|eot_id|>"]

Observations
------------

:attr:`FakeTGI.requests` (:class:`RecordedRequest`, with the peer address: the same port means a reused
connection); :attr:`FakeTGI.generations` (:class:`GenerationRecord`: every generation request that passed
the extractor, its outcome, tokens, raw SSE bytes, ``disconnected_at``, ...; times are ``time.monotonic()``);
:attr:`FakeTGI.in_flight` (permits held) and :attr:`FakeTGI.peak_in_flight`, :attr:`FakeTGI.streams_open`,
:attr:`FakeTGI.generate_open`; :meth:`FakeTGI.wait_until` polls a predicate. Records are appended by the
server's thread; the properties return copies. A generation reads ``script`` and ``config`` when it starts.
Scripts run on the server's loop: they must not block. Defaults are TGI's launcher defaults
(``max_concurrent_requests=128``) except ``max_input_tokens``/``max_total_tokens`` (8191/8192).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import http
import json
import math
import random
import re
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Self

import httptools

__all__ = [
    "EOS",
    "EOT",
    "Drop",
    "Fail",
    "FakeTGI",
    "Gate",
    "GenerationRecord",
    "Incomplete",
    "Pause",
    "RecordedRequest",
    "Script",
    "TGIConfig",
    "Token",
    "count_tokens",
    "echo_script",
    "special",
    "special_info",
    "tokenize_text",
    "tokens",
]

START_TIMEOUT = 5.0
STOP_TIMEOUT = 5.0
COMPUTE_TYPE = "gpu+optimized"  # TGI's default x-compute-type
BOS_TEXT = "<|begin_of_text|>"  # the tokenizer adds it to every prompt

# --------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------


def _dumps(obj: Any) -> bytes:
    """serde_json's compact encoding."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Token:
    """One generated token.

    ``special`` is the flag sent on the wire; ``skip`` says whether ``generated_text`` drops the token
    (``None``: same as ``special``). ``id``/``logprob`` default to stable values derived from the text.
    ``top``: the step's ``top_tokens`` when the request asks for ``top_n_tokens`` (``None``: made up, see
    :meth:`top_tokens`).
    """

    text: str
    special: bool = False
    id: int | None = None
    logprob: float | None = None
    skip: bool | None = None
    top: tuple[Token, ...] | None = None

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
        return {"id": self.token_id, "text": self.text, "logprob": None if math.isnan(lp) else lp,
                "special": self.special}  # fmt: skip

    @functools.cached_property
    def wire(self) -> bytes:
        """:meth:`as_dict` as compact JSON (computed once per token object)."""
        return _dumps(self.as_dict())

    def top_tokens(self, n: int) -> list[Token]:
        """The step's ``top_n_tokens``: :attr:`top` as given, else this token and ``n - 1`` alternatives
        (``<text>~k``), each 1 less likely than the one before."""
        if self.top is not None:
            return list(self.top)
        lp = self.token_logprob
        return [self] + [Token(f"{self.text}~{k}", logprob=lp - k) for k in range(1, n)] if n else []

    def top_wire(self, n: int) -> bytes:
        """:meth:`top_tokens` as TGI's JSON list."""
        return b"[" + b",".join(t.wire for t in self.top_tokens(n)) + b"]"


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

_SPECIAL_SPLIT = re.compile(
    "(" + "|".join([re.escape(t) for t in sorted(_NAMED_SPECIALS, key=len, reverse=True)]
                   + [r"<\|reserved_special_token_\d+\|>"]) + ")"
)  # fmt: skip


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


@functools.lru_cache(maxsize=4096)
def _text_token(text: str) -> Token:
    info = special_info(text)
    return Token(text, special=info[1], id=info[0], skip=info[2]) if info else Token(text)


def _as_token(item: str | Token) -> Token:
    if isinstance(item, Token):
        return item
    if isinstance(item, str):
        return _text_token(item)
    raise TypeError(f"not a token: {item!r}")


def special(text: str, *, id: int | None = None, skip: bool | None = True) -> Token:
    """A token sent with ``special: true`` (and skipped from ``generated_text``)."""
    info = special_info(text)
    return Token(text, special=True, id=id if id is not None else (info[0] if info else None), skip=skip)


def tokens(*pieces: str | Token) -> list[Token]:
    """One token per piece. Known special-token texts get their table flags (:func:`special_info`)."""
    return [_as_token(p) for p in pieces]


EOT = special("<|eot_id|>")
EOS = special("</s>")

_WORDS = re.compile(r"\s*\S+|\s+")


def tokenize_text(text: str) -> list[Token]:
    """Cut ``text`` the way a BPE model would emit it: each known special-token text is one token with its
    flags, the text between is cut into words that keep their leading whitespace (``" there"``)."""
    out: list[Token] = []
    pos = 0
    for m in _SPECIAL_SCAN.finditer(text):
        if special_info(m.group(0)) is not None:
            out += [Token(w) for w in _WORDS.findall(text[pos : m.start()])]
            out.append(_as_token(m.group(0)))
            pos = m.end()
    return out + [Token(w) for w in _WORDS.findall(text[pos:])]


def count_tokens(inputs: str) -> int:
    """A prompt's length in tokens, as the double counts it: BOS, one token per special-token text,
    ``ceil(n / 4)`` per run of ``n`` other characters. (~50 ms for a 6 M-character prompt of 335k special
    tokens: the double validates on its one loop, so a slow count would stall its ``/health`` too, which
    TGI's router, tokenizing in worker threads, does not.)"""
    pieces = _SPECIAL_SPLIT.split(inputs)  # text, special, text, ..., text
    specials = pieces[1::2]
    if all(special_info(s) is not None for s in set(specials)):
        return 1 + len(specials) + sum([(len(text) + 3) >> 2 for text in pieces[0::2]])
    n, pos = 1, 0  # an out-of-range reserved token is text: count run by run
    for m in _SPECIAL_SCAN.finditer(inputs):
        if special_info(m.group(0)) is not None:
            n += -(-(m.start() - pos) // 4) + 1
            pos = m.end()
    return n - (-(len(inputs) - pos) // 4)


# --------------------------------------------------------------------------------------------
# Scripts
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
    """Reset the TCP connection here, as when TGI dies mid-response."""


class Gate:
    """Holds the generation at this point until :meth:`open` is called (from any thread); :meth:`close`
    re-arms it."""

    def __init__(self, opened: bool = False) -> None:
        self._lock = threading.Lock()
        self._open = opened
        self._waiters: list[tuple[asyncio.AbstractEventLoop, Callable[[], None]]] = []

    def open(self) -> None:
        with self._lock:
            self._open = True
            waiters, self._waiters = self._waiters, []
        for loop, wake in waiters:
            with contextlib.suppress(RuntimeError):  # that loop has stopped
                loop.call_soon_threadsafe(wake)

    def close(self) -> None:
        with self._lock:
            self._open = False

    @property
    def is_open(self) -> bool:
        return self._open

    def _wait(self, loop: asyncio.AbstractEventLoop, wake: Callable[[], None]) -> bool:
        """Call ``wake`` on ``loop`` once open; False (and no call) if it is open already."""
        with self._lock:
            if self._open:
                return False
            self._waiters.append((loop, wake))
            return True

    def _forget(self, wake: Callable[[], None]) -> None:
        with self._lock:
            self._waiters = [w for w in self._waiters if w[1] != wake]


ScriptItem = Token | str | Pause | Fail | Incomplete | Drop | Gate
#: What the model generates: a string (cut by :func:`tokenize_text`), a list of items, or a callable
#: ``(inputs, parameters) -> str | Iterable[ScriptItem]`` called once per generation (``parameters``: a
#: copy of the request's, ``{}`` when absent). Items are tokens (``Token``, or ``str`` = one token) or the
#: markers ``Pause``, ``Gate``, ``Fail``, ``Incomplete``, ``Drop``. Iterators are consumed one item at a
#: time, as the generation reaches them.
Script = str | Iterable[ScriptItem] | Callable[[str, dict], str | Iterable[ScriptItem]]


def echo_script(inputs: str, parameters: dict) -> list[Token]:
    """The default script: ``"echo:"`` and the last eight words of the prompt (special tokens removed)."""
    words = _SPECIAL_SCAN.sub(" ", inputs).split()[-8:]
    return tokenize_text("echo: " + " ".join(words) if words else "Hello!")


# --------------------------------------------------------------------------------------------
# Configuration and records
# --------------------------------------------------------------------------------------------


@dataclass
class TGIConfig:
    """The launcher's settings and the double's knobs; mutable at run time."""

    # /info, in TGI's order (launcher defaults unless noted)
    model_id: str = "meetkai/functionary-small-v3.2"
    model_sha: str | None = "0123456789abcdef0123456789abcdef01234567"
    model_pipeline_tag: str | None = "text-generation"
    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_input_tokens: int = 8191
    max_total_tokens: int = 8192
    validation_workers: int = 2
    max_client_batch_size: int = 4
    version: str = "3.3.6-dev0"
    sha: str | None = None
    docker_label: str | None = None
    # the router
    payload_limit: int = 2_000_000
    api_key: str | None = None
    healthy: bool = True
    eos_texts: frozenset[str] = frozenset(
        {"<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "</s>", "<|endoftext|>"}
    )
    # timing
    token_delay: float = 0.0  # between tokens (the first one comes at once)
    keepalive_interval: float | None = 15.0  # ":\n\n" after this long without an event; None: never
    load_delay: float = 0.0  # the port refuses connections this long after start()
    # LORA_ADAPTERS, as the launcher got it: the adapters requests may select with `adapter_id`
    lora_adapters: tuple[str, ...] = ()
    # Launcher flags (tests/fakes/docker_engine.py passes them on). max_top_n_tokens is read (it is not in
    # TGI's /info), disable_grammar_support too; enable_prefill_logprobs governs decoder_input_details, which
    # the double does not model.
    max_top_n_tokens: int = 5
    disable_grammar_support: bool = False  # every grammar refused: "grammar is not supported"
    # the double's knob: hold the scripted output to the request's grammar (off: a test whose fixed script
    # answers requests of every kind, e.g. fuzzing, where the grammar is validated but the output is not)
    enforce_grammar: bool = True
    enable_prefill_logprobs: bool = False


_INFO_FIELDS = ("model_id", "model_sha", "model_pipeline_tag", "max_concurrent_requests", "max_best_of",
                "max_stop_sequences", "max_input_tokens", "max_total_tokens", "validation_workers",
                "max_client_batch_size", "router", "version", "sha", "docker_label")  # fmt: skip


@dataclass
class RecordedRequest:
    method: str
    path: str  # without the query
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    json: Any  # the parsed body, or None when it is not JSON
    client: tuple[str, int] | None = None  # peer address: same port = same (reused) connection


@dataclass
class GenerationRecord:
    """One generation request that got past the extractor."""

    request: RecordedRequest
    route: str  # "generate" | "generate_stream"
    stream: bool
    inputs: str
    parameters: dict
    outcome: str = "running"  # running | completed | validation | overloaded | generation | incomplete |
    # dropped (the Drop marker) | disconnected | aborted (the double stopped, or a bug in it)
    error: str | None = None
    input_length: int | None = None
    finish_reason: str | None = None
    generated_text: str | None = None
    adapter: str | None = None  # the LoRA adapter used (None: the base model, an unknown id included)
    tokens: list[Token] = field(default_factory=list)  # generated (for a stream: sent)
    events: list[bytes] = field(default_factory=list)  # the raw SSE events written, keep-alives included
    ended_at: float | None = None
    disconnected_at: float | None = None  # when the double noticed that the client had gone

    @property
    def disconnected(self) -> bool:
        return self.disconnected_at is not None

    @property
    def done(self) -> bool:
        return self.ended_at is not None


# --------------------------------------------------------------------------------------------
# Errors, extraction and validation (axum's Json extractor, router/src/validation.rs)
# --------------------------------------------------------------------------------------------

_STATUS = {"validation": 422, "generation": 424, "overloaded": 429, "incomplete_generation": 500}


class _InferError(Exception):
    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type, self.message = error_type, message

    @property
    def outcome(self) -> str:
        return "incomplete" if self.error_type.startswith("incomplete") else self.error_type

    def body(self) -> bytes:
        return _dumps({"error": self.message, "error_type": self.error_type})


def _validation(message: str) -> _InferError:
    return _InferError("validation", f"Input validation error: {message}")


def _generation(message: str) -> _InferError:
    return _InferError("generation", f"Request failed during generation: {message}")


class _Reply(Exception):
    """A response decided before generation (a rejection): ``(status, content type, body)``."""

    def __init__(self, status: int, body: str = "", content_type: str = "text/plain; charset=utf-8") -> None:
        super().__init__(status, body)
        self.status, self.body, self.content_type = status, body.encode(), content_type


# serde's types of the parameters the double models, for the extractor's 422s
_KINDS = {"details": "bool", "do_sample": "bool", "frequency_penalty": "?f32", "max_new_tokens": "?u32",
          "repetition_penalty": "?f32", "seed": "?u64", "stop": "seq", "temperature": "?f32", "top_k": "?i32",
          "top_n_tokens": "?u32", "top_p": "?f32", "adapter_id": "?str"}  # fmt: skip
_UNMODELLED = ("best_of", "decoder_input_details", "return_full_text", "truncate",
               "typical_p", "watermark")  # fmt: skip
_EXPECTED = {"bool": "a boolean", "f32": "f32", "u32": "u32", "u64": "u64", "i32": "i32", "seq": "a sequence"}
_EXPECTED["str"] = "a string"
_RANGES = {"u32": (0, 2**32 - 1), "u64": (0, 2**64 - 1), "i32": (-(2**31), 2**31 - 1)}


def _unexpected(v: Any) -> str:
    """serde's name of a JSON value's type."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"boolean `{str(v).lower()}`"
    if isinstance(v, int):
        return f"integer `{v}`"
    if isinstance(v, float):
        return f"floating point `{v!r}`"
    if isinstance(v, str):
        return "string " + json.dumps(v, ensure_ascii=False)
    return "sequence" if isinstance(v, list) else "map"


def _type_error(kind: str, v: Any) -> str | None:
    if kind.startswith("?"):
        if v is None:
            return None
        kind = kind[1:]
    if kind == "bool":
        ok = isinstance(v, bool)
    elif kind == "str":
        ok = isinstance(v, str)
    elif kind == "f32":
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    elif kind == "seq":
        if isinstance(v, list):
            bad = next((i for i, item in enumerate(v) if not isinstance(item, str)), None)
            return None if bad is None else f"[{bad}]: invalid type: {_unexpected(v[bad])}, expected a string"
        ok = False
    else:  # an integer
        if isinstance(v, int) and not isinstance(v, bool):
            lo, hi = _RANGES[kind]
            return None if lo <= v <= hi else f"invalid value: integer `{v}`, expected {kind}"
        ok = False
    return None if ok else f"invalid type: {_unexpected(v)}, expected {_EXPECTED[kind]}"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid number `{name}`")


def _parse_json(body: bytes) -> tuple[Any, str | None]:
    """``(value, None)``, or ``(None, serde-like error)``."""
    try:
        return json.loads(body.decode(), parse_constant=_reject_constant), None
    except json.JSONDecodeError as e:
        what = "EOF while parsing a value" if e.pos >= len(e.doc.rstrip()) else e.msg.lower()
        return None, f"{what} at line {e.lineno} column {e.colno}"
    except ValueError as e:  # UnicodeDecodeError included
        return None, str(e)


def _extract(request: RecordedRequest, body: bytes, payload_limit: int, errors: list) -> dict:
    """``axum::Json<GenerateRequest>``: the request object, or raises the :class:`_Reply` of its rejection."""
    mime = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if not (mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))):
        raise _Reply(415, "Expected request with `Content-Type: application/json`")
    if len(body) > payload_limit:
        raise _Reply(413, "Failed to buffer the request body: length limit exceeded")
    obj, error = (request.json, None) if request.json is not None else _parse_json(body)
    if error is not None:
        raise _Reply(400, f"Failed to parse the request body as JSON: {error}")

    def shape(message: str) -> _Reply:
        return _Reply(422, f"Failed to deserialize the JSON body into the target type: {message}")

    if not isinstance(obj, dict):
        raise shape(f"invalid type: {_unexpected(obj)}, expected struct GenerateRequest")
    if "inputs" not in obj:
        raise shape("missing field `inputs`")
    if not isinstance(obj["inputs"], str):
        raise shape(f"inputs: invalid type: {_unexpected(obj['inputs'])}, expected a string")
    if "parameters" not in obj:
        return obj
    params = obj["parameters"]
    if not isinstance(params, dict):
        raise shape(f"parameters: invalid type: {_unexpected(params)}, expected struct GenerateParameters")
    for name, kind in _KINDS.items():
        if name in params and (err := _type_error(kind, params[name])) is not None:
            raise shape(f"parameters.{name}{'' if err.startswith('[') else ': '}{err}")
    if params.get("grammar") is not None and (err := _grammar_shape(params["grammar"])) is not None:
        raise shape(f"parameters.grammar: {err}")
    for name in _UNMODELLED:
        if params.get(name) not in (None, False):
            errors.append(NotImplementedError(f"the TGI double does not model parameters.{name}"))
            raise _Reply(501, f"the TGI double does not model parameters.{name}")
    return obj


def _adapter(lora_adapters: Iterable[str], adapter_id: str | None) -> str | None:
    """The adapter TGI applies for `adapter_id`: itself when it is the id of one of the ``LORA_ADAPTERS``
    entries (server/text_generation_server/utils/adapter.py, parse_lora_adapters), else None (the base)."""
    ids = {re.split(r"[=@]", entry.strip(), maxsplit=1)[0] for entry in lora_adapters}
    return adapter_id if adapter_id in ids else None


@dataclass
class _Valid:
    input_length: int
    max_new_tokens: int
    stop: list[str]
    details: bool
    seed: int | None  # echoed in details: only when sampling
    top_n: int = 0  # top_n_tokens
    grammar: re.Pattern[str] | None = None  # what the output must match (TGI's FSM would allow nothing else)


# lib.rs GrammarType: serde adjacently tagged {"type": ..., "value": ...}; "json_object" is an alias of "json".
_GRAMMAR_TYPES = ("json", "json_object", "json_schema", "regex")


def _grammar_shape(grammar: Any) -> str | None:
    """serde's complaint about a ``grammar`` that is not a ``GrammarType``, or None."""
    if not isinstance(grammar, dict):
        return f"invalid type: {_unexpected(grammar)}, expected adjacently tagged enum GrammarType"
    kind = grammar.get("type")
    if kind not in _GRAMMAR_TYPES:
        if kind is None:
            return "missing field `type`"
        return f"unknown variant `{kind}`, expected one of " + ", ".join(f"`{t}`" for t in _GRAMMAR_TYPES)
    if "value" not in grammar:
        return "missing field `value`"
    value = grammar["value"]
    if kind == "regex" and not isinstance(value, str):
        return f"invalid type: {_unexpected(value)}, expected a string"
    if kind == "json_schema" and not (isinstance(value, dict) and "schema" in value):
        return "missing field `schema`" if isinstance(value, dict) else f"invalid type: {_unexpected(value)}"
    return None


@functools.lru_cache(maxsize=64)
def _compile_grammar(regex: str) -> re.Pattern[str]:
    return re.compile(regex)


def _grammar(c: TGIConfig, grammar: dict) -> re.Pattern[str]:
    """validation.rs: a grammar is refused when TGI runs with --disable-grammar-support; a JSON schema must
    pass draft 2020-12 meta-validation and have a top-level ``properties``, and is turned into a regex with
    outlines-core (TGI's router uses the Rust crate of the same project); a regex is taken as is."""
    if c.disable_grammar_support:
        raise _validation("grammar is not supported")
    kind, value = grammar["type"], grammar["value"]
    if kind == "regex":
        try:
            return _compile_grammar(value)
        except re.error as e:  # TGI's shard would fail to build its FSM
            raise _generation(f"the grammar regex does not compile: {e}") from None
    schema = value["schema"] if kind == "json_schema" else value
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise _validation(f"grammar is not valid: {e}") from None
    import jsonschema  # the test extras: only a grammar needs it
    from outlines_core.json_schema import build_regex_from_schema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise _validation(f"grammar is not valid: {e.message}") from None
    if not isinstance(schema, dict) or "properties" not in schema:
        raise _validation("grammar is not valid: Grammar must have a 'properties' field")
    try:
        return _compile_grammar(build_regex_from_schema(json.dumps(schema)))
    except ValueError as e:
        raise _validation(f"cannot compile regex from schema: {e}") from None


# TGI's per-parameter rules, in validation.rs's order: (parameter, refused when, message)
_RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("temperature", lambda v: v <= 0, "`temperature` must be strictly positive"),
    ("repetition_penalty", lambda v: v <= 0, "`repetition_penalty` must be strictly positive"),
    ("frequency_penalty", lambda v: not -2 <= v <= 2, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ("top_p", lambda v: not 0 < v < 1, "`top_p` must be > 0.0 and < 1.0"),
    ("top_k", lambda v: v <= 0, "`top_k` must be strictly positive"),
    ("max_new_tokens", lambda v: v == 0, "`max_new_tokens` must be strictly positive"),
]


# A prompt longer than this is validated (its tokens counted) in a worker thread, as TGI's router does on its
# tokenizer workers: the double's loop, its /health included, does not stall behind a multi-megabyte prompt.
_VALIDATE_INLINE_CHARS = 256 * 1024


def _validate(c: TGIConfig, inputs: str, params: dict | None) -> _Valid:
    p = params or {}
    for name, refused, message in _RULES:
        if p.get(name) is not None and refused(p[name]):
            raise _validation(message)
    stop = p.get("stop") or []
    if len(stop) > c.max_stop_sequences:
        raise _validation(f"`stop` supports up to {c.max_stop_sequences} stop sequences. Given: {len(stop)}")
    top_n = p.get("top_n_tokens") or 0
    if top_n > c.max_top_n_tokens:
        raise _validation(f"`top_n_tokens` must be >= 0 and <= {c.max_top_n_tokens}. Given: {top_n}")
    if inputs == "":
        raise _validation("`inputs` cannot be empty")
    input_length = count_tokens(inputs)
    max_new = p.get("max_new_tokens")
    cap = max_new if max_new is not None else max(0, c.max_total_tokens - input_length)
    checked = max_new if max_new is not None else min(cap, 1024)
    if input_length + checked > c.max_total_tokens:
        raise _validation(
            f"`inputs` tokens + `max_new_tokens` must be <= {c.max_total_tokens}. "
            f"Given: {input_length} `inputs` tokens and {checked} `max_new_tokens`"
        )
    if input_length > c.max_input_tokens:
        raise _validation(f"`inputs` must have less than {c.max_input_tokens} tokens. Given: {input_length}")
    t, top_p = p.get("temperature"), p.get("top_p")
    sampling = (
        (p.get("do_sample", False) if params is not None else True)
        or (t is not None and t != 1.0)
        or bool(p.get("top_k"))
        or (top_p is not None and top_p < 1.0)
    )
    seed = (p["seed"] if p.get("seed") is not None else random.getrandbits(64)) if sampling else None
    grammar = _grammar(c, p["grammar"]) if p.get("grammar") is not None else None
    return _Valid(input_length, cap, stop, bool(p.get("details")), seed, top_n, grammar)


# --------------------------------------------------------------------------------------------
# HTTP/1.1
# --------------------------------------------------------------------------------------------

_TOKEN_EVENT = b'data: {"index":%d,"token":%b,"generated_text":null,"details":null}\n\n'
_FINAL_EVENT = b'data: {"index":%d,"token":%b,"generated_text":%b,"details":%b}\n\n'
# With top_n_tokens: TGI's StreamResponse puts top_tokens between the token and generated_text.
_TOP_TOKEN_EVENT = b'data: {"index":%d,"token":%b,"top_tokens":%b,"generated_text":null,"details":null}\n\n'
_TOP_FINAL_EVENT = b'data: {"index":%d,"token":%b,"top_tokens":%b,"generated_text":%b,"details":%b}\n\n'
_KEEPALIVE = b":\n\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def _head(status: int, headers: Iterable[tuple[str, str]], close: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}", *(f"{k}: {v}" for k, v in headers)]
    if close:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class _Connection(asyncio.Protocol):
    """One client connection: requests are parsed (httptools) as they arrive and answered one after the
    other; the generation being answered learns at once when the connection goes."""

    transport: asyncio.Transport

    def __init__(self, fake: FakeTGI) -> None:
        self.fake = fake
        self.peer: tuple[str, int] | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.pending: collections.deque[tuple[RecordedRequest, bytes, bool]] = collections.deque()
        self.busy = False  # a response is being written
        self.close_after = False
        self.generation: _Generation | None = None
        self.paused = False  # the client does not read: the transport's buffer is full
        self.on_resume: Callable[[], None] | None = None
        self._url, self._headers, self._body = b"", {}, []

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = (peer[0], peer[1]) if peer else None
        self.fake._connections.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.busy:
                self.transport.close()
            else:
                self.busy = True
                self.respond(400, close=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fake._connections.discard(self)
        if self.generation is not None:
            self.generation.client_left()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        resume, self.on_resume = self.on_resume, None
        if resume is not None:
            resume()

    # httptools' callbacks
    def on_message_begin(self) -> None:
        self._url, self._headers, self._body = b"", {}, []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        self._headers[key] = f"{self._headers[key]}, {text}" if key in self._headers else text

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        body = b"".join(self._body)
        path = self._url.decode("latin-1").partition("?")[0]
        parsed = _parse_json(body)[0] if body else None
        request = RecordedRequest(self.parser.get_method().decode(), path, self._headers, parsed, self.peer)
        self.pending.append((request, body, self.parser.should_keep_alive()))
        self.next_request()

    # responses
    def next_request(self) -> None:
        if self.pending and not self.busy and not self.transport.is_closing():
            request, body, keep_alive = self.pending.popleft()
            self.busy, self.close_after = True, not keep_alive
            self.fake._dispatch(self, request, body)

    def respond(self, status: int, body: bytes = b"", content_type: str | None = None,
                headers: Iterable[tuple[str, str]] = (), close: bool = False) -> None:  # fmt: skip
        """A whole response (``content-length``)."""
        hs = [("content-type", content_type)] if content_type else []
        hs += [*headers, ("content-length", str(len(body)))]
        self.close_after |= close
        self.transport.write(_head(status, hs, self.close_after) + body)
        self.done()

    def start_stream(self, headers: Iterable[tuple[str, str]]) -> None:
        self.transport.write(_head(200, [*headers, ("transfer-encoding", "chunked")], self.close_after))

    def end_stream(self, last: bytes) -> None:
        self.transport.write(_chunk(last) + b"0\r\n\r\n")
        self.done()

    def done(self) -> None:
        """The response is written: the next request, if any (a pipelining client)."""
        self.busy, self.generation = False, None
        if self.close_after:
            self.transport.close()
        elif self.pending:
            self.fake._loop.call_soon(self.next_request)  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------

_END = object()


class _Generation:
    """One generation request, from its response head to its end, driven by the server loop's callbacks:
    pull a script item, act on it (a token: emit it when due), pull the next. No task, no coroutine."""

    valid: _Valid

    def __init__(self, fake: FakeTGI, conn: _Connection, record: GenerationRecord) -> None:
        c = fake.config
        self.fake, self.conn, self.record, self.stream = fake, conn, record, record.stream
        self.loop: asyncio.AbstractEventLoop = fake._loop  # type: ignore[assignment]
        self.delay, self.eos_texts = c.token_delay, c.eos_texts
        self.keepalive = c.keepalive_interval if record.stream else None
        self.items: Iterator[Any] = iter(())
        self.permit = self.eos_appended = False
        self.fault: tuple[int, str] | None = None
        self.stops: tuple[str, ...] = ()
        self.window, self.window_size = "", 1
        self.timer: asyncio.Handle | None = None
        self.gate: Gate | None = None
        self.pending: Token = EOT  # the token that is waiting to be emitted
        self.max_new_tokens = 0
        self._emit = self.emit  # (one bound method for every token's callback)
        self.received_at = self.validated_at = time.monotonic()
        self.due = self.last_event = self.loop.time()  # when the last token was due; the last write

    def run(self, params: dict | None) -> None:
        """Answer: head (stream), permit, validation, the script; then tokens as they come due."""
        fake, c, record = self.fake, self.fake.config, self.record
        if self.stream:
            self.conn.start_stream([("content-type", "text/event-stream"), ("cache-control", "no-cache"),
                                    ("x-compute-type", COMPUTE_TYPE), ("x-compute-characters", str(len(record.inputs))),
                                    ("x-accel-buffering", "no")])  # fmt: skip
            fake._streams_open += 1
        else:
            fake._generate_open += 1
        fake._running.add(self)
        try:
            if fake._in_flight >= c.max_concurrent_requests:
                raise _InferError("overloaded", "Model is overloaded")
            if len(record.inputs) > _VALIDATE_INLINE_CHARS:  # as TGI's router: tokenized off the loop
                validation = self.loop.run_in_executor(None, _validate, c, record.inputs, params)
                validation.add_done_callback(self.validated)
                return
            valid = _validate(c, record.inputs, params)
        except _InferError as e:
            self.fail(e)
            return
        self.start(valid)

    def validated(self, validation: asyncio.Future[_Valid]) -> None:
        """A long prompt's validation, done in a worker thread, is over: go on unless the client left."""
        if self.record.ended_at is not None:
            return
        try:
            valid = validation.result()
        except _InferError as e:
            self.fail(e)
            return
        except Exception as e:  # noqa: BLE001 - a bug in the double: make it visible
            self.crash(e)
            return
        self.start(valid)

    def start(self, valid: _Valid) -> None:
        """The request is valid: take a slot, then the script's items."""
        fake, record = self.fake, self.record
        try:
            self.valid = valid
            record.input_length, self.validated_at = valid.input_length, time.monotonic()
            self.max_new_tokens = valid.max_new_tokens
            fake._in_flight += 1
            fake._peak_in_flight = max(fake._peak_in_flight, fake._in_flight)
            self.permit = True
            self.fault = fake._faults.popleft() if fake._faults else None
            self.stops = (*valid.stop, *(s + "\n" for s in valid.stop))  # `$` also matches before a last "\n"
            self.window_size = max(map(len, valid.stop), default=0) + 1
            script = fake.script
            try:
                produced = script(record.inputs, dict(record.parameters)) if callable(script) else script
                self.items = iter(tokenize_text(produced) if isinstance(produced, str) else produced)
            except Exception as e:
                fake.errors.append(e)
                raise _generation(f"script raised {e!r}") from e
        except _InferError as e:
            self.fail(e)
            return
        self.pull()

    # ---- the loop
    def pull(self) -> None:
        try:
            while True:
                try:
                    item = next(self.items, _END)
                except Exception as e:
                    self.fake.errors.append(e)
                    raise _generation(f"script raised {e!r}") from e
                if type(item) is not Token:
                    if isinstance(item, str):
                        item = _text_token(item)
                    elif self.marker(item):
                        continue
                    else:
                        return
                self.pending = item
                if self.delay and self.record.tokens:
                    self.due += self.delay
                    self.wait(self.due, self._emit)
                else:
                    self.timer = self.loop.call_soon(self._emit)
                return
        except _InferError as e:
            self.fail(e)
        except Exception as e:  # noqa: BLE001 - a bug in the double (or a bad item): make it visible
            self.crash(e)

    def marker(self, item: Any) -> bool:
        """Act on a script item that is not a token; True: pull the next one at once."""
        if item is _END:  # the script ran out: EOS, as a model would say
            if self.eos_appended:
                raise _InferError("incomplete_generation", "Incomplete generation")
            self.eos_appended, self.items = True, iter([EOT])
            return True
        if isinstance(item, Pause):
            self.due = self.loop.time() + item.seconds
            self.wait(self.due, self.resume)
        elif isinstance(item, Gate):
            if not item._wait(self.loop, self.gate_opened):
                return True
            self.gate = item
            self.wait(math.inf, None)
        elif isinstance(item, Fail):
            raise _generation(item.message)
        elif isinstance(item, Incomplete):
            raise _InferError("incomplete_generation", "Incomplete generation")
        elif isinstance(item, Drop):
            self.end("dropped")
            self.conn.transport.abort()
        else:
            raise TypeError(f"not a script item: {item!r}")
        return False

    def wait(self, due: float, then: Callable[[], None] | None) -> None:
        """Call ``then`` at ``due`` (loop time); keep-alives in between when a stream waits that long."""
        ka = self.keepalive
        if ka is not None and due > self.last_event + ka:
            self.timer = self.loop.call_at(self.last_event + ka, self.keep_alive, due, then)
        elif due < math.inf:
            self.timer = self.loop.call_at(due, then)  # type: ignore[arg-type]

    def keep_alive(self, due: float, then: Callable[[], None] | None) -> None:
        self.record.events.append(_KEEPALIVE)
        self.last_event = self.loop.time()
        self.conn.transport.write(_chunk(_KEEPALIVE))
        self.wait(due, then)

    def resume(self) -> None:
        self.due = self.loop.time()
        self.pull()

    def gate_opened(self) -> None:
        if self.gate is not None and self.record.ended_at is None:
            self.gate = None
            if self.timer is not None:
                self.timer.cancel()
            self.resume()

    def emit(self) -> None:
        tok, record = self.pending, self.record
        toks = record.tokens
        try:
            if self.fault is not None and len(toks) >= self.fault[0]:
                raise _generation(self.fault[1])
            toks.append(tok)
            n = len(toks)
            if n >= self.max_new_tokens:
                self.finish("length")
            elif tok.text in self.eos_texts:
                self.finish("eos_token")
            elif self.stops and self.stopped(tok.text):
                self.finish("stop_sequence")
            else:
                if self.stream:
                    top_n = self.valid.top_n
                    event = (
                        _TOP_TOKEN_EVENT % (n, tok.wire, tok.top_wire(top_n))
                        if top_n
                        else _TOKEN_EVENT % (n, tok.wire)
                    )
                    record.events.append(event)
                    self.last_event = self.loop.time()
                    conn = self.conn
                    conn.transport.write(b"%x\r\n%b\r\n" % (len(event), event))
                    if conn.paused:  # the client does not read: wait for it (TGI's stream backs up too)
                        conn.on_resume = self.pull
                        return
                self.pull()
        except _InferError as e:
            self.fail(e)
        except Exception as e:  # noqa: BLE001 - a bug in the double: make it visible
            self.crash(e)

    def stopped(self, text: str) -> bool:
        self.window = w = (self.window + text)[-self.window_size :]
        return w.endswith(self.stops)

    # ---- the ends
    def finish(self, reason: str) -> None:
        record, valid, toks = self.record, self.valid, self.record.tokens
        if valid.grammar is not None and reason != "length" and self.fake.config.enforce_grammar:
            self.check_grammar(valid.grammar, reason)
        n, text = len(toks), "".join(t.text for t in toks if not t.skipped)
        record.finish_reason, record.generated_text = reason, text
        self.end("completed")
        if self.stream:
            details = {"finish_reason": reason, "generated_tokens": n, "seed": valid.seed,
                       "input_length": valid.input_length} if valid.details else None  # fmt: skip
            last, top_n = toks[-1], valid.top_n
            if top_n:
                event = _TOP_FINAL_EVENT % (n, last.wire, last.top_wire(top_n), _dumps(text), _dumps(details))
            else:
                event = _FINAL_EVENT % (n, last.wire, _dumps(text), _dumps(details))
            record.events.append(event)
            self.conn.end_stream(event)
            return
        body = b'{"generated_text":%b' % _dumps(text)
        if valid.details:
            body += b',"details":{"finish_reason":%b,"generated_tokens":%d,"seed":%b,"prefill":[],"tokens":[%b]' % (
                _dumps(reason), n, _dumps(valid.seed), b",".join(t.wire for t in toks))  # fmt: skip
            if valid.top_n:
                body += b',"top_tokens":[%b]' % b",".join(t.top_wire(valid.top_n) for t in toks)
            body += b"}"
        now = time.monotonic()
        total, inference = now - self.received_at, now - self.validated_at
        headers = {"x-compute-type": COMPUTE_TYPE, "x-compute-time": repr(total),
                   "x-compute-characters": len(record.inputs), "x-total-time": int(total * 1000),
                   "x-validation-time": int((self.validated_at - self.received_at) * 1000), "x-queue-time": 0,
                   "x-inference-time": int(inference * 1000), "x-time-per-token": int(inference * 1000 / n),
                   "x-prompt-tokens": valid.input_length, "x-generated-tokens": n}  # fmt: skip
        self.conn.respond(200, body + b"}", "application/json", [(k, str(v)) for k, v in headers.items()])

    def check_grammar(self, grammar: re.Pattern[str], reason: str) -> None:
        """A model under a grammar can only write what it matches, then EOS: a script that does otherwise
        is a wrong test (an AssertionError in :attr:`FakeTGI.errors`, and the generation fails)."""
        toks = self.record.tokens
        text = "".join(t.text for t in (toks[:-1] if reason == "eos_token" else toks))
        if reason == "stop_sequence":
            text = text[: -len(next(s for s in self.stops if self.window.endswith(s)))]
        if grammar.fullmatch(text) is None:
            message = f"the scripted output {text[:200]!r} does not match the request's grammar"
            self.fake.errors.append(AssertionError(message))
            raise _generation(message)

    def fail(self, e: _InferError) -> None:
        """TGI's error: one event that ends the stream, or a JSON answer with its status."""
        if self.record.ended_at is not None:
            return
        if e.error_type == "incomplete_generation" and self.stream:
            e = _InferError("incomplete_generation_stream", "Incomplete generation stream")
        self.end(e.outcome, e.message)
        if self.stream:
            event = b"data: " + e.body() + b"\n\n"
            self.record.events.append(event)
            self.conn.end_stream(event)
        else:
            self.conn.respond(_STATUS[e.error_type], e.body(), "application/json")

    def crash(self, e: Exception) -> None:
        self.fake.errors.append(e)
        self.end("aborted", repr(e))
        self.conn.transport.abort()

    def client_left(self) -> None:
        if self.record.ended_at is None:
            self.record.disconnected_at = time.monotonic()
            self.end("disconnected")

    def end(self, outcome: str, error: str | None = None) -> None:
        """Record the outcome and let go of all the generation holds (once)."""
        record, fake = self.record, self.fake
        if record.ended_at is not None:
            return
        record.outcome, record.error, record.ended_at = outcome, error, time.monotonic()
        if self.timer is not None:
            self.timer.cancel()
        if self.gate is not None:
            self.gate._forget(self.gate_opened)
        self.conn.on_resume = None
        fake._running.discard(self)
        fake._in_flight -= self.permit
        if self.stream:
            fake._streams_open -= 1
        else:
            fake._generate_open -= 1


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


class FakeTGI:
    """The TGI double (see the module docstring). ``FakeTGI(script=None, *, port=0, host="127.0.0.1",
    **config)``: ``config`` keywords are :class:`TGIConfig` fields; ``script`` (default :func:`echo_script`)
    and ``config`` may change at any time. ``host``: another loopback address (``127.0.0.2``, … on Linux)
    gives several doubles on one port, as replicas behind one name."""

    def __init__(
        self, script: Script | None = None, *, port: int = 0, host: str = "127.0.0.1", **config: Any
    ) -> None:
        self.config = TGIConfig(**config)
        self.script: Script = script if script is not None else echo_script
        self.host, self.port = host, port
        self.errors: list[BaseException] = []  # raised by scripts, or by the double itself
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._generations: list[GenerationRecord] = []
        self._faults: collections.deque[tuple[int, str]] = collections.deque()  # (after tokens, message)
        self._running: set[_Generation] = set()
        self._connections: set[_Connection] = set()
        self._in_flight = self._peak_in_flight = self._streams_open = self._generate_open = 0
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._listening = False
        self._error: BaseException | None = None
        self._routes: dict[tuple[str, str], Callable[[_Connection, RecordedRequest, bytes], None]] = {
            ("GET", "/health"): self._health,
            ("GET", "/info"): self._info,
            ("POST", "/generate"): self._generate,
            ("POST", "/generate_stream"): self._generate,
        }

    # ---------------------------------------------------------------- life cycle

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ready(self) -> bool:
        """True while the port accepts connections."""
        return self._listening

    def start(self, wait: bool | None = None) -> FakeTGI:
        """Start in a background thread; return once the port listens (with ``load_delay`` and ``wait`` not
        true: at once, while the port refuses connections until "warm-up" ends; see :meth:`wait_ready`)."""
        if self._thread is not None:
            raise RuntimeError("already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted sockets inherit it (Linux): a small response must not wait for a delayed ACK (~40 ms).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((self.host, self.port))  # bound, not listening: connections are refused
        self.port, self._sock = sock.getsockname()[1], sock
        self._thread = threading.Thread(target=self._thread_main, name=f"fake-tgi-{self.port}", daemon=True)
        self._thread.start()
        if wait or (wait is None and self.config.load_delay <= 0):
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        timeout = START_TIMEOUT + max(0.0, self.config.load_delay) if timeout is None else timeout
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
        finally:
            self._listening = False
            self._ready.set()

    async def _serve(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        stopping = self._stopping = asyncio.Event()
        assert self._sock is not None
        try:
            if self.config.load_delay > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stopping.wait(), self.config.load_delay)
            if stopping.is_set():
                return
            server = await loop.create_server(lambda: _Connection(self), sock=self._sock, backlog=4096)
            self._listening = True
            self._ready.set()
            await stopping.wait()
            self._listening = False
            server.close()
            for gen in list(self._running):
                gen.end("aborted")
            for conn in list(self._connections):
                conn.transport.abort()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        finally:
            self._sock.close()

    def stop(self) -> None:
        """Stop the server (idempotent, bounded)."""
        thread = self._thread
        if thread is None:
            return
        deadline = time.monotonic() + STOP_TIMEOUT
        while self._stopping is None and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.001)
        if self._loop is not None and self._stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed already
                self._loop.call_soon_threadsafe(self._stopping.set)
        thread.join(max(0.0, deadline - time.monotonic()))
        self._thread = None
        if thread.is_alive():
            raise RuntimeError("fake TGI did not stop in time")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- test controls

    def fail_next(self, after_tokens: int = 0, message: str = "CUDA out of memory") -> None:
        """The next generation fails after ``after_tokens`` tokens: ``Request failed during generation:
        <message>``."""
        self._faults.append((after_tokens, message))

    def reset(self) -> None:
        """Forget the recorded requests, generations and errors, and pending faults."""
        with self._lock:
            self._requests.clear()
            self._generations.clear()
            self._faults.clear()
            self.errors.clear()
            self._peak_in_flight = self._in_flight

    def forget_finished(self) -> list[GenerationRecord]:
        """Forget the recorded requests and the generations that have ended (returned): for long runs, whose
        records would otherwise grow by megabytes a minute. Running generations stay recorded."""
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
    def streams_open(self) -> int:
        """``/generate_stream`` responses being written."""
        return self._streams_open

    @property
    def generate_open(self) -> int:
        """``/generate`` requests being answered (waiting for a permit or generating)."""
        return self._generate_open

    def wait_until(self, predicate: Callable[[], Any], timeout: float = 2.0, interval: float = 0.002) -> bool:
        """Poll ``predicate`` until true (returns True) or ``timeout`` (returns False)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)
        return True

    async def wait_until_async(
        self, predicate: Callable[[], Any], timeout: float = 2.0, interval: float = 0.002
    ) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(interval)
        return True

    # ---------------------------------------------------------------- routes (on the server's loop)

    def _dispatch(self, conn: _Connection, request: RecordedRequest, body: bytes) -> None:
        with self._lock:
            self._requests.append(request)
        route = self._routes.get((request.method, request.path))
        try:
            if route is None:
                raise _Reply(405 if any(request.path == path for _, path in self._routes) else 404)
            route(conn, request, body)
        except _Reply as r:
            conn.respond(r.status, r.body, r.content_type if r.body else None)
        except Exception as e:  # noqa: BLE001 - a bug in the double: make it visible
            self.errors.append(e)
            conn.respond(500, f"fake TGI internal error: {e!r}".encode(), "text/plain", close=True)

    def _health(self, conn: _Connection, request: RecordedRequest, body: bytes) -> None:
        if not self.config.healthy:
            raise _Reply(503, '{"error":"unhealthy","error_type":"healthcheck"}', "application/json")
        conn.respond(200)

    def _info(self, conn: _Connection, request: RecordedRequest, body: bytes) -> None:
        info = {name: getattr(self.config, name, None) for name in _INFO_FIELDS}
        info["router"] = "text-generation-router"
        conn.respond(200, _dumps(info), "application/json")

    def _generate(self, conn: _Connection, request: RecordedRequest, body: bytes) -> None:
        c = self.config
        if (
            c.api_key is not None
            and request.headers.get("authorization", "").lower() != f"bearer {c.api_key}".lower()
        ):
            raise _Reply(401)
        obj = _extract(request, body, c.payload_limit, self.errors)
        params = obj.get("parameters")
        stream = request.path == "/generate_stream"
        record = GenerationRecord(request, request.path[1:], stream, obj["inputs"], dict(params or {}))
        record.adapter = _adapter(c.lora_adapters, (params or {}).get("adapter_id"))
        with self._lock:
            self._generations.append(record)
        gen = conn.generation = _Generation(self, conn, record)
        gen.run(params)
