"""What the engine needs to know about a key beyond its current state: its snapshot history and our
own past changes to it. The caller (the database layer) computes these; the engine only reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class KeyHistory:
    """Facts about one key drawn from the snapshots.

    ``first_seen_at``: time of the first complete snapshot that contained the key.
    ``usage_unchanged_since``: time of the earliest snapshot from which lifetime ``usage`` AND
    ``byok_usage`` have equalled their current values without a change (None: no history).
    ``disabled_since``: time of the earliest snapshot of the trailing run of snapshots in which the
    key was disabled at every one (None: not disabled in the history, or unknown).
    ``spent_from``: the latest start of a UTC day, week or month in which a snapshot saw the key
    spend (a window counter above zero): it was used at or after then (None: none seen).
    """

    first_seen_at: datetime | None = None
    usage_unchanged_since: datetime | None = None
    disabled_since: datetime | None = None
    spent_from: datetime | None = None


@dataclass(frozen=True, slots=True)
class AuditFacts:
    """Our own last executed change on one key (not dry-run, outcome done), from the audit log."""

    last_change: str | None = None  # "disable" | "enable" | "delete"
    last_change_rule: str | None = None
    last_change_at: datetime | None = None
    # The key's ``updated_at`` as the API answered our change: if the key's ``updated_at`` differs
    # now, someone else has changed the key since.
    key_updated_at: datetime | None = None
