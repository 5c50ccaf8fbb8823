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

from db import notices, retention, rollups

from . import logging as khlog
from .context import Database, session_scope
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
        audit_cutoff = result.audit_cutoff
        while count := step(lambda s: retention.delete_old_actions(s, before=audit_cutoff, limit=batch)):
            result.actions_deleted += count

    with database.sessions() as session:
        anchor = retention.anchor_snapshot(session, result.cutoff)
    if anchor is not None:
        result.anchor_snapshot = anchor.id
        result.versions_deleted = _prune_versions(database, anchor.id, batch, result)
        while count := step(lambda s: retention.mark_pruned(s, anchor_id=anchor.id, limit=batch)):
            result.snapshots_pruned += count
        assert anchor.taken_at is not None
        anchor_taken_at = anchor.taken_at
        while count := step(
            lambda s: rollups.prune_rollups(s, anchor_id=anchor.id, anchor_taken_at=anchor_taken_at, limit=batch)
        ):
            result.rollups_deleted += count

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
    return result


def _prune_versions(database: Database, anchor_id: int, batch: int, result: PruneResult) -> int:
    """Delete versions that ended at or before the anchor, key by key, in pages of ``batch`` rows."""
    deleted = 0
    after: str | None = None
    while True:
        with database.sessions() as session:
            page = retention.ended_versions(session, anchor_id=anchor_id, after_key=after, limit=batch)
            if not page:
                return deleted
            by_key: dict[str, list[retention.OldVersion]] = {}
            for version in page:
                by_key.setdefault(version.key_hash, []).append(version)
            keys = list(by_key)
            if len(page) >= batch and len(keys) > 1:
                keys.pop()  # its rows may go on in the next page: read it whole there
            following = retention.successors(session, anchor_id=anchor_id, key_hashes=keys)
        doomed: list[int] = []
        for key_hash in keys:
            keep = retention.versions_to_keep(by_key[key_hash], following.get(key_hash))
            doomed.extend(version.id for version in by_key[key_hash] if version.id not in keep)
        for start in range(0, len(doomed), batch):
            with session_scope(database) as session:
                deleted += retention.delete_versions(session, doomed[start : start + batch])
            result.batches += 1
        after = keys[-1]
