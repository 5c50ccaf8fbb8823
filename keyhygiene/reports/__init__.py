"""Historical reports from the snapshots and the audit log."""

from __future__ import annotations

from sqlalchemy.orm import Session

from .base import Report, ReportBuilder, ReportError, ReportParams, with_workspace_names

__all__ = ["Report", "ReportBuilder", "ReportError", "ReportParams", "builders", "table_columns"]


def builders() -> dict[str, ReportBuilder]:
    """Report kind → builder. ``html`` is not here: it writes a file (see keyhygiene.reports.html)."""
    from . import actions, idle, inventory, runs, spend, trends

    return {
        "inventory": _named(inventory.build),
        "spend": _named(spend.build),
        "actions": _named(actions.build),
        "idle": _named(idle.build),
        "trends": trends.build,
        "runs": runs.build,
    }


def _named(build: ReportBuilder) -> ReportBuilder:
    """``build``, with each workspace's name beside its id (as the newest snapshot listed it)."""
    from db import snapshots

    def build_named(session: Session, params: ReportParams) -> Report:
        return with_workspace_names(build(session, params), snapshots.workspace_names(session))

    return build_named


def table_columns(kind: str) -> list[str] | None:
    """The narrower column set a report shows in a terminal table, if it has one.

    Reports also carry their own (``Report.table_columns``), which is what the table uses when this
    gives None; spend has none here because its columns depend on ``--by``.
    """
    from . import actions, idle, inventory, runs, trends

    return {
        "inventory": inventory.TABLE_COLUMNS,
        "actions": actions.TABLE_COLUMNS,
        "idle": idle.TABLE_COLUMNS,
        "trends": trends.TABLE_COLUMNS,
        "runs": runs.TABLE_COLUMNS,
    }.get(kind)
