"""The ``keyhygiene`` command.

Output for people goes to stdout; log events go to stderr (JSON lines by default). Every error ends
with one line on stderr (the ``command_failed`` event where the logs are JSON) and the interface's
exit code, never a bare traceback.
"""

from __future__ import annotations

import contextlib
import gc
import io
import math
import os
import re
import signal
import sys
import threading
from datetime import datetime, timedelta
from typing import Any, NoReturn

import click

from . import logging as khlog
from .errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, KeyhygieneError, UsageError
from .settings import Settings, SettingsError, asked_log_format, load_settings
from .shutdown import stop_on_signals
from .timeutil import MAX_DURATION, TimeFormatError, isoformat, parse_duration, parse_time, utcnow

REPORT_KINDS = ("inventory", "spend", "actions", "idle", "trends", "runs", "html")
_FILTERED_REPORTS = ("inventory", "spend", "actions", "idle", "trends", "html")
"""The reports of keys, which --workspace and --name narrow (trends refuse --name itself); runs are no key's."""
_TABULAR_REPORTS = ("inventory", "spend", "actions", "idle", "trends", "runs")
"""The reports printed as a table, JSON or CSV, cut by --limit; html writes one page."""

ALLOW_ACTIONS_HELP = (
    "Lift both caps (max_actions_per_run, max_action_percent) for this one run, up to N changes; a "
    "larger plan is still refused whole. Never lifts protect_*, the fresh check, the shrink guard or "
    "dry-run. For working through a first backlog."
)


# The largest whole number every supported database stores in an INTEGER column (PostgreSQL's is
# 32 bits): run ids and --allow-actions are stored or looked up there.
MAX_STORED_INTEGER = 2**31 - 1


def _allow_actions_option(function: Any) -> Any:
    return click.option(
        "--allow-actions",
        "allow_actions",
        type=click.IntRange(min=1, max=MAX_STORED_INTEGER),
        metavar="N",
        help=ALLOW_ACTIONS_HELP,
    )(function)


def _run_id_callback(_: Any, __: Any, value: int) -> int:
    if value > MAX_STORED_INTEGER:
        raise click.BadParameter(
            f"there is no run {value}: run ids go up to {MAX_STORED_INTEGER}; see `keyhygiene report runs`"
        )
    return value


class State:
    """Settings, read once when the first command needs them."""

    def __init__(self) -> None:
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            try:
                self._settings = load_settings()
            except SettingsError as exc:
                _log_not_started(str(exc))
                raise
            khlog.configure_logging(self._settings.log_format)
        return self._settings


_JOBS = ("sync", "enforce", "run", "prune", "undo", "enable")
"""The commands whose runs are recorded: refused by bad settings, each says so in the log as well."""


def _log_not_started(error: str) -> None:
    """``run_not_started`` for a job the settings stopped, in the format asked for if that one is
    valid (a log shipper reads only JSON), as for a job a bad rules file stops."""
    command = click.get_current_context(silent=True)
    kind = command.info_name if command is not None else None
    if kind not in _JOBS:
        return
    khlog.configure_logging(asked_log_format())
    khlog.get_logger("keyhygiene.jobs").error("run_not_started", kind=kind, error=khlog.redact_text(error))


def _stderr_takes_json() -> bool:
    """Whether every line on stderr must be JSON: the logs are, or would be in the format asked for
    (a command stopped before it set up its logging: bad settings, a usage error; its logging is
    set up now, for the event that tells why)."""
    if khlog.configured_format() is None:
        if khlog.resolve_format(asked_log_format()) != "json":
            return False
        khlog.configure_logging("json")
    return khlog.logs_are_json()


def _log_failure(error: str, exit_code: int, exc: BaseException | None = None, **fields: Any) -> None:
    """``command_failed``: where stderr takes JSON lines only, the line a failing command ends with."""
    khlog.get_logger("keyhygiene.cli").error(
        "command_failed", error=error, exit_code=exit_code, exc_info=exc or False, **fields
    )


pass_state = click.make_pass_decorator(State, ensure=True)


def _quiet(stream: Any) -> None:
    """Send what is still buffered for ``stream``, a pipe whose reader went away, nowhere: else it
    fails again as the process exits."""
    try:
        descriptor = stream.fileno()
    except (OSError, ValueError):  # not a file: nothing is buffered for a descriptor
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, descriptor)
    os.close(devnull)


def _reader_gone() -> NoReturn:
    """Standard output's reader went away (``keyhygiene report ... | head``): stop quietly, exit 0."""
    _quiet(sys.stdout)
    sys.exit(EXIT_OK)


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    """End the command with exit ``code`` and one line on stderr saying why (``command_failed``
    where the logs are JSON)."""
    message = khlog.redact_text(message)
    if _stderr_takes_json():
        _log_failure(message, code)
    else:
        click.echo(f"keyhygiene: error: {message}", err=True)
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


def _every_callback(ctx: Any, param: Any, value: str) -> timedelta:
    every: timedelta = _duration_option(ctx, param, value)
    if not timedelta(minutes=1) <= every <= timedelta(days=1) or timedelta(days=1) % every:
        raise click.BadParameter(f"must divide a day into whole steps of a minute or more (1d, 1h, 30m), got {value!r}")
    return every


def _timeout_callback(_: Any, __: Any, value: float) -> float:
    # Checked before anything is queued: a job queued by a trigger that then cannot wait is a
    # job nobody follows. nan passes every comparison, hence isfinite.
    if not (math.isfinite(value) and 0 < value <= MAX_DURATION.total_seconds()):
        raise click.BadParameter(f"must be a number of seconds more than 0 and at most 100 years, got {value!r}")
    return value


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


def _settle() -> None:
    """Hide everything loaded so far (modules, settings) from the garbage collector before a job:
    a sync makes many short-lived objects, and every full collection would walk them all again."""
    gc.freeze()


def _finish_job(outcome: Any) -> NoReturn:
    stream = sys.stdout if outcome.exit_code == EXIT_OK else sys.stderr
    prefix = "" if outcome.exit_code == EXIT_OK else "keyhygiene: "
    run = f"run {outcome.run_id} " if outcome.run_id is not None else ""
    said = f"{run}{outcome.kind} {outcome.status}: {khlog.redact_text(outcome.message)}"
    if outcome.exit_code != EXIT_OK and _stderr_takes_json():
        _log_failure(said, outcome.exit_code, run_id=outcome.run_id, kind=outcome.kind, status=outcome.status)
        sys.exit(outcome.exit_code)
    line = f"{prefix}{said}"
    try:
        if stream.isatty():
            # On a terminal the outcome follows a screenful of log lines: set it apart.
            click.echo(file=stream)
            click.secho(line, file=stream, bold=True, fg=None if outcome.exit_code == EXIT_OK else "red")
        else:
            click.echo(line, file=stream)
    except BrokenPipeError:
        _quiet(stream)  # nobody reads the outcome line any more: the exit code still tells it
    sys.exit(outcome.exit_code)


@cli.command()
@pass_state
def sync(state: State) -> None:
    """Page through every key of every workspace (disabled and expired ones included) and store a
    snapshot."""
    settings = state.settings
    from .logging import resolve_format

    if resolve_format(settings.log_format) != "console":  # a spinner among JSON lines breaks them
        _finish_job(_sync(settings))
    from rich.console import Console
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

        outcome = _sync(settings, on_page)
    _finish_job(outcome)


def _sync(settings: Settings, on_page: Any = None) -> Any:
    """The sync job, whose listing begins as soon as the store is open (see
    :class:`keyhygiene.api.EarlyListing`), while the job's other modules load and the run is
    recorded. A store that cannot be used, like a missing key, is refused before any request."""
    try:
        settings.require_management_key()
    except UsageError:
        from .jobs import execute

        return execute("sync", settings)  # refused, as any job is without a key
    from .context import Database

    try:
        database = Database.open(settings)
    except BaseException as exc:
        from .jobs import not_started

        return not_started("sync", exc)
    try:
        from .api import EarlyListing

        with EarlyListing.begin(settings, on_page=on_page) as early:
            from .jobs import execute  # the job's other modules load while the first pages come

            _settle()
            return execute("sync", settings, on_page=on_page, early=early, database=database)
    finally:
        database.close()


@cli.command()
@click.option("--dry-run", is_flag=True, help="Change nothing, whatever the rules file says.")
@_allow_actions_option
@pass_state
def enforce(state: State, dry_run: bool, allow_actions: int | None) -> None:
    """Plan on the newest complete snapshot and act within the safety limits."""
    from .jobs import execute

    _finish_job(execute("enforce", state.settings, dry_run=dry_run, allow_actions=allow_actions))


@cli.command()
@click.option("--dry-run", is_flag=True, help="Change nothing, whatever the rules file says.")
@_allow_actions_option
@pass_state
def run(state: State, dry_run: bool, allow_actions: int | None) -> None:
    """Sync, then enforce on that fresh snapshot: the periodic job, inline, with no broker."""
    from .jobs import execute

    _settle()
    _finish_job(execute("run", state.settings, dry_run=dry_run, allow_actions=allow_actions))


@cli.command()
@click.argument("run_id", type=click.IntRange(min=1), metavar="RUN_ID", callback=_run_id_callback)
@click.option("--dry-run", is_flag=True, help="Check each key fresh and record what would be enabled; change nothing.")
@pass_state
def undo(state: State, run_id: int, dry_run: bool) -> None:
    """Re-enable the keys run RUN_ID disabled, each only if nobody changed it since.

    A key whose updated_at is no longer the one the API answered our disable with is left alone and
    reported; deleted keys cannot be brought back. A change the run may have made but never recorded
    (it was killed) is first settled from the key's fresh state. Each key is audited as action
    `enable` (rule `undo:RUN_ID`). Find run ids with `keyhygiene report runs`. The rules that
    disabled the keys still apply: change them, or protect the keys, before the next run.
    """
    from .jobs import execute

    _finish_job(execute("undo", state.settings, dry_run=dry_run, undo_run_id=run_id))


def _key_hashes(_: click.Context, __: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    # A hash goes into the request's path (/keys/HASH) and the audit log's 128-character column.
    for value in values:
        if "sk-or-" in value.lower():
            # An API key itself (the management key, say), not its hash: never stored or echoed.
            raise click.BadParameter("an argument is an OpenRouter API key, not a key's hash; pass the key's hash")
        if not _KEY_HASH.fullmatch(value):
            raise click.BadParameter(
                f"{value[:70]!r} is not a key hash: a key's full hash is letters and digits "
                "(64 hex characters; `keyhygiene report inventory --format json` lists them)"
            )
    return values


_KEY_HASH = re.compile(r"[A-Za-z0-9_-]{1,128}")


def _holds_the_key(value: str, secret: str) -> bool:
    """An argument that is the management key, holds it, or is a long part of it (the 64 hex
    characters after ``sk-or-v1-`` look just like a key's hash): it would be stored and logged."""
    body = secret.rsplit("-", 1)[-1]
    return value == secret or (len(value) >= 16 and value in secret) or (len(body) >= 16 and body in value)


@cli.command()
@click.argument("key_hashes", nargs=-1, required=True, metavar="HASH...", callback=_key_hashes)
@click.option("--dry-run", is_flag=True, help="Check each key fresh and record what would be enabled; change nothing.")
@pass_state
def enable(state: State, key_hashes: tuple[str, ...], dry_run: bool) -> None:
    """Re-enable the given keys (full hashes), each only if keyhygiene disabled it and nobody changed
    it since. Audited as action `enable`, rule `manual`. A hash no snapshot holds is left alone
    without asking the API. The rules that disabled the keys still apply: change them, or protect
    the keys, before the next run."""
    from .jobs import execute

    key = state.settings.management_key
    if key is not None and any(_holds_the_key(value, key.get_secret_value().strip()) for value in key_hashes):
        fail("an argument holds the management key (or part of it), not a key's hash; pass the key's hash", EXIT_USAGE)
    _finish_job(execute("enable", state.settings, dry_run=dry_run, key_hashes=key_hashes))


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@pass_state
def status(state: State, fmt: str) -> None:
    """The newest run of each job, the newest complete snapshot and the next scheduled run.

    Exits 0 when the newest run of run, sync, enforce or prune that ended succeeded (runs skipped
    because another job held the lock, and undo and enable, are passed over), so did the newest
    `run` (an operator's --dry-run of it, not started by beat, is passed over; a run the rules
    file made dry is not), and the newest snapshot is younger than twice the interval of
    KEYHYGIENE_SCHEDULE; else 1, naming the problem: usable as a monitoring probe or health check.
    """
    import json

    from .context import Database
    from .status import describe_snapshot, read_status

    settings = state.settings
    database = Database.open(settings)
    try:
        with database.sessions() as session:
            current = read_status(session, schedule=settings.schedule, now=utcnow())
    finally:
        database.close()
    if fmt == "json":
        click.echo(json.dumps(current.as_json()))
    else:
        from .reports.base import Report
        from .reports.render import StdoutConsole, print_table
        from .reports.runs import HEADERS

        print_table(
            Report(
                title="Newest run of each job",
                columns=["job", "run_id", "started_at", "status", "started_by", "exit_code", "message"],
                rows=current.runs,
                headers=HEADERS,
                time_formats={"started_at": "%m-%d %H:%M"},
            ),
            StdoutConsole(soft_wrap=False),
        )
        click.echo(describe_snapshot(current))
        click.echo(f"next scheduled run: {isoformat(current.next_run)} (KEYHYGIENE_SCHEDULE {settings.schedule!r})")
        if current.healthy:
            click.echo("healthy")
        for problem in current.problems:
            click.echo(f"problem: {khlog.redact_text(problem)}")
    sys.exit(EXIT_OK if current.healthy else EXIT_FAILURE)


@cli.command()
@pass_state
def prune(state: State) -> None:
    """Remove snapshot history older than KEYHYGIENE_RETENTION (and audit records older than
    KEYHYGIENE_AUDIT_RETENTION, when set), inline. Reports inside the retention do not change."""
    from .jobs import execute

    _finish_job(execute("prune", state.settings))


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=50,
    show_default=True,
    help="table: show at most this many decisions (0: all), then count the rest. JSON always lists all.",
)
@pass_state
def plan(state: State, fmt: str, limit: int) -> None:
    """Evaluate the rules against the newest snapshot and print what enforcement would do.

    Decisions are listed by action (delete, disable, enable, report), then key name. Changes
    nothing and calls no API.
    """
    from db import snapshots
    from keyhygiene.rules import check_caps

    from .context import Database, collection_paused
    from .enforcement import load_plan_inputs, make_plan, refusal_message
    from .jobs import load_ruleset
    from .plan_output import counts_line, ordered, print_table, write_json

    _settle()
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
    _warn_rules(ruleset)
    _warn_unmatched_workspaces(ruleset, inputs.workspace_names)
    with collection_paused():  # a decision per key, all kept: see collection_paused
        the_plan = make_plan(inputs, ruleset, utcnow())
        decisions = ordered(the_plan.decisions)
        if fmt == "json":
            try:
                write_json(decisions, sys.stdout)
                sys.stdout.flush()
            except BrokenPipeError:  # `| head`: the reader has what it wanted
                _reader_gone()
            return
    from .reports.render import StdoutConsole

    title = f"Plan on snapshot {inputs.snapshot_id} ({isoformat(inputs.taken_at)}), {len(inputs.keys):,} keys"
    changes = len(the_plan.changes)
    mode = "DRY RUN (rules file)" if ruleset.safety.dry_run else "LIVE"
    breach = check_caps(the_plan, ruleset.safety)
    try:
        print_table(decisions, StdoutConsole(), title=title, limit=limit)
        click.echo(f"{changes} change(s) planned, {len(decisions) - changes} report(s); mode: {mode}")
        if decisions:
            click.echo(f"by action: {counts_line(the_plan)}")
        if breach is not None:
            click.echo(f"enforcement would be REFUSED: {refusal_message(breach)}")
        sys.stdout.flush()
    except BrokenPipeError:
        _reader_gone()


# -- rules --------------------------------------------------------------------------------------


@cli.group()
def rules() -> None:
    """Rules file commands."""


@rules.command("check")
@click.argument("file", required=False, type=click.Path())
def rules_check(file: str | None) -> None:
    """Validate a rules file (default: KEYHYGIENE_RULES_FILE) and print the rules as understood."""
    from keyhygiene.rules import RulesError, describe, load_rules

    settings = load_settings()  # validated as for every command, even where FILE is given
    khlog.configure_logging(settings.log_format)  # its warnings are log lines where those are JSON
    path = settings.rules_file if file is None else file
    if not path.strip():
        fail("rules check: the rules file's name is empty", EXIT_USAGE)
    try:
        ruleset = load_rules(path)
    except RulesError as exc:
        fail(str(exc), EXIT_USAGE)
    click.echo(khlog.redact_text(describe(ruleset)))
    _warn_rules(ruleset)
    _warn_notify_targets(ruleset)
    if any(rule.workspaces for rule in ruleset.rules):
        names = _newest_workspace_names(settings)
        if names is not None:
            _warn_unmatched_workspaces(ruleset, names)


def _newest_workspace_names(settings: Settings) -> dict[str, str] | None:
    """The workspaces of the newest snapshot, or None when there is no database to ask (yet).

    ``rules check`` must work with no database at all (in CI, before the first sync): any trouble
    reaching it only means there is nothing to check the workspace filters against.
    """
    from pathlib import Path

    from sqlalchemy.exc import SQLAlchemyError

    from db import snapshots

    from .context import Database

    try:
        if settings.database.get_backend_name() == "sqlite":
            file = settings.database.database
            # Opening a SQLite file that does not exist would create it.
            if not file or file == ":memory:" or not Path(file).is_file():
                return None
        database = Database.open(settings)
    except (UsageError, KeyhygieneError):
        return None
    try:
        with database.sessions() as session:
            return snapshots.workspace_names(session) or None
    except SQLAlchemyError:  # an unreachable database only means nothing to check against
        return None
    finally:
        database.close()


def _warn_notify_targets(ruleset: Any) -> None:
    """A warning on stderr for each notify target whose notices would fail as the environment stands
    (checked here, where this command runs: the worker's environment may differ)."""
    if not ruleset.notify:
        return
    from .notices import target_problem

    for target in ruleset.notify:
        problem = target_problem(target)
        if problem is not None:
            _warn(f"notify {target.name!r}: {problem}: its notices would fail")


def _warn_rules(ruleset: Any) -> None:
    """A warning on stderr for each setting of the rules file that does nothing as written."""
    for warning in ruleset.warnings:
        _warn(str(warning))


def _warn(message: str) -> None:
    """A warning about the rules file on stderr, without secrets or control characters: a line of
    text, or a ``rules_warning`` event where the logs are JSON (every line there is one)."""
    from .visible import escape_control

    text = escape_control(khlog.redact_text(message))
    if _stderr_takes_json():
        khlog.get_logger(__name__).warning("rules_warning", message=text)
    else:
        click.echo(f"keyhygiene: warning: {text}", err=True)


def _warn_unmatched_workspaces(ruleset: Any, names: dict[str, str]) -> None:
    """A warning on stderr for each workspace filter value that is no workspace id or name in ``names``."""
    from keyhygiene.rules import unmatched_workspaces

    if not names:
        return  # a snapshot taken before names were recorded: nothing to compare with
    listed = sorted(names.items(), key=lambda item: (item[1], item[0]))
    known = ", ".join(f"{name!r} ({workspace_id})" for workspace_id, name in listed[:10])
    if len(listed) > 10:
        known += f" and {len(listed) - 10} more"
    for rule, value in unmatched_workspaces(ruleset, names):
        _warn(
            f"rule {rule!r}: workspaces: {value!r} is no workspace id or exact name in "
            f"the newest snapshot (its workspaces: {known})"
        )


# -- reports ------------------------------------------------------------------------------------


@cli.command()
@click.argument("kind", type=click.Choice(REPORT_KINDS), metavar="KIND")
@click.option(
    "--since",
    callback=_duration_option,
    metavar="DURATION",
    help="Period to cover, e.g. 30d (spend, actions, trends, html: default 30d; runs: default 7d); idle: the "
    "shortest idleness listed (default 7d).",
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
    "--workspace",
    "workspaces",
    multiple=True,
    metavar="ID|NAME",
    help="Only keys of this workspace, by id or exact name (repeatable).",
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
@click.option(
    "--out",
    type=click.Path(dir_okay=False, writable=True, allow_dash=True),
    help="html: the file to write (-: stdout).",
)
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=100,
    show_default=True,
    help="table: show at most this many rows (0: all), then count the rest. JSON and CSV always list all.",
)
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
    limit: int,
) -> None:
    """Historical reports from the snapshots: inventory, spend, actions, idle, trends, runs, html.

    \b
    inventory  every key at the newest snapshot, or as of --at
    spend      spend over --since (default 30d) per key, workspace, day or owner (--by)
    actions    the audit log over --since (default 30d)
    idle       keys with no new use for --since (default 7d), and when a rule acts on them
    trends     per day: keys by state, idle 30d+, and spend
    runs       one row per job run over --since (default 7d): status, counts, exit code, message
    html       one self-contained HTML file with charts of all of the above (--out FILE)
    """
    from db import snapshots

    from .context import Database
    from .reports import ReportError, ReportParams, builders
    from .reports.render import render

    if kind == "html" and out is None:
        raise click.UsageError("report html needs --out FILE")
    # An option a kind would ignore is refused: a filter that filters nothing, or a file never written.
    given = _given_options(click.get_current_context())
    ignored = [
        option
        for option, kinds in (
            ("--by", ("spend", "idle")),
            ("--workspace", _FILTERED_REPORTS),
            ("--name", _FILTERED_REPORTS),
            ("--out", ("html",)),
            # (--format is taken by every kind, as the interface lists it: html writes its page.)
            ("--limit", _TABULAR_REPORTS),
        )
        if option in given and kind not in kinds
    ]
    if ignored:
        raise click.UsageError(f"report {kind} does not take {' or '.join(ignored)}")
    _settle()
    settings = state.settings
    ruleset = _optional_ruleset(settings) if kind in ("idle", "html") else None
    params = ReportParams(
        now=utcnow(), since=since, at=at, workspaces=workspaces, name=name, ruleset=ruleset, by=by, fmt=fmt, limit=limit
    )
    database = Database.open(settings)
    try:
        with database.sessions() as session:
            names = snapshots.workspace_names(session)
            params = _with_workspace_ids(params, names, _workspaces_known(session, kind, workspaces, names))
            try:
                if kind == "html":
                    from .reports.html import render_html, write_html

                    assert out is not None
                    if out == "-":  # standard output, as for any command that writes a file
                        # As written to a file: nothing taken out (click drops ANSI sequences unless told)
                        click.echo(render_html(session, params), nl=False, color=True)
                        return
                    write_html(session, params, out)
                    click.echo(f"wrote {out}")
                    return
                builder = builders().get(kind)
                if builder is None:
                    fail(f"report {kind!r} is not available in this version", EXIT_USAGE)
                result = builder(session, params)
            except ReportError as exc:
                fail(str(exc), exc.exit_code)
            except BrokenPipeError:  # the page written to a pipe (--out - or /dev/stdout) read in part
                _reader_gone()
            except OSError as exc:
                fail(f"cannot write {out}: {exc.strerror or exc}")
            from .reports.render import StdoutConsole

            # In the session: a long log's JSON or CSV is written as it is read.
            try:
                render(result, fmt, StdoutConsole(soft_wrap=False), limit=limit)
            except BrokenPipeError:
                _reader_gone()  # `| head`: the reader has what it wanted
            finally:
                close = getattr(result.stream, "close", None)  # a generator reading a cursor
                if close is not None:
                    close()  # its cursor, before the session and the database close
    finally:
        database.close()


def _workspaces_known(session: Any, kind: str, workspaces: tuple[str, ...], names: dict[str, str]) -> tuple[str, ...]:
    """The --workspace values as the newest snapshot knows them, each value it does not know replaced
    by the ids it named in an older snapshot (a workspace renamed since) or kept as an id the history
    or (for the audit) the audit log holds; a value none of them knows is refused: a typo would read
    as a workspace with no keys and no spend. Nothing to check in an empty store (the report says so)."""
    from db import audit, snapshots

    if not workspaces or (not names and snapshots.first_snapshot(session) is None):
        return workspaces
    known: list[str] = []
    for value in workspaces:
        if value in names or value in names.values():
            known.append(value)
            continue
        ids = snapshots.workspace_ids_ever(session, value)
        if not ids and kind in ("actions", "html") and audit.audited_workspace(session, value):
            ids = {value}
        if not ids:
            fail(
                f"report: --workspace {value!r} is no workspace id or name the history holds "
                "(names are exact and case-sensitive; `keyhygiene report inventory` shows them)",
                EXIT_USAGE,
            )
        known.extend(sorted(ids))
    return tuple(known)


def _with_workspace_ids(params: Any, names: dict[str, str], workspaces: tuple[str, ...] | None = None) -> Any:
    """Report parameters whose workspace filters (--workspace, or ``workspaces`` in its place, and
    the rules') are ids, not names."""
    from dataclasses import replace

    from keyhygiene.rules import resolve_workspaces, workspace_ids

    ruleset = None if params.ruleset is None else resolve_workspaces(params.ruleset, names)
    given = params.workspaces if workspaces is None else workspaces
    return replace(params, workspaces=workspace_ids(given, names), ruleset=ruleset)


def _optional_ruleset(settings: Settings) -> Any:
    """The rules file when there is one (reports use it to say when a rule will act)."""
    from pathlib import Path

    from .jobs import load_ruleset

    if not Path(settings.rules_file).exists():
        return None
    return load_ruleset(settings)


@cli.command()
@pass_state
def metrics(state: State) -> None:
    """Print the Prometheus metrics once (for node_exporter's textfile collector or a cron job).

    The same text the worker serves at /metrics when KEYHYGIENE_METRICS_ADDR is set, read from the
    database now. A database that cannot be opened still prints keyhygiene_database_up 0, then
    exits 1 with the error.
    """
    from .context import Database
    from .metrics import render, render_database_down

    settings = state.settings
    try:
        database = Database.open(settings)
    except KeyhygieneError as exc:
        if exc.exit_code != EXIT_USAGE:  # the database's state, which the metrics report
            sys.stdout.write(render_database_down().decode())
            sys.stdout.flush()
        fail(str(exc), exc.exit_code)
    try:
        sys.stdout.write(render(database).decode())
    finally:
        database.close()


# -- celery -------------------------------------------------------------------------------------


def _given_options(ctx: click.Context) -> set[str]:
    """The options given on the command line (not left to their defaults), by their first name."""
    from click.core import ParameterSource

    return {
        param.opts[0]
        for param in ctx.command.params
        if isinstance(param, click.Option)
        and param.name is not None
        and ctx.get_parameter_source(param.name) not in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)
    }


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def worker(ctx: click.Context) -> None:
    """Start the Celery worker (extra options go to `celery worker`, e.g. --concurrency 2).

    --heartbeat-file FILE: the file the worker keeps fresh while its broker connection is up, which
    `python -m worker.health` checks (default: keyhygiene-worker.heartbeat in the temporary folder)."""
    from worker.main import run_worker

    _leave_signals_to_celery()
    sys.exit(run_worker(list(ctx.args)))


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def beat(ctx: click.Context) -> None:
    """Start the Celery beat scheduler. Run exactly one per deployment.

    Extra options go to `celery beat` (e.g. --schedule FILE). --heartbeat-file FILE: a file beat
    touches on every tick (at least every 30 s), for `python -m worker.health --file FILE`."""
    from worker.main import run_beat

    _leave_signals_to_celery()
    sys.exit(run_beat(list(ctx.args)))


@cli.command()
@click.argument("job", type=click.Choice(["sync", "enforce", "run", "prune"]))
@click.option("--dry-run", is_flag=True, help="Change nothing (can only narrow the rules file, never widen it).")
@_allow_actions_option
@click.option("--wait", is_flag=True, help="Block until the run is recorded and print its outcome.")
@click.option(
    "--timeout",
    type=float,
    default=3600.0,
    show_default=True,
    callback=_timeout_callback,
    help="With --wait: give up after this many seconds (more than 0).",
)
@pass_state
def trigger(state: State, job: str, dry_run: bool, allow_actions: int | None, wait: bool, timeout: float) -> None:
    """Queue a job on the Celery worker now (--allow-actions: enforce and run only).

    Without --wait it prints the task id; its run is found with `keyhygiene report runs --since 1h`.
    """
    from worker.trigger import trigger_job

    outcome = trigger_job(
        state.settings,
        job,
        dry_run=dry_run,
        allow_actions=allow_actions,
        wait=wait,
        timeout=timeout,
        echo=lambda line: click.echo(line),
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
    help="Days of history to simulate (a snapshot each day, or as often as --every says).",
)
@click.option(
    "--keys",
    type=click.IntRange(10, 100_000),
    default=300,
    show_default=True,
    help="Keys in the demo organisation.",
)
@click.option(
    "--every",
    default="1d",
    show_default=True,
    callback=_every_callback,
    help="Time between two simulated snapshots: 1d, or a whole fraction of a day (1h, 6h, 30m, ...).",
)
def demo(directory: str | None, days: int, keys: int, every: timedelta) -> None:
    """A complete hygiene pass against a built-in fake OpenRouter API with sample keys, on SQLite:
    no broker, no account and no network needed."""
    from .demo import run_demo

    sys.exit(run_demo(directory=directory, days=days, keys=keys, every=every))


def _leave_signals_to_celery() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the command, turning every known failure into one line and an exit code."""
    for stream in (sys.stdout, sys.stderr):
        # A name the API sent may hold a lone surrogate (valid JSON): written as its escape, on any
        # terminal or locale, never a crash or a byte that is not UTF-8.
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    # Known before the settings are read (the arguments are parsed first): a usage error may quote it.
    khlog.register_secret(os.environ.get("OPENROUTER_MANAGEMENT_KEY", "").strip())
    with stop_on_signals():
        try:
            _main(argv)
        finally:
            # The process ends here: its objects are freed as it exits, without a last cyclic
            # collection walking every one of them first (a tenth of a second after a large report).
            gc.freeze()


def _usage_error(exc: click.ClickException) -> NoReturn:
    """A mistyped command, option or argument: click's message (usage and all on a terminal; the
    help of a command given no subcommand on stdout where the logs are JSON), exit 2."""
    settings = None
    with contextlib.suppress(SettingsError):
        settings = load_settings()  # registers the key wherever it is set: .env and a _FILE too
    if settings is not None and khlog.configured_format() is None:
        khlog.configure_logging(settings.log_format)
    # Click quotes the argument it refused: the management key, pasted where a run id or a hash
    # goes, must not be printed back.
    if not _stderr_takes_json():
        shown = io.StringIO()
        exc.show(file=shown)
        sys.stderr.write(khlog.redact_text(shown.getvalue()))
        sys.exit(EXIT_USAGE)
    context = exc.ctx if isinstance(exc, click.UsageError) else None
    message = exc.format_message()
    no_command = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click 8.2 and later
    if isinstance(exc, no_command) and context is not None:
        try:
            click.echo(context.get_help())  # what to type is the help: people read it on stdout
        except OSError:  # its reader went away (`keyhygiene db | true`), or a full disk
            _quiet(sys.stdout)
        message = f"{context.command_path} needs a command: see its help on stdout"
    command = context.command_path if context is not None else None
    _log_failure(khlog.redact_text(message), EXIT_USAGE, command=command)
    sys.exit(EXIT_USAGE)


def _main(argv: list[str] | None) -> None:
    try:
        # As click's own main() without its handlers: an interrupt (SIGTERM, Ctrl-C) reaches the
        # one below with its reason, and click writes nothing of its own on stderr.
        cli._main_shell_completion({}, "keyhygiene", None)  # _KEYHYGIENE_COMPLETE=bash_source, as before
        with cli.make_context("keyhygiene", list(sys.argv[1:] if argv is None else argv)) as context:
            cli.invoke(context)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        _usage_error(exc)
    except (click.exceptions.Abort, EOFError):
        fail("aborted")
    except SettingsError as exc:
        fail(str(exc), EXIT_USAGE)
    except UsageError as exc:
        fail(str(exc), EXIT_USAGE)
    except KeyhygieneError as exc:
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt as exc:
        if not _stderr_takes_json() and sys.stderr.isatty():
            click.echo(err=True)  # past the terminal's ^C
        fail(str(exc) or "interrupted")
    except BrokenPipeError:  # the reader of the output went away while a command wrote it
        _quiet(sys.stdout)
        sys.exit(EXIT_FAILURE)
    except Exception as exc:  # a database or API failure outside a job: one line, never a traceback
        from sqlalchemy.exc import SQLAlchemyError

        from keyhygiene.keysapi.errors import ApiError

        from .context import describe_db_error

        if isinstance(exc, SQLAlchemyError):
            fail(f"database error: {describe_db_error(exc)}")
        if isinstance(exc, ApiError):
            fail(f"API error: {exc}")
        # A bug: its traceback, as Python prints it (or in the JSON event), without any secret a
        # message quotes.
        if _stderr_takes_json():
            _log_failure(khlog.redact_text(f"unexpected error: {exc!r}"), EXIT_FAILURE, exc)
            sys.exit(EXIT_FAILURE)
        import traceback

        sys.stderr.write(khlog.redact_text("".join(traceback.format_exception(exc))))
        sys.exit(EXIT_FAILURE)
    sys.exit(EXIT_OK)
