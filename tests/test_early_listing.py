"""A sync's listing begun before the store is open (``keyhygiene.api.EarlyListing``), against the
fake OpenRouter API over real HTTP on loopback and a real store.

``keyhygiene sync`` asks for pages while it loads the store's modules, opens the store and records
the run. What it fetched ahead is bounded; a command that stops before the sync takes the listing
asks for nothing more; a failure of the listing fails the recorded run as it did before.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

import db.engine
from keyhygiene import jobs
from keyhygiene.api import EarlyListing
from keyhygiene.fakeapi import FakeOpenRouter
from keyhygiene.keysapi.client import KeysClient
from keyhygiene.keysapi.paging import KeyStream
from keyhygiene.settings import Settings
from keyhygiene.timeutil import parse_time, utcnow
from tests.celery_support import wait_until
from tests.conftest import MANAGEMENT_KEY
from tests.test_client import add_keys, list_pages


@pytest.fixture
def client(fake_url: str) -> Iterator[KeysClient]:
    with KeysClient(fake_url, MANAGEMENT_KEY, concurrency=2, timeout=5) as opened:
        yield opened


@pytest.fixture
def settings(fake_url: str, tmp_path: Path) -> Settings:
    return Settings(  # type: ignore[call-arg]
        _env_file=None,
        OPENROUTER_MANAGEMENT_KEY=MANAGEMENT_KEY,
        OPENROUTER_BASE_URL=fake_url,
        KEYHYGIENE_DATABASE_URL=f"sqlite:///{tmp_path}/keyhygiene.db",
        KEYHYGIENE_HTTP_CONCURRENCY=2,
        KEYHYGIENE_HTTP_RETRY_SECONDS=0.3,
    )


def _listing_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("keysapi")]


def test_a_stream_started_before_anything_takes_it_fetches_only_what_it_has_room_for(
    fake: FakeOpenRouter, client: KeysClient
) -> None:
    hashes = add_keys(fake, 2000)
    stream = client.stream_keys([None], room=10)

    stream.start()
    # Room for 10 pages: requests in flight and pages waiting. Once 10 wait, none can be in flight.
    wait_until(lambda: stream.waiting == 10, timeout=30, what="ten pages waiting")

    assert len(list_pages(fake)) == 10
    listed = [raw["hash"] for page in stream for raw in page]
    assert sorted(listed) == sorted(hashes)


def test_a_stream_closed_before_anything_took_it_asks_for_nothing_more(
    fake: FakeOpenRouter, client: KeysClient
) -> None:
    add_keys(fake, 5000)  # 51 pages, fewer than the stream has room for
    fake.faults.latency = 0.02
    stream = client.stream_keys([None], room=60)
    stream.start()
    wait_until(lambda: stream.waiting >= 1, timeout=30, interval=0.005, what="a page waiting")

    stream.close()

    assert not _listing_threads()  # the workers are gone...
    asked = len(list_pages(fake))
    assert asked < 51  # ...and stopped short of the list's end
    assert client.list_keys_page(workspace_id=None, offset=0)  # the fake still answers...
    assert len(list_pages(fake)) == asked + 1  # ...and nothing but this one request reached it since


def test_a_listing_whose_workers_cannot_all_start_fails_instead_of_waiting_forever(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A process out of threads (a container's limit): the listing fails; it used to wait for an end
    # that the workers never started could not announce.
    started = 0
    start = threading.Thread.start

    def start_two(thread: threading.Thread) -> None:
        nonlocal started
        if thread.name[len("keysapi-") :].isdigit():
            started += 1
            if started > 2:
                raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", start_two)
    stream = KeyStream(
        lambda _, offset: [{"hash": f"k{offset}"}] * (100 if offset < 5000 else 0), [None], concurrency=4
    )

    with pytest.raises(RuntimeError, match="can't start new thread"):
        list(stream)
    assert not _listing_threads()


def test_an_early_listing_hands_over_every_key_of_every_workspace(fake: FakeOpenRouter, settings: Settings) -> None:
    hashes = add_keys(fake, 250)
    team = str(fake.add_workspace("team")["id"])
    hashes += add_keys(fake, 120, workspace_id=team, prefix="team")

    with EarlyListing.begin(settings) as early:
        workspaces, stream = early.take()
        listed = [raw["hash"] for page in stream for raw in page]

    assert sorted(workspace.id for workspace in workspaces) == sorted([fake.default_workspace_id, team])
    assert sorted(listed) == sorted(hashes)
    assert stream.per_workspace == {fake.default_workspace_id: 250, team: 120}
    assert [call.path for call in fake.calls][:2] == ["/key", "/workspaces"]


def test_an_early_listing_raises_each_failure_where_the_sync_meets_it(fake: FakeOpenRouter, settings: Settings) -> None:
    from keyhygiene.errors import NotAManagementKey
    from keyhygiene.keysapi.errors import ServerError

    fake.faults.server_error(10_000, status=500, retry_after=0.01, path="/workspaces")
    with EarlyListing.begin(settings) as early:
        assert early.client().requests_sent >= 1  # the credential was checked: the client is the job's
        with pytest.raises(ServerError):
            early.take()  # listing the workspaces failed: the sync fails, recorded as failed

    regular = settings.model_copy(update={"management_key": SecretStr(fake.add_regular_key())})
    with EarlyListing.begin(regular) as early, pytest.raises(NotAManagementKey):
        early.client()


@pytest.fixture
def sqlite_env(fake_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The environment of ``keyhygiene`` pointed at the fake API and a SQLite file (not created)."""
    path = tmp_path / "keyhygiene.db"
    for name, value in {
        "OPENROUTER_MANAGEMENT_KEY": MANAGEMENT_KEY,
        "OPENROUTER_BASE_URL": fake_url,
        "KEYHYGIENE_DATABASE_URL": f"sqlite:///{path}",
        "KEYHYGIENE_HTTP_CONCURRENCY": "4",
        "KEYHYGIENE_HTTP_RETRY_SECONDS": "0.3",
        "KEYHYGIENE_LOG_FORMAT": "json",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    return path


def test_a_sync_whose_store_cannot_be_opened_asks_the_api_for_nothing(
    fake: FakeOpenRouter, sqlite_env: Path, cli
) -> None:
    add_keys(fake, 300)

    result = cli("sync")  # no `db upgrade` first

    assert result.exit_code == 1
    assert "run `keyhygiene db upgrade` first" in result.stderr
    assert fake.calls == []
    assert not sqlite_env.exists()


def test_a_sync_that_cannot_record_its_run_stops_the_listing_it_began(
    fake: FakeOpenRouter, sqlite_env: Path, cli, client: KeysClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli("db", "upgrade").exit_code == 0
    add_keys(fake, 15_000)  # 151 pages, more than the head start
    fake.faults.latency = 0.005
    monkeypatch.setattr(db.engine, "SQLITE_BUSY_TIMEOUT_MS", 300)
    other = sqlite3.connect(sqlite_env, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock: no run can be recorded
        result = cli("sync")
    finally:
        other.rollback()
        other.close()

    assert result.exit_code == 1
    assert "database is locked" in result.stderr
    for thread in _listing_threads():  # the requests in flight end by themselves
        thread.join(timeout=30)
    assert not _listing_threads()
    # The listing began once the store was open, before the run was recorded, and stopped there:
    # no further than its head start, well short of the list's end.
    paths = [call.path for call in fake.calls]
    assert paths[:2] == ["/key", "/workspaces"]
    assert 1 <= paths.count("/keys") <= EarlyListing.HEAD_START_PAGES < 151
    asked = len(fake.calls)
    assert client.list_keys_page(workspace_id=None, offset=0)
    assert len(fake.calls) == asked + 1


def test_a_snapshot_is_taken_as_of_when_its_listing_began(
    fake: FakeOpenRouter, sqlite_env: Path, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli("db", "upgrade").exit_code == 0
    add_keys(fake, 500)
    first_page = threading.Event()
    first_page_at: list[datetime] = []

    def seen(*_: object) -> None:
        if not first_page.is_set():
            first_page_at.append(utcnow())
            first_page.set()

    fake.faults.on_list_page(seen)
    record_run = jobs._start

    def record_after_the_first_page(*args: Any, **kwargs: Any) -> int:
        assert first_page.wait(30)  # the run is recorded only once the API has served a page
        return record_run(*args, **kwargs)

    monkeypatch.setattr(jobs, "_start", record_after_the_first_page)

    result = cli("sync")

    assert result.exit_code == 0, result.stderr
    with sqlite3.connect(sqlite_env) as connection:
        (taken_at,) = connection.execute("SELECT taken_at FROM snapshots").fetchone()
    # Keys the listing saw before the run was recorded are not dated after it: a key deleted after
    # the first page must not look deleted before the snapshot that still lists it.
    assert parse_time(taken_at) <= first_page_at[0]


def test_a_sync_whose_workspaces_cannot_be_listed_fails_and_is_recorded(
    fake: FakeOpenRouter, sqlite_env: Path, cli
) -> None:
    assert cli("db", "upgrade").exit_code == 0
    add_keys(fake, 150)
    fake.faults.server_error(10_000, status=500, retry_after=0.01, path="/workspaces")

    result = cli("sync")

    assert result.exit_code == 1
    assert "500" in result.stderr
    with sqlite3.connect(sqlite_env) as connection:
        assert connection.execute("SELECT kind, status, exit_code FROM runs").fetchall() == [("sync", "failed", 1)]
        assert connection.execute("SELECT status FROM snapshots").fetchall() == [("failed",)]
        assert connection.execute("SELECT count(*) FROM key_records").fetchone() == (0,)
