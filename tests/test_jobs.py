"""The plain job functions that the command line and the Celery tasks share."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import select

from db import runs
from db.models import Run
from keyhygiene.context import Database, session_scope
from keyhygiene.settings import Settings
from keyhygiene.timeutil import utcnow

from .conftest import CliResult


def test_a_run_left_running_by_a_dead_process_is_marked_aborted(
    env: dict[str, str], cli: Callable[..., CliResult]
) -> None:
    assert cli("db", "upgrade").exit_code == 0
    database = Database.open(Settings())  # type: ignore[call-arg]
    with session_scope(database) as session:
        dead = runs.start_run(session, kind="run", now=utcnow() - timedelta(hours=3)).id
        alive = runs.start_run(session, kind="run", now=utcnow() - timedelta(minutes=5)).id

    assert cli("sync").exit_code == 0

    with database.sessions() as session:
        status = {run.id: run.status for run in session.scalars(select(Run))}
    database.close()
    assert status[dead] == "aborted"
    assert status[alive] == "running"  # younger than twice the job time limit: may still be working


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
