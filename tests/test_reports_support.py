"""A constructed history for the report and retention tests (no tests here).

``Org`` drives real syncs: the fake OpenRouter API served over loopback HTTP, its clock set to each
moment, and ``keyhygiene.jobs.execute("sync", ...)`` with the same clock. ``build_history`` makes
the history whose figures the report tests compute by hand (see its docstring).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from keyhygiene.context import Database, open_client
from keyhygiene.fakeapi import FakeOpenRouter
from keyhygiene.jobs import JobOutcome, execute
from keyhygiene.settings import Settings
from tests.conftest import MANAGEMENT_KEY

DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
D0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
"""Snapshot k of the history is taken at D0 + k days (12:00 UTC); none on days 4 and 5."""
NOW = D0 + 10 * DAY + timedelta(minutes=30)
"""The time the tests ask the reports about: just after the last snapshot."""
SYNC_DAYS = (0, 1, 2, 3, 6, 7, 8, 9, 10)

RULES = """
[safety]
dry_run = true
max_actions_per_run = 100
max_action_percent = 100
protect_names = ["prod-*"]

[[rule]]
name = "delete-expired"
match = "expired"
action = "delete"
grace = "7d"

[[rule]]
name = "disable-idle"
match = "unused"
idle_for = "30d"
action = "disable"
"""


def day(k: int, hour: float = 12) -> datetime:
    """Day k of the history at ``hour`` UTC."""
    return D0.replace(hour=0) + k * DAY + timedelta(hours=hour)


def key_hash(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


class Org:
    """A fake organisation synced into ``database`` at chosen moments."""

    def __init__(self, database: Database, fake: FakeOpenRouter, base_url: str, rules_file: Path | None = None):
        self.database = database
        self.fake = fake
        values: dict[str, Any] = {
            "OPENROUTER_MANAGEMENT_KEY": MANAGEMENT_KEY,
            "OPENROUTER_BASE_URL": base_url,
            "KEYHYGIENE_DATABASE_URL": database.engine.url.render_as_string(hide_password=False),
            "_env_file": None,
        }
        if rules_file is not None:
            values["KEYHYGIENE_RULES_FILE"] = str(rules_file)
        self.settings = Settings(**values)
        self.client = open_client(self.settings)

    def close(self) -> None:
        self.client.close()

    def add(self, name: str, *, at: datetime, **fields: Any) -> str:
        """Add a key at ``at`` (its hash derives from its name unless given)."""
        self.fake.set_clock(at)
        fields.setdefault("hash", key_hash(name))
        fields.setdefault("created_at", at)
        self.fake.add_key(name, **fields)
        return str(fields["hash"])

    def use(self, name: str, usd: float, byok: float = 0.0, *, at: datetime) -> None:
        self.fake.set_clock(at)
        self.fake.record_use(key_hash(name), usd, byok, at=at)

    def delete(self, name: str, *, at: datetime) -> None:
        self.fake.set_clock(at)
        self.fake.delete_key(key_hash(name))

    def sync(self, at: datetime) -> JobOutcome:
        self.fake.set_clock(at)
        outcome = execute("sync", self.settings, clock=lambda: at, database=self.database, client=self.client)
        assert outcome.exit_code == 0, outcome.message
        return outcome

    def run(self, kind: str, at: datetime, **options: Any) -> JobOutcome:
        self.fake.set_clock(at)
        return execute(kind, self.settings, clock=lambda: at, database=self.database, client=self.client, **options)


def build_history(org: Org) -> None:
    """Eleven days, nine snapshots (none on days 4 and 5), keys that exercise every spend edge.

    ==========  ==========================================================================
    alpha       limit 100, usage 10 at D0-100d; +1.0 every day 0..10 at 06:00
    bravo       limit 50; +0.5 credit and +2.0 BYOK on day 8
    charlie     created day 5 (inside the gap) and used 4.0 at once; +1.0 on day 9
    delta       usage 20; +2.0 on day 7; +3.0 on day 8 and deleted before the day-8 sync
    echo        usage 50; counter reset to 5 on day 5 (an API correction); +1.0 on day 7
    foxtrot     created D0-50d with usage 30 but first listed on day 5; +2.0 on day 9
    golf        idle: last used D0-45d
    hotel       workspace Research, created D0-30d, never used until +1.5 on day 9
    india       never used (last_used_at null, usage 0), created D0-60d
    kilo        last used D0-10d
    lima        expired D0-5d, last used D0-20d-1h
    prod-mike   protected by name; last used D0-60d
    november    disabled; last used D0-35d
    oscar       expires day 7 00:00; last used D0-1d
    ==========  ==========================================================================
    """
    fake = org.fake
    research = fake.add_workspace("Research", id="ws-research")["id"]
    start = D0 - 2 * HOUR
    old = D0 - 100 * DAY
    org.add("alpha", at=start, created_at=old, usage=10.0, limit=100.0, last_used_at=D0 - DAY)
    org.add("bravo", at=start, created_at=old, usage=7.0, limit=50.0, last_used_at=D0 - 2 * DAY)
    org.add("delta", at=start, created_at=D0 - 90 * DAY, usage=20.0, last_used_at=D0 - 3 * DAY)
    org.add("echo", at=start, created_at=old, usage=50.0, last_used_at=D0 - DAY)
    org.add("golf", at=start, created_at=D0 - 200 * DAY, usage=3.0, last_used_at=D0 - 45 * DAY)
    org.add("hotel", at=start, created_at=D0 - 30 * DAY, workspace_id=research)
    org.add("india", at=start, created_at=D0 - 60 * DAY)
    org.add("kilo", at=start, created_at=old, usage=1.0, last_used_at=D0 - 10 * DAY)
    org.add(
        "lima",
        at=start,
        created_at=old,
        usage=4.0,
        last_used_at=D0 - 20 * DAY - HOUR,
        expires_at=D0 - 5 * DAY,
    )
    org.add("prod-mike", at=start, created_at=old, usage=9.0, last_used_at=D0 - 60 * DAY)
    org.add("november", at=start, created_at=D0 - 40 * DAY, usage=2.0, last_used_at=D0 - 35 * DAY, disabled=True)
    org.add("oscar", at=start, created_at=D0 - 10 * DAY, usage=1.0, last_used_at=D0 - DAY, expires_at=day(7, 0))

    for k in range(11):
        org.use("alpha", 1.0, at=day(k, 6))
        if k == 5:
            org.add("charlie", at=day(5, 1))
            org.use("charlie", 4.0, at=day(5, 2))
            org.add("foxtrot", at=day(5, 3), created_at=D0 - 50 * DAY, usage=30.0, last_used_at=D0 - 10 * DAY)
            org.delete("echo", at=day(5, 4))
            org.add("echo", at=day(5, 4), created_at=old, usage=5.0, last_used_at=D0 - DAY)
        if k == 7:
            org.use("delta", 2.0, at=day(7, 7))
            org.use("echo", 1.0, at=day(7, 7))
        if k == 8:
            org.use("bravo", 0.5, 2.0, at=day(8, 7))
            org.use("delta", 3.0, at=day(8, 7))
            org.delete("delta", at=day(8, 8))
        if k == 9:
            org.use("charlie", 1.0, at=day(9, 7))
            org.use("foxtrot", 2.0, at=day(9, 7))
            org.use("hotel", 1.5, at=day(9, 7))
        if k in SYNC_DAYS:
            org.sync(day(k))
