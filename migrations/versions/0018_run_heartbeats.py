"""runs.heartbeat_at: when a job run from the command line last said it is alive

A run still ``running`` long after it began is taken for one whose process died: the next job
records it ``aborted`` (and fails the snapshot it was taking). A job on the worker cannot outlive
its hard time limit, so its age proves it; a job run from the command line (cron, an operator) has
no time limit, and a long one (a first sync of a slow API, an enforcement working through a
backlog) was marked aborted while it still ran. Such a job now renews this time while it runs, and
only a heartbeat as old as a dead job's makes it abandoned.

Runs recorded before this migration keep a NULL ``heartbeat_at``: their age is their start, as before.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-05 07:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("heartbeat_at")
