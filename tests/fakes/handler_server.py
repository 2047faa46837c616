"""Serve an httpx-style handler (``httpx.Request`` → ``httpx.Response``) on a real loopback socket.

The unit tests of the TGI client script exact responses with handlers, as they would with
``httpx.MockTransport``; the gateway's token streams do not go through httpx, so the handler's
answers are written as real HTTP/1.1 (chunked bodies, keep-alive) instead:

* the handler raises → the connection is closed without any response (TGI gone before answering);
* a body given whole (``content=``, ``json=``, ``text=``: an ``httpx.ByteStream``) is sent with its
  ``Content-Length``, in one write, as TGI sends its JSON answers; any other body stream is chunked;
* the response's body stream raises while being sent → the connection is reset mid-body;
* each body piece is written and flushed on its own, so pieces usually arrive as separate reads;
* a client that closes its connection while a body is being sent makes the server ``aclose()`` that
  body stream (tests see it "closed").

Use: ``async with HandlerServer(handler) as url: ...`` (``url`` like ``http://127.0.0.1:<port>``).
The handler may be a plain or an async function.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from http import HTTPStatus

import httptools
import httpx

Handler = Callable[[httpx.Request], "httpx.Response | Awaitable[httpx.Response]"]


class _Request:
    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


class HandlerServer:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            while await self._one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            writer.transport.abort()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; False when the connection is done."""
        req = _Request()
        parser = httptools.HttpRequestParser(req)
        while not req.complete:
            data = await reader.read(65536)
            if not data:
                return False
            parser.feed_data(data)
        host = dict(req.headers).get(b"host", b"localhost").decode()
        request = httpx.Request(
            parser.get_method().decode(),
            f"http://{host}{req.url.decode()}",
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in req.headers],
            content=bytes(req.body),
        )
        try:
            response = self.handler(request)
            if inspect.isawaitable(response):
                response = await response
        except Exception:
            return False  # closed without a response
        head = [f"HTTP/1.1 {response.status_code} {_reason(response.status_code)}\r\n"]
        head += [
            f"{name}: {value}\r\n"
            for name, value in response.headers.items()
            if name.lower() not in ("content-length", "transfer-encoding")
        ]
        stream = response.stream
        if isinstance(stream, httpx.ByteStream):  # the whole body: Content-Length framing
            body = b"".join([chunk async for chunk in stream])
            head.append(f"content-length: {len(body)}\r\n\r\n")
            writer.write("".join(head).encode("latin-1") + body)
            await writer.drain()
            return True
        head.append("transfer-encoding: chunked\r\n\r\n")
        writer.write("".join(head).encode("latin-1"))
        await writer.drain()
        try:
            async for chunk in stream:  # type: ignore[union-attr]
                if chunk:
                    writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    await writer.drain()
                    await asyncio.sleep(0.001)  # let the piece go out on its own
                if writer.transport.is_closing() or reader.at_eof():
                    raise ConnectionResetError
        except (ConnectionError, asyncio.CancelledError):
            await stream.aclose()  # type: ignore[union-attr]
            raise
        except Exception:
            await stream.aclose()  # type: ignore[union-attr]
            return False  # reset mid-body
        await stream.aclose()  # type: ignore[union-attr]
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"
