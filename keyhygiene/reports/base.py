"""What every report is: typed parameters in, columns and rows out."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from fnmatch import fnmatchcase
from typing import Any

from sqlalchemy.orm import Session

from db import snapshots
from db.models import Snapshot
from keyhygiene.errors import EXIT_FAILURE, EXIT_USAGE
from keyhygiene.rules import RuleSet
from keyhygiene.timeutil import isoformat

NO_SNAPSHOT = "there is no complete snapshot yet: run `keyhygiene sync` first"


class ReportError(ValueError):
    """A report that cannot be made from what is stored (no snapshot yet, --at too early...).

    ``exit_code`` is the interface's: 1 when the store cannot answer, 2 when the request itself is
    wrong (an --at in the future).
    """

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True, slots=True)
class ReportParams:
    """The options of ``keyhygiene report``.

    ``by`` groups the spend report: ``key`` (default), ``workspace``, ``day`` or ``owner``; and the idle
    report: ``key`` or ``owner``.
    """

    now: datetime
    since: timedelta | None = None
    at: datetime | None = None
    workspaces: tuple[str, ...] = ()
    name: str | None = None
    ruleset: RuleSet | None = None
    by: str = "key"
    fmt: str = "table"
    limit: int = 0
    """The table's ``--limit`` (0: every row): a long log reads only the rows a table shows."""

    def wants(self, *, name: str, workspace_id: str | None) -> bool:
        """Whether a key passes the --workspace and --name filters."""
        if self.workspaces and workspace_id not in self.workspaces:
            return False
        return self.name is None or fnmatchcase(name, self.name)

    @property
    def as_of(self) -> datetime:
        """The end of what the report covers: --at, or now."""
        return self.at or self.now

    def period_start(self, default: timedelta) -> datetime:
        return self.as_of - (default if self.since is None else self.since)


@dataclass(frozen=True, slots=True)
class Report:
    """Columns in display order and one dict per row (JSON-able values).

    The rest only shapes the terminal table: the narrower column set, shorter headers, and shorter
    times (``strftime`` formats by column; others show as ``YYYY-MM-DD HH:MM``).
    """

    title: str
    columns: Sequence[str]
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    table_columns: Sequence[str] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    time_formats: Mapping[str, str] = field(default_factory=dict)
    chronological: bool = False
    """Rows oldest first, as a log: a table cut short by ``--limit`` keeps the newest rows."""
    total: int | None = None
    """How many rows the report has in all, when ``rows`` holds only the newest of them (a log
    read for a table cut short by ``--limit``)."""
    stream: Iterator[dict[str, Any]] | None = None
    """The rows, when the report is written as they are read (JSON or CSV of a long log): ``rows``
    is then empty."""

    def each_row(self) -> Iterator[dict[str, Any]]:
        return self.stream if self.stream is not None else iter(self.rows)


ReportBuilder = Callable[[Session, ReportParams], Report]


def with_workspace_names(report: Report, names: Mapping[str, str]) -> Report:
    """The report with a ``workspace`` column (the workspace's name, from ``names``: id → name)
    right after its ``workspace_id`` column; a report without one is returned as it is."""
    if "workspace_id" not in report.columns or "workspace" in report.columns:
        return report
    columns: list[str] = []
    for column in report.columns:
        columns.append(column)
        if column == "workspace_id":
            columns.append("workspace")

    def name(row: dict[str, Any]) -> dict[str, Any]:
        named: dict[str, Any] = {}
        for column, value in row.items():
            named[column] = value
            if column == "workspace_id":
                named["workspace"] = names.get(value) if isinstance(value, str) else None
        return named

    rows = [name(row) for row in report.rows]
    stream = None if report.stream is None else (name(row) for row in report.stream)
    table_columns = report.table_columns
    if table_columns is not None and "workspace_id" in table_columns:
        table_columns = [column for column in columns if column in table_columns or column == "workspace"]
    elif table_columns is not None and "workspace" not in table_columns:
        # A per-key table names the key's workspace beside the key's name: a name may be in several.
        named_by = next((column for column in ("name", "key_name") if column in table_columns), None)
        if named_by is not None:
            at = list(table_columns).index(named_by) + 1
            table_columns = [*table_columns[:at], "workspace", *table_columns[at:]]
    # Both columns would otherwise read "workspace" in a table (spend --by workspace heads its id so).
    headers = {**report.headers, "workspace_id": "workspace id"}
    return replace(report, columns=columns, rows=rows, table_columns=table_columns, headers=headers, stream=stream)


def check_at(params: ReportParams) -> None:
    """Refuse an --at later than now: a report covers what was stored, not the future."""
    if params.at is not None and params.at > params.now:
        raise ReportError(f"--at {isoformat(params.at)} is in the future (now is {isoformat(params.now)})", EXIT_USAGE)


def snapshot_for(session: Session, params: ReportParams) -> Snapshot:
    """The newest complete snapshot at or before --at (or the newest of all), or a ReportError saying why not."""
    check_at(params)
    snapshot = snapshots.latest_snapshot(session, at=params.at)
    if snapshot is None:
        first = snapshots.first_snapshot(session)
        if first is None:
            raise ReportError(NO_SNAPSHOT)
        pruned = " (older ones were pruned: KEYHYGIENE_RETENTION)" if snapshots.pruned_before(session, first.id) else ""
        raise ReportError(
            f"--at {isoformat(params.at)} is before the first stored snapshot ({isoformat(first.taken_at)}){pruned}"
        )
    return snapshot


def day_start(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=UTC)


def usd(value: float) -> float:
    """Money as reports print it: rounded to the micro-dollar, so float noise never shows."""
    rounded = round(value, 6)
    return 0.0 if rounded == 0 else rounded


def tally(rows: Sequence[Mapping[str, Any]], column: str) -> str:
    """How many rows hold each value of ``column``, for a title: "2 done, 1 skipped" ("" for none)."""
    return counts_text(tally_counts(rows, column))


def counts_text(counts: Mapping[str, int]) -> str:
    """Counts by value, for a title: "2 done, 1 skipped" ("" for none)."""
    return ", ".join(f"{count} {value}" for value, count in sorted(counts.items()))


def tally_counts(rows: Sequence[Mapping[str, Any]], column: str) -> dict[str, int]:
    """How many rows hold each value of ``column``."""
    counts: dict[str, int] = {}
    for row in rows:
        value = str(row[column])
        counts[value] = counts.get(value, 0) + 1
    return counts
