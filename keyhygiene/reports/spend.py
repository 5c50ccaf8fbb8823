"""``report spend``: what each key spent over a period, from the change of its lifetime counters.

How spend is counted (``usage`` and ``byok_usage`` are lifetime counters, in USD):

- The period is ``(start, end]`` with ``end`` = --at or now and ``start`` = end - --since (30d).
- A key's spend is the sum, over consecutive stored observations of it, of how much each counter
  grew. Each step counts in the period when its later snapshot was taken inside the period, and
  on the UTC day of that later snapshot (a gap between snapshots lands on the day the sync saw it).
- The baseline is the key as the last snapshot at or before ``start`` saw it.
- A key created inside the period (``created_at`` after ``start``) counts from zero at creation:
  its first observation's counters are all spend of the period.
- A key created before the period but first seen inside it (history begins inside the period)
  counts from its first observation: what it spent before that is unknown and is not guessed.
  Such rows say ``baseline_known: false``. A key seen before the period, absent from the snapshot
  at its start and seen again inside it (rare: a sync fetches every key it missed before it
  records one gone) counts its growth since it was last seen, on the day it is seen again, like
  any gap between snapshots.
- A deleted key counts up to its last observation; what it spent between that sync and its
  deletion is unknown.
- A counter that goes down (a reset, an API correction) counts zero for that step, never negative;
  growth after it counts again from the lower value.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from db import rollups, snapshots
from keyhygiene.keysapi.fields import MICROS_PER_USD

from .base import Report, ReportError, ReportParams, check_at, snapshot_for, usd

DEFAULT_PERIOD = timedelta(days=30)
GROUPINGS = ("key", "workspace", "day", "owner")

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
OWNER_COLUMNS = ["owner", "keys", "usage", "byok_usage", "total"]
DAY_COLUMNS = ["day", "keys", "usage", "byok_usage", "total"]


@dataclass
class KeySpend:
    """One key's spend over the period."""

    key_hash: str
    name: str
    workspace_id: str | None
    counted_from: datetime
    creator_user_id: str | None = None
    created_in_period: bool = False
    deleted_in_period: bool = False
    baseline_known: bool = True
    usage: float = 0.0
    byok_usage: float = 0.0

    @property
    def total(self) -> float:
        return self.usage + self.byok_usage

    def add(self, credit: float, byok: float) -> None:
        self.usage += credit
        self.byok_usage += byok


@dataclass
class SpendFigures:
    """The spend of every key (that passes the filters) over ``(start, end]``.

    ``keys`` holds the keys that spent or were first seen in the period.
    """

    start: datetime
    end: datetime
    keys: dict[str, KeySpend]
    days: list[date]
    """The UTC days with a complete snapshot inside the period, oldest first."""
    without_spend: int = 0
    """Keys that existed in the period and spent nothing in it (not listed by key)."""
    pruned: bool = False
    """The period asked for began before the history kept: ``start`` is the oldest snapshot kept."""

    @property
    def total(self) -> float:
        return sum(spend.total for spend in self.keys.values())


def compute_spend(session: Session, params: ReportParams, *, default: timedelta = DEFAULT_PERIOD) -> SpendFigures:
    """Spend per key over the report's period, from the roll-ups (:mod:`db.rollups`; the database
    sums each key's whole days); a ReportError when nothing covers it. Per day: ``daily_spend``."""
    end_snapshot, start, after_id, baseline_at, pruned = _period(session, params, default)
    end = params.as_of

    keys: dict[str, KeySpend] = {}
    latest: dict[str, date] = {}
    rows = rollups.spend_rows(session, after_snapshot=after_id, until_snapshot=end_snapshot.id, per_day=False)
    for row in rows:
        spend = keys.get(row.key_hash)
        if spend is None:
            spend = keys[row.key_hash] = KeySpend(row.key_hash, row.name, row.workspace_id, counted_from=baseline_at)
        if row.day >= latest.get(row.key_hash, row.day):
            latest[row.key_hash] = row.day
            spend.name, spend.workspace_id, spend.creator_user_id = row.name, row.workspace_id, row.creator_user_id
        spend.add(row.usage, row.byok_usage)
        if row.first_seen_at is not None and row.created_at is not None:
            if _created_inside(row, start):
                spend.created_in_period = True
                spend.counted_from = row.created_at
                spend.add(row.first_usage, row.first_byok_usage)
            else:
                spend.baseline_known = False
                spend.counted_from = row.first_seen_at
    spent_anywhere = {key_hash for key_hash, spend in keys.items() if spend.total > 0}
    keys = {
        key_hash: spend
        for key_hash, spend in keys.items()
        if params.wants(name=spend.name, workspace_id=spend.workspace_id)
    }
    spent = [key_hash for key_hash, spend in keys.items() if spend.total > 0]
    alive_at_end = rollups.alive_hashes(session, end_snapshot.id)
    for key_hash in spent:
        keys[key_hash].deleted_in_period = key_hash not in alive_at_end

    # The keys of the period: those listed at its start or its end, and those that spent or were
    # first seen inside it (a key listed again inside it after it was gone included). A key is in
    # the filter by its name and workspace at the start or at the end; one that spent is
    # listed under its name and workspace at the end, and is not "without spend" under the ones it
    # had at the start (a key moved or renamed in the period).
    if params.name is None and not params.workspaces:
        in_scope = rollups.alive_hashes(session, after_id) | alive_at_end
    else:
        in_scope = {
            key_hash
            for snapshot_id in (after_id, end_snapshot.id)
            for key_hash, name, workspace_id in rollups.names_alive(session, snapshot_id)
            if params.wants(name=name, workspace_id=workspace_id)
        }
    in_scope.update(keys)
    without_spend = len(in_scope - spent_anywhere)
    days = snapshots.days_with_snapshots(session, after=start, until=end)
    return SpendFigures(start=start, end=end, keys=keys, days=days, without_spend=without_spend, pruned=pruned)


def _period(session: Session, params: ReportParams, default: timedelta) -> tuple[Any, datetime, int, datetime, bool]:
    """The snapshot the period ends at, its start, the baseline snapshot's id (0: none) and time,
    and whether the start was moved up to the oldest snapshot kept because the history before it
    was pruned (its versions began before it: growth from them would count spend from before)."""
    end_snapshot = snapshot_for(session, params)
    start = params.period_start(default)
    baseline = snapshots.latest_snapshot(session, at=start)
    pruned = False
    first = snapshots.first_snapshot(session) if baseline is None else None
    kept_from = first.taken_at if first is not None else None
    if first is not None and kept_from is not None and kept_from > start and snapshots.pruned_before(session, first.id):
        baseline, start, pruned = first, kept_from, True
    after_id = baseline.id if baseline is not None else 0
    baseline_at = baseline.taken_at if baseline is not None and baseline.taken_at is not None else start
    return end_snapshot, start, after_id, baseline_at, pruned


@dataclass(frozen=True, slots=True)
class DailySpend:
    """Per UTC day, what a set of keys spent, and the daily series of a few of them."""

    totals: dict[date, tuple[float, float]]
    """Per day: (usage, byok_usage) of all the keys."""
    series: dict[str, dict[date, float]]
    """Per key asked for: per day, usage + byok_usage."""
    spenders: dict[date, int]
    """Per day: how many of the keys spent that day."""


def daily_spend(
    session: Session,
    params: ReportParams,
    keys: Collection[str],
    *,
    series_of: Collection[str] = (),
    default: timedelta = DEFAULT_PERIOD,
) -> DailySpend:
    """The daily figures ``compute_spend`` gives per key and day, for the keys ``keys`` (those of
    its result: the ones the report's filters let through), streamed: only the day totals, the
    count of keys that spent each day and the series of ``series_of`` are kept, not every key's
    days. Summed in micro-dollars, so exact whatever the order of the rows (100,000 keys x 30 days
    is millions of rows)."""
    end_snapshot, start, after_id, _, _ = _period(session, params, default)
    totals: dict[date, list[int]] = defaultdict(lambda: [0, 0])
    spenders: Counter[date] = Counter()
    # The key days that come in pieces (a day the period covers in part comes as its steps; a
    # first sight beside them): at most about two per key, counted once each at the end.
    pieces: set[tuple[str, date]] = set()
    series: dict[str, dict[date, int]] = {key_hash: defaultdict(int) for key_hash in series_of}
    for row in rollups.spend_rows(session, after_snapshot=after_id, until_snapshot=end_snapshot.id):
        if row.key_hash not in keys:
            continue
        credit, byok = _micros(row.usage), _micros(row.byok_usage)
        if _created_inside(row, start):
            credit, byok = credit + _micros(row.first_usage), byok + _micros(row.first_byok_usage)
        if credit or byok:
            day = totals[row.day]
            day[0] += credit
            day[1] += byok
            if row.key_hash in series:
                series[row.key_hash][row.day] += credit + byok
            if row.whole_day:
                spenders[row.day] += 1  # the key's one row of that day
            elif not row.day_listed:
                pieces.add((row.key_hash, row.day))
    for _, day_of_piece in pieces:
        spenders[day_of_piece] += 1
    return DailySpend(
        spenders=dict(spenders),
        totals={day: (credit / MICROS_PER_USD, byok / MICROS_PER_USD) for day, (credit, byok) in totals.items()},
        series={
            key_hash: {day: micros / MICROS_PER_USD for day, micros in days.items()}
            for key_hash, days in series.items()
        },
    )


def _created_inside(row: rollups.SpendRow, start: datetime) -> bool:
    """A first observation of a key created inside the period: what it had then counts as spend."""
    return row.first_seen_at is not None and row.created_at is not None and row.created_at > start


def _micros(amount: float) -> int:
    """A figure of the store (a whole number of micro-dollars, as a float in USD) as that number."""
    return round(amount * MICROS_PER_USD)


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
        f"{figures.without_spend} keys with no spend in the period are not listed."
        if params.by == "key"
        else "Spend is the growth of each key's lifetime usage and byok_usage between snapshots (USD)."
    ]
    if figures.pruned:
        notes.append(
            f"The history before {figures.start:%Y-%m-%d %H:%M} UTC was pruned (KEYHYGIENE_RETENTION): "
            "spend is counted from then."
        )
    unknown = sum(1 for spend in figures.keys.values() if not spend.baseline_known)
    if unknown:
        notes.append(
            f"{unknown} key(s) were first seen inside the period but created before it: "
            "their spend before the first snapshot that saw them is unknown and not counted."
        )

    if params.by == "workspace":
        rows = _grouped(spent, "workspace_id", lambda spend: spend.workspace_id)
        title = f"Spend by workspace, {period}: ${total:,.2f}"
        return Report(
            title=title, columns=WORKSPACE_COLUMNS, rows=rows, notes=notes, headers={"workspace_id": "workspace"}
        )
    if params.by == "owner":
        rows = _grouped(spent, "owner", lambda spend: spend.creator_user_id)
        title = f"Spend by owner (the key's creator_user_id), {period}: ${total:,.2f}"
        return Report(title=title, columns=OWNER_COLUMNS, rows=rows, notes=notes, headers={"byok_usage": "byok"})
    if params.by == "day":
        daily = daily_spend(session, params, figures.keys)
        rows = []
        for day in sorted({*figures.days, *daily.totals}):
            credit, byok = daily.totals.get(day, (0.0, 0.0))
            keys = daily.spenders.get(day, 0)
            rows.append(
                {"day": day, "keys": keys, "usage": usd(credit), "byok_usage": usd(byok), "total": usd(credit + byok)}
            )
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


def _grouped(spent: list[KeySpend], column: str, group: Callable[[KeySpend], str | None]) -> list[dict[str, Any]]:
    """One row per value of ``group`` (None is a group of its own), biggest spender first."""
    groups: dict[str | None, list[KeySpend]] = defaultdict(list)
    for spend in spent:
        groups[group(spend) or None].append(spend)
    rows: list[dict[str, Any]] = []
    for value, members in groups.items():
        credit = sum(spend.usage for spend in members)
        byok = sum(spend.byok_usage for spend in members)
        rows.append(
            {
                column: value,
                "keys": len(members),
                "usage": usd(credit),
                "byok_usage": usd(byok),
                "total": usd(credit + byok),
            }
        )
    rows.sort(key=lambda row: (-row["total"], row[column] is None, str(row[column])))
    return rows
