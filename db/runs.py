"""Run records: one row per job, whatever started it, carrying the job's own outcome."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from .models import Run

RUNNING = "running"
OK = "ok"
FAILED = "failed"
REFUSED = "refused"
SKIPPED = "skipped"
ABORTED = "aborted"
FINAL_STATUSES = (OK, FAILED, REFUSED, SKIPPED, ABORTED)

# The jobs the worker runs (its Celery tasks, beat's and `trigger`'s): the ones whose runs say
# whether the hygiene is working. `undo` and `enable` are run by hand, from the command line only.
WORKER_JOBS = ("run", "sync", "enforce", "prune")

# Who started a run: the beat schedule, `keyhygiene trigger`, or a command run inline.
BEAT = "beat"
TRIGGER = "trigger"
CLI = "cli"
STARTERS = (BEAT, TRIGGER, CLI)

ABANDONED = "the process running this job stopped before it ended"


def start_run(
    session: Session,
    *,
    kind: str,
    now: datetime,
    started_by: str = CLI,
    task_id: str | None = None,
    dry_run: bool | None = None,
    allow_actions: int | None = None,
    summary: dict[str, Any] | None = None,
) -> Run:
    """Record that a job has started (``summary``: what is known of it already). The caller commits."""
    run = Run(
        kind=kind,
        status=RUNNING,
        started_at=now,
        started_by=started_by,
        task_id=task_id,
        dry_run=dry_run,
        allow_actions=allow_actions,
        summary=summary,
    )
    session.add(run)
    session.flush()
    return run


def finish_run(
    session: Session,
    run_id: int,
    *,
    status: str,
    now: datetime,
    exit_code: int,
    message: str,
    summary: dict[str, Any] | None = None,
    dry_run: bool | None = None,
) -> None:
    """Record how a job ended: its status, exit code and message. The caller commits."""
    values: dict[str, Any] = {"status": status, "finished_at": now, "exit_code": exit_code, "message": message}
    if summary is not None:
        values["summary"] = summary
    if dry_run is not None:
        values["dry_run"] = dry_run
    session.execute(update(Run).where(Run.id == run_id).values(**values))


def record_ended_run(
    session: Session,
    *,
    kind: str,
    now: datetime,
    status: str,
    exit_code: int,
    message: str,
    started_by: str,
    task_id: str | None,
    allow_actions: int | None = None,
) -> Run:
    """Record a job that ended before it could start (another job held the lock, the rules file is
    invalid, ...). The caller commits."""
    run = start_run(session, kind=kind, now=now, started_by=started_by, task_id=task_id, allow_actions=allow_actions)
    finish_run(session, run.id, status=status, now=now, exit_code=exit_code, message=message)
    return run


def get_run(session: Session, run_id: int) -> Run | None:
    return session.get(Run, run_id)


def run_for_task(session: Session, task_id: str) -> Run | None:
    """The run recorded for a Celery task id: the newest one that is not ``skipped``, else the
    newest. The broker may deliver a message again while its first delivery still runs (a worker
    cut off from Redis for longer than the job lock's lease); the copy is then recorded skipped
    beside the run that does the work, and that run is the task's answer."""
    skipped_last = case((Run.status == SKIPPED, 1), else_=0)
    query = select(Run).where(Run.task_id == task_id).order_by(skipped_last, Run.id.desc()).limit(1)
    return session.scalars(query).first()


def allowances(session: Session, run_ids: Sequence[int]) -> dict[int, int | None]:
    """Each run's ``--allow-actions`` (None: none), by id."""
    if not run_ids:
        return {}
    rows = session.execute(select(Run.id, Run.allow_actions).where(Run.id.in_(sorted(set(run_ids)))))
    return {run_id: allow for run_id, allow in rows}


def newest_runs(session: Session) -> list[Run]:
    """The newest run of each job kind, by kind."""
    newest = select(func.max(Run.id)).group_by(Run.kind).scalar_subquery()
    return list(session.scalars(select(Run).where(Run.id.in_(newest)).order_by(Run.kind)))


def newest_finished_run(
    session: Session, *, ignore: Sequence[str] = (), kinds: Sequence[str] | None = None, live: bool = False
) -> Run | None:
    """The newest run that has ended, leaving out the statuses in ``ignore`` (and, with ``kinds``,
    runs of any other job; with ``live``, dry runs)."""
    found = newest_finished_runs(session, ignore=ignore, kinds=kinds, live=live, limit=1)
    return found[0] if found else None


def newest_finished_runs(
    session: Session,
    *,
    ignore: Sequence[str] = (),
    kinds: Sequence[str] | None = None,
    live: bool = False,
    limit: int,
) -> list[Run]:
    """The ``limit`` newest runs that have ended, newest first, as ``newest_finished_run`` chooses."""
    statuses = [status for status in FINAL_STATUSES if status not in ignore]
    query = select(Run).where(Run.status.in_(statuses))
    if kinds is not None:
        query = query.where(Run.kind.in_(list(kinds)))
    if live:
        query = query.where(Run.dry_run.is_not(True))
    return list(session.scalars(query.order_by(Run.id.desc()).limit(limit)))


def runs_between(session: Session, *, since: datetime, until: datetime) -> Iterator[Run]:
    """Runs started in ``(since, until]`` (as every report counts a period), oldest first, streamed."""
    query = select(Run).where(Run.started_at > since, Run.started_at <= until).order_by(Run.started_at, Run.id)
    yield from session.scalars(query.execution_options(yield_per=500))


def abandon_stale_runs(session: Session, *, now: datetime, older_than: datetime, exit_code: int) -> int:
    """Mark runs still 'running' whose last sign of life (their heartbeat, else their start) is
    older than ``older_than`` as aborted: their process died."""
    result = session.execute(
        update(Run)
        .where(Run.status == RUNNING, func.coalesce(Run.heartbeat_at, Run.started_at) < older_than)
        .values(status=ABORTED, finished_at=now, exit_code=exit_code, message=ABANDONED)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def heartbeat(session: Session, run_id: int, *, now: datetime) -> bool:
    """Record that run ``run_id`` is alive; False when it is no longer running."""
    result = session.execute(update(Run).where(Run.id == run_id, Run.status == RUNNING).values(heartbeat_at=now))
    return bool(getattr(result, "rowcount", 0))
