"""``report inventory``: every key at the newest snapshot, or as of a past time."""

from __future__ import annotations

from decimal import Decimal

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
FIELDS = [column for column in COLUMNS if column != "expired"]
"""What the report reads of each key: its columns but ``expired``, which it works out."""
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
    for key in snapshots.fields_at(session, snapshot.id, FIELDS):
        if not params.wants(name=key["name"], workspace_id=key["workspace_id"]):
            continue
        expires_at = key["expires_at"]
        # Money is stored exact (Decimal); reports print it as numbers, like every other report.
        money = {name: float(value) for name, value in key.items() if isinstance(value, Decimal)}
        rows.append({**key, **money, "expired": expires_at is not None and expires_at <= as_of})
    rows.sort(key=lambda row: (row["workspace_id"] or "", row["name"], row["key_hash"]))
    title = f"Inventory at snapshot {snapshot.id} ({as_of:%Y-%m-%d %H:%M} UTC): {len(rows)} keys"
    return Report(
        title=title,
        columns=COLUMNS,
        rows=[{column: row[column] for column in COLUMNS} for row in rows],
        table_columns=TABLE_COLUMNS,
        headers=HEADERS,
        time_formats=dict.fromkeys(("last_used_at", "created_at", "expires_at"), "%Y-%m-%d"),
    )
