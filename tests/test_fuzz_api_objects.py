"""Fuzzing the API's key objects: a field of the wrong type, missing, huge, negative, not finite, or a
timestamp that is odd is either rejected (MalformedResponse: the sync stores nothing) or read as
exactly what it says. The engine never reads garbage as "unused" or "expired": only a key whose
``expires_at`` says a past time is expired, and only a key whose ``last_used_at`` says "not since"
(an old time, or null: no use recorded) is unused."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from keyhygiene.enforcement import key_facts
from keyhygiene.keysapi.errors import MalformedResponse
from keyhygiene.keysapi.models import Key
from keyhygiene.rules import AuditFacts, KeyHistory, decide, next_action, parse_rules
from keyhygiene.timeutil import parse_time

NOW = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)
IDLE_FOR = timedelta(days=7)
RULES = parse_rules(
    """
[[rule]]
name = "delete-expired"
match = "expired"
action = "delete"
grace = "0d"

[[rule]]
name = "disable-idle"
match = "unused"
idle_for = "7d"
action = "disable"

[[rule]]
name = "report-over-budget"
match = "over_budget"
window = "monthly"
threshold_usd = 100
action = "report"
"""
)
# A key in use, young enough and not expiring: nothing applies to it as it is.
HEALTHY: dict[str, Any] = {
    "hash": "h1",
    "name": "svc",
    "label": "sk-or-v1-abc...",
    "disabled": False,
    "limit": 50.0,
    "limit_remaining": 40.0,
    "usage": 10.0,
    "usage_daily": 1.0,
    "usage_weekly": 5.0,
    "usage_monthly": 10.0,
    "byok_usage": 0.0,
    "created_at": "2026-05-01T00:00:00Z",
    "updated_at": None,
    "expires_at": None,
    "last_used_at": "2026-06-15T11:00:00Z",
    "workspace_id": "ws-1",
}

odd_times = st.one_of(
    st.sampled_from(
        [
            "0001-01-01T00:00:00Z",
            "0001-01-01T00:00:00+14:00",
            "9999-12-31T23:59:59-14:00",
            "9999-12-31T23:59:59Z",
            "1970-01-01T00:00:00Z",
            "1969-12-31T23:59:59Z",
            "2026-06-15T12:00:00Z",
            "2026-06-08T12:00:00Z",
            "2026-06-08T12:00:01+00:00",
            "2026-02-30T00:00:00Z",
            "2026-06-15",
            "yesterday",
            "",
        ]
    ),
    st.datetimes(timezones=st.timezones()).map(lambda value: value.isoformat()),
)
odd_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    odd_times,
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
FIELDS = sorted({*HEALTHY, "include_byok_in_limit", "byok_usage_monthly"})
# A change is a field set to an odd value, or removed (Ellipsis marks "remove the field").
changes = st.dictionaries(st.sampled_from(FIELDS), st.one_of(odd_values, st.just(Ellipsis)), min_size=1, max_size=3)


def _said_expired(raw: dict[str, Any]) -> bool:
    value = raw.get("expires_at")
    return isinstance(value, str) and bool(value) and parse_time(value) <= NOW


def _said_unused(raw: dict[str, Any]) -> bool:
    if "last_used_at" not in raw:
        return False  # no source of idleness at all: never unused
    value = raw["last_used_at"]
    return value is None or value == "" or parse_time(value) <= NOW - IDLE_FOR


@settings(max_examples=300, deadline=None)
@given(change=changes)
def test_odd_key_objects_are_rejected_or_read_as_they_say(change: dict[str, Any]) -> None:
    raw = dict(HEALTHY)
    for field, value in change.items():
        if value is Ellipsis:
            raw.pop(field, None)
        else:
            raw[field] = value
    # The API's JSON, as the client reads it (Python's reader also accepts NaN and Infinity).
    raw = json.loads(json.dumps(raw))

    try:
        key = Key.from_api(raw)
    except MalformedResponse:
        return  # rejected explicitly: the sync fails and stores nothing

    facts = key_facts(key, NOW)
    decision = decide(facts, KeyHistory(), AuditFacts(), RULES, NOW)
    next_action(facts, KeyHistory(), AuditFacts(), RULES, NOW)  # and the dates a rule acts on never overflow
    rules = set() if decision is None else set(decision.rules)
    if "delete-expired" in rules:
        assert _said_expired(raw), raw
    if "disable-idle" in rules:
        assert _said_unused(raw), raw
    if not _said_expired(raw) and not _said_unused(raw):
        assert not rules & {"delete-expired", "disable-idle"}, (raw, decision)


def test_non_finite_and_overflowing_numbers_are_rejected() -> None:
    for value in (float("nan"), float("inf"), 10**400):
        try:
            Key.from_api({**HEALTHY, "usage_monthly": value})
        except MalformedResponse as exc:
            assert "usage_monthly" in str(exc) and "finite" in str(exc)
        else:
            raise AssertionError(f"{value!r} was accepted")
