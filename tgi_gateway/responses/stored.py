"""What is stored of a response, and what a store does: the shapes agreed with ``tgi_gateway.store``
(typing only here; the durable store implements them). No I/O.

``context`` is the conversation to replay for ``previous_response_id``: the previous response's context,
then this request's input items, then this response's output items (instructions are never part of it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["ResponseStore", "StoredResponse", "context_of"]


@dataclass(frozen=True, slots=True)
class StoredResponse:
    id: str  # "resp_…"
    owner: str | None  # the API key id that created it; None without keys
    created_at: int  # unix seconds
    response: dict[str, Any]  # the Response object exactly as returned to the client
    input_items: list[dict[str, Any]]  # this request's input items, each with an "id"
    context: list[dict[str, Any]]  # previous context + this input + this output
    previous_response_id: str | None


class ResponseStore(Protocol):
    async def save(self, stored: StoredResponse) -> None: ...

    async def get(self, response_id: str, owner: str | None) -> StoredResponse | None: ...

    async def delete(self, response_id: str, owner: str | None) -> bool: ...

    async def close(self) -> None: ...


def context_of(
    previous: Sequence[dict[str, Any]], items: Sequence[dict[str, Any]], output: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The conversation a later response continues: `previous` + `items` + the `output` items (an output
    message is replayed as an assistant message; its status is kept)."""
    return [*previous, *items, *output]
