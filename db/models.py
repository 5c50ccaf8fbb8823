"""The database schema.

Snapshots are stored as *versioned key states*: a row of ``key_states`` holds one version of one
key, valid from the snapshot that first saw it (``valid_from``) until the snapshot that first saw
it changed or gone (``valid_to``, exclusive; NULL while it is current). A key that did not change
between two syncs costs no new row, so storage grows with what changed, not with keys times runs.
The state of every key as of snapshot S is the set of rows with
``valid_from <= S AND (valid_to IS NULL OR valid_to > S)``. Only complete snapshots ever open or
close versions, because a sync writes everything in one transaction. Snapshots older than the
retention are marked `pruned` by the prune job (see db/retention.py), which keeps every version that
a report or a rule inside the retention still reads.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


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


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON(), list[str]: JSON()}


class Run(Base):
    """One job (sync, enforce, run, prune, undo, enable), however it was started, and how it ended.

    ``status``, ``exit_code`` and ``message`` are the job's outcome exactly as the command that ran
    it reported it (see keyhygiene.jobs.JobOutcome); ``summary`` holds the job's counts.
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
    message: Mapped[str | None] = mapped_column(Text)
    summary: Mapped[dict[str, Any] | None]


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
    # {workspace id: name} as the sync listed the workspaces; NULL for snapshots taken before 0006.
    workspace_names: Mapped[dict[str, Any] | None]
    new_versions: Mapped[int | None]
    error: Mapped[str | None] = mapped_column(Text)


class KeyState(Base):
    """One version of one key, valid over a range of snapshots."""

    __tablename__ = "key_states"
    __table_args__ = (
        Index("ix_key_states_hash_from", "key_hash", "valid_from"),
        Index("ix_key_states_valid_from", "valid_from"),
        Index("ix_key_states_valid_to", "valid_to"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(128))
    valid_from: Mapped[int] = mapped_column(ForeignKey("snapshots.id"))
    valid_to: Mapped[int | None] = mapped_column(ForeignKey("snapshots.id"))
    digest: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(Text)
    label: Mapped[str] = mapped_column(Text)
    workspace_id: Mapped[str | None] = mapped_column(String(64))
    disabled: Mapped[bool] = mapped_column(Boolean)
    limit: Mapped[float | None] = mapped_column("limit_usd", Float)
    limit_remaining: Mapped[float | None] = mapped_column(Float)
    limit_reset: Mapped[str | None] = mapped_column(String(32))
    include_byok_in_limit: Mapped[bool] = mapped_column(Boolean)
    usage: Mapped[float] = mapped_column(Float)
    usage_daily: Mapped[float] = mapped_column(Float)
    usage_weekly: Mapped[float] = mapped_column(Float)
    usage_monthly: Mapped[float] = mapped_column(Float)
    byok_usage: Mapped[float] = mapped_column(Float)
    byok_usage_daily: Mapped[float] = mapped_column(Float)
    byok_usage_weekly: Mapped[float] = mapped_column(Float)
    byok_usage_monthly: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]
    creator_user_id: Mapped[str | None] = mapped_column(Text)
    external_user: Mapped[str | None] = mapped_column(Text)
    raw: Mapped[dict[str, Any]]


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
    key_name: Mapped[str] = mapped_column(Text)
    workspace_id: Mapped[str | None] = mapped_column(String(64))
    rule: Mapped[str] = mapped_column(Text)
    rules: Mapped[list[str]]
    action: Mapped[str] = mapped_column(String(16))
    dry_run: Mapped[bool] = mapped_column(Boolean)
    outcome: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
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
    """

    __tablename__ = "notices"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(index=True)
    target: Mapped[str] = mapped_column(String(128))
    event: Mapped[str] = mapped_column(String(16))
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None]
    payload: Mapped[dict[str, Any]]


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
    key_name: Mapped[str] = mapped_column(Text)
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
    reason: Mapped[str | None] = mapped_column(Text)
