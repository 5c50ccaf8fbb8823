"""The HTML report rendered in a real browser: the charts drew, and their figures are the JSON reports'.

Needs headless Chromium (Debian's ``chromium`` package); the test installs nothing and is skipped,
saying so, where no Chromium is found.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from datetime import timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from keyhygiene.context import Database
from keyhygiene.fakeapi import FakeOpenRouter
from tests.test_reports_support import RULES, Org, build_history, day

pytestmark = [pytest.mark.browser, pytest.mark.postgres]

AT = "2026-03-11T12:30:00Z"  # tests.test_reports_support.NOW
SINCE = "10d"


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture
def org(database: Database, fake: FakeOpenRouter, fake_url: str, tmp_path: Path, env: dict[str, str]) -> Iterator[Org]:
    rules = Path(env["KEYHYGIENE_RULES_FILE"])
    rules.write_text(RULES)
    org = Org(database, fake, fake_url, rules_file=rules)
    try:
        build_history(org)
        assert org.run("enforce", day(10, 12.25)).exit_code == 0
        yield org
    finally:
        org.close()


class _Page(HTMLParser):
    """What the test reads back from the rendered DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.charts: dict[str, dict[str, str]] = {}
        self.figures: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
        self.cards: dict[str, float] = {}
        self.body: dict[str, str] = {}
        self._table: str | None = None
        self._row: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        if tag == "body":
            self.body = values
        elif tag == "svg" and "data-chart" in values:
            self.charts[values["data-chart"]] = values
        elif tag == "table" and "data-figures" in values:
            self._table = values["data-figures"]
        elif tag == "tr" and self._table is not None and "data-key" in values:
            self._row = values["data-key"]
            self.figures[self._table][self._row] = {}
        elif tag == "td" and self._row is not None and "data-value" in values:
            self.figures[self._table or ""][self._row][values["data-col"]] = float(values["data-value"])
        elif "data-figure" in values:
            self.cards[values["data-figure"]] = float(values["data-value"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None
        elif tag == "tr":
            self._row = None


def chromium_args(binary: str, profile: Path) -> list[str]:
    return [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1280,2000",
    ]


def json_report(cli: Callable[..., Any], *args: str) -> list[dict[str, Any]]:
    result = cli("report", *args, "--at", AT, "--format", "json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert isinstance(rows, list)
    return rows


def test_the_html_report_draws_its_charts_and_matches_the_json_reports(
    org: Org, cli: Callable[..., Any], tmp_path: Path
) -> None:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("headless Chromium not found on PATH (install Debian's `chromium` package to run this test)")
    out = tmp_path / "report.html"
    result = cli("report", "html", "--at", AT, "--since", SINCE, "--out", str(out))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == f"wrote {out}"
    page = out.read_text()
    # Self-contained: nothing to fetch, and a policy that forbids fetching anyway.
    assert not re.search(r"\b(src|href)\s*=|@import|url\(|<link", page, re.IGNORECASE)
    assert "default-src 'none'" in page

    profile = tmp_path / "chromium-profile"
    dom = subprocess.run(
        [*chromium_args(chromium, profile), "--dump-dom", out.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    shot = tmp_path / "report.png"
    subprocess.run(
        [*chromium_args(chromium, profile), f"--screenshot={shot}", out.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.stat().st_size > 20_000  # a page with charts, not a blank one

    rendered = _Page()
    rendered.feed(dom)
    assert rendered.body.get("data-measured") == "yes", "the page's script did not run"
    assert set(rendered.charts) == {"spend", "states", "idle", "upcoming", "audit"}
    for name, chart in rendered.charts.items():
        assert int(chart["data-drawn"]) > 0, f"chart {name} drew nothing"
        width, height = (int(part) for part in chart["data-size"].split("x"))
        assert width > 200 and height > 80, f"chart {name} is {chart['data-size']}"

    # Spend: every day's total, and the top keys, are those of `report spend`.
    by_day = json_report(cli, "spend", "--by", "day", "--since", SINCE)
    assert {row["day"]: row["total"] for row in by_day} == {
        key: cells["total"] for key, cells in rendered.figures["spend-by-day"].items()
    }
    per_key = json_report(cli, "spend", "--since", SINCE)
    assert {row["key_hash"]: row["total"] for row in per_key[:5]} == {
        key: cells["total"] for key, cells in rendered.figures["spend-top-keys"].items()
    }
    assert rendered.cards["spend-total"] == pytest.approx(sum(row["total"] for row in per_key))
    assert int(rendered.charts["spend"]["data-drawn"]) >= len(by_day)  # a bar (or more) per day

    # Keys by state: the trends report, day by day.
    trends = json_report(cli, "trends", "--since", SINCE)
    fields = ("keys", "disabled", "expired", "no_expiry", "no_limit", "idle_30d")
    assert {row["day"]: {field: float(row[field]) for field in fields} for row in trends} == dict(
        rendered.figures["trends"]
    )
    assert rendered.cards["idle-30d"] == trends[-1]["idle_30d"]

    # Idle ageing: the idle report's keys, by how long they have been idle.
    idle = json_report(cli, "idle")
    buckets = {"7-13 days": (7, 14), "14-29 days": (14, 30), "30-59 days": (30, 60), "60-89 days": (60, 90)}
    for label, (low, high) in buckets.items():
        members = [row for row in idle if low <= row["idle_days"] < high]
        cells = rendered.figures["idle-ageing"][label]
        assert cells == {
            "enabled": sum(not r["disabled"] for r in members),
            "disabled": sum(r["disabled"] for r in members),
        }

    # The audit log: its outcomes are the actions report's.
    actions = json_report(cli, "actions", "--since", SINCE)
    assert rendered.cards["audit-records"] == len(actions) == 4
    assert rendered.figures["audit-outcomes"] == {"planned": {"records": 4.0}}

    inventory = json_report(cli, "inventory")
    assert rendered.cards["keys"] == len(inventory)


def test_the_cards_of_a_page_for_some_names_count_only_the_keys_of_those_names(
    org: Org, cli: Callable[..., Any], tmp_path: Path
) -> None:
    # Under an "only name *o*" banner, the key and idle cards counted every key of the workspaces.
    out = tmp_path / "report.html"
    result = cli("report", "html", "--at", AT, "--since", SINCE, "--name", "*o*", "--out", str(out))
    assert result.exit_code == 0, result.stderr
    page = _Page()
    page.feed(out.read_text())  # the cards are in the page as written, no script needed

    named = json_report(cli, "inventory", "--name", "*o*")
    everyone = json_report(cli, "inventory")
    idle_named = json_report(cli, "idle", "--since", "30d", "--name", "*o*")
    assert 0 < len(named) < len(everyone)
    assert page.cards["keys"] == len(named)
    assert page.cards["idle-30d"] == len(idle_named)
    assert "--name does not apply here" in out.read_text()


def test_the_html_report_goes_to_standard_output_with_out_dash(
    org: Org, cli: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    written = tmp_path / "report.html"
    assert cli("report", "html", "--at", AT, "--since", SINCE, "--out", str(written)).exit_code == 0

    result = cli("report", "html", "--at", AT, "--since", SINCE, "--out", "-")

    assert result.exit_code == 0, result.stderr
    made_at = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z")  # when each page was made
    assert made_at.sub("", result.stdout) == made_at.sub("", written.read_text(encoding="utf-8"))
    assert result.stdout.startswith("<!DOCTYPE html>")
    assert not (tmp_path / "-").exists()


def test_the_html_report_replaces_its_file_whole_and_writes_through_a_link(
    org: Org, cli: Callable[..., Any], tmp_path: Path
) -> None:
    target = tmp_path / "reports" / "hygiene.html"
    target.parent.mkdir()
    target.write_text("last week's report")
    link = tmp_path / "latest.html"
    link.symlink_to(target)

    result = cli("report", "html", "--at", AT, "--since", SINCE, "--out", str(link))

    assert result.exit_code == 0, result.stderr
    assert link.is_symlink() and target.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert sorted(path.name for path in target.parent.iterdir()) == ["hygiene.html"]  # no part left behind


def test_the_audit_section_counts_every_record_per_day_and_lists_the_newest(
    database: Database, fake: FakeOpenRouter, fake_url: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Live changes (one record each) and dry runs that refer to their stored plan, on several
    days: the page's counts per day and outcome, read without the records' JSON, and its newest
    records are the actions report's, with and without --name."""
    from keyhygiene.reports import ReportParams, actions, html

    monkeypatch.setattr(html, "RECENT_AUDIT", 6)  # fewer than the records, as in a long log

    rules = Path(env["KEYHYGIENE_RULES_FILE"])
    rules.write_text(RULES.replace("dry_run = true", "dry_run = false"))
    org = Org(database, fake, fake_url, rules_file=rules)
    try:
        build_history(org)
        for k in (6, 7, 8):
            assert org.run("enforce", day(k, 13), dry_run=True).exit_code == 0
        assert org.run("enforce", day(9, 13)).exit_code == 0  # live: disables the idle keys
        assert org.run("enforce", day(10, 12.25), dry_run=True).exit_code == 0
    finally:
        org.close()

    at = day(10, 12.5)
    for name in (None, "*o*"):
        params = ReportParams(now=at, at=at, since=timedelta(days=10), name=name, fmt="json")
        with database.sessions() as session:
            rows = list(actions.records(session, params))
            summary = html._AuditSummary.read(session, params)
        assert summary.per_day == Counter((row["time"].date(), row["outcome"]) for row in rows)
        assert {outcome for _, outcome in summary.per_day} == {"planned", "done"}
        assert len({day for day, _ in summary.per_day}) == 5
        assert summary.total == len(rows) > 6
        assert [(r["time"], r["key_hash"], r["outcome"]) for r in summary.recent] == [
            (r["time"], r["key_hash"], r["outcome"]) for r in rows[::-1][:6]
        ]
