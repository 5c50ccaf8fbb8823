"""The baseline: the serial loop a user would write with the official ``openrouter`` SDK.

    OPENROUTER_MANAGEMENT_KEY=... python -m bench.sdk_loop BASE_URL

Lists every workspace (the SDK pages them), then pages each workspace's keys with
``include_disabled`` and ``include_expired``, one request at a time, until a page has fewer than
100 keys, as OpenRouter's API Key Audit cookbook does. Prints one JSON line: keys and requests.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Sequence

PAGE_SIZE = 100


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args[:1] in (["-h"], ["--help"]) else 2
    warnings.simplefilter("ignore")  # the SDK warns about deprecated fields the API still sends
    from openrouter import OpenRouter

    hashes: set[str] = set()
    requests = 0
    with OpenRouter(api_key=os.environ["OPENROUTER_MANAGEMENT_KEY"], server_url=args[0]) as client:
        workspaces = []
        page = client.workspaces.list(limit=100)
        while page is not None:
            requests += 1
            workspaces.extend(page.result.data)
            page = page.next()
        for workspace in workspaces:
            offset = 0
            while True:
                keys = client.api_keys.list(
                    include_disabled=True, include_expired=True, offset=offset, workspace_id=workspace.id
                ).data
                requests += 1
                hashes.update(key.hash for key in keys)
                if len(keys) < PAGE_SIZE:
                    break
                offset += PAGE_SIZE
    print(json.dumps({"keys": len(hashes), "requests": requests}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
