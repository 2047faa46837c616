"""OpenAI's cursor page over a stored response's input items (``GET /v1/responses/{id}/input_items``), no I/O.

The items are kept in request order. ``order=desc`` (OpenAI's default) lists the last one first; ``after``
is the id of the item the previous page ended with, and the page holds the next `limit` items in that
order. ``has_more`` says whether any item follows the page, ``first_id`` / ``last_id`` are the ids of its
first and last items (None when it is empty). The SDK's ``SyncCursorPage`` reads ``data`` and
``has_more`` and asks for the next page with ``after=<last id>``.

Worked example, items ``a b c d e``: ``order=desc, limit=2`` → ``e d`` (has_more); ``after=d`` → ``c b``
(has_more); ``after=b`` → ``a`` (no more); ``order=asc, after=e`` → nothing (no more).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from ..errors import InvalidRequestError

#: ``limit``'s bounds and default, OpenAI's.
MIN_LIMIT, MAX_LIMIT, DEFAULT_LIMIT = 1, 100, 20

Order = Literal["asc", "desc"]


def input_items_page(
    items: Sequence[dict[str, Any]], *, after: str | None = None, limit: int = DEFAULT_LIMIT,
    order: Order = "desc",
) -> dict[str, Any]:  # fmt: skip
    """The page of `items` after the item `after` (from the start when None), in `order`, at most `limit`.

    An `after` that is no item's id is a 400 naming ``after``: the client's cursor comes from another
    listing (an empty page would look like the end of this one).
    """
    if not MIN_LIMIT <= limit <= MAX_LIMIT:
        raise InvalidRequestError(
            f"Invalid 'limit': integer below minimum value or above maximum value. Expected a value between "
            f"{MIN_LIMIT} and {MAX_LIMIT}, but got {limit} instead.",
            param="limit",
            code="integer_out_of_range",
        )
    if order not in ("asc", "desc"):
        raise InvalidRequestError(
            f"Invalid value for 'order': expected 'asc' or 'desc', got {str(order)[:40]!r}.", param="order"
        )
    ordered = list(items) if order == "asc" else list(reversed(items))
    start = 0
    if after is not None:
        start = next((n + 1 for n, item in enumerate(ordered) if item.get("id") == after), -1)
        if start < 0:
            raise InvalidRequestError(
                f"No input item with id '{after[:80]}' in this response (the 'after' cursor is the id of an "
                "item of a previous page).",
                param="after",
            )
    data = ordered[start : start + limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0].get("id") if data else None,
        "last_id": data[-1].get("id") if data else None,
        "has_more": start + limit < len(ordered),
    }
