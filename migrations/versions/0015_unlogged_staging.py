"""On PostgreSQL the staging tables (``snapshot_staging``, ``snapshot_carried``) are UNLOGGED.

They hold only the rows of syncs in progress, deleted when the sync records its snapshot or fails.
As UNLOGGED tables their writes skip the write-ahead log: a first sync of 100,000 keys no longer
writes its 100,000 staging rows (and their deletion) to the log, nor ships them to replicas.

A server that crashes empties them when it restarts. A sync that was running then and reconnects
finds fewer keys staged than it listed, and fails without recording anything (``record_staged``'s
``expected_keys``); the next sync records the keys as listed then. On SQLite nothing changes.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-03 15:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

_STAGING = ("snapshot_staging", "snapshot_carried")


def _set(persistence: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in _STAGING:
        op.execute(f"ALTER TABLE {table} SET {persistence}")


def upgrade() -> None:
    _set("UNLOGGED")


def downgrade() -> None:
    _set("LOGGED")
