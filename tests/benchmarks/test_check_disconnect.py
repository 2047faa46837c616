"""benchmarks/check_disconnect.py in small: 8 client disconnects, 2 at each point of a request, against the real
gateway process and the TGI double in its own process, exactly as the script runs them.

The issue's target is 100 ms from the client's socket closing to TGI seeing its request's connection close;
the script measures about 1 ms at p50 and under 10 ms at worst on an idle 2-core machine (docs/performance.md).
This test asserts 500 ms instead: it runs beside the rest of the suite, on CI machines shared with other jobs,
where a process may lose the CPU for tens of milliseconds; a gateway that did not react to disconnects at all
would still fail it, since the double would then hold the request until the script's 2 s wait runs out
("missed"). The 100 ms figure itself is checked by running the script (see docs/performance.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BOUND_MS = 500.0


def test_eight_disconnects_reach_tgi_quickly(tmp_path: Path) -> None:
    out = tmp_path / "disconnects.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "check_disconnect.py"), "--count", "8",
           "--bound-ms", str(BOUND_MS), "--json", str(out), "--max-seconds", "60"]  # fmt: skip
    run = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    assert set(result["points"]) == {"queued", "text", "tool", "nonstream"}
    for point, r in result["points"].items():
        assert (r["count"], r["missed"]) == (2, 0), (point, r)
        assert all(0 <= ms < BOUND_MS for ms in r["latencies_ms"]), (point, r["latencies_ms"])
    assert "PASS" in run.stdout
