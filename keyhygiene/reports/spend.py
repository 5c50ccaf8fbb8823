"""``report spend``: what each key spent over a period, from the change of its lifetime counters.

How spend is counted (``usage`` and ``byok_usage`` are lifetime counters, in USD):

- The period is ``(start, end]`` with ``end`` = --at or now and ``start`` = end - --since (30d).
- A key's spend is the sum, over consecutive stored observations of it, of how much each counter
  grew. Each step counts in the period when its later snapshot was taken inside the period, and
  on the UTC day of that later snapshot (a gap between snapshots lands on the day the sync saw it).
- The baseline is the key as the last snapshot at or before ``start`` saw it.
- A key created inside the period (``created_at`` after ``start``) counts from zero at creation:
  its first observation's counters are all spend of the period.
- A key created before the period but first seen inside it (history begins inside the period,
  or it was missing from the snapshot at the start) counts from its first observation: what it
  spent before that is unknown and is not guessed. Such rows say ``baseline_known: false``.
- A deleted key counts up to its last observation; what it spent between that sync and its
  deletion is unknown.
- A counter that goes down (a reset, an API correction) counts zero for that step, never negative;
  growth after it counts again from the lower value.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from db import history, snapshots

from .base import Report, ReportError, ReportParams, check_at, snapshot_for, usd

DEFAULT_PERIOD = timedelta(days=30)
GROUPINGS = ("key", "workspace", "day")

KEY_COLUMNS = [
    "key_hash",
    "name",
    "workspace_id",
    "usage",
    "byok_usage",
    "total",
    "created_in_period",
    "deleted_in_period",
    "baseline_known",
    "counted_from",
]
WORKSPACE_COLUMNS = ["workspace_id", "keys", "usage", "byok_usage", "total"]
DAY_COLUMNS = ["day", "keys", "usage", "byok_usage", "total"]


@dataclass
class KeySpend:
    """One key's spend over the period."""

    key_hash: str
    name: str
    workspace_id: str | None
    counted_from: datetime
    created_in_period: bool = False
    deleted_in_period: bool = False
    baseline_known: bool = True
    usage: float = 0.0
    byok_usage: float = 0.0
    by_day: dict[date, list[float]] = field(default_factory=dict)
    """Per UTC day: [usage, byok_usage] spent that day."""

    @property
    def total(self) -> float:
        return self.usage + self.byok_usage


@dataclass
class SpendFigures:
    """The spend of every key (that passes the filters) over ``(start, end]``."""

    start: datetime
    end: datetime
    keys: dict[str, KeySpend]
    days: list[date]
    """The UTC days with a complete snapshot inside the period, oldest first."""

    def day_totals(self) -> dict[date, tuple[float, float, int]]:
        """Per day: (usage, byok_usage, keys that spent)."""
        totals: dict[date, list[float]] = {day: [0.0, 0.0, 0.0] for day in self.days}
        for spend in self.keys.values():
            for day, (credit, byok) in spend.by_day.items():
                entry = totals.setdefault(day, [0.0, 0.0, 0.0])
                entry[0] += credit
                entry[1] += byok
                entry[2] += 1 if credit + byok > 0 else 0
        return {day: (entry[0], entry[1], int(entry[2])) for day, entry in sorted(totals.items())}

    @property
    def total(self) -> float:
        return sum(spend.total for spend in self.keys.values())


def compute_spend(session: Session, params: ReportParams, *, default: timedelta = DEFAULT_PERIOD) -> SpendFigures:
    """Spend per key and per day over the report's period; a ReportError when nothing covers it."""
    end_snapshot = snapshot_for(session, params)
    end = params.as_of
    start = params.period_start(default)
    baseline = snapshots.latest_snapshot(session, at=start)
    after_id = baseline.id if baseline is not None else 0
    versions = history.usage_versions(session, after_snapshot=after_id, until_snapshot=end_snapshot.id)

    by_key: dict[str, list[history.UsageVersion]] = defaultdict(list)
    for version in versions:
        by_key[version.key_hash].append(version)

    keys: dict[str, KeySpend] = {}
    for key_hash, key_versions in by_key.items():
        latest = key_versions[-1]
        if not params.wants(name=latest.name, workspace_id=latest.workspace_id):
            continue
        keys[key_hash] = _key_spend(
            key_versions,
            after_id=after_id,
            end_id=end_snapshot.id,
            start=start,
            baseline_at=baseline.taken_at if baseline is not None and baseline.taken_at is not None else start,
        )

    days = sorted(
        {
            snapshot.taken_at.date()
            for snapshot in snapshots.complete_snapshots(session, since=start, until=end)
            if snapshot.taken_at is not None and snapshot.taken_at > start
        }
    )
    return SpendFigures(start=start, end=end, keys=keys, days=days)


def _key_spend(
    versions: list[history.UsageVersion], *, after_id: int, end_id: int, start: datetime, baseline_at: datetime
) -> KeySpend:
    """One key's spend; ``counted_from`` is the observation (or creation) its spend is counted from."""
    latest = versions[-1]
    previous: history.UsageVersion | None = None
    spend: KeySpend | None = None
    for version in versions:
        if version.valid_from <= after_id:
            previous = version  # the baseline: as the snapshot at the start of the period saw it
            continue
        if spend is None:
            spend = KeySpend(latest.key_hash, latest.name, latest.workspace_id, counted_from=baseline_at)
        if previous is None:
            if version.created_at > start:
                credit, byok = float(version.usage), float(version.byok_usage)
                spend.created_in_period = True
                spend.counted_from = version.created_at
            else:
                credit = byok = 0.0
                spend.baseline_known = False
                spend.counted_from = version.seen_at
        else:
            # Differences of exact stored amounts (Decimal), so each delta is exact to the micro-dollar.
            credit = max(0.0, float(version.usage - previous.usage))
            byok = max(0.0, float(version.byok_usage - previous.byok_usage))
        previous = version
        if credit or byok:
            entry = spend.by_day.setdefault(version.seen_at.date(), [0.0, 0.0])
            entry[0] += credit
            entry[1] += byok
            spend.usage += credit
            spend.byok_usage += byok
    if spend is None:
        # Alive at the start and unchanged since: no spend, but it still existed in the period.
        spend = KeySpend(latest.key_hash, latest.name, latest.workspace_id, counted_from=baseline_at)
    spend.deleted_in_period = latest.valid_to is not None and latest.valid_to <= end_id
    return spend


def build(session: Session, params: ReportParams) -> Report:
    check_at(params)
    if params.by not in GROUPINGS:
        raise ReportError(f"--by must be one of {', '.join(GROUPINGS)}, not {params.by!r}")
    figures = compute_spend(session, params)
    period = f"{figures.start:%Y-%m-%d %H:%M} to {figures.end:%Y-%m-%d %H:%M} UTC"
    spent = [spend for spend in figures.keys.values() if spend.total > 0]
    total = usd(figures.total)
    notes = [
        f"Spend is the growth of each key's lifetime usage and byok_usage between snapshots (USD); "
        f"{len(figures.keys) - len(spent)} keys with no spend in the period are not listed."
        if params.by == "key"
        else "Spend is the growth of each key's lifetime usage and byok_usage between snapshots (USD)."
    ]
    unknown = sum(1 for spend in figures.keys.values() if not spend.baseline_known)
    if unknown:
        notes.append(
            f"{unknown} key(s) were first seen inside the period but created before it: "
            "their spend before the first snapshot that saw them is unknown and not counted."
        )

    if params.by == "workspace":
        rows = _by_workspace(spent)
        title = f"Spend by workspace, {period}: ${total:,.2f}"
        return Report(
            title=title, columns=WORKSPACE_COLUMNS, rows=rows, notes=notes, headers={"workspace_id": "workspace"}
        )
    if params.by == "day":
        rows = [
            {"day": day, "keys": keys, "usage": usd(credit), "byok_usage": usd(byok), "total": usd(credit + byok)}
            for day, (credit, byok, keys) in figures.day_totals().items()
        ]
        title = f"Spend by day, {period}: ${total:,.2f}"
        return Report(title=title, columns=DAY_COLUMNS, rows=rows, notes=notes, headers={"byok_usage": "byok"})

    rows = [
        {
            "key_hash": spend.key_hash,
            "name": spend.name,
            "workspace_id": spend.workspace_id,
            "usage": usd(spend.usage),
            "byok_usage": usd(spend.byok_usage),
            "total": usd(spend.total),
            "created_in_period": spend.created_in_period,
            "deleted_in_period": spend.deleted_in_period,
            "baseline_known": spend.baseline_known,
            "counted_from": spend.counted_from,
        }
        for spend in spent
    ]
    rows.sort(key=lambda row: (-row["total"], row["name"], row["key_hash"]))
    title = f"Spend per key, {period}: ${total:,.2f} over {len(rows)} keys"
    return Report(
        title=title,
        columns=KEY_COLUMNS,
        rows=rows,
        notes=notes,
        table_columns=["key_hash", "name", "usage", "byok_usage", "total"],
        headers={"key_hash": "key", "byok_usage": "byok"},
    )


def _by_workspace(spent: list[KeySpend]) -> list[dict[str, Any]]:
    groups: dict[str, list[KeySpend]] = defaultdict(list)
    for spend in spent:
        groups[spend.workspace_id or ""].append(spend)
    rows: list[dict[str, Any]] = []
    for workspace_id, members in groups.items():
        credit = sum(spend.usage for spend in members)
        byok = sum(spend.byok_usage for spend in members)
        rows.append(
            {
                "workspace_id": workspace_id or None,
                "keys": len(members),
                "usage": usd(credit),
                "byok_usage": usd(byok),
                "total": usd(credit + byok),
            }
        )
    rows.sort(key=lambda row: (-row["total"], str(row["workspace_id"])))
    return rows
