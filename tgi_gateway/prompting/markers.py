"""Finding markers in streamed text: the first complete one, and the tail that may still become one.

Theory of operation
-------------------
Both incremental scanners of the answer pipeline — the client's stop sequences
(:mod:`tgi_gateway.stop_sequences`) and the template parsers (:mod:`.parse`) — look for a fixed set of
marker strings in text that arrives in pieces. Each keeps a buffer (what it held back + the new piece)
and asks two questions of it, answered here by one :class:`MarkerSet` built once per set:

``search(buf)``
    The first complete marker: the occurrence that **ends** first, and of those that end there the
    longest (the one that starts first). "Ends first" is what makes the answer independent of how the
    text was split: as text streams in, that is the occurrence completed first.
``hold(buf)``
    Where the tail to hold back starts: the longest suffix of `buf` that is a *proper* prefix of some
    marker (it may still become that marker once more text arrives). Everything before it is certain
    not to be the start of any marker and can be released. ``len(buf)`` when no suffix qualifies.

Example with the markers ``">>>"`` and ``"<|eot_id|>"``::

    search("a >> b >>>c")  → span (7, 10)                   ">>>"
    hold("text >>")        → 5                              hold ">>": it may become ">>>"
    hold("text <|eo")      → 5                              hold "<|eo"
    hold("text >> x")      → 9 (= len)                      nothing to hold

A set is *unambiguous* when no marker occurs inside another one before that one's end (``"ab"`` inside
``"xaby"``; a marker that is a proper prefix of another counts too). Then the occurrence that starts first
is also the one that ends first, and one regular expression (the markers as alternatives, longest first)
finds it in a single C call: that is the parsers' hot path, and their tables must be unambiguous
(:attr:`MarkerSet.ambiguity` names the offending pair). A client's stop sequences may be ambiguous, and
may be long: a set that is ambiguous, or longer than :data:`REGEX_MAX_CHARS` in all, is searched marker by
marker with ``str.find`` (Python compiles a regular expression in time proportional to its length, and the
client chooses the length).

Memory is linear in the markers' total length: there is no set of all prefixes (quadratic in a marker's
length). :meth:`MarkerSet.hold` examines only positions that hold the first character of some marker,
within the last ``longest marker - 1`` characters (one regex search finds them; in running text there is
usually none), and checks each against the sorted markers by bisection and ``startswith``. A check costs
the length of the tail it compares, so only a buffer with many near-misses of a long marker costs more
than linear time.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Callable, Iterable

__all__ = ["REGEX_MAX_CHARS", "Found", "MarkerSet"]

REGEX_MAX_CHARS = 1024
"""Sets up to this many characters in all are searched with one compiled regular expression (when
unambiguous): far above any parser state's markers, small enough to compile at once."""


class Found:
    """A marker occurrence found without a regular expression; offers the ``re.Match`` methods used."""

    __slots__ = ("_buf", "_end", "_start")

    def __init__(self, buf: str, start: int, end: int) -> None:
        self._buf, self._start, self._end = buf, start, end

    def span(self) -> tuple[int, int]:
        return self._start, self._end

    def start(self) -> int:
        return self._start

    def end(self) -> int:
        return self._end

    def group(self) -> str:
        return self._buf[self._start : self._end]

    def __repr__(self) -> str:
        return f"<Found span={self.span()!r} match={self.group()!r}>"


class MarkerSet:
    """A fixed set of markers, prepared once for :meth:`search` and :meth:`hold` (see the module docstring).

    Empty strings are ignored and duplicates dropped; an empty set finds nothing and holds nothing.
    """

    __slots__ = ("_first", "_sorted", "ambiguity", "longest", "markers", "search")

    markers: tuple[str, ...]
    longest: int  # length of the longest marker (0 for an empty set)
    ambiguity: tuple[str, str] | None  # (a, b): marker a occurs in marker b before b's end; None if none
    search: Callable[[str], re.Match[str] | Found | None]
    """The first complete marker in a string (the occurrence that ends first; the longest of those), or
    None. The result offers ``span()``, ``start()``, ``end()`` and ``group()``."""

    def __init__(self, markers: Iterable[str]) -> None:
        self.markers = tuple(dict.fromkeys(m for m in markers if m))
        self.longest = max(map(len, self.markers), default=0)
        self.ambiguity = next(
            ((a, b) for b in self.markers for a in self.markers if a != b and b.find(a, 0, len(b) - 1) >= 0),
            None,
        )
        self._sorted = sorted(self.markers)
        if not self.markers:
            self.search = _nothing
        elif self.ambiguity is None and sum(map(len, self.markers)) <= REGEX_MAX_CHARS:
            longest_first = sorted(self.markers, key=len, reverse=True)
            self.search = re.compile("|".join(map(re.escape, longest_first))).search
        else:
            self.search = self._search_each
        firsts = sorted({m[0] for m in self.markers if len(m) > 1})  # one-character markers have no prefix
        self._first = re.compile(f"[{''.join(map(re.escape, firsts))}]").search if firsts else None

    def hold(self, buf: str) -> int:
        """Start of the longest suffix of `buf` that is a proper prefix of a marker; ``len(buf)`` if none."""
        n = len(buf)
        first = self._first
        if first is None:
            return n
        m = first(buf, max(0, n - self.longest + 1))
        if m is None:  # the common case: no marker can start in the tail
            return n
        ordered = self._sorted
        while m is not None:  # earliest candidate first: the longest suffix wins
            i = m.start()
            tail = buf[i:]
            # The markers that start with `tail` and are longer sort right after it.
            j = bisect_right(ordered, tail)
            if j < len(ordered) and ordered[j].startswith(tail):
                return i
            m = first(buf, i + 1)
        return n

    def _search_each(self, buf: str) -> Found | None:
        """:attr:`search` for an ambiguous or long set: every marker's first occurrence, one by one."""
        best_start = best_end = -1
        for marker in self.markers:
            start = buf.find(marker)
            if start < 0:
                continue
            end = start + len(marker)
            if best_end < 0 or end < best_end or (end == best_end and start < best_start):
                best_start, best_end = start, end
        return None if best_end < 0 else Found(buf, best_start, best_end)

    def __repr__(self) -> str:
        return f"MarkerSet({list(self.markers)!r})"


def _nothing(buf: str) -> None:
    return None
