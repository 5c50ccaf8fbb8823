"""``undo RUN_ID`` and ``enable HASH...``: keys keyhygiene disabled come back, but only where nobody
changed them since (CLI, the fake API over HTTP, SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from db.engine import make_engine
from db.models import Action
from keyhygiene import enforcement, reenable
from keyhygiene.fakeapi import FakeOpenRouter
from keyhygiene.shutdown import Terminated
from keyhygiene.timeutil import utcnow

from .conftest import CliResult

RULES = """
[safety]
dry_run = false
max_action_percent = 100
protect_names = ["prod-*"]

[[rule]]
name = "disable-idle"
match = "unused"
idle_for = "30d"
action = "disable"
"""


class Keys:
    """Four idle keys that a run disables, and one busy key."""

    def __init__(self, fake: FakeOpenRouter) -> None:
        now = utcnow()
        self.fake = fake
        self.hash = {
            name: str(
                fake.add_key(name, created_at=now - timedelta(days=100), last_used_at=now - timedelta(days=60))["hash"]
            )
            for name in ("dev-a", "dev-b", "dev-c", "dev-d")
        }
        fake.add_key("svc-busy", created_at=now - timedelta(days=100), last_used_at=now - timedelta(hours=1))

    def disabled(self, name: str) -> bool:
        key = self.fake.get(self.hash[name])
        assert key is not None
        return bool(key["disabled"])

    def patched(self) -> list[tuple[str, object]]:
        names = {h: n for n, h in self.hash.items()}
        return [(names[call.path.rsplit("/", 1)[-1]], call.body) for call in self.fake.mutating_calls()]


@pytest.fixture
def keys(fake: FakeOpenRouter, env: dict[str, str], cli: Callable[..., CliResult]) -> Keys:
    Path(env["KEYHYGIENE_RULES_FILE"]).write_text(RULES)
    assert cli("db", "upgrade").exit_code == 0
    return Keys(fake)


def _run_id(result: CliResult) -> int:
    return int(result.stdout.split()[1])


def _audit(cli: Callable[..., CliResult], run_id: int) -> dict[str, dict[str, object]]:
    rows = json.loads(cli("report", "actions", "--since", "1h", "--format", "json").stdout)
    return {str(row["key_name"]): row for row in rows if row["run_id"] == run_id}


def test_undo_enables_what_the_run_disabled_and_leaves_a_key_someone_changed_alone(
    keys: Keys, cli: Callable[..., CliResult]
) -> None:
    disabling = cli("run")
    assert disabling.exit_code == 0, disabling.stderr
    run_id = _run_id(disabling)
    assert all(keys.disabled(name) for name in keys.hash)
    # In between (a few seconds later: the API gives updated_at to the second): someone enables dev-b
    # and disables it again (their disable now), someone deletes dev-c, and someone enables dev-d.
    keys.fake.advance(timedelta(seconds=5))
    keys.fake.update_key(keys.hash["dev-b"], {"disabled": False})
    keys.fake.update_key(keys.hash["dev-b"], {"disabled": True})
    keys.fake.delete_key(keys.hash["dev-c"])
    keys.fake.update_key(keys.hash["dev-d"], {"disabled": False})
    keys.fake.clear_calls()

    preview = cli("undo", str(run_id), "--dry-run")
    assert preview.exit_code == 0, preview.stderr
    assert "dry run: 1 of 4 key(s) would be enabled, 3 left alone" in preview.stdout
    assert keys.fake.mutating_calls() == []

    undone = cli("undo", str(run_id))

    assert undone.exit_code == 0, undone.stderr
    assert "1 of 4 key(s) enabled, 3 left alone, 0 failed" in undone.stdout
    assert "still apply" in undone.stdout  # the rule would disable dev-a again at the next run
    assert keys.patched() == [("dev-a", {"disabled": False})]
    assert not keys.disabled("dev-a") and keys.disabled("dev-b")
    audit = _audit(cli, _run_id(undone))
    assert {name: (row["action"], row["rule"], row["outcome"]) for name, row in audit.items()} == {
        name: ("enable", f"undo:{run_id}", outcome)
        for name, outcome in (("dev-a", "done"), ("dev-b", "skipped"), ("dev-c", "skipped"), ("dev-d", "skipped"))
    }
    assert "changed by someone else since our disable" in str(audit["dev-b"]["reason"])
    assert "already gone" in str(audit["dev-c"]["reason"])
    assert "already enabled" in str(audit["dev-d"]["reason"])
    events = undone.events_named("key_action")
    assert sorted((e["key_name"], e["action"], e["outcome"]) for e in events) == [
        ("dev-a", "enable", "done"),
        ("dev-b", "enable", "skipped"),
        ("dev-c", "enable", "skipped"),
        ("dev-d", "enable", "skipped"),
    ]

    # Undoing the same run again changes nothing: dev-a was enabled by the undo since.
    keys.fake.update_key(keys.hash["dev-a"], {"disabled": True})  # and disabled by someone else
    keys.fake.clear_calls()
    again = cli("undo", str(run_id))
    assert again.exit_code == 0, again.stderr
    assert keys.fake.mutating_calls() == []
    assert "changed this key again since" in str(_audit(cli, _run_id(again))["dev-a"]["reason"])

    runs = json.loads(cli("report", "runs", "--format", "json").stdout)
    assert [(r["job"], r["status"], r["dry_run"], r["planned"], r["done"], r["skipped"]) for r in runs[-3:]] == [
        ("undo", "ok", True, 1, 0, 3),
        ("undo", "ok", False, 1, 1, 3),
        ("undo", "ok", False, 0, 0, 4),
    ]


def test_undo_of_an_unknown_run_is_a_usage_error(keys: Keys, cli: Callable[..., CliResult]) -> None:
    result = cli("undo", "99")
    assert result.exit_code == 2
    assert "there is no run 99" in result.stderr
    assert keys.fake.mutating_calls() == []


def test_enable_gives_back_only_keys_keyhygiene_disabled(keys: Keys, cli: Callable[..., CliResult]) -> None:
    assert cli("run").exit_code == 0
    theirs = str(keys.fake.add_key("dev-theirs", disabled=True)["hash"])
    keys.fake.clear_calls()

    result = cli("enable", keys.hash["dev-a"], theirs)

    assert result.exit_code == 0, result.stderr
    assert "1 of 2 key(s) enabled, 1 left alone" in result.stdout
    assert keys.patched() == [("dev-a", {"disabled": False})]
    audit = _audit(cli, _run_id(result))
    assert (audit["dev-a"]["action"], audit["dev-a"]["rule"], audit["dev-a"]["outcome"]) == ("enable", "manual", "done")
    theirs_row = next(row for row in audit.values() if row["key_hash"] == theirs)  # no snapshot names it
    assert theirs_row["outcome"] == "skipped"
    assert "did not disable this key" in str(theirs_row["reason"])
    assert len(result.events_named("key_action")) == 2


def test_enable_of_a_name_or_a_shortened_hash_says_no_snapshot_holds_it(
    keys: Keys, cli: Callable[..., CliResult]
) -> None:
    assert cli("run").exit_code == 0
    keys.fake.clear_calls()

    result = cli("enable", "dev-a", keys.hash["dev-b"][:12])

    assert result.exit_code == 0, result.stderr
    assert "0 of 2 key(s) enabled, 2 left alone" in result.stdout
    assert [call for call in keys.fake.calls if call.path.startswith("/keys")] == []  # not even a GET
    reasons = [event["reason"] for event in result.events_named("key_action")]
    assert len(reasons) == 2 and all("no snapshot holds a key with this hash" in reason for reason in reasons)
    assert keys.disabled("dev-a") and keys.disabled("dev-b")


def test_undo_of_a_run_not_begun_before_it_is_a_usage_error(keys: Keys, cli: Callable[..., CliResult]) -> None:
    assert cli("run").exit_code == 0  # run 1; this undo is run 2
    keys.fake.clear_calls()

    result = cli("undo", "2")

    assert result.exit_code == 2, result.stderr
    assert "there is no run 2 before this one" in result.stderr
    assert keys.fake.mutating_calls() == []


def test_a_disable_whose_run_died_before_its_outcome_is_settled_and_left_alone(
    keys: Keys, env: dict[str, str], cli: Callable[..., CliResult]
) -> None:
    """The run was killed after the API disabled dev-b and before the outcome was recorded: a dry
    undo says so; a live undo settles it from the key's fresh state, and leaves it disabled: that
    state may as well be someone's disable since, which nothing tells apart from ours."""
    disabling = cli("run")
    run_id = _run_id(disabling)
    engine = make_engine(env["KEYHYGIENE_DATABASE_URL"])
    with engine.begin() as connection:
        connection.execute(
            update(Action.__table__)
            .where(Action.run_id == run_id, Action.key_name == "dev-b")
            .values(outcome="pending", finished_at=None, key_updated_at=None)
        )
    engine.dispose()
    assert keys.disabled("dev-b")

    dry = cli("undo", str(run_id), "--dry-run")
    assert dry.exit_code == 0, dry.stderr
    assert "3 of 4 key(s) would be enabled, 1 left alone" in dry.stdout
    assert "in doubt" in str(_audit(cli, _run_id(dry))["dev-b"]["reason"])

    live = cli("undo", str(run_id))
    assert live.exit_code == 0, live.stderr
    assert "3 of 4 key(s) enabled, 1 left alone" in live.stdout
    assert not any(keys.disabled(name) for name in ("dev-a", "dev-c", "dev-d"))
    assert keys.disabled("dev-b")
    assert "enable it in OpenRouter" in str(_audit(cli, _run_id(live))["dev-b"]["reason"])


def test_undo_says_how_many_keys_were_deleted(keys: Keys, env: dict[str, str], cli: Callable[..., CliResult]) -> None:
    deleting_rules = RULES.replace('action = "disable"', 'action = "delete"\ngrace = "0d"')
    Path(env["KEYHYGIENE_RULES_FILE"]).write_text(deleting_rules)
    deleting = cli("run")
    assert deleting.exit_code == 0, deleting.stderr

    result = cli("undo", str(_run_id(deleting)))

    assert result.exit_code == 0, result.stderr
    assert "0 of 4 key(s) enabled, 4 left alone, 0 failed; 4 of them were deleted and cannot be brought back" in (
        result.stdout
    )


def test_enable_after_our_own_enable_names_that_change(keys: Keys, cli: Callable[..., CliResult]) -> None:
    """dev-a was disabled by a run, given back by undo, then disabled by hand: keyhygiene's newest
    change of it is the enable, so enable leaves it alone and says so."""
    disabling = cli("run")
    undo = cli("undo", str(_run_id(disabling)))
    assert undo.exit_code == 0, undo.stderr
    keys.fake.update_key(keys.hash["dev-a"], {"disabled": True})

    result = cli("enable", keys.hash["dev-a"])

    assert result.exit_code == 0, result.stderr
    row = _audit(cli, _run_id(result))["dev-a"]
    assert row["outcome"] == "skipped"
    assert f"its enable in run {_run_id(undo)}, not a disable" in str(row["reason"])
    assert "disabled_by_rule" not in str(row["evidence"])


def test_an_undo_stopped_partway_puts_every_key_it_did_not_reach_on_record(
    keys: Keys, cli: Callable[..., CliResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM lands once the first key is enabled: the keys the undo never reached had no record at
    all, so neither `report actions` nor the run's counts showed that the undo was incomplete."""
    disabling = cli("run")
    assert disabling.exit_code == 0, disabling.stderr
    run_id = _run_id(disabling)
    carry_out = enforcement._carry_out

    def stopped_after_one(*args: Any, **fields: Any) -> str:
        carry_out(*args, **fields)
        raise Terminated("terminated by SIGTERM")  # as a stop held while the change was made lands

    monkeypatch.setattr(enforcement, "_carry_out", stopped_after_one)
    keys.fake.clear_calls()

    undone = cli("undo", str(run_id))

    assert undone.exit_code == 1
    assert len(keys.fake.mutating_calls()) == 1
    audit = _audit(cli, int(undone.events_named("run_started")[0]["run_id"]))
    assert sorted(str(row["outcome"]) for row in audit.values()) == ["done", "skipped", "skipped", "skipped"]
    unreached = [row for row in audit.values() if row["outcome"] == "skipped"]
    assert all("not reached: the run stopped before this change" in str(row["reason"]) for row in unreached)
    assert "(1 change(s) done, 3 skipped, 0 failed before it ended" in undone.stderr


def test_an_enable_stopped_while_it_records_the_keys_it_leaves_alone_puts_every_key_on_record(
    keys: Keys, cli: Callable[..., CliResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stop lands once the first unknown hash is recorded: the other keys asked for, the one it
    would have enabled included, had no record at all."""
    assert cli("run").exit_code == 0
    recorded = reenable.record_decision

    def stopped_after_one(*args: Any, **fields: Any) -> int:
        recorded(*args, **fields)
        raise Terminated("terminated by SIGTERM")  # as a stop held while it was recorded lands

    monkeypatch.setattr(reenable, "record_decision", stopped_after_one)
    keys.fake.clear_calls()

    stopped = cli("enable", "a" * 64, "b" * 64, keys.hash["dev-a"])

    assert stopped.exit_code == 1
    assert keys.fake.mutating_calls() == [] and keys.disabled("dev-a")
    rows = {
        str(row["key_hash"]): row
        for row in json.loads(cli("report", "actions", "--since", "1h", "--format", "json").stdout)
        if row["action"] == "enable"
    }
    assert set(rows) == {"a" * 64, "b" * 64, keys.hash["dev-a"]}
    assert "no snapshot holds a key with this hash" in str(rows["a" * 64]["reason"])
    for key_hash in ("b" * 64, keys.hash["dev-a"]):
        assert "not reached: the run stopped before this change" in str(rows[key_hash]["reason"])
