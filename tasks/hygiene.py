"""The Celery tasks: ``run`` (sync then enforce), ``sync``, ``enforce`` and ``prune``.

Each is a few lines around the plain job function the command line runs inline. Arguments are
primitives (``dry_run``, ``trigger``); outcomes are the run and audit records in the database, so
tasks return nothing that anyone waits for.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded

from keyhygiene.settings import Settings
from worker.limits import TimeLimits
from worker.names import TASK_NAMES

from .exclusive import run_exclusive

TRIGGERS = ("schedule", "trigger")


class JobTask(Task):  # type: ignore[misc]
    """A job task: every message is checked before Celery's own handling (see worker.strategy)."""

    Strategy = "worker.strategy:checked"
    typing = True


def register_tasks(app: Celery, settings: Settings) -> None:
    """Add the four job tasks to ``app``, running with ``settings``."""
    limits = TimeLimits.from_settings(settings)

    def job(task: Task, kind: str, dry_run: Any, trigger: Any) -> dict[str, Any]:
        outcome = run_exclusive(
            kind,
            settings,
            # Anything but a real False means dry run: a message can narrow what a job does, never widen it.
            dry_run=dry_run is not False,
            trigger=trigger if trigger in TRIGGERS else "trigger",
            task_id=task.request.id,
            limits=limits,
            abort_errors=(SoftTimeLimitExceeded,),
        )
        return {"run_id": outcome.run_id, "status": outcome.status, "exit_code": outcome.exit_code}

    @app.task(name=TASK_NAMES["run"], bind=True, base=JobTask, shared=False)  # type: ignore[untyped-decorator]
    def run(self: Task, dry_run: bool = False, trigger: str = "trigger") -> dict[str, Any]:
        """Sync, then enforce on that fresh snapshot."""
        return job(self, "run", dry_run, trigger)

    @app.task(name=TASK_NAMES["sync"], bind=True, base=JobTask, shared=False)  # type: ignore[untyped-decorator]
    def sync(self: Task, dry_run: bool = False, trigger: str = "trigger") -> dict[str, Any]:
        """Store a snapshot of every key (``dry_run`` changes nothing here: sync changes no key)."""
        return job(self, "sync", dry_run, trigger)

    @app.task(name=TASK_NAMES["enforce"], bind=True, base=JobTask, shared=False)  # type: ignore[untyped-decorator]
    def enforce(self: Task, dry_run: bool = False, trigger: str = "trigger") -> dict[str, Any]:
        """Plan and act on the newest snapshot, within the safety limits."""
        return job(self, "enforce", dry_run, trigger)

    @app.task(name=TASK_NAMES["prune"], bind=True, base=JobTask, shared=False)  # type: ignore[untyped-decorator]
    def prune(self: Task, dry_run: bool = False, trigger: str = "trigger") -> dict[str, Any]:
        """Remove history older than the retention settings (refused with ``dry_run``)."""
        return job(self, "prune", dry_run, trigger)
