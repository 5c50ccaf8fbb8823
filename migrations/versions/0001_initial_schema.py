"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-27 03:25:50.358490
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("dry_run", sa.Boolean(), nullable=True),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("task_id", sa.String(length=64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("summary", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_runs_status"), ["status"], unique=False)
        batch_op.create_index(batch_op.f("ix_runs_task_id"), ["task_id"], unique=False)

    op.create_table(
        "actions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("key_hash", sa.String(length=128), nullable=False),
        sa.Column("key_name", sa.Text(), nullable=False),
        sa.Column("workspace_id", sa.String(length=64), nullable=True),
        sa.Column("rule", sa.Text(), nullable=False),
        sa.Column("rules", sa.JSON(), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("dry_run", sa.Boolean(), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["runs.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("actions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_actions_created_at"), ["created_at"], unique=False)
        batch_op.create_index("ix_actions_key_created", ["key_hash", "created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_actions_outcome"), ["outcome"], unique=False)
        batch_op.create_index(batch_op.f("ix_actions_run_id"), ["run_id"], unique=False)

    op.create_table(
        "snapshots",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("taken_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("key_count", sa.Integer(), nullable=True),
        sa.Column("workspace_counts", sa.JSON(), nullable=True),
        sa.Column("new_versions", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["runs.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("snapshots", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_snapshots_run_id"), ["run_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_snapshots_status"), ["status"], unique=False)
        batch_op.create_index(batch_op.f("ix_snapshots_taken_at"), ["taken_at"], unique=False)

    op.create_table(
        "key_states",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key_hash", sa.String(length=128), nullable=False),
        sa.Column("valid_from", sa.Integer(), nullable=False),
        sa.Column("valid_to", sa.Integer(), nullable=True),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("label", sa.Text(), nullable=False),
        sa.Column("workspace_id", sa.String(length=64), nullable=True),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("limit_usd", sa.Float(), nullable=True),
        sa.Column("limit_remaining", sa.Float(), nullable=True),
        sa.Column("limit_reset", sa.String(length=32), nullable=True),
        sa.Column("include_byok_in_limit", sa.Boolean(), nullable=False),
        sa.Column("usage", sa.Float(), nullable=False),
        sa.Column("usage_daily", sa.Float(), nullable=False),
        sa.Column("usage_weekly", sa.Float(), nullable=False),
        sa.Column("usage_monthly", sa.Float(), nullable=False),
        sa.Column("byok_usage", sa.Float(), nullable=False),
        sa.Column("byok_usage_daily", sa.Float(), nullable=False),
        sa.Column("byok_usage_weekly", sa.Float(), nullable=False),
        sa.Column("byok_usage_monthly", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("creator_user_id", sa.Text(), nullable=True),
        sa.Column("external_user", sa.Text(), nullable=True),
        sa.Column("raw", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["valid_from"],
            ["snapshots.id"],
        ),
        sa.ForeignKeyConstraint(
            ["valid_to"],
            ["snapshots.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("key_states", schema=None) as batch_op:
        batch_op.create_index("ix_key_states_hash_from", ["key_hash", "valid_from"], unique=False)
        batch_op.create_index("ix_key_states_valid_from", ["valid_from"], unique=False)
        batch_op.create_index("ix_key_states_valid_to", ["valid_to"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("key_states", schema=None) as batch_op:
        batch_op.drop_index("ix_key_states_valid_to")
        batch_op.drop_index("ix_key_states_valid_from")
        batch_op.drop_index("ix_key_states_hash_from")

    op.drop_table("key_states")
    with op.batch_alter_table("snapshots", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_snapshots_taken_at"))
        batch_op.drop_index(batch_op.f("ix_snapshots_status"))
        batch_op.drop_index(batch_op.f("ix_snapshots_run_id"))

    op.drop_table("snapshots")
    with op.batch_alter_table("actions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_actions_run_id"))
        batch_op.drop_index(batch_op.f("ix_actions_outcome"))
        batch_op.drop_index("ix_actions_key_created")
        batch_op.drop_index(batch_op.f("ix_actions_created_at"))

    op.drop_table("actions")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_runs_task_id"))
        batch_op.drop_index(batch_op.f("ix_runs_status"))

    op.drop_table("runs")
