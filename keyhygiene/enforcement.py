"""Enforcement: plan with the pure rules engine, then act within the safety limits.

The order of every change is fixed: fetch the key fresh, re-decide on that state, write and commit
an intent to the audit log, call the API, record the outcome. A crash between intent and outcome
leaves a ``pending`` record that the next enforcement settles from the key's fresh state; nothing
is ever repeated blindly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from db import audit, runs, snapshots
from db.models import Snapshot
from keyhygiene.keysapi.errors import (
    ApiError,
    AuthenticationFailed,
    CertificateRefused,
    ConnectionFailed,
    NotFound,
    OutcomeUnknown,
    RateLimited,
    RequestRejected,
)
from keyhygiene.keysapi.fields import FIELDS_BY_NAME, MICROS_PER_USD
from keyhygiene.keysapi.models import Key
from keyhygiene.rules import (
    AuditFacts,
    CapBreach,
    Decision,
    KeyFacts,
    KeyHistory,
    Plan,
    RuleSet,
    check_caps,
    decide,
    lasting_evidence,
    plan,
    resolve_workspaces,
)

from .context import Database, collection_paused, describe_db_error, session_scope
from .errors import EnforcementRefused
from .logging import get_logger, redact_text
from .shutdown import change_in_flight
from .timeutil import isoformat

if TYPE_CHECKING:
    from keyhygiene.keysapi.client import KeysClient

log = get_logger(__name__)

REFUSED_INVENTORY_SHRANK = "inventory_shrank"
REFUSED_CAPS = "caps_exceeded"


@dataclass
class EnforceResult:
    """What one enforcement planned and did."""

    run_id: int
    snapshot_id: int
    dry_run: bool
    total_keys: int
    planned: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    reported: int = 0
    settled: int = 0
    refused: str | None = None
    decisions: list[Decision] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "snapshot_id": self.snapshot_id,
            "dry_run": self.dry_run,
            "keys": self.total_keys,
            "planned_changes": self.planned,
            "done": self.done,
            "skipped": self.skipped,
            "failed": self.failed,
            "reported": self.reported,
            "settled_in_doubt": self.settled,
            "refused": self.refused,
        }


# -- inputs of the engine, from the store --------------------------------------------------------

_ZERO = Decimal(0)


def _money(value: float) -> Decimal:
    # str() gives the shortest text that reads back as the same float: the number as the API wrote it.
    return _ZERO if value == 0 else Decimal(str(value))


def _optional_money(value: float | None) -> Decimal | None:
    return None if value is None else _money(value)


def key_facts(key: Key, observed_at: datetime | None) -> KeyFacts:
    """What the rules engine reads of a key (from the API or the store), money as exact Decimal.
    ``observed_at``: when the API gave it (``KeyFacts.observed_at``)."""
    return KeyFacts(
        hash=key.hash,
        name=key.name,
        workspace_id=key.workspace_id,
        disabled=key.disabled,
        created_at=key.created_at,
        updated_at=key.updated_at,
        expires_at=key.expires_at,
        last_used_at=key.last_used_at,
        reports_last_used=key.reports_last_used,
        usage=_money(key.usage),
        usage_daily=_money(key.usage_daily),
        usage_weekly=_money(key.usage_weekly),
        usage_monthly=_money(key.usage_monthly),
        byok_usage=_money(key.byok_usage),
        byok_usage_daily=_money(key.byok_usage_daily),
        byok_usage_weekly=_money(key.byok_usage_weekly),
        byok_usage_monthly=_money(key.byok_usage_monthly),
        limit=_optional_money(key.limit),
        limit_remaining=_optional_money(key.limit_remaining),
        limit_reset=key.limit_reset,
        include_byok_in_limit=key.include_byok_in_limit,
        unknown_counters=key.unknown_counters,
        observed_at=observed_at,
    )


FACT_FIELDS = tuple(
    item.name for item in fields(KeyFacts) if item.name not in ("reports_last_used", "unknown_counters", "observed_at")
)
"""The stored key fields the rules read: ``KeyFacts``' own, in its order, less what the store does
not keep as a column."""
_MONEY_AT = tuple(index for index, name in enumerate(FACT_FIELDS) if FIELDS_BY_NAME[name].kind == "money")
_REPORTS_LAST_USED_AT = [item.name for item in fields(KeyFacts)].index("reports_last_used")
_NONE_UNKNOWN: frozenset[str] = frozenset()
assert [item.name for item in fields(KeyFacts)][-2:] == ["unknown_counters", "observed_at"]  # after FACT_FIELDS


def facts_at(session: Session, snapshot_id: int, taken_at: datetime) -> Iterator[tuple[KeyFacts, KeyHistory]]:
    """What the rules engine reads of every key the snapshot saw (taken at ``taken_at``), streamed in
    no set order (the engine orders its decisions), with its history: the same facts as
    ``key_facts`` of ``snapshots.keys_at`` and ``key_history`` of ``snapshots.history_facts``, from
    one query, mostly straight from the typed columns."""
    for stored, history in snapshots.typed_keys_at(session, snapshot_id, FACT_FIELDS):
        yield stored_facts(stored, taken_at), key_history(history)


def key_history(facts: snapshots.HistoryFacts) -> KeyHistory:
    """What the rules read of a key's stored history."""
    return KeyHistory(
        first_seen_at=facts.first_seen_at,
        usage_unchanged_since=facts.usage_unchanged_since,
        disabled_since=facts.disabled_since,
        spent_from=facts.spent_from,
    )


def stored_facts(stored: Sequence[Any] | Key, observed_at: datetime) -> KeyFacts:
    """``key_facts`` of a key as ``snapshots.typed_keys_at`` reads it: the ``FACT_FIELDS`` of its typed
    columns (money in micro-dollars; any fields after them are ignored), or a rebuilt Key; as its
    snapshot, taken at ``observed_at``, saw it."""
    if isinstance(stored, Key):
        return key_facts(stored, observed_at)
    values = list(stored[: len(FACT_FIELDS)])
    for index in _MONEY_AT:
        if values[index] is not None:
            values[index] = _money(values[index] / MICROS_PER_USD)  # the float the API sent, exactly
    values.insert(_REPORTS_LAST_USED_AT, True)  # every field was there: the stored JSON lists none missing
    values += (_NONE_UNKNOWN, observed_at)
    return KeyFacts(*values)


def load_audit_facts(session: Session, *, until: datetime | None = None) -> dict[str, AuditFacts]:
    """Per key, our newest executed change (made at or before ``until``) as the engine reads it."""
    return {
        key_hash: AuditFacts(
            last_change=change.action,
            last_change_rule=change.rule,
            last_change_at=change.at,
            key_updated_at=change.key_updated_at,
        )
        for key_hash, change in audit.last_changes(session, until=until).items()
    }


@dataclass(frozen=True, slots=True)
class PlanInputs:
    """Everything the engine needs about one snapshot."""

    snapshot_id: int
    taken_at: datetime
    keys: list[KeyFacts]
    histories: dict[str, KeyHistory]
    audits: dict[str, AuditFacts]
    previous_key_count: int | None
    deleted_by_us: int = 0
    """Keys of the previous snapshot that keyhygiene itself deleted since: not a suspicious shrink."""
    workspace_names: dict[str, str] = field(default_factory=dict)
    """``{workspace id: name}`` as the snapshot's sync listed them: rules may name a workspace."""


def load_plan_inputs(session: Session, snapshot_id: int) -> PlanInputs:
    snapshot = session.get(Snapshot, snapshot_id)
    if snapshot is None or snapshot.status != snapshots.COMPLETE or snapshot.taken_at is None:
        raise ValueError(f"snapshot {snapshot_id} is not a complete snapshot")
    previous = snapshots.previous_snapshot(session, snapshot_id)
    keys: list[KeyFacts] = []
    histories: dict[str, KeyHistory] = {}
    with collection_paused():
        for facts, history in facts_at(session, snapshot_id, snapshot.taken_at):
            keys.append(facts)
            histories[facts.hash] = history
    deleted_by_us = 0
    if previous is not None and previous.taken_at is not None:
        deleted = audit.deleted_since(session, previous.taken_at)
        if deleted:  # else no need to read the previous snapshot's hashes
            vanished = snapshots.key_hashes_at(session, previous.id) - {key.hash for key in keys}
            deleted_by_us = len(vanished & deleted)
    return PlanInputs(
        snapshot_id=snapshot_id,
        taken_at=snapshot.taken_at,
        keys=keys,
        histories=histories,
        audits=load_audit_facts(session),
        previous_key_count=previous.key_count if previous is not None else None,
        deleted_by_us=deleted_by_us,
        workspace_names=snapshots.workspace_names(session, snapshot_id),
    )


def make_plan(inputs: PlanInputs, ruleset: RuleSet, now: datetime) -> Plan:
    ruleset = resolve_workspaces(ruleset, inputs.workspace_names)
    return plan(inputs.keys, inputs.histories, inputs.audits, ruleset, now)


def inventory_shrink(inputs: PlanInputs, ruleset: RuleSet) -> str | None:
    """Why the inventory looks suspiciously small, or None when it does not."""
    previous = inputs.previous_key_count
    current = len(inputs.keys)
    if not previous:
        return None
    # Keys that keyhygiene deleted itself are an expected shrink; everything else must be explained.
    dropped = max(previous - current - inputs.deleted_by_us, 0) / previous * 100
    if dropped > ruleset.safety.max_action_percent:
        ours = f", not counting {inputs.deleted_by_us} deleted by keyhygiene" if inputs.deleted_by_us else ""
        return (
            f"the inventory shrank from {previous} to {current} keys ({dropped:.1f}%{ours}) "
            "since the previous snapshot, "
            f"more than max_action_percent ({ruleset.safety.max_action_percent:g}%): refusing to act on it"
        )
    return None


# -- acting -------------------------------------------------------------------------------------


def _event(
    decision: Decision, *, run_id: int, dry_run: bool, outcome: str, action: str | None = None, **extra: Any
) -> None:
    fields = {
        "run_id": run_id,
        "key_hash": decision.key_hash,
        "key_name": decision.key_name,
        "rule": decision.rule,
        "action": action or decision.action,
        "dry_run": dry_run,
        "outcome": outcome,
    }
    fields.update({name: value for name, value in extra.items() if value is not None})
    log_method = log.warning if outcome in (audit.FAILED, audit.REFUSED) else log.info
    log_method("key_action", **fields)


def record_decision(
    database: Database,
    decision: Decision,
    *,
    run_id: int,
    now: datetime,
    dry_run: bool,
    outcome: str,
    reason: str | None = None,
    error: str | None = None,
) -> int:
    """Write and commit one audit record (before an API call, the intent)."""
    return _record_all(
        database, [decision], run_id=run_id, now=now, dry_run=dry_run, outcome=outcome, reason=reason, error=error
    )[0]


def _record_all(
    database: Database,
    decisions: Sequence[Decision],
    *,
    run_id: int,
    now: datetime,
    dry_run: bool,
    outcome: str,
    reason: str | None = None,
    error: str | None = None,
) -> list[int]:
    """Write audit records for ``decisions`` in one transaction, then log one ``key_action`` each."""
    reason, error = _cleaned(reason), _cleaned(error)
    with session_scope(database) as session:
        ids = audit.record_actions(
            session,
            [
                {
                    "run_id": run_id,
                    "now": now,
                    "key_hash": decision.key_hash,
                    "key_name": decision.key_name,
                    "workspace_id": decision.workspace_id,
                    "rule": decision.rule,
                    "rules": decision.rules,
                    "action": decision.action,
                    "dry_run": dry_run,
                    "outcome": outcome,
                    "evidence": decision.evidence,
                    "reason": reason,
                    "error": error,
                }
                for decision in decisions
            ],
        )
    if outcome != audit.PENDING:
        for decision in decisions:
            _event(decision, run_id=run_id, dry_run=dry_run, outcome=outcome, reason=reason, error=error)
    return ids


def _record_plan(
    database: Database,
    decisions: Sequence[Decision],
    *,
    run_id: int,
    now: datetime,
    dry_run: bool,
    outcome: str,
    reason: str | None = None,
) -> None:
    """Record a dry run's plan (``planned``) or a refused run's changes (``refused``) in one transaction:
    one row for the run, the decisions themselves only when no identical plan is stored yet. Then log
    one ``key_action`` per decision, as for any other record."""
    reason = _cleaned(reason)
    entries = [
        audit.PlannedEntry(
            key_hash=decision.key_hash,
            key_name=decision.key_name,
            workspace_id=decision.workspace_id,
            rule=decision.rule,
            rules=decision.rules,
            action=decision.action,
            evidence=lasting_evidence(decision.evidence),
        )
        for decision in decisions
    ]
    with session_scope(database) as session:
        audit.record_plan(
            session, run_id=run_id, now=now, entries=entries, dry_run=dry_run, outcome=outcome, reason=reason
        )
    for decision in decisions:
        _event(decision, run_id=run_id, dry_run=dry_run, outcome=outcome, reason=reason)


def _complete(
    database: Database,
    action_id: int,
    *,
    outcome: str,
    now: datetime,
    reason: str | None = None,
    error: str | None = None,
    key_updated_at: datetime | None = None,
) -> None:
    reason, error = _cleaned(reason), _cleaned(error)
    with session_scope(database) as session:
        audit.complete_action(
            session, action_id, outcome=outcome, now=now, reason=reason, error=error, key_updated_at=key_updated_at
        )


def _cleaned(text: str | None) -> str | None:
    """A reason or error as the audit keeps it: without any secret. An error may quote what the API
    sent, and an upstream that echoes the request's credential into a key's field puts it there."""
    return None if text is None else redact_text(text)


def fresh_history(history: KeyHistory, snapshot_key: KeyFacts | None, fresh: KeyFacts, now: datetime) -> KeyHistory:
    """The snapshot history, extended by what the fresh state shows since the snapshot.

    Counters that moved since the snapshot are a sign of use now; a key whose disabled state changed
    since the snapshot has no disabled history of ours to lean on.
    """
    if snapshot_key is None:
        return history
    if (fresh.usage, fresh.byok_usage) != (snapshot_key.usage, snapshot_key.byok_usage):
        history = replace(history, usage_unchanged_since=now)
    if fresh.disabled != snapshot_key.disabled:
        history = replace(history, disabled_since=None)
    return history


def _already_in_target_state(decision: Decision, fresh: KeyFacts) -> str | None:
    if decision.action == "disable" and fresh.disabled:
        return "already disabled"
    if decision.action == "enable" and not fresh.disabled:
        return "already enabled"
    return None


class Withdrawn(Exception):
    """A change not sent again after a refused try: the key, looked at again, no longer calls for it
    (``before_resend`` in :func:`change_key`)."""

    def __init__(
        self,
        reason: str,
        *,
        maybe_made: bool,
        failed: bool = False,
        stop: BaseException | None = None,
        made: bool = False,
    ):
        super().__init__(reason)
        self.reason = reason
        self.maybe_made = maybe_made  # a try answered 503 may have made it all the same
        self.failed = failed  # the key could not be looked at
        self.stop = stop  # what stops the run too (the credential refused, the lease lost)
        self.made = made  # after such a try, the key shows the change made


def _apply(client: KeysClient, decision: Decision, before_resend: Callable[[bool], None] | None = None) -> Key | None:
    """Make the change; the key as the API answered it (None after a delete)."""
    if decision.action == "disable":
        return client.update_key(decision.key_hash, disabled=True, before_resend=before_resend)
    if decision.action == "enable":
        return client.update_key(decision.key_hash, disabled=False, before_resend=before_resend)
    if decision.action == "delete":
        client.delete_key(decision.key_hash, before_resend=before_resend)
        return None
    raise ValueError(f"not a change: {decision.action}")  # pragma: no cover - reports never get here


Recheck = Callable[[Decision, KeyFacts], Decision | str]
"""The change as it stands on the key's fresh state (the decision given, or the one made again on
that state, which the audit then records), or why it must not be made."""


def execute_decision(
    database: Database,
    client: KeysClient,
    decision: Decision,
    *,
    ruleset: RuleSet,
    history: KeyHistory,
    audit_facts: AuditFacts,
    run_id: int,
    now: datetime,
    snapshot_key: KeyFacts | None = None,
    clock: Any = None,
    fence: Callable[[], None] | None = None,
) -> str:
    """Make one planned change, deciding again on the key's fresh state (see :func:`change_key`)."""

    def recheck(planned: Decision, fresh: KeyFacts) -> Decision | str:
        again = decide(fresh, fresh_history(history, snapshot_key, fresh, now), audit_facts, ruleset, now)
        if again is None:
            return "no longer matches any rule on the key's fresh state"
        if again.action != planned.action:
            return f"on the key's fresh state the decision is {again.action}, not {planned.action}"
        return again  # the rule and the evidence of the fresh state are what the audit keeps

    return change_key(
        database, client, decision, run_id=run_id, recheck=recheck, clock=clock or (lambda: now), fence=fence
    )


def change_key(
    database: Database,
    client: KeysClient,
    decision: Decision,
    *,
    run_id: int,
    recheck: Recheck,
    clock: Callable[[], datetime],
    dry_run: bool = False,
    fence: Callable[[], None] | None = None,
) -> str:
    """The one way keyhygiene changes a key: fetch it fresh, ask ``recheck`` whether the change still
    stands (and as which decision), record the intent, change it, record the outcome. Returns the
    outcome.

    A key gone or already in the target state, or one ``recheck`` objects to, is recorded as skipped
    with the reason. With ``dry_run`` the fresh check is made and the change recorded as planned.
    ``fence`` is called just before the intent is recorded and must raise if this process may no
    longer change keys (it lost the enforcement lease).
    Raises AuthenticationFailed (the credential no longer works: stop everything); every other API
    error is recorded against this key and the caller goes on with the next.
    """
    stamp = clock
    try:
        fresh = key_facts(client.get_key(decision.key_hash), stamp())
    except NotFound:
        record_decision(
            database,
            decision,
            run_id=run_id,
            now=stamp(),
            dry_run=dry_run,
            outcome=audit.SKIPPED,
            reason="already gone (404 on the fresh check)",
        )
        return audit.SKIPPED
    except AuthenticationFailed:
        raise
    except ApiError as exc:
        record_decision(
            database,
            decision,
            run_id=run_id,
            now=stamp(),
            dry_run=dry_run,
            outcome=audit.FAILED,
            reason="the fresh check failed",
            error=str(exc),
        )
        return audit.FAILED
    # The audit names the key as the API does now (renamed or moved since the snapshot).
    decision = replace(
        decision, key_name=fresh.name or decision.key_name, workspace_id=fresh.workspace_id or decision.workspace_id
    )
    checked = _already_in_target_state(decision, fresh) or recheck(decision, fresh)
    if isinstance(checked, Decision):
        decision, reason = checked, None
    else:
        reason = checked
    if reason is not None:
        record_decision(
            database,
            decision,
            run_id=run_id,
            now=stamp(),
            dry_run=dry_run,
            outcome=audit.SKIPPED,
            reason=reason,
        )
        return audit.SKIPPED
    if dry_run:
        record_decision(database, decision, run_id=run_id, now=stamp(), dry_run=True, outcome=audit.PLANNED)
        return audit.PLANNED

    if fence is not None:
        fence()
    planned = decision

    def before_resend(maybe_made: bool) -> None:
        """Before the change is sent again after a refused try (a 429 asked to wait, say, up to
        the retry time): the key is looked at again as before the first try, so that only what the
        rules, protection and the safety limits allow now is sent."""
        again = "checked again before sending the change again"
        try:
            key = client.get_key(planned.key_hash)
        except NotFound:
            # Gone: by a DELETE a 503 answered, maybe; no PATCH deletes a key, so a disable or an
            # enable is surely not made, and there is nothing left to change.
            made = maybe_made and planned.action == "delete"
            raise Withdrawn(f"already gone (404 when {again})", maybe_made=made, made=made) from None
        except ApiError as exc:
            stop = exc if isinstance(exc, AuthenticationFailed) else None
            raise Withdrawn(f"not sent again: {exc}", maybe_made=maybe_made, failed=True, stop=stop) from None
        fresh = key_facts(key, stamp())
        reached = _already_in_target_state(planned, fresh)
        if reached is not None:
            raise Withdrawn(f"{reached} ({again})", maybe_made=maybe_made, made=maybe_made)
        checked = recheck(planned, fresh)
        if not isinstance(checked, Decision):
            raise Withdrawn(f"{checked} ({again})", maybe_made=maybe_made)
        if fence is not None:
            try:
                fence()
            except Exception as exc:  # the lease lost: this process may no longer change keys
                raise Withdrawn(f"not sent again: {exc}", maybe_made=maybe_made, failed=True, stop=exc) from None

    # From the intent to its outcome a stop (SIGTERM, Ctrl-C) is held: the outcome is always recorded.
    with change_in_flight():
        action_id = record_decision(
            database, decision, run_id=run_id, now=stamp(), dry_run=False, outcome=audit.PENDING
        )
        return _carry_out(
            database, client, decision, action_id, run_id=run_id, stamp=stamp, before_resend=before_resend
        )


def _carry_out(
    database: Database,
    client: KeysClient,
    decision: Decision,
    action_id: int,
    *,
    run_id: int,
    stamp: Callable[[], datetime],
    before_resend: Callable[[bool], None] | None = None,
) -> str:
    """Make the change whose intent ``action_id`` records, and complete the record with its outcome.
    ``before_resend`` looks at the key again before the client sends the change again."""

    def outcome_is(
        outcome: str, *, reason: str | None = None, error: str | None = None, after: Key | None = None
    ) -> str:
        """Complete the intent with its outcome, and log it."""
        key_updated_at = after.updated_at if after is not None else None
        _complete(
            database, action_id, outcome=outcome, now=stamp(), reason=reason, error=error, key_updated_at=key_updated_at
        )
        _event(decision, run_id=run_id, dry_run=False, outcome=outcome, reason=reason, error=error)
        return outcome

    def in_doubt(error: str, fresh_state: str) -> str:
        # The change may have been made: it is not sent again. The intent stays pending, in doubt,
        # and the next run settles it from the key's fresh state then (``settle_in_doubt``), which
        # logs its one ``key_action`` event: a change that lands late is then recorded as made, for
        # ``undo``, the reenable rules and the shrink guard.
        log.warning(
            "key_action_in_doubt",
            run_id=run_id,
            key_hash=decision.key_hash,
            key_name=decision.key_name,
            rule=decision.rule,
            action=decision.action,
            error=error,
            fresh_state=fresh_state,
        )
        return audit.FAILED

    try:
        answered = _apply(client, decision, before_resend)
    except Withdrawn as withdrawn:
        if withdrawn.made:
            # A try answered 503, and the key shows the change: made by that try, or by someone
            # during the wait (up to the retry time), which nothing tells apart. Recorded as made
            # (for the shrink guard, and so as not to make it again), keeping no updated_at, as a
            # change settled later does: undo, enable and the reenable rules leave the key alone.
            reason = (
                "a try was answered 503 (which a gateway may send after the API acted), and the key checked "
                "again shows the change made: by that try or by someone since, which cannot be told apart"
            )
            if decision.action == "disable":
                reason += "; undo, enable and the re-enable rules leave the key alone"
            outcome = outcome_is(audit.DONE, reason=reason)
        elif withdrawn.maybe_made:  # the key shows no change yet, or could not be read: the try may still land
            outcome = in_doubt(withdrawn.reason, "unreadable" if withdrawn.failed else "unchanged")
        elif withdrawn.failed:
            outcome = outcome_is(audit.FAILED, reason="not sent again", error=withdrawn.reason)
        else:
            outcome = outcome_is(audit.SKIPPED, reason=withdrawn.reason)
        if withdrawn.stop is not None:
            raise withdrawn.stop from None
        return outcome
    except NotFound:
        # The client never re-sends a change whose answer was lost (a 404 after a 503 is in doubt,
        # below), so a 404 here means someone else removed the key after the fresh check.
        return outcome_is(audit.SKIPPED, reason=f"already gone ({decision.action.upper()} answered 404)")
    except ApiError as exc:
        # A lost answer (OutcomeUnknown) or a garbled one: settled from the key's fresh state, never
        # by sending the change again.
        # Refused (4xx, 429) or never sent (no connection, a certificate refused): surely not made,
        # and not worth a read (the client turns these into OutcomeUnknown when an earlier try
        # was answered 503, which a gateway may have sent after the API acted).
        not_made = isinstance(exc, RequestRejected | RateLimited | ConnectionFailed | CertificateRefused)
        applied, after = (False, None) if not_made else _took_effect(client, decision)
        if applied:
            reason = f"the API's answer was lost or unreadable ({exc}); the key's fresh state shows the change was made"
            return outcome_is(audit.DONE, reason=reason, after=after)
        if applied is None or isinstance(exc, OutcomeUnknown):
            # The key's state could not be read, or the request whose answer was lost may still be
            # at work behind a fresh state that shows no change yet.
            return in_doubt(str(exc), "unreadable" if applied is None else "unchanged")
        outcome_is(audit.FAILED, error=str(exc))
        if isinstance(exc, AuthenticationFailed):
            raise
        return audit.FAILED
    if answered is not None and answered.disabled != (decision.action == "disable"):
        # Answered 200 with the key as it was: the field was not taken (the API ignores fields it
        # does not know; a proxy may have changed the body). Not made, whatever the status says.
        state = "disabled" if answered.disabled else "enabled"
        reason = f"the API answered the {decision.action} with the key still {state}; a later run decides again"
        return outcome_is(audit.FAILED, reason=reason, after=answered)
    step = decision.evidence.get("step")
    return outcome_is(audit.DONE, reason=step if isinstance(step, str) else None, after=answered)


def _took_effect(client: KeysClient, decision: Decision) -> tuple[bool | None, Key | None]:
    """Whether the key's fresh state shows ``decision`` was applied (None when it cannot be read),
    and that state."""
    try:
        fresh = client.get_key(decision.key_hash)
    except NotFound:
        return decision.action == "delete", None
    except AuthenticationFailed:
        raise
    except ApiError:
        return None, None
    if decision.action == "disable":
        return fresh.disabled, fresh
    if decision.action == "enable":
        return not fresh.disabled, fresh
    return False, fresh


SETTLED_MADE = "settled after a crash or a lost answer: the key's fresh state shows the change was made"
SETTLED_DISABLED = (
    f"{SETTLED_MADE}, by this run or by someone since, which cannot be told apart: undo, enable and the "
    "re-enable rules leave the key alone"
)


def settle_in_doubt(database: Database, client: KeysClient, *, now: datetime) -> int:
    """Settle intents left pending (by a crash, or a change whose answer was lost), from each key's
    fresh state. Returns how many."""
    with database.sessions() as session:
        pending = audit.in_doubt(session)
        # A settled change's event carries the --allow-actions of the run that made it, not this one's.
        allowed = runs.allowances(session, [row.run_id for row in pending])
    settled = 0
    for row in pending:
        try:
            fresh: Key | None = client.get_key(row.key_hash)
        except NotFound:
            fresh = None
        except AuthenticationFailed:
            raise
        except ApiError as exc:
            log.warning("in_doubt_unsettled", action_id=row.id, key_hash=row.key_hash, error=str(exc))
            continue
        if row.action == "delete":
            applied = fresh is None
        elif row.action == "disable":
            applied = fresh is not None and fresh.disabled
        else:  # enable
            applied = fresh is not None and not fresh.disabled
        if applied:
            outcome, reason = audit.DONE, SETTLED_DISABLED if row.action == "disable" else SETTLED_MADE
        elif fresh is None:
            outcome, reason = audit.SKIPPED, "settled after a crash or a lost answer: the key is gone"
        else:
            outcome, reason = (
                audit.FAILED,
                "settled after a crash or a lost answer: the change was not made; a later run decides again",
            )
        # No ``updated_at`` is kept: read a run later, the key's state may be someone else's change
        # since (a human disabling the key), which no time window can tell apart from ours. Undo,
        # enable and the re-enable rules then leave the key alone, as for any key nobody can show
        # unchanged since our change.
        _complete(database, row.id, outcome=outcome, now=now, reason=reason)
        log.info(
            "key_action",
            run_id=row.run_id,
            key_hash=row.key_hash,
            key_name=row.key_name,
            rule=row.rule,
            action=row.action,
            dry_run=False,
            outcome=outcome,
            reason=reason,
            allow_actions=allowed.get(row.run_id),  # null when it had none, whatever this run's
        )
        settled += 1
    return settled


def enforce_snapshot(
    database: Database,
    client: KeysClient | None,
    ruleset: RuleSet,
    *,
    run_id: int,
    snapshot_id: int,
    now: datetime,
    dry_run: bool,
    clock: Any = None,
    fence: Callable[[], None] | None = None,
    allow_actions: int | None = None,
    triggered: bool = False,
) -> EnforceResult:
    """Plan on snapshot ``snapshot_id`` and act on it within the safety limits.

    ``fence`` runs before each change (see :func:`execute_decision`). ``triggered``: the job was
    queued with ``keyhygiene trigger``, whose refusal gives the way through in the same form.

    ``dry_run`` is final: the caller has already combined the rules file and the command line.
    ``allow_actions`` (``--allow-actions N``) replaces both caps with N for this one enforcement.
    Raises EnforcementRefused (exit 3) when a safety limit refuses the whole enforcement.
    """
    # Changes left in doubt are settled first: a delete that was made must count for the shrink
    # guard as ours, and the plan must see what was made.
    settled = settle_in_doubt(database, client, now=now) if not dry_run and client is not None else 0
    with database.sessions() as session:
        inputs = load_plan_inputs(session, snapshot_id)
    # Workspace names become ids once, so the fresh check before each change reads the same rules.
    ruleset = resolve_workspaces(ruleset, inputs.workspace_names)
    result = EnforceResult(run_id=run_id, snapshot_id=snapshot_id, dry_run=dry_run, total_keys=len(inputs.keys))
    result.settled = settled

    shrink = inventory_shrink(inputs, ruleset)
    if shrink is not None:
        result.refused = REFUSED_INVENTORY_SHRANK
        log.error("enforcement_refused", run_id=run_id, reason=shrink)
        raise EnforcementRefused(shrink, result)

    the_plan = make_plan(inputs, ruleset, now)
    result.decisions = list(the_plan.decisions)
    result.planned = len(the_plan.changes)

    breach: CapBreach | None = check_caps(the_plan, ruleset.safety, allow_actions=allow_actions)
    if breach is not None:
        result.refused = REFUSED_CAPS
        _record_plan(
            database,
            the_plan.changes,
            run_id=run_id,
            now=now,
            dry_run=dry_run,
            outcome=audit.REFUSED,
            reason=breach.reason,
        )
        log.error(
            "enforcement_refused",
            run_id=run_id,
            reason=breach.reason,
            planned=breach.planned,
            total_keys=breach.total_keys,
        )
        raise EnforcementRefused(refusal_message(breach, triggered=triggered), result)

    # Reports, and everything in a dry run, call no API: recorded together in one transaction; a dry
    # run's plan by reference when it equals one already stored.
    unapplied = [decision for decision in the_plan.decisions if dry_run or decision.action == "report"]
    if dry_run:
        _record_plan(database, unapplied, run_id=run_id, now=now, dry_run=True, outcome=audit.PLANNED)
    else:
        try:
            _record_all(database, unapplied, run_id=run_id, now=now, dry_run=False, outcome=audit.DONE)
        except BaseException as exc:  # a stop while the reports are recorded: no change was begun
            record_unreached(database, the_plan.changes, run_id=run_id, now=clock() if clock else now, stopped=exc)
            raise
    result.reported = sum(1 for decision in unapplied if decision.action == "report")

    snapshot_keys = {key.hash: key for key in inputs.keys}
    changes = the_plan.changes if not dry_run else []
    for index, decision in enumerate(changes):
        assert client is not None, "a client is needed to change keys"
        try:
            outcome = execute_decision(
                database,
                client,
                decision,
                ruleset=ruleset,
                history=inputs.histories.get(decision.key_hash, KeyHistory()),
                audit_facts=inputs.audits.get(decision.key_hash, AuditFacts()),
                run_id=run_id,
                now=now,
                snapshot_key=snapshot_keys.get(decision.key_hash),
                clock=clock,
                fence=fence,
            )
        except BaseException as exc:
            record_unreached(database, changes[index:], run_id=run_id, now=clock() if clock else now, stopped=exc)
            raise
        if outcome == audit.DONE:
            result.done += 1
        elif outcome == audit.SKIPPED:
            result.skipped += 1
        else:
            result.failed += 1
    log.info("enforcement_complete", run_id=run_id, **result.summary())
    return result


def record_unreached(
    database: Database, decisions: Sequence[Decision], *, run_id: int, now: datetime, stopped: BaseException
) -> None:
    """Record as skipped, each with its ``key_action`` event, the planned changes a run that stopped
    midway (the credential refused, the lease lost, a stop or time limit) never reached: every
    planned change is in the audit log. A change the run had begun has its own record already."""
    said = str(stopped).strip().splitlines()
    why = said[0] if said else type(stopped).__name__
    try:
        with database.sessions() as session:
            begun = audit.hashes_of_run(session, run_id)
        unreached = [decision for decision in decisions if decision.key_hash not in begun]
        if unreached:
            reason = f"not reached: the run stopped before this change ({why})"
            _record_all(
                database, unreached, run_id=run_id, now=now, dry_run=False, outcome=audit.SKIPPED, reason=reason
            )
    except SQLAlchemyError as exc:  # the database is what stopped the run: the plan is lost with it
        log.error("unreached_changes_not_recorded", run_id=run_id, changes=len(decisions), error=describe_db_error(exc))


def refusal_message(breach: CapBreach, *, triggered: bool = False) -> str:
    """Why the caps refused a plan, with the counts, and the way through a backlog the caps refuse:
    as a command run here, or (``triggered``) queued on the worker as the refused job was."""
    if breach.allow_actions is not None:
        return (
            f"{breach.reason}; read the plan (`keyhygiene plan`) and, if it is right, allow all of it: "
            f"`--allow-actions {breach.planned}`"
        )
    return (
        f"{breach.reason}; read the plan (`keyhygiene plan`) and, if it is right, work through this backlog "
        f"once with `keyhygiene {'trigger ' if triggered else ''}enforce --allow-actions {breach.planned}` "
        "(lifts both caps for that one run)"
    )


def explain(evidence: Mapping[str, Any]) -> str:
    """A decision's evidence in a few words, for tables: "expired 2026-10-16", "idle 46 days"..."""
    match = evidence.get("match")
    step = evidence.get("step")
    if step == "reenable":
        return "back under budget"
    if step == "delete-after-grace":
        return f"disabled {float(evidence.get('disabled_days', 0)):.0f} days"
    if match == "expired":
        return f"expired {str(evidence.get('expires_at', ''))[:10]}"
    if match == "unused":
        return f"idle {float(evidence.get('idle_days', 0)):.0f} days"
    if match == "over_budget":
        if "window_spend_usd" in evidence:
            return f"${float(evidence['window_spend_usd']):,.2f} {evidence.get('window', '')}"
        return f"limit spent (${float(evidence.get('limit_remaining') or 0):,.2f} left)"
    return ""


def decision_row(decision: Decision) -> dict[str, Any]:
    """A decision as one flat JSON-able row (for ``plan --format json``)."""
    return {
        "key_hash": decision.key_hash,
        "key_name": decision.key_name,
        "workspace_id": decision.workspace_id,
        "action": decision.action,
        "rule": decision.rule,
        "rules": list(decision.rules),
        "evidence": {k: isoformat(v) if isinstance(v, datetime) else v for k, v in dict(decision.evidence).items()},
    }
