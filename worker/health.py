"""Liveness of a worker, for an orchestrator: ``python -m worker.health [--file F] [--max-age S]``.

``keyhygiene worker`` touches a heartbeat file every few seconds from its consumer's event loop,
and only while it is connected to the broker and consuming. This check exits 0 when the file is
fresh and 1 (with one line saying why) when it is missing or stale. It imports nothing heavy, so it
is cheap to run every few seconds.

The worker must use a pool that keeps the main process free while a job runs (``prefork``, the
default, or ``threads``): with ``--pool solo`` the loop, and so the heartbeat, stops during a job.
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


def touch(path: Path) -> None:
    """Record that the worker is alive now."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


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
        return False, f"no heartbeat at {path}: the worker has not started consuming"
    if age > max_age:
        return False, f"last heartbeat {age:.0f}s ago (more than {max_age:g}s): the worker is not consuming"
    return True, f"alive: last heartbeat {age:.0f}s ago"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.health", description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=DEFAULT_HEARTBEAT_FILE, help="the worker's heartbeat file")
    parser.add_argument("--max-age", type=float, default=DEFAULT_MAX_AGE, help="seconds (default %(default)s)")
    args = parser.parse_args(argv)
    alive, message = check(args.file, args.max_age)
    print(message, file=sys.stdout if alive else sys.stderr)
    return 0 if alive else 1


if __name__ == "__main__":
    sys.exit(main())
