"""plans, plan_entries, run_plans: dry-run plans and refusals stored once per distinct plan

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 14:00:00

Audit records written before this revision (one ``actions`` row per planned or refused key) stay
where they are and are read as before, beside the new runs' plans read by reference.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "plans",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("decisions", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("digest"),
    )
    op.create_table(
        "plan_entries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("plan_id", sa.Integer(), nullable=False),
        sa.Column("key_hash", sa.String(length=128), nullable=False),
        sa.Column("key_name", sa.Text(), nullable=False),
        sa.Column("workspace_id", sa.String(length=64), nullable=True),
        sa.Column("rule", sa.Text(), nullable=False),
        sa.Column("rules", sa.JSON(), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["plan_id"], ["plans.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_plan_entries_plan", "plan_entries", ["plan_id", "key_hash"], unique=False)
    op.create_table(
        "run_plans",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("plan_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("dry_run", sa.Boolean(), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["plan_id"], ["plans.id"]),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_run_plans_run_id", "run_plans", ["run_id"], unique=False)
    op.create_index("ix_run_plans_plan_id", "run_plans", ["plan_id"], unique=False)
    op.create_index("ix_run_plans_created_at", "run_plans", ["created_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_run_plans_created_at", table_name="run_plans")
    op.drop_index("ix_run_plans_plan_id", table_name="run_plans")
    op.drop_index("ix_run_plans_run_id", table_name="run_plans")
    op.drop_table("run_plans")
    op.drop_index("ix_plan_entries_plan", table_name="plan_entries")
    op.drop_table("plan_entries")
    op.drop_table("plans")
