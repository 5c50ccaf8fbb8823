"""``python -m bench [sync|history] [options]``: run one benchmark (``sync`` when none is named).

Each subcommand's module is imported only when it runs, so one benchmark's imports never slow
another's measurements. The project's modules are compiled to bytecode first, as an installed
package has them (``pip install .`` compiles; an editable install under PYTHONDONTWRITEBYTECODE
would otherwise compile them again in every measured process).
"""

from __future__ import annotations

import compileall
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

PACKAGES = ("keyhygiene", "db", "migrations", "tasks", "worker")

SUBCOMMANDS = {
    "sync": ("bench.sync", "whole-process `keyhygiene sync` against the fake API in its own process"),
    "history": ("bench.history", "reading a year of history: plans and reports"),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print("usage: python -m bench [sync|history] [options]   (python -m bench SUBCOMMAND --help)\n")
        for name, (_, summary) in SUBCOMMANDS.items():
            print(f"  {name:<8} {summary}")
        print("\nWithout a subcommand, `sync` runs.")
        return 0
    name = args.pop(0) if args and args[0] in SUBCOMMANDS else "sync"
    root = Path(__file__).resolve().parent.parent
    for package in PACKAGES:
        compileall.compile_dir(root / package, quiet=1)
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
