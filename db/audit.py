"""The audit log: what keyhygiene planned and did to each key, and why.

Two kinds of record, read back as one log (``audit_records``):

- ``actions``: one row per change made to a key (the write-ahead intent, then its outcome), and per
  report of a live run. Real changes are always recorded this way.
- ``run_plans``: one row per dry run (outcome ``planned``) or refused run (``refused``), pointing to a
  ``plans`` row whose ``plan_entries`` hold the decisions. A plan equal to one already stored is
  recorded by reference only, so hourly dry runs of an unchanged plan add one row each.
"""

from __future__ import annotations

import hashlib
import heapq
import json
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from operator import itemgetter
from typing import Any

from sqlalchemy import exists, func, insert, literal, select, update
from sqlalchemy.orm import Session

from .models import Action, PlanEntry, Run, RunPlan, StoredPlan

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


def audited_workspace(session: Session, workspace_id: str) -> bool:
    """Whether the audit log holds a record of a key in workspace ``workspace_id`` (one that the
    snapshots kept may no longer name)."""
    return session.scalar(select(Action.id).where(Action.workspace_id == workspace_id).limit(1)) is not None


def record_actions(session: Session, records: Sequence[Mapping[str, Any]]) -> list[int]:
    """Add audit records (``run_id``, ``now``, ``key_hash``, ... as ``Action`` has them) in one
    bulk insert, and return their ids in order: a live run's ``report`` decisions are one record
    per key (thousands), and one ORM flush each took seconds (4,221 records: 2.0 s, now 0.17 s on
    SQLite, which inserts them one statement each within the call). The caller commits."""
    if not records:
        return []
    rows = [
        {
            **record,
            "created_at": record["now"],
            "finished_at": None if record["outcome"] == PENDING else record["now"],
            "rules": list(record["rules"]),
            "evidence": dict(record["evidence"]),
            "reason": record.get("reason"),
            "error": record.get("error"),
        }
        for record in records
    ]
    for row in rows:
        del row["now"]
    # render_nulls: every row has the same columns, so PostgreSQL batches them whatever is None.
    added = session.execute(
        insert(Action).returning(Action.id, sort_by_parameter_order=True),
        rows,
        execution_options={"render_nulls": True},
    )
    return [int(action_id) for action_id in added.scalars()]


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


IN_DOUBT = (Action.outcome == PENDING, Action.dry_run.is_(False))
"""An intent whose outcome is not recorded: a change in flight, or in doubt until a run settles it."""


def in_doubt(session: Session) -> list[Action]:
    """Intents whose outcome was never recorded (the process died between intent and outcome)."""
    return list(session.scalars(select(Action).where(*IN_DOUBT).order_by(Action.id)))


def left_in_doubt(session: Session, run_id: int) -> bool:
    """Whether run ``run_id`` left a change in doubt (an intent it could not settle itself)."""
    return bool(session.scalar(select(exists().where(Action.run_id == run_id, *IN_DOUBT))))


def finished_runs_in_doubt(session: Session, *, started_since: datetime) -> list[int]:
    """The runs started at or after ``started_since`` that ended leaving a change in doubt, oldest first."""
    finished = exists().where(Run.id == Action.run_id, Run.finished_at.is_not(None), Run.started_at >= started_since)
    return list(session.scalars(select(Action.run_id).where(*IN_DOUBT, finished).distinct().order_by(Action.run_id)))


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


def outcome_counts(session: Session, run_id: int) -> dict[str, int]:
    """How many of its changes run ``run_id`` recorded done, skipped and failed (one left in doubt,
    ``pending``, counts as failed, as the run counted it); dry-run plans and reports are not changes."""
    counted = dict(
        session.execute(
            select(Action.outcome, func.count())
            .where(Action.run_id == run_id, Action.dry_run.is_(False), Action.action != "report")
            .group_by(Action.outcome)
        ).all()
    )
    return {
        "done": counted.get(DONE, 0),
        "skipped": counted.get(SKIPPED, 0),
        "failed": counted.get(FAILED, 0) + counted.get(PENDING, 0),
    }


def hashes_of_run(session: Session, run_id: int) -> set[str]:
    """The keys run ``run_id`` has an ``actions`` record of (a change it began, made or skipped)."""
    return set(session.scalars(select(Action.key_hash).where(Action.run_id == run_id).distinct()))


def changes_of_run(session: Session, run_id: int) -> list[Action]:
    """The disables and deletes run ``run_id`` made (not dry-run, outcome done) or may have made
    (outcome pending: the run ended before it learned the API's answer), in order."""
    return list(
        session.scalars(
            select(Action)
            .where(
                Action.run_id == run_id,
                Action.dry_run.is_(False),
                Action.outcome.in_((DONE, PENDING)),
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


@dataclass(frozen=True, slots=True)
class PlannedEntry:
    """One decision of a plan as it is stored: ``evidence`` holds only what stays equal between runs
    while the decision does (the caller leaves out day counts that age with time)."""

    key_hash: str
    key_name: str
    workspace_id: str | None
    rule: str
    rules: tuple[str, ...]
    action: str
    evidence: Mapping[str, Any]

    def canonical(self) -> list[Any]:
        return [
            self.key_hash,
            self.key_name,
            self.workspace_id,
            self.rule,
            list(self.rules),
            self.action,
            self.evidence,
        ]


def plan_digest(entries: Sequence[PlannedEntry]) -> str:
    """SHA-256 of the entries in hash order: equal plans, and only equal plans, share it."""
    digest = hashlib.sha256()
    for entry in sorted(entries, key=lambda entry: (entry.key_hash, entry.rule, entry.action)):
        digest.update(json.dumps(entry.canonical(), sort_keys=True, separators=(",", ":"), default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def record_plan(
    session: Session,
    *,
    run_id: int,
    now: datetime,
    entries: Sequence[PlannedEntry],
    dry_run: bool,
    outcome: str,
    reason: str | None = None,
) -> RunPlan:
    """Record what a dry run planned (``planned``) or a refused run would have changed (``refused``):
    one ``run_plans`` row, and the entries only when no stored plan has the same digest. The caller
    commits."""
    digest = plan_digest(entries)
    # Locked (PostgreSQL) until the caller commits: the audit retention skips a plan a run is
    # referring to, and one it is deleting this moment is, once it has, not found here.
    plan_id = session.scalar(select(StoredPlan.id).where(StoredPlan.digest == digest).with_for_update(key_share=True))
    if plan_id is None:
        stored = StoredPlan(digest=digest, decisions=len(entries), created_at=now)
        session.add(stored)
        session.flush()
        plan_id = stored.id
        if entries:
            session.execute(
                insert(PlanEntry),
                [
                    {
                        "plan_id": plan_id,
                        "key_hash": entry.key_hash,
                        "key_name": entry.key_name,
                        "workspace_id": entry.workspace_id,
                        "rule": entry.rule,
                        "rules": list(entry.rules),
                        "action": entry.action,
                        "evidence": dict(entry.evidence),
                    }
                    for entry in entries
                ],
            )
    row = RunPlan(run_id=run_id, plan_id=plan_id, created_at=now, dry_run=dry_run, outcome=outcome, reason=reason)
    session.add(row)
    session.flush()
    return row


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One record of the audit log, whichever way it is stored. ``by_reference``: read from a stored
    plan, whose evidence leaves out the day counts that age with time."""

    time: datetime
    run_id: int
    key_hash: str
    key_name: str
    workspace_id: str | None
    rule: str
    rules: list[str]
    action: str
    dry_run: bool
    outcome: str
    reason: str | None
    error: str | None
    evidence: dict[str, Any]
    by_reference: bool


@dataclass(frozen=True, slots=True)
class KeyFilter:
    """Which keys' records a reader wants: in one of ``workspaces`` (none: any), with a name that the
    shell-style pattern ``name`` matches (None: any; ``fnmatch.fnmatchcase``'s ``*``, ``?`` and
    ``[...]``). Applied in SQL so that the other records are never read; as a ``LIKE`` that admits
    every name the pattern matches and, where ``LIKE`` cannot say as much (a ``[...]`` set; ASCII
    case on SQLite), some more: the reader still matches each name it gets."""

    workspaces: tuple[str, ...] = ()
    name: str | None = None

    def where(self, query: Any, key_name: Any, workspace_id: Any) -> Any:
        if self.workspaces:
            query = query.where(workspace_id.in_(self.workspaces))
        like = glob_like(self.name) if self.name is not None else "%"
        if like.strip("%"):
            query = query.where(key_name.like(like, escape="\\"))
        return query


ANY_KEY = KeyFilter()


def glob_like(pattern: str) -> str:
    """A ``LIKE`` pattern (escape character ``\\``) matching every string ``pattern`` matches as
    ``fnmatch.fnmatchcase`` reads it: ``*`` any run, ``?`` and each ``[...]`` set one character
    (an unclosed ``[`` is itself, as there); ``%`` when the pattern cannot be sent as text."""
    like: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            if not like or like[-1] != "%":
                like.append("%")
        elif c == "?":
            like.append("_")
        elif c == "[":
            j = i + 1 if i < n and pattern[i] == "!" else i
            j = j + 1 if j < n and pattern[j] == "]" else j
            end = pattern.find("]", j)
            if end < 0:
                like.append("[")
            else:
                like.append("_")
                i = end + 1
        elif c in "%_\\":
            like.append("\\" + c)
        else:
            like.append(c)
    text = "".join(like)
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate (an undecodable command-line byte): no driver takes it
        return "%"
    return text


def audit_records(
    session: Session,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    run_id: int | None = None,
    newest_first: bool = False,
    keys: KeyFilter = ANY_KEY,
) -> Generator[AuditRecord, None, None]:
    """The audit log in time order (or newest first): the ``actions`` rows, and each stored plan's
    entries for every run that refers to it, streamed.

    The two are read each in its own order and merged as they come (by time, then the actions
    rows before the plans' entries, then run, then id): nothing sorts the whole log (a month of
    hourly dry runs is millions of records), and a reader that stops early reads no further.
    Closed however the reader stops: on PostgreSQL the rows come through server-side cursors."""
    direct = select(
        Action.created_at,
        Action.run_id,
        Action.id,
        Action.key_hash,
        Action.key_name,
        Action.workspace_id,
        Action.rule,
        Action.rules,
        Action.action,
        Action.dry_run,
        Action.outcome,
        Action.reason,
        Action.error,
        Action.evidence,
    )
    runs = select(RunPlan.created_at, RunPlan.run_id, RunPlan.plan_id, RunPlan.dry_run, RunPlan.outcome, RunPlan.reason)
    if since is not None:
        # (since, until], as spend and trends count a period: back-to-back windows list a record once.
        direct, runs = direct.where(Action.created_at > since), runs.where(RunPlan.created_at > since)
    if until is not None:
        direct, runs = direct.where(Action.created_at <= until), runs.where(RunPlan.created_at <= until)
    if run_id is not None:
        direct, runs = direct.where(Action.run_id == run_id), runs.where(RunPlan.run_id == run_id)
    direct = keys.where(direct, Action.key_name, Action.workspace_id)

    def ordered(*columns: Any) -> list[Any]:
        return [column.desc() for column in columns] if newest_first else list(columns)

    def actions_rows() -> Generator[tuple[tuple[Any, ...], AuditRecord], None, None]:
        query = direct.order_by(*ordered(Action.created_at, Action.run_id, Action.id))
        with session.execute(query.execution_options(yield_per=1000)) as result:
            for row in result:
                record = AuditRecord(
                    time=row.created_at,
                    run_id=row.run_id,
                    key_hash=row.key_hash,
                    key_name=row.key_name,
                    workspace_id=row.workspace_id,
                    rule=row.rule,
                    rules=list(row.rules),
                    action=row.action,
                    dry_run=bool(row.dry_run),
                    outcome=row.outcome,
                    reason=row.reason,
                    error=row.error,
                    evidence=dict(row.evidence),
                    by_reference=False,
                )
                yield (row.created_at, 0, row.run_id, row.id), record

    def plans_rows() -> Generator[tuple[tuple[Any, ...], AuditRecord], None, None]:
        # One row per run that refers to a plan (a year of hourly dry runs: 8,760), then each
        # plan's entries as its runs come up.
        referring = session.execute(runs.order_by(*ordered(RunPlan.created_at, RunPlan.run_id, RunPlan.plan_id))).all()
        for run in referring:
            entries = select(
                PlanEntry.id,
                PlanEntry.key_hash,
                PlanEntry.key_name,
                PlanEntry.workspace_id,
                PlanEntry.rule,
                PlanEntry.rules,
                PlanEntry.action,
                PlanEntry.evidence,
            ).where(PlanEntry.plan_id == run.plan_id)
            entries = keys.where(entries, PlanEntry.key_name, PlanEntry.workspace_id)
            query = entries.order_by(*ordered(PlanEntry.id))
            with session.execute(query.execution_options(yield_per=1000)) as result:
                for entry in result:
                    record = AuditRecord(
                        time=run.created_at,
                        run_id=run.run_id,
                        key_hash=entry.key_hash,
                        key_name=entry.key_name,
                        workspace_id=entry.workspace_id,
                        rule=entry.rule,
                        rules=list(entry.rules),
                        action=entry.action,
                        dry_run=bool(run.dry_run),
                        outcome=run.outcome,
                        reason=run.reason,
                        error=None,
                        evidence=dict(entry.evidence),
                        by_reference=True,
                    )
                    yield (run.created_at, 1, run.run_id, entry.id), record

    streams = (actions_rows(), plans_rows())
    try:
        for _, record in heapq.merge(*streams, key=itemgetter(0), reverse=newest_first):
            yield record
    finally:
        for stream in streams:
            stream.close()


def outcome_times(session: Session, *, since: datetime, until: datetime) -> Iterator[tuple[datetime, str, int]]:
    """(time, outcome, records) covering every audit record of (since, until], streamed: each
    ``actions`` row as one record; each run that refers to a stored plan as that plan's decisions,
    counted in SQL without expanding them (what a count per day needs)."""
    direct = select(Action.created_at, Action.outcome, literal(1)).where(
        Action.created_at > since, Action.created_at <= until
    )
    per_plan = select(PlanEntry.plan_id, func.count().label("decisions")).group_by(PlanEntry.plan_id).subquery()
    referenced = (
        select(RunPlan.created_at, RunPlan.outcome, per_plan.c.decisions)
        .join(per_plan, per_plan.c.plan_id == RunPlan.plan_id)
        .where(RunPlan.created_at > since, RunPlan.created_at <= until)
    )
    for query in (direct, referenced):
        for time, outcome, records in session.execute(query.execution_options(yield_per=5000)):
            yield time, str(outcome), int(records)


def outcomes_by_key(
    session: Session, *, since: datetime, until: datetime, keys: KeyFilter = ANY_KEY
) -> Iterator[tuple[datetime, str, str, str | None]]:
    """(time, outcome, key name, workspace id) of every audit record of (since, until] of the keys
    ``keys`` admits, streamed without the records' JSON: what a filtered count of the log needs."""
    direct = select(Action.created_at, Action.outcome, Action.key_name, Action.workspace_id).where(
        Action.created_at > since, Action.created_at <= until
    )
    direct = keys.where(direct, Action.key_name, Action.workspace_id)
    referenced = (
        select(RunPlan.created_at, RunPlan.outcome, PlanEntry.key_name, PlanEntry.workspace_id)
        .join(PlanEntry, PlanEntry.plan_id == RunPlan.plan_id)
        .where(RunPlan.created_at > since, RunPlan.created_at <= until)
    )
    referenced = keys.where(referenced, PlanEntry.key_name, PlanEntry.workspace_id)
    for query in (direct, referenced):
        for time, outcome, key_name, workspace_id in session.execute(query.execution_options(yield_per=5000)):
            yield time, str(outcome), str(key_name), workspace_id
