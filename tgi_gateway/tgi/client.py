"""The gateway's client to Text-Generation-Inference: connections, timeouts, retries (the I/O only).

Theory of operation
-------------------
:class:`TGIClient` lives as long as the app. It speaks four routes of TGI's router; what goes over the
wire — the values, the event stream, the bodies, TGI's errors — is :mod:`tgi_gateway.tgi.protocol`.

* ``POST /generate_stream`` (stream requests) -- :meth:`TGIClient.generate_stream` is an async
  context manager. Entering it sends ``{"inputs", "parameters"}`` and waits for the response *head*
  only. A connection failure there (refused, connect timeout, closed before any response) is retried a
  few times with a short exponential backoff, then raised as :class:`TGIUnavailableError`; nothing is
  ever retried once a response has arrived. The context yields a :class:`TokenStream`: :class:`Token`
  items (one per SSE event) and, after the final event's token, one :class:`StreamEnd`. Leaving the
  context -- normally, by an exception or by cancellation -- closes the connection at once unless the
  stream was read to its end: closing it is how TGI drops a request from its batch.
* ``POST /generate`` (non-stream requests) -- :meth:`TGIClient.generate` sends the same body through the
  same pool, with the same connection retries, and returns one :class:`Generation`; one timeout
  (``request_timeout``) bounds the whole of it. Cancelling the call closes the connection at once (TGI
  then drops the request); a complete answer gives its connection back to the pool.
* ``GET /health`` -- :meth:`TGIClient.health`, a quick yes/no.
* ``GET /info`` -- :meth:`TGIClient.info`, the limits the router enforces, as :class:`TGIInfo`.

A stream that ends before its final event is a :class:`TGIProtocolError`; an error event raises the
error :func:`map_tgi_error` makes of it (the caller knows whether tokens were already sent). Every
failure leaves this module as an :class:`~tgi_gateway.errors.UpstreamError`.
"""

from __future__ import annotations

import collections
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import httpx
import orjson
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential, wait_random

from .. import __version__
from ..errors import (
    TGIProtocolError,
    TGITimeoutError,
    TGIUnavailableError,
    UpstreamError,
)
from . import http1
from .protocol import (
    MAX_GENERATE_BODY,
    NO_RETRY,
    NOT_A_TOKEN,
    Generation,
    SSEDecoder,
    StreamEnd,
    TGIInfo,
    Token,
    error_from_body,
    map_tgi_error,
    parse_generation,
    parse_token,
    request_body,
    token_count,
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
_TOO_LARGE = f"TGI's /generate answer is over {MAX_GENERATE_BODY >> 20} MiB"


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


def _expect_content_type(response: http1.Response, route: str, media_type: str) -> None:
    """A 200 answer of another type is not TGI's (a proxy's page, a wrong URL): not worth retrying."""
    content_type = response.headers.get("content-type", "")
    if content_type.partition(";")[0].strip().lower() != media_type:
        raise TGIProtocolError(
            f"TGI answered {route} with Content-Type {content_type!r}, not {media_type}", headers=NO_RETRY
        )


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
            token = parse_token(raw)
        except NOT_A_TOKEN:
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
            raise error_from_body(
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
        body = request_body(inputs, parameters)
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
        body = request_body(inputs, parameters)
        timeout = self._request_timeout
        deadline = time.monotonic() + timeout
        late = f"TGI did not finish the generation within {timeout:g} s (--request-timeout)"
        response = await self._open("/generate", self._generate_headers, body, deadline, late)
        try:
            await _raise_for_status(response, min(self._read_timeout, _left(deadline)))
            _expect_content_type(response, "/generate", "application/json")
            if (token_count(response.headers.get("content-length")) or 0) > MAX_GENERATE_BODY:
                raise TGIProtocolError(_TOO_LARGE, headers=NO_RETRY)  # not read at all
            try:
                content = await response.read_all(MAX_GENERATE_BODY + 1, _left(deadline))
            except http1.ResponseTimeout as exc:
                raise TGITimeoutError(late) from exc
            except http1.ConnectionClosed as exc:
                raise TGIProtocolError(f"TGI closed the connection in the middle of its answer ({exc})") from exc
            if len(content) > MAX_GENERATE_BODY:
                raise TGIProtocolError(_TOO_LARGE, headers=NO_RETRY)
            return parse_generation(content, response.headers.get("x-prompt-tokens"))
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
        raise error_from_body(response.status, response.headers.get("content-type", ""), content)
