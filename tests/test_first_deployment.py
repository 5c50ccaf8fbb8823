"""The first deployment, as the README walks an operator through it: the shipped example rules
meet a backlog larger than the caps, the refusal says what to do, and --allow-actions works
through it once (CLI, the fake API over HTTP, SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from db import runs
from keyhygiene.fakeapi import FakeOpenRouter
from keyhygiene.jobs import execute
from keyhygiene.settings import Settings
from keyhygiene.timeutil import utcnow

from .conftest import CliResult

EXAMPLE_RULES = Path(__file__).resolve().parents[1] / "deploy" / "keyhygiene.toml.example"
KEYS = 200
IDLE = 60  # above max_actions_per_run = 50 and above 10% of 200 keys


def _organisation(fake: FakeOpenRouter) -> tuple[set[str], str]:
    """A backlog of idle keys, busy keys, and one idle production key; returns (idle hashes, prod hash)."""
    now = utcnow()
    idle = {
        str(
            fake.add_key(f"dev-{n}", created_at=now - timedelta(days=200), last_used_at=now - timedelta(days=90))[
                "hash"
            ]
        )
        for n in range(IDLE)
    }
    prod = str(
        fake.add_key("prod-api", created_at=now - timedelta(days=200), last_used_at=now - timedelta(days=90))["hash"]
    )
    for n in range(KEYS - IDLE - 1):
        fake.add_key(f"svc-{n}", created_at=now - timedelta(days=200), last_used_at=now - timedelta(hours=2))
    return idle, prod


def test_a_backlog_above_the_caps_is_refused_with_the_way_through_then_worked_through(
    fake: FakeOpenRouter, env: dict[str, str], cli: Callable[..., CliResult]
) -> None:
    idle, prod = _organisation(fake)
    rules = Path(env["KEYHYGIENE_RULES_FILE"])
    rules.write_text(EXAMPLE_RULES.read_text())  # the shipped rules, dry_run = true
    assert cli("db", "upgrade").exit_code == 0

    # 1. The first run, a dry run by the rules file, is refused: the message gives the counts and
    #    names the option.
    first = cli("run")
    assert first.exit_code == 3
    assert "60 planned changes exceed max_actions_per_run = 50" in first.stderr
    assert "60 planned changes are 30% of 200 keys, more than max_action_percent = 10%" in first.stderr
    assert "`keyhygiene enforce --allow-actions 60`" in first.stderr
    assert fake.mutating_calls() == []

    # 2. Read the plan, and see what enforcing it with --allow-actions would do, still as a dry run.
    plan = cli("plan", "--format", "json")
    assert {row["key_hash"] for row in json.loads(plan.stdout)} == idle
    preview = cli("enforce", "--dry-run", "--allow-actions", "60")
    assert preview.exit_code == 0, preview.stderr
    assert "60 change(s) planned" in preview.stdout
    assert fake.mutating_calls() == []

    # 3. Live, a plan larger than N is refused whole, like any cap.
    rules.write_text(EXAMPLE_RULES.read_text().replace("dry_run = true", "dry_run = false"))
    short = cli("enforce", "--allow-actions", "59")
    assert short.exit_code == 3
    assert "60 planned changes exceed --allow-actions 59" in short.stderr
    assert "if it is right, allow all of it: `--allow-actions 60`" in short.stderr
    assert fake.mutating_calls() == []

    # 4. Allowed: the backlog is worked through in one run; protect_names still holds.
    worked = cli("enforce", "--allow-actions", "60")
    assert worked.exit_code == 0, worked.stderr
    patched = {call.path.rsplit("/", 1)[-1] for call in fake.mutating_calls()}
    assert patched == idle and prod not in patched
    events = worked.events_named("key_action")
    assert len(events) == IDLE
    assert all(event["allow_actions"] == 60 and event["outcome"] == "done" for event in events)

    # 5. Steady state: the caps hold again without the option, and nothing is left to do.
    fake.clear_calls()
    steady = cli("run")
    assert steady.exit_code == 0, steady.stderr
    assert fake.mutating_calls() == []

    report = json.loads(cli("report", "runs", "--format", "json").stdout)
    assert [(row["job"], row["status"], row["exit_code"], row["allow_actions"], row["dry_run"]) for row in report] == [
        ("run", runs.REFUSED, 3, None, True),
        ("enforce", runs.OK, 0, 60, True),
        ("enforce", runs.REFUSED, 3, 59, False),
        ("enforce", runs.OK, 0, 60, False),
        ("run", runs.OK, 0, None, False),
    ]
    assert report[3]["done"] == 60 and "--allow-actions" in report[0]["message"]


def test_allow_actions_is_refused_where_there_are_no_caps(env: dict[str, str], cli: Callable[..., CliResult]) -> None:
    assert cli("sync", "--allow-actions", "5").exit_code == 2
    assert cli("enforce", "--allow-actions", "0").exit_code == 2
    refused = cli("trigger", "sync", "--allow-actions", "5")
    assert refused.exit_code == 2 and "--allow-actions" in refused.stderr


def test_a_triggered_job_refused_by_the_caps_gives_the_way_through_as_a_trigger(
    fake: FakeOpenRouter, env: dict[str, str], cli: Callable[..., CliResult]
) -> None:
    """The operator who queued the job on the worker is told to queue the way through there too."""
    _organisation(fake)
    Path(env["KEYHYGIENE_RULES_FILE"]).write_text(EXAMPLE_RULES.read_text())
    assert cli("db", "upgrade").exit_code == 0
    assert cli("sync").exit_code == 0

    outcome = execute("enforce", Settings(_env_file=None), started_by=runs.TRIGGER)

    assert outcome.exit_code == 3
    assert "once with `keyhygiene trigger enforce --allow-actions 60`" in outcome.message
    assert fake.mutating_calls() == []
