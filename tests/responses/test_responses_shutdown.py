"""A Responses stream cut at the end of the shutdown grace ends with the Responses API's `error` event (the
chat route's `data: {"error": …}` would make the SDK raise a chat error), then the end of its body."""

from __future__ import annotations

import asyncio
import json

from openai.types.responses import ResponseErrorEvent
from starlette.types import Message, Receive, Scope, Send

from tgi_gateway.server.telemetry import Telemetry, TelemetryMiddleware


def cut_stream(path: str, bodies: tuple[bytes, ...] = ()) -> bytes:
    async def stream_forever(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for body in bodies:
            await send({"type": "http.response.body", "body": body, "more_body": True})
        await asyncio.Event().wait()  # the server cancels it at shutdown

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def main() -> None:
        middleware = TelemetryMiddleware(stream_forever, Telemetry(["m"]), [])
        task = asyncio.create_task(middleware({"type": "http", "method": "POST", "path": path, "headers": []},
                                              receive, send))  # fmt: skip
        while len(sent) < 1 + len(bodies):
            await asyncio.sleep(0.01)
        task.cancel()  # what uvicorn does when --shutdown-grace is over
        await asyncio.wait_for(task, 5)

    asyncio.run(main())
    assert sent[-1]["type"] == "http.response.body" and sent[-1].get("more_body") is False
    return sent[-1]["body"]


def test_a_responses_stream_cut_by_the_shutdown_ends_with_an_error_event() -> None:
    event, data = cut_stream("/v1/responses").decode().rstrip("\n").split("\n")
    assert event == "event: error"
    payload = json.loads(data.removeprefix("data: "))
    assert "error" not in payload, "a top-level error key: the SDK would raise it as a chat error"
    error = ResponseErrorEvent.model_validate(payload)  # strictly: sequence_number included
    assert error.type == "error" and "shutting down" in error.message and error.code == "server_error"
    assert error.sequence_number == 0, "nothing was sent before: the first event"


def test_the_shutdown_event_takes_the_next_sequence_number() -> None:
    """Events already sent are counted (several per write, as the gateway writes them): the error is next."""
    created = b'event: response.created\ndata: {"type":"response.created","sequence_number":0}\n\n'
    in_progress = b'event: response.in_progress\ndata: {"type":"response.in_progress","sequence_number":1}\n\n'
    delta = (b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","sequence_number":2,'
             b'"delta":"a text that says event: twice, event: "}\n\n')  # fmt: skip
    last = cut_stream("/v1/responses", (created + in_progress, delta))
    payload = json.loads(last.decode().rstrip("\n").split("\n")[1].removeprefix("data: "))
    assert ResponseErrorEvent.model_validate(payload).sequence_number == 3
    chat = json.loads(cut_stream("/v1/chat/completions").decode().removeprefix("data: "))
    assert "shutting down" in chat["error"]["message"], "the chat route's answer is unchanged"
