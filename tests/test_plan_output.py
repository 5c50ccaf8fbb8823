"""``keyhygiene plan`` output on a real store (SQLite and PostgreSQL) synced from the fake API over HTTP:
ordered by action then name, a table that fits the terminal and counts what it leaves out, and JSON
that lists every decision."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from keyhygiene.fakeapi import FakeOpenRouter
from keyhygiene.timeutil import utcnow

from .conftest import CliResult

DAY = timedelta(days=1)
LONG_NAME = "idle-" + "very-long-key-name-" * 8 + "end"

RULES = """
[safety]
dry_run = true
max_actions_per_run = 100
max_action_percent = 100

[[rule]]
name = "delete-expired"
match = "expired"
action = "delete"
grace = "0d"

[[rule]]
name = "disable-idle"
match = "unused"
idle_for = "30d"
action = "disable"

[[rule]]
name = "report-spend"
match = "over_budget"
window = "monthly"
threshold_usd = 50.0
action = "report"
"""


def add_keys(fake: FakeOpenRouter) -> None:
    now = utcnow()

    def key(name: str, **fields: object) -> None:
        fields.setdefault("created_at", now - 100 * DAY)
        fields.setdefault("last_used_at", now - DAY)
        fields.setdefault("usage", 1.0)
        fake.add_key(name, **fields)

    for n in (3, 1, 2):
        key(f"spender-{n}", usage=90.0, usage_monthly=60.0)
    for n in (12, 10, 11, 13):
        key(f"idle-{n}", last_used_at=now - 45 * DAY)
    key(LONG_NAME, last_used_at=now - 45 * DAY)
    key("xx-\x1b[31mred", last_used_at=now - 45 * DAY)
    key("zz-expired", expires_at=now - DAY)
    key("aa-expired", expires_at=now - 2 * DAY)
    key("busy")


def synced(fake: FakeOpenRouter, env: dict[str, str], cli: Callable[..., CliResult]) -> None:
    add_keys(fake)
    Path(env["KEYHYGIENE_RULES_FILE"]).write_text(RULES)
    assert cli("db", "upgrade").exit_code == 0
    assert cli("sync").exit_code == 0


def table_rows(output: str) -> list[list[str]]:
    """The table's rows, split in words (a row starts with the key hash's first 10 hex digits)."""
    return [line.split() for line in output.splitlines() if re.match(r"[0-9a-f]{10}  ", line)]


def test_plan_table_is_by_action_then_name_limited_and_fits_the_terminal(
    fake: FakeOpenRouter, env: dict[str, str], cli: Callable[..., CliResult]
) -> None:
    synced(fake, env, cli)

    result = cli("plan", "--limit", "5")

    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    rows = table_rows(result.stdout)
    assert [(row[1], row[2]) for row in rows] == [
        ("aa-expired", "delete"),
        ("zz-expired", "delete"),
        ("idle-10", "disable"),
        ("idle-11", "disable"),
        ("idle-12", "disable"),
    ]
    assert "... and 6 more (--limit 0 shows all" in result.stdout
    assert "8 change(s) planned, 3 report(s)" in result.stdout
    assert "by action: 2 delete, 6 disable, 3 report" in result.stdout
    assert all(len(line) <= 80 for line in lines)

    everything = cli("plan", "--limit", "0").stdout
    assert "more (--limit" not in everything
    long_row = next(line for line in everything.splitlines() if "idle-very-long" in line)
    assert "…" in long_row and LONG_NAME not in everything  # cut to the width, one line, not wrapped
    assert "\x1b" not in everything and "xx-\\x1b[31mred" in everything
    names = [row[1] for row in table_rows(everything) if row[2] == "report"]
    assert names == ["spender-1", "spender-2", "spender-3"]


def test_plan_json_lists_every_decision_in_the_same_order(
    fake: FakeOpenRouter, env: dict[str, str], cli: Callable[..., CliResult]
) -> None:
    synced(fake, env, cli)

    result = cli("plan", "--format", "json", "--limit", "1")

    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row["action"] for row in rows] == ["delete"] * 2 + ["disable"] * 6 + ["report"] * 3
    assert [row["key_name"] for row in rows[:2]] == ["aa-expired", "zz-expired"]
    assert rows[-1]["evidence"]["window_spend_usd"] == 60.0
