"""Serve an ASGI app (the gateway) on a real loopback socket, in a background thread, for tests; and the
uvicorn server the doubles run on (:class:`QuickServer`: no signal handling, a quick shutdown).

``with serve(app) as url:`` binds 127.0.0.1 on an ephemeral port, runs uvicorn (lifespan on, httptools,
the event loop the gateway uses in production: uvloop) on its own loop in a daemon thread, and returns
once the app's lifespan has started; leaving the block shuts it down within a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the test process keeps its own signal handlers
        yield


class QuickServer(uvicorn.Server):
    """uvicorn without signal handling, with a quick shutdown that drops open streams."""

    def __init__(
        self, config: uvicorn.Config, on_started: Callable[[], None], drain_timeout: float = 1.0
    ) -> None:
        super().__init__(config)
        self._on_started = on_started
        self._drain_timeout = drain_timeout
        self._exit_event: asyncio.Event | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._exit_event = asyncio.Event()
        await super().startup(sockets=sockets)
        if self.started:
            self._on_started()

    def request_exit(self) -> None:
        self.should_exit = True
        if self._exit_event is not None:
            self._exit_event.set()

    async def main_loop(self) -> None:
        counter = 0
        while not await self.on_tick(counter):
            counter += 10
            assert self._exit_event is not None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._exit_event.wait(), 1.0)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        state = self.server_state
        for connection in list(state.connections):
            connection.shutdown()
        deadline = time.monotonic() + self._drain_timeout
        while state.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        for connection in list(state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.abort()
        for task in list(getattr(state, "tasks", ())):
            task.cancel()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 0.5)


def loopback_socket(port: int = 0) -> socket.socket:
    """A TCP socket bound, not yet listening, on ``127.0.0.1:port`` (0: an ephemeral port), with
    ``SO_REUSEADDR`` and ``TCP_NODELAY`` (the accepted sockets inherit it: no delayed-ACK waits). OSError
    (the socket closed) when the port is taken."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    return sock


@contextlib.contextmanager
def serve(app: Any, *, start_timeout: float = 10.0, loop: str = "uvloop") -> Iterator[str]:
    sock = loopback_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        lifespan="on",
        http="httptools",
        loop=loop,
        log_config=None,
        log_level=None,
        access_log=False,
        timeout_graceful_shutdown=2,
        backlog=4096,
    )
    server = _Server(config)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # noqa: BLE001 - reported to the test below
            failure.append(exc)

    thread = threading.Thread(target=run, name=f"gateway-{port}", daemon=True)
    thread.start()
    deadline = start_timeout
    while not server.started and thread.is_alive() and deadline > 0:
        threading.Event().wait(0.01)
        deadline -= 0.01
    if not server.started:
        server.should_exit = True
        thread.join(5)
        raise RuntimeError(f"the gateway did not start: {failure[0] if failure else 'timeout'}")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
