"""The one settings object, read from the environment (and an optional ``.env``) at process start.

Bad values are refused here, with the variable's name, so that nothing downstream ever sees them. A
``.env`` file that cannot be read, or has a line that is no ``NAME=value``, is refused too, naming
the file and the line.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import stat
from collections.abc import Mapping
from datetime import timedelta
from functools import cached_property
from typing import Any, Literal
from urllib.parse import SplitResult, urlsplit

from dotenv import dotenv_values
from dotenv.parser import parse_stream
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, DotEnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from .errors import UsageError
from .logging import register_secret, secret_forms
from .timeutil import MAX_DURATION, TimeFormatError, parse_duration

DEFAULT_BASE_URL = "https://openrouter.ai/api/v1"
DEFAULT_SCHEDULE = "0 * * * *"
ENV_FILE = ".env"
"""The settings file every process reads from its working directory (the environment wins over it)."""
MAX_ENV_FILE_BYTES = 1024 * 1024

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
    if isinstance(value, str):
        value = _without_password(value)
    return f" (got {value!r})"


_KEYWORD_PASSWORD = re.compile(r"(\b\w*pass\w*\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_QUERY_PASSWORD = re.compile(r"((?:^|[?&])[^=&]*pass[^=&]*=)[^&]*", re.IGNORECASE)


def _without_password(value: str) -> str:
    """``value`` with what a URL's user part could hide masked: everything between ``user:`` and the
    last ``@`` (a password may hold ``@``, ``/`` and ``?`` itself), or all of it when there is no
    ``user:``; then, after the host, the value of a query parameter named like a password
    (``?password=``, ``sslpassword=``)."""
    if "://" not in value and "=" in value:  # a libpq keyword string: host=db password=secret
        return _KEYWORD_PASSWORD.sub(r"\1***", value)
    start = value.find("://") + 3 if "://" in value else 0
    userinfo, at, host = value[start:].rpartition("@")
    # No user part: nothing before the "@" ("@hourly"), or an "@" in a file path (sqlite:////a@b/x.db).
    if at and userinfo and not userinfo.startswith("/"):
        user, colon, _ = userinfo.partition(":")
        shown = f"{value[:start]}{user + ':' if colon and '/' not in user else ''}***@"
    else:
        shown, host = "", value
    where, question, query = host.partition("?")
    if question:
        where += "?" + _QUERY_PASSWORD.sub(r"\1***", query)
    return shown + where


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


def read_env_file(path: str | os.PathLike[str] = ENV_FILE) -> dict[str, str | None]:
    """The variables the ``.env`` file at ``path`` sets, as python-dotenv reads them (``${VAR}``
    expanded); empty when there is no such file, or ``path`` is a virtualenv named ``.env``.

    Raises SettingsError naming the file (and line) for a file that cannot be read, is not UTF-8
    text, or has a line that is no ``NAME=value``: left to python-dotenv, the first two are a
    traceback, and the last a plain-text warning and a setting silently left at its default.
    """
    shown = os.path.abspath(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            raise SettingsError(f"{shown}: cannot read the settings file: it is a link to nothing") from None
        return {}
    except OSError as exc:
        raise SettingsError(f"{shown}: cannot read the settings file: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode) and os.path.isfile(os.path.join(path, "pyvenv.cfg")):
        return {}  # `python -m venv .env` is a common habit: not a settings file at all
    if stat.S_ISDIR(mode):
        raise SettingsError(f"{shown}: cannot read the settings file: it is a directory")
    # A FIFO is read as pydantic-settings reads it (a password manager may serve .env through one);
    # anything else (/dev/zero) never holds settings.
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
        raise SettingsError(f"{shown}: cannot read the settings file: it is not a regular file")
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_ENV_FILE_BYTES + 1)
    except OSError as exc:
        raise SettingsError(f"{shown}: cannot read the settings file: {exc.strerror or exc}") from None
    if len(data) > MAX_ENV_FILE_BYTES:
        raise SettingsError(f"{shown}: cannot read the settings file: it is larger than 1 MiB")
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark from a Windows editor is no mistake
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise SettingsError(f"{shown}:{line}: the settings file is not UTF-8 text") from None
    for binding in parse_stream(io.StringIO(text)):
        if binding.error or (binding.key is not None and binding.value is None):
            # The statement's text starts with the blank lines before it; the line is never shown,
            # as it may hold a secret.
            before = binding.original.string
            line = binding.original.line + before[: len(before) - len(before.lstrip())].count("\n")
            why = "a quote left open, or a space in the name?" if binding.error else "it has no ="
            raise SettingsError(f"{shown}:{line}: not a NAME=value line ({why})")
    return dotenv_values(stream=io.StringIO(text))


def _refuse_spaces(url: str) -> None:
    if not url.isprintable() or any(char.isspace() for char in url):
        raise ValueError("must not contain spaces or control characters (a stray space or line break?)")


_SQLITE_DRIVER_OPTIONS = frozenset(
    {"uri", "timeout", "isolation_level", "detect_types", "check_same_thread", "cached_statements"}
)
"""The query options of a SQLite URL that SQLAlchemy's driver takes; without ``uri=true`` it ignores others."""


def _check_sqlite_driver_options(query: Mapping[str, Any]) -> None:
    """The driver's options, read as it reads them (else a traceback on first use). The messages
    name the option, never its value: a value pasted there by mistake may be a secret."""
    from sqlalchemy.util import asbool

    for name in sorted(set(query) & _SQLITE_DRIVER_OPTIONS):
        value = query[name]
        if isinstance(value, tuple):
            raise ValueError(f"gives the option {name} more than once")
        if name == "isolation_level":
            # AUTOCOMMIT, say, would end every statement's work on its own: a snapshot or an audit
            # record could then be stored half-written.
            raise ValueError("sets isolation_level, which keyhygiene does not take: it runs its own transactions")
        try:
            if name in ("uri", "check_same_thread"):
                asbool(value)
                continue
            number = float(value) if name == "timeout" else int(value)
        except ValueError:
            kind = "true or false" if name in ("uri", "check_same_thread") else "a number"
            raise ValueError(f"has an option {name} that is not {kind}") from None
        if not 0 <= number < float("inf"):
            raise ValueError(f"has an option {name} that is not a number from 0 up")


def _check_sqlite_uri(path: str, query: Mapping[str, Any]) -> None:
    """SQLite's own options (``mode=ro``) are taken only from a ``file:`` URI with ``uri=true``:
    otherwise SQLAlchemy warns and opens the file as if they were not there, or SQLite opens a
    new, empty file whose name is the URI."""
    from sqlalchemy.util import asbool

    as_uri = "uri" in query and not isinstance(query["uri"], tuple) and asbool(query["uri"])
    written = "sqlite:///file:PATH?mode=ro&uri=true"
    if as_uri and not path.startswith("file:"):
        raise ValueError(f"has uri=true, which needs a file: URI for a path (as in {written})")
    if path.startswith("file:") and not as_uri:
        raise ValueError(f"names a file: URI without uri=true, which would open a new file of that name ({written})")
    ignored = sorted(set(query) - _SQLITE_DRIVER_OPTIONS)
    if ignored and not as_uri:
        raise ValueError(
            f"has options SQLite takes only in a URI, which it would ignore: {', '.join(ignored)} (write {written})"
        )


def _usable_host(host: str) -> bool:
    """Whether ``host`` can be encoded as the HTTP client encodes it (Python's IDNA codec for an
    ASCII name, the idna package's IDNA 2008 for another): else every request fails alike."""
    lowered = host.lower()
    try:
        if host.isascii():
            host.encode("idna")
        if not host.isascii() or lowered.startswith("xn--"):  # an IDNA name, as httpx checks one
            import idna  # httpx's own dependency, loaded only for such a name

            if host.isascii():
                idna.decode(lowered)
            else:
                idna.encode(lowered)
    except (UnicodeError, ValueError):
        return False
    return True


def _url(value: str, schemes: tuple[str, ...], wrong_scheme: str) -> SplitResult:
    """``value`` split as a URL of one of ``schemes``, with a valid port if it has one; else ValueError.

    The messages never quote the URL's parts: what sits where a port should be may be a password.
    """
    _refuse_spaces(value)
    try:
        url = urlsplit(value)
    except ValueError:  # the only one urlsplit raises: a "[" of an IPv6 host never closed, or misplaced
        raise ValueError("is not a valid URL (a [ ] around an IPv6 address is not closed?)") from None
    if url.scheme not in schemes or not value[len(url.scheme) :].startswith("://"):
        raise ValueError(wrong_scheme)
    try:
        port = url.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError("has a port that is not a number from 1 to 65535")
    return url


class _DotEnvFile(DotEnvSettingsSource):
    """pydantic-settings' ``.env`` source, reading the file with ``read_env_file``."""

    def _read_env_files(self) -> Mapping[str, str | None]:
        files = self.env_file
        if files is None:
            return {}
        values: dict[str, str | None] = {}
        for file in [files] if isinstance(files, str | os.PathLike) else files:
            values.update(read_env_file(file))
        return values if self.case_sensitive else {name.lower(): value for name, value in values.items()}


class Settings(BaseSettings):
    """Everything keyhygiene reads from its environment."""

    # env_file=(): pydantic-settings' own reader reads nothing (it would read before any hook can
    # stop it); ``_DotEnvFile`` reads ENV_FILE instead (settings_customise_sources).
    model_config = SettingsConfigDict(env_file=(), extra="ignore", frozen=True)

    management_key: SecretStr | None = Field(default=None, validation_alias="OPENROUTER_MANAGEMENT_KEY")
    base_url: str = Field(default=DEFAULT_BASE_URL, validation_alias="OPENROUTER_BASE_URL")
    # repr=False: a URL may hold a password, and a settings object shows up in tracebacks and logs.
    database_url: str = Field(default="sqlite:///keyhygiene.db", validation_alias="KEYHYGIENE_DATABASE_URL", repr=False)
    rules_file: str = Field(default="keyhygiene.toml", validation_alias="KEYHYGIENE_RULES_FILE")
    broker_url: str = Field(default="redis://localhost:6379/0", validation_alias="KEYHYGIENE_BROKER_URL", repr=False)
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

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # A caller's ``_env_file`` still decides (None: no file, as tests and the demo ask).
        chosen = getattr(dotenv_settings, "env_file", ())
        dotenv = _DotEnvFile(settings_cls, env_file=ENV_FILE if chosen == () else chosen)
        return init_settings, env_settings, dotenv, file_secret_settings

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

    @field_validator("rules_file")
    @classmethod
    def _check_rules_file(cls, value: str) -> str:
        if not value.strip():  # it would name the working directory, or no file at all
            raise ValueError("is empty (expected the rules file's path, e.g. keyhygiene.toml)")
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
        url = _url(value, ("http", "https"), "must start with http:// or https://")
        if not url.hostname:
            raise ValueError("has no host (expected e.g. https://openrouter.ai/api/v1)")
        if not _usable_host(url.hostname):
            raise ValueError("has a host name that cannot be looked up (an empty label, as in a..b, or one too long)")
        if "@" in url.netloc:
            # It would be sent as Basic auth, and shown wherever the API's address is.
            raise ValueError("must not hold a user or password (the management key is the API's only credential)")
        if url.query or url.fragment or value.endswith(("?", "#")):
            raise ValueError("must not have a query (?) or fragment (#): request paths are added to its end")
        return value.rstrip("/")

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        try:
            url = make_url(value)
        except ArgumentError:
            raise ValueError("is not a database URL (expected e.g. sqlite:///keyhygiene.db)") from None
        except ValueError:  # the only other one make_url raises: int() of the port
            raise ValueError("has a port that is not a number from 1 to 65535") from None
        if url.get_backend_name() not in ("sqlite", "postgresql"):
            raise ValueError("only sqlite:// and postgresql+psycopg:// databases are supported")
        if url.get_backend_name() == "sqlite":
            path = url.database or ""
            if path in ("", ":memory:") or path.startswith("file::memory:") or url.query.get("mode") == "memory":
                # Each process (and connection) would get its own empty database: `db upgrade`
                # would migrate one that is gone when it exits.
                raise ValueError("is an in-memory SQLite database, which keeps nothing: name a file")
            _check_sqlite_uri(path, url.query)
            _check_sqlite_driver_options(url.query)
        if url.get_backend_name() == "postgresql":
            # A SQLite path may hold spaces, and so may a password (the compose entrypoint writes it
            # so); the rest of a server's URL may not. None of the messages quote the URL's parts:
            # the driver would name a host made of the password's end, or a port.
            _refuse_spaces(url.render_as_string(hide_password=True))
            if url.host and "@" in url.host:
                raise ValueError("holds an @ in its user or password: write it as %40")
            if url.port is not None and not 1 <= url.port <= 65535:
                raise ValueError("has a port that is not a number from 1 to 65535")
        return value

    @field_validator("broker_url")
    @classmethod
    def _check_broker_url(cls, value: str) -> str:
        url = _url(value, ("redis", "rediss", "unix"), "must be a Redis URL (redis://host:port/db)")
        if url.scheme == "unix":
            if not url.path.strip("/"):
                raise ValueError("has no socket path (expected e.g. unix:///run/redis.sock?db=0)")
        elif not re.fullmatch(r"/?[0-9]*", url.path):
            # An empty host is Redis's default, localhost, for both Celery and redis-py.
            raise ValueError("must end with the database number, if any (redis://host:port/0)")
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


def asked_log_format() -> str:
    """``KEYHYGIENE_LOG_FORMAT`` as the environment, else a ``.env`` file that is a regular file,
    sets it, if that is a valid format; else ``auto``. For a command whose settings could not be
    read (or that reads none): a ``.env`` served through a FIFO is never read a second time. The
    name is matched in any case, as the settings match it."""
    asked = _named("KEYHYGIENE_LOG_FORMAT", os.environ)
    if asked is None and os.path.isfile(ENV_FILE):
        with contextlib.suppress(SettingsError):
            asked = _named("KEYHYGIENE_LOG_FORMAT", read_env_file(ENV_FILE))
    asked = (asked or "auto").strip().lower()
    return asked if asked in ("auto", "json", "console") else "auto"


def _named(name: str, variables: Mapping[str, str | None]) -> str | None:
    """The value of variable ``name`` in ``variables``, its name in any case (as the settings read it)."""
    if name in variables:
        return variables[name]
    return next((value for given, value in variables.items() if given.upper() == name), None)


def load_settings(**overrides: object) -> Settings:
    """Read and validate the settings; a bad value raises SettingsError naming its variable, and a
    ``.env`` file that cannot be read or parsed one naming the file and line."""
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        key = _given_management_key(overrides)
        if len(key) >= 8:  # whatever prints next (a usage error quoting an argument) leaves it out too
            register_secret(key)
        problems = []
        for error in exc.errors():
            loc = error["loc"][0] if error["loc"] else ""
            name = ENV_NAMES.get(str(loc), str(loc))
            said = error["msg"].removeprefix("Value error, ") + _shown(name, error.get("input"))
            if len(key) >= 8:  # shorter, it is no secret worth garbling the message for
                for form in secret_forms(key):
                    said = said.replace(form, "***")
            problems.append(f"{_where_set(name, overrides)}{name}: {said}")
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None
    # Whatever the command: a path or a URL may hold the key pasted there by mistake, and a command
    # that never calls the API would otherwise leave it to the shape of an OpenRouter key alone.
    if settings.management_key is not None:
        register_secret(settings.management_key.get_secret_value().strip())
    return settings


def _where_set(name: str, overrides: Mapping[str, object]) -> str:
    """``"/abs/.env:LINE: "`` when ``name``'s value came from the ``.env`` file (the environment wins
    over it), else ``""``: the operator fixes the file, not the environment."""
    env_file = overrides.get("_env_file", ENV_FILE)
    # The environment's names are read whatever their case.
    in_environment = any(variable.upper() == name for variable in os.environ)
    if in_environment or name in overrides or not isinstance(env_file, str | os.PathLike):
        return ""
    if not os.path.isfile(env_file):  # a FIFO's writer may not answer a second time
        return ""
    try:
        with open(env_file, encoding="utf-8-sig") as file:
            bindings = list(parse_stream(file))
    except (OSError, UnicodeDecodeError):
        return ""
    # As python-dotenv reads it, the last assignment wins; its line is where the text starts, after
    # the blank lines before it.
    # Its names are read whatever their case, as the environment's are.
    last = next((binding for binding in reversed(bindings) if (binding.key or "").upper() == name), None)
    if last is None:
        return ""
    before = last.original.string
    line = last.original.line + before[: len(before) - len(before.lstrip())].count("\n")
    return f"{os.path.abspath(env_file)}:{line}: "


def _given_management_key(overrides: Mapping[str, object]) -> str:
    """OPENROUTER_MANAGEMENT_KEY as given, valid or not, so that no other variable's error echoes it
    (a key pasted into the wrong variable). Only asked once the settings were refused."""

    def given(variables: Mapping[str, object]) -> list[object]:
        return [value for name, value in variables.items() if name.upper() == "OPENROUTER_MANAGEMENT_KEY"]

    found = given(overrides) + given(os.environ)
    env_file = overrides.get("_env_file", ENV_FILE)
    # Read again only when it is a plain file: a FIFO's writer may not answer a second time.
    if not found and isinstance(env_file, str | os.PathLike) and os.path.isfile(env_file):
        with contextlib.suppress(SettingsError):
            found = given(read_env_file(env_file))
    for value in found:
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(text, str) and text.strip():
            return text.strip()
    return ""
