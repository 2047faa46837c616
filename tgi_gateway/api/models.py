"""The chat completion request as the gateway accepts it (the body model of the OpenAPI docs).

Scalar sampling fields are validated here (types and ranges, as OpenAI documents them); the prompt
fields (`messages`, `tools`, `functions`, `tool_choice`, `function_call`) are kept as plain JSON and
validated by :func:`tgi_gateway.prompting.normalize`, which knows Functionary's rules and names the
offending element (``messages[2].tool_call_id``). Unknown fields are accepted and ignored, as vLLM does,
so clients that send vendor extras keep working; `top_k` and `repetition_penalty` are honoured as
extensions (TGI's own sampling parameters).
"""

from __future__ import annotations

from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field

# The widths of TGI's own fields (`max_new_tokens: u32`, `top_k: i32`): a larger value would only be refused
# by TGI's JSON extractor, after the request was sent.
U32_MAX = 2**32 - 1
I32_MAX = 2**31 - 1


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = Field(False, description="Send a last chunk with `usage` and empty `choices`.")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str = "text"


class ChatCompletionRequest(BaseModel):
    """`POST /v1/chat/completions`."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(description="The served model name (see `GET /v1/models`).")
    messages: list[dict[str, Any]] = Field(
        description="The conversation: system/developer, user, assistant (with `tool_calls`), tool messages. "
        "Content is a string or an array of text parts."
    )
    tools: list[dict[str, Any]] | None = Field(
        None, description='`{"type": "function", "function": {...}}` or `{"type": "code_interpreter"}`.'
    )
    tool_choice: Union[str, dict[str, Any], None] = Field(
        None, description='"none", "auto", "required" or {"type": "function", "function": {"name": ...}}.'
    )
    parallel_tool_calls: bool | None = Field(None, description="false: answer with at most one tool call.")
    functions: list[dict[str, Any]] | None = Field(None, description="Deprecated form of `tools`.")
    function_call: Union[str, dict[str, Any], None] = Field(None, description="Deprecated form of `tool_choice`.")

    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(
        None, ge=1, le=U32_MAX, description="Deprecated alias of `max_completion_tokens`."
    )
    max_completion_tokens: int | None = Field(None, ge=1, le=U32_MAX)
    temperature: float | None = Field(None, ge=0, le=2, description="0 means greedy decoding.")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, description="Only 1 is supported.")
    stop: Union[str, list[str], None] = Field(None, description="Up to 4 sequences; not included in the answer.")
    seed: int | None = Field(None, ge=0, lt=2**64)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="Only 0 is supported (TGI has none).")
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None

    # Extensions: TGI sampling parameters that OpenAI does not have.
    top_k: int | None = Field(None, ge=1, le=I32_MAX, description="Extension: TGI `top_k`.")
    repetition_penalty: float | None = Field(None, gt=0, description="Extension: TGI `repetition_penalty`.")

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


# Responses: the OpenAPI docs' models of what the gateway answers besides completions (see openapi.py).


class ErrorDetail(BaseModel):
    message: str = Field(description="What went wrong, for a person.")
    type: str = Field(description='"invalid_request_error", "requests" (429) or "server_error".')
    param: str | None = Field(description="The request field at fault, dotted (`messages[2].content`).")
    code: str | None = Field(
        description='e.g. "context_length_exceeded", "model_not_found", "invalid_api_key", '
        '"rate_limit_exceeded", "timeout".'
    )


class ErrorResponse(BaseModel):
    """OpenAI's error envelope: every error status of the gateway has this body."""

    error: ErrorDetail


class HealthStatus(BaseModel):
    """`GET /health`."""

    status: str = Field(description='"ok" (200); "unavailable" or "draining" (503).')
    error: str | None = Field(None, description="Why it is not ok.")
