"""Versions no longer carry foreign keys to snapshots: ``key_records`` and ``key_usage`` name
their snapshots (``valid_from``, ``valid_to``) by id alone.

A sync writes one version per new or changed key, every one naming the snapshot being recorded.
PostgreSQL checked that same snapshot row once per version and per column, taking a row lock each
time: 0.6 s per 100,000 versions per table here, a third of the time it took to write them.
Versions are written only by ``record_staged``, which names its own snapshot, and ``prune``
deletes only snapshots that no version begins or ends at (its tests check that every kept version
still finds its snapshots). The foreign key from versions to ``tracked_keys`` stays.

On SQLite the two tables are rebuilt without them (one copy of each), so that both databases hold
the schema the models describe.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03 14:45:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

_VERSIONS = ("key_records", "key_usage")
_ENDS = ("valid_from", "valid_to")
_OPEN = sa.text("valid_to IS NULL")
# Unnamed on SQLite: reflected under these names, so that the batch can drop them.
_NAMING = {"fk": "%(table_name)s_%(column_0_name)s_fkey"}


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def _restore_indexes(table: str) -> None:
    """The version indexes as 0005 made them: a rebuilt SQLite table must keep the partial one."""
    for name in (f"ix_{table}_key_from", f"ix_{table}_valid_to", f"ix_{table}_open"):
        op.execute(f"DROP INDEX IF EXISTS {name}")
    op.create_index(f"ix_{table}_key_from", table, ["key_id", "valid_from"])
    op.create_index(f"ix_{table}_valid_to", table, ["valid_to"])
    op.create_index(f"ix_{table}_open", table, ["key_id"], unique=True, sqlite_where=_OPEN, postgresql_where=_OPEN)


def upgrade() -> None:
    for table in _VERSIONS:
        if _postgresql():
            for column in _ENDS:
                op.drop_constraint(f"{table}_{column}_fkey", table, type_="foreignkey")
            continue
        with op.batch_alter_table(table, recreate="always", naming_convention=_NAMING) as batch:
            for column in _ENDS:
                batch.drop_constraint(f"{table}_{column}_fkey", type_="foreignkey")
        _restore_indexes(table)


def downgrade() -> None:
    for table in _VERSIONS:
        if _postgresql():
            for column in _ENDS:
                op.create_foreign_key(f"{table}_{column}_fkey", table, "snapshots", [column], ["id"])
            continue
        with op.batch_alter_table(table, recreate="always", naming_convention=_NAMING) as batch:
            for column in _ENDS:
                batch.create_foreign_key(f"{table}_{column}_fkey", "snapshots", [column], ["id"])
        _restore_indexes(table)
