"""Drills of the schedule and the broker: two beat processes by mistake, and a job redelivered after
its worker died. Real Redis, real ``keyhygiene worker`` and ``keyhygiene beat`` processes, the fake
API over HTTP.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kombu import Connection

from db import leases, runs
from db.models import Run
from keyhygiene.fakeapi import FakeOpenRouter
from keyhygiene.timeutil import utcnow
from worker.limits import TimeLimits
from worker.lock import LOCK_KEY

from .celery_support import Deployment, let_the_enforcement_hold_pass, wait_until
from .conftest import CliResult
from .drill_support import Drill, drill_fixture, drill_log_fixture, expired_keys, outputs_of

__all__ = ["drill_fixture", "drill_log_fixture"]  # fixtures

pytestmark = [pytest.mark.celery, pytest.mark.timeout(180)]

EVERY_MINUTE = "* * * * *"
# kombu's Redis transport keeps a delivered, unacknowledged message in this hash until it is acked.
UNACKED = "unacked"


def _final_beat_runs(deploy: Deployment) -> list[Run]:
    return [run for run in deploy.runs() if run.started_by == "beat" and run.status in runs.FINAL_STATUSES]


def test_two_beats_by_mistake_run_the_job_once_and_record_the_other_skipped(
    drill: Drill, deploy: Deployment, fake: FakeOpenRouter, cli: Callable[..., CliResult]
) -> None:
    drill.expectation = (
        "for the minute both beats fire, one run is recorded ok and the other skipped (the Redis job "
        "lock); each expired key is deleted once"
    )
    doomed = expired_keys(fake, utcnow(), doomed=8)
    # Two pool processes, so both beats' messages are taken at once and race for the job lock (with
    # one process they would simply run one after the other, the second finding nothing to do).
    worker = deploy.start_worker("--concurrency", "2")
    fake.faults.latency = 0.1
    # Both beats must set up their schedules within the same minute to fire for the same one.
    wait_until(lambda: datetime.now(UTC).second < 45, timeout=20, interval=0.5, what="a minute's first 45 s")
    beats = [deploy.start_beat(name=name, KEYHYGIENE_SCHEDULE=EVERY_MINUTE) for name in ("beat-a", "beat-b")]
    drill.inject("two `keyhygiene beat` processes, each with its own schedule file, on a one-minute schedule")
    due = {
        beat.wait_for_event(
            lambda e: e.get("event") == "beat_next_run" and e.get("job") == "hygiene-run",
            timeout=30,
            what="the run's next due time",
        )["due_at"]
        for beat in beats
    }
    assert len(due) == 1, f"the beats are due at different minutes: {due}"

    both = wait_until(
        lambda: (done := _final_beat_runs(deploy)) and len(done) >= 2 and done,
        timeout=100,
        what="both beats' runs to be recorded",
    )
    for beat in beats:
        beat.stop(timeout=5)

    assert sorted(run.status for run in both) == [runs.OK, runs.SKIPPED]
    skipped = next(run for run in both if run.status == runs.SKIPPED)
    assert "another job holds the lock" in (skipped.message or "")
    assert all(fake.get(key) is None for key in doomed)
    assert sorted(fake.change_counts().values()) == [1] * len(doomed), "each key deleted exactly once"
    drill.saw(f"both beats due at {due.pop()}; runs: ok + skipped; {len(doomed)} DELETEs, one per key")
    fake.faults.latency = 0.0
    recovery = cli("run")
    assert recovery.exit_code == 0, recovery.stderr
    drill.check(database=deploy.database, fake=fake, outputs=outputs_of(recovery, worker, *beats))


def test_a_beat_killed_right_after_sending_the_run_does_not_send_it_again_when_restarted(
    deploy: Deployment,
) -> None:
    """Beat writes its schedule file after each job it sends (Celery's default: every 3 minutes).
    A beat SIGKILLed right after sending the run (an OOM kill, say) and started again
    finds that run sent: it is next due a period later, not at once a second time."""

    def next_run(event: dict[str, Any]) -> bool:
        return event.get("event") == "beat_next_run" and event.get("job") == "hygiene-run"

    beat = deploy.start_beat(KEYHYGIENE_SCHEDULE=EVERY_MINUTE)
    first = beat.wait_for_event(next_run, timeout=30, what="the run's first due time")["due_at"]
    sent = beat.wait_for_event(
        lambda event: next_run(event) and event["due_at"] > first, timeout=90, what="the run sent (then due again)"
    )["due_at"]
    beat.kill()  # no clean stop, which would write the schedule file too
    beat.popen.wait(timeout=10)
    restarted = deploy.start_beat(KEYHYGIENE_SCHEDULE=EVERY_MINUTE)  # the same schedule file

    due = restarted.wait_for_event(next_run, timeout=30, what="the restarted beat's due time")["due_at"]
    restarted.stop(timeout=5)

    assert due == sent, f"sent for {first}, then due again at {due} after the restart"


def test_a_job_redelivered_after_its_worker_was_killed_repeats_no_change(
    drill: Drill,
    deploy: Deployment,
    fake: FakeOpenRouter,
    cli: Callable[..., CliResult],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker is really SIGKILLed mid-enforcement and its message really is left unacknowledged
    in Redis. The deployment's visibility timeout is by construction longer than the hard time limit
    plus the job lock's 90 s lease (at least ~7 minutes, see worker.limits), too long to wait for in
    a drill, so the drill does at once what the Redis transport and the lease do when that time has
    passed: kombu's own ``restore_visible`` (with a zero visibility timeout) puts the message back on
    the queue, and the killed job's Redis lock is removed as its lease expiry would (that expiry is
    drilled in test_drills_worker.py).
    """
    drill.expectation = (
        "the redelivered enforcement runs once more and repeats no change: keys the first attempt "
        "deleted are found gone by the fresh check, the rest deleted once; the killed run is recorded "
        "aborted by the next run"
    )
    doomed = expired_keys(fake, utcnow(), doomed=12)
    synced = cli("sync")
    assert synced.exit_code == 0, synced.stderr
    first_worker = deploy.start_worker(name="worker-a")
    fake.faults.latency = 0.3
    queued = cli("trigger", "enforce")
    assert queued.exit_code == 0, queued.stderr

    def a_key_deleted() -> bool:
        return any(call.method == "DELETE" and call.succeeded for call in fake.calls)

    wait_until(a_key_deleted, timeout=60, interval=0.05, what="the worker to delete a key")
    first_worker.kill()
    first_worker.popen.wait(timeout=10)
    drill.inject("SIGKILL of the worker's process group while its enforcement deletes keys")
    [abandoned] = [run for run in deploy.runs() if run.kind == "enforce"]
    assert abandoned.status == runs.RUNNING
    assert deploy.redis_db.client.hlen(UNACKED) == 1, "the killed job's message is left unacknowledged"
    assert TimeLimits.from_settings(deploy.settings()).visibility_timeout > 6 * 60

    # The API still carries out the request the killed worker had sent: as after a real visibility
    # timeout, it is long done when the job comes back.
    wait_until(lambda: fake.in_flight == 0, timeout=10, interval=0.02, what="the API to answer the killed worker")
    deleted_before = {path for (method, path), count in fake.change_counts().items() if method == "DELETE"}
    assert 0 < len(deleted_before) < len(doomed), "killed part-way through"
    calls_before = len(fake.calls)
    fake.faults.latency = 0.0
    assert deploy.redis_db.client.delete(LOCK_KEY) == 1  # the lease expiry, ahead of time
    let_the_enforcement_hold_pass(deploy.database)  # ... and the hold of the change it had in flight
    with Connection(deploy.broker_url, transport_options={"visibility_timeout": 0}) as connection:
        connection.default_channel.qos.restore_visible()
    assert deploy.redis_db.client.hlen(UNACKED) == 0, "the message is back on the queue"
    drill.inject("redelivery of the unacknowledged message (the visibility timeout reached)")
    second_worker = deploy.start_worker(name="worker-b")

    redelivered = wait_until(
        lambda: next(
            (
                run
                for run in deploy.runs()
                if run.task_id == abandoned.task_id and run.id != abandoned.id and run.status in runs.FINAL_STATUSES
            ),
            None,
        ),
        timeout=60,
        what="the redelivered enforcement to be recorded",
    )
    assert redelivered.status == runs.OK, redelivered.message

    def lease_free() -> bool:
        with deploy.database.sessions() as session:
            return leases.holder(session, leases.ENFORCEMENT) is None

    assert all(fake.get(key) is None for key in doomed)
    counts = fake.change_counts()
    assert max(counts.values()) == 1, f"a destructive call was repeated: {counts}"
    assert sorted(path for _, path in counts) == sorted(doomed)
    checked_again = {
        call.path.rsplit("/", 1)[-1]
        for call in fake.calls[calls_before:]
        if call.method == "GET" and call.path.startswith("/keys/") and call.status == 404
    }
    assert deleted_before <= checked_again, "the keys deleted before the kill were checked fresh, and found gone"
    drill.saw(
        f"{len(deleted_before)} of {len(doomed)} keys deleted before the kill; the redelivered run (same task id) "
        f"ok, deleting the other {len(doomed) - len(deleted_before)}; every key DELETEd once"
    )

    # The next run treats a run 'running' for over twice the job time limit as abandoned: with a
    # 1 s limit here, the killed run (started seconds ago) is that old, or soon is: on a fast
    # machine all of the above may take less than 2 s (it did once).
    monkeypatch.setenv("KEYHYGIENE_JOB_TIME_LIMIT", "1s")
    wait_until(
        lambda: utcnow() - abandoned.started_at > timedelta(seconds=2.5),
        timeout=10,
        what="the killed run to be older than twice the job time limit",
    )
    # The redelivered job records its run and then lets go of the enforcement lock: wait for that.
    wait_until(lease_free, timeout=30, what="the redelivered job to release the enforcement lock")
    recovery = cli("run")
    assert recovery.exit_code == 0, recovery.stderr
    [after] = [run for run in deploy.runs() if run.id == abandoned.id]
    assert after.status == runs.ABORTED
    drill.saw("the killed run recorded aborted by the next run, which succeeded")
    drill.check(
        database=deploy.database,
        fake=fake,
        outputs=outputs_of(synced, queued, recovery, first_worker, second_worker),
    )
