"""``report runs``: one row per job run over a period: what ran, who started it, how it ended.

Every value comes from the run's own record (see keyhygiene.jobs): the status, exit code and
message are the ones the job's command reported, so a task id printed by ``trigger`` is found here.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session

from db import runs
from db.models import Run

from .base import Report, ReportParams, check_at, tally

DEFAULT_PERIOD = timedelta(days=7)

COUNTS = ["keys", "planned", "done", "skipped", "failed"]
COLUMNS = [
    "run_id",
    "job",
    "started_at",
    "finished_at",
    "status",
    "dry_run",
    "started_by",
    "allow_actions",
    *COUNTS,
    "exit_code",
    "message",
    "task_id",
]
TABLE_COLUMNS = ["run_id", "job", "started_at", "status", "started_by", "done", "exit_code", "message"]
HEADERS = {"run_id": "run", "started_at": "started", "started_by": "by", "exit_code": "exit"}


def counts(summary: dict[str, Any] | None) -> dict[str, Any]:
    """The counts of a run's summary: keys seen, changes planned, done, skipped and failed."""
    summary = summary or {}
    nested = summary.get("sync")
    sync: dict[str, Any] = nested if isinstance(nested, dict) else {}
    return {
        "keys": summary.get("keys", sync.get("keys")),
        "planned": summary.get("planned_changes"),
        "done": summary.get("done"),
        "skipped": summary.get("skipped"),
        "failed": summary.get("failed"),
    }


def run_row(run: Run) -> dict[str, Any]:
    """One run as a report row."""
    return {
        "run_id": run.id,
        "job": run.kind,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "status": run.status,
        "dry_run": run.dry_run,
        "started_by": run.started_by,
        "allow_actions": run.allow_actions,
        **counts(run.summary),
        "exit_code": run.exit_code,
        "message": run.message,
        "task_id": run.task_id,
    }


def build(session: Session, params: ReportParams) -> Report:
    check_at(params)
    end = params.as_of
    start = params.period_start(DEFAULT_PERIOD)
    rows = [run_row(run) for run in runs.runs_between(session, since=start, until=end)]
    counted = tally(rows, "status")
    title = f"Runs, {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC: {len(rows)}"
    return Report(
        title=title + (f" ({counted})" if counted else ""),
        columns=COLUMNS,
        rows=rows,
        table_columns=TABLE_COLUMNS,
        chronological=True,
        headers=HEADERS,
        time_formats={"started_at": "%m-%d %H:%M", "finished_at": "%m-%d %H:%M"},
    )
