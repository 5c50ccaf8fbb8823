"""The time limits of a job, all derived from KEYHYGIENE_JOB_TIME_LIMIT and strictly ordered.

    soft limit  <  hard limit  <  hard limit + lock lease  <  broker visibility timeout

- At the soft limit Celery raises SoftTimeLimitExceeded inside the job, which ends it cleanly and
  records the run as aborted (its lock is released on the way out).
- At the hard limit the pool kills the process running the job. It comes after the soft limit's
  clean-up time, and after the longest a change to a key in flight at the soft limit may take.
  The job lock is a short lease (``lock_ttl``) that the job renews while it runs, so a killed
  job's lock expires at most ``lock_ttl`` after its death, well before the hard limit when it
  died early.
- Only after that may Redis hand an unacknowledged message to another worker, so a redelivered
  job always finds the lock free and never runs beside the one it replaces.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from keyhygiene.keysapi import timing
from keyhygiene.settings import Settings
from worker.lock import LEASE_TTL

HARD_LIMIT_MARGIN = timedelta(seconds=30)
LOCK_LEASE = timedelta(seconds=LEASE_TTL)
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
        return cls.for_limit(settings.job_time_limit, change=longest_change(settings))

    @classmethod
    def for_limit(cls, limit: timedelta, *, change: timedelta = timedelta(0)) -> TimeLimits:
        """``change``: the longest a change to a key that the soft limit finds in flight may take
        (``keyhygiene.shutdown`` holds the limit until its outcome is recorded)."""
        soft = limit
        # A tenth of the limit, at least 30s, for the soft limit's clean-up (recording the run),
        # after the change in flight, if that takes longer.
        hard = soft + max(HARD_LIMIT_MARGIN, limit / 10, change + HARD_LIMIT_MARGIN)
        lock_ttl = LOCK_LEASE
        visibility = hard + lock_ttl + VISIBILITY_MARGIN
        return cls(
            soft=soft.total_seconds(),
            hard=hard.total_seconds(),
            lock_ttl=lock_ttl.total_seconds(),
            visibility_timeout=visibility.total_seconds(),
        )


def longest_change(settings: Settings) -> timedelta:
    """The longest one change to a key may take with these settings (``keysapi.timing``)."""
    return timing.longest_change(retry_seconds=settings.http_retry_seconds, timeout=settings.http_timeout)
