"""Reports against hand-computed figures on a constructed history, on SQLite and PostgreSQL.

The history (``tests.test_reports_support.build_history``) is made by real syncs of the fake API;
every expected figure below is worked out from its table by hand, not by running the code.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from db import metrics as db_metrics
from db import snapshots
from keyhygiene.context import Database
from keyhygiene.fakeapi import FakeOpenRouter
from keyhygiene.reports import ReportError, ReportParams, builders
from keyhygiene.reports.render import print_table, to_csv, to_json
from keyhygiene.reports.spend import compute_spend, daily_spend
from keyhygiene.rules import parse_rules
from keyhygiene.timeutil import isoformat
from tests.test_reports_support import D0, DAY, HOUR, NOW, RULES, Org, build_history, day, key_hash

pytestmark = pytest.mark.postgres


@pytest.fixture
def bare_org(database: Database, fake: FakeOpenRouter, fake_url: str, tmp_path: Path) -> Iterator[Org]:
    """An organisation with no history yet."""
    rules = tmp_path / "keyhygiene.toml"
    rules.write_text(RULES)
    org = Org(database, fake, fake_url, rules_file=rules)
    try:
        yield org
    finally:
        org.close()


@pytest.fixture
def org(bare_org: Org) -> Org:
    """The organisation with the history of ``build_history``."""
    build_history(bare_org)
    return bare_org


def report(org: Org, kind: str, **options: Any) -> list[dict[str, Any]]:
    """The report as its JSON rows (exactly what ``--format json`` prints)."""
    options.setdefault("now", NOW)
    with org.database.sessions() as session:
        result = builders()[kind](session, ReportParams(**options))
    rows = json.loads(to_json(result))
    assert isinstance(rows, list)
    return rows


def by_name(rows: list[dict[str, Any]], field: str = "name") -> dict[str, dict[str, Any]]:
    return {row[field]: row for row in rows}


# -- spend ------------------------------------------------------------------------------------------


def test_spend_per_key_across_creation_deletion_gaps_and_resets(org: Org) -> None:
    rows = report(org, "spend", since=7 * DAY)  # (day 3 12:30, day 10 12:30]: baseline is the day-3 snapshot
    spend = {name: (row["usage"], row["byok_usage"], row["total"]) for name, row in by_name(rows).items()}
    assert spend == {
        "alpha": (7.0, 0.0, 7.0),  # days 4..10, the gap's three days landing on day 6
        "bravo": (0.5, 2.0, 2.5),  # BYOK reported apart and in the total
        "charlie": (5.0, 0.0, 5.0),  # created inside the period: counted from zero
        "delta": (2.0, 0.0, 2.0),  # deleted: counted up to its last observation (the 3.0 is never seen)
        "echo": (1.0, 0.0, 1.0),  # 50 -> 5 is a reset: zero for that step, never negative
        "foxtrot": (2.0, 0.0, 2.0),  # first seen inside the period, created before: from first sight
        "hotel": (1.5, 0.0, 1.5),
    }
    rows_by_name = by_name(rows)
    assert [row["name"] for row in rows][:2] == ["alpha", "charlie"]  # biggest first
    assert rows_by_name["charlie"]["created_in_period"] is True
    assert rows_by_name["charlie"]["counted_from"] == "2026-03-06T01:00:00Z"
    assert rows_by_name["delta"]["deleted_in_period"] is True
    assert rows_by_name["foxtrot"]["baseline_known"] is False
    assert rows_by_name["foxtrot"]["counted_from"] == "2026-03-07T12:00:00Z"
    assert rows_by_name["alpha"]["counted_from"] == "2026-03-04T12:00:00Z"
    assert all(row["baseline_known"] for row in rows if row["name"] != "foxtrot")
    assert rows_by_name["alpha"]["key_hash"] == key_hash("alpha")


def test_spend_by_day_lands_each_step_on_the_day_of_the_later_snapshot(org: Org) -> None:
    rows = report(org, "spend", since=7 * DAY, by="day")
    assert [(row["day"], row["total"]) for row in rows] == [
        ("2026-03-07", 7.0),  # alpha 3.0 over the gap + charlie 4.0
        ("2026-03-08", 4.0),  # alpha, delta 2.0, echo 1.0
        ("2026-03-09", 3.5),  # alpha, bravo 0.5 + 2.0 BYOK
        ("2026-03-10", 5.5),  # alpha, charlie, foxtrot 2.0, hotel 1.5
        ("2026-03-11", 1.0),  # alpha
    ]
    assert by_name(rows, "day")["2026-03-09"]["byok_usage"] == 2.0
    assert by_name(rows, "day")["2026-03-10"]["keys"] == 4
    assert sum(row["total"] for row in rows) == pytest.approx(21.0)


def test_spend_by_workspace_and_filters(org: Org) -> None:
    rows = report(org, "spend", since=7 * DAY, by="workspace")
    assert [(row["workspace_id"], row["keys"], row["total"]) for row in rows] == [
        (org.fake.default_workspace_id, 6, 19.5),
        ("ws-research", 1, 1.5),
    ]
    only_research = report(org, "spend", since=7 * DAY, workspaces=("ws-research",))
    assert [row["name"] for row in only_research] == ["hotel"]
    named = report(org, "spend", since=7 * DAY, name="[a-c]*")
    assert sorted(row["name"] for row in named) == ["alpha", "bravo", "charlie"]


def test_spend_as_of_a_past_time(org: Org) -> None:
    # (day 0 18:00, day 7 18:00]: baseline is day 0; steps at days 1, 2, 3, 6, 7.
    rows = report(org, "spend", since=7 * DAY, at=day(7, 18))
    spend = {name: row["total"] for name, row in by_name(rows).items()}
    assert spend == {"alpha": 7.0, "charlie": 4.0, "delta": 2.0, "echo": 1.0}


def test_spend_before_history_began_counts_from_first_sight(org: Org) -> None:
    rows = report(org, "spend", since=30 * DAY)
    spend = by_name(rows)
    # No snapshot before the period: keys created before it count from their first observation.
    assert spend["alpha"]["total"] == 10.0  # days 1..10
    assert spend["alpha"]["baseline_known"] is False
    assert spend["hotel"]["baseline_known"] is False
    assert "golf" not in spend


# -- inventory --------------------------------------------------------------------------------------


def test_inventory_at_a_past_time(org: Org) -> None:
    at_day_7 = by_name(report(org, "inventory", at=day(7, 15)))
    assert len(at_day_7) == 14
    assert at_day_7["alpha"]["usage"] == 18.0  # 10 + days 0..7
    assert at_day_7["delta"]["usage"] == 22.0
    assert at_day_7["echo"]["usage"] == 6.0
    assert at_day_7["oscar"]["expired"] is True
    at_day_6 = by_name(report(org, "inventory", at=day(6, 15)))
    assert at_day_6["oscar"]["expired"] is False
    at_day_8 = by_name(report(org, "inventory", at=day(8, 15)))
    assert "delta" not in at_day_8 and len(at_day_8) == 13
    at_day_3 = by_name(report(org, "inventory", at=day(3, 15)))
    assert set(at_day_3) == set(at_day_7) - {"charlie", "foxtrot"}
    assert at_day_3["echo"]["usage"] == 50.0
    newest = by_name(report(org, "inventory"))
    assert newest["alpha"]["usage"] == 21.0
    assert newest["november"]["disabled"] is True


# -- idle -------------------------------------------------------------------------------------------


def test_idle_days_and_when_rules_act(org: Org) -> None:
    ruleset = parse_rules(RULES)
    rows = report(org, "idle", ruleset=ruleset)
    assert [(row["name"], row["idle_days"]) for row in rows] == [
        ("prod-mike", 70),  # last used D0-60d
        ("india", 69),  # never used: null last_used_at means no use since 2026-01-01
        ("golf", 55),
        ("november", 45),
        ("lima", 30),
        ("kilo", 20),
        ("oscar", 11),
    ]
    idle = by_name(rows)
    now = "2026-03-11T12:30:00Z"
    assert (idle["india"]["next_rule"], idle["india"]["next_action"], idle["india"]["acts_on"]) == (
        "disable-idle",
        "disable",
        now,  # already due: at the next run
    )
    assert (idle["kilo"]["next_action"], idle["kilo"]["acts_on"]) == ("disable", "2026-03-21T12:00:00Z")
    assert (idle["lima"]["next_rule"], idle["lima"]["next_action"]) == ("delete-expired", "disable")
    assert idle["prod-mike"]["protected"] is True and idle["prod-mike"]["next_action"] is None
    assert idle["november"]["next_action"] is None  # already disabled, not expired
    assert idle["golf"]["idle_since"] == "2026-01-15T12:00:00Z"


def test_idle_threshold_and_no_rules_file(org: Org) -> None:
    rows = report(org, "idle", since=2 * DAY)
    idle = by_name(rows)
    assert idle["echo"]["idle_days"] == 3  # usage last changed at the day-7 snapshot
    assert idle["bravo"]["idle_days"] == 2
    assert "alpha" not in idle
    assert idle["india"]["next_action"] is None


def test_a_spent_key_created_in_2026_with_no_last_use_is_idle_only_by_the_history(
    database: Database, fake: FakeOpenRouter, fake_url: str
) -> None:
    """Its null last_used_at is contradicted by its spend: neither the idle report nor the trends
    count it idle from 2026-01-01; both count it idle once the snapshots saw its usage hold 30 days."""
    org = Org(database, fake, fake_url)
    try:
        org.add("spent-unrecorded", at=day(0), created_at=day(0) - 40 * DAY, usage=25.0, last_used_at=None)
        org.add("never-used", at=day(0), created_at=day(0) - 40 * DAY, usage=0.0, last_used_at=None)
        for n in (0, 10, 20, 31):
            org.sync(day(n))
        early, late = day(10, 12), day(31, 12)
        assert [row["name"] for row in report(org, "idle", at=early, now=early, since=30 * DAY)] == ["never-used"]
        trends = report(org, "trends", at=early, now=early, since=2 * DAY)
        assert trends[-1]["idle_30d"] == 1
        idle_late = {row["name"]: row for row in report(org, "idle", at=late, now=late, since=30 * DAY)}
        assert set(idle_late) == {"never-used", "spent-unrecorded"}
        assert idle_late["spent-unrecorded"]["idle_since"] == isoformat(day(0))
        assert report(org, "trends", at=late, now=late, since=2 * DAY)[-1]["idle_30d"] == 2
    finally:
        org.close()


def test_a_key_that_spent_in_the_snapshots_month_is_not_idle_30_days(
    database: Database, fake: FakeOpenRouter, fake_url: str
) -> None:
    """Created in 2025 with a null last_used_at, both keys read idle since 2026-01-01; one spent in
    March as the day-0 snapshot (2026-03-01) saw it: neither the idle report nor the trends count it
    idle for 30 days while its month lasts, and both count it once the month is over."""
    org = Org(database, fake, fake_url)
    try:
        old = {"created_at": D0 - 400 * DAY, "usage": 50.0, "last_used_at": None}
        org.add("spent-in-march", at=day(0, 1), **old, usage_daily=2.0, usage_weekly=2.0, usage_monthly=2.0)
        org.add("quiet", at=day(0, 1), **old)
        for n in (0, 10, 31):
            org.sync(day(n))
        march, april = day(10, 12.5), day(31, 12.5)
        [row] = report(org, "idle", at=march, now=march, since=30 * DAY)
        assert row["name"] == "quiet"
        assert report(org, "trends", at=march, now=march, since=2 * DAY)[-1]["idle_30d"] == 1
        idle_march = {row["name"]: row for row in report(org, "idle", at=march, now=march, since=7 * DAY)}
        assert idle_march["spent-in-march"]["idle_since"] == isoformat(day(0, 0))
        assert {row["name"] for row in report(org, "idle", at=april, now=april, since=30 * DAY)} == {
            "quiet",
            "spent-in-march",
        }
        assert report(org, "trends", at=april, now=april, since=2 * DAY)[-1]["idle_30d"] == 2
    finally:
        org.close()


def test_spend_a_snapshot_saw_still_counts_after_its_window_reset(
    database: Database, fake: FakeOpenRouter, fake_url: str
) -> None:
    """First seen on Saturday 2026-03-28 having spent that week (from Monday 03-23), with a null
    last_used_at: on 2026-04-01 its counters are zero (a new week and month), and both the idle report
    and the trends read it idle since 03-23, not since 2026-01-01."""
    org = Org(database, fake, fake_url)
    try:
        old = {"created_at": D0 - 400 * DAY, "usage": 50.0, "last_used_at": None}
        org.add("spent-before-first-sight", at=day(27, 1), **old, usage_weekly=2.0, usage_monthly=2.0)
        org.add("quiet", at=day(27, 1), **old)
        org.sync(day(27))
        org.sync(day(31))
        april = day(31, 12.5)
        idle = {row["name"]: row for row in report(org, "idle", at=april, now=april, since=7 * DAY)}
        assert idle["spent-before-first-sight"]["idle_since"] == "2026-03-23T00:00:00Z"
        assert idle["quiet"]["idle_since"] == "2026-01-01T00:00:00Z"
        assert [row["name"] for row in report(org, "idle", at=april, now=april, since=30 * DAY)] == ["quiet"]
        assert report(org, "trends", at=april, now=april, since=2 * DAY)[-1]["idle_30d"] == 1
    finally:
        org.close()


def test_a_key_is_idle_no_longer_than_it_has_existed(database: Database, fake: FakeOpenRouter, fake_url: str) -> None:
    """A key never used reads idle from when OpenRouter began recording use, but it cannot have
    been idle before it existed: as the rules read it, it is unused for D only once D old."""
    org = Org(database, fake, fake_url)
    try:
        created = day(40, 10)
        org.add("brand-new", at=created)
        org.sync(day(40))
        org.sync(day(41))
        at = day(41, 12.5)

        assert report(org, "idle", at=at, now=at) == []  # 7 days by default: it is a day old
        [row] = report(org, "idle", at=at, now=at, since=HOUR)
        assert (row["name"], row["idle_since"], row["idle_days"]) == ("brand-new", isoformat(created), 1)
        trends = report(org, "trends", at=at, now=at, since=2 * DAY)
        assert trends[-1]["idle_30d"] == len(report(org, "idle", at=at, now=at, since=30 * DAY)) == 0
    finally:
        org.close()


@pytest.mark.parametrize(
    ("workspace", "listed", "without_spend"), [("Research", ["mover"], 0), ("Default", ["spender"], 1)]
)
def test_the_keys_without_spend_are_counted_once_for_a_key_moved_in_the_period(
    database: Database, fake: FakeOpenRouter, fake_url: str, workspace: str, listed: list[str], without_spend: int
) -> None:
    """mover spent after it moved from Default to Research: it is listed under Research, and is
    not counted among Default's keys without spend (it was counted as -1 in Research and as 1 in
    Default); in Default, spender spent and stays spent nothing."""
    fake.add_workspace("Research", id="ws-research")
    org = Org(database, fake, fake_url)
    try:
        org.add("mover", at=day(40, 11), created_at=day(1), usage=1.0)
        org.add("stays", at=day(40, 11), created_at=day(1), usage=1.0)
        org.add("spender", at=day(40, 11), created_at=day(1), usage=1.0)
        org.sync(day(40))
        fake.set_clock(day(40, 17))
        fake.update_key(key_hash("mover"), {"workspace_id": "ws-research"})
        org.use("mover", 2.0, at=day(40, 18))
        org.use("spender", 2.0, at=day(40, 18))
        org.sync(day(41))
        at = day(41, 13)
        with org.database.sessions() as session:
            ids = {name: workspace_id for workspace_id, name in snapshots.workspace_names(session).items()}
            result = builders()["spend"](session, ReportParams(now=at, at=at, since=DAY, workspaces=(ids[workspace],)))
        names = sorted(row["name"] for row in result.rows)
        assert names == listed
        assert f"{without_spend} keys with no spend in the period are not listed." in result.notes[0]
    finally:
        org.close()


@pytest.mark.parametrize(("name", "without_spend"), [(None, 2), ("dev-*", 1)])
def test_the_keys_without_spend_count_keys_listed_again_and_keys_renamed_into_the_filter(
    database: Database, fake: FakeOpenRouter, fake_url: str, name: str | None, without_spend: int
) -> None:
    """back-1 and back-2 were gone at the period's start and listed again inside it, having spent:
    they were subtracted from the keys without spend though never counted in it (0, not 2: stays
    and ci-x). ci-x was renamed dev-x inside the period, spending nothing: under --name 'dev-*' it
    was not counted (0, not 1)."""
    org = Org(database, fake, fake_url)
    try:
        for key in ("stays", "ci-x", "back-1", "back-2"):
            org.add(key, at=day(40, 11), created_at=day(1), usage=1.0)
        org.sync(day(40))
        org.delete("back-1", at=day(40, 18))
        org.delete("back-2", at=day(40, 18))
        org.sync(day(41))  # the period's start
        for key in ("back-1", "back-2"):
            org.add(key, at=day(41, 18), created_at=day(1), usage=4.0)
        fake.set_clock(day(41, 19))
        fake.update_key(key_hash("ci-x"), {"name": "dev-x"})
        org.sync(day(42))
        at = day(42, 13)
        with org.database.sessions() as session:
            result = builders()["spend"](session, ReportParams(now=at, at=at, since=DAY + HOUR, name=name))
        assert sorted(row["name"] for row in result.rows) == ([] if name else ["back-1", "back-2"])
        assert f"{without_spend} keys with no spend in the period are not listed." in result.notes[0]
    finally:
        org.close()


# -- trends -----------------------------------------------------------------------------------------


def test_trends_per_day(org: Org) -> None:
    rows = report(org, "trends", since=10 * DAY)
    table = [
        (row["day"], row["keys"], row["disabled"], row["expired"], row["no_expiry"], row["no_limit"], row["idle_30d"])
        for row in rows
    ]
    assert table == [
        ("2026-03-02", 12, 1, 1, 10, 10, 5),
        ("2026-03-03", 12, 1, 1, 10, 10, 5),
        ("2026-03-04", 12, 1, 1, 10, 10, 5),
        ("2026-03-07", 14, 1, 1, 12, 12, 5),
        ("2026-03-08", 14, 1, 2, 12, 12, 5),  # oscar expired at day 7 00:00
        ("2026-03-09", 13, 1, 2, 11, 11, 5),  # delta deleted
        ("2026-03-10", 13, 1, 2, 11, 11, 4),  # hotel used
        ("2026-03-11", 13, 1, 2, 11, 11, 5),  # lima reaches 30 days
    ]
    assert [row["spend"] for row in rows] == [1.0, 1.0, 1.0, 7.0, 4.0, 3.5, 5.5, 1.0]


@pytest.mark.parametrize("since_days", [1, 2, 7, 30])
def test_spend_summed_in_the_database_matches_the_daily_figures(org: Org, since_days: int) -> None:
    """Per-key spend comes from SQL sums; the daily figures (charts, --by day) stream the days:
    each key's daily series adds up to its sum, and each day counts the keys that spent on it once,
    whether the day came whole, in steps (the period's first and last day) or with a first sight."""
    checked = 0
    for at in (None, day(6, 18.0), day(8, 12.75)):
        params = ReportParams(now=NOW, since=since_days * DAY, at=at)
        with org.database.sessions() as session:
            totals = compute_spend(session, params)
            daily = daily_spend(session, params, totals.keys, series_of=list(totals.keys))
        assert totals.keys
        for hashed, summed in totals.keys.items():
            assert round(summed.total, 6) == round(sum(daily.series[hashed].values()), 6), hashed
        for spent_on in {spent_on for series in daily.series.values() for spent_on in series} | set(daily.totals):
            of_day = [series.get(spent_on, 0.0) for series in daily.series.values()]
            assert daily.spenders.get(spent_on, 0) == sum(1 for amount in of_day if amount > 0), (at, spent_on)
            credit, byok = daily.totals.get(spent_on, (0.0, 0.0))
            assert round(credit + byok, 6) == round(sum(of_day), 6)
            checked += 1
    assert checked


def test_spend_by_day_counts_each_key_once_a_day_however_its_day_comes(bare_org: Org) -> None:
    """Day 1 is whole: "fresh" comes as its first sight (created inside the period, 2.0) and as that
    day's row (+1.0 later that day). Day 2 is cut by the period's end (a snapshot of it lies after):
    "steady" comes as its two steps of that day. Each is one key of its day."""
    org = bare_org
    org.add("steady", at=day(0, 1), created_at=D0 - 10 * DAY, usage=1.0, last_used_at=D0 - DAY)
    org.sync(day(0, 2))
    org.add("fresh", at=day(1, 9), usage=2.0, last_used_at=day(1, 9))
    org.use("steady", 1.0, at=day(1, 9))
    org.sync(day(1, 10))
    org.use("fresh", 1.0, at=day(1, 13))
    org.use("steady", 1.0, at=day(1, 13))
    org.sync(day(1, 14))
    org.use("steady", 1.0, at=day(2, 5))
    org.sync(day(2, 6))
    org.use("steady", 1.0, at=day(2, 9))
    org.sync(day(2, 10))
    org.use("steady", 5.0, at=day(2, 17))
    org.sync(day(2, 18))  # after the period's end

    rows = report(org, "spend", by="day", since=3 * DAY, at=day(2, 12), now=day(2, 20))

    assert [(row["day"], row["keys"], row["total"]) for row in rows] == [
        (day(0).date().isoformat(), 0, 0.0),
        (day(1).date().isoformat(), 2, 5.0),  # steady 1.0 + 1.0; fresh 2.0 at first sight + 1.0
        (day(2).date().isoformat(), 1, 2.0),  # steady's two steps before 12:00
    ]


def test_trends_and_the_idle_report_agree_on_who_is_idle_30_days(org: Org) -> None:
    """Both read since when a key's usage has held from one place, the store's usage versions."""
    with org.database.sessions() as session:
        taken = [s.taken_at for s in snapshots.complete_snapshots(session) if s.taken_at is not None]
    checked = 0
    for taken_at in taken[-6:]:
        trends = report(org, "trends", since=40 * DAY, at=taken_at)
        idle = report(org, "idle", since=30 * DAY, at=taken_at, now=taken_at)
        assert trends[-1]["idle_30d"] == len(idle), taken_at
        checked += len(idle)
    assert checked > 0


def test_trends_spend_matches_spend_by_day(org: Org) -> None:
    trends = by_name(report(org, "trends", since=7 * DAY), "day")
    spend = by_name(report(org, "spend", since=7 * DAY, by="day"), "day")
    assert {d: row["spend"] for d, row in trends.items()} == {d: row["total"] for d, row in spend.items()}


# -- actions ----------------------------------------------------------------------------------------


def test_actions_are_the_audit_log_with_rule_evidence_and_outcome(org: Org) -> None:
    outcome = org.run("enforce", day(10, 12.25))
    assert outcome.exit_code == 0, outcome.message
    rows = report(org, "actions", since=DAY)
    planned = {(row["key_name"], row["rule"], row["action"], row["outcome"], row["dry_run"]) for row in rows}
    assert planned == {
        ("india", "disable-idle", "disable", "planned", True),
        ("golf", "disable-idle", "disable", "planned", True),
        ("lima", "delete-expired", "disable", "planned", True),
        ("oscar", "delete-expired", "disable", "planned", True),
    }
    lima = by_name(rows, "key_name")["lima"]
    assert lima["evidence"]["expires_at"] == "2026-02-24T12:00:00Z"
    assert lima["rules"] == ["delete-expired", "disable-idle"]
    assert report(org, "actions", since=DAY, at=day(10, 12)) == []
    assert [row["key_name"] for row in report(org, "actions", since=DAY, name="g*")] == ["golf"]


@pytest.mark.parametrize("kind", ["actions", "runs"])
def test_back_to_back_periods_list_each_record_once(org: Org, kind: str) -> None:
    """A dry enforce at 12:15: the hour ending then lists it, the hour after it does not, as a
    snapshot at a period's start belongs to the period before it in spend and trends."""
    at = day(10, 12.25)
    outcome = org.run("enforce", at)
    assert outcome.exit_code == 0, outcome.message

    def ours(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [row for row in rows if row["run_id"] == outcome.run_id]

    assert ours(report(org, kind, since=HOUR, at=at, now=at))
    assert ours(report(org, kind, since=HOUR, at=at + HOUR, now=at + HOUR)) == []


# -- output formats ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["inventory", "spend", "actions", "idle", "trends"])
def test_tables_fit_80_columns_and_csv_has_a_header(org: Org, kind: str) -> None:
    org.run("enforce", day(10, 12.25))
    with org.database.sessions() as session:
        result = builders()[kind](session, ReportParams(now=NOW, since=10 * DAY, ruleset=parse_rules(RULES)))
    out = io.StringIO()
    print_table(result, Console(file=out, width=80, color_system=None))
    lines = out.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    assert result.rows, kind
    parsed = list(csv.DictReader(io.StringIO(to_csv(result))))
    assert list(parsed[0]) == list(result.columns)
    assert len(parsed) == len(result.rows)


# -- what cannot be answered ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["inventory", "spend", "actions", "idle", "trends"])
def test_an_empty_database_says_to_sync_first(database: Database, kind: str) -> None:
    with database.sessions() as session, pytest.raises(ReportError, match="run `keyhygiene sync` first"):
        builders()[kind](session, ReportParams(now=NOW))


@pytest.mark.parametrize("kind", ["inventory", "spend", "idle", "trends"])
def test_at_before_the_first_snapshot(org: Org, kind: str) -> None:
    with org.database.sessions() as session, pytest.raises(ReportError, match="before the first stored snapshot"):
        builders()[kind](session, ReportParams(now=NOW, at=D0 - DAY))


def test_the_audit_log_answers_an_at_before_the_first_snapshot(org: Org) -> None:
    # The audit log outlives the snapshots: after a prune, its older records are still asked for
    # with --at (it said "before the first stored snapshot" and showed nothing).
    with org.database.sessions() as session:
        report = builders()["actions"](session, ReportParams(now=NOW, at=D0 - DAY, since=timedelta(days=3)))
    assert report.rows == [] and report.title.startswith("Audit log, ")


def test_dates_are_plain_in_json(org: Org) -> None:
    rows = report(org, "trends", since=2 * DAY)
    assert rows[-1]["day"] == date(2026, 3, 11).isoformat()
    assert rows[-1]["taken_at"] == "2026-03-11T12:00:00Z"
    assert timedelta(0) < NOW - day(10)


def test_trends_count_a_key_idle_as_the_rules_do_when_the_api_omits_last_used_at(bare_org: Org) -> None:
    """An API that leaves ``last_used_at`` out says nothing about use: the rules then read idleness
    from the snapshot history only, and trends and the idle metric must count the same keys."""
    org = bare_org
    org.fake.omit_fields = {"last_used_at"}
    org.add("quiet", at=day(0, 1), created_at=D0 - 60 * DAY)
    org.add("spender", at=day(0, 1), created_at=D0 - 60 * DAY, usage=3.0)
    org.sync(day(0, 2))
    org.sync(day(1, 2))
    at = day(1, 3)

    assert report(org, "idle", since=30 * DAY, at=at, now=at) == []  # watched for a day only
    assert report(org, "trends", since=2 * DAY, at=at, now=at)[-1]["idle_30d"] == 0
    with org.database.sessions() as session:
        newest = snapshots.newest_complete(session)
        assert newest is not None
        assert db_metrics.idle_keys(session, newest) == 0

    org.sync(day(40, 2))  # forty days of history with usage unchanged: idle now, by every reading
    at = day(40, 3)
    idle = report(org, "idle", since=30 * DAY, at=at, now=at)
    assert sorted(row["name"] for row in idle) == ["quiet", "spender"]
    assert report(org, "trends", since=2 * DAY, at=at, now=at)[-1]["idle_30d"] == 2
