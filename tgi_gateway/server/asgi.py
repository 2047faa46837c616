"""ASGI primitives shared by the routes and the middlewares: the client's disconnect, the event-stream
response, JSON and error responses.

Middlewares here are plain ASGI callables (no Starlette ``BaseHTTPMiddleware``): they add one function
call per message, not a task and a memory stream per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, Self, TypeVar

import orjson
from fastapi import Request
from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

from ..errors import GatewayError

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client went away before the answer was complete."""


class DisconnectWatch:
    """One per request: ``with DisconnectWatch.of(scope, receive):`` — the client's ``http.disconnect``
    cancels the block, which then raises :class:`ClientDisconnected` (at once if the client left earlier).

    One watcher task reads ``receive`` for the whole request; when the client goes away it cancels the
    task inside a block, wherever that task waits (TGI's queue, the next token, a write), and the
    cancellation is taken back (``uncancel``), so nothing above sees a cancelled task. The watcher is
    never cancelled itself: it ends when ``receive`` says ``http.disconnect``, which uvicorn also says
    once the response is complete, and then drops its links, so that a request leaves no reference cycle
    (docs/architecture.md, "The client's disconnect"). Only for blocks whose every ``await`` may be
    cancelled.
    """

    __slots__ = ("_cancelled", "_gone", "_receive", "_task", "_watcher")

    SCOPE_KEY = "tgi_gateway.disconnect_watch"

    @classmethod
    def of(cls, scope: Scope, receive: Receive) -> DisconnectWatch:
        watch = scope.get(cls.SCOPE_KEY)
        if watch is None:
            watch = scope[cls.SCOPE_KEY] = cls(receive)
        return watch

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._watcher: asyncio.Task[None] | None = None
        self._task: asyncio.Task[Any] | None = None  # the task inside a block, if any
        self._gone = self._cancelled = False

    def __enter__(self) -> Self:
        if self._gone:
            raise ClientDisconnected
        self._task = asyncio.current_task()
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())
        return self

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        # The client left, or the response is complete: no block will start again. The links to the
        # server's request (its receive) and to this task go, or they would tie the scope into a cycle.
        self._gone, self._receive, self._watcher = True, None, None  # type: ignore[assignment]
        if self._task is not None:  # a block's task waits: the cancellation lands there
            self._cancelled = True
            self._task.cancel()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        task, self._task = self._task, None
        if self._cancelled and task is not None:
            self._cancelled = False
            if task.uncancel() == 0 and isinstance(exc, asyncio.CancelledError):  # ours alone (no shutdown's)
                raise ClientDisconnected from None


class EventStreamResponse(Response):
    """An SSE response whose body is written by ``body(send)``, and which stops as soon as the client
    disconnects, whatever the ASGI server.

    ``body`` sends the ``http.response.body`` messages itself, the last one with ``more_body: False``
    (uvicorn then writes that chunk and the chunked encoding's end in one write), and returns then.
    Starlette only notices a gone client when a write fails; an SSE stream may wait seconds for its next
    token (queueing, a long prompt), and every such second keeps the request in TGI's batch. So the body
    runs under the request's :class:`DisconnectWatch`, and ``on_close`` runs in every case after it,
    outside the watch (the response is complete or abandoned): it reads TGI's response to its end or
    closes it. The body may have been cancelled before it ever ran, when its own cleanup never runs.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        body: Callable[[Send], Awaitable[None]],
        *,
        on_close: Callable[[], Awaitable[Any]],
        headers: Mapping[str, str],
    ) -> None:
        self.status_code = 200
        self.background = None
        self._body, self._on_close = body, on_close
        self.init_headers(headers)  # no body: no Content-Length, so the server sends it chunked

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            with DisconnectWatch.of(scope, receive):
                await send(
                    {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
                )
                await self._body(send)
        except ClientDisconnected:
            pass  # nobody to answer
        finally:
            await self._on_close()


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """`await work`, cancelled (→ ClientDisconnected) if the client disconnects first."""
    with DisconnectWatch.of(request.scope, request.receive):
        return await work


def json_response(body: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(body), status_code=status_code, headers=headers, media_type="application/json"
    )


def error_response(exc: GatewayError) -> Response:
    return json_response(exc.to_dict(), exc.status_code, exc.headers or None)


def error_body(exc: GatewayError) -> bytes:
    """The OpenAI error envelope of `exc`, encoded."""
    return orjson.dumps(exc.to_dict())


async def send_error(send: Send, exc: GatewayError, headers: dict[str, str] | None = None) -> None:
    """Answer with `exc` as a complete JSON response (status, OpenAI envelope, the error's headers)."""
    body = error_body(exc)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [
        (k.lower().encode("latin-1"), v.encode("latin-1"))
        for k, v in {**exc.headers, **(headers or {})}.items()
    ]
    await send({"type": "http.response.start", "status": exc.status_code, "headers": raw})
    await send({"type": "http.response.body", "body": body})
