"""Retention: pruning removes old history and leaves every report inside the retention unchanged."""

from __future__ import annotations

import json
import random
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select

from db import audit, rollups, runs, snapshots
from db import retention as retention_db
from db.engine import make_engine
from db.migrate import upgrade
from db.models import Action, Run, Snapshot, key_records, key_usage, tracked_keys
from db.retention import PRUNED
from keyhygiene import retention
from keyhygiene.context import Database, session_scope
from keyhygiene.enforcement import load_audit_facts, load_plan_inputs
from keyhygiene.fakeapi import FakeOpenRouter, generate_organisation
from keyhygiene.jobs import execute
from keyhygiene.reports import ReportError, ReportParams, builders
from keyhygiene.reports.html import render_html
from keyhygiene.reports.render import to_json
from keyhygiene.rules import parse_rules
from keyhygiene.timeutil import isoformat
from tests.celery_support import wait_until
from tests.test_reports_support import DAY, HOUR, RULES, Org, key_hash

pytestmark = pytest.mark.postgres

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
DAYS = 50
NOW = T0 + DAYS * DAY + HOUR
RETENTION = timedelta(days=20)
CUTOFF = NOW - RETENTION
SKIPPED_DAYS = {12, 13, 33, 41}


@pytest.fixture
def org(database: Database, fake: FakeOpenRouter, fake_url: str, tmp_path: Path) -> Iterator[Org]:
    rules = tmp_path / "keyhygiene.toml"
    rules.write_text(RULES)
    org = Org(database, fake, fake_url, rules_file=rules)
    try:
        build_long_history(org)
        yield org
    finally:
        org.close()


def build_long_history(org: Org) -> None:
    """Fifty days of syncs (a few days skipped) over a generated organisation with steady random
    use, plus keys whose old history the retained reports still depend on:

    - ``idle-since-day-3``: used until day 3, then idle; its usage windows reset afterwards, so its
      idle stretch spans several versions that all end before the cutoff;
    - ``disabled-long-ago``: disabled on day 2 and its limit changed while disabled (new versions);
    - ``comes-back``: missing from the listings of days 10 to 35, listed again on day 36 (synced
      twice that day), having spent meanwhile;
    - ``gone-early``: deleted on day 8; ``young``: created on day 40; ``reset``: counter goes down.
    """
    fake = org.fake
    rng = random.Random(7)
    fake.set_clock(T0 - HOUR)
    generate_organisation(fake, keys=40, workspaces=2, seed=3, now=T0 - HOUR)
    busy = [key["hash"] for key in fake.keys if not key["disabled"]][:25]
    for name in ("idle-since-day-3", "disabled-long-ago", "comes-back", "gone-early", "reset"):
        org.add(name, at=T0 - HOUR, created_at=T0 - 90 * DAY, usage=5.0, last_used_at=T0 - 2 * DAY)
    hidden: dict[str, Any] | None = None
    for k in range(DAYS + 1):
        moment = T0 + k * DAY
        fake.set_clock(moment - 6 * HOUR)
        for key in busy:
            if fake.get(key) is not None and rng.random() < 0.6:
                fake.record_use(key, round(rng.uniform(0.01, 3.0), 2), at=moment - 6 * HOUR)
        if k <= 3:
            org.use("idle-since-day-3", 1.25, at=moment - 5 * HOUR)
        if k == 2:
            fake.update_key(key_hash("disabled-long-ago"), {"disabled": True})
        if k in (5, 9, 15):
            fake.update_key(key_hash("disabled-long-ago"), {"limit": 10.0 + k})
        if k == 8:
            org.delete("gone-early", at=moment - 4 * HOUR)
        if k == 10:
            hidden = fake.get(key_hash("comes-back"))
            org.delete("comes-back", at=moment - 4 * HOUR)
        if k == 36 and hidden is not None:
            org.add("comes-back", at=moment - 4 * HOUR, created_at=T0 - 90 * DAY, usage=hidden["usage"] + 2.0)
        if k == 40:
            org.add("young", at=moment - 4 * HOUR, usage=1.0)
        if k == 25:
            org.delete("reset", at=moment - 4 * HOUR)
            org.add("reset", at=moment - 4 * HOUR, created_at=T0 - 90 * DAY, usage=1.0)
        if k % 3 == 0:
            org.use("reset", 0.5, at=moment - 3 * HOUR)
        if k not in SKIPPED_DAYS:
            org.sync(moment)
        if k == 36:
            # A second snapshot of the day comes-back is listed again on: a period that ends at the
            # first one covers that day in part, whose steps are read from the versions.
            org.sync(moment + 3 * HOUR)
    outcome = org.run("enforce", NOW - HOUR / 2)
    assert outcome.exit_code == 0, outcome.message
    # A failed sync long ago: pruning removes its snapshot too.
    with session_scope(org.database) as session:
        run = runs.start_run(session, kind="sync", now=T0 + 12 * DAY)
        snapshot = snapshots.start_snapshot(session, run_id=run.id, now=T0 + 12 * DAY)
        snapshots.fail_snapshot(session, snapshot_id=snapshot.id, error="the API was down")
        runs.finish_run(session, run.id, status=runs.FAILED, now=T0 + 12 * DAY, exit_code=1, message="the API was down")


def retained_reports(database: Database) -> dict[str, Any]:
    """Every report about a time inside the retention, as JSON, plus the enforcement's inputs."""
    ruleset = parse_rules(RULES)
    inside = [CUTOFF, CUTOFF + HOUR * 13, T0 + 36 * DAY, NOW - 7 * DAY, NOW - 2 * DAY + HOUR, None]
    found: dict[str, Any] = {}
    with database.sessions() as session:
        reports = builders()
        for at in inside:
            room = (at or NOW) - CUTOFF
            for kind, options in [
                ("inventory", {}),
                ("idle", {"ruleset": ruleset, "since": DAY}),
                ("spend", {"since": room, "by": "key"}),
                ("spend", {"since": room, "by": "day"}),
                ("spend", {"since": room, "by": "workspace"}),
                ("trends", {"since": room}),
                ("actions", {"since": room}),
            ]:
                params = ReportParams(now=NOW, at=at, **options)
                found[f"{kind} {options.get('by', '')} at {at}"] = json.loads(to_json(reports[kind](session, params)))
        found["html"] = render_html(session, ReportParams(now=NOW, since=RETENTION, ruleset=ruleset))
        newest = snapshots.latest_snapshot(session)
        assert newest is not None
        inputs = load_plan_inputs(session, newest.id)
        found["histories"] = {key: repr(history) for key, history in sorted(inputs.histories.items())}
    return found


def count(database: Database, model: Any) -> int:
    with database.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def versions(database: Database) -> int:
    """Stored version rows, usage and record versions alike (what prune counts as deleted)."""
    return count(database, key_usage) + count(database, key_records)


def test_reports_inside_the_retention_are_identical_after_pruning(org: Org) -> None:
    database = org.database
    before = retained_reports(database)
    versions_before = versions(database)
    snapshots_before = count(database, Snapshot)

    settings = org.settings.model_copy(update={"retention": RETENTION})
    outcome = execute("prune", settings, clock=lambda: NOW, database=database)
    assert outcome.exit_code == 0, outcome.message
    summary = outcome.summary
    assert summary["versions_deleted"] > 0 and summary["snapshots_deleted"] > 0
    assert summary["runs_deleted"] > 0
    assert summary["actions_deleted"] == 0  # the audit log is kept forever by default

    assert versions(database) == versions_before - summary["versions_deleted"]
    assert count(database, Snapshot) == snapshots_before - summary["snapshots_deleted"]
    after = retained_reports(database)
    assert after.keys() == before.keys()
    for name in before:
        assert after[name] == before[name], name

    with database.sessions() as session:
        anchor = session.get(Snapshot, summary["anchor_snapshot"])
        assert anchor is not None and anchor.taken_at is not None and anchor.taken_at <= CUTOFF
        assert anchor.taken_at > CUTOFF - DAY
        older = session.scalars(select(Snapshot).where(Snapshot.id < anchor.id)).all()
        assert all(snapshot.status == PRUNED for snapshot in older)
        assert snapshots.first_snapshot(session) == anchor
        # Nothing survives that ended before the anchor: what rules read of older history is kept
        # on the alive versions (first seen, since when usage and disabled held). But for the usage
        # version that comes-back, listed again after the anchor, grows from: what it spent while
        # it was not listed is the step between the two.
        for table in (key_usage, key_records):
            ended = session.execute(
                select(tracked_keys.c.key_hash)
                .join(table, table.c.key_id == tracked_keys.c.id)
                .where(table.c.valid_to <= anchor.id)
            ).all()
            assert ended == ([(key_hash("comes-back"),)] if table is key_usage else [])
            # Every snapshot a kept version begins or ends at is still a row: the store has no
            # foreign key from versions to snapshots any more (migration 0014), so prune keeps them.
            for end in (table.c.valid_from, table.c.valid_to):
                dangling = ~select(Snapshot.id).where(Snapshot.id == end).exists()
                assert session.scalar(select(func.count()).select_from(table).where(end.is_not(None), dangling)) == 0
        gone = select(func.count()).select_from(tracked_keys).where(tracked_keys.c.key_hash == key_hash("gone-early"))
        assert session.scalar(gone) == 0
        # A forgotten key's running roll-up state goes with it: an id SQLite hands out again
        # finds no state, and every key still tracked keeps its own.
        states = set(session.scalars(select(rollups.KeyRollup.key_id)))
        assert states == set(session.scalars(select(tracked_keys.c.id)))
        prune_run = session.get(Run, outcome.run_id)
        assert prune_run is not None and prune_run.kind == "prune" and prune_run.status == runs.OK
        assert prune_run.summary == summary

    with (
        database.sessions() as session,
        pytest.raises(
            ReportError,
            match=r"before the first stored snapshot \(.*\) \(older ones were pruned: KEYHYGIENE_RETENTION\)",
        ),
    ):
        builders()["inventory"](session, ReportParams(now=NOW, at=CUTOFF - 2 * DAY))
    with database.sessions() as session:  # the audit log is kept: asked for at that time, it answers
        audit_then = builders()["actions"](session, ReportParams(now=NOW, at=CUTOFF - 2 * DAY, since=30 * DAY))
    assert audit_then.title.startswith("Audit log, ")

    # Pruning again finds nothing more to remove.
    again = execute("prune", settings, clock=lambda: NOW, database=database)
    assert again.summary["versions_deleted"] == again.summary["snapshots_deleted"] == 0
    assert retained_reports(database) == before


def test_spend_over_a_period_that_begins_before_the_kept_history_counts_from_where_it_begins(org: Org) -> None:
    """The versions kept at the oldest snapshot began before it: growth from them would count spend
    from before the period. The period is counted from that snapshot, and the report says so."""
    database = org.database
    with database.sessions() as session:
        anchor = retention_db.anchor_snapshot(session, CUTOFF)
        assert anchor is not None and anchor.taken_at is not None
        kept_from = anchor.taken_at

        def spend(since: timedelta) -> tuple[dict[str, float], list[str]]:
            report = builders()["spend"](session, ReportParams(now=NOW, since=since))
            return {row["key_hash"]: row["total"] for row in json.loads(to_json(report))}, report.notes

        expected, expected_notes = spend(NOW - kept_from)
    retention.prune(database, now=NOW, retention_period=RETENTION)

    with database.sessions() as session:
        got, notes = spend(NOW - kept_from + 3 * DAY)
    assert got == expected and expected
    assert notes[0] == expected_notes[0]  # the same keys without spend: never a negative count
    assert f"before {kept_from:%Y-%m-%d %H:%M} UTC was pruned" in notes[1]
    with database.sessions() as session:
        params = ReportParams(now=NOW, since=NOW - kept_from + 3 * DAY)
        trends = builders()["trends"](session, params)
        by_day = builders()["spend"](session, replace(params, by="day"))
    assert any(f"before {kept_from:%Y-%m-%d %H:%M} UTC was pruned" in note for note in trends.notes)
    # Trends' spend is spend --by day's, the first day kept included (counted from the same snapshot).
    # (Trends has a row for the first day kept, whose one snapshot spend counts from: 0 spent.)
    trend_spend = {row["day"]: row["spend"] for row in json.loads(to_json(trends))}
    day_spend = {row["day"]: row["total"] for row in json.loads(to_json(by_day))}
    assert trend_spend == {day: day_spend.get(day, 0.0) for day in trend_spend} and set(day_spend) <= set(trend_spend)


def test_small_batches_give_the_same_result(org: Org, monkeypatch: pytest.MonkeyPatch) -> None:
    before = retained_reports(org.database)
    sizes: list[int] = []
    original = retention.retention.delete_ended_versions

    def counted(session: Any, *, anchor_id: int, limit: int) -> int:
        deleted = original(session, anchor_id=anchor_id, limit=limit)
        sizes.append(deleted)
        return deleted

    monkeypatch.setattr(retention.retention, "delete_ended_versions", counted)
    result = retention.prune(org.database, now=NOW, retention_period=RETENTION, batch=7)
    assert result.batches > 20
    assert sizes and max(sizes) <= 7
    assert retained_reports(org.database) == before


def _old_enforcement(org: Org, name: str, *, outcome: str, run_status: str) -> Run:
    """An enforcement of day 1 that ended ``run_status``, with one audit record (``outcome``) of
    disabling the key ``name``: a dry run's plan when planned, else a live change."""
    with session_scope(org.database) as session:
        run = runs.start_run(session, kind="enforce", now=T0 + DAY)
        runs.finish_run(session, run.id, status=run_status, now=T0 + DAY, exit_code=0, message=run_status)
        session.add(
            Action(
                run_id=run.id,
                created_at=T0 + DAY,
                finished_at=None if outcome == "pending" else T0 + DAY,
                key_hash=key_hash(name),
                key_name=name,
                workspace_id=None,
                rule="disable-idle",
                rules=["disable-idle"],
                action="disable",
                dry_run=outcome == "planned",
                outcome=outcome,
                evidence={},
            )
        )
    return run


def test_audit_retention_removes_old_audit_records_only(org: Org) -> None:
    run = _old_enforcement(org, "gone-early", outcome="planned", run_status=runs.OK)
    audit_records = count(org.database, Action)
    kept = retention.prune(org.database, now=NOW, retention_period=RETENTION)
    assert kept.actions_deleted == 0 and count(org.database, Action) == audit_records
    with org.database.sessions() as session:
        assert session.get(Run, run.id) is not None  # its audit record still refers to it
    pruned = retention.prune(org.database, now=NOW, retention_period=RETENTION, audit_retention=timedelta(days=30))
    assert pruned.actions_deleted == 1 and count(org.database, Action) == audit_records - 1
    assert pruned.runs_deleted == 1


def _manual_change(run_id: int, key: str, action: str, at: datetime) -> Action:
    """A live change of ``key`` made at ``at`` (rule ``manual``), as its audit record."""
    return Action(
        run_id=run_id,
        created_at=at,
        finished_at=at,
        key_hash=key,
        key_name="x",
        workspace_id=None,
        rule="manual",
        rules=["manual"],
        action=action,
        dry_run=False,
        outcome="done",
        evidence={},
    )


def test_audit_retention_keeps_each_tracked_keys_newest_disable_or_enable(org: Org) -> None:
    """A key given back (enable) on day 2 was counted idle from before the give-back once the
    audit retention took the record: the next run disabled it again at once. Each tracked key's
    newest disable or enable stays, whatever its age; older ones go."""
    given_back, disabled = key_hash("idle-since-day-3"), key_hash("disabled-long-ago")
    with session_scope(org.database) as session:
        run = runs.start_run(session, kind="enable", now=T0 + DAY)
        runs.finish_run(session, run.id, status=runs.OK, now=T0 + 2 * DAY, exit_code=0, message="ok")
        for key, action, day_number in [
            (given_back, "disable", 1),
            (given_back, "enable", 2),
            (disabled, "disable", 2),
        ]:
            session.add(_manual_change(run.id, key, action, T0 + day_number * DAY))

    retention.prune(org.database, now=NOW, retention_period=RETENTION, audit_retention=timedelta(days=30))

    with org.database.sessions() as session:
        kept = session.execute(select(Action.key_hash, Action.action).where(Action.run_id == run.id)).all()
        assert sorted(kept) == sorted([(given_back, "enable"), (disabled, "disable")])
        newest = audit.last_changes(session, key_hashes=[given_back])
    assert newest[given_back].action == "enable"


def test_audit_retention_keeps_a_change_in_doubt_until_a_run_settles_it(org: Org) -> None:
    """A change whose outcome was never recorded (``pending``) is the only record that it may have
    been made: however old, the retention leaves it for a run to settle."""
    run = _old_enforcement(org, "in-doubt", outcome="pending", run_status=runs.FAILED)
    pruned = retention.prune(org.database, now=NOW, retention_period=RETENTION, audit_retention=timedelta(days=30))
    assert pruned.actions_deleted == 0
    with org.database.sessions() as session:
        assert [a.outcome for a in session.scalars(select(Action).where(Action.run_id == run.id))] == ["pending"]
        assert session.get(Run, run.id) is not None


def test_prune_as_a_job_through_execute(org: Org) -> None:
    outcome = org.run("prune", NOW)  # through keyhygiene.jobs.execute, with the default 400d retention
    assert (outcome.kind, outcome.exit_code, outcome.summary["versions_deleted"]) == ("prune", 0, 0)
    settings = org.settings.model_copy(update={"retention": timedelta(days=15), "audit_retention": timedelta(days=400)})
    outcome = execute("prune", settings, clock=lambda: NOW, database=org.database, started_by="beat")
    assert outcome.exit_code == 0
    assert outcome.summary["audit_cutoff"] == isoformat(NOW - timedelta(days=400))
    assert outcome.summary["cutoff"] == isoformat(NOW - timedelta(days=15))
    with org.database.sessions() as session:
        recorded = session.get(Run, outcome.run_id)
        assert recorded is not None and recorded.started_by == "beat"


def test_a_sync_during_a_prune_is_not_blocked_for_long(org: Org, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prune holds no lock between its batches: syncs run to the end while a prune stands still
    between two batches, and the store stays consistent."""
    errors: list[BaseException] = []
    between_batches, go_on = threading.Event(), threading.Event()
    batches = 0
    delete_ended_versions = retention_db.delete_ended_versions

    def pausing(session: Any, **kwargs: Any) -> int:
        nonlocal batches
        batches += 1
        if batches == 3:  # two batches committed, the third's transaction not begun
            between_batches.set()
            go_on.wait(timeout=120)
        return delete_ended_versions(session, **kwargs)

    monkeypatch.setattr(retention_db, "delete_ended_versions", pausing)

    def prune() -> None:
        try:
            retention.prune(org.database, now=NOW, retention_period=RETENTION, batch=5)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    worker = threading.Thread(target=prune)
    worker.start()
    try:
        wait_until(between_batches.is_set, timeout=60, what="the prune to stand between two batches")
        for k in range(3):
            org.sync(NOW + k * HOUR)
        assert worker.is_alive(), "the syncs ran while the prune stood still"
    finally:
        go_on.set()
    worker.join(timeout=120)
    assert not worker.is_alive() and not errors
    assert batches > 3
    with org.database.sessions() as session:
        newest = snapshots.latest_snapshot(session)
        assert newest is not None and newest.taken_at == NOW + 2 * HOUR
        assert len(list(snapshots.keys_at(session, newest.id))) == newest.key_count


def test_prune_gives_the_space_back_on_sqlite(org: Org) -> None:
    if org.database.dialect != "sqlite":
        pytest.skip("PostgreSQL's autovacuum makes freed space reusable; it does not shrink files")
    path = Path(org.database.engine.url.database or "")

    def file_size() -> int:
        with org.database.engine.begin() as connection:
            connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        return path.stat().st_size

    before_reports = retained_reports(org.database)
    before = file_size()

    result = retention.prune(org.database, now=NOW, retention_period=RETENTION)

    assert result.versions_deleted > 0 and result.pages_freed > 0
    assert file_size() < before
    assert retained_reports(org.database) == before_reports


def test_sqlite_gives_the_free_pages_back_a_step_of_many_pages_at_a_time(tmp_path: Path) -> None:
    """Python's sqlite3 runs one step of ``PRAGMA incremental_vacuum(N)``, which frees one page: the
    space went back one page per transaction (9,400 transactions and 4.7 s for 9,259 pages). And
    a step writes a page to the write-ahead log per page it frees, a file SQLite keeps as large as
    it grew while any connection has the database open: steps of 20,000 pages left 80 MB there."""
    path = tmp_path / "store.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE filler (x TEXT)")
        connection.exec_driver_sql(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5000) "
            "INSERT INTO filler SELECT printf('%.3000c', 'x') FROM n"
        )
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE filler")
        free = connection.exec_driver_sql("PRAGMA freelist_count").scalar()
        page_size = connection.exec_driver_sql("PRAGMA page_size").scalar()
    with engine.begin() as connection:  # the log of the filling, emptied
        connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    begun: list[str] = []

    def count(connection: object, cursor: object, statement: str, *args: object) -> None:
        if statement.startswith("BEGIN"):
            begun.append(statement)

    reader = sqlite3.connect(path)  # a report, say, with the file open: the log keeps its size
    event.listen(engine, "before_cursor_execute", count)
    try:
        freed = retention_db.reclaim_space(engine)
        log = Path(f"{path}-wal").stat().st_size
    finally:
        event.remove(engine, "before_cursor_execute", count)
        engine.dispose()
        reader.close()

    assert free and page_size and free > 4_000
    assert freed == free
    assert len(begun) == free // 1_000 + 2  # 1,000 pages a step; the last step finds none
    assert log < 3 * 1_000 * page_size  # a step's pages, and what SQLite checkpoints at anyway


def test_audit_retention_keeps_the_change_in_effect_at_its_cutoff(org: Org) -> None:
    """A key disabled, given back before the cutoff and disabled again after it: only its newest
    change was kept, so `report idle --at` a time inside the retention (before the new disable)
    read the key as still disabled from the first time, and said a rule would act on it."""
    key = key_hash("comes-back")
    audit_retention = timedelta(days=30)
    with session_scope(org.database) as session:
        run = runs.start_run(session, kind="enable", now=T0 + DAY)
        runs.finish_run(session, run.id, status=runs.OK, now=NOW, exit_code=0, message="ok")
        for action, at in [("disable", T0 + DAY), ("enable", T0 + 2 * DAY), ("disable", NOW - 5 * DAY)]:
            session.add(_manual_change(run.id, key, action, at))
    inside = NOW - audit_retention + DAY
    with org.database.sessions() as session:
        before = load_audit_facts(session, until=inside).get(key)

    retention.prune(org.database, now=NOW, retention_period=RETENTION, audit_retention=audit_retention)

    with org.database.sessions() as session:
        kept = session.execute(select(Action.action, Action.created_at).where(Action.run_id == run.id)).all()
        assert [action for action, _ in sorted(kept, key=lambda row: row[1])] == ["enable", "disable"]
        assert load_audit_facts(session, until=inside).get(key) == before is not None


def test_audit_retention_keeps_the_deletes_the_shrink_guard_counts_while_syncs_fail(
    database: Database, fake: FakeOpenRouter, fake_url: str, tmp_path: Path
) -> None:
    """A run deleted 4 of 20 keys on purpose; then the API was out for ten days (no snapshot), and
    the daily prune, with a 7-day audit retention, took the delete records. The next run counted
    keyhygiene's own deletes as keys gone missing, and the shrink guard refused it."""
    rules = tmp_path / "keyhygiene.toml"
    rules.write_text(
        "[safety]\ndry_run = false\nmax_action_percent = 10\n\n"
        '[[rule]]\nname = "delete-expired"\nmatch = "expired"\naction = "delete"\ngrace = "0d"\n'
    )
    org = Org(database, fake, fake_url, rules_file=rules)
    try:
        for n in range(16):
            org.add(f"svc-{n}", at=T0 - DAY, created_at=T0 - 90 * DAY, last_used_at=T0 - DAY)
        for n in range(4):
            org.add(f"old-{n}", at=T0 - DAY, created_at=T0 - 90 * DAY, expires_at=T0 - 2 * DAY)
        assert org.run("run", T0, allow_actions=4).exit_code == 0
        assert len(fake.keys) == 16
        for day_number in range(1, 11):  # no sync succeeds; the prune needs no API
            fake.set_clock(T0 + day_number * DAY)
            retention.prune(database, now=T0 + day_number * DAY, retention_period=RETENTION, audit_retention=7 * DAY)

        after_the_outage = org.run("run", T0 + 11 * DAY)
    finally:
        org.close()

    assert after_the_outage.exit_code == 0, after_the_outage.message
    with database.sessions() as session:
        assert len(audit.deleted_since(session, T0 - DAY)) == 4


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_the_audit_prune_reads_each_keys_changes_not_every_change_per_record(database: Database) -> None:
    """An audit log of 12,000 executed changes of 1,000 keys that no analysis had seen (no sync
    analyzes it; autovacuum may be off): planned without statistics, each batch looked up every
    executed change once per record it considered, 13 s a batch of 5,000 at 112,000 records, 265 s
    the whole prune, growing with the square of the records."""
    with database.engine.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE actions SET (autovacuum_enabled = off)")
    with session_scope(database) as session:
        run = runs.start_run(session, kind="enforce", now=T0)
        runs.finish_run(session, run.id, status=runs.OK, now=T0, exit_code=0, message="ok")
        keys = [f"{i:064x}" for i in range(1_000)]
        session.execute(
            tracked_keys.insert(), [{"id": i + 1, "key_hash": key, "first_seen_at": T0} for i, key in enumerate(keys)]
        )
        session.add_all(
            _manual_change(run.id, keys[i % 1_000], ("disable", "enable")[i // 1_000 % 2], T0 + timedelta(seconds=i))
            for i in range(12_000)
        )
    read: list[int] = []

    def explain(connection, cursor, statement: str, parameters, context, executemany: bool) -> None:
        if statement.startswith("SELECT actions.id"):
            cursor.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {statement}", parameters)
            read.append(_rows_read(cursor.fetchone()[0][0]["Plan"]))

    event.listen(database.engine, "before_cursor_execute", explain)
    try:
        result = retention.prune(database, now=NOW, retention_period=RETENTION, audit_retention=timedelta(days=1))
    finally:
        event.remove(database.engine, "before_cursor_execute", explain)

    assert result.actions_deleted == 11_000  # each key's newest change stays
    assert read and max(read) < 20 * retention.BATCH, read


def _rows_read(plan: dict) -> int:
    """The rows every node of ``plan`` produced, over all its loops."""
    own = int(plan.get("Actual Rows", 0)) * int(plan.get("Actual Loops", 1))
    return own + sum(_rows_read(child) for child in plan.get("Plans", []))
