"""``report trends``: per UTC day, how many keys were in which state, and what they spent.

Each day is read at the last complete snapshot of that day inside the period ``(start, end]``
(days without a snapshot have no row). ``idle_30d`` counts keys that the rules file's
``match = "unused"`` with ``idle_for = "30d"`` would call unused at that snapshot: at least 30 days
old and no use seen for 30 days, from ``last_used_at`` and from the usage history. ``spend`` is
the day's total of ``report spend --by day`` for the same period and filters.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from sqlalchemy.orm import Session

from db import history, snapshots
from db.models import Snapshot
from keyhygiene.keysapi.models import Key
from keyhygiene.rules import KeyHistory, idle_since

from .base import Report, ReportParams, check_at, snapshot_for, usd
from .spend import compute_spend

DEFAULT_PERIOD = timedelta(days=30)
IDLE_FOR = timedelta(days=30)

COLUMNS = ["day", "taken_at", "keys", "disabled", "expired", "no_expiry", "no_limit", "idle_30d", "spend"]
TABLE_COLUMNS = ["day", "keys", "disabled", "expired", "no_expiry", "no_limit", "idle_30d", "spend"]
HEADERS = {"no_expiry": "no expiry", "no_limit": "no limit", "idle_30d": "idle 30d+", "disabled": "disab."}


@dataclass(frozen=True, slots=True)
class _Seen:
    """A version as it stood at one snapshot, with what its history proves."""

    version: history.StateVersion
    first_seen_at: datetime
    unchanged_since: datetime


def day_snapshots(session: Session, *, start: datetime, end: datetime) -> list[Snapshot]:
    """The last complete snapshot of each UTC day within ``(start, end]``, oldest first."""
    last_of_day: dict[date, Snapshot] = {}
    for snapshot in snapshots.complete_snapshots(session, since=start, until=end):
        if snapshot.taken_at is not None and snapshot.taken_at > start:
            last_of_day[snapshot.taken_at.date()] = snapshot
    return [last_of_day[day] for day in sorted(last_of_day)]


def _as_key(version: history.StateVersion) -> Key:
    """Just enough of a Key for the engine's idleness rule."""
    return Key(
        hash=version.key_hash,
        name=version.name,
        label="",
        disabled=version.disabled,
        limit=None if version.limit is None else float(version.limit),
        limit_remaining=None,
        limit_reset=None,
        include_byok_in_limit=False,
        usage=float(version.usage),
        usage_daily=0.0,
        usage_weekly=0.0,
        usage_monthly=0.0,
        byok_usage=float(version.byok_usage),
        byok_usage_daily=0.0,
        byok_usage_weekly=0.0,
        byok_usage_monthly=0.0,
        created_at=version.created_at,
        updated_at=None,
        expires_at=version.expires_at,
        last_used_at=version.last_used_at,
        workspace_id=version.workspace_id,
        creator_user_id=None,
        external_user=None,
        raw={"last_used_at": version.last_used_at} if version.reports_last_used else {},
    )


def _states_at(versions: list[history.StateVersion], chosen: list[Snapshot]) -> Iterator[tuple[Snapshot, _Seen]]:
    """For one key's history: the version alive at each chosen snapshot, and since when its
    counters have held still (maintained by the store, as enforcement reads it)."""
    position = 0
    for snapshot in chosen:
        while position + 1 < len(versions) and versions[position + 1].valid_from <= snapshot.id:
            position += 1
        version = versions[position]
        alive = version.valid_from <= snapshot.id and (version.valid_to is None or version.valid_to > snapshot.id)
        if alive:
            yield snapshot, _Seen(version, version.first_seen_at, version.usage_since)


def build(session: Session, params: ReportParams) -> Report:
    check_at(params)
    snapshot_for(session, params)  # no snapshot at all, or --at before the first: say so
    end = params.as_of
    start = params.period_start(DEFAULT_PERIOD)
    chosen = day_snapshots(session, start=start, end=end)
    counts: dict[int, dict[str, int]] = {
        snapshot.id: dict.fromkeys(("keys", "disabled", "expired", "no_expiry", "no_limit", "idle_30d"), 0)
        for snapshot in chosen
    }
    if chosen:
        versions = history.state_versions(session, alive_from=chosen[0].id, until_snapshot=chosen[-1].id)
        by_key: dict[str, list[history.StateVersion]] = defaultdict(list)
        for version in versions:
            by_key[version.key_hash].append(version)
        for key_versions in by_key.values():
            for snapshot, seen in _states_at(key_versions, chosen):
                version = seen.version
                if not params.wants(name=version.name, workspace_id=version.workspace_id):
                    continue
                assert snapshot.taken_at is not None
                at = snapshot.taken_at
                row = counts[snapshot.id]
                row["keys"] += 1
                row["disabled"] += version.disabled
                row["expired"] += version.expires_at is not None and version.expires_at <= at
                row["no_expiry"] += version.expires_at is None
                row["no_limit"] += version.limit is None
                cutoff = at - IDLE_FOR
                if version.created_at <= cutoff:
                    facts = KeyHistory(first_seen_at=seen.first_seen_at, usage_unchanged_since=seen.unchanged_since)
                    since = idle_since(_as_key(version), facts)
                    row["idle_30d"] += since is not None and since <= cutoff

    spend = compute_spend(session, params, default=DEFAULT_PERIOD).day_totals()
    rows = []
    for snapshot in chosen:
        assert snapshot.taken_at is not None
        day = snapshot.taken_at.date()
        credit, byok, _ = spend.get(day, (0.0, 0.0, 0))
        rows.append({"day": day, "taken_at": snapshot.taken_at, **counts[snapshot.id], "spend": usd(credit + byok)})
    notes = [] if rows else ["no complete snapshot was taken in the period"]
    title = f"Trends per day, {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC: {len(rows)} days"
    return Report(title=title, columns=COLUMNS, rows=rows, notes=notes, table_columns=TABLE_COLUMNS, headers=HEADERS)
