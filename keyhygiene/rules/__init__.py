"""The rules file and the pure rules engine that decides which keys to disable, delete or enable."""

from __future__ import annotations

from .describe import describe
from .engine import (
    CapBreach,
    Decision,
    NextAction,
    Plan,
    check_caps,
    decide,
    evidence_at,
    idle_since,
    is_protected,
    lasting_evidence,
    next_action,
    plan,
)
from .inputs import AuditFacts, KeyHistory
from .keyfacts import KeyFacts, UseSigns
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
    "KeyFacts",
    "KeyHistory",
    "NextAction",
    "NotifyTarget",
    "Plan",
    "Rule",
    "RuleSet",
    "RulesError",
    "Safety",
    "UseSigns",
    "check_caps",
    "decide",
    "describe",
    "evidence_at",
    "idle_since",
    "is_protected",
    "lasting_evidence",
    "load_rules",
    "next_action",
    "parse_rules",
    "plan",
    "resolve_workspaces",
    "unmatched_workspaces",
    "workspace_ids",
]
