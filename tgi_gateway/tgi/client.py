"""The gateway's client to Text-Generation-Inference: connections, timeouts, retries (the I/O only).

Theory of operation
-------------------
:class:`TGIClient` lives as long as the app. It speaks four routes of TGI's router through one aiohttp
``ClientSession`` (one pool of keep-alive connections); what goes over the wire -- the values, the event
stream, the bodies, TGI's errors -- is :mod:`tgi_gateway.tgi.protocol`.

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

Every exception aiohttp, asyncio or the OS raises is translated in one place, :func:`_translate`, from one
table (``_FAILURES``: by phase of the exchange -- connect, head, body -- the gateway error, its message,
and whether the request may be sent again). Every failure leaves this module as an
:class:`~tgi_gateway.errors.UpstreamError`, except the gateway's own lack of file descriptors (``EMFILE``,
``ENFILE``), a :class:`~tgi_gateway.errors.DescriptorsExhaustedError`.

Timeouts are the gateway's own, not aiohttp's ``sock_read``: a deadline per wait (TGI's first event
may take ``first_token_timeout``, each later one ``read_timeout``), kept by one timer per stream
(:class:`_Deadline`) rather than one per read; the deadlines of a response head and of a whole
``/generate`` answer are ``asyncio.timeout``. Buffering is bounded by aiohttp's ``StreamReader`` flow
control: the connection stops reading its socket while more than twice ``_READ_BUFSIZE`` bytes wait
unread, and resumes below ``_READ_BUFSIZE``.

The I/O is aiohttp's, except one detail of its connection protocol (:class:`_ResponseHandler`: a read
resumes the socket only when it was paused).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import math
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, Self

import aiohttp
from aiohttp.client_proto import ResponseHandler
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential, wait_random
from yarl import URL

from .. import __version__
from ..errors import (
    DescriptorsExhaustedError,
    GatewayError,
    TGIProtocolError,
    TGITimeoutError,
    TGIUnavailableError,
    UpstreamError,
)
from . import protocol
from .protocol import (
    STREAM_CUT,
    Generation,
    StreamDecoder,
    StreamEnd,
    TGIInfo,
    Token,
    error_from_body,
    expect_content_type,
    parse_generation,
    parse_info,
    request_body,
)

__all__ = ["HEALTH_TIMEOUT", "Generation", "StreamEnd", "TGIClient", "TGIInfo", "Token", "TokenStream"]

#: /health is a readiness probe: a slow answer counts as "not healthy".
HEALTH_TIMEOUT = 2.0
# An idle keep-alive connection is closed after this long (below the idle timeouts of the usual proxies,
# so that the gateway, not the proxy, closes it).
_KEEPALIVE_EXPIRY = 30.0
# aiohttp's StreamReader stops reading the socket above twice this many unread bytes (then resumes below it).
_READ_BUFSIZE = 128 * 1024
# Backoff between attempts: 50 ms, 100 ms, then 200 ms at most, plus up to 20 ms of jitter so that
# many streams failing together do not retry in step. Three attempts wait about 0.15-0.19 s in all.
_BACKOFF = wait_exponential(multiplier=0.05, max=0.2) + wait_random(0, 0.02)
# An error body is short (TGI's JSON, axum's one-line text, a proxy's small page); read no more.
_MAX_ERROR_BODY = 8192
# Body pieces read after the final event while reading to the end of the body (which lets the
# connection go back to the pool); past this many something is wrong and the connection is dropped.
_MAX_CHUNKS_AFTER_END = 16


# --------------------------------------------------------------------------------------------
# aiohttp / asyncio / OS exceptions → the gateway's tree (the one translation)
# --------------------------------------------------------------------------------------------

Phase = Literal["connect", "head", "body"]


@dataclass(frozen=True, slots=True)
class _Failure:
    raised: type[BaseException] | tuple[type[BaseException], ...]
    error: type[GatewayError]
    message: str  # formatted with `reason` (the exception's text) and the caller's context
    retry: bool = False  # no response byte yet: TGI cannot have started the request, so it may be sent again
    errnos: frozenset[int] = frozenset()  # only an exception with one of these `errno`s (none: any)


# The first row of the phase whose class matches wins. Context: `url`, `connect_timeout`, `late` (what
# a timeout means for this request), `cut` (what a broken body means for it).
_FAILURES: dict[Phase, tuple[_Failure, ...]] = {
    # opening a connection (refused, unresolvable, TLS, no answer to the SYN)
    "connect": (
        # the gateway's own descriptor limit, not TGI's fault; sending again at once would meet it again
        _Failure(
            OSError,
            DescriptorsExhaustedError,
            "The gateway has run out of file descriptors and cannot connect to TGI ({reason}).",
            errnos=frozenset({errno.EMFILE, errno.ENFILE}),
        ),
        _Failure(
            aiohttp.ConnectionTimeoutError,
            TGIUnavailableError,
            "TGI is not reachable at {url}: connection timed out after {connect_timeout:g} s",
            retry=True,
        ),
        _Failure(
            aiohttp.ClientConnectorError,
            TGIUnavailableError,
            "TGI is not reachable at {url}: {reason}",
            retry=True,
        ),
    ),
    # the request sent, waiting for the status line and headers
    "head": (
        _Failure(TimeoutError, TGITimeoutError, "{late}"),
        _Failure(
            (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, OSError),
            TGIUnavailableError,
            "TGI is not reachable at {url}: connection closed before any response ({reason})",
            retry=True,
        ),
        _Failure(aiohttp.ClientError, TGIProtocolError, "TGI sent no valid response head ({reason})"),
    ),
    # reading the body
    "body": (
        _Failure(TimeoutError, TGITimeoutError, "{late}"),
        _Failure((aiohttp.ClientError, OSError), TGIProtocolError, "{cut} ({reason})"),
    ),
}
_OPENING: tuple[Phase, ...] = ("connect", "head")
#: What the I/O below raises; anything else (a bug, a cancellation) passes untranslated.
_FOREIGN = (TimeoutError, aiohttp.ClientError, OSError)


def _failure(exc: BaseException, phases: tuple[Phase, ...]) -> _Failure | None:
    for phase in phases:
        for row in _FAILURES[phase]:
            if isinstance(exc, row.raised) and (not row.errnos or getattr(exc, "errno", None) in row.errnos):
                return row
    return None


def _retriable(exc: BaseException) -> bool:
    row = _failure(exc, _OPENING)
    return row is not None and row.retry


def _translate(exc: BaseException, phases: tuple[Phase, ...], **context: Any) -> GatewayError:
    """The gateway error for ``exc``, one of :data:`_FOREIGN`, raised in one of ``phases``."""
    row = _failure(exc, phases)
    assert row is not None, f"no translation for {exc!r} in {phases}"  # every phase's last row takes OSError
    return row.error(row.message.format(reason=str(exc) or type(exc).__name__, **context))


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class _ResponseHandler(ResponseHandler):
    """aiohttp's connection protocol, except that a read resumes the socket only if it was paused.

    aiohttp's ``StreamReader`` calls ``resume_reading()`` after every chunk it hands out while its buffer is
    below the low-water mark -- that is, after every token event -- and aiohttp resumes by feeding its parser
    an empty piece and resuming the transport, paused or not. Only a paused protocol has anything to resume
    (``pause_reading`` is what pauses the parser and the transport), so the others return at once.
    Flow control is unchanged: above the high-water mark the protocol pauses, and the read that brings the
    buffer below the low-water mark resumes it."""

    def resume_reading(self, resume_parser: bool = True) -> None:
        if self._reading_paused:
            super().resume_reading(resume_parser)


class _Connector(aiohttp.TCPConnector):
    """The keep-alive ``TCPConnector`` whose connections use :class:`_ResponseHandler`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._factory = partial(_ResponseHandler, loop=self._loop)


class _Deadline:
    """A deadline for each wait on one response body, kept by one timer that is re-armed only when it fires
    before the current deadline (about once per timeout on a live stream), not one timer per read.

    Around each wait: :meth:`start` (``timeout`` seconds from now), then ``waiting = False``. When the
    deadline passes during a wait with no byte received since it started, the body's reader is failed with
    :class:`TimeoutError`, which the wait raises."""

    __slots__ = ("_at", "_content", "_loop", "_mark", "_timer", "_timer_at", "waiting")

    def __init__(self, content: aiohttp.StreamReader) -> None:
        self._content = content
        self._loop = asyncio.get_running_loop()
        self._at = math.inf
        self.waiting = False
        self._mark = 0  # the body's byte count when the wait started
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    def start(self, timeout: float) -> None:
        self._at = at = self._loop.time() + timeout
        if self._timer_at > at:
            self._arm(at)
        self._mark = self._content.total_bytes
        self.waiting = True

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._fire)

    def _fire(self) -> None:
        self._timer, self._timer_at = None, math.inf
        content = self._content
        if not self.waiting or content.total_bytes != self._mark or content.is_eof():
            return  # nobody waits, or what they wait for has arrived: the next wait arms the timer again
        if self._loop.time() >= self._at:
            content.set_exception(TimeoutError("no data in time"))
        else:
            self._arm(self._at)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, math.inf


async def _read_at_most(content: aiohttp.StreamReader, limit: int) -> bytes:
    """The body up to its end or until more than ``limit`` bytes were read (then at most one read more)."""
    parts: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await content.readany()
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


class TokenStream:
    """The tokens of one ``/generate_stream`` response, then one :class:`StreamEnd`.

    Read it with ``async for`` (one item at a time) or :meth:`batch` (every item that has arrived,
    waiting only when none has: the gateway's hot loop turns one batch into one write). The first
    item may take ``first_token_timeout`` seconds (TGI queues requests; keep-alive comments do not count
    as an item), later ones ``read_timeout`` each; a longer silence is a :class:`TGITimeoutError`. Errors
    are raised after the items that arrived before them.
    """

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        *,
        first_token_timeout: float,
        read_timeout: float,
        logprobs: bool = False,
    ) -> None:
        self._content = response.content
        self._decoder = StreamDecoder(logprobs=logprobs)
        self._deadline = _Deadline(self._content)
        self._timeout = first_token_timeout
        self._read_timeout = read_timeout
        self._items: collections.deque[Token | StreamEnd] = collections.deque()  # for __anext__
        self._done = False  # StreamEnd handed out, or the stream failed
        self._left = False  # the generate_stream() context was left

    def __aiter__(self) -> TokenStream:
        return self

    @property
    def ended(self) -> bool:
        """TGI's final event has arrived (the rest of the body is its end)."""
        return self._decoder.ended

    async def __anext__(self) -> Token | StreamEnd:
        items = self._items
        if not items:
            items.extend(await self.batch())
        return items.popleft()

    async def batch(self) -> list[Token | StreamEnd]:
        """The items that have arrived (at least one), in order; :class:`StopAsyncIteration` after
        the StreamEnd was handed out (the rest of the body is read first, so that the connection
        can serve another request) or after an error."""
        if self._left:
            raise RuntimeError("TGI stream used after its generate_stream() context was left")
        if self._items:
            out = list(self._items)
            self._items.clear()
            return out
        if self._done:
            if self._decoder.ended:
                await self._read_to_end()
            raise StopAsyncIteration
        decoder, content, deadline = self._decoder, self._content, self._deadline
        while True:  # one coroutine per read: this is the gateway's hot loop
            if decoder.error is not None:
                self._done = True
                raise decoder.error
            deadline.start(self._timeout)
            try:
                chunk = await content.readany()
            except _FOREIGN as exc:
                self._done = True
                raise _translate(exc, ("body",), late=self._late(), cut=STREAM_CUT) from exc
            finally:
                deadline.waiting = False
            if not chunk:
                self._done = True
                raise decoder.end_of_body() or TGIProtocolError(STREAM_CUT)
            out = decoder.feed(chunk)
            if out:
                break
        self._done = decoder.ended
        self._timeout = self._read_timeout
        return out

    def _late(self) -> str:
        if self._decoder.tokens:
            return f"TGI sent nothing for {self._timeout:g} s in the middle of the generation (read timeout)"
        return f"TGI sent no token within {self._timeout:g} s (first-token timeout): it may be overloaded"

    async def _read_to_end(self) -> None:
        """After the final event TGI ends the body at once; reading that end lets the connection serve
        another request instead of being closed. Anything unexpected: give up (it is then closed)."""
        deadline = self._deadline
        with contextlib.suppress(*_FOREIGN):
            for _ in range(_MAX_CHUNKS_AFTER_END):
                deadline.start(self._read_timeout)
                try:
                    if not await self._content.readany():
                        return
                finally:
                    deadline.waiting = False

    def _leave(self) -> None:
        self._left = True
        self._deadline.close()


# --------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------


class TGIClient:
    """One pooled async client to one TGI router. Create it once, in a running event loop (the app's
    lifespan), share it, ``aclose`` it.

    ``connect_retries`` is the number of *attempts* for a request whose connection fails before any
    response (at least one). Timeouts: ``connect_timeout`` to open a connection,
    ``first_token_timeout`` for TGI's first event (requests queue in TGI while the batch is full),
    ``read_timeout`` between two events (TGI sends a keep-alive after 15 s of silence, so only a hung
    TGI reaches it) and for ``/info``, ``request_timeout`` for a whole ``/generate`` answer (no token
    arrives before the end there, so the other two cannot apply). ``api_key`` is sent as
    ``Authorization: Bearer`` on every route, for a TGI started with ``--api-key``.

    The connections: one aiohttp ``ClientSession`` over a keep-alive ``TCPConnector`` (:class:`_Connector`)
    without a limit (TGI's own ``max_concurrent_requests`` answers 429), idle connections closed after 30 s; no proxies
    from the environment, no cookies, no redirects, no compression asked for or decoded. ``connector``
    replaces the ``TCPConnector`` (the tests' in-process TGI); the session owns and closes it. aiohttp
    itself sends a ``GET`` (``/health``, ``/info``) once more when its connection closes before any
    response (RFC 9112 §9.3.1); a ``POST`` is only retried here.
    """

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float,
        first_token_timeout: float,
        read_timeout: float,
        request_timeout: float,
        connect_retries: int,
        api_key: str | None = None,
        connector: aiohttp.BaseConnector | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        url = URL(self.base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._attempts = max(1, connect_retries)
        self._connect_timeout = connect_timeout
        self._first_token_timeout = first_token_timeout
        self._read_timeout = read_timeout
        self._request_timeout = request_timeout
        self._urls = {
            route: URL(self.base_url + route)
            for route in ("/generate_stream", "/generate", "/info", "/health")
        }
        # Accept-Encoding named, rather than left out with skip_auto_headers (which costs aiohttp a header
        # copy per request): no compression asked for, none to decode.
        headers = {"User-Agent": f"tgi-gateway/{__version__}", "Accept-Encoding": "identity"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._stream_headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        self._generate_headers = {"Content-Type": "application/json", "Accept": "application/json"}
        self._loop = asyncio.get_running_loop()
        self._session = aiohttp.ClientSession(
            connector=connector or _Connector(limit=0, keepalive_timeout=_KEEPALIVE_EXPIRY),
            timeout=aiohttp.ClientTimeout(total=None, connect=connect_timeout),
            headers=headers,
            auto_decompress=False,
            trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            read_bufsize=_READ_BUFSIZE,
        )

    async def aclose(self) -> None:
        await self._session.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ---------------------------------------------------------------- routes

    async def health(self, *, timeout: float = HEALTH_TIMEOUT) -> bool:
        """``GET /health``: True on 200; False on anything else, including no answer within ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                request = self._session.get(self._urls["/health"], allow_redirects=False)
                async with request as response:
                    await _read_at_most(response.content, _MAX_ERROR_BODY)
                    return response.status == 200
        except _FOREIGN:
            return False

    async def info(self) -> TGIInfo:
        """``GET /info``, within ``read_timeout`` and ``first_token_timeout`` (it is read on a request's way to
        TGI: a TGI that accepts connections and never answers costs a request no more than its first token
        could). Raises :class:`TGIUnavailableError` when TGI cannot be reached, :class:`TGITimeoutError`
        (504) when it does not answer in time."""
        timeout = min(self._read_timeout, self._first_token_timeout)
        late = f"TGI did not answer /info within {timeout:g} s"
        deadline = self._loop.time() + timeout
        response = await self._open("GET", "/info", None, None, deadline, late)
        try:
            if response.status != 200:
                raise await self._error(response, deadline)
            try:
                if (response.content_length or 0) > protocol.MAX_INFO_BODY:
                    raise protocol.info_too_large()  # not read at all
                async with asyncio.timeout_at(deadline):
                    content = await _read_at_most(response.content, protocol.MAX_INFO_BODY)
            except _FOREIGN as exc:
                raise _translate(
                    exc, ("body",), late=late, cut="TGI closed the connection in its /info answer"
                ) from exc
            if len(content) > protocol.MAX_INFO_BODY:
                raise protocol.info_too_large()
            return parse_info(content)
        finally:
            response.close()

    @contextlib.asynccontextmanager
    async def generate_stream(
        self, inputs: str, parameters: Mapping[str, Any], *, logprobs: bool = False
    ) -> AsyncIterator[TokenStream]:
        """``POST /generate_stream`` with ``{"inputs", "parameters"}`` (``parameters`` as given); with
        ``logprobs`` the tokens carry TGI's ``logprob`` and ``top_tokens``.

        Entering waits for the response head (connection failures retried, then
        :class:`TGIUnavailableError`; a non-200 or non-SSE answer raises its mapped error) and yields
        the :class:`TokenStream`. Leaving closes the connection at once — that is what stops the
        generation in TGI — unless the stream was read to its end (it then serves the next request).
        """
        body = request_body(inputs, parameters)
        timeout = self._first_token_timeout
        response = await self._open(
            "POST", "/generate_stream", self._stream_headers, body, self._loop.time() + timeout,
            f"TGI did not answer within {timeout:g} s (first-token timeout)",
        )  # fmt: skip
        stream: TokenStream | None = None
        try:
            if response.status != 200:
                raise await self._error(response, self._loop.time() + self._read_timeout)
            expect_content_type(
                "/generate_stream", response.headers.get("content-type", ""), "text/event-stream"
            )
            stream = TokenStream(
                response,
                first_token_timeout=self._first_token_timeout,
                read_timeout=self._read_timeout,
                logprobs=logprobs,
            )
            yield stream
        finally:
            if stream is not None:
                stream._leave()
            response.close()  # a body read to its end has already given its connection back

    async def generate(
        self, inputs: str, parameters: Mapping[str, Any], *, logprobs: bool = False
    ) -> Generation:
        """``POST /generate`` with ``{"inputs", "parameters"}`` (``parameters`` as given: the caller asks
        for ``details: true``, without which TGI sends no tokens) → the whole :class:`Generation` (with
        ``logprobs``, its tokens carry TGI's ``logprob`` and ``top_tokens``).

        Connection failures before any response byte are retried, then :class:`TGIUnavailableError`; a
        non-200 answer raises its mapped error; a body that is not TGI's answer (not JSON, no details,
        over 64 MiB) a :class:`TGIProtocolError`. The whole exchange, retries and TGI's queue included,
        must end within ``request_timeout`` seconds, else :class:`TGITimeoutError` (504). Cancelled, it
        closes the connection at once, which makes TGI drop the request; once the answer is read whole
        the connection serves the next request.
        """
        body = request_body(inputs, parameters)
        timeout = self._request_timeout
        deadline = self._loop.time() + timeout
        late = f"TGI did not finish the generation within {timeout:g} s (--request-timeout)"
        response = await self._open("POST", "/generate", self._generate_headers, body, deadline, late)
        try:
            if response.status != 200:
                raise await self._error(response, min(deadline, self._loop.time() + self._read_timeout))
            expect_content_type("/generate", response.headers.get("content-type", ""), "application/json")
            if (response.content_length or 0) > protocol.MAX_GENERATE_BODY:
                raise protocol.generate_too_large()  # not read at all
            try:
                async with asyncio.timeout_at(deadline):
                    content = await _read_at_most(response.content, protocol.MAX_GENERATE_BODY)
            except _FOREIGN as exc:
                cut = "TGI closed the connection in the middle of its answer"
                raise _translate(exc, ("body",), late=late, cut=cut) from exc
            if len(content) > protocol.MAX_GENERATE_BODY:
                raise protocol.generate_too_large()
            return parse_generation(content, response.headers.get("x-prompt-tokens"), logprobs=logprobs)
        finally:
            response.close()

    # ---------------------------------------------------------------- transport

    async def _open(
        self,
        method: str,
        route: str,
        headers: Mapping[str, str] | None,
        body: bytes | None,
        deadline: float,
        late: str,
    ) -> aiohttp.ClientResponse:
        """Send the request, up to the response head, which must arrive by ``deadline`` (loop time; else
        :class:`TGITimeoutError` with the message ``late``); retry only failures before any response byte."""
        send = partial(
            self._session.request,
            method,
            self._urls[route],
            headers=headers,
            data=body,
            allow_redirects=False,
        )
        failed: list[BaseException] = []

        async def attempt() -> aiohttp.ClientResponse:  # tenacity's first attempt: the one that failed below
            if failed:
                raise failed.pop()
            return await send()

        try:
            async with asyncio.timeout_at(deadline):
                try:  # the usual case, without tenacity's machinery (~30 µs a call)
                    return await send()
                except _FOREIGN as exc:
                    if self._attempts == 1 or not _retriable(exc):
                        raise
                    failed.append(exc)
                retrying = AsyncRetrying(
                    stop=stop_after_attempt(self._attempts),
                    wait=_BACKOFF,
                    retry=retry_if_exception(_retriable),
                    reraise=True,
                )
                return await retrying(attempt)
        except _FOREIGN as exc:
            context = {"url": self.base_url, "connect_timeout": self._connect_timeout, "late": late}
            raise _translate(exc, _OPENING, **context) from exc

    @staticmethod
    async def _error(response: aiohttp.ClientResponse, deadline: float) -> UpstreamError:
        """A non-200 answer → its mapped error, from the short error body read by ``deadline``
        (loop time)."""
        try:
            async with asyncio.timeout_at(deadline):
                content = await _read_at_most(response.content, _MAX_ERROR_BODY)
        except _FOREIGN:
            content = b""
        return error_from_body(
            response.status, response.headers.get("content-type", ""), content[:_MAX_ERROR_BODY]
        )
