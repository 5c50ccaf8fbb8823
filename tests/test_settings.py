"""Settings: defaults, the .env file, and bad values refused at start with the variable's name."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from keyhygiene import logging as khlog
from keyhygiene.errors import EXIT_USAGE, UsageError
from keyhygiene.settings import Settings, SettingsError, load_settings
from tests.conftest import MANAGEMENT_KEY, failure_lines

VARIABLES = (
    "OPENROUTER_MANAGEMENT_KEY",
    "OPENROUTER_BASE_URL",
    "KEYHYGIENE_DATABASE_URL",
    "KEYHYGIENE_RULES_FILE",
    "KEYHYGIENE_BROKER_URL",
    "KEYHYGIENE_SCHEDULE",
    "KEYHYGIENE_LOG_FORMAT",
    "KEYHYGIENE_HTTP_CONCURRENCY",
    "KEYHYGIENE_RETENTION",
    "KEYHYGIENE_AUDIT_RETENTION",
    "KEYHYGIENE_HTTP_RETRY_SECONDS",
    "KEYHYGIENE_HTTP_TIMEOUT",
    "KEYHYGIENE_JOB_TIME_LIMIT",
)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No keyhygiene variable set, and a working directory without a .env file."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_defaults_are_those_of_the_interface(clean_env: Path) -> None:
    settings = load_settings()

    assert settings.management_key is None
    assert settings.base_url == "https://openrouter.ai/api/v1"
    assert settings.database_url == "sqlite:///keyhygiene.db"
    assert settings.rules_file == "keyhygiene.toml"
    assert settings.broker_url == "redis://localhost:6379/0"
    assert settings.schedule == "0 * * * *"
    assert settings.log_format == "auto"
    assert settings.http_concurrency == 8
    assert settings.retention == timedelta(days=400)
    assert settings.audit_retention is None


def test_values_come_from_the_environment_and_a_dotenv_file(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (clean_env / ".env").write_text(
        f"OPENROUTER_MANAGEMENT_KEY={MANAGEMENT_KEY}\nKEYHYGIENE_HTTP_CONCURRENCY=2\nKEYHYGIENE_RETENTION=30d\n"
    )
    monkeypatch.setenv("KEYHYGIENE_HTTP_CONCURRENCY", "8")  # the environment wins over .env
    monkeypatch.setenv("KEYHYGIENE_DATABASE_URL", "postgresql://kh@db.internal/keys")
    monkeypatch.setenv("KEYHYGIENE_AUDIT_RETENTION", "2w")

    settings = load_settings()

    assert settings.require_management_key() == MANAGEMENT_KEY
    assert settings.http_concurrency == 8
    assert settings.retention == timedelta(days=30)
    assert settings.audit_retention == timedelta(weeks=2)
    assert settings.database.drivername == "postgresql+psycopg"  # plain postgresql:// means psycopg 3
    assert MANAGEMENT_KEY not in repr(settings) + str(settings)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("KEYHYGIENE_HTTP_CONCURRENCY", "0"),
        ("KEYHYGIENE_HTTP_CONCURRENCY", "-2"),
        ("KEYHYGIENE_HTTP_CONCURRENCY", "four"),
        ("KEYHYGIENE_HTTP_CONCURRENCY", "1000"),
        ("KEYHYGIENE_SCHEDULE", "every hour"),
        ("KEYHYGIENE_SCHEDULE", "61 * * * *"),
        ("KEYHYGIENE_SCHEDULE", "0 * * *"),
        ("KEYHYGIENE_LOG_FORMAT", "xml"),
        ("KEYHYGIENE_DATABASE_URL", "keyhygiene.db"),
        ("KEYHYGIENE_DATABASE_URL", "mysql://root@localhost/keys"),
        ("KEYHYGIENE_RETENTION", "forever"),
        ("KEYHYGIENE_RETENTION", "0d"),
        ("KEYHYGIENE_AUDIT_RETENTION", "-1d"),
        ("OPENROUTER_BASE_URL", "openrouter.ai/api/v1"),
        ("KEYHYGIENE_BROKER_URL", "amqp://localhost"),
        ("KEYHYGIENE_HTTP_RETRY_SECONDS", "0"),
        ("KEYHYGIENE_HTTP_RETRY_SECONDS", "inf"),
        ("KEYHYGIENE_HTTP_TIMEOUT", "inf"),
        ("KEYHYGIENE_HTTP_TIMEOUT", "nan"),
        ("KEYHYGIENE_HTTP_TIMEOUT", "-1"),
        ("KEYHYGIENE_HTTP_TIMEOUT", "1e300"),
        ("KEYHYGIENE_RETENTION", "99999999999999999d"),
        ("KEYHYGIENE_RETENTION", "99999999d"),
        ("KEYHYGIENE_AUDIT_RETENTION", "36501d"),
        ("KEYHYGIENE_JOB_TIME_LIMIT", "99999999999d"),
        ("KEYHYGIENE_RULES_FILE", ""),
        ("KEYHYGIENE_RULES_FILE", "  "),
    ],
)
def test_a_bad_value_is_refused_naming_its_variable(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)

    with pytest.raises(SettingsError) as caught:
        load_settings()

    assert f"{name}: " in str(caught.value)
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, UsageError) and caught.value.exit_code == EXIT_USAGE


def test_every_bad_value_is_named_at_once(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYHYGIENE_HTTP_CONCURRENCY", "zero")
    monkeypatch.setenv("KEYHYGIENE_LOG_FORMAT", "yaml")

    with pytest.raises(SettingsError) as caught:
        load_settings()

    assert "KEYHYGIENE_HTTP_CONCURRENCY" in str(caught.value)
    assert "KEYHYGIENE_LOG_FORMAT" in str(caught.value)


def test_a_password_in_a_refused_url_is_not_echoed(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYHYGIENE_DATABASE_URL", "mysql://root:hunter2@db.example/keys")
    monkeypatch.setenv("KEYHYGIENE_BROKER_URL", "amqp://guest:s3cret@mq.example//")

    with pytest.raises(SettingsError) as caught:
        load_settings()

    assert "hunter2" not in str(caught.value)
    assert "s3cret" not in str(caught.value)
    assert "db.example" in str(caught.value)


@pytest.mark.parametrize("restricted", ["0 6 1,15 * 1", "0 6 1 * mon-fri", "0 6 1-31 * mon", "0 0 1 * 0-6"])
def test_a_schedule_restricting_both_day_fields_is_refused_where_cron_would_run_on_other_days(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, restricted: str
) -> None:
    # cron runs "0 6 1,15 * 1" on the 1st, the 15th and every Monday (neither day field starts with
    # "*"); Celery's scheduler, which runs it here, only on a 1st or 15th that is a Monday: months
    # apart. Refused, not run otherwise. ("*/2" in one field: cron too wants both to match.)
    monkeypatch.setenv("KEYHYGIENE_SCHEDULE", restricted)

    with pytest.raises(SettingsError) as caught:
        load_settings()

    assert "KEYHYGIENE_SCHEDULE" in str(caught.value)
    assert "restricts both the day of the month" in str(caught.value)


@pytest.mark.parametrize(
    "either", ["0 6 1,15 * *", "0 6 * * 1", "0 9-17 * * 1-5", "0 6 */1 * 1", "30 2 */2 * 0", "0 0 1-31 * 0-6"]
)
def test_a_schedule_restricting_one_day_field_runs_as_cron_runs_it(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, either: str
) -> None:
    monkeypatch.setenv("KEYHYGIENE_SCHEDULE", either)

    assert load_settings().schedule == either


def test_a_refused_value_with_an_at_sign_and_no_user_part_is_echoed_as_given(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only what could be a URL's user and password is masked: "@hourly" has neither.
    monkeypatch.setenv("KEYHYGIENE_SCHEDULE", "@hourly")

    with pytest.raises(SettingsError) as caught:
        load_settings()

    assert "(got '@hourly')" in str(caught.value)


@pytest.mark.parametrize("value", [None, "", "  "])
def test_a_missing_management_key_is_reported_only_when_needed(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is not None:
        monkeypatch.setenv("OPENROUTER_MANAGEMENT_KEY", value)
    settings = load_settings()  # commands that need no API still run

    with pytest.raises(SettingsError, match="OPENROUTER_MANAGEMENT_KEY is not set"):
        settings.require_management_key()


def test_settings_are_frozen(clean_env: Path) -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]

    with pytest.raises(ValueError):
        settings.http_concurrency = 100  # type: ignore[misc]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("KEYHYGIENE_HTTP_CONCURRENCY", "0"),
        ("KEYHYGIENE_HTTP_CONCURRENCY", "lots"),
        ("KEYHYGIENE_SCHEDULE", "*/5 * * *"),
        ("KEYHYGIENE_LOG_FORMAT", "xml"),
    ],
)
@pytest.mark.parametrize("command", [("sync",), ("db", "upgrade"), ("report", "inventory")])
def test_commands_refuse_bad_settings_with_exit_2(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, cli, name: str, value: str, command: tuple[str, ...]
) -> None:
    monkeypatch.setenv("OPENROUTER_MANAGEMENT_KEY", MANAGEMENT_KEY)
    monkeypatch.setenv(name, value)

    result = cli(*command)

    assert result.exit_code == 2
    assert "Traceback" not in result.stderr
    line, events = _refused_line(result)
    assert name in line and value in line, result.stderr
    # A job says so in the log too, as a log shipper reads it (JSON here: stderr is no terminal).
    assert [event["kind"] for event in events] == (["sync"] if command == ("sync",) else [])
    assert not (clean_env / "keyhygiene.db").exists()  # refused before touching anything


def _refused_line(result: Any) -> tuple[str, list[dict[str, Any]]]:
    """The one plain line a command refused by its settings writes, and the JSON events beside it:
    only a job's ``run_not_started``, with the same message."""
    plain = failure_lines(result.stderr)
    events = [event for event in result.events if event["event"] != "command_failed"]
    assert len(plain) == 1, result.stderr
    assert all(event["event"] == "run_not_started" and event["error"] in plain[0] for event in events), events
    return plain[0], events


@pytest.mark.parametrize(
    "key",
    [
        MANAGEMENT_KEY[:20] + "\n" + MANAGEMENT_KEY[20:],
        MANAGEMENT_KEY[:20] + "\u00e9" + MANAGEMENT_KEY[20:],
        MANAGEMENT_KEY[:20] + " " + MANAGEMENT_KEY[20:],
        MANAGEMENT_KEY + "\x7f",
    ],
)
@pytest.mark.parametrize("command", [("sync",), ("db", "upgrade")])
def test_a_key_that_cannot_go_in_a_header_stops_the_command_without_echoing_it(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, cli, key: str, command: tuple[str, ...]
) -> None:
    # It used to retry for a minute and end in "cannot reach the API (LocalProtocolError)" or
    # "unexpected error: UnicodeEncodeError".
    monkeypatch.setenv("OPENROUTER_MANAGEMENT_KEY", key)

    result = cli(*command)

    assert result.exit_code == 2
    line, _ = _refused_line(result)
    assert "OPENROUTER_MANAGEMENT_KEY" in line and "HTTP header" in line, result.stderr
    assert MANAGEMENT_KEY[:20] not in result.stderr and MANAGEMENT_KEY[20:] not in result.stderr
    assert not (clean_env / "keyhygiene.db").exists()


def test_a_key_file_with_a_trailing_newline_is_fine(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENROUTER_MANAGEMENT_KEY", MANAGEMENT_KEY + "\n")

    assert load_settings().require_management_key() == MANAGEMENT_KEY


def test_the_longest_durations_are_accepted(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYHYGIENE_RETENTION", "36500d")
    monkeypatch.setenv("KEYHYGIENE_JOB_TIME_LIMIT", "5214w")

    settings = load_settings()

    assert settings.retention == timedelta(days=36500)
    assert settings.job_time_limit == timedelta(weeks=5214)


# -- the .env file: read strictly, refused in one line naming it ----------------------------------


def _directory(folder: Path) -> None:
    (folder / ".env").mkdir()


def _not_utf8(folder: Path) -> None:
    (folder / ".env").write_bytes(b"KEYHYGIENE_LOG_FORMAT=json\nKEYHYGIENE_RULES_FILE=r\xe8gles.toml\n")


def _unreadable(folder: Path) -> None:
    """No read permission; as root (who reads any file), a link to a kernel file that can only be written."""
    path = folder / ".env"
    if os.geteuid() != 0:
        path.write_text("KEYHYGIENE_LOG_FORMAT=json\n")
        path.chmod(0o200)
        return
    write_only = Path("/proc/sys/vm/drop_caches")
    if not write_only.exists():
        pytest.skip("running as root, and there is no write-only file to link .env to")
    path.symlink_to(write_only)


def _dangling_link(folder: Path) -> None:
    (folder / ".env").symlink_to(folder / "secrets.env")


@pytest.mark.parametrize(
    ("make", "said"),
    [
        (_directory, ": cannot read the settings file: it is a directory"),
        (_not_utf8, ":2: the settings file is not UTF-8 text"),
        (_unreadable, ": cannot read the settings file: Permission denied"),
        (_dangling_link, ": cannot read the settings file: it is a link to nothing"),
    ],
)
@pytest.mark.parametrize("command", [("status",), ("db", "upgrade"), ("rules", "check")])
def test_a_dotenv_file_that_cannot_be_read_stops_every_command_in_one_line(
    clean_env: Path, cli, make: Callable[[Path], None], said: str, command: tuple[str, ...]
) -> None:
    # It was a traceback and exit 1 (and a directory, or a link to nothing, was passed over in silence).
    make(clean_env)

    result = cli(*command)

    assert result.exit_code == 2
    assert failure_lines(result.stderr) == [f"keyhygiene: error: {clean_env / '.env'}{said}"], result.stderr
    assert not (clean_env / "keyhygiene.db").exists()


def test_a_virtualenv_named_dotenv_is_not_a_settings_file(clean_env: Path) -> None:
    (clean_env / ".env").mkdir()
    (clean_env / ".env" / "pyvenv.cfg").write_text("home = /usr/bin\n")

    assert load_settings().database_url == "sqlite:///keyhygiene.db"


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ('KEYHYGIENE_LOG_FORMAT=json\nKEYHYGIENE_SCHEDULE="*/5 * * * *\nKEYHYGIENE_RETENTION=30d\n', 2),
        ("KEYHYGIENE DATABASE_URL=postgresql://kh@db.internal/keys\n", 1),
        ("# settings\n\n\nKEYHYGIENE_LOG_FORMAT=json\n\n\nKEYHYGIENE DATABASE_URL=x\n", 7),
        (f'KEYHYGIENE_LOG_FORMAT=json\nOPENROUTER_MANAGEMENT_KEY="{MANAGEMENT_KEY}\n', 2),
        # Without an =, python-dotenv set the name to nothing, silently: the default was used.
        ("KEYHYGIENE_LOG_FORMAT=json\n\nKEYHYGIENE_DATABASE_URL:postgresql://kh@db.internal/keys\n", 3),
        ("justaword\n", 1),
    ],
)
@pytest.mark.parametrize("command", [("status",), ("db", "upgrade")])
def test_a_dotenv_line_that_cannot_be_parsed_stops_naming_file_and_line(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, cli, text: str, line: int, command: tuple[str, ...]
) -> None:
    # python-dotenv skipped such a line with a plain-text warning (never JSON), and the setting it
    # meant fell back to its default: sqlite:///keyhygiene.db instead of the PostgreSQL database.
    monkeypatch.setenv("KEYHYGIENE_LOG_FORMAT", "json")
    (clean_env / ".env").write_text(text)

    result = cli(*command)  # the management key is never echoed (cli checks every run)

    assert result.exit_code == 2
    why = "(it has no =)" if "=" not in text.splitlines()[line - 1] else "(a quote left open, or a space in the name?)"
    assert failure_lines(result.stderr) == [
        f"keyhygiene: error: {clean_env / '.env'}:{line}: not a NAME=value line {why}"
    ], result.stderr
    assert not (clean_env / "keyhygiene.db").exists()


def test_a_bad_value_from_the_dotenv_file_names_its_file_and_line(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The operator fixes the file, not the environment: say which, and where.
    (clean_env / ".env").write_text(
        "KEYHYGIENE_LOG_FORMAT=json\n\n# more workers\n"
        "KEYHYGIENE_HTTP_CONCURRENCY=10\nKEYHYGIENE_HTTP_CONCURRENCY=100\n"
    )

    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert str(refused.value) == (
        f"invalid settings: {clean_env / '.env'}:5: KEYHYGIENE_HTTP_CONCURRENCY: "
        "Input should be less than or equal to 64 (got '100')"
    )

    monkeypatch.setenv("KEYHYGIENE_HTTP_CONCURRENCY", "99")  # the environment wins: no file to name
    with pytest.raises(SettingsError, match=r"^invalid settings: KEYHYGIENE_HTTP_CONCURRENCY: .*'99'"):
        load_settings()


def test_a_bad_value_under_a_lower_case_name_in_dotenv_names_its_file_and_line(clean_env: Path) -> None:
    # Read whatever the case of its name, as the environment's are: its line was not found.
    (clean_env / ".env").write_text("# workers\nkeyhygiene_http_concurrency=0\n")

    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert str(refused.value).startswith(f"invalid settings: {clean_env / '.env'}:2: KEYHYGIENE_HTTP_CONCURRENCY: ")


def test_a_byte_order_mark_in_dotenv_is_no_mistake(clean_env: Path) -> None:
    (clean_env / ".env").write_text("\ufeffKEYHYGIENE_HTTP_CONCURRENCY=3\n", encoding="utf-8")

    assert load_settings().http_concurrency == 3


def test_the_dotenv_file_is_read_with_its_variables_expanded(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KH_TEST_DB_HOST", "db.internal")
    (clean_env / ".env").write_text(
        "export KEYHYGIENE_DATABASE_URL='postgresql://kh@${KH_TEST_DB_HOST}/keys'\nkeyhygiene_http_concurrency=4\n"
    )

    settings = load_settings()

    assert settings.database_url == "postgresql://kh@db.internal/keys"
    assert settings.http_concurrency == 4  # names in any case, as in the environment


# -- URLs: refused at start, naming the variable, never echoing a password --------------------------


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("OPENROUTER_BASE_URL", "http://[::1/api/v1", "not a valid URL"),
        ("OPENROUTER_BASE_URL", "http://", "has no host"),
        ("OPENROUTER_BASE_URL", "https:///api/v1", "has no host"),
        ("OPENROUTER_BASE_URL", "http://127.0.0.1:99999/api/v1", "port"),
        ("OPENROUTER_BASE_URL", "http://127.0.0.1:0/api/v1", "port"),
        ("OPENROUTER_BASE_URL", "http://127.0.0.1:http/api/v1", "port"),
        ("OPENROUTER_BASE_URL", "https://openrouter.ai/api/v1 ", "spaces"),
        ("OPENROUTER_BASE_URL", " https://openrouter.ai/api/v1", "spaces"),
        ("OPENROUTER_BASE_URL", "https://openrouter.ai/api/v1\n", "spaces"),
        ("OPENROUTER_BASE_URL", "https://openrouter.ai/api/v1?x=1", "query"),
        ("OPENROUTER_BASE_URL", "https://me:pw@openrouter.ai/api/v1", "user or password"),
        ("OPENROUTER_BASE_URL", "https:/openrouter.ai/api/v1", "must start with http:// or https://"),
        ("KEYHYGIENE_BROKER_URL", "redis://user:pw@127.0.0.1:99999/0", "port"),
        ("KEYHYGIENE_BROKER_URL", "redis://[::1/0", "not a valid URL"),
        ("KEYHYGIENE_BROKER_URL", "redis://127.0.0.1:6379/zero", "database number"),
        ("KEYHYGIENE_BROKER_URL", "redis://127.0.0.1:6379/0 ", "spaces"),
        ("KEYHYGIENE_BROKER_URL", "unix://", "socket path"),
    ],
)
def test_a_url_that_cannot_be_used_is_refused_naming_its_variable(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str, words: str
) -> None:
    refusal = _refusal(monkeypatch, name, value)

    assert refusal.startswith(f"invalid settings: {name}: ")
    assert words in refusal
    assert "pw@" not in refusal


def _refusal(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> str:
    """What load_settings says when ``name`` is set to ``value``."""
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    return str(caught.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OPENROUTER_BASE_URL", "http://[::1]:8080/api/v1/"),
        ("OPENROUTER_BASE_URL", "HTTPS://OPENROUTER.AI/api/v1"),
        ("KEYHYGIENE_BROKER_URL", "redis://:p@ss:w0rd@redis.internal:6379/2"),
        ("KEYHYGIENE_BROKER_URL", "rediss://redis.internal:6380/0?ssl_cert_reqs=required"),
        ("KEYHYGIENE_BROKER_URL", "redis://redis.internal"),
        ("KEYHYGIENE_BROKER_URL", "unix:///run/redis/redis.sock?db=1"),
    ],
)
def test_urls_that_work_are_accepted(clean_env: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)

    settings = load_settings()

    assert getattr(settings, "base_url" if name == "OPENROUTER_BASE_URL" else "broker_url") == value.rstrip("/")


@pytest.mark.parametrize(
    ("args", "name"),
    [
        (("trigger", "sync"), "KEYHYGIENE_BROKER_URL"),  # was a traceback: "Port out of range 0-65535"
        (("sync",), "OPENROUTER_BASE_URL"),  # was "unexpected error: ValueError: Invalid IPv6 URL", exit 1
    ],
)
def test_commands_refuse_a_broken_url_at_start(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, cli, args: tuple[str, ...], name: str
) -> None:
    monkeypatch.setenv("OPENROUTER_MANAGEMENT_KEY", MANAGEMENT_KEY)
    monkeypatch.setenv("KEYHYGIENE_BROKER_URL", "redis://kh:brokerSECRET@127.0.0.1:99999/0")
    monkeypatch.setenv("OPENROUTER_BASE_URL", "http://[::1/api/v1")

    result = cli(*args)

    assert result.exit_code == 2
    line, _ = _refused_line(result)
    assert line.startswith("keyhygiene: error: invalid settings: ") and f"{name}: " in line
    assert "brokerSECRET" not in result.stdout + result.stderr
    assert "queued" not in result.stdout


@pytest.mark.parametrize(
    ("name", "value", "shown"),
    [
        ("KEYHYGIENE_DATABASE_URL", "mysql://kh:p@ssw0rdSECRET@db.example/keys", "mysql://kh:***@db.example/keys"),
        ("KEYHYGIENE_DATABASE_URL", "mysql://kh:p@ss/w0rdSECRET@db.example/keys", "mysql://kh:***@db.example/keys"),
        ("KEYHYGIENE_DATABASE_URL", "kh:p@ssw0rdSECRET@db.example/keys", "kh:***@db.example/keys"),
        ("KEYHYGIENE_BROKER_URL", "amqp://guest:s3@cretSECRET@mq.example//", "amqp://guest:***@mq.example//"),
        ("KEYHYGIENE_BROKER_URL", "redis://:p@ssSECRET@127.0.0.1:99999/0", "redis://:***@127.0.0.1:99999/0"),
        ("KEYHYGIENE_BROKER_URL", "redis://tokenSECRET@127.0.0.1:99999/0", "redis://***@127.0.0.1:99999/0"),
        # A "?" belongs to the password, before the "@", not to a query.
        (
            "KEYHYGIENE_DATABASE_URL",
            "postgresql+psycopg://kh:pa?SECRET@db.example:99999/keys",
            "postgresql+psycopg://kh:***@db.example:99999/keys",
        ),
        # A libpq keyword string is no URL, and is refused as one: its password is not shown.
        (
            "KEYHYGIENE_DATABASE_URL",
            "host=db.example user=kh password=pSECRET dbname=keys",
            "host=db.example user=kh password=*** dbname=keys",
        ),
        # libpq takes a password as a query parameter too.
        (
            "KEYHYGIENE_DATABASE_URL",
            "postgresql+psycopg://kh@db.example:99999/keys?sslmode=require&password=pSECRET",
            "postgresql+psycopg://***@db.example:99999/keys?sslmode=require&password=***",
        ),
    ],
)
def test_a_password_with_an_at_sign_is_not_echoed(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str, shown: str
) -> None:
    # The password was cut at its first "@", and the rest of it shown as the host.
    refusal = _refusal(monkeypatch, name, value)

    assert "SECRET" not in refusal
    assert f"(got {shown!r})" in refusal


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("postgresql+psycopg://kh:secr@tpassSECRET@db.example/keys", "holds an @ in its user or password"),
        ("postgresql+psycopg://kh:pwSECRET@db.example:99999/keys", "has a port that is not a number from 1 to 65535"),
        ("postgresql+psycopg://kh:pwSECRET@db.example:5432x/keys", "has a port that is not a number from 1 to 65535"),
        ("postgresql+psycopg://kh:pwSECRET@db.example /keys", "must not contain spaces or control characters"),
    ],
)
def test_a_postgresql_url_the_driver_would_misread_is_refused_before_connecting(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, value: str, says: str
) -> None:
    # Before, the driver's own error named a host made of the password's end ("tpassSECRET@...").
    refusal = _refusal(monkeypatch, "KEYHYGIENE_DATABASE_URL", value)

    assert refusal.startswith("invalid settings: KEYHYGIENE_DATABASE_URL: ") and says in refusal
    assert "SECRET" not in refusal


@pytest.mark.parametrize("uri", ["true", "True", "yes", "1"])
def test_sqlite_options_in_a_file_uri_are_taken(clean_env: Path, monkeypatch: pytest.MonkeyPatch, uri: str) -> None:
    # As SQLAlchemy reads uri= (any true word): the check refused uri=True at first.
    monkeypatch.setenv("KEYHYGIENE_DATABASE_URL", f"sqlite:///file:{clean_env / 'kh.db'}?mode=ro&uri={uri}")

    assert load_settings().database.query["mode"] == "ro"


def test_a_sqlite_path_may_hold_a_space(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYHYGIENE_DATABASE_URL", f"sqlite:///{clean_env / 'my keys' / 'keyhygiene.db'}")

    assert load_settings().database.database == str(clean_env / "my keys" / "keyhygiene.db")


@pytest.mark.parametrize(
    "key",
    # Not shaped like sk-or-v1-..., so no pattern would hide them; the messages quote a value as
    # Python's repr does, which doubles a backslash and escapes a quote: the key printed otherwise.
    ["orkey-7a1c9e0b5d3f", "orkey\\7a1c9e0b5d3f", "orkey'7a1c\"9e0b5d3f"],
    ids=["plain", "backslash", "quotes"],
)
@pytest.mark.parametrize("where", ["environment", "dotenv"])
def test_a_management_key_pasted_into_another_variable_is_not_echoed(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, cli, where: str, key: str
) -> None:
    if where == "environment":
        monkeypatch.setenv("OPENROUTER_MANAGEMENT_KEY", key)
    else:
        (clean_env / ".env").write_text(f"OPENROUTER_MANAGEMENT_KEY={key}\n")
    monkeypatch.setenv("KEYHYGIENE_SCHEDULE", key)
    monkeypatch.setenv("KEYHYGIENE_DATABASE_URL", f"https://{key}")

    result = cli("status")

    assert result.exit_code == 2
    (line,) = failure_lines(result.stderr)
    assert "KEYHYGIENE_SCHEDULE: " in line and "KEYHYGIENE_DATABASE_URL: " in line
    assert not [form for form in (key, repr(key)[1:-1], key.replace("\\", "\\\\")) if form in line], line


@pytest.fixture
def no_secret_known(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in a new process: no secret registered for redaction yet (other tests' are put back after)."""
    monkeypatch.setattr(khlog, "_secrets", set())
    monkeypatch.setattr(khlog, "_ordered", [])


@pytest.mark.parametrize("command", [("plan",), ("enforce",), ("status",), ("report", "inventory")])
def test_a_management_key_in_a_path_is_not_echoed_by_commands_that_never_call_the_api(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, cli, command: tuple[str, ...], no_secret_known: None
) -> None:
    """A key pasted into the rules file's or the database's path, by a command that reads the
    settings but never the API: it was echoed where it was not shaped like an OpenRouter key.
    The key is set in .env, read with the settings only."""
    key = "orkey-0b5d3f7a1c9e"
    (clean_env / ".env").write_text(f"OPENROUTER_MANAGEMENT_KEY={key}\n")
    monkeypatch.setenv("KEYHYGIENE_RULES_FILE", str(clean_env / f"{key}.toml"))
    monkeypatch.setenv("KEYHYGIENE_DATABASE_URL", f"sqlite:///{clean_env / f'gone-{key}' / 'keyhygiene.db'}")

    result = cli(*command)

    assert result.exit_code == 2, result.stderr
    assert "does not exist" in result.stderr or "cannot read the rules file" in result.stderr
    assert key not in result.stdout + result.stderr


def test_the_settings_object_does_not_show_the_passwords_its_urls_hold(clean_env: Path) -> None:
    # A settings object shows up in a traceback's locals, an assertion's output or a log line.
    settings = load_settings(
        KEYHYGIENE_DATABASE_URL="postgresql+psycopg://kh:dbSECRET@db.example/keys",
        KEYHYGIENE_BROKER_URL="redis://:brokerSECRET@127.0.0.1:6379/0",
        OPENROUTER_MANAGEMENT_KEY="sk-or-v1-" + "a" * 64,
    )

    assert "SECRET" not in repr(settings) + str(settings)
    assert "a" * 64 not in repr(settings) + str(settings)
    assert settings.database_url.endswith("kh:dbSECRET@db.example/keys")  # still there to connect with


def test_a_management_key_from_dotenv_pasted_as_an_argument_is_not_echoed_by_a_usage_error(
    clean_env: Path, cli, no_secret_known: None
) -> None:
    # The arguments are parsed before the settings are read: the key set in .env was not known
    # yet when click quoted the argument it refused.
    key = "orkey-9e0b5d3f7a1c"
    (clean_env / ".env").write_text(f"OPENROUTER_MANAGEMENT_KEY={key}\n")

    result = cli("undo", key)

    assert result.exit_code == 2
    assert "is not a valid integer" in result.stderr and key not in result.stdout + result.stderr
