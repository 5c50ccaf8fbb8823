"""Sync end to end: the fake API over real HTTP into SQLite and PostgreSQL (the ``database`` fixture).

What a user relies on: every key of every workspace is in the snapshot (disabled and expired ones
too, each once), a key that vanished mid-scan is settled by a single-key GET, a failed sync leaves
no trace in the inventory, old inventories can be read back exactly, and storage grows with what
changed.
"""

from __future__ import annotations

import json
import marshal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import OperationalError
from structlog.testing import capture_logs

from db import runs, snapshots
from db.migrate import downgrade, upgrade
from db.models import Run, Snapshot, key_records, key_usage, snapshot_staging, tracked_keys
from keyhygiene import inventory, retention
from keyhygiene.context import Database, quick_handoffs, session_scope
from keyhygiene.fakeapi import FakeOpenRouter
from keyhygiene.jobs import JobOutcome, execute
from keyhygiene.keysapi.client import KeysClient
from keyhygiene.keysapi.errors import NotFound
from keyhygiene.settings import Settings
from keyhygiene.shutdown import Terminated
from keyhygiene.staging import HelperFailed, StagingHelper
from keyhygiene.timeutil import utcnow
from tests.conftest import MANAGEMENT_KEY, failure_lines

NOW = datetime.now(UTC).replace(microsecond=0)


def add_keys(fake: FakeOpenRouter, count: int, *, workspace_id: str | None = None, prefix: str = "key") -> list[str]:
    """Add ``count`` keys, newest first in listing order; returns their hashes in that order."""
    return [
        fake.add_key(f"{prefix}-{index:04d}", workspace_id=workspace_id, created_at=NOW - timedelta(minutes=index))[
            "hash"
        ]
        for index in range(count)
    ]


@pytest.fixture
def sync(database: Database, fake_url: str) -> Iterator[Callable[..., JobOutcome]]:
    """Run ``sync`` as a job on the test database with a client of the given concurrency."""
    clients: list[KeysClient] = []
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        OPENROUTER_MANAGEMENT_KEY=MANAGEMENT_KEY,
        OPENROUTER_BASE_URL=fake_url,
        KEYHYGIENE_DATABASE_URL=str(database.engine.url.render_as_string(hide_password=False)),
    )

    def run(concurrency: int = 4, retry_seconds: float = 2.0) -> JobOutcome:
        client = KeysClient(fake_url, MANAGEMENT_KEY, concurrency=concurrency, retry_seconds=retry_seconds)
        clients.append(client)
        return execute("sync", settings, database=database, client=client)

    yield run
    for client in clients:
        client.close()


def stored_hashes(database: Database, snapshot_id: int) -> list[str]:
    with database.sessions() as session:
        return sorted(key.hash for key in snapshots.keys_at(session, snapshot_id))


def stored_raw(database: Database, snapshot_id: int) -> dict[str, dict[str, Any]]:
    with database.sessions() as session:
        return {key.hash: dict(key.raw) for key in snapshots.keys_at(session, snapshot_id)}


def fingerprints(database: Database) -> dict[str, int | None]:
    with database.sessions() as session:
        return {
            key_hash: print_
            for key_hash, print_ in session.execute(select(tracked_keys.c.key_hash, tracked_keys.c.fingerprint))
        }


def version_rows(database: Database) -> int:
    with database.sessions() as session:
        return snapshots.count_versions(session)


# -- what a snapshot holds ------------------------------------------------------------------------


@pytest.mark.parametrize("count", [0, 1, 99, 100, 101, 200, 250])
def test_snapshot_holds_every_key(database: Database, fake: FakeOpenRouter, sync, count: int) -> None:
    hashes = add_keys(fake, count)

    outcome = sync()

    assert outcome.exit_code == 0, outcome.message
    assert outcome.sync is not None
    assert stored_hashes(database, outcome.sync.snapshot_id) == sorted(hashes)
    assert outcome.sync.key_count == count
    assert version_rows(database) == count
    with database.sessions() as session:
        snapshot = session.get(Snapshot, outcome.sync.snapshot_id)
        assert snapshot is not None
        assert (snapshot.status, snapshot.key_count) == ("complete", count)


def test_every_workspace_and_hidden_keys_are_in_the_snapshot(database: Database, fake: FakeOpenRouter, sync) -> None:
    research = fake.add_workspace("Research")["id"]
    sandbox = fake.add_workspace("Sandbox")["id"]
    expected = {fake.default_workspace_id: 120, research: 105, sandbox: 3}
    hidden: set[str] = set()
    for workspace_id, count in expected.items():
        add_keys(fake, count - 2, workspace_id=workspace_id, prefix=workspace_id[:8])
        hidden.add(fake.add_key("off", workspace_id=workspace_id, disabled=True)["hash"])
        hidden.add(fake.add_key("old", workspace_id=workspace_id, expires_at=NOW - timedelta(days=3))["hash"])

    outcome = sync()

    assert outcome.sync is not None
    with database.sessions() as session:
        snapshot = session.get(Snapshot, outcome.sync.snapshot_id)
        keys = {key.hash: key for key in snapshots.keys_at(session, outcome.sync.snapshot_id)}
    assert snapshot is not None and snapshot.workspace_counts == expected
    assert len(keys) == sum(expected.values())
    assert hidden <= set(keys)
    assert sum(key.disabled for key in keys.values()) == 3
    assert sum(key.expires_at is not None and key.expires_at < NOW for key in keys.values()) == 3


def test_a_key_seen_twice_is_stored_once(database: Database, fake: FakeOpenRouter, sync) -> None:
    hashes = add_keys(fake, 150)

    def new_key_before_page_two(fake: FakeOpenRouter, workspace_id: str, offset: int) -> None:
        if offset == 100:
            fake.add_key("brand-new", created_at=NOW + timedelta(minutes=1))

    fake.faults.on_list_page(new_key_before_page_two)
    outcome = sync(concurrency=1)

    assert outcome.sync is not None
    assert stored_hashes(database, outcome.sync.snapshot_id) == sorted(hashes)
    assert version_rows(database) == 150


def test_a_workspace_deleted_while_it_is_listed_has_no_keys_left(
    database: Database, fake: FakeOpenRouter, sync
) -> None:
    """``GET /keys`` answers 404 for a workspace deleted since the workspaces were listed: the sync
    does not fail; that workspace ends there, and its keys not listed are checked and found gone."""
    fake.set_clock(NOW)
    staying = add_keys(fake, 50)
    temporary = fake.add_workspace("Temporary", id="ws-temp")["id"]
    leaving = add_keys(fake, 150, workspace_id=temporary, prefix="temp")
    first = sync(concurrency=1).sync
    assert first is not None and first.key_count == 200

    def delete_before_page_two(fake: FakeOpenRouter, workspace_id: str, offset: int) -> None:
        if workspace_id == temporary and offset == 100:
            fake.delete_workspace(temporary)

    fake.faults.on_list_page(delete_before_page_two)
    outcome = sync(concurrency=1)

    assert outcome.sync is not None, outcome.message
    second = outcome.sync
    listed_before = set(leaving[:100])  # page one was served before the workspace went
    assert set(stored_hashes(database, second.snapshot_id)) == set(staying) | listed_before
    assert sorted(second.confirmed_gone) == sorted(leaving[100:])


def test_a_404_for_a_workspace_that_is_still_listed_fails_the_sync(fake: FakeOpenRouter, fake_url: str) -> None:
    """Only a workspace that ``GET /workspaces`` no longer lists is taken as deleted: a 404 for one
    it still lists (an API in trouble) fails the listing. The fake answers 404 only for a workspace
    that does not exist, so the client's own read of that workspace's page raises it here."""
    add_keys(fake, 20)
    listed = fake.add_workspace("Listed", id="ws-listed")["id"]
    add_keys(fake, 20, workspace_id=listed, prefix="listed")

    class Glitching(KeysClient):
        def list_key_objects(self, *, workspace_id: str | None, offset: int, **options: Any) -> list[dict[str, Any]]:
            if workspace_id == listed:
                raise NotFound(f"GET /keys?workspace_id={listed}: 404 Workspace not found", status=404)
            return super().list_key_objects(workspace_id=workspace_id, offset=offset, **options)

    client = Glitching(fake_url, MANAGEMENT_KEY, concurrency=1)
    try:
        with pytest.raises(NotFound):
            list(client.stream_keys([None, listed]))
    finally:
        client.close()


@pytest.mark.parametrize("fault", ["rate_limit", "server_error"])
def test_sync_completes_through_rate_limits_and_server_errors(
    database: Database, fake: FakeOpenRouter, sync, fault: str
) -> None:
    hashes = add_keys(fake, 230)
    if fault == "rate_limit":
        fake.faults.rate_limit(4, retry_after=0.1, path="/keys")
    else:
        fake.faults.server_error(4, status=502, retry_after=0.1, path="/keys")

    outcome = sync()

    assert outcome.exit_code == 0, outcome.message
    assert outcome.sync is not None
    assert stored_hashes(database, outcome.sync.snapshot_id) == sorted(hashes)
    assert fake.faults.pending == 0


# -- the vanished-key check --------------------------------------------------------------------------


def test_a_key_deleted_between_two_pages_is_confirmed_gone(database: Database, fake: FakeOpenRouter, sync) -> None:
    hashes = add_keys(fake, 250)
    first = sync().sync
    assert first is not None
    victim = hashes[150]  # on the second page

    def delete_before_page_two(fake: FakeOpenRouter, workspace_id: str, offset: int) -> None:
        if offset == 100 and fake.get(victim) is not None:
            fake.delete_key(victim)

    fake.faults.on_list_page(delete_before_page_two)
    fake.clear_calls()
    second = sync(concurrency=1).sync

    assert second is not None
    assert second.confirmed_gone == [victim]
    assert second.recovered == []
    assert (second.gone, second.key_count) == (1, 249)
    assert stored_hashes(database, second.snapshot_id) == sorted(set(hashes) - {victim})
    assert [(c.path, c.status) for c in fake.calls if c.path.startswith("/keys/")] == [(f"/keys/{victim}", 404)]
    assert victim in stored_hashes(database, first.snapshot_id)


def test_many_skipped_keys_are_recovered_a_batch_at_a_time(
    database: Database, fake: FakeOpenRouter, sync, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys missing from a listing are fetched and staged a batch at a time (so a listing that left
    out a whole workspace never holds all of them): every batch ends up in the one snapshot."""
    monkeypatch.setattr(inventory, "RECOVERY_BATCH", 2)
    hashes = add_keys(fake, 250)
    assert sync().sync is not None
    deleted, skipped = hashes[:5], hashes[100:105]

    def delete_after_page_one(fake: FakeOpenRouter, workspace_id: str, offset: int) -> None:
        # Page 1 (keys 0-99) has been read; deleting five of its keys moves keys 100-104 to
        # offsets 95-99, which offset paging never reads again.
        if offset == 100 and fake.get(deleted[0]) is not None:
            for key_hash in deleted:
                fake.delete_key(key_hash)

    fake.faults.on_list_page(delete_after_page_one)
    second = sync(concurrency=1).sync

    assert second is not None
    assert second.recovered == sorted(skipped)
    assert second.key_count == 250
    assert stored_hashes(database, second.snapshot_id) == sorted(hashes)


def test_a_key_skipped_by_offset_paging_is_recovered(database: Database, fake: FakeOpenRouter, sync) -> None:
    hashes = add_keys(fake, 250)
    assert sync().sync is not None
    deleted, skipped = hashes[5], hashes[100]

    def delete_after_page_one(fake: FakeOpenRouter, workspace_id: str, offset: int) -> None:
        # Page 1 (keys 0-99) has been read; deleting key 5 moves key 100 to offset 99, which
        # offset paging never reads again.
        if offset == 100 and fake.get(deleted) is not None:
            fake.delete_key(deleted)

    fake.faults.on_list_page(delete_after_page_one)
    fake.clear_calls()
    second = sync(concurrency=1).sync

    assert second is not None
    assert second.recovered == [skipped]
    assert skipped in stored_hashes(database, second.snapshot_id)
    assert second.key_count == 250  # everything seen (the deleted key was read before it went)
    assert (f"/keys/{skipped}", 200) in [(c.path, c.status) for c in fake.calls]
    with database.sessions() as session:
        recovered = {key.hash: key for key in snapshots.keys_at(session, second.snapshot_id)}[skipped]
    assert recovered.raw == fake.get(skipped)


def test_a_key_skipped_while_a_new_one_appears_is_still_recovered(
    database: Database, fake: FakeOpenRouter, sync
) -> None:
    """As many keys are listed as were alive, but not the same ones: the key paging skipped is
    still fetched, and the new key stored beside it."""
    hashes = add_keys(fake, 250)
    assert sync().sync is not None
    deleted, skipped = hashes[5], hashes[100]
    late: list[str] = []

    def delete_and_add_after_page_one(fake: FakeOpenRouter, workspace_id: str, offset: int) -> None:
        # As above, key 100 moves to offset 99; the new key, the oldest of all, is listed last.
        if offset == 100 and fake.get(deleted) is not None:
            fake.delete_key(deleted)
            late.append(fake.add_key("key-late", created_at=NOW - timedelta(days=30))["hash"])

    fake.faults.on_list_page(delete_and_add_after_page_one)
    second = sync(concurrency=1).sync

    assert second is not None
    assert second.recovered == [skipped]
    assert second.key_count == 251
    assert stored_hashes(database, second.snapshot_id) == sorted([*hashes, *late])


# -- a failed sync leaves no trace --------------------------------------------------------------------


def _install_poison_trigger(database: Database, table: str = "key_records") -> None:
    """Make the database itself refuse to store a key named 'poison' in ``table`` (by default when
    the snapshot is recorded; ``snapshot_staging``: when it is staged), as a full disk would."""
    with database.engine.begin() as connection:
        if database.dialect == "sqlite":
            connection.execute(
                text(
                    f"CREATE TRIGGER poison BEFORE INSERT ON {table} WHEN NEW.name = 'poison' "
                    "BEGIN SELECT RAISE(ABORT, 'simulated storage failure'); END"
                )
            )
        else:
            connection.execute(
                text(
                    "CREATE FUNCTION poison() RETURNS trigger AS $$ BEGIN "
                    "IF NEW.name = 'poison' THEN RAISE EXCEPTION 'simulated storage failure'; END IF; "
                    "RETURN NEW; END $$ LANGUAGE plpgsql"
                )
            )
            connection.execute(
                text(f"CREATE TRIGGER poison BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION poison()")
            )


def _fault_on_later_pages(fake: FakeOpenRouter, kind: str) -> None:
    """The first page answers normally; the fault hits the pages after it."""

    def inject(fake: FakeOpenRouter, workspace_id: str, offset: int) -> None:
        if offset == 0:
            if kind == "api":
                fake.faults.server_error(10_000, status=503, retry_after=0.05, path="/keys")
            else:
                getattr(fake.faults, kind)(1)

    fake.faults.on_list_page(inject)


@pytest.mark.parametrize("staging", ["one process", "with a staging helper"])
@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        ("api", "503"),
        ("malformed", "not valid JSON"),
        ("truncated", "not valid JSON"),
        ("database", "simulated storage failure"),
    ],
)
def test_a_failed_sync_stores_nothing_and_says_why_in_one_line(
    database: Database,
    fake: FakeOpenRouter,
    env: dict[str, str],
    cli,
    monkeypatch: pytest.MonkeyPatch,
    failure: str,
    expected: str,
    staging: str,
) -> None:
    if staging == "with a staging helper":  # the helper may be staging a batch when the sync fails
        monkeypatch.setattr(inventory, "STAGING_HELPER_FROM_KEYS", -sys.maxsize)
    hashes = add_keys(fake, 250)
    switch_interval = sys.getswitchinterval()  # a sync shortens it while it lists, and only then
    first = cli("sync")
    assert first.exit_code == 0, first.stderr
    assert sys.getswitchinterval() == switch_interval
    with database.sessions() as session:
        before = {key.hash: dict(key.raw) for key in snapshots.keys_at(session, 1)}
    rows_before = version_rows(database)
    # Changes that the failed sync would have written: new usage on 20 keys, 3 deleted, 1 new.
    for key_hash in hashes[:20]:
        fake.record_use(key_hash, 1.5)
    for key_hash in hashes[-3:]:
        fake.delete_key(key_hash)
    fake.add_key("poison", created_at=NOW - timedelta(days=30))
    if failure == "database":
        _install_poison_trigger(database)
    else:
        monkeypatch.setenv("KEYHYGIENE_HTTP_CONCURRENCY", "1")  # the fault hits a known page
        monkeypatch.setenv("KEYHYGIENE_HTTP_RETRY_SECONDS", "0.3")
        _fault_on_later_pages(fake, failure)

    result = cli("sync")

    assert result.exit_code == 1
    assert sys.getswitchinterval() == switch_interval
    lines = failure_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("keyhygiene: run 2 sync failed: sync failed, no snapshot stored")
    assert expected in lines[0]
    assert result.stdout == ""
    with database.sessions() as session:
        failed = session.get(Snapshot, 2)
        assert failed is not None
        assert failed.status == "failed"
        assert expected in (failed.error or "")
        for table in (key_usage, key_records):
            written = select(func.count()).where((table.c.valid_from == 2) | (table.c.valid_to == 2))
            assert session.scalar(written) == 0
        assert session.scalar(select(func.count()).select_from(snapshot_staging)) == 0
        latest = snapshots.latest_snapshot(session)
        assert latest is not None and latest.id == 1
        assert {key.hash: dict(key.raw) for key in snapshots.keys_at(session, 1)} == before
        run = session.get(Run, 2)
        assert run is not None and run.status == "failed"
    assert version_rows(database) == rows_before


@pytest.mark.parametrize(
    ("failure", "said"),
    [
        (Terminated("terminated by SIGTERM"), "terminated by SIGTERM"),
        # A connection that broke after COMMIT reached the server, before its answer came back.
        (OperationalError("COMMIT", {}, Exception("server closed the connection")), "snapshot 2 was stored, then"),
    ],
    ids=["sigterm", "connection lost"],
)
def test_a_failure_after_the_snapshot_is_committed_leaves_it_complete(
    database: Database, fake: FakeOpenRouter, sync, monkeypatch: pytest.MonkeyPatch, failure: BaseException, said: str
) -> None:
    """Marking it failed would leave versions that begin at a failed snapshot: the snapshot before
    would then be read with this one's key states."""
    hashes = add_keys(fake, 30)
    assert sync().status == runs.OK
    for key_hash in hashes[:5]:
        fake.record_use(key_hash, 2.0)
    real_recording = inventory._recording

    @contextmanager
    def recording(*args: Any) -> Iterator[Any]:
        with real_recording(*args) as opened:
            yield opened
        raise failure  # the recording transaction has committed

    monkeypatch.setattr(inventory, "_recording", recording)

    outcome = sync()

    assert outcome.status in (runs.FAILED, runs.ABORTED)
    assert said in outcome.message
    with database.sessions() as session:
        stored = session.get(Snapshot, 2)
        assert stored is not None and stored.status == "complete"
        latest = snapshots.latest_snapshot(session)
        assert latest is not None and latest.id == 2
        usage = {key.hash: key.usage for key in snapshots.keys_at(session, 2)}
        assert [usage[key_hash] for key_hash in hashes[:6]] == [2.0] * 5 + [0.0]


def test_a_reader_sees_one_moment_while_a_sync_records_beside_it(
    database: Database, fake: FakeOpenRouter, sync, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading a snapshot's keys asks "is it the newest?" and then reads the versions that answer
    points to: a sync that records snapshot 2 between the two must not put its keys under snapshot 1."""
    hashes = add_keys(fake, 20)
    assert sync().status == runs.OK
    fake.delete_key(hashes[0])
    for key_hash in hashes[1:4]:
        fake.record_use(key_hash, 3.0)
    real_is_newest = snapshots.is_newest

    def is_newest_then_a_sync(session: Any, snapshot_id: int) -> bool:
        newest = real_is_newest(session, snapshot_id)
        monkeypatch.setattr(snapshots, "is_newest", real_is_newest)
        assert sync().status == runs.OK  # recorded and committed before the versions are read
        return newest

    with database.sessions() as session:
        monkeypatch.setattr(snapshots, "is_newest", is_newest_then_a_sync)
        usage = {key.hash: key.usage for key in snapshots.keys_at(session, 1)}
    assert snapshots.is_newest is real_is_newest  # the sync ran in between
    assert sorted(usage) == sorted(hashes)
    assert all(usage[key_hash] == 0.0 for key_hash in hashes)


def test_staging_rows_lost_while_listing_fail_the_sync_instead_of_marking_keys_gone(
    database: Database, fake: FakeOpenRouter, sync, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pages are staged in their own transactions as they arrive. Rows that are gone when the sync
    # records (a database restored, or a server restarted under it) must not read as keys gone.
    kept = add_keys(fake, 120, prefix="kept")
    first = sync(concurrency=1)
    assert first.exit_code == 0, first.message
    with database.sessions() as session:
        before = {key.hash: dict(key.raw) for key in snapshots.keys_at(session, 1)}
    add_keys(fake, 250, prefix="new")  # staged row by row; the kept keys are carried
    writes = 0
    original = snapshots.SnapshotWriter.write

    def losing_write(self: snapshots.SnapshotWriter, session: Any, staged: Any, **kwargs: Any) -> None:
        nonlocal writes
        original(self, session, staged, **kwargs)
        writes += 1
        if writes == 2:  # what this sync staged so far disappears with this transaction
            session.execute(snapshot_staging.delete().where(snapshot_staging.c.snapshot_id == self.snapshot_id))

    monkeypatch.setattr(snapshots.SnapshotWriter, "write", losing_write)
    # One page per transaction: otherwise pages waiting while the store writes come as one batch,
    # and on a busy machine the listing's four pages can all arrive before the second write.
    monkeypatch.setattr(inventory, "_PAGES_PER_WRITE", 1)
    outcome = sync(concurrency=1)

    assert writes > 2
    assert outcome.exit_code == 1
    assert "sync failed, no snapshot stored" in outcome.message
    assert "370 keys were listed but" in outcome.message
    with database.sessions() as session:
        latest = snapshots.latest_snapshot(session)
        assert latest is not None and latest.id == 1
        assert {key.hash: dict(key.raw) for key in snapshots.keys_at(session, 1)} == before
        for table in (key_usage, key_records):
            written = select(func.count()).where((table.c.valid_from == 2) | (table.c.valid_to == 2))
            assert session.scalar(written) == 0
    assert sorted(before) == sorted(kept)


def test_a_sync_against_an_api_that_refuses_offsets_past_the_end_stores_every_key(
    database: Database, fake: FakeOpenRouter, sync
) -> None:
    hashes = add_keys(fake, 300)  # a multiple of 100: the list ends at a refused offset
    fake.faults.past_end_status = 404

    with capture_logs() as logs:
        outcome = sync(concurrency=8)

    assert outcome.exit_code == 0, outcome.message
    assert sorted(stored_hashes(database, outcome.sync.snapshot_id)) == sorted(hashes)  # type: ignore[union-attr]
    assert [entry["workspace"] for entry in logs if entry["event"] == "listing_ended_by_refusal"] == [
        fake.default_workspace_id
    ]


def test_a_sync_whose_run_was_taken_for_dead_records_nothing(
    database: Database, fake: FakeOpenRouter, sync, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The process was paused past twice the job time limit: another job failed its run and
    # snapshot, and a prune may have begun deleting its staging rows. Waking up, it must not record
    # that snapshot complete over the failure, with whatever rows are left.
    kept = add_keys(fake, 120, prefix="kept")
    assert sync(concurrency=1).exit_code == 0
    add_keys(fake, 250, prefix="new")
    original = snapshots.SnapshotWriter.finish

    def given_up_first(self: snapshots.SnapshotWriter, session: Any, **kwargs: Any) -> Any:
        with session_scope(database) as other:  # what another job's start does to a run it takes for dead
            other.execute(update(Run).where(Run.id == 2).values(status=runs.ABORTED))
            assert snapshots.fail_orphaned(other, error="sync stopped: abandoned") == 1
        return original(self, session, **kwargs)

    monkeypatch.setattr(snapshots.SnapshotWriter, "finish", given_up_first)
    outcome = sync(concurrency=1)

    assert outcome.exit_code == 1
    assert "sync failed, no snapshot stored" in outcome.message
    assert "was given up while this sync ran" in outcome.message
    with database.sessions() as session:
        second = session.get(Snapshot, 2)
        assert second is not None and (second.status, second.error) == ("failed", "sync stopped: abandoned")
        assert snapshots.latest_snapshot(session).id == 1  # type: ignore[union-attr]
        assert sorted(key.hash for key in snapshots.keys_at(session, 1)) == sorted(kept)


# -- history ----------------------------------------------------------------------------------------


def test_an_old_inventory_reads_back_exactly(database: Database, fake: FakeOpenRouter, sync) -> None:
    fake.set_clock(NOW)
    hashes = add_keys(fake, 140)
    fake.update_key(hashes[0], {"limit": 25.0, "limit_reset": "monthly"})
    fake.extra_fields = {"future_field": {"a": [1, 2.5, None]}}
    first = sync().sync
    wire_then = {key["hash"]: {**key, "future_field": {"a": [1, 2.5, None]}} for key in fake.keys}
    fake.extra_fields = {}

    fake.advance(timedelta(hours=2))
    for key_hash in hashes[:10]:
        fake.record_use(key_hash, 0.7, byok_usd=0.1)
    fake.update_key(hashes[10], {"disabled": True, "name": "renamed"})
    fake.delete_key(hashes[11])
    add_keys(fake, 3, prefix="later")
    second = sync().sync
    wire_second = {key["hash"]: key for key in fake.keys}
    fake.advance(timedelta(hours=2))
    fake.record_use(hashes[0], 5.0)
    fake.delete_key(hashes[12])
    third = sync().sync
    assert first is not None and second is not None and third is not None

    assert stored_raw(database, first.snapshot_id) == wire_then
    assert stored_raw(database, second.snapshot_id) == wire_second
    assert hashes[11] in stored_raw(database, first.snapshot_id)
    with database.sessions() as session:
        old = {key.hash: key for key in snapshots.keys_at(session, first.snapshot_id)}
    assert old[hashes[10]].name == "key-0010" and not old[hashes[10]].disabled
    assert old[hashes[0]].limit == 25.0
    assert json.loads(json.dumps(old[hashes[0]].raw)) == wire_then[hashes[0]]


@pytest.mark.parametrize("name", ["half a pair \ud800", "nul \x00 inside"])
def test_a_name_no_database_can_store_as_text_is_kept_exactly(
    database: Database, fake: FakeOpenRouter, sync, name: str
) -> None:
    # JSON allows a lone surrogate ("\ud800"), which neither SQLite nor PostgreSQL stores as text,
    # and a NUL ("\u0000"), which PostgreSQL refuses in text. One such key must not stop every
    # sync: it is stored, and reads back as the API sent it.
    fake.set_clock(NOW)
    add_keys(fake, 5)
    odd = fake.add_key(name, created_at=NOW)["hash"]

    outcome = sync()

    assert outcome.sync is not None, outcome.message
    assert stored_raw(database, outcome.sync.snapshot_id)[odd] == next(key for key in fake.keys if key["hash"] == odd)
    with database.sessions() as session:
        stored = {key.hash: key for key in snapshots.keys_at(session, outcome.sync.snapshot_id)}
    assert stored[odd].name == name
    assert len(stored) == 6


def test_an_amount_beyond_what_the_store_holds_fails_the_sync_naming_the_field(
    database: Database, fake: FakeOpenRouter, sync
) -> None:
    """Ten trillion dollars does not fit the store's 64-bit micro-dollars: the sync says which field
    of which answer, as for any malformed key, instead of an unexpected database error."""
    fake.set_clock(NOW)
    add_keys(fake, 5)
    fake.add_key("enormous", created_at=NOW, limit=1e13)

    outcome = sync()

    assert outcome.sync is None and outcome.exit_code == 1
    assert "field 'limit'" in outcome.message and "unexpected" not in outcome.message


def test_a_database_failure_while_staging_is_one_line_without_the_rows(
    database: Database, fake: FakeOpenRouter, sync
) -> None:
    """Pages are staged through the driver itself: a failure there (a full disk, a restarted server;
    here a trigger) is reported as any database failure is, in one line that quotes no key."""
    fake.set_clock(NOW)
    add_keys(fake, 5)
    fake.add_key("poison", created_at=NOW)
    _install_poison_trigger(database, "snapshot_staging")

    outcome = sync()

    assert outcome.sync is None and outcome.exit_code == 1
    assert outcome.message == "sync failed, no snapshot stored: database error: simulated storage failure"
    with database.sessions() as session:
        assert snapshots.latest_snapshot(session) is None
        assert session.scalar(select(func.count()).select_from(snapshot_staging)) == 0


def test_a_sync_whose_process_died_is_failed_by_the_next_run_and_its_staging_rows_pruned(
    database: Database, fake: FakeOpenRouter, sync
) -> None:
    """SIGKILL, the out-of-memory killer or a hard time limit stop a sync mid-listing: its run is
    found abandoned by the next job, which also fails its snapshot, so the next prune drops the
    pages it had staged (they would otherwise stay for the whole retention)."""
    hashes = add_keys(fake, 30)
    long_ago = utcnow() - timedelta(days=3)
    with session_scope(database) as session:
        killed_run = runs.start_run(session, kind="sync", now=long_ago)
        killed = snapshots.start_snapshot(session, run_id=killed_run.id, now=long_ago).id
        snapshots.SnapshotWriter(killed).add(session, [fake.get(key_hash) for key_hash in hashes[:20]])

    outcome = sync()

    assert outcome.sync is not None, outcome.message
    with database.sessions() as session:
        failed = session.get(Snapshot, killed)
        assert failed is not None and (failed.status, failed.error) == ("failed", f"sync stopped: {runs.ABANDONED}")
        assert session.scalar(select(func.count()).select_from(snapshot_staging)) == 20
    retention.prune(database, now=utcnow(), retention_period=timedelta(days=400))
    with database.sessions() as session:
        assert session.scalar(select(func.count()).select_from(snapshot_staging)) == 0
        assert stored_hashes(database, outcome.sync.snapshot_id) == sorted(hashes)


def test_storage_grows_with_what_changed(database: Database, fake: FakeOpenRouter, sync) -> None:
    hashes = add_keys(fake, 1000)
    first = sync().sync
    assert first is not None and first.new_versions == 1000

    for key_hash in hashes[::100]:  # 1% of the keys see new usage
        fake.record_use(key_hash, 0.25)
    second = sync().sync
    unchanged = sync().sync

    assert second is not None and unchanged is not None
    assert (second.new_versions, second.changed, second.added, second.gone) == (10, 10, 0, 0)
    assert unchanged.new_versions == 0
    assert version_rows(database) == 1010
    assert stored_hashes(database, unchanged.snapshot_id) == sorted(hashes)


def test_a_store_from_before_fingerprints_is_synced_in_full_then_by_fingerprint(
    database: Database, fake: FakeOpenRouter, sync
) -> None:
    """Migration 0012 adds the fingerprints empty: the first sync after it types every key, and
    records their fingerprints; later syncs copy the keys that did not change."""
    hashes = add_keys(fake, 150)
    assert sync().sync is not None
    downgrade(database.engine, "0011")
    upgrade(database.engine)
    assert set(fingerprints(database).values()) == {None}

    fake.record_use(hashes[0], 1.0)
    second = sync().sync
    fake.update_key(hashes[1], {"name": "renamed"})
    third = sync().sync

    assert second is not None and third is not None
    assert (second.new_versions, third.new_versions, third.changed) == (1, 1, 1)
    assert stored_raw(database, third.snapshot_id) == {key["hash"]: key for key in fake.keys}
    assert fingerprints(database) == {key["hash"]: snapshots.fingerprint(key) for key in fake.keys}
    assert version_rows(database) == 152


def test_fingerprints_that_do_not_match_the_stored_json_only_cost_one_full_sync(
    database: Database, fake: FakeOpenRouter, sync
) -> None:
    """Stored fingerprints that no listed key gives (a store restored from elsewhere, or written by a
    release that hashed differently): the next sync types every key, writes no version for the keys
    that did not change and records their fingerprints; the sync after it records only what changed."""
    hashes = add_keys(fake, 150)
    assert sync().sync is not None
    with database.engine.begin() as connection:  # fingerprints no key gives
        connection.execute(update(tracked_keys).values(fingerprint=tracked_keys.c.id))

    fake.record_use(hashes[0], 1.0)
    second = sync().sync
    after_second = fingerprints(database)
    listed_second = {key["hash"]: snapshots.fingerprint(key) for key in fake.keys}
    fake.update_key(hashes[1], {"name": "renamed"})
    third = sync().sync

    assert second is not None and third is not None
    assert (second.new_versions, second.changed, third.new_versions, third.changed) == (1, 1, 1, 1)
    assert after_second == listed_second
    assert fingerprints(database) == {key["hash"]: snapshots.fingerprint(key) for key in fake.keys}
    assert stored_raw(database, third.snapshot_id) == {key["hash"]: key for key in fake.keys}
    assert version_rows(database) == 152


# -- a second process stages part of a large listing ---------------------------------------------


@pytest.fixture
def helper_from_the_first_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Syncs start their staging helper (``keyhygiene.staging``) at once, however few keys they list
    and however many the store already holds."""
    monkeypatch.setattr(inventory, "STAGING_HELPER_FROM_KEYS", -sys.maxsize)


@pytest.mark.usefixtures("env", "helper_from_the_first_key")
def test_a_listing_staged_partly_by_a_second_process_is_stored_exactly(
    database: Database, fake: FakeOpenRouter, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large sync hands batches of keys to a helper process that stages them beside it: every key
    is stored once, exactly as listed, with its own id and fingerprint, and the next sync (also
    shared) writes only what changed."""
    research = fake.add_workspace("Research")["id"]
    hashes = add_keys(fake, 700) + add_keys(fake, 450, workspace_id=research, prefix="r")
    fake.add_key("off", disabled=True)
    fake.add_key("old", workspace_id=research, expires_at=NOW - timedelta(days=3))
    monkeypatch.setenv("KEYHYGIENE_HTTP_CONCURRENCY", "8")

    first = cli("sync")

    assert first.exit_code == 0, first.stderr
    assert first.events_named("listing_complete")[0]["staged_by_helper"] > 0
    assert first.stdout.startswith("run 1 sync ok: snapshot 1: 1152 keys in 2 workspaces (1152 new, 0 changed")
    first_raw = {key["hash"]: key for key in fake.keys}
    assert stored_raw(database, 1) == first_raw
    assert fingerprints(database) == {key["hash"]: snapshots.fingerprint(key) for key in fake.keys}

    for key_hash in hashes[::50]:  # 23 keys see new usage
        fake.record_use(key_hash, 0.5)
    fake.update_key(hashes[1], {"name": "renamed"})
    for key_hash in hashes[-4:]:
        fake.delete_key(key_hash)
    fake.add_key("brand-new")
    second = cli("sync")

    assert second.exit_code == 0, second.stderr
    assert second.events_named("listing_complete")[0]["staged_by_helper"] > 0
    summary = second.events_named("sync_complete")[0]
    assert (summary["added"], summary["changed"], summary["gone"], summary["new_versions"]) == (1, 24, 4, 25)
    assert stored_raw(database, 2) == {key["hash"]: key for key in fake.keys}
    assert stored_raw(database, 1) == first_raw
    assert fingerprints(database) == {
        **{key_hash: snapshots.fingerprint(first_raw[key_hash]) for key_hash in hashes[-4:]},
        **{key["hash"]: snapshots.fingerprint(key) for key in fake.keys},
    }
    with database.sessions() as session:
        ids = session.scalars(select(tracked_keys.c.id)).all()
        assert len(ids) == len(set(ids)) == 1153
        assert session.scalar(select(func.count()).select_from(snapshot_staging)) == 0
    assert version_rows(database) == 1152 + 25


@pytest.mark.usefixtures("env", "helper_from_the_first_key")
def test_a_failure_in_the_staging_process_fails_the_sync_and_stores_nothing(
    database: Database, fake: FakeOpenRouter, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_keys(fake, 250)
    assert cli("sync").exit_code == 0
    before = stored_raw(database, 1)
    rows_before = version_rows(database)
    # The newest key is listed first: its page is the first batch, which the idle helper takes.
    fake.add_key("poison", created_at=NOW + timedelta(minutes=1))
    _install_poison_trigger(database, "snapshot_staging")
    monkeypatch.setenv("KEYHYGIENE_HTTP_CONCURRENCY", "1")

    result = cli("sync")

    assert result.exit_code == 1
    lines = failure_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("keyhygiene: run 2 sync failed: sync failed, no snapshot stored")
    assert "the staging helper failed" in lines[0] and "simulated storage failure" in lines[0]
    assert "Traceback" not in result.stderr
    with database.sessions() as session:
        failed = session.get(Snapshot, 2)
        assert failed is not None and failed.status == "failed"
        assert "simulated storage failure" in (failed.error or "")
        assert session.scalar(select(func.count()).select_from(snapshot_staging)) == 0
        assert session.scalar(select(func.count()).select_from(tracked_keys)) == 250
    assert stored_raw(database, 1) == before
    assert version_rows(database) == rows_before


def _staging_helper(database: Database) -> StagingHelper:
    with session_scope(database) as session:
        run_id = runs.start_run(session, kind="sync", now=NOW).id
        snapshot_id = snapshots.start_snapshot(session, run_id=run_id, now=NOW).id
    writer = snapshots.SnapshotWriter(snapshot_id)
    url = database.engine.url.render_as_string(hide_password=False)
    helper = StagingHelper.start(url, writer.share(2), 1, use_known=False)
    assert helper is not None
    return helper


def _staged_rows(database: Database) -> int:
    with database.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(snapshot_staging)) or 0)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads a process's environment in /proc")
def test_the_staging_process_holds_no_credential_for_the_api(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENROUTER_MANAGEMENT_KEY", MANAGEMENT_KEY)
    helper = _staging_helper(database)
    try:
        environment = Path(f"/proc/{helper._process.pid}/environ").read_bytes()
    finally:
        helper.finish()

    assert b"OPENROUTER_MANAGEMENT_KEY" not in environment and MANAGEMENT_KEY.encode() not in environment
    assert b"PATH=" in environment  # the rest of the environment is there


def test_the_staging_process_commits_every_batch_it_took_before_it_reports(
    database: Database, fake: FakeOpenRouter
) -> None:
    helper = _staging_helper(database)
    batches = [[fake.add_key(f"key-{batch}-{n}") for n in range(40)] for batch in range(5)]
    taken = [batch for batch in batches if helper.offer(batch)]
    state = helper.finish()

    assert taken  # it had room for the first one at least
    assert _staged_rows(database) == 40 * len(taken)
    assert state == snapshots.WriterState(printed=False, reserved=database.dialect == "sqlite", carried_on=None)


@pytest.mark.parametrize("handed_over", [0, 1])
def test_stopping_the_staging_process_ends_it_whatever_it_is_doing(
    database: Database, fake: FakeOpenRouter, handed_over: int
) -> None:
    """A sync that fails stops its helper before it discards the staging rows: busy or idle, the
    helper ends, and the sync does not wait for anything else."""
    helper = _staging_helper(database)
    for batch in range(handed_over):
        assert helper.offer([fake.add_key(f"key-{batch}-{n}") for n in range(100)])
    stopping = threading.Thread(target=helper.stop)
    stopping.start()
    stopping.join(timeout=60)

    assert not stopping.is_alive()
    with pytest.raises(HelperFailed):
        helper.offer([fake.add_key("late")])


def test_the_staging_process_stops_when_its_sync_is_gone(database: Database, fake: FakeOpenRouter) -> None:
    """A helper whose sync ends without asking for its result (the sync's process was killed)
    exits as its input closes, after the batch it took; it waits for nothing else."""
    with session_scope(database) as session:
        run_id = runs.start_run(session, kind="sync", now=NOW).id
        snapshot_id = snapshots.start_snapshot(session, run_id=run_id, now=NOW).id
    header = {
        "database": database.engine.url.render_as_string(hide_password=False),
        "snapshot_id": snapshot_id,
        "lanes": 2,
        "floor": 0,
        "lane": 1,
        "known": False,
    }
    frames = [json.dumps(header).encode(), marshal.dumps([fake.add_key("taken")])]
    helper = subprocess.run(
        [sys.executable, "-m", "keyhygiene.staging"],
        input=b"".join(struct.pack("<I", len(frame)) + frame for frame in frames),
        capture_output=True,
        timeout=60,
        check=False,
    )

    assert helper.returncode == 1
    # The batch was committed (on PostgreSQL, with the id reserved for its new key, for the sync to
    # record while it lists); no result was asked for or given.
    said, ids = helper.stdout.split(b" ", 1)
    assert said == b"ok" and ids.endswith(b"\n") and ids.count(b"\n") == 1
    assert len(json.loads(ids)) == (1 if database.dialect == "postgresql" else 0)
    assert _staged_rows(database) == 1


# -- the command -----------------------------------------------------------------------------------


def test_sync_prints_one_summary_line_and_only_json_on_stderr(
    database: Database, fake: FakeOpenRouter, env: dict[str, str], cli
) -> None:
    research = fake.add_workspace("Research")["id"]
    add_keys(fake, 120)
    add_keys(fake, 30, workspace_id=research, prefix="r")

    result = cli("sync")

    assert result.exit_code == 0, result.stderr
    assert result.stdout.count("\n") == 1
    assert result.stdout.startswith("run 1 sync ok: snapshot 1: 150 keys in 2 workspaces")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines
    for line in lines:
        event = json.loads(line)
        assert isinstance(event, dict)
        assert {"timestamp", "level", "event"} <= set(event)
        assert datetime.fromisoformat(event["timestamp"]).tzinfo is not None
    assert result.events_named("sync_complete")[0]["keys"] == 150
    assert not [event for event in result.events if str(event.get("logger", "")).startswith("alembic")]


def test_sync_never_exceeds_the_configured_concurrency(
    database: Database, fake: FakeOpenRouter, env: dict[str, str], cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("A", "B"):
        add_keys(fake, 210, workspace_id=fake.add_workspace(name)["id"], prefix=name)
    doomed = add_keys(fake, 40, prefix="doomed")
    monkeypatch.setenv("KEYHYGIENE_HTTP_CONCURRENCY", "3")
    assert cli("sync").exit_code == 0
    for key_hash in doomed:  # the next sync checks each of them with a GET
        fake.delete_key(key_hash)
    fake.faults.latency = 0.01
    fake.faults.rate_limit(2, retry_after=0.05)
    fake.reset_stats()

    result = cli("sync")

    assert result.exit_code == 0, result.stderr
    assert "40 gone" in result.stdout
    assert 2 <= fake.max_in_flight <= 3
    assert sum(1 for call in fake.calls if call.status == 404) == 40


def test_overlapping_syncs_leave_the_interpreter_switch_interval_as_they_found_it() -> None:
    """Two syncs on a threads pool overlap: the first to end keeps the short interval for the
    other, and the last one restores the interval from before both."""
    before = sys.getswitchinterval()
    first, second = quick_handoffs(), quick_handoffs()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert sys.getswitchinterval() == pytest.approx(0.001)
    second.__exit__(None, None, None)
    assert sys.getswitchinterval() == before
