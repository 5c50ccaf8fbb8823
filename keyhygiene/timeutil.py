"""Durations and times as keyhygiene reads and writes them.

Durations are written ``90s``, ``15m``, ``12h``, ``30d`` or ``2w``, at most 100 years. Times are
ISO 8601; a time without an offset means UTC. Every datetime that leaves this module is
timezone-aware UTC and lies in ``EARLIEST_TIME .. LATEST_TIME``, so that adding or subtracting any
duration we accept can never overflow.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$", re.ASCII)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

MAX_DURATION = timedelta(days=36500)
"""The longest duration anything accepts: 100 years (36500d)."""
# Far enough from datetime.min/max that a time plus or minus MAX_DURATION stays representable.
EARLIEST_TIME = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_TIME = datetime(9000, 1, 1, tzinfo=UTC)


class TimeFormatError(ValueError):
    """A duration or time that cannot be read; the message quotes it and says what was expected,
    ``reason`` says the same without the quote (for callers that show the value themselves)."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = message if reason is None else reason


SPEND_WINDOWS = ("daily", "weekly", "monthly")
"""OpenRouter's spend windows (``usage_daily``, ``byok_usage_weekly``, ...), shortest first."""


def window_starts(at: datetime) -> dict[str, datetime]:
    """When the UTC day, the UTC week (from Monday) and the UTC calendar month of ``at`` began, by
    the name of their spend window."""
    day = at.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return {"daily": day, "weekly": day - timedelta(days=day.weekday()), "monthly": day.replace(day=1)}


def parse_duration(text: str) -> timedelta:
    """Read ``90s``, ``15m``, ``12h``, ``30d`` or ``2w`` into a timedelta of at most 100 years."""
    match = _DURATION.match(text) if isinstance(text, str) else None
    if match is None:
        reason = "expected a whole number and a unit, like 90s, 15m, 12h, 30d or 2w"
        raise TimeFormatError(f"invalid duration {_shown(text)}: {reason}", reason)
    digits, unit = match.group(1).lstrip("0") or "0", match.group(2)
    # Compared as whole numbers before any timedelta exists: "9999999999999w" would overflow it
    # (and a number of thousands of digits is past what int() reads).
    if len(digits) > 12 or int(digits) * _UNIT_SECONDS[unit] > MAX_DURATION.total_seconds():
        reason = "too long: at most 100 years (36500d)"
        raise TimeFormatError(f"duration {_shown(text)} is {reason}", reason)
    return timedelta(seconds=int(digits) * _UNIT_SECONDS[unit])


def _shown(text: object) -> str:
    """A refused value as messages quote it: repr, cut short (a 1 MiB line is not a message)."""
    shown = repr(text)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def format_duration(delta: timedelta) -> str:
    """Write a timedelta in the largest unit that divides it exactly."""
    seconds = int(delta.total_seconds())
    for unit in ("w", "d", "h", "m"):
        size = _UNIT_SECONDS[unit]
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def parse_time(text: str) -> datetime:
    """Read an ISO 8601 time (``Z``, ``+00:00``, fractions or a bare date); naive means UTC.

    The time, converted to UTC, must lie in ``EARLIEST_TIME .. LATEST_TIME`` (1970 to 9000).
    """
    try:
        value = as_utc(datetime.fromisoformat(text.strip()))
    except OverflowError:  # e.g. 9999-12-31T23:59:59-14:00 is past datetime.max in UTC
        value = None
    except (ValueError, AttributeError):
        reason = "expected ISO 8601, like 2026-01-31 or 2026-01-31T12:00:00Z"
        raise TimeFormatError(f"invalid time {_shown(text)}: {reason}", reason) from None
    if value is None or not EARLIEST_TIME <= value < LATEST_TIME:
        reason = "out of range: expected a time between 1970 and 9000 (UTC)"
        raise TimeFormatError(f"time {_shown(text)} is {reason}", reason)
    return value


def parse_api_time(value: object) -> datetime | None:
    """Read a timestamp from the API, tolerating null and both documented styles."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        reason = "expected an ISO 8601 string"
        raise TimeFormatError(f"invalid timestamp {_shown(value)}: {reason}", reason)
    return parse_time(value)


def as_utc(value: datetime) -> datetime:
    """Attach UTC to a naive datetime, or convert an aware one to UTC."""
    zone = value.tzinfo
    if zone is UTC:  # as the store and the API client give times: nothing to convert
        return value
    if zone is None:
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
