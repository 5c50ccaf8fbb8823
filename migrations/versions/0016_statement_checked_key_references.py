"""On PostgreSQL, versions' references to their keys are checked once per statement, not per row.

Every version (``key_records``, ``key_usage``) names its key (``tracked_keys.id``). As a foreign
key, PostgreSQL checked that reference once per version inserted, locking the key's row each time:
on a first sync of 100,000 keys, about 0.4 s per table of the 1.0-1.7 s it took to write them.

Here the foreign keys are replaced by statement-level triggers that check the same thing for all
the rows of a statement in one query (the statement's transition table against ``tracked_keys``),
and raise a foreign-key violation as the constraint did:

- a version inserted or updated must name a tracked key;
- a tracked key that versions name cannot be deleted, nor its id changed.

What the triggers do not do that the constraint did: lock the key rows, which made a version
inserted by one transaction and its key deleted by another, at the same time, fail in one of the
two. keyhygiene never does both at once: versions are written only while a snapshot is recorded,
and retention deletes only keys that no version and no staging row of a sync in progress names
(``db.retention.delete_forgotten_keys``).

SQLite keeps its foreign keys, which cost it little. The models keep describing them.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-03 18:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

_VERSIONS = ("key_records", "key_usage")

# SET search_path FROM CURRENT: the tables are those of the schema this migration runs in.
_FUNCTIONS = """
CREATE FUNCTION keyhygiene_versions_name_tracked_keys() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM written AS v WHERE NOT EXISTS (SELECT 1 FROM tracked_keys AS t WHERE t.id = v.key_id)) THEN
        RAISE EXCEPTION USING ERRCODE = 'foreign_key_violation',
            MESSAGE = format('a row of %I names a key that tracked_keys does not hold', TG_TABLE_NAME);
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION keyhygiene_named_keys_stay() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
DECLARE
    named boolean;
BEGIN
    -- Each statement is planned when first run: the UPDATE trigger's ``kept`` only on UPDATE.
    IF TG_OP = 'DELETE' THEN
        SELECT EXISTS (
            SELECT 1 FROM removed AS o
            WHERE EXISTS (SELECT 1 FROM key_records AS r WHERE r.key_id = o.id)
               OR EXISTS (SELECT 1 FROM key_usage AS u WHERE u.key_id = o.id)
        ) INTO named;
    ELSE
        SELECT EXISTS (
            SELECT 1 FROM removed AS o
            WHERE NOT EXISTS (SELECT 1 FROM kept AS n WHERE n.id = o.id)
              AND (EXISTS (SELECT 1 FROM key_records AS r WHERE r.key_id = o.id)
                   OR EXISTS (SELECT 1 FROM key_usage AS u WHERE u.key_id = o.id))
        ) INTO named;
    END IF;
    IF named THEN
        RAISE EXCEPTION USING ERRCODE = 'foreign_key_violation',
            MESSAGE = 'a key that versions name cannot be removed from tracked_keys';
    END IF;
    RETURN NULL;
END $$;
"""


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    if not _postgresql():
        return
    op.execute(_FUNCTIONS)
    for table in _VERSIONS:
        op.drop_constraint(f"{table}_key_id_fkey", table, type_="foreignkey")
        for event in ("INSERT", "UPDATE"):
            op.execute(
                f"CREATE TRIGGER {table}_key_id_{event.lower()} AFTER {event} ON {table} "
                "REFERENCING NEW TABLE AS written FOR EACH STATEMENT "
                "EXECUTE FUNCTION keyhygiene_versions_name_tracked_keys()"
            )
    op.execute(
        "CREATE TRIGGER tracked_keys_named_delete AFTER DELETE ON tracked_keys "
        "REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION keyhygiene_named_keys_stay()"
    )
    op.execute(
        "CREATE TRIGGER tracked_keys_named_update AFTER UPDATE ON tracked_keys "
        "REFERENCING OLD TABLE AS removed NEW TABLE AS kept FOR EACH STATEMENT "
        "EXECUTE FUNCTION keyhygiene_named_keys_stay()"
    )


def downgrade() -> None:
    if not _postgresql():
        return
    for name in ("tracked_keys_named_delete", "tracked_keys_named_update"):
        op.execute(f"DROP TRIGGER {name} ON tracked_keys")
    for table in _VERSIONS:
        for event in ("insert", "update"):
            op.execute(f"DROP TRIGGER {table}_key_id_{event} ON {table}")
        op.create_foreign_key(f"{table}_key_id_fkey", table, "tracked_keys", ["key_id"], ["id"])
    op.execute("DROP FUNCTION keyhygiene_versions_name_tracked_keys()")
    op.execute("DROP FUNCTION keyhygiene_named_keys_stay()")
