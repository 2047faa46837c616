"""A bounded least-recently-used cache: the one memo of the protocol core.

Clients send the same tools with every request of a conversation, so the work done per tool definition
(validation, ``$ref`` resolution, the TypeScript-like schema, the JSON a prompt shows) is remembered:
:mod:`.request` keys normalised functions by the exact JSON of the client's definition, :mod:`.render`
keys printed texts by the identity of the function objects (:meth:`LRUCache.get_or_make` with a key of
``id()``\\ s, the objects kept in the value).

``functools.lru_cache`` does not fit either use: :class:`~.types.Function` is not hashable (its
``parameters`` is a dict), so it cannot be a key; and a function's validation errors name the field the
caller is checking (``tools[3].function.name``), which a key made of the definition alone cannot know.

Contract
--------
* At most `maxsize` entries. :meth:`LRUCache.get` and :meth:`LRUCache.get_or_make` make the entry they
  return the most recently used; adding an entry beyond `maxsize` forgets the least recently used one.
* A value is computed at most once per key while it is remembered. If `make` raises, nothing is stored
  (errors are computed again, so they can name the caller's field).
* Thread-safe: the event loop and the server's admission thread (large requests are normalised and
  rendered off the loop) share the caches. Each operation holds a lock; `make` runs outside it, so two
  threads that miss the same key at once may both make the value (the last one put is kept).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["LRUCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """At most `maxsize` entries, the least recently used forgotten first (see the module docstring)."""

    __slots__ = ("_entries", "_lock", "maxsize")

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, not {maxsize}")
        self.maxsize = maxsize
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        """The value remembered for `key` (now the most recently used), or None."""
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        """Remember `value` for `key` as the most recently used; forget the least recently used beyond
        `maxsize`. None is refused: :meth:`get` could not tell it from a miss."""
        if value is None:
            raise TypeError("LRUCache cannot store None")
        with self._lock:
            entries = self._entries
            entries[key] = value
            entries.move_to_end(key)
            if len(entries) > self.maxsize:
                entries.popitem(last=False)

    def get_or_make(self, key: K, make: Callable[[], V]) -> V:
        """The value remembered for `key`, else ``make()`` remembered (nothing is stored if it raises)."""
        value = self.get(key)
        if value is None:
            value = make()
            self.put(key, value)
        return value

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
