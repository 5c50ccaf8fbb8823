"""The cron expression of the periodic run (UTC): validated, and asked when it fires next and how
often it fires at most. Celery's crontab is the one judge, as it is the one that runs the schedule."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from celery.schedules import crontab

# A period is measured over this many consecutive firings, enough to see every gap of any cron
# expression whose fields repeat within a few years.
_FIRINGS = 200


@dataclass(frozen=True, slots=True)
class Cron:
    """The five fields of a cron expression: minute, hour, day of month, month, day of week."""

    minute: str
    hour: str
    day_of_month: str
    month_of_year: str
    day_of_week: str


def parse_cron(expression: str) -> Cron:
    """Split and validate a five-field cron expression; raise ValueError saying what is wrong."""
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(
            f"{expression!r} is not a cron expression: expected five fields "
            "(minute hour day-of-month month day-of-week), like '0 * * * *'"
        )
    cron = Cron(*fields)
    # Celery's own parser is the one that will run the schedule, so it is the judge of validity.
    from celery.schedules import crontab

    try:
        parsed = crontab(
            minute=cron.minute,
            hour=cron.hour,
            day_of_month=cron.day_of_month,
            month_of_year=cron.month_of_year,
            day_of_week=cron.day_of_week,
        )
    except Exception as exc:  # celery raises ValueError or its own ParseException
        raise ValueError(f"{expression!r} is not a valid cron expression: {exc}") from None
    every_day = parsed.day_of_month == set(range(1, 32)) and parsed.day_of_week == set(range(7))
    if not cron.day_of_month.startswith("*") and not cron.day_of_week.startswith("*") and not every_day:
        # Where neither day field starts with "*", cron fires on a day that matches either of them
        # (Vixie cron, cronie); Celery's scheduler, always, only on one that matches both: the same
        # text would run on other days than cron runs it.
        raise ValueError(
            f"{expression!r} restricts both the day of the month ({cron.day_of_month!r}) and the day of "
            f"the week ({cron.day_of_week!r}): cron runs on the days that match either, keyhygiene's "
            "scheduler only on those that match both; write '*' in one of the two"
        )
    return cron


def cron_schedule(cron: Cron) -> crontab:
    from celery.schedules import crontab

    return crontab(
        minute=cron.minute,
        hour=cron.hour,
        day_of_month=cron.day_of_month,
        month_of_year=cron.month_of_year,
        day_of_week=cron.day_of_week,
    )


def next_run(expression: str, *, after: datetime) -> datetime:
    """The first firing of a cron expression (UTC) after ``after``."""
    last, delta, _ = cron_schedule(parse_cron(expression)).remaining_delta(
        after.astimezone(UTC).replace(second=0, microsecond=0), tz=UTC
    )
    return last + delta  # type: ignore[no-any-return]


def shortest_period(expression: str, *, start: datetime | None = None) -> timedelta:
    """The shortest time between two consecutive firings of a cron expression (UTC)."""
    at = next_run(expression, after=start or datetime.now(UTC))
    shortest: timedelta | None = None
    for _ in range(_FIRINGS):
        after = next_run(expression, after=at)
        if after <= at:  # pragma: no cover - would be a Celery bug; never loop on it
            break
        shortest = after - at if shortest is None else min(shortest, after - at)
        at = after
    return shortest or timedelta(hours=1)


def current_period(expression: str, *, now: datetime) -> timedelta:
    """The interval a cron expression (UTC) is in at ``now``: the longer of the gap between its last
    two firings and the gap from the last to the next. A schedule of working hours (``0 9-17 * *
    1-5``) is hourly by day, but on a Monday morning, and until its first run of the week is over,
    its interval is the 64 hours from Friday's last run."""
    shortest = shortest_period(expression, start=now)
    following = next_run(expression, after=now)
    lookback = 3 * shortest
    while lookback <= _LONGEST_LOOKBACK:
        last: list[datetime] = []
        at = now - lookback
        while (at := next_run(expression, after=at)) <= now:
            last = [*last[-1:], at]
        if len(last) == 2:
            return max(last[1] - last[0], following - last[1])
        lookback *= 4
    return shortest  # pragma: no cover - no two firings in two years: a cron expression cannot do that


_LONGEST_LOOKBACK = timedelta(days=800)
"""Where ``current_period`` stops looking: a schedule that fires at least once a year has fired
twice within it."""
