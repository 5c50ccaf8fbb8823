"""The rules file: what parses, what it means, and that every mistake names file, line and field."""

from __future__ import annotations

import pickle
import re
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from keyhygiene.rules import NotifyTarget, Rule, RulesError, RuleSet, Safety, describe, load_rules, parse_rules

# The public interface document, where the checkout sits beside it (as in development and CI).
INTERFACE = Path(__file__).resolve().parents[2] / "shared" / "interface.md"

FULL_EXAMPLE = """\
[safety]
dry_run = true                 # default true: nothing is changed until an operator sets false
max_actions_per_run = 50       # more planned changes than this: the whole enforcement is refused
max_action_percent = 10        # ... or more than this percent of all keys
protect_hashes = []            # never touched
protect_names = ["prod-*"]     # glob patterns on the key name; never touched

[[rule]]
name = "delete-expired"        # unique; appears in logs and the audit log
match = "expired"              # expired | unused | over_budget
action = "delete"              # disable | delete | report
grace = "7d"                   # delete only: the key must have been disabled this long first

[[rule]]
name = "disable-idle"
match = "unused"
idle_for = "30d"               # unused: no new usage for this long
action = "disable"

[[rule]]
name = "disable-overspend"
match = "over_budget"
window = "monthly"             # daily | weekly | monthly | total
threshold_usd = 100.0          # omitted: the key's own limit is exhausted (limit_remaining <= 0)
action = "disable"
reenable = true                # re-enable, when the window resets, keys this rule disabled

# Optional filters on any rule: names = ["dev-*"], exclude_names = [...],
# workspaces = ["<workspace id or name>"], min_age = "7d", disabled = true|false
# An empty list is an error (it would otherwise read as "no filter").

[[notify]]                     # optional, any number
name = "ops"
url_env = "KEYHYGIENE_OPS_WEBHOOK"   # the webhook URL is a secret: read from this variable
format = "slack"               # slack (incoming-webhook text) | json (the payload below)
secret_env = "KEYHYGIENE_OPS_SECRET" # json only, optional: HMAC-SHA256 of the body in X-Keyhygiene-Signature
on = ["failed", "refused", "done", "upcoming"]
upcoming_within = "7d"         # "upcoming": keys a rule will act on within this, announced once each
"""

EXPECTED_FULL = RuleSet(
    safety=Safety(
        dry_run=True,
        max_actions_per_run=50,
        max_action_percent=10.0,
        protect_hashes=(),
        protect_names=("prod-*",),
    ),
    rules=(
        Rule(name="delete-expired", match="expired", action="delete", grace=timedelta(days=7)),
        Rule(name="disable-idle", match="unused", action="disable", idle_for=timedelta(days=30)),
        Rule(
            name="disable-overspend",
            match="over_budget",
            action="disable",
            window="monthly",
            threshold_usd=100.0,
            reenable=True,
        ),
    ),
    source="keyhygiene.toml",
    notify=(
        NotifyTarget(
            name="ops",
            url_env="KEYHYGIENE_OPS_WEBHOOK",
            format="slack",  # its secret_env does nothing: json only (a warning says so)
            on=frozenset({"failed", "refused", "done", "upcoming"}),
            upcoming_within=timedelta(days=7),
        ),
    ),
)


def rules_error(text: str) -> RulesError:
    with pytest.raises(RulesError) as caught:
        parse_rules(textwrap.dedent(text), "rules.toml")
    return caught.value


def assert_error(text: str, line: int | None, field: str | None, *words: str) -> RulesError:
    error = rules_error(text)
    assert (error.path, error.line, error.field) == ("rules.toml", line, field), str(error)
    where = "rules.toml" if line is None else f"rules.toml:{line}"
    prefix = f"{where}: " if field is None else f"{where}: {field}: "
    assert str(error).startswith(prefix), str(error)
    for word in words:
        assert word in error.message, str(error)
    return error


# --- valid files --------------------------------------------------------------------------------


def test_the_example_in_interface_md_parses_as_documented() -> None:
    if INTERFACE.exists():  # keep the test honest with the document users read
        block = re.search(r"```toml\n(.*?)```", INTERFACE.read_text(), re.S)
        assert block is not None
        assert block.group(1) == FULL_EXAMPLE
    parsed = parse_rules(FULL_EXAMPLE, "keyhygiene.toml")
    assert parsed == EXPECTED_FULL
    assert [str(warning) for warning in parsed.warnings] == [
        "keyhygiene.toml:36: secret_env: has no effect: only json targets are signed, and this one is slack"
    ]


def test_load_rules_reads_a_file_and_names_it_as_the_source(tmp_path: Path) -> None:
    path = tmp_path / "keyhygiene.toml"
    path.write_text(FULL_EXAMPLE)
    ruleset = load_rules(path)
    assert ruleset.rules == EXPECTED_FULL.rules
    assert ruleset.source == str(path)


def test_a_byte_order_mark_is_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "keyhygiene.toml"
    path.write_bytes(b"\xef\xbb\xbf" + FULL_EXAMPLE.encode())
    assert load_rules(path).rules == EXPECTED_FULL.rules


def test_an_empty_file_is_valid_with_safe_defaults() -> None:
    ruleset = parse_rules("", "rules.toml")
    assert ruleset == RuleSet(safety=Safety(), rules=(), source="rules.toml")
    assert ruleset.safety.dry_run is True
    assert ruleset.safety.max_actions_per_run == 50
    assert ruleset.safety.max_action_percent == 10.0


def test_a_file_with_only_rules_gets_the_safety_defaults_and_dry_run() -> None:
    ruleset = parse_rules('[[rule]]\nname = "r"\nmatch = "expired"\naction = "report"\n')
    assert ruleset.safety == Safety()
    assert ruleset.source == "<rules>"


def test_every_option_and_filter_is_read() -> None:
    ruleset = parse_rules(
        textwrap.dedent(
            """\
            [safety]
            dry_run = false
            max_actions_per_run = 5
            max_action_percent = 2.5
            protect_hashes = ["abc"]
            protect_names = ["prod-*", "ci-?"]

            [[rule]]
            name = "idle-dev"
            match = "unused"
            idle_for = "2w"
            action = "delete"
            grace = "0d"
            names = ["dev-*"]
            exclude_names = ["dev-keep"]
            workspaces = ["ws-1", "ws-2"]
            min_age = "12h"
            disabled = false

            [[rule]]
            name = "limit-used-up"
            match = "over_budget"
            window = "total"
            action = "report"
            """
        )
    )
    assert ruleset.safety == Safety(
        dry_run=False,
        max_actions_per_run=5,
        max_action_percent=2.5,
        protect_hashes=("abc",),
        protect_names=("prod-*", "ci-?"),
    )
    assert ruleset.rules == (
        Rule(
            name="idle-dev",
            match="unused",
            action="delete",
            idle_for=timedelta(weeks=2),
            grace=timedelta(0),
            names=("dev-*",),
            exclude_names=("dev-keep",),
            workspaces=("ws-1", "ws-2"),
            min_age=timedelta(hours=12),
            disabled=False,
        ),
        Rule(name="limit-used-up", match="over_budget", action="report", window="total"),
    )


def test_integer_percent_and_threshold_are_read_as_numbers() -> None:
    ruleset = parse_rules(
        '[safety]\nmax_action_percent = 100\n[[rule]]\nname = "r"\nmatch = "over_budget"\n'
        'window = "daily"\nthreshold_usd = 5\naction = "disable"\n'
    )
    assert ruleset.safety.max_action_percent == 100.0
    assert ruleset.rules[0].threshold_usd == 5.0


def test_rules_are_immutable() -> None:
    ruleset = parse_rules(FULL_EXAMPLE)
    with pytest.raises(AttributeError):
        ruleset.safety.dry_run = False  # type: ignore[misc]
    with pytest.raises(AttributeError):
        ruleset.rules[0].action = "report"  # type: ignore[misc]
    assert isinstance(ruleset.rules, tuple)
    assert isinstance(ruleset.safety.protect_names, tuple)


# --- unreadable files ---------------------------------------------------------------------------


def test_a_missing_file_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(RulesError) as caught:
        load_rules(path)
    assert caught.value.path == str(path)
    assert str(caught.value).startswith(f"{path}: cannot read the rules file")


def test_a_directory_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(RulesError) as caught:
        load_rules(tmp_path)
    assert str(caught.value).startswith(f"{tmp_path}: cannot read the rules file")


def test_a_file_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(b"[safety]\ndry_run = true\n# caf\xe9\n")
    with pytest.raises(RulesError) as caught:
        load_rules(path)
    assert str(caught.value) == f"{path}:3: the file is not UTF-8 text"


# --- TOML syntax --------------------------------------------------------------------------------


def test_toml_syntax_error_names_file_and_line() -> None:
    error = assert_error("[safety]\ndry_run = true\nmax_actions_per_run = 7d\n", 3, None, "invalid TOML")
    assert "column" in error.message


def test_toml_syntax_error_at_the_end_names_the_last_line() -> None:
    assert_error('[[rule]]\nname = "a"\nmatch = ', 3, None, "invalid TOML", "end of the file")


def test_a_key_written_twice_is_a_toml_error() -> None:
    assert_error('[[rule]]\nname = "a"\nname = "b"\n', 3, None, "invalid TOML")


def test_a_rule_table_written_with_single_brackets_after_rules_is_a_toml_error() -> None:
    assert_error('[[rule]]\nname = "a"\n\n[rule]\nname = "b"\n', 4, None, "invalid TOML")


# --- top level ----------------------------------------------------------------------------------


def test_unknown_top_level_table() -> None:
    assert_error('[safety]\ndry_run = true\n\n[rulez]\nname = "a"\n', 4, "rulez", 'unknown key "rulez"')


def test_unknown_top_level_key() -> None:
    assert_error("dry_run = false\n[safety]\n", 1, "dry_run", 'unknown key "dry_run"')


def test_unknown_top_level_array_of_tables_suggests_the_right_name() -> None:
    assert_error('# rules\n\n[[rules]]\nname = "a"\n', 3, "rules", 'did you mean "rule"?')


def test_single_bracket_rule_table() -> None:
    assert_error('\n[rule]\nname = "a"\n', 2, "rule", "[[rule]]")


def test_safety_that_is_not_a_table() -> None:
    assert_error("safety = true\n", 1, "safety", "[safety] table")


def test_rule_that_is_not_a_table() -> None:
    assert_error('rule = ["a"]\n', 1, "rule", "[[rule]]")


# --- [safety] -----------------------------------------------------------------------------------


SAFETY_ERRORS = [
    ("dry_run = 1", "dry_run", "expected true or false, got a whole number (1)"),
    ('dry_run = "false"', "dry_run", "expected true or false, got a string"),
    ("max_actions_per_run = true", "max_actions_per_run", "expected a whole number, got a boolean (true)"),
    ("max_actions_per_run = 5.0", "max_actions_per_run", "expected a whole number, got a number"),
    ("max_actions_per_run = 0", "max_actions_per_run", "must be at least 1, got 0"),
    ("max_actions_per_run = -3", "max_actions_per_run", "must be at least 1, got -3"),
    ("max_action_percent = 0", "max_action_percent", "more than 0 and at most 100, got 0"),
    ("max_action_percent = -1.5", "max_action_percent", "more than 0 and at most 100, got -1.5"),
    ("max_action_percent = 100.01", "max_action_percent", "more than 0 and at most 100, got 100.01"),
    ("max_action_percent = nan", "max_action_percent", "finite"),
    ("max_action_percent = inf", "max_action_percent", "finite"),
    ("max_action_percent = false", "max_action_percent", "expected a number, got a boolean"),
    ('max_action_percent = "10%"', "max_action_percent", "expected a number, got a string"),
    ('protect_hashes = "abc"', "protect_hashes", "expected a list of strings"),
    ("protect_hashes = [1]", "protect_hashes", "entry 1 is a whole number"),
    ('protect_names = ["prod-*", ""]', "protect_names", "entry 2 is empty"),
    ('protect_names = ["  "]', "protect_names", "entry 1 is empty"),
    # A stray space: the glob then matches only names with that space, and protects prod-main not.
    ('protect_names = ["ci-*", "prod-* "]', "protect_names", 'entry 2 ("prod-* ") has white space around it'),
    # A zero-width space pasted in with the glob: it protects only names holding one, and reads as prod-*.
    (
        'protect_names = ["prod-*\u200b"]',
        "protect_names",
        'entry 1 ("prod-*\\u200b") holds an invisible character (U+200B ZERO WIDTH SPACE), so it protects only',
    ),
    ("dry_runs = true", "dry_runs", 'unknown key "dry_runs" in [safety]; did you mean "dry_run"?'),
]


@pytest.mark.parametrize(("line", "field", "message"), SAFETY_ERRORS)
def test_safety_errors_name_line_and_field(line: str, field: str, message: str) -> None:
    text = f"# keyhygiene\n\n[safety]\ndry_run = true\n{line}\n"
    if line.startswith("dry_run ="):
        text = f"# keyhygiene\n\n[safety]\n# first\n{line}\n"
    assert_error(text, 5, field, message)


def test_safety_errors_point_at_the_field_line_even_after_rules() -> None:
    text = (
        '[[rule]]\nname = "a"\nmatch = "expired"\naction = "report"\n\n'
        "[safety]\nprotect_names = []\nmax_actions_per_run = 0\n"
    )
    assert_error(text, 8, "max_actions_per_run", "at least 1")


def test_safety_written_inline_points_at_its_line() -> None:
    assert_error("\nsafety = { max_actions_per_run = 0 }\n", 2, "max_actions_per_run", "at least 1")


# --- [[rule]] -----------------------------------------------------------------------------------

GOOD_RULES = """\
[[rule]]
name = "first"
match = "expired"
action = "report"

[[rule]]
name = "second"
match = "unused"
idle_for = "30d"
action = "disable"

"""
# The rule under test starts on line 12 of the file.
RULE_HEADER = GOOD_RULES.count("\n") + 1


def rule_text(*lines: str) -> str:
    return GOOD_RULES + "[[rule]]\n" + "".join(f"{line}\n" for line in lines)


RULE_ERRORS = [
    # (lines of the third rule, 1-based line inside it of the error (0 = header), field, message words)
    (
        ['name = "r"', 'match = "expired"', 'action = "delete"', 'graze = "1d"'],
        4,
        "graze",
        'unknown key "graze" in rule #3; did you mean "grace"?',
    ),
    (
        ['name = "r"', 'match = "expire"', 'action = "delete"'],
        2,
        "match",
        'unknown match "expire" in rule "r"; expected one of "expired", "unused", "over_budget"',
    ),
    (
        ['name = "r"', 'match = "expired"', 'action = "remove"'],
        3,
        "action",
        'unknown action "remove" in rule "r"; expected one of "disable", "delete", "report"',
    ),
    (['name = "r"', "match = 1", 'action = "delete"'], 2, "match", "got a whole number"),
    (['match = "expired"', 'action = "delete"'], 0, "name", "rule #3 has no name"),
    (['name = "r"', 'action = "delete"'], 0, "match", "rule #3 has no match"),
    (['name = "r"', 'match = "expired"'], 0, "action", "rule #3 has no action"),
    (['name = ""', 'match = "expired"', 'action = "report"'], 1, "name", "must not be empty"),
    (["name = 7", 'match = "expired"', 'action = "report"'], 1, "name", "expected a string"),
    (
        ['name = "first"', 'match = "expired"', 'action = "report"'],
        1,
        "name",
        'duplicate rule name "first": rule #1 has it too',
    ),
    (
        ['name = "r"', 'match = "expired"', 'action = "delete"', 'grace = "7 days"'],
        4,
        "grace",
        "invalid duration '7 days'",
    ),
    (
        ['name = "r"', 'match = "expired"', 'action = "delete"', "grace = 7"],
        4,
        "grace",
        'expected a duration string like "7d", got a whole number (7)',
    ),
    (['name = "r"', 'match = "expired"', 'action = "delete"', 'grace = "-1d"'], 4, "grace", "invalid duration"),
    (
        ['name = "r"', 'match = "expired"', 'action = "disable"', 'grace = "7d"'],
        4,
        "grace",
        'only applies to action = "delete"',
    ),
    (
        ['name = "r"', 'match = "expired"', 'action = "report"', 'idle_for = "7d"'],
        4,
        "idle_for",
        'only applies to match = "unused"',
    ),
    (['name = "r"', 'match = "unused"', 'action = "report"'], 0, "idle_for", 'match = "unused" needs idle_for'),
    (['name = "r"', 'match = "unused"', 'action = "report"', 'idle_for = "0d"'], 4, "idle_for", "more than zero"),
    (
        ['name = "r"', 'match = "unused"', 'action = "report"', 'idle_for = "30"'],
        4,
        "idle_for",
        "invalid duration '30'",
    ),
    (
        ['name = "r"', 'match = "unused"', 'idle_for = "1d"', 'action = "report"', 'window = "daily"'],
        5,
        "window",
        'only applies to match = "over_budget"',
    ),
    (
        ['name = "r"', 'match = "expired"', 'action = "report"', "threshold_usd = 5"],
        4,
        "threshold_usd",
        'only applies to match = "over_budget"',
    ),
    (
        ['name = "r"', 'match = "expired"', 'action = "disable"', "reenable = true"],
        4,
        "reenable",
        'only applies to match = "over_budget" with action = "disable"',
    ),
    (
        ['name = "r"', 'match = "over_budget"', 'window = "daily"', 'action = "delete"', "reenable = true"],
        5,
        "reenable",
        'only applies to match = "over_budget" with action = "disable"',
    ),
    (
        ['name = "r"', 'match = "over_budget"', 'window = "daily"', 'action = "report"', "reenable = false"],
        5,
        "reenable",
        'with action = "disable"',
    ),
    (['name = "r"', 'match = "over_budget"', 'action = "disable"'], 0, "window", "needs window"),
    (
        ['name = "r"', 'match = "over_budget"', 'window = "yearly"', 'action = "disable"'],
        3,
        "window",
        'unknown window "yearly"',
    ),
    (
        ['name = "r"', 'match = "over_budget"', 'window = "daily"', 'action = "disable"', "threshold_usd = true"],
        5,
        "threshold_usd",
        "expected a number, got a boolean (true)",
    ),
    (
        ['name = "r"', 'match = "over_budget"', 'window = "daily"', 'action = "disable"', 'threshold_usd = "100"'],
        5,
        "threshold_usd",
        "expected a number, got a string",
    ),
    (
        ['name = "r"', 'match = "over_budget"', 'window = "daily"', 'action = "disable"', "threshold_usd = 0"],
        5,
        "threshold_usd",
        "more than zero",
    ),
    (
        ['name = "r"', 'match = "over_budget"', 'window = "daily"', 'action = "disable"', "threshold_usd = -5.0"],
        5,
        "threshold_usd",
        "more than zero",
    ),
    (
        ['name = "r"', 'match = "expired"', 'action = "delete"', 'exclude_names = [" keep-*"]'],
        4,
        "exclude_names",
        'entry 1 (" keep-*") has white space around it, so it excludes only names with that white space',
    ),
    (
        ['name = "r"', 'match = "expired"', 'action = "delete"', 'exclude_names = ["\u2060keep-*"]'],
        4,
        "exclude_names",
        'entry 1 ("\\u2060keep-*") holds an invisible character (U+2060 WORD JOINER), so it excludes only names',
    ),
    (
        ['name = "r"', 'match = "over_budget"', 'window = "daily"', 'action = "disable"', "reenable = 1"],
        5,
        "reenable",
        "expected true or false",
    ),
    (
        ['name = "r"', 'match = "expired"', 'action = "report"', 'names = "dev-*"'],
        4,
        "names",
        "expected a list of strings",
    ),
    (['name = "r"', 'match = "expired"', 'action = "report"', 'names = ["dev-*", ""]'], 4, "names", "entry 2 is empty"),
    (
        ['name = "r"', 'match = "expired"', 'action = "report"', 'exclude_names = [""]'],
        4,
        "exclude_names",
        "entry 1 is empty",
    ),
    (
        ['name = "r"', 'match = "expired"', 'action = "report"', "workspaces = [1]"],
        4,
        "workspaces",
        "entry 1 is a whole number",
    ),
    (['name = "r"', 'match = "expired"', 'action = "report"', 'min_age = "7 days"'], 4, "min_age", "invalid duration"),
    (
        ['name = "r"', 'match = "expired"', 'action = "report"', 'disabled = "yes"'],
        4,
        "disabled",
        "expected true or false",
    ),
    # A delete disables the key first: a filter on enabled keys would keep it from ever deleting it.
    (
        ['name = "r"', 'match = "expired"', 'action = "delete"', "disabled = false"],
        4,
        "disabled",
        "would then never delete it",
    ),
    (['name = "r"', 'match = "expired"', 'action = "disable"', "disabled = true"], 4, "disabled", "can never act"),
    (
        [
            'name = "r"',
            'match = "over_budget"',
            'action = "report"',
            'window = "total"',
            "threshold_usd = 1" + "0" * 400,
        ],
        5,
        "threshold_usd",
        "too large a number",
    ),
    # A float: read, but beyond a trillion dollars (it crashed `rules check`'s description).
    (
        ['name = "r"', 'match = "over_budget"', 'action = "report"', 'window = "total"', "threshold_usd = 1e300"],
        5,
        "threshold_usd",
        "must be at most 1,000,000,000,000 US dollars",
    ),
]


@pytest.mark.parametrize(("lines", "offset", "field", "message"), RULE_ERRORS)
def test_rule_errors_name_line_and_field(lines: list[str], offset: int, field: str, message: str) -> None:
    assert_error(rule_text(*lines), RULE_HEADER + offset, field, message)


def test_a_field_in_the_wrong_rule_is_found_in_that_rule_not_an_earlier_one() -> None:
    # Both rules assign idle_for; the error is in the second and must point there.
    text = textwrap.dedent(
        """\
        [[rule]]
        name = "ok"
        match = "unused"
        idle_for = "30d"
        action = "report"
        [[rule]]
        name = "bad"
        match = "unused"
        action = "report"
        # comment = "x"
        idle_for = "30 days"
        """
    )
    assert_error(text, 11, "idle_for", "invalid duration")


def test_a_rule_with_a_sub_table_points_at_the_sub_table_line() -> None:
    text = '[[rule]]\nname = "r"\nmatch = "expired"\naction = "report"\n\n[rule.names]\nx = 1\n'
    assert_error(text, 6, "names", "expected a list of strings, got a table")


def test_multiline_strings_do_not_confuse_line_finding() -> None:
    text = textwrap.dedent(
        '''\
        [[rule]]
        name = """
        grace = "trap"
        """
        match = "expired"
        action = "report"
        grace = "1d"
        '''
    )
    assert_error(text, 7, "grace", 'only applies to action = "delete"')


def test_triple_quotes_in_comments_and_one_line_strings_open_no_string() -> None:
    text = textwrap.dedent(
        """\
        [[rule]]
        name = "a"  # see \"\"\" notes
        match = "expired"
        action = "disable"
        label = 'x\"\"\"y'

        [[rule]]
        name = "b"
        match = "bogus"
        action = "report"
        """
    )
    assert_error(text.replace('label = \'x"""y\'\n', 'exclude_names = [\'x"""y\']\n'), 9, "match", "bogus")


def test_a_notify_name_longer_than_the_notices_table_stores_is_refused() -> None:
    # It passed the check, then every notice of that target failed to be recorded on PostgreSQL.
    assert_error(f'[[notify]]\nname = "{"n" * 129}"\nurl_env = "OPS_HOOK"\n', 2, "name", "longer than 128 characters")
    longest = parse_rules(f'[[notify]]\nname = "{"n" * 128}"\nurl_env = "OPS_HOOK"\n', "r.toml")
    assert longest.notify[0].name == "n" * 128


def test_notify_names_variables_not_their_secrets() -> None:
    url = "https://hooks.slack.com/services/T000/B000/SECRETxyz"
    error = assert_error(f'[[notify]]\nname = "ops"\nurl_env = "{url}"\n', 3, "url_env", "not the value itself")
    assert url not in str(error)
    assert_error(
        '[[notify]]\nname = "ops"\nurl_env = "OPS_HOOK"\nsecret_env = "s3cr3t value"\n',
        4,
        "secret_env",
        "not the value",
    )


def test_upcoming_within_without_the_upcoming_event_is_a_warning_with_its_line() -> None:
    text = '[[notify]]\nname = "ops"\nurl_env = "OPS_HOOK"\non = ["failed"]\nupcoming_within = "7d"\n'
    ruleset = parse_rules(text, "rules.toml")

    assert ruleset.notify[0].upcoming_within == timedelta(days=7)  # kept: the file stays valid
    assert [str(warning) for warning in ruleset.warnings] == [
        'rules.toml:5: upcoming_within: has no effect: on does not include "upcoming", so no upcoming notices are sent'
    ]
    assert parse_rules(text.replace('["failed"]', '["failed", "upcoming"]')).warnings == ()


def test_upcoming_within_with_the_default_events_is_a_warning_too() -> None:
    ruleset = parse_rules('[[notify]]\nname = "ops"\nurl_env = "OPS_HOOK"\nupcoming_within = "7d"\n', "r.toml")
    assert [warning.line for warning in ruleset.warnings] == [4]


def test_a_rules_file_with_a_warning_loads_equal_each_time() -> None:
    text = '[[notify]]\nname = "ops"\nurl_env = "OPS_HOOK"\non = ["failed"]\nupcoming_within = "7d"\n'
    assert parse_rules(text, "r.toml") == parse_rules(text, "r.toml")
    assert pickle.loads(pickle.dumps(parse_rules(text, "r.toml"))) == parse_rules(text, "r.toml")


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"])
def test_line_numbers_count_only_the_line_ends_toml_knows(separator: str) -> None:
    """TOML ends lines with LF or CRLF; other characters Python would break a line at may stand in
    a comment or a string, and do not move the lines after them."""
    rule = f'[[rule]]\nname = "a{separator}b"\nmatch = "expired"\naction = "report"\ngrace = "1d"\n'
    text = f"# ops{separator}hook\r\n{rule}"
    assert_error(text, 6, "grace", 'only applies to action = "delete"')
    warned = parse_rules(text.replace('grace = "1d"', '[[notify]]\nname = "o"\nurl_env = "H"\nupcoming_within = "1d"'))
    assert [warning.line for warning in warned.warnings] == [9]


def test_a_number_too_large_for_a_float_is_an_error_not_a_crash() -> None:
    assert_error(f"[safety]\nmax_action_percent = 1{'0' * 400}\n", 2, "max_action_percent", "too large a number")


def test_rules_written_inline_point_at_the_rule_line() -> None:
    text = '# x\nrule = [{ name = "r", match = "unused", action = "disable" }]\n'
    assert_error(text, 2, "idle_for", "needs idle_for")


def test_the_first_mistake_in_file_order_is_reported() -> None:
    text = rule_text('name = "r"', 'match = "expired"', 'action = "report"', "bogus = 1", 'idle_for = "1d"')
    assert_error(text, RULE_HEADER + 4, "bogus", 'unknown key "bogus"')


def test_quoted_keys_are_found() -> None:
    text = '[[rule]]\n"name" = "r"\n"match" = "expired"\n"action" = "report"\n"grace" = "1d"\n'
    assert_error(text, 5, "grace", 'only applies to action = "delete"')


def test_rules_error_formats_and_pickles() -> None:
    assert str(RulesError("f.toml", 3, "grace", "bad")) == "f.toml:3: grace: bad"
    assert str(RulesError("f.toml", None, "grace", "bad")) == "f.toml: grace: bad"
    assert str(RulesError("f.toml", 3, None, "bad")) == "f.toml:3: bad"
    assert str(RulesError("f.toml", None, None, "bad")) == "f.toml: bad"
    copy = pickle.loads(pickle.dumps(RulesError("f.toml", 3, "grace", "bad")))
    assert (copy.path, copy.line, copy.field, copy.message) == ("f.toml", 3, "grace", "bad")
    assert str(copy) == "f.toml:3: grace: bad"


# --- the model refuses what the loader refuses --------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"match": "unused", "action": "disable"},
        {"match": "expired", "action": "disable", "idle_for": timedelta(days=1)},
        {"match": "unused", "action": "disable", "idle_for": timedelta(0)},
        {"match": "over_budget", "action": "disable"},
        {"match": "expired", "action": "disable", "threshold_usd": 1.0},
        {"match": "over_budget", "action": "disable", "window": "daily", "threshold_usd": 0.0},
        {"match": "over_budget", "action": "delete", "window": "daily", "reenable": True},
        {"match": "expired", "action": "delete", "grace": timedelta(seconds=-1)},
        {"match": "nope", "action": "delete"},
    ],
)
def test_rule_model_refuses_inconsistent_options(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Rule(name="r", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs", [{"max_actions_per_run": 0}, {"max_action_percent": 0.0}, {"max_action_percent": 100.5}]
)
def test_safety_model_refuses_bad_caps(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Safety(**kwargs)  # type: ignore[arg-type]


def test_ruleset_model_refuses_duplicate_names() -> None:
    rule = Rule(name="r", match="expired", action="report")
    with pytest.raises(ValueError):
        RuleSet(safety=Safety(), rules=(rule, rule), source="x")


# --- describe -----------------------------------------------------------------------------------


def test_describe_the_full_example() -> None:
    assert describe(parse_rules(FULL_EXAMPLE, "keyhygiene.toml")) == textwrap.dedent(
        """\
        Rules file: keyhygiene.toml
        DRY RUN: nothing will be changed (set dry_run = false in [safety] to act)

        Safety:
          dry_run: true (plan and record only)
          at most 50 changes per run and at most 10% of all keys; a run that plans more is refused whole
          protected key hashes: none
          protected key names: prod-*

        Rules (3, in file order; a key several rules match gets the strongest action, delete > disable > report, and every matching rule is recorded):
          1. delete-expired: keys that have expired (expires_at is set and not later than now) -> disable first, then delete once the key has been disabled for at least 7d
          2. disable-idle: keys at least 30d old with no new use for 30d (neither last_used_at nor the usage history shows use in that time) -> disable
          3. disable-overspend: keys whose monthly spend (usage_monthly, plus BYOK spend where the key counts BYOK in its limit) is at least $100.00 -> disable; re-enable the keys this rule disabled once they are no longer over budget

        Notices (1 target(s)):
          ops: slack to the URL in KEYHYGIENE_OPS_WEBHOOK, on done, failed, refused, upcoming (due within 7d)
        """  # noqa: E501
    )


def test_describe_normalises_durations_and_lists_filters() -> None:
    text = textwrap.dedent(
        """\
        [safety]
        dry_run = false
        max_actions_per_run = 3
        max_action_percent = 2.5
        protect_hashes = ["abc", "def"]

        [[rule]]
        name = "idle"
        match = "unused"
        idle_for = "2w"
        action = "delete"
        grace = "48h"
        names = ["dev-*"]
        exclude_names = ["dev-keep"]
        workspaces = ["ws-1"]
        min_age = "90m"

        [[rule]]
        name = "now"
        match = "over_budget"
        window = "total"
        action = "delete"
        grace = "0d"
        disabled = true

        [[rule]]
        name = "watch"
        match = "expired"
        action = "report"
        disabled = false
        """
    )
    out = describe(parse_rules(text, "r.toml"))
    assert "DRY RUN" not in out
    assert "dry_run: false (changes are made)" in out
    assert "at most 3 changes per run and at most 2.5% of all keys" in out
    assert "protected key hashes: abc, def" in out
    assert "protected key names: none" in out
    assert "1. idle: keys at least 14d old with no new use for 14d" in out
    assert "disable first, then delete once the key has been disabled for at least 2d" in out
    assert "only keys named: dev-*" in out
    assert "never keys named: dev-keep" in out
    assert "only in workspaces: ws-1" in out
    assert "only keys at least 90m old" in out
    assert "only keys that are enabled" in out
    assert "2. now: keys with a spend limit that is used up (limit_remaining is 0 or less; " in out
    assert "delete at once (grace 0: no disable first)" in out
    assert "only keys that are disabled" in out


def test_describe_an_empty_file_says_nothing_will_be_done() -> None:
    out = describe(parse_rules("", "r.toml"))
    assert "DRY RUN: nothing will be changed" in out
    assert "No rules: nothing will be done to any key." in out


def test_describe_a_threshold_with_cents() -> None:
    text = '[[rule]]\nname = "r"\nmatch = "over_budget"\nwindow = "total"\nthreshold_usd = 0.005\naction = "report"\n'
    assert "lifetime spend (usage, plus BYOK" in describe(parse_rules(text))
    assert "at least $0.005" in describe(parse_rules(text))


# --- rules that cannot widen or overflow ---------------------------------------------------------


@pytest.mark.parametrize("field", ["names", "exclude_names", "workspaces"])
def test_an_empty_filter_list_is_an_error_not_no_filter(field: str) -> None:
    # An empty allow-list from a generated config would otherwise select every key of the organisation.
    text = rule_text('name = "r"', 'match = "expired"', 'action = "disable"', f"{field} = []")

    assert_error(text, RULE_HEADER + 4, field, "must not be an empty list", f"leave {field} out")


@pytest.mark.parametrize(
    ("lines", "field"),
    [
        (['match = "unused"', 'idle_for = "99999999d"', 'action = "disable"'], "idle_for"),
        (['match = "unused"', 'idle_for = "9999999999999w"', 'action = "disable"'], "idle_for"),
        (['match = "unused"', 'idle_for = "36501d"', 'action = "disable"'], "idle_for"),
        (['match = "expired"', 'grace = "5215w"', 'action = "delete"'], "grace"),
        (['match = "expired"', 'min_age = "' + "9" * 5000 + 'd"', 'action = "report"'], "min_age"),
    ],
)
def test_a_duration_over_100_years_is_an_error_at_its_line(lines: list[str], field: str) -> None:
    assert_error(rule_text('name = "r"', *lines), RULE_HEADER + 3, field, "too long", "100 years")


def test_a_duration_of_100_years_plans_without_overflow() -> None:
    from datetime import UTC, datetime

    from keyhygiene.enforcement import key_facts
    from keyhygiene.keysapi.models import Key
    from keyhygiene.rules import AuditFacts, KeyHistory, decide, next_action

    ruleset = parse_rules(
        rule_text('name = "r"', 'match = "unused"', 'idle_for = "36500d"', 'min_age = "36500d"', 'action = "disable"')
    )
    now = datetime(8999, 12, 31, tzinfo=UTC)
    key = key_facts(
        Key.from_api({"hash": "h", "name": "k", "created_at": "8999-12-31T00:00:00Z", "last_used_at": None}), now
    )

    assert decide(key, KeyHistory(), AuditFacts(), ruleset, now) is None
    coming = next_action(key, KeyHistory(), AuditFacts(), ruleset, now)  # no overflow, however far ahead
    assert coming is not None and coming.due >= now


def test_dev_zero_is_refused_without_reading_it() -> None:
    with pytest.raises(RulesError) as caught:
        load_rules("/dev/zero")  # it never ends: reading it would hang

    assert str(caught.value) == "/dev/zero: cannot read the rules file: it is not a regular file"


def test_a_fifo_is_refused_without_opening_it(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "rules.fifo"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes

    with pytest.raises(RulesError, match="not a regular file"):
        load_rules(fifo)


def test_a_file_over_1_mib_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.toml"
    path.write_text(GOOD_RULES + "#" * (1024 * 1024) + "\n")

    with pytest.raises(RulesError, match="larger than 1 MiB"):
        load_rules(path)


# --- what Python's TOML reader cannot take: still file:line ----------------------------------------


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("x = " + "[" * 1000 + "]" * 1000 + "\n", 1),
        ('# deep\n[[rule]]\nname = "r"  # [[[\nnames = ["[[[["]\nlabel = ' + "{a = " * 600 + "1" + "}" * 600 + "\n", 5),
        ('[safety]\nprotect_names = """\n[[[[\n"""\nx = [\n' + "[" * 900 + "]" * 900 + "\n]\n", 6),
    ],
)
def test_arrays_and_tables_nested_too_deep_are_an_error_with_their_line(text: str, line: int) -> None:
    # It was a RecursionError traceback.
    assert_error(text, line, None, "invalid TOML: arrays or tables nested too deep")


def test_a_number_of_thousands_of_digits_is_an_error_with_its_line() -> None:
    # It was a ValueError traceback ("Exceeds the limit (4300 digits) for integer string conversion").
    text = '[safety]\nprotect_names = ["' + "1" * 5000 + '"]\n\nmax_actions_per_run = 1_' + "0" * 5000 + "\n"
    assert_error(text, 4, None, "invalid TOML: a number with too many digits")


@pytest.mark.parametrize(
    ("assignment", "field", "words"),
    [
        ("dry_run = 0x" + "f" * 5000, "dry_run", "expected true or false, got a whole number (too long to show)"),
        ("protect_names = [0x" + "f" * 5000 + "]", "protect_names", "entry 1 is a whole number (too long to show)"),
    ],
)
def test_a_hex_number_too_long_to_write_out_is_named_not_shown(assignment: str, field: str, words: str) -> None:
    # Hexadecimal ones parse, but writing one out in decimal in the message was a ValueError traceback.
    assert_error(f"[safety]\n{assignment}\n", 2, field, words)


# --- a webhook's variable is named, its value never echoed ---------------------------------------------

WEBHOOK = "https://hooks.slack.com/services/T000/B000/SECRETXXXX"


@pytest.mark.parametrize(("field", "line"), [("url_env", 3), ("secret_env", 4)])
@pytest.mark.parametrize("value", [f'["{WEBHOOK}"]', f'{{ url = "{WEBHOOK}" }}', "12345678901234567890"])
def test_a_variable_name_of_the_wrong_type_is_not_echoed(field: str, line: int, value: str) -> None:
    # It was: url_env: expected a string, got a list (["https://hooks.slack.com/services/..."]).
    names = {"url_env": '"OPS_HOOK"', "secret_env": '"OPS_SECRET"'} | {field: value}
    text = f'[[notify]]\nname = "ops"\nurl_env = {names["url_env"]}\nsecret_env = {names["secret_env"]}\n'

    error = assert_error(text, line, field, "expected the name of the environment variable", "notify #1")

    assert "SECRETXXXX" not in str(error) and "1234567890" not in str(error)


# --- protect_hashes: a hash that can never match ------------------------------------------------

KEY_HASH = "0f" * 32


@pytest.mark.parametrize(
    "entry",
    [
        KEY_HASH[:10],  # as plan's table shows it
        KEY_HASH[:12],  # as a Slack notice shows it
        KEY_HASH.upper(),
        KEY_HASH + "0",
        "prod-main",  # a key's name, not its hash
    ],
)
def test_a_protected_hash_not_shaped_like_a_key_hash_is_a_warning_with_its_line(entry: str) -> None:
    text = f'[safety]\ndry_run = false\nprotect_hashes = [\n  "{KEY_HASH}",\n  "{entry}",\n]\n'

    ruleset = parse_rules(text, "rules.toml")

    assert ruleset.safety.protect_hashes == (KEY_HASH, entry)  # still protected as written
    (warning,) = ruleset.warnings
    assert str(warning) == (
        f'rules.toml:3: protect_hashes: entry 2 ("{entry}") is not 64 lowercase hex characters like a key '
        "hash: it protects only a key whose hash is exactly this; protect_hashes compares whole key hashes "
        "exactly (`plan --format json` shows them whole)"
    )


def test_whole_key_hashes_are_protected_without_a_warning() -> None:
    ruleset = parse_rules(f'[safety]\nprotect_hashes = ["{KEY_HASH}", "{"ab" * 32}"]\n', "rules.toml")
    assert ruleset.warnings == ()


def test_a_protected_hash_holding_an_invisible_character_is_an_error() -> None:
    text = f'[safety]\ndry_run = false\nprotect_hashes = ["{KEY_HASH}\\ufeff"]\n'

    assert_error(text, 3, "protect_hashes", "entry 1 holds an invisible character (U+FEFF", "protects nothing")


@pytest.mark.parametrize("entry", [f" {KEY_HASH}", f"{KEY_HASH} ", f"{KEY_HASH}\\n", f"\\t{KEY_HASH[:10]}"])
def test_a_protected_hash_with_white_space_around_it_is_an_error(entry: str) -> None:
    text = f'[safety]\ndry_run = false\nprotect_hashes = ["{KEY_HASH}", "{entry}"]\n'

    assert_error(text, 3, "protect_hashes", "entry 2 has white space around it", "compares whole key hashes exactly")
