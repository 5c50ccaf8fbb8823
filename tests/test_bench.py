"""The sync benchmark harness runs end to end on a tiny organisation and prints its table.

Its figures are never judged here (benchmarks do not pass or fail on time); what a user relies on
is that `python -m bench sync` starts the fake API in its own process, times real `keyhygiene sync`
processes beside the SDK loop, and reports the second sync's rows.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_quick_sync_benchmark_prints_its_table() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "sync", "--quick", "--keys", "500", "--reps", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("keyhygiene sync: 500 keys in 10 workspaces") for line in lines)
    assert any(line.startswith("SDK serial loop (baseline)") for line in lines)
    # Whether autovacuum runs decides when a store gets the statistics its syncs are planned from.
    [machine] = [line for line in lines if line.startswith("machine: ")]
    assert "PostgreSQL " in machine and ("(autovacuum on)" in machine or "(autovacuum off)" in machine)
    # How fast the machine ran plain Python around the run: figures of two runs are compared by it.
    assert re.search(r'timeit "sum\(range\(10\*\*6\)\)" [0-9.]+ ms before, [0-9.]+ ms after$', machine)
    rows = [line.split() for line in lines if line.startswith("keyhygiene sync  ")]
    assert [row[2] for row in rows] == ["sqlite", "postgresql"]
    assert all(row[3] == "8" for row in rows)  # the default concurrency, alone with --quick
    # keyhygiene's client listing and storing nothing, the floor of any sync, with its requests.
    [floor] = [line.removeprefix("listing only, no store").split() for line in lines if line.startswith("listing only")]
    assert floor[:2] == ["-", "8"]
    assert int(floor[6]) >= 2 + 11  # the credential, the workspaces and at least the 11 pages
    second = [line.split() for line in lines if line.startswith(("sqlite ", "postgresql "))]
    # 1% of 500 keys changed: the second sync writes 5 rows where the first wrote 500.
    assert [(row[6], row[7]) for row in second] == [("500", "5"), ("500", "5")]
