"""The gateway's client to Text-Generation-Inference: transport, protocol, errors.

Theory of operation
-------------------
:class:`TGIClient` lives as long as the app and holds two connection pools to TGI's router: the
generations go through :mod:`tgi_gateway.http1` (lean: it is the hot path), the control routes through one
``httpx.AsyncClient`` (its ``transport`` argument is their test seam). It speaks four routes of TGI's
router (``shared/reference/tgi/PROTOCOL.md``):

* ``POST /generate_stream`` (stream requests) -- :meth:`TGIClient.generate_stream` is an async
  context manager.
  Entering it sends ``{"inputs", "parameters"}`` and waits for the response *head* only. A
  connection failure there (refused, connect timeout, closed before any response) is retried a few
  times with a short exponential backoff, then raised as :class:`TGIUnavailableError`; nothing is
  ever retried once a response has arrived. The context yields a :class:`TokenStream`:
  :class:`Token` items (one per SSE event) and, after the final event's token, one :class:`StreamEnd`.
  Leaving the context -- normally, by an exception or by cancellation -- closes the connection at
  once unless the stream was read to its end: closing it is how TGI drops a request from its batch.
* ``POST /generate`` (non-stream requests) -- :meth:`TGIClient.generate` sends the same body through the
  same pool, with the same connection retries, and returns one :class:`Generation`: TGI answers once the
  generation is complete, so one timeout (``request_timeout``) bounds the whole of it. The answer's
  ``details.tokens`` are the same per-token texts (special tokens included, with their ``special`` flag)
  as the stream's events, so the parsers are fed exactly as from a stream; ``generated_text`` drops the
  special tokens and is never used. Cancelling the call closes the connection at once (TGI then drops
  the request); a complete answer gives its connection back to the pool.
* ``GET /health`` -- :meth:`TGIClient.health`, a quick yes/no.
* ``GET /info`` -- :meth:`TGIClient.info`, the limits the router enforces, as :class:`TGIInfo`.

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

A stream that ends before its final event is a :class:`TGIProtocolError`; an error event raises the
error :func:`map_tgi_error` makes of it (the caller knows whether tokens were already sent).

``/generate`` with ``details: true`` (PROTOCOL.md §2.2, §2.3: the prompt's token count is only in the
``x-prompt-tokens`` header, the details carry no ``input_length``)::

    x-prompt-tokens: 5
    {"generated_text":"Hi","details":{"finish_reason":"eos_token","generated_tokens":2,"seed":null,
     "prefill":[],"tokens":[{"id":9906,"text":"Hi","logprob":-0.1,"special":false},
                            {"id":128009,"text":"<|eot_id|>","logprob":-0.2,"special":true}]}}

    → Generation(tokens=[Token("Hi", False, 9906), Token("<|eot_id|>", True, 128009)],
                 finish_reason="eos_token", generated_tokens=2, input_length=5)

Errors. Every failure leaves this module as an :class:`~tgi_gateway.errors.UpstreamError`. Foreign
exceptions are translated where they arise (httpx's in :func:`_translated`, :mod:`~tgi_gateway.http1`'s in
:meth:`TGIClient._open`, :meth:`TGIClient.generate` and :meth:`TokenStream._read`); TGI's own error
bodies, error events and HTTP statuses are mapped in one function, :func:`map_tgi_error`.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import re
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential, wait_random

from . import __version__, http1
from .errors import (
    InvalidRequestError,
    TGIContextLengthError,
    TGIGenerationError,
    TGIOverloadedError,
    TGIProtocolError,
    TGIRejectedError,
    TGITimeoutError,
    TGIUnavailableError,
    TGIValidationError,
    UpstreamError,
)

__all__ = [
    "HEALTH_TIMEOUT",
    "Generation",
    "SSEDecoder",
    "StreamEnd",
    "TGIClient",
    "TGIInfo",
    "Token",
    "TokenStream",
    "map_tgi_error",
]

#: Connect quickly or report TGI unreachable.
DEFAULT_CONNECT_TIMEOUT = 2.0
#: The first event may wait for a place in TGI's batch (TGI queues what it cannot batch yet, and
#: sends keep-alive comments meanwhile — they do not count as the first token).
DEFAULT_FIRST_TOKEN_TIMEOUT = 120.0
#: Between two events: TGI sends a keep-alive comment after 15 s without a token, so 60 s is only
#: reached by a TGI that hangs.
DEFAULT_READ_TIMEOUT = 60.0
#: A non-stream generation in all, queueing included (``/generate`` answers only once it is complete):
#: the OpenAI SDK's own default total timeout.
DEFAULT_REQUEST_TIMEOUT = 600.0
#: httpx's pool serves only the control routes (/health, /info): a few connections are plenty.
CONTROL_LIMITS = httpx.Limits(max_connections=16, max_keepalive_connections=4, keepalive_expiry=30.0)
#: /health is a readiness probe: a slow answer counts as "not healthy".
HEALTH_TIMEOUT = 2.0

# Failures that happen before any response byte: the request cannot have started a generation that
# goes on (a reset connection is a disconnect for TGI), so sending it again is safe. Timeouts while
# waiting for the response, and everything after it, are not retried.
_RETRIED = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.RemoteProtocolError,
    httpx.ReadError,
    httpx.WriteError,
)
# Backoff between attempts: 50 ms, 100 ms, then 200 ms at most, plus up to 20 ms of jitter so that
# many streams failing together do not retry in step. Three attempts wait about 0.15-0.19 s in all.
_BACKOFF = wait_exponential(multiplier=0.05, max=0.2) + wait_random(0, 0.02)
# An error body is short (TGI's JSON, axum's one-line text, a proxy's small page); read no more.
_MAX_ERROR_BODY = 8192
# Body pieces read after the final event while reading to the end of the body (which lets the
# connection go back to the pool); past this many something is wrong and the connection is dropped.
_MAX_CHUNKS_AFTER_END = 16
# A /generate answer: ~100 bytes a token, so even TGI's largest contexts stay far below this; more is not TGI.
_MAX_GENERATE_BODY = 64 * 1024 * 1024
_TOO_LARGE = f"TGI's /generate answer is over {_MAX_GENERATE_BODY >> 20} MiB"


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Token:
    """One generated token: its literal text (special tokens included) and TGI's ``special`` flag."""

    text: str
    special: bool
    id: int


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
    2.x defaults 4095/4096). ``raw`` is the whole body."""

    model_id: str
    max_input_tokens: int = 4095
    max_total_tokens: int = 4096
    max_stop_sequences: int = 4
    max_concurrent_requests: int = 128
    max_best_of: int = 2
    version: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, hash=False, repr=False)

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


def map_tgi_error(error_type: str | None, message: str, status: int | None = None) -> UpstreamError:
    """The gateway error for a TGI error: an ``{"error", "error_type"}`` body or stream event, or
    (``error_type`` ``None``: a body that is not TGI's JSON) the HTTP ``status`` and body text.

    A known ``error_type`` decides; otherwise the status does; otherwise a plain 502 with TGI's text.
    """
    text = (message or "").strip()
    if error_type == "validation":
        return _validation_error(text)
    if error_type == "overloaded":
        return TGIOverloadedError(f"TGI is overloaded: {text or 'Model is overloaded'}")
    if error_type in ("generation", "incomplete_generation", "incomplete_generation_stream"):
        return TGIGenerationError(f"TGI failed during generation: {text.removeprefix(_GENERATION_PREFIX)}")
    if error_type == "healthcheck":
        return TGIUnavailableError(f"TGI is unhealthy: {text}")
    if status is not None:
        error = _status_error(status, text)
        if error is not None:
            return error
    if error_type:
        return UpstreamError(f"TGI error ({error_type}): {text}")
    return UpstreamError(
        f"TGI answered HTTP {status}: {text}" if status is not None else f"TGI error: {text}"
    )


def _validation_error(text: str) -> TGIValidationError:
    if _CONTEXT_LENGTH.search(text):
        return TGIContextLengthError(text, param="messages")
    name = _FIRST_NAME.search(text)
    return TGIValidationError(text, param=_OPENAI_PARAM.get(name[1]) if name else None)


def _status_error(status: int, text: str) -> UpstreamError | None:
    detail = f": {text}" if text else ""
    if status == 422:
        if text.startswith("Input validation error"):
            return _validation_error(text)
        name = _EXTRACTOR_PARAM.search(text)
        if name:  # a parameter of the wrong type or range: the client's value, passed through
            return TGIValidationError(text, param=_OPENAI_PARAM.get(name[1]))
        return TGIRejectedError(f"TGI could not read the gateway's request (HTTP 422){detail}")
    if status == 413:
        return TGIContextLengthError(f"The request is too large for TGI (HTTP 413){detail}", param="messages")
    if status in (400, 415):
        return TGIRejectedError(f"TGI could not read the gateway's request (HTTP {status}){detail}")
    if status in (401, 403):
        return TGIRejectedError(
            f"TGI refused the gateway's credentials (HTTP {status}): "
            f"check the API key configured for TGI{detail}"
        )
    if status in (404, 405):
        return TGIRejectedError(f"TGI has no such route (HTTP {status}): is the TGI URL right?{detail}")
    if status == 424:
        return TGIGenerationError(f"TGI failed during generation: {text.removeprefix(_GENERATION_PREFIX)}")
    if status == 429:
        return TGIOverloadedError(f"TGI is overloaded: {text or 'Model is overloaded'}")
    if status in (408, 502, 503, 504):  # from a proxy in front of TGI: TGI itself is not there
        return TGIUnavailableError(f"TGI is not available (HTTP {status}){detail}")
    return None


def _error_from_body(status: int, content_type: str, body: bytes) -> UpstreamError:
    """Map a non-200 response: TGI's JSON ``{"error", "error_type"}``, or text (axum, proxies)."""
    text = body.decode("utf-8", "replace")
    if "json" in content_type.lower():
        try:
            obj = json.loads(text)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and "error" in obj:
            error, error_type = obj["error"], obj.get("error_type")
            message = error.get("message", "") if isinstance(error, dict) else error
            return map_tgi_error(
                error_type if isinstance(error_type, str) else None,
                message if isinstance(message, str) else json.dumps(message),
                status,
            )
    return map_tgi_error(None, text, status)


# --------------------------------------------------------------------------------------------
# httpx exceptions → the gateway's tree (the one translation)
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _translated(url: str) -> Iterator[None]:
    """Translate httpx's exceptions on the control routes (``/info``) into the gateway's tree."""
    try:
        yield
    except httpx.HTTPError as exc:
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, httpx.ConnectTimeout):
            reason = "connection timed out"
        elif isinstance(exc, httpx.TimeoutException):
            reason = f"no response in time ({reason})"
        elif isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
            reason = f"connection closed before any response ({reason})"
        raise TGIUnavailableError(f"TGI is not reachable at {url}: {reason}") from exc


# --------------------------------------------------------------------------------------------
# Bodies: the request, the tokens of both routes, the /generate answer
# --------------------------------------------------------------------------------------------


def _request_body(inputs: str, parameters: Mapping[str, Any]) -> bytes:
    """``{"inputs", "parameters"}`` (``parameters`` as given), as TGI's JSON parser reads it."""
    for name, value in parameters.items():  # orjson would write NaN and infinity as null
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidRequestError(f"Invalid parameter value: {name} = {value}")
    return orjson.dumps({"inputs": inputs, "parameters": dict(parameters)})


# Tells the OpenAI SDKs not to retry (an answer that is not TGI's protocol would be the same again).
_NO_RETRY = {"x-should-retry": "false"}
# What reading a token object that is not one raises (``_token``).
_NOT_A_TOKEN = (TypeError, KeyError, AttributeError)


def _token(raw: Any) -> Token:
    """TGI's token object ``{"id", "text", "logprob", "special"}`` (a stream event's ``token``, an item of
    ``/generate``'s ``details.tokens``) → :class:`Token`; raises one of ``_NOT_A_TOKEN`` if it is not
    one."""
    text = raw["text"]
    if not isinstance(text, str):
        raise TypeError
    return Token(text, bool(raw.get("special", False)), raw["id"])


def _generation(content: bytes, prompt_tokens: str | None) -> Generation:
    """The body of a 200 ``/generate`` answer (and its ``x-prompt-tokens`` header) → :class:`Generation`."""

    def invalid(what: str) -> TGIProtocolError:  # not TGI's answer: a retry would get the same
        return TGIProtocolError(f"TGI's /generate answer {what}: {content[:200]!r}", headers=_NO_RETRY)

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
        tokens = [_token(raw) for raw in raw_tokens]
    except _NOT_A_TOKEN:
        raise invalid("has an invalid token in `details.tokens`") from None
    finish_reason, generated = details.get("finish_reason"), details.get("generated_tokens")
    return Generation(
        tokens=tokens,
        finish_reason=finish_reason if isinstance(finish_reason, str) else None,
        generated_tokens=generated if type(generated) is int else len(tokens),
        input_length=_count(prompt_tokens),
    )


def _count(header: str | None) -> int | None:
    """A header holding a number of tokens (``x-prompt-tokens``), or None."""
    value = (header or "").strip()
    return int(value) if value.isascii() and value.isdigit() else None


def _expect_content_type(response: http1.Response, route: str, media_type: str) -> None:
    """A 200 answer of another type is not TGI's (a proxy's page, a wrong URL): not worth retrying."""
    content_type = response.headers.get("content-type", "")
    if content_type.partition(";")[0].strip().lower() != media_type:
        raise TGIProtocolError(
            f"TGI answered {route} with Content-Type {content_type!r}, not {media_type}", headers=_NO_RETRY
        )


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
    """

    __slots__ = ("_buf", "_data", "_after_cr")

    def __init__(self) -> None:
        self._buf = b""  # the unfinished line (line ends already normalised to LF)
        self._data: list[bytes] = []
        self._after_cr = False  # the last piece ended with CR: an LF starting the next one is its pair

    def feed(self, chunk: bytes) -> list[bytes]:
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._after_cr = chunk.endswith(b"\r")
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buf = self._buf + chunk if self._buf else chunk
        events: list[bytes] = []
        data = self._data
        start = 0
        find = buf.find
        while (end := find(b"\n", start)) >= 0:
            if end == start:  # blank line: the event is complete
                if data:
                    events.append(data[0] if len(data) == 1 else b"\n".join(data))
                    data = self._data = []
            elif buf.startswith(b"data:", start):
                value = buf[start + 5 : end]
                data.append(value[1:] if value[:1] == b" " else value)
            start = end + 1
        self._buf = buf[start:]
        return events


class TokenStream:
    """The tokens of one ``/generate_stream`` response, then one :class:`StreamEnd`.

    Read it with ``async for`` (one item at a time) or :meth:`batch` (every item that has arrived,
    waiting only when none has: the gateway's hot loop turns one batch into one write). The first
    item may take ``first_token_timeout`` seconds (TGI queues requests), later ones ``read_timeout``
    each; a longer silence is a :class:`TGITimeoutError`. Errors are raised after the items that
    arrived before them.
    """

    def __init__(
        self, response: http1.Response, url: str, *, first_token_timeout: float, read_timeout: float
    ) -> None:
        self._response = response
        self._url = url
        self._decoder = SSEDecoder()
        self._timeout = first_token_timeout
        self._read_timeout = read_timeout
        self._tokens = 0
        self._items: collections.deque[Token | StreamEnd] = collections.deque()  # for __anext__
        self._end: StreamEnd | None = None  # set by the final event
        self._ended = False  # the final event was seen
        self._finished = False  # StreamEnd handed out, or the stream failed
        self._error: UpstreamError | None = None  # raised at the next read, after the items before it

    def __aiter__(self) -> TokenStream:
        return self

    @property
    def ended(self) -> bool:
        """TGI's final event has arrived (the rest of the body is its end)."""
        return self._ended

    async def __anext__(self) -> Token | StreamEnd:
        items = self._items
        if not items:
            items.extend(await self.batch())
        return items.popleft()

    async def batch(self) -> list[Token | StreamEnd]:
        """The items that have arrived (at least one), in order; :class:`StopAsyncIteration` after
        the StreamEnd was handed out (the rest of the body is read first, so that the connection
        can serve another request)."""
        if self._response.closed:
            raise RuntimeError("TGI stream used after its generate_stream() context was left")
        if self._items:
            out = list(self._items)
            self._items.clear()
            return out
        if self._finished:
            await self._read_to_end()
            raise StopAsyncIteration
        out: list[Token | StreamEnd] = []
        while not out:
            if self._error is not None:
                self._finished = True
                raise self._error
            for data in self._decoder.feed(await self._read()):
                if self._ended:
                    continue  # TGI sends nothing after the final event
                try:
                    item = self._parse(data)
                except UpstreamError as exc:
                    self._error = exc
                    break
                if item is not None:
                    out.append(item)
                    if self._end is not None:
                        out.append(self._end)
                        self._ended = True
        if self._ended and out and isinstance(out[-1], StreamEnd):
            self._finished = True
        self._timeout = self._read_timeout
        return out

    async def _read(self) -> bytes:
        try:
            chunk = await self._response.read(self._timeout)
        except http1.ResponseTimeout:
            self._finished = True
            if self._tokens:
                raise TGITimeoutError(
                    f"TGI sent nothing for {self._timeout:g} s in the middle of the generation (read timeout)"
                ) from None
            raise TGITimeoutError(
                f"TGI sent no token within {self._timeout:g} s (first-token timeout): it may be overloaded"
            ) from None
        except http1.ConnectionClosed as exc:
            self._finished = True
            raise TGIProtocolError(f"TGI closed the stream before the end of the generation ({exc})") from exc
        if not chunk:
            self._finished = True
            raise TGIProtocolError("TGI closed the stream before the end of the generation")
        return chunk

    def _parse(self, data: bytes) -> Token | None:
        if data.startswith(b"[DONE]"):  # a proxy's sentinel
            return None
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise TGIProtocolError(f"TGI sent a stream event that is not JSON: {data[:200]!r}") from None
        if not isinstance(obj, dict):
            raise TGIProtocolError(f"TGI sent a stream event that is not an object: {data[:200]!r}")
        raw = obj.get("token")
        if raw is None and "error" in obj:
            error, error_type = obj["error"], obj.get("error_type")
            message = error.get("message", "") if isinstance(error, dict) else error
            raise map_tgi_error(
                error_type if isinstance(error_type, str) else None,
                message if isinstance(message, str) else json.dumps(message),
            )
        try:
            token = _token(raw)
        except _NOT_A_TOKEN:
            raise TGIProtocolError(f"TGI sent a stream event without a valid token: {data[:200]!r}") from None
        self._tokens += 1
        generated_text, details = obj.get("generated_text"), obj.get("details")
        if generated_text is not None or details is not None:
            if isinstance(details, dict):
                generated = details.get("generated_tokens")
                self._end = StreamEnd(
                    finish_reason=details.get("finish_reason"),
                    generated_tokens=generated if isinstance(generated, int) else self._tokens,
                    input_length=details.get("input_length"),
                    generated_text=generated_text,
                )
            else:
                self._end = StreamEnd(None, self._tokens, None, generated_text)
        return token

    async def _read_to_end(self) -> None:
        """After the final event TGI ends the body at once; reading that end lets the connection serve
        another request instead of being closed. Anything unexpected: give up (it is then closed)."""
        extra = 0
        with contextlib.suppress(http1.HTTPError):
            while extra <= _MAX_CHUNKS_AFTER_END and await self._response.read(self._read_timeout):
                extra += 1


# --------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------


class TGIClient:
    """One pooled async client to one TGI router. Create it once (app lifespan), share it, ``aclose`` it.

    Two connection pools to the same router: the generations (``/generate_stream``, ``/generate``) go
    through :mod:`tgi_gateway.http1` (lean: a read per token costs ~12 µs, not ~360 µs), ``/health`` and
    ``/info`` through httpx.

    ``connect_retries`` is the number of *attempts* for a request whose connection fails before any
    response (at least one). Timeouts: ``connect_timeout`` to open a connection,
    ``first_token_timeout`` for TGI's first event (requests queue in TGI while the batch is full),
    ``read_timeout`` between two events (TGI sends a keep-alive after 15 s of silence, so only a
    hung TGI reaches 60 s), ``request_timeout`` for a whole ``/generate`` answer (no token arrives
    before the end there, so the other two cannot apply). ``transport`` replaces httpx's network for
    ``/health`` and ``/info`` (tests). ``api_key`` is sent as ``Authorization: Bearer`` for a TGI
    started with ``--api-key``. Proxies from the environment are not used.
    """

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        first_token_timeout: float = DEFAULT_FIRST_TOKEN_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        connect_retries: int = 3,
        transport: httpx.AsyncBaseTransport | None = None,
        api_key: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._attempts = max(1, connect_retries)
        self._first_token_timeout = first_token_timeout
        self._read_timeout = read_timeout
        self._request_timeout = request_timeout
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        posts = {**headers, "Content-Type": "application/json", "User-Agent": f"tgi-gateway/{__version__}"}
        self._stream_headers = {**posts, "Accept": "text/event-stream"}
        self._generate_headers = {**posts, "Accept": "application/json"}
        self._pool = http1.Pool(self.base_url, connect_timeout=connect_timeout)
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(connect=connect_timeout, read=read_timeout, write=10.0, pool=5.0),
            limits=CONTROL_LIMITS,
            transport=transport,
            headers=headers,
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()
        await self._client.aclose()

    async def __aenter__(self) -> TGIClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ---------------------------------------------------------------- routes

    async def health(self, *, timeout: float = HEALTH_TIMEOUT) -> bool:
        """``GET /health``: True on 200; False on anything else, including no answer within ``timeout``."""
        try:
            response = await self._client.get("/health", timeout=timeout)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def info(self) -> TGIInfo:
        """``GET /info``. Raises :class:`TGIUnavailableError` when TGI cannot be reached."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._attempts),
            wait=_BACKOFF,
            retry=retry_if_exception_type(_RETRIED),
            reraise=True,
        )
        with _translated(self.base_url):
            response = await retrying(self._client.get, "/info")
        if response.status_code != 200:
            raise _error_from_body(
                response.status_code,
                response.headers.get("content-type", ""),
                response.content[:_MAX_ERROR_BODY],
            )
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise TGIProtocolError(
                f"TGI answered /info with something that is not a JSON object: {response.text[:200]!r}"
            )
        return TGIInfo.from_json(body)

    @contextlib.asynccontextmanager
    async def generate_stream(self, inputs: str, parameters: Mapping[str, Any]) -> AsyncIterator[TokenStream]:
        """``POST /generate_stream`` with ``{"inputs", "parameters"}`` (``parameters`` as given).

        Entering waits for the response head (connection failures retried, then
        :class:`TGIUnavailableError`; a non-200 or non-SSE answer raises its mapped error) and yields
        the :class:`TokenStream`. Leaving closes the connection at once — that is what stops the
        generation in TGI — unless the stream was read to its end (it then serves the next request).
        """
        body = _request_body(inputs, parameters)
        timeout = self._first_token_timeout
        response = await self._open(
            "/generate_stream", self._stream_headers, body, time.monotonic() + timeout,
            f"TGI did not answer within {timeout:g} s (first-token timeout)",
        )  # fmt: skip
        try:
            await _raise_for_status(response, self._read_timeout)
            _expect_content_type(response, "/generate_stream", "text/event-stream")
            yield TokenStream(
                response,
                self.base_url,
                first_token_timeout=self._first_token_timeout,
                read_timeout=self._read_timeout,
            )
        finally:
            response.close()

    async def generate(self, inputs: str, parameters: Mapping[str, Any]) -> Generation:
        """``POST /generate`` with ``{"inputs", "parameters"}`` (``parameters`` as given: the caller asks
        for ``details: true``, without which TGI sends no tokens) → the whole :class:`Generation`.

        Connection failures before any response byte are retried, then :class:`TGIUnavailableError`; a
        non-200 answer raises its mapped error; a body that is not TGI's answer (not JSON, no details,
        over 64 MiB) a :class:`TGIProtocolError`. The whole exchange, retries and TGI's queue included,
        must end within ``request_timeout`` seconds, else :class:`TGITimeoutError` (504). Cancelled, it
        closes the connection at once, which makes TGI drop the request; once the answer is read whole
        the connection serves the next request.
        """
        body = _request_body(inputs, parameters)
        timeout = self._request_timeout
        deadline = time.monotonic() + timeout
        late = f"TGI did not finish the generation within {timeout:g} s (--request-timeout)"
        response = await self._open("/generate", self._generate_headers, body, deadline, late)
        try:
            await _raise_for_status(response, min(self._read_timeout, _left(deadline)))
            _expect_content_type(response, "/generate", "application/json")
            if (_count(response.headers.get("content-length")) or 0) > _MAX_GENERATE_BODY:
                raise TGIProtocolError(_TOO_LARGE, headers=_NO_RETRY)  # not read at all
            try:
                content = await response.read_all(_MAX_GENERATE_BODY + 1, _left(deadline))
            except http1.ResponseTimeout as exc:
                raise TGITimeoutError(late) from exc
            except http1.ConnectionClosed as exc:
                raise TGIProtocolError(f"TGI closed the connection in the middle of its answer ({exc})") from exc
            if len(content) > _MAX_GENERATE_BODY:
                raise TGIProtocolError(_TOO_LARGE, headers=_NO_RETRY)
            return _generation(content, response.headers.get("x-prompt-tokens"))
        finally:
            response.close()

    # ---------------------------------------------------------------- transport

    async def _open(
        self, path: str, headers: Mapping[str, str], body: bytes, deadline: float, late: str
    ) -> http1.Response:
        """Send the request, up to the response head, which must arrive by ``deadline``
        (``time.monotonic()``; else :class:`TGITimeoutError` with the message ``late``); retry only
        failures before any response byte."""
        first_failure: list[http1.ConnectFailed] = []

        async def attempt() -> http1.Response:  # tenacity's first attempt: the one that failed below
            if first_failure:
                raise first_failure.pop()
            return await self._pool.request("POST", path, headers, body, timeout=_left(deadline))

        try:
            try:  # the usual case, without tenacity's machinery (~30 µs a call)
                return await attempt()
            except http1.ConnectFailed as exc:
                if self._attempts == 1:
                    raise
                first_failure.append(exc)
            retrying = AsyncRetrying(
                stop=stop_after_attempt(self._attempts),
                wait=_BACKOFF,
                retry=retry_if_exception_type(http1.ConnectFailed),
                reraise=True,
            )
            return await retrying(attempt)
        except http1.ConnectFailed as exc:
            raise TGIUnavailableError(f"TGI is not reachable at {self.base_url}: {exc}") from exc
        except http1.ResponseTimeout as exc:
            raise TGITimeoutError(late) from exc
        except http1.ConnectionClosed as exc:
            raise TGIProtocolError(f"TGI closed the connection in the middle of its answer's head ({exc})") from exc


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


async def _raise_for_status(response: http1.Response, timeout: float) -> None:
    """A non-200 answer → its mapped error (the short error body read within ``timeout`` seconds)."""
    if response.status != 200:
        try:
            content = await response.read_all(_MAX_ERROR_BODY, timeout)
        except http1.HTTPError:
            content = b""
        raise _error_from_body(response.status, response.headers.get("content-type", ""), content)
