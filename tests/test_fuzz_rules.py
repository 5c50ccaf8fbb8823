"""Fuzzing the rules file through the real command: whatever is written in it, `rules check` either
accepts it (and the engine can then plan with it, whatever the keys' times) or exits 2 with one line
naming the file, the line and the field; never a traceback, never a later crash."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from keyhygiene.enforcement import key_facts
from keyhygiene.keysapi.models import Key
from keyhygiene.rules import AuditFacts, KeyHistory, RulesError, load_rules, next_action, plan
from keyhygiene.rules.loader import NOTIFY_KEYS, RULE_KEYS, SAFETY_KEYS
from keyhygiene.timeutil import EARLIEST_TIME, LATEST_TIME
from tests.conftest import _invoke, failure_lines

EXAMPLES = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Every option the loader knows, and one it does not.
RULE_FIELDS = [*RULE_KEYS, "unknown_option"]
SAFETY_FIELDS = [*SAFETY_KEYS, "typo"]
NOTIFY_FIELDS = list(NOTIFY_KEYS)

durations = st.one_of(
    st.builds(lambda n, unit: f"{n}{unit}", st.integers(-5, 10**20), st.sampled_from("smhdwy")),
    st.sampled_from(["0d", "36500d", "36501d", "5214w", "99999999d", "9999999999999w", "7 days", "", " 3d "]),
)
words = st.sampled_from(
    ["expired", "unused", "over_budget", "disable", "delete", "report", "daily", "monthly", "total", "json", "done"]
)
scalars = st.one_of(
    durations,
    words,
    st.text(max_size=12),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
)
values = st.one_of(scalars, st.lists(st.one_of(words, st.text(max_size=6), st.integers()), max_size=3))


def _toml(value: Any) -> str:
    """A TOML literal for ``value`` (json covers strings, ints, bools and lists of them)."""
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return json.dumps(value)


def _table(header: str, fields: dict[str, Any]) -> str:
    return header + "\n" + "".join(f"{name} = {_toml(value)}\n" for name, value in fields.items())


def _fields(names: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(names), values, max_size=len(names))


# Mostly well-formed rules with one or more odd values, so that checks deep in the loader are reached.
base_rule = st.fixed_dictionaries(
    {"name": st.sampled_from(["a", "b"]), "match": words, "action": words},
    optional={"idle_for": durations, "window": words, "grace": durations, "min_age": durations},
)
rules_files = st.builds(
    lambda safety, rules, notify: "".join(
        [
            _table("[safety]", safety) if safety is not None else "",
            *(_table("[[rule]]", {**base, **extra}) for base, extra in rules),
            *(_table("[[notify]]", target) for target in notify),
        ]
    ),
    st.none() | _fields(SAFETY_FIELDS),
    st.lists(st.tuples(base_rule, _fields(RULE_FIELDS)), max_size=3),
    st.lists(_fields(NOTIFY_FIELDS), max_size=1),
)
# And raw text: syntax errors, odd bytes, tables in the wrong place.
raw_files = st.text(alphabet=st.sampled_from(list("[]=\"'\n #.,{}rulesafty_01dnm\x00\x1b")), max_size=80)

NOW = datetime(2026, 6, 15, tzinfo=UTC)
# Keys at the ends of the time range the API may give, where an unchecked duration would overflow.
KEYS = [
    Key.from_api({"hash": "early", "name": "a", "created_at": "1970-01-01T00:00:00Z", "last_used_at": None}),
    Key.from_api(
        {
            "hash": "late",
            "name": "b",
            "created_at": (LATEST_TIME - timedelta(seconds=1)).isoformat(),
            "expires_at": EARLIEST_TIME.isoformat(),
            "last_used_at": (LATEST_TIME - timedelta(seconds=1)).isoformat(),
            "disabled": True,
        }
    ),
]


def _check(text: str, cli: Callable[..., Any]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "rules.toml"
        path.write_text(text, encoding="utf-8")
        result = cli("rules", "check", str(path))
        try:
            ruleset = load_rules(path)
        except RulesError as exc:
            error: RulesError | None = exc
        else:
            error = None

    assert "Traceback" not in result.stderr
    if error is None:
        assert result.exit_code == 0, result.stderr
        # Accepted: the engine plans with it at both ends of time, without overflow.
        for now in (NOW, KEYS[1].created_at):
            facts = [key_facts(key, now) for key in KEYS]
            plan(facts, {}, {}, ruleset, now)
            for key in facts:
                next_action(key, KeyHistory(), AuditFacts(), ruleset, now)
        return
    assert result.exit_code == 2
    lines = failure_lines(result.stderr)
    assert len(lines) == 1 and lines[0] == f"keyhygiene: error: {error}", result.stderr
    assert error.line is not None, str(error)  # every mistake in the text has a line
    if not error.message.startswith(("invalid TOML", "the file is not UTF-8")):
        assert error.field is not None, str(error)  # ... and, once it parses, a field


@EXAMPLES
@given(text=rules_files)
@example(text='[[rule]]\nname = "0\\r"\nmatch = "expired"\naction = "expired"\n')  # a name with a CR: one line
def test_every_generated_rules_file_is_accepted_or_refused_with_file_line_and_field(text: str) -> None:
    _check(text, lambda *args: _invoke(list(args)))


@EXAMPLES
@given(text=raw_files)
def test_every_raw_text_is_accepted_or_refused_with_a_line(text: str) -> None:
    _check(text, lambda *args: _invoke(list(args)))
