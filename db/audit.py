"""The audit log: what keyhygiene planned and did to each key, and why."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from .models import Action

PLANNED = "planned"
PENDING = "pending"  # intent written, API call not yet known to have finished
DONE = "done"
SKIPPED = "skipped"
FAILED = "failed"
REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class LastChange:
    """Our newest executed change on one key."""

    action: str
    rule: str
    at: datetime
    key_updated_at: datetime | None = None
    run_id: int | None = None
    key_name: str = ""


def record_action(
    session: Session,
    *,
    run_id: int,
    now: datetime,
    key_hash: str,
    key_name: str,
    workspace_id: str | None,
    rule: str,
    rules: Sequence[str],
    action: str,
    dry_run: bool,
    outcome: str,
    evidence: Mapping[str, Any],
    reason: str | None = None,
    error: str | None = None,
) -> Action:
    """Add one audit record. The caller commits (before the API call, for an intent)."""
    row = Action(
        run_id=run_id,
        created_at=now,
        finished_at=None if outcome == PENDING else now,
        key_hash=key_hash,
        key_name=key_name,
        workspace_id=workspace_id,
        rule=rule,
        rules=list(rules),
        action=action,
        dry_run=dry_run,
        outcome=outcome,
        evidence=dict(evidence),
        reason=reason,
        error=error,
    )
    session.add(row)
    session.flush()
    return row


def complete_action(
    session: Session,
    action_id: int,
    *,
    outcome: str,
    now: datetime,
    reason: str | None = None,
    error: str | None = None,
    key_updated_at: datetime | None = None,
) -> None:
    """Record the outcome of an intent. The caller commits."""
    values: dict[str, Any] = {"outcome": outcome, "finished_at": now, "key_updated_at": key_updated_at}
    if reason is not None:
        values["reason"] = reason
    if error is not None:
        values["error"] = error
    session.execute(update(Action).where(Action.id == action_id).values(**values))


def in_doubt(session: Session) -> list[Action]:
    """Intents whose outcome was never recorded (the process died between intent and outcome)."""
    return list(
        session.scalars(select(Action).where(Action.outcome == PENDING, Action.dry_run.is_(False)).order_by(Action.id))
    )


def last_changes(
    session: Session, *, until: datetime | None = None, key_hashes: Sequence[str] | None = None
) -> dict[str, LastChange]:
    """Per key (of ``key_hashes``, or every key), our newest executed change (not dry-run, outcome
    done), made at or before ``until``."""
    conditions: list[Any] = [
        Action.dry_run.is_(False),
        Action.outcome == DONE,
        Action.action.in_(("disable", "enable", "delete")),
    ]
    if until is not None:
        conditions.append(Action.created_at <= until)
    if key_hashes is not None:
        conditions.append(Action.key_hash.in_(list(key_hashes)))
    newest = (
        select(Action.key_hash, func.max(Action.id).label("id")).where(*conditions).group_by(Action.key_hash).subquery()
    )
    rows = session.execute(
        select(
            Action.key_hash,
            Action.action,
            Action.rule,
            Action.finished_at,
            Action.created_at,
            Action.key_updated_at,
            Action.run_id,
            Action.key_name,
        ).join(newest, newest.c.id == Action.id)
    )
    return {
        key_hash: LastChange(
            action=action,
            rule=rule,
            at=finished_at or created_at,
            key_updated_at=key_updated_at,
            run_id=run_id,
            key_name=key_name,
        )
        for key_hash, action, rule, finished_at, created_at, key_updated_at, run_id, key_name in rows
    }


def changes_of_run(session: Session, run_id: int) -> list[Action]:
    """The disables and deletes run ``run_id`` made (not dry-run, outcome done), in order."""
    return list(
        session.scalars(
            select(Action)
            .where(
                Action.run_id == run_id,
                Action.dry_run.is_(False),
                Action.outcome == DONE,
                Action.action.in_(("disable", "delete")),
            )
            .order_by(Action.id)
        )
    )


def deleted_since(session: Session, since: datetime) -> set[str]:
    """Hashes of the keys keyhygiene deleted (not dry-run, outcome done) at or after ``since``."""
    return set(
        session.scalars(
            select(Action.key_hash).where(
                Action.action == "delete",
                Action.outcome == DONE,
                Action.dry_run.is_(False),
                Action.created_at >= since,
            )
        )
    )


def actions_since(
    session: Session,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    run_id: int | None = None,
) -> list[Action]:
    """Audit records in time order."""
    query = select(Action)
    if since is not None:
        query = query.where(Action.created_at >= since)
    if until is not None:
        query = query.where(Action.created_at <= until)
    if run_id is not None:
        query = query.where(Action.run_id == run_id)
    return list(session.scalars(query.order_by(Action.created_at, Action.id)))
