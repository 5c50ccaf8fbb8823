"""Migrations on both backends: they build the schema the models describe, and commands refuse a
database whose schema is missing or behind."""

from __future__ import annotations

from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from db.migrate import current_revision, head_revision, recorded_revision, shipped_head, upgrade
from db.models import Base
from keyhygiene.context import Database
from keyhygiene.fakeapi import FakeOpenRouter
from keyhygiene.settings import Settings


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
        assert compare_metadata(context, Base.metadata) == []


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
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("{")]
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
