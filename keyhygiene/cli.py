"""The ``keyhygiene`` command.

Output for people goes to stdout; log events go to stderr (JSON lines by default). Every error ends
with one line on stderr and the interface's exit code, never a traceback.
"""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Any, NoReturn

import click
from rich.console import Console

from . import logging as khlog
from .errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, KeyhygieneError, UsageError
from .settings import Settings, SettingsError, load_settings
from .timeutil import TimeFormatError, isoformat, parse_duration, parse_time, utcnow

REPORT_KINDS = ("inventory", "spend", "actions", "idle", "trends", "html")


class State:
    """Settings, read once when the first command needs them."""

    def __init__(self) -> None:
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings()
            khlog.configure_logging(self._settings.log_format)
        return self._settings


pass_state = click.make_pass_decorator(State, ensure=True)


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    click.echo(f"keyhygiene: error: {khlog.redact_text(message)}", err=True)
    sys.exit(code)


def _time_option(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_time(value)
    except TimeFormatError as exc:
        raise click.BadParameter(str(exc)) from None


def _duration_option(_: Any, __: Any, value: str | None) -> Any:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except TimeFormatError as exc:
        raise click.BadParameter(str(exc)) from None


def _time_callback(_: Any, __: Any, value: str | None) -> datetime | None:
    return _time_option(value)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="keyhygiene")
def cli() -> None:
    """Keep an organisation's OpenRouter API keys clean: snapshot every key, report on the history,
    and disable or delete keys by rules, within hard safety limits.

    Settings come from the environment (and a .env file): OPENROUTER_MANAGEMENT_KEY,
    KEYHYGIENE_DATABASE_URL, KEYHYGIENE_RULES_FILE, ... (see the README).
    """


# -- database -----------------------------------------------------------------------------------


@cli.group()
def db() -> None:
    """Database schema commands."""


@db.command("upgrade")
@pass_state
def db_upgrade(state: State) -> None:
    """Bring the database schema to the newest migration (run before workers start)."""
    from sqlalchemy.exc import SQLAlchemyError

    from db.migrate import upgrade

    from .context import Database, describe_db_error

    database = Database.open(state.settings, check=False)
    try:
        before, after = upgrade(database.engine)
    except SQLAlchemyError as exc:
        fail(f"cannot migrate the database: {describe_db_error(exc)}")
    finally:
        database.close()
    if before == after:
        click.echo(f"database is up to date (migration {after})")
    else:
        click.echo(f"database upgraded from {before or 'empty'} to migration {after}")


# -- jobs ---------------------------------------------------------------------------------------


def _finish_job(outcome: Any) -> NoReturn:
    stream = sys.stdout if outcome.exit_code == EXIT_OK else sys.stderr
    prefix = "" if outcome.exit_code == EXIT_OK else "keyhygiene: "
    run = f"run {outcome.run_id} " if outcome.run_id is not None else ""
    click.echo(f"{prefix}{run}{outcome.kind} {outcome.status}: {khlog.redact_text(outcome.message)}", file=stream)
    sys.exit(outcome.exit_code)


@cli.command()
@pass_state
def sync(state: State) -> None:
    """Page through every key of every workspace (disabled and expired ones included) and store a
    snapshot."""
    from .jobs import execute

    settings = state.settings
    if sys.stderr.isatty():
        from rich.progress import Progress, SpinnerColumn, TextColumn

        with Progress(
            SpinnerColumn(), TextColumn("{task.description}"), console=Console(stderr=True), transient=True
        ) as progress:
            task = progress.add_task("listing keys", total=None)
            seen = {"keys": 0, "pages": 0}

            def on_page(_: str, count: int) -> None:
                seen["keys"] += count
                seen["pages"] += 1
                progress.update(task, description=f"listing keys: {seen['keys']} keys, {seen['pages']} pages")

            outcome = execute("sync", settings, on_page=on_page)
    else:
        outcome = execute("sync", settings)
    _finish_job(outcome)


@cli.command()
@click.option("--dry-run", is_flag=True, help="Change nothing, whatever the rules file says.")
@pass_state
def enforce(state: State, dry_run: bool) -> None:
    """Plan on the newest complete snapshot and act within the safety limits."""
    from .jobs import execute

    _finish_job(execute("enforce", state.settings, dry_run=dry_run))


@cli.command()
@click.option("--dry-run", is_flag=True, help="Change nothing, whatever the rules file says.")
@pass_state
def run(state: State, dry_run: bool) -> None:
    """Sync, then enforce on that fresh snapshot: the periodic job, inline, with no broker."""
    from .jobs import execute

    _finish_job(execute("run", state.settings, dry_run=dry_run))


@cli.command()
@pass_state
def prune(state: State) -> None:
    """Remove snapshot history older than KEYHYGIENE_RETENTION (and audit records older than
    KEYHYGIENE_AUDIT_RETENTION, when set), inline. Reports inside the retention do not change."""
    from .jobs import execute

    _finish_job(execute("prune", state.settings))


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@pass_state
def plan(state: State, fmt: str) -> None:
    """Evaluate the rules against the newest snapshot and print what enforcement would do.

    Changes nothing and calls no API.
    """
    import json

    from db import snapshots

    from .context import Database
    from .enforcement import decision_row, explain, load_plan_inputs, make_plan
    from .jobs import load_ruleset

    settings = state.settings
    ruleset = load_ruleset(settings)
    database = Database.open(settings)
    try:
        with database.sessions() as session:
            snapshot = snapshots.latest_snapshot(session)
            if snapshot is None:
                fail("there is no complete snapshot yet: run `keyhygiene sync` first")
            inputs = load_plan_inputs(session, snapshot.id)
    finally:
        database.close()
    the_plan = make_plan(inputs, ruleset, utcnow())
    rows = [decision_row(decision) for decision in the_plan.decisions]
    if fmt == "json":
        click.echo(json.dumps(rows))
        return
    from keyhygiene.rules import check_caps

    from .reports.base import Report
    from .reports.render import print_table

    for row in rows:
        row["why"] = explain(row["evidence"])
    print_table(
        Report(
            title=f"Plan on snapshot {inputs.snapshot_id} ({isoformat(inputs.taken_at)}), {len(inputs.keys)} keys",
            columns=["key_hash", "key_name", "action", "rule", "why"],
            rows=rows,
        ),
        Console(),
    )
    breach = check_caps(the_plan, ruleset.safety)
    mode = "DRY RUN (rules file)" if ruleset.safety.dry_run else "LIVE"
    click.echo(
        f"{len(the_plan.changes)} change(s) planned, {len(rows) - len(the_plan.changes)} report(s); mode: {mode}"
    )
    if breach is not None:
        click.echo(f"enforcement would be REFUSED: {breach.reason}")


# -- rules --------------------------------------------------------------------------------------


@cli.group()
def rules() -> None:
    """Rules file commands."""


@rules.command("check")
@click.argument("file", required=False, type=click.Path(dir_okay=False))
def rules_check(file: str | None) -> None:
    """Validate a rules file (default: KEYHYGIENE_RULES_FILE) and print the rules as understood."""
    from keyhygiene.rules import RulesError, describe, load_rules

    path = file or load_settings().rules_file
    try:
        ruleset = load_rules(path)
    except RulesError as exc:
        fail(str(exc), EXIT_USAGE)
    click.echo(describe(ruleset))


# -- reports ------------------------------------------------------------------------------------


@cli.command()
@click.argument("kind", type=click.Choice(REPORT_KINDS), metavar="KIND")
@click.option(
    "--since",
    callback=_duration_option,
    metavar="DURATION",
    help="Period to cover, e.g. 30d (spend, actions, trends, html: default 30d); idle: the shortest idleness "
    "listed (default 7d).",
)
@click.option(
    "--at",
    "at",
    callback=_time_callback,
    metavar="TIME",
    help="Report as of this time (ISO 8601; naive means UTC).",
)
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@click.option(
    "--workspace", "workspaces", multiple=True, metavar="ID", help="Only keys of this workspace (repeatable)."
)
@click.option("--name", metavar="GLOB", help="Only keys whose name matches this pattern, e.g. 'dev-*'.")
@click.option(
    "--by",
    type=click.Choice(["key", "workspace", "day", "owner"]),
    default="key",
    show_default=True,
    help="spend: one row per key, per workspace, per UTC day or per owner (the key's creator_user_id); "
    "idle: per key or per owner.",
)
@click.option("--out", type=click.Path(dir_okay=False, writable=True), help="html: the file to write.")
@pass_state
def report(
    state: State,
    kind: str,
    since: Any,
    at: datetime | None,
    fmt: str,
    workspaces: tuple[str, ...],
    name: str | None,
    by: str,
    out: str | None,
) -> None:
    """Historical reports from the snapshots: inventory, spend, actions, idle, trends, html.

    \b
    inventory  every key at the newest snapshot, or as of --at
    spend      spend over --since (default 30d) per key, workspace or day (--by)
    actions    the audit log over --since (default 30d)
    idle       keys with no new use for --since (default 7d), and when a rule acts on them
    trends     per day: keys by state, idle 30d+, and spend
    html       one self-contained HTML file with charts of all of the above (--out FILE)
    """
    from .context import Database
    from .reports import ReportError, ReportParams, builders, table_columns
    from .reports.render import render

    if kind == "html" and out is None:
        raise click.UsageError("report html needs --out FILE")
    settings = state.settings
    ruleset = _optional_ruleset(settings) if kind in ("idle", "html") else None
    params = ReportParams(now=utcnow(), since=since, at=at, workspaces=workspaces, name=name, ruleset=ruleset, by=by)
    database = Database.open(settings)
    try:
        with database.sessions() as session:
            try:
                if kind == "html":
                    from .reports.html import write_html

                    assert out is not None
                    write_html(session, params, out)
                    click.echo(f"wrote {out}")
                    return
                builder = builders().get(kind)
                if builder is None:
                    fail(f"report {kind!r} is not available in this version", EXIT_USAGE)
                result = builder(session, params)
            except ReportError as exc:
                fail(str(exc), exc.exit_code)
            except OSError as exc:
                fail(f"cannot write {out}: {exc.strerror or exc}")
    finally:
        database.close()
    render(result, fmt, Console(soft_wrap=False), table_columns=table_columns(kind))


def _optional_ruleset(settings: Settings) -> Any:
    """The rules file when there is one (reports use it to say when a rule will act)."""
    from pathlib import Path

    from .jobs import load_ruleset

    if not Path(settings.rules_file).exists():
        return None
    return load_ruleset(settings)


# -- celery -------------------------------------------------------------------------------------


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def worker(ctx: click.Context) -> None:
    """Start the Celery worker (extra options go to `celery worker`, e.g. --concurrency 2)."""
    from worker.main import run_worker

    sys.exit(run_worker(list(ctx.args)))


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def beat(ctx: click.Context) -> None:
    """Start the Celery beat scheduler. Run exactly one per deployment."""
    from worker.main import run_beat

    sys.exit(run_beat(list(ctx.args)))


@cli.command()
@click.argument("job", type=click.Choice(["sync", "enforce", "run", "prune"]))
@click.option("--dry-run", is_flag=True, help="Change nothing (can only narrow the rules file, never widen it).")
@click.option("--wait", is_flag=True, help="Block until the run is recorded and print its outcome.")
@click.option("--timeout", type=float, default=3600.0, show_default=True, help="With --wait: give up after seconds.")
@pass_state
def trigger(state: State, job: str, dry_run: bool, wait: bool, timeout: float) -> None:
    """Queue a job on the Celery worker now."""
    from worker.trigger import trigger_job

    outcome = trigger_job(
        state.settings, job, dry_run=dry_run, wait=wait, timeout=timeout, echo=lambda line: click.echo(line)
    )
    if outcome is not None:
        _finish_job(outcome)


# -- demo ---------------------------------------------------------------------------------------


@cli.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False),
    default=None,
    help="Where to keep the demo database and report (default: ./keyhygiene-demo).",
)
@click.option(
    "--days",
    type=click.IntRange(1, 400),
    default=42,
    show_default=True,
    help="Days of daily snapshots to simulate.",
)
@click.option(
    "--keys",
    type=click.IntRange(10, 20000),
    default=300,
    show_default=True,
    help="Keys in the demo organisation.",
)
def demo(directory: str | None, days: int, keys: int) -> None:
    """A complete hygiene pass against a built-in fake OpenRouter API with sample keys, on SQLite:
    no broker, no account and no network needed."""
    from .demo import run_demo

    sys.exit(run_demo(directory=directory, days=days, keys=keys))


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the command, turning every known failure into one line and an exit code."""
    try:
        cli.main(args=argv, prog_name="keyhygiene", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_USAGE)
    except click.exceptions.Abort:
        fail("aborted")
    except SettingsError as exc:
        fail(str(exc), EXIT_USAGE)
    except UsageError as exc:
        fail(str(exc), EXIT_USAGE)
    except KeyhygieneError as exc:
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        fail("interrupted")
    except Exception as exc:  # a database or API failure outside a job: one line, never a traceback
        from sqlalchemy.exc import SQLAlchemyError

        from keyhygiene.keysapi.errors import ApiError

        from .context import describe_db_error

        if isinstance(exc, SQLAlchemyError):
            fail(f"database error: {describe_db_error(exc)}")
        if isinstance(exc, ApiError):
            fail(f"API error: {exc}")
        raise
    sys.exit(EXIT_OK)
