"""Removing history older than the retention, in small batches (see :mod:`keyhygiene.retention`).

The *anchor* is the newest complete snapshot taken at or before the cutoff. Every report about a
time after the cutoff reads the anchor or later snapshots, and the versions alive at them, so:

- versions (usage and record versions) whose validity ended at or before the anchor are deleted;
  what the rules need from older history (first sight, since when usage and ``disabled`` held) is
  kept on the alive versions themselves (see ``db.models.key_usage``), so nothing older is read;
  only the usage version a key listed again after the anchor grows from is kept, until the anchor
  passes that key's next version (``delete_ended_versions``);
- keys with no version left are forgotten;
- complete snapshots older than the anchor become ``pruned``: no report reads them as an
  inventory any more; those that a kept version still begins or ends at stay as rows (their time
  is the time that version began), the rest are deleted;
- staging rows of syncs that failed or were abandoned are deleted;
- runs older than the cutoff that no snapshot and no audit record refers to are deleted;
- audit records older than the audit retention (when there is one) are deleted, but for each
  tracked key's newest disable or enable as of the cutoff, which the rules, ``undo`` and
  ``enable`` read, and (``keyhygiene.retention``) for those the shrink guard reads.

Each function does one bounded step; the caller commits each step in its own short transaction.
On SQLite, ``reclaim_space`` then hands the freed pages back to the file system.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Engine, and_, delete, exists, or_, select, update
from sqlalchemy.orm import Session, aliased

from .audit import DONE, PENDING
from .engine import SQLITE_BEGIN
from .models import (
    Action,
    Notice,
    PlanEntry,
    Run,
    RunPlan,
    Snapshot,
    StoredPlan,
    key_records,
    key_usage,
    snapshot_carried,
    snapshot_staging,
    tracked_keys,
)
from .rollups import KeyDay, KeyRollup
from .runs import RUNNING
from .snapshots import COMPLETE, FAILED, PRUNED


def anchor_snapshot(session: Session, cutoff: datetime) -> Snapshot | None:
    """The newest complete snapshot taken at or before ``cutoff``: the oldest one kept whole."""
    return session.scalars(
        select(Snapshot)
        .where(Snapshot.status == COMPLETE, Snapshot.taken_at <= cutoff)
        .order_by(Snapshot.id.desc())
        .limit(1)
    ).first()


def _delete_ids(session: Session, table: Any, condition: Any, limit: int, *, dependents: tuple[Any, ...] = ()) -> int:
    """Delete up to ``limit`` rows of ``table`` meeting ``condition``, oldest id first, after the
    rows of the ``dependents`` (columns holding such an id) that refer to them."""
    ids = list(session.scalars(select(table.c.id).where(condition).order_by(table.c.id).limit(limit)))
    if not ids:
        return 0
    for column in dependents:
        session.execute(delete(column.table).where(column.in_(ids)))
    result = session.execute(delete(table).where(table.c.id.in_(ids)))
    return int(getattr(result, "rowcount", 0) or 0)


def _absent_from(session: Session, value: Any, column: Any) -> Any:
    """That no row holds ``value`` in ``column``, where no index leads with ``column``. PostgreSQL
    plans NOT EXISTS as one anti-join, a single pass over the table. SQLite runs it once per row
    outside, each a full scan (a year of versions, hours of pruning under the write lock): there the
    column is read once, as a set (NOT IN, which SQLite answers from an index it builds for the
    statement). Not NOT IN on PostgreSQL: for a large table it may not hash the set, and then looks
    through it once per row."""
    if session.get_bind().dialect.name == "postgresql":
        return ~exists().where(column == value)
    return value.not_in(select(column).where(column.is_not(None)))


def delete_ended_versions(session: Session, *, anchor_id: int, limit: int) -> int:
    """Delete up to ``limit`` versions whose validity ended at or before the anchor, but for the
    usage version that a key's next one, begun after the anchor, grows from: a key listed again
    after a gap that spans the anchor spent the step between the two, which a report of a day the
    period covers in part reads from the versions. A later prune deletes it, once the anchor has
    passed the next one."""
    u, later = key_usage, key_usage.alias("later")
    followed_before_anchor = exists().where(
        later.c.key_id == u.c.key_id, later.c.valid_from > u.c.valid_from, later.c.valid_from <= anchor_id
    )
    listed_after_anchor = exists().where(later.c.key_id == u.c.key_id, later.c.valid_from > anchor_id)
    ended = and_(u.c.valid_to <= anchor_id, or_(followed_before_anchor, ~listed_after_anchor))
    deleted = _delete_ids(session, key_usage, ended, limit)
    if deleted < limit:
        deleted += _delete_ids(session, key_records, key_records.c.valid_to <= anchor_id, limit - deleted)
    return deleted


def delete_forgotten_keys(session: Session, *, limit: int) -> int:
    """Delete up to ``limit`` keys that have no version left, with their running roll-up state: a
    key that comes back after this is a new key to the store."""
    t = tracked_keys
    orphan = and_(
        ~exists().where(key_usage.c.key_id == t.c.id),
        ~exists().where(key_records.c.key_id == t.c.id),
        # Neither table below is searched by key alone (``key_days`` is keyed by day first, staging
        # has no such index): ``_absent_from``.
        _absent_from(session, t.c.id, snapshot_staging.c.key_id),  # a sync in progress saw it again
        # (A key a sync in progress carried had open versions then; if another sync has closed them
        # since, that sync is refused when it records: ``db.snapshots.record_staged``.)
        # Its last days go first: ids are not reused under them.
        _absent_from(session, t.c.id, KeyDay.__table__.c.key_id),
    )
    # The state goes with the key: SQLite may give a deleted id to the next new key.
    return _delete_ids(session, t, orphan, limit, dependents=(KeyRollup.__table__.c.key_id,))


def delete_abandoned_staging(session: Session, *, cutoff: datetime) -> int:
    """Staging rows of syncs that failed, or that have been running since before the cutoff (a
    crashed process): nothing will ever read them."""
    deleted = 0
    for table in (snapshot_staging, snapshot_carried):
        live = exists().where(
            Snapshot.id == table.c.snapshot_id, Snapshot.status == RUNNING, Snapshot.started_at >= cutoff
        )
        result = session.execute(delete(table).where(~live))
        deleted += int(getattr(result, "rowcount", 0) or 0)
    return deleted


def mark_pruned(session: Session, *, anchor_id: int, limit: int) -> int:
    """Up to ``limit`` complete snapshots older than the anchor stop being inventories; returns how many."""
    ids = list(
        session.scalars(
            select(Snapshot.id)
            .where(Snapshot.id < anchor_id, Snapshot.status == COMPLETE)
            .order_by(Snapshot.id)
            .limit(limit)
        )
    )
    if not ids:
        return 0
    result = session.execute(update(Snapshot).where(Snapshot.id.in_(ids)).values(status=PRUNED))
    return int(getattr(result, "rowcount", 0) or 0)


def delete_old_snapshots(session: Session, *, anchor_id: int | None, cutoff: datetime, limit: int) -> int:
    """Delete up to ``limit`` snapshots no version refers to: older than the anchor, or failed before
    the cutoff. Never the anchor or anything newer that is complete or still running."""
    older = Snapshot.status == FAILED
    if anchor_id is not None:
        older = or_(Snapshot.id < anchor_id, older)
    # Where versions begin and end is indexed: looked up per snapshot.
    unreferenced = and_(
        ~exists().where(key_usage.c.valid_from == Snapshot.id),
        ~exists().where(key_records.c.valid_from == Snapshot.id),
        ~exists().where(key_usage.c.valid_to == Snapshot.id),
        ~exists().where(key_records.c.valid_to == Snapshot.id),
        ~exists().where(snapshot_staging.c.snapshot_id == Snapshot.id),
        ~exists().where(snapshot_carried.c.snapshot_id == Snapshot.id),
    )
    condition = (older, Snapshot.started_at < cutoff, unreferenced)
    ids = list(session.scalars(select(Snapshot.id).where(*condition).order_by(Snapshot.id).limit(limit)))
    if not ids:
        return 0
    result = session.execute(delete(Snapshot).where(Snapshot.id.in_(ids), unreferenced))
    return int(getattr(result, "rowcount", 0) or 0)


def delete_old_runs(session: Session, *, cutoff: datetime, limit: int) -> int:
    """Delete up to ``limit`` finished runs started before the cutoff that nothing refers to."""
    condition = (
        Run.started_at < cutoff,
        Run.status != RUNNING,
        ~exists().where(Snapshot.run_id == Run.id),
        ~exists().where(Action.run_id == Run.id),
        ~exists().where(Notice.run_id == Run.id),
        ~exists().where(RunPlan.run_id == Run.id),
    )
    ids = list(session.scalars(select(Run.id).where(*condition).order_by(Run.id).limit(limit)))
    if not ids:
        return 0
    result = session.execute(delete(Run).where(Run.id.in_(ids), *condition))
    return int(getattr(result, "rowcount", 0) or 0)


def delete_old_actions(session: Session, *, before: datetime, limit: int, deletes_from: datetime | None = None) -> int:
    """Delete up to ``limit`` audit records created before ``before``: ``actions`` rows first, then
    runs' plan references (``delete_unreferenced_plans`` then takes the plans no run refers to any
    more). Returns the records deleted (a plan reference counts once). The keys keyhygiene deleted
    at or after ``deletes_from`` keep their records (the shrink guard counts them as its own)."""
    # A change in doubt (``pending``: its outcome never recorded) stays until a run settles it.
    # So does each tracked key's newest disable or enable as of ``before`` (the one in effect then,
    # and after it until the key's next change, which is kept by its time): what the rules (a key
    # given back is idle from then; a reenable rule's hold), undo and enable read of it, now or
    # as of any time since (``report idle --at``).
    newer = aliased(Action)
    executed = (Action.dry_run.is_(False), Action.outcome == DONE)
    superseded = exists().where(
        newer.key_hash == Action.key_hash,
        newer.id > Action.id,
        newer.created_at < before,
        newer.dry_run.is_(False),
        newer.outcome == DONE,
        newer.action.in_(("disable", "enable", "delete")),
    )
    tracked = exists().where(tracked_keys.c.key_hash == Action.key_hash)
    newest_change = and_(*executed, Action.action.in_(("disable", "enable")), ~superseded, tracked)
    old = [Action.created_at < before, Action.outcome != PENDING, ~newest_change]
    if deletes_from is not None:
        old.append(~and_(*executed, Action.action == "delete", Action.created_at >= deletes_from))
    ids = list(session.scalars(select(Action.id).where(*old).order_by(Action.id).limit(limit)))
    if ids:
        result = session.execute(delete(Action).where(Action.id.in_(ids)))
        return int(getattr(result, "rowcount", 0) or 0)
    ids = list(session.scalars(select(RunPlan.id).where(RunPlan.created_at < before).order_by(RunPlan.id).limit(limit)))
    if ids:
        result = session.execute(delete(RunPlan).where(RunPlan.id.in_(ids)))
        return int(getattr(result, "rowcount", 0) or 0)
    return 0


def delete_unreferenced_plans(session: Session, *, limit: int) -> int:
    """Delete stored plans no run refers to any more (``delete_old_actions`` took the references),
    each whole with its entries, oldest first: as many as hold ``limit`` entries in all, and at least
    one. Returns the plans deleted.

    A plan goes whole in one transaction: a run whose plan has the same content refers to a stored
    plan rather than store it again, so none may ever be seen with part of its entries."""
    unreferenced = ~exists().where(RunPlan.plan_id == StoredPlan.id)
    # Locked (PostgreSQL) until this step commits, leaving out any plan a run is referring to now
    # (``db.audit.record_plan`` locks it): that run would otherwise wait for this step and then
    # fail on the plan it deleted, or this step for the run, on the reference it added.
    candidates = select(StoredPlan.id, StoredPlan.decisions).where(unreferenced).order_by(StoredPlan.id).limit(limit)
    plan_ids: list[int] = []
    entries = 0
    for plan_id, decisions in session.execute(candidates.with_for_update(of=StoredPlan, skip_locked=True)):
        if plan_ids and entries + decisions > limit:
            break
        plan_ids.append(plan_id)
        entries += decisions
    if not plan_ids:
        return 0
    # Checked again in each statement: a run may have just referred to one of these plans.
    entry_unreferenced = ~exists().where(RunPlan.plan_id == PlanEntry.plan_id)
    session.execute(delete(PlanEntry).where(PlanEntry.plan_id.in_(plan_ids), entry_unreferenced))
    result = session.execute(delete(StoredPlan).where(StoredPlan.id.in_(plan_ids), unreferenced))
    return int(getattr(result, "rowcount", 0) or 0)


def reclaim_space(engine: Engine, *, pages_per_step: int = 1_000) -> int:
    """SQLite: return free pages to the file system (``auto_vacuum=INCREMENTAL``, set by migration
    0005), a bounded number per step so a sync waits for one step at most; returns the pages
    freed. PostgreSQL: nothing (autovacuum makes the space reusable; see the README).

    A step writes about a page to the write-ahead log for each page it frees, and SQLite keeps
    that file as large as it grew until the last connection closes: steps of 20,000 pages left an
    80 MB ``-wal`` file beside a file pruned to 0.4 MB while a report held it open. A step of 1,000
    pages (4 MB at SQLite's default page size) keeps it to what SQLite checkpoints at anyway."""
    if engine.dialect.name != "sqlite":
        return 0
    freed = 0
    # IMMEDIATE: the step reads the free list and then writes; a deferred transaction whose read
    # a sync's commit overtook could not take the write lock, and would fail at once ("database
    # is locked") instead of waiting for the busy timeout.
    writer = engine.execution_options(**{SQLITE_BEGIN: "IMMEDIATE"})
    while True:
        with writer.begin() as connection:
            free = int(connection.exec_driver_sql("PRAGMA freelist_count").scalar() or 0)
            if free == 0:
                return freed
            # Each step of this pragma frees one page, and Python's sqlite3 takes one step of a
            # statement that returns no rows (fetching more takes none): so one page per run of
            # it, each a few microseconds, on the driver's cursor. (``executescript`` would run it
            # to the end, but commits this transaction first.) Before, one page a transaction:
            # 9,259 pages took 9,400 transactions and 4.7 s.
            cursor = connection.connection.cursor()
            try:
                for _ in range(min(free, pages_per_step)):
                    cursor.execute("PRAGMA incremental_vacuum(1)")
            finally:
                cursor.close()
            after = int(connection.exec_driver_sql("PRAGMA freelist_count").scalar() or 0)
        if after >= free:  # auto_vacuum is not INCREMENTAL on this file: nothing to give back
            return freed
        freed += free - after
