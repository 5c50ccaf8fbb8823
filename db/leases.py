"""Leases: a named lock held in the database, taken, renewed and released by atomic UPDATEs.

A lease is one row of ``leases``. Taking it is a conditional UPDATE (free, or past its expiry), so
two takers racing for it are serialised by the database itself: PostgreSQL's row lock re-checks the
condition for the second taker, and SQLite writers take the write lock up front (BEGIN IMMEDIATE,
the writer sessions of db/engine.py). Renewing and releasing match the holder's random token, so a
holder that lost its lease can neither extend nor free the lease of the one that took it over.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import case, literal, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .models import Lease

ENFORCEMENT = "enforcement"
"""The lease every job that changes keys holds for as long as it runs."""


@dataclass(frozen=True, slots=True)
class LeaseHolder:
    """Who holds (or last held) a lease."""

    token: str
    host: str | None
    pid: int | None
    process_space: str | None
    job: str | None
    acquired_at: datetime | None
    renewed_at: datetime | None
    expires_at: datetime | None

    def describe(self) -> str:
        since = f" since {self.acquired_at.isoformat()}" if self.acquired_at else ""
        return f"{self.job or 'a job'} on {self.host or 'an unknown host'} (pid {self.pid}){since}"


def holder(session: Session, name: str) -> LeaseHolder | None:
    """The current holder of lease ``name``, expired or not; None when it is free."""
    row = session.get(Lease, name)
    if row is None or row.token is None:
        return None
    return LeaseHolder(
        row.token, row.host, row.pid, row.process_space, row.job, row.acquired_at, row.renewed_at, row.expires_at
    )


def try_acquire(
    session: Session,
    name: str,
    *,
    token: str,
    host: str,
    pid: int,
    process_space: str | None,
    job: str,
    now: datetime,
    ttl: timedelta,
    dead_token: str | None = None,
) -> bool:
    """Take lease ``name`` if it is free, its holder let it expire, or it is still held under
    ``dead_token`` (a holder the caller knows to be dead). Never waits for a live holder.

    The caller commits (the lease is taken once the transaction commits).
    """
    values = {
        "token": token,
        "host": host,
        "pid": pid,
        "process_space": process_space,
        "job": job,
        "acquired_at": now,
        "renewed_at": now,
        "expires_at": now + ttl,
    }
    takeable = [Lease.token.is_(None), Lease.expires_at <= now]
    if dead_token is not None:
        takeable.append(Lease.token == dead_token)
    taken = session.execute(
        update(Lease)
        .where(Lease.name == name, or_(*takeable))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if int(getattr(taken, "rowcount", 0) or 0) == 1:
        return True
    if session.scalar(select(Lease.name).where(Lease.name == name)) is not None:
        return False
    # The first lease of that name: whoever inserts it first holds it.
    try:
        with session.begin_nested():
            session.add(Lease(name=name, **values))
    except IntegrityError:
        return False
    return True


def renew(session: Session, name: str, *, token: str, now: datetime, ttl: timedelta) -> bool:
    """Push the expiry of our lease to ``now + ttl``, never earlier than it is; False when it is no
    longer ours.

    Matching on the token alone is what makes this the fencing check: if nobody took the lease
    over, it is still ours even after a late renewal, and after this UPDATE nobody can. A renewal
    never shortens a longer hold taken for a change in flight (``EnforcementLease.fence``).
    """
    until = literal(now + ttl, Lease.__table__.c.expires_at.type)  # stored as the column stores times
    renewed = session.execute(
        update(Lease)
        .where(Lease.name == name, Lease.token == token)
        .values(
            renewed_at=now,
            expires_at=case((Lease.expires_at > until, Lease.expires_at), else_=until),
        )
        .execution_options(synchronize_session=False)
    )
    return int(getattr(renewed, "rowcount", 0) or 0) == 1


def release(session: Session, name: str, *, token: str) -> bool:
    """Free our lease; False when it was no longer ours (someone took it over)."""
    released = session.execute(
        update(Lease)
        .where(Lease.name == name, Lease.token == token)
        .values(token=None, expires_at=None)
        .execution_options(synchronize_session=False)
    )
    return int(getattr(released, "rowcount", 0) or 0) == 1
