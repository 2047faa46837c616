"""benchmarks/attack.py in small: a few attacks of issue 11 with ``--quick`` sizes (and ``--head-timeout 1
--body-timeout 1`` on the gateway), against the real gateway process, the TGI double in its own process and
the ``/health`` prober in another, exactly as the script runs them.

Asserted: every attack got the answer the defences promise, chat requests kept succeeding during the floods,
the prober answered every probe, and the slowest one stayed under 1 s. The issue's 100 ms target is not
asserted here: the test runs beside the rest of the suite on shared CI machines, where a process may lose the
CPU for tens of milliseconds; a gateway whose loop the attack held would still fail 1 s (before the fixes: 10
to 20 s). The full-size run and its 100 ms target are in docs/operations.md, "Attacks replayed (issue 11)".
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ATTACKS = ("ref11x100", "headers-100k", "slowloris", "bool-ints", "sse-line")


def test_quick_attacks_are_answered_and_health_stays_up(tmp_path: Path) -> None:
    out = tmp_path / "attack.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "attack.py"), "--quick", "--bound-ms", "1000",
           "--settle", "1", "--json", str(out), "--max-seconds", "30"]  # fmt: skip
    for attack in ATTACKS:
        cmd += ["--attack", attack]
    run = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
    result = json.loads(out.read_text())
    rows = {r["attack"]: r for r in result["rows"]}
    assert set(rows) == set(ATTACKS), run.stdout + run.stderr
    answers = {k: r["answer"].split(":")[0] for k, r in rows.items()}
    assert answers == {
        "ref11x100": "400",
        "headers-100k": "431",
        "slowloris": "408 x20",
        "bool-ints": "400 x2",
        "sse-line": "502",
    }, answers
    for key, r in rows.items():
        assert r["probes"] > 0 and r["probes_failed"] == 0, (key, r)
        assert r["health_max_ms"] < 1000, (key, r)
    assert rows["slowloris"]["chat"][0] == rows["slowloris"]["chat"][1] > 0, rows["slowloris"]
    # RSS is not asserted: a few MiB of noise on a 60 MiB process is 10 % in a run this short
    assert all(not m.startswith(("answer", "/health", "chat")) for r in rows.values() for m in r["misses"])
