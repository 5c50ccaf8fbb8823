"""key_rollups keyed by the key's tracked id instead of its 64-character hash (every sync joins
each alive key to its running state three times: by integer now, on SQLite the table's rowid),
without usage_changed_at (a copy of key_usage.usage_since that nothing read).

A state whose key retention has already forgotten is dropped: a key that comes back after that is
new to the store. Filling the roll-ups of a store that has history and none yet (one upgraded from
before 0006) was this migration's last step; it stays the last step of the newest migration that
changes a table the roll-ups are made from, as it runs today's ``db.rollups``: 0020 since.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 01:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_CARRIED = ("first_seen_at", "usage", "byok_usage")


def upgrade() -> None:
    _rekey(
        sa.Column("key_id", sa.Integer(), primary_key=True, autoincrement=False),
        {"key_id": "t.id"},
        "JOIN tracked_keys t ON t.key_hash = r.key_hash ORDER BY t.id",
    )


def downgrade() -> None:
    # The copy comes back from the key's newest usage version (which a tracked key always has,
    # unless retention is about to forget it).
    newest_since = (
        "(SELECT u.usage_since FROM key_usage u WHERE u.key_id = r.key_id ORDER BY u.valid_from DESC LIMIT 1)"
    )
    _rekey(
        sa.Column("key_hash", sa.String(128), primary_key=True),
        {"key_hash": "t.key_hash", "usage_changed_at": f"coalesce({newest_since}, r.first_seen_at)"},
        "JOIN tracked_keys t ON t.id = r.key_id",
        sa.Column("usage_changed_at", sa.DateTime(timezone=True), nullable=False),
    )


def _rekey(key: sa.Column[object], values: dict[str, str], join: str, *more: sa.Column[object]) -> None:
    """Rebuild key_rollups with ``key`` as its primary key (and the ``more`` columns), the running
    state carried over: each old row ``r`` gets ``values`` (SQL by column), from what ``join`` adds
    (a state whose key is not tracked any more finds nothing and is dropped)."""
    op.create_table(
        "key_rollups_rekeyed",
        key,
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        *more,
        sa.Column("usage", sa.BigInteger(), nullable=False),
        sa.Column("byok_usage", sa.BigInteger(), nullable=False),
    )
    columns = {**values, **{name: f"r.{name}" for name in _CARRIED}}
    op.execute(
        f"INSERT INTO key_rollups_rekeyed ({', '.join(columns)}) "
        f"SELECT {', '.join(columns.values())} FROM key_rollups r {join}"
    )
    op.drop_table("key_rollups")
    op.rename_table("key_rollups_rekeyed", "key_rollups")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE key_rollups RENAME CONSTRAINT key_rollups_rekeyed_pkey TO key_rollups_pkey")
