"""Filling an empty table in one statement: its secondary indexes are built once, after the rows.

An ``INSERT`` adds each row to every index of its table as it goes, one index entry at a time.
``CREATE INDEX`` sorts all the rows once and writes the index in order, which costs PostgreSQL a
fraction of that: on a 2-core machine, 100,000 key versions went into ``key_records`` in 0.86 s
with its four indexes, and in 0.43 s with only its primary key, the other three built after. A
store's first sync fills four tables that way (the tracked keys, both version tables, the spend
per day), so on PostgreSQL ``indexes_built_after`` drops a table's secondary indexes for such a
statement and builds them again right after it, in the same transaction: no other session ever
sees the table without them, and a failure anywhere rolls the drop back with everything else.

It does so only where it pays and nothing can go wrong for anyone else:

- the table is **empty** (a first sync; a table that holds rows keeps its indexes: the index then
  holds more than the statement adds, and rebuilding it would cost more than it saves), and the
  statement adds at least ``WORTH_IT`` rows (below that the gain is too small to take the table
  for; an organisation without keys leaves the tables empty sync after sync);
- this role **owns** the table (a role that may only write to it could not drop its indexes);
- the table is **free**: taking it for the rest of the transaction (``ACCESS EXCLUSIVE``) must
  succeed at once (``NOWAIT``). Another session reading it keeps it, and the statement inserts row
  by row as always. Sessions that come to read it after that wait for the commit: the rest of a
  first sync's recording, a few seconds, at a time the store has nothing yet to show them. A table
  that another session wrote a row to between the first look and the lock is given back at once
  (the lock is taken in a savepoint, and rolled back with it) and filled row by row.

Each index is built again from its own definition as PostgreSQL gives it (``pg_get_indexdef``),
under its own name, in its own tablespace; a unique constraint is added back on its index under
its own name. Primary keys stay, and so does any index that the definition would not bring back
whole: one that a foreign key, an exclusion constraint, ``CLUSTER`` or a replica identity relies
on, a deferrable unique constraint, an index with a comment, a security label or a column's
statistics target, or one in a tablespace where this role may not create. A unique index built
after the rows checks them all at once: a duplicate fails the statement's transaction as it would
have failed the insert. (``CREATE INDEX`` also records the table's row count for the planner, and
that count is kept even when the transaction rolls back: autovacuum's and ``db.statistics``'s
thresholds still see the table as never analyzed.)

While the table is taken, the caller may also name statement-level check triggers of the table
that it has proved the statement's rows pass (``proven_by_caller``): they are disabled for that
statement and enabled again right after it, in the same transaction. A check that looks every
row of a 100,000-row statement up again made the insert take 0.30 s instead of 0.23 s.

SQLite: nothing. It appends rows to its indexes cheaply enough that building them after costs more
than it saves (100,000 key versions: 0.30-0.32 s against 0.25 s).

A statement that adds many rows to a table it also reads (to leave out the keys tracked already,
or those with an open version) is planned by the table as it is before the statement, and a table
the planner takes for empty or nearly so is read by a nested loop, once per row added, each time
whole: the pages the statement has appended so far included, so the time grows with the square of
the rows added. ``planned_for_growth`` turns nested loops off for such a statement where the table
holds fewer rows than the sync staged; it then reads the table once (a hash join). A store analyzed
while empty (``ANALYZE`` or ``vacuumdb --analyze`` after ``keyhygiene db upgrade``) took 6.9 s for
its first sync's 20,000 keys instead of 0.4 s, and a table holding a few keys does the same. A
larger table keeps its plan (an index probe per row), which is the faster one for a few thousand
changed keys among 100,000: with nested loops off, a store of 100,000 keys and 1.6 million versions
hashed every version to record 3,000 changed keys (1.1-1.7 s instead of 0.05 s). The planner
scales the row count of a table's last analysis by the table's size now, so how many rows the
table holds is what it believes too; ``planned_for_growth`` counts them, reading at most as many
as the sync staged.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

WORTH_IT = 10_000
"""The fewest rows a statement must add for its table's indexes to be built after them: at 20,000
keys, a first sync's recording took 0.71 s against 0.82 s; at a few thousand there is little to gain
for taking the tables."""

_CANDIDATE = (
    "SELECT true FROM pg_class AS t WHERE t.oid = to_regclass(:table) AND pg_has_role(t.relowner, 'USAGE') "
    "AND NOT EXISTS (SELECT FROM {table})"
)
"""A row when this role owns the table (found by the search path, as every other statement finds
it) and the table holds no row."""

_EMPTY = "SELECT NOT EXISTS (SELECT FROM {table})"

_INDEXES = text(
    "SELECT i.indexrelid::regclass::text AS qualified, quote_ident(ic.relname) AS name, "
    "pg_get_indexdef(i.indexrelid) AS definition, "
    "coalesce(ts.spcname, (SELECT d.spcname FROM pg_database AS db "
    "  JOIN pg_tablespace AS d ON d.oid = db.dattablespace WHERE db.datname = current_database())) AS tablespace, "
    "quote_ident(u.conname) AS unique_constraint "
    "FROM pg_index AS i "
    "JOIN pg_class AS ic ON ic.oid = i.indexrelid "
    "LEFT JOIN pg_tablespace AS ts ON ts.oid = ic.reltablespace "
    "LEFT JOIN pg_constraint AS u ON u.conindid = i.indexrelid AND u.conrelid = i.indrelid AND u.contype = 'u' "
    "WHERE i.indrelid = to_regclass(:table) "
    "AND NOT i.indisprimary AND i.indisvalid AND i.indisready AND i.indislive "
    "AND NOT i.indisclustered AND NOT i.indisreplident "
    "AND NOT EXISTS (SELECT FROM pg_constraint AS c WHERE c.conindid = i.indexrelid AND c.contype <> 'u') "
    "AND (u.oid IS NULL OR (NOT u.condeferrable AND obj_description(u.oid, 'pg_constraint') IS NULL)) "
    "AND obj_description(i.indexrelid, 'pg_class') IS NULL "
    "AND NOT EXISTS (SELECT FROM pg_seclabel AS l WHERE l.objoid = i.indexrelid) "
    "AND NOT EXISTS (SELECT FROM pg_attribute AS a WHERE a.attrelid = i.indexrelid "
    "  AND a.attstattarget IS NOT NULL AND a.attstattarget <> -1) "
    "AND (ic.reltablespace = 0 OR has_tablespace_privilege(ic.reltablespace, 'CREATE')) "
    "ORDER BY ic.relname"
)
"""The secondary indexes of a table that can be dropped and built again as they were (above), each
with the tablespace it is in: the database's own for an index in the default one, so that the
role's ``default_tablespace`` does not move it elsewhere."""

_ENABLED_TRIGGERS = text(
    "SELECT quote_ident(tgname) FROM pg_trigger WHERE tgrelid = to_regclass(:table) "
    "AND tgname = ANY(CAST(:names AS text[])) AND tgenabled = 'O' AND NOT tgisinternal ORDER BY tgname"
)
"""Of the named triggers of a table, those that fire as usual (``ENABLE TRIGGER``): only those are
disabled for a statement, and enabled again after it."""

_SET_DEFAULT_TABLESPACE = text("SELECT set_config('default_tablespace', :name, true)")
"""``SET LOCAL default_tablespace``: until the transaction ends, or is set again."""

_AS_WRITTEN = {"no_parameters": True}
"""Execution options for a statement sent to the driver as it is, without parameters to fill in."""

_TAKEN_BY_ANOTHER = "55P03"
"""SQLSTATE lock_not_available: another session holds the table (``LOCK ... NOWAIT``)."""


class _Index(NamedTuple):
    qualified: str
    name: str
    definition: str
    tablespace: str
    unique_constraint: str | None


@contextmanager
def indexes_built_after(
    session: Session, table: Any, *, rows: int, proven_by_caller: Sequence[str] = ()
) -> Iterator[None]:
    """Around one statement that adds ``rows`` rows to ``table`` (a SQLAlchemy table), in the
    caller's transaction: on PostgreSQL, when the table is empty, owned and free and ``rows`` is at
    least ``WORTH_IT``, its secondary indexes are dropped before and built again after. When the
    statement fails, nothing is built again: the caller's transaction must roll back (and with it
    the drop).

    ``proven_by_caller``: statement-level check triggers of ``table`` that the caller has shown
    the statement's rows pass (the references to the tracked keys: ``db.snapshots``). While the
    table is taken they are disabled for the statement alone, and enabled again right after it;
    a failure rolls that back too."""
    dropped = _drop_for_loading(session, table, rows)
    if dropped is None:  # not taken: the statement inserts row by row, checked as always
        yield
        return
    connection = session.connection()
    table_name = _table_name(session, table)
    paused: Sequence[str] = []
    if proven_by_caller:
        paused = session.scalars(_ENABLED_TRIGGERS, {"table": table.name, "names": list(proven_by_caller)}).all()
    for trigger in paused:
        connection.exec_driver_sql(f"ALTER TABLE {table_name} DISABLE TRIGGER {trigger}", execution_options=_AS_WRITTEN)
    yield
    for trigger in paused:
        connection.exec_driver_sql(f"ALTER TABLE {table_name} ENABLE TRIGGER {trigger}", execution_options=_AS_WRITTEN)
    if not dropped:  # taken, with no index to build again
        return
    default_tablespace = session.scalar(text("SELECT current_setting('default_tablespace')"))
    for index in dropped:
        # A definition names no tablespace: the index goes to the default one, set for it here.
        session.execute(_SET_DEFAULT_TABLESPACE, {"name": index.tablespace})
        # Run as PostgreSQL wrote it: nothing in its text (a "%" or a ":name" in a predicate, a
        # quoted name) is taken for a parameter, by SQLAlchemy or by the driver.
        connection.exec_driver_sql(index.definition, execution_options=_AS_WRITTEN)
        if index.unique_constraint is not None:
            connection.exec_driver_sql(
                f"ALTER TABLE {table_name} ADD CONSTRAINT {index.unique_constraint} UNIQUE USING INDEX {index.name}",
                execution_options=_AS_WRITTEN,
            )
    session.execute(_SET_DEFAULT_TABLESPACE, {"name": default_tablespace})


GROWTH_PLANNED_FROM = 1_000
"""The fewest staged rows for ``planned_for_growth`` to look at a table: below that, a nested loop
over the table reads at most a few thousand pages."""
_AT_MOST = "SELECT count(*) FROM (SELECT FROM {table} LIMIT :rows) AS head"


@contextmanager
def planned_for_growth(session: Session, table: Any, *, rows: int) -> Iterator[None]:
    """Around one statement that reads ``table`` for each of ``rows`` staged rows (and may add them
    to it), in the caller's transaction: on PostgreSQL, with nested loops off when ``rows`` is at least
    ``GROWTH_PLANNED_FROM`` and the table holds fewer rows (counted up to ``rows``). The setting is
    the one before again right after the statement; when the statement fails, the caller's
    transaction (rolled back) takes the setting with it."""
    if rows < GROWTH_PLANNED_FROM or session.get_bind().dialect.name != "postgresql":
        yield
        return
    held = session.scalar(text(_AT_MOST.format(table=_table_name(session, table))), {"rows": rows})
    if held is not None and held >= rows:
        yield
        return
    before = session.scalar(text("SELECT current_setting('enable_nestloop')"))
    session.execute(text("SET LOCAL enable_nestloop = off"))
    yield
    session.execute(text("SELECT set_config('enable_nestloop', :before, true)"), {"before": before})


def _table_name(session: Session, table: Any) -> str:
    return str(session.get_bind().dialect.identifier_preparer.quote(table.name))


def _drop_for_loading(session: Session, table: Any, rows: int) -> list[_Index] | None:
    """The indexes dropped for the statement; None when the table is not taken for it."""
    if rows < WORTH_IT or session.get_bind().dialect.name != "postgresql":
        return None
    name = _table_name(session, table)
    if session.scalar(text(_CANDIDATE.format(table=name)), {"table": table.name}) is None:
        return None  # not empty, or not this role's
    # Taken in a savepoint: rolled back to it, the table is given back at once (a lock taken since a
    # savepoint goes with it), where a lock taken in the caller's transaction would last until its end.
    savepoint = session.begin_nested()
    try:
        session.execute(text(f"LOCK TABLE {name} IN ACCESS EXCLUSIVE MODE NOWAIT"))
    except DBAPIError as exc:
        savepoint.rollback()
        if getattr(exc.orig, "sqlstate", None) != _TAKEN_BY_ANOTHER:
            raise
        return None
    # Now that no other session can change it: still empty (another may have written a row since
    # the check above), and its indexes as they are.
    if not session.scalar(text(_EMPTY.format(table=name))):
        savepoint.rollback()  # not for loading after all: the other sessions may use it again
        return None
    savepoint.commit()  # the lock is the caller's transaction's now, until it ends
    indexes = [_Index(*row) for row in session.execute(_INDEXES, {"table": table.name})]
    connection = session.connection()
    for index in indexes:  # names as the catalog quotes them: sent as they are, like the definitions
        if index.unique_constraint is not None:
            drop = f"ALTER TABLE {name} DROP CONSTRAINT {index.unique_constraint}"
        else:
            drop = f"DROP INDEX {index.qualified}"
        connection.exec_driver_sql(drop, execution_options=_AS_WRITTEN)
    return indexes
