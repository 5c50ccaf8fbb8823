"""The floor of a second sync: keyhygiene's own client listing every key, storing nothing.

    OPENROUTER_MANAGEMENT_KEY=... python -m bench.list_only BASE_URL CONCURRENCY

Loads the API client (not the store), checks the credential, lists the workspaces, then takes
every key of every workspace as ``keyhygiene sync`` does, ``CONCURRENCY`` requests in flight, and
drops each page. A later sync lists every key too (the API has no "changed since"), so no sync can
take less than this process. Prints one JSON line: keys and requests.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or not args[1].isdigit():
        print(__doc__)
        return 0 if args[:1] in (["-h"], ["--help"]) else 2
    from keyhygiene.keysapi.client import KeysClient  # the client alone: no settings, no logging

    keys = 0
    with KeysClient(args[0], os.environ["OPENROUTER_MANAGEMENT_KEY"], concurrency=int(args[1])) as client:
        if not client.current_key().is_management_key:
            print("not a management key", file=sys.stderr)
            return 2
        for page in client.stream_inventory(client.list_workspaces()):
            keys += len(page)
        print(json.dumps({"keys": keys, "requests": client.requests_sent}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
