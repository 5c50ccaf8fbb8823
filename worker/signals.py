"""Celery's signals wired to keyhygiene's logging.

- Celery does not configure logging itself: its ``setup_logging`` signal hands it to
  ``keyhygiene.logging.configure_logging``, so Celery's, kombu's and keyhygiene's own lines all come
  out in one format (JSON lines by default) with the same redaction.
- The lines Celery's worker prints itself on Ctrl-C and shutdown ("worker: Warm shutdown"), and
  those of its pool (a pool process that died), go through the same logging instead of raw to
  stdout or stderr.
- Each task binds ``task_id`` and ``task_name`` when it starts and clears the context when it ends;
  ``keyhygiene.jobs.execute`` binds ``run_id`` itself. Every line a job writes can so be traced to
  its task and its run.
- A worker whose pool cannot enforce the jobs' time limits stops before it takes a job (exit 2),
  however it was started: ``keyhygiene worker`` refuses such a ``--pool`` itself, and this catches
  ``celery -A worker.celery_app worker -P threads`` and a ``worker_pool`` setting.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery import signals

from keyhygiene import logging as khlog

_log_format = {"value": "auto"}


def use_log_format(log_format: str) -> None:
    """The format Celery's processes log in (the settings' KEYHYGIENE_LOG_FORMAT)."""
    _log_format["value"] = log_format


def _setup_logging(loglevel: int | str | None = None, **_: Any) -> None:
    level = logging.getLevelName(loglevel) if isinstance(loglevel, str) else loglevel
    khlog.configure_logging(_log_format["value"], level=level if isinstance(level, int) else logging.INFO)
    # Celery's warnings (running as root, deprecations) become log lines in the same format too.
    logging.captureWarnings(True)
    # The prefork pool's own lines ("Process 'ForkPoolWorker-1' pid:… exited with 'signal 9
    # (SIGKILL)'") go to a logger that billiard cuts off from the root one, without a handler:
    # Python's last resort printed them raw among the JSON lines.
    from billiard.util import get_logger as pool_logger  # type: ignore[import-untyped]

    pool_logger().propagate = True


POOLS = ("prefork", "processes", "solo")  # processes: Celery's other name for prefork
"""The pools a job may run in. Only prefork enforces the time limits, and so the lock's order
(worker.limits); solo runs the job in the main process (no limits, no heartbeat while it runs: for
debugging). Under threads, gevent or eventlet a hung job would renew its lock for ever."""

POOL_REFUSED = (
    "keyhygiene's jobs run in the prefork pool (the default), which enforces their time limits; "
    "solo runs them without limits, for debugging; other pools are refused"
)


def _refuse_unlimited_pool(sender: Any = None, **_: Any) -> None:
    """Stop a worker (exit 2, before it takes a job) whose pool is not one of ``POOLS``."""
    from celery import concurrency
    from celery.concurrency.prefork import TaskPool as Prefork
    from celery.concurrency.solo import TaskPool as Solo

    pool = concurrency.get_implementation(sender.pool_cls)
    if isinstance(pool, type) and issubclass(pool, (Prefork, Solo)):
        return
    path = f"{getattr(pool, '__module__', '')}:{getattr(pool, '__qualname__', pool)}"
    name = next((alias for alias, known in concurrency.ALIASES.items() if known == path), path)
    sys.stderr.write(f"keyhygiene: worker pool {name}: {POOL_REFUSED}\n")
    sys.stderr.flush()
    raise SystemExit(2)


def _task_started(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    khlog.clear()
    khlog.bind(task_id=task_id, task_name=getattr(task, "name", None))


def _task_ended(**_: Any) -> None:
    khlog.clear()


def _say(message: str, *_: Any, **__: Any) -> None:
    # Celery calls this from its signal handlers; logging is safe there (its lock is reentrant).
    logging.getLogger("celery.apps.worker").info(message.strip())


def connect() -> None:
    """Connect the receivers (idempotent: each is connected once per process)."""
    # Celery prints its shutdown lines with its own safe_say, past any logging configuration:
    # replaced here so they follow KEYHYGIENE_LOG_FORMAT like every other line.
    import celery.apps.worker

    celery.apps.worker.safe_say = _say
    signals.setup_logging.connect(_setup_logging, weak=False, dispatch_uid="keyhygiene.setup_logging")
    signals.worker_init.connect(_refuse_unlimited_pool, weak=False, dispatch_uid="keyhygiene.worker_init")
    signals.task_prerun.connect(_task_started, weak=False, dispatch_uid="keyhygiene.task_prerun")
    signals.task_postrun.connect(_task_ended, weak=False, dispatch_uid="keyhygiene.task_postrun")
