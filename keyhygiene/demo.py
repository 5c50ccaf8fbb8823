"""``keyhygiene demo``: the whole product in under a minute, with no account, broker or network.

It starts the built-in fake OpenRouter API on loopback with a realistic organisation, simulates
weeks of daily syncs while the keys are used (some stop, some are created, a few are deleted),
runs a dry-run enforcement, prints the plan and a short report, and writes the HTML report. The
simulated clock ends at the real now, so ``keyhygiene report ...`` against the demo database lines
up with it afterwards. Everything lives in one directory (``./keyhygiene-demo`` by default).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import random
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console

from db import runs, snapshots
from db.migrate import upgrade
from keyhygiene.fakeapi import FakeOpenRouter, FakeServer, generate_organisation
from keyhygiene.fakeapi.webhook import WebhookSink
from keyhygiene.rules import Decision, load_rules

from . import logging as khlog
from .context import Database, collection_paused, open_client, quick_handoffs, session_scope
from .enforcement import explain
from .errors import EXIT_FAILURE, EXIT_OK, UsageError
from .jobs import execute
from .reports import ReportParams
from .reports import idle as idle_report
from .reports.base import Report, usd
from .reports.html import write_html
from .reports.render import print_table
from .reports.spend import compute_spend
from .settings import asked_log_format, load_settings
from .timeutil import utcnow

DEFAULT_DIRECTORY = "keyhygiene-demo"
DAY = timedelta(days=1)

DEMO_RULES = """\
# The keyhygiene demo's rules. dry_run = true: enforcement plans and records, and changes nothing.
[safety]
dry_run = true
# Demo only: a real organisation keeps these tight (the defaults are 50 changes and 10% of keys).
max_actions_per_run = 1000
max_action_percent = 60
protect_names = ["prod-*"]       # never touched, whatever a rule says

[[rule]]
name = "delete-expired"
match = "expired"
action = "delete"
grace = "7d"                     # disabled first, deleted once it has been disabled for 7 days

[[rule]]
name = "disable-idle"
match = "unused"
idle_for = "30d"
action = "disable"

[[rule]]
name = "disable-overspend"
match = "over_budget"
window = "monthly"
threshold_usd = 100.0
action = "disable"
reenable = true                  # re-enabled when the month resets

[[notify]]                       # the demo's own webhook receiver on 127.0.0.1
name = "demo-sink"
url_env = "KEYHYGIENE_DEMO_WEBHOOK"
format = "json"
on = ["done", "failed", "refused", "upcoming"]
upcoming_within = "7d"
"""

_PEOPLE = ("alice", "bob", "carol", "dmitri", "erin", "farah", "gus", "hana", "ivan", "julia", "kofi", "li")
_DEVICES = ("laptop", "desktop", "sandbox", "notebook", "vm")
_ACTION_ORDER = {"delete": 0, "disable": 1, "enable": 2, "report": 3}


@dataclass
class _Spender:
    """How one key is used during the simulation."""

    key_hash: str
    rate: float  # USD per active day
    chance: float  # probability of use on a given day
    byok_share: float
    stops_on: int | None  # the day it falls idle, if it does
    expires_at: datetime | None  # the demo never disables or deletes a key that is in use
    disabled: bool


@dataclass
class _Simulation:
    fake: FakeOpenRouter
    rng: random.Random
    start: datetime
    days: int
    spenders: dict[str, _Spender] = field(default_factory=dict)
    created: int = 0
    deleted: int = 0

    def spender(self, key_hash: str, *, heavy: bool = False, stops: bool = True) -> None:
        rng = self.rng
        stops_on = rng.randrange(1, self.days) if stops and self.days > 1 and rng.random() < 0.12 else None
        key = self.fake.get(key_hash) or {}
        expires = key.get("expires_at")
        self.spenders[key_hash] = _Spender(
            key_hash,
            rate=rng.uniform(6.0, 9.0) if heavy else rng.lognormvariate(-0.8, 1.1),
            chance=1.0 if heavy else rng.uniform(0.35, 0.95),
            byok_share=rng.uniform(0.1, 0.6) if rng.random() < 0.15 else 0.0,
            stops_on=stops_on,
            expires_at=None if expires is None else datetime.fromisoformat(expires.replace("Z", "+00:00")),
            disabled=bool(key.get("disabled")),
        )

    def use(self, day: int, begin: datetime, end: datetime, share: float = 1.0) -> None:
        """Record the use of every active key between ``begin`` and ``end``: each active key is
        used once in it, with a day's spend times ``share`` (the part of a day this covers)."""
        rng, fake = self.rng, self.fake
        for spender in list(self.spenders.values()):
            if spender.stops_on is not None and day >= spender.stops_on:
                continue
            if spender.disabled or (spender.expires_at is not None and spender.expires_at <= begin):
                continue
            if rng.random() > spender.chance:
                continue
            at = begin + (end - begin) * rng.random()
            spend = round(spender.rate * rng.lognormvariate(0, 0.35) * share, 4)
            byok = round(spend * spender.byok_share, 4)
            fake.set_clock(at)
            fake.record_use(spender.key_hash, spend - byok, byok, at=at)

    def churn(self, at: datetime, share: float = 1.0) -> None:
        """New keys now and then, and an occasional clean-up by a person (``share``: the part of a
        day this covers)."""
        rng, fake = self.rng, self.fake
        fake.set_clock(at)
        if rng.random() < 0.35 * share:
            name = (
                f"dev-{rng.choice(_PEOPLE)}-{rng.choice(_DEVICES)}"
                if rng.random() < 0.6
                else f"ci-runner-{rng.randint(61, 99)}"
            )
            key = fake.add_key(name, workspace_id=rng.choice([w["id"] for w in fake.workspaces]), created_at=at)
            self.spender(key["hash"])
            self.created += 1
        if rng.random() < 0.15 * share:
            idle = [
                k for k in fake.keys if k["hash"] not in self.spenders and not k["name"].startswith(("prod-", "demo"))
            ]
            if idle:
                fake.delete_key(rng.choice(idle)["hash"])
                self.deleted += 1


def _hand_made_keys(sim: _Simulation, end: datetime) -> None:
    """A few keys that show every rule at work (and one that no rule may touch)."""
    fake, start = sim.fake, sim.start
    fake.set_clock(start - timedelta(hours=1))
    fake.add_key(
        "dev-old-laptop",
        created_at=start - 120 * DAY,
        usage=14.2,
        last_used_at=end - 25 * DAY,
        expires_at=end - 20 * DAY,
    )
    fake.add_key("ci-runner-legacy", created_at=start - 300 * DAY, usage=12.3, last_used_at=start - 60 * DAY)
    fake.add_key(
        "dev-alice-old-sandbox",
        created_at=start - 200 * DAY,
        usage=3.1,
        disabled=True,
        updated_at=start - 2 * DAY,
        last_used_at=start - 90 * DAY,
        expires_at=start - 3 * DAY,
    )
    fake.add_key(
        "prod-payments-1",
        created_at=start - 400 * DAY,
        usage=880.0,
        last_used_at=start - 45 * DAY,
        expires_at=end - 10 * DAY,
    )
    overspend = fake.add_key("svc-batch-overspend", created_at=start - 30 * DAY, usage=40.0, last_used_at=start)
    sim.spender(overspend["hash"], heavy=True, stops=False)


def _plan_rows(decisions: list[Decision], *, per_group: int = 4) -> tuple[list[dict[str, Any]], Counter[str]]:
    """A few examples of each (action, rule), strongest first, and how many there are of each."""
    counts: Counter[str] = Counter()
    rows = []
    for decision in sorted(decisions, key=lambda d: (_ACTION_ORDER.get(d.action, 9), d.rule, d.key_name)):
        group = f"{decision.action} by {decision.rule}"
        counts[group] += 1
        if counts[group] <= per_group:
            rows.append(
                {
                    "action": decision.action,
                    "rule": decision.rule,
                    "name": decision.key_name,
                    "why": explain(decision.evidence),
                }
            )
    return rows, counts


DEMO_MARK = ".keyhygiene-demo"
"""A file the demo leaves in its folder: the database and rules file there are its own, and a
later demo may replace them."""


def _claim_folder(folder: Path, db_path: Path, rules_path: Path) -> None:
    """Create the demo's folder, or make sure that what the demo replaces in it is the demo's own.

    The demo's files have the names of a real installation's defaults (``keyhygiene.db``,
    ``keyhygiene.toml``): a folder that holds either, without the demo's mark (or the demo's rules,
    as a demo from before the mark left them), is refused, never overwritten."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        marked = (folder / DEMO_MARK).exists()
        ours = marked or (rules_path.is_file() and rules_path.read_text(errors="replace") == DEMO_RULES)
        foreign = [path.name for path in (db_path, rules_path) if path.exists() or path.is_symlink()]
        if foreign and not ours:
            raise UsageError(
                f"{folder} holds {' and '.join(foreign)}, which the demo did not write and would replace: "
                "give the demo a folder of its own with --dir"
            )
        (folder / DEMO_MARK).write_text("The keyhygiene demo's folder: `keyhygiene demo` replaces what it holds.\n")
    except OSError as exc:
        raise UsageError(f"the demo cannot use the folder {folder}: {exc.strerror or exc}") from None


def run_demo(
    *,
    directory: str | None = None,
    days: int = 42,
    keys: int = 300,
    every: timedelta = DAY,
    seed: int = 7,
    now: datetime | None = None,
    console: Console | None = None,
) -> int:
    """Run the demo; returns the exit code. ``now`` (default: the real now) is when the simulation
    ends; ``every``: the time between two snapshots (a day, or a whole fraction of one)."""
    if every <= timedelta(0) or DAY % every:
        raise ValueError(f"every={every} does not divide a day")
    console = console or Console()
    khlog.configure_logging(asked_log_format(), level=logging.WARNING)
    began = time.monotonic()
    end = (now or utcnow()).astimezone(UTC)
    steps = days * (DAY // every)
    start = end - (steps - 1) * every
    share = every / DAY

    folder = Path(directory or DEFAULT_DIRECTORY)
    db_path, rules_path, html_path = folder / "keyhygiene.db", folder / "keyhygiene.toml", folder / "report.html"
    _claim_folder(folder, db_path, rules_path)
    replaced = db_path.exists()
    for stale in (db_path, folder / "keyhygiene.db-wal", folder / "keyhygiene.db-shm"):
        stale.unlink(missing_ok=True)
    rules_path.write_text(DEMO_RULES)

    fake = FakeOpenRouter(seed=seed)
    rng = random.Random(seed)
    workspaces = 4
    generate_organisation(fake, keys=keys, workspaces=workspaces, seed=seed, now=start - timedelta(hours=1))
    sim = _Simulation(fake=fake, rng=rng, start=start, days=days)
    for key in fake.keys:
        last_used = key.get("last_used_at")
        recent = last_used is not None and datetime.fromisoformat(last_used.replace("Z", "+00:00")) > start - 30 * DAY
        if recent and not key["disabled"]:
            sim.spender(key["hash"])
    _hand_made_keys(sim, end)

    console.print(
        f"[bold]keyhygiene demo[/bold]: a fake OpenRouter organisation with {len(fake.keys)} keys in "
        f"{workspaces} workspaces, {days} days of {_cadence(every)} snapshots, on SQLite; no account, broker or "
        "network."
    )
    with FakeServer(fake) as server, WebhookSink() as sink, _environment("KEYHYGIENE_DEMO_WEBHOOK", sink.url):
        settings = load_settings(
            _env_file=None,
            OPENROUTER_MANAGEMENT_KEY=fake.management_key,
            OPENROUTER_BASE_URL=server.base_url,
            KEYHYGIENE_DATABASE_URL=f"sqlite:///{db_path}",
            KEYHYGIENE_RULES_FILE=str(rules_path),
            KEYHYGIENE_LOG_FORMAT="console",
        )
        # A year of daily snapshots in one process: each day's SQL walks every key's open versions,
        # spread over a file of hundreds of MB (SQLite's default cache is 2 MB). A demo that the
        # machine interrupts is run again: it need not wait for the disk at each day's commit.
        database = Database.open(settings, check=False, sqlite_cache_kib=32 * 1024, sqlite_durable=False)
        try:
            upgrade(database.engine)
            client = open_client(settings)
            try:
                # The recording thread takes back the interpreter's lock after each statement: 1 ms
                # handoffs take 10% off the whole demo.
                with _PastDays(database) as past, collection_paused(), quick_handoffs():
                    for step in range(steps):
                        moment = start + step * every

                        def at_moment(moment: datetime = moment) -> datetime:
                            return moment

                        if step:
                            sim.churn(moment - every / 2, share)
                            sim.use((moment - start) // DAY, moment - every, moment - timedelta(minutes=1), share)
                        if step == steps - 1:
                            _overspend_today(fake, end)
                        fake.set_clock(moment)
                        if step < steps - 1:
                            past.record(moment, fake.shared_keys())
                            continue
                        past.wait()
                        outcome = execute("sync", settings, clock=at_moment, database=database, client=client)
                        if outcome.exit_code != EXIT_OK:
                            console.print(f"[red]the last simulated sync failed:[/red] {outcome.message}")
                            return EXIT_FAILURE
                fake.set_clock(end)
                enforced = execute(
                    "enforce", settings, dry_run=True, clock=lambda: end, database=database, client=client
                )
            finally:
                client.close()
            if enforced.enforcement is None:
                console.print(f"[red]the dry-run enforcement did not run:[/red] {enforced.message}")
                return enforced.exit_code or EXIT_FAILURE
            console.print(
                f"Simulated {days} days: {sim.created} keys created and {sim.deleted} deleted along the way; "
                f"{len(fake.keys)} keys now.\n"
            )
            ruleset = load_rules(rules_path)
            decisions = list(enforced.enforcement.decisions)
            rows, counts = _plan_rows(decisions)
            print_table(
                Report(
                    title=f"The plan (dry run: nothing was changed): {len(decisions)} keys of "
                    f"{enforced.enforcement.total_keys}, a few of each kind",
                    columns=["action", "rule", "name", "why"],
                    rows=rows,
                    notes=[
                        "In all: " + "; ".join(f"{group} {n}" for group, n in counts.items()),
                        "prod-* keys are protected (protect_names): prod-payments-1 is expired and idle, "
                        'and no rule touches it. The whole plan: the last command under "Explore further" below.',
                    ],
                ),
                console,
            )
            params = ReportParams(now=end, since=timedelta(days=min(days, 30)), ruleset=ruleset)
            names = {workspace["id"]: workspace["name"] for workspace in fake.workspaces}
            with database.sessions() as session:
                _summary(console, session, params, names)
                write_html(session, replace(params, since=timedelta(days=days)), html_path)
            _notices(console, sink)
        finally:
            database.close()

    url = f"sqlite:///{db_path}"
    command = shell_command()
    width = max(len(str(path)) for path in (db_path, rules_path, html_path))
    console.print(
        f"\n[bold]Done in {time.monotonic() - began:.1f}s.[/bold] Everything is in {folder}/"
        + (" (the previous demo database was replaced)" if replaced else "")
        + ":\n"
        + "".join(
            f"  {path!s:<{width}}  {what}\n"
            for path, what in (
                (db_path, "snapshots and the audit log (SQLite)"),
                (rules_path, "the demo rules (dry run)"),
                (html_path, "the HTML report: open it in a browser"),
            )
        )
        + "\n"
        "Explore further:\n"
        f"  export KEYHYGIENE_DATABASE_URL={url} KEYHYGIENE_RULES_FILE={rules_path}\n"
        f"  {command} report spend --by workspace\n"
        f"  {command} report idle\n"
        f"  {command} report trends --since 14d\n"
        f"  {command} report actions\n"
        f"  {command} plan",
        highlight=False,
        soft_wrap=True,
    )
    return EXIT_OK


@contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    """``name=value`` in this process's environment for a while (the demo's webhook URL)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _cadence(every: timedelta) -> str:
    if every == DAY:
        return "daily"
    hours = every / timedelta(hours=1)
    return "hourly" if hours == 1 else f"{hours:g}-hourly"


def _notices(console: Console, sink: WebhookSink) -> None:
    """What the demo's webhook receiver was sent: the notify target in the demo rules."""
    bodies = sink.bodies()
    if not bodies:
        console.print("\nNotices: none were due (a dry run changes no key, so there is no 'done' notice).")
        return
    console.print(f"\n[bold]Notices[/bold] delivered to the demo's webhook receiver ({len(bodies)}):", highlight=False)
    for body in bodies:
        keys = len(body["keys"]) + body["more"]
        if body["event"] == "upcoming":
            console.print(f"  upcoming: {keys} key(s) a rule will act on within 7 days, each announced once")
        else:
            console.print(f"  run {body['run_id']}: {body['outcome']}, {keys} key(s)")
        for key in body["keys"][:3]:
            when = f" on {key['due'][:10]}" if key.get("due") else ""
            line = f"    {key['key_name']}: {key['action']}{when} ({key['rule']}), owner {key['owner'] or '-'}"
            console.print(line[:78], highlight=False)


def shell_command() -> str:
    """How to run keyhygiene from the user's shell: ``keyhygiene`` when that is this installation on
    PATH, else the path of this installation's console script (a virtualenv not activated)."""
    beside = Path(sys.executable).parent / "keyhygiene"
    on_path = shutil.which("keyhygiene")
    if not beside.exists():
        return "keyhygiene"
    if on_path is not None and Path(on_path).resolve() == beside.resolve():
        return "keyhygiene"
    with contextlib.suppress(ValueError):
        relative = str(beside.relative_to(Path.cwd()))
        return relative if "/" in relative else f"./{relative}"
    return str(beside)


_COLLECT_EVERY = 7
"""Simulated days between two collections of the cyclic garbage they left (see ``_PastDays.record``)."""


class _PastDays:
    """Records the simulated past days' snapshots through the store's own write path
    (SnapshotWriter), straight from the fake's state: a day that is already over needs no HTTP
    round trips. Each day is one transaction, on a thread of its own, while the caller simulates
    the next day and stages its keys: the database and the simulation take a core each. One day
    at a time is handed over; ``wait`` (and leaving the block) waits for it."""

    def __init__(self, database: Database) -> None:
        self._database = database
        self._reuse = snapshots.StagedRows()  # most keys do not change from one simulated day to the next
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keyhygiene-demo")
        self._day: Future[None] | None = None
        self._written = threading.Event()  # the day handed over last has written its staging rows
        self._days = 0

    def __enter__(self) -> _PastDays:
        return self

    def __exit__(self, *error: object) -> None:
        self._thread.shutdown(wait=True)
        if error[0] is None:
            self.wait()

    def record(self, moment: datetime, keys: list[dict[str, Any]]) -> None:
        """Hand over the snapshot of ``keys`` taken at ``moment``; returns once its staging rows are
        written, so that the caller's next simulated day runs beside the SQL that records this one
        (a few long statements) and not beside the row-by-row insert, which would make both wait
        on the interpreter's lock at every row."""
        staged = snapshots.SnapshotWriter(0, reuse=self._reuse).stage(keys)  # the id comes when it is written
        counts = Counter(key["workspace_id"] or "default" for key in keys)
        self.wait()
        self._days += 1
        if self._days % _COLLECT_EVERY == 0:
            # The caller keeps cyclic garbage collection paused (it would walk every key's JSON and
            # staging row again and again); what each day leaves in cycles (its session, its
            # transaction) is collected here, while the recording thread holds none of it.
            gc.collect(1)
        self._written.clear()
        self._day = self._thread.submit(self._record, moment, staged, counts)
        self._written.wait()  # the next day's staging reads what this day's rows left in _reuse

    def wait(self) -> None:
        """Until the day handed over last is recorded; raises what recording it raised."""
        day, self._day = self._day, None
        if day is not None:
            day.result()

    def _record(self, moment: datetime, staged: snapshots.StagedKeys, counts: Counter[str]) -> None:
        try:
            with session_scope(self._database) as session:
                run_id = runs.start_run(session, kind="sync", now=moment).id
                snapshot_id = snapshots.start_snapshot(session, run_id=run_id, now=moment).id
                writer = snapshots.SnapshotWriter(snapshot_id, reuse=self._reuse)
                writer.write(session, staged, rows_written=self._written.set)
                written = writer.finish(session, taken_at=moment, workspace_counts=counts)
                summary = {"snapshot_id": snapshot_id, "keys": written.key_count, "new_versions": written.new_versions}
                message = f"snapshot {snapshot_id}: {written.key_count} keys (a simulated past day)"
                runs.finish_run(
                    session, run_id, status=runs.OK, now=moment, exit_code=EXIT_OK, message=message, summary=summary
                )
        finally:
            self._written.set()


def _overspend_today(fake: FakeOpenRouter, end: datetime) -> None:
    """A burst on the last day, inside the current UTC day (so inside this month, whatever the date)."""
    key = next(k for k in fake.keys if k["name"] == "svc-batch-overspend")
    today = end.replace(hour=0, minute=0, second=0, microsecond=0)
    at = max(end - timedelta(minutes=10), today)
    fake.set_clock(at)
    fake.record_use(key["hash"], 150.0, at=at)


def _summary(console: Console, session: Any, params: ReportParams, names: dict[str, str]) -> None:
    figures = compute_spend(session, params)
    top = sorted(figures.keys.values(), key=lambda item: -item.total)[:5]
    by_workspace: dict[str, float] = {}
    for item in figures.keys.values():
        name = names.get(item.workspace_id or "", item.workspace_id or "-")
        by_workspace[name] = by_workspace.get(name, 0.0) + item.total
    days = int((params.since or DAY).total_seconds() // 86400)
    print_table(
        Report(
            title=f"Spend over the last {days} days: ${usd(figures.total):,.2f}; the top keys",
            columns=["name", "total"],
            rows=[{"name": item.name, "total": usd(item.total)} for item in top],
            notes=[
                "By workspace: "
                + ", ".join(
                    f"{name} ${total:,.2f}" for name, total in sorted(by_workspace.items(), key=lambda i: -i[1])
                )
            ],
        ),
        console,
    )
    idle = idle_report.build(session, replace(params, since=timedelta(days=30))).rows
    coming = idle_report.upcoming_actions(session, params)
    due = {row["key_hash"] for row in coming if row["acts_on"] <= params.as_of}
    soon = {row["key_hash"] for row in coming if row["acts_on"] <= params.as_of + timedelta(days=7)} - due
    console.print(
        f"\n{len(idle)} keys have had no new use for 30 days or more. Rules act on {len(due)} keys at the next "
        f"run and on {len(soon)} more within 7 days if nothing changes (see the HTML report).",
        highlight=False,
    )
