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
options) followed by ``deepcopy`` does: the reference object is replaced by a copy of its target (its other
keys are dropped), pointers are resolved against the parameters object, and references met on the way are
followed. Cycles and non-local references raise :class:`SchemaError`; nothing is ever fetched.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal
from urllib.parse import unquote, urldefrag

from .types import Function

__all__ = ["SchemaError", "resolve_refs", "ts_schema"]


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


# ------------------------------------------------------------------------------------------------
# $ref resolution
# ------------------------------------------------------------------------------------------------


def resolve_refs(parameters: dict) -> dict:
    """A new dict: `parameters` with every local ``$ref`` replaced by a deep copy of its target.

    ``{"$ref": "#/$defs/x", "description": "..."}`` becomes a copy of ``parameters["$defs"]["x"]``
    (sibling keys dropped, as jsonref does); the ``$defs``/``definitions`` key itself stays. Pointers
    (``#``, ``#/$defs/x``, ``#/properties/a~1b/items``, percent-escapes) are resolved relative to
    `parameters`.

    Raises:
        SchemaError: a cyclic reference, a non-local one (another document or a URL), or a pointer
            that does not resolve.
    """
    if not isinstance(parameters, Mapping):
        raise SchemaError("parameters must be a JSON object")
    try:
        result = _RefResolver(parameters).copy(parameters, ())
    except RecursionError:
        raise SchemaError.too_deep() from None
    if not isinstance(result, dict):
        raise SchemaError("parameters must resolve to a JSON object")
    return result


# jsonref + deepcopy share a target between its references; a plain copy expands it at every use, so a
# small schema whose definitions reference each other twice per level would grow exponentially.
_MAX_NODES = 100_000


def _is_ref(node: Any) -> bool:
    return isinstance(node, Mapping) and isinstance(node.get("$ref"), str)


class _RefResolver:
    """jsonref's algorithm on a plain document: copy, replacing each reference object by its target."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self.budget = _MAX_NODES  # every node copied and every pointer step spends one

    def copy(self, node: Any, expanding: tuple[int, ...]) -> Any:
        """A deep copy of `node` with references replaced; `expanding` = the references being copied."""
        self._spend()
        if _is_ref(node):
            if id(node) in expanding:
                raise SchemaError.cyclic(node)
            target = self.lookup(node, frozenset())
            return self.copy(target, expanding + (id(node),))
        if isinstance(node, Mapping):
            return {key: self.copy(value, expanding) for key, value in node.items()}
        if isinstance(node, (list, tuple)):
            return [self.copy(value, expanding) for value in node]
        return node

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
            self._spend()
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

    def _spend(self) -> None:
        self.budget -= 1
        if self.budget < 0:
            raise SchemaError(f"schema too large once its $refs are resolved (more than {_MAX_NODES} nodes)")


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
    """The ``namespace functions {...}`` text for `functions`, byte for byte as functionary renders it.

    Functions without a name are skipped (the macro skips the code interpreter that way). An empty
    iterable gives the empty namespace.

    Raises:
        SchemaError: a schema the macro cannot render.
    """
    if flavor not in ("jinja", "python"):
        raise ValueError(f"unknown schema flavor {flavor!r}")
    macros = _Macros(untyped="any" if flavor == "python" else "", quote_examples=flavor == "jinja")
    try:
        return macros.generate_schema_from_functions(functions)
    except RecursionError:
        raise SchemaError.too_deep() from None


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

    def __init__(self, *, untyped: str, quote_examples: bool) -> None:
        self.untyped = untyped  # what get_param_type gives a parameter with neither type nor oneOf
        self.quote_examples = quote_examples  # the macro prints examples with ' replaced by "

    def generate_schema_from_functions(self, functions: Iterable[Function]) -> str:
        out = [_HEADER]
        for function in functions:
            name, description, parameters = function.name, function.description, function.parameters
            if not name:
                continue
            if not isinstance(name, str) or not isinstance(description, str):
                raise SchemaError(f"function name and description must be strings ({name!r})")
            out.append(f"// {description}\ntype {name}")
            if parameters and not isinstance(parameters, Mapping):
                raise SchemaError(f"function {name!r}: parameters must be a JSON object")
            if parameters and parameters.get("properties"):
                try:
                    body = self.get_parameter_typescript(
                        parameters["properties"], parameters.get("required", []), 0
                    )
                except SchemaError as exc:
                    raise SchemaError(f"function {name!r}: {exc}") from None
                out.append(" = (_: {" + body + "\n}) => any;\n\n")
            else:
                out.append(" = () => any;\n\n")
        out.append(_FOOTER)
        return "".join(out)

    def get_parameter_typescript(self, properties: Any, required: Any, depth: int) -> str:
        if not isinstance(properties, Mapping):
            raise SchemaError(f"'properties' must be a JSON object, not {type(properties).__name__}")
        check_required = _is_iterable(required)
        offset = _offset(depth)
        out = []
        for name, param in properties.items():
            if not isinstance(param, Mapping):
                continue
            if not isinstance(name, str):
                raise SchemaError(f"property names must be strings, not {name!r}")
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
                out.append(
                    self.get_parameter_typescript(
                        param.get("properties", {}), param.get("required", []), depth + 1
                    )
                )
                out.append("\n" + offset + "},")
            elif param_type == "array":
                if not self._has_type(param.get("items", {})):
                    out.append(self.append_new_param_info(declaration + ": [],", comment, examples, depth))
                else:
                    if comment != _NONE:
                        out.append("\n" + offset + comment)
                    out.extend(self._example_lines(examples, offset))
                    array_declaration = self.get_array_typescript(declaration, param, depth)
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
        offset = _offset(depth)
        items = param.get("items", {})
        if isinstance(items, Mapping):
            if len(items) == 0:
                return "\n" + offset + (name + ": []" if name else "[]")
            array_type = self.get_param_type(items)
        elif isinstance(items, (list, str)) and not any(key in items for key in ("type", "oneOf", "enum")):
            # tuple-style "items": [...]: the macro finds no keyword in it, so the items are untyped
            if len(items) == 0:
                return "\n" + offset + (name + ": []" if name else "[]")
            array_type, items = self.untyped, {}
        else:
            raise SchemaError.bad_items()
        if array_type == "object":
            children = self.get_parameter_typescript(
                items.get("properties", {}), items.get("required", []), depth + 1
            )
            return "\n" + offset + (name + ": {" if name else "{") + children + "\n" + offset + "}[]"
        if array_type == "array":
            inner = self.get_array_typescript(None, items, depth + 1)
            if not name:
                return "\n" + inner + "[]"
            return "\n" + offset + name + ": " + inner.strip() + "[]"
        if "enum" in items:
            options = self.get_enum_option_str(items["enum"])
            if name is None:
                return "(" + options + ")[]"
            return "\n" + offset + name + ": (" + options + ")[]"
        if name is None:
            return "\n" + array_type + "[]"
        return "\n" + offset + name + ": " + array_type + "[],"
