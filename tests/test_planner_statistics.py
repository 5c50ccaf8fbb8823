"""A sync on PostgreSQL takes the planner statistics of the store's tables where autovacuum has not
(``db.statistics``): without them, the planner takes a store of thousands of keys for an empty one.
On SQLite nothing is analyzed."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.exc import OperationalError

from db import snapshots, statistics
from keyhygiene.context import Database
from keyhygiene.fakeapi import FakeOpenRouter
from tests.celery_support import wait_until
from tests.roles import role_that_writes

NOW = datetime.now(UTC).replace(microsecond=0)
GROWN = ["key_days", "key_records", "key_rollups", "key_usage", "tracked_keys"]
"""The tables a first sync of 300 keys fills past autovacuum's threshold (50 rows, plus 10% of what
the table held): each gets a row per key. ``snapshot_rollups`` gets one row per workspace."""


@pytest.fixture
def store(database: Database, fake: FakeOpenRouter) -> Iterator[Database]:
    """A database whose tables autovacuum leaves alone (it may be on, on another machine), with 300
    keys in the organisation."""
    for index in range(300):
        fake.add_key(f"key-{index:03d}", created_at=NOW - timedelta(minutes=index))
    if database.dialect == "postgresql":
        with database.engine.begin() as connection:
            for table in statistics.STORE_TABLES:
                connection.execute(text(f"ALTER TABLE {table} SET (autovacuum_enabled = off)"))
    yield database


def stale(database: Database) -> list[str]:
    with database.engine.connect() as connection:
        return statistics.stale_tables(connection)


def planned_rows(database: Database, table: str) -> float:
    """How many rows the planner believes ``table`` holds."""
    with database.engine.connect() as connection:
        query = text("SELECT reltuples FROM pg_class WHERE oid = to_regclass(:table)")
        return float(connection.execute(query, {"table": table}).scalar_one())


def syncs_that_leave_stale_tables(database: Database, fake: FakeOpenRouter, cli) -> None:
    """A first sync (which analyzes what it filled), then one that doubles the keys: the tables it
    grew are stale."""
    first = cli("sync")
    assert first.exit_code == 0, first.stderr
    for index in range(300, 600):
        fake.add_key(f"key-{index:03d}", created_at=NOW - timedelta(minutes=index))
    # (It may analyze the first sync's tables again: their changed rows are counted a moment after
    # the commit, which can be after the first sync analyzed them.)
    second = cli("sync")
    assert second.exit_code == 0, second.stderr
    # A server process counts the rows it changed for the statistics views shortly after its
    # transaction, not at once: wait until those counts show.
    wait_until(lambda: stale(database) == GROWN, timeout=30, what="the second sync's rows in pg_stat_user_tables")


@pytest.mark.usefixtures("env")
def test_a_first_sync_analyzes_the_tables_it_filled_before_anything_reads_them(store: Database, cli) -> None:
    """Without statistics, the plan of a ``run`` right after a store's first sync read 20,000 keys in
    40 s, by nested loops over what the planner took for empty tables (1.3 s with them)."""
    first = cli("sync")

    assert first.exit_code == 0, first.stderr
    if store.dialect != "postgresql":
        assert first.events_named("statistics_refreshed") == []
        return
    [event] = first.events_named("statistics_refreshed")
    assert (event["tables"], event["skipped"]) == (sorted(statistics.STORE_TABLES), [])
    names = [event["event"] for event in first.events]
    assert names.index("statistics_refreshed") < names.index("sync_complete") < names.index("run_finished")
    assert planned_rows(store, "key_rollups") == planned_rows(store, "key_usage") == 300
    with store.engine.connect() as connection:
        assert statistics.never_analyzed_tables(connection) == []
        # Sampled with the small first target: a histogram of its 300 creation times has 11 bounds
        # (the server's default target, 100, would give 101).
        query = text(
            "SELECT cardinality(histogram_bounds::text::text[]) FROM pg_stats "
            "WHERE tablename = 'key_records' AND attname = 'created_at' AND schemaname = current_schema()"
        )
        assert connection.execute(query).scalar_one() == statistics.FIRST_SAMPLE_TARGET + 1


@pytest.mark.postgres
@pytest.mark.usefixtures("env")
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_table_left_empty_is_not_analyzed_again_by_every_sync(store: Database) -> None:
    """An empty table keeps no column statistics, however often it is analyzed: taken for one never
    analyzed, it would be analyzed again by every sync that records keys."""
    with store.engine.connect() as connection:
        assert statistics.never_analyzed_tables(connection) == sorted(statistics.STORE_TABLES)
        for table in statistics.STORE_TABLES:  # all empty: no sync yet
            connection.execute(text(f"ANALYZE {table}"))
        connection.commit()
        assert statistics.never_analyzed_tables(connection) == []


@pytest.mark.usefixtures("env")
def test_the_next_sync_analyzes_the_tables_a_sync_grew(store: Database, fake: FakeOpenRouter, cli) -> None:
    if store.dialect != "postgresql":
        assert cli("sync").exit_code == 0
        second = cli("sync")
        assert second.exit_code == 0, second.stderr
        assert second.events_named("statistics_refreshed") == []
        assert stale(store) == []
        return
    syncs_that_leave_stale_tables(store, fake, cli)
    assert planned_rows(store, "key_rollups") == 300  # as the first sync left them

    third = cli("sync")

    assert third.exit_code == 0, third.stderr
    [event] = third.events_named("statistics_refreshed")
    assert (event["tables"], event["skipped"]) == (GROWN, [])
    names = [event["event"] for event in third.events]
    assert names.index("statistics_refreshed") < names.index("sync_complete")  # taken before recording
    assert planned_rows(store, "key_rollups") == planned_rows(store, "key_usage") == 600
    wait_until(lambda: stale(store) == [], timeout=30, what="the analyses to show in pg_stat_user_tables")
    fourth = cli("sync")
    assert fourth.exit_code == 0, fourth.stderr
    assert fourth.events_named("statistics_refreshed") == []  # nothing changed enough since


@pytest.mark.postgres
@pytest.mark.usefixtures("env")
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_table_another_session_holds_is_skipped_not_waited_for(store: Database, fake: FakeOpenRouter, cli) -> None:
    syncs_that_leave_stale_tables(store, fake, cli)

    with store.engine.connect() as vacuuming:  # holds key_days as a VACUUM or an ANALYZE would
        vacuuming.execute(text("LOCK TABLE key_days IN SHARE UPDATE EXCLUSIVE MODE"))
        second = cli("sync")
        vacuuming.rollback()

    assert second.exit_code == 0, second.stderr
    [event] = second.events_named("statistics_refreshed")
    assert (event["tables"], event["skipped"]) == ([table for table in GROWN if table != "key_days"], ["key_days"])
    wait_until(lambda: stale(store) == ["key_days"], timeout=30, what="the analyses to show in pg_stat_user_tables")


@pytest.mark.postgres
@pytest.mark.usefixtures("env")
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize(
    ("failure", "error"),
    [
        pytest.param(
            OperationalError("ANALYZE key_days", {}, Exception("server closed the connection unexpectedly")),
            "server closed the connection unexpectedly",
            id="the-database",
        ),
        pytest.param(RuntimeError("no statistics today"), "no statistics today", id="anything-else"),
    ],
)
def test_a_failure_to_analyze_is_logged_and_the_sync_goes_on(
    store: Database, fake: FakeOpenRouter, cli, monkeypatch: pytest.MonkeyPatch, failure: Exception, error: str
) -> None:
    # Mocked: the test role is a superuser on a server that is up, so no real ANALYZE fails here
    # other than by a lock, which is skipped (above).
    syncs_that_leave_stale_tables(store, fake, cli)

    def fail(connection: object, tables: list[str], *, stop: object = None, target: object = None) -> list[str]:
        raise failure

    monkeypatch.setattr(statistics, "analyze", fail)
    second = cli("sync")

    assert second.exit_code == 0, second.stderr
    [warning] = second.events_named("statistics_refresh_failed")
    assert warning["level"] == "warning"
    assert warning["error"] == error
    assert "Traceback" not in second.stderr
    assert second.events_named("sync_complete")[0]["keys"] == 600


@pytest.mark.postgres
@pytest.mark.usefixtures("env")
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_failing_sync_cancels_the_analysis_instead_of_waiting_for_it(
    store: Database, fake: FakeOpenRouter, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs_that_leave_stale_tables(store, fake, cli)
    sleep = "SELECT pg_sleep(600)"  # stands for an ANALYZE that takes long: it runs until cancelled

    def analyze_slowly(
        connection: Connection, tables: list[str], *, stop: object = None, target: object = None
    ) -> list[str]:
        connection.execute(text(sleep))
        return []

    def running() -> int:
        with store.engine.connect() as connection:
            query = text("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = :sleep")
            return int(connection.execute(query, {"sleep": sleep}).scalar_one())

    def hold_the_page(fake: FakeOpenRouter, workspace_id: str | None, offset: int) -> None:
        wait_until(running, timeout=30, what="the analysis to be running")

    monkeypatch.setattr(statistics, "analyze", analyze_slowly)
    # Every page comes back cut in half (the sync fails), and only once the analysis is running.
    fake.faults.truncated(1000)
    fake.faults.on_list_page(hold_the_page)
    second = cli("sync")

    assert second.exit_code == 1, second.stderr
    assert second.events_named("sync_failed")
    assert second.events_named("statistics_refresh_failed") == []  # cancelled by the sync, not failed
    wait_until(lambda: running() == 0, timeout=30, what="the analysis to be cancelled")


@pytest.mark.postgres
@pytest.mark.usefixtures("env")
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_tables_the_role_may_not_analyze_are_not_tried(store: Database, fake: FakeOpenRouter, cli) -> None:
    # PostgreSQL skips such a table with a warning and leaves it stale: every sync would "analyze"
    # it again and say it did.
    syncs_that_leave_stale_tables(store, fake, cli)
    role = f"kh_reader_{uuid.uuid4().hex[:8]}"
    schema = store.engine.url.query["options"].split("search_path=")[1]
    with store.engine.begin() as connection:
        connection.execute(text(f'CREATE ROLE "{role}" LOGIN'))
        connection.execute(text(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"'))
    reader = create_engine(store.engine.url.set(username=role))
    try:
        with reader.connect() as connection:
            assert statistics.stale_tables(connection) == []
            assert statistics.never_analyzed_tables(connection) == []
        assert stale(store) == GROWN  # the owner's view
    finally:
        reader.dispose()
        with store.engine.begin() as connection:
            connection.execute(text(f'REVOKE USAGE ON SCHEMA "{schema}" FROM "{role}"'))
            connection.execute(text(f'DROP ROLE "{role}"'))


_APPENDED = re.compile(r"INSERT INTO (tracked_keys|key_records|key_usage) \(.*\bSELECT\b", re.DOTALL)
"""The statements that record staged keys into the store's tables, each reading the table it appends to."""


@contextmanager
def recording_plans(statements: re.Pattern[str] = _APPENDED) -> Iterator[list[tuple[str, dict]]]:
    """The plans PostgreSQL runs the recording statements (``statements``: the table each reads is
    its first group) by, with what each node did: each is first run by ``EXPLAIN ANALYZE`` in a
    savepoint that is rolled back, then as it was."""
    plans: list[tuple[str, dict]] = []

    def explain(connection, cursor, statement: str, parameters, context, executemany: bool) -> None:
        appended = statements.match(statement)
        if appended is None:
            return
        cursor.execute("SAVEPOINT explained")
        cursor.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {statement}", parameters)
        plans.append((appended[1], cursor.fetchone()[0][0]["Plan"]))
        cursor.execute("ROLLBACK TO SAVEPOINT explained")

    event.listen(Engine, "before_cursor_execute", explain)
    try:
        yield plans
    finally:
        event.remove(Engine, "before_cursor_execute", explain)


@contextmanager
def plans_while_listing(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict]]:
    """The plans PostgreSQL runs each page's statement by, where a sync records new keys while it
    lists them (``db.snapshots.record_new_keys``), with what each node did: each is first run by
    ``EXPLAIN ANALYZE`` in a savepoint that is rolled back, then as it was."""
    plans: list[dict] = []
    real = snapshots.record_new_keys

    def record(session: Any, early: snapshots.EarlyRecording, key_ids: Any) -> None:
        sql, parameters = early.statement
        with snapshots._dbapi_cursor(session) as (cursor, _):
            cursor.execute("SAVEPOINT explained")
            cursor.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", {**parameters, "ids": list(key_ids)}, prepare=False)
            plan = cursor.fetchone()[0][0]["Plan"]
            cursor.execute("ROLLBACK TO SAVEPOINT explained")
        before = early.recorded
        real(session, early, key_ids)
        plans.append({**plan, "Keys Recorded": early.recorded - before})

    monkeypatch.setattr(snapshots, "record_new_keys", record)
    yield plans


def every_scan(plan: dict) -> Iterator[dict]:
    """Every node of ``plan`` that reads a table whole."""
    if plan.get("Node Type") == "Seq Scan":
        yield plan
    for child in plan.get("Plans", []):
        yield from every_scan(child)


def scans(plan: dict, table: str) -> Iterator[dict]:
    """Every node of ``plan`` that reads ``table`` whole."""
    if plan.get("Node Type") == "Seq Scan" and plan.get("Relation Name") == table:
        yield plan
    for child in plan.get("Plans", []):
        yield from scans(child, table)


@pytest.mark.postgres
@pytest.mark.usefixtures("env")
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize(
    "keys_before",
    [
        pytest.param(100, id="an-organisation-that-grew"),
        pytest.param(0, id="a-first-sync-on-a-store-analyzed-while-empty"),
    ],
)
def test_new_keys_are_recorded_without_reading_a_table_once_per_key(
    database: Database, fake: FakeOpenRouter, cli, keys_before: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store analyzed (by autovacuum, or a DBA's ``vacuumdb --analyze`` after ``db upgrade``)
    while it held 100 keys or none, and empty staging; then 2,000 new keys. Planned as if the
    tables held what they did and the sync had staged a few, recording read the table it appended
    to once per new key, each time whole, the pages appended so far included: quadratic in the new
    keys, 2 s a statement for 20,000 of them, where the whole recording takes 0.3 s."""
    tables = [*statistics.STORE_TABLES, "snapshot_staging"]
    with database.engine.begin() as connection:
        for table in tables:  # as autovacuum may, between the steps below, on another machine
            connection.execute(text(f"ALTER TABLE {table} SET (autovacuum_enabled = off)"))
    for index in range(keys_before):
        fake.add_key(f"key-{index:04d}", created_at=NOW - timedelta(seconds=index))
    if keys_before:
        first = cli("sync")
        assert first.exit_code == 0, first.stderr
    with database.engine.begin() as connection:
        for table in tables:
            connection.execute(text(f"ANALYZE {table}"))
    for index in range(keys_before, keys_before + 2_000):
        fake.add_key(f"key-{index:04d}", created_at=NOW - timedelta(seconds=index))

    with recording_plans() as plans, plans_while_listing(monkeypatch) as pages:
        sync = cli("sync")

    assert sync.exit_code == 0, sync.stderr
    assert "2000 new" in sync.stdout
    # Every new key was recorded while listing, a page at a time: nothing is left to the last step.
    assert plans == []
    assert sum(page["Keys Recorded"] for page in pages) == 2_000  # each new key, once
    for page in pages:  # each page's keys looked up by index, whatever the statistics say
        assert [(node["Relation Name"], node["Actual Loops"]) for node in every_scan(page)] == []
    [event] = [event for event in sync.events_named("statistics_refreshed") if "snapshot_staging" in event["tables"]]
    assert (event["tables"], event["skipped"]) == (["snapshot_staging"], [])


@pytest.mark.postgres
@pytest.mark.usefixtures("env")
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_staged_keys_another_session_holds_or_this_role_may_not_analyze_are_left_as_they_are(
    store: Database, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(statistics, "STAGING_ANALYZED_FROM", 100)  # the store's 300 keys are many
    with store.engine.connect() as vacuuming:  # holds the staging table as a VACUUM would
        vacuuming.execute(text("LOCK TABLE snapshot_staging IN SHARE UPDATE EXCLUSIVE MODE"))
        held = cli("sync")
        vacuuming.rollback()
    with role_that_writes(store.engine) as role:
        url = store.engine.url.set(username=role).render_as_string(hide_password=False)
        monkeypatch.setenv("KEYHYGIENE_DATABASE_URL", url)
        with store.engine.begin() as connection:  # the next sync stages every key again
            connection.execute(text("UPDATE tracked_keys SET fingerprint = NULL"))
        not_owner = cli("sync")

    assert held.exit_code == 0, held.stderr
    staging = [event for event in held.events_named("statistics_refreshed") if "snapshot_staging" in event["skipped"]]
    assert [(event["tables"], event["skipped"]) for event in staging] == [([], ["snapshot_staging"])]
    assert not_owner.exit_code == 0, not_owner.stderr
    refreshed = not_owner.events_named("statistics_refreshed")
    assert all("snapshot_staging" not in event["tables"] + event["skipped"] for event in refreshed)


_COUNTED_OPEN = re.compile(
    r"SELECT count\(\*\).*?\sFROM snapshot_staging\s.*EXISTS \(SELECT \*\s+FROM (key_usage|key_records)\s", re.DOTALL
)
"""The counts of staged keys with an open version, which tell recording whether any key is gone."""


@pytest.mark.postgres
@pytest.mark.usefixtures("env")
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_staged_keys_are_counted_without_reading_a_small_table_once_per_key(
    database: Database, fake: FakeOpenRouter, cli
) -> None:
    """The staging table's statistics could not be taken (a VACUUM held it): recording counted the
    staged keys with an open version by reading a store of 200 keys whole once per staged key
    (40,000 of them: 0.7 s each of two statements, growing with new keys times old ones)."""
    tables = [*statistics.STORE_TABLES, "snapshot_staging"]
    for index in range(100):
        fake.add_key(f"key-{index:04d}", created_at=NOW - timedelta(seconds=index))
    assert cli("sync").exit_code == 0
    with database.engine.begin() as connection:
        for table in tables:
            connection.execute(text(f"ALTER TABLE {table} SET (autovacuum_enabled = off)"))
            connection.execute(text(f"ANALYZE {table}"))
    for index in range(100, 2_100):
        fake.add_key(f"key-{index:04d}", created_at=NOW - timedelta(seconds=index))

    with database.engine.connect() as vacuuming, recording_plans(_COUNTED_OPEN) as plans:
        vacuuming.execute(text("LOCK TABLE snapshot_staging IN SHARE UPDATE EXCLUSIVE MODE"))
        sync = cli("sync")
        vacuuming.rollback()

    assert sync.exit_code == 0, sync.stderr
    staging = [event for event in sync.events_named("statistics_refreshed") if "snapshot_staging" in event["skipped"]]
    assert len(staging) == 1  # (the tables the first sync grew may be analyzed too, beside the listing)
    assert sorted(table for table, _ in plans) == ["key_records", "key_usage"]
    for table, plan in plans:
        assert [node["Actual Loops"] for node in scans(plan, table) if node["Actual Loops"] > 1] == [], table
