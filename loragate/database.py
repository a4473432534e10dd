"""One small SQL interface over SQLite (the embedded default) and PostgreSQL (fleets).

The registry and the outcome log write their SQL once, with ``?`` placeholders and what both
dialects accept (``TEXT``, ``INTEGER``, ``BIGINT``, ``DOUBLE PRECISION``, ``COUNT(*) FILTER``), and
run it through a :class:`Database`:

- :class:`SQLiteDatabase`: one WAL file in the data dir, shared by the gateway processes of one host
  (see :mod:`loragate.shared_db`); cross-process locks are a file lock next to it.
- :class:`PostgresDatabase`: psycopg 3 with a connection pool, shared by every replica on every
  host; locks are PostgreSQL advisory locks, which the server releases when the holder's
  connection drops — a replica killed mid-write never leaves a lock behind.

The interface is synchronous and callers run it in threads (``asyncio.to_thread``), because the
work around it — staging, hashing and uploading adapter files, writing outcome batches — is
blocking file and network I/O too: one code path for both backends, not a sync and an async twin.
What must not wait on a thread, following other replicas' changes, is async: :meth:`Database.changes`
(SQLite: ``PRAGMA data_version`` polls; PostgreSQL: ``LISTEN`` on psycopg's async connection, with
a periodic full resync as the backstop for notifications missed while disconnected).

A database that cannot be reached is :class:`~loragate.errors.StorageUnavailable` (503 with the
reason), never a 500 and never a hang: pool checkouts time out.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from loragate.errors import StorageUnavailable
from loragate.shared_db import connect_shared, lock_for

log = logging.getLogger(__name__)

Row = Mapping[str, Any]
Params = Sequence[Any]


class DuplicateRow(Exception):
    """An INSERT hit a primary key or unique constraint (either dialect)."""


class Executor(Protocol):
    """What statements run on: the database itself (each statement commits) or one open transaction."""

    def query(self, sql: str, params: Params = ()) -> list[Row]: ...

    def execute(self, sql: str, params: Params = ()) -> int: ...

    def executemany(self, sql: str, rows: Sequence[Params]) -> None: ...


class Database(Executor, Protocol):
    dialect: str  # "sqlite" | "postgresql"

    def transaction(self) -> contextlib.AbstractContextManager[Executor]: ...

    def lock(self, name: str, *, shared: bool = False) -> contextlib.AbstractContextManager[None]:
        """Exclusive (or shared) against every process using this database, held for the ``with`` block."""
        ...

    def changes(self, channel: str, *, poll_s: float, resync_s: float) -> AsyncIterator[None]:
        """Yields whenever another process may have changed the tables behind ``channel`` (and now and
        then regardless, as a resync); the caller re-reads."""
        ...

    def describe(self) -> str:
        """Where the database is, for messages (never a password)."""
        ...

    def close(self) -> None: ...


# -- SQLite ----------------------------------------------------------------------------------------------
class SQLiteDatabase:
    """One SQLite file (WAL, autocommit) with a process-wide lock around its single connection."""

    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = connect_shared(path, "")
        self._db.execute("PRAGMA synchronous=FULL")
        self._mutex = threading.RLock()
        self._files = lock_for(path)

    @contextlib.contextmanager
    def _statement(self) -> Iterator[sqlite3.Connection]:
        """The connection for one statement, under the mutex; a constraint hit as DuplicateRow."""
        with self._mutex:
            try:
                yield self._db
            except sqlite3.IntegrityError as exc:
                raise DuplicateRow(str(exc)) from exc

    def query(self, sql: str, params: Params = ()) -> list[Row]:
        with self._statement() as db:
            return db.execute(sql, params).fetchall()

    def execute(self, sql: str, params: Params = ()) -> int:
        with self._statement() as db:
            return db.execute(sql, params).rowcount

    def executemany(self, sql: str, rows: Sequence[Params]) -> None:
        with self._statement() as db:
            db.executemany(sql, rows)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Executor]:
        with self._mutex:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextlib.contextmanager
    def lock(self, name: str, *, shared: bool = False) -> Iterator[None]:
        # One host: this process's threads (the re-entrant mutex) and the other processes on the data
        # dir (the file lock). SQLite has no shared mode worth having here; every holder is exclusive.
        with self._mutex, self._files:
            yield

    def _data_version(self) -> int:
        return int(self.query("PRAGMA data_version")[0]["data_version"])

    async def changes(self, channel: str, *, poll_s: float, resync_s: float) -> AsyncIterator[None]:
        """Polls ``PRAGMA data_version`` (bumped by other connections' commits): yields once the baseline is
        read (a commit between the caller's first read and the baseline would otherwise never be seen), on
        every change, and every ``resync_s`` regardless, as the PostgreSQL follower does."""
        seen = await asyncio.to_thread(self._data_version)
        yield
        loop = asyncio.get_running_loop()
        synced = loop.time()
        while True:
            await asyncio.sleep(poll_s)
            try:
                version = await asyncio.to_thread(self._data_version)
            except sqlite3.Error:
                log.exception("polling %s failed", self.path)
                continue
            if version != seen or loop.time() - synced >= resync_s:
                seen, synced = version, loop.time()
                yield

    def describe(self) -> str:
        return str(self.path)

    def close(self) -> None:
        with self._mutex:
            self._db.close()


# -- PostgreSQL ------------------------------------------------------------------------------------------
def _pg(sql: str) -> str:
    """``?`` placeholders as psycopg's ``%s``, a literal ``%`` as ``%%`` (loragate's SQL has no literal ``?``)."""
    return sql.replace("%", "%%").replace("?", "%s")


def advisory_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for ``name`` (the same on every replica)."""
    return int.from_bytes(hashlib.sha256(f"loragate:{name}".encode()).digest()[:8], "big", signed=True)


@dataclass(frozen=True, slots=True)
class PostgresOptions:
    pool_size: int = 4
    connect_timeout_s: float = 5.0  # a checkout waits at most this long before StorageUnavailable
    open_timeout_s: float = 30.0  # at startup: how long to wait for the server


class PostgresDatabase:
    """A psycopg connection pool (statements) and a second one for advisory locks, so a long-held lock
    (a merge being built) never starves queries of connections."""

    dialect = "postgresql"

    def __init__(self, url: str, options: PostgresOptions = PostgresOptions()) -> None:
        self.url = url
        self.options = options
        info = psycopg.conninfo.conninfo_to_dict(url)
        self._where = (f"PostgreSQL at {info.get('host', 'localhost')}:{info.get('port', 5432)}/"
                       f"{info.get('dbname', '')}")
        kwargs = {"autocommit": True, "row_factory": dict_row,
                  "connect_timeout": max(1, int(options.connect_timeout_s)),
                  "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}
        self._pool = ConnectionPool(url, min_size=1, max_size=options.pool_size, kwargs=kwargs, open=False,
                                    timeout=options.connect_timeout_s, check=ConnectionPool.check_connection,
                                    name="loragate")
        self._locks = ConnectionPool(url, min_size=0, max_size=max(2, options.pool_size), kwargs=kwargs, open=False,
                                     timeout=options.connect_timeout_s, check=ConnectionPool.check_connection,
                                     name="loragate-locks")
        try:
            self._pool.open(wait=True, timeout=options.open_timeout_s)
            self._locks.open()
        except Exception as exc:
            self._pool.close()
            self._locks.close()
            raise StorageUnavailable(f"cannot reach {self._where}: {exc}") from exc

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """psycopg's connection failures and pool timeouts as StorageUnavailable; constraint hits as DuplicateRow."""
        try:
            yield
        except psycopg.errors.UniqueViolation as exc:
            raise DuplicateRow(str(exc)) from exc
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise StorageUnavailable(f"{self._where} is unreachable: {str(exc).strip() or type(exc).__name__}") \
                from exc

    @contextlib.contextmanager
    def _checked_out(self, *, transaction: bool = False) -> Iterator[_OnConnection]:
        """Statements on a pooled connection (autocommit, or one transaction committed at the end)."""
        with self._errors(), self._pool.connection() as conn:
            if not transaction:
                yield _OnConnection(conn, self._errors)
                return
            with conn.transaction():
                yield _OnConnection(conn, self._errors)

    def query(self, sql: str, params: Params = ()) -> list[Row]:
        with self._checked_out() as statements:
            return statements.query(sql, params)

    def execute(self, sql: str, params: Params = ()) -> int:
        with self._checked_out() as statements:
            return statements.execute(sql, params)

    def executemany(self, sql: str, rows: Sequence[Params]) -> None:
        with self._checked_out() as statements:
            statements.executemany(sql, rows)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Executor]:
        with self._checked_out(transaction=True) as statements:
            yield statements

    @contextlib.contextmanager
    def lock(self, name: str, *, shared: bool = False) -> Iterator[None]:
        key = advisory_key(name)
        suffix = "_shared" if shared else ""
        with self._errors(), self._locks.connection() as conn:
            conn.execute(f"SELECT pg_advisory_lock{suffix}(%s)", (key,))
            try:
                yield
            finally:
                with contextlib.suppress(psycopg.Error):
                    conn.execute(f"SELECT pg_advisory_unlock{suffix}(%s)", (key,))

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        """The advisory lock ``merge:<key>`` for an ``async with`` block (the merge cache's build lock: a merge
        wanted on every replica at once is built by one). Acquired in a thread; a caller cancelled while
        waiting releases the lock as soon as the thread gets it."""
        held = self.lock(f"merge:{key}")
        acquiring = asyncio.ensure_future(asyncio.to_thread(held.__enter__))
        try:
            await asyncio.shield(acquiring)
        except asyncio.CancelledError:
            def release_once_acquired(done: asyncio.Future[None]) -> None:
                if not done.cancelled() and done.exception() is None:
                    threading.Thread(target=held.__exit__, args=(None, None, None)).start()

            acquiring.add_done_callback(release_once_acquired)
            raise
        try:
            yield
        finally:
            await asyncio.to_thread(held.__exit__, None, None, None)

    async def changes(self, channel: str, *, poll_s: float, resync_s: float) -> AsyncIterator[None]:
        """LISTEN on ``channel``: yields after each burst of notifications, after every (re)connection
        (notifications sent while disconnected are lost) and every ``resync_s`` regardless."""
        backoff = 0.2
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.url, autocommit=True,
                                                                connect_timeout=5) as conn:
                    await conn.execute(f"LISTEN {channel}")
                    backoff = 0.2
                    yield  # (re)connected: whatever was missed meanwhile is read now
                    while True:
                        async for _ in conn.notifies(timeout=resync_s, stop_after=1):
                            pass  # one notification, or the resync timeout
                        async for _ in conn.notifies(timeout=0.002):
                            pass  # the rest of a burst (what arrives within 2 ms): one re-read for all of it
                        await conn.execute("SELECT 1")  # a dead connection raises here, not silently
                        yield
            except psycopg.Error as exc:
                log.warning("listening for %s on %s failed (%s); reconnecting in %.1f s", channel, self._where,
                            str(exc).strip() or type(exc).__name__, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def describe(self) -> str:
        return self._where

    def close(self) -> None:
        """Idempotent: the registry and the outcome log share one PostgreSQL database and both close it."""
        self._pool.close()
        self._locks.close()


class _OnConnection:
    """Statements on one psycopg connection, its errors mapped (``?`` placeholders translated)."""

    def __init__(self, conn: Any, errors: Callable[[], contextlib.AbstractContextManager[None]]) -> None:
        self._conn = conn
        self._errors = errors

    def query(self, sql: str, params: Params = ()) -> list[Row]:
        with self._errors():
            return list(self._conn.execute(_pg(sql), params).fetchall())

    def execute(self, sql: str, params: Params = ()) -> int:
        with self._errors():
            return int(self._conn.execute(_pg(sql), params).rowcount)

    def executemany(self, sql: str, rows: Sequence[Params]) -> None:
        with self._errors(), self._conn.cursor() as cursor:
            cursor.executemany(_pg(sql), rows)


# -- migrations ------------------------------------------------------------------------------------------
Step = Sequence[str] | Callable[[Executor], None]


@dataclass(frozen=True, slots=True)
class Migration:
    """Version ``version`` of ``component``'s schema: statements (or a function) per dialect."""

    version: int
    description: str
    steps: Mapping[str, Step]


def schema_version(db: Database, component: str) -> int:
    db.execute("CREATE TABLE IF NOT EXISTS schema_versions (component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
    rows = db.query("SELECT version FROM schema_versions WHERE component = ?", (component,))
    return int(rows[0]["version"]) if rows else 0


def migrate(db: Database, component: str, migrations: Sequence[Migration]) -> int:
    """Bring ``component``'s tables to the newest version; returns it.

    Runs under the database's exclusive lock, so replicas starting together migrate once; each
    version is one transaction, so a crash half way leaves the schema at the last whole version.
    A database newer than this code is refused rather than written with an old schema.
    """
    versions = [m.version for m in migrations]
    assert versions == sorted(set(versions)), f"{component}: migration versions must increase: {versions}"
    newest = versions[-1] if versions else 0
    with db.lock(f"migrate:{component}"):
        current = schema_version(db, component)
        if current > newest:
            raise StorageUnavailable(f"{db.describe()}: {component} schema is at version {current}, newer than this "
                                     f"loragate knows ({newest}); upgrade loragate")
        for migration in migrations:
            if migration.version <= current:
                continue
            step = migration.steps.get(db.dialect, ())
            with db.transaction() as tx:
                if callable(step):
                    step(tx)
                else:
                    for statement in step:
                        tx.execute(statement)
                tx.execute("DELETE FROM schema_versions WHERE component = ?", (component,))
                tx.execute("INSERT INTO schema_versions (component, version) VALUES (?, ?)",
                           (component, migration.version))
            log.info("%s: %s schema migrated to version %d (%s)", db.describe(), component, migration.version,
                     migration.description)
            current = migration.version
    return current


# -- opening ---------------------------------------------------------------------------------------------
def open_databases(data_dir: Path, url: str | None, options: PostgresOptions = PostgresOptions()
                   ) -> tuple[Database, Database]:
    """(registry database, outcome database): two SQLite files in ``data_dir``, or one PostgreSQL for both."""
    if url is None:
        data_dir.mkdir(parents=True, exist_ok=True)
        return SQLiteDatabase(data_dir / "registry.sqlite3"), SQLiteDatabase(data_dir / "outcomes.sqlite3")
    database = PostgresDatabase(url, options)
    return database, database
