"""``report actions``: the audit log over a period: what was planned or done to which key, by which
rule, on what evidence, and how it ended.

Dry runs and refusals store their plan once and refer to it from each run (``db.audit``); they are
read back here key by key, each with its day counts measured at that run's time."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session

from db import audit, snapshots
from keyhygiene.rules import evidence_at

from .base import NO_SNAPSHOT, Report, ReportError, ReportParams, check_at, tally

DEFAULT_PERIOD = timedelta(days=30)

COLUMNS = [
    "time",
    "run_id",
    "key_hash",
    "key_name",
    "workspace_id",
    "rule",
    "rules",
    "action",
    "dry_run",
    "outcome",
    "reason",
    "error",
    "evidence",
]
TABLE_COLUMNS = ["time", "key_name", "rule", "action", "outcome"]  # dry runs are the `planned` ones


def build(session: Session, params: ReportParams) -> Report:
    # The audit log outlives the snapshots (a prune keeps it by default): any --at up to now is
    # answered from it, before the first snapshot kept too; only an empty store is refused.
    check_at(params)
    if snapshots.first_snapshot(session) is None:
        raise ReportError(NO_SNAPSHOT)
    end = params.as_of
    start = params.period_start(DEFAULT_PERIOD)
    rows = list(records(session, params))
    counted = tally(rows, "outcome")
    title = f"Audit log, {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC: {len(rows)} records"
    return Report(
        title=title + (f" ({counted})" if counted else ""),
        columns=COLUMNS,
        rows=rows,
        table_columns=TABLE_COLUMNS,
        chronological=True,
        headers={"key_name": "key", "dry_run": "dry"},
        time_formats={"time": "%m-%d %H:%M"},
    )


def records(session: Session, params: ReportParams) -> Iterator[dict[str, Any]]:
    """The rows of the report, oldest first, streamed (a month of hourly dry runs of many keys is
    millions: a reader that only counts them need not hold them)."""
    end = params.as_of
    start = params.period_start(DEFAULT_PERIOD)
    for action in audit.audit_records(session, since=start, until=end):
        if not params.wants(name=action.key_name, workspace_id=action.workspace_id):
            continue
        evidence = evidence_at(action.evidence, action.time) if action.by_reference else action.evidence
        yield {
            "time": action.time,
            "run_id": action.run_id,
            "key_hash": action.key_hash,
            "key_name": action.key_name,
            "workspace_id": action.workspace_id,
            "rule": action.rule,
            "rules": list(action.rules),
            "action": action.action,
            "dry_run": action.dry_run,
            "outcome": action.outcome,
            "reason": action.reason,
            "error": action.error,
            "evidence": evidence,
        }
