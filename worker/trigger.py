"""``keyhygiene trigger JOB [--dry-run] [--allow-actions N] [--wait]``: queue a job on the worker,
and maybe wait for it.

The message is sent once, with no retry, after a connection check bounded by a few seconds, so an
unreachable broker is an exit 1 with a clear message, never a hang. ``--wait`` then polls the
database for the run the worker records under the message's task id, and reports the outcome
recorded there.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable

from kombu.utils.url import maybe_sanitize_url

from db import runs
from db.models import Run
from keyhygiene import logging as khlog
from keyhygiene.context import Database
from keyhygiene.errors import EXIT_FAILURE, BrokerFailure, KeyhygieneError, UsageError
from keyhygiene.jobs import JobOutcome
from keyhygiene.settings import Settings

from .celery_app import make_app
from .lock import redis_client
from .names import JOB_KINDS, TASK_NAMES, TRIGGERED_HEADER

POLL_INTERVAL = 0.5
# Seconds the broker has to answer before trigger gives up (exit 1).
BROKER_TIMEOUT = 3.0
# Seconds `trigger --wait` gives the workers to answer a ping before it warns that none is running.
WORKER_PING_TIMEOUT = 3.0
# Seconds a triggered job may wait in the queue: one that no worker starts by then (none was running)
# is dropped unrun, not run hours or days later on a store and a plan nobody is looking at (and
# with an --allow-actions that lifted the caps for that moment).
QUEUED_FOR_AT_MOST = 3600.0


def trigger_job(
    settings: Settings,
    job: str,
    *,
    dry_run: bool,
    wait: bool,
    timeout: float,
    echo: Callable[[str], None],
    allow_actions: int | None = None,
) -> JobOutcome | None:
    """Queue ``job``; with ``wait``, return its outcome once recorded (exit code as if run inline).

    Raises BrokerFailure (exit 1) when the broker cannot be reached, UsageError (exit 2) for a job
    that cannot be asked for, DatabaseFailure (exit 1) when ``wait`` cannot read the database.
    """
    deadline = time.monotonic() + timeout  # --timeout counts from here: queueing and the ping too
    if job not in JOB_KINDS:
        raise UsageError(f"unknown job {job!r}: expected one of {', '.join(JOB_KINDS)}")
    if job == "prune" and dry_run:
        raise UsageError("prune has no dry run: it would delete the history all the same")
    if allow_actions is not None and job not in ("enforce", "run"):
        raise UsageError(f"--allow-actions lifts the caps of enforce and run; {job} has none")
    # Open the database before queueing, so a waiting trigger never leaves a job it cannot follow.
    database = Database.open(settings) if wait else None
    try:
        task_id = _send(settings, job, dry_run=dry_run, allow_actions=allow_actions)
        allowed = f", up to {allow_actions} changes allowed" if allow_actions is not None else ""
        echo(
            f"queued {job}{' (dry run)' if dry_run else ''}{allowed} as task {task_id} "
            f"(dropped unrun if no worker starts it within {QUEUED_FOR_AT_MOST / 60:g} minutes)"
        )
        if database is None:
            echo(
                "its run is recorded under this task id: see `keyhygiene report runs --since 1h --format json` "
                "(field task_id) or `keyhygiene status`"
            )
            return None
        ping = min(WORKER_PING_TIMEOUT, max(deadline - time.monotonic(), 0.1))
        if not workers_answer(settings, timeout=ping):
            said = (
                f"no worker answered within {ping:g}s: task {task_id} waits "
                f"in the queue for a worker (start one: keyhygiene worker) for {QUEUED_FOR_AT_MOST / 60:g} minutes "
                f"at most, then it is dropped unrun; waiting up to {timeout:g}s"
            )
            if khlog.logs_are_json():  # every line on stderr is JSON there
                khlog.get_logger(__name__).warning("no_worker_answered", task_id=task_id, message=said)
            else:
                print(f"keyhygiene: warning: {said}", file=sys.stderr, flush=True)
        try:
            return wait_for_run(database, job, task_id, timeout=timeout, deadline=deadline)
        except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: the wait ends, not the job
            raise KeyhygieneError(
                f"stopped waiting ({stop or 'interrupted'}): task {task_id} is not stopped, it runs or waits for a "
                "worker all the same; its run is recorded under this task id: see `keyhygiene report runs "
                "--since 1h --format json` (field task_id) or `keyhygiene status`"
            ) from None
    finally:
        if database is not None:
            database.close()


def _send(settings: Settings, job: str, *, dry_run: bool, allow_actions: int | None) -> str:
    task_id = str(uuid.uuid4())
    where = maybe_sanitize_url(settings.broker_url)
    app = make_app(settings)
    # A broker that accepts the connection but never answers must fail as fast as one that refuses it.
    app.conf.broker_transport_options = {
        **app.conf.broker_transport_options,
        "socket_timeout": BROKER_TIMEOUT,
        "socket_connect_timeout": BROKER_TIMEOUT,
    }
    try:
        ping(settings.broker_url)
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, timeout=BROKER_TIMEOUT)
            kwargs: dict[str, object] = {"dry_run": dry_run, "trigger": "trigger"}
            if allow_actions is not None:
                kwargs["allow_actions"] = allow_actions
            app.send_task(
                TASK_NAMES[job],
                kwargs=kwargs,
                task_id=task_id,
                connection=connection,
                retry=False,
                expires=QUEUED_FOR_AT_MOST,
                headers={TRIGGERED_HEADER: "trigger"},
            )
    except Exception as exc:  # kombu and redis-py raise several unrelated types for one cause
        raise BrokerFailure(
            f"cannot reach the broker at {where} (KEYHYGIENE_BROKER_URL): {_one_line(exc)}; nothing was queued"
        ) from None
    finally:
        app.close()
    return task_id


def workers_answer(settings: Settings, *, timeout: float = WORKER_PING_TIMEOUT) -> bool:
    """Whether at least one worker answers a ping on the broker within ``timeout`` seconds."""
    app = make_app(settings)
    # The worker's own socket timeout is 30 s: a broker that stalls would hold the ping that long,
    # past the --timeout of `trigger --wait`.
    bound = max(timeout, 0.1)
    app.conf.broker_transport_options = {
        **app.conf.broker_transport_options,
        "socket_timeout": bound,
        "socket_connect_timeout": bound,
    }
    try:
        return bool(app.control.ping(timeout=timeout, limit=1))
    except Exception:  # a broker hiccup here must not fail a job that was queued: just do not warn
        return True
    finally:
        app.close()


def ping(url: str) -> None:
    """Raise if the Redis at ``url`` does not answer within the broker timeout."""
    client = redis_client(url, timeout=BROKER_TIMEOUT)
    try:
        client.ping()
    finally:
        client.close()


def wait_for_run(
    database: Database, job: str, task_id: str, *, timeout: float, deadline: float | None = None
) -> JobOutcome:
    """Poll until the run of ``task_id`` reaches a final status, or ``timeout`` seconds pass (until
    ``deadline``, a ``time.monotonic()``, when given: the time spent before counts)."""
    if deadline is None:
        deadline = time.monotonic() + timeout
    run: Run | None = None
    while True:
        with database.sessions() as session:
            run = runs.run_for_task(session, task_id)
        if run is not None and run.status in runs.FINAL_STATUSES:
            return JobOutcome.of_run(run)
        if time.monotonic() >= deadline:
            if run is None:
                # Still in the queue, most likely; or a worker took it and could not record it (it
                # could not reach the database either), which its log says as run_not_recorded.
                state = (
                    "has no run recorded yet: it is still queued (dropped unrun if no worker starts it within "
                    f"{QUEUED_FOR_AT_MOST / 60:g} minutes of being queued), or the worker could not record it"
                )
            else:
                state = f"is run {run.id}, still {run.status}; its outcome will be recorded"
            return JobOutcome(
                job,
                "waiting" if run is None else run.status,
                EXIT_FAILURE,
                f"gave up waiting after {timeout:g}s: task {task_id} {state}",
                run.id if run is not None else None,
            )
        time.sleep(POLL_INTERVAL)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
