"""The official openai SDK as the judge of our chunks and responses (shared by several test files)."""

from __future__ import annotations

from typing import Any

import openai
from openai._models import construct_type
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.chat import ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

_RESPONSE_EVENT: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)


def final_completion(state: Any) -> Any:
    """`get_final_completion()`; on `length` the SDK (3.x) raises, carrying the completion it rebuilt."""
    try:
        return state.get_final_completion()
    except openai.LengthFinishReasonError as exc:
        assert exc.completion.choices[0].finish_reason == "length"
        return exc.completion


def sdk_rebuild(chunks: list[dict[str, Any]]) -> tuple[Any, Any]:
    """Accumulate chunks exactly as `client.chat.completions.stream()` does; (completion, its one choice)."""
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState()
    for c in chunks:
        ChatCompletionChunk.model_validate(c)  # the declared types accept every chunk
        state.handle_chunk(ChatCompletionChunk.construct(**c))  # the SDK builds chunks without validation
    completion = final_completion(state)
    [choice] = completion.choices
    return completion, choice


def as_expected(choice: Any) -> dict[str, Any]:
    """The SDK's choice in collect()'s shape (stream tool calls also carry `index`, dropped here)."""
    msg = choice.message
    out: dict[str, Any] = {"role": msg.role, "content": msg.content}
    if msg.tool_calls is not None:
        out["tool_calls"] = [
            {
                "id": tc.id,
                "type": tc.type,
                "function": {"name": tc.function.name, "arguments": tc.function.arguments},
            }
            for tc in msg.tool_calls
        ]
    if msg.function_call is not None:
        out["function_call"] = {"name": msg.function_call.name, "arguments": msg.function_call.arguments}
    return {
        "index": choice.index,
        "message": out,
        "logprobs": choice.logprobs,
        "finish_reason": choice.finish_reason,
    }


def responses_rebuild(events: list[dict[str, Any]]) -> Any:
    """Accumulate Responses stream events exactly as `client.responses.stream()` does (after checking each
    against the SDK's declared types, strictly); the final Response it returns, or None when the stream had
    no `response.completed` (`get_final_response()` would raise). Also checks the lifecycle rules the
    accumulator does not: `sequence_number` counts from 0 by one, one terminal event, last."""
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=openai.omit, text_format=openai.omit)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    terminal = {"response.completed", "response.incomplete", "response.failed"}
    assert [e["type"] in terminal for e in events].count(True) == 1 and events[-1]["type"] in terminal
    for event in events:
        _RESPONSE_EVENT.validate_python(event)
        state.handle_event(construct_type(type_=ResponseStreamEvent, value=event))  # as the SDK builds them
    return state._completed_response


def check_response(response: dict[str, Any]) -> Response:
    """A Response as the SDK's strict validation reads it (every field it requires, with its type)."""
    return Response.model_validate(response)
