"""History queries the reports need: versions over a period, whole key histories.

The store versions a key's volatile fields and the rest separately (see :mod:`db.models`); the
reports here read *full versions*: each overlap of one usage version with one record version of
the same key is one version of the whole key, valid from the later start to the earlier end. That
is exactly the sequence of states the snapshots saw, without reading every snapshot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import and_, case, or_, select
from sqlalchemy.orm import Session

from .models import Snapshot, key_records, key_usage, tracked_keys


@dataclass(frozen=True, slots=True)
class UsageVersion:
    """One version of a key reduced to what spend needs."""

    key_hash: str
    valid_from: int
    valid_to: int | None
    seen_at: datetime
    name: str
    workspace_id: str | None
    usage: Decimal
    byok_usage: Decimal
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
    limit: Decimal | None
    usage: Decimal
    byok_usage: Decimal
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    reports_last_used: bool
    first_seen_at: datetime
    usage_since: datetime
    """When this version's (usage, byok_usage) pair was first seen (carried over while it held)."""


def full_versions() -> Any:
    """A subquery of full key versions: ``key_hash``, ``valid_from``, ``valid_to``, every field of
    the key, and the usage version's ``wire`` (see ``db.models.key_usage``)."""
    u, r, t = key_usage, key_records, tracked_keys
    valid_from = case((u.c.valid_from >= r.c.valid_from, u.c.valid_from), else_=r.c.valid_from)
    valid_to = case(
        (u.c.valid_to.is_(None), r.c.valid_to),
        (r.c.valid_to.is_(None), u.c.valid_to),
        (u.c.valid_to <= r.c.valid_to, u.c.valid_to),
        else_=r.c.valid_to,
    )
    overlap = and_(
        r.c.key_id == u.c.key_id,
        or_(r.c.valid_to.is_(None), u.c.valid_from < r.c.valid_to),
        or_(u.c.valid_to.is_(None), r.c.valid_from < u.c.valid_to),
    )
    fields = [c for c in r.c if c.name not in ("id", "key_id", "valid_from", "valid_to", "wire")]
    fields += [c for c in u.c if c.name not in ("id", "key_id", "valid_from", "valid_to")]
    return (
        select(t.c.key_hash, t.c.first_seen_at, valid_from.label("valid_from"), valid_to.label("valid_to"), *fields)
        .select_from(u.join(r, overlap).join(t, t.c.id == u.c.key_id))
        .subquery("full_versions")
    )


def usage_versions(session: Session, *, after_snapshot: int, until_snapshot: int) -> list[UsageVersion]:
    """Versions alive at snapshot ``after_snapshot`` or opened in ``(after_snapshot, until_snapshot]``.

    In (key, time) order. ``after_snapshot`` 0 means "from the beginning of the history".
    """
    v = full_versions()
    started = Snapshot.__table__.alias("started")
    rows = session.execute(
        select(
            v.c.key_hash,
            v.c.valid_from,
            v.c.valid_to,
            started.c.taken_at,
            v.c.name,
            v.c.workspace_id,
            v.c.usage,
            v.c.byok_usage,
            v.c.created_at,
        )
        .join(started, started.c.id == v.c.valid_from)
        .where(v.c.valid_from <= until_snapshot, or_(v.c.valid_to.is_(None), v.c.valid_to > after_snapshot))
        .order_by(v.c.key_hash, v.c.valid_from)
    )
    return [UsageVersion(*row) for row in rows]


def state_versions(session: Session, *, alive_from: int, until_snapshot: int) -> list[StateVersion]:
    """The whole stored history, up to ``until_snapshot``, of every key alive at some snapshot in
    ``[alive_from, until_snapshot]``.

    In (key, time) order. Each version carries since when its counters have held still, however
    far back that began (``usage_since``), and when the key was first seen.
    """
    v = full_versions()
    started = Snapshot.__table__.alias("started")
    wanted = (
        select(tracked_keys.c.key_hash)
        .join(key_usage, key_usage.c.key_id == tracked_keys.c.id)
        .where(
            key_usage.c.valid_from <= until_snapshot,
            or_(key_usage.c.valid_to.is_(None), key_usage.c.valid_to > alive_from),
        )
        .distinct()
    )
    rows = session.execute(
        select(
            v.c.key_hash,
            v.c.valid_from,
            v.c.valid_to,
            started.c.taken_at,
            v.c.name,
            v.c.workspace_id,
            v.c.disabled,
            v.c.limit,
            v.c.usage,
            v.c.byok_usage,
            v.c.created_at,
            v.c.expires_at,
            v.c.last_used_at,
            v.c.wire,
            v.c.first_seen_at,
            v.c.usage_since,
        )
        .join(started, started.c.id == v.c.valid_from)
        .where(v.c.valid_from <= until_snapshot, v.c.key_hash.in_(wanted))
        .order_by(v.c.key_hash, v.c.valid_from)
    )
    return [
        StateVersion(
            key_hash=row.key_hash,
            valid_from=row.valid_from,
            valid_to=row.valid_to,
            seen_at=row.taken_at,
            name=row.name,
            workspace_id=row.workspace_id,
            disabled=row.disabled,
            limit=row.limit,
            usage=row.usage,
            byok_usage=row.byok_usage,
            created_at=row.created_at,
            expires_at=row.expires_at,
            last_used_at=row.last_used_at,
            reports_last_used=row.last_used_at is not None or not _absent(row.wire, "last_used_at"),
            first_seen_at=row.first_seen_at,
            usage_since=row.usage_since,
        )
        for row in rows
    ]


def _absent(wire: str | None, name: str) -> bool:
    """Whether the API left the field out of the key object (older API versions do)."""
    return wire is not None and name in json.loads(wire).get("-", ())
