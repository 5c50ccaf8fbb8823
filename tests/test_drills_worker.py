"""Drills with the worker: an inline enforcement racing a worker's, and the Redis job lock of a
killed worker. Real Redis, a real ``keyhygiene worker`` process, the fake API over HTTP.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from db import leases, runs
from keyhygiene.fakeapi import FakeOpenRouter
from keyhygiene.timeutil import utcnow
from worker.lock import LOCK_KEY

from .celery_support import Deployment, Process, RedisDatabase, wait_until
from .conftest import CliResult
from .drill_support import (
    Drill,
    drill_fixture,
    drill_log_fixture,
    expired_keys,
    outputs_of,
    wait_for_change_in_flight,
)

__all__ = ["drill_fixture", "drill_log_fixture"]  # fixtures

pytestmark = [pytest.mark.celery, pytest.mark.timeout(150)]


def worker_enforcing(
    deploy: Deployment, fake: FakeOpenRouter, cli: Callable[..., CliResult], *worker_options: str
) -> tuple[list[str], CliResult, Process, CliResult]:
    """16 expired keys synced, a worker enforcing them through a slowed API, caught with a change in
    flight: (the doomed hashes, the sync, the worker, the trigger)."""
    doomed = expired_keys(fake, utcnow(), doomed=16)
    synced = cli("sync")
    assert synced.exit_code == 0, synced.stderr
    worker = deploy.start_worker(*worker_options)
    fake.faults.latency = 0.2
    queued = cli("trigger", "enforce")
    assert queued.exit_code == 0, queued.stderr
    wait_for_change_in_flight(deploy.database, what="the worker changing keys")
    return doomed, synced, worker, queued


def test_an_inline_enforcement_while_the_worker_enforces_is_skipped(
    drill: Drill, deploy: Deployment, fake: FakeOpenRouter, cli: Callable[..., CliResult]
) -> None:
    drill.expectation = "the inline enforcement is recorded skipped (exit 1); the worker changes each key once"
    doomed, synced, worker, queued = worker_enforcing(deploy, fake, cli)
    inline = cli("enforce")
    drill.inject("`keyhygiene enforce` inline while the worker's enforcement runs")

    assert inline.exit_code == 1
    assert "enforce skipped: another enforcement holds the enforcement lock" in inline.stderr
    finished = wait_until(
        lambda: (
            (done := [r for r in deploy.runs() if r.kind == "enforce" and r.status in runs.FINAL_STATUSES])
            and len(done) == 2
            and done
        ),
        timeout=60,
        what="both enforcements to be recorded",
    )
    assert sorted((run.started_by, run.status) for run in finished) == [("cli", "skipped"), ("trigger", "ok")]
    assert all(fake.get(key) is None for key in doomed)
    assert all(count == 1 for count in fake.change_counts().values())
    drill.saw(f"worker: ok, {len(doomed)} DELETEs, one per key; inline: skipped, exit 1")
    fake.faults.latency = 0.0
    # The worker's run is recorded before its job ends (its notices, then the lease): wait for that end.
    wait_until(lambda: enforcement_lease_free(deploy), timeout=30, what="the worker's job to release its lease")
    recovery = cli("run")
    assert recovery.exit_code == 0, recovery.stderr
    drill.check(database=deploy.database, fake=fake, outputs=outputs_of(synced, queued, inline, recovery, worker))


def enforcement_lease_free(deploy: Deployment) -> bool:
    with deploy.database.sessions() as session:
        return leases.holder(session, leases.ENFORCEMENT) is None


_HOLDER = """
import sys, time
from worker.lock import JobLock, redis_client
from keyhygiene.timeutil import utcnow
lock = JobLock(redis_client(sys.argv[1]), ttl_seconds=1.0, renew_every=0.2)
assert lock.acquire(kind="run", task_id="killed", now=utcnow())
print("held", flush=True)
time.sleep(600)
"""


def test_a_killed_workers_job_lock_lives_while_it_renews_and_expires_after_its_lease(
    drill: Drill, redis_db: RedisDatabase, tmp_path: Path
) -> None:
    drill.expectation = "renewed while the holder lives; gone within the lease (here 1 s) after SIGKILL"
    redis_db.flush()
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, redis_db.url], stdout=subprocess.PIPE, cwd=tmp_path)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"held"
        observed: list[int] = []
        renewals = [0]

        def renewed_five_times() -> bool:
            ttl = int(redis_db.client.pttl(LOCK_KEY))
            assert ttl > 0, "the lock of a live holder expired"
            if observed and ttl > observed[-1]:
                renewals[0] += 1  # the expiry moved out again
            observed.append(ttl)
            return renewals[0] >= 5  # five renewals: more than one lease

        wait_until(renewed_five_times, timeout=20, interval=0.05, what="the holder to renew its lock")
        holder.kill()
        holder.wait(timeout=10)
        drill.inject("SIGKILL of the process holding the Redis job lock")
        wait_until(lambda: not redis_db.client.exists(LOCK_KEY), timeout=3, interval=0.05, what="the lock to expire")
        drill.saw("renewed 5 times while alive; expired within the lease after the kill")
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=10)
        if holder.stdout is not None:
            holder.stdout.close()
    drill.checked = True  # no API or database involved: the figures are the fault alone


def test_a_sigterm_to_the_whole_worker_group_lets_the_change_in_flight_finish_and_records_the_run_aborted(
    drill: Drill, deploy: Deployment, fake: FakeOpenRouter, cli: Callable[..., CliResult]
) -> None:
    drill.expectation = (
        "as systemd stops a service (SIGTERM to every process of the group, the pool's too): the change "
        "in flight completes and is recorded, the rest are recorded not reached, the run aborted"
    )
    doomed, synced, worker, queued = worker_enforcing(deploy, fake, cli)
    drill.inject("SIGTERM to the worker's process group while a change is in flight")
    worker.kill(signal.SIGTERM)

    worker.popen.wait(timeout=60)
    (run,) = [run for run in deploy.runs() if run.kind == "enforce"]
    drill.saw(f"worker exit {worker.popen.returncode}; run {run.status}: {run.message}")
    # Before, the pool process raised SystemExit wherever the job was: run failed, change pending.
    assert run.status == "aborted" and "SIGTERM" in (run.message or ""), run.message
    actions = deploy.actions()
    assert not [action for action in actions if action.outcome == "pending"]
    done = [action for action in actions if action.outcome == "done"]
    not_reached = [action for action in actions if action.outcome == "skipped"]
    assert done and all(fake.get(action.key_hash) is None for action in done)
    assert len(done) + len(not_reached) == len(doomed), [(a.outcome, a.reason) for a in actions]
    assert all("not reached" in (action.reason or "") for action in not_reached)
    assert drill.repeated_calls(fake) == 0
    assert "Traceback" not in worker.stderr_path.read_text()
    fake.faults.latency = 0.0
    recovery = cli("run")
    assert recovery.exit_code == 0, recovery.stderr
    assert all(fake.get(key) is None for key in doomed)
    drill.check(database=deploy.database, fake=fake, outputs=outputs_of(synced, queued, recovery, worker))


def test_a_sigterm_to_a_solo_pool_worker_is_a_warm_shutdown_that_lets_its_job_finish(
    drill: Drill, deploy: Deployment, fake: FakeOpenRouter, cli: Callable[..., CliResult]
) -> None:
    drill.expectation = "--pool solo runs the job in the worker's own process: SIGTERM waits for the job to end"
    doomed, synced, worker, queued = worker_enforcing(deploy, fake, cli, "--pool", "solo")
    drill.inject("SIGTERM to a --pool solo worker while a change is in flight")
    worker.kill(signal.SIGTERM)

    worker.popen.wait(timeout=60)
    (run,) = [run for run in deploy.runs() if run.kind == "enforce"]
    drill.saw(f"worker exit {worker.popen.returncode}; run {run.status}")
    assert run.status == "ok", run.message
    assert all(fake.get(key) is None for key in doomed)
    assert drill.repeated_calls(fake) == 0
    fake.faults.latency = 0.0
    recovery = cli("run")
    assert recovery.exit_code == 0, recovery.stderr
    drill.check(database=deploy.database, fake=fake, outputs=outputs_of(synced, queued, recovery, worker))
