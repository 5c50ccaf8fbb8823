"""The rules file and the pure rules engine that decides which keys to disable, delete or enable."""

from __future__ import annotations

from .describe import describe
from .engine import (
    CapBreach,
    Decision,
    Plan,
    check_caps,
    decide,
    idle_since,
    is_protected,
    plan,
    upcoming,
)
from .inputs import AuditFacts, KeyHistory
from .loader import load_rules, parse_rules
from .model import (
    NotifyTarget,
    Rule,
    RulesError,
    RuleSet,
    Safety,
    resolve_workspaces,
    unmatched_workspaces,
    workspace_ids,
)

__all__ = [
    "AuditFacts",
    "CapBreach",
    "Decision",
    "KeyHistory",
    "NotifyTarget",
    "Plan",
    "Rule",
    "RuleSet",
    "RulesError",
    "Safety",
    "check_caps",
    "decide",
    "describe",
    "idle_since",
    "is_protected",
    "load_rules",
    "parse_rules",
    "plan",
    "resolve_workspaces",
    "unmatched_workspaces",
    "upcoming",
    "workspace_ids",
]
