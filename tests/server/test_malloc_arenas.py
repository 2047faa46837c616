"""`server.process.one_malloc_arena`: a thread that allocates gets no glibc arena of its own (the admission
thread's arena kept ~9 MiB after one large request; docs/performance.md, "Memory after a large request")."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

GLIBC = hasattr(ctypes.CDLL(None), "gnu_get_libc_version")

# A thread allocates what the admission thread would (many blocks above pymalloc's 512 bytes, below glibc's
# mmap threshold), keeps them, then glibc prints one "Arena N:" section per arena on stderr.
PROGRAM = """
import ctypes, sys, threading
from tgi_gateway.server.process import one_malloc_arena
print(one_malloc_arena() if sys.argv[1] == "set" else None)
kept = []
thread = threading.Thread(target=lambda: kept.extend(bytearray(2048) for _ in range(20_000)))
thread.start(); thread.join()
ctypes.CDLL(None).malloc_stats()
"""


def arenas(mode: str, **env: str) -> tuple[str, int]:
    done = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip(), done.stderr.count("Arena ")


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc arenas: this C library is not glibc")
def test_one_arena_for_the_process() -> None:
    assert arenas("set") == ("True", 1)
    assert arenas("unset")[1] >= 2, "without it the thread gets an arena of its own (the test can fail)"


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc arenas: this C library is not glibc")
def test_an_operators_malloc_arena_max_is_kept() -> None:
    assert arenas("set", MALLOC_ARENA_MAX="4") == ("False", 2)
