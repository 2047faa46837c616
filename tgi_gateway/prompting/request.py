"""OpenAI chat request → :class:`ChatPrompt`, with every client error raised here.

Theory of operation
-------------------
The server decodes the JSON body and hands the dict to :func:`normalize`. This module is the only
place that interprets `messages`, `tools`/`functions` and `tool_choice`/`function_call`; it returns
a :class:`ChatPrompt` that every renderer can print without further checks, or raises
:class:`InvalidRequestError` whose `param` points at the offending field in OpenAI's notation
(``messages[3].tool_call_id``, ``tools[0].function.name``).

What it does, in order (FORMATS.md §2.1–2.4):

1. `tools` (or legacy `functions`, at most 128 either way, as OpenAI) → :class:`Tool`/:class:`Function`,
   unknown keys dropped, local ``$ref`` resolved inside each function's parameters, each schema printed once
   (to refuse what cannot be printed), all within one expansion budget set by the definitions' own JSON size
   (:class:`~.schema.ExpansionBudget`: the first tool that does not fit is refused, naming its
   ``parameters`` and the bound).
2. `tool_choice` (or `function_call`) → ``"none" | "auto" | "required" | NamedChoice``; the tool list
   is then filtered the way functionary does: ``"none"`` shows no tools at all (not even the code
   interpreter), a named choice shows only that function. No tools → choice ``"none"``.
3. `messages` → :class:`Message`: text content flattened (a list of text parts is joined), the
   ``developer`` role read as ``system``, assistant calls collected, each tool result matched to
   the call it answers (its `name` filled from the call, which v1/v2 print), and the tool results
   that follow an assistant turn put in the order of that turn's calls.

Example::

    normalize({"messages": [{"role": "user", "content": "Weather in Hanoi?"}],
               "tools": [{"type": "function", "function": {"name": "get_weather"}}],
               "tool_choice": "required"})
    == ChatPrompt(messages=(Message("user", "Weather in Hanoi?"),),
                  tools=(Tool("function", Function("get_weather")),), choice="required")
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from ..errors import InvalidRequestError
from .lru import LRUCache
from .schema import ExpansionBudget, SchemaError, function_block, json_size, resolve
from .types import ChatPrompt, Function, Message, NamedChoice, Tool, ToolCall, ToolChoice

__all__ = ["normalize"]

# OpenAI's own rule for function names. Names end up inside the prompt and are what the parsers
# read back, so characters like whitespace, ":" or ">" would make the model's answer ambiguous.
_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ROLES = {"system", "user", "assistant", "tool", "function", "developer"}
_CHOICE_STRINGS = ("none", "auto", "required")
_QUOTE_MAX = 60
MAX_TOOLS = 128  # OpenAI's limit on `tools` (and `functions`)


def _quote(value: Any) -> str:
    """A client's value as an error message quotes it: a scalar's repr, cut to a readable length; only the
    kind of an array or object. The value may be megabytes long, or nested too deeply for ``repr``."""
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list):
        return "an array"
    text = repr(value)
    return text if len(text) <= _QUOTE_MAX else text[: _QUOTE_MAX - 3] + "..."


def _not_an_object(param: str) -> InvalidRequestError:
    return InvalidRequestError(f"'{param}' must be an object.", param=param)


def _invalid_schema(param: str, exc: SchemaError) -> InvalidRequestError:
    return InvalidRequestError(f"Invalid schema in '{param}.parameters': {exc}", param=f"{param}.parameters")


def normalize(body: Mapping[str, Any]) -> ChatPrompt:
    """Validate and normalise the prompt-relevant part of a chat completion request."""
    tools_raw, functions_raw = body.get("tools"), body.get("functions")
    if tools_raw is not None and functions_raw is not None:
        raise InvalidRequestError(
            "'functions' and 'tools' cannot both be provided. 'functions' are deprecated; "
            "use the 'tools' parameter instead.",
            param="functions",
        )
    legacy = functions_raw is not None
    if legacy:
        tools = _functions(functions_raw)
        choice = _function_call(body.get("function_call"), tools)
        if body.get("tool_choice") is not None:
            raise _choice_without_tools("tool_choice", "tools")
    else:
        tools = _tools(tools_raw)
        choice = _tool_choice(body.get("tool_choice"), tools)
        if body.get("function_call") is not None:
            raise _choice_without_tools("function_call", "functions")

    if choice == "none":
        tools = ()
    elif isinstance(choice, NamedChoice):
        tools = tuple(t for t in tools if t.function is not None and t.function.name == choice.name)

    messages = _messages(body.get("messages"))
    return ChatPrompt(messages=messages, tools=tools, choice=choice, legacy_functions=legacy)


# ------------------------------------------------------------------------------------------------
# tools and functions
# ------------------------------------------------------------------------------------------------


def _too_many(field: str, count: int) -> InvalidRequestError:
    return InvalidRequestError(
        f"Invalid '{field}': array too long. Expected an array with maximum length {MAX_TOOLS}, but got an "
        f"array with length {count} instead.",
        param=field,
        code="array_above_max_length",
    )


def _tools(raw: Any) -> tuple[Tool, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InvalidRequestError("'tools' must be an array of tool objects.", param="tools")
    if len(raw) > MAX_TOOLS:
        raise _too_many("tools", len(raw))
    definitions: list[
        tuple[str, Any] | None
    ] = []  # (param, the function's definition); None: code interpreter
    for i, item in enumerate(raw):
        param = f"tools[{i}]"
        if not isinstance(item, Mapping):
            raise _not_an_object(param)
        kind = item.get("type", "function")
        if kind == "code_interpreter":
            definitions.append(None)
        elif kind == "function":
            definitions.append((f"{param}.function", item.get("function")))
        else:
            raise InvalidRequestError(
                f"Invalid value for '{param}.type': {_quote(kind)}. Supported values are: 'function' and "
                "'code_interpreter'.",
                param=f"{param}.type",
            )
    functions = iter(_definitions([d for d in definitions if d is not None]))
    return tuple(
        Tool("code_interpreter") if d is None else Tool("function", next(functions)) for d in definitions
    )


def _functions(raw: Any) -> tuple[Tool, ...]:
    if not isinstance(raw, list):
        raise InvalidRequestError("'functions' must be an array of function objects.", param="functions")
    if len(raw) > MAX_TOOLS:
        raise _too_many("functions", len(raw))
    return tuple(
        Tool("function", f) for f in _definitions([(f"functions[{i}]", item) for i, item in enumerate(raw)])
    )


# Clients send the same tools with every request of a conversation: a function already checked and
# normalised (its `$ref`s resolved, its schema proven printable) is taken from here, with what it costs the
# request's expansion budget. Keyed by the exact JSON of the client's definition; the Functions are immutable
# and shared (nobody mutates `parameters`).
_FUNCTION_CACHE_SIZE = 512
_FUNCTION_CACHE: LRUCache[bytes, tuple[Function, int]] = LRUCache(_FUNCTION_CACHE_SIZE)


def _definitions(definitions: list[tuple[str, Any]]) -> list[Function]:
    """The functions of `definitions` ((param, definition) pairs), within one expansion budget.

    The budget is :meth:`ExpansionBudget.for_definitions` of the definitions' own JSON size, all of them
    together: what their schemas expand to (each resolved definition's JSON, and its TypeScript-like
    declaration) is spent from it tool by tool, as the work is done, and the first tool that does not fit
    is refused with a 400 naming its ``parameters``.
    """
    keys: list[bytes | None] = []
    size = 0
    for _, raw in definitions:
        try:
            keys.append(orjson.dumps(raw))
            size += len(keys[-1])  # type: ignore[arg-type]
        except (orjson.JSONEncodeError, TypeError):  # not plain JSON (a caller's own Mapping), or deeper
            keys.append(None)  # than orjson's 255 levels: not cached, weighed in Python
            with contextlib.suppress(RecursionError):  # (refused later: "nested too deeply")
                size += json_size(raw)
    budget = ExpansionBudget.for_definitions(size)
    return [_function(raw, param, key, budget) for (param, raw), key in zip(definitions, keys)]


def _function(raw: Any, param: str, key: bytes | None, budget: ExpansionBudget) -> Function:
    known = _FUNCTION_CACHE.get(key) if key is not None else None
    if known is not None:
        function, cost = known
        try:
            budget.spend(cost)
        except SchemaError as exc:
            raise _invalid_schema(param, exc) from None
        return function
    left = budget.left
    function = _new_function(raw, param, budget)
    if key is not None:
        _FUNCTION_CACHE.put(key, (function, left - budget.left))
    return function


def _new_function(raw: Any, param: str, budget: ExpansionBudget) -> Function:
    if not isinstance(raw, Mapping):
        raise InvalidRequestError(f"'{param}' must be an object with a 'name'.", param=param)
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidRequestError(
            f"Invalid '{param}.name': {_quote(name)}. Function names must be 1 to 64 characters from a-z, "
            "A-Z, 0-9, underscores and dashes.",
            param=f"{param}.name",
        )
    description = raw.get("description")
    if description is None:
        description = ""
    elif not isinstance(description, str):
        raise InvalidRequestError(f"'{param}.description' must be a string.", param=f"{param}.description")
    parameters = raw.get("parameters")
    if parameters is not None:
        if not isinstance(parameters, Mapping):
            raise InvalidRequestError(
                f"'{param}.parameters' must be a JSON Schema object.", param=f"{param}.parameters"
            )
        try:
            parameters = resolve(parameters, budget)[0]
        except SchemaError as exc:
            raise _invalid_schema(param, exc) from None
    function = Function(
        name=name, description=description, parameters=parameters, strict=raw.get("strict") is True
    )
    try:  # a schema the TypeScript renderer cannot print is refused here, where we know which one it is
        function_block(function, budget=budget)
    except SchemaError as exc:
        raise _invalid_schema(param, exc) from None
    return function


def _function_names(tools: Sequence[Tool]) -> set[str]:
    return {t.function.name for t in tools if t.function is not None}


def _unknown_function(field: str, tools_field: str, name: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"Invalid value for '{field}': no function named {_quote(name)} was specified in the "
        f"'{tools_field}' parameter.",
        param=field,
    )


def _choice_without_tools(field: str, tools_field: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"Invalid value for '{field}': '{field}' is only allowed when '{tools_field}' are specified.",
        param=field,
    )


def _tool_choice(raw: Any, tools: Sequence[Tool]) -> ToolChoice:
    if raw is None:
        return "auto" if tools else "none"
    if not tools:
        raise _choice_without_tools("tool_choice", "tools")
    if isinstance(raw, str):
        if raw in _CHOICE_STRINGS:
            return raw  # type: ignore[return-value]
        raise InvalidRequestError(
            f"Invalid value: {_quote(raw)}. Supported values are: 'none', 'auto', and 'required'.",
            param="tool_choice",
        )
    if isinstance(raw, Mapping) and raw.get("type", "function") == "function":
        function = raw.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str):
            raise InvalidRequestError(
                'Invalid value for \'tool_choice\': expected {"type": "function", "function": {"name": ...}}.',
                param="tool_choice",
            )
        if name not in _function_names(tools):
            raise _unknown_function("tool_choice", "tools", name)
        return NamedChoice(name)
    raise InvalidRequestError(
        "Invalid value for 'tool_choice': supported values are 'none', 'auto', 'required' and "
        '{"type": "function", "function": {"name": ...}}.',
        param="tool_choice",
    )


def _function_call(raw: Any, functions: Sequence[Tool]) -> ToolChoice:
    if raw is None:
        return "auto" if functions else "none"
    if not functions:
        raise _choice_without_tools("function_call", "functions")
    if isinstance(raw, str):
        if raw in ("none", "auto"):
            return raw  # type: ignore[return-value]
        raise InvalidRequestError(
            f"Invalid value: {_quote(raw)}. Supported values are: 'none' and 'auto'.", param="function_call"
        )
    name = raw.get("name") if isinstance(raw, Mapping) else None
    if not isinstance(name, str):
        raise InvalidRequestError(
            "Invalid value for 'function_call': expected 'none', 'auto' or {\"name\": ...}.",
            param="function_call",
        )
    if name not in _function_names(functions):
        raise _unknown_function("function_call", "functions", name)
    return NamedChoice(name)


# ------------------------------------------------------------------------------------------------
# messages
# ------------------------------------------------------------------------------------------------


def _messages(raw: Any) -> tuple[Message, ...]:
    if not isinstance(raw, list) or not raw:
        raise InvalidRequestError("'messages' must be a non-empty array of messages.", param="messages")
    messages: list[Message] = []
    calls_by_id: dict[str, ToolCall] = {}
    results = False  # any tool result to put in call order
    for i, item in enumerate(raw):
        # The common message first, at the least cost (a conversation may have 100k of them): a JSON object
        # with a plain role and a string content, nothing else to check.
        if type(item) is dict:
            role, content = item.get("role"), item.get("content")
            if type(content) is str and (
                role in ("user", "system")
                or (role == "assistant" and item.get("tool_calls") in (None, []) and item.get("function_call") is None)
            ):
                messages.append(Message(role, content))
                continue
        param = f"messages[{i}]"
        if not isinstance(item, Mapping):
            raise _not_an_object(param)
        role = item.get("role")
        if not isinstance(role, str) or role not in _ROLES:  # (a list or an object is not hashable)
            raise InvalidRequestError(
                f"Invalid value for '{param}.role': {_quote(role)}. Supported values are: 'system', "
                "'developer', 'user', 'assistant', 'tool' and 'function'.",
                param=f"{param}.role",
            )
        if role == "developer":
            role = "system"
        if role == "assistant":
            message = _assistant(item, param)
            for call in message.tool_calls:
                if call.id is not None:
                    calls_by_id[call.id] = call
        elif role == "tool":
            message, results = _tool_result(item, param, calls_by_id), True
        elif role == "function":
            name = item.get("name")
            if not isinstance(name, str) or not name:
                raise InvalidRequestError(
                    f"'{param}.name' is required for messages with role 'function'.", param=f"{param}.name"
                )
            message = Message("function", _content(item, param, required=True), name=name)
        else:
            message = Message(role, _content(item, param, required=True))
        messages.append(message)
    return tuple(_reorder_tool_results(messages) if results else messages)


def _content(item: Mapping[str, Any], param: str, *, required: bool) -> str | None:
    content = item.get("content")
    if isinstance(content, str):
        return content
    if content is None:
        if required:
            raise InvalidRequestError(f"'{param}.content' is required.", param=f"{param}.content")
        return None
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
                continue
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise InvalidRequestError(
                f"Invalid content part '{param}.content[{j}]' of type {_quote(kind)}: Functionary models "
                'accept text only (a string, or an array of {"type": "text", "text": ...} parts).',
                param=f"{param}.content[{j}]",
            )
        return "".join(texts)
    raise InvalidRequestError(
        f"'{param}.content' must be a string or an array of text parts.", param=f"{param}.content"
    )


def _assistant(item: Mapping[str, Any], param: str) -> Message:
    content = _content(item, param, required=False)
    raw_calls, legacy_call = item.get("tool_calls"), item.get("function_call")
    if raw_calls and legacy_call:
        raise InvalidRequestError(
            f"'{param}' has both 'tool_calls' and 'function_call'; send one of them.",
            param=f"{param}.function_call",
        )
    calls: list[ToolCall] = []
    if legacy_call is not None:
        calls.append(_call(legacy_call, f"{param}.function_call", None))
    elif raw_calls is not None:
        if not isinstance(raw_calls, list):
            raise InvalidRequestError(f"'{param}.tool_calls' must be an array.", param=f"{param}.tool_calls")
        for j, raw in enumerate(raw_calls):
            call_param = f"{param}.tool_calls[{j}]"
            if not isinstance(raw, Mapping):
                raise _not_an_object(call_param)
            call_id = raw.get("id")
            if call_id is not None and not isinstance(call_id, str):
                raise InvalidRequestError(f"'{call_param}.id' must be a string.", param=f"{call_param}.id")
            calls.append(_call(raw.get("function"), f"{call_param}.function", call_id))
    return Message("assistant", content, tool_calls=tuple(calls))


def _call(raw: Any, param: str, call_id: str | None) -> ToolCall:
    if not isinstance(raw, Mapping):
        raise InvalidRequestError(f"'{param}' must be an object with 'name' and 'arguments'.", param=param)
    name, arguments = raw.get("name"), raw.get("arguments")
    if not isinstance(name, str) or not name:
        raise InvalidRequestError(f"'{param}.name' must be a non-empty string.", param=f"{param}.name")
    if arguments is None:
        arguments = ""
    if not isinstance(arguments, str):
        raise InvalidRequestError(
            f"'{param}.arguments' must be a string (JSON text, or code for python).",
            param=f"{param}.arguments",
        )
    return ToolCall(name=name, arguments=arguments, id=call_id)


def _tool_result(item: Mapping[str, Any], param: str, calls_by_id: Mapping[str, ToolCall]) -> Message:
    content = _content(item, param, required=True)
    call_id, name = item.get("tool_call_id"), item.get("name")
    if call_id is not None:
        call = calls_by_id.get(call_id) if isinstance(call_id, str) else None
        if call is None:
            raise InvalidRequestError(
                f"Invalid '{param}.tool_call_id': {_quote(call_id)} does not answer any tool call of an "
                "earlier assistant message.",
                param=f"{param}.tool_call_id",
            )
        return Message("tool", content, name=call.name, tool_call_id=call_id)
    if isinstance(name, str) and name:
        return Message("tool", content, name=name)
    raise InvalidRequestError(
        f"'{param}.tool_call_id' is required: a tool message must answer a tool call of an earlier assistant "
        "message.",
        param=f"{param}.tool_call_id",
    )


def _reorder_tool_results(messages: list[Message]) -> list[Message]:
    """Put the tool results right after an assistant turn in the order of that turn's calls."""
    out: list[Message] = []
    i = 0
    while i < len(messages):
        message = messages[i]
        out.append(message)
        i += 1
        if not message.tool_calls:
            continue
        order = {c.id: k for k, c in enumerate(message.tool_calls) if c.id is not None}
        if message.role != "assistant" or not order:
            continue
        j = i
        while j < len(messages) and messages[j].role == "tool":
            j += 1
        results = messages[i:j]
        # Results for calls of this turn first, in call order; any other result keeps its place after them.
        out.extend(sorted(results, key=lambda m: order.get(m.tool_call_id, len(order))))
        i = j
    return out
