"""Snapshots and versioned key states (see :mod:`db.models` for the design)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, and_, func, insert, or_, select, text, update
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import Session

from keyhygiene.keysapi.models import Key

from . import rollups
from .models import KeyState, Snapshot

RUNNING = "running"
COMPLETE = "complete"
FAILED = "failed"

_CHUNK = 500
# Held (per transaction) while a snapshot is recorded on PostgreSQL; SQLite's BEGIN IMMEDIATE
# already lets only one writer in.
_RECORD_LOCK = 0x6B657973


class SnapshotSuperseded(RuntimeError):
    """A newer snapshot was recorded while this one was being taken; recording this one would
    rewrite history out of order."""


@dataclass(frozen=True, slots=True)
class SnapshotWrite:
    """What recording one snapshot changed in the store."""

    key_count: int
    new_versions: int
    changed: int
    added: int
    gone: int


def digest(raw: Mapping[str, Any]) -> str:
    """A stable fingerprint of a key's JSON: equal digests mean an unchanged key."""
    canonical = json.dumps(raw, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _row(key: Key, snapshot_id: int, key_digest: str) -> dict[str, Any]:
    return {
        "key_hash": key.hash,
        "valid_from": snapshot_id,
        "valid_to": None,
        "digest": key_digest,
        "name": key.name,
        "label": key.label,
        "workspace_id": key.workspace_id,
        "disabled": key.disabled,
        "limit": key.limit,
        "limit_remaining": key.limit_remaining,
        "limit_reset": key.limit_reset,
        "include_byok_in_limit": key.include_byok_in_limit,
        "usage": key.usage,
        "usage_daily": key.usage_daily,
        "usage_weekly": key.usage_weekly,
        "usage_monthly": key.usage_monthly,
        "byok_usage": key.byok_usage,
        "byok_usage_daily": key.byok_usage_daily,
        "byok_usage_weekly": key.byok_usage_weekly,
        "byok_usage_monthly": key.byok_usage_monthly,
        "created_at": key.created_at,
        "updated_at": key.updated_at,
        "expires_at": key.expires_at,
        "last_used_at": key.last_used_at,
        "creator_user_id": key.creator_user_id,
        "external_user": key.external_user,
        "raw": dict(key.raw),
    }


# -- writing ------------------------------------------------------------------------------------


def start_snapshot(session: Session, *, run_id: int, now: datetime) -> Snapshot:
    """Record that a sync has begun. Until it completes, nothing reads it."""
    snapshot = Snapshot(run_id=run_id, status=RUNNING, started_at=now)
    session.add(snapshot)
    session.flush()
    return snapshot


def record_snapshot(
    session: Session,
    *,
    snapshot_id: int,
    keys: Mapping[str, Key],
    taken_at: datetime,
    workspace_counts: Mapping[str, int],
) -> SnapshotWrite:
    """Store a complete listing as snapshot ``snapshot_id``, writing only what changed.

    Unchanged keys keep their open version; changed keys get their open version closed and a new
    one opened; keys no longer listed get their open version closed. The caller owns the
    transaction: everything here commits or rolls back together.

    Versions are ordered by snapshot id, so a snapshot can only be recorded on top of older ones:
    when two syncs overlap and the later-started one finished first, the other raises
    SnapshotSuperseded and writes nothing.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:lock)"), {"lock": _RECORD_LOCK})
    newer = session.scalar(select(func.max(Snapshot.id)).where(Snapshot.status == COMPLETE, Snapshot.id > snapshot_id))
    if newer is not None:
        raise SnapshotSuperseded(
            f"snapshot {newer} was stored by another sync while this one was listing; this one is discarded"
        )
    open_versions = {
        key_hash: (version_id, version_digest)
        for version_id, key_hash, version_digest in session.execute(
            select(KeyState.id, KeyState.key_hash, KeyState.digest).where(KeyState.valid_to.is_(None))
        )
    }
    to_close: list[int] = []
    to_insert: list[dict[str, Any]] = []
    added = changed = 0
    for key_hash, key in keys.items():
        key_digest = digest(key.raw)
        current = open_versions.get(key_hash)
        if current is None:
            added += 1
        elif current[1] == key_digest:
            continue
        else:
            changed += 1
            to_close.append(current[0])
        to_insert.append(_row(key, snapshot_id, key_digest))
    gone = [version_id for key_hash, (version_id, _) in open_versions.items() if key_hash not in keys]
    to_close.extend(gone)

    for ids in _chunks(to_close):
        session.execute(update(KeyState).where(KeyState.id.in_(ids)).values(valid_to=snapshot_id))
    # render_nulls: without it the ORM leaves None columns out of each row's INSERT, so rows with
    # different nullable fields cannot share a statement and are sent one by one (~10x slower).
    bulk_insert = insert(KeyState).execution_options(render_nulls=True)
    for rows in _chunks(to_insert, 2000):
        session.execute(bulk_insert, list(rows))
    session.execute(
        update(Snapshot)
        .where(Snapshot.id == snapshot_id)
        .values(
            status=COMPLETE,
            taken_at=taken_at,
            key_count=len(keys),
            workspace_counts=dict(workspace_counts),
            new_versions=len(to_insert),
        )
    )
    return SnapshotWrite(key_count=len(keys), new_versions=len(to_insert), changed=changed, added=added, gone=len(gone))


class SnapshotWriter:
    """Streams one sync's listing into the store; nothing of it is read until ``finish``.

    The sync hands over each page as it arrives (``add``), asks which keys of the newest complete
    snapshot it has not seen (``missing``) to check them one by one, and then ``finish`` records the
    snapshot; ``discard`` drops whatever was handed over when the sync fails. Each call takes the
    session to work in; the caller owns the transactions. Keys are the API's raw key objects;
    a hash handed over twice keeps its first object (offset paging can repeat a key).
    """

    def __init__(self, snapshot_id: int) -> None:
        self.snapshot_id = snapshot_id
        self._keys: dict[str, Key] = {}
        self.duplicates = 0

    def add(self, session: Session, raw_keys: Iterable[Mapping[str, Any]]) -> None:
        for raw in raw_keys:
            key = Key.from_api(raw)
            if key.hash in self._keys:
                self.duplicates += 1
                continue
            self._keys[key.hash] = key

    def missing(self, session: Session) -> list[str]:
        """Hashes of keys in the newest complete snapshot that were not handed over, sorted."""
        previous = latest_snapshot(session)
        if previous is None:
            return []
        return sorted(key_hashes_at(session, previous.id) - self._keys.keys())

    def finish(self, session: Session, *, taken_at: datetime, workspace_counts: Mapping[str, int]) -> SnapshotWrite:
        """Record the snapshot as complete (see ``record_snapshot``), with its roll-ups."""
        written = record_snapshot(
            session,
            snapshot_id=self.snapshot_id,
            keys=self._keys,
            taken_at=taken_at,
            workspace_counts=workspace_counts,
        )
        rollups.record_rollups(session, snapshot_id=self.snapshot_id, taken_at=taken_at)
        return written

    def discard(self, session: Session) -> None:
        """Forget what was handed over; the snapshot itself is marked failed by the caller."""
        self._keys.clear()


def record_workspace_names(session: Session, *, snapshot_id: int, names: Mapping[str, str]) -> None:
    """Store ``{workspace id: name}`` as snapshot ``snapshot_id``'s sync listed the workspaces."""
    session.execute(update(Snapshot).where(Snapshot.id == snapshot_id).values(workspace_names=dict(names)))


def fail_snapshot(session: Session, *, snapshot_id: int, error: str) -> None:
    """Record that a sync failed; it stored no key state."""
    session.execute(update(Snapshot).where(Snapshot.id == snapshot_id).values(status=FAILED, error=error))


# -- reading ------------------------------------------------------------------------------------


def latest_snapshot(session: Session, *, at: datetime | None = None) -> Snapshot | None:
    """The newest complete snapshot (taken at or before ``at``, when given)."""
    query = select(Snapshot).where(Snapshot.status == COMPLETE)
    if at is not None:
        query = query.where(Snapshot.taken_at <= at)
    return session.scalars(query.order_by(Snapshot.id.desc()).limit(1)).first()


def workspace_names(session: Session, snapshot_id: int | None = None) -> dict[str, str]:
    """``{workspace id: name}`` of snapshot ``snapshot_id`` (default: the newest complete one).

    Empty when there is no such snapshot or its names were never recorded (taken before they were).
    """
    if snapshot_id is None:
        query = select(Snapshot.workspace_names).where(Snapshot.status == COMPLETE).order_by(Snapshot.id.desc())
    else:
        query = select(Snapshot.workspace_names).where(Snapshot.id == snapshot_id)
    names = session.scalars(query.limit(1)).first()
    return {str(key): str(value) for key, value in (names or {}).items()}


def previous_snapshot(session: Session, snapshot_id: int) -> Snapshot | None:
    """The complete snapshot before ``snapshot_id``."""
    return session.scalars(
        select(Snapshot)
        .where(Snapshot.status == COMPLETE, Snapshot.id < snapshot_id)
        .order_by(Snapshot.id.desc())
        .limit(1)
    ).first()


def first_snapshot(session: Session) -> Snapshot | None:
    return session.scalars(select(Snapshot).where(Snapshot.status == COMPLETE).order_by(Snapshot.id).limit(1)).first()


def complete_snapshots(
    session: Session, *, since: datetime | None = None, until: datetime | None = None
) -> list[Snapshot]:
    """Complete snapshots in time order, optionally within [since, until]."""
    query = select(Snapshot).where(Snapshot.status == COMPLETE)
    if since is not None:
        query = query.where(Snapshot.taken_at >= since)
    if until is not None:
        query = query.where(Snapshot.taken_at <= until)
    return list(session.scalars(query.order_by(Snapshot.id)))


def _alive_at(session: Session, snapshot_id: int) -> Any:
    """The versions alive at ``snapshot_id``. At the newest snapshot that is simply the open
    versions, which the ``valid_to`` index finds without reading the history."""
    newest = session.scalar(select(func.max(Snapshot.id)).where(Snapshot.status == COMPLETE))
    if newest is not None and snapshot_id >= newest:
        return KeyState.valid_to.is_(None)
    return and_(KeyState.valid_from <= snapshot_id, or_(KeyState.valid_to.is_(None), KeyState.valid_to > snapshot_id))


# The key's own fields: every column of a version but its bookkeeping.
_ALIVE_COLUMNS = [
    attribute.key
    for attribute in sa_inspect(KeyState).column_attrs
    if attribute.key not in ("id", "valid_from", "valid_to", "digest", "raw")
]


def alive_at(session: Session, snapshot_id: int) -> Select[Any]:
    """Every key as snapshot ``snapshot_id`` saw it, one row per key, as a selectable with the key's
    fields labelled by name (``key_hash``, ``name``, ``usage``, ...); build queries on it with
    ``.subquery()``. Its labels stay the same whatever the store's layout."""
    return select(*(getattr(KeyState, name).label(name) for name in _ALIVE_COLUMNS)).where(
        _alive_at(session, snapshot_id)
    )


def keys_at(session: Session, snapshot_id: int) -> list[Key]:
    """Every key exactly as snapshot ``snapshot_id`` saw it, raw JSON included, by hash."""
    raws = session.scalars(select(KeyState.raw).where(_alive_at(session, snapshot_id)).order_by(KeyState.key_hash))
    return [Key.from_api(raw) for raw in raws]


def fields_at(session: Session, snapshot_id: int, fields: Sequence[str]) -> Iterator[dict[str, Any]]:
    """The given fields (``alive_at``'s labels) of every key snapshot ``snapshot_id`` saw,
    streamed, without reading the raw JSON."""
    alive = alive_at(session, snapshot_id).subquery()
    rows = session.execute(select(*(alive.c[name] for name in fields)))
    for row in rows:
        yield dict(row._mapping)


def key_hashes_at(session: Session, snapshot_id: int) -> set[str]:
    return set(session.scalars(select(KeyState.key_hash).where(_alive_at(session, snapshot_id))))


def count_versions(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(KeyState)) or 0)


@dataclass(frozen=True, slots=True)
class TimelinePoint:
    """One stored version of a key, reduced to what history rules read."""

    seen_at: datetime
    usage: float
    byok_usage: float
    disabled: bool


def timelines(session: Session, snapshot_id: int) -> dict[str, list[TimelinePoint]]:
    """For every key alive at ``snapshot_id``: its versions up to that snapshot, oldest first."""
    alive = select(KeyState.key_hash).where(_alive_at(session, snapshot_id)).scalar_subquery()
    started = Snapshot.__table__.alias("started")
    rows = session.execute(
        select(KeyState.key_hash, started.c.taken_at, KeyState.usage, KeyState.byok_usage, KeyState.disabled)
        .join(started, started.c.id == KeyState.valid_from)
        .where(KeyState.valid_from <= snapshot_id, KeyState.key_hash.in_(alive))
        .order_by(KeyState.key_hash, KeyState.valid_from)
    )
    result: dict[str, list[TimelinePoint]] = {}
    for key_hash, seen_at, usage, byok_usage, disabled in rows:
        result.setdefault(key_hash, []).append(TimelinePoint(seen_at, usage, byok_usage, disabled))
    return result
