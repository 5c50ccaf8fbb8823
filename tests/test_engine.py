"""The rules engine on literal keys: every semantic of the rules file, at the edge of every duration
and threshold."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from keyhygiene.enforcement import key_facts
from keyhygiene.keysapi.models import Key
from keyhygiene.rules import (
    AuditFacts,
    Decision,
    KeyFacts,
    KeyHistory,
    Plan,
    Rule,
    RuleSet,
    Safety,
    check_caps,
    decide,
    idle_since,
    is_protected,
    next_action,
    plan,
)

NOW = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)
SECOND = timedelta(seconds=1)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
MISSING = object()  # leave the field out of the API object altogether


def iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def make_key(**fields: Any) -> KeyFacts:
    """A key as ``GET /keys`` would return it, as the engine reads it: an old, enabled, recently used
    key unless told otherwise."""
    data: dict[str, Any] = {
        "hash": "h1",
        "name": "dev-alpha",
        "label": "sk-or-v1-abc...123",
        "disabled": False,
        "limit": None,
        "limit_remaining": None,
        "limit_reset": None,
        "include_byok_in_limit": False,
        "usage": 10.0,
        "usage_daily": 0.0,
        "usage_weekly": 0.0,
        "usage_monthly": 0.0,
        "byok_usage": 0.0,
        "byok_usage_daily": 0.0,
        "byok_usage_weekly": 0.0,
        "byok_usage_monthly": 0.0,
        "created_at": NOW - timedelta(days=365),
        "updated_at": None,
        "expires_at": None,
        "last_used_at": NOW - DAY,
        "workspace_id": "ws-1",
        "creator_user_id": "user-1",
        "external_user": None,
    }
    observed_at = fields.pop("observed_at", NOW)
    data.update(fields)
    data = {name: value for name, value in data.items() if value is not MISSING}
    data = {name: iso(value) if isinstance(value, datetime) else value for name, value in data.items()}
    return key_facts(Key.from_api(data), observed_at)


def rule(name: str = "r", match: str = "expired", action: str = "disable", **options: Any) -> Rule:
    if match == "unused":
        options.setdefault("idle_for", timedelta(days=30))
    if match == "over_budget":
        options.setdefault("window", "monthly")
    return Rule(name=name, match=match, action=action, **options)  # type: ignore[arg-type]


def ruleset(*rules: Rule, **safety: Any) -> RuleSet:
    return RuleSet(safety=Safety(**safety), rules=rules, source="test.toml")


def run(
    key: KeyFacts,
    *rules: Rule,
    history: KeyHistory | None = None,
    audit: AuditFacts | None = None,
    now: datetime = NOW,
    **safety: Any,
) -> Decision | None:
    return decide(key, history or KeyHistory(), audit or AuditFacts(), ruleset(*rules, **safety), now)


def action_of(decision: Decision | None) -> str | None:
    return None if decision is None else decision.action


# --- protection ---------------------------------------------------------------------------------

EXPIRED = {"expires_at": NOW - DAY}
DELETE_NOW = rule("wipe", "expired", "delete", grace=timedelta(0))


def test_protected_by_hash_gets_no_decision_whatever_the_rules_say() -> None:
    key = make_key(hash="keep-me", **EXPIRED)
    assert run(key, DELETE_NOW, protect_hashes=("keep-me",)) is None
    assert action_of(run(key, DELETE_NOW, protect_hashes=("other",))) == "delete"


def test_protected_by_name_glob_gets_no_decision() -> None:
    key = make_key(name="prod-billing", **EXPIRED)
    assert run(key, DELETE_NOW, rule("see", "expired", "report"), protect_names=("prod-*",)) is None
    assert is_protected(key, Safety(protect_names=("prod-*",)))
    assert is_protected(key, Safety(protect_names=("x", "prod-b?lling")))


def test_name_globs_are_case_sensitive_and_match_the_whole_name() -> None:
    assert not is_protected(make_key(name="Prod-billing"), Safety(protect_names=("prod-*",)))
    assert not is_protected(make_key(name="my-prod-key"), Safety(protect_names=("prod-*",)))
    assert not is_protected(make_key(name="prod"), Safety(protect_names=("prod-*",)))


def test_a_protected_name_is_also_the_exact_name_with_brackets_padding_or_another_unicode_form() -> None:
    """Before, ``"billing [prod]"`` read only as a glob whose ``[prod]`` is one character, so it
    protected no key of that exact name, and ``prod-*`` did not protect a key named ``" prod-db"``
    or one whose ``é`` is written as ``e`` and a combining accent: each of them was disabled."""
    protect = Safety(protect_names=("billing [prod]", "prod-*", "caf\u00e9-*"))
    for name in ("billing [prod]", " prod-db", "prod-db\n", "cafe\u0301-main", "caf\u00e9-main"):
        key = make_key(name=name, **EXPIRED)
        assert is_protected(key, protect), name
        assert run(key, DELETE_NOW, protect_names=protect.protect_names) is None, name
    assert not is_protected(make_key(name="billing [dev]"), protect)
    assert not is_protected(make_key(name="x prod-db"), protect)
    excluded = rule(exclude_names=("billing [prod]",))
    assert run(make_key(name="billing [prod]", **EXPIRED), excluded) is None
    assert action_of(run(make_key(name="billing [dev]", **EXPIRED), excluded)) == "disable"


@pytest.mark.parametrize(
    "name",
    ["\u200bprod-db", "prod-db\u200b", "\ufeffprod-db", "prod\u00ad-db", "\u2066prod-db\u2069", " \u200b prod-db"],
)
def test_a_name_holding_characters_that_take_no_room_is_protected_as_it_reads(name: str) -> None:
    """Before, a key named ``"\u200bprod-db"`` (a zero-width space pasted in front) showed as
    ``prod-db`` everywhere and escaped ``prod-*``: it was deleted."""
    protect = Safety(protect_names=("prod-*",))
    key = make_key(name=name, **EXPIRED)

    assert is_protected(key, protect)
    assert run(key, DELETE_NOW, protect_names=protect.protect_names) is None
    assert run(key, rule(exclude_names=("prod-db",))) is None
    assert not is_protected(make_key(name="\u200bdev-db"), protect)


def test_a_protected_key_is_never_reenabled() -> None:
    key = make_key(hash="keep", disabled=True, usage_monthly=1.0, updated_at=NOW - DAY)
    reenabler = rule("spend", "over_budget", "disable", threshold_usd=100.0, reenable=True)
    audit = AuditFacts("disable", "spend", NOW - DAY, key_updated_at=NOW - DAY)
    assert action_of(run(key, reenabler, audit=audit)) == "enable"
    assert run(key, reenabler, audit=audit, protect_hashes=("keep",)) is None


# --- filters ------------------------------------------------------------------------------------


def test_names_filter_takes_keys_matching_any_glob() -> None:
    r = rule(names=("dev-*", "ci-*"))
    assert action_of(run(make_key(name="ci-build", **EXPIRED), r)) == "disable"
    assert run(make_key(name="staging", **EXPIRED), r) is None


def test_exclude_names_filter_drops_keys_matching_any_glob() -> None:
    r = rule(exclude_names=("dev-keep*",))
    assert run(make_key(name="dev-keeper", **EXPIRED), r) is None
    assert action_of(run(make_key(name="dev-other", **EXPIRED), r)) == "disable"


def test_workspaces_filter() -> None:
    r = rule(workspaces=("ws-2",))
    assert action_of(run(make_key(workspace_id="ws-2", **EXPIRED), r)) == "disable"
    assert run(make_key(workspace_id="ws-1", **EXPIRED), r) is None
    assert run(make_key(workspace_id=MISSING, **EXPIRED), r) is None


def test_min_age_filter_edge() -> None:
    r = rule("rep", "expired", "report", min_age=timedelta(days=7))
    assert action_of(run(make_key(created_at=NOW - timedelta(days=7), **EXPIRED), r)) == "report"
    assert run(make_key(created_at=NOW - timedelta(days=7) + SECOND, **EXPIRED), r) is None


@pytest.mark.parametrize(
    ("flag", "disabled", "matches"),
    [(True, True, True), (True, False, False), (False, False, True), (False, True, False)],
)
def test_disabled_filter(flag: bool, disabled: bool, matches: bool) -> None:
    r = rule("rep", "expired", "report", disabled=flag)
    assert (run(make_key(disabled=disabled, **EXPIRED), r) is not None) is matches


# --- expired ------------------------------------------------------------------------------------


def test_expired_edge() -> None:
    r = rule("exp", "expired", "report")
    assert action_of(run(make_key(expires_at=NOW), r)) == "report"
    assert run(make_key(expires_at=NOW + SECOND), r) is None
    assert run(make_key(expires_at=None), r) is None
    assert run(make_key(expires_at=MISSING), r) is None
    decision = run(make_key(expires_at=NOW - DAY), r)
    assert decision is not None
    assert decision.evidence["expires_at"] == iso(NOW - DAY)


# --- unused -------------------------------------------------------------------------------------

D = timedelta(days=30)
IDLE = rule("idle", "unused", "report", idle_for=D)


def test_unused_by_last_used_at_edge() -> None:
    assert action_of(run(make_key(last_used_at=NOW - D), IDLE)) == "report"
    assert run(make_key(last_used_at=NOW - D + SECOND), IDLE) is None


def test_unused_needs_the_key_to_be_at_least_d_old() -> None:
    old_enough = make_key(created_at=NOW - D, last_used_at=None)
    too_young = make_key(created_at=NOW - D + SECOND, last_used_at=None)
    history = KeyHistory(usage_unchanged_since=NOW - D)
    assert action_of(run(old_enough, IDLE, history=history)) == "report"
    assert run(too_young, IDLE, history=history) is None


def test_unused_by_history_edge_when_last_used_at_is_not_reported() -> None:
    key = make_key(last_used_at=MISSING)
    assert not key.reports_last_used
    assert action_of(run(key, IDLE, history=KeyHistory(usage_unchanged_since=NOW - D))) == "report"
    assert run(key, IDLE, history=KeyHistory(usage_unchanged_since=NOW - D + SECOND)) is None


def test_no_source_of_idleness_means_not_unused() -> None:
    assert run(make_key(last_used_at=MISSING), IDLE) is None
    assert run(make_key(last_used_at=MISSING, usage=0.0), IDLE, history=KeyHistory()) is None


def test_use_in_the_history_inside_d_wins_over_an_old_last_used_at() -> None:
    key = make_key(last_used_at=NOW - timedelta(days=90))
    assert run(key, IDLE, history=KeyHistory(usage_unchanged_since=NOW - DAY)) is None
    assert action_of(run(key, IDLE, history=KeyHistory(usage_unchanged_since=NOW - D))) == "report"


def test_a_recent_last_used_at_wins_over_an_old_history() -> None:
    key = make_key(last_used_at=NOW - DAY)
    assert run(key, IDLE, history=KeyHistory(usage_unchanged_since=NOW - timedelta(days=90))) is None


def test_null_last_used_at_means_no_use_since_2026_01_01() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    key = make_key(last_used_at=None, created_at=datetime(2025, 6, 1, tzinfo=UTC))
    assert key.reports_last_used
    assert action_of(run(key, IDLE, now=start + D)) == "report"
    assert run(key, IDLE, now=start + D - SECOND) is None


def test_the_evidence_of_a_key_newer_than_the_recording_of_use_says_idle_since_its_creation() -> None:
    # A null last_used_at proves no use since 2026-01-01; a key made on 2026-05-02 was idle 44 days
    # on 2026-06-15, not 165 (plans, notices and the audit log show these figures).
    created = datetime(2026, 5, 2, 12, 0, tzinfo=UTC)
    decision = run(make_key(last_used_at=None, created_at=created, usage=0.0), IDLE)  # never used
    assert decision is not None
    assert (decision.evidence["idle_since"], decision.evidence["idle_days"]) == (iso(created), 44.0)


def test_null_last_used_at_with_history_showing_use_is_not_unused() -> None:
    key = make_key(last_used_at=None)
    assert run(key, IDLE, history=KeyHistory(usage_unchanged_since=NOW - DAY)) is None


def test_unused_evidence() -> None:
    key = make_key(last_used_at=NOW - timedelta(days=41))
    decision = run(key, IDLE, history=KeyHistory(usage_unchanged_since=NOW - timedelta(days=50)))
    assert decision is not None
    assert decision.evidence == {
        "match": "unused",
        "idle_for": "30d",
        "idle_since": iso(NOW - timedelta(days=41)),
        "idle_days": 41.0,
        "created_at": iso(NOW - timedelta(days=365)),
        "reports_last_used": True,
        "last_used_at": iso(NOW - timedelta(days=41)),
        "usage_unchanged_since": iso(NOW - timedelta(days=50)),
        "first_seen_at": None,
    }


def test_a_history_that_never_changed_is_no_sign_of_use() -> None:
    # One snapshot so far (the first run): usage "unchanged since" the only snapshot says nothing
    # about use; last_used_at alone shows the key idle.
    key = make_key(last_used_at=NOW - timedelta(days=45))
    first_run = KeyHistory(first_seen_at=NOW, usage_unchanged_since=NOW)
    assert action_of(run(key, IDLE, history=first_run)) == "report"
    # Usage seen to change yesterday is a sign of use, whatever last_used_at says.
    changed = KeyHistory(first_seen_at=NOW - timedelta(days=90), usage_unchanged_since=NOW - DAY)
    assert run(key, IDLE, history=changed) is None


def test_a_history_that_never_changed_shows_idleness_from_first_sight_edge() -> None:
    key = make_key(last_used_at=MISSING)
    since_first_seen = KeyHistory(first_seen_at=NOW - D, usage_unchanged_since=NOW - D)
    assert action_of(run(key, IDLE, history=since_first_seen)) == "report"
    too_short = KeyHistory(first_seen_at=NOW - D + SECOND, usage_unchanged_since=NOW - D + SECOND)
    assert run(key, IDLE, history=too_short) is None


def test_a_change_seen_in_history_at_the_edge() -> None:
    key = make_key(last_used_at=MISSING)
    first = NOW - timedelta(days=90)
    assert action_of(run(key, IDLE, history=KeyHistory(first, NOW - D))) == "report"
    assert run(key, IDLE, history=KeyHistory(first, NOW - D + SECOND)) is None


def test_history_alone_shows_idleness_when_null_last_used_at_cannot_yet() -> None:
    # now - D is before 2026: null last_used_at shows no idleness for D, but it shows no use either,
    # and a history that never changed since November does.
    now = datetime(2026, 1, 20, tzinfo=UTC)
    key = make_key(last_used_at=None, created_at=datetime(2025, 6, 1, tzinfo=UTC))
    quiet = KeyHistory(
        first_seen_at=datetime(2025, 11, 1, tzinfo=UTC), usage_unchanged_since=datetime(2025, 11, 1, tzinfo=UTC)
    )
    assert action_of(run(key, IDLE, history=quiet, now=now)) == "report"
    assert run(key, IDLE, now=now) is None
    moved = KeyHistory(
        first_seen_at=datetime(2025, 11, 1, tzinfo=UTC), usage_unchanged_since=datetime(2025, 12, 25, tzinfo=UTC)
    )
    assert run(key, IDLE, history=moved, now=now) is None


def test_idle_since_is_the_latest_sign_of_use() -> None:
    history = KeyHistory(usage_unchanged_since=NOW - timedelta(days=5))
    assert idle_since(make_key(last_used_at=NOW - timedelta(days=9)), history) == NOW - timedelta(days=5)
    assert idle_since(make_key(last_used_at=NOW - DAY), history) == NOW - DAY
    assert idle_since(make_key(last_used_at=None), KeyHistory()) == datetime(2026, 1, 1, tzinfo=UTC)
    assert idle_since(make_key(last_used_at=MISSING), history) == NOW - timedelta(days=5)
    assert idle_since(make_key(last_used_at=MISSING), KeyHistory()) is None
    # No sign of use from either source: the earliest start of idleness.
    quiet = KeyHistory(first_seen_at=NOW - timedelta(days=400), usage_unchanged_since=NOW - timedelta(days=400))
    assert idle_since(make_key(last_used_at=None), quiet) == NOW - timedelta(days=400)
    assert idle_since(make_key(last_used_at=NOW - DAY), quiet) == NOW - DAY


def test_a_null_last_use_of_a_key_created_since_2026_that_spent_proves_no_idleness() -> None:
    """A reviewer's repro: a key created in 2026 with $350 spent and last_used_at null was disabled
    (and later deleted) as idle since its creation. Null means no use recorded since OpenRouter
    began recording it; a key created since then that spent was used: the field says nothing, and
    only the snapshot history can show the key idle."""
    created = NOW - timedelta(days=100)
    spent = make_key(created_at=created, last_used_at=None, usage=350.0)
    assert idle_since(spent, KeyHistory()) is None
    assert run(spent, rule("idle", "unused", "disable")) is None
    quiet = KeyHistory(first_seen_at=NOW - timedelta(days=40), usage_unchanged_since=NOW - timedelta(days=40))
    assert idle_since(spent, quiet) == NOW - timedelta(days=40)
    assert action_of(run(spent, rule("idle", "unused", "disable"), history=quiet)) == "disable"
    # Never spent, or created before 2026 (used before the recording began): idle from 2026-01-01.
    assert idle_since(make_key(created_at=created, last_used_at=None, usage=0.0), KeyHistory()) == datetime(
        2026, 1, 1, tzinfo=UTC
    )
    old = make_key(created_at=datetime(2025, 6, 1, tzinfo=UTC), last_used_at=None, usage=350.0)
    assert idle_since(old, KeyHistory()) == datetime(2026, 1, 1, tzinfo=UTC)


def test_spend_in_the_current_window_is_use_whatever_last_used_at_says() -> None:
    """A key created in 2025 with a null last_used_at reads idle since 2026-01-01 (the API's guide:
    last used before OpenRouter began recording); if the API also says it spent today, this week or
    this month, it was used then: it is not unused for longer than that window has run."""
    wednesday = datetime(2026, 6, 17, 9, 30, tzinfo=UTC)  # week from Monday 2026-06-15
    old = {"created_at": datetime(2025, 6, 1, tzinfo=UTC), "last_used_at": None, "usage": 350.0}
    quiet = make_key(**old, observed_at=wednesday)
    assert idle_since(quiet, KeyHistory()) == datetime(2026, 1, 1, tzinfo=UTC)
    for counters, used_from in [
        ({"usage_daily": 2.0, "usage_weekly": 2.0, "usage_monthly": 2.0}, datetime(2026, 6, 17, tzinfo=UTC)),
        ({"byok_usage_daily": 0.5}, datetime(2026, 6, 17, tzinfo=UTC)),  # BYOK spend is use too
        ({"usage_weekly": 2.0, "usage_monthly": 2.0}, datetime(2026, 6, 15, tzinfo=UTC)),
        ({"usage_monthly": 2.0}, datetime(2026, 6, 1, tzinfo=UTC)),
    ]:
        key = make_key(**old, **counters, observed_at=wednesday)
        assert idle_since(key, KeyHistory()) == used_from, counters
    # A week that began last month: the month's spend shows use since the month began.
    thursday = datetime(2026, 7, 2, 8, tzinfo=UTC)  # week from Monday 2026-06-29
    both = make_key(**old, usage_weekly=2.0, usage_monthly=2.0, observed_at=thursday)
    assert idle_since(both, KeyHistory()) == datetime(2026, 7, 1, tzinfo=UTC)

    spent_today = make_key(**old, usage_daily=2.0, usage_weekly=2.0, usage_monthly=2.0)
    assert run(spent_today, rule("idle", "unused", "disable", idle_for=DAY)) is None
    assert action_of(run(make_key(**old), rule("idle", "unused", "disable"))) == "disable"
    # This month's spend, 14 days in: unused for 7 days, not for 30; the evidence names the window.
    spent_this_month = make_key(**old, usage_monthly=2.0)  # observed at NOW, 2026-06-15 12:00
    assert run(spent_this_month, rule("idle", "unused", "disable")) is None
    decision = run(spent_this_month, rule("idle", "unused", "disable", idle_for=7 * DAY))
    assert decision is not None and decision.action == "disable"
    assert decision.evidence["idle_since"] == "2026-06-01T00:00:00Z"
    assert decision.evidence["spent_in_window_from"] == "2026-06-01T00:00:00Z"


def test_window_spend_only_ever_makes_a_key_less_idle() -> None:
    """Spend at an unknown time inside a window proves no idleness: it never shows a key idle where
    no other source does, nor idle for longer than another source shows; and counters read at an
    unknown time show nothing."""
    monthly = {"usage_monthly": 2.0}
    # No source shows idleness (an API without last_used_at, no history): still none.
    assert idle_since(make_key(last_used_at=MISSING, **monthly), KeyHistory()) is None
    # last_used_at later than the window's start: the later time stands.
    used = NOW - DAY
    assert idle_since(make_key(last_used_at=used, **monthly), KeyHistory()) == used
    # The history shows idleness only from first sight (June 10), later than the month began.
    watched = KeyHistory(first_seen_at=NOW - 5 * DAY, usage_unchanged_since=NOW - 5 * DAY)
    assert idle_since(make_key(last_used_at=MISSING, **monthly), watched) == NOW - 5 * DAY
    # When the counters were read is not known: they show nothing.
    old = datetime(2025, 6, 1, tzinfo=UTC)
    unknown = make_key(last_used_at=None, created_at=old, usage_daily=2.0, observed_at=None)
    assert idle_since(unknown, KeyHistory()) == datetime(2026, 1, 1, tzinfo=UTC)


def test_spend_an_earlier_snapshot_saw_in_a_window_bounds_idleness_after_the_window_reset() -> None:
    """The counters reset with their window; the history keeps where they showed use
    (``spent_from``): a key created in 2025 with a null last_used_at that spent in March reads idle
    from March, not from 2026-01-01, once April's counters are zero."""
    old = {"created_at": datetime(2025, 6, 1, tzinfo=UTC), "last_used_at": None, "usage": 350.0}
    march = datetime(2026, 3, 1, tzinfo=UTC)
    april = make_key(**old, observed_at=datetime(2026, 4, 1, 0, 30, tzinfo=UTC))  # every counter zero
    seen = KeyHistory(
        first_seen_at=datetime(2026, 3, 15, tzinfo=UTC),
        usage_unchanged_since=datetime(2026, 3, 15, tzinfo=UTC),
        spent_from=march,
    )
    assert idle_since(april, seen) == march
    assert idle_since(april, replace(seen, spent_from=None)) == datetime(2026, 1, 1, tzinfo=UTC)
    sixty = rule("idle", "unused", "disable", idle_for=60 * DAY)
    assert run(april, sixty, history=seen, now=datetime(2026, 4, 1, 1, tzinfo=UTC)) is None
    due = next_action(april, seen, AuditFacts(), ruleset(sixty), datetime(2026, 4, 1, 1, tzinfo=UTC))
    assert due is not None and due.due == march + 60 * DAY
    decision = run(april, sixty, history=seen, now=march + 60 * DAY)
    assert decision is not None and decision.evidence["spent_in_window_from"] == "2026-03-01T00:00:00Z"
    # It never shows idleness by itself: no other source, no answer.
    assert idle_since(make_key(last_used_at=MISSING), KeyHistory(spent_from=march)) is None


# --- over_budget --------------------------------------------------------------------------------


def over(threshold: float | None = 100.0, window: str = "monthly", **options: Any) -> Rule:
    return rule("spend", "over_budget", "report", window=window, threshold_usd=threshold, **options)


def test_over_budget_threshold_edge() -> None:
    assert action_of(run(make_key(usage_monthly=100.0), over())) == "report"
    assert run(make_key(usage_monthly=99.99), over()) is None


@pytest.mark.parametrize("window", ["daily", "weekly", "monthly"])
def test_over_budget_reads_the_rules_window(window: str) -> None:
    others = {f"usage_{w}": 0.0 for w in ("daily", "weekly", "monthly")}
    key = make_key(**{**others, f"usage_{window}": 100.0})
    assert action_of(run(key, over(window=window))) == "report"
    for other in {"daily", "weekly", "monthly"} - {window}:
        assert run(key, over(window=other)) is None


def test_over_budget_total_window_is_lifetime_usage() -> None:
    assert action_of(run(make_key(usage=100.0), over(window="total"))) == "report"
    assert run(make_key(usage=99.0, usage_monthly=500.0), over(window="total")) is None


def test_byok_counts_only_where_the_key_counts_it_in_its_limit() -> None:
    fields = {"usage_monthly": 60.0, "byok_usage_monthly": 40.0}
    decision = run(make_key(include_byok_in_limit=True, **fields), over())
    assert decision is not None
    assert decision.evidence["window_spend_usd"] == 100.0
    assert decision.evidence["threshold_usd"] == 100.0
    assert run(make_key(include_byok_in_limit=False, **fields), over()) is None
    assert run(make_key(include_byok_in_limit=True, usage_monthly=60.0, byok_usage_monthly=39.99), over()) is None


def test_over_budget_without_threshold_is_an_exhausted_limit() -> None:
    r = over(threshold=None)
    assert action_of(run(make_key(limit=10.0, limit_remaining=0.0), r)) == "report"
    assert action_of(run(make_key(limit=10.0, limit_remaining=-0.5), r)) == "report"
    assert run(make_key(limit=10.0, limit_remaining=0.01), r) is None
    assert run(make_key(limit=None, limit_remaining=None, usage_monthly=1e6), r) is None
    assert run(make_key(limit=10.0, limit_remaining=None), r) is None


# --- several rules: the strongest action --------------------------------------------------------


def test_the_strongest_action_wins_and_every_matching_rule_is_listed() -> None:
    key = make_key(**EXPIRED, usage_monthly=500.0)
    rules = (
        rule("a-report", "expired", "report"),
        rule("b-delete", "expired", "delete"),
        rule("c-disable", "over_budget", "disable", threshold_usd=100.0),
        rule("d-nomatch", "unused", "delete"),
    )
    decision = run(key, *rules)
    assert decision is not None
    assert (decision.action, decision.rule) == ("disable", "b-delete")
    assert decision.evidence["step"] == "disable-before-delete"
    assert decision.rules == ("a-report", "b-delete", "c-disable")


def test_between_rules_of_the_same_strength_the_first_in_the_file_wins() -> None:
    key = make_key(**EXPIRED, usage_monthly=500.0)
    first = rule("first", "over_budget", "disable", threshold_usd=100.0)
    second = rule("second", "expired", "disable")
    decision = run(key, first, second)
    assert decision is not None
    assert (decision.rule, decision.rules) == ("first", ("first", "second"))
    decision = run(key, second, first)
    assert decision is not None
    assert (decision.rule, decision.rules) == ("second", ("second", "first"))


def test_a_delete_that_can_act_now_beats_a_disable() -> None:
    key = make_key(**EXPIRED)
    decision = run(key, rule("dis", "expired", "disable"), rule("del", "expired", "delete", grace=timedelta(0)))
    assert decision is not None
    assert (decision.action, decision.rule) == ("delete", "del")


def test_disable_on_an_already_disabled_key_is_nothing_to_do() -> None:
    key = make_key(disabled=True, **EXPIRED)
    assert run(key, rule("dis", "expired", "disable")) is None


def test_disable_on_a_disabled_key_with_a_report_rule_reports() -> None:
    key = make_key(disabled=True, **EXPIRED)
    decision = run(key, rule("dis", "expired", "disable"), rule("rep", "expired", "report"))
    assert decision is not None
    assert (decision.action, decision.rule, decision.rules) == ("report", "rep", ("dis", "rep"))
    assert not decision.changes_key


# --- delete -------------------------------------------------------------------------------------

GRACE = timedelta(days=7)
DELETE = rule("del", "expired", "delete", grace=GRACE)


def test_delete_on_an_enabled_key_disables_first() -> None:
    decision = run(make_key(**EXPIRED), DELETE)
    assert decision is not None
    assert decision.action == "disable"
    assert decision.rule == "del"
    assert decision.evidence == {
        "match": "expired",
        "expires_at": iso(NOW - DAY),
        "grace": "7d",
        "step": "disable-before-delete",
    }


def test_delete_with_zero_grace_deletes_an_enabled_key_at_once() -> None:
    decision = run(make_key(**EXPIRED), rule("del", "expired", "delete", grace=timedelta(0)))
    assert decision is not None
    assert decision.action == "delete"
    assert decision.evidence["step"] == "delete-at-once"


def test_delete_with_zero_grace_deletes_a_disabled_key_without_proof() -> None:
    key = make_key(disabled=True, updated_at=None, **EXPIRED)
    assert action_of(run(key, rule("del", "expired", "delete", grace=timedelta(0)))) == "delete"


def test_delete_after_grace_by_history_edge() -> None:
    key = make_key(disabled=True, updated_at=None, **EXPIRED)
    decision = run(key, DELETE, history=KeyHistory(disabled_since=NOW - GRACE))
    assert decision is not None
    assert decision.action == "delete"
    assert decision.evidence["step"] == "delete-after-grace"
    assert decision.evidence["disabled_since"] == iso(NOW - GRACE)
    assert decision.evidence["disabled_since_source"] == "history"
    assert run(key, DELETE, history=KeyHistory(disabled_since=NOW - GRACE + SECOND)) is None


def test_delete_after_grace_by_updated_at_edge() -> None:
    decision = run(make_key(disabled=True, updated_at=NOW - GRACE, **EXPIRED), DELETE)
    assert decision is not None
    assert (decision.action, decision.evidence["disabled_since_source"]) == ("delete", "updated_at")
    assert run(make_key(disabled=True, updated_at=NOW - GRACE + SECOND, **EXPIRED), DELETE) is None


def test_delete_after_grace_by_our_audit_edge() -> None:
    key = make_key(disabled=True, updated_at=None, **EXPIRED)
    decision = run(key, DELETE, audit=AuditFacts("disable", "anything", NOW - GRACE))
    assert decision is not None
    assert (decision.action, decision.evidence["disabled_since_source"]) == ("delete", "audit")
    assert run(key, DELETE, audit=AuditFacts("disable", "anything", NOW - GRACE + SECOND)) is None


def test_an_audit_that_is_not_a_disable_proves_nothing() -> None:
    key = make_key(disabled=True, updated_at=None, **EXPIRED)
    assert run(key, DELETE, audit=AuditFacts("enable", "del", NOW - timedelta(days=30))) is None
    assert run(key, DELETE, audit=AuditFacts("delete", "del", NOW - timedelta(days=30))) is None
    assert run(key, DELETE, audit=AuditFacts("disable", "del", None)) is None


def test_delete_trusts_updated_at_over_older_evidence() -> None:
    # Our audit says we disabled the key 30 days ago and the snapshots saw it disabled 20 days ago,
    # but the API changed it 2 days ago: someone may have enabled and disabled it again since.
    key = make_key(disabled=True, updated_at=NOW - timedelta(days=2), **EXPIRED)
    history = KeyHistory(disabled_since=NOW - timedelta(days=20))
    audit = AuditFacts("disable", "del", NOW - timedelta(days=30))
    assert run(key, DELETE, history=history, audit=audit) is None

    # The snapshots first saw the key a day ago, already disabled: they show no disable of their
    # own, and its updated_at counts.
    key = make_key(disabled=True, updated_at=NOW - timedelta(days=8), **EXPIRED)
    at_first_sight = KeyHistory(first_seen_at=NOW - DAY, disabled_since=NOW - DAY)
    decision = run(key, DELETE, history=at_first_sight, audit=audit)
    assert decision is not None
    assert decision.action == "delete"
    assert decision.evidence["disabled_since"] == iso(NOW - timedelta(days=8))
    assert decision.evidence["disabled_since_source"] == "updated_at"


def test_a_disable_the_snapshots_saw_outweighs_an_older_updated_at() -> None:
    # The snapshots saw the key enabled until an hour ago; someone disabled it since, and its
    # updated_at (a year old) did not move: the grace counts from the snapshots' first sight of it
    # disabled, not from a year ago.
    key = make_key(disabled=True, updated_at=NOW - timedelta(days=365), **EXPIRED)
    seen_since = NOW - timedelta(days=400)
    assert run(key, DELETE, history=KeyHistory(first_seen_at=seen_since, disabled_since=NOW - HOUR)) is None
    assert run(key, DELETE, history=KeyHistory(disabled_since=NOW - HOUR)) is None  # no first sight: the same

    decision = run(key, DELETE, history=KeyHistory(first_seen_at=seen_since, disabled_since=NOW - GRACE))
    assert decision is not None
    assert (decision.action, decision.evidence["disabled_since_source"]) == ("delete", "history")
    assert decision.evidence["disabled_since"] == iso(NOW - GRACE)


def test_without_updated_at_the_latest_of_history_and_audit_counts() -> None:
    key = make_key(disabled=True, updated_at=None, **EXPIRED)
    # The snapshots saw the key disabled a day after our disable (the next sync): a day's wait more.
    history, audit = KeyHistory(disabled_since=NOW - timedelta(days=6)), AuditFacts("disable", "del", NOW - GRACE)
    assert run(key, DELETE, history=history, audit=audit) is None
    decision = run(key, DELETE, history=KeyHistory(disabled_since=NOW - GRACE), audit=audit)
    assert decision is not None
    assert (decision.action, decision.evidence["disabled_since_source"]) == ("delete", "history")

    # We disabled it 10 days ago; it was enabled and disabled again since, which the snapshots saw:
    # its grace counts from the new disable, a day ago.
    history, audit = KeyHistory(disabled_since=NOW - DAY), AuditFacts("disable", "del", NOW - timedelta(days=10))
    assert run(key, DELETE, history=history, audit=audit) is None


def test_our_own_disable_outweighs_an_older_updated_at() -> None:
    """An API whose ``updated_at`` did not move with our disable: the key is not deleted on the
    strength of a change older than the disable."""
    key = make_key(disabled=True, updated_at=NOW - timedelta(days=20), **EXPIRED)
    assert run(key, DELETE, audit=AuditFacts("disable", "del", NOW - timedelta(hours=1))) is None
    decision = run(key, DELETE, audit=AuditFacts("disable", "del", NOW - GRACE))
    assert decision is not None
    assert decision.evidence["disabled_since"] == iso(NOW - GRACE)
    assert decision.evidence["disabled_since_source"] == "audit"


def test_a_proof_from_the_future_is_not_valid() -> None:
    key = make_key(disabled=True, updated_at=NOW + DAY, **EXPIRED)
    assert run(key, DELETE, history=KeyHistory(disabled_since=NOW - DAY)) is None


def test_an_enabled_key_is_never_deleted_on_the_strength_of_old_disable_evidence() -> None:
    key = make_key(disabled=False, updated_at=NOW - timedelta(days=90), **EXPIRED)
    decision = run(
        key,
        DELETE,
        history=KeyHistory(disabled_since=NOW - timedelta(days=90)),
        audit=AuditFacts("disable", "del", NOW - timedelta(days=90)),
    )
    assert action_of(decision) == "disable"


def test_a_disabled_key_without_proof_is_not_deleted_but_may_be_reported() -> None:
    key = make_key(disabled=True, updated_at=None, **EXPIRED)
    assert run(key, DELETE) is None
    decision = run(key, DELETE, rule("rep", "expired", "report"))
    assert decision is not None
    assert (decision.action, decision.rule, decision.rules) == ("report", "rep", ("del", "rep"))


# --- reenable -----------------------------------------------------------------------------------

SPEND = rule("spend", "over_budget", "disable", threshold_usd=100.0, reenable=True)
OURS = NOW - timedelta(days=20)
"""The ``updated_at`` the API answered our disable with, and the key still carries."""
BY_SPEND = AuditFacts("disable", "spend", OURS, key_updated_at=OURS)


def test_reenable_a_key_this_rule_disabled_once_under_budget() -> None:
    decision = run(make_key(disabled=True, updated_at=OURS, usage_monthly=99.99), SPEND, audit=BY_SPEND)
    assert decision is not None
    assert (decision.action, decision.rule, decision.rules) == ("enable", "spend", ("spend",))
    assert decision.evidence == {
        "match": "over_budget",
        "step": "reenable",
        "disabled_by_rule": "spend",
        "disabled_at": iso(NOW - timedelta(days=20)),
        "window": "monthly",
        "window_spend_usd": 99.99,
        "threshold_usd": 100.0,
    }


def test_reenable_only_while_the_key_is_as_our_disable_left_it() -> None:
    ours = NOW - timedelta(days=20)
    audit = AuditFacts("disable", "spend", ours, key_updated_at=ours)
    assert action_of(run(make_key(disabled=True, usage_monthly=0.0, updated_at=ours), SPEND, audit=audit)) == "enable"
    # Changed since our disable (someone enabled and disabled it again), or we never learnt the
    # updated_at our disable left: someone else's disable, never enabled by us.
    later = make_key(disabled=True, usage_monthly=0.0, updated_at=ours + timedelta(minutes=5))
    assert run(later, SPEND, audit=audit) is None
    unknown = AuditFacts("disable", "spend", ours)
    assert run(make_key(disabled=True, usage_monthly=0.0, updated_at=ours), SPEND, audit=unknown) is None
    # Nor when the key carries no updated_at now: nothing shows it is as our disable left it.
    assert run(make_key(disabled=True, usage_monthly=0.0, updated_at=None), SPEND, audit=audit) is None


def test_no_reenable_while_still_over_budget() -> None:
    assert run(make_key(disabled=True, updated_at=OURS, usage_monthly=100.0), SPEND, audit=BY_SPEND) is None


@pytest.mark.parametrize(
    "audit",
    [
        AuditFacts(),
        AuditFacts("disable", "other-rule", NOW - DAY),
        AuditFacts("enable", "spend", NOW - DAY),
        AuditFacts("delete", "spend", NOW - DAY),
        AuditFacts("disable", None, NOW - DAY),
    ],
)
def test_keys_disabled_by_anyone_else_are_never_enabled(audit: AuditFacts) -> None:
    assert run(make_key(disabled=True, updated_at=OURS, usage_monthly=0.0), SPEND, audit=audit) is None


def test_no_reenable_without_reenable_true() -> None:
    no_reenable = rule("spend", "over_budget", "disable", threshold_usd=100.0)
    assert run(make_key(disabled=True, updated_at=OURS, usage_monthly=0.0), no_reenable, audit=BY_SPEND) is None


def test_no_reenable_of_a_key_that_is_enabled() -> None:
    assert run(make_key(disabled=False, usage_monthly=0.0), SPEND, audit=BY_SPEND) is None


def test_the_rules_own_disabled_filter_does_not_stop_reenable() -> None:
    # disabled = false means "disable enabled keys over budget": the key it disabled is now disabled,
    # and the filter must not lock it out of being re-enabled.
    enabled_only = rule("spend", "over_budget", "disable", threshold_usd=100.0, reenable=True, disabled=False)
    assert (
        action_of(run(make_key(disabled=True, updated_at=OURS, usage_monthly=0.0), enabled_only, audit=BY_SPEND))
        == "enable"
    )


def test_no_reenable_when_the_rules_other_filters_no_longer_take_the_key() -> None:
    narrowed = rule("spend", "over_budget", "disable", threshold_usd=100.0, reenable=True, names=("ci-*",))
    assert (
        run(make_key(name="dev-alpha", disabled=True, updated_at=OURS, usage_monthly=0.0), narrowed, audit=BY_SPEND)
        is None
    )


def test_no_reenable_when_another_disable_or_delete_rule_matches() -> None:
    key = make_key(disabled=True, updated_at=OURS, usage_monthly=0.0, **EXPIRED)
    assert run(key, SPEND, rule("gone", "expired", "disable"), audit=BY_SPEND) is None
    # ... even one that only looks at enabled keys: it would disable the key again next run.
    assert run(key, SPEND, rule("gone", "expired", "disable", disabled=False), audit=BY_SPEND) is None
    # A delete rule still waiting for its grace blocks too.
    waiting = rule("del", "expired", "delete", grace=timedelta(days=365))
    assert run(key, SPEND, waiting, audit=BY_SPEND) is None


def test_a_key_held_for_reenable_is_not_idle_and_its_idle_clock_restarts_when_given_back() -> None:
    """The reviewer's case: disabled for overspending with ``reenable = true``, then idle while
    held (it cannot be used). Before, ``delete-idle`` disabled-then-deleted it before its window
    reset, and its match kept the reset from re-enabling it. Now no ``unused`` rule finds a held key
    idle, the reset gives it back, and idle counts from the give-back."""
    last_use = OURS - timedelta(hours=1)  # spent its budget, then we disabled it 20 days ago
    delete_idle = rule("delete-idle", "unused", "delete", idle_for=timedelta(days=14), grace=timedelta(days=7))
    held = make_key(disabled=True, updated_at=OURS, usage_monthly=150.0, last_used_at=last_use)
    assert run(held, SPEND, delete_idle, audit=BY_SPEND) is None
    assert coming(held, SPEND, delete_idle, audit=BY_SPEND) is None

    reset = make_key(disabled=True, updated_at=OURS, usage_monthly=0.0, last_used_at=last_use)
    decision = run(reset, SPEND, delete_idle, audit=BY_SPEND)
    assert decision is not None and (decision.action, decision.rule) == ("enable", "spend")

    given_back = AuditFacts("enable", "spend", NOW, key_updated_at=NOW)
    enabled = make_key(disabled=False, updated_at=NOW, usage_monthly=0.0, last_used_at=last_use)
    assert run(enabled, SPEND, delete_idle, audit=given_back) is None
    assert run(enabled, SPEND, delete_idle, audit=given_back, now=NOW + timedelta(days=13)) is None
    later = run(enabled, SPEND, delete_idle, audit=given_back, now=NOW + timedelta(days=14))
    assert later is not None and (later.action, later.rule) == ("disable", "delete-idle")
    assert later.evidence["given_back_at"] == iso(NOW) and later.evidence["idle_since"] == iso(NOW)
    assert coming(enabled, SPEND, delete_idle, audit=given_back) == ("delete-idle", "disable", NOW + 14 * DAY)

    # A person who disabled the held key since takes it out of our hands: idle counts as before.
    theirs = make_key(disabled=True, updated_at=OURS + DAY, usage_monthly=150.0, last_used_at=last_use)
    assert action_of(run(theirs, SPEND, delete_idle, audit=BY_SPEND)) == "delete"


def test_a_key_we_disabled_and_someone_enabled_in_openrouter_is_idle_only_from_then() -> None:
    """Disabled by an overspend rule 20 days ago, enabled again by its owner in OpenRouter today:
    every one of those 20 days it could not be used, yet ``disable-idle`` (14 days) found it idle
    and disabled it again at the next run."""
    last_use = OURS - timedelta(hours=1)
    disable_idle = rule("disable-idle", "unused", "disable", idle_for=timedelta(days=14))
    enabled_today = make_key(disabled=False, updated_at=NOW - timedelta(hours=2), last_used_at=last_use)

    assert run(enabled_today, disable_idle, audit=BY_SPEND) is None
    later = run(enabled_today, disable_idle, audit=BY_SPEND, now=NOW + timedelta(days=14))
    assert later is not None and later.evidence["idle_since"] == iso(NOW - timedelta(hours=2))
    # A key we never changed counts from its last use.
    assert action_of(run(make_key(last_used_at=last_use), disable_idle)) == "disable"


def test_spend_figures_read_before_their_window_began_again_prove_nothing() -> None:
    """A snapshot at 23:50 UTC on Sunday read 5 USD spent today and a daily limit used up; `plan`
    on it after midnight still selected the key, though the API then reported the day's spend back
    at 0: the stale change counted against the caps, and the fresh check skipped it."""
    sunday_late = datetime(2026, 6, 14, 23, 50, tzinfo=UTC)  # NOW is the Monday after, at noon
    spent = make_key(usage_daily=5.0, usage_weekly=5.0, usage_monthly=5.0, observed_at=sunday_late)
    exhausted = make_key(limit=4.0, limit_remaining=0.0, limit_reset="daily", observed_at=sunday_late)
    for window in ("daily", "weekly"):
        over = rule("over", "over_budget", "disable", window=window, threshold_usd=3.0)
        assert action_of(run(spent, over, now=sunday_late + timedelta(minutes=5))) == "disable"
        assert run(spent, over) is None, window
    monthly = rule("over", "over_budget", "disable", window="monthly", threshold_usd=3.0)
    assert action_of(run(spent, monthly)) == "disable"  # the month has not begun again
    limit = rule("limit", "over_budget", "disable", window="daily")
    assert action_of(run(exhausted, limit, now=sunday_late + timedelta(minutes=5))) == "disable"
    assert run(exhausted, limit) is None
    never_resets = make_key(limit=4.0, limit_remaining=0.0, limit_reset=None, observed_at=sunday_late)
    assert action_of(run(never_resets, limit)) == "disable"


def test_a_spend_counter_the_api_left_out_or_sent_null_proves_no_spend_either_way() -> None:
    """A reviewer's repro: the API answered ``usage_monthly: null`` for a key the spend rule had
    disabled; read as 0, it proved the key back under budget and the key was re-enabled while its
    real monthly spend was still over. Unknown now proves nothing: no re-enable, and no disable."""
    for unknown in (None, MISSING):
        key = make_key(disabled=True, updated_at=OURS, usage_monthly=unknown)
        assert key.unknown_counters == {"usage_monthly"}
        assert run(key, SPEND, audit=BY_SPEND) is None
        assert run(make_key(usage_monthly=unknown), rule("spend", "over_budget", "disable", threshold_usd=0.01)) is None
    # Only the counters the rule's window needs count: BYOK ones only where the key counts BYOK.
    byok_unknown = make_key(disabled=True, updated_at=OURS, usage_monthly=0.0, byok_usage_monthly=None)
    assert action_of(run(byok_unknown, SPEND, audit=BY_SPEND)) == "enable"
    counted = make_key(
        disabled=True, updated_at=OURS, usage_monthly=0.0, byok_usage_monthly=None, include_byok_in_limit=True
    )
    assert run(counted, SPEND, audit=BY_SPEND) is None
    assert action_of(run(make_key(disabled=True, updated_at=OURS, usage_daily=None), SPEND, audit=BY_SPEND)) == "enable"


def test_byok_spend_or_a_limit_the_api_left_out_proves_no_key_back_under_budget() -> None:
    """A reviewer's repros: a key that counts BYOK was disabled for its BYOK spend; the API then
    left out (or nulled) ``byok_usage``, or ``include_byok_in_limit``, or a limit rule's ``limit``
    and ``limit_remaining``. Read as 0, false or no limit, each proved the key back under budget,
    and the key, still over, was enabled again."""
    total = rule("total", "over_budget", "disable", window="total", threshold_usd=10.0, reenable=True)
    by_total = AuditFacts("disable", "total", OURS, key_updated_at=OURS)
    for unknown in (None, MISSING):
        left_out = make_key(disabled=True, updated_at=OURS, usage=1.0, byok_usage=unknown, include_byok_in_limit=True)
        assert "byok_usage" in left_out.unknown_counters
        assert run(left_out, total, audit=by_total) is None
        # Whether BYOK counts is unknown: with BYOK spend the two readings differ, so nothing is proven.
        flag = make_key(disabled=True, updated_at=OURS, usage_monthly=0.0, byok_usage_monthly=150.0)
        flag_unknown = make_key(
            disabled=True, updated_at=OURS, usage_monthly=0.0, byok_usage_monthly=150.0, include_byok_in_limit=unknown
        )
        assert action_of(run(flag, SPEND, audit=BY_SPEND)) == "enable"  # known not to count BYOK: under
        assert run(flag_unknown, SPEND, audit=BY_SPEND) is None
        no_byok = make_key(disabled=True, updated_at=OURS, usage_monthly=0.0, include_byok_in_limit=unknown)
        assert action_of(run(no_byok, SPEND, audit=BY_SPEND)) == "enable"  # no BYOK spend: both readings agree
        # What the figures do prove still counts: credits alone over the threshold are over either way.
        over = rule("over", "over_budget", "disable", threshold_usd=100.0)
        credits_over = make_key(usage_monthly=250.0, byok_usage_monthly=5.0, include_byok_in_limit=unknown)
        assert action_of(run(credits_over, over)) == "disable"
        assert run(make_key(usage_monthly=50.0, byok_usage_monthly=60.0, include_byok_in_limit=unknown), over) is None
        over_total = rule("over", "over_budget", "disable", window="total", threshold_usd=100.0)
        total_over = make_key(usage=250.0, byok_usage=unknown, include_byok_in_limit=True)
        assert action_of(run(total_over, over_total)) == "disable"
    limit_rule = rule("lim", "over_budget", "disable", reenable=True)
    by_limit = AuditFacts("disable", "lim", NOW - DAY, key_updated_at=OURS)
    no_limit_said = make_key(disabled=True, updated_at=OURS, limit=MISSING, limit_remaining=MISSING)
    assert run(no_limit_said, limit_rule, audit=by_limit) is None
    assert action_of(run(make_key(disabled=True, updated_at=OURS), limit_rule, audit=by_limit)) == "enable"  # null


def test_a_report_rule_does_not_block_reenable_and_is_listed() -> None:
    key = make_key(disabled=True, updated_at=OURS, usage_monthly=0.0, **EXPIRED)
    decision = run(key, rule("look", "expired", "report"), SPEND, audit=BY_SPEND)
    assert decision is not None
    assert (decision.action, decision.rule, decision.rules) == ("enable", "spend", ("look", "spend"))


def test_reenable_without_threshold_needs_limit_room_or_no_limit() -> None:
    limit_rule = rule("lim", "over_budget", "disable", reenable=True)
    audit = AuditFacts("disable", "lim", NOW - DAY, key_updated_at=OURS)
    assert action_of(
        run(make_key(disabled=True, updated_at=OURS, limit=10.0, limit_remaining=0.01), limit_rule, audit=audit)
    ) == ("enable")
    assert action_of(
        run(make_key(disabled=True, updated_at=OURS, limit=None, limit_remaining=None), limit_rule, audit=audit)
    ) == ("enable")
    assert (
        run(make_key(disabled=True, updated_at=OURS, limit=10.0, limit_remaining=0.0), limit_rule, audit=audit) is None
    )
    # A limit with no known remaining amount proves nothing either way: leave the key disabled.
    assert (
        run(make_key(disabled=True, updated_at=OURS, limit=10.0, limit_remaining=None), limit_rule, audit=audit) is None
    )


def test_a_renamed_rule_no_longer_owns_its_keys() -> None:
    renamed = rule("spend-v2", "over_budget", "disable", threshold_usd=100.0, reenable=True)
    assert run(make_key(disabled=True, updated_at=OURS, usage_monthly=0.0), renamed, audit=BY_SPEND) is None


# --- plan and caps ------------------------------------------------------------------------------


def test_plan_orders_by_hash_and_counts_every_key() -> None:
    keys = [
        make_key(hash="c", **EXPIRED),
        make_key(hash="a", **EXPIRED),
        make_key(hash="b"),
        make_key(hash="d", name="prod-x", **EXPIRED),
    ]
    result = plan(keys, {}, {}, ruleset(rule("exp", "expired", "disable"), protect_names=("prod-*",)), NOW)
    assert [d.key_hash for d in result.decisions] == ["a", "c"]
    assert result.total_keys == 4
    assert result.changes == result.decisions


def test_plan_uses_each_keys_own_history_and_audit() -> None:
    keys = [make_key(hash="a", disabled=True, **EXPIRED), make_key(hash="b", disabled=True, **EXPIRED)]
    histories = {"a": KeyHistory(disabled_since=NOW - timedelta(days=30))}
    audits = {"b": AuditFacts("disable", "del", NOW - DAY)}
    result = plan(keys, histories, audits, ruleset(DELETE), NOW)
    assert [(d.key_hash, d.action) for d in result.decisions] == [("a", "delete")]


def test_plan_refuses_an_inventory_with_a_hash_twice() -> None:
    with pytest.raises(ValueError, match="twice"):
        plan([make_key(hash="a"), make_key(hash="a")], {}, {}, ruleset(), NOW)


def test_plan_evidence_is_json_serialisable() -> None:
    keys = [
        make_key(hash="a", **EXPIRED),
        make_key(hash="b", last_used_at=None),
        make_key(hash="c", disabled=True, updated_at=NOW - timedelta(days=9), **EXPIRED),
        make_key(hash="d", limit=5.0, limit_remaining=0.0),
    ]
    rules = (DELETE, rule("idle", "unused", "report"), over(threshold=None))
    result = plan(keys, {}, {}, ruleset(*rules), NOW)
    assert len(result.decisions) == 4
    json.dumps([dict(d.evidence) for d in result.decisions])


def decisions(count: int, action: str = "disable") -> tuple[Decision, ...]:
    return tuple(
        Decision(f"h{i:04}", f"k{i}", None, action, "r", ("r",), {})  # type: ignore[arg-type]
        for i in range(count)
    )


def test_caps_equal_is_allowed_one_more_is_refused() -> None:
    safety = Safety(max_actions_per_run=50, max_action_percent=100.0)
    assert check_caps(Plan(decisions(50), total_keys=1000), safety) is None
    breach = check_caps(Plan(decisions(51), total_keys=1000), safety)
    assert breach is not None
    assert (breach.planned, breach.total_keys, breach.max_actions_per_run) == (51, 1000, 50)
    assert "max_actions_per_run = 50" in breach.reason


def test_percent_cap_edge() -> None:
    safety = Safety(max_actions_per_run=1000, max_action_percent=10.0)
    assert check_caps(Plan(decisions(3), total_keys=30), safety) is None
    breach = check_caps(Plan(decisions(4), total_keys=30), safety)
    assert breach is not None
    assert "max_action_percent = 10%" in breach.reason


def test_percent_cap_is_exact_for_decimal_percentages() -> None:
    safety = Safety(max_actions_per_run=1000, max_action_percent=0.3)
    assert check_caps(Plan(decisions(3), total_keys=1000), safety) is None
    assert check_caps(Plan(decisions(4), total_keys=1000), safety) is not None


def test_reports_do_not_count_against_the_caps_but_enables_do() -> None:
    safety = Safety(max_actions_per_run=1, max_action_percent=100.0)
    assert check_caps(Plan(decisions(5, "report"), total_keys=5), safety) is None
    assert check_caps(Plan(decisions(2, "enable"), total_keys=5), safety) is not None


def test_allow_actions_replaces_both_caps_up_to_its_count() -> None:
    safety = Safety(max_actions_per_run=5, max_action_percent=1.0)
    assert check_caps(Plan(decisions(60), total_keys=100), safety, allow_actions=60) is None
    breach = check_caps(Plan(decisions(61), total_keys=100), safety, allow_actions=60)
    assert breach is not None and breach.allow_actions == 60
    assert breach.reason == "61 planned changes exceed --allow-actions 60"


def test_empty_plan_is_within_caps() -> None:
    assert check_caps(Plan((), total_keys=0), Safety()) is None


def test_both_caps_are_reported() -> None:
    breach = check_caps(Plan(decisions(6), total_keys=10), Safety(max_actions_per_run=5, max_action_percent=50))
    assert breach is not None
    assert "max_actions_per_run" in breach.reason
    assert "max_action_percent" in breach.reason


# --- next_action ----------------------------------------------------------------------------------


def coming(
    key: KeyFacts, *rules: Rule, audit: AuditFacts | None = None, **safety: Any
) -> tuple[str, str, datetime] | None:
    found = next_action(key, KeyHistory(), audit or AuditFacts(), ruleset(*rules, **safety), NOW)
    return None if found is None else (found.decision.rule, found.decision.action, found.due)


def test_next_action_for_an_idle_rule_is_when_idle_for_is_reached() -> None:
    key = make_key(last_used_at=NOW - timedelta(days=10))
    assert coming(key, rule("idle", "unused", "disable")) == ("idle", "disable", NOW + timedelta(days=20))


def test_next_action_of_an_idle_delete_rule_is_the_disable_first() -> None:
    key = make_key(last_used_at=NOW - timedelta(days=10))
    assert coming(key, rule("idle", "unused", "delete", grace=GRACE)) == ("idle", "disable", NOW + timedelta(days=20))


def test_next_action_when_grace_ends_on_a_disabled_key() -> None:
    key = make_key(disabled=True, updated_at=NOW - timedelta(days=2), **EXPIRED)
    assert coming(key, DELETE) == ("del", "delete", NOW + timedelta(days=5))


def test_next_action_due_already_is_now_and_is_the_plans_decision() -> None:
    key = make_key(last_used_at=NOW - timedelta(days=90), usage_monthly=150.0)
    rules = (rule("idle", "unused", "report"), rule("spend", "over_budget", "disable", threshold_usd=100.0))
    found = next_action(key, KeyHistory(), AuditFacts(), ruleset(*rules), NOW)
    assert found is not None
    assert found.due == NOW
    assert found.decision == decide(key, KeyHistory(), AuditFacts(), ruleset(*rules), NOW)
    assert (found.decision.rule, found.decision.action) == ("spend", "disable")


def test_next_action_is_one_per_key_with_the_strongest_action_of_the_rules_due_then() -> None:
    key = make_key(last_used_at=NOW - timedelta(days=10))
    rules = (
        rule("see", "unused", "report"),
        rule("idle", "unused", "disable"),
        rule("wipe", "unused", "delete", grace=timedelta(0)),
    )
    assert coming(key, *rules) == ("wipe", "delete", NOW + timedelta(days=20))


def test_next_action_covers_a_future_expiry_and_a_spent_limit() -> None:
    expiring = make_key(expires_at=NOW + timedelta(days=3))
    assert coming(expiring, rule("exp", "expired", "disable")) == ("exp", "disable", NOW + timedelta(days=3))
    spent = make_key(limit=10.0, limit_remaining=0.0)
    assert coming(spent, rule("cap", "over_budget", "disable")) == ("cap", "disable", NOW)


def test_next_action_respects_min_age_and_key_age() -> None:
    key = make_key(created_at=NOW - timedelta(days=5), last_used_at=None, usage=0.0)  # never used
    assert coming(key, rule("idle", "unused", "report", min_age=timedelta(days=60))) == (
        "idle",
        "report",
        NOW + timedelta(days=55),
    )


def test_next_action_is_none_for_protected_keys_or_without_a_source() -> None:
    idle = rule("idle", "unused", "report")
    assert coming(make_key(name="prod-a", last_used_at=None), idle, protect_names=("prod-*",)) is None
    assert coming(make_key(last_used_at=MISSING), idle) is None


def test_next_action_skips_a_disable_rule_on_a_disabled_key() -> None:
    key = make_key(disabled=True, last_used_at=NOW - timedelta(days=10))
    assert coming(key, rule("idle", "unused", "disable")) is None


def test_money_is_compared_exactly() -> None:
    # 0.1 + 0.2 is 0.30000000000000004 in floats: a float engine would call this key over a 0.3 budget.
    key = make_key(usage_monthly=0.1, byok_usage_monthly=0.2, include_byok_in_limit=True)
    assert key.spend_range("monthly") == (Decimal("0.3"), Decimal("0.3"))
    over = rule("spend", "over_budget", "report", threshold_usd=0.3)
    assert action_of(run(key, over)) == "report"
    assert run(key, rule("spend", "over_budget", "report", threshold_usd=0.30000000000000004)) is None


# --- time handling ------------------------------------------------------------------------------


def test_naive_now_and_history_times_are_read_as_utc() -> None:
    naive_now = NOW.replace(tzinfo=None)
    key = make_key(last_used_at=MISSING)
    history = KeyHistory(usage_unchanged_since=(NOW - D).replace(tzinfo=None))
    assert action_of(run(key, IDLE, history=history, now=naive_now)) == "report"
