"""parse.TRACKED_PARSERS: the tracking parsers parse exactly as the plain ones, and their TextSpans say
truly where each text came from — on every golden case of test_parse.py and its fuzz outputs, for every
split of the output.

Checked for each split: the events less TextSpans are the plain parser's (coalesced); every TextDelta is
followed by one TextSpans; the content spans' characters, taken from the output, are the TextDelta's text
less only inserted ``"\\n"`` joiners; spans never overlap and only move forward; dropped spans are blank.
(Offsets count from the output's first character; text of the prefix, in a few fuzz prefixes, is before 0.)
"""

from __future__ import annotations

import random

import pytest
from splits import coalesce, splits, whole
from test_parse import (
    PREFIXES,
    V1_CASES,
    V2_CASES,
    V2L3_CASES,
    V3_CASES,
    V31_CASES,
    random_output,
    run,
)

from tgi_gateway.prompting.parse import PARSERS, TRACKED_PARSERS
from tgi_gateway.prompting.types import TextDelta, TextSpans, Version

TABLES = {
    Version.V1: V1_CASES,
    Version.V2: V2_CASES,
    Version.V2_LLAMA3: V2L3_CASES,
    Version.V3_LLAMA3: V3_CASES,
    Version.V3_LLAMA31: V31_CASES,
}


def is_joined_from(text: str, source: str) -> bool:
    """`text` is `source` with only "\\n" characters inserted."""
    i = 0
    for ch in text:
        if i < len(source) and source[i] == ch:
            i += 1
        elif ch != "\n":
            return False
    return i == len(source)


def check_tracking(version: Version, prefix: str, pieces: list[tuple[str, bool]]) -> None:
    output = prefix + "".join(text for text, _ in pieces)  # offsets count from the output's start: shift
    base = len(prefix)
    tracked = run(TRACKED_PARSERS[version], prefix, pieces)
    plain = run(PARSERS[version], prefix, pieces)
    assert coalesce([e for e in tracked if type(e) is not TextSpans]) == coalesce(plain), pieces
    last = -base
    for k, event in enumerate(tracked):
        if type(event) is TextDelta:
            spans = tracked[k + 1]
            assert type(spans) is TextSpans, (pieces, tracked)
            for a, b, content in spans.spans:
                assert last <= a < b <= len(output) - base, (pieces, spans)
                last = b
                assert content or not output[base + a : base + b].strip(), (pieces, spans)
            released = "".join(output[base + a : base + b] for a, b, content in spans.spans if content)
            assert is_joined_from(event.text, released), (pieces, event, spans)
        elif type(event) is TextSpans:
            assert k and type(tracked[k - 1]) is TextDelta, (pieces, tracked)


@pytest.mark.parametrize("version", list(TABLES))
def test_golden_cases_every_split(version: Version) -> None:
    for row in TABLES[version]:
        _, prefix, output, _ = row
        for _, pieces in splits(output, random_splits=20, seed=len(row[0])):
            check_tracking(version, prefix, pieces)


@pytest.mark.parametrize("version", list(PARSERS))
def test_fuzz(version: Version) -> None:
    rng = random.Random(f"tracking-{version}")
    for _ in range(400):
        prefix, output = rng.choice(PREFIXES), random_output(rng)
        check_tracking(version, prefix, whole(output))
        for label, pieces in splits(output, random_splits=2, seed=rng.randrange(1 << 30)):
            if label.startswith("at ") and rng.random() < 0.9:
                continue
            check_tracking(version, prefix, pieces)
