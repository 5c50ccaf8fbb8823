"""Key names are chosen by whoever creates a key: they must not drive the terminal that prints a
table, nor run as a formula in the spreadsheet that opens a CSV; JSON keeps them exactly."""

from __future__ import annotations

import csv
import io
import json
import subprocess
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from keyhygiene.context import Database
from keyhygiene.fakeapi import FakeOpenRouter
from keyhygiene.timeutil import utcnow

from .celery_support import keyhygiene_executable

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


LONE = "lone\udcffsurrogate"
"""A name with a lone surrogate: valid JSON, so the API can send it, but no UTF-8 text can hold it."""


def test_a_name_with_a_lone_surrogate_is_escaped_in_tables_and_in_the_html_report(
    fake: FakeOpenRouter, env: dict[str, str], database: Database, cli: Callable[..., Any], tmp_path: Path
) -> None:
    fake.add_key(LONE, created_at=utcnow() - timedelta(days=90), usage=0.0)
    Path(env["KEYHYGIENE_RULES_FILE"]).write_text(
        "[[rule]]\nname = 'disable-idle'\nmatch = 'unused'\nidle_for = '30d'\naction = 'disable'\n"
    )
    assert cli("sync").exit_code == 0
    out = tmp_path / "report.html"

    plan = cli("plan")
    html = cli("report", "html", "--out", str(out))

    assert plan.exit_code == 0, plan.stderr
    assert "lone\\udcffsurrogate" in plan.stdout and "\udcff" not in plan.stdout
    assert html.exit_code == 0, html.stderr
    page = out.read_text(encoding="utf-8")  # all of it UTF-8
    assert "Upcoming" in page and page.count("lone\\udcffsurrogate") >= 2  # the inventory and what comes


@pytest.mark.parametrize(
    ("command", "first"),
    [
        (("report", "inventory", "--format", "csv"), b"key_hash,name,"),
        (("report", "inventory", "--limit", "0"), b""),  # a table: rich exited 1 on the closed pipe
        (("plan", "--limit", "0"), b""),
        (("plan", "--format", "json"), b"["),
    ],
    ids=["report-csv", "report-table", "plan-table", "plan-json"],
)
def test_a_report_or_plan_whose_reader_stops_early_ends_quietly(
    fake: FakeOpenRouter,
    env: dict[str, str],
    database: Database,
    cli: Callable[..., Any],
    rules_file: Callable[[str], Any],
    command: tuple[str, ...],
    first: bytes,
) -> None:
    # `keyhygiene report ... | head -1`: more than a pipe holds (64 KiB), and the reader goes away
    # after the first line.
    for index in range(1000):
        fake.add_key(f"svc-{index:04d}-" + "x" * 60, expires_at=utcnow() - timedelta(days=1))
    rules_file('[safety]\nmax_action_percent = 100\n\n[[rule]]\nname = "old"\nmatch = "expired"\naction = "report"\n')
    assert cli("sync").exit_code == 0

    with subprocess.Popen(
        [keyhygiene_executable(), *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as report:
        assert report.stdout is not None and report.stderr is not None
        header = report.stdout.readline()
        report.stdout.close()
        errors = report.stderr.read()
        report.wait(timeout=60)

    assert header.startswith(first)
    assert (report.returncode, errors) == (0, b"")
