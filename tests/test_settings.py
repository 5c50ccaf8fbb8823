"""Settings: defaults, the .env file, and bad values refused at start with the variable's name."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from keyhygiene.errors import EXIT_USAGE, UsageError
from keyhygiene.settings import Settings, SettingsError, load_settings
from tests.conftest import MANAGEMENT_KEY

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
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and name in lines[0], result.stderr
    assert value in lines[0]
    assert not (clean_env / "keyhygiene.db").exists()  # refused before touching anything


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
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "OPENROUTER_MANAGEMENT_KEY" in lines[0] and "HTTP header" in lines[0], result.stderr
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
