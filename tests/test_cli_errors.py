"""Bad input and failures at the command line: the exit code of the interface and one clear line.

Every case here is something an operator meets in the first hour: no key, the wrong kind of key,
an API or database that is not there, a database another process has locked.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

import db.engine
from db.migrate import upgrade
from keyhygiene.api import EarlyListing
from keyhygiene.context import Database
from keyhygiene.fakeapi import FakeOpenRouter
from keyhygiene.settings import Settings
from tests.conftest import MANAGEMENT_KEY, failure_lines

Cli = Callable[..., object]


@pytest.fixture
def sqlite_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_url: str, fake: FakeOpenRouter) -> Path:
    """A migrated SQLite database and an environment pointing at it and at the fake API."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "keyhygiene.db"
    url = f"sqlite:///{path}"
    for name, value in {
        "OPENROUTER_MANAGEMENT_KEY": MANAGEMENT_KEY,
        "OPENROUTER_BASE_URL": fake_url,
        "KEYHYGIENE_DATABASE_URL": url,
        "KEYHYGIENE_LOG_FORMAT": "json",
        "KEYHYGIENE_HTTP_RETRY_SECONDS": "0.3",
    }.items():
        monkeypatch.setenv(name, value)
    database = Database.open(Settings(_env_file=None, KEYHYGIENE_DATABASE_URL=url), check=False)  # type: ignore[call-arg]
    upgrade(database.engine)
    database.close()
    fake.add_key("some-key")
    return path


def error_line(result: object) -> str:
    """The one line a failed command writes for people (log events are JSON lines)."""
    stderr: str = result.stderr  # type: ignore[attr-defined]
    assert "Traceback" not in stderr
    lines = failure_lines(stderr)
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize("value", [None, "", "   "])
@pytest.mark.parametrize("command", ["sync", "run", "enable"])
def test_a_missing_management_key_is_a_usage_error(
    sqlite_env: Path, cli, monkeypatch: pytest.MonkeyPatch, fake: FakeOpenRouter, value: str | None, command: str
) -> None:
    if value is None:
        monkeypatch.delenv("OPENROUTER_MANAGEMENT_KEY")
    else:
        monkeypatch.setenv("OPENROUTER_MANAGEMENT_KEY", value)
    (sqlite_env.parent / "keyhygiene.toml").write_text("")

    result = cli(command, *(["a" * 64] if command == "enable" else []))

    assert result.exit_code == 2
    assert "OPENROUTER_MANAGEMENT_KEY is not set" in error_line(result)
    assert fake.calls == []
    # Like a bad rules file, no run is recorded: ``status`` and the run counts stay as they were.
    with sqlite3.connect(sqlite_env) as connection:
        assert connection.execute("SELECT count(*) FROM runs").fetchone() == (0,)


def test_a_regular_key_is_refused_and_never_printed(
    sqlite_env: Path, cli, monkeypatch: pytest.MonkeyPatch, fake: FakeOpenRouter
) -> None:
    regular = fake.add_regular_key()
    monkeypatch.setenv("OPENROUTER_MANAGEMENT_KEY", regular)

    result = cli("sync")

    assert result.exit_code == 2
    assert "not a management key" in error_line(result)
    assert regular not in result.stdout + result.stderr
    assert regular.removeprefix("sk-or-v1-") not in result.stdout + result.stderr
    assert [call.path for call in fake.calls] == ["/key"]  # nothing listed with it


def test_a_key_the_api_rejects_is_a_usage_error(
    sqlite_env: Path, cli, monkeypatch: pytest.MonkeyPatch, fake: FakeOpenRouter
) -> None:
    unknown = "sk-or-v1-" + "0123456789abcdef" * 4
    monkeypatch.setenv("OPENROUTER_MANAGEMENT_KEY", unknown)

    result = cli("sync")

    assert result.exit_code == 2
    line = error_line(result)
    assert "rejected by the API (401)" in line
    assert unknown not in result.stdout + result.stderr


def test_an_unreachable_api_fails_in_one_line(sqlite_env: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENROUTER_BASE_URL", "http://127.0.0.1:9/api/v1")

    result = cli("sync")

    assert result.exit_code == 1
    line = error_line(result)
    assert "cannot reach the API at http://127.0.0.1:9/api/v1" in line


def test_an_api_that_keeps_failing_fails_in_one_line(sqlite_env: Path, cli, fake: FakeOpenRouter) -> None:
    fake.faults.server_error(10_000, status=500, retry_after=0.05)

    result = cli("sync")

    assert result.exit_code == 1
    assert "500" in error_line(result)


@pytest.mark.parametrize(
    "url",
    [
        "not a database url",
        "mysql://root:hunter2@db.example/keys",
        "postgresql+nosuchdriver://root:hunter2@127.0.0.1/keys",
    ],
)
@pytest.mark.parametrize("command", [("sync",), ("db", "upgrade"), ("report", "inventory")])
def test_an_invalid_database_url_is_a_usage_error_naming_the_variable(
    sqlite_env: Path, cli, monkeypatch: pytest.MonkeyPatch, url: str, command: tuple[str, ...]
) -> None:
    monkeypatch.setenv("KEYHYGIENE_DATABASE_URL", url)

    result = cli(*command)

    assert result.exit_code == 2
    assert "KEYHYGIENE_DATABASE_URL" in error_line(result)
    assert "hunter2" not in result.stdout + result.stderr  # a password in the URL is not echoed


@pytest.mark.parametrize("command", [("sync",), ("db", "upgrade"), ("report", "inventory")])
def test_a_database_that_cannot_be_reached_fails_in_one_line(
    sqlite_env: Path, cli, monkeypatch: pytest.MonkeyPatch, command: tuple[str, ...]
) -> None:
    monkeypatch.setenv("KEYHYGIENE_DATABASE_URL", "postgresql+psycopg://postgres:hunter2@127.0.0.1:1/test")

    result = cli(*command)

    assert result.exit_code == 1
    line = error_line(result)
    assert "127.0.0.1" in line and "1" in line
    assert "hunter2" not in result.stdout + result.stderr


def test_a_locked_sqlite_database_fails_in_one_line(
    sqlite_env: Path, cli, monkeypatch: pytest.MonkeyPatch, fake: FakeOpenRouter
) -> None:
    monkeypatch.setattr(db.engine, "SQLITE_BUSY_TIMEOUT_MS", 200)
    other = sqlite3.connect(sqlite_env, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        result = cli("sync")
    finally:
        other.rollback()
        other.close()

    assert result.exit_code == 1
    assert "database is locked" in error_line(result)
    # The listing, begun once the store was open and while the run was being recorded, stopped
    # with the command, no further than its head start (tests/test_early_listing.py).
    assert len([call for call in fake.calls if call.path == "/keys"]) <= EarlyListing.HEAD_START_PAGES

    assert cli("sync").exit_code == 0  # and works once the lock is gone


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("report", "inventory", "--at", "9999-12-31T23:59:59-14:00"), "out of range"),
        (("report", "inventory", "--at", "0001-01-01T00:00:00+14:00"), "out of range"),
        (("report", "spend", "--since", "99999999d"), "at most 100 years"),
        (("report", "trends", "--since", "9999999999999w"), "at most 100 years"),
        (("report", "actions", "--since", "9" * 5000 + "d"), "at most 100 years"),
    ],
)
def test_times_and_durations_out_of_range_are_usage_errors(
    sqlite_env: Path, cli, args: tuple[str, ...], words: str
) -> None:
    result = cli(*args)

    assert result.exit_code == 2
    assert words in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("timeout", ["-1", "0", "nan", "inf"])
def test_trigger_timeout_must_be_positive_before_anything_is_queued(
    sqlite_env: Path, cli, monkeypatch: pytest.MonkeyPatch, timeout: str
) -> None:
    # Nothing listens on port 9: had the trigger tried to queue, it would exit 1 "cannot reach the broker".
    monkeypatch.setenv("KEYHYGIENE_BROKER_URL", "redis://127.0.0.1:9/0")

    result = cli("trigger", "run", "--wait", "--timeout", timeout)

    assert result.exit_code == 2
    assert "--timeout" in result.stderr and "more than 0" in result.stderr
    assert "queued" not in result.stdout + result.stderr


BROKEN_RULES = "[[rule]]\nname = 'r'\nmatch = 'expired'\naction = 'disable'\nnames = []\n"


@pytest.mark.parametrize("command", [("plan",), ("enforce",), ("run",), ("report", "idle"), ("rules", "check")])
def test_a_broken_rules_file_stops_the_commands_that_read_it(
    sqlite_env: Path, cli, monkeypatch: pytest.MonkeyPatch, fake: FakeOpenRouter, command: tuple[str, ...]
) -> None:
    (sqlite_env.parent / "rules.toml").write_text(BROKEN_RULES)
    monkeypatch.setenv("KEYHYGIENE_RULES_FILE", str(sqlite_env.parent / "rules.toml"))
    assert cli("sync").exit_code == 0
    fake.clear_calls()

    result = cli(*command)

    assert result.exit_code == 2
    assert f"{sqlite_env.parent / 'rules.toml'}:5: names: must not be an empty list" in error_line(result)
    assert [call for call in fake.calls if call.method != "GET"] == []


@pytest.mark.parametrize("command", [("sync",), ("prune",), ("report", "inventory")])
def test_commands_that_do_not_read_the_rules_file_run_with_a_broken_one(
    sqlite_env: Path, cli, monkeypatch: pytest.MonkeyPatch, command: tuple[str, ...]
) -> None:
    # The inventory is recorded whatever state the rules are in: it is what a fixed rules file reads.
    (sqlite_env.parent / "rules.toml").write_text(BROKEN_RULES)
    monkeypatch.setenv("KEYHYGIENE_RULES_FILE", str(sqlite_env.parent / "rules.toml"))
    assert cli("sync").exit_code == 0

    result = cli(*command)

    assert result.exit_code == 0, result.stderr


def test_dev_zero_as_the_rules_file_stops_plan_at_once(sqlite_env: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYHYGIENE_RULES_FILE", "/dev/zero")
    assert cli("sync").exit_code == 0

    result = cli("plan")

    assert result.exit_code == 2
    assert error_line(result) == "keyhygiene: error: /dev/zero: cannot read the rules file: it is not a regular file"


@pytest.mark.parametrize("command", [("rules", "check", "{path}"), ("plan",)])
def test_a_folder_as_the_rules_file_is_refused_alike_by_every_command(
    sqlite_env: Path, cli, monkeypatch: pytest.MonkeyPatch, command: tuple[str, ...]
) -> None:
    # `rules check FOLDER` answered with click's usage block instead, in other words than plan's.
    folder = sqlite_env.parent / "rules.toml"
    folder.mkdir()
    monkeypatch.setenv("KEYHYGIENE_RULES_FILE", str(folder))

    result = cli(*(part.format(path=folder) for part in command))

    assert result.exit_code == 2
    assert error_line(result) == f"keyhygiene: error: {folder}: cannot read the rules file: it is not a regular file"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("undo", "99999999999999999999999"), "there is no run 99999999999999999999999"),
        (("undo", "9223372036854775808"), "there is no run 9223372036854775808"),
        (("undo", "2147483648", "--dry-run"), "there is no run 2147483648"),
        (("enforce", "--allow-actions", "99999999999999999999999"), "--allow-actions"),
        (("run", "--dry-run", "--allow-actions", "9223372036854775808"), "--allow-actions"),
        (("trigger", "enforce", "--allow-actions", "2147483648"), "--allow-actions"),
        # Not too large, but no run of that id: a typo pages nobody and leaves ``status`` alone.
        (("undo", "999"), "there is no run 999"),
        # Not a key hash: empty, a short prefix's neighbour, too long to store, or part of a path.
        (("enable", ""), "is not a key hash"),
        (("enable", "a" * 129), "is not a key hash"),
        (("enable", "a" * 64, "../keys?x"), "is not a key hash"),
    ],
)
def test_a_number_too_large_to_store_is_bad_usage_and_starts_no_run(
    sqlite_env: Path, cli, fake: FakeOpenRouter, monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...], words: str
) -> None:
    # It was "unexpected error: OverflowError: ... SQLite INTEGER", exit 1, after recording a failed run.
    monkeypatch.setenv("KEYHYGIENE_BROKER_URL", "redis://127.0.0.1:9/0")  # nothing listens: never queued
    (sqlite_env.parent / "keyhygiene.toml").write_text("[safety]\ndry_run = true\n")
    fake.clear_calls()

    result = cli(*args)

    assert result.exit_code == 2
    assert words in result.stderr and "Traceback" not in result.stderr
    assert "OverflowError" not in result.stderr and "unexpected error" not in result.stderr
    assert cli("report", "runs", "--format", "json").stdout.strip() == "[]"
    assert fake.calls == []


@pytest.mark.parametrize("command", [("plan",), ("enforce",), ("rules", "check")])
@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("x = " + "[" * 1000 + "]" * 1000 + "\n", 1, "invalid TOML: arrays or tables nested too deep"),
        ("[safety]\nmax_actions_per_run = " + "9" * 5000 + "\n", 2, "invalid TOML: a number with too many digits"),
    ],
    ids=["nested", "digits"],
)
def test_a_rules_file_python_cannot_parse_is_bad_usage_naming_file_and_line(
    sqlite_env: Path, cli, monkeypatch: pytest.MonkeyPatch, command: tuple[str, ...], text: str, line: int, words: str
) -> None:
    # It was a traceback (RecursionError, ValueError) with exit 1; enforce: "unexpected error: RecursionError".
    path = sqlite_env.parent / "deep.toml"
    path.write_text(text)
    monkeypatch.setenv("KEYHYGIENE_RULES_FILE", str(path))
    assert cli("sync").exit_code == 0

    result = cli(*command)

    assert result.exit_code == 2
    assert f"{path}:{line}: {words}" in error_line(result)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        # Each process would get its own empty database: `db upgrade` said it had migrated it,
        # and every other command then said to run `db upgrade` first.
        ("sqlite://", "invalid settings: KEYHYGIENE_DATABASE_URL: is an in-memory SQLite database"),
        ("sqlite:///:memory:", "invalid settings: KEYHYGIENE_DATABASE_URL: is an in-memory SQLite database"),
        (
            "sqlite:///file:kh?mode=memory&cache=shared&uri=true",
            "invalid settings: KEYHYGIENE_DATABASE_URL: is an in-memory SQLite database",
        ),
        # It was "cannot migrate the database: unable to open database file", naming nothing.
        (
            "sqlite:///{tmp}/no-such-folder/kh.db",
            "names a SQLite file in a folder that does not exist: {tmp}/no-such-folder",
        ),
        # SQLAlchemy warned that it ignored `mode`, and opened the file to write: a read-only
        # database that was written to, and the file created.
        ("sqlite:///{tmp}/kh.db?mode=ro", "has options SQLite takes only in a URI, which it would ignore: mode"),
        # ... and uri=true on a plain path made SQLite open a new, empty file named "kh.db?mode=ro".
        ("sqlite:///{tmp}/kh.db?mode=ro&uri=true", "has uri=true, which needs a file: URI for a path"),
        ("sqlite:///file:{tmp}/kh.db?mode=ro", "names a file: URI without uri=true"),
        # The driver's own options: a traceback (ValueError, exit 1) on first use, value and all.
        ("sqlite:///{tmp}/kh.db?timeout=sk-or-v1-abc", "has an option timeout that is not a number"),
        ("sqlite:///{tmp}/kh.db?timeout=nan", "has an option timeout that is not a number from 0 up"),
        ("sqlite:///{tmp}/kh.db?detect_types=abc", "has an option detect_types that is not a number"),
        ("sqlite:///{tmp}/kh.db?cached_statements=-5", "has an option cached_statements that is not a number"),
        ("sqlite:///{tmp}/kh.db?check_same_thread=maybe", "has an option check_same_thread that is not true or"),
        ("sqlite:///{tmp}/kh.db?timeout=1&timeout=2", "gives the option timeout more than once"),
        # ... and AUTOCOMMIT would store each statement's work on its own: half-written snapshots.
        ("sqlite:///{tmp}/kh.db?isolation_level=AUTOCOMMIT", "sets isolation_level, which keyhygiene does not take"),
    ],
)
@pytest.mark.parametrize("command", [("db", "upgrade"), ("status",)])
def test_a_sqlite_database_that_cannot_hold_anything_is_bad_usage(
    tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch, url: str, says: str, command: tuple[str, ...]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KEYHYGIENE_DATABASE_URL", url.format(tmp=tmp_path))

    result = cli(*command)

    assert result.exit_code == 2
    assert says.format(tmp=tmp_path) in error_line(result)
    assert list(tmp_path.iterdir()) == []


def test_rules_check_of_an_empty_file_name_says_so(sqlite_env: Path, cli) -> None:
    # It fell back to KEYHYGIENE_RULES_FILE and named that file.
    result = cli("rules", "check", "")

    assert result.exit_code == 2
    assert error_line(result) == "keyhygiene: error: rules check: the rules file's name is empty"


@pytest.mark.parametrize(
    ("variables", "says"),
    [
        # Read by the HTTP client, not by keyhygiene's settings: they failed every request as an
        # "unexpected error" (exit 1), one quoting the proxy variable's value, password and all.
        ({"HTTP_PROXY": "ftp://ops:Pr0xyPw@proxy.example:21"}, "HTTP_PROXY does not hold a proxy URL httpx can use"),
        # These two were "unexpected error: ImportError ... socksio" and "...: UnicodeError", exit 1.
        ({"HTTP_PROXY": "socks5://ops:Pr0xyPw@proxy.example:1080"}, "HTTP_PROXY names a SOCKS proxy, which needs"),
        ({"HTTP_PROXY": "http://ops:Pr0xyPw@proxy..example:3128"}, "HTTP_PROXY does not hold a proxy URL httpx can"),
        (
            {"SSL_CERT_FILE": "/nonexistent/ca.pem", "OPENROUTER_BASE_URL": "https://127.0.0.1:9/api/v1"},
            "SSL_CERT_FILE names /nonexistent/ca.pem, which is not a file",
        ),
        (
            {"SSL_CERT_FILE": "{tmp}/keyhygiene.db", "OPENROUTER_BASE_URL": "https://127.0.0.1:9/api/v1"},
            "keyhygiene.db, which holds no certificate that can be read",
        ),
        ({"OPENROUTER_BASE_URL": "https://api..example/v1"}, "OPENROUTER_BASE_URL: has a host name that cannot"),
        ({"KEYHYGIENE_DATABASE_URL": "sqlite:///{tmp}"}, "KEYHYGIENE_DATABASE_URL names a folder, not a SQLite file"),
    ],
    ids=["proxy", "socks-proxy", "proxy-host", "ca-file", "ca-file-no-certificate", "host", "db-folder"],
)
def test_an_unusable_environment_for_the_api_or_the_store_is_a_usage_error_naming_it(
    sqlite_env: Path, cli, fake: FakeOpenRouter, monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], says: str
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value.format(tmp=sqlite_env.parent))
    fake.clear_calls()

    result = cli("sync")

    assert result.exit_code == 2, result.stderr
    line = error_line(result)
    assert says in line and "unexpected error" not in line
    assert "Pr0xyPw" not in result.stderr + result.stdout
    assert fake.calls == []


@pytest.mark.parametrize(
    "command",
    [
        ("enable", "{key}"),
        ("enable", "a" * 64, "{key}"),
        ("undo", "{key}"),
        ("report", "{key}"),
        ("report", "inventory", "--format", "{key}"),
        ("plan", "--limit", "{key}"),
        ("{key}",),
    ],
    ids=["enable", "enable-second", "undo", "report-kind", "format", "limit", "command"],
)
@pytest.mark.parametrize("key", [MANAGEMENT_KEY, "orkey-7a1c9e0b5d3f"], ids=["openrouter-shaped", "other-shape"])
def test_the_management_key_pasted_as_an_argument_is_neither_echoed_nor_stored(
    sqlite_env: Path, cli, fake: FakeOpenRouter, monkeypatch: pytest.MonkeyPatch, command: tuple[str, ...], key: str
) -> None:
    """`enable <key>` took the key for a hash: it was stored in the audit log (and printed by
    `report actions`); click's usage errors quoted it in full."""
    monkeypatch.setenv("OPENROUTER_MANAGEMENT_KEY", key)
    fake.clear_calls()

    result = cli(*(part.format(key=key) for part in command))

    assert result.exit_code == 2, result.stdout + result.stderr
    assert key not in result.stdout + result.stderr
    assert key.encode() not in sqlite_env.read_bytes()
    assert fake.calls == []


def test_a_key_set_only_in_dotenv_is_not_echoed_when_another_setting_is_invalid(
    tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Settings refused (KEYHYGIENE_RETENTION without a unit) left the key in .env unknown to the
    redaction, and click's usage error quoted it back where it was pasted as a run id."""
    key = "orkey-7a1c9e0b5d3f2e8d9c"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPENROUTER_MANAGEMENT_KEY", raising=False)
    monkeypatch.setenv("KEYHYGIENE_RETENTION", "40")
    (tmp_path / ".env").write_text(f"OPENROUTER_MANAGEMENT_KEY={key}\n")

    for command in (("undo", key), ("report", "inventory", "--since", key), (key,)):
        result = cli(*command)
        assert result.exit_code == 2, result.stderr
        assert key not in result.stdout + result.stderr, command
        assert "[REDACTED]" in result.stderr
