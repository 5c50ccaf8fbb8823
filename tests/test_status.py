"""``keyhygiene status`` as a monitoring probe, and ``report runs``: fresh, stale, failed and empty
histories (CLI, SQLite and PostgreSQL; the fake API over HTTP)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from db import runs
from keyhygiene.context import Database, session_scope
from keyhygiene.fakeapi import FakeOpenRouter
from keyhygiene.jobs import execute
from keyhygiene.settings import Settings
from keyhygiene.status import read_status
from keyhygiene.timeutil import parse_time, utcnow

from .conftest import CliResult


@pytest.fixture
def ready(env: dict[str, str], cli: Callable[..., CliResult]) -> dict[str, str]:
    assert cli("db", "upgrade").exit_code == 0
    return env


def _status(cli: Callable[..., CliResult]) -> tuple[int, dict[str, object]]:
    result = cli("status", "--format", "json")
    return result.exit_code, json.loads(result.stdout)


def test_nothing_has_run_yet(ready: dict[str, str], cli: Callable[..., CliResult]) -> None:
    code, status = _status(cli)
    assert code == 1
    assert status["healthy"] is False
    assert status["problems"] == ["no run has ended yet", "there is no complete snapshot yet"]


def test_a_fresh_successful_history_is_healthy(ready: dict[str, str], cli: Callable[..., CliResult]) -> None:
    assert cli("sync").exit_code == 0

    code, status = _status(cli)
    table = cli("status")

    assert code == 0 and table.exit_code == 0
    assert status["healthy"] is True and status["problems"] == []
    assert [(row["job"], row["status"], row["exit_code"]) for row in status["runs"]] == [("sync", "ok", 0)]  # type: ignore[index, union-attr]
    next_run = parse_time(str(status["next_run"]))
    assert utcnow() < next_run <= utcnow() + timedelta(hours=1)  # the default schedule is hourly
    assert "next scheduled run:" in table.stdout and "healthy" in table.stdout


def test_a_snapshot_older_than_twice_the_interval_is_stale(
    ready: dict[str, str], cli: Callable[..., CliResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings()  # type: ignore[call-arg]
    three_hours_ago = utcnow() - timedelta(hours=3)
    assert execute("sync", settings, clock=lambda: three_hours_ago).exit_code == 0

    code, status = _status(cli)
    assert code == 1
    assert status["problems"] == ["the newest snapshot is 3h 0m old, more than twice the schedule's interval (2h 0m)"]

    monkeypatch.setenv("KEYHYGIENE_SCHEDULE", "0 */4 * * *")  # every four hours: 3h is fresh enough
    assert _status(cli)[0] == 0


def test_a_schedule_of_working_hours_is_not_stale_overnight_or_over_the_weekend(ready: dict[str, str]) -> None:
    """Hourly from 9 to 17 on weekdays: on Monday at 08:00 Friday's 17:00 snapshot is as fresh as
    the schedule makes it; at 11:05, after the 9, 10 and 11 o'clock runs brought nothing, it is stale."""
    settings = Settings()  # type: ignore[call-arg]
    friday_17 = parse_time("2026-11-27T17:00:30Z")
    assert execute("sync", settings, clock=lambda: friday_17).exit_code == 0
    working_hours = "0 9-17 * * 1-5"
    database = Database.open(settings)
    try:
        with database.sessions() as session:
            monday_morning = read_status(session, schedule=working_hours, now=parse_time("2026-11-30T08:00:00Z"))
            monday_late = read_status(session, schedule=working_hours, now=parse_time("2026-11-30T11:05:00Z"))
    finally:
        database.close()
    assert monday_morning.problems == []
    assert monday_morning.stale_after == timedelta(hours=128)  # twice the 64 h since Friday's last run
    assert monday_late.problems == [
        "the newest snapshot is 2d 18h old, more than twice the schedule's interval (2h 0m)"
    ]


def test_a_failed_newest_run_is_unhealthy_and_a_skipped_one_says_nothing(
    ready: dict[str, str], cli: Callable[..., CliResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli("sync").exit_code == 0
    # Another job holding the lock is no sign of trouble.
    _beat_run_ended(runs.SKIPPED, 1, "another job holds the lock")
    assert _status(cli)[0] == 0

    monkeypatch.setenv("OPENROUTER_MANAGEMENT_KEY", "sk-or-v1-" + "0" * 64)  # a key the API rejects
    failed = cli("sync")
    assert failed.exit_code == 2

    code, status = _status(cli)
    assert code == 1
    [problem] = status["problems"]  # type: ignore[misc]
    assert problem.startswith(f"the newest run ({_newest_run_id(cli)}, sync) ended failed: ")
    assert "rejected" in problem


def test_an_aborted_run_is_told_of_without_saying_aborted_twice(
    ready: dict[str, str], cli: Callable[..., CliResult]
) -> None:
    assert cli("sync").exit_code == 0
    _beat_run_ended(runs.ABORTED, 1, "aborted: the job reached its time limit")

    code, status = _status(cli)

    assert code == 1
    [problem] = status["problems"]  # type: ignore[misc]
    assert problem == f"the newest run ({_newest_run_id(cli)}, run) ended aborted: the job reached its time limit"


def test_an_operators_undo_or_enable_says_nothing_of_the_schedule(
    ready: dict[str, str], cli: Callable[..., CliResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dry ``enable`` after a failed sync does not hide the failure; a mistyped ``undo`` (exit 2)
    after a good sync does not make the probe fail."""
    Path(ready["KEYHYGIENE_RULES_FILE"]).write_text("")
    assert cli("sync").exit_code == 0
    mistyped = cli("undo", "999")
    assert mistyped.exit_code == 2 and "there is no run 999" in mistyped.stderr
    assert _status(cli)[0] == 0

    good_key = ready["OPENROUTER_MANAGEMENT_KEY"]
    monkeypatch.setenv("OPENROUTER_MANAGEMENT_KEY", "sk-or-v1-" + "0" * 64)  # a key the API rejects
    assert cli("sync").exit_code == 2
    monkeypatch.setenv("OPENROUTER_MANAGEMENT_KEY", good_key)
    assert cli("enable", "0" * 64, "--dry-run").exit_code == 0

    code, status = _status(cli)
    assert code == 1
    [problem] = status["problems"]  # type: ignore[misc]
    assert ", sync) ended failed: " in problem


def test_a_refused_periodic_run_stays_a_problem_after_a_good_prune_or_sync(
    ready: dict[str, str], cli: Callable[..., CliResult]
) -> None:
    """The scheduled run refused by a cap (exit 3) is what the health check is for: a daily prune
    or a manual sync that succeeds after it does not make status healthy again."""
    assert cli("sync").exit_code == 0
    _beat_run_ended(runs.REFUSED, 3, "enforcement refused, nothing was changed: 40 changes planned")
    refused_id = _newest_run_id(cli)
    assert cli("sync").exit_code == 0

    code, status = _status(cli)

    assert code == 1
    assert status["problems"] == [
        f"the newest periodic run ({refused_id}) ended refused: enforcement refused, nothing was changed: "
        "40 changes planned"
    ]


def test_a_refused_periodic_run_stays_a_problem_after_an_operators_dry_run(
    ready: dict[str, str], cli: Callable[..., CliResult], rules_file: Callable[[str], object]
) -> None:
    """Looking at the backlog (`run --dry-run --allow-actions N`) made status healthy again, though
    the scheduled run was still refused and nothing had changed."""
    rules_file('[safety]\ndry_run = false\n\n[[rule]]\nname = "expired"\nmatch = "expired"\naction = "disable"\n')
    assert cli("sync").exit_code == 0
    _beat_run_ended(runs.REFUSED, 3, "enforcement refused, nothing was changed: 40 changes planned")
    refused_id = _newest_run_id(cli)
    assert cli("run", "--dry-run", "--allow-actions", "500").exit_code == 0

    code, status = _status(cli)

    assert code == 1
    assert status["problems"] == [
        f"the newest periodic run ({refused_id}) ended refused: enforcement refused, nothing was changed: "
        "40 changes planned"
    ]


def test_a_cron_deployment_switched_to_dry_run_after_a_refused_run_is_healthy_again(
    ready: dict[str, str], cli: Callable[..., CliResult], rules_file: Callable[[str], object]
) -> None:
    """Cron runs `keyhygiene run` (started by cli, not beat). After a refused live run the operator
    set `dry_run = true` in the rules: every run since was passed over as an operator's dry run,
    and status stayed unhealthy for good. A run records that the rules file made it dry; status
    judges each run by that, never by the rules file as it is now, and passes over only an
    operator's dry runs to find the schedule's newest run."""
    live = '[safety]\ndry_run = false\n\n[[rule]]\nname = "expired"\nmatch = "expired"\naction = "disable"\n'
    rules_file(live)
    assert cli("sync").exit_code == 0
    _beat_run_ended(runs.REFUSED, 3, "enforcement refused, nothing was changed: 40 changes planned", by="cli")
    assert cli("run", "--dry-run").exit_code == 0  # the operator looks: says nothing of the schedule
    rules_file(live.replace("dry_run = false", "dry_run = true"))

    assert _status(cli)[0] == 1  # switched, but no run of the schedule yet

    assert cli("run").exit_code == 0  # the cron job's next run: dry, by the rules file
    code, status = _status(cli)

    assert (code, status["problems"]) == (0, [])

    rules_file(live)
    assert cli("run", "--dry-run").exit_code == 0  # live again, and an operator's dry run after it
    code, status = _status(cli)

    assert (code, status["problems"]) == (0, [])  # the schedule's newest run (dry by the rules) is ok


def test_a_schedules_dry_run_refused_by_a_cap_stays_a_problem(
    ready: dict[str, str], cli: Callable[..., CliResult], rules_file: Callable[[str], object], fake: FakeOpenRouter
) -> None:
    """A cron job's run, dry by the rules file, refused by a cap (caps refuse dry runs too): it was
    passed over as an operator's dry run, and the good run before it made status healthy."""
    rules_file(
        "[safety]\ndry_run = true\nmax_actions_per_run = 1\nmax_action_percent = 100\n\n"
        '[[rule]]\nname = "expired"\nmatch = "expired"\naction = "disable"\n'
    )
    assert cli("run").exit_code == 0
    for number in range(3):
        fake.add_key(f"old-{number}", expires_at=utcnow() - timedelta(days=1))
    assert cli("run").exit_code == 3
    refused_id = _newest_run_id(cli)
    assert cli("prune").exit_code == 0

    code, status = _status(cli)

    assert code == 1
    assert status["problems"] == [f"the newest periodic run ({refused_id}) ended refused: {_message(refused_id)}"]


def test_an_operators_dry_runs_past_the_ones_read_do_not_hide_a_refused_run(
    ready: dict[str, str], cli: Callable[..., CliResult]
) -> None:
    """More of an operator's dry runs than status reads back (an automation's every five minutes):
    it took the newest of them for the schedule's."""
    _beat_run_ended(runs.REFUSED, 3, "enforcement refused, nothing was changed: 40 changes planned")
    refused_id = _newest_run_id(cli)
    database = Database.open(Settings())  # type: ignore[call-arg]
    with session_scope(database) as session:
        for _ in range(201):
            run = runs.start_run(session, kind="run", now=utcnow(), dry_run=True)
            runs.finish_run(session, run.id, status=runs.OK, now=utcnow(), exit_code=0, message="dry", dry_run=True)
    database.close()

    code, status = _status(cli)

    assert code == 1 and f"newest periodic run ({refused_id}) ended refused" in str(status["problems"]), status


def _message(run_id: int) -> str:
    database = Database.open(Settings())  # type: ignore[call-arg]
    with database.sessions() as session:
        run = runs.get_run(session, run_id)
        assert run is not None and run.message is not None
        message = run.message
    database.close()
    return message.removeprefix("refused: ")


def _beat_run_ended(status: str, exit_code: int, message: str, *, by: str = "beat") -> None:
    """Record a periodic ``run`` from beat (or ``by`` cron: ``cli``) that ended with ``status``, as
    the worker (or the command) records one."""
    database = Database.open(Settings())  # type: ignore[call-arg]
    with session_scope(database) as session:
        runs.record_ended_run(
            session,
            kind="run",
            now=utcnow(),
            status=status,
            exit_code=exit_code,
            message=message,
            started_by=by,
            task_id=f"t-{status}" if by == "beat" else None,
        )
    database.close()


def _newest_run_id(cli: Callable[..., CliResult]) -> int:
    rows = json.loads(cli("report", "runs", "--format", "json").stdout)
    return int(rows[-1]["run_id"])


def test_report_runs_lists_each_run_with_its_outcome(
    ready: dict[str, str], cli: Callable[..., CliResult], rules_file: Callable[[str], object]
) -> None:
    rules_file('[safety]\ndry_run = true\n\n[[rule]]\nname = "expired"\nmatch = "expired"\naction = "disable"\n')
    assert cli("sync").exit_code == 0
    assert cli("run", "--dry-run").exit_code == 0

    rows = json.loads(cli("report", "runs", "--format", "json").stdout)
    table = cli("report", "runs", "--since", "1h")
    as_csv = list(csv.DictReader(io.StringIO(cli("report", "runs", "--format", "csv").stdout)))

    assert [(row["run_id"], row["job"], row["status"], row["started_by"], row["dry_run"]) for row in rows] == [
        (1, "sync", "ok", "cli", None),
        (2, "run", "ok", "cli", True),
    ]
    assert set(rows[1]) == {
        "run_id", "job", "started_at", "finished_at", "status", "dry_run", "started_by", "allow_actions",
        "keys", "planned", "done", "skipped", "failed", "exit_code", "message", "task_id",
    }  # fmt: skip
    assert rows[1]["keys"] == 0 and rows[1]["planned"] == 0 and rows[1]["exit_code"] == 0
    assert "dry run" in rows[1]["message"]
    assert [row["job"] for row in as_csv] == ["sync", "run"]
    assert table.exit_code == 0 and "Runs," in table.stdout and "2 ok" in table.stdout
