"""A job run under the job lock, as every Celery task runs one.

The plain job function (``keyhygiene.jobs.execute``) does the work and records the run with its
outcome; this module adds only what the worker needs around it: the lock, and a record of a job
that ended before it could start, so that ``trigger --wait`` and ``report runs`` find every task.
"""

from __future__ import annotations

import redis

from db import runs
from keyhygiene import logging as khlog
from keyhygiene.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from keyhygiene.jobs import JobOutcome, execute, finished_run, record_unstarted
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
    started_by: str,
    task_id: str | None,
    limits: TimeLimits,
    allow_actions: int | None = None,
    abort_errors: tuple[type[BaseException], ...] = (),
) -> JobOutcome:
    """Run job ``kind`` if no other job holds the lock; otherwise record it as skipped.

    Whatever happens, the outcome is in the database under ``task_id`` when this returns.
    """

    def unstarted(status: str, exit_code: int, message: str) -> JobOutcome:
        return record_unstarted(
            settings,
            JobOutcome(kind, status, exit_code, message),
            started_by=started_by,
            task_id=task_id,
            allow_actions=allow_actions,
        )

    if task_id is not None and (earlier := finished_run(settings, task_id)) is not None:
        # Delivered again after it ran (its worker lost the broker mid-job): done once is enough.
        log.warning("job_redelivered", kind=kind, task_id=task_id, run_id=earlier.run_id, status=earlier.status)
        return earlier
    if kind == "prune" and dry_run:
        # Pruning has no dry run: refuse rather than delete history the caller asked to keep.
        return unstarted(runs.FAILED, EXIT_USAGE, "prune has no dry run; nothing was pruned")
    client = redis_client(settings.broker_url)
    lock = JobLock(client, ttl_seconds=limits.lock_ttl)  # a short lease, renewed while the job runs
    try:
        try:
            taken = lock.acquire(kind=kind, task_id=task_id, now=utcnow())
        except redis.RedisError as exc:
            log.error("job_lock_unavailable", kind=kind, error=str(exc))
            return unstarted(runs.FAILED, EXIT_FAILURE, f"cannot take the job lock in Redis, nothing was done: {exc}")
        if not taken:
            holder = lock.holder()
            if holder is not None and task_id is not None and holder.task_id == task_id:
                # Delivered again while it still runs: that run records the outcome, not this one.
                log.warning("job_redelivered", kind=kind, task_id=task_id, status=runs.RUNNING)
                return JobOutcome(kind, runs.RUNNING, EXIT_OK, f"task {task_id} is already running", None)
            reason = f"another job holds the lock: {holder.describe() if holder else 'a job that just ended'}"
            log.warning("job_skipped", kind=kind, reason=reason, started_by=started_by)
            return unstarted(runs.SKIPPED, EXIT_FAILURE, reason)
        try:
            if task_id is not None and (earlier := finished_run(settings, task_id)) is not None:
                # The first delivery finished and freed the lock between the check above and this one.
                log.warning("job_redelivered", kind=kind, task_id=task_id, run_id=earlier.run_id, status=earlier.status)
                return earlier
            outcome = execute(
                kind,
                settings,
                dry_run=dry_run,
                started_by=started_by,
                task_id=task_id,
                allow_actions=allow_actions,
                abort_errors=abort_errors,
            )
            if outcome.run_id is None:
                # The job failed before it could record a run (an invalid rules file, an unreachable
                # database): record one now, so the failure is visible and a waiting trigger ends.
                outcome = record_unstarted(
                    settings, outcome, started_by=started_by, task_id=task_id, allow_actions=allow_actions
                )
            return outcome
        finally:
            try:
                lock.release()
            except redis.RedisError as exc:
                log.warning("job_lock_not_released", kind=kind, error=str(exc), expires_in=limits.lock_ttl)
    finally:
        client.close()


def running_now(settings: Settings, task_id: str) -> bool:
    """Whether a delivery of task ``task_id`` holds the job lock now: it is running, perhaps not
    recorded yet (it records its run just after taking the lock). False when Redis cannot say."""
    client = redis_client(settings.broker_url)
    try:
        holder = JobLock(client).holder()
    finally:
        client.close()
    return holder is not None and holder.task_id == task_id
