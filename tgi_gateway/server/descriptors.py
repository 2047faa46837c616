"""The process's file descriptors: the soft limit raised to the hard one at start, the connection cap that
follows from it, and whether the gateway has recently run out of them (which ``/health`` reports).

Every client connection holds a descriptor, and so does every request in flight to TGI; a process at its
``RLIMIT_NOFILE`` can neither accept a connection nor open one to TGI (``EMFILE``). The soft limit is often
1024 while the hard one is far higher, so the gateway takes the hard limit, and by default caps its client
connections at half of it (each may hold a TGI connection too), less a reserve for everything else.
"""

from __future__ import annotations

import errno
import logging
import os
import time

try:
    import resource
except ImportError:  # pragma: no cover - not on Windows
    resource = None  # type: ignore[assignment]

logger = logging.getLogger("tgi_gateway")

#: Descriptors kept for what is not a client or TGI connection: the listening socket, logs, the event loop's
#: own, the metrics files of ``--workers``, Python's imports.
RESERVE = 64
#: ``/health`` answers 503 for this many seconds after the gateway last ran out of descriptors.
EXHAUSTED_FOR = 10.0
EXHAUSTED_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE})


def raise_descriptor_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (logging both); the soft limit in force after."""
    if resource is None:  # pragma: no cover
        return 1 << 20
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if target == resource.RLIM_INFINITY:  # Linux refuses an infinite soft limit above nr_open
        target = max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            logger.warning("file descriptors: cannot raise the soft limit %d to %d: %s", soft, target, exc)
            return soft
        logger.info("file descriptors: soft limit raised from %d to the hard limit %s", soft, _limit(hard))
        return target
    logger.info("file descriptors: soft limit %s, hard limit %s", _limit(soft), _limit(hard))
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def _limit(value: int) -> str:
    return "unlimited" if resource is not None and value == resource.RLIM_INFINITY else str(value)


def default_max_connections(soft_limit: int) -> int:
    """The connection cap when none is configured: each connection may hold a TGI connection too."""
    return max(1, (soft_limit - RESERVE) // 2)


class DescriptorWatch:
    """Whether the process ran out of descriptors lately: :meth:`exhausted` is noted where an ``EMFILE`` is
    seen (a TGI connection refused by the OS), and :meth:`problem` also tries to open one descriptor."""

    def __init__(self) -> None:
        self.last_exhausted = -float("inf")

    def exhausted(self) -> None:
        self.last_exhausted = time.monotonic()

    def problem(self) -> str | None:
        """What ``/health`` reports, or None when descriptors can be opened and none ran out lately."""
        try:
            fd = os.open(os.devnull, os.O_RDONLY)
        except OSError as exc:
            if exc.errno not in EXHAUSTED_ERRNOS:
                raise
            self.exhausted()
        else:
            os.close(fd)
        ago = time.monotonic() - self.last_exhausted
        if ago < EXHAUSTED_FOR:
            return f"the gateway ran out of file descriptors {ago:.1f} s ago ({_current_limit()})"
        return None


def _current_limit() -> str:
    if resource is None:  # pragma: no cover
        return "no limit known"
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return f"limit {_limit(soft)}"
