"""Plain data shared by the renderers, the parsers and the OpenAI mapping.

Nothing here does I/O or validation: `request.normalize()` builds a
:class:`ChatPrompt` from an OpenAI request body (and raises the 400 errors), the
per-family modules render it and parse the model's answer into :data:`Event`s,
and `tgi_gateway.streaming` turns those events into OpenAI messages and chunks.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Literal


class Version(str, enum.Enum):
    """Functionary prompt-template versions (FORMATS.md §1)."""

    V1 = "v1"
    V2 = "v2"
    V2_LLAMA3 = "v2.llama3"
    V3_LLAMA3 = "v3.llama3"
    V3_LLAMA31 = "v3-llama3.1"

    def __str__(self) -> str:  # "v3.llama3", not "Version.V3_LLAMA3"
        return self.value


# --------------------------------------------------------------------------------------------
# The normalised request
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call in the conversation history (an assistant message's `tool_calls` / `function_call`)."""

    name: str
    arguments: str
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Message:
    """One message, text already flattened to a string.

    For `role == "tool"`/`"function"`, `name` is the called function's name (filled from the
    matching call when the client did not send it) and `tool_call_id` the call it answers.
    """

    role: Literal["system", "user", "assistant", "tool", "function"]
    content: str | None = None
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None


@dataclass(frozen=True, slots=True)
class Function:
    """A function definition, normalised as functionary's pydantic model dumps it.

    Key order of :meth:`as_dict` is always name, description, parameters; unknown keys are dropped;
    `parameters` has its local `$ref`s resolved. `strict` (OpenAI's ``strict: true``) is kept for the
    grammar (a schema it cannot express is then refused) and never printed.
    """

    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None
    strict: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


@dataclass(frozen=True, slots=True)
class Tool:
    """A tool: a function, or the built-in code interpreter (which has no function)."""

    type: Literal["function", "code_interpreter"]
    function: Function | None = None


@dataclass(frozen=True, slots=True)
class NamedChoice:
    """`tool_choice: {"type": "function", "function": {"name": ...}}` or `function_call: {"name": ...}`."""

    name: str


ToolChoice = Literal["none", "auto", "required"] | NamedChoice


@dataclass(frozen=True, slots=True)
class ChatPrompt:
    """Everything a renderer needs, and the parts of the request the response mapping needs.

    `tools` is the list *as the prompt shows it*: already filtered by the tool choice
    (`"none"` → no tools at all, a named choice → only that function). `choice` is `"none"`
    when the request had no tools. `legacy_functions` is true when the client used the
    deprecated `functions`/`function_call` fields (answers then carry `function_call`).
    """

    messages: tuple[Message, ...]
    tools: tuple[Tool, ...] = ()
    choice: ToolChoice = "none"
    legacy_functions: bool = False
    has_code_interpreter: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "has_code_interpreter", any(t.type == "code_interpreter" for t in self.tools)
        )

    @property
    def functions(self) -> tuple[Function, ...]:
        """The function tools, in order, without the code interpreter."""
        return tuple(t.function for t in self.tools if t.function is not None)


# --------------------------------------------------------------------------------------------
# Parser events
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TextDelta:
    """Assistant text (`content`)."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallStart:
    """A new call; `index` counts calls from 0 in the order they start."""

    index: int
    name: str


@dataclass(frozen=True, slots=True)
class ToolCallArgs:
    """A fragment of call `index`'s arguments (JSON text; raw code for `python`)."""

    index: int
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallEnd:
    """Call `index` is complete: no more `ToolCallArgs` for it will follow."""

    index: int


@dataclass(frozen=True, slots=True)
class TextSpans:
    """Where the text of the :class:`TextDelta` just before it came from: ``(start, end, content)`` spans
    of offsets in the output fed to the parser (its first character is 0), in order: the characters that
    text released (``content`` true) and the whitespace its segment dropped at its start (false).

    Only the tracking parsers (``parse.TRACKED_PARSERS``, used when the client asked for ``logprobs``) emit
    it; a joiner the parser inserted (the ``"\\n"`` between two text segments) is in no span.
    """

    spans: tuple[tuple[int, int, bool], ...]


Event = TextDelta | ToolCallStart | ToolCallArgs | ToolCallEnd | TextSpans
