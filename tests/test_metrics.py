"""Prometheus metrics as a monitoring system reads them: `keyhygiene metrics` once, and `/metrics`
scraped over HTTP from real worker processes; every figure is read from the database."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from db import runs
from db.models import Run
from keyhygiene.context import Database
from keyhygiene.fakeapi import FakeOpenRouter
from keyhygiene.timeutil import utcnow

from .celery_support import LIVE_RULES, Deployment, free_port, let_the_enforcement_hold_pass, wait_until
from .conftest import CliResult

DAY = timedelta(days=1)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text, by (name, sorted labels)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def run_counters(figures: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[tuple[str, str], float]:
    """``keyhygiene_runs_total`` by (job, status)."""
    return {
        (dict(labels)["job"], dict(labels)["status"]): value
        for (name, labels), value in figures.items()
        if name == "keyhygiene_runs_total"
    }


def runs_reported(cli: Callable[..., CliResult]) -> dict[tuple[str, str], float]:
    """What `keyhygiene report runs` counts by (job, status), over all of the history."""
    rows = json.loads(cli("report", "runs", "--since", "3650d", "--format", "json").stdout)
    return {key: float(count) for key, count in Counter((row["job"], row["status"]) for row in rows).items()}


def populate(fake: FakeOpenRouter) -> None:
    now = utcnow()
    other = fake.add_workspace("Research")["id"]
    for n in range(3):
        fake.add_key(f"old-{n}", created_at=now - 90 * DAY, expires_at=now - DAY)
    for n in range(4):
        fake.add_key(f"svc-{n}", created_at=now - 90 * DAY, last_used_at=now - DAY, usage=2.0)
    fake.add_key("paused", created_at=now - 90 * DAY, disabled=True, workspace_id=other)
    fake.add_key("idle", created_at=now - 90 * DAY, last_used_at=now - 60 * DAY, usage=1.0, workspace_id=other)


def test_metrics_once_agree_with_the_inventory_and_the_run_records(
    env: dict[str, str],
    database: Database,
    fake: FakeOpenRouter,
    cli: Callable[..., CliResult],
    rules_file: Callable[[str], Path],
) -> None:
    rules_file(LIVE_RULES.replace("dry_run = false", "dry_run = true"))
    populate(fake)
    assert cli("sync").exit_code == 0
    assert cli("enforce").exit_code == 0

    result = cli("metrics")

    assert result.exit_code == 0, result.stderr
    figures = samples(result.stdout)
    inventory = json.loads(cli("report", "inventory", "--format", "json").stdout)
    expected = Counter(
        (row["workspace_id"], "expired" if row["expired"] else "disabled" if row["disabled"] else "active")
        for row in inventory
    )
    got = {
        (dict(labels)["workspace"], dict(labels)["state"]): value
        for (name, labels), value in figures.items()
        if name == "keyhygiene_keys"
    }
    assert got == {key: float(count) for key, count in expected.items()}
    assert sum(got.values()) == 9
    assert figures[("keyhygiene_database_up", ())] == 1.0
    # Not used for 30 days: "idle" (60 days), and the never-used expired keys and "paused".
    assert figures[("keyhygiene_idle_keys", ())] == 5.0
    with database.sessions() as session:
        taken = session.scalar(select(func.max(Run.finished_at)).where(Run.kind == "sync"))
    assert run_counters(figures) == runs_reported(cli)
    planned = figures[
        ("keyhygiene_key_actions_total", (("action", "delete"), ("dry_run", "true"), ("outcome", "planned")))
    ]
    assert planned == 3.0
    # A second dry run of the same plan records it by reference: counted again, per run.
    assert cli("enforce").exit_code == 0
    again = samples(cli("metrics").stdout)
    for (name, labels), value in again.items():
        if name == "keyhygiene_key_actions_total" and dict(labels)["dry_run"] == "true":
            assert value == 2 * figures[(name, labels)], labels
    assert taken is not None
    assert figures[("keyhygiene_last_success_timestamp_seconds", (("job", "sync"),))] == pytest.approx(
        taken.timestamp()
    )


def test_the_counters_only_go_up_as_runs_and_changes_end(
    env: dict[str, str],
    database: Database,
    fake: FakeOpenRouter,
    cli: Callable[..., CliResult],
    rules_file: Callable[[str], Path],
) -> None:
    """A run is counted once it ended, a change once its outcome is known: a counter that counted
    them while running or pending would go down as each one ends, which Prometheus reads as a reset
    (``rate`` and ``increase`` then count everything again). What is in progress is a gauge."""
    rules_file(LIVE_RULES)
    populate(fake)
    doomed = fake.keys[0]["hash"]  # old-0, expired: deleted by the live rules
    fake.faults.server_error(1, 502, method="DELETE", path=f"/keys/{doomed}")  # its answer lost
    assert cli("run").exit_code == 1  # the change left in doubt
    with database.writer() as session, session.begin():
        running = runs.start_run(session, kind="sync", now=utcnow()).id  # a sync in progress

    during = samples(cli("metrics").stdout)
    with database.writer() as session, session.begin():
        runs.finish_run(session, running, status=runs.OK, now=utcnow(), exit_code=0, message="ok")
    let_the_enforcement_hold_pass(database)
    assert cli("run").exit_code == 0  # settles the change in doubt
    after = samples(cli("metrics").stdout)

    assert during[("keyhygiene_runs_running", (("job", "sync"),))] == 1.0
    assert during[("keyhygiene_key_actions_pending", (("action", "delete"),))] == 1.0
    assert ("keyhygiene_runs_running", (("job", "sync"),)) not in after
    assert ("keyhygiene_key_actions_pending", (("action", "delete"),)) not in after
    counters = [key for key in during if key[0] in ("keyhygiene_runs_total", "keyhygiene_key_actions_total")]
    assert counters
    for key in counters:
        assert after.get(key, 0.0) >= during[key], key
    assert run_counters(after) == runs_reported(cli)


def test_spend_of_the_last_day_is_what_report_spend_counts(
    env: dict[str, str], database: Database, fake: FakeOpenRouter, cli: Callable[..., CliResult]
) -> None:
    """Both count the growth between snapshots and what a key created in the period had spent when
    first seen (a key made with 3.0 already spent, found by the first sync)."""
    populate(fake)
    fake.add_key("fresh", created_at=utcnow() - timedelta(hours=1), usage=3.0)
    assert cli("sync").exit_code == 0
    fake.record_use(next(key["hash"] for key in fake.keys if key["name"] == "svc-0"), 1.5)
    assert cli("sync").exit_code == 0

    figures = samples(cli("metrics").stdout)

    spend = json.loads(cli("report", "spend", "--since", "1d", "--format", "json").stdout)
    assert {row["name"]: row["total"] for row in spend} == {"fresh": 3.0, "svc-0": 1.5}
    assert figures[("keyhygiene_spend_last_day_usd", ())] == pytest.approx(4.5)


def test_metrics_when_the_database_is_unreachable_say_so(env: dict[str, str], cli: Callable[..., CliResult]) -> None:
    # No migration: the schema check refuses, with the interface's exit code and no traceback; the
    # text still says the database is down, for a textfile collector's alert.
    result = cli("metrics")
    assert result.exit_code == 1
    assert "db upgrade" in result.stderr
    assert "Traceback" not in result.stderr
    assert samples(result.stdout) == {("keyhygiene_database_up", ()): 0.0}


def test_metrics_of_a_database_server_that_does_not_answer_say_it_is_down(
    env: dict[str, str], cli: Callable[..., CliResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEYHYGIENE_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:9/test")  # nothing listens

    result = cli("metrics")

    assert result.exit_code == 1
    assert samples(result.stdout) == {("keyhygiene_database_up", ()): 0.0}
    assert "cannot" in result.stderr and "Traceback" not in result.stderr


# -- from the worker ----------------------------------------------------------------------------


@pytest.mark.celery
@pytest.mark.timeout(150)
def test_two_workers_serve_the_same_figures_read_from_the_database(
    deploy: Deployment, fake: FakeOpenRouter, cli: Callable[..., CliResult]
) -> None:
    populate(fake)
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    for number, address in enumerate(addresses):
        deploy.start_worker(name=f"worker{number}", KEYHYGIENE_METRICS_ADDR=address)

    assert cli("run").exit_code == 0  # inline: the workers did not see it happen, the database did

    def scrape(address: str) -> str:
        response = httpx.get(f"http://{address}/metrics", timeout=10)
        response.raise_for_status()
        return response.text

    def both_see_the_run() -> list[dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
        found = [samples(scrape(address)) for address in addresses]
        wanted = ("keyhygiene_runs_total", (("job", "run"), ("status", "ok")))
        return found if all(figures.get(wanted) == 1.0 for figures in found) else []

    first, second = wait_until(both_see_the_run, timeout=30, what="both workers to report the run")
    assert first == second
    deleted = first[("keyhygiene_key_actions_total", (("action", "delete"), ("dry_run", "false"), ("outcome", "done")))]
    assert deleted == 3.0
    keys = sum(value for (name, _), value in first.items() if name == "keyhygiene_keys")
    inventory = json.loads(cli("report", "inventory", "--format", "json").stdout)
    assert keys == len(inventory) == 9  # the snapshot the run took, before its deletes
    assert run_counters(first) == runs_reported(cli)
