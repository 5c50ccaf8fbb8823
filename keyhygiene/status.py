"""``keyhygiene status``: is the periodic hygiene working? Read from the runs and snapshots alone.

Healthy means: the newest run of the periodic jobs that ended succeeded (a run skipped because
another job held the lock says nothing either way, so it is passed over, and an operator's
``undo`` or ``enable`` is no sign of the schedule working or not), so did the newest periodic
``run`` (an operator's dry run passed over), and the newest complete snapshot is younger
than twice the schedule's interval: the one it is in now (``schedule.current_period``: the longer
of the gap between its last two firings and the gap to its next), so that a schedule of working
hours is not stale every night and weekend. Anything else is a problem, named in words.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from db import runs, snapshots
from db.models import Run

from .reports.runs import run_row
from .schedule import current_period, next_run
from .timeutil import isoformat


@dataclass(frozen=True, slots=True)
class Status:
    """The newest run of each job, the newest snapshot, the schedule, and what is wrong."""

    now: datetime
    schedule: str
    next_run: datetime
    stale_after: timedelta
    runs: list[dict[str, Any]]
    snapshot: dict[str, Any] | None
    problems: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        return {
            "healthy": self.healthy,
            "problems": self.problems,
            "now": isoformat(self.now),
            "schedule": self.schedule,
            "next_run": isoformat(self.next_run),
            "stale_after_seconds": int(self.stale_after.total_seconds()),
            "snapshot": self.snapshot,
            "runs": [{k: isoformat(v) if isinstance(v, datetime) else v for k, v in row.items()} for row in self.runs],
        }


def _outcome(run: Run) -> str:
    """``status: message``, the message without the status it may begin with itself ("aborted: the
    job reached its time limit")."""
    message = run.message or "-"
    return f"{run.status}: {message.removeprefix(f'{run.status}: ')}"


def read_status(session: Session, *, schedule: str, now: datetime) -> Status:
    """The status as of ``now``, for the periodic run on cron expression ``schedule``."""
    stale_after = 2 * current_period(schedule, now=now)
    problems: list[str] = []

    last = runs.newest_finished_run(session, ignore=(runs.SKIPPED,), kinds=runs.WORKER_JOBS)
    if last is None:
        problems.append("no run has ended yet")
    elif last.status != runs.OK:
        problems.append(f"the newest run ({last.id}, {last.kind}) ended {_outcome(last)}")
    # The periodic job itself: a good prune, sync or dry run after it does not make up for it.
    periodic = _newest_periodic_run(session)
    if periodic is not None and periodic.status != runs.OK and (last is None or periodic.id != last.id):
        problems.append(f"the newest periodic run ({periodic.id}) ended {_outcome(periodic)}")

    snapshot = snapshots.latest_snapshot(session)
    snapshot_info: dict[str, Any] | None = None
    if snapshot is None or snapshot.taken_at is None:
        problems.append("there is no complete snapshot yet")
    else:
        age = now - snapshot.taken_at
        snapshot_info = {
            "snapshot_id": snapshot.id,
            "taken_at": isoformat(snapshot.taken_at),
            "age_seconds": int(age.total_seconds()),
            "keys": snapshot.key_count,
        }
        if age > stale_after:
            problems.append(
                f"the newest snapshot is {_ago(age)} old, more than twice the schedule's interval ({_ago(stale_after)})"
            )

    return Status(
        now=now,
        schedule=schedule,
        next_run=next_run(schedule, after=now),
        stale_after=stale_after,
        runs=[run_row(run) for run in runs.newest_runs(session)],
        snapshot=snapshot_info,
        problems=problems,
    )


_RUNS_READ = 200
"""Periodic runs read at most, newest first, to find the schedule's newest past an operator's dry runs."""


def _newest_periodic_run(session: Session) -> Run | None:
    """The newest ``run`` that ended, passing over an operator's dry runs: they change nothing, and
    do not make up for the run of the schedule before them. The schedule's dry runs count. Past
    ``_RUNS_READ`` of an operator's dry runs, the newest live run; with none, the newest run."""
    newest = None
    for run in runs.newest_finished_runs(session, ignore=(runs.SKIPPED,), kinds=("run",), limit=_RUNS_READ):
        newest = newest or run
        if not run.dry_run or _the_schedules(run):
            return run
    return runs.newest_finished_run(session, ignore=(runs.SKIPPED,), kinds=("run",), live=True) or newest


def _the_schedules(run: Run) -> bool:
    """Whether a dry run stands for the schedule's: beat started it, or the rules file made it dry
    (``dry_run_by_rules`` in its summary from its start, whatever its end: then every run was dry, a
    cron job's too). A dry run without that (an operator's --dry-run, or one recorded before
    keyhygiene noted it) does not."""
    return run.started_by == runs.BEAT or (run.summary or {}).get("dry_run_by_rules") is True


def _ago(age: timedelta) -> str:
    seconds = int(age.total_seconds())
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 2 * 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"


def describe_snapshot(status: Status) -> str:
    if status.snapshot is None:
        return "newest complete snapshot: none yet (run `keyhygiene sync`)"
    age = timedelta(seconds=status.snapshot["age_seconds"])
    return (
        f"newest complete snapshot: {status.snapshot['snapshot_id']} taken {status.snapshot['taken_at']} "
        f"({_ago(age)} ago), {status.snapshot['keys']} keys"
    )
