"""On PostgreSQL, the check that versions name tracked keys always probes the keys' index

The statement-level trigger of 0016 checks every version a statement writes against
``tracked_keys`` in one query. PL/pgSQL plans that query once per connection, at its first
use, and keeps the plan. A sync now tracks the keys new to the store a page at a time while it
lists them (``db.snapshots.record_new_keys``), all in one transaction: the first page planned the
check while ``tracked_keys`` held a few rows (a scan of the whole table), and each later page
scanned every key tracked so far, 100,000 keys took 6.8 s of the server's time instead of 2.2 s,
growing with the square of the keys. A plan kept from a statement run with nested loops off
(``db.bulkload.planned_for_growth``) did the same.

The function now plans its query with the index of tracked ids only (sequential scans, hash and
merge joins off, nested loops on, for its own statements): one probe per version written, at
any size.

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-06 12:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None

_CHECK = """
CREATE OR REPLACE FUNCTION keyhygiene_versions_name_tracked_keys() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT{planned} AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM written AS v WHERE NOT EXISTS (SELECT 1 FROM tracked_keys AS t WHERE t.id = v.key_id)) THEN
        RAISE EXCEPTION USING ERRCODE = 'foreign_key_violation',
            MESSAGE = format('a row of %I names a key that tracked_keys does not hold', TG_TABLE_NAME);
    END IF;
    RETURN NULL;
END $$;
"""

_BY_INDEX = (
    " SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off"
    " SET enable_mergejoin = off SET enable_nestloop = on"
)


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    if _postgresql():
        op.execute(_CHECK.format(planned=_BY_INDEX))


def downgrade() -> None:
    if _postgresql():
        op.execute(_CHECK.format(planned=""))
