"""The database schema.

Snapshots are stored as *versions*: a version is valid from the snapshot that first saw it
(``valid_from``) until the snapshot that first saw it changed or gone (``valid_to``, exclusive; NULL
while it is current). The key's fields are split by how often they change (see
:mod:`keyhygiene.keysapi.fields`): the fields that change with use (usage counters,
``limit_remaining``, ``last_used_at``, ``disabled``) are versioned in the narrow ``key_usage`` table,
everything else (with any fields we do not know) in ``key_records``, which gets a new version
only when something in it changes. A key that did not change between two syncs costs no row; a
usage tick costs one narrow row. Keys are referred to by a small integer (``tracked_keys``).

The state of every key as of snapshot S is its ``key_usage`` and ``key_records`` versions with
``valid_from <= S AND (valid_to IS NULL OR valid_to > S)``; the raw JSON the API sent is rebuilt
exactly from them (``db.snapshots.keys_at``). Only complete snapshots ever open or close versions:
a sync stages its pages in ``snapshot_staging`` and records them in one transaction. Money is
integer micro-dollars (``Money``), read as ``Decimal``. Snapshots older than the retention are
marked `pruned` by the prune job (see db/retention.py).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from keyhygiene.keysapi.fields import STABLE, VOLATILE, Field, to_micros


def storable_text(text: str) -> str:
    """``text`` as every database can store it: a lone surrogate (``"\\ud800"`` is valid JSON, so the
    API can send one) and a NUL (``"\\u0000"``, which PostgreSQL refuses in text) are written out as
    their escapes; any other text is the same object."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    elif text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


class StoredText(TypeDecorator[str]):
    """Text that may hold what the API sent (a key's name, an error message quoting one), stored
    whatever it holds (``storable_text``)."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else storable_text(value)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores UTC; always hands back timezone-aware UTC datetimes (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use aware UTC times")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def result_processor(self, dialect: Dialect, coltype: Any) -> Callable[[Any], datetime | None] | None:
        if dialect.name != "sqlite":
            return super().result_processor(dialect, coltype)
        return _read_sqlite_time


def _read_sqlite_time(value: Any) -> datetime | None:
    """A time as SQLite hands it back: the naive UTC text it was stored as, read by the C parser
    with its zone attached in the same call (about 4x faster than a regular expression and a
    replace; history reads convert hundreds of thousands of these)."""
    if value is None:
        return None
    moment: datetime
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value + "+00:00")
        except ValueError:
            moment = datetime.fromisoformat(value)  # a text that carries its own offset
    else:
        moment = value
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


MAX_MICROS = 2**63 - 1
"""The largest amount, in micro-dollars, that a ``Money`` column (a 64-bit integer) holds: about
9.2 trillion US dollars."""


class Money(TypeDecorator[Decimal]):
    """USD stored as integer micro-dollars, so SQL sums are exact; read back as ``Decimal``.

    Accepts a Decimal, an int (whole dollars) or a float (converted through its shortest repr, so
    0.1 is 0.1, not 0.1000000000000000055...)."""

    impl = BigInteger
    cache_ok = True

    def process_bind_param(self, value: Decimal | float | None, dialect: Dialect) -> int | None:
        if value is None:
            return None
        return to_micros(value)

    def process_result_value(self, value: int | None, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        return Decimal(int(value)).scaleb(-6)  # micro-dollars


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON(), list[str]: JSON()}


class Run(Base):
    """One job (sync, enforce, run, prune, undo, enable), however it was started, and how it ended.

    ``status``, ``exit_code`` and ``message`` are the job's outcome exactly as the command that ran
    it reported it (see keyhygiene.jobs.JobOutcome); ``summary`` holds the job's counts.
    ``heartbeat_at``: renewed while a job run from the command line runs (it has no time limit that
    its age could be measured against); NULL for the worker's jobs, whose age is their start.
    """

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), index=True)
    started_at: Mapped[datetime] = mapped_column(index=True)
    finished_at: Mapped[datetime | None]
    dry_run: Mapped[bool | None] = mapped_column(Boolean)
    started_by: Mapped[str] = mapped_column(String(16), default="cli")
    task_id: Mapped[str | None] = mapped_column(String(64), index=True)
    allow_actions: Mapped[int | None] = mapped_column(Integer)
    exit_code: Mapped[int | None] = mapped_column(Integer)
    message: Mapped[str | None] = mapped_column(StoredText)
    summary: Mapped[dict[str, Any] | None]
    heartbeat_at: Mapped[datetime | None]


class Snapshot(Base):
    """The inventory taken by one sync. Only ``status == 'complete'`` snapshots are ever read."""

    __tablename__ = "snapshots"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    started_at: Mapped[datetime]
    taken_at: Mapped[datetime | None] = mapped_column(index=True)
    key_count: Mapped[int | None]
    workspace_counts: Mapped[dict[str, Any] | None]
    # {workspace id: name} as the sync listed the workspaces; NULL for snapshots taken before 0007.
    workspace_names: Mapped[dict[str, Any] | None]
    new_versions: Mapped[int | None]
    error: Mapped[str | None] = mapped_column(StoredText)


def _column(field: Field) -> Column[Any]:
    """The column that holds one field of the key object."""
    types: dict[str, Any] = {"text": Text(), "flag": Boolean(), "money": Money(), "time": UTCDateTime()}
    # "limit" is a reserved word in SQL.
    column_name = "limit_usd" if field.name == "limit" else field.name
    return Column(column_name, types[field.kind], key=field.name, nullable=field.nullable)


_OPEN = text("valid_to IS NULL")
"""The open (current) versions: one per key alive at the newest snapshot, found by a partial index.
The migrations make it partial on PostgreSQL too; only the SQLite form is declared here, since
declaring ``postgresql_where`` loads SQLAlchemy's PostgreSQL dialect into every command (about
60 ms of each report on SQLite)."""


def _version_indexes(table: str) -> list[Index]:
    """A key's versions in time order; versions by start and by end (prune); the one open version
    per key."""
    return [
        Index(f"ix_{table}_key_from", "key_id", "valid_from"),
        Index(f"ix_{table}_valid_from", "valid_from"),
        Index(f"ix_{table}_valid_to", "valid_to"),
        Index(f"ix_{table}_open", "key_id", unique=True, sqlite_where=_OPEN),
    ]


tracked_keys = Table(
    "tracked_keys",
    Base.metadata,
    Column("id", Integer, primary_key=True),
    Column("key_hash", String(128), nullable=False, unique=True),
    Column("first_seen_at", UTCDateTime(), nullable=False),
    Column("fingerprint", BigInteger),
)
"""Every key hash ever stored, once; versions refer to it by id. ``first_seen_at``: the time of the
first snapshot that saw it. ``fingerprint``: ``db.snapshots.fingerprint`` of the JSON its open
versions were made from, written with them (NULL until a sync records the key)."""

key_records = Table(
    "key_records",
    Base.metadata,
    Column("id", Integer, primary_key=True),
    Column("key_id", Integer, ForeignKey("tracked_keys.id"), nullable=False),
    Column("valid_from", Integer, nullable=False),
    Column("valid_to", Integer),
    *(_column(field) for field in STABLE),
    Column("wire", Text),
    *_version_indexes("key_records"),
)

key_usage = Table(
    "key_usage",
    Base.metadata,
    Column("id", Integer, primary_key=True),
    Column("key_id", Integer, ForeignKey("tracked_keys.id"), nullable=False),
    Column("valid_from", Integer, nullable=False),
    Column("valid_to", Integer),
    *(_column(field) for field in VOLATILE),
    Column("usage_since", UTCDateTime(), nullable=False),
    Column("disabled_since", UTCDateTime()),
    Column("wire", Text),
    Column("spent_from", UTCDateTime()),
    *_version_indexes("key_usage"),
)
"""``usage_since``: when the version's (usage, byok_usage) pair was first seen, carried over while
it holds; ``disabled_since``: when the trailing run of disabled versions began (NULL: enabled);
``spent_from`` (since migration 0020): the latest start of a UTC day, week or month in which a
snapshot saw the key spend (a window counter above zero), this version's or an earlier one's
(NULL: none seen);
``wire`` (here and in ``key_records``): the exact JSON of what the typed columns do not give back
(absent fields, sub-micro-dollar digits, other time styles, and in records fields we do not know),
NULL for nearly every row. ``valid_from`` and ``valid_to`` are snapshot ids without a foreign key
(since migration 0014): every version a sync writes names the snapshot it records, and checking
that one row once per version was a third of the time PostgreSQL took to write them; ``prune`` keeps
every snapshot row that a kept version begins or ends at. ``key_id`` references ``tracked_keys``:
a foreign key on SQLite; on PostgreSQL (migration 0016) statement triggers check the same for all
the rows of a statement at once, where the foreign key checked and locked the key's row once per
version."""

snapshot_staging = Table(
    "snapshot_staging",
    Base.metadata,
    Column("snapshot_id", Integer, nullable=False),
    Column("key_hash", String(128), nullable=False),
    Column("key_id", Integer),
    *(_column(field) for field in STABLE),
    Column("record_wire", Text),
    *(_column(field) for field in VOLATILE),
    Column("usage_wire", Text),
    Column("fingerprint", BigInteger),
    Index("ix_snapshot_staging_snapshot_key", "snapshot_id", "key_id"),
)

snapshot_carried = Table(
    "snapshot_carried",
    Base.metadata,
    Column("snapshot_id", Integer, primary_key=True),
    Column("key_id", Integer, primary_key=True),
    sqlite_with_rowid=False,
)
"""Keys a sync in progress listed exactly as the store holds them (their tracked id): recorded by
keeping their open versions, with no staging row. Like ``snapshot_staging``, UNLOGGED on
PostgreSQL (migration 0015): a server crash empties both, and the sync that was running fails
when it finds fewer keys staged than it listed."""


class Action(Base):
    """The audit log: one row per planned or executed change to a key.

    A row is written and committed with outcome ``pending`` *before* the API call and completed
    after it; a ``pending`` row left behind by a crash is in doubt, and the next enforcement settles
    it from the key's fresh state.
    """

    __tablename__ = "actions"
    __table_args__ = (Index("ix_actions_key_created", "key_hash", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(index=True)
    finished_at: Mapped[datetime | None]
    key_hash: Mapped[str] = mapped_column(String(128))
    key_name: Mapped[str] = mapped_column(StoredText)
    workspace_id: Mapped[str | None] = mapped_column(String(64))
    rule: Mapped[str] = mapped_column(Text)
    rules: Mapped[list[str]]
    action: Mapped[str] = mapped_column(String(16))
    dry_run: Mapped[bool] = mapped_column(Boolean)
    outcome: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(StoredText)
    error: Mapped[str | None] = mapped_column(StoredText)
    evidence: Mapped[dict[str, Any]]
    # The key's updated_at as the API answered a change that was done; later changes by anyone
    # else show up as a different updated_at.
    key_updated_at: Mapped[datetime | None]


class Lease(Base):
    """A named lock held in the database: the enforcement lease (see db/leases.py).

    ``token`` is NULL while nobody holds it; a holder keeps ``expires_at`` in the future by renewing
    it, and a lease past ``expires_at`` belongs to a holder that died and may be taken over.
    """

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    token: Mapped[str | None] = mapped_column(String(64))
    host: Mapped[str | None] = mapped_column(String(255))
    pid: Mapped[int | None]
    # Where ``pid`` means something: the kernel boot and PID namespace of the holder.
    process_space: Mapped[str | None] = mapped_column(String(128))
    job: Mapped[str | None] = mapped_column(String(16))
    acquired_at: Mapped[datetime | None]
    renewed_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]


class Notice(Base):
    """One message to one notify target: sent, or failed and kept to be retried once by the next run.

    The target is named as in the rules file; its URL is a secret read from the environment and is
    never stored. ``payload`` is the JSON body (key names and hashes, never a key's secret).
    ``created_at`` is when it was first recorded; ``claimed_at`` when a run claimed its one retry
    (NULL until then, and for retries claimed before migration 0017): a retry claimed longer ago
    than any send may take was cut short, and a later run gives it up (``db.notices.undelivered``).
    """

    __tablename__ = "notices"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(index=True)
    target: Mapped[str] = mapped_column(String(128))
    event: Mapped[str] = mapped_column(String(16))
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(StoredText)
    sent_at: Mapped[datetime | None]
    payload: Mapped[dict[str, Any]]
    claimed_at: Mapped[datetime | None]


class Announcement(Base):
    """A key announced to a target as coming up for a rule's action on a due date: said once."""

    __tablename__ = "announcements"
    __table_args__ = (Index("ux_announcements_once", "target", "key_hash", "rule", "action", "due", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    target: Mapped[str] = mapped_column(String(128))
    key_hash: Mapped[str] = mapped_column(String(128))
    rule: Mapped[str] = mapped_column(Text)
    action: Mapped[str] = mapped_column(String(16))
    due: Mapped[datetime] = mapped_column(index=True)
    notice_id: Mapped[int] = mapped_column(ForeignKey("notices.id"))


class StoredPlan(Base):
    """A plan's decisions as dry runs and refusals record them, stored once per distinct content.

    ``digest`` is a SHA-256 of the entries (``db.audit.plan_digest``): a run whose plan equals one
    already stored records only a ``RunPlan`` pointing here, not its decisions key by key again.
    """

    __tablename__ = "plans"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    decisions: Mapped[int]
    created_at: Mapped[datetime]


class PlanEntry(Base):
    """One decision of a stored plan (the evidence without the day counts that only age with time)."""

    __tablename__ = "plan_entries"
    __table_args__ = (Index("ix_plan_entries_plan", "plan_id", "key_hash"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    plan_id: Mapped[int] = mapped_column(ForeignKey("plans.id"))
    key_hash: Mapped[str] = mapped_column(String(128))
    key_name: Mapped[str] = mapped_column(StoredText)
    workspace_id: Mapped[str | None] = mapped_column(String(64))
    rule: Mapped[str] = mapped_column(Text)
    rules: Mapped[list[str]]
    action: Mapped[str] = mapped_column(String(16))
    evidence: Mapped[dict[str, Any]]


class RunPlan(Base):
    """What one dry run planned, or what one refused run would have changed: one row per run, by
    reference to a ``StoredPlan``. Read back key by key, it is that run's audit records."""

    __tablename__ = "run_plans"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    plan_id: Mapped[int] = mapped_column(ForeignKey("plans.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(index=True)
    dry_run: Mapped[bool] = mapped_column(Boolean)
    outcome: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(StoredText)
