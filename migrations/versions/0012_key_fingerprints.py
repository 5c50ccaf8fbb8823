"""tracked_keys.fingerprint and snapshot_staging.fingerprint: a digest of the JSON each key's open
versions were made from, so that a sync stages a key that has not changed by copying its versions
in SQL instead of typing it and writing it row by row.

Existing keys start without one: the first sync after the upgrade stages every key in full and
records their fingerprints.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02 05:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

_TABLES = ("tracked_keys", "snapshot_staging")


def upgrade() -> None:
    for table in _TABLES:
        op.add_column(table, sa.Column("fingerprint", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("fingerprint")
