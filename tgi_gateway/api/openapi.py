"""The OpenAPI schema (``/openapi.json``, ``/docs``) told true: the statuses each route really answers.

FastAPI documents a 422 "Validation Error" (``HTTPValidationError``) on every route with a body or
parameters; the gateway answers request validation errors with 400 in OpenAI's envelope instead
(``app._validation_error``).
:func:`install` removes the 422s, and the ``HTTPValidationError``/``ValidationError`` components once nothing
refers to them; the routes list their real error statuses with :func:`error_responses`, each one with the
:class:`~tgi_gateway.api.models.ErrorResponse` envelope. What depends on the settings follows them: 401
(and the bearer security scheme) only when API keys are configured, the per-key 429 only with a per-key limit,
and neither on ``/health`` unless ``--protect-health``. The chat route's 200 lists both of its answers:
``application/json`` (:class:`~tgi_gateway.api.models.ChatCompletion`) and, for ``stream: true``,
``text/event-stream`` (one ``data:`` event per :class:`~tgi_gateway.api.models.ChatCompletionChunk`, then
``data: [DONE]``; the chunk's schema is referred to by ``x-itemSchema``, the name OpenAPI 3.2 gives it).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from .models import ChatCompletion, ChatCompletionChunk, ErrorResponse

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ..settings import Settings

DESCRIPTIONS = {
    400: "Invalid request: a bad body or parameter (`param` names it), or a value TGI refused "
    "(`code: context_length_exceeded` when the prompt and `max_tokens` exceed its limits).",
    401: "No API key, or a wrong one: send `Authorization: Bearer <key>` (`code: invalid_api_key`).",
    404: "`model` is not the served model (`code: model_not_found`).",
    413: "The request body is larger than `--max-body-bytes`.",
    429: "This API key (without keys: the gateway) has its maximum of requests in flight "
    "(`--max-concurrent-per-key`; `Retry-After` says when to retry).",
    500: "The gateway failed unexpectedly (see its log).",
    502: "TGI failed while generating, answered outside its protocol, or refused the gateway.",
    503: "TGI is unreachable or unhealthy.",
    504: "TGI sent nothing for too long (`code: timeout`).",
}
FASTAPI_VALIDATION = ("HTTPValidationError", "ValidationError")
SECURITY_SCHEME = "bearer"
CHAT_PATH = "/v1/chat/completions"
COMPONENTS = "#/components/schemas/"
EVENT_STREAM = (
    "With `stream: true`: server-sent events, each `data: <ChatCompletionChunk as JSON>` followed by a blank "
    'line, then `data: [DONE]`. An error after the first chunk is one `data: {"error": {...}}` event (the '
    "error envelope), then the end of the stream."
)


def error_responses(statuses: Iterable[int], **descriptions: str) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses=`` for `statuses`, each with the error envelope; a description can be given per
    status as ``s429="..."``."""
    return {
        status: {"model": ErrorResponse, "description": descriptions.get(f"s{status}", DESCRIPTIONS[status])}
        for status in sorted(statuses)
    }


def guarded(settings: Settings, *, open_path: bool = False) -> set[int]:
    """The statuses access control (auth.py) adds to a route: 401 with keys, 429 with a per-key limit."""
    if open_path and not settings.protect_health:
        return set()
    statuses = set()
    if has_keys(settings):
        statuses.add(401)
    if settings.max_concurrent_per_key is not None:
        statuses.add(429)
    return statuses


def has_keys(settings: Settings) -> bool:
    return bool(settings.api_keys) or settings.api_key_file is not None


@dataclass(frozen=True, slots=True)
class Answers:
    """A route's 200: `json` as ``application/json``, or with `stream: true` `event` items as server-sent
    events (`events`: how they are framed)."""

    json: type[BaseModel]
    event: type[BaseModel]
    description: str
    events: str


CHAT_ANSWERS = Answers(
    ChatCompletion,
    ChatCompletionChunk,
    "The completion: one JSON object, or a stream of chunks with `stream: true`.",
    EVENT_STREAM,
)


def install(
    app: FastAPI,
    settings: Settings,
    open_paths: Iterable[str] = (),
    answers: Mapping[str, Answers] | None = None,
) -> None:
    """Replace ``app.openapi`` with one that drops FastAPI's 422s and, with API keys, declares the bearer
    scheme on every operation but those of `open_paths`; the 200 of each POST route of `answers` (by path;
    the chat route's by default) documents its JSON and event-stream answers."""
    answers = {CHAT_PATH: CHAT_ANSWERS, **(answers or {})}
    build = app.openapi  # FastAPI's own: builds the schema once and caches it in app.openapi_schema
    open_paths = frozenset(() if settings.protect_health else open_paths)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for path, operations in schema.get("paths", {}).items():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
                    if has_keys(settings) and path not in open_paths:
                        operation["security"] = [{SECURITY_SCHEME: []}]
            components = schema.setdefault("components", {})
            schemas = components.setdefault("schemas", {})
            for path, answer in answers.items():
                _document_answers(schema.get("paths", {}).get(path, {}).get("post"), schemas, answer)
            rest = json.dumps(
                [{k: v for k, v in schema.items() if k != "components"},
                 {k: v for k, v in schemas.items() if k not in FASTAPI_VALIDATION}]
            )  # fmt: skip
            if not any(f'"#/components/schemas/{name}"' in rest for name in FASTAPI_VALIDATION):
                for name in FASTAPI_VALIDATION:  # referred to by nothing left (only by each other)
                    schemas.pop(name, None)
            if has_keys(settings):
                bearer = {"type": "http", "scheme": "bearer"}
                components.setdefault("securitySchemes", {})[SECURITY_SCHEME] = bearer
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _document_answers(operation: dict[str, Any] | None, schemas: dict[str, Any], answer: Answers) -> None:
    """A route's 200: its answer as JSON, or its events as server-sent events."""
    if operation is None:
        return
    for model in (answer.json, answer.event):
        model_schema = model.model_json_schema(ref_template=COMPONENTS + "{model}")
        for name, definition in {**model_schema.pop("$defs", {}), model.__name__: model_schema}.items():
            if schemas.setdefault(name, definition) != definition:
                raise RuntimeError(f"two OpenAPI components named {name}")
    operation.setdefault("responses", {})["200"] = {
        "description": answer.description,
        "content": {
            "application/json": {"schema": {"$ref": COMPONENTS + answer.json.__name__}},
            "text/event-stream": {
                "schema": {"type": "string", "description": answer.events},
                "x-itemSchema": {"$ref": COMPONENTS + answer.event.__name__},
            },
        },
    }
