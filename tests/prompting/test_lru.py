"""lru.LRUCache: bounded, least recently used forgotten first, a value made once, errors never stored."""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest

from tgi_gateway.prompting.lru import LRUCache


def test_the_least_recently_used_entry_is_forgotten_first():
    cache: LRUCache[str, int] = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recently used
    cache.put("c", 3)
    assert len(cache) == 2
    assert "b" not in cache and cache.get("b") is None
    assert cache.get("a") == 1 and cache.get("c") == 3


def test_putting_an_existing_key_replaces_it_and_makes_it_recent():
    cache: LRUCache[str, int] = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.put("a", 10)
    cache.put("c", 3)
    assert cache.get("a") == 10 and "b" not in cache and len(cache) == 2


def test_get_or_make_makes_a_value_once_per_key_while_remembered():
    cache: LRUCache[int, str] = LRUCache(3)
    made: list[int] = []

    def make(k: int) -> str:
        made.append(k)
        return f"v{k}"

    for k in (1, 2, 1, 1, 2, 3):
        assert cache.get_or_make(k, lambda k=k: make(k)) == f"v{k}"
    assert made == [1, 2, 3]
    cache.get_or_make(4, lambda: make(4))  # forgets 1, the least recently used
    assert cache.get_or_make(1, lambda: make(1)) == "v1"
    assert made == [1, 2, 3, 4, 1]


def test_an_error_in_make_is_raised_and_not_stored():
    cache: LRUCache[str, str] = LRUCache(2)
    calls = []

    def fail() -> str:
        calls.append(1)
        raise ValueError("bad definition")

    for _ in range(2):
        with pytest.raises(ValueError, match="bad definition"):
            cache.get_or_make("k", fail)
    assert calls == [1, 1] and len(cache) == 0


def test_none_and_a_size_below_one_are_refused():
    with pytest.raises(ValueError):
        LRUCache(0)
    with pytest.raises(TypeError):
        LRUCache(1).put("k", None)


def test_against_a_reference_model_on_random_operations():
    rng = random.Random(3)
    for maxsize in (1, 2, 5):
        cache: LRUCache[int, int] = LRUCache(maxsize)
        model: OrderedDict[int, int] = OrderedDict()  # most recent last
        for step in range(3000):
            key = rng.randrange(8)
            if rng.random() < 0.5:
                expected = model.get(key)
                if expected is not None:
                    model.move_to_end(key)
                assert cache.get(key) == expected
            else:
                model[key] = step
                model.move_to_end(key)
                while len(model) > maxsize:
                    model.popitem(last=False)
                cache.put(key, step)
            assert len(cache) == len(model) <= maxsize
            assert all(k in cache for k in model)


def test_render_prints_the_same_function_objects_once(monkeypatch):
    import importlib

    from tgi_gateway.prompting import Template, normalize

    render_module = importlib.import_module(
        "tgi_gateway.prompting.render"
    )  # (the package's `render` is the function)
    schema_module = importlib.import_module("tgi_gateway.prompting.schema")
    request_module = importlib.import_module("tgi_gateway.prompting.request")
    printed = []
    declaration = schema_module._Macros.function_declaration
    monkeypatch.setattr(
        schema_module._Macros,
        "function_declaration",
        lambda self, f: printed.append(f.name) or declaration(self, f),
    )
    for cache in (render_module._TEXTS, schema_module._BLOCKS, request_module._FUNCTION_CACHE):
        cache.clear()
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [tool]}
    first = Template("v3.llama3").render(
        normalize(body)
    )  # normalize prints it (to check it), render reuses it
    assert printed == ["get_time"] and len(schema_module._BLOCKS) == 1
    assert Template("v3.llama3").render(normalize(body)) == first  # the same Function object: a hit
    Template("v2").render(normalize(body))  # same objects, same flavour: still one entry
    assert printed == ["get_time"] and len(schema_module._BLOCKS) == 1
    Template("v1").render(normalize(body))  # the Python flavour: printed once more
    assert printed == ["get_time"] * 2 and len(schema_module._BLOCKS) == 2
    Template("v3-llama3.1").render(normalize(body))  # the JSON of the function
    Template("v3-llama3.1").render(normalize(body))
    assert len(render_module._TEXTS) == 1
