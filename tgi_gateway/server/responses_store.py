"""The stored responses over HTTP: ``GET /v1/responses/{id}``, ``DELETE /v1/responses/{id}`` and
``GET /v1/responses/{id}/input_items``, and the store's life in the app (:func:`opened`).

The store (:mod:`tgi_gateway.store`) is opened in the app's lifespan, ``app.state.store``, and closed at exit.
Every route asks it for the response of the request's owner: the API key id :mod:`.auth` put in the scope
(None when no key is configured). An unknown id, an expired response and another key's response get the
same 404 (``response_not_found``), so a key cannot learn that another key's ids exist.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Literal

from fastapi import Query, Request
from fastapi.responses import Response

from ..api import openapi
from ..errors import InvalidRequestError, ResponseNotFoundError
from ..store import ResponseStore, StoredResponse, open_store
from ..store.pages import DEFAULT_LIMIT, MAX_LIMIT, MIN_LIMIT, input_items_page
from .asgi import json_response
from .auth import KEY_ID_SCOPE

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ..settings import Settings

NOT_FOUND = (
    "No stored response with this id for this API key (`code: response_not_found`): never stored, deleted, "
    "expired (`--response-ttl`), or created with another key."
)
UNAVAILABLE = "The response store's database failed or cannot be reached (`code: store_unavailable`)."


@asynccontextmanager
async def opened(app: FastAPI, settings: Settings) -> AsyncIterator[ResponseStore]:
    """The response store of `settings`, as ``app.state.store`` for the app's life, closed at exit.

    A store already set as ``app.state.store`` before the app starts (a test's double, an embedding
    application's own) is the seam: it is used as it is, and closed by whoever set it.
    """
    if (given := getattr(app.state, "store", None)) is not None:
        yield given
        return
    store = app.state.store = await open_store(settings.store_url, ttl_seconds=settings.store_ttl)
    try:
        yield store
    finally:
        await store.close()
        del app.state.store  # a restarted app (tests serve one app more than once) opens the store again


def owner_of(request: Request) -> str | None:
    """The owner of what this request stores or reads: its API key's id, None without keys."""
    return request.scope.get(KEY_ID_SCOPE)


async def stored_response(request: Request, response_id: str) -> StoredResponse:
    """The stored response `response_id` of this request's owner, or the 404."""
    stored = await request.app.state.store.get(response_id, owner_of(request))
    if stored is None:
        raise ResponseNotFoundError(response_id)
    return stored


def install(app: FastAPI, settings: Settings) -> None:
    """Add the retrieval routes to `app`."""
    errors = openapi.guarded(settings) | {500, 503}

    @app.get(
        "/v1/responses/{response_id}",
        summary="Retrieve a stored response",
        responses=openapi.error_responses({400, 404} | errors, s404=NOT_FOUND, s503=UNAVAILABLE),
    )
    async def retrieve_response(
        request: Request,
        response_id: str,
        stream: bool = Query(False, description="Not served: the gateway stores no stream events (400)."),
    ) -> Response:
        if stream:
            raise InvalidRequestError(
                "Streaming a stored response is not supported: the gateway keeps the response, not its events. "
                "Retrieve it without 'stream'.",
                param="stream",
            )
        return json_response((await stored_response(request, response_id)).response)

    @app.delete(
        "/v1/responses/{response_id}",
        summary="Delete a stored response",
        responses=openapi.error_responses({404} | errors, s404=NOT_FOUND, s503=UNAVAILABLE),
    )
    async def delete_response(request: Request, response_id: str) -> Response:
        if not await request.app.state.store.delete(response_id, owner_of(request)):
            raise ResponseNotFoundError(response_id)
        return json_response({"id": response_id, "object": "response.deleted", "deleted": True})

    @app.get(
        "/v1/responses/{response_id}/input_items",
        summary="List a stored response's input items (a cursor page)",
        responses=openapi.error_responses({400, 404} | errors, s404=NOT_FOUND, s503=UNAVAILABLE),
    )
    async def list_input_items(
        request: Request,
        response_id: str,
        after: str | None = Query(None, description="The id of the last item of the previous page."),
        limit: int = Query(DEFAULT_LIMIT, ge=MIN_LIMIT, le=MAX_LIMIT, description="Items per page."),
        order: Literal["asc", "desc"] = Query("desc", description="`desc`: the last input item first."),
    ) -> Response:
        stored = await stored_response(request, response_id)
        return json_response(input_items_page(stored.input_items, after=after, limit=limit, order=order))
