"""Whole-key versions: what ``db.snapshots.count_versions`` counts and a period's versions.

The store versions a key's volatile fields and the rest separately (see :mod:`db.models`); these
queries read *full versions*: each overlap of one usage version with one record version of
the same key is one version of the whole key, valid from the later start to the earlier end. That
is exactly the sequence of states the snapshots saw, without reading every snapshot.
"""

from __future__ import annotations

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
