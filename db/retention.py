"""Removing history older than the retention, in small batches (see :mod:`keyhygiene.retention`).

The *anchor* is the newest complete snapshot taken at or before the cutoff. Every report about a
time after the cutoff reads the anchor or later snapshots, and the versions alive at them, so:

- versions whose validity ended at or before the anchor are deleted, except the few an older
  key's history walk still needs (``versions_to_keep``);
- complete snapshots older than the anchor become ``pruned``: no report reads them as an
  inventory any more; those that a kept version still begins or ends at stay as rows (their time
  is the time that version began), the rest are deleted;
- runs older than the cutoff that no snapshot and no audit record refers to are deleted;
- audit records older than the audit retention (when there is one) are deleted.

Each function does one bounded step; the caller commits each step in its own short transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, exists, func, or_, select, update
from sqlalchemy.orm import Session

from .models import Action, KeyState, Notice, PlanEntry, Run, RunPlan, Snapshot, StoredPlan
from .runs import RUNNING
from .snapshots import COMPLETE, FAILED

PRUNED = "pruned"
"""A snapshot older than the retention: its inventory is gone; it remains only as a time."""


@dataclass(frozen=True, slots=True)
class OldVersion:
    """A version as far as pruning needs it."""

    id: int
    key_hash: str
    valid_from: int
    usage: float
    byok_usage: float
    disabled: bool


def anchor_snapshot(session: Session, cutoff: datetime) -> Snapshot | None:
    """The newest complete snapshot taken at or before ``cutoff``: the oldest one kept whole."""
    return session.scalars(
        select(Snapshot)
        .where(Snapshot.status == COMPLETE, Snapshot.taken_at <= cutoff)
        .order_by(Snapshot.id.desc())
        .limit(1)
    ).first()


def ended_versions(session: Session, *, anchor_id: int, after_key: str | None, limit: int) -> list[OldVersion]:
    """Versions whose validity ended at or before the anchor, in (key, time) order, for keys after
    ``after_key``; at most ``limit`` rows, or all of one key's rows when that key alone has more."""
    query = select(
        KeyState.id, KeyState.key_hash, KeyState.valid_from, KeyState.usage, KeyState.byok_usage, KeyState.disabled
    ).where(KeyState.valid_to.is_not(None), KeyState.valid_to <= anchor_id)
    if after_key is not None:
        query = query.where(KeyState.key_hash > after_key)
    rows = [
        OldVersion(*row) for row in session.execute(query.order_by(KeyState.key_hash, KeyState.valid_from).limit(limit))
    ]
    if len(rows) == limit and rows[0].key_hash == rows[-1].key_hash:
        one_key = query.where(KeyState.key_hash == rows[0].key_hash).order_by(KeyState.valid_from)
        rows = [OldVersion(*row) for row in session.execute(one_key)]
    return rows


def successors(session: Session, *, anchor_id: int, key_hashes: Sequence[str]) -> dict[str, OldVersion]:
    """Per key, its oldest version still valid after the anchor (the one old versions lead up to)."""
    first = (
        select(KeyState.key_hash, func.min(KeyState.valid_from).label("valid_from"))
        .where(
            KeyState.key_hash.in_(list(key_hashes)),
            or_(KeyState.valid_to.is_(None), KeyState.valid_to > anchor_id),
        )
        .group_by(KeyState.key_hash)
        .subquery()
    )
    rows = session.execute(
        select(
            KeyState.id, KeyState.key_hash, KeyState.valid_from, KeyState.usage, KeyState.byok_usage, KeyState.disabled
        ).join(first, (first.c.key_hash == KeyState.key_hash) & (first.c.valid_from == KeyState.valid_from))
    )
    return {row.key_hash: OldVersion(*row) for row in rows}


def versions_to_keep(old: Sequence[OldVersion], successor: OldVersion | None) -> set[int]:
    """Which of one key's ended versions a retained report can still reach.

    The history rules read (``keyhygiene.enforcement.history_from_timeline``) walks back from a
    key's current version while usage (or ``disabled``) holds, and notes the key's first sighting.
    After the anchor, such a walk can only continue into the old versions through ``successor``, so
    it needs: the first version (first sighting), the oldest version of the run of equal usage
    ending at the successor and the one before it (where the walk stops), and likewise for a run
    of disabled versions. At most five per key; none for a key that did not outlive the anchor.
    """
    if successor is None or not old:
        return set()
    chain = [*old, successor]
    keep = {0}

    def run_start(same: Callable[[OldVersion], bool]) -> int:
        index = len(chain) - 1
        while index > 0 and same(chain[index - 1]):
            index -= 1
        return index

    starts = [run_start(lambda v: v.usage == successor.usage and v.byok_usage == successor.byok_usage)]
    if successor.disabled:
        starts.append(run_start(lambda v: v.disabled))
    for start in starts:
        keep.update(index for index in (start - 1, start) if 0 <= index < len(old))
    return {old[index].id for index in keep}


def delete_versions(session: Session, ids: Sequence[int]) -> int:
    deleted = 0
    for start in range(0, len(ids), 1000):
        chunk = list(ids[start : start + 1000])
        result = session.execute(delete(KeyState).where(KeyState.id.in_(chunk)))
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
    unreferenced = ~exists().where(or_(KeyState.valid_from == Snapshot.id, KeyState.valid_to == Snapshot.id))
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


def delete_old_actions(session: Session, *, before: datetime, limit: int) -> int:
    """Delete up to ``limit`` audit records created before ``before``: ``actions`` rows first, then
    runs' plan references, then the stored plans no run refers to any more. Returns the records
    deleted (a plan reference counts once)."""
    ids = list(session.scalars(select(Action.id).where(Action.created_at < before).order_by(Action.id).limit(limit)))
    if ids:
        result = session.execute(delete(Action).where(Action.id.in_(ids)))
        return int(getattr(result, "rowcount", 0) or 0)
    ids = list(session.scalars(select(RunPlan.id).where(RunPlan.created_at < before).order_by(RunPlan.id).limit(limit)))
    if ids:
        result = session.execute(delete(RunPlan).where(RunPlan.id.in_(ids)))
        return int(getattr(result, "rowcount", 0) or 0)
    unreferenced = ~exists().where(RunPlan.plan_id == StoredPlan.id)
    plan_ids = list(session.scalars(select(StoredPlan.id).where(unreferenced).order_by(StoredPlan.id).limit(limit)))
    if plan_ids:
        # Checked again in each statement: a run may have just referred to one of these plans.
        entry_unreferenced = ~exists().where(RunPlan.plan_id == PlanEntry.plan_id)
        session.execute(delete(PlanEntry).where(PlanEntry.plan_id.in_(plan_ids), entry_unreferenced))
        session.execute(delete(StoredPlan).where(StoredPlan.id.in_(plan_ids), unreferenced))
    return 0
