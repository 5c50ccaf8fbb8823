"""A new operator's first steps, as they trip: the demo's printed commands, a report before any
database exists, and a trigger that waits with no worker running."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .celery_support import Deployment, keyhygiene_executable

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
    assert int(notice.group(1)) <= 5
    # Said before the wait ran out, not instead of it: the job stays queued for a worker, an hour at most.
    assert waiting.stderr.index("no worker answered") < waiting.stderr.index("gave up waiting")
    assert "for 60 minutes at most, then it is dropped unrun" in waiting.stderr
    assert (
        "has no run recorded yet: it is still queued (dropped unrun if no worker starts it within 60 minutes "
        "of being queued), or the worker could not record it"
    ) in waiting.stderr
