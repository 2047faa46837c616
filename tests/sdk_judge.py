"""The official openai SDK as the judge of our chunks and responses (shared by several test files)."""

from __future__ import annotations

from typing import Any

import openai
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk


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
