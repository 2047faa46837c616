"""logprobs: which tokens are listed (golden tables per template version), when, and the same for stream
and non-stream whatever the split of the output into pieces.

Each case is a model answer as TGI's tokens (plain texts and special tokens) and the texts of the tokens
``logprobs.content`` must list (the rule: tgi_gateway/logprobs.py, docs/architecture.md). Each case is run
through ``streaming.ScoredAnswer`` three ways, as the server does and more:

* non-stream: every token scored, the text fed in runs (``server.chat._pieces``), the message's list;
* stream: one ``score`` + ``feed`` per token, the chunks rebuilt by the official SDK's stream accumulator:
  the same entries, and each entry in the chunk that carries its token's last character;
* every split: the tokens scored up front, the output fed in every way (whole, per character, every
  2-way split, seeded random splits): the same entries.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest
from sdk_judge import sdk_rebuild
from splits import Item, splits

from tgi_gateway.logprobs import FLOOR, ContentTokens, entry
from tgi_gateway.prompting import Template, Version, normalize
from tgi_gateway.streaming import ResponseContext, ScoredAnswer

V1, V2, V2L, V3, V31 = Version.V1, Version.V2, Version.V2_LLAMA3, Version.V3_LLAMA3, Version.V3_LLAMA31
FN = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
TIME = {"name": "get_time", "parameters": {"type": "object", "properties": {}}}
USER = [{"role": "user", "content": "Weather in Hanoi?"}]
TOOLS = {
    "messages": USER,
    "tools": [{"type": "function", "function": FN}, {"type": "function", "function": TIME}],
}
FUNCTIONS = {"messages": USER, "functions": [FN, TIME]}
CODE = {"messages": USER, "tools": [{"type": "code_interpreter"}]}
ARGS = ['{"', "city", '":', ' "', "Hanoi", '"}']  # '{"city": "Hanoi"}'


def sp(text: str) -> tuple[str, bool]:
    return (text, True)


EOT, EOM, SEP = sp("<|eot_id|>"), sp("<|eom_id|>"), sp("<|reserved_special_token_249|>")
START, EOF, EOA = sp("<|START_OF_FUNCTION_CALL|>"), sp("<|END_OF_FUNCTION_CALL|>"), sp("<|END_OF_ASSISTANT|>")
FROM, REC, CONT, STOP = sp("<|from|>"), sp("<|recipient|>"), sp("<|content|>"), sp("<|stop|>")

Token = str | tuple[str, bool]


@dataclass
class Case:
    name: str
    version: Version
    body: dict[str, Any]
    tokens: list[Token]
    listed: list[str]  # the texts of the tokens logprobs.content lists, in order
    content: str | None  # the message's content (what the listed tokens are read against)
    stop: list[str] = field(default_factory=list)


# fmt: off
CASES = [
    # v1: SentencePiece words start with a space; the first one's is dropped by the strip, yet it is listed
    Case("v1 text then call", V1, FUNCTIONS,
         [" Let", " me", " check", ".", "\n", START, "get", "_weather", ":", "\n", *ARGS, EOF],
         [" Let", " me", " check", "."], "Let me check."),
    Case("v1 client stop inside a token", V1, FUNCTIONS, ["It", " is", " sunny", " today", EOA],
         ["It", " is"], "It is", stop=["sun"]),
    # v2: the recipient, role and markers are no content
    Case("v2 text then call", V2, TOOLS,
         ["all", "\n", CONT, " Checking", ".", "\n", FROM, " assistant", "\n", REC, " get", "_time", "\n", CONT,
          "{}", STOP],
         [" Checking", "."], "Checking."),
    Case("v2 two text segments (joined with \\n, which no token holds)", V2, TOOLS,
         ["all", CONT, " A", ".", FROM, "assistant", REC, "all", CONT, " B", STOP],
         [" A", ".", " B"], "A.\nB"),
    Case("v2 client stop", V2, TOOLS, ["all", CONT, " Hi", " STOP", " there", STOP], [" Hi"], "Hi",
         stop=["STOP"]),
    # v2.llama3
    Case("v2.llama3 text then calls", V2L, TOOLS,
         ["Checking", " both", ".", SEP, "get_weather", "\n", *ARGS, SEP, "get_time", "\n", "{}", EOT],
         ["Checking", " both", "."], "Checking both."),
    Case("v2.llama3 only calls", V2L, TOOLS, [SEP, "get_time", "\n", "{}", EOT], [], None),
    Case("v2.llama3 a marker's start held, then text", V2L, TOOLS, ["Use", " <|res", "erved", " x", EOT],
         ["Use", " <|res", "erved", " x"], "Use <|reserved x"),
    # v3.llama3: "all\n" is the recipient; a token running into ">>>" is not content
    Case("v3.llama3 text, call, text", V3, TOOLS,
         ["all", "\n", "Let", " me", " look", ".>>>", "get_weather", "\n", *ARGS, ">>>", "all", "\n", "Done", "!",
          EOT],
         ["Let", " me", " look", "Done", "!"], "Let me look.\nDone!"),
    Case("v3.llama3 held-back marker released as text", V3, TOOLS,
         ["all", "\n", "a", ">>", " b", EOT], ["a", ">>", " b"], "a>> b"),
    Case("v3.llama3 client stop across tokens", V3, TOOLS, ["all", "\n", "One", " E", "ND", " x", EOT],
         ["One"], "One", stop=["END"]),
    Case("v3.llama3 recipient and text in one token", V3, TOOLS, ["all\nHi", " there", EOT], [" there"],
         "Hi there"),
    # v3-llama3.1: only the ends of the whole output are stripped
    Case("v3-llama3.1 text, blank start and end", V31, TOOLS, ["  ", "It", " is", " sunny", ".", "\n", EOT],
         ["It", " is", " sunny", "."], "It is sunny."),
    Case("v3-llama3.1 text then call (held space released at the call)", V31, TOOLS,
         ["Let", " me", " check", ". ", "<function=", "get_weather", ">", *ARGS, "</function>", EOM],
         ["Let", " me", " check", ". "], "Let me check. "),
    Case("v3-llama3.1 a character split over tokens (empty texts)", V31, TOOLS, ["Caf", "", "", "é", "!", EOT],
         ["Caf", "", "", "é", "!"], "Café!"),
    Case("v3-llama3.1 empty token before a marker is dropped", V31, TOOLS,
         ["Hi", "", "<function=", "get_time", ">", "{}", "</function>", EOM], ["Hi"], "Hi"),
    Case("v3-llama3.1 a marker's start held, then text", V31, TOOLS, ["a", " <fun", "ny>", EOT],
         ["a", " <fun", "ny>"], "a <funny>"),
    Case("v3-llama3.1 client stop ends inside a token", V31, TOOLS, ["Line", ".\n", "\nMore", EOT], ["Line"],
         "Line.", stop=["\n\n"]),
    Case("v3-llama3.1 python", V31, CODE, [sp("<|python_tag|>"), "x", " =", " 2", EOM], [], None),
]
# fmt: on


def text_of(token: Token) -> str:
    return token if isinstance(token, str) else token[0]


def logprob_of(k: int) -> float:
    return -0.125 * (k + 1)


def top_of(k: int, text: str) -> list[tuple[str, float | None]]:
    return [(text + "~", logprob_of(k) - 1), (text, logprob_of(k)), ("?", None)]


def items(tokens: list[Token]) -> list[Item]:
    """The output for `splits`: plain runs (cut anywhere) and special tokens (whole)."""
    out: list[Item] = []
    for token in tokens:
        if isinstance(token, str):
            if out and isinstance(out[-1], str):
                out[-1] += token
            elif token:
                out.append(token)
        else:
            out.append(token)
    return out


def answer(case: Case, *, stream: bool) -> ScoredAnswer:
    prompt = normalize(case.body)
    ctx = ResponseContext.for_prompt(prompt, "m", logprobs=True)
    return ScoredAnswer(
        Template(case.version).parser(prompt, tracked=True), ctx, case.stop, stream=stream, top_n=2
    )


def score_all(a: ScoredAnswer, tokens: list[Token]) -> None:
    for k, token in enumerate(tokens):
        a.score(text_of(token), logprob_of(k), top_of(k, text_of(token)))


def entries_of(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for c in chunks for ch in c["choices"] for e in ((ch["logprobs"] or {}).get("content") or [])]


def non_stream(case: Case) -> dict[str, Any]:
    a = answer(case, stream=False)
    score_all(a, case.tokens)
    run: list[str] = []
    for token in case.tokens:  # as server.chat._pieces: runs of plain tokens, each special alone
        if isinstance(token, str):
            run.append(token)
            continue
        if run:
            a.feed("".join(run))
            run = []
        a.feed(token[0], True)
    if run:
        a.feed("".join(run))
    a.finish("eos_token")
    return a.message("eos_token")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_listed_tokens_golden(case: Case) -> None:
    message = non_stream(case)
    assert message["message"]["content"] == case.content
    listed = message["logprobs"]["content"]
    assert [e["token"] for e in listed] == case.listed
    assert message["logprobs"]["refusal"] is None
    # each entry is its token's: its logprob (they are all distinct), bytes, two best alternatives
    texts = [text_of(t) for t in case.tokens]
    for e in listed:
        k = next(k for k, t in enumerate(texts) if t == e["token"] and logprob_of(k) == e["logprob"])
        assert e == entry(texts[k], logprob_of(k), top_of(k, texts[k]), 2)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_stream_lists_each_token_with_its_last_character(case: Case) -> None:
    expected = non_stream(case)
    a = answer(case, stream=True)
    chunks = []
    for k, token in enumerate(case.tokens):
        a.score(text_of(token), logprob_of(k), top_of(k, text_of(token)))
        for c in a.feed(text_of(token), not isinstance(token, str)):
            chunks.append(c)
            listed = [e["token"] for e in entries_of([c]) if e["token"]]
            if listed:  # the chunk carries the last character of its last token (tokens end in content)
                assert listed[-1][-1] in c["choices"][0]["delta"]["content"], (c, listed)
    chunks += a.finish("eos_token")
    assert entries_of(chunks) == expected["logprobs"]["content"]
    _, choice = sdk_rebuild(chunks)  # the SDK's accumulator gathers the same logprobs, [] when none is listed
    assert choice.logprobs is not None, "the finish chunk says so when no chunk listed a token"
    assert choice.logprobs.model_dump() == expected["logprobs"]
    assert choice.message.content == expected["message"]["content"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_split_lists_the_same_tokens(case: Case) -> None:
    expected = non_stream(case)["logprobs"]["content"]
    for label, pieces in itertools.islice(
        splits(items(case.tokens), random_splits=30, seed=len(case.name)), 400
    ):
        a = answer(case, stream=True)
        score_all(a, case.tokens)
        chunks = [c for text, special in pieces for c in a.feed(text, special)] + a.finish("eos_token")
        assert entries_of(chunks) == expected, label


def test_stream_golden_chunks() -> None:
    """Where each entry goes: with the chunk releasing its token's last character, held-back text included."""
    case = next(c for c in CASES if c.name == "v3.llama3 held-back marker released as text")
    a = answer(case, stream=True)
    out = []
    for k, token in enumerate(case.tokens):
        a.score(text_of(token), logprob_of(k))
        out += [
            (c["choices"][0]["delta"].get("content"), [e["token"] for e in entries_of([c])])
            for c in a.feed(text_of(token), not isinstance(token, str))
        ]
    assert out == [("", []), ("a", ["a"]), (">> b", [">>", " b"])]
    case = next(c for c in CASES if c.name.startswith("v3-llama3.1 text then call"))
    a = answer(case, stream=True)
    out = []
    for k, token in enumerate(case.tokens):
        a.score(text_of(token), logprob_of(k))
        out += [
            (c["choices"][0]["delta"].get("content"), [e["token"] for e in entries_of([c])])
            for c in a.feed(text_of(token), not isinstance(token, str))
            if "content" in c["choices"][0]["delta"]
        ]
    assert out == [
        ("", []),
        ("Let", ["Let"]),
        (" me", [" me"]),
        (" check", [" check"]),
        (".", []),
        (" ", [". "]),
    ]


def test_entry_shape() -> None:
    e = entry("é", -0.5, [("a", -2.0), ("é", -0.5), ("b", None), ("c", -1.0)], 2)
    assert e == {
        "token": "é",
        "logprob": -0.5,
        "bytes": [0xC3, 0xA9],
        "top_logprobs": [
            {"token": "é", "logprob": -0.5, "bytes": [0xC3, 0xA9]},
            {"token": "c", "logprob": -1.0, "bytes": [0x63]},
        ],
    }
    assert entry("x", None, [("y", None)], 0) == {
        "token": "x",
        "logprob": FLOOR,
        "bytes": [0x78],
        "top_logprobs": [],
    }
    assert entry("x", -1.0, [("y", None)], 5)["top_logprobs"] == [
        {"token": "y", "logprob": FLOOR, "bytes": [0x79]}
    ]


def test_content_tokens_decides_each_token_once() -> None:
    tokens = ContentTokens(0)
    for text in ("ab", "c", "", "de", "f"):
        tokens.add(text, -1.0)
    # "ab" [0,2) is content, "c" [2,3) is not (a gap), "" and "de" [3,5) content, "f" [5,6) dropped lead only
    assert [e["token"] for e in tokens.release([(0, 2, True)])] == ["ab"]
    assert [e["token"] for e in tokens.release([(3, 5, True)])] == ["", "de"]
    assert tokens.release([(5, 6, False)]) == []
    assert tokens.release([(6, 9, True)]) == []  # nothing left
