"""``python -m bench SUBCOMMAND [options]``: run one benchmark (see bench/README.md)."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("history",):
        print("usage: python -m bench history [options]   (python -m bench history --help)", file=sys.stderr)
        return 2
    from bench import history

    return history.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
