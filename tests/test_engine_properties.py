"""Invariants of the rules engine that must never break, on random inventories, histories, audits
and rule sets."""

from __future__ import annotations

import unicodedata
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fnmatch import fnmatchcase
from fractions import Fraction
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

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
    is_protected,
    next_action,
    plan,
)

NOW = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)
NAMES = ["prod-api", "prod-web", "dev-a", "dev-b", "ci-1", "Prod-x", "misc", ""]
HASHES = [f"h{i:02}" for i in range(12)]
WORKSPACES = ["ws-1", "ws-2", None]
RULE_NAMES = [f"rule-{i}" for i in range(5)]

EXAMPLES = settings(max_examples=200, deadline=None)

# Offsets around the durations the rules use, so that edges (exactly D, D - 1s) come up often.
offsets = st.one_of(
    st.sampled_from([0, 1, -1, 7 * 86400, 7 * 86400 - 1, 30 * 86400, 30 * 86400 - 1, 365 * 86400]),
    st.integers(min_value=-400 * 86400, max_value=10 * 86400),
)
past_times = offsets.map(lambda seconds: NOW - timedelta(seconds=seconds))
optional_times = st.none() | past_times
money = st.sampled_from([0.0, 5.0, 99.99, 100.0, 100.01, 1000.0])
durations = st.sampled_from([timedelta(0), timedelta(hours=1), timedelta(days=7), timedelta(days=30)])


def iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


@st.composite
def keys(draw: st.DrawFn, key_hash: str) -> KeyFacts:
    data: dict[str, Any] = {
        "hash": key_hash,
        "name": draw(st.sampled_from(NAMES)),
        "label": "sk-or-v1-...",
        "disabled": draw(st.booleans()),
        "include_byok_in_limit": draw(st.booleans()),
        "created_at": iso(draw(past_times)),
        "workspace_id": draw(st.sampled_from(WORKSPACES)),
    }
    for field in ("usage", "usage_daily", "usage_weekly", "usage_monthly"):
        data[field] = draw(money)
        data[f"byok_{field}"] = draw(money)
    limit = draw(st.none() | money)
    data["limit"] = limit
    data["limit_remaining"] = None if limit is None else draw(st.sampled_from([-1.0, 0.0, 0.01, limit]))
    for field in ("updated_at", "expires_at"):
        value = draw(optional_times)
        data[field] = None if value is None else iso(value)
    if draw(st.booleans()):  # older API versions leave last_used_at out altogether
        value = draw(optional_times)
        data["last_used_at"] = None if value is None else iso(value)
    return key_facts(Key.from_api(data), NOW)


@st.composite
def inventories(draw: st.DrawFn) -> list[KeyFacts]:
    hashes = draw(st.lists(st.sampled_from(HASHES), unique=True, max_size=8))
    return [draw(keys(key_hash)) for key_hash in hashes]


histories = st.builds(
    KeyHistory, first_seen_at=optional_times, usage_unchanged_since=optional_times, disabled_since=optional_times
)
audits = st.builds(
    AuditFacts,
    last_change=st.sampled_from([None, "disable", "enable", "delete"]),
    last_change_rule=st.sampled_from([None, "ghost", *RULE_NAMES]),
    last_change_at=optional_times,
)


@st.composite
def rules(draw: st.DrawFn, name: str, actions: tuple[str, ...] = ("disable", "delete", "report")) -> Rule:
    match = draw(st.sampled_from(["expired", "unused", "over_budget"]))
    action = draw(st.sampled_from(actions))
    options: dict[str, Any] = {}
    if action == "delete":
        options["grace"] = draw(durations)
    if match == "unused":
        options["idle_for"] = draw(st.sampled_from([timedelta(days=7), timedelta(days=30)]))
    if match == "over_budget":
        options["window"] = draw(st.sampled_from(["daily", "weekly", "monthly", "total"]))
        options["threshold_usd"] = draw(st.none() | st.sampled_from([5.0, 100.0]))
        if action == "disable":
            options["reenable"] = draw(st.booleans())
    if draw(st.booleans()):
        options["names"] = tuple(draw(st.lists(st.sampled_from(["dev-*", "prod-*", "*", "ci-?"]), max_size=2)))
        options["exclude_names"] = tuple(draw(st.lists(st.sampled_from(["dev-b", "*-x"]), max_size=1)))
        options["workspaces"] = tuple(draw(st.lists(st.sampled_from(["ws-1", "ws-2"]), max_size=1)))
        options["min_age"] = draw(st.none() | durations)
        options["disabled"] = draw(st.none() | st.booleans())
    return Rule(name=name, match=match, action=action, **options)  # type: ignore[arg-type]


safeties = st.builds(
    Safety,
    dry_run=st.booleans(),
    protect_hashes=st.lists(st.sampled_from(HASHES), max_size=3).map(tuple),
    protect_names=st.lists(st.sampled_from(["prod-*", "ci-?", "misc", "*-x"]), max_size=2).map(tuple),
)


@st.composite
def rulesets(draw: st.DrawFn, actions: tuple[str, ...] = ("disable", "delete", "report")) -> RuleSet:
    count = draw(st.integers(min_value=0, max_value=len(RULE_NAMES)))
    chosen = [draw(rules(RULE_NAMES[i], actions)) for i in range(count)]
    if chosen and "disable" in actions and draw(st.booleans()):
        # Rules with reenable = true are rare by chance; make one in half the rule sets.
        at = draw(st.integers(min_value=0, max_value=len(chosen) - 1))
        chosen[at] = Rule(
            name=chosen[at].name,
            match="over_budget",
            action="disable",
            window=draw(st.sampled_from(["daily", "weekly", "monthly", "total"])),
            threshold_usd=draw(st.none() | st.sampled_from([5.0, 100.0])),
            reenable=True,
            disabled=draw(st.none() | st.booleans()),
        )
    return RuleSet(safety=draw(safeties), rules=tuple(chosen), source="random.toml")


@st.composite
def worlds(
    draw: st.DrawFn, actions: tuple[str, ...] = ("disable", "delete", "report")
) -> tuple[list[KeyFacts], dict[str, KeyHistory], dict[str, AuditFacts], RuleSet]:
    ruleset = draw(rulesets(actions))
    inventory = draw(inventories())
    # Audits that name a rule with reenable = true, so that re-enabling is exercised, not just possible.
    reenablers = [rule.name for rule in ruleset.rules if rule.reenable] or RULE_NAMES
    owned = st.builds(
        AuditFacts,
        last_change=st.just("disable"),
        last_change_rule=st.sampled_from(reenablers),
        last_change_at=optional_times,
    )
    hashes = [key.hash for key in inventory]
    history_map = {h: draw(histories) for h in hashes if draw(st.booleans())}
    audit_map = {h: draw(audits | owned) for h in hashes if draw(st.booleans())}
    return inventory, history_map, audit_map, ruleset


World = tuple[list[KeyFacts], dict[str, KeyHistory], dict[str, AuditFacts], RuleSet]


def decided(world: World) -> list[tuple[KeyFacts, Decision]]:
    inventory, history_map, audit_map, ruleset = world
    by_hash = {key.hash: key for key in inventory}
    return [(by_hash[d.key_hash], d) for d in plan(inventory, history_map, audit_map, ruleset, NOW).decisions]


@EXAMPLES
@given(worlds())
def test_a_protected_key_is_never_decided_upon(world: World) -> None:
    for key, _ in decided(world):
        assert not is_protected(key, world[3].safety)


@EXAMPLES
@given(worlds())
def test_an_enabled_key_is_deleted_only_by_a_rule_with_zero_grace(world: World) -> None:
    ruleset = world[3]
    for key, decision in decided(world):
        if decision.action == "delete" and not key.disabled:
            deciding = ruleset.rule(decision.rule)
            assert deciding is not None
            assert deciding.action == "delete"
            assert deciding.grace == timedelta(0)


@EXAMPLES
@given(worlds())
def test_a_disabled_key_is_deleted_only_after_its_grace(world: World) -> None:
    ruleset = world[3]
    for key, decision in decided(world):
        if decision.action == "delete" and key.disabled:
            deciding = ruleset.rule(decision.rule)
            assert deciding is not None
            if deciding.grace > timedelta(0):
                since = datetime.fromisoformat(decision.evidence["disabled_since"])
                assert NOW - since >= deciding.grace


@EXAMPLES
@given(worlds())
def test_enable_only_for_a_key_this_same_rule_disabled(world: World) -> None:
    _, _, audit_map, ruleset = world
    for key, decision in decided(world):
        if decision.action == "enable":
            audit = audit_map[key.hash]
            assert audit.last_change == "disable"
            assert audit.last_change_rule == decision.rule
            deciding = ruleset.rule(decision.rule)
            assert deciding is not None
            assert deciding.reenable
            assert key.disabled


@EXAMPLES
@given(worlds(actions=("report",)))
def test_a_report_only_rule_set_never_changes_a_key(world: World) -> None:
    inventory, history_map, audit_map, ruleset = world
    result = plan(inventory, history_map, audit_map, ruleset, NOW)
    assert result.changes == ()
    assert all(d.action == "report" for d in result.decisions)


@EXAMPLES
@given(worlds(), st.randoms(use_true_random=False))
def test_plan_is_deterministic_and_independent_of_input_order(world: World, random: Any) -> None:
    inventory, history_map, audit_map, ruleset = world
    first = plan(inventory, history_map, audit_map, ruleset, NOW)
    shuffled = list(inventory)
    random.shuffle(shuffled)
    reordered_histories = dict(reversed(list(history_map.items())))
    reordered_audits = dict(reversed(list(audit_map.items())))
    again = plan(shuffled, reordered_histories, reordered_audits, ruleset, NOW)
    assert again == first
    assert [d.key_hash for d in first.decisions] == sorted({d.key_hash for d in first.decisions})
    assert first.total_keys == len(inventory)


@EXAMPLES
@given(worlds())
def test_plan_is_decide_per_key_and_names_the_deciding_rule(world: World) -> None:
    inventory, history_map, audit_map, ruleset = world
    result = {d.key_hash: d for d in plan(inventory, history_map, audit_map, ruleset, NOW).decisions}
    for key in inventory:
        decision = decide(
            key, history_map.get(key.hash, KeyHistory()), audit_map.get(key.hash, AuditFacts()), ruleset, NOW
        )
        assert result.get(key.hash) == decision
        if decision is not None:
            assert decision.rule in decision.rules
            order = [rule.name for rule in ruleset.rules]
            assert list(decision.rules) == sorted(decision.rules, key=order.index)


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    actions = draw(st.lists(st.sampled_from(["disable", "delete", "enable", "report"]), max_size=120))
    extra = draw(st.integers(min_value=0, max_value=200))
    made = tuple(
        Decision(f"h{i:04}", f"k{i}", None, action, "r", ("r",), {})  # type: ignore[arg-type]
        for i, action in enumerate(actions)
    )
    return Plan(decisions=made, total_keys=len(made) + extra)


caps = st.builds(
    Safety,
    max_actions_per_run=st.integers(min_value=1, max_value=150),
    max_action_percent=st.decimals(min_value=Decimal("0.01"), max_value=100, places=2).map(float),
)


@EXAMPLES
@given(plans(), caps)
def test_check_caps_breaches_iff_a_cap_is_exceeded(planned_plan: Plan, safety: Safety) -> None:
    changes = sum(1 for d in planned_plan.decisions if d.action != "report")
    total = planned_plan.total_keys
    over_count = changes > safety.max_actions_per_run
    over_share = changes > 0 and Fraction(changes * 100, total) > Fraction(str(safety.max_action_percent))
    breach = check_caps(planned_plan, safety)
    assert (breach is not None) == (over_count or over_share)
    if breach is not None:
        assert breach.planned == changes
        assert breach.total_keys == total


RECORDING_START = datetime(2026, 1, 1, tzinfo=UTC)


@st.composite
def unused_histories(draw: st.DrawFn) -> KeyHistory:
    first_seen = draw(optional_times)
    # Often the same time: usage never changed while we watched.
    unchanged = first_seen if first_seen is not None and draw(st.booleans()) else draw(optional_times)
    return KeyHistory(first_seen_at=first_seen, usage_unchanged_since=unchanged)


@EXAMPLES
@given(
    keys("h00"),
    unused_histories(),
    st.sampled_from([timedelta(days=7), timedelta(days=30)]),
    st.sampled_from([NOW, datetime(2026, 1, 20, tzinfo=UTC), datetime(2026, 1, 31, tzinfo=UTC)]),
)
def test_unused_is_the_documented_reading_of_both_sources(
    key: KeyFacts, history: KeyHistory, idle_for: timedelta, now: datetime
) -> None:
    key = replace(key, observed_at=now)  # the counters as the API gave them now
    cutoff = now - idle_for
    used_inside = False
    shows_idle = False
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    window_starts = {"daily": day, "weekly": day - timedelta(days=day.weekday()), "monthly": day.replace(day=1)}
    for window, began in window_starts.items():
        spent = getattr(key, f"usage_{window}") > 0 or getattr(key, f"byok_usage_{window}") > 0
        if spent and began > cutoff:
            used_inside = True  # spent in a window that began inside D
    if key.reports_last_used:
        if key.last_used_at is None:
            shows_idle = cutoff >= RECORDING_START
        elif key.last_used_at > cutoff:
            used_inside = True
        else:
            shows_idle = True
    unchanged = history.usage_unchanged_since
    if unchanged is not None:
        seen_to_change = history.first_seen_at is None or unchanged > history.first_seen_at
        if seen_to_change and unchanged > cutoff:
            used_inside = True
        elif unchanged <= cutoff:
            shows_idle = True
    expected = now - key.created_at >= idle_for and not used_inside and shows_idle

    only_rule = Rule(name="idle", match="unused", action="report", idle_for=idle_for)
    decision = decide(key, history, AuditFacts(), RuleSet(Safety(), (only_rule,), "x"), now)
    assert (decision is not None) == expected


@EXAMPLES
@given(worlds(), st.lists(st.integers(min_value=1, max_value=999), min_size=1, max_size=5))
def test_next_action_is_the_plan_now_and_the_first_decision_later(world: World, fractions: list[int]) -> None:
    inventory, history_map, audit_map, ruleset = world
    for key in inventory:
        history, audit = history_map.get(key.hash, KeyHistory()), audit_map.get(key.hash, AuditFacts())
        now_decision = decide(key, history, audit, ruleset, NOW)
        found = next_action(key, history, audit, ruleset, NOW)
        if now_decision is not None:
            assert found is not None and found.due == NOW and found.decision == now_decision
            continue
        if found is None:  # then no rule ever acts on the key as it stands
            assert decide(key, history, audit, ruleset, NOW + timedelta(days=3650)) is None
            continue
        assert found.due > NOW
        assert decide(key, history, audit, ruleset, found.due) == found.decision
        for fraction in fractions:  # nothing happens before it is due
            before = NOW + (found.due - NOW) * fraction / 1000
            assert decide(key, history, audit, ruleset, before) is None


GLOB_PARTS = st.sampled_from(["*", "?", "[a-c]", "[!x]", "prod", "-", ".", "+", "(", "\\", "$", "é", "e\u0301", "\n"])
NAME_PARTS = st.sampled_from(["prod", "-", "a", "x", ".", "+", "(", "\\", "$", "é", "e\u0301", "\n", " ", "[", "]"])
EXPIRED = key_facts(
    Key.from_api(
        {
            "hash": "h1",
            "name": "",
            "created_at": iso(NOW - timedelta(days=90)),
            "expires_at": iso(NOW - timedelta(days=1)),
        }
    ),
    NOW,
)


@EXAMPLES
@given(
    patterns=st.lists(st.lists(GLOB_PARTS, max_size=4).map("".join), min_size=1, max_size=3).map(tuple),
    name=st.lists(NAME_PARTS, max_size=5).map("".join),
)
def test_name_globs_match_exactly_as_fnmatchcase(patterns: tuple[str, ...], name: str) -> None:
    """protect_names, names and exclude_names read each entry as ``fnmatch.fnmatchcase`` does, or as
    the exact name; in Unicode NFC, the name also with its surrounding white space trimmed."""
    key = replace(EXPIRED, name=name)
    normal = [unicodedata.normalize("NFC", pattern) for pattern in patterns]
    variants = {name, unicodedata.normalize("NFC", name), unicodedata.normalize("NFC", name).strip()}
    expected = any(fnmatchcase(variant, pattern) or variant == pattern for variant in variants for pattern in normal)
    assert is_protected(key, Safety(protect_names=patterns)) is expected
    for scope, acts in (({"names": patterns}, expected), ({"exclude_names": patterns}, not expected)):
        rule = Rule(name="r", match="expired", action="report", **scope)
        assert (decide(key, KeyHistory(), AuditFacts(), RuleSet(Safety(), (rule,), "x"), NOW) is not None) is acts
