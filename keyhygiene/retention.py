"""The ``prune`` job: remove history older than ``KEYHYGIENE_RETENTION`` without changing any
report about a time inside it, and audit records older than ``KEYHYGIENE_AUDIT_RETENTION``.

What is kept and why is described in :mod:`db.retention`. The work is done in batches of at most
``BATCH`` rows, each in its own short transaction, so a sync that runs meanwhile waits for one
batch at most (on SQLite, where a writer locks the whole database, that is milliseconds).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from db import notices, retention, rollups, snapshots, statistics

from . import logging as khlog
from .context import Database, refresh_statistics, session_scope
from .timeutil import isoformat

if TYPE_CHECKING:
    from collections.abc import Callable


log = khlog.get_logger(__name__)

BATCH = 5000


@dataclass
class PruneResult:
    """What one prune removed."""

    cutoff: datetime
    audit_cutoff: datetime | None
    anchor_snapshot: int | None = None
    versions_deleted: int = 0
    snapshots_pruned: int = 0
    snapshots_deleted: int = 0
    runs_deleted: int = 0
    actions_deleted: int = 0
    rollups_deleted: int = 0
    batches: int = 0
    pages_freed: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "cutoff": isoformat(self.cutoff),
            "audit_cutoff": isoformat(self.audit_cutoff),
            "anchor_snapshot": self.anchor_snapshot,
            "versions_deleted": self.versions_deleted,
            "snapshots_pruned": self.snapshots_pruned,
            "snapshots_deleted": self.snapshots_deleted,
            "runs_deleted": self.runs_deleted,
            "actions_deleted": self.actions_deleted,
            "rollups_deleted": self.rollups_deleted,
            "batches": self.batches,
            "pages_freed": self.pages_freed,
        }

    def message(self) -> str:
        audit = (
            f"{self.actions_deleted} audit records before {isoformat(self.audit_cutoff)}"
            if self.audit_cutoff is not None
            else "the audit log is kept"
        )
        return (
            f"pruned history before {isoformat(self.cutoff)}: {self.versions_deleted} key versions, "
            f"{self.snapshots_deleted} snapshots and {self.runs_deleted} runs deleted; {audit}"
        )


def prune(
    database: Database,
    *,
    now: datetime,
    retention_period: timedelta,
    audit_retention: timedelta | None = None,
    batch: int = BATCH,
) -> PruneResult:
    """Remove what is older than the retentions, ``batch`` rows per transaction at most."""
    result = PruneResult(cutoff=now - retention_period, audit_cutoff=now - audit_retention if audit_retention else None)

    def step(work: Callable[[Any], int]) -> int:
        with session_scope(database) as session:
            done = work(session)
        result.batches += 1
        return done

    if result.audit_cutoff is not None:
        refresh_statistics(database, statistics.audit_statistics)  # before old records are looked for
        audit_cutoff = result.audit_cutoff
        # The shrink guard counts the keys keyhygiene deleted since the snapshot before the newest
        # (``enforcement.inventory_shrink``): those records stay, however long syncs have failed.
        with database.sessions() as session:
            guarded = snapshots.guard_window_start(session)

        def old_actions(session: Any) -> int:
            return retention.delete_old_actions(session, before=audit_cutoff, limit=batch, deletes_from=guarded)

        while count := step(old_actions):
            result.actions_deleted += count
        while step(lambda s: retention.delete_unreferenced_plans(s, limit=batch)):
            pass

    with database.sessions() as session:
        anchor = retention.anchor_snapshot(session, result.cutoff)
    if anchor is not None:
        result.anchor_snapshot = anchor.id
        # Marked first: a report at a time before the anchor then says the history was pruned,
        # never shows the inventory of a snapshot whose versions are half deleted.
        while count := step(lambda s: retention.mark_pruned(s, anchor_id=anchor.id, limit=batch)):
            result.snapshots_pruned += count
        result.versions_deleted = _prune_versions(database, anchor.id, batch, result)
        assert anchor.taken_at is not None
        anchor_taken_at = anchor.taken_at
        while count := step(
            lambda s: rollups.prune_rollups(s, anchor_id=anchor.id, anchor_taken_at=anchor_taken_at, limit=batch)
        ):
            result.rollups_deleted += count

    while step(lambda s: retention.delete_forgotten_keys(s, limit=batch)):
        pass
    step(lambda s: retention.delete_abandoned_staging(s, cutoff=result.cutoff))
    anchor_id = anchor.id if anchor is not None else None
    while count := step(
        lambda s: retention.delete_old_snapshots(s, anchor_id=anchor_id, cutoff=result.cutoff, limit=batch)
    ):
        result.snapshots_deleted += count
    # Notices live as long as the snapshots: then the runs they name can go too.
    while step(lambda s: notices.delete_old_notices(s, before=result.cutoff, limit=batch)):
        pass
    while count := step(lambda s: retention.delete_old_runs(s, cutoff=result.cutoff, limit=batch)):
        result.runs_deleted += count
    result.pages_freed = retention.reclaim_space(database.engine)
    return result


def _prune_versions(database: Database, anchor_id: int, batch: int, result: PruneResult) -> int:
    """Delete versions that ended at or before the anchor, ``batch`` rows per transaction."""
    deleted = 0
    while True:
        with session_scope(database) as session:
            count = retention.delete_ended_versions(session, anchor_id=anchor_id, limit=batch)
        result.batches += 1
        if not count:
            return deleted
        deleted += count
