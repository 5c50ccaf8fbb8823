"""snapshot_carried: the keys a sync in progress found exactly as the store holds them, one narrow
row each (snapshot, tracked id), instead of a copy of their open versions in snapshot_staging.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02 14:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "snapshot_carried",
        sa.Column("snapshot_id", sa.Integer(), nullable=False),
        sa.Column("key_id", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("snapshot_id", "key_id"),
        sqlite_with_rowid=False,
    )


def downgrade() -> None:
    op.drop_table("snapshot_carried")
