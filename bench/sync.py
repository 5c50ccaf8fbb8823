"""``python -m bench sync``: whole-process ``keyhygiene sync`` beside its baselines, in one run.

The fake OpenRouter API runs in a separate process (``python -m keyhygiene.fakeapi``) with a
generated organisation and latency added to every request. Each configuration runs as a fresh
``keyhygiene sync`` process on a fresh database (a temporary SQLite file, or a new PostgreSQL
schema), measured from the outside: wall time, CPU time (user + system) and peak RSS of the
process, and the API requests it reports in its ``sync_complete`` log event. Beside it, in the
same run: the serial loop a user would write with the official ``openrouter`` SDK
(:mod:`bench.sdk_loop`), the latency lower bound of the listing, keyhygiene's own client listing
and storing nothing (:mod:`bench.list_only`: the floor of any sync), and a second sync after 1% of
the keys changed. Repetitions are interleaved, so a burst of load from elsewhere on the machine
spreads over every configuration; the table shows the median and the minimum.

The figures are reported, never judged: this is not a test and does not fail on time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
POSTGRES_URL = os.environ.get(
    "KEYHYGIENE_BENCH_POSTGRES_URL",
    os.environ.get("KEYHYGIENE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
)
DEFAULT_CONCURRENCY = 8
PAGE_SIZE = 100


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench sync",
        description=(
            "Time whole-process `keyhygiene sync` at several concurrencies on SQLite and PostgreSQL, "
            "beside the official SDK's serial loop, the latency lower bound and a second sync after "
            "1%% of the keys changed; the fake API runs in its own process."
        ),
    )
    parser.add_argument("--keys", type=int, help="keys in the fake organisation (default 100000; 20000 with --quick)")
    parser.add_argument("--workspaces", type=int, default=10, help="workspaces they are spread over (default 10)")
    parser.add_argument("--latency", type=float, default=0.02, help="seconds added to every request (default 0.02)")
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        help="KEYHYGIENE_HTTP_CONCURRENCY values to measure (default 1 4 8 16; 8 with --quick)",
    )
    parser.add_argument("--reps", type=int, default=3, help="repetitions of every measurement (default 3)")
    parser.add_argument("--changed", type=float, default=0.01, help="share of keys changed before the second sync")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated organisation (default 0)")
    parser.add_argument("--quick", action="store_true", help="20000 keys, concurrency 8 only: under a minute")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    return parser


# -- processes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    """One process, measured from the outside."""

    wall: float
    cpu: float
    rss_mb: float
    events: dict[str, dict[str, Any]] = field(default_factory=dict)  # the last log event of each name
    stdout: str = ""


def run_measured(command: Sequence[str], env: dict[str, str], cwd: Path) -> Measured:
    """Run ``command`` to completion; its wall time, CPU time and peak RSS, and its JSON log events.

    The peak RSS is the high-water mark (``VmHWM`` in /proc, read every few milliseconds while it
    runs) of the process or of a child of it, whichever is larger. What ``wait4`` reports is never
    less than this harness's own memory when it started the process (Linux counts the parent's
    pages the child shared before it ran its program), about 120 MB at 100,000 keys: it is used
    only where /proc is not."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=err)
        high_water = _HighWater(process.pid)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        high_water.stop()
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}:\n{stdout}\n{stderr[-3000:]}")
    events: dict[str, dict[str, Any]] = {}
    for line in stderr.splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            events[str(event.get("event"))] = event
    rss_mb = high_water.kib / 1024 if high_water.kib else usage.ru_maxrss / 1024
    return Measured(wall, usage.ru_utime + usage.ru_stime, rss_mb, events, stdout)


class _HighWater:
    """The largest ``VmHWM`` of a running process or any child of it (the sync's staging helper),
    read from /proc every 5 ms until it exits."""

    def __init__(self, pid: int) -> None:
        self.kib = 0
        self._pid = pid
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        proc = Path("/proc")
        while not self._stopped.is_set():
            try:
                children = (proc / str(self._pid) / "task" / str(self._pid) / "children").read_text().split()
            except OSError:  # it has exited, or there is no /proc
                return
            for pid in [str(self._pid), *children]:
                try:
                    text = (proc / pid / "status").read_text()
                except OSError:
                    continue
                for line in text.splitlines():
                    if line.startswith("VmHWM:"):
                        self.kib = max(self.kib, int(line.split()[1]))
            self._stopped.wait(0.005)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()


SPEED_PROBE = 'timeit "sum(range(10**6))"'


def machine_speed() -> float:
    """How fast this machine runs plain Python now: the best of 5 times ``sum(range(10**6))``, in ms
    (what ``python -m timeit "sum(range(10**6))"`` prints). keyhygiene is bound by its CPU and the
    SDK loop by the API's latency, so a slower machine moves the ``x SDK loop`` column: runs are
    compared knowing this."""
    return min(timeit.repeat("sum(range(10**6))", number=10, repeat=5)) / 10 * 1000


@contextmanager
def fake_api(keys: int, workspaces: int, latency: float, seed: int, management_key: str) -> Iterator[str]:
    """The fake API in its own process; yields its base URL."""
    command = [
        sys.executable,
        "-m",
        "keyhygiene.fakeapi",
        "--port",
        "0",
        "--keys",
        str(keys),
        "--workspaces",
        str(workspaces),
        "--seed",
        str(seed),
        "--latency",
        str(latency),
        "--management-key",
        management_key,
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        if " at " not in first:
            raise RuntimeError(f"the fake API did not start: {first!r}")
        yield first.split(" at ", 1)[1].split()[0]
    finally:
        process.terminate()
        process.wait(timeout=10)


def clean_env(**settings: str) -> dict[str, str]:
    """The environment without any keyhygiene or OpenRouter setting of the caller's, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYHYGIENE_", "OPENROUTER_"))}
    env.update(settings)
    return env


# -- databases ------------------------------------------------------------------------------------


@contextmanager
def fresh_database(backend: str) -> Iterator[str]:
    """A new, migrated database: a temporary SQLite file or a new PostgreSQL schema, dropped after."""
    from sqlalchemy import create_engine, text

    from db.engine import make_engine
    from db.migrate import upgrade

    if backend == "sqlite":
        with tempfile.TemporaryDirectory(prefix="bench-sync-") as folder:
            url = f"sqlite:///{folder}/keyhygiene.db"
            engine = make_engine(url)
            upgrade(engine)
            engine.dispose()
            yield url
        return
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    try:
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()
        yield url
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def postgres_reachable() -> str | None:
    """None when PostgreSQL answers, else why not."""
    from sqlalchemy import create_engine, text

    try:
        engine = create_engine(POSTGRES_URL)
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as exc:
        return str(exc).splitlines()[0]
    return None


def postgres_described() -> str:
    """The server's version and whether autovacuum runs: it decides when a store's tables get the
    planner statistics the sync's statements are planned from (``db.statistics``)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(POSTGRES_URL)
    try:
        with engine.connect() as connection:
            version = connection.execute(text("SHOW server_version")).scalar_one().split()[0]
            autovacuum = connection.execute(text("SHOW autovacuum")).scalar_one()
    finally:
        engine.dispose()
    return f"PostgreSQL {version} (autovacuum {autovacuum})"


# -- the organisation -----------------------------------------------------------------------------


def survey(base_url: str, management_key: str) -> tuple[list[str], dict[str, int]]:
    """Every key's hash and the keys per workspace, read once before anything is timed (with plain
    httpx, a thread per workspace, so that this works whatever state keyhygiene's client is in)."""
    import httpx

    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {management_key}"}) as http:
        workspaces = [workspace["id"] for workspace in http.get("/workspaces", params={"limit": 100}).json()["data"]]

        def workspace_keys(workspace_id: str) -> list[str]:
            found: list[str] = []
            offset = 0
            while True:
                params = {"workspace_id": workspace_id, "offset": offset, "include_disabled": "true"}
                page = http.get("/keys", params={**params, "include_expired": "true"}).json()["data"]
                found.extend(key["hash"] for key in page)
                if len(page) < PAGE_SIZE:
                    return found
                offset += PAGE_SIZE

        with ThreadPoolExecutor(len(workspaces) or 1) as pool:
            per_workspace = dict(zip(workspaces, pool.map(workspace_keys, workspaces), strict=True))
    return sorted({h for found in per_workspace.values() for h in found}), {
        workspace: len(found) for workspace, found in per_workspace.items()
    }


def change_keys(base_url: str, management_key: str, hashes: list[str], share: float, round_: int) -> int:
    """Rename ``share`` of the keys through the API (PATCH), a different set each round."""
    from keyhygiene.keysapi.client import KeysClient

    step = max(1, round(1 / share)) if share > 0 else len(hashes) + 1
    chosen = hashes[round_ % step :: step]
    with KeysClient(base_url, management_key, concurrency=16) as client, ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key_hash: client.update_key(key_hash, name=f"renamed-{round_}-{key_hash[:8]}"), chosen))
    return len(chosen)


# -- the run --------------------------------------------------------------------------------------


@dataclass
class Series:
    """Repeated measurements of one configuration."""

    runs: list[Measured] = field(default_factory=list)

    def median(self, attribute: str) -> float:
        return statistics.median(getattr(run, attribute) for run in self.runs)

    def minimum(self, attribute: str) -> float:
        return min(getattr(run, attribute) for run in self.runs)

    def event_median(self, event: str, name: str) -> float:
        values = [float(run.events.get(event, {}).get(name, 0) or 0) for run in self.runs]
        return statistics.median(values)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    keys = args.keys if args.keys is not None else (20_000 if args.quick else 100_000)
    concurrencies = args.concurrency or ([DEFAULT_CONCURRENCY] if args.quick else [1, 4, 8, 16])
    backends = ["sqlite"]
    postgres_note = server = ""
    if not args.no_postgres:
        problem = postgres_reachable()
        if problem is None:
            backends.append("postgresql")
            server = postgres_described()
        else:
            postgres_note = f"PostgreSQL skipped: {problem}"
    default = DEFAULT_CONCURRENCY if DEFAULT_CONCURRENCY in concurrencies else concurrencies[0]
    management_key = "sk-or-v1-bench-" + secrets.token_hex(24)
    program = Path(sys.executable).with_name("keyhygiene")
    sync_command = [str(program), "sync"] if program.exists() else [sys.executable, "-m", "keyhygiene", "sync"]
    load_before = os.getloadavg()
    speed_before = machine_speed()

    with fake_api(keys, args.workspaces, args.latency, args.seed, management_key) as base_url:
        hashes, per_workspace = survey(base_url, management_key)
        pages = sum(count // PAGE_SIZE + 1 for count in per_workspace.values())
        syncs: dict[tuple[str, int], Series] = {}
        seconds: dict[str, Series] = {}
        sdk, floor = Series(), Series()
        with tempfile.TemporaryDirectory(prefix="bench-sync-cwd-") as cwd:  # no .env is read
            for rep in range(args.reps):
                sdk.runs.append(
                    run_measured(
                        [sys.executable, "-m", "bench.sdk_loop", base_url],
                        clean_env(OPENROUTER_MANAGEMENT_KEY=management_key, PYTHONPATH=str(REPO)),
                        REPO,
                    )
                )
                floor.runs.append(
                    run_measured(
                        [sys.executable, "-m", "bench.list_only", base_url, str(default)],
                        clean_env(OPENROUTER_MANAGEMENT_KEY=management_key, PYTHONPATH=str(REPO)),
                        REPO,
                    )
                )
                for backend in backends:
                    for concurrency in concurrencies:
                        with fresh_database(backend) as url:
                            env = clean_env(
                                OPENROUTER_MANAGEMENT_KEY=management_key,
                                OPENROUTER_BASE_URL=base_url,
                                KEYHYGIENE_DATABASE_URL=url,
                                KEYHYGIENE_HTTP_CONCURRENCY=str(concurrency),
                                KEYHYGIENE_LOG_FORMAT="json",
                            )
                            first = run_measured(sync_command, env, Path(cwd))
                            syncs.setdefault((backend, concurrency), Series()).runs.append(first)
                            if concurrency == default:
                                change_keys(base_url, management_key, hashes, args.changed, rep)
                                second = run_measured(sync_command, env, Path(cwd))
                                seconds.setdefault(backend, Series()).runs.append(second)
                    print(f"  rep {rep + 1}/{args.reps} {backend} done", file=sys.stderr, flush=True)

    print_report(
        args=args,
        keys=keys,
        pages=pages,
        concurrencies=concurrencies,
        backends=backends,
        default=default,
        syncs=syncs,
        seconds=seconds,
        sdk=sdk,
        floor=floor,
        load=(load_before, os.getloadavg()),
        speed=(speed_before, machine_speed()),
        note=postgres_note,
        server=server,
    )
    return 0


def print_report(
    *,
    args: argparse.Namespace,
    keys: int,
    pages: int,
    concurrencies: list[int],
    backends: list[str],
    default: int,
    syncs: dict[tuple[str, int], Series],
    seconds: dict[str, Series],
    sdk: Series,
    floor: Series,
    load: tuple[tuple[float, float, float], tuple[float, float, float]],
    speed: tuple[float, float],
    note: str,
    server: str = "",
) -> None:
    cpu = platform.processor() or platform.machine()
    print(
        f"\nkeyhygiene sync: {keys:,} keys in {args.workspaces} workspaces ({pages:,} pages of GET /keys), "
        f"{args.latency * 1000:g} ms added latency, fake API in its own process; "
        f"{args.reps} reps, median (min)"
    )
    print(
        f"machine: {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
        + (f"{server}, " if server else "")
        + f"load average {load[0][0]:.1f} before, {load[1][0]:.1f} after; "
        + f"{SPEED_PROBE} {speed[0]:.1f} ms before, {speed[1]:.1f} ms after"
    )
    sdk_wall = sdk.median("wall")
    header = (
        "approach",
        "db",
        "conc",
        "wall s",
        "CPU s",
        "peak RSS MB",
        "requests",
        "listing s",
        "lower bound s",
        "binds",
        "x SDK loop",
    )
    rows: list[tuple[str, ...]] = [
        (
            "SDK serial loop (baseline)",
            "-",
            "1",
            f"{sdk_wall:.2f} ({sdk.minimum('wall'):.2f})",
            f"{sdk.median('cpu'):.2f}",
            f"{sdk.median('rss_mb'):.0f}",
            f"{int(json.loads(sdk.runs[0].stdout)['requests']):,}",
            "",
            f"{pages * args.latency:.2f}",
            "",
            "1.00",
        )
    ]
    floor_bound = pages / default * args.latency
    rows.append(
        (
            "listing only, no store",
            "-",
            str(default),
            f"{floor.median('wall'):.2f} ({floor.minimum('wall'):.2f})",
            f"{floor.median('cpu'):.2f}",
            f"{floor.median('rss_mb'):.0f}",
            f"{int(json.loads(floor.runs[0].stdout)['requests']):,}",
            "",
            f"{floor_bound:.2f}",
            "latency" if floor_bound >= floor.median("cpu") else "CPU",
            f"{floor.median('wall') / sdk_wall:.2f}",
        )
    )
    for backend in backends:
        for concurrency in concurrencies:
            series = syncs[(backend, concurrency)]
            bound = pages / concurrency * args.latency
            cpu_s = series.median("cpu")
            rows.append(
                (
                    "keyhygiene sync",
                    backend,
                    str(concurrency),
                    f"{series.median('wall'):.2f} ({series.minimum('wall'):.2f})",
                    f"{cpu_s:.2f}",
                    f"{series.median('rss_mb'):.0f}",
                    f"{series.event_median('sync_complete', 'requests'):,.0f}",
                    f"{series.event_median('listing_complete', 'seconds'):.2f}",
                    f"{bound:.2f}",
                    "latency" if bound >= cpu_s else "CPU",
                    f"{series.median('wall') / sdk_wall:.2f}",
                )
            )
    _print_table(header, rows)

    print(f"\nsecond sync after {args.changed:.0%} of the keys changed (concurrency {default})")
    header2 = (
        "db",
        "first wall s",
        "second wall s",
        "second / first",
        "listing only / first",
        "rows first",
        "rows second",
        "rows ratio",
    )
    rows2: list[tuple[str, ...]] = []
    for backend in backends:
        first, second = syncs[(backend, default)], seconds[backend]
        rows_first = first.event_median("sync_complete", "new_versions")
        rows_second = second.event_median("sync_complete", "new_versions")
        rows2.append(
            (
                backend,
                f"{first.median('wall'):.2f}",
                f"{second.median('wall'):.2f} ({second.minimum('wall'):.2f})",
                f"{second.median('wall') / first.median('wall'):.2f}",
                f"{floor.median('wall') / first.median('wall'):.2f}",
                f"{rows_first:,.0f}",
                f"{rows_second:,.0f}",
                f"{rows_second / rows_first:.1%}" if rows_first else "-",
            )
        )
    _print_table(header2, rows2)
    if note:
        print(f"\n{note}")


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]
    print("  ".join(name.ljust(width) for name, width in zip(header, widths, strict=True)))
    print("  ".join("-" * width for width in widths))
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
