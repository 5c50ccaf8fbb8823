"""Scenario files: a fixed clock, workspaces, hand-written keys and optionally generated ones.

The format (times are ISO 8601 strings)::

    {
      "now": "2026-10-15T12:00:00Z",
      "workspaces": [{"id": "...", "name": "Default", "default": true}],
      "keys": [{"name": "svc-billing-prod", "workspace_id": "...", "usage": 12.5, ...}],
      "generate": {"keys": 300, "workspaces": 4, "seed": 1}
    }

Each entry of ``keys`` holds keyword arguments of :meth:`FakeOpenRouter.add_key`, plus an optional
``uses`` list of ``{"usd": 1.0, "byok_usd": 0.0, "at": "..."}`` replayed through ``record_use``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from keyhygiene.keysapi.fields import KEY_FIELDS

from ._times import utc
from .generate import generate_organisation
from .state import FakeOpenRouter

_TIME_FIELDS = tuple(field.name for field in KEY_FIELDS if field.kind == "time")


def packaged_scenarios() -> list[str]:
    """Names of the scenarios shipped in ``fakeapi/scenarios`` (``small``, ...)."""
    folder = resources.files("keyhygiene.fakeapi").joinpath("scenarios")
    return sorted(entry.name.removesuffix(".json") for entry in folder.iterdir() if entry.name.endswith(".json"))


def _read(source: str | Path | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(source, Mapping):
        return source
    path = Path(source)
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
    elif isinstance(source, str) and source in packaged_scenarios():
        packaged = resources.files("keyhygiene.fakeapi").joinpath("scenarios", f"{source}.json")
        data = json.loads(packaged.read_text(encoding="utf-8"))
    else:
        raise FileNotFoundError(f"no scenario file {str(source)!r} (packaged: {', '.join(packaged_scenarios())})")
    if not isinstance(data, Mapping):
        raise ValueError("a scenario must be a JSON object")
    return data


def load_scenario(fake: FakeOpenRouter, source: str | Path | Mapping[str, Any]) -> None:
    """Load a scenario from a file path, a packaged scenario name (``"small"``) or a dict.

    Sets the fake's clock to ``now`` when given, then adds workspaces, keys and generated keys.
    """
    data = _read(source)
    unknown = set(data) - {"now", "workspaces", "keys", "generate", "description"}
    if unknown:
        raise ValueError(f"unknown scenario fields: {', '.join(sorted(unknown))}")
    if data.get("now") is not None:
        fake.set_clock(utc(data["now"]))
    for workspace in data.get("workspaces", []):
        fake.add_workspace(workspace["name"], id=workspace.get("id"), default=bool(workspace.get("default")))
    for entry in data.get("keys", []):
        kwargs = dict(entry)
        uses = kwargs.pop("uses", [])
        for name in _TIME_FIELDS:
            if isinstance(kwargs.get(name), str):
                kwargs[name] = utc(kwargs[name])
        key = fake.add_key(**kwargs)
        for use in uses:
            at = use.get("at")
            fake.record_use(
                key["hash"],
                float(use["usd"]),
                float(use.get("byok_usd", 0.0)),
                None if at is None else utc(at),
            )
    generate = data.get("generate")
    if generate:
        generate_organisation(
            fake,
            keys=int(generate["keys"]),
            workspaces=int(generate.get("workspaces", 3)),
            seed=int(generate.get("seed", 0)),
            now=fake.now(),
        )
