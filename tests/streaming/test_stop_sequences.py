"""StopFilter: the client's stop sequences cut the raw output at their first occurrence, for any split."""

from __future__ import annotations

import pytest
from splits import special, splits

from tgi_gateway.stop_sequences import StopFilter

CASES = [
    # (stops, output items, expected text kept, stopped)
    (["END"], ["The END of it"], "The ", True),
    (["END"], ["The EN"], "The EN", False),
    (["END"], ["ENDING"], "", True),
    (["\n\n", "Observation:"], ["Thought: x\nObservation: y"], "Thought: x\n", True),
    (["\n\n", "Observation:"], ["a\n\nb Observation:"], "a", True),
    (["abcab"], ["xxabcabcab"], "xx", True),
    (["aab"], ["aaab"], "a", True),
    ([], ["anything END"], "anything END", False),
    (["END"], ["no stop here, E N D"], "no stop here, E N D", False),
    (["<|eot_id|>x"], ["hi", special("<|eot_id|>"), "x"], "hi<|eot_id|>x", False),
    (
        ["END"],
        ["a E", special("<|reserved_special_token_249|>"), "ND b END c"],
        "a E<|reserved_special_token_249|>ND b ",
        True,
    ),
    # One sequence inside another: the one completed first wins, however the text is split.
    (["b", "abc"], ["abc"], "a", True),
    (["ab", "xaby"], ["xaby z"], "x", True),
    (["\n", "\n\n"], ["a\n\nb"], "a", True),
]


def run(stops, pieces):
    f = StopFilter(stops)
    out = [p for text, sp in pieces for p in f.feed(text, sp)] + f.finish()
    return "".join(t for t, _ in out), f.stopped, out


@pytest.mark.parametrize("stops,output,kept,stopped", CASES)
def test_cut_at_first_stop_for_every_split(stops, output, kept, stopped):
    for label, pieces in splits(output, random_splits=50, seed=7):
        text, was_stopped, out = run(stops, pieces)
        assert (text, was_stopped) == (kept, stopped), label
        assert all(t for t, _ in out), "no empty pieces"
        assert [t for t, sp in out if sp] == [t for t, sp in pieces if sp and t in kept], label


def test_text_is_released_as_soon_as_it_cannot_start_a_stop():
    f = StopFilter(["END"])
    assert f.feed("The E") == [("The ", False)]
    assert f.feed("x") == [("Ex", False)]
    assert f.feed("EN") == []
    assert f.feed("D and more") == []
    assert f.stopped
    assert f.feed("ignored") == [] and f.finish() == []


def test_special_tokens_pass_through_and_release_held_text():
    f = StopFilter(["END"])
    assert f.feed("a E") == [("a ", False)]
    assert f.feed("<|eot_id|>", True) == [("E", False), ("<|eot_id|>", True)]


def test_a_long_stop_sequence_costs_memory_linear_in_its_length():
    # A set of all its proper prefixes would hold ~2e11 characters.
    f = StopFilter(["x" * 600_000 + "END"])
    assert f.feed("abc " + "x" * 1000) == [("abc ", False)]
    assert f.feed("y") == [("x" * 1000 + "y", False)]
