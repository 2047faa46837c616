"""What the client asked to be exact → TGI's ``grammar`` parameter (no I/O).

Theory of operation
-------------------
TGI constrains decoding to a JSON schema (``{"type": "json", "value": schema}``, compiled by its router)
or a regex (``{"type": "regex", "value": …}``); once the grammar is complete only the end-of-sequence token
is allowed (PROTOCOL.md, "grammar"; STRUCTURED_OUTPUTS.md §7). :func:`constrain` reads the normalised
:class:`ChatPrompt` (its tool choice and tools), the template :class:`Version` and the request's
``response_format``, and decides that parameter. The prompt is not changed: it already ends with the
tool choice's generation prefix (``render.generation_prefix``; the text prefix when there are no tools or
``tool_choice`` is ``"none"``), and the grammar covers exactly what the model writes after it:

=================================  ====================================================================
choice, response_format            grammar (after the prompt's prefix)
=================================  ====================================================================
auto, none                         none: the model stays free to answer in text or call tools
none (or no tools), json_schema    the text: the schema (JSON grammar when TGI takes it as is, else regex;
                                   regex in v2, see below)
none (or no tools), json_object    the text: any JSON object (regex: TGI's JSON grammar needs
                                   ``properties``)
named                              that call's arguments (JSON grammar where the arguments end the
                                   answer, regex where the call syntax goes on: v3-llama3.1
                                   ``</function>``, v1's call header; v2's leading space)
required                           one call, or several in the version's syntax (one when
                                   ``parallel_tool_calls`` is false or the client used ``functions``),
                                   each a name of the list with its arguments (regex)
auto, json_schema/json_object      one regex: the text branch is the schema, the call branch the calls
=================================  ====================================================================

Per version, the call syntax after the generation prefix (FORMATS.md; ``A`` = the arguments' regex):

============  =========================  ===============================  ===========================
version       one call                   between calls                    text branch (auto)
============  =========================  ===============================  ===========================
v1            ``\\n<|START_OF_FUNCTION_   (one call per turn)              the JSON
              CALL|>name:\\nA``
v2            ``name\\n<|content|>A``     ``\\n<|from|>assistant\\n         ``all\\n<|content|>`` JSON
                                         <|recipient|>``
v2.llama3     ``name\\nA``                ``<|reserved_special_token_249|>``  the JSON
v3.llama3     ``name\\nA``                ``>>>``                          ``all\\n`` JSON
v3-llama3.1   ``name>A</function>``      ``<function=``                   the JSON
============  =========================  ===============================  ===========================

(under required the prefix already holds the first call's start: v2.llama3 the separator, v3-llama3.1
``<function=``; under auto the call branch starts with it). v1 and v2 are SentencePiece models, trained on text
after an added token encoded with a leading ``▁``, which TGI's grammar sees as a space: their regexes allow one
space after each ``<|marker|>``, at the start too in v2 (its prompt ends with ``<|recipient|>`` or
``<|content|>``), so v2's bare JSON is sent as a regex as well; v1's ``\n`` before its call is optional. The code interpreter's call is raw code,
``python`` followed by any text, where the syntax allows it (not under required in v3-llama3.1, whose
prefix is ``<function=``).

Strictness: a schema the regex cannot express (:class:`.schemas.Unexpressible`) is a 400 naming the
keyword when it is strict (``json_schema.strict``, a tool's ``strict: true``), and otherwise the request
goes without a grammar and :attr:`Constraint.warning` says why (the server logs it). With grammar support
off (``--no-grammar``, for a TGI started with ``--disable-grammar-support``) tool choices rely on the
prompt alone, as before, and a JSON ``response_format`` is a 400 that says so.

Worked example: v3.llama3, ``tool_choice: "required"``, one tool ``get_weather(city: string)``; the prompt
ends with ``>>>``::

    constrain(prompt, Version.V3_LLAMA3, None).grammar == {"type": "regex", "value":
        '(?:(?:get_weather\\n(?:\\{[ ]?"city"[ ]?:[ ]?"(…string…)*"[ ]?\\})>>>)*get_weather\\n(?:\\{…\\}))'}

Decisions are remembered per distinct input (a bounded LRU keyed by the tools' JSON), so the same tools send
the same grammar text (TGI's compiled-grammar cache is keyed by it) for the cost of one lookup.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from ..errors import InvalidRequestError
from ..prompting.lru import LRUCache
from ..prompting.types import ChatPrompt, Function, NamedChoice, Version
from . import schemas
from .schemas import MAX_REGEX_CHARS, NO_ARGUMENTS, Unexpressible, any_object_regex, prepare, schema_regex

__all__ = ["Constraint", "Unexpressible", "clear_caches", "constrain"]

_SEP_V2 = "\n<|from|>assistant\n<|recipient|>"
_SEP_LLAMA3 = "<|reserved_special_token_249|>"
_V1_CALL = "\n<|START_OF_FUNCTION_CALL|>"
_CODE = r"[\s\S]*"  # the code interpreter's raw code: anything


@dataclass(frozen=True, slots=True)
class Constraint:
    """The decision for one request: TGI's ``grammar`` parameter (None: none), and why a grammar the
    client asked for is not sent (to log), if so."""

    grammar: dict[str, Any] | None = None
    warning: str | None = None


@dataclass(frozen=True, slots=True)
class _Syntax:
    """One version's call syntax, as literal texts (see the module docstring)."""

    call: str  # one call, "{name}" and "{args}" to fill
    between: str | None  # between two calls; None: one call per turn
    required_lead: str  # what the answer starts with under required, after the prefix
    auto_lead: str  # what the call branch starts with under auto
    text_lead: str  # what the text branch starts with under auto (after the auto prefix)
    # the answer under a named choice, after the prefix: "{args}" to fill, "{call}" for a whole call
    named: str
    python: str | None  # the code interpreter's call under auto/required; None: not possible
    lead_newline_optional: bool = False  # v1: the "\n" after "assistant:" may be left out
    # SentencePiece models (v1 Llama 2, v2 Mistral): text after an added token was trained with a leading "▁",
    # which TGI's grammar sees as a space: one optional space after each <|marker|> (and, v2, at the start:
    # its prompt ends with one)
    spm: bool = False
    starts_after_marker: bool = False

    def lit(self, text: str) -> str:
        """`text` as a regex matching itself (and, for SentencePiece models, a space after each marker)."""
        if not self.spm:
            return _literal(text)
        return "".join(
            _literal(part) + ("[ ]?" if _MARKER.fullmatch(part) else "") for part in _MARKERS.split(text)
        )

    @property
    def start(self) -> str:
        return "[ ]?" if self.starts_after_marker else ""


_SYNTAX: dict[Version, _Syntax] = {
    Version.V1: _Syntax("{name}:\n{args}", None, _V1_CALL, _V1_CALL, "", "{call}", "python:\n", True, spm=True),
    Version.V2: _Syntax("{name}\n<|content|>{args}", _SEP_V2, "", "", "all\n<|content|>", "{args}", "python\n<|content|>",
                        spm=True, starts_after_marker=True),
    Version.V2_LLAMA3: _Syntax("{name}\n{args}", _SEP_LLAMA3, "", _SEP_LLAMA3, "", "{args}", "python\n"),
    Version.V3_LLAMA3: _Syntax("{name}\n{args}", ">>>", "", "", "all\n", "{args}", "python\n"),
    Version.V3_LLAMA31: _Syntax("{name}>{args}</function>", "<function=", "", "<function=", "", "{args}</function>",
                                None),
}  # fmt: skip
# Where the answer is the bare JSON (the named call's arguments; the text), a schema TGI takes as it is
# is sent as a JSON grammar.
_BARE_ARGUMENTS = {v for v, s in _SYNTAX.items() if s.named == "{args}" and not s.starts_after_marker}
_BARE_TEXT = {v for v, s in _SYNTAX.items() if not s.starts_after_marker}


@dataclass(frozen=True, slots=True)
class _Format:
    """The request's ``response_format``, read: ``schema`` None means any JSON object."""

    schema: Mapping[str, Any] | None
    strict: bool
    name: str


def _response_format(raw: Mapping[str, Any] | None) -> _Format | None:
    if raw is None:
        return None
    kind = raw.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return _Format(None, False, "json_object")
    if kind != "json_schema":
        raise InvalidRequestError(
            f"Invalid value for 'response_format.type': {kind!r}. Supported values are: 'text', "
            "'json_object' and 'json_schema'.",
            param="response_format.type",
        )
    spec = raw.get("json_schema")
    if not isinstance(spec, Mapping):
        raise InvalidRequestError(
            "'response_format.json_schema' must be an object with a 'name' and a 'schema'.",
            param="response_format.json_schema",
        )
    schema = spec.get("schema")
    if schema is not None and not isinstance(schema, Mapping):
        raise InvalidRequestError(
            "'response_format.json_schema.schema' must be a JSON Schema object.",
            param="response_format.json_schema.schema",
        )
    name = spec.get("name")
    return _Format(schema or None, spec.get("strict") is True, name if isinstance(name, str) else "response")


def constrain(
    prompt: ChatPrompt,
    version: Version,
    response_format: Mapping[str, Any] | None = None,
    *,
    parallel_tool_calls: bool = True,
    enabled: bool = True,
) -> Constraint:
    """TGI's ``grammar`` for `prompt` rendered for `version` (see the module docstring).

    Raises:
        InvalidRequestError: a bad ``response_format``; a strict schema the grammar cannot express;
            a JSON ``response_format`` while grammar support is off.
    """
    fmt = _response_format(response_format)
    if not enabled:
        if fmt is not None:
            raise InvalidRequestError(
                f"response_format {'json_schema' if fmt.schema is not None else 'json_object'} needs TGI's "
                "grammar support, which this gateway runs without (--no-grammar: its TGI was started with "
                "--disable-grammar-support).",
                param="response_format",
                code="grammar_disabled",
            )
        return Constraint()
    choice = prompt.choice
    if choice == "auto" and fmt is None:
        return Constraint()  # the model stays free: never constrained without a reason
    if choice == "none" and fmt is None:
        return Constraint()
    parallel = parallel_tool_calls and not prompt.legacy_functions
    try:
        key = orjson.dumps(
            [
                version.value,
                choice if isinstance(choice, str) else ["named", choice.name],
                parallel,
                prompt.has_code_interpreter,
                [[f.name, f.parameters, f.strict] for f in prompt.functions],
                None if fmt is None else [fmt.schema, fmt.strict, fmt.name],
            ]
        )
    except orjson.JSONEncodeError:  # nested deeper than orjson's 255 levels: decided, not remembered
        return _decide(prompt, version, fmt, parallel)
    return _DECISIONS.get_or_make(key, lambda: _decide(prompt, version, fmt, parallel))


_DECISIONS: LRUCache[bytes, Constraint] = LRUCache(256)


def clear_caches() -> None:
    """Forget every remembered decision and regex (benchmarks time a cold build with it)."""
    _DECISIONS.clear()
    schemas.clear_caches()


def _decide(prompt: ChatPrompt, version: Version, fmt: _Format | None, parallel: bool) -> Constraint:
    syntax = _SYNTAX[version]
    choice = prompt.choice
    try:
        if isinstance(choice, NamedChoice):
            function = next(f for f in prompt.functions if f.name == choice.name)
            if version in _BARE_ARGUMENTS and (grammar := _json_grammar(function.parameters)) is not None:
                return Constraint(grammar)
            if syntax.named == "{call}":  # v1: no prefix, the whole call
                return Constraint({"type": "regex", "value": _lead(syntax, syntax.required_lead)
                                   + _one_call(syntax, function.name, _arguments(function))})  # fmt: skip
            literal, _, rest = syntax.named.partition("{args}")
            value = syntax.start + syntax.lit(literal) + _arguments(function) + syntax.lit(rest)
            return Constraint({"type": "regex", "value": value})
        if choice == "required":
            calls = _calls(prompt, syntax, version, auto=False, parallel=parallel)
            return _bounded(syntax.start + calls, prompt, fmt)
        assert fmt is not None  # "auto"/"none" without a format returned earlier
        text = _text(fmt)
        if choice == "none":
            if version in _BARE_TEXT and fmt.schema is not None and (grammar := _json_grammar(fmt.schema)):
                return Constraint(grammar)
            return Constraint({"type": "regex", "value": syntax.start + text})
        calls = _calls(prompt, syntax, version, auto=True, parallel=parallel)
        if syntax.start:
            return _bounded(f"{syntax.start}(?:{syntax.lit(syntax.text_lead)}{text}|{calls})", prompt, fmt)
        return _bounded(f"{syntax.lit(syntax.text_lead)}{text}|{calls}", prompt, fmt)
    except _Unconstrained as exc:
        return Constraint(None, str(exc))


def _bounded(regex: str, prompt: ChatPrompt, fmt: _Format | None) -> Constraint:
    """The regex grammar joining several schemas, unless it is longer than TGI can take: then a 400 when a
    schema in it is strict, else no grammar and the reason."""
    if len(regex) <= MAX_REGEX_CHARS:
        return Constraint({"type": "regex", "value": regex})
    message = (
        f"the grammar of these tools would be {len(regex):,} characters, more than {MAX_REGEX_CHARS:,} (TGI's "
        "request size and its grammar compilation): send fewer or smaller tools"
    )
    if any(f.strict for f in prompt.functions) or (fmt is not None and fmt.strict):
        raise InvalidRequestError(f"Cannot enforce the tool choice: {message}.", param="tools")
    raise _Unconstrained(f"tool choice sent without a grammar: {message}")


_META = re.compile(r"[\\.^$|?*+()\[\]{}]")
_MARKER = re.compile(r"<\|[a-z_]+\|>", re.IGNORECASE)
_MARKERS = re.compile(r"(<\|[a-z_]+\|>)", re.IGNORECASE)


def _literal(text: str) -> str:
    """`text` as a regex matching itself, in the syntax every engine on the way reads alike (Python's
    ``re``, interegular in TGI's shard, Rust's ``regex``): metacharacters escaped, a newline as ``\\n``."""
    return _META.sub(lambda m: "\\" + m[0], text).replace("\n", "\\n")


class _Unconstrained(Exception):
    """A non-strict schema the grammar cannot express: the request goes without a grammar."""


def _json_grammar(schema: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """TGI's JSON grammar for `schema` when TGI's router takes it as it is (a top-level ``properties``, no
    keyword it compiles differently); else None (a regex is sent). The schema is checked either way."""
    if schema is None:
        return None
    try:
        prepared = prepare(schema)
        schema_regex(schema)  # outlines-core must build it too
    except Unexpressible:
        return None  # the caller's regex path reports it with its context
    return {"type": "json", "value": prepared.schema} if prepared.portable else None


def _text(fmt: _Format) -> str:
    if fmt.schema is None:
        return f"(?:{any_object_regex()})"
    try:
        return f"(?:{schema_regex(fmt.schema)})"
    except Unexpressible as exc:
        if fmt.strict:
            raise InvalidRequestError(
                f"Invalid schema for response_format '{fmt.name}': {exc}.",
                param="response_format.json_schema.schema",
                code="invalid_json_schema",
            ) from None
        raise _Unconstrained(
            f"response_format '{fmt.name}' is sent without a grammar (not strict): {exc}"
        ) from None


def _arguments(function: Function) -> str:
    if not function.parameters:
        return NO_ARGUMENTS
    try:
        return f"(?:{schema_regex(function.parameters)})"
    except Unexpressible as exc:
        if function.strict:
            raise InvalidRequestError(
                f"Invalid schema for function '{function.name}': {exc}.",
                param="tools",
                code="invalid_function_parameters",
            ) from None
        raise _Unconstrained(
            f"tool choice sent without a grammar: function '{function.name}' is not strict and {exc}"
        ) from None


def _calls(prompt: ChatPrompt, syntax: _Syntax, version: Version, *, auto: bool, parallel: bool) -> str:
    """One call or several (`parallel`), each a function of the prompt's with its arguments."""
    lead = syntax.auto_lead if auto else syntax.required_lead
    branches = [_one_call(syntax, f.name, _arguments(f)) for f in prompt.functions]
    if prompt.has_code_interpreter and syntax.python is not None:
        branches.append(syntax.lit(syntax.python) + _CODE)
    call = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
    calls = f"{_lead(syntax, lead)}{_repeated(syntax, call, parallel)}"
    if version is Version.V3_LLAMA31 and prompt.has_code_interpreter and auto:
        # Llama 3.1's code interpreter call is not a <function=…> (under required, the prefix is).
        calls += f"|{_literal('<|python_tag|>')}{_CODE}"
    return f"(?:{calls})"


def _lead(syntax: _Syntax, lead: str) -> str:
    if syntax.lead_newline_optional and lead.startswith("\n"):
        return "\\n?" + syntax.lit(lead[1:])
    return syntax.lit(lead)


def _repeated(syntax: _Syntax, call: str, parallel: bool) -> str:
    """One call, or several with the separator between them, written ``(call sep)* call``: TGI's shard
    (interegular) builds the same language from ``call (sep call)*`` with twice the states, 1.4× slower."""
    if not parallel or syntax.between is None:
        return call
    return f"(?:{call}{syntax.lit(syntax.between)})*{call}"


def _one_call(syntax: _Syntax, name: str, args: str) -> str:
    before, _, after = syntax.call.partition("{args}")
    return syntax.lit(before.format(name=name)) + args + syntax.lit(after)
