"""What a job opens: the database and the API client, built from the one settings object."""

from __future__ import annotations

import gc
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from db.engine import describe_db_error as describe_db_error  # where the jobs take it from
from db.engine import make_engine, make_session_factory
from db.migrate import SchemaOutOfDate, check_schema

from .api import open_client as open_client  # where the jobs take it from
from .errors import DatabaseFailure, UsageError
from .logging import get_logger, redact_text
from .settings import Settings


@contextmanager
def collection_paused() -> Iterator[None]:
    """No cyclic garbage collection inside (reference counting still frees what is dropped): for
    building one large list of small objects, such as every key's facts. Each automatic full
    collection walks every object built so far again, which costs a fifth of loading 100,000
    keys. Collection resumes as it was when the block ends."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


_HANDOFFS = threading.Lock()
_handoff_blocks: list[float] = []  # the interval before the first open block, once per open block


@contextmanager
def quick_handoffs(seconds: float = 0.001) -> Iterator[None]:
    """Threads hand the interpreter's lock to one waiting for it after ``seconds`` (default 1 ms)
    instead of 5 ms, inside: for a thread that runs many short steps with the lock released (a
    page request, an SQL statement) beside one that computes. Taking the lock back after each
    step waited up to 5 ms for the computing thread to yield it. The interval is the process's:
    blocks may overlap (jobs on a threads pool), and the last one to end restores the interval
    from before the first."""
    with _HANDOFFS:
        _handoff_blocks.append(_handoff_blocks[0] if _handoff_blocks else sys.getswitchinterval())
        sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        with _HANDOFFS:
            before = _handoff_blocks.pop()
            if not _handoff_blocks:
                sys.setswitchinterval(before)


@dataclass
class Database:
    """The engine and session factories of one process: ``sessions`` for reading, ``writer`` for
    transactions that write (see :func:`session_scope`)."""

    engine: Engine
    sessions: sessionmaker[Session]
    writer: sessionmaker[Session]

    @classmethod
    def open(
        cls, settings: Settings, *, check: bool = True, sqlite_cache_kib: int | None = None, sqlite_durable: bool = True
    ) -> Database:
        """Connect, and (by default) refuse a database that is not at the newest migration."""
        _refuse_missing_sqlite_folder(settings)
        if check:
            _refuse_missing_sqlite_file(settings)
        try:
            engine = make_engine(settings.database, sqlite_cache_kib=sqlite_cache_kib, sqlite_durable=sqlite_durable)
        except (ArgumentError, ImportError) as exc:
            # A driver that is not installed or does not exist: the setting is wrong, not the database.
            raise UsageError(f"KEYHYGIENE_DATABASE_URL cannot be used: {exc}") from None
        database = cls(
            engine=engine, sessions=make_session_factory(engine), writer=make_session_factory(engine, writer=True)
        )
        if check:
            try:
                check_schema(engine)
            except SchemaOutOfDate as exc:
                engine.dispose()
                raise DatabaseFailure(str(exc)) from None
            except OperationalError as exc:
                engine.dispose()
                raise DatabaseFailure(f"cannot open the database: {describe_db_error(exc)}") from None
        return database

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()


def _refuse_missing_sqlite_folder(settings: Settings) -> None:
    """SQLite creates a missing file, never a missing folder, and cannot open a folder: say which
    folder, not "unable to open"."""
    url = settings.database
    path = url.database
    if url.get_backend_name() != "sqlite" or not path or path.startswith("file:"):
        return
    folder = Path(path).parent
    if not folder.is_dir():
        raise UsageError(
            f"KEYHYGIENE_DATABASE_URL names a SQLite file in a folder that does not exist: {folder.absolute()}"
        )
    if Path(path).is_dir():
        raise UsageError(f"KEYHYGIENE_DATABASE_URL names a folder, not a SQLite file: {Path(path).absolute()}")


def _refuse_missing_sqlite_file(settings: Settings) -> None:
    """Connecting would create an empty SQLite file; say to run ``db upgrade`` instead (only that creates one)."""
    url = settings.database
    path = url.database
    if url.get_backend_name() != "sqlite" or not path or path == ":memory:" or path.startswith("file:"):
        return
    if not Path(path).exists():
        raise DatabaseFailure(f"there is no database at {path}: run `keyhygiene db upgrade` first to create it")


@contextmanager
def session_scope(database: Database) -> Iterator[Session]:
    """A writing session whose transaction commits on success and rolls back on any error."""
    with database.writer() as session, session.begin():
        yield session


Taken = tuple[list[str], list[str]] | None
"""What one of ``db.statistics``' analyses did: the tables analyzed and skipped, or None (not tried)."""


def refresh_statistics(database: Database, take: Callable[[Connection], Taken], **bound: object) -> None:
    """On PostgreSQL, run ``take`` (one of ``db.statistics``' analyses) on a connection of its own,
    and log what it analyzed and skipped (``statistics_refreshed``, with ``bound``). It never fails
    the job: a failure is logged (``statistics_refresh_failed``), and the job goes on with the
    statistics there are."""
    if database.dialect != "postgresql":
        return
    log = get_logger("keyhygiene.statistics")
    started = time.monotonic()
    try:
        with database.engine.connect() as connection:
            taken = take(connection)
    except Exception as exc:  # the database's, or any other (a bug): logged, never the job's failure
        log.warning("statistics_refresh_failed", **bound, error=redact_text(describe_db_error(exc)))
        return
    if taken is not None:
        analyzed, skipped = taken
        seconds = round(time.monotonic() - started, 3)
        log.info("statistics_refreshed", **bound, tables=analyzed, skipped=skipped, seconds=seconds)
