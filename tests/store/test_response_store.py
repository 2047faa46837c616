"""The response store against real databases: a SQLite file in a temporary directory and a PostgreSQL server the
tests start (tests/postgres_server.py); every test runs on both (the `store_url` fixture, tests/conftest.py)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text

from tests.gateway_process import ROOT, free_port
from tgi_gateway.errors import ConfigurationError, StoreUnavailableError
from tgi_gateway.store import StoredResponse, open_store
from tgi_gateway.store import sql as store_sql
from tgi_gateway.store.sql import SCHEMA_VERSION, SQLStore, responses, schema_version

pytestmark = pytest.mark.anyio

NOW = 1_800_000_000


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def stored(
    n: int | str = 1, *, owner: str | None = None, created_at: int = NOW, **fields: Any
) -> StoredResponse:
    """A stored response with realistic content: unicode, nesting, numbers, nulls, key order."""
    rid = f"resp_{n}"
    values: dict[str, Any] = {
        "id": rid,
        "owner": owner,
        "created_at": created_at,
        "response": {
            "id": rid, "object": "response", "created_at": created_at, "status": "completed", "error": None,
            "output": [{"type": "message", "id": f"msg_{n}", "role": "assistant", "status": "completed",
                        "content": [{"type": "output_text", "text": "Grüße, 世界 \u2028 \"q\" \\ 🙂",
                                     "annotations": [], "logprobs": []}]}],
            "temperature": 0.7, "usage": {"input_tokens": 12, "output_tokens": 3, "total_tokens": 15},
            "zeta_last_key_first_in_order": True, "alpha": 1,
        },
        "input_items": [
            {"id": f"msg_in_{n}", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}
        ],
        "context": [{"type": "message", "role": "user", "content": "Hi"}],
        "previous_response_id": None,
    }  # fmt: skip
    values.update(fields)
    return StoredResponse(**values)


class Clock:
    """A settable clock (unix seconds) for expiry."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def count_rows(store: SQLStore) -> int:
    async with store.engine.connect() as conn:
        return (await conn.execute(select(func.count()).select_from(responses))).scalar_one()


async def test_a_saved_response_comes_back_as_saved(store_url: str) -> None:
    store = await open_store(store_url, ttl_seconds=3600)
    try:
        first = stored(1, previous_response_id="resp_0", context=[{"id": "x", "n": [1, 2.5, None, True]}])
        await store.save(first)
        got = await store.get("resp_1", None)
        assert got == first
        assert list(got.response) == list(first.response), "the Response object's keys keep their order"
        assert await store.get("resp_2", None) is None, "unknown"
    finally:
        await store.close()


async def test_delete_removes_once(store_url: str) -> None:
    store = await open_store(store_url, ttl_seconds=None)
    try:
        await store.save(stored(1))
        await store.save(stored(2))
        assert await store.delete("resp_1", None) is True
        assert await store.get("resp_1", None) is None
        assert await store.delete("resp_1", None) is False, "already deleted"
        assert await store.delete("resp_404", None) is False, "unknown"
        assert await store.get("resp_2", None) == stored(2), "the other one stays"
    finally:
        await store.close()


async def test_a_response_is_visible_only_to_its_owner(store_url: str) -> None:
    store = await open_store(store_url, ttl_seconds=None)
    try:
        await store.save(stored("a", owner="key-aaaaaaaa"))
        await store.save(stored("open", owner=None))
        assert (await store.get("resp_a", "key-aaaaaaaa")) == stored("a", owner="key-aaaaaaaa")
        assert await store.get("resp_a", "key-bbbbbbbb") is None, "another key"
        assert await store.get("resp_a", None) is None, "no key (keys turned off later)"
        assert await store.get("resp_open", "key-aaaaaaaa") is None, "stored without keys: not a key's"
        assert await store.get("resp_open", None) == stored("open")
        assert await store.delete("resp_a", "key-bbbbbbbb") is False, "another key cannot delete it"
        assert await store.delete("resp_a", None) is False
        assert await store.get("resp_a", "key-aaaaaaaa") is not None, "still there"
        assert await store.delete("resp_a", "key-aaaaaaaa") is True
    finally:
        await store.close()


async def test_an_expired_response_is_gone_at_once(store_url: str) -> None:
    clock = Clock()
    store = await SQLStore.open(store_url, ttl_seconds=60, sweep_interval=3600, clock=clock)
    try:
        await store.save(stored(1, created_at=NOW))
        clock.now = NOW + 59.5
        assert await store.get("resp_1", None) is not None, "within its TTL"
        clock.now = NOW + 60
        assert await store.get("resp_1", None) is None, "expired at created_at + ttl"
        assert await store.delete("resp_1", None) is False, "an expired response cannot be deleted either"
        assert await count_rows(store) == 1, "the row is still there until the sweep"
    finally:
        await store.close()


async def test_the_sweep_deletes_expired_rows_in_bounded_batches(store_url: str) -> None:
    clock = Clock()
    store = await SQLStore.open(store_url, ttl_seconds=100, sweep_interval=3600, sweep_batch=2, clock=clock)
    try:
        for n in range(5):
            await store.save(stored(f"old{n}", created_at=NOW - 1000 + n))
        await store.save(stored("young", created_at=NOW - 50))
        assert [await store.sweep() for _ in range(4)] == [2, 2, 1, 0]
        assert await count_rows(store) == 1
        assert await store.get("resp_young", None) is not None
    finally:
        await store.close()


async def test_stores_sweeping_at_once_share_the_work(store_url: str) -> None:
    """Every worker process sweeps: two stores deleting the same backlog at once neither fail nor double-count."""
    clock = Clock()
    one, two = [
        await SQLStore.open(store_url, ttl_seconds=10, sweep_interval=3600, sweep_batch=25, clock=clock)
        for _ in range(2)
    ]
    try:
        await asyncio.gather(*(one.save(stored(n, created_at=NOW - 100)) for n in range(300)))

        async def drain(store: SQLStore) -> int:
            total = 0
            while deleted := await store.sweep():
                total += deleted
            return total

        counts = await asyncio.gather(drain(one), drain(two), drain(one))
        assert sum(counts) == 300 and await count_rows(one) == 0, counts
    finally:
        await one.close()
        await two.close()


async def test_without_ttl_nothing_expires(store_url: str) -> None:
    store = await SQLStore.open(store_url, ttl_seconds=None, clock=Clock(NOW + 10**9))
    try:
        await store.save(stored(1, created_at=0))
        assert await store.get("resp_1", None) is not None
        assert await store.sweep() == 0
    finally:
        await store.close()


async def test_the_background_sweep_runs(store_url: str) -> None:
    store = await open_store(store_url, ttl_seconds=60, sweep_interval=0.05)
    assert isinstance(store, SQLStore)
    try:
        await store.save(stored("old", created_at=int(time.time()) - 3600))
        await store.save(stored("new", created_at=int(time.time())))
        for _ in range(200):  # ≤ 10 s
            if await count_rows(store) == 1:
                break
            await asyncio.sleep(0.05)
        assert await count_rows(store) == 1
        assert await store.get("resp_new", None) is not None
    finally:
        await store.close()
    assert store._sweeper is None


# -- the schema ------------------------------------------------------------------------------------------


async def versions(store: SQLStore) -> list[int]:
    async with store.engine.connect() as conn:
        return list((await conn.execute(select(schema_version.c.version))).scalars())


async def test_the_schema_is_created_once_and_versioned(store_url: str) -> None:
    store = await open_store(store_url, ttl_seconds=None)
    assert isinstance(store, SQLStore)
    await store.save(stored(1))
    assert await versions(store) == [SCHEMA_VERSION]
    await store.close()
    again = await open_store(store_url, ttl_seconds=None)  # an existing schema is left as it is
    assert isinstance(again, SQLStore)
    try:
        assert await versions(again) == [SCHEMA_VERSION]
        assert await again.get("resp_1", None) == stored(1), "kept across a close and a reopen"
    finally:
        await again.close()


async def test_a_newer_schema_is_refused(store_url: str) -> None:
    store = await open_store(store_url, ttl_seconds=None)
    assert isinstance(store, SQLStore)
    async with store.engine.begin() as conn:
        await conn.execute(schema_version.update().values(version=SCHEMA_VERSION + 1))
    await store.close()
    with pytest.raises(ConfigurationError) as refused:
        await open_store(store_url, ttl_seconds=None)
    message = str(refused.value)
    assert f"schema version {SCHEMA_VERSION + 1}" in message and "newer tgi-gateway" in message
    assert f"up to {SCHEMA_VERSION}" in message


async def test_an_older_schema_is_migrated(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = await open_store(store_url, ttl_seconds=None)
    await store.save(stored(1))
    await store.close()

    async def add_column(conn: Any) -> None:
        await conn.execute(text("ALTER TABLE tgi_gateway_responses ADD COLUMN note VARCHAR(20)"))

    monkeypatch.setattr(store_sql, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setattr(store_sql, "MIGRATIONS", {SCHEMA_VERSION: add_column})
    migrated = await open_store(store_url, ttl_seconds=None)
    assert isinstance(migrated, SQLStore)
    try:
        assert await versions(migrated) == [SCHEMA_VERSION + 1]
        async with migrated.engine.connect() as conn:
            assert (await conn.execute(text("SELECT note FROM tgi_gateway_responses"))).all() == [(None,)]
        assert await migrated.get("resp_1", None) == stored(1)
    finally:
        await migrated.close()


# -- several stores, several processes, concurrency -------------------------------------------------------


async def test_two_stores_on_one_database_see_each_other(store_url: str) -> None:
    one = await open_store(store_url, ttl_seconds=None)
    two = await open_store(store_url, ttl_seconds=None)
    try:
        await one.save(stored(1))
        assert await two.get("resp_1", None) == stored(1)
        assert await two.delete("resp_1", None) is True
        assert await one.get("resp_1", None) is None
    finally:
        await one.close()
        await two.close()


WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from tgi_gateway.store import StoredResponse, open_store

    async def main(url, prefix, count):
        store = await open_store(url, ttl_seconds=3600)
        try:
            await asyncio.gather(*(
                store.save(StoredResponse(f"resp_{prefix}{n}", None, 1_800_000_000, {"n": n}, [], [], None))
                for n in range(count)
            ))
        finally:
            await store.close()

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
    """
)


async def test_processes_save_to_one_store_at_once(store_url: str) -> None:
    """Three processes (as `--workers 3`) open the store and save at the same time: no lock error, no loss."""
    count = 40
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            WRITER,
            store_url,
            f"p{p}_",
            str(count),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for p in range(3)
    ]
    outputs = await asyncio.wait_for(asyncio.gather(*(proc.communicate() for proc in processes)), 120)
    assert [proc.returncode for proc in processes] == [0, 0, 0], outputs
    store = await SQLStore.open(store_url, ttl_seconds=3600, clock=Clock())
    try:
        assert await count_rows(store) == 3 * count
        assert (await store.get(f"resp_p2_{count - 1}", None)).response == {"n": count - 1}  # type: ignore[union-attr]
    finally:
        await store.close()


async def test_concurrent_saves_and_reads_on_one_store(store_url: str) -> None:
    store = await open_store(store_url, ttl_seconds=None)
    try:
        await asyncio.gather(*(store.save(stored(n, owner=f"key-{n % 3}")) for n in range(100)))
        got = await asyncio.gather(*(store.get(f"resp_{n}", f"key-{n % 3}") for n in range(100)))
        assert got == [stored(n, owner=f"key-{n % 3}") for n in range(100)]
    finally:
        await store.close()


# -- opening failures --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url,expected",
    [
        ("mysql://db/gw", "must be a sqlite:///PATH or postgresql://HOST/DATABASE URL"),
        ("sqlite:///:memory:", "needs a file path"),
        ("postgresql://host", "must name its database"),
    ],
)
async def test_a_bad_url_is_a_configuration_error(url: str, expected: str) -> None:
    with pytest.raises(ConfigurationError) as refused:
        await open_store(url, ttl_seconds=None)
    assert str(refused.value).startswith("--response-store: ") and expected in str(refused.value)


async def test_an_unreachable_database_is_reported_without_its_password() -> None:
    url = f"postgresql://gw:s3cret-pw@127.0.0.1:{free_port()}/gw"
    with pytest.raises(ConfigurationError) as refused:
        await open_store(url, ttl_seconds=None)
    message = str(refused.value)
    assert message.startswith("cannot open the response store postgresql+asyncpg://gw:***@127.0.0.1:")
    assert "s3cret-pw" not in message


async def test_an_unwritable_sqlite_directory_is_reported(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigurationError, match="cannot create the directory of the response store"):
        await open_store(f"sqlite:///{blocker}/sub/responses.db", ttl_seconds=None)


async def test_a_database_lost_at_run_time_is_a_503(postgres: Any) -> None:
    url = postgres.new_database()
    store = await open_store(url, ttl_seconds=None)
    try:
        await store.save(stored(1))
        postgres.stop()
        try:
            with pytest.raises(StoreUnavailableError):
                await store.get("resp_1", None)
            with pytest.raises(StoreUnavailableError):
                await store.save(stored(2))
        finally:
            postgres.start_again()
        assert await store.get("resp_1", None) == stored(1), "back once the server is"
    finally:
        await store.close()


async def test_sqlite_is_opened_for_several_processes(tmp_path: Path) -> None:
    """WAL (readers never wait for the writer) and a busy timeout (writers wait for each other), on every
    connection; the file is created with its directory."""
    store = await open_store(f"sqlite:///{tmp_path / 'a' / 'b' / 'responses.db'}", ttl_seconds=None)
    assert isinstance(store, SQLStore)
    try:
        async with store.engine.connect() as conn:
            assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
            assert (await conn.exec_driver_sql("PRAGMA busy_timeout")).scalar() == 30_000
        assert (tmp_path / "a" / "b" / "responses.db").exists()
    finally:
        await store.close()
