"""`server.process.tune_malloc`: glibc's malloc gives back what a large request used (docs/performance.md,
"Memory after a large request"). Each case runs in a fresh interpreter: the settings are per process."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"), reason="glibc's malloc: this C library is not glibc"
)

# A thread allocates what the admission thread would (many blocks above pymalloc's 512 bytes, below the mmap
# threshold) and keeps them; then a 4 MiB block is freed and another taken, as a second large request's body
# would be. Printed: the settings made, glibc's arenas (one "Arena N:" section each on stderr), and whether the
# second large block has its own mapping (mallinfo2's hblkhd) rather than heap memory.
PROGRAM = """
import ctypes, json, sys, threading
from tgi_gateway.server.process import tune_malloc
made = tune_malloc() if sys.argv[1] == "tune" else []
kept = []
thread = threading.Thread(target=lambda: kept.extend(bytearray(2048) for _ in range(20_000)))
thread.start(); thread.join()
block = bytearray(4 << 20); del block
block = bytearray(4 << 20)
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
print(json.dumps({"made": made, "mapped": libc.mallinfo2().hblkhd >= 4 << 20}))
libc.malloc_stats()
"""


def run(mode: str, **env: str) -> tuple[dict, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, timeout=60, check=False,
                          env=clean | env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done.stderr.count("Arena ")


def test_one_arena_and_large_blocks_in_their_own_mappings() -> None:
    out, arenas = run("tune")
    assert out == {"made": ["arena_max=1", "mmap_threshold=131072"], "mapped": True}
    assert arenas == 1


def test_without_it_a_thread_has_its_own_arena_and_a_large_block_stays_on_the_heap() -> None:
    out, arenas = run("plain")  # the defaults this fixes (the test above can fail)
    assert out == {"made": [], "mapped": False}
    assert arenas >= 2


def test_an_operators_settings_are_kept() -> None:
    out, arenas = run("tune", MALLOC_ARENA_MAX="4", MALLOC_MMAP_THRESHOLD_="1048576")
    assert out["made"] == [] and arenas == 2
