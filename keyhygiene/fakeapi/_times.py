"""UTC windows and the two timestamp styles the API emits.

Windows follow the reference: days start at 00:00 UTC, weeks run Monday to Sunday, months are calendar
months. Timestamps are written either as ``2025-08-24T10:30:00Z`` (the spec examples) or as
``2025-02-19T20:52:27.363244+00:00`` (the guide's example), because clients must read both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache

WINDOWS = ("daily", "weekly", "monthly")

# POST /keys accepts only UTC with seconds: ``YYYY-MM-DDTHH:MM:SS[.fff]Z`` (or ``+00:00``).
_EXPIRES_AT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|\+00:00)$")


@dataclass(frozen=True, slots=True)
class Windows:
    """The UTC day, week (its Monday) and month (its first day) that contain one instant."""

    daily: date
    weekly: date
    monthly: date

    @classmethod
    def at(cls, moment: datetime) -> Windows:
        return _windows_of(moment.astimezone(UTC).date())

    def start(self, window: str) -> datetime:
        """The first instant of ``daily``, ``weekly`` or ``monthly``."""
        day: date = getattr(self, window)
        return datetime(day.year, day.month, day.day, tzinfo=UTC)

    def next_start(self, window: str) -> datetime:
        """The first instant after ``daily``, ``weekly`` or ``monthly`` ends."""
        day: date = getattr(self, window)
        if window == "daily":
            day = day + timedelta(days=1)
        elif window == "weekly":
            day = day + timedelta(days=7)
        else:
            day = date(day.year + day.month // 12, day.month % 12 + 1, 1)
        return datetime(day.year, day.month, day.day, tzinfo=UTC)


@lru_cache(maxsize=1024)
def _windows_of(day: date) -> Windows:
    """``Windows.at`` any instant of ``day``: one object per day, made once (a simulated day asks
    for it once per use of every key)."""
    return Windows(daily=day, weekly=day - timedelta(days=day.weekday()), monthly=day.replace(day=1))


def utc(value: datetime | str) -> datetime:
    """An aware UTC datetime from a datetime or an ISO 8601 string; naive values are refused."""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    if moment.tzinfo is None:
        raise ValueError(f"time {value!r} has no UTC offset; the fake only takes aware times")
    return moment.astimezone(UTC)


def optional_utc(value: datetime | str | None) -> datetime | None:
    return None if value is None else utc(value)


@lru_cache(maxsize=1 << 18)
def format_time(moment: datetime, *, microsecond_style: bool) -> str:
    """``2025-08-24T10:30:00Z``, or ``2025-02-19T20:52:27.363244+00:00`` when asked. Remembered:
    every listing writes every key's times again."""
    moment = moment.astimezone(UTC)
    if microsecond_style:
        return moment.isoformat(timespec="microseconds")
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_expires_at(text: str) -> datetime | None:
    """The expiry a POST asked for, or None when it breaks the documented format rules."""
    if not _EXPIRES_AT.match(text):
        return None
    try:
        return utc(text)
    except ValueError:
        return None


def micros(moment: datetime) -> int:
    """Whole microseconds since the epoch: an exact sort key."""
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
