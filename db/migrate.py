"""Schema migrations (Alembic), applied as an explicit step: ``keyhygiene db upgrade``.

Every other command only checks that the schema is current (:func:`check_schema`): one SELECT of
the recorded revision against the newest one shipped, read from the migration files' text, so
that no command but ``db upgrade`` pays for loading Alembic.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, inspect, text
from sqlalchemy.exc import DBAPIError

import migrations

if TYPE_CHECKING:
    from alembic.config import Config

VERSION_TABLE = "alembic_version"
_REVISION_LINE = re.compile(r"^(down_revision|revision)\b[^=\n]*=\s*(.+)$", re.MULTILINE)
_QUOTED = re.compile(r"[\"']([^\"']+)[\"']")


class SchemaOutOfDate(RuntimeError):
    """The database is not at the newest migration."""


# Alembic logs "Context impl SQLiteImpl." and "Will assume ..." at INFO whenever it merely reads the
# current revision, as `db upgrade` does before and after. Those lines belong to `db upgrade` only; a context
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
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    return config


def head_revision() -> str:
    """The newest migration, as Alembic reads the scripts."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships migrations
        raise RuntimeError("no migrations found")
    return head


def current_revision(engine: Engine) -> str | None:
    """The migration the database is at (None: no keyhygiene schema); logs nothing."""
    from alembic.runtime.migration import MigrationContext

    with _quiet_alembic(), engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Bring the schema to ``revision``; returns (before, after)."""
    before = current_revision(engine)
    _migrate(engine, "upgrade", revision)
    return before, current_revision(engine) or ""


def downgrade(engine: Engine, revision: str) -> None:
    """Take the schema back to ``revision`` (for tests of migrations; keyhygiene never downgrades)."""
    _migrate(engine, "downgrade", revision)


def _migrate(engine: Engine, direction: str, revision: str) -> None:
    from alembic import command

    config = alembic_config()
    with engine.connect() as connection:
        raw = connection.connection.dbapi_connection if engine.dialect.name == "sqlite" else None
        if raw is not None:
            # A batch migration rebuilds a table (copy, drop, rename) that other tables refer to:
            # SQLite must not check foreign keys midway, and the switch only works outside a
            # transaction. They are checked as a whole before the migration counts as done.
            raw.execute("PRAGMA foreign_keys=OFF")
        try:
            with connection.begin():
                config.attributes["connection"] = connection
                getattr(command, direction)(config, revision)
                if raw is not None:
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").first()
                    if broken is not None:
                        raise RuntimeError(f"the migration left a broken reference in table {broken[0]}")
        finally:
            if raw is not None:
                raw.execute("PRAGMA foreign_keys=ON")


def shipped_head() -> str:
    """The newest migration shipped, read from the scripts' ``revision``/``down_revision`` lines
    (Alembic's own reading when they do not make one chain)."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for script in Path(migrations.__file__).with_name("versions").glob("*.py"):
        for name, value in _REVISION_LINE.findall(script.read_text(encoding="utf-8")):
            (revisions if name == "revision" else parents).update(_QUOTED.findall(value))
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else head_revision()


def recorded_revision(engine: Engine) -> str | None:
    """The migration the database records (None: no keyhygiene schema), with one SELECT."""
    with engine.connect() as connection:
        try:
            versions = connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()
        except DBAPIError:
            connection.rollback()
            if inspect(connection).has_table(VERSION_TABLE):
                raise
            return None
    return versions[0] if len(versions) == 1 else None if not versions else ",".join(sorted(versions))


def check_schema(engine: Engine) -> None:
    """Refuse to go on with a database that is not at the newest migration."""
    current = recorded_revision(engine)
    head = shipped_head()
    if current != head:
        state = "has no keyhygiene schema" if current is None else f"is at migration {current}, not {head}"
        raise SchemaOutOfDate(f"the database {state}: run `keyhygiene db upgrade` first")
