"""The Celery tasks: ``run`` (sync then enforce), ``sync``, ``enforce`` and ``prune``.

Each is a few lines around the plain job function the command line runs inline. Arguments are
primitives (``dry_run``, ``trigger``: who started it, ``allow_actions``); outcomes are the run and
audit records in the database, so tasks return nothing that anyone waits for.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from billiard.process import current_process  # type: ignore[import-untyped]
from celery import Celery, Task, signals
from celery.exceptions import SoftTimeLimitExceeded

from db import runs
from keyhygiene.errors import EXIT_FAILURE, EXIT_USAGE
from keyhygiene.jobs import MAX_ALLOW_ACTIONS, JobOutcome, record_unstarted, task_recorded
from keyhygiene.settings import Settings
from keyhygiene.shutdown import stop_pool_process_on_sigterm
from worker.limits import TimeLimits
from worker.names import TASK_NAMES, TRIGGERED_HEADER

from .exclusive import run_exclusive, running_now

# Who may be named as the starter in a message; "schedule" is what beat sent before it said "beat".
STARTERS = {"beat": "beat", "schedule": "beat", "trigger": "trigger"}


class JobTask(Task):  # type: ignore[misc]
    """A job task: every message is checked before Celery's own handling (see worker.strategy)."""

    Strategy = "worker.strategy:checked"
    typing = True


def register_tasks(app: Celery, settings: Settings) -> None:
    """Add the four job tasks to ``app``, running with ``settings``."""
    limits = TimeLimits.from_settings(settings)
    kinds = {name: kind for kind, name in TASK_NAMES.items()}

    def expired(sender: Any = None, request: Any = None, expired: bool = False, **_: Any) -> None:
        """A triggered job that no worker started before its message expired (``worker.trigger``)
        is recorded failed under its task id, so ``trigger --wait`` and ``report runs`` find it.
        Beat's expired ticks are not: a tick missed in an outage is dropped by design. (Who sent
        the message is read from a header ``trigger`` sets, not from its arguments; its
        ``allow_actions`` is recorded as the job would have been, a real count or nothing.)"""
        kind = kinds.get(getattr(sender, "name", None) or "")
        if not expired or kind is None or getattr(request, TRIGGERED_HEADER, None) != "trigger":
            return
        # A copy the broker delivered again (Redis restarted, a worker died) while the job runs, or
        # after it ran or was recorded: its run is the task's answer, not a failure of a job never
        # started. The lock first: a delivery takes it, then records its run.
        if running_now(settings, request.id) or task_recorded(settings, request.id):
            return
        message = "dropped unrun: no worker started it before its message expired (an hour after it was queued)"
        arguments = getattr(request, "kwargs", None)
        allow_actions = arguments.get("allow_actions") if isinstance(arguments, dict) else None
        record_unstarted(
            settings,
            JobOutcome(kind, runs.FAILED, EXIT_FAILURE, message),
            started_by="trigger",
            task_id=request.id,
            allow_actions=allow_actions if _is_count(allow_actions) else None,
        )

    signals.task_revoked.connect(expired, weak=False, dispatch_uid="keyhygiene.task_expired")

    def job(
        task: Task, kind: str, dry_run: Any, trigger: Any, allow_actions: Any = None, unknown: Any = None
    ) -> dict[str, Any]:
        started_by = STARTERS.get(trigger, "trigger") if isinstance(trigger, str) else "trigger"
        if unknown:
            # An argument this version does not take may narrow the job (a newer trigger's): refuse.
            names = ", ".join(sorted(map(str, unknown)))
            message = (
                f"the worker cannot run this message: unknown argument(s) {names}; nothing was done "
                "(are the worker and trigger one version?)"
            )
            outcome = record_unstarted(
                settings,
                JobOutcome(kind, runs.FAILED, EXIT_USAGE, message),
                started_by=started_by,
                task_id=task.request.id,
            )
            return {"run_id": outcome.run_id, "status": outcome.status, "exit_code": outcome.exit_code}
        with stop_pool_process_on_sigterm() if _in_pool_process() else nullcontext():
            outcome = run_exclusive(
                kind,
                settings,
                # Anything but a real False means dry run: a message can narrow what a job does, never widen it.
                dry_run=dry_run is not False,
                started_by=started_by,
                task_id=task.request.id,
                limits=limits,
                # Only a real positive whole number lifts the caps; anything else keeps them.
                allow_actions=allow_actions if _is_count(allow_actions) else None,
                abort_errors=(SoftTimeLimitExceeded,),
            )
        return {"run_id": outcome.run_id, "status": outcome.status, "exit_code": outcome.exit_code}

    @app.task(name=TASK_NAMES["run"], bind=True, base=JobTask, shared=False)  # type: ignore[untyped-decorator]
    def run(
        self: Task, dry_run: bool = False, trigger: str = "trigger", allow_actions: int | None = None, **unknown: Any
    ) -> dict[str, Any]:
        """Sync, then enforce on that fresh snapshot."""
        return job(self, "run", dry_run, trigger, allow_actions, unknown)

    @app.task(name=TASK_NAMES["sync"], bind=True, base=JobTask, shared=False)  # type: ignore[untyped-decorator]
    def sync(self: Task, dry_run: bool = False, trigger: str = "trigger", **unknown: Any) -> dict[str, Any]:
        """Store a snapshot of every key (``dry_run`` changes nothing here: sync changes no key)."""
        return job(self, "sync", dry_run, trigger, unknown=unknown)

    @app.task(name=TASK_NAMES["enforce"], bind=True, base=JobTask, shared=False)  # type: ignore[untyped-decorator]
    def enforce(
        self: Task, dry_run: bool = False, trigger: str = "trigger", allow_actions: int | None = None, **unknown: Any
    ) -> dict[str, Any]:
        """Plan and act on the newest snapshot, within the safety limits."""
        return job(self, "enforce", dry_run, trigger, allow_actions, unknown)

    @app.task(name=TASK_NAMES["prune"], bind=True, base=JobTask, shared=False)  # type: ignore[untyped-decorator]
    def prune(self: Task, dry_run: bool = False, trigger: str = "trigger", **unknown: Any) -> dict[str, Any]:
        """Remove history older than the retention settings (refused with ``dry_run``)."""
        return job(self, "prune", dry_run, trigger, unknown=unknown)


def _in_pool_process() -> bool:
    """A prefork pool's process, where SIGTERM is billiard's "exit now"; not the worker's own process
    (``--pool solo``, or threads), where it is Celery's warm shutdown, which lets the job finish."""
    return bool(current_process().name != "MainProcess")


def _is_count(value: Any) -> bool:
    """A whole number the runs table can store (as the command line's ``--allow-actions`` takes)."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_ALLOW_ACTIONS
