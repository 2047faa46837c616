"""A real PostgreSQL server for the tests, started with ``initdb`` + ``pg_ctl`` in a temporary directory.

``with PostgresServer.start() as pg:`` initialises a cluster (trust authentication, no fsync: a test
database), starts it on 127.0.0.1 on a free port, socket in the same directory, and stops it (fast, then
immediate) and removes the directory on exit. Run as root, the server runs as the ``postgres`` user (it
refuses to run as root) through ``runuser``. ``pg.new_database()`` creates an empty database and returns
its ``postgresql://`` URL: one per test, so tests never see each other's rows.

The binaries are looked for on PATH, then in Debian's ``/usr/lib/postgresql/<version>/bin``. Without them
:func:`find_binaries` returns None and the tests that need the server skip, except under CI (``CI`` set),
where ``.ci/run`` installs Debian's ``postgresql`` package: there a missing server is a failure.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import asyncpg

from tests.gateway_process import free_port

START_TIMEOUT = 60  # seconds for initdb and for the server to accept connections
SERVICE_USER = "postgres"


def find_binaries() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl``, or None."""
    on_path = shutil.which("initdb"), shutil.which("pg_ctl")
    if all(on_path):
        return Path(on_path[0]).resolve().parent  # type: ignore[arg-type]
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True
    )
    for directory in versions:
        if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
            return directory
    return None


class PostgresServer:
    def __init__(self, bindir: Path, root: Path, port: int) -> None:
        self.bindir, self.root, self.port = bindir, root, port
        self.data = root / "data"
        self._databases = 0

    @classmethod
    @contextmanager
    def start(cls, bindir: Path) -> Iterator[PostgresServer]:
        root = Path(tempfile.mkdtemp(prefix="tgi-gateway-pg-"))
        server = cls(bindir, root, free_port())
        try:
            if os.geteuid() == 0:  # PostgreSQL refuses to run as root
                shutil.chown(root, SERVICE_USER, SERVICE_USER)
            server._run("initdb", "-D", str(server.data), "-A", "trust", "-U", "postgres", "--no-sync",
                        "-E", "UTF8", "--locale=C")  # fmt: skip
            server.start_again()
            yield server
        finally:
            if (server.data / "postmaster.pid").exists():
                for mode in ("fast", "immediate"):
                    try:
                        server._run("pg_ctl", "-D", str(server.data), "-m", mode, "-w", "-t", "20", "stop")
                        break
                    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
                        continue
            shutil.rmtree(root, ignore_errors=True)

    def start_again(self) -> None:
        """Start the server (again, after :meth:`stop`), on the same port; returns once it accepts connections."""
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c full_page_writes=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-o", options,
                  "-w", "-t", str(START_TIMEOUT), "start")  # fmt: skip

    def stop(self) -> None:
        """Stop the server (fast shutdown: its connections are closed)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "20", "stop")

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bindir / program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", SERVICE_USER, "--", *command]
        done = subprocess.run(
            command, check=False, capture_output=True, text=True, timeout=START_TIMEOUT + 30, cwd=self.root
        )
        if done.returncode != 0:
            log = (self.root / "log").read_text() if (self.root / "log").exists() else ""
            raise RuntimeError(
                f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}{done.stderr}{log}"
            )

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def new_database(self) -> str:
        """A new empty database's URL."""
        self._databases += 1
        name = f"test_{os.getpid()}_{self._databases}_{time.monotonic_ns() % 1_000_000}"

        async def create() -> None:
            conn = await asyncpg.connect(self.url, timeout=10)
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
            finally:
                await conn.close()

        with ThreadPoolExecutor(1) as thread:  # callable from a test whose event loop runs
            thread.submit(asyncio.run, create()).result(timeout=30)
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"
