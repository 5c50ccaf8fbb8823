"""``keyhygiene report`` at the command line: output formats, and bad input as one line and an exit code."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from keyhygiene.context import Database
from keyhygiene.fakeapi import FakeOpenRouter
from tests.conftest import failure_lines
from tests.test_reports_support import RULES, Org, build_history, day

pytestmark = pytest.mark.postgres

AT = "2026-03-11T12:30:00Z"
KINDS = ("inventory", "spend", "actions", "idle", "trends")


@pytest.fixture
def org(database: Database, fake: FakeOpenRouter, fake_url: str, env: dict[str, str]) -> Iterator[Org]:
    rules = Path(env["KEYHYGIENE_RULES_FILE"])
    rules.write_text(RULES)
    org = Org(database, fake, fake_url, rules_file=rules)
    try:
        build_history(org)
        assert org.run("enforce", day(10, 12.25)).exit_code == 0
        yield org
    finally:
        org.close()


def one_error_line(result: Any) -> str:
    assert "Traceback" not in result.stderr
    lines = failure_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    return str(lines[0])


@pytest.mark.parametrize("kind", KINDS)
def test_json_is_exactly_one_array_on_stdout(org: Org, cli: Callable[..., Any], kind: str) -> None:
    result = cli("report", kind, "--at", AT, "--since", "10d", "--format", "json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)  # nothing else on stdout, or this fails
    assert isinstance(rows, list) and rows and all(isinstance(row, dict) for row in rows)


@pytest.mark.parametrize("kind", KINDS)
def test_csv_has_a_header_row(org: Org, cli: Callable[..., Any], kind: str) -> None:
    result = cli("report", kind, "--at", AT, "--since", "10d", "--format", "csv")
    assert result.exit_code == 0, result.stderr
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert len(rows) > 1 and all(len(row) == len(rows[0]) for row in rows)
    as_json = json.loads(cli("report", kind, "--at", AT, "--since", "10d", "--format", "json").stdout)
    assert rows[0][: len(as_json[0])] == list(as_json[0])[: len(rows[0])]


def test_a_table_shows_the_first_rows_and_counts_the_rest(org: Org, cli: Callable[..., Any]) -> None:
    every = json.loads(cli("report", "inventory", "--at", AT, "--format", "json").stdout)
    assert len(every) > 3
    names = [row["name"] for row in every]

    cut = cli("report", "inventory", "--at", AT, "--limit", "2")
    assert cut.exit_code == 0, cut.stderr
    assert f"... and {len(every) - 2:,} more rows" in cut.stdout
    assert [name for name in names if name in cut.stdout] == names[:2]

    whole = cli("report", "inventory", "--at", AT, "--limit", "0")
    assert "more rows" not in whole.stdout
    assert all(name in whole.stdout for name in names)


def test_a_log_cut_short_shows_its_newest_rows(org: Org, cli: Callable[..., Any]) -> None:
    """`report actions` and `report runs` list oldest first: before, `--limit` (100 by default) kept
    the oldest rows, and the records of what an operator just did were the ones left out."""
    for kind, key in (("actions", "id"), ("runs", "run_id")):
        every = json.loads(cli("report", kind, "--since", "400d", "--format", "json").stdout)
        assert len(every) > 3, kind
        cut = cli("report", kind, "--since", "400d", "--limit", "2")
        assert cut.exit_code == 0, cut.stderr
        assert f"(the newest 2 rows; {len(every) - 2:,} earlier ones are not shown" in cut.stdout
        if kind == "runs":
            shown = [line.split()[0] for line in cut.stdout.splitlines() if line[:4].strip().isdigit()]
            assert shown == [str(row[key]) for row in every[-2:]]
        else:  # read newest first from the database, and its total counted there
            assert f"{len(every)} records" in cut.stdout
            body = cut.stdout.split("\u2500\n", 1)[1]
            assert [row["key_name"] for row in every[-2:]] == [line.split()[2] for line in body.splitlines()[:2]]


def test_a_log_of_many_dry_runs_counts_each_runs_plan_and_streams_it(org: Org, cli: Callable[..., Any]) -> None:
    """Hourly dry runs record their plan once and refer to it: the table's title counts each run's
    decisions in SQL, JSON and CSV are written as they are read; all three agree."""
    for hour in range(3):
        assert org.run("enforce", day(10, 13 + hour)).exit_code == 0
    every = json.loads(cli("report", "actions", "--since", "400d", "--format", "json").stdout)
    planned = sum(row["outcome"] == "planned" for row in every)
    assert planned >= 4 * sum(row["outcome"] == "planned" and row["run_id"] == every[-1]["run_id"] for row in every)
    table = cli("report", "actions", "--since", "400d", "--limit", "5")
    assert f": {len(every)} records (" in table.stdout and f"{planned} planned" in table.stdout
    as_csv = cli("report", "actions", "--since", "400d", "--format", "csv").stdout
    assert len(as_csv.splitlines()) == len(every) + 1
    named = cli("report", "actions", "--since", "400d", "--limit", "5", "--name", "a*")
    wanted = [row for row in every if row["key_name"].startswith("a")]
    assert f": {len(wanted)} records" in named.stdout
    # The filters are applied as the records are read, stored plans' entries included: the same rows.
    assert json.loads(cli("report", "actions", "--since", "400d", "--name", "a*", "--format", "json").stdout) == wanted
    found = 0
    for workspace in {row["workspace_id"] for row in every} | {"ws-research"}:
        asked = ("--workspace", workspace, "--name", "[a-k]*", "--format", "json")
        listed = json.loads(cli("report", "actions", "--since", "400d", *asked).stdout)
        assert listed == [
            row for row in every if row["workspace_id"] == workspace and "a" <= row["key_name"][:1] <= "k"
        ]
        found += len(listed)
    assert 0 < found < len(every)


def test_a_per_key_table_names_each_keys_workspace(org: Org, cli: Callable[..., Any]) -> None:
    """A key name may be in several workspaces: the tables name the workspace beside the key's name."""
    for kind in ("inventory", "spend", "idle", "actions"):
        table = cli("report", kind, "--at", AT, "--since", "10d")
        assert table.exit_code == 0, table.stderr
        header = next(line for line in table.stdout.splitlines() if "workspace" in line)
        assert header.split()[1:3] == ["name", "workspace"] or header.split()[1:3] == ["key", "workspace"], header
        assert "Research" in table.stdout or kind in ("idle", "actions"), table.stdout
        assert max(len(line) for line in table.stdout.splitlines()) <= 80


def test_spend_by_and_filters_at_the_command_line(org: Org, cli: Callable[..., Any]) -> None:
    result = cli("report", "spend", "--at", AT, "--since", "7d", "--by", "workspace", "--format", "json")
    assert [row["total"] for row in json.loads(result.stdout)] == [19.5, 1.5]
    result = cli("report", "spend", "--at", AT, "--since", "7d", "--workspace", "ws-research", "--format", "json")
    assert [row["name"] for row in json.loads(result.stdout)] == ["hotel"]
    result = cli("report", "spend", "--at", AT, "--since", "7d", "--name", "[a-c]*")
    assert result.exit_code == 0
    assert "alpha" in result.stdout and "delta" not in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    # By name, exactly; a typo is refused rather than read as a workspace that spent nothing.
    result = cli("report", "spend", "--at", AT, "--since", "7d", "--workspace", "Research", "--format", "json")
    assert [row["name"] for row in json.loads(result.stdout)] == ["hotel"]
    for typo in ("research", "ws-reserch"):
        result = cli("report", "spend", "--at", AT, "--since", "7d", "--workspace", typo)
        assert result.exit_code == 2
        assert f"--workspace {typo!r} is no workspace id or name the history holds" in result.stderr


def test_idle_uses_the_rules_file(org: Org, cli: Callable[..., Any]) -> None:
    rows = json.loads(cli("report", "idle", "--at", AT, "--format", "json").stdout)
    kilo = next(row for row in rows if row["name"] == "kilo")
    assert (kilo["next_rule"], kilo["acts_on"]) == ("disable-idle", "2026-03-21T12:00:00Z")


def test_idle_by_owner_shows_one_row_per_owner_in_a_table(org: Org, cli: Callable[..., Any]) -> None:
    owners = json.loads(cli("report", "idle", "--at", AT, "--by", "owner", "--format", "json").stdout)
    assert owners and all(set(row) >= {"owner", "keys", "longest_idle_days"} for row in owners)

    table = cli("report", "idle", "--at", AT, "--by", "owner")
    assert table.exit_code == 0, table.stderr
    assert "longest idle" in table.stdout and "idle days" not in table.stdout
    lines = table.stdout.splitlines()
    shown = [line.split() for line in lines[lines.index(next(line for line in lines if line.startswith("─"))) + 1 :]]
    expected = [
        [row["owner"] or "-", *(str(row[name]) for name in ("keys", "disabled", "longest_idle_days", "rule_acts"))]
        for row in owners
    ]
    assert [line for line in shown if line] == expected


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("report", "bogus"), 2, "'bogus' is not one of"),
        (("report", "spend", "--since", "3 weeks"), 2, "invalid duration '3 weeks'"),
        (("report", "inventory", "--at", "last tuesday"), 2, "invalid time 'last tuesday'"),
        (("report", "inventory", "--at", "2026-01-01"), 1, "is before the first stored snapshot"),
        (("report", "inventory", "--at", "2999-01-01"), 2, "is in the future"),
        (("report", "spend", "--by", "team"), 2, "'team' is not one of"),
        (("report", "html"), 2, "report html needs --out FILE"),
        (("report", "html", "--out", "/nonexistent/dir/report.html"), 1, "cannot write /nonexistent/dir"),
        # An option the kind would ignore: a grouping, a filter or a file it would not apply.
        (("report", "inventory", "--by", "owner"), 2, "report inventory does not take --by"),
        (("report", "trends", "--by", "day"), 2, "report trends does not take --by"),
        (("report", "runs", "--workspace", "Default", "--name", "x*"), 2, "does not take --workspace or --name"),
        (("report", "spend", "--out", "spend.csv"), 2, "report spend does not take --out"),
        # Given explicitly, even as the default it would otherwise be: said, not passed over.
        (("report", "inventory", "--by", "key"), 2, "report inventory does not take --by"),
        (("report", "html", "--out", "r.html", "--limit", "5"), 2, "report html does not take --limit"),
    ],
)
def test_bad_input_is_one_line_and_the_interface_exit_code(
    org: Org, cli: Callable[..., Any], args: tuple[str, ...], code: int, message: str
) -> None:
    result = cli(*args)
    assert result.exit_code == code, result.stderr
    assert result.stdout == ""
    assert message in result.stderr
    if code == 1:
        assert one_error_line(result).startswith("keyhygiene: error: ")


@pytest.mark.parametrize("kind", [*KINDS, "html"])
def test_an_empty_database_says_to_sync_first(
    database: Database, env: dict[str, str], cli: Callable[..., Any], tmp_path: Path, kind: str
) -> None:
    result = cli("report", kind, *(("--out", str(tmp_path / "report.html")) if kind == "html" else ()))
    assert result.exit_code == 1
    assert one_error_line(result) == (
        "keyhygiene: error: there is no complete snapshot yet: run `keyhygiene sync` first"
    )
    assert not (tmp_path / "report.html").exists()


def test_the_audit_report_takes_a_workspace_only_its_records_still_hold(org: Org, cli: Callable[..., Any]) -> None:
    # A workspace deleted long ago: the snapshots kept no longer name it, the audit log does.
    from db import audit, runs
    from keyhygiene.context import session_scope

    with session_scope(org.database) as session:
        run_id = runs.start_run(session, kind="enforce", now=day(9), dry_run=False).id
        audit.record_actions(
            session,
            [
                {
                    "run_id": run_id,
                    "now": day(9),
                    "key_hash": "0" * 64,
                    "key_name": "gone-key",
                    "workspace_id": "ws-gone",
                    "rule": "delete-expired",
                    "rules": ["delete-expired"],
                    "action": "delete",
                    "dry_run": False,
                    "outcome": "done",
                    "evidence": {},
                }
            ],
        )

    listed = cli("report", "actions", "--at", AT, "--since", "7d", "--workspace", "ws-gone", "--format", "json")
    assert listed.exit_code == 0, listed.stderr
    assert [row["key_name"] for row in json.loads(listed.stdout)] == ["gone-key"]
    spend = cli("report", "spend", "--at", AT, "--since", "7d", "--workspace", "ws-gone")
    assert spend.exit_code == 2  # the snapshots hold no such workspace: no key of it ever spent
