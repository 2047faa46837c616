"""The response store in a SQL database: SQLAlchemy 2's async Core, one code path for SQLite (aiosqlite, the
default: a file, no server) and PostgreSQL (asyncpg: several gateway processes or hosts on one database).

Theory of operation
-------------------
Two tables. ``tgi_gateway_schema_version`` holds one row, the version of the schema the database has;
``tgi_gateway_responses`` one row per stored response: its id (primary key), owner, ``created_at``,
``expires_at`` (unix seconds, ``created_at`` + the TTL; NULL: kept until deleted; indexed), the previous
response's id, and three JSON columns (the Response object, the input items, the conversation context).

Opening a store creates or migrates the schema in one transaction that holds the database's write lock
(``BEGIN IMMEDIATE`` on SQLite, an advisory transaction lock on PostgreSQL), so gateway processes starting
together neither race nor see half a schema. A database whose version is *newer* than :data:`SCHEMA_VERSION`
was written by a newer gateway: this one refuses to start rather than misread it (ConfigurationError). An
older one is brought up to date by :data:`MIGRATIONS`, one step per version.

Every read and delete filters on the owner and on ``expires_at > now``: an expired response is gone the
moment it expires, whether or not the sweep has removed its row yet. The sweep (one task per store) deletes
expired rows every ``sweep_interval`` seconds, at most ``sweep_batch`` rows a statement, picked through the
``expires_at`` index; after a full batch the next follows at once, so a backlog is cleared in bounded steps
with the event loop free in between (the database does the work; no Python loop over rows).

SQLite is opened in WAL mode (readers never wait for the writer) with a busy timeout, so the processes of
``--workers N`` share one file; each statement is its own transaction. Foreign exceptions (the driver's, the
pool's, the OS's) are translated in one place, :func:`_translated`: a database that fails or cannot be
reached is a :class:`~tgi_gateway.errors.StoreUnavailableError` (503), the cause logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Double,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    delete,
    event,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from ..errors import ConfigurationError, StoreUnavailableError
from ..settings import STORE_SCHEMES, check_store_url
from .types import StoredResponse

logger = logging.getLogger("tgi_gateway")

#: The schema this gateway writes. A database at a higher version is refused; a lower one is migrated.
SCHEMA_VERSION = 1
#: Seconds a SQLite connection waits for another process's write lock before failing.
SQLITE_BUSY_SECONDS = 30.0
#: The PostgreSQL advisory lock held while the schema is created or migrated (any constant of ours).
SCHEMA_LOCK = 0x7467_6977_7273  # "tgiwrs"

metadata = MetaData()
schema_version = Table(
    "tgi_gateway_schema_version",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),  # always 1: one row
    Column("version", Integer, nullable=False),
)
responses = Table(
    "tgi_gateway_responses",
    metadata,
    Column("id", String(255), primary_key=True),
    Column("owner", String(255), nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", Double, nullable=True),
    Column("previous_response_id", String(255), nullable=True),
    Column("response", JSON, nullable=False),
    Column("input_items", JSON, nullable=False),
    Column("context", JSON, nullable=False),
    Index("ix_tgi_gateway_responses_expires_at", "expires_at"),
)

#: version → the coroutine that brings a database at that version to the next one (none yet: version 1 is
#: the first). Each runs inside the schema transaction.
MIGRATIONS: dict[int, Callable[[AsyncConnection], Any]] = {}


def driver_url(url: str) -> URL:
    """`url` as SQLAlchemy's async drivers take it: ``sqlite+aiosqlite``, ``postgresql+asyncpg``."""
    check_store_url(url)
    parsed = make_url(url.strip())
    kind = STORE_SCHEMES[parsed.drivername.lower()]
    return parsed.set(drivername="sqlite+aiosqlite" if kind == "sqlite" else "postgresql+asyncpg")


def shown(url: str | URL) -> str:
    """`url` as it may appear in a message or a log: the password masked."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except sa_exc.ArgumentError:
        return "<an unreadable URL>"


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


@contextlib.contextmanager
def _translated(action: str) -> Any:
    """The one table of foreign exceptions: the database unreachable or failing → StoreUnavailableError
    (logged with its cause); anything else (a bug) passes unchanged."""
    try:
        yield
    except (
        sa_exc.OperationalError,
        sa_exc.InterfaceError,
        sa_exc.TimeoutError,
        OSError,
        TimeoutError,
    ) as exc:
        logger.warning("response store: %s failed: %s", action, _cause(exc))
        raise StoreUnavailableError() from exc


def _cause(exc: BaseException) -> str:
    """A database error's own message, without SQLAlchemy's statement and parameters (which hold data)."""
    orig = getattr(exc, "orig", None)
    return f"{type(orig or exc).__name__}: {orig or exc}".splitlines()[0][:300]


class SQLStore:
    """A :class:`~tgi_gateway.store.ResponseStore` in a SQL database (see the module's docstring). Built by
    :meth:`open`; `clock` (unix seconds) is a seam for tests."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        ttl_seconds: float | None,
        sweep_interval: float,
        sweep_batch: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        # Each call is one statement, atomic by itself: on PostgreSQL it runs without BEGIN/ROLLBACK around it
        # (two round trips fewer); SQLite keeps its driver's implicit transactions (the same one statement).
        self._single = (
            engine.execution_options(isolation_level="AUTOCOMMIT")
            if engine.dialect.name == "postgresql"
            else engine
        )
        self.ttl_seconds = ttl_seconds
        self.sweep_interval = sweep_interval
        self.sweep_batch = sweep_batch
        self.clock = clock
        self._sweeper: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        ttl_seconds: float | None,
        sweep_interval: float = 60.0,
        sweep_batch: int = 500,
        clock: Callable[[], float] = time.time,
    ) -> SQLStore:
        """The store at `url`, its schema ready, its sweep running (see :func:`tgi_gateway.store.open_store`)."""
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive, or None (kept until deleted)")
        try:
            target = driver_url(url)
        except ValueError as exc:
            raise ConfigurationError(f"--response-store: {exc}") from None
        engine = _engine(target)
        store = cls(
            engine,
            ttl_seconds=ttl_seconds,
            sweep_interval=sweep_interval,
            sweep_batch=sweep_batch,
            clock=clock,
        )
        try:
            await store._prepare_schema()
        except ConfigurationError:
            await engine.dispose()
            raise
        except (sa_exc.SQLAlchemyError, OSError, TimeoutError) as exc:
            await engine.dispose()
            raise ConfigurationError(
                f"cannot open the response store {shown(target)}: {_cause(exc)}"
            ) from None
        if ttl_seconds is not None:
            store._sweeper = asyncio.get_running_loop().create_task(store._sweep_forever())
        return store

    # -- the ResponseStore protocol ------------------------------------------------------------------

    async def save(self, stored: StoredResponse) -> None:
        row = {
            "id": stored.id,
            "owner": stored.owner,
            "created_at": stored.created_at,
            "expires_at": None if self.ttl_seconds is None else stored.created_at + self.ttl_seconds,
            "previous_response_id": stored.previous_response_id,
            "response": stored.response,
            "input_items": stored.input_items,
            "context": stored.context,
        }
        with _translated("save"):
            async with self._single.begin() as conn:
                await conn.execute(insert(responses), row)

    async def get(self, response_id: str, owner: str | None) -> StoredResponse | None:
        with _translated("get"):
            async with self._single.connect() as conn:
                row = (
                    await conn.execute(select(responses).where(*self._visible(response_id, owner)))
                ).first()
        if row is None:
            return None
        return StoredResponse(
            id=row.id,
            owner=row.owner,
            created_at=row.created_at,
            response=row.response,
            input_items=row.input_items,
            context=row.context,
            previous_response_id=row.previous_response_id,
        )

    async def delete(self, response_id: str, owner: str | None) -> bool:
        with _translated("delete"):
            async with self._single.begin() as conn:
                result = await conn.execute(delete(responses).where(*self._visible(response_id, owner)))
        return result.rowcount > 0

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        await self.engine.dispose()

    # -- expiry --------------------------------------------------------------------------------------

    async def sweep(self) -> int:
        """Delete expired rows, at most `sweep_batch` of them (the oldest first); how many were deleted."""
        expired = (
            select(responses.c.id)
            .where(responses.c.expires_at <= self.clock())
            .order_by(responses.c.expires_at)
            .limit(self.sweep_batch)
            .with_for_update(
                skip_locked=True
            )  # PostgreSQL: processes sweeping at once skip each other's rows
        )
        with _translated("sweep"):
            async with self._single.begin() as conn:
                result = await conn.execute(
                    delete(responses).where(responses.c.id.in_(expired.scalar_subquery()))
                )
        return result.rowcount

    async def _sweep_forever(self) -> None:
        deleted = 0
        while True:
            # A full batch: more may be waiting; the next one at once (the loop is free while the database works).
            await asyncio.sleep(0 if deleted >= self.sweep_batch else self.sweep_interval)
            try:
                deleted = await self.sweep()
            except StoreUnavailableError:  # logged; tried again at the next interval
                deleted = 0
            except Exception:
                logger.exception("response store: the expiry sweep failed")
                deleted = 0
            if deleted:
                logger.debug("response store: %d expired response(s) deleted", deleted)

    def _visible(self, response_id: str, owner: str | None) -> tuple[Any, ...]:
        """The conditions of a row `owner` may see: its id, its owner (None only matches None), not expired."""
        return (
            responses.c.id == response_id,
            responses.c.owner.is_(None) if owner is None else responses.c.owner == owner,
            or_(responses.c.expires_at.is_(None), responses.c.expires_at > self.clock()),
        )

    # -- the schema ----------------------------------------------------------------------------------

    async def _prepare_schema(self) -> None:
        async with self._schema_transaction() as conn:
            await conn.run_sync(lambda sync: schema_version.create(sync, checkfirst=True))
            found = (await conn.execute(select(schema_version.c.version))).scalar_one_or_none()
            if found is None:
                await conn.run_sync(lambda sync: metadata.create_all(sync, checkfirst=True))
                await conn.execute(insert(schema_version), {"id": 1, "version": SCHEMA_VERSION})
                logger.info(
                    "response store %s: schema version %d created", shown(self.engine.url), SCHEMA_VERSION
                )
            elif found > SCHEMA_VERSION:
                raise ConfigurationError(
                    f"the response store {shown(self.engine.url)} has schema version {found}, written by a newer "
                    f"tgi-gateway; this one knows versions up to {SCHEMA_VERSION}. Run the newer gateway, or give "
                    "this one another --response-store (docs/operations.md, Response store)."
                )
            else:
                for version in range(found, SCHEMA_VERSION):
                    await MIGRATIONS[version](conn)
                    logger.info("response store: schema migrated from version %d to %d", version, version + 1)
                if found < SCHEMA_VERSION:
                    await conn.execute(update(schema_version).values(version=SCHEMA_VERSION))

    @contextlib.asynccontextmanager
    async def _schema_transaction(self) -> AsyncIterator[AsyncConnection]:
        """A transaction holding the database's write lock until it commits: the schema is made once."""
        async with self.engine.connect() as conn:
            if self.engine.dialect.name == "sqlite":
                await conn.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK})
            try:
                yield conn
            except BaseException:
                await conn.rollback()
                raise
            await conn.commit()


def _engine(url: URL) -> AsyncEngine:
    """The async engine of `url`: orjson for the JSON columns; SQLite in WAL mode with a busy timeout (its
    directory created); PostgreSQL connections checked before use (a restarted server costs no request)."""
    options: dict[str, Any] = {"json_serializer": _dumps, "json_deserializer": orjson.loads}
    if url.get_backend_name() == "sqlite":
        path = Path(url.database or "")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot create the directory of the response store {path}: {exc.strerror or exc} "
                "(set --data-dir or --response-store)"
            ) from None
        engine = create_async_engine(url, connect_args={"timeout": SQLITE_BUSY_SECONDS}, **options)

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_connection: Any, record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_SECONDS * 1000)}")
            cursor.execute("PRAGMA journal_mode = WAL")  # kept in the file: every process reads it
            cursor.execute("PRAGMA synchronous = NORMAL")  # WAL's safe setting: a crash loses no commit
            cursor.close()

        return engine
    return create_async_engine(
        url, pool_pre_ping=True, pool_size=5, max_overflow=10, pool_timeout=10, **options
    )
