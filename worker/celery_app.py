"""The Celery app, built from the settings by ``make_app``; ``worker.celery_app:app`` for ``celery -A``.

Choices that matter for a job that can delete a customer's key:

- JSON only, both ways: a pickled (or any non-JSON) message is rejected without running anything.
- No result backend: outcomes are the run and audit records in the database.
- ``task_acks_late`` with ``task_reject_on_worker_lost=False``: a job whose worker dies outright
  (SIGKILL, OOM, lost host) is left unacknowledged in Redis and redelivered once the visibility
  timeout has passed, by which time its lock has expired. A redelivered enforcement is safe: it
  first settles every intent left ``pending`` from the key's fresh state, and checks every key
  fresh again before changing it, so nothing is repeated blindly. When only a pool child dies the
  message is acknowledged instead, so a job that kills its process cannot loop forever. A worker
  that loses its Redis connection while a job runs has its unacknowledged message put back at once
  (kombu restores it on the closed channel): it is recognised by its task id
  (``tasks.exclusive``), so a job that ended is not run again, and one still running is not run
  beside itself.
- One message at a time per process (``worker_prefetch_multiplier=1``), and a worker that keeps
  retrying the broker forever, at start and after Redis restarts.
- Time limits in the order soft < hard < lock expiry < visibility timeout (see ``worker.limits``).
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from keyhygiene.settings import Settings, load_settings

from . import signals
from .beat_schedule import beat_schedule
from .limits import TimeLimits
from .names import QUEUE

# How long a Redis connection attempt or command may take before the broker counts as unreachable.
BROKER_SOCKET_TIMEOUT = 5.0


def make_app(settings: Settings) -> Celery:
    """A Celery app with the four job tasks and the beat schedule, for ``settings``."""
    from tasks.hygiene import register_tasks

    limits = TimeLimits.from_settings(settings)
    signals.use_log_format(settings.log_format)
    signals.connect()
    app = Celery("keyhygiene", broker=settings.broker_url, set_as_current=True)
    app.conf.update(_config(settings, limits))
    register_tasks(app, settings)
    return app


def _config(settings: Settings, limits: TimeLimits) -> dict[str, Any]:
    return {
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "result_accept_content": ["json"],
        "event_serializer": "json",
        "result_backend": None,
        "task_ignore_result": True,
        "task_store_errors_even_if_ignored": False,
        "task_acks_late": True,
        "task_reject_on_worker_lost": False,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_connection_timeout": BROKER_SOCKET_TIMEOUT,
        "broker_transport_options": {
            "visibility_timeout": limits.visibility_timeout,
            "socket_connect_timeout": BROKER_SOCKET_TIMEOUT,
            "socket_timeout": 30.0,
            "socket_keepalive": True,
            "health_check_interval": 25,
        },
        "task_soft_time_limit": limits.soft,
        "task_time_limit": limits.hard,
        "task_default_queue": QUEUE,
        "task_create_missing_queues": True,
        "timezone": "UTC",
        "enable_utc": True,
        "beat_schedule": beat_schedule(settings),
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "worker_enable_remote_control": True,
    }


def __getattr__(name: str) -> Any:
    # ``app`` is built on first use, from the environment, so that importing this module never
    # reads settings (and a bad setting fails where the app is used, naming the variable).
    if name == "app":
        app = make_app(load_settings())
        globals()["app"] = app
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
