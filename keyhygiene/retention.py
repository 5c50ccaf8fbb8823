"""The ``prune`` job: remove history older than ``KEYHYGIENE_RETENTION`` without changing any
report about a time inside it, and audit records older than ``KEYHYGIENE_AUDIT_RETENTION``.

What is kept and why is described in :mod:`db.retention`. The work is done in batches of at most
``BATCH`` rows, each in its own short transaction, so a sync that runs meanwhile waits for one
batch at most (on SQLite, where a writer locks the whole database, that is milliseconds).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError

from db import retention, runs

from . import logging as khlog
from .context import Database, describe_db_error, session_scope
from .errors import EXIT_FAILURE, EXIT_OK, KeyhygieneError
from .settings import Settings
from .timeutil import isoformat, utcnow

if TYPE_CHECKING:
    from collections.abc import Callable

    from .jobs import JobOutcome

log = khlog.get_logger(__name__)

BATCH = 5000


@dataclass
class PruneResult:
    """What one prune removed."""

    cutoff: datetime
    audit_cutoff: datetime | None
    anchor_snapshot: int | None = None
    versions_deleted: int = 0
    snapshots_pruned: int = 0
    snapshots_deleted: int = 0
    runs_deleted: int = 0
    actions_deleted: int = 0
    batches: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "cutoff": isoformat(self.cutoff),
            "audit_cutoff": isoformat(self.audit_cutoff),
            "anchor_snapshot": self.anchor_snapshot,
            "versions_deleted": self.versions_deleted,
            "snapshots_pruned": self.snapshots_pruned,
            "snapshots_deleted": self.snapshots_deleted,
            "runs_deleted": self.runs_deleted,
            "actions_deleted": self.actions_deleted,
            "batches": self.batches,
        }

    def message(self) -> str:
        audit = (
            f"{self.actions_deleted} audit records before {isoformat(self.audit_cutoff)}"
            if self.audit_cutoff is not None
            else "the audit log is kept"
        )
        return (
            f"pruned history before {isoformat(self.cutoff)}: {self.versions_deleted} key versions, "
            f"{self.snapshots_deleted} snapshots and {self.runs_deleted} runs deleted; {audit}"
        )


def prune(
    database: Database,
    *,
    now: datetime,
    retention_period: timedelta,
    audit_retention: timedelta | None = None,
    batch: int = BATCH,
) -> PruneResult:
    """Remove what is older than the retentions, ``batch`` rows per transaction at most."""
    result = PruneResult(cutoff=now - retention_period, audit_cutoff=now - audit_retention if audit_retention else None)

    def step(work: Callable[[Any], int]) -> int:
        with session_scope(database) as session:
            done = work(session)
        result.batches += 1
        return done

    if result.audit_cutoff is not None:
        audit_cutoff = result.audit_cutoff
        while count := step(lambda s: retention.delete_old_actions(s, before=audit_cutoff, limit=batch)):
            result.actions_deleted += count

    with database.sessions() as session:
        anchor = retention.anchor_snapshot(session, result.cutoff)
    if anchor is not None:
        result.anchor_snapshot = anchor.id
        result.versions_deleted = _prune_versions(database, anchor.id, batch, result)
        while count := step(lambda s: retention.mark_pruned(s, anchor_id=anchor.id, limit=batch)):
            result.snapshots_pruned += count

    anchor_id = anchor.id if anchor is not None else None
    while count := step(
        lambda s: retention.delete_old_snapshots(s, anchor_id=anchor_id, cutoff=result.cutoff, limit=batch)
    ):
        result.snapshots_deleted += count
    while count := step(lambda s: retention.delete_old_runs(s, cutoff=result.cutoff, limit=batch)):
        result.runs_deleted += count
    return result


def _prune_versions(database: Database, anchor_id: int, batch: int, result: PruneResult) -> int:
    """Delete versions that ended at or before the anchor, key by key, in pages of ``batch`` rows."""
    deleted = 0
    after: str | None = None
    while True:
        with database.sessions() as session:
            page = retention.ended_versions(session, anchor_id=anchor_id, after_key=after, limit=batch)
            if not page:
                return deleted
            by_key: dict[str, list[retention.OldVersion]] = {}
            for version in page:
                by_key.setdefault(version.key_hash, []).append(version)
            keys = list(by_key)
            if len(page) >= batch and len(keys) > 1:
                keys.pop()  # its rows may go on in the next page: read it whole there
            following = retention.successors(session, anchor_id=anchor_id, key_hashes=keys)
        doomed: list[int] = []
        for key_hash in keys:
            keep = retention.versions_to_keep(by_key[key_hash], following.get(key_hash))
            doomed.extend(version.id for version in by_key[key_hash] if version.id not in keep)
        for start in range(0, len(doomed), batch):
            with session_scope(database) as session:
                deleted += retention.delete_versions(session, doomed[start : start + batch])
            result.batches += 1
        after = keys[-1]


def prune_job(
    settings: Settings,
    *,
    trigger: str = "cli",
    task_id: str | None = None,
    clock: Callable[[], datetime] = utcnow,
    abort_errors: tuple[type[BaseException], ...] = (),
    database: Database | None = None,
) -> JobOutcome:
    """The ``prune`` job: record a run of kind ``prune``, prune, and record how it ended."""
    from .jobs import JobOutcome

    own_database = database is None
    run_id: int | None = None
    try:
        try:
            if database is None:
                database = Database.open(settings)
            with session_scope(database) as session:
                run_id = runs.start_run(session, kind="prune", now=clock(), trigger=trigger, task_id=task_id).id
            khlog.bind(run_id=run_id)
            log.info("run_started", kind="prune", trigger=trigger)
            done = prune(
                database, now=clock(), retention_period=settings.retention, audit_retention=settings.audit_retention
            )
        except BaseException as exc:
            outcome = JobOutcome("prune", runs.FAILED, EXIT_FAILURE, _describe(exc, abort_errors), run_id)
            if (abort_errors and isinstance(exc, abort_errors)) or isinstance(exc, KeyboardInterrupt):
                outcome.status = runs.ABORTED
            elif isinstance(exc, KeyhygieneError):
                outcome.exit_code = exc.exit_code
            _record_end(database, outcome, clock())
            if not isinstance(exc, Exception | KeyboardInterrupt):
                raise  # SystemExit and the like: recorded above, and passed on
            return outcome
        outcome = JobOutcome("prune", runs.COMPLETE, EXIT_OK, done.message(), run_id, summary=done.summary())
        return _record_end(database, outcome, clock())
    finally:
        khlog.unbind("run_id")
        if own_database and database is not None:
            database.close()


def _describe(exc: BaseException, abort_errors: tuple[type[BaseException], ...]) -> str:
    if abort_errors and isinstance(exc, abort_errors):
        return "aborted: the job reached its time limit; what was pruned so far stays pruned"
    if isinstance(exc, SQLAlchemyError):
        return f"database error: {describe_db_error(exc)}"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, KeyhygieneError):
        return str(exc)
    return f"unexpected error: {type(exc).__name__}: {exc}"


def _record_end(database: Database | None, outcome: JobOutcome, now: datetime) -> JobOutcome:
    if database is None or outcome.run_id is None:
        log.error("run_not_started", kind="prune", error=outcome.message)
        return outcome
    try:
        with session_scope(database) as session:
            runs.finish_run(
                session,
                outcome.run_id,
                status=outcome.status,
                now=now,
                error=None if outcome.status == runs.COMPLETE else outcome.message,
                summary=outcome.summary or None,
            )
    except SQLAlchemyError as exc:
        outcome.status = runs.FAILED
        outcome.exit_code = EXIT_FAILURE
        outcome.message = f"{outcome.message}; and the run could not be recorded: {describe_db_error(exc)}"
    log.info(
        "run_finished",
        run_id=outcome.run_id,
        kind="prune",
        status=outcome.status,
        exit_code=outcome.exit_code,
        message=outcome.message,
        **outcome.summary,
    )
    return outcome
