"""Printing a plan (``keyhygiene plan``): a table of what fits on a screen, or one JSON array streamed.

Both list the decisions by action (delete, disable, enable, report), then key name: what changes
the most comes first. The table shows at most ``limit`` rows and counts the rest; names are cut to
the terminal's width with an ellipsis, never wrapped. JSON is written one decision at a time.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TextIO

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from keyhygiene.rules import Decision, Plan

from .enforcement import decision_row, explain
from .reports.render import write_plain_table
from .visible import escape_control

DEFAULT_LIMIT = 50
ACTION_ORDER = ("delete", "disable", "enable", "report")
HASH_SHOWN = 10
RULE_WIDTH = 24
WHY_WIDTH = 28
NAME_WIDTH = 32  # a name this long is cut only after rule and why are
MIN_WIDTH = 12
_RANK = {action: rank for rank, action in enumerate(ACTION_ORDER)}


def ordered(decisions: Iterable[Decision]) -> list[Decision]:
    """Decisions by action (delete, disable, enable, report), then key name, then hash."""
    return sorted(decisions, key=lambda d: (_RANK.get(d.action, len(_RANK)), d.key_name, d.key_hash))


def write_json(decisions: Iterable[Decision], out: TextIO) -> None:
    """One JSON array, one object per decision (``decision_row``), written as it goes."""
    out.write("[")
    for index, decision in enumerate(decisions):
        out.write(",\n" if index else "\n")
        out.write(json.dumps(decision_row(decision)))
    out.write("\n]\n")


def counts_line(plan: Plan) -> str:
    """How many decisions of each action, in ``ACTION_ORDER``: "3 delete, 40 disable, 2 report"."""
    counts: Counter[str] = Counter(decision.action for decision in plan.decisions)
    return ", ".join(f"{counts[action]:,} {action}" for action in ACTION_ORDER if counts[action])


def print_table(decisions: Sequence[Decision], console: Console, *, title: str, limit: int) -> None:
    """The first ``limit`` of ``decisions`` (all of them when ``limit`` is 0) as a table, then a line
    that counts the rest. ``decisions`` are printed in the order given."""
    shown = decisions if limit <= 0 else decisions[:limit]
    console.print(Text(title, style="bold"))
    if not shown:
        console.print("(nothing to do)")
        return
    rows = [
        (
            decision.key_hash[:HASH_SHOWN],
            escape_control(decision.key_name),
            decision.action,
            escape_control(decision.rule),
            explain(decision.evidence),
        )
        for decision in shown
    ]
    headers = ("key", "name", "action", "rule", "why")
    widths = [max(len(header), *(len(row[index]) for row in rows)) for index, header in enumerate(headers)]
    widths[3] = min(widths[3], RULE_WIDTH)
    widths[4] = min(widths[4], WHY_WIDTH)
    # Everything fits on one line per key, never wrapped: the name gets what the other columns leave
    # of the terminal (two spaces between columns), taken first from "why" and then from "rule" down
    # to their minimum, and beyond that is cut with an ellipsis.
    room = console.width - widths[0] - widths[2] - 2 * (len(headers) - 1)
    wanted = min(widths[1], NAME_WIDTH)
    for column in (4, 3):
        short = wanted - (room - widths[3] - widths[4])
        if short > 0:
            widths[column] = max(MIN_WIDTH, widths[column] - short)
    widths[1] = max(MIN_WIDTH, min(widths[1], room - widths[3] - widths[4]))
    if not write_plain_table(console, headers, rows, right=[False] * len(headers), widths=widths):
        table = Table(box=box.SIMPLE_HEAD, expand=False, pad_edge=False, show_edge=False, collapse_padding=True)
        for header, width in zip(headers, widths, strict=True):
            table.add_column(header, width=width, no_wrap=True, overflow="ellipsis")
        for row in rows:
            table.add_row(*(Text(cell) for cell in row))
        console.print(table)
    rest = len(decisions) - len(shown)
    if rest:
        console.print(Text(f"... and {rest:,} more (--limit 0 shows all; --format json lists every one)"))
