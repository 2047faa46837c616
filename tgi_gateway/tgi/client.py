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
import ipaddress
import logging
import math
import random
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, Protocol, Self

import aiohttp
from aiohttp.abc import AbstractResolver
from aiohttp.client_proto import ResponseHandler
from yarl import URL

from .. import __version__
from ..errors import (
    DescriptorsExhaustedError,
    GatewayError,
    TGIOverloadedError,
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
from .replicas import LOAD_FACTOR, Balancer, Replica, narrowest

__all__ = [
    "HEALTH_TIMEOUT",
    "Generation",
    "ReplicaEvents",
    "StreamEnd",
    "TGIClient",
    "TGIInfo",
    "Token",
    "TokenStream",
]

log = logging.getLogger("tgi_gateway")

#: /health is a readiness probe: a slow answer counts as "not healthy".
HEALTH_TIMEOUT = 2.0
# An idle keep-alive connection is closed after this long (below the idle timeouts of the usual proxies,
# so that the gateway, not the proxy, closes it).
_KEEPALIVE_EXPIRY = 30.0
# aiohttp's StreamReader stops reading the socket above twice this many unread bytes (then resumes below it).
_READ_BUFSIZE = 128 * 1024


# Backoff between two attempts on the same replica: 50 ms, 100 ms, then 200 ms at most, plus up to 20 ms of
# jitter so that many streams failing together do not retry in step. Three attempts wait about 0.15-0.19 s
# in all. An attempt on another replica (failover) goes at once.
def _backoff(retry: int) -> float:
    return min(0.2, 0.05 * 2 ** (retry - 1)) + random.uniform(0, 0.02)


# A name is resolved within this long (each round of the re-resolution); past it the replicas stay as they are.
_RESOLVE_TIMEOUT = 2.0
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


class ReplicaEvents(Protocol):
    """What the client reports per replica (the server's metrics implement it); ``url`` is the replica's."""

    def request(self, url: str) -> None: ...  # an attempt sent to it (in flight until `done`)

    def done(self, url: str) -> None: ...

    def failover(self, url: str) -> None: ...  # an attempt that failed there went to another replica

    def ejected(self, url: str, ejected: bool) -> None: ...


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


class TGIClient:
    """One pooled async client to one or several TGI routers (replicas). Create it once, in a running event
    loop (the app's lifespan), share it, ``aclose`` it.

    ``base_url``: one URL, or several (replicas of the same model). A URL whose host is a name (http only)
    is resolved every ``resolve_interval`` seconds (in the background, bounded, never on a request's way):
    when the name has several addresses (a Kubernetes headless Service) it stands for one replica per
    address, else for itself as given. With several replicas, every ``health_interval`` seconds each one's
    ``/health`` is probed. Which replica serves a request is :class:`~tgi_gateway.tgi.replicas.Balancer`'s
    decision (least outstanding requests with two random choices; with an ``affinity`` key, consistent
    hashing with bounded loads); a replica that refuses a connection or answers 503 is ejected with
    exponential back-off, and the request goes to another one.

    ``connect_retries`` is the number of *attempts* for a request whose connection fails before any
    response (at least one), each on a replica not tried yet while there is one (the same one after a short
    backoff otherwise); a 503 is also tried elsewhere while another replica is left. Timeouts:
    ``connect_timeout`` to open a connection, ``first_token_timeout`` for TGI's first event (requests queue
    in TGI while the batch is full), ``read_timeout`` between two events (TGI sends a keep-alive after 15 s
    of silence, so only a hung TGI reaches it) and for ``/info``, ``request_timeout`` for a whole
    ``/generate`` answer (no token arrives before the end there, so the other two cannot apply).
    ``api_key`` is sent as ``Authorization: Bearer`` on every route, for a TGI started with ``--api-key``.

    The connections: one aiohttp ``ClientSession`` over a keep-alive ``TCPConnector`` (:class:`_Connector`)
    without a limit (TGI's own ``max_concurrent_requests`` answers 429), idle connections closed after 30 s; no proxies
    from the environment, no cookies, no redirects, no compression asked for or decoded. ``connector``
    replaces the ``TCPConnector`` (the tests' in-process TGI); the session owns and closes it. ``resolver``
    (aiohttp's interface) resolves the names, for the connector too (tests use their own). aiohttp
    itself sends a ``GET`` (``/health``, ``/info``) once more when its connection closes before any
    response (RFC 9112 §9.3.1); a ``POST`` is only retried here. ``events`` hears of each replica's
    requests, failovers and ejections.
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        *,
        connect_timeout: float,
        first_token_timeout: float,
        read_timeout: float,
        request_timeout: float,
        connect_retries: int,
        api_key: str | None = None,
        connector: aiohttp.BaseConnector | None = None,
        resolver: AbstractResolver | None = None,
        health_interval: float = 2.0,
        resolve_interval: float = 10.0,
        eject_base: float = 1.0,
        eject_max: float = 30.0,
        load_factor: float = LOAD_FACTOR,
        rng: random.Random | None = None,
        events: ReplicaEvents | None = None,
    ) -> None:
        endpoints = [base_url] if isinstance(base_url, str) else list(base_url)
        if not endpoints:
            raise ValueError("no TGI endpoint")
        self.endpoints = [url.rstrip("/") for url in endpoints]
        for endpoint in self.endpoints:
            url = URL(endpoint)
            if url.scheme not in ("http", "https") or not url.host:
                raise ValueError(f"not an http(s) URL: {endpoint!r}")
        self.base_url = self.endpoints[0]
        self._attempts = max(1, connect_retries)
        self._connect_timeout = connect_timeout
        self._first_token_timeout = first_token_timeout
        self._read_timeout = read_timeout
        self._request_timeout = request_timeout
        self._routes: dict[str, dict[str, URL]] = {}  # per replica URL: the URL of each route
        self._events = events
        self.balancer = Balancer(
            self.endpoints, rng=rng, load_factor=load_factor, eject_base=eject_base, eject_max=eject_max
        )
        # Accept-Encoding named, rather than left out with skip_auto_headers (which costs aiohttp a header
        # copy per request): no compression asked for, none to decode.
        headers = {"User-Agent": f"tgi-gateway/{__version__}", "Accept-Encoding": "identity"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._stream_headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        self._generate_headers = {"Content-Type": "application/json", "Accept": "application/json"}
        self._loop = asyncio.get_running_loop()
        self._resolver = resolver
        if connector is None:
            options: dict[str, Any] = {"resolver": resolver} if resolver is not None else {}
            connector = _Connector(limit=0, keepalive_timeout=_KEEPALIVE_EXPIRY, **options)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, connect=connect_timeout),
            headers=headers,
            auto_decompress=False,
            trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            read_bufsize=_READ_BUFSIZE,
        )
        # Each endpoint → the replica URLs it stands for (itself until a name resolves to several addresses).
        self._expansion: dict[str, list[str]] = {endpoint: [endpoint] for endpoint in self.endpoints}
        named = [e for e in self.endpoints if URL(e).scheme == "http" and not _is_address(URL(e).host or "")]
        self._tasks: list[asyncio.Task[None]] = []
        if named and resolve_interval > 0:
            self._tasks.append(asyncio.ensure_future(self._resolve_loop(named, resolve_interval)))
        if (len(self.endpoints) > 1 or named) and health_interval > 0:
            self._tasks.append(asyncio.ensure_future(self._probe_loop(health_interval)))

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._session.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def balanced(self) -> bool:
        """More than one replica: an affinity key is worth computing."""
        return len(self.balancer.live) > 1

    # ---------------------------------------------------------------- routes

    async def health(self, *, timeout: float = HEALTH_TIMEOUT) -> bool:
        """``GET /health`` of every replica at once: True when at least one answers 200 within ``timeout``.
        The answers are the balancer's probes (a failing replica is ejected, a healthy one re-admitted)."""
        live = self.balancer.live
        if len(live) == 1:
            return await self._probe(live[0], timeout)
        return any(await asyncio.gather(*(self._probe(replica, timeout) for replica in live)))

    async def _probe(self, replica: Replica, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                request = self._session.get(self._url(replica, "/health"), allow_redirects=False)
                async with request as response:
                    await _read_at_most(response.content, _MAX_ERROR_BODY)
                    ok = response.status == 200
        except _FOREIGN:
            ok = False
        was_ejected = bool(replica.failures or replica.ejected_until)
        self.balancer.probed(replica, ok, self._loop.time())
        is_ejected = bool(replica.failures or replica.ejected_until)
        if self._events is not None and was_ejected != is_ejected:
            self._events.ejected(replica.url, is_ejected)
        return ok

    async def info(self) -> TGIInfo:
        """``GET /info`` of every replica not ejected, at once: the narrowest of their limits
        (:func:`~tgi_gateway.tgi.replicas.narrowest`: the prompt is rendered before a replica is picked).
        Each within ``read_timeout`` and ``first_token_timeout`` (it is read on a request's way to TGI: a
        TGI that accepts connections and never answers costs a request no more than its first token could).
        Raises (the first replica's error) only when no replica answers: :class:`TGIUnavailableError` when
        TGI cannot be reached, :class:`TGITimeoutError` (504) when it does not answer in time."""
        live = self.balancer.live
        if len(live) == 1:
            live[0].info = await self._info(live[0])
            return live[0].info
        now = self._loop.time()
        asked = [r for r in live if not r.ejected(now)] or live
        answers = await asyncio.gather(*(self._info(r) for r in asked), return_exceptions=True)
        infos = []
        for replica, answer in zip(asked, answers):
            if isinstance(answer, TGIInfo):
                replica.info = answer
                infos.append(answer)
            elif not isinstance(answer, UpstreamError):
                raise answer
        if not infos:
            raise next(a for a in answers if isinstance(a, BaseException))
        return narrowest(infos)

    async def _info(self, replica: Replica) -> TGIInfo:
        timeout = min(self._read_timeout, self._first_token_timeout)
        late = f"TGI did not answer /info within {timeout:g} s"
        deadline = self._loop.time() + timeout
        response, _ = await self._open("GET", "/info", None, None, deadline, late, pinned=replica)
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
        self,
        inputs: str,
        parameters: Mapping[str, Any],
        *,
        logprobs: bool = False,
        affinity: int | None = None,
    ) -> AsyncIterator[TokenStream]:
        """``POST /generate_stream`` with ``{"inputs", "parameters"}`` (``parameters`` as given); with
        ``logprobs`` the tokens carry TGI's ``logprob`` and ``top_tokens``; ``affinity``: the request's
        prefix key (:func:`~tgi_gateway.tgi.replicas.affinity_key`).

        Entering waits for the response head (connection failures retried, on another replica when there
        is one, then :class:`TGIUnavailableError`; a non-200 or non-SSE answer raises its mapped error) and
        yields the :class:`TokenStream`. With several replicas it also waits for the first event: a stream
        cut before it (the replica died) or refused as overloaded goes to another replica within the same
        attempts; never once a token has arrived. Leaving closes the connection at once — that is what
        stops the generation in TGI — unless the stream was read to its end (it then serves the next request).
        """
        body = request_body(inputs, parameters)
        timeout = self._first_token_timeout
        late = f"TGI did not answer within {timeout:g} s (first-token timeout)"
        tried: list[Replica] = []
        while True:
            response, replica = await self._open(
                "POST", "/generate_stream", self._stream_headers, body, self._loop.time() + timeout, late,
                key=affinity, tried=tried,
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
                if replica is not None and len(tried) + 1 < self._attempts and len(self.balancer.live) > 1:
                    try:  # the first event read here, so that a replica failing before it can be replaced
                        stream._items.extend(await stream.batch())
                    except (TGIProtocolError, TGIOverloadedError) as exc:
                        if stream._decoder.tokens:
                            raise
                        if isinstance(exc, TGIProtocolError):
                            self._failed(replica)  # cut before any event: the replica is going away
                        replica.failovers += 1
                        if self._events is not None:
                            self._events.failover(replica.url)
                        tried.append(replica)
                        stream._leave()
                        response.close()
                        self._done(replica)
                        continue
            except BaseException:
                if stream is not None:
                    stream._leave()
                response.close()
                self._done(replica)
                raise
            break
        try:
            yield stream
        finally:
            stream._leave()
            response.close()  # a body read to its end has already given its connection back
            self._done(replica)

    async def generate(
        self,
        inputs: str,
        parameters: Mapping[str, Any],
        *,
        logprobs: bool = False,
        affinity: int | None = None,
    ) -> Generation:
        """``POST /generate`` with ``{"inputs", "parameters"}`` (``parameters`` as given: the caller asks
        for ``details: true``, without which TGI sends no tokens) → the whole :class:`Generation` (with
        ``logprobs``, its tokens carry TGI's ``logprob`` and ``top_tokens``); ``affinity`` as for
        :meth:`generate_stream`.

        Connection failures before any response byte are retried (on another replica when there is one),
        then :class:`TGIUnavailableError`; a non-200 answer raises its mapped error; a body that is not
        TGI's answer (not JSON, no details, over 64 MiB) a :class:`TGIProtocolError`. The whole exchange,
        retries and TGI's queue included, must end within ``request_timeout`` seconds, else
        :class:`TGITimeoutError` (504). Cancelled, it closes the connection at once, which makes TGI drop
        the request; once the answer is read whole the connection serves the next request.
        """
        body = request_body(inputs, parameters)
        timeout = self._request_timeout
        deadline = self._loop.time() + timeout
        late = f"TGI did not finish the generation within {timeout:g} s (--request-timeout)"
        response, replica = await self._open(
            "POST", "/generate", self._generate_headers, body, deadline, late, key=affinity
        )
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
            self._done(replica)

    # ---------------------------------------------------------------- transport

    def _url(self, replica: Replica, route: str) -> URL:
        routes = self._routes.get(replica.url)
        if routes is None:
            routes = self._routes[replica.url] = {
                r: URL(replica.url + r) for r in ("/generate_stream", "/generate", "/info", "/health")
            }
        return routes[route]

    def _done(self, replica: Replica | None) -> None:
        if replica is not None:
            self.balancer.finish(replica)
            if self._events is not None:
                self._events.done(replica.url)

    def _failed(self, replica: Replica) -> None:
        self.balancer.failed(replica, self._loop.time())
        if self._events is not None:
            self._events.ejected(replica.url, True)

    async def _open(
        self,
        method: str,
        route: str,
        headers: Mapping[str, str] | None,
        body: bytes | None,
        deadline: float,
        late: str,
        *,
        key: int | None = None,
        pinned: Replica | None = None,
        tried: list[Replica] | None = None,
    ) -> tuple[aiohttp.ClientResponse, Replica | None]:
        """Send the request, up to the response head, which must arrive by ``deadline`` (loop time; else
        :class:`TGITimeoutError` with the message ``late``); retry only failures before any response byte,
        and a 503 while another replica is left. Returns the response and the replica it came from, which
        counts the request in flight until :meth:`_done` (``pinned``: that replica only, nothing counted;
        ``tried``: the replicas this request failed on already, each an attempt spent, added to)."""
        balancer, events = self.balancer, self._events
        tried = [] if tried is None else tried
        replica: Replica | None = None
        target = pinned
        try:
            async with asyncio.timeout_at(deadline):
                for attempt in range(len(tried) + 1, self._attempts + 1):
                    if pinned is None:
                        replica = target or balancer.pick(self._loop.time(), key, tried)
                        balancer.start(replica)
                        if events is not None:
                            events.request(replica.url)
                    url = self._url(target or replica, route)  # type: ignore[arg-type]
                    try:
                        response = await self._session.request(
                            method, url, headers=headers, data=body, allow_redirects=False
                        )
                    except _FOREIGN as exc:
                        if pinned is None:
                            assert replica is not None
                            if _retriable(exc):
                                self._failed(replica)
                            if attempt == self._attempts or not _retriable(exc):
                                raise
                        elif attempt == self._attempts or not _retriable(exc):
                            raise
                    else:
                        if pinned is not None:
                            return response, None
                        assert replica is not None
                        if response.status != 503:
                            if replica.failures or replica.ejected_until:
                                balancer.succeeded(replica)
                                if events is not None:
                                    events.ejected(replica.url, False)
                            return response, replica
                        if len(balancer.live) == 1 or attempt == self._attempts:
                            if len(balancer.live) > 1:
                                self._failed(replica)
                            return response, replica
                        response.close()  # overloaded or restarting: another replica is tried
                        self._failed(replica)
                    # the next attempt
                    if pinned is None:
                        assert replica is not None
                        tried.append(replica)
                        self._done(replica)
                        failed, replica = replica, None
                        target = balancer.pick(self._loop.time(), key, tried)
                        if target is not failed:
                            failed.failovers += 1
                            if events is not None:
                                events.failover(failed.url)
                            continue
                    await asyncio.sleep(_backoff(attempt))
                raise AssertionError("unreachable: the last attempt returns or raises")
        except _FOREIGN as exc:
            context = {
                "url": (replica or pinned or tried[-1]).url
                if (replica or pinned or tried)
                else self.base_url,
                "connect_timeout": self._connect_timeout,
                "late": late,
            }
            self._done(replica)
            raise _translate(exc, _OPENING, **context) from exc
        except BaseException:
            self._done(replica)
            raise

    # ---------------------------------------------------------------- replicas

    async def _resolve_loop(self, named: list[str], interval: float) -> None:
        """Every ``interval`` s: each named endpoint resolved (at once, each within ``_RESOLVE_TIMEOUT``);
        the replicas updated when an expansion changed. A failed resolution keeps what the name stood for."""
        resolver = self._resolver or aiohttp.ThreadedResolver()
        while True:
            try:
                self._resolved(named, await asyncio.gather(*(self._resolve(resolver, e) for e in named)))
            except Exception:  # a bug must not end the loop: the replicas stay as they are
                log.exception("the re-resolution of the TGI endpoints failed")
            await asyncio.sleep(interval)

    def _resolved(self, named: list[str], results: list[list[str] | None]) -> None:
        """The replicas updated when a name's expansion changed."""
        changed = False
        for endpoint, urls in zip(named, results):
            if urls is not None and urls != self._expansion[endpoint]:
                self._expansion[endpoint] = urls
                changed = True
        if not changed:
            return
        added, drained = self.balancer.update([url for e in self.endpoints for url in self._expansion[e]])
        for replica in added:
            log.info("TGI replica added: %s", replica.url)
        for replica in drained:
            log.info("TGI replica drained (no longer resolved): %s", replica.url)
            if self._events is not None:
                self._events.ejected(replica.url, False)

    @staticmethod
    async def _resolve(resolver: AbstractResolver, endpoint: str) -> list[str] | None:
        url = URL(endpoint)
        host, port = url.host or "", url.port or 80
        try:
            async with asyncio.timeout(_RESOLVE_TIMEOUT):
                found = await resolver.resolve(host, port, family=socket.AF_INET)
        except (OSError, TimeoutError) as exc:
            log.warning("cannot resolve %s (%s): its replicas are kept", host, exc)
            return None
        addresses = sorted({item["host"] for item in found}, key=ipaddress.ip_address)
        if len(addresses) < 2:
            return [endpoint]  # one address: the URL as given (aiohttp resolves it, as for any URL)
        path = url.path.rstrip("/")
        return [f"{url.scheme}://{address}:{port}{path}" for address in addresses]

    async def _probe_loop(self, interval: float) -> None:
        """Every ``interval`` s, with several replicas: each one's ``/health`` probed at once (bounded by
        ``HEALTH_TIMEOUT``) -- an unhealthy one is ejected, a healthy one re-admitted."""
        while True:
            live = self.balancer.live
            if len(live) > 1:
                try:
                    await asyncio.gather(*(self._probe(r, min(HEALTH_TIMEOUT, interval)) for r in live))
                except Exception:  # a bug must not end the loop
                    log.exception("the /health probes of the TGI replicas failed")
            await asyncio.sleep(interval)

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
