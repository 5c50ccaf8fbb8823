"""The snapshot store on SQLite and PostgreSQL: versioned key states, read back exactly.

These drive ``db.snapshots`` with literal keys, so every version boundary is known in advance;
``test_sync.py`` covers the same store through the fake API.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import event, func, select, update
from sqlalchemy import text as sql
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from db import retention, runs, snapshots
from db.engine import make_engine
from db.migrate import upgrade
from db.models import Snapshot, key_usage, snapshot_carried, snapshot_staging, tracked_keys
from keyhygiene.context import Database, session_scope
from keyhygiene.demo import _PastDays
from keyhygiene.enforcement import FACT_FIELDS, facts_at, key_facts, key_history
from keyhygiene.fakeapi import FakeOpenRouter, generate_organisation
from keyhygiene.keysapi.errors import MalformedResponse
from keyhygiene.keysapi.models import Key
from keyhygiene.settings import Settings
from tests.conftest import postgres_schema

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def key(n: int, **fields: Any) -> Key:
    data: dict[str, Any] = {
        "hash": f"{n:064x}",
        "name": f"key-{n}",
        "label": f"sk-or-v1-{n:03d}...abc",
        "disabled": False,
        "limit": None,
        "limit_remaining": None,
        "limit_reset": None,
        "include_byok_in_limit": False,
        "usage": 1.0 * n,
        "usage_daily": 0.0,
        "usage_weekly": 0.0,
        "usage_monthly": 0.0,
        "byok_usage": 0.0,
        "byok_usage_daily": 0.0,
        "byok_usage_weekly": 0.0,
        "byok_usage_monthly": 0.0,
        "created_at": "2025-08-24T10:30:00Z",
        "updated_at": None,
        "expires_at": None,
        "creator_user_id": "user_1",
        "workspace_id": "ws-default",
        "external_user": None,
        "last_used_at": "2026-02-19T20:52:27.363244+00:00",
    }
    data.update(fields)
    return Key.from_api(data)


def store(
    database: Database, keys: list[Key], at: datetime, reuse: snapshots.StagedRows | None = None
) -> tuple[int, snapshots.SnapshotWrite]:
    """One complete sync's worth of writes: a run, a snapshot, its key states."""
    with session_scope(database) as session:
        run_id = runs.start_run(session, kind="sync", now=at).id
        snapshot_id = snapshots.start_snapshot(session, run_id=run_id, now=at).id
    with session_scope(database) as session:
        written = snapshots.record_snapshot(
            session,
            snapshot_id=snapshot_id,
            keys=[k.raw for k in keys],
            taken_at=at,
            workspace_counts={"ws-default": len(keys)},
            reuse=reuse,
        )
    return snapshot_id, written


def raw_at(database: Database, snapshot_id: int) -> dict[str, Mapping[str, Any]]:
    with database.sessions() as session:
        return {k.hash: k.raw for k in snapshots.keys_at(session, snapshot_id)}


def test_each_snapshot_reads_back_exactly(database: Database) -> None:
    day1 = [key(n) for n in range(1, 6)]
    day2 = [key(1), key(2, usage=9.5, usage_daily=7.5), key(3), key(5, disabled=True), key(6)]  # 4 gone, 6 new
    day3 = [key(1), key(2, usage=9.5, usage_daily=7.5), key(5, disabled=True), key(6, name="renamed")]

    s1, w1 = store(database, day1, T0)
    s2, w2 = store(database, day2, T0 + timedelta(hours=1))
    s3, w3 = store(database, day3, T0 + timedelta(hours=2))

    assert (w1.added, w1.changed, w1.gone, w1.new_versions) == (5, 0, 0, 5)
    assert (w2.added, w2.changed, w2.gone, w2.new_versions) == (1, 2, 1, 3)
    assert (w3.added, w3.changed, w3.gone, w3.new_versions) == (0, 1, 1, 1)
    for snapshot_id, keys in ((s1, day1), (s2, day2), (s3, day3)):
        assert raw_at(database, snapshot_id) == {k.hash: k.raw for k in keys}
    with database.sessions() as session:
        assert snapshots.count_versions(session) == 9
        read_back = {k.hash: k for k in snapshots.keys_at(session, s2)}
    assert read_back[key(2).hash] == key(2, usage=9.5, usage_daily=7.5)  # typed fields too, timestamps aware
    assert read_back[key(2).hash].last_used_at == datetime(2026, 2, 19, 20, 52, 27, 363244, tzinfo=UTC)


def test_a_key_whose_hash_needs_quoting_keeps_one_identity_across_snapshots(database: Database) -> None:
    """The API promises only that a hash is a string. A page's hashes reach the database as one
    parameter, to find which keys it tracks: each of these characters is special to some way of
    writing a list (an SQL array, JSON, CSV), and none may split or change a hash."""
    odd = 'ключ "q" \\ {a,b}, \x01 🔑'
    day1 = [key(1), key(2, hash=odd)]
    day2 = [key(1), key(2, hash=odd, name="renamed")]

    s1, w1 = store(database, day1, T0)
    s2, w2 = store(database, day2, T0 + timedelta(hours=1))

    assert (w1.added, w1.new_versions) == (2, 2)
    with Session(database.engine) as session:  # the lookup itself finds it (a miss would be resolved later, by hash)
        ids, tracked = snapshots._key_ids(session, [odd, "f" * 64])
        odd_id = session.scalar(select(tracked_keys.c.id).where(tracked_keys.c.key_hash == odd))
    assert odd in tracked and "f" * 64 not in tracked and ids[odd] == odd_id
    assert (w2.added, w2.changed, w2.gone, w2.new_versions) == (0, 1, 0, 1)  # the same key, renamed
    assert raw_at(database, s1)[odd]["name"] == "key-2"
    assert raw_at(database, s2)[odd]["name"] == "renamed"
    with database.sessions() as session:
        assert session.scalars(select(tracked_keys.c.key_hash).order_by(tracked_keys.c.id)).all() == [key(1).hash, odd]


def test_staging_rows_reused_across_snapshots_store_the_same_history(database: Database) -> None:
    """The demo records its simulated days reusing the staging rows of keys that did not change."""
    reuse = snapshots.StagedRows()
    days = [
        [key(n) for n in range(1, 6)],
        [key(1), key(2, usage=9.5, last_used_at="2026-03-01T10:00:00Z"), key(3), key(5, disabled=True), key(6)],
        [key(1), key(2, usage=9.5, last_used_at="2026-03-01T10:00:00Z"), key(5), key(6, name="renamed")],
    ]
    stored = [store(database, keys, T0 + timedelta(hours=hour), reuse) for hour, keys in enumerate(days)]

    for (snapshot_id, _), keys in zip(stored, days, strict=True):
        assert raw_at(database, snapshot_id) == {k.hash: k.raw for k in keys}
    assert [written.new_versions for _, written in stored] == [5, 3, 2]


def test_reused_rows_of_keys_gone_and_back_as_they_were_are_stored_again(database: Database) -> None:
    """Keys whose JSON has not changed are staged from their open versions; a key that was missing
    from the snapshot before has none, and is staged from its row all the same."""
    reuse = snapshots.StagedRows()
    days = [
        [key(1), key(2), key(3)],
        [key(1), key(2), key(3)],  # now tracked: the rows are kept for reuse
        [key(1), key(2)],  # 3 gone: its versions are closed
        [key(1), key(2), key(3)],  # 3 back exactly as it was
        [key(1), key(3, name="renamed")],
    ]
    stored = [store(database, keys, T0 + timedelta(hours=hour), reuse) for hour, keys in enumerate(days)]

    for (snapshot_id, _), keys in zip(stored, days, strict=True):
        assert raw_at(database, snapshot_id) == {k.hash: k.raw for k in keys}
    assert [(w.key_count, w.added, w.gone, w.new_versions) for _, w in stored] == [
        (3, 3, 0, 3),
        (3, 0, 0, 0),
        (2, 0, 1, 0),
        (3, 1, 0, 1),
        (2, 0, 1, 1),
    ]


def start(database: Database, at: datetime) -> int:
    with session_scope(database) as session:
        run_id = runs.start_run(session, kind="sync", now=at).id
        return snapshots.start_snapshot(session, run_id=run_id, now=at).id


def fingerprints(database: Database) -> dict[str, int | None]:
    with database.sessions() as session:
        return {
            key_hash: print_
            for key_hash, print_ in session.execute(select(tracked_keys.c.key_hash, tracked_keys.c.fingerprint))
        }


def test_a_fingerprint_is_the_same_in_every_process_and_tells_any_difference() -> None:
    raw = dict(key(1).raw, future_field={"a": [1, 2.5, None, True]})
    other_process = subprocess.run(
        [sys.executable, "-c", f"from db.snapshots import fingerprint; print(fingerprint({raw!r}))"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    assert int(other_process.stdout) == snapshots.fingerprint(raw)
    variants = [
        {**raw, "usage": 7},  # 7 and 7.0 are different JSON
        {**raw, "usage": 7.0},
        {**raw, "usage": True},
        dict(reversed(list(raw.items()))),  # the same fields in another order
        {**raw, "future_field": {"a": [1, 2.5, None, False]}},
    ]
    assert len({snapshots.fingerprint(raw), *(snapshots.fingerprint(variant) for variant in variants)}) == 6


def test_keys_listed_as_the_store_holds_them_are_carried_with_their_versions(database: Database) -> None:
    """A sync reads the fingerprints of what the store holds; a key listed exactly as stored is not
    turned into a row in Python but carried with its open versions, and reads back the same."""
    day1 = [key(n) for n in range(1, 6)]
    store(database, day1, T0)
    with database.sessions() as session:
        known = snapshots.known_fingerprints(session)
    assert fingerprints(database) == {k.hash: snapshots.fingerprint(k.raw) for k in day1}
    day2 = [key(1), key(2, usage=9.5), key(3, name="renamed"), key(5), key(6)]  # 4 gone, 6 new
    snapshot_id = start(database, T0 + timedelta(hours=1))

    writer = snapshots.SnapshotWriter(snapshot_id, known=known)
    staged = writer.stage([dict(k.raw) for k in day2])
    assert sorted(key_hash for _, _, key_hash, _ in staged.unchanged) == sorted([key(1).hash, key(5).hash])
    assert sorted(row[1] for row in staged.rows) == sorted([key(2).hash, key(3).hash, key(6).hash])
    with session_scope(database) as session:
        writer.write(session, staged)
        written = writer.finish(session, taken_at=T0 + timedelta(hours=1), workspace_counts={"ws-default": 5})

    assert raw_at(database, snapshot_id) == {k.hash: k.raw for k in day2}
    assert (written.added, written.changed, written.gone, written.new_versions) == (1, 2, 1, 3)
    assert fingerprints(database) == {
        **{k.hash: snapshots.fingerprint(k.raw) for k in day2},
        key(4).hash: snapshots.fingerprint(key(4).raw),  # gone: kept with its last versions
    }


def test_a_sync_whose_fingerprints_are_older_than_the_newest_snapshot_is_refused(database: Database) -> None:
    """Another sync may record between reading the fingerprints and writing a page: keys they say
    are unchanged may not be any more (key 1 was renamed), so carrying them would store the other
    sync's key 1 as this one's. This sync is refused as soon as it writes the keys it carries
    (here: when it records) and stores nothing."""
    store(database, [key(1), key(2)], T0)
    other = start(database, T0 + timedelta(hours=1))  # started first, records first
    mine = start(database, T0 + timedelta(hours=2))
    with database.sessions() as session:
        known = snapshots.known_fingerprints(session)
    with session_scope(database) as session:
        snapshots.record_snapshot(
            session,
            snapshot_id=other,
            keys=[dict(key(1, name="changed").raw), dict(key(2).raw)],
            taken_at=T0 + timedelta(hours=1),
            workspace_counts={"ws-default": 2},
        )

    writer = snapshots.SnapshotWriter(mine, known=known)
    staged = writer.stage([dict(key(1).raw), dict(key(2).raw)])  # key 1 listed as it was before
    assert len(staged.unchanged) == 2  # as far as the fingerprints read earlier tell
    with session_scope(database) as session:
        writer.write(session, staged)  # carried keys are held back: nothing is written yet
    with pytest.raises(snapshots.SnapshotSuperseded), session_scope(database) as session:
        writer.finish(session, taken_at=T0 + timedelta(hours=2), workspace_counts={})

    with database.sessions() as session:
        assert snapshots.latest_snapshot(session).id == other
        assert session.scalar(select(func.count()).select_from(snapshot_carried)) == 0
    assert raw_at(database, other) == {key(1).hash: key(1, name="changed").raw, key(2).hash: key(2).raw}
    assert fingerprints(database)[key(1).hash] == snapshots.fingerprint(key(1, name="changed").raw)


def test_past_days_recorded_on_a_thread_store_what_one_sync_after_another_would(database: Database) -> None:
    """The demo records each simulated day on a thread of its own while it stages the next day's
    keys, reusing the rows of keys that did not change; rows staged before their snapshot exists."""
    days = [
        [key(n) for n in range(1, 6)],
        [key(1), key(2, usage=9.5, last_used_at="2026-03-01T10:00:00Z"), key(3), key(5, disabled=True), key(6)],
        [key(1), key(2, usage=9.5, last_used_at="2026-03-01T10:00:00Z"), key(5), key(6, name="renamed")],
        [key(1), key(2, usage=12.0, last_used_at="2026-03-02T10:00:00Z"), key(5), key(6, name="renamed"), key(4)],
    ]
    with _PastDays(database) as past:
        for hour, keys in enumerate(days):
            past.record(T0 + timedelta(hours=hour), [dict(k.raw) for k in keys])

    with database.sessions() as session:
        recorded = session.execute(
            select(Snapshot.id, Snapshot.new_versions)
            .where(Snapshot.status == snapshots.COMPLETE)
            .order_by(Snapshot.id)
        ).all()
        assert session.scalar(select(func.count()).select_from(snapshot_staging)) == 0
    assert [raw_at(database, snapshot_id) for snapshot_id, _ in recorded] == [
        {k.hash: k.raw for k in keys} for keys in days
    ]
    assert [new_versions for _, new_versions in recorded] == [5, 3, 2, 2]


def test_a_past_day_that_fails_stops_the_demo_and_leaves_no_snapshot(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: Any, **kwargs: Any) -> snapshots.SnapshotWrite:
        raise RuntimeError("the disk is full")

    with pytest.raises(RuntimeError, match="the disk is full"), _PastDays(database) as past:
        past.record(T0, [key(1).raw, key(2).raw])
        past.wait()
        monkeypatch.setattr(snapshots.SnapshotWriter, "finish", fail)
        past.record(T0 + timedelta(hours=1), [key(1).raw])  # fails on the recording thread
    # leaving the block waited for it and raised; the next day handed over raises too
    with _PastDays(database) as past:
        past.record(T0 + timedelta(hours=2), [key(1).raw])
        with pytest.raises(RuntimeError, match="the disk is full"):
            past.record(T0 + timedelta(hours=3), [key(1).raw])

    with database.sessions() as session:
        assert session.scalars(select(Snapshot.status).order_by(Snapshot.id)).all() == [snapshots.COMPLETE]
        assert session.scalar(select(func.count()).select_from(snapshot_staging)) == 0


def test_a_failure_that_quotes_text_no_database_stores_is_still_recorded(database: Database) -> None:
    # An API error message may quote a key's name, and JSON lets a name hold a lone surrogate: the
    # failure must still be recorded (written out), or the run and its snapshot stay "running".
    said = "GET /keys: 400 no such key: half a pair \ud800"
    with session_scope(database) as session:
        run_id = runs.start_run(session, kind="sync", now=T0).id
        snapshot_id = snapshots.start_snapshot(session, run_id=run_id, now=T0).id
    with session_scope(database) as session:
        snapshots.fail_snapshot(session, snapshot_id=snapshot_id, error=said)
        runs.finish_run(session, run_id, status=runs.FAILED, exit_code=1, message=said, now=T0)

    with database.sessions() as session:
        run = runs.get_run(session, run_id)
        snapshot = session.get(Snapshot, snapshot_id)
        assert run is not None and snapshot is not None
        assert (run.status, run.message) == (runs.FAILED, "GET /keys: 400 no such key: half a pair \\ud800")
        assert (snapshot.status, snapshot.error) == (snapshots.FAILED, run.message)


def test_an_unchanged_key_costs_no_new_row(database: Database) -> None:
    keys = [key(n) for n in range(1, 301)]
    store(database, keys, T0)

    for hour in range(1, 4):
        _, written = store(database, keys, T0 + timedelta(hours=hour))
        assert written.new_versions == 0

    with database.sessions() as session:
        assert snapshots.count_versions(session) == 300


def test_field_order_of_the_json_does_not_make_a_new_version(database: Database) -> None:
    original = key(1)
    reordered = Key.from_api(dict(reversed(list(original.raw.items()))))
    store(database, [original], T0)

    _, written = store(database, [reordered], T0 + timedelta(hours=1))

    assert written.new_versions == 0
    if database.engine.dialect.name == "sqlite":  # the next sync carries it as now listed
        assert fingerprints(database) == {original.hash: snapshots.fingerprint(reordered.raw)}


def test_a_key_that_comes_back_gets_a_new_version(database: Database) -> None:
    s1, _ = store(database, [key(1), key(2)], T0)
    s2, _ = store(database, [key(1)], T0 + timedelta(hours=1))
    s3, written = store(database, [key(1), key(2)], T0 + timedelta(hours=2))

    assert written.added == 1
    assert set(raw_at(database, s1)) == set(raw_at(database, s3)) == {key(1).hash, key(2).hash}
    assert set(raw_at(database, s2)) == {key(1).hash}
    with database.sessions() as session:
        versions = session.execute(
            select(key_usage.c.valid_from, key_usage.c.valid_to)
            .join(tracked_keys, tracked_keys.c.id == key_usage.c.key_id)
            .where(tracked_keys.c.key_hash == key(2).hash)
            .order_by(key_usage.c.valid_from)
        ).all()
    assert [tuple(row) for row in versions] == [(s1, s2), (s3, None)]


def test_many_changes_at_once_cross_the_write_batches(database: Database) -> None:
    keys = [key(n) for n in range(1, 2601)]
    store(database, keys, T0)

    changed = [key(n, usage=n + 0.5) for n in range(1, 2601)]
    s2, written = store(database, changed, T0 + timedelta(hours=1))

    assert (written.changed, written.new_versions) == (2600, 2600)
    assert raw_at(database, s2) == {k.hash: k.raw for k in changed}
    with database.sessions() as session:
        open_rows = session.scalars(select(key_usage.c.valid_from).where(key_usage.c.valid_to.is_(None))).all()
    assert open_rows == [s2] * 2600


def test_a_write_that_fails_leaves_nothing(database: Database) -> None:
    s1, _ = store(database, [key(1), key(2)], T0)
    with session_scope(database) as session:
        run_id = runs.start_run(session, kind="sync", now=T0).id
        s2 = snapshots.start_snapshot(session, run_id=run_id, now=T0).id

    with pytest.raises(RuntimeError), session_scope(database) as session:
        snapshots.record_snapshot(session, snapshot_id=s2, keys=[key(3).raw], taken_at=T0, workspace_counts={})
        raise RuntimeError("the process died before commit")
    with session_scope(database) as session:
        snapshots.fail_snapshot(session, snapshot_id=s2, error="the process died before commit")

    with database.sessions() as session:
        latest = snapshots.latest_snapshot(session)
        assert latest is not None and latest.id == s1
        failed = session.get(Snapshot, s2)
        assert failed is not None and (failed.status, failed.key_count) == ("failed", None)
        assert snapshots.count_versions(session) == 2
    assert set(raw_at(database, s1)) == {key(1).hash, key(2).hash}


def test_running_and_failed_snapshots_are_never_read(database: Database) -> None:
    s1, _ = store(database, [key(1)], T0)
    with session_scope(database) as session:
        run_id = runs.start_run(session, kind="sync", now=T0).id
        snapshots.start_snapshot(session, run_id=run_id, now=T0 + timedelta(hours=1))

    with database.sessions() as session:
        latest = snapshots.latest_snapshot(session)
        assert latest is not None and latest.id == s1
        assert [s.id for s in snapshots.complete_snapshots(session)] == [s1]
        at = snapshots.latest_snapshot(session, at=T0 - timedelta(seconds=1))
        assert at is None


def test_overlapping_syncs_cannot_record_out_of_order(database: Database) -> None:
    store(database, [key(1), key(2)], T0)
    with session_scope(database) as session:
        run_id = runs.start_run(session, kind="sync", now=T0).id
        slow = snapshots.start_snapshot(session, run_id=run_id, now=T0 + timedelta(minutes=1)).id
    fast, _ = store(database, [key(1), key(2, usage=50.0)], T0 + timedelta(minutes=2))

    with pytest.raises(snapshots.SnapshotSuperseded), session_scope(database) as session:
        snapshots.record_snapshot(session, snapshot_id=slow, keys=[key(1).raw], taken_at=T0, workspace_counts={})

    assert raw_at(database, fast) == {key(1).hash: key(1).raw, key(2).hash: key(2, usage=50.0).raw}
    with database.sessions() as session:
        assert snapshots.count_versions(session) == 3


@pytest.mark.postgres
def test_recording_waits_for_another_recording_of_its_store_and_no_other(pg_database: Database) -> None:
    """Two syncs of one store record one after the other (an advisory lock). The lock was one for
    the whole database: a store in another schema of it waited for this one's recording too."""
    with postgres_schema() as other_url:
        other = Database.open(Settings(KEYHYGIENE_DATABASE_URL=other_url), check=False)  # type: ignore[call-arg]
        try:
            upgrade(other.engine)
            with pg_database.sessions() as recording:
                snapshots.lock_recording(recording)  # held until this transaction ends
                with other.sessions() as elsewhere:
                    elsewhere.execute(sql("SET LOCAL lock_timeout = '1s'"))
                    snapshots.lock_recording(elsewhere)  # another store: not held up
                with pg_database.sessions() as same_store:
                    same_store.execute(sql("SET LOCAL lock_timeout = '100ms'"))
                    with pytest.raises(OperationalError, match="lock timeout"):
                        snapshots.lock_recording(same_store)
            with pg_database.sessions() as after:
                after.execute(sql("SET LOCAL lock_timeout = '1s'"))
                snapshots.lock_recording(after)  # released with the transaction that held it
        finally:
            other.close()


@pytest.mark.parametrize("carry_batch", [1, snapshots.CARRY_BATCH])
def test_keys_carried_on_top_of_a_snapshot_are_not_recorded_on_top_of_another(
    database: Database, monkeypatch: pytest.MonkeyPatch, carry_batch: int
) -> None:
    """A key listed exactly as the store holds it is carried: it keeps whatever versions are open
    when its snapshot is recorded. When another sync records a snapshot in between (one that
    started earlier and saw key 2 change), carrying would store that sync's key 2 as this one's:
    this sync is discarded instead, as soon as it writes the keys it carries (every
    ``CARRY_BATCH``) or when it records."""
    monkeypatch.setattr(snapshots, "CARRY_BATCH", carry_batch)
    store(database, [key(1), key(2), key(3)], T0)
    earlier, later = start(database, T0 + timedelta(minutes=1)), start(database, T0 + timedelta(minutes=2))
    with session_scope(database) as session:
        writer = snapshots.SnapshotWriter(later, known=snapshots.known_fingerprints(session))
        writer.add(session, [key(1).raw, key(2).raw])
    with session_scope(database) as session:
        snapshots.record_snapshot(
            session,
            snapshot_id=earlier,
            keys=[key(1).raw, key(2, usage=50.0).raw, key(3).raw],
            taken_at=T0,
            workspace_counts={},
        )

    if carry_batch == 1:
        with pytest.raises(snapshots.SnapshotSuperseded), session_scope(database) as session:
            writer.add(session, [key(3).raw])
    with pytest.raises(snapshots.SnapshotSuperseded), session_scope(database) as session:
        writer.finish(session, taken_at=T0 + timedelta(minutes=2), workspace_counts={})
    with database.sessions() as session:
        assert snapshots.latest_snapshot(session).id == earlier
        assert snapshots.count_versions(session) == 4  # the first 3, and key 2's new usage version
    assert raw_at(database, earlier)[key(2).hash] == key(2, usage=50.0).raw


def test_a_new_key_two_overlapping_syncs_list_is_tracked_once(database: Database) -> None:
    """Both syncs list key 4 before either has recorded it (each reserves an id for it as it
    stages the key). The one that records second stores key 4 under the id the first gave it: one
    tracked key, one history."""
    store(database, [key(1)], T0)
    earlier, later = start(database, T0 + timedelta(minutes=1)), start(database, T0 + timedelta(minutes=2))
    with session_scope(database) as session:
        late_writer = snapshots.SnapshotWriter(later)
        late_writer.add(session, [key(1).raw, key(4, usage=2.0).raw])
    with session_scope(database) as session:
        snapshots.record_snapshot(
            session, snapshot_id=earlier, keys=[key(1).raw, key(4).raw], taken_at=T0, workspace_counts={}
        )
    with session_scope(database) as session:
        written = late_writer.finish(session, taken_at=T0 + timedelta(minutes=2), workspace_counts={})

    assert (written.added, written.changed) == (0, 1)
    assert raw_at(database, earlier)[key(4).hash] == key(4).raw
    assert raw_at(database, later) == {key(1).hash: key(1).raw, key(4).hash: key(4, usage=2.0).raw}
    with database.sessions() as session:
        assert session.scalar(select(func.count()).select_from(tracked_keys)) == 2
        assert snapshots.count_versions(session) == 3  # key 1 as listed, key 4 as each sync listed it


def test_writers_sharing_a_snapshot_give_every_new_key_its_own_id(database: Database) -> None:
    """A sync that stages part of its listing in a second process (``keyhygiene.staging``) has two
    writers of one snapshot, each reserving ids for the new keys it stages, in turns, while another
    sync records new keys in between. Every key is tracked once, under an id of its own, and the
    snapshot holds exactly what both staged."""
    store(database, [key(1)], T0)
    other = start(database, T0 + timedelta(seconds=30))  # a sync started earlier, recorded meanwhile
    snapshot_id = start(database, T0 + timedelta(minutes=1))
    writer = snapshots.SnapshotWriter(snapshot_id)
    with session_scope(database) as session:
        writer.add(session, [key(1).raw, key(10).raw, key(11).raw])
    helper = snapshots.SnapshotWriter.sharing(writer.share(2), 1)
    with session_scope(database) as session:
        helper.add(session, [key(20).raw, key(21).raw])
    with session_scope(database) as session:
        snapshots.record_snapshot(
            session, snapshot_id=other, keys=[key(1).raw, key(30).raw], taken_at=T0, workspace_counts={}
        )
    with session_scope(database) as session:
        writer.add(session, [key(12).raw])
    with session_scope(database) as session:
        helper.add(session, [key(22).raw, key(30, usage=3.0).raw])
    with session_scope(database) as session:
        writer.absorb(helper.state(session))
    with session_scope(database) as session:
        written = writer.finish(session, taken_at=T0 + timedelta(minutes=1), workspace_counts={})

    listed = [key(n) for n in (1, 10, 11, 20, 21, 12, 22)] + [key(30, usage=3.0)]
    assert raw_at(database, snapshot_id) == {k.hash: k.raw for k in listed}
    assert (written.key_count, written.added, written.changed) == (8, 6, 1)
    with database.sessions() as session:
        ids = dict(session.execute(select(tracked_keys.c.key_hash, tracked_keys.c.id)).all())
        assert len(ids) == len(set(ids.values())) == 8
        assert session.scalar(select(func.count()).select_from(snapshot_staging)) == 0


def test_a_sharing_writer_that_carried_keys_on_another_snapshot_makes_the_sync_refused(database: Database) -> None:
    """Each writer of a shared snapshot carries unchanged keys on top of the newest snapshot it
    read; if theirs differ, another sync recorded in between, and the sync is discarded."""
    first, _ = store(database, [key(1), key(2)], T0)
    snapshot_id = start(database, T0 + timedelta(minutes=2))
    with database.sessions() as session:
        known = snapshots.known_fingerprints(session)
    writer = snapshots.SnapshotWriter(snapshot_id, known=known)
    helper = snapshots.SnapshotWriter.sharing(writer.share(2), 1, known=known)
    with session_scope(database) as session:
        writer.add(session, [key(1).raw])
    with session_scope(database) as session:
        writer.absorb(helper.state(session))  # the helper carried nothing: nothing to disagree on

    with pytest.raises(snapshots.SnapshotSuperseded):
        writer.absorb(snapshots.WriterState(printed=False, reserved=False, carried_on=first + 100))
    writer.absorb(snapshots.WriterState(printed=True, reserved=False, carried_on=first))
    with session_scope(database) as session:
        helper.add(session, [key(2).raw])
        writer.absorb(helper.state(session))
    with session_scope(database) as session:
        written = writer.finish(session, taken_at=T0 + timedelta(minutes=2), workspace_counts={})
    assert (written.key_count, written.new_versions) == (2, 0)
    assert raw_at(database, snapshot_id) == {key(1).hash: key(1).raw, key(2).hash: key(2).raw}


def test_a_staging_row_without_an_id_is_resolved_even_when_every_key_is_new(database: Database) -> None:
    """Recording skips looking up the rows of keys it has just tracked with the ids they were staged
    with, when that is every row (a first sync). A row staged without an id is not one of them: it
    is still given the id its key is tracked with."""
    snapshot_id = start(database, T0)
    with session_scope(database) as session:
        writer = snapshots.SnapshotWriter(snapshot_id, known=snapshots.known_fingerprints(session))
        writer.add(session, [key(n).raw for n in range(1, 5)])
    with session_scope(database) as session:
        session.execute(update(snapshot_staging).where(snapshot_staging.c.key_hash == key(3).hash).values(key_id=None))
    with session_scope(database) as session:
        written = writer.finish(session, taken_at=T0, workspace_counts={})

    assert (written.key_count, written.added) == (4, 4)
    assert raw_at(database, snapshot_id) == {key(n).hash: key(n).raw for n in range(1, 5)}
    with database.sessions() as session:
        tracked = dict(session.execute(select(tracked_keys.c.key_hash, tracked_keys.c.id)).all())
        versioned = dict(session.execute(select(key_usage.c.key_id, key_usage.c.usage)).all())
    assert len(tracked) == len(set(tracked.values())) == 4
    assert {n: versioned[tracked[key(n).hash]] for n in range(1, 5)} == {n: key(n).raw["usage"] for n in range(1, 5)}


def test_a_new_key_whose_reserved_id_another_sync_took_gets_its_own(database: Database) -> None:
    """Two overlapping syncs list different new keys and reserve ids for them as they stage them
    (on SQLite, the ids past the largest tracked one: the same ones). The first to record gives
    those ids to its keys; the other's new key is tracked under an id of its own, with its own
    history."""
    store(database, [key(1)], T0)
    earlier, later = start(database, T0 + timedelta(minutes=1)), start(database, T0 + timedelta(minutes=2))
    with session_scope(database) as session:
        late_writer = snapshots.SnapshotWriter(later)
        late_writer.add(session, [key(4).raw, key(1).raw])
    with session_scope(database) as session:
        snapshots.record_snapshot(
            session, snapshot_id=earlier, keys=[key(1).raw, key(5).raw, key(6).raw], taken_at=T0, workspace_counts={}
        )
    with session_scope(database) as session:
        written = late_writer.finish(session, taken_at=T0 + timedelta(minutes=2), workspace_counts={})

    assert (written.added, written.gone) == (1, 2)
    assert raw_at(database, earlier) == {k.hash: k.raw for k in (key(1), key(5), key(6))}
    assert raw_at(database, later) == {key(1).hash: key(1).raw, key(4).hash: key(4).raw}
    with database.sessions() as session:
        ids = dict(session.execute(select(tracked_keys.c.key_hash, tracked_keys.c.id)).all())
        assert len(set(ids.values())) == 4 == len(ids)
        assert snapshots.count_versions(session) == 4  # keys 1, 5 and 6 as the first listed them, key 4


def test_a_sync_is_refused_when_another_records_after_it_compared_its_listing(database: Database) -> None:
    """A sync checks the keys of the newest snapshot that its listing left out (``missing``) one by
    one. When another sync records a snapshot after that, recording this one on top would close the
    versions of a key only the other one listed (created meanwhile) as gone, unchecked. It is
    refused and writes nothing, even when it carried no key (every key changed)."""
    store(database, [key(1), key(2)], T0)
    earlier, later = start(database, T0 + timedelta(minutes=1)), start(database, T0 + timedelta(minutes=2))
    late_writer = snapshots.SnapshotWriter(later)
    with session_scope(database) as session:
        late_writer.add(session, [key(1, usage=5.0).raw, key(2, usage=5.0).raw])
    with database.sessions() as session:
        assert late_writer.missing(session, {key(1).hash, key(2).hash}) == []  # against the first snapshot
    with session_scope(database) as session:  # the other sync lists key 3, new since
        snapshots.record_snapshot(
            session, snapshot_id=earlier, keys=[key(1).raw, key(2).raw, key(3).raw], taken_at=T0, workspace_counts={}
        )

    with pytest.raises(snapshots.SnapshotSuperseded), session_scope(database) as session:
        late_writer.finish(session, taken_at=T0 + timedelta(minutes=2), workspace_counts={})

    with database.sessions() as session:
        newest = snapshots.latest_snapshot(session)
        assert newest is not None and newest.id == earlier
        assert key(3).hash in snapshots.key_hashes_at(session, newest.id)


def test_history_facts_say_since_when_usage_and_disabled_held(database: Database) -> None:
    store(database, [key(1, usage=1.0), key(2)], T0)
    store(database, [key(1, usage=2.0), key(2, usage_daily=1.0)], T0 + timedelta(days=1))
    store(database, [key(1, usage=2.0, disabled=True), key(2, usage_daily=0.0)], T0 + timedelta(days=2))
    s4, _ = store(database, [key(1, usage=2.0, disabled=True, name="renamed")], T0 + timedelta(days=3))

    with database.sessions() as session:
        facts = {f.key_hash: f for f in snapshots.history_facts(session, s4)}

    assert list(facts) == [key(1).hash]
    assert facts[key(1).hash] == snapshots.HistoryFacts(
        key(1).hash,
        first_seen_at=T0,
        usage_unchanged_since=T0 + timedelta(days=1),
        disabled_since=T0 + timedelta(days=2),
        spent_from=None,
    )


def test_the_history_keeps_the_latest_spend_window_a_snapshot_saw(database: Database) -> None:
    """A window counter above zero shows use at or after its window began; the counter resets with
    the window, the evidence stays with the key's versions."""
    monday = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
    s1, _ = store(database, [key(3, usage_monthly=2.0), key(4)], monday)  # this month: from March 1
    s2, _ = store(database, [key(3, usage_weekly=1.0, usage_monthly=3.0), key(4)], monday + timedelta(days=1))
    s3, _ = store(database, [key(3), key(4)], monday + timedelta(days=30))  # April: the counters reset
    s4, _ = store(database, [key(3), key(4, byok_usage_daily=0.5)], monday + timedelta(days=31))

    def spent_from(snapshot_id: int) -> dict[str, datetime | None]:
        with database.sessions() as session:
            return {f.key_hash: f.spent_from for f in snapshots.history_facts(session, snapshot_id)}

    march_1, march_2, april_2 = (datetime(2026, month, day, tzinfo=UTC) for month, day in ((3, 1), (3, 2), (4, 2)))
    assert spent_from(s1) == {key(3).hash: march_1, key(4).hash: None}
    assert spent_from(s2) == {key(3).hash: march_2, key(4).hash: None}  # this week: from Monday
    assert spent_from(s3) == {key(3).hash: march_2, key(4).hash: None}  # kept past the reset
    assert spent_from(s4) == {key(3).hash: march_2, key(4).hash: april_2}  # carried unchanged; BYOK spend


def test_spend_below_a_micro_dollar_is_kept_as_spend(database: Database) -> None:
    """A window counter of a few tenths of a micro-dollar (one small request to a cheap model) is use,
    as the rules read it: the history keeps it as evidence past the counter's reset, as it keeps a
    larger one, and the snapshot still reads back the API's exact amounts."""
    monday = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
    tiny = 4e-7
    s1, _ = store(database, [key(3, usage=3.0 + tiny, usage_weekly=tiny, usage_monthly=tiny), key(4)], monday)
    s2, _ = store(database, [key(3, usage=3.0 + tiny), key(4)], monday + timedelta(days=30))  # April: reset

    with database.sessions() as session:
        spent_from = {s: {f.key_hash: f.spent_from for f in snapshots.history_facts(session, s)} for s in (s1, s2)}
    march_2 = datetime(2026, 3, 2, tzinfo=UTC)  # this week's counter: from Monday
    assert spent_from[s1] == {key(3).hash: march_2, key(4).hash: None}
    assert spent_from[s2] == {key(3).hash: march_2, key(4).hash: None}  # kept past the reset
    first = raw_at(database, s1)[key(3).hash]
    assert (first["usage"], first["usage_weekly"], first["usage_monthly"]) == (3.0 + tiny, tiny, tiny)


def test_a_key_that_comes_back_keeps_its_history(database: Database) -> None:
    store(database, [key(1), key(2)], T0)
    store(database, [key(1)], T0 + timedelta(days=1))
    s3, _ = store(database, [key(1), key(2)], T0 + timedelta(days=2))

    with database.sessions() as session:
        facts = {f.key_hash: f for f in snapshots.history_facts(session, s3)}

    assert (facts[key(2).hash].first_seen_at, facts[key(2).hash].usage_unchanged_since) == (T0, T0)


def test_the_raw_json_comes_back_exactly_whatever_its_numbers_and_times(database: Database) -> None:
    odd = dict(
        key(1).raw,
        usage=0.1 + 0.2,  # 0.30000000000000004: not a whole number of micro-dollars
        usage_daily=7,  # an integer
        limit=12.3456789,
        limit_remaining=1e-9,
        last_used_at="2026-02-19T20:52:27Z",
        brand_new_field={"nested": [1, 2.5, None]},
    )
    older_api = {name: value for name, value in key(2).raw.items() if not name.startswith(("byok", "last_used"))}
    s1, _ = store(database, [Key.from_api(odd), Key.from_api(older_api)], T0)

    assert raw_at(database, s1) == {key(1).hash: odd, key(2).hash: older_api}


def test_times_in_every_style_come_back_as_the_api_wrote_them(database: Database) -> None:
    rng = random.Random(5)
    styles = [
        lambda t: t.strftime("%Y-%m-%dT%H:%M:%SZ"),  # the API's usual style
        lambda t: t.isoformat(timespec="microseconds"),  # its other documented style
        lambda t: t.isoformat().replace("+00:00", "Z"),  # fractions only when present
        lambda t: t.isoformat(),
        lambda t: t.isoformat(timespec="milliseconds"),
        lambda t: t.astimezone(timezone(timedelta(hours=2))).isoformat(),
        lambda t: t.strftime("%Y-%m-%dT%H:%M"),  # no seconds: shorter than either documented style
    ]
    keys = []
    for n in range(1, 295):
        created = T0 - timedelta(seconds=rng.randrange(10**8), microseconds=rng.choice([0, rng.randrange(10**6)]))
        used = T0 - timedelta(seconds=rng.randrange(10**6), microseconds=rng.choice([0, rng.randrange(10**6)]))
        keys.append(
            key(n, created_at=styles[n % len(styles)](created), last_used_at=styles[(n // 7) % len(styles)](used))
        )
    s1, _ = store(database, keys, T0)

    assert raw_at(database, s1) == {k.hash: k.raw for k in keys}


def test_rows_staged_for_sqlite_hold_each_time_as_sqlite_stores_it() -> None:
    """Staged for SQLite, a key's times are cut from the API's text instead of written back from the
    parsed time: the same text either way, in every style."""
    texts = [
        "2026-02-19T20:52:27Z",
        "2026-02-19T20:52:27.363244+00:00",
        "2024-02-29T23:59:59.000001+00:00",
        "2026-02-19T20:52:27.5Z",
        "2026-02-19T22:52:27.000001+02:00",
        "2026-02-19T20:52",
    ]
    for text in texts:
        raw = dict(key(1, created_at=text, updated_at=text, last_used_at=text).raw)
        parsed = snapshots.staged_row(raw, 1)
        assert sum(isinstance(value, datetime) for value in parsed) == 3
        expected = [
            value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f") if isinstance(value, datetime) else value
            for value in parsed
        ]
        assert snapshots.staged_row(raw, 1, dialect="sqlite") == expected, text


def test_rows_staged_for_postgresql_give_it_the_apis_text_only_where_that_text_names_utc() -> None:
    """Staged for PostgreSQL, a time in a style the store writes back exactly goes as the API's own
    text, which ends in Z or +00:00 (the server reads it into a timestamptz); any other time goes as
    the parsed datetime. (That the server stores the same instants either way: the round trips
    of every style above, on both databases.)"""
    own_text = ["2026-02-19T20:52:27Z", "2026-02-19T20:52:27.363244+00:00", "2024-02-29T23:59:59.000001+00:00"]
    for text in [*own_text, "2026-02-19T22:52:27.000001+02:00", "2026-02-19T20:52"]:
        raw = dict(key(1, created_at=text, updated_at=text, last_used_at=text).raw)
        parsed = snapshots.staged_row(raw, 1)
        staged = snapshots.staged_row(raw, 1, dialect="postgresql")
        times = [index for index, value in enumerate(parsed) if isinstance(value, datetime)]
        assert len(times) == 3
        for index in times:
            assert staged[index] == (text if text in own_text else parsed[index]), text
        assert [value for index, value in enumerate(staged) if index not in times] == [
            value for index, value in enumerate(parsed) if index not in times
        ]


_ODD_FIELD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(),
    st.sampled_from([0.1 + 0.2, 1e-7, 0.0000005, 123.456789, -0.0, 1e303, 10**400, 1e13, -(10**13), 9.2e12]),
    st.text(max_size=6),
    st.sampled_from(["\ud800", "café", "", "x", "nul \x00 inside", "\x00"]),
    st.sampled_from(
        [
            "2026-02-19T20:52:27Z",
            "2026-02-19T20:52:27.363244+00:00",
            "2026-02-19T20:52:27.5Z",
            "2026-02-19T22:52:27+02:00",
            "2026-02-30T00:00:00Z",
            "0001-01-01T00:00:00Z",
            "2026-02-19 20:52:27Z",
        ]
    ),
    st.just(Ellipsis),  # the field left out
)


@settings(max_examples=400, deadline=None)
@given(
    changes=st.dictionaries(st.sampled_from([*sorted(snapshots._KNOWN), "extra"]), _ODD_FIELD_VALUES, max_size=3),
    dialect=st.sampled_from([None, "sqlite", "postgresql"]),
)
def test_the_plain_key_path_stages_what_the_general_path_does(changes: dict[str, Any], dialect: str | None) -> None:
    """``staged_row`` takes a straight-line path for keys as the API nearly always sends them: where
    it takes a key at all, its row is the one the general path makes, and any key the general path
    refuses (or notes anything about) goes the general way."""
    raw = dict(key(7, usage=12.25, limit=50.0, expires_at="2027-01-01T00:00:00Z").raw)
    for name, value in changes.items():
        if value is Ellipsis:
            raw.pop(name, None)
        else:
            raw[name] = value
    plain, plain_error = _outcome(lambda: snapshots._PLAIN_ROWS[dialect](raw, 3))
    general, general_error = _outcome(lambda: snapshots._staged_row(raw, 3, dialect))
    assert plain_error is None  # not even an amount too large for a float: the general path names it
    if general_error is not None:
        assert plain is None and general_error is MalformedResponse
    elif plain is not None:
        assert plain == general
        assert general[snapshots._USAGE_AT - 1] in (None, snapshots._OTHER_STYLE_TEXT)  # no exact values noted


def _outcome(call: Callable[[], Any]) -> tuple[Any, type[BaseException] | None]:
    try:
        return call(), None
    except Exception as exc:
        return None, type(exc)


def test_keys_as_the_api_sends_them_take_the_plain_path() -> None:
    """The keys of the fake's generated organisation, in both of the API's time styles."""
    fake = FakeOpenRouter()
    generate_organisation(fake, keys=300, workspaces=3, seed=1, now=T0)
    raws = json.loads(json.dumps(fake.keys))  # as they come over the wire
    times = ("created_at", "updated_at", "expires_at", "last_used_at")
    raws += [{**raw, **{name: raw[name][:19] + "Z" for name in times if raw[name]}} for raw in raws[:50]]
    assert {raw["created_at"][-1] for raw in raws} == {"Z", "0"}  # both styles
    for dialect in (None, "sqlite", "postgresql"):
        for raw in raws:
            plain = snapshots._PLAIN_ROWS[dialect](raw, 1)
            assert plain is not None, raw
            assert plain == snapshots._staged_row(raw, 1, dialect)


def test_the_rules_read_the_same_facts_from_the_typed_columns_as_from_the_raw_json(database: Database) -> None:
    """Plans and the idle report read keys straight from the typed columns (``facts_at``); keys the
    columns do not hold exactly are rebuilt from their raw JSON. Either way: the API's facts."""
    usual = [key(n, usage=0.25 * n, usage_daily=0.000043, limit=25.5, limit_remaining=3.25) for n in range(3, 30)]
    micro_style = {"created_at": "2025-08-24T10:30:00.000000+00:00", "expires_at": "2027-01-01T00:00:00.250000+00:00"}
    usual += [key(n, usage=0.07, **micro_style) for n in range(30, 40)]  # the API's other time style
    odd = dict(key(1).raw, usage=0.1 + 0.2, limit=12.3456789, limit_remaining=1e-9, last_used_at="2026-02-19T20:52:27Z")
    older_api = {name: value for name, value in key(2).raw.items() if not name.startswith(("byok", "last_used"))}
    noisy = key(42, usage=0.1 + 0.2, usage_daily=0.1 + 0.7)  # float noise: rebuilt from its note
    keys = [
        Key.from_api(odd),
        Key.from_api(older_api),
        *usual,
        key(40, disabled=True, usage=0),
        key(41, usage=7),
        noisy,
    ]
    s1, _ = store(database, keys, T0)

    with database.sessions() as session:
        read = list(facts_at(session, s1, T0))
        typed = sorted((facts for facts, _ in read), key=lambda facts: facts.hash)  # read in no set order
        rebuilt = [key_facts(k, T0) for k in snapshots.keys_at(session, s1)]
        kinds = [type(item).__name__ for item, _ in snapshots.typed_keys_at(session, s1, FACT_FIELDS)]
        histories = {facts.hash: history for facts, history in read}
        assert histories == {facts.key_hash: key_history(facts) for facts in snapshots.history_facts(session, s1)}

    assert typed == rebuilt == sorted((key_facts(k, T0) for k in keys), key=lambda facts: facts.hash)
    assert [str(facts.usage) for facts in typed] == [str(facts.usage) for facts in rebuilt]
    assert kinds.count("Key") == 3 and kinds.count("tuple") == len(keys) - 3  # only the odd ones rebuilt


def test_money_sums_are_exact_to_the_cent(database: Database) -> None:
    # Ten thousand keys of $0.01, $0.02 and $0.07: a float sum of these drifts off the cent.
    amounts = [0.01, 0.02, 0.07] * 3334
    assert round(sum(amounts), 2) != sum(amounts)  # the trap this test is about
    s1, _ = store(database, [key(n + 1, usage=amount) for n, amount in enumerate(amounts)], T0)

    alive = snapshots.alive_at(s1).subquery()
    with database.sessions() as session:
        total = session.scalar(select(func.sum(alive.c.usage)))

    assert total == Decimal("333.40")


def test_staged_pages_are_never_read_and_never_left_behind(database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snapshots, "CARRY_BATCH", 1)  # carried keys are written with their page
    s1, _ = store(database, [key(1)], T0)
    writers = []
    for started in (T0 - timedelta(days=3), T0 + timedelta(hours=1)):  # a crashed sync, a live one
        with session_scope(database) as session:
            run_id = runs.start_run(session, kind="sync", now=started).id
            snapshot_id = snapshots.start_snapshot(session, run_id=run_id, now=started).id
            writer = snapshots.SnapshotWriter(snapshot_id, known=snapshots.known_fingerprints(session))
        with session_scope(database) as session:  # on SQLite key 1, listed as stored, is carried
            writer.add(session, [key(1).raw, key(2).raw, key(3).raw])
        writers.append(writer)

    def staged() -> set[int]:
        with database.sessions() as session:
            rows = set(session.scalars(select(snapshot_staging.c.snapshot_id)))
            return rows | set(session.scalars(select(snapshot_carried.c.snapshot_id)))

    if database.engine.dialect.name == "sqlite":  # both carried key 1
        with database.sessions() as session:
            assert set(session.scalars(select(snapshot_carried.c.snapshot_id))) == {w.snapshot_id for w in writers}

    assert raw_at(database, s1) == {key(1).hash: key(1).raw}  # staged keys are invisible
    with session_scope(database) as session:
        retention.delete_abandoned_staging(session, cutoff=T0 - timedelta(days=1))
    assert staged() == {writers[1].snapshot_id}  # the crashed sync's pages are gone, the live one's kept
    with session_scope(database) as session:
        writers[1].discard(session)
    assert staged() == set()


def test_sqlite_syncs_to_disk_at_commit_unless_the_database_may_be_lost(tmp_path: Path) -> None:
    """Every command's SQLite keeps WAL with synchronous=NORMAL; only the demo, whose database is
    thrown away, may turn syncing off."""
    for durable, expected in ((True, 1), (False, 0)):
        engine = make_engine(f"sqlite:///{tmp_path / f'{durable}.db'}", sqlite_durable=durable)
        try:
            with engine.connect() as connection:
                assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == expected
                assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        finally:
            engine.dispose()


@pytest.mark.parametrize("configured", [None, 32 * 1024])
def test_recording_widens_sqlites_page_cache_only_while_it_tracks_new_keys(
    tmp_path: Path, configured: int | None
) -> None:
    """New keys go into the index of key hashes in no order: on SQLite, tracking them gets 16 MB of
    page cache, and the connection has its own cache back for the rest of the recording and after,
    so the process holds no more memory for it. A larger cache is left alone."""
    settings = Settings(KEYHYGIENE_DATABASE_URL=f"sqlite:///{tmp_path / 'store.db'}")  # type: ignore[call-arg]
    database = Database.open(settings, check=False, sqlite_cache_kib=configured)
    seen: dict[str, int] = {}

    @event.listens_for(database.engine, "before_cursor_execute")
    def _cache_while_recording(connection: Any, cursor: Any, statement: str, *_: Any) -> None:
        for table in ("tracked_keys", "key_records"):
            if statement.startswith(f"INSERT INTO {table} "):
                seen[table] = cursor.connection.execute("PRAGMA cache_size").fetchone()[0]

    def cache_size() -> int:
        with database.sessions() as session:
            return int(session.connection().exec_driver_sql("PRAGMA cache_size").scalar_one())

    try:
        upgrade(database.engine)
        own = cache_size()
        snapshot_id, written = store(database, [key(1), key(2)], T0)
        assert written.added == 2
        assert seen == {"tracked_keys": min(own, -16 * 1024), "key_records": own}
        assert cache_size() == own
        with database.sessions() as session:
            assert snapshots.is_newest(session, snapshot_id)
    finally:
        database.close()
