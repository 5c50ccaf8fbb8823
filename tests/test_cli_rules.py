"""`keyhygiene rules check` and `keyhygiene plan` as an operator uses them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from keyhygiene.fakeapi import FakeOpenRouter

from .conftest import CliResult, failure_lines

GOOD = """
[safety]
dry_run = true
protect_names = ["prod-*"]

[[rule]]
name = "disable-idle"
match = "unused"
idle_for = "30d"
action = "disable"
"""


@pytest.fixture
def good_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A valid rules file, in the working directory."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "rules.toml"
    path.write_text(GOOD)
    return path


def test_rules_check_prints_the_rules_as_understood(good_file: Path, cli: Callable[..., CliResult]) -> None:
    result = cli("rules", "check", str(good_file))

    assert result.exit_code == 0, result.stderr
    assert "disable-idle" in result.stdout
    assert "30d" in result.stdout
    assert "prod-*" in result.stdout
    assert "DRY RUN" in result.stdout


def test_rules_check_shows_a_name_with_control_characters_escaped_on_its_one_line(
    tmp_path: Path, cli: Callable[..., CliResult]
) -> None:
    """A rule's name holding a line break and an ESC printed as two lines, the second one faking
    another rule; as the tables show names, they are escaped."""
    path = tmp_path / "rules.toml"
    path.write_text('[[rule]]\nname = "evil\\u001b[31mRED\\r\\n2. fake"\nmatch = "expired"\naction = "report"\n')

    result = cli("rules", "check", str(path))

    assert result.exit_code == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if "evil" in line]
    assert line.startswith("  1. evil\\x1b[31mRED\\x0d\\x0a2. fake: keys that have expired")
    assert "\x1b" not in result.stdout and "\r" not in result.stdout


def test_rules_check_reads_the_configured_file_by_default(
    tmp_path: Path, cli: Callable[..., CliResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "custom.toml").write_text(GOOD)
    monkeypatch.setenv("KEYHYGIENE_RULES_FILE", str(tmp_path / "custom.toml"))

    result = cli("rules", "check")

    assert result.exit_code == 0, result.stderr
    assert "disable-idle" in result.stdout


@pytest.mark.parametrize(
    ("broken", "line", "field"),
    [
        (GOOD.replace('idle_for = "30d"', 'idle_for = "a month"'), 9, "idle_for"),
        (GOOD.replace('match = "unused"', 'match = "unsused"'), 8, "match"),
        (GOOD.replace('action = "disable"', 'action = "disable"\nthreshold_usd = 5.0'), 11, "threshold_usd"),
        (GOOD.replace("dry_run = true", "dry_run = true\nmax_actions = 5"), 4, "max_actions"),
    ],
)
def test_rules_check_names_file_line_and_field(
    broken: str,
    line: int,
    field: str,
    tmp_path: Path,
    cli: Callable[..., CliResult],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "rules.toml"
    path.write_text(broken)

    result = cli("rules", "check", str(path))

    assert result.exit_code == 2
    assert f"{path}:{line}: {field}" in result.stderr
    assert "Traceback" not in result.stderr


def test_rules_check_of_a_given_file_still_refuses_bad_settings(
    good_file: Path, cli: Callable[..., CliResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every command validates its settings when it starts, this one too where FILE is given.
    monkeypatch.setenv("KEYHYGIENE_HTTP_CONCURRENCY", "0")

    result = cli("rules", "check", str(good_file))

    assert result.exit_code == 2
    assert failure_lines(result.stderr)[0].startswith(
        "keyhygiene: error: invalid settings: KEYHYGIENE_HTTP_CONCURRENCY: "
    ), result.stderr
    assert result.stdout == ""


def test_rules_check_of_a_missing_file(tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    result = cli("rules", "check", str(tmp_path / "nope.toml"))

    assert result.exit_code == 2
    assert "nope.toml" in result.stderr


def test_plan_without_a_snapshot_says_to_sync_first(
    env: dict[str, str], cli: Callable[..., CliResult], rules_file: Callable[[str], Path]
) -> None:
    rules_file(GOOD)
    assert cli("db", "upgrade").exit_code == 0

    result = cli("plan")

    assert result.exit_code == 1
    assert "keyhygiene sync" in result.stderr


def test_every_command_has_help(cli: Callable[..., CliResult]) -> None:
    commands = [
        [],
        ["db"],
        ["db", "upgrade"],
        ["sync"],
        ["plan"],
        ["enforce"],
        ["run"],
        ["rules"],
        ["rules", "check"],
        ["report"],
        ["trigger"],
        ["worker"],
        ["beat"],
        ["demo"],
        ["prune"],
    ]
    for command in commands:
        result = cli(*command, "--help")
        assert result.exit_code == 0, (command, result.stderr)
        assert "Usage:" in result.stdout


KEY_HASH = "5c" * 32


def test_rules_check_and_plan_warn_about_a_protected_hash_that_is_not_whole(
    env: dict[str, str],
    fake: FakeOpenRouter,
    cli: Callable[..., CliResult],
    rules_file: Callable[[str], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A hash copied from plan's table (10 characters) protected nothing, and nothing said so.
    path = rules_file(GOOD.replace("dry_run = true", f'dry_run = true\nprotect_hashes = ["{KEY_HASH}", "5c5c5c5c5c"]'))
    fake.add_key("some-key")
    assert cli("db", "upgrade").exit_code == 0
    assert cli("sync").exit_code == 0
    warning = (
        f'{path}:4: protect_hashes: entry 2 ("5c5c5c5c5c") is not 64 lowercase hex '
        "characters like a key hash: it protects only a key whose hash is exactly this; protect_hashes "
        "compares whole key hashes exactly (`plan --format json` shows them whole)"
    )

    for command in (("rules", "check"), ("plan",), ("plan", "--format", "json")):
        result = cli(*command)
        assert result.exit_code == 0, result.stderr
        # The logs are JSON here (KEYHYGIENE_LOG_FORMAT=json): so is the warning, as every line on stderr.
        assert all(line.startswith("{") for line in result.stderr.splitlines()), result.stderr
        assert [event["message"] for event in result.events_named("rules_warning")] == [warning], command
    monkeypatch.setenv("KEYHYGIENE_LOG_FORMAT", "console")
    plain = cli("rules", "check")
    assert f"keyhygiene: warning: {warning}" in plain.stderr.splitlines()


def test_a_protected_hash_with_white_space_around_it_stops_rules_check_and_plan(
    env: dict[str, str], cli: Callable[..., CliResult], rules_file: Callable[[str], Path]
) -> None:
    path = rules_file(GOOD.replace("dry_run = true", f'dry_run = true\nprotect_hashes = ["{KEY_HASH} "]'))
    assert cli("db", "upgrade").exit_code == 0

    for command in (("rules", "check"), ("plan",)):
        result = cli(*command)
        assert result.exit_code == 2
        assert failure_lines(result.stderr)[-1].startswith(
            f"keyhygiene: error: {path}:4: protect_hashes: entry 1 has white space around it"
        ), result.stderr


def test_a_webhook_url_written_as_a_variable_name_is_never_echoed(
    env: dict[str, str], tmp_path: Path, cli: Callable[..., CliResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    # url_env of the wrong type used to be echoed, URL and all, and logged by enforce as run_not_started.
    url = "https://hooks.slack.com/services/T000/B000/" + "f00d" * 8
    secrets = tmp_path / "secrets"  # where the session's secret scan expects secrets
    secrets.mkdir()
    (secrets / "rules.toml").write_text(f'[[notify]]\nname = "ops"\nurl_env = ["{url}"]\n')
    monkeypatch.setenv("KEYHYGIENE_RULES_FILE", str(secrets / "rules.toml"))
    assert cli("db", "upgrade").exit_code == 0

    for command in (("rules", "check"), ("enforce",)):
        result = cli(*command)
        assert result.exit_code == 2
        assert f"{secrets / 'rules.toml'}:3: url_env: expected the name of the environment variable" in result.stderr
        assert "f00d" not in result.stdout + result.stderr
    errors = [event["event"] for event in result.events if event["level"] == "error"]
    assert errors == ["run_not_started", "command_failed"]


def test_rules_check_lists_the_notify_targets_and_warns_of_one_whose_notices_would_fail(
    good_file: Path, cli: Callable[..., CliResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before, a target whose URL variable was unset passed the check, and each run's notice failed.
    good_file.write_text(
        GOOD
        + '[[notify]]\nname = "ops"\nurl_env = "KH_TEST_OPS_HOOK"\non = ["failed"]\n'
        + '[[notify]]\nname = "owners"\nurl_env = "KH_TEST_OWNERS_HOOK"\nsecret_env = "KH_TEST_OWNERS_SECRET"\n'
        + 'on = ["upcoming"]\nupcoming_within = "7d"\n'
    )
    monkeypatch.delenv("KH_TEST_OPS_HOOK", raising=False)
    monkeypatch.setenv("KH_TEST_OWNERS_HOOK", "ftp://hooks.example/f00dcafe")
    monkeypatch.setenv("KH_TEST_OWNERS_SECRET", "s3cr3t-f00dcafe")

    result = cli("rules", "check", str(good_file))

    assert result.exit_code == 0, result.stderr  # valid as written: the environment is the worker's business
    assert "ops: json to the URL in KH_TEST_OPS_HOOK, on failed" in result.stdout
    assert (
        "owners: json to the URL in KH_TEST_OWNERS_HOOK, on upcoming (due within 7d), "
        "signed with the secret in KH_TEST_OWNERS_SECRET"
    ) in result.stdout
    assert [event["message"] for event in result.events_named("rules_warning")] == [
        "notify 'ops': KH_TEST_OPS_HOOK is not set: its notices would fail",
        "notify 'owners': KH_TEST_OWNERS_HOOK does not hold a valid http(s) URL: its notices would fail",
    ]
    assert all(line.startswith("{") for line in result.stderr.splitlines()), result.stderr
    assert "f00dcafe" not in result.stdout + result.stderr

    monkeypatch.setenv("KH_TEST_OPS_HOOK", "https://hooks.example/ops")
    monkeypatch.setenv("KH_TEST_OWNERS_HOOK", "https://hooks.example/owners")
    assert cli("rules", "check", str(good_file)).stderr == ""
