"""runs carry their own outcome: exit_code, message, started_by (was trigger), allow_actions

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 13:40:00

Existing runs are carried over: ``trigger`` becomes ``started_by`` (``schedule`` is now ``beat``),
``error`` becomes ``message``, status ``complete`` becomes ``ok`` (or ``failed`` where a change
failed, which already exited 1), and each finished run gets the exit code its command reported.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_runs = sa.table(
    "runs",
    sa.column("id", sa.Integer()),
    sa.column("status", sa.String()),
    sa.column("summary", sa.JSON()),
    sa.column("exit_code", sa.Integer()),
)


def _exit_code(status: str, summary: dict[str, Any] | None) -> tuple[str, int | None]:
    """The (status, exit code) an old run's command reported, from what the old row kept."""
    summary = summary or {}
    if status == "complete":
        return ("failed", 1) if int(summary.get("failed") or 0) > 0 else ("ok", 0)
    if status == "refused":
        return status, 3
    if status == "failed":
        return status, int(summary.get("exit_code") or 1)
    if status in ("aborted", "skipped"):
        return status, 1
    return status, None  # running


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("started_by", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("allow_actions", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("exit_code", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("message", sa.Text(), nullable=True))
        batch_op.create_index(batch_op.f("ix_runs_started_at"), ["started_at"], unique=False)

    op.execute(
        'UPDATE runs SET message = error, started_by = CASE "trigger" '
        "WHEN 'schedule' THEN 'beat' WHEN 'beat' THEN 'beat' WHEN 'trigger' THEN 'trigger' ELSE 'cli' END"
    )
    # The exit code was kept only in the summary (and derived from the counts): the runs table is
    # one row per job, small enough to walk, and JSON is read the same way on both backends.
    connection = op.get_bind()
    rows = connection.execute(sa.select(_runs.c.id, _runs.c.status, _runs.c.summary)).all()
    for run_id, status, summary in rows:
        new_status, code = _exit_code(status, summary)
        connection.execute(sa.update(_runs).where(_runs.c.id == run_id).values(status=new_status, exit_code=code))

    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.alter_column("started_by", existing_type=sa.String(length=16), nullable=False)
        batch_op.drop_column("trigger")
        batch_op.drop_column("error")


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("trigger", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("error", sa.Text(), nullable=True))

    op.execute(
        "UPDATE runs SET error = CASE WHEN status = 'ok' THEN NULL ELSE message END, "
        "\"trigger\" = CASE started_by WHEN 'beat' THEN 'schedule' ELSE started_by END, "
        "status = CASE status WHEN 'ok' THEN 'complete' ELSE status END"
    )
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.alter_column("trigger", existing_type=sa.String(length=16), nullable=False)
        batch_op.drop_index(batch_op.f("ix_runs_started_at"))
        batch_op.drop_column("message")
        batch_op.drop_column("exit_code")
        batch_op.drop_column("allow_actions")
        batch_op.drop_column("started_by")
