"""The fields of an API key object, defined once.

The store's columns, the report columns and the fake API's defaults derive from this list. Pure
data: no I/O, no imports from the rest of keyhygiene, so every layer may import it.

``kind`` is how a value is read and stored: ``text``, ``flag`` (boolean), ``money`` (USD; stored as
integer micro-dollars, read as ``Decimal``) or ``time`` (ISO 8601 on the wire, aware UTC inside).
``volatile`` fields change with use; the store versions them apart from the rest, so a usage tick
costs a narrow row instead of the whole key.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

Kind = Literal["text", "flag", "money", "time"]


@dataclass(frozen=True, slots=True)
class Field:
    """One field of ``GET /keys``'s key object."""

    name: str
    kind: Kind
    volatile: bool = False
    nullable: bool = True
    default: object = None
    """What the fake API answers when a key is created without it."""


KEY_FIELDS: tuple[Field, ...] = (
    Field("hash", "text", nullable=False),
    Field("name", "text", nullable=False, default=""),
    Field("label", "text", nullable=False, default=""),
    Field("disabled", "flag", volatile=True, nullable=False, default=False),
    Field("limit", "money"),
    Field("limit_remaining", "money", volatile=True),
    Field("limit_reset", "text"),
    Field("include_byok_in_limit", "flag", nullable=False, default=False),
    Field("usage", "money", volatile=True, nullable=False, default=0.0),
    Field("usage_daily", "money", volatile=True, nullable=False, default=0.0),
    Field("usage_weekly", "money", volatile=True, nullable=False, default=0.0),
    Field("usage_monthly", "money", volatile=True, nullable=False, default=0.0),
    Field("byok_usage", "money", volatile=True, nullable=False, default=0.0),
    Field("byok_usage_daily", "money", volatile=True, nullable=False, default=0.0),
    Field("byok_usage_weekly", "money", volatile=True, nullable=False, default=0.0),
    Field("byok_usage_monthly", "money", volatile=True, nullable=False, default=0.0),
    Field("created_at", "time", nullable=False),
    Field("updated_at", "time"),
    Field("expires_at", "time"),
    Field("last_used_at", "time", volatile=True),
    Field("workspace_id", "text"),
    Field("creator_user_id", "text"),
    Field("external_user", "text"),
)

FIELDS_BY_NAME: dict[str, Field] = {field.name: field for field in KEY_FIELDS}
VOLATILE: tuple[Field, ...] = tuple(field for field in KEY_FIELDS if field.volatile)
STABLE: tuple[Field, ...] = tuple(field for field in KEY_FIELDS if not field.volatile and field.name != "hash")
MONEY: tuple[Field, ...] = tuple(field for field in KEY_FIELDS if field.kind == "money")

MICROS_PER_USD = 1_000_000
"""Money is kept as integer micro-dollars wherever it is summed, so sums are exact to the cent."""


def to_micros(value: int | float | Decimal) -> int:
    """USD as integer micro-dollars (nearest; the JSON float 0.1 is 100000)."""
    if isinstance(value, int):
        return value * MICROS_PER_USD
    if isinstance(value, float):
        return round(value * MICROS_PER_USD)
    return int(value.scaleb(6).to_integral_value())
