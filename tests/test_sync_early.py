"""PostgreSQL: a sync records the keys new to the store while it still lists them.

Each page's new keys are tracked, with their first versions, in one transaction that the sync
holds open from its first new key to the snapshot's commit (``inventory.EarlyRecorder``). What a
user relies on: the store ends up exactly as the one-pass recording leaves it (checked against
SQLite, which records in one pass), nothing of it is seen before the snapshot commits, and a sync
that fails after tracking keys this way leaves nothing of them.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, insert, make_url, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from db import runs, snapshots
from db.migrate import upgrade
from db.models import Snapshot, key_records, key_usage, snapshot_staging, tracked_keys
from db.rollups import KeyDay, KeyRollup, SnapshotRollup
from keyhygiene.context import Database, session_scope
from keyhygiene.fakeapi import FakeOpenRouter
from keyhygiene.inventory import EarlyRecorder
from keyhygiene.jobs import JobOutcome, execute
from keyhygiene.keysapi.client import KeysClient
from keyhygiene.settings import Settings
from tests.celery_support import wait_until
from tests.conftest import MANAGEMENT_KEY, postgres_schema
from tests.roles import role_that_writes

pytestmark = pytest.mark.postgres

NOW = datetime.now(UTC).replace(microsecond=0)
_RECORD_LOCK = 0x6B657973  # db.snapshots' advisory lock: its high half; the low one is the store's


@contextmanager
def migrated(url: str) -> Iterator[Database]:
    database = Database.open(Settings(KEYHYGIENE_DATABASE_URL=url), check=False)  # type: ignore[call-arg]
    upgrade(database.engine)
    try:
        yield database
    finally:
        database.close()


def syncer(database: Database, fake_url: str) -> Callable[..., JobOutcome]:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        OPENROUTER_MANAGEMENT_KEY=MANAGEMENT_KEY,
        OPENROUTER_BASE_URL=fake_url,
        KEYHYGIENE_DATABASE_URL=database.engine.url.render_as_string(hide_password=False),
    )

    def sync(at: datetime, concurrency: int = 4) -> JobOutcome:
        with KeysClient(fake_url, MANAGEMENT_KEY, concurrency=concurrency, retry_seconds=0.5) as client:
            return execute("sync", settings, database=database, client=client, clock=lambda: at)

    return sync


def history(database: Database) -> dict[str, Any]:
    """Everything the store holds of its keys, by key hash and snapshot, without its own ids."""
    t, r, u = tracked_keys, key_records, key_usage
    days, rolled, per_snapshot = KeyDay.__table__, KeyRollup.__table__, SnapshotRollup.__table__
    with database.sessions() as session:
        hashes = dict(session.execute(select(t.c.id, t.c.key_hash)).all())

        def by_key(table: Any, *order: Any) -> list[tuple[Any, ...]]:
            columns = [column for column in table.c if column.name not in ("id", "key_id")]
            rows = session.execute(select(table.c.key_id, *columns).order_by(table.c.key_id, *order)).all()
            return sorted((hashes[row[0]], *row[1:]) for row in rows)

        return {
            "tracked": sorted(session.execute(select(t.c.key_hash, t.c.first_seen_at, t.c.fingerprint)).all()),
            "records": by_key(r, r.c.valid_from),
            "usage": by_key(u, u.c.valid_from),
            "key_days": by_key(days, days.c.day),
            "key_rollups": by_key(rolled),
            "snapshot_rollups": sorted(
                tuple(row) for row in session.execute(select(*(c for c in per_snapshot.c if c.name != "id"))).all()
            ),
            "snapshots": session.execute(
                select(Snapshot.id, Snapshot.status, Snapshot.key_count, Snapshot.new_versions).order_by(Snapshot.id)
            ).all(),
        }


def organisation(fake: FakeOpenRouter) -> list[str]:
    """Keys of every kind over two workspaces: spent, disabled, expired, limited, idle."""
    other = fake.add_workspace("Research")["id"]
    hashes = []
    for index in range(420):
        key = fake.add_key(
            f"key-{index:04d}",
            workspace_id=other if index % 5 == 0 else None,
            disabled=index % 7 == 0,
            limit=25.0 if index % 3 == 0 else None,
            usage=index * 0.01,
            usage_daily=0.5 if index % 11 == 0 else 0.0,
            byok_usage_monthly=1.25 if index % 13 == 0 else 0.0,
            created_at=NOW - timedelta(days=90, minutes=index),
            expires_at=NOW - timedelta(days=1) if index % 17 == 0 else None,
            last_used_at=NOW - timedelta(days=index % 60) if index % 2 else None,
        )
        hashes.append(key["hash"])
    return hashes


def test_a_store_recorded_while_listing_holds_exactly_what_one_pass_records(
    fake: FakeOpenRouter, fake_url: str, sqlite_url: str
) -> None:
    hashes = organisation(fake)
    first, second = NOW, NOW + timedelta(hours=6)
    with postgres_schema() as postgres_url, migrated(postgres_url) as pg, migrated(sqlite_url) as lite:
        stores = {"postgresql": (pg, syncer(pg, fake_url)), "sqlite": (lite, syncer(lite, fake_url))}
        # A store's first snapshot: every key is new.
        for _, sync in stores.values():
            assert sync(first).status == runs.OK
        # Then the organisation grows by a third, and changes: the new keys are recorded while
        # listing, beside keys that changed, are gone, or are as they were.
        for index in range(140):
            fake.add_key(f"new-{index:04d}", disabled=index % 4 == 0, usage=index * 0.5)
        for key_hash in hashes[:30]:
            fake.record_use(key_hash, 3.0)
        for key_hash in hashes[30:40]:
            fake.delete_key(key_hash)
        for key_hash in hashes[40:45]:
            fake.update_key(key_hash, {"disabled": True})
        outcomes = {name: sync(second) for name, (_, sync) in stores.items()}
        assert {name: outcome.status for name, outcome in outcomes.items()} == {
            "postgresql": runs.OK,
            "sqlite": runs.OK,
        }
        assert outcomes["postgresql"].message == outcomes["sqlite"].message
        assert "140 new" in outcomes["postgresql"].message and "10 gone" in outcomes["postgresql"].message
        held = {name: history(database) for name, (database, _) in stores.items()}
        assert held["postgresql"] == held["sqlite"]
        assert len(held["postgresql"]["tracked"]) == 560
        with pg.sessions() as session:
            usage = {key.hash: key.usage for key in snapshots.keys_at(session, 2)}
        assert usage[hashes[0]] == pytest.approx(3.0) and hashes[30] not in usage


def _store_lock_holders(database: Database, what: str = "pid") -> list[Any]:
    """``what`` of each session that holds this store's recording lock (``db.snapshots.lock_recording``)."""
    with database.engine.connect() as connection:
        return list(
            connection.scalars(
                text(
                    f"SELECT {what} FROM pg_locks WHERE locktype = 'advisory' AND granted "
                    "AND classid = :high AND objid = CAST(CAST('snapshots' AS regclass) AS oid)"
                ),
                {"high": _RECORD_LOCK},
            )
        )


def _store_lock_held(database: Database) -> bool:
    return bool(_store_lock_holders(database))


def _when_recording_while_listing(
    fake: FakeOpenRouter, database: Database, offset: int, then: Callable[[], None]
) -> dict[str, Any]:
    """At the page of the default workspace at ``offset``: wait (bounded) until the sync holds
    the store's recording lock, that is, has begun recording while listing; note what another
    session sees of the store then, and run ``then``."""
    seen: dict[str, Any] = {}

    def at_page(fake: FakeOpenRouter, workspace_id: str, page_offset: int) -> None:
        if page_offset != offset or seen:
            return
        deadline = datetime.now(UTC) + timedelta(seconds=20)
        while not (held := _store_lock_held(database)) and datetime.now(UTC) < deadline:
            threading.Event().wait(0.01)
        with database.sessions() as session:
            seen["lock"] = held
            seen["tracked"] = session.scalar(select(tracked_keys.c.id).limit(1))
            seen["usage"] = session.scalar(select(key_usage.c.id).limit(1))
            seen["staged"] = session.scalar(select(snapshot_staging.c.key_hash).limit(1))
        then()

    fake.faults.on_list_page(at_page)
    return seen


def test_keys_recorded_while_listing_are_unseen_until_the_snapshot_commits(
    pg_database: Database, fake: FakeOpenRouter, fake_url: str
) -> None:
    for index in range(600):
        fake.add_key(f"key-{index:04d}", created_at=NOW - timedelta(minutes=index))
    seen = _when_recording_while_listing(fake, pg_database, 500, lambda: None)

    outcome = syncer(pg_database, fake_url)(NOW, concurrency=1)

    assert outcome.status == runs.OK, outcome.message
    # Pages were staged and committed, and the sync was recording them: nobody else saw a key.
    assert seen["lock"] is True and seen["staged"] is not None
    assert (seen["tracked"], seen["usage"]) == (None, None)
    assert not _store_lock_held(pg_database)
    with pg_database.sessions() as session:
        assert len(list(snapshots.keys_at(session, 1))) == 600


def test_a_sync_that_fails_after_recording_while_listing_leaves_nothing_of_it(
    pg_database: Database, fake: FakeOpenRouter, fake_url: str
) -> None:
    for index in range(600):
        fake.add_key(f"key-{index:04d}", created_at=NOW - timedelta(minutes=index))
    seen = _when_recording_while_listing(
        fake, pg_database, 500, lambda: fake.faults.server_error(1_000, status=500, path="/keys")
    )
    sync = syncer(pg_database, fake_url)

    failed = sync(NOW, concurrency=1)

    assert seen["lock"] is True
    assert failed.status == runs.FAILED and "no snapshot stored" in failed.message
    assert not _store_lock_held(pg_database)
    with pg_database.sessions() as session:
        for table in (tracked_keys, key_records, key_usage, snapshot_staging):
            assert session.scalar(select(table).limit(1)) is None, table.name
        assert session.get(Snapshot, 1).status == "failed"  # type: ignore[union-attr]
    # The ids reserved for the keys are gone with them; the next sync records every key.
    fake.faults.clear()
    assert sync(NOW + timedelta(minutes=5)).status == runs.OK
    with pg_database.sessions() as session:
        assert len(list(snapshots.keys_at(session, 2))) == 600


def test_an_older_sync_recording_while_listing_is_superseded_and_leaves_nothing(
    pg_database: Database, fake: FakeOpenRouter
) -> None:
    """Two syncs list the same new keys; the later-started one records first. The other, recording
    while listing, tracks only the keys the first did not, then finds it cannot record on top of a
    newer snapshot: everything it wrote goes."""
    for index in range(5):
        fake.add_key(f"key-{index}", created_at=NOW - timedelta(minutes=index))
    raw = [dict(key) for key in fake.keys]
    with session_scope(pg_database) as session:
        older = snapshots.start_snapshot(session, run_id=_run(session), now=NOW).id
        newer = snapshots.start_snapshot(session, run_id=_run(session), now=NOW).id
    writer = snapshots.SnapshotWriter(older)
    with session_scope(pg_database) as session:
        reserved = writer.add(session, raw)  # ids reserved for all five: none is tracked
    assert len(reserved) == 5
    # The newer sync lists three of them and records first.
    other = snapshots.SnapshotWriter(newer)
    with session_scope(pg_database) as session:
        other.add(session, raw[:3])
    with session_scope(pg_database) as session:
        other.finish(session, taken_at=NOW, workspace_counts={}, expected_keys=3)

    with session_scope(pg_database) as session:
        early = _begin(session, older, NOW)
        snapshots.record_new_keys(session, early, reserved)
        assert early.recorded == 2  # the two the other sync did not track
        with pytest.raises(snapshots.SnapshotSuperseded):
            writer.finish(session, taken_at=NOW, workspace_counts={}, expected_keys=5, early=early)
        session.rollback()
    with pg_database.sessions() as session:
        tracked = session.execute(select(tracked_keys.c.key_hash, tracked_keys.c.id)).all()
    assert sorted(key_hash for key_hash, _ in tracked) == sorted(key["hash"] for key in raw[:3])


def _begin(session: Any, snapshot_id: int, taken_at: datetime) -> snapshots.EarlyRecording:
    early = snapshots.begin_early_recording(
        session, snapshot_id=snapshot_id, taken_at=taken_at, keep_waiting=lambda: False
    )
    assert early is not None  # the store's recording lock was free
    return early


def _run(session: Any) -> int:
    return runs.start_run(session, kind="sync", started_by=runs.CLI, now=NOW).id


def test_record_new_keys_tracks_only_keys_nobody_tracked(pg_database: Database, fake: FakeOpenRouter) -> None:
    """The older sync records on top of the newer one's keys: the two keys it alone lists are
    tracked while listing; the three the other sync tracked keep their ids, and get this
    snapshot's versions from its last step."""
    for index in range(5):
        fake.add_key(f"key-{index}", created_at=NOW - timedelta(minutes=index))
    raw = [dict(key) for key in fake.keys]
    with session_scope(pg_database) as session:
        first = snapshots.start_snapshot(session, run_id=_run(session), now=NOW).id
    other = snapshots.SnapshotWriter(first)
    with session_scope(pg_database) as session:
        other.add(session, raw[:3])
    with session_scope(pg_database) as session:
        second = snapshots.start_snapshot(session, run_id=_run(session), now=NOW).id
    writer = snapshots.SnapshotWriter(second)
    with session_scope(pg_database) as session:
        reserved = writer.add(session, raw)  # none tracked yet: five ids reserved
    with session_scope(pg_database) as session:
        other.finish(session, taken_at=NOW, workspace_counts={}, expected_keys=3)
    with pg_database.sessions() as session:
        tracked_before = dict(session.execute(select(tracked_keys.c.key_hash, tracked_keys.c.id)).all())

    later = NOW + timedelta(minutes=1)
    with session_scope(pg_database) as session:
        early = _begin(session, second, later)
        snapshots.record_new_keys(session, early, reserved)
        assert early.recorded == 2
        written = writer.finish(session, taken_at=later, workspace_counts={}, expected_keys=5, early=early)

    assert (written.key_count, written.added, written.changed, written.gone) == (5, 2, 0, 0)
    with pg_database.sessions() as session:
        tracked = dict(session.execute(select(tracked_keys.c.key_hash, tracked_keys.c.id)).all())
        assert {key_hash: tracked[key_hash] for key_hash in tracked_before} == tracked_before
        assert sorted(tracked) == sorted(key["hash"] for key in raw)
        assert sorted(key.hash for key in snapshots.keys_at(session, second)) == sorted(tracked)
        opened = session.execute(
            select(key_usage.c.key_id, key_usage.c.valid_from).where(key_usage.c.valid_to.is_(None))
        ).all()
    # One open usage version each: the three keys carried theirs from the first snapshot.
    assert sorted(opened) == sorted(
        [(tracked[key["hash"]], first) for key in raw[:3]] + [(tracked[key["hash"]], second) for key in raw[3:]]
    )


def test_the_check_that_versions_name_tracked_keys_probes_the_index_at_any_size(pg_database: Database) -> None:
    """Migration 0021: the trigger function plans with the index of tracked ids only."""
    with pg_database.engine.connect() as connection:
        settings = connection.execute(
            text(
                "SELECT proconfig FROM pg_proc WHERE proname = 'keyhygiene_versions_name_tracked_keys' "
                "AND pronamespace = CAST(current_schema() AS regnamespace)"
            )
        ).scalar_one()
    assert {"enable_seqscan=off", "enable_hashjoin=off", "enable_mergejoin=off", "enable_nestloop=on"} <= set(settings)


def test_sqlite_records_in_one_pass(tmp_path: Path) -> None:
    with migrated(f"sqlite:///{tmp_path / 'keyhygiene.db'}") as database:
        assert database.dialect == "sqlite"
        assert EarlyRecorder.start(database, 1, NOW) is None


def test_a_server_that_ends_idle_transactions_does_not_fail_the_sync(fake: FakeOpenRouter, fake_url: str) -> None:
    """The transaction stays open while the sync waits for the next page. A server that ends
    sessions idle in a transaction sooner than the recording looks at it again ends it: the sync
    records after the listing instead."""
    for index in range(300):
        fake.add_key(f"key-{index:04d}", created_at=NOW - timedelta(minutes=index))
    fake.faults.latency = 0.5  # each page: longer than the server lets a transaction sit idle
    with postgres_schema() as url:
        strict = url + "%20-cidle_in_transaction_session_timeout%3D200"
        with migrated(strict) as database:
            with database.engine.connect() as connection:
                said = connection.execute(text("SHOW idle_in_transaction_session_timeout")).scalar_one()
            assert said == "200ms"
            outcome = syncer(database, fake_url)(NOW, concurrency=1)
            assert outcome.status == runs.OK, outcome.message
            with database.sessions() as session:
                assert len(list(snapshots.keys_at(session, 1))) == 300


def _lock_free(database: Database) -> bool:
    """Whether another session could take the store's recording lock now (and lets it go at once)."""
    with database.writer() as session, session.begin():
        taken = session.scalar(
            text(
                "SELECT pg_try_advisory_xact_lock((CAST(:high AS bigint) << 32) "
                "| CAST(CAST('snapshots' AS regclass) AS bigint))"
            ),
            {"high": _RECORD_LOCK},
        )
    return bool(taken)


@pytest.mark.parametrize("moment", ["at once", "while it waits for the lock"])
def test_a_recorder_stopped_while_another_sync_records_never_takes_the_lock(moment: str) -> None:
    """A sync that fails while another one of the store records leaves no transaction behind that
    takes the store's recording lock once the other lets it go, and then holds it for nobody."""
    # Its own name in pg_stat_activity: the sessions counted below are this test's alone.
    with postgres_schema() as url, migrated(f"{url}&application_name=kh_{uuid.uuid4().hex[:12]}") as pg_database:
        _stop_while_another_records(pg_database, moment)


def _stop_while_another_records(pg_database: Database, moment: str) -> None:
    with session_scope(pg_database) as session:
        snapshot_id = snapshots.start_snapshot(session, run_id=_run(session), now=NOW).id
    other = pg_database.writer()  # another sync, recording
    other.begin()
    snapshots.lock_recording(other)
    recorder = EarlyRecorder(pg_database, snapshot_id, NOW)
    recorder.offer([10**6])
    if moment != "at once":  # its transaction begun, asking for the lock
        wait_until(lambda: _idle_in_transaction(pg_database) >= 2, timeout=20, interval=0.01, what="the request")
    recorder.stop()
    other.rollback()
    other.close()
    wait_until(lambda: _idle_in_transaction(pg_database) == 0, timeout=20, interval=0.01, what="no transaction left")
    assert _lock_free(pg_database)


def _idle_in_transaction(database: Database) -> int:
    """Sessions of this test's own (by their application name) that sit in an open transaction."""
    with database.engine.connect() as connection:
        return int(
            connection.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%' "
                    "AND application_name = current_setting('application_name') AND application_name <> ''"
                )
            ).scalar_one()
        )


def test_a_recording_whose_connection_is_lost_while_listing_is_done_in_one_pass(
    pg_database: Database, fake: FakeOpenRouter, fake_url: str
) -> None:
    """Recording while listing only saves time: its connection ended by the server (an
    administrator, a proxy) mid-listing, the sync records the snapshot after the listing instead."""
    for index in range(600):
        fake.add_key(f"key-{index:04d}", created_at=NOW - timedelta(minutes=index))

    def end_the_recording() -> None:
        assert _store_lock_holders(pg_database, "pg_terminate_backend(pid)") == [True]

    seen = _when_recording_while_listing(fake, pg_database, 300, end_the_recording)
    outcome = syncer(pg_database, fake_url)(NOW, concurrency=1)

    assert seen["lock"] is True
    assert outcome.status == runs.OK, outcome.message
    assert "600 new" in outcome.message
    with pg_database.sessions() as session:
        assert len(list(snapshots.keys_at(session, 1))) == 600
        assert session.scalar(select(func.count()).select_from(key_usage)) == 600


@pytest.mark.parametrize("table", ["tracked_keys", "snapshot_staging"])
def test_a_schema_change_beside_the_listing_is_given_way(
    pg_database: Database, fake: FakeOpenRouter, fake_url: str, table: str
) -> None:
    """A schema change (here its lock, as ALTER TABLE, VACUUM FULL or REINDEX take it) asked for
    while the sync records as it lists: it waits for that transaction, and the sync's next page
    would wait for it. The recording gives way and the sync records after the listing instead."""
    for index in range(600):
        fake.add_key(f"key-{index:04d}", created_at=NOW - timedelta(minutes=index))
    changed: list[str] = []

    def change_schema() -> None:
        with pg_database.engine.connect() as connection:
            connection.execute(text("SET lock_timeout = '60s'"))  # a bound, should the sync not give way
            connection.execute(text(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
            changed.append(table)
            connection.rollback()

    def asked() -> None:  # once the schema change waits for the recording's transaction
        changer = threading.Thread(target=change_schema, daemon=True)
        changer.start()
        wait_until(lambda: _waiting_for(pg_database, table), timeout=20, interval=0.01, what="the lock request")
        threads.append(changer)

    threads: list[threading.Thread] = []
    seen = _when_recording_while_listing(fake, pg_database, 300, asked)
    outcome = syncer(pg_database, fake_url)(NOW, concurrency=1)

    assert seen["lock"] is True
    assert outcome.status == runs.OK, outcome.message
    threads[0].join(timeout=60)
    assert changed == [table]
    with pg_database.sessions() as session:
        assert len(list(snapshots.keys_at(session, 1))) == 600


def _waiting_for(database: Database, table: str) -> bool:
    with database.engine.connect() as connection:
        return bool(
            connection.execute(
                text("SELECT EXISTS (SELECT 1 FROM pg_locks WHERE NOT granted AND relation = to_regclass(:table))"),
                {"table": table},
            ).scalar_one()
        )


class CuttableProxy:
    """A TCP proxy to PostgreSQL whose connections can be cut on the client's side alone, as a
    proxy or a NAT that lost its client does: the server's side stays open, its session waiting
    for a client that is gone, in its transaction, with its locks."""

    def __init__(self, port: int) -> None:
        self._server = ("127.0.0.1", port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._listener.accept()
                server = socket.create_connection(self._server)
                self._pairs.append((client, server))
                for source, sink in ((client, server), (server, client)):
                    threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)

    def cut_client_of(self, server_port: int) -> None:
        """Cut, on the client's side only, the connection the server sees from ``server_port``."""
        (client,) = [client for client, server in self._pairs if server.getsockname()[1] == server_port]
        client.shutdown(socket.SHUT_RDWR)
        client.close()

    def close(self) -> None:
        self._listener.close()
        for client, server in self._pairs:
            for end in (client, server):
                with contextlib.suppress(OSError):
                    end.close()


def test_a_recording_cut_off_on_the_clients_side_alone_is_ended_before_the_one_pass(
    fake: FakeOpenRouter, fake_url: str
) -> None:
    """The server's side of the recording's connection outlives its client: still in its
    transaction, it holds the store's recording lock. The sync ends it, then records in one pass."""
    for index in range(600):
        fake.add_key(f"key-{index:04d}", created_at=NOW - timedelta(minutes=index))
    with postgres_schema() as url, migrated(url) as direct:
        proxy = CuttableProxy(make_url(url).port or 5432)
        try:
            through = make_url(url).set(port=proxy.port).render_as_string(hide_password=False)
            with migrated(through) as database:

                def cut() -> None:
                    (port,) = _store_lock_holders(
                        direct, "(SELECT client_port FROM pg_stat_activity AS a WHERE a.pid = pg_locks.pid)"
                    )
                    proxy.cut_client_of(port)

                seen = _when_recording_while_listing(fake, direct, 300, cut)
                outcome = syncer(database, fake_url)(NOW, concurrency=1)

                assert seen["lock"] is True
                assert outcome.status == runs.OK, outcome.message
                assert _store_lock_holders(direct) == []
                with direct.sessions() as session:
                    assert len(list(snapshots.keys_at(session, 1))) == 600
        finally:
            proxy.close()


def test_a_schema_change_by_another_role_is_seen_waiting(pg_database: Database) -> None:
    """keyhygiene may run as a role that cannot read other roles' sessions in pg_stat_activity:
    a schema change that an administrator runs is still seen waiting for its transaction."""
    with role_that_writes(pg_database.engine) as role:
        as_role = create_engine(pg_database.engine.url.set(username=role))
        try:
            with Session(as_role) as recording, recording.begin():
                recording.execute(insert(tracked_keys).values(id=1, key_hash="h", first_seen_at=NOW))
                assert not snapshots.holding_up_others(recording)
                changer = threading.Thread(target=_alter_tracked_keys, args=(pg_database,), daemon=True)
                changer.start()
                wait_until(
                    lambda: _waiting_for(pg_database, "tracked_keys"), timeout=20, interval=0.01, what="the change"
                )
                assert snapshots.holding_up_others(recording)
                recording.rollback()
            changer.join(timeout=30)
        finally:
            as_role.dispose()


def _alter_tracked_keys(database: Database) -> None:
    with database.engine.connect() as connection:
        connection.execute(text("SET lock_timeout = '30s'"))
        connection.execute(text("LOCK TABLE tracked_keys IN ACCESS EXCLUSIVE MODE"))
        connection.rollback()


def test_only_the_very_transaction_left_open_is_ended(pg_database: Database) -> None:
    """A recording whose client is gone is ended on the server; a healthy session that the
    connection serves since (its transaction ended, the pool gave it out again) is left alone."""
    with pg_database.writer() as healthy:
        healthy.begin()
        recorded = snapshots.this_transaction(healthy)
        assert recorded is not None
        healthy.commit()
        healthy.begin()  # the same connection, another transaction
        healthy.execute(text("SELECT 1"))
        with pg_database.writer() as other, other.begin():
            snapshots.end_transaction_of(other, recorded)
        assert healthy.execute(text("SELECT 2")).scalar_one() == 2  # still served
        healthy.rollback()

    with pg_database.engine.connect() as left_open:
        left_open.begin()
        session = Session(bind=left_open)
        cut = snapshots.this_transaction(session)
        assert cut is not None
        with pg_database.writer() as other, other.begin():
            snapshots.end_transaction_of(other, cut)
        with pytest.raises(OperationalError):
            left_open.execute(text("SELECT 1"))
