"""Gateway start-up time: from spawning ``server_tgi.py`` to the first 200 from its ``/health``.

Start-up time is how long a restarted or rescheduled gateway (a crash, a deploy, a new worker) refuses traffic,
and how long an orchestrator's readiness probe must allow. Issue target: under 2 s. TGI (the double, in its own
process) is already up, so the figure is the gateway's own: interpreter start, imports, settings, the template,
uvicorn binding its socket, and the first ``/health`` (which asks TGI's ``/health``). Two ways to start:

* ``version``: ``--model bench-model --template-version v3-llama3.1``: no model file is read;
* ``detect``: ``--model <dir>``: the version is detected from a local model directory made here, a tiny
  tokenizer (Llama-3.1's special tokens at their ids) and a ``tokenizer_config.json`` with a v3-llama3.1 chat
  template, built with the helpers of ``tests/prompting/test_detect.py``.

Each start is timed from just before ``Popen`` to the first 200, polling ``/health`` every 5 ms on a new
connection; the gateway is then stopped (SIGTERM) before the next run. Runs alternate the two ways. Reports
median and max of ``--runs`` (10) per way, PASS/FAIL against ``--target`` (2 s, on the max), and with
``--imports`` the slowest imports of one more start (``PYTHONPROFILEIMPORTTIME``). Run from the repository root
(~30 s)::

    .venv/bin/python benchmarks/startup.py [--runs 10] [--imports]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from _common import GATEWAY_ARGS, ROOT, GatewayProcess, tagged_double


def model_dir(parent: Path) -> Path:
    """A v3-llama3.1 model directory as tests/prompting/test_detect.py writes them: tokenizer.json + tokenizer_config.json."""
    sys.path.insert(0, str(ROOT))
    from tests.prompting.test_detect import LLAMA31, T_V31, write_model

    return write_model(parent / "functionary-v3.1", specials=LLAMA31, template=T_V31)


def start(endpoint: str, args: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    """One start: seconds from spawning to the first 200, and the gateway's log."""
    with GatewayProcess(endpoint, args, log_level="info", env=env) as gateway:
        ready = gateway.wait_healthy(timeout=30.0, interval=0.005)
        return ready - gateway.spawned, Path(gateway.log.name).read_text(errors="replace")


def slowest_imports(log: str, top: int = 12) -> str:
    """The ``-X importtime`` lines of a log with the largest cumulative times (µs)."""
    rows = []
    for line in log.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, cumulative, name = line.removeprefix("import time:").split("|")
            if cumulative.strip().isdigit():
                rows.append((int(cumulative), name.rstrip()))
    rows.sort(reverse=True)
    return "\n".join(f"{us / 1000:8.1f} ms  {name}" for us, name in rows[:top])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=10, help="starts per way (10)")
    p.add_argument("--target", type=float, default=2.0, help="seconds, for the slowest start (2)")
    p.add_argument("--imports", action="store_true", help="also show the slowest imports of one start")
    args = p.parse_args()
    with tagged_double() as double, tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        ways = {"version": list(GATEWAY_ARGS), "detect": ["--model", str(model_dir(Path(tmp)))]}
        for argv in ways.values():  # warm-up: the files the gateway imports in the page cache
            start(double.url, argv)
        times: dict[str, list[float]] = {way: [] for way in ways}
        for _ in range(args.runs):
            for way, argv in ways.items():
                seconds, log = start(double.url, argv)
                if way == "detect" and "v3-llama3.1" not in log:
                    raise RuntimeError(f"the template was not detected as v3-llama3.1:\n{log}")
                times[way].append(seconds)
        imports = (
            start(double.url, ways["detect"], {"PYTHONPROFILEIMPORTTIME": "1"})[1] if args.imports else ""
        )
    print(f"| start | runs | median (s) | max (s) | under {args.target:g} s |\n|---|---:|---:|---:|---|")
    ok = True
    for way, ts in times.items():
        passed = max(ts) < args.target
        ok &= passed
        print(
            f"| {way} | {len(ts)} | {statistics.median(ts):.2f} | {max(ts):.2f} | {'PASS' if passed else 'FAIL'} |"
        )
    if imports:
        print("\nslowest imports (cumulative), one start with detection:\n" + slowest_imports(imports))
    print(f"\n{'PASS' if ok else 'FAIL'}: every start under {args.target:g} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
