"""Filling an empty table in one statement: its secondary indexes are built once, after the rows.

An ``INSERT`` adds each row to every index of its table as it goes, one index entry at a time.
``CREATE INDEX`` sorts all the rows once and writes the index in order, which costs PostgreSQL a
fraction of that: on a 2-core machine, 100,000 key versions went into ``key_records`` in 0.86 s
with its four indexes, and in 0.43 s with only its primary key, the other three built after. A
store's first sync fills four tables that way (the tracked keys, both version tables, the spend
per day), so on PostgreSQL ``indexes_built_after`` drops a table's secondary indexes for such a
statement and builds them again right after it, in the same transaction: no other session ever
sees the table without them, and a failure anywhere rolls the drop back with everything else.

It does so only where nothing can go wrong for anyone else:

- the table is **empty** (a first sync; a table that holds rows keeps its indexes: the index then
  holds more than the statement adds, and rebuilding it would cost more than it saves);
- this role **owns** the table (a role that may only write to it could not drop its indexes);
- the table is **free**: taking it for the rest of the transaction (``ACCESS EXCLUSIVE``) must
  succeed at once (``NOWAIT``). Another session reading it keeps it, and the statement inserts row
  by row as always. Sessions that come to read it after that wait for the commit: the rest of a
  first sync's recording, a few seconds, at a time the store has nothing yet to show them.

Each index is built again from its own definition as PostgreSQL gives it (``pg_get_indexdef``),
under its own name, in its own tablespace; a unique constraint is added back on its index under
its own name. Primary keys stay, and so does any index that a foreign key, an exclusion
constraint, ``CLUSTER`` or a replica identity relies on. A unique index built after the rows checks
them all at once: a duplicate fails the statement's transaction as it would have failed the insert.
SQLite: nothing (its recording is fast enough as it is).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

from sqlalchemy import exists, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

_INDEXES = text(
    "SELECT t.oid::regclass::text AS table_name, i.indexrelid::regclass::text AS qualified, "
    "quote_ident(ic.relname) AS name, pg_get_indexdef(i.indexrelid) AS definition, "
    "quote_ident(ts.spcname) AS tablespace, quote_ident(u.conname) AS unique_constraint "
    "FROM pg_index AS i "
    "JOIN pg_class AS t ON t.oid = i.indrelid "
    "JOIN pg_class AS ic ON ic.oid = i.indexrelid "
    "LEFT JOIN pg_tablespace AS ts ON ts.oid = ic.reltablespace "
    "LEFT JOIN pg_constraint AS u ON u.conindid = i.indexrelid AND u.conrelid = i.indrelid AND u.contype = 'u' "
    "WHERE i.indrelid = to_regclass(:table) "
    "AND NOT i.indisprimary AND i.indisvalid AND i.indisready AND i.indislive "
    "AND NOT i.indisclustered AND NOT i.indisreplident "
    "AND NOT EXISTS (SELECT 1 FROM pg_constraint AS c WHERE c.conindid = i.indexrelid AND c.contype <> 'u') "
    "AND (u.oid IS NULL OR NOT u.condeferrable) "
    "AND pg_has_role(t.relowner, 'USAGE') "
    "ORDER BY ic.relname"
)
"""The secondary indexes of a table (found by the search path, as every other statement finds it)
that can be dropped and built again as they were, when this role owns the table: not a primary
key, not relied on by a foreign key, an exclusion constraint, ``CLUSTER`` or a replica identity,
not a deferrable unique constraint, not an index still being built."""

_TAKEN_BY_ANOTHER = "55P03"
"""SQLSTATE lock_not_available: another session holds the table (``LOCK ... NOWAIT``)."""


class _Index(NamedTuple):
    table_name: str
    qualified: str
    name: str
    definition: str
    tablespace: str | None
    unique_constraint: str | None


@contextmanager
def indexes_built_after(session: Session, table: Any) -> Iterator[None]:
    """Around one statement that fills ``table`` (a SQLAlchemy table), in the caller's transaction:
    on PostgreSQL, when the table is empty, owned and free, its secondary indexes are dropped before
    and built again after. When the statement fails, nothing is built again: the caller's
    transaction must roll back (and with it the drop)."""
    dropped = _drop_for_loading(session, table)
    yield
    for index in dropped:
        definition = index.definition
        if index.tablespace is not None:
            definition += f" TABLESPACE {index.tablespace}"
        session.execute(text(definition))
        if index.unique_constraint is not None:
            session.execute(
                text(
                    f"ALTER TABLE {index.table_name} ADD CONSTRAINT {index.unique_constraint} "
                    f"UNIQUE USING INDEX {index.name}"
                )
            )


def _drop_for_loading(session: Session, table: Any) -> list[_Index]:
    if session.get_bind().dialect.name != "postgresql":
        return []
    if session.scalar(select(exists().select_from(table))):
        return []
    indexes = [_Index(*row) for row in session.execute(_INDEXES, {"table": table.name})]
    if not indexes:
        return []
    try:
        with session.begin_nested():
            session.execute(text(f"LOCK TABLE {indexes[0].table_name} IN ACCESS EXCLUSIVE MODE NOWAIT"))
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) != _TAKEN_BY_ANOTHER:
            raise
        return []
    # Checked again now that no other session can write to it.
    if session.scalar(select(exists().select_from(table))):
        return []
    for index in indexes:
        if index.unique_constraint is not None:
            session.execute(text(f"ALTER TABLE {index.table_name} DROP CONSTRAINT {index.unique_constraint}"))
        else:
            session.execute(text(f"DROP INDEX {index.qualified}"))
    return indexes
