"""Roll-ups: kept by each sync, equal to a recomputation from the versions, rebuilt by the
migration, pruned with the history; and the reports that read them (partial days, owners)."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, inspect, select, text

from db import rollups, snapshots
from db.migrate import downgrade, upgrade
from db.models import Snapshot, key_usage, tracked_keys
from keyhygiene import retention
from keyhygiene.context import Database, session_scope
from keyhygiene.enforcement import key_facts, key_history
from keyhygiene.fakeapi import FakeOpenRouter
from keyhygiene.reports import ReportError, ReportParams, builders
from keyhygiene.reports.html import render_html
from keyhygiene.reports.idle import upcoming_actions
from keyhygiene.reports.render import to_json
from keyhygiene.rules import idle_since, parse_rules
from tests.test_reports_support import DAY, HOUR, RULES, Org, key_hash

pytestmark = pytest.mark.postgres

T0 = datetime(2026, 6, 1, 20, 0, tzinfo=UTC)
"""Syncs every 2 hours from 20:00, so day 0 ends and day 1 begins among them."""
SYNCS = 12
NOW = T0 + (SYNCS - 1) * 2 * HOUR + timedelta(minutes=10)


def build_series(org: Org) -> None:
    """Keys added, used, changed, disabled, deleted, re-listed and reset across a day boundary.

    ==============  ==============================================================
    steady          owner ann; +1.0 before every sync
    byok            owner ann; +0.5 BYOK before every other sync
    idle-old        owner cat; created 90d ago, last used 40d ago: idle 30d+ throughout
    never-used      created 60d ago, no last_used_at: idle 30d+ throughout
    young           created 10d ago, never used: not idle 30d+ (too young)
    late            owner bob; created before sync 4 with 7.0 already spent, then +2.0 before sync 8
    found           created 20d ago with 5.0 spent, first listed at sync 3
    disabled-later  disabled before sync 6 (a change with no spend)
    gone            owner bob; +3.0 before sync 5, deleted before sync 7
    reset           usage 10.0, reset to 1.0 before sync 6 (a new key under the same hash), then +0.25
    ==============  ==============================================================
    """
    fake = org.fake
    ws = fake.add_workspace("Ops", id="ws-ops")["id"]
    start = T0 - HOUR
    org.add("steady", at=start, created_at=T0 - 50 * DAY, usage=4.0, last_used_at=T0 - DAY, creator_user_id="ann")
    org.add("byok", at=start, created_at=T0 - 50 * DAY, creator_user_id="ann", workspace_id=ws)
    org.add(
        "idle-old", at=start, created_at=T0 - 90 * DAY, usage=3.0, last_used_at=T0 - 40 * DAY, creator_user_id="cat"
    )
    org.add("never-used", at=start, created_at=T0 - 60 * DAY, limit=5.0)
    org.add("young", at=start, created_at=T0 - 10 * DAY, expires_at=T0 + 5 * HOUR)
    org.add("disabled-later", at=start, created_at=T0 - 45 * DAY, usage=1.0, last_used_at=T0 - 35 * DAY)
    org.add("gone", at=start, created_at=T0 - 45 * DAY, usage=2.0, creator_user_id="bob", workspace_id=ws)
    org.add("reset", at=start, created_at=T0 - 70 * DAY, usage=10.0, last_used_at=T0 - DAY)
    for k in range(SYNCS):
        at = T0 + k * 2 * HOUR
        before = at - 30 * 60 * timedelta(seconds=1)
        org.use("steady", 1.0, at=before)
        if k % 2:
            org.use("byok", 0.0, 0.5, at=before)
        if k == 3:
            org.add("found", at=before, created_at=T0 - 20 * DAY, usage=5.0, last_used_at=T0 - 2 * DAY, limit=20.0)
        if k == 4:
            org.add("late", at=before, usage=7.0, last_used_at=before, creator_user_id="bob")
        if k == 5:
            org.use("gone", 3.0, at=before)
        if k == 6:
            org.fake.update_key(key_hash("disabled-later"), {"disabled": True})
            org.delete("reset", at=before)
            org.add("reset", at=before, created_at=T0 - 70 * DAY, usage=1.0, last_used_at=before)
        if k == 7:
            org.delete("gone", at=before)
            org.use("reset", 0.25, at=before)
        if k == 8:
            org.use("late", 2.0, at=before)
        org.sync(at)


@pytest.fixture
def org(database: Database, fake: FakeOpenRouter, fake_url: str) -> Iterator[Org]:
    org = Org(database, fake, fake_url)
    try:
        build_series(org)
        yield org
    finally:
        org.close()


def dump(database: Database) -> dict[str, list[tuple[Any, ...]]]:
    """Every roll-up row, in a stable order, money rounded to the micro-dollar."""
    result: dict[str, list[tuple[Any, ...]]] = {}
    with database.sessions() as session:
        for model in (rollups.KeyRollup, rollups.KeyDay, rollups.SnapshotRollup):
            table = model.__table__
            rows = session.execute(select(table).order_by(*table.primary_key.columns))
            result[table.name] = [
                tuple(round(value, 6) if isinstance(value, float) else value for value in row) for row in rows
            ]
    return result


def test_rollups_equal_a_recomputation_from_the_versions(org: Org) -> None:
    database = org.database
    with database.sessions() as session:
        taken = list(session.execute(select(Snapshot.id, Snapshot.taken_at).order_by(Snapshot.id)))
        # Per snapshot and workspace: the counts, with idleness from the engine and the very
        # histories enforcement reads.
        expected_counts: dict[tuple[int, str], tuple[int, ...]] = {}
        for snapshot_id, taken_at in taken:
            histories = {facts.key_hash: key_history(facts) for facts in snapshots.history_facts(session, snapshot_id)}
            cutoff = taken_at - timedelta(days=30)
            per_workspace: dict[str, list[int]] = defaultdict(lambda: [0] * 6)
            for key in snapshots.keys_at(session, snapshot_id):
                since = idle_since(key_facts(key, taken_at), histories[key.hash])
                row = per_workspace[key.workspace_id or ""]
                row[0] += 1
                row[1] += key.disabled
                row[2] += key.expires_at is not None and key.expires_at <= taken_at
                row[3] += key.expires_at is None
                row[4] += key.limit is None
                row[5] += key.created_at <= cutoff and since is not None and since <= cutoff
            for workspace, counts in per_workspace.items():
                expected_counts[(snapshot_id, workspace)] = tuple(counts)
        # Per key and day: the growth between consecutive versions, on the later one's day.
        seen_at = dict(taken)
        expected_spend: dict[tuple[Any, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
        previous: dict[str, tuple[float, float]] = {}
        usage_versions = (
            select(tracked_keys.c.key_hash, key_usage.c.valid_from, key_usage.c.usage, key_usage.c.byok_usage)
            .join(tracked_keys, tracked_keys.c.id == key_usage.c.key_id)
            .order_by(tracked_keys.c.key_hash, key_usage.c.valid_from)
        )
        for version in session.execute(usage_versions):
            before = previous.get(version.key_hash)
            if before is not None:
                grown = (max(0.0, float(version.usage) - before[0]), max(0.0, float(version.byok_usage) - before[1]))
                if any(grown):
                    entry = expected_spend[(seen_at[version.valid_from].date(), version.key_hash)]
                    entry[0] += grown[0]
                    entry[1] += grown[1]
            previous[version.key_hash] = (float(version.usage), float(version.byok_usage))
        counts = {
            (row.snapshot_id, row.workspace_id): (
                row.keys,
                row.disabled,
                row.expired,
                row.no_expiry,
                row.no_limit,
                row.idle_30d,
            )
            for row in session.scalars(select(rollups.SnapshotRollup))
        }
        hashes = {
            key_id: key_hash for key_id, key_hash in session.execute(select(tracked_keys.c.id, tracked_keys.c.key_hash))
        }
        spend = {
            (row.day, hashes[row.key_id]): [round(float(row.usage), 6), round(float(row.byok_usage), 6)]
            for row in session.scalars(select(rollups.KeyDay))
            if row.usage or row.byok_usage
        }
    assert counts == expected_counts
    assert spend == {key: [round(a, 6), round(b, 6)] for key, (a, b) in expected_spend.items()}
    # The series covers what it claims: idle keys, a day boundary, the reset, the deletion.
    default = next(workspace for _, workspace in counts if workspace != "ws-ops")
    assert counts[(taken[-1][0], default)][5] == 3  # idle-old, never-used, disabled-later
    assert len({day for day, _ in spend}) == 2
    assert (taken[-1][1].date(), key_hash("reset")) in spend
    assert max(snapshot_id for snapshot_id, _ in counts if counts[(snapshot_id, "ws-ops")][0] == 2) == taken[6][0]

    before = dump(database)
    with session_scope(database) as session:
        assert rollups.rebuild_rollups(session) == SYNCS
    assert dump(database) == before


def test_the_migration_fills_the_rollups_from_the_stored_history(org: Org) -> None:
    engine = org.database.engine
    before = dump(org.database)
    downgrade(engine, "0005")
    assert "key_days" not in inspect(engine).get_table_names()

    upgrade(engine)

    assert dump(org.database) == before
    assert len(before["snapshot_rollups"]) == 2 * SYNCS  # two workspaces at every snapshot


def test_0010_carries_the_wide_key_days_over_to_the_compact_layout(org: Org) -> None:
    engine = org.database.engine
    reports = [("spend", {"by": by, "since": 2 * DAY}) for by in ("key", "day", "workspace", "owner")]
    reports.append(("trends", {"since": 2 * DAY}))
    before = dump(org.database)
    answers = [report(org, kind, **options) for kind, options in reports]
    downgrade(engine, "0009")
    wide = {column["name"] for column in inspect(engine).get_columns("key_days")}
    assert {"key_hash", "name", "workspace_id", "creator_user_id", "created_at"} <= wide
    with org.database.sessions() as session:
        assert session.scalar(select(func.count()).select_from(text("key_days"))) == len(before["key_days"])

    upgrade(engine)

    assert {column["name"] for column in inspect(engine).get_columns("key_days")} == {
        "day",
        "key_id",
        "usage",
        "byok_usage",
        "first_seen_at",
        "first_usage",
        "first_byok_usage",
    }
    assert dump(org.database) == before
    assert [report(org, kind, **options) for kind, options in reports] == answers
    if engine.dialect.name == "sqlite":
        with engine.connect() as connection:
            ddl = connection.exec_driver_sql("SELECT sql FROM sqlite_master WHERE name = 'key_days'").scalar_one()
        assert "WITHOUT ROWID" in ddl


def report(org: Org, kind: str, **options: Any) -> list[dict[str, Any]]:
    with org.database.sessions() as session:
        result = builders()[kind](session, ReportParams(now=NOW, **options))
    rows: list[dict[str, Any]] = json.loads(to_json(result))
    return rows


def test_a_key_moved_on_the_last_day_is_counted_where_it_ended_up(
    database: Database, fake: FakeOpenRouter, fake_url: str
) -> None:
    """Spend names each key as its record stood at the end of the period, on a last day that later
    snapshots cut short too: it spent 2.0 before 06:00 and moved to Research, without spending,
    before 12:00; its spend to 12:00 is Research's."""
    mover = Org(database, fake, fake_url)
    try:
        research = fake.add_workspace("Research", id="ws-research")["id"]
        day0 = datetime(2026, 6, 1, tzinfo=UTC)
        mover.add("mover", at=day0, created_at=day0 - 30 * DAY, usage=1.0)
        for hour, spend in ((6, 1.0), (12, 1.0), (30, 2.0)):  # day 0 at 06:00, 12:00; day 1 at 06:00
            mover.use("mover", spend, at=day0 + (hour - 1) * HOUR)
            mover.sync(day0 + hour * HOUR)
        fake.update_key(key_hash("mover"), {"workspace_id": research})  # no spend since
        mover.sync(day0 + 36 * HOUR)  # day 1, 12:00: the end of the period asked about
        mover.use("mover", 8.0, at=day0 + 41 * HOUR)
        mover.sync(day0 + 42 * HOUR)  # day 1, 18:00: after it, so day 1 is only partly inside
        with database.sessions() as session:
            params = ReportParams(now=day0 + 43 * HOUR, at=day0 + 36 * HOUR, since=DAY, by="workspace")
            rows = json.loads(to_json(builders()["spend"](session, params)))
            only = ReportParams(now=day0 + 43 * HOUR, at=day0 + 36 * HOUR, since=DAY, workspaces=("ws-research",))
            listed = json.loads(to_json(builders()["spend"](session, only)))
    finally:
        mover.close()
    assert [(row["workspace"], row["total"]) for row in rows] == [("Research", 2.0)]
    assert [(row["name"], row["total"]) for row in listed] == [("mover", 2.0)]


def test_spend_over_a_period_that_starts_and_ends_inside_a_day(org: Org) -> None:
    # (day 1 01:10, day 1 11:10]: the syncs at 02:00 .. 10:00 of day 1 are inside; 00:00 is not.
    at = T0 + 15 * HOUR + timedelta(minutes=10)
    rows = {row["name"]: row for row in report(org, "spend", since=10 * HOUR, at=at)}
    assert {name: row["total"] for name, row in rows.items()} == {
        "steady": 5.0,
        "byok": 1.5,
        "late": 7.0,  # created inside the period: what it had when first seen counts
        "gone": 3.0,
        "reset": 0.25,
    }
    assert rows["gone"]["deleted_in_period"] and rows["late"]["created_in_period"]
    by_day = report(org, "spend", since=10 * HOUR, at=at, by="day")
    assert [(row["day"], row["total"]) for row in by_day] == [("2026-06-02", 16.75)]
    # Across the day boundary: of day 0 only the 22:00 sync is inside; day 1 is whole.
    whole = report(org, "spend", since=21 * HOUR, by="day")
    assert [(row["day"], row["total"]) for row in whole] == [("2026-06-01", 1.5), ("2026-06-02", 24.75)]
    trends = report(org, "trends", since=21 * HOUR)
    assert [(row["day"], row["spend"]) for row in trends] == [("2026-06-01", 1.5), ("2026-06-02", 24.75)]


def test_spend_and_idle_by_owner(org: Org) -> None:
    rows = report(org, "spend", since=DAY, by="owner")
    assert [(row["owner"], row["keys"], row["total"]) for row in rows] == [
        ("ann", 2, 11.0 + 3.0),
        ("bob", 2, 9.0 + 3.0),
        (None, 1, 0.25),
    ]
    idle = report(org, "idle", since=30 * DAY, by="owner")
    # never-used and disabled-later (young, 10 days old, cannot have been idle 30); idle-old
    assert [(row["owner"], row["keys"]) for row in idle] == [(None, 2), ("cat", 1)]


def test_trends_count_zero_where_the_last_snapshot_of_a_day_has_no_keys(
    database: Database, fake: FakeOpenRouter, fake_url: str
) -> None:
    """A day is read at its last snapshot even when that snapshot holds no key of the workspace
    asked about, or no key at all: the day counts zero keys, not the keys of an earlier snapshot."""
    store = Org(database, fake, fake_url)
    try:
        ops = fake.add_workspace("Ops", id="ws-ops")["id"]
        day0 = datetime(2026, 6, 1, tzinfo=UTC)
        store.add("ops-only", at=day0, created_at=day0 - 30 * DAY, workspace_id=ops)
        store.add("default", at=day0, created_at=day0 - 30 * DAY)
        store.sync(day0 + 6 * HOUR)  # day 0: one key in each workspace
        store.delete("ops-only", at=day0 + 7 * HOUR)
        store.sync(day0 + 12 * HOUR)  # day 0's last snapshot: Ops has no key
        store.sync(day0 + 30 * HOUR)  # day 1: Ops still has none
        store.delete("default", at=day0 + 31 * HOUR)
        store.sync(day0 + 54 * HOUR)  # day 2: the organisation has no key at all
        with database.sessions() as session:
            now = day0 + 55 * HOUR

            def trends(**options: Any) -> list[tuple[str, int]]:
                result = builders()["trends"](session, ReportParams(now=now, since=3 * DAY, **options))
                return [(row["day"], row["keys"]) for row in json.loads(to_json(result))]

            in_ops = trends(workspaces=("ws-ops",))
            everywhere = trends()
    finally:
        store.close()
    assert in_ops == [("2026-06-01", 0), ("2026-06-02", 0), ("2026-06-03", 0)]
    assert everywhere == [("2026-06-01", 1), ("2026-06-02", 1), ("2026-06-03", 0)]


def test_trends_count_a_new_keys_first_spend_in_the_workspace_it_was_first_seen_in(
    database: Database, fake: FakeOpenRouter, fake_url: str
) -> None:
    """What a key created inside the period had spent when first seen is that day's spend of the
    workspace it was in then, as the snapshot's counts place it, even after it moved elsewhere."""
    store = Org(database, fake, fake_url)
    try:
        ops = fake.add_workspace("Ops", id="ws-ops")["id"]
        research = fake.add_workspace("Research", id="ws-research")["id"]
        day0 = datetime(2026, 6, 1, tzinfo=UTC)
        store.add("other", at=day0, created_at=day0 - 30 * DAY, workspace_id=research)
        store.sync(day0 + 6 * HOUR)
        store.add("newbie", at=day0 + 7 * HOUR, usage=3.0, workspace_id=ops)
        store.sync(day0 + 12 * HOUR)  # first seen in Ops, with 3.0 spent
        fake.update_key(key_hash("newbie"), {"workspace_id": research})
        store.sync(day0 + 30 * HOUR)  # day 1: in Research, no spend since
        with database.sessions() as session:
            now = day0 + 31 * HOUR

            def spend(workspace: str, at: datetime) -> list[tuple[str, int, float]]:
                params = ReportParams(now=now, at=at, since=2 * DAY, workspaces=(workspace,))
                result = builders()["trends"](session, params)
                return [(row["day"], row["keys"], row["spend"]) for row in json.loads(to_json(result))]

            at_day0 = {name: spend(name, day0 + 13 * HOUR) for name in ("ws-ops", "ws-research")}
            at_day1 = {name: spend(name, now) for name in ("ws-ops", "ws-research")}
    finally:
        store.close()
    assert at_day0 == {"ws-ops": [("2026-06-01", 1, 3.0)], "ws-research": [("2026-06-01", 1, 0.0)]}
    assert at_day1 == {
        "ws-ops": [("2026-06-01", 1, 3.0), ("2026-06-02", 0, 0.0)],
        "ws-research": [("2026-06-01", 1, 0.0), ("2026-06-02", 2, 0.0)],
    }


def test_trends_refuse_a_name_filter(org: Org) -> None:
    with org.database.sessions() as session, pytest.raises(ReportError, match="--name"):
        builders()["trends"](session, ReportParams(now=NOW, name="st*"))


def test_prune_drops_the_rollups_before_the_retention(org: Org) -> None:
    cutoff = T0 + 13 * HOUR
    trends_before = report(org, "trends", since=NOW - cutoff)
    spend_before = report(org, "spend", since=NOW - cutoff)

    retention.prune(org.database, now=NOW, retention_period=NOW - cutoff)

    with org.database.sessions() as session:
        kept = set(session.scalars(select(rollups.SnapshotRollup.taken_at)))
        days = set(session.scalars(select(rollups.KeyDay.day)))
    assert min(kept) == T0 + 12 * HOUR  # the anchor, the 08:00 sync of day 1
    assert days == {(T0 + DAY).date()}
    assert report(org, "trends", since=NOW - cutoff) == trends_before
    assert report(org, "spend", since=NOW - cutoff) == spend_before


def test_the_html_report_has_an_owners_table(org: Org) -> None:
    ruleset = parse_rules(RULES)
    with org.database.sessions() as session:
        page = render_html(session, ReportParams(now=NOW, since=DAY, ruleset=ruleset))
        coming = upcoming_actions(session, ReportParams(now=NOW, ruleset=ruleset))
    table = page[page.index('data-figures="owners"') :]
    table = table[: table.index("</table>")]
    found = {
        key: dict(re.findall(r'data-col="([^"]+)" data-value="([^"]+)"', cells))
        for key, cells in re.findall(r'<tr data-key="([^"]+)">(.*?)</tr>', table)
    }
    soon = [row for row in coming if row["acts_on"] <= NOW + 30 * DAY]
    upcoming = {
        owner: str(len({row["key_hash"] for row in soon if row["owner"] == owner}))
        for owner in (None, "ann", "bob", "cat")
    }
    assert found == {
        "(none)": {"keys": "5", "idle": "3", "spend": "0.25", "upcoming": upcoming[None]},
        "ann": {"keys": "2", "idle": "0", "spend": "14.0", "upcoming": upcoming["ann"]},
        "bob": {"keys": "1", "idle": "0", "spend": "12.0", "upcoming": upcoming["bob"]},
        "cat": {"keys": "1", "idle": "1", "spend": "0.0", "upcoming": upcoming["cat"]},
    }
    assert upcoming["cat"] == "1" and upcoming[None] != "0"  # idle-old, and the idle keys of nobody


def test_0011_keys_the_running_state_by_id_and_back(org: Org) -> None:
    engine = org.database.engine
    before = dump(org.database)
    answers = [report(org, "spend", since=2 * DAY), report(org, "trends", since=2 * DAY)]
    with org.database.sessions() as session:
        hashes = dict(session.execute(select(tracked_keys.c.id, tracked_keys.c.key_hash)).all())
    downgrade(engine, "0010")
    with org.database.sessions() as session:
        by_hash = dict(session.execute(text("SELECT key_hash, usage FROM key_rollups")).all())
        # The old layout's copy of since when usage held comes back from the usage versions.
        copies = session.execute(
            text(
                "SELECT count(*), sum(CASE WHEN r.usage_changed_at = u.usage_since THEN 1 ELSE 0 END) "
                "FROM key_rollups r JOIN tracked_keys t ON t.key_hash = r.key_hash "
                "JOIN key_usage u ON u.key_id = t.id AND u.valid_to IS NULL"
            )
        ).one()
    assert by_hash == {hashes[row[0]]: row[2] * 1_000_000 for row in before["key_rollups"]}  # micro-dollars
    assert copies[0] > 0 and copies[1] == copies[0]
    with org.database.engine.begin() as connection:  # the state of a key retention already forgot
        connection.execute(
            text(
                "INSERT INTO key_rollups (key_hash, first_seen_at, usage_changed_at, usage, byok_usage) "
                "VALUES ('forgotten', :at, :at, 5, 0)"
            ),
            {"at": T0},
        )

    upgrade(engine)

    assert dump(org.database) == before
    assert [report(org, "spend", since=2 * DAY), report(org, "trends", since=2 * DAY)] == answers
    if engine.dialect.name == "sqlite":
        with engine.connect() as connection:
            ddl = connection.exec_driver_sql("SELECT sql FROM sqlite_master WHERE name = 'key_rollups'").scalar_one()
        assert "key_id INTEGER NOT NULL" in ddl and "PRIMARY KEY (key_id)" in ddl  # the rowid
