"""The rules file as keyhygiene understands it: immutable values, checked when built.

``keyhygiene.rules.loader`` turns a TOML file into these values and reports every mistake with the file, line
and field. The checks in ``__post_init__`` repeat the structural ones so that a ``Rule`` built in
code (tests, other callers) cannot hold a combination the engine would have to guess about.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from decimal import Decimal
from typing import Literal, get_args

from keyhygiene.timeutil import format_duration

Match = Literal["expired", "unused", "over_budget"]
Action = Literal["disable", "delete", "report"]
Window = Literal["daily", "weekly", "monthly", "total"]
NotifyFormat = Literal["slack", "json"]
NotifyEvent = Literal["done", "failed", "refused", "upcoming"]

MATCHES: tuple[str, ...] = get_args(Match)
ACTIONS: tuple[str, ...] = get_args(Action)
WINDOWS: tuple[str, ...] = get_args(Window)
NOTIFY_FORMATS: tuple[str, ...] = get_args(NotifyFormat)
NOTIFY_EVENTS: tuple[str, ...] = get_args(NotifyEvent)

DEFAULT_GRACE = timedelta(days=7)


def duration_text(delta: timedelta) -> str:
    """A duration as rules files write it; whole days in days ("7d", not "1w"), the usual unit there."""
    seconds = int(delta.total_seconds())
    if seconds and seconds % 86400 == 0:
        return f"{seconds // 86400}d"
    return format_duration(delta)


class RulesError(Exception):
    """A rules file that cannot be used, and where: ``path:line: field: message``.

    ``line`` and ``field`` are None where they do not apply (an unreadable file has neither).
    """

    def __init__(self, path: str, line: int | None, field: str | None, message: str) -> None:
        # All four go to ``args`` so the error survives pickling (Celery sends errors between processes).
        super().__init__(path, line, field, message)
        self.path = path
        self.line = line
        self.field = field
        self.message = message

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        said = f"{where}: {self.message}" if self.field is None else f"{where}: {self.field}: {self.message}"
        # One line, whatever the file holds: a rule named "a\rb" is shown as written in TOML.
        return _CONTROL.sub(lambda found: found.group().encode("unicode_escape").decode("ascii"), said)


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
"""Characters a terminal acts on, or that end a line for ``str.splitlines``."""

INVISIBLE = re.compile("[\u00ad\u180e\u200b\u200e\u200f\u202a-\u202e\u2060\u2066-\u2069\ufeff]")
"""Characters that take no room where a name is shown (soft hyphen, zero-width space, word joiner,
byte-order mark, direction marks), which a copy and paste brings in unseen. A key name is also
matched without them; a ``protect_names`` or ``exclude_names`` glob, or a ``protect_hashes`` entry,
holding one is refused."""


@dataclass(frozen=True, slots=True)
class Safety:
    """The limits every enforcement run is held to, and the keys no rule may touch."""

    dry_run: bool = True
    max_actions_per_run: int = 50
    max_action_percent: float = 10.0
    protect_hashes: tuple[str, ...] = ()
    protect_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.max_actions_per_run, bool) or self.max_actions_per_run <= 0:
            raise ValueError("max_actions_per_run must be a positive whole number")
        if not (0 < self.max_action_percent <= 100):
            raise ValueError("max_action_percent must be more than 0 and at most 100")


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``[[rule]]``: which keys it matches, what it does to them, and its filters."""

    name: str
    match: Match
    action: Action
    grace: timedelta = DEFAULT_GRACE
    idle_for: timedelta | None = None
    window: Window | None = None
    threshold_usd: Decimal | None = None
    reenable: bool = False
    names: tuple[str, ...] = ()
    exclude_names: tuple[str, ...] = ()
    workspaces: tuple[str, ...] = ()
    min_age: timedelta | None = None
    disabled: bool | None = None

    def __post_init__(self) -> None:
        if self.threshold_usd is not None and not isinstance(self.threshold_usd, Decimal):
            # Money is compared exactly: a number written 100.1 means exactly 100.1 dollars.
            object.__setattr__(self, "threshold_usd", Decimal(str(self.threshold_usd)))
        problem = self._problem()
        if problem is not None:
            raise ValueError(f"rule {self.name!r}: {problem}")

    def _problem(self) -> str | None:
        if not self.name.strip():
            return "name is empty"
        if self.match not in MATCHES:
            return f"unknown match {self.match!r}"
        if self.action not in ACTIONS:
            return f"unknown action {self.action!r}"
        if self.grace < timedelta(0):
            return "grace is negative"
        if (self.match == "unused") != (self.idle_for is not None):
            return "idle_for is required by, and only allowed with, match 'unused'"
        if self.idle_for is not None and self.idle_for <= timedelta(0):
            return "idle_for must be more than zero"
        if (self.match == "over_budget") != (self.window is not None):
            return "window is required by, and only allowed with, match 'over_budget'"
        if self.window is not None and self.window not in WINDOWS:
            return f"unknown window {self.window!r}"
        if self.threshold_usd is not None:
            if self.match != "over_budget":
                return "threshold_usd is only allowed with match 'over_budget'"
            if not math.isfinite(self.threshold_usd) or self.threshold_usd <= 0:
                return "threshold_usd must be a number more than zero"
        if self.reenable and (self.match != "over_budget" or self.action != "disable"):
            return "reenable is only allowed with match 'over_budget' and action 'disable'"
        if self.min_age is not None and self.min_age < timedelta(0):
            return "min_age is negative"
        return None


@dataclass(frozen=True, slots=True)
class NotifyTarget:
    """One ``[[notify]]``: where notices go (the URL is read from the variable ``url_env``) and for what."""

    name: str
    url_env: str
    format: NotifyFormat = "json"
    on: frozenset[NotifyEvent] = frozenset({"done", "failed", "refused"})
    secret_env: str | None = None
    upcoming_within: timedelta | None = None


@dataclass(frozen=True, slots=True)
class RuleSet:
    """A whole rules file: its safety settings, its rules in file order, and where it came from."""

    safety: Safety
    rules: tuple[Rule, ...]
    source: str
    notify: tuple[NotifyTarget, ...] = ()
    warnings: tuple[RulesError, ...] = field(default=(), compare=False)
    """Settings that are valid but do nothing as written, each with where it is (``rules check`` and
    ``plan`` print them; they never stop a job)."""

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for rule in self.rules:
            if rule.name in seen:
                raise ValueError(f"rule name {rule.name!r} is used twice")
            seen.add(rule.name)

    def rule(self, name: str) -> Rule | None:
        """The rule called ``name``, or None."""
        return next((rule for rule in self.rules if rule.name == name), None)


def _ids_of(value: str, names: Mapping[str, str]) -> tuple[str, ...]:
    """The ids a value stands for: itself when it is an id, else every workspace of that exact name."""
    if value in names:
        return (value,)
    return tuple(sorted(workspace_id for workspace_id, name in names.items() if name == value))


def workspace_ids(values: tuple[str, ...], names: Mapping[str, str]) -> tuple[str, ...]:
    """Workspace ids and exact names (``values``) as ids, given ``names`` (``{workspace id: name}``).

    A value that is an id, or that matches nothing, stays as written: ids are what keys carry, and
    a value that matches nothing keeps matching no key.
    """
    resolved: list[str] = []
    for value in values:
        for workspace_id in _ids_of(value, names) or (value,):
            if workspace_id not in resolved:
                resolved.append(workspace_id)
    return tuple(resolved)


def resolve_workspaces(ruleset: RuleSet, names: Mapping[str, str]) -> RuleSet:
    """The rule set with each ``workspaces`` filter written as ids (see ``workspace_ids``)."""
    rules = tuple(
        replace(rule, workspaces=workspace_ids(rule.workspaces, names)) if rule.workspaces else rule
        for rule in ruleset.rules
    )
    return replace(ruleset, rules=rules)


def unmatched_workspaces(ruleset: RuleSet, names: Mapping[str, str]) -> list[tuple[str, str]]:
    """``(rule name, value)`` for each ``workspaces`` value that is neither an id nor a name in ``names``."""
    return [(rule.name, value) for rule in ruleset.rules for value in rule.workspaces if not _ids_of(value, names)]
