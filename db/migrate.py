"""Schema migrations (Alembic), applied as an explicit step: ``keyhygiene db upgrade``."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

import migrations


class SchemaOutOfDate(RuntimeError):
    """The database is not at the newest migration."""


# Alembic logs "Context impl SQLiteImpl." and "Will assume ..." at INFO whenever it merely reads the
# current revision, which every command does. Those lines belong to `db upgrade` only; a context
# variable (not a logger level) keeps the silencing local to the thread that asked for it.
_quiet = ContextVar("keyhygiene_quiet_alembic", default=False)


class _QuietAlembic(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _quiet.get()


_ALEMBIC_LOGGER = logging.getLogger("alembic.runtime.migration")
if not any(isinstance(existing, _QuietAlembic) for existing in _ALEMBIC_LOGGER.filters):
    _ALEMBIC_LOGGER.addFilter(_QuietAlembic())


@contextmanager
def _quiet_alembic() -> Iterator[None]:
    token = _quiet.set(True)
    try:
        yield
    finally:
        _quiet.reset(token)


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships migrations
        raise RuntimeError("no migrations found")
    return head


def current_revision(engine: Engine) -> str | None:
    """The migration the database is at (None: no keyhygiene schema); logs nothing."""
    with _quiet_alembic(), engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Bring the schema to ``revision``; returns (before, after)."""
    before = current_revision(engine)
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    _incremental_auto_vacuum(engine)
    return before, current_revision(engine) or ""


def _incremental_auto_vacuum(engine: Engine) -> None:
    """SQLite: let prune hand freed pages back to the file system (``PRAGMA incremental_vacuum``).

    The mode only takes effect through a VACUUM, which cannot run inside a transaction, so it is
    done here, once per file, after the migrations have committed (0005 carries old history over
    and relies on it)."""
    if engine.dialect.name != "sqlite":
        return
    connection = engine.raw_connection()  # pysqlite in autocommit (see db/engine.py): no BEGIN
    try:
        cursor = connection.cursor()
        if cursor.execute("PRAGMA auto_vacuum").fetchone()[0] != _INCREMENTAL:
            cursor.execute("PRAGMA auto_vacuum = INCREMENTAL")
            cursor.execute("VACUUM")
        cursor.close()
    finally:
        connection.close()


_INCREMENTAL = 2


def check_schema(engine: Engine) -> None:
    """Refuse to go on with a database that is not at the newest migration."""
    current = current_revision(engine)
    head = head_revision()
    if current != head:
        state = "has no keyhygiene schema" if current is None else f"is at migration {current}, not {head}"
        raise SchemaOutOfDate(f"the database {state}: run `keyhygiene db upgrade` first")
