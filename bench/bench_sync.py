"""Sync benchmark: listing speed and snapshot storage, each beside its baseline in the same run.

    .venv/bin/python bench/bench_sync.py [--keys 20000] [--workspaces 5] [--latency 0.02]
                                         [--concurrency 4 8] [--changed 0.01] [--no-postgres]

Listing: the fake OpenRouter API over real HTTP on loopback, every request delayed by
``--latency``. The baseline pages the way the official API Key Audit cookbook does (one request at
a time, offset += 100 until a short page); keyhygiene's client fetches pages of several workspaces
and offsets at once, never more than ``--concurrency`` in flight.

Store: a first sync and a second one in which ``--changed`` of the keys changed, written as
keyhygiene's versioned key states and, as the baseline, as a full row per key per snapshot. On
SQLite (a temporary file) and on PostgreSQL when reachable (a temporary schema).

The figures are reported, never judged: this is not a test and does not fail on time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Column, Engine, Integer, MetaData, Table, create_engine, insert, text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from db import runs, snapshots
from db.engine import make_engine, make_session_factory
from db.migrate import upgrade
from db.models import KeyState
from keyhygiene.context import Database, session_scope
from keyhygiene.fakeapi import FakeOpenRouter, FakeServer, generate_organisation
from keyhygiene.keysapi.client import KeysClient
from keyhygiene.keysapi.models import Key

POSTGRES_URL = os.environ.get(
    "KEYHYGIENE_BENCH_POSTGRES_URL",
    os.environ.get("KEYHYGIENE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
)
PAGE_SIZE = 100


# -- listing --------------------------------------------------------------------------------------


@dataclass
class ListingRun:
    name: str
    concurrency: int
    keys: set[str]
    requests: int
    max_in_flight: int
    seconds: float


def cookbook_listing(base_url: str, management_key: str) -> set[str]:
    """The baseline: what the API Key Audit cookbook does, one request at a time."""
    hashes: set[str] = set()
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {management_key}"}) as http:
        workspaces = http.get("/workspaces", params={"limit": 100}).json()["data"]
        for workspace in workspaces:
            offset = 0
            while True:
                page = http.get(
                    "/keys",
                    params={
                        "workspace_id": workspace["id"],
                        "offset": offset,
                        "include_disabled": "true",
                        "include_expired": "true",
                    },
                ).json()["data"]
                hashes.update(key["hash"] for key in page)
                if len(page) < PAGE_SIZE:
                    break
                offset += PAGE_SIZE
    return hashes


def keyhygiene_listing(base_url: str, management_key: str, concurrency: int) -> dict[str, Key]:
    with KeysClient(base_url, management_key, concurrency=concurrency) as client:
        return client.list_all_keys([workspace.id for workspace in client.list_workspaces()]).keys


def measure(fake: FakeOpenRouter, name: str, concurrency: int, run: Callable[[], Any]) -> ListingRun:
    fake.reset_stats()
    started = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - started
    return ListingRun(name, concurrency, set(result), fake.request_count, fake.max_in_flight, seconds)


# -- store ----------------------------------------------------------------------------------------


@dataclass
class StoreRun:
    backend: str
    approach: str
    rows: int
    seconds: float
    size_bytes: int


def _naive_table(metadata: MetaData) -> Table:
    """A full row per key per snapshot: the key_states columns, keyed by snapshot instead of validity."""
    columns = [Column("snapshot_id", Integer, index=True)]
    for column in KeyState.__table__.columns:
        if column.name in ("valid_from", "valid_to"):
            continue
        columns.append(Column(column.name, column.type, primary_key=column.primary_key))
    return Table("naive_key_states", metadata, *columns)


def _naive_row(key: Key, snapshot_id: int) -> dict[str, Any]:
    row = {
        "snapshot_id": snapshot_id,
        "key_hash": key.hash,
        "digest": snapshots.digest(key.raw),
        "name": key.name,
        "label": key.label,
        "workspace_id": key.workspace_id,
        "disabled": key.disabled,
        "limit_usd": key.limit,
        "limit_remaining": key.limit_remaining,
        "limit_reset": key.limit_reset,
        "include_byok_in_limit": key.include_byok_in_limit,
        "created_at": key.created_at,
        "updated_at": key.updated_at,
        "expires_at": key.expires_at,
        "last_used_at": key.last_used_at,
        "creator_user_id": key.creator_user_id,
        "external_user": key.external_user,
        "raw": dict(key.raw),
    }
    for window in ("", "_daily", "_weekly", "_monthly"):
        row[f"usage{window}"] = getattr(key, f"usage{window}")
        row[f"byok_usage{window}"] = getattr(key, f"byok_usage{window}")
    return row


@contextmanager
def sqlite_urls() -> Iterator[tuple[Callable[[], str], Callable[[Engine], int]]]:
    with tempfile.TemporaryDirectory(prefix="kh-bench-") as directory:
        counter = iter(range(1_000_000))

        def url() -> str:
            return f"sqlite:///{Path(directory) / f'bench-{next(counter)}.db'}"

        def size(engine: Engine) -> int:
            raw = engine.raw_connection()  # outside a transaction: a checkpoint cannot run inside one
            try:
                raw.cursor().execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                raw.close()
            path = Path(str(engine.url.database))
            return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))

        yield url, size


@contextmanager
def postgres_urls() -> Iterator[tuple[Callable[[], str], Callable[[Engine], int]]]:
    admin = create_engine(POSTGRES_URL)
    schemas: list[str] = []

    def url() -> str:
        schema = f"kh_bench_{uuid.uuid4().hex[:10]}"
        with admin.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        schemas.append(schema)
        return f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"

    def size(engine: Engine) -> int:
        with engine.connect() as connection:
            return int(
                connection.execute(
                    text(
                        "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                        "JOIN pg_namespace n ON n.oid = c.relnamespace "
                        "WHERE n.nspname = current_schema() AND c.relkind = 'r'"
                    )
                ).scalar_one()
            )

    try:
        yield url, size
    finally:
        with admin.begin() as connection:
            for schema in schemas:
                connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def versioned_store(
    backend: str, url: str, size: Callable[[Engine], int], syncs: list[dict[str, Key]]
) -> list[StoreRun]:
    engine = make_engine(url)
    database = Database(
        engine=engine, sessions=make_session_factory(engine), writer=make_session_factory(engine, writer=True)
    )
    upgrade(engine)
    results = []
    try:
        for index, keys in enumerate(syncs):
            now = datetime.now(UTC)
            with session_scope(database) as session:
                run_id = runs.start_run(session, kind="sync", now=now).id
                snapshot_id = snapshots.start_snapshot(session, run_id=run_id, now=now).id
            started = time.perf_counter()
            with session_scope(database) as session:
                written = snapshots.record_snapshot(
                    session, snapshot_id=snapshot_id, keys=keys, taken_at=now, workspace_counts={}
                )
            seconds = time.perf_counter() - started
            label = "versioned: first sync" if index == 0 else "versioned: next sync"
            results.append(StoreRun(backend, label, written.new_versions, seconds, size(engine)))
    finally:
        engine.dispose()
    return results


def naive_store(backend: str, url: str, size: Callable[[Engine], int], syncs: list[dict[str, Key]]) -> list[StoreRun]:
    engine = make_engine(url)
    metadata = MetaData()
    table = _naive_table(metadata)
    metadata.create_all(engine)
    results = []
    try:
        for index, keys in enumerate(syncs, start=1):
            started = time.perf_counter()  # building the rows counts, as it does for the versioned store
            rows = [_naive_row(key, index) for key in keys.values()]
            with engine.begin() as connection:
                for start in range(0, len(rows), 2000):
                    connection.execute(insert(table), rows[start : start + 2000])
            seconds = time.perf_counter() - started
            label = "naive: first sync" if index == 1 else "naive: next sync"
            results.append(StoreRun(backend, label, len(rows), seconds, size(engine)))
    finally:
        engine.dispose()
    return results


# -- report ---------------------------------------------------------------------------------------


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            str(cell).ljust(width) if i == 0 else str(cell).rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(row) for row in rows)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=20_000)
    parser.add_argument("--workspaces", type=int, default=5)
    parser.add_argument("--latency", type=float, default=0.02, help="seconds added to every API request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--changed", type=float, default=0.01, help="share of keys changed before the second sync")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    args = parser.parse_args(argv)

    fake = FakeOpenRouter()
    generate_organisation(fake, keys=args.keys, workspaces=args.workspaces, now=fake.now())
    fake.set_clock(fake.now())  # window usages must not roll over between the two listings
    fake.faults.latency = args.latency
    print(
        f"keyhygiene sync benchmark: {args.keys} keys in {args.workspaces} workspaces, "
        f"{args.latency * 1000:.0f} ms latency per request",
        flush=True,
    )

    with FakeServer(fake) as server:
        url, key = server.base_url, fake.management_key
        listings = [measure(fake, "baseline: sequential (cookbook)", 1, lambda: cookbook_listing(url, key))]
        for concurrency in args.concurrency:
            listings.append(
                measure(fake, "keyhygiene: concurrent", concurrency, partial(keyhygiene_listing, url, key, concurrency))
            )
        expected = {k["hash"] for k in fake.keys}
        for run in listings:
            if run.keys != expected:
                raise SystemExit(f"{run.name} (concurrency {run.concurrency}) listed the wrong keys")

        first = keyhygiene_listing(url, key, max(args.concurrency))
        changed = list(first)[:: max(1, round(1 / args.changed))] if args.changed > 0 else []
        for key_hash in changed:
            fake.record_use(key_hash, 0.01)
        second = keyhygiene_listing(url, key, max(args.concurrency))

    baseline = listings[0].seconds
    listing_rows = [
        [
            run.name,
            str(run.concurrency),
            str(run.requests),
            str(run.max_in_flight),
            f"{run.seconds:.2f}",
            f"{(run.requests - 1) / run.seconds:.0f}",
            f"{baseline / run.seconds:.1f}x",
        ]
        for run in listings
    ]
    print()
    print("listing: every key of every workspace, disabled and expired included")
    print(
        table(
            ["approach", "concurrency", "requests", "max in flight", "wall s", "pages/s", "speed-up"],
            listing_rows,
        )
    )

    syncs = [first, second]
    store_runs: list[StoreRun] = []
    backends: list[tuple[str, Any]] = [("sqlite", sqlite_urls)]
    if not args.no_postgres:
        try:
            with create_engine(POSTGRES_URL).connect():
                backends.append(("postgresql", postgres_urls))
        except Exception as exc:  # any failure means: no PostgreSQL to measure
            print(f"\n(PostgreSQL at {POSTGRES_URL} not reachable, skipped: {type(exc).__name__})")
    for backend, urls in backends:
        with urls() as (make_url, size):
            store_runs += naive_store(backend, make_url(), size, syncs)
            store_runs += versioned_store(backend, make_url(), size, syncs)

    print()
    print(f"store: a first sync, then a second with {len(changed)} keys ({args.changed:.0%}) changed")
    print(
        table(
            ["backend", "approach", "rows written", "write s", "DB size MB"],
            [[r.backend, r.approach, str(r.rows), f"{r.seconds:.2f}", f"{r.size_bytes / 1e6:.1f}"] for r in store_runs],
        )
    )


if __name__ == "__main__":
    main()
