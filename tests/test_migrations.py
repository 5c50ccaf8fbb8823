"""Migrations on both backends: they build the schema the models describe, and commands refuse a
database whose schema is missing or behind."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, func, inspect, select, text
from sqlalchemy.exc import IntegrityError

from db import rollups, snapshots
from db.migrate import current_revision, downgrade, head_revision, recorded_revision, shipped_head, upgrade
from db.models import Base
from keyhygiene.context import Database
from keyhygiene.fakeapi import FakeOpenRouter, generate_organisation
from keyhygiene.keysapi.models import Key
from keyhygiene.settings import Settings
from tests.conftest import failure_lines


@pytest.fixture
def empty_database(db_url: str) -> Any:
    database = Database.open(Settings(_env_file=None, KEYHYGIENE_DATABASE_URL=db_url), check=False)  # type: ignore[call-arg]
    yield database
    database.close()


def test_upgrade_builds_the_schema_of_the_models(empty_database: Database) -> None:
    assert current_revision(empty_database.engine) is None

    before, after = upgrade(empty_database.engine)

    assert (before, after) == (None, head_revision())
    tables = set(inspect(empty_database.engine).get_table_names())
    assert set(Base.metadata.tables) <= tables
    with empty_database.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, Base.metadata)
    if empty_database.engine.dialect.name == "postgresql":
        # 0016: there, statement triggers check what these two foreign keys would
        # (test_versions_name_only_tracked_keys).
        assert sorted((kind, fk.parent.name) for kind, fk in differences) == [
            ("add_fk", "key_records"),
            ("add_fk", "key_usage"),
        ]
    else:
        assert differences == []


def test_the_quick_schema_check_reads_what_alembic_reads(empty_database: Database) -> None:
    # Commands check the schema without loading Alembic; they must agree with it.
    assert shipped_head() == head_revision()
    assert recorded_revision(empty_database.engine) is None

    upgrade(empty_database.engine)

    assert recorded_revision(empty_database.engine) == current_revision(empty_database.engine) == head_revision()


def test_upgrade_twice_changes_nothing(empty_database: Database) -> None:
    upgrade(empty_database.engine)
    with empty_database.engine.begin() as connection:
        connection.execute(
            text("INSERT INTO runs (kind, status, started_at, started_by) VALUES ('sync', 'ok', :t, 'cli')"),
            {"t": "2026-01-01 00:00:00"},
        )

    assert upgrade(empty_database.engine) == (head_revision(), head_revision())
    with empty_database.engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM runs")).scalar() == 1


def test_versions_name_snapshots_without_a_foreign_key(empty_database: Database) -> None:
    # 0014: a sync's versions all name the snapshot it records; PostgreSQL checked that one row
    # once per version. The reference to the tracked key stays (on PostgreSQL, since 0016, as
    # statement triggers: test_versions_name_only_tracked_keys), and so does the partial index.
    upgrade(empty_database.engine)

    inspector = inspect(empty_database.engine)
    on_sqlite = empty_database.engine.dialect.name == "sqlite"
    for table in ("key_records", "key_usage"):
        referred = {
            (tuple(fk["constrained_columns"]), fk["referred_table"]) for fk in inspector.get_foreign_keys(table)
        }
        assert referred == ({(("key_id",), "tracked_keys")} if on_sqlite else set()), table
    with empty_database.engine.begin() as connection:
        connection.execute(
            text("INSERT INTO tracked_keys (id, key_hash, first_seen_at) VALUES (1, 'h', :t)"),
            {"t": "2026-01-01 00:00:00"},
        )
        version = (
            "INSERT INTO key_usage (key_id, valid_from, valid_to, disabled, usage, usage_daily, usage_weekly, "
            "usage_monthly, byok_usage, byok_usage_daily, byok_usage_weekly, byok_usage_monthly, usage_since) "
            "VALUES (1, :start, :end, false, 0, 0, 0, 0, 0, 0, 0, 0, :t)"
        )
        for start, end in ((1, 2), (2, 3), (3, None)):  # closed versions may share the key
            connection.execute(text(version), {"start": start, "end": end, "t": "2026-01-01 00:00:00"})
    with pytest.raises(IntegrityError), empty_database.engine.begin() as connection:  # one open version per key
        connection.execute(text(version), {"start": 4, "end": None, "t": "2026-01-01 00:00:00"})


def test_versions_name_only_tracked_keys(empty_database: Database) -> None:
    """What the foreign keys from versions to ``tracked_keys`` guard, on both databases: a version
    must name a tracked key, and a key that versions name cannot go. On PostgreSQL, since 0016, a
    statement trigger checks every row of a statement at once."""
    upgrade(empty_database.engine)
    at = {"t": "2026-01-01 00:00:00"}
    version = (
        "INSERT INTO key_usage (key_id, valid_from, disabled, usage, usage_daily, usage_weekly, usage_monthly, "
        "byok_usage, byok_usage_daily, byok_usage_weekly, byok_usage_monthly, usage_since) "
        "SELECT id, 1, false, 0, 0, 0, 0, 0, 0, 0, 0, :t FROM tracked_keys WHERE key_hash IN ('a', 'b')"
    )
    record = "INSERT INTO key_records (key_id, valid_from, name, label, include_byok_in_limit, created_at) "
    with empty_database.engine.begin() as connection:
        for key_id, key_hash in ((1, "a"), (2, "b"), (3, "unnamed")):
            connection.execute(
                text("INSERT INTO tracked_keys (id, key_hash, first_seen_at) VALUES (:id, :h, :t)"),
                {"id": key_id, "h": key_hash, **at},
            )
        connection.execute(text(version), at)
        connection.execute(text(record + "VALUES (1, 1, 'n', '', false, :t)"), at)

    refused = {
        "a usage version of an untracked key, beside one of a tracked key": version.replace(
            "SELECT id, 1, false", "SELECT CASE WHEN key_hash = 'a' THEN id ELSE 99 END, 2, false"
        )
        .replace("usage_since)", "usage_since, valid_to)")
        .replace(":t FROM", ":t, 3 FROM"),
        "a record version of an untracked key": record + "VALUES (99, 1, 'n', '', false, :t)",
        "a version moved to an untracked key": "UPDATE key_records SET key_id = 99 WHERE key_id = 1",
        "deleting a key that a usage version names": "DELETE FROM tracked_keys WHERE key_hash = 'b'",
        "deleting keys that a record version names": "DELETE FROM tracked_keys WHERE id IN (1, 3)",
        "changing the id of a named key": "UPDATE tracked_keys SET id = 10 WHERE id = 2",
    }
    for what, statement in refused.items():
        with pytest.raises(IntegrityError, match=r"FOREIGN KEY|tracked_keys"), empty_database.engine.begin() as c:
            c.execute(text(statement), at)
            pytest.fail(f"not refused: {what}")

    with empty_database.engine.begin() as connection:  # what no version names can go
        connection.execute(text("UPDATE tracked_keys SET fingerprint = 7 WHERE id IN (1, 3)"))
        connection.execute(text("DELETE FROM tracked_keys WHERE id = 3"))
        kept = connection.execute(text("SELECT id FROM tracked_keys ORDER BY id")).scalars().all()
        assert kept == [1, 2]
        assert connection.execute(text("SELECT count(*) FROM key_usage")).scalar() == 2


def test_staging_skips_the_write_ahead_log_on_postgresql(empty_database: Database) -> None:
    # 0015: staging rows live only while a sync runs; a crash that empties them fails that sync
    # (test_sync: staging rows lost while listing), so PostgreSQL need not log them.
    upgrade(empty_database.engine)

    if empty_database.engine.dialect.name != "postgresql":
        assert {"snapshot_staging", "snapshot_carried"} <= set(inspect(empty_database.engine).get_table_names())
        return
    query = (
        "SELECT relname FROM pg_class WHERE relkind = 'r' AND relpersistence = 'u' "
        "AND relnamespace = to_regnamespace(current_schema())"
    )
    with empty_database.engine.connect() as connection:
        unlogged = set(connection.execute(text(query)).scalars())
    assert unlogged == {"snapshot_staging", "snapshot_carried"}


def test_runs_recorded_before_0004_keep_their_outcome(empty_database: Database) -> None:
    upgrade(empty_database.engine, "0002")
    old_runs = [
        # status, trigger, error, summary as keyhygiene recorded them before runs kept an exit code
        ("complete", "schedule", None, '{"planned_changes": 2, "done": 2, "failed": 0}'),
        ("complete", "trigger", None, '{"planned_changes": 2, "done": 1, "failed": 1}'),
        ("refused", "cli", "enforcement refused: 135 planned changes exceed max_actions_per_run = 50", None),
        ("failed", "trigger", "rules file: line 3: idle_for", '{"exit_code": 2}'),
        ("failed", "cli", "API error", None),
        ("skipped", "schedule", "another job holds the lock", None),
        ("aborted", "beat", "aborted: the job reached its time limit", None),
    ]
    with empty_database.engine.begin() as connection:
        for status, trigger, error, summary in old_runs:
            connection.execute(
                text(
                    'INSERT INTO runs (kind, status, started_at, "trigger", error, summary) '
                    "VALUES ('run', :status, :t, :trigger, :error, :summary)"
                ),
                {"status": status, "t": "2026-01-01 00:00:00", "trigger": trigger, "error": error, "summary": summary},
            )

    upgrade(empty_database.engine)

    with empty_database.engine.connect() as connection:
        rows = connection.execute(text("SELECT status, exit_code, started_by, message FROM runs ORDER BY id")).all()
    assert [tuple(row) for row in rows] == [
        ("ok", 0, "beat", None),
        ("failed", 1, "trigger", None),
        ("refused", 3, "cli", "enforcement refused: 135 planned changes exceed max_actions_per_run = 50"),
        ("failed", 2, "trigger", "rules file: line 3: idle_for"),
        ("failed", 1, "cli", "API error"),
        ("skipped", 1, "beat", "another job holds the lock"),
        ("aborted", 1, "beat", "aborted: the job reached its time limit"),
    ]


def _a_nullable_column_added_and_dropped(
    engine: Engine, *, before: str, after: str, table: str, column: str, kept: str, rows: list[tuple[Any, ...]]
) -> None:
    """Migration ``after`` adds ``table.column`` (nullable, NULL on the rows already there, which keep
    everything else: ``kept`` selects it), and going back to ``before`` drops that column alone."""
    upgrade(engine, after)

    added = {found["name"]: found for found in inspect(engine).get_columns(table)}[column]
    assert added["nullable"]
    with engine.begin() as connection:
        assert connection.execute(text(f"SELECT {column} FROM {table}")).scalar_one() is None
        assert [tuple(row) for row in connection.execute(text(kept))] == rows
        connection.execute(text(f"UPDATE {table} SET {column} = :t"), {"t": "2026-01-01 00:05:00"})

    downgrade(engine, before)

    assert current_revision(engine) == before
    assert column not in {found["name"] for found in inspect(engine).get_columns(table)}
    with engine.connect() as connection:
        assert [tuple(row) for row in connection.execute(text(kept))] == rows


def test_0017_records_when_a_retry_was_claimed_and_goes_back(empty_database: Database) -> None:
    # 0017: notices.claimed_at. Notices already recorded keep everything they had, with no claim
    # time (db.notices.undelivered takes a retry claimed so as cut short); the downgrade drops it alone.
    engine = empty_database.engine
    upgrade(engine, "0016")
    notice = (
        "INSERT INTO notices (created_at, target, event, status, attempts, last_error, payload) "
        "VALUES (:t, 'ops', 'run', 'retrying', 2, 'HTTP 500', :payload)"
    )
    with engine.begin() as connection:
        connection.execute(text(notice), {"t": "2026-01-01 00:00:00", "payload": '{"event": "run"}'})
        connection.execute(
            text(
                "INSERT INTO announcements (target, key_hash, rule, action, due, notice_id) "
                "VALUES ('ops', 'h', 'r', 'disable', :t, 1)"
            ),
            {"t": "2026-01-02 00:00:00"},
        )

    _a_nullable_column_added_and_dropped(
        engine,
        before="0016",
        after="0017",
        table="notices",
        column="claimed_at",
        kept="SELECT id, target, status, attempts, last_error FROM notices",
        rows=[(1, "ops", "retrying", 2, "HTTP 500")],
    )

    with engine.connect() as connection:
        assert connection.execute(text("SELECT notice_id FROM announcements")).scalar_one() == 1
    assert upgrade(engine) == ("0016", head_revision())


def test_0018_adds_a_heartbeat_to_runs_and_goes_back(empty_database: Database) -> None:
    # 0018: runs.heartbeat_at. Runs already recorded keep everything they had, with no heartbeat
    # (their age is their start, as before); the downgrade drops it alone.
    engine = empty_database.engine
    upgrade(engine, "0017")
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO runs (kind, status, started_at, started_by) VALUES ('sync', 'running', :t, 'cli')"),
            {"t": "2026-01-01 00:00:00"},
        )

    _a_nullable_column_added_and_dropped(
        engine,
        before="0017",
        after="0018",
        table="runs",
        column="heartbeat_at",
        kept="SELECT id, kind, status, started_by FROM runs",
        rows=[(1, "sync", "running", "cli")],
    )

    assert upgrade(engine) == ("0017", head_revision())


def test_0019_indexes_where_versions_begin_and_goes_back(empty_database: Database) -> None:
    # 0019: the prune looks a snapshot up among the versions that begin at it, by an index.
    engine = empty_database.engine
    upgrade(engine)

    def indexed() -> set[str]:
        inspector = inspect(engine)
        return {
            index["name"] or ""
            for table in ("key_usage", "key_records")
            for index in inspector.get_indexes(table)
            if index["column_names"] == ["valid_from"]
        }

    assert indexed() == {"ix_key_usage_valid_from", "ix_key_records_valid_from"}
    downgrade(engine, "0018")
    assert indexed() == set()
    assert upgrade(engine) == ("0018", head_revision())


def test_db_upgrade_command(env: dict[str, str], cli) -> None:
    first = cli("db", "upgrade")
    second = cli("db", "upgrade")

    assert first.exit_code == 0, first.stderr
    assert first.stdout == f"database upgraded from empty to migration {head_revision()}\n"
    assert second.exit_code == 0
    assert second.stdout == f"database is up to date (migration {head_revision()})\n"
    assert cli("sync").exit_code == 0


@pytest.mark.parametrize("state", ["empty", "behind"])
@pytest.mark.parametrize("command", [("sync",), ("report", "inventory"), ("run", "--dry-run")])
def test_commands_refuse_a_database_that_is_not_upgraded(
    empty_database: Database,
    env: dict[str, str],
    cli,
    fake: FakeOpenRouter,
    rules_file,
    state: str,
    command: tuple[str, ...],
) -> None:
    rules_file('[safety]\ndry_run = true\n\n[[rule]]\nname = "r"\nmatch = "expired"\naction = "report"\n')
    if state == "behind":
        upgrade(empty_database.engine)
        with empty_database.engine.begin() as connection:
            connection.execute(text("UPDATE alembic_version SET version_num = '0000'"))

    result = cli(*command)

    assert result.exit_code == 1
    assert "Traceback" not in result.stderr
    lines = failure_lines(result.stderr)
    assert len(lines) == 1
    assert "run `keyhygiene db upgrade`" in lines[0]
    if state == "behind":
        assert "0000" in lines[0]
    assert fake.calls == []  # refused before calling the API


def test_only_db_upgrade_logs_alembic(env: dict[str, str], cli) -> None:
    upgraded = cli("db", "upgrade")
    synced = cli("sync")

    def alembic_events(result: Any) -> list[dict[str, Any]]:
        return [event for event in result.events if str(event.get("logger", "")).startswith("alembic")]

    assert any("Running upgrade" in event["event"] for event in alembic_events(upgraded))
    assert synced.exit_code == 0
    assert alembic_events(synced) == []


def _old_layout_history() -> list[tuple[datetime, list[dict[str, Any]]]]:
    """Six daily listings with every kind of change the old store versioned."""
    fake = FakeOpenRouter(seed=5)
    start = datetime(2026, 3, 1, 12, tzinfo=UTC)
    generate_organisation(fake, keys=30, workspaces=2, seed=5, now=start - timedelta(hours=1))
    hashes = [key["hash"] for key in fake.keys]
    listings = []
    for day in range(6):
        moment = start + timedelta(days=day)
        fake.set_clock(moment - timedelta(hours=2))
        for key_hash in hashes[day : day + 8]:
            if fake.get(key_hash) is not None:
                fake.record_use(key_hash, 0.1 + 0.2 * day, 0.05)  # float noise below a micro-dollar
        if day == 2:
            fake.update_key(hashes[3], {"disabled": True})
            fake.update_key(hashes[4], {"name": "renamed"})
        fake.set_clock(moment)
        keys = fake.keys
        if day in (3, 4):
            keys = [key for key in keys if key["hash"] != hashes[5]]  # gone, then back
        if day >= 1:
            keys[0] = dict(keys[0], brand_new_field={"nested": [1, None]})
            del keys[1]["last_used_at"]  # an older API version
        listings.append((moment, keys))
    return listings


def _write_old_layout(connection: Any, listings: list[tuple[datetime, list[dict[str, Any]]]]) -> None:
    """What the 0002 store wrote: one full row per change of anything, raw JSON included."""
    open_rows: dict[str, tuple[int, dict[str, Any]]] = {}
    for snapshot_id, (moment, keys) in enumerate(listings, start=1):
        naive = moment.replace(tzinfo=None)
        connection.execute(
            text(
                'INSERT INTO runs (id, kind, status, started_at, "trigger") '
                "VALUES (:i, 'sync', 'complete', :t, 'cli')"
            ),
            {"i": snapshot_id, "t": naive},
        )
        connection.execute(
            text(
                "INSERT INTO snapshots (id, run_id, status, started_at, taken_at, key_count) "
                "VALUES (:i, :i, 'complete', :t, :t, :n)"
            ),
            {"i": snapshot_id, "t": naive, "n": len(keys)},
        )
        listed = {key["hash"]: key for key in keys}
        for key_hash, (row_id, raw) in list(open_rows.items()):
            if listed.get(key_hash) != raw:
                connection.execute(
                    text("UPDATE key_states SET valid_to = :s WHERE id = :i"), {"s": snapshot_id, "i": row_id}
                )
                del open_rows[key_hash]
        for key_hash, raw in listed.items():
            if key_hash in open_rows:
                continue
            key = Key.from_api(raw)
            values = {
                name: getattr(key, name)
                for name in ("name", "label", "workspace_id", "disabled", "limit_remaining", "limit_reset")
            }
            values |= {
                name: getattr(key, name)
                for name in ("include_byok_in_limit", "usage", "usage_daily", "usage_weekly", "usage_monthly")
            }
            values |= {name: getattr(key, name) for name in ("byok_usage", "byok_usage_daily", "byok_usage_weekly")}
            values |= {name: getattr(key, name) for name in ("byok_usage_monthly", "creator_user_id", "external_user")}
            times = {
                name: None if getattr(key, name) is None else getattr(key, name).replace(tzinfo=None)
                for name in ("created_at", "updated_at", "expires_at", "last_used_at")
            }
            names = [*values, *times, "limit_usd", "key_hash", "valid_from", "digest", "raw"]
            row = connection.execute(
                text(
                    f"INSERT INTO key_states ({', '.join(names)}) VALUES ({', '.join(':' + n for n in names)}) "
                    "RETURNING id"
                ),
                {**values, **times, "limit_usd": key.limit, "key_hash": key_hash, "valid_from": snapshot_id}
                | {"digest": "x", "raw": json.dumps(raw)},
            ).scalar()
            open_rows[key_hash] = (row, raw)


def _expected_history(listings: list[tuple[datetime, list[dict[str, Any]]]], key_hash: str) -> tuple[Any, ...]:
    """What the old history walk concluded for a key alive at the last snapshot."""
    seen = [(moment, key) for moment, keys in listings for key in keys if key["hash"] == key_hash]
    last = seen[-1][1]
    unchanged = seen[-1][0]
    for moment, key in reversed(seen):
        if (key["usage"], key.get("byok_usage")) != (last["usage"], last.get("byok_usage")):
            break
        unchanged = moment
    disabled = None
    for moment, key in reversed(seen):
        if not key["disabled"]:
            break
        disabled = moment
    return seen[0][0], unchanged, disabled


def test_0005_carries_an_old_store_over_without_losing_anything(empty_database: Database) -> None:
    listings = _old_layout_history()
    upgrade(empty_database.engine, "0002")
    with empty_database.engine.begin() as connection:
        _write_old_layout(connection, listings)
        old_versions = connection.execute(text("SELECT count(*) FROM key_states")).scalar()

    upgrade(empty_database.engine)

    with empty_database.sessions() as session:
        for snapshot_id, (_, keys) in enumerate(listings, start=1):
            stored = {key.hash: dict(key.raw) for key in snapshots.keys_at(session, snapshot_id)}
            assert stored == {key["hash"]: key for key in keys}, snapshot_id
        assert snapshots.count_versions(session) == old_versions
        facts = {f.key_hash: f for f in snapshots.history_facts(session, len(listings))}
        # 0006 (after 0005) filled the reports' roll-ups from the carried history.
        counted = dict(
            session.execute(
                select(rollups.SnapshotRollup.snapshot_id, func.sum(rollups.SnapshotRollup.keys)).group_by(
                    rollups.SnapshotRollup.snapshot_id
                )
            ).all()
        )
    assert counted == {snapshot_id: len(keys) for snapshot_id, (_, keys) in enumerate(listings, start=1)}
    assert facts.keys() == {key["hash"] for key in listings[-1][1]}
    for key_hash, fact in facts.items():
        assert (fact.first_seen_at, fact.usage_unchanged_since, fact.disabled_since) == _expected_history(
            listings, key_hash
        ), key_hash
