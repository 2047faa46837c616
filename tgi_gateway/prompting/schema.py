"""Functionary's TypeScript-like function schema, and local ``$ref`` resolution.

Theory of operation
-------------------
Functionary models v1–v3.llama3 see their tools as a TypeScript-like namespace (FORMATS.md §3)::

    // Supported function definitions that should be called when necessary.
    namespace functions {

    // Get the weather
    type get_weather = (_: {
    // The city.
    location: string,
    }) => any;

    } // namespace functions

The models were trained on the exact text of functionary's jinja macro ``generate_schema_from_functions``
(``json_to_ts_schema.txt``, spliced into every HEAD template and into the hub's medium-v3.2 template), so
:func:`ts_schema` is a port of that macro, quirks included. :class:`_Macros` has one method per jinja macro,
with the macro's name and structure, and builds the same string the macro outputs, piece by piece:

* a value the macro prints (``{{ v }}``, ``~``, ``|string``, ``|join``) is printed with Python ``str()``
  (``True``, ``None``, ``['a']``, ``1.0``), as jinja does;
* the macro's sentinel ``"<|NONE|>"`` is kept (a ``format`` that *is* that string counts as no format);
* jinja's leniency is reproduced where it gives a defined result for JSON input: a missing key is
  "undefined", i.e. falsy; ``required`` is tested with ``in`` whenever it is iterable (a string does
  substring tests, an object tests its keys); ``|unique`` is case-insensitive and uses Python equality.

Where the macro would fail (``properties`` that is not an object, a non-string ``description``, ``examples``
that is not an array, unhashable ``oneOf`` types, ...) or where its result would hinge on jinja internals
rather than on the schema (``items``/``oneOf``/``enum`` of the wrong JSON type), :class:`SchemaError` is
raised instead; it is the only exception bad input can cause.

``flavor="python"`` is the v1 variant (functionary's Python generator ``functionary/schema.py``): a
parameter with neither ``type`` nor ``oneOf`` is typed ``any`` instead of nothing, and examples are printed
without replacing ``'`` by ``"``; everything else is identical.

:func:`resolve_refs` replaces local ``$ref``\\ s the way functionary's ``jsonref.replace_refs`` (default
options) followed by ``deepcopy`` does: the reference object is replaced by its target resolved in turn (its
other keys are dropped), pointers are resolved against the parameters object, and references met on the way are
followed. Cycles and non-local references raise :class:`SchemaError`; nothing is ever fetched. The result is
equal to functionary's, but each target is resolved once and shared by its uses, so the work is linear in the
definition however much it expands.

The expansion budget
--------------------
What a request's schemas expand to is bounded by its own size (:class:`ExpansionBudget`: 8 × the JSON size of
its tool definitions + 65,536 characters). :func:`resolve` spends each resolved definition's expanded JSON size,
known bottom-up and checked at the first node that crosses what is left; :func:`function_block` spends the
characters of each declaration piece by piece as it prints them (its indentation grows with depth, so a deep
schema prints far more than its JSON). Either refuses with :class:`ExpansionError` before doing more work than
the budget. Example: 11 definitions each referring to the next twice (1.2 KB) expand to ~280 KB of
declarations; the budget of a request with only that tool is ~77,000 characters: refused after ~0.2 ms.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal
from urllib.parse import unquote, urldefrag

from .lru import LRUCache
from .types import Function

__all__ = [
    "ExpansionBudget",
    "ExpansionError",
    "SchemaError",
    "function_block",
    "json_size",
    "resolve",
    "resolve_refs",
    "ts_schema",
]


class SchemaError(ValueError):
    """A function schema that cannot be rendered (or whose ``$ref``\\ s cannot be resolved)."""

    @classmethod
    def too_deep(cls) -> SchemaError:
        return cls("schema is nested too deeply")

    @classmethod
    def cyclic(cls, ref: Mapping[str, Any]) -> SchemaError:
        return cls(f"cyclic $ref {ref['$ref']!r}")

    @classmethod
    def bad_items(cls) -> SchemaError:
        return cls("'items' must be a schema object")


class ExpansionError(SchemaError):
    """The schemas expand beyond their :class:`ExpansionBudget` (a property of the request, not of one
    function: its message names no function)."""


# ------------------------------------------------------------------------------------------------
# The expansion budget
# ------------------------------------------------------------------------------------------------

# What a request's tool schemas may expand to: EXPANSION_FACTOR times the JSON size of its tool definitions,
# plus EXPANSION_ALLOWANCE (why these numbers: docs/operations.md, "Request limits").
EXPANSION_FACTOR = 8
EXPANSION_ALLOWANCE = 65_536


class ExpansionBudget:
    """The characters a request's tool schemas may expand to, spent as the work is done.

    One budget per request (or per schema, for :func:`resolve_refs` alone). :func:`resolve` spends the
    JSON size of each resolved definition, :func:`function_block` the characters of each TypeScript-like
    declaration it prints; both refuse (:class:`SchemaError`) the moment a node or a printed piece would
    cross what is left, so the work done before a refusal is at most the budget, never the expansion.
    """

    __slots__ = ("basis", "left", "limit")

    def __init__(self, limit: int, basis: str = "") -> None:
        self.limit = self.left = limit
        self.basis = basis  # how the limit was set, for the error message

    @classmethod
    def for_definitions(cls, chars: int, what: str = "the tool definitions") -> ExpansionBudget:
        """EXPANSION_FACTOR × `chars` (the JSON size of `what`) + EXPANSION_ALLOWANCE."""
        return cls(
            EXPANSION_FACTOR * chars + EXPANSION_ALLOWANCE,
            f"{EXPANSION_FACTOR} × the {chars:,} characters of {what} + {EXPANSION_ALLOWANCE:,}",
        )

    def check(self, chars: int) -> None:
        """Raise unless `chars` more characters fit."""
        if chars > self.left:
            raise ExpansionError(
                f"the tool schemas are too large once expanded: more than {self.limit:,} characters "
                f"({self.basis})"
                if self.basis
                else f"the tool schemas are too large once expanded: more than {self.limit:,} characters"
            )

    def spend(self, chars: int) -> None:
        """Take `chars` characters, or raise (nothing taken) if they do not fit."""
        self.check(chars)
        self.left -= chars


# ------------------------------------------------------------------------------------------------
# $ref resolution
# ------------------------------------------------------------------------------------------------


def resolve_refs(parameters: dict, budget: ExpansionBudget | None = None) -> dict:
    """A new dict: `parameters` with every local ``$ref`` replaced by its target.

    ``{"$ref": "#/$defs/x", "description": "..."}`` becomes (a value equal to) ``parameters["$defs"]["x"]``
    resolved in turn (sibling keys dropped, as jsonref does); the ``$defs``/``definitions`` key itself
    stays. Pointers (``#``, ``#/$defs/x``, ``#/properties/a~1b/items``, percent-escapes) are resolved
    relative to `parameters`. The result's containers are new, and each one is made once: a target met
    through several references is one shared object (the result is read-only, never mutated).

    Raises:
        SchemaError: a cyclic reference, a non-local one (another document or a URL), a pointer that
            does not resolve, or a result larger than `budget` (by default: one for this schema alone,
            :meth:`ExpansionBudget.for_definitions` of its own JSON size).
    """
    return resolve(parameters, budget)[0]


def resolve(parameters: dict, budget: ExpansionBudget | None = None) -> tuple[dict, int]:
    """:func:`resolve_refs`, and the JSON size of its result *expanded* (every shared target counted at
    each of its uses), which is spent from `budget`.

    The work is linear in the size of `parameters`, whatever the expansion: each container is resolved
    once, and its expanded size is the sum of its parts' sizes. Each size is checked against what is
    left of `budget` as soon as it is known, so an expansion too large is refused at the first node that
    crosses it. The size is that of ``json.dumps(result)`` up to escapes (a string counts its characters
    and quotes).
    """
    if not isinstance(parameters, Mapping):
        raise SchemaError("parameters must be a JSON object")
    try:
        if budget is None:
            budget = ExpansionBudget.for_definitions(json_size(parameters), "this schema")
        result, size = _RefResolver(parameters, budget).copy(parameters)
    except RecursionError:
        raise SchemaError.too_deep() from None
    if not isinstance(result, dict):
        raise SchemaError("parameters must resolve to a JSON object")
    budget.spend(size)
    return result, size


def _scalar_size(node: Any) -> int:
    if type(node) is str:
        return len(node) + 2
    if node is None or node is True or node is False:
        return 5
    return len(repr(node)) if type(node) in (int, float) else len(str(node)) + 2


def json_size(node: Any) -> int:
    """The JSON size of `node` as written (references not followed): what a definition weighs, for a value
    orjson cannot encode (a caller's own Mapping, nesting deeper than orjson's 255 levels).

    Raises:
        RecursionError: nesting deeper than Python's recursion limit allows."""
    if isinstance(node, Mapping):
        return 2 + sum(len(str(key)) + 6 + json_size(value) for key, value in node.items())
    if isinstance(node, (list, tuple)):
        return 2 + sum(2 + json_size(value) for value in node)
    return _scalar_size(node)


def _is_ref(node: Any) -> bool:
    return isinstance(node, Mapping) and isinstance(node.get("$ref"), str)


class _RefResolver:
    """jsonref's algorithm on a plain document: copy, replacing each reference object by its target.

    Each container of the document is resolved once (`done`, by identity: the document is alive, so ids
    are stable); the references being expanded are in `expanding`, and meeting one of them again is a
    cycle. Every node visited and every pointer step spends one step of `steps`, bounded by the budget's
    limit (at least the document's size), so no pointer chain can make the work grow beyond it.
    """

    def __init__(self, root: Any, budget: ExpansionBudget) -> None:
        self.root = root
        self.largest = budget.left  # no node may be larger once expanded
        self.budget = budget
        self.steps = budget.limit
        self.done: dict[int, tuple[Any, int]] = {}
        self.expanding: set[int] = set()

    def copy(self, node: Any) -> tuple[Any, int]:
        """(`node` with references replaced, its expanded JSON size)."""
        self._step()
        kind = type(node)
        if kind is dict or (kind is not list and kind is not str and isinstance(node, Mapping)):
            key = id(node)
            done = self.done.get(key)
            if done is not None:
                return done
            if isinstance(node.get("$ref"), str):
                if key in self.expanding:
                    raise SchemaError.cyclic(node)
                self.expanding.add(key)
                result = self.copy(self.lookup(node, frozenset()))
                self.expanding.discard(key)
            else:
                out, size = {}, 2
                for name, value in node.items():
                    out[name], value_size = self.copy(value)
                    size += len(name if type(name) is str else str(name)) + 6 + value_size
                self._check(size)
                result = (out, size)
            self.done[key] = result
            return result
        if kind is list or kind is tuple:
            key = id(node)
            done = self.done.get(key)
            if done is not None:
                return done
            items, size = [], 2
            for value in node:
                item, item_size = self.copy(value)
                items.append(item)
                size += 2 + item_size
            self._check(size)
            self.done[key] = result = (items, size)
            return result
        return node, _scalar_size(node)

    def lookup(self, ref: Mapping[str, Any], resolving: frozenset[int]) -> Any:
        """The node `ref` points at (possibly itself a reference object, which the caller follows).

        Walking the pointer follows the references it passes through, except `ref` itself: jsonref reads
        a pointer that goes *into* the reference object as pointing into its own keys.
        """
        pointer_text = ref["$ref"]
        uri, fragment = urldefrag(pointer_text)
        if uri:
            raise SchemaError(f"only local $refs ('#/...') are supported, not {pointer_text!r}")
        resolving = resolving | {id(ref)}
        parts = unquote(fragment.lstrip("/")).split("/") if fragment else []
        document: Any = self.root
        for raw_part in parts:
            self._step()
            part: Any = raw_part.replace("~1", "/").replace("~0", "~")
            if document is not ref:
                document = self._follow(document, resolving)
            if isinstance(document, (list, tuple, str)):
                try:
                    part = int(part)
                except ValueError:
                    pass
            try:
                document = document[part]
            except (TypeError, LookupError):
                raise SchemaError(f"unresolvable $ref {pointer_text!r}") from None
        return document

    def _follow(self, node: Any, resolving: frozenset[int]) -> Any:
        while _is_ref(node):
            if id(node) in resolving:
                raise SchemaError.cyclic(node)
            resolving = resolving | {id(node)}
            node = self.lookup(node, resolving)
        return node

    def _check(self, size: int) -> None:
        if size > self.largest:
            self.budget.check(size)  # raises, naming the budget

    def _step(self) -> None:
        self.steps -= 1
        if self.steps < 0:
            raise SchemaError(
                f"schema too complex to resolve: more than {self.budget.limit:,} steps ({self.budget.basis})"
            )


# ------------------------------------------------------------------------------------------------
# The TypeScript-like schema
# ------------------------------------------------------------------------------------------------

_HEADER = "// Supported function definitions that should be called when necessary.\nnamespace functions {\n\n"
_FOOTER = "} // namespace functions"
_NONE = "<|NONE|>"  # the macro's "nothing" sentinel
_LIMITS = (
    ("maximum", "Maximum"),
    ("minimum", "Minimum"),
    ("maxLength", "Maximum length"),
    ("minLength", "Minimum length"),
)


def ts_schema(functions: Iterable[Function], *, flavor: Literal["jinja", "python"] = "jinja") -> str:
    """The ``namespace functions {...}`` text for `functions`, byte for byte as functionary renders it:
    the namespace's header, each function's :func:`function_block`, the footer.

    Functions without a name are skipped (the macro skips the code interpreter that way). An empty
    iterable gives the empty namespace.

    Raises:
        SchemaError: a schema the macro cannot render.
    """
    if flavor not in ("jinja", "python"):
        raise ValueError(f"unknown schema flavor {flavor!r}")
    return _HEADER + "".join(function_block(function, flavor=flavor) for function in functions) + _FOOTER


# Declarations printed, keyed by the function object's identity and the flavour; the value keeps the object
# alive, so no other object can have its id while its entry lives. `normalize` prints the jinja flavour of
# each new function (to refuse what cannot be printed) and hands out the same Function objects for the same
# definitions, so the renderers find a conversation's declarations here.
_BLOCKS: LRUCache[tuple[int, str], tuple[Function, str]] = LRUCache(1024)


def function_block(
    function: Function, *, flavor: Literal["jinja", "python"] = "jinja", budget: ExpansionBudget | None = None
) -> str:
    """One function's declaration in the namespace (``// description\ntype name = ...;\n\n``), or ``""``
    for a function without a name; remembered per function object and flavour.

    With a `budget`, its characters are spent from it, piece by piece as they are printed: a declaration
    that would not fit is abandoned at the first piece that crosses it.

    Raises:
        SchemaError: a schema the macro cannot render, or one that does not fit `budget`.
    """
    if flavor not in ("jinja", "python"):
        raise ValueError(f"unknown schema flavor {flavor!r}")
    key = (id(function), flavor)
    known = _BLOCKS.get(key)
    if known is not None:
        if budget is not None:
            budget.spend(len(known[1]))
        return known[1]
    macros = _Macros(
        untyped="any" if flavor == "python" else "", quote_examples=flavor == "jinja", budget=budget
    )
    try:
        text = macros.function_declaration(function)
    except RecursionError:
        raise SchemaError.too_deep() from None
    _BLOCKS.put(key, (function, text))
    return text


def _is_iterable(value: Any) -> bool:
    """jinja's ``is iterable`` test."""
    try:
        iter(value)
    except TypeError:
        return False
    return True


def _offset(depth: int) -> str:
    return "    " * depth


class _Macros:
    """The macros of ``json_to_ts_schema.txt``, one method each."""

    def __init__(self, *, untyped: str, quote_examples: bool, budget: ExpansionBudget | None = None) -> None:
        self.untyped = untyped  # what get_param_type gives a parameter with neither type nor oneOf
        self.quote_examples = quote_examples  # the macro prints examples with ' replaced by "
        self.budget = budget  # spent as pieces are printed (each character once, nested text included)

    def _spend(self, chars: int) -> None:
        if self.budget is not None:
            self.budget.spend(chars)

    def function_declaration(self, function: Function) -> str:
        """The loop body of the macro ``generate_schema_from_functions``, for one function."""
        name, description, parameters = function.name, function.description, function.parameters
        if not name:
            return ""
        if not isinstance(name, str) or not isinstance(description, str):
            raise SchemaError(f"function name and description must be strings ({name!r})")
        head = f"// {description}\ntype {name}"
        self._spend(len(head))
        if parameters and not isinstance(parameters, Mapping):
            raise SchemaError(f"function {name!r}: parameters must be a JSON object")
        if parameters and parameters.get("properties"):
            try:
                body = self.get_parameter_typescript(
                    parameters["properties"], parameters.get("required", []), 0
                )
            except ExpansionError:
                raise
            except SchemaError as exc:
                raise SchemaError(f"function {name!r}: {exc}") from None
            tail = " = (_: {" + body + "\n}) => any;\n\n"
            self._spend(len(tail) - len(body))
        else:
            tail = " = () => any;\n\n"
            self._spend(len(tail))
        return head + tail

    def get_parameter_typescript(self, properties: Any, required: Any, depth: int) -> str:
        if not isinstance(properties, Mapping):
            raise SchemaError(f"'properties' must be a JSON object, not {type(properties).__name__}")
        check_required = _is_iterable(required)
        if isinstance(required, list):  # `name in required` with list semantics, without a scan per name
            required = {item for item in required if isinstance(item, str)}
        offset = _offset(depth)
        out: list[str] = []
        for name, param in properties.items():
            if not isinstance(param, Mapping):
                continue
            if not isinstance(name, str):
                raise SchemaError(f"property names must be strings, not {name!r}")
            printed, nested = len(out), 0  # this property's pieces start at out[printed]
            comment = self.get_param_info(param)
            examples: list[Any] = []
            if "examples" in param:
                if not isinstance(param["examples"], list):
                    raise SchemaError(f"'examples' of {name!r} must be an array")
                examples = [f"Example {name}:", *param["examples"]]
            declaration = name
            if check_required and name not in required:
                declaration += "?"
            param_type = self.get_param_type(param)

            if param_type == "object":
                if comment != _NONE:
                    out.append("\n" + offset + comment)
                out.extend(self._example_lines(examples, offset))
                out.append("\n" + offset + declaration + ": {")
                self._spend(sum(map(len, out[printed:])))  # before the nested text: it spends its own
                printed = len(out) + 1
                inner = self.get_parameter_typescript(
                    param.get("properties", {}), param.get("required", []), depth + 1
                )
                out.append(inner)
                out.append("\n" + offset + "},")
            elif param_type == "array":
                if not self._has_type(param.get("items", {})):
                    out.append(self.append_new_param_info(declaration + ": [],", comment, examples, depth))
                else:
                    if comment != _NONE:
                        out.append("\n" + offset + comment)
                    out.extend(self._example_lines(examples, offset))
                    array_declaration = self.get_array_typescript(declaration, param, depth)
                    nested = len(array_declaration)  # spent by get_array_typescript
                    if not array_declaration.endswith(","):
                        array_declaration += ","
                    out.append(array_declaration)
            else:
                if "enum" in param:
                    param_type = self.get_enum_option_str(param["enum"])
                if param.get("nullable"):
                    param_type += " | null"
                out.append(
                    self.append_new_param_info(
                        declaration + ": " + param_type + ",", comment, examples, depth
                    )
                )
            self._spend(sum(map(len, out[printed:])) - nested)
        return "".join(out)

    def append_new_param_info(self, declaration: str, comment: str, examples: list[Any], depth: int) -> str:
        """A scalar or untyped-array parameter: its examples are printed only below a comment line."""
        offset = _offset(depth)
        out = []
        if comment != _NONE:
            out.append("\n" + offset + comment)
            out.extend(self._example_lines(examples, offset))
        out.append("\n" + offset + declaration)
        return "".join(out)

    def _example_lines(self, examples: list[Any], offset: str) -> list[str]:
        if self.quote_examples:
            return ["\n" + offset + "// " + str(example).replace("'", '"') for example in examples]
        return ["\n" + offset + "// " + str(example) for example in examples]

    def get_param_type(self, param: Mapping[str, Any]) -> str:
        if "type" in param:
            raw = param["type"]
            if not isinstance(raw, str) and _is_iterable(
                raw
            ):  # a list of types (or, jinja being jinja, an object's keys)
                raw = " | ".join(str(t) for t in raw)
            return self.convert_data_type(raw)
        if "oneOf" in param:
            seen: set[Any] = set()
            types = []
            for item in self._one_of(param):
                if "type" not in item:
                    continue
                key = (
                    item["type"].lower() if isinstance(item["type"], str) else item["type"]
                )  # |unique ignores case
                try:
                    is_new = key not in seen
                except TypeError:
                    raise SchemaError(f"oneOf type {item['type']!r} is not a plain value") from None
                if is_new:
                    seen.add(key)
                    types.append(item["type"])
            return self.convert_data_type(" | ".join(str(t) for t in types))
        return self.untyped

    @staticmethod
    def convert_data_type(param_type: Any) -> str:
        # Compares the whole string: "integer | null" stays as it is.
        if param_type == "integer" or param_type == "float":
            return "number"
        return str(param_type)

    @staticmethod
    def _one_of(param: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        one_of = param["oneOf"]
        if not isinstance(one_of, list) or not all(isinstance(item, Mapping) for item in one_of):
            raise SchemaError("'oneOf' must be an array of schema objects")
        return one_of

    def get_format_param(self, param: Mapping[str, Any]) -> str:
        if "format" in param:
            return str(param["format"])
        if "oneOf" in param:
            one_of = self._one_of(param)
            out = []
            for item in one_of:
                if "format" not in item:
                    continue
                # The separator is decided by comparing with the LAST item's format (undefined, i.e.
                # equal to nothing, when the last item has none): an item with that same format gets
                # no " or ", every other item gets one, even the last formatted item.
                last = one_of[-1]
                if "format" in last and item["format"] == last["format"]:
                    out.append(str(item["format"]))
                elif isinstance(item["format"], str):
                    out.append(item["format"] + " or ")
                else:
                    raise SchemaError(f"oneOf format {item['format']!r} must be a string")
            return "".join(out)  # "" without any format: still counts as a format (" Format=")
        return _NONE

    def get_param_info(self, param: Mapping[str, Any]) -> str:
        """The ``// ...`` comment line, or the sentinel when there is nothing to say."""
        format_param = self.get_format_param(param)
        if not (
            "description" in param
            or "default" in param
            or format_param != _NONE
            or any(param.get(field) for field, _ in _LIMITS)
        ):
            return _NONE
        out = ["//"]
        if "description" in param:
            description = param["description"]
            if not isinstance(description, str):
                raise SchemaError(f"'description' must be a string, not {type(description).__name__}")
            out.append(" " + (description if description.endswith(".") else description + "."))
        if "default" in param:
            default = str(param["default"])
            if param.get("type", "any") == "string":
                default = '"' + default + '"'
            out.append(" Default=" + default + ".")
        if format_param != _NONE:
            out.append(" Format=" + format_param)
        for field, label in _LIMITS:
            if field in param:
                out.append(f" {label}={param[field]}")
        return "".join(out)

    @staticmethod
    def get_enum_option_str(options: Any) -> str:
        if not isinstance(options, list):
            raise SchemaError("'enum' must be an array")
        out = []
        for value in options:
            out.append('"' + value + '"' if isinstance(value, str) else str(value))
            if value != options[-1]:  # Python ==: no separator after any option equal to the last one
                out.append(" | ")
        return "".join(out)

    @staticmethod
    def _has_type(items: Any) -> bool:
        """The macro's ``"type" in item_info``, for the JSON types where that test means something."""
        if isinstance(items, Mapping):
            return "type" in items
        if isinstance(items, (list, str)) and "type" not in items:
            return False  # e.g. tuple-style "items": [...] renders as an untyped array
        raise SchemaError.bad_items()

    def get_array_typescript(self, name: str | None, param: Mapping[str, Any], depth: int) -> str:
        """`name` is the declaration (``"tags?"``), or None for an array nested in an array."""
        text, nested = self._array_typescript(name, param, depth)
        self._spend(max(0, len(text) - nested))
        return text

    def _array_typescript(self, name: str | None, param: Mapping[str, Any], depth: int) -> tuple[str, int]:
        """(the macro's text, how much of it nested calls printed and spent already)."""
        offset = _offset(depth)
        items = param.get("items", {})
        if isinstance(items, Mapping):
            if len(items) == 0:
                return "\n" + offset + (name + ": []" if name else "[]"), 0
            array_type = self.get_param_type(items)
        elif isinstance(items, (list, str)) and not any(key in items for key in ("type", "oneOf", "enum")):
            # tuple-style "items": [...]: the macro finds no keyword in it, so the items are untyped
            if len(items) == 0:
                return "\n" + offset + (name + ": []" if name else "[]"), 0
            array_type, items = self.untyped, {}
        else:
            raise SchemaError.bad_items()
        if array_type == "object":
            children = self.get_parameter_typescript(
                items.get("properties", {}), items.get("required", []), depth + 1
            )
            text = "\n" + offset + (name + ": {" if name else "{") + children + "\n" + offset + "}[]"
            return text, len(children)
        if array_type == "array":
            inner = self.get_array_typescript(None, items, depth + 1)
            if not name:
                return "\n" + inner + "[]", len(inner)
            return "\n" + offset + name + ": " + inner.strip() + "[]", len(inner)
        if "enum" in items:
            options = self.get_enum_option_str(items["enum"])
            if name is None:
                return "(" + options + ")[]", 0
            return "\n" + offset + name + ": (" + options + ")[]", 0
        if name is None:
            return "\n" + array_type + "[]", 0
        return "\n" + offset + name + ": " + array_type + "[],", 0
