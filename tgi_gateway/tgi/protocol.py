"""TGI's wire protocol, without I/O: its values, its event stream's decoding, its bodies, its errors.

The routes (``shared/reference/tgi/PROTOCOL.md``): ``POST /generate_stream`` (an SSE stream of token
events), ``POST /generate`` (one JSON answer once the generation is complete), ``GET /info`` (the
router's limits), ``GET /health``. :mod:`tgi_gateway.tgi.client` does the I/O and feeds what it reads here.

The stream grammar (TGI 3.x; axum SSE). The status is 200 even for errors; events are
``data: <compact JSON>\\n\\n``, keep-alives are ``:\\n\\n`` comments, there is no ``[DONE]``::

    stream := token* (final | error)
    token  := {"index": n, "token": {"id", "text", "logprob", "special"},
               "generated_text": null, "details": null}
    final  := a token event with "generated_text": "<text>" and "details": {...}
              (details stays null unless the request asked for details: true)
    error  := {"error": "<text>", "error_type": "validation" | "overloaded" | "generation" | ...}

Worked example (``details: true``)::

    data: {"index":1,"token":{"id":9906,"text":"Hi","logprob":-0.1,"special":false},
           "generated_text":null,"details":null}                                  (one line on the wire)
    :
    data: {"index":2,"token":{"id":128009,"text":"<|eot_id|>","logprob":-0.2,"special":true},
           "generated_text":"Hi",
           "details":{"finish_reason":"eos_token","generated_tokens":2,"seed":null,"input_length":5}}

    → Token("Hi", False, 9906), Token("<|eot_id|>", True, 128009),
      StreamEnd(finish_reason="eos_token", generated_tokens=2, input_length=5, generated_text="Hi")

``/generate`` with ``details: true`` (the prompt's token count is only in the ``x-prompt-tokens``
header; the details carry no ``input_length``)::

    x-prompt-tokens: 5
    {"generated_text":"Hi","details":{"finish_reason":"eos_token","generated_tokens":2,"seed":null,
     "prefill":[],"tokens":[{"id":9906,"text":"Hi","logprob":-0.1,"special":false},
                            {"id":128009,"text":"<|eot_id|>","logprob":-0.2,"special":true}]}}

    → Generation(tokens=[Token("Hi", False, 9906), Token("<|eot_id|>", True, 128009)],
                 finish_reason="eos_token", generated_tokens=2, input_length=5)

:class:`StreamDecoder` turns a ``/generate_stream`` body, in whatever pieces it arrives, into those items
(:class:`SSEDecoder` below it); :func:`parse_generation` and :func:`parse_info` read the two JSON answers.

TGI's own errors — ``{"error", "error_type"}`` bodies and stream events (decoded in one place,
``_error_of``), and bare HTTP statuses — become the gateway's :class:`~tgi_gateway.errors.UpstreamError`
tree in one function, :func:`map_tgi_error`, from two tables: by ``error_type`` (``_BY_TYPE``), else by
status (``_BY_STATUS``); each message is written once.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..errors import (
    InvalidRequestError,
    TGIContextLengthError,
    TGIGenerationError,
    TGIOverloadedError,
    TGIProtocolError,
    TGIRejectedError,
    TGIUnavailableError,
    TGIValidationError,
    UpstreamError,
)

# A /generate answer: ~100 bytes a token, so even TGI's largest contexts stay far below this; more is not TGI.
MAX_GENERATE_BODY = 64 * 1024 * 1024
# One event of /generate_stream. A token event is ~150 bytes; the largest legitimate one is the final event,
# which repeats the whole generation as `generated_text` (special tokens skipped): at most max_total_tokens
# tokens (128k for today's largest Functionary contexts) of at most a few dozen bytes each once JSON-escaped
# (control characters become 6-byte \u escapes), i.e. a few MiB. 16 MiB leaves a wide margin and still
# bounds what a broken or hostile upstream can make the gateway hold per stream.
MAX_SSE_EVENT = 16 * 1024 * 1024
# /info is about a kilobyte; more is not TGI.
MAX_INFO_BODY = 1024 * 1024
# Tells the OpenAI SDKs not to retry (an answer that is not TGI's protocol would be the same again).
NO_RETRY = {"x-should-retry": "false"}
# What reading a token object that is not one raises (``parse_token``).
NOT_A_TOKEN = (TypeError, KeyError, AttributeError)
#: The error message of a token stream that ends before TGI's final event (the body ended, or broke).
STREAM_CUT = "TGI closed the stream before the end of the generation"

# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Token:
    """One generated token: its literal text (special tokens included) and TGI's ``special`` flag.

    Read with ``logprobs`` (:class:`StreamDecoder`, :func:`parse_generation`), also TGI's ``logprob``
    (``None`` when TGI sends null) and ``top``: the ``(text, logprob)`` of TGI's ``top_tokens`` for this
    step, as TGI sends them (``top_n_tokens`` of them, more on ties, in any order); else ``None`` and ``()``.
    """

    text: str
    special: bool
    id: int
    logprob: float | None = None
    top: tuple[tuple[str, float | None], ...] = ()


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """The end of a generation, yielded after the final event's token.

    ``finish_reason`` is ``"length"``, ``"eos_token"`` or ``"stop_sequence"``, or ``None`` when the
    request did not ask for ``details`` (TGI then sends none). ``generated_tokens`` is TGI's count,
    or the number of token events seen without details. ``generated_text`` skips special tokens.
    """

    finish_reason: str | None
    generated_tokens: int
    input_length: int | None
    generated_text: str | None


@dataclass(frozen=True, slots=True)
class Generation:
    """A whole generation, from ``POST /generate`` with ``details: true``.

    ``tokens`` are TGI's ``details.tokens``: each token's literal text, special tokens included (the
    parsers need them), with its ``special`` flag. ``finish_reason`` is ``"length"``, ``"eos_token"`` or
    ``"stop_sequence"`` (``None`` if TGI sent none), ``generated_tokens`` TGI's count (else the number of
    tokens), ``input_length`` the prompt's tokens from the ``x-prompt-tokens`` header (``None`` when
    it is absent or not a number).
    """

    tokens: list[Token]
    finish_reason: str | None
    generated_tokens: int
    input_length: int | None


@dataclass(frozen=True)
class TGIInfo:
    """``GET /info``: the limits TGI's router enforces. Missing fields take the launcher defaults
    (``max_input_tokens``/``max_total_tokens`` also read TGI 1.x's ``max_input_length``, else the
    2.x defaults 4095/4096). ``max_top_n_tokens`` is ``None`` unless TGI reports it (TGI 3.x does not:
    the gateway then uses its ``--max-top-logprobs``). ``raw`` is the whole body."""

    model_id: str
    max_input_tokens: int = 4095
    max_total_tokens: int = 4096
    max_stop_sequences: int = 4
    max_concurrent_requests: int = 128
    max_best_of: int = 2
    version: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, hash=False, repr=False)
    max_top_n_tokens: int | None = None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> TGIInfo:
        def number(*keys: str, default: int) -> int:
            for key in keys:
                value = body.get(key)
                if isinstance(value, int) and not isinstance(value, bool):
                    return value
            return default

        model_id = body.get("model_id")
        version = body.get("version")
        return cls(
            model_id=model_id if isinstance(model_id, str) else "",
            max_input_tokens=number("max_input_tokens", "max_input_length", default=cls.max_input_tokens),
            max_total_tokens=number("max_total_tokens", default=cls.max_total_tokens),
            max_stop_sequences=number("max_stop_sequences", default=cls.max_stop_sequences),
            max_concurrent_requests=number("max_concurrent_requests", default=cls.max_concurrent_requests),
            max_best_of=number("max_best_of", default=cls.max_best_of),
            max_top_n_tokens=top_n
            if type(top_n := body.get("max_top_n_tokens")) is int and top_n >= 0
            else None,
            version=version if isinstance(version, str) else None,
            raw=dict(body),
        )


# --------------------------------------------------------------------------------------------
# TGI errors → the gateway's tree (the one mapping)
# --------------------------------------------------------------------------------------------

# TGI parameter (as named in its validation messages) → the OpenAI request field it comes from,
# where that is one-to-one. Others (top_k, repetition_penalty, typical_p, truncate, best_of,
# grammar, ...) are set by the gateway or have no OpenAI field: no `param`.
_OPENAI_PARAM = {
    "inputs": "messages",
    "max_new_tokens": "max_tokens",
    "stop": "stop",
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "frequency_penalty": "frequency_penalty",
    "top_n_tokens": "top_logprobs",
}
# validation.rs: "`inputs` must have less than {max_input} tokens. Given: {n}" and
# "`inputs` tokens + `max_new_tokens` must be <= {max_total}. Given: ..."
_CONTEXT_LENGTH = re.compile(
    r"`inputs` must have less than \d+ tokens|`inputs` tokens \+ `max_new_tokens` must be"
)
_FIRST_NAME = re.compile(r"`(\w+)`")
# axum's Json rejection for a parameter of the wrong type: "...: parameters.temperature: invalid type: ..."
_EXTRACTOR_PARAM = re.compile(r"\bparameters\.(\w+)")
_GENERATION_PREFIX = "Request failed during generation: "
# validation.rs, a TGI launched with --disable-grammar-support: "Input validation error: grammar is not supported"
_GRAMMAR_OFF = "grammar is not supported"


def _validation(text: str, status: int | None) -> TGIValidationError:
    if _CONTEXT_LENGTH.search(text):
        return TGIContextLengthError(text, param="messages")
    if _GRAMMAR_OFF in text:
        return TGIValidationError(
            "TGI refuses grammars (it was started with --disable-grammar-support), so response_format and "
            "named or required tool choices cannot be enforced: start TGI without that flag, or the gateway "
            f"with --no-grammar. TGI said: {text}",
            param="response_format",
            code="grammar_disabled",
        )
    name = _FIRST_NAME.search(text)
    return TGIValidationError(text, param=_OPENAI_PARAM.get(name[1]) if name else None)


def _overloaded(text: str, status: int | None) -> UpstreamError:
    return TGIOverloadedError(f"TGI is overloaded: {text or 'Model is overloaded'}")


def _generation(text: str, status: int | None) -> UpstreamError:
    return TGIGenerationError(f"TGI failed during generation: {text.removeprefix(_GENERATION_PREFIX)}")


def _unhealthy(text: str, status: int | None) -> UpstreamError:
    return TGIUnavailableError(f"TGI is unhealthy: {text}")


def _detail(text: str) -> str:
    return f": {text}" if text else ""


def _unprocessable(text: str, status: int | None) -> UpstreamError:
    if text.startswith("Input validation error"):
        return _validation(text, status)
    name = _EXTRACTOR_PARAM.search(text)
    if name:  # a parameter of the wrong type or range: the client's value, passed through
        return TGIValidationError(text, param=_OPENAI_PARAM.get(name[1]))
    return _unreadable(text, status)


def _too_large(text: str, status: int | None) -> UpstreamError:
    return TGIContextLengthError(
        f"The request is too large for TGI (HTTP {status}){_detail(text)}", param="messages"
    )


def _unreadable(text: str, status: int | None) -> UpstreamError:
    return TGIRejectedError(f"TGI could not read the gateway's request (HTTP {status}){_detail(text)}")


def _credentials(text: str, status: int | None) -> UpstreamError:
    return TGIRejectedError(
        f"TGI refused the gateway's credentials (HTTP {status}): "
        f"check the API key configured for TGI{_detail(text)}"
    )


def _no_route(text: str, status: int | None) -> UpstreamError:
    return TGIRejectedError(f"TGI has no such route (HTTP {status}): is the TGI URL right?{_detail(text)}")


def _not_there(text: str, status: int | None) -> UpstreamError:  # a proxy in front of TGI answered
    return TGIUnavailableError(f"TGI is not available (HTTP {status}){_detail(text)}")


_Make = Callable[[str, int | None], UpstreamError]
#: TGI's ``error_type`` (its ``InferError``/``ValidationError`` kinds) → the gateway's error.
_BY_TYPE: dict[str, _Make] = {
    "validation": _validation,
    "overloaded": _overloaded,
    "generation": _generation,
    "incomplete_generation": _generation,
    "incomplete_generation_stream": _generation,
    "healthcheck": _unhealthy,
}
#: An HTTP status whose body names no known ``error_type`` (axum's text rejections, a proxy's page) →
#: the gateway's error. 424 and 429 are the statuses TGI gives generation errors and overload.
_BY_STATUS: dict[int, _Make] = {
    400: _unreadable,
    401: _credentials,
    403: _credentials,
    404: _no_route,
    405: _no_route,
    408: _not_there,
    413: _too_large,
    415: _unreadable,
    422: _unprocessable,
    424: _generation,
    429: _overloaded,
    502: _not_there,
    503: _not_there,
    504: _not_there,
}


def map_tgi_error(error_type: str | None, message: str, status: int | None = None) -> UpstreamError:
    """The gateway error for a TGI error: an ``{"error", "error_type"}`` body or stream event, or
    (``error_type`` ``None``: a body that is not TGI's JSON) the HTTP ``status`` and body text.

    A known ``error_type`` decides (``_BY_TYPE``); otherwise the status does (``_BY_STATUS``); otherwise a
    plain 502 with TGI's text.
    """
    text = (message or "").strip()
    make = _BY_TYPE.get(error_type) if error_type else None
    if make is None and status is not None:
        make = _BY_STATUS.get(status)
    if make is not None:
        return make(text, status)
    if error_type:
        return UpstreamError(f"TGI error ({error_type}): {text}")
    return UpstreamError(
        f"TGI answered HTTP {status}: {text}" if status is not None else f"TGI error: {text}"
    )


def _error_of(obj: Mapping[str, Any], status: int | None) -> UpstreamError:
    """TGI's error object, in a body or a stream event: ``{"error": <text, or {"message": <text>}>,
    "error_type": <kind>}`` → its gateway error."""
    error, error_type = obj["error"], obj.get("error_type")
    message = error.get("message", "") if isinstance(error, dict) else error
    return map_tgi_error(
        error_type if isinstance(error_type, str) else None,
        message if isinstance(message, str) else orjson.dumps(message).decode(),
        status,
    )


def error_from_body(status: int, content_type: str, body: bytes) -> UpstreamError:
    """Map a non-200 response: TGI's JSON ``{"error", "error_type"}``, or text (axum, proxies)."""
    text = body.decode("utf-8", "replace")
    if "json" in content_type.lower():
        try:
            obj = orjson.loads(text)
        except orjson.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and "error" in obj:
            return _error_of(obj, status)
    return map_tgi_error(None, text, status)


def expect_content_type(route: str, content_type: str, media_type: str) -> None:
    """A 200 answer of another type is not TGI's (a proxy's page, a wrong URL): not worth retrying."""
    if content_type.partition(";")[0].strip().lower() != media_type:
        raise TGIProtocolError(
            f"TGI answered {route} with Content-Type {content_type!r}, not {media_type}", headers=NO_RETRY
        )


# --------------------------------------------------------------------------------------------
# Bodies: the request, the tokens of both routes, the /generate answer
# --------------------------------------------------------------------------------------------


def request_body(inputs: str, parameters: Mapping[str, Any]) -> bytes:
    """``{"inputs", "parameters"}`` (``parameters`` as given), as TGI's JSON parser reads it."""
    for name, value in parameters.items():  # orjson would write NaN and infinity as null
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidRequestError(f"Invalid parameter value: {name} = {value}")
    return orjson.dumps({"inputs": inputs, "parameters": dict(parameters)})


def parse_token(raw: Any) -> Token:
    """TGI's token object ``{"id", "text", "logprob", "special"}`` (a stream event's ``token``, an item of
    ``/generate``'s ``details.tokens``) → :class:`Token`; raises one of ``NOT_A_TOKEN`` if it is not
    one."""
    text = raw["text"]
    if not isinstance(text, str):
        raise TypeError
    return Token(text, bool(raw.get("special", False)), raw["id"])


def _number(value: Any) -> float | None:
    return float(value) if type(value) in (int, float) else None


def _top(raw: Any) -> tuple[tuple[str, float | None], ...]:
    """TGI's ``top_tokens`` of one step (a list of token objects) → ``(text, logprob)`` pairs."""
    if not isinstance(raw, list):
        return ()
    return tuple(
        (t["text"], _number(t.get("logprob")))
        for t in raw
        if isinstance(t, dict) and isinstance(t.get("text"), str)
    )


def parse_scored_token(raw: Any, top: Any) -> Token:
    """:func:`parse_token` with the token's ``logprob`` and the step's ``top_tokens`` (``top``)."""
    token = parse_token(raw)
    return Token(token.text, token.special, token.id, _number(raw.get("logprob")), _top(top))


def parse_generation(content: bytes, prompt_tokens: str | None, *, logprobs: bool = False) -> Generation:
    """The body of a 200 ``/generate`` answer (and its ``x-prompt-tokens`` header) → :class:`Generation`;
    with ``logprobs``, each token's ``logprob`` and its step of ``details.top_tokens`` are read too."""

    def invalid(what: str) -> TGIProtocolError:  # not TGI's answer: a retry would get the same
        return TGIProtocolError(f"TGI's /generate answer {what}: {content[:200]!r}", headers=NO_RETRY)

    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        raise invalid("is not JSON") from None
    if not isinstance(body, dict):
        raise invalid("is not a JSON object")
    details = body.get("details")
    if not isinstance(details, dict):
        raise invalid("has no `details` object (the gateway asks for details)")
    raw_tokens = details.get("tokens")
    if not isinstance(raw_tokens, list):
        raise invalid("has no list of `details.tokens`")
    try:
        if logprobs:
            tops = details.get("top_tokens")
            tops = (
                tops if isinstance(tops, list) and len(tops) == len(raw_tokens) else [None] * len(raw_tokens)
            )
            tokens = [parse_scored_token(raw, top) for raw, top in zip(raw_tokens, tops)]
        else:
            tokens = [parse_token(raw) for raw in raw_tokens]
    except NOT_A_TOKEN:
        raise invalid("has an invalid token in `details.tokens`") from None
    finish_reason, generated = details.get("finish_reason"), details.get("generated_tokens")
    return Generation(
        tokens=tokens,
        finish_reason=finish_reason if isinstance(finish_reason, str) else None,
        generated_tokens=generated if type(generated) is int else len(tokens),
        input_length=token_count(prompt_tokens),
    )


def token_count(header: str | None) -> int | None:
    """A header holding a number of tokens (``x-prompt-tokens``), or None."""
    value = (header or "").strip()
    return int(value) if value.isascii() and value.isdigit() else None


def generate_too_large() -> TGIProtocolError:
    """A ``/generate`` answer over :data:`MAX_GENERATE_BODY` (announced, or read): not TGI's."""
    return TGIProtocolError(f"TGI's /generate answer is over {_size(MAX_GENERATE_BODY)}", headers=NO_RETRY)


def info_too_large() -> TGIProtocolError:
    """An ``/info`` answer over :data:`MAX_INFO_BODY` (announced, or read): not TGI's."""
    return TGIProtocolError(f"TGI's /info answer is over {_size(MAX_INFO_BODY)}", headers=NO_RETRY)


def parse_info(content: bytes) -> TGIInfo:
    """The body of a 200 ``/info`` answer → :class:`TGIInfo`."""
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        text = content.decode("utf-8", "replace")
        raise TGIProtocolError(f"TGI answered /info with something that is not a JSON object: {text[:200]!r}")
    return TGIInfo.from_json(body)


# --------------------------------------------------------------------------------------------
# The stream
# --------------------------------------------------------------------------------------------


class SSEDecoder:
    """Incremental Server-Sent Events decoder (sans-IO): bytes in any pieces → the events' ``data``.

    Follows the SSE grammar where it matters here: ``\\n``, ``\\r\\n`` or ``\\r`` end lines (also
    when a ``\\r\\n`` is split between two pieces), a blank line ends an
    event, ``data:`` lines are joined with ``\\n`` (one leading space dropped), comments (``:``) and
    other fields are ignored, an event without data is not dispatched. Data stays ``bytes``
    (orjson parses them directly; a bad UTF-8 sequence is then a JSON error).

    Bounded (as h11 bounds an incomplete event): at most ``max_event`` bytes of an unfinished event (its
    complete lines, their ends included, and its unfinished line) are held from one piece to the next.
    When a piece leaves more, :attr:`error` is set (so no more than ``max_event`` plus one piece is ever
    held: a piece is one read), what was held is dropped, and every later piece is ignored; the events
    that piece completed are still returned. An unfinished line is kept as a list of pieces, so a long
    line costs one copy when it ends, not one per piece.
    """

    __slots__ = ("_after_cr", "_data", "_held", "_max", "_pending", "_pending_size", "error")

    def __init__(self, max_event: int = MAX_SSE_EVENT) -> None:
        self._max = max_event
        self._pending: list[bytes] = []  # the unfinished line's pieces (line ends already normalised to LF)
        self._pending_size = 0
        self._data: list[bytes] = []
        self._held = 0  # bytes of the current event's complete lines
        self._after_cr = False  # the last piece ended with CR: an LF starting the next one is its pair
        self.error: TGIProtocolError | None = None

    def feed(self, chunk: bytes) -> list[bytes]:
        if self.error is not None:
            return []
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._after_cr = chunk.endswith(b"\r")
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        events: list[bytes] = []
        pending = self._pending
        if chunk.rfind(b"\n") < 0:  # the line goes on: keep the piece (no copy), check the bound
            if chunk:
                pending.append(chunk)
                self._pending_size += len(chunk)
                if self._held + self._pending_size > self._max:
                    self._overflow()
            return events
        if pending:
            pending.append(chunk)
            buf = b"".join(pending)
            pending.clear()
        else:
            buf = chunk
        data = self._data
        held = self._held  # the current event's complete lines before this piece
        event_from = start = 0
        find = buf.find
        while (end := find(b"\n", start)) >= 0:
            if end == start:  # blank line: the event is complete
                if data:
                    events.append(data[0] if len(data) == 1 else b"\n".join(data))
                    data = self._data = []
                held, event_from = 0, end + 1
            elif buf.startswith(b"data:", start):
                value = buf[start + 5 : end]
                data.append(value[1:] if value[:1] == b" " else value)
            start = end + 1
        rest = len(buf) - start
        if rest:
            pending.append(buf[start:])
        self._pending_size = rest
        self._held = held = held + start - event_from
        if held + rest > self._max:  # checked once a piece: a piece is one read
            self._overflow()
        return events

    @property
    def buffered(self) -> int:
        """The bytes of the current event held so far (complete lines and the unfinished one)."""
        return self._held + self._pending_size

    def _overflow(self) -> None:
        self.error = event_too_large(self._max)
        self._pending.clear()
        self._pending_size, self._data, self._held = 0, [], 0


def event_too_large(limit: int) -> TGIProtocolError:
    """A stream event (or line) over ``limit`` bytes: not TGI's (MAX_SSE_EVENT says why)."""
    return TGIProtocolError(
        f"TGI sent a stream event over {_size(limit)} (the gateway's cap on one event): not TGI's protocol",
        headers=NO_RETRY,
    )


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n} bytes"


class StreamDecoder:
    """The items of a ``/generate_stream`` body fed in any pieces (sans-IO): a :class:`Token` per token
    event, then one :class:`StreamEnd` right after the final event's token.

    :meth:`feed` returns the items a piece completes, in order. After the final event nothing more is
    decoded (:attr:`ended`). An error event, or an event that is not TGI's (not JSON, not an object, no valid
    token), sets :attr:`error` -- the :class:`~tgi_gateway.errors.UpstreamError` the reader raises once it
    has handed out the items before it -- and ends the decoding too. :meth:`end_of_body` is the error of a
    body that ends where it is (``None`` after the final event). :attr:`tokens` counts the token events.
    With ``logprobs`` each :class:`Token` also has TGI's ``logprob`` and the event's ``top_tokens``.

    Worked example (the stream of the module docstring, cut inside its second event)::

        feed(b'data: {"index":1,"token":{"id":9906,"text":"Hi",...},...}\\n\\n:\\n\\ndata: {"index":2,"tok')
            → [Token("Hi", False, 9906)]
        feed(b'en":{"id":128009,...,"special":true},"generated_text":"Hi","details":{...}}\\n\\n')
            → [Token("<|eot_id|>", True, 128009), StreamEnd("eos_token", 2, 5, "Hi")]        (ended)
    """

    __slots__ = ("_scored", "_sse", "ended", "error", "tokens")

    def __init__(self, *, logprobs: bool = False) -> None:
        self._scored = logprobs
        self._sse = SSEDecoder()
        self.tokens = 0
        self.ended = False
        self.error: UpstreamError | None = None

    def feed(self, chunk: bytes) -> list[Token | StreamEnd]:
        out: list[Token | StreamEnd] = []
        if self.ended or self.error is not None:
            return out
        sse = self._sse
        for data in sse.feed(chunk):
            try:
                self._event(data, out)
            except UpstreamError as exc:
                self.error = exc
                break
            if self.ended:
                break  # TGI sends nothing after the final event
        else:
            if sse.error is not None:  # an event over MAX_SSE_EVENT, after the items before it
                self.error = sse.error
        return out

    def end_of_body(self) -> TGIProtocolError | None:
        return None if self.ended else TGIProtocolError(STREAM_CUT)

    def _event(self, data: bytes, out: list[Token | StreamEnd]) -> None:
        if data.startswith(b"[DONE]"):  # a proxy's sentinel
            return
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise TGIProtocolError(f"TGI sent a stream event that is not JSON: {data[:200]!r}") from None
        if not isinstance(obj, dict):
            raise TGIProtocolError(f"TGI sent a stream event that is not an object: {data[:200]!r}")
        raw = obj.get("token")
        if raw is None and "error" in obj:
            raise _error_of(obj, None)
        try:
            out.append(parse_scored_token(raw, obj.get("top_tokens")) if self._scored else parse_token(raw))
        except NOT_A_TOKEN:
            raise TGIProtocolError(f"TGI sent a stream event without a valid token: {data[:200]!r}") from None
        self.tokens += 1
        generated_text, details = obj.get("generated_text"), obj.get("details")
        if generated_text is None and details is None:
            return
        self.ended = True
        if isinstance(details, dict):
            generated = details.get("generated_tokens")
            out.append(
                StreamEnd(
                    finish_reason=details.get("finish_reason"),
                    generated_tokens=generated if isinstance(generated, int) else self.tokens,
                    input_length=details.get("input_length"),
                    generated_text=generated_text,
                )
            )
        else:
            out.append(StreamEnd(None, self.tokens, None, generated_text))
