"""``report inventory``: every key at the newest snapshot, or as of a past time."""

from __future__ import annotations

from sqlalchemy.orm import Session

from db import snapshots

from .base import Report, ReportParams, snapshot_for

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
HEADERS = {
    "key_hash": "key",
    "disabled": "off",
    "expired": "expired",
    "limit_remaining": "limit left",
    "usage_monthly": "this month",
    "last_used_at": "last used",
}


def build(session: Session, params: ReportParams) -> Report:
    snapshot = snapshot_for(session, params)
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
    title = f"Inventory at snapshot {snapshot.id} ({as_of:%Y-%m-%d %H:%M} UTC): {len(rows)} keys"
    return Report(
        title=title,
        columns=COLUMNS,
        rows=rows,
        table_columns=TABLE_COLUMNS,
        headers=HEADERS,
        time_formats=dict.fromkeys(("last_used_at", "created_at", "expires_at"), "%Y-%m-%d"),
    )
