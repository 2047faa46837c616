"""What a later response continues: the ``context`` of a stored response (the types are the store's,
:mod:`tgi_gateway.store.types`). No I/O.

``context`` is the conversation to replay for ``previous_response_id``: the previous response's context,
then this request's input items, then this response's output items (instructions are never part of it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..store.types import ResponseStore, StoredResponse

__all__ = ["ResponseStore", "StoredResponse", "context_of"]


def context_of(
    previous: Sequence[dict[str, Any]], items: Sequence[dict[str, Any]], output: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The conversation a later response continues: `previous` + `items` + the `output` items (an output
    message is replayed as an assistant message; its status is kept)."""
    return [*previous, *items, *output]
