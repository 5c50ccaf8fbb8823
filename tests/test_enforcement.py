"""Enforcement end to end: the CLI, the fake API over HTTP, a real database (SQLite and PostgreSQL).

One scenario exercises every match, filter and safety limit; each test checks the exact PATCH
and DELETE calls the fake received, the audit rows and the ``key_action`` log events.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from structlog.testing import capture_logs

from db import audit, runs
from db.models import Action, Run
from keyhygiene import enforcement
from keyhygiene.context import Database, session_scope
from keyhygiene.enforcement import change_key, settle_in_doubt
from keyhygiene.fakeapi import FakeOpenRouter
from keyhygiene.jobs import execute
from keyhygiene.keysapi.client import KeysClient
from keyhygiene.keysapi.errors import AuthenticationFailed, ServerError
from keyhygiene.keysapi.models import Key
from keyhygiene.lease import EnforcementLease
from keyhygiene.rules import Decision, KeyFacts
from keyhygiene.settings import Settings
from keyhygiene.shutdown import Terminated
from keyhygiene.timeutil import utcnow

from .celery_support import let_the_enforcement_hold_pass
from .conftest import MANAGEMENT_KEY, CliResult

DAY = timedelta(days=1)
HOUR = timedelta(hours=1)


def _rules(
    *, protect_hash: str, workspace: str, dry_run: bool = False, max_actions: int = 20, max_percent: int = 60
) -> str:
    return f"""
[safety]
dry_run = {str(dry_run).lower()}
max_actions_per_run = {max_actions}
max_action_percent = {max_percent}
protect_hashes = ["{protect_hash}"]
protect_names = ["prod-*"]

[[rule]]
name = "delete-expired"
match = "expired"
action = "delete"
grace = "7d"

[[rule]]
name = "disable-idle"
match = "unused"
idle_for = "30d"
action = "disable"
names = ["dev-*", "svc-*", "prod-*"]
workspaces = ["{workspace}"]

[[rule]]
name = "disable-overspend"
match = "over_budget"
window = "monthly"
threshold_usd = 100.0
action = "disable"
exclude_names = ["billing-*"]

[[rule]]
name = "limit-exhausted"
match = "over_budget"
window = "monthly"
action = "disable"
reenable = true

[[rule]]
name = "report-old-disabled"
match = "unused"
idle_for = "60d"
action = "report"
disabled = true
min_age = "90d"
"""


class Org:
    """The scenario's keys by name, on the fake."""

    def __init__(self, fake: FakeOpenRouter) -> None:
        now = utcnow()
        self.fake = fake
        self.default = fake.default_workspace_id
        self.other = str(fake.add_workspace("Research")["id"])
        recent = now - DAY
        add = fake.add_key
        self.hashes: dict[str, str] = {}

        def key(name: str, **fields: Any) -> None:
            fields.setdefault("created_at", now - 100 * DAY)
            fields.setdefault("last_used_at", recent)
            fields.setdefault("usage", 1.0)
            self.hashes[name] = str(add(name, **fields)["hash"])

        key("dev-expired", expires_at=now - 3 * DAY)  # enabled: disabled first (grace 7d)
        key("dev-expired-old", expires_at=now - 20 * DAY, disabled=True, updated_at=now - 10 * DAY)  # deleted
        key("dev-expired-fresh", expires_at=now - 20 * DAY, disabled=True, updated_at=now - 2 * DAY)  # in grace
        key("dev-idle", last_used_at=now - 45 * DAY)  # disabled by disable-idle
        key("dev-busy")  # used yesterday: nothing
        key("prod-idle", last_used_at=now - 45 * DAY)  # protected by name
        key("svc-idle-protected", last_used_at=now - 45 * DAY)  # protected by hash
        key("svc-overspend", usage=300.0, usage_monthly=150.0)  # disabled by disable-overspend
        key("billing-overspend", usage=300.0, usage_monthly=150.0)  # excluded by exclude_names
        key("svc-exhausted", limit=10.0, limit_reset="monthly", usage=12.0, usage_monthly=12.0)  # limit-exhausted
        key("dev-idle-ws2", workspace_id=self.other, last_used_at=now - 45 * DAY)  # other workspace: nothing
        key("dev-old-disabled", disabled=True, created_at=now - 200 * DAY, last_used_at=now - 90 * DAY)  # report
        key("dev-idle-young", created_at=now - 20 * DAY, last_used_at=None, usage=0.0)  # too young
        key(
            "svc-disabled-by-someone", disabled=True, limit=10.0, limit_reset="monthly", usage=1.0, usage_monthly=1.0
        )  # never enabled by us
        for n in range(6):
            key(f"svc-healthy-{n}")

    def rules(self, **overrides: Any) -> str:
        return _rules(protect_hash=self.hashes["svc-idle-protected"], workspace=self.default, **overrides)

    def name_of(self, key_hash: str) -> str:
        return next(name for name, h in self.hashes.items() if h == key_hash)

    def changes(self) -> list[tuple[str, str, Any]]:
        """(method, key name, body) of every PATCH and DELETE the fake received, in order."""
        out = []
        for call in self.fake.mutating_calls():
            key_hash = call.path.rsplit("/", 1)[-1]
            out.append((call.method, self.name_of(key_hash), call.body))
        return out


@pytest.fixture
def org(fake: FakeOpenRouter) -> Org:
    return Org(fake)


@pytest.fixture
def ready(env: dict[str, str], cli: Callable[..., CliResult]) -> dict[str, str]:
    assert cli("db", "upgrade").exit_code == 0
    return env


def _actions(env: dict[str, str]) -> list[Action]:
    database = Database.open(Settings(KEYHYGIENE_DATABASE_URL=env["KEYHYGIENE_DATABASE_URL"]))  # type: ignore[call-arg]
    try:
        with database.sessions() as session:
            return list(session.scalars(select(Action).order_by(Action.id)))
    finally:
        database.close()


def _audit(env: dict[str, str]) -> list[audit.AuditRecord]:
    """The whole audit log as ``report actions`` reads it (plans stored by reference expanded)."""
    database = Database.open(Settings(KEYHYGIENE_DATABASE_URL=env["KEYHYGIENE_DATABASE_URL"]))  # type: ignore[call-arg]
    try:
        with database.sessions() as session:
            return list(audit.audit_records(session))
    finally:
        database.close()


def _runs(env: dict[str, str]) -> list[Run]:
    database = Database.open(Settings(KEYHYGIENE_DATABASE_URL=env["KEYHYGIENE_DATABASE_URL"]))  # type: ignore[call-arg]
    try:
        with database.sessions() as session:
            return list(session.scalars(select(Run).order_by(Run.id)))
    finally:
        database.close()


EXPECTED_CHANGES = [
    ("PATCH", "dev-expired", {"disabled": True}),
    ("DELETE", "dev-expired-old", None),
    ("PATCH", "dev-idle", {"disabled": True}),
    ("PATCH", "svc-exhausted", {"disabled": True}),
    ("PATCH", "svc-overspend", {"disabled": True}),
]


def test_run_changes_exactly_the_keys_the_rules_select(
    org: Org, ready: dict[str, str], cli: Callable[..., CliResult], rules_file: Callable[[str], Path]
) -> None:
    rules_file(org.rules())

    result = cli("run")

    assert result.exit_code == 0, result.stderr
    assert sorted(org.changes(), key=lambda c: c[1]) == sorted(EXPECTED_CHANGES, key=lambda c: c[1])
    assert org.fake.get(org.hashes["dev-expired-old"]) is None
    assert org.fake.get(org.hashes["dev-expired"])["disabled"] is True  # type: ignore[index]

    done = {(org.name_of(a.key_hash), a.action, a.rule) for a in _actions(ready) if a.outcome == "done"}
    assert done == {
        ("dev-expired", "disable", "delete-expired"),
        ("dev-expired-old", "delete", "delete-expired"),
        ("dev-idle", "disable", "disable-idle"),
        ("svc-exhausted", "disable", "limit-exhausted"),
        ("svc-overspend", "disable", "disable-overspend"),
        ("dev-old-disabled", "report", "report-old-disabled"),
    }
    assert all(a.outcome != "pending" and not a.dry_run for a in _actions(ready))

    events = result.events_named("key_action")
    assert len(events) == 6  # exactly one per planned or executed change
    for event in events:
        assert {"timestamp", "level", "run_id", "key_hash", "key_name", "rule", "action", "dry_run", "outcome"} <= set(
            event
        )
        assert event["dry_run"] is False
        assert event["outcome"] == "done"
    assert {e["key_name"] for e in events} == {name for name, _, _ in done}


def test_a_stop_while_the_reports_are_recorded_leaves_every_planned_change_on_record(
    org: Org,
    ready: dict[str, str],
    cli: Callable[..., CliResult],
    rules_file: Callable[[str], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # SIGTERM lands while the run records its reports, before it begins any change: nothing is
    # changed, and each planned change is recorded (and logged) as not reached.
    rules_file(org.rules())
    record_all = enforcement._record_all

    def stopped_on_reports(database: Database, decisions: Any, **fields: Any) -> list[int]:
        if decisions and all(decision.action == "report" for decision in decisions):
            raise Terminated("terminated by SIGTERM")
        return record_all(database, decisions, **fields)

    monkeypatch.setattr(enforcement, "_record_all", stopped_on_reports)

    result = cli("run")

    assert result.exit_code != 0
    assert _runs(ready)[-1].status == "aborted"
    assert org.fake.mutating_calls() == []
    changes = {(org.name_of(a.key_hash), a.outcome) for a in _actions(ready)}
    assert changes == {(name, "skipped") for _, name, _ in EXPECTED_CHANGES}
    skipped = [e for e in result.events_named("key_action") if e["outcome"] == "skipped"]
    assert sorted(e["key_name"] for e in skipped) == sorted(name for _, name, _ in EXPECTED_CHANGES)
    assert all(e["reason"].startswith("not reached: the run stopped before this change") for e in skipped)


def test_a_run_stopped_after_some_changes_records_how_many_it_made(
    org: Org,
    ready: dict[str, str],
    cli: Callable[..., CliResult],
    rules_file: Callable[[str], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGTERM lands after two changes were made: the run was recorded aborted with no counts at
    all, so `report runs` and `status` showed no sign that it had changed keys."""
    rules_file(org.rules())
    carry_out = enforcement._carry_out
    made: list[str] = []

    def stopped_after_two(database: Database, client: Any, decision: Any, action_id: int, **fields: Any) -> str:
        outcome = carry_out(database, client, decision, action_id, **fields)
        made.append(decision.key_hash)
        if len(made) == 2:  # as a SIGTERM held while the change was made lands once it is recorded
            raise Terminated("terminated by SIGTERM")
        return outcome

    monkeypatch.setattr(enforcement, "_carry_out", stopped_after_two)

    result = cli("run")

    assert result.exit_code == 1
    run = _runs(ready)[-1]
    assert run.status == "aborted"
    assert len(org.fake.mutating_calls()) == 2
    # The three changes not reached are on record as such (skipped).
    assert {key: run.summary[key] for key in ("done", "skipped", "failed")} == {"done": 2, "skipped": 3, "failed": 0}
    assert "(2 change(s) done, 3 skipped, 0 failed before it ended" in (run.message or "")
    [row] = json.loads(cli("report", "runs", "--format", "json").stdout)[-1:]
    assert (row["run_id"], row["done"], row["skipped"], row["failed"]) == (run.id, 2, 3, 0)


def test_a_key_whose_name_no_database_stores_as_text_is_planned_changed_and_audited(
    org: Org, ready: dict[str, str], cli: Callable[..., CliResult], rules_file: Callable[[str], Path]
) -> None:
    # JSON allows a lone surrogate ("\ud800") in a name; neither database stores one as text. Such a
    # key must not fail every run: its audit records write the name out.
    org.fake.update_key(org.hashes["dev-idle"], {"name": "dev-idle \ud800"})
    org.hashes["dev-idle \ud800"] = org.hashes.pop("dev-idle")
    rules_file(org.rules())

    planned = cli("run", "--dry-run")
    result = cli("run")

    assert planned.exit_code == 0, planned.stderr
    assert result.exit_code == 0, result.stderr
    assert ("PATCH", "dev-idle \ud800", {"disabled": True}) in org.changes()
    names = [
        (record.key_name, record.dry_run)
        for record in _audit(ready)
        if record.key_hash == org.hashes["dev-idle \ud800"]
    ]
    assert names == [("dev-idle \\ud800", True), ("dev-idle \\ud800", False)]


def test_delete_follows_disable_after_grace_and_reenable_only_what_the_rule_disabled(
    org: Org, ready: dict[str, str], cli: Callable[..., CliResult], rules_file: Callable[[str], Path]
) -> None:
    rules_file(org.rules())
    assert cli("run").exit_code == 0
    org.fake.clear_calls()

    # The monthly window resets (the fake's calendar moves into the next month): svc-exhausted,
    # which our rule disabled, is under budget again and is enabled; the key someone else disabled
    # stays disabled.
    org.fake.set_clock(utcnow() + timedelta(days=35))
    result = cli("run")

    assert result.exit_code == 0, result.stderr
    assert org.changes() == [("PATCH", "svc-exhausted", {"disabled": False})]
    enable = [a for a in _actions(ready) if a.action == "enable"]
    assert [(org.name_of(a.key_hash), a.rule, a.outcome) for a in enable] == [
        ("svc-exhausted", "limit-exhausted", "done")
    ]
    # dev-expired was disabled seconds ago: its grace (7d) has not passed, so it is not deleted.
    assert org.fake.get(org.hashes["dev-expired"]) is not None


def test_grace_zero_deletes_an_enabled_expired_key_at_once(
    org: Org, ready: dict[str, str], cli: Callable[..., CliResult], rules_file: Callable[[str], Path]
) -> None:
    rules_file(org.rules().replace('grace = "7d"', 'grace = "0d"'))

    assert cli("run").exit_code == 0

    deleted = {name for method, name, _ in org.changes() if method == "DELETE"}
    assert deleted == {"dev-expired", "dev-expired-old", "dev-expired-fresh"}


@pytest.mark.parametrize("how", ["rules file", "--dry-run"])
def test_dry_run_changes_nothing_and_records_the_plan(
    how: str, org: Org, ready: dict[str, str], cli: Callable[..., CliResult], rules_file: Callable[[str], Path]
) -> None:
    rules_file(org.rules(dry_run=how == "rules file"))

    result = cli("run", "--dry-run") if how == "--dry-run" else cli("run")

    assert result.exit_code == 0, result.stderr
    assert org.fake.mutating_calls() == []
    assert _actions(ready) == []  # a dry run changes nothing: its plan is stored by reference
    actions = _audit(ready)
    assert len(actions) == 6
    assert all(a.dry_run and a.outcome == "planned" for a in actions)
    events = result.events_named("key_action")
    assert len(events) == 6
    assert all(e["dry_run"] is True and e["outcome"] == "planned" for e in events)


def test_caps_refuse_the_whole_enforcement(
    org: Org, ready: dict[str, str], cli: Callable[..., CliResult], rules_file: Callable[[str], Path]
) -> None:
    rules_file(org.rules(max_actions=4))

    result = cli("run")

    assert result.exit_code == 3
    assert "5" in result.stderr and "max_actions_per_run" in result.stderr
    assert org.fake.mutating_calls() == []
    assert _runs(ready)[-1].status == "refused"
    assert _actions(ready) == []
    assert {a.outcome for a in _audit(ready)} == {"refused"}
    assert len(_audit(ready)) == 5
    assert {e["outcome"] for e in result.events_named("key_action")} == {"refused"}
    # The refused run's counts, as `report runs` and `status` show them.
    runs_report = json.loads(cli("report", "runs", "--format", "json").stdout)
    refused = next(row for row in runs_report if row["status"] == "refused")
    assert (refused["planned"], refused["done"], refused["keys"]) == (5, 0, len(org.hashes))


def test_percent_cap_refuses(
    org: Org, ready: dict[str, str], cli: Callable[..., CliResult], rules_file: Callable[[str], Path]
) -> None:
    rules_file(org.rules(max_percent=10))  # 5 changes of 20 keys is 25%

    result = cli("run")

    assert result.exit_code == 3
    assert "max_action_percent" in result.stderr
    assert org.fake.mutating_calls() == []


def test_a_shrunken_inventory_is_never_enforced_on(
    org: Org, ready: dict[str, str], cli: Callable[..., CliResult], rules_file: Callable[[str], Path]
) -> None:
    rules_file(org.rules(max_percent=20))
    assert cli("sync").exit_code == 0
    for n in range(6):  # 6 of 20 keys vanish: a 30% drop
        org.fake.delete_key(org.hashes[f"svc-healthy-{n}"])
    org.fake.clear_calls()

    result = cli("run")

    assert result.exit_code == 3
    assert "shrank" in result.stderr
    assert org.fake.mutating_calls() == []
    assert _runs(ready)[-1].status == "refused"


def test_each_change_is_checked_against_the_fresh_key(
    org: Org, ready: dict[str, str], cli: Callable[..., CliResult], rules_file: Callable[[str], Path]
) -> None:
    rules_file(org.rules())
    assert cli("sync").exit_code == 0
    # Between the snapshot and enforcement: dev-idle is used again, svc-overspend is deleted by
    # someone, and svc-exhausted is disabled by someone.
    org.fake.record_use(org.hashes["dev-idle"], 0.5)
    org.fake.delete_key(org.hashes["svc-overspend"])
    org.fake.update_key(org.hashes["svc-exhausted"], {"disabled": True})
    org.fake.clear_calls()

    result = cli("enforce")

    assert result.exit_code == 0, result.stderr
    assert sorted(org.changes(), key=lambda c: c[1]) == [
        ("PATCH", "dev-expired", {"disabled": True}),
        ("DELETE", "dev-expired-old", None),
    ]
    skipped = {org.name_of(a.key_hash): a.reason for a in _actions(ready) if a.outcome == "skipped"}
    assert set(skipped) == {"dev-idle", "svc-overspend", "svc-exhausted"}
    assert "no longer matches" in (skipped["dev-idle"] or "")
    assert "already gone" in (skipped["svc-overspend"] or "")
    assert "already disabled" in (skipped["svc-exhausted"] or "")
    reasons = {e["key_name"]: e.get("reason") for e in result.events_named("key_action") if e["outcome"] == "skipped"}
    assert set(reasons) == set(skipped)


def test_the_audit_keeps_the_decision_made_on_the_fresh_key(
    org: Org, ready: dict[str, str], cli: Callable[..., CliResult], rules_file: Callable[[str], Path]
) -> None:
    """Between the snapshot and enforcement svc-overspend is renamed out of disable-overspend's
    reach and given a monthly limit it has spent past: still a disable, now by limit-exhausted.
    The audit and the log say so, under the key's new name (undo and re-enable read that rule)."""
    rules_file(org.rules())
    assert cli("sync").exit_code == 0
    org.fake.update_key(
        org.hashes["svc-overspend"], {"name": "billing-overspend-2", "limit": 10.0, "limit_reset": "monthly"}
    )

    result = cli("enforce")

    assert result.exit_code == 0, result.stderr
    done = {a.key_hash: a for a in _actions(ready) if a.outcome == "done"}
    action = done[org.hashes["svc-overspend"]]
    assert (action.action, action.rule, action.key_name) == ("disable", "limit-exhausted", "billing-overspend-2")
    events = [e for e in result.events_named("key_action") if e["key_hash"] == org.hashes["svc-overspend"]]
    assert [(e["rule"], e["key_name"], e["outcome"]) for e in events] == [
        ("limit-exhausted", "billing-overspend-2", "done")
    ]


def test_an_api_error_on_one_key_does_not_stop_the_others(
    org: Org, ready: dict[str, str], cli: Callable[..., CliResult], rules_file: Callable[[str], Path]
) -> None:
    rules_file(org.rules())
    org.fake.faults.malformed(1, method="PATCH", path=f"/keys/{org.hashes['dev-idle']}")

    result = cli("run")

    assert result.exit_code == 1  # a failed change makes the run fail, after the others were done
    changed = {name for _, name, _ in org.changes()}
    assert {"dev-expired", "dev-expired-old", "svc-exhausted", "svc-overspend"} <= changed
    failed = [a for a in _actions(ready) if a.outcome == "failed"]
    assert [org.name_of(a.key_hash) for a in failed] == ["dev-idle"]
    assert failed[0].error


def test_a_crash_between_intent_and_outcome_is_settled_from_the_fresh_state(
    org: Org, ready: dict[str, str], cli: Callable[..., CliResult], rules_file: Callable[[str], Path]
) -> None:
    rules_file(org.rules())
    assert cli("run").exit_code == 0
    # Simulate a process killed after the API call but before the outcome was written: put
    # the intents back to pending.
    database = Database.open(Settings(KEYHYGIENE_DATABASE_URL=ready["KEYHYGIENE_DATABASE_URL"]))  # type: ignore[call-arg]
    with database.sessions() as session, session.begin():
        for action in session.scalars(select(Action).where(Action.action.in_(("disable", "delete")))):
            action.outcome = "pending"
            action.finished_at = None
    database.close()
    org.fake.clear_calls()

    result = cli("run")

    assert result.exit_code == 0, result.stderr
    assert org.fake.mutating_calls() == []  # nothing repeated blindly
    actions = _actions(ready)
    assert not [a for a in actions if a.outcome == "pending"]
    settled = [a for a in actions if a.reason and "settled" in a.reason]
    assert {org.name_of(a.key_hash) for a in settled} == {
        "dev-expired",
        "dev-expired-old",
        "dev-idle",
        "svc-exhausted",
        "svc-overspend",
    }
    assert all(a.outcome == "done" for a in settled)


def test_plan_prints_decisions_as_json_and_changes_nothing(
    org: Org, ready: dict[str, str], cli: Callable[..., CliResult], rules_file: Callable[[str], Path]
) -> None:
    import json

    rules_file(org.rules())
    assert cli("sync").exit_code == 0
    org.fake.clear_calls()

    result = cli("plan", "--format", "json")

    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert {(row["key_name"], row["action"]) for row in rows} == {
        ("dev-expired", "disable"),
        ("dev-expired-old", "delete"),
        ("dev-idle", "disable"),
        ("svc-exhausted", "disable"),
        ("svc-overspend", "disable"),
        ("dev-old-disabled", "report"),
    }
    assert all(row["evidence"] for row in rows)
    assert org.fake.calls == [] or all(call.method == "GET" for call in org.fake.calls)


def test_an_invalid_rules_file_never_reaches_the_engine(
    org: Org, ready: dict[str, str], cli: Callable[..., CliResult], rules_file: Callable[[str], Path]
) -> None:
    path = rules_file(org.rules().replace('idle_for = "30d"', 'idle_for = "30 days"'))

    result = cli("run")

    assert result.exit_code == 2
    assert str(path) in result.stderr and "idle_for" in result.stderr
    assert org.fake.calls == []


def test_a_garbled_answer_is_settled_from_the_fresh_state(
    org: Org, ready: dict[str, str], cli: Callable[..., CliResult], rules_file: Callable[[str], Path]
) -> None:
    rules_file(org.rules())
    # The PATCH takes effect but its answer is cut in half: the audit must say what really happened.
    org.fake.faults.truncated(1, method="PATCH", path=f"/keys/{org.hashes['dev-idle']}")

    result = cli("run")

    assert result.exit_code == 0, result.stderr
    assert org.fake.get(org.hashes["dev-idle"])["disabled"] is True  # type: ignore[index]
    row = next(a for a in _actions(ready) if org.name_of(a.key_hash) == "dev-idle")
    assert row.outcome == "done"
    assert "fresh state shows the change was made" in (row.reason or "")


DELETES_IN_DOUBT = {
    # The DELETE takes effect but the connection drops before the answer: it is not sent again.
    "answer lost": (lambda fake: fake.faults.drop_connection(1, after_processing=True, method="DELETE"), 1),
    # A 503 refuses a request, so the DELETE would be sent again once the key is looked at again;
    # but a gateway may answer 503 once the API behind it acted: the key found gone then may be our
    # own doing, and it is not sent again.
    "503 after it took effect": (
        lambda fake: fake.faults.server_error(1, 503, method="DELETE", after_processing=True),
        1,
    ),
}


@pytest.mark.parametrize("fault", list(DELETES_IN_DOUBT))
def test_a_delete_in_doubt_is_settled_from_the_fresh_state(
    org: Org, ready: dict[str, str], cli: Callable[..., CliResult], rules_file: Callable[[str], Path], fault: str
) -> None:
    """A fresh GET (404) shows the key is gone because of us, and the audit says so."""
    rules_file(org.rules())
    schedule, deletes_sent = DELETES_IN_DOUBT[fault]
    schedule(org.fake)

    result = cli("run")

    assert result.exit_code == 0, result.stderr
    doomed = org.hashes["dev-expired-old"]
    assert org.fake.get(doomed) is None
    assert org.fake.change_counts()[("DELETE", doomed)] == deletes_sent
    row = next(a for a in _actions(ready) if org.name_of(a.key_hash) == "dev-expired-old")
    assert (row.action, row.outcome) == ("delete", "done")
    assert "shows the change" in (row.reason or "") and "made" in (row.reason or "")


def _run_losing_the_answer(
    org: Org,
    ready: dict[str, str],
    cli: Callable[..., CliResult],
    rules_file: Callable[[str], Path],
    *,
    key: str,
    method: str,
    status: int,
) -> tuple[str, CliResult, Action]:
    """A run whose change to the key named ``key`` gets ``status`` from a gateway, the API behind it
    not (yet) having made it: the run fails, the change left in doubt (its intent pending)."""
    rules_file(org.rules())
    key_hash = org.hashes[key]
    org.fake.faults.server_error(1, status, method=method, path=f"/keys/{key_hash}")
    result = cli("run")
    assert result.exit_code == 1, result.stderr  # one change failed; the others were made
    assert org.fake.change_counts()[(method, key_hash)] == 1  # not re-sent
    row = next(a for a in _actions(ready) if a.key_hash == key_hash)
    assert row.outcome == "pending"
    return key_hash, result, row


def test_a_disable_whose_answer_was_lost_and_not_applied_is_not_resent_and_stays_in_doubt(
    org: Org, ready: dict[str, str], cli: Callable[..., CliResult], rules_file: Callable[[str], Path]
) -> None:
    # A 502 from a proxy: the PATCH may or may not have reached the API, or may still be at work
    # behind it. Here it did not reach it.
    idle, result, row = _run_losing_the_answer(org, ready, cli, rules_file, key="dev-idle", method="PATCH", status=502)

    assert org.fake.get(idle)["disabled"] is False  # type: ignore[index]
    assert [event["fresh_state"] for event in result.events_named("key_action_in_doubt")] == ["unchanged"]
    assert not [e for e in result.events_named("key_action") if e["key_hash"] == idle and e["outcome"] != "planned"]

    # The request may still land: until that has surely passed, the lock is kept and no run settles
    # the change (it would record it as not made).
    assert result.events_named("enforcement_lock_kept")
    too_soon = cli("run")
    assert too_soon.exit_code == 1
    assert "run 1 left a change in doubt whose request may still land" in too_soon.stderr
    assert [a.outcome for a in _actions(ready) if a.key_hash == idle] == ["pending"]

    # Once the lock has expired, the next run finds the change not made: it records that, and
    # decides again (disables it).
    _expire_the_lock(ready)
    again = cli("run")

    assert again.exit_code == 0, again.stderr
    rows = [a for a in _actions(ready) if a.key_hash == idle]
    assert [(a.run_id == row.run_id, a.outcome) for a in rows] == [(True, "failed"), (False, "done")]
    assert "the change was not made" in (rows[0].reason or "")
    assert org.fake.get(idle)["disabled"] is True  # type: ignore[index]


def test_a_delete_that_lands_after_its_answer_was_lost_is_recorded_as_made_before_the_shrink_guard(
    org: Org, ready: dict[str, str], cli: Callable[..., CliResult], rules_file: Callable[[str], Path]
) -> None:
    # A gateway times out on the DELETE and the key still shows; the API deletes it later.
    doomed, _, row = _run_losing_the_answer(
        org, ready, cli, rules_file, key="dev-expired-old", method="DELETE", status=504
    )
    assert row.action == "delete"
    org.fake.delete_key(doomed)  # the request that was at work behind the gateway
    # One key of 21 gone (4.8%) is more than the guard lets pass unexplained now.
    rules_file(org.rules(max_percent=2))
    _expire_the_lock(ready)  # kept for the change in doubt until its request has surely ended

    second = cli("run")

    assert second.exit_code == 0, second.stderr  # not refused as an inventory that shrank unexplained
    assert not second.events_named("enforcement_refused")
    (row,) = [a for a in _actions(ready) if a.key_hash == doomed]
    assert row.outcome == "done" and "shows the change was made" in (row.reason or "")
    assert org.fake.change_counts()[("DELETE", doomed)] == 1


def test_a_change_in_doubt_that_lands_after_its_run_is_recorded_as_made_and_is_not_given_back(
    org: Org, ready: dict[str, str], cli: Callable[..., CliResult], rules_file: Callable[[str], Path]
) -> None:
    # A gateway times out on the PATCH; the key still reads enabled when the run ends, so the run
    # leaves the change in doubt. An operator runs again at once; the request lands after that.
    idle, _, row = _run_losing_the_answer(org, ready, cli, rules_file, key="dev-idle", method="PATCH", status=504)
    again = cli("run")  # the lock is kept for the change in doubt: nothing is settled too early
    org.fake.update_key(idle, {"disabled": True})  # the request that was at work behind the gateway
    _expire_the_lock(ready)

    settled = cli("run")

    assert (again.exit_code, settled.exit_code) == (1, 0), settled.stderr
    assert [(a.run_id, a.outcome) for a in _actions(ready) if a.key_hash == idle] == [(row.run_id, "done")]
    assert org.fake.change_counts()[("PATCH", idle)] == 1  # never sent again
    # Whether our request or someone since disabled the key cannot be told from its state: undo
    # leaves it alone, and says how to give it back.
    undone = cli("undo", str(row.run_id))
    assert undone.exit_code == 0, undone.stderr
    assert org.fake.get(idle)["disabled"] is True  # type: ignore[index]
    (left,) = [a for a in _actions(ready) if a.key_hash == idle and a.action == "enable"]
    assert left.outcome == "skipped" and "enable it in OpenRouter" in (left.reason or "")


def test_a_key_someone_disabled_while_our_disable_was_in_doubt_is_never_enabled_by_undo(
    org: Org, ready: dict[str, str], cli: Callable[..., CliResult], rules_file: Callable[[str], Path]
) -> None:
    """The PATCH is answered 500 before the API acts on it; seconds later an operator disables the
    key by hand (a leaked key, say). Settling our change in doubt finds the key disabled, which our
    request could have done as well: the record must not take the operator's updated_at for ours,
    or undo would call the key unchanged since our disable and enable it."""
    idle, _, row = _run_losing_the_answer(org, ready, cli, rules_file, key="dev-idle", method="PATCH", status=500)
    assert org.fake.get(idle)["disabled"] is False  # type: ignore[index]
    org.fake.update_key(idle, {"disabled": True})  # the operator's own disable, at once
    _expire_the_lock(ready)

    undone = cli("undo", str(row.run_id))

    assert undone.exit_code == 0, undone.stderr
    assert org.fake.get(idle)["disabled"] is True  # type: ignore[index]
    assert org.fake.change_counts()[("PATCH", idle)] == 1  # only our disable, answered 500
    disable, enable = [a for a in _actions(ready) if a.key_hash == idle]
    assert (disable.outcome, disable.key_updated_at) == ("done", None)
    assert "cannot be told apart" in (disable.reason or "")
    assert enable.outcome == "skipped" and "cannot tell whether anyone changed the key" in (enable.reason or "")


def test_a_change_answered_503_until_the_retry_time_ran_out_is_in_doubt_and_recorded_once_it_lands(
    org: Org, ready: dict[str, str], cli: Callable[..., CliResult], rules_file: Callable[[str], Path]
) -> None:
    """Every try of a PATCH is answered 503 by a gateway, the API behind it still at work: it was
    recorded `failed` at once and the lock released, so the disable that landed later had no record.
    It is in doubt now, as after any earlier 503, and recorded as made once it lands."""
    rules_file(org.rules())
    idle = org.hashes["dev-idle"]
    ready["KEYHYGIENE_HTTP_RETRY_SECONDS"] = "0.5"
    org.fake.faults.server_error(1000, 503, retry_after=0.05, method="PATCH", path=f"/keys/{idle}")

    first = cli("run")

    assert first.exit_code == 1, first.stderr
    first_patches = org.fake.change_counts()[("PATCH", idle)]
    assert first_patches > 1  # a 503 refuses: it was sent again
    assert [event["fresh_state"] for event in first.events_named("key_action_in_doubt")] == ["unchanged"]
    assert first.events_named("enforcement_lock_kept")
    (row,) = [a for a in _actions(ready) if a.key_hash == idle]
    assert row.outcome == "pending"
    org.fake.faults.clear()
    org.fake.update_key(idle, {"disabled": True})  # one of them, at work behind the gateway, lands
    _expire_the_lock(ready)

    settled = cli("run")

    assert settled.exit_code == 0, settled.stderr
    assert [(a.run_id, a.outcome) for a in _actions(ready) if a.key_hash == idle] == [(row.run_id, "done")]
    assert org.fake.change_counts()[("PATCH", idle)] == first_patches  # not sent again


def test_a_job_skipped_by_a_live_holder_is_not_told_of_an_old_change_in_doubt(
    org: Org, ready: dict[str, str], cli: Callable[..., CliResult], rules_file: Callable[[str], Path]
) -> None:
    # A change left in doubt long ago that no run could settle since, and another job holding
    # the lock now: the skip names that job, and says nothing of a lock kept for the old change.
    _run_losing_the_answer(org, ready, cli, rules_file, key="dev-idle", method="PATCH", status=502)
    _expire_the_lock(ready)
    skipped = _run_while_another_job_holds_the_lock(ready, cli)

    assert skipped.exit_code == 1
    assert "another enforcement holds the enforcement lock: enforce on" in skipped.stderr
    assert "left a change in doubt" not in skipped.stderr


def test_a_skipped_job_ends_with_its_run_finished_event_as_every_recorded_run(
    org: Org, ready: dict[str, str], cli: Callable[..., CliResult], rules_file: Callable[[str], Path]
) -> None:
    """It logged job_skipped alone: an alert on run_finished events that are not ok never saw it."""
    rules_file(org.rules())
    skipped = _run_while_another_job_holds_the_lock(ready, cli)

    assert skipped.exit_code == 1
    [finished] = skipped.events_named("run_finished")
    assert (finished["status"], finished["exit_code"], finished["run_id"]) == ("skipped", 1, _runs(ready)[-1].id)
    assert [event["event"] for event in skipped.events if event["event"] in ("job_skipped", "run_finished")] == [
        "job_skipped",
        "run_finished",
    ]


def _run_while_another_job_holds_the_lock(env: dict[str, str], cli: Callable[..., CliResult]) -> CliResult:
    """`keyhygiene run` while another enforcement holds the lock (the run is skipped)."""
    database = Database.open(Settings(KEYHYGIENE_DATABASE_URL=env["KEYHYGIENE_DATABASE_URL"]))  # type: ignore[call-arg]
    live = EnforcementLease(database, job="enforce")
    try:
        assert live.acquire()
        return cli("run")
    finally:
        live.release()
        database.close()


def _expire_the_lock(env: dict[str, str]) -> None:
    """As if the time the enforcement lock is kept for a change in doubt had passed."""
    database = Database.open(Settings(KEYHYGIENE_DATABASE_URL=env["KEYHYGIENE_DATABASE_URL"]))  # type: ignore[call-arg]
    try:
        let_the_enforcement_hold_pass(database)
    finally:
        database.close()


def _disable_an_idle_key(
    fake: FakeOpenRouter, database: Database, client: KeysClient
) -> tuple[str, int, str, list[dict[str, Any]]]:
    """One change made as enforcement makes it (intent, fresh check, change, outcome) with ``client``,
    then closed: the key's hash, the run's id, the outcome and the log events. The fake's calls are
    those of the change alone."""
    now = utcnow()
    idle = str(fake.add_key("dev-idle", created_at=now - 90 * DAY, last_used_at=now - 60 * DAY)["hash"])
    with session_scope(database) as session:
        run_id = runs.start_run(session, kind="enforce", now=now, dry_run=False).id
    decision = Decision(idle, "dev-idle", None, "disable", "disable-idle", ("disable-idle",), {})
    fake.clear_calls()
    try:
        with capture_logs() as logs:
            outcome = change_key(database, client, decision, run_id=run_id, recheck=lambda d, _: d, clock=lambda: now)
    finally:
        client.close()
    return idle, run_id, outcome, logs


def test_a_change_refused_with_a_long_retry_after_is_failed_without_a_fresh_read(
    fake: FakeOpenRouter, fake_url: str, database: Database
) -> None:
    """A 429 is a refusal: the change was not made. Its Retry-After is past the retry time, so the
    client neither tries again nor reads the key before then: the change is failed at once (a
    later run decides again), not left in doubt."""
    fake.faults.rate_limit(1, retry_after=120, method="PATCH")

    _, run_id, outcome, logs = _disable_an_idle_key(
        fake, database, KeysClient(fake_url, MANAGEMENT_KEY, retry_seconds=0.5)
    )

    assert outcome == "failed"
    # The fresh check before the change, then the change alone: no read after it.
    assert [(call.method, call.status) for call in fake.calls] == [("GET", 200), ("PATCH", 429)]
    assert [(entry["event"], entry["outcome"]) for entry in logs if entry["event"].startswith("key_action")] == [
        ("key_action", "failed")
    ]
    with database.sessions() as session:
        (row,) = session.scalars(select(Action).where(Action.run_id == run_id))
    assert row.outcome == "failed" and "rate limited" in (row.error or "")


def _protecting(planned: Decision, fresh: KeyFacts) -> Decision | str:
    """A recheck as a rules file with ``protect_names = ["prod-*"]`` makes it."""
    return "protected by name" if fresh.name.startswith("prod-") else planned


def test_a_delete_sent_again_after_a_429_is_withdrawn_when_the_key_changed_during_the_wait(
    fake: FakeOpenRouter, fake_url: str, database: Database
) -> None:
    """The DELETE is refused with 429 and a Retry-After. While the client waits, the key's owner
    enables it and renames it into a protected name: the key is looked at again before the DELETE
    is sent again, and the delete is withdrawn, not made on a decision a minute old."""
    now = utcnow()
    doomed = str(fake.add_key("old-billing", created_at=now - 90 * DAY, disabled=True)["hash"])
    fake.faults.rate_limit(1, retry_after=0.05, method="DELETE")

    def owner_acts_during_the_wait(seconds: float) -> None:
        fake.update_key(doomed, {"name": "prod-billing", "disabled": False})

    client = KeysClient(fake_url, MANAGEMENT_KEY, sleep=owner_acts_during_the_wait)
    with session_scope(database) as session:
        run_id = runs.start_run(session, kind="enforce", now=now, dry_run=False).id
    decision = Decision(doomed, "old-billing", None, "delete", "delete-after-grace", ("delete-after-grace",), {})
    try:
        outcome = change_key(database, client, decision, run_id=run_id, recheck=_protecting, clock=lambda: now)
    finally:
        client.close()

    assert outcome == "skipped"
    assert fake.get(doomed) is not None
    assert [(call.method, call.status) for call in fake.calls if call.path.endswith(doomed)] == [
        ("GET", 200),
        ("DELETE", 429),
        ("GET", 200),
    ]
    with database.sessions() as session:
        (row,) = session.scalars(select(Action).where(Action.run_id == run_id))
    assert (row.action, row.outcome) == ("delete", "skipped")
    assert row.reason == "protected by name (checked again before sending the change again)"


def test_a_disable_answered_503_found_made_when_checked_again_is_never_given_back(
    fake: FakeOpenRouter, fake_url: str, database: Database, tmp_path: Path
) -> None:
    """The PATCH is answered 503 without the API acting; during the wait someone disables the key
    by hand. Checked again, the key shows disabled: recorded as made (nothing tells the two apart),
    but with no updated_at, so that undo and enable never enable a key a person turned off."""
    now = utcnow()
    fake.faults.server_error(1, 503, retry_after=0.05, method="PATCH")

    def disabled_by_hand_during_the_wait(seconds: float) -> None:
        fake.advance(timedelta(seconds=30))
        (key,) = (key for key in fake.keys if key["name"] == "dev-idle")
        fake.update_key(key["hash"], {"disabled": True})

    client = KeysClient(fake_url, MANAGEMENT_KEY, sleep=disabled_by_hand_during_the_wait)
    idle, run_id, outcome, _ = _disable_an_idle_key(fake, database, client)

    assert outcome == "done"
    assert [call.status for call in fake.calls if call.method == "PATCH"] == [503]  # never sent again
    with database.sessions() as session:
        (row,) = audit.changes_of_run(session, run_id)
        assert (row.outcome, row.key_updated_at) == ("done", None)
        assert "cannot be told apart" in (row.reason or "")
        with session_scope(database) as writing:
            runs.finish_run(writing, run_id, status=runs.OK, now=now, exit_code=0, message="ok")

    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        OPENROUTER_MANAGEMENT_KEY=MANAGEMENT_KEY,
        OPENROUTER_BASE_URL=fake_url,
        KEYHYGIENE_DATABASE_URL=database.engine.url.render_as_string(hide_password=False),
        KEYHYGIENE_RULES_FILE=str(tmp_path / "keyhygiene.toml"),
    )
    (tmp_path / "keyhygiene.toml").write_text("[safety]\ndry_run = false\n")
    undone = execute("undo", settings, database=database, undo_run_id=run_id)
    assert "0 of 1 key(s) enabled" in undone.message
    assert fake.get(idle)["disabled"] is True  # type: ignore[index]


def test_a_disable_answered_503_whose_key_is_deleted_during_the_wait_is_skipped_not_in_doubt(
    fake: FakeOpenRouter, fake_url: str, database: Database
) -> None:
    """No PATCH deletes a key: found gone when checked again, the disable surely was not made. It
    was left in doubt, which kept the enforcement lock from the next job for minutes."""
    fake.faults.server_error(1, 503, retry_after=0.05, method="PATCH")

    def deleted_during_the_wait(seconds: float) -> None:
        for key in fake.keys:
            if key["name"] == "dev-idle":
                fake.delete_key(key["hash"])

    client = KeysClient(fake_url, MANAGEMENT_KEY, sleep=deleted_during_the_wait)
    _, run_id, outcome, logs = _disable_an_idle_key(fake, database, client)

    assert outcome == "skipped"
    with database.sessions() as session:
        (row,) = session.scalars(select(Action).where(Action.run_id == run_id))
        assert not audit.left_in_doubt(session, run_id)
    assert (row.outcome, row.reason) == (
        "skipped",
        "already gone (404 when checked again before sending the change again)",
    )
    assert [entry["event"] for entry in logs if entry["event"].startswith("key_action")] == ["key_action"]


def test_a_change_answered_503_then_refused_when_sent_again_is_in_doubt_and_settled_as_made(
    fake: FakeOpenRouter, fake_url: str, database: Database
) -> None:
    """A gateway answers the PATCH 503 after the API disabled the key; during the wait the
    management key is revoked. The change may have been made (it was): it stays in doubt, not
    failed, and the next run, with a working key, records it as made."""
    now = utcnow()
    fake.faults.server_error(1, 503, retry_after=0.05, method="PATCH", after_processing=True)

    def revoked_during_the_wait(seconds: float) -> None:
        fake.revoke(MANAGEMENT_KEY)

    with pytest.raises(AuthenticationFailed):
        _disable_an_idle_key(fake, database, KeysClient(fake_url, MANAGEMENT_KEY, sleep=revoked_during_the_wait))

    fake.restore(MANAGEMENT_KEY)
    with database.sessions() as session:
        (run_id,) = session.scalars(select(Run.id))
        (row,) = audit.changes_of_run(session, run_id)
    assert (row.action, row.outcome) == ("disable", "pending")
    reader = KeysClient(fake_url, MANAGEMENT_KEY)
    try:
        assert settle_in_doubt(database, reader, now=now + HOUR) == 1
    finally:
        reader.close()
    with database.sessions() as session:
        (row,) = audit.changes_of_run(session, run_id)
    assert row.outcome == "done"


class _FieldIgnored(KeysClient):
    """The real client against the fake, except that a change's ``disabled`` goes out under a name
    the API does not know, beside the key's own name: as the API does with unknown fields, the fake
    ignores it and answers 200 with the key as it was."""

    def update_key(self, key_hash: str, **fields: Any) -> Key:
        name = self.get_key(key_hash).name
        return super().update_key(key_hash, disable=fields.pop("disabled"), name=name, **fields)


def test_a_change_answered_with_the_key_as_it_was_is_failed_not_done(
    fake: FakeOpenRouter, fake_url: str, database: Database
) -> None:
    idle, run_id, outcome, logs = _disable_an_idle_key(fake, database, _FieldIgnored(fake_url, MANAGEMENT_KEY))

    assert outcome == "failed"
    assert fake.get(idle)["disabled"] is False  # type: ignore[index]
    with database.sessions() as session:
        assert audit.changes_of_run(session, run_id) == []  # nothing for undo to give back: never made
    [event] = [entry for entry in logs if entry["event"] == "key_action"]
    assert (event["outcome"], event["reason"]) == (
        "failed",
        "the API answered the disable with the key still enabled; a later run decides again",
    )


class _ReadsFailAfterAChange(KeysClient):
    """The real client against the fake, except that once a change has been sent every GET fails
    as an API in trouble answers (503): the fake's faults are queued per method and path, so they
    cannot fail only the GETs that come after a given PATCH."""

    changed = False

    def update_key(self, key_hash: str, **fields: Any) -> Key:
        self.changed = True
        return super().update_key(key_hash, **fields)

    def get_key(self, key_hash: str) -> Key:
        if self.changed:
            raise ServerError(f"GET /keys/{key_hash}: the API failed (503)", status=503)
        return super().get_key(key_hash)


def _a_disable_made_but_unread(
    fake: FakeOpenRouter, fake_url: str, database: Database, now: datetime, allow_actions: int | None = None
) -> tuple[str, int, str]:
    """An idle key disabled by a run (started with ``allow_actions``) whose PATCH is made but whose
    answer is lost, and whose key cannot be read after it: (the key's hash, the run's id, the
    change's outcome)."""
    idle = str(fake.add_key("dev-idle", created_at=now - 90 * DAY, last_used_at=now - 60 * DAY)["hash"])
    with session_scope(database) as session:
        run_id = runs.start_run(session, kind="enforce", now=now, dry_run=False, allow_actions=allow_actions).id
    fake.faults.drop_connection(1, after_processing=True, method="PATCH")
    decision = Decision(idle, "dev-idle", None, "disable", "disable-idle", ("disable-idle",), {})
    client = _ReadsFailAfterAChange(fake_url, MANAGEMENT_KEY, retry_seconds=0.5)
    try:
        outcome = change_key(database, client, decision, run_id=run_id, recheck=lambda d, _: d, clock=lambda: now)
    finally:
        client.close()
    return idle, run_id, outcome


def test_a_change_whose_answer_and_fresh_state_are_both_lost_stays_in_doubt(
    fake: FakeOpenRouter, fake_url: str, database: Database
) -> None:
    """The PATCH is made but its answer is lost, and the key cannot be read after it: the change is
    neither done nor failed. Its intent stays pending, and the next run settles it from the key's
    fresh state as made, with no updated_at: the key's state may be someone else's disable since,
    so undo and the reenable rules leave the key alone."""
    now = utcnow()
    with capture_logs() as logs:
        idle, run_id, outcome = _a_disable_made_but_unread(fake, fake_url, database, now)

    assert outcome == "failed"  # this run could not make sure of it
    assert fake.get(idle)["disabled"] is True  # type: ignore[index]
    assert [entry["event"] for entry in logs if entry["event"].startswith("key_action")] == ["key_action_in_doubt"]
    with database.sessions() as session:
        assert [(a.action, a.outcome) for a in audit.changes_of_run(session, run_id)] == [("disable", "pending")]

    reader = KeysClient(fake_url, MANAGEMENT_KEY)
    try:
        with capture_logs() as logs:
            assert settle_in_doubt(database, reader, now=now + HOUR) == 1
    finally:
        reader.close()
    with database.sessions() as session:
        (row,) = audit.changes_of_run(session, run_id)
    assert (row.outcome, row.key_updated_at) == ("done", None)
    assert [(entry["event"], entry["outcome"]) for entry in logs if entry["event"] == "key_action"] == [
        ("key_action", "done")
    ]


def test_a_settled_change_carries_the_allow_actions_of_the_run_that_made_it(
    fake: FakeOpenRouter, fake_url: str, database: Database
) -> None:
    """Made by a run started with --allow-actions 30 and settled by a later run: its key_action
    event says allow_actions 30 (it carried none, or the settling run's)."""
    now = utcnow()
    _, run_id, outcome = _a_disable_made_but_unread(fake, fake_url, database, now, allow_actions=30)
    assert outcome == "failed"
    reader = KeysClient(fake_url, MANAGEMENT_KEY)
    try:
        with capture_logs() as logs:
            assert settle_in_doubt(database, reader, now=now + HOUR) == 1
    finally:
        reader.close()
    [event] = [entry for entry in logs if entry["event"] == "key_action"]
    assert (event["run_id"], event["outcome"], event["allow_actions"]) == (run_id, "done", 30)


def test_a_change_settled_after_someone_else_edited_the_key_is_not_given_back(
    fake: FakeOpenRouter, fake_url: str, database: Database
) -> None:
    """The disable's answer was lost; before the next run an operator renamed the key and left it
    disabled. Settled as made, the record must not take the operator's updated_at for ours: undo
    and the re-enable rules would then call the key unchanged since our disable and enable it."""
    now = utcnow()
    idle, run_id, outcome = _a_disable_made_but_unread(fake, fake_url, database, now)
    assert outcome == "failed"
    fake.advance(HOUR)
    fake.update_key(idle, {"name": "dev-idle-kept-off"})  # the operator's edit: a later updated_at

    reader = KeysClient(fake_url, MANAGEMENT_KEY)
    try:
        assert settle_in_doubt(database, reader, now=now + 2 * HOUR) == 1
    finally:
        reader.close()

    with database.sessions() as session:
        (row,) = audit.changes_of_run(session, run_id)
    assert (row.outcome, row.key_updated_at) == ("done", None)


def test_idleness_proved_by_history_alone_and_rechecked_on_fresh_usage(
    fake: FakeOpenRouter, ready: dict[str, str], rules_file: Callable[[str], Path]
) -> None:
    from keyhygiene.context import open_client
    from keyhygiene.jobs import execute

    # An API that does not report last_used_at: only the snapshots can show idleness.
    fake.omit_fields = {"last_used_at"}
    now = utcnow()
    quiet = str(fake.add_key("svc-quiet", created_at=now - 100 * DAY, usage=3.0)["hash"])
    woken = str(fake.add_key("svc-woken", created_at=now - 100 * DAY, usage=3.0)["hash"])
    for n in range(8):
        fake.add_key(f"svc-other-{n}", created_at=now - 100 * DAY, usage=1.0)
    rules_file(
        "[safety]\ndry_run = false\nmax_action_percent = 50\n\n"
        '[[rule]]\nname = "idle"\nmatch = "unused"\nidle_for = "30d"\naction = "disable"\n'
        'names = ["svc-quiet", "svc-woken"]\n'
    )
    config = Settings()  # type: ignore[call-arg]
    database = Database.open(config)
    client = open_client(config)
    try:
        # First seen 40 days ago, unchanged since: the history proves 40 days of idleness.
        assert execute("sync", config, clock=lambda: now - 40 * DAY, database=database, client=client).exit_code == 0
        assert execute("sync", config, clock=lambda: now, database=database, client=client).exit_code == 0
        fake.record_use(woken, 0.25)  # used after the snapshot, before enforcement
        fake.clear_calls()

        outcome = execute("enforce", config, clock=lambda: now, database=database, client=client)
    finally:
        client.close()
        database.close()

    assert outcome.exit_code == 0, outcome.message
    assert [(call.method, call.path) for call in fake.mutating_calls()] == [("PATCH", f"/keys/{quiet}")]
    skipped = [a for a in _actions(ready) if a.key_hash == woken]
    assert [(a.outcome, "no longer matches" in (a.reason or "")) for a in skipped] == [("skipped", True)]


def test_a_key_that_spent_in_its_current_window_is_not_disabled_as_idle(
    fake: FakeOpenRouter, ready: dict[str, str], cli: Callable[..., CliResult], rules_file: Callable[[str], Path]
) -> None:
    """Keys created in 2025 with a null last_used_at read idle since 2026-01-01; one whose spend
    today the API also shows was used today and is left alone: in the snapshot's plan, and on the
    fresh check before each change."""
    now = utcnow()
    old = {"created_at": datetime(2025, 6, 1, tzinfo=UTC), "last_used_at": None, "usage": 50.0}
    quiet = str(fake.add_key("svc-quiet", **old)["hash"])
    spending = str(fake.add_key("svc-spending", **old, usage_daily=2.0, usage_weekly=2.0, usage_monthly=2.0)["hash"])
    woken = str(fake.add_key("svc-woken", **old)["hash"])
    for n in range(8):
        fake.add_key(f"svc-other-{n}", created_at=now - 100 * DAY, last_used_at=now - DAY, usage=1.0)
    rules_file(
        "[safety]\ndry_run = false\nmax_action_percent = 50\n\n"
        '[[rule]]\nname = "idle"\nmatch = "unused"\nidle_for = "30d"\naction = "disable"\n'
    )
    assert cli("sync").exit_code == 0
    plan = cli("plan", "--format", "json")
    assert plan.exit_code == 0, plan.stderr
    assert {row["key_name"] for row in json.loads(plan.stdout)} == {"svc-quiet", "svc-woken"}
    # Both planned keys spend today before enforcement (nothing else of them changes).
    fake.extra_fields = {"usage_daily": 1.0}
    fake.clear_calls()

    result = cli("enforce")

    assert result.exit_code == 0, result.stderr
    assert fake.mutating_calls() == []
    actions = _actions(ready)
    assert {(a.key_hash, a.outcome) for a in actions} == {(quiet, "skipped"), (woken, "skipped")}
    assert all("no longer matches" in (a.reason or "") for a in actions)
    assert spending not in {a.key_hash for a in actions}


def test_plan_table_says_why_in_a_few_words(
    org: Org, ready: dict[str, str], cli: Callable[..., CliResult], rules_file: Callable[[str], Path]
) -> None:
    rules_file(org.rules())
    assert cli("sync").exit_code == 0

    result = cli("plan")

    assert result.exit_code == 0, result.stderr
    lines = {line.split()[1]: line for line in result.stdout.splitlines() if line[:1].isalnum() and " " in line}
    assert "idle 45 days" in lines["dev-idle"]
    assert "$150.00 monthly" in lines["svc-overspend"]
    assert "limit spent" in lines["svc-exhausted"]
    assert "disabled 10 days" in lines["dev-expired-old"]
    assert "5 change(s) planned, 1 report(s)" in result.stdout
    assert all(len(line) <= 80 for line in result.stdout.splitlines())


def test_keys_keyhygiene_deleted_itself_do_not_count_as_a_suspicious_shrink(
    fake: FakeOpenRouter, ready: dict[str, str], cli: Callable[..., CliResult], rules_file: Callable[[str], Path]
) -> None:
    now = utcnow()
    hashes = [
        str(fake.add_key(f"svc-{n}", created_at=now - 100 * DAY, last_used_at=now - DAY)["hash"]) for n in range(8)
    ]
    for n in range(2):
        fake.add_key(f"old-{n}", created_at=now - 100 * DAY, expires_at=now - DAY, disabled=True)
    rules_file(
        "[safety]\ndry_run = false\nmax_action_percent = 20\n\n"
        '[[rule]]\nname = "expired"\nmatch = "expired"\naction = "delete"\ngrace = "0d"\n'
    )
    assert cli("run").exit_code == 0  # deletes 2 of 10 keys (20%, allowed)
    fake.delete_key(hashes[0])  # and someone else deletes one more: 3 of 10 gone, 1 of them not ours

    result = cli("run")

    assert result.exit_code == 0, result.stderr

    fake.delete_key(hashes[1])
    fake.delete_key(hashes[2])  # 2 of 7 vanish and none by us: 28.6% is suspicious
    result = cli("run")

    assert result.exit_code == 3
    assert "shrank from 7 to 5 keys" in result.stderr


def test_a_key_changed_by_someone_after_our_disable_is_never_enabled_again(
    org: Org, ready: dict[str, str], cli: Callable[..., CliResult], rules_file: Callable[[str], Path]
) -> None:
    rules_file(org.rules())
    assert cli("run").exit_code == 0
    # Someone enables svc-exhausted and disables it again: it is their disable now, not ours.
    org.fake.update_key(org.hashes["svc-exhausted"], {"disabled": False})
    org.fake.update_key(org.hashes["svc-exhausted"], {"disabled": True})
    org.fake.set_clock(utcnow() + timedelta(days=35))  # and the budget window resets
    org.fake.clear_calls()

    result = cli("run")

    assert result.exit_code == 0, result.stderr
    assert org.changes() == []
    assert not [a for a in _actions(ready) if a.action == "enable"]
