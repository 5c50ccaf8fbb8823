"""Printing reports: a rich table for people, one JSON array or CSV for scripts."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from datetime import date, datetime
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from keyhygiene.timeutil import isoformat

from .base import Report

HASH_COLUMNS = frozenset({"key_hash"})
HASH_SHOWN = 10


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
    plain = _plain(value)
    if isinstance(plain, dict | list):
        return json.dumps(plain, separators=(",", ":"), default=str)
    return plain


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


def to_json(report: Report) -> str:
    """Exactly one JSON array of objects, one per row."""
    return json.dumps([{k: _plain(v) for k, v in row.items()} for row in report.rows], default=str)


def to_csv(report: Report) -> str:
    """A header row, then one line per row; nested values (evidence, rule lists) as compact JSON."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(report.columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in report.rows:
        writer.writerow({k: _csv_value(v) for k, v in row.items()})
    return buffer.getvalue()


def print_table(report: Report, console: Console, *, columns: Sequence[str] | None = None) -> None:
    """A table that fits an 80-column terminal: few columns, short hashes and headers, long text folds."""
    shown = [column for column in (columns or report.table_columns or report.columns)]
    # The title is printed on its own, so that it wraps at the terminal's width, not the table's.
    console.print(report.title, style="bold", highlight=False)
    table = Table(
        box=box.SIMPLE_HEAD,
        expand=False,
        pad_edge=False,
        show_edge=False,
        collapse_padding=True,
    )
    for column in shown:
        numeric = any(
            isinstance(row.get(column), int | float) and not isinstance(row.get(column), bool)
            for row in report.rows[:50]
        )
        header = report.headers.get(column, column.replace("_", " "))
        table.add_column(
            header,
            justify="right" if numeric else "left",
            overflow="fold",
            no_wrap=numeric or column in HASH_COLUMNS or column in report.time_formats,
            min_width=min(len(header), 8),
        )
    for row in report.rows:
        cells = []
        for column in shown:
            value = row.get(column)
            if column in HASH_COLUMNS and isinstance(value, str):
                value = value[:HASH_SHOWN]
            fmt = report.time_formats.get(column)
            cells.append(_cell(value) if fmt is None else _cell(value, time_format=fmt))
        table.add_row(*cells)
    console.print(table)
    if not report.rows:
        console.print("(no rows)")
    for note in report.notes:
        console.print(note, highlight=False)


def render(report: Report, fmt: str, console: Console, *, table_columns: list[str] | None = None) -> None:
    if fmt == "json":
        console.file.write(to_json(report) + "\n")
    elif fmt == "csv":
        console.file.write(to_csv(report))
    else:
        print_table(report, console, columns=table_columns)
