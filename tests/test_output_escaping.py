"""Key names are chosen by whoever creates a key: they must not drive the terminal that prints a
table, nor run as a formula in the spreadsheet that opens a CSV; JSON keeps them exactly."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from keyhygiene.context import Database
from keyhygiene.fakeapi import FakeOpenRouter
from keyhygiene.timeutil import utcnow

pytestmark = pytest.mark.postgres

# An OSC 8 hyperlink, a colour change, a C1 CSI (0x9b), a carriage return that would overwrite the
# line, a bidi override, and rich markup that would become a link if read as markup.
HOSTILE = "ok\x1b]8;;https://evil.example\x07click\x1b]8;;\x07\x1b[31mred\x9b2J\rover\u202eevil[link=https://x]y[/link]"
FORMULA = '=HYPERLINK("https://evil.example","invoice")'
CONTROL = ("\x1b", "\x07", "\x9b", "\r", "\u202e")


@pytest.fixture
def names(fake: FakeOpenRouter, env: dict[str, str], database: Database, cli: Callable[..., Any]) -> list[str]:
    expired = utcnow() - timedelta(days=1)
    for name in (HOSTILE, FORMULA, "+1", "-2", "@SUM(A1)", "\tx", "plain"):
        fake.add_key(name, expires_at=expired)
    Path(env["KEYHYGIENE_RULES_FILE"]).write_text(
        "[[rule]]\nname = 'report-expired'\nmatch = 'expired'\naction = 'report'\n"
    )
    assert cli("sync").exit_code == 0
    return [key["name"] for key in fake.keys]


@pytest.mark.parametrize("command", [("report", "inventory"), ("plan",)])
def test_tables_show_control_characters_escaped(
    names: list[str], cli: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, command: tuple[str, ...]
) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # wide enough that no name is folded across lines

    result = cli(*command)

    assert result.exit_code == 0, result.stderr
    for character in CONTROL:
        assert character not in result.stdout
    escaped = HOSTILE.encode("unicode_escape").decode().replace("\\r", "\\x0d")
    if command == ("plan",):
        escaped = escaped[:30]  # the plan cuts a long name with an ellipsis, escapes and all
    assert escaped in result.stdout  # every character visible, in order; the link and markup as text


def test_csv_neutralises_formulas_and_writes_booleans_in_lower_case(names: list[str], cli: Callable[..., Any]) -> None:
    result = cli("report", "inventory", "--format", "csv")

    assert result.exit_code == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    by_name = {row["name"]: row for row in rows}
    assert set(by_name) >= {"'" + FORMULA, "'+1", "'-2", "'@SUM(A1)", "'\tx", "plain"}
    assert not any(row["name"].startswith(("=", "+", "-", "@", "\t", "\r")) for row in rows)
    assert {row["disabled"] for row in rows} == {"false"} and {row["expired"] for row in rows} == {"true"}


def test_json_keeps_every_name_exactly(names: list[str], cli: Callable[..., Any]) -> None:
    result = cli("report", "inventory", "--format", "json")

    assert sorted(row["name"] for row in json.loads(result.stdout)) == sorted(names)
    assert "\x1b" not in result.stdout  # JSON escapes it as \u001b: the exact name, never raw
