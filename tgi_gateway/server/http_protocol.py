"""uvicorn's httptools protocol with the limits a connection must keep: head size and header count, a
deadline for the head and one for the body, and a cap on the connections of the process.

Theory of operation. A connection is in one phase at a time, and each phase has at most one timer:

    phase      entered                                   leaves when                 timer: on expiry
    NEW        the connection is accepted                its first byte arrives      head_timeout: close
    IDLE       a response completed (keep-alive)         a byte arrives              keep-alive (uvicorn's): close
    HEAD       a byte arrives in NEW or IDLE             the headers are complete    head_timeout: 408, close
    BODY       the headers are complete, a body follows  the body is complete        body_timeout: 408, close
    APP        the request is complete                   the response is complete    none: the app's timeouts

The head deadline of a new connection counts from its accept (a connection that never sends a byte is
closed after ``head_timeout``), that of a reused one from its first byte (the wait before it is the keep-alive
idle timeout). The head is measured as it arrives, before httptools buffers it: more than ``max_head_bytes``
received without the end of the headers, or more than ``max_headers`` headers, is refused with 431. Every
refusal is an OpenAI error body with ``Connection: close``; then the connection stops parsing, shuts its
writing side and discards what still arrives for at most ``_LINGER`` seconds (so the client reads the answer
instead of a reset), then closes.

The cap: when a connection is accepted with ``max_connections`` already open, the oldest connection waiting
for a request (NEW or IDLE, not a partial head) is closed to make room; if none waits, the new connection is
answered 503 at once and closed. A flood of silent connections therefore never locks out a real client, and
it lasts at most ``head_timeout`` per connection.

Nothing here runs per token: the response path (uvicorn's ``RequestResponseCycle.send``) is unchanged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

logger = logging.getLogger("tgi_gateway")

# Seconds a refused connection keeps reading (and discarding) before it is closed, so that a client still
# sending its head or body reads the error instead of a connection reset.
_LINGER = 2.0


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """The limits of every connection of one server process (built from the Settings by the CLI)."""

    max_head_bytes: int = 64 * 1024
    max_headers: int = 100
    head_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int | None = None


class Phase(Enum):
    NEW = "new"
    IDLE = "idle"
    HEAD = "head"
    BODY = "body"
    APP = "app"
    REFUSED = "refused"


_WAITING = (Phase.NEW, Phase.IDLE)


class _Refused(Exception):
    """Raised from a parser callback to stop httptools; `status` and `message` are the answer."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class GatewayHTTPProtocol(HttpToolsProtocol):
    """:class:`HttpToolsProtocol` keeping :class:`ConnectionLimits`; pass it as uvicorn's ``http=`` (through
    ``functools.partial(GatewayHTTPProtocol, limits=...)``)."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.phase = Phase.NEW
        self.waiting_since = time.monotonic()
        self._head_bytes = 0  # received since the head began (an upper bound: it may include body bytes)
        self._head_size = 0  # the head's URL and headers, as parsed
        self._header_count = 0
        self._timer: asyncio.TimerHandle | None = None

    # Connection ----------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        cap = self.limits.max_connections
        if cap is not None and len(self.connections) > cap and not self._make_room():
            logger.warning("connection refused: %d connections open (--max-connections)", cap)
            self._refuse(503, f"The gateway has its maximum of {cap} connections open; retry.", "overloaded")
            self.connections.discard(self)  # lingering, it no longer counts
            return
        self._arm(self.limits.head_timeout, self._head_expired)

    def _make_room(self) -> bool:
        """Close the connection that has waited longest for a request; False if none waits."""
        waiting = [c for c in self.connections if isinstance(c, GatewayHTTPProtocol) and c.phase in _WAITING]
        waiting = [c for c in waiting if c is not self]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda c: c.waiting_since)
        oldest.close()
        return True

    def close(self) -> None:
        self._disarm()
        self.phase = Phase.REFUSED
        self._unset_keepalive_if_required()
        self.connections.discard(self)
        if not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def eof_received(self) -> bool | None:  # type: ignore[override]
        if self.phase is Phase.REFUSED:
            self.transport.close()
        return None

    # Data ----------------------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        phase = self.phase
        if phase is Phase.REFUSED:
            return  # lingering: discarded
        if phase in _WAITING:
            if phase is Phase.IDLE:  # a reused connection: its head deadline starts with its first byte
                self._arm(self.limits.head_timeout, self._head_expired)
            self.phase = Phase.HEAD
            self._head_bytes = self._head_size = self._header_count = 0
        if self.phase is Phase.HEAD:
            self._head_bytes += len(data)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(refusal := exc.__context__, _Refused):
                self._refuse(refusal.status, refusal.message, refusal.code)
                return
            self._refuse(400, "Invalid HTTP request received.", "invalid_http_request")
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():  # as uvicorn does; the gateway has no WebSocket route
                self._disarm()
                self.handle_websocket_upgrade()
        except httptools.HttpParserError:
            self._refuse(400, "Invalid HTTP request received.", "invalid_http_request")
        else:
            if self.phase is Phase.HEAD and self._head_bytes > self.limits.max_head_bytes:
                self._refuse(*self._too_large())

    def _too_large(self) -> tuple[int, str, str]:
        return (
            431,
            f"The request head (URL and headers) is larger than {self.limits.max_head_bytes} bytes.",
            "request_header_fields_too_large",
        )

    # Parser callbacks ------------------------------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        if self._head_size > self.limits.max_head_bytes:
            raise _Refused(*self._too_large())
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._head_size += len(name) + len(value) + 4
        if self._header_count > self.limits.max_headers:
            raise _Refused(
                431,
                f"The request has more than {self.limits.max_headers} headers.",
                "request_header_fields_too_large",
            )
        if self._head_size > self.limits.max_head_bytes:
            raise _Refused(*self._too_large())
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self.phase = Phase.BODY
        self._arm(self.limits.body_timeout, self._body_expired)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        if self.phase is Phase.BODY:
            self.phase = Phase.APP
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # starts a pipelined request, if any
        # BODY: the body still arrives, its deadline runs on; a pipelined request in flight: not idle
        if self.phase is Phase.APP and (self.cycle is None or self.cycle.response_complete):
            self.phase = Phase.IDLE
            self.waiting_since = time.monotonic()

    # Deadlines -------------------------------------------------------------------------------------------

    def _arm(self, seconds: float, callback: Any) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_expired(self) -> None:
        self._timer = None
        if self.phase is Phase.NEW:
            self.close()  # not a byte: no request to answer
        elif self.phase is Phase.HEAD:
            self._refuse(
                408,
                f"The request head did not arrive within {self.limits.head_timeout:g} s.",
                "request_timeout",
            )

    def _body_expired(self) -> None:
        self._timer = None
        if self.phase is Phase.BODY:
            self._refuse(
                408,
                f"The request body did not arrive within {self.limits.body_timeout:g} s.",
                "request_timeout",
            )

    # Refusal ---------------------------------------------------------------------------------------------

    def _refuse(self, status: int, message: str, code: str) -> None:
        """Answer `status` (unless a response has started), stop reading requests, close after a linger."""
        self._disarm()
        self.phase = Phase.REFUSED
        self._unset_keepalive_if_required()
        cycle = self.cycle
        started = cycle is not None and cycle.response_started and not cycle.response_complete
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() answers http.disconnect; its send() is dropped
            cycle.message_event.set()
        transport = self.transport
        if transport.is_closing():
            return
        if started:
            transport.close()
            return
        kind = "invalid_request_error" if status < 500 else "server_error"
        body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n",
        ]
        if status == 503:
            head.append(b"retry-after: 1\r\n")
        transport.write(b"".join(head) + b"\r\n" + body)
        self.flow.resume_reading()
        try:
            transport.write_eof()
        except (OSError, RuntimeError, NotImplementedError):
            transport.close()
            return
        self._timer = self.loop.call_later(_LINGER, transport.close)
