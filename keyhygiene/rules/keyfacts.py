"""The engine's own view of one key: only the fields the rules read, with money as exact Decimal.

The engine never sees the API's ``Key`` or a database row; the caller builds a ``KeyFacts`` from
either with one function (``keyhygiene.enforcement.key_facts`` for the API's keys and the store's
inventory). A report that only asks how long a key has been idle passes anything with the fields
of ``UseSigns``, so nothing is zero-filled to call the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Literal, Protocol

Window = Literal["daily", "weekly", "monthly", "total"]


class UseSigns(Protocol):
    """What ``idle_since`` reads of a key besides its history."""

    @property
    def reports_last_used(self) -> bool: ...

    @property
    def last_used_at(self) -> datetime | None: ...

    @property
    def created_at(self) -> datetime: ...

    @property
    def usage(self) -> Decimal: ...

    @property
    def byok_usage(self) -> Decimal: ...

    @property
    def usage_daily(self) -> Decimal: ...

    @property
    def usage_weekly(self) -> Decimal: ...

    @property
    def usage_monthly(self) -> Decimal: ...

    @property
    def byok_usage_daily(self) -> Decimal: ...

    @property
    def byok_usage_weekly(self) -> Decimal: ...

    @property
    def byok_usage_monthly(self) -> Decimal: ...

    @property
    def observed_at(self) -> datetime | None: ...


@dataclass(frozen=True, slots=True)
class KeyFacts:
    """One key's current state as the rules read it.

    ``reports_last_used``: whether the API gave ``last_used_at`` at all (older API versions do not);
    null ``last_used_at`` then means "no use recorded", not "unknown".
    Money (``usage*``, ``byok_usage*``, ``limit``, ``limit_remaining``) is in US dollars, exact.
    """

    hash: str
    name: str
    workspace_id: str | None
    disabled: bool
    created_at: datetime
    updated_at: datetime | None
    expires_at: datetime | None
    last_used_at: datetime | None
    reports_last_used: bool
    usage: Decimal
    usage_daily: Decimal
    usage_weekly: Decimal
    usage_monthly: Decimal
    byok_usage: Decimal
    byok_usage_daily: Decimal
    byok_usage_weekly: Decimal
    byok_usage_monthly: Decimal
    limit: Decimal | None
    limit_remaining: Decimal | None
    limit_reset: str | None
    include_byok_in_limit: bool
    unknown_counters: frozenset[str] = frozenset()
    """The spend fields the API left out or sent as null (the window counters ``usage_monthly``,
    ``byok_usage_daily``, ..., ``byok_usage`` and ``include_byok_in_limit``; ``limit`` and
    ``limit_remaining`` only when left out, as null there means no limit): read as zero, false or
    none above, but no proof of anything."""
    observed_at: datetime | None = None
    """When the API gave these values (the snapshot's time, or the fresh check's): a window counter
    above zero shows use inside that window as of then. None: not known, and they show nothing."""

    def spend_range(self, window: Window) -> tuple[Decimal | None, Decimal | None]:
        """The least and the most the key may have spent in ``window`` as its limit counts it
        (credits, plus BYOK where the key counts BYOK), as far as the API's figures tell: a field
        it left out or sent as null (``unknown_counters``) counts for nothing in the least, and
        leaves the most unknown (None). Where whether the key counts BYOK is unknown, the least
        is its credits and the most adds its BYOK."""
        unknown = self.unknown_counters
        if window == "total":
            credits, byok, names = self.usage, self.byok_usage, ("usage", "byok_usage")
        else:
            credits = getattr(self, f"usage_{window}")
            byok = getattr(self, f"byok_usage_{window}")
            names = (f"usage_{window}", f"byok_usage_{window}")
        if names[0] in unknown:
            return None, None
        byok_known = names[1] not in unknown
        if "include_byok_in_limit" in unknown:
            return credits, (credits + byok if byok_known else None)
        if not self.include_byok_in_limit:
            return credits, credits
        return (credits + byok, credits + byok) if byok_known else (credits, None)
