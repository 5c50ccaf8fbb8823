"""The time limits of a job, all derived from KEYHYGIENE_JOB_TIME_LIMIT and strictly ordered.

    soft limit  <  hard limit  <  lock expiry  <  broker visibility timeout

- At the soft limit Celery raises SoftTimeLimitExceeded inside the job, which ends it cleanly and
  records the run as aborted (its lock is released on the way out).
- At the hard limit the pool kills the process running the job; the lock it held then expires on
  its own shortly after, so nothing is left holding it.
- Only after the lock has expired may Redis hand an unacknowledged message to another worker, so a
  redelivered job always finds the lock free and never runs beside the one it replaces.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from keyhygiene.settings import Settings

HARD_LIMIT_MARGIN = timedelta(seconds=30)
LOCK_MARGIN = timedelta(seconds=60)
VISIBILITY_MARGIN = timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class TimeLimits:
    """Seconds, as Celery and Redis take them."""

    soft: float
    hard: float
    lock_ttl: float
    visibility_timeout: float

    @classmethod
    def from_settings(cls, settings: Settings) -> TimeLimits:
        return cls.for_limit(settings.job_time_limit)

    @classmethod
    def for_limit(cls, limit: timedelta) -> TimeLimits:
        soft = limit
        # A tenth of the limit, at least 30s, for the soft limit's clean-up (recording the run).
        hard = soft + max(HARD_LIMIT_MARGIN, limit / 10)
        lock_ttl = hard + LOCK_MARGIN
        visibility = lock_ttl + VISIBILITY_MARGIN
        return cls(
            soft=soft.total_seconds(),
            hard=hard.total_seconds(),
            lock_ttl=lock_ttl.total_seconds(),
            visibility_timeout=visibility.total_seconds(),
        )
