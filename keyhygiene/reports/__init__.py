"""Historical reports from the snapshots and the audit log."""

from __future__ import annotations

from .base import Report, ReportBuilder, ReportError, ReportParams

__all__ = ["Report", "ReportBuilder", "ReportError", "ReportParams", "builders", "table_columns"]


def builders() -> dict[str, ReportBuilder]:
    """Report kind → builder. ``html`` is not here: it writes a file (see keyhygiene.reports.html)."""
    from . import inventory

    return {"inventory": inventory.build}


def table_columns(kind: str) -> list[str] | None:
    """The narrower column set a report shows in a terminal table, if it has one."""
    from . import inventory

    return {"inventory": inventory.TABLE_COLUMNS}.get(kind)
