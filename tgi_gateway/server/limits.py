"""What the gateway accepts as a request body: at most ``--max-body-bytes`` bytes of strict JSON.

Both checks run before any field is looked at, so a body that fails them never costs more than its bytes:

* :class:`BodySizeLimit` — a plain ASGI middleware. A declared ``Content-Length`` over the limit is refused
  with 413 before a byte of the body is read; every body (``Transfer-Encoding: chunked`` ones have no length)
  is also counted as it arrives and refused as soon as it grows past the limit. Either way the 413 carries
  ``Connection: close``, so the server stops reading the rest of the upload.
* :class:`StrictJSONRoute` — request bodies are parsed as RFC 8259 JSON (orjson) instead of Python's
  lenient ``json``: ``NaN``/``Infinity`` literals, lone UTF-16 surrogate escapes (``"\\ud800"``), bytes
  that are not UTF-8 and nesting deeper than 1024 levels are refused with the usual 400 "could not parse
  the JSON body". Python's parser accepts the first three as values that cannot be encoded again (an
  error message quoting a lone surrogate, an ``Infinity`` in TGI's request), and raises ``RecursionError``
  on deep nesting. A UTF-8 byte order mark is skipped, as RFC 8259 allows. A client that hangs up before
  its body is whole is answered (and logged) 499, like any client that leaves before its answer.
"""

from __future__ import annotations

import codecs
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import PayloadTooLargeError
from .asgi import send_error

__all__ = ["CLIENT_CLOSED_REQUEST", "BodySizeLimit", "StrictJSONRoute"]

#: The status logged for a request whose client went away before it was answered (nginx's 499).
CLIENT_CLOSED_REQUEST = 499


class BodySizeLimit:
    """Refuse request bodies larger than `max_bytes` with 413 ``PayloadTooLargeError`` (OpenAI envelope)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None:  # the HTTP server reads exactly that many bytes: nothing to count
            if declared > self.max_bytes:
                await self._refuse(send)
            else:  # the usual case: no wrapper on the response's messages (a stream sends thousands)
                await self.app(scope, receive, send)
            return

        received = 0
        refused = False

        async def counting_receive() -> Message:
            # Past the limit the client gets its 413 at once, and the app sees a client that went away:
            # whatever it answers to that is dropped below.
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, counting_receive, guarded_send)

    async def _refuse(self, send: Send) -> None:
        error = PayloadTooLargeError(
            f"The request body is too large: this server accepts at most {self.max_bytes} bytes."
        )
        await send_error(send, error, {"Connection": "close"})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None  # the HTTP server refuses malformed values itself
    return None


class StrictJSONRequest(Request):
    """A request whose ``json()`` is RFC 8259 JSON (orjson); its errors are ``json.JSONDecodeError``\\ s,
    which FastAPI turns into a ``json_invalid`` validation error (the gateway's 400)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = orjson.loads((await self.body()).removeprefix(codecs.BOM_UTF8))
        return self._json


class StrictJSONRoute(APIRoute):
    """A FastAPI route that reads its body with :class:`StrictJSONRequest`."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            try:
                return await handler(StrictJSONRequest(request.scope, request.receive))
            except HTTPException as exc:
                # FastAPI turns any exception raised while reading the body into a 400 "There was an error
                # parsing the body"; a client that hung up in the middle of its body gets no answer: 499.
                if isinstance(exc.__cause__, ClientDisconnect):
                    return Response(status_code=CLIENT_CLOSED_REQUEST)
                raise

        return strict_handler
