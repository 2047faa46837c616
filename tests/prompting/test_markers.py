"""markers.MarkerSet: golden tables, then both methods against a brute-force referee on random strings."""

from __future__ import annotations

import random
import time

import pytest

from tgi_gateway.prompting import markers as markers_module
from tgi_gateway.prompting.markers import Found, MarkerSet
from tgi_gateway.prompting.parse import PARSERS

LLAMA = (">>>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")


# ------------------------------------------------------------------------------------------------
# The referee: the definitions, written out with no cleverness
# ------------------------------------------------------------------------------------------------


def held_from(markers, buf: str) -> int:
    """Start of the longest suffix of `buf` that is a proper prefix of some marker; len(buf) if none."""
    for i in range(len(buf)):  # earliest start = longest suffix
        tail = buf[i:]
        if any(len(m) > len(tail) and m.startswith(tail) for m in markers if m):
            return i
    return len(buf)


def first_marker(markers, buf: str) -> tuple[int, int] | None:
    """(start, end) of the occurrence that ends first; of those ending there, the one that starts first."""
    hits = [
        (i + len(m), i) for m in markers if m for i in range(len(buf) - len(m) + 1) if buf.startswith(m, i)
    ]
    if not hits:
        return None
    end, start = min(hits)
    return start, end


def span(found) -> tuple[int, int] | None:
    return None if found is None else found.span()


# ------------------------------------------------------------------------------------------------
# Golden tables
# ------------------------------------------------------------------------------------------------

HOLD = [
    # (markers, buffer, start of the held tail)
    (LLAMA, "", 0),
    (LLAMA, "plain text", 10),
    (LLAMA, "text >>", 5),
    (LLAMA, "text >", 5),
    (LLAMA, "text >> x", 9),
    (LLAMA, "text <|eo", 5),
    (LLAMA, "text <|e", 5),
    (LLAMA, "text <|eot_id|", 5),
    (LLAMA, "<|end_of_text|", 0),
    (LLAMA, "a < b <|", 6),  # the first "<" is not a prefix any more; the second is
    (LLAMA, "<|eot_idX", 9),
    ((">>>",), ">>>>", 2),  # ">>" is the longest proper prefix at the end (">>>" itself is not proper)
    (("abcab",), "xxabcab", 5),  # "abcab" is complete, not a *proper* prefix; its tail "ab" is one
    (("abcab",), "xxabca", 2),
    (("abcab",), "xxabcabca", 5),
    (("ab", "abc"), "xab", 1),  # complete "ab" is still a proper prefix of "abc"
    (("\n",), "line\n", 5),  # one-character markers have no proper prefix
    ((), "anything", 8),
    (("END",), "The E", 4),
    (("Observation:",), "x\nObserv", 2),
]


@pytest.mark.parametrize("markers,buf,start", HOLD)
def test_hold_golden(markers, buf, start):
    assert MarkerSet(markers).hold(buf) == start
    assert held_from(markers, buf) == start  # the referee agrees with the table


SEARCH = [
    # (markers, buffer, (start, end) of the first complete marker or None)
    (LLAMA, "a >> b >>>c", (7, 10)),
    (LLAMA, "x<|eot_id|>>>>", (1, 11)),
    (LLAMA, "no marker <|eo", None),
    ((">>>",), ">>>>", (0, 3)),
    (("ab", "abc"), "xabc", (1, 3)),  # "ab" is complete first
    (("b", "abc"), "abc", (1, 2)),  # ambiguous set: "b" ends first, although "abc" starts first
    (("ab", "xaby"), "xaby", (1, 3)),
    (("bc", "abc"), "abc", (0, 3)),  # both end at 3: the longer one
    (("\n", "\n\n"), "a\n\nb", (1, 2)),
    ((), "anything", None),
    (("",), "anything", None),  # empty strings are ignored
]


@pytest.mark.parametrize("markers,buf,expected", SEARCH)
def test_search_golden(markers, buf, expected):
    assert span(MarkerSet(markers).search(buf)) == expected
    assert first_marker(markers, buf) == expected


def test_search_result_offers_the_match_methods_either_way():
    regex, each = MarkerSet(["bc"]), MarkerSet(["b", "abc"])
    assert each.ambiguity == ("b", "abc") and regex.ambiguity is None
    for found in (regex.search("xbc"), each.search("xabc")):
        assert found is not None
        assert (found.start(), found.end()) == found.span()
    assert each.search("xabc").group() == "b" and regex.search("xbc").group() == "bc"
    assert isinstance(each.search("xabc"), Found)


def test_ambiguity_names_a_marker_inside_another_before_its_end():
    assert MarkerSet([">>>", "<|eot_id|>"]).ambiguity is None
    assert MarkerSet(["b", "ab"]).ambiguity is None  # "b" ends where "ab" ends: harmless
    assert MarkerSet(["\n", "\n\n"]).ambiguity == ("\n", "\n\n")
    assert MarkerSet(["ab", "xaby"]).ambiguity == ("ab", "xaby")


def test_every_parser_state_is_an_unambiguous_set_searched_with_one_regex():
    for cls in PARSERS.values():
        for state, markers in cls._scanners.items():
            assert markers.ambiguity is None, (cls.__name__, state)
            assert not isinstance(markers.search("x" + markers.markers[0]), Found), (cls.__name__, state)


def test_a_parser_table_with_an_ambiguous_state_is_refused_when_defined():
    from typing import ClassVar

    from tgi_gateway.prompting.parse import NAME, OPEN, TEXT, _Parser

    with pytest.raises(TypeError, match=r"marker '\\n' occurs inside '\\n\\n'"):

        class Broken(_Parser):
            STOPS = ("<|stop|>",)
            TABLE: ClassVar = {TEXT: {"\n": NAME, "\n\n": NAME}, NAME: {":": OPEN}}


# ------------------------------------------------------------------------------------------------
# Property: random marker sets and strings over a small alphabet, against the referee
# ------------------------------------------------------------------------------------------------


def random_case(rng: random.Random) -> tuple[list[str], str]:
    alphabet = rng.choice(["ab", "abc", "ab<|>", "a\n"])
    markers = [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(0, 4))
    ]
    buf = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
    return markers, buf


@pytest.mark.parametrize("seed", range(4))
def test_hold_and_search_match_the_referee_on_random_strings(seed):
    rng = random.Random(seed)
    for _ in range(5000):
        markers, buf = random_case(rng)
        ms = MarkerSet(markers)
        assert ms.hold(buf) == held_from(markers, buf), (markers, buf)
        expected = first_marker(markers, buf)
        assert span(ms.search(buf)) == expected, (markers, buf)
        assert span(ms._search_each(buf)) == expected, (markers, buf)  # the path without a regex


def test_long_sets_are_searched_without_a_regex(monkeypatch):
    monkeypatch.setattr(markers_module, "REGEX_MAX_CHARS", 3)
    ms = MarkerSet(["abc", "d"])
    assert isinstance(ms.search("xxabcd"), Found) and span(ms.search("xxabcd")) == (2, 5)


def test_a_long_client_marker_costs_linear_time_and_memory():
    # All proper prefixes of a 2,000,000-character stop sequence would be ~2e12 characters.
    long = "ab" * 1_000_000
    t0 = time.perf_counter()
    ms = MarkerSet([long, "zz"])
    assert ms.hold("x" + long[:-1]) == 1
    assert ms.hold("x" * 100 + "z") == 100  # "z" may start "zz"
    assert span(ms.search("x" + long)) == (1, 1 + len(long))
    assert time.perf_counter() - t0 < 2.0
