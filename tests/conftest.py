"""Fixtures shared by the test folders."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateway_process import write_model_dir
from tests.postgres_server import PostgresServer, find_binaries


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A model directory the CLI detects as Functionary v3-llama3.1."""
    return write_model_dir(tmp_path)


@pytest.fixture(scope="session", autouse=True)
def data_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every gateway the tests start, in this process or another, keeps its data (the default response store,
    ``$XDG_DATA_HOME/tgi-gateway/responses.db``) in a temporary directory, never in the user's home."""
    path = tmp_path_factory.mktemp("xdg-data-home")
    before = os.environ.get("XDG_DATA_HOME")
    os.environ["XDG_DATA_HOME"] = str(path)
    yield path
    if before is None:
        os.environ.pop("XDG_DATA_HOME", None)
    else:
        os.environ["XDG_DATA_HOME"] = before


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the session (tests/postgres_server.py); skips without initdb/pg_ctl, except
    under CI, where .ci/run installs them."""
    bindir = find_binaries()
    if bindir is None:
        message = (
            "PostgreSQL's initdb/pg_ctl not found (apt-get install postgresql): PostgreSQL tests skipped"
        )
        if os.environ.get("CI"):
            pytest.fail(message.replace("skipped", "cannot run under CI"))
        pytest.skip(message)
    with PostgresServer.start(bindir) as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty response store: a SQLite file in a temporary directory, then a new database on the
    session's PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store' / 'responses.db'}"
    return request.getfixturevalue("postgres").new_database()
