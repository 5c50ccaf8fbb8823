"""A compact store: narrow usage versions, record versions, money as integer micro-dollars

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 13:30:00

``key_states`` (one full row, raw JSON included, per change of anything) becomes ``tracked_keys``
(a small id per key hash), ``key_records`` (what rarely changes, with any fields we do not know)
and ``key_usage`` (the fields that change with use), plus ``snapshot_staging`` for syncs in
progress. Every old version is carried over: each is split
into its two parts from its raw JSON (so what the API sent is rebuilt exactly), runs of equal
parts are merged, and since when usage and ``disabled`` held is computed along each key's history.
On SQLite, ``db.migrate.upgrade`` then switches the file to ``auto_vacuum=INCREMENTAL`` (a VACUUM,
which cannot run inside the migration's transaction) so that prune can give space back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

from db.models import UTCDateTime
from db.snapshots import staged_row

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_OPEN = sa.text("valid_to IS NULL")
_STABLE = [
    ("name", sa.Text(), False),
    ("label", sa.Text(), False),
    ("limit_usd", sa.BigInteger(), True),
    ("limit_reset", sa.Text(), True),
    ("include_byok_in_limit", sa.Boolean(), False),
    ("created_at", sa.DateTime(timezone=True), False),
    ("updated_at", sa.DateTime(timezone=True), True),
    ("expires_at", sa.DateTime(timezone=True), True),
    ("workspace_id", sa.Text(), True),
    ("creator_user_id", sa.Text(), True),
    ("external_user", sa.Text(), True),
]
_VOLATILE = [
    ("disabled", sa.Boolean(), False),
    ("limit_remaining", sa.BigInteger(), True),
    ("usage", sa.BigInteger(), False),
    ("usage_daily", sa.BigInteger(), False),
    ("usage_weekly", sa.BigInteger(), False),
    ("usage_monthly", sa.BigInteger(), False),
    ("byok_usage", sa.BigInteger(), False),
    ("byok_usage_daily", sa.BigInteger(), False),
    ("byok_usage_weekly", sa.BigInteger(), False),
    ("byok_usage_monthly", sa.BigInteger(), False),
    ("last_used_at", sa.DateTime(timezone=True), True),
]
_BATCH = 5000


def _columns(spec: list[tuple[str, Any, bool]]) -> list[sa.Column[Any]]:
    return [sa.Column(name, kind, nullable=nullable) for name, kind, nullable in spec]


def _versioned() -> list[Any]:
    return [
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key_id", sa.Integer(), nullable=False),
        sa.Column("valid_from", sa.Integer(), nullable=False),
        sa.Column("valid_to", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["key_id"], ["tracked_keys.id"]),
        sa.ForeignKeyConstraint(["valid_from"], ["snapshots.id"]),
        sa.ForeignKeyConstraint(["valid_to"], ["snapshots.id"]),
        sa.PrimaryKeyConstraint("id"),
    ]


def _indexes(table: str) -> None:
    op.create_index(f"ix_{table}_key_from", table, ["key_id", "valid_from"])
    op.create_index(f"ix_{table}_valid_to", table, ["valid_to"])
    op.create_index(f"ix_{table}_open", table, ["key_id"], unique=True, sqlite_where=_OPEN, postgresql_where=_OPEN)


def upgrade() -> None:
    op.create_table(
        "tracked_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key_hash", sa.String(length=128), nullable=False),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key_hash"),
    )
    op.create_table("key_records", *_versioned(), *_columns(_STABLE), sa.Column("wire", sa.Text(), nullable=True))
    _indexes("key_records")
    op.create_table(
        "key_usage",
        *_versioned(),
        *_columns(_VOLATILE),
        sa.Column("usage_since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("disabled_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("wire", sa.Text(), nullable=True),
    )
    _indexes("key_usage")
    op.create_table(
        "snapshot_staging",
        sa.Column("snapshot_id", sa.Integer(), nullable=False),
        sa.Column("key_hash", sa.String(length=128), nullable=False),
        sa.Column("key_id", sa.Integer(), nullable=True),
        *_columns(_STABLE),
        sa.Column("record_wire", sa.Text(), nullable=True),
        *_columns(_VOLATILE),
        sa.Column("usage_wire", sa.Text(), nullable=True),
    )
    op.create_index("ix_snapshot_staging_snapshot_key", "snapshot_staging", ["snapshot_id", "key_id"])

    _carry_over(op.get_bind())

    with op.batch_alter_table("key_states", schema=None) as batch_op:
        batch_op.drop_index("ix_key_states_valid_to")
        batch_op.drop_index("ix_key_states_valid_from")
        batch_op.drop_index("ix_key_states_hash_from")
    op.drop_table("key_states")


def _table(name: str, spec: list[tuple[str, Any, bool]], *extra: str) -> sa.TableClause:
    times = {"first_seen_at", "usage_since", "disabled_since"}
    columns = [sa.column(column, UTCDateTime() if isinstance(kind, sa.DateTime) else kind) for column, kind, _ in spec]
    columns += [sa.column(column, UTCDateTime() if column in times else None) for column in extra]
    return sa.table(name, *columns)


def _old_versions(connection: sa.Connection) -> Iterator[tuple[str, int, int | None, datetime, dict[str, Any]]]:
    snapshots = sa.table("snapshots", sa.column("id"), sa.column("taken_at", UTCDateTime()))
    old = sa.table(
        "key_states", sa.column("key_hash"), sa.column("valid_from"), sa.column("valid_to"), sa.column("raw", sa.JSON())
    )
    query = (
        sa.select(old.c.key_hash, old.c.valid_from, old.c.valid_to, snapshots.c.taken_at, old.c.raw)
        .join(snapshots, snapshots.c.id == old.c.valid_from)
        .order_by(old.c.key_hash, old.c.valid_from)
    )
    for row in connection.execute(query.execution_options(yield_per=_BATCH)):
        raw = row[4] if isinstance(row[4], dict) else json.loads(row[4])
        yield row[0], row[1], row[2], row[3], raw


def _carry_over(connection: sa.Connection) -> None:
    """Split every old version in two, merge runs of equal parts, and carry the history columns."""
    keys_table = _table("tracked_keys", [], "id", "key_hash", "first_seen_at")
    records_table = _table("key_records", _STABLE, "key_id", "valid_from", "valid_to", "wire")
    usage_table = _table(
        "key_usage", _VOLATILE, "key_id", "valid_from", "valid_to", "wire", "usage_since", "disabled_since"
    )
    stable_names = [name for name, _, _ in _STABLE]
    volatile_names = [name for name, _, _ in _VOLATILE]
    keys: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    usage: list[dict[str, Any]] = []

    def flush(force: bool = False) -> None:
        for table, rows in ((keys_table, keys), (records_table, records), (usage_table, usage)):
            if rows and (force or len(rows) >= _BATCH):
                if table is not keys_table:
                    _flush_keys()
                connection.execute(table.insert(), rows)
                rows.clear()

    def _flush_keys() -> None:
        if keys:
            connection.execute(keys_table.insert(), keys)
            keys.clear()

    current_hash: str | None = None
    key_id = 0
    record: dict[str, Any] | None = None
    version: dict[str, Any] | None = None
    for key_hash, valid_from, valid_to, seen_at, raw in _old_versions(connection):
        row = staged_row(raw, 0)
        stable = dict(zip([*stable_names, "wire"], row[2 : 2 + len(stable_names) + 1], strict=True))
        volatile = dict(zip([*volatile_names, "wire"], row[3 + len(stable_names) :], strict=True))
        if key_hash != current_hash:
            current_hash, key_id, record, version = key_hash, key_id + 1, None, None
            keys.append({"id": key_id, "key_hash": key_hash, "first_seen_at": seen_at})
        if record is not None and record["valid_to"] == valid_from and _same(record, stable):
            record["valid_to"] = valid_to
        else:
            record = {"key_id": key_id, "valid_from": valid_from, "valid_to": valid_to, **stable}
            records.append(record)
        if version is not None and version["valid_to"] == valid_from and _same(version, volatile):
            version["valid_to"] = valid_to
        else:
            held = version is not None and (version["usage"], version["byok_usage"]) == (
                volatile["usage"],
                volatile["byok_usage"],
            )
            was_disabled = version is not None and version["disabled"]
            version = {
                "key_id": key_id,
                "valid_from": valid_from,
                "valid_to": valid_to,
                **volatile,
                "usage_since": version["usage_since"] if held and version is not None else seen_at,
                "disabled_since": (
                    (version["disabled_since"] if was_disabled and version is not None else seen_at)
                    if volatile["disabled"]
                    else None
                ),
            }
            usage.append(version)
        # A version stays open to merging until a later version of the same key could extend it;
        # flushing only whole keys keeps the merge correct.
        if len(usage) >= _BATCH or len(records) >= _BATCH:
            pending_record, pending_version = (
                records.pop() if records and records[-1] is record else None,
                (usage.pop() if usage and usage[-1] is version else None),
            )
            flush(force=True)
            if pending_record is not None:
                records.append(pending_record)
            if pending_version is not None:
                usage.append(pending_version)
    flush(force=True)


def _same(stored: dict[str, Any], part: dict[str, Any]) -> bool:
    return all(stored[name] == value for name, value in part.items())


def downgrade() -> None:
    raise NotImplementedError("0005 reshapes the store; restore a backup taken before `keyhygiene db upgrade`")
