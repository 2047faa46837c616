"""What a stored response is (:class:`StoredResponse`) and what a store does (:class:`ResponseStore`): plain
types, no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """One stored response (every field JSON-able)."""

    id: str  # "resp_…"
    owner: str | None  # the API key id that created it (server/auth puts it in the scope); None without keys
    created_at: int  # unix seconds
    response: dict[str, Any]  # the Response object exactly as returned to the client
    input_items: list[dict[str, Any]]  # this request's input items, each with an "id"
    # The whole conversation as input items to replay for previous_response_id: the previous context, this
    # input, this output's items (the route builds it).
    context: list[dict[str, Any]]
    previous_response_id: str | None


class ResponseStore(Protocol):
    """Where stored responses live. Every method may raise
    :class:`~tgi_gateway.errors.StoreUnavailableError` (503) when the database fails."""

    async def save(self, stored: StoredResponse) -> None:
        """Keep `stored` (for the store's retention from its `created_at`)."""

    async def get(self, response_id: str, owner: str | None) -> StoredResponse | None:
        """The response `response_id` of `owner`; None when unknown, expired, deleted or another owner's."""

    async def delete(self, response_id: str, owner: str | None) -> bool:
        """Delete the response `response_id` of `owner`; False when there was none to delete (as `get`)."""

    async def close(self) -> None:
        """Stop the expiry sweep and close the database connections."""
