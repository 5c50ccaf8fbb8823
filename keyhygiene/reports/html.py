"""``report html --out FILE``: one self-contained HTML page with charts of the other reports.

Nothing is fetched: the charts are inline SVG drawn here, the styles are inline and use the
system's fonts, and a Content-Security-Policy forbids every network request. Each chart has its
figures printed next to it (``table.figures``; every number also sits in a ``data-value``
attribute), computed by the very builders behind ``report spend|trends|idle|actions``, so the page
and ``--format json`` always agree. A few lines of inline script only measure the drawn marks and
write their count into ``data-drawn`` on each chart, for tests that render the page in a browser.
"""

from __future__ import annotations

import math
import os
import stat
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from html import escape
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from db import rollups
from keyhygiene.timeutil import isoformat

from . import actions, idle, trends
from .base import ReportParams, check_at, snapshot_for, usd
from .spend import DailySpend, compute_spend, daily_spend

DEFAULT_PERIOD = timedelta(days=30)
TOP_KEYS = 5
UPCOMING_DAYS = 30
DUE = "due"
IDLE_BUCKETS: Sequence[tuple[str, int, int | None]] = (
    ("7-13 days", 7, 14),
    ("14-29 days", 14, 30),
    ("30-59 days", 30, 60),
    ("60-89 days", 60, 90),
    ("90-179 days", 90, 180),
    ("180+ days", 180, None),
)
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f")
OTHER = "#bab0ac"
STATE_SERIES = (
    ("keys", "all keys", "#4e79a7"),
    ("disabled", "disabled", "#9c755f"),
    ("expired", "expired", "#e15759"),
    ("no_expiry", "no expiry", "#f28e2b"),
    ("no_limit", "no limit", "#76b7b2"),
    ("idle_30d", "idle 30d+", "#b07aa1"),
)
OUTCOME_COLOURS = {
    "planned": "#4e79a7",
    "done": "#59a14f",
    "skipped": "#edc948",
    "failed": "#e15759",
    "refused": "#b07aa1",
    "pending": "#bab0ac",
}
ACTION_COLOURS = {"disable": "#f28e2b", "delete": "#e15759", "enable": "#59a14f", "report": "#4e79a7"}


def write_html(session: Session, params: ReportParams, out: str | Path) -> None:
    """Write the report to ``out`` (a ReportError when the store cannot answer, OSError when the file
    cannot be written): whole or not at all, an earlier report there kept until the new one is
    complete. A lone surrogate in a name the API sent is written as its escape (``\\udcff``)."""
    page = render_html(session, params).encode("utf-8", "backslashreplace")
    target = Path(out)
    if target.exists() and not target.is_file():  # /dev/stdout, a named pipe: written as a stream
        target.write_bytes(page)
        return
    target = target.resolve()  # through a symbolic link, as writing in place would go
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False) as part:
        try:
            part.write(page)
            part.flush()
            os.fsync(part.fileno())
        except BaseException:
            part.close()
            os.unlink(part.name)
            raise
    try:
        # As a file written in place would be: readable by all (0644), or as the report it replaces.
        os.chmod(part.name, stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o644)
        os.replace(part.name, target)
    except BaseException:
        os.unlink(part.name)
        raise


def render_html(session: Session, params: ReportParams) -> str:
    """The whole page as text."""
    check_at(params)
    snapshot = snapshot_for(session, params)
    period = replace(params, since=DEFAULT_PERIOD if params.since is None else params.since)
    # Per key, the totals summed in the database; per day, every key's spend streamed, and the
    # series of the biggest spenders only (a daily series per key is millions of rows at scale).
    spend = compute_spend(session, period)
    top = [item for item in sorted(spend.keys.values(), key=lambda item: (-item.total, item.name)) if item.total > 0]
    top = top[:TOP_KEYS]
    daily = daily_spend(session, period, spend.keys, series_of=[item.key_hash for item in top])
    # Trends are kept per workspace: with a --name filter they show the workspaces' keys.
    trend_rows = trends.build(session, replace(period, name=None)).rows
    idle_inputs = idle.load_inputs(session, params)
    idle_rows = idle.build(session, replace(params, since=None, by="key"), idle_inputs).rows
    coming = idle.upcoming_actions(session, params, idle_inputs)
    audit = _AuditSummary.read(session, period)
    if params.name is None:
        owner_keys = rollups.keys_by_owner(session, snapshot.id, workspaces=params.workspaces)
    else:
        owner_keys = dict(
            Counter(
                owner
                for owner, name, workspace_id in rollups.owners_alive(session, snapshot.id)
                if params.wants(name=name, workspace_id=workspace_id)
            )
        )

    as_of = params.as_of
    start = spend.start
    sections = [
        _spend_section(spend, top, daily),
        _states_section(trend_rows, names_ignored=params.name is not None),
        _idle_section(idle_rows),
        _upcoming_section(coming, as_of=as_of, has_rules=params.ruleset is not None),
        _owners_section(owner_keys, idle_rows, spend, coming, as_of=as_of),
        _audit_section(audit),
    ]
    latest = trend_rows[-1] if trend_rows else None
    # One row per key (the plan's own next action): the card is the chart's bars up to a week out.
    in_week = sum(
        sum(counts.values())
        for label, counts in _upcoming_counts(coming, as_of).items()
        if label == DUE or date.fromisoformat(label) <= as_of.date() + timedelta(days=7)
    )
    cards = [
        ("keys", "keys at the newest snapshot", str(snapshot.key_count or 0), snapshot.key_count or 0),
        ("spend-total", "spent in the period", _money(usd(spend.total)), usd(spend.total)),
        (
            "idle-30d",
            "keys idle 30 days or more",
            str(latest["idle_30d"]) if latest else "-",
            latest["idle_30d"] if latest else 0,
        ),
        ("upcoming-7d", "keys a rule acts on within 7 days", str(in_week), in_week),
        ("audit-records", "audit records in the period", str(audit.total), audit.total),
    ]
    if params.name is not None:
        # The trends are per workspace: with --name the two cards count the keys of that name.
        named = sum(owner_keys.values())
        idle_named = sum(1 for row in idle_rows if row["idle_days"] >= 30)
        cards[0] = ("keys", "keys at the newest snapshot", str(named), named)
        cards[2] = ("idle-30d", "keys idle 30 days or more", str(idle_named), idle_named)
    elif trend_rows:
        cards[0] = ("keys", "keys at the newest snapshot", str(trend_rows[-1]["keys"]), trend_rows[-1]["keys"])
    filters = []
    if params.workspaces:
        filters.append("workspace " + ", ".join(params.workspaces))
    if params.name:
        filters.append(f"name {params.name}")
    subtitle = (
        f"{start:%Y-%m-%d %H:%M} to {as_of:%Y-%m-%d %H:%M} UTC · newest snapshot {snapshot.id} "
        f"taken {snapshot.taken_at:%Y-%m-%d %H:%M} UTC" + (" · only " + "; ".join(filters) if filters else "")
    )
    body = "\n".join(
        [
            "<header><h1>OpenRouter key hygiene</h1>",
            f'<p class="sub" data-period-start="{isoformat(start)}" data-period-end="{isoformat(as_of)}">'
            f"{escape(subtitle)}</p></header>",
            '<section class="cards">'
            + "".join(
                f'<div class="card"><div class="big" data-figure="{name}" data-value="{value}">{escape(text)}</div>'
                f"<div>{escape(label)}</div></div>"
                for name, label, text, value in cards
            )
            + "</section>",
            *sections,
            f"<footer>Generated by keyhygiene at {escape(isoformat(params.now) or '')}. "
            "Spend is the growth of each key's lifetime usage and BYOK usage between snapshots, "
            "on the UTC day of the snapshot that saw it.</footer>",
        ]
    )
    return _PAGE.format(title="keyhygiene report", style=_STYLE, body=body, script=_SCRIPT)


# -- sections -----------------------------------------------------------------------------------


def _spend_section(spend: Any, top: list[Any], daily: DailySpend) -> str:
    days: list[date] = spend.days
    day_totals = {day: daily.totals.get(day, (0.0, 0.0)) for day in days}
    series: list[tuple[str, str, list[float]]] = []
    for index, item in enumerate(top):
        values = [daily.series[item.key_hash].get(day, 0.0) for day in days]
        series.append((item.name, PALETTE[index % len(PALETTE)], values))
    other = [
        max(0.0, day_totals[day][0] + day_totals[day][1] - sum(values[i] for _, _, values in series))
        for i, day in enumerate(days)
    ]
    series.append(("other keys", OTHER, other))
    chart = _stacked_bars(
        "spend",
        [day.strftime("%m-%d") for day in days],
        series,
        money=True,
        title="Spend per day, top keys stacked",
    )
    day_rows = [(day.isoformat(), [("total", usd(day_totals[day][0] + day_totals[day][1]), True)]) for day in days]
    key_rows = [(item.key_hash, [("name", item.name, False), ("total", usd(item.total), True)]) for item in top]
    return _section(
        "Spend over time",
        f"{_money(usd(spend.total))} over {len([k for k in spend.keys.values() if k.total > 0])} keys; "
        f"the {len(top)} biggest spenders are drawn on their own.",
        chart,
        _figures("spend-by-day", ["day", "total"], day_rows)
        + _figures("spend-top-keys", ["key", "name", "total"], key_rows, first_short=True),
    )


def _states_section(rows: list[dict[str, Any]], *, names_ignored: bool = False) -> str:
    labels = [row["day"].strftime("%m-%d") for row in rows]
    series = [(label, colour, [float(row[field]) for row in rows]) for field, label, colour in STATE_SERIES]
    chart = _lines("states", labels, series, title="Keys by state, per day")
    figure_rows = [
        (row["day"].isoformat(), [(field, row[field], False) for field, _, _ in STATE_SERIES]) for row in rows
    ]
    return _section(
        "Keys by state over time",
        "Counted at the last snapshot of each day"
        + (": every key of the workspaces, whatever its name (--name does not apply here)." if names_ignored else "."),
        chart,
        _figures("trends", ["day", *[label for _, label, _ in STATE_SERIES]], figure_rows),
    )


def _idle_section(rows: list[dict[str, Any]]) -> str:
    counts = {label: [0, 0] for label, _, _ in IDLE_BUCKETS}
    for row in rows:
        for label, low, high in IDLE_BUCKETS:
            if row["idle_days"] >= low and (high is None or row["idle_days"] < high):
                counts[label][1 if row["disabled"] else 0] += 1
    labels = [label for label, _, _ in IDLE_BUCKETS]
    chart = _hbars(
        "idle",
        labels,
        [
            ("enabled", "#f28e2b", [float(counts[label][0]) for label in labels]),
            ("disabled", "#9c755f", [float(counts[label][1]) for label in labels]),
        ],
        title="Idle keys by how long they have been idle",
    )
    figure_rows = [
        (label, [("enabled", counts[label][0], False), ("disabled", counts[label][1], False)]) for label in labels
    ]
    longest = rows[:10]
    listing = _table(
        ["key", "idle days", "next action", "acts on"],
        [
            [
                row["name"],
                str(row["idle_days"]),
                f"{row['next_action']} ({row['next_rule']})" if row["next_action"] else "-",
                row["acts_on"].strftime("%Y-%m-%d") if row["acts_on"] else "-",
            ]
            for row in longest
        ],
        caption="Longest idle",
    )
    return _section(
        "Idle-key ageing",
        f"{len(rows)} keys with no new use for 7 days or more.",
        chart,
        _figures("idle-ageing", ["idle for", "enabled", "disabled"], figure_rows) + listing,
    )


def _upcoming_counts(rows: list[dict[str, Any]], as_of: datetime) -> dict[str, Counter[str]]:
    """Keys by when a rule next acts on them (``DUE``: at the next run; else the UTC day, up to
    ``UPCOMING_DAYS`` ahead) and by action, in time order."""
    horizon = as_of + timedelta(days=UPCOMING_DAYS)
    labels = [DUE] + [(as_of.date() + timedelta(days=offset)).isoformat() for offset in range(UPCOMING_DAYS + 1)]
    counts: dict[str, Counter[str]] = {label: Counter() for label in labels}
    for row in rows:
        if row["acts_on"] <= as_of:
            counts[DUE][row["action"]] += 1
        elif row["acts_on"] <= horizon:
            counts[row["acts_on"].date().isoformat()][row["action"]] += 1
    return counts


def _upcoming_section(rows: list[dict[str, Any]], *, as_of: datetime, has_rules: bool) -> str:
    horizon = as_of + timedelta(days=UPCOMING_DAYS)
    soon = [row for row in rows if row["acts_on"] <= horizon]
    counts = _upcoming_counts(rows, as_of)
    actions_seen = sorted({action for counter in counts.values() for action in counter})
    series = [
        (action, ACTION_COLOURS.get(action, OTHER), [float(counter[action]) for counter in counts.values()])
        for action in actions_seen
    ]
    chart = _stacked_bars(
        "upcoming",
        ["due" if label == DUE else label[5:] for label in counts],
        series,
        title=f"Rule actions due in the next {UPCOMING_DAYS} days",
    )
    figure_rows = [
        (label, [(action, counter[action], False) for action in actions_seen])
        for label, counter in counts.items()
        if sum(counter.values())
    ]
    listing = _table(
        ["when", "key", "rule", "action"],
        [
            [
                "next run" if row["acts_on"] <= as_of else row["acts_on"].strftime("%Y-%m-%d %H:%M"),
                row["name"],
                row["rule"],
                row["action"],
            ]
            for row in soon[:25]
        ],
        caption="Soonest",
    )
    due = sum(counts[DUE].values())
    note = (
        f"{len(soon)} keys that configured rules will act on within {UPCOMING_DAYS} days if nothing changes, "
        f"{due} of them at the next run, as `keyhygiene plan` shows; each key once, with the strongest action "
        "(a key used again, or re-enabled, drops out)."
        if has_rules
        else "No rules file was found, so no actions are scheduled."
    )
    return _section(
        "Upcoming actions",
        note,
        chart,
        _figures("upcoming", ["when", *actions_seen], figure_rows) + listing,
    )


def _owners_section(
    keys: dict[str | None, int],
    idle_rows: list[dict[str, Any]],
    spend: Any,
    coming: list[dict[str, Any]],
    *,
    as_of: datetime,
) -> str:
    """Per owner (the key's ``creator_user_id``): keys at the newest snapshot, idle keys, spend in
    the period and the keys a rule acts on within the upcoming window."""
    idle_keys = Counter(row["owner"] for row in idle_rows)
    spent: dict[str | None, float] = defaultdict(float)
    for item in spend.keys.values():
        spent[item.creator_user_id] += item.total
    horizon = as_of + timedelta(days=UPCOMING_DAYS)
    acting: dict[str | None, set[str]] = defaultdict(set)
    for row in coming:
        if row["acts_on"] <= horizon:
            acting[row["owner"]].add(row["key_hash"])
    owners = set(keys) | set(idle_keys) | {owner for owner, total in spent.items() if total > 0} | set(acting)
    ordered = sorted(owners, key=lambda owner: (-keys.get(owner, 0), owner is None, str(owner)))
    figure_rows = [
        (
            owner or "(none)",
            [
                ("keys", keys.get(owner, 0), False),
                ("idle", idle_keys.get(owner, 0), False),
                ("spend", usd(spent.get(owner, 0.0)), True),
                ("upcoming", len(acting.get(owner, ())), False),
            ],
        )
        for owner in ordered
    ]
    return (
        '<section id="owners"><h2>Owners</h2><p class="note">'
        + escape(
            f"Per owner (the key's creator_user_id): keys at the newest snapshot, keys idle 7 days or more, "
            f"spend in the period, and keys a rule acts on within {UPCOMING_DAYS} days."
        )
        + "</p>"
        + _figures("owners", ["owner", "keys", "idle keys", "spend", "upcoming actions"], figure_rows)
        + "</section>"
    )


@dataclass(frozen=True, slots=True)
class _AuditSummary:
    """What the page shows of the audit log: records per day and outcome, and the newest few."""

    per_day: Counter[tuple[date, str]]
    recent: list[dict[str, Any]]
    """Newest first."""

    @classmethod
    def read(cls, session: Session, params: ReportParams) -> _AuditSummary:
        """Counted without reading the records (a month of hourly dry runs is millions of them);
        only the newest ``RECENT_AUDIT`` are read."""
        recent = actions.newest(session, params, RECENT_AUDIT)
        return cls(actions.counts_per_day(session, params), list(reversed(recent)))

    @property
    def total(self) -> int:
        return sum(self.per_day.values())


RECENT_AUDIT = 50


def _audit_section(audit: _AuditSummary) -> str:
    outcomes: Counter[str] = Counter()
    for (_, outcome), count in audit.per_day.items():
        outcomes[outcome] += count
    days = sorted({day for day, _ in audit.per_day})
    series = [
        (outcome, OUTCOME_COLOURS.get(outcome, OTHER), [float(audit.per_day[(day, outcome)]) for day in days])
        for outcome in sorted(outcomes)
    ]
    chart = _stacked_bars("audit", [day.strftime("%m-%d") for day in days], series, title="Audit records per day")
    recent = audit.recent
    listing = _table(
        ["time", "key", "rule", "action", "mode", "outcome", "why"],
        [
            [
                row["time"].strftime("%Y-%m-%d %H:%M"),
                row["key_name"],
                row["rule"],
                row["action"],
                "dry run" if row["dry_run"] else "live",
                row["outcome"],
                row["reason"] or _evidence(row["evidence"]),
            ]
            for row in recent
        ],
        caption="Most recent first",
    )
    return _section(
        "Recent audit log",
        f"{audit.total} records in the period.",
        chart,
        _figures(
            "audit-outcomes",
            ["outcome", "records"],
            [(o, [("records", n, False)]) for o, n in sorted(outcomes.items())],
        )
        + listing,
    )


# -- building blocks ----------------------------------------------------------------------------


def _section(title: str, note: str, chart: str, figures: str) -> str:
    anchor = title.lower().replace(" ", "-")
    return (
        f'<section id="{escape(anchor)}"><h2>{escape(title)}</h2><p class="note">{escape(note)}</p>'
        f'<div class="pair"><div class="chart-box">{chart}</div><div class="side">{figures}</div></div></section>'
    )


def _money(value: float) -> str:
    return f"${value:,.2f}"


def _evidence(evidence: dict[str, Any]) -> str:
    return "; ".join(f"{k}={v}" for k, v in evidence.items() if v is not None and k != "match")


def _figures(
    name: str,
    headers: Sequence[str],
    rows: Iterable[tuple[str, Sequence[tuple[str, Any, bool]]]],
    *,
    first_short: bool = False,
) -> str:
    """A table of exact figures: every number in ``data-value``, the row's key in ``data-key``."""
    head = "".join(f"<th>{escape(header)}</th>" for header in headers)
    body = []
    for key, cells in rows:
        shown = key[:10] if first_short else key
        parts = [f'<td title="{escape(key)}">{escape(shown)}</td>']
        for column, value, money in cells:
            if isinstance(value, int | float) and not isinstance(value, bool):
                text = _money(value) if money else f"{value:,}"
                parts.append(f'<td class="num" data-col="{escape(column)}" data-value="{value}">{escape(text)}</td>')
            else:
                parts.append(f'<td data-col="{escape(column)}">{escape(str(value))}</td>')
        body.append(f'<tr data-key="{escape(key)}">{"".join(parts)}</tr>')
    if not body:
        body.append(f'<tr><td colspan="{len(headers)}" class="empty">none</td></tr>')
    return (
        f'<details open><summary>Figures</summary><table class="figures" data-figures="{escape(name)}">'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></details>"
    )


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, caption: str) -> str:
    if not rows:
        return ""
    head = "".join(f"<th>{escape(header)}</th>" for header in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    return (
        f'<table class="list"><caption>{escape(caption)}</caption>'
        f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    )


@dataclass(frozen=True, slots=True)
class _Frame:
    width: int = 720
    height: int = 260
    left: int = 56
    right: int = 12
    top: int = 14
    bottom: int = 40

    @property
    def inner_width(self) -> float:
        return self.width - self.left - self.right

    @property
    def inner_height(self) -> float:
        return self.height - self.top - self.bottom


def _nice_max(value: float) -> tuple[float, float]:
    """An axis maximum at or above ``value`` and a tick step that divides it into 4-5 parts."""
    if value <= 0:
        return 1.0, 0.25
    raw = value / 4
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    return step * math.ceil(value / step - 1e-9), step


def _axis_label(value: float, money: bool) -> str:
    text = f"{value:,.0f}" if value >= 10 or value == int(value) else f"{value:,.2f}".rstrip("0").rstrip(".")
    return f"${text}" if money else text


def _text(x: float, y: float, text: str, *, anchor: str = "start", kind: str = "tick") -> str:
    return f'<text class="{kind}" x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}">{escape(text)}</text>'


def _open_svg(name: str, frame: _Frame, title: str) -> list[str]:
    return [
        f'<svg class="chart" data-chart="{escape(name)}" viewBox="0 0 {frame.width} {frame.height}" '
        f'role="img" aria-label="{escape(title)}" preserveAspectRatio="xMidYMid meet">',
        f"<title>{escape(title)}</title>",
    ]


def _y_axis(frame: _Frame, top_value: float, step: float, money: bool) -> list[str]:
    parts = []
    ticks = round(top_value / step)
    for index in range(ticks + 1):
        value = step * index
        y = frame.top + frame.inner_height * (1 - value / top_value)
        parts.append(
            f'<line class="grid" x1="{frame.left}" x2="{frame.width - frame.right}" y1="{y:.1f}" y2="{y:.1f}"/>'
        )
        parts.append(_text(frame.left - 6, y + 4, _axis_label(value, money), anchor="end"))
    return parts


def _x_labels(frame: _Frame, labels: Sequence[str], centre: Any) -> list[str]:
    every = max(1, math.ceil(len(labels) / 12))
    return [
        _text(centre(index), frame.height - frame.bottom + 16, label, anchor="middle")
        for index, label in enumerate(labels)
        if index % every == 0
    ]


def _legend(frame: _Frame, series: Sequence[tuple[str, str, Sequence[float]]]) -> list[str]:
    parts, x = [], float(frame.left)
    y = frame.height - 10
    for label, colour, _ in series:
        parts.append(f'<rect x="{x:.1f}" y="{y - 9}" width="10" height="10" fill="{colour}" rx="2"/>')
        parts.append(f'<text class="legend" x="{x + 14:.1f}" y="{y}">{escape(label)}</text>')
        x += 22 + 6.6 * len(label)
    return parts


def _empty(parts: list[str], frame: _Frame, message: str) -> str:
    parts.append(_text(frame.width / 2, frame.height / 2, message, anchor="middle", kind="empty"))
    parts.append("</svg>")
    return "".join(parts)


def _stacked_bars(
    name: str,
    labels: Sequence[str],
    series: Sequence[tuple[str, str, Sequence[float]]],
    *,
    title: str,
    money: bool = False,
) -> str:
    frame = _Frame()
    parts = _open_svg(name, frame, title)
    totals = [sum(values[index] for _, _, values in series) for index in range(len(labels))]
    if not labels or not any(totals):
        return _empty(parts, frame, "nothing in this period")
    top_value, step = _nice_max(max(totals))
    parts += _y_axis(frame, top_value, step, money)
    slot = frame.inner_width / len(labels)
    width = min(max(1.0, slot * 0.72), 56.0)

    def centre(index: int) -> float:
        return frame.left + slot * (index + 0.5)

    for index, label in enumerate(labels):
        base = 0.0
        for series_label, colour, values in series:
            value = values[index]
            if value <= 0:
                continue
            height = frame.inner_height * value / top_value
            y = frame.top + frame.inner_height * (1 - (base + value) / top_value)
            shown = _money(value) if money else f"{value:g}"
            parts.append(
                f'<rect class="mark" x="{centre(index) - width / 2:.2f}" y="{y:.2f}" width="{width:.2f}" '
                f'height="{max(height, 0.5):.2f}" fill="{colour}"><title>{escape(label)} · {escape(series_label)}: '
                f"{escape(shown)}</title></rect>"
            )
            base += value
    parts += _x_labels(frame, labels, centre)
    parts += _legend(frame, series)
    parts.append("</svg>")
    return "".join(parts)


def _lines(name: str, labels: Sequence[str], series: Sequence[tuple[str, str, Sequence[float]]], *, title: str) -> str:
    frame = _Frame()
    parts = _open_svg(name, frame, title)
    if not labels:
        return _empty(parts, frame, "no snapshot in this period")
    top_value, step = _nice_max(max(max(values) for _, _, values in series))
    parts += _y_axis(frame, top_value, step, False)
    slot = frame.inner_width / len(labels)

    def centre(index: int) -> float:
        return frame.left + slot * (index + 0.5)

    for series_label, colour, values in series:
        points = [
            (centre(index), frame.top + frame.inner_height * (1 - value / top_value))
            for index, value in enumerate(values)
        ]
        if len(points) > 1:
            path = " ".join(f"{'M' if i == 0 else 'L'}{x:.1f},{y:.1f}" for i, (x, y) in enumerate(points))
            parts.append(f'<path class="line" d="{path}" stroke="{colour}"/>')
        for (x, y), label, value in zip(points, labels, values, strict=True):
            parts.append(
                f'<circle class="mark" cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}">'
                f"<title>{escape(label)} · {escape(series_label)}: {value:g}</title></circle>"
            )
    parts += _x_labels(frame, labels, centre)
    parts += _legend(frame, series)
    parts.append("</svg>")
    return "".join(parts)


def _hbars(name: str, labels: Sequence[str], series: Sequence[tuple[str, str, Sequence[float]]], *, title: str) -> str:
    frame = _Frame(left=96, bottom=40)
    parts = _open_svg(name, frame, title)
    totals = [sum(values[index] for _, _, values in series) for index in range(len(labels))]
    if not any(totals):
        return _empty(parts, frame, "no idle keys")
    top_value, step = _nice_max(max(totals))
    slot = frame.inner_height / len(labels)
    for index in range(round(top_value / step) + 1):
        value = step * index
        x = frame.left + frame.inner_width * value / top_value
        parts.append(
            f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{frame.top}" y2="{frame.height - frame.bottom}"/>'
        )
        parts.append(_text(x, frame.height - frame.bottom + 16, f"{value:g}", anchor="middle"))
    for index, label in enumerate(labels):
        y = frame.top + slot * index + slot * 0.15
        parts.append(_text(frame.left - 6, y + slot * 0.45, label, anchor="end"))
        base = 0.0
        for series_label, colour, values in series:
            value = values[index]
            if value <= 0:
                continue
            x = frame.left + frame.inner_width * base / top_value
            width = frame.inner_width * value / top_value
            parts.append(
                f'<rect class="mark" x="{x:.2f}" y="{y:.2f}" width="{width:.2f}" height="{slot * 0.7:.2f}" '
                f'fill="{colour}"><title>{escape(label)} · {escape(series_label)}: {value:g}</title></rect>'
            )
            base += value
    parts += _legend(frame, series)
    parts.append("</svg>")
    return "".join(parts)


_STYLE = """
:root { color-scheme: light dark; --fg: #1d2433; --muted: #5b6475; --line: #d9dde5; --bg: #ffffff; --card: #f4f6f9; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #e6e9ef; --muted: #a3acbd; --line: #3a4152; --bg: #171a21; --card: #222733; }
}
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1180px; padding: 24px; background: var(--bg); color: var(--fg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
h1 { margin: 0 0 4px; font-size: 24px; } h2 { margin: 0 0 4px; font-size: 18px; }
.sub, .note, footer, caption { color: var(--muted); }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(170px, 1fr)); gap: 12px; margin: 20px 0; }
.card { background: var(--card); border-radius: 8px; padding: 12px 14px; }
.card .big { font-size: 26px; font-weight: 600; font-variant-numeric: tabular-nums; }
section { margin: 28px 0; }
.pair { display: grid; grid-template-columns: minmax(0, 2fr) minmax(0, 1fr); gap: 20px; align-items: start; }
@media (max-width: 860px) { .pair { grid-template-columns: 1fr; } }
svg.chart { width: 100%; height: auto; display: block; }
svg .grid { stroke: var(--line); stroke-width: 1; }
svg .tick, svg .legend { fill: var(--muted); font-size: 11px; }
svg .empty { fill: var(--muted); font-size: 14px; }
svg .line { fill: none; stroke-width: 2; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; margin-top: 8px; }
th, td { text-align: left; padding: 3px 8px; border-bottom: 1px solid var(--line); white-space: nowrap; }
td.num { text-align: right; } td.empty { color: var(--muted); }
.side { max-height: 420px; overflow: auto; }
table.list { font-size: 13px; } table.list td { white-space: normal; }
caption { text-align: left; padding: 6px 0 0; }
details summary { cursor: pointer; color: var(--muted); }
footer { margin-top: 40px; font-size: 12px; }
"""

_SCRIPT = """
(function () {
  // Measure what was drawn, for tests that render this page in a browser: each chart gets
  // data-drawn (marks with a non-zero size) and data-size (its size on the page).
  document.querySelectorAll("svg.chart").forEach(function (svg) {
    var drawn = 0;
    svg.querySelectorAll(".mark").forEach(function (mark) {
      var box = mark.getBBox();
      if (box.width > 0 && box.height > 0) { drawn += 1; }
    });
    var rect = svg.getBoundingClientRect();
    svg.setAttribute("data-drawn", String(drawn));
    svg.setAttribute("data-size", Math.round(rect.width) + "x" + Math.round(rect.height));
  });
  document.body.setAttribute("data-measured", "yes");
})();
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; \
script-src 'unsafe-inline'">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
{body}
<script>{script}</script>
</body>
</html>
"""
