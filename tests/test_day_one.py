"""A new operator's first steps, as they trip: the demo's printed commands, a report before any
database exists, and a trigger that waits with no worker running."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .celery_support import Deployment, PrivateRedis, keyhygiene_executable, wait_until

BIN = Path(sys.executable).parent


def clean_environment(**extra: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith(("KEYHYGIENE_", "OPENROUTER_"))}
    env.update(extra)
    return env


def test_the_demo_commands_work_as_printed_without_an_activated_virtualenv(tmp_path: Path) -> None:
    # The shell of someone who ran scripts/demo: the virtualenv is not on PATH.
    path = os.pathsep.join(part for part in os.environ["PATH"].split(os.pathsep) if Path(part) != BIN)
    env = clean_environment(PATH=path)
    demo = subprocess.run(
        [str(BIN / "keyhygiene"), "demo", "--keys", "20", "--days", "3"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert demo.returncode == 0, demo.stderr
    explore = demo.stdout.split("Explore further:\n", 1)[1].splitlines()
    commands = [line.strip() for line in explore if line.strip()]
    assert commands[0].startswith("export ") and len(commands) >= 4
    assert not any(command.startswith("keyhygiene ") for command in commands), "keyhygiene is not on this PATH"
    for command in commands[1:]:
        done = subprocess.run(
            ["bash", "-c", f"set -e; {commands[0]}; {command}"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"{command!r} failed as printed:\n{done.stderr}"


def test_a_report_in_an_empty_directory_says_to_migrate_and_creates_no_database(tmp_path: Path) -> None:
    done = subprocess.run(
        [keyhygiene_executable(), "report", "inventory"],
        cwd=tmp_path,
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "keyhygiene db upgrade" in done.stderr and "keyhygiene.db" in done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.celery
@pytest.mark.timeout(120)
def test_trigger_wait_with_no_worker_says_so_within_seconds(deploy: Deployment) -> None:
    waiting = subprocess.run(
        [keyhygiene_executable(), "trigger", "sync", "--wait", "--timeout", "20"],
        cwd=deploy.directory,
        env=deploy.env(),
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert waiting.returncode == 1
    notice = re.search(r"no worker answered within (\d+)s", waiting.stderr)
    assert notice, waiting.stderr
    # The logs are JSON here (stderr is no terminal): so is the notice, a no_worker_answered event,
    # and the failing command's last line, a command_failed event.
    *logged, last = waiting.stderr.splitlines()
    assert all(line.startswith("{") for line in logged), waiting.stderr
    assert json.loads(last)["event"] == "command_failed", waiting.stderr
    assert any('"event": "no_worker_answered"' in line for line in logged)
    assert int(notice.group(1)) <= 5
    # Said before the wait ran out, not instead of it: the job stays queued for a worker, an hour at most.
    assert waiting.stderr.index("no worker answered") < waiting.stderr.index("gave up waiting")
    assert "for 60 minutes at most, then it is dropped unrun" in waiting.stderr
    assert (
        "has no run recorded yet: it is still queued (dropped unrun if no worker starts it within 60 minutes "
        "of being queued), or the worker could not record it"
    ) in waiting.stderr


@pytest.mark.celery
def test_trigger_wait_counts_queueing_and_the_worker_ping_against_its_timeout(
    deploy: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wait began only after the job was queued and the workers pinged (3 s with none): with
    --timeout 2 it waited until 5 s. A clock of the test's own counts the seconds, so that nothing
    here depends on how fast the machine is: the ping advances it by the time it was given, each
    pause of the wait by its length. The job is queued on the real broker."""
    from keyhygiene.settings import load_settings
    from worker import trigger

    clock = [0.0]

    def ping(settings: Any, *, timeout: float = trigger.WORKER_PING_TIMEOUT) -> bool:
        clock[0] += timeout
        return False  # no worker runs (the ping itself is the test above's)

    def pause(seconds: float) -> None:
        clock[0] += seconds

    monkeypatch.setattr(trigger.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(trigger.time, "sleep", pause)
    monkeypatch.setattr(trigger, "workers_answer", ping)
    for name, value in deploy.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(deploy.directory)

    outcome = trigger.trigger_job(load_settings(), "sync", dry_run=False, wait=True, timeout=2, echo=lambda _: None)

    assert outcome is not None and outcome.exit_code == 1
    assert "gave up waiting after 2s" in outcome.message
    assert clock[0] <= 2 + trigger.POLL_INTERVAL  # not 3 s of ping and then 2 s of wait


@pytest.mark.celery
@pytest.mark.timeout(120)
def test_interrupting_trigger_wait_says_the_job_goes_on(deploy: Deployment) -> None:
    """Ctrl-C or SIGTERM on `trigger --wait` said "error: aborted", as if the job had been stopped:
    only the wait was, and the job still runs when a worker takes it."""
    out, err = deploy.directory / "trigger.stdout", deploy.directory / "trigger.stderr"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        waiting = subprocess.Popen(
            [keyhygiene_executable(), "trigger", "sync", "--wait", "--timeout", "60"],
            cwd=deploy.directory,
            env=deploy.env(),
            stdout=stdout,
            stderr=stderr,
        )
    try:
        wait_until(lambda: "no worker answered" in err.read_text(), timeout=30, what="the wait to begin")
        waiting.send_signal(signal.SIGINT)
        assert waiting.wait(timeout=30) == 1
    finally:
        if waiting.poll() is None:
            waiting.kill()
    task_id = re.search(r"as task (\S+)", out.read_text())
    assert task_id, out.read_text()
    said = err.read_text()
    assert f"stopped waiting (interrupted): task {task_id.group(1)} is not stopped" in said, said
    assert "aborted" not in said


@pytest.mark.celery
def test_the_worker_ping_of_trigger_wait_ends_within_its_own_time_when_the_broker_stalls(
    deploy: Deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker that accepts the request and never answers (frozen) held the ping for the worker's
    30 s socket timeout: `trigger --wait --timeout 6` took 30 s."""
    import threading

    from keyhygiene.settings import load_settings
    from worker import trigger

    private = PrivateRedis(tmp_path)
    private.start()
    try:
        for name, value in deploy.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("KEYHYGIENE_BROKER_URL", private.url)
        settings = load_settings()
        assert private.process is not None
        os.kill(private.process.pid, signal.SIGSTOP)
        answers: list[bool] = []
        pinging = threading.Thread(target=lambda: answers.append(trigger.workers_answer(settings, timeout=1)))
        pinging.start()
        # Bounded well under the 30 s it took: the ping gives up within its own second and some.
        wait_until(lambda: not pinging.is_alive(), timeout=12, what="the ping to give up")
        assert answers == [True]  # a broker hiccup only skips the warning; the wait goes on
    finally:
        if private.process is not None:
            os.kill(private.process.pid, signal.SIGCONT)
        private.stop()
