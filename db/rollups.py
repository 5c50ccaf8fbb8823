"""Roll-ups: what the reports aggregate, kept up to date by each sync in the sync's transaction.

Three tables, each small next to the versions they summarise:

- ``key_rollups``: one row per tracked key (by its ``tracked_keys`` id), its running state: the
  counters as last seen and when it was first seen (since when its usage has held is on its usage
  version, ``key_usage.usage_since``). It is what makes the other two incremental: a sync compares
  the keys it stored (``db.snapshots.alive_at``) with it and writes only what moved. A key that
  retention forgets entirely loses its row with it.
- ``key_days``: per key and UTC day, only where something happened: the spend of the steps whose
  later snapshot fell on that day (growth of ``usage`` and ``byok_usage`` since the key's previous
  observation; a counter that goes down counts zero), and, on the day a key was first seen, its
  counters then (spend only when the key was created inside the period a report asks about). Only
  the key's id and numbers: its name, workspace and owner are read from its record versions, so a
  row costs about 30 bytes (a year of 10,000 keys that spend daily is ~3.6 million of them).
- ``snapshot_rollups``: per complete snapshot and workspace, the counts ``report trends`` shows
  (keys, disabled, expired, without expiry, without limit, idle 30 days or more) and the spend of
  that snapshot's steps. Per snapshot rather than per day so that a report ``--at`` any time reads
  exactly the last snapshot of each day before it; a year of hourly syncs is still only
  ~9,000 rows per workspace.

Idle 30 days or more is the rules engine's ``unused`` reading (``keyhygiene.rules.idle_since``)
with ``idle_for = "30d"``, written here as SQL over the running state: a sign of use is
``last_used_at`` or a move of usage after the key was first seen; with none, a null
``last_used_at`` shows idleness since 2026-01-01 (where the API gave the field at all) and the
history since the first sighting.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Date,
    Index,
    Integer,
    String,
    and_,
    case,
    delete,
    false,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    true,
    type_coerce,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from keyhygiene.keysapi.fields import FIELDS_BY_NAME, MICROS_PER_USD
from keyhygiene.timeutil import SPEND_WINDOWS, window_starts

from . import snapshots
from .bulkload import indexes_built_after
from .models import Base, Money, Snapshot, UTCDateTime, key_records, key_usage, tracked_keys

IDLE_FOR = timedelta(days=30)
LAST_USED_RECORDED_FROM = datetime(2026, 1, 1, tzinfo=UTC)
"""OpenRouter records no use before this (the same fact as ``keyhygiene.rules.engine``)."""
NO_WORKSPACE = ""


STREAMED = {"yield_per": 2000}
"""Execution options of a read streamed row by row into Python: on PostgreSQL a server-side cursor
(psycopg otherwise fetches the whole result first: 100,000 keys' spend rows, +130 MB); SQLite's
cursor streams anyway."""


class KeyRollup(Base):
    """One key's running state, as of the newest snapshot that saw it."""

    __tablename__ = "key_rollups"

    key_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    """Its ``tracked_keys.id`` (on SQLite the rowid: each sync joins every alive key to its row)."""
    first_seen_at: Mapped[datetime]
    usage: Mapped[Decimal] = mapped_column(Money)
    byok_usage: Mapped[Decimal] = mapped_column(Money)


_FIRST_DAY = text("first_seen_at IS NOT NULL")


class KeyDay(Base):
    """What one key (``tracked_keys.id``) spent on one UTC day (only days where it spent or was
    first seen)."""

    __tablename__ = "key_days"
    __table_args__ = (
        # Reports look up the keys first seen in a period; the row of a key's first day is rare.
        # (Partial on PostgreSQL too, by its migration: see ``db.models._OPEN``.)
        Index("ix_key_days_first_seen_at", "first_seen_at", sqlite_where=_FIRST_DAY),
        # SQLite: the rows live in the primary key's b-tree, with no rowid and no second index.
        {"sqlite_with_rowid": False},
    )

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    key_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    usage: Mapped[Decimal] = mapped_column(Money)
    byok_usage: Mapped[Decimal] = mapped_column(Money)
    first_seen_at: Mapped[datetime | None]
    first_usage: Mapped[Decimal | None] = mapped_column(Money)
    first_byok_usage: Mapped[Decimal | None] = mapped_column(Money)


class SnapshotRollup(Base):
    """The counts of one workspace's keys at one complete snapshot, and that snapshot's spend."""

    __tablename__ = "snapshot_rollups"

    snapshot_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    workspace_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    taken_at: Mapped[datetime] = mapped_column(index=True)
    keys: Mapped[int]
    disabled: Mapped[int]
    expired: Mapped[int]
    no_expiry: Mapped[int]
    no_limit: Mapped[int]
    idle_30d: Mapped[int]
    usage: Mapped[Decimal] = mapped_column(Money)
    byok_usage: Mapped[Decimal] = mapped_column(Money)


COUNTS = ("keys", "disabled", "expired", "no_expiry", "no_limit", "idle_30d")


def _upsert(session: Session, table: Any) -> Any:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects import postgresql  # loaded by the sync that writes, not by every report

        return postgresql.insert(table)
    from sqlalchemy.dialects import sqlite

    return sqlite.insert(table)


def _grown(new: Any, old: Any) -> Any:
    """A step's spend: how much a lifetime counter grew (zero when it went down)."""
    return case((new > old, new - old), else_=literal(0))


_COUNTED = (
    "usage",
    "byok_usage",
    "last_used_at",
    "disabled",
    "created_at",
    "expires_at",
    "limit",
    "workspace_id",
    *(f"{kind}_{window}" for window in SPEND_WINDOWS for kind in ("usage", "byok_usage")),
)
_MOVED = ("usage", "byok_usage")


def _alive(snapshot_id: int, newest: bool, names: tuple[str, ...]) -> Any:
    """The keys alive at the snapshot with the named fields, ``key_id`` and ``usage_since``. At the
    newest one, from the open versions of only the tables that hold those fields (each sync reads
    every alive key three times here: a join it does not need is 10,000 index seeks a day)."""
    u, r = key_usage, key_records
    if not newest:
        return snapshots.alive_at(snapshot_id).add_columns(u.c.wire.label("usage_wire")).subquery("alive")
    columns = [(u if FIELDS_BY_NAME[name].volatile else r).c[name].label(name) for name in names]
    query = select(u.c.key_id, u.c.usage_since, u.c.spent_from, u.c.wire.label("usage_wire"), *columns)
    query = query.where(u.c.valid_to.is_(None))
    if any(not FIELDS_BY_NAME[name].volatile for name in names):
        query = query.join_from(u, r, and_(r.c.key_id == u.c.key_id, r.c.valid_to.is_(None)))
    return query.subquery("alive")


def record_rollups(session: Session, *, snapshot_id: int, taken_at: datetime, keys: int = 0) -> None:
    """Bring the roll-ups up to complete snapshot ``snapshot_id`` (the newest), in the caller's
    transaction. Writes one ``key_days`` and ``key_rollups`` row per key whose usage moved or that
    is new, and the snapshot's ``snapshot_rollups`` rows from one aggregate. ``keys``: how many
    keys the snapshot holds, when the caller knows (``db.bulkload``: a store's first snapshot
    writes a ``key_days`` row for each)."""
    newest = snapshots.is_newest(session, snapshot_id)
    state = KeyRollup.__table__
    day = taken_at.astimezone(UTC).date()
    at = literal(taken_at, UTCDateTime())
    # No running state at all (a store's first snapshot): every key is new, and the statements
    # below leave the empty table out instead of joining it (PostgreSQL looked it up once per key:
    # 100,000 keys, 0.05 s).
    stateless = session.scalar(select(state.c.key_id).limit(1)) is None
    known: Any = false() if stateless else state.c.key_id.is_not(None)
    first_seen: Any = at if stateless else func.coalesce(state.c.first_seen_at, at)

    def against_state(alive: Any) -> tuple[Any, Any, Any, Any]:
        """The alive keys joined to their running state; each one's step spend; whether it moved."""
        if stateless:
            return alive, literal(0), literal(0), true()
        step_usage = case((known, _grown(alive.c.usage, state.c.usage)), else_=literal(0))
        step_byok = case((known, _grown(alive.c.byok_usage, state.c.byok_usage)), else_=literal(0))
        moved = or_(~known, alive.c.usage != state.c.usage, alive.c.byok_usage != state.c.byok_usage)
        return alive.outerjoin(state, state.c.key_id == alive.c.key_id), step_usage, step_byok, moved

    alive = _alive(snapshot_id, newest, _COUNTED)
    joined, step_usage, step_byok, _ = against_state(alive)

    # 1. The snapshot's counts, from the state before this snapshot moved it.
    cutoff = taken_at - IDLE_FOR
    # Since when usage has held: the store's own answer (``key_usage.usage_since``), the one the
    # rules and the idle report read, so every report agrees on it.
    changed_at = alive.c.usage_since
    used_later = changed_at > first_seen
    # Where the API left ``last_used_at`` out (older API versions), its null says nothing: only
    # the history shows idleness (the rules' ``reports_last_used``). The usage version's note lists
    # the fields left out (``"-":[...]``, written compactly with sorted keys); a time of another
    # style is noted as ``"last_used_at":`` under ``"="``, which neither pattern matches.
    note = alive.c.usage_wire
    omitted = and_(note.is_not(None), or_(note.like('%"last_used_at"]%'), note.like('%"last_used_at",%')))
    has_sign = or_(alive.c.last_used_at.is_not(None), used_later)
    signs_old = and_(
        or_(alive.c.last_used_at.is_(None), alive.c.last_used_at <= cutoff), or_(~used_later, changed_at <= cutoff)
    )
    # A null last_used_at proves no use since OpenRouter began recording it, unless the key was
    # created since and has spent (``keyhygiene.rules.engine._null_last_use_contradicted``).
    contradicted = and_(alive.c.created_at >= LAST_USED_RECORDED_FROM, or_(alive.c.usage > 0, alive.c.byok_usage > 0))
    idle_from_old = or_(and_(literal(cutoff >= LAST_USED_RECORDED_FROM), ~contradicted, ~omitted), first_seen <= cutoff)
    idle = and_(alive.c.created_at <= cutoff, case((has_sign, signs_old), else_=idle_from_old))
    # Spend in a window that began after the cutoff is use inside the 30 days: as this snapshot's
    # counters show it, or as an earlier snapshot's did (``spent_from``). The engine's
    # ``window_use_from`` and ``KeyHistory.spent_from``.
    starts = window_starts(taken_at)
    spent_recently = [
        or_(alive.c[f"usage_{window}"] > 0, alive.c[f"byok_usage_{window}"] > 0)
        for window in SPEND_WINDOWS
        if starts[window] > cutoff
    ]
    spent_recently.append(and_(alive.c.spent_from.is_not(None), alive.c.spent_from > cutoff))
    idle = and_(idle, ~or_(*spent_recently))

    def flag(condition: Any) -> Any:
        return case((condition, 1), else_=0)

    # Each key's flags and step spend first, then the sums per workspace. OFFSET 0 keeps the
    # databases from merging the two (on SQLite it renders LIMIT -1 OFFSET 0): merged, SQLite
    # sorts every key's fields for the grouping and evaluates each condition after, where now it
    # sorts a few small integers (100,000 keys: 0.36 s against 0.31 s; PostgreSQL the same either way).
    per_key = (
        select(
            func.coalesce(alive.c.workspace_id, NO_WORKSPACE).label("workspace_id"),
            flag(alive.c.disabled).label("disabled"),
            flag(and_(alive.c.expires_at.is_not(None), alive.c.expires_at <= taken_at)).label("expired"),
            flag(alive.c.expires_at.is_(None)).label("no_expiry"),
            flag(alive.c.limit.is_(None)).label("no_limit"),
            flag(idle).label("idle_30d"),
            step_usage.label("usage"),
            step_byok.label("byok_usage"),
        )
        .select_from(joined)
        .offset(0)
        .subquery("per_key")
    )
    counts = select(
        literal(snapshot_id).label("snapshot_id"),
        per_key.c.workspace_id,
        at.label("taken_at"),
        func.count().label("keys"),
        *(func.coalesce(func.sum(per_key.c[name]), 0) for name in (*COUNTS[1:], "usage", "byok_usage")),
    ).group_by(per_key.c.workspace_id)
    session.execute(delete(SnapshotRollup).where(SnapshotRollup.snapshot_id == snapshot_id))
    session.execute(
        insert(SnapshotRollup).from_select(
            ["snapshot_id", "workspace_id", "taken_at", *COUNTS, "usage", "byok_usage"], counts
        )
    )

    # 2. Spend per key and day: only keys that moved or are new.
    alive = _alive(snapshot_id, newest, _MOVED)
    joined, step_usage, step_byok, moved = against_state(alive)
    days = KeyDay.__table__
    new_days = (
        select(
            literal(day, Date()).label("day"),
            alive.c.key_id,
            step_usage.label("usage"),
            step_byok.label("byok_usage"),
            case((known, None), else_=at).label("first_seen_at"),
            case((known, None), else_=alive.c.usage).label("first_usage"),
            case((known, None), else_=alive.c.byok_usage).label("first_byok_usage"),
        )
        .select_from(joined)
        .where(moved)
    )
    # The running state of the keys that moved (step 3).
    new_state = (
        select(
            alive.c.key_id,
            first_seen.label("first_seen_at"),
            alive.c.usage,
            alive.c.byok_usage,
        )
        .select_from(joined)
        .where(moved)
        .order_by(alive.c.key_id)  # in the primary key's order: appended, not scattered
    )
    # On a store's first snapshot both tables are empty: nothing to merge with, and a plain insert
    # costs PostgreSQL half what an upsert does (100,000 rows: 0.23 s against 0.45 s).
    first = stateless and session.scalar(select(days.c.key_id).limit(1)) is None
    if first:
        with indexes_built_after(session, days, rows=keys):
            session.execute(insert(KeyDay).from_select(list(new_days.selected_columns.keys()), new_days))
        session.execute(insert(KeyRollup).from_select(list(new_state.selected_columns.keys()), new_state))
        return
    insert_days = _upsert(session, days).from_select(list(new_days.selected_columns.keys()), new_days)
    excluded = insert_days.excluded
    session.execute(
        insert_days.on_conflict_do_update(
            index_elements=[days.c.day, days.c.key_id],
            set_={
                "usage": days.c.usage + excluded.usage,
                "byok_usage": days.c.byok_usage + excluded.byok_usage,
                "first_seen_at": func.coalesce(days.c.first_seen_at, excluded.first_seen_at),
                "first_usage": func.coalesce(days.c.first_usage, excluded.first_usage),
                "first_byok_usage": func.coalesce(days.c.first_byok_usage, excluded.first_byok_usage),
            },
        )
    )

    # 3. The running state of the keys that moved (``new_state``, above).
    insert_state = _upsert(session, state).from_select(list(new_state.selected_columns.keys()), new_state)
    session.execute(
        insert_state.on_conflict_do_update(
            index_elements=[state.c.key_id],
            set_={
                "usage": insert_state.excluded.usage,
                "byok_usage": insert_state.excluded.byok_usage,
            },
        )
    )


def rebuild_rollups(session: Session) -> int:
    """Recompute every roll-up from the stored history, oldest snapshot first; returns how many
    snapshots were replayed. For the migration that introduces roll-ups and for checking them."""
    for table in (SnapshotRollup, KeyDay, KeyRollup):
        session.execute(delete(table))
    replayed = 0
    # Only the columns it needs: the migration that calls it runs before later columns exist.
    complete = select(Snapshot.id, Snapshot.taken_at).where(Snapshot.status == snapshots.COMPLETE).order_by(Snapshot.id)
    for snapshot_id, taken_at in session.execute(complete).all():
        assert taken_at is not None
        record_rollups(session, snapshot_id=snapshot_id, taken_at=taken_at)
        replayed += 1
    return replayed


def prune_rollups(session: Session, *, anchor_id: int, anchor_taken_at: datetime, limit: int) -> int:
    """Drop up to about ``limit`` roll-up rows older than the retention's anchor (the oldest
    snapshot kept whole): per-snapshot counts before it, then key days before its UTC day, oldest
    first. Returns the rows deleted; 0 when nothing is left to drop. ``key_rollups`` stays: one row
    per tracked key, which a key that comes back still needs (it goes with the key, when retention
    forgets the key: ``db.retention.delete_forgotten_keys``)."""
    counts = SnapshotRollup.__table__
    doomed = list(
        session.scalars(
            select(counts.c.snapshot_id)
            .where(counts.c.snapshot_id < anchor_id)
            .distinct()
            .order_by(counts.c.snapshot_id)
            .limit(max(1, limit // 10))
        )
    )
    if doomed:
        result = session.execute(delete(SnapshotRollup).where(SnapshotRollup.snapshot_id.in_(doomed)))
        return int(getattr(result, "rowcount", 0) or 0)
    days = KeyDay.__table__
    oldest = session.scalar(select(func.min(days.c.day)).where(days.c.day < anchor_taken_at.astimezone(UTC).date()))
    if oldest is None:
        return 0
    result = session.execute(delete(KeyDay).where(KeyDay.day == oldest))
    return int(getattr(result, "rowcount", 0) or 0)


# -- reading ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DayCounts:
    """The keys by state at the last snapshot of one UTC day."""

    day: date
    snapshot_id: int
    taken_at: datetime
    keys: int
    disabled: int
    expired: int
    no_expiry: int
    no_limit: int
    idle_30d: int


def day_counts(
    session: Session, *, start: datetime, end: datetime, workspaces: tuple[str, ...] = ()
) -> list[DayCounts]:
    """Per UTC day with a complete snapshot in ``(start, end]``: the counts at its last one, oldest
    first. A snapshot holds no roll-up row for a workspace without keys (nor any row when it holds no
    key at all): such a day counts zero, it is neither skipped nor read at an earlier snapshot."""
    # One row per snapshot in the period (a year of hourly syncs is 8,760): the last of each day.
    # Complete snapshots only: the retention marks a snapshot pruned before it drops its roll-ups.
    last_of_day: dict[date, tuple[int, datetime]] = {}
    for snapshot_id, taken_at in session.execute(
        select(Snapshot.id, Snapshot.taken_at)
        .where(Snapshot.status == snapshots.COMPLETE, Snapshot.taken_at > start, Snapshot.taken_at <= end)
        .order_by(Snapshot.id)
    ):
        assert taken_at is not None  # bounded by the period
        last_of_day[taken_at.astimezone(UTC).date()] = (snapshot_id, taken_at)
    chosen = sorted(last_of_day.values())
    table = SnapshotRollup.__table__
    in_workspaces = [table.c.workspace_id.in_(workspaces)] if workspaces else []
    result: list[DayCounts] = []
    for start_index in range(0, len(chosen), 500):
        batch = chosen[start_index : start_index + 500]
        sums = {
            row[0]: row[1:]
            for row in session.execute(
                select(table.c.snapshot_id, *(func.sum(table.c[name]) for name in COUNTS))
                .where(table.c.snapshot_id.in_([snapshot_id for snapshot_id, _ in batch]), *in_workspaces)
                .group_by(table.c.snapshot_id)
            )
        }
        for snapshot_id, taken_at in batch:
            counts = sums.get(snapshot_id, (0,) * len(COUNTS))
            result.append(
                DayCounts(
                    taken_at.astimezone(UTC).date(), snapshot_id, taken_at, *(int(value or 0) for value in counts)
                )
            )
    return result


@dataclass(frozen=True, slots=True)
class DaySpend:
    day: date
    usage: float
    byok_usage: float


def first_sight_in(start: datetime, end: datetime | None, workspaces: tuple[str, ...] = ()) -> list[Any]:
    """The ``key_days`` rows that hold what a key created inside ``(start, end]`` had spent when it
    was first seen, in that period: spend the snapshots' steps do not hold (``end`` None: no end)."""
    days = KeyDay.__table__

    def at_first_sight(column: Any) -> Any:
        # Looked up per first-seen row (few), from the key's first record version: the workspace
        # it was in when first seen, as that snapshot's counts (``day_counts``) place it.
        return (
            select(column)
            .where(key_records.c.key_id == days.c.key_id)
            .order_by(key_records.c.valid_from)
            .limit(1)
            .scalar_subquery()
        )

    where = [days.c.first_seen_at > start, at_first_sight(key_records.c.created_at) > start]
    if end is not None:
        where.append(days.c.first_seen_at <= end)
    if workspaces:
        where.append(at_first_sight(key_records.c.workspace_id).in_(workspaces))
    return where


def spend_by_day(
    session: Session, *, start: datetime, end: datetime, workspaces: tuple[str, ...] = ()
) -> Iterator[DaySpend]:
    """Spend per UTC day over ``(start, end]``: the steps of the snapshots taken inside it, plus
    what keys created inside it had spent when first seen. Days without spend have no row."""
    steps = SnapshotRollup.__table__
    step_where = [steps.c.taken_at > start, steps.c.taken_at <= end]
    if workspaces:
        step_where.append(steps.c.workspace_id.in_(workspaces))
    per_snapshot = list(
        session.execute(
            select(steps.c.taken_at, func.sum(steps.c.usage), func.sum(steps.c.byok_usage))
            .where(*step_where)
            .group_by(steps.c.taken_at)
        )
    )
    days = KeyDay.__table__
    firsts = session.execute(
        select(days.c.day, func.sum(days.c.first_usage), func.sum(days.c.first_byok_usage))
        .where(*first_sight_in(start, end, workspaces))
        .group_by(days.c.day)
    )
    totals: dict[date, list[float]] = {}
    for taken_at, credit, byok in per_snapshot:
        entry = totals.setdefault(taken_at.date(), [0.0, 0.0])
        entry[0] += _usd(credit)
        entry[1] += _usd(byok)
    for first_day, credit, byok in firsts:
        entry = totals.setdefault(first_day, [0.0, 0.0])
        entry[0] += _usd(credit)
        entry[1] += _usd(byok)
    for spend_day in sorted(totals):
        credit, byok = totals[spend_day]
        if credit or byok:
            yield DaySpend(spend_day, credit, byok)


@dataclass(frozen=True, slots=True)
class SpendRow:
    """Spend of one key on one UTC day (``usage``/``byok_usage``, growth since its previous
    observation), or its first observation (``first_seen_at`` set, with its counters then)."""

    key_hash: str
    day: date
    name: str
    workspace_id: str | None
    creator_user_id: str | None
    created_at: datetime | None
    usage: float = 0.0
    byok_usage: float = 0.0
    first_seen_at: datetime | None = None
    first_usage: float = 0.0
    first_byok_usage: float = 0.0
    whole_day: bool = False
    """The key's row of a whole UTC day (``key_days``): one per key and day, and only with spend.
    Else a step of a day the range covers in part (several a day), or a first observation."""
    day_listed: bool = False
    """A first observation whose key and day also came as a whole day's row (it had a step too)."""


def spend_rows(
    session: Session, *, after_snapshot: int, until_snapshot: int, per_day: bool = True
) -> Iterator[SpendRow]:
    """What keys spent at the complete snapshots ``(after_snapshot, until_snapshot]``, streamed:
    whole UTC days from ``key_days``, and the steps of a day the range covers only in part (its
    first and last day, when other snapshots of them lie outside) from the versions; plus the
    first observation of every key first seen in the range. Only keys that spent or were first
    seen have rows, with the name, workspace and owner of the key's record as of ``until_snapshot``
    (or its last one, for a key deleted before). Without ``per_day``, the whole days come summed in
    SQL, one row per key on its last day there: totals, not a daily series."""
    inside = _snapshots_between(session, after_snapshot, until_snapshot)
    if not inside:
        return
    first_day, last_day = inside[0][1].date(), inside[-1][1].date()
    lower = session.scalar(select(Snapshot.taken_at).where(Snapshot.id == after_snapshot))
    outside_days = _partial_days(session, lower, until_snapshot, (first_day, last_day))
    whole = [
        inside_day
        for inside_day in sorted({taken_at.date() for _, taken_at in inside})
        if inside_day not in outside_days
    ]
    upper = inside[-1][1]
    days, t = KeyDay.__table__, tracked_keys
    record = _records_at(until_snapshot)
    described = (t.c.key_hash, record.c.name, record.c.workspace_id, record.c.creator_user_id)

    def joined(source: Any) -> Any:
        return source.join(t, t.c.id == source.c.key_id).outerjoin(record, record.c.key_id == source.c.key_id)

    # A key's row of a whole day of the range, with spend: what the whole days are read from.
    whole_spent = (
        and_(days.c.day >= whole[0], days.c.day <= whole[-1], or_(days.c.usage > 0, days.c.byok_usage > 0))
        if whole
        else false()
    )
    if whole and not per_day:
        totals = (
            select(
                days.c.key_id,
                func.max(days.c.day).label("day"),
                # Summed as the integer micro-dollars they are stored as: exact.
                func.sum(type_coerce(days.c.usage, BigInteger)).label("usage"),
                func.sum(type_coerce(days.c.byok_usage, BigInteger)).label("byok_usage"),
            )
            .where(whole_spent)
            .group_by(days.c.key_id)
            .subquery()
        )
        summed = session.execute(
            select(*described, totals.c.day, totals.c.usage, totals.c.byok_usage).select_from(joined(totals)),
            execution_options=STREAMED,
        )
        for key_hash, name, workspace_id, creator, last_day, credit, byok in summed:
            yield SpendRow(
                key_hash, last_day, name or "", workspace_id, creator, None, _micros_usd(credit), _micros_usd(byok)
            )
    elif whole:
        # The bulk of a long period: only the columns a step needs (no times to convert).
        steps = session.execute(
            select(*described, days.c.day, days.c.usage, days.c.byok_usage)
            .select_from(joined(days))
            .where(whole_spent),
            execution_options=STREAMED,
        )
        for key_hash, name, workspace_id, creator, step_day, credit, byok in steps:
            yield SpendRow(
                key_hash, step_day, name or "", workspace_id, creator, None, _usd(credit), _usd(byok), whole_day=True
            )
    first_in_range = and_(days.c.first_seen_at <= upper, days.c.first_seen_at > lower if lower is not None else true())
    listed = whole_spent if per_day else false()  # the first sight's day came as a row above
    firsts = session.execute(
        select(
            *described,
            record.c.created_at,
            days.c.day,
            days.c.first_seen_at,
            days.c.first_usage,
            days.c.first_byok_usage,
            listed,
        )
        .select_from(joined(days))
        .where(first_in_range),
        execution_options=STREAMED,
    )
    for key_hash, name, workspace_id, creator, created_at, first_day, first_seen_at, credit, byok, also in firsts:
        yield SpendRow(
            key_hash=key_hash,
            day=first_day,
            name=name or "",
            workspace_id=workspace_id,
            creator_user_id=creator,
            created_at=created_at,
            first_seen_at=first_seen_at,
            first_usage=_usd(credit),
            first_byok_usage=_usd(byok),
            day_listed=bool(also),
        )
    # The steps of the days only partly inside the range, one sum per key and day (a day of hourly
    # syncs is up to 24 steps a key: 100,000 keys, ~450,000 rows read into Python only to be added).
    partial: dict[date, list[int]] = {}
    for snapshot_id, taken_at in inside:
        if taken_at.date() in outside_days:
            partial.setdefault(taken_at.date(), []).append(snapshot_id)
    for day, snapshot_ids in sorted(partial.items()):
        yield from _steps_at(session, snapshot_ids, until_snapshot, day)


def _records_at(until_snapshot: int | None) -> Any:
    """Each key's record version as of snapshot ``until_snapshot`` (the newest one begun at or
    before it; the newest of all for None), as a subquery: ``key_id``, ``name``, ``workspace_id``,
    ``creator_user_id``, ``created_at``. Records change rarely: one group over them, not the usage."""
    r = key_records
    newest = select(r.c.key_id, func.max(r.c.valid_from).label("valid_from")).group_by(r.c.key_id)
    if until_snapshot is not None:
        newest = newest.where(r.c.valid_from <= until_snapshot)
    chosen = newest.subquery("newest")
    return (
        select(r.c.key_id, r.c.name, r.c.workspace_id, r.c.creator_user_id, r.c.created_at)
        .join(chosen, and_(r.c.key_id == chosen.c.key_id, r.c.valid_from == chosen.c.valid_from))
        .subquery("record")
    )


def _snapshots_between(session: Session, after: int, until: int) -> list[tuple[int, datetime]]:
    table = Snapshot
    rows = session.execute(
        select(table.id, table.taken_at)
        .where(table.status == snapshots.COMPLETE, table.id > after, table.id <= until)
        .order_by(table.id)
    )
    return [(snapshot_id, taken_at) for snapshot_id, taken_at in rows if taken_at is not None]


def _partial_days(session: Session, lower: datetime | None, until: int, ends: tuple[date, date]) -> set[date]:
    """Which of the range's first and last day ``key_days`` holds steps of outside the range: the
    first day when the snapshot before the range (``lower``) was taken on it (pruned snapshots of
    that day included, which may no longer exist), the last day when a later complete snapshot was."""
    first_day, last_day = ends
    partial: set[date] = set()
    if lower is not None and lower.date() == first_day:
        partial.add(first_day)
    midnight = datetime(last_day.year, last_day.month, last_day.day, tzinfo=UTC)
    later = session.scalar(
        select(func.count())
        .select_from(Snapshot)
        .where(
            Snapshot.status == snapshots.COMPLETE,
            Snapshot.id > until,
            Snapshot.taken_at < midnight + timedelta(days=1),
        )
    )
    if later:
        partial.add(last_day)
    return partial


def _steps_at(session: Session, snapshot_ids: list[int], until_snapshot: int, day: date) -> Iterator[SpendRow]:
    """The steps (growth since the key's previous usage version) of the keys whose usage moved at
    these snapshots (all taken on ``day``), summed per key in SQL, read from the versions: a key's
    previous observation is its previous version. Each key is described as its record stood at
    ``until_snapshot`` (the period's end), as the whole days are: a key renamed or moved on the
    last day is named as it ended up."""
    new = key_usage.alias("new")
    old = key_usage.alias("old")
    record = _records_at(until_snapshot)
    before = (
        select(func.max(key_usage.c.valid_from))
        .where(key_usage.c.key_id == new.c.key_id, key_usage.c.valid_from < new.c.valid_from)
        .scalar_subquery()
    )
    its_record = record.c.key_id == new.c.key_id
    described = (
        tracked_keys.c.key_hash,
        record.c.name,
        record.c.workspace_id,
        record.c.creator_user_id,
        record.c.created_at,
    )
    rows = session.execute(
        select(
            *described,
            func.sum(type_coerce(_grown(new.c.usage, old.c.usage), BigInteger)),
            func.sum(type_coerce(_grown(new.c.byok_usage, old.c.byok_usage), BigInteger)),
        )
        .join(tracked_keys, tracked_keys.c.id == new.c.key_id)
        .join(record, its_record)
        .join(old, and_(old.c.key_id == new.c.key_id, old.c.valid_from == before))
        .where(
            new.c.valid_from.in_(snapshot_ids), or_(new.c.usage != old.c.usage, new.c.byok_usage != old.c.byok_usage)
        )
        .group_by(*described)
        .order_by(tracked_keys.c.key_hash),
        execution_options=STREAMED,
    )
    for key_hash, name, workspace_id, creator, created_at, credit, byok in rows:
        yield SpendRow(key_hash, day, name, workspace_id, creator, created_at, _micros_usd(credit), _micros_usd(byok))


def _micros_usd(micros: Any) -> float:
    """A sum of a Money column as SQL returns it (integer micro-dollars, or a Decimal of them on
    PostgreSQL) in USD."""
    return 0.0 if micros is None else int(micros) / MICROS_PER_USD


def _usd(amount: Decimal | None) -> float:
    """Money as the reports compute with it (exact sums are done in SQL, in micro-dollars)."""
    return 0.0 if amount is None else float(amount)


def alive_hashes(session: Session, snapshot_id: int) -> set[str]:
    """The hashes of the keys snapshot ``snapshot_id`` listed (none for 0), one indexed read."""
    return snapshots.key_hashes_at(session, snapshot_id) if snapshot_id else set()


def names_alive(session: Session, snapshot_id: int) -> Iterator[tuple[str, str, str | None]]:
    """(key_hash, name, workspace_id) of every key snapshot ``snapshot_id`` listed, streamed."""
    if snapshot_id == 0:
        return
    alive = snapshots.alive_at(snapshot_id, newest=snapshots.is_newest(session, snapshot_id)).subquery()
    rows = session.execute(select(alive.c.key_hash, alive.c.name, alive.c.workspace_id), execution_options=STREAMED)
    yield from ((key_hash, name, workspace_id) for key_hash, name, workspace_id in rows)


def keys_by_owner(session: Session, snapshot_id: int, *, workspaces: tuple[str, ...] = ()) -> dict[str | None, int]:
    """How many keys snapshot ``snapshot_id`` listed per ``creator_user_id``."""
    alive = snapshots.alive_at(snapshot_id, newest=snapshots.is_newest(session, snapshot_id)).subquery()
    query = select(alive.c.creator_user_id, func.count()).group_by(alive.c.creator_user_id)
    if workspaces:
        query = query.where(alive.c.workspace_id.in_(workspaces))
    return {owner: int(count) for owner, count in session.execute(query)}


def owners_alive(session: Session, snapshot_id: int) -> Iterator[tuple[str | None, str, str | None]]:
    """(creator_user_id, name, workspace_id) of every key snapshot ``snapshot_id`` listed, streamed."""
    alive = snapshots.alive_at(snapshot_id, newest=snapshots.is_newest(session, snapshot_id)).subquery()
    rows = session.execute(
        select(alive.c.creator_user_id, alive.c.name, alive.c.workspace_id), execution_options=STREAMED
    )
    yield from ((owner, name, workspace_id) for owner, name, workspace_id in rows)
