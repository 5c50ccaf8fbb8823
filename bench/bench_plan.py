"""Planning benchmark: reading history for the rules engine and the spend report, each beside a baseline.

    .venv/bin/python bench/bench_plan.py [--keys 20000] [--days 30] [--churn 0.05] [--postgres URL]

The store is built directly with the db layer, no HTTP: a realistic organisation
(``keyhygiene.fakeapi.generate_organisation``) is recorded as a first snapshot, then one snapshot per simulated
day in which ``--churn`` of the keys spend (usage, sometimes BYOK, and ``last_used_at`` move) and a
few keys are created, deleted, disabled or enabled. SQLite in a temporary directory, or PostgreSQL
in a temporary schema with ``--postgres``.

Measured on the newest snapshot, each beside a baseline run on the same store:

1. Loading the engine's inputs: ``keyhygiene.enforcement.load_plan_inputs`` (one pass over the
   versions) against one history query per key (N+1).
2. Planning: ``keyhygiene.rules.plan`` over every key with an expired / unused / over_budget rules set, after
   either load.
3. The spend report over ``--days``: ``report spend`` (one pass over the versions of the period)
   against rebuilding every daily inventory with ``db.snapshots.keys_at`` and diffing consecutive ones.

Both sides of each comparison are checked to give the same answer, outside the timings. The figures
are reported, never judged: this is not a test and does not fail on time.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import bindparam, create_engine, event, func, or_, select, text
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from db import history, runs, snapshots
from db.engine import make_engine, make_session_factory
from db.migrate import upgrade
from db.models import Snapshot, key_records, key_usage, tracked_keys
from keyhygiene.context import Database, session_scope
from keyhygiene.enforcement import (
    PlanInputs,
    key_facts,
    load_audit_facts,
    load_plan_inputs,
    make_plan,
)
from keyhygiene.fakeapi import FakeOpenRouter, generate_organisation
from keyhygiene.keysapi.models import Key
from keyhygiene.reports import ReportParams, builders
from keyhygiene.rules import KeyHistory, Plan, RuleSet, parse_rules
from keyhygiene.timeutil import isoformat

RULES = """
[safety]
dry_run = true
max_actions_per_run = 50
max_action_percent = 10
protect_names = ["prod-*"]

[[rule]]
name = "delete-expired"
match = "expired"
action = "delete"
grace = "7d"

[[rule]]
name = "disable-idle"
match = "unused"
idle_for = "60d"
action = "disable"

[[rule]]
name = "report-overspend"
match = "over_budget"
window = "monthly"
threshold_usd = 100.0
action = "report"
"""

T = TypeVar("T")


# -- the store ------------------------------------------------------------------------------------


@dataclass
class Store:
    database: Database
    queries: list[int]  # [statements sent to the database], counted by an engine event
    snapshot_ids: list[int]
    start: datetime  # taken_at of the first snapshot
    end: datetime  # taken_at of the newest snapshot
    versions: int
    setup_seconds: float


def _round(value: float) -> float:
    return round(value, 6)


class Organisation:
    """The keys' JSON as the API would list it, changed day by day."""

    def __init__(self, keys: int, start: datetime, seed: int) -> None:
        fake = FakeOpenRouter()
        fake.set_clock(start)
        generate_organisation(fake, keys=keys, workspaces=5, now=start, seed=seed)
        self.raw: dict[str, dict[str, Any]] = {key["hash"]: key for key in fake.keys}
        self.keys: dict[str, Key] = {key_hash: Key.from_api(raw) for key_hash, raw in self.raw.items()}
        self.rng = random.Random(seed)
        self.serial = 0

    def _set(self, key_hash: str, raw: dict[str, Any]) -> None:
        self.raw[key_hash] = raw
        self.keys[key_hash] = Key.from_api(raw)

    def next_day(self, now: datetime, churn: float) -> None:
        """A day of activity up to ``now``: ``churn`` of the keys spend, a few come, go or flip disabled."""
        rng = self.rng
        hashes = list(self.raw)
        stamp = isoformat(now - timedelta(minutes=rng.uniform(5, 600)))
        for key_hash in rng.sample(hashes, round(len(hashes) * churn)):
            raw = dict(self.raw[key_hash])
            spent = rng.lognormvariate(-1.0, 1.3)
            for field in ("usage", "usage_daily", "usage_weekly", "usage_monthly"):
                raw[field] = _round(raw[field] + spent)
            if rng.random() < 0.15:
                byok = rng.lognormvariate(-1.5, 1.2)
                for field in ("byok_usage", "byok_usage_daily", "byok_usage_weekly", "byok_usage_monthly"):
                    raw[field] = _round(raw[field] + byok)
            raw["last_used_at"] = stamp
            self._set(key_hash, raw)
        few = max(1, round(len(hashes) * churn / 25))
        for key_hash in rng.sample(hashes, 2 * few):
            if key_hash not in self.raw:
                continue
            if rng.random() < 0.5:
                del self.raw[key_hash], self.keys[key_hash]
            else:
                raw = dict(self.raw[key_hash], disabled=not self.raw[key_hash]["disabled"], updated_at=stamp)
                self._set(key_hash, raw)
        for template in rng.sample(hashes, few):
            self.serial += 1
            spent = _round(rng.uniform(0, 2)) if rng.random() < 0.5 else 0.0
            raw = dict(
                self.raw.get(template) or next(iter(self.raw.values())),
                hash=f"{rng.getrandbits(256):064x}",
                name=f"new-key-{self.serial}",
                disabled=False,
                created_at=isoformat(now - timedelta(hours=rng.uniform(1, 23))),
                updated_at=None,
                expires_at=None,
                last_used_at=stamp if spent else None,
                usage=spent,
                usage_daily=spent,
                usage_weekly=spent,
                usage_monthly=spent,
                byok_usage=0.0,
                byok_usage_daily=0.0,
                byok_usage_weekly=0.0,
                byok_usage_monthly=0.0,
            )
            self._set(raw["hash"], raw)


def build_store(url: str, *, keys: int, days: int, churn: float, seed: int) -> Store:
    started = time.perf_counter()
    engine = make_engine(url)
    queries = [0]

    @event.listens_for(engine, "before_cursor_execute")
    def _count(*_: Any) -> None:
        queries[0] += 1

    database = Database(
        engine=engine, sessions=make_session_factory(engine), writer=make_session_factory(engine, writer=True)
    )
    upgrade(engine)
    end = datetime.now(UTC).replace(microsecond=0)
    start = end - timedelta(days=days)
    organisation = Organisation(keys, start, seed)
    snapshot_ids = []
    for day in range(days + 1):
        now = start + timedelta(days=day)
        if day:
            organisation.next_day(now, churn)
        with session_scope(database) as session:
            run_id = runs.start_run(session, kind="sync", now=now).id
            snapshot_id = snapshots.start_snapshot(session, run_id=run_id, now=now).id
            snapshots.record_snapshot(
                session, snapshot_id=snapshot_id, keys=organisation.raw.values(), taken_at=now, workspace_counts={}
            )
            runs.finish_run(session, run_id, status=runs.OK, now=now, exit_code=0, message="ok")
        snapshot_ids.append(snapshot_id)
    with database.sessions() as session:
        versions = snapshots.count_versions(session)
    return Store(database, queries, snapshot_ids, start, end, versions, time.perf_counter() - started)


def sum_rows(store: Store) -> int:
    """Rows a full copy of every snapshot would take: the baseline of the versioned store."""
    with store.database.sessions() as session:
        return sum(
            count or 0
            for count in session.scalars(select(Snapshot.key_count).where(Snapshot.status == snapshots.COMPLETE))
        )


@contextmanager
def sqlite_url() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="kh-bench-") as directory:
        yield f"sqlite:///{Path(directory) / 'bench.db'}"


@contextmanager
def postgres_url(url: str) -> Iterator[str]:
    admin = create_engine(url)
    schema = f"kh_bench_{uuid.uuid4().hex[:10]}"
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    separator = "&" if "?" in url else "?"
    try:
        yield f"{url}{separator}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


# -- measuring ------------------------------------------------------------------------------------


@dataclass
class Measured:
    name: str
    seconds: float
    queries: int
    rows: int  # rows the database handed back, counted outside the timing


def measure(store: Store, run: Callable[[Session], T]) -> tuple[T, float, int]:
    """Run ``run`` in a fresh read session; (its result, wall seconds, statements sent)."""
    with store.database.sessions() as session:
        before = store.queries[0]
        started = time.perf_counter()
        result = run(session)
        seconds = time.perf_counter() - started
        return result, seconds, store.queries[0] - before


def warm_up(store: Store) -> None:
    """Read every version once, so that neither side pays for a cold cache."""
    with store.database.sessions() as session:
        session.execute(select(key_usage)).all()
        session.execute(select(key_records)).all()


# 1. the engine's inputs


def naive_plan_inputs(session: Session, snapshot_id: int) -> PlanInputs:
    """The baseline: the same inputs, each key's history read with a query of its own (N+1)."""
    snapshot = session.get(Snapshot, snapshot_id)
    assert snapshot is not None and snapshot.taken_at is not None
    previous = snapshots.previous_snapshot(session, snapshot_id)
    keys = snapshots.keys_at(session, snapshot_id)
    keys = list(keys)
    one_key = (
        select(Snapshot.taken_at, key_usage.c.usage, key_usage.c.byok_usage, key_usage.c.disabled)
        .join(Snapshot, Snapshot.id == key_usage.c.valid_from)
        .join(tracked_keys, tracked_keys.c.id == key_usage.c.key_id)
        .where(tracked_keys.c.key_hash == bindparam("h"), key_usage.c.valid_from <= snapshot_id)
        .order_by(key_usage.c.valid_from)
    )
    histories: dict[str, KeyHistory] = {}
    for key in keys:
        points = [row for row in session.execute(one_key, {"h": key.hash}) if row[0] is not None]
        histories[key.hash] = history_from_points(points)
    return PlanInputs(
        snapshot_id=snapshot_id,
        taken_at=snapshot.taken_at,
        keys=[key_facts(key) for key in keys],
        histories=histories,
        audits=load_audit_facts(session),
        previous_key_count=previous.key_count if previous is not None else None,
    )


def history_from_points(points: list[Any]) -> KeyHistory:
    """What a key's (seen_at, usage, byok_usage, disabled) versions prove, walked in Python."""
    if not points:
        return KeyHistory()
    current = points[-1]
    unchanged_since = current[0]
    for seen_at, usage, byok_usage, _ in reversed(points):
        if (usage, byok_usage) != (current[1], current[2]):
            break
        unchanged_since = seen_at
    disabled_since: datetime | None = None
    for seen_at, _, _, disabled in reversed(points):
        if not disabled:
            break
        disabled_since = seen_at
    return KeyHistory(first_seen_at=points[0][0], usage_unchanged_since=unchanged_since, disabled_since=disabled_since)


def history_rows(session: Session, snapshot_id: int) -> int:
    """Usage versions up to ``snapshot_id`` of the keys alive at it: what the baseline reads as history."""
    alive = select(key_usage.c.key_id).where(
        key_usage.c.valid_from <= snapshot_id, or_(key_usage.c.valid_to.is_(None), key_usage.c.valid_to > snapshot_id)
    )
    query = select(func.count()).where(key_usage.c.valid_from <= snapshot_id, key_usage.c.key_id.in_(alive))
    return int(session.scalar(query) or 0)


# 3. the spend report


@dataclass
class NaiveSpend:
    per_key: dict[str, float]
    rows: int

    @property
    def total(self) -> float:
        return sum(self.per_key.values())


def naive_spend(session: Session, start: datetime, end: datetime) -> NaiveSpend:
    """The baseline: every daily inventory rebuilt with ``keys_at``, consecutive ones diffed per key.

    The same counting rules as the report: growth of usage and byok_usage, never negative; a key
    first seen inside the period counts its first counters only when it was created inside it.
    """
    baseline = snapshots.latest_snapshot(session, at=start)
    inside = [
        s
        for s in snapshots.complete_snapshots(session, since=start, until=end)
        if s.taken_at is not None and s.taken_at > start
    ]
    previous = {key.hash: key for key in snapshots.keys_at(session, baseline.id)} if baseline is not None else {}
    rows = len(previous)
    spent: dict[str, float] = {}
    for snapshot in inside:
        current = {key.hash: key for key in snapshots.keys_at(session, snapshot.id)}
        rows += len(current)
        for key_hash, key in current.items():
            before = previous.get(key_hash)
            if before is None:
                grew = key.usage + key.byok_usage if key.created_at > start else 0.0
            else:
                grew = max(0.0, key.usage - before.usage) + max(0.0, key.byok_usage - before.byok_usage)
            if grew:
                spent[key_hash] = spent.get(key_hash, 0.0) + grew
        previous = current
    return NaiveSpend(spent, rows)


def check_spend(report_rows: list[dict[str, Any]], naive: NaiveSpend) -> float:
    """Both ways must agree per key and in total, to the cent; returns the total."""
    reported: dict[str, float] = {row["key_hash"]: row["total"] for row in report_rows}
    naive_keys = {key_hash: total for key_hash, total in naive.per_key.items() if round(total, 6)}
    if set(reported) != set(naive_keys):
        raise SystemExit(
            f"spend: the report and the baseline name different keys ({len(reported)} vs {len(naive_keys)})"
        )
    for key_hash, total in reported.items():
        if abs(total - naive_keys[key_hash]) >= 0.005:
            raise SystemExit(f"spend of {key_hash}: report {total} vs baseline {naive_keys[key_hash]}")
    report_total = sum(reported.values())
    if abs(report_total - naive.total) >= 0.005:
        raise SystemExit(f"spend total: report {report_total:.6f} vs baseline {naive.total:.6f}")
    return report_total


# -- report ---------------------------------------------------------------------------------------


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            str(cell).ljust(width) if i == 0 else str(cell).rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(row) for row in rows)])


def comparison(runs_: list[Measured]) -> str:
    baseline = runs_[0].seconds
    return table(
        ["approach", "wall s", "queries", "rows read", "speed-up"],
        [[r.name, f"{r.seconds:.2f}", f"{r.queries:,}", f"{r.rows:,}", f"{baseline / r.seconds:.1f}x"] for r in runs_],
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=20_000, help="keys in the first snapshot")
    parser.add_argument("--days", type=int, default=30, help="daily snapshots after the first; the spend period")
    parser.add_argument("--churn", type=float, default=0.05, help="share of keys whose usage changes each day")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--postgres", metavar="URL", help="measure on PostgreSQL (a temporary schema) instead of SQLite"
    )
    args = parser.parse_args(argv)

    backend = "postgresql" if args.postgres else "sqlite"
    print(
        f"keyhygiene planning benchmark: {args.keys} keys, {args.days + 1} daily snapshots, "
        f"{args.churn:.0%} of keys spending each day, on {backend}",
        flush=True,
    )
    with postgres_url(args.postgres) if args.postgres else sqlite_url() as url:
        store = build_store(url, keys=args.keys, days=args.days, churn=args.churn, seed=args.seed)
        try:
            run_benchmark(store, args.days)
        finally:
            store.database.engine.dispose()


def run_benchmark(store: Store, days: int) -> None:
    newest = store.snapshot_ids[-1]
    print(
        f"  {store.versions:,} versions stored in {store.setup_seconds:.0f} s "
        f"(a full row per key per snapshot would be about {sum_rows(store):,})"
    )
    warm_up(store)

    # 1. the engine's inputs
    naive_inputs, naive_seconds, naive_queries = measure(store, lambda s: naive_plan_inputs(s, newest))
    inputs, seconds, queries = measure(store, lambda s: load_plan_inputs(s, newest))
    if (naive_inputs.keys, naive_inputs.histories, naive_inputs.audits) != (
        inputs.keys,
        inputs.histories,
        inputs.audits,
    ):
        raise SystemExit("the N+1 baseline and load_plan_inputs loaded different inputs")
    with store.database.sessions() as session:
        rows = len(inputs.keys) + history_rows(session, newest)
    loads = [
        Measured("baseline: a history query per key (N+1)", naive_seconds, naive_queries, rows),
        Measured("keyhygiene: load_plan_inputs", seconds, queries, rows),
    ]
    print()
    print(f"engine inputs: the {len(inputs.keys):,} keys of the newest snapshot and their histories")
    print(comparison(loads))

    # 2. planning
    ruleset: RuleSet = parse_rules(RULES, "bench rules")
    plans: list[tuple[str, float, float, Plan]] = []
    for load, loaded in zip(loads, (naive_inputs, inputs), strict=True):
        started = time.perf_counter()
        planned = make_plan(loaded, ruleset, store.end)
        plans.append((load.name, load.seconds, time.perf_counter() - started, planned))
    if plans[0][3] != plans[1][3]:
        raise SystemExit("the two loads gave different plans")
    decisions = plans[1][3].decisions
    changes = sum(1 for d in decisions if d.changes_key)
    baseline_total = plans[0][1] + plans[0][2]
    print()
    print(
        f"planning: rules.plan over {len(inputs.keys):,} keys, {len(ruleset.rules)} rules "
        f"-> {len(decisions)} decisions ({changes} changes, {len(decisions) - changes} reports)"
    )
    print(
        table(
            ["approach", "load s", "plan s", "plan keys/s", "wall s", "speed-up"],
            [
                [
                    name.split(":")[0] + ": load + plan",
                    f"{load_s:.2f}",
                    f"{plan_s:.2f}",
                    f"{len(inputs.keys) / plan_s:,.0f}",
                    f"{load_s + plan_s:.2f}",
                    f"{baseline_total / (load_s + plan_s):.1f}x",
                ]
                for name, load_s, plan_s, _ in plans
            ],
        )
    )

    # 3. the spend report
    params = ReportParams(now=store.end, since=timedelta(days=days))
    start = params.period_start(timedelta(days=days))
    naive, naive_seconds, naive_queries = measure(store, lambda s: naive_spend(s, start, store.end))
    report, seconds, queries = measure(store, lambda s: builders()["spend"](s, params))
    total = check_spend(report.rows, naive)
    with store.database.sessions() as session:
        baseline_snapshot = snapshots.latest_snapshot(session, at=start)
        version_rows = len(
            history.usage_versions(
                session, after_snapshot=baseline_snapshot.id if baseline_snapshot else 0, until_snapshot=newest
            )
        )
    print()
    print(f"spend report: {days} days, ${total:,.2f} over {len(report.rows):,} keys (both agree to the cent)")
    print(
        comparison(
            [
                Measured("baseline: keys_at every day, diffed", naive_seconds, naive_queries, naive.rows),
                Measured("keyhygiene: report spend", seconds, queries, version_rows),
            ]
        )
    )


if __name__ == "__main__":
    main()
