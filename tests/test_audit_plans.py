"""Dry-run plans and refusals in the audit log without bloat (SQLite and PostgreSQL): a plan equal to
a stored one is recorded by reference, one row per run, yet ``report actions`` and the ``key_action``
events still show every planned decision of every run."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select
from structlog.testing import capture_logs

from db import audit
from db.models import Action, PlanEntry, RunPlan, StoredPlan
from keyhygiene import retention
from keyhygiene.context import Database, session_scope
from keyhygiene.fakeapi import FakeOpenRouter
from keyhygiene.reports import ReportParams
from keyhygiene.reports.actions import build as actions_report
from tests.test_reports_support import NOW, RULES, Org, build_history, key_hash

HOUR = timedelta(hours=1)
TABLES = (Action, StoredPlan, PlanEntry, RunPlan)


@pytest.fixture
def org(database: Database, fake: FakeOpenRouter, tmp_path: Path, fake_url: str) -> Iterator[Org]:
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    org = Org(database, fake, fake_url, rules_file=rules)
    try:
        build_history(org)
        yield org
    finally:
        org.close()


def rows(database: Database) -> dict[str, int]:
    with database.sessions() as session:
        return {
            table.__tablename__: int(session.scalar(select(func.count()).select_from(table)) or 0) for table in TABLES
        }


def dry_run(org: Org, at: object) -> list[dict[str, object]]:
    """One enforcement (a dry run by the rules file) at ``at``: its ``key_action`` events."""
    with capture_logs() as logs:
        outcome = org.run("enforce", at)
    assert outcome.exit_code == 0, outcome.message
    return [entry for entry in logs if entry["event"] == "key_action"]


def test_hourly_dry_runs_of_an_unchanged_plan_add_one_row_each(org: Org, database: Database) -> None:
    first = dry_run(org, NOW)
    planned = len(first)
    assert planned == 4
    after_first = rows(database)
    assert after_first == {"actions": 0, "plans": 1, "plan_entries": planned, "run_plans": 1}

    later = [dry_run(org, NOW + hours * HOUR) for hours in (1, 2, 3)]

    # Each later run: one reference, no decision re-written, and still one event per decision.
    assert rows(database) == {"actions": 0, "plans": 1, "plan_entries": planned, "run_plans": 4}
    assert [len(events) for events in later] == [planned] * 3
    assert all(event["outcome"] == "planned" and event["dry_run"] is True for events in later for event in events)

    # The actions report shows what each run planned, each run's evidence measured at its own time.
    with database.sessions() as session:
        report = actions_report(session, ReportParams(now=NOW + 4 * HOUR, since=timedelta(days=1)))
    assert len(report.rows) == 4 * planned
    assert len({row["run_id"] for row in report.rows}) == 4
    golf = [row for row in report.rows if row["key_hash"] == key_hash("golf")]
    assert [row["outcome"] for row in golf] == ["planned"] * 4
    idle_days = [row["evidence"]["idle_days"] for row in golf]
    assert idle_days == sorted(idle_days) and idle_days[-1] - idle_days[0] == pytest.approx(3 / 24, abs=0.011)
    assert {row["evidence"]["idle_since"] for row in golf} == {golf[0]["evidence"]["idle_since"]}


def test_a_changed_plan_is_stored_whole_once(org: Org, database: Database) -> None:
    dry_run(org, NOW)
    org.use("golf", 1.0, at=NOW + HOUR)  # golf is no longer idle: a different plan
    org.sync(NOW + HOUR)

    events = dry_run(org, NOW + 2 * HOUR)
    again = dry_run(org, NOW + 3 * HOUR)

    assert len(events) == len(again) == 3
    assert rows(database) == {"actions": 0, "plans": 2, "plan_entries": 4 + 3, "run_plans": 3}
    with database.sessions() as session:
        report = actions_report(session, ReportParams(now=NOW + 4 * HOUR, since=timedelta(days=1)))
    per_run: dict[object, set[object]] = {}
    for row in report.rows:
        per_run.setdefault(row["run_id"], set()).add(row["key_hash"])
    assert [len(keys) for keys in per_run.values()] == [4, 3, 3]
    assert key_hash("golf") in next(iter(per_run.values()))


def test_a_refused_run_records_one_refusal_with_its_plan(org: Org, database: Database, tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(
        RULES.replace("dry_run = true", "dry_run = false").replace(
            "max_actions_per_run = 100", "max_actions_per_run = 1"
        )
    )

    with capture_logs() as logs:
        outcomes = [org.run("enforce", NOW + hours * HOUR) for hours in (0, 1)]

    assert [outcome.exit_code for outcome in outcomes] == [3, 3]
    assert org.fake.mutating_calls() == []
    assert rows(database) == {"actions": 0, "plans": 1, "plan_entries": 4, "run_plans": 2}
    events = [entry for entry in logs if entry["event"] == "key_action"]
    assert len(events) == 8 and {event["outcome"] for event in events} == {"refused"}
    with database.sessions() as session:
        report = actions_report(session, ReportParams(now=NOW + 2 * HOUR, since=timedelta(days=1)))
    assert {row["outcome"] for row in report.rows} == {"refused"} and len(report.rows) == 8
    assert all("max_actions_per_run" in str(row["reason"]) for row in report.rows)
    assert all(row["dry_run"] is False for row in report.rows)


def test_audit_retention_removes_old_plan_references_then_unreferenced_plans(org: Org, database: Database) -> None:
    dry_run(org, NOW)  # plan A, which only this run refers to
    org.use("golf", 1.0, at=NOW + HOUR)
    org.sync(NOW + HOUR)
    dry_run(org, NOW + 2 * HOUR)  # plan B
    dry_run(org, NOW + 30 * HOUR)  # plan B again, past the audit retention of the others

    pruned = retention.prune(
        database, now=NOW + 31 * HOUR, retention_period=timedelta(days=400), audit_retention=timedelta(hours=5)
    )

    assert pruned.actions_deleted == 2
    assert rows(database) == {"actions": 0, "plans": 1, "plan_entries": 3, "run_plans": 1}
    with database.sessions() as session:
        report = actions_report(session, ReportParams(now=NOW + 31 * HOUR, since=timedelta(days=3)))
    assert len(report.rows) == 3 and {row["time"] for row in report.rows} == {NOW + 30 * HOUR}


def test_dry_run_records_written_before_0008_stay_readable_beside_new_ones(db_url: str) -> None:
    from sqlalchemy import text

    from db.migrate import upgrade
    from keyhygiene.settings import Settings

    database = Database.open(Settings(_env_file=None, KEYHYGIENE_DATABASE_URL=db_url), check=False)  # type: ignore[call-arg]
    try:
        upgrade(database.engine, "0002")  # the schema before plans were stored by reference
        with database.engine.begin() as connection:
            connection.execute(
                text(
                    'INSERT INTO runs (id, kind, status, started_at, "trigger") '
                    "VALUES (7, 'enforce', 'complete', :t, 'cli')"
                ),
                {"t": NOW - HOUR},
            )
            connection.execute(
                text(
                    "INSERT INTO actions (run_id, created_at, finished_at, key_hash, key_name, rule, rules, action,"
                    " dry_run, outcome, evidence) VALUES (7, :t, :t, 'h-old', 'old-key', 'disable-idle',"
                    " '[\"disable-idle\"]', 'disable', :yes, 'planned', '{\"idle_days\": 40}')"
                ),
                {"t": (NOW - HOUR).replace(tzinfo=None), "yes": True},
            )
        upgrade(database.engine)
        entry = audit.PlannedEntry("h-new", "new-key", None, "disable-idle", ("disable-idle",), "disable", {})
        with session_scope(database) as session:
            audit.record_plan(session, run_id=7, now=NOW, entries=[entry], dry_run=True, outcome="planned")

        with database.sessions() as session:
            records = list(audit.audit_records(session, since=NOW - timedelta(days=1)))
    finally:
        database.close()
    assert [(r.run_id, r.key_name, r.outcome, r.evidence, r.by_reference) for r in records] == [
        (7, "old-key", "planned", {"idle_days": 40}, False),
        (7, "new-key", "planned", {}, True),
    ]
