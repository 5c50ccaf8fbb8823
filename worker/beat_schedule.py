"""What beat sends and when: the periodic ``run`` on KEYHYGIENE_SCHEDULE and a daily ``prune``.

Every periodic message expires after one period of its schedule, so after an outage at most one
of each is waiting in the queue, never a backlog. A run missed while beat itself was down is sent
once when beat starts again (Celery's crontab is due once however many times it was missed), not
replayed in a burst.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from keyhygiene.schedule import cron_schedule, parse_cron, shortest_period
from keyhygiene.settings import Settings

from .names import TASK_NAMES

__all__ = ["PRUNE_SCHEDULE", "beat_schedule", "cron_schedule", "shortest_period"]

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
