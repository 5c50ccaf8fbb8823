"""The cron expression of the periodic run (UTC), read once and validated."""

from __future__ import annotations

from dataclasses import dataclass


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
        crontab(
            minute=cron.minute,
            hour=cron.hour,
            day_of_month=cron.day_of_month,
            month_of_year=cron.month_of_year,
            day_of_week=cron.day_of_week,
        )
    except Exception as exc:  # celery raises ValueError or its own ParseException
        raise ValueError(f"{expression!r} is not a valid cron expression: {exc}") from None
    return cron
