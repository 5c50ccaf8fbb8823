"""The plain job functions that the command line and the Celery tasks share."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from db import notices, runs
from db.models import Notice, Run
from keyhygiene import jobs
from keyhygiene.context import Database, session_scope
from keyhygiene.fakeapi import FakeOpenRouter
from keyhygiene.fakeapi.webhook import WebhookSink
from keyhygiene.notices import UNREACHED
from keyhygiene.settings import Settings
from keyhygiene.timeutil import utcnow

from .celery_support import keyhygiene_executable, wait_until
from .conftest import CliResult

DAY = timedelta(days=1)
SECOND = timedelta(seconds=1)


def test_a_run_left_running_by_a_dead_process_is_marked_aborted(
    env: dict[str, str], cli: Callable[..., CliResult]
) -> None:
    assert cli("db", "upgrade").exit_code == 0
    database = Database.open(Settings())  # type: ignore[call-arg]
    now = utcnow()
    with session_scope(database) as session:
        dead = runs.start_run(session, kind="run", now=now - timedelta(hours=3)).id
        alive = runs.start_run(session, kind="run", now=now - timedelta(minutes=5)).id
        beating = runs.start_run(session, kind="run", now=now - timedelta(hours=3)).id
        runs.heartbeat(session, beating, now=now - timedelta(minutes=1))  # a long job from the command line
        stopped = runs.start_run(session, kind="run", now=now - timedelta(hours=5)).id
        runs.heartbeat(session, stopped, now=now - timedelta(hours=2))  # ... whose process died 2 h ago

    assert cli("sync").exit_code == 0

    with database.sessions() as session:
        status = {run.id: run.status for run in session.scalars(select(Run))}
    database.close()
    assert status[dead] == "aborted"
    assert status[alive] == "running"  # younger than twice the job time limit: may still be working
    assert status[beating] == "running"  # old, but alive a minute ago
    assert status[stopped] == "aborted"


def test_a_sync_records_its_run(env: dict[str, str], cli: Callable[..., CliResult]) -> None:
    assert cli("db", "upgrade").exit_code == 0

    result = cli("sync")

    assert result.exit_code == 0
    assert result.stdout.startswith("run 1 sync ok: snapshot 1: 0 keys")
    database = Database.open(Settings())  # type: ignore[call-arg]
    with database.sessions() as session:
        run = session.scalars(select(Run)).one()
    database.close()
    assert (run.kind, run.status, run.started_by, run.exit_code) == ("sync", "ok", "cli", 0)
    assert run.summary is not None and run.summary["keys"] == 0


def test_prune_runs_inline_and_is_recorded(
    env: dict[str, str], cli: Callable[..., CliResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli("db", "upgrade").exit_code == 0
    assert cli("sync").exit_code == 0
    monkeypatch.setenv("KEYHYGIENE_RETENTION", "1d")

    result = cli("prune")

    assert result.exit_code == 0, result.stderr
    assert "prune ok" in result.stdout
    database = Database.open(Settings())  # type: ignore[call-arg]
    with database.sessions() as session:
        kinds = [(run.kind, run.status) for run in session.scalars(select(Run).order_by(Run.id))]
    database.close()
    assert kinds[-1] == ("prune", "ok")


@pytest.mark.parametrize(
    ("percent", "said", "status", "exit_code", "disabled"),
    [(100, "done", "ok", 0, True), (1, "refused", "refused", 3, False)],
    ids=["done", "refused"],
)
def test_a_stop_while_the_notices_are_sent_leaves_the_run_as_it_ended(
    env: dict[str, str],
    fake: FakeOpenRouter,
    cli: Callable[..., CliResult],
    tmp_path: Path,
    percent: int,
    said: str,
    status: str,
    exit_code: int,
    disabled: bool,
) -> None:
    """SIGTERM (`timeout`, `docker stop`) reaches an inline run after it recorded its outcome, while
    a slow receiver holds its notice: the run stays as it ended (done, or refused by a cap) and the
    process exits with its code; only the notices are cut short. The one being sent stays on record
    as being sent, and the second target's, not reached, as failed: the next run sends both."""
    assert cli("db", "upgrade").exit_code == 0
    now = utcnow()
    fake.add_key("dev-expired", created_at=now - 90 * DAY, expires_at=now - DAY)
    rules = tmp_path / "rules.toml"
    rules.write_text(
        f"[safety]\ndry_run = false\nmax_action_percent = {percent}\n\n"
        '[[rule]]\nname = "expired"\nmatch = "expired"\naction = "disable"\n\n'
        f'[[notify]]\nname = "ops"\nurl_env = "KH_TEST_WEBHOOK"\nformat = "json"\non = ["{said}"]\n\n'
        f'[[notify]]\nname = "audit"\nurl_env = "KH_TEST_WEBHOOK"\nformat = "slack"\non = ["{said}"]\n'
    )
    with WebhookSink() as sink:
        sink.hang = True
        process = subprocess.Popen(
            [keyhygiene_executable(), "run"],
            env={**os.environ, "KEYHYGIENE_RULES_FILE": str(rules), "KH_TEST_WEBHOOK": sink.url},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_until(lambda: sink.received, timeout=60, what="the run's notice to reach the receiver")
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)

    assert process.returncode == exit_code, stderr
    assert "notices_interrupted" in stderr
    assert len(sink.received) == 1
    database = Database.open(Settings())  # type: ignore[call-arg]
    with database.sessions() as session:
        run = session.scalars(select(Run).where(Run.kind == "run")).one()
        on_record = session.execute(select(Notice.target, Notice.status, Notice.last_error).order_by(Notice.id)).all()
    database.close()
    assert [tuple(row) for row in on_record] == [("ops", notices.SENDING, None), ("audit", notices.FAILED, UNREACHED)]
    assert (run.status, run.exit_code) == (status, exit_code)
    assert fake.get(next(key["hash"] for key in fake.keys if key["name"] == "dev-expired"))["disabled"] is disabled  # type: ignore[index]


class SoftLimit(Exception):
    """Stands for celery's SoftTimeLimitExceeded, which the worker raises wherever the job stands."""


def test_a_time_limit_landing_while_the_notices_are_prepared_leaves_the_run_as_it_ended(
    env: dict[str, str],
    cli: Callable[..., CliResult],
    rules_file: Callable[[str], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker's soft time limit is an exception raised wherever the job is: here after the run
    was recorded ok, while its notices are prepared (outside any one notice's own handling, which
    the Celery test covers). The run stays ok and the job answers ok."""
    assert cli("db", "upgrade").exit_code == 0
    rules_file('[[notify]]\nname = "ops"\nurl_env = "KH_TEST_WEBHOOK"\nformat = "json"\non = ["failed"]\n')

    def time_is_up(*args: object, **kwargs: object) -> None:
        raise SoftLimit("the soft time limit")

    monkeypatch.setattr("keyhygiene.notices.after_run", time_is_up)
    outcome = jobs.execute("sync", Settings(), abort_errors=(SoftLimit,))  # type: ignore[call-arg]

    assert (outcome.status, outcome.exit_code) == ("ok", 0)
    database = Database.open(Settings())  # type: ignore[call-arg]
    with database.sessions() as session:
        run = session.scalars(select(Run)).one()
    database.close()
    assert (run.status, run.exit_code) == ("ok", 0)


def test_a_task_delivered_twice_is_answered_by_its_run_that_works_not_its_skipped_copy(database: Database) -> None:
    """The broker delivered the message again while its first delivery still ran (a worker cut off
    from Redis past the job lock's lease): the copy was recorded skipped. `trigger --wait` follows the
    run that works, and reports how it ends, not the copy's skip."""
    from worker.trigger import wait_for_run

    now = utcnow()
    with session_scope(database) as session:
        working = runs.start_run(session, kind="sync", now=now, started_by="trigger", task_id="task-1").id
        runs.record_ended_run(
            session,
            kind="sync",
            now=now,
            status=runs.SKIPPED,
            exit_code=1,
            message="another job holds the lock",
            started_by="trigger",
            task_id="task-1",
        )
    with database.sessions() as session:
        assert runs.run_for_task(session, "task-1").id == working  # type: ignore[union-attr]
    with session_scope(database) as session:
        runs.finish_run(session, working, status=runs.OK, now=now, exit_code=0, message="snapshot 1: 0 keys")

    outcome = wait_for_run(database, "sync", "task-1", timeout=5)

    assert (outcome.run_id, outcome.status, outcome.exit_code) == (working, runs.OK, 0)


def test_a_long_job_run_from_the_command_line_is_not_taken_for_dead(
    env: dict[str, str], fake: FakeOpenRouter, cli: Callable[..., CliResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job on the worker cannot outlive its hard time limit, so a run `running` for twice the limit
    is one whose process died. One run from the command line (cron) has no limit: while it runs, its
    heartbeat keeps the next job from recording it aborted and failing the snapshot it is taking."""
    assert cli("db", "upgrade").exit_code == 0
    for index in range(4):
        workspace = str(fake.add_workspace(f"team-{index}")["id"])
        fake.add_key(f"key-{index}", workspace_id=workspace)
    monkeypatch.setenv("KEYHYGIENE_JOB_TIME_LIMIT", "1s")  # taken for dead after 2 s without a sign of life
    fake.faults.latency = 0.8  # one request at a time: the sync takes several seconds
    process = subprocess.Popen(
        [keyhygiene_executable(), "sync"],
        env={**os.environ, "KEYHYGIENE_HTTP_CONCURRENCY": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    database = Database.open(Settings())  # type: ignore[call-arg]

    def alive_past_the_limit() -> bool:
        with database.sessions() as session:
            run = session.scalars(select(Run).where(Run.kind == "sync")).first()
        return run is not None and run.status == "running" and utcnow() - run.started_at > 2.5 * SECOND

    try:
        wait_until(alive_past_the_limit, timeout=60, what="the sync to have run for longer than 2 s")
        pruned = cli("prune")  # a job that starts meanwhile, and looks for runs whose process died
        with database.sessions() as session:
            status_meanwhile = session.scalars(select(Run.status).where(Run.kind == "sync")).one()
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
        with database.sessions() as session:
            final = session.scalars(select(Run).where(Run.kind == "sync")).one()
        database.close()

    assert pruned.exit_code == 0, pruned.stderr
    assert status_meanwhile == "running"
    assert process.returncode == 0, stderr
    assert (final.status, final.exit_code) == ("ok", 0)
