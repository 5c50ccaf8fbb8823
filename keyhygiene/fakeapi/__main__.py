"""``python -m keyhygiene.fakeapi``: run the fake keys API as a standalone server until Ctrl-C."""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Sequence
from datetime import UTC, datetime

from .generate import generate_organisation
from .scenario import load_scenario, packaged_scenarios
from .server import FakeServer
from .state import FakeOpenRouter


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m keyhygiene.fakeapi",
        description=(
            "Serve a fake OpenRouter keys management API (GET/POST/PATCH/DELETE /api/v1/keys, "
            "GET /api/v1/key, GET /api/v1/workspaces) on this machine until Ctrl-C."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port to bind; 0 picks a free one (default 8080)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--scenario",
        metavar="FILE",
        help=f"load a scenario JSON file, or a packaged one by name ({', '.join(packaged_scenarios())})",
    )
    source.add_argument("--keys", type=int, help="generate this many keys (default 300 without --scenario)")
    parser.add_argument("--workspaces", type=int, default=3, help="workspaces to generate (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated data (default 0)")
    parser.add_argument(
        "--management-key",
        metavar="KEY",
        help="the management key clients must send; a random one is generated and printed if omitted",
    )
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every request")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    fake = FakeOpenRouter(args.management_key)
    fake.faults.latency = args.latency
    if args.scenario:
        load_scenario(fake, args.scenario)
    else:
        now = datetime.now(UTC).replace(microsecond=0)
        generate_organisation(
            fake,
            keys=300 if args.keys is None else args.keys,
            workspaces=args.workspaces,
            seed=args.seed,
            now=now,
        )
    server = FakeServer(fake, args.host, args.port)
    try:
        base_url = server.start()
    except OSError as exc:
        print(f"cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    print(f"fake OpenRouter keys API at {base_url} ({len(fake.keys)} keys, {len(fake.workspaces)} workspaces)")
    if args.management_key is None:
        # Printed only because this process invented it; a key passed in is never echoed.
        print(f"management key: {fake.management_key}")
    print("Ctrl-C to stop.", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
