"""Drills against processes and infrastructure: ``keyhygiene`` commands run as real subprocesses
against the fake (served over HTTP, slowed down) and are signalled, raced or cut off from their
database at a moment the test waits for (a run or snapshot row ``running``, an intent ``pending``).
Each ends with the invariants of tests/drill_support.py and a next run that succeeds.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select as io_select
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from db import leases
from db.migrate import upgrade
from db.models import Action, Lease, Run, Snapshot
from keyhygiene import logging as khlog
from keyhygiene.context import Database
from keyhygiene.enforcement import enforce_snapshot
from keyhygiene.fakeapi import FakeOpenRouter
from keyhygiene.lease import EnforcementLease, LeaseLost
from keyhygiene.rules import load_rules
from keyhygiene.settings import Settings
from keyhygiene.shutdown import Terminated
from keyhygiene.timeutil import utcnow

from .celery_support import LIVE_RULES, Process, let_the_enforcement_hold_pass, wait_until
from .conftest import MANAGEMENT_KEY, POSTGRES_URL, CliResult
from .drill_support import (
    Drill,
    drill_fixture,
    drill_log_fixture,
    expired_keys,
    outputs_of,
    wait_for_change_in_flight,
)

__all__ = ["drill_fixture", "drill_log_fixture"]  # the fixtures ``drill`` and ``drill_log``


class Setup:
    """A database, a live rules file and the environment of ``keyhygiene`` subprocesses."""

    def __init__(self, directory: Path, database_url: str, fake_url: str) -> None:
        self.directory = directory
        self.rules_path = directory / "keyhygiene.toml"
        self.rules_path.write_text(LIVE_RULES)
        self.values = {
            "OPENROUTER_MANAGEMENT_KEY": MANAGEMENT_KEY,
            "OPENROUTER_BASE_URL": fake_url,
            "KEYHYGIENE_DATABASE_URL": database_url,
            "KEYHYGIENE_RULES_FILE": str(self.rules_path),
            "KEYHYGIENE_LOG_FORMAT": "json",
            "KEYHYGIENE_HTTP_RETRY_SECONDS": "5",
        }
        self.database = Database.open(Settings(KEYHYGIENE_DATABASE_URL=database_url), check=False)  # type: ignore[call-arg]
        upgrade(self.database.engine)
        self.processes: list[Process] = []

    def start(self, *args: str, name: str | None = None, **env: str) -> Process:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("KEYHYGIENE_", "OPENROUTER_"))}
        process = Process(
            name or f"{args[0]}-{len(self.processes)}", list(args), {**base, **self.values, **env}, self.directory
        )
        self.processes.append(process)
        return process

    def finish(self, process: Process, timeout: float = 60) -> int:
        return process.popen.wait(timeout=timeout)

    def runs(self) -> list[Run]:
        with self.database.sessions() as session:
            return list(session.scalars(select(Run).order_by(Run.id)))

    def first(self, model: Any, *conditions: Any) -> Any:
        with self.database.sessions() as session:
            return session.scalars(select(model).where(*conditions).limit(1)).first()

    def close(self) -> None:
        for process in self.processes:
            process.stop(timeout=5)
        self.database.close()


@pytest.fixture
def setup(tmp_path: Path, sqlite_url: str, fake_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Setup]:
    """Subprocesses get the environment explicitly; in-process commands (``cli``) read it from here."""
    made = Setup(tmp_path, sqlite_url, fake_url)
    monkeypatch.chdir(tmp_path)
    for name, value in made.values.items():
        monkeypatch.setenv(name, value)
    yield made
    made.close()


def _running_snapshot(setup: Setup) -> Any:
    return setup.first(Snapshot, Snapshot.status == "running")


# -- signals ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
@pytest.mark.parametrize("phase", ["sync", "enforcement"])
def test_an_inline_run_signalled_mid_way(
    sig: int, phase: str, drill: Drill, setup: Setup, fake: FakeOpenRouter, cli: Callable[..., CliResult]
) -> None:
    name = signal.Signals(sig).name
    drill.expectation = (
        "SIGTERM: a change in flight completes and is recorded first; the run (and a snapshot being "
        "taken) recorded aborted, exit 1"
        if sig == signal.SIGTERM
        else "SIGKILL: nothing to record; the next run settles the change in flight and takes the lock over at once "
        "(in enforcement: once the change in flight surely ended; a run before that is skipped)"
    )
    doomed = expired_keys(fake, utcnow())
    fake.faults.latency = 0.25  # every request takes a while: the signal lands mid-way
    process = setup.start("run")
    if phase == "sync":
        wait_until(lambda: _running_snapshot(setup), timeout=30, interval=0.05, what="a snapshot being taken")
    else:
        wait_for_change_in_flight(setup.database, what="a change in flight")
    drill.inject(f"{name} during {phase}")
    process.kill(sig)

    code = setup.finish(process, timeout=15)
    run = setup.runs()[0]
    drill.saw(f"exit {code}; run {run.status}")
    if sig == signal.SIGTERM:
        assert code == 1
        assert run.status == "aborted" and "SIGTERM" in (run.message or "")
        assert "Traceback" not in process.stderr_path.read_text()
        if phase == "sync":
            snapshot = setup.first(Snapshot)
            assert snapshot.status == "failed"
            drill.saw(f"snapshot {snapshot.status} ({snapshot.error})")
        else:  # the stop waited for the change in flight, and its outcome is in the audit log
            assert not [a for a in _actions(setup) if a.outcome == "pending"]
            assert drill.repeated_calls(fake) == 0
            drill.saw("the change in flight was recorded before the exit")
    else:
        assert code == -signal.SIGKILL
        assert run.status == "running"  # the process could record nothing
        # The API still carries out a request the killed process had sent (here after the fake's
        # latency); the next run comes after that, as a scheduled one would.
        wait_until(lambda: fake.in_flight == 0, timeout=10, interval=0.02, what="the API to answer the killed run")
    repeated = drill.repeated_calls(fake)

    fake.faults.latency = 0.0
    if sig == signal.SIGKILL and phase == "enforcement":
        # Its change may still land at the API for as long as one may take (its fence's hold): until
        # then the lock stays the dead process's, and a run is skipped rather than settle that
        # change as not made and send it again. Then the hold passes (moved here, not waited for).
        early = cli("run")
        assert early.exit_code == 1, early.stderr
        assert setup.runs()[-1].status == "skipped"
        drill.saw("a run started at once is skipped: the dead holder's change may still be in flight")
        with setup.database.writer() as session, session.begin():
            session.execute(update(Lease).values(expires_at=utcnow() + timedelta(seconds=30)))
    recovery = cli("run")
    assert recovery.exit_code == 0, recovery.stderr
    assert all(fake.get(key) is None for key in doomed)
    settled = [a for a in _actions(setup) if a.reason and "settled after a crash or a lost answer" in a.reason]
    drill.saw(f"next run exit 0; {len(settled)} change(s) in flight settled from the fresh state")
    drill.check(database=setup.database, fake=fake, outputs=outputs_of(process, recovery), repeated=repeated)


def _actions(setup: Setup) -> list[Action]:
    with setup.database.sessions() as session:
        return list(session.scalars(select(Action).order_by(Action.id)))


# -- two enforcements at once ---------------------------------------------------------------------


def test_two_inline_enforcements_at_once_change_each_key_once(
    drill: Drill, setup: Setup, fake: FakeOpenRouter, cli: Callable[..., CliResult]
) -> None:
    drill.expectation = "one enforcement changes the keys; the other is recorded skipped, exit 1, and changes nothing"
    doomed = expired_keys(fake, utcnow(), doomed=16)
    sync = cli("sync")
    assert sync.exit_code == 0, sync.stderr
    fake.faults.latency = 0.2
    first = setup.start("enforce", name="first")
    wait_for_change_in_flight(setup.database, what="the first enforcement changing keys")
    second = setup.start("enforce", name="second")
    drill.inject("a second `keyhygiene enforce` while the first one runs")

    assert setup.finish(second) == 1, second.tail()
    assert setup.finish(first) == 0, first.tail()

    statuses = sorted(run.status for run in setup.runs() if run.kind == "enforce")
    assert statuses == ["ok", "skipped"]
    skipped = next(run for run in setup.runs() if run.status == "skipped")
    assert "another enforcement holds the enforcement lock" in (skipped.message or "")
    assert all(fake.get(key) is None for key in doomed)
    assert all(count == 1 for count in fake.change_counts().values())
    drill.saw(f"runs: {', '.join(statuses)}; {len(fake.change_counts())} DELETEs, one per key")
    fake.faults.latency = 0.0
    recovery = cli("run")
    assert recovery.exit_code == 0, recovery.stderr
    drill.check(database=setup.database, fake=fake, outputs=outputs_of(sync, first, second, recovery))


# -- the lease itself -------------------------------------------------------------------------------


def test_a_live_holder_keeps_the_lease_and_a_dead_one_on_another_host_loses_it_after_its_ttl(
    database: Database,
) -> None:
    holder = EnforcementLease(database, job="run", ttl=timedelta(seconds=1), renew_every=timedelta(seconds=0.2))
    assert holder.acquire()
    try:
        renewals: list[Any] = []

        def renewed_three_times() -> bool:
            with database.sessions() as session:
                current = leases.holder(session, leases.ENFORCEMENT)
            assert current is not None and current.token == holder.token
            if current.renewed_at not in renewals:
                renewals.append(current.renewed_at)
            assert not EnforcementLease(database, job="enforce").acquire(), "taken while its holder lives"
            return len(renewals) >= 6  # more than one TTL of renewals

        wait_until(renewed_three_times, timeout=20, interval=0.1, what="the heartbeat to renew the lease")
    finally:
        holder.release()

    # A holder on another machine that stopped renewing: taken over once its lease has expired.
    with database.writer() as session, session.begin():
        session.execute(
            update(Lease).values(
                token="elsewhere",
                host="other-host",
                pid=1,
                process_space="other",
                expires_at=utcnow() + timedelta(seconds=60),
            )
        )
    assert not EnforcementLease(database, job="enforce").acquire()
    with database.writer() as session, session.begin():
        session.execute(update(Lease).values(expires_at=utcnow() - timedelta(seconds=1)))
    taker = EnforcementLease(database, job="enforce")
    assert taker.acquire()
    taker.release()


def test_a_change_in_flight_keeps_the_lease_for_as_long_as_it_may_take(database: Database) -> None:
    # The holder fenced before a change that may take 200 s (a PATCH retried, then a fresh GET),
    # then lost the database: its heartbeat renews nothing. Another process that comes once the
    # 90 s TTL has passed must not take the lease over (and settle that change as not made while
    # its request may still land); once the change surely ended, it may.
    holder = EnforcementLease(database, job="run", renew_every=timedelta(hours=1), hold_for=timedelta(seconds=200))
    assert holder.acquire()
    try:
        fenced_at = utcnow()
        holder.fence()
        holder._renew()  # a heartbeat that got through after the fence does not shorten the hold

        def taken_over_at(seconds: float) -> bool:
            with database.writer() as session, session.begin():
                return leases.try_acquire(
                    session,
                    leases.ENFORCEMENT,
                    token="another-process",
                    host="other-host",
                    pid=1,
                    process_space="other",
                    job="enforce",
                    now=fenced_at + timedelta(seconds=seconds),
                    ttl=timedelta(seconds=90),
                )

        assert not taken_over_at(90 + 5)
        assert not taken_over_at(200 + 5)
        assert taken_over_at(200 + 90 + 5)
    finally:
        holder.release()


def test_a_release_cut_short_by_a_stop_still_ends_the_renewals(database: Database) -> None:
    # A second SIGTERM lands while a job ends, as it asks whether it left a change in doubt: the
    # heartbeat stops all the same, so the lease expires instead of being renewed for as long as
    # the worker process lives (every later enforcement skipped).
    holder = EnforcementLease(database, job="run", ttl=timedelta(seconds=1), renew_every=timedelta(seconds=0.1))
    assert holder.acquire()

    def stopped() -> bool:
        raise Terminated("terminated by SIGTERM")

    with pytest.raises(Terminated):
        holder.release(in_doubt=stopped)

    assert holder._heartbeat is not None and not holder._heartbeat.is_alive()
    taker = EnforcementLease(database, job="enforce")
    wait_until(taker.acquire, timeout=20, interval=0.2, what="the lease to expire")  # not renewed
    taker.release()


def test_a_lease_whose_job_cannot_tell_whether_it_left_a_change_in_doubt_is_kept(database: Database) -> None:
    # The database failed as the job ended: it cannot tell, so the lease is kept (it expires by
    # itself) rather than freed for a job that would settle a change whose request may still land.
    holder = EnforcementLease(database, job="run")
    assert holder.acquire()

    def cannot_tell() -> bool:
        raise OperationalError("SELECT count(*) FROM actions", {}, Exception("server closed the connection"))

    holder.release(in_doubt=cannot_tell)

    with database.sessions() as session:
        kept = leases.holder(session, leases.ENFORCEMENT)
    assert kept is not None and kept.token == holder.token
    assert not EnforcementLease(database, job="enforce").acquire()


def test_a_lost_lease_is_logged_with_the_task_of_its_job(database: Database) -> None:
    """The renewals run in their own thread: before, `enforcement_lock_lost`, an event worth an
    alert, carried no context of the job it was lost under."""
    stream = io.StringIO()
    khlog.configure_logging("json", stream=stream)
    khlog.bind(task_id="task-0f0f", task_name="keyhygiene.enforce")
    holder = EnforcementLease(database, job="enforce", renew_every=timedelta(seconds=0.1))
    try:
        assert holder.acquire()
        with database.writer() as session, session.begin():
            session.execute(update(Lease).values(token="another-process"))  # taken over meanwhile
        wait_until(lambda: "enforcement_lock_lost" in stream.getvalue(), timeout=10, what="the loss to be logged")
    finally:
        khlog.clear()
        holder.release()
    (lost,) = [json.loads(line) for line in stream.getvalue().splitlines() if "enforcement_lock_lost" in line]
    assert (lost["task_id"], lost["task_name"], lost["level"]) == ("task-0f0f", "keyhygiene.enforce", "error")


def test_a_holder_that_lost_its_lease_stops_before_the_next_change(
    drill: Drill, setup: Setup, fake: FakeOpenRouter, cli: Callable[..., CliResult]
) -> None:
    drill.expectation = "the fencing check before the first DELETE fails: nothing changed, LeaseLost"
    expired_keys(fake, utcnow())
    sync = cli("sync")
    assert sync.exit_code == 0, sync.stderr
    stalled = EnforcementLease(setup.database, job="enforce", renew_every=timedelta(hours=1))
    assert stalled.acquire()
    # It stalled past its TTL and another process took the lease over.
    with setup.database.writer() as session, session.begin():
        session.execute(update(Lease).values(expires_at=utcnow() - timedelta(seconds=1)))
    taker = EnforcementLease(setup.database, job="enforce")
    assert taker.acquire()
    drill.inject("the holder's lease expired and was taken over while it was about to change keys")
    fake.clear_calls()
    from keyhygiene.context import open_client

    client = open_client(Settings(**setup.values))  # type: ignore[arg-type]
    snapshot = setup.first(Snapshot, Snapshot.status == "complete")
    try:
        with pytest.raises(LeaseLost):
            enforce_snapshot(
                setup.database,
                client,
                load_rules(setup.rules_path),
                run_id=setup.runs()[0].id,
                snapshot_id=snapshot.id,
                now=utcnow(),
                dry_run=False,
                fence=stalled.fence,
            )
    finally:
        client.close()
        stalled.release()
        taker.release()
    assert fake.change_counts() == {}
    # No intent was written; every planned change is in the audit log as not reached, and logged.
    unreached = _actions(setup)
    assert unreached and {(a.outcome, a.dry_run) for a in unreached} == {("skipped", False)}
    assert all((a.reason or "").startswith("not reached: the run stopped before this change") for a in unreached)
    drill.saw(
        f"LeaseLost raised before any intent was written; no PATCH or DELETE sent; "
        f"the {len(unreached)} planned changes recorded as not reached"
    )
    recovery = cli("run")
    assert recovery.exit_code == 0, recovery.stderr
    drill.check(database=setup.database, fake=fake, outputs=outputs_of(sync, recovery))


# -- the database under the run ---------------------------------------------------------------------


def test_sqlite_locked_by_another_writer(drill: Drill, setup: Setup, fake: FakeOpenRouter, sqlite_url: str) -> None:
    drill.expectation = "the run waits for the write lock (busy timeout) and then completes"
    doomed = expired_keys(fake, utcnow())
    other = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None, timeout=30)
    other.execute("BEGIN IMMEDIATE")
    drill.inject("another process holds SQLite's write lock when the run starts")
    process = setup.start("run")
    database_file = os.path.realpath(sqlite_url.removeprefix("sqlite:///"))

    def has_the_database_open() -> bool:
        try:
            fds = os.listdir(f"/proc/{process.popen.pid}/fd")
            return any(os.path.realpath(f"/proc/{process.popen.pid}/fd/{fd}") == database_file for fd in fds)
        except OSError:  # it exited, or closed a descriptor while we read them
            return False

    try:
        # The fault lasts 1.5 s from the moment the run has the database open, a few milliseconds
        # before its first write: not a wait for a state, the fault's own duration.
        wait_until(has_the_database_open, timeout=60, interval=0.01, what="the run to open the database")
        time.sleep(1.5)
        assert process.alive and setup.runs() == [], "nothing written while another writer holds the lock"
    finally:
        other.execute("COMMIT")
        other.close()

    assert setup.finish(process) == 0, process.tail()
    assert all(fake.get(key) is None for key in doomed)
    drill.saw("no row written while locked; the run completed once the other writer committed")
    drill.check(database=setup.database, fake=fake, outputs=outputs_of(process))


class CuttableProxy:
    """A TCP proxy to PostgreSQL that the test can cut (every connection closed, no new ones)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.connections: list[socket.socket] = []
        self.open = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self.open:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.open:
                client.close()
                return
            upstream = socket.create_connection(self.target)
            self.connections += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                readable, _, _ = io_select.select([a, b], [], [], 1.0)
                for source in readable:
                    data = source.recv(65536)
                    if not data:
                        return
                    (b if source is a else a).sendall(data)
        except (OSError, ValueError):  # ValueError: ``cut`` closed a socket between two selects
            return

    def cut(self) -> None:
        self.open = False
        self.listener.close()
        for connection in self.connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()

    def restore(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.connections = []
        self.open = True
        threading.Thread(target=self._accept, daemon=True).start()


@pytest.mark.postgres
def test_a_postgresql_connection_cut_mid_enforcement(
    drill: Drill, postgres_url: str, tmp_path: Path, fake: FakeOpenRouter, fake_url: str
) -> None:
    drill.expectation = (
        "the run fails (exit 1, one line, no traceback); the change in flight stays pending and the next run "
        "settles it from the key's fresh state"
    )
    from sqlalchemy.engine import make_url

    real = make_url(POSTGRES_URL)
    proxy = CuttableProxy((real.host or "127.0.0.1", real.port or 5432))
    proxied = postgres_url.replace(f"{real.host}:{real.port}", f"127.0.0.1:{proxy.port}")
    setup = Setup(tmp_path, postgres_url, fake_url)
    try:
        doomed = expired_keys(fake, utcnow())
        fake.faults.latency = 0.4
        process = setup.start("run", KEYHYGIENE_DATABASE_URL=proxied)
        wait_for_change_in_flight(setup.database, what="a change in flight")
        proxy.cut()
        drill.inject("the PostgreSQL connection cut (TCP proxy closed) with a DELETE in flight")

        assert setup.finish(process) == 1
        stderr = process.stderr_path.read_text()
        assert "Traceback" not in stderr
        drill.saw(f"exit 1: {[line for line in stderr.splitlines() if line.startswith('keyhygiene:')]}")
        repeated = drill.repeated_calls(fake)

        proxy.restore()
        fake.faults.latency = 0.0
        # It could not free the lease (nor record the change's outcome): the lease stays held for as
        # long as that change may take, which the drill lets pass at once.
        let_the_enforcement_hold_pass(setup.database)
        recovery = setup.start("run", name="recovery", KEYHYGIENE_DATABASE_URL=proxied)
        assert setup.finish(recovery) == 0, recovery.tail()
        assert all(fake.get(key) is None for key in doomed)
        drill.saw("next run exit 0: the lock of the exited process taken over, the change in flight settled")
        drill.check(database=setup.database, fake=fake, outputs=outputs_of(process, recovery), repeated=repeated)
    finally:
        proxy.cut()
        setup.close()
