"""FastAPI's request validation errors (pydantic's) → the OpenAI 400 a client expects."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi.exceptions import RequestValidationError

from ..errors import InvalidRequestError


def invalid_request(exc: RequestValidationError) -> InvalidRequestError:
    """The most specific pydantic error as an OpenAI 400, `param` in OpenAI's dotted notation."""
    errors = exc.errors()
    if not errors:
        return InvalidRequestError("Invalid request body.")
    first = errors[0]
    if first.get("type") == "json_invalid":  # loc ("body", position), ctx {"error": the parser's message}
        reason, position = first.get("ctx", {}).get("error", "invalid JSON"), first.get("loc", ("?",))[-1]
        why = f"{reason}, at position {position}"
        return InvalidRequestError(
            f"We could not parse the JSON body of your request ({why}). (HINT: This likely means you aren't "
            "using your HTTP library correctly. The OpenAI API expects a JSON payload.)"
        )
    if first.get("loc", ("body",))[0] in ("query", "path"):  # a URL parameter: its name is the param
        param = str(first["loc"][-1])
        return InvalidRequestError(f"Invalid value for '{param}': {first.get('msg')}.", param=param)
    # A union field fails once per member ("stop" as a string, then as an array): the error that got
    # deepest into the body names the field best.
    loc, err = max(((_located(err, exc.body), err) for err in errors), key=lambda pair: len(pair[0]))
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    if not loc:  # the body as a whole
        if err.get("type") == "missing":
            return InvalidRequestError("The request body is empty: send a JSON object.")
        if isinstance(err.get("input"), bytes):  # FastAPI hands over the raw bytes of a non-JSON content type
            return InvalidRequestError(
                "The request body must be JSON, sent with 'Content-Type: application/json'."
            )
        return InvalidRequestError("The request body must be a JSON object.")
    if err.get("type") == "missing":
        return InvalidRequestError(f"Missing required parameter: '{param}'.", param=param)
    if err.get("type") == "invalid_type":  # api/models.py: strict JSON types, in OpenAI's words
        return InvalidRequestError(
            f"Invalid type for '{param}': {err.get('msg')}.", param=param, code="invalid_type"
        )
    return InvalidRequestError(f"Invalid value for '{param}': {err.get('msg')}.", param=param)


def _located(err: Mapping[str, Any], body: Any) -> list[str | int]:
    """The error's place in the body: its keys and indices, without the leading "body" and without the
    union member tags pydantic puts in between ("str", "list[str]"), which name no place in the body."""
    loc = list(err.get("loc", ()))[1:]
    located: list[str | int] = []
    node = body
    for i, part in enumerate(loc):
        if (isinstance(node, dict) and part in node) or (
            isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        ):
            located.append(part)
            node = node[part]
        elif err.get("type") == "missing" and i == len(loc) - 1:
            located.append(part)
    return located
