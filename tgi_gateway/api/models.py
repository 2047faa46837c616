"""The chat completion request as the gateway accepts it (the body model of the OpenAPI docs).

Scalar sampling fields are validated here (types and ranges, as OpenAI documents them); the prompt
fields (`messages`, `tools`, `functions`, `tool_choice`, `function_call`) are kept as plain JSON and
validated by :func:`tgi_gateway.prompting.normalize`, which knows Functionary's rules and names the
offending element (``messages[2].tool_call_id``). The three arrays are not even copied here
(``SkipValidation``: their schema stays in the OpenAPI document): pydantic rebuilt every message and tool
dict, ~100 ms of the event loop for a 4 MiB body of short messages, and `normalize` checks them anyway. Unknown fields are accepted and ignored, as vLLM does,
so clients that send vendor extras keep working; `top_k` and `repetition_penalty` are honoured as
extensions (TGI's own sampling parameters).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SkipValidation
from pydantic_core import PydanticCustomError

# The widths of TGI's own fields (`max_new_tokens: u32`, `top_k: i32`): a larger value would only be refused
# by TGI's JSON extractor, after the request was sent.
U32_MAX = 2**32 - 1
I32_MAX = 2**31 - 1

# Strict JSON types, as OpenAI checks them: pydantic's lax mode would take `true` as 1, `"5"` as 5 and
# `"yes"` as true, and send TGI a value the client never meant. A wrong type is refused with OpenAI's
# "Invalid type for 'max_tokens': expected an integer, but got a boolean instead." (api/validation.py);
# an integer-valued number (`5.0`) still counts as an integer, as in JSON Schema.
_JSON_TYPE_NAMES = {
    bool: "a boolean", int: "an integer", float: "a decimal", str: "a string", list: "an array", dict: "an object"
}  # fmt: skip


def _refuse(expected: str, value: Any) -> PydanticCustomError:
    got = _JSON_TYPE_NAMES.get(type(value), type(value).__name__)
    return PydanticCustomError(
        "invalid_type", "expected {expected}, but got {got} instead", {"expected": expected, "got": got}
    )


def _integer(value: Any) -> Any:
    if value is None or (type(value) is int) or (type(value) is float and value.is_integer()):
        return value
    raise _refuse("an integer", value)


def _number(value: Any) -> Any:
    if value is None or type(value) in (int, float):
        return value
    raise _refuse("a decimal", value)


def _boolean(value: Any) -> Any:
    if value is None or type(value) is bool:
        return value
    raise _refuse("a boolean", value)


Integer = Annotated[int | None, BeforeValidator(_integer)]
Number = Annotated[float | None, BeforeValidator(_number)]
Boolean = Annotated[bool | None, BeforeValidator(_boolean)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: Annotated[bool, BeforeValidator(_boolean)] = Field(
        False, description="Send a last chunk with `usage` and empty `choices`."
    )


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str = Field("text", description='"text", "json_object" or "json_schema".')
    json_schema: dict[str, Any] | None = Field(
        None,
        description='`{"name", "schema", "strict"?, "description"?}`: the answer\'s content is JSON matching '
        "`schema` (enforced with TGI's grammar).",
    )


class ChatCompletionRequest(BaseModel):
    """`POST /v1/chat/completions`."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(description="The served model name (see `GET /v1/models`).")
    messages: Annotated[list[dict[str, Any]], SkipValidation] = Field(
        description="The conversation: system/developer, user, assistant (with `tool_calls`), tool messages. "
        "Content is a string or an array of text parts."
    )
    tools: Annotated[list[dict[str, Any]] | None, SkipValidation] = Field(
        None, description='`{"type": "function", "function": {...}}` or `{"type": "code_interpreter"}`.'
    )
    tool_choice: str | dict[str, Any] | None = Field(
        None, description='"none", "auto", "required" or {"type": "function", "function": {"name": ...}}.'
    )
    parallel_tool_calls: Boolean = Field(None, description="false: answer with at most one tool call.")
    functions: Annotated[list[dict[str, Any]] | None, SkipValidation] = Field(
        None, description="Deprecated form of `tools`."
    )
    function_call: str | dict[str, Any] | None = Field(None, description="Deprecated form of `tool_choice`.")

    stream: Boolean = False
    stream_options: StreamOptions | None = None
    max_tokens: Integer = Field(
        None, ge=1, le=U32_MAX, description="Deprecated alias of `max_completion_tokens`."
    )
    max_completion_tokens: Integer = Field(None, ge=1, le=U32_MAX)
    temperature: Number = Field(None, ge=0, le=2, description="0 means greedy decoding.")
    top_p: Number = Field(None, gt=0, le=1)
    n: Integer = Field(None, ge=1, description="Choices to generate, at most 8 (one TGI request each).")
    stop: str | list[str] | None = Field(None, description="Up to 4 sequences; not included in the answer.")
    seed: Integer = Field(None, ge=0, lt=2**64)
    frequency_penalty: Number = Field(None, ge=-2, le=2)
    presence_penalty: Number = Field(None, ge=-2, le=2, description="Only 0 is supported (TGI has none).")
    logprobs: Boolean = Field(None, description="List the content tokens' logprobs (not markers or calls).")
    top_logprobs: Integer = Field(
        None,
        ge=0,
        le=20,
        description="With `logprobs`: alternatives per token, at most TGI's --max-top-n-tokens.",
    )
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None

    # Extensions: TGI sampling parameters that OpenAI does not have.
    top_k: Integer = Field(None, ge=1, le=I32_MAX, description="Extension: TGI `top_k`.")
    repetition_penalty: Number = Field(None, gt=0, description="Extension: TGI `repetition_penalty`.")

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


# Responses: the OpenAPI docs' models of what the gateway answers (see openapi.py). The answers themselves are
# built as plain dicts by tgi_gateway/streaming.py; tests check them against these models.

FinishReason = Literal["stop", "length", "tool_calls", "function_call"]


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="JSON text (raw code for `python`).")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None = Field(description="`null` when the answer is only tool calls.")
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = Field(None, description="Legacy `functions` requests only.")


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = Field(description="The content tokens (docs/architecture.md).")
    refusal: None = None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = Field(description="With `logprobs: true` only.")
    finish_reason: FinishReason


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    """The answer to a request without `stream: true` (``application/json``)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    function_call: FunctionCallDelta | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = Field(
        description="With `logprobs: true`: the tokens this chunk completes."
    )
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    """One event of the answer to a `stream: true` request (``text/event-stream``): ``data: <chunk>``."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice] = Field(
        description="Empty in the last chunk of `stream_options.include_usage`."
    )
    usage: Usage | None = Field(
        None, description="With `stream_options.include_usage`: in the last chunk only."
    )


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
