"""What the Prometheus metrics read, as SQL aggregates over the runs, the audit log and the newest snapshot."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from . import runs, snapshots
from .models import Action, KeyState, PlanEntry, Run, RunPlan


def keys_by_workspace_and_state(session: Session, snapshot_id: int, *, at: datetime) -> list[tuple[str, str, int]]:
    """(workspace id, state, keys) at a snapshot.

    A key's state is ``expired`` (at ``at``), else ``disabled``, else ``active``.
    """
    state = case(
        (KeyState.expires_at.is_not(None) & (KeyState.expires_at <= at), "expired"),
        (KeyState.disabled.is_(True), "disabled"),
        else_="active",
    ).label("state")
    workspace = func.coalesce(KeyState.workspace_id, "default").label("workspace")
    rows = session.execute(
        select(workspace, state, func.count())
        .where(snapshots._alive_at(session, snapshot_id))
        .group_by(workspace, state)
        .order_by(workspace, state)
    )
    return [(str(ws), str(st), int(count)) for ws, st, count in rows]


def runs_by_job_and_status(session: Session) -> list[tuple[str, str, int]]:
    rows = session.execute(select(Run.kind, Run.status, func.count()).group_by(Run.kind, Run.status))
    return [(str(kind), str(status), int(count)) for kind, status, count in rows]


def actions_by_action_and_outcome(session: Session) -> list[tuple[str, str, bool, int]]:
    """The audit log counted as ``report actions`` lists it: the ``actions`` rows, and each stored
    plan's entries once for every run that refers to it (dry runs and refusals)."""
    counts: dict[tuple[str, str, bool], int] = {}
    direct = select(Action.action, Action.outcome, Action.dry_run, func.count()).group_by(
        Action.action, Action.outcome, Action.dry_run
    )
    referenced = (
        select(PlanEntry.action, RunPlan.outcome, RunPlan.dry_run, func.count())
        .join(RunPlan, RunPlan.plan_id == PlanEntry.plan_id)
        .group_by(PlanEntry.action, RunPlan.outcome, RunPlan.dry_run)
    )
    for query in (direct, referenced):
        for action, outcome, dry_run, count in session.execute(query):
            key = (str(action), str(outcome), bool(dry_run))
            counts[key] = counts.get(key, 0) + int(count)
    return [(action, outcome, dry_run, count) for (action, outcome, dry_run), count in sorted(counts.items())]


def last_success_by_job(session: Session) -> list[tuple[str, datetime]]:
    """The end of the newest successful run of each job."""
    rows = session.execute(select(Run.kind, func.max(Run.finished_at)).where(Run.status == runs.OK).group_by(Run.kind))
    return [(str(kind), finished) for kind, finished in rows if finished is not None]
