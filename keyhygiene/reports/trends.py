"""``report trends``: per UTC day, how many keys were in which state, and what they spent.

Each day is read at the last complete snapshot of that day inside the period ``(start, end]``
(days without a snapshot have no row; a day whose last snapshot holds no key of the workspaces
asked about counts zero), from the roll-ups each sync keeps (:mod:`db.rollups`), so a
year of history costs one row per snapshot and workspace. ``idle_30d`` counts keys that the rules
file's ``match = "unused"`` with ``idle_for = "30d"`` would call unused at that snapshot: at least
30 days old and no use seen for 30 days, from ``last_used_at`` and from the usage history.
``spend`` is the day's total of ``report spend --by day`` for the same period and workspaces.
Trends are kept per workspace, not per key, so ``--name`` does not apply to them.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.orm import Session

from db import rollups, snapshots
from keyhygiene.errors import EXIT_USAGE

from .base import Report, ReportError, ReportParams, check_at, snapshot_for, usd

DEFAULT_PERIOD = timedelta(days=30)

COLUMNS = ["day", "taken_at", "keys", "disabled", "expired", "no_expiry", "no_limit", "idle_30d", "spend"]
TABLE_COLUMNS = ["day", "keys", "disabled", "expired", "no_expiry", "no_limit", "idle_30d", "spend"]
HEADERS = {"no_expiry": "no expiry", "no_limit": "no limit", "idle_30d": "idle 30d+", "disabled": "disab."}


def build(session: Session, params: ReportParams) -> Report:
    check_at(params)
    snapshot_for(session, params)  # no snapshot at all, or --at before the first: say so
    if params.name is not None:
        raise ReportError("trends are kept per workspace, not per key: --name is not available for trends", EXIT_USAGE)
    end = params.as_of
    start = params.period_start(DEFAULT_PERIOD)
    counts = rollups.day_counts(session, start=start, end=end, workspaces=params.workspaces)
    first = snapshots.first_snapshot(session)
    # Where the history before the period's start was pruned, spend counts from the oldest snapshot
    # kept, as ``report spend`` does: that snapshot's own step is growth from before the period.
    kept_from = (
        first.taken_at
        if first is not None
        and first.taken_at is not None
        and first.taken_at > start
        and snapshots.pruned_before(session, first.id)
        else None
    )
    spend_from = kept_from or start
    spend = {
        day.day: day.usage + day.byok_usage
        for day in rollups.spend_by_day(session, start=spend_from, end=end, workspaces=params.workspaces)
    }
    rows = [
        {
            "day": day.day,
            "taken_at": day.taken_at,
            **{name: getattr(day, name) for name in rollups.COUNTS},
            "spend": usd(spend.get(day.day, 0.0)),
        }
        for day in counts
    ]
    notes = [] if rows else ["no complete snapshot was taken in the period"]
    if kept_from is not None:
        notes.append(
            f"The history before {kept_from:%Y-%m-%d %H:%M} UTC was pruned (KEYHYGIENE_RETENTION): "
            "earlier days have no row, and that day's spend counts only from then."
        )
    title = f"Trends per day, {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC: {len(rows)} days"
    return Report(title=title, columns=COLUMNS, rows=rows, notes=notes, table_columns=TABLE_COLUMNS, headers=HEADERS)
