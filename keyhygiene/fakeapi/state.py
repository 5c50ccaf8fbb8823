"""The fake's state: workspaces, keys, credentials, the clock and the record of calls.

Everything here sits behind one lock. Keys are indexed per workspace in the API's listing order
(newest ``created_at`` first, ``hash`` as tie-breaker), so a page is a slice, not a sort. Window
usages (daily, weekly, monthly) are stored with the windows they belong to and read as zero once
the clock has left those windows, so advancing the clock resets them without touching every key.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import random
import re
import secrets
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from ._times import WINDOWS, Windows, format_time, micros, optional_utc, utc
from .faults import Faults

PAGE_SIZE = 100
LIMIT_RESETS = ("daily", "weekly", "monthly")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def decimal_sum(*amounts: float) -> float:
    """A sum of USD amounts as a decimal-backed API answers it: to the nano-dollar, with no binary
    float noise (20 - 4.2 reads 15.8, and 0.1 + 0.2 reads 0.3, not 0.30000000000000004)."""
    return round(sum(amounts), 9)


class UnknownKey(LookupError):
    """No live key has that hash."""


class UnknownWorkspace(LookupError):
    """No workspace has that id."""


@dataclass(frozen=True, slots=True)
class Call:
    """One request the fake received. ``path`` is below ``/api/v1``; ``status`` 0 means no response."""

    method: str
    path: str
    query: dict[str, str]
    body: Any | None
    status: int

    @property
    def succeeded(self) -> bool:
        return 200 <= self.status < 300


@dataclass(slots=True)
class _Key:
    hash: str
    name: str
    label: str
    workspace_id: str
    disabled: bool
    limit: float | None
    limit_reset: str | None
    include_byok_in_limit: bool
    usage: float
    byok_usage: float
    window_usage: dict[str, float]
    window_byok_usage: dict[str, float]
    windows: Windows
    created_at: datetime
    updated_at: datetime | None
    expires_at: datetime | None
    last_used_at: datetime | None
    creator_user_id: str | None
    external_user: str | None
    rendered: tuple[tuple[float, ...], dict[str, Any], bytes | None] | None = field(
        default=None, compare=False, repr=False
    )
    """The last ``to_json``, the window figures it was made with, and its encoding once asked for
    (``encoded``); every change clears it."""

    def changed(self) -> None:
        self.rendered = None

    @property
    def sort_key(self) -> tuple[int, str]:
        return (-micros(self.created_at), self.hash)

    def usage_in(self, window: str, now: Windows, *, byok: bool = False) -> float:
        """Spend in the window containing ``now``; zero when the stored spend is from older windows."""
        if getattr(self.windows, window) != getattr(now, window):
            return 0.0
        return (self.window_byok_usage if byok else self.window_usage)[window]

    def limit_spend(self, now: Windows) -> float:
        """What counts against ``limit``: the reset window's spend, or lifetime spend without reset."""
        if self.limit_reset in WINDOWS:
            assert self.limit_reset is not None
            spend = self.usage_in(self.limit_reset, now)
            byok = self.usage_in(self.limit_reset, now, byok=True)
        else:
            spend, byok = self.usage, self.byok_usage
        return spend + byok if self.include_byok_in_limit else spend

    def limit_remaining(self, now: Windows) -> float | None:
        # Rounded so that 20 - 4.2 reads 15.8, as a decimal-backed API would answer.
        return None if self.limit is None else decimal_sum(self.limit, -self.limit_spend(now))

    def roll(self, now: Windows) -> None:
        """Zero the window usages whose window has passed, and move to the current windows."""
        mine = self.windows
        if mine is now:
            return
        for window in WINDOWS:
            if getattr(mine, window) != getattr(now, window):
                self.window_usage[window] = 0.0
                self.window_byok_usage[window] = 0.0
        self.windows = now

    def is_expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    def window_figures(self, now: Windows) -> tuple[float, ...]:
        """``usage_in`` of each window, plain and BYOK: the only part of the JSON that moves with the clock."""
        mine, usage, byok = self.windows, self.window_usage, self.window_byok_usage
        daily, weekly, monthly = mine.daily == now.daily, mine.weekly == now.weekly, mine.monthly == now.monthly
        return (
            usage["daily"] if daily else 0.0,
            usage["weekly"] if weekly else 0.0,
            usage["monthly"] if monthly else 0.0,
            byok["daily"] if daily else 0.0,
            byok["weekly"] if weekly else 0.0,
            byok["monthly"] if monthly else 0.0,
        )

    def to_json(self, now: Windows) -> dict[str, Any]:
        """The key object of section 2 of the reference, with every field (a copy of the last one
        made, while the key and its window figures are what they were: most keys of a listing have
        not changed since the previous one)."""
        return dict(self.shared_json(now))

    def shared_json(self, now: Windows) -> dict[str, Any]:
        """``to_json`` itself, not a copy: never to be modified."""
        figures = self.window_figures(now)
        rendered = self.rendered
        if rendered is not None and rendered[0] == figures:
            return rendered[1]
        return self._render(figures, now)

    def encoded(self, now: Windows) -> bytes:
        """``to_json`` as the wire carries it (compact JSON), encoded once while it holds."""
        figures = self.window_figures(now)
        rendered = self.rendered
        if rendered is None or rendered[0] != figures:
            data = self._render(figures, now)
        elif rendered[2] is not None:
            return rendered[2]
        else:
            data = rendered[1]
        text = json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
        self.rendered = (figures, data, text)
        return text

    def _render(self, figures: tuple[float, ...], now: Windows) -> dict[str, Any]:
        # Keys whose hash starts with 0-4 use the guide's "+00:00" microsecond style.
        micro = self.hash[:1] in "01234"

        def when(moment: datetime | None) -> str | None:
            return None if moment is None else format_time(moment, microsecond_style=micro)

        data = {
            "hash": self.hash,
            "name": self.name,
            "label": self.label,
            "disabled": self.disabled,
            "limit": self.limit,
            "limit_remaining": self.limit_remaining(now),
            "limit_reset": self.limit_reset,
            "include_byok_in_limit": self.include_byok_in_limit,
            "usage": self.usage,
            "usage_daily": figures[0],
            "usage_weekly": figures[1],
            "usage_monthly": figures[2],
            "byok_usage": self.byok_usage,
            "byok_usage_daily": figures[3],
            "byok_usage_weekly": figures[4],
            "byok_usage_monthly": figures[5],
            "created_at": when(self.created_at),
            "updated_at": when(self.updated_at),
            "expires_at": when(self.expires_at),
            "creator_user_id": self.creator_user_id,
            "workspace_id": self.workspace_id,
            "external_user": self.external_user,
            "last_used_at": when(self.last_used_at),
        }
        self.rendered = (figures, data, None)
        return data


@dataclass(slots=True)
class _Credential:
    """A secret that authenticates: the management key, or a regular key (listed or not)."""

    label: str
    is_management: bool
    key_hash: str | None = None
    workspace_id: str | None = None


@dataclass(slots=True)
class _Order:
    """One workspace's keys in listing order; sorted lazily after bulk inserts."""

    items: list[tuple[int, str]] = field(default_factory=list)
    dirty: bool = False

    def add(self, item: tuple[int, str]) -> None:
        if not self.dirty and (not self.items or item >= self.items[-1]):
            self.items.append(item)
        else:
            self.items.append(item)
            self.dirty = True

    def remove(self, item: tuple[int, str]) -> None:
        self.sorted()
        index = bisect.bisect_left(self.items, item)
        if index < len(self.items) and self.items[index] == item:
            del self.items[index]

    def sorted(self) -> list[tuple[int, str]]:
        if self.dirty:
            self.items.sort()
            self.dirty = False
        return self.items


def _secret(rng: random.Random | None = None) -> str:
    body = f"{rng.getrandbits(256):064x}" if rng is not None else secrets.token_hex(32)
    return f"sk-or-v1-{body}"


def redacted(secret: str) -> str:
    """The label the API shows for a key: ``sk-or-v1-abc...123``."""
    body = secret.removeprefix("sk-or-v1-")
    return f"sk-or-v1-{body[:3]}...{body[-3:]}"


class FakeOpenRouter:
    """In-memory OpenRouter keys management API: state, clock, faults and a record of calls.

    Serve it over HTTP with :func:`keyhygiene.fakeapi.serve`. Keys are added directly with :meth:`add_key`
    (or :func:`keyhygiene.fakeapi.generate_organisation`, :func:`keyhygiene.fakeapi.load_scenario`) and through
    ``POST /keys``; the HTTP side follows OpenRouter's API-keys reference.
    """

    def __init__(
        self,
        management_key: str | None = None,
        *,
        clock: Callable[[], datetime] | None = None,
        seed: int = 0,
    ) -> None:
        self.management_key = management_key or _secret()
        self.organization_id: str | None = None
        self.faults = Faults()
        self.omit_fields: set[str] = set()
        self.extra_fields: dict[str, Any] = {}
        self._clock = clock
        self._fixed_now: datetime | None = None
        self._rng = random.Random(seed)
        self._lock = threading.RLock()
        self._workspaces: dict[str, dict[str, Any]] = {}
        self._default_workspace_id: str | None = None
        self._keys: dict[str, _Key] = {}
        self._order: dict[str, _Order] = {}
        self._credentials: dict[str, _Credential] = {
            self.management_key: _Credential(label=redacted(self.management_key), is_management=True)
        }
        self._revoked: dict[str, _Credential] = {}
        self._calls: list[Call] = []
        self._version = 0
        self._filtered: dict[tuple[str, bool, bool], tuple[int, datetime | None, list[str]]] = {}
        self._stats_lock = threading.Lock()
        self._in_flight = 0
        self.max_in_flight = 0
        self.request_count = 0

    def __repr__(self) -> str:
        # Never show the management key.
        return f"<FakeOpenRouter workspaces={len(self._workspaces)} keys={len(self._keys)}>"

    # ----------------------------------------------------------------- clock

    def now(self) -> datetime:
        """The fake's current time (aware UTC)."""
        if self._fixed_now is not None:
            return self._fixed_now
        if self._clock is not None:
            return utc(self._clock())
        return datetime.now(UTC)

    def set_clock(self, now: datetime | str) -> None:
        """Freeze the clock at ``now``; window usages of keys read as zero once their window has passed."""
        with self._lock:
            self._fixed_now = utc(now)

    def advance(self, delta: timedelta) -> datetime:
        """Move the clock forward (freezing it if it was live) and return the new time."""
        with self._lock:
            self._fixed_now = self.now() + delta
            return self._fixed_now

    # ----------------------------------------------------------- workspaces

    def add_workspace(self, name: str, id: str | None = None, default: bool = False) -> dict[str, Any]:
        """Create a workspace; the first one is the default unless a later one says ``default``."""
        with self._lock:
            workspace_id = id or str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
            if workspace_id in self._workspaces:
                raise ValueError(f"workspace {workspace_id!r} already exists")
            slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "workspace"
            workspace = {
                "id": workspace_id,
                "name": name,
                "slug": slug,
                "description": None,
                "created_at": format_time(self.now(), microsecond_style=False),
                "updated_at": None,
                "created_by": None,
                "default_guardrail_id": str(uuid.UUID(int=self._rng.getrandbits(128), version=4)),
                "default_image_model": None,
                "default_provider_sort": None,
                "default_text_model": None,
                "disabled_server_tools": None,
                "include_byok_in_budgets": False,
                "io_logging_api_key_ids": None,
                "io_logging_sampling_rate": 1.0,
                "is_data_discount_logging_enabled": False,
                "is_observability_broadcast_enabled": False,
                "is_observability_io_logging_enabled": False,
            }
            self._workspaces[workspace_id] = workspace
            self._order[workspace_id] = _Order()
            if default or self._default_workspace_id is None:
                self._default_workspace_id = workspace_id
            self._version += 1
            return dict(workspace)

    def rename_workspace(self, workspace_id: str, name: str) -> None:
        """Give a workspace a new name, as its owner may in OpenRouter's settings."""
        with self._lock:
            self._workspaces[workspace_id]["name"] = name
            self._workspaces[workspace_id]["updated_at"] = format_time(self.now(), microsecond_style=False)
            self._version += 1

    @property
    def default_workspace_id(self) -> str:
        """The workspace ``GET /keys`` lists without ``workspace_id`` (created on first need)."""
        with self._lock:
            if self._default_workspace_id is None:
                self.add_workspace("Default")
            assert self._default_workspace_id is not None
            return self._default_workspace_id

    @property
    def workspaces(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(workspace) for workspace in self._workspaces.values()]

    def delete_workspace(self, workspace_id: str) -> None:
        """Delete a workspace with its keys (``GET /keys`` then answers 404 for it). Raises
        UnknownWorkspace."""
        with self._lock:
            if self._workspaces.pop(workspace_id, None) is None:
                raise UnknownWorkspace(workspace_id)
            for key_hash in [h for h, record in self._keys.items() if record.workspace_id == workspace_id]:
                del self._keys[key_hash]
            del self._order[workspace_id]
            if self._default_workspace_id == workspace_id:
                self._default_workspace_id = None
            self._version += 1

    def has_workspace(self, workspace_id: str) -> bool:
        with self._lock:
            return workspace_id in self._workspaces

    # ------------------------------------------------------------------ keys

    def add_key(
        self,
        name: str,
        *,
        workspace_id: str | None = None,
        disabled: bool = False,
        limit: float | None = None,
        limit_reset: str | None = None,
        include_byok_in_limit: bool = False,
        usage: float = 0.0,
        usage_daily: float = 0.0,
        usage_weekly: float = 0.0,
        usage_monthly: float = 0.0,
        byok_usage: float = 0.0,
        byok_usage_daily: float = 0.0,
        byok_usage_weekly: float = 0.0,
        byok_usage_monthly: float = 0.0,
        created_at: datetime | str | None = None,
        updated_at: datetime | str | None = None,
        expires_at: datetime | str | None = None,
        last_used_at: datetime | str | None = None,
        creator_user_id: str | None = None,
        external_user: str | None = None,
        hash: str | None = None,
        label: str | None = None,
    ) -> dict[str, Any]:
        """Add a key directly (no HTTP call recorded) and return its JSON object.

        Window usages are taken as the spend in the windows that contain the fake's current time.
        """
        return self._insert(
            name=name,
            workspace_id=workspace_id,
            disabled=disabled,
            limit=limit,
            limit_reset=limit_reset,
            include_byok_in_limit=include_byok_in_limit,
            usage=usage,
            window_usage={"daily": usage_daily, "weekly": usage_weekly, "monthly": usage_monthly},
            byok_usage=byok_usage,
            window_byok_usage={
                "daily": byok_usage_daily,
                "weekly": byok_usage_weekly,
                "monthly": byok_usage_monthly,
            },
            created_at=optional_utc(created_at),
            updated_at=optional_utc(updated_at),
            expires_at=optional_utc(expires_at),
            last_used_at=optional_utc(last_used_at),
            creator_user_id=creator_user_id,
            external_user=external_user,
            hash=hash,
            secret=None,
            label=label,
            register_secret=False,
        )[0]

    def create_key(
        self,
        name: str,
        *,
        workspace_id: str | None = None,
        limit: float | None = None,
        limit_reset: str | None = None,
        include_byok_in_limit: bool = False,
        expires_at: datetime | None = None,
        creator_user_id: str | None = None,
        external_user: str | None = None,
    ) -> tuple[dict[str, Any], str]:
        """What ``POST /keys`` does: a new key with a fresh secret; returns (key JSON, secret)."""
        secret = _secret()
        return self._insert(
            name=name,
            workspace_id=workspace_id,
            disabled=False,
            limit=limit,
            limit_reset=limit_reset,
            include_byok_in_limit=include_byok_in_limit,
            usage=0.0,
            window_usage=dict.fromkeys(WINDOWS, 0.0),
            byok_usage=0.0,
            window_byok_usage=dict.fromkeys(WINDOWS, 0.0),
            created_at=None,
            updated_at=None,
            expires_at=expires_at,
            last_used_at=None,
            creator_user_id=creator_user_id,
            external_user=external_user,
            hash=hashlib.sha256(secret.encode()).hexdigest(),
            secret=secret,
            label=None,
            register_secret=True,
        )

    def _insert(
        self,
        *,
        name: str,
        workspace_id: str | None,
        disabled: bool,
        limit: float | None,
        limit_reset: str | None,
        include_byok_in_limit: bool,
        usage: float,
        window_usage: dict[str, float],
        byok_usage: float,
        window_byok_usage: dict[str, float],
        created_at: datetime | None,
        updated_at: datetime | None,
        expires_at: datetime | None,
        last_used_at: datetime | None,
        creator_user_id: str | None,
        external_user: str | None,
        hash: str | None,
        secret: str | None,
        label: str | None,
        register_secret: bool,
    ) -> tuple[dict[str, Any], str]:
        with self._lock:
            now = self.now()
            workspace = workspace_id if workspace_id is not None else self.default_workspace_id
            if workspace not in self._workspaces:
                raise UnknownWorkspace(workspace)
            if secret is None:
                secret = _secret(self._rng)
            key_hash = hash if hash is not None else hashlib.sha256(secret.encode()).hexdigest()
            if not _HEX64.match(key_hash):
                raise ValueError(f"hash must be 64 lowercase hex characters, got {key_hash!r}")
            if key_hash in self._keys:
                raise ValueError(f"a key with hash {key_hash} already exists")
            record = _Key(
                hash=key_hash,
                name=name,
                label=label or redacted(secret),
                workspace_id=workspace,
                disabled=disabled,
                limit=None if limit is None else float(limit),
                limit_reset=limit_reset,
                include_byok_in_limit=include_byok_in_limit,
                usage=float(usage),
                byok_usage=float(byok_usage),
                window_usage={window: float(window_usage[window]) for window in WINDOWS},
                window_byok_usage={window: float(window_byok_usage[window]) for window in WINDOWS},
                windows=Windows.at(now),
                created_at=created_at or now,
                updated_at=updated_at,
                expires_at=expires_at,
                last_used_at=last_used_at,
                creator_user_id=creator_user_id,
                external_user=external_user,
            )
            self._keys[key_hash] = record
            self._order[workspace].add(record.sort_key)
            if register_secret:
                self._credentials[secret] = _Credential(label=record.label, is_management=False, key_hash=key_hash)
            self._version += 1
            return record.to_json(Windows.at(now)), secret

    def add_regular_key(self, label: str | None = None, *, hash: str | None = None) -> str:
        """A non-management credential; returns its secret.

        With ``hash`` the secret authenticates as that listed key (``GET /key`` then describes it);
        without, it is a credential of its own that never appears in ``GET /keys``.
        """
        secret = _secret()
        with self._lock:
            if hash is not None:
                if hash not in self._keys:
                    raise UnknownKey(hash)
                self._credentials[secret] = _Credential(
                    label=self._keys[hash].label, is_management=False, key_hash=hash
                )
            else:
                self._credentials[secret] = _Credential(
                    label=label or redacted(secret),
                    is_management=False,
                    workspace_id=self.default_workspace_id,
                )
        return secret

    @property
    def keys(self) -> list[dict[str, Any]]:
        """Copies of every live key's JSON (all fields, whatever ``omit_fields`` says), oldest added first."""
        with self._lock:
            now = Windows.at(self.now())
            return [record.to_json(now) for record in self._keys.values()]

    def shared_keys(self) -> list[dict[str, Any]]:
        """``keys`` without the copies: the fake's own JSON of each key, for a reader that never
        modifies it (the demo's past days). A key's object stays the same while the key and its
        window figures do, and is replaced, never changed, when they change."""
        with self._lock:
            now = Windows.at(self.now())
            return [record.shared_json(now) for record in self._keys.values()]

    def get(self, hash: str) -> dict[str, Any] | None:
        """A copy of one live key's JSON, or None."""
        with self._lock:
            record = self._keys.get(hash)
            return None if record is None else record.to_json(Windows.at(self.now()))

    def update_key(self, hash: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Apply already-validated PATCH fields; sets ``updated_at``. Raises UnknownKey/UnknownWorkspace."""
        with self._lock:
            record = self._keys.get(hash)
            if record is None:
                raise UnknownKey(hash)
            target = changes.get("workspace_id")
            if target is not None and target not in self._workspaces:
                raise UnknownWorkspace(target)
            now = self.now()
            for name in ("name", "disabled", "limit", "limit_reset", "include_byok_in_limit"):
                if name in changes:
                    setattr(record, name, changes[name])
            if record.limit is not None:
                record.limit = float(record.limit)
            if target is not None and target != record.workspace_id:
                self._order[record.workspace_id].remove(record.sort_key)
                record.workspace_id = target
                self._order[target].add(record.sort_key)
            record.updated_at = now
            record.changed()
            self._version += 1
            return record.to_json(Windows.at(now))

    def delete_key(self, hash: str) -> None:
        """Delete a key for good (its secret stops authenticating). Raises UnknownKey."""
        with self._lock:
            record = self._keys.pop(hash, None)
            if record is None:
                raise UnknownKey(hash)
            self._order[record.workspace_id].remove(record.sort_key)
            self._version += 1

    def record_use(self, hash: str, usd: float, byok_usd: float = 0.0, at: datetime | None = None) -> None:
        """Spend on a key: bumps lifetime usage, the current windows and ``last_used_at``.

        A use dated (``at``) outside the windows of the fake's current time counts only toward the
        lifetime totals and ``last_used_at``.
        """
        with self._lock:
            record = self._keys.get(hash)
            if record is None:
                raise UnknownKey(hash)
            now = self.now()
            when = now if at is None else utc(at)
            current = Windows.at(now)
            record.roll(current)
            used = current if when == now else Windows.at(when)
            record.usage = decimal_sum(record.usage, usd)
            record.byok_usage = decimal_sum(record.byok_usage, byok_usd)
            usage, byok = record.window_usage, record.window_byok_usage
            for window in WINDOWS:
                if used is current or getattr(used, window) == getattr(current, window):
                    usage[window] = decimal_sum(usage[window], usd)
                    byok[window] = decimal_sum(byok[window], byok_usd)
            if record.last_used_at is None or when > record.last_used_at:
                record.last_used_at = when
            record.changed()

    # ----------------------------------------------------------- HTTP side

    def revoke(self, secret: str) -> None:
        """Revoke a credential (the management key, say): every later request made with it gets 401."""
        with self._lock:
            credential = self._credentials.pop(secret, None)
            if credential is not None:
                self._revoked[secret] = credential

    def restore(self, secret: str) -> None:
        """Undo ``revoke``."""
        with self._lock:
            credential = self._revoked.pop(secret, None)
            if credential is not None:
                self._credentials[secret] = credential

    def credential(self, secret: str) -> _Credential | None:
        with self._lock:
            return self._credentials.get(secret)

    def current_key(self, credential: _Credential) -> dict[str, Any] | None:
        """The ``GET /key`` data for a credential, or None when it no longer authenticates."""
        with self._lock:
            now = self.now()
            windows = Windows.at(now)
            record = self._keys.get(credential.key_hash) if credential.key_hash else None
            if credential.key_hash is not None and (record is None or record.disabled or record.is_expired(now)):
                return None
            limit = record.limit if record else None
            budget = None
            if record is not None and record.limit is not None:
                reset = record.limit_reset if record.limit_reset in WINDOWS else None
                budget = {
                    "scope": "key_limit",
                    "limit_usd": record.limit,
                    "spend_usd": record.limit_spend(windows),
                    "remaining_usd": record.limit_remaining(windows),
                    "reset_interval": reset,
                    "resets_at": None
                    if reset is None
                    else format_time(windows.next_start(reset), microsecond_style=False),
                    "include_byok": record.include_byok_in_limit,
                    "guardrail_id": None,
                    "budget_id": None,
                }

            def number(name: str, window: str | None = None, byok: bool = False) -> float:
                if record is None:
                    return 0.0
                if window is None:
                    return float(getattr(record, name))
                return record.usage_in(window, windows, byok=byok)

            return {
                "label": credential.label,
                "limit": limit,
                "limit_remaining": record.limit_remaining(windows) if record else None,
                "limit_reset": record.limit_reset if record else None,
                "include_byok_in_limit": record.include_byok_in_limit if record else False,
                "usage": number("usage"),
                "usage_daily": number("", "daily"),
                "usage_weekly": number("", "weekly"),
                "usage_monthly": number("", "monthly"),
                "byok_usage": number("byok_usage"),
                "byok_usage_daily": number("", "daily", byok=True),
                "byok_usage_weekly": number("", "weekly", byok=True),
                "byok_usage_monthly": number("", "monthly", byok=True),
                "is_free_tier": False,
                "is_management_key": credential.is_management,
                "is_provisioning_key": credential.is_management,
                "creator_user_id": record.creator_user_id if record else None,
                "expires_at": None
                if record is None or record.expires_at is None
                else format_time(record.expires_at, microsecond_style=False),
                "rate_limit": {"requests": -1, "interval": "10s", "note": "This field is deprecated."},
                "organization_id": self.organization_id,
                "workspace_id": record.workspace_id if record else credential.workspace_id,
                "allowed_data_regions": ["global"],
                "budgets": [budget] if budget else [],
                "effective_budget": budget,
                "free_model_daily_requests": {"limit": 1000, "remaining": 1000, "used": 0},
            }

    def render(self, key: dict[str, Any]) -> dict[str, Any]:
        """A key object as the wire shows it: ``omit_fields`` dropped, ``extra_fields`` added."""
        for name in self.omit_fields:
            key.pop(name, None)
        key.update(self.extra_fields)
        return key

    def list_page(
        self, workspace_id: str, offset: int, *, include_disabled: bool, include_expired: bool
    ) -> list[dict[str, Any]]:
        """One ``GET /keys`` page: up to 100 keys of a workspace from ``offset``, newest first."""
        with self._lock:
            windows, keys = self._page(workspace_id, offset, include_disabled, include_expired)
            return [self.render(key.to_json(windows)) for key in keys]

    def list_page_body(self, workspace_id: str, offset: int, *, include_disabled: bool, include_expired: bool) -> bytes:
        """``list_page`` as the body of its answer, ``{"data":[...]}`` in compact JSON: each key's
        JSON is encoded once while it holds (every time, with ``omit_fields`` or ``extra_fields``)."""
        with self._lock:
            windows, keys = self._page(workspace_id, offset, include_disabled, include_expired)
            if self.omit_fields or self.extra_fields:
                page = [self.render(key.to_json(windows)) for key in keys]
                return json.dumps({"data": page}, separators=(",", ":"), allow_nan=False).encode()
            return b'{"data":[' + b",".join([key.encoded(windows) for key in keys]) + b"]}"

    def _page(
        self, workspace_id: str, offset: int, include_disabled: bool, include_expired: bool
    ) -> tuple[Windows, list[_Key]]:
        if workspace_id not in self._workspaces:
            raise UnknownWorkspace(workspace_id)
        now = self.now()
        if include_disabled and include_expired:
            hashes = [h for _, h in self._order[workspace_id].sorted()[offset : offset + PAGE_SIZE]]
        else:
            hashes = self._visible(workspace_id, now, include_disabled, include_expired)[offset : offset + PAGE_SIZE]
        return Windows.at(now), [self._keys[h] for h in hashes]

    def _visible(self, workspace_id: str, now: datetime, include_disabled: bool, include_expired: bool) -> list[str]:
        cache_key = (workspace_id, include_disabled, include_expired)
        clock_mark = None if include_expired else now
        cached = self._filtered.get(cache_key)
        if cached is not None and cached[0] == self._version and cached[1] == clock_mark:
            return cached[2]
        hashes = []
        for _, key_hash in self._order[workspace_id].sorted():
            record = self._keys[key_hash]
            if record.disabled and not include_disabled:
                continue
            if not include_expired and record.is_expired(now):
                continue
            hashes.append(key_hash)
        self._filtered[cache_key] = (self._version, clock_mark, hashes)
        return hashes

    def workspace_page(self, offset: int, limit: int) -> tuple[list[dict[str, Any]], int]:
        with self._lock:
            workspaces = list(self._workspaces.values())
            return [dict(w) for w in workspaces[offset : offset + limit]], len(workspaces)

    # ---------------------------------------------------------- call record

    @property
    def calls(self) -> list[Call]:
        """Every request received so far, in arrival order of completion."""
        with self._lock:
            return list(self._calls)

    def mutating_calls(self) -> list[Call]:
        """The POST, PATCH and DELETE calls (whatever their status; see ``Call.succeeded``)."""
        with self._lock:
            return [call for call in self._calls if call.method in ("POST", "PATCH", "DELETE")]

    def change_counts(self) -> Counter[tuple[str, str]]:
        """How many PATCH and DELETE requests each key received, as ``(method, hash) -> count``.

        Every request counts, whatever became of it (answered, refused, or dropped), so a drill can
        assert that no destructive call was ever sent twice.
        """
        with self._lock:
            return Counter(
                (call.method, call.path.rsplit("/", 1)[-1])
                for call in self._calls
                if call.method in ("PATCH", "DELETE") and call.path.startswith("/keys/")
            )

    def clear_calls(self) -> None:
        with self._lock:
            self._calls.clear()

    def record_call(self, call: Call) -> None:
        with self._lock:
            self._calls.append(call)

    def request_started(self) -> None:
        with self._stats_lock:
            self.request_count += 1
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)

    def request_finished(self) -> None:
        with self._stats_lock:
            self._in_flight -= 1

    @property
    def in_flight(self) -> int:
        """Requests being answered right now (a dead client's request is still carried out)."""
        with self._stats_lock:
            return self._in_flight

    def reset_stats(self) -> None:
        """Zero ``request_count`` and ``max_in_flight``."""
        with self._stats_lock:
            self.request_count = 0
            self.max_in_flight = self._in_flight
