"""Notices sent to notify targets, and the advance warnings already given (each said once)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, exists, or_, select, update
from sqlalchemy.orm import Session

from .models import Action, Announcement, Notice
from .snapshots import alive_at, is_newest

SENDING = "sending"  # recorded before it is sent; a run that ended with it so was cut short mid-send
SENT = "sent"
FAILED = "failed"  # not delivered; the next run tries once more
# Its one retry is being sent, claimed by one run at ``claimed_at``; a claim older than any send may
# take was cut short (the run died while sending it), and a later run gives it up.
RETRYING = "retrying"
GAVE_UP = "gave_up"  # not delivered after the retry, or its retry was cut short: final

RETRY_CUT_SHORT = "cut short while its retry was being sent: it may have arrived"
"""``last_error`` of a notice given up because the run that claimed its retry died while sending it."""


@dataclass(frozen=True, slots=True)
class Undelivered:
    id: int
    target: str
    event: str
    run_id: int | None
    attempts: int
    payload: dict[str, Any]
    last_error: str | None


@dataclass(frozen=True, slots=True)
class Backlog:
    """What ``undelivered`` found: the notices waiting for their one retry, and those it gave up
    because their retry was cut short (each with ``RETRY_CUT_SHORT`` as its error), oldest first."""

    waiting: list[Undelivered]
    given_up: list[Undelivered]


def record_notice(
    session: Session,
    *,
    now: datetime,
    target: str,
    event: str,
    run_id: int | None,
    status: str,
    attempts: int,
    payload: dict[str, Any],
    error: str | None = None,
) -> int:
    """Add one notice: before it is sent (SENDING, then ``finish_send``), or as it ended. The caller commits."""
    notice = Notice(
        created_at=now,
        target=target,
        event=event,
        run_id=run_id,
        status=status,
        attempts=attempts,
        last_error=error,
        sent_at=now if status == SENT else None,
        payload=payload,
    )
    session.add(notice)
    session.flush()
    return notice.id


def finish_send(
    session: Session,
    notice_id: int,
    *,
    now: datetime,
    sent: bool,
    attempts: int,
    error: str | None,
    retry: bool = False,
) -> None:
    """Record how sending a notice ended: sent, or failed (retried once by the next run); with
    ``retry``, how its one retry ended: sent, or given up for good."""
    session.execute(
        update(Notice)
        .where(Notice.id == notice_id)
        .values(
            status=SENT if sent else GAVE_UP if retry else FAILED,
            attempts=Notice.attempts + attempts,
            last_error=error,
            sent_at=now if sent else None,
        )
    )


def claim_retry(session: Session, notice_id: int, *, now: datetime) -> bool:
    """Take a failed notice's one retry for this run, claimed at ``now`` (RETRYING until
    ``finish_send``); False when another run took it first."""
    result = session.execute(
        update(Notice).where(Notice.id == notice_id, Notice.status == FAILED).values(status=RETRYING, claimed_at=now)
    )
    return int(getattr(result, "rowcount", 0) or 0) == 1


_UNDELIVERED = (
    Notice.id,
    Notice.target,
    Notice.event,
    Notice.run_id,
    Notice.attempts,
    Notice.payload,
    Notice.last_error,
)
"""The columns of an ``Undelivered``, in its order."""


def undelivered(session: Session, *, sending_before: datetime) -> Backlog:
    """Notices that failed and have not had their retry yet; and those whose retry was cut short,
    given up here. The caller commits.

    ``sending_before`` is longer ago than any send may take. A notice recorded as SENDING before then
    was cut short mid-send: the process died, or the job met its hard time limit. It may or may not
    have arrived; it is marked failed here and gets the one retry (at least once, rather than
    perhaps never).

    A notice whose retry was claimed (RETRYING, at ``claimed_at``) before then was cut short the
    same way while its one retry was being sent: it is given up here (GAVE_UP, ``RETRY_CUT_SHORT``)
    as a failed retry is, never sent again (at most one retry). A retry claimed since may still be
    being sent by a run in another process, and is left alone. Of two runs at once, only one gives
    up each such notice and returns it (the other's UPDATE no longer finds it RETRYING)."""
    session.execute(
        update(Notice)
        .where(Notice.status == SENDING, Notice.created_at < sending_before)
        .values(status=FAILED, last_error="cut short while it was being sent")
    )
    # A NULL ``claimed_at`` is a retry claimed by a release before migration 0017, which did not
    # record when. It is taken as cut short: it was claimed before the upgrade, so it is stale unless
    # a process of the old release, running across the upgrade, is still sending it. Then that
    # process's ``finish_send`` still records how the retry ended, over what is recorded here (it
    # updates by id whatever the status), and the only cost is an early "given up" in the log;
    # leaving such rows alone instead would leave exactly the notices this is for RETRYING for good.
    given_up = session.execute(
        update(Notice)
        .where(
            Notice.status == RETRYING,
            or_(Notice.claimed_at.is_(None), Notice.claimed_at < sending_before),
        )
        .values(status=GAVE_UP, last_error=RETRY_CUT_SHORT, sent_at=None)
        .returning(*_UNDELIVERED),
        execution_options={"synchronize_session": False},
    )
    settled = sorted((Undelivered(*row) for row in given_up), key=lambda notice: notice.id)
    rows = session.execute(select(*_UNDELIVERED).where(Notice.status == FAILED).order_by(Notice.id))
    return Backlog(waiting=[Undelivered(*row) for row in rows], given_up=settled)


def not_yet_announced(
    session: Session, *, target: str, items: Sequence[tuple[str, str, str, datetime]]
) -> list[tuple[str, str, str, datetime]]:
    """Those of ``(key_hash, rule, action, due)`` not yet announced to ``target``."""
    if not items:
        return []
    said: set[tuple[str, str, str, datetime]] = set()
    for start in range(0, len(items), 500):
        chunk = items[start : start + 500]
        hashes = {key_hash for key_hash, *_ in chunk}
        rows = session.execute(
            select(Announcement.key_hash, Announcement.rule, Announcement.action, Announcement.due).where(
                Announcement.target == target, Announcement.key_hash.in_(hashes)
            )
        )
        said.update((row[0], row[1], row[2], row[3]) for row in rows)
    return [item for item in items if item not in said]


def record_announcements(
    session: Session, *, target: str, notice_id: int, items: Iterable[tuple[str, str, str, datetime]]
) -> None:
    """Remember that these keys were announced to ``target`` (by notice ``notice_id``)."""
    session.add_all(
        Announcement(target=target, key_hash=key_hash, rule=rule, action=action, due=due, notice_id=notice_id)
        for key_hash, rule, action, due in items
    )


def delete_old_notices(session: Session, *, before: datetime, limit: int) -> int:
    """Delete up to ``limit`` notices created before ``before``, with their announcements once due."""
    session.execute(
        delete(Announcement).where(
            Announcement.due < before,
            Announcement.notice_id.in_(select(Notice.id).where(Notice.created_at < before)),
        )
    )
    referenced = exists().where(Announcement.notice_id == Notice.id)
    ids = list(
        session.scalars(
            select(Notice.id).where(Notice.created_at < before, ~referenced).order_by(Notice.id).limit(limit)
        )
    )
    if not ids:
        return 0
    result = session.execute(delete(Notice).where(Notice.id.in_(ids), ~referenced))
    return int(getattr(result, "rowcount", 0) or 0)


def actions_of_run(session: Session, run_id: int, outcomes: Sequence[str]) -> list[Action]:
    """The audit records of run ``run_id`` with one of ``outcomes`` (changes, not reports), by key
    name as Python orders text (code point), as every other list of a notice is: a PostgreSQL
    database's collation (``en_US``, ICU) would order them, and pick the first 50, otherwise."""
    rows = session.scalars(
        select(Action).where(Action.run_id == run_id, Action.outcome.in_(outcomes), Action.action != "report")
    )
    return sorted(rows, key=lambda row: (row.key_name, row.key_hash))


def owners(session: Session, snapshot_id: int, key_hashes: Sequence[str]) -> dict[str, str]:
    """``creator_user_id`` of the given keys as snapshot ``snapshot_id`` saw them (keys without one left out)."""
    found: dict[str, str] = {}
    alive = alive_at(snapshot_id, newest=is_newest(session, snapshot_id)).subquery()
    for start in range(0, len(key_hashes), 500):
        rows = session.execute(
            select(alive.c.key_hash, alive.c.creator_user_id).where(
                alive.c.key_hash.in_(key_hashes[start : start + 500])
            )
        )
        found.update({key_hash: owner for key_hash, owner in rows if owner})
    return found
