"""A Responses API request → the chat completion request the chat route serves (no I/O).

Theory of operation
-------------------
The gateway has one way to build a prompt: the chat body through ``prompting.normalize``. A
``POST /v1/responses`` body is converted into that body, and everything after it (normalisation, the
grammar, rendering, TGI's parameters, the parser) is the chat route's own code. What is converted
(``shared/reference/openai/RESPONSES.md`` §2):

* ``input`` — a string (one user message) or a list of items, each checked and normalised to the item
  shape ``GET /v1/responses/{id}/input_items`` lists (an ``id`` given when the client sent none:
  ``msg_…``, ``fc_…``, ``fco_…``). Messages (``user``, ``system``, ``developer``, ``assistant``; content a
  string or ``input_text`` / ``output_text`` / ``refusal`` parts) become chat messages; consecutive
  ``function_call`` items become the ``tool_calls`` of one assistant message (joined to the assistant
  message just before them); a ``function_call_output`` is a ``tool`` message answering its ``call_id``.
* the stored ``context`` of ``previous_response_id`` (earlier items, already normalised) comes first;
  ``instructions`` is a leading system message, never inherited.
* ``tools`` in the flat Responses shape → chat tools; hosted tool types (``web_search``, ``file_search``,
  ``mcp``, …) are a 400 naming the tool. ``tool_choice`` (``auto``/``none``/``required``, the flat
  ``{"type": "function", "name"}``, ``allowed_tools``) → the chat choice. ``text.format`` → the chat
  ``response_format``; ``max_output_tokens`` → ``max_completion_tokens``; ``temperature``, ``top_p``,
  ``seed``, ``parallel_tool_calls`` as they are.

Errors raised later by the chat code name the chat fields; :func:`responses_error` renames them
(``response_format.json_schema.schema`` → ``text.format.schema``, ``tools[0].function.name`` →
``tools[0].name``, ``max_completion_tokens`` → ``max_output_tokens``).

Example::

    to_chat(ResponsesRequest(model="m", input="Hi", instructions="Be brief."), context=[])
    → Conversion(chat=ChatCompletionRequest(model="m", messages=[{"role": "system", "content": "Be brief."},
                                                               {"role": "user", "content": "Hi"}]),
                 items=[{"id": "msg_…", "type": "message", "role": "user", "status": "completed",
                         "content": [{"type": "input_text", "text": "Hi"}]}])
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SkipValidation

from ..api.models import U32_MAX, Boolean, ChatCompletionRequest, Integer, Number
from ..errors import GatewayError, InvalidRequestError

__all__ = ["Conversion", "ResponsesRequest", "responses_error", "to_chat"]

_ROLES = ("user", "system", "developer", "assistant")
_TEXT_PARTS = ("input_text", "output_text")
_HOSTED_HINT = "this gateway runs function tools only (the model's own calls, executed by the client)"


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="allow")

    format: dict[str, Any] | None = Field(
        None,
        description='`{"type": "text"}`, `{"type": "json_object"}` or `{"type": "json_schema", "name", "schema", '
        '"strict"?}` (enforced with TGI\'s grammar).',
    )


class ResponsesRequest(BaseModel):
    """`POST /v1/responses`."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(description="The served model name (see `GET /v1/models`).")
    input: Annotated[str | list[dict[str, Any]], SkipValidation] = Field(
        description="A string (one user message) or a list of items: messages, `function_call` and "
        "`function_call_output` items."
    )
    instructions: str | None = Field(None, description="A leading system message; not inherited.")
    tools: Annotated[list[dict[str, Any]] | None, SkipValidation] = Field(
        None,
        description='Function tools: `{"type": "function", "name", "description"?, "parameters"?, "strict"?}`.',
    )
    tool_choice: str | dict[str, Any] | None = Field(
        None, description='"none", "auto", "required", {"type": "function", "name": ...} or allowed_tools.'
    )
    parallel_tool_calls: Boolean = Field(None, description="false: answer with at most one function call.")
    text: TextConfig | None = None
    max_output_tokens: Integer = Field(None, ge=1, le=U32_MAX)
    temperature: Number = Field(None, ge=0, le=2, description="0 means greedy decoding.")
    top_p: Number = Field(None, gt=0, le=1)
    seed: Integer = Field(None, ge=0, lt=2**64, description="Extension: TGI's seed.")
    stream: Boolean = False
    stream_options: dict[str, Any] | None = Field(None, description="Accepted and ignored.")
    store: Boolean = Field(None, description="Keep the response for `previous_response_id` (default true).")
    previous_response_id: str | None = Field(None, description="Continue from a stored response.")
    metadata: dict[str, str] | None = Field(None, description="Echoed and stored.")
    truncation: Literal["auto", "disabled"] | None = Field(
        None, description='Only "disabled" is applied: a prompt too long is a 400.'
    )
    include: list[str] | None = Field(None, description="Accepted and ignored.")
    background: Boolean = Field(None, description="Not supported: true is a 400.")
    user: str | None = None


@dataclass(frozen=True, slots=True)
class Conversion:
    """The chat request to serve, and this request's input items as stored (each with its `id`)."""

    chat: ChatCompletionRequest
    items: list[dict[str, Any]]


def to_chat(
    req: ResponsesRequest,
    context: Sequence[Mapping[str, Any]] = (),
    ids: Callable[[str], str] | None = None,
) -> Conversion:
    """The chat request for `req`, after the items of `context` (a stored response's conversation).

    Raises:
        InvalidRequestError: what the Responses API refuses, or this gateway cannot do, naming the field.
    """
    if ids is None:
        from .output import new_item_id

        ids = new_item_id
    _refuse_unsupported(req)
    items = _input_items(req.input, ids)
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    calls: set[str] = set()
    for item in context:
        _append(messages, item, calls, None)
    _check_outputs(context, items)
    for j, item in enumerate(items):
        _append(messages, item, calls, f"input[{j}]")
    tools = _tools(req.tools)
    choice, tools = _tool_choice(req.tool_choice, tools)
    chat = ChatCompletionRequest(
        model=req.model,
        messages=messages,
        tools=tools or None,
        tool_choice=choice,
        parallel_tool_calls=req.parallel_tool_calls,
        stream=req.stream,
        max_completion_tokens=req.max_output_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        seed=req.seed,
        response_format=_response_format(req.text),
    )
    return Conversion(chat, items)


def _refuse_unsupported(req: ResponsesRequest) -> None:
    if req.background:
        raise InvalidRequestError(
            "background responses are not supported by this gateway: send the request without "
            "'background' (or stream it).",
            param="background",
        )
    extra = req.model_extra or {}
    if extra.get("conversation") is not None:
        raise InvalidRequestError(
            "The Conversations API is not supported by this gateway: use 'previous_response_id'.",
            param="conversation",
        )
    if extra.get("prompt") is not None:
        raise InvalidRequestError("Prompt templates are not supported by this gateway.", param="prompt")


# ------------------------------------------------------------------------------------------------
# input → items (stored as given, with ids) → chat messages
# ------------------------------------------------------------------------------------------------


def _input_items(raw: Any, ids: Callable[[str], str]) -> list[dict[str, Any]]:
    if isinstance(raw, str):
        return [_message_item(ids("msg_"), "user", [{"type": "input_text", "text": raw}])]
    if not isinstance(raw, list):
        raise InvalidRequestError("'input' must be a string or an array of items.", param="input")
    return [_item(item, f"input[{j}]", ids) for j, item in enumerate(raw)]


def _message_item(item_id: str, role: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": role, "status": "completed", "content": content}


def _string(item: Mapping[str, Any], key: str, param: str, *, empty: bool = True) -> str:
    value = item.get(key)
    if not isinstance(value, str) or (not empty and not value):
        raise InvalidRequestError(
            f"'{param}.{key}' must be a {'' if empty else 'non-empty '}string.", param=f"{param}.{key}"
        )
    return value


def _item_id(item: Mapping[str, Any], param: str, prefix: str, ids: Callable[[str], str]) -> str:
    given = item.get("id")
    if given is None:
        return ids(prefix)
    if not isinstance(given, str) or not given:
        raise InvalidRequestError(f"'{param}.id' must be a non-empty string.", param=f"{param}.id")
    return given


def _item(item: Any, param: str, ids: Callable[[str], str]) -> dict[str, Any]:
    if not isinstance(item, Mapping):
        raise InvalidRequestError(f"'{param}' must be an object.", param=param)
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in _ROLES:
            raise InvalidRequestError(
                f"Invalid value for '{param}.role': {role!r:.60}. Supported values are: 'user', 'system', "
                "'developer' and 'assistant'.",
                param=f"{param}.role",
            )
        return _message_item(
            _item_id(item, param, "msg_", ids), role, _parts(item.get("content"), role, param)
        )
    if kind == "function_call":
        return {
            "id": _item_id(item, param, "fc_", ids),
            "type": "function_call",
            "status": "completed",
            "call_id": _string(item, "call_id", param, empty=False),
            "name": _string(item, "name", param, empty=False),
            "arguments": _string(item, "arguments", param),
        }
    if kind == "function_call_output":
        output = item.get("output")
        if not isinstance(output, str):
            _text_of(output, f"{param}.output")  # checked: a list of text parts
        return {
            "id": _item_id(item, param, "fco_", ids),
            "type": "function_call_output",
            "status": "completed",
            "call_id": _string(item, "call_id", param, empty=False),
            "output": output,
        }
    raise InvalidRequestError(
        f"Invalid value for '{param}.type': {kind!r:.60}. Supported values are: 'message', 'function_call' and "
        "'function_call_output' (a Functionary model reads text and makes function calls).",
        param=f"{param}.type",
    )


def _parts(content: Any, role: str, param: str) -> list[dict[str, Any]]:
    """A message's content as item parts: ``output_text`` for the assistant, ``input_text`` otherwise (either
    kind is accepted in either role)."""
    kind = "output_text" if role == "assistant" else "input_text"
    if isinstance(content, str):
        texts = [content]
    elif isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            where = f"{param}.content[{k}]"
            ptype = part.get("type") if isinstance(part, Mapping) else None
            if ptype == "refusal" and role == "assistant" and isinstance(part.get("refusal"), str):
                texts.append(part["refusal"])
            elif ptype in _TEXT_PARTS and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise InvalidRequestError(
                    f"Invalid content part '{where}' of type {ptype!r:.60}: Functionary models accept text only "
                    "('input_text' and 'output_text' parts, or a string).",
                    param=f"{where}.type" if ptype is not None else where,
                )
    else:
        raise InvalidRequestError(
            f"'{param}.content' must be a string or an array of text parts.", param=f"{param}.content"
        )
    if kind == "output_text":
        return [{"type": kind, "text": t, "annotations": []} for t in texts]
    return [{"type": kind, "text": t} for t in texts]


def _text_of(output: Any, param: str) -> str:
    """A function_call_output's `output`: a string, or the text of its ``input_text`` parts."""
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        texts = []
        for k, part in enumerate(output):
            if not (
                isinstance(part, Mapping)
                and part.get("type") in _TEXT_PARTS
                and isinstance(part.get("text"), str)
            ):
                raise InvalidRequestError(
                    f"Invalid part '{param}[{k}]': Functionary models accept text only (a string, or "
                    "'input_text' parts).",
                    param=f"{param}[{k}]",
                )
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidRequestError(f"'{param}' must be a string or an array of text parts.", param=param)


def _check_outputs(context: Sequence[Mapping[str, Any]], items: Sequence[Mapping[str, Any]]) -> None:
    """A stored conversation that ends with calls is continued with their outputs, as OpenAI requires (a
    model shown calls without results would answer as if they were pending)."""
    answered = {i["call_id"] for i in (*context, *items) if i["type"] == "function_call_output"}
    for item in context:
        if item["type"] == "function_call" and item["call_id"] not in answered:
            raise InvalidRequestError(
                f"No tool output found for function call {item['call_id']}.", param="input"
            )


def _append(
    messages: list[dict[str, Any]], item: Mapping[str, Any], calls: set[str], param: str | None
) -> None:
    """`item` (normalised) as chat messages: a message, a call joined to the assistant message before it,
    a tool result. `param` None: a stored item (checked when it was stored)."""
    kind = item["type"]
    if kind == "message":
        text = "".join(part.get("text", part.get("refusal", "")) for part in item["content"])
        messages.append({"role": item["role"], "content": text})
    elif kind == "function_call":
        call = {
            "id": item["call_id"],
            "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]},
        }
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant":
            last.setdefault("tool_calls", []).append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        calls.add(item["call_id"])
    elif kind == "function_call_output":
        if item["call_id"] not in calls:
            raise InvalidRequestError(
                f"No tool call found for function call output with call_id {item['call_id']}.",
                param=f"{param}.call_id" if param else "previous_response_id",
            )
        content = _text_of(item["output"], f"{param}.output")
        messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": content})


# ------------------------------------------------------------------------------------------------
# tools, tool_choice, text.format
# ------------------------------------------------------------------------------------------------


def _tools(raw: Any) -> list[dict[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InvalidRequestError("'tools' must be an array of tool objects.", param="tools")
    tools = []
    for i, tool in enumerate(raw):
        param = f"tools[{i}]"
        if not isinstance(tool, Mapping):
            raise InvalidRequestError(f"'{param}' must be an object.", param=param)
        kind = tool.get("type")
        if kind != "function":
            raise InvalidRequestError(
                f"The tool type {kind!r:.60} ('{param}') is not supported: {_HOSTED_HINT}. Send "
                '{"type": "function", "name", "parameters"} tools.',
                param=f"{param}.type",
            )
        name = tool.get("name")
        if name is None:
            raise InvalidRequestError(f"Missing required parameter: '{param}.name'.", param=f"{param}.name")
        if not isinstance(name, str):  # here, not only in normalize: allowed_tools compares names before it
            raise InvalidRequestError(
                f"Invalid type for '{param}.name': expected a string, but got {type(name).__name__} instead.",
                param=f"{param}.name",
            )
        function = {
            k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None
        }
        tools.append({"type": "function", "function": function})
    return tools


def _tool_choice(raw: Any, tools: list[dict[str, Any]]) -> tuple[Any, list[dict[str, Any]]]:
    """The chat `tool_choice`, and the tools the prompt shows (`allowed_tools` keeps a subset)."""
    if raw is None or (not tools and raw in ("auto", "none")):
        return None, tools
    if isinstance(raw, str):
        return raw, tools  # the chat code refuses any other string, naming tool_choice
    if not isinstance(raw, Mapping):
        raise InvalidRequestError("'tool_choice' must be a string or an object.", param="tool_choice")
    kind = raw.get("type")
    if kind == "function":
        name = raw.get("name")
        if not isinstance(name, str):
            raise InvalidRequestError(
                'Invalid value for \'tool_choice\': expected {"type": "function", "name": ...}.',
                param="tool_choice.name",
            )
        return {"type": "function", "function": {"name": name}}, tools
    if kind == "allowed_tools":
        mode, allowed = raw.get("mode", "auto"), raw.get("tools")
        if mode not in ("auto", "required") or not isinstance(allowed, list):
            raise InvalidRequestError(
                "'tool_choice' of type 'allowed_tools' needs 'mode' ('auto' or 'required') and 'tools'.",
                param="tool_choice",
            )
        names = {
            t["name"]
            for t in allowed
            if isinstance(t, Mapping) and t.get("type") == "function" and isinstance(t.get("name"), str)
        }
        kept = [t for t in tools if t["function"].get("name") in names]
        if len(names) != len(allowed) or len(kept) != len(names):
            raise InvalidRequestError(
                '\'tool_choice.tools\' must list function tools of \'tools\' ({"type": "function", "name"}).',
                param="tool_choice.tools",
            )
        return mode, kept
    raise InvalidRequestError(
        f"The tool choice {kind!r:.60} is not supported: {_HOSTED_HINT}. Supported values are 'none', 'auto', "
        '\'required\', {"type": "function", "name": ...} and allowed_tools.',
        param="tool_choice",
    )


def _response_format(text: TextConfig | None) -> dict[str, Any] | None:
    fmt = text.format if text is not None else None
    if fmt is None:
        return None
    kind = fmt.get("type")
    if not isinstance(kind, str):
        raise InvalidRequestError(
            "'text.format.type' must be 'text', 'json_object' or 'json_schema'.", param="text.format.type"
        )
    if kind == "text":
        return None
    if kind == "json_schema":
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}
    return {"type": kind}  # json_object; anything else is refused by the grammar layer, renamed below


# ------------------------------------------------------------------------------------------------
# The chat code's errors, in the Responses API's words
# ------------------------------------------------------------------------------------------------

_RENAMES = (
    ("response_format.json_schema.schema", "text.format.schema"),
    ("response_format.json_schema", "text.format"),
    ("response_format.type", "text.format.type"),
    ("response_format", "text.format"),
    ("max_completion_tokens", "max_output_tokens"),
    ("'messages'", "'input'"),
)
_TOOL_FIELD = re.compile(r"tools\[(\d+)\]\.function\b")
# A message the conversion made from the input (or the stored context): no index to name in `input`.
_MESSAGE_FIELD = re.compile(r"messages\[\d+\][\w.\[\]]*")


def _rename(text: str) -> str:
    for old, new in _RENAMES:
        text = text.replace(old, new)
    return _MESSAGE_FIELD.sub("input", _TOOL_FIELD.sub(r"tools[\1]", text))


def responses_error(exc: GatewayError) -> GatewayError:
    """`exc` (raised by the chat code for a converted request) naming the Responses API's fields."""
    if not isinstance(exc, InvalidRequestError) or (
        exc.param is None and "response_format" not in exc.message
    ):
        return exc
    exc.message = _rename(exc.message)
    exc.args = (exc.message,)
    if exc.param is not None:
        exc.param = "input" if exc.param == "messages" else _rename(exc.param)
    return exc


# ------------------------------------------------------------------------------------------------
# What the route answers, for the OpenAPI document (the answers are built as dicts by .output)
# ------------------------------------------------------------------------------------------------


class OutputText(BaseModel):
    type: Literal["output_text"]
    text: str
    annotations: list[Any]
    logprobs: list[Any]


class MessageItem(BaseModel):
    id: str = Field(description="`msg_…`")
    type: Literal["message"]
    role: Literal["assistant"]
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class FunctionCallItem(BaseModel):
    id: str = Field(description="`fc_…`")
    type: Literal["function_call"]
    status: Literal["in_progress", "completed", "incomplete"]
    call_id: str = Field(description="`call_…`: send it back with the `function_call_output`.")
    name: str
    arguments: str = Field(description="JSON text (raw code for `python`).")


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: dict[str, int] = Field(description="`cached_tokens`, `cache_write_tokens`: 0.")
    output_tokens: int
    output_tokens_details: dict[str, int] = Field(description="`reasoning_tokens`: 0.")
    total_tokens: int


class ResponseError(BaseModel):
    code: str
    message: str


class ResponseObject(BaseModel):
    """The answer to a request without `stream: true` (``application/json``); also the `response` of the
    stream's lifecycle events. The request's fields are echoed."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(description="`resp_…`: the `previous_response_id` of a later request.")
    object: Literal["response"]
    created_at: int
    completed_at: int | None
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: ResponseError | None
    incomplete_details: dict[str, str] | None = Field(description='`{"reason": "max_output_tokens"}`')
    model: str
    output: list[MessageItem | FunctionCallItem]
    usage: ResponseUsage | None = Field(description="null until the response is complete.")
    parallel_tool_calls: bool
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    store: bool


class ResponseStreamEvent(BaseModel):
    """One event of the answer to a `stream: true` request (``text/event-stream``): ``event: <type>`` then
    ``data: <event>``."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(
        description="response.created, response.in_progress, response.output_item.added, "
        "response.content_part.added, response.output_text.delta, response.output_text.done, "
        "response.content_part.done, response.function_call_arguments.delta, "
        "response.function_call_arguments.done, response.output_item.done, then response.completed, "
        "response.incomplete or response.failed."
    )
    sequence_number: int = Field(description="0, 1, 2, … across the whole stream.")
