"""Cutting a model output into stream pieces, and comparing the events a parser makes of them.

An output is a sequence of items: a ``str`` is plain text (it may be cut anywhere), a
``(text, True)`` pair is a special token (always a piece of its own, fed with ``special=True``).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Union

from tgi_gateway.prompting.types import Event, TextDelta, ToolCallArgs, ToolCallEnd, ToolCallStart

Piece = tuple[str, bool]  # (text, special)
Item = Union[str, Piece]


def special(text: str) -> Piece:
    return (text, True)


def _units(output: Sequence[Item]) -> tuple[list[Piece], set[int]]:
    """One unit per plain character, one per special token; and the boundaries that must be cuts."""
    units: list[Piece] = []
    forced: set[int] = set()
    for item in output:
        if isinstance(item, str):
            units.extend((c, False) for c in item)
        else:
            forced.update((len(units), len(units) + 1))
            units.append(item)
    return units, forced


def _cut(units: list[Piece], cuts: set[int]) -> list[Piece]:
    pieces: list[Piece] = []
    bounds = sorted({0, len(units)} | {c for c in cuts if 0 < c < len(units)})
    for a, b in zip(bounds, bounds[1:]):
        chunk = units[a:b]
        if len(chunk) == 1 and chunk[0][1]:
            pieces.append(chunk[0])
        else:
            pieces.append(("".join(t for t, _ in chunk), False))
    return pieces


def whole(output: Sequence[Item]) -> list[Piece]:
    units, forced = _units(output)
    return _cut(units, forced)


def plain(output: Sequence[Item]) -> list[Item]:
    """The same output with every special token produced as plain text."""
    return ["".join(i if isinstance(i, str) else i[0] for i in output)]


def splits(
    output: Sequence[Item], random_splits: int = 50, seed: int = 0
) -> Iterator[tuple[str, list[Piece]]]:
    """(label, pieces): whole, one character at a time, every 2-way split, `random_splits` seeded ones."""
    units, forced = _units(output)
    n = len(units)
    yield "whole", _cut(units, forced)
    yield "chars", _cut(units, set(range(n + 1)))
    for k in range(1, n):
        yield f"at {k}", _cut(units, forced | {k})
    for i in range(random_splits):
        rng = random.Random(seed * 100_003 + i)
        p = rng.choice((0.05, 0.2, 0.5, 0.9))
        yield f"random {seed}/{i}", _cut(units, forced | {k for k in range(1, n) if rng.random() < p})


def coalesce(events: Sequence[Event]) -> list[Event]:
    """Merge adjacent text deltas, and adjacent argument fragments of the same call."""
    out: list[Event] = []
    for e in events:
        last = out[-1] if out else None
        if isinstance(e, TextDelta) and isinstance(last, TextDelta):
            out[-1] = TextDelta(last.text + e.text)
        elif isinstance(e, ToolCallArgs) and isinstance(last, ToolCallArgs) and last.index == e.index:
            out[-1] = ToolCallArgs(e.index, last.text + e.text)
        else:
            out.append(e)
    return out


def check_well_formed(events: Sequence[Event]) -> None:
    """Calls are Start, Args*, End with dense indices; text only outside calls; no empty fragments."""
    open_index: int | None = None
    started = 0
    for e in events:
        if isinstance(e, ToolCallStart):
            assert open_index is None, f"{e} inside call {open_index}"
            assert e.index == started, f"{e}: expected index {started}"
            open_index, started = e.index, started + 1
        elif isinstance(e, ToolCallArgs):
            assert e.index == open_index and e.text, e
        elif isinstance(e, ToolCallEnd):
            assert e.index == open_index, e
            open_index = None
        else:
            assert isinstance(e, TextDelta) and e.text and open_index is None, e
    assert open_index is None, f"call {open_index} never ended"


def summary(events: Sequence[Event]) -> tuple[str, list[tuple[str, str]]]:
    """(content, [(name, arguments), ...]) — what the OpenAI message will say."""
    content = "".join(e.text for e in events if isinstance(e, TextDelta))
    calls: dict[int, list[str]] = {}
    for e in events:
        if isinstance(e, ToolCallStart):
            calls[e.index] = [e.name, ""]
        elif isinstance(e, ToolCallArgs):
            calls[e.index][1] += e.text
    return content, [(name, args) for name, args in calls.values()]
