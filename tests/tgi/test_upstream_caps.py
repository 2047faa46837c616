"""The caps on what TGI may send (issue 11, "Upstream limits"): one stream event (``MAX_SSE_EVENT``) and the
``/info`` body (``MAX_INFO_BODY``), each a 502 naming the cap, enforced as the bytes arrive."""

from __future__ import annotations

import asyncio
import random
import tracemalloc

import pytest

from tgi_gateway.errors import TGIProtocolError
from tgi_gateway.tgi import protocol
from tgi_gateway.tgi.client import TGIClient
from tgi_gateway.tgi.protocol import MAX_SSE_EVENT, SSEDecoder, StreamDecoder, Token

TOKEN = b'data: {"index":1,"token":{"id":1,"text":"a","logprob":0,"special":false},"generated_text":null}\n\n'
PIECE = 64 * 1024


@pytest.fixture
def anyio_backend():
    return "asyncio"


def test_an_80_mib_line_is_refused_after_the_cap_plus_one_piece_and_never_held_past_it():
    decoder = SSEDecoder()
    piece = b"x" * PIECE
    fed = 0
    assert decoder.feed(b"data: ") == []
    while decoder.error is None:
        assert fed < 80 * 1024 * 1024, "no refusal within 80 MiB"
        assert decoder.feed(piece) == []
        fed += len(piece)
        assert decoder.buffered <= MAX_SSE_EVENT
    assert fed <= MAX_SSE_EVENT + PIECE
    assert decoder.buffered == 0  # what was held is dropped
    assert "over 16 MiB" in decoder.error.message and decoder.error.status_code == 502
    assert decoder.feed(b"\n\n" + TOKEN) == []  # stays in error


def test_many_data_lines_count_toward_one_event():
    decoder = SSEDecoder(max_event=100)
    assert decoder.feed(b"data: 0123456789\n" * 5) == []
    assert decoder.error is None
    assert decoder.feed(b"data: 0123456789\n" * 1) == []
    assert decoder.error is not None and "over 100 bytes" in decoder.error.message


def test_the_cap_bounds_what_is_held_between_pieces():
    """The bytes of an event held from one piece to the next (its complete lines, ends included, and its
    unfinished line) count: fed one byte at a time, an event passes with a cap of its size without the
    blank line that ends it, and not one byte less. A cap that passes one byte at a time passes for every
    split (less is held); a piece is one read, so an event complete within one piece is never held."""
    body = TOKEN * 3
    rng = random.Random(0)
    splits = [[body], [body[i : i + 1] for i in range(len(body))]]
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(body)), 5))
        splits.append([body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)])
    for chunks in splits:
        decoder = SSEDecoder(max_event=len(TOKEN) - 1)
        assert len([e for c in chunks for e in decoder.feed(c)]) == 3 and decoder.error is None, chunks
    decoder = SSEDecoder(max_event=len(TOKEN) - 2)
    assert [e for i in range(len(body)) for e in decoder.feed(body[i : i + 1])] == []
    assert decoder.error is not None


def test_the_stream_decoder_hands_out_the_tokens_before_the_oversized_event_then_fails():
    decoder = StreamDecoder()
    items = decoder.feed(TOKEN * 2 + b"data: " + b"x" * (MAX_SSE_EVENT + 1))
    assert items == [Token("a", False, 1)] * 2
    assert isinstance(decoder.error, TGIProtocolError) and "over 16 MiB" in decoder.error.message


# ------------------------------------------------------------------------------------------ over the wire

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


async def _serve(script, run):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            await script(writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with TGIClient(
            url, connect_timeout=2, first_token_timeout=10, read_timeout=10, request_timeout=10,
            connect_retries=1,
        ) as client:  # fmt: skip
            return await run(client)
    finally:
        server.close()


@pytest.mark.anyio
async def test_an_endless_line_from_tgi_is_a_502_naming_the_cap_without_holding_it():
    """80 MiB without a newline after one token: the token is handed out, then the 502; the gateway's
    memory never held much more than the cap (it held the whole line before)."""
    sent = 0

    async def endless(writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        writer.write(HEAD + b"%x\r\n%s\r\n" % (len(TOKEN), TOKEN))
        piece = b"%x\r\n%s\r\n" % (PIECE, b"y" * PIECE)
        writer.write(b"%x\r\ndata: \r\n" % 6)
        for _ in range(80 * 1024 * 1024 // PIECE):
            writer.write(piece)
            sent += PIECE
            await writer.drain()

    async def run(client: TGIClient) -> list:
        items = []
        async with client.generate_stream("hi", {}) as stream:
            with pytest.raises(TGIProtocolError) as failure:
                async for item in stream:
                    items.append(item)
        return items, failure.value

    tracemalloc.start()
    try:
        items, error = await _serve(endless, run)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert items == [Token("a", False, 1)]
    assert "over 16 MiB" in error.message and error.status_code == 502
    assert error.headers == {"x-should-retry": "false"}
    assert sent < 40 * 1024 * 1024  # the connection was closed long before the 80 MiB
    assert peak < MAX_SSE_EVENT * 2.5  # the held pieces, and one join of them at most


@pytest.mark.anyio
@pytest.mark.parametrize("chunked", [False, True])
async def test_an_info_answer_over_its_cap_is_a_502_naming_it(chunked):
    body = b'{"model_id":"m","pad":"' + b"z" * protocol.MAX_INFO_BODY + b'"}'

    async def big(writer: asyncio.StreamWriter) -> None:
        head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        if chunked:
            writer.write(
                head + b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
            )
        else:
            writer.write(head + b"content-length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()

    async def run(client: TGIClient) -> TGIProtocolError:
        with pytest.raises(TGIProtocolError) as failure:
            await client.info()
        return failure.value

    error = await _serve(big, run)
    assert error.message == "TGI's /info answer is over 1 MiB" and error.status_code == 502
