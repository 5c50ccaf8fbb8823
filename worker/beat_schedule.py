"""What beat sends and when: the periodic ``run`` on KEYHYGIENE_SCHEDULE and a daily ``prune``.

Beat runs :class:`HygieneScheduler`, which logs when each job is next due (at start and after
each send) and keeps a heartbeat file fresh for ``python -m worker.health`` on every tick.

Every periodic message expires after one period of its schedule, so after an outage at most one
of each is waiting in the queue, never a backlog. A run missed while beat itself was down is sent
once when beat starts again (Celery's crontab is due once however many times it was missed), not
replayed in a burst.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from celery.beat import PersistentScheduler, ScheduleEntry

from keyhygiene import logging as khlog
from keyhygiene.schedule import cron_schedule, parse_cron, shortest_period
from keyhygiene.settings import Settings

from .health import touch
from .names import TASK_NAMES

__all__ = ["PRUNE_SCHEDULE", "HygieneScheduler", "beat_schedule", "cron_schedule", "next_due", "shortest_period"]

log = khlog.get_logger(__name__)

# 03:30 UTC: away from the top of the hour, where the default hourly run starts. A prune that finds
# the lock taken is skipped and the next day's prune catches up (pruning is idempotent).
PRUNE_SCHEDULE = "30 3 * * *"


def beat_schedule(settings: Settings, *, start: datetime | None = None) -> dict[str, dict[str, Any]]:
    """Celery's ``beat_schedule`` for these settings (the schedule was validated with them)."""
    run_expires = shortest_period(settings.schedule, start=start)
    prune_expires = shortest_period(PRUNE_SCHEDULE, start=start)
    return {
        "hygiene-run": {
            "task": TASK_NAMES["run"],
            "schedule": cron_schedule(parse_cron(settings.schedule)),
            "kwargs": {"dry_run": False, "trigger": "beat"},
            "options": {"expires": run_expires.total_seconds()},
        },
        "history-prune": {
            "task": TASK_NAMES["prune"],
            "schedule": cron_schedule(parse_cron(PRUNE_SCHEDULE)),
            "kwargs": {"dry_run": False, "trigger": "beat"},
            "options": {"expires": prune_expires.total_seconds()},
        },
    }


# Beat wakes at least this often (Celery's default is 5 minutes), so its heartbeat stays fresh
# well within the health check's max age.
BEAT_MAX_LOOP_INTERVAL = 30.0
# Where HygieneScheduler finds its heartbeat file: a key of the app's configuration.
HEARTBEAT_CONF_KEY = "keyhygiene_beat_heartbeat_file"


def next_due(entry: ScheduleEntry, *, now: datetime | None = None) -> datetime:
    """When ``entry`` is next due (UTC), given when it last ran."""
    now = now or datetime.now(UTC)
    remaining: timedelta = entry.schedule.remaining_estimate(entry.last_run_at)
    # Celery's estimate runs a few milliseconds short of the firing minute: round to the second.
    due = now + max(remaining, timedelta(0)) + timedelta(milliseconds=500)
    return due.replace(microsecond=0)


class HygieneScheduler(PersistentScheduler):  # type: ignore[misc]
    """Celery's persistent scheduler, saying when each job is next due and touching a heartbeat."""

    def setup_schedule(self) -> None:
        super().setup_schedule()
        for entry in self.schedule.values():
            if entry.name in self.app.conf.beat_schedule:  # not Celery's own housekeeping entries
                self._announce(entry)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        interval = float(super().tick(*args, **kwargs))
        heartbeat = self.app.conf.get(HEARTBEAT_CONF_KEY)
        if heartbeat:
            try:
                touch(Path(heartbeat))
            except OSError as exc:
                log.warning("heartbeat_not_written", path=str(heartbeat), error=str(exc))
        return interval

    def apply_entry(self, entry: ScheduleEntry, producer: Any = None) -> None:
        super().apply_entry(entry, producer=producer)
        # tick() reserved the entry before sending: the stored one has last_run_at = now.
        self._announce(self.schedule.get(entry.name, entry))

    def _announce(self, entry: ScheduleEntry) -> None:
        due = next_due(entry)
        log.info("beat_next_run", job=entry.name, task=entry.task, due_at=due.isoformat(timespec="seconds"))
