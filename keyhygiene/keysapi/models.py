"""Typed views of the API's objects.

Each model keeps the raw JSON it came from, tolerates fields it does not know, and tolerates the
absence of the newer fields (``expires_at``, ``last_used_at``, ``workspace_id``, ``external_user``,
``creator_user_id``). A field that is present but of the wrong type, a number that is not finite
and a time outside 1970-9000 are a malformed response (the sync stores nothing); negative and huge
finite numbers are kept as the API gave them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from keyhygiene.timeutil import SPEND_WINDOWS, TimeFormatError, parse_api_time

from .errors import MalformedResponse


def _number(data: Mapping[str, Any], name: str, default: float | None = 0.0) -> float | None:
    value = data.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MalformedResponse(f"field {name!r} is {value!r:.60}, expected a number")
    # Python's JSON reader accepts NaN and Infinity, and an integer of 400 digits has no float:
    # neither is an amount of money, and NaN compares false with every threshold.
    number = float(value) if isinstance(value, float) or abs(value) < 2**1023 else math.inf
    if not math.isfinite(number):
        raise MalformedResponse(f"field {name!r} is {value!r:.60}, expected a finite number")
    return number


SPEND_COUNTERS = tuple(f"{kind}_{window}" for kind in ("usage", "byok_usage") for window in SPEND_WINDOWS)
_NULL_UNKNOWN = (*SPEND_COUNTERS, "byok_usage", "include_byok_in_limit")
_ABSENT_UNKNOWN = ("limit", "limit_remaining")


def _required_number(data: Mapping[str, Any], name: str) -> float:
    value = _number(data, name, 0.0)
    return 0.0 if value is None else value


def _string(data: Mapping[str, Any], name: str, *, required: bool = False) -> str | None:
    value = data.get(name)
    if value is None:
        if required:
            raise MalformedResponse(f"field {name!r} is missing")
        return None
    if not isinstance(value, str):
        raise MalformedResponse(f"field {name!r} is {value!r}, expected a string")
    return value


def _bool(data: Mapping[str, Any], name: str, default: bool = False) -> bool:
    value = data.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise MalformedResponse(f"field {name!r} is {value!r}, expected a boolean")
    return value


def _time(data: Mapping[str, Any], name: str) -> datetime | None:
    try:
        return parse_api_time(data.get(name))
    except TimeFormatError as exc:
        raise MalformedResponse(f"field {name!r}: {exc}") from None


@dataclass(frozen=True, slots=True)
class Key:
    """One API key as ``GET /keys`` describes it (never the secret itself)."""

    hash: str
    name: str
    label: str
    disabled: bool
    limit: float | None
    limit_remaining: float | None
    limit_reset: str | None
    include_byok_in_limit: bool
    usage: float
    usage_daily: float
    usage_weekly: float
    usage_monthly: float
    byok_usage: float
    byok_usage_daily: float
    byok_usage_weekly: float
    byok_usage_monthly: float
    created_at: datetime
    updated_at: datetime | None
    expires_at: datetime | None
    last_used_at: datetime | None
    workspace_id: str | None
    creator_user_id: str | None
    external_user: str | None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def reports_last_used(self) -> bool:
        """Whether the API gave ``last_used_at`` at all (older API versions do not)."""
        return "last_used_at" in self.raw

    @property
    def unknown_counters(self) -> frozenset[str]:
        """The spend fields the API left out or sent as null (the counters ``usage_daily``,
        ``byok_usage_monthly``, ..., ``byok_usage``, and ``include_byok_in_limit``), and ``limit`` or
        ``limit_remaining`` left out (null there means no limit): read as 0, false or none above,
        which proves nothing."""
        raw = self.raw
        if not raw:
            return frozenset()
        unknown = {name for name in _NULL_UNKNOWN if raw.get(name) is None}
        return frozenset(unknown.union(name for name in _ABSENT_UNKNOWN if name not in raw))

    def usage_in(self, window: str) -> float:
        """Credit spend in ``daily``, ``weekly``, ``monthly`` or ``total`` (lifetime)."""
        return float(getattr(self, "usage" if window == "total" else f"usage_{window}"))

    def byok_usage_in(self, window: str) -> float:
        """BYOK spend in ``daily``, ``weekly``, ``monthly`` or ``total`` (lifetime)."""
        return float(getattr(self, "byok_usage" if window == "total" else f"byok_usage_{window}"))

    def with_changes(self, **changes: Any) -> Key:
        """A copy with some fields changed and the raw JSON updated to match."""
        raw = dict(self.raw)
        for name, value in changes.items():
            raw[name] = value.isoformat().replace("+00:00", "Z") if isinstance(value, datetime) else value
        return replace(self, raw=raw, **changes)

    @classmethod
    def from_api(cls, data: object) -> Key:
        """Build a key from one item of ``GET /keys`` or the ``data`` of a single-key response."""
        if not isinstance(data, Mapping):
            raise MalformedResponse(f"expected a key object, got {type(data).__name__}")
        created_at = _time(data, "created_at")
        if created_at is None:
            raise MalformedResponse("field 'created_at' is missing")
        return cls(
            hash=_string(data, "hash", required=True) or "",
            name=_string(data, "name") or "",
            label=_string(data, "label") or "",
            disabled=_bool(data, "disabled"),
            limit=_number(data, "limit", None),
            limit_remaining=_number(data, "limit_remaining", None),
            limit_reset=_string(data, "limit_reset"),
            include_byok_in_limit=_bool(data, "include_byok_in_limit"),
            usage=_required_number(data, "usage"),
            usage_daily=_required_number(data, "usage_daily"),
            usage_weekly=_required_number(data, "usage_weekly"),
            usage_monthly=_required_number(data, "usage_monthly"),
            byok_usage=_required_number(data, "byok_usage"),
            byok_usage_daily=_required_number(data, "byok_usage_daily"),
            byok_usage_weekly=_required_number(data, "byok_usage_weekly"),
            byok_usage_monthly=_required_number(data, "byok_usage_monthly"),
            created_at=created_at,
            updated_at=_time(data, "updated_at"),
            expires_at=_time(data, "expires_at"),
            last_used_at=_time(data, "last_used_at"),
            workspace_id=_string(data, "workspace_id"),
            creator_user_id=_string(data, "creator_user_id"),
            external_user=_string(data, "external_user"),
            raw=dict(data),
        )


@dataclass(frozen=True, slots=True)
class CurrentKey:
    """What ``GET /key`` says about the credential in use."""

    label: str
    is_management_key: bool
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_api(cls, data: object) -> CurrentKey:
        if not isinstance(data, Mapping):
            raise MalformedResponse(f"expected a key object, got {type(data).__name__}")
        # ``is_provisioning_key`` is the deprecated name of the same flag.
        is_management = _bool(data, "is_management_key") or _bool(data, "is_provisioning_key")
        return cls(label=_string(data, "label") or "", is_management_key=is_management, raw=dict(data))


@dataclass(frozen=True, slots=True)
class Workspace:
    """One workspace from ``GET /workspaces``."""

    id: str
    name: str
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_api(cls, data: object) -> Workspace:
        if not isinstance(data, Mapping):
            raise MalformedResponse(f"expected a workspace object, got {type(data).__name__}")
        return cls(
            id=_string(data, "id", required=True) or "",
            name=_string(data, "name") or "",
            raw=dict(data),
        )


@dataclass(frozen=True, slots=True)
class CreatedKey:
    """The answer to ``POST /keys``: the key and, this once only, its secret."""

    key: Key
    secret: str = field(repr=False)
