"""The full demo, end to end: the README's first command must work, quickly, with nothing but SQLite."""

from __future__ import annotations

import io
import itertools
import json
import logging
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from rich.console import Console

from db.audit import audit_records
from db.snapshots import complete_snapshots
from keyhygiene.context import Database
from keyhygiene.demo import run_demo
from keyhygiene.settings import Settings


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The demo configures logging for its process; put this test process's back afterwards."""
    root = logging.getLogger()
    handlers, level, config = list(root.handlers), root.level, structlog.get_config()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.configure(**config)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No account, no broker, no settings: the demo needs none."""
    monkeypatch.chdir(tmp_path)
    for name in (
        "OPENROUTER_MANAGEMENT_KEY",
        "OPENROUTER_BASE_URL",
        "KEYHYGIENE_DATABASE_URL",
        "KEYHYGIENE_BROKER_URL",
    ):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_the_full_demo_runs_end_to_end(
    clean_env: Path, cli: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # How long it takes is measured by the benchmarks, not asserted here (CI machines are shared).
    out = io.StringIO()
    code = run_demo(console=Console(file=out, width=80, color_system=None))
    text = out.getvalue()
    assert code == 0, text

    folder = clean_env / "keyhygiene-demo"
    assert {path.name for path in folder.iterdir()} >= {"keyhygiene.db", "keyhygiene.toml", "report.html"}
    assert "The plan (dry run: nothing was changed)" in text
    assert "Spend over the last 30 days" in text
    assert "KEYHYGIENE_DATABASE_URL=sqlite:///keyhygiene-demo/keyhygiene.db" in text
    assert max(len(line) for line in text.splitlines() if not line.startswith("  export")) <= 80
    page = (folder / "report.html").read_text()
    assert page.count('<svg class="chart"') == 5 and "http://" not in page and "https://" not in page

    # The dry-run pass planned something under every rule and never touched a protected key.
    database = Database.open(Settings(_env_file=None, KEYHYGIENE_DATABASE_URL=f"sqlite:///{folder / 'keyhygiene.db'}"))  # type: ignore[call-arg]
    try:
        with database.sessions() as session:
            audit = list(audit_records(session))
    finally:
        database.close()
    assert audit and all(row.dry_run and row.outcome == "planned" for row in audit)
    assert {(row.rule, row.action) for row in audit} >= {
        ("delete-expired", "disable"),
        ("delete-expired", "delete"),
        ("disable-idle", "disable"),
        ("disable-overspend", "disable"),
    }
    assert not [row for row in audit if row.key_name.startswith("prod-")]

    # The simulated clock ended at the real now: follow-up reports line up without --at.
    monkeypatch.setenv("KEYHYGIENE_DATABASE_URL", "sqlite:///keyhygiene-demo/keyhygiene.db")
    monkeypatch.setenv("KEYHYGIENE_RULES_FILE", "keyhygiene-demo/keyhygiene.toml")
    spend = cli("report", "spend", "--format", "json")
    assert spend.exit_code == 0, spend.stderr
    rows = json.loads(spend.stdout)
    assert len(rows) > 50 and rows[0]["name"] == "svc-batch-overspend"
    trends = json.loads(cli("report", "trends", "--since", "7d", "--format", "json").stdout)
    assert len(trends) == 7 and all(250 < row["keys"] < 400 for row in trends)
    idle = json.loads(cli("report", "idle", "--format", "json").stdout)
    assert any(row["next_action"] == "disable" for row in idle)
    actions = json.loads(cli("report", "actions", "--format", "json").stdout)
    assert len(actions) == len(audit)


def test_the_demo_command_in_a_named_directory(clean_env: Path, cli: Callable[..., Any]) -> None:
    first = cli("demo", "--dir", "somewhere/demo", "--days", "5", "--keys", "40")
    assert first.exit_code == 0, first.stderr
    assert "Everything is in somewhere/demo/" in first.stdout
    assert (clean_env / "somewhere/demo/report.html").exists()
    # Log lines only at WARNING and above: a quiet demo.
    assert not [line for line in first.stderr.splitlines() if "[info" in line or '"level": "info"' in line]
    again = cli("demo", "--dir", "somewhere/demo", "--days", "5", "--keys", "40")
    assert again.exit_code == 0, again.stderr
    assert "the previous demo database was replaced" in again.stdout


@pytest.mark.parametrize("existing", ["keyhygiene.db", "keyhygiene.toml"])
def test_the_demo_never_replaces_a_database_or_rules_file_it_did_not_write(
    clean_env: Path, cli: Callable[..., Any], existing: str
) -> None:
    """The demo's files have a real installation's default names: in a folder holding either one
    that the demo did not write, it stops (exit 2) and leaves both as they were."""
    mine = clean_env / existing
    mine.write_bytes(b"an operator's own file")
    refused = cli("demo", "--dir", ".", "--days", "1", "--keys", "10")
    assert refused.exit_code == 2
    assert existing in refused.stderr and "--dir" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert mine.read_bytes() == b"an operator's own file"
    assert sorted(path.name for path in clean_env.iterdir()) == [existing]


def test_the_demo_says_when_it_cannot_make_its_folder(clean_env: Path, cli: Callable[..., Any]) -> None:
    (clean_env / "a-file").write_text("not a folder")
    refused = cli("demo", "--dir", "a-file/demo", "--days", "1", "--keys", "10")
    assert refused.exit_code == 2
    assert "a-file/demo" in refused.stderr and "Traceback" not in refused.stderr


def test_an_hourly_demo_takes_a_snapshot_every_hour(
    clean_env: Path, cli: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    made = cli("demo", "--dir", "hourly", "--days", "2", "--keys", "40", "--every", "1h")
    assert made.exit_code == 0, made.stderr
    assert "2 days of hourly snapshots" in " ".join(made.stdout.split())
    monkeypatch.setenv("KEYHYGIENE_DATABASE_URL", "sqlite:///hourly/keyhygiene.db")
    monkeypatch.setenv("KEYHYGIENE_RULES_FILE", "hourly/keyhygiene.toml")
    database = Database.open(Settings(_env_file=None, KEYHYGIENE_DATABASE_URL="sqlite:///hourly/keyhygiene.db"))  # type: ignore[call-arg]
    try:
        with database.sessions() as session:
            taken = [snapshot.taken_at for snapshot in complete_snapshots(session)]
    finally:
        database.close()
    assert len(taken) == 48
    assert {later - earlier for earlier, later in itertools.pairwise(taken)} == {timedelta(hours=1)}
    # The keys in use spent at every hourly step, and the spend report reads those steps.
    spend = json.loads(cli("report", "spend", "--since", "2d", "--by", "day", "--format", "json").stdout)
    assert spend and sum(row["total"] for row in spend) > 0


@pytest.mark.parametrize("every", ["7h", "0m", "2d", "soon"])
def test_the_demo_refuses_a_step_that_does_not_divide_a_day(
    clean_env: Path, cli: Callable[..., Any], every: str
) -> None:
    refused = cli("demo", "--every", every)
    assert refused.exit_code == 2
    assert "--every" in refused.stderr
    assert not (clean_env / "keyhygiene-demo").exists()
