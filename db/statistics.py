"""PostgreSQL's planner statistics of the store's tables, brought up to date where autovacuum has not.

PostgreSQL plans each statement from the statistics ``ANALYZE`` keeps of a table. Autovacuum takes
them again once a table has changed enough; where it is off, or has not come round yet, a table that
a first sync filled with 100,000 keys still looks empty to the planner. The next sync's recording
then joins 100,000 alive keys by nested loops, as if there were a few: 0.75 s where the same
statements take 0.56 s with statistics.

A store's first sync leaves every table without statistics: the plan of a ``run`` that follows at
once, before autovacuum comes round (or at all, where it is off), read 20,000 keys in 40 s. So a sync
analyzes, once it has recorded its snapshot, the tables that have never been analyzed (their rows
counted for autovacuum only a moment after the commit, the catalog at once).

And a sync on PostgreSQL analyzes, beside its listing, the store's tables that autovacuum would
analyze by now, by autovacuum's own thresholds (``autovacuum_analyze_threshold`` rows changed,
plus ``autovacuum_analyze_scale_factor`` of the rows in the table: the table's storage parameters
of those names, else the server's settings), whether autovacuum is on or not. Where autovacuum
keeps up, it finds none. ``ANALYZE`` reads a sample of at most 30,000 rows a table (about 0.1 s at 100,000
keys), blocks no reads or writes (only schema changes wait for it), and each table's statistics are
committed as they are taken. A table that a VACUUM, another ANALYZE or a migration holds is left to
them: it is skipped after ``LOCK_TIMEOUT``, never waited for. SQLite: nothing; its statements are
written for its planner without statistics.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from sqlalchemy import ARRAY, Connection, Text, bindparam, func, select, text
from sqlalchemy.exc import OperationalError

from .models import key_records, key_usage, snapshot_staging, tracked_keys
from .rollups import KeyDay, KeyRollup, SnapshotRollup

STORE_TABLES = (
    tracked_keys.name,
    key_records.name,
    key_usage.name,
    KeyRollup.__tablename__,
    KeyDay.__tablename__,
    SnapshotRollup.__tablename__,
)
"""The tables a sync writes and the reports read, staging tables aside (they only hold a sync's rows
while it runs)."""

_MAY_ANALYZE = (
    "(pg_has_role(c.relowner, 'USAGE') "
    "OR pg_has_role((SELECT datdba FROM pg_database WHERE datname = current_database()), 'USAGE'))"
)
"""Whether this role may analyze table ``c`` (``pg_class``): it owns it, or the database (a superuser
may analyze any). PostgreSQL skips any other table with a warning, and no error."""

_STALE = text(
    "SELECT c.relname FROM pg_stat_user_tables AS s JOIN pg_class AS c ON c.oid = s.relid "
    "WHERE s.relid IN (SELECT to_regclass(name) FROM unnest(:names) AS name) "
    "AND s.n_mod_since_analyze > coalesce(("
    "  SELECT option_value::float8 FROM pg_options_to_table(c.reloptions) "
    "  WHERE option_name = 'autovacuum_analyze_threshold'), "
    "  current_setting('autovacuum_analyze_threshold')::float8) "
    "+ coalesce(("
    "  SELECT option_value::float8 FROM pg_options_to_table(c.reloptions) "
    "  WHERE option_name = 'autovacuum_analyze_scale_factor'), "
    "  current_setting('autovacuum_analyze_scale_factor')::float8) * greatest(c.reltuples, 0) "
    f"AND {_MAY_ANALYZE} "
    "ORDER BY c.relname"
).bindparams(bindparam("names", type_=ARRAY(Text())))
"""The tables (found by the search path, as every other statement finds them) changed by more rows
since their last analysis than autovacuum's threshold for them (a table's own
``autovacuum_analyze_*`` storage parameters, else the server's), among those this role may analyze:
it owns them, or the database (a superuser may analyze any). PostgreSQL would skip any other table
with a warning, and it would stay stale for every sync to try again."""


_NEVER_ANALYZED = text(
    "SELECT c.relname FROM unnest(:names) AS name JOIN pg_class AS c ON c.oid = to_regclass(name) "
    "JOIN pg_namespace AS n ON n.oid = c.relnamespace "
    "WHERE NOT EXISTS (SELECT 1 FROM pg_stats AS s WHERE s.schemaname = n.nspname AND s.tablename = c.relname) "
    "AND c.reltuples <> 0 "
    f"AND {_MAY_ANALYZE} "
    "ORDER BY c.relname"
).bindparams(bindparam("names", type_=ARRAY(Text())))
"""The tables with no column statistics at all (never analyzed), among those this role may analyze.
Read from the catalog, which a committed transaction changes at once, where the counts of changed
rows that ``_STALE`` reads are reported a moment after it. An empty table keeps no column
statistics however often it is analyzed; once analyzed its ``reltuples`` is 0 (-1 before), and it
is left out."""


def never_analyzed_tables(connection: Connection, names: Sequence[str] = STORE_TABLES) -> list[str]:
    """The store's tables (or ``names``) the planner has no statistics of yet (always none on
    SQLite): after a store's first sync, every one of them. Planned without statistics, reading
    20,000 alive keys right after took 40 s (nested loops over what looks like an empty table),
    1.3 s with them."""
    if connection.dialect.name != "postgresql":
        return []
    return list(connection.scalars(_NEVER_ANALYZED, {"names": list(names)}))


def stale_tables(connection: Connection, names: Sequence[str] = STORE_TABLES) -> list[str]:
    """The store's tables (or ``names``) whose statistics autovacuum would take again by now
    (always none on SQLite)."""
    if connection.dialect.name != "postgresql":
        return []
    return list(connection.scalars(_STALE, {"names": list(names)}))


AUDIT_TABLES = ("actions",)
"""The audit log, which ``prune`` reads by key to keep each key's change in effect
(``audit_statistics``)."""


def audit_statistics(connection: Connection) -> tuple[list[str], list[str]] | None:
    """On PostgreSQL, the audit log's statistics, taken where they are missing or autovacuum would
    take them again by now, before ``prune`` deletes old records: the tables analyzed and skipped
    (``analyze``), or None when none needed it. No sync analyzes the audit log, and where
    autovacuum is off (or has not come round), a prune planned without its statistics looked up
    every executed change once per record it considered: 13 s a batch of 5,000 at 112,000 records,
    265 s the whole prune, growing with the square of the records; 0.06 s a batch with them."""
    tables = sorted({*never_analyzed_tables(connection, AUDIT_TABLES), *stale_tables(connection, AUDIT_TABLES)})
    connection.commit()
    return _analyzed(connection, tables) if tables else None


def _analyzed(connection: Connection, tables: list[str], **options: Any) -> tuple[list[str], list[str]]:
    """``analyze`` ``tables``: those analyzed, and those skipped."""
    skipped = analyze(connection, tables, **options)
    return [table for table in tables if table not in skipped], skipped


LOCK_TIMEOUT = "100ms"
"""How long ``analyze`` waits for a table that another session holds against it (a VACUUM, an
ANALYZE, a migration) before it skips the table."""
_STATEMENT_TIMEOUT = "60s"
"""A bound on one table's ANALYZE, which takes a fraction of a second even for a year of history,
where the role sets none of its own."""
_SKIPPED = frozenset({"55P03", "57014"})
"""SQLSTATEs that skip a table: lock not available (``LOCK_TIMEOUT``), statement timeout."""


FIRST_SAMPLE_TARGET = 10
"""The statistics target of a table's first analysis (``never_analyzed_tables``): a sample of 3,000
rows instead of 30,000, a quarter of the time (20,000 keys: 0.03 s for the six tables, against
0.14 s), and plenty to plan by. Later analyses take the server's own target."""


def analyze(
    connection: Connection,
    tables: list[str],
    *,
    stop: threading.Event | None = None,
    target: int | None = None,
    columns: Sequence[str] = (),
) -> list[str]:
    """Take the statistics of ``tables`` (PostgreSQL), committing each table's as it is taken; the
    tables skipped because another session held them or their ANALYZE ran out of time. Stops
    before the next table once ``stop`` is set. ``target``: the statistics target to sample with,
    instead of the server's ``default_statistics_target``. ``columns``: only those columns'
    statistics (the table's size is always taken)."""
    quote = connection.dialect.identifier_preparer.quote
    only = f" ({', '.join(quote(column) for column in columns)})" if columns else ""
    skipped = []
    for table in tables:
        if stop is not None and stop.is_set():
            break
        if target is not None:
            connection.execute(text(f"SET LOCAL default_statistics_target = {int(target)}"))
        connection.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
        connection.execute(
            text(
                f"SELECT set_config('statement_timeout', '{_STATEMENT_TIMEOUT}', true) "
                "WHERE current_setting('statement_timeout') = '0'"
            )
        )
        try:
            connection.execute(text(f"ANALYZE {quote(table)}{only}"))
        except OperationalError as exc:
            connection.rollback()
            if getattr(exc.orig, "sqlstate", None) not in _SKIPPED or (stop is not None and stop.is_set()):
                raise
            skipped.append(table)
            continue
        connection.commit()
    return skipped


STAGING_ANALYZED_FROM = 1_000
"""Staged rows from which a sync takes the statistics of the staging table before recording them
(``analyze_staging``)."""
_STAGING_JOINED = ("snapshot_id", "key_id", "key_hash")
"""The staging table's columns that recording selects and joins by."""
_MAY_ANALYZE_TABLE = text(f"SELECT {_MAY_ANALYZE} FROM pg_class AS c WHERE c.oid = to_regclass(:table)")


def analyze_staging(connection: Connection, snapshot_id: int) -> tuple[list[str], list[str]] | None:
    """On PostgreSQL, once a sync has staged ``STAGING_ANALYZED_FROM`` rows or more, take the staging
    table's statistics (its size, and the columns recording selects and joins by) before they are
    compared and recorded: the tables analyzed and skipped, or None when it was not tried (fewer
    rows, SQLite, a table this role may not analyze).

    Between syncs the staging table is empty, and so it is whenever autovacuum analyzes it; the
    planner then takes a snapshot's staged rows for a few (45 of 20,000), and plans recording by
    nested loops that probe a table once per staged row. After an organisation grew from 100 keys
    to 20,000, the statements that track the new keys and add their records read the table they
    append to whole on each probe, the pages appended so far included: 2 s each, quadratic in the
    new keys (``db.bulkload.planned_for_growth`` now keeps them from that in any case); with the
    statistics, 0.1 s. Sampled with the small target (``FIRST_SAMPLE_TARGET``): about 0.01 s for
    20,000 rows. Never waits for another session holding the table (``analyze``)."""
    if connection.dialect.name != "postgresql":
        return None
    s = snapshot_staging
    staged = connection.scalar(select(func.count()).select_from(s).where(s.c.snapshot_id == snapshot_id)) or 0
    allowed = staged >= STAGING_ANALYZED_FROM and connection.scalar(_MAY_ANALYZE_TABLE, {"table": s.name})
    connection.commit()
    return _analyzed(connection, [s.name], target=FIRST_SAMPLE_TARGET, columns=_STAGING_JOINED) if allowed else None
