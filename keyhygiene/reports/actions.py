"""``report actions``: the audit log over a period: what was planned or done to which key, by which
rule, on what evidence, and how it ended.

Dry runs and refusals store their plan once and refer to it from each run (``db.audit``); they are
read back here key by key, each with its day counts measured at that run's time."""

from __future__ import annotations

from collections import Counter
from collections.abc import Generator, Iterator
from contextlib import closing
from datetime import date, timedelta
from typing import Any

from sqlalchemy.orm import Session

from db import audit, snapshots
from keyhygiene.rules import evidence_at

from .base import NO_SNAPSHOT, Report, ReportError, ReportParams, check_at, counts_text, tally_counts

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
TABLE_COLUMNS = ["time", "key_name", "rule", "action", "dry_run", "outcome"]


def build(session: Session, params: ReportParams) -> Report:
    # The audit log outlives the snapshots (a prune keeps it by default): any --at up to now is
    # answered from it, before the first snapshot kept too; only an empty store is refused.
    check_at(params)
    if snapshots.first_snapshot(session) is None:
        raise ReportError(NO_SNAPSHOT)
    end = params.as_of
    start = params.period_start(DEFAULT_PERIOD)
    # A month of hourly dry runs of a few thousand keys is millions of records: JSON and CSV are
    # written as they are read, and a table cut short reads only its newest rows and counts the rest.
    stream = None
    total: int | None = None
    if params.fmt in ("json", "csv"):
        rows: list[dict[str, Any]] = []
        stream = records(session, params)
        counts: dict[str, int] = {}
    elif params.limit > 0:
        rows = newest(session, params, params.limit)
        counts = _counts(session, params)
        total = sum(counts.values())
    else:
        rows = list(records(session, params))
        counts = tally_counts(rows, "outcome")
    counted = counts_text(counts)
    in_all = len(rows) if total is None else total
    title = f"Audit log, {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC: {in_all} records"
    return Report(
        title=title + (f" ({counted})" if counted else ""),
        columns=COLUMNS,
        rows=rows,
        table_columns=TABLE_COLUMNS,
        chronological=True,
        headers={"key_name": "key", "dry_run": "dry"},
        time_formats={"time": "%m-%d %H:%M"},
        total=total,
        stream=stream,
    )


def newest(session: Session, params: ReportParams, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` rows of the report, oldest first: read newest first, and no further."""
    kept: list[dict[str, Any]] = []
    with closing(records(session, params, newest_first=True)) as rows:
        for row in rows:
            kept.append(row)
            if len(kept) == limit:
                break
    kept.reverse()
    return kept


def _counts(session: Session, params: ReportParams) -> dict[str, int]:
    """How many rows of the report have each outcome (``counts_per_day``, summed)."""
    counts: dict[str, int] = {}
    for (_, outcome), records in counts_per_day(session, params).items():
        counts[outcome] = counts.get(outcome, 0) + records
    return counts


def counts_per_day(session: Session, params: ReportParams) -> Counter[tuple[date, str]]:
    """How many rows of the report fall on each UTC day with each outcome: counted without reading
    the records' JSON, and stored plans without expanding them (unless --name or --workspace asks
    for their keys: then only the records of keys that may match are read, ``audit.KeyFilter``)."""
    start, end = params.period_start(DEFAULT_PERIOD), params.as_of
    counts: Counter[tuple[date, str]] = Counter()
    if params.name is None and not params.workspaces:
        for time, outcome, records in audit.outcome_times(session, since=start, until=end):
            counts[(time.date(), outcome)] += records
        return counts
    keys = audit.KeyFilter(params.workspaces, params.name)
    for time, outcome, key_name, workspace_id in audit.outcomes_by_key(session, since=start, until=end, keys=keys):
        if params.wants(name=key_name, workspace_id=workspace_id):
            counts[(time.date(), outcome)] += 1
    return counts


def records(
    session: Session, params: ReportParams, *, newest_first: bool = False
) -> Generator[dict[str, Any], None, None]:
    """The rows of the report, oldest first (or newest first), streamed (a month of hourly dry runs
    of many keys is millions: a reader that only counts them need not hold them)."""
    end = params.as_of
    start = params.period_start(DEFAULT_PERIOD)
    keys = audit.KeyFilter(params.workspaces, params.name)
    with closing(audit.audit_records(session, since=start, until=end, newest_first=newest_first, keys=keys)) as log:
        yield from _rows(log, params)


def _rows(log: Iterator[audit.AuditRecord], params: ReportParams) -> Iterator[dict[str, Any]]:
    for action in log:
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
