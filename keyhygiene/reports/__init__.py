"""Historical reports from the snapshots and the audit log."""

from __future__ import annotations

from sqlalchemy.orm import Session

from .base import Report, ReportBuilder, ReportError, ReportParams, with_workspace_names

__all__ = ["Report", "ReportBuilder", "ReportError", "ReportParams", "builders"]


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
    """``build``, with each workspace's name beside its id: as the newest snapshot listed it, or for
    a workspace deleted since, as the newest snapshot that listed it did."""
    from db import snapshots

    def build_named(session: Session, params: ReportParams) -> Report:
        return with_workspace_names(build(session, params), snapshots.WorkspaceNames(session))

    return build_named
