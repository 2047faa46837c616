"""The server process: the cycle collector's settings, and the app factory of a ``--workers`` process."""

from __future__ import annotations

import gc

from fastapi import FastAPI

from ..prompting import Template
from ..settings import Settings
from .app import create_app
from .telemetry import configure_logging


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
    settings = Settings()
    if settings.template_version is None:
        raise RuntimeError(
            "worker started without TGI_GATEWAY_TEMPLATE_VERSION (start it with server_tgi.py)"
        )
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings, Template(settings.template_version))
    tune_gc()
    return app

