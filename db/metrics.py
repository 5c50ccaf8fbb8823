"""What the Prometheus metrics read, as SQL aggregates over the runs, the audit log and the newest snapshot."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import case, func, select, type_coerce, union_all
from sqlalchemy.orm import Session

from . import runs, snapshots
from .audit import IN_DOUBT, PENDING
from .models import Action, Money, PlanEntry, Run, RunPlan
from .rollups import KeyDay, SnapshotRollup, first_sight_in


def keys_by_workspace_and_state(session: Session, snapshot_id: int, *, at: datetime) -> list[tuple[str, str, int]]:
    """(workspace id, state, keys) at a snapshot.

    A key's state is ``expired`` (at ``at``), else ``disabled``, else ``active``.
    """
    alive = snapshots.alive_at(snapshot_id, newest=snapshots.is_newest(session, snapshot_id)).subquery()
    state = case(
        (alive.c.expires_at.is_not(None) & (alive.c.expires_at <= at), "expired"),
        (alive.c.disabled.is_(True), "disabled"),
        else_="active",
    ).label("state")
    workspace = func.coalesce(alive.c.workspace_id, "default").label("workspace")
    rows = session.execute(select(workspace, state, func.count()).group_by(workspace, state).order_by(workspace, state))
    return [(str(ws), str(st), int(count)) for ws, st, count in rows]


def runs_by_job_and_status(session: Session) -> list[tuple[str, str, int]]:
    """(job, status, runs) of the runs that ended: a run is counted once, under its final status
    (counted while ``running`` too, a counter would go down as each run ends)."""
    ended = select(Run.kind, Run.status, func.count()).where(Run.status != runs.RUNNING)
    rows = session.execute(ended.group_by(Run.kind, Run.status))
    return [(str(kind), str(status), int(count)) for kind, status, count in rows]


def running_runs_by_job(session: Session) -> list[tuple[str, int]]:
    """(job, runs) of the runs recorded as running now."""
    rows = session.execute(select(Run.kind, func.count()).where(Run.status == runs.RUNNING).group_by(Run.kind))
    return [(str(kind), int(count)) for kind, count in rows]


def pending_changes_by_action(session: Session) -> list[tuple[str, int]]:
    """(action, changes) whose outcome is not recorded yet: in flight, or in doubt until a run settles them."""
    rows = session.execute(select(Action.action, func.count()).where(*IN_DOUBT).group_by(Action.action))
    return [(str(action), int(count)) for action, count in rows]


def actions_by_action_and_outcome(session: Session) -> list[tuple[str, str, bool, int]]:
    """(action, outcome, dry run, records) over the audit log: ``actions`` rows and the decisions
    of the plans that dry runs and refused runs recorded by reference (``run_plans``)."""
    # A change is counted once its outcome is recorded (counted while ``pending`` too, a counter
    # would go down as each change ends).
    recorded = (
        select(Action.action, Action.outcome, Action.dry_run, func.count().label("records"))
        .where(Action.outcome != PENDING)
        .group_by(Action.action, Action.outcome, Action.dry_run)
    )
    # A plan is recorded once and referenced by every run that made it (hourly dry runs: hundreds
    # of runs, one plan of thousands of decisions): count each side apart and multiply, rather than
    # join runs to decisions (a month of hourly dry runs of a 4,000-key plan: 3 million rows, 3-4 s
    # a scrape, against milliseconds).
    per_plan = (
        select(PlanEntry.plan_id, PlanEntry.action, func.count().label("decisions"))
        .group_by(PlanEntry.plan_id, PlanEntry.action)
        .subquery()
    )
    per_run = (
        select(RunPlan.plan_id, RunPlan.outcome, RunPlan.dry_run, func.count().label("runs"))
        .group_by(RunPlan.plan_id, RunPlan.outcome, RunPlan.dry_run)
        .subquery()
    )
    planned = (
        select(
            per_plan.c.action,
            per_run.c.outcome,
            per_run.c.dry_run,
            func.sum(per_plan.c.decisions * per_run.c.runs).label("records"),
        )
        .join(per_run, per_run.c.plan_id == per_plan.c.plan_id)
        .group_by(per_plan.c.action, per_run.c.outcome, per_run.c.dry_run)
    )
    both = union_all(recorded, planned).subquery()
    rows = session.execute(
        select(both.c.action, both.c.outcome, both.c.dry_run, func.sum(both.c.records)).group_by(
            both.c.action, both.c.outcome, both.c.dry_run
        )
    )
    return [(str(action), str(outcome), bool(dry_run), int(count)) for action, outcome, dry_run, count in rows]


def last_success_by_job(session: Session) -> list[tuple[str, datetime]]:
    """The end of the newest successful run of each job."""
    rows = session.execute(select(Run.kind, func.max(Run.finished_at)).where(Run.status == runs.OK).group_by(Run.kind))
    return [(str(kind), finished) for kind, finished in rows if finished is not None]


def idle_keys(session: Session, snapshot_id: int) -> int:
    """Keys with no new use for 30 days or more at a snapshot, from the sync's own roll-up counts."""
    table = SnapshotRollup.__table__
    return int(session.scalar(select(func.sum(table.c.idle_30d)).where(table.c.snapshot_id == snapshot_id)) or 0)


def spend_since(session: Session, since: datetime) -> Decimal:
    """Spend (credits and BYOK) since ``since``, as ``report spend`` counts it, summed exactly in SQL:
    the steps of the snapshots taken after it, and what keys created after it had spent when
    first seen."""
    table = SnapshotRollup.__table__
    spent = type_coerce(func.sum(table.c.usage + table.c.byok_usage), Money())
    steps = session.scalar(select(spent).where(table.c.taken_at > since)) or Decimal(0)
    days = KeyDay.__table__
    first = type_coerce(func.sum(days.c.first_usage + days.c.first_byok_usage), Money())
    return steps + (session.scalar(select(first).where(*first_sight_in(since, None))) or Decimal(0))
