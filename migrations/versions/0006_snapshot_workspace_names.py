"""snapshots.workspace_names: each workspace's name as the sync listed it, by id

Revision ID: 0006
Revises: 0004
Create Date: 2026-12-01 13:50:00

Existing snapshots keep every value they had; their workspace names were never recorded, so the
column stays NULL for them (reports then show no name beside the id).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("snapshots", schema=None) as batch_op:
        batch_op.add_column(sa.Column("workspace_names", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("snapshots", schema=None) as batch_op:
        batch_op.drop_column("workspace_names")
