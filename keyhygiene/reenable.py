"""``undo`` and ``enable``: give back keys that keyhygiene disabled, only where nobody changed them since.

Both make each change through enforcement's one path for changing a key (:func:`change_key`: a
fresh GET just before, a write-ahead audit record, one ``key_action`` event), audited as action
``enable``. On the key's fresh state a key is left alone (recorded as skipped, with the reason)
when its ``updated_at`` is no longer the one the API answered our disable with: someone changed it
since, and their change wins. Protected keys are never touched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from db import audit, runs, snapshots
from db.audit import LastChange
from keyhygiene.keysapi.client import KeysClient
from keyhygiene.rules import Decision, KeyFacts, Safety, is_protected

from .context import Database
from .enforcement import Recheck, change_key, record_decision, record_unreached
from .errors import UsageError
from .logging import get_logger
from .timeutil import as_utc, isoformat

log = get_logger(__name__)

MANUAL_RULE = "manual"


def undo_rule(run_id: int) -> str:
    """The rule an undo of run ``run_id`` is audited under."""
    return f"undo:{run_id}"


@dataclass
class ReenableResult:
    """What one undo or enable asked for and did."""

    dry_run: bool
    keys: int = 0
    planned: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    deleted: int = 0
    """Keys the undone run deleted: left alone, since nothing brings a deleted key back."""
    note: str = ""

    @property
    def warning(self) -> str:
        """What the operator must do next, when keys were (or would be) enabled."""
        if (self.planned if self.dry_run else self.done) == 0:
            return ""
        return (
            "the rules that disabled these keys still apply: change them, or protect the keys, "
            "before the next run disables them again"
        )

    def count(self, outcome: str) -> None:
        if outcome == audit.DONE:
            self.done += 1
        elif outcome == audit.PLANNED:
            self.planned += 1
        elif outcome == audit.SKIPPED:
            self.skipped += 1
        else:
            self.failed += 1

    def summary(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "keys": self.keys,
            "planned_changes": self.planned if self.dry_run else self.done + self.failed,
            "done": self.done,
            "skipped": self.skipped,
            "failed": self.failed,
        }

    def message(self) -> str:
        if self.dry_run:
            text = (
                f"dry run: {self.planned} of {self.keys} key(s) would be enabled, {self.skipped} left alone, "
                f"{self.failed} could not be checked; nothing was changed"
            )
        else:
            text = f"{self.done} of {self.keys} key(s) enabled, {self.skipped} left alone, {self.failed} failed"
        if self.deleted:
            text += f"; {self.deleted} of them were deleted and cannot be brought back"
        if self.skipped:
            text += " (why: the reason of each record in `keyhygiene report actions --since 1h --format json`)"
        if self.warning:
            text += f". Note: {self.warning}"
        return f"{self.note}: {text}" if self.note else text


@dataclass(frozen=True, slots=True)
class _Target:
    decision: Decision
    ours: LastChange | None
    """Our newest change of the key, per the audit log."""


def undo_run(
    database: Database,
    client: KeysClient,
    *,
    run_id: int,
    undo_run_id: int,
    safety: Safety,
    dry_run: bool,
    clock: Callable[[], datetime],
    fence: Callable[[], None] | None = None,
) -> ReenableResult:
    """Enable the keys run ``undo_run_id`` disabled, each only if nobody changed it since.

    Raises UsageError (exit 2) when there is no such run.
    """
    rule = undo_rule(undo_run_id)
    with database.sessions() as session:
        undone = runs.get_run(session, undo_run_id)
        if undone is None or undo_run_id >= run_id:  # a later id: this undo's own run, or one begun since
            raise UsageError(f"there is no run {undo_run_id} before this one: see `keyhygiene report runs`")
        changes = audit.changes_of_run(session, undo_run_id)
        ours = audit.last_changes(session, key_hashes=[change.key_hash for change in changes])
    result = ReenableResult(dry_run=dry_run, keys=len(changes))
    if not changes:
        result.note = f"run {undo_run_id} ({undone.kind}) disabled no key: nothing to undo"
        return result
    targets: list[_Target] = []
    skips: list[tuple[Decision, str]] = []
    for change in changes:
        decision = Decision(
            key_hash=change.key_hash,
            key_name=change.key_name,
            workspace_id=change.workspace_id,
            action="enable",
            rule=rule,
            rules=(rule,),
            evidence={
                "undo_run": undo_run_id,
                "disabled_by_rule": change.rule,
                "disabled_at": isoformat(change.finished_at or change.created_at),
            },
        )
        reason = None
        if change.outcome == audit.PENDING:
            reason = (
                f"in doubt: run {undo_run_id} ended before it learned whether its {change.action} was made; "
                "a live undo, or the next enforcement, settles it from the key's fresh state: undo again then"
            )
        elif change.action == "delete":
            # A deleted key cannot be brought back: say so in the audit, without asking the API.
            reason = "deleted: cannot be undone"
            result.deleted += 1
        if reason is not None:
            skips.append((decision, reason))
            continue
        targets.append(_Target(decision, ours.get(change.key_hash)))
    result.note = f"undo of run {undo_run_id}"
    _enable(
        database,
        client,
        targets,
        skips=skips,
        run_id=run_id,
        safety=safety,
        dry_run=dry_run,
        clock=clock,
        result=result,
        fence=fence,
    )
    return result


def enable_keys(
    database: Database,
    client: KeysClient,
    *,
    run_id: int,
    key_hashes: Sequence[str],
    safety: Safety,
    dry_run: bool,
    clock: Callable[[], datetime],
    fence: Callable[[], None] | None = None,
) -> ReenableResult:
    """Enable the given keys, each only if keyhygiene disabled it and nobody changed it since."""
    wanted = list(dict.fromkeys(key_hashes))
    with database.sessions() as session:
        ours = audit.last_changes(session, key_hashes=wanted)
        tracked = snapshots.tracked_hashes(session, wanted)
    targets = []
    unknown: list[Decision] = []
    for key_hash in wanted:
        last = ours.get(key_hash)
        decision = Decision(
            key_hash=key_hash,
            key_name=last.key_name if last is not None else "",
            workspace_id=None,
            action="enable",
            rule=MANUAL_RULE,
            rules=(MANUAL_RULE,),
            evidence=_last_change_evidence(last),
        )
        if last is None and key_hash not in tracked:
            # A name, a shortened hash, a typo, or a key no sync has listed: not asked of the API.
            unknown.append(decision)
        else:
            targets.append(_Target(decision, last))
    result = ReenableResult(dry_run=dry_run, keys=len(wanted))
    reason = (
        "keyhygiene did not disable this key: no snapshot holds a key with this hash (give a key's "
        "full hash, as `keyhygiene report inventory --format json` shows it)"
    )
    _enable(
        database,
        client,
        targets,
        skips=[(decision, reason) for decision in unknown],
        run_id=run_id,
        safety=safety,
        dry_run=dry_run,
        clock=clock,
        result=result,
        fence=fence,
    )
    return result


def _last_change_evidence(last: LastChange | None) -> dict[str, Any]:
    """What the audit says of keyhygiene's newest change of a key that ``enable`` was asked for."""
    if last is None:
        return {}
    if last.action == "disable":
        return {"disabled_by_rule": last.rule, "disabled_at": isoformat(last.at)}
    return {"last_change": last.action, "last_change_rule": last.rule, "last_change_at": isoformat(last.at)}


def _enable(
    database: Database,
    client: KeysClient,
    targets: Sequence[_Target],
    *,
    run_id: int,
    safety: Safety,
    dry_run: bool,
    clock: Callable[[], datetime],
    result: ReenableResult,
    skips: Sequence[tuple[Decision, str]] = (),
    fence: Callable[[], None] | None = None,
) -> None:
    """Record ``skips`` (each key left alone without asking the API, and why), then give back each
    of ``targets`` that is still as our disable left it. Stopped midway, every key not reached yet
    is recorded as such: each key asked for is on record."""
    try:
        for decision, reason in skips:
            result.count(_skip(database, decision, run_id=run_id, now=clock(), dry_run=dry_run, reason=reason))
        for target in targets:
            outcome = change_key(
                database,
                client,
                target.decision,
                run_id=run_id,
                recheck=_unchanged_since_our_disable(target, safety),
                clock=clock,
                dry_run=dry_run,
                fence=fence,
            )
            result.count(outcome)
    except BaseException as exc:
        if not dry_run:  # those with a record of this run already are left out
            every = [decision for decision, _ in skips] + [target.decision for target in targets]
            record_unreached(database, every, run_id=run_id, now=clock(), stopped=exc)
        raise


def _unchanged_since_our_disable(target: _Target, safety: Safety) -> Recheck:
    """Why the fresh key must be left alone, or the decision when it is still as our disable left it."""
    ours = target.ours
    undoing = target.decision.evidence.get("undo_run")

    def check(decision: Decision, fresh: KeyFacts) -> Decision | str:
        if is_protected(fresh, safety):
            return "protected by protect_hashes or protect_names: never touched"
        if undoing is not None and ours is not None and ours.run_id != undoing:
            return f"keyhygiene changed this key again since (its {ours.action} in run {ours.run_id}): left alone"
        if ours is None:
            return "keyhygiene did not disable this key: it re-enables only keys it disabled itself"
        if ours.action != "disable":
            return (
                f"keyhygiene's newest change of this key is its {ours.action} in run {ours.run_id}, not a "
                "disable: it re-enables only keys it disabled itself"
            )
        if ours.key_updated_at is None or fresh.updated_at is None:
            return (
                "cannot tell whether anyone changed the key since our disable (no updated_at: the disable was "
                "settled from the key's state after its answer was lost, or the API gave none): left alone; "
                "enable it in OpenRouter once you know nobody else disabled it"
            )
        if as_utc(fresh.updated_at) != as_utc(ours.key_updated_at):
            return (
                f"changed by someone else since our disable (updated_at {isoformat(fresh.updated_at)}, "
                f"ours {isoformat(ours.key_updated_at)}): left alone"
            )
        return decision

    return check


def _skip(database: Database, decision: Decision, *, run_id: int, now: datetime, dry_run: bool, reason: str) -> str:
    record_decision(database, decision, run_id=run_id, now=now, dry_run=dry_run, outcome=audit.SKIPPED, reason=reason)
    return audit.SKIPPED
