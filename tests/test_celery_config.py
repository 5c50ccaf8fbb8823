"""The Celery app's configuration, schedule, limits, trigger and health check, without a broker.

These run without Redis or worker processes; the behaviour they configure is exercised end to end
in tests/test_celery.py.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from celery.beat import ScheduleEntry
from celery.exceptions import InvalidTaskError
from hypothesis import given
from hypothesis import strategies as st

from keyhygiene.settings import Settings
from worker.beat_schedule import PRUNE_SCHEDULE, beat_schedule, shortest_period
from worker.celery_app import make_app
from worker.health import check, mark_stopped, touch
from worker.limits import TimeLimits
from worker.names import TASK_NAMES
from worker.strategy import check_message

from .celery_support import keyhygiene_executable


def settings(**values: str) -> Settings:
    return Settings(**values)  # type: ignore[arg-type]


# -- the app --------------------------------------------------------------------------------------


def test_the_app_speaks_json_only_and_keeps_no_results() -> None:
    conf = make_app(settings()).conf
    assert conf.task_serializer == "json"
    assert list(conf.accept_content) == ["json"]
    assert conf.result_backend is None and conf.task_ignore_result is True


def test_a_job_lost_with_its_worker_is_redelivered_and_a_job_that_kills_its_child_is_not() -> None:
    conf = make_app(settings()).conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is False
    assert conf.worker_prefetch_multiplier == 1


def test_the_worker_retries_the_broker_forever() -> None:
    conf = make_app(settings()).conf
    assert conf.broker_connection_retry_on_startup is True
    assert conf.broker_connection_max_retries is None


def test_celery_leaves_logging_to_keyhygiene() -> None:
    conf = make_app(settings()).conf
    assert conf.worker_hijack_root_logger is False


def test_the_four_jobs_are_registered_under_explicit_names() -> None:
    app = make_app(settings())
    assert set(TASK_NAMES.values()) <= set(app.tasks)
    for name in TASK_NAMES.values():
        assert app.tasks[name].Strategy == "worker.strategy:checked"


def test_time_limits_are_configured_from_the_settings_in_order() -> None:
    configured = settings(KEYHYGIENE_JOB_TIME_LIMIT="10m")
    app = make_app(configured)
    limits = TimeLimits.from_settings(configured)
    assert app.conf.task_soft_time_limit == limits.soft == 600
    assert app.conf.task_time_limit == limits.hard
    assert app.conf.broker_transport_options["visibility_timeout"] == limits.visibility_timeout


def test_the_hard_limit_leaves_a_change_in_flight_at_the_soft_limit_time_to_end() -> None:
    # A change held at the soft limit: its PATCH and the fresh GET after a lost answer, each with
    # 60 s of retries and a last try of up to 30 s, then 30 s to record the run.
    limits = TimeLimits.from_settings(settings(KEYHYGIENE_JOB_TIME_LIMIT="5m"))
    assert limits.hard - limits.soft == 3 * (60 + 30 + 10) + 30
    quick = settings(KEYHYGIENE_JOB_TIME_LIMIT="5m", KEYHYGIENE_HTTP_RETRY_SECONDS="5", KEYHYGIENE_HTTP_TIMEOUT="5")
    assert TimeLimits.from_settings(quick).hard - 300 == max(30, 300 / 10, 3 * (5 + 5 + 10) + 30)
    assert TimeLimits.from_settings(settings(KEYHYGIENE_JOB_TIME_LIMIT="1h")).hard == 3600 + 360


@given(st.integers(min_value=1, max_value=14 * 86400))
def test_time_limits_are_strictly_ordered(seconds: int) -> None:
    limits = TimeLimits.for_limit(timedelta(seconds=seconds))
    assert limits.soft == seconds
    assert limits.soft < limits.hard < limits.hard + limits.lock_ttl < limits.visibility_timeout
    assert limits.lock_ttl <= 120  # a killed worker's lock blocks the schedule for two minutes at most


# -- beat ---------------------------------------------------------------------------------------


def test_beat_sends_the_periodic_run_on_the_schedule_and_a_daily_prune() -> None:
    schedule = beat_schedule(settings(KEYHYGIENE_SCHEDULE="*/15 * * * *"))
    run, prune = schedule["hygiene-run"], schedule["history-prune"]
    assert run["task"] == TASK_NAMES["run"] and run["kwargs"] == {"dry_run": False, "trigger": "beat"}
    assert run["schedule"].minute == {0, 15, 30, 45} and run["schedule"].hour == set(range(24))
    assert prune["task"] == TASK_NAMES["prune"]
    assert shortest_period(PRUNE_SCHEDULE) == timedelta(days=1)
    # Queued periodic messages expire after one period rather than pile up after an outage.
    assert run["options"]["expires"] == 15 * 60
    assert prune["options"]["expires"] == 86400


@pytest.mark.parametrize(
    ("expression", "period"),
    [
        ("* * * * *", timedelta(minutes=1)),
        ("0 * * * *", timedelta(hours=1)),
        ("15,45 */2 * * *", timedelta(minutes=30)),
        ("0 3 * * *", timedelta(days=1)),
        ("*/5 9-17 * * 1-5", timedelta(minutes=5)),
        ("0 0 * * 0", timedelta(days=7)),
        ("0 0 1 * *", timedelta(days=28)),
    ],
)
def test_the_period_of_a_schedule_is_its_shortest_gap(expression: str, period: timedelta) -> None:
    assert shortest_period(expression, start=datetime(2026, 1, 10, 12, 7, tzinfo=UTC)) == period


def test_a_run_missed_while_beat_was_down_is_sent_once_not_replayed() -> None:
    app = make_app(settings(KEYHYGIENE_SCHEDULE="* * * * *"))
    entry_config = app.conf.beat_schedule["hygiene-run"]
    now = datetime.now(UTC)
    # Beat was down for ten minutes: ten one-minute runs were missed.
    entry = ScheduleEntry(
        name="hygiene-run",
        task=entry_config["task"],
        schedule=entry_config["schedule"],
        last_run_at=now - timedelta(minutes=10),
        app=app,
    )
    due, _ = entry.is_due()
    assert due
    # Beat sends it and records the send; the entry is then not due until the next minute.
    sent = entry._next_instance(now)
    due_again, next_in = sent.is_due()
    assert not due_again and 0 < next_in <= 60


@pytest.mark.parametrize("command", ["worker", "beat"])
def test_a_bad_schedule_stops_worker_and_beat_with_exit_2_naming_the_variable(command: str, tmp_path: Path) -> None:
    env = {name: value for name, value in os.environ.items() if not name.startswith(("KEYHYGIENE_", "OPENROUTER_"))}
    env["KEYHYGIENE_SCHEDULE"] = "61 * * * *"
    started = subprocess.run(
        [keyhygiene_executable(), command], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert started.returncode == 2
    assert "KEYHYGIENE_SCHEDULE" in started.stderr
    assert "Traceback" not in started.stderr


@pytest.mark.parametrize("pool", [["--pool", "threads"], ["--pool=gevent"], ["-P", "eventlet"]])
def test_the_worker_refuses_a_pool_that_cannot_enforce_the_time_limits(pool: list[str], tmp_path: Path) -> None:
    """Celery's thread pool enforces no time limit: a hung job would renew its lock for ever and
    every later job be skipped. Before, such a worker started (its docs called threads fine)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(("KEYHYGIENE_", "OPENROUTER_"))}
    started = subprocess.run(
        [keyhygiene_executable(), "worker", *pool], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert started.returncode == 2, started.stderr
    assert "keyhygiene's jobs run in the prefork pool (the default)" in started.stderr
    assert "Traceback" not in started.stderr


def test_a_worker_started_with_celery_itself_refuses_the_thread_pool_too(tmp_path: Path) -> None:
    """``celery -A worker.celery_app worker -P threads`` bypassed ``keyhygiene worker``'s check: it
    started, and took jobs whose time limits nothing enforced."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(("KEYHYGIENE_", "OPENROUTER_"))}
    celery = str(Path(keyhygiene_executable()).with_name("celery"))
    started = subprocess.run(
        [celery, "-A", "worker.celery_app", "worker", "-P", "threads"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode == 2, started.stderr
    assert "keyhygiene: worker pool threads: keyhygiene's jobs run in the prefork pool" in started.stderr
    assert "Traceback" not in started.stderr
    assert "ready" not in started.stderr + started.stdout


# -- trigger ------------------------------------------------------------------------------------


def test_trigger_exits_1_when_the_broker_cannot_be_reached(
    cli: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KEYHYGIENE_BROKER_URL", "redis://127.0.0.1:1/0")
    result = cli("trigger", "sync")
    assert result.exit_code == 1
    assert "cannot reach the broker at redis://127.0.0.1:1/0 (KEYHYGIENE_BROKER_URL)" in result.stderr
    assert "nothing was queued" in result.stderr


def test_trigger_refuses_a_dry_run_prune(cli: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYHYGIENE_BROKER_URL", "redis://127.0.0.1:1/0")
    result = cli("trigger", "prune", "--dry-run")
    assert result.exit_code == 2
    assert "prune has no dry run" in result.stderr


# -- messages -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    ["a string", {"a": 1, "b": 2, "c": 3}, [[], {}], [[], {}, {}, {}], [{}, {}, {}], [[], [], {}], [[], {}, 3]],
)
def test_a_body_that_is_not_args_kwargs_embed_is_invalid(payload: Any) -> None:
    with pytest.raises(InvalidTaskError):
        check_message({"id": "t1", "task": TASK_NAMES["run"]}, payload)


def test_a_well_formed_job_message_passes() -> None:
    check_message({"id": "t1", "task": TASK_NAMES["run"]}, [[], {"dry_run": True}, {"callbacks": None}])


# -- liveness -----------------------------------------------------------------------------------


def test_the_health_check_wants_a_fresh_heartbeat(tmp_path: Path) -> None:
    heartbeat = tmp_path / "heartbeat"
    assert check(heartbeat, 60)[0] is False
    heartbeat.touch()
    assert check(heartbeat, 60)[0] is True
    stale = time.time() - 120
    os.utime(heartbeat, (stale, stale))
    alive, message = check(heartbeat, 60)
    assert not alive and "120s ago" in message


def test_the_health_check_says_stopped_after_a_clean_stop_and_alive_after_a_restart(tmp_path: Path) -> None:
    heartbeat = tmp_path / "heartbeat"
    alive, message = check(heartbeat, 60)
    assert not alive and "has not started" in message
    touch(heartbeat)
    mark_stopped(heartbeat)
    alive, message = check(heartbeat, 60)
    assert not alive and message.startswith("stopped at ") and "has not started" not in message
    touch(heartbeat)
    assert check(heartbeat, 60)[0] is True
