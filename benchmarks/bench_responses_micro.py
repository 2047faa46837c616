"""The answer pipeline per token, chat completions vs the Responses API, without I/O.

The same 128-token answers as ``bench_gateway.py`` (a text answer, and a v3-llama3.1 tool call) are fed token
by token through ``streaming.Answer`` with the chat ``ChunkBuilder`` (then ``encode_sse``) and with the
Responses ``OutputBuilder`` (then ``encode_event``), the way ``Gateway._stream`` runs them; the two alternate,
15 rounds of 100 answers each, and the minimum and median time per token are printed with the bytes written
per token. Run from the repository root::

    .venv/bin/python benchmarks/bench_responses_micro.py

Results: docs/performance.md, "The Responses API next to chat completions".
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_gateway import answer_pieces

from tgi_gateway.prompting import Template, Version, normalize
from tgi_gateway.responses.output import OutputBuilder, ResponseShape
from tgi_gateway.server.responses import encode_event
from tgi_gateway.streaming import Answer, ResponseContext, encode_sse

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}
PROMPT = normalize({"messages": [{"role": "user", "content": "x"}], "tools": [TOOL]})
TEMPLATE = Template(Version.V3_LLAMA31)
SKELETON = {"id": "resp_x", "object": "response", "output": [], "status": "in_progress"}


def one_answer(api: str, pieces: list[str]) -> int:
    """One streamed answer through the pipeline; the bytes written."""
    ctx = ResponseContext.for_prompt(PROMPT, "m")
    if api == "chat":
        answer, encode, written = Answer(TEMPLATE.parser(PROMPT), ctx, stream=True), encode_sse, 0
    else:
        builder = OutputBuilder(ResponseShape(SKELETON), emit=True)
        answer = Answer(TEMPLATE.parser(PROMPT), ctx, stream=True, builder=builder)
        encode, written = encode_event, len(b"".join(map(encode_event, builder.start())))
    for piece in pieces[:-1]:
        written += len(b"".join(map(encode, answer.feed(piece))))
    return written + len(b"".join(map(encode, answer.finish("eos_token"))))


def main() -> None:
    times: dict[tuple[str, str], list[float]] = {}
    sizes: dict[tuple[str, str], int] = {}
    for _ in range(15):
        for kind in ("text", "tool"):
            pieces = answer_pieces(kind, 128)[0]
            for api in ("chat", "responses"):
                t0 = time.perf_counter()
                for _ in range(100):
                    sizes[kind, api] = one_answer(api, pieces)
                times.setdefault((kind, api), []).append((time.perf_counter() - t0) / 100 / len(pieces) * 1e6)
    print("| answer | API | µs per token (min / median) | bytes per token |\n|---|---|---:|---:|")
    for (kind, api), ts in times.items():
        print(f"| {kind} | {api} | {min(ts):.2f} / {statistics.median(ts):.2f} | {sizes[kind, api] / 128:.0f} |")


if __name__ == "__main__":
    main()
