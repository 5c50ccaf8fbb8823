"""A store's first sync of many keys on PostgreSQL fills the empty tables it writes after its
listing before it builds their secondary indexes (``db.bulkload``), inside its one transaction; the
schema it leaves is the one it found. A table that another session is reading, or that this role
does not own, keeps its indexes and is filled row by row, as on every later sync and every first
sync of fewer keys. The tracked keys and their versions are written while the sync lists them,
page by page with their indexes in place (``tests/test_sync_early.py``): they keep theirs.

These syncs list 300 keys: ``WORTH_IT`` is lowered to 100 where the indexes are to be built after,
instead of listing 10,000 keys in each test."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

import pytest
from sqlalchemy import Engine, event, insert, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db import bulkload, rollups
from db.models import key_records, tracked_keys
from keyhygiene.context import Database
from keyhygiene.fakeapi import FakeOpenRouter
from tests.roles import role_that_writes

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.usefixtures("env"),
    pytest.mark.parametrize("db_url", ["postgresql"], indirect=True),
]

NOW = datetime.now(UTC).replace(microsecond=0)
TABLES = ("tracked_keys", "key_records", "key_usage", "key_days", "key_rollups")
BUILT_AFTER = {"ix_key_days_first_seen_at"}
"""The secondary indexes of the tables a first sync fills with a row per key after its listing
(primary keys stay): ``key_days``. ``tracked_keys``, ``key_records`` and ``key_usage`` are
filled while it lists."""


@pytest.fixture
def many(monkeypatch: pytest.MonkeyPatch) -> None:
    """300 keys are many enough."""
    monkeypatch.setattr(bulkload, "WORTH_IT", 100)


@pytest.fixture
def trigger_changes() -> Iterator[list[str]]:
    """Every ``ALTER TABLE ... TRIGGER`` this process sends while the test runs (syncs run in it)."""
    sent: list[str] = []

    def record(connection: object, cursor: object, statement: str, *args: object) -> None:
        if statement.startswith("ALTER TABLE") and " TRIGGER " in statement:
            sent.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    yield sent
    event.remove(Engine, "before_cursor_execute", record)


class Index(NamedTuple):
    oid: int
    definition: str
    valid: bool


def indexes(database: Database) -> dict[str, Index]:
    """Every index of the tables a sync fills, by name: its object id (new when it is built again),
    its definition, whether PostgreSQL may use it."""
    query = text(
        "SELECT c.relname, c.oid, pg_get_indexdef(i.indexrelid), i.indisvalid AND i.indisready "
        "FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indexrelid "
        "WHERE i.indrelid IN (SELECT to_regclass(name) FROM unnest(CAST(:tables AS text[])) AS name)"
    )
    with database.engine.connect() as connection:
        rows = connection.execute(query, {"tables": list(TABLES)})
        return {name: Index(int(oid), definition, valid) for name, oid, definition, valid in rows}


def constraints(database: Database) -> set[tuple[str, str, str]]:
    query = text(
        "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid IN (SELECT to_regclass(name) FROM unnest(CAST(:tables AS text[])) AS name)"
    )
    with database.engine.connect() as connection:
        return {tuple(row) for row in connection.execute(query, {"tables": list(TABLES)})}  # type: ignore[misc]


def triggers(database: Database) -> dict[str, str]:
    """Each trigger of the tables a sync fills, by name: whether it fires ("O") or not ("D")."""
    query = text(
        "SELECT tgname, tgenabled FROM pg_trigger WHERE NOT tgisinternal "
        "AND tgrelid IN (SELECT to_regclass(name) FROM unnest(CAST(:tables AS text[])) AS name)"
    )
    with database.engine.connect() as connection:
        return {name: str(enabled) for name, enabled in connection.execute(query, {"tables": list(TABLES)})}


def exclusive_locks(database: Database, table: str) -> int:
    """How many sessions hold ``table`` for themselves (``ACCESS EXCLUSIVE``), seen from another one."""
    query = text("SELECT count(*) FROM pg_locks WHERE relation = to_regclass(:table) AND mode = 'AccessExclusiveLock'")
    with database.engine.connect() as connection:
        return int(connection.execute(query, {"table": table}).scalar_one())


def version(key_id: int) -> dict[str, object]:
    return {
        "key_id": key_id,
        "valid_from": 1,
        "name": "k",
        "label": "",
        "include_byok_in_limit": False,
        "created_at": NOW,
    }


def refuses_a_version_of_no_key(database: Database) -> bool:
    """Whether the store refuses a version that names no tracked key, as the foreign key did."""
    try:
        with database.engine.begin() as connection:
            connection.execute(insert(key_records).values(version(10**9)))
    except IntegrityError:
        return True
    return False


def built_again(before: dict[str, Index], after: dict[str, Index]) -> set[str]:
    """The indexes a sync built again, once it is checked that it left each one as it was."""
    assert {name: (index.definition, True) for name, index in after.items()} == {
        name: (index.definition, True) for name, index in before.items()
    }
    return {name for name in before if after[name].oid != before[name].oid}


def add_keys(fake: FakeOpenRouter, count: int, prefix: str = "key") -> None:
    for index in range(count):
        fake.add_key(f"{prefix}-{index:03d}", created_at=NOW - timedelta(minutes=index))


def open_versions(database: Database) -> tuple[int, int]:
    with database.engine.connect() as connection:
        return (
            int(connection.execute(text("SELECT count(*) FROM key_records WHERE valid_to IS NULL")).scalar_one()),
            int(connection.execute(text("SELECT count(*) FROM key_usage WHERE valid_to IS NULL")).scalar_one()),
        )


@pytest.mark.usefixtures("many")
def test_a_first_sync_builds_the_indexes_after_filling_the_tables(
    database: Database, fake: FakeOpenRouter, cli, trigger_changes: list[str]
) -> None:
    add_keys(fake, 300)
    schema, before, checks = constraints(database), indexes(database), triggers(database)
    assert checks["key_records_key_id_insert"] == checks["key_usage_key_id_insert"] == "O"

    first = cli("sync")

    assert first.exit_code == 0, first.stderr
    after_first = indexes(database)
    assert built_again(before, after_first) == BUILT_AFTER
    assert constraints(database) == schema  # the unique key hash is a constraint again, by its name
    assert trigger_changes == []  # the versions went in while listing, each statement checked
    assert triggers(database) == checks
    assert refuses_a_version_of_no_key(database)
    assert open_versions(database) == (300, 300)
    trigger_changes.clear()

    add_keys(fake, 5, prefix="later")
    second = cli("sync")

    assert second.exit_code == 0, second.stderr
    assert built_again(after_first, indexes(database)) == set()  # the tables hold rows: row by row
    assert trigger_changes == []  # and every version is checked
    assert open_versions(database) == (305, 305)


@pytest.mark.usefixtures("many")
def test_an_index_of_the_operators_own_is_built_again_as_it_was(database: Database, fake: FakeOpenRouter, cli) -> None:
    # Its name and text hold what a driver or SQLAlchemy might take for parameters: "%", "%s", ":name".
    with database.engine.begin() as connection:
        connection.exec_driver_sql(
            """CREATE INDEX "dev :keys" ON key_days (day) """
            """WHERE CAST(key_id AS text) LIKE 'dev-%s%%' OR CAST(usage AS text) = ':label'""",
            execution_options={"no_parameters": True},
        )
    add_keys(fake, 300)
    before = indexes(database)
    assert "'dev-%s%%'::text" in before["dev :keys"].definition

    first = cli("sync")

    assert first.exit_code == 0, first.stderr
    assert built_again(before, indexes(database)) == BUILT_AFTER | {"dev :keys"}


@pytest.mark.usefixtures("many")
def test_a_table_another_session_reads_keeps_its_indexes(database: Database, fake: FakeOpenRouter, cli) -> None:
    add_keys(fake, 300)
    before = indexes(database)

    with database.engine.connect() as reader:  # a report reading key_days, its transaction open
        reader.execute(text("SELECT count(*) FROM key_days"))
        first = cli("sync")
        reader.rollback()

    assert first.exit_code == 0, first.stderr
    assert built_again(before, indexes(database)) == set()
    assert open_versions(database) == (300, 300)


@pytest.mark.usefixtures("many")
def test_a_failed_first_sync_leaves_the_indexes_it_dropped(
    database: Database, fake: FakeOpenRouter, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_keys(fake, 300)
    schema, before = constraints(database), indexes(database)

    def fail(*args: object, **kwargs: object) -> None:  # after the versions went in, in the same transaction
        raise RuntimeError("the roll-ups could not be written")

    monkeypatch.setattr(rollups, "record_rollups", fail)
    checks = triggers(database)
    first = cli("sync")

    assert first.exit_code == 1, first.stderr
    assert indexes(database) == before  # the very indexes it found: the drop was rolled back
    assert triggers(database) == checks
    assert constraints(database) == schema
    assert open_versions(database) == (0, 0)


@pytest.mark.usefixtures("many")
def test_a_role_that_does_not_own_the_tables_fills_them_row_by_row(
    database: Database, fake: FakeOpenRouter, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A deployment may run keyhygiene as a role that may write the tables but not change them.
    add_keys(fake, 300)
    before = indexes(database)
    with role_that_writes(database.engine) as role:
        monkeypatch.setenv(
            "KEYHYGIENE_DATABASE_URL", database.engine.url.set(username=role).render_as_string(hide_password=False)
        )
        first = cli("sync")

    assert first.exit_code == 0, first.stderr
    assert indexes(database) == before
    assert open_versions(database) == (300, 300)


def test_a_first_sync_of_fewer_keys_fills_the_tables_row_by_row(database: Database, fake: FakeOpenRouter, cli) -> None:
    # Too few rows to be worth taking the tables for (an organisation without keys never is).
    add_keys(fake, 300)
    before = indexes(database)

    first = cli("sync")

    assert first.exit_code == 0, first.stderr
    assert indexes(database) == before
    assert open_versions(database) == (300, 300)


@pytest.mark.parametrize(
    ("key_hashes", "error"),
    [
        pytest.param(["a" * 64, None], "not-null constraint", id="the-statement-fails"),
        pytest.param(["a" * 64, "a" * 64], "could not create unique index", id="the-index-finds-a-duplicate"),
    ],
)
def test_a_failure_with_the_indexes_dropped_rolls_the_drop_back(
    database: Database, key_hashes: list[str], error: str
) -> None:
    before, schema = indexes(database), constraints(database)
    rows = [{"id": number, "key_hash": key_hash, "first_seen_at": NOW} for number, key_hash in enumerate(key_hashes, 1)]

    with (
        pytest.raises(IntegrityError, match=error),
        Session(database.engine) as session,
        session.begin(),
        bulkload.indexes_built_after(session, tracked_keys, rows=bulkload.WORTH_IT),
    ):
        unique = text("SELECT to_regclass('tracked_keys_key_hash_key')")
        assert session.execute(unique).scalar_one() is None  # the unique index is gone while the rows go in
        session.execute(insert(tracked_keys), rows)

    assert indexes(database) == before
    assert constraints(database) == schema
    with database.engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM tracked_keys")).scalar_one() == 0


def test_a_table_written_to_before_it_is_taken_is_given_back_at_once(database: Database) -> None:
    # Another session adds a row after the table was seen empty and before the lock: the table is
    # not loaded into, and other sessions may use it again while this transaction goes on.
    before = indexes(database)
    written: list[str] = []

    def write_a_row_first(connection: object, cursor: object, statement: str, *args: object) -> None:
        if statement.startswith("LOCK TABLE") and not written:
            written.append(statement)
            with database.engine.begin() as other:
                other.execute(insert(tracked_keys).values(id=1, key_hash="b" * 64, first_seen_at=NOW))

    event.listen(database.engine, "before_cursor_execute", write_a_row_first)
    try:
        with (
            Session(database.engine) as session,
            session.begin(),
            bulkload.indexes_built_after(session, tracked_keys, rows=bulkload.WORTH_IT),
        ):
            held = exclusive_locks(database, "tracked_keys")
            session.execute(insert(tracked_keys).values(id=2, key_hash="c" * 64, first_seen_at=NOW))
    finally:
        event.remove(database.engine, "before_cursor_execute", write_a_row_first)

    assert written  # the other session's row did come in between
    assert held == 0
    assert indexes(database) == before  # its indexes were never dropped
    with database.engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM tracked_keys")).scalar_one() == 2


def test_a_check_the_caller_proves_is_paused_for_the_statement_alone(database: Database) -> None:
    check = "key_records_key_id_insert"
    state = text(f"SELECT tgenabled FROM pg_trigger WHERE tgrelid = to_regclass('key_records') AND tgname = '{check}'")
    with Session(database.engine) as session, session.begin():
        session.execute(insert(tracked_keys).values(id=1, key_hash="a" * 64, first_seen_at=NOW))
        with bulkload.indexes_built_after(session, key_records, rows=bulkload.WORTH_IT, proven_by_caller=[check]):
            paused = session.execute(state).scalar_one()
            session.execute(insert(key_records).values(version(1)))
        after = session.execute(state).scalar_one()

    assert (paused, after) == ("D", "O")
    assert refuses_a_version_of_no_key(database)


def test_a_check_stays_on_where_the_table_is_not_taken(database: Database) -> None:
    # Another session reads key_records: the insert goes row by row, and the check still runs.
    with database.engine.connect() as reader, Session(database.engine) as session:
        reader.execute(text("SELECT count(*) FROM key_records"))
        with (
            pytest.raises(IntegrityError, match="names a key that tracked_keys does not hold"),
            session.begin(),
            bulkload.indexes_built_after(
                session, key_records, rows=bulkload.WORTH_IT, proven_by_caller=["key_records_key_id_insert"]
            ),
        ):
            session.execute(insert(key_records).values(version(10**9)))
        reader.rollback()


def test_nested_loops_are_off_only_for_a_statement_that_outgrows_its_table(database: Database) -> None:
    # The table holds 2 rows: a statement adding up to 1,000 gets no nested loops, and the
    # statements after it in the transaction get them back; one adding fewer keeps them. Once the
    # table holds as many rows as a statement may add, it keeps them too, whatever its last analysis
    # said (the planner scales that by the table's size now): hashing a year of versions to record
    # a few thousand changed keys took 1.1-1.7 s instead of 0.05 s.
    nested_loops = text("SELECT current_setting('enable_nestloop')")

    def track(ids: range) -> None:
        with database.engine.begin() as connection:
            rows = [{"id": i, "key_hash": f"{i:064x}", "first_seen_at": NOW} for i in ids]
            connection.execute(insert(tracked_keys), rows)

    def settings(*rows: int) -> list[str]:
        seen = []
        with Session(database.engine) as session, session.begin():
            for added in rows:
                with bulkload.planned_for_growth(session, tracked_keys, rows=added):
                    seen.append(session.execute(nested_loops).scalar_one())
                seen.append(session.execute(nested_loops).scalar_one())
        return seen

    track(range(1, 3))
    with database.engine.begin() as connection:
        connection.execute(text("ANALYZE tracked_keys"))  # 2 rows, as far as the statistics go
    small = settings(bulkload.GROWTH_PLANNED_FROM, bulkload.GROWTH_PLANNED_FROM - 1)
    track(range(3, bulkload.GROWTH_PLANNED_FROM + 3))
    larger = settings(bulkload.GROWTH_PLANNED_FROM)

    assert small == ["off", "on", "on", "on"]
    assert larger == ["on", "on"]
