"""ChatPrompt → the exact prompt text of each Functionary template version.

Theory of operation
-------------------
functionary builds a prompt as ``template.render(messages, tools, add_generation_prompt=True)`` followed by
the generation prefix of the tool choice (FORMATS.md §2.5). We do not run jinja: each family has one small
function below that writes the same bytes as functionary's HEAD template (``jinja_templates/<version>.txt``;
v1: ``prompt_template_v1.py``, FORMATS.md §4), and :func:`render` appends :func:`generation_prefix`. A
prompt is always

    system part (the tools)  +  one chunk per message  +  generation prompt  +  generation prefix

and contains no BOS token (TGI adds it). The tools are shown as functionary's TypeScript-like schema
(:func:`.schema.ts_schema`; the Python flavour for v1), except in v3-llama3.1, which lists each function as
plain JSON (``json.dumps(..., ensure_ascii=False)``: never HTML-escaped, unlike the hub template under Python
jinja2). The code interpreter is not a function: it switches the system text (v1, v2, v2.llama3), adds a
system message (v3.llama3) or the ``Environment: ipython`` line (v3-llama3.1).

The :class:`ChatPrompt` is already normalised (tools filtered by the tool choice, tool results named and in
call order), so the renderers only print. Assistant messages follow the HEAD templates: empty-string content
prints nothing, and a turn with neither content nor calls prints nothing at all. v1 follows functionary's
Python, which tests ``content is not None`` (``""`` prints an empty text), except that a turn with neither
content nor calls prints nothing rather than the bare ``assistant:`` generation marker functionary would put
into the history. Messages with the legacy role ``function`` are tool results in every version (the HEAD
jinja templates would print them as assistant turns, which no model was trained on). Python calls carry raw
code, printed as is.

A tool whose schema cannot be rendered, and a v1 assistant turn with several calls (v1 models make at most one
call per turn), are client errors: :class:`InvalidRequestError`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

from ..errors import ContextLengthExceededError, InvalidRequestError
from .lru import LRUCache
from .schema import SchemaError, ts_schema
from .types import ChatPrompt, Function, Message, NamedChoice, ToolCall, ToolChoice, Version

__all__ = ["MAX_CHARS_PER_TOKEN", "TOKENS_PER_MESSAGE", "generation_prefix", "render"]

MAX_CHARS_PER_TOKEN = 128
"""No token of a Functionary model's tokenizer is longer than this, in characters: Llama 3's longest
vocabulary entry is 128 spaces (id 58040); Llama 2's and Mistral's are 16 characters; the added tokens
(``<|reserved_special_token_249|>``, ``<|END_OF_FUNCTION_RESULT|>``, ...) at most 30. A text of N characters
is therefore at least N / 128 tokens (docs/operations.md, "Request limits")."""

DEFAULT_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. The assistant calls functions with appropriate "
    "input when necessary"
)
CODE_INTERPRETER_SYSTEM = (
    "When you send a message containing Python code to python, it will be executed in a stateful Jupyter "
    "notebook environment. python will respond with the output of the execution or time out after 60.0 "
    "seconds. The drive at '/mnt/data' can be used to save and persist user files."
)
_V3_SYSTEM = (
    "You are capable of executing available function(s) if required.\n"
    "Only execute function(s) when absolutely necessary.\n"
    "Ask for the required input to:recipient==all\n"
    "Use JSON for function arguments.\n"
    "Respond in this format:\n"
    ">>>${recipient}\n"
    "${content}\n"
    "Available functions:\n"
)
_V31_INSTRUCTIONS = (
    "\nThink very carefully before calling functions.\n"
    "If a you choose to call a function ONLY reply in the following format:\n"
    "<{start_tag}={function_name}>{parameters}{end_tag}\n"
    "where\n\n"
    "start_tag => `<function`\n"
    "parameters => a JSON dict with the function argument name as key and function argument value as value.\n"
    "end_tag => `</function>`\n\n"
    "Here is an example,\n"
    '<function=example_function_name>{"example_name": "example_value"}</function>\n\n'
    "Reminder:\n"
    "- If looking for real time information use relevant functions before falling back to brave_search\n"
    "- Function calls MUST follow the specified format, start with <function= and end with </function>\n"
    "- Required parameters MUST be specified\n"
    "- Only call one function at a time\n"
    "- Put the entire function call reply on one line\n\n"
)
_LLAMA3_SEPARATOR = "<|reserved_special_token_249|>"

# Generation prefix per version: (tool choice "none", "required", a named function). "auto" is always "".
_PREFIXES: dict[Version, tuple[str, str, str]] = {
    Version.V1: ("", "", ""),
    Version.V2: ("all\n<|content|>", "", "{name}\n<|content|>"),
    Version.V2_LLAMA3: ("", _LLAMA3_SEPARATOR, _LLAMA3_SEPARATOR + "{name}\n"),
    Version.V3_LLAMA3: ("all\n", "", "{name}\n"),
    Version.V3_LLAMA31: ("", "<function=", "<function={name}>"),
}


def generation_prefix(version: Version | str, choice: ToolChoice) -> str:
    """What the prompt ends with for `choice`: the start of the answer the model is forced into."""
    none, required, named = _PREFIXES[Version(version)]
    if isinstance(choice, NamedChoice):
        return named.format(name=choice.name)
    if choice == "auto":
        return ""
    if choice == "none":
        return none
    if choice == "required":
        return required
    raise ValueError(f"unknown tool choice {choice!r}")


def render(version: Version | str, prompt: ChatPrompt, *, max_tokens: int | None = None) -> str:
    """The complete prompt text (no BOS): the template rendering plus the generation prefix.

    With `max_tokens` (the most tokens the prompt may have), a prompt that cannot fit is refused: one
    longer than ``max_tokens × MAX_CHARS_PER_TOKEN`` characters has more tokens than that, whatever the
    tokenizer. The messages' own text (contents and call arguments, all printed verbatim) is checked before
    anything is rendered, the whole prompt once it is: either way before it is sent anywhere. A prompt that
    passes may still be too long in tokens; only the model's tokenizer (TGI) can tell.

    Raises:
        ContextLengthExceededError: the prompt is longer than `max_tokens` allows.
        InvalidRequestError: a tool schema that cannot be rendered, or (v1) an assistant message
            with more than one tool call.
    """
    version = Version(version)
    if max_tokens is not None:
        _check_length(_least_chars(prompt), max_tokens)
        _check_turns(version, prompt, max_tokens)
    text = _RENDERERS[version](prompt) + generation_prefix(version, prompt.choice)
    if max_tokens is not None:
        _check_length(len(text), max_tokens)
    return text


def _least_chars(prompt: ChatPrompt) -> int:
    """A lower bound of the rendered prompt's length: every version prints each message's content and each
    call's arguments verbatim (the names of Python calls are not printed in v3-llama3.1)."""
    return sum(
        len(m.content or "") + sum(len(call.arguments) for call in m.tool_calls) for m in prompt.messages
    )


# The fewest tokens one printed message costs, per version. Each family's markers are added tokens of its
# tokenizer (FORMATS.md §1), one token each wherever they appear, and the tokenizer cuts the text at them, so
# every non-empty run of text between two of them is at least one more token:
# v1: `role:\n…<|END_OF_…|>` (an added token, text before it); v2: `\n<|from|>sender\n<|recipient|>recipient\n
# <|content|>…` (three added tokens, three texts: the content runs into the next block's leading `\n`); llama3
# families: `<|start_header_id|>role<|end_header_id|>\n\n…<|eot_id|>` (three added tokens, two texts). An
# assistant message with neither content nor calls prints nothing and counts nothing. (Checked against what the
# renderers print: tests/prompting/test_budget.py.)
TOKENS_PER_MESSAGE: dict[Version, int] = {
    Version.V1: 2,
    Version.V2: 6,
    Version.V2_LLAMA3: 5,
    Version.V3_LLAMA3: 5,
    Version.V3_LLAMA31: 5,
}


def _check_turns(version: Version, prompt: ChatPrompt, max_tokens: int) -> None:
    """Refuse a prompt whose messages alone are more tokens than `max_tokens`, at TOKENS_PER_MESSAGE each
    (many short messages: the length in characters says nothing there)."""
    per_message = TOKENS_PER_MESSAGE[version]
    if len(prompt.messages) * per_message <= max_tokens:
        return  # (the common case: no need to look at each message)
    printed = sum(1 for m in prompt.messages if m.role != "assistant" or m.content or m.tool_calls)
    if printed * per_message > max_tokens:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {max_tokens} tokens for the prompt. However, your "
            f"messages are at least {printed * per_message:,} tokens ({printed:,} of them, each at least "
            f"{per_message} tokens of this model's template markers). Please send fewer messages.",
            param="messages",
        )


def _check_length(chars: int, max_tokens: int) -> None:
    if chars > max_tokens * MAX_CHARS_PER_TOKEN:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {max_tokens} tokens for the prompt. However, your "
            f"messages resulted in a prompt of at least {chars:,} characters, which is more than "
            f"{max_tokens} tokens (no token of this model is longer than {MAX_CHARS_PER_TOKEN} "
            "characters). Please reduce the length of the messages or tools.",
            param="messages",
        )


# ------------------------------------------------------------------------------------------------
# shared pieces
# ------------------------------------------------------------------------------------------------


def _text(message: Message) -> str:
    return message.content or ""


def _is_result(message: Message) -> bool:
    return message.role in ("tool", "function")


def _system_text(prompt: ChatPrompt) -> str:
    """v1, v2, v2.llama3: the second system message."""
    return CODE_INTERPRETER_SYSTEM if prompt.has_code_interpreter else DEFAULT_SYSTEM


# Texts printed from Function objects, keyed by the objects' identity plus any option. The value keeps the
# objects alive, so while an entry is remembered no other object can have its ids. `normalize` hands out
# the same Function objects for the same tool definitions, so a conversation's tools are printed once.
# (The TypeScript-like declarations are remembered the same way, per function, by `schema.function_block`.)
_TEXTS: LRUCache[tuple[Any, ...], tuple[tuple[Function, ...], str]] = LRUCache(1024)


def _printed(functions: tuple[Function, ...], option: str, make: Callable[[], str]) -> str:
    """`make()` remembered for these very objects (and `option`)."""
    key = (*map(id, functions), option)
    return _TEXTS.get_or_make(key, lambda: (functions, make()))[1]


def _schema(prompt: ChatPrompt, flavor: Literal["jinja", "python"] = "jinja") -> str:
    try:
        return ts_schema(prompt.functions, flavor=flavor)
    except SchemaError as exc:
        param = "functions" if prompt.legacy_functions else "tools"
        raise InvalidRequestError(f"Invalid function schema: {exc}", param=param) from None


def _llama3_turn(role: str, body: str, end: str = "<|eot_id|>") -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n{body}{end}"


_LLAMA3_GENERATION = "<|start_header_id|>assistant<|end_header_id|>\n\n"


# ------------------------------------------------------------------------------------------------
# one renderer per family
# ------------------------------------------------------------------------------------------------


def _render_v1(prompt: ChatPrompt) -> str:
    """functionary-7b-v1.x (FORMATS.md §4). functionary ``.strip()``s the result: a no-op, it starts with
    ``system:`` and ends with ``assistant:``."""
    out = [
        f"system:\n{_schema(prompt, 'python')}<|END_OF_SYSTEM|>\n",
        f"system:\n{_system_text(prompt)}<|END_OF_SYSTEM|>\n",
    ]
    for i, message in enumerate(prompt.messages):
        if message.role == "user":
            out.append(f"user:\n{_text(message)}<|END_OF_USER|>\n")
        elif message.role == "system":
            out.append(f"system:\n{_text(message)}<|END_OF_SYSTEM|>\n")
        elif _is_result(message):
            out.append(f"function name={message.name or ''}:\n{_text(message)}<|END_OF_FUNCTION_RESULT|>\n")
        elif len(message.tool_calls) > 1:
            raise InvalidRequestError(
                f"This model (Functionary v1) makes at most one function call per assistant message; "
                f"messages[{i}] has {len(message.tool_calls)} tool calls.",
                param=f"messages[{i}].tool_calls",
            )
        elif message.tool_calls:
            call = message.tool_calls[0]
            text = "" if message.content is None else message.content + "\n"  # "" prints an empty line
            out.append(
                f"assistant:\n{text}<|START_OF_FUNCTION_CALL|>{call.name}:\n"
                f"{call.arguments}<|END_OF_FUNCTION_CALL|>\n"
            )
        elif message.content is not None:
            out.append(f"assistant:\n{message.content}<|END_OF_ASSISTANT|>\n")
    out.append("assistant:")
    return "".join(out)


def _render_v2(prompt: ChatPrompt) -> str:
    """small/medium-v2.x (FORMATS.md §5): ``<|from|>``, ``<|recipient|>``, ``<|content|>`` blocks."""

    def block(sender: str, recipient: str, content: str) -> str:
        return f"\n<|from|>{sender}\n<|recipient|>{recipient}\n<|content|>{content}"

    out = [block("system", "all", _schema(prompt)), block("system", "all", _system_text(prompt))]
    for message in prompt.messages:
        if message.role in ("user", "system"):
            out.append(block(message.role, "all", _text(message)))
        elif _is_result(message):
            out.append(block(message.name or "", "all", _text(message)))
        else:
            turn = [block("assistant", "all", message.content)] if message.content else []
            turn += [block("assistant", call.name, call.arguments) for call in message.tool_calls]
            if turn:
                out += turn + ["<|stop|>"]
    out.append("\n<|from|>assistant\n<|recipient|>")
    return "".join(out)[1:]  # the first block has no leading "\n"


def _render_v2_llama3(prompt: ChatPrompt) -> str:
    """small-v2.5 (FORMATS.md §6)."""
    out = [_llama3_turn("system", _schema(prompt)), _llama3_turn("system", _system_text(prompt))]
    for message in prompt.messages:
        if message.role in ("user", "system"):
            out.append(_llama3_turn(message.role, _text(message)))
        elif _is_result(message):
            out.append(_llama3_turn("tool", f"name={message.name or ''}\n{_text(message)}"))
        elif message.content or message.tool_calls:
            calls = "".join(
                f"{_LLAMA3_SEPARATOR}{call.name}\n{call.arguments}" for call in message.tool_calls
            )
            out.append(_llama3_turn("assistant", _text(message) + calls))
    out.append(_LLAMA3_GENERATION)
    return "".join(out)


def _render_v3_llama3(prompt: ChatPrompt) -> str:
    """medium-v3.0, small/medium-v3.2 (FORMATS.md §7): ``>>>recipient\\ncontent`` segments."""
    out = [_llama3_turn("system", _V3_SYSTEM + _schema(prompt))]
    if prompt.has_code_interpreter:
        out.append(_llama3_turn("system", CODE_INTERPRETER_SYSTEM))
    for message in prompt.messages:
        if message.role in ("user", "system"):
            out.append(_llama3_turn(message.role, _text(message)))
        elif _is_result(message):
            out.append(_llama3_turn("tool", _text(message)))
        elif message.content or message.tool_calls:
            text = f">>>all\n{message.content}" if message.content else ""
            calls = "".join(f">>>{call.name}\n{call.arguments}" for call in message.tool_calls)
            out.append(_llama3_turn("assistant", text + calls))
    out.append(_LLAMA3_GENERATION + ">>>")
    return "".join(out)


def _render_v3_llama31(prompt: ChatPrompt) -> str:
    """small/medium-v3.1 (FORMATS.md §8): Meta's Llama-3.1 custom-tool format, functions as JSON."""
    system = "Environment: ipython\n\n" if prompt.has_code_interpreter else "\n"
    system += "Cutting Knowledge Date: December 2023\n\n"
    if prompt.functions:
        system += "\nYou have access to the following functions:\n\n"
        for function in prompt.functions:
            as_json = _printed(
                (function,), "json", lambda f=function: json.dumps(f.as_dict(), ensure_ascii=False)
            )
            system += f"Use the function '{function.name}' to '{function.description}'\n{as_json}\n\n"
        system += _V31_INSTRUCTIONS
    out = [_llama3_turn("system", system)]
    for message in prompt.messages:
        if message.role in ("user", "system"):
            out.append(_llama3_turn(message.role, _text(message)))
        elif _is_result(message):
            out.append(_llama3_turn("ipython", _text(message)))
        elif message.tool_calls:
            calls = "".join(_v31_call(call) for call in message.tool_calls)
            out.append(_llama3_turn("assistant", _text(message) + calls, end="<|eom_id|>"))
        elif message.content:
            out.append(_llama3_turn("assistant", message.content))
    out.append(_LLAMA3_GENERATION)
    return "".join(out)


def _v31_call(call: ToolCall) -> str:
    if call.name == "python":  # the code interpreter: raw code after Llama's python tag
        return f"<|python_tag|>{call.arguments}"
    return f"<function={call.name}>{call.arguments}</function>"


_RENDERERS: dict[Version, Callable[[ChatPrompt], str]] = {
    Version.V1: _render_v1,
    Version.V2: _render_v2,
    Version.V2_LLAMA3: _render_v2_llama3,
    Version.V3_LLAMA3: _render_v3_llama3,
    Version.V3_LLAMA31: _render_v3_llama31,
}
