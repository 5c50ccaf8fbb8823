"""Realistic, seed-deterministic organisations of keys for demos, tests and benchmarks.

Each key spends at a steady rate from its creation to its ``last_used_at``; its window usages are
that spend clipped to the real UTC day, Monday-started week and calendar month around ``now``. So
``usage_daily <= usage_weekly``, ``usage_daily <= usage_monthly``, every window ``<= usage``, and
weekly may exceed monthly only when the week began in the previous month, as on the real API.

Proportions (approximate, over the keys): 10% expired, 15% expiring later, 8% disabled, 25% idle
(last used 30-200 days ago, or ``last_used_at`` null with spend from before 2026), 3% never used,
5% with the limit spent (``limit_remaining <= 0``), 2% spending over $100 this month, about 15%
with BYOK spend (half of those counting it in the limit).
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta

from ._times import Windows, utc
from .state import FakeOpenRouter

_SERVICES = (
    "billing",
    "search",
    "auth",
    "checkout",
    "recs",
    "chat",
    "summariser",
    "ingest",
    "notify",
    "support",
    "translate",
    "moderation",
)
_PEOPLE = ("alice", "bob", "carol", "dmitri", "erin", "farah", "gus", "hana", "ivan", "julia", "kofi", "li")
_DEVICES = ("laptop", "desktop", "sandbox", "notebook", "vm")
_CUSTOMERS = (
    "acme",
    "globex",
    "initech",
    "umbrella",
    "hooli",
    "stark",
    "wayne",
    "wonka",
    "tyrell",
    "soylent",
)
_WORKSPACE_NAMES = (
    "Default",
    "Production",
    "Research",
    "Customers",
    "Platform",
    "Data",
    "Sandbox",
    "Partners",
)
_RECORDING_STARTED = datetime(2026, 1, 1, tzinfo=UTC)  # last_used_at null + spend = used before this


def _name(rng: random.Random) -> tuple[str, str]:
    """A key name and its kind."""
    roll = rng.random()
    if roll < 0.25:
        env = rng.choice(("prod", "prod", "staging", "dev"))
        return f"svc-{rng.choice(_SERVICES)}-{env}", "service"
    if roll < 0.40:
        return f"prod-{rng.choice(_SERVICES)}-{rng.randint(1, 9)}", "service"
    if roll < 0.62:
        return f"dev-{rng.choice(_PEOPLE)}-{rng.choice(_DEVICES)}", "person"
    if roll < 0.75:
        return f"ci-runner-{rng.randint(1, 60)}", "ci"
    return f"customer-{rng.choice(_CUSTOMERS)}-{rng.randint(1, 250):03d}", "customer"


def _when(moment: datetime, rng: random.Random) -> datetime:
    return moment.replace(microsecond=rng.randrange(1_000_000))


def generate_organisation(
    fake: FakeOpenRouter, *, keys: int, workspaces: int = 3, seed: int = 0, now: datetime
) -> None:
    """Fill ``fake`` with ``keys`` realistic keys spread over ``workspaces`` workspaces.

    The same seed, ``now`` and starting state always give the same workspaces and keys (hashes
    included). Missing workspaces are created; the first one is the default if there was none.
    Does not change the fake's clock.
    """
    now = utc(now)
    rng = random.Random(seed)
    existing = fake.workspaces
    for index in range(len(existing), workspaces):
        name = _WORKSPACE_NAMES[index % len(_WORKSPACE_NAMES)]
        if index >= len(_WORKSPACE_NAMES):
            name = f"{name} {index // len(_WORKSPACE_NAMES) + 1}"
        fake.add_workspace(name, id=_uuid(rng))
    workspace_ids = [w["id"] for w in fake.workspaces][: max(workspaces, 1)]
    # The default workspace holds the most keys, as in a real organisation.
    weights = [3.0] + [1.0] * (len(workspace_ids) - 1)
    default_id = fake.default_workspace_id
    if default_id in workspace_ids:
        workspace_ids.remove(default_id)
        workspace_ids.insert(0, default_id)
    creators = [f"user_{rng.getrandbits(64):016x}" for _ in range(12)]
    windows = Windows.at(now)

    for _ in range(keys):
        name, kind = _name(rng)
        created_at = _when(now - timedelta(seconds=rng.uniform(3600, 540 * 86400)), rng)

        activity = rng.random()
        last_used_at: datetime | None
        spent_until: datetime | None  # the end of the steady spend
        if activity < 0.03:
            last_used_at = spent_until = None
        elif activity < 0.28:
            if created_at < _RECORDING_STARTED - timedelta(days=2) and rng.random() < 0.3:
                last_used_at = None
                spent_until = _RECORDING_STARTED - timedelta(seconds=rng.uniform(3600, 40 * 86400))
                spent_until = max(spent_until, created_at + timedelta(hours=1))
            else:
                last_used_at = _when(now - timedelta(days=rng.uniform(30, 200)), rng)
                if created_at >= last_used_at:
                    created_at = last_used_at - timedelta(days=rng.uniform(1, 90))
                spent_until = last_used_at
        else:
            ago = min(rng.expovariate(1 / 1.5), 29.0)
            last_used_at = max(_when(now - timedelta(days=ago), rng), created_at + timedelta(minutes=5))
            last_used_at = min(last_used_at, now)
            spent_until = last_used_at

        expiry_roll = rng.random()
        expires_at: datetime | None = None
        if expiry_roll < 0.10:
            # Expired: it stopped working before now, after its last use.
            earliest = max(created_at, spent_until or created_at) + timedelta(minutes=1)
            if earliest < now - timedelta(minutes=2):
                expires_at = earliest + (now - earliest) * (0.05 + 0.9 * rng.random())
                expires_at = min(expires_at.replace(microsecond=0) + timedelta(seconds=1), now)
        elif expiry_roll < 0.25:
            expires_at = (now + timedelta(days=rng.uniform(1, 365))).replace(microsecond=0)

        rate = rng.lognormvariate(-1.2, 1.4)  # USD per day while in use
        heavy = spent_until is not None and last_used_at is not None and rng.random() < 0.02
        usage, daily, weekly, monthly = _spend(rate, created_at, spent_until, windows)
        if heavy and monthly < 100:
            scale = rng.uniform(110, 400) / max(monthly, 1e-9)
            if monthly > 0:
                usage, daily, weekly, monthly = (v * scale for v in (usage, daily, weekly, monthly))

        byok = (0.0, 0.0, 0.0, 0.0)
        include_byok = False
        if spent_until is not None and rng.random() < 0.15:
            byok = _spend(rng.lognormvariate(-1.5, 1.2), created_at, spent_until, windows)
            include_byok = rng.random() < 0.5

        limit: float | None = None
        limit_reset: str | None = None
        limit_roll = rng.random()
        if limit_roll < 0.05 and usage > 0:
            # The limit is spent: limit_remaining <= 0.
            windowed = {"daily": daily, "weekly": weekly, "monthly": monthly}
            choices = [w for w, v in windowed.items() if v > 0.01]
            limit_reset = rng.choice(choices) if choices else None
            spend = windowed[limit_reset] if limit_reset else usage
            if include_byok:
                index = ("daily", "weekly", "monthly").index(limit_reset) + 1 if limit_reset else 0
                spend += byok[index]
            limit = round(spend * rng.uniform(0.6, 1.0), 2)
        elif limit_roll < 0.35:
            limit_reset = rng.choice((None, None, "monthly", "monthly", "weekly", "daily"))
            basis = {"daily": daily, "weekly": weekly, "monthly": monthly, None: usage}[limit_reset]
            limit = float(max(5, round(basis * rng.uniform(1.5, 10) + rng.choice((5, 10, 20, 50)))))

        disabled = rng.random() < 0.08
        updated_at: datetime | None = None
        if disabled or rng.random() < 0.4:
            latest = min(now, expires_at or now)
            updated_at = _when(created_at + (latest - created_at) * rng.uniform(0.1, 1.0), rng)
            updated_at = max(updated_at, created_at)

        external_user = None
        if kind == "customer" and rng.random() < 0.6:
            external_user = f"{name.split('-')[1]}-user-{rng.randint(1, 9999):04d}"

        fake.add_key(
            name,
            workspace_id=rng.choices(workspace_ids, weights)[0],
            disabled=disabled,
            limit=limit,
            limit_reset=limit_reset,
            include_byok_in_limit=include_byok,
            usage=round(usage, 6),
            usage_daily=round(daily, 6),
            usage_weekly=round(weekly, 6),
            usage_monthly=round(monthly, 6),
            byok_usage=round(byok[0], 6),
            byok_usage_daily=round(byok[1], 6),
            byok_usage_weekly=round(byok[2], 6),
            byok_usage_monthly=round(byok[3], 6),
            created_at=created_at,
            updated_at=updated_at,
            expires_at=expires_at,
            last_used_at=last_used_at,
            creator_user_id=rng.choice(creators) if rng.random() < 0.9 else None,
            external_user=external_user,
            hash=f"{rng.getrandbits(256):064x}",
        )


def _spend(
    rate: float, created_at: datetime, spent_until: datetime | None, windows: Windows
) -> tuple[float, float, float, float]:
    """(lifetime, daily, weekly, monthly) spend of a key spending ``rate`` $/day until ``spent_until``."""
    if spent_until is None:
        return (0.0, 0.0, 0.0, 0.0)

    def since(start: datetime) -> float:
        begin = max(start, created_at)
        return rate * max(0.0, (spent_until - begin).total_seconds()) / 86400 if spent_until > begin else 0.0

    lifetime = max(since(created_at), 0.01)
    return (
        lifetime,
        since(windows.start("daily")),
        since(windows.start("weekly")),
        since(windows.start("monthly")),
    )


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))
