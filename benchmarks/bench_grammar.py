"""Grammar build time: how long `grammar.constrain` takes for 1, 10 and 50 tools, cold and remembered.

A request with ``tool_choice: "required"`` gets a regex grammar joining every tool's arguments regex
(outlines-core's ``build_regex_from_schema`` per schema) in the template's call syntax; a named choice or a
``response_format`` builds one schema. The gateway remembers decisions per distinct input (``_DECISIONS``) and
regexes per distinct schema (``schemas._REGEXES``), so a client that sends the same tools again pays a lookup
(the key: the tools' JSON, serialised by orjson). Per case:

* **cold**: both caches cleared before each build (the first request with these tools);
* **cached**: the same request again (every later request with these tools);

and the regex's length (what TGI receives, and compiles into its FSM once per distinct regex).

Each tool is a realistic function: five properties (a string with a description, an enum, an integer, an
array of strings, a nested object with two fields), all required, as ``openai.pydantic_function_tool`` sends
them (``additionalProperties: false``); tools differ by name and enum values, so no schema repeats.

With ``--tgi-fsm``, also the first step of TGI's own compilation of that regex: its shard (outlines 0.1.x)
parses it into a character automaton with interegular (0.3.3 in TGI's image) before it maps the automaton
onto the vocabulary; that step alone is timed here, once per case (it is slow: tens of seconds for 50 tools).

Run from the repository root::

    .venv/bin/python benchmarks/bench_grammar.py [--runs 20] [--version v3.llama3] [--tgi-fsm]
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial
from typing import Any

from tgi_gateway.grammar import clear_caches, constrain
from tgi_gateway.prompting import normalize
from tgi_gateway.prompting.types import Version

SIZES = (1, 10, 50)


def tool(i: int) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": f"tool_{i}",
            "description": f"Tool number {i}.",
            "strict": True,
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string", "description": "what to look for"},
                    "mode": {"type": "string", "enum": [f"fast{i}", f"exact{i}", f"fuzzy{i}"]},
                    "limit": {"type": "integer"},
                    "tags": {"type": "array", "items": {"type": "string"}},
                    "where": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}, "radius_km": {"type": "number"}},
                        "required": ["city", "radius_km"],
                        "additionalProperties": False,
                    },
                },
                "required": ["query", "mode", "limit", "tags", "where"],
                "additionalProperties": False,
            },
        },
    }


def timed(make: Any) -> float:
    start = time.perf_counter()
    make()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=20, help="builds per case (median reported)")
    parser.add_argument("--version", default="v3.llama3", choices=[v.value for v in Version])
    parser.add_argument(
        "--tgi-fsm", action="store_true", help="also time interegular's automaton (TGI's shard)"
    )
    args = parser.parse_args()
    version = Version(args.version)
    messages = [{"role": "user", "content": "hi"}]
    print(f"template {version}, tool_choice required, median of {args.runs} runs")
    print(
        f"{'tools':>5}  {'cold ms':>8}  {'cached µs':>9}  {'regex chars':>11}"
        + ("  TGI FSM s  states" if args.tgi_fsm else "")
    )
    for n in SIZES:
        prompt = normalize(
            {"messages": messages, "tools": [tool(i) for i in range(n)], "tool_choice": "required"}
        )
        cold, cached = [], []
        for _ in range(args.runs):
            clear_caches()
            build = partial(constrain, prompt, version)
            cold.append(timed(build))
            cached.append(timed(build))
        grammar = constrain(prompt, version).grammar
        assert grammar is not None
        line = (
            f"{n:>5}  {statistics.median(cold) * 1e3:>8.2f}  {statistics.median(cached) * 1e6:>9.1f}  "
            f"{len(grammar['value']):>11,}"
        )
        if args.tgi_fsm:
            import interegular  # the test extras

            start = time.perf_counter()
            fsm = interegular.parse_pattern(grammar["value"]).to_fsm()
            line += f"  {time.perf_counter() - start:>9.2f}  {len(fsm.states):>6,}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
