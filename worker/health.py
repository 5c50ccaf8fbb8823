"""Liveness of a worker or beat, for an orchestrator: ``python -m worker.health [--file F] [--max-age S]``.

``keyhygiene worker`` touches a heartbeat file every few seconds from its consumer's event loop,
and only while it is connected to the broker and consuming; ``keyhygiene beat --heartbeat-file F``
touches one on every tick of its scheduler. On a clean stop the file says so. This check exits 0
when the file is fresh and 1 (with one line saying why) when it is missing, stale or says stopped.
It imports nothing heavy, so it is cheap to run every few seconds.

The worker must use a pool that keeps the main process free while a job runs (``prefork``, the
default; ``keyhygiene worker`` refuses the others but ``solo``): with ``--pool solo`` the loop, and
so the heartbeat, stops during a job.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_HEARTBEAT_FILE = Path(tempfile.gettempdir()) / "keyhygiene-worker.heartbeat"
HEARTBEAT_INTERVAL = 5.0
DEFAULT_MAX_AGE = 60.0


STOPPED = "stopped"


def touch(path: Path) -> None:
    """Record that the process is alive now."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        path.write_text("")  # a restart after a clean stop: alive again
    path.touch()


def mark_stopped(path: Path) -> None:
    """Record that the process stopped cleanly (the check then says "stopped", not "not started")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{STOPPED} at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n")


def _stopped_line(path: Path) -> str | None:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return None
    return text if text.startswith(STOPPED) else None


def heartbeat_age(path: Path, *, now: float | None = None) -> float | None:
    """Seconds since the worker's last heartbeat, or None if it has never written one."""
    try:
        written = path.stat().st_mtime
    except FileNotFoundError:
        return None
    return max(0.0, (time.time() if now is None else now) - written)


def check(path: Path, max_age: float) -> tuple[bool, str]:
    """Whether the worker is alive, and one line saying so or why not."""
    age = heartbeat_age(path)
    if age is None:
        return False, f"no heartbeat at {path}: the process has not started (or not yet connected to the broker)"
    stopped = _stopped_line(path)
    if stopped is not None:
        return False, f"{stopped}: the process shut down cleanly and is not running"
    if age > max_age:
        return False, (
            f"last heartbeat {age:.0f}s ago (more than {max_age:g}s): the process is stuck or cut off from the broker"
        )
    return True, f"alive: last heartbeat {age:.0f}s ago"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.health", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--file", type=Path, default=DEFAULT_HEARTBEAT_FILE, help="the heartbeat file (worker/beat --heartbeat-file)"
    )
    parser.add_argument("--max-age", type=float, default=DEFAULT_MAX_AGE, help="seconds (default %(default)s)")
    args = parser.parse_args(argv)
    alive, message = check(args.file, args.max_age)
    print(message, file=sys.stdout if alive else sys.stderr)
    return 0 if alive else 1


if __name__ == "__main__":
    sys.exit(main())
