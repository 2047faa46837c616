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

_M_ARENA_MAX = -8  # glibc's mallopt() parameter number (malloc.h)


def one_malloc_arena() -> bool:
    """Let glibc's malloc keep one arena for the whole process, unless ``MALLOC_ARENA_MAX`` says otherwise;
    call it before the process starts threads. True when set.

    glibc gives each thread that allocates its own arena and keeps what a thread's arena once held: after one
    large request the admission thread's arena held ~9 MiB for good. With the GIL, threads gain nothing from
    separate arenas (docs/performance.md, "Memory after a large request"). A no-op (False) under another C
    library, or when the operator set ``MALLOC_ARENA_MAX``."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library the interpreter runs on
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl's mallopt is a stub)
    except (OSError, AttributeError):
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, 1))


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
    one_malloc_arena()
    settings = Settings()
    if settings.template_version is None:
        raise RuntimeError(
            "worker started without TGI_GATEWAY_TEMPLATE_VERSION (start it with server_tgi.py)"
        )
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings, Template(settings.template_version))
    tune_gc()
    return app

