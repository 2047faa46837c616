"""tgi_gateway.tgi.http1 over real loopback sockets: keep-alive, stale connections, framing, back-pressure.

The servers here are scripted with raw bytes (asyncio streams), so every framing the client must
accept — chunked, Content-Length, ``Connection: close`` — is exactly what is on the wire.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from tgi_gateway.tgi import http1

pytestmark = pytest.mark.anyio

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
def anyio_backend():
    return "asyncio"


class RawServer:
    """Calls `script(reader, writer)` for each request (after reading its head and body)."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
                )
                self.requests.append(head + await reader.readexactly(length))
                await self.script(reader, writer)
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n"


async def ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(HEAD + chunked(b"hel", b"lo"))


async def read_body(response: http1.Response) -> bytes:
    parts = []
    while chunk := await response.read(1.0):
        parts.append(chunk)
    return b"".join(parts)


async def test_status_headers_body_and_a_base_path():
    server = RawServer(ok)
    async with server as url:
        pool = http1.Pool(url + "/base/", connect_timeout=1)
        response = await pool.request("POST", "/x", {"Content-Type": "application/json"}, b"{}", timeout=1)
        assert (response.status, response.headers["content-type"]) == (200, "text/plain")
        assert await read_body(response) == b"hello"
        response.close()
        await pool.aclose()
    assert server.requests[0].startswith(b"POST /base/x HTTP/1.1\r\n")
    assert b"\r\nContent-Type: application/json\r\n" in server.requests[0]


async def test_one_connection_serves_sequential_requests():
    server = RawServer(ok)
    async with server as url:
        pool = http1.Pool(url, connect_timeout=1)
        for _ in range(3):
            response = await pool.request("POST", "/x", {}, b"abc", timeout=1)
            await read_body(response)
            response.close()
        await pool.aclose()
    assert server.connections == 1
    host = url.removeprefix("http://")
    assert server.requests[0] == (
        f"POST /x HTTP/1.1\r\nHost: {host}\r\nContent-Length: 3\r\n\r\nabc".encode()
    )


async def test_an_unfinished_body_closes_the_connection():
    server = RawServer(ok)
    async with server as url:
        pool = http1.Pool(url, connect_timeout=1)
        response = await pool.request("POST", "/x", {}, b"", timeout=1)
        response.close()  # body not read: the connection cannot be reused
        response = await pool.request("POST", "/x", {}, b"", timeout=1)
        assert await read_body(response) == b"hello"
        response.close()
        await pool.aclose()
    assert server.connections == 2


async def test_connection_close_and_content_length_framing():
    async def close_after(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
        await writer.drain()
        writer.close()

    server = RawServer(close_after)
    async with server as url:
        pool = http1.Pool(url, connect_timeout=1)
        for _ in range(2):
            response = await pool.request("POST", "/x", {}, b"", timeout=1)
            assert await read_body(response) == b"hello"
            response.close()
        await pool.aclose()
    assert server.connections == 2  # "Connection: close" is honoured


async def test_an_idle_connection_closed_by_the_server_is_replaced_transparently():
    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + chunked(b"hello"))
        await writer.drain()
        writer.close()  # keep-alive announced, then closed while idle (a keep-alive timeout)

    server = RawServer(once)
    async with server as url:
        pool = http1.Pool(url, connect_timeout=1)
        response = await pool.request("POST", "/x", {}, b"", timeout=1)
        assert await read_body(response) == b"hello"
        response.close()
        await asyncio.sleep(0.05)
        response = await pool.request("POST", "/x", {}, b"", timeout=1)
        assert await read_body(response) == b"hello"
        response.close()
        await pool.aclose()
    assert server.connections == 2


async def test_a_slow_reader_pauses_the_socket_and_loses_nothing():
    piece = b"x" * 65536
    count = 4 * http1.HIGH_WATER // len(piece)

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + chunked(*[piece] * count))
        await writer.drain()

    async with RawServer(big) as url:
        pool = http1.Pool(url, connect_timeout=1)
        response = await pool.request("POST", "/x", {}, b"", timeout=1)
        await asyncio.sleep(0.2)  # the whole body is sent meanwhile; reading stopped at HIGH_WATER
        conn = response._conn
        assert conn is not None and conn._paused and conn.buffered < 2 * http1.HIGH_WATER
        assert len(await read_body(response)) == count * len(piece)
        response.close()
        await pool.aclose()


async def test_errors_closed_before_the_head_timeout_and_broken_body():
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(1)

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + b"5\r\nhel")
        await writer.drain()
        writer.close()

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")

    async with RawServer(silent) as url:
        pool = http1.Pool(url, connect_timeout=1)
        with pytest.raises(http1.ResponseTimeout):
            await pool.request("POST", "/x", {}, b"", timeout=0.1)
    async with RawServer(hang_up) as url:
        with pytest.raises(http1.ConnectFailed):
            await http1.Pool(url, connect_timeout=1).request("POST", "/x", {}, b"", timeout=1)
    async with RawServer(cut) as url:
        response = await http1.Pool(url, connect_timeout=1).request("POST", "/x", {}, b"", timeout=1)
        with pytest.raises(http1.ConnectionClosed):
            await read_body(response)
        response.close()
    async with RawServer(garbage) as url:
        with pytest.raises(http1.ConnectionClosed, match="invalid HTTP response"):
            await http1.Pool(url, connect_timeout=1).request("POST", "/x", {}, b"", timeout=1)


async def test_read_all_limit_and_a_timeout_for_the_whole_body():
    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD)
        for _ in range(20):  # a piece every 50 ms: never 0.2 s of silence, 1 s in all
            writer.write(b"2\r\nab\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.write(b"0\r\n\r\n")

    async with RawServer(trickle) as url:
        pool = http1.Pool(url, connect_timeout=1)
        response = await pool.request("POST", "/x", {}, b"", timeout=1)
        start = asyncio.get_running_loop().time()
        with pytest.raises(http1.ResponseTimeout):
            await response.read_all(1000, 0.2)
        assert 0.2 <= asyncio.get_running_loop().time() - start < 0.5
        response.close()
        response = await pool.request("POST", "/x", {}, b"", timeout=1)
        assert await response.read_all(7, 2.0) == b"abababa"  # at most the limit
        response.close()
        response = await pool.request("POST", "/x", {}, b"", timeout=1)
        assert await response.read_all(1000, 2.0) == b"ab" * 20  # the whole body, within the timeout
        response.close()


def test_urls():
    assert http1.Pool("http://[::1]:8080", connect_timeout=1).host_header == "[::1]:8080"
    assert http1.Pool("https://tgi.example", connect_timeout=1).host_header == "tgi.example"
    with pytest.raises(ValueError):
        http1.Pool("ftp://x", connect_timeout=1)


async def test_read_timeouts_count_from_each_wait_not_from_the_first():
    """The deadline timer is shared by the reads of a connection: a read that starts after a long (first)
    timeout was armed still gets its own, shorter deadline, a live stream never expires however long it
    lasts, and a silence expires `timeout` after the last read began — not earlier, not much later."""
    gap, timeout = 0.03, 0.25

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(20):  # 0.6 s of pieces 30 ms apart: longer than the timeout, never silent that long
            await asyncio.sleep(gap)
            writer.write(b"1\r\nx\r\n")
        await asyncio.sleep(5)  # then silence

    async with RawServer(script) as url:
        pool = http1.Pool(url, connect_timeout=1)
        response = await pool.request("POST", "/x", {}, b"", timeout=1)
        assert await response.read(10.0) == b"x"  # arms the timer 10 s ahead
        received = 1
        while received < 20:
            received += len(await response.read(timeout))  # each read: its own 0.25 s
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(http1.ResponseTimeout):
            await response.read(timeout)
        waited = loop.time() - started
        assert timeout - 0.01 <= waited < timeout + 0.2, waited
        response.close()
