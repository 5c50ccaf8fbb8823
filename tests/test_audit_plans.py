"""Dry-run plans and refusals in the audit log without bloat (SQLite and PostgreSQL): a plan equal to
a stored one is recorded by reference, one row per run, yet ``report actions`` and the ``key_action``
events still show every planned decision of every run."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import delete, func, select, text
from structlog.testing import capture_logs

from db import audit, runs
from db import retention as retention_db
from db.audit import PlannedEntry
from db.migrate import upgrade
from db.models import Action, PlanEntry, RunPlan, StoredPlan
from keyhygiene import retention
from keyhygiene.context import Database, session_scope
from keyhygiene.fakeapi import FakeOpenRouter
from keyhygiene.reports import ReportParams
from keyhygiene.reports.actions import build as actions_report
from keyhygiene.settings import Settings
from tests.celery_support import wait_until
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


def test_the_log_merges_live_records_and_stored_plans_in_time_order_either_way(database: Database) -> None:
    """Live records (one row each) and runs that refer to a stored plan (two runs to the same plan),
    some at the very same time: read by time, then live records before plan entries, then run, then
    id; newest first is the exact reverse; a reader that stops early gets the newest ones."""

    def entry(name: str) -> PlannedEntry:
        return PlannedEntry(key_hash(name), name, None, "disable-idle", ("disable-idle",), "disable", {})

    def live(run_id: int, at: object, name: str) -> dict[str, object]:
        return {
            "run_id": run_id,
            "now": at,
            "key_hash": key_hash(name),
            "key_name": name,
            "workspace_id": None,
            "rule": "disable-idle",
            "rules": ["disable-idle"],
            "action": "disable",
            "dry_run": False,
            "outcome": "done",
            "evidence": {},
        }

    with session_scope(database) as session:
        run_ids = [runs.start_run(session, kind="enforce", now=NOW + n * HOUR).id for n in range(5)]
        a, b, c, d, e = run_ids
        audit.record_plan(
            session, run_id=a, now=NOW, entries=[entry("p1"), entry("p2")], dry_run=True, outcome="planned"
        )
        audit.record_actions(session, [live(b, NOW, "l1"), live(b, NOW + HOUR, "l2")])  # l1 at plan a's time
        audit.record_plan(session, run_id=c, now=NOW + HOUR, entries=[entry("q1")], dry_run=True, outcome="planned")
        audit.record_actions(session, [live(d, NOW + 2 * HOUR, "l3")])
        audit.record_plan(
            session, run_id=e, now=NOW + 3 * HOUR, entries=[entry("p1"), entry("p2")], dry_run=True, outcome="planned"
        )

    expected = [
        (NOW, b, "l1"),  # a live record first at the same time
        (NOW, a, "p1"),
        (NOW, a, "p2"),
        (NOW + HOUR, b, "l2"),
        (NOW + HOUR, c, "q1"),
        (NOW + 2 * HOUR, d, "l3"),
        (NOW + 3 * HOUR, e, "p1"),  # the stored plan of run a, referred to again
        (NOW + 3 * HOUR, e, "p2"),
    ]
    with database.sessions() as session:
        oldest_first = [(r.time, r.run_id, r.key_name) for r in audit.audit_records(session)]
        newest_first = [(r.time, r.run_id, r.key_name) for r in audit.audit_records(session, newest_first=True)]
        window = [r.key_name for r in audit.audit_records(session, since=NOW, until=NOW + 2 * HOUR, run_id=b)]
        log = audit.audit_records(session, newest_first=True)
        first_two = [next(log).key_name, next(log).key_name]
        log.close()
    assert oldest_first == expected
    assert newest_first == expected[::-1]
    assert window == ["l2"]  # (since, until] of one run
    assert first_two == ["p2", "p1"]


# -- a dry run and the audit retention at the same moment (PostgreSQL: SQLite has one writer) ------


PLAN = [PlannedEntry("a" * 64, "golf", None, "disable-idle", ("disable-idle",), "disable", {"idle_days": 40})]


def unreferenced_plan(database: Database) -> int:
    """A stored plan that no run refers to any more (its run's reference was pruned)."""
    with session_scope(database) as session:
        run = runs.start_run(session, kind="enforce", now=NOW)
        plan_id = audit.record_plan(
            session, run_id=run.id, now=NOW, entries=PLAN, dry_run=True, outcome="planned"
        ).plan_id
        session.execute(delete(RunPlan))
    return plan_id


def dry_run_records(database: Database, done: threading.Event) -> Callable[[], int]:
    """A run's dry-run record of PLAN, in a thread: the plan id its reference points to."""
    result: list[int | BaseException] = []

    def record() -> None:
        try:
            with session_scope(database) as session:
                run = runs.start_run(session, kind="enforce", now=NOW + HOUR)
                reference = audit.record_plan(
                    session, run_id=run.id, now=NOW + HOUR, entries=PLAN, dry_run=True, outcome="planned"
                )
                result.append(reference.plan_id)
        except BaseException as exc:
            result.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=record)
    thread.start()

    def outcome() -> int:
        thread.join(timeout=30)
        assert result, "the dry run's record did not end"
        if isinstance(result[0], BaseException):
            raise result[0]
        return result[0]

    return outcome


def waiting_on_a_lock(database: Database) -> bool:
    with database.engine.connect() as connection:
        waiting = connection.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        ).scalar_one()
    return bool(waiting)


def plan_entries(database: Database, plan_id: int) -> int:
    with database.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(PlanEntry).where(PlanEntry.plan_id == plan_id)) or 0)


def test_a_plan_the_retention_deletes_while_a_dry_run_refers_to_it_is_stored_again(pg_database: Database) -> None:
    """The retention deletes an unreferenced plan and a dry run with the same plan refers to it before
    the deletion commits: the dry run waits, then stores the plan again; it does not fail."""
    old = unreferenced_plan(pg_database)
    with session_scope(pg_database) as prune:
        retention_step = retention_db.delete_unreferenced_plans(prune, limit=100)
        assert retention_step == 1 and prune.scalar(select(func.count()).select_from(StoredPlan)) == 0
        done = threading.Event()
        outcome = dry_run_records(pg_database, done)
        wait_until(
            lambda: done.is_set() or waiting_on_a_lock(pg_database),
            timeout=30,
            interval=0.01,
            what="the dry run to wait for the retention",
        )
    plan_id = outcome()
    assert plan_id != old
    assert plan_entries(pg_database, plan_id) == 1


def test_the_retention_leaves_a_plan_alone_that_a_dry_run_is_referring_to(pg_database: Database) -> None:
    """A dry run refers to an unreferenced stored plan and has not committed yet: the retention
    neither waits for it nor deletes the plan, and both end well."""
    old = unreferenced_plan(pg_database)
    with session_scope(pg_database) as run_session:
        run = runs.start_run(run_session, kind="enforce", now=NOW + HOUR)
        reference = audit.record_plan(
            run_session, run_id=run.id, now=NOW + HOUR, entries=PLAN, dry_run=True, outcome="planned"
        )
        assert reference.plan_id == old
        result: list[int | BaseException] = []

        def prune() -> None:
            try:
                with session_scope(pg_database) as session:
                    result.append(retention_db.delete_unreferenced_plans(session, limit=100))
            except BaseException as exc:
                result.append(exc)

        thread = threading.Thread(target=prune)
        thread.start()
        thread.join(timeout=30)
        assert result == [0], "the retention waited for the dry run, or failed"
    assert plan_entries(pg_database, old) == 1
    with pg_database.sessions() as session:
        assert session.scalar(select(RunPlan.plan_id).where(RunPlan.run_id == run.id)) == old


def test_the_retention_deletes_unreferenced_plans_whole_and_a_bounded_number_of_entries_at_a_time(
    database: Database,
) -> None:
    # Plans of 3, 3 and 5 decisions that no run refers to any more; room for 6 entries a step: the
    # first step takes the two small plans, the second the large one. None is ever left in part.
    for plan, size in enumerate((3, 3, 5)):
        entries = [
            PlannedEntry(
                f"{plan}{n}".ljust(64, "0"), f"key-{n}", None, "disable-idle", ("disable-idle",), "disable", {}
            )
            for n in range(size)
        ]
        with session_scope(database) as session:
            run = runs.start_run(session, kind="enforce", now=NOW)
            audit.record_plan(session, run_id=run.id, now=NOW, entries=entries, dry_run=True, outcome="planned")
            session.execute(delete(RunPlan))
    steps = []
    while True:
        with session_scope(database) as session:
            deleted = retention_db.delete_unreferenced_plans(session, limit=6)
        if not deleted:
            break
        with database.sessions() as session:
            steps.append((deleted, session.scalar(select(func.count()).select_from(PlanEntry))))

    assert steps == [(2, 5), (1, 0)]
