"""Prompt rendering (tgi_gateway.prompting.render): byte-exact prompts for the five template versions.

Two kinds of expected text:

* functionary's own expected prompts for its test conversations (tests/golden/functionary/, provenance and
  the one normalisation, functionary's ``.strip()``, in tests/golden/README.md);
* hand-written prompts for everything functionary has no golden for (no tools, the tool choices and their
  generation prefixes, legacy functions, system messages, a ``$ref`` schema, non-ASCII and HTML-ish text),
  written from FORMATS.md §4–8 with the fixed texts spelled out once below.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tgi_gateway.errors import InvalidRequestError
from tgi_gateway.prompting.render import generation_prefix, render
from tgi_gateway.prompting.schema import resolve_refs
from tgi_gateway.prompting.types import ChatPrompt, Function, Message, NamedChoice, Tool, ToolCall, Version

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "functionary"

V1, V2, V2L3, V3L3, V31 = Version.V1, Version.V2, Version.V2_LLAMA3, Version.V3_LLAMA3, Version.V3_LLAMA31
ALL_VERSIONS = [V1, V2, V2L3, V3L3, V31]

# ------------------------------------------------------------------------------------------------
# The fixed texts of the formats (FORMATS.md §4–8), spelled out independently of render.py
# ------------------------------------------------------------------------------------------------

DEFAULT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. The assistant calls functions with appropriate "
    "input when necessary"
)
CODE = (
    "When you send a message containing Python code to python, it will be executed in a stateful Jupyter "
    "notebook environment. python will respond with the output of the execution or time out after 60.0 "
    "seconds. The drive at '/mnt/data' can be used to save and persist user files."
)
V3_SYSTEM = (
    "You are capable of executing available function(s) if required.\n"
    "Only execute function(s) when absolutely necessary.\n"
    "Ask for the required input to:recipient==all\n"
    "Use JSON for function arguments.\n"
    "Respond in this format:\n>>>${recipient}\n${content}\n"
    "Available functions:\n"
)
V31_FUNCTIONS_HEAD = "\nYou have access to the following functions:\n\n"
V31_FUNCTIONS_TAIL = (
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
V31_DATE = "Cutting Knowledge Date: December 2023\n\n"
EMPTY_NS = (
    "// Supported function definitions that should be called when necessary.\nnamespace functions {\n\n"
    "} // namespace functions"
)

# What each template prints after the messages when add_generation_prompt is set.
GENERATION_PROMPT = {
    V1: "assistant:",
    V2: "\n<|from|>assistant\n<|recipient|>",
    V2L3: "<|start_header_id|>assistant<|end_header_id|>\n\n",
    V3L3: "<|start_header_id|>assistant<|end_header_id|>\n\n>>>",
    V31: "<|start_header_id|>assistant<|end_header_id|>\n\n",
}


def turn(role: str, body: str, end: str = "<|eot_id|>") -> str:
    """A Llama-3 turn: the one piece of markup shared by three of the formats."""
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n{body}{end}"


# ------------------------------------------------------------------------------------------------
# functionary's test conversations
# ------------------------------------------------------------------------------------------------


def load_case(name: str) -> ChatPrompt:
    """A functionary test case (tools or legacy functions + messages) as the normalised ChatPrompt."""
    data = json.loads((GOLDEN / name).read_text(encoding="utf-8"))

    def function(raw: dict[str, Any]) -> Function:
        return Function(raw["name"], raw.get("description", ""), raw.get("parameters"))

    if "functions" in data:
        tools = tuple(Tool("function", function(f)) for f in data["functions"])
    else:
        tools = tuple(
            (
                Tool("code_interpreter")
                if t["type"] == "code_interpreter"
                else Tool("function", function(t["function"]))
            )
            for t in data["tools"]
        )
    messages = []
    for m in data["messages"]:
        calls = (
            [m["function_call"]]
            if m.get("function_call")
            else [c["function"] for c in m.get("tool_calls") or []]
        )
        messages.append(
            Message(
                m["role"],
                m.get("content"),
                name=m.get("name"),
                tool_calls=tuple(ToolCall(c["name"], c["arguments"]) for c in calls),
            )
        )
    return ChatPrompt(tuple(messages), tools, choice="auto", legacy_functions="functions" in data)


def golden(name: str) -> str:
    return (GOLDEN / name).read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "version, case, expected",
    [
        (V2, "test_case.json", "prompt_test_v2.txt"),
        (V2L3, "test_case.json", "prompt_test_v2.llama3.txt"),
        (V31, "test_case.json", "prompt_test_v3-llama3.1.txt"),
        (V3L3, "test_case.5786bb4.json", "prompt_test_v3.llama3.b368a11.txt"),
        (V31, "test_case.5786bb4.json", "prompt_test_v3-llama3.1.5786bb4.txt"),
    ],
)
def test_functionary_golden_conversation(version: Version, case: str, expected: str) -> None:
    text = golden(expected)
    if version is V2:
        assert "\n\n<|from|>" not in text  # functionary's v2-only replacement is a no-op for this file
    if version is not V3L3:
        assert text == text.strip()  # only the v3.llama3 file needs functionary's strip (a leading space)
    assert render(version, load_case(case)) == text.strip() + GENERATION_PROMPT[version]


def test_functionary_golden_conversation_v3_llama3_head_case() -> None:
    # No stored v3.llama3 expected prompt matches the HEAD conversation; the b368a11 one renders the same
    # conversation plus one more exchange, so the HEAD prompt is that file cut after the shared part.
    text = golden("prompt_test_v3.llama3.b368a11.txt").strip()
    end = "The final list is: 0,1,2,3,5<|eot_id|>"
    expected = text[: text.index(end) + len(end)]
    assert render(V3L3, load_case("test_case.json")) == expected + GENERATION_PROMPT[V3L3]


def test_functionary_golden_conversation_v1() -> None:
    text = golden("prompt_test_v1.txt")
    assert text == text.strip()
    # functionary's strip removed the "\n" that ends the last message; the generation prompt follows it
    assert render(V1, load_case("test_case_v1.json")) == text + "\n" + GENERATION_PROMPT[V1]


def test_head_case_ends_with_turns_that_print_nothing() -> None:
    prompt = load_case("test_case.json")
    assert [(m.content, m.tool_calls) for m in prompt.messages[-2:]] == [("", ()), (None, ())]
    for version in (V2, V2L3, V3L3, V31):
        shorter = ChatPrompt(prompt.messages[:-2], prompt.tools, prompt.choice)
        assert render(version, prompt) == render(version, shorter)


# ------------------------------------------------------------------------------------------------
# Hand-written prompts
# ------------------------------------------------------------------------------------------------

WEATHER = Function(
    "get_weather",
    "Get the current weather",
    {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "The city, e.g. Hanoi"},
            "unit": {"type": "string", "enum": ["c", "f"]},
        },
        "required": ["location"],
    },
)
WEATHER_TS = (
    "// Supported function definitions that should be called when necessary.\nnamespace functions {\n\n"
    "// Get the current weather\ntype get_weather = (_: {\n// The city, e.g. Hanoi.\nlocation: string,\n"
    'unit?: "c" | "f",\n}) => any;\n\n} // namespace functions'
)
WEATHER_JSON = (
    '{"name": "get_weather", "description": "Get the current weather", "parameters": {"type": "object", '
    '"properties": {"location": {"type": "string", "description": "The city, e.g. Hanoi"}, "unit": {"type": '
    '"string", "enum": ["c", "f"]}}, "required": ["location"]}}'
)
WEATHER_V31_SYSTEM = (
    "\n"
    + V31_DATE
    + V31_FUNCTIONS_HEAD
    + "Use the function 'get_weather' to 'Get the current weather'\n"
    + WEATHER_JSON
    + "\n\n"
    + V31_FUNCTIONS_TAIL
)
QUESTION = Message("user", "Weather in Hanoi?")

# One user question, no tools (a request without tools, or tool_choice "none"): without the prefix.
NO_TOOLS = {
    V1: (
        f"system:\n{EMPTY_NS}<|END_OF_SYSTEM|>\nsystem:\n{DEFAULT}<|END_OF_SYSTEM|>\n"
        "user:\nWeather in Hanoi?<|END_OF_USER|>\nassistant:"
    ),
    V2: (
        f"<|from|>system\n<|recipient|>all\n<|content|>{EMPTY_NS}"
        f"\n<|from|>system\n<|recipient|>all\n<|content|>{DEFAULT}"
        "\n<|from|>user\n<|recipient|>all\n<|content|>Weather in Hanoi?\n<|from|>assistant\n<|recipient|>"
    ),
    V2L3: (
        turn("system", EMPTY_NS)
        + turn("system", DEFAULT)
        + turn("user", "Weather in Hanoi?")
        + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    V3L3: (
        turn("system", V3_SYSTEM + EMPTY_NS)
        + turn("user", "Weather in Hanoi?")
        + "<|start_header_id|>assistant<|end_header_id|>\n\n>>>"
    ),
    V31: turn("system", "\n" + V31_DATE)
    + turn("user", "Weather in Hanoi?")
    + "<|start_header_id|>assistant<|end_header_id|>\n\n",
}

# The same question with the get_weather tool (no code interpreter: default system message), without prefix.
WITH_WEATHER = {
    V1: (
        f"system:\n{WEATHER_TS}<|END_OF_SYSTEM|>\nsystem:\n{DEFAULT}<|END_OF_SYSTEM|>\n"
        "user:\nWeather in Hanoi?<|END_OF_USER|>\nassistant:"
    ),
    V2: (
        f"<|from|>system\n<|recipient|>all\n<|content|>{WEATHER_TS}"
        f"\n<|from|>system\n<|recipient|>all\n<|content|>{DEFAULT}"
        "\n<|from|>user\n<|recipient|>all\n<|content|>Weather in Hanoi?\n<|from|>assistant\n<|recipient|>"
    ),
    V2L3: (
        turn("system", WEATHER_TS)
        + turn("system", DEFAULT)
        + turn("user", "Weather in Hanoi?")
        + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    V3L3: (
        turn("system", V3_SYSTEM + WEATHER_TS)
        + turn("user", "Weather in Hanoi?")
        + "<|start_header_id|>assistant<|end_header_id|>\n\n>>>"
    ),
    V31: turn("system", WEATHER_V31_SYSTEM)
    + turn("user", "Weather in Hanoi?")
    + "<|start_header_id|>assistant<|end_header_id|>\n\n",
}


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_no_tools(version: Version) -> None:
    # A request without tools has tool choice "none" (FORMATS.md §2.2), hence the "none" prefix.
    prompt = ChatPrompt((QUESTION,))
    none_prefix = {V1: "", V2: "all\n<|content|>", V2L3: "", V3L3: "all\n", V31: ""}[version]
    assert render(version, prompt) == NO_TOOLS[version] + none_prefix


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_tools_without_code_interpreter(version: Version) -> None:
    prompt = ChatPrompt((QUESTION,), (Tool("function", WEATHER),), choice="auto")
    assert render(version, prompt) == WITH_WEATHER[version]


PREFIXES = {
    # version: (auto, required, none, named get_weather)
    V1: ("", "", "", ""),
    V2: ("", "", "all\n<|content|>", "get_weather\n<|content|>"),
    V2L3: ("", "<|reserved_special_token_249|>", "", "<|reserved_special_token_249|>get_weather\n"),
    V3L3: ("", "", "all\n", "get_weather\n"),
    V31: ("", "<function=", "", "<function=get_weather>"),
}


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_every_tool_choice(version: Version) -> None:
    auto, required, none, named = PREFIXES[version]
    other = Tool("function", Function("get_time", "Get the time", None))
    tools = (Tool("function", WEATHER),)
    # auto / required: all tools shown; the fixtures have one function, so WITH_WEATHER applies
    assert render(version, ChatPrompt((QUESTION,), tools, choice="auto")) == WITH_WEATHER[version] + auto
    assert (
        render(version, ChatPrompt((QUESTION,), tools, choice="required")) == WITH_WEATHER[version] + required
    )
    # "none": the normaliser removes every tool, code interpreter included, so the prompt has none
    assert render(version, ChatPrompt((QUESTION,), (), choice="none")) == NO_TOOLS[version] + none
    # named: the normaliser keeps only the named function (get_time and the code interpreter are gone)
    assert (
        render(version, ChatPrompt((QUESTION,), tools, choice=NamedChoice("get_weather")))
        == WITH_WEATHER[version] + named
    )
    # and the full tool list really is what the prompt shows
    assert "get_time" in render(
        version, ChatPrompt((QUESTION,), (Tool("code_interpreter"), other) + tools, "auto")
    )


def test_generation_prefix_table() -> None:
    for version, (auto, required, none, named) in PREFIXES.items():
        assert generation_prefix(version, "auto") == auto
        assert generation_prefix(version, "required") == required
        assert generation_prefix(version, "none") == none
        assert generation_prefix(version, NamedChoice("get_weather")) == named
        assert generation_prefix(version.value, NamedChoice("get_weather")) == named  # plain strings work too
    with pytest.raises(ValueError):
        generation_prefix(V2, "sometimes")  # type: ignore[arg-type]


# --- legacy functions: rendered exactly like tools; role "function" results, a function_call turn ---

LEGACY_MESSAGES = (
    Message("system", "Be brief."),
    QUESTION,
    Message("assistant", None, tool_calls=(ToolCall("get_weather", '{"location": "Hanoi"}'),)),
    Message("function", '{"temp": 30}', name="get_weather"),
    Message("assistant", "It is 30°C in Hanoi."),
    Message("user", "Thanks!"),
)
LEGACY = {
    V1: (
        f"system:\n{WEATHER_TS}<|END_OF_SYSTEM|>\nsystem:\n{DEFAULT}<|END_OF_SYSTEM|>\n"
        "system:\nBe brief.<|END_OF_SYSTEM|>\n"
        "user:\nWeather in Hanoi?<|END_OF_USER|>\n"
        'assistant:\n<|START_OF_FUNCTION_CALL|>get_weather:\n{"location": "Hanoi"}<|END_OF_FUNCTION_CALL|>\n'
        'function name=get_weather:\n{"temp": 30}<|END_OF_FUNCTION_RESULT|>\n'
        "assistant:\nIt is 30°C in Hanoi.<|END_OF_ASSISTANT|>\n"
        "user:\nThanks!<|END_OF_USER|>\n"
        "assistant:"
    ),
    V2: (
        f"<|from|>system\n<|recipient|>all\n<|content|>{WEATHER_TS}"
        f"\n<|from|>system\n<|recipient|>all\n<|content|>{DEFAULT}"
        "\n<|from|>system\n<|recipient|>all\n<|content|>Be brief."
        "\n<|from|>user\n<|recipient|>all\n<|content|>Weather in Hanoi?"
        '\n<|from|>assistant\n<|recipient|>get_weather\n<|content|>{"location": "Hanoi"}<|stop|>'
        '\n<|from|>get_weather\n<|recipient|>all\n<|content|>{"temp": 30}'
        "\n<|from|>assistant\n<|recipient|>all\n<|content|>It is 30°C in Hanoi.<|stop|>"
        "\n<|from|>user\n<|recipient|>all\n<|content|>Thanks!"
        "\n<|from|>assistant\n<|recipient|>"
    ),
    V2L3: (
        turn("system", WEATHER_TS)
        + turn("system", DEFAULT)
        + turn("system", "Be brief.")
        + turn("user", "Weather in Hanoi?")
        + turn("assistant", '<|reserved_special_token_249|>get_weather\n{"location": "Hanoi"}')
        + turn("tool", 'name=get_weather\n{"temp": 30}')
        + turn("assistant", "It is 30°C in Hanoi.")
        + turn("user", "Thanks!")
        + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    V3L3: (
        turn("system", V3_SYSTEM + WEATHER_TS)
        + turn("system", "Be brief.")
        + turn("user", "Weather in Hanoi?")
        + turn("assistant", '>>>get_weather\n{"location": "Hanoi"}')
        + turn("tool", '{"temp": 30}')
        + turn("assistant", ">>>all\nIt is 30°C in Hanoi.")
        + turn("user", "Thanks!")
        + "<|start_header_id|>assistant<|end_header_id|>\n\n>>>"
    ),
    V31: (
        turn("system", WEATHER_V31_SYSTEM)
        + turn("system", "Be brief.")
        + turn("user", "Weather in Hanoi?")
        + turn("assistant", '<function=get_weather>{"location": "Hanoi"}</function>', end="<|eom_id|>")
        + turn("ipython", '{"temp": 30}')
        + turn("assistant", "It is 30°C in Hanoi.")
        + turn("user", "Thanks!")
        + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
}


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_legacy_functions(version: Version) -> None:
    prompt = ChatPrompt(LEGACY_MESSAGES, (Tool("function", WEATHER),), choice="auto", legacy_functions=True)
    assert render(version, prompt) == LEGACY[version]
    # legacy functions and tools render alike, and so do role "function" and role "tool" results
    as_tools = ChatPrompt(
        tuple(
            Message("tool", m.content, name=m.name) if m.role == "function" else m for m in LEGACY_MESSAGES
        ),
        (Tool("function", WEATHER),),
        choice="auto",
    )
    assert render(version, as_tools) == LEGACY[version]


# --- user system messages come after the built-in ones, wherever they are in the conversation ---

SYSTEM_MESSAGES = (
    Message("system", "You are terse."),
    Message("user", "Hi"),
    Message("assistant", "Hello!"),
    Message("system", "Answer in French."),
    Message("user", "Bye"),
)
WITH_SYSTEM = {
    V1: (
        f"system:\n{EMPTY_NS}<|END_OF_SYSTEM|>\nsystem:\n{DEFAULT}<|END_OF_SYSTEM|>\n"
        "system:\nYou are terse.<|END_OF_SYSTEM|>\nuser:\nHi<|END_OF_USER|>\n"
        "assistant:\nHello!<|END_OF_ASSISTANT|>\n"
        "system:\nAnswer in French.<|END_OF_SYSTEM|>\nuser:\nBye<|END_OF_USER|>\nassistant:"
    ),
    V2: (
        f"<|from|>system\n<|recipient|>all\n<|content|>{EMPTY_NS}"
        f"\n<|from|>system\n<|recipient|>all\n<|content|>{DEFAULT}"
        "\n<|from|>system\n<|recipient|>all\n<|content|>You are terse."
        "\n<|from|>user\n<|recipient|>all\n<|content|>Hi"
        "\n<|from|>assistant\n<|recipient|>all\n<|content|>Hello!<|stop|>"
        "\n<|from|>system\n<|recipient|>all\n<|content|>Answer in French."
        "\n<|from|>user\n<|recipient|>all\n<|content|>Bye"
        "\n<|from|>assistant\n<|recipient|>all\n<|content|>"
    ),
    V2L3: (
        turn("system", EMPTY_NS)
        + turn("system", DEFAULT)
        + turn("system", "You are terse.")
        + turn("user", "Hi")
        + turn("assistant", "Hello!")
        + turn("system", "Answer in French.")
        + turn("user", "Bye")
        + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    V3L3: (
        turn("system", V3_SYSTEM + EMPTY_NS)
        + turn("system", "You are terse.")
        + turn("user", "Hi")
        + turn("assistant", ">>>all\nHello!")
        + turn("system", "Answer in French.")
        + turn("user", "Bye")
        + "<|start_header_id|>assistant<|end_header_id|>\n\n>>>all\n"
    ),
    V31: (
        turn("system", "\n" + V31_DATE)
        + turn("system", "You are terse.")
        + turn("user", "Hi")
        + turn("assistant", "Hello!")
        + turn("system", "Answer in French.")
        + turn("user", "Bye")
        + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
}


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_user_system_messages(version: Version) -> None:
    assert render(version, ChatPrompt(SYSTEM_MESSAGES)) == WITH_SYSTEM[version]


# --- a tool schema whose $refs were resolved by the normaliser ---

BOOK = Function(
    "book",
    "Book a trip",
    resolve_refs(
        {
            "type": "object",
            "properties": {
                "from": {"$ref": "#/$defs/place", "description": "dropped"},
                "to": {"$ref": "#/$defs/place"},
            },
            "required": ["from", "to"],
            "$defs": {
                "place": {
                    "type": "object",
                    "description": "A place",
                    "properties": {"city": {"type": "string"}},
                }
            },
        }
    ),
)
BOOK_TS = (
    "// Supported function definitions that should be called when necessary.\nnamespace functions {\n\n"
    "// Book a trip\ntype book = (_: {\n// A place.\nfrom: {\n    city?: string,\n},\n// A place.\nto: {\n"
    "    city?: string,\n},\n}) => any;\n\n} // namespace functions"
)
PLACE_JSON = '{"type": "object", "description": "A place", "properties": {"city": {"type": "string"}}}'
BOOK_JSON = (
    '{"name": "book", "description": "Book a trip", "parameters": {"type": "object", "properties": {"from": '
    + PLACE_JSON
    + ', "to": '
    + PLACE_JSON
    + '}, "required": ["from", "to"], "$defs": {"place": '
    + PLACE_JSON
    + "}}}"
)
HI = Message("user", "Hi")
WITH_BOOK = {
    V1: (
        f"system:\n{BOOK_TS}<|END_OF_SYSTEM|>\nsystem:\n{DEFAULT}<|END_OF_SYSTEM|>\n"
        "user:\nHi<|END_OF_USER|>\nassistant:"
    ),
    V2: (
        f"<|from|>system\n<|recipient|>all\n<|content|>{BOOK_TS}"
        f"\n<|from|>system\n<|recipient|>all\n<|content|>{DEFAULT}"
        "\n<|from|>user\n<|recipient|>all\n<|content|>Hi\n<|from|>assistant\n<|recipient|>"
    ),
    V2L3: turn("system", BOOK_TS)
    + turn("system", DEFAULT)
    + turn("user", "Hi")
    + "<|start_header_id|>assistant<|end_header_id|>\n\n",
    V3L3: turn("system", V3_SYSTEM + BOOK_TS)
    + turn("user", "Hi")
    + "<|start_header_id|>assistant<|end_header_id|>\n\n>>>",
    V31: (
        turn(
            "system",
            "\n"
            + V31_DATE
            + V31_FUNCTIONS_HEAD
            + "Use the function 'book' to 'Book a trip'\n"
            + BOOK_JSON
            + "\n\n"
            + V31_FUNCTIONS_TAIL,
        )
        + turn("user", "Hi")
        + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
}


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_tool_schema_with_resolved_ref(version: Version) -> None:
    assert render(version, ChatPrompt((HI,), (Tool("function", BOOK),), choice="auto")) == WITH_BOOK[version]


# --- text is printed raw: non-ASCII stays, <, & and ' are not escaped (v3-llama3.1 JSON included) ---

LOOKUP = Function(
    "lookup",
    "Find <b> & 'quoted' things — ünïcode 你好",
    {
        "type": "object",
        "properties": {"q": {"type": "string", "description": "Café ☕ <i>x</i> & 'y'"}},
        "required": ["q"],
    },
)
LOOKUP_TS = (
    "// Supported function definitions that should be called when necessary.\nnamespace functions {\n\n"
    "// Find <b> & 'quoted' things — ünïcode 你好\ntype lookup = (_: {\n"
    "// Café ☕ <i>x</i> & 'y'.\nq: string,\n"
    "}) => any;\n\n} // namespace functions"
)
LOOKUP_JSON = (
    '{"name": "lookup", "description": "Find <b> & \'quoted\' things — ünïcode 你好", '
    '"parameters": {"type": "object", "properties": {"q": {"type": "string", '
    '"description": "Café ☕ <i>x</i> & \'y\'"}}, "required": ["q"]}}'
)
SEARCH = (Message("user", "Où est le café ☕? <&>"),)
WITH_LOOKUP = {
    V1: (
        f"system:\n{LOOKUP_TS}<|END_OF_SYSTEM|>\nsystem:\n{DEFAULT}<|END_OF_SYSTEM|>\n"
        "user:\nOù est le café ☕? <&><|END_OF_USER|>\nassistant:"
    ),
    V2: (
        f"<|from|>system\n<|recipient|>all\n<|content|>{LOOKUP_TS}"
        f"\n<|from|>system\n<|recipient|>all\n<|content|>{DEFAULT}"
        "\n<|from|>user\n<|recipient|>all\n<|content|>Où est le café ☕? <&>"
        "\n<|from|>assistant\n<|recipient|>"
    ),
    V2L3: (
        turn("system", LOOKUP_TS)
        + turn("system", DEFAULT)
        + turn("user", "Où est le café ☕? <&>")
        + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    V3L3: (
        turn("system", V3_SYSTEM + LOOKUP_TS)
        + turn("user", "Où est le café ☕? <&>")
        + "<|start_header_id|>assistant<|end_header_id|>\n\n>>>"
    ),
    V31: (
        turn(
            "system",
            "\n"
            + V31_DATE
            + V31_FUNCTIONS_HEAD
            + "Use the function 'lookup' to 'Find <b> & 'quoted' things — ünïcode 你好'\n"
            + LOOKUP_JSON
            + "\n\n"
            + V31_FUNCTIONS_TAIL,
        )
        + turn("user", "Où est le café ☕? <&>")
        + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
}


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_non_ascii_and_html_characters_are_printed_raw(version: Version) -> None:
    text = render(version, ChatPrompt(SEARCH, (Tool("function", LOOKUP),), choice="auto"))
    assert text == WITH_LOOKUP[version]
    assert "\\u" not in text and "&amp;" not in text and "&#" not in text and "&lt;" not in text


# --- the code interpreter alone ---

CODE_ONLY = {
    V1: (
        f"system:\n{EMPTY_NS}<|END_OF_SYSTEM|>\nsystem:\n{CODE}<|END_OF_SYSTEM|>\n"
        "user:\nWeather in Hanoi?<|END_OF_USER|>\nassistant:"
    ),
    V2: (
        f"<|from|>system\n<|recipient|>all\n<|content|>{EMPTY_NS}"
        f"\n<|from|>system\n<|recipient|>all\n<|content|>{CODE}"
        "\n<|from|>user\n<|recipient|>all\n<|content|>Weather in Hanoi?\n<|from|>assistant\n<|recipient|>"
    ),
    V2L3: (
        turn("system", EMPTY_NS)
        + turn("system", CODE)
        + turn("user", "Weather in Hanoi?")
        + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    V3L3: (
        turn("system", V3_SYSTEM + EMPTY_NS)
        + turn("system", CODE)
        + turn("user", "Weather in Hanoi?")
        + "<|start_header_id|>assistant<|end_header_id|>\n\n>>>"
    ),
    V31: (
        turn("system", "Environment: ipython\n\n" + V31_DATE)
        + turn("user", "Weather in Hanoi?")
        + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
}


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_code_interpreter_alone(version: Version) -> None:
    assert (
        render(version, ChatPrompt((QUESTION,), (Tool("code_interpreter"),), choice="auto"))
        == CODE_ONLY[version]
    )


# --- assistant turns: empty content, no content, python calls ---

EDGE_MESSAGES = (
    Message("user", "Go"),
    Message("assistant", "", tool_calls=(ToolCall("python", "print('hi')\nx = 1"),)),
    Message("tool", "hi", name="python"),
    Message("assistant", ""),
    Message("assistant", None),
    Message("assistant", "Done."),
)
EDGE = {
    V1: (
        f"system:\n{EMPTY_NS}<|END_OF_SYSTEM|>\nsystem:\n{CODE}<|END_OF_SYSTEM|>\n"
        "user:\nGo<|END_OF_USER|>\n"
        # v1 tests `content is not None`: "" prints an empty line before the call, and an empty text turn
        "assistant:\n\n<|START_OF_FUNCTION_CALL|>python:\nprint('hi')\nx = 1<|END_OF_FUNCTION_CALL|>\n"
        "function name=python:\nhi<|END_OF_FUNCTION_RESULT|>\n"
        "assistant:\n<|END_OF_ASSISTANT|>\n"
        "assistant:\nDone.<|END_OF_ASSISTANT|>\n"
        "assistant:"
    ),
    V2: (
        f"<|from|>system\n<|recipient|>all\n<|content|>{EMPTY_NS}"
        f"\n<|from|>system\n<|recipient|>all\n<|content|>{CODE}"
        "\n<|from|>user\n<|recipient|>all\n<|content|>Go"
        "\n<|from|>assistant\n<|recipient|>python\n<|content|>print('hi')\nx = 1<|stop|>"
        "\n<|from|>python\n<|recipient|>all\n<|content|>hi"
        "\n<|from|>assistant\n<|recipient|>all\n<|content|>Done.<|stop|>"
        "\n<|from|>assistant\n<|recipient|>"
    ),
    V2L3: (
        turn("system", EMPTY_NS)
        + turn("system", CODE)
        + turn("user", "Go")
        + turn("assistant", "<|reserved_special_token_249|>python\nprint('hi')\nx = 1")
        + turn("tool", "name=python\nhi")
        + turn("assistant", "Done.")
        + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    V3L3: (
        turn("system", V3_SYSTEM + EMPTY_NS)
        + turn("system", CODE)
        + turn("user", "Go")
        + turn("assistant", ">>>python\nprint('hi')\nx = 1")
        + turn("tool", "hi")
        + turn("assistant", ">>>all\nDone.")
        + "<|start_header_id|>assistant<|end_header_id|>\n\n>>>"
    ),
    V31: (
        turn("system", "Environment: ipython\n\n" + V31_DATE)
        + turn("user", "Go")
        + turn("assistant", "<|python_tag|>print('hi')\nx = 1", end="<|eom_id|>")
        + turn("ipython", "hi")
        + turn("assistant", "Done.")
        + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
}


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_empty_assistant_turns_and_python_calls(version: Version) -> None:
    prompt = ChatPrompt(EDGE_MESSAGES, (Tool("code_interpreter"),), choice="auto")
    assert render(version, prompt) == EDGE[version]


def test_v1_text_and_call_in_one_turn() -> None:
    prompt = ChatPrompt(
        (QUESTION, Message("assistant", "Let me check.", tool_calls=(ToolCall("get_weather", "{}"),))),
        (Tool("function", WEATHER),),
        choice="auto",
    )
    assert render(V1, prompt).endswith(
        "assistant:\nLet me check.\n"
        "<|START_OF_FUNCTION_CALL|>get_weather:\n{}<|END_OF_FUNCTION_CALL|>\nassistant:"
    )


# --- errors ---


def test_v1_cannot_render_parallel_calls() -> None:
    calls = (ToolCall("get_weather", '{"location": "Hanoi"}'), ToolCall("get_weather", '{"location": "Hue"}'))
    prompt = ChatPrompt(
        (QUESTION, Message("assistant", None, tool_calls=calls)), (Tool("function", WEATHER),), "auto"
    )
    with pytest.raises(InvalidRequestError) as info:
        render(V1, prompt)
    assert info.value.param == "messages[1].tool_calls"
    assert info.value.status_code == 400
    for version in (V2, V2L3, V3L3, V31):  # every later version prints parallel calls
        assert render(version, prompt).count("Hue") == 1


@pytest.mark.parametrize("version", [V1, V2, V2L3, V3L3])
@pytest.mark.parametrize("legacy, param", [(False, "tools"), (True, "functions")])
def test_unrenderable_schema_is_a_client_error(version: Version, legacy: bool, param: str) -> None:
    bad = Function("bad", "", {"type": "object", "properties": {"a": {"type": "string", "description": 5}}})
    prompt = ChatPrompt((QUESTION,), (Tool("function", bad),), choice="auto", legacy_functions=legacy)
    with pytest.raises(InvalidRequestError) as info:
        render(version, prompt)
    assert info.value.param == param
    assert "bad" in info.value.message


def test_v31_lists_functions_as_json_even_when_the_ts_schema_would_fail() -> None:
    bad = Function("bad", "", {"type": "object", "properties": {"a": {"type": "string", "description": 5}}})
    text = render(V31, ChatPrompt((QUESTION,), (Tool("function", bad),), choice="auto"))
    assert (
        '{"name": "bad", "description": "", "parameters": {"type": "object", '
        '"properties": {"a": {"type": "string", "description": 5}}}}' in text
    )


def test_version_may_be_given_as_a_string() -> None:
    prompt = ChatPrompt((QUESTION,), (Tool("function", WEATHER),), choice="auto")
    for version in ALL_VERSIONS:
        assert render(version.value, prompt) == render(version, prompt)
