"""parse.<Family>Parser: golden tables per family, split invariance on every case, emission timing, fuzz.

Each golden case is (id, prefix, output, expected): the output is a list of plain-text strings and
special tokens (``special("<|eot_id|>")``); expected is ``(content, [(name, arguments), ...])`` or the
exact coalesced event list. Every case is parsed whole, one character at a time, at every 2-way split
and at 50 seeded random splits, and must give the same coalesced events each time; unless it holds a
special EOS token (``</s>``, ``<|endoftext|>``), it is also parsed with its special tokens produced as
plain text, with the same result. Ids starting with "diff:" pin a row of the "deliberate differences
from functionary" table in docs/architecture.md; the last row of that table (empty text → no content)
is checked on every case: a case whose content is "" must produce no TextDelta at all.
"""

from __future__ import annotations

import random

import pytest
from splits import check_well_formed, coalesce, plain, special, splits, summary, whole

from tgi_gateway.prompting.parse import (
    PARSERS,
    STOP_TOKENS,
    V1Parser,
    V2Llama3Parser,
    V2Parser,
    V3Llama3Parser,
    V31Parser,
)
from tgi_gateway.prompting.types import TextDelta, ToolCallArgs, ToolCallEnd, ToolCallStart, Version

W = '{"location": "Hanoi"}'
T = '{"timezone": "Asia/Ho_Chi_Minh"}'
HA = '{"location": "Ha'  # arguments cut short
CODE = 'import math\n\nfor i in range(3):\n    print(f"{i}: {math.pi:.2f}")'
ONE_W = [("get_weather", W)]
TWO = [("get_weather", W), ("get_time", T)]
CUT_W = [("get_weather", HA)]
EOS = special("</s>")
EOT, EOM, EOTEXT = special("<|eot_id|>"), special("<|eom_id|>"), special("<|end_of_text|>")


def run(cls, prefix, pieces):
    parser = cls(prefix)
    events = []
    for text, is_special in pieces:
        events += parser.feed(text, is_special)
    return events + parser.finish()


def parse_every_way(cls, prefix, output, random_splits=50):
    """The coalesced events, after checking that every split (and the plain variant) gives them."""
    expected = coalesce(run(cls, prefix, whole(output)))
    check_well_formed(expected)
    variants = [output]
    if not any(isinstance(i, tuple) and i[0] in ("</s>", "<|endoftext|>") for i in output):
        variants.append(plain(output))
    for variant in variants:
        for label, pieces in splits(variant, random_splits):
            events = run(cls, prefix, pieces)
            check_well_formed(events)
            assert coalesce(events) == expected, (label, pieces)
    return expected


def check(cls, prefix, output, expected):
    events = parse_every_way(cls, prefix, output)
    if isinstance(expected, tuple):
        assert summary(events) == expected
        if not expected[0]:
            assert not any(isinstance(e, TextDelta) for e in events)  # blank text is no content
    else:
        assert events == expected


def cases(rows):
    return [pytest.param(*row[1:], id=row[0]) for row in rows]


# ---------------------------------------------------------------------------------------------
# v1
# ---------------------------------------------------------------------------------------------

START = "<|START_OF_FUNCTION_CALL|>"
EOA, EOF = "<|END_OF_ASSISTANT|>", "<|END_OF_FUNCTION_CALL|>"
V1_CASES = [
    ("text", "", [" Hello there. \n", special(EOA)], ("Hello there.", [])),
    ("text, stop as text", "", [f"Hello{EOA}ignored"], ("Hello", [])),
    ("call", "", [START, "get_weather:\n", W, special(EOF)], ("", ONE_W)),
    ("text then call", "", ["Let me see.\n", START, f"get_weather:\n{W}\n{EOF}x"], ("Let me see.", ONE_W)),
    ("python", "", [START, "python:\n", CODE, "\n\n"], ("", [("python", CODE)])),
    ("name stripped", "", [START, "  get_weather  :  {}  "], ("", [("get_weather", "{}")])),
    ("second START is arguments", "", [START, f"f:{START}g:{{}}"], ("", [("f", f"{START}g:{{}}")])),
    ("cut mid-name", "", ["Hi ", START, "get_wea"], ("Hi", [("get_wea", "")])),
    ("cut mid-arguments", "", [START, f"get_weather:\n{HA}"], ("", CUT_W)),
    ("stop inside name", "", [START, f"get_weather{EOA}:{{}}"], ("", [("get_weather", "")])),
    ("START with blank name", "", ["Hi", START, "  \n"], ("Hi", [])),
    ("blank name before colon", "", [START, ":{}"], ("", [("", "{}")])),
    ("colon in text", "", ["Note: a: b"], ("Note: a: b", [])),
    ("EOS special ends", "", ["Hello", EOS, " world"], ("Hello", [])),
    ("EOS as plain text", "", ["<b>x</b> a </s> b"], ("<b>x</b> a </s> b", [])),
    ("empty", "", [], ("", [])),
]


@pytest.mark.parametrize("prefix,output,expected", cases(V1_CASES))
def test_v1(prefix, output, expected):
    check(V1Parser, prefix, output, expected)


# ---------------------------------------------------------------------------------------------
# v2 (the prompt ended with <|recipient|>)
# ---------------------------------------------------------------------------------------------

FROM, REC, CONT, STOP = "<|from|>", "<|recipient|>", "<|content|>", "<|stop|>"


def seg(recipient, content):
    """A following v2 segment, as the model writes it."""
    return f"\n{FROM}assistant\n{REC}{recipient}\n{CONT}{content}"


V2_CASES = [
    ("text", "", ["all\n", CONT, "Hello there.", special(STOP)], ("Hello there.", [])),
    ("call", "", [f"get_weather\n{CONT}{W}", special(STOP)], ("", ONE_W)),
    ("parallel calls", "", [f"get_weather\n{CONT}{W}", seg("get_time", T), STOP], ("", TWO)),
    ("text then calls", "", [f"all\n{CONT}Checking.", seg("get_weather", W)], ("Checking.", ONE_W)),
    ("calls then text", "", [f"get_weather\n{CONT}{W}", seg("all", "Done.")], ("Done.", ONE_W)),
    (
        "diff: several text segments joined",
        "",
        [f"all\n{CONT}One.", seg("f", "{}"), seg("all", " Two. ")],
        ("One.\nTwo.", [("f", "{}")]),
    ),
    ("blank text segment adds nothing", "", [f"all\n{CONT} \n", seg("all", "Two.")], ("Two.", [])),
    ("python", "", [f"python\n{CONT}\n{CODE}\n", STOP], ("", [("python", CODE)])),
    ("tool_choice none", f"all\n{CONT}", ["Hello", special(STOP)], ("Hello", [])),
    ("tool_choice named", f"get_weather\n{CONT}", [W, special(STOP), "junk"], ("", ONE_W)),
    ("tool_choice required", "", [f"get_time\n{CONT}{T}"], ("", [("get_time", T)])),
    (
        "SPM spaces after special tokens",
        "",
        ["all\n", special(CONT), " Hi", "\n", special(FROM), " assistant\n", special(REC)]
        + [" get_weather\n", special(CONT), ' {"a": 1}', special(STOP)],
        ("Hi", [("get_weather", '{"a": 1}')]),
    ),
    ("SPM named prefix", f"get_weather\n{CONT}", [' {"a": 1}'], ("", [("get_weather", '{"a": 1}')])),
    ("cut mid-recipient", "", ["get_wea"], ("", [("get_wea", "")])),
    ("cut after all", "", ["all\n"], ("", [])),
    ("cut mid-arguments", "", [f"get_weather\n{CONT}{HA}"], ("", CUT_W)),
    ("cut in next role", "", [f"all\n{CONT}Hi\n{FROM}assist"], ("Hi", [])),
    ("cut in next recipient", "", [f"all\n{CONT}Hi\n{FROM}x\n{REC}get_ti"], ("Hi", [("get_ti", "")])),
    ("stop as text", "", [f"all\n{CONT}Hi{STOP}{seg('f', '{}')}"], ("Hi", [])),
    ("EOS special ends", "", [f"all\n{CONT}Hi", EOS, seg("f", "{}")], ("Hi", [])),
    ("EOS as plain text", "", [f"all\n{CONT}a </s> b"], ("a </s> b", [])),
    ("only <|from|> is a marker in content", "", [f"all\n{CONT}a {REC} {CONT} b"], (f"a {REC} {CONT} b", [])),
    ("role text ignored", "", [f"f\n{CONT}{{}}\n{FROM}x {CONT} y{REC}all\n{CONT}z"], ("z", [("f", "{}")])),
    ("blank recipient is a call", "", [f"\n{CONT}{{}}"], ("", [("", "{}")])),
    ("empty", "", [], ("", [])),
]


@pytest.mark.parametrize("prefix,output,expected", cases(V2_CASES))
def test_v2(prefix, output, expected):
    check(V2Parser, prefix, output, expected)


# ---------------------------------------------------------------------------------------------
# v2.llama3
# ---------------------------------------------------------------------------------------------

SEP = "<|reserved_special_token_249|>"
V2L3_CASES = [
    ("text", "", ["Hello there.", EOT], ("Hello there.", [])),
    ("call", "", [special(SEP), "get_weather\n", W, EOT], ("", ONE_W)),
    ("parallel calls", "", [special(SEP), f"get_weather\n{W}", special(SEP), f"get_time\n{T}"], ("", TWO)),
    ("text then calls", "", [f"Checking.\n{SEP}get_weather\n{W}{SEP}get_time\n{T}"], ("Checking.", TWO)),
    ("python", "", [special(SEP), f"python\n{CODE}\n", EOT], ("", [("python", CODE)])),
    ("tool_choice none", "", ["Hi"], ("Hi", [])),
    ("tool_choice required", SEP, [f"get_weather\n{W}"], ("", ONE_W)),
    ("tool_choice named", f"{SEP}get_weather\n", [W, EOT], ("", ONE_W)),
    ("diff: whitespace-only text before calls", "", [" \n ", special(SEP), "f\n{}"], ("", [("f", "{}")])),
    ("diff: empty output", "", [], ("", [])),
    ("empty output with stop", "", [EOT], ("", [])),
    ("diff: name without newline (cut)", "", [special(SEP), "get_wea"], ("", [("get_wea", "")])),
    ("name without newline then SEP", "", [f"{SEP}f{SEP}g\n{{}}"], ("", [("f", ""), ("g", "{}")])),
    ("cut mid-arguments", "", [special(SEP), f"get_weather\n{HA}"], ("", CUT_W)),
    ("blank chunks", "", [f"{SEP}{SEP}  \n {SEP}\n\n get_weather \n {W} \n{SEP}"], ("", ONE_W)),
    ("stop as text", "", [f"Hi<|end_of_text|>{SEP}f\n{{}}"], ("Hi", [])),
    ("eom special inside arguments", "", [f"{SEP}f\n{{", EOM, "}"], ("", [("f", "{")])),
    ("end_of_text special", "", ["Hi", EOTEXT, "more"], ("Hi", [])),
    ("EOS special ends", "", ["Hi", special("<|endoftext|>"), "more"], ("Hi", [])),
    ("EOS as plain text", "", ["Hi <|endoftext|> </s>"], ("Hi <|endoftext|> </s>", [])),
    ("other reserved tokens are text", "", [f"a {SEP[:-4]}|> b"], (f"a {SEP[:-4]}|> b", [])),
]


@pytest.mark.parametrize("prefix,output,expected", cases(V2L3_CASES))
def test_v2_llama3(prefix, output, expected):
    check(V2Llama3Parser, prefix, output, expected)


# ---------------------------------------------------------------------------------------------
# v3.llama3 (the prompt ended with >>>)
# ---------------------------------------------------------------------------------------------

V3_CASES = [
    ("text", "", ["all\nHello there.", EOT], ("Hello there.", [])),
    ("call", "", [f"get_weather\n{W}", EOT], ("", ONE_W)),
    ("parallel calls", "", [f"get_weather\n{W}>>>get_time\n{T}"], ("", TWO)),
    ("text then calls", "", [f"all\nChecking.\n>>>get_weather\n{W}"], ("Checking.", ONE_W)),
    ("calls then text", "", [f"get_weather\n{W}\n>>>all\nDone."], ("Done.", ONE_W)),
    ("diff: several text segments joined", "", ["all\nOne. >>>all\n  Two.>>>all\n\n"], ("One.\nTwo.", [])),
    ("python", "", [f"python\n{CODE}\n", EOM], ("", [("python", CODE)])),
    ("tool_choice none", "all\n", ["Hello", EOT], ("Hello", [])),
    ("tool_choice named", "get_weather\n", [W, EOT], ("", ONE_W)),
    ("tool_choice required", "", [f"get_time\n{T}"], ("", [("get_time", T)])),
    ("whitespace before and around the name", "", [f" \n get_weather \n{W}"], ("", ONE_W)),
    (">>> inside arguments splits them", "", ['f\n{"q": "a>>>b"}'], ("", [("f", '{"q": "a'), ('b"}', "")])),
    ("diff: name without newline (cut)", "", ["get_wea"], ("", [("get_wea", "")])),
    ("diff: all without newline (cut)", "", [f"get_weather\n{W}>>>all"], ("", ONE_W)),
    ("name without newline then >>>", "", ["f>>>all\nHi"], ("Hi", [("f", "")])),
    ("cut mid-arguments", "", [f"get_weather\n{HA}"], ("", CUT_W)),
    ("stop as text", "", ["all\nHi<|eot_id|>>>>f\n{}"], ("Hi", [])),
    ("EOS special ends", "", ["all\nHi", special("<|endoftext|>"), ">>>f\n{}"], ("Hi", [])),
    ("arrows that are not the marker", "", ["all\na >> b > c ->"], ("a >> b > c ->", [])),
    ("four arrows", "", ["all\nx>>>>all\ny"], ("x", [(">all", "y")])),
    ("empty", "", [], ("", [])),
]


@pytest.mark.parametrize("prefix,output,expected", cases(V3_CASES))
def test_v3_llama3(prefix, output, expected):
    check(V3Llama3Parser, prefix, output, expected)


# ---------------------------------------------------------------------------------------------
# v3-llama3.1
# ---------------------------------------------------------------------------------------------

PY = "<|python_tag|>"


def fn(name, args):
    return f"<function={name}>{args}</function>"


A, B = fn("a", "{}"), fn("b", "{}")
HI_A = [TextDelta("Hi "), ToolCallStart(0, "a"), ToolCallArgs(0, "{}"), ToolCallEnd(0)]
AB = [("a", "{}"), ("b", "{}")]
V31_CASES = [
    ("text", "", ["Hello there.", EOT], ("Hello there.", [])),
    ("text kept inside, ends stripped", "", ["  \nHello\n\n  there.  \n"], ("Hello\n\n  there.", [])),
    ("call", "", [fn("get_weather", W), EOM], ("", ONE_W)),
    ("parallel calls", "", [fn("get_weather", W), fn("get_time", T), EOM], ("", TWO)),
    ("text then call keeps the space", "", ["Let me see. ", fn("get_weather", W)], ("Let me see. ", ONE_W)),
    ("calls then text", "", [A, "\nDone"], ("\nDone", [("a", "{}")])),
    ("blank text between calls is no content", "", [" ", A, "\n ", B, "\n"], ("", AB)),
    ("text between calls", "", ["Hi ", A, " \n ", B, " x "], ("Hi  \n  x", AB)),
    ("arguments stripped", "", ['<function= f > {"a": 1} </function>'], ("", [("f", '{"a": 1}')])),
    ("python: raw code, not lstripped", "", [special(PY), f"  {CODE}\n \n"], ("", [("python", "  " + CODE)])),
    ("text then python", "", ["Computing.\n", PY, "print(1)"], ("Computing.\n", [("python", "print(1)")])),
    ("markers inside code are code", "", [PY, f"s = '{A}'"], ("", [("python", f"s = '{A}'")])),
    ("tool_choice none", "", ["Hello", EOT], ("Hello", [])),
    ("tool_choice required", "<function=", [f"get_weather>{W}</function>", EOM], ("", ONE_W)),
    ("tool_choice named", "<function=get_weather>", [f"{W}</function>", EOM], ("", ONE_W)),
    ("diff: unclosed call is kept", "", [f"<function=get_weather>{HA}"], ("", CUT_W)),
    ("</function> in the name", "", ["<function=get_weather</function>ok"], ("ok", [("get_weather", "")])),
    ("cut mid-name", "", ["Hi <function=get_wea"], ("Hi ", [("get_wea", "")])),
    ("blank name cut", "", ["Hi <function= "], ("Hi ", [])),
    ("not markers at top level", "", ["a<b <b></function> <func"], ("a<b <b></function> <func", [])),
    ("stop as text", "", ["Hi<|eom_id|>", A], ("Hi", [])),
    ("stop inside arguments", "", ["<function=f>{", EOT, "}</function>"], ("", [("f", "{")])),
    ("EOS special ends", "", ["Hi", special("<|endoftext|>"), "more"], ("Hi", [])),
    ("EOS as plain text", "", ["<s>x</s>"], ("<s>x</s>", [])),
    ("whitespace only", "", ["  \n  "], ("", [])),
    ("exact events", "", ["Hi ", A], HI_A),
]


@pytest.mark.parametrize("prefix,output,expected", cases(V31_CASES))
def test_v3_llama31(prefix, output, expected):
    check(V31Parser, prefix, output, expected)


# ---------------------------------------------------------------------------------------------
# Registry, API contract
# ---------------------------------------------------------------------------------------------


def test_registry_and_stop_tokens():
    assert set(PARSERS) == set(Version)
    llama3 = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")
    assert STOP_TOKENS == {
        Version.V1: (EOA, EOF),
        Version.V2: (STOP,),
        Version.V2_LLAMA3: llama3,
        Version.V3_LLAMA3: llama3,
        Version.V3_LLAMA31: llama3,
    }


@pytest.mark.parametrize("cls", list(PARSERS.values()))
def test_feed_or_finish_after_finish_raises(cls):
    parser = cls()
    assert parser.finish() == []
    with pytest.raises(RuntimeError):
        parser.feed("x")
    with pytest.raises(RuntimeError):
        parser.finish()


def test_stop_closes_at_once_and_later_input_is_ignored():
    parser = V31Parser()
    assert parser.feed("<function=f>{}") == [ToolCallStart(0, "f"), ToolCallArgs(0, "{}")]
    assert not parser.stopped
    assert parser.feed("<|eom_id|>", special=True) == [ToolCallEnd(0)]
    assert parser.stopped
    assert parser.feed("more <function=g>") == []
    assert parser.finish() == []


def test_eos_special_releases_held_text_first():
    parser = V3Llama3Parser("all\n")
    assert parser.feed("a >>") == [TextDelta("a")]
    assert parser.feed("</s>", special=True) == [TextDelta(" >>")]
    assert parser.stopped


def test_prefix_events_come_with_the_first_feed_or_finish():
    assert V31Parser("<function=get_weather>").feed("") == [ToolCallStart(0, "get_weather")]
    assert V2Parser(f"get_weather\n{CONT}").finish() == [ToolCallStart(0, "get_weather"), ToolCallEnd(0)]
    events = V2Llama3Parser(f"{SEP}get_weather\n").feed("{")
    assert events == [ToolCallStart(0, "get_weather"), ToolCallArgs(0, "{")]


# ---------------------------------------------------------------------------------------------
# Emission timing: nothing is held back that cannot become a marker
# ---------------------------------------------------------------------------------------------

TEXT_START = [
    (V1Parser, ""),
    (V2Parser, f"all\n{CONT}"),
    (V2Llama3Parser, ""),
    (V3Llama3Parser, "all\n"),
    (V31Parser, ""),
]


@pytest.mark.parametrize("cls,prefix", TEXT_START)
def test_text_is_released_immediately(cls, prefix):
    parser = cls(prefix)
    assert parser.feed("The answer is") == [TextDelta("The answer is")]
    assert parser.feed(" 42") == [TextDelta(" 42")]


def test_only_a_marker_prefix_is_held():
    parser = V3Llama3Parser("all\n")
    assert parser.feed("The answer is >") == [TextDelta("The answer is")]  # " " is trailing, ">" may be ">>>"
    assert parser.feed(">") == []
    assert parser.feed("= 2") == [TextDelta(" >>= 2")]
    parser = V2Llama3Parser()
    assert parser.feed("Hi <|reserved_special") == [TextDelta("Hi")]
    assert parser.feed("_token_249|>f") == []
    assert parser.feed("\n") == [ToolCallStart(0, "f")]
    parser = V31Parser()
    assert parser.feed("x <func") == [TextDelta("x")]
    assert parser.feed("tion") == []
    assert parser.feed("al") == [TextDelta(" <functional")]


def test_arguments_stream_before_the_call_ends():
    parser = V31Parser()
    assert parser.feed("<function=get_weather>") == [ToolCallStart(0, "get_weather")]
    assert parser.feed(HA) == [ToolCallArgs(0, HA)]
    assert parser.feed('noi"}</') == [ToolCallArgs(0, 'noi"}')]
    assert parser.feed("function>") == [ToolCallEnd(0)]
    parser = V3Llama3Parser()
    assert parser.feed("get_weather") == []
    assert parser.feed(f"\n{HA}") == [ToolCallStart(0, "get_weather"), ToolCallArgs(0, HA)]


def test_trailing_whitespace_is_held_then_released_or_dropped():
    parser = V2Llama3Parser()
    assert parser.feed("  Hello ") == [TextDelta("Hello")]
    assert parser.feed("\n") == []
    assert parser.feed("world") == [TextDelta(" \nworld")]
    assert parser.feed(" \n") == []
    assert parser.finish() == []
    parser = V3Llama3Parser("f\n")
    assert parser.feed('{"a": 1} ') == [ToolCallStart(0, "f"), ToolCallArgs(0, '{"a": 1}')]
    assert parser.feed("\n>>>") == [ToolCallEnd(0)]


def test_text_segment_separator_is_lazy():
    parser = V3Llama3Parser("all\n")
    assert parser.feed("One.>>>all\n") == [TextDelta("One.")]
    assert parser.feed("  \n") == []
    assert parser.feed("Two") == [TextDelta("\nTwo")]


def test_v31_pending_whitespace_at_markers():
    parser = V31Parser()
    assert parser.feed(A) == [ToolCallStart(0, "a"), ToolCallArgs(0, "{}"), ToolCallEnd(0)]
    assert parser.feed("\n") == []
    assert parser.feed(B) == [ToolCallStart(1, "b"), ToolCallArgs(1, "{}"), ToolCallEnd(1)]
    assert parser.feed("x") == [TextDelta("\nx")]


# ---------------------------------------------------------------------------------------------
# Fuzz: any text is valid input
# ---------------------------------------------------------------------------------------------

# fmt: off
FRAGMENTS = [
    START, EOA, EOF, ":", FROM, REC, CONT, STOP, "assistant", SEP, "<|reserved_special_token_24",
    "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|eot", ">>>", ">>", ">", "<function=", "<function",
    "</function>", "</func", PY, "<|", "|>", "<", "=", "all", "python", "f", "get", "{", "}", '"a"', "\n",
    " ", "  ", "\t", "x", "é", "</s>",
]
# fmt: on
SPECIALS = [START, FROM, REC, CONT, STOP, SEP, "<|eot_id|>", "<|eom_id|>", PY, "</s>", "<|endoftext|>"]
PREFIXES = ["", "all\n", "f\n", f"all\n{CONT}", f"f\n{CONT}", SEP, f"{SEP}f\n", "<function=", "<function=f>"]


def random_output(rng):
    return [
        special(rng.choice(SPECIALS)) if rng.random() < 0.15 else rng.choice(FRAGMENTS)
        for _ in range(rng.randrange(0, 14))
    ]


@pytest.mark.parametrize("version", list(PARSERS))
def test_fuzz(version):
    cls = PARSERS[version]
    rng = random.Random(f"fuzz-{version}")
    for _ in range(1500):
        prefix, output = rng.choice(PREFIXES), random_output(rng)
        expected = coalesce(run(cls, prefix, whole(output)))
        check_well_formed(expected)
        for label, pieces in splits(output, random_splits=3, seed=rng.randrange(1 << 30)):
            if label.startswith("at ") and rng.random() < 0.9:
                continue  # every 2-way split of every string would be slow: sample them
            events = run(cls, prefix, pieces)
            check_well_formed(events)
            assert coalesce(events) == expected, (prefix, pieces)
