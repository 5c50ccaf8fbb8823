"""``report actions --name/--workspace`` reads only the records of the keys that may match
(``db.audit.KeyFilter``): the SQL ``LIKE`` it sends must admit every name the shell-style pattern
matches, on both databases, or the report would silently drop records."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import String, literal, select, union_all

from db.audit import KeyFilter, glob_like
from keyhygiene.context import Database

# Every character LIKE or fnmatch treats specially, both cases of a letter, and two non-ASCII ones.
ALPHABET = "aAb%_\\[]!*?-éß"
NAMES = st.lists(st.text(ALPHABET, max_size=6), min_size=1, max_size=12, unique=True)
PATTERNS = st.text(ALPHABET, max_size=6)


def _rows(rows: list[tuple[str, str | None]]) -> Any:
    """The rows as a table the query reads (SQLite takes no column names on a VALUES list)."""
    selects = [select(literal(n, String).label("name"), literal(w, String).label("workspace")) for n, w in rows]
    return union_all(*selects).subquery("keys")


def _admitted(database: Database, names: list[str], pattern: str) -> set[str]:
    table = _rows([(name, None) for name in names])
    query = KeyFilter(name=pattern).where(select(table.c.name), table.c.name, table.c.workspace)
    with database.sessions() as session:
        return set(session.scalars(query))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=NAMES, pattern=PATTERNS)
def test_the_sql_filter_admits_every_name_the_pattern_matches(
    database: Database, names: list[str], pattern: str
) -> None:
    matched = {name for name in names if fnmatchcase(name, pattern)}
    admitted = _admitted(database, names, pattern)

    assert matched <= admitted, f"LIKE {glob_like(pattern)!r} drops names {pattern!r} matches"
    if database.engine.dialect.name == "postgresql" and "[" not in pattern and glob_like(pattern).strip("%"):
        # Without a [...] set, LIKE says exactly what the pattern does (PostgreSQL minds case);
        # a pattern that admits any name ("", "*") sends no LIKE.
        assert admitted == matched


def test_a_pattern_is_sent_as_the_like_it_stands_for() -> None:
    assert glob_like("prod-*") == "prod-%"
    assert glob_like("50%_off?") == "50\\%\\_off_"
    assert glob_like("[!a]x[") == "_x["
    assert glob_like("**") == "%"
    assert glob_like("\udcff*") == "%"  # an undecodable command-line byte: filtered in Python only


def test_the_workspace_filter_keeps_only_those_workspaces(database: Database) -> None:
    table = _rows([("a", "w1"), ("b", "w2"), ("c", None), ("d", "w1")])
    keys = KeyFilter(workspaces=("w1", "w3"), name="[a-c]")
    query = keys.where(select(table.c.name), table.c.name, table.c.workspace)
    with database.sessions() as session:
        assert set(session.scalars(query)) == {"a", "d"}  # the caller then matches "d" against [a-c]
