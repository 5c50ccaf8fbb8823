"""Printing reports: a rich table for people, one JSON array or CSV for scripts.

Key and workspace names are chosen by whoever creates a key, so none of them may steer what reads
the output: tables show control characters escaped (an ESC or OSC sequence would otherwise drive
the terminal) and never read a name as rich markup; CSV cells that a spreadsheet would run as a
formula are prefixed with ``'``; JSON keeps every name exactly.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from datetime import date, datetime
from typing import IO, Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from keyhygiene.timeutil import isoformat
from keyhygiene.visible import escape_control

from .base import Report

HASH_COLUMNS = frozenset({"key_hash"})
HASH_SHOWN = 10

# A cell starting with one of these is a formula (or becomes one) in Excel, LibreOffice and Sheets.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: str) -> str:
    """A CSV cell a spreadsheet shows as text: ``'`` before a cell that would start a formula."""
    return "'" + value if value.startswith(_FORMULA_START) else value


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return isoformat(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    plain = _plain(value)
    if isinstance(plain, dict | list):
        return json.dumps(plain, separators=(",", ":"), default=str)
    return csv_safe(plain) if isinstance(plain, str) else plain


def _cell(value: Any, *, time_format: str = "%Y-%m-%d %H:%M") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, datetime):
        return value.strftime(time_format)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, dict):
        return "; ".join(f"{k}={_plain(v)}" for k, v in value.items() if v is not None)
    if isinstance(value, list | tuple):
        return ", ".join(str(item) for item in value)
    return str(value)


def _json_default(value: Any) -> Any:
    """What JSON has no type for: times as ISO 8601 (UTC, ``Z``), anything else as its text."""
    if isinstance(value, datetime):
        return isoformat(value)
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


# The C encoder walks each row and calls back only for the values JSON has no type for (times).
_JSON_ROW = json.JSONEncoder(default=_json_default).encode


def write_json(report: Report, out: IO[str]) -> None:
    """Exactly one JSON array of objects, one per row, written row by row (never one big string)."""
    out.write("[")
    for index, row in enumerate(report.each_row()):
        if index:
            out.write(", ")
        out.write(_JSON_ROW(row))
    out.write("]")


def to_json(report: Report) -> str:
    """``write_json``'s text."""
    buffer = io.StringIO()
    write_json(report, buffer)
    return buffer.getvalue()


def write_csv(report: Report, out: IO[str]) -> None:
    """A header row, then one line per row (CRLF), written row by row; nested values (evidence,
    rule lists) as compact JSON."""
    # RFC 4180 line ends: with "\n" alone, the csv module leaves a cell holding "\r" unquoted,
    # and that cell splits its row in every reader.
    writer = csv.DictWriter(out, fieldnames=list(report.columns), extrasaction="ignore", lineterminator="\r\n")
    writer.writeheader()
    for row in report.each_row():
        writer.writerow({k: _csv_value(v) for k, v in row.items()})


def to_csv(report: Report) -> str:
    """``write_csv``'s text."""
    buffer = io.StringIO()
    write_csv(report, buffer)
    return buffer.getvalue()


class StdoutConsole(Console):
    """rich's console, but a reader that went away (``| head``) raises BrokenPipeError, which the
    command turns into a quiet exit 0, where rich's own console exits 1."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError


def print_table(report: Report, console: Console, *, limit: int = 0) -> None:
    """A table that fits an 80-column terminal: few columns, short hashes and headers, long text
    folds. With ``limit``, the first ``limit`` rows, then a line counting the rest (of a
    chronological report, the newest ``limit``, after a line counting the earlier ones): laying
    out a table costs far more than the report, and nobody reads 10,000 rows in a terminal."""
    shown = list(report.table_columns or report.columns)
    cut = 0 < limit < len(report.rows)
    if not cut:
        rows = report.rows
    elif report.chronological:
        rows = report.rows[-limit:]
    else:
        rows = report.rows[:limit]
    # The title is printed on its own, so that it wraps at the terminal's width, not the table's.
    console.print(Text(escape_control(report.title), style="bold"))
    headers = [report.headers.get(column, column.replace("_", " ")) for column in shown]
    numeric = [
        any(isinstance(row.get(column), int | float) and not isinstance(row.get(column), bool) for row in rows[:50])
        for column in shown
    ]
    lines: list[list[str]] = []
    for row in rows:
        cells: list[str] = []
        for column in shown:
            value = row.get(column)
            if column in HASH_COLUMNS and isinstance(value, str):
                value = value[:HASH_SHOWN]
            fmt = report.time_formats.get(column)
            text = _cell(value) if fmt is None else _cell(value, time_format=fmt)
            cells.append(escape_control(text))
        lines.append(cells)
    min_widths = [min(len(header), 8) for header in headers]
    if not write_plain_table(console, headers, lines, right=numeric, min_widths=min_widths):
        table = Table(box=box.SIMPLE_HEAD, expand=False, pad_edge=False, show_edge=False, collapse_padding=True)
        for column, header, right, min_width in zip(shown, headers, numeric, min_widths, strict=True):
            table.add_column(
                header,
                justify="right" if right else "left",
                overflow="fold",
                no_wrap=right or column in HASH_COLUMNS or column in report.time_formats,
                min_width=min_width,
            )
        for cells in lines:
            table.add_row(*(Text(cell) for cell in cells))  # Text: a name is never read as markup
        console.print(table)
    if not report.rows:
        console.print("(no rows)")
    rest = (len(report.rows) if report.total is None else report.total) - len(rows)
    if rest:
        also = "--limit 0 shows all; --format csv or json lists every one"
        if report.chronological:
            console.print(Text(f"(the newest {len(rows):,} rows; {rest:,} earlier ones are not shown: {also})"))
        else:
            console.print(Text(f"... and {rest:,} more rows ({also})"))
    for note in report.notes:
        console.print(Text(escape_control(note)))


def write_plain_table(
    console: Console,
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    right: Sequence[bool],
    min_widths: Sequence[int] | None = None,
    widths: Sequence[int] | None = None,
) -> bool:
    """Write the table as rich lays out a ``SIMPLE_HEAD`` table without edges (a header, a rule,
    two spaces between columns) when that is plain: every cell ASCII and either ``widths`` given
    (cells cut to them with an ellipsis) or the natural widths fitting the console. Rich takes a
    few milliseconds a row to lay a table out, most of a short report's time; False when the
    table is not plain, for rich to lay it out."""
    if not rows or not all(cell.isascii() for cells in (headers, *rows) for cell in cells):
        return False
    if widths is None:
        floors = min_widths or [0] * len(headers)
        widths = [
            max(floor, len(header), *(len(cells[index]) for cells in rows))
            for index, (header, floor) in enumerate(zip(headers, floors, strict=True))
        ]
    if sum(widths) + 2 * (len(widths) - 1) > console.width:
        return False
    layout = list(zip(widths, right, strict=True))

    def line(cells: Sequence[str]) -> str:
        parts = []
        for cell, (width, flush_right) in zip(cells, layout, strict=True):
            if len(cell) > width:
                cell = cell[: width - 1] + "\u2026"
            parts.append(cell.rstrip().rjust(width) if flush_right else cell.ljust(width))
        return "  ".join(parts)

    header = line(headers)
    console.print(Text(header, style="table.header"), soft_wrap=True)
    out = console.file
    out.write("\u2500" * len(header) + "\n")
    out.write("".join(line(cells) + "\n" for cells in rows))
    return True


def render(report: Report, fmt: str, console: Console, *, limit: int = 0) -> None:
    if fmt == "json":
        write_json(report, console.file)
        console.file.write("\n")
    elif fmt == "csv":
        write_csv(report, console.file)
    else:
        print_table(report, console, limit=limit)
