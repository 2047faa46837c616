"""Graceful shutdown in two steps: first drain, then stop.

A load balancer stops sending a backend new requests only once that backend's health check fails. So on
the first SIGTERM (or SIGINT) the gateway *drains* for ``--drain-seconds``: it keeps serving everything,
new requests included, while ``GET /health`` answers 503 ``{"status": "draining", ...}``. Then the
signal goes on to uvicorn, which stops accepting connections, gives in-flight requests and streams
``--shutdown-grace`` seconds to finish (then cancels them; the telemetry middleware answers those:
a stream's last event says the gateway is shutting down) and runs the app's shutdown; the CLI then
releases the TGI container it started. With ``--drain-seconds 0`` (the default) the signal goes to
uvicorn at once, exactly as without this module.

How: uvicorn installs its own SIGINT/SIGTERM handlers (``Server.handle_exit``, with ``signal.signal``)
before it starts the app, and the app's lifespan wraps them (:meth:`Draining.install`). The same code
thus runs in the single server process and in each ``--workers`` process (uvicorn's supervisor sends
SIGTERM to every worker), whichever way uvicorn is started. While draining, a second SIGINT (Ctrl+C
again) ends the drain at once; another SIGTERM is ignored (a worker can get the signal twice: from a
process-group kill and from the supervisor). Once the drain is over the handlers are uvicorn's again
(a further SIGINT forces its exit, as usual).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn

__all__ = ["Draining"]

logger = logging.getLogger("tgi_gateway")

SIGNALS = (signal.SIGINT, signal.SIGTERM)
Handler = Callable[[int, FrameType | None], Any]


class Draining:
    """The drain state of one server process: :attr:`active` from the first shutdown signal on."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.active = False
        self._stop: dict[int, Handler] = {}  # uvicorn's handlers, until the signal was handed on
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    def install(self) -> None:
        """Wrap the SIGINT/SIGTERM handlers of the uvicorn server running this app (from its lifespan).

        Nothing to do without a drain, or when the signals are not uvicorn's (the app is served by something
        else, or from a thread, as in tests): the server then stops as it would anyway.
        """
        if self.seconds <= 0 or threading.current_thread() is not threading.main_thread():
            return
        handlers = {sig: signal.getsignal(sig) for sig in SIGNALS}
        if not all(isinstance(getattr(h, "__self__", None), uvicorn.Server) for h in handlers.values()):
            logger.warning(
                "--drain-seconds is ignored: uvicorn does not handle SIGINT/SIGTERM in this process"
            )
            return
        self._loop = asyncio.get_running_loop()
        self._stop = handlers  # type: ignore[assignment]  # checked above: uvicorn's bound handle_exit
        for sig in SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler runs between two bytecodes of the loop's thread: only hand work to the loop.
        assert self._loop is not None
        if not self.active:
            self.active = True
            self._loop.call_soon_threadsafe(self._begin, sig)
        elif sig == signal.SIGINT:
            self._loop.call_soon_threadsafe(self._end, sig)

    def _begin(self, sig: int) -> None:
        assert self._loop is not None
        logger.info(
            "%s: draining for %g s (/health answers 503, requests are still served), then shutting down",
            signal.Signals(sig).name, self.seconds,
        )  # fmt: skip
        self._timer = self._loop.call_later(self.seconds, self._end, sig)

    def _end(self, sig: int) -> None:
        """Hand the signal to uvicorn: it stops accepting, in-flight requests get ``--shutdown-grace``."""
        if not self._stop:  # already handed on (the timer and a second SIGINT may both get here)
            return
        if self._timer is not None:
            self._timer.cancel()
        stop, self._stop = self._stop, {}
        for s, handler in stop.items():
            signal.signal(s, handler)
        logger.info("drain over: no new connections; in-flight requests get the shutdown grace period")
        stop[sig](sig, None)
