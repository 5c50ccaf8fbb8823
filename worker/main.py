"""``keyhygiene worker`` and ``keyhygiene beat``: check the settings, then hand over to Celery.

Both read and validate the settings first, so a bad value (a malformed KEYHYGIENE_SCHEDULE, say)
stops the process with exit 2 and a message naming the variable, before Celery starts.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from keyhygiene import logging as khlog
from keyhygiene.context import Database
from keyhygiene.errors import UsageError
from keyhygiene.jobs import load_ruleset
from keyhygiene.settings import Settings, load_settings

from .beat_schedule import BEAT_MAX_LOOP_INTERVAL, HEARTBEAT_CONF_KEY
from .celery_app import make_app
from .health import DEFAULT_HEARTBEAT_FILE, mark_stopped
from .heartbeat import heartbeat_step
from .signals import POOL_REFUSED, POOLS

log = khlog.get_logger(__name__)

# Celery's default is WARNING, which would hide every job's run and key_action events; an explicit
# --loglevel given by the operator comes later on the command line and wins.
DEFAULT_LOGLEVEL = ["--loglevel", "INFO"]


def run_worker(args: list[str]) -> int:
    """Start the Celery worker with extra ``celery worker`` options ``args``; returns its exit code.

    ``--heartbeat-file PATH`` (ours, not Celery's) sets the file ``python -m worker.health`` checks.
    """
    heartbeat_file, celery_args = _pop_option(args, "--heartbeat-file")
    _check_pool(celery_args)
    settings = _startup_settings()
    _check_worker_can_run(settings)
    app = make_app(settings)
    app.steps["consumer"].add(heartbeat_step(Path(heartbeat_file) if heartbeat_file else DEFAULT_HEARTBEAT_FILE))
    _serve_metrics(settings)
    log.info("worker_starting", broker=_safe_url(settings.broker_url), schedule=settings.schedule)
    return int(app.start(["--quiet", "worker", *DEFAULT_LOGLEVEL, *celery_args]) or 0)


def run_beat(args: list[str]) -> int:
    """Start Celery beat with extra ``celery beat`` options ``args`` (e.g. ``--schedule FILE``).

    ``--heartbeat-file PATH`` (ours, not Celery's) sets a file beat touches on every tick, for
    ``python -m worker.health``.
    """
    heartbeat_file, celery_args = _pop_option(args, "--heartbeat-file")
    settings = _startup_settings()
    app = make_app(settings)
    app.conf.beat_scheduler = "worker.beat_schedule:HygieneScheduler"
    app.conf.beat_max_loop_interval = BEAT_MAX_LOOP_INTERVAL
    # Each message sent is written to the schedule file at once (Celery's default: every 3 minutes),
    # so a beat killed just after sending the hourly run does not send it again when it restarts.
    app.conf.beat_sync_every = 1
    app.conf[HEARTBEAT_CONF_KEY] = heartbeat_file
    log.info("beat_starting", broker=_safe_url(settings.broker_url), schedule=settings.schedule)
    try:
        return int(app.start(["--quiet", "beat", *DEFAULT_LOGLEVEL, *celery_args]) or 0)
    finally:
        if heartbeat_file:
            mark_stopped(Path(heartbeat_file))


def _startup_settings() -> Settings:
    settings = load_settings()  # a SettingsError here is exit 2, naming the variable
    khlog.configure_logging(settings.log_format)
    # Celery warns (running as root, deprecations) before its logging is set up: as log lines too.
    logging.captureWarnings(True)
    # Celery warns on every broker reconnection that it will cancel running late-ack tasks by
    # default in 6.0; not cancelling them is our explicit choice (see worker.celery_app).
    warnings.filterwarnings("ignore", message=r"\s*In Celery 5\.1 we introduced an optional breaking change")
    return settings


def _check_worker_can_run(settings: Settings) -> None:
    """Refuse to start a worker whose every job would fail: no key, bad rules, old schema."""
    settings.require_management_key()  # SettingsError: exit 2
    load_ruleset(settings)  # UsageError naming file, line and field: exit 2
    Database.open(settings).close()  # DatabaseFailure (unreachable, not migrated): exit 1


def _check_pool(args: list[str]) -> None:
    """Refuse a ``--pool``/``-P`` other than ``POOLS`` (exit 2)."""
    for index, arg in enumerate(args):
        if arg in ("--pool", "-P"):
            pool = args[index + 1] if index + 1 < len(args) else ""
        elif arg.startswith("--pool="):
            pool = arg.split("=", 1)[1]
        elif arg.startswith("-P") and len(arg) > 2:
            pool = arg[2:].lstrip("=")
        else:
            continue
        if pool not in POOLS:
            raise UsageError(f"--pool {pool}: {POOL_REFUSED}")


def _serve_metrics(settings: Settings) -> None:
    """With KEYHYGIENE_METRICS_ADDR set, serve /metrics from this (the worker's main) process."""
    address = settings.metrics_address
    if address is None:
        return
    from keyhygiene.metrics import serve

    try:
        serve(Database.open(settings), *address)
    except OSError as exc:
        raise UsageError(
            f"KEYHYGIENE_METRICS_ADDR: cannot serve metrics on {settings.metrics_addr}: {exc.strerror or exc}"
        ) from None


def _pop_option(args: list[str], name: str) -> tuple[str | None, list[str]]:
    value: str | None = None
    rest: list[str] = []
    iterator = iter(args)
    for arg in iterator:
        if arg == name:
            value = next(iterator, None)
            if value is None:
                raise UsageError(f"{name} needs a value (a file path)")
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return value, rest


def _safe_url(url: str) -> str:
    from kombu.utils.url import maybe_sanitize_url

    return str(maybe_sanitize_url(url))
