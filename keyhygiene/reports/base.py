"""What every report is: typed parameters in, columns and rows out."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from fnmatch import fnmatchcase
from typing import Any

from sqlalchemy.orm import Session

from rules import RuleSet


class ReportError(ValueError):
    """A report that cannot be made from what is stored (no snapshot yet, --at too early...)."""


@dataclass(frozen=True, slots=True)
class ReportParams:
    """The options of ``keyhygiene report``."""

    now: datetime
    since: timedelta | None = None
    at: datetime | None = None
    workspaces: tuple[str, ...] = ()
    name: str | None = None
    ruleset: RuleSet | None = None

    def wants(self, *, name: str, workspace_id: str | None) -> bool:
        """Whether a key passes the --workspace and --name filters."""
        if self.workspaces and workspace_id not in self.workspaces:
            return False
        return self.name is None or fnmatchcase(name, self.name)

    def period_start(self, default: timedelta) -> datetime:
        return (self.at or self.now) - (self.since or default)


@dataclass(frozen=True, slots=True)
class Report:
    """Columns in display order and one dict per row (JSON-able values)."""

    title: str
    columns: Sequence[str]
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)


ReportBuilder = Callable[[Session, ReportParams], Report]
