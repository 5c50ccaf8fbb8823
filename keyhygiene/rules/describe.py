"""The rules as keyhygiene understands them, in plain words (``keyhygiene rules check``)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

from keyhygiene.visible import escape_control

from .model import NOTIFY_EVENTS, NotifyTarget, Rule, RuleSet, Safety, duration_text


def describe(ruleset: RuleSet) -> str:
    """Every safety setting and every rule in plain words, durations written the one way we read them."""
    lines = [f"Rules file: {ruleset.source}"]
    if ruleset.safety.dry_run:
        lines.append("DRY RUN: nothing will be changed (set dry_run = false in [safety] to act)")
    lines.append("")
    lines.extend(_describe_safety(ruleset.safety))
    lines.append("")
    if not ruleset.rules:
        lines.append("No rules: nothing will be done to any key.")
    else:
        count = len(ruleset.rules)
        lines.append(
            f"Rules ({count}, in file order; a key several rules match gets the strongest action, "
            "delete > disable > report, and every matching rule is recorded):"
        )
        for number, rule in enumerate(ruleset.rules, start=1):
            lines.append(f"  {number}. {rule.name}: {describe_rule(rule)}")
            lines.extend(f"       {line}" for line in _describe_filters(rule))
    if ruleset.notify:
        lines.append("")
        lines.append(f"Notices ({len(ruleset.notify)} target(s)):")
        lines.extend(f"  {_describe_notify(target)}" for target in ruleset.notify)
    # Names are the operator's text: one holding a line break or an ESC still reads as one line.
    return "\n".join(escape_control(line) for line in lines) + "\n"


def _describe_notify(target: NotifyTarget) -> str:
    """One notify target in a line: never the URL or the secret, only the variables that hold them."""
    events = ", ".join(event for event in NOTIFY_EVENTS if event in target.on)
    upcoming = f" (due within {duration_text(target.upcoming_within)})" if target.upcoming_within else ""
    signed = f", signed with the secret in {target.secret_env}" if target.secret_env else ""
    return f"{target.name}: {target.format} to the URL in {target.url_env}, on {events}{upcoming}{signed}"


def describe_rule(rule: Rule) -> str:
    """One rule's match and action as a sentence (filters not included)."""
    return f"{_describe_match(rule)} -> {_describe_action(rule)}"


def _describe_safety(safety: Safety) -> list[str]:
    mode = "true (plan and record only)" if safety.dry_run else "false (changes are made)"
    return [
        "Safety:",
        f"  dry_run: {mode}",
        f"  at most {safety.max_actions_per_run} changes per run and at most "
        f"{safety.max_action_percent:g}% of all keys; a run that plans more is refused whole",
        f"  protected key hashes: {', '.join(safety.protect_hashes) or 'none'}",
        f"  protected key names: {', '.join(safety.protect_names) or 'none'}",
    ]


def _usd(amount: Decimal) -> str:
    return f"${amount:,.2f}" if amount == round(amount, 2) else f"${amount}"


def _describe_match(rule: Rule) -> str:
    if rule.match == "expired":
        return "keys that have expired (expires_at is set and not later than now)"
    if rule.match == "unused":
        idle = duration_text(rule.idle_for or timedelta(0))
        return (
            f"keys at least {idle} old with no new use for {idle} "
            "(neither last_used_at nor the usage history shows use in that time)"
        )
    window = rule.window or "total"
    if rule.threshold_usd is None:
        return (
            "keys with a spend limit that is used up (limit_remaining is 0 or less; "
            "the key's own limit_reset sets the period, not window)"
        )
    usage = "usage" if window == "total" else f"usage_{window}"
    period = "lifetime" if window == "total" else window
    return (
        f"keys whose {period} spend ({usage}, plus BYOK spend where the key counts BYOK in its limit) "
        f"is at least {_usd(rule.threshold_usd)}"
    )


def _describe_action(rule: Rule) -> str:
    if rule.action == "report":
        return "report only (the key is not changed)"
    if rule.action == "disable":
        text = "disable"
        if rule.reenable:
            text += "; re-enable the keys this rule disabled once they are no longer over budget"
        return text
    if rule.grace == timedelta(0):
        return "delete at once (grace 0: no disable first)"
    grace = duration_text(rule.grace)
    return f"disable first, then delete once the key has been disabled for at least {grace}"


def _describe_filters(rule: Rule) -> list[str]:
    lines = []
    if rule.names:
        lines.append(f"only keys named: {', '.join(rule.names)}")
    if rule.exclude_names:
        lines.append(f"never keys named: {', '.join(rule.exclude_names)}")
    if rule.workspaces:
        lines.append(f"only in workspaces: {', '.join(rule.workspaces)}")
    if rule.min_age is not None:
        lines.append(f"only keys at least {duration_text(rule.min_age)} old")
    if rule.disabled is not None:
        lines.append("only keys that are disabled" if rule.disabled else "only keys that are enabled")
    return lines
