"""Per-token cost of the stream path: parser → ChunkBuilder → JSON/SSE bytes, for every template family.

For each family a realistic ~2000-token answer (prose, then two parallel calls — one call for v1 —
whose arguments carry a long string, then the stop token) is cut into token-sized pieces: the family's
single-token markers (``<|content|>``, ``<|reserved_special_token_249|>``, ``<|eot_id|>`` …) as special
pieces, the rest with a Llama-3-like pre-tokenizer regex (~4 characters a piece). One run feeds every
piece to a fresh parser and builder, exactly as the server does per TGI token event; the figure is the
median over runs of (run time / pieces). Stages, each timed on its own:

    parse           parser.feed(piece, special) per piece, parser.finish()
    +chunks         … and ChunkBuilder.feed(events) / finish()
    +sse orjson     … and encode_sse(chunk) for every chunk (what the gateway ships)
    +sse json       … the same encoding with the standard library (json.dumps, compact), for comparison
    answer+stop     the server's whole per-answer pipeline, ``streaming.Answer`` (client stop filter →
                    parser → chunks) with two client stop sequences that never match (CLIENT_STOPS),
                    + orjson SSE
    answer+lp       (``--logprobs`` only) the same with ``logprobs: true, top_logprobs: 2``:
                    ``streaming.ScoredAnswer`` over the tracking parser, each piece scored with two
                    alternatives, the chunks carrying their tokens' entries

``--micro`` times single steps instead (best of 7 ``timeit`` repeats): one chunk's SSE encoding with orjson
and with the standard library, a call id's random characters, a chunk built by copy vs as one literal,
``ChunkBuilder.feed``'s inlined per-token path vs the general one, and building a :class:`StopFilter`
(typical sequences, new sequences each time, one long sequence: time and peak memory).

Run from the repository root:

    .venv/bin/python benchmarks/bench_stream.py [--runs 15] [--family v3.llama3 ...]
    .venv/bin/python benchmarks/bench_stream.py --micro
    .venv/bin/python benchmarks/bench_stream.py --runs 15 --logprobs
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import re
import statistics
import sys
import time
import timeit
import tracemalloc
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tgi_gateway.prompting.parse import PARSERS, TRACKED_PARSERS
from tgi_gateway.prompting.types import TextDelta, Version
from tgi_gateway.stop_sequences import StopFilter
from tgi_gateway.streaming import (
    Answer,
    ChunkBuilder,
    ResponseContext,
    ScoredAnswer,
    _random_alnum,
    collect,
    encode_sse,
)

# Llama-3's pre-tokenizer, approximately (Python's re has no \p{L}): contractions, words with one leading
# non-letter, 1-3 digits, punctuation runs, newlines, spaces.
PRETOKEN = re.compile(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|(?:[^\r\n\w]|_)?[^\W\d_]+|\d{1,3}| ?(?:[^\s\w]|_)+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
MAX_PIECE = 8  # BPE splits longer words; cap pieces so the average stays near a real tokenizer's

_PROSE = (
    "the weather in Paris is mild today with light winds from the west and a chance of rain later "
    "in the evening temperatures will reach 18 degrees Celsius while humidity stays near 70 percent "
    "I can also check the forecast for the weekend if you like Lyon Marseille Zürich São Paulo café "
    "according to the latest report there are 3 warnings in effect for coastal regions"
)
WORDS = _PROSE.split()

# The family's markers that are one token in its tokenizer (sent by TGI as one token event).
SPECIAL = {
    Version.V1: ("<|START_OF_FUNCTION_CALL|>", "<|END_OF_FUNCTION_CALL|>", "<|END_OF_ASSISTANT|>"),
    Version.V2: ("<|from|>", "<|recipient|>", "<|content|>", "<|stop|>"),
    Version.V2_LLAMA3: ("<|reserved_special_token_249|>", "<|eot_id|>"),
    Version.V3_LLAMA3: ("<|eot_id|>",),
    Version.V3_LLAMA31: ("<|python_tag|>", "<|eom_id|>", "<|eot_id|>"),
}


def prose(rng: random.Random, n_words: int) -> str:
    out: list[str] = []
    for i in range(n_words):
        w = rng.choice(WORDS)
        out.append(w)
        if i % 17 == 16:
            out[-1] += "."
        if i % 61 == 60:
            out[-1] += "\n\n"
    return " ".join(out).replace("\n\n ", "\n\n")


def answer(version: Version) -> str:
    """A realistic answer of ~2000 tokens for `version` (auto tool choice: generation prefix "")."""
    rng = random.Random(1234)
    text = prose(rng, 850)
    a1 = json.dumps({"city": "Paris", "unit": "celsius", "days": 3})
    a2 = json.dumps(
        {"title": "Weekly weather report", "body": prose(rng, 800), "tags": ["weather", "paris", "report"]},
        ensure_ascii=False,
    )
    if version is Version.V1:  # one call at most
        return f"{text}\n<|START_OF_FUNCTION_CALL|>create_document:\n{a2}<|END_OF_FUNCTION_CALL|>"
    if version is Version.V2:
        seg = "\n<|from|>assistant\n<|recipient|>"
        calls = f"{seg}get_weather\n<|content|>{a1}{seg}create_document\n<|content|>{a2}"
        return f"all\n<|content|>{text}{calls}<|stop|>"
    if version is Version.V2_LLAMA3:
        sep = "<|reserved_special_token_249|>"
        return f"{text}{sep}get_weather\n{a1}{sep}create_document\n{a2}<|eot_id|>"
    if version is Version.V3_LLAMA3:
        return f"all\n{text}>>>get_weather\n{a1}>>>create_document\n{a2}<|eot_id|>"
    if version is Version.V3_LLAMA31:
        return (
            f"{text}<function=get_weather>{a1}</function><function=create_document>{a2}</function><|eom_id|>"
        )
    raise ValueError(version)


def tokenize(text: str, special: tuple[str, ...]) -> list[tuple[str, bool]]:
    """Token-sized pieces: special markers whole (flagged), the rest by PRETOKEN, capped at MAX_PIECE."""
    pieces: list[tuple[str, bool]] = []
    for part in re.split("(" + "|".join(map(re.escape, special)) + ")", text):
        if part in special:
            pieces.append((part, True))
            continue
        for m in PRETOKEN.finditer(part):
            s = m.group()
            pieces.extend((s[i : i + MAX_PIECE], False) for i in range(0, len(s), MAX_PIECE))
    assert "".join(t for t, _ in pieces) == text, "the pieces must cover the text"
    return pieces


def context() -> ResponseContext:
    return ResponseContext(id="chatcmpl-bench", created=1_732_000_000, model="meetkai/functionary-small-v3.2")


def json_sse(chunk: dict) -> bytes:
    return b"data: " + json.dumps(chunk, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def run_parse(parser_cls: type, pieces: list[tuple[str, bool]]) -> int:
    p = parser_cls(prefix="")
    feed = p.feed
    n = 0
    for text, special in pieces:
        n += len(feed(text, special))
    return n + len(p.finish())


def run_chunks(parser_cls: type, pieces: list[tuple[str, bool]]) -> int:
    p = parser_cls(prefix="")
    b = ChunkBuilder(context())
    feed, bfeed = p.feed, b.feed
    n = 0
    for text, special in pieces:
        n += len(bfeed(feed(text, special)))
    return n + len(b.feed(p.finish())) + len(b.finish("eos_token"))


def make_run_sse(encode: Callable[[dict], bytes]) -> Callable[[type, list[tuple[str, bool]]], int]:
    def run_sse(parser_cls: type, pieces: list[tuple[str, bool]]) -> int:
        p = parser_cls(prefix="")
        b = ChunkBuilder(context())
        feed, bfeed = p.feed, b.feed
        size = 0
        for text, special in pieces:
            for chunk in bfeed(feed(text, special)):
                size += len(encode(chunk))
        for chunk in b.feed(p.finish()) + b.finish("eos_token"):
            size += len(encode(chunk))
        return size

    return run_sse


# An agent's stop sequences: the first character of one of them ("\n") is common in the answers.
CLIENT_STOPS = ("\nObservation:", "</answer>")


def run_answer(parser_cls: type, pieces: list[tuple[str, bool]]) -> int:
    a = Answer(parser_cls(prefix=""), context(), CLIENT_STOPS, stream=True)
    feed = a.feed
    size = 0
    for text, special in pieces:
        for chunk in feed(text, special):
            size += len(encode_sse(chunk))
    for chunk in a.finish("eos_token"):
        size += len(encode_sse(chunk))
    return size


def run_logprobs(parser_cls: type, pieces: list[tuple[str, bool]]) -> int:
    version = next(v for v, cls in PARSERS.items() if cls is parser_cls)
    ctx = ResponseContext(id="chatcmpl-bench", created=1_732_000_000, model="m", logprobs=True)
    a = ScoredAnswer(TRACKED_PARSERS[version](prefix=""), ctx, CLIENT_STOPS, stream=True, top_n=2)
    feed, score = a.feed, a.score
    size = 0
    for text, special in pieces:
        score(text, -0.25, ((text, -0.25), ("alt", -1.5)))
        for chunk in feed(text, special):
            size += len(encode_sse(chunk))
    for chunk in a.finish("eos_token"):
        size += len(encode_sse(chunk))
    return size


STAGES: dict[str, Callable[[type, list[tuple[str, bool]]], int]] = {
    "parse": run_parse,
    "+chunks": run_chunks,
    "+sse orjson": make_run_sse(encode_sse),
    "+sse json": make_run_sse(json_sse),
    "answer+stop": run_answer,
}


def time_stages(parser_cls: type, pieces: list[tuple[str, bool]], runs: int) -> dict[str, list[int]]:
    """ns per run for every stage; runs are interleaved across stages so a burst of load on the machine
    (2 shared cores) hits all stages alike instead of skewing one."""
    times: dict[str, list[int]] = {name: [] for name in STAGES}
    for run in STAGES.values():
        run(parser_cls, pieces)  # warm-up
    for _ in range(runs):
        for name, run in STAGES.items():
            gc.collect()
            t0 = time.perf_counter_ns()
            run(parser_cls, pieces)
            times[name].append(time.perf_counter_ns() - t0)
    return times


def micro() -> None:
    """Single steps, µs per call (best of 7 repeats)."""

    def best(f: Callable[[], object], n: int = 200_000) -> float:
        return min(timeit.repeat(f, number=n, repeat=7)) / n * 1e6

    ctx = context()
    builder = ChunkBuilder(ctx)
    builder.feed([TextDelta("Hi")])
    chunk = builder.feed([TextDelta(" weather")])[0]
    base = {"id": ctx.id, "object": "chat.completion.chunk", "created": ctx.created, "model": ctx.model}
    one = [TextDelta(" x")]

    def copied() -> dict:
        c = base.copy()
        c["choices"] = [{"index": 0, "delta": {"content": "x"}, "logprobs": None, "finish_reason": None}]
        return c

    def literal() -> dict:
        return {
            "id": ctx.id,
            "object": "chat.completion.chunk",
            "created": ctx.created,
            "model": ctx.model,
            "choices": [{"index": 0, "delta": {"content": "x"}, "logprobs": None, "finish_reason": None}],
        }

    fresh = iter(range(10**9))
    rows: list[tuple[str, Callable[[], object], int]] = [
        ("encode_sse (orjson), one text chunk", lambda: encode_sse(chunk), 200_000),
        ("json.dumps (compact) + SSE framing, same chunk", lambda: json_sse(chunk), 200_000),
        ("_random_alnum(24)", lambda: _random_alnum(24), 200_000),
        ("a chunk as base.copy() + choices", copied, 200_000),
        ("a chunk as one dict literal", literal, 200_000),
        ("ChunkBuilder.feed, one TextDelta (inlined path)", lambda: builder.feed(one), 200_000),
        ("ChunkBuilder._feed, one TextDelta (general path)", lambda: builder._feed(one), 200_000),
        ("StopFilter(CLIENT_STOPS), the same sequences again", lambda: StopFilter(CLIENT_STOPS), 20_000),
        (
            "StopFilter, new sequences each time",
            lambda: StopFilter([f"\nStep {next(fresh)}:", "</a>"]),
            2_000,
        ),
    ]
    for name, f, n in rows:
        print(f"{name:<52} {best(f, n):8.2f} µs")
    for length in (5_000, 20_000):
        tracemalloc.start()
        t0 = time.perf_counter()
        StopFilter(["x" * length])
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        label = f"StopFilter(['x' * {length:,}])"
        print(f"{label:<52} {elapsed * 1e3:8.2f} ms, peak {peak / 1e6:.1f} MB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=15, help="timed runs per stage (median reported)")
    ap.add_argument("--family", action="append", choices=[str(v) for v in PARSERS], help="default: all")
    ap.add_argument("--micro", action="store_true", help="time single steps instead (see the docstring)")
    ap.add_argument("--logprobs", action="store_true", help="add the answer+lp stage (logprobs: true)")
    args = ap.parse_args(argv)
    if args.logprobs:
        STAGES["answer+lp"] = run_logprobs
    if args.micro:
        micro()
        return 0
    families = [Version(f) for f in args.family] if args.family else list(PARSERS)

    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    print(f"python {sys.version.split()[0]}; median of {args.runs} runs; µs per token (piece)\n")
    head = f"{'family':<12} {'tokens':>6} {'chunks':>6} {'calls':>5}" + "".join(f" {s:>12}" for s in STAGES)
    head += f" {'min orjson':>12}"
    print(head)
    print("-" * len(head))
    for version in families:
        parser_cls = PARSERS[version]
        pieces = tokenize(answer(version), SPECIAL[version])
        # What the answer parses to, so a broken parser shows up here rather than as a fast number.
        p = parser_cls(prefix="")
        events = [ev for text, special in pieces for ev in p.feed(text, special)] + p.finish()
        message = collect(events, "eos_token", context())["message"]
        n_calls = len(message.get("tool_calls") or [])
        n_chunks = run_chunks(parser_cls, pieces)
        row = f"{version!s:<12} {len(pieces):>6} {n_chunks:>6} {n_calls:>5}"
        times = time_stages(parser_cls, pieces, args.runs)
        for name in STAGES:
            row += f" {statistics.median(times[name]) / len(pieces) / 1000:>12.2f}"
        row += f" {min(times['+sse orjson']) / len(pieces) / 1000:>12.2f}"
        print(row, flush=True)
    print("\nchunk building + encoding per token = '+sse orjson' − 'parse'.")
    print("min orjson: the fastest run of '+sse orjson' (on a shared machine medians can be noisy).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
