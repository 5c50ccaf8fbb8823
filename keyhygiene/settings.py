"""The one settings object, read from the environment (and an optional ``.env``) at process start.

Bad values are refused here, with the variable's name, so that nothing downstream ever sees them.
"""

from __future__ import annotations

import re
from datetime import timedelta
from functools import cached_property
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from .errors import UsageError
from .timeutil import MAX_DURATION, TimeFormatError, parse_duration

DEFAULT_BASE_URL = "https://openrouter.ai/api/v1"
DEFAULT_SCHEDULE = "0 * * * *"

# Settings names as the environment spells them, for error messages.
ENV_NAMES = {
    "management_key": "OPENROUTER_MANAGEMENT_KEY",
    "base_url": "OPENROUTER_BASE_URL",
    "database_url": "KEYHYGIENE_DATABASE_URL",
    "rules_file": "KEYHYGIENE_RULES_FILE",
    "broker_url": "KEYHYGIENE_BROKER_URL",
    "schedule": "KEYHYGIENE_SCHEDULE",
    "log_format": "KEYHYGIENE_LOG_FORMAT",
    "http_concurrency": "KEYHYGIENE_HTTP_CONCURRENCY",
    "retention": "KEYHYGIENE_RETENTION",
    "audit_retention": "KEYHYGIENE_AUDIT_RETENTION",
    "http_retry_seconds": "KEYHYGIENE_HTTP_RETRY_SECONDS",
    "http_timeout": "KEYHYGIENE_HTTP_TIMEOUT",
    "job_time_limit": "KEYHYGIENE_JOB_TIME_LIMIT",
    "metrics_addr": "KEYHYGIENE_METRICS_ADDR",
    "notify_timeout": "KEYHYGIENE_NOTIFY_TIMEOUT",
    "notify_retry_seconds": "KEYHYGIENE_NOTIFY_RETRY_SECONDS",
}


# Timeouts in seconds are durations too: at most 100 years.
_MAX_SECONDS = MAX_DURATION.total_seconds()
# What an HTTP header value may carry, and what a key can be: printable ASCII, no space.
_HEADER_SAFE = re.compile(r"[\x21-\x7e]*")


class SettingsError(UsageError, ValueError):
    """Settings that cannot be used; the message names the variable (exit 2, wherever it is raised)."""


def _shown(name: str, value: object) -> str:
    """How a refused value is echoed: never the management key, never a password inside a URL."""
    if name == "OPENROUTER_MANAGEMENT_KEY":
        return ""
    if isinstance(value, str) and "://" in value:
        try:
            value = make_url(value).render_as_string(hide_password=True)
        except (ArgumentError, ValueError):
            # Not even a URL: drop whatever sits between "//" and "@", where a password would be.
            value = re.sub(r"//[^/@]*@", "//***@", value)
    return f" (got {value!r})"


def _duration(value: object, *, allow_none: bool = False) -> timedelta | None:
    if value is None or value == "":
        if allow_none:
            return None
        raise ValueError("a duration is required")
    if isinstance(value, timedelta):
        return value
    try:
        delta = parse_duration(str(value))
    except TimeFormatError as exc:
        raise ValueError(exc.reason) from None
    if delta <= timedelta(0):
        raise ValueError("must be longer than zero")
    return delta


class Settings(BaseSettings):
    """Everything keyhygiene reads from its environment."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    management_key: SecretStr | None = Field(default=None, validation_alias="OPENROUTER_MANAGEMENT_KEY")
    base_url: str = Field(default=DEFAULT_BASE_URL, validation_alias="OPENROUTER_BASE_URL")
    database_url: str = Field(default="sqlite:///keyhygiene.db", validation_alias="KEYHYGIENE_DATABASE_URL")
    rules_file: str = Field(default="keyhygiene.toml", validation_alias="KEYHYGIENE_RULES_FILE")
    broker_url: str = Field(default="redis://localhost:6379/0", validation_alias="KEYHYGIENE_BROKER_URL")
    schedule: str = Field(default=DEFAULT_SCHEDULE, validation_alias="KEYHYGIENE_SCHEDULE")
    log_format: Literal["auto", "json", "console"] = Field(default="auto", validation_alias="KEYHYGIENE_LOG_FORMAT")
    http_concurrency: int = Field(default=8, ge=1, le=64, validation_alias="KEYHYGIENE_HTTP_CONCURRENCY")
    retention: timedelta = Field(default=timedelta(days=400), validation_alias="KEYHYGIENE_RETENTION")
    audit_retention: timedelta | None = Field(default=None, validation_alias="KEYHYGIENE_AUDIT_RETENTION")
    # Beyond the interface's settings (the README's table lists them): the total time a request may
    # spend in retries, one request's timeout, and the soft time limit of one job.
    # allow_inf_nan=False: "inf" would wait forever, "nan" compares false with every deadline.
    http_retry_seconds: float = Field(
        default=60.0, gt=0, le=_MAX_SECONDS, allow_inf_nan=False, validation_alias="KEYHYGIENE_HTTP_RETRY_SECONDS"
    )
    http_timeout: float = Field(
        default=30.0, gt=0, le=_MAX_SECONDS, allow_inf_nan=False, validation_alias="KEYHYGIENE_HTTP_TIMEOUT"
    )
    job_time_limit: timedelta = Field(default=timedelta(minutes=30), validation_alias="KEYHYGIENE_JOB_TIME_LIMIT")
    metrics_addr: str | None = Field(default=None, validation_alias="KEYHYGIENE_METRICS_ADDR")
    # One webhook request's timeout, and the time a notice may spend in retries before it is recorded
    # as failed (the next run retries it once).
    notify_timeout: float = Field(
        default=5.0, gt=0, le=300, allow_inf_nan=False, validation_alias="KEYHYGIENE_NOTIFY_TIMEOUT"
    )
    notify_retry_seconds: float = Field(
        default=30.0, ge=0, le=3600, allow_inf_nan=False, validation_alias="KEYHYGIENE_NOTIFY_RETRY_SECONDS"
    )

    @field_validator("retention", "job_time_limit", mode="before")
    @classmethod
    def _read_duration(cls, value: object) -> timedelta | None:
        return _duration(value)

    @field_validator("audit_retention", mode="before")
    @classmethod
    def _read_optional_duration(cls, value: object) -> timedelta | None:
        return _duration(value, allow_none=True)

    @field_validator("management_key")
    @classmethod
    def _check_management_key(cls, value: SecretStr | None) -> SecretStr | None:
        # Surrounding whitespace (a newline at the end of a secret file) is dropped where the key is
        # used; anything else that cannot go in an Authorization header is a mistake to stop on now,
        # not a minute of retries ending in an unrelated protocol error.
        if value is not None and not _HEADER_SAFE.fullmatch(value.get_secret_value().strip()):
            raise ValueError(
                "contains a character that cannot go in an HTTP header (a key is printable ASCII, "
                "with no spaces or line breaks inside)"
            )
        return value

    @field_validator("metrics_addr")
    @classmethod
    def _check_metrics_addr(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        host, _, port = value.strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("must be HOST:PORT, e.g. 0.0.0.0:9808")
        return value.strip()

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """``KEYHYGIENE_METRICS_ADDR`` as (host, port), or None when metrics are off."""
        if self.metrics_addr is None:
            return None
        host, _, port = self.metrics_addr.rpartition(":")
        return host.strip("[]"), int(port)

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        try:
            url = make_url(value)
        except ArgumentError:
            raise ValueError("is not a database URL (expected e.g. sqlite:///keyhygiene.db)") from None
        if url.get_backend_name() not in ("sqlite", "postgresql"):
            raise ValueError("only sqlite:// and postgresql+psycopg:// databases are supported")
        return value

    @field_validator("broker_url")
    @classmethod
    def _check_broker_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a Redis URL (redis://host:port/db)")
        return value

    @field_validator("schedule")
    @classmethod
    def _check_schedule(cls, value: str) -> str:
        if value == DEFAULT_SCHEDULE:  # valid; spares every command the import of Celery to check it
            return value
        from .schedule import parse_cron

        parse_cron(value)
        return value

    @cached_property
    def database(self) -> URL:
        """The database URL, with the plain ``postgresql://`` scheme mapped to psycopg 3."""
        url = make_url(self.database_url)
        if url.drivername == "postgresql":
            url = url.set(drivername="postgresql+psycopg")
        return url

    def require_management_key(self) -> str:
        """The management key, or a SettingsError saying it is missing."""
        if self.management_key is None or not self.management_key.get_secret_value().strip():
            raise SettingsError(
                "OPENROUTER_MANAGEMENT_KEY is not set: commands that call the API need a management key "
                "(create one at https://openrouter.ai/settings/management-keys)"
            )
        return self.management_key.get_secret_value().strip()


def load_settings(**overrides: object) -> Settings:
    """Read and validate the settings; a bad value raises SettingsError naming its variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = error["loc"][0] if error["loc"] else ""
            name = ENV_NAMES.get(str(loc), str(loc))
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{name}: {message}{_shown(name, error.get('input'))}")
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None
