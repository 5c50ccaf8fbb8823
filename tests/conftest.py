"""Shared fixtures: real databases (SQLite and the machine's PostgreSQL), the fake API over HTTP.

``database`` runs each test on both SQLite and PostgreSQL: every PostgreSQL test gets a schema of
its own, so tests never see each other's rows. Set KEYHYGIENE_TEST_POSTGRES_URL to use another
server (default: postgresql+psycopg://postgres@127.0.0.1:5432/test).
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import re
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from db.migrate import upgrade
from keyhygiene.context import Database
from keyhygiene.fakeapi import FakeOpenRouter, FakeServer
from keyhygiene.settings import Settings

POSTGRES_URL = os.environ.get("KEYHYGIENE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MANAGEMENT_KEY = "sk-or-v1-" + "5ec2e7" * 10 + "abcd"
"""The management key every test uses; tests check that it never shows up in output."""

SECRETS = re.compile(
    "|".join(
        (
            re.escape(MANAGEMENT_KEY),
            r"/services/hook-[0-9a-f]{32}",  # a webhook URL of keyhygiene.fakeapi.webhook.WebhookSink
            r"whsec-[0-9a-f]{32}",  # the notice tests' signing secret
        )
    )
)
"""Every secret the suite hands keyhygiene; none may show up in anything it captured or wrote."""

# The Celery tests' fixtures (redis_db, deploy), shared by every module that starts a worker.
pytest_plugins = ["tests.celery_support"]


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'keyhygiene.db'}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with postgres_schema() as url:
        yield url


@contextlib.contextmanager
def postgres_schema() -> Iterator[str]:
    """The URL of a new, empty schema of the test database, dropped afterwards."""
    schema = f"kh_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL)
    try:
        with admin.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:  # pragma: no cover - only when PostgreSQL is down
        admin.dispose()
        pytest.fail(f"PostgreSQL at {POSTGRES_URL} is not reachable ({exc}); start it (see .ci/run)")
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    """A fresh, empty database URL: once on SQLite, once on PostgreSQL."""
    name = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return str(request.getfixturevalue(name))


def _migrated(url: str) -> Iterator[Database]:
    settings = Settings(KEYHYGIENE_DATABASE_URL=url)  # type: ignore[call-arg]
    database = Database.open(settings, check=False)
    upgrade(database.engine)
    yield database
    database.close()


@pytest.fixture
def database(db_url: str) -> Iterator[Database]:
    """A migrated database (both backends)."""
    yield from _migrated(db_url)


@pytest.fixture
def pg_database(postgres_url: str) -> Iterator[Database]:
    """A migrated PostgreSQL database, for what only a database with concurrent writers shows."""
    yield from _migrated(postgres_url)


@pytest.fixture
def fake() -> FakeOpenRouter:
    """An empty fake OpenRouter organisation with one default workspace, on the real clock.

    keyhygiene judges keys against the real time, so tests build keys relative to ``utcnow()``;
    tests of exact edges use the pure engine with literal times instead.
    """
    fake = FakeOpenRouter(MANAGEMENT_KEY)
    fake.add_workspace("Default", default=True)
    return fake


@pytest.fixture
def fake_url(fake: FakeOpenRouter) -> Iterator[str]:
    """The fake served over real HTTP on loopback."""
    with FakeServer(fake) as server:
        yield server.base_url


@pytest.fixture
def rules_file(tmp_path: Path) -> Callable[[str], Path]:
    """Write a rules file and return its path."""

    def write(content: str) -> Path:
        path = tmp_path / "keyhygiene.toml"
        path.write_text(content)
        return path

    return write


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, db_url: str, fake_url: str) -> dict[str, str]:
    """The environment of a keyhygiene process pointed at the fake API and the test database."""
    monkeypatch.chdir(tmp_path)  # no stray .env or database in the repository
    values = {
        "OPENROUTER_MANAGEMENT_KEY": MANAGEMENT_KEY,
        "OPENROUTER_BASE_URL": fake_url,
        "KEYHYGIENE_DATABASE_URL": db_url,
        "KEYHYGIENE_RULES_FILE": str(tmp_path / "keyhygiene.toml"),
        "KEYHYGIENE_LOG_FORMAT": "json",
        "KEYHYGIENE_HTTP_RETRY_SECONDS": "5",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def events(self) -> list[dict[str, Any]]:
        """The JSON log events the command wrote on stderr."""
        found = []
        for line in self.stderr.splitlines():
            line = line.strip()
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    found.append(json.loads(line))
        return found

    def events_named(self, name: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event.get("event") == name]


def failure_lines(stderr: str) -> list[str]:
    """The lines a failing command wrote on stderr to say why, as a terminal shows them: its text
    lines, or its ``command_failed`` event where the logs are JSON. There every line must be JSON,
    and the event must not be a bug's (one with a traceback)."""
    lines = stderr.splitlines()
    if any(line.startswith("{") for line in lines):
        assert all(line.startswith("{") for line in lines), f"a line that is not JSON among JSON lines:\n{stderr}"
    said = []
    for line in lines:
        if not line.startswith("{"):
            if line.strip():
                said.append(line)
            continue
        event = json.loads(line)
        if event.get("event") == "command_failed":
            assert "exception" not in event, f"a bug, not a refusal:\n{stderr}"
            said.append(f"keyhygiene: {event['error'] if 'kind' in event else 'error: ' + event['error']}")
    return said


def _invoke(args: list[str]) -> CliResult:
    from keyhygiene import logging as khlog
    from keyhygiene.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_out, old_err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    # The secrets a command registers are its process's: a fuzzed "key" such as "json" would
    # otherwise be redacted from every later command's output in this one.
    secrets, ordered = set(khlog._secrets), list(khlog._ordered)
    khlog._configured_format = None  # as in a new process: the last command's logging says nothing
    code = 0
    try:
        main(args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.stdout, sys.stderr = old_out, old_err
        gc.unfreeze()  # the command froze what it left for its process's exit; this process goes on
        khlog._secrets, khlog._ordered = secrets, ordered
    result = CliResult(code, out.getvalue(), err.getvalue())
    assert MANAGEMENT_KEY not in result.stdout + result.stderr, "the management key leaked into output"
    assert not SECRETS.search(result.stdout + result.stderr), "a secret leaked into output"
    return result


@pytest.fixture
def cli() -> Callable[..., CliResult]:
    """Run ``keyhygiene ARGS...`` in this process; returns exit code, stdout, stderr."""

    def run(*args: str) -> CliResult:
        return _invoke(list(args))

    return run


# -- the session-wide secret scan ------------------------------------------------------------------

_leaks: list[str] = []
# Files a test writes as keyhygiene's input (a secret file, a .env): the one place a secret belongs.
_INPUTS = re.compile(r"(^|/)(\.env|[^/]*management_key[^/]*)$|/secrets/")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Every test's captured stdout, stderr and log records are scanned for a secret."""
    captured = report.capstdout + report.capstderr + report.caplog
    if SECRETS.search(captured):
        _leaks.append(f"{report.nodeid} ({report.when}): in the captured output")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """After the run, every file the tests' processes wrote (databases, logs, HTML reports, the
    worker's and beat's output) is scanned for a secret; any hit fails the run."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    base = factory.getbasetemp() if factory is not None else None
    if base is not None and base.exists():
        for path in base.rglob("*"):
            if not path.is_file() or path.is_symlink() or _INPUTS.search(path.as_posix()):
                continue
            with contextlib.suppress(OSError), path.open("rb") as file:
                if SECRETS.search(file.read(64 * 1024 * 1024).decode("latin-1")):
                    _leaks.append(f"{path}: in a file the tests wrote")
    if _leaks:
        print("\nsecret scan: a secret was found where it must never be:", file=sys.stderr)
        for leak in _leaks:
            print(f"  {leak}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
