"""key_usage.spent_from: the latest start of a spend window in which a snapshot saw the key spend

A key whose ``usage_daily``, ``usage_weekly`` or ``usage_monthly`` (or BYOK's) is above zero was used
at or after that UTC day, week or month began, whatever its ``last_used_at`` says: the rules read
that as the earliest its idleness can start. The counters reset with their window; each usage
version now keeps, from the snapshot that wrote it and the version before it, the latest such start
any snapshot saw, so the evidence outlives the window.

Versions written before this migration hold NULL: no evidence kept (the newest snapshot's own
counters are still read). Last, as 0011 did before: the roll-ups of a store that has history and
none yet (one upgraded from before 0006) are filled by today's ``db.rollups``, which reads this
column.

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-05 14:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.orm import Session

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("key_usage", schema=None) as batch_op:
        batch_op.add_column(sa.Column("spent_from", sa.DateTime(timezone=True), nullable=True))
    bind = op.get_bind()
    if bind.execute(sa.text("SELECT 1 FROM key_rollups LIMIT 1")).first() is None:
        # No roll-ups yet: replay the stored snapshots, oldest first, exactly as each sync would
        # have written them.
        from db.rollups import rebuild_rollups

        rebuild_rollups(Session(bind=bind))


def downgrade() -> None:
    with op.batch_alter_table("key_usage", schema=None) as batch_op:
        batch_op.drop_column("spent_from")
