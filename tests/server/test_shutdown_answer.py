"""The answer to a request cut at the end of the shutdown grace (tgi_gateway/server/telemetry.py): bounded in
time, so a client that reads nothing cannot hold the shutdown."""

from __future__ import annotations

import asyncio
import time

from starlette.types import Message, Receive, Scope, Send

from tgi_gateway.server import telemetry
from tgi_gateway.server.telemetry import Telemetry, TelemetryMiddleware, record_of


def test_the_shutdown_answer_to_a_client_that_reads_nothing_is_given_up_after_its_bound(monkeypatch) -> None:
    monkeypatch.setattr(telemetry, "SHUTDOWN_ANSWER_SECONDS", 0.2)
    scopes: list[Scope] = []

    async def stream_forever(scope: Scope, receive: Receive, send: Send) -> None:
        scopes.append(scope)
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await asyncio.Event().wait()  # tokens that never come: the server cancels it at shutdown

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "http.response.body":
            await asyncio.Event().wait()  # the client's socket is paused: the write never completes

    async def receive() -> Message:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def main() -> float:
        middleware = TelemetryMiddleware(stream_forever, Telemetry(["m"]), [])
        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
        task = asyncio.create_task(middleware(scope, receive, send))
        while not sent:
            await asyncio.sleep(0.01)
        task.cancel()  # what uvicorn does when --shutdown-grace is over
        started = time.monotonic()
        await asyncio.wait_for(task, 5)
        return time.monotonic() - started

    took = asyncio.run(main())
    assert 0.15 < took < 2, took
    last = sent[-1]
    assert last["type"] == "http.response.body" and b"shutting down" in last["body"]
    record = record_of(scopes[0])
    assert record is not None and record.shutdown
