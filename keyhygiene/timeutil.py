"""Durations and times as keyhygiene reads and writes them.

Durations are written ``90s``, ``15m``, ``12h``, ``30d`` or ``2w``. Times are ISO 8601; a time
without an offset means UTC. Every datetime that leaves this module is timezone-aware UTC.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class TimeFormatError(ValueError):
    """A duration or time that cannot be read; the message says what was expected."""


def parse_duration(text: str) -> timedelta:
    """Read ``90s``, ``15m``, ``12h``, ``30d`` or ``2w`` into a timedelta."""
    match = _DURATION.match(text) if isinstance(text, str) else None
    if match is None:
        raise TimeFormatError(
            f"invalid duration {text!r}: expected a whole number and a unit, like 90s, 15m, 12h, 30d or 2w"
        )
    return timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def format_duration(delta: timedelta) -> str:
    """Write a timedelta in the largest unit that divides it exactly."""
    seconds = int(delta.total_seconds())
    for unit in ("w", "d", "h", "m"):
        size = _UNIT_SECONDS[unit]
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def parse_time(text: str) -> datetime:
    """Read an ISO 8601 time (``Z``, ``+00:00``, fractions or a bare date); naive means UTC."""
    try:
        value = datetime.fromisoformat(text.strip())
    except (ValueError, AttributeError):
        raise TimeFormatError(
            f"invalid time {text!r}: expected ISO 8601, like 2026-01-31 or 2026-01-31T12:00:00Z"
        ) from None
    return as_utc(value)


def parse_api_time(value: object) -> datetime | None:
    """Read a timestamp from the API, tolerating null and both documented styles."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise TimeFormatError(f"invalid timestamp {value!r}: expected an ISO 8601 string")
    return parse_time(value)


def as_utc(value: datetime) -> datetime:
    """Attach UTC to a naive datetime, or convert an aware one to UTC."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def utcnow() -> datetime:
    """The current time, aware, in UTC. Only entry points call this; everything else takes ``now``."""
    return datetime.now(UTC)


def isoformat(value: datetime | None) -> str | None:
    """Write a time as ``YYYY-MM-DDTHH:MM:SSZ`` (with fractions when present)."""
    if value is None:
        return None
    return as_utc(value).isoformat().replace("+00:00", "Z")
