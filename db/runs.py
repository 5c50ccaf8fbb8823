"""Run records: one row per job, whatever started it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from .models import Run

RUNNING = "running"
COMPLETE = "complete"
FAILED = "failed"
REFUSED = "refused"
SKIPPED = "skipped"
ABORTED = "aborted"
FINAL_STATUSES = (COMPLETE, FAILED, REFUSED, SKIPPED, ABORTED)


def start_run(
    session: Session,
    *,
    kind: str,
    now: datetime,
    trigger: str = "cli",
    task_id: str | None = None,
    dry_run: bool | None = None,
) -> Run:
    """Record that a job has started. The caller commits."""
    run = Run(kind=kind, status=RUNNING, started_at=now, trigger=trigger, task_id=task_id, dry_run=dry_run)
    session.add(run)
    session.flush()
    return run


def finish_run(
    session: Session,
    run_id: int,
    *,
    status: str,
    now: datetime,
    error: str | None = None,
    summary: dict[str, Any] | None = None,
    dry_run: bool | None = None,
) -> None:
    """Record how a job ended. The caller commits."""
    values: dict[str, Any] = {"status": status, "finished_at": now, "error": error}
    if summary is not None:
        values["summary"] = summary
    if dry_run is not None:
        values["dry_run"] = dry_run
    session.execute(update(Run).where(Run.id == run_id).values(**values))


def record_skipped_run(
    session: Session, *, kind: str, now: datetime, reason: str, trigger: str, task_id: str | None
) -> Run:
    """Record a job that did not start because another one held the lock."""
    run = Run(
        kind=kind,
        status=SKIPPED,
        started_at=now,
        finished_at=now,
        trigger=trigger,
        task_id=task_id,
        error=reason,
    )
    session.add(run)
    session.flush()
    return run


def get_run(session: Session, run_id: int) -> Run | None:
    return session.get(Run, run_id)


def run_for_task(session: Session, task_id: str) -> Run | None:
    """The newest run recorded for a Celery task id."""
    return session.scalars(select(Run).where(Run.task_id == task_id).order_by(Run.id.desc()).limit(1)).first()


def abandon_stale_runs(session: Session, *, now: datetime, older_than: datetime) -> int:
    """Mark runs still 'running' since before ``older_than`` as aborted (their process died)."""
    result = session.execute(
        update(Run)
        .where(Run.status == RUNNING, Run.started_at < older_than)
        .values(status=ABORTED, finished_at=now, error="the process running this job stopped before it ended")
    )
    return int(getattr(result, "rowcount", 0) or 0)
