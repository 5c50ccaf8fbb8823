"""The plan, the HTML report's upcoming actions and summary card, and the idle report's "acts on"
give one answer: each key once, with the strongest action, and those due now are the plan."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import timedelta

import pytest

from db import snapshots
from keyhygiene.context import Database
from keyhygiene.enforcement import load_plan_inputs, make_plan
from keyhygiene.fakeapi import FakeOpenRouter
from keyhygiene.reports import ReportParams
from keyhygiene.reports.html import render_html
from keyhygiene.reports.idle import build as idle_report
from keyhygiene.rules import Plan, RuleSet, parse_rules
from tests.test_html_report import _Page
from tests.test_reports_support import NOW, RULES, Org, build_history

# Several rules match the same keys (idle keys: report, disable and delete; lima: expired and idle),
# so a count per rule would differ from a count per key.
MANY_RULES = (
    RULES
    + """
[[rule]]
name = "report-idle"
match = "unused"
idle_for = "7d"
action = "report"

[[rule]]
name = "wipe-very-idle"
match = "unused"
idle_for = "40d"
action = "delete"
grace = "3d"

[[rule]]
name = "big-spender"
match = "over_budget"
window = "total"
threshold_usd = 20.0
action = "report"
"""
)


@pytest.fixture
def org(database: Database, fake: FakeOpenRouter, fake_url: str) -> Iterator[Org]:
    org = Org(database, fake, fake_url)
    try:
        build_history(org)
        yield org
    finally:
        org.close()


def plan_now(database: Database, ruleset: RuleSet) -> Plan:
    with database.sessions() as session:
        snapshot = snapshots.latest_snapshot(session)
        assert snapshot is not None
        return make_plan(load_plan_inputs(session, snapshot.id), ruleset, NOW)


def test_plan_upcoming_chart_summary_card_and_idle_report_agree(org: Org, database: Database) -> None:
    ruleset = parse_rules(MANY_RULES, "many.toml")
    the_plan = plan_now(database, ruleset)
    assert any(len(decision.rules) > 1 for decision in the_plan.decisions), "the case needs keys several rules match"
    params = ReportParams(now=NOW, ruleset=ruleset)
    with database.sessions() as session:
        page = render_html(session, params)
        idle_rows = idle_report(session, params).rows
    rendered = _Page()
    rendered.feed(page)

    # Due at the next run: exactly the plan, action by action.
    upcoming = rendered.figures["upcoming"]
    planned = Counter(decision.action for decision in the_plan.decisions)
    assert {action: n for action, n in upcoming["due"].items() if n} == {a: float(n) for a, n in planned.items()}
    assert sum(upcoming["due"].values()) == len(the_plan.decisions) > 0

    # The card counts the chart's keys up to a week out: each key once, whatever its number of rules.
    week = (NOW + timedelta(days=7)).date().isoformat()
    in_week = sum(sum(cells.values()) for label, cells in upcoming.items() if label == "due" or label <= week)
    assert rendered.cards["upcoming-7d"] == in_week
    assert in_week < sum(len(decision.rules) for decision in the_plan.decisions)

    # The idle report's next action for a key due now is the plan's decision for it.
    by_key = {decision.key_hash: decision for decision in the_plan.decisions}
    due_idle = [row for row in idle_rows if row["acts_on"] is not None and row["acts_on"] <= NOW]
    assert due_idle, "the case needs idle keys a rule acts on now"
    for row in due_idle:
        decision = by_key[row["key_hash"]]
        assert (row["next_rule"], row["next_action"]) == (decision.rule, decision.action)
    # ... and an idle key the plan leaves alone now is not shown as due.
    for row in idle_rows:
        if row["key_hash"] not in by_key:
            assert row["acts_on"] is None or row["acts_on"] > NOW
