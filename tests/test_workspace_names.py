"""Workspaces by name: the sync records each workspace's name, rule filters and --workspace take an
id or an exact name, `rules check` and `plan` warn about a value that names no workspace, and
reports show the name beside the id."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from db import snapshots
from db.migrate import upgrade
from keyhygiene.context import Database
from keyhygiene.fakeapi import FakeOpenRouter
from keyhygiene.rules import parse_rules, resolve_workspaces, unmatched_workspaces
from keyhygiene.settings import Settings
from keyhygiene.timeutil import utcnow

pytestmark = pytest.mark.postgres

RULES = """
[[rule]]
name = "delete-expired-production"
match = "expired"
action = "delete"
workspaces = ["Production"]
"""


@pytest.fixture
def org(fake: FakeOpenRouter, env: dict[str, str], database: Database, cli: Callable[..., Any]) -> dict[str, str]:
    """Two workspaces besides the default one, one expired key in each, synced once."""
    expired = utcnow() - timedelta(days=3)
    production = fake.add_workspace("Production")["id"]
    staging = fake.add_workspace("Staging")["id"]
    created = utcnow() - timedelta(days=40)
    fake.add_key("prod-old", workspace_id=production, expires_at=expired, created_at=created)
    fake.add_key("staging-old", workspace_id=staging, expires_at=expired, created_at=created)
    assert cli("sync").exit_code == 0
    return {"Production": production, "Staging": staging}


def test_the_sync_records_each_workspace_name(org: dict[str, str], database: Database) -> None:
    with database.sessions() as session:
        names = snapshots.workspace_names(session)

    assert names[org["Production"]] == "Production"
    assert names[org["Staging"]] == "Staging"
    assert "Default" in names.values()


def test_a_rule_filter_by_name_selects_that_workspace_only(
    org: dict[str, str], env: dict[str, str], cli: Callable[..., Any]
) -> None:
    Path(env["KEYHYGIENE_RULES_FILE"]).write_text(RULES)

    result = cli("plan", "--format", "json")

    assert result.exit_code == 0, result.stderr
    assert [row["key_name"] for row in json.loads(result.stdout)] == ["prod-old"]
    assert "warning" not in result.stderr


def test_a_filter_by_id_still_works(org: dict[str, str], env: dict[str, str], cli: Callable[..., Any]) -> None:
    Path(env["KEYHYGIENE_RULES_FILE"]).write_text(RULES.replace('"Production"', f'"{org["Staging"]}"'))

    result = cli("plan", "--format", "json")

    assert [row["key_name"] for row in json.loads(result.stdout)] == ["staging-old"]


def test_enforce_acts_on_the_named_workspace(
    org: dict[str, str], env: dict[str, str], cli: Callable[..., Any], fake: FakeOpenRouter
) -> None:
    # The fresh check before each change reads the same rules: a name must not turn into a skip there.
    Path(env["KEYHYGIENE_RULES_FILE"]).write_text("[safety]\ndry_run = false\nmax_action_percent = 100\n" + RULES)

    result = cli("enforce")

    assert result.exit_code == 0, result.stderr
    done = [event for event in result.events_named("key_action") if event["outcome"] == "done"]
    assert [event["key_name"] for event in done] == ["prod-old"]


@pytest.mark.parametrize("command", [("rules", "check"), ("plan",)])
def test_a_value_naming_no_workspace_is_warned_about(
    org: dict[str, str], env: dict[str, str], cli: Callable[..., Any], command: tuple[str, ...]
) -> None:
    Path(env["KEYHYGIENE_RULES_FILE"]).write_text(RULES.replace('"Production"', '"production", "Staging"'))

    result = cli(*command)

    assert result.exit_code == 0, result.stderr
    warnings = [event["message"] for event in result.events_named("rules_warning")]
    assert len(warnings) == 1, result.stderr
    assert "'production'" in warnings[0] and "delete-expired-production" in warnings[0]
    assert "'Production'" in warnings[0]  # the names it could have meant are listed


@pytest.mark.parametrize("command", [("rules", "check"), ("plan",)])
def test_a_notify_setting_that_does_nothing_is_warned_about(
    org: dict[str, str],
    env: dict[str, str],
    cli: Callable[..., Any],
    command: tuple[str, ...],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    notify = '\n[[notify]]\nname = "ops"\nurl_env = "OPS_HOOK"\non = ["failed"]\nupcoming_within = "7d"\n'
    monkeypatch.setenv("OPS_HOOK", "https://hooks.example/ops")  # set: only the setting is warned about
    rules = Path(env["KEYHYGIENE_RULES_FILE"])
    rules.write_text(RULES + notify)

    result = cli(*command)

    assert result.exit_code == 0, result.stderr
    warnings = [event["message"] for event in result.events_named("rules_warning")]
    line = (RULES + notify).splitlines().index('upcoming_within = "7d"') + 1
    assert warnings == [
        f"{rules}:{line}: upcoming_within: has no effect: on does not include "
        '"upcoming", so no upcoming notices are sent'
    ]


def test_rules_check_without_a_database_does_not_create_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli: Callable[..., Any]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KEYHYGIENE_DATABASE_URL", f"sqlite:///{tmp_path / 'none.db'}")
    (tmp_path / "rules.toml").write_text(RULES)

    result = cli("rules", "check", str(tmp_path / "rules.toml"))

    assert result.exit_code == 0 and result.stderr == ""
    assert not (tmp_path / "none.db").exists()


@pytest.mark.parametrize("kind", ["inventory", "actions", "spend", "idle"])
def test_reports_show_the_workspace_name_beside_its_id(
    org: dict[str, str], env: dict[str, str], cli: Callable[..., Any], fake: FakeOpenRouter, kind: str
) -> None:
    Path(env["KEYHYGIENE_RULES_FILE"]).write_text(RULES.replace('action = "delete"', 'action = "report"'))
    assert cli("enforce").exit_code == 0  # something in the audit log for `actions`
    if kind == "spend":  # something spent between two snapshots
        for key in fake.keys:
            fake.record_use(key["hash"], 1.5)
        assert cli("sync").exit_code == 0

    result = cli("report", kind, "--since", "1d", "--format", "json")

    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert rows, kind
    for row in rows:
        assert list(row).index("workspace") == list(row).index("workspace_id") + 1
    by_id = {row["workspace_id"]: row["workspace"] for row in rows}
    assert by_id.get(org["Production"], "Production") == "Production"
    assert "Production" in by_id.values()


def test_report_workspace_option_takes_a_name(org: dict[str, str], cli: Callable[..., Any]) -> None:
    result = cli("report", "inventory", "--workspace", "Staging", "--format", "json")

    assert [row["name"] for row in json.loads(result.stdout)] == ["staging-old"]


def test_report_workspace_option_takes_a_name_from_before_a_rename_and_refuses_one_never_seen(
    org: dict[str, str], fake: FakeOpenRouter, cli: Callable[..., Any]
) -> None:
    fake.rename_workspace(org["Staging"], "Pre-production")
    assert cli("sync").exit_code == 0

    for name in ("Pre-production", "Staging"):  # its name now, and the one older snapshots hold
        result = cli("report", "inventory", "--workspace", name, "--format", "json")
        assert [row["name"] for row in json.loads(result.stdout)] == ["staging-old"], name

    typo = cli("report", "inventory", "--workspace", "staging")
    assert typo.exit_code == 2
    assert "--workspace 'staging' is no workspace id or name the history holds" in typo.stderr


def test_a_past_inventory_names_a_workspace_deleted_since_by_its_last_name(
    org: dict[str, str], fake: FakeOpenRouter, cli: Callable[..., Any]
) -> None:
    """Before, names came from the newest snapshot alone: once Staging was deleted, the inventory
    as of a snapshot that held its keys showed them in a workspace with no name."""
    fake.rename_workspace(org["Staging"], "Pre-production")
    assert cli("sync").exit_code == 0
    before_deletion = utcnow()
    fake.delete_workspace(org["Staging"])
    for _ in range(2):  # older snapshots than the newest one are read to find the name
        assert cli("sync").exit_code == 0

    result = cli("report", "inventory", "--at", before_deletion.isoformat(), "--format", "json")

    assert result.exit_code == 0, result.stderr
    by_name = {row["name"]: (row["workspace_id"], row["workspace"]) for row in json.loads(result.stdout)}
    assert by_name["staging-old"] == (org["Staging"], "Pre-production")  # its last name, not the first
    assert by_name["prod-old"] == (org["Production"], "Production")
    table = cli("report", "inventory", "--at", before_deletion.isoformat())
    assert "Pre-production" in table.stdout


def test_report_workspace_option_on_an_empty_store_says_to_sync_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli: Callable[..., Any]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KEYHYGIENE_DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    assert cli("db", "upgrade").exit_code == 0

    result = cli("report", "spend", "--workspace", "Production")

    assert result.exit_code == 1
    assert "run `keyhygiene sync` first" in result.stderr


def test_names_resolve_to_every_workspace_of_that_name_and_ids_stay() -> None:
    ruleset = parse_rules(RULES.replace('"Production"', '"Production", "ws-3", "Nowhere"'))
    names = {"ws-1": "Production", "ws-2": "Production", "ws-3": "Staging"}

    resolved = resolve_workspaces(ruleset, names)

    assert resolved.rules[0].workspaces == ("ws-1", "ws-2", "ws-3", "Nowhere")
    assert unmatched_workspaces(ruleset, names) == [("delete-expired-production", "Nowhere")]


def test_migration_keeps_existing_snapshots(db_url: str) -> None:
    database = Database.open(Settings(_env_file=None, KEYHYGIENE_DATABASE_URL=db_url), check=False)  # type: ignore[call-arg]
    try:
        upgrade(database.engine, revision="0002")
        with database.engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO runs (id, kind, status, started_at, \"trigger\") VALUES (1, 'sync', 'ok', :t, 'cli')"
                ),
                {"t": "2026-01-01 00:00:00"},
            )
            connection.execute(
                text(
                    "INSERT INTO snapshots (id, run_id, status, started_at, taken_at, key_count) "
                    "VALUES (1, 1, 'complete', :t, :t, 7)"
                ),
                {"t": "2026-01-01 00:00:00"},
            )
        upgrade(database.engine)
        with database.sessions() as session:
            assert snapshots.latest_snapshot(session).key_count == 7  # type: ignore[union-attr]
            assert snapshots.workspace_names(session) == {}
    finally:
        database.close()
