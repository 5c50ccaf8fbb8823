"""notices.claimed_at: when a failed notice's one retry was claimed by a run

A failed notice is retried once by a later run, which first claims it (``failed`` to ``retrying``).
A process that died between the claim and the end of the retry (killed, the hard time limit, power
lost) left it ``retrying`` for good: no run looked at it again, and nothing said what became of it.
Its ``created_at`` is when it was first recorded, not when its retry began, so it cannot tell such a
claim from one that a run in another process is still sending. With the time of the claim, a later
run gives up a retry claimed longer ago than any send may take (``db.notices.undelivered``).

Notices claimed before this migration keep a NULL ``claimed_at``; ``undelivered`` takes them as cut
short (see there why).

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-04 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("notices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("notices", schema=None) as batch_op:
        batch_op.drop_column("claimed_at")
