"""A job run under the job lock, as every Celery task runs one.

The plain job function (``keyhygiene.jobs.execute``) does the work and records the run; this module
adds only what the worker needs around it: the lock, the record of a job that did not start, and
the exit code on the run record for ``trigger --wait``.
"""

from __future__ import annotations

from datetime import datetime

import redis
from sqlalchemy.exc import SQLAlchemyError

from db import runs
from keyhygiene import logging as khlog
from keyhygiene.context import Database, describe_db_error, session_scope
from keyhygiene.errors import EXIT_FAILURE, EXIT_USAGE, KeyhygieneError
from keyhygiene.jobs import JobOutcome, execute
from keyhygiene.settings import Settings
from keyhygiene.timeutil import utcnow
from worker.limits import TimeLimits
from worker.lock import JobLock, redis_client

log = khlog.get_logger(__name__)


def run_exclusive(
    kind: str,
    settings: Settings,
    *,
    dry_run: bool,
    trigger: str,
    task_id: str | None,
    limits: TimeLimits,
    abort_errors: tuple[type[BaseException], ...] = (),
) -> JobOutcome:
    """Run job ``kind`` if no other job holds the lock; otherwise record it as skipped.

    Whatever happens, the outcome is in the database under ``task_id`` when this returns.
    """
    if kind == "prune" and dry_run:
        # Pruning has no dry run: refuse rather than delete history the caller asked to keep.
        return _record_unstarted(
            kind, settings, runs.FAILED, "prune has no dry run; nothing was pruned", trigger, task_id, EXIT_USAGE
        )
    client = redis_client(settings.broker_url)
    lock = JobLock(client, ttl_seconds=limits.lock_ttl)  # a short lease, renewed while the job runs
    try:
        try:
            taken = lock.acquire(kind=kind, task_id=task_id, now=utcnow())
        except redis.RedisError as exc:
            message = f"cannot take the job lock in Redis, nothing was done: {exc}"
            log.error("job_lock_unavailable", kind=kind, error=str(exc))
            return _record_unstarted(kind, settings, runs.FAILED, message, trigger, task_id, EXIT_FAILURE)
        if not taken:
            holder = lock.holder()
            reason = f"another job holds the lock: {holder.describe() if holder else 'a job that just ended'}"
            log.warning("job_skipped", kind=kind, reason=reason, trigger=trigger)
            return _record_unstarted(kind, settings, runs.SKIPPED, reason, trigger, task_id, EXIT_FAILURE)
        try:
            outcome = execute(
                kind, settings, dry_run=dry_run, trigger=trigger, task_id=task_id, abort_errors=abort_errors
            )
            return _make_waitable(outcome, settings, trigger, task_id)
        finally:
            try:
                lock.release()
            except redis.RedisError as exc:
                log.warning("job_lock_not_released", kind=kind, error=str(exc), expires_in=limits.lock_ttl)
    finally:
        client.close()


def _make_waitable(outcome: JobOutcome, settings: Settings, trigger: str, task_id: str | None) -> JobOutcome:
    """Make sure ``trigger --wait`` can read this outcome, exit code included, from the database."""
    if outcome.run_id is None:
        # The job failed before it could record a run (an invalid rules file, an unreachable
        # database): record one now, so the failure is visible and a waiting trigger ends.
        recorded = _record_unstarted(
            outcome.kind, settings, outcome.status, outcome.message, trigger, task_id, outcome.exit_code
        )
        outcome.run_id = recorded.run_id
        return outcome
    if outcome.status == runs.FAILED and outcome.exit_code != EXIT_FAILURE:
        # A failed run reads as exit 1; keep a different code (2: bad settings or key) on the record.
        _stamp_exit_code(outcome, settings)
    return outcome


def _record_unstarted(
    kind: str,
    settings: Settings,
    status: str,
    reason: str,
    trigger: str,
    task_id: str | None,
    exit_code: int,
) -> JobOutcome:
    reason = khlog.redact_text(reason)
    outcome = JobOutcome(kind, status, exit_code, reason)
    now = utcnow()
    try:
        database = Database.open(settings)
    except KeyhygieneError as exc:
        log.error("run_not_recorded", kind=kind, status=status, reason=reason, error=str(exc))
        return outcome
    try:
        with session_scope(database) as session:
            if status == runs.SKIPPED:
                run = runs.record_skipped_run(
                    session, kind=kind, now=now, reason=reason, trigger=trigger, task_id=task_id
                )
            else:
                run = runs.start_run(session, kind=kind, now=now, trigger=trigger, task_id=task_id)
                runs.finish_run(session, run.id, status=status, now=now, error=reason, summary=_exit_summary(exit_code))
            outcome.run_id = run.id
    except SQLAlchemyError as exc:
        log.error("run_not_recorded", kind=kind, status=status, reason=reason, error=describe_db_error(exc))
    finally:
        database.close()
    log.info("run_finished", run_id=outcome.run_id, kind=kind, status=status, exit_code=exit_code, message=reason)
    return outcome


def _stamp_exit_code(outcome: JobOutcome, settings: Settings) -> None:
    assert outcome.run_id is not None
    try:
        database = Database.open(settings)
    except KeyhygieneError:
        return
    try:
        with session_scope(database) as session:
            run = runs.get_run(session, outcome.run_id)
            finished: datetime = (run.finished_at if run is not None and run.finished_at else None) or utcnow()
            runs.finish_run(
                session,
                outcome.run_id,
                status=outcome.status,
                now=finished,
                error=outcome.message,
                summary={**outcome.summary, **_exit_summary(outcome.exit_code)},
            )
    except SQLAlchemyError as exc:
        log.warning("exit_code_not_recorded", run_id=outcome.run_id, error=describe_db_error(exc))
    finally:
        database.close()


def _exit_summary(exit_code: int) -> dict[str, int]:
    return {"exit_code": exit_code}
