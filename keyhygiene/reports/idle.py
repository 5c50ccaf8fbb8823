"""``report idle``: keys with no new use, for how long, and when a configured rule will act on them.

Read at the newest snapshot (or the last one at or before --at) and measured to now (or --at).
A key's idleness is the engine's own (``keyhygiene.rules.idle_since``): the latest sign of use from
``last_used_at`` and from the snapshots' usage history. Keys idle for at least --since (default
7d) are listed, longest idle first. With a rules file, ``next_action``/``acts_on`` give the first
thing a rule will do to the key if nothing changes (``keyhygiene.rules.next_action``, the plan's own
answer); ``acts_on`` equal to the report time means at the next run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session

from db import snapshots
from db.models import Snapshot
from keyhygiene.enforcement import FACT_FIELDS, key_history, load_audit_facts, stored_facts
from keyhygiene.errors import EXIT_USAGE
from keyhygiene.keysapi.models import Key
from keyhygiene.rules import AuditFacts, KeyFacts, KeyHistory, NextAction, idle_since, is_protected, next_action
from keyhygiene.rules.model import duration_text
from keyhygiene.timeutil import as_utc

from .base import Report, ReportError, ReportParams, snapshot_for, usd

DEFAULT_IDLE = timedelta(days=7)

COLUMNS = [
    "key_hash",
    "name",
    "workspace_id",
    "owner",
    "disabled",
    "expired",
    "protected",
    "idle_since",
    "idle_days",
    "last_used_at",
    "usage",
    "byok_usage",
    "next_rule",
    "next_action",
    "acts_on",
]
TABLE_COLUMNS = ["key_hash", "name", "idle_days", "next_action", "acts_on"]
OWNER_COLUMNS = ["owner", "keys", "disabled", "longest_idle_days", "rule_acts"]


@dataclass(frozen=True, slots=True)
class _Inputs:
    snapshot: Snapshot
    keys: list[KeyFacts]
    owners: dict[str, str | None]
    """Each key's ``creator_user_id``, by hash."""
    histories: dict[str, KeyHistory]
    audits: dict[str, AuditFacts]


def _inputs(session: Session, params: ReportParams) -> _Inputs:
    snapshot = snapshot_for(session, params)
    taken_at = snapshot.taken_at
    assert taken_at is not None  # a complete snapshot's
    # The plan's own audit facts, so that the report's next action is the plan's (re-enables too).
    audits = load_audit_facts(session, until=params.at)
    keys: list[KeyFacts] = []
    owners: dict[str, str | None] = {}
    histories: dict[str, KeyHistory] = {}
    # In no set order: every list made of them is sorted on a key that ends with the hash.
    for stored, history in snapshots.typed_keys_at(session, snapshot.id, (*FACT_FIELDS, "creator_user_id")):
        facts = stored_facts(stored, taken_at)
        if params.wants(name=facts.name, workspace_id=facts.workspace_id):
            keys.append(facts)
            owners[facts.hash] = stored.creator_user_id if isinstance(stored, Key) else stored[-1]
            histories[facts.hash] = key_history(history)
    return _Inputs(snapshot, keys, owners, histories, audits)


def _next_action(key: KeyFacts, inputs: _Inputs, params: ReportParams) -> NextAction | None:
    assert params.ruleset is not None
    return next_action(
        key,
        inputs.histories.get(key.hash, KeyHistory()),
        inputs.audits.get(key.hash, AuditFacts()),
        params.ruleset,
        params.as_of,
    )


def load_inputs(session: Session, params: ReportParams) -> _Inputs:
    """What ``build`` and ``upcoming_actions`` read, loaded once for a caller that wants both."""
    return _inputs(session, params)


def upcoming_actions(session: Session, params: ReportParams, inputs: _Inputs | None = None) -> list[dict[str, Any]]:
    """The next action a rule takes on each key (not only idle ones; one row per key, the strongest
    action, as the plan decides it), soonest first; empty without rules."""
    if params.ruleset is None:
        return []
    inputs = inputs or _inputs(session, params)
    rows = []
    for key in inputs.keys:
        coming = _next_action(key, inputs, params)
        if coming is not None:
            rows.append(
                {
                    "key_hash": key.hash,
                    "name": key.name,
                    "workspace_id": key.workspace_id,
                    "owner": inputs.owners[key.hash],
                    "rule": coming.decision.rule,
                    "action": coming.decision.action,
                    "acts_on": coming.due,
                }
            )
    rows.sort(key=lambda row: (row["acts_on"], row["name"], row["key_hash"]))
    return rows


def by_owner(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Idle keys per owner: how many, how many disabled, the longest idleness, and how many a rule
    will act on; most idle keys first."""
    groups: dict[str | None, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["owner"], []).append(row)
    grouped = [
        {
            "owner": owner,
            "keys": len(members),
            "disabled": sum(1 for row in members if row["disabled"]),
            "longest_idle_days": max(row["idle_days"] for row in members),
            "rule_acts": sum(1 for row in members if row["next_action"] is not None),
        }
        for owner, members in groups.items()
    ]
    grouped.sort(key=lambda row: (-row["keys"], row["owner"] is None, str(row["owner"])))
    return grouped


def build(session: Session, params: ReportParams, inputs: _Inputs | None = None) -> Report:
    if params.by not in ("key", "owner"):
        raise ReportError(f"idle: --by must be key or owner, not {params.by!r}", EXIT_USAGE)
    inputs = inputs or _inputs(session, params)
    snapshot = inputs.snapshot
    as_of = params.as_of
    minimum = DEFAULT_IDLE if params.since is None else params.since
    ruleset = params.ruleset
    rows: list[dict[str, Any]] = []
    for key in inputs.keys:
        key_history = inputs.histories.get(key.hash, KeyHistory())
        since = idle_since(key, key_history)
        if since is None:
            continue
        # Idle no longer than it has existed (a key never used reads idle from 2026-01-01, when
        # OpenRouter began recording use): as the rules read it, unused for D only once D old.
        since = max(since, as_utc(key.created_at))
        if as_of - since < minimum:
            continue
        next_rule = next_step = acts_on = None
        protected = False
        if ruleset is not None:
            protected = is_protected(key, ruleset.safety)
            coming = _next_action(key, inputs, params)
            if coming is not None:
                next_rule, next_step, acts_on = coming.decision.rule, coming.decision.action, coming.due
        rows.append(
            {
                "key_hash": key.hash,
                "name": key.name,
                "workspace_id": key.workspace_id,
                "owner": inputs.owners[key.hash],
                "disabled": key.disabled,
                "expired": key.expires_at is not None and key.expires_at <= as_of,
                "protected": protected,
                "idle_since": since,
                "idle_days": (as_of - since).days,
                "last_used_at": key.last_used_at,
                "usage": usd(float(key.usage)),
                "byok_usage": usd(float(key.byok_usage)),
                "next_rule": next_rule,
                "next_action": next_step,
                "acts_on": acts_on,
            }
        )
    rows.sort(key=lambda row: (-row["idle_days"], row["name"], row["key_hash"]))
    title = f"Keys idle for {duration_text(minimum)} or more at snapshot {snapshot.id}: {len(rows)}"
    notes = []
    if ruleset is None:
        notes.append("no rules file: when rules would act is not shown (set KEYHYGIENE_RULES_FILE)")
    if params.by == "owner":
        return Report(
            title=title + " by owner (the key's creator_user_id)",
            columns=OWNER_COLUMNS,
            rows=by_owner(rows),
            notes=notes,
            headers={"longest_idle_days": "longest idle", "rule_acts": "rule acts on"},
        )
    return Report(
        title=title,
        columns=COLUMNS,
        rows=rows,
        notes=notes,
        table_columns=TABLE_COLUMNS,
        headers={"key_hash": "key", "idle_days": "idle days", "next_action": "next action", "acts_on": "acts on"},
        time_formats=dict.fromkeys(("acts_on", "idle_since", "last_used_at"), "%Y-%m-%d"),
    )
