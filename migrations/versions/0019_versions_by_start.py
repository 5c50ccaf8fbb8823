"""key_usage and key_records: an index on valid_from, for the daily prune

The prune deletes the snapshots no version begins or ends at. Where versions end was indexed, where
they begin was not: every prune read the whole of both tables, three times a batch, on SQLite under
the write lock (a store of 6.7 million versions: 6 s of a 9 s prune, the lock held 4 s at a time;
at 100,000 keys synced hourly it would outlast a sync's 30 s wait for the lock). With the index each
snapshot is one lookup.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-05 12:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

TABLES = ("key_usage", "key_records")


def upgrade() -> None:
    for table in TABLES:
        op.create_index(f"ix_{table}_valid_from", table, ["valid_from"])


def downgrade() -> None:
    for table in TABLES:
        op.drop_index(f"ix_{table}_valid_from", table_name=table)
