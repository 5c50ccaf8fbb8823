"""Snapshots and versioned key states (see :mod:`db.models` for the design)."""

from __future__ import annotations

import json
import marshal
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from hashlib import blake2b
from operator import itemgetter
from typing import Any

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Integer,
    Select,
    Table,
    Text,
    and_,
    bindparam,
    case,
    delete,
    exists,
    func,
    insert,
    literal,
    literal_column,
    null,
    or_,
    select,
    text,
    true,
    type_coerce,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from keyhygiene.keysapi.errors import MalformedResponse
from keyhygiene.keysapi.fields import FIELDS_BY_NAME, KEY_FIELDS, MICROS_PER_USD, STABLE, VOLATILE, Field
from keyhygiene.keysapi.models import Key
from keyhygiene.logging import redact_value
from keyhygiene.timeutil import (
    EARLIEST_TIME,
    LATEST_TIME,
    SPEND_WINDOWS,
    TimeFormatError,
    isoformat,
    parse_api_time,
    window_starts,
)

from . import rollups, runs
from .bulkload import indexes_built_after, planned_for_growth
from .engine import sqlite_cache
from .history import full_versions
from .models import (
    MAX_MICROS,
    Run,
    Snapshot,
    UTCDateTime,
    key_records,
    key_usage,
    snapshot_carried,
    snapshot_staging,
    storable_text,
    tracked_keys,
)

RUNNING = "running"
COMPLETE = "complete"
FAILED = "failed"
PRUNED = "pruned"
"""A snapshot older than the retention: its inventory is gone; it remains only as a time."""

# Held (per transaction) while a snapshot is recorded on PostgreSQL; SQLite's BEGIN IMMEDIATE
# already lets only one writer in.
_RECORD_LOCK = 0x6B657973
_RECORD_WORK_MEM = "64MB"
"""Memory per sort or hash while PostgreSQL records a snapshot (``SET LOCAL``: this transaction)."""
_RECORD_CACHE_KIB = 16 * 1024
"""SQLite's page cache while a recording tracks new keys (``sqlite_cache``), instead of its 2 MB:
they go into the index of key hashes in no order, and 100,000 of them (about 9 MB of index)
through 2 MB of cache wrote and read its pages back over and over (0.40-0.50 s against
0.23-0.32 s, alternating runs)."""


class SnapshotSuperseded(RuntimeError):
    """A newer snapshot was recorded while this one was being taken; recording this one would
    rewrite history out of order."""


class StagingIncomplete(RuntimeError):
    """The keys staged for a snapshot are not the ones its sync listed, nearly always fewer: rows
    written while it listed are gone (a database restored or restarted under it). Recording it
    would mark those keys gone."""


class SnapshotAbandoned(StagingIncomplete):
    """The snapshot is no longer running: another job took its run for dead and failed it, and a
    prune may be deleting its staging rows. Recording it would mark the keys whose rows went gone."""


@dataclass(frozen=True, slots=True)
class SnapshotWrite:
    """What recording one snapshot changed in the store."""

    key_count: int
    new_versions: int
    changed: int
    added: int
    gone: int


_KNOWN = frozenset(field.name for field in KEY_FIELDS)
_STAGED = [
    "snapshot_id",
    "key_hash",
    *(field.name for field in STABLE),
    "record_wire",
    *(field.name for field in VOLATILE),
    "usage_wire",
    "fingerprint",
    "key_id",
]
"""Staging columns in the order ``SnapshotWriter.add`` writes them: ``staged_row``'s, the key's
``fingerprint``, then its id when it is already tracked (``limit`` is the ``limit_usd`` column)."""


_Spec = tuple[tuple[str, str, Any], ...]
"""Per field: its name, its kind, and what a null reads as (None when the field may be null)."""


def _spec(fields: Sequence[Field]) -> _Spec:
    nulls = {"money": 0, "flag": False, "text": ""}
    return tuple((field.name, field.kind, None if field.nullable else nulls.get(field.kind)) for field in fields)


_STABLE_SPEC, _VOLATILE_SPEC = _spec(STABLE), _spec(VOLATILE)


def _typed(raw: Mapping[str, Any], spec: _Spec, wire: dict[str, Any], dialect: str | None = None) -> list[Any]:
    """The typed values of the fields in ``spec``; what they would not give back exactly goes into
    ``wire``: ``"-"`` lists fields the API left out, ``"="`` holds exact values (unusual time styles,
    digits below a micro-dollar, a null where a default is read), ``"~"`` how many floats away
    from its micro-dollars an amount was (float noise such as 0.30000000000000004), ``"t": "u"``
    says the part's times are written ``2026-02-19T20:52:27.363244+00:00`` (the other documented
    style). Times are datetimes, or as ``dialect`` is given them: for SQLite the text it stores
    (``_sqlite_text``); for PostgreSQL the API's own text when it writes back exactly.
    Runs once per key and part of every sync: written for speed."""
    values: list[Any] = []
    times: list[tuple[str, Any, str | None]] = []
    u_style = 0  # times in the "u" style
    for name, kind, read_as in spec:
        value = raw.get(name)
        if value is None:
            if name not in raw:
                wire.setdefault("-", []).append(name)
            elif read_as is not None:
                wire.setdefault("=", {})[name] = value
            values.append(read_as)
        elif kind == "money":
            cls = value.__class__
            try:
                if cls is float:
                    typed = round(value * MICROS_PER_USD)
                    if not typed and value:
                        # Below half a micro-dollar: kept as one, so that every figure summed or
                        # compared in SQL sees spend where there is (the exact amount goes in "=").
                        typed = 1 if value > 0 else -1
                elif cls is int:
                    typed = value * MICROS_PER_USD
                else:
                    raise MalformedResponse(f"field {name!r} is {value!r}, expected a number")
                exact = typed / MICROS_PER_USD == value
            except (OverflowError, ValueError):  # beyond a float's range in micro-dollars, or NaN
                raise MalformedResponse(f"field {name!r} is {value!r}, expected an amount in US dollars") from None
            if not -MAX_MICROS <= typed <= MAX_MICROS:
                raise MalformedResponse(
                    f"field {name!r} is {value!r}, beyond the {MAX_MICROS // MICROS_PER_USD:,} US dollars "
                    "an amount can be stored as"
                )
            if not exact:
                ulps = _ulps(typed / MICROS_PER_USD, float(value))
                if ulps is None:
                    wire.setdefault("=", {})[name] = value
                else:
                    wire.setdefault("~", {})[name] = ulps
            values.append(typed)
        elif kind == "time":
            typed, style = _parse_time(name, value)
            times.append((name, value, style))
            if style == "u":
                u_style += 1
            if dialect == "sqlite" and typed is not None:
                values.append(_sqlite_text(value, style, typed))
            elif dialect == "postgresql" and style is not None:
                # The API's own text, which ends in Z or +00:00 (the server reads it into a
                # timestamptz): COPY writes text about three times faster than it turns
                # datetimes into text (3 against 9 µs a row of four times, measured).
                values.append(value)
            else:
                values.append(typed)
        elif kind == "flag":
            if value is not True and value is not False:
                raise MalformedResponse(f"field {name!r} is {value!r}, expected a boolean")
            values.append(value)
        else:
            if value.__class__ is not str:
                raise MalformedResponse(f"field {name!r} is {value!r}, expected a string")
            if (not value.isascii() or "\x00" in value) and (stored := storable_text(value)) is not value:
                # A lone surrogate ("\\ud800" is valid JSON) or a NUL ("\\u0000"): not every
                # database stores it as text. The column gets it written out; the exact value goes
                # into the note, which is ASCII.
                wire.setdefault("=", {})[name] = value
                value = stored
            values.append(value)
    if u_style:
        wire["t"] = "u"
    if times and u_style != len(times):  # not every time in the "u" style: all "Z", or some in neither
        part_style = "u" if u_style else "Z"
        for name, value, style in times:
            if style != part_style:
                wire.setdefault("=", {})[name] = value
    return values


def _ulps(base: float, value: float) -> int | None:
    """How many representable floats ``value`` lies above ``base`` (None when far or of another sign)."""
    if (base < 0) != (value < 0):
        return None
    steps = _float_bits(value) - _float_bits(base)
    return steps if abs(steps) <= 4096 else None


def _float_bits(value: float) -> int:
    return int(struct.unpack("<q", struct.pack("<d", value))[0])


def _bits_float(bits: int) -> float:
    return float(struct.unpack("<d", struct.pack("<q", bits))[0])


def _parse_time(name: str, value: Any) -> tuple[datetime | None, str | None]:
    """(the time, the style that writes it back exactly as the API did: "Z", "u" or None)."""
    result: tuple[datetime | None, str | None] | None = _plain_time(value)
    if result is None:
        try:
            parsed = parse_api_time(value)
        except TimeFormatError as exc:
            raise MalformedResponse(f"field {name!r}: {exc}") from None
        style = next((style for style in ("Z", "u") if _time_text(parsed, style) == value), None)
        result = (parsed, style)
    return result


def _plain_time(value: Any) -> tuple[datetime, str] | None:
    """The API's two documented styles, ``2026-02-19T20:52:27Z`` ("Z") and
    ``2026-02-19T20:52:27.363244+00:00`` ("u"), read without writing them back to compare: the
    shape is checked here, the digits by ``fromisoformat``, and a time of that shape that parses
    writes back as it came. None for anything else."""
    if not isinstance(value, str):
        return None
    if len(value) == 20 and value[19] == "Z":
        style = "Z"
    elif len(value) == 32 and value[19] == "." and value.endswith("+00:00"):
        style = "u"
    else:
        return None
    if not (value[10] == "T" and value[4] == value[7] == "-" and value[13] == value[16] == ":"):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is not UTC or not EARLIEST_TIME <= parsed < LATEST_TIME:
        return None
    return parsed, style


def _sqlite_text(value: str, style: str | None, typed: datetime) -> str:
    """``_sqlite_time(typed)``, cut straight from the API's text when it is in a documented style
    (``_plain_time``'s shapes, whose digits ``fromisoformat`` has checked): about five times
    cheaper than writing the datetime back, for every time of every key a sync stages on SQLite."""
    if style == "Z" and len(value) == 20:  # 2026-02-19T20:52:27Z
        return f"{value[:10]} {value[11:19]}.000000"
    if style == "u" and len(value) == 32:  # 2026-02-19T20:52:27.363244+00:00
        return f"{value[:10]} {value[11:26]}"
    return _sqlite_time(typed)


def _time_text(value: datetime | None, style: str) -> str | None:
    """``2026-02-19T20:52:27Z`` (style "Z", fractions only when present) or
    ``2026-02-19T20:52:27.000000+00:00`` (style "u")."""
    if value is None or style == "Z":
        return isoformat(value)
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _render(field: Field, value: Any, time_style: str = "Z") -> Any:
    """A typed value as the API writes it (the inverse of reading it, for the usual styles)."""
    if value is None:
        return None
    if field.kind == "money":
        # Micro-dollars as staged, Decimal as read: either way the nearest float, as JSON has it.
        return value / MICROS_PER_USD if isinstance(value, int) else float(value)
    if field.kind == "time":
        return _time_text(value, time_style)
    return value


def _wire_text(wire: dict[str, Any]) -> str | None:
    if not wire:
        return None
    if wire == _OTHER_STYLE:  # half the keys of an API that writes times the other way
        return _OTHER_STYLE_TEXT
    return json.dumps(wire, sort_keys=True, separators=(",", ":"))


_OTHER_STYLE = {"t": "u"}
_OTHER_STYLE_TEXT = json.dumps(_OTHER_STYLE, sort_keys=True, separators=(",", ":"))


def staged_row(raw: Mapping[str, Any], snapshot_id: int, *, dialect: str | None = None) -> list[Any]:
    """One staging row: the key's typed fields, and per part the exact JSON of what they would not
    give back (fields we do not know, absent fields, other styles): NULL for nearly every key.
    With ``dialect``, its times are already as that database is given them (``_typed``)."""
    if raw.__class__ is dict and (row := _PLAIN_ROWS[dialect](raw, snapshot_id)) is not None:
        return row
    return _staged_row(raw, snapshot_id, dialect)


def _staged_row(raw: Mapping[str, Any], snapshot_id: int, dialect: str | None) -> list[Any]:
    """``staged_row`` for any key: field by field as ``_typed`` reads them."""
    if raw.__class__ is not dict and not isinstance(raw, Mapping):  # a dict is one: checked first, for speed
        raise MalformedResponse(f"expected a key object, got {type(raw).__name__}")
    key_hash = raw.get("hash")
    if not key_hash or not isinstance(key_hash, str):
        raise MalformedResponse(f"field 'hash' is {key_hash!r}, expected a string")
    if storable_text(key_hash) is not key_hash:  # the key's id: kept exactly, or refused
        raise MalformedResponse(f"field 'hash' is {key_hash!r}, which holds a character no database stores")
    record_wire: dict[str, Any] = {}
    stable = _typed(raw, _STABLE_SPEC, record_wire, dialect)
    if stable[_CREATED_AT] is None:
        raise MalformedResponse("field 'created_at' is missing")
    if not _KNOWN.issuperset(raw):
        # Kept as sent, but for a secret (a key's own, say, from an upstream that sends it): never stored.
        record_wire["+"] = redact_value({name: value for name, value in raw.items() if name not in _KNOWN})
    return [snapshot_id, key_hash, *stable, _wire_text(record_wire), *_staged_usage(raw, dialect)]


def _plain_row_source(dialect: str | None) -> str:
    """The source of ``_PLAIN_ROWS[dialect]``: ``staged_row`` for a key as the API nearly always
    sends it, one statement per field instead of ``_typed``'s loop over the specs (10 against
    14 µs a key on the fake's keys; a first sync of 100,000 keys uses 0.6 s less CPU). It gives
    None for any key that is not plain: the fields exactly the known ones, every value of its
    field's type, no null where a default is read, text in ASCII, amounts exact in micro-dollars,
    times in one documented style per part. ``staged_row`` then takes the general path, which
    gives the same row for every plain key (``tests/test_store.py`` checks both on generated keys)."""
    lines = [
        "    if raw.keys() != KNOWN:",
        "        return None",
        "    key_hash = raw['hash']",
        "    if key_hash.__class__ is not str or not key_hash or not key_hash.isascii() or '\\x00' in key_hash:",
        "        return None",
        "    row = [snapshot_id, key_hash]",
        "    append = row.append",
    ]
    for spec in (_STABLE_SPEC, _VOLATILE_SPEC):  # each part's fields, then its note
        lines += ["    times = u_style = 0"]
        for name, kind, read_as in spec:
            lines.append(f"    value = raw[{name!r}]")
            if read_as is None and name != "created_at":
                lines += ["    if value is None:", "        append(None)", "    else:"]
            else:  # a null here is read as a default and noted, or (created_at) refused: not plain
                lines += ["    if value is None:", "        return None", "    else:"]
            body: list[str]
            if kind == "money":
                body = [
                    "if value.__class__ is float:",
                    f"    typed = round(value * {MICROS_PER_USD})",
                    "elif value.__class__ is int:",
                    f"    typed = value * {MICROS_PER_USD}",
                    "else:",
                    "    return None",
                    f"if typed / {MICROS_PER_USD} != value or not {-MAX_MICROS} <= typed <= {MAX_MICROS}:",
                    "    return None",
                    "append(typed)",
                ]
            elif kind == "time":
                body = ["parsed = plain_time(value)", "if parsed is None:", "    return None", "times += 1"]
                if dialect == "sqlite":
                    body += [
                        "if parsed[1] == 'u':",
                        "    u_style += 1",
                        "    append(f'{value[:10]} {value[11:26]}')",
                        "else:",
                        "    append(f'{value[:10]} {value[11:19]}.000000')",
                    ]
                else:
                    body += ["if parsed[1] == 'u':", "    u_style += 1"]
                    body.append("append(value)" if dialect == "postgresql" else "append(parsed[0])")
            elif kind == "flag":
                body = ["if value is not True and value is not False:", "    return None", "append(value)"]
            else:
                body = [
                    "if value.__class__ is not str or not value.isascii() or '\\x00' in value:",
                    "    return None",
                    "append(value)",
                ]
            lines += [f"        {line}" for line in body]
        lines += [
            "    if not u_style:",
            "        append(None)",
            "    elif u_style == times:",
            "        append(OTHER_STYLE_TEXT)",
            "    else:",
            "        return None",
        ]
    lines.append("    return row")
    # An amount beyond a float's range in micro-dollars (or NaN): the general path says what is wrong.
    inside = "\n".join(f"    {line}" for line in lines)
    handler = "    except (OverflowError, ValueError):\n        return None\n"
    return f"def plain_row(raw, snapshot_id):\n    try:\n{inside}\n{handler}"


def _plain_row_function(dialect: str | None) -> Callable[[Mapping[str, Any], int], list[Any] | None]:
    scope: dict[str, Any] = {"KNOWN": _KNOWN, "plain_time": _plain_time, "OTHER_STYLE_TEXT": _OTHER_STYLE_TEXT}
    exec(compile(_plain_row_source(dialect), f"<staged_row, plain keys, {dialect}>", "exec"), scope)  # noqa: S102
    function: Callable[[Mapping[str, Any], int], list[Any] | None] = scope["plain_row"]
    return function


_PLAIN_ROWS = {dialect: _plain_row_function(dialect) for dialect in (None, "sqlite", "postgresql")}


def _staged_usage(raw: Mapping[str, Any], dialect: str | None = None) -> list[Any]:
    """The usage half of a staging row: the typed fields that change with use, and their note."""
    usage_wire: dict[str, Any] = {}
    volatile = _typed(raw, _VOLATILE_SPEC, usage_wire, dialect)
    return [*volatile, _wire_text(usage_wire)]


def fingerprint(raw: Mapping[str, Any]) -> int:
    """A 64-bit digest of the key's JSON object exactly as the API sent it: its fields' names,
    order, values and their types. The store keeps each key's fingerprint with its versions, so a
    sync knows a key that has not changed without turning it into a row; any difference at all
    (even the order of the fields) only costs a full row. The bytes hashed are marshal's format 2,
    which tags every value with its type, writes floats as their eight bytes and holds no
    references (format 3 adds them, and they depend on how objects happen to be shared), so the
    same JSON gives the same bytes in every process, at half the cost of format 0 (floats as text)
    and a third of ``repr``'s. Earlier releases hashed format 0: a store they wrote takes the full
    path once. Anything marshal cannot write is hashed by its ``repr``."""
    try:
        data = marshal.dumps(raw, 2)  # type: ignore[arg-type]  # a dict from JSON; anything else is caught below
    except ValueError:
        data = repr(raw).encode()
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "big", signed=True)


_CREATED_AT = [field.name for field in STABLE].index("created_at")
_USAGE_AT = 2 + len(STABLE) + 1
"""Where a staging row's usage half begins (after the snapshot, the hash, the record and its note)."""
_VOLATILE_NAMES = frozenset(field.name for field in VOLATILE)
_stable_values = itemgetter(*(field.name for field in KEY_FIELDS if not field.volatile))
"""The values of a key's fields that do not change with use (hash included), as one tuple."""


def _restore(key_hash: str, values: Sequence[Any], wires: Sequence[str | None]) -> dict[str, Any]:
    """The key's raw JSON as the API sent it, from its stored parts (the inverse of ``staged_row``).

    ``values``: the typed fields in ``_RESTORED`` order; ``wires``: the record's and the usage's."""
    record, usage = (json.loads(wire) if wire is not None else {} for wire in wires)
    record_style, usage_style = record.get("t", "Z"), usage.get("t", "Z")
    raw: dict[str, Any] = {"hash": key_hash}
    for field, value in zip(_RESTORED, values, strict=True):
        raw[field.name] = _render(field, value, usage_style if field.volatile else record_style)
    for exact in (record, usage):
        for name, steps in exact.get("~", {}).items():
            raw[name] = _bits_float(_float_bits(raw[name]) + steps)
        for name in exact.get("-", ()):
            del raw[name]
        raw.update(exact.get("=", {}))
        raw.update(exact.get("+", {}))
    return raw


_RESTORED = (*STABLE, *VOLATILE)


# -- writing ------------------------------------------------------------------------------------


def start_snapshot(session: Session, *, run_id: int, now: datetime) -> Snapshot:
    """Record that a sync has begun. Until it completes, nothing reads it."""
    snapshot = Snapshot(run_id=run_id, status=RUNNING, started_at=now)
    session.add(snapshot)
    session.flush()
    return snapshot


@contextmanager
def _dbapi_cursor(session: Session) -> Iterator[tuple[Any, str]]:
    """A DBAPI cursor in the session's transaction, and the dialect's name: for appending many rows
    without the ORM's per-row bind processing."""
    connection = session.connection()
    dbapi = connection.connection.dbapi_connection
    assert dbapi is not None
    cursor = dbapi.cursor()
    driver_error = connection.dialect.loaded_dbapi.Error
    try:
        yield cursor, connection.dialect.name
    except driver_error as exc:
        # The driver's own error, as SQLAlchemy raises one: callers tell a database failure by
        # that type (and say it in one line, without the rows it was writing).
        raise DBAPIError.instance(
            None, None, exc, driver_error, hide_parameters=True, dialect=connection.dialect
        ) from exc
    finally:
        cursor.close()


def _carry(session: Session, snapshot_id: int, key_ids: Sequence[int]) -> None:
    """Append carried keys (``snapshot_carried``): one executemany on SQLite, COPY on PostgreSQL."""
    table = snapshot_carried.name
    with _dbapi_cursor(session) as (cursor, dialect):
        if dialect == "postgresql":
            with cursor.copy(f"COPY {table} (snapshot_id, key_id) FROM STDIN") as copy:
                for key_id in key_ids:
                    copy.write_row((snapshot_id, key_id))
        else:
            rows = [(snapshot_id, key_id) for key_id in key_ids]
            cursor.executemany(f"INSERT INTO {table} (snapshot_id, key_id) VALUES (?, ?)", rows)


def _copy_rows(session: Session, rows: list[list[Any]], *, reserved: bool = False) -> None:
    """Append rows to the staging table: one executemany on SQLite, COPY on PostgreSQL. On SQLite,
    ``reserved`` says each row's key id is one reserved for it in case its hash is not tracked yet
    (``SnapshotWriter.write``); otherwise it is its tracked id, or None to look that up."""
    if not rows:
        return
    with _dbapi_cursor(session) as (cursor, dialect):
        if dialect == "postgresql":
            with cursor.copy(f"COPY {snapshot_staging.name} ({_STAGED_COLUMNS}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        else:
            # Bypass the ORM's per-row bind processing: times go in as SQLAlchemy stores them
            # (naive UTC, microseconds always written), money is already integer micro-dollars.
            for row in rows:
                for index in _TIME_COLUMNS:
                    # Rows staged for SQLite, and rows reused as they were last written, hold text.
                    if isinstance(row[index], datetime):
                        row[index] = _sqlite_time(row[index])
            cursor.executemany(_SQLITE_STAGING_RESERVED if reserved else _SQLITE_STAGING_INSERT, rows)


_STAGED_COLUMNS = ", ".join(snapshot_staging.c[name].name for name in _STAGED)
_SQLITE_STAGING = "INSERT INTO {table} ({columns}) VALUES ({marks}, coalesce({{first}}, {{then}}))".format(
    table=snapshot_staging.name,
    columns=_STAGED_COLUMNS,
    marks=", ".join(f"?{number}" for number in range(1, len(_STAGED))),
)
_GIVEN_ID = f"?{len(_STAGED)}"
_TRACKED_ID = f"(SELECT id FROM {tracked_keys.name} WHERE key_hash = ?{_STAGED.index('key_hash') + 1})"
_SQLITE_STAGING_INSERT = _SQLITE_STAGING.format(first=_GIVEN_ID, then=_TRACKED_ID)
"""A staging row on SQLite: its key id as given, else the id of its hash when already tracked,
looked up by SQLite as it inserts (the PostgreSQL COPY cannot; ``SnapshotWriter.write``)."""
_SQLITE_STAGING_RESERVED = _SQLITE_STAGING.format(first=_TRACKED_ID, then=_GIVEN_ID)
"""A staging row on SQLite: the id of its hash when already tracked, else the id given, reserved
for it (``record_staged`` tracks the new key with it)."""
assert _STAGED[-1] == "key_id"

_SQLITE_CARRY = (
    f"INSERT INTO {snapshot_carried.name} (snapshot_id, key_id) SELECT :snapshot_id, t.id FROM json_each(:given) AS g "
    f"CROSS JOIN {tracked_keys.name} AS t ON t.id = json_extract(g.value, '$[0]') "
    "WHERE t.fingerprint IS json_extract(g.value, '$[1]') AND t.key_hash = json_extract(g.value, '$[2]') "
    f"AND EXISTS (SELECT 1 FROM {key_records.name} AS r WHERE r.key_id = t.id AND r.valid_to IS NULL) "
    f"AND EXISTS (SELECT 1 FROM {key_usage.name} AS u WHERE u.key_id = t.id AND u.valid_to IS NULL)"
)
"""``_stage_unchanged`` on SQLite: each given key (a JSON array of [id, fingerprint, hash]) looks
up its tracked row by id; CROSS JOIN keeps SQLite to that order (one seek per key), where it might
otherwise scan the tracked keys and search the JSON for each. A null fingerprint (the demo's
reused rows) matches a key tracked without one."""


_TIME_COLUMNS = [
    index for index, name in enumerate(_STAGED) if name in FIELDS_BY_NAME and FIELDS_BY_NAME[name].kind == "time"
]


def _sqlite_time(value: datetime) -> str:
    """An aware time as SQLAlchemy stores it in SQLite: naive UTC, microseconds always written."""
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return value.isoformat(" ", "microseconds")[:26]  # without its "+00:00"


def _same(left: Any, right: Any, names: Iterable[str]) -> Any:
    return and_(*(left.c[name].is_not_distinct_from(right.c[name]) for name in names))


_RECORD_COLUMNS = [field.name for field in STABLE]
_VOLATILE_COLUMNS = [field.name for field in VOLATILE]


def _count(session: Session, table: Any, *where: Any) -> int:
    """The rows of ``table`` (a table or a subquery) that match ``where``, counted in the database."""
    return int(session.scalar(select(func.count()).select_from(table).where(*where)) or 0)


_RECORD_INSERTED = ["key_id", "valid_from", *_RECORD_COLUMNS, "wire"]
_USAGE_INSERTED = ["key_id", "valid_from", *_VOLATILE_COLUMNS, "wire", "usage_since", "disabled_since", "spent_from"]
"""The columns a recording inserts into ``key_records`` and ``key_usage``."""


def _first_usage(staged: Any, taken_at: datetime) -> tuple[Any, Any, Any]:
    """``usage_since``, ``disabled_since`` and ``spent_from`` of the first usage version of a key
    staged in ``staged`` (a table or CTE of staging rows): no version before it to carry them from."""
    now = literal(taken_at, UTCDateTime())
    return now, case((staged.c.disabled, now), else_=null()), _spent_in_window(staged, taken_at)


def _spent_in_window(staged: Any, taken_at: datetime) -> Any:
    """The latest start of a window in which the staged key spent as of ``taken_at`` (its counters
    above zero), NULL for none: ``keyhygiene.rules.engine.window_use_from`` in SQL."""
    starts = window_starts(taken_at)
    latest_first = sorted(SPEND_WINDOWS, key=lambda window: starts[window], reverse=True)  # day first
    return case(
        *(
            (
                or_(staged.c[f"usage_{window}"] > 0, staged.c[f"byok_usage_{window}"] > 0),
                literal(starts[window], UTCDateTime()),
            )
            for window in latest_first
        ),
        else_=null(),
    )


def lock_recording(session: Session) -> None:
    """On PostgreSQL, wait until no other transaction records a snapshot in this store, and keep it
    so until this transaction ends. The advisory lock is the store's own: its key holds the ``oid``
    of the ``snapshots`` table the session's search path finds, so that stores in other schemas of
    one database never wait for each other."""
    session.execute(text(f"SELECT pg_advisory_xact_lock({_STORE_LOCK})"), {"lock": _RECORD_LOCK})


_STORE_LOCK = "(CAST(:lock AS bigint) << 32) | CAST(CAST('snapshots' AS regclass) AS bigint)"
"""The key of a store's recording lock (``lock_recording``)."""


@dataclass(slots=True)
class EarlyRecording:
    """A recording begun while its snapshot is still listed (PostgreSQL): its transaction tracks
    the keys new to the store, with their first versions, as their staging rows are committed
    (``record_new_keys``), so that the server does that work beside the listing instead of after
    it; ``record_staged`` then records the rest in the same transaction. Nothing of it is seen
    before that transaction commits, and all of it goes if it rolls back.

    The transaction holds the recording lock (``lock_recording``) from its start, so the ids and
    counts below, read then, hold until ``record_staged``: no other recording of the store appends
    a version or tracks a key in between."""

    snapshot_id: int
    taken_at: datetime
    tracked_before: int
    """The highest tracked id before this recording began (0: none)."""
    usage_before: int
    records_before: int
    """The highest version ids before it began: this snapshot's versions are the ones above."""
    statement: tuple[str, dict[str, Any]]
    recorded: int = 0
    """Staging rows whose key this recording has tracked, with the id staged for it, and given
    both first versions."""


def begin_early_recording(
    session: Session, *, snapshot_id: int, taken_at: datetime, keep_waiting: Callable[[], bool]
) -> EarlyRecording | None:
    """Begin recording ``snapshot_id`` in the session's transaction, on PostgreSQL only, once it
    holds the store's recording lock (``lock_recording``), kept until the transaction ends. While
    another sync of the store records, it asks for the lock again each time ``keep_waiting``
    (which waits a moment) says to; None when it says not to."""
    if session.get_bind().dialect.name != "postgresql":
        raise ValueError("a recording is begun while listing on PostgreSQL only")
    # Asked for without waiting in the server, so that a sync that stops never leaves a request
    # behind that takes the lock later, for a transaction nobody will end.
    while not session.scalar(text(f"SELECT pg_try_advisory_xact_lock({_STORE_LOCK})"), {"lock": _RECORD_LOCK}):
        if not keep_waiting():
            return None
    tracked_before, usage_before, records_before = session.execute(
        select(
            select(func.max(tracked_keys.c.id)).scalar_subquery(),
            select(func.max(key_usage.c.id)).scalar_subquery(),
            select(func.max(key_records.c.id)).scalar_subquery(),
        )
    ).one()
    statement = _new_keys_statement(session, snapshot_id, taken_at)
    return EarlyRecording(snapshot_id, taken_at, tracked_before or 0, usage_before or 0, records_before or 0, statement)


def _new_keys_statement(session: Session, snapshot_id: int, taken_at: datetime) -> tuple[str, dict[str, Any]]:
    """``record_new_keys``' one statement, compiled once for a recording (its SQL and parameters,
    but the ids): the staging rows of the given ids whose key is not tracked, read once, are
    tracked with the id staged for each and given their first record and usage versions, as
    ``record_staged`` writes them for a key it has never seen.

    Both lookups go one row at a time by index: the staging table and the tracked keys grow while
    the listing goes on, and nothing has analyzed them yet (a first sync). Planned as joins, they
    read the whole staging table of the snapshot, then every tracked key, once per page: 20,000
    keys took 0.7 s of the server's time instead of 0.2 s, and it grows with the square of the
    keys."""
    s, t, r, u = snapshot_staging, tracked_keys, key_records, key_usage
    given = func.unnest(bindparam("ids", type_=ARRAY(Integer()))).table_valued("id").render_derived(name="given")
    # OFFSET 0: a subquery planned apart, for one id at a time (by the index on snapshot and id).
    row = (
        select(s)
        .where(s.c.snapshot_id == snapshot_id, s.c.key_id == given.c.id)
        .offset(literal_column("0"))
        .lateral("row")
    )
    batch = select(row).select_from(given.join(row, true())).cte("batch")
    first_seen = literal(taken_at, UTCDateTime())
    # A key already tracked is found by the unique index of key hashes, which ON CONFLICT always
    # probes, whatever the planner would choose; only the keys tracked now get versions.
    tracked = (
        postgresql_insert(t)
        .from_select(
            ["key_hash", "first_seen_at", "fingerprint", "id"],
            select(batch.c.key_hash, first_seen, batch.c.fingerprint, batch.c.key_id),
        )
        .on_conflict_do_nothing(index_elements=[t.c.key_hash])
        .returning(t.c.id)
        .cte("tracked")
    )
    fresh = select(batch).select_from(batch.join(tracked, tracked.c.id == batch.c.key_id)).cte("fresh")
    records = (
        insert(r)
        .from_select(
            _RECORD_INSERTED,
            select(
                fresh.c.key_id, literal(snapshot_id), *(fresh.c[name] for name in _RECORD_COLUMNS), fresh.c.record_wire
            ),
        )
        .cte("records")
    )
    usage = (
        insert(u)
        .from_select(
            _USAGE_INSERTED,
            select(
                fresh.c.key_id,
                literal(snapshot_id),
                *(fresh.c[name] for name in _VOLATILE_COLUMNS),
                fresh.c.usage_wire,
                *_first_usage(fresh, taken_at),
            ),
        )
        .cte("usage")
    )
    statement = select(func.count()).select_from(tracked).add_cte(records, usage)
    compiled = statement.compile(dialect=session.get_bind().dialect)
    return str(compiled), dict(compiled.construct_params({"ids": []}))


def holding_up_others(session: Session) -> bool:
    """Whether this session's transaction holds up another session: a schema change, ``VACUUM
    FULL`` or ``REINDEX`` waiting for a table it holds (every other session that comes to that
    table then queues behind it), or anything else waiting for a lock it holds, but a sync waiting
    for the store's recording lock (which waits for it on purpose)."""
    return bool(session.scalar(_HOLDING_UP))


_HOLDING_UP = text(
    "SELECT EXISTS (SELECT 1 FROM (SELECT DISTINCT pid FROM pg_locks WHERE NOT granted "
    "AND locktype <> 'advisory' AND (database IS NULL OR database = "
    "(SELECT oid FROM pg_database WHERE datname = current_database())) OFFSET 0) AS waiting "
    "WHERE pg_backend_pid() = ANY (pg_blocking_pids(waiting.pid)))"
)
"""The waiting sessions, whatever their role, are found first in ``pg_locks`` (``OFFSET 0``):
``pg_blocking_pids`` takes the lock manager's state for a moment, and is asked only for them."""


Backend = tuple[int, datetime, datetime]
"""A transaction's server process: its pid, when the process and when the transaction began."""


def this_transaction(session: Session) -> Backend | None:
    """The server process of the session's transaction, begun by this statement (None where the
    server does not track activity)."""
    found = session.execute(
        text("SELECT pid, backend_start, xact_start FROM pg_stat_activity WHERE pid = pg_backend_pid()")
    ).one_or_none()
    if found is None or found.backend_start is None or found.xact_start is None:
        return None
    return int(found.pid), found.backend_start, found.xact_start


def end_transaction_of(session: Session, backend: Backend) -> None:
    """End the server process of ``backend``'s transaction (``this_transaction``) if that very
    transaction is still open: its client is gone (a connection cut on the client's side alone
    leaves the server's side in its transaction, its locks held). A process that has ended the
    transaction since, or that another process took the pid of, is left alone. Only processes of
    this role's, or that it may signal."""
    pid, started, began = backend
    session.execute(
        text(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = :pid "
            "AND pid <> pg_backend_pid() AND backend_start = :started AND xact_start = :began"
        ),
        {"pid": pid, "started": started, "began": began},
    )


def still_connected(session: Session) -> bool:
    """Whether the session's connection still answers (its transaction, if any, intact)."""
    try:
        session.execute(text("SELECT 1"))
    except DBAPIError:
        return False
    return True


def record_new_keys(session: Session, early: EarlyRecording, key_ids: Sequence[int]) -> None:
    """Track, in ``early``'s transaction, the keys staged for its snapshot with ``key_ids`` (the
    ids reserved for keys new to the store, their staging rows committed) that are still not
    tracked, and give each its first versions. A key another sync tracked since its id was
    reserved is left to ``record_staged``. One statement through the driver: per page, the ORM's
    bookkeeping would cost the listing more than the server's work."""
    if not key_ids:
        return
    sql, params = early.statement
    with _dbapi_cursor(session) as (cursor, _):
        # Planned afresh each time, as the staging table grows (a prepared statement's generic plan
        # would be the one made when it held a few rows).
        cursor.execute(sql, {**params, "ids": list(key_ids)}, prepare=False)
        (tracked,) = cursor.fetchone()
    early.recorded += int(tracked)


def record_staged(
    session: Session,
    *,
    snapshot_id: int,
    taken_at: datetime,
    workspace_counts: Mapping[str, int],
    new_fingerprints: bool = True,
    carried_on: int | None = None,
    reserved_ids: bool = False,
    expected_keys: int | None = None,
    listed_against: int | None = None,
    early: EarlyRecording | None = None,
) -> SnapshotWrite:
    """Record the keys staged for ``snapshot_id`` as a complete snapshot, writing only what changed.

    Set-based, in the caller's transaction: unchanged keys keep their open versions; a key whose
    volatile fields changed gets a new narrow usage version, one whose other fields changed a new
    record version; keys no longer listed get their open versions closed. The staging rows are
    removed. Versions are ordered by snapshot id, so a snapshot can only be recorded on top of older
    ones: when two syncs overlap and the later-started one finished first, the other raises
    SnapshotSuperseded and writes nothing.

    Carried keys (``snapshot_carried``: listed exactly as their open versions hold them when the
    newest complete snapshot was ``carried_on``) keep whatever versions are open now, so they are
    only recorded on top of that same snapshot: when another sync has recorded one since, this one
    raises SnapshotSuperseded and writes nothing.

    Each key's fingerprint goes with the versions this snapshot leaves open for it: a
    key with new versions takes its staged one, and with ``new_fingerprints`` (a key may have been
    staged from its JSON with a fingerprint the store does not hold: the writer knows) so does every
    key whose staged fingerprint differs from its tracked one.

    ``reserved_ids``: on SQLite, staging rows may hold ids reserved for keys not tracked yet
    (``SnapshotWriter.write``); without it, a staged id is the key's tracked one, or None. On
    PostgreSQL, staged ids of new keys are always reserved.

    ``expected_keys``: how many distinct keys the sync handed over, staged or carried; when the
    staging tables hold another number (fewer: rows were lost), StagingIncomplete is raised and
    nothing is written.

    ``listed_against``: the newest complete snapshot when the sync compared its listing with it
    (``SnapshotWriter.missing``; 0: there was none), whose keys the listing left out were checked one
    by one. Recorded on top of another one, a key that one holds and the listing left out would be
    closed as gone unchecked (a key created meanwhile, listed by the other sync): SnapshotSuperseded
    is raised then, and nothing is written, whether keys were carried or not.

    ``early``: the recording begun in this transaction while the snapshot was listed
    (``begin_early_recording``), whose new keys are already tracked with their first versions.
    """
    postgresql = session.get_bind().dialect.name == "postgresql"
    if early is not None and early.snapshot_id != snapshot_id:
        raise ValueError(f"the recording begun for snapshot {early.snapshot_id} cannot record {snapshot_id}")
    recorded_early = early.recorded if early is not None else 0
    if postgresql:
        lock_recording(session)
        # Recording sorts and groups every key staged (and its roll-ups, after): within the
        # server's default 4 MB, a first sync of 100,000 keys sorted on disk. Until the commit only.
        session.execute(text(f"SET LOCAL work_mem = '{_RECORD_WORK_MEM}'"))
    # Still running, and locked as such until the commit: a job that takes this sync's run for dead
    # (a paused process) waits to fail it, and then finds it complete; one that came first has
    # failed it, and a prune may be deleting its staging rows under this transaction.
    still_running = session.execute(
        update(Snapshot).where(Snapshot.id == snapshot_id, Snapshot.status == RUNNING).values(status=RUNNING)
    )
    if _rows(still_running) != 1:
        raise SnapshotAbandoned(
            f"snapshot {snapshot_id} was given up while this sync ran (another job took its run for dead); "
            "nothing was written"
        )
    newer = session.scalar(select(func.max(Snapshot.id)).where(Snapshot.status == COMPLETE, Snapshot.id > snapshot_id))
    if newer is not None:
        raise _superseded(newer)
    c = snapshot_carried
    carried = c.c.snapshot_id == snapshot_id
    carried_keys = _count(session, c, carried)
    newest = newest_complete(session)
    if (carried_keys and newest != carried_on) or (listed_against is not None and newest != (listed_against or None)):
        raise _superseded(newest)
    s, t = snapshot_staging, tracked_keys
    staged = s.c.snapshot_id == snapshot_id
    key_count = carried_keys + _count(session, s, staged)
    if expected_keys is not None and key_count != expected_keys:
        raise StagingIncomplete(
            f"{expected_keys} keys were listed but {key_count} are staged: "
            "the staging rows written while listing are gone (was the database restored or restarted?)"
        )
    first_seen = select(s.c.key_hash, literal(taken_at, UTCDateTime()), s.c.fingerprint)
    untracked = ~exists().where(t.c.key_hash == s.c.key_hash)
    if postgresql or reserved_ids:  # a staged id may be a reserved one that another key took since
        unresolved = or_(s.c.key_id.is_(None), ~exists().where(t.c.id == s.c.key_id, t.c.key_hash == s.c.key_hash))
    else:  # every staged id is the key's tracked one (the demo's reused rows): only None is resolved
        unresolved = s.c.key_id.is_(None)
    # New keys take the ids reserved for them when staged (``_key_ids``, ``SnapshotWriter.write``).
    # A key another sync has tracked since keeps its id there: this sync's staging row is pointed
    # at it below.
    staged_rows = key_count - carried_keys
    # Every key with a version before this snapshot is tracked already: its id is at most this one.
    tracked_before = early.tracked_before if early is not None else int(session.scalar(select(func.max(t.c.id))) or 0)
    # Every staging row's key was tracked early, with the id staged for it, and given both versions.
    all_early = early is not None and recorded_early == staged_rows
    with sqlite_cache(session, _RECORD_CACHE_KIB):
        with_given_ids = -1  # staging rows whose key was tracked just now with the id staged for it
        if all_early:
            with_given_ids = recorded_early
        elif postgresql:
            with indexes_built_after(session, t, rows=staged_rows), planned_for_growth(session, t, rows=staged_rows):
                tracked_now = session.execute(
                    insert(t).from_select(
                        ["key_hash", "first_seen_at", "fingerprint", "id"],
                        first_seen.add_columns(func.coalesce(s.c.key_id, literal_column(_PG_NEXT_KEY_ID))).where(
                            staged, untracked
                        ),
                    ),
                    execution_options=_COUNTED,
                )
            with_given_ids = _rows(tracked_now) + recorded_early
        elif reserved_ids:
            # SQLite has no sequence: an id reserved by this sync may have been taken by another one
            # since, and its key then gets the next free id, as does one staged without an id.
            free = ~exists().where(t.c.id == s.c.key_id)
            columns = ["key_hash", "first_seen_at", "fingerprint"]
            reserved = first_seen.add_columns(s.c.key_id).where(staged, untracked, s.c.key_id.is_not(None), free)
            tracked_now = session.execute(insert(t).from_select([*columns, "id"], reserved), execution_options=_COUNTED)
            with_given_ids = _rows(tracked_now)
        # When every staging row's key was just tracked with the id it was staged with (every key listed
        # is new: a first sync), no row is left unresolved; proving it row by row would cost a lookup
        # per key in each of the two statements below (about 0.1 s for 100,000 keys).
        resolved = with_given_ids == staged_rows and not session.scalar(
            select(exists().where(staged, s.c.key_id.is_(None)))
        )
        if not resolved:
            if not postgresql:
                first_seen_now = first_seen.where(staged, unresolved, untracked)
                session.execute(insert(t).from_select(["key_hash", "first_seen_at", "fingerprint"], first_seen_now))
            session.execute(
                update(s)
                .where(staged, unresolved)
                .values(key_id=select(t.c.id).where(t.c.key_hash == s.c.key_hash).scalar_subquery())
            )
    u, r = key_usage, key_records
    mine = and_(staged, s.c.key_id == u.c.key_id)
    # Versions are only appended, and only here (under the lock): this snapshot's new versions are
    # the ones past these ids, found by the primary keys without reading the history.
    if early is not None:
        usage_before, records_before = early.usage_before, early.records_before
    else:
        usage_before = int(session.scalar(select(func.max(u.c.id))) or 0)
        records_before = int(session.scalar(select(func.max(r.c.id))) or 0)
    record_mine = and_(staged, s.c.key_id == r.c.key_id)
    for table, same, versions_before in (
        (
            u,
            exists().where(mine, _same(u, s, _VOLATILE_COLUMNS), u.c.wire.is_not_distinct_from(s.c.usage_wire)),
            usage_before,
        ),
        (
            r,
            exists().where(record_mine, _same(r, s, _RECORD_COLUMNS), r.c.wire.is_not_distinct_from(s.c.record_wire)),
            records_before,
        ),
    ):
        # Close the open versions of the keys that changed or are gone: every open version but
        # those of a key staged as it is, or carried.
        if all_early and not carried_keys:
            # Every key listed is new to the store: every version open before this snapshot is
            # of a key that is gone (none, on a first snapshot).
            closing = and_(table.c.valid_to.is_(None), table.c.id <= versions_before)
        elif _none_gone(session, table, staged, carried=carried_keys, staged_rows=staged_rows):
            # Then only a staged key can change: look at those few instead of at every open version.
            of_staged = table.c.key_id.in_(select(s.c.key_id).where(staged, s.c.key_id.is_not(None)))
            closing = and_(table.c.valid_to.is_(None), of_staged, ~same)
        else:
            closing = and_(table.c.valid_to.is_(None), ~same, ~exists().where(carried, c.c.key_id == table.c.key_id))
        session.execute(update(table).where(closing).values(valid_to=snapshot_id))
    # New versions of the staging rows not recorded early (none when every one was).
    left = staged_rows - recorded_early
    records_added = usage_added = 0
    if not all_early:
        records_added = _append_versions(
            session,
            r,
            _RECORD_INSERTED,
            select(s.c.key_id, literal(snapshot_id), *(s.c[name] for name in _RECORD_COLUMNS), s.c.record_wire).where(
                staged, ~exists().where(r.c.key_id == s.c.key_id, r.c.valid_to.is_(None))
            ),
            rows=left,
            resolved=resolved,
        )
    now = literal(taken_at, UTCDateTime())
    usage_since: Any
    disabled_since: Any
    spent_from: Any
    with_previous: Any
    spent_in_window = _spent_in_window(s, taken_at)
    if usage_before:
        # The version each new usage version follows (just closed, or the last one of a key that
        # comes back), for carrying over since when usage and disabled have held.
        # Looked up only for the keys tracked before this snapshot: a key tracked now has none. The
        # lookup runs once per staged key, in the statement that appends to the table it reads.
        # Where PostgreSQL's statistics hold a few keys, it reads that table whole each time, the
        # pages this statement has appended so far included: for every new key of an organisation
        # that grew from 100 keys to 20,000, 2.5 s (quadratic in the new keys) instead of 0.15 s.
        before = key_usage.alias("before")
        latest = case(
            (
                s.c.key_id <= tracked_before,
                select(before.c.id)
                .where(before.c.key_id == s.c.key_id, before.c.valid_from < snapshot_id)
                .order_by(before.c.valid_from.desc())
                .limit(1)
                .scalar_subquery(),
            ),
            else_=null(),
        )
        previous = key_usage.alias("previous")
        same_usage = and_(previous.c.usage == s.c.usage, previous.c.byok_usage == s.c.byok_usage)
        usage_since = case((same_usage, previous.c.usage_since), else_=now)
        disabled_since = case(
            (and_(s.c.disabled, previous.c.disabled), previous.c.disabled_since), (s.c.disabled, now), else_=null()
        )
        earlier = previous.c.spent_from
        spent_from = case(
            (earlier.is_(None), spent_in_window),
            (and_(spent_in_window.is_not(None), spent_in_window > earlier), spent_in_window),
            else_=earlier,
        )
        with_previous = s.outerjoin(previous, previous.c.id == latest)
    else:  # the store holds no usage version yet (its first snapshot): none follows another
        usage_since, disabled_since, spent_from = _first_usage(s, taken_at)
        with_previous = s
    if not all_early:
        usage_added = _append_versions(
            session,
            u,
            _USAGE_INSERTED,
            select(
                s.c.key_id,
                literal(snapshot_id),
                *(s.c[name] for name in _VOLATILE_COLUMNS),
                s.c.usage_wire,
                usage_since,
                disabled_since,
                spent_from,
            )
            .select_from(with_previous)
            .where(staged, ~exists().where(u.c.key_id == s.c.key_id, u.c.valid_to.is_(None))),
            rows=left,
            resolved=resolved,
        )
    # The keys with a new version (added or changed), and what the counts of closed and new usage
    # versions say: a closed one belongs to a key that changed or is gone, a new one to a key that
    # changed or is new.
    fresh = union_all(
        select(u.c.key_id, literal(1).label("usage")).where(u.c.id > usage_before, u.c.valid_from == snapshot_id),
        select(r.c.key_id, literal(0).label("usage")).where(r.c.id > records_before, r.c.valid_from == snapshot_id),
    ).subquery("fresh")
    new_keys = select(fresh.c.key_id, func.max(fresh.c.usage).label("usage")).group_by(fresh.c.key_id).subquery()
    if records_added + recorded_early == usage_added + recorded_early == staged_rows:
        # Each staged key gets at most one version of each kind: every one of them got both, and
        # no other key got any (a first sync). Counting them again would read every new version.
        touched = new_usage = staged_rows
    else:
        touched, new_usage = session.execute(select(func.count(), func.coalesce(func.sum(new_keys.c.usage), 0))).one()
    closed, gone = session.execute(
        select(func.count(), func.count().filter(~exists().where(mine))).where(u.c.valid_to == snapshot_id)
    ).one()
    added = int(new_usage) - (closed - gone)
    held = t.alias("held")
    # Every staged key, or (nothing staged with a fingerprint the store may lack) only those
    # with new versions: each key's staging row is looked up by its id.
    candidates = s if new_fingerprints else new_keys.join(s, and_(staged, s.c.key_id == new_keys.c.key_id))
    moved = (
        select(s.c.key_id)
        .select_from(candidates.join(held, held.c.id == s.c.key_id))
        .where(staged, held.c.fingerprint.is_distinct_from(s.c.fingerprint))
    )
    if not resolved:  # else every staged key was tracked just now, with the fingerprint it was staged with
        session.execute(
            update(t)
            .where(t.c.id.in_(moved))
            .values(fingerprint=select(s.c.fingerprint).where(staged, s.c.key_id == t.c.id).scalar_subquery())
        )
    for table, mine_only in ((s, staged), (c, carried)):
        _drop_rows(session, table, mine_only, snapshot_id, postgresql=postgresql)
    new_versions = touched
    session.execute(
        update(Snapshot)
        .where(Snapshot.id == snapshot_id)
        .values(
            status=COMPLETE,
            taken_at=taken_at,
            key_count=key_count,
            workspace_counts=dict(workspace_counts),
            new_versions=new_versions,
        )
    )
    return SnapshotWrite(
        key_count=key_count, new_versions=new_versions, changed=touched - added, added=added, gone=gone
    )


def _append_versions(
    session: Session, table: Any, columns: list[str], rows_from: Any, *, rows: int, resolved: bool
) -> int:
    """Insert ``table``'s new versions (``key_usage`` or ``key_records``) from ``rows_from``, at
    most ``rows`` of them, loaded as ``db.bulkload`` says; the versions inserted."""
    with (
        indexes_built_after(session, table, rows=rows, proven_by_caller=_names_a_tracked_key(table, resolved)),
        planned_for_growth(session, table, rows=rows),
    ):
        return _rows(session.execute(insert(table).from_select(columns, rows_from), execution_options=_COUNTED))


def _none_gone(session: Session, table: Any, staged: Any, *, carried: int, staged_rows: int) -> bool:
    """Whether every open version of ``table`` (``key_usage`` or ``key_records``) belongs to a key
    staged (``staged_rows`` of them) or carried (``carried``) for this snapshot: none of them is of
    a key that is gone. Each key has at most one open version (``ix_*_open``); each carried key has
    one, as it was carried on top of the snapshot that is still the newest (``record_staged``
    checked); no key is both staged and carried. So it is so exactly when the open versions number
    the carried keys and the staged keys with one. Two counts, where closing the versions of the
    keys gone looks at every open version (100,000 keys, 1% changed: about 0.1 s on SQLite and
    0.25 s on PostgreSQL for the two tables)."""
    s = snapshot_staging
    open_versions = _count(session, table, table.c.valid_to.is_(None))
    if open_versions > carried + staged_rows:
        return False
    with_open = exists().where(table.c.key_id == s.c.key_id, table.c.valid_to.is_(None))
    # Where the staging table's statistics could not be taken (another session held it), a small
    # table was read whole once per staged key (40,000 new keys on a store of 200: 0.7 s each).
    with planned_for_growth(session, table, rows=staged_rows):
        staged_open = _count(session, s, staged, with_open)
    return open_versions == carried + staged_open


def _drop_rows(session: Session, table: Any, mine: Any, snapshot_id: int, *, postgresql: bool) -> None:
    """Delete this snapshot's rows from a staging table. On SQLite, when it holds no other
    snapshot's (another sync's, staging beside this one), the whole table is emptied: SQLite then
    frees its pages at once instead of deleting row by row and index entry by entry (100,000 rows:
    about 0.03 s against 0.07 s). The recording transaction holds SQLite's write lock: no other
    sync can stage a row in between."""
    others = or_(table.c.snapshot_id < snapshot_id, table.c.snapshot_id > snapshot_id)
    if not postgresql and not session.scalar(select(exists().where(others))):
        session.execute(delete(table))
    else:
        session.execute(delete(table).where(mine))


_COUNTED = {"preserve_rowcount": True}
"""For an insert whose row count is read: SQLAlchemy keeps it for updates and deletes only."""


def _rows(result: Any) -> int:
    """The rows a statement run with ``_COUNTED`` wrote (-1 when the driver does not say)."""
    return int(getattr(result, "rowcount", -1))


def newest_complete(session: Session) -> int | None:
    """The id of the newest complete snapshot (None before the first)."""
    return session.scalar(select(func.max(Snapshot.id)).where(Snapshot.status == COMPLETE))


def _superseded(newer: int | None) -> SnapshotSuperseded:
    return SnapshotSuperseded(
        f"snapshot {newer} was stored by another sync while this one was listing; this one is discarded"
    )


def _stage_unchanged(session: Session, snapshot_id: int, keys: Sequence[tuple[int, int | None, str]]) -> set[int]:
    """Stage keys whose JSON the writer's ``reuse`` rows say the store already holds (tracked id,
    fingerprint, hash), where the key is still tracked with that fingerprint and has open versions
    (a reused row may be of a key that has gone since, and come back as it was): the versions a
    snapshot leaves open for a key are written, in the same transaction, with the fingerprint of the
    JSON they were made from. (The demo's reused rows have none: their contract is that nothing else
    writes to the store.) Each is carried: a ``snapshot_carried`` row says it keeps its open versions
    (see ``record_staged``). Returns the ids of the keys not carried (the store has moved on since the
    fingerprint was read, or the key has no open versions): the caller stages them from their JSON."""
    c, t, r, u = snapshot_carried, tracked_keys, key_records, key_usage
    wanted = {key_id for key_id, _, _ in keys}
    if session.get_bind().dialect.name == "sqlite":
        carry = text(_SQLITE_CARRY).bindparams(snapshot_id=snapshot_id, given=json.dumps(keys))
        if int(getattr(session.execute(carry), "rowcount", 0) or 0) == len(keys):
            return set()
        # Which of these keys were carried: looked up among them only, not among all so far.
        among: Select[Any] = select(literal_column("value")).select_from(func.json_each(json.dumps(sorted(wanted))))
        return wanted.difference(
            session.scalars(select(c.c.key_id).where(c.c.snapshot_id == snapshot_id, c.c.key_id.in_(among)))
        )
    ids, prints, hashes = zip(*keys, strict=True)
    given = (
        func.unnest(
            literal(list(ids), ARRAY(Integer)),
            literal(list(prints), ARRAY(BigInteger)),
            literal(list(hashes), ARRAY(Text)),
        )
        .table_valued("id", "fingerprint", "key_hash")
        .render_derived(name="given", with_types=False)
    )
    carried = (
        select(literal(snapshot_id), t.c.id)
        .select_from(
            given.join(
                t,
                and_(
                    t.c.id == given.c.id,
                    t.c.fingerprint.is_not_distinct_from(given.c.fingerprint),
                    t.c.key_hash == given.c.key_hash,
                ),
            )
        )
        .where(
            exists().where(r.c.key_id == t.c.id, r.c.valid_to.is_(None)),
            exists().where(u.c.key_id == t.c.id, u.c.valid_to.is_(None)),
        )
    )
    # psycopg reports no row count for INSERT ... SELECT: the carried ids come back instead.
    return wanted.difference(
        session.scalars(insert(c).from_select(["snapshot_id", "key_id"], carried).returning(c.c.key_id))
    )


def _names_a_tracked_key(versions: Table, resolved: bool) -> tuple[str, ...]:
    """The trigger that checks, once per statement, that each version inserted into ``versions``
    names a tracked key (migration 0016), when ``resolved`` proves it already: every staged key was
    tracked just now, by this transaction, under the id it was staged with, and every version
    inserted takes its key's id from its staging row. A first sync of many keys inserts its
    versions with the trigger disabled for that statement (``db.bulkload``), instead of looking
    every one of them up again (100,000 keys: 0.30 s against 0.23 s per table)."""
    return (f"{versions.name}_key_id_insert",) if resolved else ()


def _key_ids(session: Session, key_hashes: Sequence[str]) -> tuple[dict[str, int], set[str]]:
    """(an id for each hash, the hashes already tracked), resolved per page so that recording the
    snapshot only has to look up the keys it has never seen. A tracked hash gets its id; on
    PostgreSQL, a hash not tracked yet gets one taken from the tracked keys' sequence, so that
    recording the snapshot inserts the new keys with the ids their staging rows already hold,
    instead of updating every one of those rows afterwards (on a first sync, 100,000 updated rows).
    A reserved id only becomes a key's when the snapshot is recorded; a sync that fails leaves a
    gap in the sequence. SQLite has no sequence: there a sync's writer reserves ids itself
    (``SnapshotWriter.write``). One statement with all the hashes as one JSON text, on both
    databases: a page's hundred bound parameters cost more than the lookup itself, and psycopg
    writes a text array out element by element in Python (100 hashes: 0.42 ms a page as an array,
    0.18 ms as JSON)."""
    if not key_hashes:
        return {}, set()
    with _dbapi_cursor(session) as (cursor, dialect):
        given = json.dumps(list(key_hashes), ensure_ascii=False)
        cursor.execute(_PG_KEY_IDS if dialect == "postgresql" else _SQLITE_TRACKED_IDS, (given,))
        found = cursor.fetchall()
    return {key_hash: key_id for key_hash, key_id, _ in found}, {key_hash for key_hash, _, tracked in found if tracked}


_PG_NEXT_KEY_ID = f"nextval((SELECT pg_get_serial_sequence('{tracked_keys.name}', 'id')::regclass))"
"""The next id of the tracked keys' sequence. The sequence is looked up once per statement (an
uncorrelated subquery): looked up for each row, by name, it cost 2.5 µs a key, ten times the
``nextval`` itself."""
_PG_KEY_IDS = (
    f"SELECT given.key_hash, coalesce(t.id, {_PG_NEXT_KEY_ID}), "
    "t.id IS NOT NULL FROM json_array_elements_text(%s::json) AS given(key_hash) "
    f"LEFT JOIN {tracked_keys.name} AS t ON t.key_hash = given.key_hash"
)
_SQLITE_TRACKED_IDS = (
    f"SELECT t.key_hash, t.id, 1 FROM json_each(?) AS given CROSS JOIN {tracked_keys.name} AS t "
    "ON t.key_hash = given.value"
)
"""CROSS JOIN keeps SQLite to one index seek per given hash (as in ``_SQLITE_CARRY``)."""


@dataclass(frozen=True, slots=True)
class KnownKeys:
    """What the store holds as of its newest complete snapshot (``known_fingerprints``)."""

    snapshot_id: int | None
    """The newest complete snapshot when these were read (None before the first)."""
    ids: Mapping[int, int]
    """The tracked id of each key alive at it, by the fingerprint of the JSON its open versions hold."""


def known_fingerprints(session: Session) -> KnownKeys:
    """The fingerprints the store holds and the snapshot they are as of (``SnapshotWriter``'s
    ``known``): about 100 bytes a key. Open versions and fingerprints only change when a snapshot is
    recorded, so they stay exactly these for as long as that snapshot is the newest complete one.
    The newest snapshot is read first: one recorded between the two reads makes the sync refused
    when it records (``record_staged``), never makes it carry keys against the wrong versions."""
    newest = newest_complete(session)
    t, u = tracked_keys, key_usage
    query = (
        select(t.c.fingerprint, t.c.id)
        .select_from(t.join(u, and_(u.c.key_id == t.c.id, u.c.valid_to.is_(None))))
        .where(t.c.fingerprint.is_not(None))
    )
    with _dbapi_cursor(session) as (cursor, _):  # the driver's rows, made a dict at once: 100,000 in 0.06 s, not 0.1
        cursor.execute(str(query.compile(dialect=session.get_bind().dialect)))
        return KnownKeys(newest, dict(cursor.fetchall()))


CARRY_BATCH = 10_000
"""Keys carried on the known snapshot are held back and written this many at a time, in id order.
Written with each page, in the order listed, every transaction rewrote pages all over the carried
keys' index: 100,000 ids took SQLite 1.1 s a page at a time, 0.2 s this way."""


class StagedRows:
    """The staging rows of a process's previous snapshot, by hash, as they were written (tracked
    id included, times converted for the database), to reuse for keys whose JSON has not changed
    since: for a process that records many snapshots of one store in a row, with nothing else
    writing to it in between (the demo's simulated days), where most keys are the same from one
    to the next."""

    def __init__(self) -> None:
        self._rows: dict[Any, tuple[Mapping[str, Any], list[Any]]] = {}

    def unchanged(self, raw: Mapping[str, Any]) -> list[Any] | None:
        """The row written last time for exactly this JSON (its snapshot id the old one), or None."""
        known = self._rows.get(raw.get("hash")) if isinstance(raw, Mapping) else None
        if known is None:
            return None
        before, row = known
        return row if before is raw or before == raw else None

    def written(self, raw: Mapping[str, Any], snapshot_id: int) -> list[Any] | None:
        """The row written for ``raw`` last time, for ``snapshot_id``, with a new usage half when
        only the fields that change with use changed; None when more changed."""
        known = self._rows.get(raw.get("hash")) if isinstance(raw, Mapping) else None
        if known is None:
            return None
        before, row = known
        if before.keys() != raw.keys():
            return None
        if len(raw) == len(_KNOWN) and _KNOWN.issuperset(raw):  # the usual key: every field, no other
            if _stable_values(raw) != _stable_values(before):
                return None
        elif any(value != before[name] for name, value in raw.items() if name not in _VOLATILE_NAMES):
            return None
        used = [snapshot_id, *row[1:_USAGE_AT], *_staged_usage(raw), None, row[-1]]
        self._rows[row[1]] = (raw, used)  # the writer converts its times in place as it writes it
        return used

    def keep(self, raw: Mapping[str, Any], row: list[Any]) -> None:
        """Remember the row written for ``raw`` (complete: its key is tracked)."""
        self._rows[row[1]] = (raw, row)


@dataclass(slots=True)
class StagedKeys:
    """Keys turned into staging rows, not yet written (``SnapshotWriter.stage``)."""

    rows: list[list[Any]]
    fresh: list[tuple[Mapping[str, Any], list[Any]]]
    """The rows made anew (not reused), with the key each was made from."""
    unchanged: list[tuple[int, int | None, str, Mapping[str, Any] | list[Any]]]
    """Keys whose JSON the store already holds (tracked id, fingerprint, hash, and the key's JSON or
    the row written for it before): carried with their open versions, not written row by row
    (``SnapshotWriter.write``)."""
    printed: bool = False
    """A row was made with a fingerprint: the store may not hold it yet (``record_staged``)."""


@dataclass(frozen=True, slots=True)
class WriterShare:
    """What a writer in another process needs to stage keys of a shared snapshot (``share``)."""

    snapshot_id: int
    lanes: int
    floor: int


@dataclass(frozen=True, slots=True)
class WriterState:
    """What a sharing writer reports back to the writer that records the snapshot (``absorb``)."""

    printed: bool
    """A key was staged from its JSON with its fingerprint."""
    reserved: bool
    """Ids were reserved for keys not tracked yet, on SQLite (``record_staged``'s ``reserved_ids``)."""
    carried_on: int | None
    """The snapshot the carried keys were carried on top of (None: none were carried)."""


class SnapshotWriter:
    """Streams one sync's listing into the store; nothing of it is read until ``finish``.

    The sync hands over each page as it arrives (``add``): it goes into a staging table, each key
    serialised once. ``missing`` says which keys of the newest complete snapshot were not handed
    over (the sync checks them one by one); ``finish`` records the snapshot from the staging rows
    in one set-based pass; ``discard`` drops the staging rows when the sync fails. Each call takes
    the session to work in; the caller owns the transactions. Keys are the API's raw key objects;
    a hash handed over twice keeps its first object (offset paging can repeat a key).

    ``known`` (``known_fingerprints``: the tracked id of each fingerprint the store holds, as of
    its newest snapshot) lets a key whose JSON has not changed since the store last recorded it be
    carried with its open versions, without being typed and written row by row: on top of that
    snapshot only, so a sync that finds another one recorded since is refused. Carried keys are
    held back and written ``CARRY_BATCH`` at a time, the rest by ``finish`` (or, for a sharing
    writer, by ``state``), each time after checking that snapshot is still the newest. ``reuse``
    does the same from the rows of the process's previous snapshot (``StagedRows``), checking each
    key against the store (``_stage_unchanged``). Without ``known``, keys are staged without their
    fingerprints, and the store keeps none for them.
    """

    def __init__(self, snapshot_id: int, *, reuse: StagedRows | None = None, known: KnownKeys | None = None) -> None:
        self.snapshot_id = snapshot_id
        self._seen: set[str] = set()
        self._reuse = reuse
        self._known = known.ids if known is not None else None
        self._known_on = known.snapshot_id if known is not None else None
        self._printed = False  # a key was staged from its JSON with its fingerprint
        self._carrying = False  # keys were carried (``record_staged``), on top of:
        self._carried_on: int | None = None
        self._next_id: int | None = None  # the next id to reserve for a key staged on SQLite
        self._id_lane, self._id_lanes, self._id_floor = 0, 1, 0
        self._reserved = False  # ids were reserved on SQLite, here or by a sharing writer
        self._to_carry: list[int] = []  # ids of keys carried on ``known``'s snapshot, not written yet
        self._listed_against: int | None = None  # the snapshot ``missing`` compared with (0: none)
        self.duplicates = 0

    def add(self, session: Session, raw_keys: Iterable[Mapping[str, Any]]) -> list[int]:
        """Stage ``raw_keys`` (``stage``, then ``write``): the ids reserved for the keys new to the store."""
        return self.write(session, self.stage(raw_keys, dialect=session.get_bind().dialect.name))

    def stage(self, raw_keys: Iterable[Mapping[str, Any]], *, dialect: str | None = None) -> StagedKeys:
        """The first half of ``add``, which needs no database: the keys' staging rows. Another
        writer's ``write`` may take them (for a snapshot started after they were staged), as long
        as nothing is staged with the same ``reuse`` until they are written. ``dialect``: the
        database the rows are for, which saves converting their times when they are written."""
        rows = []
        fresh: list[tuple[Mapping[str, Any], list[Any]]] = []
        unchanged: list[tuple[int, int | None, str, Mapping[str, Any] | list[Any]]] = []
        reuse, known, seen = self._reuse, self._known, self._seen
        printed = False
        for raw in raw_keys:
            row = None
            print_ = None
            if reuse is not None:
                row = reuse.unchanged(raw)
                if row is not None:
                    if row[1] in seen:
                        self.duplicates += 1
                    else:
                        seen.add(row[1])
                        unchanged.append((row[-1], row[-2], row[1], row))
                    continue
                row = reuse.written(raw, self.snapshot_id)
            elif known is not None and (raw.__class__ is dict or isinstance(raw, Mapping)):
                print_ = fingerprint(raw)
                key_id = known.get(print_)
                key_hash = raw.get("hash")
                if key_id is not None and isinstance(key_hash, str):
                    if key_hash in seen:
                        self.duplicates += 1
                    else:
                        seen.add(key_hash)
                        unchanged.append((key_id, print_, key_hash, raw))
                    continue
            staged = row is None
            if row is None:
                row = staged_row(raw, self.snapshot_id, dialect=dialect)
                if print_ is None and known is not None:
                    print_ = fingerprint(raw)
                printed = printed or print_ is not None
                row.append(print_)
            if row[1] in seen:
                self.duplicates += 1
                continue
            seen.add(row[1])
            rows.append(row)
            if staged:
                fresh.append((raw, row))
        return StagedKeys(rows, fresh, unchanged, printed)

    def write(
        self, session: Session, staged: StagedKeys, *, rows_written: Callable[[], None] | None = None
    ) -> list[int]:
        """The second half of ``add``: write staged rows as this writer's snapshot's. ``rows_written``
        is called once the rows made from the keys' JSON are written (and kept for ``reuse``),
        before the keys the store already holds are carried with their versions: a caller
        that waits only for the former lets that step, which is SQL alone, run beside its own work.
        Returns the ids reserved on PostgreSQL for the keys new to the store, whose staging rows
        are written once the caller commits (``record_new_keys``); none on SQLite."""
        rows, fresh = staged.rows, staged.fresh
        new_ids: list[int] = []
        self._printed = self._printed or staged.printed
        if rows and rows[0][0] != self.snapshot_id:  # staged before this writer's snapshot existed
            for row in rows:
                row[0] = self.snapshot_id
        ids_reserved = self._reuse is None and session.get_bind().dialect.name == "sqlite"
        if ids_reserved:
            # The insert looks tracked ids up itself (``_SQLITE_STAGING_RESERVED``): far cheaper
            # than a query per page and a round of Python over its rows. Each row also takes an
            # id for its key in case it is new, so that recording the snapshot need not update
            # every new key's staging row with the id it is given then.
            if self._next_id is None:
                after = max(int(session.scalar(select(func.max(tracked_keys.c.id))) or 0) + 1, self._id_floor)
                self._next_id = after + (self._id_lane - after) % self._id_lanes
            step, key_id = self._id_lanes, self._next_id
            for _, row in fresh:
                row.append(key_id)
                key_id += step
            self._next_id = key_id
            self._reserved = True
        else:
            ids, tracked = _key_ids(session, [row[1] for _, row in fresh])
            for _, row in fresh:
                row.append(ids.get(row[1]))
            if session.get_bind().dialect.name == "postgresql":
                new_ids = [row[-1] for _, row in fresh if row[1] not in tracked]
        _copy_rows(session, rows, reserved=ids_reserved)
        if self._reuse is not None:
            for raw, row in fresh:
                if row[1] in tracked:  # a key first seen now is tracked only when the snapshot is recorded
                    self._reuse.keep(raw, row)  # as written: nothing changes it after
        if rows_written is not None:
            rows_written()
        if not staged.unchanged:
            return new_ids
        # Keys carried on top of a snapshot keep the versions it left open, which another
        # sync's snapshot may close or replace: ``record_staged`` checks it again.
        if self._known is not None:
            # Fingerprinted as of ``known``'s snapshot: while it is still the newest, every such
            # key has exactly the open versions its fingerprint was read with (checked as they are
            # carried, and again by ``record_staged``).
            self._carrying, self._carried_on = True, self._known_on
            self._to_carry.extend(key_id for key_id, _, _, _ in staged.unchanged)
            if len(self._to_carry) >= CARRY_BATCH:
                self._carry_now(session)
            return new_ids
        newest = newest_complete(session)
        if self._carrying and newest != self._carried_on:
            raise _superseded(newest)
        self._carrying, self._carried_on = True, newest
        missed = _stage_unchanged(session, self.snapshot_id, [key[:3] for key in staged.unchanged])
        complete: list[list[Any]] = []  # the keys not carried, from their JSON (tracked ids known)
        for key_id, print_, _, source in staged.unchanged:
            if key_id in missed:
                if isinstance(source, list):
                    complete.append([self.snapshot_id, *source[1:]])
                else:
                    complete.append([*staged_row(source, self.snapshot_id), print_, key_id])
                    self._printed = self._printed or print_ is not None
        _copy_rows(session, complete)
        return new_ids

    def _carry_now(self, session: Session) -> None:
        """Write the carried keys held back so far, in id order, if their snapshot is still the newest."""
        if not self._to_carry:
            return
        newest = newest_complete(session)
        if newest != self._known_on:
            raise _superseded(newest)
        self._to_carry.sort()
        _carry(session, self.snapshot_id, self._to_carry)
        self._to_carry = []

    def share(self, lanes: int) -> WriterShare:
        """Let ``lanes - 1`` other writers (``SnapshotWriter.sharing``, each in a process of its
        own) stage keys of this writer's snapshot beside it. On SQLite each reserves ids for new keys
        from its own lane (the ids equal to its lane modulo ``lanes``), above the ids this one has
        reserved so far, so that no two of them reserve the same id. Hand over each key to only one
        of them; ``absorb`` what each staged before ``finish``."""
        floor = self._next_id or 0
        self._id_lane, self._id_lanes, self._id_floor = 0, lanes, floor
        self._next_id = None  # reserved afresh in lane 0, above the ids reserved so far
        return WriterShare(self.snapshot_id, lanes, floor)

    @classmethod
    def sharing(cls, share: WriterShare, lane: int, *, known: KnownKeys | None = None) -> SnapshotWriter:
        """A writer that stages keys of ``share``'s snapshot beside the writer that shared it."""
        if not 0 < lane < share.lanes:
            raise ValueError(f"lane {lane} of {share.lanes}: lane 0 is the sharing writer's")
        writer = cls(share.snapshot_id, known=known)
        writer._id_lane, writer._id_lanes, writer._id_floor = lane, share.lanes, share.floor
        return writer

    def state(self, session: Session) -> WriterState:
        """What ``finish`` needs to know of the keys this writer staged (``absorb``), once the keys
        it still holds back are written in ``session``."""
        self._carry_now(session)
        carried_on = self._carried_on if self._carrying else None
        return WriterState(printed=self._printed, reserved=self._reserved, carried_on=carried_on)

    def absorb(self, state: WriterState) -> None:
        """Take in what a sharing writer staged, so that ``finish`` records it too."""
        self._printed = self._printed or state.printed
        self._reserved = self._reserved or state.reserved
        if state.carried_on is None:
            return
        if self._carrying and self._carried_on != state.carried_on:
            raise _superseded(max(self._carried_on or 0, state.carried_on))
        self._carrying, self._carried_on = True, state.carried_on

    def missing(self, session: Session, listed: Iterable[str] | None = None) -> list[str]:
        """Hashes of keys in the newest complete snapshot that were not handed over (to this
        writer, or to any writer when ``listed`` gives every hash the listing handed over), sorted.
        ``finish`` then records the snapshot on top of that one only (``record_staged``'s
        ``listed_against``)."""
        previous = latest_snapshot(session)
        self._listed_against = previous.id if previous is not None else 0
        if previous is None or (listed is not None and self._every_key_alive_handed_over(session)):
            return []
        return sorted(key_hashes_at(session, previous.id).difference(self._seen if listed is None else listed))

    def _every_key_alive_handed_over(self, session: Session) -> bool:
        """Whether every key alive at the newest complete snapshot (the keys with an open version)
        is carried or staged for this snapshot, by any writer (so ``missing`` asks only when it is told
        every hash the listing handed over to any writer): told by counting, where ``missing``
        reads every hash alive (100,000 keys: about 0.15 s). A key is carried or staged once; a
        staged key counts when its hash has an open version (the id staged for a new key is only
        reserved); a carried key was alive when its fingerprint was read. So the counts are equal
        exactly when no key alive was left out, unless another sync has recorded a snapshot since
        the fingerprints were read; then this one fails when it records (``SnapshotSuperseded``)."""
        u, s, c, t = key_usage, snapshot_staging, snapshot_carried, tracked_keys
        alive = _count(session, u, u.c.valid_to.is_(None))
        carried = len(self._to_carry) + _count(session, c, c.c.snapshot_id == self.snapshot_id)
        staged = s.c.snapshot_id == self.snapshot_id
        if alive > carried + _count(session, s, staged):
            return False
        was_alive = exists().where(t.c.key_hash == s.c.key_hash, u.c.key_id == t.c.id, u.c.valid_to.is_(None))
        staged_alive = _count(session, s, staged, was_alive)
        return alive == carried + staged_alive

    def finish(
        self,
        session: Session,
        *,
        taken_at: datetime,
        workspace_counts: Mapping[str, int],
        expected_keys: int | None = None,
        early: EarlyRecording | None = None,
    ) -> SnapshotWrite:
        """Record the snapshot as complete (see ``record_staged``, its ``expected_keys``,
        ``listed_against`` and ``early``), with its roll-ups."""
        self._carry_now(session)
        written = record_staged(
            session,
            snapshot_id=self.snapshot_id,
            taken_at=taken_at,
            workspace_counts=workspace_counts,
            new_fingerprints=self._printed,
            carried_on=self._carried_on,
            reserved_ids=self._reserved,
            expected_keys=expected_keys,
            listed_against=self._listed_against,
            early=early,
        )
        rollups.record_rollups(session, snapshot_id=self.snapshot_id, taken_at=taken_at, keys=written.key_count)
        return written

    def discard(self, session: Session) -> None:
        """Drop what was handed over; the snapshot itself is marked failed by the caller."""
        session.execute(delete(snapshot_staging).where(snapshot_staging.c.snapshot_id == self.snapshot_id))
        session.execute(delete(snapshot_carried).where(snapshot_carried.c.snapshot_id == self.snapshot_id))
        self._seen.clear()
        self._to_carry = []


def record_snapshot(
    session: Session,
    *,
    snapshot_id: int,
    keys: Iterable[Mapping[str, Any]],
    taken_at: datetime,
    workspace_counts: Mapping[str, int],
    reuse: StagedRows | None = None,
) -> SnapshotWrite:
    """Store a complete listing (raw key objects) as snapshot ``snapshot_id`` in one go; keys the
    store already holds as listed keep their versions, as in a sync."""
    known = None if reuse is not None else known_fingerprints(session)
    writer = SnapshotWriter(snapshot_id, reuse=reuse, known=known)
    writer.add(session, keys)
    return writer.finish(session, taken_at=taken_at, workspace_counts=workspace_counts)


def record_workspace_names(session: Session, *, snapshot_id: int, names: Mapping[str, str]) -> None:
    """Store ``{workspace id: name}`` as snapshot ``snapshot_id``'s sync listed the workspaces."""
    session.execute(update(Snapshot).where(Snapshot.id == snapshot_id).values(workspace_names=dict(names)))


def fail_snapshot(session: Session, *, snapshot_id: int, error: str) -> bool:
    """Record that a sync failed and stored no key state; False when its snapshot was recorded
    complete first (the failure came after the commit), which then stays complete: its versions
    are in the store, and only a complete snapshot may be the one they begin at. A snapshot another
    job failed already (its run taken for dead) stays failed, with that job's error."""
    result = session.execute(
        update(Snapshot)
        .where(Snapshot.id == snapshot_id, Snapshot.status == RUNNING)
        .values(status=FAILED, error=error)
    )
    if _rows(result) == 1:
        return True
    return session.scalar(select(Snapshot.status).where(Snapshot.id == snapshot_id)) != COMPLETE


def fail_orphaned(session: Session, *, error: str) -> int:
    """Mark failed every snapshot still running whose run has ended: its process died mid-sync (the
    run was found abandoned), and nothing will record it. Its staging rows go with the next prune
    (``db.retention.delete_abandoned_staging``). Returns how many."""
    ended = exists().where(Run.id == Snapshot.run_id, Run.status != runs.RUNNING)
    result = session.execute(
        update(Snapshot).where(Snapshot.status == RUNNING, ended).values(status=FAILED, error=error)
    )
    return _rows(result)


# -- reading ------------------------------------------------------------------------------------


def workspace_ids_ever(session: Session, value: str) -> set[str]:
    """The ids of the workspaces ``value`` is the id or the exact name of in any snapshot (a
    workspace renamed since is found by its old name), or ``{value}`` when it is a workspace id
    some version of a key carried (snapshots taken before names were recorded); empty for none."""
    ids: set[str] = set()
    for names in session.scalars(select(Snapshot.workspace_names)).all():  # one small row a snapshot
        if names:
            ids.update(str(workspace_id) for workspace_id, name in names.items() if value in (workspace_id, name))
    if not ids:
        carried = select(key_records.c.key_id).where(key_records.c.workspace_id == value).limit(1)
        if session.scalar(carried) is not None:
            ids.add(value)
    return ids


def latest_snapshot(session: Session, *, at: datetime | None = None) -> Snapshot | None:
    """The newest complete snapshot (taken at or before ``at``, when given)."""
    query = select(Snapshot).where(Snapshot.status == COMPLETE)
    if at is not None:
        query = query.where(Snapshot.taken_at <= at)
    return session.scalars(query.order_by(Snapshot.id.desc()).limit(1)).first()


def workspace_names(session: Session, snapshot_id: int | None = None) -> dict[str, str]:
    """``{workspace id: name}`` of snapshot ``snapshot_id`` (default: the newest complete one).

    Empty when there is no such snapshot or its names were never recorded (taken before they were).
    """
    if snapshot_id is None:
        query = select(Snapshot.workspace_names).where(Snapshot.status == COMPLETE).order_by(Snapshot.id.desc())
    else:
        query = select(Snapshot.workspace_names).where(Snapshot.id == snapshot_id)
    names = session.scalars(query.limit(1)).first()
    return {str(key): str(value) for key, value in (names or {}).items()}


class WorkspaceNames(Mapping[str, str]):
    """``{workspace id: name}`` as the newest complete snapshot listed the workspaces; a workspace it
    does not list (deleted since) gets the name from the newest snapshot that did list it, found
    when it is first asked for. Older snapshots are read newest first, each at most once, and only
    as far back as a name asked for needs: iterating gives the names found so far."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._names = workspace_names(session)
        self._read_below: int | None = None  # the oldest snapshot read so far, after the newest
        self._all_read = False

    def __getitem__(self, workspace_id: str) -> str:
        if workspace_id not in self._names and not self._all_read:
            self._read_older(workspace_id)
        return self._names[workspace_id]

    def __iter__(self) -> Iterator[str]:
        return iter(dict(self._names))

    def __len__(self) -> int:
        return len(self._names)

    def _read_older(self, workspace_id: str) -> None:
        query = select(Snapshot.id, Snapshot.workspace_names).where(
            Snapshot.status == COMPLETE, Snapshot.workspace_names.is_not(None)
        )
        if self._read_below is not None:
            query = query.where(Snapshot.id < self._read_below)
        result = self._session.execute(query.order_by(Snapshot.id.desc()).execution_options(yield_per=200))
        try:
            for snapshot_id, names in result:
                self._read_below = snapshot_id
                for key, value in (names or {}).items():
                    self._names.setdefault(str(key), str(value))
                if workspace_id in self._names:
                    return
            self._all_read = True
        finally:
            result.close()


def previous_snapshot(session: Session, snapshot_id: int) -> Snapshot | None:
    """The complete snapshot before ``snapshot_id``."""
    return session.scalars(
        select(Snapshot)
        .where(Snapshot.status == COMPLETE, Snapshot.id < snapshot_id)
        .order_by(Snapshot.id.desc())
        .limit(1)
    ).first()


def guard_window_start(session: Session) -> datetime | None:
    """Since when the shrink guard counts the keys keyhygiene deleted as its own: when the complete
    snapshot before the newest one was taken (the guard compares the two), or the newest one (the
    next sync's snapshot is compared with it). None: no snapshot yet."""
    newest = newest_complete(session)
    if newest is None:
        return None
    previous = previous_snapshot(session, newest)
    if previous is not None and previous.taken_at is not None:
        return previous.taken_at
    snapshot = session.get(Snapshot, newest)
    return snapshot.taken_at if snapshot is not None else None


def first_snapshot(session: Session) -> Snapshot | None:
    return session.scalars(select(Snapshot).where(Snapshot.status == COMPLETE).order_by(Snapshot.id).limit(1)).first()


def pruned_before(session: Session, snapshot_id: int) -> bool:
    """Whether the retention pruned snapshots older than ``snapshot_id``: the history before it is
    gone, except what the versions alive at it carry (a pruned snapshot stays as long as a kept
    version begins or ends at it)."""
    older = select(Snapshot.id).where(Snapshot.status == PRUNED, Snapshot.id < snapshot_id)
    return session.scalar(select(exists(older))) is True


def complete_snapshots(
    session: Session, *, since: datetime | None = None, until: datetime | None = None
) -> list[Snapshot]:
    """Complete snapshots in time order, optionally within [since, until]."""
    query = select(Snapshot).where(Snapshot.status == COMPLETE)
    if since is not None:
        query = query.where(Snapshot.taken_at >= since)
    if until is not None:
        query = query.where(Snapshot.taken_at <= until)
    return list(session.scalars(query.order_by(Snapshot.id)))


def days_with_snapshots(session: Session, *, after: datetime, until: datetime) -> list[date]:
    """The UTC days on which a complete snapshot was taken in (after, until], in order: read as
    times only (a year of hourly syncs is ~9,000 of them, each row of ``snapshots`` carrying JSON)."""
    query = select(Snapshot.taken_at).where(
        Snapshot.status == COMPLETE, Snapshot.taken_at > after, Snapshot.taken_at <= until
    )
    return sorted({taken_at.date() for taken_at in session.scalars(query) if taken_at is not None})


def _alive(table: Any, snapshot_id: int, newest: bool) -> Any:
    if newest:
        return table.c.valid_to.is_(None)
    return and_(table.c.valid_from <= snapshot_id, or_(table.c.valid_to.is_(None), table.c.valid_to > snapshot_id))


def _alive_usage(snapshot_id: int, newest: bool) -> tuple[Any, Any]:
    """(FROM clause, WHERE clause) of each key alive at a snapshot with its hash and its one alive
    usage version."""
    u, t = key_usage, tracked_keys
    if newest:
        return u.join(t, t.c.id == u.c.key_id), _alive(u, snapshot_id, True)
    return t.join(u, u.c.id == _last_begun(snapshot_id)), _alive_after(snapshot_id)


def _alive_join(snapshot_id: int, newest: bool) -> tuple[Any, Any]:
    """``_alive_usage`` with each key's alive record version joined. For an older snapshot the
    join starts from the record versions alive then (few, and found by their own index)."""
    u, r, t = key_usage, key_records, tracked_keys
    if newest:
        joined, alive = _alive_usage(snapshot_id, True)
        return joined.join(r, and_(r.c.key_id == u.c.key_id, _alive(r, snapshot_id, True))), alive
    joined = r.join(t, and_(t.c.id == r.c.key_id, _alive(r, snapshot_id, False)))
    return joined.join(u, u.c.id == _last_begun(snapshot_id)), _alive_after(snapshot_id)


def _last_begun(snapshot_id: int) -> Any:
    """The id of a key's (``tracked_keys``) last usage version begun at or before an older
    snapshot: one index seek per key, not a range over every version that ended after it."""
    earlier = key_usage.alias("earlier")
    return (
        select(earlier.c.id)
        .where(earlier.c.key_id == tracked_keys.c.id, earlier.c.valid_from <= snapshot_id)
        .order_by(earlier.c.valid_from.desc())
        .limit(1)
        .scalar_subquery()
    )


def _alive_after(snapshot_id: int) -> Any:
    """That version had not ended by the snapshot (so the key was alive at it)."""
    return or_(key_usage.c.valid_to.is_(None), key_usage.c.valid_to > snapshot_id)


ALIVE_COLUMNS = ("key_hash", *(field.name for field in KEY_FIELDS if field.name != "hash"))
"""The labels of ``alive_at``."""


def _column(name: str) -> Any:
    if name == "key_hash":
        return tracked_keys.c.key_hash
    table = key_usage if FIELDS_BY_NAME[name].volatile else key_records
    return table.c[name].label(name)


def alive_at(snapshot_id: int, *, newest: bool = False) -> Select[Any]:
    """The keys alive at snapshot ``snapshot_id``, one row each, with the labels of ``ALIVE_COLUMNS``
    (money as ``Decimal``), ``usage_since`` (since when its usage and BYOK usage have held),
    ``spent_from`` (the latest start of a spend window a snapshot saw it spend in) and ``key_id``
    (its ``tracked_keys`` id).
    ``newest``: the snapshot is the newest complete one, so the open versions are the answer and
    the indexes find them without reading the history."""
    joined, alive = _alive_join(snapshot_id, newest)
    columns = [_column(name) for name in ALIVE_COLUMNS]
    usage = key_usage.c
    return select(*columns, usage.usage_since, usage.spent_from, usage.key_id).select_from(joined).where(alive)


def is_newest(session: Session, snapshot_id: int) -> bool:
    newest = session.scalar(select(func.max(Snapshot.id)).where(Snapshot.status == COMPLETE))
    return newest is not None and snapshot_id >= newest


def keys_at(session: Session, snapshot_id: int) -> Iterator[Key]:
    """Every key exactly as snapshot ``snapshot_id`` saw it, raw JSON included (amounts as floats:
    a whole amount the API wrote as an integer comes back as the same number, a float), by hash
    (streamed)."""
    joined, alive = _alive_join(snapshot_id, is_newest(session, snapshot_id))
    columns = [(key_usage if field.volatile else key_records).c[field.name] for field in _RESTORED]
    query = (
        select(tracked_keys.c.key_hash, *columns, key_records.c.wire, key_usage.c.wire)
        .select_from(joined)
        .where(alive)
        .order_by(tracked_keys.c.key_hash)
    )
    for row in session.execute(query.execution_options(yield_per=2000)):
        yield Key.from_api(_restore(row[0], row[1:-2], row[-2:]))


def typed_keys_at(
    session: Session, snapshot_id: int, fields: Sequence[str]
) -> Iterator[tuple[tuple[Any, ...] | Key, HistoryFacts]]:
    """Every key snapshot ``snapshot_id`` saw (in no set order: no sort of the whole inventory;
    every caller orders what it makes of them), streamed, for reading its fields, with what
    the stored versions prove about it (``history_facts``), from one query.

    Each key comes as the tuple of its ``fields`` (two or more names of ``KEY_FIELDS``; money as
    integer micro-dollars) when the typed columns hold it exactly, as for nearly every key; otherwise (the
    API sent a field the columns do not hold, left one out, gave digits below a micro-dollar or an
    amount with float noise) as the ``Key`` rebuilt from its exact raw JSON, as ``keys_at`` gives
    it. Skips rebuilding and re-parsing the JSON of the keys the columns hold."""
    joined, alive = _alive_join(snapshot_id, is_newest(session, snapshot_id))
    columns = [
        type_coerce(column, BigInteger) if field.kind == "money" else column
        for field, column in (
            (field, (key_usage if field.volatile else key_records).c[field.name]) for field in _RESTORED
        )
    ]
    positions = {field.name: index + 1 for index, field in enumerate(_RESTORED)} | {"hash": 0}
    pick = itemgetter(*(positions[name] for name in fields))
    history = (
        tracked_keys.c.first_seen_at,
        key_usage.c.usage_since,
        key_usage.c.disabled_since,
        key_usage.c.spent_from,
    )
    query = (
        select(tracked_keys.c.key_hash, *columns, key_records.c.wire, key_usage.c.wire, *history)
        .select_from(joined)
        .where(alive)
    )
    record_wire = len(_RESTORED) + 1
    usage_wire = record_wire + 1
    plain = (None, _OTHER_STYLE_TEXT)  # no note, or only the other time style (which changes no time)
    for row in session.execute(query.execution_options(yield_per=2000)):
        facts = HistoryFacts(row[0], row[-4], row[-3], row[-2], row[-1])
        if row[record_wire] in plain and row[usage_wire] in plain:
            yield pick(row), facts
        else:
            wires = (row[record_wire], row[usage_wire])
            yield Key.from_api(_restore(row[0], row[1:record_wire], wires)), facts  # _restore takes micro-dollars


def fields_at(session: Session, snapshot_id: int, fields: Sequence[str]) -> Iterator[tuple[Any, ...]]:
    """The given fields (``alive_at``'s labels) of every key snapshot ``snapshot_id`` saw, as
    tuples in that order, streamed, without reading the raw JSON; money as integer micro-dollars."""
    joined, alive = _alive_join(snapshot_id, is_newest(session, snapshot_id))
    columns = [
        type_coerce(_column(name), BigInteger)
        if name in FIELDS_BY_NAME and FIELDS_BY_NAME[name].kind == "money"
        else _column(name)
        for name in fields
    ]
    rows = session.execute(select(*columns).select_from(joined).where(alive).execution_options(yield_per=5000))
    for row in rows:
        yield tuple(row)


def tracked_hashes(session: Session, key_hashes: Sequence[str]) -> set[str]:
    """Which of ``key_hashes`` any stored snapshot has held."""
    if not key_hashes:
        return set()
    found = session.scalars(select(tracked_keys.c.key_hash).where(tracked_keys.c.key_hash.in_(list(key_hashes))))
    return set(found)


def key_hashes_at(session: Session, snapshot_id: int) -> set[str]:
    joined, alive = _alive_usage(snapshot_id, is_newest(session, snapshot_id))
    return set(session.scalars(select(tracked_keys.c.key_hash).select_from(joined).where(alive)))


@dataclass(frozen=True, slots=True)
class HistoryFacts:
    """What the stored versions prove about one key alive at a snapshot."""

    key_hash: str
    first_seen_at: datetime
    usage_unchanged_since: datetime
    disabled_since: datetime | None
    spent_from: datetime | None


def history_facts(session: Session, snapshot_id: int) -> Iterator[HistoryFacts]:
    """For every key alive at ``snapshot_id``: when it was first seen, since when its lifetime usage
    and BYOK usage have held their values, and since when it has been disabled (None: enabled).

    One query over the maintained columns of the alive usage versions; streamed."""
    u, t = key_usage, tracked_keys
    joined, alive = _alive_usage(snapshot_id, is_newest(session, snapshot_id))
    columns = (t.c.key_hash, t.c.first_seen_at, u.c.usage_since, u.c.disabled_since, u.c.spent_from)
    query = select(*columns).select_from(joined).where(alive)
    for row in session.execute(query.execution_options(yield_per=5000)):
        yield HistoryFacts(row[0], row[1], row[2], row[3], row[4])


def count_versions(session: Session) -> int:
    """Stored versions of whole keys: each state a key was seen in, for as long as it held (a
    usage version and a record version that overlap make one)."""
    return _count(session, full_versions())
