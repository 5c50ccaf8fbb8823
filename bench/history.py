"""History benchmark: each report command and `plan`, as a whole process, on the demo's history.

    .venv/bin/python -m bench history [--keys 10000] [--days 365] [--every 1d] [--repeat 3] [--quick]

The history is built with ``keyhygiene demo --keys N --days D --every E`` (snapshots on SQLite) and
kept under the temporary directory, keyed by its size, so later runs reuse it. Each command runs
``--repeat`` times as its own process (``keyhygiene report ...`` against that database, with the
demo's rules file); the table shows the minimum and median wall time and the peak RSS of the
process and its CPU time (user + system, from ``os.wait4``; on a loaded machine the CPU time is the
steadier figure), with the targets beside. Figures are reported, never judged.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

QUICK = (500, 30)


@dataclass(frozen=True, slots=True)
class Command:
    label: str
    args: tuple[str, ...]
    target_seconds: float
    target_mb: int = 300


@dataclass(frozen=True, slots=True)
class Measurement:
    command: Command
    walls: list[float]
    cpus: list[float]
    peak_mb: float
    exit_code: int

    def row(self) -> str:
        target = f"≤ {self.command.target_seconds:g} s / ≤ {self.command.target_mb} MB"
        failed = "" if self.exit_code == 0 else f" (exit {self.exit_code})"
        return (
            f"| `{self.command.label}` | {min(self.walls):.2f} s | {statistics.median(self.walls):.2f} s "
            f"| {statistics.median(self.cpus):.2f} s | {self.peak_mb:.0f} MB | {target} |{failed}"
        )


def commands(days: int, out: Path) -> list[Command]:
    middle = (datetime.now(UTC) - timedelta(days=days / 2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return [
        Command("report inventory", ("report", "inventory", "--format", "json"), 1),
        Command("report inventory --at (mid-history)", ("report", "inventory", "--at", middle, "--format", "json"), 1),
        Command("report spend --since 30d", ("report", "spend", "--since", "30d", "--format", "json"), 1),
        Command("report idle", ("report", "idle", "--format", "json"), 1),
        Command(f"report trends --since {days}d", ("report", "trends", "--since", f"{days}d", "--format", "json"), 1),
        Command("report actions", ("report", "actions", "--format", "json"), 1),
        Command("report html", ("report", "html", "--out", str(out)), 3),
        Command("plan", ("plan",), 2),
        Command("plan --format json", ("plan", "--format", "json"), 2),
    ]


def build_history(keys: int, days: int, every: str = "1d") -> Path:
    """The demo's folder for this size, built once (a ``complete`` marker says it finished)."""
    from db.migrate import head_revision

    # A history is reused only by the schema that built it.
    size = f"{keys}x{days}" + ("" if every == "1d" else f"-every-{every}")
    folder = Path(tempfile.gettempdir()) / f"keyhygiene-bench-history-{size}-{head_revision()}"
    marker = folder / "complete"
    if marker.exists():
        print(f"reusing the history in {folder}")
        return folder
    print(f"building {keys} keys x {days} days, a snapshot every {every}, with `keyhygiene demo`: {folder}", flush=True)
    began = time.monotonic()
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "demo.log").open("wb") as log:
        demo = subprocess.run(
            [*keyhygiene(), "demo", "--dir", str(folder), "--keys", str(keys), "--days", str(days), "--every", every],
            stdout=log,
            stderr=log,
            env=environment(folder),
        )
    # On a large organisation the demo's closing enforcement is refused by the safety caps (exit
    # 3); the history it built is complete all the same.
    if demo.returncode not in (0, 3):
        raise SystemExit(f"keyhygiene demo failed (exit {demo.returncode}); see {folder / 'demo.log'}")
    marker.write_text(f"built in {time.monotonic() - began:.0f} s\n")
    megabytes = (folder / "keyhygiene.db").stat().st_size / 1e6
    print(f"built in {time.monotonic() - began:.0f} s; database {megabytes:.0f} MB")
    return folder


def keyhygiene() -> list[str]:
    return [sys.executable, "-c", "from keyhygiene.cli import main; main()"]


def environment(folder: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("KEYHYGIENE_", "OPENROUTER_"))}
    env["KEYHYGIENE_DATABASE_URL"] = f"sqlite:///{folder / 'keyhygiene.db'}"
    env["KEYHYGIENE_RULES_FILE"] = str(folder / "keyhygiene.toml")
    return env


def measure(command: Command, folder: Path, repeat: int) -> Measurement:
    walls: list[float] = []
    cpus: list[float] = []
    peak = 0.0
    exit_code = 0
    for _ in range(repeat):
        began = time.perf_counter()
        process = subprocess.Popen(
            [*keyhygiene(), *command.args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=environment(folder),
        )
        assert process.stderr is not None
        error = process.stderr.read()
        _, status, usage = os.wait4(process.pid, 0)
        walls.append(time.perf_counter() - began)
        cpus.append(usage.ru_utime + usage.ru_stime)
        process.returncode = os.waitstatus_to_exitcode(status)
        peak = max(peak, usage.ru_maxrss / 1024)  # kilobytes on Linux
        if process.returncode:
            exit_code = process.returncode
            print(error.decode(errors="replace")[-2000:], file=sys.stderr)
    return Measurement(command, walls, cpus, peak, exit_code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench history", description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=10_000, help="keys in the demo organisation (default 10000)")
    parser.add_argument("--days", type=int, default=365, help="days of history (default 365)")
    parser.add_argument("--every", default="1d", help="time between two snapshots: 1d (default), 1h, ...")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each command (default 3)")
    parser.add_argument("--quick", action="store_true", help=f"a small history ({QUICK[0]} keys x {QUICK[1]} days)")
    options = parser.parse_args(argv)
    keys, days = QUICK if options.quick else (options.keys, options.days)
    folder = build_history(keys, days, options.every)
    results = [measure(command, folder, options.repeat) for command in commands(days, folder / "bench.html")]
    cadence = "daily snapshots" if options.every == "1d" else f"days, a snapshot every {options.every}"
    print(f"\n{keys} keys x {days} {cadence}, {options.repeat} runs each (whole processes, SQLite)\n")
    print("| command | wall min | wall median | CPU median | peak RSS | target |")
    print("|---|---|---|---|---|---|")
    for result in results:
        print(result.row())
    return 0 if all(result.exit_code == 0 for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
