"""A faithful fake of the OpenRouter keys management API, served over real HTTP on loopback.

    fake = FakeOpenRouter(clock=...)
    generate_organisation(fake, keys=500, now=fake.now())
    with serve(fake) as base_url:      # "http://127.0.0.1:<port>/api/v1"
        ...                            # point a client at base_url with fake.management_key
    fake.mutating_calls()              # what the client did

The wire behaviour follows OpenRouter's API-keys reference; choices where it is uncertain are
listed in :mod:`keyhygiene.fakeapi.api`. ``python -m keyhygiene.fakeapi --help`` runs a standalone server.
"""

from __future__ import annotations

from .faults import Fault, Faults
from .generate import generate_organisation
from .scenario import load_scenario, packaged_scenarios
from .server import FakeServer, serve
from .state import PAGE_SIZE, Call, FakeOpenRouter, UnknownKey, UnknownWorkspace

__all__ = [
    "PAGE_SIZE",
    "Call",
    "FakeOpenRouter",
    "FakeServer",
    "Fault",
    "Faults",
    "UnknownKey",
    "UnknownWorkspace",
    "generate_organisation",
    "load_scenario",
    "packaged_scenarios",
    "serve",
]
