"""History queries the reports need: versions over a period, whole key histories, past audit facts.

Everything here reads versions (see :mod:`db.models`): a key's lifetime counters only change at
the snapshot that opened a new version, so a period's spend and a key's idleness can be computed
from versions alone, without reading every snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import case, null, or_, select, type_coerce
from sqlalchemy.orm import Session
from sqlalchemy.types import JSON

from .models import KeyState, Snapshot


@dataclass(frozen=True, slots=True)
class UsageVersion:
    """One version of a key reduced to what spend needs."""

    key_hash: str
    valid_from: int
    valid_to: int | None
    seen_at: datetime
    name: str
    workspace_id: str | None
    usage: float
    byok_usage: float
    created_at: datetime


@dataclass(frozen=True, slots=True)
class StateVersion:
    """One version of a key reduced to what the per-day counts need."""

    key_hash: str
    valid_from: int
    valid_to: int | None
    seen_at: datetime
    name: str
    workspace_id: str | None
    disabled: bool
    limit: float | None
    usage: float
    byok_usage: float
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    reports_last_used: bool


def usage_versions(session: Session, *, after_snapshot: int, until_snapshot: int) -> list[UsageVersion]:
    """Versions alive at snapshot ``after_snapshot`` or opened in ``(after_snapshot, until_snapshot]``.

    In (key, time) order. ``after_snapshot`` 0 means "from the beginning of the history".
    """
    started = Snapshot.__table__.alias("started")
    rows = session.execute(
        select(
            KeyState.key_hash,
            KeyState.valid_from,
            KeyState.valid_to,
            started.c.taken_at,
            KeyState.name,
            KeyState.workspace_id,
            KeyState.usage,
            KeyState.byok_usage,
            KeyState.created_at,
        )
        .join(started, started.c.id == KeyState.valid_from)
        .where(
            KeyState.valid_from <= until_snapshot,
            or_(KeyState.valid_to.is_(None), KeyState.valid_to > after_snapshot),
        )
        .order_by(KeyState.key_hash, KeyState.valid_from)
    )
    return [UsageVersion(*row) for row in rows]


def state_versions(session: Session, *, alive_from: int, until_snapshot: int) -> list[StateVersion]:
    """The whole stored history, up to ``until_snapshot``, of every key alive at some snapshot in
    ``[alive_from, until_snapshot]``.

    In (key, time) order. Whole histories, not just the period, because idleness at a snapshot
    depends on how long the counters have held still, however far back that began.
    """
    started = Snapshot.__table__.alias("started")
    wanted = (
        select(KeyState.key_hash)
        .where(
            KeyState.valid_from <= until_snapshot,
            or_(KeyState.valid_to.is_(None), KeyState.valid_to > alive_from),
        )
        .distinct()
    )
    # The raw JSON is only read where it is needed: whether a null last_used_at was reported at all.
    raw_when_unused = case((KeyState.last_used_at.is_(None), type_coerce(KeyState.raw, JSON)), else_=null())
    rows = session.execute(
        select(
            KeyState.key_hash,
            KeyState.valid_from,
            KeyState.valid_to,
            started.c.taken_at,
            KeyState.name,
            KeyState.workspace_id,
            KeyState.disabled,
            KeyState.limit,
            KeyState.usage,
            KeyState.byok_usage,
            KeyState.created_at,
            KeyState.expires_at,
            KeyState.last_used_at,
            type_coerce(raw_when_unused, JSON),
        )
        .join(started, started.c.id == KeyState.valid_from)
        .where(KeyState.valid_from <= until_snapshot, KeyState.key_hash.in_(wanted))
        .order_by(KeyState.key_hash, KeyState.valid_from)
    )
    result: list[StateVersion] = []
    for row in rows:
        raw = row[13]
        reports = row.last_used_at is not None or (isinstance(raw, dict) and "last_used_at" in raw)
        result.append(
            StateVersion(
                key_hash=row.key_hash,
                valid_from=row.valid_from,
                valid_to=row.valid_to,
                seen_at=row[3],
                name=row.name,
                workspace_id=row.workspace_id,
                disabled=row.disabled,
                limit=row[7],
                usage=row.usage,
                byok_usage=row.byok_usage,
                created_at=row.created_at,
                expires_at=row.expires_at,
                last_used_at=row.last_used_at,
                reports_last_used=reports,
            )
        )
    return result
