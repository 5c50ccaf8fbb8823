"""Engines and sessions: SQLite (WAL, busy timeout) by default, PostgreSQL through psycopg 3."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000
SQLITE_BEGIN = "keyhygiene_sqlite_begin"


def make_engine(
    url: URL | str, *, sqlite_cache_kib: int | None = None, sqlite_durable: bool = True, **kwargs: Any
) -> Engine:
    """An engine for ``url``; SQLite gets WAL journaling, a busy timeout and foreign keys, and
    ``sqlite_cache_kib`` of page cache per connection instead of its default 2 MB, when given.
    ``sqlite_durable=False`` stops SQLite from syncing to disk at all (``synchronous=OFF``): only
    for a database that is thrown away when the machine fails (the demo's)."""
    engine = create_engine(url, pool_pre_ping=True, **kwargs)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _: Any) -> None:
            # Let SQLAlchemy, not pysqlite, decide when a transaction starts, so that BEGIN is
            # explicit and a whole sync really is one transaction.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA synchronous={'NORMAL' if sqlite_durable else 'OFF'}")
            if sqlite_cache_kib is not None:
                cursor.execute(f"PRAGMA cache_size={-sqlite_cache_kib}")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection: Any) -> None:
            # Writers take the write lock up front (IMMEDIATE), so a read-then-write transaction
            # waits for the busy timeout instead of failing; readers stay DEFERRED and never
            # hold up a sync in WAL mode.
            connection.exec_driver_sql(f"BEGIN {connection.get_execution_options().get(SQLITE_BEGIN, 'DEFERRED')}")

    return engine


@contextmanager
def sqlite_cache(session: Session, kib: int) -> Iterator[None]:
    """Inside, the session's SQLite connection has at least ``kib`` of page cache, and its own again
    after (a larger one is left as it is; other databases are left alone): for statements that
    write into a large index in no particular order, where each page the cache cannot keep is
    written out and read back again, many times over."""
    connection = session.connection()
    if connection.dialect.name != "sqlite":
        yield
        return
    before = connection.exec_driver_sql("PRAGMA cache_size").scalar_one()
    page_kib = connection.exec_driver_sql("PRAGMA page_size").scalar_one() // 1024
    if (-before if before < 0 else before * page_kib) >= kib:
        yield
        return
    connection.exec_driver_sql(f"PRAGMA cache_size={-int(kib)}")
    try:
        yield
    finally:
        # Not over the error that ends the block: a connection that cannot take this is dropped.
        with suppress(DBAPIError):
            connection.exec_driver_sql(f"PRAGMA cache_size={before}")


def make_session_factory(engine: Engine, *, writer: bool = False) -> sessionmaker[Session]:
    """Sessions that keep loaded objects usable after commit; ``writer`` sessions lock SQLite up front.

    A reading session sees the database as one moment, whatever commits meanwhile: on SQLite a read
    transaction does; on PostgreSQL it takes REPEATABLE READ, since by default each statement would
    see what had committed before it. Reading "the newest snapshot" is two statements (is it the
    newest? then its open versions): a sync recorded in between must not slip its keys in."""
    bind: Engine = engine
    if writer:
        bind = engine.execution_options(**{SQLITE_BEGIN: "IMMEDIATE"})
    elif engine.dialect.name == "postgresql":
        bind = engine.execution_options(isolation_level="REPEATABLE READ")
    return sessionmaker(bind, expire_on_commit=False)


def describe_db_error(error: BaseException) -> str:
    """One line about a database failure, without the driver's multi-line noise or a password."""
    text = str(getattr(error, "orig", None) or error).strip().splitlines()
    return text[0] if text else type(error).__name__
