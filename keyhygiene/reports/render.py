"""Printing reports: a rich table for people, one JSON array or CSV for scripts."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from keyhygiene.timeutil import isoformat

from .base import Report


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return isoformat(value)
    return value


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M")
    if isinstance(value, list | tuple):
        return ", ".join(str(item) for item in value)
    return str(value)


def to_json(report: Report) -> str:
    """Exactly one JSON array of objects, one per row."""
    return json.dumps([{k: _plain(v) for k, v in row.items()} for row in report.rows], default=str)


def to_csv(report: Report) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(report.columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in report.rows:
        writer.writerow({k: ("" if v is None else _plain(v)) for k, v in row.items()})
    return buffer.getvalue()


def print_table(report: Report, console: Console, *, columns: list[str] | None = None) -> None:
    """A table that fits an 80-column terminal: long text folds, and hashes are shortened."""
    shown = columns or list(report.columns)
    table = Table(title=report.title, title_justify="left", expand=False, pad_edge=False, show_lines=False)
    for column in shown:
        numeric = any(
            isinstance(row.get(column), int | float) and not isinstance(row.get(column), bool)
            for row in report.rows[:50]
        )
        table.add_column(column.replace("_", " "), justify="right" if numeric else "left", overflow="fold")
    for row in report.rows:
        cells = []
        for column in shown:
            value = row.get(column)
            if column == "key_hash" and isinstance(value, str):
                value = value[:12]
            cells.append(_cell(value))
        table.add_row(*cells)
    console.print(table)
    if not report.rows:
        console.print("(no rows)")
    for note in report.notes:
        console.print(note)


def render(report: Report, fmt: str, console: Console, *, table_columns: list[str] | None = None) -> None:
    if fmt == "json":
        console.file.write(to_json(report) + "\n")
    elif fmt == "csv":
        console.file.write(to_csv(report))
    else:
        print_table(report, console, columns=table_columns)
