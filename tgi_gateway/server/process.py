"""The server process: the allocators' settings (glibc's arenas, the cycle collector), and the app factory
of a ``--workers`` process."""

from __future__ import annotations

import ctypes
import gc
import os

from fastapi import FastAPI

from ..prompting import Template
from ..settings import Settings
from .app import create_app
from .telemetry import configure_logging

# glibc's mallopt() parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 128 * 1024  # glibc's initial value, kept


def tune_malloc() -> list[str]:
    """glibc's malloc set to give back what a large request used; call it before the process starts threads.
    Returns the settings made (none under another C library; an operator's ``MALLOC_*`` variable wins).

    * One arena for the process (``M_ARENA_MAX`` 1). glibc gives each thread that allocates an arena of its
      own and keeps what it once held: after one 4 MiB request the admission thread's arena held ~9 MiB
      for good. With the GIL, threads gain nothing from separate arenas.
    * Blocks of 128 KiB and more in their own mappings, always (a fixed ``M_MMAP_THRESHOLD``). By default
      glibc raises that threshold to the size of each large block freed, so the next request's body and
      prompt (megabytes) come from the heap and stay there once freed: +9 MiB after the second large request.

    Measured: docs/performance.md, "Memory after a large request"."""
    try:
        libc = ctypes.CDLL(None)  # the C library the interpreter runs on
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl's mallopt is a stub)
    except (OSError, AttributeError):
        return []
    made = []
    if "MALLOC_ARENA_MAX" not in os.environ and libc.mallopt(_M_ARENA_MAX, 1):
        made.append("arena_max=1")
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        made.append(f"mmap_threshold={MMAP_THRESHOLD}")
    return made


def tune_gc() -> None:
    """The server process's cycle collector, set once the app is built (not by `create_app`: a process
    that builds many apps, a test suite, must keep the defaults).

    A request leaves no reference cycle (tested), so the collector only ever finds the rare cycle of an
    error path; what it costs is its passes over live objects. Everything alive at start-up (modules, the
    app, pydantic's schemas) is frozen out of its sight, and its first generation is collected every 10,000
    allocations; the older generations keep their defaults, so the rare cycles of error paths are still
    freed soon (why and what it saves: docs/performance.md, "Collector tuning")."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def app_from_environment() -> FastAPI:
    """The app of one worker process (``--workers N``): the CLI's settings, passed as ``TGI_GATEWAY_*``
    variables, with the template version it detected."""
    tune_malloc()
    settings = Settings()
    if settings.template_version is None:
        raise RuntimeError(
            "worker started without TGI_GATEWAY_TEMPLATE_VERSION (start it with server_tgi.py)"
        )
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings, Template(settings.template_version))
    tune_gc()
    return app

