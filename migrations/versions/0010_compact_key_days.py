"""key_days keyed by the key's id, with only its numbers (the name, workspace and owner come from
the record versions); SQLite keeps the rows in the primary key (WITHOUT ROWID).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01 19:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_FIRST_DAY = sa.text("first_seen_at IS NOT NULL")


def upgrade() -> None:
    op.create_table(
        "key_days_compact",
        sa.Column("day", sa.Date(), primary_key=True),
        sa.Column("key_id", sa.Integer(), primary_key=True),
        sa.Column("usage", sa.BigInteger(), nullable=False),
        sa.Column("byok_usage", sa.BigInteger(), nullable=False),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("first_usage", sa.BigInteger(), nullable=True),
        sa.Column("first_byok_usage", sa.BigInteger(), nullable=True),
        sqlite_with_rowid=False,
    )
    op.execute(
        "INSERT INTO key_days_compact (day, key_id, usage, byok_usage, first_seen_at, first_usage, first_byok_usage) "
        "SELECT d.day, t.id, d.usage, d.byok_usage, d.first_seen_at, d.first_usage, d.first_byok_usage "
        "FROM key_days d JOIN tracked_keys t ON t.key_hash = d.key_hash"
    )
    op.drop_index("ix_key_days_first_seen_at", table_name="key_days")
    op.drop_table("key_days")
    op.rename_table("key_days_compact", "key_days")
    op.create_index(
        "ix_key_days_first_seen_at",
        "key_days",
        ["first_seen_at"],
        sqlite_where=_FIRST_DAY,
        postgresql_where=_FIRST_DAY,
    )
    # A store with history and no roll-ups yet (0006 created them empty) has them filled by 0011,
    # once key_rollups has the layout that db.rollups writes.


def downgrade() -> None:
    op.create_table(
        "key_days_wide",
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
    # The wide layout's name, workspace and owner from the key's newest record version; its
    # last_used_at is not carried back (no report read it).
    op.execute(
        "INSERT INTO key_days_wide (day, key_hash, name, workspace_id, creator_user_id, usage, byok_usage, "
        "first_seen_at, first_usage, first_byok_usage, created_at, last_used_at) "
        "SELECT d.day, t.key_hash, r.name, r.workspace_id, r.creator_user_id, d.usage, d.byok_usage, "
        "d.first_seen_at, d.first_usage, d.first_byok_usage, r.created_at, NULL "
        "FROM key_days d JOIN tracked_keys t ON t.id = d.key_id "
        "JOIN key_records r ON r.key_id = d.key_id "
        "AND r.valid_from = (SELECT max(n.valid_from) FROM key_records n WHERE n.key_id = d.key_id)"
    )
    op.drop_index("ix_key_days_first_seen_at", table_name="key_days")
    op.drop_table("key_days")
    op.rename_table("key_days_wide", "key_days")
    op.create_index("ix_key_days_first_seen_at", "key_days", ["first_seen_at"])
