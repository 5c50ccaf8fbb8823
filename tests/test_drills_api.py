"""Drills against the API: each injects faults into the fake (served over HTTP) during a live
``keyhygiene run`` that deletes 8 expired keys among 158, then checks the invariants of
tests/drill_support.py and that the next run succeeds.

The client- and sync-level behaviour of each fault has its own focused test (tests/test_client.py,
tests/test_sync.py, tests/test_enforcement.py); these drills check the whole pass end to end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from db.models import Action, Snapshot
from keyhygiene.context import Database
from keyhygiene.fakeapi import FakeOpenRouter
from keyhygiene.settings import Settings
from keyhygiene.timeutil import utcnow

from .celery_support import LIVE_RULES, let_the_enforcement_hold_pass
from .conftest import MANAGEMENT_KEY, CliResult
from .drill_support import (
    Drill,
    drill_fixture,
    drill_log_fixture,
    expired_keys,
    outputs_of,
)

__all__ = ["drill_fixture", "drill_log_fixture"]  # the fixtures ``drill`` and ``drill_log``

Inject = Callable[[FakeOpenRouter, list[str], Drill], None]


@pytest.fixture
def drill_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sqlite_url: str, fake_url: str) -> Database:
    """A live rules file, the fake over HTTP and a migrated SQLite database, as this process's env."""
    from db.migrate import upgrade

    monkeypatch.chdir(tmp_path)
    (tmp_path / "keyhygiene.toml").write_text(LIVE_RULES)
    values = {
        "OPENROUTER_MANAGEMENT_KEY": MANAGEMENT_KEY,
        "OPENROUTER_BASE_URL": fake_url,
        "KEYHYGIENE_DATABASE_URL": sqlite_url,
        "KEYHYGIENE_RULES_FILE": str(tmp_path / "keyhygiene.toml"),
        "KEYHYGIENE_LOG_FORMAT": "json",
        "KEYHYGIENE_HTTP_RETRY_SECONDS": "5",
        "KEYHYGIENE_HTTP_TIMEOUT": "1",
        # One request at a time: a fault scheduled while page one is answered hits page two, not
        # whichever page happened to be in flight.
        "KEYHYGIENE_HTTP_CONCURRENCY": "1",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    database = Database.open(Settings(KEYHYGIENE_DATABASE_URL=sqlite_url), check=False)  # type: ignore[call-arg]
    upgrade(database.engine)
    yield database
    database.close()


@dataclass(frozen=True)
class ApiFault:
    """A drill: faults injected before a live run, and the exit code that run must end with."""

    expectation: str
    inject: Inject
    exit_code: int
    prior_sync: bool = False
    """Sync once before the fault: the sync recovers keys that offset paging skipped from the previous
    snapshot (a first sync has none, and leaves such keys to the next run)."""


def _storm(fake: FakeOpenRouter, doomed: list[str], drill: Drill) -> None:
    fake.faults.rate_limit(6, retry_after=0.2, path="/keys")
    fake.faults.rate_limit(4, retry_after=0.2, method="DELETE")
    drill.inject("429 with Retry-After: 0.2 on 6 list pages and on 4 DELETEs", 10)


def _server_errors(fake: FakeOpenRouter, doomed: list[str], drill: Drill) -> None:
    for status in (500, 502, 503):
        fake.faults.server_error(2, status, retry_after=0.1, path="/keys")
    fake.faults.server_error(2, 503, retry_after=0.1, method="DELETE")
    drill.inject("500, 502 and 503 twice each on list pages; 503 (refused) on 2 DELETEs", 8)


def _lost_answers(fake: FakeOpenRouter, doomed: list[str], drill: Drill) -> None:
    fake.faults.drop_connection(1, after_processing=True, method="DELETE", path=f"/keys/{doomed[0]}")
    fake.faults.drop_mid_body(1, method="DELETE", path=f"/keys/{doomed[1]}")
    fake.faults.slow_answer(1, 2.0, method="DELETE", path=f"/keys/{doomed[2]}")
    fake.faults.truncated(1, method="DELETE", path=f"/keys/{doomed[3]}")
    drill.inject(
        "4 DELETEs applied but their answer lost: connection dropped, dropped mid-body, "
        "answered after the 1 s read timeout, body truncated",
        4,
    )


def _doubtful_errors(fake: FakeOpenRouter, doomed: list[str], drill: Drill) -> None:
    fake.faults.server_error(1, 502, method="DELETE", path=f"/keys/{doomed[0]}")
    fake.faults.server_error(1, 500, method="DELETE", path=f"/keys/{doomed[1]}")
    fake.faults.drop_connection(1, method="DELETE", path=f"/keys/{doomed[2]}")
    drill.inject("DELETE not applied but answered 502, 500, or its connection dropped", 3)


def _mid_body_page(fake: FakeOpenRouter, doomed: list[str], drill: Drill) -> None:
    fake.faults.drop_mid_body(2, method="GET", path="/keys")
    drill.inject("2 list pages cut mid-body (connection dropped)", 2)


def _broken_page(kind: str) -> Inject:
    def inject(fake: FakeOpenRouter, doomed: list[str], drill: Drill) -> None:
        def on_page(fake: FakeOpenRouter, workspace_id: str, offset: int) -> None:
            if offset == 0:  # scheduled while page one is answered: it hits page two
                getattr(fake.faults, kind)(1)

        fake.faults.on_list_page(on_page)
        drill.inject(f"the second list page {kind}", 1)

    return inject


def _repeated_page(fake: FakeOpenRouter, doomed: list[str], drill: Drill) -> None:
    # 100 keys created before page two push page one's keys onto it: page two repeats page one.
    def on_page(fake: FakeOpenRouter, workspace_id: str, offset: int) -> None:
        if offset == 100:
            fake.faults.on_list_page(None)
            for n in range(100):
                fake.add_key(f"svc-new-{n}", last_used_at=utcnow(), usage=1.0)

    fake.faults.on_list_page(on_page)
    drill.inject("100 keys created before page two: page two repeats page one", 1)


def _churn(fake: FakeOpenRouter, doomed: list[str], drill: Drill) -> None:
    def on_page(fake: FakeOpenRouter, workspace_id: str, offset: int) -> None:
        if offset == 100:
            fake.faults.on_list_page(None)
            listed = fake.keys
            for key in [k for k in listed if str(k["name"]).startswith("svc-")][:3]:
                fake.delete_key(str(key["hash"]))
            for n in range(3):
                fake.add_key(f"svc-late-{n}", last_used_at=utcnow(), usage=1.0)

    fake.faults.on_list_page(on_page)
    drill.inject("3 keys deleted and 3 created between page requests", 6)


def _revoked(fake: FakeOpenRouter, doomed: list[str], drill: Drill) -> None:
    def on_page(fake: FakeOpenRouter, workspace_id: str, offset: int) -> None:
        if offset == 100:
            fake.faults.on_list_page(None)
            fake.revoke(MANAGEMENT_KEY)

    fake.faults.on_list_page(on_page)
    drill.inject("the management key revoked after the first page (401)", 1)


DRILLS = {
    "429-storm": ApiFault("every page and change goes through after waiting as asked", _storm, 0),
    "5xx": ApiFault("list pages retried; DELETEs refused with 503 retried, each applied once", _server_errors, 0),
    "lost-answers": ApiFault(
        "each DELETE sent once; settled as done from a fresh GET, never re-sent", _lost_answers, 0
    ),
    "doubtful-errors": ApiFault(
        "each DELETE sent once and left in doubt; a run at once is skipped (the lock kept while they may land); "
        "the next run after that records them failed (not applied) and deletes them",
        _doubtful_errors,
        1,
    ),
    "page-cut-mid-body": ApiFault("the read is retried; the snapshot is complete", _mid_body_page, 0),
    "malformed-page": ApiFault("sync fails, no snapshot stored, nothing changed", _broken_page("malformed"), 1),
    "truncated-page": ApiFault("sync fails, no snapshot stored, nothing changed", _broken_page("truncated"), 1),
    "repeated-page": ApiFault("every key stored once; the shifted keys recovered", _repeated_page, 0, True),
    "churn-between-pages": ApiFault("the snapshot has every key that exists, none twice", _churn, 0, True),
    "401-after-a-page": ApiFault("the run fails, no snapshot, nothing changed", _revoked, 1),
}


@pytest.mark.parametrize("name", list(DRILLS))
def test_api_fault_drill(
    name: str, drill: Drill, drill_env: Database, fake: FakeOpenRouter, cli: Callable[..., CliResult]
) -> None:
    scenario = DRILLS[name]
    drill.expectation = scenario.expectation
    doomed = expired_keys(fake, utcnow())
    if scenario.prior_sync:
        assert cli("sync").exit_code == 0
    scenario.inject(fake, doomed, drill)

    faulted = cli("run")

    assert faulted.exit_code == scenario.exit_code, faulted.stderr
    assert "Traceback" not in faulted.stderr, faulted.stderr[faulted.stderr.find("Traceback") :]
    repeated = drill.repeated_calls(fake)
    gone = [key for key in doomed if fake.get(key) is None]
    drill.saw(f"faulted run exit {faulted.exit_code}, {len(gone)} of {len(doomed)} doomed keys deleted")
    if scenario.exit_code == 0:
        assert len(gone) == len(doomed)
    with drill_env.sessions() as session:
        statuses = list(session.scalars(select(Snapshot.status)))
    drill.saw(f"snapshots: {', '.join(statuses)}")

    fake.faults.clear()
    if name == "401-after-a-page":
        fake.restore(MANAGEMENT_KEY)
    if faulted.events_named("enforcement_lock_kept"):
        # Changes left in doubt may still land: until then the lock is kept and a run is skipped.
        too_soon = cli("run")
        assert too_soon.exit_code == 1 and "left a change in doubt" in too_soon.stderr, too_soon.stderr
        drill.saw("a run at once was skipped: the lock is kept while the changes in doubt may still land")
        let_the_enforcement_hold_pass(drill_env)
    recovery = cli("run")

    assert recovery.exit_code == 0, recovery.stderr
    assert all(fake.get(key) is None for key in doomed)
    drill.saw("the next run succeeded and every doomed key is gone")
    drill.check(database=drill_env, fake=fake, outputs=outputs_of(faulted, recovery), repeated=repeated)


def test_a_key_deleted_between_snapshot_and_change_is_skipped_not_deleted(
    drill: Drill, drill_env: Database, fake: FakeOpenRouter, cli: Callable[..., CliResult]
) -> None:
    drill.expectation = "the fresh check finds it gone: recorded skipped, no DELETE sent for it"
    doomed = expired_keys(fake, utcnow())
    assert cli("sync").exit_code == 0
    fake.delete_key(doomed[0])
    drill.inject("a doomed key deleted by someone else after the snapshot", 1)
    fake.clear_calls()

    result = cli("enforce")

    assert result.exit_code == 0, result.stderr
    assert fake.change_counts()[("DELETE", doomed[0])] == 0
    with drill_env.sessions() as session:
        row = session.scalars(select(Action).where(Action.key_hash == doomed[0])).one()
    assert row.outcome == "skipped" and "already gone" in (row.reason or "")
    drill.saw(f"audit: {row.outcome} ({row.reason}); {len(doomed) - 1} others deleted")
    recovery = cli("run")
    assert recovery.exit_code == 0, recovery.stderr
    drill.check(database=drill_env, fake=fake, outputs=outputs_of(result, recovery))
