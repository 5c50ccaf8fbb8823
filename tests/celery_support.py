"""Real Redis, real ``keyhygiene worker`` and ``keyhygiene beat`` processes, for the Celery tests.

Each test session claims a Redis database number of its own on the machine's Redis (1-15, by an
``SET NX`` claim key inside that database), flushes it around every test, and points its processes
at it; the database is SQLite in the test's tmp_path, and the fake API is served by the test
process over loopback HTTP. Every process a test starts is killed, with its whole process group,
when the test ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import select, update

from db.migrate import upgrade
from db.models import Action, Lease, Run
from keyhygiene.context import Database
from keyhygiene.settings import Settings
from keyhygiene.timeutil import utcnow

from .conftest import MANAGEMENT_KEY

REDIS_HOST = "127.0.0.1"
REDIS_PORT = int(os.environ.get("KEYHYGIENE_TEST_REDIS_PORT", "6379"))
CLAIM_KEY = "keyhygiene-test:claimed-by"
CLAIM_SECONDS = 1800

LIVE_RULES = """
[safety]
dry_run = false
max_actions_per_run = 50
max_action_percent = 100

[[rule]]
name = "delete-expired"
match = "expired"
action = "delete"
grace = "0d"
"""


def keyhygiene_executable() -> str:
    """The ``keyhygiene`` console script of this virtualenv."""
    beside = Path(sys.executable).parent / "keyhygiene"
    if beside.exists():
        return str(beside)
    found = shutil.which("keyhygiene")
    if found is None:  # pragma: no cover - the package is not installed
        pytest.fail("the keyhygiene console script is not installed (pip install -e .)")
    return found


def wait_until(predicate: Callable[[], Any], *, timeout: float, interval: float = 0.2, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what or predicate}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- Redis ----------------------------------------------------------------------------------------


class RedisDatabase:
    """One claimed database number on a Redis server."""

    def __init__(self, host: str, port: int, number: int, token: str) -> None:
        self.host, self.port, self.number, self.token = host, port, number, token
        self.client = redis.Redis(host=host, port=port, db=number, socket_timeout=5)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/{self.number}"

    def flush(self) -> None:
        self.client.flushdb()
        self.client.set(CLAIM_KEY, self.token, ex=CLAIM_SECONDS)

    def release(self) -> None:
        if self.client.get(CLAIM_KEY) == self.token.encode():
            self.client.flushdb()
        self.client.close()


def claim_redis_database(host: str = REDIS_HOST, port: int = REDIS_PORT) -> RedisDatabase:
    """Claim an empty database number 1-15 for this session, or fail saying why."""
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    numbers = list(range(1, 16))
    random.shuffle(numbers)
    try:
        for number in numbers:
            client = redis.Redis(host=host, port=port, db=number, socket_timeout=5)
            try:
                if client.set(CLAIM_KEY, token, nx=True, ex=CLAIM_SECONDS):
                    if client.dbsize() == 1:
                        return RedisDatabase(host, port, number, token)
                    client.delete(CLAIM_KEY)  # someone else's data is here: leave it alone
            finally:
                client.close()
    except redis.ConnectionError as exc:
        pytest.fail(f"Redis at {host}:{port} is not reachable ({exc}); start it (see .ci/run)")
    pytest.fail(f"no free Redis database number on {host}:{port}")


class PrivateRedis:
    """A redis-server of our own on a free port (no persistence), that a test may stop and restart."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        executable = shutil.which("redis-server")
        if executable is None:  # pragma: no cover
            pytest.fail("redis-server is not installed")
        self.process = subprocess.Popen(
            [executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=self.directory,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1, socket_connect_timeout=1)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        try:
            wait_until(answers, timeout=10, what="the private redis-server to answer")
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None


# -- keyhygiene processes -------------------------------------------------------------------------


class Process:
    """A ``keyhygiene`` process in a process group of its own, with its output in files."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], directory: Path) -> None:
        self.name = name
        self.stdout_path = directory / f"{name}.stdout"
        self.stderr_path = directory / f"{name}.stderr"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.popen = subprocess.Popen(
                [keyhygiene_executable(), *args],
                env=env,
                cwd=directory,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def lines(self) -> list[str]:
        return self.stderr_path.read_text(errors="replace").splitlines()

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far."""
        found = []
        for line in self.lines():
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return found

    def events_named(self, name: str) -> list[dict[str, Any]]:
        return [event for event in self.events() if event.get("event") == name]

    def wait_for_event(self, predicate: Callable[[dict[str, Any]], bool], *, timeout: float, what: str) -> Any:
        def found() -> Any:
            if not self.alive:
                pytest.fail(f"{self.name} exited with {self.popen.returncode} while waiting for {what}:\n{self.tail()}")
            return next((event for event in self.events() if predicate(event)), None)

        return wait_until(found, timeout=timeout, what=f"{what} in {self.name}'s log")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.lines()[-lines:])

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the whole process group (the worker and its pool children)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM, then SIGKILL if it has not ended within ``timeout`` seconds; the group is gone after."""
        if self.alive:
            self.kill(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout)
        self.kill(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
        return self.popen.returncode


def let_the_enforcement_hold_pass(database: Database) -> None:
    """What the passing of time does to the enforcement lease of a process that died (or lost the
    database) with a change in flight, or of a job that left a change in doubt: its fence holds the
    lease for as long as that change may take (keyhygiene.lease; 90 s and more), too long for a test
    to wait: its expiry is moved to now."""
    with database.writer() as session, session.begin():
        session.execute(update(Lease).values(expires_at=utcnow() - timedelta(seconds=1)))


class Deployment:
    """Everything a test's processes share: environment, database, Redis, rules file."""

    def __init__(self, directory: Path, redis_db: RedisDatabase, fake_url: str) -> None:
        self.directory = directory
        self.redis_db = redis_db
        self.broker_url = redis_db.url
        self.database_url = f"sqlite:///{directory / 'keyhygiene.db'}"
        self.rules_path = directory / "keyhygiene.toml"
        self.rules_path.write_text(LIVE_RULES)
        self.values = {
            "OPENROUTER_MANAGEMENT_KEY": MANAGEMENT_KEY,
            "OPENROUTER_BASE_URL": fake_url,
            "KEYHYGIENE_DATABASE_URL": self.database_url,
            "KEYHYGIENE_RULES_FILE": str(self.rules_path),
            "KEYHYGIENE_BROKER_URL": self.broker_url,
            "KEYHYGIENE_LOG_FORMAT": "json",
            "KEYHYGIENE_HTTP_RETRY_SECONDS": "5",
            "KEYHYGIENE_SCHEDULE": "0 * * * *",
        }
        self.processes: list[Process] = []
        self._database: Database | None = None

    def env(self, **overrides: str) -> dict[str, str]:
        env = {name: value for name, value in os.environ.items() if not name.startswith(("KEYHYGIENE_", "OPENROUTER_"))}
        env.update(self.values)
        env.update(overrides)
        return env

    def settings(self) -> Settings:
        return Settings(**{name: value for name, value in self.values.items()})  # type: ignore[arg-type]

    @property
    def database(self) -> Database:
        if self._database is None:
            self._database = Database.open(self.settings(), check=False)
            upgrade(self._database.engine)
        return self._database

    def start_worker(self, *extra: str, name: str = "worker", wait: bool = True, **env: str) -> Process:
        heartbeat = self.directory / f"{name}.heartbeat"
        process = Process(
            name,
            [
                "worker",
                "--concurrency",
                "1",
                "--without-mingle",
                "--without-gossip",
                "--heartbeat-file",
                str(heartbeat),
                "--hostname",
                f"{name}-{uuid.uuid4().hex[:6]}@%h",
                *extra,
            ],
            self.env(**env),
            self.directory,
        )
        self.processes.append(process)
        if wait:
            process.wait_for_event(lambda e: str(e.get("event", "")).endswith(" ready."), timeout=30, what="ready")
        return process

    def start_beat(self, *, name: str = "beat", **env: str) -> Process:
        """A ``keyhygiene beat`` process named ``name``, with a schedule file of its own."""
        schedule = "celerybeat-schedule" if name == "beat" else f"{name}-schedule"
        process = Process(name, ["beat", "--schedule", str(self.directory / schedule)], self.env(**env), self.directory)
        self.processes.append(process)
        return process

    def runs(self) -> list[Run]:
        with self.database.sessions() as session:
            return list(session.scalars(select(Run).order_by(Run.id)))

    def actions(self) -> list[Action]:
        with self.database.sessions() as session:
            return list(session.scalars(select(Action).order_by(Action.id)))

    def close(self) -> None:
        for process in self.processes:
            process.stop(timeout=5)
        if self._database is not None:
            self._database.close()


def deployment(
    tmp_path: Path, redis_db: RedisDatabase, fake_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Deployment]:
    """A Deployment whose settings are also this process's environment (for in-process commands)."""
    redis_db.flush()
    monkeypatch.chdir(tmp_path)
    setup = Deployment(tmp_path, redis_db, fake_url)
    for name, value in setup.values.items():
        monkeypatch.setenv(name, value)
    setup.database  # noqa: B018 - migrate before any process starts
    try:
        yield setup
    finally:
        setup.close()
        redis_db.flush()


@pytest.fixture(scope="session")
def redis_db() -> Iterator[RedisDatabase]:
    """This session's own Redis database number (import the fixture into a test module to use it)."""
    claimed = claim_redis_database()
    try:
        yield claimed
    finally:
        claimed.release()


@pytest.fixture
def deploy(
    tmp_path: Path, redis_db: RedisDatabase, fake_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Deployment]:
    """A Deployment for one test (see :func:`deployment`)."""
    yield from deployment(tmp_path, redis_db, fake_url, monkeypatch)
