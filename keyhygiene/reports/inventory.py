"""``report inventory``: every key at the newest snapshot, or as of a past time."""

from __future__ import annotations

from sqlalchemy.orm import Session

from db import snapshots
from keyhygiene.timeutil import isoformat

from .base import Report, ReportError, ReportParams

COLUMNS = [
    "key_hash",
    "name",
    "workspace_id",
    "disabled",
    "expired",
    "limit",
    "limit_remaining",
    "usage",
    "usage_daily",
    "usage_weekly",
    "usage_monthly",
    "byok_usage",
    "byok_usage_daily",
    "byok_usage_weekly",
    "byok_usage_monthly",
    "created_at",
    "last_used_at",
    "expires_at",
]
TABLE_COLUMNS = [
    "key_hash",
    "name",
    "disabled",
    "expired",
    "limit_remaining",
    "usage_monthly",
    "last_used_at",
]


def build(session: Session, params: ReportParams) -> Report:
    snapshot = snapshots.latest_snapshot(session, at=params.at)
    if snapshot is None:
        first = snapshots.first_snapshot(session)
        if first is None:
            raise ReportError("no snapshot yet: run `keyhygiene sync` first")
        raise ReportError(f"--at {isoformat(params.at)} is before the first snapshot ({isoformat(first.taken_at)})")
    as_of = snapshot.taken_at
    assert as_of is not None
    rows = []
    for key in snapshots.keys_at(session, snapshot.id):
        if not params.wants(name=key.name, workspace_id=key.workspace_id):
            continue
        rows.append(
            {
                "key_hash": key.hash,
                "name": key.name,
                "workspace_id": key.workspace_id,
                "disabled": key.disabled,
                "expired": key.expires_at is not None and key.expires_at <= as_of,
                "limit": key.limit,
                "limit_remaining": key.limit_remaining,
                "usage": key.usage,
                "usage_daily": key.usage_daily,
                "usage_weekly": key.usage_weekly,
                "usage_monthly": key.usage_monthly,
                "byok_usage": key.byok_usage,
                "byok_usage_daily": key.byok_usage_daily,
                "byok_usage_weekly": key.byok_usage_weekly,
                "byok_usage_monthly": key.byok_usage_monthly,
                "created_at": key.created_at,
                "last_used_at": key.last_used_at,
                "expires_at": key.expires_at,
            }
        )
    rows.sort(key=lambda row: (row["workspace_id"] or "", row["name"], row["key_hash"]))
    title = f"Inventory at snapshot {snapshot.id} ({isoformat(as_of)}): {len(rows)} keys"
    return Report(title=title, columns=COLUMNS, rows=rows)
