"""OpenAI's cursor page over input items (tgi_gateway/store/pages.py): every order, cursor and limit edge, and a
walk that follows the cursor as the SDK does, judged against plain slicing."""

from __future__ import annotations

from typing import Any

import pytest

from tgi_gateway.errors import InvalidRequestError
from tgi_gateway.store.pages import input_items_page


def items(n: int) -> list[dict[str, Any]]:
    return [{"id": f"item_{i}", "type": "message", "role": "user", "content": str(i)} for i in range(n)]


def ids(page: dict[str, Any]) -> list[str]:
    return [item["id"] for item in page["data"]]


def test_the_worked_example() -> None:
    five = [{"id": c} for c in "abcde"]
    page = input_items_page(five, limit=2)
    assert (ids(page), page["has_more"], page["first_id"], page["last_id"]) == (["e", "d"], True, "e", "d")
    page = input_items_page(five, after="d", limit=2)
    assert (ids(page), page["has_more"]) == (["c", "b"], True)
    page = input_items_page(five, after="b", limit=2)
    assert (ids(page), page["has_more"]) == (["a"], False)
    page = input_items_page(five, order="asc", after="e", limit=2)
    assert page == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}


def test_defaults_are_openais() -> None:
    page = input_items_page(items(25))
    assert ids(page) == [f"item_{i}" for i in range(24, 4, -1)], "desc, 20 items"
    assert page["has_more"] is True and page["object"] == "list"


def test_no_items() -> None:
    for order in ("asc", "desc"):
        page = input_items_page([], order=order)  # type: ignore[arg-type]
        assert page == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}


@pytest.mark.parametrize("order", ["asc", "desc"])
@pytest.mark.parametrize("count", [1, 2, 3, 7, 100, 101])
def test_following_the_cursor_lists_every_item_once_in_order(order: str, count: int) -> None:
    expected = [f"item_{i}" for i in range(count)]
    if order == "desc":
        expected.reverse()
    for limit in sorted({1, 2, 3, count - 1, count, count + 1, 100} & set(range(1, 101))):
        seen: list[str] = []
        after = None
        for _ in range(count + 2):
            page = input_items_page(items(count), after=after, limit=limit, order=order)  # type: ignore[arg-type]
            assert len(page["data"]) <= limit
            seen += ids(page)
            assert page["has_more"] == (len(seen) < count), (limit, seen)
            assert (page["first_id"], page["last_id"]) == (
                (ids(page)[0], ids(page)[-1]) if ids(page) else (None, None)
            )
            if not page["has_more"]:
                break
            after = page["last_id"]
        assert seen == expected, (order, count, limit)


def test_after_the_last_item_is_an_empty_last_page() -> None:
    assert input_items_page(items(3), after="item_0", order="desc")["data"] == []
    page = input_items_page(items(3), after="item_2", order="asc")
    assert (page["data"], page["has_more"]) == ([], False)


@pytest.mark.parametrize("limit", [0, -1, 101, 10**6])
def test_a_limit_outside_1_to_100_is_a_400(limit: int) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        input_items_page(items(3), limit=limit)
    assert refused.value.param == "limit" and f"got {limit}" in refused.value.message


@pytest.mark.parametrize("limit", [1, 100])
def test_the_limits_bounds_are_accepted(limit: int) -> None:
    assert len(input_items_page(items(150), limit=limit)["data"]) == limit


def test_an_unknown_cursor_is_a_400_naming_after() -> None:
    with pytest.raises(InvalidRequestError) as refused:
        input_items_page(items(3), after="item_9")
    assert refused.value.param == "after" and "item_9" in refused.value.message


def test_a_bad_order_is_a_400() -> None:
    with pytest.raises(InvalidRequestError) as refused:
        input_items_page(items(3), order="sideways")  # type: ignore[arg-type]
    assert refused.value.param == "order"


def test_the_items_are_not_changed() -> None:
    given = items(4)
    snapshot = [dict(item) for item in given]
    page = input_items_page(given, order="desc", limit=4)
    assert given == snapshot and page["data"] == list(reversed(snapshot))
