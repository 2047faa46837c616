"""Small raw-ASGI helpers shared by the gateway's middlewares and its streaming endpoint.

Middlewares here are plain ASGI callables (no Starlette ``BaseHTTPMiddleware``): they add one function
call per message, not a task and a memory stream per request.
"""

from __future__ import annotations

import orjson
from starlette.types import Send

from .errors import GatewayError


def error_body(exc: GatewayError) -> bytes:
    """The OpenAI error envelope of `exc`, encoded."""
    return orjson.dumps(exc.to_dict())


async def send_error(send: Send, exc: GatewayError, headers: dict[str, str] | None = None) -> None:
    """Answer with `exc` as a complete JSON response (status, OpenAI envelope, the error's headers)."""
    body = error_body(exc)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in {**exc.headers, **(headers or {})}.items()]
    await send({"type": "http.response.start", "status": exc.status_code, "headers": raw})
    await send({"type": "http.response.body", "body": body})
