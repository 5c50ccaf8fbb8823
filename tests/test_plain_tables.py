"""Report and plan tables: a plain table is written without rich's layout, and must read exactly as
rich lays it out (header, rule, columns, right-aligned numbers, cells cut with an ellipsis); a
table that is not plain (wider than the terminal, not ASCII) is still laid out by rich."""

from __future__ import annotations

import io
import string
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from keyhygiene.reports.base import Report
from keyhygiene.reports.render import print_table, write_plain_table

EXAMPLES = settings(max_examples=300, deadline=None)
CELL = st.text(alphabet=string.ascii_letters + string.digits + " .-_:", max_size=14)


def console(out: io.StringIO, width: int = 80) -> Console:
    return Console(file=out, width=width, color_system=None)


def by_rich(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    right: Sequence[bool],
    *,
    min_widths: Sequence[int] | None = None,
    widths: Sequence[int] | None = None,
) -> str:
    """The table as rich lays it out, configured as the report and plan tables configure it."""
    out = io.StringIO()
    table = Table(box=box.SIMPLE_HEAD, expand=False, pad_edge=False, show_edge=False, collapse_padding=True)
    for index, header in enumerate(headers):
        if widths is not None:
            table.add_column(header, width=widths[index], no_wrap=True, overflow="ellipsis")
        else:
            table.add_column(
                header,
                justify="right" if right[index] else "left",
                overflow="fold",
                no_wrap=right[index],
                min_width=(min_widths or [0] * len(headers))[index],
            )
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    console(out).print(table)
    return out.getvalue()


def plain(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    right: Sequence[bool],
    *,
    min_widths: Sequence[int] | None = None,
    widths: Sequence[int] | None = None,
    width: int = 80,
) -> str | None:
    out = io.StringIO()
    if not write_plain_table(console(out, width), headers, rows, right=right, min_widths=min_widths, widths=widths):
        return None
    return out.getvalue()


@st.composite
def tables(draw: st.DrawFn) -> tuple[list[str], list[list[str]], list[bool]]:
    columns = draw(st.integers(1, 6))
    headers = [draw(st.text(alphabet=string.ascii_lowercase + " ", min_size=1, max_size=12)) for _ in range(columns)]
    rows = draw(st.lists(st.lists(CELL, min_size=columns, max_size=columns), min_size=1, max_size=5))
    right = draw(st.lists(st.booleans(), min_size=columns, max_size=columns))
    return headers, rows, right


@EXAMPLES
@given(tables())
def test_a_report_table_reads_as_rich_lays_it_out(table: tuple[list[str], list[list[str]], list[bool]]) -> None:
    headers, rows, right = table
    min_widths = [min(len(header), 8) for header in headers]

    written = plain(headers, rows, right, min_widths=min_widths)

    if written is not None:  # None: wider than the terminal, left to rich
        assert written == by_rich(headers, rows, right, min_widths=min_widths)


@EXAMPLES
@given(tables(), st.lists(st.integers(3, 12), min_size=6, max_size=6))
def test_a_plan_table_cuts_cells_as_rich_does(
    table: tuple[list[str], list[list[str]], list[bool]], widths: list[int]
) -> None:
    headers, rows, _ = table
    fixed = widths[: len(headers)]
    left = [False] * len(headers)

    written = plain(headers, rows, left, widths=fixed)

    assert written is not None  # at most 6 x 12 columns: always fits 80
    assert written == by_rich(headers, rows, left, widths=fixed)


def test_what_is_not_plain_is_left_to_rich() -> None:
    assert plain(["name"], [["caf\u00e9"]], [False]) is None  # not ASCII: rich measures its cells
    assert plain(["name", "why"], [["x" * 50, "y" * 40]], [False, False]) is None  # wider than 80
    assert plain(["name"], [], [False]) is None


def test_a_wide_report_still_folds_to_the_terminal() -> None:
    report = Report(
        title="wide",
        columns=["name", "why"],
        rows=[{"name": "n" * 50, "why": "w" * 60}, {"name": "short", "why": 12.5}],
    )
    out = io.StringIO()

    print_table(report, console(out))

    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert text.count("n") == 1 + 50 and text.count("w") == 2 + 60  # folded onto more lines, nothing cut
