"""A lean HTTP/1.1 client for long streamed responses: asyncio protocols and httptools' C parser.

Why not httpx here
------------------
The gateway reads TGI's ``/generate_stream`` one token at a time, and at a GPU's pace every token is
its own socket read. Through httpx → httpcore → anyio → h11 → httpx-sse a read crosses ~12 Python layers;
``benchmarks/bench_upstream.py`` (128 streams, 20 ms/token) measured ~320 µs of CPU per token that way
against ~26 µs for the gateway's whole token path on this module (SSE decoding and token parsing
included; docs/performance.md). Non-stream requests read TGI's ``/generate`` through the same pool (one
JSON answer, read whole with :meth:`Response.read_all`), so both kinds of generation share keep-alive
connections. httpx still serves the gateway's other TGI calls (``/health``, ``/info``).

What it does, and no more
-------------------------
* :class:`Pool` keeps idle keep-alive connections to one origin (``http`` or ``https``) and opens more
  on demand; :meth:`Pool.request` writes one request and returns the :class:`Response` as soon as its
  head (status and headers) has arrived.
* :class:`Response` hands out body bytes as they arrive (:meth:`Response.read`, with a timeout per
  wait; :meth:`Response.read_all`, up to a size within a timeout in all), de-chunked by httptools. Closing it (:meth:`Response.close`) returns the connection to the
  pool when the body was read to its end and the server allows keep-alive; otherwise the connection is
  closed at once — for TGI that is how a request leaves the batch.
* Reading is paused while more than :data:`HIGH_WATER` bytes wait unread, so a slow consumer cannot
  make the buffer grow.

Errors are this module's own (:class:`ConnectFailed` before any response byte — safe to retry —,
:class:`ResponseTimeout`, :class:`ConnectionClosed`); the caller maps them to its own.
No proxies, no redirects, no compression, no HTTP/2: TGI's router speaks plain HTTP/1.1.
"""

from __future__ import annotations

import asyncio
import collections
import math
import ssl
import time
from collections.abc import Mapping
from urllib.parse import urlsplit

import httptools

__all__ = ["ConnectFailed", "ConnectionClosed", "HTTPError", "Pool", "Response", "ResponseTimeout"]

#: Unread body bytes above which the connection stops reading from its socket (resumed once read).
HIGH_WATER = 256 * 1024


class HTTPError(Exception):
    """Base of this module's errors."""


class ConnectFailed(HTTPError):
    """No response byte was received: connecting failed, or the connection closed before answering.
    The server cannot have acted on the request (a closed connection cancels a TGI request), so
    sending it again is safe."""


class ResponseTimeout(HTTPError):
    """No response byte within the allowed time (the head, or the next piece of the body)."""


class ConnectionClosed(HTTPError):
    """The connection ended, or broke, in the middle of a response."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; at most one response in flight on it."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self._parser: httptools.HttpResponseParser | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._deadline = math.inf  # (loop time) the awaited bytes are late after it
        self._what = ""  # the timeout's message
        self._timer: asyncio.TimerHandle | None = None  # checks the deadline; armed for _timer_at
        self._timer_at = math.inf
        self._lost: Exception | None = None
        self._paused = False
        self._reset_response()

    def _reset_response(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.head_done = False
        self.keep_alive = False
        self.body: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.received = False

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        if self._parser is None:  # bytes while no request is in flight: the connection is unusable
            self._lost = ConnectionClosed("unexpected data from the server between responses")
            self.transport.close()  # type: ignore[union-attr]
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._lost = ConnectionClosed(f"invalid HTTP response: {exc}")
            self.transport.close()  # type: ignore[union-attr]
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost is None:
            reason = f": {exc}" if exc else ""
            if not self.received:
                self._lost = ConnectFailed(f"connection closed before any response{reason}")
            else:
                self._lost = ConnectionClosed(f"connection closed before the end of the response{reason}")
        self._wake()

    # ---------------------------------------------------------------- httptools callbacks

    def on_status(self, status: bytes) -> None:
        pass

    def on_header(self, name: bytes, value: bytes) -> None:  # httptools hands each header over whole
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        parser = self._parser
        self.status = parser.get_status_code()  # type: ignore[union-attr]
        self.keep_alive = parser.should_keep_alive()  # type: ignore[union-attr]  # (not valid later)
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self._paused:
            self._paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        self.complete = True

    # ---------------------------------------------------------------- used by Pool and Response

    @property
    def usable(self) -> bool:
        return self._lost is None and self.transport is not None and not self.transport.is_closing()

    def send(self, request: bytes) -> None:
        self._reset_response()
        self._parser = httptools.HttpResponseParser(self)
        self.transport.write(request)  # type: ignore[union-attr]

    def take(self) -> bytes:
        data = b"".join(self.body) if len(self.body) != 1 else self.body[0]
        self.body.clear()
        self.buffered = 0
        if self._paused:
            self._paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        return data

    async def wait(self, timeout: float | None, what: str) -> None:
        """Wait for the next bytes (or the end); raise the connection's error once it is broken.

        The timeout costs no timer per call (a token stream waits once per token): the deadline is
        recorded, and one timer per connection checks it when it fires, re-armed only when the
        deadline has moved past it (so about once per `timeout` on a live stream)."""
        if self._lost is not None:
            raise self._lost
        waiter = self._waiter = self._loop.create_future()
        if timeout is None:
            self._deadline = math.inf
        else:
            self._deadline, self._what = self._loop.time() + timeout, what
            if self._timer is None or self._timer_at > self._deadline:
                self._arm(self._deadline)
        try:
            await waiter
        finally:
            self._waiter = None

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._check_deadline)

    def _check_deadline(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done() or self._deadline == math.inf:
            return  # nobody waits with a deadline: the next wait arms the timer again
        if self._loop.time() >= self._deadline:
            waiter.set_exception(ResponseTimeout(self._what))
        else:
            self._arm(self._deadline)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def finish(self) -> bool:
        """The response is over: may this connection carry another request?"""
        reusable = self.complete and self.keep_alive and self.usable
        self._parser = None
        self._stop_timer()
        if not reusable and self.transport is not None:
            self.transport.close()
        return reusable

    def close(self) -> None:
        self._parser = None
        self._stop_timer()
        if self.transport is not None:
            self.transport.close()


class Response:
    """A response whose head has arrived; the body is read with :meth:`read`. Always :meth:`close` it."""

    def __init__(self, pool: Pool, conn: _Connection) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        self.status = conn.status
        self.headers: Mapping[str, str] = conn.headers

    async def read(self, timeout: float | None) -> bytes:
        """The body bytes received since the last call, waiting up to `timeout` seconds for some;
        ``b""`` at the end of the body. Raises :class:`ResponseTimeout` or :class:`ConnectionClosed`."""
        conn = self._conn
        if conn is None:
            raise RuntimeError("response read after it was closed")
        while not conn.body:
            if conn.complete:
                return b""
            try:
                await conn.wait(timeout, f"no data from the server for {timeout:g} s")
            except ConnectFailed as exc:  # the head had arrived: for the caller this is a broken body
                raise ConnectionClosed(str(exc)) from None
        return conn.take()

    async def read_all(self, limit: int, timeout: float | None) -> bytes:
        """The rest of the body, at most `limit` bytes, within `timeout` seconds in all (error bodies, and
        the JSON answer of a non-stream request). Raises :class:`ResponseTimeout` or :class:`ConnectionClosed`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        parts: list[bytes] = []
        size = 0
        while size < limit:
            chunk = await self.read(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts)[:limit]

    def close(self) -> None:
        """Give the connection back (body read to its end, keep-alive allowed) or close it at once.
        Synchronous, so that no cancellation can come between deciding and closing."""
        conn, self._conn = self._conn, None
        if conn is not None:
            if not conn.body and conn.finish():
                self._pool._release(conn)
            else:
                conn.close()

    @property
    def closed(self) -> bool:
        return self._conn is None


class Pool:
    """Keep-alive connections to one origin. Create it in a running event loop; :meth:`aclose` it."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float,
        max_idle: int = 256,
        idle_expiry: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = (ssl_context or ssl.create_default_context()) if parts.scheme == "https" else None
        default_port = 443 if parts.scheme == "https" else 80
        host = f"[{self._host}]" if ":" in self._host else self._host
        self.host_header = host if self._port == default_port else f"{host}:{self._port}"
        self.base_path = parts.path.rstrip("/")
        self._connect_timeout = connect_timeout
        self._max_idle = max_idle
        self._idle_expiry = idle_expiry
        self._idle: collections.deque[_Connection] = collections.deque()
        self._closed = False

    async def request(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
        *,
        timeout: float | None,
    ) -> Response:
        """Send one request; return once the response head arrived (within `timeout` seconds of sending).

        A reused idle connection that turns out closed by the server is replaced by a new one once,
        transparently. Raises :class:`ConnectFailed` (safe to retry), :class:`ResponseTimeout`,
        :class:`ConnectionClosed`.
        """
        head = [f"{method} {self.base_path}{path} HTTP/1.1\r\nHost: {self.host_header}\r\n"]
        head += [f"{name}: {value}\r\n" for name, value in headers.items()]
        head.append(f"Content-Length: {len(body)}\r\n\r\n")
        raw = "".join(head).encode("latin-1") + body
        conn = self._reuse()
        if conn is not None:
            try:
                return await self._exchange(conn, raw, timeout)
            except ConnectFailed:  # the server had closed that idle connection meanwhile
                pass
        return await self._exchange(await self._connect(), raw, timeout)

    async def _exchange(self, conn: _Connection, raw: bytes, timeout: float | None) -> Response:
        conn.send(raw)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not conn.head_done:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                await conn.wait(left, f"no response within {timeout:g} s")
        except BaseException:
            conn.close()
            raise
        return Response(self, conn)

    def _reuse(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()  # the most recently used: the likeliest to be alive
            if conn.usable and now - conn.idle_since < self._idle_expiry:
                return conn
            conn.close()
        return None

    async def _connect(self) -> _Connection:
        if self._closed:
            raise ConnectFailed("the client is closed")
        loop = asyncio.get_running_loop()
        conn = _Connection()
        connecting = loop.create_connection(
            lambda: conn, self._host, self._port, ssl=self._ssl, server_hostname=self._host if self._ssl else None
        )
        try:
            await asyncio.wait_for(connecting, self._connect_timeout)
        except asyncio.TimeoutError:
            conn.close()
            raise ConnectFailed(f"connection timed out after {self._connect_timeout:g} s") from None
        except OSError as exc:
            conn.close()
            raise ConnectFailed(str(exc) or type(exc).__name__) from exc
        return conn

    def _release(self, conn: _Connection) -> None:
        if self._closed or len(self._idle) >= self._max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    async def aclose(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()
