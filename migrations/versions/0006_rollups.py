"""roll-ups for the reports: key_rollups, key_days, snapshot_rollups (filled by 0010)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 14:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "key_rollups",
        sa.Column("key_hash", sa.String(128), primary_key=True),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("usage_changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("usage", sa.BigInteger(), nullable=False),
        sa.Column("byok_usage", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "key_days",
        sa.Column("day", sa.Date(), primary_key=True),
        sa.Column("key_hash", sa.String(128), primary_key=True),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("workspace_id", sa.String(64), nullable=True),
        sa.Column("creator_user_id", sa.String(), nullable=True),
        sa.Column("usage", sa.BigInteger(), nullable=False),
        sa.Column("byok_usage", sa.BigInteger(), nullable=False),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("first_usage", sa.BigInteger(), nullable=True),
        sa.Column("first_byok_usage", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_key_days_first_seen_at", "key_days", ["first_seen_at"])
    op.create_table(
        "snapshot_rollups",
        sa.Column("snapshot_id", sa.Integer(), primary_key=True),
        sa.Column("workspace_id", sa.String(64), primary_key=True),
        sa.Column("taken_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("keys", sa.Integer(), nullable=False),
        sa.Column("disabled", sa.Integer(), nullable=False),
        sa.Column("expired", sa.Integer(), nullable=False),
        sa.Column("no_expiry", sa.Integer(), nullable=False),
        sa.Column("no_limit", sa.Integer(), nullable=False),
        sa.Column("idle_30d", sa.Integer(), nullable=False),
        sa.Column("usage", sa.BigInteger(), nullable=False),
        sa.Column("byok_usage", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_snapshot_rollups_taken_at", "snapshot_rollups", ["taken_at"])
    # Filled by 0010, which gives key_days its compact layout and then replays the stored
    # snapshots with today's code (the replay writes that layout, not this one).


def downgrade() -> None:
    op.drop_index("ix_snapshot_rollups_taken_at", table_name="snapshot_rollups")
    op.drop_table("snapshot_rollups")
    op.drop_index("ix_key_days_first_seen_at", table_name="key_days")
    op.drop_table("key_days")
    op.drop_table("key_rollups")
