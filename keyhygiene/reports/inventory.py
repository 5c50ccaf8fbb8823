"""``report inventory``: every key at the newest snapshot, or as of a past time."""

from __future__ import annotations

from sqlalchemy.orm import Session

from db import snapshots
from keyhygiene.keysapi.fields import FIELDS_BY_NAME, MICROS_PER_USD

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
    "usage_monthly",
    "last_used_at",
]
HEADERS = {
    "key_hash": "key",
    "disabled": "off",
    "expired": "expired",
    "limit_remaining": "limit left",
    "usage_monthly": "month $",
    "last_used_at": "last used",
}


def build(session: Session, params: ReportParams) -> Report:
    snapshot = snapshot_for(session, params)
    as_of = snapshot.taken_at
    assert as_of is not None
    rows = []
    money = [
        index for index, name in enumerate(FIELDS) if name in FIELDS_BY_NAME and FIELDS_BY_NAME[name].kind == "money"
    ]
    name_at, workspace_at, expires_at = FIELDS.index("name"), FIELDS.index("workspace_id"), FIELDS.index("expires_at")
    # Each row's values in COLUMNS order: FIELDS, with "expired" put in its place.
    expired_at = COLUMNS.index("expired")
    wants = params.wants
    for values in snapshots.fields_at(session, snapshot.id, FIELDS):
        if not wants(name=values[name_at], workspace_id=values[workspace_at]):
            continue
        key = list(values)
        # Money is stored exact (micro-dollars); reports print it as numbers, like every other report.
        for index in money:
            if key[index] is not None:
                key[index] = key[index] / MICROS_PER_USD
        expires = key[expires_at]
        key.insert(expired_at, expires is not None and expires <= as_of)
        rows.append(dict(zip(COLUMNS, key, strict=True)))
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
