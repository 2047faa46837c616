"""The gateway's one pooled async client to Text-Generation-Inference: transport, protocol, errors.

Theory of operation
-------------------
:class:`TGIClient` owns one ``httpx.AsyncClient`` (one connection pool) for the life of the app; the
``transport`` argument is the test seam. It speaks three routes of TGI's router (``shared/reference/
tgi/PROTOCOL.md``):

* ``POST /generate_stream`` -- :meth:`TGIClient.generate_stream` is an async context manager.
  Entering it sends ``{"inputs", "parameters"}`` and waits for the response *headers* only. A
  connection failure there (refused, connect timeout, reset before any response) is retried a few
  times with a short exponential backoff, then raised as :class:`TGIUnavailableError`; nothing is
  ever retried once a response has arrived. The context yields an async iterator of
  :class:`Token` (one per SSE event) and, after the final event's token, one :class:`StreamEnd`.
  Leaving the context -- normally, by an exception or by cancellation -- closes the response at
  once: closing the connection is how TGI drops a request from its batch.
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

Errors. Every failure leaves this module as an :class:`~tgi_gateway.errors.UpstreamError`. Foreign
exceptions (httpx's) are translated in one place, :func:`_translated`; TGI's own error bodies, error
events and HTTP statuses are mapped in one function, :func:`map_tgi_error`.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import orjson
from httpx_sse import EventSource
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential, wait_random

from .errors import (
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

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_TIMEOUT",
    "HEALTH_TIMEOUT",
    "StreamEnd",
    "TGIClient",
    "TGIInfo",
    "Token",
    "map_tgi_error",
]

#: Connect quickly or report TGI unreachable; ``read`` bounds the silence *between* stream events:
#: TGI sends a keep-alive comment after 15 s without a token (also while a request is queued), so
#: 60 s is only reached by a TGI that hangs.
DEFAULT_TIMEOUT = httpx.Timeout(connect=2.0, read=60.0, write=10.0, pool=5.0)
#: TGI admits ``max_concurrent_requests`` (default 128) and answers the rest "overloaded"; the pool
#: must not be the tighter limit, so it allows well more. Few idle connections are kept: httpcore
#: 1.0 hands every request queued in one pass the *same* first idle connection, and the losers spin
#: re-assigning, in time growing with the number of idle connections. Measured, 100 streams started
#: at once on a warm pool cost 2.7 s of CPU with 128 kept, 1.1 s with 64, 0.35 s with 32 and 0.2 s
#: with 16 or none (as much as on a cold pool); 16 still serves steady traffic from reused sockets.
DEFAULT_LIMITS = httpx.Limits(max_connections=512, max_keepalive_connections=16, keepalive_expiry=30.0)
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
# Events seen after the final one are ignored while reading to the end of the body (which lets the
# connection go back to the pool); past this many something is wrong and the connection is dropped.
_MAX_EVENTS_AFTER_END = 16


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
def _translated(url: str, stage: Literal["request", "stream"]) -> Iterator[None]:
    """Translate httpx's exceptions raised in ``stage``: ``request`` is up to the response headers
    (nothing received yet: TGI is unreachable), ``stream`` is while reading the event stream."""
    try:
        yield
    except httpx.HTTPError as exc:
        reason = str(exc) or type(exc).__name__
        if stage == "stream":
            if isinstance(exc, httpx.TimeoutException):
                raise TGIProtocolError(
                    f"TGI stopped sending in the middle of the generation ({reason})"
                ) from exc
            raise TGIProtocolError(
                f"TGI closed the stream before the end of the generation ({reason})"
            ) from exc
        if isinstance(exc, httpx.PoolTimeout):
            raise TGIOverloadedError(
                f"Too many requests in flight to TGI at {url}: no connection became free in time"
            ) from exc
        if isinstance(exc, httpx.ConnectTimeout):
            reason = "connection timed out"
        elif isinstance(exc, httpx.TimeoutException):
            reason = f"no response in time ({reason})"
        elif isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
            reason = f"connection closed before any response ({reason})"
        raise TGIUnavailableError(f"TGI is not reachable at {url}: {reason}") from exc


# --------------------------------------------------------------------------------------------
# The stream
# --------------------------------------------------------------------------------------------


class _TokenStream:
    """Async iterator of :class:`Token` and one final :class:`StreamEnd` over one SSE response."""

    def __init__(self, response: httpx.Response, url: str) -> None:
        self._url = url
        self._events = EventSource(response).aiter_sse()
        self._tokens = 0
        self._end: StreamEnd | None = None  # decided, not yet handed out
        self._finished = False  # StreamEnd handed out, or the stream failed
        self._closed = False

    def __aiter__(self) -> _TokenStream:
        return self

    async def __anext__(self) -> Token | StreamEnd:
        if self._closed:
            raise RuntimeError("TGI stream used after its generate_stream() context was left")
        if self._end is not None:
            end, self._end = self._end, None
            self._finished = True
            return end
        if self._finished:
            await self._read_to_end()
            raise StopAsyncIteration
        while True:
            try:
                with _translated(self._url, "stream"):
                    sse = await self._events.__anext__()
            except StopAsyncIteration:
                self._finished = True
                raise TGIProtocolError("TGI closed the stream before the end of the generation") from None
            except UpstreamError:
                self._finished = True
                raise
            data = sse.data
            if not data or data.startswith("[DONE]"):  # an empty event, or a proxy's sentinel
                continue
            try:
                return self._parse(data)
            except UpstreamError:
                self._finished = True
                raise

    def _parse(self, data: str) -> Token:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise TGIProtocolError(f"TGI sent a stream event that is not JSON: {data[:200]!r}") from None
        if not isinstance(obj, dict):
            raise TGIProtocolError(f"TGI sent a stream event that is not an object: {data[:200]!r}")
        if "error" in obj and "token" not in obj:
            error, error_type = obj["error"], obj.get("error_type")
            message = error.get("message", "") if isinstance(error, dict) else error
            raise map_tgi_error(
                error_type if isinstance(error_type, str) else None,
                message if isinstance(message, str) else json.dumps(message),
            )
        raw = obj.get("token")
        try:
            token = Token(text=raw["text"], special=bool(raw.get("special", False)), id=raw["id"])
            if not isinstance(token.text, str):
                raise TypeError
        except (TypeError, KeyError, AttributeError):
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
        """After the final event TGI ends the body at once; reading that end lets httpx return the
        connection to the pool instead of closing it. Anything unexpected: give up (it is closed)."""
        if self._closed:
            return
        with contextlib.suppress(httpx.HTTPError):
            extra = 0
            async for _ in self._events:
                extra += 1
                if extra > _MAX_EVENTS_AFTER_END:
                    break

    async def aclose(self) -> None:
        self._closed = True
        await self._events.aclose()


# --------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------


class TGIClient:
    """One pooled async client to one TGI router. Create it once (app lifespan), share it, ``aclose`` it.

    ``connect_retries`` is the number of *attempts* for a request whose connection fails before any
    response (at least one). ``transport`` replaces the network (tests: ``httpx.MockTransport``,
    respx); ``limits`` then do not apply. ``api_key`` is sent as ``Authorization: Bearer`` for a TGI
    started with ``--api-key``. Proxies from the environment are not used.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: httpx.Timeout | None = None,
        connect_retries: int = 3,
        transport: httpx.AsyncBaseTransport | None = None,
        limits: httpx.Limits | None = None,
        api_key: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._attempts = max(1, connect_retries)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=timeout if timeout is not None else DEFAULT_TIMEOUT,
            limits=limits if limits is not None else DEFAULT_LIMITS,
            transport=transport,
            headers=headers,
            trust_env=False,
        )

    async def aclose(self) -> None:
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
        response = await self._send(self._client.build_request("GET", "/info"), stream=False)
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
    async def generate_stream(
        self, inputs: str, parameters: Mapping[str, Any]
    ) -> AsyncIterator[AsyncIterator[Token | StreamEnd]]:
        """``POST /generate_stream`` with ``{"inputs", "parameters"}`` (``parameters`` as given).

        Entering waits for the response headers (connection failures retried, then
        :class:`TGIUnavailableError`; a non-200 or non-SSE answer raises its mapped error) and
        yields the iterator of tokens and the final :class:`StreamEnd`. Leaving closes the response.
        """
        try:
            body = json.dumps(
                {"inputs": inputs, "parameters": dict(parameters)},
                ensure_ascii=False,
                separators=(",", ":"),
                allow_nan=False,
            ).encode()
        except ValueError as exc:  # NaN or infinity: TGI's JSON parser refuses them
            raise InvalidRequestError(f"Invalid parameter value: {exc}") from exc
        request = self._client.build_request(
            "POST",
            "/generate_stream",
            content=body,
            headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
        )
        response = await self._send(request, stream=True)
        stream: _TokenStream | None = None
        try:
            if response.status_code != 200:
                raise _error_from_body(
                    response.status_code, response.headers.get("content-type", ""), await _read_some(response)
                )
            content_type = response.headers.get("content-type", "")
            if content_type.partition(";")[0].strip().lower() != "text/event-stream":
                raise TGIProtocolError(
                    f"TGI answered /generate_stream with Content-Type {content_type!r}, "
                    "not text/event-stream",
                    headers={"x-should-retry": "false"},
                )
            stream = _TokenStream(response, self.base_url)
            yield stream
        finally:
            # First the response: closing its connection is what stops the generation in TGI
            # (httpcore shields this close from cancellation).
            await response.aclose()
            if stream is not None:
                await stream.aclose()

    # ---------------------------------------------------------------- transport

    async def _send(self, request: httpx.Request, *, stream: bool) -> httpx.Response:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._attempts),
            wait=_BACKOFF,
            retry=retry_if_exception_type(_RETRIED),
            reraise=True,
        )
        with _translated(self.base_url, "request"):
            return await retrying(self._client.send, request, stream=stream)


async def _read_some(response: httpx.Response) -> bytes:
    """Up to ``_MAX_ERROR_BODY`` bytes of an error response (whatever arrived, if it breaks off)."""
    chunks: list[bytes] = []
    size = 0
    with contextlib.suppress(httpx.HTTPError):
        async for chunk in response.aiter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            if size >= _MAX_ERROR_BODY:
                break
    return b"".join(chunks)[:_MAX_ERROR_BODY]
