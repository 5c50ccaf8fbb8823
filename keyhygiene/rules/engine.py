"""The rules engine: which key gets which action now, and why. Pure: no I/O, no clock, no logging.

Everything is decided from the key's current state (``KeyFacts``, money as Decimal), its snapshot history
(``KeyHistory``), our own last change to it (``AuditFacts``), the rules and ``now``. Naive datetimes
in the inputs are read as UTC.

How one key is decided (``decide``):

1. A protected key (``protect_hashes``, ``protect_names``) gets no decision, whatever the rules say.
2. Every rule whose filters and match both hold *matches*; all of them are listed in
   ``Decision.rules``.
3. Each matching rule says what it would do now: ``report``; ``disable`` (nothing when the key is
   already disabled); ``delete`` (an enabled key is disabled first unless ``grace`` is zero; a
   disabled key is deleted only once it has provably been disabled for ``grace``).
4. The strongest of those wins (delete > disable > report; then the rule whose own action is
   stronger, so a delete rule's first step is recorded under the delete rule; then file order).
5. Failing a disable or delete, an ``over_budget`` rule with ``reenable = true`` may re-enable a key
   that it disabled itself (see ``_reenable``).

``unused`` reads two sources of use, ``last_used_at`` and the snapshot history; ``idle_since``
says how, including why a history in which usage never changed is no sign of use.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fnmatch import translate
from functools import lru_cache
from typing import Any, Literal

from keyhygiene.timeutil import SPEND_WINDOWS, as_utc, isoformat, parse_time, window_starts

from .inputs import AuditFacts, KeyHistory
from .keyfacts import KeyFacts, UseSigns
from .model import INVISIBLE, Rule, RuleSet, Safety, duration_text

DecisionAction = Literal["disable", "delete", "enable", "report"]

# OpenRouter began recording ``last_used_at`` at the end of 2025: null means "no use since then".
LAST_USED_RECORDED_FROM = datetime(2026, 1, 1, tzinfo=UTC)

_ACTION_STRENGTH: Mapping[str, int] = {"report": 0, "enable": 1, "disable": 2, "delete": 3}
_RULE_STRENGTH: Mapping[str, int] = {"report": 0, "disable": 1, "delete": 2}
# Evidence fields that count the days from another field to ``now``: they age with every run.
_AGEING: Mapping[str, str] = {"idle_days": "idle_since", "disabled_days": "disabled_since"}


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do to one key now, under which rule, and the facts that justify it."""

    key_hash: str
    key_name: str
    workspace_id: str | None
    action: DecisionAction
    rule: str
    rules: tuple[str, ...]
    evidence: Mapping[str, Any] = field(hash=False)

    @property
    def changes_key(self) -> bool:
        return self.action != "report"


@dataclass(frozen=True, slots=True)
class Plan:
    """The decisions for a whole inventory, ordered by key hash."""

    decisions: tuple[Decision, ...]
    total_keys: int

    @property
    def changes(self) -> tuple[Decision, ...]:
        return tuple(decision for decision in self.decisions if decision.changes_key)


@dataclass(frozen=True, slots=True)
class CapBreach:
    """A plan with more changes than the safety limits allow: the whole run is refused."""

    planned: int
    total_keys: int
    max_actions_per_run: int
    max_action_percent: float
    reason: str
    allow_actions: int | None = None


@dataclass(frozen=True, slots=True)
class NextAction:
    """The next time a rule acts on one key, and the decision it makes then (see ``next_action``)."""

    due: datetime
    decision: Decision


# --- public functions ---------------------------------------------------------------------------


def is_protected(key: KeyFacts, safety: Safety) -> bool:
    """Whether the key's hash is listed in ``protect_hashes`` or its name matches a ``protect_names``
    entry (``name_matches``)."""
    if key.hash in safety.protect_hashes:
        return True
    return bool(safety.protect_names) and name_matches(key.name, safety.protect_names)


def name_matches(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether a key name matches any of ``patterns`` as an operator reads them: a glob
    (``fnmatchcase``: case-sensitive, the whole name) or the exact name, so that ``"billing [prod]"``
    is that name and not a glob with a character class; the name and the patterns compared in
    Unicode NFC, and the name also with the white space around it trimmed (a key named
    ``" prod-db"`` is a ``prod-*`` key) and without the characters that take no room where it is
    shown (``INVISIBLE``: a key named ``"\u200bprod-db"`` reads as ``prod-db``). Protection,
    ``names`` and ``exclude_names`` all read so."""
    glob, exact = _name_patterns(patterns)
    if name in exact or glob(name) is not None:
        return True
    normal = unicodedata.normalize("NFC", name)  # the very same string when it is NFC already
    variants: tuple[str, ...] = (normal, normal.strip())
    if INVISIBLE.search(normal) is not None:
        visible = INVISIBLE.sub("", normal)
        variants += (visible, visible.strip())
    return any(variant is not name and (variant in exact or glob(variant) is not None) for variant in variants)


def idle_since(key: UseSigns, history: KeyHistory) -> datetime | None:
    """The latest time any source shows use of the key, or else the start of proven idleness.

    Each source gives a *sign of use* (a time the key was seen used) and/or the time from which it
    shows the key idle:

    - ``last_used_at``, only where the API reports the field: a time is a sign of use at that time;
      null is no sign of use and idleness from 2026-01-01 (OpenRouter records no use before then).
    - the snapshot history: ``usage_unchanged_since`` later than ``first_seen_at`` means usage was
      seen to change, a sign of use at that time. Equal to ``first_seen_at`` means usage never
      changed while we watched: no sign of use, idleness from then. Without ``first_seen_at`` we
      cannot tell, and read it as a sign of use (the cautious reading).

    With any sign of use, the answer is the latest sign; with none, the earliest start of idleness;
    None when no source shows anything. A key is unused for D exactly when it is at least D old and
    this time is not later than ``now - D``: no sign of use inside D, and some source shows D idle.

    The spend windows bound that answer from below: a key that spent in its current UTC day, week or
    month (``usage_daily``, ``byok_usage_weekly``, ...; as the API gave them at ``observed_at``, or
    as an earlier snapshot saw them: ``history.spent_from``) was used at or after that window
    began, whatever ``last_used_at`` says (``used_from``). They only move the answer later: use at
    an unknown time inside a window shows no idleness.
    """
    signs: list[datetime] = []
    idle_from: list[datetime] = []
    if key.reports_last_used:
        if key.last_used_at is None:
            if not _null_last_use_contradicted(key):
                idle_from.append(LAST_USED_RECORDED_FROM)
        else:
            signs.append(as_utc(key.last_used_at))
    if history.usage_unchanged_since is not None:
        unchanged = as_utc(history.usage_unchanged_since)
        if history.first_seen_at is not None and unchanged <= as_utc(history.first_seen_at):
            idle_from.append(unchanged)
        else:
            signs.append(unchanged)
    since = max(signs) if signs else min(idle_from) if idle_from else None
    if since is None:
        return None
    used = used_from(key, history)
    return used if used is not None and used > since else since


def used_from(key: UseSigns, history: KeyHistory) -> datetime | None:
    """The latest start of a spend window in which the key was seen to spend: now
    (``window_use_from``) or by an earlier snapshot (``history.spent_from``). None: never seen."""
    now = window_use_from(key)
    before = as_utc(history.spent_from) if history.spent_from is not None else None
    if now is None or before is None:
        return now or before
    return max(now, before)


def window_use_from(key: UseSigns) -> datetime | None:
    """The latest start of a spend window in which the key spent, as the API gave its counters at
    ``observed_at``: its UTC day, its UTC week (from Monday), its UTC calendar month (later than the
    week's start when the week began last month). The key was used at or after then. None: no
    window shows spend, or when the counters were read is unknown."""
    if key.observed_at is None:
        return None
    spent = [
        window
        for window in SPEND_WINDOWS
        if getattr(key, f"usage_{window}") > 0 or getattr(key, f"byok_usage_{window}") > 0
    ]
    if not spent:
        return None
    starts = window_starts(key.observed_at)
    return max(starts[window] for window in spent)


def _null_last_use_contradicted(key: UseSigns) -> bool:
    """A null ``last_used_at`` on a key created since OpenRouter records use, that has spent: it was
    used, and the field says nothing (an API that did not record it). It proves no idleness then;
    the snapshot history still can."""
    created = as_utc(key.created_at)
    return created >= LAST_USED_RECORDED_FROM and (key.usage > 0 or key.byok_usage > 0)


def decide(key: KeyFacts, history: KeyHistory, audit: AuditFacts, ruleset: RuleSet, now: datetime) -> Decision | None:
    """The action to take on ``key`` now, or None when there is nothing to do or report."""
    now = as_utc(now)
    if is_protected(key, ruleset.safety):
        return None
    clock = _idle_clock(key, history, audit, ruleset, now)
    matched: list[tuple[int, Rule, dict[str, Any]]] = []
    for index, rule in enumerate(ruleset.rules):
        if _in_scope(rule, key, now):
            facts = _match_facts(rule, key, history, clock, now)
            if facts is not None:
                matched.append((index, rule, facts))

    candidates: list[tuple[tuple[int, int, int], DecisionAction, Rule, dict[str, Any]]] = []
    for index, rule, facts in matched:
        step = _action_now(rule, key, history, audit, now)
        if step is not None:
            action, step_facts = step
            rank = (_ACTION_STRENGTH[action], _RULE_STRENGTH[rule.action], -index)
            candidates.append((rank, action, rule, {"match": rule.match, **facts, **step_facts}))
    best = max(candidates, key=lambda candidate: candidate[0]) if candidates else None
    matched_names = tuple(rule.name for _, rule, _ in matched)

    if best is not None and best[1] != "report":
        _, action, rule, evidence = best
        return _decision(key, action, rule.name, matched_names, evidence)

    reenable = _reenable(key, history, audit, ruleset, clock, now)
    if reenable is not None:
        index, rule, evidence = reenable
        by_position = sorted([*((i, r.name) for i, r, _ in matched), (index, rule.name)])
        return _decision(key, "enable", rule.name, tuple(name for _, name in by_position), evidence)

    if best is not None:
        _, action, rule, evidence = best
        return _decision(key, action, rule.name, matched_names, evidence)
    return None


def plan(
    keys: Sequence[KeyFacts],
    histories: Mapping[str, KeyHistory],
    audits: Mapping[str, AuditFacts],
    ruleset: RuleSet,
    now: datetime,
) -> Plan:
    """Decide every key. Keys missing from ``histories``/``audits`` have no history/no audit.

    Raises ValueError when two keys share a hash: an inventory like that is a bug upstream, and
    acting on it could act twice on one key.
    """
    seen: set[str] = set()
    decisions: list[Decision] = []
    no_history, no_audit = KeyHistory(), AuditFacts()  # frozen: one of each serves every key without
    for key in keys:
        if key.hash in seen:
            raise ValueError(f"key hash {key.hash!r} appears twice in the inventory")
        seen.add(key.hash)
        decision = decide(key, histories.get(key.hash, no_history), audits.get(key.hash, no_audit), ruleset, now)
        if decision is not None:
            decisions.append(decision)
    decisions.sort(key=lambda decision: decision.key_hash)
    return Plan(decisions=tuple(decisions), total_keys=len(keys))


def check_caps(plan: Plan, safety: Safety, *, allow_actions: int | None = None) -> CapBreach | None:
    """A breach when the plan's changes exceed ``max_actions_per_run`` or ``max_action_percent`` of all
    keys (reaching a cap exactly is allowed); None when the plan is within both.

    ``allow_actions`` (``--allow-actions N``) replaces both caps for one run: the plan may have up to
    N changes, and more than N is a breach like any other.
    """
    planned = len(plan.changes)
    reasons: list[str] = []
    if allow_actions is not None:
        if planned > allow_actions:
            reasons.append(f"{planned} planned changes exceed --allow-actions {allow_actions}")
    else:
        if planned > safety.max_actions_per_run:
            reasons.append(f"{planned} planned changes exceed max_actions_per_run = {safety.max_actions_per_run}")
        # Decimal of the written value, so that 0.3% of 1000 keys allows exactly 3 changes (float would not).
        percent = Decimal(str(safety.max_action_percent))
        if planned > 0 and Decimal(planned) * 100 > percent * plan.total_keys:
            share = f"{planned * 100 / plan.total_keys:.4g}%" if plan.total_keys else "all"
            reasons.append(
                f"{planned} planned changes are {share} of {plan.total_keys} keys, "
                f"more than max_action_percent = {safety.max_action_percent:g}%"
            )
    if not reasons:
        return None
    return CapBreach(
        planned=planned,
        total_keys=plan.total_keys,
        max_actions_per_run=safety.max_actions_per_run,
        max_action_percent=safety.max_action_percent,
        reason="; ".join(reasons),
        allow_actions=allow_actions,
    )


def next_action(
    key: KeyFacts, history: KeyHistory, audit: AuditFacts, ruleset: RuleSet, now: datetime
) -> NextAction | None:
    """When a rule will next act on ``key`` if nothing about it changes, and what it will do then.

    This is the one answer to "when will a rule act on this key": the plan, the idle report's
    ``acts_on``, the HTML report's upcoming actions and advance notices all read it. The decision is
    exactly what ``decide`` returns at ``due``, so it carries the strongest action of the rules that
    hold then: one answer per key, never one per rule. ``due == now`` means the next run acts, and
    the decision is then the plan's own decision for the key. A later ``due`` is the earliest time a
    condition that only time changes turns a rule on: an expiry reached, a key old enough for
    ``min_age``, idleness reaching ``idle_for``, a disabled key's ``grace`` over. Any change to the
    key (new use, a re-enable, a new expiry) moves or removes it. None: no rule acts on the key as it
    stands, however long one waits (a protected key, or nothing matches).
    """
    now = as_utc(now)
    for moment in _moments(key, history, audit, ruleset, now):
        decision = decide(key, history, audit, ruleset, moment)
        if decision is not None:
            return NextAction(due=moment, decision=decision)
    return None


def lasting_evidence(evidence: Mapping[str, Any]) -> dict[str, Any]:
    """The evidence without the day counts that only measure the time since another of its fields
    (``idle_days``, ``disabled_days``): what stays equal from run to run while the decision does."""
    return {name: value for name, value in evidence.items() if name not in _AGEING}


def evidence_at(evidence: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """The evidence with its day counts measured at ``now`` (the inverse of ``lasting_evidence``)."""
    aged = dict(evidence)
    for days, since in _AGEING.items():
        if isinstance(evidence.get(since), str) and days not in evidence:
            aged[days] = _days(as_utc(now) - parse_time(evidence[since]))
    return aged


# --- the parts ----------------------------------------------------------------------------------


def _decision(
    key: KeyFacts, action: DecisionAction, rule: str, rules: tuple[str, ...], evidence: dict[str, Any]
) -> Decision:
    return Decision(
        key_hash=key.hash,
        key_name=key.name,
        workspace_id=key.workspace_id,
        action=action,
        rule=rule,
        rules=rules,
        evidence=evidence,
    )


def _in_scope(
    rule: Rule, key: KeyFacts, now: datetime, *, check_disabled: bool = True, check_min_age: bool = True
) -> bool:
    """Whether the rule's filters let it look at the key at all."""
    if rule.names and not name_matches(key.name, rule.names):
        return False
    if rule.exclude_names and name_matches(key.name, rule.exclude_names):
        return False
    if rule.workspaces and key.workspace_id not in rule.workspaces:
        return False
    if check_min_age and rule.min_age is not None and now - as_utc(key.created_at) < rule.min_age:
        return False
    return not (check_disabled and rule.disabled is not None and key.disabled != rule.disabled)


@lru_cache(maxsize=256)
def _name_patterns(patterns: tuple[str, ...]) -> tuple[Callable[[str], re.Match[str] | None], frozenset[str]]:
    """The globs (``fnmatchcase``'s reading) as one compiled pattern, and the exact names; both NFC."""
    normal = [unicodedata.normalize("NFC", pattern) for pattern in patterns]
    glob = re.compile("|".join(f"(?:{translate(pattern)})" for pattern in normal)).match
    return glob, frozenset(normal)


def _figure(amount: Decimal | None) -> float | None:
    """Money as evidence records it: a JSON number. Decisions compare the exact Decimal; the figure
    is only the record, and prints as the same digits (a float holds 15 significant digits)."""
    return None if amount is None else float(amount)


def _days(delta: timedelta) -> float:
    return round(delta.total_seconds() / 86400, 2)


def _match_facts(
    rule: Rule, key: KeyFacts, history: KeyHistory, clock: _IdleClock, now: datetime
) -> dict[str, Any] | None:
    """The facts that show the rule's match holds for the key, or None when it does not."""
    if rule.match == "expired":
        if key.expires_at is not None and as_utc(key.expires_at) <= now:
            return {"expires_at": isoformat(key.expires_at)}
        return None
    if rule.match == "unused":
        return _unused_facts(rule, key, history, clock, now)
    if rule.window is None:  # the model forbids it; never guess a window
        return None
    if rule.threshold_usd is not None:
        spend, _ = key.spend_range(rule.window)  # what the figures prove at least
        if spend is not None and spend >= rule.threshold_usd and not _reset_since_read(rule.window, key, now):
            return {
                "window": rule.window,
                "window_spend_usd": _figure(spend),
                "threshold_usd": _figure(rule.threshold_usd),
                "include_byok_in_limit": key.include_byok_in_limit,
            }
        return None
    if (
        key.limit is not None
        and key.limit_remaining is not None
        and key.limit_remaining <= 0
        and not _reset_since_read(key.limit_reset, key, now)
    ):
        return {
            "limit": _figure(key.limit),
            "limit_remaining": _figure(key.limit_remaining),
            "limit_reset": key.limit_reset,
        }
    return None


@dataclass(frozen=True, slots=True)
class _IdleClock:
    """Since when ``unused`` rules count a key idle (None: none can find it unused), the time we
    gave the key back when the count starts there, and the ``reenable`` rule (with its position)
    that holds the key disabled, if one does (``_reenable_holder``)."""

    since: datetime | None
    given_back_at: datetime | None = None
    held_by: tuple[int, Rule] | None = None


def _idle_clock(key: KeyFacts, history: KeyHistory, audit: AuditFacts, ruleset: RuleSet, now: datetime) -> _IdleClock:
    """The idle clock of ``unused`` rules: ``idle_since``, except for keys whose idleness is our doing.

    - A key that an ``over_budget`` rule with ``reenable = true`` disabled, unchanged since, is held
      until its window resets: it cannot be used, and the rule has promised it back. No ``unused``
      rule finds it idle meanwhile (an idle rule with a delete would otherwise delete it before the
      reset, and its match would keep the reset from re-enabling it).
    - A key we gave back (``undo``, ``enable``, a re-enable) is counted idle from then: giving it back
      and taking it again at the next run for idleness that predates the give-back would undo the
      operator's (or the rule's) decision at once. So is a key we disabled that someone enabled
      again in OpenRouter, from its ``updated_at`` (at or after that).
    """
    held_by = _reenable_holder(key, audit, ruleset, now)
    if held_by is not None:
        return _IdleClock(None, held_by=held_by)
    since = idle_since(key, history)
    if since is not None and audit.last_change == "enable" and audit.last_change_at is not None:
        given_back = as_utc(audit.last_change_at)
        if given_back > since:
            return _IdleClock(given_back, given_back)
    if since is not None and audit.last_change == "disable" and not key.disabled and key.updated_at is not None:
        # Our disable was undone outside keyhygiene (in OpenRouter): the key's updated_at is at or
        # after that give-back, and the idleness before it was ours.
        given_back = as_utc(key.updated_at)
        if given_back > since:
            return _IdleClock(given_back, given_back)
    return _IdleClock(since)


def _unused_facts(
    rule: Rule, key: KeyFacts, history: KeyHistory, clock: _IdleClock, now: datetime
) -> dict[str, Any] | None:
    if rule.idle_for is None:
        return None
    cutoff = now - rule.idle_for
    if as_utc(key.created_at) > cutoff:
        return None
    since = clock.since
    # Any sign of use after the cutoff, from either source, makes ``since`` later than the cutoff;
    # no source at all leaves it None: in both cases the key is not shown to be unused.
    if since is None or since > cutoff:
        return None
    # A null last_used_at proves no use since OpenRouter began recording it, but a key is idle only
    # since it exists: the evidence says no more than that (the decision above is the same).
    since = max(since, as_utc(key.created_at))
    facts = {
        "idle_for": duration_text(rule.idle_for),
        "idle_since": isoformat(since),
        "idle_days": _days(now - since),
        "created_at": isoformat(key.created_at),
        "reports_last_used": key.reports_last_used,
        "last_used_at": isoformat(key.last_used_at),
        "usage_unchanged_since": isoformat(history.usage_unchanged_since),
        "first_seen_at": isoformat(history.first_seen_at),
    }
    if clock.given_back_at is not None:
        facts["given_back_at"] = isoformat(clock.given_back_at)
    used = used_from(key, history)
    if used is not None:
        facts["spent_in_window_from"] = isoformat(used)
    return facts


def _disabled_start(key: KeyFacts, history: KeyHistory, audit: AuditFacts) -> tuple[datetime, str] | None:
    """The latest time any source shows the key to have been disabled from, and that source.

    The sources: the key's ``updated_at`` (the API's own record of its last change: a disabled key
    has been disabled at least since then); the snapshot history (since when the snapshots have
    seen it disabled without a break), where the API gives no ``updated_at`` or the snapshots saw
    the key before that run began (enabled, or not there: the disable is newer than that, whatever
    ``updated_at`` says); and our audit log when our last change to the key was a disable. The
    latest one counts: an earlier one may predate a re-enable and a new disable that the others
    saw, or come from an API whose ``updated_at`` did not move with a disable (ours or anyone's).
    The cost of the rule is that a grace counted by the snapshots may start up to one sync after
    the disable. A key already disabled when the snapshots first saw it has no such run to show:
    its ``updated_at`` counts. None when no source shows it.
    """
    sources: list[tuple[datetime, str]] = []
    if key.updated_at is not None:
        sources.append((as_utc(key.updated_at), "updated_at"))
    if history.disabled_since is not None and (key.updated_at is None or _disabled_after_first_sight(history)):
        sources.append((as_utc(history.disabled_since), "history"))
    if audit.last_change == "disable" and audit.last_change_at is not None:
        sources.append((as_utc(audit.last_change_at), "audit"))
    return max(sources, default=None)


def _disabled_after_first_sight(history: KeyHistory) -> bool:
    """Whether the snapshots saw the key before the run of snapshots in which it is disabled began
    (or cannot tell: no first sight recorded)."""
    assert history.disabled_since is not None
    return history.first_seen_at is None or as_utc(history.disabled_since) > as_utc(history.first_seen_at)


def _disabled_proof(
    key: KeyFacts, history: KeyHistory, audit: AuditFacts, now: datetime
) -> tuple[datetime, str] | None:
    """The time since which a disabled key is shown to have been disabled, and which source shows it
    (``_disabled_start``). A time later than ``now`` proves nothing. None for an enabled key or when
    no source shows it."""
    if not key.disabled:
        return None
    start = _disabled_start(key, history, audit)
    return start if start is not None and start[0] <= now else None


def _action_now(
    rule: Rule, key: KeyFacts, history: KeyHistory, audit: AuditFacts, now: datetime
) -> tuple[DecisionAction, dict[str, Any]] | None:
    """What a matching rule does to the key now; None when it has nothing to do yet."""
    if rule.action == "report":
        return "report", {}
    if rule.action == "disable":
        return None if key.disabled else ("disable", {})
    grace = duration_text(rule.grace)
    if rule.grace <= timedelta(0):
        return "delete", {"grace": grace, "step": "delete-at-once"}
    if not key.disabled:
        return "disable", {"grace": grace, "step": "disable-before-delete"}
    proof = _disabled_proof(key, history, audit, now)
    if proof is None:
        return None
    since, source = proof
    if now - since < rule.grace:
        return None
    return "delete", {
        "grace": grace,
        "step": "delete-after-grace",
        "disabled_since": isoformat(since),
        "disabled_since_source": source,
        "disabled_days": _days(now - since),
    }


def _reset_since_read(window: str | None, key: KeyFacts, now: datetime) -> bool:
    """Whether the spend window ``window`` (a rule's, or a limit's reset) began again between the
    snapshot that read the key's figures and ``now``: they are then the last window's, and prove
    nothing of this one's (the fresh check before a change reads them again)."""
    if window not in SPEND_WINDOWS or key.observed_at is None:
        return False
    return window_starts(now)[window] > as_utc(key.observed_at)


def _under_budget_facts(rule: Rule, key: KeyFacts) -> dict[str, Any] | None:
    """Positive proof that an over_budget rule no longer holds; None when it holds or is unknown."""
    if rule.window is None:
        return None
    if rule.threshold_usd is not None:
        _, spend = key.spend_range(rule.window)  # the most it may be; None (a field left out): no proof
        if spend is not None and spend < rule.threshold_usd:
            return {
                "window": rule.window,
                "window_spend_usd": _figure(spend),
                "threshold_usd": _figure(rule.threshold_usd),
            }
        return None
    if {"limit", "limit_remaining"} & key.unknown_counters:  # left out: not "no limit", no proof
        return None
    if key.limit is None or (key.limit_remaining is not None and key.limit_remaining > 0):
        return {
            "limit": _figure(key.limit),
            "limit_remaining": _figure(key.limit_remaining),
            "limit_reset": key.limit_reset,
        }
    return None


def _reenable_holder(key: KeyFacts, audit: AuditFacts, ruleset: RuleSet, now: datetime) -> tuple[int, Rule] | None:
    """The ``reenable`` rule that holds this key disabled until its window resets, with its position:
    the key is disabled, our last change to it was a disable by that very rule, and nothing changed
    it since (its ``updated_at`` is still the one the API answered our disable with); and the rule's
    filters still take the key in, except ``disabled`` (the rule turned the key from enabled to
    disabled itself, so its ``disabled`` filter would otherwise lock the key out of ever being
    re-enabled). None otherwise."""
    if not key.disabled or audit.last_change != "disable" or audit.last_change_rule is None:
        return None
    if key.updated_at is None or audit.key_updated_at is None or as_utc(key.updated_at) != as_utc(audit.key_updated_at):
        # The key changed after our disable, or nothing shows it did not (no ``updated_at`` now or
        # in our record): someone else may have disabled it since. ``undo`` and ``enable`` agree.
        return None
    found = next(
        ((index, rule) for index, rule in enumerate(ruleset.rules) if rule.name == audit.last_change_rule),
        None,
    )
    if found is None:
        return None
    rule = found[1]
    if not (rule.reenable and rule.match == "over_budget" and rule.action == "disable"):
        return None
    if not _in_scope(rule, key, now, check_disabled=False):
        return None
    return found


def _reenable(
    key: KeyFacts, history: KeyHistory, audit: AuditFacts, ruleset: RuleSet, clock: _IdleClock, now: datetime
) -> tuple[int, Rule, dict[str, Any]] | None:
    """The ``reenable`` rule that may enable this key now, with its evidence, or None.

    Only a key that rule holds (``_reenable_holder``); only when the key is proven back under
    budget; and only when no other disable or delete rule matches the key, disabled or not
    (enabling it would just make that rule disable it again at the next run). ``unused`` rules do
    not find a held key idle (``_idle_clock``).
    """
    if clock.held_by is None:
        return None
    index, rule = clock.held_by
    facts = _under_budget_facts(rule, key)
    if facts is None:
        return None
    for other in ruleset.rules:
        if other is rule or other.action == "report":
            continue
        if _in_scope(other, key, now, check_disabled=False) and _match_facts(other, key, history, clock, now):
            return None
    return (
        index,
        rule,
        {
            "match": rule.match,
            "step": "reenable",
            "disabled_by_rule": rule.name,
            "disabled_at": isoformat(audit.last_change_at),
            **facts,
        },
    )


def _moments(key: KeyFacts, history: KeyHistory, audit: AuditFacts, ruleset: RuleSet, now: datetime) -> list[datetime]:
    """``now``, then every later time at which a rule's condition can turn true with time alone.

    ``decide`` depends on time only through these thresholds (each holds for good once reached), so
    its answer can change only at one of them: checking each in order finds the first action.
    """
    if is_protected(key, ruleset.safety):
        return []
    created = as_utc(key.created_at)
    since = _idle_clock(key, history, audit, ruleset, now).since
    disabled_start = _disabled_start(key, history, audit)
    moments = {now}
    for rule in ruleset.rules:
        if not _in_scope(rule, key, now, check_min_age=False):
            continue  # the filters that time does not change keep this rule off the key for good
        if rule.min_age is not None:
            moments.add(created + rule.min_age)
        if rule.match == "expired" and key.expires_at is not None:
            moments.add(as_utc(key.expires_at))
        if rule.match == "unused" and rule.idle_for is not None and since is not None:
            moments.add(max(created, since) + rule.idle_for)
        if rule.action == "delete" and key.disabled and disabled_start is not None:
            moments.add(disabled_start[0] + rule.grace)
    return sorted(moment for moment in moments if moment >= now)
